"""The request pipeline: client_ip → geo → identity → policy → limits.admit → proxy →
limits.settle → audit, one stage per concern, each adding to the RequestContext."""

from __future__ import annotations

import asyncio
import re
import time

from aiohttp import web

from gateway import metrics
from gateway.audit import log_request
from gateway.context import RequestContext, clip, new_request_id
from gateway.decision import KeyScopes, attest, authenticate_request, decide, loaded
from gateway.errors import GatewayError, invalid_request
from gateway.geo import GeoInfo, GeoResolver
from gateway.identity import KeyRegistry, extract_key
from gateway.limits import Admission, Limits
from gateway.log import logger
from gateway.paths import normalize_target
from gateway.policy import CompiledPolicy
from gateway.proxy import Forwarded
from gateway.request_body import Body, BodyBudget, parse_json, read_body
from gateway.responses import render
from gateway.snapshot import Snapshot
from gateway.store.base import KeyRecord, Subject
from gateway.usage import RequestFacts, charged_tokens, estimate_request, with_include_usage

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class Pipeline:
    """Serves the proxy listener; every request ends in exactly one `request` log line."""

    def __init__(self, snapshot: Snapshot, limits: Limits) -> None:
        #: What requests are judged against; replaced whole (never patched) on every change.
        self.snapshot = snapshot
        self.limits = limits
        self.scopes = KeyScopes()
        self.inflight = 0
        self.bodies = BodyBudget(snapshot.parts.config.settings.server.max_inflight_body_bytes)
        #: set when shutdown cuts the requests still running (logged with reason `shutdown`)
        self.shutting_down = False

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
        rt = snap.parts
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
                              _REQUEST_ID.match(supplied) else new_request_id())
            ctx.client_ip = res.client_ip
            try:
                path, query = normalize_target(request.raw_path)
            except ValueError as exc:
                raise invalid_request("invalid_path", str(exc)) from None
            ctx.path = clip(path) or ""
            if path in _RESERVED_PATHS or path == "/admin" or path.startswith("/admin/"):
                raise GatewayError(404, "not_found_error", "not_found",
                                   "not served on the proxy listener", decision="deny")
            loc = snap.geo.lookup(res.client_ip)
            ctx.country, ctx.asn, ctx.anonymizer = loc.country, loc.asn, list(loc.anonymizer)

            # Authenticate and judge the attestation from the headers before anything is
            # spent on the body (§6); the rest of the decision once the model is known.
            key = authenticate_request(snap.registry, extract_key(
                request.headers.get("x-api-key"), request.headers.get("authorization")),
                time.time())
            ctx.key_id, ctx.reseller = key.key_id, key.reseller
            policy = loaded(snap.policy)
            att = attest(policy, key, request.headers.get(rt.customer_id_header),
                         request.headers.get(rt.customer_ip_header))
            ctx.customer_id, ctx.customer_ip = clip(att.customer_id), att.customer_ip

            body = await read_body(request, rt.max_body, self.bodies, rt.body_timeout_s)
            facts = self._facts(request, path, body, policy, key)
            body.judged(self.bodies)  # the parsed copies are gone: hold the bytes only
            ctx.model, ctx.stream = clip(facts.model), facts.stream

            cloc: GeoInfo | None = None
            if att.customer_ip is not None:
                cloc = snap.geo.lookup(att.customer_ip)
                ctx.customer_country = cloc.country

            dec = decide(policy, self.scopes, key, att, loc, cloc, facts.model, path)
            ctx.shadow = dec.shadow
            ctx.rule = dec.rule
            if dec.error is not None:
                ctx.reason = dec.reason
                raise dec.error

            adm, rl_headers = await self._admit(dec.subjects, facts.input_estimate,
                                                facts.max_output_tokens, path)
            headers = rt.upstream.request_headers(
                request.headers, self._xff(request, peer, peer_trusted), ctx.request_id,
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
            if fwd is not None and fwd.upstream_status is not None:
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
            self._finish(ctx, adm, fwd)

    @staticmethod
    def _facts(request: web.Request, path: str, body: Body, policy: CompiledPolicy,
               key: KeyRecord) -> RequestFacts:
        """Judge what the body says: model, stream, output maximum. Where a rule or the key
        scopes models, a body whose model cannot be read is refused. An OpenAI stream that
        did not ask for usage gets its body re-encoded asking for it (§8)."""
        must_judge = policy.model_rules or bool(key.models)
        try:
            doc = parse_json(request.method, body.data)
        except ValueError as exc:
            ctype = request.headers.get("content-type", "")
            if must_judge or "json" in ctype or body.data.lstrip()[:1] in (b"{", b"["):
                raise invalid_request("invalid_json", str(exc)) from None
            doc = None  # not JSON (an upload, say) and nothing needs its model
        if must_judge and doc is not None and "model" in doc and not isinstance(
                doc["model"], str):
            raise invalid_request("invalid_json", "model must be a string")
        if must_judge and doc is None and body.data:
            raise invalid_request("invalid_json", "this key or policy scopes models: the "
                                  "request body must be a JSON object naming the model")
        try:
            facts = estimate_request(doc, len(body.data), path,
                                     policy.doc.limits.default_max_output_tokens)
        except ValueError as exc:
            raise invalid_request("invalid_max_tokens", str(exc)) from None
        if facts.add_include_usage and doc is not None:
            # Re-encoded from the document just parsed, not parsed a second time.
            body.data = with_include_usage(doc)
        return facts

    def _finish(self, ctx: RequestContext, adm: Admission | None,
                fwd: Forwarded | None) -> None:
        self.inflight -= 1
        if fwd is not None:
            ctx.upstream_status = fwd.upstream_status
            if fwd.upstream_s is not None and fwd.sent:
                ctx.upstream_ms = round(fwd.upstream_s * 1000.0, 3)
                metrics.upstream_duration.observe(fwd.upstream_s)
            if fwd.ttfb_s is not None:
                metrics.upstream_ttfb.observe(fwd.ttfb_s)
            if fwd.upstream_status is not None:
                metrics.upstream_responses.inc((str(fwd.upstream_status),))
            if fwd.usage is not None:
                ctx.input_tokens = fwd.usage.input_tokens
                ctx.output_tokens = fwd.usage.output_tokens
        if adm is not None:
            refund = fwd is None or not fwd.sent or fwd.failed or (
                fwd.upstream_status is not None and fwd.upstream_status >= 400)
            in_act, out_act = charged_tokens(
                adm.input_reserved, adm.output_reserved, fwd.usage if fwd else None,
                refund=refund, metered=fwd is not None and fwd.metered)
            self.limits.settle(adm, in_act, out_act)
        duration = time.perf_counter() - ctx.started
        ctx.duration_ms = round(duration * 1000.0, 3)
        metrics.request_duration.observe(duration)
        policy = self.policy
        reseller = ctx.reseller if ctx.reseller and policy and (
            ctx.reseller in policy.doc.resellers) else ("none" if not ctx.reseller else "other")
        metrics.requests.inc((ctx.decision, ctx.reason or "", reseller,
                              metrics.country_label(ctx.country)))
        for rule in ctx.shadow:
            metrics.shadow.inc((rule,))
        if ctx.input_tokens:
            metrics.tokens.inc(("input", reseller), ctx.input_tokens)
        if ctx.output_tokens:
            metrics.tokens.inc(("output", reseller), ctx.output_tokens)
        log_request(ctx)

    async def _admit(self, subjects: tuple[Subject, ...], input_est: int, output_est: int,
                     path: str) -> tuple[Admission | None, dict[str, str]]:
        t0 = time.perf_counter()
        try:
            return await self.limits.admit(subjects, input_est, output_est,
                                           self.limits.family_for(path))
        finally:
            if subjects:
                metrics.store_duration.observe(time.perf_counter() - t0)

    @staticmethod
    def _xff(request: web.Request, peer: str, peer_trusted: bool) -> str:
        """X-Forwarded-For for the upstream: a trusted proxy's chain plus the peer; from an
        untrusted peer, the peer alone (a forged chain is not passed on)."""
        if peer_trusted:
            prior = ", ".join(request.headers.getall("X-Forwarded-For", []))
            if prior:
                return f"{prior}, {peer}"
        return peer
