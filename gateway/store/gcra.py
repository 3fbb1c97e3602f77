"""The in-process GCRA buckets and concurrency leases: the embedded store's limiter and the
`on_error: open` fallback (no I/O; the same semantics as store/lua/admit.lua)."""

from __future__ import annotations

import heapq
import time

from gateway.errors import StoreError
from gateway.store.base import (
    TOKEN_DIMENSIONS,
    WINDOW_MS,
    AdmitRequest,
    AdmitResult,
    Bucket,
    Settlement,
    Subject,
    gcra_cost,
    settle_delta,
)

__all__ = ["Limiter"]


class Limiter:
    """In-process GCRA buckets and concurrency leases; also the `on_error: open` fallback.

    Memory holds only live entries: a bucket leaves once it is full again, a lease once it
    expires, an admission's marker between one and two mark spans after its last write (the
    span: a minute, or the longest lease ttl asked for). Buckets and leases wait in heaps of
    their expiries, and every admission pops what is due, so clean-up costs O(log n)
    amortised per admission however many subjects are live."""

    def __init__(self, divisor: int = 1) -> None:
        self.divisor = divisor
        self.tat: dict[str, float] = {}
        self.leases: dict[str, dict[str, float]] = {}
        # (when, bucket key) and (when, lease set key, lease id); an entry whose bucket or
        # lease was pushed further since is stale and skipped when popped.
        self._tat_due: list[tuple[float, str]] = []
        self._lease_due: list[tuple[float, str, str]] = []
        self._lease_count = 0
        # Admission id → "a" admitted, "s" settled, "c" cancelled (admit.lua's marker), in
        # two generations: a mark is written to `_marks`, which becomes `_marks_old` at the
        # first write `_mark_span` after the generation began, and is dropped at the next
        # such turn. So a mark lives at least the span past its last write (a lease ttl, or a
        # minute for a settled one: the span is the longest of those) and, while marks are
        # written, at most two, with no per-mark expiry or queue entry.
        self._marks: dict[str, str] = {}
        self._marks_old: dict[str, str] = {}
        self._marks_since: float | None = None
        self._mark_span = WINDOW_MS

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
            for dim in TOKEN_DIMENSIONS:
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
        self._mark(req.lease_id, "a", req.lease_ttl_ms, now)
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
        return self._marks.get(lease_id) or self._marks_old.get(lease_id)

    def _mark(self, lease_id: str, state: str, ttl_ms: float, now: float) -> None:
        """Mark `lease_id` with `state` for at least `ttl_ms` (and at most twice the span)."""
        if ttl_ms > self._mark_span:
            self._mark_span = ttl_ms  # only lengthens what the marks already written live
        since = self._marks_since
        if since is None:
            self._marks_since = now
        elif now - since >= self._mark_span:
            # One step per write at most: a mark moved to the old generation now was written
            # before now, so it still lives a whole span from now.
            self._marks_old, self._marks = self._marks, {}
            self._marks_since = now
        self._marks[lease_id] = state

    def cancel(self, req: AdmitRequest, now_ms: float | None = None) -> None:
        """Roll back admission `req` if it was applied, else make it a no-op (admit.lua's
        marker semantics, as cancel.lua)."""
        now = time.time() * 1000.0 if now_ms is None else now_ms
        prev = self._state(req.lease_id)
        if prev in ("c", "s"):
            return
        self._mark(req.lease_id, "c", req.lease_ttl_ms, now)
        if prev != "a":
            return
        costs = {"rpm": 1, "itpm": req.input_tokens, "otpm": req.output_tokens}
        for s in req.subjects:
            for dim in TOKEN_DIMENSIONS:
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
        self._mark(st.lease_id, "s", WINDOW_MS, now)
        for s in st.subjects:
            for dim, reserved, actual in (("itpm", st.input_reserved, st.input_actual),
                                          ("otpm", st.output_reserved, st.output_actual)):
                limit = self._limit(getattr(s, dim))
                if not limit:
                    continue
                delta = settle_delta(limit, reserved, actual)
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
        """Drop what is due: full buckets and expired leases (stale heap entries skipped)."""
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
