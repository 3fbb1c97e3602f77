"""Unit tests for gateway.app: the GatewayService of an in-process gateway starts ready, runs
its background loops as cleanup contexts of the proxy application, swaps one snapshot on
reload and closes what the reload retired."""

from __future__ import annotations

from pathlib import Path

from gateway.admin import AdminBackend
from tests.support.gateway import poll, running_gateway
from tests.support.upstream import FakeUpstream


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
    """The sync, geo, flush and metrics loops run from start to stop, and end with it."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        tasks = list(gw.service.loops.tasks)
        assert sorted(t.get_name() for t in tasks) == [
            "geo-reload", "last-used-flush", "metrics-flush", "store-sync"]
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


async def test_the_service_is_the_admin_backend(tmp_path: Path, upstream: FakeUpstream) -> None:
    """GatewayService offers what the admin API's AdminBackend protocol asks for."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        backend: AdminBackend = gw.service
        assert backend.pipeline is gw.service.pipeline
        assert backend.config.secrets.admin_token
        assert backend.readiness()[0] is True
        backend.publish_metrics()  # moves the tallies; must not fail on a running service
