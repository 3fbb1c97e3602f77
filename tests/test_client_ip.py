"""Tests for gateway.client_ip: nginx realip semantics over X-Forwarded-For and RFC 7239."""

from __future__ import annotations

import ipaddress
import re
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.client_ip import MAX_HEADER_LEN, MAX_HOPS, ClientIPResolver, Resolution, parse_addr

TRUSTED = ["127.0.0.0/8", "10.0.0.0/8", "::1/128", "fd00::/8"]
PEER = "127.0.0.1"

XFF = ClientIPResolver(TRUSTED, "X-Forwarded-For", recursive=True)
XFF_FLAT = ClientIPResolver(TRUSTED, "X-Forwarded-For", recursive=False)
FWD = ClientIPResolver(TRUSTED, "Forwarded", recursive=True)


# --- parse_addr ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("  192.0.2.1  ", "192.0.2.1"),
        ("192.0.2.1:8080", "192.0.2.1"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("[::1]:80", "::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("[2001:db8:cafe::17]:4711", "2001:db8:cafe::17"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
    ],
)
def test_parse_addr_accepts_and_normalises(token: str, expected: str) -> None:
    """Well-formed addresses, with or without brackets and ports, normalise to one spelling."""
    assert parse_addr(token) == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
        ("[::ffff:127.0.0.1]:80", "127.0.0.1"),
    ],
)
def test_parse_addr_bracketed_ipv4_mapped_is_ipv4(token: str, expected: str) -> None:
    """An IPv4-mapped IPv6 address normalises to IPv4 in bracketed form too, as it does bare."""
    assert parse_addr(token) == expected


@pytest.mark.parametrize(
    "token",
    [
        "",
        "   ",
        "unknown",
        "_hidden",
        "example.com",
        "garbage",
        "fe80::1%eth0",
        "[fe80::1%eth0]:80",
        "1.2.3.4:",
        "1.2.3.4:http",
        "1.2.3.4:²",
        "1.2.3.4:99999",
        "256.1.1.1",
        "01.2.3.4",
        "1.2.3",
        "[::1",
        "[::1]:",
        "[::1]x",
        "[::1]:8a",
        "[1.2.3.4]",
        "1.2.3.4 5",
        "1" * 100,
        "::1" + " " * 100 + "x",
    ],
)
def test_parse_addr_refuses_non_addresses(token: str) -> None:
    """Names, `unknown`, obfuscated ids, zone ids, bad ports and other garbage are not addresses."""
    assert parse_addr(token) is None


# --- resolve: X-Forwarded-For --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "values", "expected"),
    [
        # untrusted peer: the header is ignored
        ("203.0.113.5", ["1.2.3.4"], Resolution("203.0.113.5", "peer", -1)),
        ("203.0.113.5", ["10.0.0.1"], Resolution("203.0.113.5", "peer", -1)),
        # trusted peer, no header
        (PEER, [], Resolution(PEER, "peer", -1)),
        # recursive: skip trusted right to left, first untrusted wins
        (PEER, ["1.1.1.1, 2.2.2.2, 10.0.0.2"], Resolution("2.2.2.2", "header", 1)),
        (PEER, ["1.1.1.1, 10.0.0.3, 10.0.0.2"], Resolution("1.1.1.1", "header", 2)),
        (PEER, ["1.1.1.1"], Resolution("1.1.1.1", "header", 0)),
        # all trusted: the leftmost
        (PEER, ["10.0.0.1, 10.0.0.2, 127.0.0.2"], Resolution("10.0.0.1", "header", 2)),
        # a malformed element stops the walk at the last good address
        (PEER, ["1.1.1.1, garbage, 10.0.0.2"], Resolution("10.0.0.2", "header", 0)),
        (PEER, ["1.1.1.1, bogus"], Resolution(PEER, "peer", -1)),
        (PEER, ["1.1.1.1, unknown"], Resolution(PEER, "peer", -1)),
        (PEER, ["1.1.1.1, fe80::1%eth0"], Resolution(PEER, "peer", -1)),
        (PEER, ["1.1.1.1, 10.0.0.9:abc, 10.0.0.2"], Resolution("10.0.0.2", "header", 0)),
        # empty elements are skipped and do not count as hops
        (PEER, ["1.1.1.1, , ,10.0.0.2,"], Resolution("1.1.1.1", "header", 1)),
        (PEER, [",,,"], Resolution(PEER, "peer", -1)),
        (PEER, [""], Resolution(PEER, "peer", -1)),
        # several header values are one list, in order
        (PEER, ["1.1.1.1", "10.0.0.2"], Resolution("1.1.1.1", "header", 1)),
        (PEER, ["1.1.1.1, 2.2.2.2", "10.0.0.9"], Resolution("2.2.2.2", "header", 1)),
        (PEER, ["1.1.1.1", "", "10.0.0.9"], Resolution("1.1.1.1", "header", 1)),
        # IPv6 and ports
        ("::1", ["2001:db8::1"], Resolution("2001:db8::1", "header", 0)),
        ("[::1]:5000", ["2001:db8::1"], Resolution("2001:db8::1", "header", 0)),
        (PEER, ["[2001:db8::1]:443"], Resolution("2001:db8::1", "header", 0)),
        (PEER, ["2001:DB8:0::1"], Resolution("2001:db8::1", "header", 0)),
        (PEER, ["2001:db8::1, fd00::2, [::1]:80"], Resolution("2001:db8::1", "header", 2)),
        (PEER, ["192.0.2.1:8080, 10.0.0.2:1"], Resolution("192.0.2.1", "header", 1)),
        (PEER, ["::ffff:192.0.2.1"], Resolution("192.0.2.1", "header", 0)),
        # an IPv4-mapped trusted hop in the header is trusted like its IPv4 form
        (PEER, ["192.0.2.1, ::ffff:10.0.0.2"], Resolution("192.0.2.1", "header", 1)),
        # IPv4-mapped IPv6 peer is treated as IPv4 (trusted and normalised)
        ("::ffff:127.0.0.1", ["1.2.3.4"], Resolution("1.2.3.4", "header", 0)),
        ("::ffff:203.0.113.5", ["1.2.3.4"], Resolution("203.0.113.5", "peer", -1)),
        # a peer that is not an address is reported as-is and never trusted
        ("garbage", ["1.2.3.4"], Resolution("garbage", "peer", -1)),
    ],
)
def test_resolve_recursive(peer: str, values: list[str], expected: Resolution) -> None:
    """real_ip_recursive on: walk right to left over trusted hops, stop at the first untrusted."""
    assert XFF.resolve(peer, values) == expected


@pytest.mark.parametrize(
    ("peer", "values", "expected"),
    [
        ("203.0.113.5", ["1.2.3.4"], Resolution("203.0.113.5", "peer", -1)),
        (PEER, ["1.1.1.1, 10.0.0.2"], Resolution("10.0.0.2", "header", 0)),
        (PEER, ["1.1.1.1, 2.2.2.2"], Resolution("2.2.2.2", "header", 0)),
        (PEER, ["1.1.1.1", "10.0.0.2"], Resolution("10.0.0.2", "header", 0)),
        (PEER, ["1.1.1.1, 2.2.2.2, "], Resolution("2.2.2.2", "header", 0)),
        (PEER, ["1.1.1.1, garbage"], Resolution(PEER, "peer", -1)),
    ],
)
def test_resolve_not_recursive(peer: str, values: list[str], expected: Resolution) -> None:
    """real_ip_recursive off: a trusted peer's header gives its rightmost element, trusted or no."""
    assert XFF_FLAT.resolve(peer, values) == expected


def test_resolve_without_trusted_networks_ignores_header() -> None:
    """With no set_real_ip_from networks every header is ignored."""
    r = ClientIPResolver([], "X-Forwarded-For", recursive=True)
    assert r.resolve(PEER, ["1.2.3.4"]) == Resolution(PEER, "peer", -1)


def test_is_trusted_matches_networks_of_both_families() -> None:
    """Trust is membership of a configured network, per address family, mapped IPv4 included."""
    assert XFF.is_trusted("10.255.0.1")
    assert XFF.is_trusted("::1")
    assert XFF.is_trusted("fd12::1")
    assert XFF.is_trusted("::ffff:10.0.0.1")
    assert not XFF.is_trusted("11.0.0.1")
    assert not XFF.is_trusted("2001:db8::1")
    assert not XFF.is_trusted("not an address")


# --- resolve: RFC 7239 Forwarded -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["for=192.0.2.60;proto=http;by=203.0.113.43"], Resolution("192.0.2.60", "header", 0)),
        (['for="[2001:db8:cafe::17]:4711"'], Resolution("2001:db8:cafe::17", "header", 0)),
        (['for="192.0.2.60:8080"'], Resolution("192.0.2.60", "header", 0)),
        (["For=192.0.2.60"], Resolution("192.0.2.60", "header", 0)),
        (["proto=https; for=192.0.2.60"], Resolution("192.0.2.60", "header", 0)),
        (["for=192.0.2.43, for=198.51.100.17;by=10.0.0.1"],
         Resolution("198.51.100.17", "header", 0)),
        (["for=192.0.2.43, for=10.0.0.7"], Resolution("192.0.2.43", "header", 1)),
        (["for=192.0.2.43, for=10.0.0.7;proto=https", "for=10.0.0.8"],
         Resolution("192.0.2.43", "header", 2)),
        (["for=unknown"], Resolution(PEER, "peer", -1)),
        (["for=192.0.2.43, for=unknown"], Resolution(PEER, "peer", -1)),
        (["for=_hidden"], Resolution(PEER, "peer", -1)),
        (['for="_gazonk"'], Resolution(PEER, "peer", -1)),
        (["for=192.0.2.43, for=_hidden, for=10.0.0.7"], Resolution("10.0.0.7", "header", 0)),
        (['for="[fe80::1%eth0]:80"'], Resolution(PEER, "peer", -1)),
    ],
)
def test_resolve_forwarded_header(values: list[str], expected: Resolution) -> None:
    """header=Forwarded walks the RFC 7239 `for=` values with the same realip semantics."""
    assert FWD.resolve(PEER, values) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # a quoted value is one value: a comma or 'for=' inside it is not a new element
        (['for="175.16.199.1,for=214.78.120.1"'], Resolution(PEER, "peer", -1)),
        (['for="175.16.199.1,for=214.78.120.1", for=10.0.0.7'],
         Resolution("10.0.0.7", "header", 0)),
        (['for="192.0.2.1;for=10.0.0.1"'], Resolution(PEER, "peer", -1)),
        # a parameter twice in one element makes it malformed (RFC 7239 §4): the walk stops
        (["for=192.0.2.1;for=10.0.0.1"], Resolution(PEER, "peer", -1)),
        (["for=10.0.0.1;FOR=192.0.2.1"], Resolution(PEER, "peer", -1)),
        (["for=192.0.2.1;proto=http;proto=https"], Resolution(PEER, "peer", -1)),
        (["for=192.0.2.9, for=192.0.2.1;for=10.0.0.1, for=10.0.0.2"],
         Resolution("10.0.0.2", "header", 0)),
        # quoted-string escapes are undone; IPv6 needs quotes and brackets; ports are optional
        (['for="\\[2001:db8::1\\]:80"'],
         Resolution("2001:db8::1", "header", 0)),
        (['for="[2001:db8::1]"'], Resolution("2001:db8::1", "header", 0)),
        (['for="[::ffff:192.0.2.1]:80"'], Resolution("192.0.2.1", "header", 0)),
        (['for="192.0.2.1:_obfport"'], Resolution("192.0.2.1", "header", 0)),
        (["for=[2001:db8::1]"], Resolution(PEER, "peer", -1)),
        (["for=2001:db8::1"], Resolution(PEER, "peer", -1)),
        (["for=192.0.2.1:80"], Resolution(PEER, "peer", -1)),
        (['for="2001:db8::1"'], Resolution(PEER, "peer", -1)),
        (['for="[2001:db8::1]:99999"'], Resolution(PEER, "peer", -1)),
        (['for="192.0.2.1:"'], Resolution(PEER, "peer", -1)),
        (['for="unknown"'], Resolution(PEER, "peer", -1)),
        # malformed syntax stops the walk
        (["for=192.0.2.1, garbage"], Resolution(PEER, "peer", -1)),
        (["for = 192.0.2.1"], Resolution(PEER, "peer", -1)),
        (['for=192.0.2.1"'], Resolution(PEER, "peer", -1)),
        (['for="192.0.2.1'], Resolution(PEER, "peer", -1)),
        (['for="192.0.2.1"x'], Resolution(PEER, "peer", -1)),
        (["for=192.0.2.1 proto=http"], Resolution(PEER, "peer", -1)),
        (["for=\u00e9"], Resolution(PEER, "peer", -1)),
        # empty pairs and elements are allowed by the list syntax
        ([";;for=192.0.2.1;"], Resolution("192.0.2.1", "header", 0)),
        (["for=192.0.2.1, , ,for=10.0.0.2,"], Resolution("192.0.2.1", "header", 1)),
        (["for=192.0.2.1\t;\tproto=https"], Resolution("192.0.2.1", "header", 0)),
    ],
)
def test_resolve_forwarded_rfc7239_syntax(values: list[str], expected: Resolution) -> None:
    """Forwarded is parsed per RFC 7239: quoted-strings, escapes, one of each parameter."""
    assert FWD.resolve(PEER, values) == expected


@pytest.mark.parametrize(
    "sent",
    ['for="', 'for="x\\', 'for=a"b', 'for="[::1]:80\\"', 'a"b"c"', '"', "for=1.2.3.4;for=5"],
)
def test_forwarded_garbage_on_the_left_cannot_hide_appended_hops(sent: str) -> None:
    """What a client sends cannot swallow the elements trusted proxies append to its right."""
    got = FWD.resolve(PEER, [sent + ", for=198.51.100.7;proto=https, for=10.0.0.5"])
    assert got == Resolution("198.51.100.7", "header", 1)
    assert FWD.resolve(PEER, [sent, 'for="[2001:db8::7]:1"']) == Resolution(
        "2001:db8::7", "header", 0)


def test_resolve_overlong_forwarded_keeps_rightmost_elements() -> None:
    """A Forwarded header past MAX_HEADER_LEN is judged on its rightmost whole elements."""
    header = 'for="' + "x" * (MAX_HEADER_LEN * 2) + ", for=10.0.0.1"  # an unterminated quote
    assert FWD.resolve(PEER, [header + ', for="192.0.2.5:1", for=10.0.0.2']) == Resolution(
        "192.0.2.5", "header", 1)


def test_forwarded_long_runs_parse_in_linear_time() -> None:
    """Long whitespace or quoted runs in an element cost linear time (quadratic would trip the
    test timeout long before these 40 distinct, uncached headers are judged)."""
    r = ClientIPResolver(["0.0.0.0/0"], "Forwarded", recursive=True)
    for i in range(20):
        spaces = " " * (MAX_HEADER_LEN - 40) + f"x{i}, for=10.0.0.1"
        quoted = 'for="' + "\t" * (MAX_HEADER_LEN - 40) + f'"x{i}, for=10.0.0.1'
        for header in (spaces, quoted):
            assert r.resolve(PEER, [header]) == Resolution("10.0.0.1", "header", 0)


def test_long_headers_are_not_cached() -> None:
    """A long forwarding header is resolved but not kept, so hostile headers cannot fill memory."""
    r = ClientIPResolver(TRUSTED, "X-Forwarded-For", recursive=True)
    for i in range(50):
        got = r.resolve("203.0.113.1", [f"192.0.2.{i}, " + "9" * 2000])
        assert got == Resolution("203.0.113.1", "peer", -1)
    assert len(r._resolve_cache) == 0
    r.resolve("203.0.113.1", ["192.0.2.1"])
    assert len(r._resolve_cache) == 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["\x1c192.0.2.1"], Resolution(PEER, "peer", -1)),
        (["192.0.2.1\u00a0"], Resolution(PEER, "peer", -1)),
        (["\t192.0.2.1 "], Resolution("192.0.2.1", "header", 0)),
        (["192.0.2.1 192.0.2.2"], Resolution(PEER, "peer", -1)),
        (['"192.0.2.1"'], Resolution(PEER, "peer", -1)),
        (["[192.0.2.1]"], Resolution(PEER, "peer", -1)),
        (["192.0.2.1:"], Resolution(PEER, "peer", -1)),
        (["[2001:db8::1]:"], Resolution(PEER, "peer", -1)),
        (["\u0661.2.3.4"], Resolution(PEER, "peer", -1)),
    ],
)
def test_xff_elements_are_bare_addresses(values: list[str], expected: Resolution) -> None:
    """An X-Forwarded-For element is an address with optional port and HTTP whitespace only."""
    assert XFF.resolve(PEER, values) == expected


def test_resolve_forwarded_from_untrusted_peer_is_peer() -> None:
    """A Forwarded header from an untrusted peer is ignored."""
    assert FWD.resolve("203.0.113.5", ["for=192.0.2.60"]) == Resolution("203.0.113.5", "peer", -1)


# --- overlong headers ----------------------------------------------------------------------------


def test_resolve_stops_after_max_hops() -> None:
    """A chain of more than MAX_HOPS trusted hops stops at the MAX_HOPS-th hop from the right."""
    hops = [f"10.0.{i // 256}.{i % 256}" for i in range(MAX_HOPS + 20)]
    header = ", ".join(["198.51.100.1", *hops])
    got = XFF.resolve(PEER, [header])
    assert got == Resolution(hops[-MAX_HOPS], "header", MAX_HOPS - 1)


def test_resolve_overlong_header_keeps_rightmost_part() -> None:
    """A header past MAX_HEADER_LEN is judged on its rightmost part."""
    header = "1.2.3.4, " + "x" * (MAX_HEADER_LEN * 2) + ", 5.6.7.8, 10.0.0.1"
    assert XFF.resolve(PEER, [header]) == Resolution("5.6.7.8", "header", 1)


def test_resolve_overlong_header_drops_the_cut_element() -> None:
    """The element split by the length cut is dropped, never read as a shorter address."""
    padded = " " * 290 + "10.0.0.2"
    tail = "0.0.0.1," + ",".join([padded] * 50)
    tail = tail + " " * (MAX_HEADER_LEN - len(tail))  # exactly MAX_HEADER_LEN characters
    assert len(tail) == MAX_HEADER_LEN
    header = "203.0.113.9,11" + tail  # the cut element is "110.0.0.1"
    got = XFF.resolve(PEER, [header])
    assert got == Resolution("10.0.0.2", "header", 49)


def test_resolve_single_overlong_element_is_peer() -> None:
    """One enormous element without commas yields the peer."""
    assert XFF.resolve(PEER, ["9" * (MAX_HEADER_LEN * 3)]) == Resolution(PEER, "peer", -1)


# --- properties ----------------------------------------------------------------------------------

_ELEMENT = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4, network="10.0.0.0/8").map(str),
    st.ip_addresses(v=6, network="fd00::/8").map(str),
    st.ip_addresses(v=4).map(lambda a: f"{a}:{a.packed[0] * 200}"),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:443"),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.sampled_from(["unknown", "_hidden", "fe80::1%eth0", "", " ", "[::1", "a.b.c.d"]),
    st.text(max_size=20),
)
_XFF_VALUE = st.one_of(st.text(max_size=80), st.lists(_ELEMENT, max_size=8).map(", ".join))
_PEER = st.one_of(
    st.just(PEER),
    st.just("::1"),
    st.just("::ffff:127.0.0.1"),
    st.ip_addresses(v=4, network="10.0.0.0/8").map(str),
    st.ip_addresses().map(str),
    st.text(max_size=20),
)


def _xff_candidates(values: list[str]) -> set[str]:
    return {a for e in ",".join(values).split(",") if (a := parse_addr(e)) is not None}


def _forwarded_candidates(values: list[str]) -> set[str]:
    out: set[str] = set()
    for piece in re.split(r"[,;]", ",".join(values)):
        _, _, val = piece.partition("=")
        for cand in (piece, val, val.strip().strip('"')):
            a = parse_addr(cand)
            if a is not None:
                out.add(a)
    return out


def _norm(peer: str) -> str:
    return parse_addr(peer) or peer


@settings(max_examples=300, deadline=None)
@given(peer=_PEER, values=st.lists(_XFF_VALUE, max_size=4), recursive=st.booleans())
def test_property_xff_result_is_peer_or_from_header(
    peer: str, values: list[str], recursive: bool
) -> None:
    """resolve never raises and yields the normalised peer or an address found in the header."""
    got = (XFF if recursive else XFF_FLAT).resolve(peer, values)
    if got.source == "peer":
        assert got == Resolution(_norm(peer), "peer", -1)
    else:
        assert got.client_ip in _xff_candidates(values)
        assert got.hop >= 0
        ipaddress.ip_address(got.client_ip)


@settings(max_examples=200, deadline=None)
@given(
    peer=_PEER,
    elements=st.lists(
        st.tuples(_ELEMENT, st.booleans(), st.booleans()), max_size=6
    ),
    noise=st.text(max_size=30),
)
def test_property_forwarded_result_is_peer_or_from_header(
    peer: str, elements: list[tuple[str, bool, bool]], noise: str
) -> None:
    """In Forwarded mode too, the result is the normalised peer or a `for=` address of it."""
    parts = []
    for elem, quoted, extra in elements:
        value = f'"{elem}"' if quoted else elem
        parts.append(f"for={value}" + (";proto=https;by=10.0.0.1" if extra else ""))
    values = [", ".join(parts), noise]
    got = FWD.resolve(peer, values)
    if got.source == "peer":
        assert got == Resolution(_norm(peer), "peer", -1)
    else:
        assert got.client_ip in _forwarded_candidates(values)


@settings(max_examples=200, deadline=None)
@given(
    peer=st.one_of(
        st.ip_addresses(v=4, network="203.0.113.0/24").map(str),
        st.ip_addresses(v=6, network="2001:db8::/32").map(str),
        st.text(max_size=20).filter(lambda t: parse_addr(t) is None),
    ),
    values=st.lists(_XFF_VALUE, max_size=4),
)
def test_property_untrusted_peer_is_always_the_result(peer: str, values: list[str]) -> None:
    """From an untrusted peer the result is always the peer, whatever the header says."""
    for resolver in (XFF, XFF_FLAT, FWD):
        assert resolver.resolve(peer, values) == Resolution(_norm(peer), "peer", -1)


def test_parse_addr_caches_only_what_can_be_an_address() -> None:
    """Tokens longer than any address form are parsed (whitespace around one is allowed) but
    never cached: junk in forwarding headers cannot fill the cache with long strings."""
    from gateway.client_ip import _parse_addr_cached

    before = _parse_addr_cached.cache_info().currsize
    assert parse_addr(" " * 70 + "192.0.2.7") == "192.0.2.7"
    assert parse_addr("x" * 500) is None
    assert _parse_addr_cached.cache_info().currsize == before
    fresh = f"2001:db8::{secrets.randbelow(0xFFFF):x}:{secrets.randbelow(0xFFFF):x}"
    assert parse_addr(fresh) is not None
    assert _parse_addr_cached.cache_info().currsize == before + 1
