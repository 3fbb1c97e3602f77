"""Unit tests for gateway.errors: the one rendering of a GatewayError and its constructors."""

from __future__ import annotations

import json

from gateway.errors import GatewayError, auth_error, invalid_request, permission_error, render


def test_render_is_the_provider_shaped_body_with_the_request_id() -> None:
    """render gives the status, the §6 body, the error's own headers and x-request-id."""
    err = GatewayError(429, "rate_limit_error", "rpm", "slow down", {"retry-after": "3"})
    resp = render(err, "req_abc")
    assert resp.status == 429
    assert resp.content_type == "application/json"
    assert resp.headers["retry-after"] == "3"
    assert resp.headers["x-request-id"] == "req_abc"
    assert resp.body is not None
    assert json.loads(bytes(resp.body)) == {  # type: ignore[arg-type]
        "type": "error",
        "error": {"type": "rate_limit_error", "code": "rpm", "message": "slow down"},
        "request_id": "req_abc"}


def test_render_does_not_change_the_errors_headers() -> None:
    """Rendering adds x-request-id to the response only, not to the error it renders."""
    err = GatewayError(502, "api_error", None, "upstream failed")
    render(err, "req_1")
    assert err.headers == {}
    assert err.decision == "error"


def test_constructors_set_status_type_and_decision() -> None:
    """auth_error is a 401 deny, permission_error a 403 deny, invalid_request a 400."""
    a = auth_error("invalid_key", "bad key")
    p = permission_error("model_not_allowed", "no")
    i = invalid_request(None, "bad body", decision="error")
    assert (a.status, a.type, a.code, a.decision) == (401, "authentication_error",
                                                      "invalid_key", "deny")
    assert (p.status, p.type, p.decision) == (403, "permission_error", "deny")
    assert (i.status, i.type, i.code, i.decision) == (400, "invalid_request_error", None,
                                                      "error")
    assert str(a) == "bad key"
    assert a.key_id is None and a.reseller is None
