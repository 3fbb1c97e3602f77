"""Fixtures of the Redis transport tests: a second, plain client to the test's own server
(to look at it and change it behind the transport's back), a long script and a wait for a
call to be mid-flight in it, and a switch that stops and continues the server process."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.store.redis.runner import Script
from tests.support.gateway import poll
from tests.support.redis_server import RedisServer

_BUSY = """
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000000 + tonumber(t[2])
while true do
  local n = redis.call('TIME')
  if tonumber(n[1]) * 1000000 + tonumber(n[2]) - start > tonumber(ARGV[1]) * 1000 then break end
end
return 1
"""


@pytest.fixture
def busy_script() -> Script:
    """A script that keeps the server busy for ARGV[1] ms of its own clock."""
    return Script("busy", _BUSY)


@pytest_asyncio.fixture
async def other(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A redis-py client of the test's server, beside the transport under test; the server
    answers other clients BUSY once a script has run for 10 ms."""
    client = aioredis.from_url(redis_server.url)
    await client.config_set("busy-reply-threshold", 10)
    try:
        yield client
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def inside_script(other: aioredis.Redis) -> Callable[[], Awaitable[None]]:
    """Wait until the server is inside a long script: a call is then mid-flight."""

    async def busy() -> bool:
        try:
            await other.ping()
        except ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    async def wait() -> None:
        await poll(busy, timeout=20.0, interval=0.005)

    return wait


@pytest.fixture
def pause(redis_server: RedisServer) -> Iterator[Callable[[bool], None]]:
    """`pause(True)` stops the server process (its sockets stay open and what clients write
    waits in the kernel: every call times out), `pause(False)` continues it; continued at
    the end of the test in any case."""
    proc = redis_server._process
    assert proc is not None

    def switch(stop: bool) -> None:
        os.kill(proc.pid, signal.SIGSTOP if stop else signal.SIGCONT)

    try:
        yield switch
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
