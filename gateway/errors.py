"""GatewayError and its one rendering into the docs/architecture.md §6 error body."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


class GatewayError(Exception):
    """A refusal or failure the gateway reports to the client in the provider-shaped body."""

    def __init__(
        self,
        status: int,
        type_: str,
        code: str | None,
        message: str,
        headers: Mapping[str, str] | None = None,
        decision: str = "error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.decision = decision
        # The known key behind a refusal (revoked, expired): logged, never sent to the client.
        self.key_id: str | None = None
        self.reseller: str | None = None


class StoreError(Exception):
    """The store (Redis) could not be reached or answered with an error."""


def render(err: GatewayError, request_id: str) -> web.Response:
    """The one place a GatewayError becomes an HTTP response."""
    body = {
        "type": "error",
        "error": {"type": err.type, "code": err.code, "message": err.message},
        "request_id": request_id,
    }
    headers = dict(err.headers)
    headers["x-request-id"] = request_id
    return web.Response(
        status=err.status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


def auth_error(code: str, message: str) -> GatewayError:
    return GatewayError(401, "authentication_error", code, message, decision="deny")


def permission_error(code: str, message: str) -> GatewayError:
    return GatewayError(403, "permission_error", code, message, decision="deny")


def invalid_request(code: str | None, message: str, decision: str = "deny") -> GatewayError:
    return GatewayError(400, "invalid_request_error", code, message, decision=decision)
