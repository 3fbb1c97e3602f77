"""The Redis backend (redis.asyncio + hiredis): single node, Sentinel or Cluster.

Layout under `key_prefix` (P): P{meta} (keys_epoch, policy_version), P{meta}:policy,
P{meta}:keys (key id → record JSON), P{meta}:last_used, the channel Pevents, and limit state
under P{r:<reseller>}:... so one request's limits live on one Cluster shard.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from gateway.errors import StoreError
from gateway.log import logger
from gateway.store.base import (
    WINDOW_MS,
    AdmitRequest,
    AdmitResult,
    Bucket,
    EventHandler,
    KeyRecord,
    Settlement,
    Store,
    StoredPolicy,
    Subject,
    gcra_cost,
)
from gateway.store.fastpath import FastScript, PipelinedConnection, ScriptError
from gateway.tasks import cancel_and_wait, cancelling

_DIMS = ("rpm", "itpm", "otpm", "concurrency")
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
T = TypeVar("T")


def _raw(reply: Any) -> Any:
    return reply


def _two_ints(reply: Any) -> tuple[int, int]:
    if not isinstance(reply, list) or len(reply) != 2:
        raise TypeError("expected two values")
    return int(reply[0] or 0), int(reply[1] or 0)


def _lua(name: str) -> str:
    return resources.files("gateway.store").joinpath("lua", name).read_text(encoding="utf-8")


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    parts = urlsplit(url)
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        password = unquote(cred.partition(":")[2]) or None
    hosts = []
    for hp in netloc.split(","):
        if hp.startswith("["):  # an IPv6 address: [::1]:26379
            host, _, port = hp[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = hp.rpartition(":")
            host = host or hp
        hosts.append((host, int(port) if port.isdigit() else 26379))
    segs = [s for s in parts.path.split("/") if s]
    if not segs:
        raise ValueError("redis+sentinel:// URL needs the service name as its path")
    db = int(segs[1]) if len(segs) > 1 else 0
    return hosts, segs[0], db, password


class _FastAdapter:
    """Gives a FastScript the call shape of redis-py's Script; script errors are store errors."""

    def __init__(self, script: FastScript) -> None:
        self.script = script

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.script(keys, args)
        except ScriptError as exc:
            # The reply's first word names the condition (OOM, READONLY, NOSCRIPT, ERR, ...).
            raise StoreError(f"store error: {str(exc).split(' ', 1)[0][:40]}") from exc


class RedisStore(Store):
    """Store on Redis; every failure surfaces as StoreError."""

    def __init__(self, url: str, key_prefix: str = "gw:", timeout_s: float = 1.0) -> None:
        self.url = url
        self.prefix = key_prefix
        self.timeout = timeout_s
        self.cluster = url.startswith("redis+cluster://")
        common: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 1),
        }
        self.client: Any
        self._sub_factory: Any
        self._sentinel: Sentinel | None = None
        if self.cluster:
            plain = "redis://" + url[len("redis+cluster://"):]
            self.client = RedisCluster.from_url(plain, **common)
            first = urlsplit(plain)
            self._sub_factory = lambda: aioredis.Redis(
                host=first.hostname or "127.0.0.1", port=first.port or 6379,
                password=first.password, socket_connect_timeout=timeout_s)
        elif url.startswith("redis+sentinel://"):
            hosts, service, db, password = _sentinel_parts(url)
            # The store's timeouts and retry apply to the sentinels and the master alike.
            sentinel = self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                hosts, sentinel_kwargs=common, password=password, db=db, **common)
            self.client = sentinel.master_for(service)
            self._sub_factory = lambda: sentinel.master_for(service)
        else:
            self.client = aioredis.from_url(url, **common)
            self._sub_factory = lambda: aioredis.from_url(url, socket_connect_timeout=timeout_s)
        self.k_meta = f"{key_prefix}{{meta}}"
        self.k_policy = f"{key_prefix}{{meta}}:policy"
        self.k_keys = f"{key_prefix}{{meta}}:keys"
        self.k_used = f"{key_prefix}{{meta}}:last_used"
        self.channel = f"{key_prefix}events"
        self._admit: Any = self.client.register_script(_lua("admit.lua"))
        self._settle: Any = self.client.register_script(_lua("settle.lua"))
        self._cancel: Any = self.client.register_script(_lua("cancel.lua"))
        self._fast: PipelinedConnection | None = None
        if url.startswith(("redis://", "rediss://", "unix://")):
            # The per-request scripts go over one pipelined connection (docs/architecture.md §9).
            self._fast = PipelinedConnection(url, timeout_s)
            self._admit = _FastAdapter(FastScript(self._fast, _lua("admit.lua")))
            self._settle = _FastAdapter(FastScript(self._fast, _lua("settle.lua")))
            self._cancel = _FastAdapter(FastScript(self._fast, _lua("cancel.lua")))
        self._renew = self.client.register_script(_lua("renew.lua"))
        self._put_policy = self.client.register_script(_lua("put_policy.lua"))
        self._put_key = self.client.register_script(_lua("put_key.lua"))
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.round_trips = 0  # commands sent; tests count them per request

    async def _call(self, coro: Any, guard: bool = True,
                    decode: Callable[[Any], T] = _raw) -> T:
        """Run one store call and decode its reply; every failure becomes StoreError: no
        connection, a timeout, an error reply (READONLY, OOM, MASTERDOWN, CLUSTERDOWN,
        TRYAGAIN, NOREPLICAS, ...), anything else the client library raises, and a reply of
        the wrong shape. `guard` puts an overall deadline on the call (a few socket
        timeouts): redis-py's Cluster and Sentinel clients retry and rediscover on their own,
        and a request must never wait on that indefinitely. The pipelined connection has its
        own watchdog and needs none."""
        self.round_trips += 1
        try:
            if not guard:
                return decode(await coro)
            async with asyncio.timeout(self.timeout * 4 + 1.0):
                return decode(await coro)
        except StoreError:
            raise
        except ResponseError as exc:
            # The reply's first word names the condition; the rest may echo arguments.
            kind = str(exc).split(" ", 1)[0][:40] or type(exc).__name__
            raise StoreError(f"store error: {kind}") from exc
        except Exception as exc:
            raise StoreError(f"store unavailable: {type(exc).__name__}") from exc

    async def start(self) -> None:
        if self.cluster:
            await self._call(self.client.initialize())

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait(list(self._tasks))
        if self._fast is not None:
            await self._fast.close()
        try:
            async with asyncio.timeout(self.timeout * 2 + 1.0):
                await self.client.aclose()
        except _FAILURES:
            pass
        if self._sentinel is not None:  # its own connections to the sentinels
            try:
                await self._sentinel.aclose()
            except _FAILURES:
                pass

    async def ping(self) -> None:
        await self._call(self.client.ping())

    # keys ---------------------------------------------------------------------------------
    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._call(self.client.hget(self.k_keys, key_id),
                                decode=lambda raw: KeyRecord.from_json(raw) if raw else None)

    async def list_keys(self) -> list[KeyRecord]:
        return await self._call(self.client.hgetall(self.k_keys), decode=lambda raw: [
            KeyRecord.from_json(v) for v in raw.values()])

    async def put_key(self, rec: KeyRecord) -> int:
        epoch = await self._call(
            self._put_key(keys=[self.k_meta, self.k_keys], args=[rec.key_id, rec.to_json()]),
            decode=int)
        await self._call(self.client.publish(
            self.channel, json.dumps({"kind": "key", "key_id": rec.key_id, "epoch": epoch})))
        return epoch

    async def touch_keys(self, last_used: dict[str, float]) -> None:
        if last_used:
            await self._call(self.client.hset(
                self.k_used, mapping={k: repr(v) for k, v in last_used.items()}))

    async def last_used(self, key_ids: list[str]) -> dict[str, float]:
        if not key_ids:
            return {}
        return await self._call(self.client.hmget(self.k_used, key_ids), decode=lambda vals: {
            k: float(v) for k, v in zip(key_ids, vals, strict=True) if v is not None})

    # policy -------------------------------------------------------------------------------
    async def get_policy(self) -> StoredPolicy | None:
        def decode(raw: Any) -> StoredPolicy | None:
            if not raw:
                return None
            d = {k.decode(): v.decode() for k, v in raw.items()}
            return StoredPolicy(int(d["version"]), d["doc"], float(d["applied_at"]),
                                d["actor"])

        return await self._call(self.client.hgetall(self.k_policy), decode=decode)

    async def put_policy(self, doc: str, actor: str, expected_version: int | None = None) -> int:
        args = [doc, actor, repr(time.time()), "" if expected_version is None
                else str(expected_version)]
        ok, version = await self._call(
            self._put_policy(keys=[self.k_meta, self.k_policy], args=args),
            decode=lambda r: (int(r[0]), int(r[1])))
        if not ok:
            raise ValueError(f"policy changed meanwhile (version_conflict {version})")
        await self._call(self.client.publish(
            self.channel, json.dumps({"kind": "policy", "version": version})))
        return version

    async def versions(self) -> tuple[int, int]:
        return await self._call(
            self.client.hmget(self.k_meta, ["keys_epoch", "policy_version"]),
            decode=_two_ints)

    # events -------------------------------------------------------------------------------
    async def subscribe(self, handler: EventHandler) -> None:
        task = asyncio.create_task(self._listen(handler), name="store-subscriber")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, handler: EventHandler) -> None:
        backoff = 0.1
        while not self._closed and not cancelling():
            conn = self._sub_factory()
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
                except _FAILURES:
                    pass

    # limits -------------------------------------------------------------------------------
    def _subject_keys(self, s: Subject) -> list[str]:
        base = f"{self.prefix}{{r:{s.reseller}}}:{s.kind}:{s.ident}"
        return [f"{base}:{d}" for d in _DIMS]

    def _marker(self, subjects: tuple[Subject, ...], lease_id: str) -> str:
        """The admission marker (admit.lua): beside the subjects, on their shard."""
        return f"{self.prefix}{{r:{subjects[0].reseller}}}:adm:{lease_id}"

    def _admit_call(self, req: AdmitRequest) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [req.lease_id, req.lease_ttl_ms, req.input_tokens, req.output_tokens]
        for s in req.subjects:
            keys.extend(self._subject_keys(s))
            args.extend((s.rpm, s.itpm, s.otpm, s.concurrency))
        keys.append(self._marker(req.subjects, req.lease_id))
        return keys, args

    async def admit(self, req: AdmitRequest) -> AdmitResult:
        keys, args = self._admit_call(req)
        return await self._call(self._admit(keys=keys, args=args), guard=self._fast is None,
                                decode=lambda res: self._admit_result(req, res))

    @staticmethod
    def _admit_result(req: AdmitRequest, res: Any) -> AdmitResult:
        if int(res[0]) == 2:
            raise StoreError("admission cancelled before it ran")
        if int(res[0]) == 0:
            s = req.subjects[int(res[1]) - 1]
            dim = _DIMS[int(res[2]) - 1]
            failed = {dim: Bucket(int(res[4]), int(res[5]), float(res[6]))}
            return AdmitResult(False, dim, f"{s.kind}:{s.ident}", float(res[3]),
                               failed if dim != "concurrency" else {})
        buckets = {}
        for i, dim in enumerate(("rpm", "itpm", "otpm")):
            limit = int(res[1 + i * 3])
            if limit:
                buckets[dim] = Bucket(limit, int(res[2 + i * 3]), float(res[3 + i * 3]))
        return AdmitResult(True, buckets=buckets)

    async def cancel(self, req: AdmitRequest) -> None:
        keys, args = self._admit_call(req)
        await self._call(self._cancel(keys=keys, args=args), guard=self._fast is None)

    async def settle(self, st: Settlement) -> None:
        keys: list[str] = []
        args: list[Any] = [st.lease_id, int(WINDOW_MS)]
        for s in st.subjects:
            k = self._subject_keys(s)
            keys.extend((k[1], k[2], k[3]))
            din = st.input_actual - gcra_cost(s.itpm, st.input_reserved) if s.itpm else 0
            dout = st.output_actual - gcra_cost(s.otpm, st.output_reserved) if s.otpm else 0
            args.extend((s.itpm, s.otpm, din, dout))
        keys.append(self._marker(st.subjects, st.lease_id))
        await self._call(self._settle(keys=keys, args=args), guard=self._fast is None)

    async def renew_leases(
        self, leases: list[tuple[tuple[Subject, ...], str]], ttl_ms: int
    ) -> None:
        for subjects, lease_id in leases:
            keys = [self._subject_keys(s)[3] for s in subjects if s.concurrency]
            if keys:
                await self._call(self._renew(keys=keys, args=[lease_id, ttl_ms]))

    # audit stream -------------------------------------------------------------------------
    # One Stream key, `<prefix>audit` (one slot in Cluster), each entry one field `e`: the
    # event's JSON. Entry ids are the Redis server's clock; an event's `time` is its writer's,
    # so `since` reads back this much further and filters on `time`.
    _AUDIT_SKEW_S = 300.0
    _AUDIT_PAGE = 500

    async def append_audit(self, event: dict[str, Any]) -> None:
        await self._call(self.client.xadd(
            f"{self.prefix}audit", {"e": json.dumps(event, separators=(",", ":"))},
            maxlen=self.audit_maxlen, approximate=True))

    async def list_audit(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        low = "-" if since is None else str(max(0, int((since - self._AUDIT_SKEW_S) * 1000)))
        high = "+"
        out: list[dict[str, Any]] = []
        while len(out) < limit:
            page: list[tuple[bytes, dict[bytes, bytes]]] = await self._call(
                self.client.xrevrange(f"{self.prefix}audit", max=high, min=low,
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
