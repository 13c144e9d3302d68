"""Agent: an LLM, a system prompt and the tools it may use."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kubechain.models.base import KubeModel, Resource
from kubechain.models.common import LocalObjectReference, ReadyStatus


class AgentSpec(KubeModel):
    llm_ref: LocalObjectReference = Field(
        description="The LLM that answers for this agent. It must be Ready for the Agent to be."
    )
    tools: list[LocalObjectReference] = Field(
        default_factory=list,
        description="Tools the LLM may call, offered under each Tool's spec.name (default: its name). "
        "Each must be Ready for the Agent to be.",
    )
    mcp_servers: list[LocalObjectReference] = Field(
        default_factory=list,
        alias="mcpServers",
        description="MCPServers whose tools the LLM may call, each offered as <server>__<tool>. Each must "
        "be connected for the Agent to be Ready.",
    )
    sub_agents: list[LocalObjectReference] = Field(
        default_factory=list,
        description="Agents this one may delegate to, each offered to the LLM as delegate_to_agent__<agent>: "
        "a call starts a run of that Agent with the call's message, and its final answer is the call's "
        "result. The Agent is Pending until they exist (they need not be Ready).",
    )
    human_contact_channels: list[LocalObjectReference] = Field(
        default_factory=list,
        description="ContactChannels through which the LLM may ask a person a question, each offered as "
        "<channel>__human_contact_<type>; the person's reply is the call's result. Each must be Ready for "
        "the Agent to be.",
    )
    system: str = Field(
        min_length=1, description="The system prompt: the first message of every run of this agent."
    )
    description: str | None = Field(
        default=None,
        description="What this agent does, for the agents that delegate to it: the description of their "
        'delegate_to_agent__<agent> tool (default "Delegate a task to the agent <agent>").',
    )


class ResolvedTool(KubeModel):
    kind: Literal["Tool", "ToolSet"] = Field(
        description="Always Tool (ToolSet, in the original's enum, is not used)."
    )
    name: str = Field(description="The Tool's name.")


class ResolvedMCPServer(KubeModel):
    name: str = Field(description="The MCPServer's name.")
    tools: list[str] = Field(
        default_factory=list, description="The names of the server's tools, as its status lists them."
    )


class ResolvedSubAgent(KubeModel):
    name: str = Field(description="The sub-agent's name (an Agent).")


class ResolvedContactChannel(KubeModel):
    name: str = Field(description="The ContactChannel's name.")
    type: str = Field(description="The channel's type: slack or email.")


class AgentStatus(ReadyStatus):
    valid_tools: list[ResolvedTool] | None = Field(
        default=None, description="The Tools of spec.tools that the last validation found Ready."
    )
    valid_mcp_servers: list[ResolvedMCPServer] | None = Field(
        default=None,
        alias="validMCPServers",
        description="The MCPServers of spec.mcpServers that the last validation found connected, with "
        "their tools.",
    )
    valid_sub_agents: list[ResolvedSubAgent] | None = Field(
        default=None, description="The sub-agents of spec.subAgents that the last validation found."
    )
    valid_human_contact_channels: list[ResolvedContactChannel] | None = Field(
        default=None,
        description="The ContactChannels of spec.humanContactChannels that the last validation found Ready.",
    )


class Agent(Resource[AgentSpec, AgentStatus]):
    KIND: ClassVar[str] = "Agent"
    PLURAL: ClassVar[str] = "agents"
    status: AgentStatus = Field(default_factory=AgentStatus)
