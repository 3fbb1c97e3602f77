"""Unit tests for gateway.context: client strings are clipped, request ids never repeat, the
log line has every field."""

from __future__ import annotations

import re

from gateway.context import CLIENT_STRING_MAX, RequestContext, clip, new_request_id


def test_clip_keeps_short_strings_and_none() -> None:
    """A string up to the bound, and None, come back unchanged."""
    assert clip(None) is None
    assert clip("") == ""
    s = "x" * CLIENT_STRING_MAX
    assert clip(s) is s


def test_clip_cuts_long_strings_and_says_how_much() -> None:
    """A longer string is cut at the bound and says how many characters were dropped."""
    out = clip("a" * 10 + "b" * 5, limit=10)
    assert out == "a" * 10 + "…(+5 chars)"
    assert clip("x" * (CLIENT_STRING_MAX + 1)) == "x" * CLIENT_STRING_MAX + "…(+1 chars)"


def test_log_fields_are_all_present_and_follow_the_context() -> None:
    """log_fields holds every binding field, None when unknown, values as set."""
    ctx = RequestContext("req_1", "10.0.0.1", "POST", "/v1/messages", 0.0)
    fields = ctx.log_fields()
    assert fields["request_id"] == "req_1"
    assert fields["peer_ip"] == "10.0.0.1"
    assert fields["client_ip"] is None and fields["key_id"] is None
    assert fields["decision"] == "allow"
    for name in ("country", "asn", "reseller", "model", "rule", "reason", "status",
                 "input_tokens", "output_tokens"):
        assert name in fields, name
    ctx.decision, ctx.key_id, ctx.status = "deny", "k1", 403
    again = ctx.log_fields()
    assert (again["decision"], again["key_id"], again["status"]) == ("deny", "k1", 403)


def test_contexts_do_not_share_lists() -> None:
    """The list fields are per context: appending to one leaves another alone."""
    a = RequestContext("a", "1.1.1.1", "GET", "/", 0.0)
    b = RequestContext("b", "1.1.1.1", "GET", "/", 0.0)
    a.shadow.append("rule1")
    a.anonymizer.append("tor")
    assert b.shadow == [] and b.anonymizer == []


def test_request_ids_are_unique_and_well_formed() -> None:
    """Generated ids share this process's random prefix and never repeat."""
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"req_[0-9a-f]{12}[0-9a-f]{12}", i) for i in ids)
    assert len({i[:16] for i in ids}) == 1
