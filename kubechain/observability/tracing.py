"""OpenTelemetry tracing: one trace per TaskRun, from the watcher's enqueue through every task, LLM request
and tool call.

The trace id is derived from the TaskRun's uid (and stored in ``status.spanContext``), so every process
computes the same trace without coordination; a tool call belongs to its TaskRun's trace. The exporter is
OTLP when the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``..._TRACES_ENDPOINT`` is set: over HTTP, or gRPC
when ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL=grpc`` and its exporter is installed; ``OTEL_TRACES_EXPORTER``
picks ``otlp`` (its default), ``console`` or ``none`` as the SDK specification says. ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` describe the process as the SDK defines them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from functools import cache
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_propagator = TraceContextTextMapPropagator()
TRACER_NAME = "kubechain"


def run_trace_ids(run_uid: str) -> dict[str, str]:
    """The TaskRun's trace id and root span id (hex), as stored in status.spanContext."""
    digest = hashlib.sha256(run_uid.encode()).hexdigest()
    return {"traceID": digest[:32], "spanID": digest[32:48]}


TRACES_EXPORTERS = ("otlp", "console", "none")  # OTEL_TRACES_EXPORTER's values this SDK setup knows


def _traces_exporter_setting(environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """``OTEL_TRACES_EXPORTER`` as the SDK environment specification reads it: a comma-separated list,
    ``otlp`` when unset or empty, enum values in any case. Returns the exporters it names (``none``: no
    exporter) and the values not known, which the specification says to warn about and ignore: a list
    of only unknown values is the default, ``otlp``."""
    given = [v.strip().lower() for v in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if v.strip()]
    known = [value for value in given if value in TRACES_EXPORTERS]
    unknown = [value for value in given if value not in TRACES_EXPORTERS]
    if not known:
        known = ["otlp"]
    return [value for value in dict.fromkeys(known) if value != "none"], unknown


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The exporters that take spans: none when the SDK is disabled; OTLP only with an endpoint set."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names, _ = _traces_exporter_setting(environ)
    otlp_endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    return [name for name in names if name != "otlp" or otlp_endpoint]


def exporting(environ: Mapping[str, str]) -> bool:
    """Whether spans go anywhere: the SDK is not disabled, and ``OTEL_TRACES_EXPORTER`` names the console
    or OTLP (its default) with an OTLP endpoint configured."""
    return bool(_exporter_names(environ))


def resource(default_service_name: str) -> Resource:
    """The SDK's resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), named after the process only
    when the environment names no service."""
    named = SERVICE_NAME in OTELResourceDetector().detect().attributes
    return Resource.create({} if named else {SERVICE_NAME: default_service_name})


def span_exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (see ``exporting``): ``console`` writes each span to
    stdout, ``otlp`` sends it (``otlp_span_exporter``). A value not known is warned about and ignored, as
    the SDK environment specification says (so a typo keeps the default, OTLP, rather than losing traces)."""
    _, unknown = _traces_exporter_setting(environ)
    if unknown:
        log.warning(
            "OTEL_TRACES_EXPORTER=%s: %s not supported (otlp, console or none), ignored",
            environ.get("OTEL_TRACES_EXPORTER", ""),
            ", ".join(unknown),
            extra={"exporter": ", ".join(unknown)},
        )
    return [
        ConsoleSpanExporter() if name == "console" else otlp_span_exporter(environ)
        for name in _exporter_names(environ)
    ]


def otlp_span_exporter(environ: Mapping[str, str]) -> SpanExporter:
    """OTLP/HTTP (protobuf), or gRPC when asked for and installed. grpcio is heavy and not a dependency, so
    without it gRPC is not exported silently over HTTP: one warning says what to install or set."""
    protocol = (
        (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        .strip()
        .lower()
    )
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            return GrpcSpanExporter()
        except ImportError:
            log.warning(
                "OTLP protocol grpc asked for, but its exporter is not installed: pip install "
                "opentelemetry-exporter-otlp-proto-grpc, or set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf "
                "with an OTLP/HTTP endpoint (usually port 4318); exporting traces with http/protobuf meanwhile",
                extra={"protocol": protocol},
            )
    elif protocol != "http/protobuf":
        log.warning(
            "OTLP protocol %r is not supported (grpc or http/protobuf); exporting traces with http/protobuf",
            protocol,
            extra={"protocol": protocol},
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class RunSpanIds(RandomIdGenerator):
    """Random ids, except for a run's root span: its ids are derived from the run's uid (run_trace_ids),
    and every other span of the run already names it as its parent."""

    def __init__(self) -> None:
        self._forced = threading.local()

    @contextmanager
    def forced(self, trace_id: int, span_id: int) -> Iterator[None]:
        self._forced.ids = (trace_id, span_id)
        try:
            yield
        finally:
            self._forced.ids = None

    def generate_trace_id(self) -> int:
        ids = getattr(self._forced, "ids", None)
        return ids[0] if ids else super().generate_trace_id()

    def generate_span_id(self) -> int:
        ids = getattr(self._forced, "ids", None)
        return ids[1] if ids else super().generate_span_id()


def _start_span_with_ids(ids: tuple[str, str], name: str, **options: Any) -> Span | None:
    """A span started with the given ids (trace id, span id; hex: the trace id only counts for a root), or
    None when the provider cannot take them (no recording provider of ours)."""
    generator = getattr(trace.get_tracer_provider(), "id_generator", None)
    if not isinstance(generator, RunSpanIds):
        return None
    with generator.forced(int(ids[0], 16), int(ids[1], 16)):  # this span only, not those it starts
        return _tracer().start_span(name, **options)


def tracer_provider(resource: Resource | None = None) -> TracerProvider:
    """A provider that can export runs' root spans (see ``export_run_span``)."""
    return TracerProvider(resource=resource or Resource.create(), id_generator=RunSpanIds())


def export_run_span(
    run_uid: str,
    name: str,
    namespace: str,
    started: datetime,
    ended: datetime,
    error: str | None,
    *,
    linked_from: str | None = None,
) -> None:
    """The run's root span, ``TaskRun`` (its name and namespace are attributes), from its creation to its end. Every span of the run names
    it as parent from the start, but it is only known whole once the run ended: it is made then, by the
    worker whose write ended the run, so trace backends show the run as one tree with a root.
    ``linked_from``: the traceparent of the span that started the run (a sub-agent's run: its delegating
    tool call's, in the parent run's trace), linked to, as the run stays a trace of its own."""
    root = run_trace_ids(run_uid)
    origin = _span_context_of(linked_from)
    run_span = _start_span_with_ids(
        (root["traceID"], root["spanID"]),
        "TaskRun",  # span names stay few (a trace UI lists them); which run is in the attributes
        context=otel_context.Context(),  # a root: no parent, whatever span is current
        kind=SpanKind.SERVER,
        start_time=int(started.timestamp() * 1e9),
        attributes={"taskrun.name": name, "taskrun.namespace": namespace, "taskrun.uid": run_uid},
        links=[Link(origin)] if origin is not None else None,
    )
    if run_span is None:
        return  # not recording (no OTLP endpoint), or a provider that cannot take the run's ids
    run_span.set_status(Status(StatusCode.ERROR, error) if error else Status(StatusCode.OK))
    run_span.end(end_time=int(max(ended, started).timestamp() * 1e9))


def setup_tracing(service_name: str) -> None:
    """Install a tracer provider exporting with the exporters ``OTEL_TRACES_EXPORTER`` names (OTLP by
    default, when an endpoint is configured; ``console``; ``none``). Without one, spans
    stay the API's no-op spans: nothing would see them, and recording them cost a worker ~2 % of its CPU. A
    no-op span carries its parent's context, so messages and logs still name the run's trace.
    ``service_name`` is the default of ``OTEL_SERVICE_NAME``."""
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    exporters = span_exporters(os.environ)
    if not exporters:
        return
    provider = tracer_provider(resource(service_name))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def flush_tracing(timeout_ms: int = 5000) -> None:
    """Send the spans still buffered (a process about to end without running its exit handlers)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_ms)


def run_context(run_uid: str) -> otel_context.Context:
    """A context whose (remote) parent is the TaskRun's root span, sampled as the root itself will be:
    the provider's sampler (OTEL_TRACES_SAMPLER) decides for the run's trace id, so a ratio keeps or
    drops whole runs, their root span included."""
    ids = run_trace_ids(run_uid)
    trace_id = int(ids["traceID"], 16)
    flags = TraceFlags(TraceFlags.SAMPLED if _root_sampled(trace_id) else TraceFlags.DEFAULT)
    parent = SpanContext(trace_id=trace_id, span_id=int(ids["spanID"], 16), is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _root_sampled(trace_id: int) -> bool:
    """The sampler's verdict on the run's root span (``TaskRun/<name>``, no parent)."""
    sampler = getattr(trace.get_tracer_provider(), "sampler", None)
    if sampler is None:
        return True  # no SDK provider: nothing records either way
    # an empty context: no parent (None would be the current context, whose span a ParentBased sampler,
    # the default, would follow: an unsampled task of another run would decide for this run's root)
    verdict = sampler.should_sample(otel_context.Context(), trace_id, "TaskRun")
    return bool(verdict.decision.is_sampled())


def traceparent_of(span: Span) -> str:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def current_traceparent() -> str | None:
    """The traceparent of the span this code runs in, if any: a task that enqueues follow-up work (a
    scheduled re-check) passes it on, so that work stays in the run's trace."""
    span = trace.get_current_span()
    return traceparent_of(span) if span.get_span_context().is_valid else None


def recheck_trace() -> tuple[str | None, str | None]:
    """The traceparent (and the span to link to) of work the current task schedules for itself, a
    re-check: its parent is the current task's parent, so that the re-checks of an approval polled every
    minute are siblings under the span that started the first, not each the child of the one before (a day
    of them nested ~1,440 levels deep); each links to the task that scheduled it. A no-op span (no
    recording provider) already carries its parent's context."""
    current = trace.get_current_span()
    if not current.get_span_context().is_valid:
        return None, None
    parent = getattr(current, "parent", None)  # an SDK span's parent (None for a root)
    if isinstance(parent, SpanContext) and parent.is_valid:
        return traceparent_of(NonRecordingSpan(parent)), traceparent_of(current)
    return traceparent_of(current), None


def context_from(traceparent: str | None, run_uid: str) -> otel_context.Context | None:
    if traceparent:
        return _propagator.extract({"traceparent": traceparent})
    return run_context(run_uid) if run_uid else None


@cache
def _tracer() -> trace.Tracer:
    # One tracer per process: the SDK builds a new one per get_tracer() call. Taken before the provider is
    # set, it is a proxy that switches to the real tracer once setup_tracing() runs.
    return trace.get_tracer(TRACER_NAME)


def toolcall_span_id(toolcall_uid: str, execution: int = 1) -> str:
    """The span id (hex) of a tool call's span, as stored in its status.spanContext: of its first (or
    only) execution, or of a later one (an idempotent tool run again after its worker was lost), each
    of its own."""
    suffix = f"/{execution}" if execution > 1 else ""
    return hashlib.sha256(f"toolcall/{toolcall_uid}{suffix}".encode()).hexdigest()[:16]


def toolcall_traceparent(run_uid: str, toolcall_uid: str) -> str:
    """The traceparent of a tool call's span (its spanContext), sampled as its run's trace is."""
    trace_id = int(run_trace_ids(run_uid)["traceID"], 16)
    flags = TraceFlags(TraceFlags.SAMPLED if _root_sampled(trace_id) else TraceFlags.DEFAULT)
    ids = SpanContext(trace_id, int(toolcall_span_id(toolcall_uid), 16), is_remote=True, trace_flags=flags)
    return traceparent_of(NonRecordingSpan(ids))


def _span_context_of(traceparent: str | None) -> SpanContext | None:
    """The span a traceparent names; None when there is none or it is malformed (an annotation anyone who
    may edit the object can set: it must not break the export)."""
    if not traceparent:
        return None
    found = trace.get_current_span(_propagator.extract({"traceparent": traceparent})).get_span_context()
    return found if found.is_valid else None


def export_toolcall_span(
    run_uid: str,
    toolcall_uid: str,
    tool: str,
    started: datetime,
    ended: datetime,
    error: str | None,
    *,
    linked_run_uid: str | None = None,
    **attributes: Any,
) -> None:
    """The ``ToolCall`` span of a call that no worker executes (delegated to a sub-agent, a question to a
    human): it lasts from its start to its end, across tasks and worker restarts, so it is made once the
    call ended, by the worker whose write ended it, with the ids its spanContext names, under its run's
    root. ``linked_run_uid``: the sub-agent's run it waited for, whose root span it links to."""
    root = run_trace_ids(linked_run_uid) if linked_run_uid else None
    linked = (
        SpanContext(int(root["traceID"], 16), int(root["spanID"], 16), is_remote=True)
        if root is not None
        else None
    )
    call_span = _start_span_with_ids(
        (run_trace_ids(run_uid)["traceID"], toolcall_span_id(toolcall_uid)),
        f"ToolCall {tool}",  # as an executed call's span is named
        context=run_context(run_uid),
        start_time=int(started.timestamp() * 1e9),
        attributes=_present(attributes),
        links=[Link(linked)] if linked is not None else None,
    )
    if call_span is None:
        return  # not recording (no OTLP endpoint), or a provider that cannot take the call's ids
    call_span.set_status(Status(StatusCode.ERROR, error) if error else Status(StatusCode.OK))
    call_span.end(end_time=int(max(ended, started).timestamp() * 1e9))


def _present(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}


@contextmanager
def span(
    name: str,
    parent: otel_context.Context | None,
    linked: str | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    /,
    **attributes: Any,
) -> Iterator[Span]:
    """A span, the current one while it lasts. ``linked``: the traceparent of a span to link to (the
    task that scheduled this one, see ``recheck_trace``); ``kind``: CLIENT for a call to a remote
    service (the LLM)."""
    link_to = _span_context_of(linked) if linked else None
    with _tracer().start_as_current_span(
        name,
        context=parent,
        kind=kind,
        attributes=_present(attributes),
        links=[Link(link_to)] if link_to is not None else None,
    ) as current:
        yield current


@contextmanager
def span_with_ids(
    name: str, parent: otel_context.Context | None, ids: tuple[str, str] | None, **attributes: Any
) -> Iterator[Span]:
    """:func:`span`, with the ids (trace id, span id; hex) a status already names for it (a tool call's
    spanContext) when the provider is ours; the trace id only counts for a root."""
    started = (
        _start_span_with_ids(ids, name, context=parent, attributes=_present(attributes)) if ids else None
    )
    if started is None:
        with span(name, parent, **attributes) as current:
            yield current
        return
    with trace.use_span(started, end_on_exit=True):
        yield started
