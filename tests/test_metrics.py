"""Unit tests for gateway.metrics: hot-path tallies reach the Prometheus families on flush,
and country labels stay bounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway import metrics
from gateway.metrics import _Count, _Hist, child, country_label


def test_country_label_is_a_two_letter_code_or_unknown() -> None:
    """Only two-letter alphabetic codes are labels; anything else is `unknown`."""
    assert country_label("DE") == "DE"
    for bad in (None, "", "D", "DEU", "1A", "--"):
        assert country_label(bad) == "unknown"


def test_counts_reach_the_family_only_on_flush() -> None:
    """Increments are tallied in a dict and added to the labelled counter on flush."""
    reg = CollectorRegistry()
    family = Counter("t_requests_total", "t", ["decision"], registry=reg)
    count = _Count(family)
    count.inc(("allow",))
    count.inc(("allow",), 2)
    count.inc(("deny",))
    assert reg.get_sample_value("t_requests_total", {"decision": "allow"}) is None
    count.flush()
    assert reg.get_sample_value("t_requests_total", {"decision": "allow"}) == 3
    assert reg.get_sample_value("t_requests_total", {"decision": "deny"}) == 1
    count.flush()  # nothing pending: nothing added twice
    assert reg.get_sample_value("t_requests_total", {"decision": "allow"}) == 3


def test_histogram_observations_land_in_their_buckets_on_flush() -> None:
    """Observations are bucketed like Prometheus would, with their sum, on flush."""
    reg = CollectorRegistry()
    family = Histogram("t_seconds", "t", buckets=(0.1, 1.0), registry=reg)
    hist = _Hist(family)
    for v in (0.05, 0.1, 0.5, 7.0):
        hist.observe(v)
    hist.flush()
    assert reg.get_sample_value("t_seconds_bucket", {"le": "0.1"}) == 2
    assert reg.get_sample_value("t_seconds_bucket", {"le": "1.0"}) == 3
    assert reg.get_sample_value("t_seconds_bucket", {"le": "+Inf"}) == 4
    assert reg.get_sample_value("t_seconds_sum") == 7.65
    hist.flush()
    assert reg.get_sample_value("t_seconds_count") == 4


def test_child_is_cached_per_family_and_labels() -> None:
    """child returns the same labelled child for the same family and labels."""
    reg = CollectorRegistry()
    family = Counter("t_cached_total", "t", ["a"], registry=reg)
    assert child(family, "x") is child(family, "x")
    assert child(family, "x") is not child(family, "y")


def test_render_exposes_the_gateway_families() -> None:
    """The exposition of this process names the gateway's metric families."""
    text = metrics.render().decode()
    assert "gateway_requests_total" in text
    assert "gateway_inflight_requests" in text
