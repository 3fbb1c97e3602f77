"""Unit tests for gateway.sync: SnapshotSync over a real embedded store installs policies by
swapping the pipeline's snapshot whole, follows key events, seeds from the policy file, and
writes its snapshot back to a store that lost it."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from gateway.geo import open_geo
from gateway.identity import KeyRegistry
from gateway.limits import Limits
from gateway.pipeline import Pipeline
from gateway.policy import canonical, validate_policy
from gateway.request_log import configure_logging, set_log_stream
from gateway.settings import load_settings
from gateway.snapshot import Snapshot, build_config_parts
from gateway.store.base import KeyRecord
from gateway.store.memory import MemoryStore
from gateway.sync import SnapshotSync
from tests.support.gateway import (
    ADMIN_TOKEN,
    DEFAULT_POLICY,
    UPSTREAM_KEY,
    LogCapture,
    poll,
    running_gateway,
    write_config,
)
from tests.support.upstream import FakeUpstream


@asynccontextmanager
async def _sync(tmp: Path, **sections: object) -> AsyncIterator[tuple[SnapshotSync, LogCapture]]:
    """A SnapshotSync over a fresh embedded store, for a pipeline built from a test config."""
    path = write_config(tmp, "http://127.0.0.1:9", **sections)
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN, UPSTREAM_API_KEY=UPSTREAM_KEY)
    config = load_settings(str(path), environ=env)
    logs = LogCapture()
    set_log_stream(logs)
    configure_logging("info", "json")
    store = MemoryStore()
    await store.start()
    geo = open_geo(config.settings.geo, config.path)
    limits = Limits(store, "closed", 1, "auto")
    pipeline = Pipeline(Snapshot(build_config_parts(config), geo, KeyRegistry(store)), limits)
    try:
        yield SnapshotSync(pipeline, store, limits), logs
    finally:
        set_log_stream(None)
        configure_logging("info", "json")  # back to stdout
        await pipeline.snapshot.parts.upstream.close()
        await store.close()
        geo.close()


def _doc(policy: dict[str, object]) -> str:
    return canonical(validate_policy(policy, "test"))


async def test_full_sync_seeds_an_empty_store_from_the_policy_file(tmp_path: Path) -> None:
    """Into an empty store the policy file goes as version 1 (audited `seed:<host>`), and
    becomes the live policy with the store's keys loaded."""
    async with _sync(tmp_path) as (sync, _):
        await sync.store.put_key(KeyRecord("k1", "direct", "h" * 64))
        await sync.full_sync(seed=True)
        assert sync.synced and sync.policy_version == 1
        stored = await sync.store.get_policy()
        assert stored is not None and stored.actor.startswith("seed:")
        assert set(sync.registry.keys) == {"k1"}


async def test_a_new_policy_is_one_snapshot_swap(tmp_path: Path) -> None:
    """Installing a version replaces the snapshot with a new one sharing the config parts,
    geo and registry; a request holding the old snapshot keeps the old policy."""
    async with _sync(tmp_path) as (sync, logs):
        await sync.full_sync(seed=True)
        before = sync.pipeline.snapshot
        version = await sync.store.put_policy(_doc({**DEFAULT_POLICY, "default_action": "deny"}),
                                              "test")
        sync.install_policy(version, (await sync.store.get_policy()).doc)  # type: ignore[union-attr]
        after = sync.pipeline.snapshot
        assert after is not before
        assert (after.parts, after.geo, after.registry) == (before.parts, before.geo,
                                                            before.registry)
        assert after.policy is not None and after.policy.version == version == 2
        assert before.policy is not None and before.policy.version == 1
        assert logs.events("policy_loaded")[-1]["version"] == 2


async def test_a_policy_that_does_not_validate_is_rejected_and_the_live_one_stays(
        tmp_path: Path) -> None:
    """A stored version that fails validation is logged `policy_rejected`; the snapshot in
    force is not replaced."""
    async with _sync(tmp_path) as (sync, logs):
        await sync.full_sync(seed=True)
        before = sync.pipeline.snapshot
        sync.install_policy(7, json.dumps({"rules": "not a list"}))
        assert sync.pipeline.snapshot is before and sync.policy_version == 1
        [rejected] = logs.events("policy_rejected")
        assert rejected["version"] == 7


async def test_key_events_refresh_the_registry(tmp_path: Path) -> None:
    """A key change event reloads that key, so a revocation reaches the snapshot's registry."""
    async with _sync(tmp_path) as (sync, _):
        await sync.full_sync(seed=True)
        await sync.store.put_key(KeyRecord("k2", "direct", "h" * 64))
        await sync.on_event({"kind": "key", "key_id": "k2"})
        assert sync.registry.keys["k2"].status == "active"
        await sync.store.put_key(KeyRecord("k2", "direct", "h" * 64, status="revoked"))
        await sync.on_event({"kind": "key", "key_id": "k2"})
        assert sync.registry.keys["k2"].status == "revoked"


async def test_a_store_that_lost_its_data_gets_the_snapshot_back(tmp_path: Path) -> None:
    """When the version check finds the store behind this instance (emptied), the policy and
    every key, revoked ones revoked, are written back, audited `store_restored`."""
    async with _sync(tmp_path) as (sync, logs):
        await sync.store.put_key(KeyRecord("k3", "direct", "h" * 64))
        await sync.store.put_key(KeyRecord("k4", "direct", "h" * 64, status="revoked"))
        await sync.full_sync(seed=True)
        emptied = MemoryStore()  # the same store come back without its data
        await emptied.start()
        sync.store = sync.registry.store = emptied
        try:
            await sync.sync_step()
            assert logs.events("store_data_lost")
            assert {r.key_id: r.status for r in await emptied.list_keys()} == {
                "k3": "active", "k4": "revoked"}
            stored = await emptied.get_policy()
            assert stored is not None and stored.actor.startswith("restore:")
            assert sync.limits.store_ok and sync.policy_version == stored.version
            [restored] = [e for e in await emptied.list_audit(None, 10)
                          if e["action"] == "store_restored"]
            assert restored["keys"] == 2
        finally:
            await emptied.close()


async def test_a_policy_file_unlike_the_live_policy_is_reported(tmp_path: Path) -> None:
    """With `policy_source: store`, a policy file that differs from the stored policy is
    warned `policy_file_differs` at start; the store's policy stays live."""
    async with _sync(tmp_path) as (sync, logs):
        await sync.store.put_policy(_doc({**DEFAULT_POLICY, "default_action": "deny"}), "other")
        await sync.full_sync(seed=True)
        assert sync.policy_version == 1
        [differs] = logs.events("policy_file_differs")
        assert differs["live_version"] == 1 and differs["policy_source"] == "store"


async def test_a_policy_stored_by_another_instance_becomes_live(tmp_path: Path,
                                                                upstream: FakeUpstream) -> None:
    """In a running gateway, a policy version written to the store is picked up as the live
    version (through the change event) and shown by /readyz."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        version = await gw.service.store.put_policy(
            json.dumps(DEFAULT_POLICY), "other-instance")
        assert version == 2
        await poll(lambda: gw.service.policy_version == 2)
        assert gw.service.readiness()[1]["checks"]["policy"] == {"version": 2}
