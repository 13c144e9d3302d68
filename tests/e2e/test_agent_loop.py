"""The README walkthrough and the seed's direct TaskRun, through kubectl against watcher + worker processes."""

from __future__ import annotations

import json

from kubechain.testing.waiting import wait_for
from tests.conftest import Kubectl
from tests.e2e.conftest import (
    ADD_TOOL,
    OPENAI_SECRET,
    ScriptedLLM,
    apply,
    event_reasons,
    get,
    llm_resource,
    phase,
    resource,
)

AGENT = resource(
    "Agent",
    "my-assistant",
    {
        "llmRef": {"name": "gpt-4o"},
        "system": "You are a helpful assistant. Your job is to help the user with their tasks.",
    },
)


def test_readme_hello_world(kubectl: Kubectl, namespace: str, llm: ScriptedLLM) -> None:
    question = f"What is the capital of the moon? ({namespace})"
    llm.add_rule(question, [{"content": "The moon has no capital."}])
    task = resource("Task", "hello-world-task", {"agentRef": {"name": "my-assistant"}, "message": question})
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), AGENT, task)

    wait_for(lambda: phase(kubectl, namespace, "hello-world-task-1") == "FinalAnswer", 60, what="FinalAnswer")

    run = get(kubectl, namespace, "taskrun", "hello-world-task-1")
    assert run["status"]["output"] == "The moon has no capital."
    assert run["metadata"]["ownerReferences"][0]["kind"] == "Task"
    assert run["metadata"]["labels"]["kubechain.humanlayer.dev/task"] == "hello-world-task"
    table = kubectl("get", "taskrun", namespace=namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "STATUS", "PHASE", "TASK", "PREVIEW", "OUTPUT"]
    assert (
        "FinalAnswer" in table[1]
        and "hello-world-task" in table[1]
        and "The moon has no capital." in table[1]
    )
    assert event_reasons(kubectl, namespace, "TaskRun", "hello-world-task-1") == [
        "ValidationSucceeded",
        "SendingContextWindowToLLM",
        "LLMFinalAnswer",
    ]
    assert "TaskRunCreated" in event_reasons(kubectl, namespace, "Task", "hello-world-task")
    assert len(llm.requests(question)) == 1


def test_direct_taskrun_with_agent_ref_and_user_message(
    kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    question = f"Direct question from {namespace}"
    llm.add_rule(question, [{"content_template": "echo: {user}"}])
    run = resource(
        "TaskRun", "hello-world-1", {"agentRef": {"name": "my-assistant"}, "userMessage": question}
    )
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), AGENT, run)

    wait_for(lambda: phase(kubectl, namespace, "hello-world-1") == "FinalAnswer", 60, what="FinalAnswer")
    status = get(kubectl, namespace, "taskrun", "hello-world-1")["status"]
    assert status["output"] == f"echo: {question}"
    assert [m["role"] for m in status["contextWindow"]] == ["system", "user", "assistant"]
    assert len(question) <= 50 and status["userMsgPreview"] == question  # (truncation: a unit test)
    assert status["startTime"] and status["completionTime"]
    assert status["messageCount"] == 3
    assert len(llm.requests(question)) == 1


def test_run_waits_for_an_agent_created_later(kubectl: Kubectl, namespace: str, llm: ScriptedLLM) -> None:
    question = f"Late agent {namespace}"
    llm.add_rule(question, [{"content": "worth the wait"}])
    run = resource("TaskRun", "early-run", {"agentRef": {"name": "my-assistant"}, "userMessage": question})
    apply(kubectl, namespace, run)
    wait_for(lambda: phase(kubectl, namespace, "early-run") == "Pending", 60, what="Pending")
    assert (
        get(kubectl, namespace, "taskrun", "early-run")["status"]["statusDetail"]
        == "Waiting for Agent to exist"
    )

    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), AGENT)
    wait_for(lambda: phase(kubectl, namespace, "early-run") == "FinalAnswer", 60, what="FinalAnswer")
    assert get(kubectl, namespace, "taskrun", "early-run")["status"]["output"] == "worth the wait"


def test_parallel_builtin_tool_calls_fan_in_once(kubectl: Kubectl, namespace: str, llm: ScriptedLLM) -> None:
    question = f"Add some numbers {namespace}"
    llm.add_rule(
        question,
        [
            {
                "tool_calls": [
                    {"name": "add", "arguments": {"a": 2, "b": 3}},
                    {"name": "add", "arguments": {"a": 7, "b": 0.5}},
                ]
            },
            {"content_template": "Sums: {last_tool_results}"},
        ],
    )
    agent = resource(
        "Agent",
        "calculator",
        {"llmRef": {"name": "gpt-4o"}, "tools": [{"name": "add"}], "system": "You add."},
    )
    run = resource("TaskRun", "sums", {"agentRef": {"name": "calculator"}, "userMessage": question})
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), ADD_TOOL, agent)
    wait_for(
        lambda: get(kubectl, namespace, "agent", "calculator").get("status", {}).get("ready"),
        60,
        what="agent ready",
    )
    apply(kubectl, namespace, run)

    wait_for(lambda: phase(kubectl, namespace, "sums") == "FinalAnswer", 60, what="FinalAnswer")
    status = get(kubectl, namespace, "taskrun", "sums")["status"]
    assert status["output"] == "Sums: 5; 7.5"
    tool_messages = [m for m in status["contextWindow"] if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == ["5", "7.5"]
    assert event_reasons(kubectl, namespace, "TaskRun", "sums") == [
        "ValidationSucceeded",
        "SendingContextWindowToLLM",
        "ToolCallsPending",
        "ToolCallCreated",
        "ToolCallCreated",
        "AllToolCallsCompleted",
        "SendingContextWindowToLLM",
        "LLMFinalAnswer",
    ]
    requests = llm.requests(question)
    assert sorted(r["turn"] for r in requests) == [0, 1], "exactly one LLM request per turn"
    calls = kubectl(
        "get", "taskruntoolcall", "-l", "kubechain.humanlayer.dev/taskruntoolcall=sums", namespace=namespace
    ).stdout
    assert calls.count("Succeeded") == 2
    # the worker (one pool of threads for every queue) ran the calls it created itself
    listed = json.loads(
        kubectl(
            "get",
            "taskruntoolcall",
            "-l",
            "kubechain.humanlayer.dev/taskruntoolcall=sums",
            "-o",
            "json",
            namespace=namespace,
        ).stdout
    )["items"]
    started_by = {
        c["metadata"].get("annotations", {}).get("kubechain.humanlayer.dev/started-by") for c in listed
    }
    assert len(started_by) == 1 and None not in started_by, started_by


def test_rate_limited_llm_backs_off_then_answers(kubectl: Kubectl, namespace: str, llm: ScriptedLLM) -> None:
    question = f"Busy provider {namespace}"
    llm.add_rule(
        question,
        [
            {
                "error": {"status": 429, "message": "slow down", "retry_after": 1, "times": 2},
                "then": {"content": "patience pays"},
            }
        ],
    )
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), AGENT)
    wait_for(
        lambda: get(kubectl, namespace, "agent", "my-assistant").get("status", {}).get("ready"),
        60,
        what="agent ready",
    )
    apply(
        kubectl,
        namespace,
        resource("TaskRun", "busy", {"agentRef": {"name": "my-assistant"}, "userMessage": question}),
    )
    wait_for(lambda: phase(kubectl, namespace, "busy") == "FinalAnswer", 60, what="FinalAnswer after backoff")
    assert get(kubectl, namespace, "taskrun", "busy")["status"]["output"] == "patience pays"
    statuses = [r["status_code"] for r in sorted(llm.requests(question), key=lambda r: r["seq"])]
    assert statuses == [429, 429, 200]
    reasons = event_reasons(kubectl, namespace, "TaskRun", "busy")
    assert reasons.count("LLMRequestFailed") == 2 and reasons[-1] == "LLMFinalAnswer"


def test_client_error_fails_the_run_clearly(kubectl: Kubectl, namespace: str, llm: ScriptedLLM) -> None:
    question = f"Bad request {namespace}"
    llm.add_rule(question, [{"error": {"status": 400, "message": "context too long", "times": 100}}])
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), AGENT)
    wait_for(
        lambda: get(kubectl, namespace, "agent", "my-assistant").get("status", {}).get("ready"),
        60,
        what="agent ready",
    )
    apply(
        kubectl,
        namespace,
        resource("TaskRun", "bad", {"agentRef": {"name": "my-assistant"}, "userMessage": question}),
    )
    wait_for(lambda: phase(kubectl, namespace, "bad") == "Failed", 60, what="Failed")
    status = get(kubectl, namespace, "taskrun", "bad")["status"]
    assert (
        status["error"].startswith("LLM request failed with status 400")
        and "context too long" in status["error"]
    )
    assert status["status"] == "Error" and status["completionTime"]
    assert "LLMRequestFailed4xx" in event_reasons(kubectl, namespace, "TaskRun", "bad")
    assert len(llm.requests(question)) == 1, "a 4xx is not retried"
