"""The store contract shared by the embedded and the Redis backend (one contract test suite)."""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from gateway.errors import StoreError

WINDOW_MS = 60_000.0
# The limit dimensions, in the order of the Lua scripts' keys, arguments and replies.
DIMENSIONS = ("rpm", "itpm", "otpm", "concurrency")
TOKEN_DIMENSIONS = DIMENSIONS[:3]  # the GCRA buckets (concurrency is counted in leases)
AUDIT_MAXLEN = 100_000  # events the audit stream keeps (about: Redis trims approximately)
# The usage ledger (docs/architecture.md §10, "The usage ledger").
MODELS_PER_DAY = 50  # per reseller and UTC day; further models are counted as OTHER_MODEL
OTHER_MODEL = "other"
DAY_TOTAL_DAYS = 2  # a subject's day total is kept this many days from the start of its day
MONTH_TOTAL_DAYS = 32  # a subject's month total, this many days from the start of its month


@dataclass(slots=True)
class KeyRecord:
    """A reseller key as stored: only hashes of secrets, never a secret."""

    key_id: str
    reseller: str
    secret_hash: str
    name: str | None = None
    models: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    countries: list[str] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)
    #: the key's own quotas, "daily.requests" ... "monthly.output_tokens" (over the policy's
    #: `limits.key.quotas`); absent in records written before quotas existed
    quotas: dict[str, int] = field(default_factory=dict)
    expires_at: float | None = None
    status: str = "active"
    created_at: float = 0.0
    updated_at: float = 0.0
    prev_secret_hash: str | None = None
    prev_valid_until: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> KeyRecord:
        return cls(**json.loads(text))

    def public(self) -> dict[str, Any]:
        """The record as shown to operators: no hashes."""
        d = asdict(self)
        d.pop("secret_hash")
        d.pop("prev_secret_hash")
        return d


class PolicyConflict(ValueError):
    """`put_policy` refused: the live policy version is not the one the caller expected
    (another change came first). The admin API answers it 409 `version_conflict`; every store
    raises it, worded alike."""

    def __init__(self, live: int, expected: int) -> None:
        super().__init__(f"policy version is {live}, expected {expected}")
        self.live = live
        self.expected = expected


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    version: int
    doc: str  # canonical JSON of the validated policy document
    applied_at: float
    actor: str


@dataclass(frozen=True, slots=True)
class Subject:
    """One rate-limited subject of a request (key, reseller or customer) and its limits."""

    kind: str  # "key" | "reseller" | "customer"
    ident: str
    reseller: str  # hash tag: all subjects of one request share the reseller's slot
    rpm: int = 0
    itpm: int = 0
    otpm: int = 0
    concurrency: int = 0


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    subjects: tuple[Subject, ...]
    lease_id: str
    lease_ttl_ms: int
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Bucket:
    """State of one dimension of one subject after admission (for rate-limit headers)."""

    limit: int
    remaining: int
    reset_ms: float


@dataclass(frozen=True, slots=True)
class AdmitResult:
    ok: bool
    failed_dimension: str | None = None  # rpm | itpm | otpm | concurrency
    failed_subject: str | None = None
    retry_after_ms: float = 0.0
    # Per dimension (rpm, itpm, otpm): the tightest subject's bucket, if any subject limits it.
    buckets: dict[str, Bucket] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Settlement:
    """Correction of a finished request: actual minus reserved tokens, and its lease."""

    subjects: tuple[Subject, ...]
    lease_id: str
    input_reserved: int
    output_reserved: int
    input_actual: int
    output_actual: int


@dataclass(frozen=True, slots=True)
class UsageKey:
    """One ledger cell: a key's use on one UTC day, for one attested customer and model."""

    day: str  # "YYYY-MM-DD", UTC
    reseller: str
    key_id: str
    customer_id: str | None  # the attested customer, None when none
    model: str  # stored as given ("" too); the gateway passes "unknown" when none


@dataclass(slots=True)
class Tally:
    """Requests and tokens counted (never negative)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, other: Tally) -> None:
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens

    def __bool__(self) -> bool:
        return bool(self.requests or self.input_tokens or self.output_tokens)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """A ledger cell with its tally, as query_usage returns it; its JSON row is
    `dataclasses.asdict` of it (day, reseller, key_id, customer_id, model, requests,
    input_tokens, output_tokens)."""

    day: str
    reseller: str
    key_id: str
    customer_id: str | None
    model: str
    requests: int
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class PeriodUse:
    """What a subject used in the current UTC day and in that day's month."""

    day: Tally
    month: Tally


def check_day(day: str) -> date:
    """The date of a "YYYY-MM-DD" ledger day; ValueError for anything else."""
    if len(day) != 10:
        raise ValueError(f"not a YYYY-MM-DD day: {day!r}")
    return date.fromisoformat(day)


def check_usage(tallies: Mapping[UsageKey, Tally], retention_days: int) -> None:
    """ValueError unless every cell has a valid day and every count is a non-negative int
    (the checks add_usage makes before it adds anything)."""
    if isinstance(retention_days, bool) or not isinstance(retention_days, int) \
            or retention_days < 1:
        raise ValueError(f"retention_days must be a positive int, not {retention_days!r}")
    for k, t in tallies.items():
        check_day(k.day)
        for n in (t.requests, t.input_tokens, t.output_tokens):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"usage counts are non-negative ints, not {n!r}")


def _day_start(d: date) -> float:
    return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()


def cell_expiry(day: str, retention_days: int) -> float:
    """When a ledger cell of `day` expires (Unix seconds): `retention_days` whole days after
    its day ended."""
    return _day_start(check_day(day)) + (retention_days + 1) * 86_400


def day_total_expiry(day: str) -> float:
    """When the day totals of `day` expire: DAY_TOTAL_DAYS after the start of the day."""
    return _day_start(check_day(day)) + DAY_TOTAL_DAYS * 86_400


def month_total_expiry(day: str) -> float:
    """When the month totals of the month of `day` expire: MONTH_TOTAL_DAYS after the start
    of the month (at least a day after its end)."""
    return _day_start(check_day(day).replace(day=1)) + MONTH_TOTAL_DAYS * 86_400


def key_subject(key_id: str) -> str:
    """The name of a key's totals ("key:K", as period_use names it)."""
    return f"key:{key_id}"


def reseller_subject(reseller: str) -> str:
    """The name of a reseller's totals ("reseller:R", as period_use names it)."""
    return f"reseller:{reseller}"


def usage_subjects(k: UsageKey) -> tuple[str, str]:
    """The subjects whose totals a cell adds to: "reseller:R" and "key:K"."""
    return reseller_subject(k.reseller), key_subject(k.key_id)


#: members a screening sketch or pair set keeps per reseller and hour (the embedded store's
#: distinct counts are exact up to it; pair sets everywhere stop growing at it)
SCREENING_SET_CAP = 4096
#: the pair sets of a screening bucket (docs/architecture.md §15)
SCREENING_PAIRS = ("cc", "ip", "kc", "ka")


@dataclass(slots=True)
class ScreeningTally:
    """What one instance saw of one reseller in one UTC hour, for screening: counters to add,
    customer ids (a distinct-count sketch), members of the pair sets ("cc": customer and
    country, "ip": customer address and id, "kc"/"ka": key and connecting country / ASN) and
    ASN names."""

    counts: dict[str, int] = field(default_factory=dict)
    customers: set[str] = field(default_factory=set)
    pairs: dict[str, set[str]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def pair(self, kind: str, member: str) -> None:
        self.pairs.setdefault(kind, set()).add(member)


@dataclass(slots=True)
class ScreeningWindow:
    """One reseller's screening data over a range of hours: the counters per hour (hour =
    Unix time // 3600; hours without data absent), distinct customer ids (an estimate on
    Redis), the union of the pair sets, and ASN names."""

    hours: dict[int, dict[str, int]] = field(default_factory=dict)
    customers: int = 0
    pairs: dict[str, set[str]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)


def check_screening(tallies: Mapping[tuple[str, int], ScreeningTally], keep_hours: int) -> None:
    """ValueError for a negative count, a non-int hour or a keep_hours below 1."""
    if keep_hours < 1:
        raise ValueError("keep_hours must be at least 1")
    for (reseller, hour), t in tallies.items():
        if not isinstance(hour, int) or not reseller:
            raise ValueError(f"bad screening bucket {(reseller, hour)!r}")
        if any(not isinstance(v, int) or v < 0 for v in t.counts.values()):
            raise ValueError("screening counts are non-negative ints")
        if any(k not in SCREENING_PAIRS for k in t.pairs):
            raise ValueError(f"screening pair sets are {', '.join(SCREENING_PAIRS)}")


class WriteStats:
    """Process-wide tallies of the Redis pipelined transport (store/redis/pipelined.py),
    exported as metrics: socket writes (one per loop turn that flushed commands) and
    commands written."""

    __slots__ = ("commands", "writes")

    def __init__(self) -> None:
        self.writes = 0
        self.commands = 0


PIPELINE_STATS = WriteStats()


class StoreCallNotSent(StoreError):
    """A store call that failed before any of it left this process (no connection): unlike
    other failures, it cannot have been applied."""


class UsageNotAdded(StoreError):
    """add_usage's failure: `resellers` are those whose part was not added (the part of every
    other reseller of the call was)."""

    def __init__(self, message: str, resellers: Collection[str]) -> None:
        super().__init__(message)
        self.resellers = frozenset(resellers)


EventHandler = Callable[[dict[str, Any]], Awaitable[None]]


class Store(abc.ABC):
    """Keys, the versioned policy document, change events and atomic admission."""

    #: True when admissions run in this process: an admit that raised StoreError did not
    #: happen (nothing to roll back), and `settle_now` applies a settlement at once.
    in_process: bool = False

    def settle_now(self, s: Settlement) -> bool:
        """Apply `s` synchronously when the store can (an in-process store) and return True;
        False (the default) means: call `settle` (I/O) instead."""
        return False

    def settle_soon(self, s: Settlement) -> asyncio.Future[None]:
        """Settle `s` in the background; the future of its outcome. By default a task of
        `settle`; the single-node Redis store queues it for a call it sends anyway (no task
        per settlement)."""
        return asyncio.ensure_future(self.settle(s))

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreError when the store cannot be reached."""

    # keys
    @abc.abstractmethod
    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    async def list_keys(self) -> list[KeyRecord]: ...

    @abc.abstractmethod
    async def put_key(self, rec: KeyRecord) -> int:
        """Create or replace a key record; bump the keys epoch (returned) and publish the change."""

    @abc.abstractmethod
    async def touch_keys(self, last_used: dict[str, float]) -> None: ...

    @abc.abstractmethod
    async def last_used(self, key_ids: list[str]) -> dict[str, float]: ...

    # policy
    @abc.abstractmethod
    async def get_policy(self) -> StoredPolicy | None: ...

    @abc.abstractmethod
    async def put_policy(self, doc: str, actor: str, expected_version: int | None = None) -> int:
        """Store a new policy version atomically and publish it; return the new version.

        With `expected_version`, refuse (PolicyConflict) when the live version differs."""

    @abc.abstractmethod
    async def versions(self) -> tuple[int, int]:
        """(keys epoch, policy version): the periodic safety-net check."""

    # events
    @abc.abstractmethod
    async def subscribe(self, handler: EventHandler) -> None:
        """Deliver every change event to `handler` until close (reconnecting as needed)."""

    # limits
    @abc.abstractmethod
    async def admit(self, req: AdmitRequest) -> AdmitResult:
        """Check and consume all limits of a request atomically; a refusal consumes nothing.

        `req.lease_id` is the admission id: unique per request. An admission that `cancel`
        reached first consumes nothing (it raises StoreError, as the caller gave up on it)."""

    @abc.abstractmethod
    async def cancel(self, req: AdmitRequest) -> None:
        """Roll back the admission `req` that the caller gave up on (timeout, broken
        connection): if it was applied, give back its rpm, tokens and lease; if not yet, make
        it a no-op when it arrives (for the lease ttl). Idempotent; safe to retry."""

    @abc.abstractmethod
    async def settle(self, s: Settlement) -> None:
        """Correct token buckets to actual usage and release the lease. Idempotent: a
        settlement retried after a failure (its first attempt may have been applied) applies
        once."""

    @abc.abstractmethod
    async def renew_leases(
        self, leases: list[tuple[tuple[Subject, ...], str]], ttl_ms: int
    ) -> None:
        """Extend the expiry of live leases (long streams)."""

    # audit stream (docs/architecture.md §7) -----------------------------------------------
    #: About how many events the audit stream keeps; older ones are trimmed (tests lower it).
    audit_maxlen: int = AUDIT_MAXLEN

    @abc.abstractmethod
    async def append_audit(self, event: dict[str, Any]) -> None:
        """Append one administrative change to the bounded audit stream (`<prefix>audit`).

        `event` holds `time` (Unix seconds), `actor`, `action`, `target` and JSON extras,
        never a secret. The stream keeps about the newest `audit_maxlen` events (Redis trims
        approximately, never below it). Raise StoreError when the store cannot take it."""

    @abc.abstractmethod
    async def list_audit(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` events whose `time` is at or after `since` (all when None),
        oldest first, each exactly as appended."""

    # usage ledger (docs/architecture.md §10, "The usage ledger") ---------------------------
    @abc.abstractmethod
    async def add_usage(self, tallies: Mapping[UsageKey, Tally], retention_days: int) -> None:
        """Adds to the ledger and to the per-subject day/month totals (subjects: the reseller
        and the key of each cell; the month of a cell is its day's month). All-or-nothing per
        reseller; a StoreError means that reseller's part was not added (the caller keeps the
        tally and retries next flush), even when the call timed out after it was sent (the
        store then makes sure the lost call never applies, or discounts it from the retry
        that holds it). The StoreError is a UsageNotAdded naming the resellers not added.

        Bounds: per reseller and day at most MODELS_PER_DAY models are counted under their
        name, in the order they first arrive; a cell of any further model is counted as
        OTHER_MODEL (a model already counted stays under its name). A cell of day D is kept
        `retention_days` whole days after D ends (a cell already past it is not kept); the
        day totals of D until DAY_TOTAL_DAYS after D starts, the month totals of D's month
        until MONTH_TOTAL_DAYS after it starts. Cells with an all-zero tally are ignored.
        ValueError (nothing added) for a malformed day or a negative or non-int count. On
        Redis, one round trip per reseller (one more for a reseller's first addition of a
        day in this process, and one after a failed addition, to settle it)."""

    @abc.abstractmethod
    async def period_use(self, subjects: Mapping[str, Collection[str]],
                         day: str) -> dict[str, PeriodUse]:
        """For each reseller R (mapping key) and the names of subjects of R ("reseller:R",
        "key:K" of R's keys; `reseller_subject`, `key_subject`): the totals of day `day` and
        of its month, keyed by name; zeros for a subject with no use. Only the subjects named
        are read. One round trip per reseller at most (on Redis Cluster, per slot). A key
        named under a reseller not its own is undefined (Redis reads the reseller's totals,
        so zeros; the embedded store keeps totals by name): the ledger never asks that."""

    # reseller screening (docs/architecture.md §15) -------------------------------------------
    @abc.abstractmethod
    async def add_screening(self, tallies: Mapping[tuple[str, int], ScreeningTally],
                            keep_hours: int) -> None:
        """Add screening tallies per (reseller, UTC hour): counters summed, customer ids into
        the hour's distinct-count sketch (Redis: HyperLogLog; embedded: an exact set of at
        most SCREENING_SET_CAP), pair-set members added while the set holds fewer than
        SCREENING_SET_CAP, names set. A bucket is kept `keep_hours` hours after its hour
        ends. Best effort: a StoreError means some part may be missing (the caller may drop
        it). ValueError for malformed tallies (nothing added). On Redis one round trip per
        reseller."""

    @abc.abstractmethod
    async def screening_window(self, resellers: Collection[str], first_hour: int,
                               last_hour: int, *, detail: bool = True
                               ) -> dict[str, ScreeningWindow]:
        """Every reseller's data of the hours [first_hour, last_hour] still kept (an empty
        window for one without). Without `detail` only the counters and pair sets (what the
        signals need): the customer count is 0 and the names empty (on Redis no PFCOUNT over
        the sketches, no names read). One round trip per reseller at most."""

    @abc.abstractmethod
    async def screening_mark(self, reseller: str, signal: str, flagged: bool,
                             ttl_s: int) -> bool:
        """The cross-instance flag of one signal: `flagged` sets it if not set (kept `ttl_s`)
        and answers True only for the call that set it (the transition); not `flagged`
        clears it and answers False."""

    @abc.abstractmethod
    async def query_usage(self, since_day: str, until_day: str, reseller: str | None = None,
                          key_id: str | None = None,
                          customer_id: str | None = None) -> list[UsageRow]:
        """Ledger cells of the days in [since_day, until_day] (inclusive) matching the
        filters, at full granularity (day, reseller, key, customer, model), sorted by those
        (no customer first); grouping is the caller's. ValueError for a malformed day."""


def gcra_cost(limit: int, cost: int) -> int:
    """Cost charged to a bucket: a request larger than the whole bucket is charged the bucket,
    so it can still pass when the bucket is full instead of never."""
    return min(cost, limit)


#: A settlement puts a token bucket at most this many windows (a day) into debt: a request
#: charged far past its limit (an upstream reporting absurd usage, a huge reservation charged
#: whole on a hang-up) cannot lock the bucket for years, nor push the store's expiry past
#: what Redis takes (a shared admit.lua call would then fail for every request in it).
MAX_DEBT_WINDOWS = 1440


def settle_delta(limit: int, reserved: int, actual: int) -> int:
    """Tokens a settlement adds to (positive) or gives back to (negative) a bucket of `limit`:
    `actual` less the reservation charged (gcra_cost), at most MAX_DEBT_WINDOWS buckets."""
    return min(actual - gcra_cost(limit, reserved), limit * MAX_DEBT_WINDOWS)
