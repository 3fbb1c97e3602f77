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


def test_render_lists_every_problem_of_a_refusal_that_found_several() -> None:
    """A refusal with several problems keeps the one body shape and lists them in
    `error.errors`; one with none has no such member."""
    err = GatewayError(400, "invalid_request_error", "invalid_policy", "a: bad\nb: worse",
                       problems=[{"field": "a", "reason": "bad"},
                                 {"field": "b", "reason": "worse"}])
    body = json.loads(render(err, "req_3").body)  # type: ignore[arg-type]
    assert body["error"] == {"type": "invalid_request_error", "code": "invalid_policy",
                             "message": "a: bad\nb: worse",
                             "errors": [{"field": "a", "reason": "bad"},
                                        {"field": "b", "reason": "worse"}]}
    assert body["request_id"] == "req_3"
    plain = json.loads(render(GatewayError(404, "not_found_error", "not_found", "no"),
                              "req_4").body)  # type: ignore[arg-type]
    assert "errors" not in plain["error"]
