"""Task: an Agent and a message; validating it creates TaskRun ``<task>-1``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from kubechain.models.base import KubeModel, Resource
from kubechain.models.common import LocalObjectReference, ReadyStatus


class TaskSpec(KubeModel):
    agent_ref: LocalObjectReference
    message: str = Field(min_length=1)
    goal: str | None = None
    everything_that_happened_so_far: list[str] | None = None


class TaskStatus(ReadyStatus):
    output: str | None = None


class Task(Resource[TaskSpec, TaskStatus]):
    KIND: ClassVar[str] = "Task"
    PLURAL: ClassVar[str] = "tasks"
    status: TaskStatus = Field(default_factory=TaskStatus)
