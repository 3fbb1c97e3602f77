"""The usage ledger's Redis layout: key names, the arguments of lua/add_usage.lua, the
bookkeeping of additions in doubt, and the decoding of cells and totals (pure; the store's
methods in store.py do the I/O).

Under `key_prefix` P, per reseller R (hash tag {r:R}) and UTC day D (month M = D[:7]):
P{r:R}:usage:D (cells: 'r:'/'i:'/'o:' + JSON [key id, customer id, model]),
P{r:R}:usage:D:models (the models counted under their name), P{r:R}:usage:total:d:D and
P{r:R}:usage:total:m:M ('r:'/'i:'/'o:' + subject), P{r:R}:usage:add:<id> (an addition's
marker); and P{usage}:resellers:D, the resellers with cells on D (a slot of its own).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.store.base import (
    MODELS_PER_DAY,
    OTHER_MODEL,
    Tally,
    UsageKey,
    UsageRow,
    cell_expiry,
    day_total_expiry,
    month_total_expiry,
)

MARKER_TTL_S = 86_400  # how long an addition's marker says whether it was applied
MAX_IN_DOUBT = 16  # additions in doubt kept per reseller (oldest dropped past it)
LETTERS = ("r:", "i:", "o:")


def cell_id(k: UsageKey) -> str:
    """A cell as the caller named it (before the models bound): day, key, customer, model."""
    return json.dumps([k.day, k.key_id, k.customer_id, k.model])


def cell_field(key_id: str, customer_id: str | None, model: str) -> str:
    """The cells-hash field suffix of one cell (after 'r:', 'i:' or 'o:')."""
    return json.dumps([key_id, customer_id, model])


@dataclass(slots=True)
class InDoubt:
    """An addition whose call failed after it may have reached Redis: its id and cells."""

    add_id: str
    cells: list[tuple[UsageKey, Tally]]
    at: float = field(default_factory=time.time)


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

    def marker(self, reseller: str, add_id: str) -> str:
        return f"{self.tag(reseller)}:add:{add_id}"

    def index(self, day: str) -> str:
        return f"{self.prefix}{{usage}}:resellers:{day}"

    def add_call(self, reseller: str, cells: Sequence[tuple[UsageKey, Tally]],
                 in_doubt: Sequence[InDoubt], add_id: str,
                 retention_days: int) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of add_usage.lua for one reseller's `cells` (all-zero ones already
        dropped), with the additions still `in_doubt` (oldest first)."""
        days: dict[str, int] = {}
        for k, _ in cells:
            days.setdefault(k.day, len(days) + 1)
        keys = [self.marker(reseller, add_id), *(self.marker(reseller, p.add_id)
                                                 for p in in_doubt)]
        args: list[Any] = [MARKER_TTL_S, len(in_doubt), len(days), f"reseller:{reseller}",
                           MODELS_PER_DAY, OTHER_MODEL]
        for day in days:
            keys += [self.cells(reseller, day), self.cells(reseller, day) + ":models",
                     self.day_totals(reseller, day), self.month_totals(reseller, day)]
            args += [int(cell_expiry(day, retention_days)), int(day_total_expiry(day)),
                     int(month_total_expiry(day))]
        for p in in_doubt:
            args.append(len(p.cells))
            for k, t in p.cells:
                args += [cell_id(k), t.requests, t.input_tokens, t.output_tokens]
        args.append(len(cells))
        for k, t in cells:
            args += [days[k.day], f"key:{k.key_id}", cell_id(k), k.model,
                     cell_field(k.key_id, k.customer_id, k.model),
                     cell_field(k.key_id, k.customer_id, OTHER_MODEL),
                     t.requests, t.input_tokens, t.output_tokens]
        return keys, args


def new_add_id() -> str:
    return uuid.uuid4().hex


def keep_in_doubt(in_doubt: list[InDoubt], failed: InDoubt, now: float) -> list[InDoubt]:
    """The additions in doubt after `failed` (whose call may have been applied) joins them:
    those past half the marker's life, or beyond MAX_IN_DOUBT, are dropped (their markers
    could be gone by the time a later addition looks)."""
    kept = [p for p in in_doubt if now - p.at < MARKER_TTL_S / 2] + [failed]
    return kept[-MAX_IN_DOUBT:]


def _text(b: Any) -> str:
    return b.decode() if isinstance(b, bytes) else str(b)


def decode_cells(day: str, reseller: str, raw: dict[Any, Any]) -> list[UsageRow]:
    """The rows of one cells hash (HGETALL); fields this layout did not write are ignored."""
    cells: dict[tuple[str, str | None, str], list[int]] = {}
    for f, v in raw.items():
        name = _text(f)
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
