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
    name: str = Field(min_length=1, description="Name of the referenced object, in this object's namespace.")


class SecretKeyRef(KubeModel):
    name: str = Field(description="Name of the Secret, in this object's namespace.")
    key: str = Field(description="Key in the Secret's data whose value is used.")


class APIKeySource(KubeModel):
    secret_key_ref: SecretKeyRef = Field(description="The Secret and key that hold the API key.")


class SpanContext(KubeModel):
    trace_id: str | None = Field(
        default=None, alias="traceID", description="OpenTelemetry trace id, 32 hex characters."
    )
    span_id: str | None = Field(
        default=None, alias="spanID", description="OpenTelemetry span id, 16 hex characters."
    )


class ToolCallFunction(KubeModel):
    name: str = Field(description="Name of the function the LLM called, as it was offered to the LLM.")
    arguments: str = Field(
        default="",
        json_schema_extra=SCHEMA_REQUIRED,
        description="The call's arguments as the LLM wrote them: JSON text, normally an object.",
    )


class ToolCall(KubeModel):
    """A tool call requested by the LLM, as stored in the context window."""

    id: str = Field(
        description="The tool call's id, unique in the context window; the tool message with its result "
        "names it in toolCallId."
    )
    function: ToolCallFunction = Field(description="The function called and its arguments.")
    type: str = Field(
        default="function",
        json_schema_extra=SCHEMA_REQUIRED,
        description='The tool call\'s type: always "function".',
    )


class Message(KubeModel):
    role: Literal["system", "user", "assistant", "tool"] = Field(
        description="Who says it: system (the Agent's system prompt), user (the task's message), assistant "
        "(the LLM's answer) or tool (a tool call's result)."
    )
    content: str = Field(
        default="",
        json_schema_extra=SCHEMA_REQUIRED,
        description="The message's text; empty for an assistant message that only calls tools.",
    )
    tool_calls: list[ToolCall] | None = Field(
        default=None, description="Of an assistant message: the tool calls the LLM asked for."
    )
    tool_call_id: str | None = Field(
        default=None, description="Of a tool message: the id of the tool call whose result it is."
    )
    name: str | None = Field(
        default=None,
        description="An optional name for the message's author, passed to OpenAI as is. KubeChain sets none.",
    )
    # Ours: a tool message whose call failed (or was deleted unfinished) says so, for providers that take
    # it apart from the text (Anthropic's tool_result is_error). Unset otherwise; OpenAI has no such field.
    is_error: bool | None = Field(
        default=None,
        description="Of a tool message: true when the tool call failed or was deleted before it finished "
        "(sent to Anthropic as the tool result's is_error). Unset otherwise.",
    )


# status.unusableSecret of the kinds whose validation reads a Secret (LLM, ContactChannel, MCPServer): what
# the watcher goes by to check them again soon (routing.waits_for_a_secret), not the statusDetail's words.
UNUSABLE_SECRET_DESCRIPTION = (
    "The Secret the last validation stopped at: missing, without the key named (or that key empty), not "
    "readable by the workers, or holding a value no HTTP header can carry; statusDetail says which and what "
    "to fix. Secrets are not watched: while this is set, the resource is validated again at least every "
    "30 s, so it turns Ready soon after the Secret is created or fixed. Unset otherwise."
)


class ReadyStatus(KubeModel):
    """The status triple most kinds carry, plus the generation it describes."""

    ready: bool | None = Field(
        default=None, description="True when the last validation found the resource usable."
    )
    status: StatusValue | None = Field(
        default=None,
        description="Ready (usable), Pending (waiting for something that may still come: a dependency "
        "not ready yet, an outage) or Error (needs a fix; statusDetail says what).",
    )
    status_detail: str | None = Field(
        default=None, description="What the last validation found, in words: why it is not Ready."
    )
    observed_generation: int | None = Field(
        default=None,
        description="The metadata.generation the status describes; behind it, the spec was edited since "
        "and is being validated again.",
    )
