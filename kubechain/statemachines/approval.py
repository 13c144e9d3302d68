"""Human approval of tool calls and humans as tools: the decisions, pure (workers/approvals.py does I/O).

Approval — required by an MCPServer's ``approvalContactChannel`` (asked via HumanLayer) or by a Tool's
``execute.externalAPI.requiresApproval`` (no channel field: decided with kubectl only)::

    "" / Pending --claim--> AwaitingHumanApproval (claimedBy: a worker is sending the HumanLayer request)
        --sent-->   AwaitingHumanApproval (externalCallID; re-checked with back-off, no worker waits)
        --failed--> ErrorRequestingHumanApproval (requested again with back-off)
    AwaitingHumanApproval --approved--> ReadyToExecuteApprovedTool --(tool_call claims, runs once)--> Succeeded
                          --rejected--> ToolCallRejected (status Succeeded, result = the comment)

A kubectl decision (the ``kubechain.humanlayer.dev/approval`` annotation) counts in every undecided phase.
The first decision recorded in the status is final: later annotations or HumanLayer answers are ignored.

Humans as tools (``<channel>__human_contact_<type>``)::

    "" / Pending --claim--> AwaitingHumanInput --sent--> AwaitingHumanInput (externalCallID) --answer--> Succeeded
    request failures: AwaitingHumanInput with status Error, requested again with back-off; Failed after
    HUMAN_CONTACT_MAX_ATTEMPTS (HUMAN_CONTACT_MAX_ATTEMPTS_IN_OUTAGE while HumanLayer is unavailable; the
    LLM then sees the error; there is no ErrorRequestingHumanInput phase).

Bookkeeping in the waiting phases uses existing status fields (everything survives restarts):

    claimedBy   set while a worker sends the HumanLayer request: the claim (taken over after
                REQUEST_CLAIM_TIMEOUT_S, when its holder is presumed dead)
    claimedAt   when a worker last talked to HumanLayer about this call (request or status check)
    attempts    HumanLayer calls of the current stage: failed requests until externalCallID is known,
                status checks after that; reset when a decision is recorded, so that afterwards it counts
                executions as usual
    The next HumanLayer call is due at claimedAt + recheck_delay(attempts) (2 s, 2 s, 4 s, ... 60 s; after
    about an hour of them 2 min, 4 min, then 5 min). claimedBy stays unset between checks: the checks
    take no claim (each one's conditional write makes a concurrent one stale), only a request does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from kubechain.models import TaskRunToolCall, ToolCallPhase
from kubechain.statemachines.taskrun import LoopLimits, truncate
from kubechain.statemachines.toolcall import plan_tool_failure, toolcall_span_context
from kubechain.statemachines.transition import (
    EventSpec,
    Transition,
    normal,
    parse_timestamp,
    precise_timestamp,
    status_differs,
    timestamp,
    warning,
)

APPROVAL_ANNOTATION = "kubechain.humanlayer.dev/approval"
APPROVAL_COMMENT_ANNOTATION = "kubechain.humanlayer.dev/approval-comment"

PENDING_PHASES = ("", ToolCallPhase.PENDING.value)
APPROVAL_WAITING_PHASES = (
    ToolCallPhase.AWAITING_HUMAN_APPROVAL.value,
    ToolCallPhase.ERROR_REQUESTING_HUMAN_APPROVAL.value,
)
UNDECIDED_PHASES = PENDING_PHASES + APPROVAL_WAITING_PHASES

RECHECK_BASE_S = 2.0
RECHECK_MAX_S = 60.0
# Each check writes the status (attempts, claimedAt): a minute apart for ever, 1,000 calls waiting for
# people would be ~17 status writes a second for as long as they wait. After about an hour (64 s of
# back-off, then 59 checks a minute apart) the delay doubles again, up to 5 minutes: ~3 writes a second
# for 1,000 calls, and an answer given after the first hour is seen within 5 minutes.
LONG_WAIT_CHECKS = 65
LONG_WAIT_RECHECK_MAX_S = 300.0
# A HumanLayer call answered within the client's timeouts takes up to 15 s (5 s to connect, then 10 s to
# read: httpx times each phase on its own): see REQUEST_CLAIM_YOUNG_S in workers/approvals.py.
REQUEST_CLAIM_TIMEOUT_S = 30.0
# A human's words go into the status and the LLM's context like a tool's result, with its bound (the
# worker passes its configured one): a long email reply must not make every status write too large.
HUMAN_TEXT_MAX_BYTES = LoopLimits().max_tool_result_bytes
HUMAN_CONTACT_MAX_ATTEMPTS = (
    8  # HumanLayer refusing the request: ~3 minutes of retrying, then the LLM is told
)
# HumanLayer unavailable (network, 429, 5xx): ~18 minutes of an outage are ridden out before the LLM is
# told no human could be reached.
HUMAN_CONTACT_MAX_ATTEMPTS_IN_OUTAGE = 23
# Status checks that find nothing (404) before the request is sent again: 2 + 4 + 8 + 16 s between them,
# so a HumanLayer that never finds it gets it about twice a minute, not every 2 s.
NOT_FOUND_CHECKS_BEFORE_RESEND = 5
NO_FEEDBACK = "(no feedback given)"
RECHECK_REASON = "humanlayer-recheck"


# -- identities and timing ---------------------------------------------------------------------------


def call_id(toolcall: TaskRunToolCall) -> str:
    """Deterministic per tool call, so a retried request is the same HumanLayer call."""
    identity = toolcall.uid or f"{toolcall.namespace}/{toolcall.name}"
    return "kc-" + hashlib.sha256(identity.encode()).hexdigest()[:10]


def run_id(toolcall: TaskRunToolCall) -> str:
    """The tool call's name (HumanLayer allows at most 64 characters for run_id + call_id)."""
    return toolcall.name[: 64 - len(call_id(toolcall))]


def recheck_delay(attempts: int) -> float:
    # the exponents capped: checks go on for as long as the human takes, and 2.0 ** 1024 overflows
    if attempts >= LONG_WAIT_CHECKS:
        grown = RECHECK_MAX_S * 2 ** min(attempts - LONG_WAIT_CHECKS + 1, 32)
        return min(LONG_WAIT_RECHECK_MAX_S, grown)
    return min(RECHECK_MAX_S, RECHECK_BASE_S * 2 ** min(max(0, attempts - 1), 32))


def next_due(toolcall: TaskRunToolCall) -> datetime | None:
    last = parse_timestamp(toolcall.status.claimed_at)
    if last is None:
        return None
    return last + timedelta(seconds=recheck_delay(toolcall.status.attempts or 0))


def is_due(toolcall: TaskRunToolCall, now: datetime) -> bool:
    """Whether the next HumanLayer call is due (with a little slack for clock differences between workers).

    Early triggers (a resync, a duplicate message) do nothing, so concurrent re-check chains die out: only
    the one that finds the call due checks, and its conditional write makes any other one stale."""
    due = next_due(toolcall)
    if due is None:
        return True
    slack = 0.5 + 0.1 * recheck_delay(toolcall.status.attempts or 0)
    return now + timedelta(seconds=slack) >= due


def seconds_until_due(toolcall: TaskRunToolCall, now: datetime) -> float:
    due = next_due(toolcall)
    return max(0.0, (due - now).total_seconds()) if due else 0.0


def request_in_flight(toolcall: TaskRunToolCall, now: datetime) -> bool:
    """Another worker holds the request claim and is presumably still talking to HumanLayer."""
    if not toolcall.status.claimed_by:
        return False
    claimed = parse_timestamp(toolcall.status.claimed_at)
    return claimed is not None and (now - claimed).total_seconds() < REQUEST_CLAIM_TIMEOUT_S


def _current(toolcall: TaskRunToolCall) -> dict[str, Any]:
    return toolcall.status.model_dump(by_alias=True)


# -- decisions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    approved: bool
    via: str  # "kubectl" | "HumanLayer"
    comment: str = ""
    by: str = ""


def annotation_decision(toolcall: TaskRunToolCall) -> Decision | None:
    annotations = toolcall.metadata.annotations
    value = annotations.get(APPROVAL_ANNOTATION, "").strip().lower()
    if value not in ("approved", "rejected"):
        return None
    return Decision(value == "approved", "kubectl", annotations.get(APPROVAL_COMMENT_ANNOTATION, "").strip())


def ignored_annotation_value(toolcall: TaskRunToolCall) -> str | None:
    """The approval annotation's value when it is set but is not a decision (``approve``, the CLI's
    verb, set with kubectl annotate; ``yes``; ``true``): None when unset or a decision. Such a value
    decides nothing, so that whoever set it must be told, not left to think the call approved."""
    value = toolcall.metadata.annotations.get(APPROVAL_ANNOTATION, "")
    if not value.strip() or annotation_decision(toolcall) is not None:
        return None
    return value


def _shortened(text: str, max_chars: int) -> str:
    """``text`` as shown in a statusDetail or an Event: at most ``max_chars`` of it, "..." after a cut."""
    return text if len(text) <= max_chars else text[:max_chars] + "..."


def ignored_annotation_note(value: str) -> str:
    shown = _shortened(value, 40)
    return f'annotation {APPROVAL_ANNOTATION}="{shown}" is not a decision: set it to "approved" or "rejected"'


def ignored_annotation_event(value: str) -> EventSpec:
    return warning(
        "ApprovalAnnotationIgnored", f"{ignored_annotation_note(value)}; the call still waits for one"
    )


class MalformedAnswer(ValueError):
    """HumanLayer's answer does not have the documented shape: no decision can be read from it."""


def _status_of(answer: Any) -> dict[str, Any]:
    status = answer.get("status") if isinstance(answer, dict) else answer
    if status is None:
        return {}
    if not isinstance(status, dict):
        raise MalformedAnswer(f"HumanLayer answered with a malformed status ({type(status).__name__})")
    return status


def humanlayer_decision(call: dict[str, Any]) -> Decision | None:
    status = _status_of(call)
    approved = status.get("approved")
    if approved is None:
        return None
    if not isinstance(approved, bool):
        # An approval gate reads only an explicit true as yes ("false" is a truthy string).
        raise MalformedAnswer(
            f"HumanLayer answered with a malformed decision (approved: {str(approved)[:40]!r})"
        )
    return Decision(approved, "HumanLayer", str(status.get("comment") or "").strip(), _user(status))


def human_response(contact: dict[str, Any]) -> tuple[str, str] | None:
    """(response, who) once the human answered a contact request, else None."""
    status = _status_of(contact)
    if status.get("response") is None and not status.get("responded_at"):
        return None
    return str(status.get("response") or ""), _user(status)


# Who answered is shown in a statusDetail and an Event: an email address or a name, bounded, since it is
# HumanLayer's to say and goes into every status write of the call from then on.
RESPONDER_MAX_CHARS = 100


def _user(status: dict[str, Any]) -> str:
    info = status.get("user_info")
    if isinstance(info, dict):
        for key in ("email", "name", "username", "user_id", "id"):
            if info.get(key):
                return _shortened(" ".join(str(info[key]).split()), RESPONDER_MAX_CHARS)  # one line
    return ""


def plan_decision(
    toolcall: TaskRunToolCall, decision: Decision, now: datetime, max_bytes: int = HUMAN_TEXT_MAX_BYTES
) -> Transition:
    """``max_bytes``: the bound of a rejection's feedback, as of a tool result (the worker's limit)."""
    who = f" by {decision.by}" if decision.by else ""
    cleared: dict[str, Any] = {"error": None, "claimedBy": None, "claimedAt": None, "attempts": None}
    if decision.approved:
        note = f": {decision.comment}" if decision.comment else ""
        return Transition(
            status=cleared
            | {
                "phase": ToolCallPhase.READY_TO_EXECUTE_APPROVED_TOOL.value,
                "status": "Ready",
                "statusDetail": f"Ready to execute approved tool (approved via {decision.via}{who})",
            },
            events=[normal("ToolCallApproved", f"Tool call approved via {decision.via}{who}{note}")],
        )
    feedback = truncate(decision.comment or NO_FEEDBACK, max_bytes)
    return Transition(
        status=cleared
        | {
            "phase": ToolCallPhase.TOOL_CALL_REJECTED.value,
            "status": "Succeeded",
            "statusDetail": f"Tool execution rejected (rejected via {decision.via}{who})",
            "result": feedback,
            "completionTime": timestamp(now),
        },
        events=[normal("ToolCallRejected", f"Tool call rejected via {decision.via}{who}: {feedback}")],
    )


# -- requests to a human (approvals and questions) ----------------------------------------------------


@dataclass(frozen=True)
class HumanAsk:
    """What differs between asking a human to approve a call and asking a human a question."""

    phase: ToolCallPhase  # the phase while the request is out
    first_detail: Callable[[str], str]  # statusDetail when it is first claimed (by channel)
    waiting_detail: Callable[[str], str]  # statusDetail once sent
    event_reason: str  # the Event when the human is first asked
    event_message: Callable[[str], str]
    refresh_detail: bool  # a repeated request shows the waiting detail again
    # The wait is the call's work (a question), not a gate before its execution (an approval, whose
    # execution has its span): its span, named in spanContext from the first request, spans the wait.
    spanned: bool = False


def plan_ask_claim(
    toolcall: TaskRunToolCall, ask: HumanAsk, channel: str, worker: str, now: datetime
) -> Transition:
    """Take the claim to send the request (the side effect comes after this write wins)."""
    status: dict[str, Any] = {
        "claimedBy": worker,
        "claimedAt": precise_timestamp(now),
        "externalCallID": None,
        "startTime": toolcall.status.start_time or timestamp(now),
    }
    span_context = toolcall_span_context(toolcall) if ask.spanned else None
    if span_context is not None:
        status["spanContext"] = span_context
    events = []
    if toolcall.phase in PENDING_PHASES:
        status |= {
            "phase": ask.phase.value,
            "status": "Ready",
            "statusDetail": ask.first_detail(channel),
            "attempts": 0,
        }
        events.append(normal(ask.event_reason, ask.event_message(channel)))
    elif toolcall.phase == ask.phase and ask.refresh_detail:
        status["statusDetail"] = ask.waiting_detail(channel)
    if toolcall.status.external_call_id:
        # Sent again because HumanLayer forgot the request: the status checks counted so far are not
        # failed sends, and must not use up the sends' attempts.
        status["attempts"] = 0
    return Transition(status=status, events=events)


def plan_ask_sent(
    toolcall: TaskRunToolCall, ask: HumanAsk, channel: str, external_id: str, now: datetime
) -> Transition:
    return Transition(
        status={
            "phase": ask.phase.value,
            "status": "Ready",
            "statusDetail": ask.waiting_detail(channel),
            "externalCallID": external_id,
            "error": None,
            "claimedBy": None,
            "claimedAt": precise_timestamp(now),
            "attempts": 0,
        },
        events=[normal("HumanLayerRequestSent", "HumanLayer request sent")],
    )


# -- approval requests -------------------------------------------------------------------------------


def waiting_detail(channel: str) -> str:
    return f"Waiting for human approval via contact channel {channel}"


def how_to_decide(name: str) -> str:
    return (
        f"`kubechain approve {name}` or `kubechain reject {name} --comment ...`, or "
        f"`kubectl annotate taskruntoolcall {name} {APPROVAL_ANNOTATION}=approved`"
    )


def kubectl_detail(name: str) -> str:
    return f"Waiting for human approval: {how_to_decide(name)}"


def plan_await_kubectl(toolcall: TaskRunToolCall, now: datetime) -> Transition | None:
    """Approval without a HumanLayer channel: wait for the annotation (None when already waiting). An
    annotation value that is not a decision is named in the statusDetail, where the wait is shown."""
    detail = kubectl_detail(toolcall.name)
    ignored = ignored_annotation_value(toolcall)
    if ignored is not None:
        detail = f"{detail} ({ignored_annotation_note(ignored)})"
    patch: dict[str, Any] = {
        "phase": ToolCallPhase.AWAITING_HUMAN_APPROVAL.value,
        "status": "Ready",
        "statusDetail": detail,
        "startTime": toolcall.status.start_time or timestamp(now),
        "error": None,
        "claimedBy": None,
    }
    if not status_differs(_current(toolcall), patch):
        return None
    events = []
    if toolcall.phase != ToolCallPhase.AWAITING_HUMAN_APPROVAL:
        events.append(
            normal(
                "AwaitingHumanApproval", f"Tool execution requires approval: {how_to_decide(toolcall.name)}"
            )
        )
    return Transition(status=patch, events=events)


def plan_request_failed(toolcall: TaskRunToolCall, error: str, reason: str, now: datetime) -> Transition:
    """ErrorRequestingHumanApproval; requested again when due (a kubectl decision still counts)."""
    attempts = (toolcall.status.attempts or 0) + 1
    retry = recheck_delay(attempts)
    detail = f"{error} (attempt {attempts}; retrying in {retry:.0f}s; or decide with {how_to_decide(toolcall.name)})"
    changed = (
        toolcall.phase != ToolCallPhase.ERROR_REQUESTING_HUMAN_APPROVAL or toolcall.status.error != error
    )
    return Transition(
        status={
            "phase": ToolCallPhase.ERROR_REQUESTING_HUMAN_APPROVAL.value,
            "status": "Error",
            "statusDetail": detail,
            "error": error,
            "externalCallID": None,
            "claimedBy": None,
            "claimedAt": precise_timestamp(now),
            "attempts": attempts,
        },
        events=[warning(reason, error)] if changed else [],
    )


def plan_checked(
    toolcall: TaskRunToolCall, detail: str, now: datetime, problem: str | None = None
) -> Transition:
    """A status check found no answer yet (or failed): count it, so the next one is due later."""
    shown = detail if problem is None else f"{detail} (last check failed: {problem}; retrying)"
    events = []
    if problem is not None and toolcall.status.status_detail != shown:
        events.append(warning("HumanLayerCheckFailed", problem))
    return Transition(
        status={
            "statusDetail": shown,
            "claimedAt": precise_timestamp(now),
            "attempts": (toolcall.status.attempts or 0) + 1,
        },
        events=events,
    )


# -- humans as tools ---------------------------------------------------------------------------------


def plan_contact_channel_gone(
    toolcall: TaskRunToolCall, problem: str, now: datetime, *, sent: bool = True
) -> Transition:
    """A human contact request whose ContactChannel was deleted: while it waited for the answer
    (``sent``), or before it could be sent. Either way no retry brings the channel back."""
    if sent:
        message = f"the human contact request can no longer be answered: {problem}"
    else:
        message = f"no human can be contacted: {problem}"
    return plan_tool_failure(toolcall, message, now, reason="NoContactChannel")


def input_detail(channel: str) -> str:
    return f"Waiting for human input via contact channel {channel}"


APPROVAL = HumanAsk(
    phase=ToolCallPhase.AWAITING_HUMAN_APPROVAL,
    first_detail=waiting_detail,
    waiting_detail=waiting_detail,
    event_reason="AwaitingHumanApproval",
    event_message=lambda channel: f"Tool execution requires approval via contact channel {channel}",
    refresh_detail=True,
)
CONTACT = HumanAsk(
    phase=ToolCallPhase.AWAITING_HUMAN_INPUT,
    first_detail=lambda channel: f"Contacting a human via contact channel {channel}",
    waiting_detail=input_detail,
    event_reason="AwaitingHumanContact",
    event_message=lambda channel: f"Asking a human via contact channel {channel}",
    refresh_detail=False,
    spanned=True,
)


def plan_contact_failed(
    toolcall: TaskRunToolCall,
    channel: str,
    error: str,
    reason: str,
    now: datetime,
    max_attempts: int = HUMAN_CONTACT_MAX_ATTEMPTS,
) -> Transition:
    attempts = (toolcall.status.attempts or 0) + 1
    if attempts >= max_attempts:
        message = (
            f"could not contact a human via contact channel {channel} after {attempts} attempts: {error}"
        )
        failed = plan_tool_failure(toolcall, message, now, reason=reason)
        failed.status["attempts"] = attempts
        return failed
    retry = recheck_delay(attempts)
    changed = toolcall.status.status != "Error" or toolcall.status.error != error
    return Transition(
        status={
            "phase": ToolCallPhase.AWAITING_HUMAN_INPUT.value,
            "status": "Error",
            "statusDetail": f"{error} (attempt {attempts} of {max_attempts}; retrying in {retry:.0f}s)",
            "error": error,
            "externalCallID": None,
            "claimedBy": None,
            "claimedAt": precise_timestamp(now),
            "attempts": attempts,
        },
        events=[warning(reason, error)] if changed else [],
    )


def plan_human_responded(
    toolcall: TaskRunToolCall,
    channel: str,
    response: str,
    by: str,
    now: datetime,
    max_bytes: int = HUMAN_TEXT_MAX_BYTES,
) -> Transition:
    who = f" ({by})" if by else ""
    return Transition(
        status={
            "phase": ToolCallPhase.SUCCEEDED.value,
            "status": "Succeeded",
            "statusDetail": f"Human responded via contact channel {channel}",
            "result": truncate(response, max_bytes),
            "error": None,
            "completionTime": timestamp(now),
            "claimedBy": None,
            "claimedAt": None,
            "attempts": None,
        },
        events=[normal("HumanResponded", f"Human responded via contact channel {channel}{who}")],
    )
