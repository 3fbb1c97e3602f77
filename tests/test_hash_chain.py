"""Unit tests for gateway.hash_chain: sealing lines, and verifying chains (several
interleaved in one file) that are whole, with a line removed, altered or inserted."""

from __future__ import annotations

import hashlib
import io
import json

from gateway.hash_chain import GENESIS, Broken, HashChain, Verified, canonical, verify_lines


def _lines(chain: HashChain, n: int, **extra: object) -> list[str]:
    buf = io.StringIO()
    for i in range(n):
        chain.write({"event": "e", "i": i, **extra}, buf)
    return buf.getvalue().splitlines()


def test_a_line_hash_is_sha256_over_prev_hash_and_canonical_json() -> None:
    """hash = SHA-256(prev_hash + canonical JSON without prev_hash and hash), the first
    prev_hash 64 zeros, each next prev_hash the previous hash."""
    lines = _lines(HashChain("c1"), 2, text="é")
    first, second = (json.loads(x) for x in lines)
    assert first["prev_hash"] == GENESIS and second["prev_hash"] == first["hash"]
    body = {k: v for k, v in first.items() if k not in ("hash", "prev_hash")}
    assert canonical(body) == '{"chain_id":"c1","event":"e","i":0,"text":"\\u00e9"}'
    assert first["hash"] == hashlib.sha256((GENESIS + canonical(body)).encode()).hexdigest()


def test_whole_interleaved_chains_verify() -> None:
    """Lines of two processes interleaved in one file verify as two whole chains."""
    a, b = _lines(HashChain("a"), 3), _lines(HashChain("b"), 3)
    mixed = [a[0], b[0], b[1], a[1], a[2], b[2], ""]
    assert verify_lines(mixed) == Verified(6, 2)


def test_a_removed_line_is_named_by_its_position() -> None:
    """Removing line 3 makes the line now at 3 fail its prev_hash; removing the first line
    fails the new first line."""
    lines = _lines(HashChain("a"), 5)
    broken = verify_lines(lines[:2] + lines[3:])
    assert isinstance(broken, Broken) and broken.line == 3 and "removed" in broken.reason
    first = verify_lines(lines[1:])
    assert isinstance(first, Broken) and first.line == 1


def test_an_altered_line_is_named() -> None:
    """Changing a value fails that line's hash; re-hashing it fails the next line's link."""
    lines = _lines(HashChain("a"), 4)
    edited = lines[:]
    edited[1] = edited[1].replace('"i":1', '"i":7')
    broken = verify_lines(edited)
    assert isinstance(broken, Broken) and broken.line == 2 and "altered" in str(broken)
    obj = json.loads(edited[1])
    obj.pop("hash")
    prev = obj.pop("prev_hash")
    obj["prev_hash"] = prev
    obj["hash"] = hashlib.sha256((prev + canonical(
        {k: v for k, v in obj.items() if k not in ("hash", "prev_hash")})).encode()).hexdigest()
    edited[1] = json.dumps(obj)
    relinked = verify_lines(edited)
    assert isinstance(relinked, Broken) and relinked.line == 3


def test_an_unchained_or_non_json_line_breaks_the_file() -> None:
    """An inserted line without the chain fields, or not JSON, is named."""
    lines = _lines(HashChain("a"), 2)
    inserted = verify_lines([lines[0], '{"event": "x"}', lines[1]])
    assert isinstance(inserted, Broken) and inserted.line == 2
    assert "not a chained line" in inserted.reason
    bad = verify_lines([lines[0], "garbage", lines[1]])
    assert isinstance(bad, Broken) and bad.line == 2
