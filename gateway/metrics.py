"""Prometheus metrics (docs/architecture.md §7). Label values are bounded: configured resellers, ISO
country codes, decision and reason codes; never key ids, customer ids or addresses.

With `--workers N` the supervisor sets PROMETHEUS_MULTIPROC_DIR before any worker starts, and
/metrics aggregates every worker's samples.
"""

from __future__ import annotations

import os
import platform
from bisect import bisect_left
from collections.abc import Container
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp

from gateway.store.base import PIPELINE_STATS

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.proxy import Forwarded

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)

REQUESTS = Counter("gateway_requests_total", "Requests by outcome",
                   ["decision", "reason", "reseller", "country"])
SHADOW = Counter("gateway_shadow_matches_total", "Shadow-mode rule matches (would deny)",
                 ["rule"])
REQUEST_DURATION = Histogram("gateway_request_duration_seconds",
                             "Time from request to the end of the response", buckets=_LAT)
UPSTREAM_DURATION = Histogram("gateway_upstream_duration_seconds",
                              "Upstream time, request sent to response finished", buckets=_LAT)
UPSTREAM_TTFB = Histogram("gateway_upstream_ttfb_seconds",
                          "Upstream time to the first response byte", buckets=_LAT)
UPSTREAM_RESPONSES = Counter("gateway_upstream_responses_total", "Upstream responses by status",
                             ["status"])
TOKENS = Counter("gateway_tokens_total", "Tokens reported by the upstream",
                 ["direction", "reseller"])
STORE_ERRORS = Counter("gateway_store_errors_total", "Failed store calls")
STORE_DURATION = Histogram("gateway_store_duration_seconds", "Admission round trips",
                           buckets=_FAST)
INFLIGHT = Gauge("gateway_inflight_requests", "Requests being served", multiprocess_mode="livesum")
POLICY_VERSION = Gauge("gateway_policy_version", "Live policy version", multiprocess_mode="max")
GEO_EPOCH = Gauge("gateway_geo_database_build_epoch", "Build epoch of each open geo database",
                  ["database"], multiprocess_mode="max")
GEO_AGE = Gauge("gateway_geo_database_age_days", "Days since each open geo database was built",
                ["database"], multiprocess_mode="livemax")
GEO_STALE = Gauge("gateway_geo_database_stale",
                  "1 while a geo database is older than geo.max_age_days", ["database"],
                  multiprocess_mode="livemax")
CACHE = Counter("gateway_cache_lookups_total", "In-process cache lookups",
                ["cache", "result"])
POLICY_FILE_DIFFERS = Gauge("gateway_policy_file_differs",
                            "1 while policy_file differs from the live policy (as last read: "
                            "at start and on SIGHUP), else 0", multiprocess_mode="max")
PROXY_PROTOCOL_REJECTED = Counter(
    "gateway_proxy_protocol_rejected_total",
    "Connections closed for their PROXY protocol header, by reason", ["reason"])
MODEL_REQUESTS = Counter("gateway_model_requests_total",
                         "Requests by model and decision; models past the first "
                         "MODEL_LABELS_MAX the upstream accepted count as `other`",
                         ["model", "decision"])
BUILD_INFO = Gauge("gateway_build_info", "Always 1; the labels name the running build",
                   ["version", "python", "implementation"], multiprocess_mode="max")
STORE_WRITES = Counter("gateway_store_socket_writes_total",
                       "Socket writes of the pipelined Redis transport (one per loop turn that "
                       "has calls)")
STORE_COMMANDS = Counter("gateway_store_commands_written_total",
                         "Commands the pipelined Redis transport wrote (EVALSHA and EVAL)")
STORE_UP = Gauge("gateway_store_up", "1 while the store answers, 0 while it is away",
                 multiprocess_mode="min")
SCREENING_FLAGGED = Gauge("gateway_screening_flagged",
                          "1 while a reseller's screening signal is in state flag, else 0 "
                          "(configured resellers only)", ["reseller", "signal"],
                          multiprocess_mode="max")


def render() -> bytes:
    """The exposition of this process, or of all workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


_children: dict[tuple[Any, ...], Any] = {}


def child(family: Any, *labels: str) -> Any:
    """`family.labels(*labels)`, cached: label lookups cost a lock and a hash per call.

    Label sets are bounded (see the module docstring), so the cache is too."""
    key = (id(family), *labels)
    hit = _children.get(key)
    if hit is None:
        hit = _children[key] = family.labels(*labels)
    return hit


class _Hist:
    """Hot-path histogram: a bisect and two adds per observation, moved into the Prometheus
    histogram by `flush` (prometheus_client's own observe takes a lock per bucket walk)."""

    __slots__ = ("bounds", "counts", "family", "total")

    def __init__(self, family: Histogram) -> None:
        self.family = family
        self.bounds: list[float] = list(family._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        if not any(self.counts):
            return
        counts, self.counts = self.counts, [0] * len(self.bounds)
        total, self.total = self.total, 0.0
        for i, n in enumerate(counts):
            if n:
                self.family._buckets[i].inc(n)
        self.family._sum.inc(total)


class _Count:
    """Hot-path labelled counter: a dict add per increment, flushed into the family."""

    __slots__ = ("family", "pending")

    def __init__(self, family: Counter) -> None:
        self.family = family
        self.pending: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self.pending[labels] = self.pending.get(labels, 0.0) + amount

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for labels, amount in pending.items():
            child(self.family, *labels).inc(amount)


requests = _Count(REQUESTS)
model_requests = _Count(MODEL_REQUESTS)
shadow = _Count(SHADOW)
upstream_responses = _Count(UPSTREAM_RESPONSES)
tokens = _Count(TOKENS)
request_duration = _Hist(REQUEST_DURATION)
upstream_duration = _Hist(UPSTREAM_DURATION)
upstream_ttfb = _Hist(UPSTREAM_TTFB)
store_duration = _Hist(STORE_DURATION)
_flushed_store_errors = 0
_flushed_writes = (0, 0)


def flush(inflight: int, store_errors: int) -> None:
    """Move the hot-path tallies into the Prometheus families: at every scrape, and once a
    second (with --workers, the other workers' samples are at most that old)."""
    global _flushed_store_errors, _flushed_writes
    for c in (requests, model_requests, shadow, upstream_responses, tokens):
        c.flush()
    if not _build_info_set:
        _build_info()
    for h in (request_duration, upstream_duration, upstream_ttfb, store_duration):
        h.flush()
    INFLIGHT.set(inflight)
    if store_errors > _flushed_store_errors:
        STORE_ERRORS.inc(store_errors - _flushed_store_errors)
    _flushed_store_errors = store_errors
    writes, commands = PIPELINE_STATS.writes, PIPELINE_STATS.commands
    if writes > _flushed_writes[0]:
        STORE_WRITES.inc(writes - _flushed_writes[0])
    if commands > _flushed_writes[1]:
        STORE_COMMANDS.inc(commands - _flushed_writes[1])
    _flushed_writes = (writes, commands)


def proxy_protocol_rejected(reason: str) -> None:
    """Count a connection closed for its PROXY header (rare: counted at once, not tallied);
    `reason` is one of gateway.proxy_protocol.REASONS."""
    child(PROXY_PROTOCOL_REJECTED, reason).inc()


_build_info_set = False


def _build_info() -> None:
    """Set once, at the first flush (the labels never change while the process runs)."""
    global _build_info_set
    from gateway import __version__

    _build_info_set = True
    child(BUILD_INFO, __version__, platform.python_version(),
          platform.python_implementation().lower()).set(1)


#: At most this many distinct model labels per process (plus `other` and `none`).
MODEL_LABELS_MAX = 32
#: Models the upstream accepted (answered below 400), in the order first seen: a model
#: enters only then, so made-up names cannot fill the set (the upstream refuses them).
_models: set[str] = set()


def model_label(model: str | None, upstream_status: int | None) -> str:
    """The model label: `none` when the request named no model; the model once the upstream
    accepted it and while fewer than MODEL_LABELS_MAX are known; else `other`."""
    if not model:
        return "none"
    if model in _models:
        return model
    if (upstream_status is not None and upstream_status < 400
            and len(_models) < MODEL_LABELS_MAX and len(model) <= 128):
        _models.add(model)
        return model
    return "other"


def country_label(country: str | None) -> str:
    return country if country and len(country) == 2 and country.isalpha() else "unknown"


def reseller_label(reseller: str | None, known: Container[str]) -> str:
    """The reseller label: a reseller the live policy names, `other` for one it does not (a
    key of a reseller since removed), `none` when no key was identified."""
    if not reseller:
        return "none"
    return reseller if reseller in known else "other"


def record_request(ctx: RequestContext, fwd: Forwarded | None, duration_s: float,
                   known_resellers: Container[str]) -> None:
    """Tally a finished request: its outcome, shadow matches, reported tokens and duration,
    and what the upstream did (status, time to first byte, time once the request was sent).
    `known_resellers` bound the reseller label (see `reseller_label`)."""
    if fwd is not None:
        if fwd.upstream_s is not None and fwd.sent:
            upstream_duration.observe(fwd.upstream_s)
        if fwd.ttfb_s is not None:
            upstream_ttfb.observe(fwd.ttfb_s)
        if fwd.upstream_status is not None:
            upstream_responses.inc((str(fwd.upstream_status),))
    request_duration.observe(duration_s)
    reseller = reseller_label(ctx.reseller, known_resellers)
    requests.inc((ctx.decision, ctx.reason or "", reseller, country_label(ctx.country)))
    model_requests.inc((model_label(ctx.model, ctx.upstream_status), ctx.decision))
    for rule in ctx.shadow:
        shadow.inc((rule,))
    if ctx.input_tokens:
        tokens.inc(("input", reseller), ctx.input_tokens)
    if ctx.output_tokens:
        tokens.inc(("output", reseller), ctx.output_tokens)
