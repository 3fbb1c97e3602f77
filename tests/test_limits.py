"""Unit tests for gateway.limits: retry-after rounding, the rate-limit headers, what a finished
request is charged, and the timing of admissions."""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from gateway.errors import GatewayError
from gateway.limits import Admission, Limits, rate_headers, retry_after_s, settlement
from gateway.proxy import Forwarded
from gateway.store.base import Bucket, Subject
from gateway.store.memory import MemoryStore
from gateway.usage import Usage

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")

# --- retry_after_s -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "seconds"),
    [(-5.0, 1), (0.0, 1), (0.4, 1), (999.0, 1), (1000.0, 1), (1000.1, 2), (1999.0, 2),
     (6000.0, 6), (59_999.5, 60), (60_000.0, 60), (61_000.0, 61)],
)
def test_retry_after_rounds_up_at_least_one(ms: float, seconds: int) -> None:
    """retry-after is the wait in whole seconds, rounded up, never below 1."""
    assert retry_after_s(ms) == seconds


# --- rate_headers --------------------------------------------------------------------------------


def _reset_in(value: str) -> float:
    assert RFC3339.match(value), value
    return datetime.fromisoformat(value).timestamp() - time.time()


def test_anthropic_headers() -> None:
    """Anthropic family: limit, remaining and RFC 3339 reset for requests and both token kinds."""
    buckets = {"rpm": Bucket(60, 59, 1000.0), "itpm": Bucket(1000, 400, 36_000.0),
               "otpm": Bucket(500, 0, 60_000.0)}
    h = rate_headers(buckets, "anthropic")
    assert set(h) == {
        f"anthropic-ratelimit-{kind}-{part}"
        for kind in ("requests", "input-tokens", "output-tokens")
        for part in ("limit", "remaining", "reset")
    }
    assert h["anthropic-ratelimit-requests-limit"] == "60"
    assert h["anthropic-ratelimit-requests-remaining"] == "59"
    assert h["anthropic-ratelimit-input-tokens-limit"] == "1000"
    assert h["anthropic-ratelimit-input-tokens-remaining"] == "400"
    assert h["anthropic-ratelimit-output-tokens-limit"] == "500"
    assert h["anthropic-ratelimit-output-tokens-remaining"] == "0"
    assert -1.5 <= _reset_in(h["anthropic-ratelimit-requests-reset"]) <= 2.5
    assert 34.5 <= _reset_in(h["anthropic-ratelimit-input-tokens-reset"]) <= 37.5
    assert 58.5 <= _reset_in(h["anthropic-ratelimit-output-tokens-reset"]) <= 61.5


def test_anthropic_headers_only_for_limited_dimensions() -> None:
    """Dimensions without a bucket send no headers."""
    h = rate_headers({"rpm": Bucket(10, 3, 500.0)}, "anthropic")
    assert set(h) == {
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    }
    assert rate_headers({}, "anthropic") == {}
    assert rate_headers({}, "openai") == {}


def test_openai_headers() -> None:
    """OpenAI family: requests, and tokens from the tighter of the input and output buckets."""
    buckets = {"rpm": Bucket(60, 59, 1000.0), "itpm": Bucket(1000, 400, 36_000.0),
               "otpm": Bucket(500, 20, 360_000.0)}
    assert rate_headers(buckets, "openai") == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "500",
        "x-ratelimit-remaining-tokens": "20",
        "x-ratelimit-reset-tokens": "6m0s",
    }


@pytest.mark.parametrize(
    ("reset_ms", "text"),
    [(0.0, "0ms"), (20.0, "20ms"), (999.0, "999ms"), (1000.0, "1s"), (1500.0, "1.5s"),
     (12_345.0, "12.3s"), (90_000.0, "1m30s"), (360_000.0, "6m0s")],
)
def test_openai_reset_durations(reset_ms: float, text: str) -> None:
    """OpenAI reset values use its duration format (20ms, 1.5s, 6m0s)."""
    h = rate_headers({"itpm": Bucket(100, 1, reset_ms)}, "openai")
    assert h["x-ratelimit-reset-tokens"] == text
    assert "x-ratelimit-limit-requests" not in h


# --- settlement ----------------------------------------------------------------------------------


def _adm() -> Admission:
    return Admission((Subject("key", "k1", "acme", rpm=10),), "lease-1", 100, 500, False)


@pytest.mark.parametrize(("fwd", "expected"), [
    (None, (0, 0)),  # refused after admission, before the forward stage
    (Forwarded(), (0, 0)),  # never sent
    (Forwarded(sent=True, failed=True), (0, 0)),  # 502 / 504
    (Forwarded(sent=True, upstream_status=429, metered=True, usage=Usage(7, 3)), (0, 0)),
    (Forwarded(sent=True, upstream_status=200, metered=True, usage=Usage(7, 3)), (7, 3)),
    (Forwarded(sent=True, upstream_status=200, metered=True), (0, 0)),  # no usage reported
    (Forwarded(sent=True, upstream_status=200, usage=Usage(7, 3)), (7, 500)),  # cut short
    (Forwarded(sent=True, upstream_status=200), (100, 500)),  # client gone: reservations
])
def test_settlement_refunds_failures_and_charges_what_was_delivered(
        fwd: Forwarded | None, expected: tuple[int, int]) -> None:
    """Nothing is charged for a request the upstream never served or answered with an error;
    a metered answer is charged its usage; an answer cut short at least its reservations."""
    assert settlement(_adm(), fwd) == expected


# --- admission timing ----------------------------------------------------------------------------


async def test_admissions_of_limited_requests_are_timed_whatever_their_end() -> None:
    """Each admission of a request with limited subjects is timed, a refused one too; one
    with no limited subject makes no store call and is not timed."""
    seen: list[float] = []
    limits = Limits(MemoryStore(), "closed", 1, "anthropic", observe_admission=seen.append)
    subjects = (Subject("key", "k1", "acme", rpm=1),)
    adm, _ = await limits.admit(subjects, 10, 10)
    assert adm is not None and len(seen) == 1
    with pytest.raises(GatewayError) as err:
        await limits.admit(subjects, 10, 10)
    assert err.value.status == 429 and len(seen) == 2
    assert await limits.admit((), 10, 10) == (None, {}) and len(seen) == 2
    assert all(0.0 <= s < 5.0 for s in seen)
