"""gateway.log: one named structlog logger for the modules below the edge."""

from __future__ import annotations

import structlog

from gateway.log import logger


def test_logger_emits_events_as_dicts() -> None:
    """Events logged through the gateway logger arrive as flat dicts with their fields."""
    with structlog.testing.capture_logs() as logs:
        logger().warning("geo_database_missing", path="x.mmdb")
    assert logs == [{"event": "geo_database_missing", "path": "x.mmdb",
                     "log_level": "warning"}]
