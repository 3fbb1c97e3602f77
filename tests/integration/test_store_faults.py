"""Store faults on real redis-server processes: a paused server (SIGSTOP), error replies
(OOM, READONLY, MASTERDOWN), a peer answering garbage; each follows `store.on_error`, leaves
no phantom admission or leaked lease, and recovers without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.support.gateway import RunningGateway, poll, running_gateway
from tests.support.redis_server import RedisServer
from tests.support.upstream import FakeUpstream

US = {"X-Forwarded-For": "192.0.2.1"}


def _prefix() -> str:
    return f"f{uuid.uuid4().hex[:10]}:"


def _body(max_tokens: int = 16) -> bytes:
    return json.dumps({"model": "claude-test-1", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


async def _send(s: aiohttp.ClientSession, gw: RunningGateway, key: str,
                max_tokens: int = 16) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json", "x-api-key": key, **US}
    async with s.post(gw.url + "/v1/messages", data=_body(max_tokens), headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def _issue(gw: RunningGateway, **spec: Any) -> tuple[str, str]:
    key_id, key = await gw.issue_key("direct", **spec)
    await poll(lambda: key_id in gw.service.registry.keys, timeout=10.0)
    return key_id, key


@contextmanager
def paused(server: RedisServer) -> Iterator[None]:
    """The server process stopped (SIGSTOP) inside the block, continued (SIGCONT) after it:
    its sockets stay open and what clients write to them waits in the kernel."""
    proc = server._process
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone that keeps its data across a crash (append-only
    file, fsync per write)."""
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server


# --- a paused store: no phantom admissions ------------------------------------------------------


async def test_admissions_given_up_during_a_stall_are_rolled_back(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """Requests refused 503 while Redis is paused spend no rpm or tokens and hold no lease
    once Redis resumes: within seconds the key admits exactly what it would have without
    them (rpm 5: 1 before, 4 after; concurrency 2: no lease left)."""
    prefix = _prefix()
    store = {"url": redis_server.url, "key_prefix": prefix, "on_error": "closed",
             "timeout_s": 0.25}
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        key_id, key = await _issue(gw, rpm=5, otpm=1000, concurrency=2)
        assert (await _send(s, gw, key))[0] == 200

        with paused(redis_server):
            replies = await asyncio.gather(*(_send(s, gw, key, 300) for _ in range(3)))
            for status, body in replies:
                assert status == 503, body
                assert body["error"]["code"] == "store_unavailable"

        client = aioredis.from_url(redis_server.url)
        leases = f"{prefix}{{r:direct}}:key:{key_id}:concurrency"
        try:
            async def no_lease_left() -> bool:
                return int(await client.zcard(leases)) == 0

            await poll(no_lease_left, timeout=10.0)
            # Settle every cancel: a rolled-back admission must stay rolled back.
            await poll(lambda: not gw.service.limits.pending, timeout=10.0)
            assert int(await client.zcard(leases)) == 0
        finally:
            await client.aclose()
        # rpm 5: one admitted before, so four now (3 phantoms would leave one); the output
        # bucket (1000) takes 600 more only if the 3 x 300 reserved during the stall are back.
        statuses = [(await _send(s, gw, key, 150))[0] for _ in range(4)]
        assert statuses == [200] * 4
        status, body = await _send(s, gw, key)
        assert status == 429 and body["error"]["code"] == "requests_per_minute", body


async def test_failed_settlement_is_retried_when_the_store_returns(
        tmp_path: Path, upstream: FakeUpstream, durable_redis: RedisServer) -> None:
    """A stream that ends while Redis is down releases its lease once Redis is back (the
    settlement is retried), not a lease ttl later: a concurrency-1 key admits again within
    seconds."""
    prefix = _prefix()
    store = {"url": durable_redis.url, "key_prefix": prefix, "on_error": "closed",
             "timeout_s": 0.25}
    upstream.hold_stream = asyncio.Event()
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        key_id, key = await _issue(gw, concurrency=1)
        body = json.dumps({"model": "claude-test-1", "max_tokens": 16, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]})
        async with s.post(gw.url + "/v1/messages", data=body,
                          headers={"content-type": "application/json", "x-api-key": key,
                                   **US}) as held:
            assert held.status == 200
            await asyncio.wait_for(upstream.first_event_sent.wait(), 10)
            durable_redis.kill()
            upstream.hold_stream.set()
            await held.read()
        await poll(lambda: gw.service.limits.pending, timeout=10.0)
        durable_redis.restart()

        async def admitted() -> bool:
            return (await _send(s, gw, key))[0] == 200

        await poll(admitted, timeout=10.0)
        client = aioredis.from_url(durable_redis.url)
        try:
            leases = f"{prefix}{{r:direct}}:key:{key_id}:concurrency"
            await poll(lambda: not gw.service.limits.pending, timeout=10.0)
            assert int(await client.zcard(leases)) == 0
        finally:
            await client.aclose()
