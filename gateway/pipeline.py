"""The request pipeline: client_ip → geo → identity → body → decision → limits.admit → proxy →
limits.settle → request log and metrics, one stage per concern, each adding to the
RequestContext. The pipeline composes: it holds the order of the stages and the error and
disconnect handling; each stage's work lives in the stage's module."""

from __future__ import annotations

import asyncio
import re
import time

from aiohttp import web

from gateway import metrics, tracing
from gateway.attestation import ATTESTATION_HEADER, Verifications
from gateway.context import RequestContext, clip, new_request_id
from gateway.decision import (
    KeyScopes,
    attest,
    authenticate_request,
    check_client_cert,
    decide,
    loaded,
)
from gateway.errors import GatewayError, invalid_request
from gateway.geo import GeoInfo, GeoResolver
from gateway.identity import KeyRegistry, extract_key
from gateway.ledger import Ledger, Watched, use_of
from gateway.limits import Admission, Limits, settlement
from gateway.log import logger
from gateway.paths import normalize_target
from gateway.policy import CompiledPolicy
from gateway.proxy import Forwarded
from gateway.quotas import check as check_quotas
from gateway.quotas import effective_quotas
from gateway.request_body import Body, BodyBudget, judge_body, read_body
from gateway.request_log import log_request
from gateway.responses import render
from gateway.screening import ScreeningTallies
from gateway.self_service import SELF_SERVICE_PATH, SELF_SERVICE_REASON, describe_key
from gateway.snapshot import Snapshot
from gateway.store.base import KeyRecord
from gateway.tls import peer_cert_sha256

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class Pipeline:
    """Serves the proxy listener; every request ends in exactly one `request` log line."""

    def __init__(self, snapshot: Snapshot, limits: Limits, ledger: Ledger | None = None) -> None:
        #: What requests are judged against; replaced whole (never patched) on every change.
        self.snapshot = snapshot
        self.limits = limits
        #: usage tallies and quota use (docs/architecture.md §12)
        self.ledger = ledger if ledger is not None else Ledger(
            limits.store, snapshot.parts.config.settings.usage.retention_days)
        #: reseller screening tallies, sent by the ledger's flush (docs/architecture.md §15)
        self.screening = ScreeningTallies(limits.store, lambda: self.snapshot.policy)
        self.ledger.flush_hooks.append(self.screening.flush)
        self.scopes = KeyScopes()
        #: signed-attestation verification results (docs/architecture.md §5), across policies
        self.attestations = Verifications()
        self.inflight = 0
        self.bodies = BodyBudget(snapshot.parts.config.settings.server.max_inflight_body_bytes)
        #: set when shutdown cuts the requests still running (logged with reason `shutdown`)
        self.shutting_down = False
        #: None unless tracing.enabled (then opentelemetry is imported): one `if` per hook
        self.tracer = tracing.from_config(snapshot.parts.config)

    @property
    def policy(self) -> CompiledPolicy | None:
        """The policy of the current snapshot."""
        return self.snapshot.policy

    @property
    def geo(self) -> GeoResolver:
        """The geo resolver of the current snapshot."""
        return self.snapshot.geo

    @property
    def registry(self) -> KeyRegistry:
        """The key registry of the current snapshot."""
        return self.snapshot.registry

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # Read once, before the first await: the whole request is judged against one state.
        snap = self.snapshot
        parts = snap.parts
        peer = request.remote or ""
        ctx = RequestContext(request_id="", peer_ip=peer, method=request.method,
                             path=clip(request.path) or "", started=time.perf_counter())
        self.inflight += 1
        admission: Admission | None = None
        forwarded: Forwarded | None = None
        body: Body | None = None
        trace: tracing.RequestTrace | None = None
        held: Watched | None = None  # the watched subjects a quota check counted
        try:
            ctx.peer_ip = peer = parts.ip.normalize(peer)
            peer_trusted = parts.ip.is_trusted(peer)
            if self.tracer is not None:
                trace = self.tracer.start(request.headers, peer_trusted, ctx.started)
            resolved = parts.ip.resolve(peer, request.headers.getall(parts.ip.header, []))
            supplied = request.headers.get("x-request-id")
            ctx.request_id = (supplied if peer_trusted and supplied and
                              _REQUEST_ID.match(supplied) else new_request_id())
            ctx.client_ip = resolved.client_ip
            if trace is not None:
                trace.mark("client_ip")
            try:
                path, query = normalize_target(request.raw_path)
            except ValueError as exc:
                raise invalid_request("invalid_path", str(exc)) from None
            ctx.path = clip(path) or ""
            if path in _RESERVED_PATHS or path == "/admin" or path.startswith("/admin/"):
                raise GatewayError(404, "not_found_error", "not_found",
                                   "not served on the proxy listener", decision="deny")
            client_loc = snap.geo.lookup(resolved.client_ip)
            ctx.country, ctx.asn = client_loc.country, client_loc.asn
            ctx.anonymizer = list(client_loc.anonymizer)
            if trace is not None:
                trace.mark("geo")

            # Authenticate and judge the attestation from the headers before anything is
            # spent on the body (§6); the rest of the decision once the model is known.
            key = authenticate_request(snap.registry, extract_key(
                request.headers.get("x-api-key"), request.headers.get("authorization")),
                time.time())
            ctx.key_id, ctx.reseller = key.key_id, key.reseller
            policy = loaded(snap.policy)
            # The connection's client certificate matters only to a reseller bound to some.
            check_client_cert(policy, key, peer_cert_sha256(request.transport)
                              if key.reseller in policy.client_certs else None)
            if path == SELF_SERVICE_PATH and request.method == "GET":
                return await self._self_service(ctx, policy, key)
            attestation = attest(policy, key, request.headers.get(parts.customer_id_header),
                                 request.headers.get(parts.customer_ip_header),
                                 request.headers.get(ATTESTATION_HEADER), request.method, path,
                                 time.time(), self.attestations)
            ctx.customer_id = clip(attestation.customer_id)
            ctx.customer_ip = attestation.customer_ip
            ctx.attestation_sig = attestation.signature
            if trace is not None:
                trace.mark("auth")

            body = await read_body(request, parts.max_body, self.bodies, parts.body_timeout_s)
            facts = judge_body(request.method, request.headers.get("content-type", ""), body,
                               path, policy.model_rules or bool(key.models),
                               policy.doc.limits.default_max_output_tokens)
            body.judged(self.bodies)  # the parsed copies are gone: hold the bytes only
            ctx.model, ctx.stream = clip(facts.model), facts.stream
            if trace is not None:
                trace.mark("body")

            customer_loc: GeoInfo | None = None
            if attestation.customer_ip is not None:
                customer_loc = snap.geo.lookup(attestation.customer_ip)
                ctx.customer_country = customer_loc.country

            verdict = decide(policy, self.scopes, key, attestation, client_loc, customer_loc,
                             facts.model, path)
            ctx.shadow = verdict.shadow
            ctx.rule = verdict.rule
            if trace is not None:
                trace.mark("decision")
            if verdict.error is not None:
                ctx.reason = verdict.reason
                raise verdict.error

            quotas = effective_quotas(policy, key)
            if quotas:  # §12: after the decision, before the rate limits
                of_key, of_reseller = bool(quotas.key), bool(quotas.reseller)
                watched = await self.ledger.watched(key.reseller, key.key_id, of_key,
                                                    of_reseller)
                now = time.time()
                check_quotas(quotas, *use_of(watched, now), now)
                self.ledger.hold(watched)
                held = watched

            admission, limit_headers = await self.limits.admit(
                verdict.subjects, facts.input_estimate, facts.max_output_tokens,
                self.limits.family_for(path))
            if trace is not None:
                trace.mark("admit")
            headers = parts.upstream.request_headers(
                request.headers, peer, peer_trusted, ctx.request_id,
                body_rewritten=body.inflated or facts.add_include_usage)
            limit_headers["x-request-id"] = ctx.request_id
            if trace is not None:
                trace.inject(headers)
            forwarded = Forwarded()
            target = f"{path}?{query}" if query else path
            # The forward stage holds the only reference to the body, and drops it (and its
            # share of the budget) once the body is sent.
            sent_body = body
            resp = await parts.upstream.forward(
                request, target, body.take(), headers, limit_headers, forwarded,
                strip_usage=facts.add_include_usage,
                on_sent=lambda: sent_body.release(self.bodies))
            ctx.status = resp.status
            if trace is not None:
                trace.mark("forward")
            return resp
        except GatewayError as err:
            if err.key_id is not None:
                ctx.key_id, ctx.reseller = err.key_id, err.reseller
            ctx.decision = err.decision
            if ctx.reason is None:
                ctx.reason = err.code
            ctx.status = err.status
            if not ctx.request_id:
                ctx.request_id = new_request_id()
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
            if forwarded is not None and forwarded.upstream_status is not None:
                ctx.status = 502
                raise  # the answer has started: the connection is cut
            ctx.status = 500
            if not ctx.request_id:
                ctx.request_id = new_request_id()
            return render(GatewayError(500, "api_error", "internal_error",
                                       "internal gateway error"), ctx.request_id)
        finally:
            if body is not None:
                body.release(self.bodies)
            self._finish(ctx, admission, forwarded, snap, held, trace)

    async def _self_service(self, ctx: RequestContext, policy: CompiledPolicy,
                            key: KeyRecord) -> web.StreamResponse:
        """GET /v1/gateway/key: what the key may do and has left; never forwarded, no limit
        consumed (docs/architecture.md §12)."""
        # The key's use is part of the answer; the reseller's only counts against its quota.
        of_reseller = bool(effective_quotas(policy, key).reseller)
        watched = await self.ledger.watched(key.reseller, key.key_id, True, of_reseller)
        answer = describe_key(policy, key, *use_of(watched, time.time()))
        ctx.reason, ctx.status = SELF_SERVICE_REASON, 200
        return web.json_response(answer, headers={"x-request-id": ctx.request_id})

    def _finish(self, ctx: RequestContext, admission: Admission | None,
                forwarded: Forwarded | None, snap: Snapshot,
                held: Watched | None = None,
                trace: tracing.RequestTrace | None = None) -> None:
        self.inflight -= 1
        if held is not None:  # first, as inflight: a held watch is never dropped
            self.ledger.release(held)
        if forwarded is not None:
            forwarded.to_context(ctx)
        if admission is not None:
            self.limits.settle(admission, *settlement(admission, forwarded))
            if trace is not None:
                trace.mark("settle")
        duration = time.perf_counter() - ctx.started
        ctx.duration_ms = round(duration * 1000.0, 3)
        policy = snap.policy  # the request's own snapshot labels it
        metrics.record_request(ctx, forwarded, duration, policy.doc.resellers if policy else ())
        log_request(ctx)
        # Runs in `finally`: a fault of these must neither replace the answer (aiohttp's plain
        # 500) nor cost the request its settlement or its log line, both already done.
        try:
            if (forwarded is not None and forwarded.upstream_status is not None
                    and ctx.key_id is not None and ctx.reseller is not None):
                # §12: every request the upstream answered, with the usage it reported
                self.ledger.record(ctx.reseller, ctx.key_id, ctx.customer_id, ctx.model,
                                   ctx.input_tokens, ctx.output_tokens, time.time())
            self.screening.record(ctx, snap)
            if trace is not None:
                trace.finish(ctx)
        except Exception as exc:  # a bug: logged, the request stands
            logger().error("internal_error", request_id=ctx.request_id, stage="finish",
                           error=type(exc).__name__, detail=str(exc)[:200])
