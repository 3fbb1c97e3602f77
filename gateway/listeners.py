"""Listening sockets for the aiohttp servers: a cap on open connections (past it the listener
stops accepting and the kernel backlog holds the rest), a deadline for each connection's first
request head, the PROXY protocol header, and an accept switch for the shutdown drain.

Only public interfaces are used: the aiohttp `web.Server` is an asyncio protocol factory, and
each connection's protocol is wrapped in one that counts it and watches its first bytes. With
the PROXY protocol on, the header is consumed before aiohttp sees a byte, and aiohttp's
protocol gets a transport whose `peername` is the header's source: aiohttp derives
`request.remote` from `transport.get_extra_info("peername")`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Literal, cast

from aiohttp import web

from gateway import metrics
from gateway.log import logger
from gateway.proxy_protocol import ProxyHeader, ProxyHeaderError, parse, sniff
from gateway.settings import ClientIPSettings

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ProxyProtocol:
    """The PROXY protocol as one listener accepts it (`client_ip.proxy_protocol*`).

    A peer in `networks` must open with a header of an accepted version; a peer outside them
    is served as plain HTTP, and closed if it sends a header (`untrusted`)."""

    mode: Literal["v1", "v2", "any"]
    networks: tuple[_Network, ...]
    timeout_s: float

    @classmethod
    def of(cls, s: ClientIPSettings) -> ProxyProtocol | None:
        """The listener's PROXY protocol from the settings; None when it is off."""
        if s.proxy_protocol == "off":
            return None
        return cls(s.proxy_protocol,
                   tuple(ipaddress.ip_network(c, strict=False) for c in s.proxy_protocol_from),
                   s.proxy_protocol_timeout_s)

    def trusts(self, peername: Any) -> bool:
        """Whether the socket peer `peername` may send a header."""
        if not isinstance(peername, tuple) or not peername:
            return False
        try:
            addr = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == n.version and addr in n for n in self.networks)

    def accepts(self, version: int) -> bool:
        return self.mode == "any" or self.mode == f"v{version}"


class _PeerTransport(asyncio.Transport):
    """The connection's transport as aiohttp's protocol sees it once a PROXY header named the
    client: `peername` (and `sockname`) are the header's; everything else is the socket's."""

    __slots__ = ("_inner_transport", "_names")

    def __init__(self, transport: asyncio.Transport, peername: tuple[Any, ...],
                 sockname: tuple[Any, ...] | None) -> None:
        super().__init__()
        self._inner_transport = transport
        self._names: dict[str, Any] = {"peername": peername}
        if sockname is not None:
            self._names["sockname"] = sockname

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._names:
            return self._names[name]
        return self._inner_transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._inner_transport.is_closing()

    def close(self) -> None:
        self._inner_transport.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner_transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner_transport.get_protocol()

    def is_reading(self) -> bool:
        return self._inner_transport.is_reading()

    def pause_reading(self) -> None:
        self._inner_transport.pause_reading()

    def resume_reading(self) -> None:
        self._inner_transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner_transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._inner_transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner_transport.get_write_buffer_limits()

    def write(self, data: Any) -> None:
        self._inner_transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._inner_transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self._inner_transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner_transport.can_write_eof()

    def abort(self) -> None:
        self._inner_transport.abort()


def _names(header: ProxyHeader) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """(peername, sockname) as a socket of the header's family would report them."""
    assert header.source is not None
    if header.family == "tcp6":
        return ((header.source, header.source_port, 0, 0),
                (header.destination, header.destination_port, 0, 0))
    return (header.source, header.source_port), (header.destination, header.destination_port)


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

    __slots__ = ("_admitted", "_inner", "_listener", "_pp", "_pp_buf", "_pp_timer",
                 "_pp_trusted", "_started", "_tail", "_timer", "transport")

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._inner: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._started = False
        self._tail = b""
        self.transport: asyncio.Transport | None = None
        self._admitted = False
        # While the PROXY header is awaited: the protocol, the bytes so far, whether the
        # peer may send one, and its deadline.
        self._pp: ProxyProtocol | None = None
        self._pp_buf = b""
        self._pp_trusted = False
        self._pp_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        lst = self._listener
        if not lst.admit(self):
            transport.abort()  # accepted in the same batch as the one that reached the cap
            return
        self._admitted = True
        loop = asyncio.get_running_loop()
        if lst.header_timeout_s:
            self._timer = loop.call_later(lst.header_timeout_s, self._head_timed_out)
        pp = lst.proxy_protocol
        if pp is not None:
            peer = transport.get_extra_info("peername")
            if peer is None:
                # The peer left before its address could be read (a balancer's probe that
                # connects and hangs up): there is no one to trust or refuse; just close.
                transport.abort()
                return
            self._pp = pp
            self._pp_trusted = pp.trusts(peer)
            if self._pp_trusted:  # a header is due: bounded however slowly it trickles in
                self._pp_timer = loop.call_later(pp.timeout_s, self._reject, "timeout",
                                                 "no complete PROXY header in time")
            return
        self._start_http(transport)

    def _start_http(self, transport: asyncio.Transport) -> None:
        self._inner = self._listener.server()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._pp is not None:
            data = self._proxy_header(data)
            if not data:
                return
        if self._timer is not None:
            self._watch_head(data)
        if self._inner is not None:
            self._inner.data_received(data)

    def _proxy_header(self, data: bytes) -> bytes:
        """Consume the PROXY header; the HTTP bytes after it once aiohttp's protocol is
        connected (b"" while the header is incomplete or when the connection was refused)."""
        pp, buf = self._pp, self._pp_buf + data
        transport = self.transport
        assert pp is not None and transport is not None
        version = sniff(buf)
        if version is None:
            self._pp_buf = buf
            return b""
        if not self._pp_trusted:
            if version:
                return self._reject("untrusted", "PROXY header from a peer outside "
                                    "client_ip.proxy_protocol_from")
            self._proxy_done()
            self._start_http(transport)
            return buf
        if version and not pp.accepts(version):
            return self._reject("version", f"PROXY v{version} header, "
                                f"client_ip.proxy_protocol is {pp.mode}")
        try:
            header = parse(buf)
        except ProxyHeaderError as exc:
            return self._reject(exc.reason, str(exc))
        if header is None:
            self._pp_buf = buf
            return b""
        self._proxy_done()
        if header.source is None:  # LOCAL / UNSPEC / UNKNOWN: the socket's peer stays
            self._start_http(transport)
        else:
            peername, sockname = _names(header)
            self._start_http(_PeerTransport(transport, peername, sockname))
        return buf[header.length:]

    def _proxy_done(self) -> None:
        self._pp = None
        self._pp_buf = b""
        if self._pp_timer is not None:
            self._pp_timer.cancel()
            self._pp_timer = None

    def _reject(self, reason: str, message: str) -> bytes:
        """Close a connection for its PROXY header: nothing is answered or forwarded."""
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        self._proxy_done()
        self._cancel_timer()
        metrics.proxy_protocol_rejected(reason)
        logger().warning("proxy_protocol_rejected", reason=reason, message=message,
                         peer_ip=str(peer[0]) if isinstance(peer, tuple) and peer else None)
        if transport is not None:
            transport.abort()
        return b""

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

    def close_if_pending(self) -> None:
        """Abort the connection if it still waits for its PROXY header (aiohttp never saw
        it, so closing aiohttp's server does not close it)."""
        transport = self.transport
        if self._inner is None and self._pp is not None and transport is not None:
            self._proxy_done()
            self._cancel_timer()
            transport.abort()

    def _head_timed_out(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._pp is not None and self._pp_trusted:
            self._reject("timeout", "no complete PROXY header in time")
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
        self._proxy_done()
        inner, self._inner = self._inner, None
        if self._admitted:
            self._admitted = False
            self._listener.release(self)
        if inner is not None:
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
                 proxy_protocol: ProxyProtocol | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.server = server
        #: read at each accept: replacing it (a reload) applies to new connections
        self.proxy_protocol = proxy_protocol
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

    def close_pending(self) -> None:
        """Close the connections still waiting for their PROXY header (at shutdown)."""
        for conn in list(self.connections):
            conn.close_if_pending()

    def close_sockets(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks.clear()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger().error("listener_resume_failed", error=str(task.exception()))
