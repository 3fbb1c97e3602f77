"""The request pipeline: client_ip → geo → identity → body → decision → limits.admit → proxy →
limits.settle → request log and metrics, one stage per concern, each adding to the
RequestContext. The pipeline composes: it holds the order of the stages and the error and
disconnect handling; each stage's work lives in the stage's module."""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from gateway import metrics
from gateway.client_ip import ClientIPResolver
from gateway.context import RequestContext, clip
from gateway.decision import KeyScopes, attest, authenticate_request, decide, loaded
from gateway.errors import GatewayError, invalid_request
from gateway.geo import GeoInfo, GeoResolver
from gateway.identity import KeyRegistry, extract_key
from gateway.limits import Admission, Limits, settlement
from gateway.log import logger
from gateway.paths import normalize_target
from gateway.policy import CompiledPolicy
from gateway.proxy import Forwarded, Upstream
from gateway.request_body import Body, BodyBudget, judge_body, read_body
from gateway.request_log import log_request
from gateway.responses import render
from gateway.settings import LoadedConfig

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ID_PREFIX = "req_" + secrets.token_hex(6)
_id_counter = itertools.count(1)


def _new_request_id() -> str:
    """Unique across instances (random per-process prefix) and cheap (a counter)."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


_RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived once per config version (swapped whole on reload)."""

    config: LoadedConfig
    ip: ClientIPResolver
    upstream: Upstream
    customer_id_header: str
    customer_ip_header: str
    max_body: int
    body_timeout_s: float


def build_runtime(config: LoadedConfig) -> Runtime:
    s = config.settings
    return Runtime(
        config=config,
        ip=ClientIPResolver(s.client_ip.trusted_proxies, s.client_ip.header, s.client_ip.recursive),
        upstream=Upstream(
            s.upstream.url, config.secrets.upstream_api_key, s.upstream.auth_header,
            s.upstream.connect_timeout_s, s.upstream.read_timeout_s, s.upstream.max_connections,
            frozenset({s.customer.id_header.lower(), s.customer.ip_header.lower()}),
        ),
        customer_id_header=s.customer.id_header,
        customer_ip_header=s.customer.ip_header,
        max_body=s.upstream.max_body_bytes,
        body_timeout_s=s.server.body_timeout_s,
    )


class Pipeline:
    """Serves the proxy listener; every request ends in exactly one `request` log line."""

    def __init__(self, runtime: Runtime, geo: GeoResolver, registry: KeyRegistry,
                 limits: Limits) -> None:
        self.rt = runtime
        self.geo = geo
        self.registry = registry
        self.limits = limits
        self.policy: CompiledPolicy | None = None
        self.scopes = KeyScopes()
        self.inflight = 0
        self.bodies = BodyBudget(runtime.config.settings.server.max_inflight_body_bytes)
        #: set when shutdown cuts the requests still running (logged with reason `shutdown`)
        self.shutting_down = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rt = self.rt
        peer = request.remote or ""
        ctx = RequestContext(request_id="", peer_ip=peer, method=request.method,
                             path=clip(request.path) or "", started=time.perf_counter())
        self.inflight += 1
        adm: Admission | None = None
        fwd: Forwarded | None = None
        body: Body | None = None
        try:
            ctx.peer_ip = peer = rt.ip.normalize(peer)
            peer_trusted = rt.ip.is_trusted(peer)
            res = rt.ip.resolve(peer, request.headers.getall(rt.ip.header, []))
            supplied = request.headers.get("x-request-id")
            ctx.request_id = (supplied if peer_trusted and supplied and
                              _REQUEST_ID.match(supplied) else _new_request_id())
            ctx.client_ip = res.client_ip
            try:
                path, query = normalize_target(request.raw_path)
            except ValueError as exc:
                raise invalid_request("invalid_path", str(exc)) from None
            ctx.path = clip(path) or ""
            if path in _RESERVED_PATHS or path == "/admin" or path.startswith("/admin/"):
                raise GatewayError(404, "not_found_error", "not_found",
                                   "not served on the proxy listener", decision="deny")
            loc = self.geo.lookup(res.client_ip)
            ctx.country, ctx.asn, ctx.anonymizer = loc.country, loc.asn, list(loc.anonymizer)

            # Authenticate and judge the attestation from the headers before anything is
            # spent on the body (§6); the rest of the decision once the model is known.
            key = authenticate_request(self.registry, extract_key(
                request.headers.get("x-api-key"), request.headers.get("authorization")),
                time.time())
            ctx.key_id, ctx.reseller = key.key_id, key.reseller
            policy = loaded(self.policy)
            att = attest(policy, key, request.headers.get(rt.customer_id_header),
                         request.headers.get(rt.customer_ip_header))
            ctx.customer_id, ctx.customer_ip = clip(att.customer_id), att.customer_ip

            body = await read_body(request, rt.max_body, self.bodies, rt.body_timeout_s)
            facts = judge_body(request.method, request.headers.get("content-type", ""), body,
                               path, policy.model_rules or bool(key.models),
                               policy.doc.limits.default_max_output_tokens)
            body.judged(self.bodies)  # the parsed copies are gone: hold the bytes only
            ctx.model, ctx.stream = clip(facts.model), facts.stream

            cloc: GeoInfo | None = None
            if att.customer_ip is not None:
                cloc = self.geo.lookup(att.customer_ip)
                ctx.customer_country = cloc.country

            dec = decide(policy, self.scopes, key, att, loc, cloc, facts.model, path)
            ctx.shadow = dec.shadow
            ctx.rule = dec.rule
            if dec.error is not None:
                ctx.reason = dec.reason
                raise dec.error

            adm, rl_headers = await self.limits.admit(
                dec.subjects, facts.input_estimate, facts.max_output_tokens,
                self.limits.family_for(path))
            headers = rt.upstream.request_headers(
                request.headers, peer, peer_trusted, ctx.request_id,
                body_rewritten=body.inflated or facts.add_include_usage)
            rl_headers["x-request-id"] = ctx.request_id
            fwd = Forwarded()
            target = f"{path}?{query}" if query else path
            # The forward stage holds the only reference to the body, and drops it (and its
            # share of the budget) once the body is sent.
            sent_body = body
            resp = await rt.upstream.forward(
                request, target, body.take(), headers, rl_headers, fwd,
                strip_usage=facts.add_include_usage,
                on_sent=lambda: sent_body.release(self.bodies))
            ctx.status = resp.status
            return resp
        except GatewayError as err:
            if err.key_id is not None:
                ctx.key_id, ctx.reseller = err.key_id, err.reseller
            ctx.decision = err.decision
            if ctx.reason is None:
                ctx.reason = err.code
            ctx.status = err.status
            if not ctx.request_id:
                ctx.request_id = _new_request_id()
            resp = render(err, ctx.request_id)
            if body is None and request.body_exists and not request.content.is_eof():
                # Refused before its body was read: close rather than keep the connection.
                resp.force_close()
            return resp
        except (ConnectionResetError, asyncio.CancelledError):
            # The client went away, or the gateway cut the request at shutdown; the upstream
            # request is closed by the proxy stage.
            ctx.decision = "error"
            if self.shutting_down:
                ctx.reason, ctx.status = "shutdown", 503
            else:
                ctx.reason, ctx.status = "client_disconnected", 499
            raise
        except Exception as exc:  # a bug must still answer in the documented error shape
            ctx.decision, ctx.reason = "error", "internal_error"
            logger().error("internal_error", request_id=ctx.request_id,
                           error=type(exc).__name__, detail=str(exc)[:200])
            if fwd is not None and fwd.upstream_status is not None:
                ctx.status = 502
                raise  # the answer has started: the connection is cut
            ctx.status = 500
            if not ctx.request_id:
                ctx.request_id = _new_request_id()
            return render(GatewayError(500, "api_error", "internal_error",
                                       "internal gateway error"), ctx.request_id)
        finally:
            if body is not None:
                body.release(self.bodies)
            self._finish(ctx, adm, fwd)

    def _finish(self, ctx: RequestContext, adm: Admission | None,
                fwd: Forwarded | None) -> None:
        self.inflight -= 1
        if fwd is not None:
            fwd.to_context(ctx)
        if adm is not None:
            self.limits.settle(adm, *settlement(adm, fwd))
        duration = time.perf_counter() - ctx.started
        ctx.duration_ms = round(duration * 1000.0, 3)
        policy = self.policy
        metrics.record_request(ctx, fwd, duration, policy.doc.resellers if policy else ())
        log_request(ctx)
