"""Tool: a builtin function, an external HTTP API, or a delegation to another Agent."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from kubechain.models.base import PRESERVE_UNKNOWN, KubeModel, Resource
from kubechain.models.common import LocalObjectReference, ReadyStatus, SecretKeyRef


class BuiltinToolSpec(KubeModel):
    name: Literal["add", "subtract", "multiply", "divide"] | None = None


class ExternalAPISpec(KubeModel):
    url: str | None = None
    method: str | None = None
    requires_approval: bool | None = None
    credentials_from: SecretKeyRef | None = None
    timeout_seconds: int | None = Field(default=None, ge=1)


class ToolExecute(KubeModel):
    builtin: BuiltinToolSpec | None = None
    external_api: ExternalAPISpec | None = Field(default=None, alias="externalAPI")


class ToolSpec(KubeModel):
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, json_schema_extra=PRESERVE_UNKNOWN)
    arguments: dict[str, Any] | None = Field(default=None, json_schema_extra=PRESERVE_UNKNOWN)
    tool_type: Literal["function", "delegateToAgent", "externalAPI"] | None = None
    execute: ToolExecute | None = None
    agent_ref: LocalObjectReference | None = None
    idempotent: bool | None = None

    def function_name(self, metadata_name: str) -> str:
        return self.name or metadata_name


class ToolStatus(ReadyStatus):
    pass


class Tool(Resource[ToolSpec, ToolStatus]):
    KIND: ClassVar[str] = "Tool"
    PLURAL: ClassVar[str] = "tools"
    spec: ToolSpec = Field(default_factory=ToolSpec)
    status: ToolStatus = Field(default_factory=ToolStatus)
