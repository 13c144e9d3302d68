"""TaskRunToolCall: one tool call requested by the LLM, executed by a worker."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import Field

from kubechain.models.base import KubeModel, Resource
from kubechain.models.common import LocalObjectReference, SpanContext


class ToolCallPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    AWAITING_HUMAN_INPUT = "AwaitingHumanInput"
    AWAITING_SUB_AGENT = "AwaitingSubAgent"
    AWAITING_HUMAN_APPROVAL = "AwaitingHumanApproval"
    READY_TO_EXECUTE_APPROVED_TOOL = "ReadyToExecuteApprovedTool"
    ERROR_REQUESTING_HUMAN_APPROVAL = "ErrorRequestingHumanApproval"
    TOOL_CALL_REJECTED = "ToolCallRejected"


# A tool call in one of these phases will not change again; its outcome goes back to the LLM.
TERMINAL_TOOLCALL_PHASES = frozenset(
    {ToolCallPhase.SUCCEEDED, ToolCallPhase.FAILED, ToolCallPhase.TOOL_CALL_REJECTED}
)

ToolCallPhaseValue = Literal[
    "Pending",
    "Running",
    "Succeeded",
    "Failed",
    "AwaitingHumanInput",
    "AwaitingSubAgent",
    "AwaitingHumanApproval",
    "ReadyToExecuteApprovedTool",
    "ErrorRequestingHumanApproval",
    "ToolCallRejected",
]


class TaskRunToolCallSpec(KubeModel):
    tool_call_id: str
    task_run_ref: LocalObjectReference
    tool_ref: LocalObjectReference
    arguments: str


class TaskRunToolCallStatus(KubeModel):
    phase: ToolCallPhaseValue | None = None
    ready: bool | None = None
    status: Literal["Ready", "Error", "Pending", "Succeeded"] | None = None
    status_detail: str | None = None
    external_call_id: str | None = Field(default=None, alias="externalCallID")
    result: str | None = None
    error: str | None = None
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    span_context: SpanContext | None = None
    # Our additions: the claim that makes execution at-most-once across workers.
    claimed_by: str | None = None
    claimed_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    attempts: int | None = None


class TaskRunToolCall(Resource[TaskRunToolCallSpec, TaskRunToolCallStatus]):
    KIND: ClassVar[str] = "TaskRunToolCall"
    PLURAL: ClassVar[str] = "taskruntoolcalls"
    status: TaskRunToolCallStatus = Field(default_factory=TaskRunToolCallStatus)

    @property
    def phase(self) -> str:
        return self.status.phase or ""

    def is_terminal(self) -> bool:
        return self.phase in TERMINAL_TOOLCALL_PHASES
