"""Tool call outcomes the real API server refuses to store: the worker's handlers on the real control plane,
with a scripted LLM and a stubbed tool."""

from __future__ import annotations

import json
from typing import Any

import pytest

import workers.tool_call as tool_call_module
from kubechain.kube.client import KubeClient
from kubechain.llm.base import LLMRequest, LLMResponse
from kubechain.models import ToolCall, ToolCallFunction
from kubechain.settings import MAX_CONTEXT_WINDOW_BYTES
from tests.integration import create_secret
from tests.unit.fakes import FakeLLM, context, create, message
from workers.llm_call import llm_call
from workers.prepare import prepare
from workers.tool_call import tool_call
from workers.validators import validate

CHARGE = {
    "name": "charge",
    "description": "charges a card",
    "toolType": "externalAPI",
    "parameters": {"type": "object", "properties": {}},
    "execute": {"externalAPI": {"url": "https://example.invalid/charge"}},
}


def test_a_tool_result_etcd_refuses_beside_its_arguments_fails_the_call_and_the_run_goes_on(
    kube: KubeClient, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arguments near the largest window (1.2 MiB) and a result as long as its limit lets it be, each of
    its characters 6 bytes as the API server stores it: etcd refuses the tool call's result. The call
    fails at once saying so (it stayed Running until its claim expired, then failed as "interrupted"), the
    tool is not run again, and its run goes on with that error as the call's answer."""
    arguments = json.dumps({"note": "n" * 1_100_000})

    def answer(request: LLMRequest) -> LLMResponse:
        if request.messages[-1].role == "tool":
            return LLMResponse(content="noted")
        return LLMResponse(
            tool_calls=[ToolCall(id="c1", function=ToolCallFunction(name="charge", arguments=arguments))]
        )

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        tool_call_module,
        "call_external_api",
        lambda _url, _method, args, *_a, **_k: calls.append(args) or "<>&" * 40_000,
    )
    llm = FakeLLM(answer)
    ctx = context(
        kube,
        llm,
        config_cache_ttl_s=0,
        max_context_window_bytes=MAX_CONTEXT_WINDOW_BYTES,
        max_tool_result_bytes=MAX_CONTEXT_WINDOW_BYTES // 12,
    )
    create_secret(kube, namespace, "openai", {"OPENAI_API_KEY": "sk-test"})
    create(kube, "LLM", "llms", "gpt-4o", {"provider": "openai"}, namespace)
    create(kube, "Tool", "tools", "charge", CHARGE, namespace)
    agent = {"llmRef": {"name": "gpt-4o"}, "system": "s", "tools": [{"name": "charge"}]}
    create(kube, "Agent", "agents", "a", agent, namespace)
    for kind, name in (("LLM", "gpt-4o"), ("Tool", "charge"), ("Agent", "a")):
        validate(ctx, message(kind, name, namespace))
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "go"}, namespace)
    prepare(ctx, message("TaskRun", "r", namespace))
    llm_call(ctx, message("TaskRun", "r", namespace))
    (toolcall,), _version = kube.list_raw("taskruntoolcalls", namespace)
    name = toolcall["metadata"]["name"]

    tool_call(ctx, message("TaskRunToolCall", name, namespace))

    status = kube.get_raw("taskruntoolcalls", namespace, name)["status"]
    assert status["phase"] == "Failed" and status["status"] == "Error", status.get("error")
    assert "claimedBy" not in status and "result" not in status
    error = status["error"]
    assert error.startswith(
        "the tool's result (104856 bytes, 628894 as the API server stores it) is too large"
    )
    assert "etcdserver: request is too large" in error and "KUBECHAIN_MAX_TOOL_RESULT_BYTES" in error
    reasons = [
        event["reason"]
        for event in kube.list_events(namespace)
        if event["involvedObject"]["name"] == name and event["type"] == "Warning"
    ]
    assert reasons == ["ResultTooLarge"]
    tool_call(ctx, message("TaskRunToolCall", name, namespace))
    assert len(calls) == 1, "the tool ran once"
    prepare(ctx, message("TaskRun", "r", namespace))
    run = kube.get_raw("taskruns", namespace, "r")["status"]
    assert run["phase"] == "ReadyForLLM" and run["contextWindow"][-1]["content"] == f"Error: {error}"
    llm_call(ctx, message("TaskRun", "r", namespace))
    assert kube.get_raw("taskruns", namespace, "r")["status"]["output"] == "noted"
