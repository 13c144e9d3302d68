"""Log lines carry the resource they are about, also from the threads a task hands work to."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from kubechain.kube.fake import FakeKubeClient
from kubechain.models import TaskRun
from kubechain.queueing import ResourceMessage
from tests.unit.fakes import create


def test_children_created_in_parallel_log_with_their_parents_fields() -> None:
    """A fan-out's creates run on a thread pool, whose threads had none of the task's log context: their
    log lines (a retried request, a failed Event post) named no kind, namespace or run."""
    from kubechain.models import TaskRunToolCall
    from kubechain.observability import logs
    from tests.unit.fakes import FakeLLM, context
    from workers.transitions import create_children

    seen: list[object] = []

    class Recording(FakeKubeClient):
        def create(self, resource: Any) -> Any:
            seen.append(logs._resource.get())
            return super().create(resource)

    kube = Recording()
    run = TaskRun.from_wire(
        create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "m"})
    )
    children = [
        TaskRunToolCall.from_wire(
            {
                "metadata": {
                    "name": f"r-tc-{i}",
                    "namespace": "default",
                    "ownerReferences": [run.owner_reference().to_wire()],
                },
                "spec": {
                    "toolCallId": f"c{i}",
                    "taskRunRef": {"name": "r"},
                    "toolRef": {"name": "add"},
                    "arguments": "{}",
                },
            }
        )
        for i in range(4)
    ]
    with logs.resource_context("TaskRun", "default", "r", "kubechain.llm_call"):
        assert create_children(context(kube, FakeLLM(lambda _: None)), run, children) is None  # type: ignore[arg-type,return-value]
    assert len(seen) == 4
    assert all(isinstance(fields, dict) and fields["resource"] == "r" for fields in seen), seen


def _run_task(task: Any, payload: ResourceMessage | dict[str, Any]) -> None:
    """Run a task as a worker does with a message that came in, Celery's signals and error handling too."""
    from celery.app.trace import build_tracer

    import workers.app as app

    tracer = build_tracer(task.name, task, app=app.app, eager=True, propagate=False)
    tracer(
        "task-id",
        [payload.model_dump() if isinstance(payload, ResourceMessage) else payload],
        {},
        {"eta": None},
    )


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    from kubechain.observability.logs import ResourceFilter

    caplog.handler.addFilter(ResourceFilter())  # as configure_logging installs it on every handler
    caplog.set_level(logging.INFO)
    return caplog


def test_a_runs_lines_name_it_as_their_run(logged: pytest.LogCaptureFixture) -> None:
    from kubechain.observability.logs import resource_context

    with resource_context("TaskRun", "team-a", "r", "kubechain.llm_call"):
        logging.getLogger("kubechain.test").info("turn taken")

    (record,) = logged.records
    assert (record.kind, record.namespace, record.resource, record.run) == ("TaskRun", "team-a", "r", "r")  # type: ignore[attr-defined]
    assert not hasattr(record, "toolcall")


def test_a_tool_calls_lines_name_it_and_its_run(logged: pytest.LogCaptureFixture) -> None:
    """A tool call's line named the call but not its run, and a long run name is cut and hashed in the
    call's name: the run the call belongs to could not be found from it."""
    import workers.app as app
    from kubechain.statemachines.taskrun import toolcall_name
    from tests.unit.fakes import FakeLLM, context

    run = "r" * 245 + "-long"  # (a TaskRun's name may be 253 characters)
    name = toolcall_name(run, "abc1234", 0)
    assert run not in name
    kube = FakeKubeClient()
    spec = {"toolCallId": "c0", "taskRunRef": {"name": run}, "toolRef": {"name": "add"}, "arguments": "{}"}
    create(kube, "TaskRunToolCall", "taskruntoolcalls", name, spec, namespace="team-a")
    app.set_context(context(kube, FakeLLM(lambda _: None)))  # type: ignore[arg-type,return-value]
    try:
        _run_task(app.tool_call, ResourceMessage(kind="TaskRunToolCall", namespace="team-a", name=name))
    finally:
        app.set_context(None)

    # its run is gone: the call ends, and the line saying so is the one its failure is written with
    (record,) = [r for r in logged.records if r.levelno >= logging.WARNING]
    assert "not found" in record.getMessage()
    fields = {key: getattr(record, key, None) for key in ("kind", "namespace", "resource", "toolcall", "run")}
    assert fields == {
        "kind": "TaskRunToolCall",
        "namespace": "team-a",
        "resource": name,
        "toolcall": name,
        "run": run,
    }


def _failing_tool_call(kube: FakeKubeClient, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A tool call whose task fails after reading it; its run's name and its own."""
    import workers.tool_call

    def fail(*_: Any, **__: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(workers.tool_call, "_tool_call_once", fail)
    spec = {"toolCallId": "c0", "taskRunRef": {"name": "r"}, "toolRef": {"name": "add"}, "arguments": "{}"}
    create(kube, "TaskRunToolCall", "taskruntoolcalls", "r-abc1234-tc-00", spec, namespace="team-a")
    return "r", "r-abc1234-tc-00"


def test_celerys_failure_line_names_the_resource_and_leaves_the_traceback_to_the_tasks_own(
    logged: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery logs a failed task after the task function has returned: that line named no resource, and
    repeated the traceback the task had just logged, twice (once more as text in a ``data`` field)."""
    import workers.app as app
    from tests.unit.fakes import FakeLLM, context

    kube = FakeKubeClient()
    run, name = _failing_tool_call(kube, monkeypatch)
    app.set_context(context(kube, FakeLLM(lambda _: None)))  # type: ignore[arg-type,return-value]
    try:
        _run_task(app.tool_call, ResourceMessage(kind="TaskRunToolCall", namespace="team-a", name=name))
    finally:
        app.set_context(None)

    ours, celerys = (
        next(r for r in logged.records if r.name == logger) for logger in ("workers.app", "celery.app.trace")
    )
    for record in (ours, celerys):
        fields = [getattr(record, key, None) for key in ("namespace", "resource", "toolcall", "run", "task")]
        assert fields == ["team-a", name, name, run, "kubechain.tool_call"], record.name
    assert ours.exc_info is not None and "boom" in logged.text
    assert "raised unexpected: RuntimeError('boom')" in celerys.getMessage()  # with Celery's task id
    assert celerys.exc_info is None and not hasattr(celerys, "data")
    assert logged.text.count('raise RuntimeError("boom")') == 1


def test_celerys_failure_line_keeps_a_traceback_no_one_else_logged(logged: pytest.LogCaptureFixture) -> None:
    """A payload the task cannot even parse fails before the task's own error handling: Celery's line is
    the only one with the traceback."""
    import workers.app as app

    _run_task(
        app.prepare, {"kind": "TaskRun", "namespace": "team-a", "name": "r", "enqueued_at": "not a time"}
    )

    (record,) = [r for r in logged.records if r.name == "celery.app.trace"]
    assert (getattr(record, "namespace", None), getattr(record, "resource", None)) == ("team-a", "r")
    assert record.exc_info is not None and "ValidationError" in logged.text
    assert not hasattr(record, "data")


def _toolcall(name: str, run: str) -> dict[str, Any]:
    return {
        "kind": "TaskRunToolCall",
        "metadata": {"name": name, "namespace": "team-a", "resourceVersion": "7", "uid": "u"},
        "spec": {"toolCallId": "c0", "taskRunRef": {"name": run}, "toolRef": {"name": "add"}},
        "status": {"phase": "Pending"},
    }


TOOLCALL_FIELDS = {
    "kind": "TaskRunToolCall",
    "namespace": "team-a",
    "resource": "r-abc1234-tc-00",
    "toolcall": "r-abc1234-tc-00",
    "run": "r",
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: getattr(record, key, None) for key in TOOLCALL_FIELDS}


def test_the_watchers_line_for_an_event_it_gave_up_on_names_the_resource(
    logged: pytest.LogCaptureFixture,
) -> None:
    """The watcher's lines named the resource only inside their text: no query on a field found them."""
    import threading

    from watcher.informer import MAX_HANDLER_ATTEMPTS, Informer

    def handler(kind: str, event_type: str, obj: dict[str, Any], previous: Any, synthesized: bool) -> None:
        raise RuntimeError("a bug")

    informer = Informer(
        FakeKubeClient(), "TaskRunToolCall", "taskruntoolcalls", None, handler, threading.Event()
    )
    for _ in range(MAX_HANDLER_ATTEMPTS - 1):
        with pytest.raises(RuntimeError):
            informer._apply("ADDED", _toolcall("r-abc1234-tc-00", "r"))
    informer._apply("ADDED", _toolcall("r-abc1234-tc-00", "r"))

    (record,) = [r for r in logged.records if "giving up" in r.getMessage()]
    assert _fields(record) == TOOLCALL_FIELDS


def test_the_watchers_lines_for_work_it_could_not_trace_or_send_name_the_resource(
    logged: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import watcher.main as watcher_main
    from kubechain.queueing import TaskName
    from kubechain.settings import Settings
    from kubechain.statemachines.routing import Work
    from kubechain.testing.waiting import wait_for
    from watcher.main import Watcher

    def broken(*_: Any) -> Any:
        raise RuntimeError("a custom sampler failed")

    monkeypatch.setattr(watcher_main, "run_context", broken)
    sent: list[str] = []

    def send(task: TaskName, message: ResourceMessage, countdown: float) -> None:
        if not sent:
            sent.append("refused")
            raise ConnectionError("Redis went away")
        sent.append(message.name)

    watcher = Watcher(Settings(), FakeKubeClient(), send, leader_election=False)
    (informer,) = [i for i in watcher.informers if i.kind == "TaskRunToolCall"]
    informer.cache[("team-a", "r-abc1234-tc-00")] = _toolcall("r-abc1234-tc-00", "r")
    work = Work(TaskName.TOOL_CALL, "TaskRunToolCall", "team-a", "r-abc1234-tc-00", trace_uid="t")
    watcher._submit(work, "7")
    watcher._spawn(watcher._sender, "enqueue")
    try:
        wait_for(lambda: sent == ["refused", "r-abc1234-tc-00"], timeout_s=10, what="the send to go through")
    finally:
        watcher.stop_event.set()

    for text in ("could not trace the enqueue", "could not enqueue"):
        (record,) = [r for r in logged.records if text in r.getMessage()]
        assert _fields(record) == TOOLCALL_FIELDS, text
