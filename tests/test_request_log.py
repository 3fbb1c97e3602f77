"""Unit tests for gateway.request_log: the worker number, the `request` line in JSON and console
format, and the level filter that never drops request or audit lines."""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Iterator

import pytest

from gateway.context import RequestContext
from gateway.hash_chain import Verified, verify_lines
from gateway.log import logger
from gateway.request_log import (
    WORKER_ENV,
    configure_logging,
    log_request,
    set_log_stream,
    worker_id,
)


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    set_log_stream(stream)
    try:
        yield stream
    finally:
        set_log_stream(None)
        configure_logging("info", "json")


def _ctx() -> RequestContext:
    ctx = RequestContext("req_1", "127.0.0.1", "POST", "/v1/messages", time.perf_counter())
    ctx.reseller, ctx.status, ctx.input_tokens = "acme", 200, 12
    return ctx


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("0", 0), ("", None), ("x", None),
                                                 ("-1", None)])
def test_worker_id_reads_the_worker_env(monkeypatch: pytest.MonkeyPatch, value: str,
                                        expected: int | None) -> None:
    """A worker's number comes from GATEWAY_WORKER_ID; anything not a number is no worker."""
    monkeypatch.setenv(WORKER_ENV, value)
    assert worker_id() == expected


def test_json_request_line_carries_every_field_and_the_worker(
        monkeypatch: pytest.MonkeyPatch, out: io.StringIO) -> None:
    """In JSON format the request line is one object with the context's fields, the event,
    level, a UTC timestamp and the worker number."""
    monkeypatch.setenv(WORKER_ENV, "2")
    configure_logging("info", "json")
    ctx = _ctx()
    log_request(ctx)
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["event"] == "request" and line["level"] == "info" and line["worker"] == 2
    assert line["timestamp"].endswith("Z")
    assert {k: line[k] for k in ctx.log_fields()} == ctx.log_fields()


def test_console_request_line_goes_through_structlog(out: io.StringIO) -> None:
    """In console format the request line is rendered by structlog, with its request id."""
    configure_logging("info", "console")
    log_request(_ctx())
    assert "request" in out.getvalue() and "req_1" in out.getvalue()


def test_level_filters_diagnostics_only(out: io.StringIO) -> None:
    """At log.level warning, info diagnostics are dropped; request lines and warnings pass."""
    configure_logging("warning", "json")
    logger().info("policy_loaded", version=1)
    logger().warning("geo_database_missing", path="x.mmdb")
    log_request(_ctx())
    events = [json.loads(x)["event"] for x in out.getvalue().splitlines()]
    assert events == ["geo_database_missing", "request"]


def test_hash_chain_seals_request_audit_and_other_lines_in_print_order(
        out: io.StringIO) -> None:
    """With the chain on, structlog events and the fast request line share one chain in the
    order printed, filtered lines take no link, and the chain survives a reconfiguration."""
    configure_logging("warning", "json", True)
    logger().warning("geo_database_missing", path="x.mmdb")
    logger().info("policy_loaded", version=1)  # filtered: never printed, never chained
    log_request(_ctx())
    logger().info("audit", action="key_issued", target="k1")
    configure_logging("info", "json", True)  # a reload keeps the process's chain
    logger().info("config_reloaded")
    lines = out.getvalue().splitlines()
    objs = [json.loads(x) for x in lines]
    assert [o["event"] for o in objs] == ["geo_database_missing", "request", "audit",
                                          "config_reloaded"]
    assert len({o["chain_id"] for o in objs}) == 1
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(objs))
    assert verify_lines(lines) == Verified(4, 1)


def test_hash_chain_off_adds_nothing(out: io.StringIO) -> None:
    """Without the chain no line carries chain_id, prev_hash or hash."""
    configure_logging("info", "json", False)
    log_request(_ctx())
    logger().info("audit", action="key_issued")
    for line in out.getvalue().splitlines():
        assert not {"chain_id", "prev_hash", "hash"} & set(json.loads(line))
