"""Reseller screening in the store contract (gateway/store/base.py: add_screening,
screening_window, screening_mark), over every backend: counters summed per hour, distinct
customers, capped pair sets, expiry past the window, and the once-only flag mark."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.store import Store
from gateway.store.base import SCREENING_SET_CAP, ScreeningTally

NOW_HOUR = int(time.time() // 3600)


def _tally(req: int, customers: set[str], cc: set[str] | None = None) -> ScreeningTally:
    t = ScreeningTally()
    t.count("req", req)
    t.count("den", 1)
    t.customers |= customers
    for m in cc or ():
        t.pair("cc", m)
    t.names["64500"] = "Example Hosting"
    return t


async def test_counters_sum_per_hour_and_customers_are_distinct(store: Store) -> None:
    """Two additions to one hour add up; distinct customers count once across hours."""
    await store.add_screening({("acme", NOW_HOUR): _tally(2, {"c1", "c2"}, {"c1\x1fDE"})}, 24)
    await store.add_screening({("acme", NOW_HOUR): _tally(3, {"c2"}, {"c1\x1fFR"}),
                               ("acme", NOW_HOUR - 1): _tally(5, {"c3"})}, 24)
    got = await store.screening_window(["acme", "other"], NOW_HOUR - 23, NOW_HOUR)
    w = got["acme"]
    assert w.hours[NOW_HOUR]["req"] == 5 and w.hours[NOW_HOUR]["den"] == 2
    assert w.hours[NOW_HOUR - 1]["req"] == 5
    assert w.customers == 3
    assert w.pairs["cc"] == {"c1\x1fDE", "c1\x1fFR"}
    assert w.names == {"64500": "Example Hosting"}
    assert got["other"].hours == {} and got["other"].customers == 0


async def test_window_without_detail_has_counters_and_pairs_only(store: Store) -> None:
    """Without detail a window holds the same counters and pair sets, no customers or names."""
    await store.add_screening({("lean", NOW_HOUR): _tally(2, {"c1", "c2"}, {"c1\x1fDE"}),
                               ("lean", NOW_HOUR - 1): _tally(4, {"c3"}, {"c3\x1fFR"})}, 24)
    full = (await store.screening_window(["lean"], NOW_HOUR - 2, NOW_HOUR))["lean"]
    lean = (await store.screening_window(["lean"], NOW_HOUR - 2, NOW_HOUR,
                                         detail=False))["lean"]
    assert lean.hours == full.hours and lean.pairs == full.pairs
    assert full.customers == 3 and full.names
    assert lean.customers == 0 and lean.names == {}


async def test_window_leaves_out_hours_outside_the_range(store: Store) -> None:
    """Only the hours asked for are read."""
    await store.add_screening({("r1", NOW_HOUR - 5): _tally(7, {"x"})}, 24)
    got = await store.screening_window(["r1"], NOW_HOUR - 2, NOW_HOUR)
    assert got["r1"].hours == {}


async def test_buckets_past_keep_hours_are_not_kept(store: Store) -> None:
    """A bucket whose hour ended more than keep_hours ago is never stored."""
    await store.add_screening({("r2", NOW_HOUR - 10): _tally(1, {"x"})}, 2)
    got = await store.screening_window(["r2"], NOW_HOUR - 20, NOW_HOUR)
    assert got["r2"].hours == {}


async def test_pair_sets_stop_growing_at_the_cap(store: Store) -> None:
    """A pair set takes members only while it holds fewer than SCREENING_SET_CAP."""
    t = ScreeningTally()
    for i in range(SCREENING_SET_CAP + 50):
        t.pair("ip", f"10.0.0.1\x1fcust-{i}")
    await store.add_screening({("big", NOW_HOUR): t}, 24)
    got = await store.screening_window(["big"], NOW_HOUR, NOW_HOUR)
    assert len(got["big"].pairs["ip"]) == SCREENING_SET_CAP


async def test_malformed_tallies_are_refused(store: Store) -> None:
    """A negative count or an unknown pair set is a ValueError."""
    bad = ScreeningTally(counts={"req": -1})
    with pytest.raises(ValueError):
        await store.add_screening({("r", NOW_HOUR): bad}, 24)
    with pytest.raises(ValueError):
        await store.add_screening({("r", NOW_HOUR): ScreeningTally(pairs={"zz": {"a"}})}, 24)


async def test_mark_is_won_once_until_cleared(store: Store) -> None:
    """Of concurrent marks of one signal exactly one wins; a cleared mark can be won again."""
    won = await asyncio.gather(*(store.screening_mark("acme", "egress_spread", True, 600)
                                 for _ in range(5)))
    assert sorted(won) == [False] * 4 + [True]
    assert await store.screening_mark("acme", "egress_spread", True, 600) is False
    assert await store.screening_mark("acme", "egress_spread", False, 600) is False
    assert await store.screening_mark("acme", "egress_spread", True, 600) is True
