"""Listening sockets for the aiohttp servers: a cap on open connections (past it the listener
stops accepting and the kernel backlog holds the rest), a deadline for each connection's first
request head, and an accept switch for the shutdown drain.

Only public interfaces are used: the aiohttp `web.Server` is an asyncio protocol factory, and
each connection's protocol is wrapped in one that counts it and watches its first bytes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import ssl
from typing import Any, cast

from aiohttp import web

from gateway.log import logger


def _timeout_response() -> bytes:
    request_id = "req_" + secrets.token_hex(12)
    body = json.dumps({"type": "error", "error": {
        "type": "invalid_request_error", "code": "request_timeout",
        "message": "request head not received in time"}, "request_id": request_id}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nx-request-id: " + request_id.encode() +
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Connection(asyncio.Protocol):
    """One accepted connection: counted by its listener, handed to aiohttp's protocol, and
    closed when its first request head is not complete within the header timeout."""

    __slots__ = ("_inner", "_listener", "_started", "_tail", "_timer", "transport")

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._inner: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._started = False
        self._tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        lst = self._listener
        if not lst.admit(self):
            transport.abort()  # accepted in the same batch as the one that reached the cap
            return
        if lst.header_timeout_s:
            self._timer = asyncio.get_running_loop().call_later(lst.header_timeout_s,
                                                                self._head_timed_out)
        self._inner = lst.server()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._watch_head(data)
        if self._inner is not None:
            self._inner.data_received(data)

    def _watch_head(self, data: bytes) -> None:
        """Cancel the deadline at the empty line that ends the first head (blank lines before
        a request line do not count, RFC 9112 §2.2)."""
        buf = self._tail + data
        if not self._started:
            buf = buf.lstrip(b"\r\n")
            if not buf:
                self._tail = b""
                return
            self._started = True
        if b"\n\n" in buf or b"\n\r\n" in buf:
            self._cancel_timer()
        else:
            self._tail = buf[-2:]

    def _head_timed_out(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        logger().debug("request_head_timeout", peer=str(transport.get_extra_info("peername")))
        transport.write(_timeout_response())
        transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            result: bool | None = self._inner.eof_received()
            return result
        return None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        inner, self._inner = self._inner, None
        if inner is not None:
            self._listener.release(self)
            inner.connection_lost(exc)


class Listener:
    """One address served by an aiohttp `web.Server`.

    `max_connections`: at the cap the listener stops accepting (new connections wait in the
    kernel backlog, then are refused once it is full) and resumes below it. `stop_accepting`
    closes the listening sockets for good; open connections are left alone.

    `ssl_context`: serve TLS with this context (gateway.tls.ServerTLS.context: one context
    for the listener's life, which moves each handshake onto the certificate in service). The
    handshake must complete within `header_timeout_s` (the connection is counted, and its head
    deadline starts, once it has)."""

    def __init__(self, server: web.Server, host: str, port: int, *, backlog: int = 1024,
                 reuse_port: bool = False, max_connections: int | None = None,
                 header_timeout_s: float | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.server = server
        self.ssl_context = ssl_context
        self.host = host
        self.port = port
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.connections: set[_Connection] = set()
        self._socks: list[socket.socket] = []
        self._serving: list[asyncio.Server] = []
        self._resuming = False
        self._closed = False

    async def start(self) -> int:
        """Bind and start accepting; the port bound (the first, when the host has several)."""
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        seen: set[tuple[int, Any]] = set()
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(self.backlog)
                sock.setblocking(False)
            except OSError:
                sock.close()
                self.close_sockets()
                raise
            self._socks.append(sock)
        await self._resume()
        port: int = self._socks[0].getsockname()[1]
        return port

    async def _resume(self) -> None:
        if self._resuming or self._serving or self._closed:
            return
        self._resuming = True
        loop = asyncio.get_running_loop()
        try:
            # Serve a duplicate of each socket: closing it stops accepting while the original
            # keeps the socket listening (and its backlog filling).
            servers = [await loop.create_server(lambda: _Connection(self), sock=sock.dup(),
                                                backlog=self.backlog, start_serving=False,
                                                **self._tls_args())
                       for sock in self._socks]
        finally:
            self._resuming = False
        if self._closed or not self._below_cap():
            for srv in servers:
                srv.close()
            return
        self._serving = servers
        for srv in servers:
            if srv not in self._serving:
                break  # paused again while starting
            await srv.start_serving()

    def _tls_args(self) -> dict[str, Any]:
        if self.ssl_context is None:
            return {}
        return {"ssl": self.ssl_context, "ssl_handshake_timeout": self.header_timeout_s or 60.0}

    def _below_cap(self) -> bool:
        cap = self.max_connections
        return cap is None or len(self.connections) < cap

    def _pause(self) -> None:
        servers, self._serving = self._serving, []
        for srv in servers:
            srv.close()

    def admit(self, conn: _Connection) -> bool:
        if self._closed:
            return False
        cap = self.max_connections
        if cap is not None and len(self.connections) >= cap:
            return False
        self.connections.add(conn)
        if cap is not None and len(self.connections) >= cap and self._serving:
            self._pause()
        return True

    def release(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        cap = self.max_connections
        if (cap is not None and not self._closed and not self._serving
                and not self._resuming and len(self.connections) < cap):
            task = asyncio.ensure_future(self._resume())
            task.add_done_callback(_log_failure)

    def stop_accepting(self) -> None:
        """Close the listening sockets: new connections are refused from now on."""
        self._closed = True
        self._pause()
        self.close_sockets()

    def close_sockets(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks.clear()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger().error("listener_resume_failed", error=str(task.exception()))
