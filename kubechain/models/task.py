"""Task: an Agent and a message; validating it creates TaskRun ``<task>-1``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from kubechain.models.base import KubeModel, Resource
from kubechain.models.common import LocalObjectReference, ReadyStatus


class TaskSpec(KubeModel):
    agent_ref: LocalObjectReference = Field(
        description="The Agent that runs the task. Once it is Ready, the Task creates its run, <task>-1."
    )
    message: str = Field(
        min_length=1, description="The user message the run starts from, after the Agent's system prompt."
    )
    goal: str | None = Field(default=None, description="Kept from the original API and not used.")
    everything_that_happened_so_far: list[str] | None = Field(
        default=None, description="Kept from the original API and not used."
    )


class TaskStatus(ReadyStatus):
    output: str | None = Field(
        default=None, description="The final answer of the Task's run, once it has one (phase FinalAnswer)."
    )
    # The run this Task created, written once it exists. A run deleted after that is not created again
    # (the original's one run per Task; a run's side effects are not repeated behind the user's back): to
    # run it again, create the Task again. A Ready Task without it lost its run to a crash, and gets it.
    task_run_name: str | None = Field(
        default=None,
        description="The TaskRun this Task created. It is created once: a run deleted is not created again "
        "(create the Task again to rerun it).",
    )


class Task(Resource[TaskSpec, TaskStatus]):
    KIND: ClassVar[str] = "Task"
    PLURAL: ClassVar[str] = "tasks"
    status: TaskStatus = Field(default_factory=TaskStatus)
