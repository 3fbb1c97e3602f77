"""Self-service (docs/architecture.md §12): `GET /v1/gateway/key` answers a reseller, with its
own key, what that key may do and has left. Built from the key record, the policy and the
ledger's period use of the key and its reseller; never a secret or a hash. Pure."""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.limits import pick_limits
from gateway.policy import CompiledPolicy
from gateway.quotas import effective_quotas, nested, remaining
from gateway.store.base import DIMENSIONS, KeyRecord, PeriodUse, Tally

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


def describe_key(policy: CompiledPolicy, key: KeyRecord, key_use: PeriodUse,
                 reseller_use: PeriodUse) -> dict[str, Any]:
    """The self-service answer for `key` (the binding shape of docs/architecture.md §12),
    given what the key and its reseller used (`ledger.use_of`)."""
    quotas = effective_quotas(policy, key)
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
