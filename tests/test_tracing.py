"""Tracing (gateway.tracing): a span per proxy request with a child span per stage, the W3C
traceparent continued from a trusted peer only and passed upstream, the OTLP export, and
nothing of opentelemetry imported while tracing is off."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anthropic
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from gateway import tracing
from gateway.context import RequestContext
from gateway.settings import TracingSettings
from tests.support.gateway import ADMIN_TOKEN, UPSTREAM_KEY, RunningGateway, poll, running_gateway
from tests.support.upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[1]
US = "192.0.2.1"
MESSAGE = {"model": "claude-test-1", "max_tokens": 64,
           "messages": [{"role": "user", "content": "hi"}]}
INCOMING = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """An in-memory span exporter, cleared afterwards."""
    exp = InMemorySpanExporter()
    yield exp
    exp.clear()


def _trace(gw: RunningGateway, exporter: InMemorySpanExporter) -> None:
    """Point the gateway's tracer at `exporter` (the config said `exporter: none`)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw.service.pipeline.tracer = tracing.Tracer(TracingSettings(enabled=True, exporter="none"),
                                                provider)


async def _requests(exporter: InMemorySpanExporter, n: int) -> list[ReadableSpan]:
    await poll(lambda: len([s for s in exporter.get_finished_spans()
                            if s.name == "gateway.request"]) >= n)
    return [s for s in exporter.get_finished_spans() if s.name == "gateway.request"]


def _children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id]


def _traceparent(span: ReadableSpan) -> str:
    """version-trace_id-span_id of a traceparent naming `span` (the flags vary)."""
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}"


async def test_an_allowed_request_has_a_span_per_stage_and_its_traceparent_reaches_upstream(
        tmp_path: Path, upstream: FakeUpstream, exporter: InMemorySpanExporter) -> None:
    """An Anthropic SDK call through the gateway makes one `gateway.request` span with the
    reseller, decision and status, a child span for each of the eight stages in order, and
    the upstream receives a traceparent naming that span."""
    async with running_gateway(tmp_path, upstream.url,
                               tracing={"enabled": True, "exporter": "none"}) as gw:
        _trace(gw, exporter)
        _, key = await gw.issue_key()
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers={"X-Forwarded-For": US}) as client:
            msg = await client.messages.create(**MESSAGE)  # type: ignore[call-overload]
        assert msg.content[0].text == upstream.reply_text
        [span] = await _requests(exporter, 1)
        attrs = dict(span.attributes or {})
        assert attrs["gateway.reseller"] == "direct"
        assert attrs["gateway.decision"] == "allow"
        assert attrs["http.response.status_code"] == 200
        assert attrs["gateway.upstream_status"] == 200
        assert attrs["gateway.model"] == "claude-test-1"
        assert attrs["gateway.country"] == "US"
        assert span.parent is None  # no incoming traceparent: a new trace
        stages = sorted(_children(exporter, span), key=lambda s: s.start_time or 0)
        assert [s.name for s in stages] == list(tracing.STAGES)
        for before, after in itertools.pairwise(stages):
            assert before.end_time == after.start_time
        assert upstream.last_request.headers["traceparent"][:-3] == _traceparent(span)
        assert not any(key in str(v) for s in exporter.get_finished_spans()
                       for v in (s.attributes or {}).values())


async def test_a_denied_request_spans_the_stages_it_passed(
        tmp_path: Path, upstream: FakeUpstream, exporter: InMemorySpanExporter) -> None:
    """A request without a key ends at the auth stage: its span says deny and 401 and has
    child spans for client_ip and geo only; nothing reaches the upstream."""
    async with running_gateway(tmp_path, upstream.url,
                               tracing={"enabled": True, "exporter": "none"}) as gw:
        _trace(gw, exporter)
        async with aiohttp.ClientSession() as s, s.post(
                gw.url + "/v1/messages", json=MESSAGE, headers={"X-Forwarded-For": US}) as r:
            assert r.status == 401
        [span] = await _requests(exporter, 1)
        attrs = dict(span.attributes or {})
        assert attrs["gateway.decision"] == "deny"
        assert attrs["http.response.status_code"] == 401
        assert "gateway.reseller" not in attrs
        assert sorted(s.name for s in _children(exporter, span)) == ["client_ip", "geo"]
        assert upstream.requests == []


async def test_a_trusted_peers_traceparent_is_continued(
        tmp_path: Path, upstream: FakeUpstream, exporter: InMemorySpanExporter) -> None:
    """From a trusted proxy (127.0.0.1 by default) the request span joins the incoming trace
    as a child of the caller's span, and the upstream's traceparent carries that trace id."""
    async with running_gateway(tmp_path, upstream.url,
                               tracing={"enabled": True, "exporter": "none"}) as gw:
        _trace(gw, exporter)
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as s, s.post(
                gw.url + "/v1/messages", json=MESSAGE,
                headers={"X-Forwarded-For": US, "x-api-key": key,
                         "traceparent": INCOMING}) as r:
            assert r.status == 200
        [span] = await _requests(exporter, 1)
        assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
        assert span.parent is not None and f"{span.parent.span_id:016x}" == "b7ad6b7169203331"
        sent = upstream.last_request.headers["traceparent"]
        assert sent[:-3] == _traceparent(span) and sent != INCOMING


async def test_an_untrusted_peers_traceparent_starts_a_new_trace(
        tmp_path: Path, upstream: FakeUpstream, exporter: InMemorySpanExporter) -> None:
    """From a peer outside trusted_proxies the incoming traceparent is ignored: a new trace
    starts, and the upstream gets the gateway's traceparent in place of the client's."""
    async with running_gateway(tmp_path, upstream.url,
                               client_ip={"trusted_proxies": ["10.0.0.0/8"]},
                               tracing={"enabled": True, "exporter": "none"}) as gw:
        _trace(gw, exporter)
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as s, s.post(
                gw.url + "/v1/messages", json=MESSAGE,
                headers={"x-api-key": key, "traceparent": INCOMING}) as r:
            status = r.status
        [span] = await _requests(exporter, 1)
        assert span.parent is None
        assert f"{span.context.trace_id:032x}" != "0af7651916cd43dd8448eb211c80319c"
        assert status == 200
        assert upstream.last_request.headers["traceparent"][:-3] == _traceparent(span)


async def test_spans_are_exported_over_otlp_http(tmp_path: Path, upstream: FakeUpstream) -> None:
    """With `exporter: otlp` the spans reach an OTLP/HTTP collector (a local server decoding
    the protobuf export request) by the time the gateway has stopped."""
    bodies: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        bodies.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with running_gateway(
                tmp_path, upstream.url,
                tracing={"enabled": True, "exporter": "otlp", "service_name": "edge-test",
                         "otlp_endpoint": f"http://127.0.0.1:{port}/v1/traces"}) as gw:
            _, key = await gw.issue_key()
            async with aiohttp.ClientSession() as s, s.post(
                    gw.url + "/v1/messages", json=MESSAGE,
                    headers={"X-Forwarded-For": US, "x-api-key": key}) as r:
                assert r.status == 200
        names: set[str] = set()
        services: set[str] = set()
        for body in bodies:
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            for rs in req.resource_spans:
                services |= {a.value.string_value for a in rs.resource.attributes
                             if a.key == "service.name"}
                names |= {sp.name for ss in rs.scope_spans for sp in ss.spans}
        assert services == {"edge-test"}
        assert {"gateway.request", *tracing.STAGES} <= names
    finally:
        await runner.cleanup()


def _python(code: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    prelude = "".join(f"import sys; sys.modules[{m!r}] = None\n" for m in blocked)
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN, UPSTREAM_API_KEY=UPSTREAM_KEY)
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_tracing_off_imports_no_opentelemetry() -> None:
    """With the shipped config (tracing off) building the whole service imports no
    opentelemetry module, and the pipeline's tracer is None."""
    done = _python(
        "import sys, asyncio\n"
        "from gateway.settings import load_settings\n"
        "from gateway.app import GatewayService\n"
        "async def main():\n"
        "    svc = GatewayService(load_settings('config/gateway.yaml'))\n"
        "    assert svc.pipeline.tracer is None\n"
        "    await svc.pipeline.snapshot.parts.upstream.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_tracing_on_without_the_extra_is_a_config_error(tmp_path: Path) -> None:
    """`tracing.enabled: true` without opentelemetry installed is a ConfigError naming the
    field and the `gateway[otel]` extra to install."""
    done = _python(
        "from gateway.settings import load_settings, ConfigError\n"
        "from gateway import tracing\n"
        "cfg = load_settings('config/gateway.yaml', overrides=['tracing.enabled=true'])\n"
        "try:\n"
        "    tracing.from_config(cfg)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n", blocked=("opentelemetry", "opentelemetry.sdk"))
    assert done.returncode == 0, done.stderr
    assert "tracing.enabled" in done.stdout and "gateway[otel]" in done.stdout


def test_settings_default_to_off_with_otlp_when_on() -> None:
    """Tracing is off by default; turned on it exports over OTLP, sampling every trace, and
    a sample ratio outside 0..1 is refused."""
    s = TracingSettings()
    assert s.enabled is False and s.exporter == "otlp" and s.sample_ratio == 1.0
    with pytest.raises(ValueError, match="sample_ratio"):
        TracingSettings(sample_ratio=1.5)


def test_stage_marks_become_consecutive_child_spans(exporter: InMemorySpanExporter) -> None:
    """A request trace turns its marks into child spans, each from the previous mark, and a
    5xx status marks the request span as an error."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tracing.Tracer(TracingSettings(enabled=True, exporter="none"), provider)
    ctx = RequestContext(request_id="r1", peer_ip="127.0.0.1", method="POST",
                         path="/v1/messages", started=time.perf_counter())
    trace = tracer.start({}, True, ctx.started)
    trace.mark("client_ip")
    trace.mark("geo")
    ctx.decision, ctx.status, ctx.reason = "error", 502, "upstream_unavailable"
    trace.finish(ctx)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"gateway.request", "client_ip", "geo"}
    assert spans["client_ip"].end_time == spans["geo"].start_time
    assert spans["client_ip"].start_time == spans["gateway.request"].start_time
    assert spans["gateway.request"].status.status_code is StatusCode.ERROR
