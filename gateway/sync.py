"""Keeps the pipeline's snapshot in step with the store: the full sync at start, change events,
the version check of the sync loop, the restore of a store that lost its data, and the policy
file (seeded, applied, compared with the live policy) (docs/architecture.md §2, §10)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from typing import Any

from gateway import metrics
from gateway.audit import record_audit, record_policy_applied
from gateway.errors import StoreError
from gateway.identity import KeyRegistry
from gateway.limits import Limits
from gateway.log import logger
from gateway.pipeline import Pipeline
from gateway.policy import (
    PolicyDoc,
    canonical,
    compile_stored,
    load_policy_file,
    require_databases,
    validate_policy,
)
from gateway.settings import ConfigError, LoadedConfig
from gateway.status import publish_store_up
from gateway.store.base import Store, StoredPolicy


def stored_json(stored: StoredPolicy) -> str:
    """A stored policy in today's canonical form (the stored text if it no longer validates),
    to compare with a file's."""
    try:
        return canonical(validate_policy(json.loads(stored.doc), "store"))
    except (ConfigError, ValueError):
        return stored.doc


class SnapshotSync:
    """Follows the store for one pipeline: installs each new policy version and key change by
    swapping the pipeline's snapshot, and writes the snapshot back to a store that lost it."""

    def __init__(self, pipeline: Pipeline, store: Store, limits: Limits) -> None:
        self.pipeline = pipeline
        self.store = store
        self.limits = limits
        #: whether a full sync has completed (until then the version check does one)
        self.synced = False
        self._policy_json = ""
        # Canonical JSON of the live policy and of `policy_file` as last read (None: no file,
        # or an invalid one): what `policy_file_differs` compares.
        self._live_json: str | None = None
        self._file_json: str | None = None
        self._lock = asyncio.Lock()

    @property
    def config(self) -> LoadedConfig:
        """The config in force (that of the current snapshot)."""
        return self.pipeline.snapshot.parts.config

    @property
    def registry(self) -> KeyRegistry:
        return self.pipeline.snapshot.registry

    @property
    def policy_version(self) -> int | None:
        p = self.pipeline.snapshot.policy
        return p.version if p else None

    async def full_sync(self, seed: bool = False) -> None:
        """Load the policy and every key; with `seed`, first seed an empty store from
        `policy_file` (or apply it, with `policy_source: file`)."""
        stored = await self.store.get_policy()
        s = self.config.settings
        file_doc: PolicyDoc | None = None
        file_error: str | None = None
        if seed and s.policy_file:
            if stored is None or s.policy_source == "file":
                file_doc = load_policy_file(s.policy_file)  # needed: an error stops the start
            else:
                try:
                    file_doc = load_policy_file(s.policy_file)
                except ConfigError as exc:
                    file_error = str(exc)
            self._file_json = canonical(file_doc) if file_doc is not None else None
            if stored is None or (s.policy_source == "file"
                                  and stored_json(stored) != self._file_json):
                assert file_doc is not None
                await self.apply_policy_file(file_doc, stored is None)
                stored = await self.store.get_policy()
        if stored is not None:
            self.install_policy(stored.version, stored.doc)
        await self.registry.load_all()
        self.synced = True
        if seed:
            self.report_policy_file(file_error)

    async def apply_policy_file(self, doc: PolicyDoc, seeding: bool) -> None:
        """Write `policy_file`'s policy to the store as a new version, audited (`seed:<host>`
        into an empty store with `policy_source: store`, else `file:<host>`); when another
        instance wrote a version meanwhile, compare against that one and try again."""
        s = self.config.settings
        # A file that needs a database this config lacks is refused before it reaches the store
        # (ConfigError), so no instance is handed a policy it must reject.
        require_databases(doc, s.geo, s.policy_file or "")
        text = canonical(doc)
        source = s.policy_source
        actor = ("seed:" if seeding and source == "store" else "file:") + socket.gethostname()
        for _ in range(3):
            before = await self.store.get_policy()
            if before is not None and (source == "store" or stored_json(before) == text):
                return  # seeded by another instance, or the file's policy is live already
            try:
                version = await self.store.put_policy(text, actor,
                                                      before.version if before else 0)
            except ValueError:
                continue  # another instance wrote a version first
            await record_policy_applied(self.store, actor, version,
                                        before.doc if before else None, text)
            self.install_policy(version, text)
            return

    async def sync_policy_file(self, doc: PolicyDoc | None, error: str | None) -> None:
        """SIGHUP: with `policy_source: file` apply a changed file; either way report whether
        the file and the live policy differ."""
        s = self.config.settings
        self._file_json = canonical(doc) if doc is not None else None
        if doc is not None and s.policy_source == "file":
            try:
                stored = await self.store.get_policy()
                if stored is None or stored_json(stored) != self._file_json:
                    await self.apply_policy_file(doc, False)
            except StoreError as exc:
                error = f"not applied: store unavailable ({exc})"
                logger().error("config_reload_failed", path=s.policy_file, reason=error)
            except ConfigError as exc:
                error = f"not applied: {exc}"
                logger().error("config_reload_failed", path=s.policy_file, reason=error)
        self.report_policy_file(error)

    def report_policy_file(self, error: str | None) -> None:
        """At start and on SIGHUP: warn `policy_file_differs` when `policy_file` (canonical
        JSON) is not the live policy; gateway_policy_file_differs follows it."""
        s = self.config.settings
        differs = s.policy_file is not None and (error is not None or (
            self._file_json is not None and self._live_json != self._file_json))
        metrics.POLICY_FILE_DIFFERS.set(1 if differs else 0)
        if differs:
            logger().warning(
                "policy_file_differs", file=s.policy_file, live_version=self.policy_version,
                policy_source=s.policy_source,
                reason=error or (
                    "the store's policy is live and differs from the file; `gateway policy "
                    "apply` the file to make it live" if s.policy_source == "store" else
                    "the file could not be applied (other instances kept writing versions)"))

    def install_policy(self, version: int, doc_json: str) -> None:
        """Make a stored policy version live (one snapshot swap); one that does not validate,
        or needs a geo database this config lacks, is logged `policy_rejected` and the policy
        in force stays."""
        snap = self.pipeline.snapshot
        current = snap.policy
        if current is not None and current.version == version and doc_json == self._policy_json:
            return
        try:
            # A rule on a database this gateway lacks would never fire: refuse the policy and
            # keep the one in force.
            compiled = compile_stored(doc_json, version, f"store policy v{version}",
                                      snap.parts.config.settings.geo)
        except (ConfigError, ValueError) as exc:
            logger().error("policy_rejected", version=version, reason=str(exc))
            return
        doc = compiled.doc
        # No await since `snap` was read: nothing else swapped the snapshot meanwhile.
        self.pipeline.snapshot = dataclasses.replace(snap, policy=compiled)
        self._policy_json = doc_json
        self._live_json = canonical(doc)
        metrics.POLICY_VERSION.set(version)
        if self._file_json is not None:
            metrics.POLICY_FILE_DIFFERS.set(1 if self._live_json != self._file_json else 0)
        logger().info("policy_loaded", version=version, rules=len(doc.rules),
                      resellers=len(doc.resellers))

    async def on_event(self, event: dict[str, Any]) -> None:
        """A change event from the store's channel (a key, the policy, or a resubscription)."""
        try:
            kind = event.get("kind")
            if kind == "key" and isinstance(event.get("key_id"), str):
                await self.registry.refresh(event["key_id"])
                if event.get("epoch") == self.registry.epoch + 1:
                    self.registry.epoch += 1
            elif kind == "policy":
                stored = await self.store.get_policy()
                if stored is not None:
                    self.install_policy(stored.version, stored.doc)
            elif kind == "resync":
                await self.check_versions()
        except StoreError:
            self.limits.mark_store(False)

    async def check_versions(self) -> None:
        """Compare the store's version pair with this instance's and catch up (or restore)."""
        # The sync loop and a subscriber reconnect may both ask; one check at a time, so a
        # store restoration is done once.
        async with self._lock:
            await self._check_versions_locked()

    async def _check_versions_locked(self) -> None:
        keys_epoch, policy_version = await self.store.versions()
        if not self.synced:
            await self.full_sync(seed=True)
            return
        if keys_epoch < self.registry.epoch or (
                policy_version == 0 and self.pipeline.snapshot.policy is not None):
            await self.restore_store(keys_epoch, policy_version)
            return
        if keys_epoch != self.registry.epoch:
            await self.registry.load_all()
        if policy_version and policy_version != self.policy_version:
            stored = await self.store.get_policy()
            if stored is not None:
                self.install_policy(stored.version, stored.doc)

    async def restore_store(self, keys_epoch: int, policy_version: int) -> None:
        """The store came back with less than this instance knows (a Redis restarted without
        persistence, a failover to a stale replica): write the snapshots back rather than
        refuse every key. Revoked keys are written back revoked."""
        logger().error("store_data_lost", keys_epoch=keys_epoch,
                       known_keys_epoch=self.registry.epoch,
                       policy_version=policy_version, known_policy_version=self.policy_version)
        actor = "restore:" + socket.gethostname()
        policy = self.pipeline.snapshot.policy
        if policy_version == 0 and policy is not None:
            try:
                await self.store.put_policy(canonical(policy.doc), actor, 0)
            except ValueError:
                pass  # another instance restored it first
        present = {r.key_id for r in await self.store.list_keys()}
        restored = 0
        for rec in list(self.registry.keys.values()):
            if rec.key_id not in present:
                await self.store.put_key(rec)
                restored += 1
        await record_audit(self.store, actor, "store_restored", "store", keys=restored,
                           policy_restored=policy_version == 0 and policy is not None)
        await self.registry.load_all()
        stored = await self.store.get_policy()
        if stored is not None:
            self.install_policy(stored.version, stored.doc)

    async def sync_step(self) -> None:
        """One round of the sync loop: the safety net for lost events, and the store health
        signal for /readyz."""
        try:
            await self.check_versions()
            self.limits.mark_store(True)
        except StoreError:
            self.limits.store_errors += 1
            self.limits.mark_store(False)
        except ConfigError as exc:
            logger().error("policy_rejected", reason=str(exc))
        publish_store_up(self.limits)
