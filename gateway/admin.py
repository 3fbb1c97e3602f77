"""The admin listener: /healthz, /readyz, /metrics (no token) and /admin/* (bearer token)."""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway import metrics
from gateway.audit import parse_limit, parse_since, record_policy_applied
from gateway.errors import StoreError
from gateway.explain import explain
from gateway.keys import (
    KeyOpError,
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
from gateway.policy import canonical, require_databases, validate_policy
from gateway.settings import ConfigError, load_yaml

if TYPE_CHECKING:
    from gateway.app import GatewayService

SERVICE: web.AppKey[Any] = web.AppKey("service", object)

#: The `Server` header of every response of this process's listeners: no name or version of
#: the software underneath (aiohttp would send `Python/3.x aiohttp/3.y`).
SERVER_HEADER = "gateway"


def hide_server_version() -> None:
    """Make aiohttp send `Server: gateway` on every response it writes, routed ones and its
    own 400s for malformed requests alike (these never reach an on_response_prepare hook, so
    the default aiohttp's web responses fill in is replaced where it is kept)."""
    from aiohttp import web_response

    setattr(web_response, "SERVER_SOFTWARE", SERVER_HEADER)  # noqa: B010 - not re-exported


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": "admin_error",
                                                         "message": message}}, status=status)


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    if not request.path.startswith("/admin/"):
        return await handler(request)  # type: ignore[no-any-return]
    svc: GatewayService = request.app[SERVICE]
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    expected = svc.config.secrets.admin_token
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             expected.encode()):
        return _err(401, "admin API needs Authorization: Bearer <admin token>")
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except KeyOpError as exc:
        return _err(exc.status, str(exc))
    except StoreError as exc:
        return _err(503, str(exc))


def _actor(request: web.Request) -> str:
    return f"admin-api:{request.remote}"


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        doc = await request.json()
    except ValueError:
        raise KeyOpError(400, "body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise KeyOpError(400, "body must be a JSON object")
    return doc


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, body = request.app[SERVICE].readiness()
    return web.json_response(body, status=200 if ready else 503)


async def metrics_view(request: web.Request) -> web.Response:
    svc: GatewayService = request.app[SERVICE]
    metrics.STORE_UP.set(1 if svc.limits.store_ok else 0)
    svc.publish_cache_counts()
    metrics.flush(svc.pipeline.inflight, svc.limits.store_errors)
    return web.Response(body=metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _read_own_write(request: web.Request, key_id: str) -> None:
    """The instance that changed a key uses the change at once (read-your-writes); the others
    follow through the change event within a second."""
    await request.app[SERVICE].registry.refresh(key_id)


async def keys_list(request: web.Request) -> web.Response:
    store = request.app[SERVICE].store
    return web.json_response({"keys": await list_keys(store, request.query.get("reseller"))})


async def keys_issue(request: web.Request) -> web.Response:
    svc: GatewayService = request.app[SERVICE]
    rec, full = await issue_key(svc.store, await _body(request), _actor(request))
    await _read_own_write(request, rec.key_id)
    return web.json_response({"key_id": rec.key_id, "key": full, "record": show(rec)},
                             status=201)


async def keys_update(request: web.Request) -> web.Response:
    """PATCH body: the fields to change (as for issue, null clears one); the key as shown."""
    store = request.app[SERVICE].store
    shown = await update_key(store, request.match_info["key_id"], await _body(request),
                             _actor(request))
    await _read_own_write(request, request.match_info["key_id"])
    return web.json_response(shown)


async def keys_show(request: web.Request) -> web.Response:
    store = request.app[SERVICE].store
    return web.json_response(await show_key(store, request.match_info["key_id"]))


async def keys_revoke(request: web.Request) -> web.Response:
    store = request.app[SERVICE].store
    shown = await revoke_key(store, request.match_info["key_id"], _actor(request))
    await _read_own_write(request, request.match_info["key_id"])
    return web.json_response(shown)


async def keys_rotate(request: web.Request) -> web.Response:
    store = request.app[SERVICE].store
    body = await _body(request)
    overlap = body.get("overlap_s", 3600)
    if not isinstance(overlap, int | float) or isinstance(overlap, bool):
        raise KeyOpError(400, "overlap_s must be a number of seconds")
    rec, full = await rotate_key(store, request.match_info["key_id"], _actor(request),
                                 float(overlap))
    await _read_own_write(request, rec.key_id)
    return web.json_response({"key_id": rec.key_id, "key": full, "record": show(rec)})


async def policy_show(request: web.Request) -> web.Response:
    stored = await request.app[SERVICE].store.get_policy()
    if stored is None:
        return _err(404, "no policy stored")
    return web.json_response({"version": stored.version, "applied_at": stored.applied_at,
                              "applied_at_iso": iso_time(stored.applied_at),
                              "actor": stored.actor, "policy": json.loads(stored.doc)})


async def policy_put(request: web.Request) -> web.Response:
    """Body: the policy as YAML or JSON. ?dry_run=1 validates only; ?expected_version=N."""
    svc: GatewayService = request.app[SERVICE]
    text = await request.text()
    try:
        raw = load_yaml(text, "request body")  # duplicate keys refused, as in policy files
        doc = validate_policy(raw, "request body")
        # A rule on a database this gateway lacks would never fire: refuse it, keep the live one.
        require_databases(doc, svc.config.settings.geo, "request body")
    except ConfigError as exc:
        return web.json_response({"type": "error", "error": {
            "type": "invalid_policy", "message": str(exc), "field": exc.field,
            "reason": exc.reason}}, status=400)
    if request.query.get("dry_run") in ("1", "true"):
        return web.json_response({"valid": True, "policy": json.loads(canonical(doc))})
    expected = request.query.get("expected_version")
    before = await svc.store.get_policy()  # for the audit of reseller status changes
    try:
        version = await svc.store.put_policy(canonical(doc), _actor(request),
                                             int(expected) if expected else None)
    except ValueError as exc:
        return _err(409, str(exc))
    await record_policy_applied(svc.store, _actor(request), version,
                                before.doc if before else None, canonical(doc))
    return web.json_response({"version": version})


async def audit_view(request: web.Request) -> web.Response:
    """?since= (24h, ISO 8601 or Unix seconds) &limit= (default 1000): the store's audit
    stream, oldest first, as {"events": [...]}."""
    try:
        since_q = request.query.get("since")
        since = parse_since(since_q) if since_q else None
        limit = parse_limit(request.query.get("limit"))
    except ValueError as exc:
        return _err(400, str(exc))
    events = await request.app[SERVICE].store.list_audit(since, limit)
    return web.json_response({"events": [with_iso_times(e, ("time",)) for e in events]})


async def explain_view(request: web.Request) -> web.Response:
    svc: GatewayService = request.app[SERVICE]
    q = request.query
    if "ip" not in q:
        return _err(400, "ip is required")
    out = explain(svc.pipeline, svc.registry, q["ip"], key=request.headers.get("x-explain-key")
                  or q.get("key"), key_id=q.get("key_id"), reseller=q.get("reseller"),
                  customer_ip=q.get("customer_ip"), customer_id=q.get("customer_id"),
                  model=q.get("model"), path=q.get("path", "/v1/messages"))
    return web.json_response(out)


async def reload_view(request: web.Request) -> web.Response:
    ok = await request.app[SERVICE].reload()
    return web.json_response({"reloaded": ok}, status=200 if ok else 400)


def build_admin_app(service: GatewayService) -> web.Application:
    app = web.Application(middlewares=[_auth])
    app[SERVICE] = service
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
    r.add_post("/admin/reload", reload_view)
    return app
