"""Sub-types shared by several kinds (references, messages, the status triple)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from kubechain.models.base import SCHEMA_REQUIRED, KubeModel


class ResourceStatus(StrEnum):
    READY = "Ready"
    ERROR = "Error"
    PENDING = "Pending"


StatusValue = Literal["Ready", "Error", "Pending"]


class LocalObjectReference(KubeModel):
    name: str = Field(min_length=1)


class SecretKeyRef(KubeModel):
    name: str
    key: str


class APIKeySource(KubeModel):
    secret_key_ref: SecretKeyRef


class SpanContext(KubeModel):
    trace_id: str | None = Field(default=None, alias="traceID")
    span_id: str | None = Field(default=None, alias="spanID")


class ToolCallFunction(KubeModel):
    name: str
    arguments: str = Field(default="", json_schema_extra=SCHEMA_REQUIRED)


class ToolCall(KubeModel):
    """A tool call requested by the LLM, as stored in the context window."""

    id: str
    function: ToolCallFunction
    type: str = Field(default="function", json_schema_extra=SCHEMA_REQUIRED)


class Message(KubeModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(default="", json_schema_extra=SCHEMA_REQUIRED)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    # Ours: a tool message whose call failed (or was deleted unfinished) says so, for providers that take
    # it apart from the text (Anthropic's tool_result is_error). Unset otherwise; OpenAI has no such field.
    is_error: bool | None = None


class ReadyStatus(KubeModel):
    """The status triple most kinds carry, plus the generation it describes."""

    ready: bool | None = None
    status: StatusValue | None = None
    status_detail: str | None = None
    observed_generation: int | None = None
