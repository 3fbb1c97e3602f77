"""The PROXY protocol parser: v1 and v2, TCP4 and TCP6, LOCAL, and every malformed form
refused with its reason; fuzz-ish inputs never raise anything but ProxyHeaderError."""

from __future__ import annotations

import random

import pytest

from gateway.proxy_protocol import (
    REASONS,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
    sniff,
    v1_header,
    v2_header,
)


def _reason(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as info:
        parse(data)
    assert isinstance(info.value, ValueError)
    return info.value.reason


def test_v1_tcp4_source_and_length() -> None:
    """A v1 TCP4 line gives its source, destination and ports, and the bytes it took."""
    data = b"PROXY TCP4 192.0.2.1 127.0.0.1 56324 8080\r\nGET / HTTP/1.1\r\n"
    h = parse(data)
    assert h == ProxyHeader(version=1, length=data.index(b"GET"), family="tcp4",
                            source="192.0.2.1", source_port=56324, destination="127.0.0.1",
                            destination_port=8080)


def test_v1_tcp6_source() -> None:
    """A v1 TCP6 line gives the IPv6 source in canonical form."""
    h = parse(b"PROXY TCP6 2001:DB8:1::0001 ::1 1 65535\r\n")
    assert h is not None and h.family == "tcp6" and h.source == "2001:db8:1::1"
    assert h.destination_port == 65535


def test_v1_unknown_keeps_the_peer() -> None:
    """A v1 UNKNOWN line is accepted with no source (the socket's peer stays)."""
    h = parse(b"PROXY UNKNOWN whatever follows\r\nrest")
    assert h is not None and h.source is None and h.length == len(b"PROXY UNKNOWN whatever "
                                                                  b"follows\r\n")


def test_v1_incomplete_is_none() -> None:
    """A v1 line without its CRLF yet is incomplete, not an error, below 107 bytes."""
    assert parse(b"PROXY TCP4 192.0.2.1 127.0") is None
    assert parse(b"PRO") is None


@pytest.mark.parametrize(("line", "reason"), [
    (b"PROXY TCP4 192.0.2.300 127.0.0.1 1 2\r\n", "address"),
    (b"PROXY TCP4 2001:db8::1 127.0.0.1 1 2\r\n", "address"),
    (b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n", "address"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 1 65536\r\n", "address"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 01 2\r\n", "address"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 -1 2\r\n", "address"),
    (b"PROXY TCP4 192.0.2.01 127.0.0.1 1 2\r\n", "address"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "address"),
    (b"PROXY TCP4 192.0.2.1  127.0.0.1 1 2\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 1\r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2 3\r\n", "malformed"),
    (b"PROXY UDP4 192.0.2.1 127.0.0.1 1 2\r\n", "family"),
    (b"PROXY \r\n", "malformed"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\n", "malformed"),
    (b"PROXY TCP4 \xff.0.2.1 127.0.0.1 1 2\r\n", "malformed"),
    (b"PROXY TCP4 " + b"1" * 120, "malformed"),
])
def test_v1_malformed(line: bytes, reason: str) -> None:
    """A bad v1 address, port, spacing, protocol or line end is refused with its reason."""
    assert _reason(line) == reason


def test_v2_tcp4_with_tlvs() -> None:
    """A v2 PROXY TCP4 header gives its source; TLVs after the addresses are skipped."""
    tlv = bytes([0x04, 0x00, 0x03]) + b"abc"  # PP2_TYPE_NOOP
    data = v2_header("192.0.2.1", "127.0.0.1", 40000, 8080, tlvs=tlv)
    h = parse(data + b"GET")
    assert h == ProxyHeader(version=2, length=len(data), family="tcp4", source="192.0.2.1",
                            source_port=40000, destination="127.0.0.1", destination_port=8080)


def test_v2_tcp6() -> None:
    """A v2 PROXY TCP6 header gives the IPv6 source."""
    h = parse(v2_header("2001:db8:2::5", "::1", 1, 2))
    assert h is not None and h.family == "tcp6" and h.source == "2001:db8:2::5"


def test_v2_local_and_unspec_keep_the_peer() -> None:
    """v2 LOCAL (health checks), even with an address block, and PROXY UNSPEC carry no
    source."""
    local = parse(v2_header(None, local=True))
    assert local is not None and local.source is None and local.version == 2
    with_block = v2_header("192.0.2.1", "127.0.0.1", 1, 2)
    as_local = with_block[:12] + b"\x20" + with_block[13:]
    h = parse(as_local)
    assert h is not None and h.source is None and h.length == len(with_block)
    unspec = V2_SIGNATURE + b"\x21\x00\x00\x00"
    h = parse(unspec)
    assert h is not None and h.source is None


def test_v2_incomplete_is_none() -> None:
    """A v2 header cut anywhere before its declared length is incomplete."""
    data = v2_header("192.0.2.1", "127.0.0.1", 1, 2)
    for cut in range(len(data)):
        assert parse(data[:cut]) is None


@pytest.mark.parametrize(("data", "reason"), [
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version"),
    (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "version"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "command"),
    (V2_SIGNATURE + b"\x2f\x11\x00\x0c" + bytes(12), "command"),
    (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "address"),
    (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "address"),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "family"),
    (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), "family"),
    (V2_SIGNATURE + b"\x21\x41\x00\x00", "family"),
    (V2_SIGNATURE + b"\x21\x10\x00\x0c" + bytes(12), "family"),
])
def test_v2_malformed(data: bytes, reason: str) -> None:
    """A bad v2 version, command, family or short address block is refused with its
    reason."""
    assert _reason(data) == reason


def test_not_a_header() -> None:
    """HTTP is no header: `sniff` says 0 at the first differing byte and `parse` refuses it
    as `signature`; a prefix of either signature is undecided."""
    assert sniff(b"GET / HTTP/1.1\r\n") == 0
    assert sniff(b"POST") == 0
    assert sniff(b"PROX") is None
    assert sniff(b"\r\n\r\n") is None
    assert sniff(b"\r\n\r\nGET") == 0
    assert sniff(b"PROXY ") == 1
    assert sniff(V2_SIGNATURE) == 2
    assert _reason(b"GET / HTTP/1.1\r\n") == "signature"
    assert _reason(b"\r\n\r\n\x00\r\nQUIX\n" + bytes(8)) == "signature"


def test_builders_round_trip() -> None:
    """The v1 and v2 builders produce what the parser reads back."""
    h1 = parse(v1_header("2001:db8::1", "::1", 5, 6))
    assert h1 is not None and (h1.source, h1.source_port) == ("2001:db8::1", 5)
    h2 = parse(v2_header("198.51.100.7", "127.0.0.1", 7, 8))
    assert h2 is not None and (h2.source, h2.destination_port) == ("198.51.100.7", 8)


def test_fuzz_never_raises_anything_else() -> None:
    """Random mutations of valid headers give a header, None or ProxyHeaderError with a known
    reason, and a parsed header never claims more bytes than it was given."""
    rng = random.Random(1416)
    seeds = [v1_header("192.0.2.1", "127.0.0.1", 1, 2), v1_header("::1", "::1", 1, 2),
             v2_header("192.0.2.1", "127.0.0.1", 1, 2), v2_header("2001:db8::1", "::1", 1, 2),
             v2_header(None, local=True), b"PROXY UNKNOWN\r\n"]
    for _ in range(20000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and pos < len(data):
                data[pos] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = bytes([rng.randrange(256)])
            else:
                del data[pos:pos + rng.randint(1, 4)]
        try:
            h = parse(bytes(data))
        except ProxyHeaderError as exc:
            assert exc.reason in REASONS
            continue
        if h is not None:
            assert 0 < h.length <= len(data)
            assert h.source is None or h.family in ("tcp4", "tcp6")
