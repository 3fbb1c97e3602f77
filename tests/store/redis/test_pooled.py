"""gateway.store.redis.pooled: Sentinel URL parsing, and the runner over redis-py's pool on a
real redis-server (scripts by SHA, NOSCRIPT, error replies, failures, timeouts, decoding)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.errors import StoreError
from gateway.store.redis.pooled import PooledRunner, sentinel_parts
from gateway.store.redis.runner import Script
from tests.support.gateway import poll
from tests.support.redis_server import RedisServer

ECHO = Script("echo", "return ARGV[1]")
PUSH = Script("push", "return redis.call('RPUSH', KEYS[1], ARGV[1])")


def test_sentinel_url_names_hosts_service_db_and_password() -> None:
    """Every host with its port (26379 by default), the service, the db and the password."""
    hosts, service, db, password = sentinel_parts(
        "redis+sentinel://:p%40ss@s1:26380,s2,[::1]:26381,[fd00::2]/gwmaster/3")
    assert hosts == [("s1", 26380), ("s2", 26379), ("::1", 26381), ("fd00::2", 26379)]
    assert (service, db, password) == ("gwmaster", 3, "p@ss")


def test_sentinel_url_without_db_or_password() -> None:
    """No db segment means db 0; no user-info means no password."""
    assert sentinel_parts("redis+sentinel://s1:26379/gw") == ([("s1", 26379)], "gw", 0, None)


def test_sentinel_url_needs_a_service_name() -> None:
    """A Sentinel URL with no path is refused, saying the service name is needed."""
    with pytest.raises(ValueError, match="service name"):
        sentinel_parts("redis+sentinel://s1:26379")


def test_the_url_picks_the_client() -> None:
    """A `redis+cluster://` URL gets redis-py's Cluster client, a `redis+sentinel://` one the
    master of its service, any other the plain client; none connects before its first call."""
    assert PooledRunner("redis+cluster://127.0.0.1:1", 1.0).cluster
    sentinel = PooledRunner("redis+sentinel://127.0.0.1:1/gwmaster", 1.0)
    assert not sentinel.cluster and sentinel._sentinel is not None
    plain = PooledRunner("redis://127.0.0.1:1/0", 1.0)
    assert not plain.cluster and plain._sentinel is None


@pytest_asyncio.fixture
async def runner(redis_server: RedisServer) -> AsyncIterator[PooledRunner]:
    """A pooled runner of the test's own server (1 s timeout), closed afterwards."""
    r = PooledRunner(redis_server.url, 1.0)
    await r.start()
    try:
        yield r
    finally:
        await r.close()


async def test_a_loaded_script_runs_by_sha(runner: PooledRunner,
                                           other: aioredis.Redis) -> None:
    """Once loaded, every call is one EVALSHA (never the source again), answered in kind."""
    assert await runner.run(PUSH, ["list"], ["a"]) == 1
    await other.config_resetstat()
    assert [await runner.run(PUSH, ["list"], [x]) for x in "bcd"] == [2, 3, 4]
    stats = await other.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 3
    assert "cmdstat_eval" not in stats and "cmdstat_script|load" not in stats


async def test_a_flushed_script_is_loaded_again(runner: PooledRunner,
                                                other: aioredis.Redis) -> None:
    """After SCRIPT FLUSH the next call is answered NOSCRIPT, loads the script, and gets the
    script's reply."""
    assert await runner.run(ECHO, [], ["a"]) == b"a"
    await other.script_flush()
    assert (await other.script_exists(ECHO.sha)) == [False]
    assert await runner.run(ECHO, [], ["b"]) == b"b"
    assert (await other.script_exists(ECHO.sha)) == [True]


@pytest.mark.parametrize("kind", ["READONLY", "OOM", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
                                  "NOSCRIPT", "ERR", "WHATEVER"])
async def test_an_error_reply_is_a_store_error_naming_only_its_first_word(
        runner: PooledRunner, kind: str) -> None:
    """A script's error reply raises StoreError `store error: <KIND>`, its first word (also
    for the replies redis-py turns into classes of its own), without the rest (it may echo
    arguments); the runner keeps working."""
    refuse = Script(f"refuse-{kind}",
                    f"return redis.error_reply('{kind} refused ' .. ARGV[1])")
    with pytest.raises(StoreError, match=rf"^store error: {kind}$"):
        await runner.run(refuse, [], ["secret-arg"])
    assert await runner.run(ECHO, [], ["still"]) == b"still"


async def test_a_command_error_reply_is_a_store_error(runner: PooledRunner) -> None:
    """A plain command's error reply through `call` is a StoreError naming its kind."""
    await runner.call(runner.client.hset("h", "f", "v"))
    with pytest.raises(StoreError, match=r"^store error: WRONGTYPE$"):
        await runner.call(runner.client.rpush("h", "x"))


async def test_concurrent_calls_each_get_their_own_reply(runner: PooledRunner) -> None:
    """Calls started together (several pooled connections) each get their own reply."""
    replies = await asyncio.gather(*(runner.run(ECHO, [], [i]) for i in range(50)))
    assert replies == [str(i).encode() for i in range(50)]


async def test_a_reply_decode_refuses_is_a_store_error(runner: PooledRunner) -> None:
    """`call` hands the reply to `decode`; a reply it refuses is `store unavailable: <type>`."""
    assert await runner.call(runner.client.set("n", "7")) is True
    assert await runner.call(runner.client.get("n"), decode=int) == 7
    with pytest.raises(StoreError, match=r"^store unavailable: ValueError$"):
        await runner.call(runner.client.get("n"), decode=lambda raw: int(raw + b"x"))


async def test_a_server_dying_mid_call_fails_the_call_with_store_error(
        runner: PooledRunner, redis_server: RedisServer, busy_script: Script,
        inside_script: Callable[[], Awaitable[None]]) -> None:
    """A call whose server is killed while it runs raises StoreError (store unavailable),
    and so does the next call, with no server to connect to."""
    await runner.run(ECHO, [], ["up"])
    call = asyncio.create_task(runner.run(busy_script, [], [30_000]))
    await inside_script()
    redis_server.kill()
    with pytest.raises(StoreError, match=r"^store unavailable"):
        await call
    with pytest.raises(StoreError, match=r"^store unavailable"):
        await runner.run(ECHO, [], ["down"])


async def test_a_call_past_the_timeout_fails_and_the_next_is_answered(
        redis_server: RedisServer, pause: Callable[[bool], None]) -> None:
    """With the server stopped, a call fails with StoreError within its deadline (a few
    socket timeouts); once the server continues, calls are answered again."""
    runner = PooledRunner(redis_server.url, 0.3)
    try:
        await runner.run(ECHO, [], ["up"])
        pause(True)
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"^store unavailable"):
            await runner.run(ECHO, [], ["lost"])
        assert 0.3 <= time.monotonic() - t0 < 0.3 * 4 + 1.0 + 2.0
        pause(False)

        async def answered() -> bool:
            try:
                return await runner.run(ECHO, [], ["back"]) == b"back"
            except StoreError:
                return False

        assert await poll(answered, timeout=20.0)
    finally:
        await runner.close()


async def test_a_subscriber_is_a_client_of_its_own(runner: PooledRunner,
                                                   other: aioredis.Redis) -> None:
    """`subscriber()` gives a new client each time, which receives what is published."""
    first, second = runner.subscriber(), runner.subscriber()
    assert first is not second and first is not runner.client
    pubsub = first.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe("ch")
        await poll(lambda: other.publish("ch", "hello"), timeout=10.0)
        msg = await poll(lambda: pubsub.get_message(timeout=0.5), timeout=10.0)
        assert msg["data"] == b"hello"
    finally:
        await pubsub.aclose()
        await first.aclose()
        await second.aclose()
