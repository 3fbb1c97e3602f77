"""Reseller screening's Redis layout (docs/architecture.md §15): key names, the arguments of
lua/add_screening.lua and the decoding of a window (pure; store.py does the I/O).

Under `key_prefix` P, per reseller R (hash tag {s:R}, so Cluster keeps a reseller in one
slot) and UTC hour H (Unix time // 3600): P{s:R}:scr:H:c (counters hash), :u (customer ids,
HyperLogLog), :n (ASN names hash), :p:cc, :p:ip, :p:kc, :p:ka (pair sets, capped), and
P{s:R}:scr:mark:<signal> (the cross-instance flag of a signal, SET NX with a TTL).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gateway.store.base import SCREENING_PAIRS, ScreeningTally, ScreeningWindow
from gateway.store.redis.usage import text as _text


class ScreeningLayout:
    """Key names and script arguments under one key prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def tag(self, reseller: str) -> str:
        return f"{self.prefix}{{s:{reseller}}}:scr"

    def hour_keys(self, reseller: str, hour: int) -> list[str]:
        """The 7 keys of one hour: counters, customers, names, then the pair sets."""
        b = f"{self.tag(reseller)}:{hour}"
        return [f"{b}:c", f"{b}:u", f"{b}:n", *(f"{b}:p:{k}" for k in SCREENING_PAIRS)]

    def mark(self, reseller: str, signal: str) -> str:
        return f"{self.tag(reseller)}:mark:{signal}"

    def add_call(self, reseller: str, hours: Mapping[int, ScreeningTally], cap: int,
                 keep_hours: int) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of add_screening.lua for one reseller's hours."""
        keys: list[str] = []
        args: list[Any] = [cap]
        for hour, t in sorted(hours.items()):
            keys += self.hour_keys(reseller, hour)
            args.append((hour + 1 + keep_hours) * 3600)
            args.append(json.dumps({
                # cjson reads an empty object as an empty list: fine for pairs() either way
                "c": t.counts, "u": sorted(t.customers), "n": t.names,
                "p": {k: sorted(v) for k, v in t.pairs.items()},
            }, separators=(",", ":")))
        return keys, args


def decode_window(hours: Sequence[int], replies: Sequence[Any], customers: Any,
                  names: bool = True) -> ScreeningWindow:
    """The window of `hours` from the pipeline's replies (per hour: HGETALL counters, HGETALL
    names unless not `names`, SMEMBERS of each pair set) and the PFCOUNT of their sketches."""
    w = ScreeningWindow(customers=int(customers or 0))
    per = 1 + names + len(SCREENING_PAIRS)
    for i, hour in enumerate(hours):
        counts_raw, *sets = replies[i * per:(i + 1) * per]
        names_raw = sets.pop(0) if names else None
        if counts_raw:
            counts: dict[str, int] = {}
            for f, v in counts_raw.items():
                try:
                    counts[_text(f)] = int(v)
                except ValueError:
                    continue
            w.hours[hour] = counts
        for f, v in (names_raw or {}).items():
            w.names[_text(f)] = _text(v)
        for kind, members in zip(SCREENING_PAIRS, sets, strict=True):
            if members:
                w.pairs.setdefault(kind, set()).update(_texts(members))
    return w


def _texts(members: Iterable[Any]) -> Iterable[str]:
    """A pair set's members as text: all bytes (the client decodes nothing) at C speed."""
    try:
        return list(map(bytes.decode, members))
    except TypeError:
        return [_text(m) for m in members]
