"""Store faults on real redis-server processes: a paused server (SIGSTOP), error replies
(OOM, READONLY, MASTERDOWN), a peer answering garbage; each follows `store.on_error`, leaves
no phantom admission or leaked lease, and recovers without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.errors import StoreError
from gateway.store.base import PIPELINE_STATS, AdmitRequest, KeyRecord, Settlement, Subject
from gateway.store.redis import RedisStore
from gateway.store.redis.pooled import PooledRunner
from tests.support.cli import GatewayProcess, code_of, run_cli, send
from tests.support.gateway import (
    RunningGateway,
    poll,
    running_gateway,
    unique_prefix,
    write_config,
)
from tests.support.redis_server import RedisServer, free_port
from tests.support.upstream import FakeUpstream

US = {"X-Forwarded-For": "192.0.2.1"}


def _body(max_tokens: int = 16) -> bytes:
    return json.dumps({"model": "claude-test-1", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


async def _send(s: aiohttp.ClientSession, gw: RunningGateway, key: str,
                max_tokens: int = 16) -> tuple[int, dict[str, Any]]:
    headers = {"content-type": "application/json", "x-api-key": key, **US}
    async with s.post(gw.url + "/v1/messages", data=_body(max_tokens), headers=headers) as r:
        return r.status, await r.json(content_type=None)


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
    prefix = unique_prefix()
    store = {"url": redis_server.url, "key_prefix": prefix, "on_error": "closed",
             "timeout_s": 0.25}
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        key_id, key = await gw.issue_known_key(rpm=5, otpm=1000, concurrency=2)
        assert (await _send(s, gw, key))[0] == 200

        with paused(redis_server):
            replies = await asyncio.gather(*(_send(s, gw, key, 300) for _ in range(3)))
            for status, body in replies:
                assert status == 503, body
                assert body["error"]["code"] == "store_unavailable"

        client = aioredis.from_url(redis_server.url)
        leases = f"{prefix}{{r:direct}}:key:{key_id}"  # the key's hash: c = leases held
        try:
            async def no_lease_left() -> bool:
                return int(await client.hget(leases, "c") or 0) == 0

            await poll(no_lease_left, timeout=10.0)
            # Settle every cancel: a rolled-back admission must stay rolled back.
            await poll(lambda: not gw.service.limits.pending, timeout=10.0)
            assert int(await client.hget(leases, "c") or 0) == 0
        finally:
            await client.aclose()
        # rpm 5: one admitted before, so four now (3 phantoms would leave one); the output
        # bucket (1000) takes 600 more only if the 3 x 300 reserved during the stall are back.
        statuses = [(await _send(s, gw, key, 150))[0] for _ in range(4)]
        assert statuses == [200] * 4
        status, body = await _send(s, gw, key)
        assert status == 429 and body["error"]["code"] == "requests_per_minute", body


async def test_a_client_gone_while_its_admission_is_at_the_store_holds_no_lease(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """A client hangs up while its admission waits on a slow Redis (the call is written, not
    yet answered). When Redis answers, the admission is given back: at concurrency 1 the key
    admits again within seconds, not a lease ttl (60 s) later."""
    store = {"url": redis_server.url, "key_prefix": unique_prefix(), "on_error": "closed",
             "timeout_s": 5.0}
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        _, key = await gw.issue_known_key(concurrency=1)
        assert (await _send(s, gw, key))[0] == 200
        writes = PIPELINE_STATS.writes
        with paused(redis_server):
            gone = asyncio.ensure_future(_send(s, gw, key))
            await poll(lambda: PIPELINE_STATS.writes > writes, timeout=10.0)  # sent
            gone.cancel()  # the client closes its connection; the handler is cancelled
            await poll(lambda: not gw.service._requests, timeout=10.0)
        statuses: list[int] = []

        async def admitted() -> bool:
            statuses.append((await _send(s, gw, key))[0])
            return statuses[-1] == 200

        await poll(admitted, timeout=10.0, interval=0.1)
        assert set(statuses) <= {200, 429}


async def test_failed_settlement_is_retried_when_the_store_returns(
        tmp_path: Path, upstream: FakeUpstream, durable_redis: RedisServer) -> None:
    """A stream that ends while Redis is down releases its lease once Redis is back (the
    settlement is retried), not a lease ttl later: a concurrency-1 key admits again within
    seconds."""
    prefix = unique_prefix()
    store = {"url": durable_redis.url, "key_prefix": prefix, "on_error": "closed",
             "timeout_s": 0.25}
    upstream.hold_stream = asyncio.Event()
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        key_id, key = await gw.issue_known_key(concurrency=1)
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
            leases = f"{prefix}{{r:direct}}:key:{key_id}"  # the key's hash: c = leases held
            await poll(lambda: not gw.service.limits.pending, timeout=10.0)

            async def released() -> bool:  # the last request's settlement lands too
                return int(await client.hget(leases, "c") or 0) == 0

            await poll(released, timeout=10.0)
        finally:
            await client.aclose()


# --- error replies: every store failure is a StoreError ------------------------------------------


def _masterdown(server: RedisServer) -> None:
    """Make `server` a replica of a master that does not exist, serving no stale data: from
    then on it answers data commands (and commands inside scripts) with MASTERDOWN, writes
    with READONLY."""
    import redis

    with redis.Redis(host=server.host, port=server.port) as c:
        c.config_set("replica-serve-stale-data", "no")
        c.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))


def _heal(server: RedisServer) -> None:
    import redis

    with redis.Redis(host=server.host, port=server.port) as c:
        c.execute_command("REPLICAOF", "NO", "ONE")
        c.config_set("maxmemory", "0")
        c.config_set("min-replicas-to-write", "0")


@pytest.mark.parametrize("transport", ["pipelined", "pooled"])
async def test_error_replies_become_store_errors_on_every_method(
        redis_server: RedisServer, transport: str) -> None:
    """With Redis answering MASTERDOWN / READONLY, every store method raises StoreError (never
    a redis-py ResponseError), on the pipelined connection and on the pooled client alike;
    the event listener survives; once Redis heals, the same store works again."""
    pooled = PooledRunner(redis_server.url, 0.5)
    # "pooled": as on Sentinel and Cluster, the per-request scripts through redis-py too.
    store = RedisStore(redis_server.url, unique_prefix(), timeout_s=0.5, pooled=pooled,
                       scripts=pooled if transport == "pooled" else None)
    await store.start()
    events: list[dict[str, Any]] = []

    async def on_event(event: dict[str, Any]) -> None:
        events.append(event)

    try:
        await store.subscribe(on_event)
        s = Subject("key", "k1", "r", rpm=10, itpm=1000, concurrency=2)
        req = AdmitRequest((s,), "lease-1", 60_000, 10, 10)
        assert (await store.admit(req)).ok
        _masterdown(redis_server)
        calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("admit", lambda: store.admit(AdmitRequest((s,), "lease-2", 60_000, 1, 1))),
            ("cancel", lambda: store.cancel(req)),
            ("settle", lambda: store.settle(Settlement((s,), "lease-1", 10, 10, 5, 5))),
            ("renew", lambda: store.renew_leases([((s,), "lease-1")], 60_000)),
            ("get_key", lambda: store.get_key("k1")),
            ("list_keys", store.list_keys),
            ("put_key", lambda: store.put_key(KeyRecord("k1", "r", "h" * 64))),
            ("touch_keys", lambda: store.touch_keys({"k1": 1.0})),
            ("last_used", lambda: store.last_used(["k1"])),
            ("get_policy", store.get_policy),
            ("put_policy", lambda: store.put_policy("{}", "test")),
            ("versions", store.versions),
        ]
        for name, call in calls:
            with pytest.raises(StoreError) as caught:
                await call()
            assert "ResponseError" not in repr(caught.value), name
        assert all(not t.done() for t in store._tasks)  # the listener lives on

        _heal(redis_server)
        assert await store.versions() == (0, 0)
        assert await store.put_key(KeyRecord("k1", "r", "h" * 64)) == 1
        assert (await store.admit(AdmitRequest((s,), "lease-3", 60_000, 1, 1))).ok
        await poll(lambda: any(e.get("kind") == "key" for e in events), timeout=10.0)
    finally:
        await store.close()


async def test_garbage_answering_peer_is_a_store_failure(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A peer that answers every command with `+OK` (not Redis, or a broken proxy) makes
    admission answer 503 store_unavailable, not 500."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                writer.write(b"+OK\r\n")
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = {"url": f"redis://127.0.0.1:{port}/0", "key_prefix": unique_prefix(),
             "on_error": "closed", "timeout_s": 0.25}
    try:
        async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                    aiohttp.ClientSession() as s):
            rec = KeyRecord("kgarbage000", "direct", "h" * 64)
            gw.service.registry.keys[rec.key_id] = rec  # the peer cannot store one
            status, body = await _send(s, gw, "gk_kgarbage000_secret")
            assert status in (401, 503), body  # the secret check may come first
            sub = Subject("key", "kgarbage000", "direct", rpm=5)
            with pytest.raises(StoreError):
                await gw.service.store.admit(AdmitRequest((sub,), "l1", 60_000, 0, 0))
            with pytest.raises(StoreError):
                await gw.service.store.versions()
            with pytest.raises(StoreError):
                await gw.service.store.get_policy()
            assert not any(x["status"] == 500 for x in gw.logs.requests())
            assert _loops_alive(gw)
    finally:
        server.close()
        await server.wait_closed()


def _deny_writes(server: RedisServer, fault: str) -> None:
    """Every write (and every script that writes) now gets an error reply: OOM (no memory
    left, nothing to evict) or NOREPLICAS (fewer replicas than min-replicas-to-write)."""
    import redis

    with redis.Redis(host=server.host, port=server.port) as c:
        if fault == "oom":
            c.config_set("maxmemory-policy", "noeviction")
            c.config_set("maxmemory", "1")
        else:
            c.config_set("min-replicas-to-write", "1")


@pytest.mark.parametrize("fault", ["oom", "noreplicas"])
@pytest.mark.parametrize("on_error", ["closed", "open"])
async def test_write_error_replies_follow_on_error_and_recover(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer,
        on_error: str, fault: str) -> None:
    """Redis answering writes with OOM or NOREPLICAS: admission answers 503 store_unavailable
    (closed) or admits through the local fallback (open), never 500; the admin API answers
    503; once Redis takes writes again, admission goes through it without a restart."""
    store = {"url": redis_server.url, "key_prefix": unique_prefix(), "on_error": on_error,
             "timeout_s": 0.5}
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        _, key = await gw.issue_known_key(rpm=50)
        assert (await _send(s, gw, key))[0] == 200
        _deny_writes(redis_server, fault)
        status, body = await _send(s, gw, key)
        if on_error == "closed":
            assert status == 503, body
            assert (body["error"]["type"], body["error"]["code"]) == (
                "overloaded_error", "store_unavailable")
        else:
            assert status == 200, body
        status, _ = await gw.admin("POST", "/admin/keys", json={"reseller": "direct"})
        assert status == 503
        assert not any(x["status"] == 500 for x in gw.logs.requests())

        _heal(redis_server)

        async def through_redis() -> bool:
            status, _ = await _send(s, gw, key)
            return status == 200 and gw.service.limits.store_ok

        await poll(through_redis, timeout=10.0)
        assert _loops_alive(gw)


async def test_readonly_replica_keeps_background_loops_alive(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """Redis turned into a read-only replica of an empty server (a failover gone wrong): writes
    answer READONLY, admission 503, and every background loop (sync, events, retries) lives
    on; promoted again, the gateway restores its keys and admits without a restart."""
    store = {"url": redis_server.url, "key_prefix": unique_prefix(), "on_error": "closed",
             "timeout_s": 0.5}
    with RedisServer() as empty:
        async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                    aiohttp.ClientSession() as s):
            _, key = await gw.issue_known_key(rpm=50)
            assert (await _send(s, gw, key))[0] == 200
            import redis

            with redis.Redis(host=redis_server.host, port=redis_server.port) as c:
                c.execute_command("REPLICAOF", empty.host, str(empty.port))

                def synced() -> bool:
                    return c.info("replication").get("master_link_status") == "up"

                await poll(synced, timeout=15.0)
            status, body = await _send(s, gw, key)
            assert status == 503, body
            # The sync loop sees the data gone and tries to restore it: READONLY each time.
            await poll(lambda: gw.logs.events("store_data_lost"), timeout=10.0)
            assert _loops_alive(gw)
            assert all(not t.done() for t in gw.service.store._tasks)  # type: ignore[attr-defined]

            _heal(redis_server)

            async def admitted() -> bool:
                return (await _send(s, gw, key))[0] == 200

            await poll(admitted, timeout=15.0)
            assert not any(x["status"] == 500 for x in gw.logs.requests())


# --- on_error: open with --workers ----------------------------------------------------------------


async def test_fallback_divides_by_instances_times_workers(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """`gateway run --workers 2` with Redis stopped and on_error open: each worker's local
    limiter admits rpm / (fallback_instances x workers), so the two together admit no more
    than the key's rpm (rpm 8, 2 instances, 2 workers: 2 per worker, 4 in all)."""
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, upstream.url, listen=f"127.0.0.1:{port}",
                          admin_listen=f"127.0.0.1:{admin_port}",
                          store={"url": redis_server.url, "key_prefix": unique_prefix(),
                                 "on_error": "open", "fallback_instances": 2,
                                 "sync_interval_s": 0.2})
    # An empty Redis: apply the policy first (keys are issued for resellers it names).
    applied = await asyncio.to_thread(run_cli, "policy", "apply", str(tmp_path / "policy.yaml"),
                                      config=config)
    assert applied.returncode == 0, applied.stderr
    issued = await asyncio.to_thread(run_cli, "keys", "issue", "--reseller", "direct",
                                     "--rpm", "8", "--json", config=config)
    assert issued.returncode == 0, issued.stderr
    key = json.loads(issued.stdout)["key"]
    url = f"http://127.0.0.1:{port}"
    with GatewayProcess(config, "--workers", "2") as gw:
        await poll(lambda: len(gw.events("gateway_started")) == 2, timeout=60.0)

        async def admitted() -> bool:
            return (await send(url, key))[0] == 200

        await poll(admitted, timeout=30.0)  # both workers have loaded the key by now
        redis_server.kill()
        replies = [await send(url, key) for _ in range(16)]  # fresh connections: both workers
        ok = [headers for status, _, headers in replies if status == 200]
        assert 1 <= len(ok) <= 4, [status for status, _, _ in replies]
        for headers in ok:
            assert headers["anthropic-ratelimit-requests-limit"] == "2"
        limited = [body for status, body, _ in replies if status == 429]
        assert limited and all(code_of(b) == "requests_per_minute" for b in limited)


def _loops_alive(gw: RunningGateway) -> bool:
    """Every background loop of the gateway is running (and there are some)."""
    tasks = gw.service.loops.tasks
    return bool(tasks) and all(not t.done() for t in tasks)
