"""Unit tests for gateway.store.fastpath: the RESP encoding of a pipelined call (the
connection itself runs against real Redis in tests/contract/)."""

from __future__ import annotations

import hiredis
from hypothesis import given
from hypothesis import strategies as st

from gateway.store.fastpath import _encode


def test_encode_is_a_resp_array_of_bulk_strings() -> None:
    """Arguments become a RESP array of bulk strings; numbers are sent as their text."""
    assert _encode(("EVALSHA", "abc", 1, b"k\r\n")) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n$3\r\nk\r\n\r\n")


def test_encode_counts_bytes_not_characters() -> None:
    """A non-ASCII argument's length is its UTF-8 byte count."""
    assert _encode(("é",)) == b"*1\r\n$2\r\n\xc3\xa9\r\n"


@given(st.lists(st.one_of(st.binary(), st.text(), st.integers()), max_size=8))
def test_encode_is_read_back_by_a_resp_parser(args: list[bytes | str | int]) -> None:
    """hiredis parses the encoding back into the same arguments, as bytes."""
    reader = hiredis.Reader()
    reader.feed(_encode(tuple(args)))
    expected = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    assert reader.gets() == expected
