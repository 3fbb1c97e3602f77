"""Structured logging, configured once: the request line, audit events (also appended to the
store's audit stream) and operational events."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from gateway.context import RequestContext
from gateway.log import logger

if TYPE_CHECKING:
    from gateway.store.base import Store

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


#: Events printed at every `log.level`: the level filters diagnostic events only
#: (docs/architecture.md §7).
ALWAYS_PRINTED = frozenset({"request", "audit"})

_METHOD_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "msg": logging.INFO,
                  "warning": logging.WARNING, "warn": logging.WARNING,
                  "error": logging.ERROR, "exception": logging.ERROR,
                  "critical": logging.CRITICAL, "fatal": logging.CRITICAL}

_stream: TextIO | None = None


def set_log_stream(stream: TextIO | None) -> None:
    """Send log lines to `stream` instead of stdout (embedding and tests)."""
    global _stream
    _stream = stream


def _level_filter(min_level: int) -> Any:
    """A processor dropping diagnostic events below `min_level`; request and audit lines pass."""

    def drop_below(_logger: Any, method: str, event: Any) -> Any:
        if (_METHOD_LEVELS.get(method, logging.INFO) < min_level
                and event.get("event") not in ALWAYS_PRINTED):
            raise structlog.DropEvent
        return event

    return drop_below


#: The env var naming a worker process of `gateway run --workers N` (gateway.workers sets it).
WORKER_ENV = "GATEWAY_WORKER_ID"


def worker_id() -> int | None:
    """This process's worker number; None when it is not one of `--workers N`."""
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


def _worker_field(worker: int | None) -> Any:
    """A processor naming the worker on every line (a line about another worker, such as the
    supervisor's `worker_started`, keeps the worker it names)."""

    def add_worker(_logger: Any, _method: str, event: Any) -> Any:
        event.setdefault("worker", worker)
        return event

    return add_worker


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog for the process (JSON lines on stdout, or console for local work).

    `level` filters diagnostic events only: request and audit lines print at every level.
    Every line carries `worker` (GATEWAY_WORKER_ID in a worker process, else null)."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    global _writer
    worker = worker_id()
    _writer = _RequestWriter(_stream, fmt, worker)
    min_level = _LEVELS[level]
    processors: list[Any] = [
        _worker_field(worker),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        renderer,
    ]
    if min_level > logging.INFO:
        processors.insert(0, _level_filter(min_level))
    structlog.configure(
        processors=processors,
        # Calls below info stay no-ops; info ones reach the filter, which keeps audit lines.
        wrapper_class=structlog.make_filtering_bound_logger(min(min_level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=_stream or sys.stdout),
        cache_logger_on_first_use=False,  # reconfigured on SIGHUP and in tests
    )


class _RequestWriter:
    """The `request` line on the hot path: the same JSON structlog renders, written directly
    (structlog's processor chain costs about 5 times more per line)."""

    __slots__ = ("_flush_pending", "_prefix", "_sec", "fast", "stream", "worker")

    def __init__(self, stream: TextIO | None, fmt: str, worker: int | None = None) -> None:
        self.stream = stream
        self.worker = worker
        self.fast = fmt == "json"
        self._sec = -1
        self._prefix = ""
        self._flush_pending = False

    def _timestamp(self) -> str:
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((now - sec) * 1e6):06d}Z"

    def write(self, ctx: RequestContext) -> None:
        fields = ctx.log_fields()
        fields["worker"] = self.worker
        if not self.fast:
            logger().info("request", **fields)
            return
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = self._timestamp()
        stream = self.stream or sys.stdout
        stream.write(json.dumps(fields) + "\n")
        if not self._flush_pending:
            # One flush per event-loop turn: lines stay timely, a burst costs one syscall.
            self._flush_pending = True
            try:
                asyncio.get_running_loop().call_soon(self._flush, stream)
            except RuntimeError:
                self._flush(stream)

    def _flush(self, stream: TextIO) -> None:
        self._flush_pending = False
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed: nothing to do for a log line


_writer = _RequestWriter(None, "json", worker_id())


def log_request(ctx: RequestContext) -> None:
    """Emit the one `request` line for a finished request."""
    _writer.write(ctx)


def log_audit(actor: str, action: str, target: str, **fields: Any) -> None:
    """Emit an `audit` event for an administrative change."""
    logger().info("audit", actor=actor, action=action, target=target, **fields)


# --- the audit trail: a line on stdout and an event in the store's bounded audit stream -----

#: GET /admin/audit and `gateway audit list`: events returned by default and at most.
AUDIT_LIST_DEFAULT = 1000
AUDIT_LIST_MAX = 10_000

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


async def record_audit(store: Store | None, actor: str, action: str, target: str,
                       **fields: Any) -> None:
    """Print the `audit` line and append the event (time, actor, action, target, `fields`) to
    the store's audit stream. The change is made already: a failed append never raises; it is
    logged as `audit_append_failed` (an error) and the audit line is printed all the same.
    `fields` never hold a secret."""
    log_audit(actor, action, target, **fields)
    if store is None:
        return
    event = {"time": time.time(), "actor": actor, "action": action, "target": target, **fields}
    try:
        await store.append_audit(event)
    except Exception as exc:  # whatever the store raised: the change stands
        logger().error("audit_append_failed", actor=actor, action=action, target=target,
                       error=type(exc).__name__)


def reseller_statuses(doc: str | None) -> dict[str, str]:
    """Reseller → status of a stored (canonical JSON) policy document."""
    if not doc:
        return {}
    resellers = json.loads(doc).get("resellers") or {}
    return {name: str(r.get("status", "active")) for name, r in resellers.items()
            if isinstance(r, dict)}


async def record_policy_applied(store: Store | None, actor: str, version: int,
                                old_doc: str | None, new_doc: str) -> None:
    """Audit a new policy version, and each reseller whose status it changed (a reseller new
    to the policy counts when it arrives suspended)."""
    await record_audit(store, actor, "policy_applied", "policy", version=version)
    before = reseller_statuses(old_doc)
    for name, status in sorted(reseller_statuses(new_doc).items()):
        previous = before.get(name)
        if status != (previous or "active"):
            await record_audit(store, actor, "reseller_status_changed", name, reseller=name,
                               status=status, previous_status=previous, version=version)


def parse_since(value: str, now: float | None = None) -> float:
    """A `since` bound as Unix seconds: a duration back from now (`90s`, `30m`, `24h`, `7d`),
    an ISO 8601 time (UTC when it names no zone) or Unix seconds; ValueError otherwise."""
    v = value.strip()
    now = time.time() if now is None else now
    m = _DURATION.match(v)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        seconds = float(v)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"since {value[:64]!r}: not a time")
        return seconds
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"since {value[:64]!r}: use 24h, 30m, 7d, an ISO 8601 time or Unix "
                         "seconds") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_limit(value: str | None) -> int:
    """A `limit` of listed events: 1 to AUDIT_LIST_MAX (default AUDIT_LIST_DEFAULT)."""
    if value is None or value == "":
        return AUDIT_LIST_DEFAULT
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"limit must be an integer from 1 to {AUDIT_LIST_MAX}") from None
    if not 1 <= n <= AUDIT_LIST_MAX:
        raise ValueError(f"limit must be an integer from 1 to {AUDIT_LIST_MAX}")
    return n
