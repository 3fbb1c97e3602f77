"""The gateway on a store reached through Redis Sentinel: a real master, a real sentinel."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from gateway.store.redis import RedisStore
from tests.support.gateway import RunningGateway, poll, running_gateway
from tests.support.redis_server import RedisSentinel
from tests.support.upstream import FakeUpstream

US = {"X-Forwarded-For": "192.0.2.1"}


async def _send(s: aiohttp.ClientSession, gw: RunningGateway, key: str) -> tuple[int, str]:
    body = json.dumps({"model": "claude-test-1", "max_tokens": 16,
                       "messages": [{"role": "user", "content": "hi"}]})
    headers = {"content-type": "application/json", "x-api-key": key, **US}
    async with s.post(gw.url + "/v1/messages", data=body, headers=headers) as r:
        return r.status, await r.text()


async def test_gateway_on_sentinel_store(tmp_path: Path, upstream: FakeUpstream,
                                         redis_sentinel: RedisSentinel) -> None:
    """A key issued through the admin API is stored on the sentinel's master, authenticates
    through the gateway, and its rpm=3 admits exactly 3 of 6 parallel requests."""
    prefix = f"s{uuid.uuid4().hex[:10]}:"
    store = {"url": redis_sentinel.url, "key_prefix": prefix}
    async with running_gateway(tmp_path, upstream.url, store=store) as gw:
        assert isinstance(gw.service.store, RedisStore)
        key_id, key = await gw.issue_key("direct", rpm=3)
        await poll(lambda: key_id in gw.service.registry.keys, timeout=10.0)
        # The record went through the sentinel to the master it monitors.
        master = aioredis.Redis(host=redis_sentinel.master.host,
                                port=redis_sentinel.master.port)
        try:
            assert await master.hexists(f"{prefix}{{meta}}:keys", key_id)
        finally:
            await master.aclose()

        async with aiohttp.ClientSession() as s:
            replies = await asyncio.gather(*(_send(s, gw, key) for _ in range(6)))
        assert sorted(status for status, _ in replies) == [200] * 3 + [429] * 3, replies
        for status, text in replies:
            if status == 429:
                error = json.loads(text)["error"]
                assert (error["type"], error["code"]) == ("rate_limit_error",
                                                          "requests_per_minute")
        assert len(upstream.requests) == 3
        lines = gw.logs.requests()
        assert sorted(x["decision"] for x in lines) == ["allow"] * 3 + ["rate_limited"] * 3
