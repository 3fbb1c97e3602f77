"""The test infrastructure itself: the redis-server, Redis Cluster and Sentinel helpers of
tests/support/redis_server.py."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
from redis.crc import key_slot

from tests.support.redis_server import (
    RedisCluster,
    RedisSentinel,
    RedisServer,
    free_cluster_port,
    free_port,
)

# --- Redis ---


async def test_redis_server_kill_and_restart(redis_server: RedisServer) -> None:
    """A RedisServer answers PING, fails after kill() and comes back on the same port."""
    port = redis_server.port
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        assert await client.ping()
        await client.set("k", "v")
        redis_server.kill()
        assert not redis_server.running
        with pytest.raises(redis.ConnectionError):
            await client.ping()
        redis_server.restart()
        assert redis_server.port == port
        assert await client.ping()
        assert await client.get("k") is None  # nothing persisted
    finally:
        await client.aclose()


def test_redis_server_stop_and_url() -> None:
    """stop() ends the process; url names the chosen port on 127.0.0.1."""
    server = RedisServer()
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    with server:
        assert server.ping()
    assert not server.running
    assert not server.ping()


def test_missing_redis_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-server on PATH, start() raises a RuntimeError naming the binary."""
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="redis-server not found"):
        RedisServer().start()


def test_free_port_is_bindable() -> None:
    """free_port() and free_cluster_port() return usable port numbers."""
    assert 1024 <= free_port() <= 65535
    assert free_cluster_port() + 10000 <= 65535


async def test_redis_server_session(redis_server_session: RedisServer) -> None:
    """The session-scoped server answers PING."""
    client = redis.asyncio.Redis.from_url(redis_server_session.url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def _exercise_cluster(cluster: RedisCluster) -> None:
    host, port = cluster.nodes[0]
    client = redis.asyncio.cluster.RedisCluster(host=host, port=port)
    try:
        keys = [f"test_support:{name}" for name in ("a", "b", "c", "d", "e", "f")]
        assert len({key_slot(key.encode()) for key in keys}) > 1
        for key in keys:
            await client.set(key, key.upper())
        assert [await client.get(key) for key in keys] == [key.upper().encode() for key in keys]
        owners = {getattr(client.get_node_from_key(key), "port", None) for key in keys}
        assert len(owners) > 1  # the keys really live on different shards
    finally:
        await client.aclose()


async def test_redis_cluster(redis_cluster: RedisCluster) -> None:
    """The cluster is ok on every node and a cluster client reads and writes across slots."""
    assert redis_cluster.url == f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0][1]}"
    assert len(redis_cluster.nodes) == 3
    for host, port in redis_cluster.nodes:
        with redis.Redis(host=host, port=port) as node:
            assert node.cluster("INFO")["cluster_state"] == "ok"
    await _exercise_cluster(redis_cluster)


async def test_redis_cluster_without_redis_cli() -> None:
    """The cluster also forms through CLUSTER ADDSLOTSRANGE and MEET alone."""
    with RedisCluster(use_redis_cli=False) as cluster:
        await _exercise_cluster(cluster)


async def test_redis_sentinel() -> None:
    """The sentinel reports its master, a Sentinel client writes through it, and stop()
    leaves neither process nor directory behind."""
    with RedisSentinel() as pair:
        assert pair.url == f"redis+sentinel://127.0.0.1:{pair.sentinel_port}/gwmaster/0"
        sentinel = redis.asyncio.sentinel.Sentinel([(pair.host, pair.sentinel_port)])
        try:
            assert await sentinel.discover_master("gwmaster") == (
                pair.master.host, pair.master.port)
            client = sentinel.master_for("gwmaster")
            try:
                await client.set("test_support:sentinel", "ok")
            finally:
                await client.aclose()
        finally:
            await sentinel.aclose()
        with redis.Redis(host=pair.master.host, port=pair.master.port) as master:
            assert master.get("test_support:sentinel") == b"ok"
        processes = [pair.master._process, pair._sentinel._process]
        directories = [pair.master.directory, pair._sentinel.directory]
    assert all(p is not None and p.poll() is not None for p in processes)
    assert not any(d.exists() for d in directories)
    assert not pair.running
