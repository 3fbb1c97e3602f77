"""The usage ledger of the store contract (gateway/store/base.py: add_usage, period_use,
query_usage), over every backend: sums, the models-per-day bound, filters, day ranges, day and
month totals, retention and all-or-nothing additions."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import pytest

from gateway.store import Store
from gateway.store.base import (
    MODELS_PER_DAY,
    OTHER_MODEL,
    PeriodUse,
    Tally,
    UsageKey,
    UsageRow,
)

RETAIN = 400
# One date for the whole module: a run across midnight (UTC) still names the same days, all
# well within their expiry.
TODAY = datetime.now(UTC).date()


def _today() -> date:
    return TODAY


def _day(offset: int = 0) -> str:
    return (_today() + timedelta(days=offset)).isoformat()


def _same_month_pair() -> tuple[str, str]:
    """Two consecutive days of one month, the later one today or tomorrow (so its day
    totals are live)."""
    today = _today()
    first = today - timedelta(days=1) if today.day >= 2 else today
    return first.isoformat(), (first + timedelta(days=1)).isoformat()


def _k(key_id: str = "k1", reseller: str = "acme", customer: str | None = None,
       model: str = "m1", day: str | None = None) -> UsageKey:
    return UsageKey(day or _day(), reseller, key_id, customer, model)


def _row(k: UsageKey, requests: int, inp: int, out: int) -> UsageRow:
    return UsageRow(k.day, k.reseller, k.key_id, k.customer_id, k.model, requests, inp, out)


async def test_additions_sum_per_cell_and_per_subject(store: Store) -> None:
    """Two additions to overlapping cells sum per cell in the ledger and per reseller and key
    in the day and month totals; all-zero cells are not stored."""
    a, b = _k("k1", customer="c1"), _k("k1", customer=None, model="m2")
    c = _k("k2", customer="c1")
    await store.add_usage({a: Tally(1, 10, 100), b: Tally(2, 20, 200), c: Tally(0, 0, 0)},
                          RETAIN)
    await store.add_usage({a: Tally(3, 30, 300), c: Tally(1, 1, 1)}, RETAIN)
    rows = await store.query_usage(_day(), _day())
    assert rows == [_row(b, 2, 20, 200), _row(a, 4, 40, 400), _row(c, 1, 1, 1)]
    use = await store.period_use({"acme": ["reseller:acme", "key:k1", "key:k2", "key:k3"]}, _day())
    assert use == {
        "reseller:acme": PeriodUse(Tally(7, 61, 601), Tally(7, 61, 601)),
        "key:k1": PeriodUse(Tally(6, 60, 600), Tally(6, 60, 600)),
        "key:k2": PeriodUse(Tally(1, 1, 1), Tally(1, 1, 1)),
        "key:k3": PeriodUse(Tally(), Tally()),
    }


async def test_concurrent_additions_are_exact(store: Store) -> None:
    """Twenty additions at once (as from several instances) lose nothing."""
    k = _k("k1")
    await asyncio.gather(*(store.add_usage({k: Tally(1, 2, 3)}, RETAIN) for _ in range(20)))
    assert await store.query_usage(_day(), _day()) == [_row(k, 20, 40, 60)]
    use = await store.period_use({"acme": ["reseller:acme", "key:k1"]}, _day())
    assert use["key:k1"].day == Tally(20, 40, 60)


async def test_models_past_the_fiftieth_of_a_reseller_day_are_other(store: Store) -> None:
    """Per reseller and day the first MODELS_PER_DAY models are counted under their names,
    further ones (in later additions too) as `other`; a model already counted keeps its
    name; another reseller and another day have bounds of their own."""
    first = {_k(model=f"m{i:02}"): Tally(1, 1, 1) for i in range(MODELS_PER_DAY - 1)}
    await store.add_usage(first, RETAIN)
    # m49 is the 50th model; m50 and m51 are past the bound and share the `other` cell.
    await store.add_usage({_k(model="m49"): Tally(1, 0, 0), _k(model="m50"): Tally(1, 0, 0),
                           _k(model="m51"): Tally(2, 0, 0)}, RETAIN)
    await store.add_usage({_k(model="m00"): Tally(5, 0, 0), _k(model="m52"): Tally(1, 0, 0),
                           _k(model=OTHER_MODEL): Tally(1, 0, 0),
                           _k(reseller="beta", model="m52"): Tally(1, 0, 0),
                           _k(model="m52", day=_day(-1)): Tally(1, 0, 0)}, RETAIN)
    rows = {r.model: r.requests for r in await store.query_usage(_day(), _day(), "acme")}
    assert len(rows) == MODELS_PER_DAY + 1
    assert rows["m00"] == 6 and rows["m49"] == 1 and rows[OTHER_MODEL] == 5
    assert "m50" not in rows and "m52" not in rows
    assert [r.model for r in await store.query_usage(_day(), _day(), "beta")] == ["m52"]
    assert [r.model for r in await store.query_usage(_day(-1), _day(-1))] == ["m52"]
    use = await store.period_use({"acme": ["reseller:acme"]}, _day())
    assert use["reseller:acme"].day.requests == MODELS_PER_DAY - 1 + 4 + 7


async def test_query_filters_and_inclusive_day_range(store: Store) -> None:
    """query_usage returns the cells of the days in [since, until] matching the reseller, key
    and customer filters, sorted by day, reseller, key, customer (none first) and model."""
    d0, d1, d2 = _day(-2), _day(-1), _day()
    cells = {
        _k("k1", "acme", "c1", day=d0): Tally(1, 0, 0),
        _k("k1", "acme", None, day=d1): Tally(2, 0, 0),
        _k("k1", "acme", "c2", day=d1): Tally(3, 0, 0),
        _k("k2", "acme", "c1", day=d2): Tally(4, 0, 0),
        _k("k9", "beta", "c1", day=d1): Tally(5, 0, 0),
    }
    await store.add_usage(cells, RETAIN)

    async def requests(since: str, until: str, **kw: str) -> list[int]:
        return [r.requests for r in await store.query_usage(since, until, **kw)]

    assert await requests(d0, d2) == [1, 2, 3, 5, 4]
    assert await requests(d1, d1) == [2, 3, 5]
    assert await requests(d2, d0) == []
    assert await requests(d0, d2, reseller="acme") == [1, 2, 3, 4]
    assert await requests(d0, d2, key_id="k1") == [1, 2, 3]
    assert await requests(d0, d2, customer_id="c1") == [1, 5, 4]
    assert await requests(d0, d1, reseller="acme", customer_id="c1") == [1]
    assert await requests(d0, d2, reseller="nobody") == []
    with pytest.raises(ValueError):
        await store.query_usage("yesterday", d2)


async def test_period_use_counts_an_earlier_day_in_the_month_only(store: Store) -> None:
    """A cell of the day before, in the same month, counts in the month's totals and not in
    the day's; a reseller's key totals stay apart from another reseller's."""
    before, day = _same_month_pair()
    await store.add_usage({_k("k1", day=before): Tally(1, 10, 100),
                           _k("k1", day=day): Tally(2, 20, 200),
                           _k("k9", "beta", day=day): Tally(4, 40, 400)}, RETAIN)
    use = await store.period_use({"acme": ["reseller:acme", "key:k1"],
                                  "beta": ["reseller:beta", "key:k9"]}, day)
    assert use == {
        "reseller:acme": PeriodUse(Tally(2, 20, 200), Tally(3, 30, 300)),
        "key:k1": PeriodUse(Tally(2, 20, 200), Tally(3, 30, 300)),
        "reseller:beta": PeriodUse(Tally(4, 40, 400), Tally(4, 40, 400)),
        "key:k9": PeriodUse(Tally(4, 40, 400), Tally(4, 40, 400)),
    }
    earlier = await store.period_use({"acme": ["reseller:acme", "key:k1"]}, before)
    assert earlier["key:k1"].day == Tally(1, 10, 100)
    assert await store.period_use({}, day) == {}


async def test_period_use_answers_the_subjects_named_only(store: Store) -> None:
    """period_use answers exactly the subjects named: a key without its reseller, a reseller
    without its keys; a reseller with no name asked answers nothing."""
    await store.add_usage({_k("k1"): Tally(1, 1, 1), _k("k9", "beta"): Tally(2, 2, 2)}, RETAIN)
    use = await store.period_use({"acme": ["key:k1"], "beta": ["reseller:beta"], "gamma": []},
                                 _day())
    assert use == {"key:k1": PeriodUse(Tally(1, 1, 1), Tally(1, 1, 1)),
                   "reseller:beta": PeriodUse(Tally(2, 2, 2), Tally(2, 2, 2))}


async def test_cells_past_retention_are_not_kept(store: Store) -> None:
    """A cell of a day further back than `retention_days` is not kept (nor its day total),
    one within it is."""
    old, recent = _day(-10), _day(-3)
    await store.add_usage({_k("k1", day=old): Tally(1, 1, 1),
                           _k("k1", day=recent): Tally(2, 2, 2)}, 5)
    assert [r.day for r in await store.query_usage(_day(-30), _day())] == [recent]
    await store.add_usage({_k("k1", day=old): Tally(1, 1, 1)}, 20)
    assert [r.day for r in await store.query_usage(_day(-30), _day())] == [old, recent]
    assert (await store.period_use({"acme": ["key:k1"]}, old))["key:k1"].day == Tally()


async def test_a_refused_addition_adds_nothing(store: Store) -> None:
    """An addition with one malformed cell (a negative count, a day that is not YYYY-MM-DD)
    or a retention that is not positive raises ValueError and adds none of its cells."""
    good = {_k("k1"): Tally(1, 1, 1), _k("k2", "beta"): Tally(1, 1, 1)}
    for bad, retention in (({_k("k3"): Tally(-1, 0, 0)}, RETAIN),
                           ({UsageKey("2026-1-1", "acme", "k3", None, "m"): Tally(1, 0, 0)},
                            RETAIN),
                           ({}, 0)):
        with pytest.raises(ValueError):
            await store.add_usage({**good, **bad}, retention)
    assert await store.query_usage(_day(-1), _day(1)) == []
    use = await store.period_use({"acme": ["reseller:acme", "key:k1"],
                                  "beta": ["reseller:beta", "key:k2"]}, _day())
    assert all(u == PeriodUse(Tally(), Tally()) for u in use.values())
