"""Humans in the loop end to end: approvals via a HumanLayer-compatible API and via kubectl, through kubectl.

This module runs its own stack (watcher, worker, Redis, scripted LLM) whose workers reach a local HumanLayer
test server (HUMANLAYER_API_BASE). The session's shared stack would otherwise handle these namespaces too
(its watcher watches every namespace), so its watchers are paused while this module runs.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubechain.humanlayer.testserver import HumanLayerTestServer
from kubechain.testing.stack import LocalStack, StackOptions
from kubechain.testing.waiting import wait_for
from tests.conftest import Kubectl, exclusive_stack
from tests.e2e.conftest import (
    OPENAI_SECRET,
    ScriptedLLM,
    apply,
    deploy_tool,
    event_reasons,
    get,
    llm_resource,
    phase,
    resource,
    secret,
)
from tests.e2e.test_tools import SlowAPI

HL_KEY = "hl-e2e-approvals-key"
TIME_TOOL = "time__get_current_time"


@pytest.fixture(scope="module")
def hl() -> Iterator[HumanLayerTestServer]:
    with HumanLayerTestServer(api_keys={HL_KEY}) as server:
        yield server


@pytest.fixture(scope="module")
def humans_stack(
    kubeconfig: Path,
    tmp_path_factory: pytest.TempPathFactory,
    hl: HumanLayerTestServer,
    request: pytest.FixtureRequest,
) -> Iterator[LocalStack]:
    options = StackOptions(
        workdir=tmp_path_factory.mktemp("humans-stack"),
        cluster="current",
        kubeconfig=kubeconfig,
        workers=1,
        worker_concurrency=8,
        resync_interval_s=2.0,
        stale_after_s=2.0,
        extra_env={
            "HUMANLAYER_API_BASE": hl.url,
            # Its own leader lease, so it leads at once whatever other stacks hold.
            "KUBECHAIN_LEASE_NAME": f"kubechain-watcher-humans-{uuid.uuid4().hex[:6]}",
            "KUBECHAIN_LEASE_DURATION_S": "4",
        },
    )
    with exclusive_stack(options) as stack:
        yield stack


@pytest.fixture(scope="module")
def hllm(humans_stack: LocalStack) -> ScriptedLLM:
    return ScriptedLLM(humans_stack.llm_url)


def status(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return dict(get(kubectl, namespace, kind, name).get("status") or {})


def toolcalls(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    return list(
        json.loads(kubectl("get", "taskruntoolcall", "-o", "json", namespace=namespace).stdout)["items"]
    )


def events(kubectl: Kubectl, namespace: str, name: str) -> list[tuple[str, str]]:
    items = json.loads(kubectl("get", "events", "-o", "json", namespace=namespace).stdout)["items"]
    return [(e["reason"], e["message"]) for e in items if e["involvedObject"]["name"] == name]


def approval_setup(kubectl: Kubectl, namespace: str) -> None:
    """The README's approval walkthrough, with mcp-server-time standing in for the fetch server."""
    channel = resource(
        "ContactChannel",
        "approval-channel",
        {
            "type": "email",
            "apiKeyFrom": {"secretKeyRef": {"name": "humanlayer", "key": "HUMANLAYER_API_KEY"}},
            "email": {
                "address": "approver@example.com",
                "subject": "Approval Request from KubeChain",
                "contextAboutUser": "Primary approver for time lookups",
            },
        },
    )
    server = resource(
        "MCPServer",
        "time",
        {
            "transport": "stdio",
            "command": sys.executable,
            "args": ["-m", "mcp_server_time"],
            "approvalContactChannel": {"name": "approval-channel"},
        },
    )
    agent = resource(
        "Agent",
        "agent-with-time",
        {
            "llmRef": {"name": "gpt-4o"},
            "system": "You are a helpful assistant.",
            "mcpServers": [{"name": "time"}],
        },
    )
    apply(
        kubectl,
        namespace,
        OPENAI_SECRET,
        secret("humanlayer", {"HUMANLAYER_API_KEY": HL_KEY}),
        llm_resource(),
        channel,
        server,
        agent,
    )
    wait_for(
        lambda: status(kubectl, namespace, "agent", "agent-with-time").get("ready"), 120, what="agent ready"
    )


def waiting_toolcall(kubectl: Kubectl, namespace: str) -> dict[str, Any]:
    def waiting() -> dict[str, Any] | None:
        calls = toolcalls(kubectl, namespace)
        found = [
            c
            for c in calls
            if c.get("status", {}).get("phase") == "AwaitingHumanApproval"
            and c["status"].get("externalCallID")
        ]
        return found[0] if found else None

    return wait_for(waiting, 90, what="a tool call awaiting approval with a HumanLayer call id")


def start_task(kubectl: Kubectl, namespace: str, name: str, question: str) -> str:
    apply(
        kubectl,
        namespace,
        resource("Task", name, {"agentRef": {"name": "agent-with-time"}, "message": question}),
    )
    return f"{name}-1"


def test_readme_approval_walkthrough(
    kubectl: Kubectl, namespace: str, hllm: ScriptedLLM, hl: HumanLayerTestServer
) -> None:
    question = f"What time is it in UTC? {namespace}"
    hllm.add_rule(
        question,
        [
            {"tool_calls": [{"name": TIME_TOOL, "arguments": {"timezone": "UTC"}}]},
            {"content_template": "Checked: {last_tool_results}"},
        ],
    )
    approval_setup(kubectl, namespace)
    channel = status(kubectl, namespace, "contactchannel", "approval-channel")
    assert (
        channel["ready"] is True
        and channel["statusDetail"] == "HumanLayer email channel validated successfully"
    )
    assert channel["humanLayerProject"] == hl.project_id
    run = start_task(kubectl, namespace, "approved-time-task", question)

    toolcall = waiting_toolcall(kubectl, namespace)
    name = toolcall["metadata"]["name"]
    assert toolcall["spec"]["toolRef"]["name"] == TIME_TOOL
    assert (
        toolcall["status"]["statusDetail"]
        == "Waiting for human approval via contact channel approval-channel"
    )
    listed = kubectl("get", "taskruntoolcall", namespace=namespace).stdout.splitlines()
    assert listed[0].split()[:4] == ["NAME", "PHASE", "TASKRUN", "TOOL"]
    assert listed[1].split()[:4] == [name, "AwaitingHumanApproval", run, TIME_TOOL]
    wait_for(
        lambda: ("HumanLayerRequestSent", "HumanLayer request sent") in events(kubectl, namespace, name), 30
    )
    assert (
        "AwaitingHumanApproval",
        "Tool execution requires approval via contact channel approval-channel",
    ) in events(kubectl, namespace, name)
    assert not status(kubectl, namespace, "taskrun", run).get("output"), "the run waits for the human"
    call = hl.function_call(toolcall["status"]["externalCallID"])
    assert call is not None and call["run_id"] == name
    assert call["spec"]["fn"] == TIME_TOOL and call["spec"]["kwargs"] == {"timezone": "UTC"}
    assert call["spec"]["channel"]["email"]["address"] == "approver@example.com"

    hl.approve(call["call_id"], "go ahead", user="approver@example.com")
    wait_for(lambda: phase(kubectl, namespace, run) == "FinalAnswer", 90, what="FinalAnswer")
    final = status(kubectl, namespace, "taskrun", run)
    assert final["output"].startswith("Checked: ") and "UTC" in final["output"]
    done = status(kubectl, namespace, "taskruntoolcall", name)
    assert done["phase"] == "Succeeded" and done["attempts"] == 1
    reasons = [reason for reason, _ in events(kubectl, namespace, name)]
    assert reasons.count("ToolCallApproved") == 1 and reasons.count("ExecutionSucceeded") == 1
    assert "AllToolCallsCompleted" in event_reasons(kubectl, namespace, "TaskRun", run)
    assert hl.posts[call["call_id"]] == 1, "one HumanLayer request"


def test_rejection_is_answered_gracefully(
    kubectl: Kubectl, namespace: str, hllm: ScriptedLLM, hl: HumanLayerTestServer
) -> None:
    question = f"What time is it in Tokyo? {namespace}"
    hllm.add_rule(
        question,
        [
            {"tool_calls": [{"name": TIME_TOOL, "arguments": {"timezone": "Asia/Tokyo"}}]},
            {"content_template": "Sorry, I could not look it up. ({last_tool_results})"},
        ],
    )
    approval_setup(kubectl, namespace)
    run = start_task(kubectl, namespace, "rejected-time-task", question)
    toolcall = waiting_toolcall(kubectl, namespace)
    hl.reject(toolcall["status"]["externalCallID"], "no time lookups today")

    wait_for(lambda: phase(kubectl, namespace, run) == "FinalAnswer", 90, what="FinalAnswer")
    rejected = status(kubectl, namespace, "taskruntoolcall", toolcall["metadata"]["name"])
    assert rejected["phase"] == "ToolCallRejected" and rejected["status"] == "Succeeded"
    assert rejected["result"] == "no time lookups today"
    window = status(kubectl, namespace, "taskrun", run)["contextWindow"]
    tool_message = next(m for m in window if m["role"] == "tool")
    assert tool_message["content"] == f"User denied `{TIME_TOOL}` with feedback: no time lookups today"
    assert status(kubectl, namespace, "taskrun", run)["output"] == (
        f"Sorry, I could not look it up. (User denied `{TIME_TOOL}` with feedback: no time lookups today)"
    )
    assert sorted(r["turn"] for r in hllm.requests(question)) == [0, 1]


def test_kubectl_annotate_approves_a_tool_without_channel(
    kubectl: Kubectl, namespace: str, hllm: ScriptedLLM, hl: HumanLayerTestServer
) -> None:
    api = SlowAPI(0.0)
    try:
        question = f"Deploy version 2 {namespace}"
        hllm.add_rule(
            question,
            [
                {"tool_calls": [{"name": "deploy", "arguments": {"version": "2"}}]},
                {"content_template": "Deployed: {last_tool_results}"},
            ],
        )
        tool = deploy_tool(api.url)
        agent = resource(
            "Agent",
            "deployer",
            {"llmRef": {"name": "gpt-4o"}, "system": "You deploy.", "tools": [{"name": "deploy"}]},
        )
        apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), tool, agent)
        wait_for(lambda: status(kubectl, namespace, "agent", "deployer").get("ready"), 60, what="agent ready")
        apply(
            kubectl,
            namespace,
            resource("TaskRun", "deploy-run", {"agentRef": {"name": "deployer"}, "userMessage": question}),
        )

        def waiting() -> dict[str, Any] | None:
            found = [
                c
                for c in toolcalls(kubectl, namespace)
                if c.get("status", {}).get("phase") == "AwaitingHumanApproval"
            ]
            return found[0] if found else None

        toolcall = wait_for(waiting, 90, what="the tool call to wait for approval")
        name = toolcall["metadata"]["name"]
        assert f"kubechain approve {name}" in toolcall["status"]["statusDetail"]
        assert api.intervals == [], "nothing ran"
        assert all(c["run_id"] != name for c in hl.function_calls.values()), "HumanLayer was not asked"

        kubectl(
            "annotate",
            "taskruntoolcall",
            name,
            "kubechain.humanlayer.dev/approval=approved",
            namespace=namespace,
        )
        wait_for(lambda: phase(kubectl, namespace, "deploy-run") == "FinalAnswer", 60, what="FinalAnswer")
        assert status(kubectl, namespace, "taskrun", "deploy-run")["output"].startswith("Deployed: ")
        assert len(api.intervals) == 1, "the approved tool ran once"
        assert ("ToolCallApproved", "Tool call approved via kubectl") in events(kubectl, namespace, name)
    finally:
        api.server.shutdown()


def test_slow_approval_survives_a_worker_restart(
    kubectl: Kubectl, namespace: str, hllm: ScriptedLLM, hl: HumanLayerTestServer, humans_stack: LocalStack
) -> None:
    question = f"What time is it in Berlin? {namespace}"
    hllm.add_rule(
        question,
        [
            {"tool_calls": [{"name": TIME_TOOL, "arguments": {"timezone": "Europe/Berlin"}}]},
            {"content_template": "Berlin: {last_tool_results}"},
        ],
    )
    approval_setup(kubectl, namespace)
    run = start_task(kubectl, namespace, "slow-approval-task", question)
    toolcall = waiting_toolcall(kubectl, namespace)
    name, call_id = toolcall["metadata"]["name"], toolcall["status"]["externalCallID"]
    path = f"/humanlayer/v1/function_calls/{call_id}"
    wait_for(lambda: hl.request_count("GET", path) >= 2, 60, what="the worker to re-check HumanLayer twice")

    (worker,) = list(humans_stack.workers)
    humans_stack.workers.pop(worker).stop(timeout=20)
    hl.approve(call_id, "approved while no worker was running")
    assert status(kubectl, namespace, "taskruntoolcall", name)["phase"] == "AwaitingHumanApproval"
    humans_stack.start_worker(f"{worker}-restarted")

    wait_for(
        lambda: phase(kubectl, namespace, run) == "FinalAnswer", 120, what="the new worker to finish the run"
    )
    assert status(kubectl, namespace, "taskrun", run)["output"].startswith("Berlin: ")
    done = status(kubectl, namespace, "taskruntoolcall", name)
    assert done["phase"] == "Succeeded" and done["attempts"] == 1, "the tool ran exactly once"
    reasons = [reason for reason, _ in events(kubectl, namespace, name)]
    assert reasons.count("ExecutionSucceeded") == 1 and reasons.count("HumanLayerRequestSent") == 1
    assert hl.posts[call_id] == 1, "one HumanLayer request, before the restart"


def test_agent_asks_a_human(
    kubectl: Kubectl, namespace: str, hllm: ScriptedLLM, hl: HumanLayerTestServer
) -> None:
    question = f"Plan the offsite {namespace}"
    tool = "ops__human_contact_email"
    hllm.add_rule(
        question,
        [
            {"tool_calls": [{"name": tool, "arguments": {"message": "What is the offsite budget?"}}]},
            {"content_template": "The human said: {last_tool_results}"},
        ],
    )
    channel = resource(
        "ContactChannel",
        "ops",
        {
            "type": "email",
            "apiKeyFrom": {"secretKeyRef": {"name": "humanlayer", "key": "HUMANLAYER_API_KEY"}},
            "email": {"address": "ops@example.com", "contextAboutUser": "the operations lead"},
        },
    )
    agent = resource(
        "Agent",
        "planner",
        {"llmRef": {"name": "gpt-4o"}, "system": "You plan.", "humanContactChannels": [{"name": "ops"}]},
    )
    apply(
        kubectl,
        namespace,
        OPENAI_SECRET,
        secret("humanlayer", {"HUMANLAYER_API_KEY": HL_KEY}),
        llm_resource(),
        channel,
        agent,
    )
    wait_for(lambda: status(kubectl, namespace, "agent", "planner").get("ready"), 60, what="agent ready")
    apply(
        kubectl,
        namespace,
        resource("TaskRun", "plan", {"agentRef": {"name": "planner"}, "userMessage": question}),
    )

    def asked() -> dict[str, Any] | None:
        found = [
            c
            for c in toolcalls(kubectl, namespace)
            if c.get("status", {}).get("phase") == "AwaitingHumanInput" and c["status"].get("externalCallID")
        ]
        return found[0] if found else None

    toolcall = wait_for(asked, 90, what="the question to reach HumanLayer")
    assert toolcall["status"]["statusDetail"] == "Waiting for human input via contact channel ops"
    call_id = toolcall["status"]["externalCallID"]
    contact = hl.contact_requests[call_id]
    assert contact["spec"]["msg"] == "What is the offsite budget?"
    assert contact["spec"]["channel"] == {
        "email": {"address": "ops@example.com", "context_about_user": "the operations lead"}
    }

    hl.respond(call_id, "20k EUR")
    wait_for(lambda: phase(kubectl, namespace, "plan") == "FinalAnswer", 90, what="FinalAnswer")
    assert status(kubectl, namespace, "taskrun", "plan")["output"] == "The human said: 20k EUR"
    assert status(kubectl, namespace, "taskruntoolcall", toolcall["metadata"]["name"])["result"] == "20k EUR"
