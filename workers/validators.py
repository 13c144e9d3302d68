"""``validate``: decide the readiness of LLM, Tool, Agent and Task resources (MCPServer, ContactChannel in
their own modules)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from kubechain.kube.errors import Forbidden, NotFound
from kubechain.llm.base import LLMError, parameter_notes
from kubechain.models import LLM, Agent, ContactChannel, MCPServer, Resource, Task, TaskRun, Tool
from kubechain.models.labels import is_object_name
from kubechain.queueing import AgentSeen, ResourceMessage
from kubechain.statemachines.transition import Transition, validated_as_it_stands
from kubechain.statemachines.validation import (
    AgentDependencies,
    delegates_to,
    llm_spec_problem,
    plan_agent,
    plan_task,
    plan_task_output,
    plan_task_run_recorded,
    plan_validation,
    run_was_refused,
    taskrun_for_task,
    validate_tool_spec,
)
from workers.context import WorkerContext
from workers.transitions import apply_transition, create_children, retry_on_conflict

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Resource[Any, Any])


def get_or_none(
    ctx: WorkerContext,
    model: type[R],
    namespace: str,
    name: str,
    *,
    cached: bool = False,
    behind: Callable[[R], bool] | None = None,
    read_since: float | None = None,
) -> R | None:
    """``cached``: from the config cache, where ``behind`` says which copy is outdated (read again), and
    ``read_since`` which copies are too old (see TTLReadCache.get)."""
    try:
        if cached:
            return ctx.config_cache.get(model, namespace, name, behind=behind, read_since=read_since)
        return ctx.kube.get(model, namespace, name)
    except NotFound:
        return None


def cached_agent(ctx: WorkerContext, namespace: str, name: str, seen: AgentSeen | None) -> Agent | None:
    """The Agent from the config cache, read again when the watcher has seen a later version of it
    (``seen``, a message's hint: it can cost a read, never choose the content)."""
    return get_or_none(ctx, Agent, namespace, name, cached=True, behind=seen.outdates if seen else None)


class SecretProblem(Exception):
    """A Secret that cannot be used; the message says why and what to fix (never a value)."""

    def __init__(self, message: str, secret_name: str = "") -> None:
        super().__init__(message)
        self.secret_name = secret_name  # recorded in the validated object's status.unusableSecret


class EmptySecretValue(SecretProblem):
    """The key is there, with nothing in it (the original's ``EmptyAPIKey``)."""


def read_api_key(
    ctx: WorkerContext, namespace: str, secret_name: str, key: str, *, cached: bool = False
) -> str:
    """The value of one Secret key, or SecretProblem saying what to fix (never the value itself)."""
    try:
        data = (
            ctx.config_cache.read_secret(namespace, secret_name)
            if cached
            else ctx.kube.read_secret(namespace, secret_name)
        )
    except NotFound:
        raise SecretProblem(f'failed to get secret: secrets "{secret_name}" not found', secret_name) from None
    except Forbidden as denied:
        # RBAC that does not grant this Secret (e.g. a Role narrowed to some names): the user's to fix,
        # and retrying will not change it.
        raise SecretProblem(f"failed to get secret: {denied.message}", secret_name) from None
    if key not in data:
        raise SecretProblem(f'key "{key}" not found in secret "{secret_name}"', secret_name)
    value = data[key].strip()
    if not value:
        raise EmptySecretValue(
            f'empty API key provided: key "{key}" in secret "{secret_name}" is empty', secret_name
        )
    unsendable = next((i for i, ch in enumerate(value) if not (ch.isascii() and ch.isprintable())), None)
    if unsendable is not None:
        # A pasted "…" or a zero-width space: the HTTP library would raise while building the header,
        # outside any error a provider client reports. Say where, never what the value is.
        raise SecretProblem(
            f'key "{key}" in secret "{secret_name}" has a character an HTTP header cannot carry '
            f"(character {unsendable + 1}): an API key is printable ASCII; set it again",
            secret_name,
        )
    return value


def validate(ctx: WorkerContext, message: ResourceMessage) -> None:
    handler = VALIDATORS.get(message.kind)
    if handler is None:
        log.warning("no validator for kind %s", message.kind)
        return
    try:
        retry_on_conflict(lambda: handler(ctx, message))
    except NotFound:
        # An object deleted while it was checked (an MCP server or LLM provider slow to answer): its status
        # write is answered 404. Nothing to record and nobody's fault, so no traceback; any other 404
        # (the object is still there) is one.
        if not _deleted(ctx, message):
            raise
        log.info(
            "%s %s/%s was deleted while it was validated: nothing to record",
            message.kind,
            message.namespace,
            message.name,
        )


def _deleted(ctx: WorkerContext, message: ResourceMessage) -> bool:
    try:
        ctx.kube.get(VALIDATED_KINDS[message.kind], message.namespace, message.name)
    except NotFound:
        return True
    return False


def _write(ctx: WorkerContext, obj: R, transition: Transition | None) -> R:
    """``obj`` after ``transition`` (unchanged when there is none)."""
    return apply_transition(ctx, obj, transition) if transition is not None else obj


PROVIDER_NAMES = {"openai": "OpenAI", "anthropic": "Anthropic"}


def validate_llm(ctx: WorkerContext, message: ResourceMessage) -> None:
    llm = get_or_none(ctx, LLM, message.namespace, message.name)
    if llm is None:
        return
    problem = llm_spec_problem(llm)
    if problem is not None:  # before the key is read: no request is made to such a URL
        _write(ctx, llm, plan_validation(llm, False, problem))
        return
    ref = llm.spec.api_key_ref()
    try:
        api_key = read_api_key(ctx, llm.namespace, ref.name, ref.key)
    except SecretProblem as unusable:
        _write(ctx, llm, plan_validation(llm, False, str(unusable), unusable_secret=unusable.secret_name))
        return
    # The original checked an Anthropic key only for being there: a wrong one was Ready until every run
    # failed. Both providers list their models with the key, which costs nothing.
    provider = PROVIDER_NAMES.get(llm.spec.provider, llm.spec.provider)
    try:
        ctx.llms.for_llm(llm, api_key).validate_credentials()
    except LLMError as exc:
        if exc.unchecked or exc.status_code == 404:
            # A compatible endpoint or gateway without a model list, or a key that may not read it (an
            # OpenAI restricted key without "Models: Read", which may chat all the same): nothing says
            # the key is wrong.
            said = str(exc) if exc.unchecked else "the endpoint has no model list (404)"
            detail = _noted(f"{provider} API key not checked: {said}", llm)
            _write(ctx, llm, plan_validation(llm, True, detail))
            return
        if exc.retryable and llm.status.ready and validated_as_it_stands(llm):
            # An overloaded or unreachable provider for a moment does not take a working LLM (and every
            # Agent on it) out of service; the next resync checks again. Only the spec that was checked is
            # known to work: one edited since (a baseUrl nothing answers at) is not Ready on the old check.
            log.warning("LLM %s/%s: key check failed for now: %s", llm.namespace, llm.name, exc)
            return
        _write(ctx, llm, plan_validation(llm, False, f"{provider} API key validation failed: {exc}"))
        return
    _write(ctx, llm, plan_validation(llm, True, _noted(f"{provider} API key validated successfully", llm)))


def _noted(detail: str, llm: LLM) -> str:
    """A Ready LLM's statusDetail, with what of its parameters is not sent (``parameter_notes``)."""
    return "; ".join([detail, *parameter_notes(llm)])


def validate_tool(ctx: WorkerContext, message: ResourceMessage) -> None:
    tool = get_or_none(ctx, Tool, message.namespace, message.name)
    if tool is None:
        return
    problem = validate_tool_spec(tool)
    _write(ctx, tool, plan_validation(tool, problem is None, problem or "Tool validation successful"))


def agent_dependencies(ctx: WorkerContext, agent: Agent) -> AgentDependencies:
    ns = agent.namespace
    spec = agent.spec
    tools = {ref.name: get_or_none(ctx, Tool, ns, ref.name) for ref in spec.tools}
    # A Tool whose agentRef no Agent may have is not Ready (validate_tool_spec): that name is not read.
    targets = (delegates_to(tool) for tool in tools.values() if tool is not None)
    delegated_to = {ref.name for ref in spec.sub_agents} | {
        target for target in targets if target is not None and is_object_name(target)
    }
    return AgentDependencies(
        llm=get_or_none(ctx, LLM, ns, spec.llm_ref.name),
        tools=tools,
        mcp_servers={ref.name: get_or_none(ctx, MCPServer, ns, ref.name) for ref in spec.mcp_servers},
        sub_agents={name: get_or_none(ctx, Agent, ns, name) for name in sorted(delegated_to)},
        channels={
            ref.name: get_or_none(ctx, ContactChannel, ns, ref.name) for ref in spec.human_contact_channels
        },
    )


def validate_agent(ctx: WorkerContext, message: ResourceMessage) -> None:
    agent = get_or_none(ctx, Agent, message.namespace, message.name)
    if agent is None:
        return
    _write(ctx, agent, plan_agent(agent, agent_dependencies(ctx, agent)))


def validate_task(ctx: WorkerContext, message: ResourceMessage) -> None:
    task = get_or_none(ctx, Task, message.namespace, message.name)
    if task is None or task.metadata.deletion_timestamp:
        return
    agent = get_or_none(ctx, Agent, task.namespace, task.spec.agent_ref.name)
    run = taskrun_for_task(task)
    if (
        agent is not None
        and run_was_refused(task, agent)
        and agent.status.ready
        and validated_as_it_stands(agent)
    ):
        # Its run was refused last time (a quota, a policy): try again before claiming Ready, so a refusal
        # that persists leaves the Task in Error instead of flapping to Ready on every resync.
        if create_children(ctx, task, [run]) is not None:
            return
    task = _write(ctx, task, plan_task(task, agent))
    if task.status.ready and task.status.task_run_name != run.name:
        # Ready first, run second: the run's first prepare then never finds its Task not yet Ready (a
        # spurious TaskNotReady). A crash in between is mended by the redelivered message, or else by the
        # watcher's resync, which re-validates a Ready Task whose run is missing. Once the run is recorded
        # as created, a missing run was deleted, and is not created again.
        if create_children(ctx, task, [run]) is not None:
            return  # refused: the Task is in Error now, saying why
        task = _write(ctx, task, plan_task_run_recorded(task, run))
    _write(ctx, task, plan_task_output(task, get_or_none(ctx, TaskRun, task.namespace, run.name)))


def validate_mcpserver(ctx: WorkerContext, message: ResourceMessage) -> None:
    from workers.mcpservers import validate_mcpserver as handler  # lazy: that module imports this one

    handler(ctx, message)


def validate_contactchannel(ctx: WorkerContext, message: ResourceMessage) -> None:
    from workers.contactchannels import validate_contactchannel as handler  # lazy: imports this module

    handler(ctx, message)


VALIDATED_KINDS: dict[str, type[Resource[Any, Any]]] = {
    model.KIND: model for model in (LLM, Tool, Agent, Task, MCPServer, ContactChannel)
}

VALIDATORS = {
    "LLM": validate_llm,
    "Tool": validate_tool,
    "Agent": validate_agent,
    "Task": validate_task,
    "MCPServer": validate_mcpserver,
    "ContactChannel": validate_contactchannel,
}
