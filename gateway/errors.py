"""GatewayError (the docs/architecture.md §6 error, rendered by gateway.responses), StoreError,
OperationError (an admin operation refused) and the constructors of the common refusals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class GatewayError(Exception):
    """A refusal or failure the gateway reports to the client in the provider-shaped body."""

    def __init__(
        self,
        status: int,
        type_: str,
        code: str | None,
        message: str,
        headers: Mapping[str, str] | None = None,
        decision: str = "error",
        problems: Sequence[Mapping[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.decision = decision
        # Every problem of a refusal that found several (a policy with many faults): sent as
        # `error.errors`, while `message` has one line per problem.
        self.problems = tuple(problems)
        # The known key behind a refusal (revoked, expired): logged, never sent to the client.
        self.key_id: str | None = None
        self.reseller: str | None = None


class StoreError(Exception):
    """The store (Redis) could not be reached or answered with an error."""


class OperationError(Exception):
    """An admin operation (a key or policy change, a report) refused or failed, with the HTTP
    status the admin API answers for it: 400 bad input, 404 unknown key, 409 conflict (a key
    not active, a policy version moved on), 503 store or gateway unreachable, or whatever else
    the admin API answered. The key operations, the admin API and the CLI share it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def auth_error(code: str, message: str) -> GatewayError:
    return GatewayError(401, "authentication_error", code, message, decision="deny")


def permission_error(code: str, message: str) -> GatewayError:
    return GatewayError(403, "permission_error", code, message, decision="deny")


def client_certificate_error(code: str, message: str) -> GatewayError:
    """403 for a key of a reseller bound to client certificates (docs/architecture.md §6):
    `client_certificate_required` (the connection presented none) or
    `client_certificate_mismatch` (it presented another)."""
    assert code in CLIENT_CERTIFICATE_CODES
    return permission_error(code, message)


#: The refusals of a key used without one of its reseller's client certificates.
CLIENT_CERTIFICATE_CODES = ("client_certificate_required", "client_certificate_mismatch")


def invalid_request(code: str | None, message: str, decision: str = "deny") -> GatewayError:
    return GatewayError(400, "invalid_request_error", code, message, decision=decision)


#: The quota refusals' codes, by period (docs/architecture.md §12).
QUOTA_CODES = {"daily": "daily_quota_exceeded", "monthly": "monthly_quota_exceeded"}


def quota_exceeded(period: str, subject: str, dimension: str,
                   retry_after_s: int) -> GatewayError:
    """429 `daily_quota_exceeded` / `monthly_quota_exceeded`, with `retry-after` until the
    next UTC period."""
    return GatewayError(429, "rate_limit_error", QUOTA_CODES[period],
                        f"{period} quota exceeded: {dimension} ({subject})",
                        {"retry-after": str(retry_after_s)}, decision="rate_limited")


#: The signed-attestation refusals (docs/architecture.md §5 "Signed attestation"), by kind:
#: all 403 permission_error.
ATTESTATION_CODES = {"required": "attestation_signature_required",
                     "malformed": "attestation_signature_malformed",
                     "invalid": "attestation_signature_invalid",
                     "stale": "attestation_signature_stale"}


def attestation_refused(kind: str, message: str) -> GatewayError:
    """403 `attestation_signature_<kind>`: required, malformed, invalid or stale."""
    return permission_error(ATTESTATION_CODES[kind], message)
