"""The embedded store: the same contract and limit semantics as Redis, in process (one instance)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Collection, Mapping
from typing import Any

from gateway.errors import StoreError
from gateway.store.base import (
    SCREENING_SET_CAP,
    AdmitRequest,
    AdmitResult,
    EventHandler,
    KeyRecord,
    PeriodUse,
    PolicyConflict,
    ScreeningTally,
    ScreeningWindow,
    Settlement,
    Store,
    StoredPolicy,
    Subject,
    Tally,
    UsageKey,
    UsageNotAdded,
    UsageRow,
    check_screening,
    check_usage,
)
from gateway.store.gcra import Limiter
from gateway.store.ledger import Ledger
from gateway.store.state_file import StateFile, StateFileError, dump_state

__all__ = ["MemoryStore", "StateFileError"]

# Additions appended to `<state_file>.usage` before it is rewritten as one snapshot: about an
# hour of flushes once a second.
USAGE_COMPACT_LINES = 3600


class MemoryStore(Store):
    """Everything in this process; change events go straight to the subscribers.

    With `state_file`, keys (and their last use), the keys epoch and the policy are written to
    that file atomically on every change, before the change is published, and loaded at
    construction; the audit stream is appended to `<state_file>.audit` and each addition to
    the usage ledger to `<state_file>.usage` (JSON lines). A change that cannot be written
    raises StoreError and is not kept. Limits state (buckets, leases) stays in memory. A
    state file that cannot be read is a StateFileError, never a reset. The usage ledger
    (ledger.py) is pruned by its retention as it is added to.

    Admissions, settlements and leases are `limiter`'s (gcra.py; the factory builds one per
    store, as does a store constructed without one)."""

    in_process = True
    #: Additions appended to the usage file before it is rewritten as one snapshot.
    usage_compact_lines: int = USAGE_COMPACT_LINES

    def __init__(self, state_file: str | None = None, limiter: Limiter | None = None) -> None:
        self.keys: dict[str, KeyRecord] = {}
        self.used: dict[str, float] = {}
        self.policy: StoredPolicy | None = None
        self.keys_epoch = 0
        self.handlers: list[EventHandler] = []
        self.limiter = limiter if limiter is not None else Limiter()
        self.state_file = state_file
        self._file: StateFile | None = None
        self._write_lock = asyncio.Lock()  # one change written at a time, in order
        self.ledger = Ledger()
        # (reseller, hour) -> (expires at, the bucket); (reseller, signal) -> expires at
        self._screening: dict[tuple[str, int], tuple[float, ScreeningTally]] = {}
        self._screening_marks: dict[tuple[str, str], float] = {}
        if state_file is not None:
            self._file = StateFile(state_file)
            state = self._file.open(self.audit_maxlen)
            self.keys, self.used = state.keys, state.used
            self.keys_epoch, self.policy = state.keys_epoch, state.policy
            if state.audit:
                self._audit = deque(state.audit)
            self.ledger = state.ledger

    async def _save(self) -> None:
        """Write the state file (with `_write_lock` held); StoreError when it fails."""
        if self._file is not None:
            await self._file.save(dump_state(self.keys, self.used, self.keys_epoch,
                                             self.policy))

    # --- the contract -----------------------------------------------------------------------
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self.handlers.clear()
        if self._file is not None:
            self._file.close()

    async def ping(self) -> None:
        return None

    async def _publish(self, event: dict[str, Any]) -> None:
        for h in list(self.handlers):
            await h(event)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        rec = self.keys.get(key_id)
        return KeyRecord.from_json(rec.to_json()) if rec else None

    async def list_keys(self) -> list[KeyRecord]:
        return [KeyRecord.from_json(r.to_json()) for r in self.keys.values()]

    async def put_key(self, rec: KeyRecord) -> int:
        async with self._write_lock:
            old = self.keys.get(rec.key_id)
            self.keys[rec.key_id] = KeyRecord.from_json(rec.to_json())
            self.keys_epoch += 1
            try:
                await self._save()
            except StoreError:
                self.keys_epoch -= 1
                if old is None:
                    del self.keys[rec.key_id]
                else:
                    self.keys[rec.key_id] = old
                raise
            epoch = self.keys_epoch
        await self._publish({"kind": "key", "key_id": rec.key_id, "epoch": epoch})
        return epoch

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        async with self._write_lock:
            self.used.update(last_used)
            await self._save()

    async def last_used(self, key_ids: list[str]) -> dict[str, float]:
        return {k: self.used[k] for k in key_ids if k in self.used}

    async def get_policy(self) -> StoredPolicy | None:
        return self.policy

    async def put_policy(self, doc: str, actor: str, expected_version: int | None = None) -> int:
        async with self._write_lock:
            old = self.policy
            live = old.version if old else 0
            if expected_version is not None and expected_version != live:
                raise PolicyConflict(live, expected_version)
            json.loads(doc)
            self.policy = StoredPolicy(live + 1, doc, time.time(), actor)
            try:
                await self._save()
            except StoreError:
                self.policy = old
                raise
        await self._publish({"kind": "policy", "version": live + 1})
        return live + 1

    async def versions(self) -> tuple[int, int]:
        return self.keys_epoch, self.policy.version if self.policy else 0

    async def subscribe(self, handler: EventHandler) -> None:
        self.handlers.append(handler)

    async def admit(self, req: AdmitRequest) -> AdmitResult:
        return self.limiter.admit(req)

    async def cancel(self, req: AdmitRequest) -> None:
        self.limiter.cancel(req)

    def settle_now(self, s: Settlement) -> bool:
        self.limiter.settle(s)  # in process: nothing to wait for
        return True

    async def settle(self, s: Settlement) -> None:
        self.limiter.settle(s)

    async def renew_leases(
        self, leases: list[tuple[tuple[Subject, ...], str]], ttl_ms: int
    ) -> None:
        self.limiter.renew(leases, ttl_ms)

    # audit stream -------------------------------------------------------------------------
    _audit: deque[dict[str, Any]] | None = None  # created on the first append

    async def append_audit(self, event: dict[str, Any]) -> None:
        if self._audit is None:
            self._audit = deque()
        copied = json.loads(json.dumps(event))  # a copy, as Redis stores it
        async with self._write_lock:
            if self._file is not None:
                await self._file.append_audit(copied)
            self._audit.append(copied)
            while len(self._audit) > self.audit_maxlen:
                self._audit.popleft()
            if self._file is not None and self._file.audit_lines > 2 * self.audit_maxlen:
                await self._file.compact_audit(list(self._audit))

    async def list_audit(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event in reversed(self._audit or ()):
            if len(out) >= limit:
                break
            if since is None or event["time"] >= since:
                out.append(json.loads(json.dumps(event)))
        out.reverse()
        return out

    # usage ledger -------------------------------------------------------------------------
    async def add_usage(self, tallies: Mapping[UsageKey, Tally], retention_days: int) -> None:
        check_usage(tallies, retention_days)
        async with self._write_lock:
            now = time.time()
            cells = self.ledger.plan(tallies, now)
            if not cells:
                return
            if self._file is not None:
                try:
                    await self._file.append_usage(cells, retention_days, now)
                except StoreError as exc:
                    raise UsageNotAdded(str(exc), {k.reseller for k, _ in cells}) from exc
            self.ledger.commit(cells, retention_days, now)
            if self._file is not None and self._file.usage_lines > self.usage_compact_lines:
                await self._file.compact_usage(self.ledger.snapshot())

    async def period_use(self, subjects: Mapping[str, Collection[str]],
                         day: str) -> dict[str, PeriodUse]:
        return self.ledger.period_use(subjects, day, time.time())

    # reseller screening: in memory only (a restart forgets the window) -------------------
    async def add_screening(self, tallies: Mapping[tuple[str, int], ScreeningTally],
                            keep_hours: int) -> None:
        check_screening(tallies, keep_hours)
        now = time.time()
        for k in [k for k, (exp, _) in self._screening.items() if exp <= now]:
            del self._screening[k]
        for m in [m for m, exp in self._screening_marks.items() if exp <= now]:
            del self._screening_marks[m]
        for (reseller, hour), t in tallies.items():
            expires = (hour + 1 + keep_hours) * 3600.0
            if expires <= now:
                continue
            _, have = self._screening.get((reseller, hour), (expires, ScreeningTally()))
            for name, n in t.counts.items():
                have.count(name, n)
            room = SCREENING_SET_CAP - len(have.customers)
            have.customers.update(sorted(t.customers - have.customers)[:max(0, room)])
            for kind, members in t.pairs.items():
                into = have.pairs.setdefault(kind, set())
                room = SCREENING_SET_CAP - len(into)
                into.update(sorted(members - into)[:max(0, room)])
            have.names.update(t.names)
            self._screening[(reseller, hour)] = (expires, have)

    async def screening_window(self, resellers: Collection[str], first_hour: int,
                               last_hour: int, *, detail: bool = True
                               ) -> dict[str, ScreeningWindow]:
        now = time.time()
        out: dict[str, ScreeningWindow] = {}
        for r in resellers:
            w = out[r] = ScreeningWindow()
            customers: set[str] = set()
            for hour in range(first_hour, last_hour + 1):
                got = self._screening.get((r, hour))
                if got is None or got[0] <= now:
                    continue
                t = got[1]
                w.hours[hour] = dict(t.counts)
                for kind, members in t.pairs.items():
                    w.pairs.setdefault(kind, set()).update(members)
                if detail:
                    customers |= t.customers
                    w.names.update(t.names)
            w.customers = len(customers)
        return out

    async def screening_mark(self, reseller: str, signal: str, flagged: bool,
                             ttl_s: int) -> bool:
        k = (reseller, signal)
        if not flagged:
            self._screening_marks.pop(k, None)
            return False
        now = time.time()
        exp = self._screening_marks.get(k)
        if exp is not None and exp > now:
            return False
        self._screening_marks[k] = now + ttl_s
        return True

    async def query_usage(self, since_day: str, until_day: str, reseller: str | None = None,
                          key_id: str | None = None,
                          customer_id: str | None = None) -> list[UsageRow]:
        return self.ledger.query(since_day, until_day, reseller, key_id, customer_id,
                                 time.time())
