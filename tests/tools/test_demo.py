"""Unit tests for tools.demo: the demo's own settings and its log summary (the whole demo is
`make demo`)."""

from __future__ import annotations

import socket

import pytest

from tools.demo import Demo, _free_port, relay_mix


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
