"""The end of a tool call that no worker executes (delegated to a sub-agent, a question to a human, decided
by a human): counted in the tool call metrics, and its ``ToolCall`` span made, by the worker whose write
ended the call.

An executed call is counted, and its span made, around its execution (workers/tool_call.py). These calls
wait across many tasks and restarts for work done elsewhere, so they are known whole only at their end, as
a run's root span is: every write that may end one goes through ``apply_call_transition``.
"""

from __future__ import annotations

from kubechain.models import TaskRun, TaskRunToolCall, ToolCallPhase
from kubechain.observability.metrics import count_tool_call
from kubechain.observability.tracing import export_toolcall_span, run_trace_ids
from kubechain.statemachines.toolcall import WAITING_ELSEWHERE_PHASES, outcome_label, seconds_taken
from kubechain.statemachines.transition import Transition, parse_timestamp
from workers.context import WorkerContext
from workers.transitions import apply_transition


def apply_call_transition(
    ctx: WorkerContext,
    toolcall: TaskRunToolCall,
    transition: Transition,
    *,
    sub_agent: TaskRun | None = None,
    outcome: str | None = None,
) -> TaskRunToolCall:
    """``apply_transition`` for a tool call; a write that ended it is recorded (``call_ended``) once it
    landed: a write refused with a conflict raises first, and the retry finds the call ended, so a call
    is counted once."""
    written = apply_transition(ctx, toolcall, transition)
    call_ended(toolcall, written, sub_agent=sub_agent, outcome=outcome)
    return written


def call_ended(
    before: TaskRunToolCall,
    written: TaskRunToolCall,
    *,
    sub_agent: TaskRun | None = None,
    outcome: str | None = None,
) -> None:
    """Record ``written`` if the write from ``before`` ended the call: count it (``outcome``: its label,
    when its status alone does not tell it, see outcome_label; latency from its start to its end), and
    make the span of a call that waited elsewhere (``sub_agent``: the run it waited for, named and linked
    to)."""
    if before.is_terminal() or not written.is_terminal():
        return
    label = outcome or outcome_label(written)
    count_tool_call(written.spec.tool_ref.name, label, seconds_taken(written))
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
