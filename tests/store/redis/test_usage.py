"""gateway.store.redis.usage: the ledger's key layout and script arguments, the decoding of
cells and totals, and on a real redis-server the resolution of additions in doubt (a call
that timed out may have been applied: the retry counts it once) and the round trips."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.store.base import MODELS_PER_DAY, PeriodUse, Tally, UsageKey, UsageNotAdded
from gateway.store.redis import RedisStore
from gateway.store.redis.usage import (
    MARKER_TTL_S,
    MAX_IN_DOUBT,
    InDoubt,
    UsageLayout,
    decode_cells,
    decode_tallies,
    keep_in_doubt,
    new_add_id,
    totals_fields,
)
from tests.support.redis_server import RedisServer


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


def _k(key_id: str = "k1", reseller: str = "acme", day: str | None = None,
       model: str = "m") -> UsageKey:
    return UsageKey(day or _today(), reseller, key_id, None, model)


def test_one_resellers_keys_share_its_hash_tag_and_days_are_grouped() -> None:
    """add_call names the marker, the markers in doubt and 4 keys per day, all under the
    reseller's hash tag, and 9 arguments per cell after the header and 3 per day."""
    layout = UsageLayout("gw:")
    cells = [(_k("k1", day="2026-03-01"), Tally(1)), (_k("k2", day="2026-03-02"), Tally(2)),
             (_k("k3", day="2026-03-01"), Tally(3))]
    doubt = [InDoubt("old", [(_k("k1", day="2026-03-01"), Tally(1))])]
    keys, args = layout.add_call("acme", cells, doubt, "new", 400)
    assert keys[:2] == ["gw:{r:acme}:usage:add:new", "gw:{r:acme}:usage:add:old"]
    assert len(keys) == 2 + 2 * 4 and all(k.startswith("gw:{r:acme}:") for k in keys)
    assert keys[2:6] == ["gw:{r:acme}:usage:2026-03-01", "gw:{r:acme}:usage:2026-03-01:models",
                         "gw:{r:acme}:usage:total:d:2026-03-01",
                         "gw:{r:acme}:usage:total:m:2026-03"]
    assert args[:6] == [MARKER_TTL_S, 1, 2, "reseller:acme", MODELS_PER_DAY, "other"]
    assert len(args) == 6 + 2 * 3 + (1 + 4) + 1 + 3 * 9
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


def test_additions_in_doubt_are_bounded() -> None:
    """At most MAX_IN_DOUBT additions stay in doubt, the newest; those older than half the
    markers' life are dropped."""
    now = 1_000_000.0
    kept: list[InDoubt] = [InDoubt("stale", [], at=now - MARKER_TTL_S)]
    for i in range(MAX_IN_DOUBT + 3):
        kept = keep_in_doubt(kept, InDoubt(str(i), [], at=now), now)
    assert [p.add_id for p in kept] == [str(i) for i in range(3, MAX_IN_DOUBT + 3)]


@pytest_asyncio.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    st = RedisStore(redis_server.url, f"t{uuid.uuid4().hex[:8]}:", timeout_s=0.5)
    await st.start()
    try:
        yield st
    finally:
        await st.close()


async def _key_use(store: RedisStore) -> PeriodUse:
    return (await store.period_use({"acme": ["k1"]}, _today()))["key:k1"]


async def _run_addition(store: RedisStore, add_id: str, cells: list[tuple[UsageKey, Tally]],
                        in_doubt: list[InDoubt] | None = None) -> int:
    keys, args = store.usage.add_call("acme", cells, in_doubt or [], add_id, 400)
    return int(await store._run(store._ADD_USAGE, keys, args, runner=store.pooled))


async def test_a_doubtful_addition_that_was_applied_is_subtracted_from_the_retry(
        store: RedisStore) -> None:
    """An addition whose caller saw a failure but which was applied is discounted from the
    next addition (which holds the kept tally): the cell counts once."""
    cells = [(_k(), Tally(1, 10, 100))]
    assert await _run_addition(store, "first", cells) == 1
    store._in_doubt["acme"] = [InDoubt("first", cells)]
    await store.add_usage({_k(): Tally(3, 30, 300)}, 400)  # the kept 1 + 2 new
    assert (await _key_use(store)).day == Tally(3, 30, 300)
    assert store._in_doubt == {}


async def test_a_doubtful_addition_that_arrives_after_the_retry_is_a_noop(
        store: RedisStore) -> None:
    """An addition in doubt that had not run is cancelled by the next addition: when it
    arrives later it adds nothing (returns 0), and the retry counted the kept tally."""
    cells = [(_k(), Tally(1, 10, 100))]
    store._in_doubt["acme"] = [InDoubt("first", cells)]
    await store.add_usage({_k(): Tally(3, 30, 300)}, 400)
    assert await _run_addition(store, "first", cells) == 0
    assert (await _key_use(store)).day == Tally(3, 30, 300)


async def test_the_newest_applied_addition_in_doubt_is_the_one_discounted(
        store: RedisStore) -> None:
    """Of several additions in doubt, the newest one applied already held the earlier ones'
    cells: only its cells are discounted, and the others are cancelled."""
    a = [(_k(), Tally(1))]
    b = [(_k(), Tally(2))]  # the retry of a, with one more request
    assert await _run_addition(store, "b", b, [InDoubt("a", a)]) == 1  # a cancelled here
    store._in_doubt["acme"] = [InDoubt("a", a), InDoubt("b", b)]
    await store.add_usage({_k(): Tally(5)}, 400)
    assert await _run_addition(store, "a", a) == 0
    assert (await _key_use(store)).day == Tally(5)


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
    use = await store.period_use({"acme": ["k1"], "beta": ["k2"]}, _today())
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
    await store.period_use({"acme": ["k1"], "beta": ["k2"]}, _today())
    assert store.round_trips - before == 1


def test_addition_ids_are_unique() -> None:
    """Each addition gets an id of its own."""
    assert len({new_add_id() for _ in range(1000)}) == 1000


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
