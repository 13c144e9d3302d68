"""Delegation to sub-agents: a tool call that delegates starts a child TaskRun and waits for its answer;
one that ends for a reason of its own stops the sub-agent run it may have started."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kubechain.kube.errors import Conflict, Forbidden, NotFound, Unavailable
from kubechain.models import (
    LABEL_TASKRUNTOOLCALL,
    Agent,
    ObjectMeta,
    Task,
    TaskRun,
    TaskRunToolCall,
    ToolCallPhase,
    label_value,
)
from kubechain.models.common import LocalObjectReference
from kubechain.models.labels import LABEL_AGENT, LABEL_DEPTH, LABEL_PARENT_RUN, LABEL_ROOT_RUN, is_object_name
from kubechain.models.taskrun import TaskRunSpec
from kubechain.observability.tracing import toolcall_traceparent
from kubechain.statemachines.toolcall import (
    DELEGATED_FROM_ANNOTATION,
    DELEGATION_CHAIN_ANNOTATION,
    child_run_name,
    delegation_problem,
    missing_agent_problem,
    parse_arguments,
    plan_awaiting_sub_agent,
    plan_invalid_arguments,
    plan_stranded,
    plan_sub_agent_not_started,
    plan_sub_agent_outcome,
    plan_tool_failure,
    sub_agent_runs_problem,
    sub_agent_start_expired,
)
from kubechain.statemachines.transition import (
    Transition,
    foreign_child_message,
    parse_timestamp,
    text_as_stored,
)
from workers import approvals
from workers.context import WorkerContext
from workers.tool_outcomes import apply_call_transition, call_ended
from workers.transitions import apply_transition, backoff_delays, create_children, retry_on_conflict
from workers.validators import get_or_none

if TYPE_CHECKING:
    from workers.tool_call import Executor

log = logging.getLogger(__name__)


def _fail_as_foreign(ctx: WorkerContext, toolcall: TaskRunToolCall, child_name: str, now: datetime) -> None:
    foreign = foreign_child_message(TaskRun.KIND, child_name, toolcall.KIND)
    apply_call_transition(ctx, toolcall, plan_tool_failure(toolcall, foreign, now, reason="SubAgentFailed"))


def _runs_started_from(ctx: WorkerContext, toolcall: TaskRunToolCall, root: str, own_child: str) -> int:
    """Sub-agent runs started from the user's run ``root``, at every depth (counted up to the limit:
    nothing needs more). 0 when an earlier attempt of this call created its child: it was let in then."""
    limit = ctx.settings.max_sub_agent_runs
    started = ctx.kube.count_raw(TaskRun.PLURAL, toolcall.namespace, f"{LABEL_ROOT_RUN}={root}", limit)
    if started < limit:
        return started
    own = get_or_none(ctx, TaskRun, toolcall.namespace, own_child)
    if own is not None and own.metadata.owned_by(toolcall.uid):
        return 0
    return started


def _missing_agent(ctx: WorkerContext, namespace: str, agent: str) -> str | None:
    """Why ``agent`` cannot be delegated to for not existing, or None. A cached read: a "not found" is
    never cached, and one deleted moments ago leaves its run to the start timeout, as before."""
    exists = is_object_name(agent) and get_or_none(ctx, Agent, namespace, agent, cached=True) is not None
    return missing_agent_problem(agent, exists=exists)


def parent_agent(ctx: WorkerContext, run: TaskRun) -> str:
    """The Agent of ``run``: the one it started with, else the one its Task names ("" if none)."""
    if run.own_agent_name is not None:
        return run.own_agent_name
    if run.spec.task_ref is not None:
        task = get_or_none(ctx, Task, run.namespace, run.spec.task_ref.name, cached=True)
        if task is not None:
            return task.spec.agent_ref.name
    return ""


def fail_if_stranded(
    ctx: WorkerContext,
    toolcall: TaskRunToolCall,
    problem: str | None,
    now: datetime,
    *,
    approved_too: bool = False,
) -> bool:
    """Fail a call waiting in a phase nothing moves it out of any more (plan_stranded); True if it did."""
    stranded = plan_stranded(toolcall, problem, now, approved_too=approved_too)
    if stranded is None:
        return False
    stop_sub_agent_runs(ctx, toolcall)  # its failure is logged once written (apply_transition)
    apply_call_transition(ctx, toolcall, stranded)
    return True


def _sub_agent_runs(ctx: WorkerContext, toolcall: TaskRunToolCall) -> list[TaskRun]:
    """The sub-agent runs this call started: found by its label, and owned by it (anyone may set a label)."""
    selector = f"{LABEL_TASKRUNTOOLCALL}={label_value(toolcall.name)}"
    runs = ctx.kube.list(TaskRun, toolcall.namespace, selector)
    return sorted((run for run in runs if run.metadata.owned_by(toolcall.uid)), key=lambda run: run.name)


NOT_STARTED_PHASES = ("", ToolCallPhase.PENDING)


def _may_have_started_a_sub_agent(toolcall: TaskRunToolCall, executor: Executor | None) -> bool:
    """Whether the call may own a sub-agent run, judged without a request. One waiting for it does; so may
    one still ""/Pending that delegates, or whose Tool is gone (it may have delegated): delegate creates
    the child first, and its AwaitingSubAgent write may never have landed (the worker killed in between,
    the write refused). Any other call never started one, and is not made to pay a LIST for it."""
    if toolcall.phase == ToolCallPhase.AWAITING_SUB_AGENT:
        return True
    if toolcall.phase not in NOT_STARTED_PHASES or executor is None:
        return False
    return executor.delegate_to is not None or executor.tool_not_found


def stop_sub_agent_runs(
    ctx: WorkerContext, toolcall: TaskRunToolCall, executor: Executor | None = None, *, keep: str = ""
) -> list[str]:
    """A call that may have delegated is about to end for a reason of its own (its run ended, its Tool
    changed, it was rejected): its sub-agent's run, which nothing will read any more, is deleted rather
    than left spending tokens (the call, and so its child, is kept for good, so garbage collection never
    removes it). ``executor``: the call's target, for a call still ""/Pending (see
    _may_have_started_a_sub_agent). ``keep``: the run whose outcome the call records, left as it is.
    Returns the names of the sub-agent runs the call started (finished ones are kept, their answers
    readable).

    Called before the call's terminal write: a delete that fails for a moment (Unavailable) raises with the
    call still waiting, so the retry, or the resync, decides again and deletes again. After that write,
    nothing would ever look at the call again (but stop_sub_agent_runs_created_meanwhile, once). Each step
    is idempotent (a deleted run is NotFound)."""
    if not _may_have_started_a_sub_agent(toolcall, executor):
        return []
    children = _sub_agent_runs(ctx, toolcall)
    for child in children:
        if child.name != keep:
            _delete_unfinished(ctx, toolcall, child)
    return [child.name for child in children]


def _delete_unfinished(ctx: WorkerContext, toolcall: TaskRunToolCall, child: TaskRun) -> None:
    """Delete ``toolcall``'s sub-agent run ``child``, which nothing will read; a finished one is kept, its
    answer readable."""
    if child.is_terminal():
        return
    try:
        ctx.kube.delete(TaskRun.PLURAL, child.namespace, child.name)
        log.info(
            "deleted sub-agent run %s/%s: its tool call %s (phase %s) ends without waiting for it",
            child.namespace,
            child.name,
            toolcall.name,
            toolcall.phase or "Pending",
        )
    except NotFound:
        pass
    except Forbidden as exc:  # RBAC without delete on taskruns: it runs on, unread
        log.warning("could not delete sub-agent run %s/%s: %s", child.namespace, child.name, exc)


# How long _stop_through_hiccups tries through an unreachable API server, on ctx.clock: the time spent,
# not only the waits between attempts (backoff_delays: 0.5 s, then doubling), as an attempt makes up to three requests,
# each of which may wait out the client's read timeout. No attempt starts past it, so the worker is held
# for at most this plus one attempt. The waits alone are bounded too (their schedule within the budget),
# since the wall clock may be stepped back meanwhile.
STOP_RETRY_BUDGET_S = 16.0


def _stop_through_hiccups(ctx: WorkerContext, toolcall: TaskRunToolCall, stop: Callable[[], object]) -> None:
    """Run ``stop``, a last chance to stop ``toolcall``'s sub-agent run (a retry of the task finds the call
    ended and does nothing): an API server unreachable for a moment is waited out here."""
    started = ctx.clock()
    delays = backoff_delays(STOP_RETRY_BUDGET_S)  # their sum bounds the waits even if the clock steps back
    while True:
        try:
            stop()
            return
        except Unavailable as exc:
            elapsed_s = (ctx.clock() - started).total_seconds()
            delay = next(delays, None)
            if delay is None or elapsed_s + delay >= STOP_RETRY_BUDGET_S:
                log.warning(
                    "could not stop the sub-agent run of tool call %s/%s (tried for %.0f s): %s",
                    toolcall.namespace,
                    toolcall.name,
                    elapsed_s,
                    exc,
                )
                raise
            ctx.sleep(delay)


def stop_sub_agent_runs_created_meanwhile(
    ctx: WorkerContext, toolcall: TaskRunToolCall, executor: Executor | None
) -> None:
    """After the write that ended ``toolcall`` (as read: ""/Pending, maybe delegating): another worker may
    have been creating its sub-agent run, after the LIST before that write. Its AwaitingSubAgent write then
    conflicts, and its check of the call (_stop_if_not_waited_for) may have come before this write landed,
    and left the run; its create landed before that check, so this LIST finds it. Only a call that may
    delegate pays the LIST (_may_have_started_a_sub_agent)."""
    if toolcall.phase in NOT_STARTED_PHASES and _may_have_started_a_sub_agent(toolcall, executor):
        _stop_through_hiccups(ctx, toolcall, lambda: stop_sub_agent_runs(ctx, toolcall, executor))


def _stop_if_not_waited_for(ctx: WorkerContext, toolcall: TaskRunToolCall, child_name: str) -> None:
    """The call's AwaitingSubAgent write conflicted (or went unanswered) after its sub-agent run
    ``child_name`` was created: the call may have ended meanwhile (rejected, its run ended), recorded after
    a LIST too early to find that run, which would then run on unread for good. A call still not started,
    or waiting for a sub-agent, is left to the retry (it waits for the run, or stops it before it ends the
    call), unless rejected; one ended after this check is left to the worker that ended it
    (stop_sub_agent_runs_created_meanwhile)."""
    _stop_through_hiccups(ctx, toolcall, lambda: _stop_if_not_waited_for_once(ctx, toolcall, child_name))


def _rejected_before_it_started(toolcall: TaskRunToolCall) -> bool:
    """A call not started that carries a rejection: it will never wait for a sub-agent run
    (rejected_by_annotation)."""
    decision = approvals.machine.annotation_decision(toolcall)
    return toolcall.phase in NOT_STARTED_PHASES and decision is not None and not decision.approved


def _may_wait_for_sub_agent(toolcall: TaskRunToolCall) -> bool:
    """Whether ``toolcall`` waits for a sub-agent run, or may yet (not started, not rejected)."""
    return (
        not _rejected_before_it_started(toolcall)
        and not toolcall.is_terminal()
        and toolcall.phase in (*NOT_STARTED_PHASES, ToolCallPhase.AWAITING_SUB_AGENT)
    )


def _stop_if_not_waited_for_once(ctx: WorkerContext, toolcall: TaskRunToolCall, child_name: str) -> None:
    current = get_or_none(ctx, TaskRunToolCall, toolcall.namespace, toolcall.name)
    if current is None or current.uid != toolcall.uid:
        return  # deleted: garbage collection removes the run it owns
    # A rejected call is stopped now, not left to whoever records the rejection, who may have looked for
    # the run too early.
    if _may_wait_for_sub_agent(current):
        return
    child = get_or_none(ctx, TaskRun, toolcall.namespace, child_name)
    if child is not None and child.metadata.owned_by(toolcall.uid):
        _delete_unfinished(ctx, current, child)


def not_waited_for(ctx: WorkerContext, run: TaskRun) -> str | None:
    """Why the sub-agent run ``run`` will never be read by the tool call that started it (None if the
    call waits for it, or may yet; and for any run a delegation did not start, without a request).

    Asked before the run's first turn, to close the race no LIST of the call's runs can: the call ended
    by a worker whose LISTs (before and after its write) both came before the create of this run, whose
    creator then died, or found the call ended. The read is fresh (not from a cache) and comes after the
    create: a call it finds still waiting that ends later does so by a write after it, and the LIST that
    follows that write finds this run."""
    ref = run.spec.task_run_tool_call_ref
    owner = next(
        (
            o
            for o in run.metadata.owner_references
            if ref is not None and o.kind == TaskRunToolCall.KIND and o.name == ref.name
        ),
        None,
    )
    if owner is None:
        return None
    call = get_or_none(ctx, TaskRunToolCall, run.namespace, owner.name)
    if call is None or call.uid != owner.uid:
        return f'its tool call "{owner.name}" was deleted'
    if _may_wait_for_sub_agent(call):
        return None
    if _rejected_before_it_started(call):
        return f'its tool call "{owner.name}" was rejected'
    return f'its tool call "{owner.name}" ended ({call.phase}) without waiting for it'


def _record_not_started(
    ctx: WorkerContext,
    toolcall: TaskRunToolCall,
    child: TaskRun,
    plan: Callable[[TaskRunToolCall], Transition],
) -> None:
    """Fail ``toolcall`` as ``plan`` says, its sub-agent run ``child`` given up on for not starting (and
    deleted). A conflict is retried here while the call still waits: a retry of the whole step would find
    the run gone, and say only that it was deleted, not why. A call ended meanwhile was decided by its
    writer."""
    latest = [toolcall]

    def attempt() -> None:
        try:
            apply_call_transition(ctx, latest[0], plan(latest[0]), sub_agent=child)
        except Conflict:
            fresh = get_or_none(ctx, TaskRunToolCall, toolcall.namespace, toolcall.name)
            if fresh is None or fresh.uid != toolcall.uid or fresh.phase != ToolCallPhase.AWAITING_SUB_AGENT:
                return
            latest[0] = fresh
            raise

    retry_on_conflict(attempt)


def _decide_on_sub_agent(
    ctx: WorkerContext, toolcall: TaskRunToolCall, child: TaskRun, agent: str, now: datetime
) -> None:
    """``toolcall`` waits for its own sub-agent run ``child``: record its outcome once it has finished,
    or give it up (deleted) if it has not started in time."""
    child_name = child.name
    timeout_s = ctx.settings.sub_agent_start_timeout_s
    created = parse_timestamp(child.metadata.creation_timestamp)
    if sub_agent_start_expired(child.phase, created, now, timeout_s):
        # The other runs first (see below): were that LIST to fail after the delete, the retry would find
        # this run gone and could only say it was deleted, not that it never started.
        stop_sub_agent_runs(ctx, toolcall, keep=child.name)
        # Only the run in the state just read: one that started meanwhile is left to finish.
        deleted = True
        try:
            ctx.kube.delete(
                TaskRun.PLURAL, child.namespace, child.name, resource_version=child.resource_version
            )
        except Conflict:
            return  # it moved: the next message re-decides on its new state
        except NotFound:
            pass
        except Forbidden as exc:  # RBAC without delete on taskruns: still free the parent
            log.warning("could not delete sub-agent run %s: %s", child.name, exc)
            deleted = False
        waiting_for = child.status.status_detail or ""
        _record_not_started(
            ctx,
            toolcall,
            child,
            lambda current: plan_sub_agent_not_started(
                current, agent, child_name, waiting_for, timeout_s, now, deleted=deleted
            ),
        )
        return
    outcome = plan_sub_agent_outcome(
        toolcall,
        child.phase,
        child.status.output or "",
        child.status.error or "",
        now,
        max_bytes=ctx.limits.max_tool_result_bytes,
    )
    if outcome is not None:
        # Another run it owns was started by an earlier attempt, for the agent its Tool named then
        # (retargeted before the retry, that attempt's AwaitingSubAgent write lost): nothing reads it.
        stop_sub_agent_runs(ctx, toolcall, keep=child.name)
        apply_call_transition(ctx, toolcall, outcome, sub_agent=child)


def sub_agent_run_spec(toolcall: TaskRunToolCall, agent: str, arguments: dict[str, Any]) -> TaskRunSpec:
    """The spec of the run ``toolcall`` starts of ``agent``: the same for every attempt of the call, so a
    run found under its name that is not exactly this is not the one it started."""
    message = arguments.get("message")
    if not isinstance(message, str) or not message.strip():
        message = json.dumps(arguments)
    return TaskRunSpec(
        agent_ref=LocalObjectReference(name=agent),
        # as the API server stores it: a lone surrogate (half an emoji the LLM escaped) is read back as
        # U+FFFD, and the run read back must equal this one
        user_message=text_as_stored(message),
        task_run_tool_call_ref=LocalObjectReference(name=toolcall.name),  # the original's field for it
    )


def delegate(ctx: WorkerContext, toolcall: TaskRunToolCall, parent: TaskRun, executor: Executor) -> None:
    """Delegation needs no claim: its only side effect is a child TaskRun with a deterministic name."""
    agent = executor.delegate_to
    assert agent is not None
    now = ctx.clock()
    child_name = child_run_name(toolcall.name, agent)
    if toolcall.phase == "AwaitingSubAgent":
        child = get_or_none(ctx, TaskRun, toolcall.namespace, child_name)
        if child is None:
            # Looked up by owner, not by the name computed now: the Tool may delegate to another agent
            # since, and the run this call waited for must be named, and stopped.
            waited = _sub_agent_runs(ctx, toolcall)
            if waited:
                was = ", ".join(f'"{c.spec.agent_ref.name if c.spec.agent_ref else ""}"' for c in waited)
                runs = ", ".join(c.name for c in waited)
                retargeted = (
                    f'tool "{toolcall.spec.tool_ref.name}" now delegates to agent "{agent}", not to {was} '
                    f"(TaskRun {runs}, which this call waited for)"
                )
                fail_if_stranded(ctx, toolcall, retargeted, now)
                return
            gone = (
                f"no sub-agent TaskRun this call started is left (TaskRun {child_name} not found): it was "
                "deleted; run the task again"
            )
            apply_call_transition(ctx, toolcall, plan_tool_failure(toolcall, gone, now))
            return
        arguments, invalid = parse_arguments(toolcall)
        if not child.metadata.owned_by(toolcall.uid) or (
            invalid is None and child.spec != sub_agent_run_spec(toolcall, agent, arguments)
        ):
            # A run of that name made by someone else (an owner reference can be copied: the spec must be
            # the one this call gave): its answer would be taken as the sub-agent's.
            _fail_as_foreign(ctx, toolcall, child_name, now)
            return
        _decide_on_sub_agent(ctx, toolcall, child, agent, now)
        return
    if toolcall.phase not in NOT_STARTED_PHASES:
        # E.g. waiting for an approval (or approved) when its Tool was changed to delegate: nothing moves
        # it on any more.
        fail_if_stranded(
            ctx,
            toolcall,
            f'tool "{toolcall.spec.tool_ref.name}" now delegates to an agent',
            now,
            approved_too=True,
        )
        return
    # `kubechain reject` accepts a Pending call: the sub-agent is not started against that decision, and
    # one an earlier attempt started (its AwaitingSubAgent write lost) is stopped before it is recorded.
    if approvals.rejected_by_annotation(
        ctx, toolcall, before_write=lambda: stop_sub_agent_runs(ctx, toolcall, executor)
    ):
        stop_sub_agent_runs_created_meanwhile(ctx, toolcall, executor)
        return
    chain = [a for a in parent.metadata.annotations.get(DELEGATION_CHAIN_ANNOTATION, "").split(",") if a]
    chain.append(parent_agent(ctx, parent))
    root = parent.root_run_uid
    problem = (
        delegation_problem(chain, agent, ctx.settings.max_delegation_depth)
        or _missing_agent(ctx, toolcall.namespace, agent)
        or sub_agent_runs_problem(
            _runs_started_from(ctx, toolcall, root, child_name), ctx.settings.max_sub_agent_runs
        )
    )
    if problem is not None:
        # A run an earlier attempt started (its AwaitingSubAgent write lost) before its Agent was deleted,
        # say, is read by no one now.
        stop_sub_agent_runs(ctx, toolcall, executor)
        refusal = plan_tool_failure(toolcall, problem, now, reason="DelegationRefused")
        apply_call_transition(ctx, toolcall, refusal, outcome="rejected")  # as a tool not granted is
        # Another worker, let in by a count before this one, may have created the run meanwhile.
        stop_sub_agent_runs_created_meanwhile(ctx, toolcall, executor)
        return
    arguments, invalid = parse_arguments(toolcall)
    if invalid is not None:
        apply_call_transition(ctx, toolcall, plan_invalid_arguments(toolcall, invalid, now))
        return
    child = TaskRun(
        metadata=ObjectMeta(
            name=child_name,
            namespace=toolcall.namespace,
            labels={
                LABEL_TASKRUNTOOLCALL: label_value(toolcall.name),
                LABEL_DEPTH: str(len(chain)),
                LABEL_ROOT_RUN: root,
                # kubectl selects a run's sub-agent runs by its name, and an agent's runs (as for the
                # runs `kubechain run` starts) by the agent's
                LABEL_PARENT_RUN: label_value(parent.name),
                LABEL_AGENT: label_value(agent),
            },
            annotations={
                DELEGATION_CHAIN_ANNOTATION: ",".join(chain),
                # its root span links to this call's span, in the parent's trace (the run's own trace
                # stays its own: one per TaskRun)
                DELEGATED_FROM_ANNOTATION: toolcall_traceparent(parent.uid, toolcall.uid),
            },
            owner_references=[toolcall.owner_reference()],
        ),
        spec=sub_agent_run_spec(toolcall, agent, arguments),
    )
    # Child first (idempotent by name), then the status write: a crash in between is finished by a retry.
    found: dict[str, dict[str, Any]] = {}
    refused = create_children(ctx, toolcall, [child], found=found)
    if refused is not None:
        call_ended(toolcall, refused)
        return  # the API server refused the child for good (or one not ours has its name): call failed
    try:
        waiting = apply_transition(ctx, toolcall, plan_awaiting_sub_agent(toolcall, child_name, agent, now))
    except (Conflict, Unavailable):
        # Unavailable too: the write may have been refused (the call ended meanwhile) with the answer
        # lost, and the retry would find the call ended and return. Not landed, the call reads Pending.
        _stop_if_not_waited_for(ctx, toolcall, child_name)
        raise  # the retry re-reads the call and decides again
    earlier = found.get(child_name)
    if earlier is not None:
        # Started by an earlier attempt, it may have finished already: its end prompted the call before
        # it waited, and nothing else will until the resync.
        _decide_on_sub_agent(ctx, waiting, TaskRun.from_wire(earlier), agent, now)
