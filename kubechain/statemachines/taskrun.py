"""The TaskRun state machine: pure decisions, no I/O.

    ""/Initializing/Pending --prepare--> ReadyForLLM --llm_call claims--> SendContextWindowToLLM
    (a worker that makes the LLM call itself writes ReadyForLLM and its claim as one write: see
    ``with_llm_claim``)
    SendContextWindowToLLM --content--> FinalAnswer
    SendContextWindowToLLM --tool calls--> ToolCallsPending (+ one TaskRunToolCall per call)
    ToolCallsPending --all tool calls terminal (prepare)--> ReadyForLLM
    SendContextWindowToLLM --429/5xx/timeout--> ErrorBackoff --(nextAttemptAt)--> SendContextWindowToLLM
    any --4xx / empty response / budget exhausted--> Failed

Every transition is merged into the status as a write conditional on the resourceVersion the decision was made
from, so of two workers deciding the same transition exactly one wins.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from kubechain.models import (
    LABEL_TASKRUNTOOLCALL,
    LABEL_TOOLCALLREQUEST,
    Agent,
    LocalObjectReference,
    Message,
    ObjectMeta,
    Task,
    TaskRun,
    TaskRunPhase,
    TaskRunToolCall,
    TaskRunToolCallSpec,
    ToolCallPhase,
    label_value,
)
from kubechain.models.base import stored_json_bytes
from kubechain.models.common import ToolCall
from kubechain.models.labels import LABEL_ROOT_RUN, LABEL_TASK, MAX_OBJECT_NAME, shortened
from kubechain.models.taskrun import FAN_IN_TASKRUN_PHASES
from kubechain.observability.tracing import run_trace_ids
from kubechain.statemachines.transition import (
    Transition,
    claim_remaining_s,
    normal,
    parse_timestamp,
    precise_timestamp,
    status_differs,
    timestamp,
    validated_as_it_stands,
    warning,
)
from kubechain.statemachines.validation import agent_ref_problem

PREVIEW_LENGTH = 50
AGENT_DETAIL_BYTES = 300  # of an Agent's statusDetail, quoted in a run waiting for it
UNNAMED_TOOL = "(unnamed tool)"
TRUNCATION_MARKER = "\n...[truncated by KubeChain: {omitted} bytes omitted]"


@dataclass(frozen=True)
class LoopLimits:
    claim_timeout_s: float = 180.0
    # How long the fan-in check leaves missing tool calls to the worker that is creating them.
    child_creation_grace_s: float = 10.0
    max_attempts: int = 14
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    max_tool_result_bytes: int = 64 * 1024
    max_context_window_bytes: int = 1024 * 1024
    max_tool_calls_per_turn: int = 128


def clean_text(text: str) -> str:
    """LLM output may hold lone surrogates (invalid in UTF-8); replace them so it can be stored."""
    return text.encode("utf-8", "replace").decode("utf-8")


def preview(message: str) -> str:
    return message if len(message) <= PREVIEW_LENGTH else message[: PREVIEW_LENGTH - 3] + "..."


def trace_ids(uid: str) -> dict[str, str]:
    return run_trace_ids(uid)


def stored_span_context(run: TaskRun) -> dict[str, str] | None:
    """The run's status.spanContext as written, if it names a span (both ids); an incomplete one
    (hand-written, another controller's: ``{}``, a trace id alone) counts as none."""
    kept = run.status.span_context
    if kept is None or not kept.trace_id or not kept.span_id:
        return None
    return {"traceID": kept.trace_id, "spanID": kept.span_id}


def span_context(run: TaskRun) -> dict[str, str]:
    """The run's status.spanContext: the one it has, or its root span's ids. Every status write that
    may be a run's first (ReadyForLLM, a wait, a failure in preparation) carries it, so a run whose
    root span is exported always names the trace it is in."""
    return stored_span_context(run) or trace_ids(run.uid)


def request_id(run: TaskRun, turn: int) -> str:
    """Deterministic per (run, turn): a retried turn names the same tool calls, so creates are idempotent."""
    return hashlib.sha256(f"{run.uid}:{turn}".encode()).hexdigest()[:7]


def toolcall_name(run_name: str, req_id: str, index: int) -> str:
    """``<run>-<request id>-tc-NN``, shortened with a hash when a long run name (a TaskRun's may be 253
    characters) would take it over an object name's limit."""
    return shortened(f"{run_name}-{req_id}-tc-{index:02d}", MAX_OBJECT_NAME)


def _window(run: TaskRun) -> list[Message]:
    return list(run.status.context_window or [])


def _wire_window(messages: list[Message]) -> list[dict[str, Any]]:
    return [message.to_wire() | {"content": message.content} for message in messages]


def window_bytes(messages: list[Message]) -> int:
    """The window's size as the API server stores it (Go's JSON: ``<`` is 6 bytes there, see
    stored_json_bytes)."""
    return stored_json_bytes(_wire_window(messages))


# -- prepare: Initializing/Pending -> ReadyForLLM ---------------------------------------------------


def needs_prepare(run: TaskRun) -> bool:
    return (
        run.phase in ("", TaskRunPhase.INITIALIZING, TaskRunPhase.PENDING)
        or run.phase in FAN_IN_TASKRUN_PHASES
    )


UNCLAIMED = {"claimedBy": None, "claimedAt": None}


def plan_initial_context(
    run: TaskRun,
    task: Task | None,
    task_missing: bool,
    agent: Agent | None,
    now: datetime,
    limits: LoopLimits = LoopLimits(),  # noqa: B008 - frozen, so one shared default is safe
) -> Transition | None:
    """Decide the first context window, or why the run must wait (or fail)."""
    if run.phase not in ("", TaskRunPhase.INITIALIZING, TaskRunPhase.PENDING):
        return None
    current = run.status.model_dump(by_alias=True)
    direct = run.spec.agent_ref is not None and bool(run.spec.user_message)
    if not direct:
        if run.spec.task_ref is None:
            message = "taskRef is required when agentRef and userMessage are not provided"
            return _fail(run, message, "TaskValidationFailed", now)  # the seed PR's getTask error
        if task_missing:
            message = f'Task "{run.spec.task_ref.name}" not found'
            return _fail(run, message, "TaskValidationFailed", now)
        if task is None or not task.status.ready:
            detail = f'Waiting for task "{run.spec.task_ref.name}" to become ready'
            return _wait(run, current, detail, "TaskNotReady")
    agent_name = run.spec.agent_ref.name if run.spec.agent_ref else (task.spec.agent_ref.name if task else "")
    problem = agent_ref_problem(agent_name) if run.spec.agent_ref else None
    if problem is not None:
        return _fail(run, problem, "ValidationFailed", now)  # no Agent can have that name: none is waited for
    if agent is None:
        return _wait(run, current, "Waiting for Agent to exist", "Waiting")
    if not agent.status.ready:
        detail = f'Waiting for agent "{agent_name}" to become ready'
        if agent.status.status_detail:
            # what the Agent itself waits for (an MCP server that cannot start, say): the run's watchers
            # (`kubechain run`, kubectl) see why without looking at the Agent
            detail += f": {truncate(agent.status.status_detail, AGENT_DETAIL_BYTES)}"
        return _wait(run, current, detail, "Waiting")
    if not validated_as_it_stands(agent):
        # Ready for a spec it no longer has (a new llmRef, a Tool taken away): its validation, which the
        # edit prompted, decides; the run is prompted again when the Agent's status catches up.
        return _wait(run, current, agent_not_validated_detail(agent_name), "Waiting")
    user_message = run.spec.user_message or (task.spec.message if task else "")
    if not user_message:
        return _fail(run, "no message found in TaskRun or Task", "ValidationFailed", now)
    window = [Message(role="system", content=agent.spec.system), Message(role="user", content=user_message)]
    # a message this large never fits the object beside the spec that holds it once already
    too_large = _too_large(run, window, limits)
    if too_large is not None:
        return _fail(run, too_large, "ContextWindowTooLarge", now)
    return Transition(
        status={
            "phase": TaskRunPhase.READY_FOR_LLM.value,
            "ready": True,
            "status": "Ready",
            "statusDetail": "Ready to send to LLM",
            "error": None,
            "contextWindow": _wire_window(window),
            "messageCount": len(window),
            "userMsgPreview": preview(user_message),
            "startTime": run.status.start_time or timestamp(now),
            "spanContext": span_context(run),
            "turns": 0,
            "llmAttempts": 0,
            "agentName": agent.name,
            **UNCLAIMED,
        },
        events=[normal("ValidationSucceeded", "Task validated successfully")],
    )


def agent_not_validated_detail(agent_name: str) -> str:
    """The statusDetail of a run waiting for its Agent's edit to be validated (words for people: nothing
    reads them back, see turn_waits_for_agent)."""
    return f'Waiting for agent "{agent_name}" to be validated again: its spec changed since it was'


def turn_waits_for_agent(run: TaskRun) -> bool:
    """Whether ``run`` is ReadyForLLM only to wait, unclaimed, for its Agent's edit to be validated
    (plan_turn_waits_for_agent), not about to be claimed: `kubechain run` says so, as it says a Pending
    run's wait. Its status says so (Pending, which a turn about to be claimed never is), not the words of
    its statusDetail, which may be reworded."""
    return run.phase == TaskRunPhase.READY_FOR_LLM and run.status.status == "Pending"


def _wait(run: TaskRun, current: dict[str, Any], detail: str, reason: str) -> Transition | None:
    patch = {
        "phase": TaskRunPhase.PENDING.value,
        "ready": False,
        "status": "Pending",
        "statusDetail": detail,
        "error": None,
    }
    waiting = status_differs(current, patch)
    # compared as span_context reads it: an incomplete one, written back as the root's ids (a merge
    # patch), is complete from then on; compared as stored, it differed at every prepare
    if not waiting and stored_span_context(run) is not None:
        return None
    patch["spanContext"] = span_context(run)
    # only spanContext to add (a wait written before waits carried it, or an incomplete one): no Event,
    # the wait's was posted when it began
    return Transition(status=patch, events=[normal(reason, detail)] if waiting else [])


def too_many_tool_calls_message(asked: int, limits: LoopLimits) -> str:
    return (
        f"the LLM asked for {asked} tool calls in one answer; at most {limits.max_tool_calls_per_turn} are "
        "allowed (KUBECHAIN_MAX_TOOL_CALLS_PER_TURN on the workers)"
    )


def _fail(run: TaskRun, message: str, reason: str, now: datetime, detail: str | None = None) -> Transition:
    return Transition(
        status={
            "phase": TaskRunPhase.FAILED.value,
            "ready": False,
            "status": "Error",
            "statusDetail": detail or message,
            "error": message,
            "completionTime": timestamp(now),
            "claimedBy": None,
            "claimedAt": None,
            "spanContext": span_context(run),  # a run failed in preparation has none yet
        },
        events=[warning(reason, message)],
    )


# -- llm_call: claim, then record the answer ----------------------------------------------------------


@dataclass(frozen=True)
class ClaimDecision:
    transition: Transition | None
    wait_s: float = 0.0  # > 0: not yet (ErrorBackoff) — try again after this long
    reason: str = ""


def plan_llm_claim(run: TaskRun, worker: str, now: datetime, limits: LoopLimits) -> ClaimDecision:
    """Claim the LLM step with a conditional write, or say why not (someone holds it, or backoff)."""
    phase = run.phase
    attempts = run.status.llm_attempts or 0
    interrupted: dict[str, int] = {}
    if phase == TaskRunPhase.ERROR_BACKOFF:
        due = parse_timestamp(run.status.next_attempt_at)
        if due is not None and due > now:
            return ClaimDecision(None, (due - now).total_seconds(), "backing off")
    elif phase == TaskRunPhase.SEND_CONTEXT_WINDOW_TO_LLM:
        remaining = claim_remaining_s(run.status.claimed_at, now, limits.claim_timeout_s)
        if remaining > 0:
            return ClaimDecision(None, remaining, f"claimed by {run.status.claimed_by}")
        # The holder died mid-call: the turn is repeated, but at most once. Only interruptions count
        # here; attempts that ended in an LLM error are max_attempts' business.
        if run.status.llm_interruptions:
            message = (
                f"the LLM call of turn {run.status.turns or 0} was interrupted twice "
                f"(last holder {run.status.claimed_by}); not retrying"
            )
            return ClaimDecision(_fail(run, message, "LLMRequestFailed", now))
        interrupted = {"llmInterruptions": 1}
    elif phase != TaskRunPhase.READY_FOR_LLM:
        return ClaimDecision(None, 0.0, f"phase {phase or '<none>'} does not call the LLM")
    # (A ReadyForLLM with a claimedBy is an earlier version's hand-off: claimed like any other, since
    # of two conditional claims only one lands.)
    resumed: dict[str, Any] = {}
    if turn_waits_for_agent(run):
        # under way now, as a turn made ready is
        resumed = {"ready": True, "status": "Ready"}
    return ClaimDecision(
        Transition(
            status=_claim(worker, now, attempts) | interrupted | resumed, events=[SENDING_CONTEXT_WINDOW]
        )
    )


SENDING_CONTEXT_WINDOW = normal("SendingContextWindowToLLM", "Sending context window to LLM")


def _claim(worker: str, now: datetime, attempts: int) -> dict[str, Any]:
    return {
        "phase": TaskRunPhase.SEND_CONTEXT_WINDOW_TO_LLM.value,
        "statusDetail": "Sending context window to LLM",
        "claimedBy": worker,
        "claimedAt": precise_timestamp(now),
        "llmAttempts": attempts + 1,
        "nextAttemptAt": None,
    }


def with_llm_claim(ready: Transition, worker: str, now: datetime) -> Transition:
    """``ready`` (a turn made ready: the first context window, or the tool results appended) and the
    claim of that turn's LLM call as one conditional write, for a worker that goes on to make the call
    itself: the turn then costs one status write, one watch event and one round trip through the
    watcher and the queue less, and no other worker can take it in between."""
    if ready.phase() != TaskRunPhase.READY_FOR_LLM.value:
        raise ValueError(f"only a turn made ready can be claimed with it, not {ready.phase()}")
    claim = ready.followed_by(Transition(status=_claim(worker, now, 0), events=[SENDING_CONTEXT_WINDOW]))
    claim.handoff = True
    return claim


def holds_claim(run: TaskRun, worker: str, claimed_at: str) -> bool:
    return (
        run.phase == TaskRunPhase.SEND_CONTEXT_WINDOW_TO_LLM
        and run.status.claimed_by == worker
        and run.status.claimed_at == claimed_at
    )


TRUNCATED_ANSWER = "the LLM stopped at its token limit: the answer may be cut off (raise spec.parameters.maxTokens of the LLM)"
CONTEXT_WINDOW_FULL = (
    "the LLM stopped at the end of the model's context window: the answer may be cut off (the conversation "
    "so far leaves it too little room: use a model with a larger context window, or split the task)"
)
CONTENT_FILTERED = (
    "the provider's content filter stopped the LLM's answer: the answer may be cut off (what the task, the "
    "system prompt or a tool result says was flagged: see the provider's content filtering)"
)
# On the last tool call of an answer the LLM stopped at a limit: which limit. Only that call can have been
# cut off (the LLM writes its calls in order), and its arguments' JSON error then says why.
CUT_OFF_ANNOTATION = "kubechain.humanlayer.dev/cut-off-at"
CUT_OFF_AT_TOKEN_LIMIT = "token-limit"
CUT_OFF_AT_CONTEXT_WINDOW = "context-window"
CUT_OFF_AT_CONTENT_FILTER = "content-filter"


def plan_llm_answer(
    run: TaskRun,
    content: str,
    tool_calls: list[Any],
    usage: dict[str, int] | None,
    now: datetime,
    limits: LoopLimits,
    *,
    truncated: bool = False,
    context_window_full: bool = False,
    content_filtered: bool = False,
) -> Transition:
    """Turn an LLM answer into FinalAnswer, or ToolCallsPending plus the TaskRunToolCalls to create.
    ``truncated``: the LLM stopped at a limit, its token limit or (``context_window_full``) the model's
    context window, or (``content_filtered``) the provider's content filter stopped it; the answer is
    kept, with a Warning that says so."""
    if content_filtered:
        why_cut, where, cut_at = CONTENT_FILTERED, "stopped by the content filter", CUT_OFF_AT_CONTENT_FILTER
    elif context_window_full:
        why_cut, where, cut_at = (
            CONTEXT_WINDOW_FULL,
            "cut off at the context window",
            CUT_OFF_AT_CONTEXT_WINDOW,
        )
    else:
        why_cut, where, cut_at = TRUNCATED_ANSWER, "cut off at the token limit", CUT_OFF_AT_TOKEN_LIMIT
    cut_off_at = cut_at if truncated else None
    cut_off = [warning("LLMResponseTruncated", why_cut)] if truncated else []
    content = clean_text(content)
    tool_calls = [
        call.model_copy(
            update={
                "id": clean_text(call.id),
                "function": call.function.model_copy(
                    update={
                        "name": clean_text(call.function.name),
                        "arguments": clean_text(call.function.arguments),
                    }
                ),
            }
        )
        for call in tool_calls
    ]
    window = _window(run)
    turn = run.status.turns or 0
    tool_calls = _with_unique_ids(run, turn, window, tool_calls)
    token_usage = _add_usage(run, usage)
    released = {
        "claimedBy": None,
        "claimedAt": None,
        "llmAttempts": 0,
        "llmInterruptions": None,
        "nextAttemptAt": None,
    }
    if not content and not tool_calls:
        empty = "LLM returned an empty response (no content and no tool calls)"
        # a reasoning model can spend its whole token limit before it says anything
        failed = _fail(run, f"{empty}: {why_cut}" if truncated else empty, "LLMResponseProcessingFailed", now)
        failed.status["tokenUsage"] = token_usage
        return failed
    if not tool_calls:
        window.append(Message(role="assistant", content=content))
        # The answer is stored twice (window and output): both must fit in one status write.
        too_large = _too_large(run, window, limits, stored_json_bytes(content))
        if too_large is not None:
            return _fail(run, too_large, "ContextWindowTooLarge", now)
        return Transition(
            status={
                "phase": TaskRunPhase.FINAL_ANSWER.value,
                "ready": True,
                "status": "Ready",
                "statusDetail": "LLM final response received" + (f" ({where})" if truncated else ""),
                "output": content,
                "error": None,
                "contextWindow": _wire_window(window),
                "messageCount": len(window),
                "completionTime": timestamp(now),
                "turns": turn + 1,
                "tokenUsage": token_usage,
                **released,
            },
            events=[normal("LLMFinalAnswer", "LLM response received successfully"), *cut_off],
        )
    if len(tool_calls) > limits.max_tool_calls_per_turn:
        failed = _fail(run, too_many_tool_calls_message(len(tool_calls), limits), "TooManyToolCalls", now)
        failed.status["tokenUsage"] = token_usage
        return failed
    req_id = request_id(run, turn)
    window.append(Message(role="assistant", content=content, tool_calls=tool_calls))
    too_large = _too_large(run, window, limits)
    if too_large is not None:
        return _fail(run, too_large, "ContextWindowTooLarge", now)
    return Transition(
        status={
            "phase": TaskRunPhase.TOOL_CALLS_PENDING.value,
            "ready": True,
            "status": "Ready",
            "statusDetail": "LLM response received, tool calls pending",
            "output": "",
            "error": None,
            "toolCallRequestId": req_id,
            "toolCallsPendingSince": precise_timestamp(now),
            "contextWindow": _wire_window(window),
            "messageCount": len(window),
            "turns": turn + 1,
            "tokenUsage": token_usage,
            **released,
        },
        events=[normal("ToolCallsPending", "LLM response received, tool calls pending"), *cut_off],
        children=_toolcalls_for(run, window[-1], req_id, cut_off_at),
    )


def _with_unique_ids(run: TaskRun, turn: int, window: list[Message], tool_calls: list[Any]) -> list[Any]:
    """``tool_calls`` with an id each that no other call of the answer or the window has: the providers
    refuse a request whose messages name one twice (OpenAI's 400 "Duplicate value for 'tool_call_id'"),
    and a server may give two calls one id, or (an id-less server's made-up ids) the id of a call of an
    earlier turn. The first keeps it; another is given one made from the run, turn and place, the same
    for the same answer, which its TaskRunToolCall carries too, so that its result pairs up."""
    taken = {call.id for message in window for call in message.tool_calls or []}
    unique = []
    for index, call in enumerate(tool_calls):
        call_id, tries = call.id, 0
        while not call_id or call_id in taken:
            seed = f"{run.uid}:{turn}:{index}:{tries}"
            call_id, tries = f"call_{hashlib.sha256(seed.encode()).hexdigest()[:24]}", tries + 1
        taken.add(call_id)
        unique.append(call if call_id == call.id else call.model_copy(update={"id": call_id}))
    return unique


def stored_alongside_bytes(run: TaskRun) -> int:
    """What the TaskRun holds besides its status: its spec (a direct run's userMessage, a sub-agent's task
    from its parent LLM) and annotations (``kubectl apply`` keeps the whole manifest there once more)."""
    return stored_json_bytes({"spec": run.spec.to_wire(), "annotations": run.metadata.annotations})


def _too_large(run: TaskRun, window: list[Message], limits: LoopLimits, output_bytes: int = 0) -> str | None:
    """Why writing ``window`` would take the object past the limit, or None when it fits. The whole object
    counts, not the window alone, measured as the API server stores it: etcd refuses the object, and a
    run whose write is refused fails only after the attempt (plan_refused_as_too_large), an answer paid
    for. ``output_bytes``: a final answer is written twice (window and output); both count."""
    alongside = stored_alongside_bytes(run)
    written = window_bytes(window) + output_bytes
    if written + alongside <= limits.max_context_window_bytes:
        return None
    what = "the context window and the answer" if output_bytes else "the context window"
    return (
        f"{what} would be {written} bytes, with the {alongside} bytes of the TaskRun's spec and annotations "
        f"over the {limits.max_context_window_bytes}-byte limit that keeps a TaskRun under etcd's request "
        "size limit"
    )


def plan_refused_as_too_large(
    run: TaskRun, what: str, refusal: str, now: datetime, usage: dict[str, int] | None = None
) -> Transition:
    """The API server refused to store ``what`` (the LLM's answer, the tool results) as too large
    (``refusal``: its answer) although ``_too_large`` let it through: the object is over etcd's limit by
    a measure ours missed, and writing it again cannot help. ``usage``: the tokens of an answer that was
    paid for, kept."""
    message = (
        f"the API server refused to store {what} as too large ({refusal}): the TaskRun would be over "
        "etcd's request size limit, and retrying cannot help"
    )
    failed = _fail(run, message, "ContextWindowTooLarge", now)
    if usage is not None:
        failed.status["tokenUsage"] = _add_usage(run, usage)
    return failed


def _add_usage(run: TaskRun, usage: dict[str, int] | None) -> dict[str, int]:
    total = run.status.token_usage.to_wire() if run.status.token_usage else {}
    result = {key: int(total.get(key, 0)) for key in ("promptTokens", "completionTokens", "totalTokens")}
    for key, wire in (
        ("prompt_tokens", "promptTokens"),
        ("completion_tokens", "completionTokens"),
        ("total_tokens", "totalTokens"),
    ):
        result[wire] += int((usage or {}).get(key, 0))
    return result


def plan_llm_error(
    run: TaskRun,
    message: str,
    retryable: bool,
    retry_after_s: float | None,
    now: datetime,
    limits: LoopLimits,
    rng: random.Random | None = None,
    *,
    status_code: int | None = None,
    cut_short: bool = False,
) -> Transition:
    """Retryable errors back off exponentially with jitter (Retry-After honoured); others fail the run.
    ``status_code``: the provider's HTTP status, if it answered (a 4xx is the original's own reason).
    ``cut_short``: a call its claim's deadline ended (the claim was written late), not the LLM's failure:
    backed off and retried the same, and counted, since each retry is a paid call (a claim written late
    every time must not retry for ever); the statusDetail and the final error say why."""
    attempts = run.status.llm_attempts or 1
    if not retryable:
        client_error = status_code is not None and 400 <= status_code < 500
        return _fail(run, message, "LLMRequestFailed4xx" if client_error else "LLMRequestFailed", now)
    if attempts >= limits.max_attempts:
        why = "; the last cut short to end within its claim" if cut_short else ""
        return _fail(run, f"{message} (gave up after {attempts} attempts{why})", "LLMRequestFailed", now)
    rng = rng or random.Random()
    delay = min(limits.backoff_max_s, limits.backoff_base_s * (2 ** (attempts - 1)))
    delay = delay / 2 + rng.uniform(0, delay / 2)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, limits.backoff_max_s))
    detail = f"LLM request failed, retrying in {delay:.1f}s (attempt {attempts} of {limits.max_attempts})"
    if cut_short:
        detail = (
            f"LLM call cut short to end within its claim, retrying in {delay:.1f}s (attempt {attempts} of "
            f"{limits.max_attempts})"
        )
    return Transition(
        status={
            "phase": TaskRunPhase.ERROR_BACKOFF.value,
            "ready": False,
            "status": "Error",
            "statusDetail": detail,
            "error": message,
            "nextAttemptAt": precise_timestamp(now + timedelta(seconds=delay)),
            "claimedBy": None,
            "claimedAt": None,
        },
        events=[warning("LLMRequestFailed", message)],
    )


def plan_children_rejected(run: TaskRun, message: str, now: datetime) -> Transition:
    """The API server refused a tool call of this turn as invalid: the run cannot go on (as in the
    original, where any creation error failed the run)."""
    return _fail(
        run, message, "LLMResponseProcessingFailed", now, detail=f"Failed to process LLM response: {message}"
    )


def plan_sub_agent_not_waited_for(run: TaskRun, why: str, now: datetime) -> Transition:
    """A sub-agent's run whose tool call will never read it (``why``) fails before its first turn rather
    than spend tokens for no one."""
    message = f"{why}: nothing would read this sub-agent run's answer"
    return _fail(run, message, "SubAgentNotWaitedFor", now)


def plan_turn_waits_for_agent(
    run: TaskRun, agent_name: str, claim: Transition, *, claim_written: bool = False
) -> Transition | None:
    """The turn ``claim`` would take is not taken while the run's Agent waits for the validation of an
    edit: its spec and its status (the tools, MCP servers, sub-agents and channels validated) are then of
    two generations, and the edit may be refused. The run waits ReadyForLLM, unclaimed (a retry that fell
    due too: its attempts are counted as before, and a claim re-taken from a holder that died still counts
    as that turn's interruption), saying what for; the watcher prompts it when the Agent's validation is
    written. None when it says so already.

    It says it waits as a Pending run does (ready false, status Pending, the error cleared: the original's
    waits), whatever it came from: a retry that fell due kept its failed attempt's Error and error while
    it only waited.

    ``claim_written``: ``claim`` is on ``run`` already (this process's claim left in doubt, never acted
    on, see resume_turn): the attempt it counted when written is taken back, since no LLM request was made
    under it; kept, the turn's first request was counted as its second."""
    detail = agent_not_validated_detail(agent_name)
    patch: dict[str, Any] = {
        "phase": TaskRunPhase.READY_FOR_LLM.value,
        "ready": False,
        "status": "Pending",  # what tells this wait (turn_waits_for_agent)
        "statusDetail": detail,
        "error": None,
        "nextAttemptAt": None,
        **UNCLAIMED,
    }
    if "llmInterruptions" in claim.status:
        patch["llmInterruptions"] = claim.status["llmInterruptions"]
    if claim_written:
        patch["llmAttempts"] = max(0, (run.status.llm_attempts or 0) - 1)
    if not status_differs(run.status.model_dump(by_alias=True), patch):
        return None
    return Transition(
        status=patch, events=[normal("Waiting", detail)] if run.status.status_detail != detail else []
    )


def plan_config_error(run: TaskRun, message: str, reason: str, now: datetime) -> Transition:
    """The run cannot call its LLM (missing LLM, secret, key): a clear terminal error."""
    return _fail(run, message, reason, now)


# -- fan-in: ToolCallsPending -> ReadyForLLM -----------------------------------------------------------


def expected_toolcalls(run: TaskRun) -> list[TaskRunToolCall]:
    """The TaskRunToolCalls the last assistant message asks for (deterministic names and labels)."""
    window = _window(run)
    if not window or window[-1].role != "assistant" or not window[-1].tool_calls:
        return []
    return _toolcalls_for(run, window[-1], run.status.tool_call_request_id or "")


def asked_for(run: TaskRun, toolcall: TaskRunToolCall) -> bool:
    """Whether ``toolcall`` is one of the calls the run's current turn asked for, exactly as it asked:
    the same name, tool, arguments and tool call id (only KubeChain's own creates make such a call).
    Only the call of that name is built: each of a turn's fifty calls asks this of its run."""
    window = _window(run)
    if not window or window[-1].role != "assistant" or not window[-1].tool_calls:
        return False
    req_id = run.status.tool_call_request_id or ""
    for index, call in enumerate(window[-1].tool_calls, start=1):
        if toolcall_name(run.name, req_id, index) == toolcall.name:
            return _toolcall_for(run, call, index, req_id).spec == toolcall.spec
    return False


def _root_run_label(run: TaskRun) -> dict[str, str]:
    """Every tool call of a delegation tree names the run a user created (its uid, as the sub-agent runs
    do), so ``kubechain run`` can show the approvals a sub-agent's tool calls wait for."""
    return {LABEL_ROOT_RUN: run.root_run_uid} if run.root_run_uid else {}


def _toolcalls_for(
    run: TaskRun, assistant: Message, req_id: str, cut_off_at: str | None = None
) -> list[TaskRunToolCall]:
    """The turn's TaskRunToolCalls. ``cut_off_at``: the limit the answer stopped at, noted on its last call
    (CUT_OFF_ANNOTATION). Not part of the spec: a call made again for one missing (``expected_toolcalls``,
    which cannot know it) is the same call, only its JSON error says less."""
    calls = assistant.tool_calls or []
    return [
        _toolcall_for(run, call, index, req_id, cut_off_at if index == len(calls) else None)
        for index, call in enumerate(calls, start=1)
    ]


def _toolcall_for(
    run: TaskRun, call: ToolCall, index: int, req_id: str, cut_off_at: str | None = None
) -> TaskRunToolCall:
    """The turn's ``index``-th TaskRunToolCall (from 1), for the assistant's ``call``."""
    meta = ObjectMeta(
        name=toolcall_name(run.name, req_id, index),
        namespace=run.namespace,
        labels={LABEL_TASKRUNTOOLCALL: label_value(run.name), LABEL_TOOLCALLREQUEST: req_id}
        | ({LABEL_TASK: label_value(run.spec.task_ref.name)} if run.spec.task_ref else {})
        | _root_run_label(run),
        annotations={CUT_OFF_ANNOTATION: cut_off_at} if cut_off_at else {},
        owner_references=[run.owner_reference()],
    )
    spec = TaskRunToolCallSpec(
        tool_call_id=call.id,
        task_run_ref=LocalObjectReference(name=run.name),
        # The LLM may send an empty or absurd name; the tool call then fails as an unknown tool.
        tool_ref=LocalObjectReference(name=call.function.name[:253] or UNNAMED_TOOL),
        arguments=call.function.arguments,
    )
    return TaskRunToolCall(metadata=meta, spec=spec)


def tool_message_content(toolcall: TaskRunToolCall, limits: LoopLimits) -> str:
    phase = toolcall.phase
    if phase == ToolCallPhase.SUCCEEDED:
        content = toolcall.status.result or ""
    elif phase == ToolCallPhase.TOOL_CALL_REJECTED:
        content = f"User denied `{toolcall.spec.tool_ref.name}` with feedback: {toolcall.status.result or ''}"
    else:
        content = f"Error: {toolcall.status.error or toolcall.status.status_detail or 'tool call failed'}"
    return truncate(content, limits.max_tool_result_bytes)


def truncate(text: str, max_bytes: int) -> str:
    """``text`` in at most ``max_bytes`` of UTF-8, the marker included. A text cut before (a tool's result
    when stored, then in the LLM's context after "Error: ") is cut from what it kept, its marker then
    counting what both cuts left out: a second cut of its own said ~50 bytes were omitted of megabytes."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= max_bytes:
        return text
    omitted_before = 0
    cut_before = _CUT_BEFORE.search(text)
    if cut_before is not None:
        omitted_before = int(cut_before.group(1))
        encoded = text[: cut_before.start()].encode("utf-8", "replace")
    whole = len(encoded) + omitted_before
    # the marker's room for the largest count it may say
    room = max(0, max_bytes - len(TRUNCATION_MARKER.format(omitted=whole).encode()))
    kept = encoded[:room].decode("utf-8", "ignore")
    return kept + TRUNCATION_MARKER.format(omitted=whole - len(kept.encode()))


# At most 18 digits (a count ours can be): the text is a tool's or a person's, and int() of thousands of
# digits raises (after the tool ran).
_CUT_BEFORE = re.compile(re.escape(TRUNCATION_MARKER).replace(re.escape("{omitted}"), r"(\d{1,18})") + r"\Z")


def tool_calls_created(run: TaskRun) -> bool:
    """Whether every tool call of the run's current turn was created (recorded by their creator)."""
    request = run.status.tool_call_request_id
    return bool(request) and run.status.tool_calls_created_for == request


def plan_tool_calls_created(run: TaskRun) -> Transition | None:
    """Record that the current turn's tool calls all exist, so that one missing later is known to have
    been deleted; None if there is nothing to record (recorded already, or the turn is over)."""
    if run.phase not in FAN_IN_TASKRUN_PHASES or tool_calls_created(run):
        return None
    return Transition(status={"toolCallsCreatedFor": run.status.tool_call_request_id})


def deleted_tool_call_message(toolcall: TaskRunToolCall) -> str:
    return f"Tool call {toolcall.name} was deleted before it finished: it has no result"


@dataclass(frozen=True)
class FanIn:
    missing: list[TaskRunToolCall]
    transition: Transition | None


def plan_fan_in(
    run: TaskRun,
    toolcalls: list[TaskRunToolCall],
    now: datetime,
    limits: LoopLimits,
) -> FanIn:
    """When every tool call of the current turn is terminal, append their results in the LLM's order."""
    if run.phase not in FAN_IN_TASKRUN_PHASES:
        return FanIn([], None)
    expected = expected_toolcalls(run)
    if not expected:
        # Nothing to wait for (e.g. an older run whose window lost its tool calls): fail, as the original
        # reported it, rather than loop.
        return FanIn(
            [],
            _fail(
                run,
                "TaskRun is in ToolCallsPending phase but no tool calls were found",
                "ToolCallsPendingWithNoToolCalls",
                now,
            ),
        )
    by_name = {toolcall.name: toolcall for toolcall in toolcalls}
    missing = [child for child in expected if child.name not in by_name]
    if missing and not tool_calls_created(run):
        since = parse_timestamp(run.status.tool_calls_pending_since)
        if since is not None and (now - since).total_seconds() < limits.child_creation_grace_s:
            return FanIn([], None)  # the worker that made the turn is still creating them
        return FanIn(missing, None)
    # Every call was created: one missing now was deleted, which cancels it (it is not made again).
    if not all(by_name[child.name].is_terminal() for child in expected if child.name in by_name):
        return FanIn([], None)
    window = _window(run)
    for child in expected:
        toolcall = by_name.get(child.name)
        window.append(
            Message(
                role="tool",
                content=tool_message_content(toolcall, limits)
                if toolcall
                else deleted_tool_call_message(child),
                tool_call_id=child.spec.tool_call_id,
                # a denial is the human's answer, not a failure: only a call that failed or never ended
                is_error=True if toolcall is None or toolcall.phase == ToolCallPhase.FAILED else None,
            )
        )
    too_large = _too_large(run, window, limits)
    if too_large is not None:
        return FanIn([], _fail(run, too_large, "ContextWindowTooLarge", now))
    detail = "All tool calls completed, ready to send tool results to LLM"
    deleted = [warning("ToolCallDeleted", deleted_tool_call_message(child)) for child in missing]
    return FanIn(
        [],
        Transition(
            status={
                "phase": TaskRunPhase.READY_FOR_LLM.value,
                "ready": True,
                "status": "Ready",
                "statusDetail": detail,
                "contextWindow": _wire_window(window),
                "messageCount": len(window),
                "llmAttempts": 0,
                **UNCLAIMED,
            },
            events=[*deleted, normal("AllToolCallsCompleted", detail)],
        ),
    )
