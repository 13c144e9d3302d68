"""Log lines carry the resource they are about, also from the threads a task hands work to."""

from __future__ import annotations

from typing import Any

from kubechain.kube.fake import FakeKubeClient
from kubechain.models import TaskRun
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
