"""Unit tests for gateway.metrics: hot-path tallies reach the Prometheus families on flush,
country and reseller labels stay bounded, and a finished request is tallied whole."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway import metrics
from gateway.context import RequestContext
from gateway.metrics import _Count, _Hist, child, country_label, record_request, reseller_label
from gateway.proxy import Forwarded
from gateway.usage import Usage


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


def test_reseller_label_is_known_other_or_none() -> None:
    """A reseller the policy names is its own label; one it does not name is `other`; no
    identified key is `none`."""
    assert reseller_label("acme", {"acme": 1}) == "acme"
    assert reseller_label("gone", {"acme": 1}) == "other"
    assert reseller_label("acme", ()) == "other"
    assert reseller_label(None, {"acme": 1}) == "none"


def _pending() -> tuple[dict[tuple[str, ...], float], ...]:
    return tuple(dict(c.pending) for c in (metrics.requests, metrics.shadow,
                                           metrics.upstream_responses, metrics.tokens))


def _observed() -> tuple[int, ...]:
    return tuple(sum(h.counts) for h in (metrics.request_duration, metrics.upstream_duration,
                                         metrics.upstream_ttfb))


def _delta(before: dict[tuple[str, ...], float], after: dict[tuple[str, ...], float]
           ) -> dict[tuple[str, ...], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def test_record_request_tallies_outcome_tokens_and_upstream() -> None:
    """A served request counts its outcome with bounded labels, its shadow matches, tokens by
    direction and reseller, the upstream status, and one observation in each histogram."""
    ctx = RequestContext("r1", "127.0.0.1", "POST", "/v1/messages", 0.0)
    ctx.reseller, ctx.country, ctx.shadow = "acme", "DEU", ["rule-x"]
    ctx.input_tokens, ctx.output_tokens = 7, 3
    fwd = Forwarded(sent=True, upstream_status=200, ttfb_s=0.01, upstream_s=0.02,
                    usage=Usage(7, 3))
    before, seen = _pending(), _observed()
    record_request(ctx, fwd, 0.03, {"acme": 1})
    after = _pending()
    assert _delta(before[0], after[0]) == {("allow", "", "acme", "unknown"): 1.0}
    assert _delta(before[1], after[1]) == {("rule-x",): 1.0}
    assert _delta(before[2], after[2]) == {("200",): 1.0}
    assert _delta(before[3], after[3]) == {("input", "acme"): 7.0, ("output", "acme"): 3.0}
    assert [b - a for a, b in zip(seen, _observed(), strict=True)] == [1, 1, 1]


def test_record_request_refused_before_the_upstream_observes_no_upstream() -> None:
    """A request refused before forwarding counts its outcome and duration only."""
    ctx = RequestContext("r2", "127.0.0.1", "POST", "/v1/messages", 0.0)
    ctx.decision, ctx.reason = "deny", "no_api_key"
    before, seen = _pending(), _observed()
    record_request(ctx, None, 0.001, ())
    after = _pending()
    assert _delta(before[0], after[0]) == {("deny", "no_api_key", "none", "unknown"): 1.0}
    assert all(_delta(b, a) == {} for b, a in zip(before[1:], after[1:], strict=True))
    assert [b - a for a, b in zip(seen, _observed(), strict=True)] == [1, 0, 0]


def test_proxy_protocol_rejections_count_by_reason() -> None:
    """proxy_protocol_rejected adds one to gateway_proxy_protocol_rejected_total{reason} at
    once, and the family is exposed."""
    fam = metrics.PROXY_PROTOCOL_REJECTED
    before = fam.labels("untrusted")._value.get()
    metrics.proxy_protocol_rejected("untrusted")
    assert fam.labels("untrusted")._value.get() == before + 1
    assert b'gateway_proxy_protocol_rejected_total{reason="untrusted"}' in metrics.render()


def test_model_label_admits_only_models_the_upstream_accepted_up_to_the_bound() -> None:
    """A model becomes its own label once the upstream answered it below 400, up to
    MODEL_LABELS_MAX; a refused or surplus model is `other`, no model `none`."""
    saved = set(metrics._models)
    metrics._models.clear()
    try:
        assert metrics.model_label(None, 200) == "none"
        assert metrics.model_label("made-up", 404) == "other"
        assert metrics.model_label("made-up", None) == "other"
        assert metrics.model_label("claude-x", 200) == "claude-x"
        assert metrics.model_label("claude-x", 403) == "claude-x"  # known now: stays itself
        for i in range(metrics.MODEL_LABELS_MAX - 1):
            assert metrics.model_label(f"m{i}", 200) == f"m{i}"
        assert metrics.model_label("one-too-many", 200) == "other"
        assert len(metrics._models) == metrics.MODEL_LABELS_MAX
    finally:
        metrics._models.clear()
        metrics._models.update(saved)


def test_build_info_and_model_requests_are_exported() -> None:
    """After a flush the exposition has gateway_build_info 1 with the version and Python
    version, and a finished request is counted by model and decision."""
    import platform

    from gateway import __version__

    ctx = RequestContext(request_id="r", peer_ip="127.0.0.1", method="POST",
                         path="/v1/messages", started=0.0)
    ctx.model, ctx.upstream_status = "claude-test-1", 200
    before = metrics.MODEL_REQUESTS.labels("claude-test-1", "allow")._value.get()
    record_request(ctx, None, 0.01, ())
    metrics.flush(0, 0)
    text = metrics.render().decode()
    assert (f'gateway_build_info{{implementation="{platform.python_implementation().lower()}",'
            f'python="{platform.python_version()}",version="{__version__}"}} 1.0') in text
    after = metrics.MODEL_REQUESTS.labels("claude-test-1", "allow")._value.get()
    assert after == before + 1
