"""Screening's closed hours (gateway/screening_hours.py) and the judgement built on them
(gateway/screening.py ScreeningTallies.judge), on the embedded store and a real redis-server:
the figures of closed hours kept plus open hours read equal a full read's, the store is asked
only for the open hours once the closed ones are kept, and a costly judgement is paced."""

from __future__ import annotations

import copy
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Collection
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio

from gateway.audit import store_policy
from gateway.errors import StoreError
from gateway.policy import compile_policy, validate_policy
from gateway.screening import (
    FLUSH_BUDGET_S,
    KEPT_PAIRS_MAX,
    PACE_FACTOR,
    PACE_MAX_S,
    ScreeningTallies,
    compute_signals,
    signals_of,
    values_of,
)
from gateway.screening_hours import (
    CLOSE_GRACE_S,
    SEP,
    SIGNAL_COUNTERS,
    OpenHours,
    closed_hours,
    figures,
    last_closed_hour,
    open_hours,
)
from gateway.store import memory as memory_store
from gateway.store.base import (
    SCREENING_PAIRS,
    PolicyConflict,
    ScreeningTally,
    ScreeningWindow,
    Store,
)
from gateway.store.memory import MemoryStore
from gateway.store.redis.store import RedisStore
from tests.support.gateway import DEFAULT_POLICY
from tests.support.redis_server import RedisServer

# Hours ahead of the real clock: the stores keep a bucket until `window` hours after its hour
# by the real clock, so a simulated clock running ahead of it sees every bucket it wrote.
AHEAD = 10 * 24
START = (int(time.time() // 3600) + AHEAD) * 3600.0


class RecordsRanges:
    """Put before a real store class: records the hour ranges screening_window is asked
    for, then reads as the store does (a spy, not a mock)."""

    asked: list[tuple[int, int, bool]]

    async def screening_window(self, resellers: Collection[str], first_hour: int,
                               last_hour: int, *, detail: bool = True
                               ) -> dict[str, ScreeningWindow]:
        self.asked.append((first_hour, last_hour, detail))
        window: dict[str, ScreeningWindow] = await super().screening_window(  # type: ignore[misc]
            resellers, first_hour, last_hour, detail=detail)
        return window


class SpyMemoryStore(RecordsRanges, MemoryStore):
    """The embedded store, recording the ranges asked for."""


class SpyRedisStore(RecordsRanges, RedisStore):
    """The Redis store, recording the ranges asked for."""


@pytest_asyncio.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A started spy store: embedded, or on the session's redis-server under a fresh prefix."""
    st: SpyMemoryStore | SpyRedisStore
    if request.param == "memory":
        st = SpyMemoryStore()
    else:
        redis: RedisServer = request.getfixturevalue("redis_server_session")
        st = SpyRedisStore(redis.url, f"sh{uuid.uuid4().hex[:10]}:")
    st.asked = []
    await st.start()
    try:
        yield st
    finally:
        await st.close()


def _tally(rng: random.Random) -> ScreeningTally:
    """A random tally: small counters (some absent), pairs over small alphabets, so that
    hours share pairs and groups grow across hours."""
    t = ScreeningTally()
    for name in (*SIGNAL_COUNTERS, "req"):
        if rng.random() < 0.7:
            t.count(name, rng.randint(1, 12))
    for kind in SCREENING_PAIRS:
        for _ in range(rng.randint(0, 6)):
            t.pair(kind, f"{kind}{rng.randint(0, 5)}{SEP}{rng.randint(0, 7)}")
    return t


async def _full(store: Store, reseller: str, now: float, window: int) -> ScreeningWindow:
    current = int(now // 3600)
    return (await store.screening_window([reseller], current - window + 1, current))[reseller]


@pytest.mark.parametrize("seed", range(10))
async def test_closed_hours_and_open_read_equal_a_full_read(store: Any, seed: int) -> None:
    """Over a simulated day or two of random tallies, at every step the figures of the kept
    closed hours plus the open hours' read equal those of a full read, and so do the signals
    (hours closing, leaving the window, and quiet hours included)."""
    rng = random.Random(seed)
    window = rng.choice([1, 3, 7, 24])
    screening = compile_policy(validate_policy(DEFAULT_POLICY, "t"), 1).doc.screening_or_default
    r = f"r{seed}"
    have, kept = None, None
    now = START + rng.uniform(0, 3600)
    for _ in range(80):
        now += rng.choice([1.0, 60.0, 120.0, 600.0, 1500.0, 3600.0, 3 * 3600.0])
        current = int(now // 3600)
        if rng.random() < 0.8:
            await store.add_screening({(r, current): _tally(rng)}, window)
        first, last = current - window + 1, last_closed_hour(now)
        have = await closed_hours(store, r, have, first, last)
        opened = max(first, last + 1)
        kept = open_hours(kept, have, opened, current)
        read = await store.screening_window([r], opened, current, detail=False)
        got = kept.figures(read[r])
        full = await _full(store, r, now, window)
        assert got == figures(full, current)
        assert (signals_of(values_of(got, window), screening)
                == compute_signals(full, current, window, screening))


async def test_an_hour_written_after_it_closed_is_read_again(store: Any) -> None:
    """A closed hour that reads differently when it leaves the window (written late, or
    expired) has the closed hours built anew: the figures still equal a full read."""
    r, window = "late", 3
    now = START + 600
    have = None
    hours = [int(now // 3600) + i for i in range(4)]
    t = ScreeningTally(counts={"att": 2, "den": 1})
    t.pair("cc", f"c1{SEP}DE")
    await store.add_screening({(r, hours[0]): t}, window)
    now = hours[1] * 3600 + CLOSE_GRACE_S + 1  # hours[0] closed
    have = await closed_hours(store, r, have, hours[1] - window + 1, last_closed_hour(now))
    assert have.holds(hours[0])
    late = ScreeningTally(counts={"att": 5})
    late.pair("cc", f"c1{SEP}FR")
    await store.add_screening({(r, hours[0]): late}, window)  # after it closed
    now = hours[3] * 3600 + CLOSE_GRACE_S + 1  # hours[0] leaves the window
    current = int(now // 3600)
    first, last = current - window + 1, last_closed_hour(now)
    have = await closed_hours(store, r, have, first, last)
    read = await store.screening_window([r], last + 1, current, detail=False)
    assert OpenHours(have, last + 1, current).figures(read[r]) == figures(
        await _full(store, r, now, window), current)


class Clocks:
    """Wall time, the pacing clock and the loop-time clock of a ScreeningTallies, moved by
    the test; `cost` is the loop time each judgement takes."""

    def __init__(self, now: float, cost: float) -> None:
        self.wall, self.mono, self.spent, self.cost = now, 0.0, 0.0, cost
        self._calls = 0

    def now(self) -> float:
        return self.wall

    def clock(self) -> float:
        return self.mono

    def cpu(self) -> float:
        self._calls += 1
        if self._calls % 2 == 0:  # a judgement reads it before and after its work
            self.spent += self.cost
        return self.spent


def _tallies(store: Store, clocks: Clocks) -> ScreeningTallies:
    policy = compile_policy(validate_policy(DEFAULT_POLICY, "t"), 1)
    return ScreeningTallies(store, lambda: policy, now=clocks.now, clock=clocks.clock,
                            cpu=clocks.cpu)


async def _seed_day(store: Store, reseller: str, now: float) -> None:
    current = int(now // 3600)
    await store.add_screening({(reseller, h): ScreeningTally(counts={"att": 1, "req": 1},
                                                             pairs={"cc": {f"c{h}{SEP}DE"}})
                               for h in range(current - 23, current + 1)}, 24)


async def test_after_the_first_judgement_only_open_hours_are_read(store: Any) -> None:
    """The first judgement reads the closed hours once; later ones in the same hour ask the
    store only for the open hours, without the customer count or names (detail)."""
    clocks = Clocks(START + 1800, cost=0.0001)
    screening = _tallies(store, clocks)
    policy = screening.policy()
    assert policy is not None
    await _seed_day(store, "acme", clocks.wall)
    current = int(clocks.wall // 3600)
    await screening.judge(policy, {"acme"})
    assert store.asked[-1] == (current, current, False)
    assert {a[0] for a in store.asked} == set(range(current - 23, current + 1))
    for step in range(3):
        store.asked.clear()
        clocks.wall += 60
        clocks.mono += 1
        await screening.judge(policy, {"acme"})
        assert store.asked == [(current, current, False)], step
    store.asked.clear()
    # A new hour: the oldest leaves the window (read once more, to take it out); the previous
    # hour stays open until the grace ends, then is read once more, to keep it.
    clocks.wall = (current + 1) * 3600 + 30
    clocks.mono += 1
    await screening.judge(policy, {"acme"})
    assert store.asked == [(current - 23, current - 23, False), (current, current + 1, False)]
    store.asked.clear()
    clocks.wall = (current + 1) * 3600 + CLOSE_GRACE_S + 1
    clocks.mono += 1
    await screening.judge(policy, {"acme"})
    assert store.asked == [(current, current, False), (current + 1, current + 1, False)]
    store.asked.clear()
    clocks.mono += 1
    await screening.judge(policy, {"acme"})
    assert store.asked == [(current + 1, current + 1, False)]


async def test_a_costly_judgement_is_paced_and_owed_ones_follow(store: Any) -> None:
    """A judgement taking t of loop time waits PACE_FACTOR times t; the reseller is then judged by
    a flush even with nothing new flushed. A cheap one is judged on every flush."""
    clocks = Clocks(START + 1800, cost=0.1)
    screening = _tallies(store, clocks)
    policy = screening.policy()
    assert policy is not None
    await _seed_day(store, "acme", clocks.wall)
    await screening.judge(policy, {"acme"})
    judged = len(store.asked)
    for _ in range(4):  # 4 s later: not yet (the pace is 5 s)
        clocks.mono += 1
        await screening.judge(policy, {"acme"})
    assert len(store.asked) == judged
    clocks.mono = PACE_FACTOR * 0.1 + 0.01
    await screening.flush()  # nothing pending: the owed judgement alone
    assert len(store.asked) == judged + 1
    await screening.flush()  # nothing owed any more
    assert len(store.asked) == judged + 1

    clocks.cost = 0.001  # cheap: paced by 50 ms, well within one flush
    clocks.mono += 10
    await screening.judge(policy, {"acme"})
    before = len(store.asked)
    for _ in range(3):
        clocks.mono += 1
        await screening.judge(policy, {"acme"})
    assert len(store.asked) == before + 3


def _policy_of(window: int) -> Any:
    doc = copy.deepcopy(DEFAULT_POLICY)
    doc.setdefault("screening", {})["window"] = f"{window}h"
    return compile_policy(validate_policy(doc, "t"), 1)


class Judged:
    """A ScreeningTallies on the embedded store whose judgements are recorded (its `_act`
    replaced by a recorder: the alerts are not what is tested here)."""

    def __init__(self, store: Store, policy: Any, clocks: Any) -> None:
        self.policy = policy
        self.tallies = ScreeningTallies(store, lambda: self.policy, now=clocks.now,
                                        clock=clocks.clock, cpu=clocks.cpu)
        self.values: dict[str, list[tuple[str, Any]]] = {}

        async def record(r: str, signals: list[dict[str, Any]], screening: Any) -> None:
            self.values[r] = [(s["name"], s["value"]) for s in signals]

        self.tallies._act = record  # type: ignore[method-assign]

    async def judge(self, reseller: str) -> list[tuple[str, Any]]:
        """Judge `reseller` until it is judged (a rebuild may take several judgements)."""
        self.values.clear()
        for _ in range(50):
            await self.tallies.judge(self.policy, {reseller})
            if reseller in self.values:
                return self.values[reseller]
        raise AssertionError("not judged in 50 judgements")


@pytest.mark.parametrize("seed", range(4))
async def test_window_changes_judge_as_a_full_read(monkeypatch: pytest.MonkeyPatch,
                                                  seed: int) -> None:
    """Through reloads that change the window (24, 48, 6 hours) with the embedded store's real
    expiry (its clock moved with the test's), every judgement's signal values equal those of
    a full read of the window: a kept hour that expired inside a lengthened window is not
    counted."""
    clocks = Clocks(START, cost=0.0)
    monkeypatch.setattr(memory_store, "time", SimpleNamespace(time=clocks.now))
    rng = random.Random(seed)
    store = MemoryStore()
    await store.start()
    judged = Judged(store, _policy_of(24), clocks)
    for step in range(150):
        clocks.wall += rng.choice([60.0, 600.0, 1800.0, 3600.0])
        clocks.mono += 1
        if rng.random() < 0.05:
            judged.policy = _policy_of(rng.choice([24, 48, 6]))
        screening = judged.policy.doc.screening_or_default
        window, current = screening.window_hours, int(clocks.wall // 3600)
        await store.add_screening({("acme", current): _tally(rng)}, window)
        got = await judged.judge("acme")
        full = (await store.screening_window(["acme"], current - window + 1, current))["acme"]
        assert got == [(s["name"], s["value"])
                       for s in compute_signals(full, current, window, screening)], step
    await store.close()


class FailingMemoryStore(SpyMemoryStore):
    """The embedded store, refusing (StoreError) the reads of the (reseller, first hour)
    pairs in `failing`, each once; records the resellers asked for."""

    failing: set[tuple[str, int]]
    readers: list[str]

    async def screening_window(self, resellers: Collection[str], first_hour: int,
                               last_hour: int, *, detail: bool = True
                               ) -> dict[str, ScreeningWindow]:
        for r in resellers:
            self.readers.append(r)
            if (r, first_hour) in self.failing:
                self.failing.discard((r, first_hour))
                raise StoreError("refused")
        return await super().screening_window(resellers, first_hour, last_hour, detail=detail)


async def test_a_store_error_keeps_the_closed_hours_paces_and_judges_the_others() -> None:
    """A read refused in the middle of a reseller's judgement is counted once, leaves its kept
    closed hours as they were (the retry reads only what moved on), paces the retry like a
    judgement, and does not stop the judgement of the resellers after it."""
    store = FailingMemoryStore()
    store.asked, store.failing, store.readers = [], set(), []
    await store.start()
    clocks = Clocks(START + 1800, cost=0.02)
    screening = _tallies(store, clocks)
    policy = screening.policy()
    assert policy is not None
    for r in ("acme", "direct"):
        await _seed_day(store, r, clocks.wall)
    await screening.judge(policy, {"acme", "direct"})
    current = int(clocks.wall // 3600)
    # The next hour closes: acme's oldest hour is read (to take out), then the newly closed
    # one, refused.
    clocks.wall = (current + 1) * 3600 + CLOSE_GRACE_S + 1
    clocks.mono += PACE_FACTOR * 0.02 + 1
    store.failing = {("acme", current)}
    store.asked.clear()
    store.readers.clear()
    await screening.judge(policy, {"acme", "direct"})
    assert screening.flush_errors == 1
    assert "direct" in store.readers  # judged after acme's error
    assert screening._owed == {"acme"}
    clocks.mono += 0.5  # acme's failed judgement cost 0.02 s of loop time: paced 1 s
    store.readers.clear()
    await screening.judge(policy, {"acme"})
    assert store.readers == []
    clocks.mono += PACE_FACTOR * 0.02
    store.asked.clear()
    await screening.judge(policy, {"acme"})
    assert screening._owed == set() and screening.flush_errors == 1
    # The closed hours kept: the hour leaving read again, the newly closed one, the open one.
    assert store.asked == [(current - 23, current - 23, False), (current, current, False),
                           (current + 1, current + 1, False)]
    await store.close()


@pytest.mark.parametrize(("window", "into_hour"), [(1, 1800.0), (2, 60.0)])
async def test_a_short_window_is_paced_and_an_idle_reseller_forgotten(
        window: int, into_hour: float) -> None:
    """With a window of one hour (or two, within the grace, when no closed hour is in it) a
    costly judgement is still paced; a reseller not judged for a whole window has its kept
    state dropped."""
    store = SpyMemoryStore()
    store.asked = []
    await store.start()
    clocks = Clocks(START + into_hour, cost=0.1)
    judged = Judged(store, _policy_of(window), clocks)
    await store.add_screening({("acme", int(clocks.wall // 3600)): _tally(random.Random(1))},
                              window)
    await judged.tallies.judge(judged.policy, {"acme"})
    asked = len(store.asked)
    clocks.mono += 0.1  # 5 s of pace
    await judged.tallies.judge(judged.policy, {"acme"})
    assert len(store.asked) == asked
    assert judged.tallies._owed == {"acme"}
    clocks.mono += 10
    await judged.tallies.judge(judged.policy, {"acme"})
    assert judged.tallies._owed == set()
    clocks.wall += (window + 1) * 3600
    clocks.mono += 3600
    await judged.tallies.judge(judged.policy, {"direct"})
    assert "acme" not in judged.tallies._closed and "acme" not in judged.tallies._due
    await store.close()


def _policy_with(resellers: int) -> Any:
    doc = copy.deepcopy(DEFAULT_POLICY)
    doc["resellers"] = {f"r{i}": copy.deepcopy(DEFAULT_POLICY["resellers"]["acme"])
                        for i in range(resellers)}
    return compile_policy(validate_policy(doc, "t"), 1)


async def _failing_store() -> FailingMemoryStore:
    store = FailingMemoryStore()
    store.asked, store.failing, store.readers = [], set(), []
    await store.start()
    return store


def _in_order(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


async def test_a_flush_judges_within_its_budget_and_those_not_reached_go_first() -> None:
    """Once a flush's judgements took FLUSH_BUDGET_S of loop time the resellers left stay
    owed; the next flush judges them first."""
    store = await _failing_store()
    clocks = Clocks(START + 1800, cost=FLUSH_BUDGET_S * 0.6)
    judged = Judged(store, _policy_with(5), clocks)
    everyone = {f"r{i}" for i in range(5)}
    for r in everyone:
        await _seed_day(store, r, clocks.wall)
    order = []
    for _ in range(3):
        store.readers.clear()
        await judged.tallies.judge(judged.policy, everyone)
        order.append(_in_order(store.readers))
        clocks.mono += 1  # a judgement's pace: 1.5 s
    assert order == [["r0", "r1"], ["r2", "r3"], ["r4", "r0"]]
    assert judged.tallies._owed == {"r1", "r2", "r3"}  # r2, r3 paced; r1 not reached
    await store.close()


async def test_a_build_of_closed_hours_goes_a_step_a_judgement() -> None:
    """A reseller's closed hours are built a few hours (rebuild_pairs) a judgement; until
    they are complete it is owed and not judged on part of its window, then judged as a full
    read is."""
    store = SpyMemoryStore()
    store.asked = []
    await store.start()
    clocks = Clocks(START + 1800, cost=0.0001)
    judged = Judged(store, _policy_of(24), clocks)
    judged.tallies.rebuild_pairs = 4
    await _seed_day(store, "acme", clocks.wall)  # one pair an hour
    steps = 0
    while "acme" not in judged.values:
        steps += 1
        store.asked.clear()
        clocks.mono += 1
        await judged.tallies.judge(judged.policy, {"acme"})
        assert len([a for a in store.asked if a[0] < int(clocks.wall // 3600)]) <= 4
        assert ("acme" in judged.tallies._owed) == ("acme" not in judged.values)
        assert steps < 10
    assert steps == 6  # 23 closed hours, 4 a judgement
    current = int(clocks.wall // 3600)
    full = (await store.screening_window(["acme"], current - 23, current))["acme"]
    screening = judged.policy.doc.screening_or_default
    assert judged.values["acme"] == [(s["name"], s["value"])
                                     for s in compute_signals(full, current, 24, screening)]
    await store.close()


async def test_the_pace_is_capped() -> None:
    """However costly a judgement, the reseller is judged again PACE_MAX_S later."""
    store = SpyMemoryStore()
    store.asked = []
    await store.start()
    clocks = Clocks(START + 1800, cost=10.0)
    judged = Judged(store, _policy_of(24), clocks)
    await _seed_day(store, "acme", clocks.wall)
    await judged.tallies.judge(judged.policy, {"acme"})
    asked = len(store.asked)
    clocks.mono += PACE_MAX_S - 1
    await judged.tallies.judge(judged.policy, {"acme"})
    assert len(store.asked) == asked
    clocks.mono += 2
    await judged.tallies.judge(judged.policy, {"acme"})
    assert len(store.asked) > asked
    await store.close()


async def test_kept_pairs_are_capped_across_resellers() -> None:
    """Past kept_pairs_max pairs kept across resellers, the least recently judged reseller's
    kept hours are dropped; judged again, it builds them anew."""
    store = SpyMemoryStore()
    store.asked = []
    await store.start()
    clocks = Clocks(START + 1800, cost=0.0001)
    judged = Judged(store, _policy_with(3), clocks)
    assert judged.tallies.kept_pairs_max == KEPT_PAIRS_MAX
    judged.tallies.kept_pairs_max = 50  # 24 pairs a reseller: two fit
    for r in ("r0", "r1", "r2"):
        await _seed_day(store, r, clocks.wall)
    for r in ("r0", "r1", "r2"):
        clocks.mono += 1
        await judged.tallies.judge(judged.policy, {r})
    assert set(judged.tallies._closed) == {"r1", "r2"}
    assert set(judged.tallies._open) == {"r1", "r2"}
    store.asked.clear()
    clocks.mono += 1
    await judged.tallies.judge(judged.policy, {"r0"})
    assert len(store.asked) == 24  # built anew: 23 closed hours and the open one
    assert set(judged.tallies._closed) == {"r0", "r2"}
    await store.close()


class RefusingPolicyStore(MemoryStore):
    """The embedded store, refusing its next `refusals` policy writes with `error`."""

    refusals = 0
    error: Exception = StoreError("refused")

    async def put_policy(self, doc: str, actor: str, expected_version: int | None = None) -> int:
        if self.refusals > 0:
            self.refusals -= 1
            raise self.error
        return await super().put_policy(doc, actor, expected_version)


@pytest.mark.parametrize(("error", "refusals"), [(StoreError("refused"), 1),
                                                 (PolicyConflict(2, 1), 3)])
async def test_a_suspension_refused_is_retried(error: Exception, refusals: int) -> None:
    """A suspension the store refuses (an error, or other writers moving the version on past
    the retries) is owed and made by a later judgement."""
    doc = copy.deepcopy(DEFAULT_POLICY)
    doc["screening"] = {"actions": {"flag": "suspend", "mode": "enforce"}}
    policy = validate_policy(doc, "t")
    store = RefusingPolicyStore()
    await store.start()
    await store_policy(store, policy, "test", None)
    clocks = Clocks(START + 1800, cost=0.0001)
    compiled = compile_policy(policy, 1)
    tallies = ScreeningTallies(store, lambda: compiled, now=clocks.now, clock=clocks.clock,
                               cpu=clocks.cpu)
    await store.add_screening({("acme", int(clocks.wall // 3600)): ScreeningTally(
        counts={"att": 10, "rst": 10})}, 24)

    async def status() -> str:
        stored = await store.get_policy()
        assert stored is not None
        return str(json.loads(stored.doc)["resellers"]["acme"]["status"])

    store.refusals, store.error = refusals, error
    await tallies.judge(compiled, {"acme"})
    assert await status() == "active"
    clocks.mono += 10
    await tallies.judge(compiled, {"acme"})
    assert await status() == "suspended"
    await store.close()


async def test_a_reseller_gone_from_the_policy_is_forgotten() -> None:
    """A reseller no longer in the policy leaves nothing behind in any per-reseller state
    (flags, kept hours, pace, owed judgements)."""
    store = MemoryStore()
    await store.start()
    clocks = Clocks(START + 1800, cost=0.0001)
    tallies = ScreeningTallies(store, lambda: None, now=clocks.now, clock=clocks.clock,
                               cpu=clocks.cpu)
    both = compile_policy(validate_policy(DEFAULT_POLICY, "t"), 1)
    await _seed_day(store, "acme", clocks.wall)
    await store.add_screening({("acme", int(clocks.wall // 3600)): ScreeningTally(
        counts={"att": 10, "rst": 10})}, 24)
    await tallies.judge(both, {"acme", "direct"})
    assert ("acme", "restricted_customer_share") in tallies._flagged
    doc = copy.deepcopy(DEFAULT_POLICY)
    del doc["resellers"]["acme"]
    clocks.mono += 10
    await tallies.judge(compile_policy(validate_policy(doc, "t"), 2), {"direct"})
    for name, held in vars(tallies).items():
        if isinstance(held, dict | set) and name != "_pending":
            assert not any(k == "acme" or (isinstance(k, tuple) and k[0] == "acme")
                           for k in held), name
    await store.close()
