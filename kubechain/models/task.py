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
    # The run this Task created, written once it exists. A run deleted after that is not created again
    # (the original's one run per Task; a run's side effects are not repeated behind the user's back): to
    # run it again, create the Task again. A Ready Task without it lost its run to a crash, and gets it.
    task_run_name: str | None = None


class Task(Resource[TaskSpec, TaskStatus]):
    KIND: ClassVar[str] = "Task"
    PLURAL: ClassVar[str] = "tasks"
    status: TaskStatus = Field(default_factory=TaskStatus)
