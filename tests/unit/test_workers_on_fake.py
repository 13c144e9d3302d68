"""Worker handlers against the in-memory API server: idempotency, claims and fan-in under concurrency."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest

from kubechain.kube.errors import Conflict, error_for
from kubechain.kube.fake import FakeKubeClient
from kubechain.llm.base import LLMError, LLMRequest, LLMResponse
from kubechain.models import LABEL_TOOLCALLREQUEST, Agent, TaskRun, ToolCall, ToolCallFunction
from kubechain.models.taskrun import TokenUsage
from kubechain.queueing import ResourceMessage, TaskName
from kubechain.statemachines.routing import tasks_missing_their_run, work_for
from kubechain.statemachines.taskrun import plan_initial_context, trace_ids
from tests.unit.fakes import FakeLLM, context, create, message, ready_agent_setup
from tests.unit.test_agent_validation import MALFORMED_URLS, WELL_FORMED_URLS
from workers.llm_call import llm_call
from workers.prepare import prepare
from workers.tool_call import tool_call
from workers.validators import VALIDATED_KINDS, VALIDATORS, validate

ADD_TOOL = {
    "name": "add",
    "toolType": "function",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    "execute": {"builtin": {"name": "add"}},
}


class ReadGateKube(FakeKubeClient):
    """Holds each thread's first GET of one object, once answered, until ``parties`` threads have read it.

    Every one of them then decides on the same resourceVersion, so all but one of their conditional writes
    (claims, transitions) must conflict: without the gate a thread usually finishes before the next one
    reads, and the 409 path is never taken. Inert outside ``with kube.gate(...)``."""

    def __init__(self) -> None:
        super().__init__()
        self._gate: tuple[str, str, threading.Barrier] | None = None
        self._gate_lock = threading.Lock()
        self._through: set[int] = set()
        self.first_read_rvs: list[str] = []
        self.conflicts = 0

    @contextmanager
    def gate(self, plural: str, name: str, parties: int) -> Iterator[None]:
        with self._gate_lock:
            self._gate = (plural, name, threading.Barrier(parties, timeout=10))
            self._through = set()
            self.first_read_rvs = []
            self.conflicts = 0
        try:
            yield
        finally:
            self._gate = None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:  # type: ignore[override]
        gate = self._gate
        gated = False
        if gate is not None and path != "/version":
            _, plural, _, name, _ = self._parse(path)
            gated = (plural, name) == gate[:2]
        try:
            result = super().request(method, path, **kwargs)
        except Conflict:
            if gated:
                with self._gate_lock:
                    self.conflicts += 1
            raise
        if gate is not None and gated and method == "GET":
            with self._gate_lock:
                first = threading.get_ident() not in self._through
                if first:
                    self._through.add(threading.get_ident())
                    self.first_read_rvs.append(result["metadata"]["resourceVersion"])
            if first:
                gate[2].wait()  # BrokenBarrierError after 10 s if fewer threads read it
        return result


def run_concurrently(calls: list[Callable[[], None]]) -> None:
    """Each call on its own thread; re-raises the first exception any of them raised."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        for future in futures:
            future.result(timeout=30)


def validated(kube: FakeKubeClient, llm: FakeLLM, tools: list[str] | None = None) -> None:
    ready_agent_setup(kube, tools)
    ctx = context(kube, llm)
    for name in tools or []:
        create(kube, "Tool", "tools", name, ADD_TOOL)
        validate(ctx, message("Tool", name))
    validate(ctx, message("LLM", "gpt-4o"))
    validate(ctx, message("Agent", "a"))


def test_a_run_does_not_start_on_an_agent_edited_since_it_was_validated() -> None:
    """The Agent's Ready was about its spec before the edit, and the run started on the new spec, which
    its own validation, not yet done, might refuse."""
    from kubechain.kube.client import custom_path

    kube = FakeKubeClient()
    ctx = context(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    validated(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    kube.request("PATCH", custom_path("agents", "default", "a"), body={"spec": {"system": "be verbose"}})
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    prepare(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert (status["phase"], status["statusDetail"]) == (
        "Pending",
        'Waiting for agent "a" to be validated again: its spec changed since it was',
    )
    validate(ctx, message("Agent", "a"))
    prepare(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "ReadyForLLM" and status["contextWindow"][0]["content"] == "be verbose"


def test_a_run_whose_agent_ref_no_agent_can_have_fails_instead_of_waiting() -> None:
    kube = FakeKubeClient()
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "Helper_Agent"}, "userMessage": "hi"})
    prepare(context(kube, FakeLLM(lambda r: LLMResponse(content="x"))), message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "Failed" and "is not a valid Agent name" in status["error"], status
    assert not [path for method, path in kube.requests if method == "GET" and "/agents/" in path]


def test_validation_chain_and_events() -> None:
    kube = FakeKubeClient()
    validated(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    llm = kube.get_raw("llms", "default", "gpt-4o")["status"]
    assert llm["status"] == "Ready" and llm["statusDetail"] == "OpenAI API key validated successfully"
    agent = kube.get_raw("agents", "default", "a")["status"]
    assert agent["ready"] is True and agent["statusDetail"] == "All dependencies validated successfully"
    assert kube.event_reasons("a") == ["Initializing", "ValidationSucceeded"]
    # "From" in kubectl describe, as the original's recorders named it (one per kind)
    sources = {(e["involvedObject"]["kind"], e["source"]["component"]) for e in kube.events()}
    assert sources >= {("Agent", "agent-controller"), ("LLM", "llm-controller")}, sources
    assert {e["reportingComponent"] for e in kube.events()} == {"kubechain-worker"}


def test_missing_secret_is_a_clear_error() -> None:
    kube = FakeKubeClient()
    create(
        kube,
        "LLM",
        "llms",
        "gpt-4o",
        {"provider": "openai", "apiKeyFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}},
    )
    validate(context(kube, FakeLLM(lambda r: LLMResponse())), message("LLM", "gpt-4o"))
    status = kube.get_raw("llms", "default", "gpt-4o")["status"]
    assert status["status"] == "Error" and 'secrets "nope" not found' in status["statusDetail"]
    assert "ValidationFailed" in kube.event_reasons("gpt-4o")


class SecretsForbidden(FakeKubeClient):
    """A worker whose Role does not grant the Secret (403 on GET)."""

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        raise error_for(403, {"reason": "Forbidden", "message": f'secrets "{name}" is forbidden: no grant'})


def test_a_secret_the_worker_may_not_read_is_a_clear_error_not_a_crash() -> None:
    kube = SecretsForbidden()
    llm = FakeLLM(lambda r: LLMResponse(content="x"))
    ready_agent_setup(kube)
    ctx = context(kube, llm, config_cache_ttl_s=0)
    validate(ctx, message("LLM", "gpt-4o"))
    status = kube.get_raw("llms", "default", "gpt-4o")["status"]
    assert status["status"] == "Error" and 'secrets "openai" is forbidden' in status["statusDetail"]
    assert "ValidationFailed" in kube.event_reasons("gpt-4o")
    # a run whose LLM was validated before the grant was narrowed
    kube.patch_status_raw("llms", "default", "gpt-4o", None, {"ready": True, "status": "Ready"})
    validate(ctx, message("Agent", "a"))
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    run = kube.get_raw("taskruns", "default", "r")["status"]
    assert run["phase"] == "Failed" and "is forbidden" in run["statusDetail"]
    assert "SecretFetchFailed" in kube.event_reasons("r") and not llm.requests


def test_a_run_whose_api_key_was_emptied_says_so_with_the_originals_reason() -> None:
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="x"))
    validated(kube, llm)
    kube.request("DELETE", "/api/v1/namespaces/default/secrets/openai")
    kube.add_secret("default", "openai", {"OPENAI_API_KEY": " "})
    ctx = context(kube, llm, config_cache_ttl_s=0)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert "empty API key provided" in status["statusDetail"] and "sk-" not in str(status), status
    assert "EmptyAPIKey" in kube.event_reasons("r") and "SecretFetchFailed" not in kube.event_reasons("r")
    assert not llm.requests, "no request without a key"


def test_concurrent_llm_calls_make_one_request() -> None:
    kube = ReadGateKube()
    gate = threading.Event()

    def slow(request: LLMRequest) -> LLMResponse:
        assert gate.wait(10), "the losing workers did not return while the winner was calling the LLM"
        return LLMResponse(content="done")

    llm = FakeLLM(slow)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    prepare(context(kube, llm), message("TaskRun", "r"))
    # All four read the ReadyForLLM run (the same resourceVersion) before any of them writes its claim.
    with kube.gate("taskruns", "r", 4), ThreadPoolExecutor(max_workers=4) as pool:
        futures = [
            pool.submit(llm_call, context(kube, llm, f"w{i}"), message("TaskRun", "r")) for i in range(4)
        ]
        # Every losing worker returns after its claim conflicts, while the winner waits on the gate.
        deadline = time.monotonic() + 10
        while sum(f.done() for f in futures) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        finished = sum(f.done() for f in futures)
        gate.set()
        for future in futures:
            future.result(timeout=10)
    assert len(llm.requests) == 1
    assert finished == 3, f"{finished} of 4 workers returned before the LLM answered"
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "FinalAnswer" and status["output"] == "done"
    assert kube.event_reasons("r").count("SendingContextWindowToLLM") == 1
    assert kube.event_reasons("r").count("LLMFinalAnswer") == 1
    # and the race was real: all four decided on one version, and the three losing claims conflicted
    assert len(kube.first_read_rvs) == 4 and len(set(kube.first_read_rvs)) == 1
    assert kube.conflicts >= 3


def test_an_answer_cut_off_at_the_context_window_is_kept_with_a_warning_that_says_so() -> None:
    """Anthropic's "model_context_window_exceeded": the Warning is posted, and does not advise raising
    maxTokens."""
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="The answer is", truncated=True, context_window_full=True))
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    assert kube.get_raw("taskruns", "default", "r")["status"]["phase"] == "FinalAnswer"
    (cut,) = [e for e in kube.events() if e["reason"] == "LLMResponseTruncated"]
    assert cut["type"] == "Warning" and "context window" in cut["message"]
    assert "maxTokens" not in cut["message"]


def test_an_answer_the_content_filter_stopped_is_kept_with_a_warning_that_says_so() -> None:
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="The answer is", truncated=True, content_filtered=True))
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "FinalAnswer" and "content filter" in status["statusDetail"], status
    (cut,) = [e for e in kube.events() if e["reason"] == "LLMResponseTruncated"]
    assert cut["type"] == "Warning" and "content filter" in cut["message"]


def test_an_unexpected_provider_error_that_echoes_the_api_key_does_not_carry_it_anywhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An adapter bug or SDK surprise (not an LLMError, so not scrubbed by the client wrapper) went into the
    run's status and Event cut at 300 characters, unredacted: the cut could even leave the key's start,
    which no later redaction recognises. The key is "sk-test" (ready_agent_setup)."""

    def echoing(request: LLMRequest) -> LLMResponse:
        raise RuntimeError("x" * 290 + " key=sk-test and sk-test again")  # the key straddles the cut

    kube = FakeKubeClient()
    llm = FakeLLM(echoing)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    with caplog.at_level(logging.DEBUG):
        llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "ErrorBackoff" and "RuntimeError: xxx" in status["error"], status
    events = [e["message"] for e in kube.events() if e["involvedObject"]["name"] == "r"]
    for where in (status["error"], *events, caplog.text):
        assert "sk-te" not in where, where


def test_a_tool_whose_url_holds_credentials_is_an_error_that_does_not_show_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``https://user:secret@host/path`` was Ready, and each call sent HTTP Basic auth built from the URL;
    the credentials belong in a Secret named by credentialsFrom, and are not repeated where the error goes."""
    kube = FakeKubeClient()
    api = {"url": "https://apiuser:s3cret-Pa55word@api.example/v1/search?format=json", "method": "GET"}
    create(kube, "Tool", "tools", "search", {"name": "search", "execute": {"externalAPI": api}})
    with caplog.at_level(logging.DEBUG):
        validate(context(kube, FakeLLM(lambda r: LLMResponse())), message("Tool", "search"))
    status = kube.get_raw("tools", "default", "search")["status"]
    assert (status["ready"], status["status"]) == (False, "Error"), status
    detail = status["statusDetail"]
    assert "put them in a Secret" in detail and "execute.externalAPI.credentialsFrom" in detail, detail
    events = [e["message"] for e in kube.events() if e["involvedObject"]["name"] == "search"]
    assert kube.event_reasons("search")[-1] == "ValidationFailed"
    for where in (json.dumps(status), *events, caplog.text):
        assert "s3cret" not in where and "apiuser" not in where, where


def test_redelivered_messages_after_the_final_answer_do_nothing() -> None:
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="done"))
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm)
    for _ in range(3):
        prepare(ctx, message("TaskRun", "r"))
        llm_call(ctx, message("TaskRun", "r"))
    assert len(llm.requests) == 1
    assert kube.event_reasons("r") == ["ValidationSucceeded", "SendingContextWindowToLLM", "LLMFinalAnswer"]


def tool_calling_llm(
    arguments: list[str] | list[str | tuple[str, str]], *, truncated: bool = False
) -> FakeLLM:
    """An LLM that calls "add" with each of ``arguments`` (or, for a (name, arguments) pair, the tool of
    that name), and answers with the results once it has them."""
    named = [item if isinstance(item, tuple) else ("add", item) for item in arguments]

    def answer(request: LLMRequest) -> LLMResponse:
        if request.messages[-1].role == "tool":
            return LLMResponse(content="; ".join(m.content for m in request.messages if m.role == "tool"))
        calls = [
            ToolCall(id=f"c{i}", function=ToolCallFunction(name=name, arguments=a))
            for i, (name, a) in enumerate(named)
        ]
        return LLMResponse(tool_calls=calls, truncated=truncated)

    return FakeLLM(answer)


def tool_turn(
    kube: FakeKubeClient, arguments: list[str] | list[str | tuple[str, str]], *, truncated: bool = False
) -> FakeLLM:
    """A run whose first turn calls "add" with each of ``arguments`` (or, for a (name, arguments) pair,
    the tool of that name), and whose second turn answers with the results. ``truncated``: the first turn's
    answer stopped at the token limit."""
    llm = tool_calling_llm(arguments, truncated=truncated)
    validated(kube, llm, ["add"])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "add"})
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    return llm


def toolcall_names(kube: FakeKubeClient) -> list[str]:
    return sorted(name for (_, plural, _, name) in kube.objects if plural == "taskruntoolcalls")


def test_a_turn_is_not_built_from_an_agent_edited_since_its_validation() -> None:
    """A turn took the Agent's spec (its llmRef) and its status (the tools validated) as they stood: after an
    edit not yet validated the status was the old spec's, and a Tool the edit took away was still offered.
    The turn waits, unclaimed, for the validation; a copy of that edit the worker read a moment ago (its
    config cache) is read again, so the turn does not wait out the cache once the validation is done."""
    from kubechain.kube.client import custom_path
    from kubechain.statemachines.routing import dependents

    kube = FakeKubeClient()
    llm = tool_turn(kube, ['{"a": 1, "b": 2}'])
    (name,) = toolcall_names(kube)
    tool_call(context(kube, llm), message("TaskRunToolCall", name))
    prepare(context(kube, llm), message("TaskRun", "r"))  # fans in: ready for the second turn
    kube.request("PATCH", custom_path("agents", "default", "a"), body={"spec": {"tools": []}})
    # a worker whose config cache reads the Agent as edited, before its validation (and keeps it: however
    # slow this test runs, its copies are fresh)
    ctx = context(kube, llm, config_cache_ttl_s=3600)
    llm_call(ctx, message("TaskRun", "r"))
    assert len(llm.requests) == 1, [tool.name for tool in llm.requests[-1].tools]
    status = kube.get_raw("taskruns", "default", "r")["status"]
    detail = 'Waiting for agent "a" to be validated again: its spec changed since it was'
    assert (status["phase"], status["statusDetail"], status.get("claimedBy")) == ("ReadyForLLM", detail, None)
    assert (status["ready"], status["status"]) == (False, "Pending"), "it waits, as a Pending run does"
    assert kube.event_reasons("r")[-1] == "Waiting"
    llm_call(ctx, message("TaskRun", "r"))  # redelivered: nothing more to say
    assert kube.event_reasons("r").count("Waiting") == 1

    validate(ctx, message("Agent", "a"))
    agent = kube.get_raw("agents", "default", "a")
    cache = {"TaskRun": {("default", "r"): kube.get_raw("taskruns", "default", "r")}}
    assert [(w.task, w.name) for w in dependents("Agent", agent, cache)] == [(TaskName.LLM_CALL, "r")]
    llm_call(ctx, message("TaskRun", "r"))
    assert [tool.name for tool in llm.requests[1].tools] == [], "the Agent as edited, validated"
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert (status["phase"], status["output"]) == ("FinalAnswer", "3")


def test_a_run_waiting_for_its_agents_validation_in_backoff_waits_unclaimed_and_ready() -> None:
    """A retry that falls due while the Agent waits for its validation is not made on the edit either; the
    run waits as ReadyForLLM, which the Agent's validation prompts, its attempts counted as before."""
    from kubechain.kube.client import custom_path

    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="x"))
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm, config_cache_ttl_s=0)
    prepare(ctx, message("TaskRun", "r"))
    due = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    backoff = {"phase": "ErrorBackoff", "llmAttempts": 1, "nextAttemptAt": due, "error": "503"}
    kube.patch_status_raw("taskruns", "default", "r", None, backoff)
    kube.request("PATCH", custom_path("agents", "default", "a"), body={"spec": {"system": "be verbose"}})
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert not llm.requests
    assert (status["phase"], status["llmAttempts"], status.get("nextAttemptAt")) == ("ReadyForLLM", 1, None)
    validate(ctx, message("Agent", "a"))
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert len(llm.requests) == 1 and status["phase"] == "FinalAnswer"


def test_a_turn_waiting_for_its_agents_validation_says_it_waits_whether_or_not_it_was_backing_off() -> None:
    """A retry that fell due while the Agent's edit waited for its validation kept the failed attempt's
    status: Error, with that attempt's error, while it only waited (as a Pending run's wait does, the error
    cleared). A turn entered clean waits alike; the claim that ends the wait says the turn is under way."""
    from kubechain.kube.client import custom_path

    kube = FakeKubeClient()
    seen: list[dict[str, Any]] = []  # the run's status as each LLM request was made

    def answer(_request: LLMRequest) -> LLMResponse:
        seen.append(kube.get_raw("taskruns", "default", "r")["status"])
        if len(seen) == 1:
            raise LLMError("LLM request failed: 503", retryable=True)
        return LLMResponse(content="y")

    llm = FakeLLM(answer)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm, config_cache_ttl_s=0)
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    backing_off = kube.get_raw("taskruns", "default", "r")["status"]
    assert (backing_off["phase"], backing_off["status"], backing_off["error"]) == (
        "ErrorBackoff",
        "Error",
        "LLM request failed: 503",
    )
    due = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    kube.patch_status_raw("taskruns", "default", "r", None, {"nextAttemptAt": due})
    kube.request("PATCH", custom_path("agents", "default", "a"), body={"spec": {"system": "be verbose"}})
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    detail = 'Waiting for agent "a" to be validated again: its spec changed since it was'
    waiting = ("ReadyForLLM", False, "Pending", detail, None)
    said = (status["phase"], status["ready"], status["status"], status["statusDetail"], status.get("error"))
    assert said == waiting
    assert status["llmAttempts"] == 1, "the failed attempt still counts"
    validate(ctx, message("Agent", "a"))
    llm_call(ctx, message("TaskRun", "r"))
    assert len(seen) == 2
    assert (seen[1]["phase"], seen[1]["ready"], seen[1]["status"]) == (
        "SendContextWindowToLLM",
        True,
        "Ready",
    )
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert (status["phase"], status["output"]) == ("FinalAnswer", "y")


def test_the_first_turn_is_built_from_the_agent_its_context_window_was_built_from() -> None:
    """A worker that takes the turn it made ready read the Agent twice: fresh for the window (its cached
    copy was not Ready) and from its cache for the turn, an older generation: the window had the edited
    system prompt and the turn the tools of the spec before the edit."""
    from kubechain.kube.client import custom_path

    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="x"))
    validated(kube, llm, ["add"])
    ctx = context(kube, llm, continues_llm=True, config_cache_ttl_s=3600)
    # Its LLM away for a moment: the Agent is Pending, and a run waiting for it leaves it in the cache.
    ready = kube.get_raw("agents", "default", "a")["status"]
    kube.patch_status_raw("agents", "default", "a", None, {"ready": False, "status": "Pending"})
    create(kube, "TaskRun", "taskruns", "early", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    prepare(ctx, message("TaskRun", "early"))
    assert kube.get_raw("taskruns", "default", "early")["status"]["phase"] == "Pending"
    kube.patch_status_raw("agents", "default", "a", None, ready)
    edit = {"spec": {"system": "be verbose", "tools": []}}
    kube.request("PATCH", custom_path("agents", "default", "a"), body=edit)
    validate(ctx, message("Agent", "a"))
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    prepare(ctx, message("TaskRun", "r"))
    (request,) = llm.requests
    assert request.messages[0].content == "be verbose"
    assert [tool.name for tool in request.tools] == [], "the tools of the Agent the window was built from"


def message_seeing_agent(
    kube: FakeKubeClient, kind: str, named: str, agent: str = "a", **seen: Any
) -> ResourceMessage:
    """A message as the watcher sends it about a run (or its tool call): with the hint of the run's Agent
    as the watcher's informer holds it, here as the API server has it now (``seen`` overrides a field)."""
    stored = kube.get_raw("agents", "default", agent)
    hint = {
        "name": agent,
        "uid": stored["metadata"]["uid"],
        "generation": stored["metadata"]["generation"],
        "observed_generation": stored["status"]["observedGeneration"],
        **seen,
    }
    return ResourceMessage.model_validate(
        {"kind": kind, "namespace": "default", "name": named, "agent_seen": hint}
    )


def agent_edited_to_offer_add(kube: FakeKubeClient, llm: FakeLLM) -> None:
    """An Agent without tools, validated; then edited to offer the "add" Tool and validated again."""
    from kubechain.kube.client import custom_path

    kube.request("PATCH", custom_path("agents", "default", "a"), body={"spec": {"tools": [{"name": "add"}]}})
    validate(context(kube, llm), message("Agent", "a"))
    status = kube.get_raw("agents", "default", "a")["status"]
    assert (status["observedGeneration"], [t["name"] for t in status["validTools"]]) == (2, ["add"])


def test_a_run_started_right_after_its_agents_edit_was_validated_takes_its_first_turn_with_the_edit() -> None:
    """A worker that read the Agent a moment before its edit was validated (its config cache) built the
    first turn of a run created right after from that copy: the LLM was not offered the Tool the edit
    added. The watcher's message says which generation of the Agent it has seen validated: a copy older
    than that is read again."""
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="x"))
    validated(kube, llm)
    create(kube, "Tool", "tools", "add", ADD_TOOL)
    validate(context(kube, llm), message("Tool", "add"))
    # A worker that takes the turns it makes ready read the Agent a moment ago (and keeps it: however slow
    # this test runs, its copy is fresh).
    turns = context(kube, llm, continues_llm=True, config_cache_ttl_s=3600)
    assert turns.config_cache.get(Agent, "default", "a").spec.tools == []
    agent_edited_to_offer_add(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    prepare(turns, message_seeing_agent(kube, "TaskRun", "r"))
    assert [tool.name for tool in llm.requests[0].tools] == ["add"], "the Agent as edited and validated"


def test_a_tool_call_of_a_turn_that_offered_an_agents_new_tool_is_granted_by_a_worker_that_read_it_before() -> (
    None
):
    """The README's failure: the turn offered the Tool the edit added, and a tools worker whose copy of
    the Agent was from before the edit refused the call 'not in spec.tools'."""
    kube = FakeKubeClient()
    llm = tool_calling_llm(['{"a": 1, "b": 2}'])
    validated(kube, llm)
    create(kube, "Tool", "tools", "add", ADD_TOOL)
    validate(context(kube, llm), message("Tool", "add"))
    tools = context(kube, llm, config_cache_ttl_s=3600)
    assert tools.config_cache.get(Agent, "default", "a").spec.tools == []
    agent_edited_to_offer_add(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "add"})
    turns = context(kube, llm, continues_llm=True, config_cache_ttl_s=0)
    prepare(turns, message("TaskRun", "r"))
    assert [tool.name for tool in llm.requests[0].tools] == ["add"]
    (name,) = toolcall_names(kube)
    tool_call(tools, message_seeing_agent(kube, "TaskRunToolCall", name))
    call = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert (call["phase"], call.get("result")) == ("Succeeded", "3"), call


def test_a_turn_taken_from_the_queue_right_after_its_agents_edit_was_validated_offers_the_edit() -> None:
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="x"))
    validated(kube, llm)
    create(kube, "Tool", "tools", "add", ADD_TOOL)
    validate(context(kube, llm), message("Tool", "add"))
    turns = context(kube, llm, config_cache_ttl_s=3600)
    assert turns.config_cache.get(Agent, "default", "a").spec.tools == []
    agent_edited_to_offer_add(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    prepare(context(kube, llm, config_cache_ttl_s=0), message("TaskRun", "r"))
    llm_call(turns, message_seeing_agent(kube, "TaskRun", "r"))
    assert [tool.name for tool in llm.requests[0].tools] == ["add"]


def test_the_agent_hint_costs_a_read_only_when_the_cached_copy_is_behind_it_and_is_never_content() -> None:
    """The hello path's turns read the Agent from the config cache: a hint no newer than the cached copy
    (the watcher's informer may be behind the worker) costs no read; one newer (forged, or of another
    Agent by that name) costs one read of the Agent, whose copy as read is what the turn is built from."""
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="x"))
    validated(kube, llm, ["add"])
    turns = context(kube, llm, continues_llm=True, config_cache_ttl_s=3600)
    turns.config_cache.get(Agent, "default", "a")
    agent_path = "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/agents/a"

    def agent_reads() -> int:
        return sum(1 for method, path in kube.requests if (method, path) == ("GET", agent_path))

    for index, seen in enumerate(
        [{}, {"generation": 1, "observed_generation": 0}, {"name": "b", "generation": 7}]
    ):
        create(kube, "TaskRun", "taskruns", f"r{index}", {"agentRef": {"name": "a"}, "userMessage": "hi"})
        hinted = message_seeing_agent(kube, "TaskRun", f"r{index}", **seen)
        before = agent_reads()
        prepare(turns, hinted)
        assert agent_reads() == before, seen
    for index, seen in enumerate(
        [{"generation": 7}, {"observed_generation": 7}, {"uid": "another-agent-by-that-name"}]
    ):
        create(kube, "TaskRun", "taskruns", f"f{index}", {"agentRef": {"name": "a"}, "userMessage": "hi"})
        hinted = message_seeing_agent(kube, "TaskRun", f"f{index}", **seen)
        before = agent_reads()
        prepare(turns, hinted)
        assert agent_reads() == before + 1, seen
    assert all([tool.name for tool in request.tools] == ["add"] for request in llm.requests)
    assert all(
        kube.get_raw("taskruns", "default", name)["status"]["phase"] == "FinalAnswer"
        for name in ("r0", "r1", "r2", "f0", "f1", "f2")
    )


def test_duplicate_tool_call_delivery_executes_once() -> None:
    kube = FakeKubeClient()
    tool_turn(kube, ['{"a": 1, "b": 2}'])
    (name,) = toolcall_names(kube)
    ctx = context(kube, FakeLLM(lambda r: LLMResponse()))
    tool_call(ctx, message("TaskRunToolCall", name))
    tool_call(ctx, message("TaskRunToolCall", name))
    status = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert status["phase"] == "Succeeded" and status["result"] == "3" and status["attempts"] == 1
    assert kube.event_reasons(name) == ["ExecutionSucceeded"]


def test_bad_arguments_and_unknown_tools_are_tool_errors_the_llm_sees() -> None:
    kube = FakeKubeClient()
    llm = tool_turn(kube, ["{not json", '{"a": 1, "b": 0}'])
    ctx = context(kube, llm)
    kube.objects  # noqa: B018 - for the debugger
    for name in toolcall_names(kube):
        tool_call(ctx, message("TaskRunToolCall", name))
    first, second = (kube.get_raw("taskruntoolcalls", "default", n)["status"] for n in toolcall_names(kube))
    assert first["phase"] == "Failed" and first["statusDetail"] == "Invalid arguments JSON"
    assert second["phase"] == "Succeeded" and second["result"] == "1"
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "FinalAnswer"
    assert status["output"].startswith("Error: Invalid arguments JSON")


def test_a_tool_call_cut_off_at_the_token_limit_tells_the_user_and_the_llm_why_its_json_is_invalid() -> None:
    """An answer stopped at maxTokens while it wrote its last call's arguments: that call fails as invalid
    JSON (statusDetail unchanged), its error saying the answer was cut off and what to change; the LLM
    reads the same. The calls before it are whole, and run."""
    kube = FakeKubeClient()
    llm = tool_turn(kube, ['{"a": 1, "b": 2}', '{"a": 1, "b'], truncated=True)
    ctx = context(kube, llm)
    whole, cut = toolcall_names(kube)
    for name in (whole, cut):
        tool_call(ctx, message("TaskRunToolCall", name))
    assert kube.get_raw("taskruntoolcalls", "default", whole)["status"]["result"] == "3"
    status = kube.get_raw("taskruntoolcalls", "default", cut)["status"]
    assert status["phase"] == "Failed" and status["statusDetail"] == "Invalid arguments JSON"
    assert status["error"].startswith("Invalid arguments JSON: Unterminated string")
    assert "cut off at its token limit" in status["error"] and "maxTokens" in status["error"]
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    told = [m.content for m in llm.requests[-1].messages if m.role == "tool"]
    assert told == ["3", f"Error: {status['error']}"]


def test_arguments_nested_deeper_than_json_parses_fail_the_call_not_the_worker() -> None:
    """json raises RecursionError, not ValueError, for them: still the LLM's mistake to hear about."""
    kube = FakeKubeClient()
    tool_turn(kube, ["[" * 100_000])
    (name,) = toolcall_names(kube)
    tool_call(context(kube, FakeLLM(lambda r: LLMResponse())), message("TaskRunToolCall", name))
    status = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert status["phase"] == "Failed" and status["statusDetail"] == "Invalid arguments JSON"
    assert "ExecutionFailed" in kube.event_reasons(name)


def test_nan_and_infinity_in_arguments_are_errors_not_silent_nulls() -> None:
    """Python's json reads NaN and Infinity (JSON has neither); sent on, the tool got null without a word."""
    kube = FakeKubeClient()
    tool_turn(kube, ['{"a": NaN, "b": 1}', '{"a": 1, "b": -Infinity}', '{"a": 1e999, "b": 1}'])
    ctx = context(kube, FakeLLM(lambda r: LLMResponse()))
    names = toolcall_names(kube)
    assert len(names) == 3
    for name in names:
        tool_call(ctx, message("TaskRunToolCall", name))
        status = kube.get_raw("taskruntoolcalls", "default", name)["status"]
        assert status["phase"] == "Failed" and status["statusDetail"] == "Invalid arguments JSON"
        assert "is not a JSON value" in status["error"] or "out of range" in status["error"]


def test_a_run_found_in_checking_tool_calls_is_fanned_in_like_tool_calls_pending() -> None:
    """The original's phase enum has CheckingToolCalls (nothing writes it): such a run must not sit
    there for ever, since neither an event nor a resync would otherwise give it work."""
    kube = FakeKubeClient()
    llm = tool_turn(kube, ['{"a": 1, "b": 2}'])
    ctx = context(kube, llm)
    for name in toolcall_names(kube):
        tool_call(ctx, message("TaskRunToolCall", name))
    kube.patch_status_raw("taskruns", "default", "r", None, {"phase": "CheckingToolCalls"})
    run = kube.get_raw("taskruns", "default", "r")
    (work,) = work_for("TaskRun", run, datetime.now(UTC), 60, resync=True)
    assert work.task == TaskName.PREPARE
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "FinalAnswer" and status["output"] == "3"


def test_builtin_failures_read_as_the_originals_and_never_escape_the_claim(monkeypatch: Any) -> None:
    """Division by zero has the original's two texts; an integer too large for a float is a tool error
    (OverflowError, not ValueError); anything else a tool raises still ends the call with a status, not
    with the claim held until it expires."""
    import workers.tool_call

    kube = FakeKubeClient()
    tool_turn(kube, ['{"a": 1, "b": 2}', '{"a": 1, "b": 0}', '{"a": 1' + "0" * 400 + ', "b": 1}'])
    ctx = context(kube, FakeLLM(lambda r: LLMResponse()), config_cache_ttl_s=0)
    names = toolcall_names(kube)

    def broken(name: str, arguments: dict[str, Any]) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(workers.tool_call, "run_builtin", broken)
    tool_call(ctx, message("TaskRunToolCall", names[0]))
    monkeypatch.undo()
    kube.request(  # the agent's "add" tool now divides
        "PATCH",
        "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/tools/add",
        body={"spec": {"execute": {"builtin": {"name": "divide"}}}},
    )
    for name in names[1:]:
        tool_call(ctx, message("TaskRunToolCall", name))
    unexpected, by_zero, too_large = (kube.get_raw("taskruntoolcalls", "default", n)["status"] for n in names)
    assert (
        unexpected["phase"] == "Failed" and "failed unexpectedly: RuntimeError: a bug" in unexpected["error"]
    )
    assert unexpected.get("claimedBy") is None
    assert by_zero["phase"] == "Failed" and by_zero["error"] == "division by zero"
    assert by_zero["statusDetail"] == "Division by zero"
    assert too_large["phase"] == "Failed" and "must be a number" in too_large["error"]


def test_a_tool_call_whose_run_is_missing_or_finished_ends_instead_of_waiting_forever() -> None:
    kube = FakeKubeClient()
    llm = tool_turn(kube, ['{"a": 1, "b": 2}'])
    ctx = context(kube, llm)
    create(
        kube,
        "TaskRunToolCall",
        "taskruntoolcalls",
        "orphan",
        {"toolCallId": "c9", "taskRunRef": {"name": "nope"}, "toolRef": {"name": "add"}, "arguments": "{}"},
    )
    (sibling,) = [n for n in toolcall_names(kube) if n != "orphan"]
    kube.patch_status_raw("taskruns", "default", "r", None, {"phase": "Failed", "status": "Error"})
    for name in ("orphan", sibling):
        tool_call(ctx, message("TaskRunToolCall", name))
    orphan = kube.get_raw("taskruntoolcalls", "default", "orphan")["status"]
    assert orphan["phase"] == "Failed" and orphan["error"] == 'TaskRun "nope" not found: not run'
    late = kube.get_raw("taskruntoolcalls", "default", sibling)["status"]
    assert late["phase"] == "Failed" and late["error"] == 'TaskRun "r" already finished (Failed): not run'
    assert "result" not in late and kube.event_reasons("orphan") == ["ExecutionFailed"]


def test_concurrent_fan_in_produces_one_transition_and_one_llm_request() -> None:
    kube = ReadGateKube()
    llm = tool_turn(kube, ['{"a": 1, "b": 1}'] * 6)
    ctx = context(kube, llm)
    for name in toolcall_names(kube):
        tool_call(ctx, message("TaskRunToolCall", name))
    # Six deliveries of the fan-in, all reading the run (one resourceVersion) before any of them writes.
    with kube.gate("taskruns", "r", 6):
        run_concurrently(
            [partial(prepare, context(kube, llm, f"w{i}"), message("TaskRun", "r")) for i in range(6)]
        )
    assert kube.event_reasons("r").count("AllToolCallsCompleted") == 1
    assert len(kube.first_read_rvs) == 6 and len(set(kube.first_read_rvs)) == 1, (
        "all six decided on one version"
    )
    assert kube.conflicts >= 5, "the five losing transitions conflicted"
    with kube.gate("taskruns", "r", 6):
        run_concurrently(
            [partial(llm_call, context(kube, llm, f"w{i}"), message("TaskRun", "r")) for i in range(6)]
        )
    assert len(llm.requests) == 2, "one request per turn"
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "FinalAnswer" and status["output"] == "; ".join(["2"] * 6)
    assert len(kube.first_read_rvs) == 6 and len(set(kube.first_read_rvs)) == 1, (
        "all six decided on one version"
    )
    assert kube.conflicts >= 5, "the five losing claims conflicted"


def test_tool_call_of_a_deleted_run_does_not_execute() -> None:
    kube = FakeKubeClient()
    tool_turn(kube, ['{"a": 1, "b": 2}'])
    (name,) = toolcall_names(kube)
    kube.objects.pop(("apis/kubechain.humanlayer.dev/v1alpha1", "taskruns", "default", "r"))
    tool_call(context(kube, FakeLLM(lambda r: LLMResponse())), message("TaskRunToolCall", name))
    status = kube.get_raw("taskruntoolcalls", "default", name)["status"]  # ended, never run
    assert status["phase"] == "Failed" and "result" not in status and "not found" in status["error"]


def create_multiply(kube: FakeKubeClient) -> None:
    """The builtin "multiply" as a Tool (not one the usual test Agent is given)."""
    create(
        kube,
        "Tool",
        "tools",
        "multiply",
        {**ADD_TOOL, "name": "multiply", "execute": {"builtin": {"name": "multiply"}}},
    )


def test_a_tool_the_agent_was_not_given_is_refused() -> None:
    kube = FakeKubeClient()
    create_multiply(kube)
    tool_turn(kube, [("multiply", '{"a": 1, "b": 2}')])  # the LLM calls a tool the Agent was not given
    (name,) = toolcall_names(kube)
    tool_call(context(kube, FakeLLM(lambda r: LLMResponse())), message("TaskRunToolCall", name))
    status = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert status["phase"] == "Failed"
    assert status["error"] == 'tool "multiply" is not available to agent "a" (not in spec.tools)'


def test_a_tool_edited_to_be_invalid_while_its_call_waited_fails_it_with_the_tools_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An externalAPI Tool whose url was removed ran and failed on an AssertionError, its traceback logged
    at ERROR as a bug of ours ("tool 'add' failed unexpectedly: AssertionError: ")."""
    kube = FakeKubeClient()
    tool_turn(kube, ['{"a": 1, "b": 2}'])
    (name,) = toolcall_names(kube)
    raw = kube.get_raw("tools", "default", "add")
    raw["spec"] = {**raw["spec"], "execute": {"externalAPI": {"method": "POST"}}}
    kube.request("PUT", "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/tools/add", body=raw)
    with caplog.at_level(logging.INFO):
        tool_call(context(kube, FakeLLM(lambda r: LLMResponse())), message("TaskRunToolCall", name))
    status = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert status["phase"] == "Failed" and "attempts" not in status, status
    assert status["error"] == 'tool "add" cannot be used: toolType externalAPI needs execute.externalAPI.url'
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown-tool", "ValidationFailed"),
        ("tool-made-invalid", "ValidationFailed"),
        ("tool-not-granted", "ExecutionFailed"),
        ("malformed-arguments", "ExecutionFailed"),
    ],
)
def test_a_tool_call_fails_with_the_originals_event_reason(case: str, reason: str) -> None:
    """The original's Warning on a TaskRunToolCall whose Tool does not exist, or has no valid execution
    configuration, is ValidationFailed ("Failed to get Tool", "unknown tool type"); ExecutionFailed is for a
    tool that was run, or its arguments. Event filters on either reason keep matching."""
    kube = FakeKubeClient()
    if case == "tool-not-granted":
        create_multiply(kube)
    calls: dict[str, tuple[str, str]] = {
        "unknown-tool": ("nope", "{}"),
        "tool-made-invalid": ("add", '{"a": 1, "b": 2}'),
        "tool-not-granted": ("multiply", '{"a": 1, "b": 2}'),
        "malformed-arguments": ("add", '{"a": '),
    }
    tool_turn(kube, [calls[case]])
    if case == "tool-made-invalid":
        raw = kube.get_raw("tools", "default", "add")
        raw["spec"] = {**raw["spec"], "execute": {"externalAPI": {"method": "POST"}}}
        kube.request("PUT", "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/tools/add", body=raw)
    (name,) = toolcall_names(kube)
    tool_call(context(kube, FakeLLM(lambda r: LLMResponse())), message("TaskRunToolCall", name))
    assert kube.get_raw("taskruntoolcalls", "default", name)["status"]["phase"] == "Failed"
    warnings = [
        e["reason"] for e in kube.events() if e["involvedObject"]["name"] == name and e["type"] == "Warning"
    ]
    assert warnings == [reason]


@pytest.mark.parametrize(
    ("call", "why"),
    [
        (("nope", "{}"), 'unknown tool "nope"'),
        (("add", '{"a": '), "Invalid arguments JSON"),
        (("add", '{"a": "x", "b": 1}'), "must be a number"),
    ],
    ids=["unknown-tool", "malformed-arguments", "tool-error"],
)
def test_a_tool_call_that_fails_says_why_in_one_log_line(
    caplog: pytest.LogCaptureFixture, call: tuple[str, str], why: str
) -> None:
    """Bad input is a status, an Event and a log line saying why: the log said only "transition"."""
    kube = FakeKubeClient()
    tool_turn(kube, [call])
    (name,) = toolcall_names(kube)
    with caplog.at_level(logging.INFO):
        tool_call(context(kube, FakeLLM(lambda r: LLMResponse())), message("TaskRunToolCall", name))
    status = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert status["phase"] == "Failed" and why in status["error"], status
    saying_why = [
        r for r in caplog.records if r.levelno >= logging.WARNING and status["error"] in r.getMessage()
    ]
    assert len(saying_why) == 1, caplog.text
    assert name in saying_why[0].getMessage() or getattr(saying_why[0], "resource", None) == name


@pytest.mark.parametrize(
    ("kind", "name", "why"),
    [
        ("Tool", "bad", "unknown tool type"),
        ("LLM", "gpt-4o", "invalid API key"),
        ("Agent", "a", 'failed to get Tool "missing"'),
    ],
)
def test_a_validation_that_fails_says_why_in_one_log_line_without_the_secret(
    caplog: pytest.LogCaptureFixture, kind: str, name: str, why: str
) -> None:
    """An LLM, Tool or Agent in Error had its status and an Event saying why; the log said "transition"."""
    kube = FakeKubeClient()
    refusing = FakeLLM(lambda r: LLMResponse(content="x"))

    def check() -> None:
        raise LLMError("invalid API key (status code: 401)", retryable=False, status_code=401)

    refusing.validate_credentials = check  # type: ignore[method-assign]
    ready_agent_setup(kube, ["missing"])
    create(kube, "Tool", "tools", "bad", {"description": "does nothing"})
    with caplog.at_level(logging.INFO):
        validate(context(kube, refusing), message(kind, name))
    status = kube.get_raw(f"{kind.lower()}s", "default", name)["status"]
    assert status["status"] == "Error" and why in status["statusDetail"], status
    saying_why = [
        r for r in caplog.records if r.levelno == logging.WARNING and status["statusDetail"] in r.getMessage()
    ]
    assert len(saying_why) == 1, caplog.text
    assert (getattr(saying_why[0], "namespace", None), getattr(saying_why[0], "resource", None)) == (
        "default",
        name,
    )
    assert "sk-test" not in caplog.text


class ToolListAfterADeletion:
    """An MCP manager (what validate_mcpserver uses of one) whose server's tool list comes back after the
    MCPServer was deleted, as from a server slow to list its tools."""

    def __init__(self, kube: FakeKubeClient) -> None:
        self.kube = kube

    def check_command(self, server: Any) -> None:
        pass

    def list_tools(self, server: Any) -> list[Any]:
        self.kube.delete("mcpservers", server.namespace, server.name)
        return []


@pytest.mark.parametrize("kind", ["LLM", "MCPServer"])
def test_an_object_deleted_while_its_check_runs_ends_its_validation_quietly(
    caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """The status write of an object deleted meanwhile is answered 404: that ended the task in a
    traceback in the worker's log (and a task counted as an error) for what is nobody's fault."""
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="x"))
    llm.validate_credentials = lambda: kube.delete("llms", "default", "gpt-4o")  # type: ignore[method-assign]
    ready_agent_setup(kube)
    create(kube, "MCPServer", "mcpservers", "slow", {"transport": "http", "url": "http://mcp.invalid/mcp"})
    ctx = context(kube, llm)
    ctx.mcp = ToolListAfterADeletion(kube)
    with caplog.at_level(logging.INFO):
        validate(ctx, message(kind, "gpt-4o" if kind == "LLM" else "slow"))
    assert not kube.events(), "nothing recorded of a deleted object"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert set(VALIDATED_KINDS) == set(VALIDATORS), "each validated kind is looked for when a 404 ends it"


def test_huge_tool_results_are_truncated_and_an_oversized_window_fails_clearly() -> None:
    kube = FakeKubeClient()
    big = "y" * 300_000

    def answer(request: LLMRequest) -> LLMResponse:
        if request.messages[-1].role == "tool":
            return LLMResponse(content=big)  # an answer that cannot fit either
        return LLMResponse(
            tool_calls=[
                ToolCall(id="c1", function=ToolCallFunction(name="add", arguments='{"a": 1, "b": 2}'))
            ]
        )

    llm = FakeLLM(answer)
    validated(kube, llm, ["add"])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "x" * 120_000})
    ctx = context(kube, llm, max_tool_result_bytes=10, max_context_window_bytes=250_000)
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    (name,) = toolcall_names(kube)
    tool_call(ctx, message("TaskRunToolCall", name))
    prepare(ctx, message("TaskRun", "r"))
    window = kube.get_raw("taskruns", "default", "r")["status"]["contextWindow"]
    assert window[-1] == {"role": "tool", "content": "3", "toolCallId": "c1"}
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "Failed"
    assert "over the 250000-byte limit" in status["error"]


def test_a_claim_write_that_timed_out_but_was_applied_is_ours() -> None:
    from kubechain.kube.errors import Unavailable

    class FlakyKube(FakeKubeClient):
        """Applies the first claim PATCH, then answers 504 as an overloaded API server may."""

        failed = False

        def request(self, method: str, path: str, **kwargs: object) -> dict:  # type: ignore[override]
            result = super().request(method, path, **kwargs)  # type: ignore[arg-type]
            body = kwargs.get("body")
            if (
                method in ("PATCH", "PUT")
                and not self.failed
                and isinstance(body, dict)
                and body.get("status", {}).get("phase") == "SendContextWindowToLLM"
            ):
                self.failed = True
                raise Unavailable(504, "Timeout", "Handler timeout")
            return result

    kube = FlakyKube()
    llm = FakeLLM(lambda r: LLMResponse(content="done"))
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    assert kube.failed
    assert kube.get_raw("taskruns", "default", "r")["status"]["phase"] == "FinalAnswer"
    assert len(llm.requests) == 1


def test_a_redelivered_message_runs_the_tool_once() -> None:
    kube = FakeKubeClient()
    tool_turn(kube, ['{"a": 1, "b": 2}'])
    (name,) = toolcall_names(kube)
    first = message("TaskRunToolCall", name).model_copy(
        update={
            "resource_version": kube.get_raw("taskruntoolcalls", "default", name)["metadata"][
                "resourceVersion"
            ]
        }
    )
    ctx = context(kube, FakeLLM(lambda r: LLMResponse()))
    tool_call(ctx, first)
    assert kube.get_raw("taskruntoolcalls", "default", name)["status"]["attempts"] == 1
    tool_call(ctx, first)  # the same message again: the read says done
    status = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert status["phase"] == "Succeeded" and status["attempts"] == 1
    assert kube.event_reasons(name) == ["ExecutionSucceeded"]


def test_a_task_is_ready_before_its_run_exists_and_a_lost_run_is_created_again() -> None:
    kube = FakeKubeClient()
    validated(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    create(kube, "Task", "tasks", "t", {"agentRef": {"name": "a"}, "message": "hi"})
    task_ready_when_run_created: list[bool] = []
    create_resource = kube.create

    def recording_create(resource: Any) -> Any:
        if resource.KIND == "TaskRun":
            task_ready_when_run_created.append(kube.get_raw("tasks", "default", "t")["status"]["ready"])
        return create_resource(resource)

    kube.create = recording_create  # type: ignore[method-assign]
    ctx = context(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    validate(ctx, message("Task", "t"))
    assert task_ready_when_run_created == [True]
    run = kube.get_raw("taskruns", "default", "t-1")
    assert run["metadata"]["labels"] == {"kubechain.humanlayer.dev/task": "t"}
    prepare(ctx, message("TaskRun", "t-1"))
    assert kube.event_reasons("t-1") == ["ValidationSucceeded"], "never a spurious TaskNotReady"
    assert kube.event_reasons("t") == ["Initializing", "ValidationSucceeded", "TaskRunCreated"]

    assert kube.get_raw("tasks", "default", "t")["status"]["taskRunName"] == "t-1", "recorded once created"

    # A worker died between the Ready write and the create (Ready, no run, none recorded): validating the
    # Ready Task again mends it, and the watcher's resync asks for that.
    kube.delete("taskruns", "default", "t-1")
    kube.patch_status_raw("tasks", "default", "t", None, {"taskRunName": None})
    caches = {"Task": {("default", "t"): kube.get_raw("tasks", "default", "t")}}
    assert [work.name for work in tasks_missing_their_run(caches)] == ["t"]
    validate(ctx, message("Task", "t"))
    assert kube.get_raw("taskruns", "default", "t-1")["spec"] == {"taskRef": {"name": "t"}}
    assert task_ready_when_run_created == [True, True]
    validate(ctx, message("Task", "t"))  # a duplicate message: AlreadyExists, no second event
    assert kube.event_reasons("t").count("TaskRunCreated") == 2

    # A run deleted once it was recorded was deleted by someone: it is not created (and run) again.
    kube.delete("taskruns", "default", "t-1")
    caches = {"Task": {("default", "t"): kube.get_raw("tasks", "default", "t")}}
    assert tasks_missing_their_run(caches) == [], "the resync does not ask"
    validate(ctx, message("Task", "t"))
    assert not kube.list_raw("taskruns", "default")[0]
    assert kube.event_reasons("t").count("TaskRunCreated") == 2

    # A Task being deleted (its run went first) is left alone, recorded or not.
    kube.patch_status_raw("tasks", "default", "t", None, {"taskRunName": None})
    kube.patch_metadata("tasks", "default", "t", {"deletionTimestamp": "2026-12-01T00:00:00Z"})
    validate(ctx, message("Task", "t"))
    assert not kube.list_raw("taskruns", "default")[0]


def test_a_tasks_run_keeps_the_agent_it_started_with_when_the_tasks_agent_ref_is_edited() -> None:
    """Each turn (and each tool call's grant check) read the Task's agentRef again: a Task edited mid-run
    took the run's later turns to another Agent, with its LLM, tools and grants, on a context window begun
    with the first one's system prompt. The run records the Agent it started with and keeps it."""
    from kubechain.kube.client import custom_path

    kube = FakeKubeClient()
    llm = tool_calling_llm(['{"a": 1, "b": 2}'])
    validated(kube, llm, ["add"])
    create(kube, "Agent", "agents", "b", {"llmRef": {"name": "gpt-4o"}, "system": "another agent"})
    ctx = context(kube, llm, config_cache_ttl_s=0)  # every read fresh: nothing stale hides the switch
    validate(ctx, message("Agent", "b"))
    create(kube, "Task", "tasks", "t", {"agentRef": {"name": "a"}, "message": "add"})
    validate(ctx, message("Task", "t"))
    prepare(ctx, message("TaskRun", "t-1"))
    assert kube.get_raw("taskruns", "default", "t-1")["status"]["agentName"] == "a"
    llm_call(ctx, message("TaskRun", "t-1"))
    assert [tool.name for tool in llm.requests[0].tools] == ["add"]

    kube.request("PATCH", custom_path("tasks", "default", "t"), body={"spec": {"agentRef": {"name": "b"}}})
    validate(ctx, message("Task", "t"))
    (name,) = toolcall_names(kube)
    tool_call(ctx, message("TaskRunToolCall", name))
    call = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert (call["phase"], call.get("result")) == ("Succeeded", "3"), call
    prepare(ctx, message("TaskRun", "t-1"))
    llm_call(ctx, message("TaskRun", "t-1"))
    assert [tool.name for tool in llm.requests[1].tools] == ["add"], "agent a's tools still"
    status = kube.get_raw("taskruns", "default", "t-1")["status"]
    assert (status["phase"], status["output"], status["agentName"]) == ("FinalAnswer", "3", "a")


def test_a_task_shows_the_answer_of_its_run_once_the_run_finishes() -> None:
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="the answer"))
    validated(kube, llm)
    create(kube, "Task", "tasks", "t", {"agentRef": {"name": "a"}, "message": "hi"})
    ctx = context(kube, llm)
    validate(ctx, message("Task", "t"))
    assert "output" not in kube.get_raw("tasks", "default", "t")["status"]
    prepare(ctx, message("TaskRun", "t-1"))
    llm_call(ctx, message("TaskRun", "t-1"))
    finished = kube.get_raw("taskruns", "default", "t-1")
    assert finished["status"]["phase"] == "FinalAnswer"
    (work,) = work_for("TaskRun", finished, datetime.now(UTC), 60)
    assert (work.task, work.kind, work.name) == (TaskName.VALIDATE, "Task", "t"), "the watcher asks"
    assert work_for("TaskRun", finished, datetime.now(UTC), 60, resync=True) == []
    validate(ctx, message("Task", "t"))
    task = kube.get_raw("tasks", "default", "t")
    assert task["status"]["output"] == "the answer" and task["status"]["ready"] is True
    before = task["metadata"]["resourceVersion"]
    validate(ctx, message("Task", "t"))
    assert kube.get_raw("tasks", "default", "t")["metadata"]["resourceVersion"] == before, "written once"
    # Its run deleted: the Task keeps showing the answer, and is not run again.
    kube.delete("taskruns", "default", "t-1")
    validate(ctx, message("Task", "t"))
    assert not kube.list_raw("taskruns", "default")[0]
    assert kube.get_raw("tasks", "default", "t")["status"]["output"] == "the answer"


def test_an_llm_client_that_raises_unexpectedly_ends_in_a_status_not_a_held_claim() -> None:
    kube = FakeKubeClient()

    def broken(request: LLMRequest) -> LLMResponse:
        raise TypeError("'NoneType' object is not iterable")

    llm = FakeLLM(broken)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "ErrorBackoff" and not status.get("claimedBy")
    assert "TypeError: 'NoneType' object is not iterable" in status["error"]
    assert "LLMRequestFailed" in kube.event_reasons("r") and len(llm.requests) == 1


def test_an_agent_going_not_ready_mid_run_neither_parks_the_run_nor_resets_its_context_window() -> None:
    """The original moved a run to Pending when its Agent went not ready, and the next prepare rebuilt the
    window from scratch (system + user), losing the turns so far (known bug 4)."""
    kube = FakeKubeClient()
    llm = tool_turn(kube, ['{"a": 1, "b": 2}'])
    ctx = context(kube, llm, config_cache_ttl_s=0)
    pending = kube.get_raw("taskruns", "default", "r")["status"]
    assert pending["phase"] == "ToolCallsPending" and len(pending["contextWindow"]) == 3
    agent_ready = kube.get_raw("agents", "default", "a")["status"]
    kube.patch_status_raw(
        "agents", "default", "a", None, {"ready": False, "status": "Pending", "statusDetail": "LLM not ready"}
    )

    prepare(ctx, message("TaskRun", "r"))
    assert kube.get_raw("taskruns", "default", "r")["status"] == pending

    (name,) = toolcall_names(kube)
    tool_call(ctx, message("TaskRunToolCall", name))
    prepare(ctx, message("TaskRun", "r"))  # fans in: system, user, assistant, tool
    ready = kube.get_raw("taskruns", "default", "r")["status"]
    assert ready["phase"] == "ReadyForLLM" and len(ready["contextWindow"]) == 4
    assert ready["contextWindow"][-1] == {"role": "tool", "content": "3", "toolCallId": "c0"}

    for _ in range(2):  # redelivered while the Agent is not ready
        prepare(ctx, message("TaskRun", "r"))
        assert kube.get_raw("taskruns", "default", "r")["status"] == ready
    run = TaskRun.from_wire(kube.get_raw("taskruns", "default", "r"))
    not_ready = Agent.from_wire(kube.get_raw("agents", "default", "a"))
    assert plan_initial_context(run, None, False, not_ready, datetime.now(UTC)) is None, (
        "nor would the machine"
    )
    kube.patch_status_raw("agents", "default", "a", None, agent_ready)
    prepare(ctx, message("TaskRun", "r"))  # and once it is ready again
    assert kube.get_raw("taskruns", "default", "r")["status"] == ready
    assert kube.event_reasons("r").count("ValidationSucceeded") == 1
    assert "Waiting" not in kube.event_reasons("r")

    llm_call(ctx, message("TaskRun", "r"))
    assert [m.role for m in llm.requests[-1].messages] == ["system", "user", "assistant", "tool"]
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "FinalAnswer" and status["output"] == "3"


def test_a_tool_whose_spec_name_differs_from_its_resource_name_is_offered_by_spec_name_and_runs() -> None:
    """The original resolved a called function only when spec.name == metadata.name (known bug 5)."""
    kube = FakeKubeClient()

    def answer(request: LLMRequest) -> LLMResponse:
        if request.messages[-1].role == "tool":
            return LLMResponse(content=f"sum is {request.messages[-1].content}")
        (offered,) = request.tools
        call = ToolCall(id="c1", function=ToolCallFunction(name=offered.name, arguments='{"a": 2, "b": 5}'))
        return LLMResponse(tool_calls=[call])

    llm = FakeLLM(answer)
    ready_agent_setup(kube, ["adder"])  # the Agent grants the Tool by its resource name
    ctx = context(kube, llm, config_cache_ttl_s=0)
    create(kube, "Tool", "tools", "adder", {**ADD_TOOL, "name": "add_numbers"})
    for kind, name in (("Tool", "adder"), ("LLM", "gpt-4o"), ("Agent", "a")):
        validate(ctx, message(kind, name))
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "2 + 5?"})
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    assert [tool.name for tool in llm.requests[0].tools] == ["add_numbers"], "the LLM sees spec.name"

    (name,) = toolcall_names(kube)
    assert kube.get_raw("taskruntoolcalls", "default", name)["spec"]["toolRef"] == {"name": "add_numbers"}
    tool_call(ctx, message("TaskRunToolCall", name))
    status = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert status["phase"] == "Succeeded" and status["result"] == "7", status
    executed = [e["message"] for e in kube.events() if e["involvedObject"]["name"] == name]
    assert executed == ['Tool "adder" executed successfully'], "resolved to the Tool resource adder"

    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    run = kube.get_raw("taskruns", "default", "r")["status"]
    assert run["contextWindow"][-2] == {"role": "tool", "content": "7", "toolCallId": "c1"}
    assert run["phase"] == "FinalAnswer" and run["output"] == "sum is 7"


def test_a_call_runs_the_agents_own_tool_offered_under_that_name_not_a_namesake() -> None:
    """The Agent has Tool "calc", offered as "add" (its spec.name); another Tool is named "add"."""

    def answer(request: LLMRequest) -> LLMResponse:
        if request.messages[-1].role == "tool":
            return LLMResponse(content=request.messages[-1].content)
        return LLMResponse(
            tool_calls=[
                ToolCall(id="c0", function=ToolCallFunction(name="add", arguments='{"a": 2, "b": 3}'))
            ]
        )

    kube = FakeKubeClient()
    llm = FakeLLM(answer)
    validated(kube, llm)
    ctx = context(kube, llm)
    create(kube, "Tool", "tools", "calc", ADD_TOOL)
    create(kube, "Tool", "tools", "add", ADD_TOOL | {"name": "sum"})
    for name in ("calc", "add"):
        validate(ctx, message("Tool", name))
    kube.request(
        "PATCH",
        "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/agents/a",
        body={"spec": {"tools": [{"name": "calc"}]}},
    )
    validate(ctx, message("Agent", "a"))
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "add"})
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    (name,) = toolcall_names(kube)
    tool_call(ctx, message("TaskRunToolCall", name))
    status = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert (status["phase"], status.get("result")) == ("Succeeded", "5"), status


def test_a_task_with_a_long_name_gets_a_run_with_a_valid_name() -> None:
    kube = FakeKubeClient()
    validated(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    name = "t" * 252
    create(kube, "Task", "tasks", name, {"agentRef": {"name": "a"}, "message": "hi"})
    validate(context(kube, FakeLLM(lambda r: LLMResponse(content="x"))), message("Task", name))
    ((run_name, run),) = [(n, o) for (_, plural, _, n), o in kube.objects.items() if plural == "taskruns"]
    assert len(run_name) <= 253 and run["spec"] == {"taskRef": {"name": name}}
    assert kube.get_raw("tasks", "default", name)["status"]["ready"] is True


class QuotaKube(FakeKubeClient):
    """Refuses to create TaskRuns (403, as a ResourceQuota does) while ``full``."""

    full = True

    def request(self, method: str, path: str, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.full and method == "POST" and path.endswith("/taskruns"):
            raise error_for(
                403, {"reason": "Forbidden", "message": 'taskruns "t-1" is forbidden: exceeded quota: runs'}
            )
        return super().request(method, path, **kwargs)


def test_a_task_whose_run_is_refused_is_an_error_until_the_run_can_be_created() -> None:
    kube = QuotaKube()
    validated(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    create(kube, "Task", "tasks", "t", {"agentRef": {"name": "a"}, "message": "hi"})
    ctx = context(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    validate(ctx, message("Task", "t"))
    status = kube.get_raw("tasks", "default", "t")["status"]
    assert (status["ready"], status["status"]) == (False, "Error")
    assert (
        "cannot create TaskRun t-1" in status["statusDetail"] and "exceeded quota" in status["statusDetail"]
    )

    version = kube.get_raw("tasks", "default", "t")["metadata"]["resourceVersion"]
    validate(ctx, message("Task", "t"))  # a resync while the quota is still full: no flapping to Ready
    assert kube.get_raw("tasks", "default", "t")["metadata"]["resourceVersion"] == version

    kube.full = False
    validate(ctx, message("Task", "t"))
    assert kube.get_raw("tasks", "default", "t")["status"]["ready"] is True
    assert kube.get_raw("taskruns", "default", "t-1")["spec"] == {"taskRef": {"name": "t"}}


@pytest.mark.parametrize("refusal", ["reworded", "name-held-by-another-object"])
def test_a_task_whose_run_cannot_be_created_stays_in_error_at_each_resync_whatever_its_words(
    monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    """A refused run was recognised by the start of the Task's statusDetail ("cannot create TaskRun t-1:"):
    reworded, the Task flapped to Ready (and back to Error) at every resync, as it did when the run's name
    was held by an object not the Task's (a message of other words). It is recognised by the Task's state:
    in Error while its Agent is found, which its own validation never gives."""
    import workers.transitions as transitions

    kube = QuotaKube()
    validated(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    if refusal == "reworded":
        monkeypatch.setattr(
            transitions,
            "child_rejected_message",
            lambda kind, name, *_, **__: f"the API server will not store {kind} {name}",
        )
    else:
        kube.full = False
        create(kube, "TaskRun", "taskruns", "t-1", {"taskRef": {"name": "someone-elses"}})
    create(kube, "Task", "tasks", "t", {"agentRef": {"name": "a"}, "message": "hi"})
    ctx = context(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    validate(ctx, message("Task", "t"))
    status = kube.get_raw("tasks", "default", "t")["status"]
    assert (status["ready"], status["status"]) == (False, "Error")
    detail = status["statusDetail"]

    version = kube.get_raw("tasks", "default", "t")["metadata"]["resourceVersion"]
    validate(ctx, message("Task", "t"))  # a resync while it still cannot be created: no flapping to Ready
    assert kube.get_raw("tasks", "default", "t")["metadata"]["resourceVersion"] == version
    assert kube.get_raw("tasks", "default", "t")["status"]["statusDetail"] == detail

    kube.full = False
    if refusal != "reworded":
        kube.delete("taskruns", "default", "t-1")  # the object that held its name
    validate(ctx, message("Task", "t"))
    assert kube.get_raw("tasks", "default", "t")["status"]["ready"] is True
    assert kube.get_raw("taskruns", "default", "t-1")["spec"] == {"taskRef": {"name": "t"}}


def test_calls_failed_before_they_run_are_counted_with_a_bounded_tool_label() -> None:
    from prometheus_client import REGISTRY

    def count(tool: str, outcome: str) -> float:
        return (
            REGISTRY.get_sample_value("kubechain_tool_calls_total", {"tool": tool, "outcome": outcome}) or 0.0
        )

    kube = FakeKubeClient()
    llm = tool_turn(kube, [("made_up_tool_4711", "{}"), "{not json"])
    ctx = context(kube, llm)
    before = count("unknown", "rejected"), count("add", "invalid_arguments")
    for name in toolcall_names(kube):
        tool_call(ctx, message("TaskRunToolCall", name))
        tool_call(ctx, message("TaskRunToolCall", name))  # redelivered: counted once
    assert (count("unknown", "rejected") - before[0], count("add", "invalid_arguments") - before[1]) == (1, 1)
    assert count("made_up_tool_4711", "rejected") == 0


def test_an_api_key_with_a_character_no_header_can_carry_is_an_llm_error_not_a_crash() -> None:
    kube = FakeKubeClient()
    llm = FakeLLM(lambda r: LLMResponse(content="x"))
    ready_agent_setup(kube)
    kube.request("DELETE", "/api/v1/namespaces/default/secrets/openai")
    kube.add_secret("default", "openai", {"OPENAI_API_KEY": "sk-abc\u2026def"})
    ctx = context(kube, llm, config_cache_ttl_s=0)
    validate(ctx, message("LLM", "gpt-4o"))
    status = kube.get_raw("llms", "default", "gpt-4o")["status"]
    assert status["status"] == "Error" and "character 7" in status["statusDetail"], status
    assert "sk-abc" not in str(status) and "ValidationFailed" in kube.event_reasons("gpt-4o")


@pytest.mark.parametrize("cut_short", [True, False], ids=["cut-short-by-its-claim", "the-llms-own-timeout"])
def test_a_call_its_claim_cut_short_is_retried_saying_so(
    cut_short: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The providers mark a timeout their call's deadline (its claim's time left) caused: the run backs off
    and retries, saying why; both count as an attempt (each retry is a paid call)."""
    kube = FakeKubeClient()

    def times_out(request: LLMRequest) -> LLMResponse:
        raise LLMError("LLM request timed out", retryable=True, cut_short=cut_short)

    llm = FakeLLM(times_out)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    with caplog.at_level(logging.WARNING, logger="workers.llm_call"):
        llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "ErrorBackoff" and status["error"] == "LLM request timed out"
    assert status["llmAttempts"] == 1
    said_so = "cut short to end within its claim"
    assert (said_so in status["statusDetail"]) == cut_short, status["statusDetail"]
    assert any(said_so in r.getMessage() for r in caplog.records) == cut_short


def test_a_backoff_retry_that_arrives_early_comes_back_when_due_not_at_the_next_resync() -> None:
    """The watcher schedules a retry by its clock; a worker whose clock is a little behind finds it early."""
    kube = FakeKubeClient()
    answers = iter([LLMError("upstream 503", retryable=True), LLMResponse(content="done")])

    def flaky(request: LLMRequest) -> LLMResponse:
        answer = next(answers)
        if isinstance(answer, LLMError):
            raise answer
        return answer

    llm = FakeLLM(flaky)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    scheduled: list[tuple[TaskName, str, float]] = []
    ctx = context(kube, llm)
    ctx.enqueue = lambda task, msg, delay=0.0: scheduled.append((task, msg.name, delay))
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "ErrorBackoff"
    due = datetime.fromisoformat(status["nextAttemptAt"].replace("Z", "+00:00"))
    ctx.clock = lambda: due - timedelta(seconds=0.2)  # this worker's clock: 200 ms behind the watcher's
    llm_call(ctx, message("TaskRun", "r"))
    assert len(llm.requests) == 1, "not due yet by this worker's clock"
    assert scheduled == [(TaskName.LLM_CALL, "r", 0.5)], scheduled
    ctx.clock = lambda: due + timedelta(seconds=0.4)
    llm_call(ctx, message("TaskRun", "r"))
    assert kube.get_raw("taskruns", "default", "r")["status"]["phase"] == "FinalAnswer"


def test_an_anthropic_llm_with_a_key_the_provider_refuses_is_an_error_not_ready() -> None:
    kube = FakeKubeClient()
    refused = FakeLLM(lambda r: LLMResponse(content="x"))

    def check() -> None:
        raise LLMError("invalid API key (status code: 401)", retryable=False, status_code=401)

    refused.validate_credentials = check  # type: ignore[method-assign]
    kube.add_secret("default", "anthropic", {"ANTHROPIC_API_KEY": "sk-ant-revoked"})
    create(kube, "LLM", "llms", "claude", {"provider": "anthropic"})
    validate(context(kube, refused), message("LLM", "claude"))
    status = kube.get_raw("llms", "default", "claude")["status"]
    assert status["status"] == "Error", status
    assert status["statusDetail"] == "Anthropic API key validation failed: invalid API key (status code: 401)"
    assert "sk-ant" not in str(status)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        *MALFORMED_URLS,
        (
            "https://apiuser:s3cret-Pa55@llm.example/v1",
            'holds credentials ("user:password@" before its host)',
        ),
        ("http://sk-proj-0123456789@llm.example/v1", 'holds credentials ("user:password@" before its host)'),
    ],
)
def test_an_llm_whose_base_url_is_malformed_is_an_error_saying_what_to_fix(
    caplog: pytest.LogCaptureFixture, url: str, said: str
) -> None:
    """A baseUrl no client can send to failed its key check as "API key validation failed: could not
    reach the LLM endpoint: Request URL is missing an 'http://' or 'https://' protocol" (blaming the key),
    or as a DNS error; one with userinfo was Ready (a client makes Basic auth of it, over the API key's
    Bearer, and whoever reads LLMs reads the password). Said without quoting the URL; the key is not
    checked against it."""
    kube = FakeKubeClient()
    checker = FakeLLM(lambda r: LLMResponse(content="x"))
    checked: list[str] = []
    checker.validate_credentials = lambda: checked.append("checked")  # type: ignore[method-assign]
    kube.add_secret("default", "openai", {"OPENAI_API_KEY": "sk-test"})
    create(kube, "LLM", "llms", "gpt", {"provider": "openai", "parameters": {"model": "m", "baseUrl": url}})
    with caplog.at_level(logging.WARNING):
        validate(context(kube, checker), message("LLM", "gpt"))
    status = kube.get_raw("llms", "default", "gpt")["status"]
    assert (status["ready"], status["status"]) == (False, "Error"), status
    assert status["statusDetail"].startswith(f"spec.parameters.baseUrl {said}"), status
    assert kube.event_reasons("gpt")[-1] == "ValidationFailed"
    assert status["statusDetail"] in caplog.text
    assert checked == []
    events = [e["message"] for e in kube.events() if e["involvedObject"]["name"] == "gpt"]
    for where in (json.dumps(status), *events, caplog.text):
        assert "s3cret" not in where and "apiuser" not in where and "sk-proj" not in where, where


@pytest.mark.parametrize("url", [*WELL_FORMED_URLS, ""])
def test_an_llm_whose_base_url_a_client_can_send_to_is_checked_and_ready(url: str) -> None:
    kube = FakeKubeClient()
    kube.add_secret("default", "openai", {"OPENAI_API_KEY": "sk-test"})
    create(kube, "LLM", "llms", "gpt", {"provider": "openai", "parameters": {"model": "m", "baseUrl": url}})
    validate(context(kube, FakeLLM(lambda r: LLMResponse(content="x"))), message("LLM", "gpt"))
    assert kube.get_raw("llms", "default", "gpt")["status"]["status"] == "Ready"


def _llm_key_check(kube: FakeKubeClient, failure: LLMError | None, ready_before: bool) -> dict[str, Any]:
    checker = FakeLLM(lambda r: LLMResponse(content="x"))

    def check() -> None:
        if failure is not None:
            raise failure

    checker.validate_credentials = check  # type: ignore[method-assign]
    kube.add_secret("default", "anthropic", {"ANTHROPIC_API_KEY": "sk-ant-1"})
    create(kube, "LLM", "llms", "claude", {"provider": "anthropic"})
    if ready_before:
        # as its validation leaves it: Ready for the generation it checked
        ready = {"ready": True, "status": "Ready", "observedGeneration": 1}
        kube.patch_status_raw("llms", "default", "claude", None, ready)
    validate(context(kube, checker), message("LLM", "claude"))
    return dict(kube.get_raw("llms", "default", "claude")["status"])


def test_a_provider_overloaded_for_a_moment_leaves_a_working_llm_ready() -> None:
    overloaded = LLMError("endpoint answered status 529", retryable=True, status_code=529)
    assert _llm_key_check(FakeKubeClient(), overloaded, ready_before=True)["status"] == "Ready"
    first_check = _llm_key_check(FakeKubeClient(), overloaded, ready_before=False)
    assert first_check["status"] == "Error" and "529" in first_check["statusDetail"]


def test_a_ready_llm_edited_to_an_endpoint_that_does_not_answer_is_not_ready() -> None:
    """Only the spec that was checked is known to work: a Ready LLM whose spec was edited (a baseUrl
    nothing listens on) kept its Ready status, for the old spec, as if the new one met an outage."""
    from kubechain.kube.client import custom_path

    kube = FakeKubeClient()
    _llm_key_check(kube, None, ready_before=False)
    edited = {"spec": {"parameters": {"baseUrl": "http://127.0.0.1:9/v1"}}}
    kube.request("PATCH", custom_path("llms", "default", "claude"), body=edited)
    unreachable = LLMError(
        "LLM request failed: Connection refused (http://127.0.0.1:9/v1/models)", retryable=True
    )
    checker = FakeLLM(lambda r: LLMResponse(content="x"))

    def check() -> None:
        raise unreachable

    checker.validate_credentials = check  # type: ignore[method-assign]
    validate(context(kube, checker), message("LLM", "claude"))
    status = kube.get_raw("llms", "default", "claude")["status"]
    assert (status["status"], status["ready"], status["observedGeneration"]) == ("Error", False, 2), status
    assert status["statusDetail"] == f"Anthropic API key validation failed: {unreachable}"


def test_a_key_check_that_meets_a_rate_limit_leaves_a_working_llm_ready() -> None:
    """A 429 (or 408) from the model list took a working LLM, and every Agent on it, out of service."""
    from kubechain.llm.base import credentials_error

    for status in (429, 408):
        limited = credentials_error(status, RuntimeError("slow down"), api_key="sk-test")
        assert limited.retryable
        assert _llm_key_check(FakeKubeClient(), limited, ready_before=True)["status"] == "Ready"
    assert not credentials_error(403, RuntimeError("forbidden"), api_key="sk-test").retryable


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_key_echoed_past_the_cut_of_a_key_checks_answer_leaves_none_of_it(provider: str) -> None:
    """A gateway echoing the Authorization header in a 403 "insufficient permissions" body: the message was
    cut at 300 characters before the key was cut out, so the key's first characters, no longer the key,
    were left in the LLM's statusDetail and its Event."""
    from kubechain.llm.base import LLMClientFactory
    from tests.unit.http_stub import StubAnswer, StubHTTPServer

    key = "sk-proj-AbCdEf0123456789XyZ"
    said = (
        "You have insufficient permissions for this operation. "
        + "x" * 210  # the 300-character cut falls inside the key
        + f" (Authorization: Bearer {key})"
    )
    body = json.dumps({"error": {"message": said, "type": "invalid_request_error"}}).encode()
    with StubHTTPServer(lambda _: StubAnswer(403, body, {"Content-Type": "application/json"})) as server:
        kube = FakeKubeClient()
        kube.add_secret("default", "llm-key", {"key": key})
        spec = {
            "provider": provider,
            "parameters": {"baseUrl": server.url + ("/v1" if provider == "openai" else "")},
            "apiKeyFrom": {"secretKeyRef": {"name": "llm-key", "key": "key"}},
        }
        create(kube, "LLM", "llms", "l", spec)
        ctx = context(kube, FakeLLM(lambda _: LLMResponse()))
        ctx.llms = LLMClientFactory(10)
        validate(ctx, message("LLM", "l"))
    status = kube.get_raw("llms", "default", "l")["status"]
    assert "insufficient permissions" in status["statusDetail"], status
    written = [status["statusDetail"], *(event["message"] for event in kube.events())]
    assert not any(key[:7] in text for text in written), written


def test_an_endpoint_without_a_model_list_is_ready_unchecked() -> None:
    no_list = LLMError("endpoint answered status 404", retryable=False, status_code=404)
    status = _llm_key_check(FakeKubeClient(), no_list, ready_before=False)
    assert status["ready"] is True and "not checked" in status["statusDetail"]


def test_a_base_url_the_http_library_cannot_parse_is_an_llm_error_not_a_crash() -> None:
    from kubechain.llm.base import LLMClientFactory

    kube = FakeKubeClient()
    kube.add_secret("default", "openai", {"OPENAI_API_KEY": "sk-1"})
    create(kube, "LLM", "llms", "local", {"provider": "openai", "parameters": {"baseUrl": "http://[::1"}})
    ctx = context(kube, FakeLLM(lambda r: LLMResponse()))
    ctx.llms = LLMClientFactory(10)
    validate(ctx, message("LLM", "local"))
    status = kube.get_raw("llms", "default", "local")["status"]
    assert (status["status"], status["statusDetail"]) == (
        "Error",
        'spec.parameters.baseUrl has an IPv6 host without its closing "]"',
    )


@pytest.mark.parametrize(
    ("base_url", "shown"),
    [
        (
            "https://svc:pa55word-0123456789@llm.example:port/v1?api_key=qk-0123456789abcdef",
            "invalid LLM endpoint 'https://llm.example:port/v1?api_key=***': Invalid port: 'port'",
        ),
        (
            "http://svc:pa55word-0123456789@[::1/v1?api_key=qk-0123456789abcdef",
            "invalid LLM endpoint 'http://[::1'",
        ),
    ],
)
def test_a_base_url_that_cannot_be_used_is_named_without_its_credentials(base_url: str, shown: str) -> None:
    """The error becomes the LLM's status and a Warning Event."""
    from kubechain.llm.base import LLMClientFactory
    from kubechain.models import LLM

    llm = LLM.from_wire(
        {
            "metadata": {"name": "l", "namespace": "default"},
            "spec": {"provider": "openai", "parameters": {"baseUrl": base_url}},
        }
    )
    with pytest.raises(LLMError) as failed:
        LLMClientFactory(10).for_llm(llm, "sk-1")
    said = str(failed.value)
    assert said.startswith(shown), said
    assert "pa55word" not in said and "qk-0123" not in said, said


def test_llm_clients_are_reused_per_endpoint_and_key_and_bounded_in_number() -> None:
    """Every rotated key or new baseUrl used to leave its client, and its connection pool, behind for the
    worker's life."""
    from kubechain.llm.base import MAX_CACHED_CLIENTS, LLMClientFactory
    from kubechain.models import LLM

    built: list[str] = []

    def build(_llm: Any, key: str, _timeout: float, _base: str | None) -> Any:
        built.append(key)
        return object()

    factory = LLMClientFactory(10, builders={"openai": build})
    llm = LLM.from_wire({"metadata": {"name": "l", "namespace": "default"}, "spec": {"provider": "openai"}})
    first = factory.for_llm(llm, "key-0")
    assert factory.for_llm(llm, "key-0") is first and built == ["key-0"], "reused"
    for index in range(1, MAX_CACHED_CLIENTS + 10):
        factory.for_llm(llm, f"key-{index}")
        factory.for_llm(llm, "key-0")  # in use all along: never the one dropped
    assert len(factory._cache) == MAX_CACHED_CLIENTS
    assert factory.for_llm(llm, "key-0") is first
    factory.for_llm(llm, "key-1")
    assert built.count("key-1") == 2, "a client dropped long ago is built again when needed"


def test_kubechain_ups_scripted_llm_answers_only_the_llms_whose_key_says_scripted() -> None:
    """Whether `up` answered with its scripted server used to depend on OPENAI_API_KEY in up's own
    terminal, not on the key in the Secret the user made (in another terminal)."""
    from kubechain.llm.base import LLMClientFactory
    from kubechain.models import LLM

    endpoints: list[tuple[str, str | None]] = []

    def build(_llm: Any, key: str, _timeout: float, base: str | None) -> Any:
        endpoints.append((key, base))
        return object()

    def llm(provider: str = "openai", base_url: str | None = None) -> LLM:
        spec: dict[str, Any] = {"provider": provider}
        if base_url:
            spec["parameters"] = {"baseUrl": base_url}
        return LLM.from_wire({"metadata": {"name": "l", "namespace": "default"}, "spec": spec})

    factory = LLMClientFactory(
        10, builders={"openai": build, "anthropic": build}, scripted_base_url="http://127.0.0.1:9/v1"
    )
    factory.for_llm(llm(), "scripted")
    factory.for_llm(llm(), "sk-real")
    factory.for_llm(llm(base_url="https://proxy.example/v1"), "scripted")  # its own endpoint wins
    factory.for_llm(llm("anthropic"), "scripted")  # the scripted server speaks OpenAI only
    assert endpoints == [
        ("scripted", "http://127.0.0.1:9/v1"),
        ("sk-real", None),
        ("scripted", "https://proxy.example/v1"),
        ("scripted", None),
    ]


def test_an_answer_over_the_tool_call_limit_fails_the_run_without_creating_a_tool_call() -> None:
    kube = FakeKubeClient()
    llm = FakeLLM(
        lambda _: LLMResponse(
            tool_calls=[
                ToolCall(id=f"c{i}", function=ToolCallFunction(name="add", arguments="{}")) for i in range(3)
            ]
        )
    )
    validated(kube, llm, ["add"])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "add"})
    ctx = context(kube, llm, max_tool_calls_per_turn=2)
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "Failed"
    assert status["error"].startswith("the LLM asked for 3 tool calls in one answer; at most 2 are allowed")
    assert toolcall_names(kube) == []
    assert "TooManyToolCalls" in kube.event_reasons("r")


def test_a_message_too_large_to_store_twice_fails_the_run_before_any_llm_request() -> None:
    """The TaskRun holds a direct run's message in its spec and again in its window. The window check alone
    let etcd refuse the object (the API server's 500, retried for ever): an 800 KB message left the run
    with no status at all; a 600 KB one was refused only at a later turn, after a paid LLM request, whose
    claim then expired so the LLM was paid again."""
    kube = FakeKubeClient()
    llm = FakeLLM(
        lambda _: LLMResponse(
            tool_calls=[
                ToolCall(
                    id="c1",
                    function=ToolCallFunction(
                        name="add", arguments='{"a": 1, "b": 2, "c": "%s"}' % ("z" * 400_000)
                    ),
                )
            ]
        )
    )
    validated(kube, llm, ["add"])
    ctx = context(kube, llm)
    for name, size in (("huge", 800_000), ("big", 600_000)):
        create(kube, "TaskRun", "taskruns", name, {"agentRef": {"name": "a"}, "userMessage": "x" * size})
        prepare(ctx, message("TaskRun", name))
        llm_call(ctx, message("TaskRun", name))
        status = kube.get_raw("taskruns", "default", name)["status"]
        assert status["phase"] == "Failed", (name, status.get("phase"))
        assert (
            "with the " in status["error"]
            and "bytes of the TaskRun's spec and annotations" in status["error"]
        )
        assert "ContextWindowTooLarge" in kube.event_reasons(name)
    assert llm.requests == [], "refused before any LLM request is paid for"


def test_an_object_etcd_refuses_is_too_large_not_unavailable() -> None:
    """kube-apiserver answers etcd's refusal with a 500 (checked against v1.33): retrying cannot help."""
    from kubechain.kube.errors import TooLarge, Unavailable

    refused = error_for(500, {"reason": "InternalError", "message": "etcdserver: request is too large"})
    assert isinstance(refused, TooLarge) and not isinstance(refused, Unavailable)
    assert isinstance(error_for(413, {"reason": "RequestEntityTooLarge"}), TooLarge)
    assert isinstance(error_for(500, {"message": "etcdserver: leader changed"}), Unavailable)


def _as_openai_checks_it(request: LLMRequest) -> None:
    """What OpenAI refuses (400) in a request's messages: a tool call id twice, a function name it does
    not take, a tool message answering no call."""
    import re

    from kubechain.llm.openai_provider import request_body

    calls: set[str] = set()
    answered: set[str] = set()
    for sent in request_body(request, official=True)["messages"]:
        for call in sent.get("tool_calls") or []:
            assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", call["function"]["name"]), call
            assert call["id"] not in calls, f"Duplicate value for 'tool_call_id' of '{call['id']}'"
            calls.add(call["id"])
        if sent["role"] == "tool":
            assert sent["tool_call_id"] in calls and sent["tool_call_id"] not in answered, sent
            answered.add(sent["tool_call_id"])


@pytest.mark.parametrize(
    "turns",
    [
        [[("call_1", "add", '{"a": 1, "b": 2}'), ("call_1", "add", '{"a": 3, "b": 4}')]],
        [[("call_1", "", "{}")]],
        # an id-less server's made-up ids are the same for the same call in every turn
        [[("call_1", "add", '{"a": 1, "b": 2}')], [("call_1", "add", '{"a": 1, "b": 2}')]],
    ],
    ids=["one id twice in an answer", "no name", "one id in two turns"],
)
def test_tool_call_ids_and_names_are_sent_back_as_the_provider_takes_them(
    turns: list[list[tuple[str, str, str]]],
) -> None:
    """An answer's calls sharing an id, or one with no name, were sent back as given: OpenAI refused the
    next turn for good (400 "Duplicate value for 'tool_call_id'", "function.name: empty string"). A
    repeated id is made unique (the tool call resource carries the same, so its result pairs up), a call
    with no name is sent under a placeholder, and the run ends with the LLM's answer."""
    kube = FakeKubeClient()

    def answer(request: LLMRequest) -> LLMResponse:
        _as_openai_checks_it(request)
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn == len(turns):
            return LLMResponse(content="done")
        calls = [ToolCall(id=i, function=ToolCallFunction(name=n, arguments=a)) for i, n, a in turns[turn]]
        return LLMResponse(tool_calls=calls)

    llm = FakeLLM(answer)
    validated(kube, llm, ["add"])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "add"})
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    for _ in turns:
        llm_call(ctx, message("TaskRun", "r"))
        run = kube.get_raw("taskruns", "default", "r")
        asked = [call["id"] for call in run["status"]["contextWindow"][-1]["toolCalls"]]
        made = [kube.get_raw("taskruntoolcalls", "default", n) for n in toolcall_names(kube)]
        mine = [
            t
            for t in made
            if t["metadata"]["labels"][LABEL_TOOLCALLREQUEST] == run["status"]["toolCallRequestId"]
        ]
        assert sorted(t["spec"]["toolCallId"] for t in mine) == sorted(asked)
        for toolcall in mine:
            tool_call(ctx, message("TaskRunToolCall", toolcall["metadata"]["name"]))
        prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "FinalAnswer", status.get("error")
    assert status["output"] == "done"


ETCD_REFUSAL = "500 InternalError: etcdserver: request is too large"


def test_an_answer_the_api_server_refuses_as_too_large_fails_the_run_once_paid(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Our measure of a window can fall short of what the API server stores (it did: Go's JSON writes
    "<" in 6 bytes). The answer's write, refused (etcd's "request is too large": TooLarge), escaped the
    worker with the claim held and the answer lost; once the claim expired the turn was paid again, lost
    again, and the run failed as "interrupted twice". It fails now, saying why, with the tokens it cost."""
    import kubechain.kube.fake as fake_api

    monkeypatch.setattr(fake_api, "MAX_STORED_BYTES", 100_000)  # etcd's limit, under the window's (1 MiB)
    kube = FakeKubeClient()
    usage = TokenUsage(prompt_tokens=10, completion_tokens=30_000, total_tokens=30_010)
    llm = FakeLLM(lambda _: LLMResponse(content="y" * 120_000, usage=usage))
    validated(kube, llm)
    ctx = context(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    prepare(ctx, message("TaskRun", "r"))
    with caplog.at_level(logging.ERROR, logger="workers.transitions"):
        llm_call(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "Failed" and "claimedBy" not in status
    assert status["error"] == (
        f"the API server refused to store the LLM's answer as too large ({ETCD_REFUSAL}): the TaskRun would "
        "be over etcd's request size limit, and retrying cannot help"
    )
    assert status["tokenUsage"] == {"promptTokens": 10, "completionTokens": 30_000, "totalTokens": 30_010}
    assert kube.event_reasons("r")[-1] == "ContextWindowTooLarge"
    assert any(
        "refused the LLM answer of TaskRun default/r as too large" in r.message for r in caplog.records
    )
    llm_call(ctx, message("TaskRun", "r"))
    assert len(llm.requests) == 1, "paid once"


@pytest.mark.parametrize("continues_llm", [False, True])
def test_tool_results_the_api_server_refuses_as_too_large_fail_the_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, continues_llm: bool
) -> None:
    """The fan-in's write, refused as too large, raised out of prepare at every resync: the run stayed in
    ToolCallsPending for good with no status or Event saying why. ``continues_llm``: the write that also
    claims the next turn (take_turn_now) is refused the same."""
    import kubechain.kube.fake as fake_api

    kube = FakeKubeClient()
    llm = tool_turn(kube, ['{"a": 1, "b": 2}'] * 2)
    ctx = context(kube, llm, continues_llm=continues_llm)
    for name in toolcall_names(kube):
        tool_call(ctx, message("TaskRunToolCall", name))
        kube.patch_status_raw("taskruntoolcalls", "default", name, None, {"result": "r" * 60_000})
    monkeypatch.setattr(fake_api, "MAX_STORED_BYTES", 100_000)  # etcd's limit, under the window's (1 MiB)
    with caplog.at_level(logging.ERROR, logger="workers.prepare"):
        prepare(ctx, message("TaskRun", "r"))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] == "Failed"
    assert status["error"].startswith(
        f"the API server refused to store the tool results as too large ({ETCD_REFUSAL})"
    )
    assert kube.event_reasons("r")[-1] == "ContextWindowTooLarge"
    assert any("refused the tool results as too large" in r.message for r in caplog.records)
    assert len(llm.requests) == 1, "the next turn is not paid for"


@pytest.mark.parametrize("forged", ["another-name", "other-arguments", "another-tool"])
def test_a_tool_call_made_by_hand_with_the_runs_owner_reference_is_refused_not_run(forged: str) -> None:
    """An owner reference is no proof: whoever may create tool calls and read the run can copy its uid.
    A call the run's turn did not ask for (name, tool, arguments) ran with the Agent's grants, approval
    annotation and all, and one made ahead under the next turn's name was taken for the run's own."""
    from kubechain.statemachines.approval import APPROVAL_ANNOTATION

    kube = FakeKubeClient()
    create_multiply(kube)
    llm = tool_turn(kube, ['{"a": 1, "b": 2}'])
    ctx = context(kube, llm)
    (made,) = toolcall_names(kube)
    original = kube.get_raw("taskruntoolcalls", "default", made)
    run = kube.get(TaskRun, "default", "r")
    body = {
        "apiVersion": original["apiVersion"],
        "kind": "TaskRunToolCall",
        "metadata": {
            "name": made,
            "ownerReferences": [run.owner_reference().to_wire()],
            "annotations": {APPROVAL_ANNOTATION: "approved"},
        },
        "spec": dict(original["spec"]),
    }
    if forged == "another-name":
        body["metadata"]["name"] = "forged"
    else:
        kube.delete("taskruntoolcalls", "default", made)  # made ahead of the run's own create, say
        if forged == "other-arguments":
            body["spec"]["arguments"] = '{"a": 1000, "b": 337}'
        else:
            body["spec"]["toolRef"] = {"name": "multiply"}
    kube.create_raw("taskruntoolcalls", "default", body)
    name = body["metadata"]["name"]
    tool_call(ctx, message("TaskRunToolCall", name))
    status = kube.get_raw("taskruntoolcalls", "default", name)["status"]
    assert status["phase"] == "Failed" and "result" not in status
    assert 'not one TaskRun "r" asked for in its current turn' in status["error"]
    assert kube.event_reasons(name) == ["ValidationFailed"]


def test_a_tool_call_made_ahead_as_the_run_would_make_it_but_approved_is_not_taken_for_the_runs() -> None:
    """Made by hand under the name the run's create is about to use, as the run would make it (owner,
    tool, arguments), and already carrying an approval: taken for the run's own, it ran without anyone
    approving it. A call a KubeChain create finds already there is the run's only as created: no
    decision on it yet."""
    from kubechain.statemachines.approval import APPROVAL_ANNOTATION
    from kubechain.statemachines.taskrun import expected_toolcalls
    from workers.transitions import create_children

    kube = FakeKubeClient()
    llm = tool_turn(kube, ['{"a": 1, "b": 2}'])
    ctx = context(kube, llm)
    (made,) = toolcall_names(kube)
    run = kube.get(TaskRun, "default", "r")
    kube.delete("taskruntoolcalls", "default", made)
    (ahead,) = expected_toolcalls(run)
    ahead.metadata.annotations = {APPROVAL_ANNOTATION: "approved"}
    kube.create(ahead)
    # the run's own create of its turn's calls (a retry, or the fan-in finishing a dead creator's job)
    assert create_children(ctx, run, expected_toolcalls(run)) is not None
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert (
        status["phase"] == "Failed" and f"TaskRunToolCall {made} was not started by this" in status["error"]
    )
    (ahead,) = expected_toolcalls(run)
    kube.delete("taskruntoolcalls", "default", made)
    kube.create(ahead)  # exactly as the run makes it: a retried create of its own is harmless
    assert create_children(ctx, kube.get(TaskRun, "default", "r"), [ahead]) is None


def test_a_tool_call_made_by_hand_for_a_live_run_is_refused_not_run() -> None:
    """It ran with the Agent's grants (an externalAPI tool's credentials, say) for whoever may create
    tool calls; its run never reads its result."""
    kube = FakeKubeClient()
    llm = tool_turn(kube, ['{"a": 1, "b": 2}'])
    ctx = context(kube, llm)
    spec = {
        "toolCallId": "x1",
        "taskRunRef": {"name": "r"},
        "toolRef": {"name": "add"},
        "arguments": '{"a": 40, "b": 2}',
    }
    create(kube, "TaskRunToolCall", "taskruntoolcalls", "handmade", spec)
    tool_call(ctx, message("TaskRunToolCall", "handmade"))
    status = kube.get_raw("taskruntoolcalls", "default", "handmade")["status"]
    assert status["phase"] == "Failed" and "result" not in status
    assert 'not made by TaskRun "r" (it has no owner reference to that run)' in status["error"]
    assert kube.event_reasons("handmade") == ["ValidationFailed"]
    (made,) = [name for name in toolcall_names(kube) if name != "handmade"]
    tool_call(ctx, message("TaskRunToolCall", made))  # the run's own call still runs
    assert kube.get_raw("taskruntoolcalls", "default", made)["status"]["result"] == "3"


def _validated_llm_detail(kube: FakeKubeClient, provider: str, parameters: dict[str, Any]) -> dict[str, Any]:
    kube.add_secret("default", provider, {f"{provider.upper()}_API_KEY": "sk-1"})
    create(kube, "LLM", "llms", "l", {"provider": provider, "parameters": parameters})
    validate(context(kube, FakeLLM(lambda r: LLMResponse(content="x"))), message("LLM", "l"))
    return dict(kube.get_raw("llms", "default", "l")["status"])


def test_an_anthropic_llm_setting_temperature_and_top_p_is_ready_and_says_top_p_is_not_sent() -> None:
    status = _validated_llm_detail(FakeKubeClient(), "anthropic", {"temperature": "0.2", "topP": "0.9"})
    assert status["status"] == "Ready", status
    assert status["statusDetail"].startswith("Anthropic API key validated successfully; ")
    assert "topP is not sent" in status["statusDetail"], status["statusDetail"]
    alone = _validated_llm_detail(FakeKubeClient(), "anthropic", {"topP": "0.9"})
    assert alone["statusDetail"] == "Anthropic API key validated successfully"
    openai = _validated_llm_detail(FakeKubeClient(), "openai", {"temperature": "0.2", "topP": "0.9"})
    assert openai["statusDetail"] == "OpenAI API key validated successfully"


def _validated_against(
    answer: Callable[[Any], Any], provider: str = "openai", base: str = "/v1"
) -> dict[str, Any]:
    """The status of an LLM validated by the real provider client against a local server ``answer``ing."""
    from kubechain.llm.base import LLMClientFactory
    from tests.unit.http_stub import StubHTTPServer

    kube = FakeKubeClient()
    kube.add_secret("default", provider, {f"{provider.upper()}_API_KEY": "sk-1"})
    with StubHTTPServer(answer) as server:
        create(kube, "LLM", "llms", "l", {"provider": provider, "parameters": {"baseUrl": server.url + base}})
        ctx = context(kube, FakeLLM(lambda r: LLMResponse()))
        ctx.llms = LLMClientFactory(10)
        validate(ctx, message("LLM", "l"))
    return dict(kube.get_raw("llms", "default", "l")["status"])


@pytest.mark.parametrize("status", [401, 403])
def test_a_restricted_openai_key_that_may_not_list_models_is_ready_unchecked(status: int) -> None:
    """An OpenAI restricted or project key without "Models: Read" is refused the model list (chat works):
    it was taken for an invalid key, and every Agent on the LLM blocked."""
    from tests.unit.http_stub import StubAnswer

    refusal = {
        "error": {
            "message": "You have insufficient permissions for this operation. Missing scopes: api.model.read. "
            "Check that you have the correct role in your organization (Reader, Writer, Owner) and project "
            "(Member, Owner), and if you're using a restricted API key, that it has the necessary scopes.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    result = _validated_against(lambda _: StubAnswer(status, json.dumps(refusal).encode()))
    assert result["status"] == "Ready", result
    assert result["statusDetail"].startswith("OpenAI API key not checked: "), result["statusDetail"]
    assert "api.model.read" in result["statusDetail"]
    invalid = {"error": {"message": "Incorrect API key provided: sk-1.", "type": "invalid_request_error"}}
    refused = _validated_against(lambda _: StubAnswer(status, json.dumps(invalid).encode()))
    assert refused["status"] == "Error", refused


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize(
    ("content_type", "body", "said"),
    [
        ("text/html", b"<html><body>Welcome to nginx!</body></html>", "text/html, not JSON"),
        ("application/json", b"not json", "JSONDecodeError"),
        ("application/json", b"[1, 2]", "AttributeError"),
    ],
)
def test_a_base_url_answering_something_else_than_a_model_list_is_an_error_not_a_crash(
    provider: str, content_type: str, body: bytes, said: str
) -> None:
    """A 200 with a web page (a baseUrl that is a site, not the API) or JSON of another shape raised out of
    the validation task: the LLM got no status at all."""
    from tests.unit.http_stub import StubAnswer

    answer = StubAnswer(200, body, {"Content-Type": content_type})
    result = _validated_against(lambda _: answer, provider, "/v1" if provider == "openai" else "")
    name = "OpenAI" if provider == "openai" else "Anthropic"
    assert result["status"] == "Error", result
    assert result["statusDetail"].startswith(
        f"{name} API key validation failed: the base URL did not answer with a model list: "
    ), result["statusDetail"]
    assert said in result["statusDetail"]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_model_list_over_the_size_limit_is_an_error_not_a_crash(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubechain.llm.deadline as deadline
    from tests.unit.http_stub import StubAnswer

    monkeypatch.setattr(deadline, "MAX_ANSWER_BYTES", 16)
    answer = StubAnswer(200, json.dumps({"data": [{"id": "m" * 64}], "has_more": False}).encode())
    result = _validated_against(lambda _: answer, provider, "/v1" if provider == "openai" else "")
    assert result["status"] == "Error", result
    assert (
        "did not answer with a model list: AnswerTooLarge: the answer is over 16 bytes"
        in result["statusDetail"]
    )


def _api_at_v1(request: Any) -> Any:
    """An API under /v1 (as OpenAI's, vLLM's, Anthropic's): anything else is 404."""
    from tests.unit.http_stub import StubAnswer

    if request.path.split("?")[0] == "/v1/models":
        return StubAnswer(200, json.dumps({"data": [], "has_more": False, "object": "list"}).encode())
    return StubAnswer(404, b'{"detail": "Not Found"}')


def test_an_openai_compatible_base_url_without_v1_is_ready_unchecked_naming_the_url_tried() -> None:
    """The 404 was read as "no model list" and the LLM Ready: every run then failed with a 404 too, the
    note not saying which URL was asked nor that such servers usually serve under /v1."""
    result = _validated_against(_api_at_v1, "openai", "")
    assert result["status"] == "Ready", result
    detail = result["statusDetail"]
    assert detail.startswith("OpenAI API key not checked: "), detail
    assert "/models (404)" in detail and "http://127.0.0.1:" in detail and "/v1" in detail, detail
    assert "under /v1" not in _validated_against(_api_at_v1, "openai", "/v1/other")["statusDetail"]


def test_an_anthropic_base_url_ending_in_v1_is_asked_without_it_twice() -> None:
    """The SDK adds /v1 itself: a baseUrl ending in /v1 (as OpenAI-compatible ones do) asked /v1/v1/models,
    whose 404 left the LLM Ready unchecked and every run failing with a 404."""
    for base in ("/v1", "/v1/"):
        result = _validated_against(_api_at_v1, "anthropic", base)
        assert result["statusDetail"] == "Anthropic API key validated successfully", result


def test_parameters_a_provider_is_not_sent_are_named_at_validation() -> None:
    claude = _validated_llm_detail(
        FakeKubeClient(), "anthropic", {"topK": 40, "frequencyPenalty": "0.5", "presencePenalty": "0.1"}
    )
    assert claude["status"] == "Ready", claude
    assert "frequencyPenalty and presencePenalty are not sent" in claude["statusDetail"], claude
    gpt = _validated_llm_detail(FakeKubeClient(), "openai", {"topK": 40, "frequencyPenalty": "0.5"})
    assert (
        gpt["statusDetail"]
        == "OpenAI API key validated successfully; topK is not sent: OpenAI's API has no top_k"
    ), gpt


@pytest.mark.parametrize("kept", [None, {}, {"traceID": "0123456789abcdef0123456789abcdef"}])
def test_a_waiting_run_with_no_or_an_incomplete_span_context_is_written_once_then_left(
    kept: dict[str, str] | None,
) -> None:
    """Each prepare of a waiting run whose spanContext lacked a field wrote its status and posted an Event,
    and each write, a watch event, made another prepare: a loop. One written before the wait carried a
    spanContext (None) gets it once, without the wait's Event again."""
    kube = FakeKubeClient()
    ctx = context(kube, FakeLLM(lambda r: LLMResponse(content="x")))
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "missing"}, "userMessage": "hi"})
    prepare(ctx, message("TaskRun", "r"))
    key = next(k for k in kube.objects if k[1:] == ("taskruns", "default", "r"))
    assert kube.objects[key]["status"]["phase"] == "Pending"
    if kept is None:
        del kube.objects[key]["status"]["spanContext"]
    else:
        kube.objects[key]["status"]["spanContext"] = dict(kept)
    events = len(kube.events())
    versions = []
    for _ in range(3):  # each write is a watch event: one more prepare
        prepare(ctx, message("TaskRun", "r"))
        versions.append(kube.get_raw("taskruns", "default", "r")["metadata"]["resourceVersion"])
    assert versions[0] == versions[1] == versions[2]
    run = kube.get_raw("taskruns", "default", "r")
    assert run["status"]["spanContext"] == trace_ids(run["metadata"]["uid"])
    assert len(kube.events()) == events


def test_the_fake_api_server_measures_an_object_as_kube_apiserver_stores_it() -> None:
    """kube-apiserver writes a custom resource with Go's JSON, "<" as 6 bytes: an object of 300,000 of
    them is 1.8 MB in etcd, over its 1.5 MiB limit, though 300 KB as Python writes it."""
    from kubechain.kube.errors import TooLarge

    kube = FakeKubeClient()
    with pytest.raises(TooLarge):
        create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "<" * 300_000})
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "x" * 300_000})


def test_a_bursts_created_events_wait_their_delay_but_one_or_twos_are_posted_with_the_create() -> None:
    """A fan-out's ToolCallCreated Events shared the API server with its tool calls' claims; a Task's
    one TaskRunCreated, or a turn's two calls', are posted at once (``kubectl describe`` shows them)."""
    from kubechain.kube.events import EventRecorder
    from kubechain.statemachines.taskrun import expected_toolcalls
    from workers.transitions import create_children

    kube = FakeKubeClient()
    tool_turn(kube, ['{"a": 1, "b": 2}', '{"a": 3, "b": 4}', '{"a": 5, "b": 6}'])
    ctx = context(kube, FakeLLM(lambda r: LLMResponse()))
    ctx.events = EventRecorder(kube, "kubechain-worker", "w1", background=True, senders=1, delay_s=3600)
    run = kube.get(TaskRun, "default", "r")
    children = expected_toolcalls(run)
    made = kube.event_reasons("r").count("ToolCallCreated")
    assert made == 3

    def delete_all() -> None:
        for name in toolcall_names(kube):
            kube.delete("taskruntoolcalls", "default", name)

    delete_all()
    assert create_children(ctx, run, children[:2]) is None
    assert kube.event_reasons("r").count("ToolCallCreated") == made + 2, "posted with the create"
    delete_all()
    assert create_children(ctx, run, children) is None
    assert len(toolcall_names(kube)) == 3
    assert kube.event_reasons("r").count("ToolCallCreated") == made + 2, "a burst's wait their delay"
    ctx.events.flush(timeout_s=30)
    assert kube.event_reasons("r").count("ToolCallCreated") == made + 5


def test_a_worker_that_runs_tools_starts_the_calls_it_creates_itself_and_the_watcher_sends_none() -> None:
    """A fan-out's calls went creator → watcher → queue → a worker that read each again before its claim:
    for fifty calls, a quarter of the machine's work while they start. A worker consuming the tools queue
    runs what it creates (from the create's answer), marked so; the watcher sends no message for such a
    call until it is claimed, and its resync still finds one left unclaimed (its creator lost)."""
    from kubechain.settings import Settings
    from kubechain.statemachines.toolcall import STARTED_BY_ANNOTATION
    from kubechain.testing.waiting import wait_for
    from watcher.main import Watcher
    from workers.started_calls import CallStarter
    from workers.tool_call import run_started

    kube = FakeKubeClient()
    llm = tool_calling_llm(['{"a": 1, "b": 2}', '{"a": 3, "b": 4}', '{"a": 5, "b": 6}'])
    validated(kube, llm, ["add"])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "add"})
    ctx = context(kube, llm, "w1")
    queued: list[tuple[TaskName, ResourceMessage]] = []
    ctx.enqueue = lambda task, msg, countdown: queued.append((task, msg))
    starter = CallStarter(2, lambda toolcall, asked_at: run_started(ctx, toolcall, asked_at))
    ctx.start_tool_call = starter.start
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    names = toolcall_names(kube)
    assert len(names) == 3

    def phases() -> list[str]:  # (not through requests: those are counted below)
        calls = {
            name: obj for (_, plural, _, name), obj in kube.objects.items() if plural == "taskruntoolcalls"
        }
        return [(calls[n].get("status") or {}).get("phase", "") for n in names]

    # two slots: a call that found both taken (if none was done yet) went to the queue instead
    assert len(queued) <= 1
    wait_for(lambda: phases().count("Succeeded") == 3 - len(queued), what="the calls started in this process")
    for _, msg in queued:
        assert msg.kind == "TaskRunToolCall"
        tool_call(ctx, msg)
    assert phases() == ["Succeeded"] * 3
    gets = [path for method, path in kube.requests if method == "GET" and "/taskruntoolcalls/" in path]
    assert len(gets) == len(queued), "a call started here is not read again before its claim"
    calls = [kube.get_raw("taskruntoolcalls", "default", n) for n in names]
    assert all(c["metadata"]["annotations"][STARTED_BY_ANNOTATION] == "w1" for c in calls)
    assert sorted(c["status"]["result"] for c in calls) == ["11", "3", "7"]

    # the watcher: no message for such a call when it appears, unclaimed; its resync does send one
    watcher = Watcher(Settings(), kube, lambda *_: None, leader_election=False)
    fresh = dict(calls[0], status={})
    assert [
        w for w in watcher._event_work("TaskRunToolCall", "ADDED", fresh, None) if w.kind == "TaskRunToolCall"
    ] == []
    unmarked = dict(fresh, metadata={**fresh["metadata"], "annotations": {}})
    assert [w.task for w in watcher._event_work("TaskRunToolCall", "ADDED", unmarked, None)] == [
        TaskName.TOOL_CALL
    ]
    assert [w.task for w in work_for("TaskRunToolCall", fresh, datetime.now(UTC), 180, resync=True)] == [
        TaskName.TOOL_CALL
    ]


def test_a_call_made_to_be_started_by_its_creator_but_never_claimed_is_sent_on_by_the_next_attempt() -> None:
    """The watcher sends no message for a call its creator starts itself: one whose creator was lost before
    claiming it (or whose task was retried) is found by the next create of the turn's calls, and started
    there or sent to the queue."""
    from kubechain.statemachines.taskrun import expected_toolcalls
    from kubechain.statemachines.toolcall import STARTED_BY_ANNOTATION
    from workers.transitions import create_children

    kube = FakeKubeClient()
    llm = tool_calling_llm(['{"a": 1, "b": 2}'])
    validated(kube, llm, ["add"])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "add"})
    lost = context(kube, llm, "w1")
    lost.start_tool_call = lambda toolcall, asked_at: True  # taken, then the worker is gone: never run
    prepare(lost, message("TaskRun", "r"))
    llm_call(lost, message("TaskRun", "r"))
    (name,) = toolcall_names(kube)
    made = kube.get_raw("taskruntoolcalls", "default", name)
    assert made["metadata"]["annotations"][STARTED_BY_ANNOTATION] == "w1" and not made.get("status")
    other = context(kube, llm, "w2")  # runs no tools itself
    queued: list[tuple[TaskName, ResourceMessage]] = []
    other.enqueue = lambda task, msg, countdown: queued.append((task, msg))
    run = kube.get(TaskRun, "default", "r")
    assert create_children(other, run, expected_toolcalls(run)) is None
    assert [(task, msg.name) for task, msg in queued] == [(TaskName.TOOL_CALL, name)]
    tool_call(other, queued[0][1])
    assert kube.get_raw("taskruntoolcalls", "default", name)["status"]["phase"] == "Succeeded"
    queued.clear()
    assert create_children(other, run, expected_toolcalls(run)) is None
    assert queued == [], "claimed (and done): nothing to send on"
