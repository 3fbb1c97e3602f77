"""An upstream that misbehaves on purpose — hangs, resets mid-stream, answers garbage — behind a
real gateway: the documented status, no crash, no leaked lease, tokens spent only as §8 says,
and the next request served without a restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from tests.integration.test_proxy import request_lines
from tests.support.gateway import RunningGateway, running_gateway

US = "192.0.2.1"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
START = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
         b'{"input_tokens":10,"output_tokens":1}}}\n\n')


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class MisbehavingUpstream:
    """A raw TCP upstream: `mode` says what it does with the next request."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.seen = 0
        self.url = ""
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            self.seen += 1
            if self.mode == "hang":
                await asyncio.sleep(3600)
            elif self.mode == "reset_mid_stream":
                writer.write(SSE_HEAD + _chunk(START))
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.transport.abort()
                return
            elif self.mode == "garbage":
                writer.write(b"\x00\x01 this is not HTTP\r\n\r\n")
            elif self.mode == "garbage_json":
                body = b"<html>not json</html>"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            else:
                body = json.dumps({"type": "message", "content": [], "usage": {
                    "input_tokens": 10, "output_tokens": 5}}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MisbehavingUpstream]:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()


async def ask(gw: RunningGateway, key: str, max_tokens: int = 600,
              stream: bool = False) -> tuple[int, bytes]:
    body = {"model": "claude-test-1", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(
            gw.url + "/v1/messages", json=body, headers={"x-api-key": key,
                                                         "X-Forwarded-For": US}) as r:
        try:
            return r.status, await r.read()
        except aiohttp.ClientPayloadError:
            return r.status, b"<cut>"


async def test_hanging_upstream_is_504_refunded_and_the_lease_released(tmp_path: Path) -> None:
    """No answer within read_timeout_s: 504 upstream_timeout; the concurrency-1 key's lease and
    its 600 reserved output tokens (of otpm 1000) come back, so the next request is served."""
    async with MisbehavingUpstream().running() as up, running_gateway(
            tmp_path, up.url, upstream={"read_timeout_s": 0.5}) as gw:
        _, key = await gw.issue_key(concurrency=1, otpm=1000)
        up.mode = "hang"
        status, body = await ask(gw, key)
        assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
        up.mode = "ok"
        status, _ = await ask(gw, key)
        assert status == 200
        lines = await request_lines(gw, 2)
        assert [x["status"] for x in lines] == [504, 200]


async def test_upstream_reset_mid_stream_cuts_the_stream_and_charges_it(tmp_path: Path) -> None:
    """An upstream that resets after message_start: the client's stream is cut (never a clean
    end), the request is charged its whole output reservation, the lease is released."""
    async with MisbehavingUpstream().running() as up, running_gateway(tmp_path, up.url) as gw:
        _, key = await gw.issue_key(concurrency=1, otpm=1000)
        up.mode = "reset_mid_stream"
        status, body = await ask(gw, key, max_tokens=600, stream=True)
        assert status == 200 and (body == b"<cut>" or b"message_stop" not in body)
        [line] = await request_lines(gw, 1)
        assert line["upstream_status"] == 200
        up.mode = "ok"
        # 600 charged of 1000: another 600 does not fit, 300 does (and the lease is free).
        status, body = await ask(gw, key, max_tokens=600)
        assert status == 429 and json.loads(body)["error"]["code"] == "output_tokens_per_minute"
        status, _ = await ask(gw, key, max_tokens=300)
        assert status == 200


async def test_garbage_from_the_upstream_is_502(tmp_path: Path) -> None:
    """Bytes that are not HTTP: 502 upstream_unavailable, refunded, and the gateway serves on."""
    async with MisbehavingUpstream().running() as up, running_gateway(tmp_path, up.url) as gw:
        _, key = await gw.issue_key(concurrency=1, otpm=1000)
        up.mode = "garbage"
        status, body = await ask(gw, key)
        assert status == 502 and json.loads(body)["error"]["code"] == "upstream_unavailable"
        up.mode = "ok"
        status, _ = await ask(gw, key)
        assert status == 200


async def test_unreadable_json_answer_is_charged_its_reservation(tmp_path: Path) -> None:
    """A 200 whose JSON body cannot be read says nothing of what was generated: the output
    reservation is charged rather than nothing."""
    async with MisbehavingUpstream().running() as up, running_gateway(tmp_path, up.url) as gw:
        _, key = await gw.issue_key(otpm=1000)
        up.mode = "garbage_json"
        status, _ = await ask(gw, key, max_tokens=600)
        assert status == 200
        await request_lines(gw, 1)
        up.mode = "ok"
        status, body = await ask(gw, key, max_tokens=600)
        assert status == 429 and json.loads(body)["error"]["code"] == "output_tokens_per_minute"
