"""Rate limits through the real gateway: exactness under concurrency (one and two instances,
Redis and Redis Cluster), token settlement from real SSE streams, lease release on client
disconnect, Redis outages under both `on_error` policies, and Redis round trips per request."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from gateway.identity import KeyRegistry
from tests.support.gateway import (
    RunningGateway,
    poll,
    running_gateway,
    store_config,
    unique_prefix,
)
from tests.support.redis_server import RedisServer
from tests.support.upstream import FakeUpstream

US = {"X-Forwarded-For": "192.0.2.1"}
CN = {"X-Forwarded-For": "198.51.100.1"}
UNKNOWN_KEY = "gk_0123456789abcdef_" + "A" * 43
# Settlement runs right after the response; allow this much refill (tokens per minute / 60
# per second) on top of the exact figure.
REFILL_SLACK = 25


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone that keeps its data across a crash (append-only
    file, fsync per write), as a production Redis would."""
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server


async def issue(gw: RunningGateway, *others: RunningGateway, **spec: Any) -> str:
    """Issue a `direct` key and wait until every instance given can authenticate it."""
    key_id, key = await gw.issue_key("direct", **spec)
    for inst in (gw, *others):
        registry = inst.service.registry

        def known(r: KeyRegistry = registry) -> bool:
            return key_id in r.keys

        await poll(known, timeout=10.0)
    return key


def anthropic_body(max_tokens: int = 16, stream: bool = False, text: str = "hi") -> bytes:
    return json.dumps({"model": "claude-test-1", "max_tokens": max_tokens, "stream": stream,
                       "messages": [{"role": "user", "content": text}]}).encode()


def openai_body(max_tokens: int = 16, stream: bool = False, text: str = "hi") -> bytes:
    doc: dict[str, Any] = {"model": "gpt-test-1", "max_completion_tokens": max_tokens,
                           "messages": [{"role": "user", "content": text}]}
    if stream:
        doc.update(stream=True, stream_options={"include_usage": True})
    return json.dumps(doc).encode()


async def send(s: aiohttp.ClientSession, gw: RunningGateway, key: str | None,
               body: bytes | None = None, path: str = "/v1/messages",
               headers: dict[str, str] | None = None) -> Reply:
    h = {"content-type": "application/json", **(headers or US)}
    if key is not None:
        h["x-api-key"] = key
    async with s.post(gw.url + path, data=anthropic_body() if body is None else body,
                      headers=h) as r:
        return Reply(r.status, r.headers, await r.text())


async def readyz(s: aiohttp.ClientSession, gw: RunningGateway) -> tuple[int, Any]:
    async with s.get(gw.admin_url + "/readyz") as r:
        return r.status, await r.json()


def assert_rate_limited(r: Reply, code: str) -> None:
    assert r.status == 429, r.text
    assert re.fullmatch(r"[1-9][0-9]*", r.headers["retry-after"])
    body = r.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == code
    assert body["request_id"] == r.headers["x-request-id"]


def assert_request_headers(r: Reply, limit: int, remaining: int | None = None) -> None:
    h = r.headers
    assert h["anthropic-ratelimit-requests-limit"] == str(limit)
    if remaining is not None:
        assert h["anthropic-ratelimit-requests-remaining"] == str(remaining)
    reset = datetime.fromisoformat(h["anthropic-ratelimit-requests-reset"])
    assert reset.tzinfo is not None


# --- exactness under concurrency -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis", "cluster"])
async def test_rpm_exact_under_concurrency(tmp_path: Path, upstream: FakeUpstream,
                                           request: pytest.FixtureRequest, backend: str) -> None:
    """30 parallel requests on a key with rpm=10 admit exactly 10; the other 20 get
    provider-shaped 429s with retry-after and the rate-limit headers."""
    async with running_gateway(tmp_path, upstream.url, store=store_config(request, backend)) as gw:
        key = await issue(gw, rpm=10)
        async with aiohttp.ClientSession() as s:
            replies = await asyncio.gather(*(send(s, gw, key) for _ in range(30)))
        ok = [r for r in replies if r.status == 200]
        limited = [r for r in replies if r.status != 200]
        assert len(ok) == 10
        assert len(limited) == 20
        assert sorted(int(r.headers["anthropic-ratelimit-requests-remaining"])
                      for r in ok) == list(range(10))
        for r in ok:
            assert_request_headers(r, 10)
        for r in limited:
            assert_rate_limited(r, "requests_per_minute")
            assert_request_headers(r, 10, 0)
            assert 1 <= int(r.headers["retry-after"]) <= 6
        assert len(upstream.requests) == 10
        lines = gw.logs.requests()
        assert sum(x["decision"] == "rate_limited" for x in lines) == 20
        assert {x["reason"] for x in lines if x["decision"] == "rate_limited"} == {
            "requests_per_minute"}


@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_rpm_exact_across_two_instances(tmp_path: Path, upstream: FakeUpstream,
                                              request: pytest.FixtureRequest,
                                              backend: str) -> None:
    """Two gateway instances sharing one Redis admit exactly rpm=10 in total."""
    store = store_config(request, backend)
    async with (running_gateway(tmp_path / "a", upstream.url, store=store) as gw1,
                running_gateway(tmp_path / "b", upstream.url, store=store) as gw2):
        key = await issue(gw1, gw2, rpm=10)
        async with aiohttp.ClientSession() as s:
            replies = await asyncio.gather(*(send(s, gw, key)
                                             for _ in range(15) for gw in (gw1, gw2)))
        assert sum(r.status == 200 for r in replies) == 10
        for r in replies:
            if r.status != 200:
                assert_rate_limited(r, "requests_per_minute")
        assert len(upstream.requests) == 10


# --- token settlement from real streams -------------------------------------------------------


async def _wait_admitted(s: aiohttp.ClientSession, gw: RunningGateway, key: str, body: bytes,
                         path: str) -> Reply:
    """Send `body` until it is admitted (refusals consume nothing); return the admitted reply."""
    last: list[Reply] = []

    async def attempt() -> bool:
        r = await send(s, gw, key, body, path)
        last[:] = [r]
        assert r.status in (200, 429), r.text
        return r.status == 200

    await poll(attempt, timeout=10.0, interval=0.05)
    return last[0]


async def test_anthropic_stream_settles_on_reported_output(
        tmp_path: Path, upstream: FakeUpstream, store_cfg: dict[str, Any]) -> None:
    """A streamed Anthropic answer reserves max_tokens (900 of otpm=1000) and is settled on
    the output_tokens the upstream reported (300): 700 remain, not 100."""
    upstream.output_tokens = 300
    async with running_gateway(tmp_path, upstream.url, store=store_cfg) as gw:
        key = await issue(gw, otpm=1000)
        async with aiohttp.ClientSession() as s:
            first = await send(s, gw, key, anthropic_body(900, stream=True))
            assert first.status == 200
            assert first.headers["content-type"].startswith("text/event-stream")
            assert '"output_tokens":300' in first.text
            assert first.headers["anthropic-ratelimit-output-tokens-limit"] == "1000"
            assert first.headers["anthropic-ratelimit-output-tokens-remaining"] == "100"
            # 600 more fit only once the 900 reserved are corrected to the 300 used.
            probe = await _wait_admitted(s, gw, key, anthropic_body(600), "/v1/messages")
        remaining = int(probe.headers["anthropic-ratelimit-output-tokens-remaining"])
        assert 1000 - 300 - 600 <= remaining <= 100 + REFILL_SLACK
        line = next(x for x in gw.logs.requests() if x["output_tokens"] == 300)
        assert line["decision"] == "allow" and line["status"] == 200


async def test_openai_stream_settles_on_final_usage_chunk(
        tmp_path: Path, upstream: FakeUpstream, store_cfg: dict[str, Any]) -> None:
    """A streamed OpenAI answer with include_usage is settled on the final usage chunk's
    completion_tokens; OpenAI-family headers report the token bucket."""
    upstream.output_tokens = 300
    async with running_gateway(tmp_path, upstream.url, store=store_cfg,
                               limits_headers="openai") as gw:
        key = await issue(gw, otpm=1000, rpm=50)
        path = "/v1/chat/completions"
        async with aiohttp.ClientSession() as s:
            first = await send(s, gw, key, openai_body(900, stream=True), path)
            assert first.status == 200
            assert '"completion_tokens":300' in first.text
            assert first.text.rstrip().endswith("data: [DONE]")
            h = first.headers
            assert h["x-ratelimit-limit-requests"] == "50"
            assert h["x-ratelimit-remaining-requests"] == "49"
            assert h["x-ratelimit-limit-tokens"] == "1000"
            assert h["x-ratelimit-remaining-tokens"] == "100"
            assert re.fullmatch(r"\d+(ms|(\.\d+)?s|m\d+s)", h["x-ratelimit-reset-tokens"])
            assert not any(k.startswith("anthropic-ratelimit") for k in h)
            probe = await _wait_admitted(s, gw, key, openai_body(600), path)
        remaining = int(probe.headers["x-ratelimit-remaining-tokens"])
        assert 100 <= remaining <= 100 + REFILL_SLACK


@pytest.mark.parametrize("wire", ["anthropic", "openai"])
async def test_cache_reads_do_not_count_as_input(
        tmp_path: Path, upstream: FakeUpstream, store_cfg: dict[str, Any], wire: str) -> None:
    """Input tokens settle to the reported input plus cache writes, without cache reads:
    a request charged the whole itpm=1000 bucket on its size is corrected to 300."""
    upstream.cache_read_input_tokens = 5000
    if wire == "anthropic":
        upstream.input_tokens, upstream.cache_creation_input_tokens = 100, 200
        path, make = "/v1/messages", anthropic_body
    else:
        # OpenAI's prompt_tokens include the cached ones.
        upstream.input_tokens = 5300
        path, make = "/v1/chat/completions", openai_body
    # Anthropic's header family on both paths: it reports input tokens on their own.
    async with running_gateway(tmp_path, upstream.url, store=store_cfg,
                               limits_headers="anthropic") as gw:
        key = await issue(gw, itpm=1000)
        async with aiohttp.ClientSession() as s:
            big = make(16, stream=True, text="x" * 4400)  # estimated above the whole bucket
            first = await send(s, gw, key, big, path)
            assert first.status == 200
            assert first.headers["anthropic-ratelimit-input-tokens-remaining"] == "0"
            small = make(16)
            probe = await _wait_admitted(s, gw, key, small, path)
        estimate = len(small) // 4
        remaining = int(probe.headers["anthropic-ratelimit-input-tokens-remaining"])
        assert 1000 - 300 - estimate <= remaining <= 1000 - 300 - estimate + REFILL_SLACK
        assert any(x["input_tokens"] == 300 for x in gw.logs.requests())


# --- concurrency leases ------------------------------------------------------------------------


async def test_lease_released_when_client_disconnects(
        tmp_path: Path, upstream: FakeUpstream, store_cfg: dict[str, Any]) -> None:
    """With concurrency=1, a held stream refuses a second request; once the client hangs up,
    the lease is released and the key is admitted again."""
    upstream.hold_stream = asyncio.Event()
    try:
        async with (running_gateway(tmp_path, upstream.url, store=store_cfg) as gw,
                    aiohttp.ClientSession() as s):
            key = await issue(gw, concurrency=1)
            held = aiohttp.ClientSession()
            try:
                resp = await held.post(gw.url + "/v1/messages",
                                       data=anthropic_body(stream=True),
                                       headers={"x-api-key": key, **US})
                assert resp.status == 200
                await asyncio.wait_for(upstream.first_event_sent.wait(), 10)
                second = await send(s, gw, key)
                assert_rate_limited(second, "concurrency")
                resp.close()
            finally:
                await held.close()
            await _wait_admitted(s, gw, key, anthropic_body(), "/v1/messages")
            await poll(lambda: upstream.requests[0].disconnected, timeout=10.0)
            await poll(lambda: any(x["reason"] == "client_disconnected"
                                   for x in gw.logs.requests()), timeout=10.0)
    finally:
        upstream.hold_stream.set()


# --- Redis outages ----------------------------------------------------------------------------


async def test_redis_outage_fails_closed_and_recovers(
        tmp_path: Path, upstream: FakeUpstream, durable_redis: RedisServer) -> None:
    """on_error closed: with Redis killed, admission answers 503 store_unavailable and /readyz
    503, while key and policy decisions keep working from snapshots; after a restart the
    gateway recovers on its own."""
    store = {"url": durable_redis.url, "key_prefix": unique_prefix(), "on_error": "closed"}
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        key = await issue(gw, rpm=100)
        assert (await send(s, gw, key)).status == 200
        assert (await readyz(s, gw))[0] == 200

        durable_redis.kill()
        for _ in range(3):
            r = await send(s, gw, key)
            assert r.status == 503, r.text
            err = r.json()["error"]
            assert (err["type"], err["code"]) == ("overloaded_error", "store_unavailable")
            assert r.headers["retry-after"] == "1"
        status, body = await readyz(s, gw)
        assert status == 503 and body["status"] == "not_ready"
        assert body["checks"]["store"] == "unreachable"
        assert (await send(s, gw, UNKNOWN_KEY)).status == 401
        denied = await send(s, gw, key, headers=CN)
        assert denied.status == 403
        assert denied.json()["error"]["code"] == "unsupported_country_region_territory"
        async with s.get(gw.admin_url + "/healthz") as h:
            assert h.status == 200
        assert len(gw.logs.events("store_unavailable")) == 1

        durable_redis.restart()
        await poll(lambda: gw.logs.events("store_recovered"), timeout=15.0)

        async def ready() -> bool:
            return (await readyz(s, gw))[0] == 200

        await poll(ready, timeout=15.0)
        r = await send(s, gw, key)
        assert r.status == 200
        assert_request_headers(r, 100)
        assert len(upstream.requests) == 2


async def test_redis_outage_fails_open_with_divided_limits(
        tmp_path: Path, upstream: FakeUpstream, durable_redis: RedisServer) -> None:
    """on_error open: with Redis killed, requests are admitted by the local fallback limiter
    at limit / fallback_instances (rpm=4, 2 instances: 2), /readyz says degraded; after a
    restart admission goes through Redis again."""
    store = {"url": durable_redis.url, "key_prefix": unique_prefix(), "on_error": "open",
             "fallback_instances": 2}
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        key = await issue(gw, rpm=4)
        assert (await send(s, gw, key)).status == 200

        durable_redis.kill()
        replies = [await send(s, gw, key) for _ in range(5)]
        assert [r.status for r in replies] == [200, 200, 429, 429, 429]
        assert_request_headers(replies[0], 2, 1)
        for r in replies[2:]:
            assert_rate_limited(r, "requests_per_minute")
        status, body = await readyz(s, gw)
        assert status == 200
        assert body["status"] == "degraded" and body["degraded"] == ["store"]
        assert (await send(s, gw, UNKNOWN_KEY)).status == 401
        assert (await send(s, gw, key, headers=CN)).status == 403
        assert len(gw.logs.events("store_unavailable")) == 1

        durable_redis.restart()
        await poll(lambda: gw.logs.events("store_recovered"), timeout=15.0)

        async def ready() -> bool:
            return bool((await readyz(s, gw))[1]["status"] == "ready")

        await poll(ready, timeout=15.0)
        # The fallback bucket is empty for 30 s; Redis still holds 3 of 4 requests.
        r = await send(s, gw, key)
        assert r.status == 200, r.text
        assert_request_headers(r, 4, 2)
        assert len(upstream.requests) == 4
        assert not any(x["status"] >= 500 for x in gw.logs.requests())


# --- Redis round trips per request -------------------------------------------------------------


async def test_one_round_trip_per_admitted_request_none_when_denied(
        tmp_path: Path, upstream: FakeUpstream, redis_server_session: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An admitted request makes exactly one Redis round trip before it is forwarded (and
    one settlement after); a policy-denied request and a 401 make none."""
    import gateway.app

    monkeypatch.setattr(gateway.app, "LAST_USED_FLUSH_S", 3600.0)  # no background writes
    monkeypatch.setattr(gateway.app, "FLUSH_INTERVAL_S", 3600.0)  # nor usage flushes
    store = {"url": redis_server_session.url, "key_prefix": unique_prefix(), "sync_interval_s": 60}
    upstream.hold_stream = asyncio.Event()
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        key = await issue(gw, concurrency=5)
        redis_store: Any = gw.service.store
        epoch, _ = await redis_store.versions()
        await poll(lambda: gw.service.registry.epoch == epoch, timeout=10.0)

        before = redis_store.round_trips
        task = asyncio.create_task(send(s, gw, key, anthropic_body(stream=True)))
        try:
            await asyncio.wait_for(upstream.first_event_sent.wait(), 10)
            # The stream is held at the upstream: admitted and forwarded, not yet settled.
            assert redis_store.round_trips - before == 1
        finally:
            upstream.hold_stream.set()
            reply = await task
        assert reply.status == 200
        await poll(lambda: redis_store.round_trips - before == 2, timeout=10.0)

        before = redis_store.round_trips
        assert (await send(s, gw, key, headers=CN)).status == 403
        assert (await send(s, gw, UNKNOWN_KEY)).status == 401
        assert (await send(s, gw, None)).status == 401
        assert redis_store.round_trips == before


async def test_redis_that_comes_back_empty_is_restored_from_snapshots(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """A Redis restarted without persistence comes back empty: the gateway writes its key and
    policy snapshots back (revoked keys stay revoked) instead of refusing every key."""
    store = {"url": redis_server.url, "key_prefix": unique_prefix(), "on_error": "closed"}
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        key = await issue(gw, rpm=100)
        revoked_id, revoked = await gw.issue_key("direct")
        assert (await gw.admin("POST", f"/admin/keys/{revoked_id}/revoke"))[0] == 200
        await poll(lambda: gw.service.registry.keys[revoked_id].status == "revoked")
        assert (await send(s, gw, key)).status == 200

        redis_server.kill()
        redis_server.restart()  # no append-only file: every key and the policy are gone
        await poll(lambda: gw.logs.events("store_data_lost"), timeout=15.0)

        async def admitted() -> bool:
            return (await send(s, gw, key)).status == 200

        def restored() -> list[dict[str, Any]]:
            return [a for a in gw.logs.events("audit") if a["action"] == "store_restored"]

        await poll(restored, timeout=15.0)
        await poll(admitted, timeout=15.0)
        assert (await send(s, gw, revoked)).status == 401
        stored = await gw.service.store.get_policy()
        assert stored is not None and stored.version == 1
        assert {r.key_id for r in await gw.service.store.list_keys()} >= {revoked_id}
        assert [(a["keys"], a["policy_restored"]) for a in restored()] == [(2, True)]


async def test_scripts_reloaded_after_script_flush(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """After SCRIPT FLUSH (a Redis restart or failover loses its script cache) admission and
    settlement still work: EVALSHA's NOSCRIPT falls back to loading the script."""
    import redis.asyncio as aioredis

    store = {"url": redis_server.url, "key_prefix": unique_prefix()}
    async with (running_gateway(tmp_path, upstream.url, store=store) as gw,
                aiohttp.ClientSession() as s):
        key = await issue(gw, rpm=5)
        assert (await send(s, gw, key)).status == 200
        client = aioredis.from_url(redis_server.url)
        try:
            await client.script_flush()
            assert (await send(s, gw, key)).status == 200
            assert (await client.script_exists(gw.service.store._ADMIT.sha))[0]
        finally:
            await client.aclose()
        r = await send(s, gw, key)
        assert_request_headers(r, 5, remaining=2)
