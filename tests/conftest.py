"""Shared pytest fixtures; infrastructure (Redis, fake upstream) comes from tests.support."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

# Helpers are imported as `tests.support.*`; make the project root importable
# even when pytest runs without `pythonpath = ["."]` or a tests/__init__.py.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.redis_server import RedisCluster, RedisSentinel, RedisServer  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

# --- infrastructure fixtures ---


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server of this test alone, stopped afterwards."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server_session() -> Iterator[RedisServer]:
    """One redis-server for the whole session: use a unique key prefix, never flush."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One three-master Redis Cluster for the whole session (state ok)."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """One redis-server master watched by one Sentinel (service `gwmaster`) for the whole
    session; `.url` is its `redis+sentinel://` store URL. Use a unique key prefix, never flush."""
    with RedisSentinel() as sentinel:
        yield sentinel


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A started fake model API (Anthropic + OpenAI formats) on a free port."""
    async with FakeUpstream() as fake:
        yield fake
