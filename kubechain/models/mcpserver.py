"""MCPServer: a Model Context Protocol server whose tools agents may call."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from kubechain.models.base import PRESERVE_UNKNOWN, KubeModel, Resource
from kubechain.models.common import (
    UNUSABLE_SECRET_DESCRIPTION,
    LocalObjectReference,
    SecretKeyRef,
    StatusValue,
)


class EnvVarSource(KubeModel):
    secret_key_ref: SecretKeyRef | None = Field(
        default=None, description="The Secret and key whose value is used."
    )


class EnvVar(KubeModel):
    """A name/value pair whose value may come from a Secret (env vars of stdio servers, HTTP headers)."""

    name: str = Field(
        description="The environment variable's name (in env) or the header's name (in headers)."
    )
    value: str | None = Field(default=None, description="The value as written here; set it or valueFrom.")
    value_from: EnvVarSource | None = Field(
        default=None,
        description="Where to read the value from instead: a key of a Secret in this namespace, read by the "
        "workers (a change to it reconnects the server).",
    )


# resource.Quantity as the Kubernetes API takes it: "100m", "1Gi", or a bare number (cpu: 1).
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
Quantity = Annotated[
    int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN})
]


class ResourceRequirements(KubeModel):
    limits: dict[str, Quantity] | None = Field(
        default=None, description="Resource limits (cpu, memory) as in a Pod; recorded, not enforced."
    )
    requests: dict[str, Quantity] | None = Field(
        default=None, description="Resource requests (cpu, memory) as in a Pod; recorded, not enforced."
    )


class MCPServerSpec(KubeModel):
    transport: Literal["stdio", "http", "sse"] = Field(
        description="How to reach the server: stdio (a command each worker starts as a child process, set "
        "command), http (streamable HTTP, set url) or sse (the older HTTP with server-sent events, set url)."
    )
    command: str | None = Field(
        default=None,
        description="For stdio, required: the program to start (npx, uvx, a path). The workers' "
        "KUBECHAIN_MCP_COMMAND_ALLOWLIST, when set, limits which may start.",
    )
    args: list[str] | None = Field(default=None, description="For stdio: the command's arguments.")
    env: list[EnvVar] | None = Field(
        default=None,
        description="For stdio: environment variables of the command, added to a minimal environment. With "
        "KUBECHAIN_MCP_COMMAND_ALLOWLIST set, those that change what runs (PATH, LD_*, NODE_OPTIONS...) are "
        "refused.",
    )
    url: str | None = Field(
        default=None, description="For http and sse, required: the server's http:// or https:// URL."
    )
    headers: list[EnvVar] | None = Field(
        default=None,
        description="For http and sse: HTTP headers sent with every request (an Authorization header from "
        "a Secret, say).",
    )
    resources: ResourceRequirements | None = Field(
        default=None,
        description="Kept from the original API and not used: a stdio server runs inside the worker "
        "processes, under their own resources.",
    )
    approval_contact_channel: LocalObjectReference | None = Field(
        default=None,
        description="A ContactChannel through which a person approves or rejects every call of this "
        "server's tools (via HumanLayer) before it runs; kubectl can decide too (the "
        "kubechain.humanlayer.dev/approval annotation). The server is Pending until the channel is Ready.",
    )
    idempotent: bool | None = Field(
        default=None,
        description="true: a call of its tools whose worker was lost mid-execution is run again (once). "
        "Default false: such a call fails, and the LLM is told so.",
    )


class MCPTool(KubeModel):
    name: str = Field(description="The tool's name on the server; offered to the LLM as <server>__<name>.")
    description: str | None = Field(
        default=None, description="The tool's description, as the server gives it to the LLM."
    )
    input_schema: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra=PRESERVE_UNKNOWN,
        description="The JSON schema of the tool's arguments, passed to the LLM whole.",
    )


class MCPServerStatus(KubeModel):
    connected: bool | None = Field(
        default=None,
        description="True when the last validation connected and listed the server's tools; Agents use "
        "only connected servers.",
    )
    status: StatusValue | None = Field(
        default=None,
        description="Ready (connected), Pending (waiting for its approval ContactChannel to be Ready) or "
        "Error (statusDetail says why).",
    )
    status_detail: str | None = Field(
        default=None, description="What the last validation found, in words: why it is not connected."
    )
    tools: list[MCPTool] | None = Field(
        default=None, description="The tools the server lists, as the LLM is offered them."
    )
    observed_generation: int | None = Field(
        default=None,
        description="The metadata.generation the status describes; behind it, the spec was edited since "
        "and is being validated again.",
    )
    unusable_secret: str | None = Field(default=None, description=UNUSABLE_SECRET_DESCRIPTION)


class MCPServer(Resource[MCPServerSpec, MCPServerStatus]):
    KIND: ClassVar[str] = "MCPServer"
    PLURAL: ClassVar[str] = "mcpservers"
    status: MCPServerStatus = Field(default_factory=MCPServerStatus)
