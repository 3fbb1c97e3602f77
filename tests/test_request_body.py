"""gateway.request_body: the in-flight body budget, inflation bounds and strict JSON."""

from __future__ import annotations

import gzip
import zlib

import pytest

from gateway.errors import GatewayError
from gateway.request_body import Body, BodyBudget, inflate, parse_json


def test_budget_refuses_past_the_bound_but_always_admits_a_lone_body() -> None:
    """Past the bound a body is refused while others are held; alone, it is always admitted,
    also as it grows chunk by chunk."""
    b = BodyBudget(100)
    assert b.reserve(60) and b.held == 60
    assert not b.reserve(50)
    assert b.reserve(40) and b.held == 100
    b.release(100)
    assert b.reserve(500) and b.reserve(300, own=500) and b.held == 800


def test_judged_body_keeps_only_its_size_and_release_is_once() -> None:
    """After judging, a body holds its own size; release returns it once."""
    b = BodyBudget(1000)
    assert b.reserve(300)
    body = Body(b"x" * 100, 300)
    body.judged(b)
    assert (b.held, body.held) == (100, 100)
    assert body.take() == b"x" * 100 and body.data == b""
    body.release(b)
    body.release(b)
    assert b.held == 0


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_inflate_is_bounded(encoding: str) -> None:
    """A compressed body inflates to its content, and past the limit is a 413."""
    plain = b'{"model": "m"}' * 100
    data = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    assert inflate(data, encoding, 10_000) == plain
    with pytest.raises(GatewayError) as err:
        inflate(data, encoding, 100)
    assert err.value.status == 413


def test_raw_deflate_and_garbage() -> None:
    """Raw deflate (no zlib header) is read; garbage is a 400 invalid_json."""
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw = c.compress(b"{}") + c.flush()
    assert inflate(raw, "deflate", 100) == b"{}"
    with pytest.raises(GatewayError) as err:
        inflate(b"not compressed", "gzip", 100)
    assert err.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"", None), (b"[1, 2]", None), (b'{"a": 1}', {"a": 1}),
     (b'\xef\xbb\xbf{"model": "m"}', {"model": "m"}),
     ('{"model": "m"}'.encode("utf-16"), {"model": "m"})],
)
def test_parse_json_reads_what_the_upstream_reads(data: bytes, expected: object) -> None:
    """Objects parse; other JSON values and empty bodies have nothing to judge; a BOM and
    UTF-16 are read through."""
    assert parse_json("POST", data) == expected


@pytest.mark.parametrize(
    "data",
    [b'{"model": "a", "model": "b"}', b'{"model": "a", "mod\\u0065l": "b"}',
     b'{"max_tokens": 1, "max_tokens": 9}', b"[" * 100_000, b'{"a": '],
)
def test_parse_json_refuses_what_could_be_read_two_ways(data: bytes) -> None:
    """Duplicate keys (plain or escaped), nesting too deep and broken JSON are ValueErrors."""
    with pytest.raises(ValueError):
        parse_json("POST", data)
