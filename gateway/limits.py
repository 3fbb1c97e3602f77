"""Admission and settlement against the store's limit scripts, the `on_error` policy, lease
renewal, and the provider-shaped rate-limit headers."""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from gateway.cancellation import cancel_and_wait, cancelling
from gateway.errors import GatewayError, StoreError
from gateway.log import logger
from gateway.lru import BoundedLRU
from gateway.policy import CompiledPolicy, LimitSet
from gateway.store.base import (
    AdmitRequest,
    AdmitResult,
    Bucket,
    KeyRecord,
    Settlement,
    Store,
    StoreCallNotSent,
    Subject,
)
from gateway.store.gcra import Limiter
from gateway.usage import Usage, charged_tokens

LEASE_TTL_MS = 60_000
RENEW_EVERY_S = 20.0
# Retries of cancels and settlements the store did not take: first soon, then backing off.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 1.0
RETRY_BATCH = 64
RETRY_CAP = 100_000

CODES = {
    "rpm": "requests_per_minute",
    "itpm": "input_tokens_per_minute",
    "otpm": "output_tokens_per_minute",
    "concurrency": "concurrency",
}
_DIMS = ("rpm", "itpm", "otpm", "concurrency")


def pick_limits(*sets: LimitSet | dict[str, int] | None) -> dict[str, int]:
    """Per dimension, the first set that names a value."""
    out: dict[str, int] = {}
    for dim in _DIMS:
        for s in sets:
            if s is None:
                continue
            v = s.get(dim) if isinstance(s, dict) else getattr(s, dim)
            if v is not None:
                out[dim] = int(v)
                break
    return out


def _limited(s: Subject) -> bool:
    return bool(s.rpm or s.itpm or s.otpm or s.concurrency)


# (policy, key record) → (key and reseller subjects, customer limits); derived once per policy
# version and key version (both are replaced, never mutated, when they change).
_subject_cache: BoundedLRU[str, tuple[CompiledPolicy, KeyRecord, tuple[Subject, ...],
                                      dict[str, int]]] = BoundedLRU(100_000)


def subjects_for(policy: CompiledPolicy, key: KeyRecord, customer_id: str | None
                 ) -> tuple[Subject, ...]:
    """The limited subjects of a request: key (key → policy key defaults), reseller
    (reseller → policy reseller defaults) and, when attested, customer."""
    hit = _subject_cache.get(key.key_id)
    if hit is None or hit[0] is not policy or hit[1] is not key:
        r = key.reseller
        res = policy.doc.resellers.get(r)
        base = [Subject("key", key.key_id, r, **pick_limits(key.limits, policy.doc.limits.key)),
                Subject("reseller", r, r, **pick_limits(res.limits if res else None,
                                                   policy.doc.limits.reseller))]
        cl = pick_limits(res.customer_limits if res else None, policy.doc.limits.customer)
        hit = (policy, key, tuple(filter(_limited, base)), cl)
        _subject_cache.put(key.key_id, hit)
    subjects = hit[2]
    if customer_id is not None and any(hit[3].values()):
        subjects = (*subjects, Subject("customer", customer_id, key.reseller, **hit[3]))
    return subjects


def retry_after_s(ms: float) -> int:
    """Whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(ms / 1000.0))


_rfc_cache: BoundedLRU[int, str] = BoundedLRU(4096)


def _rfc3339(ms_from_now: float) -> str:
    """RFC 3339 (whole seconds, UTC) of now + ms; formatted once per distinct second."""
    sec = math.ceil(time.time() + ms_from_now / 1000.0)
    hit = _rfc_cache.get(sec)
    if hit is None:
        hit = datetime.fromtimestamp(sec, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        _rfc_cache.put(sec, hit)
    return hit


def _duration(ms: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 20ms."""
    if ms < 1000:
        return f"{max(0, int(ms))}ms"
    s = ms / 1000.0
    if s < 60:
        return f"{s:.3g}s"
    m, sec = divmod(int(s), 60)
    return f"{m}m{sec}s"


def rate_headers(buckets: dict[str, Bucket], family: str) -> dict[str, str]:
    """Provider rate-limit headers for the tightest subject of each dimension."""
    h: dict[str, str] = {}
    if family == "openai":
        rb = buckets.get("rpm")
        if rb:
            h["x-ratelimit-limit-requests"] = str(rb.limit)
            h["x-ratelimit-remaining-requests"] = str(rb.remaining)
            h["x-ratelimit-reset-requests"] = _duration(rb.reset_ms)
        tok = [b for b in (buckets.get("itpm"), buckets.get("otpm")) if b]
        if tok:
            tb = min(tok, key=lambda x: x.remaining)
            h["x-ratelimit-limit-tokens"] = str(tb.limit)
            h["x-ratelimit-remaining-tokens"] = str(tb.remaining)
            h["x-ratelimit-reset-tokens"] = _duration(tb.reset_ms)
        return h
    for dim, name in (("rpm", "requests"), ("itpm", "input-tokens"), ("otpm", "output-tokens")):
        b = buckets.get(dim)
        if b:
            h[f"anthropic-ratelimit-{name}-limit"] = str(b.limit)
            h[f"anthropic-ratelimit-{name}-remaining"] = str(b.remaining)
            h[f"anthropic-ratelimit-{name}-reset"] = _rfc3339(b.reset_ms)
    return h


#: First path segment after /v1/ of OpenAI's APIs (`limits_headers: auto`); every other path
#: (Anthropic's /v1/messages, /v1/complete, and the shared /v1/models and /v1/files) gets
#: Anthropic's family.
OPENAI_SEGMENTS = frozenset({
    "chat", "completions", "embeddings", "responses", "moderations", "images", "audio",
    "fine_tuning", "assistants", "threads", "vector_stores", "uploads", "realtime", "batches",
    "conversations", "containers", "evals"})


def family_of(path: str) -> str:
    """The rate-limit header family of a (normalised) request path: "openai" for OpenAI's
    APIs, else "anthropic"."""
    if path.startswith("/v1/"):
        segment = path[4:].split("/", 1)[0]
        if segment in OPENAI_SEGMENTS:
            return "openai"
    return "anthropic"


class Admission:
    """One request's admission: what was reserved, for settlement and lease release."""

    __slots__ = ("fallback", "input_reserved", "lease_id", "output_reserved", "subjects")

    def __init__(self, subjects: tuple[Subject, ...], lease_id: str, input_reserved: int,
                 output_reserved: int, fallback: bool) -> None:
        self.subjects = subjects
        self.lease_id = lease_id
        self.input_reserved = input_reserved
        self.output_reserved = output_reserved
        self.fallback = fallback


class ForwardOutcome(Protocol):
    """What settlement reads of the forward stage's record (gateway.proxy.Forwarded)."""

    @property
    def sent(self) -> bool: ...
    @property
    def failed(self) -> bool: ...
    @property
    def metered(self) -> bool: ...
    @property
    def upstream_status(self) -> int | None: ...
    @property
    def usage(self) -> Usage | None: ...


def settlement(adm: Admission, fwd: ForwardOutcome | None) -> tuple[int, int]:
    """The input and output tokens a finished request is charged (docs/architecture.md §8):
    the reservations are refunded when the request never reached the upstream (`fwd` None or
    not sent), failed there, or got an error status; otherwise `charged_tokens` of what the
    upstream reported. For `Limits.settle`."""
    refund = fwd is None or not fwd.sent or fwd.failed or (
        fwd.upstream_status is not None and fwd.upstream_status >= 400)
    return charged_tokens(adm.input_reserved, adm.output_reserved,
                          fwd.usage if fwd is not None else None, refund=refund,
                          metered=fwd is not None and fwd.metered)


class Limits:
    """Admits requests through the store (ONE script call), or the local fallback limiter when
    the store is away and `on_error: open`; settles off the request path."""

    def __init__(self, store: Store, on_error: str, fallback_instances: int,
                 headers_family: str,
                 observe_admission: Callable[[float], None] | None = None) -> None:
        self.store = store
        #: called with the seconds each admission of a limited request took, whatever its end
        self.observe_admission = observe_admission
        self.on_error = on_error
        self.fallback = Limiter(divisor=fallback_instances)
        self.family = headers_family  # anthropic | openai | auto (by the request's path)
        self.live: dict[str, Admission] = {}
        self.store_ok = True
        self.store_errors = 0
        # settlements in flight (tasks, or the store's own futures: Store.settle_soon)
        self._tasks: set[asyncio.Future[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        # Admission id → (give up at (monotonic), the store call to retry): cancels of
        # admissions given up on and settlements that failed (docs/architecture.md §8).
        self.pending: dict[str, tuple[float, AdmitRequest | Settlement]] = {}
        self._retrier: asyncio.Task[None] | None = None
        self._retry_wake = asyncio.Event()
        # Lease ids: unique across instances (random prefix), cheap per request (a counter).
        self._lease_prefix = secrets.token_hex(6) + ":"
        self._lease_counter = itertools.count(1)

    def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_loop(), name="lease-renewer")
        self._retrier = asyncio.create_task(self._retry_loop(), name="store-retrier")

    async def close(self) -> None:
        if self._renewer:
            self._renewer.cancel()
            await cancel_and_wait([self._renewer])
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._retrier:
            await cancel_and_wait([self._retrier])
        if self.pending:
            # One last try: a cancel or release left behind would hold its lease a minute.
            try:
                async with asyncio.timeout(RETRY_MAX_S * 2):
                    await self._retry_pass()
            except (TimeoutError, StoreError):
                pass

    def mark_store(self, ok: bool) -> None:
        if ok and not self.store_ok:
            logger().info("store_recovered")
        elif not ok and self.store_ok:
            logger().error("store_unavailable", on_error=self.on_error)
        self.store_ok = ok

    def family_for(self, path: str) -> str:
        """The header family for a request to `path` under the configured `limits_headers`."""
        return family_of(path) if self.family == "auto" else self.family

    async def admit(self, subjects: tuple[Subject, ...], input_est: int, output_est: int,
                    family: str | None = None) -> tuple[Admission | None, dict[str, str]]:
        """Admit or raise the 429 / 503 GatewayError; returns the admission and its headers
        (rate-limit headers of `family`, default the configured one: see `family_for`).
        A request with no limited subject is admitted without a store call (and untimed)."""
        if not subjects:
            return None, {}
        t0 = time.perf_counter()
        try:
            return await self._admit(subjects, input_est, output_est, family)
        finally:
            if self.observe_admission is not None:
                self.observe_admission(time.perf_counter() - t0)

    async def _admit(self, subjects: tuple[Subject, ...], input_est: int, output_est: int,
                     family: str | None) -> tuple[Admission | None, dict[str, str]]:
        lease_id = f"{self._lease_prefix}{next(self._lease_counter):x}"
        req = AdmitRequest(subjects, lease_id, LEASE_TTL_MS, input_est, output_est)
        fallback = False
        try:
            result: AdmitResult = await self.store.admit(req)
            self.mark_store(True)
        except asyncio.CancelledError:
            # The client went away while its admission was with the store: it may have been
            # applied (its reply reached us, or arrives later). Roll it back, whichever it
            # turns out, so the lease does not wait out its ttl (cancel is idempotent).
            if not self.store.in_process:
                self._retry(lease_id, req)
            raise
        except StoreError as exc:
            self.store_errors += 1
            self.mark_store(False)
            if not self.store.in_process and not isinstance(exc, StoreCallNotSent):
                # The script may still run (it sat in a socket buffer of a stalled Redis) or
                # may have run with its reply lost: roll it back, whichever it turns out.
                self._retry(lease_id, req)
            if self.on_error == "closed":
                raise GatewayError(503, "overloaded_error", "store_unavailable",
                                   "rate-limit store unavailable; try again shortly",
                                   {"retry-after": "1"}) from None
            result = self.fallback.admit(req)
            fallback = True
        headers = rate_headers(result.buckets, family or self.family)
        if not result.ok:
            dim = result.failed_dimension or "rpm"
            headers["retry-after"] = str(retry_after_s(result.retry_after_ms))
            raise GatewayError(429, "rate_limit_error", CODES[dim],
                               f"rate limit exceeded: {CODES[dim]} ({result.failed_subject})",
                               headers, decision="rate_limited")
        adm = Admission(subjects, lease_id, input_est, output_est, fallback)
        self.live[lease_id] = adm
        return adm, headers

    def settle(self, adm: Admission, input_actual: int, output_actual: int) -> None:
        """Correct the buckets and release the lease, in the background."""
        self.live.pop(adm.lease_id, None)
        st = Settlement(adm.subjects, adm.lease_id, adm.input_reserved, adm.output_reserved,
                        input_actual, output_actual)
        if adm.fallback:
            self.fallback.settle(st)
            return
        if self.store.settle_now(st):
            return
        fut = self.store.settle_soon(st)
        # One callback takes the outcome (on one Redis node, the batch's: no task).
        self._tasks.add(fut)
        fut.add_done_callback(lambda f: self._settled(st, f))

    def _settled(self, st: Settlement, fut: asyncio.Future[None]) -> None:
        self._tasks.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, StoreError):
            self._settle_failed(st)
        elif exc is not None:  # a bug: logged, the lease expires by itself
            logger().error("internal_error", stage="settle", error=type(exc).__name__,
                           detail=str(exc)[:200])

    def _settle_failed(self, st: Settlement) -> None:
        self.store_errors += 1
        self.mark_store(False)
        self._retry(st.lease_id, st)

    def _retry(self, lease_id: str, call: AdmitRequest | Settlement) -> None:
        """Retry `call` in the background until the store takes it. A settlement is dropped
        once its lease would have expired anyway; a cancel is kept until it lands (the
        admission it undoes may run whenever a stalled Redis resumes), at most RETRY_CAP."""
        until = time.monotonic() + LEASE_TTL_MS / 1000.0 if isinstance(call, Settlement) \
            else math.inf
        self.pending[lease_id] = (until, call)
        if len(self.pending) > RETRY_CAP:
            del self.pending[next(iter(self.pending))]
        self._retry_wake.set()

    async def _retry_loop(self) -> None:
        delay = RETRY_MIN_S
        while not cancelling():
            if not self.pending:
                self._retry_wake.clear()
                await self._retry_wake.wait()
            await asyncio.sleep(delay)
            delay = RETRY_MIN_S if await self._retry_pass() else min(delay * 2, RETRY_MAX_S)

    async def _retry_pass(self) -> bool:
        """Send every pending call once, oldest first; False when the store failed again."""
        now = time.monotonic()
        for k in [k for k, (until, _) in self.pending.items() if until < now]:
            del self.pending[k]
        due = [(k, c) for k, (_, c) in self.pending.items()]
        # In batches: calls in flight together share the pipelined connection's writes.
        for i in range(0, len(due), RETRY_BATCH):
            batch = due[i:i + RETRY_BATCH]
            results = await asyncio.gather(*(self._retry_call(c) for _, c in batch),
                                           return_exceptions=True)
            failed = False
            for (lease_id, call), res in zip(batch, results, strict=True):
                if isinstance(res, BaseException):
                    failed = True
                elif self.pending.get(lease_id, (0.0, None))[1] is call:
                    # Both calls are idempotent: one that ran but lost its reply is fine.
                    del self.pending[lease_id]
            if failed:
                self.store_errors += 1
                return False  # the store is still away: try again later
        return True

    async def _retry_call(self, call: AdmitRequest | Settlement) -> None:
        if isinstance(call, Settlement):
            await self.store.settle(call)
        else:
            await self.store.cancel(call)

    async def _renew_loop(self) -> None:
        while not cancelling():
            await asyncio.sleep(RENEW_EVERY_S)
            leases = [(a.subjects, a.lease_id) for a in self.live.values()
                      if any(s.concurrency for s in a.subjects)]
            if not leases:
                continue
            try:
                await self.store.renew_leases(leases, LEASE_TTL_MS)
            except StoreError:
                self.store_errors += 1
