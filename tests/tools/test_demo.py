"""Tests of tools.demo: the demo's own settings, its log summary, its certificates and PROXY
header, and the edge section run end to end against real gateway processes (the whole demo is
`make demo`)."""

from __future__ import annotations

import hashlib
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import proxy_protocol
from tests.support.standin import FakeUpstream
from tools.demo import Demo, _free_port, demo_pki, proxy_v2_header, relay_mix


def test_free_port_is_bindable() -> None:
    """_free_port names a port of 127.0.0.1 that can be bound."""
    port = _free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname()[1] == port


def test_each_demo_has_its_own_ports_and_fresh_secrets() -> None:
    """Proxy and admin ports differ; the admin token and upstream key are random per demo."""
    a, b = Demo(), Demo()
    assert a.port != a.admin_port
    assert a.url == f"http://127.0.0.1:{a.port}"
    for var in ("GATEWAY_ADMIN_TOKEN", "UPSTREAM_API_KEY"):
        assert a.env[var] != b.env[var]
        assert len(a.env[var]) > 16


def test_print_logs_summarises_requests_and_audit_events(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The summary has a row per request line, the audit actions and the other events."""
    demo = Demo()
    request = {"event": "request", "status": 403, "decision": "deny", "client_ip": "192.0.2.9",
               "country": "RU", "anonymizer": [], "reseller": "acme",
               "customer_country": None, "reason": "restricted-regions", "shadow": []}
    demo.logs = [request, {"event": "audit", "action": "key_issued", "target": "k1"},
                 {"event": "gateway_started"}]
    demo.print_logs()
    out = capsys.readouterr().out
    assert "403" in out and "192.0.2.9" in out and "restricted-regions" in out
    assert "audit events: key_issued k1" in out
    assert "other events: gateway_started" in out


def test_relay_mix_holds_every_kind_of_relayed_customer() -> None:
    """The demo's relaying reseller attests restricted-region, anonymizer, shared, invalid
    and country-hopping customers."""
    mix = relay_mix("192.0.2.1")
    ips = [ip for _, ip in mix]
    assert "198.51.100.2" in ips and "203.0.113.2" in ips and "10.0.0.5" in ips
    assert ("self-1", "192.0.2.1") in mix
    assert len({cid for cid, ip in mix if ip == "192.0.2.35"}) == 12
    assert len({ip for cid, ip in mix if cid == "hopper"}) == 5


def test_demo_pki_makes_a_ca_a_server_and_a_bound_client_certificate(tmp_path: Path) -> None:
    """demo_pki writes a CA, a server certificate for 127.0.0.1 and a client certificate it
    signed, and returns the client certificate's DER SHA-256 (the policy's binding)."""
    fp = demo_pki(tmp_path)["client_sha256"]
    client = x509.load_pem_x509_certificate((tmp_path / "client.crt").read_bytes())
    assert fp == hashlib.sha256(client.public_bytes(serialization.Encoding.DER)).hexdigest()
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    for leaf in (client, server):
        leaf.verify_directly_issued_by(ca)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")  # key matches
    assert oct((tmp_path / "client.key").stat().st_mode & 0o777) == "0o600"


def test_proxy_v2_header_is_what_the_gateway_parses() -> None:
    """The demo's PROXY v2 header parses to its source address; version 3 is refused."""
    head = proxy_v2_header("198.51.100.5", 51000, "127.0.0.1", 8080)
    parsed = proxy_protocol.parse(head + b"GET / HTTP/1.1\r\n")
    assert parsed is not None
    assert (parsed.version, parsed.source, parsed.source_port, parsed.length) == (
        2, "198.51.100.5", 51000, len(head))
    with pytest.raises(proxy_protocol.ProxyHeaderError) as exc:
        proxy_protocol.parse(proxy_v2_header("198.51.100.5", 1, "127.0.0.1", 2, version=3))
    assert exc.value.reason == "version"


async def test_edge_section_shows_mtls_binding_and_the_proxy_client_ip(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Section 10 runs two real gateways: a bound reseller's key is refused without its client
    certificate and served with it, and the PROXY header's address is the logged client_ip."""
    demo = Demo()
    async with FakeUpstream() as upstream:
        await demo.edge(upstream)
    outcomes = dict(demo.outcomes)
    assert outcomes["TLS, unbound reseller (direct), no client cert"].startswith("200 ")
    assert outcomes["TLS, bound reseller (boundco), no client cert"] == (
        "403 permission_error / client_certificate_required")
    assert outcomes["mTLS, bound reseller, its client certificate"].startswith("200 ")
    proxied = outcomes["raw socket: PROXY v2 header naming 198.51.100.5 (CN), then the request"]
    assert proxied.startswith("403 ")
    assert outcomes["raw socket: a malformed PROXY v2 header (version 3)"] == (
        "connection closed, nothing answered")
    out = capsys.readouterr().out
    assert "▶ 10. At the edge" in out
    assert "request: status 403, client_ip 198.51.100.5" in out
    assert "rule restricted-regions" in out
    assert "proxy_protocol_rejected: reason version, peer_ip 127.0.0.1" in out


def test_screening_page_line_names_the_url_and_the_token(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The last section prints the /admin/ui URL on the admin listener and that it asks for
    the admin token."""
    demo = Demo()
    demo.screening_page()
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{demo.admin_port}/admin/ui" in out
    assert "admin token" in out
