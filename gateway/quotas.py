"""Daily and monthly quotas at admission (docs/architecture.md §12): the effective quotas of a
request's key and reseller, the check against what they used, and what is left.

Pure: the caller passes what each subject used (`Ledger.used`) and the time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.errors import quota_exceeded
from gateway.lru import BoundedLRU
from gateway.policy import (
    QUOTA_DIMENSIONS,
    QUOTA_NAMES,
    QUOTA_PERIODS,
    QUOTA_TRIPLES,
    CompiledPolicy,
    flat_quotas,
)
from gateway.store.base import KeyRecord, PeriodUse, Tally


@dataclass(frozen=True, slots=True)
class EffectiveQuotas:
    """The quotas of one request, keyed "daily.requests" ... "monthly.output_tokens": the
    key's own entries over `limits.key.quotas`, and the reseller's `resellers.R.quotas`."""

    key: dict[str, int]
    reseller: dict[str, int]

    def __bool__(self) -> bool:
        return bool(self.key or self.reseller)


# key id -> (policy, key record, quotas): derived once per policy version and key version
_cache: BoundedLRU[str, tuple[CompiledPolicy, KeyRecord, EffectiveQuotas]] = BoundedLRU(100_000)


def effective_quotas(policy: CompiledPolicy, key: KeyRecord) -> EffectiveQuotas:
    """The quotas that apply to a request of `key` under `policy`."""
    hit = _cache.get(key.key_id)
    if hit is not None and hit[0] is policy and hit[1] is key:
        return hit[2]
    own = {n: v for n, v in key.quotas.items()
           if n in QUOTA_NAMES and isinstance(v, int) and not isinstance(v, bool) and v >= 0}
    reseller = policy.doc.resellers.get(key.reseller)
    q = EffectiveQuotas(key={**flat_quotas(policy.doc.limits.key.quotas), **own},
                        reseller=flat_quotas(reseller.quotas) if reseller is not None else {})
    _cache.put(key.key_id, (policy, key, q))
    return q


def period_end(period: str, now: float) -> float:
    """The start of the next UTC day ("daily") or month ("monthly") after `now`."""
    t = datetime.fromtimestamp(now, tz=UTC)
    if period == "daily":
        start = datetime(t.year, t.month, t.day, tzinfo=UTC) + timedelta(days=1)
    else:
        start = datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=UTC)
    return start.timestamp()


def retry_after(period: str, now: float) -> int:
    """Whole seconds until the next UTC period starts, rounded up, at least 1."""
    return max(1, math.ceil(period_end(period, now) - now))


def _tally(use: PeriodUse, period: str) -> Tally:
    return use.day if period == "daily" else use.month


#: Per period, monthly first, its (dimension, quota name) pairs.
_BY_PERIOD = tuple((p, tuple((d, n) for pp, d, n in QUOTA_TRIPLES if pp == p))
                   for p in reversed(QUOTA_PERIODS))


def check(quotas: EffectiveQuotas, key_use: PeriodUse, reseller_use: PeriodUse,
          now: float) -> None:
    """Raise the 429 when the key or the reseller used a quota up (used >= quota in any
    dimension). A monthly quota is reported before a daily one: waiting for the next day
    would not help."""
    for period, names in _BY_PERIOD:  # monthly, then daily
        for subject, q, use in (("key", quotas.key, key_use),
                                ("reseller", quotas.reseller, reseller_use)):
            if not q:
                continue
            t = _tally(use, period)
            for dim, name in names:
                limit = q.get(name)
                if limit is not None and getattr(t, dim) >= limit:
                    raise quota_exceeded(period, subject, dim, retry_after(period, now))


def remaining(quotas: EffectiveQuotas, key_use: PeriodUse,
              reseller_use: PeriodUse) -> dict[str, int | None]:
    """Per dimension, what is left under the tightest quota that applies (never below 0);
    None where no quota applies."""
    out: dict[str, int | None] = {}
    for dim in QUOTA_DIMENSIONS:
        left: int | None = None
        for q, use in ((quotas.key, key_use), (quotas.reseller, reseller_use)):
            for period in QUOTA_PERIODS:
                limit = q.get(f"{period}.{dim}")
                if limit is not None:
                    here = max(0, limit - getattr(_tally(use, period), dim))
                    left = here if left is None else min(left, here)
        out[dim] = left
    return out


def nested(flat: dict[str, int]) -> dict[str, dict[str, int | None]]:
    """Quotas keyed "daily.requests" as {"daily": {"requests": N, ...}, "monthly": {...}},
    None where none is set."""
    return {p: {d: flat.get(f"{p}.{d}") for d in QUOTA_DIMENSIONS} for p in QUOTA_PERIODS}
