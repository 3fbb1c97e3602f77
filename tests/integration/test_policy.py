"""Policy end to end: rule denials on the client and the attested customer, shadow rules, key
scopes, `gateway policy apply|show` and `gateway explain` through the real CLI on Redis, with
two instances switching policy within a second."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support.cli import code_of, run_cli, send
from tests.support.gateway import DEFAULT_POLICY, RunningGateway, poll, running_gateway
from tests.support.redis_server import RedisServer
from tests.support.upstream import FakeUpstream

FLEET_S = 1.0
REGION = "unsupported_country_region_territory"


def _store(server: RedisServer) -> dict[str, Any]:
    return {"url": server.url, "key_prefix": "x:", "sync_interval_s": 0.2}


def _write_yaml(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


async def _decide(gw: RunningGateway, key: str, ip: str) -> tuple[int, str | None]:
    status, body, _ = await send(gw.url, key, ip=ip)
    return status, code_of(body)


async def test_restricted_regions_denied_for_client_and_attested_customer(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A CN client, and an acme customer attested in CN or IR behind a US client, get 403 with
    the rule's reason and are never forwarded."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, direct = await gw.issue_key("direct")
        _, acme = await gw.issue_key("acme")
        status, body, _ = await send(gw.url, direct, ip="198.51.100.5")
        assert (status, code_of(body)) == (403, REGION)
        assert body["error"]["type"] == "permission_error"
        for customer_ip, country in (("198.51.100.5", "CN"), ("198.51.100.33", "IR")):
            status, body, _ = await send(gw.url, acme, ip="192.0.2.1", headers={
                "X-Customer-Id": "cust-7", "X-Customer-IP": customer_ip})
            assert (status, code_of(body)) == (403, REGION)
            line = gw.logs.requests()[-1]
            assert (line["country"], line["customer_country"]) == ("US", country)
            assert (line["rule"], line["reason"], line["decision"]) == (
                "restricted-regions", REGION, "deny")
        assert upstream.requests == []
        status, _, _ = await send(gw.url, acme, ip="192.0.2.1", headers={
            "X-Customer-Id": "cust-7", "X-Customer-IP": "192.0.2.50"})
        assert status == 200


async def test_shadow_rule_logs_but_allows(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A hosting-provider address matches the shadow rule: logged in `shadow`, allowed, served."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key("direct")
        status, _, _ = await send(gw.url, key, ip="203.0.113.35")
        assert status == 200
        line = gw.logs.requests()[-1]
        assert line["shadow"] == ["hosting-providers"]
        assert (line["decision"], line["rule"], line["reason"]) == ("allow", None, None)
        assert line["anonymizer"] == ["hosting"] and line["upstream_status"] == 200
        assert len(upstream.requests) == 1
        status, _, _ = await send(gw.url, key, ip="192.0.2.1")
        assert status == 200 and gw.logs.requests()[-1]["shadow"] == []


async def test_key_scopes(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A key's model and path globs and its country allow-list refuse requests outside them."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, models = await gw.issue_key("direct", models=["claude-*"])
        _, paths = await gw.issue_key("direct", paths=["/v1/messages*"])
        _, countries = await gw.issue_key("direct", countries=["GB"])
        openai_body = {"model": "claude-test-1", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}
        cases: list[tuple[str, dict[str, Any], int, str | None]] = [
            (models, {"body": {**openai_body, "model": "gpt-test-1"}}, 403, "model_not_allowed"),
            (models, {}, 200, None),
            (paths, {"path": "/v1/chat/completions", "body": openai_body}, 403,
             "path_not_allowed"),
            (paths, {}, 200, None),
            (countries, {"ip": "192.0.2.1"}, 403, "country_not_allowed"),
            (countries, {"ip": "192.0.2.20"}, 200, None),
        ]
        for key, kw, status, code in cases:
            got, body, _ = await send(gw.url, key, **kw)
            assert (got, code_of(body)) == (status, code), (kw, body)
        assert len(upstream.requests) == 3
        refused = [x for x in gw.logs.requests() if x["status"] == 403]
        assert [x["reason"] for x in refused] == [
            "model_not_allowed", "path_not_allowed", "country_not_allowed"]
        assert refused[0]["model"] == "gpt-test-1"


async def test_policy_apply_cli_reaches_second_instance(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """`gateway policy apply` on Redis: --dry-run shows a diff and changes nothing; an invalid
    file is refused naming rule and field and the live policy stays; a valid change is
    enforced by a second running instance within a second; `policy show` prints it."""
    store = _store(redis_server)
    cfg = tmp_path / "a" / "gateway.yaml"
    async with running_gateway(tmp_path / "a", upstream.url, store=store) as gw1, \
            running_gateway(tmp_path / "b", upstream.url, store=store) as gw2:
        _, key = await gw1.issue_key("direct")
        await poll(lambda: _ok(gw2, key), timeout=FLEET_S)
        assert gw1.service.policy_version == gw2.service.policy_version == 1

        changed = copy.deepcopy(DEFAULT_POLICY)
        changed["rules"].insert(0, {"id": "no-gb", "action": "deny", "reason": "gb_paused",
                                    "match": {"country": ["GB"]}})
        new_file = _write_yaml(tmp_path / "changed.yaml", changed)

        bad = copy.deepcopy(changed)
        bad["rules"][0]["match"] = {"country": ["Great Britain"]}
        bad_file = _write_yaml(tmp_path / "bad.yaml", bad)
        unknown_field = _write_yaml(tmp_path / "bad2.yaml", {
            **DEFAULT_POLICY, "rules": [{"id": "r1", "action": "deny", "reason": "x",
                                         "match": {"contry": ["GB"]}}]})
        dry, refused, refused2 = await asyncio.gather(
            asyncio.to_thread(run_cli, "policy", "apply", str(new_file), "--dry-run",
                              config=cfg),
            asyncio.to_thread(run_cli, "policy", "apply", str(bad_file), config=cfg),
            asyncio.to_thread(run_cli, "policy", "apply", str(unknown_field), config=cfg))
        assert dry.returncode == 1, dry.stderr  # a difference found
        assert "--- live (v1)" in dry.stdout and "+++ " in dry.stdout
        assert "+- action: deny" in dry.stdout and "+  id: no-gb" in dry.stdout
        assert "dry run" in dry.stdout
        assert refused.returncode != 0
        assert "rules[no-gb]" in refused.stderr and "match.country" in refused.stderr
        assert str(bad_file) in refused.stderr and refused.stdout == ""
        assert refused2.returncode != 0
        assert "rules[r1].match.contry" in refused2.stderr
        assert "unknown field" in refused2.stderr

        status, live = await gw1.admin("GET", "/admin/policy")  # the store itself
        assert status == 200 and live["version"] == 1
        for gw in (gw1, gw2):
            assert gw.service.policy_version == 1
            assert await _decide(gw, key, "192.0.2.20") == (200, None)
            assert await _decide(gw, key, "198.51.100.5") == (403, REGION)

        applied = await asyncio.to_thread(run_cli, "policy", "apply", str(new_file), config=cfg)
        t0 = time.monotonic()
        assert applied.returncode == 0, applied.stderr
        assert "applied policy version 2" in applied.stdout
        await poll(lambda: _denied_gb(gw2, key), timeout=FLEET_S)
        assert time.monotonic() - t0 < FLEET_S
        await poll(lambda: _denied_gb(gw1, key), timeout=FLEET_S)
        audit = [json.loads(x) for x in applied.stderr.splitlines() if x.startswith("{")]
        assert [(a["action"], a["version"]) for a in audit] == [("policy_applied", 2)]

        show, show_json = await asyncio.gather(
            asyncio.to_thread(run_cli, "policy", "show", config=cfg),
            asyncio.to_thread(run_cli, "policy", "show", "--json", config=cfg))
        assert show.returncode == 0, show.stderr
        assert show.stdout.startswith("# live policy version 2\n")
        assert yaml.safe_load(show.stdout)["rules"][0]["id"] == "no-gb"
        doc = json.loads(show_json.stdout)
        assert doc["version"] == 2 and doc["policy"]["rules"][0]["reason"] == "gb_paused"
        status, body = await gw2.admin("GET", "/admin/policy")
        assert status == 200 and body["version"] == 2 and body["policy"] == doc["policy"]

        again = await asyncio.to_thread(run_cli, "policy", "apply", str(new_file), config=cfg)
        assert again.returncode == 0 and "no changes" in again.stdout
        assert gw1.service.policy_version == 2

        loaded = [e["version"] for e in gw2.logs.events("policy_loaded")]
        assert loaded[-1] == 2 and 1 in loaded


async def _ok(gw: RunningGateway, key: str) -> bool:
    return await _decide(gw, key, "192.0.2.20") == (200, None)


async def _denied_gb(gw: RunningGateway, key: str) -> bool:
    return await _decide(gw, key, "192.0.2.20") == (403, "gb_paused")


async def test_explain_cli_and_admin_api(tmp_path: Path, upstream: FakeUpstream,
                                         redis_server: RedisServer) -> None:
    """`gateway explain --json` (on Redis) and GET /admin/explain give the decision and the rule
    trace, judging the attested customer as well as the client."""
    cfg = tmp_path / "gateway.yaml"
    async with running_gateway(tmp_path, upstream.url, store=_store(redis_server)) as gw:
        deny, allow = await asyncio.gather(
            asyncio.to_thread(run_cli, "explain", "--ip", "192.0.2.1", "--reseller", "acme",
                              "--customer-ip", "198.51.100.33", "--customer-id", "c1", "--json",
                              config=cfg),
            asyncio.to_thread(run_cli, "explain", "--ip", "203.0.113.35", "--reseller",
                              "direct", "--json", config=cfg))
        assert deny.returncode == 1, deny.stderr
        out = json.loads(deny.stdout)
        assert out["decision"]["decision"] == "deny"
        assert (out["decision"]["status"], out["decision"]["code"]) == (403, REGION)
        assert out["policy_version"] == 1
        assert (out["client"]["country"], out["customer"]["country"]) == ("US", "IR")
        first = out["rules"][0]
        assert (first["rule"], first["matched"], first["matched_on"]) == (
            "restricted-regions", True, "customer")
        assert allow.returncode == 0, allow.stderr
        out = json.loads(allow.stdout)
        assert out["decision"]["decision"] == "allow" and out["shadow"] == ["hosting-providers"]
        assert [r["rule"] for r in out["rules"]] == [
            "restricted-regions", "anonymizers", "hosting-providers"]
        assert [r["matched"] for r in out["rules"]] == [False, False, True]
        assert out["rules"][0]["failed_field"] == "country"

        status, body = await gw.admin("GET", "/admin/explain?ip=198.51.100.5&reseller=direct")
        assert status == 200
        assert (body["decision"]["decision"], body["decision"]["code"]) == ("deny", REGION)
        assert body["rules"][0]["matched_on"] == "client"
        assert body["client"]["country"] == "CN" and body["client"]["asn"] == 64510
        status, body = await gw.admin(
            "GET", "/admin/explain?ip=192.0.2.1&reseller=acme&customer_ip=192.0.2.20"
                   "&customer_id=c2")
        assert status == 200 and body["decision"]["decision"] == "allow"
        assert {s["subject"] for s in body["limits"]} >= {"reseller:acme", "customer:c2"}
        status, body = await gw.admin("GET", "/admin/explain?ip=192.0.2.1&reseller=acme")
        assert body["decision"]["code"] == "customer_attestation_required"
        status, _ = await gw.admin("GET", "/admin/explain?reseller=acme")
        assert status == 400
        assert upstream.requests == []
        assert [e["version"] for e in gw.logs.events("policy_loaded")] == [1]
