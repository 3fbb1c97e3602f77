"""Unit tests for gateway.self_service: the `GET /v1/gateway/key` answer built from a key
record, the policy and a ledger over the embedded store."""

from __future__ import annotations

import json
import time

from gateway.ledger import Ledger, use_of
from gateway.policy import CompiledPolicy, compile_policy, validate_policy
from gateway.self_service import describe_key, key_limits
from gateway.store.base import KeyRecord
from gateway.store.memory import MemoryStore


def _policy() -> CompiledPolicy:
    return compile_policy(validate_policy({
        "resellers": {"acme": {"quotas": {"daily": {"requests": 5}}}},
        "limits": {"key": {"rpm": 60, "otpm": 1000,
                           "quotas": {"monthly": {"output_tokens": 100}}}},
    }, "p.yaml"), 1)


def test_key_limits_are_the_keys_own_over_the_policy_default() -> None:
    """Each dimension is the key's own limit, else `limits.key`, else None."""
    key = KeyRecord("k1", "acme", "h", limits={"rpm": 2})
    assert key_limits(_policy(), key) == {
        "rpm": 2, "itpm": None, "otpm": 1000, "concurrency": None}


async def test_describe_key_has_the_binding_shape_and_no_secret() -> None:
    """The answer has the binding fields: scopes, effective limits and quotas, usage today and
    this month, what is left under the tightest quota; no hash of any secret."""
    store = MemoryStore()
    await store.start()
    try:
        ledger = Ledger(store, 400)
        key = KeyRecord("k1", "acme", "secret-hash-value", models=["claude-*"],
                        countries=["US"], expires_at=2e9, prev_secret_hash="old-hash-value",
                        quotas={"daily.requests": 3})
        watched = await ledger.watch("acme", "k1", True, True)
        now = time.time()
        ledger.record("acme", "k1", None, "claude-x", 20, 40, now)
        ledger.record("acme", "k2", None, "claude-x", 1, 1, now)
        body = describe_key(_policy(), key, *use_of(watched, now))
    finally:
        await store.close()
    assert list(body) == ["key_id", "reseller", "status", "expires_at", "scopes", "limits",
                          "remaining", "quotas", "usage"]
    assert body["scopes"] == {"models": ["claude-*"], "paths": [], "countries": ["US"]}
    assert body["expires_at"] == 2e9 and body["status"] == "active"
    assert body["usage"] == {"today": {"requests": 1, "input_tokens": 20, "output_tokens": 40},
                             "month": {"requests": 1, "input_tokens": 20,
                                       "output_tokens": 40}}
    # key: 3 a day (1 used), reseller: 5 a day (2 used); key's monthly output 100 (40 used)
    assert body["remaining"] == {"requests": 2, "input_tokens": None, "output_tokens": 60}
    assert body["quotas"]["key"]["monthly"]["output_tokens"] == 100
    assert body["quotas"]["reseller"]["daily"]["requests"] == 5
    text = json.dumps(body)
    assert "hash" not in text
