"""``llm_call``: claim the turn with a conditional write, call the LLM once, record the answer."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable

from opentelemetry.trace import SpanKind

from kubechain.kube.errors import TooLarge
from kubechain.llm.base import LLMError, LLMResponse, ToolDefinition, build_request
from kubechain.llm.deadline import ending_by
from kubechain.models import LLM, Agent, ContactChannel, MCPServer, Task, TaskRun, TaskRunPhase, Tool
from kubechain.observability.metrics import HANDOFFS, LLM_REQUESTS, LLM_SECONDS, LLM_TOKENS, model_label
from kubechain.observability.tracing import span
from kubechain.queueing import AgentSeen, ResourceMessage, TaskName
from kubechain.redaction import redact
from kubechain.statemachines.taskrun import (
    holds_claim,
    plan_config_error,
    plan_llm_answer,
    plan_llm_claim,
    plan_llm_error,
    plan_refused_as_too_large,
    plan_turn_waits_for_agent,
    with_llm_claim,
)
from kubechain.statemachines.toolset import tool_definitions
from kubechain.statemachines.transition import Transition, precise_timestamp, validated_as_it_stands
from workers.context import WorkerContext
from workers.transitions import (
    apply_claim,
    apply_transition,
    call_time_left_s,
    decide_on_current,
    record_while_claimed,
    schedule_recheck,
)
from workers.validators import EmptySecretValue, SecretProblem, cached_agent, get_or_none, read_api_key

log = logging.getLogger(__name__)

PlanFn = Callable[[TaskRun], Transition]


class RunConfigError(Exception):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class AgentNotValidated(Exception):
    """The run's Agent was edited and its validation has not caught up: no turn is built from it."""

    def __init__(self, agent_name: str) -> None:
        super().__init__(agent_name)
        self.agent_name = agent_name


def llm_call(ctx: WorkerContext, message: ResourceMessage) -> None:
    decide_on_current(
        ctx,
        TaskRun,
        message.namespace,
        message.name,
        lambda run: _take_turn(ctx, run, message.agent_seen),
        seen_version=message.resource_version,
    )


def take_turn_now(
    ctx: WorkerContext,
    run: TaskRun,
    ready: Transition,
    agent: Agent | None = None,
    seen: AgentSeen | None = None,
) -> None:
    """Write ``ready`` (a transition of ``run`` to ReadyForLLM) together with the claim of the turn it
    starts, then make that turn's LLM call: a worker that consumes the llm queue takes a turn it made
    ready itself, without a round trip through the watcher and the queue or a claim write of its own.
    ``agent``: the run's Agent as ``ready`` was decided on (its first context window built from it), which
    the turn is built from too (else it is read, a copy behind ``seen`` read again). A Conflict leaves
    ``run`` as it was, for the caller to re-read and re-decide."""
    with span(
        "llm_call TaskRun",
        None,
        **{"kubechain.namespace": run.namespace, "kubechain.name": run.name, "kubechain.reason": "handoff"},
    ):
        _claim_and_call(ctx, run, with_llm_claim(ready, ctx.identity, ctx.clock()), ready, agent, seen)


def _agent_for_turn(ctx: WorkerContext, namespace: str, name: str, seen: AgentSeen | None) -> Agent | None:
    """The Agent a turn is built from: one whose status (what its validation found of its tools, MCP
    servers, sub-agents and channels) is about its spec as it stands. A copy read a moment ago (the config
    cache) that is so will do: it is a generation that was validated, the turn taken as if just before a
    later edit, unless the watcher has seen a later one (``seen``): then it is read again. One that is not
    validated as it stands (read between an edit and its validation) is read again, so a validation done
    since is not waited out."""
    agent = cached_agent(ctx, namespace, name, seen)
    if agent is not None and not validated_as_it_stands(agent):
        agent = get_or_none(ctx, Agent, namespace, name)
    return agent


def _read_agent(ctx: WorkerContext, run: TaskRun, seen: AgentSeen | None) -> Agent:
    agent_name = run.own_agent_name  # the one it started with: an edit of its Task's agentRef is not followed
    if agent_name is None and run.spec.task_ref is not None:
        task = get_or_none(ctx, Task, run.namespace, run.spec.task_ref.name, cached=True)
        if task is None:
            raise RunConfigError(f'Task "{run.spec.task_ref.name}" not found', "TaskValidationFailed")
        agent_name = task.spec.agent_ref.name
    agent = _agent_for_turn(ctx, run.namespace, agent_name or "", seen)
    if agent is None:
        raise RunConfigError(f'Agent "{agent_name}" not found', "AgentFetchFailed")
    if not validated_as_it_stands(agent):
        raise AgentNotValidated(agent.name)
    return agent


def _resolve(
    ctx: WorkerContext, run: TaskRun, agent: Agent | None = None, seen: AgentSeen | None = None
) -> tuple[Agent, LLM, str, list[ToolDefinition]]:
    """The agent (``agent`` if given, else read: see _agent_for_turn), its LLM, the API key and the tool
    definitions; RunConfigError says what is missing, AgentNotValidated that the Agent's edit is not
    validated yet."""
    if agent is None:
        agent = _read_agent(ctx, run, seen)
    llm = get_or_none(ctx, LLM, run.namespace, agent.spec.llm_ref.name, cached=True)
    if llm is None:
        raise RunConfigError(
            f'Failed to get LLM: LLM "{agent.spec.llm_ref.name}" not found', "LLMFetchFailed"
        )
    ref = llm.spec.api_key_ref()
    try:
        api_key = read_api_key(ctx, run.namespace, ref.name, ref.key, cached=True)
    except EmptySecretValue as problem:
        raise RunConfigError(str(problem), "EmptyAPIKey") from None
    except SecretProblem as problem:
        raise RunConfigError(f"Failed to get API key secret: {problem}", "SecretFetchFailed") from None
    status = agent.status
    ns = run.namespace
    tools = [
        t
        for t in (get_or_none(ctx, Tool, ns, v.name, cached=True) for v in status.valid_tools or [])
        if t is not None
    ]
    servers = [
        s
        for s in (
            get_or_none(ctx, MCPServer, ns, v.name, cached=True) for v in status.valid_mcp_servers or []
        )
        if s is not None
    ]
    sub_agents = [
        a
        for a in (get_or_none(ctx, Agent, ns, v.name, cached=True) for v in status.valid_sub_agents or [])
        if a is not None
    ]
    channels = [
        c
        for c in (
            get_or_none(ctx, ContactChannel, ns, v.name, cached=True)
            for v in status.valid_human_contact_channels or []
        )
        if c is not None
    ]
    return agent, llm, api_key, tool_definitions(agent, tools, servers, sub_agents, channels)


BACKOFF_RECHECK_REASON = "backoff-recheck"
MIN_RECHECK_DELAY_S = 0.5


def resume_turn(ctx: WorkerContext, run: TaskRun, seen: AgentSeen | None = None) -> bool:
    """Whether ``run`` holds a claim of this process that was left in doubt (see apply_claim): then its
    LLM call was never made, and is made now under a fresh claim. The retry of a hand-off is a prepare
    task, which calls this too."""
    claim = ctx.claims_in_doubt.held(run, lambda claimed_at: holds_claim(run, ctx.identity, claimed_at))
    if claim is None:
        return False
    _claim_and_call(ctx, run, claim, seen=seen, claim_written=True)
    return True


def _take_turn(ctx: WorkerContext, run: TaskRun, seen: AgentSeen | None) -> None:
    """If the turn is free to take, claim it, call the LLM once and record the answer."""
    if run.metadata.deletion_timestamp or resume_turn(ctx, run, seen):
        return
    now = ctx.clock()
    claim = plan_llm_claim(run, ctx.identity, now, ctx.limits)
    if claim.transition is None:
        log.debug("llm_call skipped for %s/%s: %s", run.namespace, run.name, claim.reason)
        if run.phase == TaskRunPhase.ERROR_BACKOFF and claim.wait_s > 0:
            # The watcher scheduled this retry by its clock; this worker's says it is early (clocks differ
            # by a little): come back when due, not at the next resync, which may be minutes away.
            delay_s = max(claim.wait_s, MIN_RECHECK_DELAY_S)
            schedule_recheck(ctx, TaskName.LLM_CALL, run, BACKOFF_RECHECK_REASON, delay_s)
        return
    if claim.transition.phase() == "Failed":
        apply_transition(ctx, run, claim.transition)
        return
    _claim_and_call(ctx, run, claim.transition, seen=seen)


def _claim_and_call(
    ctx: WorkerContext,
    run: TaskRun,
    claim: Transition,
    ready: Transition | None = None,
    agent: Agent | None = None,
    seen: AgentSeen | None = None,
    *,
    claim_written: bool = False,
) -> None:
    """Write ``claim`` and, if it lands, call the LLM once and record the answer (counted as a hand-off
    if ``claim`` is one's). ``ready``: the part of ``claim`` that made the turn ready, written without the
    claim when the run cannot call its LLM (or must wait for its Agent); ``agent``: the run's Agent as
    ``ready`` was decided on; ``seen``: the watcher's hint of it, for reading it otherwise;
    ``claim_written``: ``run`` holds ``claim`` already (one left in doubt, stamped afresh here)."""
    try:
        _agent, llm, api_key, tools = _resolve(ctx, run, agent, seen)
    except AgentNotValidated as waiting:
        wait = plan_turn_waits_for_agent(run, waiting.agent_name, claim, claim_written=claim_written)
        if ready is not None:
            wait = ready.followed_by(wait) if wait is not None else ready
        if wait is not None:
            apply_transition(ctx, run, wait)
        return
    except RunConfigError as problem:
        failure = plan_config_error(run, str(problem), problem.reason, ctx.clock())
        apply_transition(ctx, run, failure if ready is None else ready.followed_by(failure))
        return
    # Stamped now, not when the turn was found free: reading the configuration may have waited out an API
    # server shedding load (429s), and every second of that would come off the claim the call runs under.
    claim.status["claimedAt"] = claimed_at = precise_timestamp(ctx.clock())
    # Conflict: another worker claimed first.
    claimed = apply_claim(ctx, run, claim, lambda current: holds_claim(current, ctx.identity, claimed_at))
    # The claim may have been stamped afresh (confirmed too late to act on): the answer is written under
    # the one the call is made under.
    claimed_at = claimed.status.claimed_at or claimed_at
    if not claim.handoff:
        _call_and_record(ctx, claimed, claimed_at, llm, api_key, tools)
        return
    # A hand-off that made its turn ready and claimed it (or its claim left in doubt, taken afresh by this
    # process's retry): counted from here on, once, as a claim that did not land raised above.
    outcome = "error"
    try:
        _call_and_record(ctx, claimed, claimed_at, llm, api_key, tools)
        outcome = "ok"
    finally:
        HANDOFFS.labels(outcome).inc()


def _unexpected(exc: Exception, api_key: str, run: TaskRun) -> LLMError:
    """An adapter bug or an SDK surprise, as a retryable LLM error (bounded by max attempts) rather than
    escaping with the claim held until it expires. Not an LLMError, so the client wrapper did not scrub
    the key from it: it is redacted here (its logged traceback too), before the cut, which could leave the
    start of an echoed key that no later redaction recognises."""
    trace = redact("".join(traceback.format_exception(exc)), [api_key])
    log.error("LLM request for %s/%s raised unexpectedly\n%s", run.namespace, run.name, trace)
    said = redact(str(exc), [api_key])[:300]
    return LLMError(f"LLM request failed: {type(exc).__name__}: {said}", retryable=True)


def _call_and_record(
    ctx: WorkerContext, claimed: TaskRun, claimed_at: str, llm: LLM, api_key: str, tools: list[ToolDefinition]
) -> None:
    """The LLM call of a turn this worker holds the claim on, and its answer or error written."""
    request = build_request(llm, list(claimed.status.context_window or []), tools)
    started = time.perf_counter()
    try:
        with span(
            "LLMRequest",
            None,
            None,
            SpanKind.CLIENT,  # a call to a remote service, as the Go original's
            **{
                "llm.request.model": request.model,
                # the Go original's names
                "context_window_size": len(request.messages),
                "tools_count": len(request.tools),
                "taskrun.name": claimed.name,
                "taskrun.namespace": claimed.namespace,
            },
        ) as current:
            try:
                # under a claim answered late, the call ends in time for its answer to be written
                with ending_by(time.monotonic() + call_time_left_s(ctx, claimed_at)):
                    response = ctx.llms.for_llm(llm, api_key).complete(request)
            except LLMError:
                raise
            except Exception as exc:  # noqa: BLE001 - converted in the span, which records what ends it
                raise _unexpected(exc, api_key, claimed) from None
            current.set_attribute("llm.response.tool_calls.count", len(response.tool_calls))
            if response.usage is not None:
                current.set_attribute("llm.usage.total_tokens", response.usage.total_tokens)
    except Exception as exc:  # noqa: BLE001 - after the claim, every failure must end in a status
        if not isinstance(exc, LLMError):
            exc = _unexpected(exc, api_key, claimed)
        model = model_label(request.model)
        LLM_REQUESTS.labels(model, "retryable" if exc.retryable else "error").inc()
        LLM_SECONDS.labels(model).observe(time.perf_counter() - started)
        if exc.cut_short:
            log.warning(
                "LLM call for %s/%s was cut short to end within its claim (written late): %s",
                claimed.namespace,
                claimed.name,
                exc,
            )
        else:
            log.warning("LLM request for %s/%s failed: %s", claimed.namespace, claimed.name, exc)
        _record(
            ctx,
            claimed,
            claimed_at,
            lambda current, error=exc: plan_llm_error(  # type: ignore[misc]
                current,
                str(error),
                error.retryable,
                error.retry_after_s,
                ctx.clock(),
                ctx.limits,
                status_code=error.status_code,
                cut_short=error.cut_short,
            ),
        )
        return
    _count_answer(claimed, request.model, response, time.perf_counter() - started)
    usage = response.usage.model_dump() if response.usage else None
    _record(
        ctx,
        claimed,
        claimed_at,
        lambda current: plan_llm_answer(
            current,
            response.content,
            response.tool_calls,
            usage,
            ctx.clock(),
            ctx.limits,
            truncated=response.truncated,
            context_window_full=response.context_window_full,
            content_filtered=response.content_filtered,
        ),
        # Our measure of the window fell short of the API server's (see _too_large): the answer cannot be
        # stored, and left unwritten it would be paid for again once the claim expired.
        lambda current, refused: plan_refused_as_too_large(
            current, "the LLM's answer", str(refused), ctx.clock(), usage
        ),
    )


def _count_answer(run: TaskRun, model_name: str, response: LLMResponse, seconds: float) -> None:
    """The answer's metrics. They come before it is written, and must not keep it from being written: it
    is paid for, and lost it is paid again once the claim expires (a negative token count made the
    counter raise). What cannot be counted is logged instead."""
    try:
        model = model_label(model_name)
        LLM_REQUESTS.labels(model, "ok").inc()
        LLM_SECONDS.labels(model).observe(seconds)
        if response.usage is not None:
            LLM_TOKENS.labels(model, "prompt").inc(response.usage.prompt_tokens)
            LLM_TOKENS.labels(model, "completion").inc(response.usage.completion_tokens)
    except Exception as exc:  # noqa: BLE001 - a metric never costs the answer
        log.warning(
            "could not count the LLM answer of %s/%s in its metrics: %s", run.namespace, run.name, exc
        )


def _record(
    ctx: WorkerContext,
    claimed: TaskRun,
    claimed_at: str,
    plan: PlanFn,
    refused_as_too_large: Callable[[TaskRun, TooLarge], Transition] | None = None,
) -> None:
    record_while_claimed(
        ctx,
        claimed,
        lambda current: holds_claim(current, ctx.identity, claimed_at),
        plan,
        "LLM answer",
        refused_as_too_large=refused_as_too_large,
    )
