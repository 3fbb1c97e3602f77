"""Forwarding to the upstream model API: header hygiene, credential injection, and streaming
the answer back chunk by chunk as it arrives."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.usage import (
    MAX_BUFFERED_JSON,
    SSEUsageParser,
    Usage,
    UsageChunkFilter,
    read_json_usage,
)

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
# Request headers never forwarded: the client's credentials, our own attestation headers,
# what aiohttp sets itself, and forwarding headers we rebuild.
_DROP_REQUEST = frozenset({"host", "content-length", "x-api-key", "authorization",
                           "x-forwarded-for", "forwarded", "x-real-ip", "accept-encoding",
                           "x-customer-attestation"})  # the reseller's signed claim: ours
_DROP_RESPONSE = frozenset({"content-length", "content-encoding", "date", "server"})


@dataclass(slots=True)
class Forwarded:
    """What the forward stage learned: status, timings and reported usage."""

    #: the request was handed to the upstream connection
    sent: bool = False
    #: the upstream failed before answering (502 / 504)
    failed: bool = False
    #: the answer ended normally and its usage, if it reports any, was read whole
    metered: bool = False
    upstream_status: int | None = None
    ttfb_s: float | None = None
    upstream_s: float | None = None
    usage: Usage | None = None
    completed: bool = False

    def to_context(self, ctx: RequestContext) -> None:
        """Put what the upstream answered into the request's log record: its status, its time
        (once the request was sent and timed) and the tokens it reported."""
        ctx.upstream_status = self.upstream_status
        if self.upstream_s is not None and self.sent:
            ctx.upstream_ms = round(self.upstream_s * 1000.0, 3)
        if self.usage is not None:
            ctx.input_tokens = self.usage.input_tokens
            ctx.output_tokens = self.usage.output_tokens


def forwarded_for(incoming: CIMultiDictProxy[str], peer: str, peer_trusted: bool) -> str:
    """X-Forwarded-For for the upstream: a trusted proxy's chain plus the peer; from an
    untrusted peer, the peer alone (a forged chain is not passed on)."""
    if peer_trusted:
        prior = ", ".join(incoming.getall("X-Forwarded-For", ()))
        if prior:
            return f"{prior}, {peer}"
    return peer


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    return {t.strip().lower() for v in headers.getall("connection", ()) for t in v.split(",")}


class Upstream:
    """One pooled keep-alive connector to the upstream, the credential, the timeouts."""

    def __init__(self, url: str, api_key: str, auth_header: str, connect_timeout_s: float,
                 read_timeout_s: float, max_connections: int, drop_headers: frozenset[str],
                 *, ca_file: str | None = None, trust_env: bool = False) -> None:
        self.url = url
        self.auth_name = "x-api-key" if auth_header == "x-api-key" else "Authorization"
        self.auth_value = api_key if auth_header == "x-api-key" else f"Bearer {api_key}"
        self.timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s,
                                             sock_read=read_timeout_s)
        self.drop = _DROP_REQUEST | HOP_BY_HOP | drop_headers
        self.session = aiohttp.ClientSession(
            # ca_file: the upstream's certificate is verified against that CA (a private
            # CA, a TLS-inspecting corporate proxy) instead of the system's; trust_env: egress
            # through HTTPS_PROXY / NO_PROXY (docs/architecture.md §3).
            connector=aiohttp.TCPConnector(
                limit=max_connections, keepalive_timeout=60, ttl_dns_cache=60,
                ssl=ssl.create_default_context(cafile=ca_file) if ca_file else True),
            timeout=self.timeout,
            trust_env=trust_env,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        await self.session.close()

    def request_headers(self, incoming: CIMultiDictProxy[str], peer: str, peer_trusted: bool,
                        request_id: str, body_rewritten: bool = False) -> CIMultiDict[str]:
        """Headers for the upstream: the client's end-to-end headers, the upstream credential,
        X-Forwarded-For (`forwarded_for` of the normalised `peer`), the request id;
        `body_rewritten`: the gateway inflated or re-encoded the body, so the client's
        Content-Encoding no longer describes it."""
        drop = self.drop | _connection_tokens(incoming)
        if body_rewritten:
            drop = drop | {"content-encoding"}
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in incoming.items():
            if name.lower() not in drop:
                out.add(name, value)
        out[self.auth_name] = self.auth_value
        out["X-Forwarded-For"] = forwarded_for(incoming, peer, peer_trusted)
        out["x-request-id"] = request_id
        # Metering needs a readable answer: ask the upstream for an uncompressed one.
        out["Accept-Encoding"] = "identity"
        return out

    async def forward(
        self,
        request: web.Request,
        target: str,
        body: bytes,
        headers: CIMultiDict[str],
        extra_response_headers: dict[str, str],
        info: Forwarded,
        strip_usage: bool = False,
        on_sent: Callable[[], None] | None = None,
    ) -> web.StreamResponse:
        """Send the request upstream and stream the answer to the client as it arrives.

        Raises the 502/504 GatewayError when no answer started; once the answer has started, a
        failure cuts the client's response (the status is already sent). `info` is filled in
        as the answer goes, so the caller still sees what was delivered when the forward is
        cancelled (client gone) mid-stream. `target` is the normalised path and query the
        gateway judged; `strip_usage` drops the usage chunk the gateway asked for; `on_sent` is
        called once the body is no longer needed (sent, or the send failed)."""
        url = self.url + target
        t0 = time.perf_counter()
        info.sent = True
        try:
            up = await self.session.request(request.method, url, data=body or None,
                                            headers=headers, allow_redirects=False)
        except TimeoutError:
            info.failed = True
            raise GatewayError(504, "api_error", "upstream_timeout",
                               "upstream did not answer in time") from None
        except aiohttp.ClientError as exc:
            info.failed = True
            raise GatewayError(502, "api_error", "upstream_unavailable",
                               f"upstream unreachable ({type(exc).__name__})") from None
        finally:
            del body  # sent (or never will be): held no longer, for as long as the answer runs
            if on_sent is not None:
                on_sent()
        try:
            info.upstream_status = up.status
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            drop = HOP_BY_HOP | _DROP_RESPONSE | _connection_tokens(up.headers)
            for name, value in up.headers.items():
                if name.lower() not in drop:
                    resp.headers.add(name, value)
            if "content-encoding" in up.headers:
                resp.headers["Content-Encoding"] = up.headers["content-encoding"]
            resp.headers.update(extra_response_headers)
            ctype = up.headers.get("content-type", "")
            sse = ctype.startswith("text/event-stream")
            is_json = ctype.startswith("application/json") and (
                "content-encoding" not in up.headers)
            length = up.content_length
            if length is not None and not sse:
                resp.content_length = length
            parser = SSEUsageParser() if sse else None
            if parser is not None:
                info.usage = parser.usage  # updated in place: an aborted stream keeps its count
            strip = UsageChunkFilter() if sse and strip_usage else None
            buf: list[bytes] | None = [] if is_json and up.status < 400 else None
            buffered = 0
            await resp.prepare(request)
            first = True
            try:
                async for chunk in up.content.iter_any():
                    if first:
                        info.ttfb_s = time.perf_counter() - t0
                        first = False
                    if parser is not None:
                        parser.feed(chunk)
                        if strip is not None:
                            chunk = strip.feed(chunk)
                            if not chunk:
                                continue
                    elif buf is not None:
                        buffered += len(chunk)
                        if buffered <= MAX_BUFFERED_JSON:
                            buf.append(chunk)
                        else:
                            buf = None
                    await resp.write(chunk)
            except (TimeoutError, aiohttp.ClientError) as exc:
                if isinstance(exc, ConnectionResetError):
                    raise  # the client went away (aiohttp's reset error is a ClientError too)
                # Mid-stream upstream failure: the status is sent; cut the client's response.
                info.upstream_s = time.perf_counter() - t0
                if request.transport is not None:
                    request.transport.close()
                return resp
            if info.ttfb_s is None:
                info.ttfb_s = time.perf_counter() - t0
            if strip is not None:
                tail = strip.flush()
                if tail:
                    await resp.write(tail)
            if buf is not None:
                read = read_json_usage(b"".join(buf))
                info.usage = read
                info.metered = read is not None
            elif parser is not None:
                info.metered = parser.usage.output_final
            elif not ctype.startswith("application/json"):
                info.metered = True  # neither JSON nor a stream: no usage to read
            await resp.write_eof()
            info.completed = True
            info.upstream_s = time.perf_counter() - t0
            return resp
        finally:
            # A finished answer returns the connection to the pool; an aborted one (client gone,
            # cancellation) closes it, which cancels the upstream request.
            if info.completed:
                up.release()
            else:
                up.close()
                if info.upstream_s is None:
                    info.upstream_s = time.perf_counter() - t0
