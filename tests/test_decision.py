"""Unit tests for gateway.decision: compiled key scopes, attestation, and the verdict of
`decide` on the shipped policy (rules, then scopes, then the subjects admission charges)."""

from __future__ import annotations

import pytest

from gateway.decision import _NO_PATH, KeyScopes, attest, check_client_cert, decide
from gateway.errors import GatewayError
from gateway.geo import GeoInfo
from gateway.policy import CompiledPolicy, compile_policy, validate_policy
from gateway.store.base import KeyRecord
from tests.support.gateway import DEFAULT_POLICY

US = GeoInfo("US", "US", 64500, "Example", ())
CN = GeoInfo("CN", "CN", 64501, "Example", ())
HOSTING = GeoInfo("US", "US", 64502, "Example", ("hosting",))


def _rec(**kw: object) -> KeyRecord:
    return KeyRecord(key_id="k1", reseller="r", secret_hash="h", **kw)  # type: ignore[arg-type]


def _policy() -> CompiledPolicy:
    return compile_policy(validate_policy(DEFAULT_POLICY, "test"), 1)


def test_scope_cache_compiles_countries_and_reuses_an_unchanged_record() -> None:
    """`unknown` becomes None in the country set, no countries means no restriction, and the
    same record object is served from the cache while a changed one is recompiled."""
    cache = KeyScopes()
    rec = _rec(countries=["DE", "unknown"], paths=["/v1/*"])
    models, paths, countries = cache.get(rec)
    assert countries == frozenset({"DE", None})
    assert paths.match("/v1/messages") and not paths.match("/v2/messages")
    again = cache.get(rec)
    assert again[0] is models and again[1] is paths
    changed = _rec(countries=[])
    assert cache.get(changed)[2] is None
    assert cache.get(changed)[1] is not paths


def test_a_stored_path_glob_that_no_longer_compiles_reaches_no_path() -> None:
    """A key whose stored path glob is invalid fails closed: its path scope matches nothing."""
    _, paths, _ = KeyScopes().get(_rec(paths=["/v1/**x"]))
    assert paths is _NO_PATH
    assert not paths.match("/v1/messages")


def test_a_reseller_requiring_customers_refuses_a_customer_ip_without_an_id() -> None:
    """acme requires both attestation headers: the IP alone is 403
    customer_attestation_required; direct takes it; a malformed IP is 400 for both."""
    policy = _policy()
    acme = KeyRecord(key_id="k2", reseller="acme", secret_hash="h")
    direct = KeyRecord(key_id="k3", reseller="direct", secret_hash="h")
    with pytest.raises(GatewayError) as refused:
        attest(policy, acme, None, "192.0.2.50")
    assert (refused.value.status, refused.value.code) == (403, "customer_attestation_required")
    assert attest(policy, acme, "c1", "192.0.2.50").customer_id == "c1"
    assert attest(policy, direct, None, "192.0.2.50").customer_ip == "192.0.2.50"
    for key in (acme, direct):
        with pytest.raises(GatewayError) as bad:
            attest(policy, key, "c1", "192.0.2.50:80")
        assert (bad.value.status, bad.value.code) == (400, "invalid_customer_attestation")


def test_decide_judges_rules_then_scopes_then_names_the_subjects() -> None:
    """A CN client is refused by the rule (with the rule id), an out-of-scope model by the
    key's scope, an allowed request carries its subjects, and shadow matches are kept."""
    policy, scopes = _policy(), KeyScopes()
    key = KeyRecord(key_id="k4", reseller="acme", secret_hash="h", models=["claude-*"])
    att = attest(policy, key, "c1", "192.0.2.50")
    jp = GeoInfo("JP", "JP", None, None, ())
    by_rule = decide(policy, scopes, key, att, CN, jp, "claude-3", "/v1/messages")
    assert not by_rule.allowed and by_rule.stage == "policy"
    assert by_rule.rule == "restricted-regions" and by_rule.error is not None
    assert by_rule.error.code == "unsupported_country_region_territory"
    by_scope = decide(policy, scopes, key, att, US, jp, "gpt-4o", "/v1/messages")
    assert (by_scope.stage, by_scope.error and by_scope.error.code) == (
        "scopes", "model_not_allowed")
    ok = decide(policy, scopes, key, att, HOSTING, jp, "claude-3", "/v1/messages", trace=True)
    assert ok.allowed and ok.error is None and ok.stage == "limits"
    assert ok.shadow == ["hosting-providers"]
    assert {f"{s.kind}:{s.ident}" for s in ok.subjects} >= {"key:k4", "customer:c1"}
    assert ok.trace is not None and ok.trace[0]["rule"] == "restricted-regions"


def _bound_policy() -> CompiledPolicy:
    doc = dict(DEFAULT_POLICY)
    doc["resellers"] = {**DEFAULT_POLICY.get("resellers", {}),
                        "r": {"client_cert_sha256": ["aa" * 32, "bb" * 32]}}
    return compile_policy(validate_policy(doc, "test"), 1)


def test_a_key_of_a_bound_reseller_needs_one_of_its_client_certificates() -> None:
    """A key of a reseller bound to client certificates is refused without one (403
    client_certificate_required) and with another (403 client_certificate_mismatch), and
    passes with any of its own."""
    policy, key = _bound_policy(), _rec()
    for presented, code in ((None, "client_certificate_required"),
                            ("cc" * 32, "client_certificate_mismatch")):
        with pytest.raises(GatewayError) as refused:
            check_client_cert(policy, key, presented)
        err = refused.value
        assert (err.status, err.type, err.code, err.decision) == (
            403, "permission_error", code, "deny")
    check_client_cert(policy, key, "aa" * 32)
    check_client_cert(policy, key, "bb" * 32)


def test_a_reseller_without_a_binding_needs_no_client_certificate() -> None:
    """A reseller with no `client_cert_sha256` takes its keys with or without a client
    certificate."""
    policy = _policy()
    assert policy.client_certs == {}
    check_client_cert(policy, _rec(), None)
    check_client_cert(policy, _rec(), "cc" * 32)
