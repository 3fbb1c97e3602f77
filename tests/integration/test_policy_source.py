"""`policy_source`: with `store` the store's policy stays live and an edited `policy_file` is
reported (`policy_file_differs`, `gateway_policy_file_differs`); with `file` the file is applied
at start and on SIGHUP, audited, and an invalid file is refused while the live policy stays."""

from __future__ import annotations

import copy
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.settings import ConfigError, load_settings
from tests.support.cli import cli_env, code_of, gateway_process, send
from tests.support.gateway import (
    DEFAULT_POLICY,
    RunningGateway,
    poll,
    running_gateway,
    write_config,
)
from tests.support.redis_server import RedisServer
from tests.support.upstream import FakeUpstream

NO_FR: dict[str, Any] = {"id": "no-fr", "action": "deny", "reason": "no_fr",
                         "match": {"country": ["FR"]}}
EDITED = copy.deepcopy(DEFAULT_POLICY)
EDITED["rules"] = [NO_FR, *EDITED["rules"]]
EDITED_AGAIN = copy.deepcopy(EDITED)
EDITED_AGAIN["default_action"] = "deny"


def _store(server: RedisServer) -> dict[str, Any]:
    return {"url": server.url, "key_prefix": "ps:", "sync_interval_s": 0.2}


def _write_policy(tmp: Path, doc: Any) -> None:
    (tmp / "policy.yaml").write_text(yaml.safe_dump(doc))


def _rule_ids(gw: RunningGateway) -> list[str]:
    policy = gw.service.pipeline.policy
    assert policy is not None
    return [r.id for r in policy.doc.rules]


async def _metric(admin_url: str, name: str) -> float | None:
    async with aiohttp.ClientSession() as s, s.get(admin_url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_store_source_keeps_the_live_policy_and_reports_an_edited_file(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """With `policy_source: store` a restart on an edited policy_file keeps the store's version
    live and warns `policy_file_differs` (file, live version) with the gauge at 1; a SIGHUP
    once the file matches sets it to 0, another edit warns again, an apply of the file clears it."""
    store = _store(redis_server)
    async with running_gateway(tmp_path, upstream.url, store=store) as gw:
        assert gw.service.policy_version == 1
        assert not gw.logs.events("policy_file_differs")
        assert await _metric(gw.admin_url, "gateway_policy_file_differs") == 0
    async with running_gateway(tmp_path, upstream.url, EDITED, store=store) as gw:
        assert gw.service.policy_version == 1
        assert "no-fr" not in _rule_ids(gw)
        [warn] = gw.logs.events("policy_file_differs")
        assert warn["level"] == "warning"
        assert warn["file"] == str(tmp_path / "policy.yaml")
        assert warn["live_version"] == 1
        assert await _metric(gw.admin_url, "gateway_policy_file_differs") == 1

        _write_policy(tmp_path, DEFAULT_POLICY)
        assert await gw.service.reload()
        assert len(gw.logs.events("policy_file_differs")) == 1
        assert await _metric(gw.admin_url, "gateway_policy_file_differs") == 0

        _write_policy(tmp_path, EDITED)
        assert await gw.service.reload()
        assert len(gw.logs.events("policy_file_differs")) == 2
        assert await _metric(gw.admin_url, "gateway_policy_file_differs") == 1
        assert gw.service.policy_version == 1

        assert await gw.apply_policy(EDITED) == 2  # what `gateway policy apply` does
        assert await _metric(gw.admin_url, "gateway_policy_file_differs") == 0


async def test_file_source_applies_the_file_at_start_and_on_sighup(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """With `policy_source: file` a start on an edited file applies it as a new version,
    audited as `policy_applied` by `file:<host>`; a SIGHUP applies a further edit; an unchanged
    file applies nothing."""
    store = _store(redis_server)
    actor = f"file:{socket.gethostname()}"
    async with running_gateway(tmp_path, upstream.url, store=store) as gw:
        assert gw.service.policy_version == 1
    async with running_gateway(tmp_path, upstream.url, EDITED, store=store,
                               policy_source="file") as gw:
        assert gw.service.policy_version == 2
        assert _rule_ids(gw)[0] == "no-fr"
        key_id, key = await gw.issue_key("direct")
        await poll(lambda: key_id in gw.service.registry.keys)  # the change event, via Redis
        status, body, _ = await send(gw.url, key, ip="192.0.2.65")  # FR in the demo data
        assert (status, code_of(body)) == (403, "no_fr")
        applied = [e for e in gw.logs.events("audit") if e["action"] == "policy_applied"]
        assert [(e["actor"], e["version"]) for e in applied] == [(actor, 2)]
        stream = await gw.service.store.list_audit(None, 100)
        assert (actor, 2) in [(e["actor"], e.get("version")) for e in stream
                              if e["action"] == "policy_applied"]
        assert not gw.logs.events("policy_file_differs")

        _write_policy(tmp_path, EDITED_AGAIN)
        assert await gw.service.reload()
        assert gw.service.policy_version == 3
        policy = gw.service.pipeline.policy
        assert policy is not None and policy.doc.default_action == "deny"

        assert await gw.service.reload()  # the file as applied: nothing new
        assert gw.service.policy_version == 3
        applied = [e for e in gw.logs.events("audit") if e["action"] == "policy_applied"]
        assert [e["version"] for e in applied] == [2, 3]


async def test_file_source_refuses_an_invalid_file_on_sighup(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """With `policy_source: file` on the embedded store, SIGHUP with an invalid policy file logs
    `config_reload_failed` naming the file; the live policy and its version stay."""
    async with running_gateway(tmp_path, upstream.url, EDITED, policy_source="file") as gw:
        assert gw.service.policy_version == 1
        (tmp_path / "policy.yaml").write_text(
            "version: 1\nrules:\n  - id: broken\n    action: maybe\n    reason: x\n")
        assert not await gw.service.reload()
        [failed] = gw.logs.events("config_reload_failed")
        assert "policy.yaml" in failed["reason"] and "broken" in failed["reason"]
        assert gw.service.policy_version == 1
        assert _rule_ids(gw)[0] == "no-fr"
        _, key = await gw.issue_key("direct")
        status, body, _ = await send(gw.url, key, ip="192.0.2.65")
        assert (status, code_of(body)) == (403, "no_fr")


async def test_sighup_to_a_process_applies_the_file(tmp_path: Path,
                                                    upstream: FakeUpstream) -> None:
    """A real `gateway run` with `policy_source: file` applies an edited policy file on SIGHUP
    (`policy_loaded` with the next version, /readyz shows it)."""
    async with gateway_process(tmp_path, upstream.url, policy_source="file") as gw:
        await poll(lambda: gw.events("policy_loaded"))
        _write_policy(tmp_path, EDITED)
        gw.proc.send_signal(signal.SIGHUP)
        loaded = await poll(lambda: [e for e in gw.events("policy_loaded")
                                     if e["version"] == 2])
        assert loaded[0]["rules"] == len(EDITED["rules"])
        async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/readyz") as r:
            assert (await r.json())["checks"]["policy"]["version"] == 2
        gw.proc.send_signal(signal.SIGTERM)
        assert await gw.finish() == 0


def test_file_source_needs_a_policy_file(tmp_path: Path) -> None:
    """`policy_source: file` without a `policy_file` is a config error naming the field."""
    path = write_config(tmp_path, "http://127.0.0.1:9", policy_file=None, policy_source="file")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), environ=cli_env())
    assert info.value.field == "policy_source"
    assert "policy_file" in info.value.reason
