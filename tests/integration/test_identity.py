"""Identity end to end: keys issued, listed, rotated and revoked through the real CLI and the
admin API, on the embedded store and on Redis shared by two instances; reseller status and
customer attestation; admin authentication, audit events and secrets kept out of the logs."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.cli import code_of, run_cli, send
from tests.support.gateway import (
    ADMIN_TOKEN,
    DEFAULT_POLICY,
    UPSTREAM_KEY,
    RunningGateway,
    poll,
    running_gateway,
)
from tests.support.redis_server import RedisServer, free_port
from tests.support.upstream import FakeUpstream

#: How fast a change made on one instance must be enforced by every instance
#: (docs/architecture.md §2).
FLEET_S = 1.0


def _store(server: RedisServer) -> dict[str, Any]:
    return {"url": server.url, "key_prefix": "x:", "sync_interval_s": 0.2}


async def _status(gw: RunningGateway, key: str, ip: str = "192.0.2.1") -> tuple[int, str | None]:
    status, body, _ = await send(gw.url, key, ip=ip)
    return status, code_of(body)


async def _until(gws: list[RunningGateway], key: str, expected: tuple[int, str | None],
                 timeout: float) -> None:
    """Poll every instance until each answers `key` with (status, code) == `expected`."""
    async def check() -> bool:
        got = await asyncio.gather(*(_status(g, key) for g in gws))
        return all(g == expected for g in got)

    await poll(check, timeout=timeout)


def _no_secrets(raw: list[str], *secrets: str) -> None:
    text = "\n".join(raw)
    for s in secrets:
        assert s not in text


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_cli_issued_key_works(backend: str, request: pytest.FixtureRequest,
                                    tmp_path: Path, upstream: FakeUpstream) -> None:
    """A key issued with `gateway keys issue --json` authenticates through the gateway, both on
    the embedded store (through the admin API) and on Redis (on the store directly)."""
    sections: dict[str, Any] = {"admin_listen": f"127.0.0.1:{free_port()}"}
    if backend == "redis":
        sections["store"] = _store(request.getfixturevalue("redis_server"))
    async with running_gateway(tmp_path, upstream.url, **sections) as gw:
        out = await asyncio.to_thread(run_cli, "keys", "issue", "--reseller", "direct", "--json",
                                      config=tmp_path / "gateway.yaml")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)  # stdout is exactly one JSON document
        assert set(doc) == {"key_id", "key"}
        assert doc["key"].startswith(f"gk_{doc['key_id']}_")
        await _until([gw], doc["key"], (200, None), timeout=FLEET_S)
        line = gw.logs.requests()[-1]
        assert line["key_id"] == doc["key_id"] and line["reseller"] == "direct"
        secret = doc["key"].split("_", 2)[2]
        _no_secrets(gw.logs.raw, secret, ADMIN_TOKEN, UPSTREAM_KEY)
        _no_secrets(out.stderr.splitlines(), secret)
        if backend == "redis":  # the CLI changed the store itself: it logs the audit event
            audit = [json.loads(x) for x in out.stderr.splitlines() if x.startswith("{")]
            assert [(a["event"], a["action"], a["target"]) for a in audit] == [
                ("audit", "key_issued", doc["key_id"])]
            assert audit[0]["actor"].startswith("cli")


async def test_revocation_reaches_both_instances_within_a_second(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """A key revoked through one of two instances sharing Redis is refused by both within 1 s."""
    store = _store(redis_server)
    async with running_gateway(tmp_path / "a", upstream.url, store=store) as gw1, \
            running_gateway(tmp_path / "b", upstream.url, store=store) as gw2:
        key_id, key = await gw1.issue_key("direct")
        await _until([gw1, gw2], key, (200, None), timeout=FLEET_S)
        t0 = time.monotonic()
        status, body = await gw1.admin("POST", f"/admin/keys/{key_id}/revoke")
        assert status == 200 and body["status"] == "revoked"
        await _until([gw1, gw2], key, (401, "key_revoked"),
                     timeout=FLEET_S - (time.monotonic() - t0))
        # Once refused, refused for good: nothing more reaches the upstream. (A probe sent
        # inside the propagation window may still have been forwarded; that is the window.)
        forwarded = len(upstream.requests)
        for gw in (gw1, gw2, gw1, gw2):
            assert await _status(gw, key) == (401, "key_revoked")
        assert len(upstream.requests) == forwarded


async def test_refused_keys_get_401_and_never_reach_upstream(tmp_path: Path,
                                                             upstream: FakeUpstream) -> None:
    """Missing, malformed, unknown, revoked and expired keys get 401 with their code and
    authentication_error, and no such request is forwarded."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        revoked_id, revoked = await gw.issue_key("direct")
        _, expiring = await gw.issue_key("direct", expires_at=time.time() + 1.0)
        assert (await _status(gw, expiring))[0] == 200
        status, _ = await gw.admin("POST", f"/admin/keys/{revoked_id}/revoke")
        assert status == 200
        forwarded = len(upstream.requests)
        unknown = "gk_" + "0123456789abcdef" + "_" + "A" * 43
        cases = [(None, "invalid_api_key"), ("sk-not-a-gateway-key", "invalid_api_key"),
                 ("gk_zz_short", "invalid_api_key"), (unknown, "invalid_api_key"),
                 (revoked, "key_revoked")]
        for key, code in cases:
            status, body, headers = await send(gw.url, key)
            assert (status, code_of(body)) == (401, code), key
            assert body["error"]["type"] == "authentication_error"
            assert body["request_id"] == headers["x-request-id"]
        assert len(upstream.requests) == forwarded
        await poll(lambda: _expired(gw, expiring), timeout=10)
        admitted = [x for x in gw.logs.requests() if x["status"] == 200]
        assert len(upstream.requests) == len(admitted)
        refused = [x for x in gw.logs.requests() if x["status"] == 401]
        assert {x["reason"] for x in refused} == {"invalid_api_key", "key_revoked", "key_expired"}
        assert all(x["decision"] == "deny" and x["upstream_status"] is None for x in refused)
        # A known key that is refused is named in the log (by id), an unknown one is not.
        by_reason = {x["reason"]: x for x in refused}
        assert by_reason["key_revoked"]["key_id"] == revoked_id
        assert by_reason["key_revoked"]["reseller"] == "direct"
        assert by_reason["key_expired"]["key_id"] is not None
        assert all(x["key_id"] is None for x in refused if x["reason"] == "invalid_api_key")


async def _expired(gw: RunningGateway, key: str) -> bool:
    return await _status(gw, key) == (401, "key_expired")


async def test_keys_list_show_rotate_via_cli_and_admin_api(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """`keys list/show/rotate` (CLI, on Redis) and the admin API agree; a rotated key's new
    secret works at once, the old one during the overlap only."""
    cfg = tmp_path / "gateway.yaml"
    async with running_gateway(tmp_path, upstream.url, store=_store(redis_server)) as gw:
        out = await asyncio.to_thread(
            run_cli, "keys", "issue", "--reseller", "direct", "--name", "ci", "--models",
            "claude-*", "--countries", "us,gb", "--json", config=cfg)
        assert out.returncode == 0, out.stderr
        cli_key = json.loads(out.stdout)
        api_id, _ = await gw.issue_key("acme", name="by-api")

        out, by_reseller, show = await asyncio.gather(
            asyncio.to_thread(run_cli, "keys", "list", "--json", config=cfg),
            asyncio.to_thread(run_cli, "keys", "list", "--reseller", "acme", "--json",
                              config=cfg),
            asyncio.to_thread(run_cli, "keys", "show", api_id, "--json", config=cfg))
        assert out.returncode == 0, out.stderr
        rows = {r["key_id"]: r for r in json.loads(out.stdout)}
        assert set(rows) == {cli_key["key_id"], api_id}
        assert rows[cli_key["key_id"]]["models"] == ["claude-*"]
        assert rows[cli_key["key_id"]]["countries"] == ["US", "GB"]
        assert not any("secret_hash" in r for r in rows.values())
        assert [r["key_id"] for r in json.loads(by_reseller.stdout)] == [api_id]
        status, listed = await gw.admin("GET", "/admin/keys?reseller=direct")
        assert status == 200
        assert [r["key_id"] for r in listed["keys"]] == [cli_key["key_id"]]
        assert show.returncode == 0, show.stderr
        shown = json.loads(show.stdout)
        assert shown["name"] == "by-api" and shown["reseller"] == "acme"
        status, api_shown = await gw.admin("GET", f"/admin/keys/{cli_key['key_id']}")
        assert status == 200 and api_shown["name"] == "ci" and api_shown["status"] == "active"
        status, _ = await gw.admin("GET", "/admin/keys/0000000000000000")
        assert status == 404

        # Rotate one key with the CLI and another through the admin API, 5 s overlap each (a
        # CLI process can take seconds to start on a loaded machine); each old secret is
        # checked right after its own rotation, inside the overlap.
        await _until([gw], cli_key["key"], (200, None), timeout=FLEET_S)
        out = await asyncio.to_thread(run_cli, "keys", "rotate", cli_key["key_id"],
                                      "--overlap", "5", "--json", config=cfg)
        assert out.returncode == 0, out.stderr
        new_cli = json.loads(out.stdout)
        assert new_cli["key_id"] == cli_key["key_id"] and new_cli["key"] != cli_key["key"]
        await _until([gw], new_cli["key"], (200, None), timeout=FLEET_S)
        assert await _status(gw, cli_key["key"]) == (200, None)

        _, direct_key = await gw.issue_key("direct")
        await _until([gw], direct_key, (200, None), timeout=FLEET_S)
        status, rotated = await gw.admin("POST", f"/admin/keys/{_kid(direct_key)}/rotate",
                                         json={"overlap_s": 5})
        assert status == 200, rotated
        assert rotated["key_id"] == _kid(direct_key) and rotated["key"] != direct_key
        await _until([gw], rotated["key"], (200, None), timeout=FLEET_S)
        assert await _status(gw, direct_key) == (200, None)

        for old, new in ((cli_key["key"], new_cli["key"]), (direct_key, rotated["key"])):
            await _until([gw], old, (401, "invalid_api_key"), timeout=30)
            assert await _status(gw, new) == (200, None)
        actions = {(a["action"], a["target"]) for a in gw.logs.events("audit")}
        assert ("key_rotated", _kid(direct_key)) in actions


def _kid(key: str) -> str:
    return key.split("_")[1]


async def test_suspended_reseller_refused_within_a_second(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """Suspending a reseller in the policy refuses its keys on every instance within 1 s."""
    store = _store(redis_server)
    async with running_gateway(tmp_path / "a", upstream.url, store=store) as gw1, \
            running_gateway(tmp_path / "b", upstream.url, store=store) as gw2:
        _, key = await gw1.issue_key("direct")
        await _until([gw1, gw2], key, (200, None), timeout=FLEET_S)
        policy = copy.deepcopy(DEFAULT_POLICY)
        policy["resellers"]["direct"]["status"] = "suspended"
        t0 = time.monotonic()
        status, _ = await gw1.admin("PUT", "/admin/policy", data=json.dumps(policy))
        assert status == 200
        # Every instance learns it from the store's event: a request one answers before then
        # is still forwarded (within the second); from then on none is.
        await _until([gw1, gw2], key, (403, "reseller_suspended"),
                     timeout=FLEET_S - (time.monotonic() - t0))
        forwarded = len(upstream.requests)
        for gw in (gw1, gw2, gw1, gw2):
            assert await _status(gw, key) == (403, "reseller_suspended")
        assert len(upstream.requests) == forwarded


async def test_customer_attestation(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A reseller that must attest gets 403 without the headers and 400 for malformed ones;
    attested requests are located, logged, and forwarded without the attestation headers."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key("acme")
        forwarded = len(upstream.requests)
        cases: list[tuple[dict[str, str], int, str]] = [
            ({}, 403, "customer_attestation_required"),
            ({"X-Customer-Id": "cust-1"}, 403, "customer_attestation_required"),
            ({"X-Customer-IP": "192.0.2.20"}, 403, "customer_attestation_required"),
            ({"X-Customer-Id": "cust-1", "X-Customer-IP": "not-an-ip"}, 400,
             "invalid_customer_attestation"),
            ({"X-Customer-Id": "cust-1", "X-Customer-IP": "192.0.2.20:443"}, 400,
             "invalid_customer_attestation"),
            ({"X-Customer-Id": "cust-1", "X-Customer-IP": "192.0.2.20, 192.0.2.1"}, 400,
             "invalid_customer_attestation"),
            ({"X-Customer-Id": "has space", "X-Customer-IP": "192.0.2.20"}, 400,
             "invalid_customer_attestation"),
            ({"X-Customer-Id": "x" * 129, "X-Customer-IP": "192.0.2.20"}, 400,
             "invalid_customer_attestation"),
        ]
        for headers, status, code in cases:
            got, body, _ = await send(gw.url, key, headers=headers)
            assert (got, code_of(body)) == (status, code), headers
            assert body["error"]["type"] == ("permission_error" if status == 403
                                             else "invalid_request_error")
        assert len(upstream.requests) == forwarded

        status, _, _ = await send(gw.url, key, ip="192.0.2.1", headers={
            "X-Customer-Id": "cust-42", "X-Customer-IP": "192.0.2.20"})
        assert status == 200
        seen = upstream.last_request.headers
        assert "X-Customer-Id" not in seen and "X-Customer-IP" not in seen
        assert key not in str(dict(seen)) and seen["x-api-key"] == UPSTREAM_KEY
        line = gw.logs.requests()[-1]
        assert (line["customer_id"], line["customer_ip"], line["customer_country"]) == (
            "cust-42", "192.0.2.20", "GB")
        assert (line["client_ip"], line["country"]) == ("192.0.2.1", "US")


async def test_admin_auth_audit_and_no_secrets_in_logs(tmp_path: Path,
                                                        upstream: FakeUpstream) -> None:
    """/admin/* needs the bearer token; changes log audit events with actor, action and target;
    no key secret, admin token or upstream credential appears in any log line."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong-token"},
                            {"Authorization": f"Basic {ADMIN_TOKEN}"},
                            {"Authorization": ADMIN_TOKEN}):
                async with s.get(gw.admin_url + "/admin/keys", headers=headers) as r:
                    assert r.status == 401, headers
                async with s.post(gw.admin_url + "/admin/keys", headers=headers,
                                  json={"reseller": "direct"}) as r:
                    assert r.status == 401, headers
            async with s.get(gw.admin_url + "/healthz") as r:
                assert r.status == 200
        status, _ = await gw.admin("GET", "/admin/keys")
        assert status == 200

        key_id, key = await gw.issue_key("direct")
        assert (await _status(gw, key))[0] == 200
        _, rotated = await gw.admin("POST", f"/admin/keys/{key_id}/rotate", json={"overlap_s": 0})
        await gw.admin("POST", f"/admin/keys/{key_id}/revoke")
        assert (await _status(gw, rotated["key"])) == (401, "key_revoked")
        version = await gw.apply_policy(DEFAULT_POLICY)

        seed, *audit = gw.logs.events("audit")  # the policy file seeded the store first
        assert (seed["action"], seed["actor"].split(":")[0]) == ("policy_applied", "seed")
        assert [(a["action"], a["target"]) for a in audit] == [
            ("key_issued", key_id), ("key_rotated", key_id), ("key_revoked", key_id),
            ("policy_applied", "policy")]
        assert all(a["actor"] == "admin-api:127.0.0.1" for a in audit)
        assert audit[-1]["version"] == version
        secrets = [key.split("_", 2)[2], rotated["key"].split("_", 2)[2], ADMIN_TOKEN,
                   UPSTREAM_KEY]
        _no_secrets(gw.logs.raw, *secrets)
        assert {x["key_id"] for x in gw.logs.requests()} <= {key_id, None}


async def test_the_instance_that_changes_a_key_uses_it_at_once(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """On Redis, the instance whose admin API issues, updates or revokes a key has the change
    in its snapshot when the answer is sent (read-your-writes), before any change event."""
    async with running_gateway(tmp_path, upstream.url, store=_store(redis_server)) as gw:
        for _ in range(5):
            key_id, _ = await gw.issue_key()
            assert key_id in gw.service.registry.keys
            status, _ = await gw.admin("PATCH", f"/admin/keys/{key_id}", json={"rpm": 7})
            assert status == 200
            assert gw.service.registry.keys[key_id].limits.get("rpm") == 7
            status, _ = await gw.admin("POST", f"/admin/keys/{key_id}/revoke")
            assert status == 200
            assert gw.service.registry.keys[key_id].status == "revoked"
