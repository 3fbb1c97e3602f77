"""Unit tests for gateway.app: the GatewayService of an in-process gateway starts ready, runs
its background loops as cleanup contexts of the proxy application, swaps one snapshot on
reload and closes what the reload retired."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from gateway.admin import AdminBackend
from tests.support.gateway import poll, running_gateway, write_config
from tests.support.upstream import FakeUpstream

OPEN_POLICY: dict[str, Any] = {"version": 1, "default_action": "allow", "rules": [],
                               "resellers": {"direct": {"status": "active"}}}
STREAM = {"model": "claude-test-1", "max_tokens": 64, "stream": True,
          "messages": [{"role": "user", "content": "hi"}]}


async def test_a_started_service_is_ready_with_every_check(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    """After start: ready, the policy file loaded as version 1, the store and geo checks ok."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        ready, body = gw.service.readiness()
        assert ready is True
        assert body["status"] == "ready" and body["degraded"] == []
        assert body["checks"]["store"] == "ok"
        assert body["checks"]["policy"] == {"version": 1}
        assert set(body["checks"]["geo"]) == {"country", "asn", "anonymous_ip"}
        assert gw.service.policy_version == 1
        assert gw.service.proxy_port and gw.service.admin_port != gw.service.proxy_port


async def test_background_loops_run_while_the_service_runs(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    """The sync, geo, flush, metrics and usage-flush loops run from start to stop, and end
    with it."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        tasks = list(gw.service.loops.tasks)
        assert sorted(t.get_name() for t in tasks) == [
            "geo-reload", "last-used-flush", "metrics-flush", "store-sync", "usage-flush"]
        assert not any(t.done() for t in tasks)
    assert gw.service.loops.tasks == []
    assert all(t.done() for t in tasks)


async def test_reload_swaps_one_snapshot_and_keeps_the_policy(tmp_path: Path,
                                                              upstream: FakeUpstream) -> None:
    """A reload installs new config parts in a new snapshot that keeps the live policy and
    registry; the old upstream session, no longer used, is closed."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        before = gw.service.pipeline.snapshot
        assert await gw.service.reload()
        after = gw.service.pipeline.snapshot
        assert after is not before and after.parts is not before.parts
        assert after.policy is before.policy and after.registry is before.registry
        assert after.geo is before.geo  # geo settings unchanged: the same resolver
        assert gw.service.config is after.parts.config
        await poll(lambda: before.parts.upstream.session.closed)
        assert not after.parts.upstream.session.closed


async def test_a_replaced_geo_resolver_closes_after_the_requests_using_it(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A reload that changes the geo settings swaps in a new resolver; the old one stays open
    while a request that read the old snapshot runs, and is closed once it has ended."""
    upstream.hold_stream = asyncio.Event()
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY) as gw, \
            aiohttp.ClientSession() as s:
        _, key = await gw.issue_key("direct")
        old_geo = gw.service.geo

        async def stream() -> tuple[int, bytes]:
            async with s.post(gw.url + "/v1/messages", json=STREAM,
                              headers={"x-api-key": key}) as r:
                return r.status, await r.read()

        task = asyncio.create_task(stream())
        await poll(lambda: upstream.first_event_sent.is_set())
        write_config(tmp_path, upstream.url, OPEN_POLICY, geo={"cache_size": 7})
        assert await gw.service.reload()
        assert gw.service.geo is not old_geo
        assert not old_geo.dbs["country"].reader.closed
        upstream.hold_stream.set()
        status, _ = await task
        assert status == 200
        await poll(lambda: old_geo.dbs["country"].reader.closed)
        assert not gw.service.geo.dbs["country"].reader.closed


async def test_the_service_is_the_admin_backend(tmp_path: Path, upstream: FakeUpstream) -> None:
    """GatewayService offers what the admin API's AdminBackend protocol asks for."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        backend: AdminBackend = gw.service
        assert backend.pipeline is gw.service.pipeline
        assert backend.config.secrets.admin_token
        assert backend.readiness()[0] is True
        backend.publish_metrics()  # moves the tallies; must not fail on a running service
