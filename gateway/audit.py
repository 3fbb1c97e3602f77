"""Structured logging, configured once: the request line, audit events and operational events."""

from __future__ import annotations

import logging
import sys
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
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=_stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def logger() -> Any:
    """The gateway's structlog logger (events are nouns with flat snake_case fields)."""
    return structlog.get_logger("gateway")


def log_request(ctx: RequestContext) -> None:
    """Emit the one `request` line for a finished request."""
    logger().info("request", **ctx.log_fields())


def log_audit(actor: str, action: str, target: str, **fields: Any) -> None:
    """Emit an `audit` event for an administrative change."""
    logger().info("audit", actor=actor, action=action, target=target, **fields)
