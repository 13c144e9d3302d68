"""Human approval of tool calls and humans as tools (HumanLayer and kubectl). Hook points for tool_call.

``gate`` runs before a tool call is claimed for execution: it returns True when the call may execute now,
False when it handled the call itself (requested approval, is waiting, or recorded a decision).
``contact_human`` executes a ``<channel>__human_contact_<type>`` tool call.

The decisions are in kubechain/statemachines/approval.py. Here: reading the ContactChannel and its API key,
the HumanLayer calls (each only after this worker's conditional status write claimed it), and delayed
re-checks (``ctx.enqueue`` with a countdown): no worker ever blocks while a human thinks, and everything
needed to go on is in the status, so waits survive worker and watcher restarts (the watcher's resync
re-enqueues the Awaiting* phases as well).

Which channel asks for approval:
  * MCP tools: the MCPServer's ``approvalContactChannel`` (HumanLayer), and kubectl.
  * Tools with ``execute.externalAPI.requiresApproval``: kubectl only. A Tool has no channel field, and
    borrowing the Agent's ``humanContactChannels`` (tools the agent offers its LLM for questions) would
    route approvals to people who never agreed to approve anything; the kubectl decision is explicit.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kubechain.humanlayer import (
    HumanLayerAuthError,
    HumanLayerClient,
    HumanLayerError,
    HumanLayerMisconfigured,
    HumanLayerNotFound,
    HumanLayerUnavailable,
    api_key_source,
    channel_config_problem,
    channel_payload,
)
from kubechain.humanlayer.client import CONNECT_TIMEOUT_S as HUMANLAYER_CONNECT_S
from kubechain.humanlayer.client import DEFAULT_TIMEOUT_S as HUMANLAYER_TIMEOUT_S
from kubechain.kube.errors import Conflict, NotFound
from kubechain.models import ContactChannel, MCPServer, TaskRunToolCall, Tool, ToolCallPhase
from kubechain.queueing import TaskName
from kubechain.redaction import redact
from kubechain.statemachines import approval as machine
from kubechain.statemachines.toolcall import parse_arguments, plan_invalid_arguments, plan_tool_failure
from kubechain.statemachines.transition import Transition, claim_remaining_s, precise_timestamp
from workers.tool_outcomes import apply_call_transition
from workers.transitions import apply_claim, schedule_recheck
from workers.validators import SecretProblem, get_or_none, read_api_key

if TYPE_CHECKING:
    from workers.context import WorkerContext
    from workers.tool_call import Executor

log = logging.getLogger(__name__)

# The longest a HumanLayer call takes: the client ends each request by its connect timeout plus its
# timeout, however the server trickles its answer (HumanLayerClient.request_timeout_s).
HUMANLAYER_CALL_S = HUMANLAYER_CONNECT_S + HUMANLAYER_TIMEOUT_S  # 15 s
# Slack for the clock of the worker that judges the claim expired differing from the holder's.
CLOCK_SLACK_S = 5.0
# The oldest a request claim confirmed by reading it back may be when its HumanLayer calls start (an older
# one is stamped afresh first). One whose write was answered late (429s waited out, its Event posted inline)
# is sent under at any age and may outlast its claim (harmless, below). Otherwise a first request ends
# within the claim: 30 - 15 - 5 = 10 s. One sent again after a
# failed attempt or a takeover is looked up first, and the two calls (three, if the send meets a 409) can
# outlast the claim, for a second worker to take over and send too. That is harmless: it looks up first as
# well, the call id is the same, and HumanLayer answers a duplicate with 409, which the client turns into
# the call it has. The claim bounds how often that happens, not whether.
REQUEST_CLAIM_YOUNG_S = machine.REQUEST_CLAIM_TIMEOUT_S - HUMANLAYER_CALL_S - CLOCK_SLACK_S


@dataclass(frozen=True)
class Requirement:
    """This tool call needs a human decision; ``channel`` is the HumanLayer ContactChannel, if any."""

    channel: str | None


def approval_requirement(executor: Executor) -> Requirement | None:
    return _requirement_of(executor.server, executor.tool)


def _requirement_of(server: MCPServer | None, tool: Tool | None) -> Requirement | None:
    if server is not None:
        ref = server.spec.approval_contact_channel
        return Requirement(ref.name) if ref is not None else None
    if tool is not None and tool.spec.execute is not None and tool.spec.execute.external_api is not None:
        if tool.spec.execute.external_api.requires_approval:
            return Requirement(None)
    return None


# -- approval ----------------------------------------------------------------------------------------


def gate(ctx: WorkerContext, toolcall: TaskRunToolCall, executor: Executor, asked_at: float) -> bool:
    """``asked_at`` (on the config cache's clock): when the task began, after the call was created; for
    a call its creator runs, when its turn began creating its calls."""
    try:
        return _gate(ctx, toolcall, executor, asked_at)
    except NotFound:
        return False  # the tool call was deleted meanwhile (its run was deleted): nothing to decide


def _gate(ctx: WorkerContext, toolcall: TaskRunToolCall, executor: Executor, asked_at: float) -> bool:
    phase = toolcall.phase
    if phase not in machine.UNDECIDED_PHASES:
        return True  # ReadyToExecuteApprovedTool or Running: the execution claim decides
    if rejected_by_annotation(ctx, toolcall):
        return False
    _warn_if_annotation_ignored(ctx, toolcall)
    requirement = approval_requirement(executor)
    if requirement is None and phase not in machine.APPROVAL_WAITING_PHASES:
        requirement = _requirement_read_fresh(ctx, executor, asked_at)
    if requirement is None:
        if phase not in machine.APPROVAL_WAITING_PHASES:
            return True
        requirement = Requirement(None)  # the configuration changed while waiting: a decision is still due
    if parse_arguments(toolcall)[1] is not None:
        return True  # invalid arguments: tool_call fails the call before anything runs; no one need approve
    now = ctx.clock()
    decision = machine.annotation_decision(toolcall)
    if decision is not None:
        apply_call_transition(
            ctx, toolcall, machine.plan_decision(toolcall, decision, now, ctx.limits.max_tool_result_bytes)
        )
        return False
    if requirement.channel is None:
        transition = machine.plan_await_kubectl(toolcall, now)
        if transition is not None:
            apply_call_transition(ctx, toolcall, transition)
        return False
    _humanlayer_approval(ctx, toolcall, requirement.channel)
    return False


def _warn_if_annotation_ignored(ctx: WorkerContext, toolcall: TaskRunToolCall) -> None:
    """An approval annotation whose value is not a decision: a Warning Event, once per value (its name
    is keyed by the value, not by a write: a call waiting via HumanLayer is written at every check)."""
    ignored = machine.ignored_annotation_value(toolcall)
    if ignored is None:
        return
    event = machine.ignored_annotation_event(ignored)
    log.warning("tool call %s/%s: %s", toolcall.namespace, toolcall.name, event.message)
    key = f"{machine.APPROVAL_ANNOTATION}={ignored}"
    ctx.events.emit(toolcall, event.type, event.reason, event.message, key=key)


def _requirement_read_fresh(ctx: WorkerContext, executor: Executor, asked_at: float) -> Requirement | None:
    """Before a call runs unapproved: the approval setting as the API server had it once this task began.
    The Executor read its MCPServer or Tool through the short-lived cache, and an approval channel added
    a second ago, before the call was made, must already hold. A read begun since the task did is as
    good as its own: a fan-out's fifty calls share a few. Only the setting is taken from that copy: the
    call itself runs as resolved."""
    server, tool = executor.server, executor.tool
    if server is not None:
        server = get_or_none(ctx, MCPServer, server.namespace, server.name, cached=True, read_since=asked_at)
        server = server or executor.server
    elif tool is not None and tool.spec.execute is not None and tool.spec.execute.external_api is not None:
        tool = get_or_none(ctx, Tool, tool.namespace, tool.name, cached=True, read_since=asked_at) or tool
    return _requirement_of(server, tool)


def rejected_by_annotation(
    ctx: WorkerContext, toolcall: TaskRunToolCall, *, before_write: Callable[[], object] | None = None
) -> bool:
    """A rejection (``kubechain reject``, or the annotation) stands whether or not the call needed an
    approval: a call that was only pending (to run, ask a human or delegate) must not go ahead against
    it. Recorded as an approval's rejection is; True if it was. ``before_write``: called first, to stop
    what the call may have started already (a sub-agent's run)."""
    decision = machine.annotation_decision(toolcall)
    if decision is None or decision.approved:
        return False
    if before_write is not None:
        before_write()
    transition = machine.plan_decision(toolcall, decision, ctx.clock(), ctx.limits.max_tool_result_bytes)
    apply_call_transition(ctx, toolcall, transition)
    return True


def _humanlayer_approval(ctx: WorkerContext, toolcall: TaskRunToolCall, channel_name: str) -> None:
    now = ctx.clock()
    phase = toolcall.phase
    if phase == ToolCallPhase.AWAITING_HUMAN_APPROVAL and toolcall.status.external_call_id:
        _check_approval(ctx, toolcall, channel_name)
        return
    if phase not in machine.PENDING_PHASES:
        in_doubt = _claim_in_doubt(ctx, toolcall)
        if in_doubt is not None:
            _request_approval(ctx, toolcall, channel_name, in_doubt)
            return
        # Requested before (maybe by a worker that died) or failed before: send again when due.
        if _left_to_its_holder(ctx, toolcall, now):
            return
        if phase == ToolCallPhase.ERROR_REQUESTING_HUMAN_APPROVAL and not machine.is_due(toolcall, now):
            return
    _request_approval(ctx, toolcall, channel_name)


@dataclass(frozen=True)
class _RequestKind:
    """One kind of HumanLayer request: an approval (function call) or a question (contact request)."""

    what: str
    ask: machine.HumanAsk
    failed: Callable[
        [TaskRunToolCall, str, str, str, datetime, bool], Transition
    ]  # (call, channel, error, reason, now, whether HumanLayer was unavailable rather than refusing)
    send: Callable[
        [HumanLayerClient, str, str, dict[str, Any]], dict[str, Any]
    ]  # (client, run id, call id, spec)
    fetch: Callable[[HumanLayerClient, str], dict[str, Any]]  # (client, external id): its state


_APPROVAL = _RequestKind(
    what="approval request",
    ask=machine.APPROVAL,
    failed=lambda call, _channel, error, reason, now, _outage: machine.plan_request_failed(
        call, error, reason, now
    ),
    send=lambda client, run_id, call_id, spec: client.create_function_call(run_id, call_id, spec),
    fetch=lambda client, external_id: client.get_function_call(external_id),
)
_CONTACT = _RequestKind(
    what="human contact request",
    ask=machine.CONTACT,
    failed=lambda call, channel, error, reason, now, outage: machine.plan_contact_failed(
        call,
        channel,
        error,
        reason,
        now,
        machine.HUMAN_CONTACT_MAX_ATTEMPTS_IN_OUTAGE if outage else machine.HUMAN_CONTACT_MAX_ATTEMPTS,
    ),
    send=lambda client, run_id, call_id, spec: client.create_contact_request(run_id, call_id, spec),
    fetch=lambda client, external_id: client.get_contact_request(external_id),
)


def _already_sent(client: HumanLayerClient, kind: _RequestKind, external_id: str) -> dict[str, Any] | None:
    """After a failed attempt, the request as HumanLayer has it, if the attempt landed (its answer lost):
    sending the same call id again must not rely on how HumanLayer treats a duplicate. Best effort: if the
    lookup fails too, the send that follows says why (one error, not two)."""
    try:
        return kind.fetch(client, external_id)
    except HumanLayerError:
        return None


def _send_request(
    ctx: WorkerContext,
    toolcall: TaskRunToolCall,
    channel_name: str,
    kind: _RequestKind,
    spec_for: Callable[[dict[str, Any]], dict[str, Any]],
    in_doubt: Transition | None = None,
) -> None:
    """Claim the call (apply_claim: one confirmed by reading it back and too old to send under is stamped afresh first), send the
    request (with a deterministic call id, so a retry is the same call), record sent or failed while the
    claim is ours, and schedule the next re-check. ``in_doubt``: this process's claim the call holds, never
    sent under (_claim_in_doubt), claimed afresh instead."""
    try:
        channel, api_key = _channel_access(ctx, toolcall.namespace, channel_name)
    except ChannelProblem as problem:
        if problem.gone and kind is _CONTACT:
            # as when it is gone at a status check (_check_request): retrying cannot bring it back
            apply_call_transition(
                ctx,
                toolcall,
                machine.plan_contact_channel_gone(toolcall, str(problem), ctx.clock(), sent=False),
            )
            return
        failed = apply_call_transition(
            ctx,
            toolcall,
            kind.failed(toolcall, channel_name, str(problem), problem.reason, ctx.clock(), problem.outage),
        )
        _schedule(ctx, failed)
        return
    # Stamped now, not before the reads above (the ContactChannel and its Secret, uncached): they may have
    # waited out an API server shedding load (429s), and the claim would be written already expired, for
    # a second worker to take over and send the request too.
    spec = spec_for(channel_payload(channel))
    claim = in_doubt or machine.plan_ask_claim(toolcall, kind.ask, channel_name, ctx.identity, ctx.clock())
    claim.status["claimedAt"] = claimed_at = precise_timestamp(ctx.clock())
    claimed = apply_claim(
        ctx,
        toolcall,
        claim,
        lambda current: _holds_claim(current, ctx.identity, claimed_at),
        young_s=REQUEST_CLAIM_YOUNG_S,
    )
    external_id = machine.call_id(claimed)
    sent_id: str | None = None
    error = ""
    outage = False
    try:
        with _client(ctx, api_key) as client:
            # a failed attempt, or a claim another worker held until it expired (it may have sent the
            # request and died before recording it): look before sending
            looked = bool(toolcall.status.attempts or toolcall.status.claimed_by)
            answer = _already_sent(client, kind, external_id) if looked else None
            if answer is None:
                answer = kind.send(client, machine.run_id(claimed), external_id, spec)
        answered_id = answer.get("call_id")
        if answered_id and answered_id != external_id:
            # The id sent is deterministic, and the one checked from now on: trusting the answer's
            # would check another call (and take its decision), or one a URL cannot carry.
            log.warning(
                "HumanLayer answered %s %s of %s/%s with call id %r; keeping the id sent",
                kind.what,
                external_id,
                toolcall.namespace,
                toolcall.name,
                str(answered_id)[:80],
            )
        sent_id = external_id
    except HumanLayerError as exc:
        said = _refused_key(ctx, channel, exc)
        log.warning("%s for %s/%s failed: %s", kind.what, toolcall.namespace, toolcall.name, said)
        error = f"HumanLayer request failed: {said}"
        # The channel is Ready (_channel_access): HumanLayer was reached under these settings until now,
        # so a setting to fix met now (a host that no longer resolves: more likely a DNS blip than a
        # typo) is waited out as an outage; the channel's validation, Error if it goes on, tells a typo
        outage = isinstance(exc, HumanLayerUnavailable | HumanLayerMisconfigured)
    except Exception as exc:  # noqa: BLE001 - after the claim, every failure must end in a status
        error = f"HumanLayer request failed unexpectedly: {_unexpected(exc, kind, toolcall, api_key)}"

    def plan(current: TaskRunToolCall) -> Transition:
        if sent_id is not None:
            return machine.plan_ask_sent(current, kind.ask, channel_name, sent_id, ctx.clock())
        return kind.failed(current, channel_name, error, "HumanLayerRequestFailed", ctx.clock(), outage)

    written = _write_holding_claim(ctx, claimed, plan)
    if written is not None:
        _schedule(ctx, written)


def _request_approval(
    ctx: WorkerContext, toolcall: TaskRunToolCall, channel_name: str, in_doubt: Transition | None = None
) -> None:
    kwargs, _ = parse_arguments(toolcall)
    _send_request(
        ctx,
        toolcall,
        channel_name,
        _APPROVAL,
        lambda channel: {"fn": toolcall.spec.tool_ref.name, "kwargs": kwargs, "channel": channel},
        in_doubt,
    )


def _check_approval(ctx: WorkerContext, toolcall: TaskRunToolCall, channel_name: str) -> None:
    def answered(call: dict[str, Any], now: datetime) -> Transition | None:
        decision = machine.humanlayer_decision(call)
        if decision is None:
            return None
        return machine.plan_decision(toolcall, decision, now, ctx.limits.max_tool_result_bytes)

    _check_request(
        ctx,
        toolcall,
        channel_name,
        _APPROVAL,
        answered,
        lambda: _request_approval(ctx, toolcall, channel_name),
    )


def _check_request(
    ctx: WorkerContext,
    toolcall: TaskRunToolCall,
    channel_name: str,
    kind: _RequestKind,
    answered: Callable[[dict[str, Any], datetime], Transition | None],
    request_again: Callable[[], None],
) -> None:
    """When a re-check is due, ask HumanLayer about the request: record the human's answer, or count
    the check (so the next is due later); a request HumanLayer forgot is sent again."""
    now = ctx.clock()
    if not machine.is_due(toolcall, now):
        return  # an early trigger; the re-check that is due will come
    detail = kind.ask.waiting_detail(channel_name)
    external_id = toolcall.status.external_call_id or ""
    try:
        channel, api_key = _channel_access(ctx, toolcall.namespace, channel_name)
    except ChannelProblem as problem:
        if problem.gone and kind is _CONTACT:
            # A question whose channel was deleted can never be answered here, and unlike an approval
            # there is no kubectl decision to end it: the call fails, and the LLM hears why.
            apply_call_transition(
                ctx, toolcall, machine.plan_contact_channel_gone(toolcall, str(problem), now)
            )
            return
        _schedule(
            ctx,
            apply_call_transition(ctx, toolcall, machine.plan_checked(toolcall, detail, now, str(problem))),
        )
        return
    try:
        with _client(ctx, api_key) as client:
            state = kind.fetch(client, external_id)
    except HumanLayerNotFound:
        if (toolcall.status.attempts or 0) < machine.NOT_FOUND_CHECKS_BEFORE_RESEND - 1:
            # A request just sent that HumanLayer does not find (yet): its store may lag behind its
            # writes, or the lookup go astray (a proxy). Sent again only after a few such checks, so a
            # HumanLayer that never finds it is not sent it (and the run an Event) every 2 s.
            unknown = f"HumanLayer does not know {kind.what} {external_id} (yet)"
            _schedule(
                ctx,
                apply_call_transition(ctx, toolcall, machine.plan_checked(toolcall, detail, now, unknown)),
            )
            return
        log.warning(
            "HumanLayer does not know %s %s of %s/%s; sending it again",
            kind.what,
            external_id,
            toolcall.namespace,
            toolcall.name,
        )
        request_again()
        return
    except HumanLayerError as exc:
        said = _refused_key(ctx, channel, exc)
        _schedule(
            ctx, apply_call_transition(ctx, toolcall, machine.plan_checked(toolcall, detail, now, said))
        )
        return
    except Exception as exc:  # noqa: BLE001 - a crash would repeat at every delivery: a failed check
        said = _unexpected(exc, kind, toolcall, api_key)
        _schedule(
            ctx, apply_call_transition(ctx, toolcall, machine.plan_checked(toolcall, detail, now, said))
        )
        return
    try:
        transition = answered(state, now)
    except machine.MalformedAnswer as malformed:
        log.warning(
            "%s %s of %s/%s: %s", kind.what, external_id, toolcall.namespace, toolcall.name, malformed
        )
        _schedule(
            ctx,
            apply_call_transition(ctx, toolcall, machine.plan_checked(toolcall, detail, now, str(malformed))),
        )
        return
    except Exception as exc:  # noqa: BLE001 - as above
        said = _unexpected(exc, kind, toolcall, api_key)
        _schedule(
            ctx, apply_call_transition(ctx, toolcall, machine.plan_checked(toolcall, detail, now, said))
        )
        return
    if transition is None:
        _schedule(ctx, apply_call_transition(ctx, toolcall, machine.plan_checked(toolcall, detail, now)))
        return
    apply_call_transition(ctx, toolcall, transition)


# -- humans as tools ---------------------------------------------------------------------------------


def contact_human(ctx: WorkerContext, toolcall: TaskRunToolCall, executor: Executor) -> None:
    try:
        _contact_human(ctx, toolcall, executor)
    except NotFound:
        pass  # the tool call was deleted meanwhile


def _contact_human(ctx: WorkerContext, toolcall: TaskRunToolCall, executor: Executor) -> None:
    channel_name = executor.human_channel or ""
    now = ctx.clock()
    phase = toolcall.phase
    if phase in machine.PENDING_PHASES:
        if rejected_by_annotation(ctx, toolcall):
            return
        arguments, invalid = parse_arguments(toolcall)
        if invalid is not None:
            apply_call_transition(ctx, toolcall, plan_invalid_arguments(toolcall, invalid, now))
            return
        message = _contact_message(arguments)
        if message is None:
            problem = 'human contact tools need a non-empty "message" argument'
            apply_call_transition(ctx, toolcall, plan_tool_failure(toolcall, problem, now))
            return
        _request_contact(ctx, toolcall, channel_name, message)
        return
    if phase != ToolCallPhase.AWAITING_HUMAN_INPUT:
        return
    if toolcall.status.external_call_id:
        _check_contact(ctx, toolcall, channel_name)
        return
    in_doubt = _claim_in_doubt(ctx, toolcall)
    if in_doubt is None and (_left_to_its_holder(ctx, toolcall, now) or not machine.is_due(toolcall, now)):
        return
    message = _contact_message(parse_arguments(toolcall)[0]) or ""
    _request_contact(ctx, toolcall, channel_name, message, in_doubt)


def _contact_message(arguments: dict[str, Any]) -> str | None:
    message = arguments.get("message")
    return message if isinstance(message, str) and message.strip() else None


def _request_contact(
    ctx: WorkerContext,
    toolcall: TaskRunToolCall,
    channel_name: str,
    message: str,
    in_doubt: Transition | None = None,
) -> None:
    _send_request(
        ctx, toolcall, channel_name, _CONTACT, lambda channel: {"msg": message, "channel": channel}, in_doubt
    )


def _check_contact(ctx: WorkerContext, toolcall: TaskRunToolCall, channel_name: str) -> None:
    def answered(contact: dict[str, Any], now: datetime) -> Transition | None:
        answer = machine.human_response(contact)
        if answer is None:
            return None
        response, by = answer
        return machine.plan_human_responded(
            toolcall, channel_name, response, by, now, ctx.limits.max_tool_result_bytes
        )

    def request_again() -> None:
        message = _contact_message(parse_arguments(toolcall)[0]) or ""
        _request_contact(ctx, toolcall, channel_name, message)

    _check_request(ctx, toolcall, channel_name, _CONTACT, answered, request_again)


# -- shared ------------------------------------------------------------------------------------------


class ChannelProblem(Exception):
    """``gone``: the ContactChannel does not exist (deleted), rather than not ready or misconfigured.
    ``outage``: it is not Ready only because its validation found HumanLayer unavailable (status
    Pending), which counts as HumanLayer being unavailable for the request."""

    def __init__(self, message: str, reason: str, *, gone: bool = False, outage: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.gone = gone
        self.outage = outage


def _channel_access(ctx: WorkerContext, namespace: str, name: str) -> tuple[ContactChannel, str]:
    """The ready ContactChannel and its HumanLayer API key, or ChannelProblem (never the key in a message)."""
    channel = get_or_none(ctx, ContactChannel, namespace, name)
    if channel is None:
        raise ChannelProblem(f'ContactChannel "{name}" not found', "NoContactChannel", gone=True)
    if not channel.status.ready:
        detail = channel.status.status_detail or "not validated yet"
        outage = channel.status.status == "Pending"  # see workers/contactchannels.py
        raise ChannelProblem(
            f'ContactChannel "{name}" is not ready: {detail}', "NoContactChannel", outage=outage
        )
    problem = channel_config_problem(channel)
    if problem is not None:
        raise ChannelProblem(f'ContactChannel "{name}": {problem}', "NoContactChannel")
    ref = channel.spec.api_key_from.secret_key_ref
    try:
        api_key = read_api_key(ctx, namespace, ref.name, ref.key)
    except SecretProblem as exc:
        raise ChannelProblem(
            f'failed to get the HumanLayer API key of ContactChannel "{name}": {exc}', "NoAPIKey"
        ) from None
    return channel, api_key


class _Revalidations:
    """Which ContactChannels (uid, resourceVersion) this process enqueued a validate of in the last
    ``window_s`` (monotonic seconds): the oldest first, at most ``max_kept``."""

    def __init__(self, window_s: float, max_kept: int) -> None:
        self.window_s = window_s
        self.max_kept = max_kept
        self._lock = threading.Lock()
        self._at: dict[tuple[str, str], float] = {}

    def first(self, key: tuple[str, str], now: float) -> bool:
        """Whether none was enqueued for ``key`` within the window; if so, one is (taken) now."""
        with self._lock:
            at = self._at.get(key)
            if at is not None and 0 <= now - at < self.window_s:
                return False
            self._at.pop(key, None)
            self._at[key] = now
            while self._at:
                oldest, since = next(iter(self._at.items()))
                if len(self._at) <= self.max_kept and 0 <= now - since < self.window_s:
                    break
                del self._at[oldest]
            return True


# A channel whose requests meet a refused key, or an API base they cannot use, is validated again at most
# once a window by a process: each failed request or check of each call waiting via the channel would
# otherwise enqueue one (and a GET /project), for as long as the channel stays Ready.
KEY_REVALIDATE_WINDOW_S = 60.0
_KEY_REVALIDATIONS = _Revalidations(KEY_REVALIDATE_WINDOW_S, 1000)


def _validate_again(ctx: WorkerContext, channel: ContactChannel, reason: str) -> None:
    """A validate of the Ready channel, at most once a window (only channels not Ready are validated
    again by the watcher's resync), so that its own status says what its requests met."""
    if channel.status.ready and _KEY_REVALIDATIONS.first(
        (channel.uid, channel.resource_version), ctx.monotonic()
    ):
        schedule_recheck(ctx, TaskName.VALIDATE, channel, reason, 0.0)


def _refused_key(ctx: WorkerContext, channel: ContactChannel, exc: HumanLayerError) -> str:
    """The error as told, naming the channel and the Secret to fix when HumanLayer refused the API key
    (401/403). An invalid key (401, or one no HTTP header can carry) validates the Ready channel again,
    so its own status says so (and, no longer Ready, it is not asked again until the key is fixed and
    the watcher's resync finds it valid). A 403 does not: the key is valid, only not permitted for this
    request, and the validation (GET /project) would find it good every time. An API base that cannot be
    used (a host that does not resolve, a certificate not trusted) validates it again too: met by a
    Ready channel's request it is taken for an outage first (a DNS blip), and the validation, Pending
    then Error if it goes on, tells a mistyped HUMANLAYER_API_BASE from a blip."""
    if isinstance(exc, HumanLayerMisconfigured):
        _validate_again(ctx, channel, "humanlayer-api-base-unusable")
        return str(exc)
    if not isinstance(exc, HumanLayerAuthError):
        return str(exc)
    if exc.status != 403:
        _validate_again(ctx, channel, "humanlayer-key-refused")
    return f'ContactChannel "{channel.name}" (API key from {api_key_source(channel)}): {exc}'


def _unexpected(exc: Exception, kind: _RequestKind, toolcall: TaskRunToolCall, api_key: str) -> str:
    """A bug or a surprise (an exception the HumanLayer client did not map), logged with its traceback
    and told as ``Type: message``: both without the API key (cut out before the message is shortened,
    which could leave the start of it), and with a lone surrogate escaped (a status must be UTF-8)."""
    trace = redact("".join(traceback.format_exception(exc)), [api_key])
    log.error("%s for %s/%s raised unexpectedly\n%s", kind.what, toolcall.namespace, toolcall.name, trace)
    said = redact(str(exc), [api_key])[:300]
    return f"{type(exc).__name__}: {said}".encode("utf-8", "backslashreplace").decode("utf-8")


def _client(ctx: WorkerContext, api_key: str) -> HumanLayerClient:
    return HumanLayerClient(ctx.settings.humanlayer_api_base, api_key)


def _holds_claim(toolcall: TaskRunToolCall, worker: str, claimed_at: str | None) -> bool:
    return toolcall.status.claimed_by == worker and toolcall.status.claimed_at == claimed_at


def _claim_in_doubt(ctx: WorkerContext, toolcall: TaskRunToolCall) -> Transition | None:
    """The request claim of this process that ``toolcall`` holds, left in doubt (see apply_claim): no
    request was sent under it, so it is claimed afresh and sent now, not waited out as another's."""
    return ctx.claims_in_doubt.held(toolcall, lambda at: _holds_claim(toolcall, ctx.identity, at))


def _left_to_its_holder(ctx: WorkerContext, toolcall: TaskRunToolCall, now: datetime) -> bool:
    """Whether another worker's request claim is in flight: then the call is checked again when it
    expires (its holder, if alive, has recorded the request by then), not only at the next resync (one
    left in doubt by a worker that could not confirm it is never recorded)."""
    if not machine.request_in_flight(toolcall, now):
        return False
    left_s = claim_remaining_s(toolcall.status.claimed_at, now, machine.REQUEST_CLAIM_TIMEOUT_S)
    # not at once: by the clock of the worker the re-check reaches, it may not have expired yet
    schedule_recheck(ctx, TaskName.TOOL_CALL, toolcall, machine.RECHECK_REASON, max(left_s, 1.0))
    return True


def _write_holding_claim(
    ctx: WorkerContext, claimed: TaskRunToolCall, plan: Callable[[TaskRunToolCall], Transition]
) -> TaskRunToolCall | None:
    """Record the outcome of a HumanLayer request while this worker still holds the request claim.

    Re-read and retry on conflicts (an annotation, say); give up when someone else moved the call on
    (a kubectl decision recorded meanwhile wins, and the request is moot)."""
    claimed_at = claimed.status.claimed_at
    current = claimed
    for _ in range(8):
        try:
            return apply_call_transition(ctx, current, plan(current))
        except Conflict:
            pass
        except NotFound:
            return None
        try:
            current = ctx.kube.get(TaskRunToolCall, claimed.namespace, claimed.name)
        except NotFound:
            return None
        if not _holds_claim(current, ctx.identity, claimed_at):
            log.info(
                "tool call %s/%s moved on while its HumanLayer request was sent",
                claimed.namespace,
                claimed.name,
            )
            return None
    return None


def _schedule(ctx: WorkerContext, toolcall: TaskRunToolCall) -> None:
    """Enqueue the next check of a waiting call for when it is due (the resync is the safety net)."""
    if toolcall.phase not in (
        ToolCallPhase.AWAITING_HUMAN_APPROVAL,
        ToolCallPhase.ERROR_REQUESTING_HUMAN_APPROVAL,
        ToolCallPhase.AWAITING_HUMAN_INPUT,
    ):
        return
    delay = machine.seconds_until_due(toolcall, ctx.clock())
    schedule_recheck(ctx, TaskName.TOOL_CALL, toolcall, machine.RECHECK_REASON, delay)
