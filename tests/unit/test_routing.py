"""What work an object's state calls for, and which objects a readiness change affects (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubechain.queueing import TaskName
from kubechain.statemachines.routing import (
    dependents,
    readiness,
    ready_with_unready_dependencies,
    run_just_ended,
    work_for,
    work_for_calls_of_ended_run,
)

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


def test_every_way_a_validation_stops_at_a_secret_names_it_for_its_short_recheck() -> None:
    """An LLM's, a ContactChannel's or an MCPServer's validation stopped at a Secret (missing, a key of it
    missing or empty, not readable by the workers, a value no HTTP header can carry: a pasted "…", a line
    break) names the Secret in status.unusableSecret, which the watcher checks again within
    SECRET_RECHECK_S; once the Secret is fixed, the next validation clears it."""
    from kubechain.kube.fake import FakeKubeClient
    from kubechain.llm.base import LLMResponse
    from kubechain.statemachines.routing import SECRET_RECHECK_S, waits_for_a_secret
    from tests.unit.fakes import FakeLLM, context, create, message
    from tests.unit.test_workers_on_fake import SecretsForbidden
    from workers.validators import validate

    def specs(secret: str, key: str) -> dict[str, tuple[str, dict[str, object]]]:
        """By kind: its plural and a spec taking a value from the Secret's key."""
        ref = {"secretKeyRef": {"name": secret, "key": key}}
        var = [{"name": "Authorization", "valueFrom": ref}]
        return {
            "LLM": ("llms", {"provider": "openai", "apiKeyFrom": ref}),
            "ContactChannel": (
                "contactchannels",
                {"type": "slack", "apiKeyFrom": ref, "slack": {"channelOrUserID": "C1"}},
            ),
            "MCPServer": (
                "mcpservers",
                {"transport": "http", "url": "http://127.0.0.1:9/mcp", "headers": var},
            ),
        }

    kube, forbidden = FakeKubeClient(), SecretsForbidden()
    kube.add_secret(
        "default", "keys", {"EMPTY": " ", "PASTED": "sk-1…", "TOKEN": "Bearer a\nb", "NUL": "a\0b"}
    )
    ways = {
        "missing": (kube, "gone", "K"),
        "key missing": (kube, "keys", "K"),
        "not readable": (forbidden, "keys", "K"),
        "unsendable": (kube, "keys", "PASTED"),
        "line break": (kube, "keys", "TOKEN"),
        "empty": (kube, "keys", "EMPTY"),
    }
    # an MCPServer's header is sent stripped: a blank one is refused by its server, not by the validation
    not_for_headers = ("empty",)
    found, expected = {}, {}
    for way, (client, secret, key) in ways.items():
        ctx = context(client, FakeLLM(lambda r: LLMResponse(content="x")))
        for kind, (plural, spec) in specs(secret, key).items():
            if kind == "MCPServer" and way in not_for_headers:
                continue
            name = f"{kind.lower()}-{way.replace(' ', '-')}"
            create(client, kind, plural, name, spec)
            validate(ctx, message(kind, name))
            stored = client.get_raw(plural, "default", name)
            (work,) = work_for(kind, stored, NOW, 180, resync=True)
            found[(way, kind)] = (stored["status"].get("unusableSecret"), work.max_recheck_s)
            expected[(way, kind)] = (secret, SECRET_RECHECK_S)
    # a stdio server's env var no process can be started with (a NUL)
    ctx = context(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "NUL"}}}]
    create(
        kube, "MCPServer", "mcpservers", "mcpserver-nul", {"transport": "stdio", "command": "x", "env": env}
    )
    validate(ctx, message("MCPServer", "mcpserver-nul"))
    stored = kube.get_raw("mcpservers", "default", "mcpserver-nul")
    (work,) = work_for("MCPServer", stored, NOW, 180, resync=True)
    found[("NUL", "MCPServer")] = (stored["status"].get("unusableSecret"), work.max_recheck_s)
    expected[("NUL", "MCPServer")] = ("keys", SECRET_RECHECK_S)
    assert found == expected

    kube.add_secret("default", "gone", {"K": "sk-1"})
    ctx = context(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    validate(ctx, message("LLM", "llm-missing"))
    fixed = kube.get_raw("llms", "default", "llm-missing")
    assert fixed["status"]["status"] == "Ready" and "unusableSecret" not in fixed["status"]
    assert not waits_for_a_secret(fixed) and work_for("LLM", fixed, NOW, 180, resync=True) == []


def test_a_validation_stopped_at_a_secret_is_told_by_its_status_not_by_its_words() -> None:
    """The watcher told a validation stopped at a Secret (checked again within SECRET_RECHECK_S: Secrets
    are not watched) by the words of its statusDetail. Reworded, the object was checked again only at a
    back-off of minutes; and an error that only quoted such words (here an LLM proxy's) was checked every
    30 s. The status names the Secret (unusableSecret) whatever its statusDetail says."""
    from kubechain.kube.fake import FakeKubeClient
    from kubechain.llm.base import LLMError, LLMResponse
    from kubechain.statemachines.routing import MAX_RECHECK_S, SECRET_RECHECK_S
    from tests.unit.fakes import FakeLLM, context, create, message
    from workers.validators import validate

    class ProxyLLM(FakeLLM):
        def validate_credentials(self) -> None:
            raise LLMError('LLM proxy: failed to get secret: vault "team-a" is sealed', retryable=False)

    kube = FakeKubeClient()
    kube.add_secret("default", "keys", {"K": "sk-1"})
    ctx = context(kube, ProxyLLM(lambda r: LLMResponse(content="x")))
    for name, secret in (("stopped", "gone"), ("refused", "keys")):
        key_ref = {"secretKeyRef": {"name": secret, "key": "K"}}
        create(kube, "LLM", "llms", name, {"provider": "openai", "apiKeyFrom": key_ref})
        validate(ctx, message("LLM", name))
    stopped = kube.get_raw("llms", "default", "stopped")
    reworded = {
        **stopped,
        "status": {**stopped["status"], "statusDetail": "its API key's Secret is not there"},
    }
    refused = kube.get_raw("llms", "default", "refused")
    assert "failed to get secret: " in refused["status"]["statusDetail"]
    cases = {"stopped": stopped, "reworded": reworded, "refused": refused}
    rechecks = {}
    for case, llm in cases.items():
        assert llm["status"]["status"] == "Error"
        (work,) = work_for("LLM", llm, NOW, 180, resync=True)
        rechecks[case] = work.max_recheck_s
    assert rechecks == {"stopped": SECRET_RECHECK_S, "reworded": SECRET_RECHECK_S, "refused": MAX_RECHECK_S}


def test_a_run_that_ends_prompts_its_calls_that_still_wait_for_a_sub_agent_or_a_human() -> None:
    """Such a call was looked at again only at its own resync, backed off to minutes, while its sub-agent's
    run went on paying for LLM calls no one would read."""
    going = obj("TaskRun", "r", {}, {"phase": "ToolCallsPending"})
    going["metadata"]["uid"] = "u"
    failed = {**going, "status": {"phase": "Failed"}}

    def call(name: str, phase: str, owner_uid: str = "u", run: str = "r") -> dict:
        made = obj("TaskRunToolCall", name, {"taskRunRef": {"name": run}}, {"phase": phase})
        made["metadata"]["ownerReferences"] = [{"kind": "TaskRun", "name": run, "uid": owner_uid}]
        return made

    calls = [
        call("r-1", "AwaitingSubAgent"),
        call("r-2", "AwaitingHumanInput"),
        call("r-3", "Pending"),
        call("r-4", "Succeeded"),  # ended already
        call("r-5", "Running"),  # its holder's write ends it
        call("r-6", "AwaitingSubAgent", owner_uid="other"),  # a run of that name made again since
        call("r-7", "AwaitingSubAgent", run="r2"),  # another run's (its label's hash shared)
    ]
    deleting = call("r-8", "AwaitingSubAgent")
    deleting["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    works = work_for_calls_of_ended_run(failed, [*calls, deleting])
    assert [(w.task, w.kind, w.namespace, w.name, w.reason, w.trace_uid) for w in works] == [
        (TaskName.TOOL_CALL, "TaskRunToolCall", "ns", name, "run-ended", "u")
        for name in ("r-1", "r-2", "r-3")
    ]
    assert run_just_ended(failed, going) and run_just_ended(failed, None)
    assert not run_just_ended(failed, failed), "ended before: its calls were prompted then"
    assert not run_just_ended(going, None)
    being_deleted = {
        **failed,
        "metadata": {**failed["metadata"], "deletionTimestamp": "2026-12-01T00:00:00Z"},
    }
    assert not run_just_ended(being_deleted, going), "its calls, and their sub-agents' runs, go with it"
