"""Readiness decisions for LLM, Tool, Agent, Task, MCPServer and ContactChannel (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubechain.models import (
    GROUP,
    LABEL_TASK,
    LLM,
    Agent,
    ContactChannel,
    MCPServer,
    ObjectMeta,
    Resource,
    Task,
    TaskRun,
    Tool,
    label_value,
)
from kubechain.models.agent import ResolvedContactChannel, ResolvedMCPServer, ResolvedSubAgent, ResolvedTool
from kubechain.models.common import LocalObjectReference
from kubechain.models.labels import MAX_OBJECT_NAME, is_object_name, shortened
from kubechain.models.taskrun import TaskRunPhase, TaskRunSpec
from kubechain.models.tool import CREDENTIALS_IN_URL
from kubechain.models.urls import credentials_in_url, spec_url_problem
from kubechain.statemachines.toolset import (
    DELEGATE_PREFIX,
    FUNCTION_NAME,
    HUMAN_CONTACT_NAME,
    MCP_SEPARATOR,
    delegate_function_name,
    human_contact_function_name,
    mcp_function_name,
)
from kubechain.statemachines.transition import (
    Transition,
    normal,
    status_differs,
    validated_as_it_stands,
    warning,
)


def plan_validation(
    obj: Resource[Any, Any],
    ok: bool,
    detail: str,
    *,
    pending: bool = False,
    extra: dict[str, Any] | None = None,
    success_message: str | None = None,
    ready_field: str = "ready",
    unusable_secret: str | None = None,
) -> Transition | None:
    """The status triple for a validation outcome; None when nothing would change. ``unusable_secret``:
    the Secret the validation stopped at, recorded (and cleared by any other outcome) on the kinds whose
    status has unusableSecret (those that read one: LLM, ContactChannel, MCPServer)."""
    current = obj.status.model_dump(by_alias=True)
    patch: dict[str, Any] = {
        ready_field: ok,
        "status": "Ready" if ok else ("Pending" if pending else "Error"),
        "statusDetail": detail,
        "observedGeneration": obj.metadata.generation,
        **(extra or {}),
    }
    if "unusable_secret" in type(obj.status).model_fields:
        patch["unusableSecret"] = unusable_secret or None
    elif unusable_secret is not None:
        raise ValueError(f"a {obj.KIND}'s status does not record an unusable Secret")
    if not status_differs(current, patch):
        return None
    events = []
    if not current.get("status"):
        events.append(normal("Initializing", "Starting validation"))
    if ok:
        events.append(normal("ValidationSucceeded", success_message or detail))
    else:
        events.append(warning("ValidationFailed", detail))
    return Transition(status=patch, events=events)


def validate_tool_spec(tool: Tool) -> str | None:
    """Why the Tool cannot be used, or None."""
    spec = tool.spec
    if spec.parameters is not None:
        if spec.parameters.get("type", "object") != "object":
            return f"Invalid Parameters JSON: parameters must be a JSON schema of type object, got {spec.parameters.get('type')!r}"
        if "properties" in spec.parameters and not isinstance(spec.parameters["properties"], dict):
            return "Invalid Parameters JSON: properties must be an object"
    function = spec.function_name(tool.name)
    if function.startswith(DELEGATE_PREFIX) or HUMAN_CONTACT_NAME.fullmatch(function):
        # a call of such a name goes to a sub-agent or a contact channel, never to this Tool
        return (
            f'function name "{function}" is reserved: one starting with "{DELEGATE_PREFIX}" delegates to a '
            'sub-agent, one ending in "__human_contact", "__human_contact_slack" or "__human_contact_email" '
            "contacts a human: set a spec.name without it"
        )
    kind = tool_type(tool)
    if kind is None:
        return "unknown tool type: tool doesn't have valid execution configuration"
    if kind == "function" and (
        spec.execute is None or spec.execute.builtin is None or not spec.execute.builtin.name
    ):
        return "toolType function needs execute.builtin.name (one of add, subtract, multiply, divide)"
    if kind == "externalAPI" and (
        spec.execute is None or spec.execute.external_api is None or not spec.execute.external_api.url
    ):
        return "toolType externalAPI needs execute.externalAPI.url"
    if kind == "externalAPI" and spec.execute and spec.execute.external_api:
        url = spec.execute.external_api.url or ""
        if (problem := spec_url_problem("execute.externalAPI.url", url, CREDENTIALS_IN_URL)) is not None:
            return problem
    if kind == "delegateToAgent" and spec.agent_ref is None:
        return "toolType delegateToAgent needs agentRef"
    if kind == "delegateToAgent" and spec.agent_ref is not None:
        # Checked here, not in the CRD: manifests the original accepted still apply, and say why here.
        return agent_ref_problem(spec.agent_ref.name)
    return None


# Why an LLM whose baseUrl has userinfo is not used: a client makes Basic auth of it (over the API key's
# Bearer), and whoever may read LLMs reads the password.
LLM_CREDENTIALS_IN_URL = credentials_in_url(
    "spec.parameters.baseUrl",
    "remove them; the API key goes in the Secret named by spec.apiKeyFrom",
)


def llm_spec_problem(llm: LLM) -> str | None:
    """Why the LLM cannot be used as its spec stands (before its key is read and checked), or None."""
    base_url = (llm.spec.parameters.base_url if llm.spec.parameters else None) or ""
    if not base_url:  # the provider's own (or KUBECHAIN_OPENAI_BASE_URL, checked as a setting)
        return None
    return spec_url_problem("spec.parameters.baseUrl", base_url, LLM_CREDENTIALS_IN_URL)


def agent_ref_problem(name: str) -> str | None:
    """Why ``name`` (an agentRef's) can name no Agent, or None: one that cannot exist is not waited for."""
    if is_object_name(name):
        return None
    return (
        f'agentRef.name "{name}" is not a valid Agent name (lower-case letters, digits, "-" and ".", at most '
        "253 characters)"
    )


def delegates_to(tool: Tool) -> str | None:
    """The Agent a delegating Tool starts a sub-agent run of, or None for a Tool of another type."""
    if tool_type(tool) == "delegateToAgent" and tool.spec.agent_ref is not None:
        return tool.spec.agent_ref.name
    return None


def tool_type(tool: Tool) -> str | None:
    """The original's precedence: builtin, then agentRef, then externalAPI, then spec.toolType."""
    execute = tool.spec.execute
    if execute is not None and execute.builtin is not None:
        return "function"
    if tool.spec.agent_ref is not None:
        return "delegateToAgent"
    if execute is not None and execute.external_api is not None:
        return "externalAPI"
    return tool.spec.tool_type


@dataclass
class AgentDependencies:
    """What the validate task fetched for an Agent; None values are objects that do not exist."""

    llm: LLM | None
    tools: dict[str, Tool | None] = field(default_factory=dict)
    mcp_servers: dict[str, MCPServer | None] = field(default_factory=dict)
    # by name: those of spec.subAgents, and those its granted Tools delegate to
    sub_agents: dict[str, Agent | None] = field(default_factory=dict)
    channels: dict[str, ContactChannel | None] = field(default_factory=dict)


def function_name_problems(offered: list[tuple[str, str]]) -> list[str]:
    """Why the function names an Agent would offer its LLM (name, what offers it) cannot all be used:
    a name the LLM APIs refuse, or one name offered twice (a call to it could not be told apart)."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    for name, source in offered:
        if not FUNCTION_NAME.fullmatch(name):
            problems.append(
                f'{source} would be offered to the LLM as "{name}", which is not a valid function name '
                "(letters, digits, _ and -, at most 64 characters): rename it"
                + (" or set its spec.name" if source.startswith("Tool ") else "")
            )
        elif name in seen:
            problems.append(f'{seen[name]} and {source} are both offered to the LLM as "{name}"')
        else:
            seen[name] = source
    return problems


def offered_names(deps: AgentDependencies, agent: Agent) -> list[tuple[str, str]]:
    """The function names tool_definitions makes from the Agent's ready dependencies, with their source."""
    spec = agent.spec
    offered: list[tuple[str, str]] = []
    for ref in spec.tools:
        tool = deps.tools.get(ref.name)
        if tool is not None and tool.status.ready:
            offered.append((tool.spec.function_name(ref.name), f'Tool "{ref.name}"'))
    for ref in spec.mcp_servers:
        server = deps.mcp_servers.get(ref.name)
        if server is None or not server.status.connected:
            continue
        for mcp_tool in server.status.tools or []:
            source = f'MCPServer "{ref.name}" tool "{mcp_tool.name}"'
            offered.append((mcp_function_name(ref.name, mcp_tool.name), source))
    for ref in spec.sub_agents:
        if deps.sub_agents.get(ref.name) is not None:
            offered.append((delegate_function_name(ref.name), f'sub-agent "{ref.name}"'))
    for ref in spec.human_contact_channels:
        channel = deps.channels.get(ref.name)
        if channel is not None and channel.status.ready:
            name = human_contact_function_name(ref.name, channel.spec.type)
            offered.append((name, f'ContactChannel "{ref.name}"'))
    return offered


def mcp_name_problems(deps: AgentDependencies, agent: Agent) -> list[str]:
    """A Tool of the Agent offered under a name that starts with "<one of its MCP servers>__": a call of it
    goes to that server (the rest of the name as its tool), never to the Tool."""
    servers = {ref.name for ref in agent.spec.mcp_servers}
    problems: list[str] = []
    for ref in agent.spec.tools:
        tool = deps.tools.get(ref.name)
        if tool is None or not tool.status.ready:
            continue
        name = tool.spec.function_name(ref.name)
        server, separator, rest = name.partition(MCP_SEPARATOR)
        if separator and rest and server in servers:
            problems.append(
                f'Tool "{ref.name}" would be offered to the LLM as "{name}", which names a tool of the '
                f'Agent\'s MCPServer "{server}" (a call of it would go to the server): set its spec.name '
                f'to one not starting with "{server}{MCP_SEPARATOR}"'
            )
    return problems


def _not_found(model: type[Resource[Any, Any]], name: str) -> str:
    """The original's message: its client's error, in the API server's words for a missing object."""
    return f'failed to get {model.KIND} "{name}": {model.PLURAL}.{GROUP} "{name}" not found'


def plan_agent(agent: Agent, deps: AgentDependencies) -> Transition | None:
    spec = agent.spec
    problems: list[tuple[str, bool]] = []  # (message, is-waiting)
    if deps.llm is None:
        problems.append((_not_found(LLM, spec.llm_ref.name), False))
    elif deps.llm.status.status != "Ready":
        problems.append((f'LLM "{spec.llm_ref.name}" is not ready', True))
    valid_tools = []
    for ref in spec.tools:
        tool = deps.tools.get(ref.name)
        if tool is None:
            problems.append((_not_found(Tool, ref.name), False))
        elif not tool.status.ready:
            problems.append((f'tool "{ref.name}" is not ready', True))
        elif (target := delegates_to(tool)) is not None and deps.sub_agents.get(target) is None:
            # As a sub-agent of spec.subAgents: each call would start a run waiting for it to exist.
            problems.append(
                (f'waiting for sub-agent "{target}" (not found), which tool "{ref.name}" delegates to', True)
            )
        else:
            valid_tools.append(ResolvedTool(kind="Tool", name=ref.name))
    valid_servers = []
    for ref in spec.mcp_servers:
        server = deps.mcp_servers.get(ref.name)
        if server is None:
            problems.append((_not_found(MCPServer, ref.name), False))
        elif not server.status.connected:
            problems.append((f'MCPServer "{ref.name}" is not connected', True))
        else:
            valid_servers.append(
                ResolvedMCPServer(name=ref.name, tools=[t.name for t in server.status.tools or []])
            )
    valid_sub_agents = []
    for ref in spec.sub_agents:
        # Existence only: requiring readiness would deadlock agents that delegate to each other.
        if deps.sub_agents.get(ref.name) is None:
            problems.append((f'waiting for sub-agent "{ref.name}" (not found)', True))
        else:
            valid_sub_agents.append(ResolvedSubAgent(name=ref.name))
    valid_channels = []
    for ref in spec.human_contact_channels:
        channel = deps.channels.get(ref.name)
        if channel is None:
            problems.append((f'ContactChannel "{ref.name}" not found', False))
        elif not channel.status.ready:
            problems.append((f'ContactChannel "{ref.name}" is not ready', True))
        else:
            valid_channels.append(ResolvedContactChannel(name=ref.name, type=channel.spec.type))
    extra = {
        "validTools": [t.to_wire() for t in valid_tools],
        "validMCPServers": [s.to_wire() for s in valid_servers],
        "validSubAgents": [a.to_wire() for a in valid_sub_agents],
        "validHumanContactChannels": [c.to_wire() for c in valid_channels],
    }
    problems += [(text, False) for text in function_name_problems(offered_names(deps, agent))]
    problems += [(text, False) for text in mcp_name_problems(deps, agent)]
    if problems:
        message = "; ".join(text for text, _ in problems)
        waiting = all(is_waiting for _, is_waiting in problems)
        return plan_validation(agent, False, message, pending=waiting, extra=extra)
    return plan_validation(agent, True, "All dependencies validated successfully", extra=extra)


def taskrun_for_task(task: Task) -> TaskRun:
    """The original's one run per Task: ``<task>-1`` (shortened with a hash if a long Task name makes it
    too long to be a name), labelled and owned by the Task."""
    return TaskRun(
        metadata=ObjectMeta(
            name=shortened(f"{task.name}-1", MAX_OBJECT_NAME),
            namespace=task.namespace,
            labels={LABEL_TASK: label_value(task.name)},
            owner_references=[task.owner_reference()],
        ),
        spec=TaskRunSpec(task_ref=LocalObjectReference(name=task.name)),
    )


def run_was_refused(task: Task, agent: Agent | None) -> bool:
    """Whether the Task is in Error because its run could not be created: the API server refused it
    (child_rejected_message), or an object not the Task's holds its name (foreign_child_message).

    Told from the Task's state, not from its statusDetail's words (a rewording made the Task flap to Ready at
    every resync): the Task's own validation (plan_task) gives Error only for a missing Agent, so a Task in
    Error whose Agent is found, and that has no run yet, is in it for its run. (Or, if the Agent's creation
    went unseen between two validations of the Task, still for the missing Agent: its run is then created
    a moment before the Task is Ready, which the run waits out.)"""
    return agent is not None and task.status.status == "Error" and not task.status.task_run_name


def plan_task_run_recorded(task: Task, run: TaskRun) -> Transition | None:
    """Record on the Task that its run exists (see ``TaskStatus.task_run_name``)."""
    if task.status.task_run_name == run.name:
        return None
    return Transition(status={"taskRunName": run.name})


def plan_task_output(task: Task, run: TaskRun | None) -> Transition | None:
    """The Task's ``Output`` column: its run's final answer (the original declared it and never wrote it),
    nothing while its run has none, and what it showed once its run is deleted (it is not run again)."""
    if run is None:
        return None
    wanted = (run.status.output or None) if run.phase == TaskRunPhase.FINAL_ANSWER else None
    if (task.status.output or None) == wanted:
        return None
    return Transition(status={"output": wanted})  # None removes the field (merge patch)


def plan_task(task: Task, agent: Agent | None) -> Transition | None:
    name = task.spec.agent_ref.name
    if agent is None:
        return plan_validation(task, False, _not_found(Agent, name))
    if not agent.status.ready:
        return plan_validation(task, False, f'agent "{name}" is not ready', pending=True)
    if not task.status.task_run_name and not validated_as_it_stands(agent):
        # Its run is not started on a spec the Agent's Ready is not about. (Once the run exists, an
        # Agent edit does not flip the Task to Pending and back.)
        detail = f'agent "{name}" is not ready: its spec changed since it was validated'
        return plan_validation(task, False, detail, pending=True)
    return plan_validation(task, True, "Task Run Created", success_message="Task validation successful")
