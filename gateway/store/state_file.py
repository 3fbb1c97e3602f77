"""The embedded store's state file: keys, the keys epoch and the policy as one JSON document
replaced atomically on every change, the audit stream and the usage ledger's additions as
JSON lines beside it (`<file>.audit`, `<file>.usage`), and a lock (`<file>.lock`) that makes
one process its owner."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.errors import StoreError
from gateway.store.base import KeyRecord, StoredPolicy, Tally, UsageKey
from gateway.store.ledger import Ledger

STATE_FORMAT = "gateway-state"


class StateFileError(ValueError):
    """A state file that cannot be used at startup; the message names the file and why."""


@dataclass(slots=True)
class State:
    """What a state file holds (limits state is never written: it stays in memory)."""

    keys: dict[str, KeyRecord] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    keys_epoch: int = 0
    policy: StoredPolicy | None = None
    audit: list[dict[str, Any]] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)


def dump_state(keys: dict[str, KeyRecord], used: dict[str, float], keys_epoch: int,
               policy: StoredPolicy | None) -> str:
    return json.dumps({
        "format": STATE_FORMAT,
        "written_at": time.time(),
        "keys_epoch": keys_epoch,
        "keys": {k: asdict(r) for k, r in keys.items()},
        "used": used,
        "policy": None if policy is None else asdict(policy),
    }, sort_keys=True)


def parse_state(text: str) -> State:
    """The state in `text`; ValueError saying what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise ValueError(f'not a gateway state file (no "format": "{STATE_FORMAT}")')
    try:
        p = doc["policy"]
        policy = None if p is None else StoredPolicy(
            int(p["version"]), str(p["doc"]), float(p["applied_at"]), str(p["actor"]))
        if policy is not None:
            json.loads(policy.doc)
        return State({k: KeyRecord(**v) for k, v in doc["keys"].items()},
                     {str(k): float(v) for k, v in doc["used"].items()},
                     int(doc["keys_epoch"]), policy)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed ({type(exc).__name__}: {exc})") from None


def write_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` so that a crash leaves either the old or the new file whole:
    a temporary file beside it (mode 0600), fsync, rename over it, fsync of the folder."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _events_text(events: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)


class StateFile:
    """One state file, owned (locked) by this process from `open` until `close`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.audit_path = path + ".audit"
        self.audit_lines = 0  # lines in the audit file: compacted when far past the bound
        self.usage_path = path + ".usage"
        self.usage_lines = 0  # additions since the usage file's snapshot
        self._lock_fd: int | None = None

    def open(self, audit_maxlen: int) -> State:
        """Lock the file and read it (a missing file is written empty now, so a path that
        cannot be written fails at startup). StateFileError names the file and the reason."""
        self._lock()
        try:
            return self._read(audit_maxlen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None

    def _lock(self) -> None:
        # The file is rewritten whole on every change: a second gateway on it would overwrite
        # the first's changes, so it is refused.
        lock = self.path + ".lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateFileError(f"state file {self.path}: cannot create {lock}: "
                                 f"{exc.strerror or exc} (its folder must exist and be "
                                 "writable)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateFileError(f"state file {self.path} is in use by another gateway "
                                 "process (one process owns it)") from None
        self._lock_fd = fd

    def _read(self, audit_maxlen: int) -> State:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            state = State()
            _rewrite(self.path, "state", dump_state({}, {}, 0, None))
        except (OSError, UnicodeDecodeError) as exc:
            raise self._bad(f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
        else:
            try:
                state = parse_state(text)
            except ValueError as exc:
                raise self._bad(str(exc)) from None
        state.audit = self._read_audit(audit_maxlen)
        state.ledger = self._read_usage()
        return state

    def _bad(self, reason: str) -> StateFileError:
        return StateFileError(f"state file {self.path}: {reason}; fix it or move it away "
                              "(the gateway never resets it)")

    def _read_audit(self, maxlen: int) -> list[dict[str, Any]]:
        """The newest `maxlen` events of the audit file; the file is rewritten with them when
        it held more, or ended in a line cut short by a crash."""
        events: list[dict[str, Any]] = []
        read = _read_lines(self.audit_path, "audit", lambda line: events.append(json.loads(line)))
        if read is None:
            return events
        whole, cut_short = read
        events = events[-maxlen:]
        self.audit_lines = whole
        if cut_short or whole > len(events):
            # drop the cut-short line (the next append would join it) and the excess
            _rewrite(self.audit_path, "audit", _events_text(events))
            self.audit_lines = len(events)
        return events

    def _read_usage(self) -> Ledger:
        """The ledger of the usage file: its snapshot line (if any), then each addition
        replayed at the time it was made; a line cut short by a crash is dropped."""
        ledger = Ledger()
        read = _read_lines(self.usage_path, "usage", lambda line: _replay(ledger, line))
        if read is None:
            return ledger
        whole, cut_short = read
        ledger.prune(time.time())
        self.usage_lines = whole
        if cut_short:
            # a snapshot of what the whole lines hold (the next append would join it)
            _rewrite(self.usage_path, "usage", json.dumps({"snapshot": ledger.snapshot()}) + "\n")
            self.usage_lines = 0
        return ledger

    async def append_usage(self, cells: list[tuple[UsageKey, Tally]], retention_days: int,
                           now: float) -> None:
        """Append one addition to the ledger (fsynced); StoreError when it cannot."""
        line = json.dumps({"t": now, "retention_days": retention_days, "cells": [
            [k.day, k.reseller, k.key_id, k.customer_id, k.model,
             t.requests, t.input_tokens, t.output_tokens] for k, t in cells]}) + "\n"
        try:
            await asyncio.to_thread(_append_line, self.usage_path, line)
        except OSError as exc:
            raise StoreError(f"cannot write the usage file: {exc.strerror or exc}") from None
        self.usage_lines += 1

    async def compact_usage(self, snapshot: dict[str, Any]) -> None:
        """Rewrite the usage file as one snapshot of the ledger (`Ledger.snapshot`)."""
        try:
            await asyncio.to_thread(write_atomic, self.usage_path,
                                    json.dumps({"snapshot": snapshot}) + "\n")
        except OSError:
            return  # the longer file is still valid; a later addition tries again
        self.usage_lines = 0

    async def save(self, text: str) -> None:
        """Replace the state with `text` (a `dump_state`); StoreError when it cannot."""
        try:
            await asyncio.to_thread(write_atomic, self.path, text)
        except OSError as exc:
            raise StoreError(f"cannot write the state file: {exc.strerror or exc}") from None

    async def append_audit(self, event: dict[str, Any]) -> None:
        """Append one event (fsynced); StoreError when it cannot."""
        try:
            await asyncio.to_thread(_append_line, self.audit_path, json.dumps(event) + "\n")
        except OSError as exc:
            raise StoreError(f"cannot write the audit file: {exc.strerror or exc}") from None
        self.audit_lines += 1

    async def compact_audit(self, events: list[dict[str, Any]]) -> None:
        """Rewrite the audit file with `events` alone (the ones the stream still keeps)."""
        try:
            await asyncio.to_thread(write_atomic, self.audit_path, _events_text(events))
        except OSError:
            return  # the longer file is still valid; a later append tries again
        self.audit_lines = len(events)


def _read_lines(path: str, what: str, take: Callable[[str], object]) -> tuple[int, bool] | None:
    """Hand each whole line of the JSON-lines file `path` to `take`, in order; None when the
    file is missing, else how many whole lines it holds and whether a last line was cut short
    by a crash (an append that never reached its newline). The audit and usage files are read
    alike: a line `take` cannot use is a StateFileError naming the `what` file and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StateFileError(f"{what} file {path}: cannot read: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    tail = lines.pop()  # "" after a final newline; else a line cut short by a crash
    for n, line in enumerate(lines, 1):
        try:
            take(line)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise StateFileError(f"{what} file {path}: line {n} is malformed; fix it or move "
                                 "it away (the gateway never resets it)") from None
    return len(lines), bool(tail)


def _rewrite(path: str, what: str, text: str) -> None:
    """`write_atomic` at startup, where a failure is a StateFileError naming the file."""
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise StateFileError(f"{what} file {path}: cannot write: {exc.strerror or exc}") from None


def _replay(ledger: Ledger, line: str) -> None:
    """One line of the usage file into `ledger`: a snapshot loaded, or an addition committed
    at the time it was made."""
    entry = json.loads(line)
    if "snapshot" in entry:
        ledger.load(entry["snapshot"])
    else:
        ledger.commit(_cells(entry["cells"]), int(entry["retention_days"]), float(entry["t"]))


def _cells(rows: list[list[Any]]) -> list[tuple[UsageKey, Tally]]:
    """The cells of an addition line (as `append_usage` writes them)."""
    out = []
    for day, reseller, key_id, customer_id, model, req, inp, outp in rows:
        out.append((UsageKey(str(day), str(reseller), str(key_id),
                             None if customer_id is None else str(customer_id), str(model)),
                    Tally(int(req), int(inp), int(outp))))
    return out
