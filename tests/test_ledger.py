"""Unit tests for gateway.ledger: in-process tallies over real stores (the embedded store, a
spy subclass of it that records what it was asked, and a redis-server of the test's own for a
failed flush): exact flushes, what a subject used before and after a flush, in-flight
requests, UTC periods, failed flushes kept without double counting, idle subjects no longer
read, only subjects with a quota read, and the flush at close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection, Mapping
from datetime import UTC, datetime

import pytest_asyncio

from gateway.errors import StoreError
from gateway.ledger import IDLE_S, UNKNOWN_MODEL, Ledger, Watched, use_of, utc_day
from gateway.store import open_store
from gateway.store.base import PeriodUse, Tally, UsageKey, UsageNotAdded
from gateway.store.memory import MemoryStore
from tests.support.redis_server import RedisServer


class SpyStore(MemoryStore):
    """The embedded store, recording the subjects each `period_use` was asked for; its
    `add_usage` can be held at a gate, and refused while `refuse` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[dict[str, list[str]]] = []
        self.gate: asyncio.Event | None = None
        self.adding = asyncio.Event()
        self.refuse = False
        self.fail_reads = False

    async def period_use(self, subjects: Mapping[str, Collection[str]],
                         day: str) -> dict[str, PeriodUse]:
        self.asked.append({r: sorted(names) for r, names in subjects.items()})
        if self.fail_reads:
            raise StoreError("reads refused")
        return await super().period_use(subjects, day)

    async def add_usage(self, tallies: Mapping[UsageKey, Tally], retention_days: int) -> None:
        self.adding.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse:
            raise UsageNotAdded("refused", {k.reseller for k in tallies})
        await super().add_usage(tallies, retention_days)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def store() -> AsyncIterator[SpyStore]:
    """A started embedded store that records its period_use questions."""
    s = SpyStore()
    await s.start()
    yield s
    await s.close()


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _t(requests: int, input_tokens: int, output_tokens: int) -> Tally:
    return Tally(requests, input_tokens, output_tokens)


async def _both(ledger: Ledger, reseller: str = "acme", key_id: str = "k1") -> Watched:
    return await ledger.watch(reseller, key_id, True, True)


def test_utc_day_is_the_utc_calendar_day() -> None:
    """utc_day names the UTC day, whatever the local zone."""
    assert utc_day(_ts("2026-03-31T23:59:59")) == "2026-03-31"
    assert utc_day(_ts("2026-04-01T00:00:00")) == "2026-04-01"


async def test_flush_adds_exactly_what_was_recorded(store: SpyStore) -> None:
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
    assert store.asked == []  # nothing watched: nothing read


async def test_used_is_the_same_before_and_after_a_flush(store: SpyStore) -> None:
    """A watched subject's use counts local tallies before the flush and the store's totals
    after it, never both."""
    ledger = Ledger(store, 400)
    held = await _both(ledger)
    now = time.time()
    ledger.record("acme", "k1", None, "m", 7, 4, now)
    ledger.record("acme", "k2", None, "m", 1, 1, now)
    before = use_of(held, now)
    assert before[0] == PeriodUse(_t(1, 7, 4), _t(1, 7, 4))
    assert before[1] == PeriodUse(_t(2, 8, 5), _t(2, 8, 5))
    await ledger.flush()
    assert use_of(held, now) == before
    await ledger.flush()
    assert use_of(held, now) == before


async def test_two_instances_see_each_others_use_after_their_flushes(
        store: SpyStore) -> None:
    """Two ledgers on one store: once each has flushed (and read), each counts the other's
    use once."""
    a, b = Ledger(store, 400), Ledger(store, 400)
    held = [await _both(ledger) for ledger in (a, b)]
    now = time.time()
    a.record("acme", "k1", None, "m", 1, 1, now)
    b.record("acme", "k1", None, "m", 2, 2, now)
    await a.flush()
    await b.flush()
    await a.flush()
    for h in held:
        assert use_of(h, now)[0].day == _t(2, 3, 3)


async def test_held_requests_count_until_released(store: SpyStore) -> None:
    """A request admitted under a quota counts as a request of its key and reseller until it
    ends; once released and recorded it counts once."""
    ledger = Ledger(store, 400)
    now = time.time()
    held = await _both(ledger)
    ledger.hold(held)
    ledger.hold(held)
    assert use_of(held, now)[0].day.requests == 2
    assert use_of(held, now)[1].month.requests == 2
    ledger.record("acme", "k1", None, "m", 1, 1, now)
    ledger.release(held)
    ledger.release(held)  # the second was refused later: released, not recorded
    assert use_of(held, now)[0].day == _t(1, 1, 1)
    ledger.release(held)  # an extra release never goes below zero
    assert use_of(held, now)[0].day.requests == 1


async def test_use_belongs_to_the_utc_day_and_month_of_its_end(store: SpyStore) -> None:
    """Local use counts in its UTC day and month only: a new day starts at zero and keeps the
    month; a new month starts at zero."""
    ledger = Ledger(store, 400)
    key, _ = await _both(ledger)
    assert key is not None
    ledger.record("acme", "k1", None, "m", 4, 2, _ts("2026-03-31T23:59:59"))
    ledger.record("acme", "k1", None, "m", 1, 1, _ts("2026-03-30T12:00:00"))
    assert key.used(_ts("2026-03-31T12:00:00")) == PeriodUse(_t(1, 4, 2), _t(2, 5, 3))
    assert key.used(_ts("2026-04-01T00:00:00")) == PeriodUse(_t(0, 0, 0), _t(0, 0, 0))


async def test_a_failed_flush_keeps_its_tallies_and_adds_them_once(
        redis_server: RedisServer) -> None:
    """With Redis down a flush adds nothing and keeps every tally (still counted as used);
    once Redis is back the next flush adds them, exactly once."""
    redis = open_store(redis_server.url, "tl:", 0.5)
    await redis.start()
    try:
        ledger = Ledger(redis, 400)
        held = await _both(ledger)
        now = time.time()
        ledger.record("acme", "k1", "c", "m", 10, 5, now)
        redis_server.kill()
        await ledger.flush()
        assert ledger.flush_errors >= 1
        assert ledger.pending() == {UsageKey(utc_day(now), "acme", "k1", "c", "m"):
                                    _t(1, 10, 5)}
        assert use_of(held, now)[0].day == _t(1, 10, 5)
        ledger.record("acme", "k1", "c", "m", 1, 1, now)
        redis_server.start()
        await ledger.flush()
        assert ledger.pending() == {}
        day = utc_day(now)
        rows = await redis.query_usage(day, day)
        assert [(r.requests, r.input_tokens, r.output_tokens) for r in rows] == [(2, 11, 6)]
        assert use_of(held, now)[0].day == _t(2, 11, 6)
    finally:
        await redis.close()


async def test_close_flushes_what_is_left(store: SpyStore) -> None:
    """close() sends the tallies not yet flushed."""
    ledger = Ledger(store, 400)
    now = time.time()
    ledger.record("direct", "k9", None, "m", 3, 3, now)
    await ledger.flush_step()
    ledger.record("direct", "k9", None, "m", 3, 3, now)
    await ledger.close()
    day = utc_day(now)
    assert [r.requests for r in await store.query_usage(day, day)] == [2]


async def test_watch_reads_a_subject_once(store: SpyStore) -> None:
    """The first watch of a subject reads its totals from the store (use from before this
    instance started counts); later ones find it read, without asking the store."""
    now = time.time()
    day = utc_day(now)
    await store.add_usage({UsageKey(day, "acme", "k1", None, "m"): _t(3, 30, 9)}, 400)
    ledger = Ledger(store, 400)
    assert ledger.find("acme", "k1", True, True) is None
    held = await _both(ledger)
    assert ledger.find("acme", "k1", True, True) == held
    assert use_of(held, now)[1].day == _t(3, 30, 9)
    assert store.asked == [{"acme": ["key:k1", "reseller:acme"]}]


async def test_only_subjects_with_a_quota_are_watched_and_read(store: SpyStore) -> None:
    """A quota on the reseller alone reads the reseller, not the key (and the other way
    round), at the first request and at every flush; a subject not watched counts as zero."""
    now = time.time()
    await store.add_usage({UsageKey(utc_day(now), "acme", "k1", None, "m"): _t(2, 2, 2)}, 400)
    ledger = Ledger(store, 400)
    by_reseller = await ledger.watch("acme", "k1", False, True)
    assert by_reseller[0] is None
    assert use_of(by_reseller, now) == (PeriodUse(_t(0, 0, 0), _t(0, 0, 0)),
                                       PeriodUse(_t(2, 2, 2), _t(2, 2, 2)))
    by_key = await ledger.watch("beta", "k9", True, False)
    assert by_key[1] is None
    await ledger.flush()
    assert store.asked == [{"acme": ["reseller:acme"]}, {"beta": ["key:k9"]},
                           {"acme": ["reseller:acme"], "beta": ["key:k9"]}]
    assert ledger.find("acme", "k1", True, True) is None  # the key is not watched yet


async def test_an_idle_subject_is_no_longer_read(store: SpyStore) -> None:
    """A subject without a request for IDLE_S is dropped: flushes no longer read it, and its
    next request reads it again, so nothing stale is used; one with a request within the
    idle time stays."""
    clock = Clock()
    ledger = Ledger(store, 400, clock=clock)
    await _both(ledger, "acme", "k1")
    await _both(ledger, "beta", "k2")
    clock.now += IDLE_S - 1
    assert ledger.find("beta", "k2", True, True) is not None  # k2 and beta used again
    await ledger.flush()
    assert store.asked[-1] == {"acme": ["key:k1", "reseller:acme"],
                               "beta": ["key:k2", "reseller:beta"]}
    clock.now += 2  # k1 and acme idle for IDLE_S + 1, k2 and beta for 2 s
    await ledger.flush()
    assert store.asked[-1] == {"beta": ["key:k2", "reseller:beta"]}
    assert ledger.find("acme", "k1", True, True) is None
    assert ledger.subject(key_id="k1") is None and ledger.subject(reseller="acme") is None
    # Meanwhile another instance used k1: the next request reads it afresh.
    now = time.time()
    await store.add_usage({UsageKey(utc_day(now), "acme", "k1", None, "m"): _t(4, 4, 4)}, 400)
    held = await _both(ledger, "acme", "k1")
    assert store.asked[-1] == {"acme": ["key:k1", "reseller:acme"]}
    assert use_of(held, now)[0].day == _t(4, 4, 4)
    asked = len(store.asked)
    clock.now += 2 * IDLE_S
    await ledger.flush()
    await ledger.flush()
    assert len(store.asked) == asked  # everything idle: nothing is read


async def test_no_subject_is_dropped_while_reads_fail(store: SpyStore) -> None:
    """While the store refuses reads, an idle subject keeps its last read (all this instance
    knows of its use elsewhere): its next request still counts it, instead of starting from
    zero; once reads work again, it is dropped after the idle time."""
    clock = Clock()
    ledger = Ledger(store, 400, clock=clock)
    now = time.time()
    await store.add_usage({UsageKey(utc_day(now), "acme", "k1", None, "m"): _t(5, 5, 5)}, 400)
    await ledger.watch("acme", "k1", True, False)
    store.fail_reads = True
    clock.now += 1
    await ledger.flush()  # its read fails
    clock.now += IDLE_S + 1
    await ledger.flush()
    assert ledger.subject(key_id="k1") is not None  # kept, with its last read
    held = await ledger.watched("acme", "k1", True, False)
    assert use_of(held, now)[0].day == _t(5, 5, 5)
    store.fail_reads = False
    await ledger.flush()
    clock.now += IDLE_S + 1
    await ledger.flush()
    assert ledger.subject(key_id="k1") is None


async def test_a_late_watch_counts_cells_a_refused_flush_kept(store: SpyStore) -> None:
    """Cells a refused flush put back are pending again: a subject watched afterwards starts
    from them (once), and from nothing of other subjects."""
    ledger = Ledger(store, 400)
    now = time.time()
    ledger.record("acme", "k1", None, "m", 1, 1, now)
    ledger.record("acme", "k2", None, "m", 2, 2, now)
    store.refuse = True
    await ledger.flush()
    store.refuse = False
    ledger.record("acme", "k1", None, "m", 4, 4, now)
    k1, _ = await ledger.watch("acme", "k1", True, False)
    assert k1 is not None and k1.used(now).day == _t(2, 5, 5)
    await ledger.flush()
    assert k1.used(now).day == _t(2, 5, 5)


async def test_a_subject_with_a_request_running_is_never_dropped(store: SpyStore) -> None:
    """A held request keeps its subjects watched past the idle time (its in-flight count
    stays exact); once released they are dropped after the idle time."""
    clock = Clock()
    ledger = Ledger(store, 400, clock=clock)
    held = await ledger.watch("acme", "k1", True, False)
    ledger.hold(held)
    clock.now += 2 * IDLE_S
    await ledger.flush()
    assert store.asked[-1] == {"acme": ["key:k1"]}
    assert ledger.find("acme", "k1", True, False) == held
    assert use_of(held, time.time())[0].day.requests == 1
    ledger.record("acme", "k1", None, "m", 1, 1, time.time())
    ledger.release(held)
    await ledger.flush()  # touched by the find above: kept once more
    clock.now += IDLE_S
    await ledger.flush()
    assert ledger.subject(key_id="k1") is None
    assert store.asked[-1] == {"acme": ["key:k1"]}  # the last read was the flush before


async def test_a_subject_watched_after_unflushed_traffic_counts_it(store: SpyStore) -> None:
    """Use recorded before a subject is watched counts once: what was not yet flushed (the
    first read does not hold it) and what was flushed before (the first read holds it), before
    and after the next flush."""
    ledger = Ledger(store, 400)
    now = time.time()
    ledger.record("acme", "k1", None, "m", 1, 1, now)
    await ledger.flush()  # in the store, unwatched
    ledger.record("acme", "k1", None, "m", 2, 2, now)
    ledger.record("acme", "k2", None, "m", 4, 4, now)
    held = await _both(ledger)
    expected = (PeriodUse(_t(2, 3, 3), _t(2, 3, 3)), PeriodUse(_t(3, 7, 7), _t(3, 7, 7)))
    assert use_of(held, now) == expected
    await ledger.flush()
    assert use_of(held, now) == expected
    ledger.record("acme", "k1", None, "m", 8, 8, now)
    await ledger.flush()
    assert use_of(held, now)[0] == PeriodUse(_t(3, 11, 11), _t(3, 11, 11))


async def test_a_subject_watched_during_a_flush_counts_its_batch_once(store: SpyStore) -> None:
    """A subject first seen while a flush is adding a batch that holds its use counts that
    batch once, whether the store takes it or refuses it (then it is sent again)."""
    for refuse in (False, True):
        ledger = Ledger(store, 400)
        reseller, key_id = f"r{int(refuse)}", f"k{int(refuse)}"
        now = time.time()
        ledger.record(reseller, key_id, None, "m", 1, 1, now)
        store.gate, store.refuse = asyncio.Event(), refuse
        store.adding.clear()
        flush = asyncio.ensure_future(ledger.flush())
        await store.adding.wait()  # the batch is on its way to the store
        watch = asyncio.ensure_future(ledger.watch(reseller, key_id, True, True))
        await asyncio.sleep(0)
        ledger.record(reseller, key_id, None, "m", 2, 2, now)
        store.gate.set()
        await flush
        held = await watch
        store.gate, store.refuse = None, False
        want = PeriodUse(_t(2, 3, 3), _t(2, 3, 3))
        assert use_of(held, now) == (want, want), refuse
        await ledger.flush()
        assert use_of(held, now) == (want, want), refuse
        day = utc_day(now)
        assert sum(r.requests for r in await store.query_usage(day, day, reseller)) == 2


async def test_flush_hooks_run_after_the_usage_is_added(store: SpyStore) -> None:
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
