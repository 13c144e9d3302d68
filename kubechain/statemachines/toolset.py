"""The tools an Agent offers the LLM, and how an LLM function name maps back to what executes it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from kubechain.llm.base import FUNCTION_NAME, MAX_FUNCTION_NAME, NOT_IN_FUNCTION_NAME, ToolDefinition
from kubechain.models import Agent, ContactChannel, MCPServer, Tool

MESSAGE_PARAMETERS = {
    "type": "object",
    "properties": {"message": {"type": "string", "description": "The message to send"}},
    "required": ["message"],
}
MCP_SEPARATOR = "__"
DELEGATE_PREFIX = "delegate_to_agent__"
HUMAN_CONTACT_MARKER = "__human_contact"
# Exactly what tool_definitions offers for a channel (the ContactChannel types are slack and email), so an
# MCP tool such as ``crm__human_contact_lookup`` stays an MCP tool.
HUMAN_CONTACT_NAME = re.compile(rf"(.+?){HUMAN_CONTACT_MARKER}(?:_slack|_email)?")

ToolKind = Literal["tool", "mcp", "subagent", "human"]


# The function names the LLM is offered (tool_definitions) and Agent validation checks: made in one place.
def object_parameters(schema: Any) -> dict[str, Any]:
    """An MCP tool's input schema (or a Tool's parameters) as the LLM providers take it: a JSON Schema of
    type "object" (OpenAI and Anthropic refuse the whole request otherwise, so one such tool would fail
    every turn of every Agent that uses it). Arguments are always an object: a schema that omits the type says so
    (it is added), one of another type cannot describe them (an empty object schema stands in)."""
    if not isinstance(schema, dict):
        return {"type": "object", "properties": {}}
    kind = schema.get("type")
    if kind == "object":
        return schema
    if kind is None or (isinstance(kind, list) and "object" in kind):
        return {**schema, "type": "object"}
    return {"type": "object", "properties": {}}


def mcp_function_name(server: str, tool: str) -> str:
    """``<server>__<tool>``, or for a tool name the MCP spec allows but the LLM APIs refuse ("." in it, up
    to 128 characters), the name with those characters made "_", cut to fit, and a hash of the real name
    appended: valid, stable, and unlike any other tool's ("files.write" beside "files_write") whatever
    else the server lists, so adding a tool never renames another. mcp_tool_name maps a call back. A
    server name the APIs refuse, or too long to leave room for a tool's, is the user's to change: such a
    name is kept as it is, for validation to report."""
    name = f"{server}{MCP_SEPARATOR}{tool}"
    digest = hashlib.sha256(tool.encode()).hexdigest()[:8]
    room = MAX_FUNCTION_NAME - len(server) - len(MCP_SEPARATOR) - len(digest) - 1
    if FUNCTION_NAME.fullmatch(name) or not FUNCTION_NAME.fullmatch(server) or room < 1:
        return name
    return f"{server}{MCP_SEPARATOR}{NOT_IN_FUNCTION_NAME.sub('_', tool)[:room]}_{digest}"


def mcp_tool_name(server: str, called: str, tools: Collection[str]) -> str:
    """The tool of MCP server ``server`` that the LLM called as ``<server>__<called>``: the one of that
    name, else the one of ``tools`` (the server's listed tools) mcp_function_name offered under it, else
    ``called`` (for the server to say it has no such tool)."""
    if called in tools:
        return called
    function_name = f"{server}{MCP_SEPARATOR}{called}"
    return next((tool for tool in tools if mcp_function_name(server, tool) == function_name), called)


def delegate_function_name(agent: str) -> str:
    return f"{DELEGATE_PREFIX}{agent}"


def human_contact_function_name(channel: str, channel_type: str) -> str:
    return f"{channel}{HUMAN_CONTACT_MARKER}_{channel_type}"


@dataclass(frozen=True)
class ToolTarget:
    """What an LLM function name refers to."""

    kind: ToolKind
    name: str  # Tool function name, MCP server, sub-agent or contact channel
    tool: str = ""  # the MCP server's tool name


def resolve_tool_name(
    function_name: str,
    mcp_servers: Collection[str] | None = None,
    channels: Collection[str] | None = None,
) -> ToolTarget:
    """What a function name the LLM called refers to. ``mcp_servers`` and ``channels``: the Agent's, when
    known. A Kubernetes name has no ``_``, so an MCP server's name ends at the first ``__`` and the rest,
    ``__`` included, is the server's tool (``proxy__github__create_issue``). A human-contact name of one
    of the Agent's channels is that channel's (validation refuses an Agent whose MCP server offers the
    same name); else a name starting with one of the Agent's MCP servers is that server's tool, even one
    that looks like a human contact."""
    if function_name.startswith(DELEGATE_PREFIX):
        return ToolTarget("subagent", function_name[len(DELEGATE_PREFIX) :])
    human = HUMAN_CONTACT_NAME.fullmatch(function_name)
    if human and channels is not None and human.group(1) in channels:
        return ToolTarget("human", human.group(1))
    server, separator, tool = function_name.partition(MCP_SEPARATOR)
    if separator and server and tool and mcp_servers is not None and server in mcp_servers:
        return ToolTarget("mcp", server, tool)
    if human:
        return ToolTarget("human", human.group(1))
    if separator and server and tool and mcp_servers is None:
        return ToolTarget("mcp", server, tool)
    return ToolTarget("tool", function_name)


def tool_definitions(
    agent: Agent,
    tools: list[Tool],
    mcp_servers: list[MCPServer],
    sub_agents: list[Agent],
    channels: list[ContactChannel],
) -> list[ToolDefinition]:
    """Every function the agent's LLM may call, JSON schemas passed through whole."""
    definitions: list[ToolDefinition] = []
    for tool in tools:
        # validation takes parameters without a type for an object schema; the providers refuse them
        # unless they say so
        parameters = object_parameters(tool.spec.parameters or None)
        definitions.append(
            ToolDefinition(
                name=tool.spec.function_name(tool.name),
                description=tool.spec.description or "",
                parameters=parameters,
            )
        )
    for server in mcp_servers:
        for mcp_tool in server.status.tools or []:
            definitions.append(
                ToolDefinition(
                    name=mcp_function_name(server.name, mcp_tool.name),
                    description=mcp_tool.description or "",
                    parameters=object_parameters(mcp_tool.input_schema),
                )
            )
    for sub_agent in sub_agents:
        definitions.append(
            ToolDefinition(
                name=delegate_function_name(sub_agent.name),
                description=sub_agent.spec.description or f"Delegate a task to the agent {sub_agent.name}",
                parameters=MESSAGE_PARAMETERS,
            )
        )
    for channel in channels:
        if channel.spec.type == "email":
            description = (
                channel.spec.email.context_about_user if channel.spec.email else None
            ) or "Contact a human via email"
        else:
            description = (
                channel.spec.slack.context_about_channel_or_user if channel.spec.slack else None
            ) or "Contact a human via Slack"
        definitions.append(
            ToolDefinition(
                name=human_contact_function_name(channel.name, channel.spec.type),
                description=description,
                parameters=MESSAGE_PARAMETERS,
            )
        )
    return definitions
