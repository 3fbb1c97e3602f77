"""gateway.store.redis.store: reply decoding, the bundled Lua scripts, which transport serves
which call, and the store over each transport on a real redis-server (the whole contract
runs on every backend in tests/contract/)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.errors import StoreError
from gateway.limits import Limits
from gateway.store.base import (
    DIMENSIONS,
    PIPELINE_STATS,
    AdmitRequest,
    AdmitResult,
    Settlement,
    Subject,
)
from gateway.store.redis import RedisStore
from gateway.store.redis.pipelined import PipelinedRunner
from gateway.store.redis.pooled import PooledRunner
from gateway.store.redis.runner import Script
from gateway.store.redis.store import _two_ints, lua, pipelinable
from tests.support.gateway import poll
from tests.support.redis_server import RedisServer


def test_two_ints_decodes_a_pair_and_refuses_anything_else() -> None:
    """A two-element reply becomes two ints (nil as 0); any other shape is a TypeError."""
    assert _two_ints([b"3", None]) == (3, 0)
    assert _two_ints([1, 2]) == (1, 2)
    for bad in ([1], [1, 2, 3], b"12", None):
        with pytest.raises(TypeError):
            _two_ints(bad)


def test_the_lua_scripts_ship_with_the_package() -> None:
    """Each script the store loads is readable from the installed package, with its SHA-1."""
    from importlib import resources

    names = [p.name for p in resources.files("gateway.store").joinpath("lua").iterdir()
             if p.name.endswith(".lua")]
    assert sorted(names) == ["add_screening.lua", "add_usage.lua", "admit.lua", "cancel.lua",
                             "put_key.lua", "put_policy.lua", "renew.lua", "resolve_usage.lua"]
    for name in names:
        script = lua(name)
        assert "redis.call" in script.source or "KEYS" in script.source, name
        assert len(script.sha) == 40 and script.name == name


def test_the_url_decides_the_per_request_transport() -> None:
    """Single-node URLs send admit, settle and cancel over the pipelined connection;
    Sentinel and Cluster over the pooled client, which also serves everything else."""
    assert all(pipelinable(u) for u in ("redis://h:1/0", "rediss://h:1/0", "unix:///s.sock"))
    single = RedisStore("redis://127.0.0.1:1/0")
    assert isinstance(single.scripts, PipelinedRunner)
    assert isinstance(single.pooled, PooledRunner)
    for url in ("redis+sentinel://127.0.0.1:1/gwmaster", "redis+cluster://127.0.0.1:1"):
        assert not pipelinable(url)
        store = RedisStore(url)
        assert store.scripts is store.pooled, url


def test_a_refusal_reply_names_the_subject_and_dimension() -> None:
    """admit.lua's refusal reply becomes the refused subject, its dimension (by the shared
    DIMENSIONS order), the retry-after and the bucket; a concurrency refusal has no bucket."""
    a = Subject("key", "k1", "r", rpm=5)
    b = Subject("customer", "c1", "r", itpm=100, concurrency=2)
    req = AdmitRequest((a, b), "l1", 60_000, 10, 10)
    res = RedisStore._admit_result(req, [0, 2, 2, 1500500, 100, 3, 2000000])
    assert (res.ok, res.failed_dimension, res.failed_subject) == (False, "itpm", "customer:c1")
    assert res.retry_after_ms == 1500.5
    assert res.buckets["itpm"].limit == 100 and res.buckets["itpm"].remaining == 3
    res = RedisStore._admit_result(req, [0, 2, 4, 1000000, 2, 0, 0])
    assert res.failed_dimension == DIMENSIONS[3] == "concurrency" and res.buckets == {}


def test_an_admitted_reply_keeps_the_limited_dimensions_and_a_cancelled_one_raises() -> None:
    """An admission reply gives a bucket per dimension that some subject limits (limit 0 means
    none); a reply saying the admission was cancelled first raises StoreError."""
    req = AdmitRequest((Subject("key", "k1", "r", rpm=5),), "l1", 60_000, 0, 0)
    res = RedisStore._admit_result(req, [1, 5, 4, 12000000, 0, 0, 0, 0, 0, 0])
    assert res.ok and list(res.buckets) == ["rpm"] and res.buckets["rpm"].remaining == 4
    assert res.buckets["rpm"].reset_ms == 12000
    with pytest.raises(StoreError, match="cancelled"):
        RedisStore._admit_result(req, [2])


@contextlib.asynccontextmanager
async def _started(url: str, transport: str) -> AsyncIterator[RedisStore]:
    pooled = PooledRunner(url, 1.0)
    scripts = pooled if transport == "pooled" else None
    st = RedisStore(url, f"t{uuid.uuid4().hex[:8]}:", pooled=pooled, scripts=scripts)
    assert (st.scripts is pooled) == (transport == "pooled")
    await st.start()
    try:
        yield st
    finally:
        await st.close()


@pytest_asyncio.fixture(params=["pipelined", "pooled"])
async def store(request: pytest.FixtureRequest,
                redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    """A started store on the test's own server, its per-request scripts over the pipelined
    connection (the default for a redis:// URL) or over the pooled client (injected, as on
    Sentinel and Cluster)."""
    async with _started(redis_server.url, request.param) as st:
        yield st


@pytest_asyncio.fixture
async def batched_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    """A started store whose requests of one turn share admit.lua calls (one node,
    pipelined): what only batching promises is tested on it alone."""
    async with _started(redis_server.url, "pipelined") as st:
        yield st


async def test_admit_settle_and_cancel_over_either_transport(store: RedisStore) -> None:
    """Over either transport: a lease is held until settled, the limit refuses the request
    past it, a cancelled admission gives its request back, and each call counts one trip."""
    s = Subject("key", "k1", "r", rpm=2, concurrency=1)
    first = AdmitRequest((s,), "l1", 60_000, 0, 0)
    before = store.round_trips
    assert (await store.admit(first)).ok
    assert store.round_trips == before + 1
    busy = await store.admit(AdmitRequest((s,), "l2", 60_000, 0, 0))
    assert not busy.ok and busy.failed_dimension == "concurrency"
    await store.settle(Settlement((s,), "l1", 0, 0, 0, 0))
    second = AdmitRequest((s,), "l3", 60_000, 0, 0)
    assert (await store.admit(second)).ok
    await store.cancel(second)  # gives back its rpm and its lease
    assert (await store.admit(AdmitRequest((s,), "l4", 60_000, 0, 0))).ok
    over = await store.admit(AdmitRequest((s,), "l5", 60_000, 0, 0))
    assert not over.ok and over.failed_dimension in ("rpm", "concurrency")


async def test_a_reply_of_the_wrong_shape_is_a_store_error(store: RedisStore) -> None:
    """A script reply its decoder refuses raises StoreError (store unavailable), on either
    transport."""
    word = Script("word", "return 'not-a-number'")
    with pytest.raises(StoreError, match=r"^store unavailable: ValueError$"):
        await store._run(word, [], [], decode=int)
    with pytest.raises(StoreError, match=r"^store unavailable: ValueError$"):
        await store._run(word, [], [], decode=int, runner=store.pooled)


def _three(reseller: str) -> tuple[Subject, ...]:
    every = {"rpm": 10**6, "itpm": 10**9, "otpm": 10**9, "concurrency": 10**5}
    return (Subject("key", "k1", reseller, **every), Subject("reseller", reseller, reseller,
                                                             **every),
            Subject("customer", "c1", reseller, **every))


async def _executed(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items()
               if k.startswith("cmdstat_") and k not in ("cmdstat_info", "cmdstat_ping"))


async def test_an_admitted_request_with_three_subjects_costs_at_most_15_commands(
        store: RedisStore, redis_server: RedisServer) -> None:
    """Admission and settlement of a request with key, reseller and customer each limiting
    every dimension execute at most 15 Redis commands in all, those inside the scripts
    counted (INFO commandstats), once the subjects' hashes exist."""
    subjects = _three(f"r{uuid.uuid4().hex[:6]}")
    client = aioredis.from_url(redis_server.url)
    try:
        for i in range(3):  # the hashes and their expiry exist
            await store.admit(AdmitRequest(subjects, f"w{i}", 60_000, 10, 10))
            await store.settle(Settlement(subjects, f"w{i}", 10, 10, 5, 5))
        before = await _executed(client)
        n = 20
        for i in range(n):
            assert (await store.admit(AdmitRequest(subjects, f"l{i}", 60_000, 10, 10))).ok
            await store.settle(Settlement(subjects, f"l{i}", 10, 10, 5, 5))
        assert (await _executed(client) - before) / n <= 15
    finally:
        await client.aclose()


async def test_settled_admissions_do_not_grow_a_subjects_hash(
        store: RedisStore, redis_server: RedisServer) -> None:
    """A thousand admitted and settled requests leave each subject's hash small: settled
    markers and emptied lease ticks are swept, so memory per subject stays bounded."""
    subjects = _three(f"r{uuid.uuid4().hex[:6]}")
    for i in range(1000):
        assert (await store.admit(AdmitRequest(subjects, f"l{i}", 60_000, 1, 1))).ok
        await store.settle(Settlement(subjects, f"l{i}", 1, 1, 1, 1))
    client = aioredis.from_url(redis_server.url)
    try:
        for s in subjects:
            key = store._subject_key(s)
            assert 0 < int(await client.hlen(key)) <= 300, key
            assert int(await client.hget(key, "c") or 0) == 0
            assert 0 < int(await client.pttl(key)) <= 2 * 60_000 + 2_000
    finally:
        await client.aclose()


async def test_settlements_of_one_moment_share_a_call_and_each_applies_once(
        store: RedisStore, redis_server: RedisServer) -> None:
    """Twenty settlements issued together release all twenty leases (on one node in one
    admit.lua call), and settling them all again changes nothing."""
    s = Subject("key", f"k{uuid.uuid4().hex[:6]}", "r", rpm=100, otpm=10_000, concurrency=20)
    reqs = [AdmitRequest((s,), f"l{i}", 60_000, 0, 100) for i in range(20)]
    assert all(r.ok for r in await asyncio.gather(*(store.admit(q) for q in reqs)))
    assert not (await store.admit(AdmitRequest((s,), "over", 60_000, 0, 100))).ok
    trips = store.round_trips
    sts = [Settlement((s,), q.lease_id, 0, 100, 0, 10) for q in reqs]
    await asyncio.gather(*(store.settle(st) for st in sts))
    if store.scripts is not store.pooled:
        assert store.round_trips - trips == 1
    client = aioredis.from_url(redis_server.url)
    try:
        key = store._subject_key(s)
        assert int(await client.hget(key, "c") or 0) == 0
        otpm = float(await client.hget(key, "o") or 0)
        await asyncio.gather(*(store.settle(st) for st in sts))  # retried: applied once
        assert int(await client.hget(key, "c") or 0) == 0
        assert float(await client.hget(key, "o") or 0) == otpm
    finally:
        await client.aclose()


async def test_an_admission_after_a_settlement_sees_its_lease_released(
        store: RedisStore) -> None:
    """A settlement still waiting for its batch is sent before a later admission: at
    concurrency 1, admit, settle, admit again succeeds every time, with no wait between
    (once the scripts are loaded: a NOSCRIPT answer sends the source after what followed)."""
    s = Subject("key", f"k{uuid.uuid4().hex[:6]}", "r", concurrency=1)
    assert (await store.admit(AdmitRequest((s,), "warm", 60_000, 0, 0))).ok
    await store.settle(Settlement((s,), "warm", 0, 0, 0, 0))  # the scripts are loaded
    for i in range(20):
        assert (await store.admit(AdmitRequest((s,), f"l{i}", 60_000, 0, 0))).ok, i
        settling = asyncio.ensure_future(store.settle(Settlement((s,), f"l{i}", 0, 0, 0, 0)))
        await asyncio.sleep(0)  # queued for its batch, not yet sent
        assert (await store.admit(AdmitRequest((s,), f"m{i}", 60_000, 0, 0))).ok, i
        await settling
        await store.settle(Settlement((s,), f"m{i}", 0, 0, 0, 0))


def _batched(store: RedisStore) -> bool:
    """Whether the store shares admit.lua calls between requests (single node, pipelined)."""
    return store.scripts is not store.pooled


async def test_admissions_of_one_turn_are_decided_each_on_its_own(store: RedisStore) -> None:
    """Admissions issued together (on one node: one call) each get their own answer: one
    refused by its own subject consumes nothing of a subject it shares with the others, and
    one cancelled before it ran fails alone."""
    tag = uuid.uuid4().hex[:6]
    shared = Subject("reseller", f"r{tag}", f"r{tag}", rpm=2)
    full = Subject("key", f"full{tag}", f"r{tag}", concurrency=1)
    assert (await store.admit(AdmitRequest((full,), "holder", 60_000, 0, 0))).ok
    gone = AdmitRequest((shared,), "gone", 60_000, 0, 0)
    await store.cancel(gone)  # a tombstone: this admission does nothing when it runs
    reqs = [AdmitRequest((shared,), "a1", 60_000, 0, 0),
            AdmitRequest((full, shared), "a2", 60_000, 0, 0),
            gone,
            AdmitRequest((shared,), "a3", 60_000, 0, 0),
            AdmitRequest((shared,), "a4", 60_000, 0, 0)]
    trips = store.round_trips
    res = await asyncio.gather(*(store.admit(r) for r in reqs), return_exceptions=True)
    if _batched(store):
        assert store.round_trips - trips == 1
    a1, a2, cancelled, a3, a4 = res
    assert isinstance(a2, AdmitResult) and not a2.ok and a2.failed_dimension == "concurrency"
    assert isinstance(cancelled, StoreError) and "cancelled" in str(cancelled)
    # a2 took nothing of the shared rpm: two of the other three are admitted (in issue order
    # on one node; in any order over a pool).
    others = [r for r in (a1, a3, a4) if isinstance(r, AdmitResult)]
    assert sorted(r.ok for r in others) == [False, True, True]
    assert [r.failed_dimension for r in others if not r.ok] == ["rpm"]
    if _batched(store):
        assert isinstance(a4, AdmitResult) and not a4.ok


async def test_a_settlement_issued_with_an_admission_frees_its_lease_first(
        batched_store: RedisStore) -> None:
    """A settlement and an admission issued in the same moment, the admission first, go in
    one call on one node; the settlement is applied first, so at concurrency 1 the lease it
    releases is free for the admission."""
    store = batched_store
    s = Subject("key", f"k{uuid.uuid4().hex[:6]}", "r", concurrency=1)
    assert (await store.admit(AdmitRequest((s,), "l0", 60_000, 0, 0))).ok
    for i in range(1, 6):
        trips = store.round_trips
        res, _ = await asyncio.gather(store.admit(AdmitRequest((s,), f"l{i}", 60_000, 0, 0)),
                                      store.settle(Settlement((s,), f"l{i - 1}", 0, 0, 0, 0)))
        assert res.ok, i
        assert store.round_trips - trips == 1


async def test_an_admission_given_up_before_its_call_left_is_not_sent(
        batched_store: RedisStore) -> None:
    """On one node, an admission whose caller stopped waiting before the turn's call left
    is left out of it: it consumes nothing."""
    store = batched_store
    s = Subject("key", f"k{uuid.uuid4().hex[:6]}", "r", rpm=1)
    task = asyncio.ensure_future(store.admit(AdmitRequest((s,), "given-up", 60_000, 0, 0)))
    await asyncio.sleep(0)  # the admission waits for the end of the turn
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await store.admit(AdmitRequest((s,), "next", 60_000, 0, 0))).ok


async def test_an_admission_reaches_the_socket_one_loop_iteration_after_it_was_made(
        batched_store: RedisStore) -> None:
    """On one node, the turn's admit.lua call joins the pipelined connection's write of that
    turn: an admission is written in the loop iteration after the one that issued it (not
    three later: the store's send, a task per call, then the connection's flush)."""
    store = batched_store
    s = Subject("key", f"k{uuid.uuid4().hex[:6]}", "r", rpm=10)
    assert (await store.admit(AdmitRequest((s,), "warm", 60_000, 0, 0))).ok
    writes = PIPELINE_STATS.writes
    task = asyncio.ensure_future(store.admit(AdmitRequest((s,), "now", 60_000, 0, 0)))
    await asyncio.sleep(0)  # the admission is issued (the task's first step)
    await asyncio.sleep(0)  # the next iteration: the connection's flush
    assert PIPELINE_STATS.writes - writes == 1
    assert (await task).ok


async def test_a_call_that_cannot_be_built_fails_its_requests_and_no_later_one(
        batched_store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault while the turn's call is built (a bug) fails that call's admissions with
    StoreError; it neither leaves them waiting forever nor stops the calls after it."""
    store = batched_store
    s = Subject("key", f"k{uuid.uuid4().hex[:6]}", "r", rpm=10)
    assert (await store.admit(AdmitRequest((s,), "warm", 60_000, 0, 0))).ok
    build = store._admit_call
    broken = [True]

    def once_broken(*a: object) -> tuple[list[str], list[object]]:
        if broken.pop() if broken else False:
            raise RuntimeError("bug")
        return build(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_admit_call", once_broken)
    with pytest.raises(StoreError):
        await asyncio.wait_for(store.admit(AdmitRequest((s,), "lost", 60_000, 0, 0)), 5)
    assert (await asyncio.wait_for(
        store.admit(AdmitRequest((s,), "next", 60_000, 0, 0)), 5)).ok


async def test_a_huge_settlement_fails_nobody_sharing_its_call(
        batched_store: RedisStore) -> None:
    """A settlement charging 10**300 tokens shares its call with another reseller's
    admission: both apply (the debt is capped, so no expiry Redis refuses)."""
    store = batched_store
    tag = uuid.uuid4().hex[:6]
    a = Subject("key", f"a{tag}", f"r1{tag}", otpm=1000)
    b = Subject("key", f"b{tag}", f"r2{tag}", rpm=10)
    held = AdmitRequest((a,), f"held{tag}", 60_000, 0, 10)
    assert (await store.admit(held)).ok
    settled, admitted = await asyncio.gather(
        store.settle(Settlement((a,), held.lease_id, 0, 10, 0, 10**300)),
        store.admit(AdmitRequest((b,), f"new{tag}", 60_000, 0, 0)))
    assert settled is None and admitted.ok


async def test_an_admission_given_up_after_its_call_left_is_given_back(
        batched_store: RedisStore, pause: Callable[[bool], None]) -> None:
    """The caller of an admission already sent stops waiting (its client went away) before
    Redis answers: Limits rolls it back (cancel.lua, whichever way it turned out), so at
    concurrency 1 the subject admits again at once instead of a lease ttl later."""
    store = batched_store
    limits = Limits(store, "closed", 1, "anthropic")
    limits.start()
    try:
        s = Subject("key", f"k{uuid.uuid4().hex[:6]}", "r", concurrency=1)
        assert (await store.admit(AdmitRequest((s,), "warm", 60_000, 0, 0))).ok
        await store.settle(Settlement((s,), "warm", 0, 0, 0, 0))
        writes = PIPELINE_STATS.writes
        pause(True)  # the call is written but not answered until the server continues
        task = asyncio.ensure_future(limits.admit((s,), 0, 0))
        await poll(lambda: PIPELINE_STATS.writes > writes, timeout=5.0)
        task.cancel()
        pause(False)

        async def admits_again() -> bool:
            lease = f"n{uuid.uuid4().hex[:6]}"
            return (await store.admit(AdmitRequest((s,), lease, 60_000, 0, 0))).ok

        await poll(admits_again, timeout=5.0)
    finally:
        await limits.close()


async def test_many_admissions_of_one_turn_are_split_into_bounded_calls(
        store: RedisStore) -> None:
    """More admissions in one turn than one call carries (CALL_MAX) go in several calls,
    each admitted, and the limit counts them all."""
    from gateway.store.redis.store import CALL_MAX

    n = CALL_MAX + 10
    s = Subject("key", f"k{uuid.uuid4().hex[:6]}", "r", rpm=n)
    trips = store.round_trips
    res = await asyncio.gather(*(store.admit(AdmitRequest((s,), f"l{i}", 60_000, 0, 0))
                                 for i in range(n)))
    assert all(r.ok for r in res)
    assert sorted(r.buckets["rpm"].remaining for r in res) == list(range(n))
    if _batched(store):
        assert store.round_trips - trips == 2
    assert not (await store.admit(AdmitRequest((s,), "over", 60_000, 0, 0))).ok


async def test_screening_tallies_give_every_key_of_the_hour_its_expiry_without_exists(
        redis_server: RedisServer) -> None:
    """add_screening.lua sets the hour's expiry on the names hash whether this addition named
    an ASN or an earlier one did, leaves a names hash nobody wrote absent, and asks Redis no
    EXISTS for it (EXPIREAT on a missing key already does nothing)."""
    from gateway.store.base import ScreeningTally

    hour = int(time.time() // 3600)
    expires = (hour + 1 + 24) * 3600
    named = ScreeningTally(counts={"req": 1}, names={"64500": "Example"})
    async with _started(redis_server.url, "pipelined") as st:
        plain = aioredis.from_url(redis_server.url)
        try:
            await plain.config_resetstat()
            await st.add_screening({("acme", hour): named}, 24)
            names = st.screening.hour_keys("acme", hour)[2]
            assert await plain.expiretime(names) == expires
            await plain.persist(names)
            await st.add_screening({("acme", hour): ScreeningTally(counts={"req": 1}),
                                    ("quiet", hour): ScreeningTally(counts={"req": 1})}, 24)
            stats = await plain.info("commandstats")
            assert "cmdstat_expireat" in stats and "cmdstat_exists" not in stats
            assert await plain.expiretime(names) == expires
            assert not await plain.exists(st.screening.hour_keys("quiet", hour)[2])
        finally:
            await plain.aclose()


async def test_remembered_lease_ticks_are_bounded_and_a_forgotten_one_still_settles(
        store: RedisStore) -> None:
    """Leases whose settlement never comes (given up during a long store outage) do not
    pile up in the store's memory: past `lease_ticks_max` the oldest ticks are forgotten. A
    lease whose tick was forgotten still settles (the script reads the tick from its marker)
    and frees its concurrency slot."""
    store.lease_ticks_max = 8
    s = Subject("key", f"k{uuid.uuid4().hex[:6]}", "r", concurrency=20)
    for i in range(20):
        assert (await store.admit(AdmitRequest((s,), f"l{i}", 60_000, 0, 0))).ok, i
    assert 0 < len(store._lease_sec) <= 8 and "l19" in store._lease_sec
    assert "l0" not in store._lease_sec
    await store.settle(Settlement((s,), "l0", 0, 0, 0, 0))
    assert (await store.admit(AdmitRequest((s,), "l20", 60_000, 0, 0))).ok
    refused = await store.admit(AdmitRequest((s,), "l21", 60_000, 0, 0))
    assert not refused.ok and refused.failed_dimension == "concurrency"
