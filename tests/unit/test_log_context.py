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


def _run_task(task: Any, message: ResourceMessage) -> None:
    """Run a task as a worker does with a message that came in, Celery's signals and error handling too."""
    from celery.app.trace import build_tracer

    import workers.app as app

    tracer = build_tracer(task.name, task, app=app.app, eager=True, propagate=False)
    tracer("task-id", [message.model_dump()], {}, {"eta": None})


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

    (record,) = [r for r in logged.records if r.name == "workers.tool_call"]  # its run is gone: the call ends
    assert "not found" in record.getMessage()
    fields = {key: getattr(record, key, None) for key in ("kind", "namespace", "resource", "toolcall", "run")}
    assert fields == {
        "kind": "TaskRunToolCall",
        "namespace": "team-a",
        "resource": name,
        "toolcall": name,
        "run": run,
    }
