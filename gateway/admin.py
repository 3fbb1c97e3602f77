"""The admin listener: /healthz, /readyz, /metrics (no token), /admin/ui (the screening page,
no token: it holds no data) and /admin/* (bearer token).

It serves an `AdminBackend` (the running gateway) and answers every error in the one body of
docs/architecture.md §6, with a request id, as the proxy listener does."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources
from typing import Any, Protocol

from aiohttp import web

from gateway import metrics
from gateway.audit import parse_limit, parse_since, store_policy
from gateway.context import new_request_id
from gateway.errors import GatewayError, OperationError, StoreError
from gateway.explain import explain
from gateway.key_admin import (
    iso_time,
    issue_key,
    list_keys,
    revoke_key,
    rotate_key,
    show,
    show_key,
    update_key,
    with_iso_times,
)
from gateway.log import logger
from gateway.operations import policy_from_text
from gateway.pipeline import Pipeline
from gateway.policy import canonical
from gateway.responses import render
from gateway.screening import build_report
from gateway.settings import ConfigError, LoadedConfig
from gateway.store.base import PolicyConflict, Store
from gateway.usage_report import parse_query, read_report


class AdminBackend(Protocol):
    """What the admin API needs of the gateway it serves (`GatewayService` implements it)."""

    @property
    def config(self) -> LoadedConfig:
        """The config in force (its admin token, its geo databases)."""

    @property
    def store(self) -> Store: ...

    @property
    def pipeline(self) -> Pipeline:
        """The live pipeline: its snapshot (keys, policy, geo) answers explain."""

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body) for /readyz."""

    def publish_metrics(self) -> None:
        """Move every tally and gauge into the Prometheus families, before a scrape."""

    async def reload(self) -> bool:
        """Re-read the config file; False when it was refused (the running one stays)."""


BACKEND: web.AppKey[AdminBackend] = web.AppKey("backend", AdminBackend)

#: The `Server` header of every response of this process's listeners: no name or version of
#: the software underneath (aiohttp would send `Python/3.x aiohttp/3.y`).
SERVER_HEADER = "gateway"

#: error.type and the code of an admin error by HTTP status, where the call names no code.
_BY_STATUS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_admin_token"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("request_too_large", "request_too_large"),
    503: ("overloaded_error", "store_unavailable"),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def hide_server_version() -> None:
    """Make aiohttp send `Server: gateway` on every response it writes, routed ones and its
    own 400s for malformed requests alike (these never reach an on_response_prepare hook, so
    the default aiohttp's web responses fill in is replaced where it is kept)."""
    from aiohttp import web_response

    setattr(web_response, "SERVER_SOFTWARE", SERVER_HEADER)  # noqa: B010 - not re-exported


def admin_error(status: int, message: str, code: str | None = None,
                problems: tuple[dict[str, str], ...] = ()) -> GatewayError:
    """An admin API refusal: error.type follows the status, the code is `code` or the
    status's own."""
    type_, default = _BY_STATUS.get(status, (
        "invalid_request_error" if status < 500 else "api_error",
        "invalid_request" if status < 500 else "internal_error"))
    return GatewayError(status, type_, code or default, message, problems=problems)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer gets a request id; every error, whoever raises it (a handler, the router,
    aiohttp's body limit), is rendered in the one error body."""
    request_id = new_request_id()
    try:
        resp = await handler(request)
    except GatewayError as exc:
        return render(exc, request_id)
    except OperationError as exc:
        return render(admin_error(exc.status, str(exc)), request_id)
    except StoreError as exc:
        return render(admin_error(503, str(exc)), request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return render(admin_error(exc.status, exc.reason.lower()), request_id)
    except Exception as exc:  # a bug must still answer in the documented error shape
        logger().error("internal_error", request_id=request_id, path=request.path,
                       error=type(exc).__name__, detail=str(exc)[:200])
        return render(admin_error(500, "internal gateway error"), request_id)
    if not resp.prepared:
        resp.headers["x-request-id"] = request_id
    return resp


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/admin/") and request.path not in UI_FILES:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        expected = request.app[BACKEND].config.secrets.admin_token
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 expected.encode()):
            raise admin_error(401, "admin API needs Authorization: Bearer <admin token>")
    return await handler(request)


def _actor(request: web.Request) -> str:
    return f"admin-api:{request.remote}"


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        doc = await request.json()
    except ValueError:
        raise OperationError(400, "body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise OperationError(400, "body must be a JSON object")
    return doc


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, body = request.app[BACKEND].readiness()
    return web.json_response(body, status=200 if ready else 503)


async def metrics_view(request: web.Request) -> web.Response:
    request.app[BACKEND].publish_metrics()
    return web.Response(body=metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _read_own_write(request: web.Request, key_id: str) -> None:
    """The instance that changed a key uses the change at once (read-your-writes); the others
    follow through the change event within a second."""
    await request.app[BACKEND].pipeline.registry.refresh(key_id)


async def keys_list(request: web.Request) -> web.Response:
    store = request.app[BACKEND].store
    return web.json_response({"keys": await list_keys(store, request.query.get("reseller"))})


async def keys_issue(request: web.Request) -> web.Response:
    svc = request.app[BACKEND]
    rec, full = await issue_key(svc.store, await _body(request), _actor(request))
    await _read_own_write(request, rec.key_id)
    return web.json_response({"key_id": rec.key_id, "key": full, "record": show(rec)},
                             status=201)


async def keys_update(request: web.Request) -> web.Response:
    """PATCH body: the fields to change (as for issue, null clears one); the key as shown."""
    store = request.app[BACKEND].store
    shown = await update_key(store, request.match_info["key_id"], await _body(request),
                             _actor(request))
    await _read_own_write(request, request.match_info["key_id"])
    return web.json_response(shown)


async def keys_show(request: web.Request) -> web.Response:
    store = request.app[BACKEND].store
    return web.json_response(await show_key(store, request.match_info["key_id"]))


async def keys_revoke(request: web.Request) -> web.Response:
    store = request.app[BACKEND].store
    shown = await revoke_key(store, request.match_info["key_id"], _actor(request))
    await _read_own_write(request, request.match_info["key_id"])
    return web.json_response(shown)


async def keys_rotate(request: web.Request) -> web.Response:
    store = request.app[BACKEND].store
    body = await _body(request)
    overlap = body.get("overlap_s", 3600)
    if not isinstance(overlap, int | float) or isinstance(overlap, bool):
        raise OperationError(400, "overlap_s must be a number of seconds")
    rec, full = await rotate_key(store, request.match_info["key_id"], _actor(request),
                                 float(overlap))
    await _read_own_write(request, rec.key_id)
    return web.json_response({"key_id": rec.key_id, "key": full, "record": show(rec)})


async def policy_show(request: web.Request) -> web.Response:
    stored = await request.app[BACKEND].store.get_policy()
    if stored is None:
        raise admin_error(404, "no policy stored")
    return web.json_response({"version": stored.version, "applied_at": stored.applied_at,
                              "applied_at_iso": iso_time(stored.applied_at),
                              "actor": stored.actor, "policy": json.loads(stored.doc)})


async def policy_put(request: web.Request) -> web.Response:
    """Body: the policy as YAML or JSON. ?dry_run=1 validates only; ?expected_version=N."""
    svc = request.app[BACKEND]
    text = await request.text()
    try:
        doc = policy_from_text(text, svc.config)
    except ConfigError as exc:
        raise admin_error(400, str(exc), "invalid_policy", tuple(
            {"field": p.field, "reason": p.reason} for p in exc.problems)) from None
    if request.query.get("dry_run") in ("1", "true"):
        return web.json_response({"valid": True, "policy": json.loads(canonical(doc))})
    expected = request.query.get("expected_version")
    if expected and not expected.isdigit():
        raise admin_error(400, "expected_version must be a policy version number")
    try:
        version = await store_policy(svc.store, doc, _actor(request),
                                     int(expected) if expected else None)
    except PolicyConflict as exc:
        raise admin_error(409, str(exc), "version_conflict") from None
    return web.json_response({"version": version})


async def audit_view(request: web.Request) -> web.Response:
    """?since= (24h, ISO 8601 or Unix seconds) &limit= (default 1000): the store's audit
    stream, oldest first, as {"events": [...]}."""
    try:
        since_q = request.query.get("since")
        since = parse_since(since_q) if since_q else None
        limit = parse_limit(request.query.get("limit"))
    except ValueError as exc:
        raise admin_error(400, str(exc)) from None
    events = await request.app[BACKEND].store.list_audit(since, limit)
    return web.json_response({"events": [with_iso_times(e, ("time",)) for e in events]})


async def usage_view(request: web.Request) -> web.Response:
    """?since= (7d, 24h, an ISO 8601 date; default 7d) &reseller= &key= (a key id)
    &customer= &by= (day, model, customer): the usage ledger as {"rows": [...],
    "totals": {...}} (gateway/usage_report.py)."""
    try:
        query = parse_query(request.query, time.time())
    except ValueError as exc:
        raise admin_error(400, str(exc)) from None
    svc = request.app[BACKEND]
    return web.json_response(await read_report(svc.store, query,
                                               svc.config.settings.usage.retention_days))


async def explain_view(request: web.Request) -> web.Response:
    svc = request.app[BACKEND]
    q = request.query
    if "ip" not in q:
        raise admin_error(400, "ip is required")
    return web.json_response(explain(
        svc.pipeline.snapshot, svc.pipeline.scopes, q["ip"],
        key=request.headers.get("x-explain-key") or q.get("key"), key_id=q.get("key_id"),
        reseller=q.get("reseller"), customer_ip=q.get("customer_ip"),
        customer_id=q.get("customer_id"), model=q.get("model"),
        path=q.get("path", "/v1/messages"), attestation=q.get("attestation"),
        method=q.get("method", "POST"), client_cert_sha256=q.get("client_cert_sha256")))


async def report_view(request: web.Request) -> web.Response:
    """GET /admin/report[/{reseller}]?since=24h: the reseller screening report
    (docs/architecture.md §15); 404 for a reseller the live policy does not have."""
    svc = request.app[BACKEND]
    reseller = request.match_info.get("reseller")
    await svc.pipeline.screening.flush()  # this instance's latest tallies too
    return web.json_response(await build_report(svc.store, svc.pipeline.snapshot.policy,
                                                request.query.get("since"), reseller))


async def reload_view(request: web.Request) -> web.Response:
    if not await request.app[BACKEND].reload():
        raise admin_error(400, "the config file was refused and the running config stays "
                          "(config_reload_failed in the log says why)", "reload_refused")
    return web.json_response({"reloaded": True})


#: The screening page's files (package data under gateway/ui/) by path, with their types. The
#: page is served without the token: it holds no data until the operator types the token, and
#: then its script reads /admin/report with it like any other client of the admin API.
UI_FILES: dict[str, tuple[str, str]] = {
    "/admin/ui": ("index.html", "text/html"),
    "/admin/ui/app.js": ("app.js", "text/javascript"),
    "/admin/ui/app.css": ("app.css", "text/css"),
    "/admin/ui/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

#: The page's headers: its own files only (no inline script or style, no other origin), never
#: framed, never cached, no referrer, no content sniffing.
UI_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@cache
def _ui_file(name: str) -> bytes:
    return (resources.files("gateway") / "ui" / name).read_bytes()


async def ui_view(request: web.Request) -> web.Response:
    """GET /admin/ui[/app.js|/app.css]: the read-only screening page, no token needed."""
    name, content_type = UI_FILES[request.path]
    return web.Response(body=_ui_file(name), content_type=content_type, charset="utf-8",
                        headers=UI_HEADERS)


def build_admin_app(backend: AdminBackend) -> web.Application:
    """The admin application serving `backend`."""
    app = web.Application(middlewares=[_errors, _auth])
    app[BACKEND] = backend
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics_view)
    r.add_get("/admin/keys", keys_list)
    r.add_post("/admin/keys", keys_issue)
    r.add_get("/admin/keys/{key_id}", keys_show)
    r.add_patch("/admin/keys/{key_id}", keys_update)
    r.add_post("/admin/keys/{key_id}/revoke", keys_revoke)
    r.add_post("/admin/keys/{key_id}/rotate", keys_rotate)
    r.add_get("/admin/policy", policy_show)
    r.add_put("/admin/policy", policy_put)
    r.add_get("/admin/explain", explain_view)
    r.add_get("/admin/audit", audit_view)
    r.add_get("/admin/usage", usage_view)
    r.add_post("/admin/reload", reload_view)
    r.add_get("/admin/report", report_view)
    r.add_get("/admin/report/{reseller}", report_view)
    for path in UI_FILES:
        r.add_get(path, ui_view)
    return app
