"""In-process usage tallies (docs/architecture.md §12): what this instance forwarded, added to
the store's ledger at most once a second, and what each watched subject (a key or reseller
with a quota) used in the current UTC day and month.

The hot path only touches dicts: `record` a forwarded request, `hold`/`release` an admitted
one, `used` for a quota check. `flush` (the app's `usage-flush` loop, and once more at stop)
sends the tallies with one `Store.add_usage` and then reads the watched subjects' totals with
one `Store.period_use`. A flush that fails keeps its tallies for the next one: nothing is
lost and, as the store adds all or nothing per reseller, nothing is counted twice. What a
crash loses is what was not yet flushed: at most about one second of this instance's traffic.

What a subject used = the totals of its last read + this instance's tallies not yet in that
read (not yet flushed, or flushed after it) + its requests admitted and still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime

from gateway.errors import StoreError
from gateway.log import logger
from gateway.store.base import PeriodUse, Store, Tally, UsageKey, UsageNotAdded

#: the model a forwarded request is counted under when it named none
UNKNOWN_MODEL = "unknown"
#: seconds between flushes (the crash bound: at most this much of one instance's traffic)
FLUSH_INTERVAL_S = 1.0


_last_day: tuple[int, str] = (-1, "")


def utc_day(now: float) -> str:
    """The UTC day of Unix time `now`, "YYYY-MM-DD" (formatted once per day seen last)."""
    global _last_day
    n = int(now // 86_400)
    if _last_day[0] != n:
        _last_day = (n, datetime.fromtimestamp(n * 86_400, tz=UTC).strftime("%Y-%m-%d"))
    return _last_day[1]


def key_subject(key_id: str) -> str:
    """The ledger's subject name of a key (as `Store.period_use` keys it)."""
    return f"key:{key_id}"


def reseller_subject(reseller: str) -> str:
    """The ledger's subject name of a reseller (as `Store.period_use` keys it)."""
    return f"reseller:{reseller}"


def _copy(t: Tally) -> Tally:
    return Tally(t.requests, t.input_tokens, t.output_tokens)


def _bump(into: dict[tuple[str, str], Tally], key: tuple[str, str], t: Tally,
          sign: int = 1) -> None:
    have = into.get(key)
    if have is None:
        if sign > 0:
            into[key] = _copy(t)
        return
    have.requests += sign * t.requests
    have.input_tokens += sign * t.input_tokens
    have.output_tokens += sign * t.output_tokens


def _periods(cell: UsageKey) -> tuple[tuple[str, str], ...]:
    """The (subject, period) pairs a cell adds to: day "YYYY-MM-DD" and month "YYYY-MM"."""
    month = cell.day[:7]
    ks, rs = key_subject(cell.key_id), reseller_subject(cell.reseller)
    return (ks, cell.day), (ks, month), (rs, cell.day), (rs, month)


class Ledger:
    """This instance's usage tallies and the cached period totals of the watched subjects."""

    def __init__(self, store: Store, retention_days: int) -> None:
        self.store = store
        #: `usage.retention_days`; a reload may change it
        self.retention_days = retention_days
        # Cells not yet sent to the store.
        self._pending: dict[UsageKey, Tally] = {}
        # (subject, day or month) -> this instance's use not in the subject's last read.
        self._local: dict[tuple[str, str], Tally] = {}
        # (subject, day or month) -> the part of `_local` flushed since that read.
        self._unread: dict[tuple[str, str], Tally] = {}
        # subject -> (the day it was read for, its totals then)
        self._cache: dict[str, tuple[str, PeriodUse]] = {}
        # reseller -> its key ids watched (the reseller itself is watched with them)
        self._watched: dict[str, set[str]] = {}
        # subject -> requests admitted under a quota and not yet ended
        self._inflight: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._read_failed_at = -1e9
        self._flushing: asyncio.Future[None] | None = None
        #: flushes (adds or reads) the store refused; for tests and diagnostics
        self.flush_errors = 0
        #: more tallies sent by every flush, after the usage (reseller screening, §15)
        self.flush_hooks: list[Callable[[], Awaitable[None]]] = []

    # --- the hot path ---------------------------------------------------------------------
    def record(self, reseller: str, key_id: str, customer_id: str | None, model: str | None,
               input_tokens: int | None, output_tokens: int | None, now: float) -> None:
        """Count one forwarded request and the tokens the upstream reported for it, on the
        UTC day of `now` (its end)."""
        t = Tally(1, max(0, input_tokens or 0), max(0, output_tokens or 0))
        cell = UsageKey(utc_day(now), reseller, key_id, customer_id, model or UNKNOWN_MODEL)
        have = self._pending.get(cell)
        if have is None:
            self._pending[cell] = _copy(t)
        else:
            have.add(t)
        for p in _periods(cell):
            _bump(self._local, p, t)

    def hold(self, reseller: str, key_id: str) -> None:
        """A request admitted under a quota: counted as a request until `release`."""
        for s in (key_subject(key_id), reseller_subject(reseller)):
            self._inflight[s] = self._inflight.get(s, 0) + 1

    def release(self, reseller: str, key_id: str) -> None:
        """The request `hold` counted has ended (recorded, if it was forwarded)."""
        for s in (key_subject(key_id), reseller_subject(reseller)):
            left = self._inflight.get(s, 0) - 1
            if left > 0:
                self._inflight[s] = left
            else:
                self._inflight.pop(s, None)

    def known(self, reseller: str, key_id: str) -> bool:
        """Both subjects have been read (or the first read failed just now)."""
        return ((key_subject(key_id) in self._cache
                 and reseller_subject(reseller) in self._cache)
                or time.monotonic() - self._read_failed_at < FLUSH_INTERVAL_S)

    def used(self, subject: str, now: float) -> PeriodUse:
        """What `subject` used in the UTC day and month of `now`, as far as this instance
        knows: its last read, plus local use not in that read, plus requests running."""
        day = utc_day(now)
        month = day[:7]
        d, m = Tally(), Tally()
        hit = self._cache.get(subject)
        if hit is not None:
            read_day, use = hit
            if read_day == day:
                d.add(use.day)
            if read_day[:7] == month:
                m.add(use.month)
        for into, period in ((d, day), (m, month)):
            local = self._local.get((subject, period))
            if local is not None:
                into.add(local)
            into.requests += self._inflight.get(subject, 0)
        return PeriodUse(day=d, month=m)

    # --- reads and flushes ------------------------------------------------------------------
    async def watch(self, reseller: str, key_id: str) -> None:
        """Watch a key and its reseller from now on (every flush reads them); read them now
        when not yet read: one round trip, on the first request of the subject here. A failed
        read is left to the next flush (until then, only this instance's use counts)."""
        self._watched.setdefault(reseller, set()).add(key_id)
        if self.known(reseller, key_id):
            return
        async with self._lock:
            if self.known(reseller, key_id):
                return
            await self._read({reseller: [key_id]}, utc_day(time.time()))

    async def flush_step(self) -> None:
        """The `usage-flush` loop's step: one flush, which goes on if the loop is cancelled
        (so a flush is never cut between the store's add and the bookkeeping)."""
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self.flush())
        await asyncio.shield(self._flushing)

    async def close(self) -> None:
        """At stop, after the drain: wait for a flush under way, then flush what is left."""
        if self._flushing is not None:
            await asyncio.wait([self._flushing])
        await self.flush()

    async def flush(self) -> None:
        """Send the pending tallies (one `add_usage`), then read the watched subjects (one
        `period_use`). What the store did not add stays pending for the next flush."""
        async with self._lock:
            now = time.time()
            batch, self._pending = self._pending, {}
            if batch:
                await self._add(batch)
            if self._watched:
                await self._read({r: sorted(k) for r, k in self._watched.items()},
                                 utc_day(now))
            self._prune(utc_day(now))
        # Outside the lock (a first quota read waits on it), and each on its own: a hook's
        # failure is logged and must not end the flush loop that carries the usage ledger.
        for hook in self.flush_hooks:
            try:
                await hook()
            except Exception as exc:  # best effort, logged
                logger().error("flush_hook_failed", hook=getattr(hook, "__qualname__", "?"),
                               error=type(exc).__name__, detail=str(exc)[:200])

    async def _add(self, batch: dict[UsageKey, Tally]) -> None:
        failed: Collection[str] = ()
        try:
            await self.store.add_usage(batch, self.retention_days)
        except UsageNotAdded as exc:
            failed = exc.resellers
        except StoreError:
            failed = {k.reseller for k in batch}
        except ValueError as exc:  # a malformed cell: a bug; never retried forever
            logger().error("usage_flush_failed", reason=str(exc)[:200], cells=len(batch))
            return
        if failed:
            self.flush_errors += 1
        for cell, t in batch.items():
            if cell.reseller in failed:
                have = self._pending.get(cell)
                if have is None:
                    self._pending[cell] = t
                else:
                    have.add(t)
            else:
                for p in _periods(cell):
                    _bump(self._unread, p, t)

    async def _read(self, subjects: dict[str, Collection[str]], day: str) -> None:
        try:
            got = await self.store.period_use(subjects, day)
        except StoreError:
            self.flush_errors += 1
            self._read_failed_at = time.monotonic()
            return
        for subject, use in got.items():
            self._cache[subject] = (day, use)
        # The read holds what was flushed before it: that part is no longer local.
        for key in [k for k in self._unread if k[0] in got]:
            _bump(self._local, key, self._unread.pop(key), -1)

    def _prune(self, day: str) -> None:
        """Forget local use of periods past (a new UTC day or month)."""
        month = day[:7]
        for table in (self._local, self._unread):
            for key in [k for k in table if k[1] != day and k[1] != month]:
                del table[key]

    def pending(self) -> dict[UsageKey, Tally]:
        """A copy of the tallies not yet sent (for tests and the stop log)."""
        return {k: _copy(t) for k, t in self._pending.items()}
