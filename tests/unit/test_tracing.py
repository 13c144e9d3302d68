"""One trace per TaskRun: watcher enqueue → tasks → LLM request → tool calls, id in status.spanContext."""

from __future__ import annotations

import logging
import os
import sys
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from kubechain.kube.fake import FakeKubeClient
from kubechain.llm.base import LLMRequest, LLMResponse
from kubechain.models import ToolCall, ToolCallFunction
from kubechain.observability import tracing
from kubechain.queueing import TaskName
from kubechain.settings import Settings
from kubechain.statemachines.routing import work_for
from tests.unit.fakes import FakeLLM, context, create
from tests.unit.test_workers_on_fake import validated

EXPORTER = InMemorySpanExporter()
GRPC_EXPORTER = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    tracer_provider = tracing.tracer_provider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(tracer_provider)


def test_a_run_is_one_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.app as app
    from watcher.main import Watcher

    EXPORTER.clear()
    kube = FakeKubeClient()

    def answer(request: LLMRequest) -> LLMResponse:
        if request.messages[-1].role == "tool":
            return LLMResponse(content="three")
        return LLMResponse(
            tool_calls=[
                ToolCall(id="c1", function=ToolCallFunction(name="add", arguments='{"a": 1, "b": 2}'))
            ]
        )

    llm = FakeLLM(answer)
    validated(kube, llm, ["add"])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "add"})
    app.set_context(context(kube, llm))
    watcher = Watcher(Settings(), kube, lambda *_: None, leader_election=False)
    handlers = {
        TaskName.PREPARE: app.prepare,
        TaskName.LLM_CALL: app.llm_call,
        TaskName.TOOL_CALL: app.tool_call,
    }
    try:
        for _ in range(10):
            pending = [
                (work, obj)
                for (prefix, plural, _, _), obj in list(kube.objects.items())
                if plural in ("taskruns", "taskruntoolcalls")
                for work in work_for(obj["kind"], obj, datetime.now(UTC), 180)
            ]
            if not pending:
                break
            for work, obj in pending:
                message = watcher.message_for(work, obj["metadata"]["resourceVersion"])
                handlers[work.task](message.model_dump())
    finally:
        app.set_context(None)
    run = kube.get_raw("taskruns", "default", "r")
    assert run["status"]["phase"] == "FinalAnswer"
    trace_id = int(run["status"]["spanContext"]["traceID"], 16)
    spans = EXPORTER.get_finished_spans()
    names = [s.name for s in spans]
    assert names.count("LLMRequest") == 2
    assert "ToolCall add" in names
    assert any(n.startswith("enqueue kubechain.llm_call") for n in names)
    assert "tool_call TaskRunToolCall" in names
    assert all("/" not in n and " r" not in n for n in names), "span names carry no resource names"
    assert {s.context.trace_id for s in spans} == {trace_id}, "every span belongs to the run's trace"
    llm_span = next(s for s in spans if s.name == "LLMRequest")
    assert llm_span.attributes is not None and llm_span.attributes["llm.request.model"] == "gpt-4o"
    (root,) = [s for s in spans if s.name == "TaskRun"]
    assert root.attributes is not None and root.attributes["taskrun.name"] == "r"
    assert root.parent is None and root.context.span_id == int(run["status"]["spanContext"]["spanID"], 16)
    assert root.status.status_code == StatusCode.OK and root.end_time and root.start_time <= root.end_time
    (tool_call,) = [o for (_, plural, _, _), o in kube.objects.items() if plural == "taskruntoolcalls"]
    (tool_span,) = [s for s in spans if s.name == "ToolCall add"]
    assert tool_call["status"]["spanContext"] == {
        "traceID": run["status"]["spanContext"]["traceID"],
        "spanID": f"{tool_span.context.span_id:016x}",
    }, "a tool call's spanContext names its execution span in its run's trace"
    by_id = {s.context.span_id: s for s in spans}
    for s in spans:  # every span's ancestry ends at the run's root: one tree
        while s.parent is not None:
            s = by_id[s.parent.span_id]
        assert s is root, s.name


def test_spans_are_recorded_only_when_an_otlp_endpoint_takes_them() -> None:
    from kubechain.observability.tracing import exporting

    assert not exporting({})
    assert exporting({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert exporting({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not exporting(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "True"}
    )


def test_without_a_recording_provider_the_run_trace_still_propagates() -> None:
    from opentelemetry.trace import NoOpTracerProvider

    from kubechain.observability.tracing import run_context, run_trace_ids, traceparent_of

    ids = run_trace_ids("uid-1")
    tracer = NoOpTracerProvider().get_tracer("kubechain")  # what the API gives without setup_tracing
    with tracer.start_as_current_span("enqueue", context=run_context("uid-1")) as current:
        assert traceparent_of(current) == f"00-{ids['traceID']}-{ids['spanID']}-01"


def test_a_scheduled_approval_recheck_stays_in_the_runs_trace() -> None:
    import dataclasses

    from kubechain.observability.tracing import run_context, span
    from tests.unit.test_toolcall_robustness import a_toolcall
    from workers.approvals import _schedule

    kube = FakeKubeClient()
    sent: list[tuple[TaskName, object, float]] = []
    ctx = dataclasses.replace(
        context(kube, FakeLLM(lambda r: LLMResponse())), enqueue=lambda *args: sent.append(args)
    )
    waiting = a_toolcall({"phase": "AwaitingHumanApproval", "claimedAt": "2026-12-01T12:00:00.000000Z"})
    with span("tool_call TaskRunToolCall/tc", run_context("run-uid")) as current:
        _schedule(ctx, waiting)
    ((_, message, _),) = sent
    trace_id = format(current.get_span_context().trace_id, "032x")
    assert message.traceparent and message.traceparent.split("-")[1] == trace_id  # type: ignore[attr-defined]


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[TracerProvider, SpanExporter]]]:
    """What setup_tracing installs, captured instead (this module's provider stays), with an endpoint set
    and no other OTEL_* variable."""
    from kubechain.observability import tracing

    captured: list[tuple[TracerProvider, SpanExporter]] = []
    exporters: list[SpanExporter] = []

    def processor(exporter: SpanExporter) -> SimpleSpanProcessor:
        exporters.append(exporter)
        return SimpleSpanProcessor(exporter)

    monkeypatch.setattr(tracing, "BatchSpanProcessor", processor)
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    monkeypatch.setattr(trace, "set_tracer_provider", lambda p: captured.append((p, exporters[-1])))
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    yield captured
    for provider, _ in captured:
        provider.shutdown()


def test_otel_service_name_and_resource_attributes_describe_the_process(
    installed: list[tuple[TracerProvider, SpanExporter]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubechain.observability.tracing import setup_tracing

    def attributes() -> dict[str, object]:
        setup_tracing("kubechain-worker")
        return dict(installed[-1][0].resource.attributes)

    assert attributes()["service.name"] == "kubechain-worker"  # the default, when the env names none
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.name=from-attributes")
    assert attributes()["service.name"] == "from-attributes"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "agents-llm-worker")
    got = attributes()
    assert got["service.name"] == "agents-llm-worker"  # OTEL_SERVICE_NAME wins, as the spec says
    assert got["deployment.environment"] == "prod"


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
    ],
)
def test_grpc_without_its_exporter_warns_once_and_exports_over_http(
    installed: list[tuple[TracerProvider, SpanExporter]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    env: dict[str, str],
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from kubechain.observability.tracing import setup_tracing

    monkeypatch.setitem(sys.modules, GRPC_EXPORTER, None)  # not installed (grpcio is no dependency)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with caplog.at_level(logging.WARNING):
        setup_tracing("kubechain-worker")
    assert isinstance(installed[-1][1], OTLPSpanExporter)
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "pip install" in warning.getMessage() and "opentelemetry-exporter-otlp-proto-grpc" in (
        warning.getMessage()
    )
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf" in warning.getMessage()


def test_grpc_uses_the_grpc_exporter_when_installed(
    installed: list[tuple[TracerProvider, SpanExporter]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kubechain.observability.tracing import setup_tracing

    class GrpcExporter(InMemorySpanExporter):
        pass

    monkeypatch.setitem(sys.modules, GRPC_EXPORTER, types.SimpleNamespace(OTLPSpanExporter=GrpcExporter))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with caplog.at_level(logging.WARNING):
        setup_tracing("kubechain-worker")
    assert isinstance(installed[-1][1], GrpcExporter)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_otel_traces_exporter_none_switches_exporting_off(
    installed: list[tuple[TracerProvider, SpanExporter]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubechain.observability.tracing import exporting, setup_tracing

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not exporting(os.environ)
    setup_tracing("kubechain-worker")
    assert installed == [], "no provider: spans stay the API's no-op spans"


@pytest.mark.parametrize(
    ("env", "expected", "warned"),
    [
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["OTLPSpanExporter"], False),
        ({"OTEL_TRACES_EXPORTER": " OTLP "}, ["OTLPSpanExporter"], False),  # enum values: any case
        ({"OTEL_TRACES_EXPORTER": ""}, ["OTLPSpanExporter"], False),  # empty: as unset, the default
        ({"OTEL_TRACES_EXPORTER": "console"}, ["ConsoleSpanExporter"], False),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, ["ConsoleSpanExporter", "OTLPSpanExporter"], False),
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, ["OTLPSpanExporter"], True),  # unknown: warned, ignored
        ({"OTEL_TRACES_EXPORTER": "console,zipkin"}, ["ConsoleSpanExporter"], True),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "HTTP/PROTOBUF"}, ["OTLPSpanExporter"], False),
    ],
)
def test_otel_traces_exporter_picks_the_exporters(
    installed: list[tuple[TracerProvider, SpanExporter]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    env: dict[str, str],
    expected: list[str],
    warned: bool,
) -> None:
    """As the SDK environment specification says: ``otlp`` (the default), ``console``, ``none``, a list;
    a value not known is warned about and ignored."""
    from kubechain.observability.tracing import exporting, span_exporters

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert exporting(os.environ)
    with caplog.at_level(logging.WARNING):
        exporters = span_exporters(os.environ)
    assert [type(exporter).__name__ for exporter in exporters] == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warnings) is warned, warnings
    assert not warnings or (
        "OTEL_TRACES_EXPORTER" in warnings[0] and env["OTEL_TRACES_EXPORTER"] in warnings[0]
    )


def test_otel_traces_exporter_console_needs_no_otlp_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubechain.observability.tracing import exporting

    assert exporting({"OTEL_TRACES_EXPORTER": "console"})
    assert not exporting({"OTEL_TRACES_EXPORTER": "otlp"}), "OTLP still needs its endpoint set"
    assert not exporting({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})


def test_a_sampling_ratio_keeps_or_drops_whole_runs(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """OTEL_TRACES_SAMPLER=parentbased_traceidratio: the run's spans follow the verdict on its root, run
    by run (at ratio 0.5 some runs are kept and some dropped, each whole)."""
    import uuid
    from datetime import UTC, datetime

    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exported = InMemorySpanExporter()
    sampler = TraceIdRatioBased(0.5)
    provider = TracerProvider(sampler=ParentBased(sampler), id_generator=tracing.RunSpanIds())
    provider.add_span_processor(SimpleSpanProcessor(exported))
    monkeypatch.setattr(tracing.trace, "get_tracer_provider", lambda: provider)
    tracing._tracer.cache_clear()  # the process's one tracer, taken from this provider for this test
    request.addfinalizer(tracing._tracer.cache_clear)

    kept: dict[bool, list[int]] = {True: [], False: []}
    for i in range(40):
        uid = str(uuid.UUID(int=i * 0x9E3779B97F4A7C15))
        trace_id = int(tracing.run_trace_ids(uid)["traceID"], 16)
        verdict = sampler.should_sample(None, trace_id, "TaskRun").decision.is_sampled()
        parent = tracing.run_context(uid)
        assert trace.get_current_span(parent).get_span_context().trace_flags.sampled is verdict
        with provider.get_tracer("test").start_as_current_span("LLMRequest", context=parent):
            pass
        moment = datetime(2026, 1, 1, tzinfo=UTC)
        tracing.export_run_span(uid, "r", "default", moment, moment, None)
        kept[verdict].append(trace_id)
    assert kept[True] and kept[False], "the uids should fall on both sides of the ratio"
    by_trace: dict[int, list[str]] = {}
    for finished in exported.get_finished_spans():
        assert finished.context is not None
        by_trace.setdefault(finished.context.trace_id, []).append(finished.name)
    # every kept run whole (its root on the run's own trace id, with its child), no dropped run's spans
    assert by_trace == {trace_id: ["LLMRequest", "TaskRun"] for trace_id in kept[True]}


def test_work_one_object_asks_for_on_another_is_traced_in_the_others_run() -> None:
    """An Agent became Ready: the runs waiting for it are prepared in their own traces, not a new one."""
    from kubechain.statemachines.routing import Work
    from watcher.main import Watcher

    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    uid = "0b4c2a77-5d0e-4a43-9a58-58b61c3e2f10"
    informers["TaskRun"].cache[("default", "r")] = {
        "kind": "TaskRun",
        "metadata": {"name": "r", "namespace": "default", "uid": uid, "resourceVersion": "3"},
        "status": {"phase": "Pending"},
    }
    work = Work(TaskName.PREPARE, "TaskRun", "default", "r", reason="agent-changed")  # no trace uid
    message = watcher.message_for(work, "9")
    assert message.traceparent and message.traceparent.split("-")[1] == tracing.run_trace_ids(uid)["traceID"]


def deliver_until_quiet(kube: FakeKubeClient, llm: FakeLLM, rounds: int = 40) -> None:
    """Run the work the objects' states call for, as the watcher and the workers would, until no object
    changes any more: only objects whose version changed are looked at (the watch's events), and the
    watcher's cache holds what the API server does, so work one object asks for on another (a sub-agent's
    run that finished prompts its delegating call) is traced in the other's run, as in a cluster."""
    import workers.app as app
    from watcher.main import Watcher

    watcher = Watcher(Settings(), kube, lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    handlers = {
        TaskName.PREPARE: app.prepare,
        TaskName.LLM_CALL: app.llm_call,
        TaskName.TOOL_CALL: app.tool_call,
    }
    seen: dict[tuple[str, str, str], str] = {}
    app.set_context(context(kube, llm))
    try:
        for _ in range(rounds):
            changed = []
            for (_, plural, namespace, name), obj in list(kube.objects.items()):
                version = obj["metadata"]["resourceVersion"]
                if obj["kind"] in informers:
                    informers[obj["kind"]].cache[(namespace, name)] = obj
                if (
                    plural in ("taskruns", "taskruntoolcalls")
                    and seen.get((plural, namespace, name)) != version
                ):
                    seen[(plural, namespace, name)] = version
                    changed.append(obj)
            if not changed:
                return
            for obj in changed:
                for work in work_for(obj["kind"], obj, datetime.now(UTC), 180):
                    message = watcher.message_for(work, obj["metadata"]["resourceVersion"])
                    handlers[work.task](message.model_dump())
        raise AssertionError(f"still changing after {rounds} rounds")
    finally:
        app.set_context(None)


def test_a_sub_agents_run_is_its_own_trace_linked_both_ways_to_the_delegating_call() -> None:
    """The sub-agent's run is a TaskRun: its own trace, whose root links to the delegating call's span;
    that call has a ToolCall span in the parent's trace (named by its spanContext) naming the sub-agent's
    run and trace, and linking to its root."""
    from tests.unit.fakes import message
    from workers.validators import validate

    kube = FakeKubeClient()
    kube.add_secret("default", "openai", {"OPENAI_API_KEY": "sk-test"})
    create(kube, "LLM", "llms", "gpt-4o", {"provider": "openai"})
    create(kube, "Agent", "agents", "helper", {"llmRef": {"name": "gpt-4o"}, "system": "helper"})
    parent_agent = {"llmRef": {"name": "gpt-4o"}, "system": "parent", "subAgents": [{"name": "helper"}]}
    create(kube, "Agent", "agents", "a", parent_agent)

    def answer(request: LLMRequest) -> LLMResponse:
        if request.messages[0].content == "helper":
            return LLMResponse(content="42")
        if request.messages[-1].role == "tool":
            return LLMResponse(content="the helper says 42")
        delegate = ToolCallFunction(name="delegate_to_agent__helper", arguments='{"message": "6 * 7?"}')
        return LLMResponse(tool_calls=[ToolCall(id="c1", function=delegate)])

    llm = FakeLLM(answer)
    for kind, name in (("LLM", "gpt-4o"), ("Agent", "helper"), ("Agent", "a")):
        validate(context(kube, llm), message(kind, name))
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "ask the helper"})
    EXPORTER.clear()
    deliver_until_quiet(kube, llm)

    runs = {o["metadata"]["name"]: o for (_, plural, _, _), o in kube.objects.items() if plural == "taskruns"}
    parent = runs.pop("r")
    ((child_name, child),) = runs.items()
    assert parent["status"]["phase"] == child["status"]["phase"] == "FinalAnswer"
    parent_ids, child_ids = parent["status"]["spanContext"], child["status"]["spanContext"]
    parent_trace, child_trace = int(parent_ids["traceID"], 16), int(child_ids["traceID"], 16)
    assert parent_trace != child_trace, "one trace per TaskRun"
    spans = EXPORTER.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {parent_trace, child_trace}

    (call,) = [o for (_, plural, _, _), o in kube.objects.items() if plural == "taskruntoolcalls"]
    (call_span,) = [s for s in spans if s.name == "ToolCall delegate_to_agent__helper"]
    assert call["status"]["spanContext"] == {
        "traceID": parent_ids["traceID"],
        "spanID": f"{call_span.context.span_id:016x}",
    }, "the delegated call's spanContext names its span, in its run's trace"
    assert call_span.parent is not None and call_span.parent.span_id == int(parent_ids["spanID"], 16)
    assert call_span.attributes is not None
    assert call_span.attributes["kubechain.subagent.taskrun"] == child_name
    assert call_span.attributes["kubechain.subagent.trace_id"] == child_ids["traceID"]
    assert call_span.status.status_code == StatusCode.OK
    assert [(link.context.trace_id, link.context.span_id) for link in call_span.links] == [
        (child_trace, int(child_ids["spanID"], 16))
    ], "the call's span links to the sub-agent's root"

    roots = {s.context.trace_id: s for s in spans if s.name == "TaskRun"}
    child_root = roots[child_trace]
    assert child_root.parent is None and child_root.context.span_id == int(child_ids["spanID"], 16)
    assert [(link.context.trace_id, link.context.span_id) for link in child_root.links] == [
        (parent_trace, call_span.context.span_id)
    ], "the sub-agent's root links to the delegating call's span"
    by_id = {s.context.span_id: s for s in spans}
    for s in spans:  # each trace is one tree under its run's root
        root = roots[s.context.trace_id]
        while s.parent is not None:
            s = by_id[s.parent.span_id]
        assert s is root, s.name


@pytest.fixture
def humanlayer() -> Iterator[object]:
    from kubechain.humanlayer.testserver import HumanLayerTestServer
    from tests.unit.test_approvals import KEY

    with HumanLayerTestServer(api_keys={KEY}) as server:
        yield server


def test_a_question_to_a_human_is_a_toolcall_span_named_by_its_spancontext(humanlayer: object) -> None:
    """A human-contact call runs nowhere: its span, from the question to the answer, is made when the
    answer is recorded, under its run's root, with the ids its spanContext names."""
    from kubechain.humanlayer.testserver import HumanLayerTestServer
    from tests.unit.test_approvals import add_toolcall, new_world

    assert isinstance(humanlayer, HumanLayerTestServer)
    w = new_world(humanlayer, FakeKubeClient())
    name = add_toolcall(w, "approvals__human_contact_email", {"message": "What is the budget?"})
    EXPORTER.clear()
    w.run(name)
    asked = w.status(name)
    assert asked["phase"] == "AwaitingHumanInput"
    humanlayer.respond(asked["externalCallID"], "42k")
    w.clock.advance(5)
    w.run(name)
    w.run(name)  # redelivered: one span
    status = w.status(name)
    assert status["phase"] == "Succeeded"
    run_ids = tracing.run_trace_ids(w.kube.get_raw("taskruns", "default", "r")["metadata"]["uid"])
    (call_span,) = [s for s in EXPORTER.get_finished_spans() if s.name.startswith("ToolCall ")]
    assert call_span.name == "ToolCall approvals__human_contact_email"
    assert status["spanContext"] == {
        "traceID": run_ids["traceID"],
        "spanID": f"{call_span.context.span_id:016x}",
    }
    assert call_span.context.trace_id == int(run_ids["traceID"], 16)
    assert call_span.parent is not None and call_span.parent.span_id == int(run_ids["spanID"], 16)
    assert call_span.start_time is not None and call_span.end_time is not None
    assert call_span.end_time - call_span.start_time == 5 * 10**9, "from the question to the answer"


def test_an_unexpected_provider_error_that_echoes_the_api_key_leaves_it_out_of_the_llm_span() -> None:
    """The LLMRequest span records the exception that ends it (its message, its traceback): one no client
    wrapper scrubbed (not an LLMError) is redacted before it leaves the span. The key is "sk-test"."""
    from tests.unit.fakes import message
    from workers.llm_call import llm_call
    from workers.prepare import prepare

    def echoing(request: LLMRequest) -> LLMResponse:
        raise RuntimeError("x" * 290 + " key=sk-test and sk-test again")

    kube = FakeKubeClient()
    llm = FakeLLM(echoing)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    EXPORTER.clear()
    llm_call(ctx, message("TaskRun", "r"))
    (llm_span,) = [s for s in EXPORTER.get_finished_spans() if s.name == "LLMRequest"]
    assert llm_span.status.status_code == StatusCode.ERROR
    recorded = [str(llm_span.status.description)] + [
        str(value) for event in llm_span.events for value in (event.attributes or {}).values()
    ]
    assert any("RuntimeError" in text for text in recorded), recorded
    for text in recorded:
        assert "sk-te" not in text, text


def test_a_run_failed_in_preparation_names_the_trace_of_its_exported_root_span() -> None:
    import workers.app as app
    from tests.unit.fakes import message

    EXPORTER.clear()
    kube = FakeKubeClient()
    create(kube, "TaskRun", "taskruns", "r", {"taskRef": {"name": "missing"}})
    app.set_context(context(kube, FakeLLM(lambda r: LLMResponse(content="x"))))
    try:
        app.prepare(message("TaskRun", "r").model_dump())
    finally:
        app.set_context(None)
    run = kube.get_raw("taskruns", "default", "r")
    assert run["status"]["phase"] == "Failed"
    (root,) = [s for s in EXPORTER.get_finished_spans() if s.name == "TaskRun"]
    assert root.context is not None and run["status"]["spanContext"] == {
        "traceID": f"{root.context.trace_id:032x}",
        "spanID": f"{root.context.span_id:016x}",
    }


def test_a_recheck_after_a_recheck_is_a_sibling_of_the_task_before_linked_to_it() -> None:
    """A task that schedules its own re-check (a back-off not yet over; an approval polled every minute)
    made it a child of its span: a day of polling nested ~1,440 levels deep. Each re-check now has the
    first task's parent, and a link to the task that scheduled it."""
    import dataclasses

    import workers.app as app
    from kubechain.queueing import ResourceMessage
    from tests.unit.fakes import message

    EXPORTER.clear()
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="x"))
    validated(kube, llm, [])
    run = create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "go"})
    # a back-off never over: every llm_call re-checks later
    run["status"] = {"phase": "ErrorBackoff", "nextAttemptAt": "2999-01-01T00:00:00Z", "llmAttempts": 1}
    kube.objects[next(key for key in kube.objects if key[1:] == ("taskruns", "default", "r"))] = run
    sent: list[ResourceMessage] = []
    ctx = dataclasses.replace(context(kube, llm), enqueue=lambda task, m, delay: sent.append(m))
    app.set_context(ctx)
    run_uid = kube.get_raw("taskruns", "default", "r")["metadata"]["uid"]
    as_the_watcher_sends = tracing.traceparent_of(trace.get_current_span(tracing.run_context(run_uid)))
    first = message("TaskRun", "r").model_copy(update={"traceparent": as_the_watcher_sends})
    try:
        app.llm_call(first.model_dump())
        for _ in range(3):
            app.llm_call(sent[-1].model_dump())
    finally:
        app.set_context(None)
    tasks = [s for s in EXPORTER.get_finished_spans() if s.name == "llm_call TaskRun"]
    assert len(tasks) == 4 and len(sent) == 4
    assert len({s.parent.span_id for s in tasks if s.parent is not None}) == 1, "all siblings"
    root_span_id = int(tracing.run_trace_ids(run_uid)["spanID"], 16)
    assert tasks[0].parent is not None and tasks[0].parent.span_id == root_span_id
    for before, after in zip(tasks, tasks[1:], strict=False):
        assert [link.context.span_id for link in after.links] == [before.context.span_id]


def _a_run_calling_an_idempotent_add(
    kube: FakeKubeClient,
) -> tuple[FakeLLM, Callable[[str, str], dict[str, object]]]:
    """Run "r" of agent "a", whose LLM asks for the tool "add" (marked idempotent, so it may run again);
    the LLM, and the messages as the watcher sends them: in the run's trace."""
    from tests.unit.fakes import message

    def answer(request: LLMRequest) -> LLMResponse:
        call = ToolCall(id="c1", function=ToolCallFunction(name="add", arguments='{"a": 1, "b": 2}'))
        return LLMResponse(tool_calls=[call])

    llm = FakeLLM(answer)
    validated(kube, llm, ["add"])
    tool_key = next(key for key in kube.objects if key[1:] == ("tools", "default", "add"))
    kube.objects[tool_key]["spec"]["idempotent"] = True
    run = create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "add"})
    in_its_trace = tracing.traceparent_of(trace.get_current_span(tracing.run_context(run["metadata"]["uid"])))

    def sent(kind: str, name: str) -> dict[str, object]:
        return message(kind, name).model_copy(update={"traceparent": in_its_trace}).model_dump()

    return llm, sent


def test_an_idempotent_tool_run_again_after_a_lost_record_gets_a_span_of_its_own() -> None:
    """The ToolCall span's id is fixed per call (its spanContext names it): a second execution (its first
    worker lost before the result was written) exported a second span with the same id. Each execution
    has an id of its own, and the status names the last one's (its claim wrote it)."""
    import workers.app as app

    EXPORTER.clear()
    kube = FakeKubeClient()
    llm, sent = _a_run_calling_an_idempotent_add(kube)

    app.set_context(context(kube, llm))
    try:
        app.prepare(sent("TaskRun", "r"))
        app.llm_call(sent("TaskRun", "r"))
        (key,) = [key for key in kube.objects if key[1] == "taskruntoolcalls"]
        app.tool_call(sent("TaskRunToolCall", key[3]))
        # as if its worker had been lost before the result was written: claimed long ago, still Running
        status = kube.objects[key]["status"]
        status |= {"phase": "Running", "claimedBy": "lost", "claimedAt": "2000-01-01T00:00:00.000000Z"}
        status.pop("result", None)
        app.tool_call(sent("TaskRunToolCall", key[3]))
    finally:
        app.set_context(None)
    toolcall = kube.objects[key]
    assert toolcall["status"]["phase"] == "Succeeded" and toolcall["status"]["attempts"] == 2
    first, second = [s for s in EXPORTER.get_finished_spans() if s.name == "ToolCall add"]
    assert first.context is not None and second.context is not None
    assert f"{second.context.span_id:016x}" == toolcall["status"]["spanContext"]["spanID"]
    assert second.context.span_id != first.context.span_id
    assert second.context.trace_id == first.context.trace_id, "in the run's trace all the same"


def test_a_tool_run_again_after_its_worker_was_lost_mid_call_is_the_span_its_status_names() -> None:
    """The first execution's worker was lost mid-call (its span never ended, never exported); the
    second (attempts 2) had a random span id, so status.spanContext named a span that never existed.
    Each execution's span id is derived from the call and its execution, and the claim that starts it
    writes it in spanContext."""
    import workers.app as app
    from kubechain.models import TaskRunToolCall
    from kubechain.statemachines.toolcall import toolcall_span_context

    kube = FakeKubeClient()
    llm, sent = _a_run_calling_an_idempotent_add(kube)

    app.set_context(context(kube, llm))
    try:
        app.prepare(sent("TaskRun", "r"))
        app.llm_call(sent("TaskRun", "r"))
        (key,) = [key for key in kube.objects if key[1] == "taskruntoolcalls"]
        # as a worker that claimed it (attempts 1) and was lost mid-call leaves it: no span exported
        first = toolcall_span_context(TaskRunToolCall.model_validate(kube.objects[key]))
        kube.objects[key].setdefault("status", {}).update(
            spanContext=first,
            phase="Running",
            claimedBy="lost",
            claimedAt="2000-01-01T00:00:00.000000Z",
            attempts=1,
        )
        EXPORTER.clear()
        before = len(kube.requests)
        app.tool_call(sent("TaskRunToolCall", key[3]))
    finally:
        app.set_context(None)
    toolcall = kube.objects[key]
    assert toolcall["status"]["phase"] == "Succeeded" and toolcall["status"]["attempts"] == 2
    (span,) = [s for s in EXPORTER.get_finished_spans() if s.name == "ToolCall add"]
    assert span.context is not None and first is not None
    assert toolcall["status"]["spanContext"] == {
        "traceID": f"{span.context.trace_id:032x}",
        "spanID": f"{span.context.span_id:016x}",
    }
    assert toolcall["status"]["spanContext"]["spanID"] != first["spanID"]
    writes = [r for r in kube.requests[before:] if r[0] != "GET" and "/taskruntoolcalls/" in r[1]]
    assert len(writes) == 2, f"the claim and the result, no other write: {writes}"


def deleted_run(phase: str, uid: str = "0b4c2a77-5d0e-4a43-9a58-58b61c3e2f11") -> dict[str, object]:
    return {
        "kind": "TaskRun",
        "metadata": {
            "name": "r",
            "namespace": "default",
            "uid": uid,
            "resourceVersion": "9",
            "creationTimestamp": "2026-12-01T12:00:00Z",
            "deletionTimestamp": "2026-12-01T12:05:00Z",
        },
        "spec": {"agentRef": {"name": "a"}, "userMessage": "go"},
        "status": {"phase": phase} if phase else {},
    }


@pytest.mark.parametrize("phase", ["", "Pending", "SendContextWindowToLLM", "ToolCallsPending"])
def test_a_run_deleted_before_it_ended_has_a_root_span_made_by_the_leading_watcher(phase: str) -> None:
    """Its root span was made by the write that ended it, which a run deleted first never has: its
    spans had no root. The leading watcher, which sees the deletion, makes it (no API request)."""
    from watcher.main import Watcher

    EXPORTER.clear()
    obj = deleted_run(phase)
    standby = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=True)
    standby._on_event("TaskRun", "DELETED", obj, None)
    assert not [s for s in EXPORTER.get_finished_spans() if s.name == "TaskRun"], "the leader's to make"
    leader = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    leader._on_event("TaskRun", "DELETED", obj, None)
    (root,) = [s for s in EXPORTER.get_finished_spans() if s.name == "TaskRun"]
    ids = tracing.run_trace_ids(str(obj["metadata"]["uid"]))  # type: ignore[index]
    assert root.context is not None and root.parent is None
    assert (f"{root.context.trace_id:032x}", f"{root.context.span_id:016x}") == (
        ids["traceID"],
        ids["spanID"],
    )
    assert root.status.status_code == StatusCode.ERROR
    assert root.status.description and "deleted" in root.status.description
    assert root.end_time is not None and root.start_time is not None
    assert (root.end_time - root.start_time) / 1e9 == 300.0, "from its creation to its deletion"


@pytest.mark.parametrize("phase", ["FinalAnswer", "Failed"])
def test_a_run_deleted_after_it_ended_gets_no_second_root_span(phase: str) -> None:
    from watcher.main import Watcher

    EXPORTER.clear()
    leader = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    leader._on_event("TaskRun", "DELETED", deleted_run(phase), None)
    assert not [s for s in EXPORTER.get_finished_spans() if s.name == "TaskRun"]


def test_a_run_deleted_while_the_watch_was_down_gets_no_root_span_from_the_relist() -> None:
    """A run a worker ended (its root span exported, OK) and then deleted while the leader's watch was
    down: the relist after the 410 synthesized DELETED from the stale cached copy (not terminal), and the
    leading watcher exported a second root span with the same ids, an ERROR. It knows neither how nor
    when such a run ended; only a deletion the watch itself delivers makes a root."""
    from watcher.main import Watcher

    kube = FakeKubeClient()
    leader = Watcher(Settings(), kube, lambda *_: None, leader_election=False)
    informer = next(i for i in leader.informers if i.kind == "TaskRun")
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "go"})
    informer.relist()
    (key,) = informer.cache
    informer.cache[key] = {**informer.cache[key], "status": {"phase": "SendContextWindowToLLM"}}
    EXPORTER.clear()
    kube.request("DELETE", "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/taskruns/r")
    informer.relist()  # after a 410: the run is gone from the list
    assert key not in informer.cache
    assert not [s for s in EXPORTER.get_finished_spans() if s.name == "TaskRun"]
    # the watch's own DELETED event still makes it
    informer._apply("DELETED", deleted_run("SendContextWindowToLLM"))
    assert len([s for s in EXPORTER.get_finished_spans() if s.name == "TaskRun"]) == 1


def test_the_verdict_on_a_runs_root_ignores_the_span_current_where_it_is_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ParentBased sampler (the default) given no parent context reads the current span's: asked
    inside an unsampled span (another run's task), a run's root was judged as that span's child."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), id_generator=tracing.RunSpanIds())
    monkeypatch.setattr(tracing.trace, "get_tracer_provider", lambda: provider)
    unsampled = NonRecordingSpan(
        SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    )
    with trace.use_span(unsampled):
        parent = tracing.run_context("uid-1")
        call = tracing.toolcall_traceparent("uid-1", "tc-uid")
    assert trace.get_current_span(parent).get_span_context().trace_flags.sampled
    assert call.endswith("-01"), call


def test_the_llm_request_span_is_a_client_span_with_the_originals_attributes() -> None:
    """As the Go original's (a call to a remote service: CLIENT), with its attribute names."""
    from opentelemetry.trace import SpanKind

    import workers.app as app
    from tests.unit.fakes import message

    EXPORTER.clear()
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="hi"))
    validated(kube, llm, ["add"])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "go"})
    app.set_context(context(kube, llm))
    try:
        app.prepare(message("TaskRun", "r").model_dump())
        app.llm_call(message("TaskRun", "r").model_dump())
    finally:
        app.set_context(None)
    (request,) = [s for s in EXPORTER.get_finished_spans() if s.name == "LLMRequest"]
    assert request.kind == SpanKind.CLIENT
    attributes = dict(request.attributes or {})
    assert {key: attributes.get(key) for key in ("context_window_size", "tools_count")} == {
        "context_window_size": 2,
        "tools_count": 1,
    }
    assert (attributes.get("taskrun.name"), attributes.get("taskrun.namespace")) == ("r", "default")
    assert attributes["llm.request.model"] == "gpt-4o"
