"""Self-service (docs/architecture.md §12): `GET /v1/gateway/key` answers a reseller, with its
own key, what that key may do and has left. Built from the key record, the policy and the
ledger's cached period use; never a secret or a hash. Pure apart from reading the ledger."""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.ledger import Ledger, key_subject, reseller_subject
from gateway.limits import pick_limits
from gateway.policy import CompiledPolicy
from gateway.quotas import effective_quotas, nested, remaining
from gateway.store.base import DIMENSIONS, KeyRecord, Tally

#: the path served on the proxy listener (GET only)
SELF_SERVICE_PATH = "/v1/gateway/key"
#: the `reason` of its request log line
SELF_SERVICE_REASON = "self_service"


def key_limits(policy: CompiledPolicy, key: KeyRecord) -> dict[str, int | None]:
    """The key's effective per-minute limits: its own, else the policy's `limits.key`; None
    where neither sets one."""
    picked = pick_limits(key.limits, policy.doc.limits.key)
    return {dim: picked.get(dim) for dim in DIMENSIONS}


def _tally(t: Tally) -> dict[str, int]:
    return dataclasses.asdict(t)


def describe_key(policy: CompiledPolicy, key: KeyRecord, ledger: Ledger,
                 now: float) -> dict[str, Any]:
    """The self-service answer for `key` (the binding shape of docs/architecture.md §12)."""
    quotas = effective_quotas(policy, key)
    key_use = ledger.used(key_subject(key.key_id), now)
    reseller_use = ledger.used(reseller_subject(key.reseller), now)
    return {
        "key_id": key.key_id,
        "reseller": key.reseller,
        "status": key.status,
        "expires_at": key.expires_at,
        "scopes": {"models": list(key.models), "paths": list(key.paths),
                   "countries": list(key.countries)},
        "limits": key_limits(policy, key),
        "remaining": remaining(quotas, key_use, reseller_use),
        "quotas": {"key": nested(quotas.key), "reseller": nested(quotas.reseller)},
        "usage": {"today": _tally(key_use.day), "month": _tally(key_use.month)},
    }
