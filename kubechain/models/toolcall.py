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
    tool_call_id: str = Field(
        description="The LLM's id for this call, which the tool message with its result names."
    )
    task_run_ref: LocalObjectReference = Field(description="The TaskRun whose LLM asked for this call.")
    tool_ref: LocalObjectReference = Field(
        description="The function the LLM called: a Tool's function name, <server>__<tool> of an MCPServer, "
        "delegate_to_agent__<agent> or <channel>__human_contact_<type>."
    )
    arguments: str = Field(
        description="The call's arguments as the LLM wrote them: JSON text of an object (anything else "
        'fails the call as "Invalid arguments JSON").'
    )


class TaskRunToolCallStatus(KubeModel):
    phase: ToolCallPhaseValue | None = Field(
        default=None,
        description="Where the call is: Pending, Running (a worker executes it), AwaitingHumanApproval, "
        "ReadyToExecuteApprovedTool, ErrorRequestingHumanApproval (the approval request failed; it is "
        "sent again), AwaitingSubAgent, AwaitingHumanInput, and at the end Succeeded, Failed or "
        "ToolCallRejected.",
    )
    ready: bool | None = Field(
        default=None, description="Kept from the original API; KubeChain does not set it."
    )
    status: Literal["Ready", "Error", "Pending", "Succeeded"] | None = Field(
        default=None,
        description="Pending, Ready (under way), Succeeded (ended with a result, or rejected) or Error (failed, "
        "or a request to HumanLayer failed).",
    )
    status_detail: str | None = Field(
        default=None, description="What the call is doing or waiting for, in words."
    )
    external_call_id: str | None = Field(
        default=None,
        alias="externalCallID",
        description="The HumanLayer call id of the approval request or human contact this call waits for.",
    )
    result: str | None = Field(
        default=None,
        description="The call's outcome, as the LLM is told it: the tool's output, the sub-agent's final "
        "answer or the person's reply (cut to KUBECHAIN_MAX_TOOL_RESULT_BYTES), or a rejection's comment.",
    )
    error: str | None = Field(default=None, description="Why the call failed; the LLM is told it too.")
    start_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the call was first taken up (executed, or its approval or answer asked for).",
    )
    completion_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the call ended (Succeeded, Failed or ToolCallRejected).",
    )
    span_context: SpanContext | None = Field(
        default=None,
        description="The OpenTelemetry span of the call's execution, in its TaskRun's trace.",
    )
    # Our additions: the claim that makes execution at-most-once across workers.
    claimed_by: str | None = Field(
        default=None,
        description="The worker executing the call (Running), or sending its HumanLayer request; no other "
        "worker does meanwhile.",
    )
    claimed_at: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When claimedBy took the call (or, while it waits for a person, when HumanLayer was last "
        "asked). A claim older than KUBECHAIN_CLAIM_TIMEOUT_S was lost with its worker.",
    )
    attempts: int | None = Field(
        default=None,
        description="Executions of the call (an idempotent tool is run again, once, after a lost worker); "
        "while it waits for a person, the HumanLayer requests or checks made so far.",
    )


class TaskRunToolCall(Resource[TaskRunToolCallSpec, TaskRunToolCallStatus]):
    KIND: ClassVar[str] = "TaskRunToolCall"
    PLURAL: ClassVar[str] = "taskruntoolcalls"
    status: TaskRunToolCallStatus = Field(default_factory=TaskRunToolCallStatus)

    @property
    def phase(self) -> str:
        return self.status.phase or ""

    def is_terminal(self) -> bool:
        return self.phase in TERMINAL_TOOLCALL_PHASES
