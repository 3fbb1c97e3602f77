"""What the eight screening signals need of a reseller's window (`Figures`), and the closed
hours of a window kept pre-aggregated between judgements (`ClosedHours`), so that judging a
reseller reads and adds only the hours still being written (docs/architecture.md §15)."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from gateway.store.base import SCREENING_PAIRS, ScreeningWindow, Store

SEP = "\x1f"  # between the two parts of a pair-set member
#: The counters the signals sum over the window.
SIGNAL_COUNTERS = ("att", "den", "rst", "anon", "inv", "off", "lt")
#: Hour H (Unix time // 3600) is closed, no instance adds to it any more, from (H + 1) · 3600
#: + this on. A request is tallied under the hour it ended in and flushed within about a
#: second (a failed flush drops screening tallies, it never retries them late); the rest
#: covers a flush slowed by a busy store and clocks of instances a minute or two apart.
CLOSE_GRACE_S = 180
#: A build of closed hours under way reads, per call, hours until they held this many pairs
#: (one busy hour: four full pair sets) or this many hours.
REBUILD_PAIRS = 4 * 4096
REBUILD_HOURS = 24


def last_closed_hour(now: float) -> int:
    """The newest hour closed at `now`."""
    return int((now - CLOSE_GRACE_S) // 3600) - 1


def max_group(members: Collection[str]) -> int:
    """The largest number of distinct second parts of one first part."""
    groups: dict[str, set[str]] = {}
    for m in members:
        a, _, b = m.partition(SEP)
        groups.setdefault(a, set()).add(b)
    return max((len(v) for v in groups.values()), default=0)


@dataclass(frozen=True, slots=True)
class Figures:
    """What the signals need of a window: the sums of SIGNAL_COUNTERS, the denials of its
    current hour, the number of its hours with local-time traffic (`lt`), and per pair set
    the largest group (`max_group` of the union of its hours' sets)."""

    sums: Mapping[str, int]
    last_den: int
    lt_hours: int
    groups: Mapping[str, int]


def figures(w: ScreeningWindow, current_hour: int) -> Figures:
    """The figures of a whole window whose last hour is `current_hour`."""
    return Figures(
        sums={k: sum(c.get(k, 0) for c in w.hours.values()) for k in SIGNAL_COUNTERS},
        last_den=w.hours.get(current_hour, {}).get("den", 0),
        lt_hours=sum(1 for c in w.hours.values() if c.get("lt")),
        groups={k: max_group(w.pairs.get(k, ())) for k in SCREENING_PAIRS})


def _fingerprint(w: ScreeningWindow, hour: int) -> tuple[int, ...]:
    """What one hour's read adds: its SIGNAL_COUNTERS, then the sizes of its pair sets."""
    counts = w.hours.get(hour, {})
    return (*(counts.get(k, 0) for k in SIGNAL_COUNTERS),
            *(len(w.pairs.get(k, ())) for k in SCREENING_PAIRS))


_LT = SIGNAL_COUNTERS.index("lt")


class ClosedHours:
    """One reseller's closed hours [first, last], aggregated: per hour its counters (a few
    ints); per pair set, each pair with the number of these hours holding it (so an hour
    leaving the window is taken out again) and each first part with its number of distinct
    pairs; per hour also when the store lets it expire (`expiry`: the earliest). Built by
    `closed_hours`; the figures of the whole window come from an OpenHours next to it."""

    __slots__ = ("_expires", "_hours", "counters", "expiry", "first", "groups", "last",
                 "lt_hours", "pairs", "sizes", "version")

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.last = last
        self._hours: dict[int, tuple[int, ...]] = {}  # hour with data -> _fingerprint
        self._expires: dict[int, float] = {}  # hour with data -> when the store drops it
        #: the earliest of the hours' expiries (Unix s): from then on these figures are wrong
        self.expiry = math.inf
        #: pair set -> pair (member) -> the number of these hours holding it
        self.pairs: dict[str, dict[str, int]] = {k: {} for k in SCREENING_PAIRS}
        #: pair set -> first part -> its number of distinct pairs (the group's size)
        self.sizes: dict[str, dict[str, int]] = {k: {} for k in SCREENING_PAIRS}
        #: the sums of SIGNAL_COUNTERS, the hours with `lt`, the largest group per pair set
        self.counters: tuple[int, ...] = (0,) * len(SIGNAL_COUNTERS)
        self.lt_hours = 0
        self.groups: dict[str, int] = dict.fromkeys(SCREENING_PAIRS, 0)
        self.version = 0  # moves on with every settle

    def kept(self) -> int:
        """The number of pairs kept."""
        return sum(len(p) for p in self.pairs.values())

    def holds(self, hour: int) -> bool:
        """Whether `hour` added data."""
        return hour in self._hours

    def add(self, hour: int, w: ScreeningWindow, expires: float = math.inf) -> None:
        """Add `w`, one hour's read (detail not needed), which the store keeps until
        `expires`."""
        mark = _fingerprint(w, hour)
        if not any(mark):
            return
        self._hours[hour] = mark
        self._expires[hour] = expires
        for kind, members in w.pairs.items():
            held, sizes = self.pairs[kind], self.sizes[kind]
            for m in members:
                n = held.get(m)
                if n is None:
                    held[m] = 1
                    a = m.partition(SEP)[0]
                    sizes[a] = sizes.get(a, 0) + 1
                else:
                    held[m] = n + 1

    def fits(self, hour: int, w: ScreeningWindow) -> bool:
        """Whether `w`, `hour` read again, is what was added (or nothing was): False when the
        hour expired or was written to after it closed."""
        mark = self._hours.get(hour)
        return mark is None or _fingerprint(w, hour) == mark

    def drop(self, hour: int, w: ScreeningWindow) -> None:
        """Take out `hour`, read again as `w` (which `fits`)."""
        if self._hours.pop(hour, None) is None:
            return
        self._expires.pop(hour, None)
        for kind, members in w.pairs.items():
            held, sizes = self.pairs[kind], self.sizes[kind]
            for m in members:
                n = held[m]
                if n > 1:
                    held[m] = n - 1
                    continue
                del held[m]
                a = m.partition(SEP)[0]
                if sizes[a] == 1:
                    del sizes[a]
                else:
                    sizes[a] -= 1

    def settle(self) -> None:
        """Recompute the aggregates after hours were added or dropped (once an hour)."""
        marks = self._hours.values()
        self.counters = tuple(sum(m[i] for m in marks) for i in range(len(SIGNAL_COUNTERS)))
        self.lt_hours = sum(1 for m in marks if m[_LT])
        self.groups = {k: max(g.values(), default=0) for k, g in self.sizes.items()}
        self.expiry = min(self._expires.values(), default=math.inf)
        self.version += 1


class OpenHours:
    """The open hours [first, current] of a window whose closed hours are `closed`, as far as
    judged: the pairs seen and the groups they widen past the closed hours'. Figures of a
    later read of the same hours do Python work only for the pairs new since (pair sets only
    grow until they expire). Valid while `matches`; then made anew (once an hour)."""

    __slots__ = ("_extra", "_groups", "_seen", "closed", "current", "first", "version")

    def __init__(self, closed: ClosedHours, first: int, current: int) -> None:
        self.closed, self.version = closed, closed.version
        self.first, self.current = first, current
        self._seen: dict[str, set[str]] = {k: set() for k in SCREENING_PAIRS}
        # pair set -> first part -> its pairs not among the closed hours'
        self._extra: dict[str, dict[str, set[str]]] = {k: {} for k in SCREENING_PAIRS}
        self._groups = dict(closed.groups)

    def matches(self, closed: ClosedHours, first: int, current: int) -> bool:
        """Whether these are still the open hours [first, current] next to `closed`."""
        return (self.closed is closed and self.version == closed.version
                and self.first == first and self.current == current)

    def kept(self) -> int:
        """The number of pairs kept (those of the open hours seen)."""
        return sum(len(p) for p in self._seen.values())

    def figures(self, w: ScreeningWindow) -> Figures:
        """The window's figures, `w` being a read of the open hours (detail not needed)."""
        closed = self.closed
        sums = dict(zip(SIGNAL_COUNTERS, closed.counters, strict=True))
        for counts in w.hours.values():
            for k in SIGNAL_COUNTERS:
                sums[k] += counts.get(k, 0)
        for kind, members in w.pairs.items():
            seen = self._seen[kind]
            new = members - seen  # C speed; only what is new costs Python work
            if not new:
                continue
            seen |= new
            held, sizes = closed.pairs[kind], closed.sizes[kind]
            extra, best = self._extra[kind], self._groups[kind]
            for m in new.difference(held):
                a = m.partition(SEP)[0]
                more = extra.get(a)
                if more is None:
                    more = extra[a] = set()
                more.add(m)
                best = max(best, len(more) + sizes.get(a, 0))
            self._groups[kind] = best
        return Figures(
            sums=sums, last_den=w.hours.get(self.current, {}).get("den", 0),
            lt_hours=closed.lt_hours + sum(1 for c in w.hours.values() if c.get("lt")),
            groups=dict(self._groups))


async def _read_hour(store: Store, reseller: str, hour: int) -> ScreeningWindow:
    return (await store.screening_window([reseller], hour, hour, detail=False))[reseller]


def _forever(hour: int) -> float:
    return math.inf


async def closed_hours(store: Store, reseller: str, have: ClosedHours | None, first: int,
                       last: int, expiry: Callable[[int], float] = _forever,
                       pairs: int | None = None) -> ClosedHours:
    """`reseller`'s closed hours [first, last]: `have` moved on (the hours that left the
    range read again and taken out, the newly closed ones read and added), or built anew,
    one hour's read at a time, when it cannot be (none yet, time went back, no hour in
    common, or an hour to take out no longer reads as it did). `expiry(hour)` is when the
    store drops an hour read now. With `pairs`, the reads of hours to add stop once they
    held that many pairs or REBUILD_HOURS hours: the result's `last` is then short of `last`
    (a build under way), and a later call with it goes on. Every read is made before `have`
    changes: a StoreError leaves it as it was; otherwise it is not to be used afterwards."""
    if have is not None and (have.first, have.last) == (first, last):
        return have
    gone = []
    if have is not None and have.first <= first <= have.last + 1 and have.last <= last:
        for hour in range(have.first, first):
            if have.holds(hour):
                w = await _read_hour(store, reseller, hour)
                if not have.fits(hour, w):
                    have = None
                    break
                gone.append((hour, w))
    else:
        have = None
    if have is None:
        have, gone = ClosedHours(first, min(last, first - 1)), []
    new: list[tuple[int, ScreeningWindow]] = []
    held = 0
    for hour in range(have.last + 1, last + 1):
        if pairs is not None and (held >= pairs or len(new) >= REBUILD_HOURS):
            break
        w = await _read_hour(store, reseller, hour)
        new.append((hour, w))
        held += sum(len(m) for m in w.pairs.values())
    for hour, w in gone:
        have.drop(hour, w)
    for hour, w in new:
        have.add(hour, w, expiry(hour))
    have.first = first
    if new:
        have.last = new[-1][0]
    have.settle()
    return have


def open_hours(have: OpenHours | None, closed: ClosedHours, first: int,
               current: int) -> OpenHours:
    """`have` if it still matches, else new open hours [first, current] next to `closed`."""
    if have is not None and have.matches(closed, first, current):
        return have
    return OpenHours(closed, first, current)
