"""Unit tests for gateway.status: readiness from a snapshot and the store's health, the geo
and store gauges, and the geo cache tallies moved into their counter once."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway import metrics
from gateway.geo import open_geo
from gateway.identity import KeyRegistry
from gateway.limits import Limits
from gateway.policy import compile_policy, validate_policy
from gateway.settings import load_settings
from gateway.snapshot import Snapshot, build_config_parts
from gateway.status import CacheTallies, publish_gauges, readiness
from gateway.store.memory import MemoryStore
from tests.support.gateway import ADMIN_TOKEN, DEFAULT_POLICY, UPSTREAM_KEY, write_config


@asynccontextmanager
async def _snapshot(tmp: Path, on_error: str) -> AsyncIterator[tuple[Snapshot, Limits]]:
    """A snapshot with the default policy as version 3, and the limits of an embedded store."""
    path = write_config(tmp, "http://127.0.0.1:9", store={"on_error": on_error})
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN, UPSTREAM_API_KEY=UPSTREAM_KEY)
    config = load_settings(str(path), environ=env)
    store = MemoryStore()
    geo = open_geo(config.settings.geo, config.path)
    policy = compile_policy(validate_policy(DEFAULT_POLICY, "test"), 3)
    snap = Snapshot(build_config_parts(config), geo, KeyRegistry(store), policy)
    try:
        yield snap, Limits(store, on_error, 1, "auto")
    finally:
        await snap.parts.upstream.close()
        geo.close()


async def test_ready_with_a_policy_and_the_store_up(tmp_path: Path) -> None:
    """With a policy, geo databases and the store up: ready, every check listed."""
    async with _snapshot(tmp_path, "closed") as (snap, limits):
        ready, body = readiness(snap, limits, draining=False)
        assert ready is True and body["status"] == "ready" and body["degraded"] == []
        assert body["checks"]["policy"] == {"version": 3} and body["checks"]["store"] == "ok"


async def test_not_ready_without_a_policy(tmp_path: Path) -> None:
    """No policy loaded yet: not ready."""
    async with _snapshot(tmp_path, "closed") as (snap, limits):
        ready, body = readiness(dataclasses.replace(snap, policy=None), limits, False)
        assert (ready, body["status"]) == (False, "not_ready")


@pytest.mark.parametrize(("on_error", "ready", "status"), [
    ("closed", False, "not_ready"), ("open", True, "degraded")])
async def test_store_away_follows_on_error(tmp_path: Path, on_error: str, ready: bool,
                                           status: str) -> None:
    """The store away is not ready with `on_error: closed`, degraded with `open`."""
    async with _snapshot(tmp_path, on_error) as (snap, limits):
        limits.store_ok = False
        got, body = readiness(snap, limits, False)
        assert (got, body["status"], body["checks"]["store"]) == (ready, status, "unreachable")
        assert body["degraded"] == (["store"] if status == "degraded" else [])


async def test_draining_is_never_ready(tmp_path: Path) -> None:
    """Once shutdown has begun the instance reports draining, not ready."""
    async with _snapshot(tmp_path, "closed") as (snap, limits):
        assert readiness(snap, limits, draining=True)[:1] == (False,)
        assert readiness(snap, limits, draining=True)[1]["status"] == "draining"


async def test_gauges_follow_the_geo_databases_and_the_store(tmp_path: Path) -> None:
    """Each open geo database's build epoch is published, and the store gauge follows
    whether the store is up."""
    async with _snapshot(tmp_path, "closed") as (snap, limits):
        limits.store_ok = False
        publish_gauges(snap, limits)
        epoch = snap.geo.build_epochs()["country"]
        assert metrics.GEO_EPOCH.labels("country")._value.get() == epoch
        assert metrics.STORE_UP._value.get() == 0
        limits.store_ok = True
        publish_gauges(snap, limits)
        assert metrics.STORE_UP._value.get() == 1


async def test_cache_tallies_move_each_lookup_once(tmp_path: Path) -> None:
    """Hits and misses since the last publish are added to gateway_cache_lookups_total; a
    second publish with no new lookups adds nothing."""
    async with _snapshot(tmp_path, "closed") as (snap, _):
        counter = metrics.child(metrics.CACHE, "geo", "miss")
        tallies = CacheTallies()
        before = counter._value.get()
        snap.geo.lookup("192.0.2.200")
        snap.geo.lookup("192.0.2.201")
        tallies.publish(snap.geo)
        assert counter._value.get() == before + 2
        tallies.publish(snap.geo)
        assert counter._value.get() == before + 2
