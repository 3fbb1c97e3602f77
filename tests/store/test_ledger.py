"""gateway.store.ledger: the in-process usage ledger plans without changing anything, bounds
models per reseller and day, expires cells and totals by the clock it is given, and
round-trips through its snapshot."""

from __future__ import annotations

from gateway.store.base import (
    MODELS_PER_DAY,
    OTHER_MODEL,
    PeriodUse,
    Tally,
    UsageKey,
    UsageRow,
    cell_expiry,
    day_total_expiry,
    month_total_expiry,
)
from gateway.store.ledger import Ledger, row_order

DAY = "2026-03-15"
NOW = cell_expiry(DAY, 0) - 3600.0  # late on DAY (UTC)


def _k(model: str = "m", key_id: str = "k1", reseller: str = "acme",
       customer: str | None = None, day: str = DAY) -> UsageKey:
    return UsageKey(day, reseller, key_id, customer, model)


def test_plan_changes_nothing_and_drops_zero_cells() -> None:
    """plan answers the bounded cells of an addition, without zero tallies, and leaves the
    ledger as it was."""
    ledger = Ledger()
    planned = ledger.plan({_k("a"): Tally(1, 2, 3), _k("b"): Tally()}, NOW)
    assert planned == [(_k("a"), Tally(1, 2, 3))]
    assert ledger.days == {} and ledger.totals == {}


def test_plan_bounds_models_within_one_addition_and_across_them() -> None:
    """Within one addition and after a commit, models past MODELS_PER_DAY of a reseller and
    day become `other`; a known model keeps its name."""
    ledger = Ledger()
    first = {_k(f"m{i}"): Tally(1) for i in range(MODELS_PER_DAY + 2)}
    planned = ledger.plan(first, NOW)
    assert [k.model for k, _ in planned][-3:] == [f"m{MODELS_PER_DAY - 1}", OTHER_MODEL,
                                                  OTHER_MODEL]
    ledger.commit(planned, 400, NOW)
    again = ledger.plan({_k("m0"): Tally(1), _k("new"): Tally(1),
                         _k("new", reseller="beta"): Tally(1)}, NOW)
    assert [k.model for k, _ in again] == ["m0", OTHER_MODEL, "new"]
    rows = ledger.query(DAY, DAY, "acme", None, None, NOW)
    assert [r.requests for r in rows if r.model == OTHER_MODEL] == [2]


def test_an_expired_day_no_longer_holds_models() -> None:
    """Once a day's cells expired, its models no longer count against the bound."""
    ledger = Ledger()
    ledger.commit(ledger.plan({_k(f"m{i}"): Tally(1) for i in range(MODELS_PER_DAY)}, NOW),
                  1, NOW)
    later = cell_expiry(DAY, 1) + 1.0
    assert [k.model for k, _ in ledger.plan({_k("late"): Tally(1)}, NOW)] == [OTHER_MODEL]
    assert [k.model for k, _ in ledger.plan({_k("late"): Tally(1)}, later)] == ["late"]


def test_expiry_of_cells_and_totals_follows_the_clock() -> None:
    """Cells live until their retention ends, day totals until DAY_TOTAL_DAYS after the day
    starts, month totals until MONTH_TOTAL_DAYS after the month starts."""
    ledger = Ledger()
    ledger.commit([(_k(), Tally(1, 1, 1))], 3, NOW)
    subjects = {"acme": ["reseller:acme", "key:k1"]}
    assert ledger.period_use(subjects, DAY, NOW)["key:k1"] == PeriodUse(Tally(1, 1, 1),
                                                                         Tally(1, 1, 1))
    after_day = day_total_expiry(DAY)
    assert ledger.period_use(subjects, DAY, after_day)["key:k1"] == PeriodUse(Tally(),
                                                                               Tally(1, 1, 1))
    assert ledger.period_use(subjects, DAY, month_total_expiry(DAY))["key:k1"] == PeriodUse(
        Tally(), Tally())
    assert len(ledger.query(DAY, DAY, None, None, None, cell_expiry(DAY, 3) - 1)) == 1
    assert ledger.query(DAY, DAY, None, None, None, cell_expiry(DAY, 3)) == []
    ledger.prune(cell_expiry(DAY, 3))
    assert ledger.days == {} and list(ledger.totals) == ["m:2026-03"]
    ledger.prune(month_total_expiry(DAY))
    assert ledger.totals == {}


def test_a_cell_past_retention_still_adds_to_live_totals() -> None:
    """A cell already past its retention is not kept, but its month's live total counts it,
    as on Redis."""
    ledger = Ledger()
    ledger.commit([(_k(day="2026-03-01"), Tally(5))], 1, NOW)
    assert ledger.query("2026-03-01", DAY, None, None, None, NOW) == []
    use = ledger.period_use({"acme": ["reseller:acme"]}, DAY, NOW)["reseller:acme"]
    assert use == PeriodUse(Tally(), Tally(5))


def test_snapshot_round_trips() -> None:
    """load(snapshot()) gives a ledger that answers the same queries and totals and keeps
    the same model bound."""
    ledger = Ledger()
    ledger.commit(ledger.plan({_k("a", customer="c1"): Tally(1, 2, 3),
                               _k("b", key_id="k2", reseller="beta"): Tally(4, 5, 6)}, NOW),
                  400, NOW)
    copy = Ledger()
    copy.load(ledger.snapshot())
    assert copy.query(DAY, DAY, None, None, None, NOW) == ledger.query(
        DAY, DAY, None, None, None, NOW)
    subjects = {"acme": ["reseller:acme", "key:k1"], "beta": ["reseller:beta", "key:k2"]}
    assert copy.period_use(subjects, DAY, NOW) == ledger.period_use(subjects, DAY, NOW)
    assert copy.days[(DAY, "acme")].models == {"a"}


def test_rows_sort_with_no_customer_first() -> None:
    """Rows sort by day, reseller, key, then the row without customer before customers."""
    rows = [UsageRow(DAY, "r", "k", c, "m", 1, 0, 0) for c in ("b", None, "")]
    assert [r.customer_id for r in sorted(rows, key=row_order)] == [None, "", "b"]
