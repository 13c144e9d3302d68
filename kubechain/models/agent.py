"""Agent: an LLM, a system prompt and the tools it may use."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kubechain.models.base import KubeModel, Resource
from kubechain.models.common import LocalObjectReference, ReadyStatus


class AgentSpec(KubeModel):
    llm_ref: LocalObjectReference
    tools: list[LocalObjectReference] = Field(default_factory=list)
    mcp_servers: list[LocalObjectReference] = Field(default_factory=list, alias="mcpServers")
    sub_agents: list[LocalObjectReference] = Field(default_factory=list)
    human_contact_channels: list[LocalObjectReference] = Field(default_factory=list)
    system: str = Field(min_length=1)
    description: str | None = None


class ResolvedTool(KubeModel):
    kind: Literal["Tool", "ToolSet"]
    name: str


class ResolvedMCPServer(KubeModel):
    name: str
    tools: list[str] = Field(default_factory=list)


class ResolvedSubAgent(KubeModel):
    name: str


class ResolvedContactChannel(KubeModel):
    name: str
    type: str


class AgentStatus(ReadyStatus):
    valid_tools: list[ResolvedTool] | None = None
    valid_mcp_servers: list[ResolvedMCPServer] | None = Field(default=None, alias="validMCPServers")
    valid_sub_agents: list[ResolvedSubAgent] | None = None
    valid_human_contact_channels: list[ResolvedContactChannel] | None = None


class Agent(Resource[AgentSpec, AgentStatus]):
    KIND: ClassVar[str] = "Agent"
    PLURAL: ClassVar[str] = "agents"
    status: AgentStatus = Field(default_factory=AgentStatus)
