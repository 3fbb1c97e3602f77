"""Unit tests for gateway.errors: GatewayError and its constructors (rendered by
gateway.responses, tested in tests/test_responses.py)."""

from __future__ import annotations

from pathlib import Path

from gateway.errors import (
    ATTESTATION_CODES,
    CLIENT_CERTIFICATE_CODES,
    attestation_refused,
    auth_error,
    client_certificate_error,
    invalid_request,
    permission_error,
    quota_exceeded,
)

REPO = Path(__file__).resolve().parents[1]


def test_constructors_set_status_type_and_decision() -> None:
    """auth_error is a 401 deny, permission_error a 403 deny, invalid_request a 400."""
    a = auth_error("invalid_key", "bad key")
    p = permission_error("model_not_allowed", "no")
    i = invalid_request(None, "bad body", decision="error")
    assert (a.status, a.type, a.code, a.decision) == (401, "authentication_error",
                                                      "invalid_key", "deny")
    assert (p.status, p.type, p.decision) == (403, "permission_error", "deny")
    assert (i.status, i.type, i.code, i.decision) == (400, "invalid_request_error", None,
                                                      "error")
    assert str(a) == "bad key"
    assert a.key_id is None and a.reseller is None


def test_client_certificate_refusals_are_403_permission_errors() -> None:
    """Both client-certificate codes are 403 permission_error denials."""
    for code in CLIENT_CERTIFICATE_CODES:
        err = client_certificate_error(code, "no")
        assert (err.status, err.type, err.code, err.decision) == (
            403, "permission_error", code, "deny")
    assert CLIENT_CERTIFICATE_CODES == ("client_certificate_required",
                                        "client_certificate_mismatch")


def test_quota_refusals_are_429_with_retry_after() -> None:
    """quota_exceeded is a 429 rate_limit_error with the period's code and retry-after."""
    err = quota_exceeded("monthly", "key", "requests", 42)
    assert (err.status, err.type, err.code, err.decision) == (
        429, "rate_limit_error", "monthly_quota_exceeded", "rate_limited")
    assert err.headers == {"retry-after": "42"}
    assert quota_exceeded("daily", "reseller", "output_tokens", 1).code == \
        "daily_quota_exceeded"


def test_attestation_refusals_are_typed_403s_in_the_error_tables() -> None:
    """Each signed-attestation refusal is a 403 permission_error deny whose code the README's
    error table and docs/architecture.md both name."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Errors"):]
    design = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for kind, code in ATTESTATION_CODES.items():
        err = attestation_refused(kind, "m")
        assert (err.status, err.type, err.code, err.decision) == (403, "permission_error",
                                                                  code, "deny")
        assert code in table and code in design
