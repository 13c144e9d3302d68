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
    task_ref: LocalObjectReference | None = Field(
        default=None,
        description="The Task whose Agent and message the run uses (agentRef and userMessage, when set, "
        "win). Set this, or agentRef with userMessage. Cannot be changed once set.",
    )
    task_run_tool_call_ref: LocalObjectReference | None = Field(
        default=None,
        description="Set by KubeChain on a sub-agent's run: the TaskRunToolCall that delegated to it, whose "
        "result the run's final answer becomes.",
    )
    agent_ref: LocalObjectReference | None = Field(
        default=None,
        description="The Agent to run; with userMessage, a run without a Task. Cannot be changed once set.",
    )
    user_message: str | None = Field(
        default=None,
        description="The user message the run starts from, after the Agent's system prompt. Cannot be "
        "changed once set.",
    )


class TokenUsage(KubeModel):
    prompt_tokens: int = Field(default=0, description="Tokens of the requests (the context windows sent).")
    completion_tokens: int = Field(default=0, description="Tokens of the LLM's answers.")
    total_tokens: int = Field(default=0, description="All tokens, as the provider counts them.")


class TaskRunStatus(KubeModel):
    phase: TaskRunPhaseValue | None = Field(
        default=None,
        description="Where the run is: Pending (waiting for its Task or Agent to be Ready), ReadyForLLM (a "
        "turn waits for a worker; with status Pending, for its Agent's edit to be validated), "
        "SendContextWindowToLLM (a worker is calling the LLM), ToolCallsPending "
        "(waiting for this turn's TaskRunToolCalls), ErrorBackoff (an LLM error, retried at nextAttemptAt), "
        "FinalAnswer (done: see output) or Failed (see error). Initializing and CheckingToolCalls are the "
        "original's: KubeChain does not write them (a run found in one is handled as Pending or "
        "ToolCallsPending).",
    )
    ready: bool | None = Field(
        default=None,
        description="True once the run has its context window and its last step went well (FinalAnswer "
        "included); false while it waits for its Task or Agent, after an LLM error, and once it failed.",
    )
    status: StatusValue | None = Field(
        default=None,
        description="Ready, Pending (waiting for its Task or Agent) or Error (an LLM error being retried, "
        "or the run failed).",
    )
    status_detail: str | None = Field(
        default=None, description="What the run is doing or waiting for, in words."
    )
    start_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the run's context window was first made (its Task and Agent were Ready).",
    )
    completion_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the run reached FinalAnswer or Failed.",
    )
    output: str | None = Field(default=None, description="The LLM's final answer (phase FinalAnswer).")
    context_window: list[Message] | None = Field(
        default=None,
        description="The conversation so far, sent whole to the LLM at each turn: the Agent's system "
        "prompt, the user message, then the LLM's answers and the tool results.",
    )
    message_count: int | None = Field(default=None, description="The number of messages in contextWindow.")
    user_msg_preview: str | None = Field(
        default=None, description="The user message, cut to 50 characters (47 and ...) when longer."
    )
    error: str | None = Field(
        default=None,
        description="Why the run failed, or the LLM error being retried (ErrorBackoff); cleared on success "
        "and while the run waits for its Task or Agent.",
    )
    span_context: SpanContext | None = Field(
        default=None,
        description="The OpenTelemetry trace and root span of the run; the trace id is made from the run's "
        "uid.",
    )
    tool_call_request_id: str | None = Field(
        default=None,
        description="The id of the current turn's batch of tool calls: in their names "
        "(<run>-<id>-tc-NN) and their label kubechain.humanlayer.dev/toolcallrequest.",
    )
    # Our additions: who holds the current LLM step and since when (a claim older than the LLM timeout
    # may be re-taken), the attempt counter for retries, and token usage.
    claimed_by: str | None = Field(
        default=None,
        description="The worker calling the LLM for this turn (phase SendContextWindowToLLM); no other "
        "worker calls it meanwhile.",
    )
    claimed_at: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When claimedBy took the turn. A claim older than KUBECHAIN_CLAIM_TIMEOUT_S (180 s) was "
        "lost with its worker, and the turn is taken again (once).",
    )
    llm_attempts: int | None = Field(
        default=None,
        description="LLM calls made for the current turn; after KUBECHAIN_LLM_MAX_ATTEMPTS (14) failed "
        "ones the run fails.",
    )
    # How often this turn's claim was re-taken from a worker that died mid-call (errors do not count).
    llm_interruptions: int | None = Field(
        default=None,
        description="Set when this turn's LLM call was taken over from a worker lost mid-call; a second loss "
        "fails the run.",
    )
    next_attempt_at: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="In ErrorBackoff: when the LLM call is tried again (exponential backoff with jitter, "
        "a provider's Retry-After honoured).",
    )
    turns: int | None = Field(default=None, description="The number of LLM answers the run has recorded.")
    token_usage: TokenUsage | None = Field(
        default=None, description="Tokens used by all of the run's LLM answers, added up."
    )
    # When the current batch of tool calls was requested: children still missing after a grace period
    # (their creator died) are created by the fan-in check.
    tool_calls_pending_since: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the current turn's tool calls were asked for.",
    )
    # The toolCallRequestId whose tool calls were all created: one of them missing after that was
    # deleted (cancelled), not lost by a creator that died, and is not created again.
    tool_calls_created_for: str | None = Field(
        default=None,
        description="The toolCallRequestId whose TaskRunToolCalls all exist: one deleted after that is "
        "cancelled, not created again, and the run goes on without it.",
    )
    agent_name: str | None = Field(
        default=None,
        description="The Agent the run started with (its first context window was built from it): every "
        "later turn and every tool call's grant check uses it, so editing the Task's agentRef does not "
        "switch a run in flight to another Agent. Absent on a run started before it was recorded.",
    )


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
    def own_agent_name(self) -> str | None:
        """The Agent the run itself names: the one it started with (status.agentName), else its
        spec.agentRef's; None when only its Task names one (a run not started yet, or started before
        runs recorded it)."""
        if self.status.agent_name:
            return self.status.agent_name
        return self.spec.agent_ref.name if self.spec.agent_ref else None

    @property
    def root_run_uid(self) -> str:
        return root_run_of(self.metadata.labels, self.uid)
