"""Unit tests for gateway.listeners: the listener serves an aiohttp server (over TLS too),
answers a request head that never completes with a 408, and counts its connections (small
in-process tests)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from gateway.listeners import Listener, ProxyProtocol, _timeout_response
from gateway.proxy_protocol import v2_header
from gateway.settings import ClientIPSettings
from tests.support.certs import TestCA
from tests.support.gateway import poll


async def _hello(request: web.BaseRequest) -> web.Response:
    if request.path == "/remote":
        assert request.transport is not None
        return web.Response(text=f"{request.remote} {request.transport.get_extra_info('sockname')}")
    return web.Response(text="hello")


PP = ProxyProtocol("any", (ipaddress.ip_network("127.0.0.1/32"),), 5.0)


@asynccontextmanager
async def _listening(**kwargs: object) -> AsyncIterator[tuple[Listener, int]]:
    server = web.Server(_hello)
    listener = Listener(server, "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
    port = await listener.start()
    try:
        yield listener, port
    finally:
        listener.stop_accepting()
        await server.shutdown(1.0)


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return out


def test_timeout_response_is_a_complete_408_with_the_error_body() -> None:
    """The 408 carries the §6 body, a request id matching its header, and a right length."""
    raw = _timeout_response()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)
    doc = json.loads(body)
    assert doc["error"]["code"] == "request_timeout"
    assert doc["request_id"] == headers["x-request-id"]
    assert _timeout_response() != raw  # a fresh request id each time


async def test_a_listener_serves_its_server() -> None:
    """A request to the bound port is answered by the aiohttp server behind it."""
    async with _listening() as (_, port):
        out = await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"hello")


async def test_an_incomplete_request_head_gets_a_408() -> None:
    """A connection whose request head is not complete within the timeout gets the 408."""
    async with _listening(header_timeout_s=0.2) as (_, port):
        out = await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert out.startswith(b"HTTP/1.1 408")


async def test_connections_are_counted_and_released() -> None:
    """An open connection is counted by its listener and released when it closes."""
    async with _listening(max_connections=4) as (listener, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await poll(lambda: len(listener.connections) == 1)
        writer.close()
        await writer.wait_closed()
        await poll(lambda: not listener.connections)
    assert listener.connections == set()


async def test_stop_accepting_refuses_new_connections() -> None:
    """After stop_accepting, connecting to the port is refused."""
    async with _listening() as (listener, port):
        listener.stop_accepting()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            refused = True
        else:
            writer.close()
            refused = False
    assert refused


async def test_proxy_header_source_is_request_remote() -> None:
    """After a PROXY header, aiohttp's request.remote is the header's source and sockname its
    destination; the HTTP bytes in the same packet are served."""
    async with _listening(proxy_protocol=PP) as (_, port):
        out = await _exchange(port, v2_header("192.0.2.9", "198.51.100.1", 4000, 443) +
                              b"GET /remote HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert out.endswith(b"192.0.2.9 ('198.51.100.1', 443)")


async def test_head_deadline_still_runs_after_a_proxy_header() -> None:
    """The v2 signature's blank line does not end the request head: an incomplete head after
    a header still gets the 408."""
    async with _listening(proxy_protocol=PP, header_timeout_s=0.3) as (_, port):
        out = await _exchange(port, v2_header("192.0.2.9", "127.0.0.1", 1, 2) +
                              b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert out.startswith(b"HTTP/1.1 408")


async def test_refused_header_releases_the_connection() -> None:
    """A connection closed for its header is no longer counted by the listener."""
    async with _listening(proxy_protocol=PP, max_connections=4) as (listener, port):
        assert await _exchange(port, b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n") == b""
        await poll(lambda: not listener.connections)


def test_proxy_protocol_trusts_its_networks() -> None:
    """`ProxyProtocol.of` is None when off; `trusts` matches IPv4, IPv4-mapped IPv6 and IPv6
    peers against proxy_protocol_from and nothing else."""
    assert ProxyProtocol.of(ClientIPSettings()) is None
    pp = ProxyProtocol.of(ClientIPSettings(proxy_protocol="v2",
                                           proxy_protocol_from=["10.0.0.0/8", "fd00::/8"]))
    assert pp is not None and pp.mode == "v2" and pp.accepts(2) and not pp.accepts(1)
    assert pp.trusts(("10.1.2.3", 5))
    assert pp.trusts(("::ffff:10.1.2.3", 5, 0, 0))
    assert pp.trusts(("fd00::1", 5, 0, 0))
    assert not pp.trusts(("11.1.2.3", 5))
    assert not pp.trusts("/run/gw.sock") and not pp.trusts(None)


async def test_close_pending_closes_a_connection_waiting_for_its_header() -> None:
    """A connection still waiting for its PROXY header is closed by close_pending (aiohttp's
    server does not know it) and released."""
    async with _listening(proxy_protocol=PP) as (listener, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PROXY TCP4 ")
        await writer.drain()
        await poll(lambda: len(listener.connections) == 1)
        listener.close_pending()
        try:
            assert await asyncio.wait_for(reader.read(), 30) == b""
        except ConnectionResetError:
            pass
        writer.close()
async def test_a_tls_listener_serves_https_and_bounds_the_handshake(tmp_path: Path) -> None:
    """With an SSL context the listener serves HTTPS (and counts the connection once its
    handshake is done); a connection that never starts its handshake is closed after the
    header timeout."""
    ca = TestCA(tmp_path)
    server_cert = ca.issue("server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server_cert.cert_file, server_cert.key_file)
    async with _listening(header_timeout_s=0.3, ssl_context=ctx) as (listener, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       ssl=ca.client_context())
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"hello")
        raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(raw_reader.read(), 30) == b""  # closed, nothing said
        raw_writer.close()
        await poll(lambda: not listener.connections)
