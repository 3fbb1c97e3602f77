"""The embedded store: the same contract and limit semantics as Redis, in process (one instance)."""

from __future__ import annotations

import asyncio
import collections
import heapq
import json
import time
from collections import deque
from typing import Any

from gateway.errors import StoreError
from gateway.store.base import (
    WINDOW_MS,
    AdmitRequest,
    AdmitResult,
    Bucket,
    EventHandler,
    KeyRecord,
    Settlement,
    Store,
    StoredPolicy,
    Subject,
    gcra_cost,
)
from gateway.store.state_file import StateFile, StateFileError, dump_state

__all__ = ["Limiter", "MemoryStore", "StateFileError"]

_TOKEN_DIMS = ("rpm", "itpm", "otpm")


class Limiter:
    """In-process GCRA buckets and concurrency leases; also the `on_error: open` fallback.

    Memory holds only live entries: a bucket leaves once it is full again, a lease once it
    expires. Each write pushes its expiry onto a heap, and every admission pops what is due,
    so clean-up costs O(log n) amortised per admission however many subjects are live."""

    def __init__(self, divisor: int = 1) -> None:
        self.divisor = divisor
        self.tat: dict[str, float] = {}
        self.leases: dict[str, dict[str, float]] = {}
        # (when, bucket key) and (when, lease set key, lease id); an entry whose bucket or
        # lease was pushed further since is stale and skipped when popped.
        self._tat_due: list[tuple[float, str]] = []
        self._lease_due: list[tuple[float, str, str]] = []
        self._lease_count = 0
        # Admission id → state: "a" admitted, "s" settled, "c" cancelled (as admit.lua's
        # marker), until the expiry in `_mark_due`.
        self.marks: dict[str, tuple[str, float]] = {}
        self._mark_due: collections.deque[tuple[float, str]] = collections.deque()

    def _limit(self, limit: int) -> int:
        if limit <= 0:
            return 0
        return max(1, limit // self.divisor)

    @staticmethod
    def _key(s: Subject, dim: str) -> str:
        return f"{s.reseller}\x00{s.kind}\x00{s.ident}\x00{dim}"

    def admit(self, req: AdmitRequest, now_ms: float | None = None) -> AdmitResult:
        now = time.time() * 1000.0 if now_ms is None else now_ms
        self._gc(now)
        costs = {"rpm": 1, "itpm": req.input_tokens, "otpm": req.output_tokens}
        planned: list[tuple[str, float]] = []
        buckets: dict[str, Bucket] = {}
        for s in req.subjects:
            for dim in _TOKEN_DIMS:
                limit = self._limit(getattr(s, dim))
                if not limit:
                    continue
                key = self._key(s, dim)
                t = WINDOW_MS / limit
                tat = max(self.tat.get(key, now), now)
                new_tat = tat + gcra_cost(limit, costs[dim]) * t
                # Float sums of t drift: the same slack as admit.lua, so a bucket filled in
                # one instant still admits exactly `limit` units.
                room = WINDOW_MS + min(0.5, t / 2)
                if new_tat - now > room:
                    current = Bucket(limit, max(0, int((room - (tat - now)) // t)), tat - now)
                    return AdmitResult(False, dim, f"{s.kind}:{s.ident}",
                                       new_tat - now - WINDOW_MS, {dim: current})
                planned.append((key, new_tat))
                remaining = int((room - (new_tat - now)) // t)
                b = buckets.get(dim)
                if b is None or remaining < b.remaining:
                    buckets[dim] = Bucket(limit, remaining, new_tat - now)
            climit = self._limit(s.concurrency)
            if climit:
                held = self.leases.get(self._key(s, "concurrency"))
                if held is not None and len(held) >= climit:
                    # Expired leases do not count (the heap may not have reached them yet).
                    if sum(1 for v in held.values() if v > now) >= climit:
                        return AdmitResult(False, "concurrency", f"{s.kind}:{s.ident}",
                                           1000.0)
        if self._state(req.lease_id) == "c":
            raise StoreError("admission cancelled before it ran")
        self._mark(req.lease_id, "a", now + req.lease_ttl_ms)
        for key, new_tat in planned:
            self._set_tat(key, new_tat)
        until = now + req.lease_ttl_ms
        for s in req.subjects:
            if self._limit(s.concurrency):
                key = self._key(s, "concurrency")
                held = self.leases.setdefault(key, {})
                self._lease_count += req.lease_id not in held
                held[req.lease_id] = until
                heapq.heappush(self._lease_due, (until, key, req.lease_id))
        return AdmitResult(True, buckets=buckets)

    def _state(self, lease_id: str) -> str | None:
        mark = self.marks.get(lease_id)
        return mark[0] if mark is not None else None

    def _mark(self, lease_id: str, state: str, until: float) -> None:
        self.marks[lease_id] = (state, until)
        # Every mark lives one lease ttl: a deque in time order (ttls are alike) expires them.
        self._mark_due.append((until, lease_id))

    def cancel(self, req: AdmitRequest, now_ms: float | None = None) -> None:
        """Roll back admission `req` if it was applied, else make it a no-op (admit.lua's
        marker semantics, as cancel.lua)."""
        now = time.time() * 1000.0 if now_ms is None else now_ms
        prev = self._state(req.lease_id)
        if prev in ("c", "s"):
            return
        self._mark(req.lease_id, "c", now + req.lease_ttl_ms)
        if prev != "a":
            return
        costs = {"rpm": 1, "itpm": req.input_tokens, "otpm": req.output_tokens}
        for s in req.subjects:
            for dim in _TOKEN_DIMS:
                limit = self._limit(getattr(s, dim))
                key = self._key(s, dim)
                if limit and key in self.tat:
                    self._set_tat(key, max(self.tat[key] - gcra_cost(limit, costs[dim])
                                           * (WINDOW_MS / limit), now))
            self._release(s, req.lease_id)

    def _release(self, s: Subject, lease_id: str) -> None:
        if not self._limit(s.concurrency):
            return
        key = self._key(s, "concurrency")
        held = self.leases.get(key)
        if held is not None and held.pop(lease_id, None) is not None:
            self._lease_count -= 1
            if not held:
                del self.leases[key]

    def _set_tat(self, key: str, tat: float) -> None:
        self.tat[key] = tat
        heapq.heappush(self._tat_due, (tat, key))

    def settle(self, st: Settlement, now_ms: float | None = None) -> None:
        now = time.time() * 1000.0 if now_ms is None else now_ms
        if self._state(st.lease_id) in ("s", "c"):
            return  # already settled (a retry) or cancelled
        self._mark(st.lease_id, "s", now + WINDOW_MS)
        for s in st.subjects:
            for dim, reserved, actual in (("itpm", st.input_reserved, st.input_actual),
                                          ("otpm", st.output_reserved, st.output_actual)):
                limit = self._limit(getattr(s, dim))
                if not limit:
                    continue
                delta = actual - gcra_cost(limit, reserved)
                if delta == 0:
                    continue
                key = self._key(s, dim)
                base = max(self.tat.get(key, now), now)
                self._set_tat(key, max(base + delta * (WINDOW_MS / limit), now))
            self._release(s, st.lease_id)

    def renew(self, leases: list[tuple[tuple[Subject, ...], str]], ttl_ms: int) -> None:
        until = time.time() * 1000.0 + ttl_ms
        for subjects, lease_id in leases:
            for s in subjects:
                key = self._key(s, "concurrency")
                held = self.leases.get(key)
                if held is not None and lease_id in held:
                    held[lease_id] = until
                    heapq.heappush(self._lease_due, (until, key, lease_id))

    def _gc(self, now: float) -> None:
        """Drop what is due: full buckets, expired leases (stale heap entries skipped) and
        admission marks."""
        marks = self._mark_due
        while marks and marks[0][0] <= now:
            due_at, mark_id = marks.popleft()
            if self.marks.get(mark_id, ("", 0.0))[1] == due_at:
                del self.marks[mark_id]
        due = self._tat_due
        while due and due[0][0] <= now:
            _, key = heapq.heappop(due)
            tat = self.tat.get(key)
            if tat is not None and tat <= now:
                del self.tat[key]
        ldue = self._lease_due
        while ldue and ldue[0][0] <= now:
            _, key, lease_id = heapq.heappop(ldue)
            held = self.leases.get(key)
            if held is None:
                continue
            until = held.get(lease_id)
            if until is not None and until <= now:
                del held[lease_id]
                self._lease_count -= 1
                if not held:
                    del self.leases[key]
        # Stale entries (buckets and leases pushed further since) are bounded by the writes
        # of one window; rebuild when they dominate, O(n) once per n writes.
        if len(due) > 2 * len(self.tat) + 1024:
            self._tat_due = [(t, k) for k, t in self.tat.items()]
            heapq.heapify(self._tat_due)
        if len(ldue) > 2 * self._lease_count + 1024:
            self._lease_due = [(u, k, lid) for k, held in self.leases.items()
                               for lid, u in held.items()]
            heapq.heapify(self._lease_due)


class MemoryStore(Store):
    """Everything in this process; change events go straight to the subscribers.

    With `state_file`, keys (and their last use), the keys epoch and the policy are written to
    that file atomically on every change, before the change is published, and loaded at
    construction; the audit stream is appended to `<state_file>.audit` (JSON lines). A change
    that cannot be written raises StoreError and is not kept. Limits state (buckets, leases)
    stays in memory. A state file that cannot be read is a StateFileError, never a reset."""

    def __init__(self, state_file: str | None = None) -> None:
        self.keys: dict[str, KeyRecord] = {}
        self.used: dict[str, float] = {}
        self.policy: StoredPolicy | None = None
        self.keys_epoch = 0
        self.handlers: list[EventHandler] = []
        self.limiter = Limiter()
        self.state_file = state_file
        self._file: StateFile | None = None
        self._write_lock = asyncio.Lock()  # one change written at a time, in order
        if state_file is not None:
            self._file = StateFile(state_file)
            state = self._file.open(self.audit_maxlen)
            self.keys, self.used = state.keys, state.used
            self.keys_epoch, self.policy = state.keys_epoch, state.policy
            if state.audit:
                self._audit = deque(state.audit)

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
                raise ValueError(f"policy version is {live}, expected {expected_version}")
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
