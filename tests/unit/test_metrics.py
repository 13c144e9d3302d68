"""What the workers' Prometheus metrics measure, and that a prefork worker exports its children's."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client import REGISTRY

from kubechain.kube.fake import FakeKubeClient
from kubechain.llm.base import LLMResponse
from kubechain.queueing import SENT_AT_HEADER, ResourceMessage, TaskName, enqueue
from tests.unit.fakes import FakeLLM, context

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _heap_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """worker_init also freezes the heap (see test_heap): not this test process's."""
    import workers.app

    monkeypatch.setattr(workers.app, "freeze_startup_heap", lambda: None)


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def test_every_publish_carries_its_send_time() -> None:
    """The header is stamped on publish (Celery's retries publish through the same path)."""
    app = Celery("t", broker="memory://")
    before = time.time()
    enqueue(app, TaskName.VALIDATE, ResourceMessage(kind="Agent", namespace="default", name="a"), 30)
    after = time.time()
    with app.connection_for_read() as connection:
        message = connection.SimpleQueue("control").get(timeout=1)
        message.ack()
    assert before <= message.headers[SENT_AT_HEADER] <= after
    assert message.headers["eta"]  # the countdown, which the worker does not count as waiting


def test_queue_wait_counts_from_when_the_message_was_due(monkeypatch: pytest.MonkeyPatch) -> None:
    """A countdown or an autoretry's backoff is waiting on purpose: the histogram starts at max(sent, eta)."""
    from celery.app.trace import build_tracer

    import workers.app as app
    import workers.validators

    monkeypatch.setattr(workers.validators, "validate", lambda ctx, message: None)
    app.set_context(context(FakeKubeClient(), FakeLLM(lambda r: LLMResponse())))
    # what a worker does with a message: its headers are the task's request
    tracer = build_tracer(app.validate.name, app.validate, app=app.app, eager=True, propagate=True)

    def waited(enqueued_at: float, headers: dict[str, Any], eta: str | None) -> float:
        sample = ("kubechain_task_queue_wait_seconds_sum", {"task": "validate"})
        before = REGISTRY.get_sample_value(*sample) or 0.0
        message = ResourceMessage(kind="Agent", namespace="default", name="a", enqueued_at=enqueued_at)
        tracer("id", [message.model_dump()], {}, {**headers, "headers": headers, "eta": eta})
        return (REGISTRY.get_sample_value(*sample) or 0.0) - before

    now = time.time()

    class FrozenTime:
        """The worker's clock, standing still at ``now`` (its other uses of ``time`` as they are)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def time(self) -> float:
            return now

    monkeypatch.setattr(app, "time", FrozenTime())
    try:
        # sent with a 30 s countdown, due half a second ago
        assert waited(now - 30.5, {SENT_AT_HEADER: now - 30.5}, iso(now - 0.5)) == pytest.approx(0.5)
        # an autoretry re-published (no backoff left) 0.2 s ago: the first payload, enqueued a minute ago
        assert waited(now - 60, {SENT_AT_HEADER: now - 0.2}, None) == pytest.approx(0.2)
        # an autoretry with a 10 s backoff, due a second ago
        assert waited(now - 60, {SENT_AT_HEADER: now - 11}, iso(now - 1)) == pytest.approx(1)
        # a producer that does not stamp the header: the payload's time
        assert waited(now - 2, {}, None) == pytest.approx(2)
    finally:
        app.set_context(None)


PREFORK_WORKER = textwrap.dedent(
    """
    import multiprocessing, os, sys, urllib.request
    from celery import signals
    from prometheus_client import Gauge
    import workers.app as app, workers.validators

    workers.validators.validate = lambda ctx, message: None
    app.set_context(type("Context", (), {"settings": app.settings})())
    signals.worker_init.send(sender=type("WorkController", (), {"pool_cls": "prefork"})())

    def child():  # a prefork pool process: runs a task, then exits the way billiard's do
        app.validate({"kind": "Agent", "namespace": "default", "name": "a"})
        Gauge("kubechain_test_live", "a live gauge", multiprocess_mode="livesum").set(1)
        signals.worker_process_shutdown.send(sender="w", pid=os.getpid(), exitcode=0)

    for _ in range(3):
        process = multiprocessing.get_context("fork").Process(target=child)
        process.start()
        process.join()
    app._start_metrics()
    port = os.environ["KUBECHAIN_METRICS_PORT"]
    sys.stdout.write(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
    """
)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_prefork_worker_exports_its_child_processes_metrics(tmp_path: Path) -> None:
    """Tasks run (and count) in the pool's child processes; the parent serves /metrics."""
    env = {
        "PATH": "/usr/bin:/bin",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),  # set before the process starts, as the docs say
        "OTEL_SDK_DISABLED": "true",
    }
    for _ in range(2):  # the second run, a restarted container, must not add the first run's files up
        env["KUBECHAIN_METRICS_PORT"] = str(free_port())
        done = subprocess.run(
            [sys.executable, "-c", PREFORK_WORKER],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert 'kubechain_tasks_total{outcome="ok",task="validate"} 3.0' in done.stdout, done.stdout
        assert 'kubechain_task_duration_seconds_count{task="validate"} 3.0' in done.stdout
        # the children are gone: so are their live gauges
        assert "kubechain_test_live" not in done.stdout
        # no gauge keeps a series per child process ever forked
        assert "pid=" not in done.stdout, [line for line in done.stdout.splitlines() if "pid=" in line]


class WorkController:
    """What worker_init is sent by: the pool is a class (from the CLI) or a name (from the config)."""

    def __init__(self, pool_cls: object) -> None:
        self.pool_cls = pool_cls


def test_prefork_without_a_multiprocess_directory_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from celery.concurrency.thread import TaskPool as ThreadPool
    from celery.signals import worker_init

    import workers.app as app

    monkeypatch.setattr(app.settings, "prometheus_multiproc_dir", None)
    with caplog.at_level(logging.WARNING):
        worker_init.send(sender=WorkController(ThreadPool))
        assert not caplog.records
        worker_init.send(sender=WorkController("prefork"))
    (warning,) = caplog.records
    assert "PROMETHEUS_MULTIPROC_DIR" in warning.getMessage() and "--pool threads" in warning.getMessage()
    assert app._metrics_registry is REGISTRY


def test_a_prefork_parent_leaves_tracing_to_its_children(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.concurrency.thread import TaskPool as ThreadPool
    from celery.signals import worker_init, worker_process_init, worker_ready

    import workers.app as app

    calls: list[str] = []
    monkeypatch.setattr(app, "setup_tracing", calls.append)
    monkeypatch.setattr(app, "serve", lambda *_: None)
    monkeypatch.setattr(app.settings, "prometheus_multiproc_dir", None)
    worker_init.send(sender=WorkController(ThreadPool))
    worker_ready.send(sender=None)
    assert calls == ["kubechain-worker"], "a threads worker traces in its one process"
    calls.clear()
    worker_init.send(sender=WorkController("prefork"))
    worker_ready.send(sender=None)
    assert calls == [], "the parent, whose exporter later children would inherit, sets up none"
    worker_process_init.send(sender=None)
    assert calls == ["kubechain-worker"], "each child sets up its own"
    worker_init.send(sender=WorkController(ThreadPool))  # leave the module as a threads worker


def test_a_multiprocess_directory_loses_only_dead_processes_files(tmp_path: Path) -> None:

    from kubechain.observability.metrics import registry_for

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid, live_pid = int(gone.stdout), os.getpid()
    names = [
        f"counter_{dead_pid}.db",
        f"gauge_livesum_{dead_pid}.db",
        f"counter_{live_pid}.db",  # another worker sharing the directory, still running
        "app.db",  # not prometheus_client's
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    registry_for(True, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"counter_{live_pid}.db", "app.db"])


class _Request:
    """What _run reads of a Celery task request."""

    eta = None

    def __init__(self, retries: int) -> None:
        self.retries = retries


def _failing(exc: Exception) -> Any:
    def handler(ctx: Any, message: ResourceMessage) -> None:
        raise exc

    return handler


def test_a_task_that_fails_is_logged_and_counts_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """(That its lines name the resource, as Celery runs it: tests/unit/test_log_context.py.)"""
    import workers.app as app
    from kubechain.kube.errors import Unavailable

    caplog.set_level(logging.INFO, logger="workers.app")
    app.set_context(context(FakeKubeClient(), FakeLLM(lambda r: LLMResponse())))
    payload = ResourceMessage(kind="TaskRun", namespace="team-a", name="r").model_dump()

    def count(outcome: str) -> float:
        return (
            REGISTRY.get_sample_value("kubechain_tasks_total", {"task": "prepare", "outcome": outcome}) or 0.0
        )

    try:
        errors, retries = count("error"), count("retry")
        with pytest.raises(RuntimeError):
            app._run(TaskName.PREPARE, _failing(RuntimeError("boom")), payload, _Request(0))
        (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert record.exc_info is not None and "TaskRun/team-a/r" in record.getMessage()
        unavailable = Unavailable(503, "ServiceUnavailable", "etcd leader changed")
        with pytest.raises(Unavailable):
            app._run(TaskName.PREPARE, _failing(unavailable), payload, _Request(3))
        assert (count("error") - errors, count("retry") - retries) == (1, 1)
        with pytest.raises(Unavailable):  # the last retry: Celery drops the task after this
            app._run(TaskName.PREPARE, _failing(unavailable), payload, _Request(app.MAX_RETRIES))
        assert (count("error") - errors, count("retry") - retries) == (2, 1)
        assert "gave up after 20 retries" in caplog.text
    finally:
        app.set_context(None)


def test_a_prefork_child_sends_its_buffered_spans_before_it_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    """billiard ends a child with os._exit, so nothing but this hook sends what the batch still holds."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import workers.app as app

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exported, schedule_delay_millis=60_000))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    monkeypatch.setattr(app, "process_exited", lambda pid, directory: None)
    provider.get_tracer("test").start_span("TaskRun/r").end()
    assert exported.get_finished_spans() == ()
    app._child_exited(pid=os.getpid())
    assert [span.name for span in exported.get_finished_spans()] == ["TaskRun/r"]
    provider.shutdown()


def test_llm_metrics_are_labelled_by_a_bounded_set_of_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model name is any string an LLM resource gives: each new one was ~25 series for the process's life."""
    from kubechain.observability import metrics

    monkeypatch.setattr(metrics, "_model_labels", set())
    monkeypatch.setattr(metrics, "MAX_MODEL_LABELS", 3)
    assert [metrics.model_label(m) for m in ("gpt-4o", "m2", "m3", "gpt-4o")] == [
        "gpt-4o",
        "m2",
        "m3",
        "gpt-4o",
    ]
    assert metrics.model_label("m4") == "other" and metrics.model_label("m2") == "m2"
    monkeypatch.setattr(metrics, "_model_labels", set())
    assert metrics.model_label("x" * 500) == "x" * 64


def test_a_metric_that_cannot_be_updated_does_not_lose_the_paid_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A negative token count (a provider's that slipped through) made the token counter raise after
    the LLM answered and before the answer was written: the answer was lost, and paid again once the
    claim expired. Metrics only log when they cannot count."""
    from kubechain.models.taskrun import TokenUsage
    from tests.unit.fakes import create, message
    from tests.unit.test_workers_on_fake import validated
    from workers.llm_call import llm_call
    from workers.prepare import prepare

    kube = FakeKubeClient()
    usage = TokenUsage(prompt_tokens=-1, completion_tokens=3, total_tokens=2)
    llm = FakeLLM(lambda r: LLMResponse(content="hi", usage=usage))
    validated(kube, llm, [])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "x"})
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    with caplog.at_level(logging.WARNING):
        llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert (status["phase"], status["output"]) == ("FinalAnswer", "hi")
    assert len(llm.requests) == 1
    assert any("could not count" in r.getMessage() for r in caplog.records)


def test_a_message_about_a_namespace_the_install_does_not_serve_is_ignored() -> None:
    """Anyone who can write to Redis can send a message naming any namespace: a worker of an install
    limited by KUBECHAIN_NAMESPACES acted on it all the same (only the watcher honoured the setting)."""
    import workers.app as app

    handled: list[str] = []
    app.set_context(context(FakeKubeClient(), FakeLLM(lambda r: LLMResponse()), namespaces=["agents"]))
    try:
        for namespace in ("agents", "elsewhere"):
            payload = ResourceMessage(kind="Agent", namespace=namespace, name="a").model_dump()
            request = types.SimpleNamespace(eta=None, headers={}, retries=0)
            app._run(
                TaskName.VALIDATE, lambda ctx, message: handled.append(message.namespace), payload, request
            )
    finally:
        app.set_context(None)
    assert handled == ["agents"]
    assert REGISTRY.get_sample_value("kubechain_tasks_total", {"task": "validate", "outcome": "ignored"}) == 1


def test_only_the_watcher_exports_its_leader_gauge() -> None:
    """A worker would export a flat 0 for each of its pods beside the watchers' series."""
    code = (
        "import workers.app\n"
        "from prometheus_client import REGISTRY, generate_latest\n"
        "print(b'kubechain_watcher_leader' in generate_latest(REGISTRY))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert found.stdout.strip() == "False"


# -- tool calls no worker executes: counted once, when they end ---------------------------------------


def tool_samples(tool: str, outcome: str) -> tuple[float, float, float]:
    """(calls counted with ``outcome``, latencies observed, their sum) of the ``tool`` label."""
    return (
        REGISTRY.get_sample_value("kubechain_tool_calls_total", {"tool": tool, "outcome": outcome}) or 0.0,
        REGISTRY.get_sample_value("kubechain_tool_call_duration_seconds_count", {"tool": tool}) or 0.0,
        REGISTRY.get_sample_value("kubechain_tool_call_duration_seconds_sum", {"tool": tool}) or 0.0,
    )


def counted_since(before: tuple[float, float, float], tool: str, outcome: str) -> tuple[float, ...]:
    return tuple(after - earlier for after, earlier in zip(tool_samples(tool, outcome), before, strict=True))


def test_an_executed_call_is_counted_once_with_its_execution_as_latency() -> None:
    from tests.unit.fakes import message
    from tests.unit.test_workers_on_fake import tool_turn, toolcall_names
    from workers.tool_call import tool_call

    kube = FakeKubeClient()
    tool_turn(kube, ['{"a": 1, "b": 2}', '{"a": 1, "b": "x"}'])
    ctx = context(kube, FakeLLM(lambda r: LLMResponse()))
    before = tool_samples("add", "ok"), tool_samples("add", "error")
    for name in toolcall_names(kube):
        tool_call(ctx, message("TaskRunToolCall", name))
        tool_call(ctx, message("TaskRunToolCall", name))  # redelivered: counted once
    ok, error = counted_since(before[0], "add", "ok"), counted_since(before[1], "add", "error")
    assert (ok[0], error[0]) == (1, 1) and ok[1] == error[1] == 2, (ok, error)


class FirstEndConflicts(FakeKubeClient):
    """The first status write that ends a tool call loses to another writer (409), unapplied."""

    conflicted = False

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        from kubechain.kube.errors import Conflict

        body = kwargs.get("body")
        ends = isinstance(body, dict) and (body.get("status") or {}).get("phase") == "Succeeded"
        if ends and "taskruntoolcalls" in path and not self.conflicted:
            self.conflicted = True
            raise Conflict(409, "Conflict", "the object has been modified")
        return super().request(method, path, **kwargs)


def test_a_delegated_call_is_counted_once_when_its_sub_agent_answered() -> None:
    """Latency: from the delegation to the answer recorded, as the call's status has them. A write that
    lost a conflict and was made again, and a redelivered message, count nothing more."""
    from kubechain.statemachines.toolcall import child_run_name
    from tests.unit.fakes import message
    from tests.unit.test_toolcall_robustness import delegating, finish, toolcall_status
    from workers.tool_call import tool_call

    kube = FirstEndConflicts()
    ctx, name = delegating(kube)  # the Tool "ask" delegates to the agent "helper"
    now = [datetime(2026, 1, 1, 12, 0, tzinfo=UTC)]
    ctx.clock = lambda: now[0]
    before = tool_samples("ask", "ok")
    tool_call(ctx, message("TaskRunToolCall", name))
    assert toolcall_status(kube, name)["phase"] == "AwaitingSubAgent"
    finish(kube, child_run_name(name, "helper"))
    now[0] += timedelta(seconds=7)
    tool_call(ctx, message("TaskRunToolCall", name))
    tool_call(ctx, message("TaskRunToolCall", name))  # redelivered
    assert kube.conflicted and toolcall_status(kube, name)["phase"] == "Succeeded"
    assert counted_since(before, "ask", "ok") == (1, 1, 7.0)


def tool_latencies_up_to(tool: str, le: str) -> float:
    return (
        REGISTRY.get_sample_value("kubechain_tool_call_duration_seconds_bucket", {"tool": tool, "le": le})
        or 0.0
    )


def test_a_delegated_call_that_waited_long_for_its_sub_agent_is_told_from_one_that_waited_longer() -> None:
    """A delegated call's latency is its sub-agent's whole run: many LLM turns and tools, often minutes
    (one whose sub-agent never starts fails after KUBECHAIN_SUB_AGENT_START_TIMEOUT_S, 15 min). Buckets that
    ended at 300 s put every such call in +Inf, its quantiles unreadable."""
    from kubechain.statemachines.toolcall import child_run_name
    from tests.unit.fakes import message
    from tests.unit.test_toolcall_robustness import delegating, finish, toolcall_status
    from workers.tool_call import tool_call

    kube = FakeKubeClient()
    ctx, name = delegating(kube)
    now = [datetime(2026, 1, 1, 12, 0, tzinfo=UTC)]
    ctx.clock = lambda: now[0]
    before = {le: tool_latencies_up_to("ask", le) for le in ("300.0", "1800.0", "3600.0", "+Inf")}
    tool_call(ctx, message("TaskRunToolCall", name))
    finish(kube, child_run_name(name, "helper"))
    now[0] += timedelta(minutes=20)
    tool_call(ctx, message("TaskRunToolCall", name))
    assert toolcall_status(kube, name)["phase"] == "Succeeded"
    counted = {le: tool_latencies_up_to("ask", le) - earlier for le, earlier in before.items()}
    assert counted == {"300.0": 0, "1800.0": 1, "3600.0": 1, "+Inf": 1}


@pytest.mark.parametrize("how", ["sub-agent failed", "delegation refused"])
def test_a_delegated_call_that_did_not_succeed_is_counted_with_its_outcome(how: str) -> None:
    """A refused delegation counts as a tool not granted does ("rejected"), without a latency: it never
    started."""
    import dataclasses

    from kubechain.models import TaskRun
    from kubechain.statemachines.toolcall import child_run_name
    from tests.unit.fakes import message
    from tests.unit.test_toolcall_robustness import delegating, toolcall_status
    from workers.tool_call import tool_call

    kube = FakeKubeClient()
    ctx, name = delegating(kube)
    now = [datetime(2026, 1, 1, 12, 0, tzinfo=UTC)]
    ctx.clock = lambda: now[0]
    outcome, expected = ("error", (1, 1, 4.0)) if how == "sub-agent failed" else ("rejected", (1, 0, 0.0))
    before = tool_samples("ask", outcome)
    if how == "delegation refused":
        ctx = dataclasses.replace(ctx, settings=ctx.settings.model_copy(update={"max_delegation_depth": 0}))
    tool_call(ctx, message("TaskRunToolCall", name))
    if how == "sub-agent failed":
        child = kube.get(TaskRun, "default", child_run_name(name, "helper"))
        kube.patch_status(child, {"phase": "Failed", "error": "no LLM"})
        now[0] += timedelta(seconds=4)
        tool_call(ctx, message("TaskRunToolCall", name))
    tool_call(ctx, message("TaskRunToolCall", name))  # redelivered
    status = toolcall_status(kube, name)
    assert status["phase"] == "Failed"
    assert ("sub-agent failed: no LLM" if how == "sub-agent failed" else "depth limit") in status["error"]
    assert counted_since(before, "ask", outcome) == expected


@pytest.fixture
def humanlayer() -> Iterator[Any]:
    from kubechain.humanlayer.testserver import HumanLayerTestServer
    from tests.unit.test_approvals import KEY

    with HumanLayerTestServer(api_keys={KEY}) as server:
        yield server


def human_waits(kind: str) -> tuple[float, float]:
    """(waits observed, their sum) of kubechain_human_wait_seconds for ``kind``."""
    return (
        REGISTRY.get_sample_value("kubechain_human_wait_seconds_count", {"kind": kind}) or 0.0,
        REGISTRY.get_sample_value("kubechain_human_wait_seconds_sum", {"kind": kind}) or 0.0,
    )


def waited_since(before: tuple[float, float], kind: str) -> tuple[float, float]:
    return (human_waits(kind)[0] - before[0], human_waits(kind)[1] - before[1])


def test_a_question_to_a_human_is_counted_once_when_answered_its_wait_as_a_humans(humanlayer: Any) -> None:
    """Its time is a person's, not a tool's execution: observed as the human's wait, not as tool latency
    (among the tools' executions it would pin their p99 at the top bucket)."""
    from tests.unit.test_approvals import add_toolcall, new_world

    w = new_world(humanlayer, FakeKubeClient())
    name = add_toolcall(w, "approvals__human_contact_email", {"message": "What is the budget?"})
    before = tool_samples("approvals__*", "ok")  # labelled by channel, as MCP tools by server
    waits = human_waits("contact")
    w.run(name)
    humanlayer.respond(w.status(name)["externalCallID"], "42k")
    w.clock.advance(5400)
    w.run(name)
    w.run(name)  # redelivered
    assert w.status(name)["phase"] == "Succeeded"
    assert counted_since(before, "approvals__*", "ok") == (1, 0, 0.0)
    assert waited_since(waits, "contact") == (1, 5400.0)


class SlowMCP:
    """The FakeMCP of test_approvals, whose every tool takes ``seconds`` on the world's clock."""

    def __init__(self, mcp: Any, clock: Any, seconds: float) -> None:
        self.mcp, self.clock, self.seconds = mcp, clock, seconds

    def resolve(self, server: Any) -> Any:
        return self.mcp.resolve(server)

    def call_tool(self, *args: Any, **kwargs: Any) -> Any:
        self.clock.advance(self.seconds)
        return self.mcp.call_tool(*args, **kwargs)


@pytest.mark.parametrize("via", ["kubectl", "HumanLayer"])
def test_a_call_that_waited_for_approval_is_observed_with_its_execution_only(
    humanlayer: Any, via: str
) -> None:
    """Approved after an hour, the tool then runs 2 s: its latency is the 2 s (as this worker's clock
    measured its execution), and the hour, from the approval's request to the decision recorded, is the
    human's wait."""
    from tests.unit.test_approvals import add_toolcall, new_world

    w = new_world(humanlayer, FakeKubeClient())
    w.mcp = SlowMCP(w.mcp, w.clock, 2.0)  # type: ignore[assignment]
    name = add_toolcall(w)  # fetch__fetch: its MCP server wants an approval via HumanLayer
    before = tool_samples("fetch__*", "ok")
    waits = human_waits("approval")
    w.run(name)
    assert w.status(name)["phase"] == "AwaitingHumanApproval"
    w.clock.advance(3600)
    if via == "kubectl":
        w.annotate("approved", name=name)
    else:
        humanlayer.respond_to_function_call(w.status(name)["externalCallID"], True, "ok")
    w.run(name)  # the decision
    assert w.status(name)["phase"] == "ReadyToExecuteApprovedTool"
    w.run(name)  # the execution
    w.run(name)  # redelivered
    assert w.status(name)["phase"] == "Succeeded"
    assert counted_since(before, "fetch__*", "ok") == (1, 1, 2.0)
    assert waited_since(waits, "approval") == (1, 3600.0)


@pytest.mark.parametrize("phase", ["AwaitingHumanApproval", "ReadyToExecuteApprovedTool"])
def test_a_call_failed_while_it_waited_for_approval_has_no_latency(phase: str) -> None:
    """Its Tool now delegates, so nothing will run it: it fails, counted as an error, but its time (an
    hour since the approval was asked for) was a human's wait, not an execution of the tool; and no human
    decided, so it is no human's wait either."""
    from kubechain.statemachines.transition import timestamp
    from tests.unit.fakes import message
    from tests.unit.test_toolcall_robustness import delegating, toolcall_status
    from workers.tool_call import tool_call

    kube = FakeKubeClient()
    ctx, name = delegating(kube)
    asked = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    kube.patch_status_raw(
        "taskruntoolcalls", "default", name, None, {"phase": phase, "startTime": timestamp(asked)}
    )
    ctx.clock = lambda: asked + timedelta(hours=1)
    before = tool_samples("ask", "error")
    waits = human_waits("approval")
    tool_call(ctx, message("TaskRunToolCall", name))
    tool_call(ctx, message("TaskRunToolCall", name))  # redelivered
    assert toolcall_status(kube, name)["phase"] == "Failed"
    assert counted_since(before, "ask", "error") == (1, 0, 0.0)
    assert waited_since(waits, "approval") == (0, 0)


@pytest.mark.parametrize("via", ["kubectl", "HumanLayer"])
def test_a_call_a_human_rejected_is_counted_once_as_rejected(humanlayer: Any, via: str) -> None:
    """Without a latency: its time is a human's wait (observed as such), not the tool's, and observed with
    the tool's executions it pinned their p99 at the top bucket (300 s)."""
    from tests.unit.test_approvals import add_toolcall, new_world

    w = new_world(humanlayer, FakeKubeClient())
    name = add_toolcall(w)  # fetch__fetch: its MCP server wants an approval via HumanLayer
    before = tool_samples("fetch__*", "rejected")
    w.run(name)
    assert w.status(name)["phase"] == "AwaitingHumanApproval"
    if via == "kubectl":
        w.annotate("rejected", "not that page", name=name)
    else:
        humanlayer.respond_to_function_call(w.status(name)["externalCallID"], False, "not that page")
    waits = human_waits("approval")
    w.clock.advance(3)
    w.run(name)
    w.run(name)  # redelivered
    assert w.status(name)["phase"] == "ToolCallRejected"
    assert counted_since(before, "fetch__*", "rejected") == (1, 0, 0.0)
    assert waited_since(waits, "approval") == (1, 3.0), "a rejection is a human's decision too"


@pytest.mark.parametrize("how", ["not-granted", "tool-deleted"])
def test_a_call_whose_worker_was_lost_is_not_counted_though_its_tool_went_meanwhile(how: str) -> None:
    """Like any call whose worker was lost mid-execution: it did start, so it is no "rejected" one (refused
    before it ran), and how its execution ended is unknown."""
    from tests.unit.fakes import message
    from tests.unit.test_toolcall_robustness import (
        NOW,
        delegating,
        not_granted,
        running_since,
        tool_deleted,
        toolcall_status,
    )
    from workers.tool_call import tool_call

    kube = FakeKubeClient()
    ctx, name = delegating(kube)
    ctx.clock = lambda: NOW
    running_since(kube, name, NOW - timedelta(seconds=ctx.settings.claim_timeout_s + 1))
    (not_granted if how == "not-granted" else tool_deleted)(kube)
    outcomes = ("ok", "error", "invalid_arguments", "rejected")
    before = {
        (tool, outcome): tool_samples(tool, outcome) for tool in ("ask", "unknown") for outcome in outcomes
    }
    tool_call(ctx, message("TaskRunToolCall", name))
    assert toolcall_status(kube, name)["phase"] == "Failed"
    for (tool, outcome), earlier in before.items():
        assert counted_since(earlier, tool, outcome) == (0, 0, 0), (tool, outcome)


@pytest.fixture
def taken_port() -> Iterator[int]:
    import socket

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        yield int(held.getsockname()[1])


def test_a_worker_whose_metrics_port_is_taken_says_which_and_stops(
    taken_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The OSError was raised in a Celery signal receiver, which swallows it: the worker ran on without
    /metrics and /healthz (and its liveness probe would kill it later, tasks in flight). It stops at
    start, in one line naming the port and the setting."""
    import workers.app as app

    monkeypatch.setattr(app.settings, "metrics_port", taken_port)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stopped:
        app._start_metrics()
    assert stopped.value.code == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"port {taken_port}" in line and "KUBECHAIN_METRICS_PORT" in line, line


def test_the_watcher_whose_metrics_port_is_taken_says_which_in_one_line(
    taken_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It stopped with a traceback of an OSError: now the same one line as a worker's."""
    import signal

    import watcher.main
    from kubechain.observability import logs

    monkeypatch.setenv("KUBECHAIN_METRICS_PORT", str(taken_port))
    monkeypatch.setattr(logs, "configure_logging", lambda *args: None)  # this process's logging stays
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(watcher.main.KubeClient, "from_settings", lambda *args: FakeKubeClient())
    monkeypatch.setattr(watcher.main, "register_phase_collector", lambda phases: None)
    monkeypatch.setattr(watcher.main, "setup_tracing", lambda name: None)
    monkeypatch.setattr(watcher.main.Watcher, "run_forever", lambda self: pytest.fail("it ran"))
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stopped:
        watcher.main.main(["--no-leader-election"])
    assert stopped.value.code == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"port {taken_port}" in line and "KUBECHAIN_METRICS_PORT" in line, line
