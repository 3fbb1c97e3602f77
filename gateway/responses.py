"""The one place a GatewayError becomes an HTTP response (the docs/architecture.md §6 body)."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import GatewayError
from gateway.jsonio import json_dumps


def render(err: GatewayError, request_id: str) -> web.Response:
    """The one place a GatewayError becomes an HTTP response."""
    error: dict[str, object] = {"type": err.type, "code": err.code, "message": err.message}
    if err.problems:
        error["errors"] = [dict(p) for p in err.problems]
    body = {"type": "error", "error": error, "request_id": request_id}
    headers = dict(err.headers)
    headers["x-request-id"] = request_id
    return web.Response(
        status=err.status,
        body=json_dumps(body),
        content_type="application/json",
        headers=headers,
    )
