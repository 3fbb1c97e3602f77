"""The pooled transport: redis.asyncio's client (single node, Sentinel or Cluster) as a
ScriptRunner, and the guarded call the store's plain commands go through."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterCrossSlotError,
    ClusterDownError,
    ExecAbortError,
    MasterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from gateway.errors import StoreError
from gateway.store.redis.runner import Script, error_reply, unavailable

FAILURES = (RedisError, OSError, asyncio.TimeoutError)
# redis-py turns these error replies into their own exception classes, and drops the reply's
# first word from the message of those and of ERR replies: the kind is named by that word
# here, as the pipelined transport names it (codes are upper case, ERR's text is not).
_KINDS: dict[type[ResponseError], str] = {
    ClusterCrossSlotError: "CROSSSLOT",
    ClusterDownError: "CLUSTERDOWN", ExecAbortError: "EXECABORT",
    MasterDownError: "MASTERDOWN", NoPermissionError: "NOPERM", NoScriptError: "NOSCRIPT",
    OutOfMemoryError: "OOM", ReadOnlyError: "READONLY", TryAgainError: "TRYAGAIN",
}
T = TypeVar("T")


def _raw(reply: Any) -> Any:
    return reply


def sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """Sentinel hosts (port 26379 by default), service name, db and password of a
    `redis+sentinel://[:password@]host[:port][,host...]/service[/db]` URL."""
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


class PooledRunner:
    """redis.asyncio's pooled client for `redis://`, `rediss://`, `unix://`,
    `redis+sentinel://` and `redis+cluster://` URLs.

    Every call has an overall deadline (a few socket timeouts): redis-py's Cluster and
    Sentinel clients retry and rediscover on their own, and a request must never wait on
    that indefinitely."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout = timeout_s
        self.cluster = url.startswith("redis+cluster://")
        common: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 1),
        }
        self.client: Any
        self._subscriber: Callable[[], Any]
        self._sentinel: Sentinel | None = None
        if self.cluster:
            plain = "redis://" + url[len("redis+cluster://"):]
            self.client = RedisCluster.from_url(plain, **common)
            first = urlsplit(plain)
            self._subscriber = lambda: aioredis.Redis(
                host=first.hostname or "127.0.0.1", port=first.port or 6379,
                password=first.password, socket_connect_timeout=timeout_s)
        elif url.startswith("redis+sentinel://"):
            hosts, service, db, password = sentinel_parts(url)
            # The store's timeouts and retry apply to the sentinels and the master alike.
            sentinel = self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                hosts, sentinel_kwargs=common, password=password, db=db, **common)
            self.client = sentinel.master_for(service)
            self._subscriber = lambda: sentinel.master_for(service)
        else:
            self.client = aioredis.from_url(url, **common)
            self._subscriber = lambda: aioredis.from_url(url, socket_connect_timeout=timeout_s)
        self._scripts: dict[str, Any] = {}  # sha → redis-py's Script (EVALSHA, NOSCRIPT reload)

    async def call(self, awaitable: Awaitable[Any], decode: Callable[[Any], T] = _raw) -> T:
        """Await one client call within the deadline and decode its reply; every failure is
        a StoreError: no connection, a timeout, an error reply (READONLY, OOM, MASTERDOWN,
        CLUSTERDOWN, TRYAGAIN, NOREPLICAS, ...), anything else the client library raises, and
        a reply that `decode` refuses."""
        try:
            async with asyncio.timeout(self.timeout * 4 + 1.0):
                return decode(await awaitable)
        except StoreError:
            raise
        except ResponseError as exc:
            kind = _KINDS.get(type(exc))
            if kind is None:
                word = str(exc).split(" ", 1)[0]
                kind = word if word.isupper() else "ERR"
            raise error_reply(kind) from exc
        except Exception as exc:
            raise unavailable(exc) from exc

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        registered = self._scripts.get(script.sha)
        if registered is None:
            registered = self._scripts[script.sha] = self.client.register_script(script.source)
        return await self.call(registered(keys=keys, args=args))

    def before_flush(self, producer: Callable[[], None]) -> bool:
        return False  # every call is its own request on a pooled connection

    def submit(self, script: Script, keys: Sequence[str], args: Sequence[Any],
               done: Callable[[Any, BaseException | None], None]) -> bool:
        return False

    def subscriber(self) -> Any:
        """A new client of its own for one pub/sub subscription (closed by its user)."""
        return self._subscriber()

    async def start(self) -> None:
        """Discover a Cluster's slots (nothing to do for the other deployments)."""
        if self.cluster:
            await self.call(self.client.initialize())

    async def close(self) -> None:
        try:
            async with asyncio.timeout(self.timeout * 2 + 1.0):
                await self.client.aclose()
        except FAILURES:
            pass
        if self._sentinel is not None:  # its own connections to the sentinels
            try:
                await self._sentinel.aclose()
            except FAILURES:
                pass
