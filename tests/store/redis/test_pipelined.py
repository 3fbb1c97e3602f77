"""gateway.store.redis.pipelined: the RESP encoding of a pipelined call, and the runner on a
real redis-server (scripts by SHA, NOSCRIPT, error replies, order, failures, timeouts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import hiredis
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import StoreError
from gateway.store.base import PIPELINE_STATS, StoreCallNotSent
from gateway.store.redis.pipelined import PipelinedRunner, _encode
from gateway.store.redis.runner import Script
from tests.support.gateway import poll
from tests.support.redis_server import RedisServer

ECHO = Script("echo", "return ARGV[1]")
PUSH = Script("push", "return redis.call('RPUSH', KEYS[1], ARGV[1])")
REFUSE = Script("refuse", "return redis.error_reply('OOM no room for ' .. ARGV[1])")


def test_encode_is_a_resp_array_of_bulk_strings() -> None:
    """Arguments become a RESP array of bulk strings; numbers are sent as their text."""
    assert _encode(("EVALSHA", "abc", 1, b"k\r\n")) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n$3\r\nk\r\n\r\n")


def test_encode_counts_bytes_not_characters() -> None:
    """A non-ASCII argument's length is its UTF-8 byte count."""
    assert _encode(("é",)) == b"*1\r\n$2\r\n\xc3\xa9\r\n"


@given(st.lists(st.one_of(st.binary(), st.text(), st.integers()), max_size=8))
def test_encode_is_read_back_by_a_resp_parser(args: list[bytes | str | int]) -> None:
    """hiredis parses the encoding back into the same arguments, as bytes."""
    reader = hiredis.Reader()
    reader.feed(_encode(tuple(args)))
    expected = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    assert reader.gets() == expected


@pytest_asyncio.fixture
async def runner(redis_server: RedisServer) -> AsyncIterator[PipelinedRunner]:
    """A pipelined runner of the test's own server (1 s timeout), closed afterwards."""
    r = PipelinedRunner(redis_server.url, 1.0)
    try:
        yield r
    finally:
        await r.close()


async def test_a_loaded_script_runs_by_sha(runner: PipelinedRunner,
                                           other: aioredis.Redis) -> None:
    """Once loaded, every call is one EVALSHA (never the source again), answered in kind."""
    assert await runner.run(PUSH, ["list"], ["a"]) == 1
    assert runner.connected
    await other.config_resetstat()
    assert [await runner.run(PUSH, ["list"], [x]) for x in "bcd"] == [2, 3, 4]
    stats = await other.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 3
    assert "cmdstat_eval" not in stats
    assert (await other.script_exists(PUSH.sha)) == [True]


async def test_a_flushed_script_is_sent_again(runner: PipelinedRunner,
                                              other: aioredis.Redis) -> None:
    """After SCRIPT FLUSH the next call is answered NOSCRIPT, sends the source, and gets
    the script's reply; the script is then loaded again."""
    assert await runner.run(ECHO, [], ["a"]) == b"a"
    await other.script_flush()
    assert (await other.script_exists(ECHO.sha)) == [False]
    assert await runner.run(ECHO, [], ["b"]) == b"b"
    assert (await other.script_exists(ECHO.sha)) == [True]


async def test_an_error_reply_is_a_store_error_naming_only_its_first_word(
        runner: PipelinedRunner) -> None:
    """A script's error reply raises StoreError `store error: OOM`: the condition, without
    the rest of the reply (it may echo arguments)."""
    with pytest.raises(StoreError, match=r"^store error: OOM$"):
        await runner.run(REFUSE, [], ["secret-arg"])
    assert await runner.run(ECHO, [], ["still"]) == b"still"  # the connection stays up


async def test_calls_made_in_one_loop_turn_are_answered_in_order(
        runner: PipelinedRunner, other: aioredis.Redis) -> None:
    """Two hundred calls started together run in the order they were made, each getting its
    own reply."""
    await runner.run(PUSH, ["warm"], ["x"])
    replies = await asyncio.gather(*(runner.run(PUSH, ["seq"], [i]) for i in range(200)))
    assert replies == list(range(1, 201))
    assert await other.lrange("seq", 0, -1) == [str(i).encode() for i in range(200)]


async def test_calls_of_one_loop_turn_leave_in_one_socket_write(runner: PipelinedRunner) -> None:
    """Implicit pipelining: fifty calls started in one event-loop turn are written to the
    socket together, once, and the write counter says so."""
    await runner.run(ECHO, [], ["warm"])
    writes, commands = PIPELINE_STATS.writes, PIPELINE_STATS.commands
    replies = await asyncio.gather(*(runner.run(ECHO, [], [i]) for i in range(50)))
    assert replies == [str(i).encode() for i in range(50)]
    assert PIPELINE_STATS.writes - writes == 1
    assert PIPELINE_STATS.commands - commands == 50


async def _submitted(runner: PipelinedRunner, script: Script,
                     arg: object) -> tuple[object, BaseException | None]:
    """`submit`'s outcome, as the callback is handed it."""
    out: asyncio.Future[tuple[object, BaseException | None]] = (
        asyncio.get_running_loop().create_future())
    assert runner.submit(script, [], [arg], lambda r, e: out.set_result((r, e)))
    return await out


async def test_submit_answers_by_callback_as_run_answers(runner: PipelinedRunner,
                                                         other: aioredis.Redis) -> None:
    """`submit` reports what `run` would return or raise: the reply; after SCRIPT FLUSH the
    reply of the source sent again; an error reply as `store error: OOM`. Before the
    connection is up it declines (False), calling nothing."""
    calls: list[object] = []
    assert not runner.submit(ECHO, [], ["x"], lambda r, e: calls.append((r, e)))
    assert not runner.before_flush(lambda: calls.append("flush"))
    assert await runner.run(ECHO, [], ["a"]) == b"a"
    assert await _submitted(runner, ECHO, "b") == (b"b", None)
    await other.script_flush()
    assert await _submitted(runner, ECHO, "c") == (b"c", None)
    reply, error = await _submitted(runner, REFUSE, "secret-arg")
    assert reply is None and isinstance(error, StoreError)
    assert str(error) == "store error: OOM"
    assert calls == []


async def test_a_producer_before_the_flush_joins_the_turns_write(
        runner: PipelinedRunner) -> None:
    """What a `before_flush` producer submits leaves in the same write as the calls of the
    turn it was registered in, one loop iteration later."""
    await runner.run(ECHO, [], ["warm"])
    writes = PIPELINE_STATS.writes
    answers: list[object] = []
    ran = asyncio.ensure_future(runner.run(ECHO, [], ["plain"]))
    assert runner.before_flush(lambda: runner.submit(
        ECHO, [], ["produced"], lambda r, e: answers.append(r)))
    await asyncio.sleep(0)  # the iteration that runs `ran` and, after it, the flush
    await asyncio.sleep(0)
    assert PIPELINE_STATS.writes - writes == 1
    assert await ran == b"plain"
    await poll(lambda: answers == [b"produced"], timeout=5.0)
    assert PIPELINE_STATS.writes - writes == 1


async def test_a_producer_that_raises_stops_nothing(runner: PipelinedRunner) -> None:
    """A `before_flush` producer that raises (a bug) is logged; the turn's write and every
    later one still happen."""
    await runner.run(ECHO, [], ["warm"])

    def broken() -> None:
        raise RuntimeError("bug")

    assert runner.before_flush(broken)
    assert await asyncio.wait_for(runner.run(ECHO, [], ["same turn"]), 5) == b"same turn"
    assert await asyncio.wait_for(runner.run(ECHO, [], ["later"]), 5) == b"later"


async def test_a_command_that_cannot_be_encoded_is_never_pending(
        runner: PipelinedRunner) -> None:
    """Arguments the packer refuses fail that call alone, and the replies of the calls after
    it stay matched to their calls."""
    await runner.run(ECHO, [], ["warm"])
    outcome: list[BaseException | None] = []
    assert runner.submit(ECHO, [], [None], lambda r, e: outcome.append(e))
    assert len(outcome) == 1 and outcome[0] is not None
    replies = await asyncio.gather(*(runner.run(ECHO, [], [i]) for i in range(5)))
    assert replies == [str(i).encode() for i in range(5)]


async def test_a_server_dying_mid_call_fails_the_call_with_store_error(
        runner: PipelinedRunner, redis_server: RedisServer, busy_script: Script,
        inside_script: Callable[[], Awaitable[None]]) -> None:
    """A call whose server is killed while it runs raises StoreError (store unavailable);
    the next call, with no server to connect to, raises StoreCallNotSent."""
    await runner.run(ECHO, [], ["up"])
    call = asyncio.create_task(runner.run(busy_script, [], [30_000]))
    await inside_script()
    redis_server.kill()
    with pytest.raises(StoreError, match=r"^store unavailable"):
        await call
    with pytest.raises(StoreCallNotSent):
        await runner.run(ECHO, [], ["down"])


async def test_a_call_past_the_timeout_fails_and_the_next_reconnects(
        redis_server: RedisServer, pause: Callable[[bool], None]) -> None:
    """With the server stopped, a call fails with StoreError after about the timeout (the
    watchdog); once the server continues, the next call reconnects and is answered."""
    runner = PipelinedRunner(redis_server.url, 0.3)
    try:
        await runner.run(ECHO, [], ["up"])
        pause(True)
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"^store unavailable: timed out$"):
            await runner.run(ECHO, [], ["lost"])
        assert 0.3 <= time.monotonic() - t0 < 5.0
        assert not runner.connected  # the connection was given up
        pause(False)

        async def answered() -> bool:
            try:
                return await runner.run(ECHO, [], ["back"]) == b"back"
            except StoreError:
                return False

        assert await poll(answered, timeout=20.0)
    finally:
        await runner.close()


async def test_close_fails_the_calls_still_waiting(
        runner: PipelinedRunner, busy_script: Script,
        inside_script: Callable[[], Awaitable[None]]) -> None:
    """Closing the runner fails a call in flight with StoreError, and later calls too."""
    await runner.run(ECHO, [], ["up"])
    call = asyncio.create_task(runner.run(busy_script, [], [2_000]))
    await inside_script()
    await runner.close()
    with pytest.raises(StoreError, match="store closed"):
        await call
    with pytest.raises(StoreError):
        await runner.run(ECHO, [], ["closed"])
