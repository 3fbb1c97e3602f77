"""In-process usage tallies (docs/architecture.md §12): what this instance forwarded, added to
the store's ledger at most once a second, and what each watched subject (a key or reseller
with a quota) used in the current UTC day and month.

The hot path only touches dicts and the watched subjects' own records: `record` a forwarded
request; for a quota check, `find` the request's watched subjects (or `watch` them: one read,
on a subject's first request here), `use_of` them, `hold` and `release` the request. `flush`
(the app's `usage-flush` loop, and once more at stop) sends the tallies with one
`Store.add_usage`, drops the subjects without a request for IDLE_S, and reads the others'
totals with one `Store.period_use`. A flush that fails keeps its tallies for the next one:
nothing is lost and, as the store adds all or nothing per reseller, nothing is counted twice.
What a crash loses is what was not yet flushed: at most about one second of this instance's
traffic.

What a watched subject used = the totals of its last read + this instance's use not in that
read (not yet flushed, or flushed after it) + its requests admitted and still running. Only
watched subjects keep such tallies: a subject starts with this instance's cells not yet sent
(registration and the first read are both under the flush lock, so everything sent before is
in that read).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime

from gateway.errors import StoreError
from gateway.log import logger
from gateway.store.base import (
    PeriodUse,
    Store,
    Tally,
    UsageKey,
    UsageNotAdded,
    key_subject,
    reseller_subject,
)

#: the model a forwarded request is counted under when it named none
UNKNOWN_MODEL = "unknown"
#: seconds between flushes (the crash bound: at most this much of one instance's traffic)
FLUSH_INTERVAL_S = 1.0
#: seconds without a request after which a subject is no longer read (its next request reads
#: it again, as a first one)
IDLE_S = 600.0


_last_day: tuple[int, str] = (-1, "")


def utc_day(now: float) -> str:
    """The UTC day of Unix time `now`, "YYYY-MM-DD" (formatted once per day seen last)."""
    global _last_day
    n = int(now // 86_400)
    if _last_day[0] != n:
        _last_day = (n, datetime.fromtimestamp(n * 86_400, tz=UTC).strftime("%Y-%m-%d"))
    return _last_day[1]


def _copy(t: Tally) -> Tally:
    return Tally(t.requests, t.input_tokens, t.output_tokens)


def _bump(into: dict[str, Tally], period: str, t: Tally, sign: int = 1) -> None:
    have = into.get(period)
    if have is None:
        if sign > 0:
            into[period] = _copy(t)
        return
    have.requests += sign * t.requests
    have.input_tokens += sign * t.input_tokens
    have.output_tokens += sign * t.output_tokens


class Watch:
    """A subject (a key or a reseller) this instance reads every flush: its name in the store,
    its last read, this instance's use not in that read, and its requests still running."""

    __slots__ = ("inflight", "local", "name", "read", "read_day", "reseller", "seen",
                 "touched", "unread")

    def __init__(self, name: str, reseller: str, now: float) -> None:
        #: "key:K" or "reseller:R", as `Store.period_use` names it
        self.name = name
        #: the reseller whose totals hold it (the store reads them per reseller)
        self.reseller = reseller
        self.read_day = ""
        self.read: PeriodUse | None = None
        # day "YYYY-MM-DD" or month "YYYY-MM" -> this instance's use not in `read`
        self.local: dict[str, Tally] = {}
        # day or month -> the part of `local` flushed since `read`
        self.unread: dict[str, Tally] = {}
        #: requests admitted under a quota and not yet ended (never dropped while any run)
        self.inflight = 0
        # clock time of its last request as the flushes saw it, and whether one came since
        self.seen = now
        self.touched = False

    def used(self, now: float) -> PeriodUse:
        """What the subject used in the UTC day and month of `now`, as far as this instance
        knows: its last read, plus local use not in that read, plus requests running."""
        day = utc_day(now)
        month = day[:7]
        d, m = Tally(self.inflight), Tally(self.inflight)
        read = self.read
        if read is not None:
            if self.read_day == day:
                d.add(read.day)
            if self.read_day[:7] == month:
                m.add(read.month)
        local = self.local
        if local:
            have = local.get(day)
            if have is not None:
                d.add(have)
            have = local.get(month)
            if have is not None:
                m.add(have)
        return PeriodUse(d, m)


#: the watched subjects of one request: (its key, its reseller), None for one not watched
Watched = tuple[Watch | None, Watch | None]


def use_of(held: Watched, now: float) -> tuple[PeriodUse, PeriodUse]:
    """What the key and the reseller of `held` used in the UTC day and month of `now` (zeros
    for one not watched: a subject without a quota)."""
    k, r = held
    return (k.used(now) if k is not None else PeriodUse(Tally(), Tally()),
            r.used(now) if r is not None else PeriodUse(Tally(), Tally()))


class Ledger:
    """This instance's usage tallies and the watched subjects' period use."""

    def __init__(self, store: Store, retention_days: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        #: `usage.retention_days`; a reload may change it
        self.retention_days = retention_days
        # measures IDLE_S and the pause after a failed read (injectable for tests)
        self._clock = clock
        # Cells not yet sent to the store, and the cells of each key and reseller among them
        # (a new watch starts from its own, not from a scan of all).
        self._pending: dict[UsageKey, Tally] = {}
        self._cells_of_key: dict[str, list[UsageKey]] = {}
        self._cells_of_reseller: dict[str, list[UsageKey]] = {}
        # key id / reseller -> its watch
        self._keys: dict[str, Watch] = {}
        self._resellers: dict[str, Watch] = {}
        self._lock = asyncio.Lock()
        # when the last read failed; -inf while the last read succeeded (no subject is dropped
        # while reads fail: its last read is then all this instance knows of its use elsewhere)
        self._read_failed_at = float("-inf")
        self._pruned_day = ""
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
        day = utc_day(now)
        self._pend(UsageKey(day, reseller, key_id, customer_id, model or UNKNOWN_MODEL), t)
        kw, rw = self._keys.get(key_id), self._resellers.get(reseller)
        if kw is None and rw is None:
            return
        month = day[:7]
        for w in (kw, rw):
            if w is not None:
                _bump(w.local, day, t)
                _bump(w.local, month, t)

    def _pend(self, cell: UsageKey, t: Tally) -> None:
        """Add `t` to the pending `cell` (its own now: not copied), indexed when new."""
        have = self._pending.get(cell)
        if have is None:
            self._pending[cell] = t
            self._cells_of_key.setdefault(cell.key_id, []).append(cell)
            self._cells_of_reseller.setdefault(cell.reseller, []).append(cell)
        else:
            have.add(t)

    async def watched(self, reseller: str, key_id: str, of_key: bool,
                      of_reseller: bool) -> Watched:
        """The watched subjects of a request (`find`), watched and read first when not yet
        (`watch`: one round trip, on a subject's first request here)."""
        return (self.find(reseller, key_id, of_key, of_reseller)
                or await self.watch(reseller, key_id, of_key, of_reseller))

    def find(self, reseller: str, key_id: str, of_key: bool,
             of_reseller: bool) -> Watched | None:
        """The watched key (when `of_key`) and reseller (when `of_reseller`) of a request,
        marked as used now; None unless each is watched and read (or the last read failed
        under a second ago): then `watch` them."""
        kw = rw = None
        if of_key:
            kw = self._keys.get(key_id)
            if kw is None or (kw.read is None and not self._read_failed_lately()):
                return None
        if of_reseller:
            rw = self._resellers.get(reseller)
            if rw is None or (rw.read is None and not self._read_failed_lately()):
                return None
        if kw is not None:
            kw.touched = True
        if rw is not None:
            rw.touched = True
        return kw, rw

    @staticmethod
    def hold(held: Watched) -> None:
        """A request admitted under a quota: counted as a request of its watched subjects
        until `release` (which keeps them watched meanwhile)."""
        for w in held:
            if w is not None:
                w.inflight += 1

    @staticmethod
    def release(held: Watched) -> None:
        """The request `hold` counted has ended (recorded, if it was forwarded)."""
        for w in held:
            if w is not None and w.inflight > 0:
                w.inflight -= 1

    # --- reads and flushes ------------------------------------------------------------------
    async def watch(self, reseller: str, key_id: str, of_key: bool,
                    of_reseller: bool) -> Watched:
        """Watch the key (when `of_key`) and the reseller (when `of_reseller`) of a request
        from now on (every flush reads them until they are idle for IDLE_S), and read those
        not yet read: one round trip, on the first request of a subject here. A failed read
        is left to the next flush (until then, only this instance's use counts: what it has
        not sent yet and what comes)."""
        async with self._lock:
            now = self._clock()
            kw = self._watch(key_id, reseller, now) if of_key else None
            rw = self._watch(None, reseller, now) if of_reseller else None
            unread = [w for w in (kw, rw) if w is not None and w.read is None]
            if unread and not self._read_failed_lately():
                await self._read(unread, utc_day(time.time()))
            return kw, rw

    def _watch(self, key_id: str | None, reseller: str, now: float) -> Watch:
        """The watch of a key (or of the reseller when `key_id` is None), made if new; under
        the lock, so no flush is between its tallies and its first read."""
        table, ident = (self._keys, key_id) if key_id is not None else (
            self._resellers, reseller)
        w = table.get(ident)
        if w is None:
            name = key_subject(key_id) if key_id is not None else reseller_subject(reseller)
            w = table[ident] = Watch(name, reseller, now)
            # What this instance counted and has not sent is in no read: it starts local.
            cells = (self._cells_of_key.get(key_id, ()) if key_id is not None
                     else self._cells_of_reseller.get(reseller, ()))
            for cell in cells:
                t = self._pending[cell]
                _bump(w.local, cell.day, t)
                _bump(w.local, cell.day[:7], t)
        else:
            w.touched = True
        return w

    def subject(self, *, key_id: str | None = None,
                reseller: str | None = None) -> Watch | None:
        """The watch of a key, or of a reseller; None when not watched (for tests and
        diagnostics)."""
        if key_id is not None:
            return self._keys.get(key_id)
        return self._resellers.get(reseller or "")

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
        """Send the pending tallies (one `add_usage`), drop the idle subjects, then read the
        others (one `period_use`). What the store did not add stays pending for the next
        flush."""
        async with self._lock:
            day = utc_day(time.time())
            batch, self._pending = self._pending, {}
            self._cells_of_key, self._cells_of_reseller = {}, {}
            if batch:
                await self._add(batch)
            watched = self._sweep(self._clock(), day)
            if watched:
                await self._read(watched, day)
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
                self._pend(cell, t)
                continue
            for w in (self._keys.get(cell.key_id), self._resellers.get(cell.reseller)):
                if w is not None:
                    _bump(w.unread, cell.day, t)
                    _bump(w.unread, cell.day[:7], t)

    def _sweep(self, now: float, day: str) -> list[Watch]:
        """The subjects to read: each with a request in the last IDLE_S or one running. The
        others are dropped with their read and tallies (a dropped subject's next request reads
        it again), unless the last read failed; on a new UTC day, local use of past periods is
        forgotten."""
        prune = day != self._pruned_day
        self._pruned_day = day
        month = day[:7]
        kept: list[Watch] = []
        for table in (self._keys, self._resellers):
            idle = []
            for ident, w in table.items():
                if w.touched:
                    w.seen, w.touched = now, False
                elif w.inflight == 0 and now - w.seen >= IDLE_S and not self._read_failing():
                    idle.append(ident)
                    continue
                if prune:
                    for tallies in (w.local, w.unread):
                        for period in [p for p in tallies if p != day and p != month]:
                            del tallies[period]
                kept.append(w)
            for ident in idle:
                del table[ident]
        return kept

    async def _read(self, watched: list[Watch], day: str) -> None:
        subjects: dict[str, list[str]] = {}
        for w in watched:
            subjects.setdefault(w.reseller, []).append(w.name)
        try:
            got = await self.store.period_use(subjects, day)
        except StoreError:
            self.flush_errors += 1
            self._read_failed_at = self._clock()
            return
        self._read_failed_at = float("-inf")
        for w in watched:
            use = got.get(w.name)
            if use is None:
                continue
            w.read_day, w.read = day, use
            # The read holds what was flushed before it: that part is no longer local.
            for period, t in w.unread.items():
                _bump(w.local, period, t, -1)
            w.unread.clear()

    def _read_failed_lately(self) -> bool:
        return self._clock() - self._read_failed_at < FLUSH_INTERVAL_S

    def _read_failing(self) -> bool:
        return self._read_failed_at != float("-inf")

    def pending(self) -> dict[UsageKey, Tally]:
        """A copy of the tallies not yet sent (for tests and the stop log)."""
        return {k: _copy(t) for k, t in self._pending.items()}
