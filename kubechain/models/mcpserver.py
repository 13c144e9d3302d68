"""MCPServer: a Model Context Protocol server whose tools agents may call."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from kubechain.models.base import PRESERVE_UNKNOWN, KubeModel, Resource
from kubechain.models.common import LocalObjectReference, SecretKeyRef, StatusValue


class EnvVarSource(KubeModel):
    secret_key_ref: SecretKeyRef | None = None


class EnvVar(KubeModel):
    """A name/value pair whose value may come from a Secret (env vars of stdio servers, HTTP headers)."""

    name: str
    value: str | None = None
    value_from: EnvVarSource | None = None


# resource.Quantity as the Kubernetes API takes it: "100m", "1Gi", or a bare number (cpu: 1).
QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
Quantity = Annotated[
    int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN})
]


class ResourceRequirements(KubeModel):
    limits: dict[str, Quantity] | None = None
    requests: dict[str, Quantity] | None = None


class MCPServerSpec(KubeModel):
    transport: Literal["stdio", "http", "sse"]
    command: str | None = None
    args: list[str] | None = None
    env: list[EnvVar] | None = None
    url: str | None = None
    headers: list[EnvVar] | None = None
    resources: ResourceRequirements | None = None
    approval_contact_channel: LocalObjectReference | None = None
    idempotent: bool | None = None


class MCPTool(KubeModel):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = Field(default=None, json_schema_extra=PRESERVE_UNKNOWN)


class MCPServerStatus(KubeModel):
    connected: bool | None = None
    status: StatusValue | None = None
    status_detail: str | None = None
    tools: list[MCPTool] | None = None
    observed_generation: int | None = None


class MCPServer(Resource[MCPServerSpec, MCPServerStatus]):
    KIND: ClassVar[str] = "MCPServer"
    PLURAL: ClassVar[str] = "mcpservers"
    status: MCPServerStatus = Field(default_factory=MCPServerStatus)
