"""The watcher's informers, dispatch, resync and leader election, with an in-memory API server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from kubechain.kube.errors import Gone, Unavailable
from kubechain.kube.fake import FakeKubeClient
from kubechain.queueing import ResourceMessage, TaskName
from kubechain.settings import Settings
from tests.unit.fakes import create
from watcher.informer import Informer
from watcher.leader import LeaderElector
from watcher.main import Watcher


class ScriptedWatchKube(FakeKubeClient):
    """A fake whose watch streams are scripted per call: a list of events or an exception."""

    def __init__(self, streams: list[Any]) -> None:
        super().__init__()
        self.streams = streams
        self.watch_calls: list[str] = []

    def watch_raw(
        self,
        plural: str,
        namespace: str | None,
        resource_version: str,
        timeout_s: int = 300,
        *,
        field_selector: str | None = None,
        label_selector: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        self.watch_calls.append(resource_version)
        step = self.streams.pop(0) if self.streams else []
        if isinstance(step, Exception):
            raise step
        yield from step
        if not self.streams:
            self.stop.set()

    stop = threading.Event()


def run(kind: str, obj: dict[str, Any], rv: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {"name": obj["name"], "namespace": "default", "resourceVersion": rv, "uid": "u"},
        "spec": {},
        "status": obj.get("status", {}),
    }


def test_informer_relists_on_gone_and_resumes_after_errors() -> None:
    seen: list[tuple[str, str]] = []
    kube = ScriptedWatchKube(
        [
            Gone(410, "Expired", "too old"),
            Unavailable(0, "Unavailable", "connection reset"),
            [
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "900"}}},
                {"type": "MODIFIED", "object": run("TaskRun", {"name": "a"}, "901")},
                {"type": "MODIFIED", "object": run("TaskRun", {"name": "a"}, "901")},  # a duplicate delivery
            ],
        ]
    )
    ScriptedWatchKube.stop = threading.Event()
    create(kube, "TaskRun", "taskruns", "a", {"agentRef": {"name": "x"}, "userMessage": "m"})
    informer = Informer(
        kube,
        "TaskRun",
        "taskruns",
        None,
        lambda k, t, o, p: seen.append((t, o["metadata"]["resourceVersion"])),
        ScriptedWatchKube.stop,
    )
    informer.run()
    assert informer.relists == 2, "listed at start and again after 410 Gone"
    assert kube.watch_calls[1] == kube.watch_calls[2], (
        "after a connection error the watch resumes from the same resourceVersion"
    )
    assert [t for t, _ in seen].count("ADDED") == 1, (
        "the relist after 410 does not re-deliver an unchanged object"
    )
    assert seen[-1] == ("MODIFIED", "901") and [rv for _, rv in seen].count("901") == 1, (
        "duplicates are dropped"
    )
    assert informer.resource_version == "901"


def test_informer_caches_objects_without_their_managed_fields() -> None:
    managed = [{"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {}}}]
    watched = run("TaskRun", {"name": "b"}, "901")
    watched["metadata"]["managedFields"] = managed
    kube = ScriptedWatchKube([[{"type": "ADDED", "object": watched}]])
    ScriptedWatchKube.stop = threading.Event()
    create(kube, "TaskRun", "taskruns", "a", {"agentRef": {"name": "x"}, "userMessage": "m"})
    (stored,) = [
        obj for (_, plural, _, name), obj in kube.objects.items() if (plural, name) == ("taskruns", "a")
    ]
    stored["metadata"]["managedFields"] = managed
    handled: list[dict[str, Any]] = []
    informer = Informer(
        kube, "TaskRun", "taskruns", None, lambda k, t, o, p: handled.append(o), ScriptedWatchKube.stop
    )
    informer.run()
    assert [o["metadata"]["name"] for o in handled] == ["a", "b"]
    for obj in [*handled, *informer.snapshot().values()]:
        assert "managedFields" not in obj["metadata"], obj["metadata"]


def test_readiness_change_fans_out_to_dependents_and_resync_backs_off() -> None:
    kube = FakeKubeClient()
    sent: list[tuple[TaskName, ResourceMessage]] = []
    settings = Settings(stale_after_s=1.0)
    watcher = Watcher(
        settings, kube, lambda task, message, countdown: sent.append((task, message)), leader_election=False
    )
    agent = {
        "kind": "Agent",
        "metadata": {"name": "a", "namespace": "default", "resourceVersion": "1", "generation": 1},
        "spec": {"llmRef": {"name": "l"}},
        "status": {"status": "Ready", "observedGeneration": 1, "ready": True},
    }
    pending_run = {
        "kind": "TaskRun",
        "metadata": {"name": "r", "namespace": "default", "resourceVersion": "2", "uid": "u"},
        "spec": {"agentRef": {"name": "a"}},
        "status": {"phase": "Pending"},
    }
    for informer in watcher.informers:
        if informer.kind == "TaskRun":
            informer.cache[("default", "r")] = pending_run
        if informer.kind == "Agent":
            informer.cache[("default", "a")] = agent
    watcher._on_event("Agent", "MODIFIED", agent, {**agent, "status": {"status": "Pending"}})
    queued = []
    while not watcher._outbox.empty():
        queued.append(watcher._outbox.get_nowait()[0])
    assert [(w.task, w.kind, w.name) for w in queued] == [(TaskName.PREPARE, "TaskRun", "r")]
    assert watcher.resync() == 0, "just enqueued: not stale yet"
    watcher._recent = {key: (rv, at - 1.5, n) for key, (rv, at, n) in watcher._recent.items()}
    assert watcher.resync() == 1, "stale: re-enqueued"
    watcher._recent = {key: (rv, at - 1.5, n) for key, (rv, at, n) in watcher._recent.items()}
    assert watcher.resync() == 1, "still unchanged after another stale period: re-enqueued again"
    watcher._recent = {key: (rv, at - 1.5, n) for key, (rv, at, n) in watcher._recent.items()}
    assert watcher.resync() == 0, "now it waits twice as long"
    watcher._recent = {key: (rv, at - 1.0, n) for key, (rv, at, n) in watcher._recent.items()}
    assert watcher.resync() == 1


def test_lease_is_taken_over_only_after_it_expires() -> None:
    kube = FakeKubeClient()
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    first = LeaderElector(kube, "default", "lease", "one", lease_duration_s=15, clock=lambda: now[0])
    second = LeaderElector(kube, "default", "lease", "two", lease_duration_s=15, clock=lambda: now[0])
    first.step()
    second.step()
    assert first.is_leader and not second.is_leader
    now[0] += timedelta(seconds=5)
    first.step()
    second.step()
    assert first.is_leader and not second.is_leader
    now[0] += timedelta(seconds=16)  # "one" died: it stopped renewing
    second.step()
    assert second.is_leader
    lease = kube.get_lease("default", "lease")
    assert lease["spec"]["holderIdentity"] == "two" and lease["spec"]["leaseTransitions"] == 1
    assert not first.is_leader, "a leader that cannot renew stops acting before the lease runs out"


def test_small_runs_travel_with_their_message_and_large_ones_are_read_by_the_worker() -> None:
    kube = FakeKubeClient()
    watcher = Watcher(Settings(), kube, lambda *_: None, leader_election=False)

    def queued_snapshot(obj: dict[str, Any]) -> dict[str, Any] | None:
        watcher._on_event("TaskRun", "ADDED", obj, None)
        (item,) = [watcher._outbox.get_nowait()]
        work, rv, snapshot = item
        message = watcher.message_for(work, rv, snapshot)
        assert (work.task, message.resource_version) == (TaskName.PREPARE, obj["metadata"]["resourceVersion"])
        return message.snapshot

    small = run("TaskRun", {"name": "small"}, "5")
    assert queued_snapshot(small) == small
    large = run("TaskRun", {"name": "large", "status": {"userMsgPreview": "x" * 40_000}}, "6")
    assert queued_snapshot(large) is None


def test_a_turn_handed_off_to_its_worker_is_not_queued_by_the_watcher() -> None:
    kube = FakeKubeClient()
    watcher = Watcher(Settings(), kube, lambda *_: None, leader_election=False)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    handed = run(
        "TaskRun", {"name": "r", "status": {"phase": "ReadyForLLM", "claimedBy": "w1", "claimedAt": now}}, "7"
    )
    watcher._on_event("TaskRun", "MODIFIED", handed, None)
    assert watcher._outbox.empty()
    free = run("TaskRun", {"name": "r", "status": {"phase": "ReadyForLLM"}}, "8")
    watcher._on_event("TaskRun", "MODIFIED", free, None)
    work, _, snapshot = watcher._outbox.get_nowait()
    assert work.task == TaskName.LLM_CALL and snapshot == free


def test_resync_revalidates_a_ready_task_whose_run_is_missing() -> None:
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    task = {
        "kind": "Task",
        "metadata": {"name": "t", "namespace": "default", "resourceVersion": "5", "generation": 1},
        "spec": {"agentRef": {"name": "a"}},
        "status": {"status": "Ready", "ready": True, "observedGeneration": 1},
    }
    informers = {informer.kind: informer for informer in watcher.informers}
    informers["Task"].cache[("default", "t")] = task
    assert watcher.resync() == 1
    work = watcher._outbox.get_nowait()[0]
    assert (work.task, work.kind, work.name) == (TaskName.VALIDATE, "Task", "t")

    other_namespace = {
        "kind": "TaskRun",
        "metadata": {
            "name": "t-1",
            "namespace": "elsewhere",
            "labels": {"kubechain.humanlayer.dev/task": "t"},
        },
        "status": {"phase": "FinalAnswer"},
    }
    informers["TaskRun"].cache[("elsewhere", "t-1")] = other_namespace
    assert watcher.resync(force=True) == 1, "a run of a same-named Task elsewhere is not this Task's"
    watcher._outbox.get_nowait()
    informers["TaskRun"].cache[("default", "t-1")] = {
        **other_namespace,
        "metadata": {**other_namespace["metadata"], "namespace": "default"},
    }
    assert watcher.resync(force=True) == 0, "its run exists: nothing to do"
