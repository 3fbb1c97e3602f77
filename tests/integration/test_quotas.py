"""Usage ledger, quotas and self-service through the real gateway (docs/architecture.md §12):
the ledger equals the usage the upstream reported over a mixed run, daily and monthly quotas
refuse with 429 and retry-after, two instances on one Redis share a quota, a stop flushes
what is left, and `GET /v1/gateway/key` answers without consuming anything. The embedded
store and Redis run the same cases."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.ledger import utc_day
from gateway.quotas import period_end
from gateway.store import open_store
from gateway.store.base import UsageRow
from tests.support.gateway import (
    DEFAULT_POLICY,
    RunningGateway,
    poll,
    running_gateway,
    store_config,
    unique_prefix,
)
from tests.support.upstream import FakeUpstream

US = {"X-Forwarded-For": "192.0.2.1"}
CN = {"X-Forwarded-For": "198.51.100.1"}
CUSTOMER = {"X-Customer-IP": "192.0.2.1"}


def _policy(**quotas: Any) -> dict[str, Any]:
    """The default policy with `quotas` set: `acme=`/`direct=` on those resellers, `key=` as
    `limits.key.quotas`."""
    doc = copy.deepcopy(DEFAULT_POLICY)
    for name, q in quotas.items():
        if name == "key":
            doc["limits"]["key"]["quotas"] = q
        else:
            doc["resellers"][name]["quotas"] = q
    return doc


def _anthropic(stream: bool = False, model: str = "claude-test-1") -> bytes:
    return json.dumps({"model": model, "max_tokens": 16, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()


def _openai(stream: bool = False, model: str = "gpt-test-1") -> bytes:
    doc: dict[str, Any] = {"model": model, "max_completion_tokens": 16,
                           "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        doc["stream"] = True
    return json.dumps(doc).encode()


async def _post(s: aiohttp.ClientSession, gw: RunningGateway, key: str, body: bytes,
                path: str = "/v1/messages", headers: dict[str, str] | None = None
                ) -> tuple[int, Any, Any]:
    h = {"content-type": "application/json", "x-api-key": key, **(headers or US)}
    async with s.post(gw.url + path, data=body, headers=h) as r:
        text = await r.text()
        try:
            doc = json.loads(text)
        except ValueError:
            doc = text
        return r.status, r.headers, doc


def _expected(*gws: RunningGateway) -> Counter[tuple[Any, ...]]:
    """What the request lines say the upstream answered: requests and tokens per cell."""
    out: Counter[tuple[Any, ...]] = Counter()
    for gw in gws:
        for line in gw.logs.requests():
            if line["upstream_status"] is None:
                continue
            cell = (line["reseller"], line["key_id"], line["customer_id"],
                    line["model"] or "unknown")
            out[(*cell, "requests")] += 1
            out[(*cell, "input_tokens")] += line["input_tokens"] or 0
            out[(*cell, "output_tokens")] += line["output_tokens"] or 0
    return +out


def _totals(rows: list[UsageRow]) -> Counter[tuple[Any, ...]]:
    out: Counter[tuple[Any, ...]] = Counter()
    for r in rows:
        cell = (r.reseller, r.key_id, r.customer_id, r.model)
        out[(*cell, "requests")] += r.requests
        out[(*cell, "input_tokens")] += r.input_tokens
        out[(*cell, "output_tokens")] += r.output_tokens
    return +out


async def _ledger(gw: RunningGateway) -> Counter[tuple[Any, ...]]:
    day = utc_day(time.time())
    return _totals(await gw.service.store.query_usage(day, day))


async def _cut_stream(gw: RunningGateway, upstream: FakeUpstream, key: str) -> None:
    """A stream the client hangs up on after its first event."""
    upstream.hold_stream = asyncio.Event()
    upstream.first_event_sent.clear()
    try:
        async with aiohttp.ClientSession() as held:
            resp = await held.post(gw.url + "/v1/messages", data=_anthropic(stream=True),
                                   headers={"x-api-key": key, "content-type":
                                            "application/json", **US})
            assert resp.status == 200
            await asyncio.wait_for(upstream.first_event_sent.wait(), 10)
            resp.close()
        await poll(lambda: any(x["reason"] == "client_disconnected"
                               for x in gw.logs.requests()), timeout=10.0)
    finally:
        upstream.hold_stream.set()
        upstream.hold_stream = None


# --- the ledger --------------------------------------------------------------------------------


async def test_ledger_equals_the_upstreams_usage_over_a_mixed_run(
        tmp_path: Path, upstream: FakeUpstream, request: pytest.FixtureRequest) -> None:
    """Two instances on one Redis, two resellers, several keys and customers, both API
    families, whole and cut streams, a model-less request and refused ones: the ledger's cells
    equal, exactly, the usage the upstream reported as the request lines show it; refused
    requests count nowhere."""
    store = store_config(request, "redis")
    async with (running_gateway(tmp_path / "a", upstream.url, store=store) as a,
                running_gateway(tmp_path / "b", upstream.url, store=store) as b,
                aiohttp.ClientSession() as s):
        _, acme1 = await a.issue_known_key("acme", b)
        _, acme2 = await a.issue_known_key("acme", b)
        _, direct1 = await a.issue_known_key("direct", b)
        _, tiny = await a.issue_known_key("direct", b, rpm=1)
        for i in range(12):
            gw = (a, b)[i % 2]
            upstream.input_tokens, upstream.output_tokens = 10 + i, 3 + 2 * i
            cust = {**CUSTOMER, "X-Customer-Id": f"cust-{i % 3}"}
            assert (await _post(s, gw, acme1, _anthropic(stream=i % 3 == 0),
                                headers={**US, **cust}))[0] == 200
            assert (await _post(s, gw, acme2, _openai(stream=i % 2 == 0),
                                "/v1/chat/completions", {**US, **cust}))[0] == 200
            assert (await _post(s, gw, direct1, _openai(model=f"gpt-{i % 4}"),
                                "/v1/chat/completions"))[0] == 200
        async with s.get(a.url + "/v1/models", headers={"x-api-key": direct1, **US}) as r:
            assert r.status == 200
        await _cut_stream(b, upstream, direct1)
        assert (await _post(s, a, direct1, _anthropic(), headers=CN))[0] == 403
        assert (await _post(s, a, tiny, _anthropic()))[0] == 200
        assert (await _post(s, a, tiny, _anthropic()))[0] == 429
        expected = _expected(a, b)
        assert any(k[3] == "unknown" for k in expected)  # GET /v1/models names no model
        assert sum(v for k, v in expected.items() if k[-1] == "requests") == 12 * 3 + 3

        async def settled() -> bool:
            return await _ledger(a) == expected

        await poll(settled, timeout=15.0)
        cut = [x for x in b.logs.requests() if x["reason"] == "client_disconnected"]
        assert len(cut) == 1 and cut[0]["input_tokens"] is not None


async def test_stop_flushes_what_is_left(tmp_path: Path, upstream: FakeUpstream,
                                         redis_server_session: Any) -> None:
    """Requests served just before a stop are in the Redis ledger once the instance has
    stopped: the stop flushes the tallies the loop had not sent yet."""
    prefix = unique_prefix()
    store = {"url": redis_server_session.url, "key_prefix": prefix}
    async with running_gateway(tmp_path, upstream.url, store=store) as gw, \
            aiohttp.ClientSession() as s:
        _, key = await gw.issue_known_key("direct")
        for _ in range(5):
            assert (await _post(s, gw, key, _anthropic()))[0] == 200
        expected = _expected(gw)
    other = open_store(redis_server_session.url, prefix, 2.0)
    await other.start()
    try:
        day = utc_day(time.time())
        assert _totals(await other.query_usage(day, day)) == expected
    finally:
        await other.close()


# --- quotas ------------------------------------------------------------------------------------


def _assert_quota(status: int, headers: Any, body: Any, code: str, period: str) -> None:
    assert status == 429, body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == code
    assert body["request_id"] == headers["x-request-id"]
    wait = int(headers["retry-after"])
    now = time.time()
    assert period_end(period, now) - now - 5 <= wait <= period_end(period, now) - now + 5


async def test_daily_quotas_refuse_exactly(tmp_path: Path, upstream: FakeUpstream,
                                           store_cfg: dict[str, Any]) -> None:
    """A reseller's daily request quota admits exactly that many requests, then 429
    daily_quota_exceeded with retry-after until the next UTC midnight; a key's output-token
    quota admits while what was used is below it; refused requests are never counted."""
    policy = _policy(direct={"daily": {"requests": 4}},
                     key={"daily": {"output_tokens": 30}})
    async with running_gateway(tmp_path, upstream.url, policy, store=store_cfg) as gw, \
            aiohttp.ClientSession() as s:
        upstream.output_tokens = 12
        _, k1 = await gw.issue_known_key("direct")
        _, k2 = await gw.issue_known_key("direct")
        statuses = [(await _post(s, gw, k1, _anthropic()))[0] for _ in range(3)]
        assert statuses == [200, 200, 200]  # 0, 12, 24 output tokens used: below 30
        _assert_quota(*await _post(s, gw, k1, _anthropic()), "daily_quota_exceeded", "daily")
        assert (await _post(s, gw, k2, _anthropic()))[0] == 200  # the 4th of the reseller
        for key in (k1, k2, k2):
            _assert_quota(*await _post(s, gw, key, _anthropic()), "daily_quota_exceeded",
                          "daily")
        expected = _expected(gw)
        assert sum(v for k, v in expected.items() if k[-1] == "requests") == 4

        async def settled() -> bool:
            return await _ledger(gw) == expected

        await poll(settled, timeout=10.0)
        refused = [x for x in gw.logs.requests() if x["reason"] == "daily_quota_exceeded"]
        assert len(refused) == 4 and all(x["decision"] == "rate_limited" for x in refused)


async def test_monthly_quota_refuses_with_retry_after_to_the_month(
        tmp_path: Path, upstream: FakeUpstream, store_cfg: dict[str, Any]) -> None:
    """A key's own monthly quota refuses with 429 monthly_quota_exceeded and retry-after
    until the next UTC month; refusals take none of the key's rate limit."""
    async with running_gateway(tmp_path, upstream.url, store=store_cfg) as gw, \
            aiohttp.ClientSession() as s:
        key_id, key = await gw.issue_known_key("direct", quotas={"monthly.requests": 2}, rpm=3)
        assert [(await _post(s, gw, key, _anthropic()))[0] for _ in range(2)] == [200, 200]
        for _ in range(5):
            _assert_quota(*await _post(s, gw, key, _anthropic()), "monthly_quota_exceeded",
                          "monthly")
        rec = await gw.service.store.get_key(key_id)
        assert rec is not None
        rec.quotas = {"monthly.requests": 3}
        await gw.service.store.put_key(rec)
        await poll(lambda: gw.service.registry.keys[rec.key_id].quotas == rec.quotas)
        # five refusals took none of rpm=3: the third request is admitted
        assert (await _post(s, gw, key, _anthropic()))[0] == 200


async def test_two_instances_share_a_quota(tmp_path: Path, upstream: FakeUpstream,
                                           request: pytest.FixtureRequest) -> None:
    """Two instances on one Redis: what one used counts at the other within the flush bound,
    after which the other refuses too."""
    store = store_config(request, "redis")
    policy = _policy(direct={"daily": {"requests": 5}})
    async with (running_gateway(tmp_path / "a", upstream.url, policy, store=store) as a,
                running_gateway(tmp_path / "b", upstream.url, policy, store=store) as b,
                aiohttp.ClientSession() as s):
        _, key = await a.issue_known_key("direct", b)
        assert (await _post(s, b, key, _anthropic()))[0] == 200  # b watches direct now

        async def flushed() -> bool:
            return sum((await _ledger(a)).values()) > 0

        await poll(flushed, timeout=10.0)  # b's request is in the store: a reads it first
        for _ in range(4):
            assert (await _post(s, a, key, _anthropic()))[0] == 200
        _assert_quota(*await _post(s, a, key, _anthropic()), "daily_quota_exceeded", "daily")

        def b_sees_all() -> bool:
            watch = b.service.ledger.subject(reseller="direct")
            return watch is not None and watch.used(time.time()).day.requests >= 5

        await poll(b_sees_all, timeout=10.0)
        _assert_quota(*await _post(s, b, key, _anthropic()), "daily_quota_exceeded", "daily")


# --- self-service ------------------------------------------------------------------------------


async def test_self_service_answers_and_consumes_nothing(
        tmp_path: Path, upstream: FakeUpstream, store_cfg: dict[str, Any]) -> None:
    """GET /v1/gateway/key answers the key's scopes, limits, quotas, usage and what is left,
    with no secret or hash; it is never forwarded, takes no rate limit, and is logged as an
    allowed request with reason self_service; a bad key gets the live path's 401."""
    policy = _policy(direct={"daily": {"requests": 10}, "monthly": {"output_tokens": 1000}})
    async with running_gateway(tmp_path, upstream.url, policy, store=store_cfg) as gw, \
            aiohttp.ClientSession() as s:
        key_id, key = await gw.issue_known_key("direct", quotas={"daily.requests": 3}, rpm=2,
                                   models=["claude-*"])
        upstream.output_tokens = 12
        assert (await _post(s, gw, key, _anthropic()))[0] == 200
        forwarded = len(upstream.requests)

        async def ask(secret: str) -> tuple[int, Any]:
            async with s.get(gw.url + "/v1/gateway/key",
                             headers={"x-api-key": secret, **US}) as r:
                return r.status, await r.json()

        for _ in range(3):
            status, body = await ask(key)
            assert status == 200, body
        assert len(upstream.requests) == forwarded
        assert set(body) == {"key_id", "reseller", "status", "expires_at", "scopes", "limits",
                             "remaining", "quotas", "usage"}
        assert body["key_id"] == key_id and body["reseller"] == "direct"
        assert body["status"] == "active" and body["expires_at"] is None
        assert body["scopes"] == {"models": ["claude-*"], "paths": [], "countries": []}
        assert body["limits"] == {"rpm": 2, "itpm": 400000, "otpm": 80000, "concurrency": 20}
        assert body["quotas"]["key"]["daily"] == {"requests": 3, "input_tokens": None,
                                                  "output_tokens": None}
        assert body["quotas"]["reseller"]["monthly"]["output_tokens"] == 1000
        assert body["usage"]["today"] == {"requests": 1, "input_tokens": 25,
                                          "output_tokens": 12}
        assert body["usage"]["month"]["requests"] >= 1
        assert body["remaining"] == {"requests": 2, "input_tokens": None,
                                     "output_tokens": 1000 - 12}
        text = json.dumps(body)
        assert key.split("_")[-1] not in text and "hash" not in text
        # three answers took none of rpm=2: a second real request is still admitted
        assert (await _post(s, gw, key, _anthropic()))[0] == 200
        lines = [x for x in gw.logs.requests() if x["reason"] == "self_service"]
        assert len(lines) == 3
        assert all(x["decision"] == "allow" and x["status"] == 200 and x["key_id"] == key_id
                   for x in lines)
        bad = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        status, body = await ask(bad)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"


async def test_a_quota_costs_one_read_per_subject_not_one_per_request(
        tmp_path: Path, upstream: FakeUpstream, redis_server_session: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request of a key with a quota reads its use once (one extra round trip on
    this instance); every later request makes only its admission round trip before it is
    forwarded, and the settlement after."""
    import gateway.app

    monkeypatch.setattr(gateway.app, "LAST_USED_FLUSH_S", 3600.0)  # no background writes
    monkeypatch.setattr(gateway.app, "FLUSH_INTERVAL_S", 3600.0)
    store = {"url": redis_server_session.url, "key_prefix": unique_prefix(), "sync_interval_s": 60}
    policy = _policy(key={"daily": {"requests": 100}})
    async with running_gateway(tmp_path, upstream.url, policy, store=store) as gw, \
            aiohttp.ClientSession() as s:
        _, key = await gw.issue_known_key("direct")
        redis_store: Any = gw.service.store
        epoch, _ = await redis_store.versions()
        await poll(lambda: gw.service.registry.epoch == epoch, timeout=10.0)
        start = redis_store.round_trips
        for expected in (3, 2, 2):  # read + admit + settle, then admit + settle
            before = redis_store.round_trips
            assert (await _post(s, gw, key, _anthropic()))[0] == 200
            await poll(lambda b=before, n=expected: redis_store.round_trips - b == n,
                       timeout=10.0)
        assert redis_store.round_trips - start == 7
