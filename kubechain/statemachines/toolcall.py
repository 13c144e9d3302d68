"""The TaskRunToolCall state machine (pure): claim, then record the outcome exactly once.

"" / Pending / ReadyToExecuteApprovedTool --claim--> Running --> Succeeded | Failed
Running with a stale claim (the worker died) --> Running again if the tool is idempotent, else Failed
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubechain.models import TaskRunToolCall, ToolCallPhase
from kubechain.statemachines.transition import (
    Transition,
    claim_remaining_s,
    normal,
    precise_timestamp,
    timestamp,
    warning,
)

CLAIMABLE_PHASES = ("", ToolCallPhase.PENDING, ToolCallPhase.READY_TO_EXECUTE_APPROVED_TOOL)


@dataclass(frozen=True)
class ToolClaim:
    transition: Transition | None
    wait_s: float = 0.0
    reason: str = ""


def plan_tool_claim(
    toolcall: TaskRunToolCall, worker: str, now: datetime, claim_timeout_s: float, idempotent: bool
) -> ToolClaim:
    phase = toolcall.phase
    attempts = toolcall.status.attempts or 0
    if phase == ToolCallPhase.RUNNING:
        remaining = claim_remaining_s(toolcall.status.claimed_at, now, claim_timeout_s)
        if remaining > 0:
            return ToolClaim(None, remaining, f"running on {toolcall.status.claimed_by}")
        if not idempotent:
            message = (
                f"the worker executing this tool call ({toolcall.status.claimed_by}) was lost mid-execution; "
                "the tool is not declared idempotent, so it was not run again"
            )
            return ToolClaim(plan_tool_failure(toolcall, message, now, reason="ExecutionInterrupted"))
    elif phase not in CLAIMABLE_PHASES:
        return ToolClaim(None, 0.0, f"phase {phase} is not executable")
    return ToolClaim(
        Transition(
            status={
                "phase": ToolCallPhase.RUNNING.value,
                "status": "Ready",
                "statusDetail": "Executing tool",
                "startTime": toolcall.status.start_time or timestamp(now),
                "claimedBy": worker,
                "claimedAt": precise_timestamp(now),
                "attempts": attempts + 1,
            }
        )
    )


def holds_claim(toolcall: TaskRunToolCall, worker: str, claimed_at: str) -> bool:
    return (
        toolcall.phase == ToolCallPhase.RUNNING
        and toolcall.status.claimed_by == worker
        and toolcall.status.claimed_at == claimed_at
    )


def plan_tool_success(
    toolcall: TaskRunToolCall, result: str, now: datetime, event_message: str
) -> Transition:
    return Transition(
        status={
            "phase": ToolCallPhase.SUCCEEDED.value,
            "status": "Succeeded",
            "statusDetail": "Tool executed successfully",
            "result": result,
            "error": None,
            "completionTime": timestamp(now),
            "claimedBy": None,
            "claimedAt": None,
        },
        events=[normal("ExecutionSucceeded", event_message)],
    )


INVALID_ARGUMENTS = "Invalid arguments JSON"


def parse_arguments(toolcall: TaskRunToolCall) -> tuple[dict[str, Any], str | None]:
    """The call's arguments, or the error the LLM is told when they are not a JSON object."""
    try:
        value = json.loads(toolcall.spec.arguments or "{}")
    except ValueError as exc:
        return {}, f"{INVALID_ARGUMENTS}: {exc}"
    if not isinstance(value, dict):
        return {}, f"{INVALID_ARGUMENTS}: arguments must be a JSON object, got {type(value).__name__}"
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
) -> Transition:
    return Transition(
        status={
            "phase": ToolCallPhase.FAILED.value,
            "status": "Error",
            "statusDetail": detail or error,
            "error": error,
            "completionTime": timestamp(now),
            "claimedBy": None,
            "claimedAt": None,
        },
        events=[warning(reason, error)],
    )


# -- delegation to a sub-agent ---------------------------------------------------------------------------

DELEGATION_CHAIN_ANNOTATION = "kubechain.humanlayer.dev/delegation-chain"


def child_run_name(toolcall_name: str, agent: str) -> str:
    """``delegate-<toolcall>-<agent>``, shortened with a hash when over 63 characters (stable per call)."""
    import hashlib

    name = f"delegate-{toolcall_name}-{agent}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def delegation_problem(chain: list[str], target: str, max_depth: int) -> str | None:
    """Why delegating from the agents in ``chain`` (outermost first) to ``target`` is refused, or None."""
    if target in chain:
        return f"delegation cycle: {' → '.join([*chain, target])}"
    if len(chain) >= max_depth:
        return f"delegation depth limit of {max_depth} reached ({' → '.join([*chain, target])})"
    return None


def plan_awaiting_sub_agent(toolcall: TaskRunToolCall, child: str, agent: str, now: datetime) -> Transition:
    return Transition(
        status={
            "phase": ToolCallPhase.AWAITING_SUB_AGENT.value,
            "status": "Ready",
            "statusDetail": f'Waiting for sub-agent "{agent}" (TaskRun {child})',
            "startTime": toolcall.status.start_time or timestamp(now),
        },
        events=[normal("DelegatingToSubAgent", f'Delegated to agent "{agent}" as TaskRun {child}')],
    )


def plan_sub_agent_outcome(
    toolcall: TaskRunToolCall, child_phase: str, output: str, error: str, now: datetime
) -> Transition | None:
    if child_phase == "FinalAnswer":
        transition = plan_tool_success(toolcall, output, now, "Sub-agent completed")
        transition.events = [normal("SubAgentCompleted", "Sub-agent completed")]
        return transition
    if child_phase == "Failed":
        return plan_tool_failure(toolcall, f"sub-agent failed: {error}", now, reason="SubAgentFailed")
    return None
