"""The store contract (gateway/store/base.py), one suite over every backend: the embedded
store, a real redis-server, a real three-master Redis Cluster and a real redis-server
reached through a real Redis Sentinel."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from gateway.store import Store
from gateway.store.base import (
    MAX_DEBT_WINDOWS,
    AdmitRequest,
    AdmitResult,
    KeyRecord,
    PolicyConflict,
    Settlement,
    Subject,
)
from tests.support.gateway import poll


def _lease() -> str:
    return uuid.uuid4().hex[:16]


# Buckets refill while a test runs: on a loaded machine a few hundred milliseconds pass between
# calls, so token counts are checked up to this many seconds of refill (always far less than
# what a wrongly consumed or wrongly refunded request would change).
REFILL_S = 2.0


def _reseller() -> str:
    return "r" + uuid.uuid4().hex[:8]


def _req(*subjects: Subject, inp: int = 0, out: int = 0, ttl_ms: int = 60_000,
         lease: str | None = None) -> AdmitRequest:
    return AdmitRequest(subjects, lease or _lease(), ttl_ms, inp, out)


def _settle(req: AdmitRequest, inp: int | None = None, out: int | None = None) -> Settlement:
    """Settle `req` on the given actual usage (default: what it reserved)."""
    return Settlement(req.subjects, req.lease_id, req.input_tokens, req.output_tokens,
                      req.input_tokens if inp is None else inp,
                      req.output_tokens if out is None else out)


def _rec(key_id: str, reseller: str = "acme", **kw: Any) -> KeyRecord:
    return KeyRecord(key_id=key_id, reseller=reseller, secret_hash="h" * 64, **kw)


# --- keys -------------------------------------------------------------------------------------


async def test_keys_put_get_list_and_epoch(store: Store) -> None:
    """put_key stores the record as given, bumps the keys epoch it returns, and lists it."""
    assert await store.get_key("k0") is None
    epoch0, _ = await store.versions()
    rec = _rec("k1", name="one", models=["claude-*"], countries=["US"],
               limits={"rpm": 5, "concurrency": 2}, expires_at=1e10, created_at=1.5)
    e1 = await store.put_key(rec)
    assert e1 == epoch0 + 1
    assert (await store.versions())[0] == e1
    got = await store.get_key("k1")
    assert got == rec and got is not rec
    e2 = await store.put_key(_rec("k2", reseller="beta"))
    assert e2 == e1 + 1 and (await store.versions())[0] == e2
    changed = _rec("k1", status="revoked")
    assert await store.put_key(changed) == e2 + 1
    assert await store.get_key("k1") == changed
    listed = {r.key_id: r for r in await store.list_keys()}
    assert listed == {"k1": changed, "k2": _rec("k2", reseller="beta")}


async def test_keys_last_used(store: Store) -> None:
    """touch_keys records last-used times; last_used answers only for known ids."""
    assert await store.last_used([]) == {}
    assert await store.last_used(["a"]) == {}
    await store.touch_keys({"a": 100.25, "b": 200.5})
    await store.touch_keys({"a": 300.125})
    await store.touch_keys({})
    assert await store.last_used(["a", "b", "c"]) == {"a": 300.125, "b": 200.5}


# --- policy -----------------------------------------------------------------------------------


async def test_policy_versions_and_conflict(store: Store) -> None:
    """put_policy returns increasing versions; a stale expected_version raises PolicyConflict
    (a ValueError) naming the live and the expected version alike on every store, and changes
    nothing; get_policy returns what was stored."""
    assert await store.get_policy() is None
    assert (await store.versions())[1] == 0
    doc1 = json.dumps({"version": 1, "rules": []})
    assert await store.put_policy(doc1, "alice", expected_version=0) == 1
    doc2 = json.dumps({"version": 1, "rules": [{"id": "x"}]})
    assert await store.put_policy(doc2, "bob") == 2
    for stale in (1, 0):
        with pytest.raises(PolicyConflict) as err:
            await store.put_policy(json.dumps({"v": 3}), "carol", expected_version=stale)
        assert (err.value.live, err.value.expected) == (2, stale)
        assert str(err.value) == f"policy version is 2, expected {stale}"
    got = await store.get_policy()
    assert got is not None and (got.version, got.doc, got.actor) == (2, doc2, "bob")
    assert await store.put_policy(doc1, "dave", expected_version=2) == 3
    got = await store.get_policy()
    assert got is not None and (got.version, got.doc, got.actor) == (3, doc1, "dave")
    assert got.applied_at > 0
    assert (await store.versions())[1] == 3


# --- events -----------------------------------------------------------------------------------


async def test_events_key_and_policy(store: Store) -> None:
    """A subscriber receives a `key` event per put_key and a `policy` event per put_policy."""
    seen: list[dict[str, Any]] = []

    async def handler(event: dict[str, Any]) -> None:
        seen.append(event)

    await store.subscribe(handler)

    # Pub/sub delivers only to a live subscription: publish a probe until one arrives.
    async def probe_delivered() -> bool:
        await store.put_key(_rec("probe"))
        return await _wait_for(lambda: any(e.get("key_id") == "probe" for e in seen), 0.5)

    await poll(probe_delivered, timeout=15.0)
    seen.clear()
    epoch = await store.put_key(_rec("k-evt"))
    version = await store.put_policy(json.dumps({"version": 1}), "tester")
    await poll(lambda: any(e.get("kind") == "policy" for e in seen), timeout=10.0)
    await poll(lambda: any(e.get("kind") == "key" for e in seen), timeout=10.0)
    assert {"kind": "key", "key_id": "k-evt", "epoch": epoch} in seen
    assert {"kind": "policy", "version": version} in seen


async def _wait_for(cond: Any, timeout: float) -> bool:
    try:
        await poll(cond, timeout=timeout)
    except AssertionError:
        return False
    return True


# --- admission: GCRA request buckets ----------------------------------------------------------


@pytest.mark.parametrize("limit", [20, 7])
async def test_gcra_exact_under_concurrency(store: Store, limit: int) -> None:
    """Of many concurrent requests against rpm=L exactly L are admitted, also for a limit
    that does not divide the minute evenly; the refused ones say rpm and when to retry."""
    subject = Subject("key", "k1", _reseller(), rpm=limit)
    results: list[AdmitResult] = await asyncio.gather(
        *(store.admit(_req(subject)) for _ in range(50)))
    admitted = [r for r in results if r.ok]
    refused = [r for r in results if not r.ok]
    assert len(admitted) == limit
    assert sorted(r.buckets["rpm"].remaining for r in admitted) == list(range(limit))
    assert all(r.buckets["rpm"].limit == limit for r in admitted)
    for r in refused:
        assert r.failed_dimension == "rpm" and r.failed_subject == "key:k1"
        # The refused request would pass once one request's worth has refilled.
        assert 0.5 * 60_000 / limit < r.retry_after_ms <= 60_000 / limit + 1
        assert r.buckets["rpm"].remaining == 0


async def test_gcra_remaining_counts_down(store: Store) -> None:
    """Sequential admissions report limit - n remaining and a reset within the window."""
    subject = Subject("key", "k1", _reseller(), rpm=5)
    for n in range(1, 6):
        res = await store.admit(_req(subject))
        assert res.ok
        b = res.buckets["rpm"]
        assert (b.limit, b.remaining) == (5, 5 - n)
        assert 0 < b.reset_ms <= 60_000
    res = await store.admit(_req(subject))
    assert not res.ok and res.failed_dimension == "rpm"
    assert 11_000 < res.retry_after_ms <= 12_001


async def test_unlimited_dimensions_are_not_reported(store: Store) -> None:
    """A dimension no subject limits is not limited and not reported."""
    subject = Subject("key", "k1", _reseller(), rpm=3)
    res = await store.admit(_req(subject, inp=10**9, out=10**9))
    assert res.ok and set(res.buckets) == {"rpm"}


async def test_refusal_consumes_nothing(store: Store) -> None:
    """A request refused on otpm leaves the rpm (and token) buckets as they were."""
    subject = Subject("key", "k1", _reseller(), rpm=5, otpm=100)
    first = await store.admit(_req(subject, out=80))
    assert first.ok and first.buckets["rpm"].remaining == 4
    assert first.buckets["otpm"].remaining == 20
    for _ in range(3):
        refused = await store.admit(_req(subject, out=50))
        assert not refused.ok and refused.failed_dimension == "otpm"
        assert refused.failed_subject == "key:k1"
        assert refused.retry_after_ms > 0
    cheap = await store.admit(_req(subject, out=10))
    assert cheap.ok
    assert cheap.buckets["rpm"].remaining == 3
    assert 10 <= cheap.buckets["otpm"].remaining <= 10 + REFILL_S * 100 / 60


# --- admission: token buckets and settlement ---------------------------------------------------


async def test_itpm_refund_lets_the_next_request_in(store: Store) -> None:
    """An input estimate is reserved; settling on a smaller actual refunds the difference."""
    subject = Subject("key", "k1", _reseller(), itpm=1000)
    big = _req(subject, inp=1000)
    assert (await store.admit(big)).ok
    blocked = await store.admit(_req(subject, inp=100))
    assert not blocked.ok and blocked.failed_dimension == "itpm"
    assert 0.5 * 100 * 60 < blocked.retry_after_ms <= 100 * 60 + 1
    await store.settle(_settle(big, inp=200))
    after = await store.admit(_req(subject, inp=100))
    assert after.ok
    assert 700 <= after.buckets["itpm"].remaining <= 702 + REFILL_S * 1000 / 60


async def test_otpm_debit_blocks_the_next_request(store: Store) -> None:
    """Settling on more output than reserved debits the bucket: the next request waits."""
    subject = Subject("key", "k1", _reseller(), otpm=1000)
    small = _req(subject, out=100)
    first = await store.admit(small)
    assert first.ok and first.buckets["otpm"].remaining == 900
    await store.settle(_settle(small, out=1000))
    blocked = await store.admit(_req(subject, out=50))
    assert not blocked.ok and blocked.failed_dimension == "otpm"
    assert 0.5 * 50 * 60 < blocked.retry_after_ms <= 50 * 60 + 1


async def test_settle_now_applies_in_process_or_declines(store: Store) -> None:
    """`settle_now` settles at once exactly when the store runs admissions in process."""
    subject = Subject("key", "k1", _reseller(), otpm=1000)
    small = _req(subject, out=100)
    assert (await store.admit(small)).ok
    assert store.settle_now(_settle(small, out=1000)) is store.in_process
    after = await store.admit(_req(subject, out=50))
    assert after.ok is not store.in_process


async def test_settle_on_estimate_changes_nothing(store: Store) -> None:
    """A request that used what it reserved leaves the buckets where admission put them."""
    subject = Subject("key", "k1", _reseller(), itpm=1000, otpm=1000)
    req = _req(subject, inp=300, out=400)
    assert (await store.admit(req)).ok
    await store.settle(_settle(req))
    nxt = await store.admit(_req(subject, inp=0, out=0))
    assert 700 <= nxt.buckets["itpm"].remaining <= 701 + REFILL_S * 1000 / 60
    assert 600 <= nxt.buckets["otpm"].remaining <= 601 + REFILL_S * 1000 / 60


async def test_request_larger_than_the_bucket_passes_when_full(store: Store) -> None:
    """A request estimated above the whole limit is charged the full bucket, not refused
    forever; settling it on its actual usage then corrects the bucket."""
    subject = Subject("key", "k1", _reseller(), otpm=1000)
    huge = _req(subject, out=5000)
    first = await store.admit(huge)
    assert first.ok and first.buckets["otpm"].remaining == 0
    assert not (await store.admit(_req(subject, out=1))).ok
    await store.settle(_settle(huge, out=400))
    nxt = await store.admit(_req(subject, out=100))
    assert nxt.ok and 500 <= nxt.buckets["otpm"].remaining <= 501 + REFILL_S * 1000 / 60


# --- admission: several subjects, all or nothing -----------------------------------------------


async def test_all_or_nothing_across_subjects(store: Store) -> None:
    """Key, reseller and customer are checked together: the tightest refuses and nothing of
    the others (requests, tokens, leases) is consumed."""
    r = _reseller()
    key = Subject("key", "k1", r, rpm=10, otpm=1000)
    reseller = Subject("reseller", r, r, rpm=100, itpm=10_000, concurrency=5)
    customer = Subject("customer", "c1", r, rpm=2)
    for n in range(2):
        res = await store.admit(_req(key, reseller, customer, inp=100, out=100))
        assert res.ok
        # The tightest subject per dimension is reported.
        assert res.buckets["rpm"].limit == 2 and res.buckets["rpm"].remaining == 1 - n
        assert res.buckets["otpm"].limit == 1000
        assert res.buckets["itpm"].limit == 10_000
    for _ in range(3):
        refused = await store.admit(_req(key, reseller, customer, inp=100, out=100))
        assert not refused.ok
        assert (refused.failed_dimension, refused.failed_subject) == ("rpm", "customer:c1")
    # Each subject alone still shows exactly the two admitted requests.
    k = await store.admit(_req(key, out=0))
    assert k.buckets["rpm"].remaining == 10 - 3
    assert 800 <= k.buckets["otpm"].remaining <= 801 + REFILL_S * 1000 / 60
    rs = await store.admit(_req(reseller, inp=0))
    assert 100 - 3 <= rs.buckets["rpm"].remaining <= 100 - 3 + REFILL_S * 100 / 60
    assert 9800 <= rs.buckets["itpm"].remaining <= 9801 + REFILL_S * 10_000 / 60
    # Two leases held by the admitted requests, one by `rs`: two more fit, then none.
    assert (await store.admit(_req(reseller))).ok
    assert (await store.admit(_req(reseller))).ok
    full = await store.admit(_req(reseller))
    assert not full.ok and full.failed_dimension == "concurrency"


async def test_first_subject_refusing_spares_the_later_ones(store: Store) -> None:
    """A refusal by the first subject leaves later subjects' buckets untouched too."""
    r = _reseller()
    key = Subject("key", "k1", r, itpm=100)
    customer = Subject("customer", "c1", r, rpm=3, concurrency=1)
    refused = await store.admit(_req(key, customer, inp=500))
    assert refused.ok  # larger than the bucket: charged the full bucket
    refused = await store.admit(_req(key, customer, inp=10))
    assert not refused.ok and refused.failed_subject == "key:k1"
    assert refused.failed_dimension == "itpm"
    c = await store.admit(_req(customer))
    assert not c.ok and c.failed_dimension == "concurrency"  # only the first lease is held
    # The customer's rpm bucket shows one admitted request (plus none for the refusals).
    other = await store.admit(_req(Subject("customer", "c1", r, rpm=3)))
    assert other.ok and other.buckets["rpm"].remaining == 1


# --- admission: concurrency leases -------------------------------------------------------------


async def test_concurrency_limit_and_release(store: Store) -> None:
    """Limit C admits C concurrent requests; the next is refused on concurrency until a
    settlement releases a lease."""
    subject = Subject("key", "k1", _reseller(), concurrency=3)
    reqs = [_req(subject) for _ in range(3)]
    for req in reqs:
        assert (await store.admit(req)).ok
    refused = await store.admit(_req(subject))
    assert not refused.ok
    assert (refused.failed_dimension, refused.failed_subject) == ("concurrency", "key:k1")
    assert refused.retry_after_ms > 0
    await store.settle(_settle(reqs[1]))
    assert (await store.admit(_req(subject))).ok
    assert not (await store.admit(_req(subject))).ok
    # Settling a lease twice releases nothing more.
    await store.settle(_settle(reqs[1]))
    assert not (await store.admit(_req(subject))).ok


async def test_concurrency_exact_under_concurrency(store: Store) -> None:
    """Of many concurrent requests against concurrency=C exactly C take a lease."""
    subject = Subject("key", "k1", _reseller(), concurrency=5)
    results = await asyncio.gather(*(store.admit(_req(subject)) for _ in range(40)))
    assert sum(r.ok for r in results) == 5
    assert {r.failed_dimension for r in results if not r.ok} == {"concurrency"}


async def test_expired_lease_is_reclaimed(store: Store) -> None:
    """A lease nobody settles (its instance died) is reclaimed after its ttl."""
    subject = Subject("key", "k1", _reseller(), concurrency=2)
    assert (await store.admit(_req(subject, ttl_ms=200))).ok
    assert (await store.admit(_req(subject, ttl_ms=200))).ok
    assert not (await store.admit(_req(subject, ttl_ms=60_000))).ok

    async def admitted() -> bool:
        return (await store.admit(_req(subject, ttl_ms=60_000))).ok

    await poll(admitted, timeout=10.0)
    await poll(admitted, timeout=10.0)
    assert not (await store.admit(_req(subject))).ok


async def test_renewed_lease_outlives_its_ttl(store: Store) -> None:
    """renew_leases keeps a lease alive past its original ttl while unrenewed ones expire."""
    subject = Subject("key", "k1", _reseller(), concurrency=2)
    # 2 s leases: the renewal must reach the store before the kept lease's ttl runs out, which
    # a loaded machine can delay well past a few hundred milliseconds.
    kept = _req(subject, ttl_ms=2_000)
    assert (await store.admit(kept)).ok
    assert (await store.admit(_req(subject, ttl_ms=2_000))).ok
    await store.renew_leases([(kept.subjects, kept.lease_id)], 30_000)

    async def admitted() -> bool:
        return (await store.admit(_req(subject, ttl_ms=30_000))).ok

    await poll(admitted, timeout=10.0)  # the unrenewed lease expired
    await asyncio.sleep(0.4)  # well past the kept lease's original ttl (a deadline, no event)
    refused = await store.admit(_req(subject))
    assert not refused.ok and refused.failed_dimension == "concurrency"
    await store.settle(_settle(kept))
    assert (await store.admit(_req(subject))).ok


async def test_short_lease_does_not_cut_a_longer_one(store: Store) -> None:
    """Leases of one subject expire each by its own ttl: a short lease admitted after a long
    one does not take the long one with it."""
    subject = Subject("key", "k1", _reseller(), concurrency=2)
    assert (await store.admit(_req(subject, ttl_ms=30_000))).ok
    assert (await store.admit(_req(subject, ttl_ms=100))).ok
    await asyncio.sleep(0.6)  # past the short lease's ttl and any expiry derived from it
    assert (await store.admit(_req(subject, ttl_ms=30_000))).ok
    refused = await store.admit(_req(subject))
    assert not refused.ok and refused.failed_dimension == "concurrency"


async def test_renewing_an_unknown_lease_creates_nothing(store: Store) -> None:
    """Renewal of a lease that was released or reclaimed does not bring it back."""
    subject = Subject("key", "k1", _reseller(), concurrency=1)
    req = _req(subject)
    assert (await store.admit(req)).ok
    await store.settle(_settle(req))
    await store.renew_leases([(req.subjects, req.lease_id)], 30_000)
    assert (await store.admit(_req(subject))).ok


# --- admissions given up on: cancel, and retried settlements ----------------------------------


async def test_cancel_rolls_back_an_applied_admission(store: Store) -> None:
    """Cancelling an applied admission gives back its request, its tokens and its lease."""
    s = Subject("key", "k", _reseller(), rpm=1, itpm=100, concurrency=1)
    req = _req(s, inp=60)
    assert (await store.admit(req)).ok
    assert not (await store.admit(_req(s))).ok
    await store.cancel(req)
    assert (await store.admit(_req(s, inp=100))).ok
    refused = await store.admit(_req(s))
    assert refused.failed_dimension in ("rpm", "concurrency")


async def test_cancel_before_admission_makes_it_a_noop(store: Store) -> None:
    """An admission that arrives after its cancel consumes nothing and is reported as a
    store failure (its caller gave up on it long ago)."""
    from gateway.errors import StoreError

    s = Subject("key", "k", _reseller(), rpm=1, concurrency=1)
    req = _req(s)
    await store.cancel(req)
    with pytest.raises(StoreError):
        await store.admit(req)
    assert (await store.admit(_req(s))).ok


async def test_cancel_is_idempotent(store: Store) -> None:
    """A cancel retried after success rolls back once: only one request's room comes back."""
    s = Subject("key", "k", _reseller(), rpm=2)
    first = _req(s)
    assert (await store.admit(first)).ok
    assert (await store.admit(_req(s))).ok
    await store.cancel(first)
    await store.cancel(first)
    assert (await store.admit(_req(s))).ok
    assert not (await store.admit(_req(s))).ok


async def test_cancel_after_settlement_changes_nothing(store: Store) -> None:
    """A settled admission is not rolled back by a stray cancel."""
    s = Subject("key", "k", _reseller(), rpm=1)
    req = _req(s)
    assert (await store.admit(req)).ok
    await store.settle(_settle(req))
    await store.cancel(req)
    assert not (await store.admit(_req(s))).ok


async def test_a_settlement_charged_far_past_the_limit_owes_at_most_a_day(
        store: Store) -> None:
    """A request charged absurdly more than its bucket (an upstream reporting 10**300 tokens,
    a huge reservation charged whole on a hang-up) puts the bucket at most MAX_DEBT_WINDOWS
    windows into debt, and the store takes it (Redis: no expiry past what it accepts)."""
    s = Subject("key", "k", _reseller(), otpm=1000)
    req = _req(s, out=10)
    assert (await store.admit(req)).ok
    await store.settle(_settle(req, out=10**300))
    refused = await store.admit(_req(s, out=1))
    assert not refused.ok and refused.failed_dimension == "otpm"
    assert refused.retry_after_ms <= (MAX_DEBT_WINDOWS + 1) * 60_000
    assert refused.retry_after_ms > (MAX_DEBT_WINDOWS - 1) * 60_000


async def test_retried_settlement_applies_once(store: Store) -> None:
    """A settlement sent twice (its first reply lost) debits the extra tokens once."""
    s = Subject("key", "k", _reseller(), itpm=1000, concurrency=1)
    req = _req(s, inp=100)
    assert (await store.admit(req)).ok
    await store.settle(_settle(req, inp=400))
    await store.settle(_settle(req, inp=400))
    # 400 used: 550 more fit (twice applied, 700 used, they would not).
    assert (await store.admit(_req(s, inp=550))).ok
