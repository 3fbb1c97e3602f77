"""The audit-stream part of the store contract (append_audit, list_audit), over every backend:
the embedded store, a real redis-server, a real Redis Cluster and Redis through Sentinel."""

from __future__ import annotations

import time
from typing import Any

from gateway.store import Store


def _event(action: str, t: float, **extra: Any) -> dict[str, Any]:
    return {"time": t, "actor": "cli:ops", "action": action, "target": "k1", **extra}


async def test_empty_stream_lists_nothing(store: Store) -> None:
    """A store nobody has audited lists no events."""
    assert await store.list_audit(None, 100) == []


async def test_events_round_trip_in_order(store: Store) -> None:
    """Appended events come back oldest first, every field as given (numbers, booleans)."""
    now = time.time()
    events = [_event("key_issued", now, reseller="acme"),
              _event("policy_applied", now + 0.001, version=3),
              _event("store_restored", now + 0.002, keys=2, policy_restored=True,
                     overlap_s=1.5)]
    for e in events:
        await store.append_audit(e)
    assert await store.list_audit(None, 100) == events


async def test_since_drops_older_events(store: Store) -> None:
    """list_audit(since) returns only events whose time is at or after `since`."""
    now = time.time()
    await store.append_audit(_event("key_issued", now - 7200))
    await store.append_audit(_event("key_revoked", now - 10))
    await store.append_audit(_event("key_rotated", now))
    got = await store.list_audit(now - 60, 100)
    assert [e["action"] for e in got] == ["key_revoked", "key_rotated"]
    assert await store.list_audit(now + 3600, 100) == []


async def test_limit_keeps_the_newest(store: Store) -> None:
    """With more events than `limit`, the newest `limit` are returned, oldest first."""
    now = time.time()
    for i in range(25):
        await store.append_audit(_event(f"a{i}", now + i / 1000))
    got = await store.list_audit(None, 7)
    assert [e["action"] for e in got] == [f"a{i}" for i in range(18, 25)]
    got = await store.list_audit(now + 0.0105, 100)
    assert [e["action"] for e in got] == [f"a{i}" for i in range(11, 25)]


async def test_stream_is_bounded(store: Store) -> None:
    """The stream keeps about `audit_maxlen` events: old ones are trimmed, new ones kept."""
    store.audit_maxlen = 20
    now = time.time()
    for i in range(400):
        await store.append_audit(_event(f"a{i}", now + i / 1000))
    got = await store.list_audit(None, 10_000)
    # Redis trims approximately (whole stream nodes of 100 entries): about, never under.
    assert 20 <= len(got) < 400
    assert got[-1]["action"] == "a399"
