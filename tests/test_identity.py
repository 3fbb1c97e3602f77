"""Tests for gateway.identity: key format, key extraction, customer attestation, key registry."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from gateway.errors import GatewayError, OperationError
from gateway.identity import (
    Attestation,
    KeyRegistry,
    check_usable,
    extract_key,
    new_key,
    parse_attestation,
    parse_key,
)
from gateway.key_admin import issue_key, revoke_key, rotate_key, update_key
from gateway.policy import canonical, validate_policy
from gateway.store.base import KeyRecord
from gateway.store.memory import MemoryStore

KEY_FORMAT = re.compile(r"gk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")
GOOD_ID = "0123456789abcdef"
GOOD_SECRET = "A" * 40 + "-_z"

# --- key format ----------------------------------------------------------------------------------


def test_new_key_format_and_round_trip() -> None:
    """A new key is gk_<16 hex>_<43 urlsafe> and parses back to its id and secret."""
    seen = set()
    for _ in range(50):
        kid, secret, full = new_key()
        assert KEY_FORMAT.fullmatch(full)
        assert full == f"gk_{kid}_{secret}"
        assert parse_key(full) == (kid, secret)
        seen.add(kid)
    assert len(seen) == 50


def test_new_key_keeps_a_given_id() -> None:
    """Rotation reuses the key id with a fresh secret."""
    kid, secret, full = new_key(GOOD_ID)
    kid2, secret2, _ = new_key(GOOD_ID)
    assert kid == kid2 == GOOD_ID and secret != secret2
    assert parse_key(full) == (GOOD_ID, secret)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "gk_",
        f"gk_{GOOD_ID}",
        f"gk_{GOOD_ID}_",
        f"GK_{GOOD_ID}_{GOOD_SECRET}",
        f"sk_{GOOD_ID}_{GOOD_SECRET}",
        f"gk_{GOOD_ID.upper()}_{GOOD_SECRET}",
        f"gk_{GOOD_ID[:-1]}_{GOOD_SECRET}",
        f"gk_{GOOD_ID}0_{GOOD_SECRET}",
        f"gk_{GOOD_ID}_{GOOD_SECRET[:-1]}",
        f"gk_{GOOD_ID}_{GOOD_SECRET}A",
        f"gk_{GOOD_ID}_{GOOD_SECRET[:-1]}=",
        f"gk_{GOOD_ID}_{GOOD_SECRET[:-1]}+",
        f"gk_{GOOD_ID}_{GOOD_SECRET[:-1]}/",
        f" gk_{GOOD_ID}_{GOOD_SECRET}",
        f"gk_{GOOD_ID}_{GOOD_SECRET} ",
        f"gk_{GOOD_ID}_{GOOD_SECRET}\n",
        f"Bearer gk_{GOOD_ID}_{GOOD_SECRET}",
        "sk-ant-api03-xxxxxxxx",
    ],
)
def test_parse_key_refuses_malformed(value: str) -> None:
    """Anything but exactly gk_<16 lowercase hex>_<43 urlsafe chars> is not a key."""
    assert parse_key(value) is None


def test_parse_key_accepts_well_formed() -> None:
    """A well-formed key parses to (key_id, secret)."""
    assert parse_key(f"gk_{GOOD_ID}_{GOOD_SECRET}") == (GOOD_ID, GOOD_SECRET)


# --- extract_key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x_api_key", "authorization", "expected"),
    [
        ("k1", None, "k1"),
        ("  k1 ", None, "k1"),
        ("k1", "Bearer k2", "k1"),
        (None, "Bearer k2", "k2"),
        (None, "bearer k2", "k2"),
        (None, "BEARER   k2  ", "k2"),
        ("", "Bearer k2", "k2"),
        (None, "Basic dXNlcjpwYXNz", None),
        (None, "Token k2", None),
        (None, "Bearer", None),
        (None, "Bearer   ", None),
        (None, "k2", None),
        (None, "", None),
        (None, None, None),
    ],
)
def test_extract_key(x_api_key: str | None, authorization: str | None,
                     expected: str | None) -> None:
    """x-api-key wins; otherwise only an Authorization Bearer token is a key."""
    assert extract_key(x_api_key, authorization) == expected


# --- parse_attestation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cid", "cip", "expected"),
    [
        (None, None, Attestation(None, None)),
        ("cust-42", None, Attestation("cust-42", None)),
        (" cust-42 ", "192.0.2.1", Attestation("cust-42", "192.0.2.1")),
        ("a.b_c:d@e-f", "2001:db8::1", Attestation("a.b_c:d@e-f", "2001:db8::1")),
        ("x" * 128, " 198.51.100.7 ", Attestation("x" * 128, "198.51.100.7")),
        (None, "2001:DB8:0::1", Attestation(None, "2001:db8::1")),
        (None, "::ffff:192.0.2.1", Attestation(None, "192.0.2.1")),
        (None, "::1", Attestation(None, "::1")),
        ("\tcust-42\t", "\t192.0.2.1", Attestation("cust-42", "192.0.2.1")),
    ],
)
def test_parse_attestation_valid(cid: str | None, cip: str | None,
                                 expected: Attestation) -> None:
    """A well-formed customer id and bare address are accepted (the address normalised)."""
    assert parse_attestation(cid, cip) == expected


@pytest.mark.parametrize(
    ("cid", "cip"),
    [
        ("x" * 129, None),
        ("", None),
        ("   ", None),
        ("cust 42", None),
        ("cust/42", None),
        ("cust,42", None),
        ("kunde-ä", None),
        ("cust\x0042", None),
        (None, "192.0.2.1:8080"),
        (None, "[2001:db8::1]"),
        (None, "[2001:db8::1]:443"),
        (None, "fe80::1%eth0"),
        (None, "garbage"),
        (None, "unknown"),
        (None, ""),
        (None, "192.0.2.1, 198.51.100.1"),
        (None, "example.com"),
        ("cust-42", "999.1.1.1"),
        ("\x1ccust-42", None),  # str.strip() would take these for whitespace
        ("cust-42\x85", None),
        ("cust-42\u3000", None),
        ("cust-42\n", None),
        (None, "\x1c192.0.2.1"),
        (None, "192.0.2.1\u00a0"),
        (None, "192.0.2.1\n"),
        (None, "\u0661\u0669\u0662.0.2.1"),
    ],
)
def test_parse_attestation_malformed(cid: str | None, cip: str | None) -> None:
    """Malformed customer ids or addresses are a 400 invalid_customer_attestation."""
    with pytest.raises(GatewayError) as info:
        parse_attestation(cid, cip)
    err = info.value
    assert (err.status, err.type, err.code) == (400, "invalid_request_error",
                                                "invalid_customer_attestation")


# --- KeyRegistry ---------------------------------------------------------------------------------


async def _registry() -> tuple[MemoryStore, KeyRegistry]:
    """An embedded store whose live policy names the reseller `r`, and a registry on it."""
    store = MemoryStore()
    await store.start()
    await store.put_policy(canonical(validate_policy({"resellers": {"r": {}}}, "test")), "test")
    return store, KeyRegistry(store)


def _refused(registry: KeyRegistry, presented: str | None, now: float) -> str | None:
    with pytest.raises(GatewayError) as info:
        registry.authenticate(presented, now)
    err = info.value
    assert (err.status, err.type) == (401, "authentication_error")
    return err.code


async def test_issued_key_authenticates() -> None:
    """An issued key authenticates to its record once the registry has loaded it."""
    store, registry = await _registry()
    rec, full = await issue_key(store, {"reseller": "r"}, "test")
    assert KEY_FORMAT.fullmatch(full)
    now = time.time()
    assert _refused(registry, full, now) == "invalid_api_key"  # not loaded yet
    await registry.load_all()
    got = registry.authenticate(full, now)
    assert (got.key_id, got.reseller, got.status) == (rec.key_id, "r", "active")
    assert registry.last_used[rec.key_id] == now


async def test_store_keeps_only_a_hash_of_the_secret() -> None:
    """The stored record never holds the secret itself."""
    store, _ = await _registry()
    rec, full = await issue_key(store, {"reseller": "r"}, "test")
    parsed = parse_key(full)
    assert parsed is not None
    stored = await store.get_key(rec.key_id)
    assert stored is not None and parsed[1] not in stored.to_json()


async def test_wrong_or_malformed_keys_are_invalid() -> None:
    """Missing, malformed, unknown or wrong-secret keys are 401 invalid_api_key."""
    store, registry = await _registry()
    rec, full = await issue_key(store, {"reseller": "r"}, "test")
    await registry.load_all()
    now = time.time()
    wrong_secret = f"gk_{rec.key_id}_{GOOD_SECRET}"
    unknown_id = f"gk_{GOOD_ID}_{full.split('_', 2)[2]}"
    for presented in (None, "", "garbage", full[:-1], wrong_secret, unknown_id):
        assert _refused(registry, presented, now) == "invalid_api_key", presented


async def test_revoked_key() -> None:
    """A revoked key is 401 key_revoked (and a wrong secret for it still invalid_api_key)."""
    store, registry = await _registry()
    rec, full = await issue_key(store, {"reseller": "r"}, "test")
    await revoke_key(store, rec.key_id, "test")
    await registry.load_all()
    now = time.time()
    assert _refused(registry, full, now) == "key_revoked"
    assert _refused(registry, f"gk_{rec.key_id}_{GOOD_SECRET}", now) == "invalid_api_key"


async def test_refresh_picks_up_revocation() -> None:
    """Refreshing one key after a change event applies the revocation."""
    store, registry = await _registry()
    rec, full = await issue_key(store, {"reseller": "r"}, "test")
    await registry.load_all()
    registry.authenticate(full, time.time())
    await revoke_key(store, rec.key_id, "test")
    await registry.refresh(rec.key_id)
    assert _refused(registry, full, time.time()) == "key_revoked"


async def test_expired_key() -> None:
    """A key whose expires_at has passed is 401 key_expired."""
    store, registry = await _registry()
    now = time.time()
    _, past = await issue_key(store, {"reseller": "r", "expires_at": now + 100}, "test")
    stored = await store.get_key(_kid(past))
    assert stored is not None
    stored.expires_at = now - 10
    await store.put_key(stored)
    rec, later = await issue_key(store, {"reseller": "r", "expires_at": now + 100}, "test")
    await registry.load_all()
    assert _refused(registry, past, now) == "key_expired"
    assert registry.authenticate(later, now).key_id == rec.key_id
    assert _refused(registry, later, now + 100) == "key_expired"


async def test_rotate_with_overlap() -> None:
    """After rotation the new key works and the old one keeps working for the overlap only."""
    store, registry = await _registry()
    rec, old = await issue_key(store, {"reseller": "r"}, "test")
    rotated, new = await rotate_key(store, rec.key_id, "test", 60)
    assert rotated.key_id == rec.key_id and new != old
    assert parse_key(new) == (rec.key_id, new.split("_", 2)[2])
    await registry.load_all()
    now = time.time()
    assert registry.authenticate(new, now).key_id == rec.key_id
    assert registry.authenticate(old, now).key_id == rec.key_id
    assert _refused(registry, old, now + 61) == "invalid_api_key"
    assert registry.authenticate(new, now + 61).key_id == rec.key_id


async def test_rotate_without_overlap() -> None:
    """Rotating with overlap 0 refuses the old key at once."""
    store, registry = await _registry()
    rec, old = await issue_key(store, {"reseller": "r"}, "test")
    _, new = await rotate_key(store, rec.key_id, "test", 0)
    await registry.load_all()
    now = time.time()
    assert registry.authenticate(new, now).key_id == rec.key_id
    assert _refused(registry, old, now) == "invalid_api_key"


async def test_revoke_ends_rotation_overlap() -> None:
    """Revoking a key in its rotation overlap refuses both secrets."""
    store, registry = await _registry()
    rec, old = await issue_key(store, {"reseller": "r"}, "test")
    _, new = await rotate_key(store, rec.key_id, "test", 3600)
    await revoke_key(store, rec.key_id, "test")
    await registry.load_all()
    now = time.time()
    assert _refused(registry, new, now) == "key_revoked"
    assert _refused(registry, old, now) == "invalid_api_key"


async def test_rotate_revoked_key_is_refused() -> None:
    """A revoked key cannot be rotated back to life."""
    store, _ = await _registry()
    rec, _ = await issue_key(store, {"reseller": "r"}, "test")
    await revoke_key(store, rec.key_id, "test")
    with pytest.raises(OperationError) as info:
        await rotate_key(store, rec.key_id, "test", 0)
    assert info.value.status == 409


@pytest.mark.parametrize("paths", [["/v1/[abc"], "/v1/messages**", ["v1/messages"], ["/v1//x"]])
async def test_issue_refuses_invalid_path_globs(paths: list[str] | str) -> None:
    """A key whose path scope is not a valid segment-aware glob is refused at issue (400)."""
    store, _ = await _registry()
    with pytest.raises(OperationError) as info:
        await issue_key(store, {"reseller": "r", "paths": paths}, "test")
    assert info.value.status == 400
    assert str(info.value).startswith("paths: ")
    assert await store.list_keys() == []


async def test_issue_accepts_segment_aware_path_globs() -> None:
    """Valid path globs are stored as given."""
    store, _ = await _registry()
    rec, _ = await issue_key(store, {"reseller": "r", "paths": "/v1/messages,/v1/messages/**"},
                             "test")
    assert rec.paths == ["/v1/messages", "/v1/messages/**"]


def _kid(full: str) -> str:
    parsed = parse_key(full)
    assert parsed is not None
    return parsed[0]


@pytest.mark.parametrize(("spec", "words"), [
    ({"reseller": "nobody"}, "not in the live policy"),
    ({"reseller": "r", "expires_at": 1.0}, "in the past"),
    ({"reseller": "r", "models": ["["]}, "unbalanced '['"),
    ({"reseller": "r", "models": "claude-[abc"}, "unbalanced '['"),
    ({"reseller": "r", "models": ["claude-[!]"]}, "unbalanced '['"),
])
async def test_issue_refuses_unknown_reseller_past_expiry_and_open_bracket(
        spec: dict[str, Any], words: str) -> None:
    """issue_key refuses (400) a reseller the live policy lacks, a past expiry and a model
    glob with an unbalanced '[' (which fnmatch would silently match literally)."""
    store, _ = await _registry()
    with pytest.raises(OperationError) as info:
        await issue_key(store, spec, "test")
    assert info.value.status == 400 and words in str(info.value)
    assert await store.list_keys() == []


async def test_issue_needs_a_stored_policy() -> None:
    """Without a live policy no reseller is known: issue says to apply one first."""
    store = MemoryStore()
    await store.start()
    with pytest.raises(OperationError) as info:
        await issue_key(store, {"reseller": "r"}, "test")
    assert info.value.status == 400 and "policy apply" in str(info.value)


async def test_issue_accepts_balanced_model_classes() -> None:
    """Balanced classes (`[st]`, `[!x]`, `[]]`) are valid model globs."""
    store, _ = await _registry()
    rec, _ = await issue_key(store, {"reseller": "r", "models": ["claude-[st]*", "[!x]*", "[]]"]},
                             "test")
    assert rec.models == ["claude-[st]*", "[!x]*", "[]]"]


async def test_update_key_changes_audits_and_validates() -> None:
    """update_key changes only the given fields (null clears), audits key_updated with the
    changed fields, refuses bad values (400), unknown keys (404) and revoked keys (409)."""
    store, registry = await _registry()
    rec, full = await issue_key(store, {"reseller": "r", "models": ["a-*"], "rpm": 5}, "test")
    shown = await update_key(store, rec.key_id, {"models": None, "otpm": 9, "rpm": None},
                             "tester")
    assert shown["models"] == [] and shown["limits"] == {"otpm": 9}
    assert shown["updated_at_iso"] is not None
    stored = await store.get_key(rec.key_id)
    assert stored is not None and stored.secret_hash == rec.secret_hash
    events = await store.list_audit(None, 10)
    assert events[-1]["action"] == "key_updated" and events[-1]["actor"] == "tester"
    assert events[-1]["fields"] == ["models", "otpm", "rpm"]
    assert events[-1]["changes"]["rpm"] == {"from": 5, "to": None}
    await registry.load_all()
    assert registry.authenticate(full, time.time()).limits == {"otpm": 9}
    for changes, status in (({"models": ["["]}, 400), ({"reseller": "x"}, 400), ({}, 400),
                            ({"expires_at": 2.0}, 400), ({"rpm": -1}, 400)):
        with pytest.raises(OperationError) as info:
            await update_key(store, rec.key_id, changes, "t")
        assert info.value.status == status, changes
    with pytest.raises(OperationError) as info:
        await update_key(store, "0" * 16, {"rpm": 1}, "t")
    assert info.value.status == 404
    await revoke_key(store, rec.key_id, "t")
    with pytest.raises(OperationError) as info:
        await update_key(store, rec.key_id, {"rpm": 1}, "t")
    assert info.value.status == 409
    assert isinstance(await store.get_key(rec.key_id), KeyRecord)


@pytest.mark.parametrize(("status", "expires_at", "code"), [
    ("active", None, None), ("active", 2000.0, None), ("active", 1000.0, "key_expired"),
    ("revoked", None, "key_revoked"), ("revoked", 500.0, "key_revoked"),
])
def test_check_usable_refuses_revoked_then_expired_naming_the_key(
        status: str, expires_at: float | None, code: str | None) -> None:
    """At t=1000 an active key without expiry or expiring later passes; a revoked key is
    `key_revoked` (even when also expired), an expired one `key_expired`: a 401 naming the
    key and its reseller for the log."""
    rec = KeyRecord("k1", "acme", "h" * 64, status=status, expires_at=expires_at)
    if code is None:
        check_usable(rec, 1000.0)
        return
    with pytest.raises(GatewayError) as err:
        check_usable(rec, 1000.0)
    assert (err.value.status, err.value.code) == (401, code)
    assert (err.value.key_id, err.value.reseller) == ("k1", "acme")
