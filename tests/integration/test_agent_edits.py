"""An Agent's edit and the runs created right after its validation: the watcher (its informers on the real
API server) sends the work, and the worker's handlers, in process, take it with config caches that read
the Agent before the edit."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubechain.kube.client import MERGE_PATCH, KubeClient, custom_path
from kubechain.kube.connection import load_connection
from kubechain.llm.base import LLMRequest, LLMResponse
from kubechain.models import Agent, ToolCall, ToolCallFunction
from kubechain.queueing import ResourceMessage, TaskName
from kubechain.settings import Settings
from kubechain.testing.waiting import wait_for
from tests.integration import create_secret
from tests.unit.fakes import FakeLLM, context, create
from watcher.main import Watcher
from workers.context import WorkerContext
from workers.llm_call import llm_call
from workers.prepare import prepare
from workers.tool_call import tool_call
from workers.validators import validate

ADD_TOOL = {
    "name": "add",
    "toolType": "function",
    "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    "execute": {"builtin": {"name": "add"}},
}

Sent = queue.Queue[tuple[TaskName, ResourceMessage]]


@pytest.fixture
def sent(kubeconfig: Path, namespace: str) -> Iterator[Sent]:
    """What a watcher of ``namespace`` sends (no Redis: the test is the worker)."""
    messages: Sent = queue.Queue()
    watcher = Watcher(
        Settings(namespaces=[namespace], resync_interval_s=3600),
        KubeClient(load_connection(str(kubeconfig))),
        lambda task, message, _countdown: messages.put((task, message)),
        leader_election=False,
    )
    watcher.start()
    try:
        yield messages
    finally:
        watcher.stop()


def work_until(
    sent: Sent, handle: Callable[[TaskName, ResourceMessage], None], done: Callable[[], bool]
) -> None:
    """Take what the watcher sends, in order, as a worker would, until ``done()``."""

    def step() -> bool:
        try:
            task, message = sent.get(timeout=0.2)
        except queue.Empty:
            return done()
        handle(task, message)
        return done()

    wait_for(step, 60, interval_s=0, what="the work to be done")


def test_a_run_created_right_after_its_agents_edit_is_validated_is_offered_the_edit_and_granted_it(
    kube: KubeClient, namespace: str, sent: Sent
) -> None:
    """The README's walkthrough: an Agent edited to add a Tool, its validation waited for, a run created at
    once. Its first turn was built from the worker's copy of the Agent read a moment before (its config
    cache, KUBECHAIN_CONFIG_CACHE_TTL_S): the LLM was not offered the new Tool, and a tool call of it was
    refused 'not in spec.tools' by a tools worker whose copy was as old. The watcher's message says which
    generation of the Agent it has seen validated; the copies behind it are read again. (Here the caches
    keep what they read for an hour, so the copies from before the edit are certainly still held.)"""

    def answer(request: LLMRequest) -> LLMResponse:
        if request.messages[-1].role == "tool":
            return LLMResponse(content=request.messages[-1].content)
        if "add" in [tool.name for tool in request.tools]:
            call = ToolCall(id="c1", function=ToolCallFunction(name="add", arguments='{"a": 1, "b": 2}'))
            return LLMResponse(tool_calls=[call])
        return LLMResponse(content="no tools")

    llm = FakeLLM(answer)
    turns = context(kube, llm, continues_llm=True, config_cache_ttl_s=3600)
    tools = context(kube, llm, identity="w2", config_cache_ttl_s=3600)
    handlers: dict[TaskName, Callable[[WorkerContext, ResourceMessage], None]] = {
        TaskName.VALIDATE: validate,
        TaskName.PREPARE: prepare,
        TaskName.LLM_CALL: llm_call,
        TaskName.TOOL_CALL: tool_call,
    }

    def handle(task: TaskName, message: ResourceMessage) -> None:
        handlers[task](tools if task is TaskName.TOOL_CALL else turns, message)

    def status(plural: str, name: str) -> dict[str, Any]:
        return kube.get_raw(plural, namespace, name).get("status") or {}

    create_secret(kube, namespace, "openai", {"OPENAI_API_KEY": "sk-test"})
    create(kube, "LLM", "llms", "gpt-4o", {"provider": "openai"}, namespace)
    create(kube, "Tool", "tools", "add", ADD_TOOL, namespace)
    create(kube, "Agent", "agents", "my-assistant", {"llmRef": {"name": "gpt-4o"}, "system": "s"}, namespace)
    work_until(sent, handle, lambda: bool(status("agents", "my-assistant").get("ready")))
    run = {"agentRef": {"name": "my-assistant"}, "userMessage": "hi"}
    create(kube, "TaskRun", "taskruns", "before", run, namespace)
    work_until(sent, handle, lambda: status("taskruns", "before").get("phase") == "FinalAnswer")
    assert status("taskruns", "before")["output"] == "no tools"
    # both workers hold a copy of the Agent as it was
    assert tools.config_cache.get(Agent, namespace, "my-assistant").spec.tools == []

    edit = {"spec": {"tools": [{"name": "add"}]}}
    kube.request(
        "PATCH", custom_path("agents", namespace, "my-assistant"), body=edit, content_type=MERGE_PATCH
    )
    work_until(sent, handle, lambda: status("agents", "my-assistant").get("observedGeneration") == 2)
    assert status("agents", "my-assistant")["ready"] is True
    create(kube, "TaskRun", "taskruns", "after", {**run, "userMessage": "add 1 and 2"}, namespace)
    work_until(sent, handle, lambda: status("taskruns", "after").get("phase") in ("FinalAnswer", "Failed"))
    first_turn = [r for r in llm.requests if r.messages[-1].content == "add 1 and 2"]
    assert [tool.name for tool in first_turn[0].tools] == ["add"], "offered the Tool the edit added"
    assert (status("taskruns", "after")["phase"], status("taskruns", "after").get("output")) == (
        "FinalAnswer",
        "3",
    )
