"""The usage ledger in process (the embedded store's): cells per reseller and UTC day with the
models-per-day bound, the subjects' day and month totals, and their expiry, as the Redis
script (lua/add_usage.lua) keeps them."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.store.base import (
    MODELS_PER_DAY,
    OTHER_MODEL,
    PeriodUse,
    Tally,
    UsageKey,
    UsageRow,
    cell_expiry,
    check_day,
    day_total_expiry,
    month_total_expiry,
    usage_subjects,
)

Cell = tuple[str, str | None, str]  # key id, customer id, model


@dataclass(slots=True)
class DayCells:
    """One reseller's cells of one day; `models` are those counted under their own name."""

    expires_at: float
    models: set[str] = field(default_factory=set)
    cells: dict[Cell, Tally] = field(default_factory=dict)


@dataclass(slots=True)
class Totals:
    """The subjects' totals of one period ("d:YYYY-MM-DD" or "m:YYYY-MM")."""

    expires_at: float
    by_subject: dict[str, Tally] = field(default_factory=dict)


def _copy(t: Tally) -> Tally:
    return Tally(t.requests, t.input_tokens, t.output_tokens)


class Ledger:
    """Not thread-safe; the embedded store calls it from its event loop, writes under its
    write lock. `plan` decides (pure), `commit` applies: a plan whose persisting failed is
    dropped and changes nothing."""

    def __init__(self) -> None:
        self.days: dict[tuple[str, str], DayCells] = {}  # (day, reseller) → cells
        self.totals: dict[str, Totals] = {}

    def prune(self, now: float) -> None:
        """Drop what expired at `now`."""
        for k in [k for k, d in self.days.items() if d.expires_at <= now]:
            del self.days[k]
        for p in [p for p, t in self.totals.items() if t.expires_at <= now]:
            del self.totals[p]

    def plan(self, tallies: Mapping[UsageKey, Tally], now: float) -> list[tuple[UsageKey, Tally]]:
        """The cells of `tallies` (all-zero ones dropped) with each model bounded: under its
        name if already counted that day or among the first MODELS_PER_DAY, else
        OTHER_MODEL. Changes nothing."""
        added: dict[tuple[str, str], set[str]] = {}
        out: list[tuple[UsageKey, Tally]] = []
        for k, t in tallies.items():
            if not t:
                continue
            model = k.model
            if model != OTHER_MODEL:
                d = self.days.get((k.day, k.reseller))
                known = d.models if d is not None and d.expires_at > now else set()
                new = added.setdefault((k.day, k.reseller), set())
                if model not in known and model not in new:
                    if len(known) + len(new) < MODELS_PER_DAY:
                        new.add(model)
                    else:
                        model = OTHER_MODEL
            out.append((UsageKey(k.day, k.reseller, k.key_id, k.customer_id, model), _copy(t)))
        return out

    def commit(self, cells: Iterable[tuple[UsageKey, Tally]], retention_days: int,
               now: float) -> None:
        """Add planned `cells` (models already bounded) to the ledger and the totals; what
        is already past its expiry at `now` is not kept."""
        self.prune(now)
        for k, t in cells:
            expires = cell_expiry(k.day, retention_days)
            if expires > now:
                d = self.days.get((k.day, k.reseller))
                if d is None:
                    d = self.days[(k.day, k.reseller)] = DayCells(expires)
                d.expires_at = expires  # the last write's retention, as EXPIREAT does
                if k.model != OTHER_MODEL:
                    d.models.add(k.model)
                d.cells.setdefault((k.key_id, k.customer_id, k.model), Tally()).add(t)
            for period, exp in ((f"d:{k.day}", day_total_expiry(k.day)),
                                (f"m:{k.day[:7]}", month_total_expiry(k.day))):
                if exp <= now:
                    continue
                tot = self.totals.get(period)
                if tot is None:
                    tot = self.totals[period] = Totals(exp)
                for subject in usage_subjects(k):
                    tot.by_subject.setdefault(subject, Tally()).add(t)

    def period_use(self, subjects: Mapping[str, Collection[str]], day: str,
                   now: float) -> dict[str, PeriodUse]:
        check_day(day)
        day_tot = self.totals.get(f"d:{day}")
        month_tot = self.totals.get(f"m:{day[:7]}")

        def of(tot: Totals | None, subject: str) -> Tally:
            if tot is None or tot.expires_at <= now or subject not in tot.by_subject:
                return Tally()
            return _copy(tot.by_subject[subject])

        out: dict[str, PeriodUse] = {}
        for names in subjects.values():
            for subject in names:
                out[subject] = PeriodUse(of(day_tot, subject), of(month_tot, subject))
        return out

    def query(self, since_day: str, until_day: str, reseller: str | None, key_id: str | None,
              customer_id: str | None, now: float) -> list[UsageRow]:
        check_day(since_day)
        check_day(until_day)
        rows = []
        for (day, r), d in self.days.items():
            if not since_day <= day <= until_day or d.expires_at <= now:
                continue
            if reseller is not None and r != reseller:
                continue
            for (k, c, m), t in d.cells.items():
                if (key_id is None or k == key_id) and (customer_id is None or c == customer_id):
                    rows.append(UsageRow(day, r, k, c, m, t.requests, t.input_tokens,
                                         t.output_tokens))
        rows.sort(key=row_order)
        return rows

    # the state file (state_file.py) ------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The ledger as JSON-able data (`load` reads it back)."""
        return {
            "days": [[day, r, d.expires_at, sorted(d.models),
                      [[k, c, m, t.requests, t.input_tokens, t.output_tokens]
                       for (k, c, m), t in d.cells.items()]]
                     for (day, r), d in self.days.items()],
            "totals": {p: [t.expires_at, {s: [v.requests, v.input_tokens, v.output_tokens]
                                          for s, v in t.by_subject.items()}]
                       for p, t in self.totals.items()},
        }

    def load(self, snap: Mapping[str, Any]) -> None:
        """Replace the ledger with a `snapshot`; ValueError/KeyError/TypeError when malformed."""
        days: dict[tuple[str, str], DayCells] = {}
        for day, r, exp, models, cells in snap["days"]:
            check_day(day)
            d = days[(str(day), str(r))] = DayCells(float(exp), {str(m) for m in models})
            for k, c, m, req, inp, out in cells:
                d.cells[(str(k), None if c is None else str(c), str(m))] = Tally(
                    int(req), int(inp), int(out))
        totals = {}
        for p, (exp, subjects) in snap["totals"].items():
            totals[str(p)] = Totals(float(exp), {str(s): Tally(int(a), int(b), int(c))
                                                 for s, (a, b, c) in subjects.items()})
        self.days, self.totals = days, totals


def row_order(r: UsageRow) -> tuple[str, str, str, bool, str, str]:
    """The order of query_usage's rows: day, reseller, key, customer (none first), model."""
    return (r.day, r.reseller, r.key_id, r.customer_id is not None, r.customer_id or "",
            r.model)
