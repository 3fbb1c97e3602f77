"""Unit tests for gateway.usage_report: the query read from its parameters (the day range of
`since`, the filters, the grouping) and the ledger's cells grouped into rows and totals."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta

import pytest

from gateway.errors import OperationError
from gateway.store.base import Tally, UsageKey, UsageRow
from gateway.store.memory import MemoryStore
from gateway.usage_report import (
    FIELDS,
    UsageQuery,
    parse_query,
    read_report,
    report,
    since_day,
    utc_day,
)

NOW = datetime(2026, 12, 2, 1, 30, tzinfo=UTC).timestamp()
TODAY = "2026-12-02"


def _row(day: str, reseller: str, key_id: str, customer: str | None, model: str,
         requests: int, tokens_in: int, tokens_out: int) -> UsageRow:
    return UsageRow(day, reseller, key_id, customer, model, requests, tokens_in, tokens_out)


CELLS = [
    _row("2026-12-01", "acme", "k1", None, "claude-a", 1, 10, 100),
    _row("2026-12-01", "acme", "k1", "c1", "claude-a", 2, 20, 200),
    _row("2026-12-01", "direct", "k2", "c1", "gpt-b", 4, 40, 400),
    _row("2026-12-02", "acme", "k3", "c2", "claude-a", 8, 80, 800),
    _row("2026-12-02", "acme", "k1", "c1", "gpt-b", 16, 160, 1600),
]


def _q(by: str | None = None, **filters: str) -> UsageQuery:
    return UsageQuery("2026-11-25", TODAY, by=by, **filters)


def test_since_is_the_utc_day_of_a_duration_back_or_a_date() -> None:
    """7d and 24h count back from now to a UTC day; an ISO date or time and Unix seconds
    name their own UTC day."""
    assert since_day("7d", NOW) == "2026-11-25"
    assert since_day("24h", NOW) == "2026-12-01"
    assert since_day("30m", NOW) == TODAY
    assert since_day("2026-11-01", NOW) == "2026-11-01"
    assert since_day("2026-11-01T23:30:00-02:00", NOW) == "2026-11-02"
    assert since_day("0", NOW) == "1970-01-01"


@pytest.mark.parametrize("bad", ["yesterday", "7w", "1e300", "2026-13-01", "inf"])
def test_a_bad_since_is_refused_naming_the_forms(bad: str) -> None:
    """Anything else is a ValueError naming `since` and the forms it takes."""
    with pytest.raises(ValueError, match=r"since .*7d, 24h"):
        since_day(bad, NOW)


def test_parse_query_reads_filters_grouping_and_the_default_range() -> None:
    """Filters and `by` come through (empty = not given); the range ends today and starts 7d
    back by default."""
    assert parse_query({}, NOW) == UsageQuery("2026-11-25", TODAY)
    got = parse_query({"since": "24h", "reseller": "acme", "key": "k1", "customer": "c1",
                       "by": "model"}, NOW)
    assert got == UsageQuery("2026-12-01", TODAY, "acme", "k1", "c1", "model")
    assert parse_query({"reseller": "", "by": ""}, NOW) == UsageQuery("2026-11-25", TODAY)


@pytest.mark.parametrize(("params", "named"), [
    ({"by": "week"}, "by 'week'"), ({"since": "soon"}, "since 'soon'"),
    ({"key_id": "k1"}, "unknown parameter(s): key_id"),
])
def test_parse_query_refuses_naming_the_parameter(params: dict[str, str], named: str) -> None:
    """An unknown parameter, a bad grouping or a bad `since` is a ValueError naming it."""
    with pytest.raises(ValueError) as err:
        parse_query(params, NOW)
    assert named in str(err.value)


def test_params_round_trip_through_parse_query() -> None:
    """A query's parameters (what AdminOperations sends) read back as the same query."""
    query = UsageQuery("2026-11-03", TODAY, "acme", "k1", None, "day")
    assert query.params() == {"since": "2026-11-03", "reseller": "acme", "key": "k1",
                              "by": "day"}
    assert parse_query(query.params(), NOW) == query


def _values(c: UsageRow) -> list[object]:
    return [getattr(c, f) for f in FIELDS]


def test_full_granularity_keeps_every_cell() -> None:
    """Without `by`, each ledger cell is a row with all eight fields, sorted by day, reseller,
    key, customer (none first) and model; totals sum them all."""
    out = report(CELLS, _q())
    assert all(list(r) == list(FIELDS) for r in out["rows"])
    assert [list(r.values()) for r in out["rows"]] == [
        _values(CELLS[i]) for i in (0, 1, 2, 4, 3)]
    assert out["totals"] == {"requests": 31, "input_tokens": 310, "output_tokens": 3100}


def test_by_day_sums_over_keys_customers_and_models() -> None:
    """By day: one row per day, every other identifying field null."""
    out = report(CELLS, _q("day"))
    assert out["rows"] == [
        {"day": "2026-12-01", "reseller": None, "key_id": None, "customer_id": None,
         "model": None, "requests": 7, "input_tokens": 70, "output_tokens": 700},
        {"day": "2026-12-02", "reseller": None, "key_id": None, "customer_id": None,
         "model": None, "requests": 24, "input_tokens": 240, "output_tokens": 2400}]


def test_by_model_sums_over_the_days() -> None:
    """By model: one row per model over the whole range."""
    out = report(CELLS, _q("model"))
    assert [(r["model"], r["day"], r["requests"]) for r in out["rows"]] == [
        ("claude-a", None, 11), ("gpt-b", None, 20)]


def test_by_customer_groups_a_customer_with_its_reseller() -> None:
    """By customer: a customer id is its reseller's, so c1 of acme and c1 of direct are two
    rows; requests with no attested customer are a row of their own, first."""
    out = report(CELLS, _q("customer"))
    assert [(r["reseller"], r["customer_id"], r["requests"], r["key_id"])
            for r in out["rows"]] == [
        ("acme", None, 1, None), ("acme", "c1", 18, None), ("acme", "c2", 8, None),
        ("direct", "c1", 4, None)]


def test_a_filter_keeps_the_field_it_fixes() -> None:
    """Grouped by day, a reseller filter shows the reseller; a key filter its key and its
    reseller (the caller passes only the matching cells)."""
    acme = [c for c in CELLS if c.reseller == "acme"]
    rows = report(acme, _q("day", reseller="acme"))["rows"]
    assert [(r["day"], r["reseller"], r["key_id"]) for r in rows] == [
        ("2026-12-01", "acme", None), ("2026-12-02", "acme", None)]
    k1 = [c for c in CELLS if c.key_id == "k1"]
    rows = report(k1, _q("model", key_id="k1"))["rows"]
    assert [(r["model"], r["reseller"], r["key_id"], r["requests"]) for r in rows] == [
        ("claude-a", "acme", "k1", 3), ("gpt-b", "acme", "k1", 16)]


def test_no_cells_is_no_rows_and_zero_totals() -> None:
    """An empty ledger reports no row and zero totals."""
    assert report([], _q("day")) == {
        "rows": [], "totals": {"requests": 0, "input_tokens": 0, "output_tokens": 0}}


def test_utc_day_of_a_unix_time() -> None:
    """A Unix time's UTC day, whatever the local zone."""
    assert utc_day(NOW) == TODAY and utc_day(0) == "1970-01-01"


def test_within_starts_no_earlier_than_the_retention() -> None:
    """A range reaching past what a ledger keeps starts at its oldest day; a shorter one is
    unchanged."""
    query = UsageQuery("1970-01-01", TODAY, reseller="acme", by="day")
    assert query.within(400) == UsageQuery("2025-10-28", TODAY, reseller="acme", by="day")
    assert _q().within(400) == _q()


async def test_read_report_reads_the_kept_days_of_the_store() -> None:
    """The report of a query read from a store's ledger: days older than the retention given
    are not read (a longer retention reads them); a malformed day is an OperationError 400."""
    today = date.fromisoformat(utc_day(time.time()))
    old = (today - timedelta(days=10)).isoformat()
    store = MemoryStore()
    await store.add_usage({UsageKey(old, "acme", "k1", None, "m"): Tally(1, 2, 3),
                           UsageKey(today.isoformat(), "acme", "k1", None, "m"): Tally(4, 5, 6)},
                          400)
    query = UsageQuery("1970-01-01", today.isoformat(), by="day")
    short = await read_report(store, query, 5)
    assert [r["day"] for r in short["rows"]] == [today.isoformat()]
    assert short["totals"] == {"requests": 4, "input_tokens": 5, "output_tokens": 6}
    full = await read_report(store, query, 30)
    assert [r["day"] for r in full["rows"]] == [old, today.isoformat()]
    for bad in (UsageQuery("2026-1-1", today.isoformat()), UsageQuery("x", "y")):
        with pytest.raises(OperationError) as err:
            await read_report(store, bad, 30)
        assert err.value.status == 400 and "YYYY-MM-DD" in str(err.value)
