"""gateway.store.memory: the embedded store settles in process, keeps its records, and
limits through the limiter it is given."""

from __future__ import annotations

from gateway.store import open_store
from gateway.store.base import AdmitRequest, KeyRecord, Settlement, Subject
from gateway.store.gcra import Limiter
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


async def test_admissions_go_to_the_injected_limiter() -> None:
    """The store admits, cancels, settles and renews through the limiter it was given: its
    buckets and leases are the store's."""
    limiter = Limiter()
    store = MemoryStore(limiter=limiter)
    assert store.limiter is limiter
    s = Subject("key", "k1", "r", rpm=1, concurrency=1)
    req = AdmitRequest((s,), "l1", 60_000, 0, 0)
    assert (await store.admit(req)).ok
    assert limiter.leases and limiter.tat  # the lease and the bucket live in that limiter
    assert not limiter.admit(AdmitRequest((s,), "l2", 60_000, 0, 0)).ok
    await store.cancel(req)
    assert limiter.admit(AdmitRequest((s,), "l3", 60_000, 0, 0)).ok


async def test_the_factory_gives_each_embedded_store_its_own_limiter() -> None:
    """`open_store("memory://")` builds a limiter per store: one store's buckets never fill
    another's."""
    first, second = open_store("memory://"), open_store("memory://")
    assert isinstance(first, MemoryStore) and isinstance(second, MemoryStore)
    assert first.limiter is not second.limiter
    s = Subject("key", "k1", "r", rpm=1)
    assert (await first.admit(AdmitRequest((s,), "l1", 60_000, 0, 0))).ok
    assert (await second.admit(AdmitRequest((s,), "l1", 60_000, 0, 0))).ok
