"""Unit tests for gateway.quotas: the effective quotas of a key and its reseller, the check at
admission (codes, retry-after, used >= quota), what is left, and UTC period ends."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.policy import compile_policy, validate_policy
from gateway.quotas import (
    EffectiveQuotas,
    check,
    effective_quotas,
    nested,
    period_end,
    remaining,
    retry_after,
)
from gateway.store.base import KeyRecord, PeriodUse, Tally


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _policy(doc: dict[str, Any]) -> Any:
    return compile_policy(validate_policy(doc, "p.yaml"), 1)


def _use(day: tuple[int, int, int] = (0, 0, 0),
         month: tuple[int, int, int] | None = None) -> PeriodUse:
    return PeriodUse(Tally(*day), Tally(*(month or day)))


NOW = _ts("2026-06-15T12:00:00")


def test_key_quotas_override_the_policy_default_per_entry() -> None:
    """A key's own entries replace `limits.key.quotas` entry by entry; the reseller's come from
    `resellers.R.quotas`; a malformed stored entry is ignored."""
    policy = _policy({"resellers": {"acme": {"quotas": {"monthly": {"requests": 100}}}},
                      "limits": {"key": {"rpm": 5, "quotas": {
                          "daily": {"requests": 10, "output_tokens": 500}}}}})
    key = KeyRecord("k1", "acme", "h", quotas={"daily.requests": 3, "daily.bogus": 1,
                                               "monthly.input_tokens": -1})
    q = effective_quotas(policy, key)
    assert q.key == {"daily.requests": 3, "daily.output_tokens": 500}
    assert q.reseller == {"monthly.requests": 100}
    assert effective_quotas(policy, key) is q  # derived once per policy and key version
    assert not effective_quotas(_policy({}), KeyRecord("k2", "acme", "h"))


def test_check_refuses_when_used_reaches_a_quota() -> None:
    """used < quota admits, used >= quota refuses 429 daily_quota_exceeded with retry-after
    to the next UTC midnight, whichever subject and dimension it is."""
    q = EffectiveQuotas(key={"daily.output_tokens": 100}, reseller={"daily.requests": 5})
    check(q, _use((4, 0, 99)), _use((4, 0, 99)), NOW)
    for key_use, res_use in (((0, 0, 100), (1, 0, 0)), ((1, 0, 1), (5, 0, 0))):
        with pytest.raises(GatewayError) as info:
            check(q, _use(key_use), _use(res_use), NOW)
        err = info.value
        assert (err.status, err.type, err.code) == (429, "rate_limit_error",
                                                    "daily_quota_exceeded")
        assert err.headers["retry-after"] == str(12 * 3600)
        assert err.decision == "rate_limited"


def test_a_monthly_quota_is_reported_before_a_daily_one() -> None:
    """With both used up, the refusal is monthly_quota_exceeded, retry-after to the next
    month; a month's use counts even when today's does not reach it."""
    q = EffectiveQuotas(key={"daily.requests": 1, "monthly.requests": 10}, reseller={})
    with pytest.raises(GatewayError) as info:
        check(q, _use((1, 0, 0), (10, 0, 0)), _use(), NOW)
    assert info.value.code == "monthly_quota_exceeded"
    assert info.value.headers["retry-after"] == str(int(_ts("2026-07-01T00:00:00") - NOW))
    with pytest.raises(GatewayError) as info:
        check(q, _use((0, 0, 0), (10, 0, 0)), _use(), NOW)
    assert info.value.code == "monthly_quota_exceeded"


def test_period_ends_are_utc_midnight_and_month_start() -> None:
    """The next period starts at the next UTC midnight, or the first of the next month (also
    across a year); retry-after rounds up and is at least 1."""
    assert period_end("daily", _ts("2026-02-28T23:00:00")) == _ts("2026-03-01T00:00:00")
    assert period_end("monthly", _ts("2026-12-31T23:59:59")) == _ts("2027-01-01T00:00:00")
    assert period_end("monthly", _ts("2026-01-01T00:00:00")) == _ts("2026-02-01T00:00:00")
    assert retry_after("daily", _ts("2026-02-28T23:59:59.5")) == 1
    assert retry_after("daily", _ts("2026-02-28T23:59:58.5")) == 2


def test_remaining_is_the_tightest_quota_left() -> None:
    """What is left per dimension is the smallest of every applicable quota minus its use,
    never below zero; None where no quota applies."""
    q = EffectiveQuotas(key={"daily.requests": 10, "monthly.output_tokens": 50},
                        reseller={"monthly.requests": 100, "daily.output_tokens": 1000})
    left = remaining(q, _use((4, 0, 30), (20, 0, 60)), _use((4, 0, 30), (95, 0, 60)))
    assert left == {"requests": 5, "input_tokens": None, "output_tokens": 0}


def test_nested_shows_every_period_and_dimension() -> None:
    """nested() turns "daily.requests" entries into the policy's shape, None where unset."""
    assert nested({"daily.requests": 3}) == {
        "daily": {"requests": 3, "input_tokens": None, "output_tokens": None},
        "monthly": {"requests": None, "input_tokens": None, "output_tokens": None}}
