"""Slow and idle clients on real sockets: a trickled request head is closed after
server.header_timeout_s, an idle keep-alive connection after server.idle_timeout_s, and
connections past server.max_connections wait in the backlog without starving the admin
listener."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
from pathlib import Path

import aiohttp

from tests.integration.test_lifecycle import OPEN_POLICY
from tests.support.cli import cli, gateway_process
from tests.support.gateway import poll, running_gateway
from tests.support.upstream import FakeUpstream

HEAD = (b"POST /v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"X-Forwarded-For: 192.0.2.1\r\n")


async def _closed(reader: asyncio.StreamReader, sink: bytearray) -> bool:
    """Whether the server has closed the connection; what it sent is appended to `sink`."""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout=0.05)
            if not chunk:
                return True
            sink += chunk
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_trickled_request_head_is_closed(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A head sent one header line at a time is cut after header_timeout_s with a 408, long
    before the client would have finished it."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY,
                               server={"header_timeout_s": 1, "idle_timeout_s": 60}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.proxy_port)
        writer.write(HEAD)
        sent = bytearray()
        closed = False
        for n in range(60):  # a header line every 0.5 s: 30 s for the whole head
            try:
                writer.write(f"X-Trickle-{n}: x\r\n".encode())
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            closed = await _closed(reader, sent)
            if closed:
                break
            await asyncio.sleep(0.45)
        writer.close()
        assert closed, "the trickled head was never cut"
        if sent:  # the optional 408 in the documented error shape
            head, _, body = bytes(sent).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408")
            assert json.loads(body)["error"]["code"] == "request_timeout"
        assert not gw.logs.requests()  # no request ever started


async def test_idle_keepalive_connection_is_closed(tmp_path: Path,
                                                   upstream: FakeUpstream) -> None:
    """A keep-alive connection left idle after a response is closed after idle_timeout_s."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY,
                               server={"header_timeout_s": 30, "idle_timeout_s": 1}) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.proxy_port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        assert status_line.startswith(b"HTTP/1.1 ")
        assert await poll(lambda: _closed(reader, bytearray()), timeout=15)
        writer.close()


async def test_connection_cap_keeps_admin_listener_answering(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """With the process's file descriptors scarce, idle connections far past max_connections
    leave /healthz on the admin listener answering; a connection past the cap waits in the
    backlog and is served once held ones close."""
    cap, nofile = 100, 256
    async with gateway_process(tmp_path, upstream.url, OPEN_POLICY, rlimit_nofile=nofile,
                               server={"max_connections": cap, "header_timeout_s": 60}) as gw:
        code, out, err = await cli("keys", "issue", "--reseller", "direct", "--json",
                                   "--config", str(gw.config), cwd=tmp_path)
        assert code == 0, err
        key = json.loads(out)["key"]
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert soft > 3 * nofile  # this test process can hold what it opens
        held: list[socket.socket] = []
        try:
            for _ in range(2 * nofile):  # idle connections: more than the gateway's fds
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", gw.port))
                except BlockingIOError:
                    pass
                held.append(s)

            async def healthy() -> bool:
                try:
                    async with aiohttp.ClientSession() as http, http.get(
                            gw.admin_url + "/healthz",
                            timeout=aiohttp.ClientTimeout(total=2)) as r:
                        return r.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            for _ in range(5):
                assert await poll(healthy, timeout=10)
            # One more client past the cap: queued, answered once held connections close.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write("GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                         f"x-api-key: {key}\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n".encode())
            await writer.drain()
            for s in held:
                s.close()
            held.clear()
            status_line = await asyncio.wait_for(reader.readline(), timeout=30)
            assert status_line.startswith(b"HTTP/1.1 200"), status_line
            writer.close()
            assert await healthy()
        finally:
            for s in held:
                s.close()
