"""GCRA exactness when a whole bucket is filled within one clock tick: rounding of the stored
times must not refuse the last of `limit` requests (white-box: the limiter's clock is fixed,
and the Redis script runs L times inside one MULTI)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from gateway.store.base import AdmitRequest, Subject
from gateway.store.gcra import Limiter
from gateway.store.redis import RedisStore
from gateway.store.redis.store import lua
from tests.support.redis_server import RedisServer

# Limits whose request interval (60000 / L ms) is no exact binary or 3-decimal fraction.
LIMITS = [7, 9, 11, 13, 17, 19, 21, 33, 97, 127]


def _req(subject: Subject) -> AdmitRequest:
    return AdmitRequest((subject,), uuid.uuid4().hex[:16], 60_000, 0, 0)


@pytest.mark.parametrize("limit", LIMITS)
def test_memory_burst_in_one_instant_admits_exactly_limit(limit: int) -> None:
    """The embedded limiter admits exactly L of L + 1 requests arriving at the same instant,
    counting remaining down to 0."""
    limiter = Limiter()
    now = 1_750_000_000_123.0
    subject = Subject("key", "k", "r", rpm=limit)
    results = [limiter.admit(_req(subject), now_ms=now) for _ in range(limit + 1)]
    assert [r.ok for r in results] == [True] * limit + [False]
    assert [r.buckets["rpm"].remaining for r in results[:-1]] == list(range(limit - 1, -1, -1))
    assert results[-1].failed_dimension == "rpm"
    assert results[-1].retry_after_ms == pytest.approx(60_000 / limit, abs=1.0)


async def test_redis_burst_in_one_millisecond_admits_exactly_limit(
        redis_server_session: RedisServer) -> None:
    """The admission script admits exactly L of L + 1 requests run back to back in one
    transaction (one server millisecond)."""
    store = RedisStore(redis_server_session.url, f"g{uuid.uuid4().hex[:10]}:")
    await store.start()
    try:
        client = store.pooled.client
        admit = client.register_script(lua("admit.lua").source)  # the script, via redis-py
        for limit in LIMITS:
            subject = Subject("key", f"k{limit}", "r", rpm=limit)
            pipe = client.pipeline(transaction=True)
            for _ in range(limit + 1):
                keys, args = store._admit_call([], [_req(subject)])
                await admit(keys=keys, args=args, client=pipe)
            results: list[Any] = await pipe.execute()
            replies = [r[0] for r in results]  # each call's one admission
            assert [int(r[0]) for r in replies] == [1] * limit + [0], limit
            assert [int(r[2]) for r in replies[:-1]] == list(range(limit - 1, -1, -1))
    finally:
        await store.close()
