"""Fixtures of the integration suites."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.gateway import store_config


@pytest.fixture(params=["memory", "redis"])
def store_cfg(request: pytest.FixtureRequest) -> dict[str, Any]:
    """`store:` config of the embedded store, or of the session's redis-server under a prefix
    of this test alone."""
    return store_config(request, request.param)
