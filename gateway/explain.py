"""`gateway explain`: the whole decision trace for a hypothetical request, computed by the same
functions the request path uses."""

from __future__ import annotations

import time
from typing import Any

from gateway.decision import (
    KeyScopes,
    attest,
    authenticate_request,
    check_client_cert,
    decide,
    key_by_id,
    loaded,
)
from gateway.errors import GatewayError, OperationError
from gateway.geo import GeoInfo, GeoResolver
from gateway.key_admin import iso_time
from gateway.paths import normalize_target
from gateway.policy import CompiledPolicy, normalize_fingerprint
from gateway.snapshot import Snapshot
from gateway.store.base import KeyRecord


def _loc(geo: GeoResolver, ip: str) -> tuple[GeoInfo, dict[str, Any]]:
    info = geo.lookup(ip)
    return info, {"ip": ip, "country": info.country, "registered_country": info.registered_country,
                  "asn": info.asn, "asn_org": info.asn_org, "anonymizer": list(info.anonymizer),
                  "databases": {k: {"path": v["path"], "build_epoch": v["build_epoch"],
                                    "build_epoch_iso": iso_time(v["build_epoch"])}
                                for k, v in geo.explain(ip).items()}}


def _fingerprint(value: str) -> str:
    try:
        return normalize_fingerprint(value)
    except ValueError as exc:
        raise OperationError(400, f"client_cert_sha256: {exc}") from None


def explain(snap: Snapshot, scopes: KeyScopes, ip: str, key: str | None = None,
            reseller: str | None = None, customer_ip: str | None = None,
            customer_id: str | None = None, model: str | None = None,
            path: str = "/v1/messages", key_id: str | None = None,
            attestation: str | None = None, method: str = "POST",
            client_cert_sha256: str | None = None) -> dict[str, Any]:
    """The decision for a request from `ip` with `key`, the key `key_id` (judged without its
    secret) or as any key of `reseller`, on a connection that presented the client
    certificate of fingerprint `client_cert_sha256` (None: none; malformed: OperationError
    400); `attestation` is an `X-Customer-Attestation` value, judged now for `method` and
    `path`."""
    cert = _fingerprint(client_cert_sha256) if client_cert_sha256 else None
    out: dict[str, Any] = {"request": {"ip": ip, "key_id": None, "reseller": reseller,
                                       "customer_ip": customer_ip, "model": model, "path": path,
                                       "method": method, "client_cert_sha256": cert}}
    policy: CompiledPolicy | None = snap.policy
    registry = snap.registry
    out["policy_version"] = policy.version if policy else None
    try:
        path, _ = normalize_target(path)  # judged as the live path is
    except ValueError as exc:
        out["decision"] = {"decision": "deny", "status": 400, "code": "invalid_path",
                           "stage": "path", "message": str(exc)}
        return out
    out["request"]["path"] = path
    loc, out["client"] = _loc(snap.geo, ip)

    def done(decision: str, status: int, code: str | None, stage: str,
             message: str = "") -> dict[str, Any]:
        out["decision"] = {"decision": decision, "status": status, "code": code,
                           "stage": stage, "message": message}
        return out

    rec: KeyRecord | None = None
    if key or key_id:
        try:
            if key_id:
                rec = key_by_id(registry, key_id, time.time())
            else:
                rec = authenticate_request(registry, key, time.time())
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
    try:
        policy = loaded(policy)
    except GatewayError as err:
        return done("error", err.status, err.code, "policy", err.message)
    res = policy.doc.resellers.get(reseller or "")
    out["identity"]["reseller_config"] = res.model_dump(mode="json") if res else None
    try:
        check_client_cert(policy, rec, cert)
    except GatewayError as err:
        return done(err.decision, err.status, err.code, "identity", err.message)
    try:
        att = attest(policy, rec, customer_id, customer_ip, attestation, method, path,
                     time.time())
    except GatewayError as err:
        return done(err.decision, err.status, err.code, "attestation", err.message)
    out["attestation"] = {"customer_id": att.customer_id, "customer_ip": att.customer_ip,
                          "attestation_sig": att.signature}
    cloc = None
    if att.customer_ip:
        cloc, out["customer"] = _loc(snap.geo, att.customer_ip)
    dec = decide(policy, scopes, rec, att, loc, cloc, model, path, trace=True)
    out["rules"] = dec.trace
    out["shadow"] = dec.shadow
    if dec.error is not None:
        refusal = dec.error
        message = f"rule {dec.rule or 'default'}" if dec.stage == "policy" else refusal.message
        return done(refusal.decision, refusal.status, refusal.code, dec.stage, message)
    out["limits"] = [{"subject": f"{s.kind}:{s.ident}", "rpm": s.rpm, "itpm": s.itpm,
                      "otpm": s.otpm, "concurrency": s.concurrency} for s in dec.subjects]
    return done("allow", 200, None, "limits",
                "allowed by policy; admission then depends on the live limit state")
