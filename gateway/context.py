"""The per-request context: every stage adds to it, the audit stage turns it into the log line."""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

_ID_PREFIX = "req_" + secrets.token_hex(6)
_id_counter = itertools.count(1)

#: Client strings longer than this are cut in log lines and error messages
#: (docs/architecture.md §6).
CLIENT_STRING_MAX = 256


def clip(value: str | None, limit: int = CLIENT_STRING_MAX) -> str | None:
    """A client-supplied string bounded for a log line or a message (None stays None)."""
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + f"…(+{len(value) - limit} chars)"


def new_request_id() -> str:
    """A request id unique across instances (random per-process prefix) and cheap (a counter);
    the proxy and admin listeners draw from the same sequence."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


@dataclass(slots=True)
class RequestContext:
    """Decision record of one request; field names follow the docs/architecture.md §7 log line."""

    request_id: str
    peer_ip: str
    method: str
    path: str
    started: float
    client_ip: str | None = None
    country: str | None = None
    asn: int | None = None
    anonymizer: list[str] = field(default_factory=list)
    reseller: str | None = None
    key_id: str | None = None
    customer_id: str | None = None
    customer_ip: str | None = None
    customer_country: str | None = None
    attestation_sig: str | None = None
    model: str | None = None
    decision: str = "allow"
    rule: str | None = None
    reason: str | None = None
    shadow: list[str] = field(default_factory=list)
    status: int | None = None
    upstream_status: int | None = None
    duration_ms: float | None = None
    upstream_ms: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    stream: bool = False

    def log_fields(self) -> dict[str, Any]:
        """The binding log-line fields, every one present (None when unknown)."""
        return {
            "request_id": self.request_id,
            "client_ip": self.client_ip,
            "peer_ip": self.peer_ip,
            "country": self.country,
            "asn": self.asn,
            "anonymizer": self.anonymizer,
            "reseller": self.reseller,
            "key_id": self.key_id,
            "customer_id": self.customer_id,
            "customer_ip": self.customer_ip,
            "customer_country": self.customer_country,
            "attestation_sig": self.attestation_sig,
            "model": self.model,
            "method": self.method,
            "path": self.path,
            "decision": self.decision,
            "rule": self.rule,
            "reason": self.reason,
            "shadow": self.shadow,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "duration_ms": self.duration_ms,
            "upstream_ms": self.upstream_ms,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }
