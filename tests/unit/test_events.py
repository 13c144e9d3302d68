"""Kubernetes Events: when they are posted, their deterministic names, and messages the API server takes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kubechain.kube.events import EventRecorder, event_name
from kubechain.kube.fake import FakeKubeClient
from kubechain.models import TaskRun
from kubechain.testing.waiting import wait_for
from tests.unit.fakes import create


class GatedEvents(FakeKubeClient):
    """Holds every Event post until ``gate`` opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def create_event(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.gate.wait(timeout=10), "the test never opened the gate"
        return super().create_event(namespace, body)


def test_events_are_posted_before_emit_returns_unless_deferred_to_the_senders() -> None:
    kube = GatedEvents()
    run = TaskRun.from_wire(
        {"metadata": {"name": "r", "namespace": "default", "uid": "u1", "resourceVersion": "7"}}
    )
    recorder = EventRecorder(kube, "kubechain-worker", "w1", background=True, senders=1)
    # Deferred: emit returns while the post waits in a sender thread.
    recorder.emit(run, "Normal", "TaskRunCreated", "Created TaskRun c", key="child-uid", deferred=True)
    assert kube.event_reasons("r") == []
    kube.gate.set()
    wait_for(lambda: kube.event_reasons("r") == ["TaskRunCreated"], what="the deferred Event")
    # Not deferred: posted by the time emit returns, although the recorder has senders.
    recorder.emit(run, "Normal", "LLMFinalAnswer", "LLM response received successfully", key="8")
    assert kube.event_reasons("r") == ["TaskRunCreated", "LLMFinalAnswer"]
    # A recorder without senders posts deferred Events itself.
    inline = EventRecorder(kube, "kubechain-worker", "w1")
    inline.emit(run, "Normal", "ToolCallCreated", "Created TaskRunToolCall t", key="t-uid", deferred=True)
    assert kube.event_reasons("r") == ["TaskRunCreated", "LLMFinalAnswer", "ToolCallCreated"]


def test_event_names_are_deterministic_per_transition() -> None:
    assert event_name("r", "u", "LLMFinalAnswer", "42") == event_name("r", "u", "LLMFinalAnswer", "42")
    assert event_name("r", "u", "LLMFinalAnswer", "42") != event_name("r", "u", "LLMFinalAnswer", "43")


def test_event_messages_are_cut_to_the_api_servers_byte_limit_and_posting_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kube = FakeKubeClient()
    recorder = EventRecorder(kube, "kubechain-worker", "w1")
    run = TaskRun.from_wire(
        create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "m"})
    )
    feedback = "この変更は承認できません。" * 40  # 520 characters, 1,560 bytes
    recorder.emit(run, "Warning", "ToolCallRejected", feedback, key="1")
    (posted,) = [e["message"] for e in kube.events() if e["reason"] == "ToolCallRejected"]
    assert len(posted.encode()) <= 1024 and feedback.startswith(posted) and len(posted) == 341
    # JSON may carry a lone surrogate ("\\ud800"): an MCP server's or an LLM's text reaches messages as is
    recorder.emit(run, "Warning", "ExecutionFailed", 'tool said "\ud800"', key="3")
    (lone,) = [e["message"] for e in kube.events() if e["reason"] == "ExecutionFailed"]
    assert lone == 'tool said "?"'

    class BrokenProxy(FakeKubeClient):
        def create_event(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
            raise ValueError("a 200 whose body is not JSON")

    EventRecorder(BrokenProxy(), "kubechain-worker", "w1").emit(run, "Normal", "X", "y", key="2")
    assert "could not record event X on default/r: a 200 whose body is not JSON" in caplog.text


class RefusedEvents(FakeKubeClient):
    def create_event(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("api down")


def test_a_deferred_event_that_fails_is_logged_naming_the_resource_its_caller_works_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Posted by a sender thread, its failure's log line named no run: the sender runs in the caller's
    log context (a fan-out's children's Events, posted for the run that made them)."""
    import logging

    from kubechain.observability.logs import ResourceFilter, resource_context

    run = TaskRun.from_wire(
        {"metadata": {"name": "child", "namespace": "ns1", "uid": "u1", "resourceVersion": "7"}}
    )
    recorder = EventRecorder(RefusedEvents(), "kubechain-worker", "w1", background=True, senders=1)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(ResourceFilter())
    logger = logging.getLogger("kubechain.kube.events")
    logger.addHandler(handler)
    try:
        with resource_context("TaskRun", "ns1", "r1", "kubechain.llm_call"):
            recorder.emit(run, "Normal", "TaskRunCreated", "Created", key="k", deferred=True)
        recorder.flush()  # returns once the sender is done with it (its line written)
    finally:
        logger.removeHandler(handler)
    (line,) = [r for r in records if "could not record event" in r.getMessage()]
    assert line.threadName.startswith("events-"), "posted by a sender thread"
    fields = {key: getattr(line, key, None) for key in ("kind", "namespace", "resource", "run", "task")}
    assert fields == {
        "kind": "TaskRun",
        "namespace": "ns1",
        "resource": "r1",
        "run": "r1",
        "task": "kubechain.llm_call",
    }


class TimedEvents(FakeKubeClient):
    def __init__(self) -> None:
        super().__init__()
        self.posted_at: list[float] = []

    def create_event(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.posted_at.append(time.monotonic())
        return super().create_event(namespace, body)


def test_a_deferred_event_waits_its_delay_so_the_work_it_describes_goes_first_and_flush_posts_it_now() -> (
    None
):
    """A fan-out's ToolCallCreated Events were posted while its fifty tool calls were being claimed."""
    kube = TimedEvents()
    run = TaskRun.from_wire(
        {"metadata": {"name": "r", "namespace": "default", "uid": "u1", "resourceVersion": "7"}}
    )
    recorder = EventRecorder(kube, "kubechain-worker", "w1", background=True, senders=2, delay_s=0.3)
    emitted = time.monotonic()
    recorder.emit(run, "Normal", "ToolCallCreated", "Created TaskRunToolCall t1", key="t1", deferred=True)
    recorder.emit(run, "Normal", "LLMFinalAnswer", "LLM response received successfully", key="8")
    assert kube.event_reasons("r") == ["LLMFinalAnswer"], "not deferred: posted at once"
    wait_for(lambda: len(kube.posted_at) == 2, what="the deferred Event")
    assert kube.posted_at[1] - emitted >= 0.3
    # flush (a worker shutting down) does not wait out the delay
    waiting = EventRecorder(kube, "kubechain-worker", "w1", background=True, senders=1, delay_s=3600)
    waiting.emit(run, "Normal", "ToolCallCreated", "Created TaskRunToolCall t2", key="t2", deferred=True)
    waiting.flush(timeout_s=30)
    assert kube.event_reasons("r") == ["LLMFinalAnswer", "ToolCallCreated", "ToolCallCreated"]


def test_an_event_this_process_posted_or_found_there_lately_is_not_posted_again() -> None:
    """An ignored approval annotation on a call waiting via HumanLayer was warned about at every check: a
    refused create (409) each time, for an Event that was already there."""
    kube = FakeKubeClient()
    run = TaskRun.from_wire(
        {"metadata": {"name": "r", "namespace": "default", "uid": "u1", "resourceVersion": "7"}}
    )
    recorder = EventRecorder(kube, "kubechain-worker", "w1")

    def posts() -> int:
        return sum(1 for method, path in kube.requests if method == "POST" and path.endswith("/events"))

    for _ in range(3):
        recorder.emit(run, "Warning", "ApprovalAnnotationIgnored", "not a decision", key="approval=maybe")
    assert posts() == 1 and kube.event_reasons("r") == ["ApprovalAnnotationIgnored"]
    # another process's recorder finds it there once, then remembers it too
    other = EventRecorder(kube, "kubechain-worker", "w2")
    for _ in range(3):
        other.emit(run, "Warning", "ApprovalAnnotationIgnored", "not a decision", key="approval=maybe")
    assert posts() == 2
    # another key is another Event
    recorder.emit(run, "Warning", "ApprovalAnnotationIgnored", "not a decision", key="approval=perhaps")
    assert posts() == 3
