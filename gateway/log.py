"""The gateway's logger, for the modules below the edge (request_log.py configures it and
writes the request line; audit.py the audit lines)."""

from __future__ import annotations

from typing import Any

import structlog


def logger() -> Any:
    """The gateway's structlog logger (events are nouns with flat snake_case fields)."""
    return structlog.get_logger("gateway")
