"""gateway.store.gcra: the in-process limiter (GCRA buckets, token reservations, leases,
clean-up) behind the embedded store and the `on_error: open` fallback."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from gateway.errors import StoreError
from gateway.limits import retry_after_s
from gateway.store.base import (
    WINDOW_MS,
    AdmitRequest,
    AdmitResult,
    Bucket,
    Settlement,
    Subject,
)
from gateway.store.gcra import Limiter

# --- Limiter: GCRA -------------------------------------------------------------------------------


def _subject(kind: str = "key", ident: str = "k1", **limits: int) -> Subject:
    return Subject(kind, ident, "r", **limits)


def _req(*subjects: Subject, lease: str = "l", inp: int = 0, out: int = 0,
         ttl_ms: int = 60_000) -> AdmitRequest:
    return AdmitRequest(tuple(subjects), lease, ttl_ms, inp, out)


def _admit_n(lim: Limiter, req: AdmitRequest, now: float, n: int) -> list[AdmitResult]:
    return [lim.admit(req, now_ms=now) for _ in range(n)]


@pytest.mark.parametrize("limit", [1, 2, 7, 60, 600, 6000])
def test_gcra_burst_is_the_whole_limit(limit: int) -> None:
    """A limit of L per minute admits exactly L at once, then refuses for 60000/L ms."""
    lim = Limiter()
    req = _req(_subject(rpm=limit))
    assert all(r.ok for r in _admit_n(lim, req, 0.0, limit))
    refused = lim.admit(req, now_ms=0.0)
    assert not refused.ok
    assert (refused.failed_dimension, refused.failed_subject) == ("rpm", "key:k1")
    assert refused.retry_after_ms == pytest.approx(WINDOW_MS / limit)


def test_gcra_refills_continuously() -> None:
    """Capacity returns one request per 60000/L ms, not all at once at a window edge."""
    lim = Limiter()
    req = _req(_subject(rpm=60))  # one per second
    assert all(r.ok for r in _admit_n(lim, req, 0.0, 60))
    half = lim.admit(req, now_ms=500.0)
    assert not half.ok and half.retry_after_ms == pytest.approx(500.0)
    assert lim.admit(req, now_ms=1000.0).ok
    assert not lim.admit(req, now_ms=1000.0).ok
    results = _admit_n(lim, req, 31_000.0, 31)
    assert [r.ok for r in results] == [True] * 30 + [False]
    assert results[-1].retry_after_ms == pytest.approx(1000.0)


def test_gcra_buckets_report_remaining_and_reset() -> None:
    """Each admission reports the bucket's limit, what remains and when it is full again."""
    lim = Limiter()
    req = _req(_subject(rpm=10, itpm=1000, otpm=100), inp=250, out=10)
    first = lim.admit(req, now_ms=0.0)
    assert first.ok
    assert first.buckets == {"rpm": Bucket(10, 9, 6000.0), "itpm": Bucket(1000, 750, 15_000.0),
                             "otpm": Bucket(100, 90, 6000.0)}
    second = lim.admit(req, now_ms=0.0)
    assert second.buckets["itpm"] == Bucket(1000, 500, 30_000.0)


def test_buckets_report_the_tightest_subject() -> None:
    """With several subjects, each dimension reports the subject with the least remaining."""
    lim = Limiter()
    key = _subject("key", "k1", rpm=100)
    reseller = _subject("reseller", "r", rpm=10)
    res = lim.admit(_req(key, reseller), now_ms=0.0)
    assert res.buckets["rpm"] == Bucket(10, 9, 6000.0)


def test_refusal_consumes_nothing_in_other_dimensions() -> None:
    """A request refused on input tokens leaves its requests bucket untouched."""
    lim = Limiter()
    s = _subject(rpm=2, itpm=100)
    assert lim.admit(_req(s, inp=100), now_ms=0.0).ok
    refused = lim.admit(_req(s, inp=50), now_ms=0.0)
    assert (refused.ok, refused.failed_dimension) == (False, "itpm")
    assert refused.retry_after_ms == pytest.approx(50 * WINDOW_MS / 100)
    ok = lim.admit(_req(s, inp=0), now_ms=0.0)  # the refused request did not use the 2nd rpm slot
    assert ok.ok and ok.buckets["rpm"].remaining == 0
    assert lim.admit(_req(s, inp=0), now_ms=0.0).failed_dimension == "rpm"


def test_refusal_consumes_nothing_in_other_subjects() -> None:
    """A request refused for the reseller consumes nothing from the key."""
    lim = Limiter()
    key = _subject("key", "k1", rpm=10)
    reseller = _subject("reseller", "r", rpm=1)
    assert lim.admit(_req(key, reseller), now_ms=0.0).ok
    refused = lim.admit(_req(key, reseller), now_ms=0.0)
    assert (refused.failed_dimension, refused.failed_subject) == ("rpm", "reseller:r")
    alone = lim.admit(_req(key), now_ms=0.0)
    assert alone.buckets["rpm"] == Bucket(10, 8, 12_000.0)


def test_concurrency_refusal_consumes_no_tokens() -> None:
    """A request refused on concurrency consumes no request or token capacity."""
    lim = Limiter()
    s = _subject(rpm=3, itpm=300, concurrency=1)
    assert lim.admit(_req(s, lease="a", inp=100), now_ms=0.0).ok
    refused = lim.admit(_req(s, lease="b", inp=100), now_ms=0.0)
    assert (refused.ok, refused.failed_dimension) == (False, "concurrency")
    lim.settle(Settlement((s,), "a", 100, 0, 100, 0), now_ms=0.0)
    res = lim.admit(_req(s, lease="c", inp=100), now_ms=0.0)
    assert res.ok
    assert res.buckets["rpm"].remaining == 1 and res.buckets["itpm"].remaining == 100


def test_cost_larger_than_limit_is_charged_as_whole_bucket() -> None:
    """A request bigger than the whole bucket passes on a full bucket and empties it."""
    lim = Limiter()
    s = _subject(itpm=100)
    big = lim.admit(_req(s, inp=500), now_ms=0.0)
    assert big.ok and big.buckets["itpm"] == Bucket(100, 0, WINDOW_MS)
    refused = lim.admit(_req(s, inp=1), now_ms=0.0)
    assert not refused.ok and refused.retry_after_ms == pytest.approx(WINDOW_MS / 100)
    assert not lim.admit(_req(s, inp=500), now_ms=WINDOW_MS - 1).ok
    assert lim.admit(_req(s, inp=500), now_ms=WINDOW_MS).ok


def test_zero_limits_are_unlimited() -> None:
    """A dimension with limit 0 is not limited and reports no bucket."""
    lim = Limiter()
    req = _req(_subject(rpm=1), inp=10**9, out=10**9)
    res = lim.admit(req, now_ms=0.0)
    assert res.ok and set(res.buckets) == {"rpm"}
    assert lim.admit(_req(_subject("key", "free")), now_ms=0.0) == AdmitResult(True)


# --- Limiter: settlement -------------------------------------------------------------------------


def test_settlement_refunds_unused_tokens() -> None:
    """Settling below the reservation gives the difference back."""
    lim = Limiter()
    s = _subject(otpm=100)
    assert lim.admit(_req(s, out=80), now_ms=0.0).buckets["otpm"].remaining == 20
    lim.settle(Settlement((s,), "l", 0, 80, 0, 30), now_ms=0.0)
    assert all(r.ok for r in _admit_n(lim, _req(s, out=10), 0.0, 7))
    assert not lim.admit(_req(s, out=1), now_ms=0.0).ok


def test_settlement_refund_never_beyond_a_full_bucket() -> None:
    """Refunds stop at a full bucket: the bucket never holds more than its limit."""
    lim = Limiter()
    s = _subject(itpm=100)
    assert lim.admit(_req(s, inp=50), now_ms=0.0).ok
    lim.settle(Settlement((s,), "l", 50, 0, 0, 0), now_ms=0.0)
    lim.settle(Settlement((s,), "l", 50, 0, 0, 0), now_ms=0.0)  # a duplicate refund
    assert lim.admit(_req(s, inp=100), now_ms=0.0).ok
    assert not lim.admit(_req(s, inp=1), now_ms=0.0).ok


def test_settlement_debits_extra_tokens() -> None:
    """Settling above the reservation charges the difference."""
    lim = Limiter()
    s = _subject(itpm=100, otpm=100)
    assert lim.admit(_req(s, inp=10, out=10), now_ms=0.0).ok
    lim.settle(Settlement((s,), "l", 10, 10, 60, 10), now_ms=0.0)
    res = lim.admit(_req(s, inp=40, out=0), now_ms=0.0)
    assert res.ok and res.buckets["itpm"].remaining == 0
    assert lim.admit(_req(s, inp=1), now_ms=0.0).failed_dimension == "itpm"
    assert lim.admit(_req(s, out=80), now_ms=0.0).ok  # output bucket only had its 10


def test_settlement_debt_beyond_the_bucket_delays_admission() -> None:
    """Usage far above the limit leaves a debt that delays the next admission."""
    lim = Limiter()
    s = _subject(otpm=100)
    assert lim.admit(_req(s, out=10), now_ms=0.0).ok
    lim.settle(Settlement((s,), "l", 0, 10, 0, 250), now_ms=0.0)
    refused = lim.admit(_req(s, out=1), now_ms=0.0)
    assert not refused.ok
    assert refused.retry_after_ms == pytest.approx(151 * WINDOW_MS / 100)


def test_settlement_of_oversized_reservation_uses_the_charged_cost() -> None:
    """Settlement corrects from what was charged (capped at the bucket), not what was asked."""
    lim = Limiter()
    s = _subject(itpm=100)
    assert lim.admit(_req(s, inp=500), now_ms=0.0).ok  # charged 100
    lim.settle(Settlement((s,), "l", 500, 0, 100, 0), now_ms=0.0)  # actual == charged
    assert not lim.admit(_req(s, inp=1), now_ms=0.0).ok


# --- Limiter: concurrency leases -----------------------------------------------------------------


def test_concurrency_limit_and_release() -> None:
    """Open leases up to the limit are admitted; settling releases one."""
    lim = Limiter()
    s = _subject(concurrency=2)
    assert lim.admit(_req(s, lease="a"), now_ms=0.0).ok
    assert lim.admit(_req(s, lease="b"), now_ms=0.0).ok
    refused = lim.admit(_req(s, lease="c"), now_ms=0.0)
    assert (refused.ok, refused.failed_dimension, refused.failed_subject) == (
        False, "concurrency", "key:k1")
    assert retry_after_s(refused.retry_after_ms) == 1
    lim.settle(Settlement((s,), "a", 0, 0, 0, 0), now_ms=1.0)
    assert lim.admit(_req(s, lease="c"), now_ms=1.0).ok
    assert not lim.admit(_req(s, lease="d"), now_ms=1.0).ok


def test_expired_leases_are_reclaimed() -> None:
    """Leases of a dead instance stop counting once they expire."""
    lim = Limiter()
    s = _subject(concurrency=2)
    assert lim.admit(_req(s, lease="a", ttl_ms=1000), now_ms=0.0).ok
    assert lim.admit(_req(s, lease="b", ttl_ms=5000), now_ms=0.0).ok
    assert not lim.admit(_req(s, lease="c"), now_ms=999.0).ok
    assert lim.admit(_req(s, lease="c"), now_ms=1000.0).ok
    assert not lim.admit(_req(s, lease="d"), now_ms=1000.0).ok


def test_concurrency_is_per_subject() -> None:
    """A full subject refuses even when another subject of the request has room."""
    lim = Limiter()
    key1 = _subject("key", "k1", concurrency=5)
    key2 = _subject("key", "k2", concurrency=5)
    reseller = _subject("reseller", "r", concurrency=1)
    assert lim.admit(_req(key1, reseller, lease="a"), now_ms=0.0).ok
    refused = lim.admit(_req(key2, reseller, lease="b"), now_ms=0.0)
    assert refused.failed_subject == "reseller:r"
    assert lim.admit(_req(key2, lease="b"), now_ms=0.0).ok


# --- Limiter: divisor (on_error: open fallback) --------------------------------------------------


@pytest.mark.parametrize(
    ("divisor", "limit", "admitted"),
    [(1, 10, 10), (2, 10, 5), (3, 10, 3), (4, 1, 1), (10, 9, 1), (4, 100, 25)],
)
def test_divisor_divides_rpm(divisor: int, limit: int, admitted: int) -> None:
    """Each of N fallback instances admits limit // N (at least 1)."""
    lim = Limiter(divisor=divisor)
    results = _admit_n(lim, _req(_subject(rpm=limit)), 0.0, admitted + 1)
    assert [r.ok for r in results] == [True] * admitted + [False]
    assert results[0].buckets["rpm"].limit == admitted


def test_divisor_divides_tokens_and_concurrency() -> None:
    """Token buckets and concurrency are divided too."""
    lim = Limiter(divisor=2)
    s = _subject(itpm=100, concurrency=4)
    assert lim.admit(_req(s, lease="a", inp=50), now_ms=0.0).ok
    assert lim.admit(_req(s, lease="b", inp=1), now_ms=0.0).failed_dimension == "itpm"
    lim.settle(Settlement((s,), "a", 50, 0, 0, 0), now_ms=0.0)
    assert lim.admit(_req(s, lease="c"), now_ms=0.0).ok
    assert lim.admit(_req(s, lease="d"), now_ms=0.0).ok
    assert lim.admit(_req(s, lease="e"), now_ms=0.0).failed_dimension == "concurrency"


# --- Limiter: clean-up of expired entries ---------------------------------------------------------


def test_full_buckets_and_expired_leases_are_dropped_many_subjects() -> None:
    """Past the window, 50k subjects' full buckets and expired leases leave the tables: memory
    holds only what is still live."""
    lim = Limiter()
    for i in range(50_000):
        assert lim.admit(_req(_subject("customer", f"c{i}", rpm=10, concurrency=2),
                              lease=f"l{i}", ttl_ms=30_000), now_ms=0.0).ok
    assert len(lim.tat) == 50_000
    live = _subject("key", "live", rpm=10, concurrency=2)
    assert lim.admit(_req(live, lease="x", ttl_ms=120_000), now_ms=61_000.0).ok
    # Only the subject admitted last is left, in both tables.
    assert list(lim.tat) == [lim._key(live, "rpm")]
    assert list(lim.leases) == [lim._key(live, "concurrency")]


def test_cleanup_keeps_live_entries_and_their_limits() -> None:
    """Clean-up never drops a bucket or lease that still counts: a drained bucket and a held
    lease from t=0 still refuse at t=30 s while 100k other subjects expire around them."""
    lim = Limiter()
    drained = _subject("key", "drained", rpm=1)
    holder = _subject("key", "holder", concurrency=1)
    assert lim.admit(_req(drained), now_ms=0.0).ok
    assert lim.admit(_req(holder, lease="held", ttl_ms=600_000), now_ms=0.0).ok
    for i in range(100_000):
        lim.admit(_req(_subject("customer", f"c{i}", rpm=60, concurrency=1), lease=f"l{i}",
                       ttl_ms=1000), now_ms=0.0)
    assert lim.admit(_req(drained), now_ms=30_000.0).failed_dimension == "rpm"
    assert lim.admit(_req(holder, lease="again"), now_ms=30_000.0).failed_dimension == (
        "concurrency")
    # The others (1 request of 60 rpm: full after 1 s; leases of 1 s) are gone.
    assert list(lim.tat) == [lim._key(drained, "rpm")]
    assert list(lim.leases) == [lim._key(holder, "concurrency")]
    lim.settle(Settlement((holder,), "held", 0, 0, 0, 0), now_ms=30_000.0)
    assert lim.admit(_req(holder, lease="again"), now_ms=30_000.0).ok
    assert lim.admit(_req(drained), now_ms=60_000.0).ok


def test_settled_refund_to_full_bucket_is_dropped() -> None:
    """A refund that fills a bucket again lets the entry go at the next clean-up."""
    lim = Limiter()
    s = _subject(itpm=1000)
    assert lim.admit(_req(s, inp=500), now_ms=0.0).ok
    lim.settle(Settlement((s,), "l", 500, 0, 0, 0), now_ms=0.0)
    lim.admit(_req(_subject("key", "other", rpm=6000)), now_ms=1.0)
    assert lim._key(s, "itpm") not in lim.tat


# --- Limiter: admission markers (a retried settlement or cancel applies once) --------------------


def _marks_held(lim: Limiter) -> int:
    return len(lim._marks) + len(lim._marks_old)


def test_markers_live_one_to_two_minutes_then_go() -> None:
    """A settled request's marker outlasts a minute (its retried settlement is a no-op) and is
    gone within two: over five minutes at 10 requests/s at most two minutes of markers are
    held, whatever the traffic before."""
    lim = Limiter()
    s = _subject(itpm=10**6)
    for i in range(3000):
        now = i * 100.0
        lim.admit(_req(s, lease=f"l{i}", inp=10), now_ms=now)
        lim.settle(Settlement((s,), f"l{i}", 10, 0, 10, 0), now_ms=now)
        if i >= 600:  # the request of a minute ago: its retry applies nothing
            before = lim.tat[lim._key(s, "itpm")]
            lim.settle(Settlement((s,), f"l{i - 600}", 10, 0, 1000, 0), now_ms=now)
            assert lim.tat[lim._key(s, "itpm")] == before
        assert _marks_held(lim) <= 2 * 600 + 2
    assert lim._state("l0") is None and lim._state("l1700") is None
    assert lim._state("l2999") == "s"


def test_a_lease_ttl_longer_than_a_minute_keeps_its_marker_as_long() -> None:
    """A cancel's tombstone lives the request's own lease ttl when it is longer than the
    minute other markers live: its admission is still void 4.9 minutes on, while the markers
    of the requests around it come and go."""
    lim = Limiter()
    s = _subject(rpm=10**6)
    gone = _req(s, lease="gone", ttl_ms=300_000)
    lim.cancel(gone, now_ms=0.0)
    for i in range(1, 295):
        assert lim.admit(_req(s, lease=f"l{i}"), now_ms=i * 1000.0).ok
    with pytest.raises(StoreError):
        lim.admit(gone, now_ms=294_000.0)


def test_a_settled_request_holds_under_160_bytes() -> None:
    """What the limiter keeps of an admitted and settled request, until its marker goes, is
    its marker alone: under 160 bytes with three subjects limited on every dimension (it was
    ≈ 320: a tuple, a float and a queue entry per marker write)."""
    subjects = tuple(_subject(kind, ident, rpm=10**9, itpm=10**9, otpm=10**9,
                              concurrency=10_000)
                     for kind, ident in (("key", "k1"), ("reseller", "r"), ("customer", "c1")))

    def serve(lim: Limiter, first: int, n: int) -> None:
        for i in range(first, first + n):
            lease = f"0123456789ab:{i:x}"
            lim.admit(AdmitRequest(subjects, lease, 60_000, 400, 1000), now_ms=i * 2.0)
            lim.settle(Settlement(subjects, lease, 400, 1000, 380, 250), now_ms=i * 2.0)

    lim = Limiter()
    serve(lim, 0, 2000)  # buckets, heaps and dicts at their working sizes
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        serve(lim, 2000, 10_000)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / 10_000 < 160
