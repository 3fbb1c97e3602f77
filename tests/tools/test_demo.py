"""Unit tests for tools.demo: the demo's own settings and its log summary (the whole demo is
`make demo`)."""

from __future__ import annotations

import socket

import pytest

from tools.demo import Demo, _free_port


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
