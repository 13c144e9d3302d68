"""Tools end to end: parallel execution, sub-agents, and bad tool calls that the LLM gets to see."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubechain.testing.waiting import wait_for
from tests.conftest import Kubectl
from tests.e2e.conftest import OPENAI_SECRET, ScriptedLLM, apply, get, llm_resource, phase, resource


def ready(kubectl: Kubectl, namespace: str, kind: str, name: str) -> None:
    wait_for(
        lambda: get(kubectl, namespace, kind, name).get("status", {}).get("ready"),
        60,
        what=f"{kind} {name} ready",
    )


class SlowAPI:
    """A local HTTP API that takes ``delay_s`` per request and records when each request ran."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.intervals: list[tuple[float, float]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                started = time.time()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(owner.delay_s)  # the tool's own work, not a test wait
                owner.intervals.append((started, time.time()))
                payload = json.dumps({"echo": body}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/work"

    def max_overlap(self) -> int:
        points = sorted(
            [(start, 1) for start, _ in self.intervals] + [(end, -1) for _, end in self.intervals]
        )
        current = best = 0
        for _, delta in points:
            current += delta
            best = max(best, current)
        return best


@pytest.fixture
def slow_api() -> Iterator[SlowAPI]:
    api = SlowAPI(0.5)
    yield api
    api.server.shutdown()


def test_ten_tool_calls_run_in_parallel(
    kubectl: Kubectl, namespace: str, llm: ScriptedLLM, slow_api: SlowAPI
) -> None:
    question = f"Do ten things {namespace}"
    llm.add_rule(
        question,
        [
            {"tool_calls": [{"name": "work", "arguments": {"item": i}} for i in range(10)]},
            {"content": "all ten done"},
        ],
    )
    tool = resource(
        "Tool",
        "work",
        {
            "name": "work",
            "toolType": "externalAPI",
            "parameters": {"type": "object", "properties": {"item": {"type": "integer"}}},
            "execute": {"externalAPI": {"url": slow_api.url, "method": "POST"}},
        },
    )
    agent = resource(
        "Agent", "worker", {"llmRef": {"name": "gpt-4o"}, "tools": [{"name": "work"}], "system": "Work."}
    )
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), tool, agent)
    ready(kubectl, namespace, "agent", "worker")
    apply(
        kubectl,
        namespace,
        resource("TaskRun", "ten", {"agentRef": {"name": "worker"}, "userMessage": question}),
    )

    wait_for(lambda: phase(kubectl, namespace, "ten") == "FinalAnswer", 90, what="FinalAnswer")
    assert len(slow_api.intervals) == 10, "each tool call executed exactly once"
    assert slow_api.max_overlap() > 1, "tool calls of one turn ran concurrently"
    tool_messages = [
        m for m in get(kubectl, namespace, "taskrun", "ten")["status"]["contextWindow"] if m["role"] == "tool"
    ]
    assert [json.loads(m["content"])["echo"]["item"] for m in tool_messages] == list(range(10)), (
        "results in the LLM's order"
    )
    assert sorted(r["turn"] for r in llm.requests(question)) == [0, 1]


def test_sub_agent_answers_through_a_child_taskrun(
    kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    question, sub_question = f"Ask the helper {namespace}", f"Helper, what is 6x7? {namespace}"
    llm.add_rule(
        question,
        [
            {"tool_calls": [{"name": "delegate_to_agent__helper", "arguments": {"message": sub_question}}]},
            {"content_template": "The helper says: {last_tool_results}"},
        ],
    )
    llm.add_rule(sub_question, [{"content": "42"}])
    helper = resource(
        "Agent",
        "helper",
        {"llmRef": {"name": "gpt-4o"}, "system": "You help.", "description": "Answers questions"},
    )
    boss = resource(
        "Agent",
        "boss",
        {"llmRef": {"name": "gpt-4o"}, "system": "You delegate.", "subAgents": [{"name": "helper"}]},
    )
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), helper, boss)
    ready(kubectl, namespace, "agent", "boss")
    apply(
        kubectl,
        namespace,
        resource("TaskRun", "boss-run", {"agentRef": {"name": "boss"}, "userMessage": question}),
    )

    wait_for(lambda: phase(kubectl, namespace, "boss-run") == "FinalAnswer", 90, what="FinalAnswer")
    assert get(kubectl, namespace, "taskrun", "boss-run")["status"]["output"] == "The helper says: 42"
    runs = json.loads(kubectl("get", "taskrun", "-o", "json", namespace=namespace).stdout)["items"]
    (child,) = [r for r in runs if r["metadata"]["name"] != "boss-run"]
    assert child["metadata"]["ownerReferences"][0]["kind"] == "TaskRunToolCall"
    call = child["metadata"]["ownerReferences"][0]["name"]
    assert child["spec"] == {
        "agentRef": {"name": "helper"},
        "userMessage": sub_question,
        "taskRunToolCallRef": {"name": call},
    }
    assert (
        child["metadata"]["labels"]["kubechain.humanlayer.dev/taskruntoolcall"]
        == child["metadata"]["ownerReferences"][0]["name"]
    )
    assert child["status"]["phase"] == "FinalAnswer"


def test_delegation_cycle_is_an_error_the_llm_sees(
    kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    question = f"Recurse forever {namespace}"
    llm.add_rule(
        question,
        [
            {"tool_calls": [{"name": "delegate_to_agent__narcissus", "arguments": {"message": question}}]},
            {"content_template": "{last_tool_results}"},
        ],
    )
    agent = resource(
        "Agent",
        "narcissus",
        {"llmRef": {"name": "gpt-4o"}, "system": "Me.", "subAgents": [{"name": "narcissus"}]},
    )
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), agent)
    ready(kubectl, namespace, "agent", "narcissus")
    apply(
        kubectl,
        namespace,
        resource("TaskRun", "loop", {"agentRef": {"name": "narcissus"}, "userMessage": question}),
    )

    wait_for(lambda: phase(kubectl, namespace, "loop") == "FinalAnswer", 90, what="FinalAnswer")
    assert (
        "delegation cycle: narcissus → narcissus"
        in get(kubectl, namespace, "taskrun", "loop")["status"]["output"]
    )


def test_bad_tool_calls_become_errors_the_llm_sees(
    kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    question = f"Call broken tools {namespace}"
    llm.add_rule(
        question,
        [
            {
                "tool_calls": [
                    {"name": "add", "arguments_raw": "{not json"},
                    {"name": "no_such_tool", "arguments": {}},
                    {"name": "ghost__tool", "arguments": {}},
                ]
            },
            {"content_template": "{last_tool_results}"},
        ],
    )
    add = resource(
        "Tool", "add", {"name": "add", "toolType": "function", "execute": {"builtin": {"name": "add"}}}
    )
    agent = resource(
        "Agent", "clumsy", {"llmRef": {"name": "gpt-4o"}, "tools": [{"name": "add"}], "system": "Oops."}
    )
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), add, agent)
    ready(kubectl, namespace, "agent", "clumsy")
    apply(
        kubectl,
        namespace,
        resource("TaskRun", "broken", {"agentRef": {"name": "clumsy"}, "userMessage": question}),
    )

    wait_for(lambda: phase(kubectl, namespace, "broken") == "FinalAnswer", 90, what="FinalAnswer")
    output = get(kubectl, namespace, "taskrun", "broken")["status"]["output"]
    assert "Error: Invalid arguments JSON" in output
    assert 'Error: unknown tool "no_such_tool"' in output
    assert 'Error: MCP server "ghost" not found' in output
    calls = json.loads(kubectl("get", "taskruntoolcall", "-o", "json", namespace=namespace).stdout)["items"]
    assert sorted(c["status"]["phase"] for c in calls) == ["Failed", "Failed", "Failed"]
