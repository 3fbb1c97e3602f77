"""The Redis store's semantics: key layout, the Lua scripts and what their replies mean,
over an injected transport (runner.py). Single node, Sentinel or Cluster.

Layout under `key_prefix` (P): P{meta} (keys_epoch, policy_version), P{meta}:policy,
P{meta}:keys (key id → record JSON), P{meta}:last_used, the channel Pevents, and limit state
under P{r:<reseller>}:... so one request's limits live on one Cluster shard; the usage ledger
under P{r:<reseller>}:usage:... and P{usage}:... (usage.py holds its layout).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import timedelta
from importlib import resources
from typing import Any, TypeVar

from gateway.cancellation import cancel_and_wait, cancelling
from gateway.errors import StoreError
from gateway.log import logger
from gateway.store.base import (
    DIMENSIONS,
    SCREENING_SET_CAP,
    TOKEN_DIMENSIONS,
    AdmitRequest,
    AdmitResult,
    Bucket,
    EventHandler,
    KeyRecord,
    PeriodUse,
    PolicyConflict,
    ScreeningTally,
    ScreeningWindow,
    Settlement,
    Store,
    StoreCallNotSent,
    StoredPolicy,
    Subject,
    Tally,
    UsageKey,
    UsageNotAdded,
    UsageRow,
    cell_expiry,
    check_day,
    check_screening,
    check_usage,
    settle_delta,
)
from gateway.store.ledger import row_order
from gateway.store.redis.pipelined import PipelinedRunner
from gateway.store.redis.pooled import FAILURES, PooledRunner, _raw
from gateway.store.redis.runner import Script, ScriptRunner, unavailable
from gateway.store.redis.screening import ScreeningLayout, decode_window
from gateway.store.redis.usage import (
    ADDS_TTL_S,
    Cells,
    InDoubt,
    UsageLayout,
    decode_cells,
    decode_tallies,
    hold,
    subtract,
    totals_fields,
)

T = TypeVar("T")
U = TypeVar("U")


def _chunks(items: list[U], size: int) -> list[list[U]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _two_ints(reply: Any) -> tuple[int, int]:
    if not isinstance(reply, list) or len(reply) != 2:
        raise TypeError("expected two values")
    return int(reply[0] or 0), int(reply[1] or 0)


def _replies(reply: Any, count: int) -> list[Any]:
    """admit.lua's list of `count` replies, one per settlement and admission of the call."""
    if not isinstance(reply, list) or len(reply) != count:
        raise TypeError(f"expected {count} replies")
    return reply


#: How long a settlement waits for company (other settlements, or the next admissions) before
#: its admit.lua call goes without them (single node).
SETTLE_WINDOW_S = 0.002
#: The most settlements and admissions one admit.lua call carries (≈ 25 µs of Redis each).
CALL_MAX = 64
#: The most lease expiry ticks a store remembers (a few MB). A lease whose settlement was
#: given up on (a long store outage) is never forgotten otherwise; a settlement whose tick
#: was forgotten still applies (admit.lua reads it from the lease's marker).
LEASE_TICKS_MAX = 65536


def lua(name: str) -> Script:
    """The bundled script `name` (gateway/store/lua/), read from the installed package."""
    source = resources.files("gateway.store").joinpath("lua", name).read_text(encoding="utf-8")
    return Script(name, source)


def pipelinable(url: str) -> bool:
    """Whether the per-request scripts of a store at `url` go over the pipelined connection
    (docs/architecture.md §9): single-node URLs do; Sentinel and Cluster keep the pooled
    client, which follows failovers and slots."""
    return url.startswith(("redis://", "rediss://", "unix://"))


class RedisStore(Store):
    """Store on Redis; every failure surfaces as StoreError.

    Two transports, chosen once here: `pooled` (redis-py's pool: plain commands, pub/sub and
    the administrative scripts) and `scripts` (the per-request admit, settle and cancel:
    the pipelined connection on a single node, else the pooled client itself). Both may be
    injected; by default they are built from `url`."""

    _ADMIT = lua("admit.lua")
    _CANCEL = lua("cancel.lua")
    _RENEW = lua("renew.lua")
    _PUT_POLICY = lua("put_policy.lua")
    _PUT_KEY = lua("put_key.lua")
    _ADD_USAGE = lua("add_usage.lua")
    _RESOLVE_USAGE = lua("resolve_usage.lua")
    _ADD_SCREENING = lua("add_screening.lua")
    _USAGE_PAGE = 500  # commands per pipeline of query_usage
    #: Past this many remembered lease ticks the older half is forgotten.
    lease_ticks_max: int = LEASE_TICKS_MAX

    def __init__(self, url: str, key_prefix: str = "gw:", timeout_s: float = 1.0, *,
                 pooled: PooledRunner | None = None,
                 scripts: ScriptRunner | None = None) -> None:
        self.url = url
        self.prefix = key_prefix
        self.timeout = timeout_s
        self.pooled = pooled if pooled is not None else PooledRunner(url, timeout_s)
        if scripts is None:
            scripts = PipelinedRunner(url, timeout_s) if pipelinable(url) else self.pooled
        self.scripts: ScriptRunner = scripts
        self.k_meta = f"{key_prefix}{{meta}}"
        self.k_policy = f"{key_prefix}{{meta}}:policy"
        self.k_keys = f"{key_prefix}{{meta}}:keys"
        self.k_used = f"{key_prefix}{{meta}}:last_used"
        self.channel = f"{key_prefix}events"
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.round_trips = 0  # commands sent; tests count them per request
        self.usage = UsageLayout(key_prefix)
        self.screening = ScreeningLayout(key_prefix)
        # Per reseller: the last addition whose call failed but may have been applied
        # (settled by resolve_usage.lua before the next), the cells found applied that the
        # caller still holds, and one addition at a time. Additions are numbered per store.
        self._instance = uuid.uuid4().hex[:16]
        # lease id → its expiry tick (admit.lua), from admission to settlement or cancel.
        self._lease_sec: dict[str, int] = {}
        # Settlements (for up to SETTLE_WINDOW_S) and admissions (until the end of the loop
        # turn) waiting for their admit.lua call, and the calls in flight.
        self._settling: list[tuple[Settlement, asyncio.Future[None]]] = []
        self._admitting: list[tuple[AdmitRequest, asyncio.Future[AdmitResult]]] = []
        self._send_queued = False  # a call_soon(_send) is pending
        self._send_timer: asyncio.TimerHandle | None = None  # a settlement's window
        self._batches: set[asyncio.Future[None]] = set()
        self._additions = 0
        self._in_doubt: dict[str, InDoubt] = {}
        self._held: dict[str, dict[UsageKey, Tally]] = {}
        self._usage_locks: dict[str, asyncio.Lock] = {}
        self._indexed: set[tuple[str, str, int]] = set()  # (day, reseller, expire-at) indexed

    async def _cmd(self, awaitable: Awaitable[Any], decode: Callable[[Any], T] = _raw) -> T:
        """One plain command over the pooled client (its deadline and error mapping)."""
        self.round_trips += 1
        return await self.pooled.call(awaitable, decode)

    async def _run(self, script: Script, keys: list[str], args: list[Any],
                   decode: Callable[[Any], T] = _raw, runner: ScriptRunner | None = None) -> T:
        """One script over `runner` (the per-request transport by default) and its decoded
        reply; anything the runner or `decode` raises that is not a StoreError becomes one."""
        self.round_trips += 1
        try:
            return decode(await (runner or self.scripts).run(script, keys, args))
        except StoreError:
            raise
        except Exception as exc:
            raise unavailable(exc) from exc

    async def start(self) -> None:
        await self.pooled.start()

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait(list(self._tasks))
        self._send()  # what still waits for its call goes now
        if self._batches:
            await asyncio.wait(list(self._batches), timeout=self.timeout * 2 + 1.0)
        if self.scripts is not self.pooled:
            await self.scripts.close()
        await self.pooled.close()

    async def ping(self) -> None:
        await self._cmd(self.pooled.client.ping())

    # keys ---------------------------------------------------------------------------------
    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._cmd(self.pooled.client.hget(self.k_keys, key_id),
                               decode=lambda raw: KeyRecord.from_json(raw) if raw else None)

    async def list_keys(self) -> list[KeyRecord]:
        return await self._cmd(self.pooled.client.hgetall(self.k_keys), decode=lambda raw: [
            KeyRecord.from_json(v) for v in raw.values()])

    async def put_key(self, rec: KeyRecord) -> int:
        epoch = await self._run(self._PUT_KEY, [self.k_meta, self.k_keys],
                                [rec.key_id, rec.to_json()], decode=int, runner=self.pooled)
        await self._cmd(self.pooled.client.publish(
            self.channel, json.dumps({"kind": "key", "key_id": rec.key_id, "epoch": epoch})))
        return epoch

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        if last_used:
            await self._cmd(self.pooled.client.hset(
                self.k_used, mapping={k: repr(v) for k, v in last_used.items()}))

    async def last_used(self, key_ids: list[str]) -> dict[str, float]:
        if not key_ids:
            return {}
        return await self._cmd(self.pooled.client.hmget(self.k_used, key_ids), decode=lambda vals: {
            k: float(v) for k, v in zip(key_ids, vals, strict=True) if v is not None})

    # policy -------------------------------------------------------------------------------
    async def get_policy(self) -> StoredPolicy | None:
        def decode(raw: Any) -> StoredPolicy | None:
            if not raw:
                return None
            d = {k.decode(): v.decode() for k, v in raw.items()}
            return StoredPolicy(int(d["version"]), d["doc"], float(d["applied_at"]),
                                d["actor"])

        return await self._cmd(self.pooled.client.hgetall(self.k_policy), decode=decode)

    async def put_policy(self, doc: str, actor: str, expected_version: int | None = None) -> int:
        args = [doc, actor, repr(time.time()), "" if expected_version is None
                else str(expected_version)]
        ok, version = await self._run(self._PUT_POLICY, [self.k_meta, self.k_policy], args,
                                      decode=lambda r: (int(r[0]), int(r[1])),
                                      runner=self.pooled)
        if not ok:  # `version` is the live one; args[3] the expected one sent
            raise PolicyConflict(version, int(args[3]))
        await self._cmd(self.pooled.client.publish(
            self.channel, json.dumps({"kind": "policy", "version": version})))
        return version

    async def versions(self) -> tuple[int, int]:
        return await self._cmd(
            self.pooled.client.hmget(self.k_meta, ["keys_epoch", "policy_version"]),
            decode=_two_ints)

    # events -------------------------------------------------------------------------------
    async def subscribe(self, handler: EventHandler) -> None:
        task = asyncio.create_task(self._listen(handler), name="store-subscriber")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, handler: EventHandler) -> None:
        backoff = 0.1
        while not self._closed and not cancelling():
            conn = self.pooled.subscriber()
            pubsub = conn.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                backoff = 0.1
                await handler({"kind": "resync"})  # anything missed while disconnected
                while not self._closed and not cancelling():
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    try:
                        event = json.loads(msg["data"])
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        await handler(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Error replies, a broken connection, or the handler failing on one event:
                # the listener resubscribes (and resyncs) rather than end for good.
                logger().debug("store_subscriber_disconnected", reason=type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    # Bounded: closing must not hang on a store that stopped answering.
                    async with asyncio.timeout(self.timeout * 2 + 1.0):
                        await pubsub.aclose()
                        await conn.aclose()
                except FAILURES:
                    pass

    # limits -------------------------------------------------------------------------------
    def _subject_key(self, s: Subject) -> str:
        """The subject's hash (admit.lua describes its fields), under the reseller's tag."""
        return f"{self.prefix}{{r:{s.reseller}}}:{s.kind}:{s.ident}"

    def _admit_part(self, req: AdmitRequest) -> tuple[list[str], list[Any]]:
        """One admission's KEYS and ARGV in admit.lua's layout (cancel.lua takes the same)."""
        keys: list[str] = []
        args: list[Any] = [len(req.subjects), req.lease_id, req.lease_ttl_ms,
                           req.input_tokens, req.output_tokens]
        for s in req.subjects:
            keys.append(self._subject_key(s))
            args.extend((s.rpm, s.itpm, s.otpm, s.concurrency))
        return keys, args

    def _settle_part(self, st: Settlement) -> tuple[list[str], list[Any]]:
        """One settlement's KEYS and ARGV in admit.lua's layout."""
        keys: list[str] = []
        args: list[Any] = [len(st.subjects), st.lease_id, self._lease_sec.get(st.lease_id, 0)]
        for s in st.subjects:
            keys.append(self._subject_key(s))
            din = settle_delta(s.itpm, st.input_reserved, st.input_actual) if s.itpm else 0
            dout = settle_delta(s.otpm, st.output_reserved, st.output_actual) if s.otpm else 0
            args.extend((s.itpm, s.otpm, din, dout))
        return keys, args

    def _admit_call(self, settlements: list[Settlement], admissions: list[AdmitRequest]
                    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one admit.lua call: the settlements, then the admissions."""
        keys: list[str] = []
        args: list[Any] = [len(settlements), len(admissions)]
        parts = [self._settle_part(st) for st in settlements]
        parts += [self._admit_part(req) for req in admissions]
        for k, a in parts:
            keys += k
            args += a
        return keys, args

    async def admit(self, req: AdmitRequest) -> AdmitResult:
        if self.scripts is self.pooled:
            # Sentinel and Cluster: one call per admission (a call must stay on one shard).
            keys, args = self._admit_call([], [req])
            return await self._run(self._ADMIT, keys, args,
                                   decode=lambda res: self._admitted(req, res[0]))
        # One node: the admissions of this loop turn and the settlements waiting share one
        # call, the settlements first (a lease released before is free for the admissions).
        fut: asyncio.Future[AdmitResult] = asyncio.get_running_loop().create_future()
        self._admitting.append((req, fut))
        self._send_soon()
        return await fut

    def _admitted(self, req: AdmitRequest, res: Any) -> AdmitResult:
        result = self._admit_result(req, res)
        if result.ok and len(res) > 10:
            # The lease's expiry tick: settlement names the lease's count field with it.
            ticks = self._lease_sec
            if len(ticks) >= self.lease_ticks_max:
                for old in list(itertools.islice(ticks, max(1, len(ticks) // 2))):
                    del ticks[old]  # the oldest admissions (insertion order)
            ticks[req.lease_id] = int(res[10])
        return result

    @staticmethod
    def _admit_result(req: AdmitRequest, res: Any) -> AdmitResult:
        """admit.lua's reply to one admission (times in whole microseconds)."""
        if int(res[0]) == 2:
            raise StoreError("admission cancelled before it ran")
        if int(res[0]) == 0:
            s = req.subjects[int(res[1]) - 1]
            dim = DIMENSIONS[int(res[2]) - 1]
            failed = {dim: Bucket(int(res[4]), int(res[5]), int(res[6]) / 1000)}
            return AdmitResult(False, dim, f"{s.kind}:{s.ident}", int(res[3]) / 1000,
                               failed if dim != "concurrency" else {})
        buckets = {}
        for i, dim in enumerate(TOKEN_DIMENSIONS):
            limit = int(res[1 + i * 3])
            if limit:
                buckets[dim] = Bucket(limit, int(res[2 + i * 3]), int(res[3 + i * 3]) / 1000)
        return AdmitResult(True, buckets=buckets)

    async def cancel(self, req: AdmitRequest) -> None:
        keys, args = self._admit_part(req)
        await self._run(self._CANCEL, keys, args)
        self._lease_sec.pop(req.lease_id, None)

    def settle_soon(self, st: Settlement) -> asyncio.Future[None]:
        if self.scripts is self.pooled:
            return super().settle_soon(st)  # Sentinel and Cluster: a task of `settle`
        # One node: no response waits for a settlement, so it waits up to SETTLE_WINDOW_S
        # for company: other settlements, or the next admissions' call.
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._settling.append((st, fut))
        if self._send_timer is None and not self._send_queued:
            self._send_timer = loop.call_later(SETTLE_WINDOW_S, self._send)
        return fut

    async def settle(self, st: Settlement) -> None:
        if self.scripts is not self.pooled:
            await self.settle_soon(st)
            return
        # Sentinel and Cluster: one call per settlement (a call must stay on one shard).
        keys, args = self._admit_call([st], [])
        await self._run(self._ADMIT, keys, args)
        self._lease_sec.pop(st.lease_id, None)

    def _send_soon(self) -> None:
        """Send what waits at the end of this loop turn (once, however many admissions):
        right before the pipelined connection's write of the turn when it is up, so the call
        joins that write."""
        if not self._send_queued:
            self._send_queued = True
            if not self.scripts.before_flush(self._send):
                asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        """Send the waiting settlements and admissions, settlements first, at most
        CALL_MAX to a call (a long script would hold up every other client of the server);
        those whose caller stopped waiting before they left are dropped. On a connection
        that is up the replies are handled as they arrive, without a task per call."""
        self._send_queued = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        sts = [(st, f) for st, f in self._settling if not f.done()]
        adms = [(req, f) for req, f in self._admitting if not f.done()]
        self._settling, self._admitting = [], []
        while sts or adms:
            part_sts, sts = sts[:CALL_MAX], sts[CALL_MAX:]
            room = CALL_MAX - len(part_sts)
            part_adms, adms = adms[:room], adms[room:]
            call: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            answer = functools.partial(self._answer, part_sts, part_adms, call)
            try:
                keys, args = self._admit_call([st for st, _ in part_sts],
                                              [req for req, _ in part_adms])
                self._batches.add(call)
                call.add_done_callback(self._batches.discard)
                self.round_trips += 1
                if not self.scripts.submit(self._ADMIT, keys, args, answer):
                    task = asyncio.ensure_future(self._send_call(keys, args, answer))
                    self._batches.add(task)
                    task.add_done_callback(self._batches.discard)
            except Exception as exc:  # a bug: these calls fail, never hang, and the rest go
                answer(None, exc)

    async def _send_call(self, keys: list[str], args: list[Any],
                         answer: Callable[[Any, BaseException | None], None]) -> None:
        """One call over `runner.run` (it connects first when needed)."""
        try:
            reply = await self.scripts.run(self._ADMIT, keys, args)
        except BaseException as exc:
            answer(None, exc)
            if not isinstance(exc, Exception):
                raise
            return
        answer(reply, None)

    def _answer(self, sts: list[tuple[Settlement, asyncio.Future[None]]],
                adms: list[tuple[AdmitRequest, asyncio.Future[AdmitResult]]],
                call: asyncio.Future[None], reply: Any, error: BaseException | None) -> None:
        """Hand each settlement and admission of one call its outcome."""
        if not call.done():
            call.set_result(None)
        futs: list[asyncio.Future[Any]] = [f for _, f in sts] + [f for _, f in adms]
        replies: list[Any] = []
        if error is None:
            try:
                replies = _replies(reply, len(futs))
            except Exception as exc:
                error = exc
        if error is not None:
            err = error if isinstance(error, StoreError) else unavailable(error)
            for f in futs:
                if not f.done():
                    f.set_exception(err)
            return
        for st, f in sts:
            # Applied: its lease's tick is forgotten (a failed one keeps it for the retry).
            self._lease_sec.pop(st.lease_id, None)
            if not f.done():
                f.set_result(None)
        for (req, f), res in zip(adms, replies[len(sts):], strict=True):
            if not f.done():  # a caller gone meanwhile is rolled back by Limits (cancel)
                try:
                    f.set_result(self._admitted(req, res))
                except StoreError as exc:
                    f.set_exception(exc)
                except Exception as exc:
                    f.set_exception(unavailable(exc))

    async def renew_leases(
        self, leases: list[tuple[tuple[Subject, ...], str]], ttl_ms: int
    ) -> None:
        for subjects, lease_id in leases:
            if any(s.concurrency for s in subjects):
                keys = [self._subject_key(s) for s in subjects]
                res: Any = await self._run(self._RENEW, keys, [lease_id, ttl_ms],
                                      runner=self.pooled)
                if lease_id in self._lease_sec and int(res[1]):
                    self._lease_sec[lease_id] = int(res[1])

    # usage ledger (usage.py: the layout) -------------------------------------------------
    def _pipeline(self) -> Any:
        return self.pooled.client.pipeline(transaction=False)

    async def add_usage(self, tallies: Mapping[UsageKey, Tally], retention_days: int) -> None:
        check_usage(tallies, retention_days)
        groups: dict[str, Cells] = {}
        for k, t in tallies.items():
            if t:
                groups.setdefault(k.reseller, []).append(
                    (k, Tally(t.requests, t.input_tokens, t.output_tokens)))
        results = await asyncio.gather(
            *(self._add_usage(r, cells, retention_days) for r, cells in groups.items()),
            return_exceptions=True)
        failed: list[str] = []
        first: StoreError | None = None
        for r, res in zip(groups, results, strict=True):
            if isinstance(res, StoreError):
                failed.append(r)
                first = first or res
            elif isinstance(res, BaseException):
                raise res
        if first is not None:
            raise UsageNotAdded(str(first), failed) from first

    async def _add_usage(self, reseller: str, cells: Cells, retention_days: int) -> None:
        """One reseller's part: the last addition in doubt settled first (only after a
        failure), its days indexed (once per process), then one script. Of the caller's
        cells, what an addition found applied already counted (`_held`) is not sent again."""
        lock = self._usage_locks.setdefault(reseller, asyncio.Lock())
        async with lock:  # one addition of a reseller at a time: numbers rise in order
            doubt = self._in_doubt.get(reseller)
            if doubt is not None:
                applied = await self._run(
                    self._RESOLVE_USAGE, [self.usage.additions(reseller, self._instance)],
                    [doubt.number, ADDS_TTL_S], decode=int, runner=self.pooled)
                del self._in_doubt[reseller]
                if applied:
                    hold(self._held.setdefault(reseller, {}), doubt.cells)
            held = self._held.get(reseller)
            send = subtract(cells, held) if held else cells
            if send:
                await self._index_usage(reseller, {k.day for k, _ in send}, retention_days)
                self._additions += 1
                number = self._additions
                keys, args = self.usage.add_call(reseller, self._instance, number, send,
                                                 retention_days)
                try:
                    await self._run(self._ADD_USAGE, keys, args, runner=self.pooled)
                except StoreCallNotSent:
                    raise
                except BaseException:  # a timeout, an error reply, a cancelled flush
                    self._in_doubt[reseller] = InDoubt(number, send)
                    raise
            self._held.pop(reseller, None)  # the caller drops its tally: all of it is counted

    async def _index_usage(self, reseller: str, days: Collection[str],
                           retention_days: int) -> None:
        now = time.time()
        todo = [(d, int(cell_expiry(d, retention_days))) for d in sorted(days)]
        todo = [(d, e) for d, e in todo if e > now and (d, reseller, e) not in self._indexed]
        if not todo:
            return
        pipe = self._pipeline()
        for day, expires in todo:
            pipe.sadd(self.usage.index(day), reseller)
            pipe.expireat(self.usage.index(day), expires)
        await self._cmd(pipe.execute())
        if len(self._indexed) > 100_000:
            self._indexed.clear()
        self._indexed.update((d, reseller, e) for d, e in todo)

    async def period_use(self, subjects: Mapping[str, Collection[str]],
                         day: str) -> dict[str, PeriodUse]:
        check_day(day)
        if not any(subjects.values()):
            return {}
        pipe = self._pipeline()
        order: list[list[str]] = []
        for reseller, named in subjects.items():
            names = list(named)
            if not names:
                continue
            fields = totals_fields(names)
            pipe.hmget(self.usage.day_totals(reseller, day), fields)
            pipe.hmget(self.usage.month_totals(reseller, day), fields)
            order.append(names)
        replies: list[Any] = await self._cmd(pipe.execute())
        out: dict[str, PeriodUse] = {}
        for i, names in enumerate(order):
            pairs = zip(decode_tallies(replies[2 * i]), decode_tallies(replies[2 * i + 1]),
                        strict=True)
            for name, (d, m) in zip(names, pairs, strict=True):
                out[name] = PeriodUse(d, m)
        return out

    async def query_usage(self, since_day: str, until_day: str, reseller: str | None = None,
                          key_id: str | None = None,
                          customer_id: str | None = None) -> list[UsageRow]:
        since, until = check_day(since_day), check_day(until_day)
        days = [(since + timedelta(days=n)).isoformat()
                for n in range((until - since).days + 1)]
        pairs: list[tuple[str, str]] = []
        if reseller is not None:
            pairs = [(d, reseller) for d in days]
        else:
            for chunk in _chunks(days, self._USAGE_PAGE):
                pipe = self._pipeline()
                for d in chunk:
                    pipe.smembers(self.usage.index(d))
                members: list[Any] = await self._cmd(pipe.execute())
                pairs += [(d, m.decode()) for d, ms in zip(chunk, members, strict=True)
                          for m in sorted(ms)]
        rows: list[UsageRow] = []
        for chunk2 in _chunks(pairs, self._USAGE_PAGE):
            pipe = self._pipeline()
            for d, r in chunk2:
                pipe.hgetall(self.usage.cells(r, d))
            raws: list[Any] = await self._cmd(pipe.execute())
            for (d, r), raw in zip(chunk2, raws, strict=True):
                rows += [row for row in decode_cells(d, r, raw)
                         if (key_id is None or row.key_id == key_id)
                         and (customer_id is None or row.customer_id == customer_id)]
        rows.sort(key=row_order)
        return rows

    # reseller screening (screening.py: the layout) ----------------------------------------
    async def add_screening(self, tallies: Mapping[tuple[str, int], ScreeningTally],
                            keep_hours: int) -> None:
        check_screening(tallies, keep_hours)
        groups: dict[str, dict[int, ScreeningTally]] = {}
        for (reseller, hour), t in tallies.items():
            groups.setdefault(reseller, {})[hour] = t
        results = await asyncio.gather(*(
            self._run(self._ADD_SCREENING,
                      *self.screening.add_call(r, hours, SCREENING_SET_CAP, keep_hours),
                      runner=self.pooled)
            for r, hours in groups.items()), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                raise res

    async def screening_window(self, resellers: Collection[str], first_hour: int,
                               last_hour: int, *, detail: bool = True
                               ) -> dict[str, ScreeningWindow]:
        hours = list(range(first_hour, last_hour + 1))

        async def one(reseller: str) -> ScreeningWindow:
            pipe = self._pipeline()
            sketches = []
            for hour in hours:
                c, u, n, *sets = self.screening.hour_keys(reseller, hour)
                pipe.hgetall(c)
                if detail:
                    pipe.hgetall(n)
                for k in sets:
                    pipe.smembers(k)
                sketches.append(u)
            if detail:
                pipe.execute_command("PFCOUNT", *sketches)  # one slot: the hash tag
            replies: list[Any] = await self._cmd(pipe.execute())
            if not detail:
                return decode_window(hours, replies, 0, names=False)
            return decode_window(hours, replies[:-1], replies[-1])

        names = list(resellers)
        if not hours:
            return {r: ScreeningWindow() for r in names}
        got = await asyncio.gather(*(one(r) for r in names))
        return dict(zip(names, got, strict=True))

    async def screening_mark(self, reseller: str, signal: str, flagged: bool,
                             ttl_s: int) -> bool:
        key = self.screening.mark(reseller, signal)
        if not flagged:
            await self._cmd(self.pooled.client.delete(key))
            return False
        return bool(await self._cmd(self.pooled.client.set(key, "1", nx=True, ex=ttl_s)))

    # audit stream -------------------------------------------------------------------------
    # One Stream key, `<prefix>audit` (one slot in Cluster), each entry one field `e`: the
    # event's JSON. Entry ids are the Redis server's clock; an event's `time` is its writer's,
    # so `since` reads back this much further and filters on `time`.
    _AUDIT_SKEW_S = 300.0
    _AUDIT_PAGE = 500

    async def append_audit(self, event: dict[str, Any]) -> None:
        await self._cmd(self.pooled.client.xadd(
            f"{self.prefix}audit", {"e": json.dumps(event, separators=(",", ":"))},
            maxlen=self.audit_maxlen, approximate=True))

    async def list_audit(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        low = "-" if since is None else str(max(0, int((since - self._AUDIT_SKEW_S) * 1000)))
        high = "+"
        out: list[dict[str, Any]] = []
        while len(out) < limit:
            page: list[tuple[bytes, dict[bytes, bytes]]] = await self._cmd(
                self.pooled.client.xrevrange(f"{self.prefix}audit", max=high, min=low,
                                      count=self._AUDIT_PAGE))
            for _entry_id, fields in page:
                try:
                    event = json.loads(fields[b"e"])
                    when = float(event["time"])
                except (KeyError, TypeError, ValueError):
                    continue  # not an entry this gateway wrote
                if since is None or when >= since:
                    out.append(event)
                    if len(out) >= limit:
                        break
            if len(page) < self._AUDIT_PAGE:
                break
            high = "(" + page[-1][0].decode()
        out.reverse()
        return out
