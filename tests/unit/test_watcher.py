"""The watcher's informers, dispatch, resync and leader election, with an in-memory API server."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubechain.kube.errors import Gone, Unavailable, error_for
from kubechain.kube.fake import FakeKubeClient
from kubechain.observability.health import Health
from kubechain.queueing import ResourceMessage, TaskName
from kubechain.settings import Settings
from kubechain.statemachines.lease import lease_holder
from kubechain.statemachines.routing import (
    cached_form,
    is_terminal,
    readiness,
    tasks_missing_their_run,
    work_for,
)
from kubechain.testing.waiting import wait_for
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


def ready(kind: str, name: str, spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    """A validated object as the cache holds it."""
    return {
        "kind": kind,
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1", "generation": 1},
        "spec": spec or {},
        "status": {"status": "Ready", "ready": True, "observedGeneration": 1, **status},
    }


def test_after_an_outage_a_410_on_resume_relists_at_once_and_the_backoff_starts_over() -> None:
    """The back-off grown during an API-server outage was kept: the 410 that follows the outage (its
    history moved on) waited 12.8 s before the relist, and the next hiccup 25.6 s, the cache stale."""

    class RecordingStop(threading.Event):
        waits: list[float] = []

        def wait(self, timeout: float | None = None) -> bool:
            self.waits.append(round(timeout or 0, 1))
            return self.is_set()

    outage = [Unavailable(0, "Unavailable", "connection refused") for _ in range(6)]
    after = [Unavailable(0, "Unavailable", "connection reset")]
    event = {"type": "MODIFIED", "object": run("TaskRun", {"name": "a"}, "950")}
    kube = ScriptedWatchKube([*outage, Gone(410, "Expired", "too old"), *after, [event]])
    ScriptedWatchKube.stop = stop = RecordingStop()
    stop.waits = []
    informer = Informer(kube, "TaskRun", "taskruns", None, lambda *_: None, stop)
    informer.run()
    assert informer.relists == 2
    assert stop.waits == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 0.2], "no wait before the relist; then from 0.2 again"


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
        lambda k, t, o, p, s: seen.append((t, o["metadata"]["resourceVersion"])),
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
        kube, "TaskRun", "taskruns", None, lambda k, t, o, p, s: handled.append(o), ScriptedWatchKube.stop
    )
    informer.run()
    assert [o["metadata"]["name"] for o in handled] == ["a", "b"]
    for obj in [*handled, *informer.snapshot().values()]:
        assert "managedFields" not in obj["metadata"], obj["metadata"]


def test_runs_and_tool_calls_are_cached_without_their_bulk_and_decide_the_same() -> None:
    """Finished or in flight: a run in flight may carry a 1 MiB context window, and a watcher holding
    every run in flight whole ran out of memory under load."""
    window = [{"role": "user", "content": "x" * 50_000}, {"role": "assistant", "content": "y" * 50_000}]
    finished = run(
        "TaskRun", {"name": "done", "status": {"phase": "FinalAnswer", "contextWindow": window}}, "7"
    )
    finished["spec"] = {"agentRef": {"name": "a"}, "userMessage": "x" * 50_000}
    finished["status"]["output"] = "y" * 50_000
    finished["metadata"]["labels"] = {"kubechain.humanlayer.dev/task": "t"}
    finished["metadata"]["ownerReferences"] = [{"kind": "TaskRunToolCall", "name": "parent-tc", "uid": "p"}]
    going = run(
        "TaskRun", {"name": "going", "status": {"phase": "ToolCallsPending", "contextWindow": window}}, "8"
    )
    # kubectl apply's copy of the whole object, userMessage and all
    finished["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": json.dumps(finished["spec"])
    }
    tool_call = run(
        "TaskRunToolCall", {"name": "tc", "status": {"phase": "Succeeded", "result": "r" * 50_000}}, "9"
    )
    tool_call["spec"] = {"taskRunRef": {"name": "going"}, "arguments": "{" + " " * 50_000 + "}"}
    # a failed call's error, up to 64 KiB, is in its statusDetail too
    tool_call["status"] |= {"error": "e" * 50_000, "statusDetail": "e" * 50_000}
    handled: list[dict[str, Any]] = []
    caches = {}
    for kind, plural, obj in [
        ("TaskRun", "taskruns", finished),
        ("TaskRun", "taskruns", going),
        ("TaskRunToolCall", "taskruntoolcalls", tool_call),
    ]:
        # copies in, copies out: the originals stay what the API server sent, to compare with
        kube = ScriptedWatchKube([[{"type": "ADDED", "object": copy.deepcopy(obj)}]])
        ScriptedWatchKube.stop = threading.Event()
        informer = Informer(
            kube,
            kind,
            plural,
            None,
            lambda k, t, o, p, s: handled.append(copy.deepcopy(o)),
            ScriptedWatchKube.stop,
        )
        informer.run()
        caches.setdefault(kind, {}).update(informer.snapshot())
    assert handled == [finished, going, tool_call], "the handler decides on the whole object"
    kept = {key[1]: obj for objects in caches.values() for key, obj in objects.items()}
    assert all(len(json.dumps(kept[name])) < 1_000 for name in ("done", "going", "tc")), kept
    assert kept["going"]["status"] == {"phase": "ToolCallsPending"}
    assert kept["done"]["status"]["phase"] == "FinalAnswer"
    assert kept["done"]["metadata"] == {**finished["metadata"], "annotations": {}}
    now = datetime.now(UTC)
    for kind, whole in [("TaskRun", finished), ("TaskRun", going), ("TaskRunToolCall", tool_call)]:
        slim = kept[whole["metadata"]["name"]]
        for resync in (False, True):
            assert work_for(kind, slim, now, 60, resync=resync) == work_for(
                kind, whole, now, 60, resync=resync
            )
        assert readiness(kind, slim) == readiness(kind, whole)
        assert is_terminal(kind, slim) == is_terminal(kind, whole)
    whole_cache = {"TaskRun": {("default", "done"): finished}, "Task": {("default", "t"): ready("Task", "t")}}
    assert tasks_missing_their_run(caches | {"Task": whole_cache["Task"]}) == tasks_missing_their_run(
        whole_cache
    )


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
        if informer.kind == "LLM":
            informer.cache[("default", "l")] = ready("LLM", "l")
    watcher._on_event("Agent", "MODIFIED", agent, {**agent, "status": {"status": "Pending"}})
    queued = []
    while not watcher._outbox.empty():
        queued.append(watcher._outbox.get_nowait()[0])
    assert [(w.task, w.kind, w.name) for w in queued] == [(TaskName.PREPARE, "TaskRun", "r")]

    def resync_and_send() -> int:
        count = watcher.resync()
        while not watcher._outbox.empty():
            watcher._outbox.get_nowait()
        return count

    assert resync_and_send() == 0, "just enqueued: not stale yet"
    watcher._recent = {key: (rv, at - 1.5, n) for key, (rv, at, n) in watcher._recent.items()}
    assert resync_and_send() == 1, "stale: re-enqueued"
    watcher._recent = {key: (rv, at - 1.5, n) for key, (rv, at, n) in watcher._recent.items()}
    assert resync_and_send() == 1, "still unchanged after another stale period: re-enqueued again"
    watcher._recent = {key: (rv, at - 1.5, n) for key, (rv, at, n) in watcher._recent.items()}
    assert resync_and_send() == 0, "now it waits twice as long"
    watcher._recent = {key: (rv, at - 1.0, n) for key, (rv, at, n) in watcher._recent.items()}
    assert resync_and_send() == 1


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


@pytest.mark.parametrize("skew_s", [-60, 60], ids=["standby-behind", "standby-ahead"])
def test_lease_expiry_is_timed_on_the_standbys_clock_so_skew_neither_delays_nor_hastens_it(
    skew_s: int,
) -> None:
    kube = FakeKubeClient()
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    leader = LeaderElector(kube, "default", "lease", "one", lease_duration_s=15, clock=lambda: now[0])
    standby = LeaderElector(
        kube, "default", "lease", "two", lease_duration_s=15, clock=lambda: now[0] + timedelta(seconds=skew_s)
    )
    for _ in range(10):  # 20 s of the leader renewing every 2 s
        leader.step()
        standby.step()
        assert leader.is_leader and not standby.is_leader, "taken over while still renewed"
        now[0] += timedelta(seconds=2)
    now[0] += timedelta(seconds=14)  # the leader died after its last renewal, 16 s ago
    standby.step()
    assert standby.is_leader, "not taken over a lease duration after the last renewal"


def test_a_lease_renewed_long_ago_is_taken_at_first_sight() -> None:
    kube = FakeKubeClient()
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    LeaderElector(kube, "default", "lease", "dead", lease_duration_s=15, clock=lambda: now[0]).step()
    now[0] += timedelta(minutes=10)
    restarted = LeaderElector(kube, "default", "lease", "new", lease_duration_s=15, clock=lambda: now[0])
    restarted.step()
    assert restarted.is_leader


def test_a_lease_is_held_only_while_its_holder_renews_it() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    lease = {"holderIdentity": "w-1", "leaseDurationSeconds": 15, "renewTime": "2026-12-01T11:59:50.000000Z"}
    assert lease_holder(lease, now) == "w-1"
    assert lease_holder(lease, now + timedelta(seconds=6)) is None, "expired"
    assert lease_holder({"holderIdentity": None, "renewTime": None}, now) is None, "released"


def test_a_message_names_the_object_and_its_own_version_but_never_carries_it() -> None:
    kube = FakeKubeClient()
    watcher = Watcher(Settings(), kube, lambda *_: None, leader_election=False)
    obj = run("TaskRun", {"name": "r"}, "5")
    watcher._on_event("TaskRun", "ADDED", obj, None)
    work, rv, own_version = watcher._outbox.get_nowait()
    message = watcher.message_for(work, rv, own_version)
    assert (work.task, message.name, message.resource_version) == (TaskName.PREPARE, "r", "5")
    assert "status" not in message.model_dump_json() and "snapshot" not in message.model_dump()
    # A version of another object (a tool call prompting its run) is not the run's: the worker reads fresh.
    assert watcher.message_for(work, "9", own_version=False).resource_version == ""


def test_a_runs_work_carries_its_agent_as_the_watchers_informer_holds_it() -> None:
    """A worker may hold a copy of the Agent read before its latest edit was validated: the message about
    a run (its prepare, its turn, its tool calls) says which generation of the run's Agent the watcher has
    seen, and whether validated, so that a copy behind it is read again. Only a hint: no content."""
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    for name, generation in (("a", 3), ("b", 1), ("c", 1)):
        agent = ready("Agent", name)
        agent["metadata"].update(uid=f"uid-{name}", generation=generation)
        agent["status"]["observedGeneration"] = generation - 1 if name == "a" else generation
        informers["Agent"].cache[("default", name)] = agent
    informers["Task"].cache[("default", "t")] = ready("Task", "t", {"agentRef": {"name": "b"}})

    def hint_of(kind: str, obj: dict[str, Any]) -> dict[str, Any] | None:
        informers[kind].cache[("default", obj["metadata"]["name"])] = (
            obj  # (before its handler, as informers do)
        )
        watcher._on_event(kind, "ADDED", obj, None)
        work, rv, own_version = watcher._outbox.get_nowait()
        seen = watcher.message_for(work, rv, own_version).model_dump()["agent_seen"]
        return None if seen is None else dict(seen)

    direct = run("TaskRun", {"name": "r"}, "5")
    direct["spec"] = {"agentRef": {"name": "a"}, "userMessage": "hi"}
    a = {"name": "a", "uid": "uid-a", "generation": 3, "observed_generation": 2}
    assert hint_of("TaskRun", direct) == a
    direct["status"] = {"phase": "ReadyForLLM", "agentName": "a"}
    direct["metadata"]["resourceVersion"] = "6"
    assert hint_of("TaskRun", direct) == a, "its turn"
    call = run("TaskRunToolCall", {"name": "r-abc-tc-01"}, "7")
    call["spec"] = {"taskRunRef": {"name": "r"}, "toolRef": {"name": "add"}}
    call["metadata"]["ownerReferences"] = [{"kind": "TaskRun", "name": "r", "uid": "u"}]
    assert hint_of("TaskRunToolCall", call) == a, "its tool call's grant check"
    of_task = run("TaskRun", {"name": "t-1"}, "8")
    of_task["spec"] = {"taskRef": {"name": "t"}}
    assert hint_of("TaskRun", of_task) == {
        "name": "b",
        "uid": "uid-b",
        "generation": 1,
        "observed_generation": 1,
    }
    of_task["status"] = {"phase": "ReadyForLLM", "agentName": "c"}
    of_task["metadata"]["resourceVersion"] = "9"
    assert hint_of("TaskRun", of_task)["name"] == "c", "the one it started with"  # type: ignore[index]
    unknown = run("TaskRun", {"name": "u"}, "10")
    unknown["spec"] = {"agentRef": {"name": "not-cached"}, "userMessage": "hi"}
    assert hint_of("TaskRun", unknown) is None
    informers["Agent"].cache[("default", "a")]["metadata"]["generation"] = 4  # edited since
    assert hint_of("Agent", informers["Agent"].cache[("default", "a")]) is None, "its validation: no hint"


def test_a_turn_claimed_by_the_worker_that_made_it_ready_is_not_queued_by_the_watcher() -> None:
    kube = FakeKubeClient()
    watcher = Watcher(Settings(), kube, lambda *_: None, leader_election=False)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    claimed = {"phase": "SendContextWindowToLLM", "claimedBy": "w1", "claimedAt": now}
    watcher._on_event("TaskRun", "MODIFIED", run("TaskRun", {"name": "r", "status": claimed}, "7"), None)
    assert watcher._outbox.empty()
    free = run("TaskRun", {"name": "r", "status": {"phase": "ReadyForLLM"}}, "8")
    watcher._on_event("TaskRun", "MODIFIED", free, None)
    work, rv, own_version = watcher._outbox.get_nowait()
    assert work.task == TaskName.LLM_CALL and (rv, own_version) == ("8", True)


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
    informers["Agent"].cache[("default", "a")] = ready("Agent", "a", {"llmRef": {"name": "l"}})
    informers["LLM"].cache[("default", "l")] = ready("LLM", "l")
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
    assert watcher.resync(force=True) == 1, "its run exists, and answered: the Task must show the answer"
    work = watcher._outbox.get_nowait()[0]
    assert (work.task, work.kind, work.name, work.reason) == (
        TaskName.VALIDATE,
        "Task",
        "t",
        "output-missing",
    )
    shown = {**task, "status": {**task["status"], "output": "the answer " * 1000}}
    informers["Task"].cache[("default", "t")] = cached_form("Task", shown)
    assert "output" not in informers["Task"].cache[("default", "t")]["status"], "a Task without its output"
    assert "output" not in informers["Task"].cache[("default", "t")]["status"], "not kept in memory"
    assert watcher.resync(force=True) == 0, "its run exists and its answer is shown: nothing to do"


def test_informer_relists_when_its_resource_version_is_newer_than_the_api_server_has() -> None:
    # What kube-apiserver answers a watch from a resourceVersion it has not reached (an etcd restore).
    too_large = {
        "kind": "Status",
        "code": 504,
        "reason": "Timeout",
        "message": "Too large resource version: 901, current: 12",
        "details": {
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]
        },
    }
    assert isinstance(error_for(504, too_large), Gone)
    assert isinstance(error_for(504, {"reason": "Timeout", "message": "request timed out"}), Unavailable)
    kube = ScriptedWatchKube([error_for(504, too_large), []])
    ScriptedWatchKube.stop = threading.Event()
    informer = Informer(kube, "TaskRun", "taskruns", None, lambda *_: None, ScriptedWatchKube.stop)
    informer.run()
    assert informer.relists == 2, "listed at start and again instead of retrying the same resourceVersion"


def test_finished_tool_calls_prompt_their_running_parent_on_events_but_not_on_every_resync() -> None:
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    informers["TaskRun"].cache[("default", "r")] = run(
        "TaskRun", {"name": "r", "status": {"phase": "FinalAnswer"}}, "3"
    )
    for index, rv in ((1, "4"), (2, "5")):
        call = run("TaskRunToolCall", {"name": f"r-abc-tc-0{index}", "status": {"phase": "Succeeded"}}, rv)
        call["spec"] = {"taskRunRef": {"name": "r"}}
        call["metadata"]["ownerReferences"] = [{"kind": "TaskRun", "name": "r", "uid": "u"}]
        informers["TaskRunToolCall"].cache[("default", f"r-abc-tc-0{index}")] = call
    assert watcher.resync(force=True) == 0, "a finished run's finished tool calls call for nothing"
    watcher._on_event("TaskRunToolCall", "ADDED", call, None)  # as a relist after a restart delivers it
    assert watcher._outbox.empty(), "nor on events: a relist delivers every finished call ever made"
    informers["TaskRun"].cache[("default", "r")] = run(
        "TaskRun", {"name": "r", "status": {"phase": "ToolCallsPending"}}, "3"
    )
    watcher._on_event("TaskRunToolCall", "MODIFIED", call, None)
    work, rv, own_version = watcher._outbox.get_nowait()
    assert (work.task, work.kind, work.name, work.reason) == (
        TaskName.PREPARE,
        "TaskRun",
        "r",
        "toolcall-finished",
    )
    # The tool call's version is not the run's: the worker must not read the run "no older than" it.
    assert (rv, own_version) == ("5", False) and watcher.message_for(
        work, rv, own_version
    ).resource_version == ""


def next_work(watcher: Watcher) -> tuple[TaskName, str, str, str]:
    """The next work the watcher queued for the sender: task, kind, name and why."""
    work, _, _ = watcher._outbox.get_nowait()
    return work.task, work.kind, work.name, work.reason


def test_a_tool_call_deleted_while_its_run_goes_on_prompts_the_run_but_not_one_deleted_with_it() -> None:
    """Deleting a tool call cancels it; if it was the last its turn waited for, the run goes on now."""
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    pending = run("TaskRun", {"name": "r", "status": {"phase": "ToolCallsPending"}}, "3")
    informers["TaskRun"].cache[("default", "r")] = pending
    calls = []
    for index, phase in ((1, "Succeeded"), (2, "Running")):
        call = toolcall_event(f"r-abc-tc-0{index}", "abc", phase, str(3 + index))
        call["metadata"]["ownerReferences"] = [{"kind": "TaskRun", "name": "r", "uid": "u"}]
        informers["TaskRunToolCall"]._apply("ADDED", call)
        calls.append(call)
    while not watcher._outbox.empty():
        watcher._outbox.get_nowait()
    informers["TaskRunToolCall"]._apply("DELETED", calls[1])  # the running one, cancelled by hand
    assert next_work(watcher) == (TaskName.PREPARE, "TaskRun", "r", "toolcall-deleted")
    # deleted with its run (being deleted, gone from the cache, or ended): nothing to go on with
    pending["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    informers["TaskRunToolCall"]._apply("DELETED", calls[0])
    del informers["TaskRun"].cache[("default", "r")]
    informers["TaskRunToolCall"]._apply("DELETED", calls[0])
    assert watcher._outbox.empty()


def test_a_deleted_sub_agent_run_prompts_the_tool_call_that_waited_for_it() -> None:
    """Its call waited in AwaitingSubAgent until its own resync, by then backed off to minutes."""
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    child = run("TaskRun", {"name": "delegate-x", "status": {"phase": "ReadyForLLM"}}, "9")
    child["metadata"]["ownerReferences"] = [{"kind": "TaskRunToolCall", "name": "r-abc-tc-01", "uid": "p"}]
    watcher._on_event("TaskRun", "DELETED", child, child)
    assert next_work(watcher) == (TaskName.TOOL_CALL, "TaskRunToolCall", "r-abc-tc-01", "sub-agent-deleted")
    mine = run("TaskRun", {"name": "mine", "status": {"phase": "ReadyForLLM"}}, "10")  # no owner: nothing
    watcher._on_event("TaskRun", "DELETED", mine, mine)
    assert watcher._outbox.empty()


def test_work_waiting_for_the_sender_is_replaced_by_newer_state_not_queued_again() -> None:
    # No sender thread runs here: Redis is down and nothing leaves the outbox.
    watcher = Watcher(Settings(stale_after_s=1.0), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    for name in ("a", "b"):
        informers["TaskRun"].cache[("default", name)] = run(
            "TaskRun", {"name": name, "status": {"phase": "Pending"}}, "1"
        )
    assert watcher.resync(force=True) == 2
    for _ in range(5):
        watcher._recent = {key: (rv, at - 400, n) for key, (rv, at, n) in watcher._recent.items()}
        assert watcher.resync(force=True) == 0
    assert watcher._outbox.qsize() == 2, "one waiting message per object however long the outage"
    newer = run("TaskRun", {"name": "a", "status": {"phase": "Pending"}}, "9")
    watcher._on_event("TaskRun", "MODIFIED", newer, None)
    assert watcher._outbox.qsize() == 2
    sent = [watcher._outbox.get_nowait() for _ in range(2)]
    assert [(work.name, rv) for work, rv, _ in sent] == [("a", "9"), ("b", "1")], (
        "first queued, first sent, with the newest state"
    )


def test_resync_revalidates_ready_agents_and_tasks_whose_dependencies_went_away() -> None:
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    spec = {
        "llmRef": {"name": "l"},
        "tools": [{"name": "t"}],
        "mcpServers": [{"name": "m"}],
        "subAgents": [{"name": "helper"}],
        "humanContactChannels": [{"name": "c"}],
    }
    dependencies = {
        ("LLM", "l"): ready("LLM", "l"),
        ("Tool", "t"): ready("Tool", "t"),
        ("MCPServer", "m"): ready("MCPServer", "m", connected=True),
        ("Agent", "helper"): ready("Agent", "helper", {"llmRef": {"name": "l"}}),
        ("ContactChannel", "c"): ready("ContactChannel", "c"),
    }
    for (kind, name), obj in dependencies.items():
        informers[kind].cache[("default", name)] = obj
    informers["Agent"].cache[("default", "a")] = ready("Agent", "a", spec)
    informers["Task"].cache[("default", "task")] = ready("Task", "task", {"agentRef": {"name": "a"}})
    informers["TaskRun"].cache[("default", "task-1")] = {
        **run("TaskRun", {"name": "task-1", "status": {"phase": "FinalAnswer"}}, "2"),
        "metadata": {
            "name": "task-1",
            "namespace": "default",
            "labels": {"kubechain.humanlayer.dev/task": "task"},
        },
    }

    def revalidations() -> list[tuple[str, str]]:
        watcher.resync(force=True)
        works = []
        while not watcher._outbox.empty():
            works.append(watcher._outbox.get_nowait()[0])
        return sorted((w.kind, w.name) for w in works if w.reason == "dependency-not-ready")

    assert revalidations() == [], "every dependency is there and ready"

    def revalidated(kind: str, name: str, broken: dict[str, Any] | None) -> list[tuple[str, str]]:
        cache = informers[kind].cache
        if broken is None:
            del cache[("default", name)]
        else:
            cache[("default", name)] = broken
        found = revalidations()
        cache[("default", name)] = dependencies[(kind, name)]
        return found

    not_ready = {"status": {"status": "Error", "ready": False}}
    assert revalidated("LLM", "l", {**dependencies[("LLM", "l")], **not_ready}) == [
        ("Agent", "a"),
        ("Agent", "helper"),
    ]
    assert revalidated("Tool", "t", None) == [("Agent", "a")]
    disconnected = {**dependencies[("MCPServer", "m")], "status": {"connected": False}}
    assert revalidated("MCPServer", "m", disconnected) == [("Agent", "a")]
    assert revalidated("Agent", "helper", None) == [("Agent", "a")], "sub-agents need only exist"
    unready_channel = {**dependencies[("ContactChannel", "c")], **not_ready}
    assert revalidated("ContactChannel", "c", unready_channel) == [("Agent", "a")]
    informers["Agent"].cache[("default", "a")] = {**ready("Agent", "a", spec), **not_ready}
    assert revalidations() == [("Task", "task")], "a Ready Task whose Agent is not"
    deleting = ready("Task", "task", {"agentRef": {"name": "a"}})
    deleting["metadata"]["deletionTimestamp"] = "2026-12-01T12:00:00Z"
    informers["Task"].cache[("default", "task")] = deleting
    assert revalidations() == [], "nothing is validated on its way out"


class FlakyLeaseKube(FakeKubeClient):
    def __init__(self) -> None:
        super().__init__()
        self.failure: Exception | None = None
        self.lease_reads = 0

    def get_lease(self, namespace: str, name: str) -> dict[str, Any]:
        self.lease_reads += 1
        if self.failure is not None:
            raise self.failure
        return super().get_lease(namespace, name)


def test_leader_election_survives_unexpected_errors_and_resumes_after_a_lapse() -> None:
    kube = FlakyLeaseKube()
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    started: list[datetime] = []
    resumed: list[datetime] = []

    def on_started() -> None:
        started.append(now[0])
        if len(started) == 1:
            raise RuntimeError("the first resync failed")

    elector = LeaderElector(
        kube,
        "default",
        "lease",
        "one",
        lease_duration_s=15,
        clock=lambda: now[0],
        on_started_leading=on_started,
        on_resumed_leading=lambda: resumed.append(now[0]),
    )
    elector.step()
    assert elector.is_leader and len(started) == 1, "a failing callback does not undo leadership"
    kube.failure = OSError("credential refresh failed")
    for _ in range(6):  # 12 s without a renewal: past the renew deadline
        now[0] += timedelta(seconds=2)
        elector.step()
    assert not elector.is_leader
    kube.failure = None
    now[0] += timedelta(seconds=2)
    elector.step()
    assert elector.is_leader and len(started) == 1 and resumed == [now[0]], (
        "leading again on its own Lease, it resumes (events it ignored are left to a resync)"
    )

    thread_kube = FlakyLeaseKube()
    thread_kube.failure = ValueError("not JSON")
    threaded = LeaderElector(thread_kube, "default", "lease", "two", retry_period_s=0.01)
    threaded.start()
    wait_for(lambda: thread_kube.lease_reads >= 3, timeout_s=10, what="three attempts")
    assert threaded._thread is not None and threaded._thread.is_alive()
    thread_kube.failure = None
    wait_for(lambda: threaded.is_leader, timeout_s=10, what="leadership")
    threaded.stop()


def test_a_slow_renewal_counts_from_when_it_was_sent() -> None:
    now = [datetime(2026, 12, 1, tzinfo=UTC)]

    class SlowKube(FakeKubeClient):
        def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
            now[0] += timedelta(seconds=9)  # the API server took 9 s to answer
            return super().replace_lease(namespace, name, body)

    elector = LeaderElector(SlowKube(), "default", "lease", "one", lease_duration_s=15, clock=lambda: now[0])
    elector.step()  # creates the lease (fast)
    now[0] += timedelta(seconds=2)
    elector.step()  # renews: sent at +2 s, answered at +11 s
    now[0] += timedelta(seconds=1)
    assert not elector.is_leader, "10 s after the renewTime it wrote: past the 9.9 s renew deadline"


def test_start_waits_for_the_informers_to_sync_within_one_deadline(monkeypatch: Any) -> None:
    """Informers that never sync (no RBAC in a namespace, a CRD missing) share one start-up deadline,
    rather than each holding up leader election for the whole timeout in turn."""
    import watcher.main as main

    clock = [1000.0]
    waited: list[float] = []

    class NeverSynced:
        def wait(self, timeout: float | None = None) -> bool:
            waited.append(timeout or 0.0)
            clock[0] += timeout or 0.0  # the wait used up its timeout
            return False

    monkeypatch.setattr(main.time, "monotonic", lambda: clock[0])
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    monkeypatch.setattr(watcher, "_spawn", lambda target, name: None)
    monkeypatch.setattr(watcher, "resync", lambda force=False: 0)
    for informer in watcher.informers:
        monkeypatch.setattr(informer, "synced", NeverSynced())
    watcher.start()
    assert len(waited) == len(watcher.informers) > 1
    assert sum(waited) == main.INITIAL_SYNC_TIMEOUT_S


def test_a_new_leaders_resync_runs_on_the_resync_thread_not_the_lease_thread(monkeypatch: Any) -> None:
    """The lease thread only asks for it: a resync of thousands of objects must not hold up the renewals
    that keep this replica the leader."""
    watcher = Watcher(
        Settings(resync_interval_s=3600), FakeKubeClient(), lambda *_: None, leader_election=False
    )
    ran: list[tuple[bool, str]] = []
    monkeypatch.setattr(
        watcher, "resync", lambda force=False: ran.append((force, threading.current_thread().name)) or 0
    )
    watcher._on_started_leading()  # as the lease thread calls it
    assert ran == []
    thread = threading.Thread(target=watcher._resync_loop, name="resync", daemon=True)
    thread.start()
    wait_for(lambda: ran == [(True, "resync")], timeout_s=10)
    watcher._on_resumed_leading()  # after a lapse: an ordinary resync, at once
    wait_for(lambda: ran == [(True, "resync"), (False, "resync")], timeout_s=10)
    watcher.stop_event.set()
    watcher._resync_requested.set()
    thread.join(timeout=10)
    assert not thread.is_alive() and ran == [(True, "resync"), (False, "resync")]


def test_a_relist_reads_in_pages_and_still_sees_every_object_and_every_deletion() -> None:
    kube = FakeKubeClient()
    for index in range(7):
        create(kube, "TaskRun", "taskruns", f"r{index}", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    events: list[tuple[str, str]] = []
    informer = Informer(
        kube,
        "TaskRun",
        "taskruns",
        None,
        lambda k, t, o, p, s: events.append((t, o["metadata"]["name"])),
        threading.Event(),
    )
    informer.kube.list_pages = lambda plural, namespace: FakeKubeClient.list_pages(kube, plural, namespace, 3)  # type: ignore[method-assign]
    informer.relist()
    assert sorted(name for _, name in events) == [f"r{i}" for i in range(7)]
    lists = [path for method, path in kube.requests if method == "GET" and path.endswith("/taskruns")]
    assert len(lists) == 3  # 3 + 3 + 1
    kube.request("DELETE", "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/taskruns/r5")
    events.clear()
    informer.relist()
    assert ("DELETED", "r5") in events and len(informer.cache) == 6


def test_queue_depth_is_absent_not_stale_while_redis_does_not_answer() -> None:
    from prometheus_client import REGISTRY

    class Redis:
        def __init__(self) -> None:
            self.down = False

        def llen(self, queue: str) -> int:
            if self.down:
                raise ConnectionError("Redis went away")
            return 5

    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    redis = Redis()
    watcher.update_gauges(redis)
    assert REGISTRY.get_sample_value("kubechain_queue_depth", {"queue": "llm"}) == 5
    redis.down = True
    watcher.update_gauges(redis)
    assert REGISTRY.get_sample_value("kubechain_queue_depth", {"queue": "llm"}) is None


def test_a_wall_clock_step_neither_extends_a_lost_leadership_nor_hastens_a_takeover() -> None:
    """Durations were timed on the wall clock: an NTP step back kept a cut-off holder acting for a minute
    after its standby had taken over."""
    kube = FakeKubeClient()
    wall = [datetime(2026, 12, 1, tzinfo=UTC)]
    ticks = [1000.0]
    holder = LeaderElector(
        kube,
        "default",
        "lease",
        "one",
        lease_duration_s=15,
        clock=lambda: wall[0],
        monotonic=lambda: ticks[0],
    )
    holder.step()
    assert holder.is_leader
    wall[0] -= timedelta(seconds=60)  # NTP steps the holder's clock back; it can no longer renew
    ticks[0] += 11
    assert not holder.is_leader, "stops acting at its renew deadline, whatever the wall clock says"

    standby_wall = [datetime(2026, 12, 1, tzinfo=UTC)]
    standby_ticks = [50.0]
    standby = LeaderElector(
        kube,
        "default",
        "lease",
        "two",
        lease_duration_s=15,
        clock=lambda: standby_wall[0],
        monotonic=lambda: standby_ticks[0],
    )
    holder.step()  # renews (wall clock behind; the Lease only records it)
    standby.step()
    standby_wall[0] += timedelta(minutes=10)  # the standby's clock jumps ahead; the holder still renews
    standby_ticks[0] += 2
    standby.step()
    assert not standby.is_leader, "a jump of the standby's clock is not the holder's silence"


def test_an_event_whose_handler_failed_is_handled_when_delivered_again() -> None:
    """The cache took the new version before the handler ran: when the handler raised, the watch resumed
    before the event, and its redelivery was dropped as a duplicate."""
    kube = FakeKubeClient()
    raw = create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    handled: list[str] = []
    failing = [True]

    def handler(kind: str, event_type: str, obj: dict[str, Any], previous: Any, synthesized: bool) -> None:
        if failing[0]:
            raise RuntimeError("Redis went away")
        handled.append(obj["metadata"]["resourceVersion"])

    informer = Informer(kube, "TaskRun", "taskruns", None, handler, threading.Event())
    with pytest.raises(RuntimeError):
        informer._apply("ADDED", dict(raw))
    failing[0] = False
    informer._apply("ADDED", dict(raw))
    assert handled == [raw["metadata"]["resourceVersion"]]


def test_an_event_whose_handler_always_fails_is_given_up_after_a_few_attempts() -> None:
    """Redelivered for ever, it would hold up every later event of its kind."""
    from watcher.informer import MAX_HANDLER_ATTEMPTS

    kube = FakeKubeClient()
    raw = create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})

    def handler(kind: str, event_type: str, obj: dict[str, Any], previous: Any, synthesized: bool) -> None:
        raise RuntimeError("a bug")

    informer = Informer(kube, "TaskRun", "taskruns", None, handler, threading.Event())
    for _ in range(MAX_HANDLER_ATTEMPTS - 1):
        with pytest.raises(RuntimeError):
            informer._apply("ADDED", dict(raw))
    informer._apply("ADDED", dict(raw))  # the last attempt: logged, and the watch goes on
    assert informer.snapshot(), "kept in the cache as seen"


def test_events_dropped_in_a_lapse_inside_one_slow_renewal_bring_a_resync() -> None:
    """Renewals at +2/+4/+6 s fail, the one at +8 s takes 2.5 s and succeeds: for 0.6 s the holder is
    not acting and drops events, yet the steps either side see it acting, so no resync was started."""
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    failing = [False]
    started: list[str] = []
    dropped_mid_call: list[bool] = []

    class FlakyKube(FakeKubeClient):
        def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
            if failing[0]:
                raise error_for(503, {"message": "etcd leader changed"})
            now[0] += timedelta(seconds=2.5)  # slow: the renew deadline passes while it is in flight
            dropped_mid_call.append(not elector.is_leader)
            watcher._on_event("TaskRun", "MODIFIED", run, None)  # an event arrives now: dropped
            return super().replace_lease(namespace, name, body)

    elector = LeaderElector(
        FlakyKube(),
        "default",
        "lease",
        "one",
        lease_duration_s=15,
        clock=lambda: now[0],
        on_started_leading=lambda: started.append("new leader"),
        on_resumed_leading=lambda: started.append("resumed"),
    )
    kube = elector.kube
    run = create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    sent: list[Any] = []
    watcher = Watcher(Settings(), kube, lambda *a: sent.append(a), leader_election=False)
    watcher.elector = elector
    elector.step()  # creates the Lease: leading
    assert elector.is_leader and started == ["new leader"]
    failing[0] = True
    for _ in range(3):
        now[0] += timedelta(seconds=2)
        elector.step()
    failing[0] = False
    now[0] += timedelta(seconds=2)
    elector.step()  # begins while still acting (+8 s), ends at +10.5 s, past the deadline
    assert dropped_mid_call == [True]
    assert elector.is_leader and started == ["new leader", "resumed"], started


def test_a_renewal_still_in_flight_when_the_leader_stops_does_not_take_the_released_lease_back() -> None:
    """stop() waits 5 s for the election thread; a step slower than that read the Lease after the release
    and took it again for a process on its way out."""
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    kube = FakeKubeClient()
    elector = LeaderElector(kube, "default", "lease", "one", lease_duration_s=15, clock=lambda: now[0])
    elector.step()
    assert elector.is_leader
    elector.stop()  # releases: no holder
    assert kube.get_lease("default", "lease")["spec"]["holderIdentity"] is None
    now[0] += timedelta(seconds=2)
    elector.step()  # the slow step of the election thread, reading the Lease only now
    assert kube.get_lease("default", "lease")["spec"]["holderIdentity"] is None


class SwitchableElector:
    """Stands in for the LeaderElector: leadership is set by the test; drops are counted. The Lease stays
    its own (not acting is a lapse)."""

    def __init__(self, leading: bool = True) -> None:
        self.is_leader = leading
        self.ignored = 0

    def note_ignored(self, forget: Any = None) -> bool:
        if forget is not None:
            forget()
        self.ignored += 1
        return True


def test_a_replica_that_lost_the_lease_drops_what_it_has_not_sent_yet() -> None:
    sent: list[str] = []
    watcher = Watcher(Settings(), FakeKubeClient(), lambda task, message, _: sent.append(message.name))
    elector = SwitchableElector(leading=True)
    watcher.elector = elector  # type: ignore[assignment]
    watcher._on_event("TaskRun", "ADDED", run("TaskRun", {"name": "queued-while-leading"}, "5"), None)
    elector.is_leader = False  # the Lease is lost before the sender got to it (Redis was slow)
    watcher._spawn(watcher._sender, "enqueue")
    try:
        wait_for(watcher._outbox.empty, timeout_s=10, what="the sender to take the work")
        wait_for(lambda: elector.ignored >= 1, timeout_s=10, what="the drop to be noted")
        assert sent == [], "the new leader's resync covers it; sending it too would duplicate its work"
        elector.is_leader = True
        watcher._on_event("TaskRun", "ADDED", run("TaskRun", {"name": "after"}, "6"), None)
        wait_for(lambda: sent == ["after"], timeout_s=10, what="a leader's work to be sent")
    finally:
        watcher.stop_event.set()


def test_a_resync_stops_when_the_lease_is_lost_half_way() -> None:
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None)
    elector = SwitchableElector(leading=True)
    watcher.elector = elector  # type: ignore[assignment]
    informer = next(i for i in watcher.informers if i.kind == "TaskRun")
    for index in range(10):
        name = f"r{index}"
        informer.cache[("default", name)] = run(
            "TaskRun", {"name": name, "status": {"phase": "Pending"}}, "1"
        )
    queued: list[Any] = []
    real_submit = watcher._submit

    def submit(*args: Any, **kwargs: Any) -> bool:
        queued.append(args[0])
        if len(queued) == 3:
            elector.is_leader = False
        return real_submit(*args, **kwargs)

    watcher._submit = submit  # type: ignore[method-assign]
    assert watcher.resync(force=True) == 3
    assert elector.ignored == 1


def test_an_enqueue_whose_tracing_fails_is_sent_without_a_trace(monkeypatch: Any) -> None:
    import watcher.main as watcher_main

    def broken(*_: Any) -> str:
        raise RuntimeError("a custom sampler failed")

    monkeypatch.setattr(watcher_main, "run_context", broken)
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    watcher._on_event("TaskRun", "ADDED", run("TaskRun", {"name": "r"}, "5"), None)
    work, rv, own_version = watcher._outbox.get_nowait()
    message = watcher.message_for(work, rv, own_version)
    assert (message.name, message.resource_version, message.traceparent) == ("r", "5", None)


def test_the_cache_is_searched_in_every_watched_namespace() -> None:
    watcher = Watcher(
        Settings(namespaces=["a", "b"]), FakeKubeClient(), lambda *_: None, leader_election=False
    )
    second = [i for i in watcher.informers if i.kind == "TaskRun" and i.namespace == "b"][0]
    obj = run("TaskRun", {"name": "r"}, "5")
    obj["metadata"]["namespace"] = "b"
    second.cache[("b", "r")] = obj
    assert watcher._cached("TaskRun", "b", "r") is obj
    assert watcher._cached("TaskRun", "a", "r") is None


def test_slow_renewals_resync_only_when_work_was_dropped_in_the_lapse() -> None:
    """Each renewal takes 9 s, so each step begins past the renew deadline: the replica is not acting at
    the start of the next step though it renewed every time. It used to force a full resync at every
    step; now only a lapse in which something was dropped (an event, a resync tick) brings one."""
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    started: list[datetime] = []
    resumed: list[datetime] = []

    class SlowKube(FakeKubeClient):
        def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
            now[0] += timedelta(seconds=9)
            return super().replace_lease(namespace, name, body)

    kube = SlowKube()
    elector = LeaderElector(
        kube,
        "default",
        "lease",
        "one",
        lease_duration_s=15,
        clock=lambda: now[0],
        on_started_leading=lambda: started.append(now[0]),
        on_resumed_leading=lambda: resumed.append(now[0]),
    )
    watcher = Watcher(Settings(), kube, lambda *_: None, leader_election=False)
    watcher.elector = elector
    elector.step()  # creates the Lease: a new leader
    assert started == [now[0]]
    for _ in range(3):
        now[0] += timedelta(seconds=2)
        elector.step()  # renews, answered 9 s later
        now[0] += timedelta(seconds=1)
        assert not elector.is_leader
    assert len(started) == 1 and not resumed, "renewed each time and nothing was dropped: no resync"
    assert watcher.resync() == 0, "a resync tick while not acting is skipped..."
    now[0] += timedelta(seconds=1)
    elector.step()
    assert len(started) == 1 and len(resumed) == 1, "...and the renewal after it resyncs"


class TimedWaitEvent(threading.Event):
    """A stop event that records each back-off wait instead of sleeping (and stops after a few)."""

    def __init__(self, stop_after: int) -> None:
        super().__init__()
        self.waits: list[float | None] = []
        self.stop_after = stop_after

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if len(self.waits) >= self.stop_after:
            self.set()
        return self.is_set()


@pytest.mark.parametrize("stream", [[], Gone(410, "Expired", "too old")], ids=["ends-at-once", "gone"])
def test_a_watch_that_ends_at_once_or_expires_before_its_first_event_backs_off(stream: Any) -> None:
    """A proxy that answers a watch and closes at once, and a 410 right after every relist (a list slower
    than the API server's history), each made the informer reopen back to back, as fast as it could."""
    kube = ScriptedWatchKube([stream] * 10)
    stop = TimedWaitEvent(stop_after=4)
    informer = Informer(kube, "TaskRun", "taskruns", None, lambda *_: None, stop)
    scripted = kube.watch_raw

    def at_most_eight(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        if len(kube.watch_calls) >= 7:
            stop.set()  # spinning: end the test (it fails below) rather than hang
        yield from scripted(*args, **kwargs)

    kube.watch_raw = at_most_eight  # type: ignore[method-assign]
    informer.run()
    assert stop.waits == [0.2, 0.4, 0.8, 1.6], "a doubling back-off"
    assert len(kube.watch_calls) == 4


def test_a_list_too_slow_to_watch_from_is_followed_by_one_from_the_watch_cache() -> None:
    """A list that takes longer than the API server keeps history expires its watch before the first
    event; listing the same way again only repeats that (for ever, with many objects). client-go's
    reflector lists from the watch cache (resourceVersion=0): so does the relist after such a 410."""
    kube = ScriptedWatchKube(
        [
            Gone(410, "Expired", "too old"),
            [{"type": "MODIFIED", "object": run("TaskRun", {"name": "a"}, "901")}],
            Gone(410, "Expired", "too old"),  # a resumed watch: its version aged, the list was not slow
            [],
        ]
    )
    create(kube, "TaskRun", "taskruns", "a", {"agentRef": {"name": "x"}, "userMessage": "m"})
    stop = TimedWaitEvent(stop_after=10)
    ScriptedWatchKube.stop = stop
    informer = Informer(kube, "TaskRun", "taskruns", None, lambda *_: None, stop)
    informer.run()
    lists = [
        params
        for (method, path), params in zip(kube.requests, kube.request_params, strict=True)
        if method == "GET" and path.endswith("/taskruns")
    ]
    assert lists == [{"limit": "50"}, {"resourceVersion": "0"}, {"limit": "50"}]
    assert informer.relists == 3


def test_a_watch_that_expired_after_events_relists_at_once() -> None:
    busy = ScriptedWatchKube([[{"type": "MODIFIED", "object": run("TaskRun", {"name": "a"}, "901")}]])
    stop = TimedWaitEvent(stop_after=10)
    informer = Informer(busy, "TaskRun", "taskruns", None, lambda *_: None, stop)
    real_watch = busy.watch_raw

    def watch_then_expire(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        yield from real_watch(*args, **kwargs)
        raise Gone(410, "Expired", "too old")

    busy.watch_raw = watch_then_expire  # type: ignore[method-assign]
    list_once = informer.relist
    waits_before_relists: list[int] = []

    def relist() -> None:
        waits_before_relists.append(len(stop.waits))
        if len(waits_before_relists) == 2:
            stop.set()
        list_once()

    informer.relist = relist  # type: ignore[method-assign]
    informer.run()
    assert waits_before_relists == [0, 0], "a watch that expired after events relists at once"


def test_a_tool_renamed_on_an_mcp_server_revalidates_the_agents_that_use_it() -> None:
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    informers["Agent"].cache[("default", "a")] = ready("Agent", "a", {"mcpServers": [{"name": "m"}]})
    before = ready("MCPServer", "m", connected=True, tools=[{"name": "fetch"}])
    after = ready("MCPServer", "m", connected=True, tools=[{"name": "fetch_url"}])
    after["metadata"]["resourceVersion"] = "2"
    watcher._on_event("MCPServer", "MODIFIED", after, before)
    queued = []
    while not watcher._outbox.empty():
        queued.append(watcher._outbox.get_nowait()[0])
    assert ("Agent", "a") in [(w.kind, w.name) for w in queued], "same number of tools, other names"
    watcher._on_event(
        "MCPServer", "MODIFIED", {**after, "metadata": {**after["metadata"], "resourceVersion": "3"}}, after
    )
    assert watcher._outbox.empty(), "an unchanged tool list prompts nothing"


def test_an_object_in_error_for_a_missing_secret_is_checked_again_within_30s(monkeypatch: Any) -> None:
    """Secrets are not watched (the watcher may not list them): an LLM in Error for a Secret created
    later noticed it at its next re-check only, backed off to 300 s. Reading a Secret costs nothing, so
    such an object is checked again every resync, at most 30 s apart; any other Error still backs off."""
    import watcher.main as main

    clock = [1000.0]
    monkeypatch.setattr(main.time, "monotonic", lambda: clock[0])
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    (informer,) = [informer for informer in watcher.informers if informer.kind == "LLM"]
    details = {
        "waits": 'failed to get secret: secrets "openai" not found',
        "refused": "OpenAI API key validation failed: invalid API key (status code: 401)",
    }
    unusable = {"waits": {"unusableSecret": "openai"}, "refused": {}}  # as validate_llm writes them
    for name, detail in details.items():
        llm = ready(
            "LLM",
            name,
            {"provider": "openai"},
            ready=False,
            status="Error",
            statusDetail=detail,
            **unusable[name],
        )
        informer._store(("default", name), llm)
    sent_at: dict[str, list[float]] = {name: [] for name in details}
    for _ in range(20):  # ten minutes of resync ticks
        watcher.resync()
        while not watcher._outbox.empty():
            sent_at[watcher._outbox.get_nowait()[0].name].append(clock[0])
        clock[0] += 30.0

    def longest_gap(times: list[float]) -> float:
        return max(later - earlier for earlier, later in zip(times, times[1:], strict=False))

    assert longest_gap(sent_at["waits"]) <= 30.0, sent_at["waits"]
    assert longest_gap(sent_at["refused"]) > 120.0, sent_at["refused"]


def test_a_tool_whose_spec_name_is_changed_revalidates_the_agents_that_grant_it() -> None:
    """The name an Agent offers its LLM for a Tool is its spec.name: a rename can make two of an Agent's
    functions one name (or one that names an MCP server's tool), which only the Agent's validation sees.
    The Tool's readiness stayed the same, so its Agents were not re-validated and stayed Ready."""
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    informers["Agent"].cache[("default", "a")] = ready("Agent", "a", {"tools": [{"name": "t"}]})
    before = ready("Tool", "t", {"name": "add", "execute": {"builtin": {"name": "add"}}})
    after = copy.deepcopy(before)
    after["spec"]["name"] = "plus"
    after["metadata"]["resourceVersion"] = "2"
    watcher._on_event("Tool", "MODIFIED", after, before)
    queued = []
    while not watcher._outbox.empty():
        queued.append(watcher._outbox.get_nowait()[0])
    assert ("Agent", "a") in [(w.kind, w.name) for w in queued], "the Tool's function name changed"


def test_scaling_answers_each_queues_backlog_plus_the_steps_in_hand() -> None:
    """KEDA's Redis scaler sees only messages no worker has taken: with every thread busy and none waiting
    it read 0 and removed busy workers. /scaling adds the steps in hand, as the resources show them."""
    import fakeredis
    import httpx

    from kubechain.testing.controlplane import free_port
    from watcher.scaling import serve_scaling

    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    for name, phase in [
        ("a", "SendContextWindowToLLM"),
        ("b", "SendContextWindowToLLM"),
        ("c", "ReadyForLLM"),
    ]:
        informers["TaskRun"].cache[("default", name)] = run(
            "TaskRun", {"name": name, "status": {"phase": phase}}, "1"
        )
    for name, phase in [("t1", "Running"), ("t2", "Succeeded")]:
        informers["TaskRunToolCall"].cache[("default", name)] = run(
            "TaskRunToolCall", {"name": name, "status": {"phase": phase}}, "1"
        )
    redis = fakeredis.FakeRedis()
    redis.rpush("llm", "m1", "m2", "m3")
    redis.rpush("control", "m4")
    port = free_port()
    server = serve_scaling(port, watcher.scaling)
    assert server is not None
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/scaling").status_code == 503, "backlog unknown yet"
        watcher.update_gauges(redis)
        answer = httpx.get(f"http://127.0.0.1:{port}/scaling")
        assert answer.status_code == 200
        assert answer.json() == {
            "control": {"backlog": 1, "inHand": 0, "demand": 1},
            "checks": {"backlog": 0, "inHand": 0, "demand": 0},
            "llm": {"backlog": 3, "inHand": 2, "demand": 5},
            "tools": {"backlog": 0, "inHand": 1, "demand": 1},
        }
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 404

        class Down:
            def llen(self, _name: str) -> int:
                raise ConnectionError("Redis does not answer")

        watcher.update_gauges(Down())
        assert httpx.get(f"http://127.0.0.1:{port}/scaling").status_code == 503, "not a backlog of 0"
    finally:
        server.shutdown()
        server.server_close()


def toolcall_event(
    name: str, request: str, phase: str, rv: str, namespace: str = "default"
) -> dict[str, Any]:
    return {
        "kind": "TaskRunToolCall",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": rv,
            "labels": {"kubechain.humanlayer.dev/toolcallrequest": request},
        },
        "spec": {"taskRunRef": {"name": "r"}},
        "status": {"phase": phase},
    }


def test_the_tool_call_informer_indexes_a_turns_calls_through_changes_deletions_and_failed_handlers() -> None:
    """Finding a turn's tool calls scanned every tool call ever cached, on every tool-call event: 42 ms an
    event with 50,000 cached, and a relist of 40,000 took the leader 521 s."""
    failing = {"on": False}

    def handler(*_: Any) -> None:
        if failing["on"]:
            raise RuntimeError("handler failed")

    label = "kubechain.humanlayer.dev/toolcallrequest"
    informer = Informer(
        FakeKubeClient(),
        "TaskRunToolCall",
        "taskruntoolcalls",
        None,
        handler,
        threading.Event(),
        index_labels=(label,),
    )
    informer._apply("ADDED", toolcall_event("a1", "aaa", "Pending", "1"))
    informer._apply("ADDED", toolcall_event("a2", "aaa", "Pending", "2"))
    informer._apply("ADDED", toolcall_event("b1", "bbb", "Pending", "3"))
    informer._apply("ADDED", toolcall_event("x1", "aaa", "Pending", "4", namespace="other"))

    def names(namespace: str, request: str) -> list[str]:
        return sorted(obj["metadata"]["name"] for obj in informer.indexed(label, namespace, request))

    assert names("default", "aaa") == ["a1", "a2"] and names("other", "aaa") == ["x1"]
    informer._apply("MODIFIED", toolcall_event("a2", "bbb", "Pending", "5"))  # relabelled
    assert names("default", "aaa") == ["a1"] and names("default", "bbb") == ["a2", "b1"]
    informer._apply("DELETED", toolcall_event("a1", "aaa", "Pending", "6"))
    assert names("default", "aaa") == [] and (label, "default", "aaa") not in informer._index
    failing["on"] = True
    with pytest.raises(RuntimeError):
        informer._apply("MODIFIED", toolcall_event("b1", "ccc", "Pending", "7"))
    assert names("default", "bbb") == ["a2", "b1"] and names("default", "ccc") == [], "rolled back"


def test_a_run_that_ends_prompts_its_tool_calls_that_still_wait_once() -> None:
    """A run that ended (a sibling's create refused, say) while a call of it waited for its sub-agent's run
    left the call to its own resync, backed off to 300 s while nothing changed: the sub-agent's run went on
    paying for LLM calls that no one would read."""
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    going = run("TaskRun", {"name": "r", "status": {"phase": "ToolCallsPending"}}, "3")
    informers["TaskRun"]._apply("ADDED", going)
    for index, phase in (
        (1, "AwaitingSubAgent"),
        (2, "Succeeded"),
        (3, "AwaitingHumanInput"),
        (4, "Running"),
    ):
        call = toolcall_event(f"r-abc-tc-0{index}", "abc", phase, str(3 + index))
        call["metadata"]["labels"]["kubechain.humanlayer.dev/taskruntoolcall"] = "r"
        call["metadata"]["ownerReferences"] = [{"kind": "TaskRun", "name": "r", "uid": "u"}]
        informers["TaskRunToolCall"]._apply("ADDED", call)
    # labelled as r's, but not made by it: not prompted
    forged = toolcall_event("x-abc-tc-01", "abc", "AwaitingSubAgent", "9")
    forged["metadata"]["labels"]["kubechain.humanlayer.dev/taskruntoolcall"] = "r"
    informers["TaskRunToolCall"]._apply("ADDED", forged)
    while not watcher._outbox.empty():
        watcher._outbox.get_nowait()

    def prompted() -> list[tuple[TaskName, str, str, str]]:
        works = []
        while not watcher._outbox.empty():
            work, _, _ = watcher._outbox.get_nowait()
            works.append((work.task, work.kind, work.name, work.reason))
        return sorted(works)

    failed = run("TaskRun", {"name": "r", "status": {"phase": "Failed"}}, "10")
    informers["TaskRun"]._apply("MODIFIED", failed)
    assert prompted() == [
        (TaskName.TOOL_CALL, "TaskRunToolCall", "r-abc-tc-01", "run-ended"),
        (TaskName.TOOL_CALL, "TaskRunToolCall", "r-abc-tc-03", "run-ended"),
    ]
    # its end seen again (a relist), or another change of the ended run: already prompted
    informers["TaskRun"]._apply(
        "MODIFIED", {**failed, "metadata": {**failed["metadata"], "resourceVersion": "11"}}
    )
    assert prompted() == []


def test_only_the_last_of_a_turns_tool_calls_to_finish_prompts_the_run() -> None:
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    (informer,) = [informer for informer in watcher.informers if informer.kind == "TaskRunToolCall"]
    for name in ("a1", "a2"):
        informer._apply("ADDED", toolcall_event(name, "aaa", "Pending", "1" + name[-1]))
    informer._apply("ADDED", toolcall_event("b1", "bbb", "Pending", "20"))  # another turn's, still running
    while not watcher._outbox.empty():
        watcher._outbox.get_nowait()

    def run_prompted() -> bool:
        works = []
        while not watcher._outbox.empty():
            works.append(watcher._outbox.get_nowait()[0])
        return any(work.kind == "TaskRun" for work in works)

    informer._apply("MODIFIED", toolcall_event("a1", "aaa", "Succeeded", "30"))
    assert not run_prompted(), "a2 is still running"
    informer._apply("MODIFIED", toolcall_event("a2", "aaa", "Failed", "31"))
    assert run_prompted(), "the last of its turn"


def test_one_object_routing_cannot_handle_does_not_stop_the_resync_of_the_others(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object routing raised on (a claim stamped without a time zone did, before such times were taken
    as UTC) made the resync raise: every tick ended there, nothing after it in the cache was looked at,
    and what it remembered was never forgotten."""
    import time as real_time

    def routing_raising_on_bad(kind: str, obj: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if obj["metadata"]["name"] == "bad":
            raise TypeError("can't compare offset-naive and offset-aware datetimes")
        return work_for(kind, obj, *args, **kwargs)

    monkeypatch.setattr("watcher.main.work_for", routing_raising_on_bad)
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informer = next(i for i in watcher.informers if i.kind == "TaskRun")
    claimed = {"phase": "SendContextWindowToLLM", "claimedAt": "2026-12-01T12:00:00"}
    informer.cache[("default", "bad")] = run("TaskRun", {"name": "bad", "status": claimed}, "1")
    informer.cache[("default", "good")] = run(
        "TaskRun", {"name": "good", "status": {"phase": "Pending"}}, "2"
    )
    long_ago = ("prepare", "TaskRun", "default", "finished-long-ago")
    watcher._recent[long_ago] = ("1", real_time.monotonic() - 3600, 0)
    with caplog.at_level("ERROR", logger="watcher.main"):
        assert watcher.resync() == 1
    assert watcher._outbox.get_nowait()[0].name == "good"
    assert long_ago not in watcher._recent
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "default/bad" in record.getMessage() and record.exc_info is not None


def test_handler_failures_are_forgotten_once_their_object_moves_on_or_goes() -> None:
    """Counted per (object, version), a version that failed fewer times than the limit and was then
    replaced (a newer version, a deletion) stayed counted for good."""
    kube = FakeKubeClient()
    failing = [True]

    def handler(kind: str, event_type: str, obj: dict[str, Any], previous: Any, synthesized: bool) -> None:
        if failing[0]:
            raise RuntimeError("Redis went away")

    informer = Informer(kube, "TaskRun", "taskruns", None, handler, threading.Event())
    for name in ("replaced", "deleted", "relisted-away"):
        with pytest.raises(RuntimeError):
            informer._apply("ADDED", run("TaskRun", {"name": name}, "5"))
    failing[0] = False
    informer._apply("MODIFIED", run("TaskRun", {"name": "replaced"}, "6"))
    informer._apply("DELETED", run("TaskRun", {"name": "deleted"}, "7"))
    assert [key for key in informer._failures] == [("default", "relisted-away")]
    informer.relist()  # the API server has none of them
    assert informer._failures == {}


def listing_a_finished_and_a_pending_run(monkeypatch: Any) -> tuple[FakeKubeClient, dict[str, Any]]:
    """An API server whose lists hold a finished run (of a Task, started by a delegating call: an event
    for it would prompt both) and a pending one (which a resync prepares)."""
    finished = run("TaskRun", {"name": "done", "status": {"phase": "FinalAnswer"}}, "3")
    finished["spec"] = {"taskRef": {"name": "t"}}
    finished["metadata"]["ownerReferences"] = [{"kind": "TaskRunToolCall", "name": "delegating", "uid": "c"}]
    pending = run("TaskRun", {"name": "pending", "status": {"phase": "Pending"}}, "4")
    kube = FakeKubeClient()
    listed = {"taskruns": [finished, pending]}
    monkeypatch.setattr(
        kube, "list_pages", lambda plural, *_, **__: iter([(copy.deepcopy(listed.get(plural, [])), "9")])
    )
    return kube, pending


def test_without_leader_election_the_first_lists_are_not_routed_as_events(monkeypatch: Any) -> None:
    """With no Lease the watcher acted at once: each object of the first lists went through the event
    path, so every restart prompted every finished run's Task and delegating tool call again. Like a
    leader, it now acts once the first lists are in, by its start-up resync."""
    kube, pending = listing_a_finished_and_a_pending_run(monkeypatch)
    watcher = Watcher(Settings(), kube, lambda *_: None, leader_election=False)

    def spawn(target: Any, name: str) -> None:
        informer = getattr(target, "__self__", None)
        if isinstance(informer, Informer):
            informer.relist()  # its first list, here rather than on its thread

    monkeypatch.setattr(watcher, "_spawn", spawn)
    watcher.start()
    queued = []
    while not watcher._outbox.empty():
        queued.append(watcher._outbox.get_nowait()[0])
    assert [(w.task, w.kind, w.name, w.reason) for w in queued] == [
        (TaskName.PREPARE, "TaskRun", "pending", "resync")
    ]
    watcher._on_event(
        "TaskRun",
        "MODIFIED",
        {**pending, "metadata": {**pending["metadata"], "resourceVersion": "10"}},
        pending,
    )
    assert watcher._outbox.get_nowait()[0].reason == "event", "events after the start are routed"


def test_a_lapse_of_its_own_lease_resumes_and_only_a_new_leader_starts_over() -> None:
    """Renewing its own Lease after a lapse, a replica ran a new leader's resync, which re-sent
    everything unfinished: no other replica led in the lapse, so it resumes. Leading for the first time,
    or taking the Lease from another holder, still starts over."""
    kube = FlakyLeaseKube()
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    calls: list[tuple[str, str]] = []

    def elector(identity: str) -> LeaderElector:
        return LeaderElector(
            kube,
            "default",
            "lease",
            identity,
            lease_duration_s=15,
            clock=lambda: now[0],
            on_started_leading=lambda: calls.append((identity, "new leader")),
            on_resumed_leading=lambda: calls.append((identity, "resumed")),
        )

    def every_2s_for(seconds: int, *electors: LeaderElector) -> None:
        for _ in range(seconds // 2):
            now[0] += timedelta(seconds=2)
            for each in electors:
                each.step()

    one, two = elector("one"), elector("two")
    one.step()
    kube.failure = error_for(503, {"message": "etcd leader changed"})
    every_2s_for(12, one)
    assert not one.is_leader
    kube.failure = None
    every_2s_for(2, one)
    assert one.is_leader and calls == [("one", "new leader"), ("one", "resumed")]

    calls.clear()
    two.step()  # a standby: sees one's Lease
    every_2s_for(18, two)  # one stopped renewing: two takes over once the Lease expired
    assert two.is_leader and calls == [("two", "new leader")]
    every_2s_for(18, one)  # two died: one takes the Lease back from another holder
    assert one.is_leader and calls == [("two", "new leader"), ("one", "new leader")]

    calls.clear()
    restarted = elector("one")  # the same identity after a restart: it knows nothing it sent
    restarted.step()
    assert restarted.is_leader and calls == [("one", "new leader")]


def test_after_a_lapse_only_what_was_dropped_in_it_is_sent_again() -> None:
    """The resync after a lapse was a new leader's: it forgot what it had sent of everything unfinished
    and re-sent it all, at every lapse, to an API server that was already slow. Now it sends what the
    lapse dropped (an event's work, a dependent's), and the rest keeps its staleness window."""
    kube = FlakyLeaseKube()
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    watcher = Watcher(Settings(), kube, lambda *_: None)
    elector = watcher.elector
    assert elector is not None
    elector._clock, elector._monotonic = (lambda: now[0]), (lambda: now[0].timestamp())
    informers = {informer.kind: informer for informer in watcher.informers}
    for name in [f"r{index}" for index in range(8)]:
        informers["TaskRun"].cache[("default", name)] = run(
            "TaskRun", {"name": name, "status": {"phase": "Pending"}}, "1"
        )
    waiting = run("TaskRun", {"name": "waiting", "status": {"phase": "Pending"}}, "1")
    waiting["spec"] = {"agentRef": {"name": "a"}}
    informers["TaskRun"].cache[("default", "waiting")] = waiting
    agent = ready("Agent", "a", {"llmRef": {"name": "l"}})
    informers["Agent"].cache[("default", "a")] = {**agent, "status": {"status": "Pending"}}
    agent["metadata"]["resourceVersion"] = "2"  # it becomes Ready in the lapse

    def sent_by_the_requested_resync() -> list[str]:
        watcher.resync(force=watcher._take_resync_request())
        queued = []
        while not watcher._outbox.empty():
            queued.append(watcher._outbox.get_nowait()[0].name)
        return sorted(queued)

    elector.step()  # a new leader
    assert len(sent_by_the_requested_resync()) == 10, "every run, and the Agent to validate"
    kube.failure = error_for(503, {"message": "etcd leader changed"})
    for _ in range(6):
        now[0] += timedelta(seconds=2)
        elector.step()
    assert not watcher.is_leader
    changed = run("TaskRun", {"name": "r1", "status": {"phase": "Pending"}}, "2")
    informers["TaskRun"].cache[("default", "r1")] = changed
    watcher._on_event("TaskRun", "MODIFIED", changed, None)  # dropped
    informers["Agent"].cache[("default", "a")] = agent
    watcher._on_event("Agent", "MODIFIED", agent, {**agent, "status": {"status": "Pending"}})  # dropped
    assert watcher._outbox.empty()
    kube.failure = None
    now[0] += timedelta(seconds=2)
    elector.step()
    assert watcher.is_leader
    assert sent_by_the_requested_resync() == ["r1", "waiting"]


def test_what_the_sender_drops_in_a_lapse_is_sent_by_the_resync_when_it_resumes() -> None:
    """Queued while leading and dropped unsent in a lapse, it counted as sent: the resync after the lapse
    held it back for the staleness window."""
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None)
    elector = SwitchableElector(leading=True)
    watcher.elector = elector  # type: ignore[assignment]
    pending = run("TaskRun", {"name": "r", "status": {"phase": "Pending"}}, "5")
    next(i for i in watcher.informers if i.kind == "TaskRun").cache[("default", "r")] = pending
    watcher._on_event("TaskRun", "ADDED", pending, None)
    elector.is_leader = False  # a lapse: the Lease is still its own
    watcher._spawn(watcher._sender, "enqueue")
    try:
        wait_for(lambda: not watcher._recent, timeout_s=10, what="the drop to be forgotten as sent")
    finally:
        watcher.stop_event.set()
    assert watcher._outbox.empty() and elector.ignored >= 1
    elector.is_leader = True
    assert watcher.resync() == 1


@pytest.mark.parametrize("quiet_watch", ["held-open", "bookmark"])
def test_a_watch_open_after_an_outage_starts_the_back_off_over(quiet_watch: str) -> None:
    """Only an event or a relist reset the back-off: after an outage, a quiet kind's watches (no event
    for minutes) kept it, and its next hiccup waited 6.4 s, the one after 12.8 s, with a stale cache."""
    clock = [1000.0]
    outage = [Unavailable(0, "Unavailable", "connection refused") for _ in range(5)]
    hiccup = Unavailable(0, "Unavailable", "connection reset")
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "940"}}}
    event = {"type": "MODIFIED", "object": run("TaskRun", {"name": "a"}, "950")}
    kube = ScriptedWatchKube([*outage, [bookmark] if quiet_watch == "bookmark" else [], hiccup, [event]])
    ScriptedWatchKube.stop = stop = TimedWaitEvent(stop_after=10)
    scripted = kube.watch_raw

    def watch(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        held_open = len(kube.watch_calls) == len(outage) and quiet_watch == "held-open"
        yield from scripted(*args, **kwargs)
        if held_open:
            clock[0] += 290  # the API server held it open until its timeout, without an event

    kube.watch_raw = watch  # type: ignore[method-assign]
    informer = Informer(kube, "TaskRun", "taskruns", None, lambda *_: None, stop, monotonic=lambda: clock[0])
    informer.run()
    assert stop.waits == [0.2, 0.4, 0.8, 1.6, 3.2, 0.2], "the hiccup after it waits 0.2 s again"


def test_a_new_leaders_forced_resync_is_kept_when_it_stops_acting_before_or_during_it() -> None:
    """The resync thread took the new leader's request (clearing its force), then found the replica not
    acting (a slow renewal) or stopped half way: the force was gone, and the resync when it resumed was an
    ordinary one, holding back what it sent when it last led (remembered 600 s) for up to 300 s."""
    watcher = Watcher(Settings(resync_interval_s=3600), FakeKubeClient(), lambda *_: None)
    elector = SwitchableElector(leading=False)
    watcher.elector = elector  # type: ignore[assignment]
    informer = next(i for i in watcher.informers if i.kind == "TaskRun")
    for index in range(10):
        name = f"r{index}"
        informer.cache[("default", name)] = run(
            "TaskRun", {"name": name, "status": {"phase": "Pending"}}, "1"
        )
    watcher._on_started_leading()
    assert watcher.resync(force=watcher._take_resync_request()) == 0, "not acting (yet): skipped"
    elector.is_leader = True
    assert watcher._take_resync_request(), "the next resync is still a new leader's"

    queued: list[Any] = []
    real_submit = watcher._submit

    def submit(*args: Any, **kwargs: Any) -> bool:
        queued.append(args[0])
        if len(queued) == 3:
            elector.is_leader = False
        return real_submit(*args, **kwargs)

    watcher._submit = submit  # type: ignore[method-assign]
    assert watcher.resync(force=True) == 3, "stops acting half way"
    elector.is_leader = True
    assert watcher._take_resync_request(), "the rest is still a new leader's to send"
    assert not watcher._take_resync_request(), "taken once"


def test_taking_the_lease_over_counts_as_new_even_when_the_answer_to_the_takeover_is_lost() -> None:
    """one took another holder's expired Lease; the API server applied the write but its answer timed out.
    The next step read one as holder and took that for its own Lease renewed after a lapse: it resumed
    (an ordinary resync) though two had led in between."""
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    lose_answer = [False]
    calls: list[tuple[str, str]] = []

    class LostAnswerKube(FakeKubeClient):
        def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
            result = super().replace_lease(namespace, name, body)
            if lose_answer[0]:
                lose_answer[0] = False
                raise Unavailable(0, "Unavailable", "read timed out")
            return result

    kube = LostAnswerKube()

    def elector(identity: str) -> LeaderElector:
        return LeaderElector(
            kube,
            "default",
            "lease",
            identity,
            lease_duration_s=15,
            clock=lambda: now[0],
            on_started_leading=lambda: calls.append((identity, "new leader")),
            on_stopped_leading=lambda: calls.append((identity, "stopped")),
            on_resumed_leading=lambda: calls.append((identity, "resumed")),
        )

    one, two = elector("one"), elector("two")
    one.step()
    two.step()  # a standby: sees one's Lease
    for _ in range(9):  # one stops renewing (partitioned): two takes over once the Lease expired
        now[0] += timedelta(seconds=2)
        two.step()
    assert two.is_leader and not one.is_leader
    one.step()  # one sees two's Lease
    assert calls == [("one", "new leader"), ("two", "new leader"), ("one", "stopped")], calls
    lose_answer[0] = True
    for _ in range(9):  # two stops renewing; one takes the Lease over, and the answer is lost
        now[0] += timedelta(seconds=2)
        one.step()
        if not lose_answer[0]:
            break
    assert kube.get_lease("default", "lease")["spec"]["holderIdentity"] == "one"
    assert not one.is_leader and calls[-1] == ("one", "stopped"), "the takeover's answer was lost"
    now[0] += timedelta(seconds=2)
    one.step()  # reads itself as holder
    assert one.is_leader
    assert calls[-1] == ("one", "new leader"), calls


def test_work_dropped_while_the_lease_thread_notes_the_lapse_is_not_lost() -> None:
    """The lease thread read "nothing dropped" and cleared the flag; an event thread that set it in
    between lost its note, and what it dropped waited for the next periodic resync."""
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    calls: list[str] = []
    elector = LeaderElector(
        FakeKubeClient(),
        "default",
        "lease",
        "one",
        lease_duration_s=15,
        clock=lambda: now[0],
        on_started_leading=lambda: calls.append("new leader"),
        on_resumed_leading=lambda: calls.append("resumed"),
    )
    elector.step()

    class NotedWhileRead(threading.Event):
        """The event thread notes its drop just after the lease thread read the flag."""

        armed = True

        def is_set(self) -> bool:
            seen = super().is_set()
            if self.armed:
                self.armed = False
                assert elector.note_ignored()
            return seen

    elector._ignored_in_lapse = NotedWhileRead()
    now[0] += timedelta(seconds=2)
    elector.step()
    now[0] += timedelta(seconds=2)
    elector.step()
    assert calls == ["new leader", "resumed"], "the drop noted during the renewal brings a resync"


def test_work_dropped_in_a_lapse_is_forgotten_as_sent_before_the_lapse_is_noted() -> None:
    """The lapse was noted before the dropped work was forgotten: a renewal and the resync it brought
    could run in between, holding it back as sent; then it was forgotten, and waited for the next
    periodic resync."""
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None)
    elector = watcher.elector
    assert elector is not None
    elector._clock, elector._monotonic = (lambda: now[0]), (lambda: now[0].timestamp())
    pending = run("TaskRun", {"name": "r", "status": {"phase": "Pending"}}, "1")
    next(i for i in watcher.informers if i.kind == "TaskRun").cache[("default", "r")] = pending

    def sent_by_the_requested_resync() -> list[str]:
        if watcher._resync_requested.is_set():
            watcher.resync(force=watcher._take_resync_request())
        queued = []
        while not watcher._outbox.empty():
            queued.append(watcher._outbox.get_nowait()[0].name)
        return queued

    elector.step()  # a new leader
    assert sent_by_the_requested_resync() == ["r"]
    now[0] += timedelta(seconds=10)  # a renewal slower than the renew deadline: not acting
    assert not watcher.is_leader
    resynced_meanwhile: list[list[str]] = []

    def dropping() -> list[Any]:
        elector.step()  # the slow renewal is answered, and the lease thread goes on meanwhile...
        resynced_meanwhile.append(sent_by_the_requested_resync())  # ...and the resync thread
        return watcher._event_work("TaskRun", "MODIFIED", pending, None)

    assert not watcher._may_send(dropping=dropping)
    assert resynced_meanwhile == [[]]
    now[0] += timedelta(seconds=2)
    elector.step()
    assert sent_by_the_requested_resync() == ["r"], "the next renewal's resync sends what was dropped"


@pytest.mark.parametrize(
    "reset", [Unavailable(0, "Unavailable", "connection reset"), ValueError("bad chunk")]
)
def test_a_watch_held_open_that_ends_in_an_error_starts_the_back_off_over(reset: Exception) -> None:
    """A load balancer that resets idle connections ends a quiet kind's watch with an error before its
    first bookmark: the watch was open a long while, yet the back-off kept what it grew in an outage."""
    clock = [1000.0]
    outage = [Unavailable(0, "Unavailable", "connection refused") for _ in range(5)]
    hiccup = Unavailable(0, "Unavailable", "connection refused")
    event = {"type": "MODIFIED", "object": run("TaskRun", {"name": "a"}, "950")}
    kube = ScriptedWatchKube([*outage, [], hiccup, [event]])
    ScriptedWatchKube.stop = stop = TimedWaitEvent(stop_after=10)
    scripted = kube.watch_raw

    def watch(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        reset_by_the_load_balancer = len(kube.watch_calls) == len(outage)
        yield from scripted(*args, **kwargs)
        if reset_by_the_load_balancer:
            clock[0] += 290  # open, without an event or a bookmark, until the connection was reset
            raise reset

    kube.watch_raw = watch  # type: ignore[method-assign]
    informer = Informer(kube, "TaskRun", "taskruns", None, lambda *_: None, stop, monotonic=lambda: clock[0])
    informer.run()
    assert stop.waits == [0.2, 0.4, 0.8, 1.6, 3.2, 0.2, 0.4], "after the long watch, it starts over"


def test_only_the_leading_watcher_counts_watch_events() -> None:
    """Two watchers run (one leads, one stands by), both watching: counted by both, the dashboard's sum
    showed every event twice. The events counted are those the leader acts on."""
    from prometheus_client import REGISTRY

    def counted() -> float:
        sample = ("kubechain_watch_events_total", {"kind": "TaskRun", "type": "ADDED"})
        return REGISTRY.get_sample_value(*sample) or 0.0

    obj = {
        "kind": "TaskRun",
        "metadata": {"name": "r", "namespace": "default", "uid": "u", "resourceVersion": "1"},
        "spec": {},
        "status": {},
    }
    standby = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=True)
    assert not standby.is_leader
    before = counted()
    standby._on_event("TaskRun", "ADDED", obj, None)
    assert counted() == before
    leader = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    leader._on_event("TaskRun", "ADDED", obj, None)
    assert counted() == before + 1


def test_a_first_list_in_after_the_start_up_deadline_is_not_routed_as_events(monkeypatch: Any) -> None:
    """The first lists' objects were held back only until start()'s one deadline (30 s): a list slower
    than that (a namespace of many runs, a busy API server) routed the rest as events, and every finished
    run in it validated its Task again at each restart. No first list is routed; once a late one is in,
    an ordinary resync decides what its objects need."""
    import watcher.main as main

    kube, pending = listing_a_finished_and_a_pending_run(monkeypatch)
    monkeypatch.setattr(main, "INITIAL_SYNC_TIMEOUT_S", 0.0)
    watcher = Watcher(Settings(), kube, lambda *_: None, leader_election=False)
    late: list[Informer] = []

    def spawn(target: Any, name: str) -> None:
        informer = getattr(target, "__self__", None)
        if isinstance(informer, Informer):
            if informer.kind == "TaskRun":
                late.append(informer)  # its first list is still going when the deadline passes
            else:
                informer.relist()

    monkeypatch.setattr(watcher, "_spawn", spawn)
    watcher.start()
    assert watcher._outbox.empty(), "nothing to do in what was listed in time"
    assert not watcher._resync_requested.is_set()
    (runs,) = late
    runs.relist()
    assert watcher._outbox.empty(), "the late list's objects are not routed as events"
    assert watcher._resync_requested.is_set(), "a resync is asked for instead"
    watcher.resync(force=watcher._take_resync_request())
    queued = []
    while not watcher._outbox.empty():
        queued.append(watcher._outbox.get_nowait()[0])
    assert [(w.task, w.kind, w.name, w.reason) for w in queued] == [
        (TaskName.PREPARE, "TaskRun", "pending", "resync")
    ]


def test_a_deletion_a_relist_finds_prompts_dependents_the_version_it_carries_already_prompted() -> None:
    """A DELETED a relist makes carries the cached copy's version: when that version had already
    prompted the dependents (the LLM became Ready at 7, its Agent validated with "7"), the deletion's
    prompt was dropped as the same state sent again, and the Agent stayed Ready without its LLM until a
    resync 20-50 s later."""
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    informers = {informer.kind: informer for informer in watcher.informers}
    informers["Agent"]._store(("default", "a"), ready("Agent", "a", {"llmRef": {"name": "l"}}))
    pending = {"status": "Pending", "observedGeneration": 1}
    llm = {**ready("LLM", "l"), "status": pending}
    informers["LLM"]._store(("default", "l"), llm)

    def queued() -> list[tuple[TaskName, str, str]]:
        works = []
        while not watcher._outbox.empty():
            works.append(watcher._outbox.get_nowait()[0])
        return [(work.task, work.kind, work.name) for work in works]

    now_ready = ready("LLM", "l")
    now_ready["metadata"]["resourceVersion"] = "7"
    informers["LLM"]._apply("MODIFIED", now_ready)
    assert queued() == [(TaskName.VALIDATE, "Agent", "a")]
    informers["LLM"].synced.set()  # (listed long ago)
    informers["LLM"].kube.list_pages = lambda *_, **__: iter([([], "20")])  # type: ignore[method-assign]
    informers["LLM"].relist()  # the LLM was deleted while the watch was down
    assert queued() == [(TaskName.VALIDATE, "Agent", "a")]


def test_a_turn_of_another_run_with_the_same_request_id_does_not_hold_back_the_fan_in() -> None:
    """A turn's tool calls were found by namespace and request label alone: two runs whose open turns'
    ids collided (7 hex digits of a hash) held each other's fan-in, run a's last call finishing did not
    prompt a while b's was running, and a waited for a resync."""
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    (informer,) = [informer for informer in watcher.informers if informer.kind == "TaskRunToolCall"]
    of_a = toolcall_event("a-abc1234-tc-01", "abc1234", "Running", "5")
    of_a["spec"] = {"taskRunRef": {"name": "a"}}
    of_b = toolcall_event("b-abc1234-tc-01", "abc1234", "Running", "6")
    of_b["spec"] = {"taskRunRef": {"name": "b"}}
    informer._apply("ADDED", of_a)
    informer._apply("ADDED", of_b)
    while not watcher._outbox.empty():
        watcher._outbox.get_nowait()
    informer._apply(
        "MODIFIED",
        {**of_a, "metadata": {**of_a["metadata"], "resourceVersion": "9"}, "status": {"phase": "Succeeded"}},
    )
    queued = []
    while not watcher._outbox.empty():
        queued.append(watcher._outbox.get_nowait()[0])
    assert [(work.kind, work.name) for work in queued if work.kind == "TaskRun"] == [("TaskRun", "a")]


def test_resyncs_while_its_work_waits_unsent_do_not_lengthen_an_objects_back_off(monkeypatch: Any) -> None:
    """While Redis is down an object's work waits in the outbox, merged: each resync tick still counted as
    one more message sent and doubled its back-off, so after a 6-minute outage the message sent on
    recovery, if lost (its worker killed), was sent again only 300 s later, not 40 s (two were sent)."""
    import watcher.main as main

    clock = [1000.0]
    monkeypatch.setattr(main.time, "monotonic", lambda: clock[0])
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    (informer,) = [informer for informer in watcher.informers if informer.kind == "TaskRun"]
    informer._store(("default", "r"), run("TaskRun", {"name": "r", "status": {"phase": "Pending"}}, "4"))
    assert watcher.resync() == 1
    watcher._outbox.get_nowait()  # the sender's, failing to send it: Redis is down
    for _ in range(12):  # six minutes of resync ticks
        clock[0] += 30.0
        watcher.resync()
    sent = 1
    while not watcher._outbox.empty():  # Redis is back: what waited is sent
        watcher._outbox.get_nowait()
        sent += 1
    assert sent == 2
    clock[0] += 40.0
    assert watcher.resync() == 1, "sent again as after two messages, not after twelve ticks"


def test_the_watcher_is_ready_once_every_informers_first_list_is_in() -> None:
    """What `kubechain up` waits for and the readinessProbe asks (/readyz); /healthz answers before."""
    watcher = Watcher(Settings(), FakeKubeClient(), lambda *_: None, leader_election=False)
    verdict = watcher.readiness()
    assert not verdict.alive and "first list" in verdict.detail and "taskruns" in verdict.detail
    for informer in watcher.informers:
        if informer.plural != "taskruns":
            informer.relist()
    assert watcher.readiness() == Health(False, "starting: the first list of taskruns is not in yet")
    (runs,) = [informer for informer in watcher.informers if informer.plural == "taskruns"]
    runs.relist()
    assert watcher.readiness() == Health(True, "ok")


def test_the_watcher_process_serves_its_readiness_on_readyz(monkeypatch: Any) -> None:
    import signal

    import kubechain.observability.logs as logs
    import kubechain.observability.metrics as metrics
    import kubechain.queueing as queueing
    import watcher.main as main

    served: dict[str, Any] = {}
    monkeypatch.setattr(main, "load_settings", lambda: Settings(metrics_port=1))
    monkeypatch.setattr(main.KubeClient, "from_settings", staticmethod(lambda *_: FakeKubeClient()))
    monkeypatch.setattr(queueing, "make_celery", lambda _settings: None)
    monkeypatch.setattr(logs, "configure_logging", lambda *_: None)
    monkeypatch.setattr(metrics, "serve", lambda port, **checks: served.update(checks))
    for name in ("serve_scaling", "freeze_startup_heap", "setup_tracing", "register_phase_collector"):
        monkeypatch.setattr(main, name, lambda *_: None)
    monkeypatch.setattr(main.Watcher, "run_forever", lambda self: None)
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    main.main(["--no-leader-election"])
    assert served["health"]().alive, "alive while its first lists are not in"
    verdict = served["readiness"]()
    assert not verdict.alive and verdict.detail.startswith("starting: the first list of ")


def test_readyz_says_why_a_kind_cannot_be_listed_and_what_to_fix() -> None:
    """A kind that can never be listed (its CRD missing, or RBAC refusing) kept /readyz at "the first list
    of … is not in yet", with nothing to say why: `kubechain up` and the readinessProbe only waited."""
    from kubechain.kube.errors import Forbidden, NotFound

    class Refusing(FakeKubeClient):
        def list_pages(self, plural: str, namespace: str | None = None, **kwargs: Any) -> Any:
            if plural == "tools":
                raise Forbidden(
                    403, "Forbidden", 'tools.kubechain.humanlayer.dev is forbidden: User "w" cannot list'
                )
            if plural == "llms":
                raise NotFound(404, "NotFound", "the server could not find the requested resource", {})
            return super().list_pages(plural, namespace, **kwargs)

    watcher = Watcher(Settings(), Refusing(), lambda *_: None, leader_election=False)
    threads = [threading.Thread(target=informer.run, daemon=True) for informer in watcher.informers]
    for thread in threads:
        thread.start()
    try:
        wait_for(
            lambda: all(i.synced.is_set() or i.list_problem for i in watcher.informers),
            what="every first list",
        )
        verdict = watcher.readiness()
    finally:
        for informer in watcher.informers:
            informer.stop.set()
        for thread in threads:
            thread.join(10)
    assert not verdict.alive
    assert "tools: the watcher may not list it" in verdict.detail and "RBAC" in verdict.detail
    assert "llms: the API server does not serve this kind" in verdict.detail
    assert "kubechain install --crds-only" in verdict.detail
