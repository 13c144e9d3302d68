"""``tool_call``: claim a TaskRunToolCall, execute it once, record Succeeded or Failed."""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubechain.kube.errors import TooLarge, Unavailable
from kubechain.mcp.spec import ResolvedSpec
from kubechain.models import (
    Agent,
    MCPServer,
    TaskRun,
    TaskRunToolCall,
    Tool,
    ToolCallPhase,
)
from kubechain.observability.logs import bind_to_context, resource_context
from kubechain.observability.metrics import TASK_SECONDS, TASKS, count_tool_call
from kubechain.observability.tracing import span, span_with_ids
from kubechain.queueing import AgentSeen, ResourceMessage, TaskName
from kubechain.redaction import Scrubber, scrub_then_cut
from kubechain.statemachines.routing import RUN_ENDED
from kubechain.statemachines.taskrun import asked_for
from kubechain.statemachines.toolcall import (
    WAITING_ELSEWHERE_PHASES,
    ToolClaim,
    holds_claim,
    parse_arguments,
    plan_call_of_finished_run,
    plan_invalid_arguments,
    plan_outcome_too_large,
    plan_running_retyped,
    plan_tool_claim,
    plan_tool_failure,
    plan_tool_success,
    toolcall_span_context,
)
from kubechain.statemachines.toolset import MCP_SEPARATOR, ToolTarget, mcp_tool_name, resolve_tool_name
from kubechain.statemachines.transition import (
    Transition,
    claim_remaining_s,
    precise_timestamp,
)
from kubechain.statemachines.validation import tool_type, validate_tool_spec
from kubechain.tools.builtin import ToolError, run_builtin
from kubechain.tools.external_api import call_external_api
from workers import approvals, delegation
from workers.context import WorkerContext
from workers.tool_outcomes import apply_call_transition
from workers.transitions import (
    apply_claim,
    apply_transition,
    call_time_left_s,
    decide_on_current,
    record_while_claimed,
)
from workers.validators import SecretProblem, cached_agent, get_or_none, read_api_key

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    result: str | None = None
    error: str | None = None
    detail: str | None = None
    event_message: str = ""


class Executor:
    """Resolves a tool call's target; ``run`` performs it (the side effect, after the claim)."""

    def __init__(self, ctx: WorkerContext, toolcall: TaskRunToolCall, agent: Agent | None = None) -> None:
        self.ctx = ctx
        self.toolcall = toolcall
        self.agent = agent
        self.target: ToolTarget = resolve_tool_name(
            toolcall.spec.tool_ref.name,
            {ref.name for ref in agent.spec.mcp_servers} if agent is not None else None,
            {ref.name for ref in agent.spec.human_contact_channels} if agent is not None else None,
        )
        self.tool: Tool | None = None
        # The name was looked up as a Tool's and none was found: it may have been a delegating Tool's,
        # deleted since (even one read as an MCP server's tool then, offered as "<x>__<y>").
        self.tool_not_found = False
        self.server: MCPServer | None = None
        self.delegate_to: str | None = None  # the sub-agent a delegation goes to
        self.human_channel: str | None = None  # the ContactChannel a human-contact tool reaches
        self.problem: str | None = None
        # The Warning a call failed on ``problem`` gets: the original's ValidationFailed when its Tool does
        # not exist or cannot be used, ExecutionFailed otherwise (as for a tool that ran).
        self.problem_reason = "ExecutionFailed"
        self._secret_problem: str | None = None  # a Secret the call needs cannot be read (after prepare)
        self._token: str | None = None
        # the MCP server's spec with its Secrets read (by read_secrets)
        self._resolved: ResolvedSpec | None = None
        self._resolve()
        if self.problem is None:
            # Without its Agent, what the LLM was granted cannot be checked: nothing runs unchecked.
            self.problem = (
                self._not_granted(agent)
                if agent is not None
                else f"the Agent of TaskRun {toolcall.spec.task_run_ref.name} was not found: "
                "what it grants cannot be checked"
            )

    def _not_granted(self, agent: Agent) -> str | None:
        """The LLM may only use what its Agent was given, not any tool that happens to exist."""
        spec = agent.spec
        kind, name = self.target.kind, self.target.name
        granted = {
            "tool": {ref.name for ref in spec.tools},
            "mcp": {ref.name for ref in spec.mcp_servers},
            "subagent": {ref.name for ref in spec.sub_agents},
            "human": {ref.name for ref in spec.human_contact_channels},
        }[kind]
        subject = self.tool.name if (kind == "tool" and self.tool is not None) else name
        if subject in granted:
            return None
        field = {
            "tool": "tools",
            "mcp": "mcpServers",
            "subagent": "subAgents",
            "human": "humanContactChannels",
        }[kind]
        return f'tool "{self.toolcall.spec.tool_ref.name}" is not available to agent "{agent.name}" (not in spec.{field})'

    def _resolve(self) -> None:
        ns = self.toolcall.namespace
        if self.target.kind == "mcp":
            self.server = get_or_none(self.ctx, MCPServer, ns, self.target.name, cached=True)
            if self.server is None:
                self.problem = (
                    f'MCP server "{self.target.name}" not found for tool "{self.toolcall.spec.tool_ref.name}"'
                )
                self._disconnect_deleted(ns, self.target.name)
            else:
                # A tool whose own name the LLM APIs refuse was offered under another (mcp_function_name).
                listed = [tool.name for tool in self.server.status.tools or []]
                real = mcp_tool_name(self.target.name, self.target.tool, listed)
                self.target = dataclasses.replace(self.target, tool=real)
        elif self.target.kind == "tool":
            granted = [ref.name for ref in self.agent.spec.tools] if self.agent is not None else []
            self.tool = find_tool(self.ctx, ns, self.target.name, granted)
            self.tool_not_found = self.tool is None
            server, separator, rest = self.target.name.partition(MCP_SEPARATOR)
            if self.tool is None and separator and server and rest:
                # No Tool by that name, and it reads as <server>__<tool>: an MCP server's tool after all
                # (one the Agent was not given, or that does not exist), and the messages say so.
                self.target = ToolTarget("mcp", server, rest)
                self._resolve()
                return
            if self.tool is None:
                self.problem = (
                    f'unknown tool "{self.target.name}": no Tool resource with that name or function name'
                )
                self.problem_reason = "ValidationFailed"
            elif (invalid := validate_tool_spec(self.tool)) is not None:
                # edited while the call waited: its spec, not its status (which may not say so yet)
                self.problem = f'tool "{self.target.name}" cannot be used: {invalid}'
                self.problem_reason = "ValidationFailed"
            elif tool_type(self.tool) == "delegateToAgent" and self.tool.spec.agent_ref is not None:
                self.delegate_to = self.tool.spec.agent_ref.name
        elif self.target.kind == "subagent":
            self.delegate_to = self.target.name
        elif self.target.kind == "human":
            self.human_channel = self.target.name
        else:
            self.problem = f"{self.target.kind} tools are not supported by this worker yet"

    def _disconnect_deleted(self, namespace: str, name: str) -> None:
        """This process's session of an MCPServer found deleted ends here: nothing else tells a tools
        worker (validations run elsewhere), and it would keep its stdio child, with the server's secrets
        in its environment, until its idle timeout. A call in flight on it still gets its answer."""
        if self.ctx.mcp is None:
            return
        try:
            self.ctx.mcp.disconnect(namespace, name)
        except ToolError as exc:  # MCPError: the idle timeout closes it in the end
            log.warning("MCP server %s/%s was deleted; closing its session failed: %s", namespace, name, exc)

    @property
    def idempotent(self) -> bool:
        if self.tool is not None:
            return bool(self.tool.spec.idempotent) or tool_type(self.tool) == "function"
        if self.server is not None:
            return bool(self.server.spec.idempotent)
        return False

    def read_secrets(self) -> None:
        """Read the Secrets the call needs, before it is claimed: an API server that is briefly
        unreachable raises Unavailable here and the task is retried with the call still unclaimed, instead
        of failing it for good. A Secret that is missing or unreadable is reported when the call runs."""
        if self.server is not None and self.ctx.mcp is not None:
            try:
                self._resolved = self.ctx.mcp.resolve(self.server)
            except ToolError as exc:  # MCPError
                if isinstance(exc.__cause__, Unavailable):
                    raise exc.__cause__ from exc
                self._secret_problem = str(exc)
            return
        api = self._external_api()
        if api is not None and api.credentials_from is not None:
            try:
                self._token = read_api_key(
                    self.ctx, self.toolcall.namespace, api.credentials_from.name, api.credentials_from.key
                )
            except SecretProblem as problem:
                self._secret_problem = f"Failed to get API credentials: {problem}"

    def _external_api(self) -> Any:
        if self.tool is None or tool_type(self.tool) != "externalAPI" or self.tool.spec.execute is None:
            return None
        return self.tool.spec.execute.external_api

    def run(self, arguments: dict[str, Any], within_s: float | None = None) -> Outcome:
        """The call's outcome. ``within_s``: the longest it may take (its claim's time left), if shorter
        than its own timeout."""
        ref = self.toolcall.spec.tool_ref.name
        if self._secret_problem is not None:
            mcp_detail = f"MCP tool execution failed: {self._secret_problem}" if self.server else None
            return Outcome(error=self._secret_problem, detail=mcp_detail)
        try:
            if self.server is not None:
                return self._run_mcp(arguments, within_s)
            assert self.tool is not None
            kind = tool_type(self.tool)
            if kind == "function":
                builtin = (
                    self.tool.spec.execute.builtin.name
                    if self.tool.spec.execute and self.tool.spec.execute.builtin
                    else None
                )
                result = run_builtin(builtin or "", arguments)
                return Outcome(result=result, event_message=f'Tool "{self.tool.name}" executed successfully')
            if kind == "externalAPI":
                return self._run_external(arguments, within_s)
            return Outcome(error=f"unsupported tool type {kind!r} for tool {ref!r}")
        except ToolError as exc:
            return Outcome(error=str(exc), detail=exc.detail)
        except Exception as exc:  # noqa: BLE001 - after the claim, every failure must end in a status
            # A bug or a surprise (the Tool edited while the call waited, say): reported like a tool
            # error instead of escaping with the claim held until it expires. Not a ToolError, which
            # says only what its tool scrubbed: it may quote a Secret the call read (an API echoing its
            # token, a server its environment), cut out before the cut, and of its logged traceback too.
            scrub = self._scrubber()
            trace = scrub("".join(traceback.format_exception(exc)))
            log.error("tool %s of %s/%s raised\n%s", ref, self.toolcall.namespace, self.toolcall.name, trace)
            said = f"tool {ref!r} failed unexpectedly: {type(exc).__name__}: {exc}"
            return Outcome(error=scrub_then_cut(said, scrub, 1000))

    def _scrubber(self) -> Scrubber:
        """Cuts the Secrets this call read (by read_secrets) out of text."""
        if self._resolved is not None:
            return self._resolved.scrubber
        return Scrubber([self._token] if self._token else [])

    def _run_external(self, arguments: dict[str, Any], within_s: float | None) -> Outcome:
        assert self.tool is not None
        api = self._external_api()
        assert api is not None and api.url
        token = self._token  # read by read_secrets, before the claim
        settings = self.ctx.settings
        own = min(float(api.timeout_seconds or settings.tool_timeout_s), settings.tool_execution_cap_s)
        timeout = own if within_s is None else max(0.001, min(own, within_s))
        body = call_external_api(api.url, api.method, arguments, token, timeout, own_timeout_s=own)
        return Outcome(result=body, event_message=f'Tool "{self.tool.name}" executed successfully')

    def _run_mcp(self, arguments: dict[str, Any], within_s: float | None) -> Outcome:
        assert self.server is not None
        if self.ctx.mcp is None:
            return Outcome(error="this worker has no MCP manager (run MCP tools on the tools queue)")
        try:
            result = self.ctx.mcp.call_tool(
                self.server, self.target.tool, arguments, resolved=self._resolved, within_s=within_s
            )
        except ToolError as exc:  # MCPError: unreachable server, unknown tool, timeout
            return Outcome(error=str(exc), detail=f"MCP tool execution failed: {exc}")
        ref = self.toolcall.spec.tool_ref.name
        if result.is_error:
            error = f"tool execution error: {result.text}"
            return Outcome(error=error, detail=f"MCP tool execution failed: {error}")
        return Outcome(
            result=result.text,
            detail="MCP tool executed successfully",
            event_message=f'MCP tool "{ref}" executed successfully',
        )


def find_tool(
    ctx: WorkerContext, namespace: str, function_name: str, granted: Sequence[str] = ()
) -> Tool | None:
    """The Tool the LLM meant: first among the Agent's own Tools (``granted``) the one offered under
    that function name, as tool_definitions named it; else a Tool by metadata.name, else by spec.name
    (the original only matched when both were equal)."""
    for name in granted:
        candidate = get_or_none(ctx, Tool, namespace, name, cached=True)
        if candidate is not None and candidate.spec.function_name(name) == function_name:
            return candidate
    tool = get_or_none(ctx, Tool, namespace, function_name, cached=True)
    if tool is not None:
        return tool
    for candidate in ctx.kube.list(Tool, namespace):
        if candidate.spec.name == function_name:
            return candidate
    return None


def _count_not_run(executor: Executor, outcome: str) -> None:
    """Count a call failed before it ran: a tool that does not exist (an LLM may invent any name) is
    labelled "unknown", so the label's values stay bounded by the tools that exist."""
    known = executor.tool is not None or executor.server is not None
    count_tool_call(executor.toolcall.spec.tool_ref.name if known else "unknown", outcome, None)


def tool_call(ctx: WorkerContext, message: ResourceMessage) -> None:
    asked_at = ctx.config_cache.now()  # the call exists: the watcher saw it before sending this

    def step(toolcall: TaskRunToolCall) -> None:
        # The call's run is known once it is read (not from its name: a long run name is hashed in it),
        # and names the task's lines from here to its end (its failure lines too, Celery's included).
        bind_to_context(run=toolcall.spec.task_run_ref.name)
        _tool_call_once(
            ctx, toolcall, message.agent_seen, run_ended=message.reason == RUN_ENDED, asked_at=asked_at
        )

    decide_on_current(
        ctx, TaskRunToolCall, message.namespace, message.name, step, seen_version=message.resource_version
    )


def run_started(ctx: WorkerContext, created: TaskRunToolCall, asked_at: float) -> None:
    """A call this process created to run itself (workers.started_calls), from the object its create was
    answered with, as ``tool_call`` runs one from a message. ``asked_at``: when its turn began creating
    its calls (on the config cache's clock). What it cannot finish now (the API server unavailable) goes
    to the queue, whose retries take it from there."""
    namespace, name = created.namespace, created.name
    started = time.perf_counter()
    outcome = "ok"
    # a task's span and metrics, as for one from the queue (the span in its creator's trace: the run's)
    with (
        resource_context(created.KIND, namespace, name, TaskName.TOOL_CALL.value),
        span(
            f"tool_call {created.KIND}",
            None,
            **{"kubechain.namespace": namespace, "kubechain.name": name, "kubechain.reason": "started-here"},
        ),
    ):
        bind_to_context(run=created.spec.task_run_ref.name)
        try:
            decide_on_current(
                ctx,
                TaskRunToolCall,
                namespace,
                name,
                lambda toolcall: _tool_call_once(ctx, toolcall, asked_at=asked_at),
                first=created,
            )
        except Exception as exc:  # noqa: BLE001 - not lost: the queue's task takes it over
            outcome = "retry"
            log.warning("tool call %s/%s started here goes to the queue: %s", namespace, name, exc)
            message = ResourceMessage(
                kind=created.KIND, namespace=namespace, name=name, reason="started-here-failed"
            )
            ctx.enqueue(TaskName.TOOL_CALL, message, 1.0)
        finally:
            TASKS.labels("tool_call", outcome).inc()
            TASK_SECONDS.labels("tool_call").observe(time.perf_counter() - started)


def _not_its_runs(
    ctx: WorkerContext, toolcall: TaskRunToolCall, parent: TaskRun
) -> tuple[str | None, TaskRun]:
    """Why ``toolcall`` is not one its run made (None if it is), and the run as last read. A call made by
    hand would run with the Agent's grants (an externalAPI tool's credentials) for whoever may create tool
    calls, its approval annotation set at create, and its run would never read its result (or read it for
    its own, if made ahead under the run's next name)."""
    run_name = parent.name
    if not toolcall.metadata.owned_by(parent.uid):
        return (
            f'not made by TaskRun "{run_name}" (it has no owner reference to that run): KubeChain runs only '
            "the tool calls its runs make",
            parent,
        )
    if asked_for(parent, toolcall):
        return None, parent
    # An owner reference is no proof (anyone who may create tool calls can copy the run's uid into one);
    # the run's record of its turn is. The cached read may predate the turn: read it fresh.
    fresh = get_or_none(ctx, TaskRun, toolcall.namespace, run_name)
    if fresh is not None and asked_for(fresh, toolcall):
        return None, fresh
    return (
        f'not one TaskRun "{run_name}" asked for in its current turn (no such call, or another tool or other '
        "arguments): KubeChain runs only the tool calls its runs make",
        fresh or parent,
    )


def _tool_call_once(
    ctx: WorkerContext,
    toolcall: TaskRunToolCall,
    seen: AgentSeen | None = None,
    *,
    run_ended: bool = False,
    asked_at: float,
) -> None:
    """``seen``: the run's Agent as the watcher saw it (a cached copy behind it is read again).
    ``run_ended``: the watcher saw the call's run end (a cached copy of it still going is read again: read
    by a sibling call a moment before, it would leave a call waiting for its sub-agent to wait on).
    ``asked_at``: when the task began, on the config cache's clock (see approvals.gate)."""
    if toolcall.is_terminal() or toolcall.metadata.deletion_timestamp:
        return
    # The parent's spec does not change, and the "is it finished or deleted" check races with the
    # deletion however fresh the read: a read shared by the turn's sibling calls is good enough.
    run_name = toolcall.spec.task_run_ref.name
    behind = (lambda run: not run.is_terminal()) if run_ended else None
    parent = get_or_none(ctx, TaskRun, toolcall.namespace, run_name, cached=True, behind=behind)
    if parent is not None and parent.metadata.deletion_timestamp:
        log.info("skipping tool call %s/%s: its TaskRun is being deleted", toolcall.namespace, toolcall.name)
        return
    if parent is None or parent.is_terminal():
        why = (
            f'TaskRun "{run_name}" not found'
            if parent is None
            else f'TaskRun "{run_name}" already finished ({parent.phase})'
        )
        now = ctx.clock()
        timeout_s = ctx.settings.claim_timeout_s
        ended = plan_call_of_finished_run(toolcall, why, now, timeout_s)
        if ended is not None:
            # Not yet waiting for a sub-agent, it may have started one all the same
            # (delegation.stop_sub_agent_runs): what it delegates to is resolved, from the configuration
            # cache, only for such a call.
            pending = toolcall.phase in delegation.NOT_STARTED_PHASES
            executor = _executor_for(ctx, toolcall, parent, seen) if pending else None
            sub_agents = delegation.stop_sub_agent_runs(ctx, toolcall, executor)
            if sub_agents:  # not "not run": the run of the sub-agent it started is named
                ended = plan_call_of_finished_run(toolcall, why, now, timeout_s, sub_agents) or ended
            if toolcall.phase in WAITING_ELSEWHERE_PHASES:
                apply_call_transition(ctx, toolcall, ended)  # delegated, or asking a human: it ends here
            else:
                # not counted, as an interrupted execution is not: it never ran, or its worker was lost;
                # and a call not yet run may name any tool the LLM made up, not a metrics label
                apply_transition(ctx, toolcall, ended)
                delegation.stop_sub_agent_runs_created_meanwhile(ctx, toolcall, executor)
        return
    problem, parent = _not_its_runs(ctx, toolcall, parent)
    if problem is not None:
        apply_transition(
            ctx, toolcall, plan_tool_failure(toolcall, problem, ctx.clock(), reason="ValidationFailed")
        )
        return
    executor = _executor_for(ctx, toolcall, parent, seen)
    now = ctx.clock()
    # A call that cannot run (unknown tool, not granted, its MCP server deleted while it waited for a
    # human) fails now instead of waiting forever; so does one whose worker was lost mid-run, rather
    # than run again (or, its Tool changed meanwhile, start again another way) without its grant.
    stale_run = toolcall.phase == ToolCallPhase.RUNNING and (
        claim_remaining_s(toolcall.status.claimed_at, now, ctx.settings.claim_timeout_s) <= 0
    )
    if executor.problem is not None and (
        stale_run
        or toolcall.phase
        in (
            "",
            "Pending",
            "AwaitingHumanApproval",
            "ErrorRequestingHumanApproval",
            "ReadyToExecuteApprovedTool",
        )
    ):
        # not counted when its worker was lost mid-execution: it did start, and how it ended is unknown
        _fail_not_run(ctx, toolcall, executor, executor.problem, now, counted=not stale_run)
        return
    retyped_to = (
        "delegates to an agent"
        if executor.delegate_to is not None
        else "asks a human"
        if executor.human_channel is not None
        else None
    )
    if toolcall.phase == ToolCallPhase.RUNNING and retyped_to is not None:
        # Its tool was edited while it ran. The flows below take no execution claim and ignore a Running
        # call: a lost worker's claim is resolved here, or the call and its run's fan-in wait forever.
        claim = plan_running_retyped(
            toolcall, now, ctx.settings.claim_timeout_s, executor.idempotent, retyped_to
        )
        if claim.transition is None:
            log.debug("tool_call skipped for %s/%s: %s", toolcall.namespace, toolcall.name, claim.reason)
            return
        toolcall = apply_transition(ctx, toolcall, claim.transition)
        if toolcall.is_terminal():
            return
    if executor.delegate_to is not None:
        delegation.delegate(ctx, toolcall, parent, executor)
        return
    if executor.human_channel is not None:
        if toolcall.phase not in ("", "Pending", ToolCallPhase.AWAITING_HUMAN_INPUT):
            # Its Tool now asks a human, but the call waits in another kind's phase (for an approval or a
            # sub-agent): nothing moves it on any more.
            problem = f'tool "{toolcall.spec.tool_ref.name}" now asks a human'
            delegation.fail_if_stranded(ctx, toolcall, problem, now, approved_too=True)
            return
        approvals.contact_human(ctx, toolcall, executor)
        return
    if executor.problem is None and not approvals.gate(ctx, toolcall, executor, asked_at):
        return  # approval requested, pending or rejected: the approval flow wrote the status
    in_doubt = ctx.claims_in_doubt.held(toolcall, lambda at: holds_claim(toolcall, ctx.identity, at))
    claim = (
        ToolClaim(in_doubt)  # its tool never ran: claimed afresh, not waited for nor failed as lost
        if in_doubt is not None
        else plan_tool_claim(toolcall, ctx.identity, now, ctx.settings.claim_timeout_s, executor.idempotent)
    )
    if claim.transition is None:
        # No flow above owns this phase any more (e.g. AwaitingSubAgent whose Tool was deleted): fail
        # it rather than leave the run's fan-in waiting forever.
        if delegation.fail_if_stranded(ctx, toolcall, executor.problem, now):
            return
        log.debug("tool_call skipped for %s/%s: %s", toolcall.namespace, toolcall.name, claim.reason)
        return
    if claim.transition.phase() == "Failed":
        apply_transition(ctx, toolcall, claim.transition)
        return
    if executor.problem is not None:
        _fail_not_run(ctx, toolcall, executor, executor.problem, now)
        return
    arguments, invalid = parse_arguments(toolcall)
    if invalid is not None:
        apply_transition(ctx, toolcall, plan_invalid_arguments(toolcall, invalid, now))
        _count_not_run(executor, "invalid_arguments")
        return
    executor.read_secrets()
    # Stamped now, not when the call was found free: the reads above may have waited out an API server
    # shedding load (429s), and every second of that would come off the claim the call runs under.
    claimed_at = claim.transition.status["claimedAt"] = precise_timestamp(ctx.clock())
    claimed = apply_claim(
        ctx, toolcall, claim.transition, lambda current: holds_claim(current, ctx.identity, claimed_at)
    )
    # The claim may have been stamped afresh (confirmed too late to act on): the result is written under
    # the one the tool runs under.
    claimed_at = claimed.status.claimed_at or claimed_at
    started = ctx.monotonic()  # the execution alone: not an approval waited for before the claim
    # The span the claim named in spanContext: each execution's id is its own (an idempotent tool run
    # again, its worker lost before the result was written, is not a second span with the first's id),
    # and derived from the call and the execution, so the one the status names is the one exported.
    ids = toolcall_span_context(claimed, claimed.status.attempts or 1)
    with span_with_ids(
        f"ToolCall {toolcall.spec.tool_ref.name}",
        None,
        (ids["traceID"], ids["spanID"]) if ids is not None else None,
        **{"kubechain.toolcall": toolcall.name, "kubechain.tool.execution": claimed.status.attempts},
    ) as current:
        # under a claim answered late, the call ends in time for its outcome to be written
        outcome = executor.run(arguments, within_s=call_time_left_s(ctx, claimed_at))
        current.set_attribute("kubechain.tool.outcome", "error" if outcome.error is not None else "ok")
    result = "error" if outcome.error is not None else "ok"
    count_tool_call(toolcall.spec.tool_ref.name, result, ctx.monotonic() - started)

    max_bytes = ctx.limits.max_tool_result_bytes

    def plan(current: TaskRunToolCall) -> Transition:
        if outcome.error is not None:
            return plan_tool_failure(
                current, outcome.error, ctx.clock(), detail=outcome.detail, max_bytes=max_bytes
            )
        return plan_tool_success(
            current,
            outcome.result or "",
            ctx.clock(),
            outcome.event_message,
            detail=outcome.detail or "Tool executed successfully",
            max_bytes=max_bytes,
        )

    def refused_as_too_large(current: TaskRunToolCall, refused: TooLarge) -> Transition:
        # the outcome with the call's arguments is over etcd's limit: the call ends at once, saying so
        return plan_outcome_too_large(current, plan(current), str(refused), ctx.clock())

    _record(ctx, claimed, claimed_at, plan, refused_as_too_large)


def _executor_for(
    ctx: WorkerContext, toolcall: TaskRunToolCall, parent: TaskRun | None, seen: AgentSeen | None
) -> Executor:
    """The call's target resolved with its run's Agent (None if the run or the Agent is gone: then what
    it grants cannot be checked, and the Executor says so). A cached copy of the Agent behind what the
    watcher saw (``seen``) is read again: the turn that made the call may have offered a tool an edit
    added, which a copy from before the edit does not grant."""
    agent_name = delegation.parent_agent(ctx, parent) if parent is not None else ""
    if not agent_name:
        return Executor(ctx, toolcall, None)
    return Executor(ctx, toolcall, cached_agent(ctx, toolcall.namespace, agent_name, seen))


def _fail_not_run(
    ctx: WorkerContext,
    toolcall: TaskRunToolCall,
    executor: Executor,
    problem: str,
    now: datetime,
    *,
    counted: bool = True,
) -> None:
    """A call that cannot run (unknown tool, not granted) fails, counted as "rejected" if ``counted``; a
    sub-agent it may have started is stopped first."""
    delegation.stop_sub_agent_runs(ctx, toolcall, executor)
    apply_transition(ctx, toolcall, plan_tool_failure(toolcall, problem, now, reason=executor.problem_reason))
    if counted:  # before the look below, which may raise: the retry finds the call ended, counts nothing
        _count_not_run(executor, "rejected")
    delegation.stop_sub_agent_runs_created_meanwhile(ctx, toolcall, executor)


def _record(
    ctx: WorkerContext,
    claimed: TaskRunToolCall,
    claimed_at: str,
    plan: Callable[[TaskRunToolCall], Transition],
    refused_as_too_large: Callable[[TaskRunToolCall, TooLarge], Transition],
) -> None:
    record_while_claimed(
        ctx,
        claimed,
        lambda current: holds_claim(current, ctx.identity, claimed_at),
        plan,
        "tool result",
        refused_as_too_large=refused_as_too_large,
    )
