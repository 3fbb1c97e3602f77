"""The PROXY protocol on the proxy listener, over raw sockets: the header's source becomes the
peer (X-Forwarded-For trust applied after it), and a malformed, untrusted, missing or trickled
header closes the connection, forwards nothing and is counted by reason."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.proxy_protocol import V2_SIGNATURE, v1_header, v2_header
from tests.integration.test_lifecycle import OPEN_POLICY
from tests.support.gateway import RunningGateway, poll, running_gateway
from tests.support.upstream import FakeUpstream

#: 127.0.0.1 (the test client) may send a header; 127.0.0.2 may not. 192.0.2.0/29 (demo: US)
#: is a trusted proxy behind the load balancer; 192.0.2.16/28 (demo: GB) is not.
CLIENT_IP = {"proxy_protocol": "any", "proxy_protocol_from": ["127.0.0.1/32"],
             "proxy_protocol_timeout_s": 1, "trusted_proxies": ["192.0.2.0/29"]}


def request(key: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: {key}\r\n"
            f"Connection: close\r\n{extra}\r\n").encode()


async def exchange(port: int, data: bytes, source: str = "127.0.0.1",
                   parts: int = 1) -> bytes:
    """Send `data` (in `parts` writes) from `source`; everything the gateway sent until it
    closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    step = max(1, -(-len(data) // parts))
    try:
        for i in range(0, len(data), step):
            writer.write(data[i:i + step])
            await writer.drain()
            if parts > 1:
                await asyncio.sleep(0)
        out = bytearray()
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout=30)
            if not chunk:
                return bytes(out)
            out += chunk
    except (ConnectionResetError, BrokenPipeError):
        return bytes(out)
    finally:
        writer.close()


async def rejected(gw: RunningGateway) -> dict[str, float]:
    """gateway_proxy_protocol_rejected_total by reason, from /metrics."""
    async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/metrics") as r:
        text = await r.text()
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^gateway_proxy_protocol_rejected_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


def last_request(gw: RunningGateway) -> dict[str, Any]:
    lines = gw.logs.requests()
    assert lines, "no request line"
    return lines[-1]


async def test_v2_source_is_the_client(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A v2 TCP4 header's source is the logged client_ip and peer_ip, is located, and is the
    X-Forwarded-For the upstream sees."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY, client_ip=CLIENT_IP) as gw:
        _, key = await gw.issue_key("direct")
        out = await exchange(gw.service.proxy_port,
                             v2_header("192.0.2.20", "127.0.0.1", 40000, 8080) + request(key))
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
        line = last_request(gw)
        assert (line["client_ip"], line["peer_ip"], line["country"]) == (
            "192.0.2.20", "192.0.2.20", "GB")
        assert upstream.last_request.headers["X-Forwarded-For"] == "192.0.2.20"


async def test_forwarded_for_trust_applies_after_the_header(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    """X-Forwarded-For is followed when the PROXY source is a trusted proxy and ignored when
    it is not; a header split into single bytes is read whole."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY, client_ip=CLIENT_IP) as gw:
        _, key = await gw.issue_key("direct")
        xff = {"X-Forwarded-For": "198.51.100.1"}
        head = v2_header("192.0.2.3", "127.0.0.1", 1, 2)
        out = await exchange(gw.service.proxy_port, head + request(key, xff),
                             parts=len(head) + 1)
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
        line = last_request(gw)
        assert (line["client_ip"], line["peer_ip"], line["country"]) == (
            "198.51.100.1", "192.0.2.3", "CN")
        out = await exchange(gw.service.proxy_port,
                             v1_header("192.0.2.20", "127.0.0.1", 1, 2) + request(key, xff))
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
        assert last_request(gw)["client_ip"] == "192.0.2.20"


async def test_v1_tcp6_and_v2_local(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A v1 TCP6 header names an IPv6 client; a v2 LOCAL header (a health check) keeps the
    socket's own peer."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY, client_ip=CLIENT_IP) as gw:
        _, key = await gw.issue_key("direct")
        out = await exchange(gw.service.proxy_port,
                             v1_header("2001:db8:2::5", "::1", 1, 2) + request(key))
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
        line = last_request(gw)
        assert (line["client_ip"], line["country"]) == ("2001:db8:2::5", "GB")
        out = await exchange(gw.service.proxy_port, v2_header(None, local=True) + request(key))
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
        assert last_request(gw)["client_ip"] == "127.0.0.1"


BAD = [
    (b"PROXY TCP4 192.0.2.300 127.0.0.1 1 2\r\n", "address"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 1\r\n", "malformed"),
    (b"PROXY TCP4 " + b"9" * 120 + b"\r\n", "malformed"),
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version"),
    (V2_SIGNATURE + b"\x23\x11\x00\x0c" + bytes(12), "command"),
    (V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4), "address"),
    (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), "family"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(8), "signature"),
]


async def test_bad_headers_close_the_connection(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Each malformed header, a header-less request from a peer that must send one, and a
    valid header from a peer outside proxy_protocol_from: closed with no answer, nothing
    forwarded, counted by reason and logged."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY, client_ip=CLIENT_IP) as gw:
        _, key = await gw.issue_key("direct")
        cases = [(bad, reason, "127.0.0.1") for bad, reason in BAD]
        cases += [(b"", "signature", "127.0.0.1"),
                  (v2_header("192.0.2.20", "127.0.0.1", 1, 2), "untrusted", "127.0.0.2"),
                  (v1_header("192.0.2.20", "127.0.0.1", 1, 2), "untrusted", "127.0.0.2")]
        for data, reason, source in cases:
            before = await rejected(gw)
            out = await exchange(gw.service.proxy_port, data + request(key), source=source)
            assert out == b"", (reason, out[:200])
            after = await rejected(gw)
            assert after.get(reason, 0) == before.get(reason, 0) + 1, (reason, after)
        assert not upstream.requests
        assert not gw.logs.requests()
        logged = {e["reason"] for e in gw.logs.events("proxy_protocol_rejected")}
        assert logged == {r for _, r, _ in cases}
        # A peer outside proxy_protocol_from that sends no header is plain HTTP.
        out = await exchange(gw.service.proxy_port, request(key), source="127.0.0.2")
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
        assert last_request(gw)["client_ip"] == "127.0.0.2"


async def test_trickled_header_times_out(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A header that stops half-way is closed after proxy_protocol_timeout_s and counted as
    `timeout`; nothing is forwarded."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY, client_ip=CLIENT_IP,
                               server={"header_timeout_s": 30}) as gw:
        before = await rejected(gw)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.proxy_port)
        writer.write(v2_header("192.0.2.20", "127.0.0.1", 1, 2)[:20])
        await writer.drain()
        try:
            assert await asyncio.wait_for(reader.read(), timeout=30) == b""
        except ConnectionResetError:
            pass
        writer.close()
        after = await poll(lambda: rejected(gw))
        assert after.get("timeout", 0) == before.get("timeout", 0) + 1
        assert not upstream.requests


@pytest.mark.parametrize(("mode", "data", "reason"), [
    ("v1", v2_header("192.0.2.20", "127.0.0.1", 1, 2), "version"),
    ("v2", v1_header("192.0.2.20", "127.0.0.1", 1, 2), "version"),
])
async def test_one_version_only(tmp_path: Path, upstream: FakeUpstream, mode: str,
                                data: bytes, reason: str) -> None:
    """`proxy_protocol: v1` refuses a v2 header and `v2` a v1 header, as `version`."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY,
                               client_ip={**CLIENT_IP, "proxy_protocol": mode}) as gw:
        _, key = await gw.issue_key("direct")
        before = await rejected(gw)
        assert await exchange(gw.service.proxy_port, data + request(key)) == b""
        after = await rejected(gw)
        assert after.get(reason, 0) == before.get(reason, 0) + 1
        assert not upstream.requests


async def test_reload_applies_to_new_connections(tmp_path: Path,
                                                 upstream: FakeUpstream) -> None:
    """A reload that turns the PROXY protocol off makes new connections plain HTTP."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY, client_ip=CLIENT_IP) as gw:
        _, key = await gw.issue_key("direct")
        assert await exchange(gw.service.proxy_port, request(key)) == b""
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(cfg.read_text().replace("proxy_protocol: any", "proxy_protocol: off"))
        status, body = await gw.admin("POST", "/admin/reload")
        assert status == 200, body
        out = await exchange(gw.service.proxy_port, request(key))
        assert out.startswith(b"HTTP/1.1 200"), out[:200]
