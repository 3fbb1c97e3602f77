"""JSON on the hot path: orjson where it gives what the standard library gives, the standard
library where it would not (docs/architecture.md §9)."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# 19 digits in a row: maybe an integer outside 64 bits (past 2**64 - 1 or below -2**63),
# which orjson reads as a float.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def json_loads(text: bytes) -> Any:
    """json.loads' document, faster: orjson reads strict UTF-8 RFC 8259 JSON in about a fifth
    of json's time and gives the same document, except integers outside 64 bits (floats there),
    so a text with 19 digits in a row goes to json; so does whatever orjson refuses (NaN, a
    lone surrogate, UTF-16, nesting past 1024 levels). One difference stays: json gives up
    nesting a little before 1024 (at the interpreter's recursion limit), where orjson reads on;
    a caller that writes such a document again with json catches RecursionError."""
    if _LONG_DIGITS.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


def json_dumps(obj: Any, newline: bool = False) -> bytes:
    """`obj` as UTF-8 JSON (with "\\n" appended when `newline`): orjson, about a tenth of
    json.dumps' time, or json.dumps for what orjson refuses (an integer past 64 bits that an
    upstream reported, a lone surrogate a client sent in a string), escaped to ASCII there."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE if newline else None)
    except TypeError:
        out = json.dumps(obj).encode()
        return out + b"\n" if newline else out
