"""Unit tests for gateway.ledger: in-process tallies over real stores (the embedded store, and a
redis-server of the test's own for a failed flush): exact flushes, what a subject used before
and after a flush, in-flight requests, UTC periods, failed flushes kept without double
counting, and the flush at close."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest_asyncio

from gateway.ledger import UNKNOWN_MODEL, Ledger, key_subject, reseller_subject, utc_day
from gateway.store import open_store
from gateway.store.base import PeriodUse, Tally, UsageKey
from gateway.store.memory import MemoryStore
from tests.support.redis_server import RedisServer


@pytest_asyncio.fixture
async def store() -> AsyncIterator[MemoryStore]:
    """A started embedded store."""
    s = MemoryStore()
    await s.start()
    yield s
    await s.close()


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _t(requests: int, input_tokens: int, output_tokens: int) -> Tally:
    return Tally(requests, input_tokens, output_tokens)


def test_utc_day_is_the_utc_calendar_day() -> None:
    """utc_day names the UTC day, whatever the local zone."""
    assert utc_day(_ts("2026-03-31T23:59:59")) == "2026-03-31"
    assert utc_day(_ts("2026-04-01T00:00:00")) == "2026-04-01"


async def test_flush_adds_exactly_what_was_recorded(store: MemoryStore) -> None:
    """Recorded requests reach the store's ledger per cell, with the reported tokens, a
    missing model as `unknown` and missing token counts as zero; nothing stays pending."""
    ledger = Ledger(store, 400)
    now = time.time()
    ledger.record("acme", "k1", "c1", "m1", 10, 3, now)
    ledger.record("acme", "k1", "c1", "m1", 5, 2, now)
    ledger.record("acme", "k2", None, None, None, None, now)
    await ledger.flush()
    day = utc_day(now)
    rows = {(r.key_id, r.customer_id, r.model): (r.requests, r.input_tokens, r.output_tokens)
            for r in await store.query_usage(day, day)}
    assert rows == {("k1", "c1", "m1"): (2, 15, 5), ("k2", None, UNKNOWN_MODEL): (1, 0, 0)}
    assert ledger.pending() == {}
    await ledger.flush()  # nothing new: nothing added twice
    assert len(await store.query_usage(day, day)) == 2
    assert sum(r.requests for r in await store.query_usage(day, day)) == 3


async def test_used_is_the_same_before_and_after_a_flush(store: MemoryStore) -> None:
    """A watched subject's use counts local tallies before the flush and the store's totals
    after it, never both."""
    ledger = Ledger(store, 400)
    await ledger.watch("acme", "k1")
    now = time.time()
    ledger.record("acme", "k1", None, "m", 7, 4, now)
    ledger.record("acme", "k2", None, "m", 1, 1, now)
    before = ledger.used(key_subject("k1"), now), ledger.used(reseller_subject("acme"), now)
    assert before[0] == PeriodUse(_t(1, 7, 4), _t(1, 7, 4))
    assert before[1] == PeriodUse(_t(2, 8, 5), _t(2, 8, 5))
    await ledger.flush()
    assert (ledger.used(key_subject("k1"), now),
            ledger.used(reseller_subject("acme"), now)) == before
    await ledger.flush()
    assert ledger.used(reseller_subject("acme"), now) == before[1]


async def test_two_instances_see_each_others_use_after_their_flushes(
        store: MemoryStore) -> None:
    """Two ledgers on one store: once each has flushed (and read), each counts the other's
    use once."""
    a, b = Ledger(store, 400), Ledger(store, 400)
    for ledger in (a, b):
        await ledger.watch("acme", "k1")
    now = time.time()
    a.record("acme", "k1", None, "m", 1, 1, now)
    b.record("acme", "k1", None, "m", 2, 2, now)
    await a.flush()
    await b.flush()
    await a.flush()
    for ledger in (a, b):
        assert ledger.used(key_subject("k1"), now).day == _t(2, 3, 3)


async def test_held_requests_count_until_released(store: MemoryStore) -> None:
    """A request admitted under a quota counts as a request of its key and reseller until it
    ends; once released and recorded it counts once."""
    ledger = Ledger(store, 400)
    now = time.time()
    ledger.hold("acme", "k1")
    ledger.hold("acme", "k1")
    assert ledger.used(key_subject("k1"), now).day.requests == 2
    assert ledger.used(reseller_subject("acme"), now).month.requests == 2
    ledger.record("acme", "k1", None, "m", 1, 1, now)
    ledger.release("acme", "k1")
    ledger.release("acme", "k1")  # the second was refused later: released, not recorded
    assert ledger.used(key_subject("k1"), now).day == _t(1, 1, 1)
    ledger.release("acme", "k1")  # an extra release never goes below zero
    assert ledger.used(key_subject("k1"), now).day.requests == 1


async def test_use_belongs_to_the_utc_day_and_month_of_its_end(store: MemoryStore) -> None:
    """Local use counts in its UTC day and month only: a new day starts at zero and keeps the
    month; a new month starts at zero."""
    ledger = Ledger(store, 400)
    ledger.record("acme", "k1", None, "m", 4, 2, _ts("2026-03-31T23:59:59"))
    ledger.record("acme", "k1", None, "m", 1, 1, _ts("2026-03-30T12:00:00"))
    assert ledger.used(key_subject("k1"), _ts("2026-03-31T12:00:00")) == PeriodUse(
        _t(1, 4, 2), _t(2, 5, 3))
    assert ledger.used(key_subject("k1"), _ts("2026-04-01T00:00:00")) == PeriodUse(
        _t(0, 0, 0), _t(0, 0, 0))


async def test_a_failed_flush_keeps_its_tallies_and_adds_them_once(
        redis_server: RedisServer) -> None:
    """With Redis down a flush adds nothing and keeps every tally (still counted as used);
    once Redis is back the next flush adds them, exactly once."""
    redis = open_store(redis_server.url, "tl:", 0.5)
    await redis.start()
    try:
        ledger = Ledger(redis, 400)
        await ledger.watch("acme", "k1")
        now = time.time()
        ledger.record("acme", "k1", "c", "m", 10, 5, now)
        redis_server.kill()
        await ledger.flush()
        assert ledger.flush_errors >= 1
        assert ledger.pending() == {UsageKey(utc_day(now), "acme", "k1", "c", "m"):
                                    _t(1, 10, 5)}
        assert ledger.used(key_subject("k1"), now).day == _t(1, 10, 5)
        ledger.record("acme", "k1", "c", "m", 1, 1, now)
        redis_server.start()
        await ledger.flush()
        assert ledger.pending() == {}
        day = utc_day(now)
        rows = await redis.query_usage(day, day)
        assert [(r.requests, r.input_tokens, r.output_tokens) for r in rows] == [(2, 11, 6)]
        assert ledger.used(key_subject("k1"), now).day == _t(2, 11, 6)
    finally:
        await redis.close()


async def test_close_flushes_what_is_left(store: MemoryStore) -> None:
    """close() sends the tallies not yet flushed."""
    ledger = Ledger(store, 400)
    now = time.time()
    ledger.record("direct", "k9", None, "m", 3, 3, now)
    await ledger.flush_step()
    ledger.record("direct", "k9", None, "m", 3, 3, now)
    await ledger.close()
    day = utc_day(now)
    assert [r.requests for r in await store.query_usage(day, day)] == [2]


async def test_watch_reads_a_subject_once(store: MemoryStore) -> None:
    """The first watch of a subject reads its totals from the store (use from before this
    instance started counts); later ones find it known."""
    now = time.time()
    day = utc_day(now)
    await store.add_usage({UsageKey(day, "acme", "k1", None, "m"): _t(3, 30, 9)}, 400)
    ledger = Ledger(store, 400)
    assert not ledger.known("acme", "k1")
    await ledger.watch("acme", "k1")
    assert ledger.known("acme", "k1")
    assert ledger.used(reseller_subject("acme"), now).day == _t(3, 30, 9)


async def test_flush_hooks_run_after_the_usage_is_added(store: MemoryStore) -> None:
    """Every flush runs the flush hooks (screening's tallies) once, after the usage add."""
    ledger = Ledger(store, 400)
    seen: list[int] = []

    async def hook() -> None:
        day = utc_day(time.time())
        seen.append(sum(r.requests for r in await store.query_usage(day, day)))

    ledger.flush_hooks.append(hook)
    ledger.record("acme", "k1", None, "m1", 1, 1, time.time())
    await ledger.flush()
    await ledger.flush()
    assert seen == [1, 1]
