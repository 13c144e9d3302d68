"""What work an object's current state calls for, and which other objects a change affects (pure).

The watcher applies these to watch events and, periodically, to everything it has cached (resync), so a
lost message or a dead worker never strands a resource.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from kubechain.models.labels import LABEL_TASK, label_value
from kubechain.models.taskrun import FAN_IN_TASKRUN_PHASES, TERMINAL_TASKRUN_PHASES, TaskRunPhase
from kubechain.models.toolcall import TERMINAL_TOOLCALL_PHASES, ToolCallPhase
from kubechain.queueing import AgentSeen, TaskName
from kubechain.statemachines.approval import APPROVAL_ANNOTATION
from kubechain.statemachines.transition import claim_remaining_s, parse_timestamp

VALIDATED_KINDS = ("LLM", "Tool", "Agent", "Task", "MCPServer", "ContactChannel")
TOOLCALL_EXECUTABLE = ("", ToolCallPhase.PENDING, ToolCallPhase.READY_TO_EXECUTE_APPROVED_TOOL)
TASKRUN_PREPARE = ("", TaskRunPhase.INITIALIZING, TaskRunPhase.PENDING, *FAN_IN_TASKRUN_PHASES)
TASKRUN_WAITING = ("", TaskRunPhase.INITIALIZING, TaskRunPhase.PENDING)
TOOLCALL_AWAITING_DECISION = (
    ToolCallPhase.AWAITING_HUMAN_APPROVAL,
    ToolCallPhase.ERROR_REQUESTING_HUMAN_APPROVAL,
)


# How far apart the watcher's resync re-sends work whose object has not changed, at most: it backs off
# (doubling from its staleness window) so that work nobody can advance does not flood the workers.
MAX_RECHECK_S = 300.0
# ... but a validation stopped by a Secret that is missing (or a key of it, or RBAC that does not grant it),
# or whose value no HTTP header (a pasted "…", a line break) or environment variable (a NUL) can carry, is
# checked again at least this often: Secrets are not watched (the watcher may not list them, see
# deploy/base/rbac.yaml), so only a re-check sees the one created or fixed, and such a check reads one Secret.
# Such a validation names the Secret in status.unusableSecret (LLM, ContactChannel, MCPServer).
SECRET_RECHECK_S = 30.0


@dataclass(frozen=True)
class Work:
    task: TaskName
    kind: str
    namespace: str
    name: str
    countdown_s: float = 0.0
    reason: str = "event"
    trace_uid: str = ""  # the TaskRun whose trace this work belongs to
    max_recheck_s: float = MAX_RECHECK_S  # the resync's back-off for it, at most


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


def _status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("status") or {}


def is_terminal(kind: str, obj: Mapping[str, Any]) -> bool:
    phase = _status(obj).get("phase") or ""
    if kind == "TaskRun":
        return phase in TERMINAL_TASKRUN_PHASES
    if kind == "TaskRunToolCall":
        return phase in TERMINAL_TOOLCALL_PHASES
    return False


# Of a run or tool call, the parts no routing decision reads, and that make up most of its size.
_BULK = {
    "spec": ("contextWindow", "userMessage", "arguments"),
    # a failed tool call's error (up to 64 KiB) is in both error and statusDetail
    "status": ("contextWindow", "output", "result", "error", "statusDetail"),
}
# kubectl apply's copy of the whole object as applied (a run's userMessage again)
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


# In the watcher's cache, a Task's output (its run's whole answer) is replaced by whether it is shown.
OUTPUT_SHOWN = "_outputShown"


def cached_form(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """What the watcher keeps of ``obj``. A TaskRun or tool call is kept without its context window,
    message, arguments, output, result, error texts and kubectl's last-applied copy: every decision about it (and about its parent and its Task)
    reads only metadata, references, phase and claim. Finished runs are kept for good, and a run in
    flight may carry a context window of up to 1 MiB: a watcher holding them whole grew with every run
    (and with every run in flight) until it hit its memory limit. A Task keeps only whether its output is
    shown. Each change arrives as a whole object again, for the event handler."""
    if kind == "Task":
        status = obj.get("status")
        if not isinstance(status, dict) or "output" not in status:
            return obj
        kept = {key: value for key, value in status.items() if key != "output"}
        return {**obj, "status": {**kept, OUTPUT_SHOWN: bool(status["output"])}}
    if kind not in ("TaskRun", "TaskRunToolCall"):
        return obj
    slim = dict(obj)
    for part, fields in _BULK.items():
        section = obj.get(part)
        if isinstance(section, dict) and any(field in section for field in fields):
            slim[part] = {key: value for key, value in section.items() if key not in fields}
    metadata = obj.get("metadata")
    if isinstance(metadata, dict) and LAST_APPLIED in (metadata.get("annotations") or {}):
        annotations = {key: value for key, value in metadata["annotations"].items() if key != LAST_APPLIED}
        slim["metadata"] = {**metadata, "annotations": annotations}
    return slim


def needs_validation(obj: Mapping[str, Any]) -> bool:
    status = _status(obj)
    generation = (obj.get("metadata") or {}).get("generation")
    return not status.get("status") or status.get("observedGeneration") != generation


def waits_for_a_secret(obj: Mapping[str, Any]) -> bool:
    """Whether the object's validation stopped at a Secret it could not use (see SECRET_RECHECK_S): its
    status says so in unusableSecret, whatever the words of its statusDetail."""
    return bool(_status(obj).get("unusableSecret"))


def work_for(
    kind: str,
    obj: Mapping[str, Any],
    now: datetime,
    claim_timeout_s: float,
    *,
    resync: bool = False,
) -> list[Work]:
    """The tasks this object's own state calls for. ``resync`` adds the periodic checks: re-validate
    resources that are not Ready, and re-take claims whose holder stopped answering."""
    namespace, name = _meta(obj)
    if _deleting(obj):
        return []
    return [
        replace(work, trace_uid=trace_uid_of(kind, obj))
        for work in _work_for(kind, obj, now, claim_timeout_s, resync)
    ]


def work_for_deleted_toolcall(obj: Mapping[str, Any]) -> Work:
    """A tool call was deleted (cancelled): its run's fan-in goes on without it."""
    namespace, _ = _meta(obj)
    parent = str(((obj.get("spec") or {}).get("taskRunRef") or {}).get("name") or "")
    return Work(
        TaskName.PREPARE,
        "TaskRun",
        namespace,
        parent,
        reason="toolcall-deleted",
        trace_uid=trace_uid_of("TaskRunToolCall", obj),
    )


def work_for_deleted_sub_agent_run(obj: Mapping[str, Any]) -> list[Work]:
    """A sub-agent's run was deleted: the tool call that waited for it fails now, not at its resync."""
    return _prompt_delegating_call(obj, "sub-agent-deleted")


def _prompt_delegating_call(run: Mapping[str, Any], reason: str) -> list[Work]:
    """A tool_call task for the tool call that started this (sub-agent) run, if one did."""
    namespace, _ = _meta(run)
    owners = (run.get("metadata") or {}).get("ownerReferences") or []
    return [
        Work(TaskName.TOOL_CALL, "TaskRunToolCall", namespace, str(owner.get("name")), reason=reason)
        for owner in owners
        if owner.get("kind") == "TaskRunToolCall" and owner.get("name")
    ]


# The reason of a tool call's work prompted by its run's end; the worker then takes a cached copy of the
# run that has not ended as outdated (reads it again), since the watcher saw it end.
RUN_ENDED = "run-ended"


def run_just_ended(run: Mapping[str, Any], previous: Mapping[str, Any] | None) -> bool:
    """Whether this change of a run is the one that ended it (seen first as ended counts), and the run is
    not being deleted (its tool calls, and their sub-agents' runs, go with it)."""
    return (
        is_terminal("TaskRun", run)
        and not (previous is not None and is_terminal("TaskRun", previous))
        and not _deleting(run)
    )


def work_for_calls_of_ended_run(run: Mapping[str, Any], calls: Iterable[Mapping[str, Any]]) -> list[Work]:
    """A run ended (run_just_ended) while some of its tool calls had not: those that wait, for a
    sub-agent's run above all (which goes on paying for LLM calls, read by no one), or for a human, end now
    (the worker fails them and deletes the sub-agent's unfinished run), not at their own resync, backed off
    to MAX_RECHECK_S while nothing changes. ``calls``: candidates (the watcher's index of tool calls by
    their run's label); only those that name this run and that it owns count. A Running call is left to
    its claim's holder, whose write ends it (a lost holder's, to the resync's stale claim)."""
    namespace, name = _meta(run)
    uid = (run.get("metadata") or {}).get("uid")
    out: list[Work] = []
    for call in calls:
        call_namespace, call_name = _meta(call)
        owners = (call.get("metadata") or {}).get("ownerReferences") or []
        if (
            call_namespace != namespace
            or ((call.get("spec") or {}).get("taskRunRef") or {}).get("name") != name
            or not uid
            or not any(owner.get("kind") == "TaskRun" and owner.get("uid") == uid for owner in owners)
            or is_terminal("TaskRunToolCall", call)
            or (_status(call).get("phase") or "") == ToolCallPhase.RUNNING
            or _deleting(call)
        ):
            continue
        out.append(
            Work(
                TaskName.TOOL_CALL,
                "TaskRunToolCall",
                namespace,
                call_name,
                reason=RUN_ENDED,
                trace_uid=str(uid or ""),
            )
        )
    return sorted(out, key=lambda work: work.name)


def trace_uid_of(kind: str, obj: Mapping[str, Any]) -> str:
    """The uid of the TaskRun whose trace work on this object belongs to ("" for other kinds)."""
    meta = obj.get("metadata") or {}
    if kind == "TaskRun":
        return str(meta.get("uid") or "")
    if kind == "TaskRunToolCall":
        for owner in meta.get("ownerReferences") or []:
            if owner.get("kind") == "TaskRun":
                return str(owner.get("uid") or "")
    return ""


def _work_for(
    kind: str,
    obj: Mapping[str, Any],
    now: datetime,
    claim_timeout_s: float,
    resync: bool,
) -> list[Work]:
    namespace, name = _meta(obj)
    status = _status(obj)
    reason = "resync" if resync else "event"
    if kind in VALIDATED_KINDS:
        not_ready = status.get("status") in ("Error", "Pending") or (
            kind == "MCPServer" and not status.get("connected")
        )
        # Resync also re-checks connected MCP servers, so one that went away is noticed (the watcher's
        # per-object backoff spaces these checks out to minutes while nothing changes).
        if needs_validation(obj) or (resync and (not_ready or kind == "MCPServer")):
            recheck = SECRET_RECHECK_S if not_ready and waits_for_a_secret(obj) else MAX_RECHECK_S
            return [Work(TaskName.VALIDATE, kind, namespace, name, reason=reason, max_recheck_s=recheck)]
        return []
    phase = status.get("phase") or ""
    if kind == "TaskRun":
        if phase in TERMINAL_TASKRUN_PHASES:
            # A sub-agent's run finished: its delegating tool call collects the outcome.
            if resync:
                return []  # the tool call's own resync (AwaitingSubAgent) covers a lost message
            # A Task's run finished: the Task shows its answer (its Output column).
            task = ((obj.get("spec") or {}).get("taskRef") or {}).get("name")
            return _prompt_delegating_call(obj, "sub-agent-finished") + (
                [Work(TaskName.VALIDATE, "Task", namespace, str(task), reason="run-finished")] if task else []
            )
        if phase in TASKRUN_PREPARE:
            return [Work(TaskName.PREPARE, kind, namespace, name, reason=reason)]
        if phase == TaskRunPhase.READY_FOR_LLM:
            return [Work(TaskName.LLM_CALL, kind, namespace, name, reason=reason)]
        if phase == TaskRunPhase.ERROR_BACKOFF:
            due = parse_timestamp(status.get("nextAttemptAt"))
            countdown = max(0.0, (due - now).total_seconds()) if due else 0.0
            if resync and countdown > 0:
                # The event's delayed message (and a worker's re-check when it came early) covers the
                # wait; the run's version does not change meanwhile, so each resync would queue one
                # more message due at the same moment. One lost is sent by the first resync after due.
                return []
            return [Work(TaskName.LLM_CALL, kind, namespace, name, countdown, reason)]
        if (
            phase == TaskRunPhase.SEND_CONTEXT_WINDOW_TO_LLM
            and resync
            and _claim_expired(status, now, claim_timeout_s)
        ):
            return [Work(TaskName.LLM_CALL, kind, namespace, name, reason="stale-claim")]
        return []
    if kind == "TaskRunToolCall":
        parent = ((obj.get("spec") or {}).get("taskRunRef") or {}).get("name")
        if phase in TERMINAL_TOOLCALL_PHASES:
            # Fan-in hint: the parent re-checks whether every tool call of its turn is done. Only on
            # events: a parent still in ToolCallsPending is re-checked by its own resync, and finished
            # runs keep their finished tool calls for good.
            if resync or not parent:
                return []
            return [Work(TaskName.PREPARE, "TaskRun", namespace, parent, reason="toolcall-finished")]
        if phase in TOOLCALL_EXECUTABLE:
            return [Work(TaskName.TOOL_CALL, kind, namespace, name, reason=reason)]
        if phase == ToolCallPhase.RUNNING and resync and _claim_expired(status, now, claim_timeout_s):
            return [Work(TaskName.TOOL_CALL, kind, namespace, name, reason="stale-claim")]
        if phase in TOOLCALL_AWAITING_DECISION and not resync and _has_approval_annotation(obj):
            # A human decided with kubectl (or `kubechain approve|reject`): record it now, not at the next resync.
            return [Work(TaskName.TOOL_CALL, kind, namespace, name, reason="approval-annotation")]
        if (
            phase
            in (
                ToolCallPhase.AWAITING_HUMAN_APPROVAL,
                ToolCallPhase.AWAITING_HUMAN_INPUT,
                ToolCallPhase.AWAITING_SUB_AGENT,
                ToolCallPhase.ERROR_REQUESTING_HUMAN_APPROVAL,
            )
            and resync
        ):
            return [Work(TaskName.TOOL_CALL, kind, namespace, name, reason=reason)]
    return []


# The work built from a run's Agent (its first context window, its turns, its tool calls' grant checks):
# its message carries the Agent as the watcher has it (agent_seen), for a worker's older copy to be read
# again.
BUILT_FROM_THE_RUNS_AGENT = (TaskName.PREPARE, TaskName.LLM_CALL, TaskName.TOOL_CALL)


def run_agent_name(run: Mapping[str, Any], task_of: Callable[[str], Mapping[str, Any] | None]) -> str:
    """The Agent a run is built from, found as the workers find it: the one it started with
    (status.agentName), else its agentRef's, else its Task's (``task_of`` a Task's name: the Task as
    cached, or None). "" if none is known."""
    named = _status(run).get("agentName") or ((run.get("spec") or {}).get("agentRef") or {}).get("name")
    if named:
        return str(named)
    task_name = ((run.get("spec") or {}).get("taskRef") or {}).get("name")
    task = task_of(str(task_name)) if task_name else None
    return str((((task or {}).get("spec") or {}).get("agentRef") or {}).get("name") or "")


def agent_seen(agent: Mapping[str, Any]) -> AgentSeen:
    """What a message says of an Agent as the watcher has it (see AgentSeen). A field that is not a
    number (a hand-written status) counts as 0: it cannot make a worker read the Agent again."""

    def number(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    meta = agent.get("metadata") or {}
    return AgentSeen(
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        generation=number(meta.get("generation")),
        observed_generation=number(_status(agent).get("observedGeneration")),
    )


def _has_approval_annotation(obj: Mapping[str, Any]) -> bool:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return bool(annotations.get(APPROVAL_ANNOTATION))


def _claim_expired(status: Mapping[str, Any], now: datetime, claim_timeout_s: float) -> bool:
    return claim_remaining_s(status.get("claimedAt"), now, claim_timeout_s) <= 0


def readiness(kind: str, obj: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What dependents care about; a change of it re-triggers them."""
    if obj is None:
        return ("absent",)
    status = _status(obj)
    if kind == "TaskRun":
        return (status.get("phase"),)
    tools = status.get("tools") or []
    return (
        status.get("ready"),
        # whether the status is about the spec as it stands: a run or a Task does not start on an Agent
        # edited since it was validated, and waits for the validation that follows, Ready as before
        status.get("observedGeneration") == (obj.get("metadata") or {}).get("generation"),
        # and which generation it is about: a watch that missed the edit (a relist, a reconnect) sees an
        # Agent go from one validated generation to the next at once, and the turns that waited for it
        # meanwhile (plan_turn_waits_for_agent) must hear of it then, not at their resync minutes later
        status.get("observedGeneration") if kind == "Agent" else None,
        status.get("status"),
        status.get("connected"),
        # the names, not their number: a tool renamed changes what an Agent offers (and its conflicts)
        tuple(sorted(str(tool.get("name")) for tool in tools if isinstance(tool, Mapping))),
        # a delegating Tool retargeted: its Agents require the new target to exist
        _delegation_target(obj) if kind == "Tool" else None,
        # a Tool's spec.name is the function name its Agents offer: a rename may clash with another of
        # theirs (or with an MCP server's prefix), which only their validation sees
        ((obj.get("spec") or {}).get("name") or None) if kind == "Tool" else None,
    )


def _delegation_target(tool: Mapping[str, Any] | None) -> str | None:
    """The Agent a delegating Tool delegates to (validation.delegates_to, on the wire form), else None."""
    spec = (tool or {}).get("spec") or {}
    if ((spec.get("execute") or {}).get("builtin")) is not None:
        return None  # a builtin wins over agentRef (validation.tool_type)
    name = (spec.get("agentRef") or {}).get("name")
    return str(name) if name else None


def _tools_delegate_to(
    namespace: str, spec: Mapping[str, Any], cache: Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]]
) -> set[str]:
    """The Agents the delegating Tools an Agent's spec grants delegate to (they, like its spec.subAgents,
    need only exist)."""
    tools = cache.get("Tool") or {}
    targets = (_delegation_target(tools.get((namespace, name))) for name in _refs(spec, "tools"))
    return {target for target in targets if target is not None}


def _refs(spec: Mapping[str, Any], field: str) -> list[str]:
    return [str(ref.get("name")) for ref in spec.get(field) or [] if isinstance(ref, Mapping)]


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _llm_ready(llm: Mapping[str, Any] | None) -> bool:
    return llm is not None and _status(llm).get("status") == "Ready"


def _ready(obj: Mapping[str, Any] | None) -> bool:
    return obj is not None and bool(_status(obj).get("ready"))


def _connected(server: Mapping[str, Any] | None) -> bool:
    return server is not None and bool(_status(server).get("connected"))


def _exists(obj: Mapping[str, Any] | None) -> bool:
    return obj is not None


# What an Agent's spec refers to, and what its validator (plan_agent) requires of each: a change of such
# an object re-validates the Agents that use it, and resync re-validates Ready Agents it no longer holds
# for. Sub-agents need only exist (readiness would deadlock agents that delegate to each other), as do the
# Agents its delegating Tools delegate to (_tools_delegate_to).
AGENT_DEPENDENCIES: tuple[tuple[str, str, Callable[[Mapping[str, Any] | None], bool]], ...] = (
    ("LLM", "llmRef", _llm_ready),
    ("Tool", "tools", _ready),
    ("MCPServer", "mcpServers", _connected),
    ("Agent", "subAgents", _exists),
    ("ContactChannel", "humanContactChannels", _ready),
)


def _agent_refs(spec: Mapping[str, Any], field: str) -> list[str]:
    if field == "llmRef":  # the one single reference
        return [str((spec.get("llmRef") or {}).get("name") or "")]
    return _refs(spec, field)


def dependents(
    kind: str, obj: Mapping[str, Any], cache: Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]]
) -> list[Work]:
    """Objects that use ``obj`` and must re-decide now that its readiness changed."""
    namespace, name = _meta(obj)
    out: list[Work] = []

    def objects(of_kind: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
        for (ns, obj_name), other in (cache.get(of_kind) or {}).items():
            if ns == namespace:
                yield obj_name, other

    fields = [field for dependency, field, _ in AGENT_DEPENDENCIES if dependency == kind]
    if fields:
        for agent_name, agent in objects("Agent"):
            spec = agent.get("spec") or {}
            if any(name in _agent_refs(spec, field) for field in fields) or (
                kind == "Agent" and name in _tools_delegate_to(namespace, spec, cache)
            ):
                out.append(
                    Work(TaskName.VALIDATE, "Agent", namespace, agent_name, reason=f"{kind.lower()}-changed")
                )
    if kind == "ContactChannel":
        for server_name, server in objects("MCPServer"):
            if ((server.get("spec") or {}).get("approvalContactChannel") or {}).get("name") == name:
                out.append(
                    Work(TaskName.VALIDATE, "MCPServer", namespace, server_name, reason="channel-changed")
                )
    if kind == "Agent":
        for task_name, task in objects("Task"):
            if ((task.get("spec") or {}).get("agentRef") or {}).get("name") == name:
                out.append(Work(TaskName.VALIDATE, "Task", namespace, task_name, reason="agent-changed"))
    if kind in ("Agent", "Task"):
        for run_name, run in objects("TaskRun"):
            phase = _status(run).get("phase") or ""
            if phase == TaskRunPhase.READY_FOR_LLM and kind == "Agent" and _run_agent(run, cache) == name:
                # A turn waits (unclaimed) for its Agent's edit to be validated (plan_turn_waits_for_agent);
                # any other ReadyForLLM run is about to be claimed, and one more message changes nothing.
                out.append(Work(TaskName.LLM_CALL, "TaskRun", namespace, run_name, reason="agent-changed"))
            if phase not in TASKRUN_WAITING:
                continue
            spec = run.get("spec") or {}
            if kind == "Task":
                hit = (spec.get("taskRef") or {}).get("name") == name
            else:
                hit = _run_agent(run, cache) == name
            if hit:
                out.append(
                    Work(TaskName.PREPARE, "TaskRun", namespace, run_name, reason=f"{kind.lower()}-changed")
                )
    return out


def _run_agent(
    run: Mapping[str, Any], cache: Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]]
) -> str | None:
    """The Agent of a cached run, as the workers find it: the one it started with (status.agentName), else
    its spec.agentRef's, else its Task's."""
    recorded = _status(run).get("agentName")
    if recorded:
        return str(recorded)
    spec = run.get("spec") or {}
    agent_ref = (spec.get("agentRef") or {}).get("name")
    if agent_ref is not None:
        return str(agent_ref)
    namespace, _ = _meta(run)
    run_task = (cache.get("Task") or {}).get((namespace, (spec.get("taskRef") or {}).get("name") or ""))
    name = ((run_task or {}).get("spec") or {}).get("agentRef", {}).get("name") if run_task else None
    return str(name) if name is not None else None


def _runs_by_task(
    cache: Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]], phase: str | None = None
) -> set[tuple[str, Any]]:
    """(namespace, Task label value) of every cached TaskRun a Task made (in ``phase``, if given)."""
    return {
        (ns, ((run.get("metadata") or {}).get("labels") or {}).get(LABEL_TASK))
        for (ns, _), run in (cache.get("TaskRun") or {}).items()
        if phase is None or (_status(run).get("phase") or "") == phase
    }


def tasks_missing_their_run(
    cache: Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]],
) -> list[Work]:
    """Ready Tasks with no TaskRun labelled as theirs and none recorded as created: the worker that wrote
    Ready died before it created the run, and its message is gone too. Validating the Task again creates
    the run. (A run recorded as created and now missing was deleted: it is not created again.)"""
    runs_of = _runs_by_task(cache)
    return [
        Work(TaskName.VALIDATE, "Task", ns, name, reason="resync")
        for (ns, name), task in (cache.get("Task") or {}).items()
        if _status(task).get("ready")
        and not _status(task).get("taskRunName")
        and not _deleting(task)
        and (ns, label_value(name)) not in runs_of
    ]


def tasks_missing_their_output(
    cache: Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]],
) -> list[Work]:
    """Tasks whose run gave its final answer while the Task does not show it: the event that should have
    prompted the Task (its run finishing) came while no watcher was leading, or its message was lost."""
    answered = _runs_by_task(cache, TaskRunPhase.FINAL_ANSWER)
    return [
        Work(TaskName.VALIDATE, "Task", ns, name, reason="output-missing")
        for (ns, name), task in (cache.get("Task") or {}).items()
        if (ns, label_value(name)) in answered
        and not _deleting(task)
        and not (_status(task).get(OUTPUT_SHOWN) or _status(task).get("output"))
    ]


def _agent_dependencies_ok(
    namespace: str, spec: Mapping[str, Any], cache: Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]]
) -> bool:
    """What the Agent validator requires of its dependencies (plan_agent), read from the cache."""
    agents = cache.get("Agent") or {}
    return all(
        holds((cache.get(kind) or {}).get((namespace, name)))
        for kind, field, holds in AGENT_DEPENDENCIES
        for name in _agent_refs(spec, field)
    ) and all(_exists(agents.get((namespace, name))) for name in _tools_delegate_to(namespace, spec, cache))


def _tool_names(tools: Any) -> list[str]:
    return sorted(str(tool.get("name") if isinstance(tool, Mapping) else tool) for tool in tools or [])


def _mcp_tools_changed(
    namespace: str, agent: Mapping[str, Any], cache: Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]]
) -> bool:
    """Whether a server's tool names differ from those the Agent recorded when it was validated (the
    names, in any order, as readiness() compares them)."""
    servers = cache.get("MCPServer") or {}
    for recorded in _status(agent).get("validMCPServers") or []:
        if not isinstance(recorded, Mapping):
            continue
        server = servers.get((namespace, str(recorded.get("name") or "")))
        if server is not None and _tool_names(_status(server).get("tools")) != _tool_names(
            recorded.get("tools")
        ):
            return True
    return False


def ready_with_unready_dependencies(
    cache: Mapping[str, Mapping[tuple[str, str], Mapping[str, Any]]],
) -> list[Work]:
    """Ready Agents and Tasks whose dependencies are gone or no longer ready, and Ready Agents whose MCP
    servers' tools changed since. The change that should have re-validated them is normally a watch
    event; one that came while no watcher was leading (a restart, a lost lease) is not replayed, so
    resync compares the cached states instead."""
    out: list[Work] = []
    agents = cache.get("Agent") or {}
    for (namespace, name), agent in agents.items():
        if _deleting(agent) or not _ready(agent):
            continue
        if not _agent_dependencies_ok(namespace, agent.get("spec") or {}, cache):
            out.append(Work(TaskName.VALIDATE, "Agent", namespace, name, reason="dependency-not-ready"))
        elif _mcp_tools_changed(namespace, agent, cache):
            out.append(Work(TaskName.VALIDATE, "Agent", namespace, name, reason="mcp-tools-changed"))
    for (namespace, name), task in (cache.get("Task") or {}).items():
        agent_name = str(((task.get("spec") or {}).get("agentRef") or {}).get("name") or "")
        if not _deleting(task) and _ready(task) and not _ready(agents.get((namespace, agent_name))):
            out.append(Work(TaskName.VALIDATE, "Task", namespace, name, reason="dependency-not-ready"))
    return out
