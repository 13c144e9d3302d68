"""TaskRun: one conversation of an Agent, driven to a final answer by the workers."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import Field

from kubechain.models.base import KubeModel, Resource
from kubechain.models.common import LocalObjectReference, Message, SpanContext, StatusValue
from kubechain.models.labels import root_run_of


class TaskRunPhase(StrEnum):
    INITIALIZING = "Initializing"
    PENDING = "Pending"
    READY_FOR_LLM = "ReadyForLLM"
    SEND_CONTEXT_WINDOW_TO_LLM = "SendContextWindowToLLM"
    TOOL_CALLS_PENDING = "ToolCallsPending"
    CHECKING_TOOL_CALLS = "CheckingToolCalls"
    FINAL_ANSWER = "FinalAnswer"
    ERROR_BACKOFF = "ErrorBackoff"
    FAILED = "Failed"


TERMINAL_TASKRUN_PHASES = frozenset({TaskRunPhase.FINAL_ANSWER, TaskRunPhase.FAILED})
# Waiting for a turn's tool calls. KubeChain writes only ToolCallsPending; CheckingToolCalls is in the
# original's phase enum (which never wrote it either), so a run found in it is treated the same.
FAN_IN_TASKRUN_PHASES = frozenset({TaskRunPhase.TOOL_CALLS_PENDING, TaskRunPhase.CHECKING_TOOL_CALLS})

TaskRunPhaseValue = Literal[
    "Initializing",
    "Pending",
    "ReadyForLLM",
    "SendContextWindowToLLM",
    "ToolCallsPending",
    "CheckingToolCalls",
    "FinalAnswer",
    "ErrorBackoff",
    "Failed",
]


class TaskRunSpec(KubeModel):
    task_ref: LocalObjectReference | None = None
    task_run_tool_call_ref: LocalObjectReference | None = None
    agent_ref: LocalObjectReference | None = None
    user_message: str | None = None


class TokenUsage(KubeModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TaskRunStatus(KubeModel):
    phase: TaskRunPhaseValue | None = None
    ready: bool | None = None
    status: StatusValue | None = None
    status_detail: str | None = None
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    output: str | None = None
    context_window: list[Message] | None = None
    message_count: int | None = None
    user_msg_preview: str | None = None
    error: str | None = None
    span_context: SpanContext | None = None
    tool_call_request_id: str | None = None
    # Our additions: who holds the current LLM step and since when (a claim older than the LLM timeout
    # may be re-taken), the attempt counter for retries, and token usage.
    claimed_by: str | None = None
    claimed_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    llm_attempts: int | None = None
    # How often this turn's claim was re-taken from a worker that died mid-call (errors do not count).
    llm_interruptions: int | None = None
    next_attempt_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    turns: int | None = None
    token_usage: TokenUsage | None = None
    # When the current batch of tool calls was requested: children still missing after a grace period
    # (their creator died) are created by the fan-in check.
    tool_calls_pending_since: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    # The toolCallRequestId whose tool calls were all created: one of them missing after that was
    # deleted (cancelled), not lost by a creator that died, and is not created again.
    tool_calls_created_for: str | None = None


class TaskRun(Resource[TaskRunSpec, TaskRunStatus]):
    KIND: ClassVar[str] = "TaskRun"
    PLURAL: ClassVar[str] = "taskruns"
    # Required by the CRD (its CEL rule needs a spec); the default only reads a TaskRun stored before that.
    spec: TaskRunSpec = Field(default_factory=TaskRunSpec)
    status: TaskRunStatus = Field(default_factory=TaskRunStatus)

    @property
    def phase(self) -> str:
        return self.status.phase or ""

    def is_terminal(self) -> bool:
        return self.phase in TERMINAL_TASKRUN_PHASES

    @property
    def root_run_uid(self) -> str:
        return root_run_of(self.metadata.labels, self.uid)
