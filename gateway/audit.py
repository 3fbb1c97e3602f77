"""The audit trail: every administrative change as an `audit` line on stdout and an event in
the store's bounded audit stream, and the parsing of `gateway audit list` / GET /admin/audit
bounds. The request log and the logging setup are gateway/request_log.py."""

from __future__ import annotations

import json
import math
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway.log import logger
from gateway.policy import canonical

if TYPE_CHECKING:
    from gateway.policy import PolicyDoc
    from gateway.store.base import Store


def log_audit(actor: str, action: str, target: str, **fields: Any) -> None:
    """Emit an `audit` event for an administrative change."""
    logger().info("audit", actor=actor, action=action, target=target, **fields)


#: GET /admin/audit and `gateway audit list`: events returned by default and at most.
AUDIT_LIST_DEFAULT = 1000
AUDIT_LIST_MAX = 10_000

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


async def record_audit(store: Store | None, actor: str, action: str, target: str,
                       **fields: Any) -> None:
    """Print the `audit` line and append the event (time, actor, action, target, `fields`) to
    the store's audit stream. The change is made already: a failed append never raises; it is
    logged as `audit_append_failed` (an error) and the audit line is printed all the same.
    `fields` never hold a secret."""
    log_audit(actor, action, target, **fields)
    if store is None:
        return
    event = {"time": time.time(), "actor": actor, "action": action, "target": target, **fields}
    try:
        await store.append_audit(event)
    except Exception as exc:  # whatever the store raised: the change stands
        logger().error("audit_append_failed", actor=actor, action=action, target=target,
                       error=type(exc).__name__)


def reseller_statuses(doc: str | None) -> dict[str, str]:
    """Reseller → status of a stored (canonical JSON) policy document."""
    if not doc:
        return {}
    resellers = json.loads(doc).get("resellers") or {}
    return {name: str(r.get("status", "active")) for name, r in resellers.items()
            if isinstance(r, dict)}


async def record_policy_applied(store: Store | None, actor: str, version: int,
                                old_doc: str | None, new_doc: str) -> None:
    """Audit a new policy version, and each reseller whose status it changed (a reseller new
    to the policy counts when it arrives suspended)."""
    await record_audit(store, actor, "policy_applied", "policy", version=version)
    before = reseller_statuses(old_doc)
    for name, status in sorted(reseller_statuses(new_doc).items()):
        previous = before.get(name)
        if status != (previous or "active"):
            await record_audit(store, actor, "reseller_status_changed", name, reseller=name,
                               status=status, previous_status=previous, version=version)


async def store_policy(store: Store, doc: PolicyDoc, actor: str,
                       expected_version: int | None) -> int:
    """Store `doc` as the live policy if the live version is still `expected_version` (None:
    whatever it is; PolicyConflict otherwise), and audit it with the resellers whose status it
    changes. The new version."""
    before = await store.get_policy()
    version = await store.put_policy(canonical(doc), actor, expected_version)
    await record_policy_applied(store, actor, version, before.doc if before else None,
                                canonical(doc))
    return version


def parse_since(value: str, now: float | None = None) -> float:
    """A `since` bound as Unix seconds: a duration back from now (`90s`, `30m`, `24h`, `7d`),
    an ISO 8601 time (UTC when it names no zone) or Unix seconds; ValueError otherwise."""
    v = value.strip()
    now = time.time() if now is None else now
    m = _DURATION.match(v)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        seconds = float(v)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"since {value[:64]!r}: not a time")
        return seconds
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"since {value[:64]!r}: use 24h, 30m, 7d, an ISO 8601 time or Unix "
                         "seconds") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_limit(value: str | None) -> int:
    """A `limit` of listed events: 1 to AUDIT_LIST_MAX (default AUDIT_LIST_DEFAULT)."""
    if value is None or value == "":
        return AUDIT_LIST_DEFAULT
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"limit must be an integer from 1 to {AUDIT_LIST_MAX}") from None
    if not 1 <= n <= AUDIT_LIST_MAX:
        raise ValueError(f"limit must be an integer from 1 to {AUDIT_LIST_MAX}")
    return n
