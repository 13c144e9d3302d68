"""Workers, watchers, Redis and the API server fail mid-run; every run still finishes, nothing twice."""

from __future__ import annotations

import json
import time

import pytest

from kubechain.testing.stack import LocalStack
from kubechain.testing.waiting import wait_for
from tests.chaos.conftest import kill
from tests.conftest import Kubectl
from tests.e2e.conftest import OPENAI_SECRET, ScriptedLLM, apply, get, llm_resource, phase, resource
from tests.e2e.test_tools import SlowAPI


def setup_agent(
    kubectl: Kubectl, namespace: str, tools: list[dict] | None = None, name: str = "agent"
) -> None:
    spec = {"llmRef": {"name": "gpt-4o"}, "system": "You are reliable."}
    if tools:
        spec["tools"] = [{"name": t["metadata"]["name"]} for t in tools]
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), *(tools or []), resource("Agent", name, spec))
    wait_for(
        lambda: get(kubectl, namespace, "agent", name).get("status", {}).get("ready"), 60, what="agent ready"
    )


def status(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict:
    return get(kubectl, namespace, kind, name).get("status", {})


def test_worker_killed_mid_llm_call(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    question = f"slow thought {namespace}"
    chaos_llm.add_rule(question, [{"content": "finally", "delay_s": 3}])
    setup_agent(kubectl, namespace)
    apply(
        kubectl, namespace, resource("TaskRun", "r", {"agentRef": {"name": "agent"}, "userMessage": question})
    )
    claimed = wait_for(
        lambda: (
            (s := status(kubectl, namespace, "taskrun", "r")).get("phase") == "SendContextWindowToLLM"
            and s.get("claimedBy")
        ),
        60,
        what="the LLM claim",
    )
    wait_for(lambda: chaos_llm.in_flight(question), 30, what="the LLM request to arrive")
    kill(chaos_stack, str(claimed))
    wait_for(
        lambda: phase(kubectl, namespace, "r") == "FinalAnswer", 90, what="another worker to finish the run"
    )
    final = status(kubectl, namespace, "taskrun", "r")
    assert final["output"] == "finally"
    turns = [r["turn"] for r in chaos_llm.requests(question)]
    assert turns == [0, 0], "the interrupted turn was repeated exactly once"


@pytest.mark.parametrize("idempotent", [False, True], ids=["not-idempotent", "idempotent"])
def test_worker_killed_mid_tool_call(
    idempotent: bool, chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    api = SlowAPI(3.0)
    try:
        question = f"slow tool {namespace}"
        chaos_llm.add_rule(
            question,
            [
                {"tool_calls": [{"name": "work", "arguments": {"x": 1}}]},
                {"content_template": "{last_tool_results}"},
            ],
        )
        tool = resource(
            "Tool",
            "work",
            {
                "name": "work",
                "toolType": "externalAPI",
                "idempotent": idempotent,
                "execute": {"externalAPI": {"url": api.url}},
            },
        )
        setup_agent(kubectl, namespace, [tool])
        apply(
            kubectl,
            namespace,
            resource("TaskRun", "r", {"agentRef": {"name": "agent"}, "userMessage": question}),
        )

        def running() -> str | None:
            calls = json.loads(kubectl("get", "taskruntoolcall", "-o", "json", namespace=namespace).stdout)[
                "items"
            ]
            running = [c for c in calls if c.get("status", {}).get("phase") == "Running"]
            return running[0]["status"]["claimedBy"] if running else None

        holder = wait_for(running, 60, what="the tool call to run")
        kill(chaos_stack, holder)
        wait_for(lambda: phase(kubectl, namespace, "r") == "FinalAnswer", 90, what="the run to finish")
        output = status(kubectl, namespace, "taskrun", "r")["output"]
        if idempotent:
            assert '"echo"' in output, "the idempotent tool was run again and succeeded"
        else:
            assert "lost mid-execution" in output and "not declared idempotent" in output
            assert len(api.intervals) <= 1, "a non-idempotent tool is never started twice"
    finally:
        api.server.shutdown()


def test_redis_loses_every_queued_message(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    question = f"redis flush {namespace}"
    chaos_llm.add_rule(question, [{"content": "survived", "delay_s": 1}])
    setup_agent(kubectl, namespace)
    runs = [
        resource("TaskRun", f"r{i}", {"agentRef": {"name": "agent"}, "userMessage": f"{question} #{i}"})
        for i in range(20)
    ]
    apply(kubectl, namespace, *runs)
    wait_for(
        lambda: chaos_llm.in_flight(f"{question} #0") or chaos_llm.in_flight(f"{question} #1"),
        60,
        what="work in flight",
    )
    assert chaos_stack.redis is not None
    chaos_stack.redis.restart(flush=True)
    for i in range(20):
        wait_for(lambda i=i: phase(kubectl, namespace, f"r{i}") == "FinalAnswer", 120, what=f"r{i}")
    for i in range(20):
        turns = [r["turn"] for r in chaos_llm.requests(f"{question} #{i}")]
        # A call cut off by the flush may be repeated once after its claim expires; never more.
        assert 1 <= len(turns) <= 2, (i, turns)


@pytest.mark.stack(watchers=2)
def test_leader_watcher_killed(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    question = f"watcher dies {namespace}"
    chaos_llm.add_rule(question, [{"content": "still here"}])
    setup_agent(kubectl, namespace)

    def leader() -> str | None:
        lease = json.loads(
            kubectl(
                "get", "lease", "kubechain-watcher", "-o", "json", namespace="default", check=False
            ).stdout
            or "{}"
        )
        return lease.get("spec", {}).get("holderIdentity")

    holder = wait_for(leader, 30, what="a leader")
    kill(chaos_stack, holder)
    runs = [
        resource("TaskRun", f"r{i}", {"agentRef": {"name": "agent"}, "userMessage": f"{question} #{i}"})
        for i in range(10)
    ]
    apply(kubectl, namespace, *runs)
    for i in range(10):
        wait_for(lambda i=i: phase(kubectl, namespace, f"r{i}") == "FinalAnswer", 90, what=f"r{i}")
    assert wait_for(lambda: (h := leader()) != holder and h, 30, what="a new leader")
    for i in range(10):
        assert len(chaos_llm.requests(f"{question} #{i}")) == 1


def test_api_server_outage(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str, control_plane: object
) -> None:
    question = f"apiserver outage {namespace}"
    chaos_llm.add_rule(question, [{"content": "back online", "delay_s": 2}])
    setup_agent(kubectl, namespace)
    runs = [
        resource("TaskRun", f"r{i}", {"agentRef": {"name": "agent"}, "userMessage": f"{question} #{i}"})
        for i in range(10)
    ]
    apply(kubectl, namespace, *runs)
    wait_for(lambda: chaos_llm.in_flight(f"{question} #0"), 60, what="work in flight")
    control_plane.stop_apiserver()  # type: ignore[attr-defined]
    time.sleep(10)  # the outage itself: the fault being injected, not a wait for a condition
    control_plane.start_apiserver()  # type: ignore[attr-defined]
    for i in range(10):
        wait_for(lambda i=i: phase(kubectl, namespace, f"r{i}") == "FinalAnswer", 120, what=f"r{i}")
    for i in range(10):
        assert 1 <= len(chaos_llm.requests(f"{question} #{i}")) <= 2


def test_deleting_a_run_mid_llm_call_stops_it(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    question = f"delete me {namespace}"
    chaos_llm.add_rule(
        question,
        [
            {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}], "delay_s": 2},
            {"content": "never"},
        ],
    )
    add = resource(
        "Tool", "add", {"name": "add", "toolType": "function", "execute": {"builtin": {"name": "add"}}}
    )
    setup_agent(kubectl, namespace, [add])
    apply(
        kubectl, namespace, resource("TaskRun", "r", {"agentRef": {"name": "agent"}, "userMessage": question})
    )
    wait_for(lambda: chaos_llm.in_flight(question), 60, what="the LLM request")
    kubectl("delete", "taskrun", "r", "--wait=false", namespace=namespace)
    wait_for(lambda: not get(kubectl, namespace, "taskrun", "r"), 30, what="deletion")
    # Give the in-flight call time to return and any follow-up to happen (the condition: the LLM answered).
    wait_for(
        lambda: chaos_llm.requests(question) and not chaos_llm.in_flight(question), 30, what="the LLM answer"
    )
    wait_for(lambda: chaos_stack.workers["worker-0"].running(), 5, what="worker alive")
    calls = json.loads(kubectl("get", "taskruntoolcall", "-o", "json", namespace=namespace).stdout)["items"]
    assert calls == [], "no tool calls were created for a deleted run"
    assert len(chaos_llm.requests(question)) == 1
