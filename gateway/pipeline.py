"""The request pipeline: client_ip → geo → identity → policy → limits.admit → proxy →
limits.settle → audit, one stage per concern, each adding to the RequestContext."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import metrics
from gateway.audit import log_request, logger
from gateway.client_ip import ClientIPResolver
from gateway.context import RequestContext
from gateway.errors import GatewayError, permission_error, render
from gateway.geo import GeoInfo, GeoResolver
from gateway.identity import (
    KeyRegistry,
    extract_key,
    parse_attestation,
    require_customer,
)
from gateway.limits import Admission, Limits, subjects_for
from gateway.policy import CompiledPolicy, Inputs, country_allowed, evaluate_rules, glob_list
from gateway.proxy import Forwarded, Upstream
from gateway.settings import LoadedConfig
from gateway.store.base import KeyRecord
from gateway.usage import estimate_request

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ID_PREFIX = "req_" + secrets.token_hex(6)
_id_counter = itertools.count(1)


def _new_request_id() -> str:
    """Unique across instances (random per-process prefix) and cheap (a counter)."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


_RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived once per config version (swapped whole on reload)."""

    config: LoadedConfig
    ip: ClientIPResolver
    upstream: Upstream
    customer_id_header: str
    customer_ip_header: str
    max_body: int


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
    )


class _ScopeCache:
    """Compiled key scopes, recompiled only when the key record changes."""

    def __init__(self) -> None:
        self._c: dict[str, tuple[KeyRecord, Any, Any, frozenset[str | None] | None]] = {}

    def get(self, rec: KeyRecord) -> tuple[Any, Any, frozenset[str | None] | None]:
        hit = self._c.get(rec.key_id)
        if hit is not None and hit[0] is rec:
            return hit[1], hit[2], hit[3]
        countries = None if not rec.countries else frozenset(
            None if c == "unknown" else c for c in rec.countries)
        entry = (rec, glob_list(rec.models), glob_list(rec.paths), countries)
        if len(self._c) > 100_000:
            self._c.clear()
        self._c[rec.key_id] = entry
        return entry[1], entry[2], entry[3]


class Pipeline:
    """Serves the proxy listener; every request ends in exactly one `request` log line."""

    def __init__(self, runtime: Runtime, geo: GeoResolver, registry: KeyRegistry,
                 limits: Limits) -> None:
        self.rt = runtime
        self.geo = geo
        self.registry = registry
        self.limits = limits
        self.policy: CompiledPolicy | None = None
        self.scopes = _ScopeCache()
        self.inflight = 0
        # Set by the service when the shutdown deadline cuts the requests still running.
        self.shutting_down = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rt = self.rt
        peer = request.remote or ""
        ctx = RequestContext(request_id="", peer_ip=peer, method=request.method,
                             path=request.path, started=time.perf_counter())
        self.inflight += 1
        adm: Admission | None = None
        fwd: Forwarded | None = None
        try:
            ctx.peer_ip = peer = rt.ip.normalize(peer)
            peer_trusted = rt.ip.is_trusted(peer)
            res = rt.ip.resolve(peer, request.headers.getall(rt.ip.header, []))
            supplied = request.headers.get("x-request-id")
            ctx.request_id = (supplied if peer_trusted and supplied and
                              _REQUEST_ID.match(supplied) else _new_request_id())
            ctx.client_ip = res.client_ip
            if ctx.path in _RESERVED_PATHS or ctx.path.startswith("/admin"):
                raise GatewayError(404, "not_found_error", "not_found",
                                   "not served on the proxy listener", decision="deny")
            loc = self.geo.lookup(res.client_ip)
            ctx.country, ctx.asn, ctx.anonymizer = loc.country, loc.asn, list(loc.anonymizer)

            body = await self._read_body(request, rt.max_body)
            doc = self._parse_json(request, body)
            facts = estimate_request(doc, len(body))
            ctx.model, ctx.stream = facts.model, facts.stream

            key = self.registry.authenticate(
                extract_key(request.headers.get("x-api-key"),
                            request.headers.get("authorization")), time.time())
            ctx.key_id, ctx.reseller = key.key_id, key.reseller
            policy = self.policy
            if policy is None:
                raise GatewayError(503, "overloaded_error", "policy_unavailable",
                                   "no policy loaded yet")
            reseller = policy.doc.resellers.get(key.reseller)
            att = parse_attestation(request.headers.get(rt.customer_id_header),
                                    request.headers.get(rt.customer_ip_header))
            if reseller is not None and reseller.require_customer:
                require_customer(att)
            ctx.customer_id, ctx.customer_ip = att.customer_id, att.customer_ip
            cloc: GeoInfo | None = None
            if att.customer_ip is not None:
                cloc = self.geo.lookup(att.customer_ip)
                ctx.customer_country = cloc.country

            dec = evaluate_rules(policy, Inputs(loc, cloc, key.reseller, facts.model, ctx.path))
            ctx.shadow = dec.shadow
            ctx.rule = dec.rule
            if dec.action == "deny":
                ctx.reason = dec.reason
                raise permission_error(dec.reason or "request_not_allowed",
                                       f"request denied by policy rule {dec.rule or 'default'}")
            self.check_scopes(policy, key, ctx, loc, cloc)

            out_est = facts.max_output_tokens
            adm, rl_headers = await self._admit(policy, key, att.customer_id,
                                                facts.input_estimate, out_est)
            headers = rt.upstream.request_headers(
                request.headers, self._xff(request, peer, peer_trusted), ctx.request_id)
            rl_headers["x-request-id"] = ctx.request_id
            started = Forwarded()
            try:
                resp = await rt.upstream.forward(request, body, headers, rl_headers, started)
            finally:
                if started.upstream_status is not None:
                    # An answer began: log and settle on what it delivered, even when the
                    # client hung up mid-stream.
                    fwd = started
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
            return render(err, ctx.request_id)
        except (ConnectionResetError, asyncio.CancelledError):
            # The client went away; the upstream request is closed by the proxy stage.
            ctx.decision = "error"
            ctx.reason = "shutdown" if self.shutting_down else "client_disconnected"
            ctx.status = 503 if self.shutting_down else 499
            raise
        except Exception as exc:  # a bug must still answer in the documented error shape
            ctx.decision, ctx.reason = "error", "internal_error"
            logger().error("internal_error", request_id=ctx.request_id,
                           error=type(exc).__name__, detail=str(exc)[:200])
            if fwd is not None:
                ctx.status = 502
                raise  # the answer has started: the connection is cut
            ctx.status = 500
            if not ctx.request_id:
                ctx.request_id = _new_request_id()
            return render(GatewayError(500, "api_error", "internal_error",
                                       "internal gateway error"), ctx.request_id)
        finally:
            self._finish(ctx, adm, fwd)

    def _finish(self, ctx: RequestContext, adm: Admission | None,
                fwd: Forwarded | None) -> None:
        self.inflight -= 1
        if fwd is not None:
            ctx.upstream_status = fwd.upstream_status
            if fwd.upstream_s is not None:
                ctx.upstream_ms = round(fwd.upstream_s * 1000.0, 3)
                metrics.upstream_duration.observe(fwd.upstream_s)
            if fwd.ttfb_s is not None:
                metrics.upstream_ttfb.observe(fwd.ttfb_s)
            metrics.upstream_responses.inc((str(fwd.upstream_status),))
            if fwd.usage is not None:
                ctx.input_tokens = fwd.usage.input_tokens
                ctx.output_tokens = fwd.usage.output_tokens
        if adm is not None:
            if fwd is None:
                in_act, out_act = 0, 0  # never reached the upstream: refund everything
            else:
                u = fwd.usage
                in_act = u.input_tokens if u and u.input_tokens is not None else (
                    adm.input_reserved)
                # No usage seen: a finished or non-streamed answer was generated in full
                # upstream (charge the reservation); a cut stream delivered nothing counted.
                out_act = u.output_tokens if u and u.output_tokens is not None else (
                    adm.output_reserved if fwd.completed or not ctx.stream else 0)
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

    async def _admit(self, policy: CompiledPolicy, key: KeyRecord, customer_id: str | None,
                     input_est: int, output_est: int) -> tuple[Admission | None, dict[str, str]]:
        subjects = subjects_for(policy, key, customer_id)
        t0 = time.perf_counter()
        try:
            return await self.limits.admit(subjects, input_est, output_est)
        finally:
            if subjects:
                metrics.store_duration.observe(time.perf_counter() - t0)

    def check_scopes(self, policy: CompiledPolicy, key: KeyRecord,
                     ctx: RequestContext, loc: GeoInfo, cloc: GeoInfo | None) -> None:
        """Reseller status and countries, then the key's model, path and country scopes."""
        r = policy.doc.resellers.get(key.reseller)
        if r is None:
            raise permission_error("reseller_suspended",
                                   f"reseller {key.reseller!r} is not in the live policy")
        if r.status == "suspended":
            raise permission_error("reseller_suspended", f"reseller {key.reseller!r} is suspended")
        judged = cloc.country if cloc is not None else loc.country
        whose = "customer" if cloc is not None else "client"
        if not country_allowed(policy.reseller_countries.get(key.reseller), judged):
            raise permission_error("country_not_allowed",
                                   f"{whose} country {judged or 'unknown'} is outside the "
                                   "reseller's allowed countries")
        models, paths, countries = self.scopes.get(key)
        if models is not None and ctx.model is not None and not models.match(ctx.model):
            raise permission_error("model_not_allowed", f"model {ctx.model!r} is not in this "
                                   "key's scope")
        if paths is not None and not paths.match(ctx.path):
            raise permission_error("path_not_allowed", f"path {ctx.path!r} is not in this "
                                   "key's scope")
        if not country_allowed(countries, judged):
            raise permission_error("country_not_allowed",
                                   f"{whose} country {judged or 'unknown'} is outside this "
                                   "key's allowed countries")

    @staticmethod
    async def _read_body(request: web.Request, limit: int) -> bytes:
        length = request.content_length
        if length is not None and length > limit:
            raise GatewayError(413, "request_too_large", "request_too_large",
                               f"request body exceeds {limit} bytes")
        if not request.body_exists:
            return b""
        if length is not None:
            body = await request.content.readexactly(length) if length else b""
            return body
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total > limit:
                raise GatewayError(413, "request_too_large", "request_too_large",
                                   f"request body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _parse_json(request: web.Request, body: bytes) -> dict[str, Any] | None:
        if not body or request.method not in _BODY_METHODS:
            return None
        ctype = request.headers.get("content-type", "")
        if "json" not in ctype and body.lstrip()[:1] not in (b"{", b"["):
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            raise GatewayError(400, "invalid_request_error", "invalid_json",
                               "request body is not valid JSON") from None
        return doc if isinstance(doc, dict) else None

    @staticmethod
    def _xff(request: web.Request, peer: str, peer_trusted: bool) -> str:
        """X-Forwarded-For for the upstream: a trusted proxy's chain plus the peer; from an
        untrusted peer, the peer alone (a forged chain is not passed on)."""
        if peer_trusted:
            prior = ", ".join(request.headers.getall("X-Forwarded-For", []))
            if prior:
                return f"{prior}, {peer}"
        return peer
