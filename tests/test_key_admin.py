"""Unit tests for gateway.key_admin: validation of issued and updated keys, ISO times, rotation and
revocation, on the embedded store in-process."""

from __future__ import annotations

import json
import time

import pytest

from gateway.errors import OperationError
from gateway.identity import hash_secret, parse_key
from gateway.key_admin import (
    iso_time,
    issue_key,
    list_keys,
    revoke_key,
    rotate_key,
    show,
    update_key,
    with_iso_times,
)
from gateway.store.memory import MemoryStore


async def _store() -> MemoryStore:
    store = MemoryStore()
    await store.put_policy(json.dumps({"resellers": {"acme": {}, "beta": {}}}), "test")
    return store


def test_iso_time_is_utc_whole_seconds_with_z() -> None:
    """Unix times print as ISO 8601 UTC with a Z, fractions dropped; None stays None."""
    assert iso_time(0) == "1970-01-01T00:00:00Z"
    assert iso_time(1_700_000_000.9) == "2023-11-14T22:13:20Z"
    assert iso_time(None) is None


def test_with_iso_times_adds_a_twin_for_each_time_field() -> None:
    """Each numeric time field gets `<field>_iso`; a null one gets None; others are left."""
    doc = with_iso_times({"expires_at": 0, "created_at": None, "name": "n"})
    assert doc["expires_at_iso"] == "1970-01-01T00:00:00Z"
    assert doc["created_at_iso"] is None
    assert "name_iso" not in doc and "updated_at_iso" not in doc


async def test_issue_key_stores_hashes_and_normalises_fields() -> None:
    """An issued key stores only the secret's hash; comma lists split, countries upper-cased."""
    store = await _store()
    rec, full = await issue_key(store, {"reseller": "acme", "models": "claude-*, gpt-4o",
                                        "countries": ["de", "unknown"], "rpm": 10,
                                        "limits": {"itpm": 100}}, "alice")
    assert rec.models == ["claude-*", "gpt-4o"]
    assert rec.countries == ["DE", "unknown"]
    assert rec.limits == {"rpm": 10, "itpm": 100}
    stored = await store.get_key(rec.key_id)
    assert stored is not None and full not in stored.to_json()
    parsed = parse_key(full)
    assert parsed is not None and parsed[0] == rec.key_id
    assert stored.secret_hash == hash_secret(parsed[1])
    assert "secret_hash" not in show(stored)


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "reseller is required"),
    ({"reseller": "nobody"}, "not in the live policy"),
    ({"reseller": "acme", "colour": "red"}, "unknown field"),
    ({"reseller": "acme", "models": ["claude-[3"]}, "unbalanced"),
    ({"reseller": "acme", "models": [""]}, "list of strings"),
    ({"reseller": "acme", "countries": ["DEU"]}, "not an ISO country code"),
    ({"reseller": "acme", "rpm": -1}, "non-negative integer"),
    ({"reseller": "acme", "rpm": True}, "non-negative integer"),
    ({"reseller": "acme", "limits": [1]}, "limits must be an object"),
    ({"reseller": "acme", "expires_at": 1.0}, "in the past"),
    ({"reseller": "acme", "expires_at": "tomorrow"}, "Unix time"),
    ({"reseller": "acme", "name": 5}, "name must be a string"),
])
async def test_issue_key_refuses_bad_specs_with_a_400(spec: dict[str, object],
                                                      message: str) -> None:
    """Every invalid field is an OperationError 400 that names the problem; nothing is stored."""
    store = await _store()
    with pytest.raises(OperationError, match=message) as err:
        await issue_key(store, spec, "alice")
    assert err.value.status == 400
    assert await store.list_keys() == []


async def test_issue_key_without_a_policy_says_to_apply_one() -> None:
    """With no policy stored, issuing is refused and the message says what to do."""
    with pytest.raises(OperationError, match="apply one"):
        await issue_key(MemoryStore(), {"reseller": "acme"}, "alice")


async def test_update_key_changes_and_clears_fields() -> None:
    """update_key sets the fields given and null clears one."""
    store = await _store()
    rec, _ = await issue_key(store, {"reseller": "acme", "models": ["a"], "rpm": 5}, "alice")
    out = await update_key(store, rec.key_id, {"models": None, "name": "new"}, "alice")
    assert out["models"] == [] and out["name"] == "new"
    stored = await store.get_key(rec.key_id)
    assert stored is not None and stored.name == "new"


async def test_rotate_keeps_the_old_secret_for_the_overlap_and_revoke_drops_it() -> None:
    """Rotation keeps the previous hash until the overlap ends; revocation clears it."""
    store = await _store()
    rec, first = await issue_key(store, {"reseller": "acme"}, "alice")
    old_hash = rec.secret_hash
    rotated, second = await rotate_key(store, rec.key_id, "alice", overlap_s=60)
    assert second != first
    assert rotated.prev_secret_hash == old_hash
    assert rotated.prev_valid_until is not None and rotated.prev_valid_until > time.time()
    shown = await revoke_key(store, rec.key_id, "alice")
    assert shown["status"] == "revoked" and shown["prev_valid_until"] is None
    with pytest.raises(OperationError) as err:
        await rotate_key(store, rec.key_id, "alice")
    assert err.value.status == 409


async def test_unknown_key_is_a_404_and_list_filters_by_reseller() -> None:
    """Operations on an unknown key id are 404; list_keys filters by reseller."""
    store = await _store()
    await issue_key(store, {"reseller": "acme"}, "alice")
    await issue_key(store, {"reseller": "beta"}, "alice")
    with pytest.raises(OperationError) as err:
        await revoke_key(store, "k_missing", "alice")
    assert err.value.status == 404
    assert [k["reseller"] for k in await list_keys(store, "beta")] == ["beta"]
    assert len(await list_keys(store)) == 2


async def test_every_limit_dimension_is_a_key_limit() -> None:
    """A key takes its own limit in each dimension the store limits, and an update clears each
    back to the policy's default."""
    from gateway.store.base import DIMENSIONS

    store = await _store()
    own = {f: n for n, f in enumerate(DIMENSIONS, 1)}
    rec, _ = await issue_key(store, {"reseller": "acme", **own}, "alice")
    assert rec.limits == own
    shown = await update_key(store, rec.key_id, dict.fromkeys(DIMENSIONS), "alice")
    assert shown["limits"] == {}


async def test_a_key_has_its_own_quotas_from_issue() -> None:
    """`quotas` at issue are stored on the key, shown, and named in the issue's audit event."""
    store = await _store()
    rec, _ = await issue_key(store, {"reseller": "acme", "quotas": {
        "monthly.requests": 1000, "daily.output_tokens": 0}}, "alice")
    assert rec.quotas == {"daily.output_tokens": 0, "monthly.requests": 1000}
    stored = await store.get_key(rec.key_id)
    assert stored is not None and stored.quotas == rec.quotas
    assert show(rec)["quotas"] == rec.quotas
    issued = (await store.list_audit(None, 10))[-1]
    assert issued["action"] == "key_issued" and issued["quotas"] == rec.quotas


@pytest.mark.parametrize(("quotas", "named"), [
    ({"weekly.requests": 1}, "quotas.weekly.requests: unknown period 'weekly'"),
    ({"requests": 1}, "quotas.requests: unknown period 'requests'"),
    ({"daily.tokens": 1}, "quotas.daily.tokens: unknown dimension 'tokens'"),
    ({"daily.requests": -1}, "quotas.daily.requests: must be a non-negative integer"),
    ({"daily.requests": 1.5}, "quotas.daily.requests: must be a non-negative integer"),
    ({"daily.requests": "10"}, "quotas.daily.requests: must be a non-negative integer"),
    ({"daily.requests": True}, "quotas.daily.requests: must be a non-negative integer"),
    ({"daily.requests": None}, "quotas.daily.requests: must be a non-negative integer"),
    (["daily.requests"], "quotas must be an object"),
])
async def test_bad_quotas_are_a_400_naming_the_field(quotas: object, named: str) -> None:
    """An unknown period or dimension, or a value that is no non-negative integer, is refused
    at issue and at update with a 400 naming the quota; nothing is stored."""
    store = await _store()
    with pytest.raises(OperationError) as err:
        await issue_key(store, {"reseller": "acme", "quotas": quotas}, "alice")
    assert err.value.status == 400 and named in str(err.value)
    assert await store.list_keys() == []
    rec, _ = await issue_key(store, {"reseller": "acme"}, "alice")
    if quotas != {"daily.requests": None}:  # null clears at update (next test)
        with pytest.raises(OperationError) as err:
            await update_key(store, rec.key_id, {"quotas": quotas}, "alice")
        assert err.value.status == 400 and named in str(err.value)


async def test_update_merges_quotas_null_removes_one_and_all() -> None:
    """An update sets the quotas it names and keeps the others; a null quota removes it; a
    null `quotas` removes them all. Each change is audited with from/to."""
    store = await _store()
    rec, _ = await issue_key(store, {"reseller": "acme", "quotas": {"daily.requests": 5}},
                             "alice")
    shown = await update_key(store, rec.key_id, {"quotas": {"monthly.input_tokens": 7}},
                             "bob")
    assert shown["quotas"] == {"daily.requests": 5, "monthly.input_tokens": 7}
    shown = await update_key(store, rec.key_id, {"quotas": {"daily.requests": None}}, "bob")
    assert shown["quotas"] == {"monthly.input_tokens": 7}
    event = (await store.list_audit(None, 10))[-1]
    assert event["action"] == "key_updated" and event["fields"] == ["quotas"]
    assert event["changes"]["quotas"] == {
        "from": {"daily.requests": 5, "monthly.input_tokens": 7},
        "to": {"monthly.input_tokens": 7}}
    assert (await update_key(store, rec.key_id, {"quotas": None}, "bob"))["quotas"] == {}
    stored = await store.get_key(rec.key_id)
    assert stored is not None and stored.quotas == {}
