"""gateway.store.memory: the embedded store settles in process and keeps its records."""

from __future__ import annotations

from gateway.store.base import AdmitRequest, KeyRecord, Settlement, Subject
from gateway.store.memory import MemoryStore

SUBJECT = Subject("key", "k1", "r", otpm=1000)


async def test_settles_in_process_at_once() -> None:
    """The embedded store declares itself in process and applies a settlement at once: the
    refunded output tokens are available to the very next admission."""
    store = MemoryStore()
    assert store.in_process is True
    first = await store.admit(AdmitRequest((SUBJECT,), "l1", 60_000, 0, 900))
    assert first.ok
    assert not (await store.admit(AdmitRequest((SUBJECT,), "l2", 60_000, 0, 900))).ok
    assert store.settle_now(Settlement((SUBJECT,), "l1", 0, 900, 0, 100)) is True
    assert (await store.admit(AdmitRequest((SUBJECT,), "l3", 60_000, 0, 800))).ok


async def test_keys_are_stored_and_listed() -> None:
    """A key put is got back and listed; an unknown one is None."""
    store = MemoryStore()
    await store.put_key(KeyRecord("k1", "acme", "hash"))
    got = await store.get_key("k1")
    assert got is not None and got.reseller == "acme"
    assert [r.key_id for r in await store.list_keys()] == ["k1"]
    assert await store.get_key("nope") is None
