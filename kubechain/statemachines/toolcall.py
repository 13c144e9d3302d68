"""The TaskRunToolCall state machine (pure): claim, then record the outcome exactly once.

"" / Pending / ReadyToExecuteApprovedTool --claim--> Running --> Succeeded | Failed
Running with a stale claim (the worker died) --> Running again if the tool is idempotent (once), else Failed
  (its tool now delegates or asks a human: Pending again, for that flow, if idempotent (once), else Failed)
AwaitingSubAgent / AwaitingHumanInput that nothing can move on any more --> Failed
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubechain.models import TERMINAL_TOOLCALL_PHASES, TaskRunToolCall, ToolCallPhase
from kubechain.models.base import stored_json_bytes
from kubechain.models.labels import MAX_LABEL_VALUE, is_object_name, shortened
from kubechain.observability.tracing import run_trace_ids, toolcall_span_id
from kubechain.statemachines.taskrun import (
    CUT_OFF_ANNOTATION,
    CUT_OFF_AT_CONTENT_FILTER,
    CUT_OFF_AT_CONTEXT_WINDOW,
    CUT_OFF_AT_TOKEN_LIMIT,
    LoopLimits,
    truncate,
)
from kubechain.statemachines.transition import (
    EventSpec,
    Transition,
    claim_remaining_s,
    normal,
    parse_timestamp,
    precise_timestamp,
    timestamp,
    warning,
)

CLAIMABLE_PHASES = ("", ToolCallPhase.PENDING, ToolCallPhase.READY_TO_EXECUTE_APPROVED_TOOL)
# A call in these phases waits for work done elsewhere (a sub-agent's run, a human's answer) and no worker
# executes it: its ToolCall span, named in its spanContext, is made by the write that ends it.
WAITING_ELSEWHERE_PHASES = (ToolCallPhase.AWAITING_SUB_AGENT, ToolCallPhase.AWAITING_HUMAN_INPUT)
# A result or error stored in the status is cut to this many UTF-8 bytes (the worker passes the
# configured max_tool_result_bytes): the LLM never sees more, and a multi-MB tool output would make the
# status write fail — over and over, for an idempotent tool.
MAX_STATUS_TEXT_BYTES = LoopLimits().max_tool_result_bytes
# Executions of an idempotent tool whose worker was lost: it is run again, but at most once (as an
# interrupted LLM turn is).
MAX_TOOL_EXECUTIONS = 2


@dataclass(frozen=True)
class ToolClaim:
    transition: Transition | None
    wait_s: float = 0.0
    reason: str = ""


def _running_claim(
    toolcall: TaskRunToolCall, now: datetime, claim_timeout_s: float, idempotent: bool
) -> ToolClaim | None:
    """Of a Running call: wait for its live claim, or fail it (its worker was lost, and the tool may not
    run again); None: the claim expired and the tool may run once more."""
    attempts = toolcall.status.attempts or 0
    remaining = claim_remaining_s(toolcall.status.claimed_at, now, claim_timeout_s)
    if remaining > 0:
        return ToolClaim(None, remaining, f"running on {toolcall.status.claimed_by}")
    if not idempotent:
        message = (
            f"the worker executing this tool call ({toolcall.status.claimed_by}) was lost mid-execution; "
            "the tool is not declared idempotent, so it was not run again"
        )
        return ToolClaim(plan_tool_failure(toolcall, message, now, reason="ExecutionInterrupted"))
    if attempts >= MAX_TOOL_EXECUTIONS:
        message = (
            f"the execution of this tool call was interrupted {attempts} times (last worker "
            f"{toolcall.status.claimed_by}); not running it again. Check that worker's logs (was it "
            "killed, or could it not store the result?) and run the task again"
        )
        return ToolClaim(plan_tool_failure(toolcall, message, now, reason="ExecutionInterrupted"))
    return None


def plan_tool_claim(
    toolcall: TaskRunToolCall, worker: str, now: datetime, claim_timeout_s: float, idempotent: bool
) -> ToolClaim:
    phase = toolcall.phase
    attempts = toolcall.status.attempts or 0
    if phase == ToolCallPhase.RUNNING:
        decided = _running_claim(toolcall, now, claim_timeout_s, idempotent)
        if decided is not None:
            return decided
    elif phase not in CLAIMABLE_PHASES:
        return ToolClaim(None, 0.0, f"phase {phase} is not executable")
    status: dict[str, Any] = {
        "phase": ToolCallPhase.RUNNING.value,
        "status": "Ready",
        "statusDetail": "Executing tool",
        "startTime": toolcall.status.start_time or timestamp(now),
        "claimedBy": worker,
        "claimedAt": precise_timestamp(now),
        "attempts": attempts + 1,
    }
    # this execution's span, named by the claim that starts it (a call run again names the new one)
    span_context = toolcall_span_context(toolcall, attempts + 1)
    if span_context is not None:
        status["spanContext"] = span_context
    return ToolClaim(Transition(status=status))


def plan_running_retyped(
    toolcall: TaskRunToolCall, now: datetime, claim_timeout_s: float, idempotent: bool, flow: str
) -> ToolClaim:
    """A Running call whose tool now ``flow``s (delegates to an agent, asks a human): flows that take no
    execution claim, and would never look at this one. A live claim is left to its holder; once it
    expired, the call fails as an interrupted execution does, or (an idempotent tool, not yet run
    MAX_TOOL_EXECUTIONS times) is released to Pending, for the flow its tool has now."""
    decided = _running_claim(toolcall, now, claim_timeout_s, idempotent)
    if decided is not None:
        return decided
    lost = toolcall.status.claimed_by
    return ToolClaim(
        Transition(
            status={
                "phase": ToolCallPhase.PENDING.value,
                "status": "Pending",
                "statusDetail": f"Interrupted; its tool now {flow}: starting again that way",
                "claimedBy": None,
                "claimedAt": None,
            },
            events=[
                warning(
                    "ExecutionInterrupted",
                    f"the worker executing this tool call ({lost}) was lost mid-execution; its tool, "
                    f"idempotent, now {flow}: starting again that way",
                )
            ],
        )
    )


def toolcall_span_context(toolcall: TaskRunToolCall, execution: int = 1) -> dict[str, str] | None:
    """Its run's trace id and the span id of its ``execution``th execution's span (the original declared
    the field and never wrote it); None for a call without a TaskRun owner."""
    run_uid = next((o.uid for o in toolcall.metadata.owner_references if o.kind == "TaskRun"), None)
    if not run_uid or not toolcall.uid:
        return None
    return {"traceID": run_trace_ids(run_uid)["traceID"], "spanID": toolcall_span_id(toolcall.uid, execution)}


def outcome_label(toolcall: TaskRunToolCall) -> str:
    """An ended call's outcome as the tool call metrics count it: "ok", "error", "invalid_arguments"
    (as an executed call's are), or "rejected" (by a human, or refused before it ran)."""
    if toolcall.phase == ToolCallPhase.TOOL_CALL_REJECTED:
        return "rejected"
    if toolcall.phase == ToolCallPhase.SUCCEEDED:
        return "ok"
    return "invalid_arguments" if toolcall.status.status_detail == INVALID_ARGUMENTS else "error"


def seconds_taken(toolcall: TaskRunToolCall) -> float | None:
    """From the call's start to its end as its status has them (None: it never started)."""
    started = parse_timestamp(toolcall.status.start_time)
    ended = parse_timestamp(toolcall.status.completion_time)
    if started is None or ended is None:
        return None
    return max(0.0, (ended - started).total_seconds())


def holds_claim(toolcall: TaskRunToolCall, worker: str, claimed_at: str) -> bool:
    return (
        toolcall.phase == ToolCallPhase.RUNNING
        and toolcall.status.claimed_by == worker
        and toolcall.status.claimed_at == claimed_at
    )


def plan_tool_success(
    toolcall: TaskRunToolCall,
    result: str,
    now: datetime,
    event_message: str,
    *,
    detail: str = "Tool executed successfully",
    max_bytes: int = MAX_STATUS_TEXT_BYTES,
) -> Transition:
    return Transition(
        status={
            "phase": ToolCallPhase.SUCCEEDED.value,
            "status": "Succeeded",
            "statusDetail": detail,
            "result": truncate(result, max_bytes),
            "error": None,
            "completionTime": timestamp(now),
            "claimedBy": None,
            "claimedAt": None,
        },
        events=[normal("ExecutionSucceeded", event_message)],
    )


INVALID_ARGUMENTS = "Invalid arguments JSON"
# Why the arguments of a call its answer's limit cut off (CUT_OFF_ANNOTATION) are not JSON, and what to
# change: told to the user (the call's error) and to the LLM (its tool message), which can send less.
CUT_OFF_ARGUMENTS = {
    CUT_OFF_AT_TOKEN_LIMIT: (
        "the LLM's answer was cut off at its token limit while it wrote these arguments: raise "
        "spec.parameters.maxTokens of the LLM, or send less in one tool call"
    ),
    CUT_OFF_AT_CONTEXT_WINDOW: (
        "the LLM's answer was cut off at the end of the model's context window while it wrote these "
        "arguments, the conversation so far leaving it too little room: use a model with a larger context "
        "window, or split the task"
    ),
    CUT_OFF_AT_CONTENT_FILTER: (
        "the provider's content filter stopped the LLM's answer while it wrote these arguments"
    ),
}


def _not_json(constant: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON has not: sent on, they became null without a word
    raise ValueError(f"{constant} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: a JSON number, but not one any tool can be given
        raise ValueError(f"{text} is out of range")
    return value


def parse_arguments(toolcall: TaskRunToolCall) -> tuple[dict[str, Any], str | None]:
    """The call's arguments, or the error the LLM is told when they are not a JSON object (and, when its
    answer stopped at a limit as it wrote them, why)."""
    cut_off = CUT_OFF_ARGUMENTS.get(toolcall.metadata.annotations.get(CUT_OFF_ANNOTATION, ""))
    why = f" ({cut_off})" if cut_off else ""
    try:
        value = json.loads(toolcall.spec.arguments or "{}", parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than json can parse
        return {}, f"{INVALID_ARGUMENTS}: {exc}{why}"
    if not isinstance(value, dict):
        return {}, f"{INVALID_ARGUMENTS}: arguments must be a JSON object, got {type(value).__name__}{why}"
    return value, None


def plan_invalid_arguments(toolcall: TaskRunToolCall, problem: str, now: datetime) -> Transition:
    return plan_tool_failure(toolcall, problem, now, detail=INVALID_ARGUMENTS)


def plan_tool_failure(
    toolcall: TaskRunToolCall,
    error: str,
    now: datetime,
    *,
    detail: str | None = None,
    reason: str = "ExecutionFailed",
    max_bytes: int = MAX_STATUS_TEXT_BYTES,
) -> Transition:
    error = truncate(error, max_bytes)  # an MCP server's error text is unbounded
    return Transition(
        status={
            "phase": ToolCallPhase.FAILED.value,
            "status": "Error",
            "statusDetail": truncate(detail, max_bytes) if detail else error,
            "error": error,
            "completionTime": timestamp(now),
            "claimedBy": None,
            "claimedAt": None,
        },
        events=[warning(reason, error)],
    )


# -- an outcome the API server refuses to store ----------------------------------------------------------

RESULT_TOO_LARGE = "ResultTooLarge"


def ends_the_call(transition: Transition) -> bool:
    return transition.phase() in TERMINAL_TOOLCALL_PHASES


def plan_outcome_too_large(
    toolcall: TaskRunToolCall, refused: Transition, refusal: str, now: datetime, *, sub_agent: str = ""
) -> Transition:
    """``refused``, a write that ended ``toolcall`` (ends_the_call) with a text (a tool's result or error,
    a sub-agent's answer, a person's answer or feedback), was refused by the API server as too large
    (``refusal``: its answer), and no retry can change that. KUBECHAIN_MAX_TOOL_RESULT_BYTES bounds the
    text alone, for the run's window; the call also holds its arguments, as large as that window lets
    them be, and Go's JSON writes "<", ">" and "&" in 6 bytes each (a failed call's error twice), so the
    object can be over etcd's limit. Written instead: the call Failed, its error saying why and what to
    change, so the run's fan-in reads that as its answer and goes on; nothing runs again, the tool having
    run. A rejection stands (a person's decision), its feedback replaced by that note. ``sub_agent``: the
    run whose answer it was, which keeps it."""
    phase = refused.phase()
    field = "error" if phase == ToolCallPhase.FAILED else "result"
    text = str(refused.status.get(field) or "")
    waited = toolcall.phase
    rejected = phase == ToolCallPhase.TOOL_CALL_REJECTED
    if rejected:
        what, kept = "the rejection's feedback", ""
    elif waited == ToolCallPhase.AWAITING_SUB_AGENT:
        what = "the sub-agent's answer" if phase == ToolCallPhase.SUCCEEDED else "the sub-agent's error"
        kept = f"; it stays in the sub-agent's TaskRun {sub_agent}" if sub_agent else ""
    elif waited == ToolCallPhase.AWAITING_HUMAN_INPUT:
        what = "the human's answer"
        kept = f"; it stays in HumanLayer (contact request {toolcall.status.external_call_id})"
    elif waited == ToolCallPhase.RUNNING:
        what, kept = f"the tool's {field}", "; the tool ran, and is not run again"
    else:
        what, kept = f"the tool call's {field}", ""
    size = len(text.encode("utf-8", "replace"))
    arguments = stored_json_bytes(toolcall.spec.arguments)
    why = (
        f"{what} ({size} bytes, {stored_json_bytes(text)} as the API server stores it) is too large to store: "
        f"the API server refused it ({refusal}): with its arguments ({arguments} bytes as stored) the "
        f"TaskRunToolCall would be over etcd's request size limit{kept}"
    )
    if rejected:
        note = f"({why}; reject with a shorter comment)"
        # the decision's own Event quoted the feedback: it quotes the note instead
        events = [EventSpec(e.type, e.reason, e.message.replace(text, note)) for e in refused.events]
        return Transition(
            status={**refused.status, field: note}, events=[*events, warning(RESULT_TOO_LARGE, why)]
        )
    advice = (
        ". Lower KUBECHAIN_MAX_TOOL_RESULT_BYTES (results are cut to it; Go's JSON, as the API server "
        'stores them, writes "<", ">" and "&" in 6 bytes each), or have the LLM send smaller arguments'
    )
    return plan_tool_failure(toolcall, why + advice, now, reason=RESULT_TOO_LARGE)


# -- started by its creator ------------------------------------------------------------------------------

# On a tool call: the worker that created it runs it too, at once, in its own process (a turn's dozens of
# calls start without a trip through the watcher and the queue). The watcher sends no message for it when
# it appears: its resync finds it if that worker is lost before claiming it.
STARTED_BY_ANNOTATION = "kubechain.humanlayer.dev/started-by"


def started_in_process(obj: Mapping[str, Any]) -> bool:
    """Whether a tool call (as the watcher has it) was created to be run by the worker that created it,
    and is not claimed yet."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return bool(annotations.get(STARTED_BY_ANNOTATION)) and not (obj.get("status") or {}).get("phase")


# -- delegation to a sub-agent ---------------------------------------------------------------------------

DELEGATION_CHAIN_ANNOTATION = "kubechain.humanlayer.dev/delegation-chain"
# On a sub-agent's run: the traceparent of its delegating call's span (in the parent run's trace), set when
# the run is created, so the worker that ends it links its root span there without reading anything else.
DELEGATED_FROM_ANNOTATION = "kubechain.humanlayer.dev/delegated-from"


def child_run_name(toolcall_name: str, agent: str) -> str:
    """``delegate-<toolcall>-<agent>``, shortened with a hash when over 63 characters (stable per call)."""
    return shortened(f"delegate-{toolcall_name}-{agent}", MAX_LABEL_VALUE)


def delegation_problem(chain: list[str], target: str, max_depth: int) -> str | None:
    """Why delegating from the agents in ``chain`` (outermost first: the user's run's agent, down to the
    delegating run's) to ``target`` is refused, or None. The new run's depth is ``len(chain)`` (a user's
    run is at 0, LABEL_DEPTH): ``max_depth`` is the deepest allowed."""
    path = " → ".join([*chain, target])
    if target in chain:
        return f"delegation cycle: {path}"
    if len(chain) > max_depth:
        return (
            f"delegation depth limit of {max_depth} reached: a sub-agent run at depth {len(chain)} would "
            f"pass it (a user's run is at depth 0; KUBECHAIN_MAX_DELEGATION_DEPTH): {path}"
        )
    return None


def missing_agent_problem(agent: str, *, exists: bool) -> str | None:
    """Why delegating to ``agent`` is refused because there is no such Agent (``exists``: one was read),
    or None. Its run would wait "for Agent to exist" until the start timeout, and its caller with it."""
    if not is_object_name(agent):
        return (
            f'cannot delegate to agent "{agent}": not a valid Agent name (lower-case letters, digits, "-" '
            'and "."); no sub-agent was started: fix the delegating Tool\'s agentRef'
        )
    if not exists:
        return (
            f'cannot delegate to agent "{agent}": that agent does not exist (deleted, or its name mistyped '
            "in the delegating Tool's agentRef or the Agent's spec.subAgents); no sub-agent was started"
        )
    return None


def sub_agent_runs_problem(started: int, max_runs: int) -> str | None:
    """Why one more sub-agent run is refused: the runs started from one user's run, at every depth,
    are at the limit."""
    if started >= max_runs:
        return (
            f"sub-agent run limit of {max_runs} reached: this task's delegations have started {started} "
            "runs (KUBECHAIN_MAX_SUB_AGENT_RUNS)"
        )
    return None


def plan_awaiting_sub_agent(toolcall: TaskRunToolCall, child: str, agent: str, now: datetime) -> Transition:
    status: dict[str, Any] = {
        "phase": ToolCallPhase.AWAITING_SUB_AGENT.value,
        "status": "Ready",
        "statusDetail": f'Waiting for sub-agent "{agent}" (TaskRun {child})',
        "startTime": toolcall.status.start_time or timestamp(now),
    }
    # its span is made when it ends (WAITING_ELSEWHERE_PHASES)
    span_context = toolcall_span_context(toolcall)
    if span_context is not None:
        status["spanContext"] = span_context
    return Transition(
        status=status,
        events=[normal("DelegatingToSubAgent", f'Delegated to agent "{agent}" as TaskRun {child}')],
    )


def plan_sub_agent_outcome(
    toolcall: TaskRunToolCall,
    child_phase: str,
    output: str,
    error: str,
    now: datetime,
    *,
    max_bytes: int = MAX_STATUS_TEXT_BYTES,
) -> Transition | None:
    if child_phase == "FinalAnswer":
        transition = plan_tool_success(toolcall, output, now, "Sub-agent completed", max_bytes=max_bytes)
        transition.events = [normal("SubAgentCompleted", "Sub-agent completed")]
        return transition
    if child_phase == "Failed":
        return plan_tool_failure(
            toolcall, f"sub-agent failed: {error}", now, reason="SubAgentFailed", max_bytes=max_bytes
        )
    return None


def sub_agent_start_expired(
    child_phase: str, child_created: datetime | None, now: datetime, timeout_s: float
) -> bool:
    """A sub-agent's run still waiting to start (Pending: its Agent is not Ready) after ``timeout_s``. One
    not yet prepared at all ("") is only waiting in a queue, and is left alone."""
    if child_phase != "Pending" or child_created is None:
        return False
    return (now - child_created).total_seconds() >= timeout_s


def plan_sub_agent_not_started(
    toolcall: TaskRunToolCall,
    agent: str,
    child: str,
    waiting_for: str,
    timeout_s: float,
    now: datetime,
    *,
    deleted: bool = True,
) -> Transition:
    minutes = f"{timeout_s / 60:g} min"
    cause = f": {waiting_for}" if waiting_for else ""
    fate = "was deleted" if deleted else "could not be deleted (delete it by hand)"
    message = (
        f'sub-agent "{agent}" did not start within {minutes}{cause}. Its TaskRun {child} {fate}; make '
        f'Agent "{agent}" Ready (kubectl describe agent {agent}) and run the task again'
    )
    return plan_tool_failure(toolcall, message, now, reason="SubAgentFailed")


def plan_call_of_finished_run(
    toolcall: TaskRunToolCall,
    why: str,
    now: datetime,
    claim_timeout_s: float,
    sub_agent_runs: Sequence[str] = (),
) -> Transition | None:
    """A call whose run ended (or is gone) without it: nothing will ever collect its result, so it ends
    rather than being queued again at every resync. Not yet running: failed, not run (or, if it started
    ``sub_agent_runs``, failed no longer waiting for them). Running: left to its claim's holder, whose write
    ends it, unless that claim expired (its worker was lost)."""
    if toolcall.phase != ToolCallPhase.RUNNING:
        if sub_agent_runs:
            runs = ", ".join(sub_agent_runs)
            return plan_tool_failure(
                toolcall,
                f"{why}: its sub-agent (TaskRun {runs}) was started, and is no longer waited for",
                now,
            )
        return plan_tool_failure(toolcall, f"{why}: not run", now)
    if claim_remaining_s(toolcall.status.claimed_at, now, claim_timeout_s) > 0:
        return None
    message = (
        f"the worker executing this tool call ({toolcall.status.claimed_by}) was lost mid-execution, "
        f"and {why}: not run again"
    )
    return plan_tool_failure(toolcall, message, now, reason="ExecutionInterrupted")


def plan_stranded(
    toolcall: TaskRunToolCall, problem: str | None, now: datetime, *, approved_too: bool = False
) -> Transition | None:
    """A call waiting in a phase that nothing can move it out of any more — e.g. AwaitingSubAgent after
    its delegating Tool was deleted or changed — fails, so its run's fan-in is not blocked forever.
    ``problem``: why its tool no longer resolves, if it does not. ``approved_too``: an approved call
    (ReadyToExecuteApprovedTool) is stranded as well: the executor asking cannot run it."""
    phase = toolcall.phase
    approved = phase == ToolCallPhase.READY_TO_EXECUTE_APPROVED_TOOL
    if toolcall.is_terminal() or phase == ToolCallPhase.RUNNING:
        return None
    if phase in CLAIMABLE_PHASES and not (approved and approved_too):
        return None
    ref = toolcall.spec.tool_ref.name
    if phase == ToolCallPhase.AWAITING_SUB_AGENT:
        cause = problem or f'tool "{ref}" no longer delegates to an agent'
        message = (
            f"the sub-agent this call was delegated to can no longer be resolved: {cause}. The Tool was "
            "deleted or changed while the sub-agent ran; restore it and run the task again"
        )
        return plan_tool_failure(toolcall, message, now, reason="DelegationLost")
    cause = problem or f'tool "{ref}" does not support it'
    message = f"this tool call cannot continue from phase {phase}: {cause}"
    return plan_tool_failure(toolcall, message, now)
