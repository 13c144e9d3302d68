"""OpenTelemetry tracing: one trace per TaskRun, from the watcher's enqueue through every task, LLM request
and tool call.

The trace id is derived from the TaskRun's uid (and stored in ``status.spanContext``), so every process
computes the same trace without coordination; a tool call belongs to its TaskRun's trace. The exporter is
OTLP over HTTP when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``..._TRACES_ENDPOINT`` is set.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
TRACER_NAME = "kubechain"


def run_trace_ids(run_uid: str) -> dict[str, str]:
    """The TaskRun's trace id and root span id (hex), as stored in status.spanContext."""
    digest = hashlib.sha256(run_uid.encode()).hexdigest()
    return {"traceID": digest[:32], "spanID": digest[32:48]}


def exporting(environ: Mapping[str, str]) -> bool:
    """Whether spans go anywhere: an OTLP endpoint is configured and the SDK is not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup_tracing(service_name: str) -> None:
    """Install a tracer provider exporting with OTLP/HTTP, when an endpoint is configured. Without one,
    spans stay the API's no-op spans: nothing would see them, and recording them cost a worker ~2 % of its
    CPU. A no-op span carries its parent's context, so messages and logs still name the run's trace."""
    if isinstance(trace.get_tracer_provider(), TracerProvider) or not exporting(os.environ):
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def run_context(run_uid: str) -> otel_context.Context:
    """A context whose (remote) parent is the TaskRun's root span."""
    ids = run_trace_ids(run_uid)
    parent = SpanContext(
        trace_id=int(ids["traceID"], 16),
        span_id=int(ids["spanID"], 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def traceparent_of(span: Span) -> str:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def current_traceparent() -> str | None:
    """The traceparent of the span this code runs in, if any: a task that enqueues follow-up work (a
    scheduled re-check) passes it on, so that work stays in the run's trace."""
    span = trace.get_current_span()
    return traceparent_of(span) if span.get_span_context().is_valid else None


def context_from(traceparent: str | None, run_uid: str) -> otel_context.Context | None:
    if traceparent:
        return _propagator.extract({"traceparent": traceparent})
    return run_context(run_uid) if run_uid else None


@cache
def _tracer() -> trace.Tracer:
    # One tracer per process: the SDK builds a new one per get_tracer() call. Taken before the provider is
    # set, it is a proxy that switches to the real tracer once setup_tracing() runs.
    return trace.get_tracer(TRACER_NAME)


@contextmanager
def span(name: str, parent: otel_context.Context | None, **attributes: Any) -> Iterator[Span]:
    with _tracer().start_as_current_span(
        name, context=parent, attributes={k: v for k, v in attributes.items() if v is not None}
    ) as current:
        yield current
