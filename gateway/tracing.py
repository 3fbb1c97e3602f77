"""OpenTelemetry tracing of proxy requests (docs/architecture.md §7, "Tracing").

Off by default, and then free: nothing here imports opentelemetry until `Tracer` is built
(`tracing.enabled: true`), and the pipeline pays one `if` per hook on a `None` tracer.

On, each request is one SERVER span (`gateway.request`) with a child span per stage it
passed (client_ip, geo, auth, body, decision, admit, forward, settle), each from the end of
the stage before it. The pipeline only records a stage's name and end time while the request
runs (a list append); the spans are built once the request is finished. The request's
`traceparent` (W3C) continues the caller's trace when the peer is a trusted proxy
(`client_ip.trusted_proxies`), otherwise a new trace starts; the upstream gets a
`traceparent` naming the request span. Spans carry no key, token, address or customer id.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from gateway.context import RequestContext
from gateway.settings import ConfigError, LoadedConfig, TracingSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

#: The stages, in pipeline order, that a request may pass (child span names).
STAGES = ("client_ip", "geo", "auth", "body", "decision", "admit", "forward", "settle")

OTEL_MISSING = ("tracing.enabled needs the OpenTelemetry packages: "
                "pip install 'gateway[otel]' (opentelemetry-sdk and the OTLP exporter)")


class TracingUnavailable(RuntimeError):
    """`tracing.enabled: true` without the `otel` extra installed."""


class Tracer:
    """The process's tracer: a TracerProvider (built from the settings, or given by a test)
    and the W3C trace-context propagator."""

    def __init__(self, settings: TracingSettings, provider: TracerProvider | None = None) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace import (
                SpanKind,
                Status,
                StatusCode,
                set_span_in_context,
            )
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:
            raise TracingUnavailable(OTEL_MISSING) from exc
        self.settings = settings
        if provider is None:
            provider = TracerProvider(
                resource=Resource.create({"service.name": settings.service_name}),
                sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
            if settings.exporter == "otlp":
                try:
                    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                        OTLPSpanExporter,
                    )
                except ImportError as exc:
                    raise TracingUnavailable(OTEL_MISSING) from exc
                from opentelemetry.sdk.trace.export import BatchSpanProcessor
                # endpoint None: the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT.
                provider.add_span_processor(BatchSpanProcessor(
                    OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        self.provider = provider
        self.tracer = provider.get_tracer("gateway")
        self.propagator = TraceContextTextMapPropagator()
        # What the per-request hooks use, imported once here (not once per request).
        self.server_kind = SpanKind.SERVER
        self.status: Any = Status
        self.error_code: Any = StatusCode.ERROR
        self.in_context = set_span_in_context

    def start(self, headers: Mapping[str, str], peer_trusted: bool,
              started: float) -> RequestTrace:
        """The trace of a request that began at `started` (time.perf_counter()): it continues
        the incoming `traceparent` only when `peer_trusted`."""
        parent = None
        if peer_trusted and "traceparent" in headers:
            carrier = {"traceparent": headers["traceparent"]}
            if "tracestate" in headers:
                carrier["tracestate"] = headers["tracestate"]
            parent = self.propagator.extract(carrier)
        start_ns = time.time_ns() - int((time.perf_counter() - started) * 1e9)
        span = self.tracer.start_span("gateway.request", context=parent, kind=self.server_kind,
                                      start_time=start_ns)
        return RequestTrace(self, span, start_ns)

    def shutdown(self) -> None:
        """Export what is buffered (at gateway stop)."""
        self.provider.shutdown()


class RequestTrace:
    """One request's span and the stage marks recorded while it runs."""

    __slots__ = ("marks", "span", "start_ns", "tracer")

    def __init__(self, tracer: Tracer, span: Any, start_ns: int) -> None:
        self.tracer = tracer
        self.span = span
        self.start_ns = start_ns
        self.marks: list[tuple[str, int]] = []

    def mark(self, stage: str) -> None:
        """The stage `stage` ended now."""
        self.marks.append((stage, time.time_ns()))

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Set `traceparent` (and `tracestate`) on the upstream request's headers, replacing
        any the client sent."""
        for name in ("traceparent", "tracestate"):
            if name in headers:
                del headers[name]
        self.tracer.propagator.inject(headers, context=self.tracer.in_context(self.span))

    def finish(self, ctx: RequestContext) -> None:
        """Build the stage spans from the marks, label the request span from the finished
        request's record, and end it."""
        end_ns = time.time_ns()
        span = self.span
        parent = self.tracer.in_context(span)
        begin = self.start_ns
        for stage, at in self.marks:
            child = self.tracer.tracer.start_span(stage, context=parent, start_time=begin)
            child.end(end_time=at)
            begin = at
        attrs: dict[str, Any] = {
            "gateway.request_id": ctx.request_id,
            "gateway.decision": ctx.decision,
            "http.request.method": ctx.method,
            "url.path": ctx.path,
            "gateway.stream": ctx.stream,
        }
        optional: dict[str, Any] = {
            "gateway.reseller": ctx.reseller,
            "gateway.reason": ctx.reason,
            "gateway.rule": ctx.rule,
            "gateway.model": ctx.model,
            "gateway.country": ctx.country,
            "http.response.status_code": ctx.status,
            "gateway.upstream_status": ctx.upstream_status,
            "gateway.input_tokens": ctx.input_tokens,
            "gateway.output_tokens": ctx.output_tokens,
        }
        attrs.update({k: v for k, v in optional.items() if v is not None})
        span.set_attributes(attrs)
        if ctx.status is not None and ctx.status >= 500:
            span.set_status(self.tracer.status(self.tracer.error_code, ctx.reason or None))
        span.end(end_time=end_ns)


def from_config(config: LoadedConfig) -> Tracer | None:
    """The process's tracer, or None when tracing is off (opentelemetry is then not imported).
    Raises ConfigError (`tracing.enabled`) when the `otel` extra is not installed."""
    settings = config.settings.tracing
    if not settings.enabled:
        return None
    try:
        return Tracer(settings)
    except TracingUnavailable as exc:
        raise ConfigError(config.path, "tracing.enabled", str(exc)) from None
