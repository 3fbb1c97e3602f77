"""What an instance reports about itself: its readiness (/readyz) and the gauges it publishes
between scrapes (geo database ages, store health, the geo cache's tallies) (docs/architecture.md
§7)."""

from __future__ import annotations

import time
from typing import Any

from gateway import metrics
from gateway.geo import GeoResolver
from gateway.limits import Limits
from gateway.snapshot import Snapshot


def readiness(snap: Snapshot, limits: Limits, draining: bool) -> tuple[bool, dict[str, Any]]:
    """(ready, body): not ready without geo or policy, or with the store away and
    `on_error: closed`; degraded (still ready) with the store away and `on_error: open`, or
    with a geo database older than `geo.max_age_days` or whose file has gone; draining (not
    ready) once shutdown has begun."""
    s = snap.parts.config.settings
    geo = snap.geo.status(s.geo.max_age_days)
    version = snap.policy.version if snap.policy else None
    checks: dict[str, Any] = {
        "geo": geo,
        "policy": {"version": version},
        "store": "ok" if limits.store_ok else "unreachable",
    }
    ready = version is not None
    degraded = []
    if not limits.store_ok:
        if s.store.on_error == "closed":
            ready = False
        else:
            degraded.append("store")
    if any(db["stale"] or db["missing"] for db in geo.values()):
        degraded.append("geo")
    status = "degraded" if degraded else "ready"
    if not ready:
        status = "not_ready"
    if draining:
        ready, status = False, "draining"
    return ready, {"status": status, "degraded": degraded if status == "degraded" else [],
                   "checks": checks, "time": time.time()}


def publish_gauges(snap: Snapshot, limits: Limits) -> None:
    """Each geo database's build epoch, age and staleness, and whether the store is up."""
    for kind, st in snap.geo.status(snap.parts.config.settings.geo.max_age_days).items():
        metrics.GEO_EPOCH.labels(kind).set(st["build_epoch"])
        metrics.GEO_AGE.labels(kind).set(st["age_days"])
        metrics.GEO_STALE.labels(kind).set(1 if st["stale"] else 0)
    publish_store_up(limits)


def publish_store_up(limits: Limits) -> None:
    """gateway_store_up from whether the store answers. Each worker publishes its own (the
    gauge's multiprocess mode is `min`): after each sync round, before a scrape and with the
    other gauges."""
    metrics.STORE_UP.set(1 if limits.store_ok else 0)


class CacheTallies:
    """Moves a geo cache's hit/miss tallies (plain ints on the hot path) into
    gateway_cache_lookups_total, counting only what was not moved before."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, str], int] = {}

    def publish(self, geo: GeoResolver) -> None:
        for result, now in (("hit", geo.cache_hits), ("miss", geo.cache_misses)):
            seen = self._seen.get((id(geo), result), 0)
            if now > seen:
                metrics.child(metrics.CACHE, "geo", result).inc(now - seen)
            self._seen[(id(geo), result)] = now
