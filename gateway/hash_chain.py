"""The tamper-evident log (docs/logs.md "Hash chain"): with `log.hash_chain: true` every line a
process prints carries `chain_id`, `prev_hash` and `hash`, where

    hash = SHA-256( prev_hash  ||  canonical JSON of the line without `prev_hash` and `hash` )

(hex, lowercase; `prev_hash` as its 64 hex characters; the first line of a chain has 64 zeros),
and the canonical JSON is the object with its keys sorted, no whitespace, non-ASCII as \\uXXXX
escapes (Python's `json.dumps(obj, sort_keys=True, separators=(",", ":"))`).

Each process has its own chain (a random `chain_id` drawn at start), so one file may hold the
interleaved lines of several instances or workers; `verify_lines` follows every chain.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

GENESIS = "0" * 64


def canonical(obj: Any, default: Any = None) -> str:
    """The canonical JSON of a line's object (keys sorted, no whitespace, ASCII); `default`
    turns what JSON has no type for into what it has, as json.dumps' own."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default)


def link_hash(prev_hash: str, body: str) -> str:
    """SHA-256 (hex) over the previous hash and a line's canonical JSON."""
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


class HashChain:
    """This process's chain: appends `prev_hash` and `hash` to canonical line bodies and writes
    them, one at a time (the hash and the write under one lock, so lines print in chain
    order whichever thread logs)."""

    __slots__ = ("_lock", "chain_id", "last")

    def __init__(self, chain_id: str | None = None) -> None:
        self.chain_id = chain_id or secrets.token_hex(8)
        self.last = GENESIS
        self._lock = threading.Lock()

    def seal(self, body: str) -> str:
        """The printed line (without newline) for a canonical body holding `chain_id` and
        neither `prev_hash` nor `hash`; advances the chain. The caller writes it at once."""
        prev = self.last
        digest = link_hash(prev, body)
        self.last = digest
        return f'{body[:-1]},"prev_hash":"{prev}","hash":"{digest}"}}'

    def write(self, fields: dict[str, Any], stream: TextIO, default: Any = None) -> None:
        """Seal `fields` (adding `chain_id`) and write the line to `stream`, in chain order."""
        fields["chain_id"] = self.chain_id
        body = canonical(fields, default)
        with self._lock:
            stream.write(self.seal(body) + "\n")


@dataclass(frozen=True, slots=True)
class Broken:
    """Where a chain breaks: the 1-based line number and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Verified:
    lines: int
    chains: int


def verify_lines(lines: Iterable[str]) -> Verified | Broken:
    """Follow every chain of a log file's lines: Verified when each is whole from its first
    line, else the first line (in file order) where one breaks. A line that is altered fails
    its own hash; a removed line makes the next line of its chain fail its `prev_hash` (named
    by the line number the removed line had); a line that is not a chained JSON object fails.
    Trailing empty lines are ignored; removing a chain's last lines cannot be seen here."""
    last: dict[str, str] = {}
    where: dict[str, int] = {}
    items = list(lines)
    while items and not items[-1].strip():
        items.pop()
    for n, raw in enumerate(items, 1):
        try:
            obj = json.loads(raw)
        except ValueError:
            return Broken(n, "not a JSON object (a line was altered or inserted)")
        if not isinstance(obj, dict):
            return Broken(n, "not a JSON object (a line was altered or inserted)")
        digest, prev, chain = obj.pop("hash", None), obj.pop("prev_hash", None), obj.get(
            "chain_id")
        if not (isinstance(digest, str) and isinstance(prev, str) and isinstance(chain, str)):
            return Broken(n, "not a chained line (no chain_id, prev_hash or hash): altered, "
                             "inserted, or printed with log.hash_chain off")
        if link_hash(prev, canonical(obj)) != digest:
            return Broken(n, "altered: its hash does not match its content")
        expected = last.get(chain, GENESIS)
        if prev != expected:
            if chain not in last:
                return Broken(n, f"the first line(s) of chain {chain} were removed (its "
                                 "prev_hash is not the start of a chain)")
            return Broken(n, f"a line of chain {chain} was removed or altered before it "
                             f"(after line {where[chain]}): its prev_hash does not match")
        last[chain], where[chain] = digest, n
    return Verified(len(items), len(last))
