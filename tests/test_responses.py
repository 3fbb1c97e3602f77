"""Tests for gateway.responses: a GatewayError rendered into the docs/architecture.md §6 body."""

from __future__ import annotations

import json

from gateway.errors import GatewayError, permission_error
from gateway.responses import render


def test_render_writes_the_error_body_and_request_id() -> None:
    """The response carries the status, the typed body and the request id (header and body)."""
    resp = render(permission_error("scope_denied", "path not allowed"), "req_1")
    assert resp.status == 403
    assert resp.content_type == "application/json"
    assert resp.headers["x-request-id"] == "req_1"
    assert isinstance(resp.body, bytes)
    assert json.loads(resp.body) == {
        "type": "error",
        "error": {"type": "permission_error", "code": "scope_denied",
                  "message": "path not allowed"},
        "request_id": "req_1",
    }


def test_render_keeps_the_error_headers() -> None:
    """Headers of the error (retry-after) reach the response; the error itself is unchanged."""
    err = GatewayError(429, "rate_limit_error", "rpm", "slow down", {"retry-after": "3"})
    resp = render(err, "req_2")
    assert resp.headers["retry-after"] == "3"
    assert err.headers == {"retry-after": "3"}
