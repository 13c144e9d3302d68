"""Pydantic models for every KubeChain resource (group kubechain.humanlayer.dev/v1alpha1). No I/O here."""

from kubechain.models.agent import Agent, AgentSpec, AgentStatus
from kubechain.models.base import API_VERSION, GROUP, VERSION, KubeModel, ObjectMeta, OwnerReference, Resource
from kubechain.models.common import (
    APIKeySource,
    LocalObjectReference,
    Message,
    SecretKeyRef,
    SpanContext,
    ToolCall,
    ToolCallFunction,
)
from kubechain.models.contactchannel import ContactChannel, ContactChannelSpec, ContactChannelStatus
from kubechain.models.kinds import KINDS, KINDS_BY_NAME, KINDS_BY_PLURAL, KindInfo
from kubechain.models.labels import (
    LABEL_TASK,
    LABEL_TASKRUNTOOLCALL,
    LABEL_TOOLCALLREQUEST,
    label_value,
)
from kubechain.models.llm import LLM, LLMParameters, LLMSpec, LLMStatus
from kubechain.models.mcpserver import MCPServer, MCPServerSpec, MCPServerStatus, MCPTool
from kubechain.models.task import Task, TaskSpec, TaskStatus
from kubechain.models.taskrun import (
    TERMINAL_TASKRUN_PHASES,
    TaskRun,
    TaskRunPhase,
    TaskRunSpec,
    TaskRunStatus,
)
from kubechain.models.tool import Tool, ToolSpec, ToolStatus
from kubechain.models.toolcall import (
    TERMINAL_TOOLCALL_PHASES,
    TaskRunToolCall,
    TaskRunToolCallSpec,
    TaskRunToolCallStatus,
    ToolCallPhase,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "KINDS_BY_NAME",
    "KINDS_BY_PLURAL",
    "LABEL_TASK",
    "LABEL_TASKRUNTOOLCALL",
    "LABEL_TOOLCALLREQUEST",
    "LLM",
    "TERMINAL_TASKRUN_PHASES",
    "TERMINAL_TOOLCALL_PHASES",
    "VERSION",
    "APIKeySource",
    "Agent",
    "AgentSpec",
    "AgentStatus",
    "ContactChannel",
    "ContactChannelSpec",
    "ContactChannelStatus",
    "KindInfo",
    "KubeModel",
    "LLMParameters",
    "LLMSpec",
    "LLMStatus",
    "LocalObjectReference",
    "MCPServer",
    "MCPServerSpec",
    "MCPServerStatus",
    "MCPTool",
    "Message",
    "ObjectMeta",
    "OwnerReference",
    "Resource",
    "SecretKeyRef",
    "SpanContext",
    "Task",
    "TaskRun",
    "TaskRunPhase",
    "TaskRunSpec",
    "TaskRunStatus",
    "TaskRunToolCall",
    "TaskRunToolCallSpec",
    "TaskRunToolCallStatus",
    "TaskSpec",
    "TaskStatus",
    "Tool",
    "ToolCall",
    "ToolCallFunction",
    "ToolCallPhase",
    "ToolSpec",
    "ToolStatus",
    "label_value",
]
