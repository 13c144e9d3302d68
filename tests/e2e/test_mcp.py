"""MCP servers that others wrote, through kubectl: mcp-server-time (PyPI, stdio) and
@modelcontextprotocol/server-everything (npm, streamable HTTP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from kubechain.testing.controlplane import free_port
from kubechain.testing.waiting import wait_for
from tests.conftest import Kubectl
from tests.e2e.conftest import OPENAI_SECRET, ScriptedLLM, apply, get, llm_resource, phase, resource


@pytest.fixture(scope="module")
def everything_url() -> Iterator[str]:
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("npx not installed (apt-get install nodejs npm)")
    port = free_port()
    process = subprocess.Popen(
        [npx, "-y", "@modelcontextprotocol/server-everything", "streamableHttp"],
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def listening() -> bool:
        try:
            httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=1)
            return True
        except httpx.HTTPError:
            return False

    try:
        wait_for(listening, 180, interval_s=0.5, what="server-everything to listen")
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        os.killpg(process.pid, 15)
        process.wait(10)


def test_agent_uses_tools_of_two_real_mcp_servers(
    kubectl: Kubectl, namespace: str, llm: ScriptedLLM, everything_url: str
) -> None:
    question = f"What time is it, and echo hello {namespace}"
    llm.add_rule(
        question,
        [
            {
                "tool_calls": [
                    {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}},
                    {"name": "everything__echo", "arguments": {"message": "hello from kubechain"}},
                ]
            },
            {"content_template": "{last_tool_results}"},
        ],
    )
    time_server = resource(
        "MCPServer",
        "time",
        {"transport": "stdio", "command": sys.executable, "args": ["-m", "mcp_server_time"]},
    )
    everything = resource("MCPServer", "everything", {"transport": "http", "url": everything_url})
    agent = resource(
        "Agent",
        "clock",
        {
            "llmRef": {"name": "gpt-4o"},
            "system": "You tell the time.",
            "mcpServers": [{"name": "time"}, {"name": "everything"}],
        },
    )
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), time_server, everything, agent)
    for name in ("time", "everything"):
        wait_for(
            lambda name=name: get(kubectl, namespace, "mcpserver", name).get("status", {}).get("connected"),
            120,
            what=f"{name} connected",
        )
    time_status = get(kubectl, namespace, "mcpserver", "time")["status"]
    assert time_status["statusDetail"] == "Connected successfully with 2 tools"
    assert {t["name"] for t in time_status["tools"]} == {"get_current_time", "convert_time"}
    header = kubectl("get", "mcpserver", namespace=namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "CONNECTED", "STATUS"]
    wait_for(
        lambda: get(kubectl, namespace, "agent", "clock").get("status", {}).get("ready"),
        60,
        what="agent ready",
    )
    valid = get(kubectl, namespace, "agent", "clock")["status"]["validMCPServers"]
    assert {s["name"] for s in valid} == {"time", "everything"}

    apply(
        kubectl,
        namespace,
        resource("TaskRun", "what-time", {"agentRef": {"name": "clock"}, "userMessage": question}),
    )
    wait_for(lambda: phase(kubectl, namespace, "what-time") == "FinalAnswer", 120, what="FinalAnswer")
    status = get(kubectl, namespace, "taskrun", "what-time")["status"]
    time_result, echo_result = [m["content"] for m in status["contextWindow"] if m["role"] == "tool"]
    assert json.loads(time_result)["timezone"] == "UTC"
    assert "hello from kubechain" in echo_result
    (first_request, _) = sorted(llm.requests(question), key=lambda r: r["turn"])
    assert {"time__get_current_time", "everything__echo"} <= set(first_request["tool_names"])
    events = json.loads(kubectl("get", "events", "-o", "json", namespace=namespace).stdout)["items"]
    assert any(
        e["reason"] == "ExecutionSucceeded" and 'MCP tool "time__get_current_time"' in e["message"]
        for e in events
    )
