"""The embedded store with a state file (`store.url: memory:///path/state.json`): keys, the
policy and the audit stream survive a restart; a corrupt or unwritable file is a startup error;
plain `memory://` says at startup that its state is ephemeral."""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.settings import ConfigError, load_settings
from gateway.store.base import KeyRecord
from gateway.store.memory import MemoryStore, StateFileError
from tests.support.cli import cli, cli_env, code_of, send
from tests.support.gateway import DEFAULT_POLICY, running_gateway, write_config
from tests.support.upstream import FakeUpstream

EDITED = copy.deepcopy(DEFAULT_POLICY)
EDITED["rules"] = [{"id": "no-fr", "action": "deny", "reason": "no_fr",
                    "match": {"country": ["FR"]}}, *EDITED["rules"]]


def _url(path: Path) -> str:
    return f"memory://{path}"


async def test_keys_and_policy_survive_a_restart_on_the_same_state_file(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A key issued, a key revoked and a policy applied before a restart on the same state file
    are there after it: the key authenticates, the revoked one stays revoked, the policy
    version is kept, and the audit trail still lists the changes."""
    state = tmp_path / "state.json"
    store = {"url": _url(state)}
    async with running_gateway(tmp_path, upstream.url, store=store) as gw:
        key_id, key = await gw.issue_key("direct")
        revoked_id, revoked = await gw.issue_key("direct")
        status, _ = await gw.admin("POST", f"/admin/keys/{revoked_id}/revoke")
        assert status == 200
        assert await gw.apply_policy(EDITED) == 2
        assert (await send(gw.url, key))[0] == 200
        assert not gw.logs.events("store_ephemeral")
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # none left behind
    async with running_gateway(tmp_path, upstream.url, store=store) as gw:
        [loaded] = gw.logs.events("store_state_loaded")
        assert (loaded["keys"], loaded["policy_version"]) == (2, 2)
        assert gw.service.policy_version == 2
        policy = gw.service.pipeline.policy
        assert policy is not None and policy.doc.rules[0].id == "no-fr"
        status, body, _ = await send(gw.url, key)
        assert status == 200, body
        assert gw.logs.requests()[-1]["key_id"] == key_id
        status, body, _ = await send(gw.url, revoked)
        assert (status, code_of(body)) == (401, "key_revoked")
        _, audit = await gw.admin("GET", "/admin/audit")
        actions = [e["action"] for e in audit["events"]]
        assert actions.count("key_issued") == 2 and "policy_applied" in actions


async def test_plain_memory_store_says_its_state_is_ephemeral(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A gateway on plain `memory://` logs one `store_ephemeral` warning at startup."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        [warn] = gw.logs.events("store_ephemeral")
        assert warn["level"] == "warning" and "restart" in warn["reason"]


async def test_corrupt_state_file_is_a_startup_error(tmp_path: Path,
                                                      upstream: FakeUpstream) -> None:
    """`gateway run` on a corrupt state file exits 2 with one line naming the file; the file is
    left as it was (never reset)."""
    state = tmp_path / "state.json"
    state.write_text('{"format": "gateway-state", "keys": [')
    config = write_config(tmp_path, upstream.url, store={"url": _url(state)})
    code, out, err = await cli("run", "--config", str(config), cwd=tmp_path)
    assert code == 2, (out, err)
    [line] = err.strip().splitlines()
    assert "store.url" in line and str(state) in line and "not valid JSON" in line
    assert state.read_text() == '{"format": "gateway-state", "keys": ['


async def test_state_file_in_a_missing_folder_is_a_startup_error(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A state file whose folder does not exist is refused at startup, naming the file."""
    state = tmp_path / "absent" / "state.json"
    config = write_config(tmp_path, upstream.url, store={"url": _url(state)})
    code, _, err = await cli("run", "--config", str(config), cwd=tmp_path)
    assert code == 2
    assert str(state) in err and "store.url" in err


def test_memory_url_with_a_host_is_a_config_error(tmp_path: Path) -> None:
    """`memory://state.json` (a host, not a path) is refused: a state file takes an absolute
    path, `memory:///var/lib/gateway/state.json`."""
    path = write_config(tmp_path, "http://127.0.0.1:9", store={"url": "memory://state.json"})
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), environ=cli_env())
    assert info.value.field == "store.url"
    assert "memory:///" in info.value.reason


async def test_store_writes_every_change_and_reloads_it(tmp_path: Path) -> None:
    """A persisted MemoryStore writes keys, the keys epoch, the policy and the audit stream on
    every change; a second store on the same file starts with all of them."""
    path = tmp_path / "state.json"
    first = MemoryStore(str(path))
    await first.start()
    rec = KeyRecord("k1", "acme", "h" * 64, created_at=1.0)
    await first.put_key(rec)
    await first.put_policy('{"version":1}', "test", 0)
    await first.append_audit({"time": 5.0, "actor": "t", "action": "a", "target": "x"})
    await first.close()
    doc = json.loads(path.read_text())
    assert doc["format"] == "gateway-state" and doc["keys_epoch"] == 1
    second = MemoryStore(str(path))
    await second.start()
    assert await second.get_key("k1") == rec
    assert await second.versions() == (1, 1)
    stored = await second.get_policy()
    assert stored is not None and (stored.doc, stored.actor) == ('{"version":1}', "test")
    assert await second.list_audit(None, 10) == [
        {"time": 5.0, "actor": "t", "action": "a", "target": "x"}]


async def test_a_change_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    """When the state file cannot be written, `put_key` raises StoreError and the key is not
    kept: the store never holds what its file would lose."""
    folder = tmp_path / "state"
    folder.mkdir()
    store = MemoryStore(str(folder / "state.json"))
    await store.start()
    for p in folder.iterdir():
        p.unlink()
    os.rmdir(folder)
    with pytest.raises(StoreError, match="state file"):
        await store.put_key(KeyRecord("k2", "acme", "h" * 64))
    assert await store.get_key("k2") is None
    assert await store.versions() == (0, 0)
    await store.close()


async def test_a_second_process_on_the_same_state_file_is_refused(tmp_path: Path) -> None:
    """A state file is owned by one store at a time: a second one on it is a StateFileError
    saying it is in use; once the first closes, it opens."""
    path = str(tmp_path / "state.json")
    first = MemoryStore(path)
    with pytest.raises(StateFileError, match="in use"):
        MemoryStore(path)
    await first.close()
    second = MemoryStore(path)
    await second.close()
