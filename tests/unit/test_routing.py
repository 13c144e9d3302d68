"""What work an object's state calls for, and which objects a readiness change affects (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubechain.queueing import TaskName
from kubechain.statemachines.routing import dependents, readiness, ready_with_unready_dependencies, work_for

NOW = datetime(2026, 12, 1, tzinfo=UTC)


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


def test_an_agent_validated_again_after_an_edit_prompts_the_runs_that_wait_for_it() -> None:
    """A run waits for an Agent edited since it was validated; when it is validated again (Ready as
    before) nothing else about it changes, so the run waited for its own resync, backed off to minutes."""
    validated = {"status": "Ready", "ready": True, "observedGeneration": 1}
    before = obj("Agent", "a", {"llmRef": {"name": "l"}}, validated)
    edited = obj("Agent", "a", {"llmRef": {"name": "m"}}, validated, generation=2)
    again = obj("Agent", "a", {"llmRef": {"name": "m"}}, {**validated, "observedGeneration": 2}, generation=2)
    assert readiness("Agent", edited) != readiness("Agent", before)
    assert readiness("Agent", again) != readiness("Agent", edited)
    # A watch that missed the edit (a relist after 410 Gone, a reconnect) sees the Agent go from its old
    # validated generation to the new one at once: the runs made to wait meanwhile are prompted all the same.
    assert readiness("Agent", again) != readiness("Agent", before)


def test_resync_leaves_a_retry_that_is_not_due_yet_to_its_delayed_message() -> None:
    """The run's version does not change while it waits, so each resync that found it (backed off to
    30, 90, 180 s) queued one more delayed message, all due at the same moment."""
    due = NOW + timedelta(seconds=300)
    backoff = obj("TaskRun", "r", {}, {"phase": "ErrorBackoff", "nextAttemptAt": due.isoformat()})
    (event,) = work_for("TaskRun", backoff, NOW, 180)
    assert (event.task, event.countdown_s) == (TaskName.LLM_CALL, pytest.approx(300))
    for waited_s in (30, 90, 180, 299):
        assert work_for("TaskRun", backoff, NOW + timedelta(seconds=waited_s), 180, resync=True) == []
    (late,) = work_for("TaskRun", backoff, NOW + timedelta(seconds=301), 180, resync=True)
    assert (late.task, late.countdown_s, late.reason) == (TaskName.LLM_CALL, 0.0, "resync"), (
        "the event's message was lost: the first resync after it was due sends the retry at once"
    )
    no_time = obj("TaskRun", "r", {}, {"phase": "ErrorBackoff"})
    assert [w.countdown_s for w in work_for("TaskRun", no_time, NOW, 180, resync=True)] == [0.0]


def test_resync_revalidates_a_ready_agent_whose_mcp_server_tools_changed_unseen() -> None:
    """The event path re-validates an Agent when its server's tool names change; one missed (no watcher
    leading) left the Agent offering tools the server no longer has, as the safety net compared only
    whether the server was connected."""

    def server(*tools: str) -> dict:
        status = {"status": "Ready", "ready": True, "connected": True, "observedGeneration": 1}
        return obj("MCPServer", "m", {}, {**status, "tools": [{"name": tool} for tool in tools]})

    agent = obj(
        "Agent",
        "a",
        {"llmRef": {"name": "l"}, "mcpServers": [{"name": "m"}]},
        {
            "status": "Ready",
            "ready": True,
            "observedGeneration": 1,
            "validMCPServers": [{"name": "m", "tools": ["fetch", "search"]}],
        },
    )
    llm = obj("LLM", "l", {}, {"status": "Ready", "ready": True, "observedGeneration": 1})

    def revalidated(mcp_server: dict) -> list[tuple[str, str, str]]:
        cache = {
            "Agent": {("ns", "a"): agent},
            "LLM": {("ns", "l"): llm},
            "MCPServer": {("ns", "m"): mcp_server},
        }
        return [(w.kind, w.name, w.reason) for w in ready_with_unready_dependencies(cache)]

    assert revalidated(server("search", "fetch")) == [], "the same names, in another order"
    assert revalidated(server("fetch_url", "search")) == [("Agent", "a", "mcp-tools-changed")]
    assert revalidated(server("fetch")) == [("Agent", "a", "mcp-tools-changed")], "one gone"


def test_times_written_by_hand_without_a_time_zone_are_taken_as_utc() -> None:
    """The CRD's date-time format accepts "2026-12-01T00:00:03" (no zone); compared with an aware time it
    raised TypeError at every event and every resync of that object, and in the workers that parse it."""
    naive = (NOW + timedelta(seconds=3)).replace(tzinfo=None).isoformat()
    backoff = obj("TaskRun", "r", {}, {"phase": "ErrorBackoff", "nextAttemptAt": naive})
    assert work_for("TaskRun", backoff, NOW, 180)[0].countdown_s == pytest.approx(3)
    claimed = obj(
        "TaskRun",
        "r",
        {},
        {"phase": "SendContextWindowToLLM", "claimedAt": NOW.replace(tzinfo=None).isoformat()},
    )
    assert work_for("TaskRun", claimed, NOW + timedelta(seconds=10), 180, resync=True) == []
    (stale,) = work_for("TaskRun", claimed, NOW + timedelta(seconds=200), 180, resync=True)
    assert stale.reason == "stale-claim"


def test_an_agent_whose_tool_delegates_to_an_agent_is_revalidated_when_that_agent_comes_or_goes() -> None:
    """As for spec.subAgents: an Agent Pending for a delegating Tool's agent that does not exist yet was
    left Pending once it was created (and Ready once it was deleted) until something else changed."""
    delegating = {"toolType": "delegateToAgent", "agentRef": {"name": "helper"}}
    cache = {
        "Agent": {
            ("ns", "a"): obj("Agent", "a", {"llmRef": {"name": "l"}, "tools": [{"name": "ask"}]}),
            ("ns", "b"): obj("Agent", "b", {"llmRef": {"name": "l"}, "tools": [{"name": "calc"}]}),
        },
        "Tool": {
            ("ns", "ask"): obj("Tool", "ask", delegating),
            ("ns", "calc"): obj("Tool", "calc", {"toolType": "function", "agentRef": None}),
        },
    }
    works = dependents("Agent", obj("Agent", "helper", {}), cache)
    assert [(w.kind, w.name, w.reason) for w in works] == [("Agent", "a", "agent-changed")]
    # A Tool retargeted (its readiness otherwise the same) re-validates the Agents that grant it.
    assert readiness("Tool", obj("Tool", "ask", delegating)) != readiness(
        "Tool", obj("Tool", "ask", {**delegating, "agentRef": {"name": "helpr"}})
    )


def test_resync_revalidates_a_ready_agent_whose_tool_delegates_to_an_agent_that_is_gone() -> None:
    ready = {"status": "Ready", "ready": True}
    cache = {
        "LLM": {("ns", "l"): obj("LLM", "l", {}, ready)},
        "Agent": {
            ("ns", "a"): obj("Agent", "a", {"llmRef": {"name": "l"}, "tools": [{"name": "ask"}]}, ready)
        },
        "Tool": {
            ("ns", "ask"): obj(
                "Tool", "ask", {"toolType": "delegateToAgent", "agentRef": {"name": "helper"}}, ready
            )
        },
    }
    assert [(w.kind, w.name) for w in ready_with_unready_dependencies(cache)] == [("Agent", "a")]
    cache["Agent"][("ns", "helper")] = obj("Agent", "helper", {"llmRef": {"name": "l"}})
    assert ready_with_unready_dependencies(cache) == []


def test_every_way_a_validation_stops_at_a_secret_is_told_apart_for_its_short_recheck() -> None:
    """The statusDetail the workers write, recognised by the watcher (see SECRET_RECHECK_S)."""
    from kubechain.kube.fake import FakeKubeClient
    from kubechain.llm.base import LLMResponse
    from kubechain.mcp import MCPError, kube_secret_resolver, resolve_spec
    from kubechain.models import MCPServer
    from kubechain.statemachines.routing import SECRET_RECHECK_S, waits_for_a_secret
    from tests.unit.fakes import FakeLLM, context
    from tests.unit.test_workers_on_fake import SecretsForbidden
    from workers.validators import SecretProblem, read_api_key

    kube = FakeKubeClient()
    kube.add_secret("ns", "keys", {"EMPTY": " ", "SET": "sk-1"})
    said = []
    for client, secret, key in ((kube, "gone", "K"), (kube, "keys", "K"), (kube, "keys", "EMPTY")) + (
        (SecretsForbidden(), "keys", "SET"),
    ):
        ctx = context(client, FakeLLM(lambda r: LLMResponse(content="x")))
        with pytest.raises(SecretProblem) as problem:
            read_api_key(ctx, "ns", secret, key)
        said.append(str(problem.value))
    for client, secret, key in (
        (kube, "gone", "K"),
        (kube, "keys", "K"),
        (SecretsForbidden(), "keys", "SET"),
    ):
        env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}]
        server = MCPServer.model_validate(
            {
                "metadata": {"name": "m", "namespace": "ns"},
                "spec": {"transport": "stdio", "command": "x", "env": env},
            }
        )
        with pytest.raises(MCPError) as unresolved:
            resolve_spec(server, kube_secret_resolver(client))
        said.append(f"Connection failed: {unresolved.value}")  # as workers.mcpservers writes it
    for detail in said:
        waiting = obj("LLM", "l", {}, {"status": "Error", "statusDetail": detail, "observedGeneration": 1})
        assert waits_for_a_secret(waiting), detail
        (work,) = work_for("LLM", waiting, NOW, 180, resync=True)
        assert work.max_recheck_s == SECRET_RECHECK_S
    refused = "OpenAI API key validation failed: invalid API key (status code: 401)"
    assert not waits_for_a_secret(obj("LLM", "l", {}, {"status": "Error", "statusDetail": refused}))


def test_a_validation_stopped_by_a_secret_value_no_header_can_carry_is_checked_again_soon() -> None:
    """A Secret's value with a pasted "…" (an LLM's or ContactChannel's API key) or a line break inside (an
    MCPServer's header) is fixed by editing the Secret, which the watcher does not see: like a missing
    Secret, the object must be checked again within SECRET_RECHECK_S, not at a back-off of minutes."""
    from kubechain.kube.fake import FakeKubeClient
    from kubechain.llm.base import LLMResponse
    from kubechain.mcp import MCPError, kube_secret_resolver, resolve_spec
    from kubechain.models import MCPServer
    from kubechain.statemachines.routing import SECRET_RECHECK_S, waits_for_a_secret
    from tests.unit.fakes import FakeLLM, context
    from workers.validators import SecretProblem, read_api_key

    kube = FakeKubeClient()
    kube.add_secret("ns", "keys", {"PASTED": "sk-1…", "TOKEN": "Bearer a\nb"})
    said = []
    with pytest.raises(SecretProblem) as problem:
        read_api_key(context(kube, FakeLLM(lambda r: LLMResponse(content="x"))), "ns", "keys", "PASTED")
    said.append(str(problem.value))
    headers = [{"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "TOKEN"}}}]
    server = MCPServer.model_validate(
        {
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"transport": "http", "url": "https://mcp.example/mcp", "headers": headers},
        }
    )
    with pytest.raises(MCPError) as unsendable:
        resolve_spec(server, kube_secret_resolver(kube))
    said.append(f"Connection failed: {unsendable.value}")  # as workers.mcpservers writes it
    for detail in said:
        waiting = obj("LLM", "l", {}, {"status": "Error", "statusDetail": detail, "observedGeneration": 1})
        assert waits_for_a_secret(waiting), detail
        (work,) = work_for("LLM", waiting, NOW, 180, resync=True)
        assert work.max_recheck_s == SECRET_RECHECK_S
