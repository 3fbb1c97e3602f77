"""The request log: structlog configured once for the process (level, format, the `worker`
field), and the one `request` line per request, written on the hot path
(docs/architecture.md §7). The audit trail is gateway/audit.py."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any, TextIO

import structlog

from gateway.context import RequestContext
from gateway.hash_chain import HashChain
from gateway.jsonio import json_dumps
from gateway.log import logger

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
#: This process's hash chain (`log.hash_chain`): drawn once, kept across reconfigurations.
_chain: HashChain | None = None


def hash_chain() -> HashChain:
    """This process's chain (created on first use)."""
    global _chain
    if _chain is None:
        _chain = HashChain()
    return _chain


class _ChainedLogger:
    """structlog's logger with `log.hash_chain`: takes the event dict the processors built,
    seals it into the chain and writes it (docs/logs.md "Hash chain")."""

    def __init__(self, stream: TextIO, chain: HashChain) -> None:
        self._stream = stream
        self._chain = chain

    def msg(self, event: dict[str, Any]) -> None:
        self._chain.write(event, self._stream, default=repr)
        self._stream.flush()

    debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg
    log = msg


def _pass_dict(_logger: Any, _method: str, event: Any) -> Any:
    """The last processor with the chain: the event dict itself goes to `_ChainedLogger`."""
    return (event,), {}


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


def configure_logging(level: str = "info", fmt: str = "json", chained: bool = False) -> None:
    """Configure structlog for the process (JSON lines on stdout, or console for local work).

    `level` filters diagnostic events only: request and audit lines print at every level.
    Every line carries `worker` (GATEWAY_WORKER_ID in a worker process, else null).
    `chained` (`log.hash_chain`, JSON only) seals every line into this process's hash chain."""
    renderer: Any
    chain = hash_chain() if chained and fmt == "json" else None
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    elif chain is not None:
        renderer = _pass_dict
    else:
        renderer = structlog.processors.JSONRenderer()
    global _writer
    worker = worker_id()
    _writer = _RequestWriter(_stream, fmt, worker, chain)
    stream = _stream or sys.stdout
    factory: Any = (structlog.WriteLoggerFactory(file=stream) if chain is None
                    else lambda *_args: _ChainedLogger(stream, chain))
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
        logger_factory=factory,
        cache_logger_on_first_use=False,  # reconfigured on SIGHUP and in tests
    )


class _RequestWriter:
    """The `request` line on the hot path: the same JSON structlog renders, written directly
    (structlog's processor chain costs about 5 times more per line)."""

    __slots__ = ("_flush_pending", "_prefix", "_sec", "chain", "fast", "stream", "worker")

    def __init__(self, stream: TextIO | None, fmt: str, worker: int | None = None,
                 chain: HashChain | None = None) -> None:
        self.stream = stream
        self.chain = chain
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
        if self.chain is None:
            stream.write(json_dumps(fields, newline=True).decode())
        else:
            self.chain.write(fields, stream)
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
