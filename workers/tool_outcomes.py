"""The end of a tool call that no worker executes (delegated to a sub-agent, a question to a human, decided
by a human): counted in the tool call metrics, and its ``ToolCall`` span made, by the worker whose write
ended the call; and a person's answer (an approval's decision, a question's answer), observed as the
human's wait by the worker whose write recorded it.

An executed call is counted, and its span made, around its execution (workers/tool_call.py). These calls
wait across many tasks and restarts for work done elsewhere, so they are known whole only at their end, as
a run's root span is: every write that may end one, or record a person's answer, goes through
``apply_call_transition``.
"""

from __future__ import annotations

import logging
from datetime import datetime

from kubechain.kube.errors import TooLarge
from kubechain.models import TaskRun, TaskRunToolCall, ToolCallPhase
from kubechain.observability.metrics import count_tool_call, observe_human_wait
from kubechain.observability.tracing import export_toolcall_span, run_trace_ids
from kubechain.statemachines.approval import APPROVAL_WAITING_PHASES
from kubechain.statemachines.toolcall import (
    WAITING_ELSEWHERE_PHASES,
    ends_the_call,
    outcome_label,
    plan_outcome_too_large,
    seconds_taken,
)
from kubechain.statemachines.transition import Transition, parse_timestamp
from workers.context import WorkerContext
from workers.transitions import apply_transition

log = logging.getLogger(__name__)


def apply_call_transition(
    ctx: WorkerContext,
    toolcall: TaskRunToolCall,
    transition: Transition,
    *,
    sub_agent: TaskRun | None = None,
    outcome: str | None = None,
) -> TaskRunToolCall:
    """``apply_transition`` for a tool call; a write that ended it (``call_ended``) or recorded a person's
    answer (``human_answered``) is recorded once it landed: a write refused with a conflict raises first,
    and the retry finds the call ended or decided, so each is counted once.

    A write that ends the call refused as too large (its result, with the call's arguments, over etcd's
    limit) is refused again at every retry, and the call would wait for good: it ends at once instead,
    saying why (plan_outcome_too_large)."""
    try:
        written = apply_transition(ctx, toolcall, transition)
    except TooLarge as refused:
        if not ends_the_call(transition):
            raise
        log.error(
            "the API server refused the outcome of TaskRunToolCall %s/%s as too large (%s); ending it saying so",
            toolcall.namespace,
            toolcall.name,
            refused,
        )
        sub_agent_name = sub_agent.name if sub_agent is not None else ""
        transition = plan_outcome_too_large(
            toolcall, transition, str(refused), ctx.clock(), sub_agent=sub_agent_name
        )
        written = apply_transition(ctx, toolcall, transition)  # the object is as it was: same version
    human_answered(toolcall, written, ctx.clock())
    call_ended(toolcall, written, sub_agent=sub_agent, outcome=outcome)
    return written


def human_answered(before: TaskRunToolCall, written: TaskRunToolCall, now: datetime) -> None:
    """Observe the human's wait if the write from ``before`` recorded a person's answer at ``now``: an
    approval's decision (approved or rejected), or the answer to a human-contact tool's question; the wait
    counts from the call's startTime, when the person was first asked."""
    if before.phase in APPROVAL_WAITING_PHASES and written.phase in (
        ToolCallPhase.READY_TO_EXECUTE_APPROVED_TOOL,
        ToolCallPhase.TOOL_CALL_REJECTED,
    ):
        kind = "approval"
    elif before.phase == ToolCallPhase.AWAITING_HUMAN_INPUT and written.phase == ToolCallPhase.SUCCEEDED:
        kind = "contact"
    else:
        return
    asked = parse_timestamp(before.status.start_time)
    if asked is not None:
        observe_human_wait(kind, max(0.0, (now - asked).total_seconds()))


def call_ended(
    before: TaskRunToolCall,
    written: TaskRunToolCall,
    *,
    sub_agent: TaskRun | None = None,
    outcome: str | None = None,
) -> None:
    """Record ``written`` if the write from ``before`` ended the call: count it (``outcome``: its label,
    when its status alone does not tell it, see outcome_label), and make the span of a call that waited
    elsewhere (``sub_agent``: the run it waited for, named and linked to).

    Its latency is observed only for a call that waited for a sub-agent, whose run was its execution:
    from its start to its end. Any other that ends here never executed (refused, failed before it ran,
    or while it waited for an approval), or its time was a person's (a human-contact tool's question):
    such a time is a human's wait (human_answered), not a tool's."""
    if before.is_terminal() or not written.is_terminal():
        return
    label = outcome or outcome_label(written)
    executed = before.phase == ToolCallPhase.AWAITING_SUB_AGENT
    count_tool_call(written.spec.tool_ref.name, label, seconds_taken(written) if executed else None)
    if before.phase in WAITING_ELSEWHERE_PHASES and written.status.span_context is not None:
        _export_span(written, label, sub_agent)


def _export_span(call: TaskRunToolCall, outcome: str, sub_agent: TaskRun | None) -> None:
    run_uid = next((o.uid for o in call.metadata.owner_references if o.kind == TaskRun.KIND), "")
    ended = parse_timestamp(call.status.completion_time)
    if not run_uid or ended is None:
        return  # not a run's call (spanContext names no run's trace), or no end recorded
    failed = call.phase == ToolCallPhase.FAILED
    attributes: dict[str, str] = {"kubechain.toolcall": call.name, "kubechain.tool.outcome": outcome}
    if sub_agent is not None:
        attributes["kubechain.subagent.taskrun"] = sub_agent.name
        attributes["kubechain.subagent.trace_id"] = run_trace_ids(sub_agent.uid)["traceID"]
    export_toolcall_span(
        run_uid,
        call.uid,
        call.spec.tool_ref.name,
        parse_timestamp(call.status.start_time) or ended,
        ended,
        (call.status.error or "tool call failed") if failed else None,
        linked_run_uid=sub_agent.uid if sub_agent is not None else None,
        **attributes,
    )
