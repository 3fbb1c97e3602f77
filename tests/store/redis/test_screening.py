"""Unit tests for gateway.store.redis.screening: the key layout (one hash tag per reseller),
the script arguments and the decoding of a window's replies."""

from __future__ import annotations

import json

from gateway.store.base import SCREENING_PAIRS, ScreeningTally
from gateway.store.redis.screening import ScreeningLayout, decode_window


def test_every_key_of_a_reseller_shares_its_hash_tag() -> None:
    """An hour's 7 keys and the flag marks carry {s:R}, so Cluster keeps them in one slot."""
    lay = ScreeningLayout("gw:")
    keys = lay.hour_keys("acme", 10)
    assert len(keys) == 3 + len(SCREENING_PAIRS)
    assert all(k.startswith("gw:{s:acme}:scr:10:") for k in keys)
    assert lay.mark("acme", "egress_spread") == "gw:{s:acme}:scr:mark:egress_spread"


def test_add_call_orders_hours_and_sets_expiry_past_the_window() -> None:
    """One expire-at and one JSON tally per hour, hours ascending; expiry = end of the hour
    plus keep_hours."""
    t = ScreeningTally(counts={"req": 2}, customers={"b", "a"}, pairs={"cc": {"a\x1fUS"}})
    keys, args = ScreeningLayout("p:").add_call("r", {11: t, 10: ScreeningTally()}, 4096, 24)
    assert keys[0] == "p:{s:r}:scr:10:c" and keys[7] == "p:{s:r}:scr:11:c"
    assert args[0] == 4096
    assert args[1] == (10 + 1 + 24) * 3600 and args[3] == (11 + 1 + 24) * 3600
    assert json.loads(args[4]) == {"c": {"req": 2}, "u": ["a", "b"], "n": {},
                                   "p": {"cc": ["a\x1fUS"]}}


def test_decode_window_reads_counters_names_and_pairs() -> None:
    """Replies per hour (counters, names, pair sets) become one window; empty hours are
    absent; non-integer counters are skipped."""
    empty: list[object] = [{}, {}] + [set() for _ in SCREENING_PAIRS]
    full: list[object] = [{b"req": b"3", b"bad": b"x"}, {b"64500": b"Demo"},
                          {b"a\x1fUS"}, set(), set(), {b"k\x1f64500"}]
    w = decode_window([1, 2], empty + full, 5)
    assert w.hours == {2: {"req": 3}}
    assert w.names == {"64500": "Demo"} and w.customers == 5
    assert w.pairs == {"cc": {"a\x1fUS"}, "ka": {"k\x1f64500"}}


def test_decode_window_without_names_reads_text_or_bytes() -> None:
    """Without names the replies per hour are counters and pair sets; members decode whether
    the client gave bytes or text."""
    replies: list[object] = [{b"req": b"2"}, {b"a\x1fUS", b"b\x1fDE"}, {"k\x1fFR"}, set(),
                             set()]
    w = decode_window([7], replies, 0, names=False)
    assert w.hours == {7: {"req": 2}} and w.names == {} and w.customers == 0
    assert w.pairs == {"cc": {"a\x1fUS", "b\x1fDE"}, "ip": {"k\x1fFR"}}
