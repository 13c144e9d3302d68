"""The registry of KubeChain kinds: model class, names and printer columns (as the original's CRDs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubechain.models.agent import Agent
from kubechain.models.base import Resource
from kubechain.models.contactchannel import ContactChannel
from kubechain.models.llm import LLM
from kubechain.models.mcpserver import MCPServer
from kubechain.models.task import Task
from kubechain.models.taskrun import TaskRun
from kubechain.models.tool import Tool
from kubechain.models.toolcall import TaskRunToolCall


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    priority: int = 0

    def to_crd(self) -> dict[str, Any]:
        column: dict[str, Any] = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.priority:
            column["priority"] = self.priority
        return column


READY = PrinterColumn("Ready", ".status.ready", "boolean")
STATUS = PrinterColumn("Status", ".status.status")
DETAIL = PrinterColumn("Detail", ".status.statusDetail", priority=1)


@dataclass(frozen=True)
class KindInfo:
    model: type[Resource[Any, Any]]
    columns: tuple[PrinterColumn, ...]
    # CEL rules on spec (x-kubernetes-validations), each (rule, message).
    spec_rules: tuple[tuple[str, str], ...] = field(default=())

    @property
    def kind(self) -> str:
        return self.model.KIND

    @property
    def plural(self) -> str:
        return self.model.PLURAL

    @property
    def singular(self) -> str:
        return self.model.KIND.lower()


def _unchanged(field: str, why: str) -> tuple[str, str]:
    """A CEL transition rule on spec: ``field`` is neither changed, added nor removed after creation."""
    rule = f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})"
    return rule, f"spec.{field} is immutable: {why}"


KINDS: tuple[KindInfo, ...] = (
    KindInfo(LLM, (PrinterColumn("Provider", ".spec.provider"), READY, STATUS, DETAIL)),
    KindInfo(Tool, (READY, STATUS, DETAIL)),
    KindInfo(Agent, (READY, STATUS, DETAIL)),
    KindInfo(
        Task,
        (
            READY,
            STATUS,
            DETAIL,
            PrinterColumn("Agent", ".spec.agentRef.name"),
            PrinterColumn("Message", ".spec.message"),
            PrinterColumn("Output", ".status.output", priority=1),
        ),
    ),
    KindInfo(
        TaskRun,
        (
            READY,
            STATUS,
            DETAIL,
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Task", ".spec.taskRef.name"),
            # ours, in -o wide only: a run made from agentRef + userMessage has no Task (the seed PR's
            # README shows the column there)
            PrinterColumn("Agent", ".spec.agentRef.name", priority=1),
            PrinterColumn("Preview", ".status.userMsgPreview"),
            PrinterColumn("Output", ".status.output"),
            PrinterColumn("Error", ".status.error", priority=1),
            PrinterColumn("Started", ".status.startTime", "date", 1),
            PrinterColumn("Completed", ".status.completionTime", "date", 1),
        ),
        spec_rules=(
            (
                "has(self.taskRef) || (has(self.agentRef) && has(self.userMessage) && size(self.userMessage) > 0)",
                "set spec.taskRef, or spec.agentRef together with a non-empty spec.userMessage",
            ),
            # What a run runs: each turn reads its Agent again (from agentRef, else its Task's), so one
            # edited mid-way took later turns with another Agent on the same context window.
            _unchanged("agentRef", "a TaskRun keeps the Agent it started with: create another TaskRun"),
            _unchanged("taskRef", "a TaskRun keeps the Task it started from: create another TaskRun"),
            _unchanged(
                "userMessage", "a TaskRun's message is in its context window already: create another TaskRun"
            ),
        ),
    ),
    KindInfo(
        TaskRunToolCall,
        (
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("TaskRun", ".spec.taskRunRef.name"),
            PrinterColumn("Tool", ".spec.toolRef.name"),
            PrinterColumn("Started", ".status.startTime", "date", 1),
            PrinterColumn("Completed", ".status.completionTime", "date", 1),
            PrinterColumn("Error", ".status.error", priority=1),
        ),
        spec_rules=(
            (
                "self == oldSelf",
                "spec is immutable: a tool call records what the LLM asked for (approve or reject it with "
                "the kubechain.humanlayer.dev/approval annotation)",
            ),
        ),
    ),
    KindInfo(
        MCPServer,
        (PrinterColumn("Connected", ".status.connected", "boolean"), STATUS, DETAIL),
        spec_rules=(
            ("self.transport != 'stdio' || has(self.command)", "command is required for stdio transport"),
            ("self.transport == 'stdio' || has(self.url)", "url is required for http and sse transports"),
        ),
    ),
    KindInfo(ContactChannel, (PrinterColumn("Type", ".spec.type"), READY, STATUS, DETAIL)),
)

KINDS_BY_NAME: dict[str, KindInfo] = {info.kind: info for info in KINDS}
KINDS_BY_PLURAL: dict[str, KindInfo] = {info.plural: info for info in KINDS}
