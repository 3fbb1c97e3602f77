"""Unit tests for gateway.proxy: the headers sent upstream (credentials replaced, hop-by-hop
and client-controlled headers dropped) and a forwarded request through an in-process gateway."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.context import RequestContext
from gateway.proxy import Forwarded, Upstream, forwarded_for
from gateway.usage import Usage
from tests.support.gateway import UPSTREAM_KEY, running_gateway
from tests.support.upstream import FakeUpstream


def _incoming(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


async def test_request_headers_replace_credentials_and_drop_hop_by_hop() -> None:
    """The client's key, hop-by-hop headers, headers named in Connection, the attestation
    headers and forwarding headers are dropped; the upstream key, XFF, the request id and an
    identity Accept-Encoding are set; end-to-end headers pass."""
    up = Upstream("http://127.0.0.1:1", "up-key", "x-api-key", 1, 1, 1,
                  frozenset({"x-customer-id"}))
    try:
        out = up.request_headers(_incoming(
            ("x-api-key", "gk_client"), ("Authorization", "Bearer c"), ("Connection", "x-tmp"),
            ("X-Tmp", "1"), ("Keep-Alive", "5"), ("TE", "trailers"), ("X-Customer-Id", "c1"),
            ("X-Forwarded-For", "6.6.6.6"), ("Forwarded", "for=6.6.6.6"),
            ("Accept-Encoding", "gzip"), ("Content-Encoding", "gzip"),
            ("anthropic-version", "2023-06-01")), "192.0.2.1", False, "req_1")
    finally:
        await up.close()
    assert out["x-api-key"] == "up-key" and "authorization" not in out
    for gone in ("x-tmp", "keep-alive", "te", "connection", "x-customer-id", "forwarded"):
        assert gone not in out, gone
    assert out.getall("X-Forwarded-For") == ["192.0.2.1"]
    assert out["x-request-id"] == "req_1"
    assert out["Accept-Encoding"] == "identity"
    assert out["anthropic-version"] == "2023-06-01"
    assert out["Content-Encoding"] == "gzip"


async def test_bearer_auth_and_a_rewritten_body_drops_content_encoding() -> None:
    """With auth_header Authorization the key is sent as a Bearer token; a body the gateway
    rewrote no longer carries the client's Content-Encoding."""
    up = Upstream("http://127.0.0.1:1", "up-key", "authorization", 1, 1, 1, frozenset())
    try:
        out = up.request_headers(_incoming(("Content-Encoding", "gzip")), "192.0.2.1", False,
                                 "r", body_rewritten=True)
    finally:
        await up.close()
    assert out["Authorization"] == "Bearer up-key" and "x-api-key" not in out
    assert "content-encoding" not in out


def test_forwarded_for_keeps_a_trusted_chain_only() -> None:
    """From a trusted proxy the chain it sent is kept and the peer appended; from an untrusted
    peer (or a trusted one that sent none) the peer alone is sent."""
    chain = _incoming(("X-Forwarded-For", "198.51.100.7, 10.0.0.2"),
                      ("X-Forwarded-For", "10.0.0.3"))
    assert forwarded_for(chain, "10.0.0.1", True) == "198.51.100.7, 10.0.0.2, 10.0.0.3, 10.0.0.1"
    assert forwarded_for(chain, "203.0.113.9", False) == "203.0.113.9"
    assert forwarded_for(_incoming(), "10.0.0.1", True) == "10.0.0.1"


async def test_request_headers_send_the_trusted_chain() -> None:
    """The X-Forwarded-For sent upstream is the trusted peer's chain plus the peer."""
    up = Upstream("http://127.0.0.1:1", "up-key", "x-api-key", 1, 1, 1, frozenset())
    try:
        out = up.request_headers(_incoming(("X-Forwarded-For", "198.51.100.7")), "10.0.0.1",
                                 True, "r")
    finally:
        await up.close()
    assert out.getall("X-Forwarded-For") == ["198.51.100.7, 10.0.0.1"]


def test_forwarded_fills_the_log_record() -> None:
    """The upstream's status, its time once sent (in ms) and its reported tokens reach the
    request's log record; an unsent request gets no upstream time."""
    ctx = RequestContext("r", "127.0.0.1", "POST", "/v1/messages", 0.0)
    Forwarded(sent=True, upstream_status=200, upstream_s=0.0123456,
              usage=Usage(7, 3)).to_context(ctx)
    assert (ctx.upstream_status, ctx.upstream_ms, ctx.input_tokens, ctx.output_tokens) == (
        200, 12.346, 7, 3)
    ctx = RequestContext("r", "127.0.0.1", "POST", "/v1/messages", 0.0)
    Forwarded(upstream_s=0.5).to_context(ctx)
    assert (ctx.upstream_status, ctx.upstream_ms, ctx.input_tokens) == (None, None, None)


async def test_a_forwarded_request_reaches_the_upstream_with_its_key(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Through a gateway, the upstream sees its own key and the request id; the client gets
    the upstream's answer without its hop-by-hop headers."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(models=["claude-*"])
        async with aiohttp.ClientSession() as s, s.post(
                gw.url + "/v1/messages", headers={"x-api-key": key},
                json={"model": "claude-3", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200
            assert "keep-alive" not in r.headers
            rid = r.headers["x-request-id"]
    seen = upstream.last_request
    assert key not in str(dict(seen.headers))
    assert seen.headers["x-request-id"] == rid
    assert seen.headers["x-api-key"] == UPSTREAM_KEY
