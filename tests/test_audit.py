"""Unit tests for gateway.audit: `since` and `limit` parsing, reseller status changes in the
audit trail, and the audit event appended to the store."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.audit import (
    AUDIT_LIST_DEFAULT,
    AUDIT_LIST_MAX,
    parse_limit,
    parse_since,
    record_audit,
    record_policy_applied,
    reseller_statuses,
)
from gateway.store.memory import MemoryStore

NOW = 1_700_000_000.0


@pytest.mark.parametrize(("value", "expected"), [
    ("90s", NOW - 90), ("30m", NOW - 1800), ("24h", NOW - 86400), ("7d", NOW - 7 * 86400),
    ("1.5h", NOW - 5400), (" 10s ", NOW - 10), ("1699999000", 1_699_999_000.0),
    ("2023-11-14T22:13:20Z", NOW), ("2023-11-14T22:13:20", NOW),
    ("2023-11-14T23:13:20+01:00", NOW),
])
def test_parse_since_accepts_durations_iso_times_and_unix_seconds(value: str,
                                                                  expected: float) -> None:
    """Durations count back from now; ISO times without a zone are UTC; numbers are Unix."""
    assert parse_since(value, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["yesterday", "10w", "nan", "inf", "", "-"])
def test_parse_since_refuses_anything_else(value: str) -> None:
    """Anything else is a ValueError naming the accepted forms or saying it is not a time."""
    with pytest.raises(ValueError, match="since"):
        parse_since(value, now=NOW)


def test_parse_limit_bounds() -> None:
    """limit defaults when absent, and must be an integer from 1 to AUDIT_LIST_MAX."""
    assert parse_limit(None) == parse_limit("") == AUDIT_LIST_DEFAULT
    assert parse_limit("1") == 1 and parse_limit(str(AUDIT_LIST_MAX)) == AUDIT_LIST_MAX
    for bad in ("0", str(AUDIT_LIST_MAX + 1), "ten", "1.5"):
        with pytest.raises(ValueError, match="limit must be an integer"):
            parse_limit(bad)


def test_reseller_statuses_default_to_active() -> None:
    """Each reseller's status, active when unset; no document means no resellers."""
    doc = json.dumps({"resellers": {"a": {}, "b": {"status": "suspended"}, "c": "odd"}})
    assert reseller_statuses(doc) == {"a": "active", "b": "suspended"}
    assert reseller_statuses(None) == {} and reseller_statuses("{}") == {}


async def test_record_audit_appends_the_event_to_the_store() -> None:
    """The event holds time, actor, action, target and the fields given."""
    store = MemoryStore()
    await record_audit(store, "alice", "key_issued", "k1", reseller="acme")
    [event] = await store.list_audit(None, 10)
    assert {k: event[k] for k in ("actor", "action", "target", "reseller")} == {
        "actor": "alice", "action": "key_issued", "target": "k1", "reseller": "acme"}
    assert abs(event["time"] - datetime.now(UTC).timestamp()) < 3600


async def test_policy_applied_records_each_reseller_whose_status_changed() -> None:
    """A new policy version is audited, and so is each reseller whose status changed (a new
    reseller only when it arrives suspended)."""
    store = MemoryStore()
    old = json.dumps({"resellers": {"a": {}, "b": {"status": "suspended"}}})
    new = json.dumps({"resellers": {"a": {"status": "suspended"}, "b": {},
                                    "c": {}, "d": {"status": "suspended"}}})
    await record_policy_applied(store, "alice", 2, old, new)
    events: list[dict[str, Any]] = await store.list_audit(None, 10)
    assert events[0]["action"] == "policy_applied" and events[0]["version"] == 2
    changed = {(e["target"], e["status"], e["previous_status"]) for e in events[1:]}
    assert changed == {("a", "suspended", "active"), ("b", "active", "suspended"),
                       ("d", "suspended", None)}
