"""gateway.jsonio: the fast JSON reader and writer give what the standard library gives."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.jsonio import json_dumps, json_loads

# JSON's values (json.dumps would write infinities as `Infinity`, which is not JSON; orjson
# writes null: neither reader nor writer promises anything for them).
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_JSON, st.booleans())
def test_loads_reads_as_json_does(doc: object, ascii_only: bool) -> None:
    """Any document (integers of any size, floats, any text, surrogates escaped or not) reads
    back exactly as json.loads reads it."""
    data = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    expected = json.loads(data)
    got = json_loads(data)
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert type(got) is type(expected)


@pytest.mark.parametrize("data", [
    b"18446744073709551616", b"-9223372036854775809", b"[NaN, Infinity]", b'"\\ud800"',
    "[1]".encode("utf-16"), b"[" * 2000 + b"]" * 2000])
def test_loads_leaves_what_orjson_reads_differently_to_json(data: bytes) -> None:
    """Integers outside 64 bits stay exact integers; what orjson refuses, json decides."""
    try:
        expected = json.loads(data)
    except RecursionError:
        with pytest.raises(RecursionError):
            json_loads(data)
        return
    assert json.dumps(json_loads(data)) == json.dumps(expected)


def test_loads_refuses_what_json_refuses() -> None:
    with pytest.raises(ValueError):
        json_loads(b'{"a": ')


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_dumps_writes_what_json_reads_back(doc: object) -> None:
    """Whatever the document, the bytes are JSON that reads back to it, lone surrogates and
    integers past 64 bits included."""
    out = json_dumps(doc)
    assert json.dumps(json.loads(out), sort_keys=True) == json.dumps(doc, sort_keys=True)


def test_dumps_newline_and_fallback() -> None:
    assert json_dumps({"a": 1}, newline=True) == b'{"a":1}\n'
    big = json_dumps({"n": 2**70, "s": "\ud800"}, newline=True)
    assert big.endswith(b"\n") and big.isascii()
    assert json.loads(big) == {"n": 2**70, "s": "\ud800"}
