"""The embedded store: the same contract and limit semantics as Redis, in process (one instance)."""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

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

_TOKEN_DIMS = ("rpm", "itpm", "otpm")


class Limiter:
    """In-process GCRA buckets and concurrency leases; also the `on_error: open` fallback."""

    def __init__(self, divisor: int = 1) -> None:
        self.divisor = divisor
        self.tat: dict[str, float] = {}
        self.leases: dict[str, dict[str, float]] = {}

    def _limit(self, limit: int) -> int:
        if limit <= 0:
            return 0
        return max(1, limit // self.divisor)

    @staticmethod
    def _key(s: Subject, dim: str) -> str:
        return f"{s.reseller}\x00{s.kind}\x00{s.ident}\x00{dim}"

    def admit(self, req: AdmitRequest, now_ms: float | None = None) -> AdmitResult:
        now = time.time() * 1000.0 if now_ms is None else now_ms
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
                key = self._key(s, "concurrency")
                live = {k: v for k, v in self.leases.get(key, {}).items() if v > now}
                self.leases[key] = live
                if len(live) >= climit:
                    return AdmitResult(False, "concurrency", f"{s.kind}:{s.ident}", 1000.0)
        for key, new_tat in planned:
            self.tat[key] = new_tat
        for s in req.subjects:
            if self._limit(s.concurrency):
                self.leases[self._key(s, "concurrency")][req.lease_id] = now + req.lease_ttl_ms
        self._gc(now)
        return AdmitResult(True, buckets=buckets)

    def settle(self, st: Settlement, now_ms: float | None = None) -> None:
        now = time.time() * 1000.0 if now_ms is None else now_ms
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
                self.tat[key] = max(base + delta * (WINDOW_MS / limit), now)
            if self._limit(s.concurrency):
                self.leases.get(self._key(s, "concurrency"), {}).pop(st.lease_id, None)

    def renew(self, leases: list[tuple[tuple[Subject, ...], str]], ttl_ms: int) -> None:
        until = time.time() * 1000.0 + ttl_ms
        for subjects, lease_id in leases:
            for s in subjects:
                held = self.leases.get(self._key(s, "concurrency"))
                if held is not None and lease_id in held:
                    held[lease_id] = until

    def _gc(self, now: float) -> None:
        # Keep memory O(live subjects): drop full buckets once the table grows.
        if len(self.tat) > 100_000:
            self.tat = {k: v for k, v in self.tat.items() if v > now}


class MemoryStore(Store):
    """Everything in this process; change events go straight to the subscribers."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyRecord] = {}
        self.used: dict[str, float] = {}
        self.policy: StoredPolicy | None = None
        self.keys_epoch = 0
        self.handlers: list[EventHandler] = []
        self.limiter = Limiter()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self.handlers.clear()

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
        self.keys[rec.key_id] = KeyRecord.from_json(rec.to_json())
        self.keys_epoch += 1
        await self._publish({"kind": "key", "key_id": rec.key_id, "epoch": self.keys_epoch})
        return self.keys_epoch

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        self.used.update(last_used)

    async def last_used(self, key_ids: list[str]) -> dict[str, float]:
        return {k: self.used[k] for k in key_ids if k in self.used}

    async def get_policy(self) -> StoredPolicy | None:
        return self.policy

    async def put_policy(self, doc: str, actor: str, expected_version: int | None = None) -> int:
        live = self.policy.version if self.policy else 0
        if expected_version is not None and expected_version != live:
            raise ValueError(f"policy version is {live}, expected {expected_version}")
        json.loads(doc)
        self.policy = StoredPolicy(live + 1, doc, time.time(), actor)
        await self._publish({"kind": "policy", "version": live + 1})
        return live + 1

    async def versions(self) -> tuple[int, int]:
        return self.keys_epoch, self.policy.version if self.policy else 0

    async def subscribe(self, handler: EventHandler) -> None:
        self.handlers.append(handler)

    async def admit(self, req: AdmitRequest) -> AdmitResult:
        return self.limiter.admit(req)

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
        self._audit.append(json.loads(json.dumps(event)))  # a copy, as Redis stores it
        while len(self._audit) > self.audit_maxlen:
            self._audit.popleft()

    async def list_audit(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event in reversed(self._audit or ()):
            if len(out) >= limit:
                break
            if since is None or event["time"] >= since:
                out.append(json.loads(json.dumps(event)))
        out.reverse()
        return out
