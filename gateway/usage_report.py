"""The usage report of `gateway usage` and GET /admin/usage: the query (filters, a day range
from `since`, a grouping), read from its parameters, and the ledger's cells grouped into rows
and totals. Pure but for `read_report`, the one read of the cells (Store.query_usage); the CLI
renders the table and CSV (docs/architecture.md §12)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import Any

from gateway.audit import parse_since
from gateway.errors import OperationError
from gateway.ledger import utc_day
from gateway.store.base import Store, UsageRow, check_day

#: The fields of every row, in order: the cell (who, when, which model) and its counts.
FIELDS = ("day", "reseller", "key_id", "customer_id", "model",
          "requests", "input_tokens", "output_tokens")
COUNTS = ("requests", "input_tokens", "output_tokens")
#: `by` values and the fields each one groups by. Customer ids are the reseller's own
#: (attested by it), so a customer is grouped with its reseller.
GROUPINGS: dict[str, tuple[str, ...]] = {
    "day": ("day",),
    "model": ("model",),
    "customer": ("reseller", "customer_id"),
}
#: The filters (query parameters and CLI options) and the fields they fix.
FILTERS = {"reseller": "reseller", "key": "key_id", "customer": "customer_id"}
PARAMETERS = ("since", "by", *FILTERS)
DEFAULT_SINCE = "7d"


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """What to report: the UTC days [since_day, until_day], the filters (None = any), and the
    grouping (None = full granularity: one row per ledger cell)."""

    since_day: str
    until_day: str
    reseller: str | None = None
    key_id: str | None = None
    customer_id: str | None = None
    by: str | None = None

    def within(self, retention_days: int) -> UsageQuery:
        """The query with its first day no earlier than the oldest day a ledger keeping
        `retention_days` days can hold (the store reads no day it would find empty)."""
        oldest = (date.fromisoformat(self.until_day)
                  - timedelta(days=retention_days)).isoformat()
        return self if self.since_day >= oldest else replace(self, since_day=oldest)

    def params(self) -> dict[str, str]:
        """The query as GET /admin/usage parameters (`since` as the day it starts)."""
        out = {"since": self.since_day}
        for name, value in (("reseller", self.reseller), ("key", self.key_id),
                            ("customer", self.customer_id), ("by", self.by)):
            if value is not None:
                out[name] = value
        return out


def since_day(value: str, now: float) -> str:
    """The first day of a report from `since`: the UTC day of the time parse_since reads
    (`7d`, `24h`: that long back from now; an ISO 8601 date or time; Unix seconds). `7d`
    therefore reports the 8 UTC days that hold the last 168 hours, today included.
    ValueError for anything else."""
    try:
        return utc_day(parse_since(value, now))
    except (OverflowError, OSError, ValueError):  # a time no calendar holds
        raise ValueError(f"since {value[:64]!r}: use 7d, 24h, an ISO 8601 date or Unix "
                         "seconds") from None


def parse_query(params: Mapping[str, str], now: float) -> UsageQuery:
    """A UsageQuery from parameters named as in PARAMETERS (absent or empty = not given;
    `since` defaults to DEFAULT_SINCE); ValueError naming the parameter for an unknown one,
    a bad `since` or `by`."""
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(unknown)} (known: "
                         f"{', '.join(PARAMETERS)})")
    by = params.get("by") or None
    if by is not None and by not in GROUPINGS:
        raise ValueError(f"by {by[:64]!r}: use one of {', '.join(GROUPINGS)}")
    first = since_day(params.get("since") or DEFAULT_SINCE, now)
    return UsageQuery(since_day=first, until_day=utc_day(now),
                      reseller=params.get("reseller") or None,
                      key_id=params.get("key") or None,
                      customer_id=params.get("customer") or None, by=by)


def _kept(query: UsageQuery) -> tuple[str, ...]:
    """The identifying fields a row of `query` shows: all of them at full granularity; the
    grouped ones and those a filter fixes (the same in every cell: a key filter fixes its
    reseller too) otherwise."""
    if query.by is None:
        return FIELDS[:5]
    fixed = {f for f in FILTERS.values() if getattr(query, f) is not None}
    if query.key_id is not None:  # a key is of one reseller
        fixed.add("reseller")
    return tuple(f for f in FIELDS[:5] if f in GROUPINGS[query.by] or f in fixed)


def report(rows: Iterable[UsageRow], query: UsageQuery) -> dict[str, Any]:
    """`{"rows": [...], "totals": {requests, input_tokens, output_tokens}}` of the ledger
    cells `rows` grouped as `query.by` says. Every row has all of FIELDS; an identifying
    field neither grouped nor fixed by a filter is null (its counts are summed over it).
    Rows are sorted by their identifying fields, a null customer first."""
    kept = _kept(query)
    groups: dict[tuple[Any, ...], list[int]] = {}
    totals = dict.fromkeys(COUNTS, 0)
    for row in rows:
        ident = tuple(getattr(row, f) if f in kept else None for f in FIELDS[:5])
        sums = groups.setdefault(ident, [0, 0, 0])
        for i, f in enumerate(COUNTS):
            n = getattr(row, f)
            sums[i] += n
            totals[f] += n
    ordered = sorted(groups.items(),
                     key=lambda kv: tuple((v is not None, v or "") for v in kv[0]))
    return {"rows": [dict(zip(FIELDS, (*ident, *sums), strict=True))
                     for ident, sums in ordered],
            "totals": totals}


async def read_report(store: Store, query: UsageQuery, retention_days: int) -> dict[str, Any]:
    """`report` of `query` over the cells of `store`'s ledger, which keeps `retention_days`
    days (no older day is read): what `gateway usage` and GET /admin/usage answer.
    OperationError 400 for a day that is not YYYY-MM-DD."""
    try:
        check_day(query.since_day)
        check_day(query.until_day)
    except ValueError as exc:
        raise OperationError(400, str(exc)) from None
    read = query.within(retention_days)
    rows = await store.query_usage(read.since_day, read.until_day, read.reseller,
                                   read.key_id, read.customer_id)
    return report(rows, query)
