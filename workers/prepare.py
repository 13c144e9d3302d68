"""``prepare``: build a TaskRun's first context window, and fan in finished tool calls for the next turn."""

from __future__ import annotations

import logging

from kubechain.kube.errors import TooLarge
from kubechain.models import (
    LABEL_TASKRUNTOOLCALL,
    LABEL_TOOLCALLREQUEST,
    Agent,
    Task,
    TaskRun,
    TaskRunPhase,
    TaskRunToolCall,
    label_value,
)
from kubechain.models.taskrun import FAN_IN_TASKRUN_PHASES
from kubechain.queueing import AgentSeen, ResourceMessage
from kubechain.statemachines.taskrun import (
    expected_toolcalls,
    plan_fan_in,
    plan_initial_context,
    plan_refused_as_too_large,
    plan_sub_agent_not_waited_for,
    tool_calls_created,
)
from kubechain.statemachines.transition import Transition, validated_as_it_stands
from kubechain.statemachines.validation import agent_ref_problem
from workers import delegation
from workers.context import WorkerContext
from workers.llm_call import resume_turn, take_turn_now
from workers.transitions import (
    apply_transition,
    create_children,
    decide_on_current,
    record_tool_calls_created,
)
from workers.validators import cached_agent, get_or_none

log = logging.getLogger(__name__)


def prepare(ctx: WorkerContext, message: ResourceMessage) -> None:
    decide_on_current(
        ctx,
        TaskRun,
        message.namespace,
        message.name,
        lambda run: _prepare_once(ctx, run, message.agent_seen),
        seen_version=message.resource_version,
    )


def _prepare_once(ctx: WorkerContext, run: TaskRun, seen: AgentSeen | None) -> None:
    """``seen``: the run's Agent as the watcher saw it; a cached copy behind it is read again."""
    if run.metadata.deletion_timestamp or run.is_terminal():
        return
    if run.phase in FAN_IN_TASKRUN_PHASES:
        _fan_in(ctx, run, seen)
    elif run.phase in ("", TaskRunPhase.INITIALIZING, TaskRunPhase.PENDING):
        _initial_context(ctx, run, seen)
    elif run.phase == TaskRunPhase.SEND_CONTEXT_WINDOW_TO_LLM:
        resume_turn(ctx, run, seen)  # this process's hand-off, if its claim was left in doubt


def _apply(
    ctx: WorkerContext,
    run: TaskRun,
    transition: Transition,
    agent: Agent | None = None,
    seen: AgentSeen | None = None,
) -> None:
    """A worker that consumes the llm queue takes a turn it makes ready (see ``take_turn_now``; ``agent``:
    the one its first context window was built from, ``seen``: the watcher's hint of it, to read it with
    otherwise); others leave it to the watcher and the queue.

    A window the API server refuses as too large (TooLarge: over etcd's limit by a measure ours missed)
    fails the run: it would be refused again at every resync, the run left waiting with no word of why."""
    ready = transition.phase() == TaskRunPhase.READY_FOR_LLM.value
    try:
        if ctx.continues_llm and ready:
            take_turn_now(ctx, run, transition, agent, seen)
        else:
            apply_transition(ctx, run, transition)
    except TooLarge as refused:
        if not ready:
            raise
        what = "the tool results" if run.phase in FAN_IN_TASKRUN_PHASES else "the first context window"
        log.error(
            "TaskRun %s/%s: the API server refused %s as too large: %s",
            run.namespace,
            run.name,
            what,
            refused,
        )
        apply_transition(ctx, run, plan_refused_as_too_large(run, what, str(refused), ctx.clock()))


def _initial_context(ctx: WorkerContext, run: TaskRun, seen: AgentSeen | None) -> None:
    not_waited_for = delegation.not_waited_for(ctx, run)
    if not_waited_for is not None:
        apply_transition(ctx, run, plan_sub_agent_not_waited_for(run, not_waited_for, ctx.clock()))
        return
    task = None
    task_missing = False
    direct = run.spec.agent_ref is not None and bool(run.spec.user_message)
    if not direct and run.spec.task_ref is not None:
        task = get_or_none(ctx, Task, run.namespace, run.spec.task_ref.name)
        task_missing = task is None
    agent_name = (
        run.spec.agent_ref.name if run.spec.agent_ref else (task.spec.agent_ref.name if task else None)
    )
    agent = None
    if agent_name and agent_ref_problem(agent_name) is None:  # (one no Agent can have fails the run)
        # A Ready agent read a moment ago, validated as its spec stands, is good enough unless the watcher
        # has seen a later generation or validation of it (the run was created right after an edit);
        # anything else is read fresh, so a run never waits on a stale "not ready".
        agent = cached_agent(ctx, run.namespace, agent_name, seen)
        if agent is None or not agent.status.ready or not validated_as_it_stands(agent):
            agent = get_or_none(ctx, Agent, run.namespace, agent_name)
    transition = plan_initial_context(run, task, task_missing, agent, ctx.clock(), ctx.limits)
    if transition is not None:
        # the first turn is built from the Agent its window is: both of one validated generation
        _apply(ctx, run, transition, agent)


def _fan_in(ctx: WorkerContext, run: TaskRun, seen: AgentSeen | None) -> None:
    selector = (
        f"{LABEL_TASKRUNTOOLCALL}={label_value(run.name)},"
        f"{LABEL_TOOLCALLREQUEST}={run.status.tool_call_request_id}"
    )
    toolcalls = ctx.kube.list(TaskRunToolCall, run.namespace, selector)
    decision = plan_fan_in(run, toolcalls, ctx.clock(), ctx.limits)
    if decision.missing:
        # The ToolCallsPending write won but its worker died before creating every child: finish the job.
        if create_children(ctx, run, list(decision.missing)) is not None:
            return  # the API server rejected one as invalid: the run was failed with the reason
        record_tool_calls_created(ctx, run)
    elif decision.transition is None and not tool_calls_created(run):
        # Every call is there and some still run: record it if their creator could not (it died, or
        # its write failed), so that one deleted from now on is not made again.
        existing = {toolcall.name for toolcall in toolcalls}
        if all(child.name in existing for child in expected_toolcalls(run)):
            record_tool_calls_created(ctx, run)
    if decision.transition is not None:
        _apply(ctx, run, decision.transition, seen=seen)
