from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from kubechain.models import Agent, Message, Task, TaskRun, TaskRunToolCall, ToolCall, ToolCallFunction
from kubechain.statemachines.taskrun import (
    LoopLimits,
    expected_toolcalls,
    plan_fan_in,
    plan_initial_context,
    plan_llm_answer,
    plan_llm_claim,
    plan_llm_error,
    plan_turn_waits_for_agent,
    request_id,
    stored_alongside_bytes,
    trace_ids,
    truncate,
    window_bytes,
)
from kubechain.statemachines.toolcall import parse_arguments, plan_invalid_arguments

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LIMITS = LoopLimits()


def agent(ready: bool = True) -> Agent:
    return Agent.from_wire(
        {
            "metadata": {"name": "a"},
            "spec": {"llmRef": {"name": "l"}, "system": "be brief"},
            "status": {"ready": ready},
        }
    )


def run(status: dict | None = None, spec: dict | None = None) -> TaskRun:
    return TaskRun.from_wire(
        {
            "metadata": {"name": "r", "namespace": "ns", "uid": "uid-1", "resourceVersion": "7"},
            "spec": spec or {"agentRef": {"name": "a"}, "userMessage": "hello there"},
            "status": status or {},
        }
    )


def test_direct_run_gets_system_and_user_message() -> None:
    transition = plan_initial_context(run(), None, False, agent(), NOW)
    assert transition is not None
    assert transition.status["phase"] == "ReadyForLLM"
    assert [m["role"] for m in transition.status["contextWindow"]] == ["system", "user"]
    assert transition.status["contextWindow"][1]["content"] == "hello there"
    assert transition.status["userMsgPreview"] == "hello there"
    assert [e.reason for e in transition.events] == ["ValidationSucceeded"]


def test_task_run_uses_task_message_and_missing_task_fails() -> None:
    task = Task.from_wire(
        {
            "metadata": {"name": "t"},
            "spec": {"agentRef": {"name": "a"}, "message": "from task"},
            "status": {"ready": True},
        }
    )
    r = run(spec={"taskRef": {"name": "t"}})
    transition = plan_initial_context(r, task, False, agent(), NOW)
    assert transition is not None and transition.status["contextWindow"][1]["content"] == "from task"
    failed = plan_initial_context(r, None, True, None, NOW)
    assert failed is not None and failed.status["phase"] == "Failed"
    assert failed.status["error"] == 'Task "t" not found'
    assert [e.reason for e in failed.events] == ["TaskValidationFailed"]
    # neither a Task nor agentRef + userMessage (the CRD refuses it at apply; one stored before the CRD
    # required a spec may still exist): the seed PR's getTask error, with its Event reason
    nothing = plan_initial_context(run(spec={"agentRef": {"name": "a"}}), None, False, agent(), NOW)
    assert nothing is not None and nothing.status["phase"] == "Failed"
    assert nothing.status["error"] == "taskRef is required when agentRef and userMessage are not provided"
    assert [(e.type, e.reason) for e in nothing.events] == [("Warning", "TaskValidationFailed")]


def test_waiting_for_agent_is_written_once() -> None:
    first = plan_initial_context(run(), None, False, None, NOW)
    assert first is not None and first.status["statusDetail"] == "Waiting for Agent to exist"
    again = plan_initial_context(run(status=first.status), None, False, None, NOW)
    assert again is None, "no rewrite (and no duplicate Event) while nothing changed"


@pytest.mark.parametrize(
    ("spec", "task_missing", "with_agent", "phase"),
    [
        ({"taskRef": {"name": "t"}}, True, False, "Failed"),  # its Task does not exist
        ({"agentRef": {"name": "a"}}, False, True, "Failed"),  # neither a Task nor a message
        ({"agentRef": {"name": "a"}, "userMessage": "hi"}, False, False, "Pending"),  # no Agent yet
    ],
)
def test_a_run_that_fails_or_waits_in_preparation_names_its_trace(
    spec: dict, task_missing: bool, with_agent: bool, phase: str
) -> None:
    """Its root span is exported (when it ends), so status.spanContext names the trace to look it up in,
    as a run that reached ReadyForLLM's does."""
    transition = plan_initial_context(
        run(spec=spec), None, task_missing, agent() if with_agent else None, NOW
    )
    assert transition is not None and transition.status["phase"] == phase
    assert transition.status["spanContext"] == trace_ids("uid-1")
    again = plan_initial_context(run(status=transition.status, spec=spec), None, task_missing, None, NOW)
    assert phase == "Failed" or again is None, "a wait already written (its spanContext too) is not rewritten"


INCOMPLETE_SPAN_CONTEXTS = [
    {},
    {"traceID": "0123456789abcdef0123456789abcdef"},
    {"spanID": "0123456789abcdef"},
    {"traceID": "", "spanID": ""},
]


@pytest.mark.parametrize("kept", INCOMPLETE_SPAN_CONTEXTS)
def test_a_wait_with_an_incomplete_span_context_is_written_once(kept: dict[str, str]) -> None:
    """A stored spanContext missing a field (hand-written, another controller's) was written back as it
    was (to_wire drops None fields) while the comparison (model_dump keeps them) found it different: each
    prepare wrote the status and posted an Event, and each write made another prepare."""
    waiting = plan_initial_context(run(), None, False, None, NOW)
    assert waiting is not None
    stored = {**waiting.status, "spanContext": kept}
    fixed = plan_initial_context(run(status=stored), None, False, None, NOW)
    assert fixed is not None and fixed.status["spanContext"] == trace_ids("uid-1")
    assert fixed.events == [], "only spanContext changed: the wait's Event is not posted again"
    merged = {**stored, "spanContext": {**kept, **fixed.status["spanContext"]}}  # a merge patch
    assert plan_initial_context(run(status=merged), None, False, None, NOW) is None


@pytest.mark.parametrize("kept", INCOMPLETE_SPAN_CONTEXTS)
def test_an_incomplete_span_context_is_replaced_by_the_roots_when_a_run_is_ready_or_fails(
    kept: dict[str, str],
) -> None:
    ready = plan_initial_context(run(status={"spanContext": kept}), None, False, agent(), NOW)
    assert ready is not None and ready.status["phase"] == "ReadyForLLM"
    assert ready.status["spanContext"] == trace_ids("uid-1")
    claimed = ready_run(phase="SendContextWindowToLLM", spanContext=kept, llmInterruptions=1)
    decision = plan_llm_claim(claimed, "w", NOW, LIMITS)
    assert decision.transition is not None and decision.transition.status["phase"] == "Failed"
    assert decision.transition.status["spanContext"] == trace_ids(claimed.uid)


def test_a_wait_written_without_a_span_context_gets_it_once_without_another_event() -> None:
    """A run waiting since before the wait carried spanContext: its next prepare adds it, quietly."""
    waiting = plan_initial_context(run(), None, False, None, NOW)
    assert waiting is not None
    before = {key: value for key, value in waiting.status.items() if key != "spanContext"}
    added = plan_initial_context(run(status=before), None, False, None, NOW)
    assert added is not None and added.status["spanContext"] == trace_ids("uid-1") and added.events == []
    changed = plan_initial_context(run(status=before), None, False, agent(ready=False), NOW)
    assert changed is not None and [e.reason for e in changed.events] == ["Waiting"]


def test_a_run_failed_after_preparation_keeps_the_spancontext_it_has() -> None:
    kept = {"traceID": "1" * 32, "spanID": "2" * 16}
    claimed = ready_run(phase="SendContextWindowToLLM", spanContext=kept, llmInterruptions=1)
    decision = plan_llm_claim(claimed, "w", NOW, LIMITS)  # its claim expired, interrupted before: fails
    assert decision.transition is not None and decision.transition.status["phase"] == "Failed"
    assert decision.transition.status["spanContext"] == kept


def test_a_run_waiting_for_its_agent_says_what_the_agent_waits_for() -> None:
    """`kubechain run` showed only "Waiting for agent ... to become ready" for as long as it waited, never
    that the Agent's MCP server could not start; the run's detail now carries the Agent's."""
    waiting = agent(ready=False)
    waiting.status.status_detail = 'MCPServer "fetch" is not connected'
    transition = plan_initial_context(run(), None, False, waiting, NOW)
    assert transition is not None
    detail = 'Waiting for agent "a" to become ready: MCPServer "fetch" is not connected'
    assert transition.status["statusDetail"] == detail
    assert [(e.reason, e.message) for e in transition.events] == [("Waiting", detail)]
    waiting.status.status_detail = "x" * 1000
    long = plan_initial_context(run(), None, False, waiting, NOW)
    assert long is not None and len(long.status["statusDetail"]) < 400


def test_a_run_waits_for_an_agent_edited_since_it_was_validated() -> None:
    """An Agent's Ready is about the spec it validated: one edited since (a new llmRef, a Tool taken
    away) was used as it stood, its run started on a spec nobody had checked."""
    edited = Agent.from_wire(
        {
            "metadata": {"name": "a", "generation": 2},
            "spec": {"llmRef": {"name": "l"}, "system": "be brief"},
            "status": {"ready": True, "status": "Ready", "observedGeneration": 1},
        }
    )
    transition = plan_initial_context(run(), None, False, edited, NOW)
    assert transition is not None and transition.status["phase"] == "Pending", transition
    detail = 'Waiting for agent "a" to be validated again: its spec changed since it was'
    assert transition.status["statusDetail"] == detail
    assert [(e.reason, e.message) for e in transition.events] == [("Waiting", detail)]
    edited.status.observed_generation = 2
    ready = plan_initial_context(run(status=transition.status), None, False, edited, NOW)
    assert ready is not None and ready.status["phase"] == "ReadyForLLM"


def test_a_claim_re_taken_from_a_dead_holder_still_counts_its_interruption_while_the_turn_waits() -> None:
    """A turn whose holder died waits for its Agent's validation unclaimed, as ReadyForLLM: the claim it
    would have re-taken counted the interruption, and so does the wait, so a second death still ends the
    run rather than paying for the turn a third time."""
    stale = (NOW - timedelta(seconds=LIMITS.claim_timeout_s + 1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    held = run(
        status={"phase": "SendContextWindowToLLM", "claimedBy": "w0", "claimedAt": stale, "llmAttempts": 1}
    )
    claim = plan_llm_claim(held, "w1", NOW, LIMITS).transition
    assert claim is not None and claim.status["llmInterruptions"] == 1
    wait = plan_turn_waits_for_agent(held, "a", claim)
    assert wait is not None
    assert {key: wait.status[key] for key in ("phase", "claimedBy", "claimedAt", "llmInterruptions")} == {
        "phase": "ReadyForLLM",
        "claimedBy": None,
        "claimedAt": None,
        "llmInterruptions": 1,
    }
    waiting = run(status={**held.status.model_dump(by_alias=True, exclude_none=True), **wait.status})
    again = plan_llm_claim(waiting, "w1", NOW, LIMITS).transition
    assert again is not None and plan_turn_waits_for_agent(waiting, "a", again) is None, "said once"


def test_a_run_whose_agent_ref_cannot_name_an_agent_fails_saying_so() -> None:
    """No Agent can have such a name, so the run waited "for Agent to exist" for ever."""
    r = run(spec={"agentRef": {"name": "Helper_Agent"}, "userMessage": "hi"})
    transition = plan_initial_context(r, None, False, None, NOW)
    assert transition is not None and transition.status["phase"] == "Failed", transition
    error = (
        'agentRef.name "Helper_Agent" is not a valid Agent name (lower-case letters, digits, "-" and ".", '
        "at most 253 characters)"
    )
    assert transition.status["error"] == error
    assert [(e.type, e.reason, e.message) for e in transition.events] == [
        ("Warning", "ValidationFailed", error)
    ]


def test_long_message_preview_is_truncated() -> None:
    transition = plan_initial_context(
        run(spec={"agentRef": {"name": "a"}, "userMessage": "x" * 80}), None, False, agent(), NOW
    )
    assert transition is not None and transition.status["userMsgPreview"] == "x" * 47 + "..."


def ready_run(**status: object) -> TaskRun:
    base = {
        "phase": "ReadyForLLM",
        "contextWindow": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "turns": 0,
    }
    return run(status={**base, **status})


def test_claim_only_from_ready_and_not_while_fresh_claim_held() -> None:
    claim = plan_llm_claim(ready_run(), "w1", NOW, LIMITS)
    assert claim.transition is not None and claim.transition.status["claimedBy"] == "w1"
    held = ready_run(phase="SendContextWindowToLLM", claimedBy="w2", claimedAt=NOW.isoformat(), llmAttempts=1)
    assert plan_llm_claim(held, "w1", NOW + timedelta(seconds=5), LIMITS).transition is None
    expired = NOW + timedelta(seconds=LIMITS.claim_timeout_s + 1)
    stale = plan_llm_claim(held, "w1", expired, LIMITS)
    assert stale.transition is not None and stale.transition.status["llmAttempts"] == 2
    assert stale.transition.status["llmInterruptions"] == 1
    twice = ready_run(
        phase="SendContextWindowToLLM",
        claimedBy="w2",
        claimedAt=NOW.isoformat(),
        llmAttempts=2,
        llmInterruptions=1,
    )
    failed = plan_llm_claim(twice, "w1", expired, LIMITS)
    assert failed.transition is not None and failed.transition.status["phase"] == "Failed"
    assert "interrupted twice" in failed.transition.status["error"]
    # A 429 then a retry (llmAttempts 2), then one worker death: one interruption, repeated once.
    after_error = ready_run(
        phase="SendContextWindowToLLM", claimedBy="w2", claimedAt=NOW.isoformat(), llmAttempts=2
    )
    retaken = plan_llm_claim(after_error, "w1", expired, LIMITS)
    assert retaken.transition is not None and retaken.transition.status["phase"] == "SendContextWindowToLLM"
    answered = plan_llm_answer(twice, "done", [], None, NOW, LIMITS)
    assert answered.status["llmInterruptions"] is None, "counted per turn"
    assert plan_llm_claim(run(status={"phase": "FinalAnswer"}), "w1", NOW, LIMITS).transition is None


def test_answer_with_tool_calls_creates_deterministic_children() -> None:
    claimed = ready_run(phase="SendContextWindowToLLM")
    calls = [ToolCall(id=f"c{i}", function=ToolCallFunction(name="add", arguments="{}")) for i in range(3)]
    transition = plan_llm_answer(
        claimed,
        "thinking",
        calls,
        {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        NOW,
        LIMITS,
    )
    assert transition.status["phase"] == "ToolCallsPending"
    req = request_id(claimed, 0)
    assert transition.status["toolCallRequestId"] == req
    assert [c.name for c in transition.children] == [f"r-{req}-tc-01", f"r-{req}-tc-02", f"r-{req}-tc-03"]
    assert transition.children[0].metadata.owner_references[0].uid == "uid-1"
    assert transition.children[0].metadata.labels["kubechain.humanlayer.dev/taskruntoolcall"] == "r"
    assert transition.status["tokenUsage"] == {"promptTokens": 3, "completionTokens": 2, "totalTokens": 5}
    again = plan_llm_answer(claimed, "thinking", calls, None, NOW, LIMITS)
    assert [c.name for c in again.children] == [c.name for c in transition.children], (
        "a retried turn names the same children"
    )


def test_empty_answer_fails_instead_of_looping() -> None:
    transition = plan_llm_answer(ready_run(phase="SendContextWindowToLLM"), "", [], None, NOW, LIMITS)
    assert transition.status["phase"] == "Failed"
    assert "empty response" in transition.status["error"]


def test_a_final_answer_over_the_window_limit_reports_what_would_be_written() -> None:
    """The answer is written twice (window and output): the figure in the message counts both."""
    from dataclasses import replace

    answer = "x" * 600
    limits = replace(LIMITS, max_context_window_bytes=1000)
    transition = plan_llm_answer(ready_run(phase="SendContextWindowToLLM"), answer, [], None, NOW, limits)
    assert transition.status["phase"] == "Failed"
    window_with_answer = len(
        json.dumps(
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": answer},
            ],
            separators=(",", ":"),  # as the API server stores it
        ).encode()
    )
    alongside = stored_alongside_bytes(ready_run(phase="SendContextWindowToLLM"))
    assert (  # the output as a JSON string: its quotes too
        f"the context window and the answer would be {window_with_answer + 602} bytes, with the "
        f"{alongside} bytes of the TaskRun's spec and annotations over the 1000-byte"
    ) in transition.status["error"]


def test_the_window_is_measured_as_the_api_server_stores_it() -> None:
    """kube-apiserver writes a custom resource with Go's encoding/json: compact, UTF-8 as is, but "<", ">"
    and "&" (and U+2028/U+2029) as 6-byte escapes. Measured as Python writes them (1 byte each), HTML tool
    results passed the guard and etcd refused the write ("request is too large")."""
    window = [Message(role="tool", content="<td>a&amp;b</td> é \u2028", tool_call_id="c1")]
    stored = (
        '[{"role":"tool","content":"\\u003ctd\\u003ea\\u0026amp;b\\u003c/td\\u003e é \\u2028",'
        '"toolCallId":"c1"}]'
    )
    assert window_bytes(window) == len(stored.encode())


def test_a_window_that_fits_only_as_python_measures_it_fails_the_run() -> None:
    """Two results of 3,000 "<" each are 6,000 bytes as Python writes them, 36,000 as etcd stores them."""
    from dataclasses import replace

    limits = replace(LIMITS, max_context_window_bytes=10_000)
    r = pending_run()
    results = [finished(child, "Succeeded", result="<" * 300) for child in expected_toolcalls(r)]
    fits = plan_fan_in(r, results, NOW, limits).transition
    assert fits is not None and fits.status["phase"] == "ReadyForLLM"
    r = pending_run()
    results = [finished(child, "Succeeded", result="<" * 3000) for child in expected_toolcalls(r)]
    failed = plan_fan_in(r, results, NOW, limits).transition
    assert failed is not None and failed.status["phase"] == "Failed"
    assert [event.reason for event in failed.events] == ["ContextWindowTooLarge"]


def test_a_tool_call_id_the_window_or_the_answer_holds_already_is_made_unique() -> None:
    """The provider refuses a request whose messages name one tool call id twice. The first call keeps its
    id; one repeated (in the answer, or from an earlier turn: an id-less server's made-up ids repeat) is
    given another, the same for the same answer, and its tool call resource carries it."""
    earlier = ToolCall(id="call_1", function=ToolCallFunction(name="t", arguments="{}"))
    claimed = ready_run(
        phase="SendContextWindowToLLM",
        turns=1,
        contextWindow=[
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            Message(role="assistant", content="", tool_calls=[earlier]).to_wire(),
            {"role": "tool", "content": "done", "toolCallId": "call_1"},
        ],
    )
    calls = [
        ToolCall(id=call_id, function=ToolCallFunction(name="t", arguments=f'{{"n": {n}}}'))
        for n, call_id in enumerate(["call_2", "call_2", "call_1", "call_3"])
    ]
    transition = plan_llm_answer(claimed, "", calls, None, NOW, LIMITS)
    ids = [call["id"] for call in transition.status["contextWindow"][-1]["toolCalls"]]
    assert ids[0] == "call_2" and ids[3] == "call_3"
    assert len(set(ids) | {"call_1"}) == 5, ids
    assert [child.spec.tool_call_id for child in transition.children] == ids
    again = plan_llm_answer(claimed, "", calls, None, NOW, LIMITS)
    assert [call["id"] for call in again.status["contextWindow"][-1]["toolCalls"]] == ids


def test_retryable_errors_back_off_with_jitter_and_retry_after() -> None:
    claimed = ready_run(phase="SendContextWindowToLLM", llmAttempts=1)
    transition = plan_llm_error(
        claimed, "LLM request failed with status 429: slow down", True, 7.0, NOW, LIMITS, random.Random(1)
    )
    assert transition.status["phase"] == "ErrorBackoff"
    due = datetime.fromisoformat(transition.status["nextAttemptAt"].replace("Z", "+00:00"))
    assert due - NOW >= timedelta(seconds=7)
    # a long Retry-After (a rate-limit window of minutes) is honoured, not cut to a minute
    patient = plan_llm_error(claimed, "429", True, 240.0, NOW, LIMITS, random.Random(1))
    assert datetime.fromisoformat(patient.status["nextAttemptAt"].replace("Z", "+00:00")) - NOW >= timedelta(
        seconds=240
    )
    exhausted = plan_llm_error(
        ready_run(phase="SendContextWindowToLLM", llmAttempts=LIMITS.max_attempts),
        "boom",
        True,
        None,
        NOW,
        LIMITS,
    )
    assert exhausted.status["phase"] == "Failed"
    four_xx = plan_llm_error(
        claimed, "LLM request failed with status 400: bad", False, None, NOW, LIMITS, status_code=400
    )
    assert four_xx.status["phase"] == "Failed" and four_xx.events[0].reason == "LLMRequestFailed4xx"
    # the reason follows the provider's status code, not words in the message
    unanswered = plan_llm_error(claimed, "response had status 404 fields", False, None, NOW, LIMITS)
    assert unanswered.events[0].reason == "LLMRequestFailed"


def test_a_call_cut_short_to_end_within_its_claim_is_retried_and_says_why() -> None:
    """A call under a claim written late ends when the claim would (cut short), not at the LLM's timeout:
    the turn is retried and the statusDetail says why. It still counts as an attempt (each retry is a paid
    call): the last one fails the run, saying the call was cut short."""
    early = ready_run(phase="SendContextWindowToLLM", llmAttempts=3)
    cut = plan_llm_error(early, "LLM request timed out", True, None, NOW, LIMITS, cut_short=True)
    assert cut.status["phase"] == "ErrorBackoff" and cut.status["nextAttemptAt"]
    assert "llmAttempts" not in cut.status, "counted as the claim counted it"
    assert cut.status["statusDetail"].startswith("LLM call cut short to end within its claim, retrying in")
    assert cut.status["statusDetail"].endswith(f"(attempt 3 of {LIMITS.max_attempts})")
    assert cut.status["error"] == "LLM request timed out" and not cut.status["claimedBy"]
    counted = plan_llm_error(early, "t", True, None, NOW, LIMITS)
    assert counted.status["phase"] == "ErrorBackoff" and "llmAttempts" not in counted.status
    assert counted.status["statusDetail"].startswith("LLM request failed, retrying in")
    last = ready_run(phase="SendContextWindowToLLM", llmAttempts=LIMITS.max_attempts)
    gave_up = plan_llm_error(last, "LLM request timed out", True, None, NOW, LIMITS, cut_short=True)
    assert gave_up.status["phase"] == "Failed"
    assert "gave up after 14 attempts; the last cut short to end within its claim" in gave_up.status["error"]
    genuine = plan_llm_error(last, "LLM request timed out", True, None, NOW, LIMITS)
    assert genuine.status["phase"] == "Failed" and "gave up after 14 attempts)" in genuine.status["error"]


def pending_run() -> TaskRun:
    window = [
        Message(role="system", content="s"),
        Message(role="user", content="u"),
        Message(
            role="assistant",
            content="",
            tool_calls=[
                ToolCall(id=f"c{i}", function=ToolCallFunction(name="t", arguments="{}")) for i in (1, 2)
            ],
        ),
    ]
    return run(
        status={
            "phase": "ToolCallsPending",
            "toolCallRequestId": "abc1234",
            "contextWindow": [m.to_wire() for m in window],
        }
    )


def finished(child: TaskRunToolCall, phase: str, **status: str) -> TaskRunToolCall:
    return TaskRunToolCall.from_wire({**child.to_wire(), "status": {"phase": phase, **status}})


def test_fan_in_waits_for_all_then_appends_in_llm_order() -> None:
    r = pending_run()
    first, second = expected_toolcalls(r)
    absent = plan_fan_in(r, [finished(first, "Succeeded", result="one")], NOW, LIMITS)
    assert absent.missing == [second] and absent.transition is None, "a tool call not yet created is awaited"
    waiting = plan_fan_in(
        r, [finished(first, "Succeeded", result="one"), finished(second, "Running")], NOW, LIMITS
    )
    assert waiting.transition is None and not waiting.missing
    done = plan_fan_in(
        r,
        [finished(second, "Failed", error="boom"), finished(first, "Succeeded", result="one")],
        NOW,
        LIMITS,
    )
    assert done.transition is not None
    window = done.transition.status["contextWindow"]
    assert [(m["role"], m["content"], m.get("toolCallId")) for m in window[-2:]] == [
        ("tool", "one", "c1"),
        ("tool", "Error: boom", "c2"),
    ]
    assert done.transition.status["phase"] == "ReadyForLLM"


def test_tool_calls_carry_the_uid_of_the_run_their_delegation_tree_started_from() -> None:
    """So `kubechain run` can find the approvals a sub-agent's tool calls wait for."""
    root = pending_run()
    assert {c.metadata.labels["kubechain.humanlayer.dev/root-run"] for c in expected_toolcalls(root)} == {
        "uid-1"
    }
    sub = TaskRun.from_wire(
        {
            **root.to_wire(),
            "metadata": {
                **root.to_wire()["metadata"],
                "uid": "uid-sub",
                "labels": {"kubechain.humanlayer.dev/root-run": "uid-1"},
            },
        }
    )
    assert {c.metadata.labels["kubechain.humanlayer.dev/root-run"] for c in expected_toolcalls(sub)} == {
        "uid-1"
    }


def test_fan_in_reports_rejections_and_recreates_missing_children() -> None:
    r = pending_run()
    first, second = expected_toolcalls(r)
    missing = plan_fan_in(r, [finished(first, "Succeeded", result="x")], NOW, LIMITS)
    assert [c.name for c in missing.missing] == [second.name]
    rejected = plan_fan_in(
        r,
        [finished(first, "ToolCallRejected", result="not today"), finished(second, "Succeeded", result="y")],
        NOW,
        LIMITS,
    )
    assert rejected.transition is not None
    assert (
        rejected.transition.status["contextWindow"][-2]["content"]
        == "User denied `t` with feedback: not today"
    )


def test_truncate_marks_what_was_cut_within_its_limit() -> None:
    text = truncate("é" * 100, 151)
    kept, marker, omitted = text.partition("\n...[truncated by KubeChain: ")
    assert set(kept) == {"é"} and marker and len(text.encode()) <= 151
    assert omitted == f"{200 - len(kept.encode())} bytes omitted]"
    assert truncate(text, 151) == text, "cut once: the second cut has nothing to do"


@pytest.mark.parametrize(
    ("phase", "field", "prefix"),
    [
        ("Succeeded", "result", ""),
        ("Failed", "error", "Error: "),
        ("ToolCallRejected", "result", "User denied"),
    ],
)
def test_a_result_cut_when_stored_says_to_the_llm_how_much_of_it_was_cut(
    phase: str, field: str, prefix: str
) -> None:
    """The call's result was cut to max_tool_result_bytes when stored, the marker after it; cut again by
    the same limit in the LLM's context, it lost that marker and said some fifty bytes were omitted of a
    result of a megabyte."""
    from kubechain.statemachines.toolcall import plan_tool_failure, plan_tool_success

    r = pending_run()
    first, second = expected_toolcalls(r)
    big = "x" * 1_000_000
    if field == "result":
        stored = plan_tool_success(first, big, NOW, "ok", max_bytes=LIMITS.max_tool_result_bytes)
    else:
        stored = plan_tool_failure(first, big, NOW, max_bytes=LIMITS.max_tool_result_bytes)
    fanned = plan_fan_in(
        r,
        [finished(first, phase, **{field: stored.status[field]}), finished(second, "Succeeded", result="y")],
        NOW,
        LIMITS,
    )
    assert fanned.transition is not None
    content = fanned.transition.status["contextWindow"][-2]["content"]
    assert content.startswith(prefix) and len(content.encode()) <= LIMITS.max_tool_result_bytes
    kept, _, marker = content.partition("\n...[truncated by KubeChain: ")
    assert marker == f"{1_000_000 - kept.count('x')} bytes omitted]", marker


def test_a_provider_outage_of_many_minutes_is_ridden_out_before_a_run_fails() -> None:
    """Five attempts a second apart failed every run in flight during a 15-second 503."""
    rng = random.Random(7)
    waited = timedelta()
    for attempt in range(1, LIMITS.max_attempts):
        run = ready_run(phase="SendContextWindowToLLM", llmAttempts=attempt)
        backoff = plan_llm_error(run, "LLM request failed with status 503", True, None, NOW, LIMITS, rng)
        assert backoff.status["phase"] == "ErrorBackoff", attempt
        waited += datetime.fromisoformat(backoff.status["nextAttemptAt"].replace("Z", "+00:00")) - NOW
    assert waited >= timedelta(minutes=14), waited
    last = ready_run(phase="SendContextWindowToLLM", llmAttempts=LIMITS.max_attempts)
    assert plan_llm_error(last, "503", True, None, NOW, LIMITS, rng).status["phase"] == "Failed"


def test_an_answer_cut_off_at_the_token_limit_is_kept_with_a_warning() -> None:
    claimed = ready_run(phase="SendContextWindowToLLM", llmAttempts=1)
    cut = plan_llm_answer(claimed, "The answer is", [], None, NOW, LIMITS, truncated=True)
    assert cut.status["phase"] == "FinalAnswer" and cut.status["output"] == "The answer is"
    assert cut.status["statusDetail"] == "LLM final response received (cut off at the token limit)"
    assert [e.reason for e in cut.events] == ["LLMFinalAnswer", "LLMResponseTruncated"]
    whole = plan_llm_answer(claimed, "The answer is 4.", [], None, NOW, LIMITS)
    assert [e.reason for e in whole.events] == ["LLMFinalAnswer"]


def test_an_answer_cut_off_at_the_context_window_is_not_blamed_on_max_tokens() -> None:
    """Raising maxTokens does not help an answer the model's context window cut off."""
    claimed = ready_run(phase="SendContextWindowToLLM", llmAttempts=1)
    cut = plan_llm_answer(
        claimed, "The answer is", [], None, NOW, LIMITS, truncated=True, context_window_full=True
    )
    assert cut.status["statusDetail"] == "LLM final response received (cut off at the context window)"
    (truncated,) = [e for e in cut.events if e.reason == "LLMResponseTruncated"]
    assert "context window" in truncated.message and "maxTokens" not in truncated.message
    failed = plan_llm_answer(claimed, "", [], None, NOW, LIMITS, truncated=True, context_window_full=True)
    assert "context window" in failed.status["error"] and "maxTokens" not in failed.status["error"]


def test_an_answer_the_content_filter_stopped_is_kept_with_a_warning_that_says_so() -> None:
    """OpenAI's finish_reason "content_filter" with part of an answer became a FinalAnswer with no Warning,
    as though it were whole."""
    claimed = ready_run(phase="SendContextWindowToLLM", llmAttempts=1)
    cut = plan_llm_answer(
        claimed, "The answer is", [], None, NOW, LIMITS, truncated=True, content_filtered=True
    )
    assert cut.status["phase"] == "FinalAnswer" and cut.status["output"] == "The answer is"
    assert cut.status["statusDetail"] == "LLM final response received (stopped by the content filter)"
    (warned,) = [e for e in cut.events if e.reason == "LLMResponseTruncated"]
    assert "content filter" in warned.message and "maxTokens" not in warned.message
    failed = plan_llm_answer(claimed, "", [], None, NOW, LIMITS, truncated=True, content_filtered=True)
    assert failed.status["phase"] == "Failed" and "content filter" in failed.status["error"]
    calls = [ToolCall(id="c1", function=ToolCallFunction(name="write", arguments='{"path": "a", "te'))]
    (last,) = plan_llm_answer(
        claimed, "", calls, None, NOW, LIMITS, truncated=True, content_filtered=True
    ).children
    error = parse_arguments(last)[1]
    assert error is not None and "content filter" in error and "maxTokens" not in error, error


@pytest.mark.parametrize(
    ("context_window_full", "remedy"),
    [(False, "raise spec.parameters.maxTokens"), (True, "larger context window")],
    ids=["token-limit", "context-window"],
)
def test_a_tool_call_cut_off_with_its_answer_says_so_and_what_to_change(
    context_window_full: bool, remedy: str
) -> None:
    """Only the last call of an answer stopped at a limit can have been cut off: its arguments' JSON error
    says why (still "Invalid arguments JSON" in statusDetail), so the user and the LLM know what to change;
    an earlier call's bad JSON, and a whole answer's, are not blamed on the cut."""
    claimed = ready_run(phase="SendContextWindowToLLM", llmAttempts=1)
    calls = [
        ToolCall(id="c1", function=ToolCallFunction(name="add", arguments="{not json")),
        ToolCall(id="c2", function=ToolCallFunction(name="write", arguments='{"path": "a", "text": "lo')),
    ]
    cut = plan_llm_answer(
        claimed, "", calls, None, NOW, LIMITS, truncated=True, context_window_full=context_window_full
    )
    earlier, last = cut.children
    earlier_error, last_error = parse_arguments(earlier)[1], parse_arguments(last)[1]
    assert earlier_error is not None and "cut off" not in earlier_error
    assert last_error is not None and last_error.startswith("Invalid arguments JSON: Unterminated string")
    assert "cut off" in last_error and remedy in last_error, last_error
    assert ("maxTokens" in last_error) != context_window_full
    failed = plan_invalid_arguments(last, last_error, NOW)
    assert failed.status["statusDetail"] == "Invalid arguments JSON" and failed.status["error"] == last_error
    whole = plan_llm_answer(claimed, "", calls, None, NOW, LIMITS)
    assert all("cut off" not in (parse_arguments(child)[1] or "") for child in whole.children)
    # the children of the turn, as the fan-in expects them, are the ones created
    assert [c.spec for c in cut.children] == [c.spec for c in whole.children]


def test_an_empty_answer_cut_off_at_the_token_limit_says_which_limit_to_raise() -> None:
    """A reasoning model that spends its whole max_completion_tokens thinking answers nothing at all."""
    claimed = ready_run(phase="SendContextWindowToLLM", llmAttempts=1)
    failed = plan_llm_answer(claimed, "", [], None, NOW, LIMITS, truncated=True)
    assert failed.status["phase"] == "Failed" and "maxTokens" in failed.status["error"]


def test_an_answer_asking_for_more_tool_calls_than_allowed_fails_the_run_and_says_which_setting() -> None:
    from dataclasses import replace

    limits = replace(LIMITS, max_tool_calls_per_turn=3)
    claimed = ready_run(phase="SendContextWindowToLLM")
    calls = [ToolCall(id=f"c{i}", function=ToolCallFunction(name="add", arguments="{}")) for i in range(4)]
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    transition = plan_llm_answer(claimed, "", calls, usage, NOW, limits)
    assert transition.status["phase"] == "Failed"
    assert transition.children == []
    assert transition.status["error"] == (
        "the LLM asked for 4 tool calls in one answer; at most 3 are allowed "
        "(KUBECHAIN_MAX_TOOL_CALLS_PER_TURN on the workers)"
    )
    assert [(e.type, e.reason) for e in transition.events] == [("Warning", "TooManyToolCalls")]
    assert transition.status["tokenUsage"] == {"promptTokens": 3, "completionTokens": 2, "totalTokens": 5}
    at_the_limit = plan_llm_answer(claimed, "", calls[:3], usage, NOW, limits)
    assert at_the_limit.status["phase"] == "ToolCallsPending"
    assert len(at_the_limit.children) == 3


def test_the_first_window_counts_the_message_the_spec_already_holds() -> None:
    from dataclasses import replace

    limits = replace(LIMITS, max_context_window_bytes=1000)
    fits = plan_initial_context(
        run(spec={"agentRef": {"name": "a"}, "userMessage": "m" * 300}), None, False, agent(), NOW, limits
    )
    assert fits is not None and fits.status["phase"] == "ReadyForLLM"
    # 600 bytes would fit a 1000-byte window, but not beside the spec's own copy of them
    too_large = plan_initial_context(
        run(spec={"agentRef": {"name": "a"}, "userMessage": "m" * 600}), None, False, agent(), NOW, limits
    )
    assert too_large is not None and too_large.status["phase"] == "Failed"
    assert [event.reason for event in too_large.events] == ["ContextWindowTooLarge"]


def test_tool_messages_of_calls_that_did_not_succeed_say_so() -> None:
    """Anthropic takes a failed call's result with is_error; the window is where the provider reads it
    from, so a failed or deleted call's tool message is marked, and only those."""
    r = pending_run()
    first, second = expected_toolcalls(r)
    done = plan_fan_in(
        r, [finished(first, "Failed", error="boom"), finished(second, "Succeeded", result="two")], NOW, LIMITS
    )
    assert done.transition is not None
    assert [(m["content"], m.get("isError")) for m in done.transition.status["contextWindow"][-2:]] == [
        ("Error: boom", True),
        ("two", None),
    ], "no isError key at all on a result that is not an error"
    created = run(status={**r.to_wire()["status"], "toolCallsCreatedFor": "abc1234"})
    gone = plan_fan_in(created, [finished(first, "ToolCallRejected", result="no")], NOW, LIMITS)
    assert gone.transition is not None
    assert [m.get("isError") for m in gone.transition.status["contextWindow"][-2:]] == [None, True], (
        "a denial is the human's answer, not a failure; a call deleted before it finished has no result"
    )
    window = TaskRun.from_wire({**created.to_wire(), "status": gone.transition.status}).status.context_window
    assert window is not None and [m.is_error for m in window[-2:]] == [None, True], "read back from the wire"


def test_a_text_ending_in_a_marker_with_a_count_too_long_for_int_is_cut_like_any_other() -> None:
    """A tool's result (or a person's comment) is outside text: one ending in a made-up marker with 5,000
    digits made int() raise after the tool had run, the call left Running under its claim."""
    from kubechain.statemachines.taskrun import truncate

    text = "x" * 5000 + "\n...[truncated by KubeChain: " + "9" * 5000 + " bytes omitted]"
    cut = truncate(text, 1000)
    assert len(cut.encode()) <= 1000 and cut.startswith("x" * 100)
