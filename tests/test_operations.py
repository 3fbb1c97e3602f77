"""Unit tests for gateway.operations: one suite run over both implementations (on the store
directly, and through a running gateway's admin API) and both stores (embedded, and a real
redis-server), asserting the same results for the same cases; that is what shows they agree."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from gateway.errors import OperationError
from gateway.operations import (
    AdminOperations,
    DirectOperations,
    ExplainQuery,
    Operations,
    direct_operations,
)
from gateway.settings import load_settings
from gateway.store.base import Tally, UsageKey
from gateway.store.memory import MemoryStore
from gateway.usage_report import UsageQuery, utc_day
from tests.support.gateway import (
    ADMIN_TOKEN,
    DEFAULT_POLICY,
    RunningGateway,
    running_gateway,
    store_config,
    write_config,
)
from tests.support.redis_server import free_port
from tests.support.upstream import FakeUpstream

ACTOR = "cli:test"
US_IP = "192.0.2.1"  # the demo geo data: US
STORES = ("memory", "redis")
IMPLEMENTATIONS = ("direct", "admin")


@asynccontextmanager
async def _operations(impl: str, kind: str, gw: RunningGateway) -> AsyncIterator[Operations]:
    """`impl` on the store of `gw`: the admin API of `gw`, its own embedded store, or a
    connection of its own to the Redis `gw` uses (as the CLI opens one)."""
    if impl == "admin":
        yield AdminOperations(gw.admin_url, ADMIN_TOKEN)
    elif kind == "memory":
        yield DirectOperations(gw.service.store, gw.service.config, ACTOR)
    else:
        async with direct_operations(gw.service.config, ACTOR) as ops:
            yield ops


@pytest_asyncio.fixture(params=[(i, k) for k in STORES for i in IMPLEMENTATIONS],
                        ids=lambda p: f"{p[0]}-{p[1]}")
async def ops(request: pytest.FixtureRequest, tmp_path: Path,
              upstream: FakeUpstream) -> AsyncIterator[Operations]:
    """One implementation over one store of a gateway running in-process (its policy is
    config/policy.yaml, seeded as version 1)."""
    impl, kind = request.param
    async with running_gateway(tmp_path, upstream.url, store=store_config(request, kind)) as gw, \
            _operations(impl, kind, gw) as operations:
        yield operations


async def _status(coro: Any) -> tuple[int, str]:
    with pytest.raises(OperationError) as err:
        await coro
    return err.value.status, str(err.value)


async def test_issue_show_and_list_a_key(ops: Operations) -> None:
    """An issued key comes back once in full, then shown (no secret) by show and list."""
    issued = await ops.issue_key({"reseller": "direct", "name": "ci", "models": ["claude-*"],
                                  "rpm": 5})
    assert issued.key.startswith(f"gk_{issued.key_id}_")
    assert issued.record["key_id"] == issued.key_id and issued.record["status"] == "active"
    shown = await ops.show_key(issued.key_id)
    assert {k: shown[k] for k in ("reseller", "name", "models", "limits", "status")} == {
        "reseller": "direct", "name": "ci", "models": ["claude-*"], "limits": {"rpm": 5},
        "status": "active"}
    assert shown["created_at_iso"] and "secret_hash" not in shown
    assert issued.key not in json.dumps(shown)
    assert [r["key_id"] for r in await ops.list_keys()] == [issued.key_id]
    assert [r["key_id"] for r in await ops.list_keys("direct")] == [issued.key_id]
    assert await ops.list_keys("acme") == []


async def test_refusals_have_the_same_status(ops: Operations) -> None:
    """Bad input is 400, an unknown key 404, a change to a revoked key 409."""
    assert (await _status(ops.issue_key({"reseller": "nobody"})))[0] == 400
    status, message = await _status(ops.issue_key({"reseller": "direct",
                                                   "quotas": {"weekly.requests": 1}}))
    assert status == 400 and "quotas.weekly.requests" in message
    status, message = await _status(ops.issue_key({"reseller": "direct", "models": ["x["]}))
    assert status == 400 and "unbalanced" in message
    status, message = await _status(ops.issue_key({"reseller": "direct",
                                                   "expires_at": time.time() - 60}))
    assert status == 400 and "in the past" in message
    assert (await _status(ops.show_key("0" * 16)))[0] == 404
    assert (await _status(ops.revoke_key("0" * 16)))[0] == 404
    key_id = (await ops.issue_key({"reseller": "direct"})).key_id
    assert (await _status(ops.rotate_key(key_id, -1)))[0] == 400
    await ops.revoke_key(key_id)
    assert (await _status(ops.update_key(key_id, {"rpm": 1})))[0] == 409
    assert (await _status(ops.rotate_key(key_id, 0)))[0] == 409
    assert (await _status(ops.list_audit(None, 0)))[0] == 400


async def test_update_sets_and_clears_fields(ops: Operations) -> None:
    """An update returns the key as shown; null clears a limit back to the policy's; quotas
merge into the key's own."""
    key_id = (await ops.issue_key({"reseller": "direct", "rpm": 5, "itpm": 9,
                                   "quotas": {"daily.requests": 3}})).key_id
    shown = await ops.update_key(key_id, {"models": "gpt-*, claude-*", "rpm": None,
                                          "countries": ["us"],
                                          "quotas": {"monthly.output_tokens": 50}})
    assert shown["models"] == ["gpt-*", "claude-*"] and shown["countries"] == ["US"]
    assert shown["limits"] == {"itpm": 9}
    assert shown["quotas"] == {"daily.requests": 3, "monthly.output_tokens": 50}
    assert await ops.show_key(key_id) == {**shown, "last_used_at": None,
                                          "last_used_at_iso": None}


async def test_revoke_and_rotate(ops: Operations) -> None:
    """Revoke marks the key revoked; rotate gives a new full key with an old-secret window."""
    first = await ops.issue_key({"reseller": "direct"})
    rotated = await ops.rotate_key(first.key_id, 60)
    assert rotated.key_id == first.key_id and rotated.key != first.key
    until = rotated.record["prev_valid_until"]
    assert until is not None and 50 < until - time.time() <= 60
    revoked = await ops.revoke_key(first.key_id)
    assert revoked["status"] == "revoked" and revoked["prev_valid_until"] is None


async def test_policy_get_and_put(ops: Operations) -> None:
    """The seeded policy is version 1; a put at the live version makes 2, a stale one is 409,
    an invalid document 400 (the live one stays)."""
    live = await ops.get_policy()
    assert live is not None and live.version == 1
    assert set(live.policy["resellers"]) == {"acme", "direct"}
    edited = {**DEFAULT_POLICY, "default_action": "deny"}
    assert await ops.put_policy(yaml.safe_dump(edited), 1) == 2
    status, message = await _status(ops.put_policy(json.dumps(edited), 1))
    assert (status, message) == (409, "policy version is 2, expected 1")
    status, message = await _status(ops.put_policy("resellers: 7\n", 2))
    assert status == 400 and "resellers" in message
    now = await ops.get_policy()
    assert now is not None and now.version == 2 and now.policy["default_action"] == "deny"
    assert now.applied_at is not None and abs(now.applied_at - time.time()) < 60


async def test_audit_lists_the_changes(ops: Operations) -> None:
    """Each change is one audit event, oldest first, with `time_iso`; `limit` keeps the newest
    and `since` drops the older."""
    key_id = (await ops.issue_key({"reseller": "direct"})).key_id
    await ops.revoke_key(key_id)
    events = await ops.list_audit(None, 1000)
    assert [(e["action"], e["target"]) for e in events] == [
        ("policy_applied", "policy"), ("key_issued", key_id), ("key_revoked", key_id)]
    assert all(e["time_iso"].endswith("Z") for e in events)
    assert [e["action"] for e in await ops.list_audit(None, 1)] == ["key_revoked"]
    assert await ops.list_audit(time.time() + 3600, 10) == []


async def test_explain_judges_a_key_by_id(ops: Operations) -> None:
    """A key's scope decides: its model is allowed, another model refused, an unknown key
    refused at authentication."""
    key_id = (await ops.issue_key({"reseller": "direct", "models": ["claude-*"]})).key_id
    allowed = await ops.explain(ExplainQuery(ip=US_IP, key_id=key_id, model="claude-x"))
    assert allowed["decision"]["decision"] == "allow" and allowed["policy_version"] == 1
    refused = await ops.explain(ExplainQuery(ip=US_IP, key_id=key_id, model="gpt-4"))
    assert refused["decision"]["decision"] == "deny"
    assert refused["decision"]["status"] == 403
    unknown = await ops.explain(ExplainQuery(ip=US_IP, key_id="0" * 16))
    assert unknown["decision"]["decision"] == "deny"
    assert unknown["decision"]["status"] == 401


async def test_explain_judges_an_attestation_header(ops: Operations) -> None:
    """The attestation header, method and path reach explain through both implementations: a
    header from a reseller without an attestation key is refused at the attestation step."""
    key_id = (await ops.issue_key({"reseller": "acme"})).key_id
    query = ExplainQuery(ip=US_IP, key_id=key_id, customer_id="c1", customer_ip="192.0.2.20",
                         attestation="v1;ts=1;sig=" + "A" * 86, method="POST")
    out = await ops.explain(query)
    assert (out["decision"]["stage"], out["decision"]["code"]) == (
        "attestation", "attestation_signature_invalid")
    assert out["request"]["method"] == "POST"
    malformed = await ops.explain(ExplainQuery(ip=US_IP, key_id=key_id, customer_id="c1",
                                               customer_ip="192.0.2.20", attestation="v1"))
    assert malformed["decision"]["code"] == "attestation_signature_malformed"


async def test_explain_judges_the_client_certificate(ops: Operations) -> None:
    """For a reseller bound to client certificates, explain with its certificate's fingerprint
    (colon form accepted) allows and with another says client_certificate_mismatch; a
    malformed fingerprint is refused with 400."""
    bound = {**DEFAULT_POLICY, "resellers": {**DEFAULT_POLICY["resellers"], "direct": {
        **DEFAULT_POLICY["resellers"]["direct"], "client_cert_sha256": ["ab" * 32]}}}
    version = await ops.put_policy(yaml.safe_dump(bound), 1)
    key_id = (await ops.issue_key({"reseller": "direct"})).key_id
    mine = ExplainQuery(ip=US_IP, key_id=key_id, client_cert_sha256=":".join(["AB"] * 32))
    out = await ops.explain(mine)
    assert out["policy_version"] == version and out["decision"]["decision"] == "allow"
    other = await ops.explain(ExplainQuery(ip=US_IP, key_id=key_id,
                                           client_cert_sha256="cd" * 32))
    assert (other["decision"]["status"], other["decision"]["code"]) == (
        403, "client_certificate_mismatch")
    status, message = await _status(ops.explain(ExplainQuery(
        ip=US_IP, key_id=key_id, client_cert_sha256="not-a-fingerprint")))
    assert status == 400 and "client_cert_sha256" in message


async def test_report_of_resellers_without_traffic(ops: Operations) -> None:
    """The screening report lists every reseller of the policy with all eight signals ok; one
    reseller alone by name; 404 for an unknown reseller, 400 for a bad since."""
    report = await ops.report(None, None)
    assert report["since"] == "24h" and report["window_seconds"] == 86400
    assert [r["reseller"] for r in report["resellers"]] == ["acme", "direct"]
    for r in report["resellers"]:
        assert r["requests"] == 0 and not r["flagged"] and len(r["signals"]) == 8
        assert {s["state"] for s in r["signals"]} == {"ok"}
        assert r["activity_hours"] == [0] * 24
    one = await ops.report("2h", "acme")
    assert [r["reseller"] for r in one["resellers"]] == ["acme"] and one["since"] == "2h"
    assert (await _status(ops.report(None, "nobody")))[0] == 404
    assert (await _status(ops.report("soon", None)))[0] == 400


def _ledger(today: str, old: str) -> dict[UsageKey, Tally]:
    return {UsageKey(today, "acme", "ka", "c1", "claude-x"): Tally(2, 20, 200),
            UsageKey(today, "acme", "kb", None, "claude-x"): Tally(1, 10, 100),
            UsageKey(today, "direct", "kd", "c1", "gpt-4"): Tally(4, 40, 400),
            UsageKey(old, "acme", "ka", "c1", "claude-x"): Tally(8, 80, 800)}


@pytest.mark.parametrize("kind", STORES)
async def test_usage_reads_the_ledger_alike(request: pytest.FixtureRequest, tmp_path: Path,
                                            upstream: FakeUpstream, kind: str) -> None:
    """Both implementations report the same rows and totals of the store's ledger for the
    same query: the day range, the filters and the grouping; a malformed day is 400."""
    async with running_gateway(tmp_path, upstream.url, store=store_config(request, kind)) as gw, \
            _operations("direct", kind, gw) as direct, _operations("admin", kind, gw) as admin:
        today, old = utc_day(time.time()), utc_day(time.time() - 30 * 86400)
        await gw.service.store.add_usage(_ledger(today, old), 400)
        everything = UsageQuery("1970-01-01", today)  # from the oldest day kept
        for ops in (direct, admin):
            out = await ops.usage(everything)
            assert out["totals"] == {"requests": 15, "input_tokens": 150,
                                     "output_tokens": 1500}
            assert [(r["day"], r["key_id"]) for r in out["rows"]] == [
                (old, "ka"), (today, "ka"), (today, "kb"), (today, "kd")]
            recent = await ops.usage(UsageQuery(today, today, reseller="acme", by="model"))
            assert recent["rows"] == [{
                "day": None, "reseller": "acme", "key_id": None, "customer_id": None,
                "model": "claude-x", "requests": 3, "input_tokens": 30,
                "output_tokens": 300}]
            by_customer = await ops.usage(UsageQuery(today, today, customer_id="c1",
                                                     by="customer"))
            assert [(r["reseller"], r["customer_id"], r["requests"])
                    for r in by_customer["rows"]] == [("acme", "c1", 2), ("direct", "c1", 4)]
            assert (await _status(ops.usage(UsageQuery("yesterday", today))))[0] == 400
        for query in (everything, UsageQuery(today, today, key_id="ka", by="day")):
            assert await direct.usage(query) == await admin.usage(query)


@pytest.mark.parametrize("kind", STORES)
async def test_both_read_the_same(request: pytest.FixtureRequest, tmp_path: Path,
                                  upstream: FakeUpstream, kind: str) -> None:
    """Side by side on one store, both implementations read the same keys, policy, audit
    trail and decision trace, whichever of them made the changes."""
    async with running_gateway(tmp_path, upstream.url, store=store_config(request, kind)) as gw, \
            _operations("direct", kind, gw) as direct, _operations("admin", kind, gw) as admin:
        by_admin = (await admin.issue_key({"reseller": "direct", "models": ["claude-*"]}))
        by_direct = (await direct.issue_key({"reseller": "acme", "rpm": 3})).key_id
        await direct.update_key(by_admin.key_id, {"paths": ["/v1/messages"]})
        await admin.revoke_key(by_direct)
        query = ExplainQuery(ip=US_IP, key_id=by_admin.key_id, model="claude-x",
                             path="/v1/messages")
        for read in (lambda o: o.list_keys(), lambda o: o.list_keys("acme"),
                     lambda o: o.show_key(by_direct), lambda o: o.get_policy(),
                     lambda o: o.list_audit(None, 100), lambda o: o.explain(query)):
            assert await read(direct) == await read(admin)


async def test_admin_operations_name_an_unreachable_gateway() -> None:
    """No gateway listening at the admin address: 503, naming the address and what to do."""
    ops = AdminOperations(f"http://127.0.0.1:{free_port()}", "t")
    status, message = await _status(ops.list_keys())
    assert status == 503 and "cannot reach" in message and "gateway run" in message


async def test_admin_operations_refuse_a_wrong_token(tmp_path: Path,
                                                     upstream: FakeUpstream) -> None:
    """A wrong admin token is the admin API's 401, with its message."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        status, message = await _status(AdminOperations(gw.admin_url, "wrong").list_keys())
    assert status == 401 and "Bearer" in message


class _FaultyPolicyStore(MemoryStore):
    """An embedded store whose put_policy fails with a ValueError that is no conflict."""

    async def put_policy(self, doc: str, actor: str, expected_version: int | None = None) -> int:
        raise ValueError("a fault, not a version conflict")


async def test_only_a_policy_conflict_is_a_409(tmp_path: Path) -> None:
    """A ValueError from the store other than PolicyConflict is not answered as a conflict:
    it propagates as the fault it is."""
    config = load_settings(str(write_config(tmp_path, "http://127.0.0.1:1")),
                           require_secrets=False)
    ops = DirectOperations(_FaultyPolicyStore(), config, ACTOR)
    with pytest.raises(ValueError, match="a fault") as err:
        await ops.put_policy(yaml.safe_dump(DEFAULT_POLICY), 1)
    assert not isinstance(err.value, OperationError)


async def test_direct_operations_on_an_unreachable_store(tmp_path: Path) -> None:
    """A Redis nobody listens on is a 503, with the store's own message."""
    path = write_config(tmp_path, "http://127.0.0.1:1",
                        store={"url": f"redis://127.0.0.1:{free_port()}/0", "timeout_s": 0.5})
    config = load_settings(str(path), require_secrets=False)
    with pytest.raises(OperationError) as err:
        async with direct_operations(config, ACTOR) as ops:
            await ops.list_keys()
    assert err.value.status == 503 and str(err.value)
