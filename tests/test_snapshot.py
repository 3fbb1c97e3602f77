"""Unit tests for gateway.snapshot: the config parts derived once per config version, and the
snapshot as one immutable value compared by identity."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from gateway.geo import open_geo
from gateway.identity import KeyRegistry
from gateway.settings import load_settings
from gateway.snapshot import Snapshot, build_config_parts
from gateway.store.memory import MemoryStore
from tests.support.gateway import ADMIN_TOKEN, UPSTREAM_KEY, write_config


def _config(tmp: Path) -> object:
    path = write_config(tmp, "http://127.0.0.1:9", customer={"id_header": "X-Cust-Id"},
                        upstream={"max_body_bytes": 4096})
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN, UPSTREAM_API_KEY=UPSTREAM_KEY)
    return load_settings(str(path), environ=env)


async def test_config_parts_are_derived_from_the_config(tmp_path: Path) -> None:
    """Header names, the body bound and the upstream session come from the config once."""
    config = _config(tmp_path)
    parts = build_config_parts(config)  # type: ignore[arg-type]
    try:
        assert parts.config is config
        assert parts.customer_id_header == "X-Cust-Id" and parts.max_body == 4096
        assert not parts.upstream.session.closed
    finally:
        await parts.upstream.close()


async def test_a_snapshot_is_replaced_never_changed(tmp_path: Path) -> None:
    """A snapshot's fields cannot be assigned; `replace` gives a new snapshot sharing the
    rest, and two snapshots of equal fields are still two (identity, not value)."""
    config = _config(tmp_path)
    parts = build_config_parts(config)  # type: ignore[arg-type]
    geo = open_geo(config.settings.geo, config.path)  # type: ignore[attr-defined]
    try:
        snap = Snapshot(parts, geo, KeyRegistry(MemoryStore()))
        with pytest.raises(dataclasses.FrozenInstanceError):
            snap.policy = None  # type: ignore[misc]
        other = dataclasses.replace(snap)
        assert other is not snap and other != snap
        assert (other.parts, other.geo, other.registry) == (snap.parts, snap.geo, snap.registry)
        assert len({snap, other}) == 2
    finally:
        await parts.upstream.close()
        geo.close()
