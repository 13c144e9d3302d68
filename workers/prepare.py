"""``prepare``: build a TaskRun's first context window, and fan in finished tool calls for the next turn."""

from __future__ import annotations

import logging

from kubechain.kube.errors import NotFound
from kubechain.models import (
    LABEL_TASKRUNTOOLCALL,
    LABEL_TOOLCALLREQUEST,
    Agent,
    Task,
    TaskRun,
    TaskRunPhase,
    TaskRunToolCall,
)
from kubechain.queueing import ResourceMessage
from kubechain.statemachines.taskrun import plan_fan_in, plan_initial_context
from workers.context import WorkerContext
from workers.transitions import apply_transition, create_children, retry_on_conflict
from workers.validators import get_or_none

log = logging.getLogger(__name__)


def prepare(ctx: WorkerContext, message: ResourceMessage) -> None:
    retry_on_conflict(lambda: _prepare_once(ctx, message))


def _prepare_once(ctx: WorkerContext, message: ResourceMessage) -> None:
    try:
        run = ctx.kube.get(TaskRun, message.namespace, message.name)
    except NotFound:
        return
    if run.metadata.deletion_timestamp or run.is_terminal():
        return
    if run.phase == TaskRunPhase.TOOL_CALLS_PENDING:
        _fan_in(ctx, run)
    elif run.phase in ("", TaskRunPhase.INITIALIZING, TaskRunPhase.PENDING):
        _initial_context(ctx, run)


def _initial_context(ctx: WorkerContext, run: TaskRun) -> None:
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
    if agent_name:
        # A Ready agent read a moment ago is good enough; anything else is read fresh, so a run never
        # waits on a stale "not ready".
        agent = get_or_none(ctx, Agent, run.namespace, agent_name, cached=True)
        if agent is None or not agent.status.ready:
            agent = get_or_none(ctx, Agent, run.namespace, agent_name)
    transition = plan_initial_context(run, task, task_missing, agent, ctx.clock())
    if transition is not None:
        apply_transition(ctx, run, transition)


def _fan_in(ctx: WorkerContext, run: TaskRun) -> None:
    selector = f"{LABEL_TASKRUNTOOLCALL}={run.name},{LABEL_TOOLCALLREQUEST}={run.status.tool_call_request_id}"
    toolcalls = ctx.kube.list(TaskRunToolCall, run.namespace, selector)
    decision = plan_fan_in(run, toolcalls, ctx.clock(), ctx.limits)
    if decision.missing:
        # The ToolCallsPending write won but its worker died before creating every child: finish the job.
        create_children(ctx, run, list(decision.missing))
    if decision.transition is not None:
        apply_transition(ctx, run, decision.transition)
