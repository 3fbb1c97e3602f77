"""`gateway explain`: the whole decision trace for a hypothetical request, computed by the same
functions the request path uses."""

from __future__ import annotations

import time
from typing import Any

from gateway.context import RequestContext
from gateway.errors import GatewayError, auth_error
from gateway.geo import GeoInfo, GeoResolver
from gateway.identity import KeyRegistry, parse_attestation
from gateway.keys import iso_time
from gateway.limits import subjects_for
from gateway.paths import normalize_target
from gateway.pipeline import Pipeline
from gateway.policy import CompiledPolicy, Inputs, evaluate_rules
from gateway.store.base import KeyRecord


def _loc(geo: GeoResolver, ip: str) -> tuple[GeoInfo, dict[str, Any]]:
    info = geo.lookup(ip)
    return info, {"ip": ip, "country": info.country, "registered_country": info.registered_country,
                  "asn": info.asn, "asn_org": info.asn_org, "anonymizer": list(info.anonymizer),
                  "databases": {k: {"path": v["path"], "build_epoch": v["build_epoch"],
                                    "build_epoch_iso": iso_time(v["build_epoch"])}
                                for k, v in geo.explain(ip).items()}}


def _by_id(registry: KeyRegistry, key_id: str, now: float) -> KeyRecord:
    """The record of `key_id` as authentication would find it, without its secret."""
    rec = registry.keys.get(key_id)
    if rec is None:
        raise auth_error("invalid_api_key", f"no key {key_id[:64]}")
    if rec.status == "revoked":
        raise auth_error("key_revoked", "API key has been revoked")
    if rec.expires_at is not None and rec.expires_at <= now:
        raise auth_error("key_expired", "API key has expired")
    return rec


def explain(pipeline: Pipeline, registry: KeyRegistry, ip: str, key: str | None = None,
            reseller: str | None = None, customer_ip: str | None = None,
            customer_id: str | None = None, model: str | None = None,
            path: str = "/v1/messages", key_id: str | None = None) -> dict[str, Any]:
    """The decision for a request from `ip` with `key`, the key `key_id` (judged without its
    secret) or as any key of `reseller`."""
    out: dict[str, Any] = {"request": {"ip": ip, "key_id": None, "reseller": reseller,
                                       "customer_ip": customer_ip, "model": model, "path": path}}
    policy: CompiledPolicy | None = pipeline.policy
    out["policy_version"] = policy.version if policy else None
    try:
        path, _ = normalize_target(path)  # judged as the live path is
    except ValueError as exc:
        out["decision"] = {"decision": "deny", "status": 400, "code": "invalid_path",
                           "stage": "path", "message": str(exc)}
        return out
    out["request"]["path"] = path
    loc, out["client"] = _loc(pipeline.geo, ip)
    ctx = RequestContext("explain", ip, "POST", path, time.perf_counter(), client_ip=ip,
                         model=model)

    def done(decision: str, status: int, code: str | None, stage: str,
             message: str = "") -> dict[str, Any]:
        out["decision"] = {"decision": decision, "status": status, "code": code,
                           "stage": stage, "message": message}
        return out

    rec: KeyRecord | None = None
    if key or key_id:
        try:
            if key_id:
                rec = _by_id(registry, key_id, time.time())
            else:
                rec = registry.authenticate(key, time.time())
                registry.last_used.pop(rec.key_id, None)  # explaining is not using the key
        except GatewayError as err:
            out["identity"] = {"error": err.code, "key_id": key_id}
            return done(err.decision, err.status, err.code, "identity", err.message)
        reseller = rec.reseller
    elif reseller:
        rec = KeyRecord(key_id="(any)", reseller=reseller, secret_hash="")
    else:
        return done("deny", 401, "invalid_api_key", "identity", "no key or reseller given")
    out["request"]["key_id"] = rec.key_id
    out["request"]["reseller"] = reseller
    out["identity"] = {"key_id": rec.key_id, "reseller": reseller, "status": rec.status,
                       "scopes": {"models": rec.models, "paths": rec.paths,
                                  "countries": rec.countries}}
    if policy is None:
        return done("error", 503, "policy_unavailable", "policy", "no policy loaded")
    res = policy.doc.resellers.get(reseller or "")
    out["identity"]["reseller_config"] = res.model_dump(mode="json") if res else None
    cloc = None
    try:
        att = parse_attestation(customer_id if customer_id or not customer_ip else "explain",
                                customer_ip)
    except GatewayError as err:
        return done(err.decision, err.status, err.code, "attestation", err.message)
    if res is not None and res.require_customer and att.customer_ip is None:
        return done("deny", 403, "customer_attestation_required", "attestation",
                    "this reseller must attest the customer")
    if att.customer_ip:
        cloc, out["customer"] = _loc(pipeline.geo, att.customer_ip)
    dec = evaluate_rules(policy, Inputs(loc, cloc, reseller, model, path), trace=True)
    out["rules"] = dec.trace
    out["shadow"] = dec.shadow
    if dec.action == "deny":
        return done("deny", 403, dec.reason, "policy", f"rule {dec.rule or 'default'}")
    try:
        pipeline.check_scopes(policy, rec, ctx, loc, cloc, model)
    except GatewayError as err:
        return done(err.decision, err.status, err.code, "scopes", err.message)
    subjects = subjects_for(policy, rec, att.customer_id)
    out["limits"] = [{"subject": f"{s.kind}:{s.ident}", "rpm": s.rpm, "itpm": s.itpm,
                      "otpm": s.otpm, "concurrency": s.concurrency} for s in subjects]
    return done("allow", 200, None, "limits",
                "allowed by policy; admission then depends on the live limit state")
