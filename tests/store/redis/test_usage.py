"""gateway.store.redis.usage: the ledger's key layout and script arguments, the decoding of
cells and totals, and on a real redis-server the settling of additions in doubt (a call that
timed out may have been applied: the retry counts it once) and the round trips."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.errors import StoreError
from gateway.store.base import MODELS_PER_DAY, PeriodUse, Tally, UsageKey, UsageNotAdded
from gateway.store.redis import RedisStore
from gateway.store.redis.usage import (
    ADDS_TTL_S,
    InDoubt,
    UsageLayout,
    decode_cells,
    decode_tallies,
    hold,
    subtract,
    totals_fields,
)
from tests.support.redis_server import RedisServer, free_port

TODAY = datetime.now(UTC).date().isoformat()  # one day for the module, across midnight too


def _today() -> str:
    return TODAY


def _k(key_id: str = "k1", reseller: str = "acme", day: str | None = None,
       model: str = "m") -> UsageKey:
    return UsageKey(day or _today(), reseller, key_id, None, model)


def test_one_resellers_keys_share_its_hash_tag_and_days_are_grouped() -> None:
    """add_call names the instance's additions hash and 4 keys per day, all under the
    reseller's hash tag, and 8 arguments per cell after the header and 3 per day."""
    layout = UsageLayout("gw:")
    cells = [(_k("k1", day="2026-03-01"), Tally(1)), (_k("k2", day="2026-03-02"), Tally(2)),
             (_k("k3", day="2026-03-01"), Tally(3))]
    keys, args = layout.add_call("acme", "inst", 7, cells, 400)
    assert keys[0] == "gw:{r:acme}:usage:adds:inst"
    assert len(keys) == 1 + 2 * 4 and all(k.startswith("gw:{r:acme}:") for k in keys)
    assert keys[1:5] == ["gw:{r:acme}:usage:2026-03-01", "gw:{r:acme}:usage:2026-03-01:models",
                         "gw:{r:acme}:usage:total:d:2026-03-01",
                         "gw:{r:acme}:usage:total:m:2026-03"]
    assert args[:6] == [7, ADDS_TTL_S, 2, "reseller:acme", MODELS_PER_DAY, "other"]
    assert len(args) == 6 + 2 * 3 + 1 + 3 * 8
    assert args[12:15] == [3, 1, "key:k1"]  # 3 cells; the first: day 1, key k1
    assert layout.index("2026-03-01") == "gw:{usage}:resellers:2026-03-01"


def test_cells_and_totals_decode_and_foreign_fields_are_ignored() -> None:
    """A cells hash becomes one row per cell (counts it lacks are 0, fields it did not write
    ignored); HMGET replies become one Tally per subject, nil as 0."""
    raw = {b'r:["k1",null,"m"]': b"2", b'o:["k1",null,"m"]': b"7", b'i:["k1","c","m"]': b"3",
           b"x:junk": b"1", b"r:not json": b"1"}
    rows = decode_cells("2026-03-01", "acme", raw)
    assert {(r.customer_id, r.requests, r.input_tokens, r.output_tokens) for r in rows} == {
        (None, 2, 0, 7), ("c", 0, 3, 0)}
    assert totals_fields(["key:k1"]) == ["r:key:k1", "i:key:k1", "o:key:k1"]
    assert decode_tallies([b"1", None, b"3", None, None, None]) == [Tally(1, 0, 3), Tally()]


def test_what_is_held_is_not_sent_again() -> None:
    """subtract takes what is already counted off the caller's cells, never below zero,
    dropping cells left empty; hold adds an applied addition to what is counted."""
    held: dict[UsageKey, Tally] = {}
    hold(held, [(_k("k1"), Tally(1, 10, 100))])
    hold(held, [(_k("k1"), Tally(1, 0, 0)), (_k("k2"), Tally(5, 5, 5))])
    assert held == {_k("k1"): Tally(2, 10, 100), _k("k2"): Tally(5, 5, 5)}
    cells = [(_k("k1"), Tally(3, 10, 150)), (_k("k2"), Tally(4, 5, 5)), (_k("k3"), Tally(1))]
    assert subtract(cells, held) == [(_k("k1"), Tally(1, 0, 50)), (_k("k3"), Tally(1))]


@pytest_asyncio.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    st = RedisStore(redis_server.url, f"t{uuid.uuid4().hex[:8]}:", timeout_s=0.5)
    await st.start()
    try:
        yield st
    finally:
        await st.close()


async def _key_use(store: RedisStore) -> PeriodUse:
    return (await store.period_use({"acme": ["reseller:acme", "key:k1"]}, _today()))["key:k1"]


async def _run_addition(store: RedisStore, number: int,
                        cells: list[tuple[UsageKey, Tally]]) -> int:
    """Run add_usage.lua for addition `number` of `store` directly (as a call that the store
    gave up on would arrive)."""
    keys, args = store.usage.add_call("acme", store._instance, number, cells, 400)
    return int(await store._run(store._ADD_USAGE, keys, args, runner=store.pooled))


async def test_a_doubtful_addition_that_was_applied_is_not_sent_again(
        store: RedisStore) -> None:
    """An addition whose caller saw a failure but which was applied is found applied before
    the next one, which then sends only the rest of the kept tally: the cell counts once."""
    cells = [(_k(), Tally(1, 10, 100))]
    store._additions = 1
    assert await _run_addition(store, 1, cells) == 1
    store._in_doubt["acme"] = InDoubt(1, cells)
    await store.add_usage({_k(): Tally(3, 30, 300)}, 400)  # the kept 1 + 2 new
    assert (await _key_use(store)).day == Tally(3, 30, 300)
    assert store._in_doubt == {} and store._held == {}


async def test_a_doubtful_addition_that_arrives_after_the_next_is_a_noop(
        store: RedisStore) -> None:
    """An addition in doubt that had not run is cancelled before the next one is sent: when
    it arrives later it adds nothing (returns 0), and the next counted the kept tally."""
    cells = [(_k(), Tally(1, 10, 100))]
    store._additions = 1
    store._in_doubt["acme"] = InDoubt(1, cells)
    await store.add_usage({_k(): Tally(3, 30, 300)}, 400)
    assert await _run_addition(store, 1, cells) == 0
    assert (await _key_use(store)).day == Tally(3, 30, 300)


async def test_an_addition_applied_twice_or_out_of_order_adds_once(store: RedisStore) -> None:
    """add_usage.lua adds a number once, and never one below a number already applied."""
    cells = [(_k(), Tally(1))]
    assert await _run_addition(store, 5, cells) == 1
    assert await _run_addition(store, 5, cells) == 0
    assert await _run_addition(store, 4, cells) == 0
    assert (await _key_use(store)).day == Tally(1)


async def test_two_failures_in_a_row_still_count_each_cell_once(
        store: RedisStore, redis_server: RedisServer) -> None:
    """An addition found applied, then the next one refused (NOREPLICAS, in doubt too): the
    one after counts only what neither counted, so the kept tally is counted once."""
    await store.add_usage({_k("k0"): Tally(1)}, 400)  # addition 1; today indexed
    cells = [(_k(), Tally(1, 10, 100))]
    store._additions = 2
    assert await _run_addition(store, 2, cells) == 1
    store._in_doubt["acme"] = InDoubt(2, cells)
    client = aioredis.from_url(redis_server.url)
    try:
        await client.config_set("min-replicas-to-write", 1)
        with pytest.raises(UsageNotAdded):  # finds 2 applied (a read), then 3 is refused
            await store.add_usage({_k(): Tally(2, 20, 200)}, 400)
        assert store._in_doubt["acme"] == InDoubt(3, [(_k(), Tally(1, 10, 100))])
        await client.config_set("min-replicas-to-write", 0)
        await store.add_usage({_k(): Tally(4, 40, 400)}, 400)
    finally:
        await client.config_set("min-replicas-to-write", 0)
        await client.aclose()
    assert (await _key_use(store)).day == Tally(4, 40, 400)
    assert store._in_doubt == {} and store._held == {}


async def test_settling_a_doubt_that_fails_sends_nothing(
        store: RedisStore, redis_server: RedisServer) -> None:
    """When the addition in doubt cannot be settled (Redis refuses the cancelling write),
    add_usage raises UsageNotAdded without sending the new addition; the doubt stays."""
    store._additions = 1
    store._in_doubt["acme"] = InDoubt(1, [(_k(), Tally(1))])
    client = aioredis.from_url(redis_server.url)
    try:
        await client.config_set("min-replicas-to-write", 1)
        before = store.round_trips
        with pytest.raises(UsageNotAdded):
            await store.add_usage({_k(): Tally(2)}, 400)
        assert store.round_trips == before + 1
        assert store._in_doubt["acme"].number == 1 and store._additions == 1
    finally:
        await client.config_set("min-replicas-to-write", 0)
        await client.aclose()
    await store.add_usage({_k(): Tally(2)}, 400)
    assert (await _key_use(store)).day == Tally(2)


async def test_a_timed_out_addition_is_counted_once_after_the_retry(
        store: RedisStore, pause: Callable[[bool], None]) -> None:
    """With Redis stopped, add_usage times out with UsageNotAdded naming every reseller of
    the call; once Redis continues (running the late call or not), the retry with the kept
    tally leaves each cell counted once."""
    tallies = {_k(): Tally(1, 1, 1), _k("k2", "beta"): Tally(2, 2, 2)}
    # Days indexed, client connected: the calls that time out are the scripts.
    await store.add_usage({_k(model="warm"): Tally(1), _k("k0", "beta"): Tally(1)}, 400)
    pause(True)
    try:
        with pytest.raises(UsageNotAdded) as caught:
            await store.add_usage(tallies, 400)
    finally:
        pause(False)
    assert caught.value.resellers == {"acme", "beta"}
    assert set(store._in_doubt) == {"acme", "beta"}
    await store.add_usage({_k(): Tally(2, 2, 2), _k("k2", "beta"): Tally(2, 2, 2)}, 400)
    use = await store.period_use({"acme": ["reseller:acme", "key:k1"],
                                  "beta": ["reseller:beta", "key:k2"]}, _today())
    assert use["reseller:acme"].day == Tally(3, 2, 2)  # with the warm-up request
    assert use["key:k2"].day == Tally(2, 2, 2)
    assert store._in_doubt == {}


async def test_round_trips_per_flush_and_per_period_query(store: RedisStore) -> None:
    """An addition costs one script per reseller (and one index call the first time a
    process sees a reseller's day); period_use of several resellers costs one round trip."""
    tallies = {_k(): Tally(1), _k("k2", "beta"): Tally(1)}
    before = store.round_trips
    await store.add_usage(tallies, 400)
    assert store.round_trips - before == 2 + 2
    before = store.round_trips
    await store.add_usage(tallies, 400)
    assert store.round_trips - before == 2
    before = store.round_trips
    await store.period_use({"acme": ["reseller:acme", "key:k1"],
                            "beta": ["reseller:beta", "key:k2"]}, _today())
    assert store.round_trips - before == 1


async def test_a_refused_addition_adds_nothing_and_its_retry_counts_once(
        store: RedisStore, redis_server: RedisServer) -> None:
    """With Redis refusing writes (NOREPLICAS), add_usage raises UsageNotAdded and nothing of
    the addition is in the ledger or the totals; once Redis takes writes again, the retry
    with the kept tally counts it once."""
    await store.add_usage({_k(model="warm"): Tally(1)}, 400)  # today indexed
    client = aioredis.from_url(redis_server.url)
    try:
        await client.config_set("min-replicas-to-write", 1)
        with pytest.raises(UsageNotAdded):
            await store.add_usage({_k(): Tally(2, 2, 2)}, 400)
        await client.config_set("min-replicas-to-write", 0)
        assert [r.model for r in await store.query_usage(_today(), _today())] == ["warm"]
        assert (await _key_use(store)).day == Tally(1)
        await store.add_usage({_k(): Tally(2, 2, 2)}, 400)
        assert (await _key_use(store)).day == Tally(3, 2, 2)
    finally:
        await client.config_set("min-replicas-to-write", 0)
        await client.aclose()


async def test_every_ledger_call_fails_as_a_store_error(
        store: RedisStore, redis_server: RedisServer) -> None:
    """With Redis answering MASTERDOWN (a replica of a master that is gone), add_usage raises
    UsageNotAdded, period_use and query_usage a StoreError, never a redis-py error; once
    Redis heals, the same store answers again."""
    client = aioredis.from_url(redis_server.url)
    try:
        await client.config_set("replica-serve-stale-data", "no")
        await client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        with pytest.raises(UsageNotAdded) as added:
            await store.add_usage({_k(): Tally(1)}, 400)
        with pytest.raises(StoreError) as used:
            await store.period_use({"acme": ["reseller:acme", "key:k1"]}, _today())
        with pytest.raises(StoreError) as queried:
            await store.query_usage(_today(), _today())
        for caught in (added, used, queried):
            assert str(caught.value).startswith("store "), caught.value
            assert "ResponseError" not in repr(caught.value)
    finally:
        await client.execute_command("REPLICAOF", "NO", "ONE")
        await client.aclose()
    await store.add_usage({_k(): Tally(1)}, 400)
    assert (await _key_use(store)).day == Tally(1)


async def test_two_instances_add_to_one_ledger(
        store: RedisStore, redis_server: RedisServer) -> None:
    """Two stores on one Redis (two gateway instances) adding at once sum exactly, and share
    one models-per-day bound."""
    second = RedisStore(redis_server.url, store.prefix, timeout_s=0.5)
    await second.start()
    try:
        models = {_k(model=f"m{i:02}"): Tally(1) for i in range(MODELS_PER_DAY)}
        await store.add_usage(models, 400)
        tasks = [s.add_usage({_k(model="m00"): Tally(1, 2, 3)}, 400)
                 for _ in range(10) for s in (store, second)]
        await asyncio.gather(*tasks)
        await second.add_usage({_k(model="late"): Tally(1)}, 400)
        assert (await _key_use(second)).day == Tally(MODELS_PER_DAY + 20 + 1, 40, 60)
        rows = {r.model: r.requests for r in await second.query_usage(_today(), _today())}
        assert rows["m00"] == 21 and rows["other"] == 1 and "late" not in rows
    finally:
        await second.close()
