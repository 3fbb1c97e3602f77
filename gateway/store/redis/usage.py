"""The usage ledger's Redis layout: key names, the arguments of lua/add_usage.lua, the
arithmetic of additions in doubt, and the decoding of cells and totals (pure; the store's
methods in store.py do the I/O).

Under `key_prefix` P, per reseller R (hash tag {r:R}) and UTC day D (month M = D[:7]):
P{r:R}:usage:D (cells: 'r:'/'i:'/'o:' + JSON [key id, customer id, model]),
P{r:R}:usage:D:models (the models counted under their name), P{r:R}:usage:total:d:D and
P{r:R}:usage:total:m:M ('r:'/'i:'/'o:' + subject), P{r:R}:usage:adds:<instance> (the
highest addition numbers of one store instance, applied and cancelled); and
P{usage}:resellers:D, the resellers with cells on D (a slot of its own).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store.base import (
    MODELS_PER_DAY,
    OTHER_MODEL,
    Tally,
    UsageKey,
    UsageRow,
    cell_expiry,
    day_total_expiry,
    key_subject,
    month_total_expiry,
    reseller_subject,
)

ADDS_TTL_S = 7 * 86_400  # an instance's additions hash outlives its last addition this long
LETTERS = ("r:", "i:", "o:")
Cells = list[tuple[UsageKey, Tally]]


def cell_field(key_id: str, customer_id: str | None, model: str) -> str:
    """The cells-hash field suffix of one cell (after 'r:', 'i:' or 'o:')."""
    return json.dumps([key_id, customer_id, model])


@dataclass(frozen=True, slots=True)
class InDoubt:
    """An addition whose call failed after it may have reached Redis: its number and the
    cells it sent."""

    number: int
    cells: Cells


def subtract(cells: Cells, held: Mapping[UsageKey, Tally]) -> Cells:
    """`cells` less what of them is already counted (`held`), never below zero; cells left
    with nothing are dropped."""
    out: Cells = []
    for k, t in cells:
        h = held.get(k)
        if h is not None:
            t = Tally(max(0, t.requests - h.requests), max(0, t.input_tokens - h.input_tokens),
                      max(0, t.output_tokens - h.output_tokens))
        if t:
            out.append((k, t))
    return out


def hold(held: dict[UsageKey, Tally], cells: Cells) -> None:
    """Add `cells` (an addition found applied) to what is already counted."""
    for k, t in cells:
        held.setdefault(k, Tally()).add(t)


class UsageLayout:
    """Key names and script arguments under one key prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def tag(self, reseller: str) -> str:
        return f"{self.prefix}{{r:{reseller}}}:usage"

    def cells(self, reseller: str, day: str) -> str:
        return f"{self.tag(reseller)}:{day}"

    def day_totals(self, reseller: str, day: str) -> str:
        return f"{self.tag(reseller)}:total:d:{day}"

    def month_totals(self, reseller: str, day: str) -> str:
        return f"{self.tag(reseller)}:total:m:{day[:7]}"

    def additions(self, reseller: str, instance: str) -> str:
        return f"{self.tag(reseller)}:adds:{instance}"

    def index(self, day: str) -> str:
        return f"{self.prefix}{{usage}}:resellers:{day}"

    def add_call(self, reseller: str, instance: str, number: int,
                 cells: Sequence[tuple[UsageKey, Tally]],
                 retention_days: int) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of add_usage.lua: addition `number` of store `instance`, of one
        reseller's `cells` (all-zero ones already dropped)."""
        days: dict[str, int] = {}
        for k, _ in cells:
            days.setdefault(k.day, len(days) + 1)
        keys = [self.additions(reseller, instance)]
        args: list[Any] = [number, ADDS_TTL_S, len(days), reseller_subject(reseller),
                           MODELS_PER_DAY, OTHER_MODEL]
        for day in days:
            keys += [self.cells(reseller, day), self.cells(reseller, day) + ":models",
                     self.day_totals(reseller, day), self.month_totals(reseller, day)]
            args += [int(cell_expiry(day, retention_days)), int(day_total_expiry(day)),
                     int(month_total_expiry(day))]
        args.append(len(cells))
        for k, t in cells:
            args += [days[k.day], key_subject(k.key_id), k.model,
                     cell_field(k.key_id, k.customer_id, k.model),
                     cell_field(k.key_id, k.customer_id, OTHER_MODEL),
                     t.requests, t.input_tokens, t.output_tokens]
        return keys, args


def text(b: Any) -> str:
    """A Redis reply value as text (bytes decoded, anything else by str)."""
    return b.decode() if isinstance(b, bytes) else str(b)


def decode_cells(day: str, reseller: str, raw: dict[Any, Any]) -> list[UsageRow]:
    """The rows of one cells hash (HGETALL); fields this layout did not write are ignored."""
    cells: dict[tuple[str, str | None, str], list[int]] = {}
    for f, v in raw.items():
        name = text(f)
        letter, suffix = name[:2], name[2:]
        if letter not in LETTERS:
            continue
        try:
            key_id, customer_id, model = json.loads(suffix)
            count = int(v)
        except (TypeError, ValueError):
            continue
        cell = cells.setdefault((str(key_id), None if customer_id is None else str(customer_id),
                                 str(model)), [0, 0, 0])
        cell[LETTERS.index(letter)] = count
    return [UsageRow(day, reseller, k, c, m, *counts) for (k, c, m), counts in cells.items()]


def totals_fields(subjects: Iterable[str]) -> list[str]:
    """The totals-hash fields of `subjects`, 3 each (HMGET's argument)."""
    return [letter + s for s in subjects for letter in LETTERS]


def decode_tallies(values: Sequence[Any]) -> list[Tally]:
    """HMGET's reply of `totals_fields` as one Tally per subject (nil as 0)."""
    ints = [int(v or 0) for v in values]
    return [Tally(*ints[i:i + 3]) for i in range(0, len(ints), 3)]
