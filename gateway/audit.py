"""Structured logging, configured once: the request line, audit events and operational events."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

import structlog

from gateway.context import RequestContext

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


_stream: TextIO | None = None


def set_log_stream(stream: TextIO | None) -> None:
    """Send log lines to `stream` instead of stdout (embedding and tests)."""
    global _stream
    _stream = stream


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog for the process (JSON lines on stdout, or console for local work)."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    global _writer
    _writer = _RequestWriter(_stream, level, fmt)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=_stream or sys.stdout),
        cache_logger_on_first_use=False,  # reconfigured on SIGHUP and in tests
    )


def logger() -> Any:
    """The gateway's structlog logger (events are nouns with flat snake_case fields)."""
    return structlog.get_logger("gateway")


class _RequestWriter:
    """The `request` line on the hot path: the same JSON structlog renders, written directly
    (structlog's processor chain costs about 5 times more per line)."""

    __slots__ = ("_flush_pending", "_prefix", "_sec", "enabled", "fast", "stream")

    def __init__(self, stream: TextIO | None, level: str, fmt: str) -> None:
        self.stream = stream
        self.enabled = _LEVELS[level] <= logging.INFO
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
        if not self.enabled:
            return
        fields = ctx.log_fields()
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


_writer = _RequestWriter(None, "info", "json")


def log_request(ctx: RequestContext) -> None:
    """Emit the one `request` line for a finished request."""
    _writer.write(ctx)


def log_audit(actor: str, action: str, target: str, **fields: Any) -> None:
    """Emit an `audit` event for an administrative change."""
    logger().info("audit", actor=actor, action=action, target=target, **fields)
