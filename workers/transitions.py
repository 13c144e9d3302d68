"""Applying a state machine's decision: the conditional write, then (only for the winner) its effects."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from kubechain.kube.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    KubeAPIError,
    NotFound,
    TooLarge,
    Unavailable,
)
from kubechain.models import ObjectMeta, Resource, Task, TaskRun, TaskRunToolCall, TaskRunToolCallSpec
from kubechain.models.taskrun import TERMINAL_TASKRUN_PHASES, TaskRunPhase, TaskRunSpec
from kubechain.observability.tracing import export_run_span, recheck_trace
from kubechain.queueing import ResourceMessage, TaskName
from kubechain.statemachines.approval import APPROVAL_ANNOTATION
from kubechain.statemachines.taskrun import (
    plan_children_rejected,
    plan_tool_calls_created,
    tool_calls_created,
)
from kubechain.statemachines.toolcall import (
    DELEGATED_FROM_ANNOTATION,
    STARTED_BY_ANNOTATION,
    plan_tool_failure,
    started_in_process,
)
from kubechain.statemachines.transition import (
    StatusFingerprint,
    Transition,
    child_rejected_message,
    claim_remaining_s,
    foreign_child_message,
    parse_timestamp,
    patch_landed,
    precise_timestamp,
    status_fingerprint,
)
from kubechain.statemachines.validation import plan_validation
from workers.context import WorkerContext, claim_only

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Resource[Any, Any])
T = TypeVar("T")

CHILD_CREATED_REASON = {"TaskRunToolCall": "ToolCallCreated", "TaskRun": "TaskRunCreated"}


def apply_transition(ctx: WorkerContext, obj: R, transition: Transition) -> R:
    """Write ``transition.status`` conditional on ``obj``'s resourceVersion (Conflict if it moved), then
    post its Events (named after the new resourceVersion, so never twice) and create its children.

    The Events are posted before the worker goes on. Left to sender threads, they let a run's next
    write follow this one so closely that the API server's watch cache was often still stale: it then
    applied that patch twice (to the cached copy, which fails the resourceVersion precondition, and to
    a fresh read from etcd). On the hello bench (4 rounds against 6) posting them here cut the API
    server's CPU per run by about a quarter and the whole machine's by about a sixth."""
    updated = ctx.kube.patch_status(obj, transition.status)
    return _after_write(ctx, updated, transition)


def _after_write(ctx: WorkerContext, updated: R, transition: Transition) -> R:
    """The effects of a status write that landed: its Events and children (each idempotent)."""
    for event in transition.events:
        ctx.events.emit(updated, event.type, event.reason, event.message, key=updated.resource_version)
    where = {
        "kind": updated.KIND,
        "namespace": updated.namespace,
        "resource": updated.name,
        "phase": transition.phase(),
    }
    why = failure_reason(transition)
    invalid = validation_failure(transition)
    if why is not None:
        log.warning("%s %s/%s failed: %s", updated.KIND, updated.namespace, updated.name, why, extra=where)
    elif invalid is not None:
        log.warning(
            "%s %s/%s failed validation: %s",
            updated.KIND,
            updated.namespace,
            updated.name,
            invalid,
            extra=where,
        )
    else:
        log.info("transition", extra=where)
    if isinstance(updated, TaskRun) and transition.phase() in TERMINAL_TASKRUN_PHASES:
        now = ctx.clock()
        export_run_span(
            updated.uid,
            updated.name,
            updated.namespace,
            parse_timestamp(updated.metadata.creation_timestamp) or now,
            now,
            (updated.status.error or "TaskRun failed") if updated.phase == TaskRunPhase.FAILED else None,
            linked_from=updated.metadata.annotations.get(DELEGATED_FROM_ANNOTATION),
        )
    children = transition.children
    makes_tool_calls = isinstance(updated, TaskRun) and any(isinstance(c, TaskRunToolCall) for c in children)
    if makes_tool_calls and tool_calls_created(cast(TaskRun, updated)):
        # A write that landed unanswered, done again: its tool calls were all made and recorded, and one
        # missing now was deleted since (cancelled), not to be made again.
        children = [child for child in children if not isinstance(child, TaskRunToolCall)]
    failed = create_children(ctx, updated, children)
    if failed is not None:
        return failed
    if makes_tool_calls:
        return cast(R, record_tool_calls_created(ctx, cast(TaskRun, updated)))
    return updated


def failure_reason(transition: Transition) -> str | None:
    """Why a transition to Failed failed, as its Warning Event (or its error) says it: text already
    shown in the object's status and Events, its secrets cut out there. None for any other transition."""
    if transition.phase() != "Failed":
        return None
    warning = next((event.message for event in transition.events if event.type == "Warning"), None)
    said = warning or transition.status.get("error") or transition.status.get("statusDetail")
    return str(said)[:1000] if said else "no reason given"


def validation_failure(transition: Transition) -> str | None:
    """Why a validation put its resource (LLM, Tool, Agent, ...) in Error: its statusDetail, the text its
    status and Warning Event show already (a Secret's name and key, never its value). None for any other
    transition, a wait (Pending) included."""
    status = transition.status
    if transition.phase() is not None or status.get("status") != "Error":
        return None
    return str(status.get("statusDetail") or "no reason given")[:1000]


def record_tool_calls_created(ctx: WorkerContext, run: TaskRun) -> TaskRun:
    """Once every tool call of the run's turn exists, say so in its status: from then on a missing one
    was deleted by someone (cancelled), and the fan-in does not create it again. On a conflict (a tool
    call already finished and the fan-in moved the run on, say) the run is re-read and re-decided."""
    latest = [run]
    turn = run.status.tool_call_request_id

    def attempt() -> None:
        if latest[0].status.tool_call_request_id != turn:
            return  # the run moved on to another turn, whose calls its own creator records
        transition = plan_tool_calls_created(latest[0])
        if transition is None:
            return
        try:
            latest[0] = ctx.kube.patch_status(latest[0], transition.status)
        except Conflict:
            latest[0] = ctx.kube.get(TaskRun, run.namespace, run.name)
            raise

    try:
        retry_on_conflict(attempt)
    except NotFound:
        pass  # the run was deleted meanwhile: nothing to record
    except Unavailable as exc:
        # Not worth a retry of the whole task: unrecorded, a call deleted from this turn is made again,
        # as it was before the record existed; the fan-in records the turn when it next finds it whole.
        log.warning("could not record that %s/%s's tool calls exist: %s", run.namespace, run.name, exc)
    return latest[0]


def create_children(
    ctx: WorkerContext,
    parent: R,
    children: Sequence[Resource[Any, Any]],
    *,
    found: dict[str, dict[str, Any]] | None = None,
) -> R | None:
    """Create children by their deterministic names (concurrently: a turn may ask for dozens of tool
    calls); AlreadyExists means a previous attempt did it, if the object there is owned by ``parent``.
    One that is not (made by hand, or by anyone who may create such objects there) would be taken for
    the child, its status for the child's outcome: it is refused, as below.

    A child the API server refuses for good (refused_for_good) is refused again on every retry, so it
    ends the parent instead: a TaskRun or tool call is failed, a Task put in Error, with the reason
    (status, Warning Event, log line), and the parent as written is returned. None: every child exists.
    ``found``, if given, receives each child that was there already (ours), by name, as read."""

    starts_calls = ctx.start_tool_call is not None and isinstance(parent, TaskRun)
    # The calls started here are checked against the configuration as it was once the turn asked for
    # them (see approvals.gate): one read of their Tool serves them all.
    asked_at = ctx.config_cache.now() if isinstance(parent, TaskRun) else 0.0

    def create(child: Resource[Any, Any]) -> KubeAPIError | None:
        started_here = starts_calls and isinstance(child, TaskRunToolCall)
        if started_here:
            child = child.model_copy(deep=True)
            child.metadata.annotations[STARTED_BY_ANNOTATION] = ctx.identity
        try:
            created = ctx.kube.create(child)
        except AlreadyExists as exists:
            # only its metadata: an object made by someone else need not be a valid child at all
            current = ctx.kube.get_raw(child.PLURAL, child.namespace, child.name)
            metadata = ObjectMeta.model_validate(current.get("metadata") or {})
            if not metadata.owned_by(parent.uid):
                return exists
            if isinstance(child, TaskRunToolCall) and not _as_created(child, current, metadata):
                # Anyone who may create tool calls can copy the run's uid into an owner reference: one
                # made ahead of ours must be exactly ours, and not already approved.
                return exists
            if isinstance(child, TaskRun) and not _as_delegated(child, current):
                # The same for a delegation's run (another agent's, another message): its answer would
                # be the tool's result.
                return exists
            if found is not None:
                found[child.name] = current
            if isinstance(child, TaskRunToolCall) and started_in_process(current):
                # An earlier attempt made it to start it itself, and did not claim it (its worker lost,
                # or its task retried): no message was sent for it.
                _start(ctx, TaskRunToolCall.from_wire(current), asked_at)
            return None
        except KubeAPIError as refused:
            if refused_for_good(refused):
                return refused
            raise
        reason = CHILD_CREATED_REASON.get(child.KIND, "ChildCreated")
        # Keyed by the new object's uid: a child deleted and created again is a new Event. A burst's are
        # deferred: a fan-out creates dozens of children at once, and their tool calls should not wait on
        # Events (nor share the API server with them while they start).
        ctx.events.emit(
            parent, "Normal", reason, f"Created {child.KIND} {child.name}", key=created.uid, deferred=burst
        )
        if started_here:
            _start(ctx, cast(TaskRunToolCall, created), asked_at)
        return None

    burst = len(children) > 2
    if not burst:
        outcomes = [create(child) for child in children]
    else:
        with ThreadPoolExecutor(max_workers=min(16, len(children)), thread_name_prefix="create") as pool:
            # each in a copy of this task's context: the log lines (and spans) of a create carry the
            # run's kind, namespace and name as the task's own do
            futures = [pool.submit(contextvars.copy_context().run, create, child) for child in children]
            outcomes = [future.result() for future in futures]
    for child, refused in zip(children, outcomes, strict=True):
        if refused is not None:
            return _child_rejected(ctx, parent, child, refused)
    return None


def _start(ctx: WorkerContext, created: TaskRunToolCall, asked_at: float) -> None:
    """Run a tool call made to be started by its creator, here; when this process cannot now (or does
    not run tools), through the queue: the watcher sends no message for such a call."""
    if ctx.start_tool_call is not None and ctx.start_tool_call(created, asked_at):
        return
    message = ResourceMessage(
        kind=created.KIND,
        namespace=created.namespace,
        name=created.name,
        resource_version=created.resource_version,
        reason="started-by-queue",
    )
    ctx.enqueue(TaskName.TOOL_CALL, message, 0.0)


def _as_created(child: TaskRunToolCall, found: dict[str, Any], metadata: ObjectMeta) -> bool:
    """Whether the tool call found under ``child``'s name is as KubeChain creates it: the same spec, and
    no decision yet (one would be a human's, made after the create: rare within a retry)."""
    try:
        spec = TaskRunToolCallSpec.model_validate(found.get("spec") or {})
    except ValueError:
        return False
    return spec == child.spec and APPROVAL_ANNOTATION not in metadata.annotations


def _as_delegated(child: TaskRun, found: dict[str, Any]) -> bool:
    """Whether the TaskRun found under ``child``'s name has its spec (agent, message, tool call), if
    ``child`` is a delegation's run; a Task's run is taken on its owner reference alone."""
    if child.spec.task_run_tool_call_ref is None:
        return True
    try:
        return TaskRunSpec.model_validate(found.get("spec") or {}) == child.spec
    except ValueError:
        return False


def refused_for_good(error: KubeAPIError) -> bool:
    """A create the API server will refuse again on every retry: invalid (422), forbidden (403: RBAC, a
    ResourceQuota, an admission policy, a namespace being deleted), a bad request (400: what webhooks
    deny with by default) or too large (413, or etcd's refusal)."""
    return isinstance(error, Invalid | Forbidden | TooLarge) or error.status == 400


def _child_rejected(ctx: WorkerContext, parent: R, child: Resource[Any, Any], refused: KubeAPIError) -> R:
    foreign = isinstance(refused, AlreadyExists)  # its name is held by an object not the parent's
    message = (
        foreign_child_message(child.KIND, child.name, parent.KIND)
        if foreign
        else child_rejected_message(
            child.KIND,
            child.name,
            refused.status,
            refused.reason,
            refused.message,
            too_large=isinstance(refused, TooLarge),
        )
    )
    log.error("%s %s/%s: %s", parent.KIND, parent.namespace, parent.name, message)
    now = ctx.clock()
    transition: Transition | None = None
    if isinstance(parent, TaskRun):
        transition = plan_children_rejected(parent, message, now)
    elif isinstance(parent, TaskRunToolCall):
        # a tool call's only children are sub-agent runs
        transition = plan_tool_failure(
            parent, message, now, reason="SubAgentFailed" if foreign else "ExecutionFailed"
        )
    elif isinstance(parent, Task):
        transition = plan_validation(parent, False, message)
    if transition is None:
        ctx.events.emit(parent, "Warning", "ChildCreationFailed", message, key=child.name)
        return parent
    # Conflict (the parent moved meanwhile): the caller's retry re-reads and ends up here again.
    return apply_transition(ctx, parent, transition)


def decide_on_current(
    ctx: WorkerContext,
    model: type[R],
    namespace: str,
    name: str,
    step: Callable[[R], None],
    *,
    seen_version: str = "",
    first: R | None = None,
) -> None:
    """Run ``step`` on the object until it decides without losing a race: on the first attempt a read
    from the API server no older than ``seen_version`` (the version the message was sent for, which the
    API server can answer from its watch cache); after each conflict, a fresh read. Never from the
    message's content: a message is only a hint, and anyone who can write to the broker could forge
    one. An object deleted meanwhile ends it quietly. ``first``: the object as the API server just
    answered a write of it (its create), taken for the first attempt's read."""
    version = [seen_version]
    given = [first]

    def read() -> R:
        if given[0] is not None:
            answered, given[0] = given[0], None
            return answered
        not_older_than, version[0] = version[0], ""  # a conflict means that copy was stale: read fresh
        if not_older_than:
            try:
                return ctx.kube.get(model, namespace, name, not_older_than=not_older_than)
            except (Gone, Unavailable):
                pass  # the watch cache is behind that version (or unreachable for a moment): read fresh
        return ctx.kube.get(model, namespace, name)

    def attempt() -> None:
        try:
            step(read())
        except NotFound as gone:
            log.info("%s %s/%s: %s was deleted meanwhile; nothing to do", model.KIND, namespace, name, gone)

    retry_on_conflict(attempt)


def retry_on_conflict(step: Callable[[], T], attempts: int = 8) -> T | None:
    """Run ``step`` (which re-reads and re-decides) again whenever another writer moved first."""
    for _ in range(attempts):
        try:
            return step()
        except Conflict:
            continue
    log.warning("gave up after %d conflicting writes; the next event or resync will retry", attempts)
    return None


# The least time left for a call under a claim whose write was answered late for it to be made at all.
MIN_CALL_TIME_S = 1.0


def call_time_left_s(ctx: WorkerContext, claimed_at: str) -> float:
    """How long the side effect under this worker's claim stamped ``claimed_at`` may take: until the claim
    expires (judged, as other workers judge it, by the wall clock against the stamp), less the time kept
    for writing its outcome. Longer than any call under a young claim; a claim whose write was answered
    late (it is acted on whatever its age) cuts its call short by what it is over."""
    left = claim_remaining_s(claimed_at, ctx.clock(), ctx.settings.claim_timeout_s)
    return max(0.0, left - ctx.settings.claim_outcome_margin_s)


# How often a claim confirmed by reading it back, too old to act on, is stamped afresh, each fresh stamp
# answered too late again, before it is left in doubt for the task's retry: an API server that slow leaves
# no claim time enough.
CLAIM_RESTAMPS_MAX = 2


def apply_claim(
    ctx: WorkerContext,
    obj: R,
    transition: Transition,
    still_ours: Callable[[R], bool],
    *,
    young_s: float | None = None,
) -> R:
    """Write a claim and return the object as claimed; the caller acts under the claimedAt it carries,
    which is not always ``transition``'s (below).

    A write whose outcome is unknown (timeout, 5xx after the server applied it) is resolved by reading
    back, retried as outcomes are written (RECORD_RETRY_BUDGET_S, whatever the claim's age: one read back
    too old to act on is stamped afresh, below). If the claim we wrote is there, it is ours: its Events are
    posted (named after the version written, so never twice). If the object moved on without it, the
    write can no longer land: Conflict, for the caller to re-read and re-decide.

    A claim confirmed by reading it back is then acted on only if it is still young enough (the read-back
    may have taken a minute). An older one is stamped afresh (its claim fields only: the rest of the claim
    and its Events are done), a conditional write: a Conflict (the object moved with the claim on it, a
    metadata write, say) leaves the claim in doubt, as below, and the caller's re-decision claims it
    afresh. A claim whose write was answered is acted on whatever its age: the answer is late only when
    the API server is at its slowest, and stamping afresh then adds writes where they cost most (1,000
    runs at once under a 6 s claim timeout restamped most claims and stalled). Its call is cut short
    instead, to end in time (call_time_left_s).

    Still unknown (the reads went unanswered, or showed the object as it was before the write, which may
    yet land; or a fresh stamp went unanswered, or every one was answered too late), the claim is
    remembered in ctx.claims_in_doubt and Unavailable raised: Celery's retry (or any later task) in this
    process finds it on the object, knows it was never acted on, and claims it afresh.

    ``transition``'s claimedAt is stamped by the caller just before: the claim's age is measured from
    here, on ctx.monotonic. ``young_s``: the oldest a claim confirmed by reading it back may be to act on,
    if not claim_confirm_budget_s (one whose write was answered is acted on whatever its age)."""
    since = ctx.monotonic()
    try:
        claimed = apply_transition(ctx, obj, transition)
    except Unavailable as exc:
        claimed = _after_write(ctx, _confirm_claim(ctx, obj, transition, still_ours, exc), transition)
    else:
        if young_s is None and call_time_left_s(ctx, claimed.status.claimed_at or "") < MIN_CALL_TIME_S:
            # Answered so late that its call, cut short to end in time, could hardly start: a paid request
            # whose answer would be thrown away. Not acted on: this process's retry claims it afresh.
            ctx.claims_in_doubt.add(claimed, claimed.status.claimed_at, _stamp_only(transition))
            log.warning(
                "claim on %s %s/%s was answered too late to act on (under %.0f s of it left for the call): "
                "left in doubt; a retry of this task in this process claims it afresh",
                obj.KIND,
                obj.namespace,
                obj.name,
                MIN_CALL_TIME_S,
            )
            raise Unavailable(0, "Unavailable", f"{obj.KIND} {obj.name}'s claim was answered too late")
        ctx.claims_in_doubt.forget(obj)
        return claimed
    budget_s = ctx.settings.claim_confirm_budget_s if young_s is None else young_s
    for restamps in range(CLAIM_RESTAMPS_MAX + 1):
        age_s = ctx.monotonic() - since
        if age_s <= budget_s:
            ctx.claims_in_doubt.forget(obj)
            return claimed
        if restamps == CLAIM_RESTAMPS_MAX:
            break
        since = ctx.monotonic()
        claimed = _restamp_claim(ctx, claimed, transition, age_s)
    ctx.claims_in_doubt.add(claimed, claimed.status.claimed_at, _stamp_only(transition))
    log.warning(
        "claim on %s %s/%s, stamped afresh %d times, was each time older than %.0f s once written: left in "
        "doubt; a retry of this task in this process claims it afresh",
        obj.KIND,
        obj.namespace,
        obj.name,
        CLAIM_RESTAMPS_MAX,
        budget_s,
    )
    raise Unavailable(0, "Unavailable", f"the API server answered {obj.KIND} {obj.name}'s claim too late")


def _confirm_claim(
    ctx: WorkerContext,
    obj: R,
    transition: Transition,
    still_ours: Callable[[R], bool],
    unanswered: Unavailable,
) -> R:
    """Read back a claim whose write went unanswered (see apply_claim): the object as claimed, ours (its
    Events not posted yet); Conflict if the object moved on without it; else the Unavailable, the claim
    left in doubt."""
    claimed_at = str(transition.status.get("claimedAt") or "")
    # Only this process can tell the claim was never acted on: given up early, it is left to a retry that
    # another pod may get, which would wait for it to expire and then take the step for one interrupted.
    # Bounded by a deadline, reads included: each may wait out the API client's timeouts (a connect, then
    # a 30 s read), so with the backoff's sleeps alone bounded, nine reads held this thread for minutes.
    # A read under way at the deadline is the last: at most one read (its 429 waits included) past it.
    deadline = ctx.monotonic() + RECORD_RETRY_BUDGET_S
    delays = backoff_delays(RECORD_RETRY_BUDGET_S)
    while True:
        try:
            current = ctx.kube.get(type(obj), obj.namespace, obj.name)
        except Unavailable as exc:
            unanswered = exc
        else:
            if still_ours(current):
                log.info(
                    "claim write on %s %s/%s timed out but was applied", obj.KIND, obj.namespace, obj.name
                )
                return current
            if current.resource_version != obj.resource_version:
                raise Conflict(409, "Conflict", f"{obj.KIND} {obj.name} moved on without this claim")
        left_s = deadline - ctx.monotonic()
        delay = next(delays, None)
        if delay is None or left_s <= 0:
            break
        ctx.sleep(min(delay, left_s))
    ctx.claims_in_doubt.add(obj, claimed_at, transition)
    log.warning(
        "claim on %s %s/%s not confirmed within %.0f s (read back unanswered, or as it was before the write; "
        "last error: %s): left in doubt; a retry of this task in this process claims it afresh if it "
        "landed (one in another process waits for it to expire)",
        obj.KIND,
        obj.namespace,
        obj.name,
        RECORD_RETRY_BUDGET_S,
        unanswered,
    )
    raise unanswered


def _stamp_only(claim: Transition) -> Transition:
    """``claim`` as stamped afresh once it landed: its fields that say whose claim it is (claim_only),
    without its Events and children, which were posted and made after it landed."""
    return Transition(claim_only(claim).status, handoff=claim.handoff)


def _restamp_claim(ctx: WorkerContext, current: R, transition: Transition, age_s: float) -> R:
    """Stamp this process's claim ``transition`` (landed on ``current``, ``age_s`` old, never acted on)
    afresh: only its claim fields, on the status read back, which holds the rest of the claim, so nothing
    is counted twice; no Events."""
    claimed_at = current.status.claimed_at
    fresh = _stamp_only(transition)
    fresh.status["claimedAt"] = restamped_at = precise_timestamp(ctx.clock())
    log.info(
        "claim on %s %s/%s was %.0f s old once written, too old to act on: stamping it afresh",
        current.KIND,
        current.namespace,
        current.name,
        age_s,
    )
    try:
        return apply_transition(ctx, current, fresh)
    except Conflict:
        # Moved since (a metadata write, say): the caller re-decides, and still finds the claim ours and
        # never acted on.
        ctx.claims_in_doubt.add(current, claimed_at, fresh)
        raise
    except Unavailable as unanswered:
        # Either stamp may be the one on the object now.
        ctx.claims_in_doubt.add(current, claimed_at, fresh)
        ctx.claims_in_doubt.add(current, restamped_at, fresh)
        log.warning(
            "claim on %s %s/%s, stamped afresh, went unanswered (%s): left in doubt; a retry of this task in "
            "this process claims it afresh (one in another process waits for it to expire)",
            current.KIND,
            current.namespace,
            current.name,
            unanswered,
        )
        raise


# How long a worker holding an outcome (a tool result, an LLM answer) retries writing it through an
# unreachable API server before it gives up and lets Celery retry the task: at least this long, and in
# any case until its claim expires (until then nobody else may act on the step, so giving up earlier
# only loses the outcome). A claim whose write went unanswered is read back this long (apply_claim).
RECORD_RETRY_BUDGET_S = 60.0
RECORD_RETRY_FIRST_S = 0.5
RECORD_RETRY_MAX_S = 15.0


def backoff_delays(budget_s: float) -> Iterator[float]:
    """Exponential delays (0.5 s, 1 s, 2 s ... at most 15 s) adding up to ``budget_s``."""
    delay, left = RECORD_RETRY_FIRST_S, budget_s
    while left > 0:
        step = min(delay, RECORD_RETRY_MAX_S, left)
        yield step
        left -= step
        delay *= 2


def record_while_claimed(
    ctx: WorkerContext,
    claimed: R,
    still_ours: Callable[[R], bool],
    plan: Callable[[R], Transition],
    what: str,
    *,
    retry_budget_s: float = RECORD_RETRY_BUDGET_S,
    refused_as_too_large: Callable[[R, TooLarge], Transition] | None = None,
) -> None:
    """Write the outcome of a claimed side effect. On a conflict, re-read: if the claim is still ours
    (someone touched metadata) plan again from the fresh object; if it was re-taken or the object was
    deleted, drop the outcome — the new owner decides now.

    The outcome exists only in this process (a tool that ran, an LLM answer that was paid for), so an
    unreachable API server (Unavailable: restarting, 5xx, timeout) is retried here with backoff for
    ``retry_budget_s`` or until the claim expires, whichever is later, re-reading first each time: a write
    that timed out may have landed, and then only its Events and children are still to do. (Past the
    claim's expiry the outcome still lands if nobody took the claim meanwhile: the re-read says.) When
    the budget is spent the Unavailable is raised
    and Celery retries the task — as a last resort, because the outcome is lost then: the retry finds
    the call claimed and waits for the claim to expire, after which a non-idempotent tool is failed as
    interrupted and an idempotent tool or an LLM turn runs again (each a bounded number of times).

    ``refused_as_too_large``: what to write instead when the API server refuses the outcome as too large
    (TooLarge: etcd's limit), which no retry changes; without it the TooLarge is raised."""
    current: R | None = claimed
    raw: dict[str, Any] = {}
    # Every write answered with Unavailable: any of them may still land, even after a later write was
    # refused because of it (it committed meanwhile), so each re-read is compared with all of them. Each is
    # kept as its status's fingerprint and its effects: a status may hold a 1 MiB context window.
    unanswered: list[tuple[StatusFingerprint, Transition]] = []
    claim_left_s = claim_remaining_s(claimed.status.claimed_at, ctx.clock(), ctx.limits.claim_timeout_s)
    retry_budget_s = max(retry_budget_s, claim_left_s)
    delays = backoff_delays(retry_budget_s)
    conflicts = 0
    while True:
        try:
            if current is None:
                raw = ctx.kube.get_raw(claimed.PLURAL, claimed.namespace, claimed.name)
                current = type(claimed).from_wire(raw)
            status = raw.get("status") or {}
            landed = next((effects for written, effects in unanswered if patch_landed(status, written)), None)
            if landed is not None:
                log.info(
                    "%s of %s %s/%s was written before", what, claimed.KIND, claimed.namespace, claimed.name
                )
                _after_write(ctx, current, landed)
                return
            if not still_ours(current):
                log.warning(
                    "lost the claim on %s %s/%s; discarding its %s",
                    claimed.KIND,
                    claimed.namespace,
                    claimed.name,
                    what,
                )
                return
            attempted = plan(current)
            try:
                apply_transition(ctx, current, attempted)
            except Unavailable:
                effects = Transition({"phase": attempted.phase()}, attempted.events, attempted.children)
                unanswered.append((status_fingerprint(attempted.status), effects))
                raise
            except TooLarge as refused:
                if refused_as_too_large is None:
                    raise
                log.error(
                    "the API server refused the %s of %s %s/%s as too large (%s); writing that instead",
                    what,
                    claimed.KIND,
                    claimed.namespace,
                    claimed.name,
                    refused,
                )
                plan = _planned_once_refused(refused_as_too_large, refused)
                refused_as_too_large = None  # a refusal of that too is raised
                continue  # the object is as it was: planned again from it
            return
        except Conflict:
            conflicts += 1  # this write was refused, but an earlier unanswered one may be why
            if conflicts >= 8:
                log.warning(
                    "gave up writing the %s of %s/%s after 8 conflicts", what, claimed.namespace, claimed.name
                )
                return
        except NotFound:
            log.info(
                "%s %s/%s was deleted during its %s", claimed.KIND, claimed.namespace, claimed.name, what
            )
            return
        except Unavailable as exc:
            delay = next(delays, None)
            if delay is None:
                log.error(
                    "could not write the %s of %s %s/%s for %.0f s (%s); the task is retried, the %s is lost",
                    what,
                    claimed.KIND,
                    claimed.namespace,
                    claimed.name,
                    retry_budget_s,
                    exc,
                    what,
                )
                raise
            log.warning(
                "writing the %s of %s %s/%s failed (%s); retrying in %.1f s",
                what,
                claimed.KIND,
                claimed.namespace,
                claimed.name,
                exc,
                delay,
            )
            ctx.sleep(delay)
        current = None


def _planned_once_refused(
    refused_as_too_large: Callable[[R, TooLarge], Transition], refused: TooLarge
) -> Callable[[R], Transition]:
    return lambda current: refused_as_too_large(current, refused)


def schedule_recheck(
    ctx: WorkerContext, task: TaskName, resource: Resource[Any, Any], reason: str, delay_s: float
) -> None:
    """Enqueue this worker's own follow-up on ``resource`` for ``delay_s`` from now, in the current trace
    (beside the current task, linked to it: see ``recheck_trace``). Best effort: with the broker down,
    the watcher's resync finds the object (it is not terminal)."""
    message = ResourceMessage.recheck(resource, reason, *recheck_trace())
    try:
        ctx.enqueue(task, message, delay_s)
    except Exception as exc:  # noqa: BLE001 - the resync is the safety net
        log.warning("could not schedule %s of %s/%s: %s", reason, resource.namespace, resource.name, exc)
