"""The pipelined transport: one dedicated Redis connection for the per-request scripts
(admit, settle, cancel), as a ScriptRunner.

redis.asyncio's pool costs ≈ 50 µs a call (a pool checkout and a timeout task per command);
here a call is one buffered command and one future, answered in order by a single reader that
parses with hiredis. Implicit pipelining (as ioredis' auto-pipelining): the commands of one
event-loop turn leave in ONE socket write at the end of the turn (settlements wait for company
in the store, store.py's SETTLE_WINDOW_S). `STATS` counts writes, commands and flushes.
Used for single-node `redis://`, `rediss://` and `unix://` stores;
Sentinel and Cluster keep the pooled transport (pooled.py).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import RedisError

from gateway.errors import StoreError
from gateway.log import logger
from gateway.store.base import PIPELINE_STATS as STATS
from gateway.store.base import StoreCallNotSent
from gateway.store.redis.runner import Script, error_reply


def _encode(args: tuple[Any, ...]) -> bytes:
    """One command as a RESP array of bulk strings (hiredis' packer: C, about a quarter of
    the same loop in Python)."""
    packed: bytes = hiredis.pack_command(args)
    return packed


class PipelinedConnection:
    """Sends commands without waiting; one reader task answers them in order.

    A call that gets no answer within `timeout_s` fails the connection (every pending call gets
    StoreError) and the next call reconnects."""

    def __init__(self, url: str, timeout_s: float) -> None:
        kw = parse_url(url)
        self.host = kw.get("host", "127.0.0.1")
        self.port = int(kw.get("port", 6379))
        self.path = kw.get("path")
        self.db = int(kw.get("db", 0) or 0)
        self.username = kw.get("username")
        self.password = kw.get("password")
        self.tls = url.startswith("rediss://")
        # The URL's TLS options (ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs,
        # ssl_check_hostname, ...) as redis-py parses them for the pooled client, with
        # redis-py's defaults; the context is built by redis-py too, on first connect.
        self._ssl_options: dict[str, Any] = {k: v for k, v in kw.items() if k.startswith("ssl_")}
        self._ssl: ssl.SSLContext | None = None
        self.timeout = timeout_s
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._connecting: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        # Commands of this loop turn, written together by _flush (one write per turn).
        self._buf: list[bytes] = []
        self._flush_soon = False  # a call_soon(_flush) is pending
        # Called at the turn's write, right before it: their calls join that write.
        self._producers: list[Callable[[], None]] = []

    def ssl_context(self) -> ssl.SSLContext:
        """The SSLContext the pooled client builds for the same URL (same options, same
        defaults: certificate and host name verified unless the URL says otherwise)."""
        if self._ssl is None:
            self._ssl = SSLConnection(**self._ssl_options).ssl_context.get()
        return self._ssl

    async def _connect(self) -> None:
        try:
            if self.path:
                opened = asyncio.open_unix_connection(self.path)
            else:
                opened = asyncio.open_connection(
                    self.host, self.port, ssl=self.ssl_context() if self.tls else None)
            reader, writer = await asyncio.wait_for(opened, self.timeout)
        except (TimeoutError, OSError, ValueError, TypeError, RedisError) as exc:
            # OSError covers ssl.SSLError and a CA or certificate file that cannot be read;
            # ValueError, TypeError and RedisError, TLS options redis-py itself refuses.
            raise StoreCallNotSent(f"store unavailable: {type(exc).__name__}") from exc
        self._writer = writer
        parser = hiredis.Reader()
        self._reader_task = asyncio.create_task(self._read(reader, parser), name="redis-pipelined")
        self._arm()
        hello: list[tuple[Any, ...]] = []
        if self.password:
            hello.append(("AUTH", self.username, self.password) if self.username
                         else ("AUTH", self.password))
        if self.db:
            hello.append(("SELECT", self.db))
        for cmd in hello:
            reply = await self.call(*cmd)
            if isinstance(reply, hiredis.ReplyError):
                self._fail(StoreError(f"store refused {cmd[0]}: {reply}"))
                raise StoreError(f"store refused {cmd[0]}")

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.timeout / 4, self._check)

    def _check(self) -> None:
        if self._pending and time.monotonic() - self._pending[0][1] > self.timeout:
            self._fail(StoreError("store unavailable: timed out"))
            return
        if self._writer is not None:
            self._arm()

    async def _read(self, reader: asyncio.StreamReader, parser: Any) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionResetError("connection closed by the store")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    fut, _ = self._pending.popleft()
                    if not fut.done():
                        fut.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(StoreError(f"store unavailable: {type(exc).__name__}"))

    def before_flush(self, producer: Callable[[], None]) -> None:
        """Call `producer` at this turn's write, right before it, so that the calls it makes
        leave in that write (a caller that batches its own requests of a turn, the store,
        reaches the socket one loop iteration after them instead of three)."""
        self._producers.append(producer)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write every command buffered so far in one socket write (the producers' first)."""
        try:
            if self._producers:
                producers, self._producers = self._producers, []
                for produce in producers:  # calls they make join this write (_flush_soon holds)
                    try:
                        produce()
                    except Exception as exc:  # a bug: logged; the write and later ones go on
                        logger().error("internal_error", stage="store_flush",
                                       error=type(exc).__name__, detail=str(exc)[:200])
        finally:
            self._flush_soon = False
        buf = self._buf
        if not buf or self._writer is None:
            return
        self._buf = []
        STATS.writes += 1
        STATS.commands += len(buf)
        self._writer.write(b"".join(buf) if len(buf) > 1 else buf[0])

    def _fail(self, exc: StoreError, reset: bool = True) -> None:
        # Buffered commands never left: they fail with the rest, and are never written on
        # a later connection.
        self._buf = []
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        writer, self._writer = self._writer, None
        if writer is not None:
            # Reset, not close: commands still in our send buffer are dropped rather than
            # delivered (a network partition could deliver them minutes later). Those that
            # reached Redis may still run; the caller cancels them (limits.py).
            sock = writer.get_extra_info("socket")
            try:
                if reset and sock is not None and self.path is None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            if reset:
                writer.transport.abort()
            else:
                writer.close()
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        while self._pending:
            fut, _ = self._pending.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command; the future gets the reply (error replies as hiredis.ReplyError).

        The command is written at the end of this loop turn together with the others of the
        turn."""
        if self._writer is None or self._closed:
            raise StoreCallNotSent("store unavailable: not connected")
        command = _encode(args)  # first: a command that cannot be encoded is never pending
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((fut, time.monotonic()))
        self._buf.append(command)
        if not self._flush_soon:
            self._flush_soon = True
            loop.call_soon(self._flush)
        return fut

    async def ensure(self) -> None:
        if self._writer is not None:
            return
        if self._closed:
            raise StoreError("store closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        fut = self._connecting
        try:
            await asyncio.shield(fut)
        finally:
            if self._connecting is fut and fut.done():
                self._connecting = None

    async def close(self) -> None:
        self._closed = True
        self._fail(StoreError("store closed"), reset=False)
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)


class PipelinedRunner:
    """The ScriptRunner over one PipelinedConnection: EVALSHA, and EVAL on NOSCRIPT.

    Calls made in one event-loop turn are written back to back and answered in that order;
    the connection's watchdog bounds every call (`timeout_s`), so no other deadline is
    needed. It connects on first use and reconnects after a failure."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.conn = PipelinedConnection(url, timeout_s)

    @property
    def connected(self) -> bool:
        """Whether the connection is up (it opens on the first call)."""
        return self.conn._writer is not None and not self.conn._closed

    def before_flush(self, producer: Callable[[], None]) -> bool:
        """Have `producer` called right before this turn's write (PipelinedConnection's
        before_flush); False, calling nothing, when the connection is not up."""
        if not self.connected:
            return False
        self.conn.before_flush(producer)
        return True

    def submit(self, script: Script, keys: Sequence[str], args: Sequence[Any],
               done: Callable[[Any, BaseException | None], None]) -> bool:
        """Send the script with this turn's write and call `done(reply, None)` or
        `done(None, error)` when it is answered (NOSCRIPT: sent again with its source; errors
        as `run` raises them), straight from the reply: no task, no future in between. False,
        calling nothing, when the connection is not up: then use `run`, which connects."""
        if not self.connected:
            return False
        self._send(("EVALSHA", script.sha), script, keys, args, done)
        return True

    def _send(self, head: tuple[str, str], script: Script, keys: Sequence[str],
              args: Sequence[Any], done: Callable[[Any, BaseException | None], None]) -> None:
        try:
            raw = self.conn.call(*head, len(keys), *keys, *args)
        except Exception as exc:  # not connected, or arguments that cannot be sent
            done(None, exc)
            return
        raw.add_done_callback(lambda f: self._answered(f, head[0], script, keys, args, done))

    def _answered(self, f: asyncio.Future[Any], sent: str, script: Script,
                  keys: Sequence[str], args: Sequence[Any],
                  done: Callable[[Any, BaseException | None], None]) -> None:
        if f.cancelled():
            done(None, StoreError("store unavailable: CancelledError"))
            return
        exc = f.exception()
        if exc is not None:
            done(None, exc)
            return
        reply = f.result()
        if isinstance(reply, hiredis.ReplyError):
            if sent == "EVALSHA" and str(reply).startswith("NOSCRIPT"):
                self._send(("EVAL", script.source), script, keys, args, done)
                return
            done(None, error_reply(str(reply)))
            return
        done(reply, None)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's reply: `submit`'s call (NOSCRIPT and errors handled as there), after
        connecting when the connection is not up."""
        if self.conn._writer is None:
            await self.conn.ensure()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(reply: Any, error: BaseException | None) -> None:
            if answer.done():  # the caller stopped waiting
                return
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(reply)

        self._send(("EVALSHA", script.sha), script, keys, args, done)
        return await answer

    async def close(self) -> None:
        await self.conn.close()
