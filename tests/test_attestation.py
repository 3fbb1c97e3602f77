"""Unit tests for gateway.attestation (the signed `X-Customer-Attestation`) and the decision's
attestation step with a reseller that registers a key, optionally or requiring signing."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.attestation import (
    MAX_CACHED_CHARS,
    MAX_SKEW_S,
    Verifications,
    load_public_key,
    parse_header,
    sign,
    signed_message,
    verify,
)
from gateway.decision import attest
from gateway.errors import GatewayError
from gateway.policy import CompiledPolicy, compile_policy, validate_policy
from gateway.settings import ConfigError
from gateway.store.base import KeyRecord
from tests.support.gateway import DEFAULT_POLICY

NOW = 1_764_000_000
CID, CIP, PATH = "cust-7", "175.16.199.1", "/v1/messages"
PRIVATE = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def pem(private: Ed25519PrivateKey) -> str:
    return private.public_key().public_bytes(Encoding.PEM,
                                             PublicFormat.SubjectPublicKeyInfo).decode()


def _policy(**acme: Any) -> CompiledPolicy:
    doc = copy.deepcopy(DEFAULT_POLICY)
    doc["resellers"]["acme"].update(acme)
    return compile_policy(validate_policy(doc, "test"), 1)


ACME = KeyRecord(key_id="k2", reseller="acme", secret_hash="h")
DIRECT = KeyRecord(key_id="k3", reseller="direct", secret_hash="h")


def _code(policy: CompiledPolicy, key: KeyRecord, header: str | None, cid: str | None = CID,
          cip: str | None = CIP, method: str = "POST", path: str = PATH,
          now: float = NOW, cache: Verifications | None = None) -> str | None:
    try:
        attest(policy, key, cid, cip, header, method, path, now, cache)
    except GatewayError as err:
        assert err.status == 403
        return err.code
    return None


def test_the_signed_string_is_the_documented_one() -> None:
    """The message is `customer_id|customer_ip|ts|method|path` as in docs/architecture.md §13."""
    assert signed_message(CID, CIP, "1764000000", "POST", PATH) == (
        b"cust-7|175.16.199.1|1764000000|POST|/v1/messages")


def test_a_signed_header_parses_and_verifies() -> None:
    """sign() makes `v1;ts=..;sig=..` (base64url, no padding) that parses and verifies."""
    header = sign(PRIVATE, CID, CIP, "POST", PATH, NOW)
    att = parse_header(header)
    assert header.startswith(f"v1;ts={NOW};sig=") and "=" not in att.sig
    assert base64.urlsafe_b64decode(att.sig + "==") == att.signature
    verify(PRIVATE.public_key(), att, CID, CIP, "POST", PATH, NOW + MAX_SKEW_S)


@pytest.mark.parametrize("value", [
    "", "v1", "v2;ts=1;sig=" + "A" * 86, "v1;ts=abc;sig=" + "A" * 86, "v1;ts=1;sig=" + "A" * 85,
    "v1;sig=" + "A" * 86 + ";ts=1", "v1;ts=1;sig=" + "A" * 84 + "==", "v1;ts=1;sig=" + "+" * 86,
])
def test_a_malformed_header_is_a_typed_403(value: str) -> None:
    """Anything but `v1;ts=<digits>;sig=<86 base64url chars>` is 403
    attestation_signature_malformed."""
    with pytest.raises(GatewayError) as refused:
        parse_header(value)
    assert (refused.value.status, refused.value.code) == (403,
                                                          "attestation_signature_malformed")


@pytest.mark.parametrize(("change", "code"), [
    ({"cid": "cust-8"}, "attestation_signature_invalid"),
    ({"cip": "175.16.199.2"}, "attestation_signature_invalid"),
    ({"method": "GET"}, "attestation_signature_invalid"),
    ({"path": "/v1/complete"}, "attestation_signature_invalid"),
    ({"now": NOW + MAX_SKEW_S + 1}, "attestation_signature_stale"),
    ({"now": NOW - MAX_SKEW_S - 1}, "attestation_signature_stale"),
])
def test_a_signature_replayed_elsewhere_or_late_is_refused(change: dict[str, Any],
                                                           code: str) -> None:
    """A valid signature used for another customer, address, method or path is invalid; one
    more than 300 s away from the clock is stale."""
    policy = _policy(attestation_key=pem(PRIVATE), require_signed_attestation=True)
    header = sign(PRIVATE, CID, CIP, "POST", PATH, NOW)
    assert _code(policy, ACME, header) is None
    assert _code(policy, ACME, header, **change) == code


def test_required_signing_refuses_unsigned_and_forged_and_keeps_the_signature() -> None:
    """With require_signed_attestation an unsigned claim is attestation_signature_required, a
    claim signed by another key is invalid, and a valid one returns its signature."""
    policy = _policy(attestation_key=pem(PRIVATE), require_signed_attestation=True)
    assert _code(policy, ACME, None) == "attestation_signature_required"
    assert _code(policy, ACME, sign(OTHER, CID, CIP, "POST", PATH, NOW)) == (
        "attestation_signature_invalid")
    assert _code(policy, ACME, sign(PRIVATE, CID, CIP, "POST", PATH, NOW), cid=None) == (
        "customer_attestation_required")
    header = sign(PRIVATE, CID, CIP, "POST", PATH, NOW)
    att = attest(policy, ACME, CID, CIP, header, "POST", PATH, NOW)
    assert att.signature == parse_header(header).sig


def test_optional_signing_still_verifies_a_present_signature() -> None:
    """With a key but no requirement, unsigned passes, a forged signature is refused; a
    reseller without a key cannot have a signature verified, so one is refused too."""
    policy = _policy(attestation_key=pem(PRIVATE))
    assert _code(policy, ACME, None) is None
    assert attest(policy, ACME, CID, CIP, None, "POST", PATH, NOW).signature is None
    assert _code(policy, ACME, sign(OTHER, CID, CIP, "POST", PATH, NOW)) == (
        "attestation_signature_invalid")
    assert _code(policy, DIRECT, sign(PRIVATE, CID, CIP, "POST", PATH, NOW)) == (
        "attestation_signature_invalid")


def test_keys_are_loaded_once_per_policy_version() -> None:
    """The compiled policy holds the loaded public key; attest uses it, not the PEM text."""
    policy = _policy(attestation_key=pem(PRIVATE))
    key = policy.attestation_keys["acme"]
    assert key.public_bytes_raw() == PRIVATE.public_key().public_bytes_raw()
    assert "direct" not in policy.attestation_keys


def test_a_bad_key_or_a_requirement_without_one_is_a_config_error_naming_the_field() -> None:
    """A key that is not PEM, or not Ed25519, or signing required without a key, is a
    ConfigError naming resellers.<name>.<field>."""
    ec = generate_private_key(SECP256R1()).public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    for fields, where in (({"attestation_key": "not a key"}, "resellers.acme.attestation_key"),
                          ({"attestation_key": ec}, "resellers.acme.attestation_key"),
                          ({"require_signed_attestation": True},
                           "resellers.acme.require_signed_attestation")):
        doc = copy.deepcopy(DEFAULT_POLICY)
        doc["resellers"]["acme"].update(fields)
        with pytest.raises(ConfigError) as bad:
            validate_policy(doc, "p.yaml")
        assert where in str(bad.value)
    with pytest.raises(ValueError, match="Ed25519"):
        load_public_key(ec)


# --- the verification cache ------------------------------------------------------------------

def test_a_cached_success_is_refused_once_stale() -> None:
    """Freshness is judged on every request: a header verified and cached at NOW is stale more
    than 300 s later (or earlier), and still good at NOW from the same cache."""
    policy = _policy(attestation_key=pem(PRIVATE), require_signed_attestation=True)
    cache = Verifications()
    header = sign(PRIVATE, CID, CIP, "POST", PATH, NOW)
    assert _code(policy, ACME, header, cache=cache) is None
    assert len(cache) == 1
    for late in (NOW + MAX_SKEW_S + 1, NOW - MAX_SKEW_S - 1, NOW + 10 * MAX_SKEW_S):
        assert _code(policy, ACME, header, now=late, cache=cache) == (
            "attestation_signature_stale")
    assert _code(policy, ACME, header, now=NOW + MAX_SKEW_S, cache=cache) is None
    assert len(cache) == 1


def test_a_rotated_key_never_reuses_a_cached_result() -> None:
    """A success cached under acme's old key is refused once a new policy rotates the key,
    and a refusal cached under the old key does not refuse what the new key signed: results
    are kept by the key's bytes, across policies sharing one cache."""
    old = _policy(attestation_key=pem(PRIVATE), require_signed_attestation=True)
    new = _policy(attestation_key=pem(OTHER), require_signed_attestation=True)
    cache = Verifications()
    by_old, by_new = (sign(k, CID, CIP, "POST", PATH, NOW) for k in (PRIVATE, OTHER))
    assert _code(old, ACME, by_old, cache=cache) is None
    assert _code(old, ACME, by_new, cache=cache) == "attestation_signature_invalid"
    assert _code(new, ACME, by_old, cache=cache) == "attestation_signature_invalid"
    assert _code(new, ACME, by_new, cache=cache) is None
    assert len(cache) == 4


@pytest.mark.parametrize("change", [
    {"cid": "cust-8"}, {"cip": "175.16.199.2"}, {"method": "GET"}, {"path": "/v1/complete"},
    {"cid": "cust-7 "},  # the signed string takes the header value as sent
])
def test_a_cached_signature_for_another_claim_is_refused(change: dict[str, Any]) -> None:
    """With the valid claim cached, the same signature for another customer, address, method
    or path is refused, again when repeated, and the valid claim still passes."""
    policy = _policy(attestation_key=pem(PRIVATE), require_signed_attestation=True)
    cache = Verifications()
    header = sign(PRIVATE, CID, CIP, "POST", PATH, NOW)
    assert _code(policy, ACME, header, cache=cache) is None
    for _ in range(2):
        assert _code(policy, ACME, header, cache=cache, **change) == (
            "attestation_signature_invalid")
    assert _code(policy, ACME, header, cache=cache) is None
    assert len(cache) == 2


def test_a_refusal_is_cached_and_answered_as_without_the_cache() -> None:
    """A forged signature is verified once and kept, and every refusal through the cache, first
    or repeated, is the error judged without it (status, code and message); a malformed header
    and a reseller without a key are refused before the cache and leave nothing in it."""
    policy = _policy(attestation_key=pem(PRIVATE))
    cache = Verifications()
    forged = sign(OTHER, CID, CIP, "POST", PATH, NOW)
    stale = sign(PRIVATE, CID, CIP, "POST", PATH, NOW - MAX_SKEW_S - 1)
    cases = [(ACME, forged, CID), (ACME, stale, CID), (ACME, "v1;ts=1;sig=short", CID),
             (ACME, forged, None), (DIRECT, forged, CID)]
    for key, header, cid in cases * 3:
        errors = []
        for through in (None, cache):
            with pytest.raises(GatewayError) as refused:
                attest(policy, key, cid, CIP, header, "POST", PATH, NOW, through)
            errors.append(refused.value)
        assert [(e.status, e.code, e.message) for e in errors] == [
            (errors[0].status, errors[0].code, errors[0].message)] * 2
        assert len(cache) <= 2
    assert len(cache) == 2  # the forged and the stale claim


def test_the_cache_stays_bounded() -> None:
    """Past its size each new claim evicts the least recently used one, so the cache never
    holds more; a claim longer than MAX_CACHED_CHARS is judged alike but never kept."""
    policy = _policy(attestation_key=pem(PRIVATE), require_signed_attestation=True)
    cache = Verifications(8)
    for i in range(40):
        header = sign(PRIVATE, f"cust-{i}", CIP, "POST", PATH, NOW)
        assert _code(policy, ACME, header, cid=f"cust-{i}", cache=cache) is None
        assert len(cache) == min(i + 1, 8)
    long_path = "/v1/" + "a" * MAX_CACHED_CHARS
    good = sign(PRIVATE, CID, CIP, "POST", long_path, NOW)
    assert _code(policy, ACME, good, path=long_path, cache=cache) is None
    assert _code(policy, ACME, good, path=long_path + "b", cache=cache) == (
        "attestation_signature_invalid")
    assert _code(policy, ACME, good, path=long_path, now=NOW + MAX_SKEW_S + 1, cache=cache) == (
        "attestation_signature_stale")
    assert len(cache) == 8
