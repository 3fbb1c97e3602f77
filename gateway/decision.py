"""The decision, written once: authenticate → attestation → rules → scopes → subjects.

Pure: no I/O. The caller extracts the inputs first (the presented key, the attestation header
values, the model from the body, the geo records, the normalised path) and gets back the same
verdict whether it is the live pipeline or `explain` (CLI and admin). The steps are split where
the live path reads the body: `authenticate_request`, `check_client_cert` (the connection's
client certificate is an input, as its fingerprint) and `attest` run on the headers alone,
`decide` once the model is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.attestation import ATTESTATION_HEADER, Verifications
from gateway.attestation import parse_header as parse_signed_attestation
from gateway.context import clip
from gateway.errors import (
    GatewayError,
    attestation_refused,
    auth_error,
    client_certificate_error,
    permission_error,
)
from gateway.geo import GeoInfo
from gateway.identity import (
    Attestation,
    KeyRegistry,
    check_usable,
    parse_attestation,
    require_customer,
)
from gateway.limits import subjects_for
from gateway.lru import BoundedLRU
from gateway.policy import (
    CompiledPolicy,
    RuleFacts,
    country_allowed,
    evaluate_rules,
    glob_list,
    path_glob_list,
)
from gateway.store.base import KeyRecord, Subject


class _NoPath:
    """The path scope of a key whose stored globs are invalid: matches nothing."""

    @staticmethod
    def match(path: str) -> bool:
        return False


_NO_PATH = _NoPath()


class KeyScopes:
    """Compiled key scopes, recompiled only when the key record changes."""

    def __init__(self) -> None:
        self._c: BoundedLRU[str, tuple[KeyRecord, Any, Any, frozenset[str | None] | None]] = (
            BoundedLRU(100_000))

    def get(self, rec: KeyRecord) -> tuple[Any, Any, frozenset[str | None] | None]:
        hit = self._c.get(rec.key_id)
        if hit is not None and hit[0] is rec:
            return hit[1], hit[2], hit[3]
        countries = None if not rec.countries else frozenset(
            None if c == "unknown" else c for c in rec.countries)
        try:
            paths: Any = path_glob_list(rec.paths)
        except ValueError:
            # A key stored before path globs were validated, with one that no longer
            # compiles: it reaches no path (fail closed) until it is reissued.
            paths = _NO_PATH
        entry = (rec, glob_list(rec.models), paths, countries)
        self._c.put(rec.key_id, entry)
        return entry[1], entry[2], entry[3]


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one request once its model is known."""

    allowed: bool
    stage: str  # policy | scopes (refused) or limits (allowed: admission comes next)
    error: GatewayError | None  # the refusal, rendered as the live path renders it
    rule: str | None
    reason: str | None
    shadow: list[str]
    key: KeyRecord
    attestation: Attestation
    subjects: tuple[Subject, ...]
    trace: list[dict[str, Any]] | None = None


def authenticate_request(registry: KeyRegistry, presented: str | None, now: float) -> KeyRecord:
    """The key record of the presented key, or the 401 GatewayError."""
    return registry.authenticate(presented, now)


def key_by_id(registry: KeyRegistry, key_id: str, now: float) -> KeyRecord:
    """The record of `key_id` as authentication would find it, without its secret."""
    rec = registry.keys.get(key_id)
    if rec is None:
        raise auth_error("invalid_api_key", f"no key {key_id[:64]}")
    check_usable(rec, now)
    return rec


def loaded(policy: CompiledPolicy | None) -> CompiledPolicy:
    """The live policy, or the 503 while none is loaded."""
    if policy is None:
        raise GatewayError(503, "overloaded_error", "policy_unavailable", "no policy loaded yet")
    return policy


def check_client_cert(policy: CompiledPolicy, key: KeyRecord, cert_sha256: str | None) -> None:
    """A key of a reseller bound to client certificates (`client_cert_sha256`) is accepted only
    on a connection that presented one of them: 403 `client_certificate_required` without a
    client certificate, `client_certificate_mismatch` with another. `cert_sha256` is the
    fingerprint of the connection's verified client certificate (None: none presented)."""
    bound = policy.client_certs.get(key.reseller)
    if bound is None:
        return
    if cert_sha256 is None:
        raise client_certificate_error(
            "client_certificate_required",
            f"keys of reseller {key.reseller!r} need a client certificate bound to it")
    if cert_sha256 not in bound:
        raise client_certificate_error(
            "client_certificate_mismatch",
            f"the client certificate is not one bound to reseller {key.reseller!r}")


def attest(policy: CompiledPolicy, key: KeyRecord, customer_id: str | None,
           customer_ip: str | None, signature: str | None = None, method: str = "POST",
           path: str = "/v1/messages", now: float = 0.0,
           verifications: Verifications | None = None) -> Attestation:
    """The customer attestation from its header values: 400 when malformed, 403 when the
    key's reseller requires it (both X-Customer-Id and X-Customer-IP) and it is incomplete;
    then its signature (`X-Customer-Attestation`, docs/architecture.md §13), verified whenever
    present and required where the reseller says so: 403 `attestation_signature_*` otherwise.
    `method` and `path` (normalised) are the request's, `now` the time it is judged at;
    `verifications` the cache of signature checks (None: verified afresh, nothing kept)."""
    att = parse_attestation(customer_id, customer_ip)
    reseller = policy.doc.resellers.get(key.reseller)
    required = reseller is not None and reseller.require_signed_attestation
    if reseller is not None and (reseller.require_customer or required):
        require_customer(att)
    if signature is None:
        if required:
            raise attestation_refused("required",
                                      f"this reseller must sign the customer attestation "
                                      f"({ATTESTATION_HEADER})")
        return att
    pub = policy.attestation_keys.get(key.reseller)
    if pub is None or customer_id is None or customer_ip is None:
        parse_signed_attestation(signature)  # a malformed header is refused as such first
        if pub is None:
            raise attestation_refused("invalid",
                                      f"reseller {key.reseller!r} has no attestation key to "
                                      f"verify {ATTESTATION_HEADER} with")
        raise attestation_refused("invalid",
                                  f"{ATTESTATION_HEADER} needs X-Customer-Id and X-Customer-IP")
    if verifications is None:
        verifications = Verifications(0)
    sig = verifications.check(key.reseller, pub, policy.attestation_key_bytes[key.reseller],
                              signature, customer_id, customer_ip, method, path, now)
    return Attestation(att.customer_id, att.customer_ip, sig)


def check_scopes(policy: CompiledPolicy, scopes: KeyScopes, key: KeyRecord, client: GeoInfo,
                 customer: GeoInfo | None, model: str | None, path: str) -> None:
    """Reseller status and countries, then the key's model, path and country scopes."""
    r = policy.doc.resellers.get(key.reseller)
    if r is None:
        raise permission_error("reseller_suspended",
                               f"reseller {key.reseller!r} is not in the live policy")
    if r.status == "suspended":
        raise permission_error("reseller_suspended", f"reseller {key.reseller!r} is suspended")
    judged = customer.country if customer is not None else client.country
    whose = "customer" if customer is not None else "client"
    if not country_allowed(policy.reseller_countries.get(key.reseller), judged):
        raise permission_error("country_not_allowed",
                               f"{whose} country {judged or 'unknown'} is outside the "
                               "reseller's allowed countries")
    models, paths, countries = scopes.get(key)
    if models is not None and model is not None and not models.match(model):
        raise permission_error("model_not_allowed", f"model {clip(model)!r} is not in this "
                               "key's scope")
    clipped = clip(path) or ""
    if paths is not None and not paths.match(clipped):
        raise permission_error("path_not_allowed", f"path {clip(clipped)!r} is not in "
                               "this key's scope")
    if not country_allowed(countries, judged):
        raise permission_error("country_not_allowed",
                               f"{whose} country {judged or 'unknown'} is outside this "
                               "key's allowed countries")


def decide(policy: CompiledPolicy, scopes: KeyScopes, key: KeyRecord, att: Attestation,
           client: GeoInfo, customer: GeoInfo | None, model: str | None, path: str,
           trace: bool = False) -> Decision:
    """Rules, then scopes, then the subjects admission will charge. `customer` is the geo
    record of the attested customer IP (None without one); `path` is normalised."""
    dec = evaluate_rules(policy, RuleFacts(client, customer, key.reseller, model, path), trace)
    if dec.action == "deny":
        return Decision(False, "policy", permission_error(
            dec.reason or "request_not_allowed",
            f"request denied by policy rule {dec.rule or 'default'}"), dec.rule, dec.reason,
            dec.shadow, key, att, (), dec.trace)
    try:
        check_scopes(policy, scopes, key, client, customer, model, path)
    except GatewayError as err:
        return Decision(False, "scopes", err, dec.rule, None, dec.shadow, key, att, (),
                        dec.trace)
    return Decision(True, "limits", None, dec.rule, None, dec.shadow, key, att,
                    subjects_for(policy, key, att.customer_id), dec.trace)
