"""The audit trail as an operator sees it: request and audit lines at every log level, every
administrative change (admin API or CLI on Redis) in the store's audit stream, listed by
`gateway audit list` and `GET /admin/audit`, and a failed append that is logged, not lost."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis
import yaml

from gateway.audit import log_audit
from gateway.context import RequestContext
from gateway.log import logger
from gateway.request_log import configure_logging, log_request, set_log_stream
from tests.support.cli import GatewayProcess, run_cli, send
from tests.support.gateway import (
    ADMIN_TOKEN,
    DEFAULT_POLICY,
    UPSTREAM_KEY,
    RunningGateway,
    poll,
    running_gateway,
    write_config,
)
from tests.support.redis_server import RedisServer, free_port
from tests.support.upstream import FakeUpstream

WARNING = {"level": "warning", "format": "json"}
START_S = 30.0  # a subprocess gateway (imports, geo, store) on a loaded machine


def _store(server: RedisServer, prefix: str = "au:") -> dict[str, Any]:
    return {"url": server.url, "key_prefix": prefix, "sync_interval_s": 0.2}


def _summary(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["action"], e["target"], e["actor"].split(":")[0]) for e in events]


async def _admin_audit(gw: RunningGateway, query: str = "") -> list[dict[str, Any]]:
    status, body = await gw.admin("GET", "/admin/audit" + query)
    assert status == 200, body
    assert set(body) == {"events"}
    events: list[dict[str, Any]] = body["events"]
    return events


async def _cli(*args: str, config: Path) -> Any:
    out = await asyncio.to_thread(run_cli, *args, config=config)
    assert out.returncode == 0, out.stderr
    return out


async def test_warning_level_keeps_request_and_audit_lines(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """With log.level warning the gateway still prints every request line and audit line, and
    drops info diagnostics (gateway_started, policy_loaded)."""
    async with running_gateway(tmp_path, upstream.url, log=WARNING) as gw:
        key_id, key = await gw.issue_key("direct")
        status, _, _ = await send(gw.url, key)
        assert status == 200
        await poll(lambda: gw.logs.requests())
        assert [r["key_id"] for r in gw.logs.requests()] == [key_id]
        audit = gw.logs.events("audit")
        assert [(a["action"], a["target"]) for a in audit] == [("policy_applied", "policy"),
                                                               ("key_issued", key_id)]
        others = {x["event"] for x in gw.logs.lines if x.get("level") in ("debug", "info")}
        assert others == {"request", "audit"}


def test_console_format_prints_request_and_audit_at_error_level() -> None:
    """In console format at log.level error, request and audit lines print; info events don't."""
    out = io.StringIO()
    set_log_stream(out)
    try:
        configure_logging("error", "console")
        log_request(RequestContext("req_1", "127.0.0.1", "POST", "/v1/messages", time.time()))
        log_audit("cli:ops", "key_revoked", "k123", reseller="acme")
        logger().info("policy_loaded", version=9)
        logger().warning("store_unavailable", on_error="open")
        logger().error("internal_error", request_id="req_2")
    finally:
        set_log_stream(None)
        configure_logging("info", "json")
    text = out.getvalue()
    assert "req_1" in text and "key_revoked" in text and "internal_error" in text
    assert "policy_loaded" not in text and "store_unavailable" not in text


async def test_cli_on_redis_changes_are_in_the_audit_stream(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """Keys issued and revoked and a policy applied by the CLI straight on Redis are listed, with
    actor, action and target, by `gateway audit list --json` and GET /admin/audit, next to a
    change made through the admin API; secrets appear nowhere."""
    async with running_gateway(tmp_path, upstream.url, store=_store(redis_server),
                               admin_listen=f"127.0.0.1:{free_port()}", log=WARNING) as gw:
        cfg = tmp_path / "gateway.yaml"
        api_id, api_key = await gw.issue_key("direct")
        issued = await _cli("keys", "issue", "--reseller", "acme", "--json", config=cfg)
        key = json.loads(issued.stdout)
        key_id = key["key_id"]
        # The CLI prints its own audit line on stderr (stdout is the command's output).
        assert [json.loads(x)["action"] for x in issued.stderr.splitlines()
                if x.startswith("{")] == ["key_issued"]
        await _cli("keys", "revoke", key_id, config=cfg)
        policy = copy.deepcopy(DEFAULT_POLICY)
        policy["resellers"]["acme"]["status"] = "suspended"
        (tmp_path / "suspend.yaml").write_text(yaml.safe_dump(policy))
        await _cli("policy", "apply", str(tmp_path / "suspend.yaml"), config=cfg)

        expected = [("key_issued", api_id, "admin-api"), ("key_issued", key_id, "cli"),
                    ("key_revoked", key_id, "cli"), ("policy_applied", "policy", "cli"),
                    ("reseller_status_changed", "acme", "cli")]
        listed = await _cli("audit", "list", "--json", config=cfg)
        doc = json.loads(listed.stdout)  # exactly one JSON document
        assert set(doc) == {"events"}
        # The gateway seeded the policy from its file on first start: that is a change too.
        assert _summary(doc["events"]) == [("policy_applied", "policy", "seed"), *expected]
        by_action = {e["action"]: e for e in doc["events"][1:]}
        assert by_action["key_revoked"]["reseller"] == "acme"
        assert by_action["policy_applied"]["version"] == 2
        assert by_action["reseller_status_changed"]["status"] == "suspended"
        assert by_action["reseller_status_changed"]["previous_status"] == "active"
        assert all(isinstance(e["time"], float) for e in doc["events"])

        assert await _admin_audit(gw) == doc["events"]
        recent = await _admin_audit(gw, "?" + urlencode({"since": datetime.now(UTC).isoformat()}))
        assert recent == []
        assert len(await _admin_audit(gw, "?since=1h&limit=2")) == 2

        table = await _cli("audit", "list", "--since", "24h", config=cfg)
        lines = table.stdout.splitlines()
        assert lines[0].split()[:4] == ["TIME", "ACTOR", "ACTION", "TARGET"]
        assert len(lines) == 1 + len(doc["events"]) and key_id in table.stdout

        # The gateway printed the audit lines of its own change, at log.level warning.
        assert [a["action"] for a in gw.logs.events("audit")] == ["policy_applied",
                                                                  "key_issued"]
        text = "\n".join([*gw.logs.raw, issued.stderr, listed.stdout, table.stdout])
        for secret in (key["key"], api_key, ADMIN_TOKEN, UPSTREAM_KEY):
            assert secret not in text


async def test_real_process_at_warning_with_cli_changes_on_redis(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """A real `gateway run` at log.level warning on redis-server prints its request lines and no
    info diagnostics; a key the CLI issued and revoked on Redis is listed by `gateway audit list
    --json` and GET /admin/audit."""
    port, admin_port = free_port(), free_port()
    cfg = write_config(tmp_path, upstream.url, listen=f"127.0.0.1:{port}",
                       admin_listen=f"127.0.0.1:{admin_port}", store=_store(redis_server),
                       log=WARNING)
    url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def get(path: str) -> tuple[int, Any]:
        import aiohttp

        try:
            async with aiohttp.ClientSession() as s, s.get(admin + path, headers=headers) as r:
                return r.status, await r.json(content_type=None)
        except aiohttp.ClientConnectionError:
            return 0, None

    with GatewayProcess(cfg) as gw:
        await poll(lambda: _is_ready(get), timeout=START_S)
        issued = await _cli("keys", "issue", "--reseller", "direct", "--json", config=cfg)
        key = json.loads(issued.stdout)

        async def served() -> bool:
            status, _, _ = await send(url, key["key"])
            return status == 200

        await poll(served)
        await _cli("keys", "revoke", key["key_id"], config=cfg)
        listed = json.loads((await _cli("audit", "list", "--json", config=cfg)).stdout)
        mine = [e for e in listed["events"] if e["target"] == key["key_id"]]
        assert [(e["action"], e["actor"].split(":")[0], e["reseller"]) for e in mine] == [
            ("key_issued", "cli", "direct"), ("key_revoked", "cli", "direct")]
        status, body = await get("/admin/audit")
        assert status == 200 and body == listed

        await poll(lambda: gw.events("request"))
        assert {r["key_id"] for r in gw.events("request")} == {key["key_id"]}
        # Its own change (the policy seed) printed an audit line; no info diagnostic printed.
        assert [a["action"] for a in gw.events("audit")] == ["policy_applied"]
        info = {x["event"] for x in gw.lines if x.get("level") in ("debug", "info")}
        assert info == {"request", "audit"}
        assert "gateway_started" not in "\n".join(gw.raw)
        assert key["key"] not in "\n".join(gw.raw)


async def _is_ready(get: Any) -> bool:
    status, _ = await get("/readyz")
    return bool(status == 200)


async def test_embedded_store_audit_list_through_the_admin_api(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """On the embedded store `gateway audit list --json` reads the running gateway's stream."""
    async with running_gateway(tmp_path, upstream.url,
                               admin_listen=f"127.0.0.1:{free_port()}") as gw:
        key_id, _ = await gw.issue_key("direct")
        status, _ = await gw.admin("POST", f"/admin/keys/{key_id}/revoke")
        assert status == 200
        listed = await _cli("audit", "list", "--json", config=tmp_path / "gateway.yaml")
        events = json.loads(listed.stdout)["events"]
        assert _summary(events)[-2:] == [("key_issued", key_id, "admin-api"),
                                         ("key_revoked", key_id, "admin-api")]


async def test_admin_audit_needs_the_token_and_a_valid_query(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """GET /admin/audit answers 401 without the bearer token and 400 to a bad since or limit."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        import aiohttp

        async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/admin/audit") as r:
            assert r.status == 401
        for query in ("?since=yesterday", "?limit=0", "?limit=many"):
            status, body = await gw.admin("GET", "/admin/audit" + query)
            assert status == 400, query
            assert (body["error"]["type"], body["error"]["code"]) == (
                "invalid_request_error", "invalid_request")


async def test_failed_append_is_logged_and_the_change_kept(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """When the store refuses the audit append, the key is still issued, its audit line still
    printed, and `audit_append_failed` logged as an error (at log.level warning)."""
    # A value of the wrong type under the stream's key: every XADD to it fails.
    with redis.Redis(port=redis_server.port) as r:
        r.set("af:audit", "not a stream")
    async with running_gateway(tmp_path, upstream.url, store=_store(redis_server, "af:"),
                               log=WARNING) as gw:
        key_id, key = await gw.issue_key("direct")

        async def served() -> bool:
            status, _, _ = await send(gw.url, key)
            return status == 200

        await poll(served)  # the key reached the gateway through the store
        assert [a["target"] for a in gw.logs.events("audit")][-1] == key_id
        failed = [f for f in gw.logs.events("audit_append_failed") if f["target"] == key_id]
        assert len(failed) == 1
        assert failed[0]["level"] == "error" and failed[0]["action"] == "key_issued"
