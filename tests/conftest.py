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
from tests.support.transcript import TRANSCRIPT  # noqa: E402
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


# --- diagnostics ---


@pytest_asyncio.fixture(autouse=True)
async def _dump_tasks_if_stuck() -> AsyncIterator[None]:
    """If a test is still running after 90 s (the per-test timeout is 120 s), print the stack
    of every asyncio task: pytest-timeout alone shows only the event loop's select()."""
    import asyncio
    import sys

    def dump() -> None:
        print("\n=== asyncio tasks of a test running for 90 s ===", file=sys.stderr)
        for task in asyncio.all_tasks():
            print(f"--- {task.get_name()}: {task.get_coro()!r}", file=sys.stderr)
            task.print_stack(limit=15, file=sys.stderr)

    handle = asyncio.get_running_loop().call_later(90.0, dump)
    try:
        yield
    finally:
        handle.cancel()


# --- secrets never shown ---


@pytest.fixture(autouse=True)
def _search_output_for_secrets(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, search what its gateways and CLIs printed for the secrets they held."""
    yield
    TRANSCRIPT.end_test(request.node.nodeid)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The secret search (tests/test_zz_no_secrets.py) runs after every other test."""
    last = [i for i in items if i.nodeid.startswith("tests/test_zz_no_secrets.py")]
    items[:] = [i for i in items if i not in last] + last
