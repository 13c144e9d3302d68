"""The tools an Agent offers its LLM, and what an LLM function name resolves to (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from kubechain.statemachines.toolset import ToolTarget, resolve_tool_name


def test_tool_name_resolution() -> None:
    assert resolve_tool_name("fetch__fetch").kind == "mcp"
    assert resolve_tool_name("add").kind == "tool"
    # An MCP server's name ends at the first "__" (Kubernetes names have no "_"): the rest is its tool.
    assert resolve_tool_name("proxy__github__create_issue") == ToolTarget(
        "mcp", "proxy", "github__create_issue"
    )
    assert resolve_tool_name("docs__search__v2", {"docs"}) == ToolTarget("mcp", "docs", "search__v2")
    # With the Agent's MCP servers known, a Tool's own function name with "__" in it stays a Tool ...
    assert resolve_tool_name("get__weather", {"docs"}) == ToolTarget("tool", "get__weather")
    # ... and a tool of one of its servers named like a human contact is that server's tool.
    assert resolve_tool_name("crm__human_contact", {"crm"}) == ToolTarget("mcp", "crm", "human_contact")
    assert resolve_tool_name("crm__human_contact_email", {"docs"}) == ToolTarget("human", "crm")
    # A ContactChannel of the Agent named like one of its MCP servers: its human contact is the channel's.
    assert resolve_tool_name("slack__human_contact_slack", {"slack"}, {"slack"}) == ToolTarget(
        "human", "slack"
    )
    assert resolve_tool_name("slack__post_message", {"slack"}, {"slack"}) == ToolTarget(
        "mcp", "slack", "post_message"
    )
    assert resolve_tool_name("delegate_to_agent__helper").name == "helper"
    assert resolve_tool_name("approvers__human_contact_email").kind == "human"
    assert resolve_tool_name("approvers__human_contact_slack").name == "approvers"
    assert resolve_tool_name("approvers__human_contact").name == "approvers"
    # an MCP server's tool whose name merely starts like one is still that server's tool
    assert resolve_tool_name("crm__human_contact_lookup") == ToolTarget("mcp", "crm", "human_contact_lookup")


@pytest.mark.parametrize(
    ("schema", "offered"),
    [
        (None, {"type": "object", "properties": {}}),
        (
            {"properties": {"q": {"type": "string"}}},
            {"properties": {"q": {"type": "string"}}, "type": "object"},
        ),
        ({"type": ["object", "null"], "properties": {}}, {"type": "object", "properties": {}}),
        ({"type": "string"}, {"type": "object", "properties": {}}),
        (
            {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        ),
    ],
)
def test_an_mcp_tools_input_schema_is_offered_to_the_llm_as_an_object_schema(
    schema: dict[str, Any] | None, offered: dict[str, Any]
) -> None:
    """OpenAI and Anthropic refuse a whole request whose tool parameters are not of type "object": one
    MCP tool that leaves the type out failed every turn of every Agent using its server."""
    from kubechain.models import Agent, MCPServer
    from kubechain.statemachines.toolset import tool_definitions

    server = MCPServer.from_wire(
        {
            "metadata": {"name": "s", "namespace": "default"},
            "spec": {"transport": "stdio", "command": "x"},
            "status": {"connected": True, "tools": [{"name": "t", "inputSchema": schema}]},
        }
    )
    agent = Agent.from_wire({"metadata": {"name": "a"}, "spec": {"llmRef": {"name": "l"}, "system": "s"}})
    (definition,) = tool_definitions(agent, [], [server], [], [])
    assert definition.parameters == offered


@pytest.mark.parametrize(
    ("parameters", "offered"),
    [
        (None, {"type": "object", "properties": {}}),
        (
            {"properties": {"a": {"type": "number"}}, "required": ["a"]},
            {"type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]},
        ),
        ({}, {"type": "object", "properties": {}}),
        (
            {"type": "object", "properties": {"a": {"type": "number"}}},
            {"type": "object", "properties": {"a": {"type": "number"}}},
        ),
    ],
)
def test_a_tools_parameters_without_a_type_are_offered_as_an_object_schema(
    parameters: dict[str, Any] | None, offered: dict[str, Any]
) -> None:
    """Validation accepts a Tool whose parameters leave the type out (an object, then), but they were sent
    as they are: OpenAI refuses function parameters not of type "object", Anthropic an input_schema without
    a type, and every turn of every Agent offering the Tool failed."""
    from kubechain.models import Agent, Tool
    from kubechain.statemachines.toolset import tool_definitions
    from kubechain.statemachines.validation import validate_tool_spec

    spec: dict[str, Any] = {"name": "add", "description": "Add", "execute": {"builtin": {"name": "add"}}}
    if parameters is not None:
        spec["parameters"] = parameters
    tool = Tool.from_wire({"metadata": {"name": "add", "namespace": "default"}, "spec": spec})
    assert validate_tool_spec(tool) is None
    agent = Agent.from_wire({"metadata": {"name": "a"}, "spec": {"llmRef": {"name": "l"}, "system": "s"}})
    (definition,) = tool_definitions(agent, [tool], [], [], [])
    assert definition.parameters == offered
