"""The contract between watcher and workers: task names, queues, the payload, the Celery app factory.

A message is only a hint: it names an object; the task re-reads it and decides from its current status.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from celery import Celery, signals
from kombu import Queue
from pydantic import BaseModel, Field

from kubechain.redis_transport import transport_for
from kubechain.settings import BROKER_MAX_CONNECTIONS, Settings

if TYPE_CHECKING:
    from kubechain.models import Resource


class TaskName(StrEnum):
    VALIDATE = "kubechain.validate"
    PREPARE = "kubechain.prepare"
    LLM_CALL = "kubechain.llm_call"
    TOOL_CALL = "kubechain.tool_call"


class QueueName(StrEnum):
    CONTROL = "control"  # validation and bookkeeping: fast, never behind slow LLM calls or outside checks
    # validations that call out (an MCP server's tool list, an LLM provider's model list, HumanLayer): an
    # endpoint that hangs holds a thread here until its timeout, never one that prepares runs
    CHECKS = "checks"
    LLM = "llm"
    TOOLS = "tools"


TASK_QUEUES: dict[TaskName, QueueName] = {
    TaskName.VALIDATE: QueueName.CONTROL,
    TaskName.PREPARE: QueueName.CONTROL,
    TaskName.LLM_CALL: QueueName.LLM,
    TaskName.TOOL_CALL: QueueName.TOOLS,
}

# The kinds whose validation talks to the outside world (workers.validators): their validate goes to the
# checks queue. The others read only the API server.
EXTERNAL_CHECK_KINDS = frozenset({"LLM", "MCPServer", "ContactChannel"})


def queue_for(task: TaskName, kind: str) -> QueueName:
    """The queue a message of ``task`` about an object of ``kind`` goes to."""
    if task is TaskName.VALIDATE and kind in EXTERNAL_CHECK_KINDS:
        return QueueName.CHECKS
    return TASK_QUEUES[task]


# The time a message was published, stamped on every publish (a retry too: Celery re-sends the first payload,
# and its old headers, which this overwrites). Workers measure queue wait from it.
SENT_AT_HEADER = "kubechain_sent_at"


@signals.before_task_publish.connect
def _stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers[SENT_AT_HEADER] = time.time()


class AgentSeen(BaseModel):
    """The Agent a TaskRun's work is built from (its turns, its tool calls' grants), as the watcher last
    saw it. A worker's copy of that Agent behind it (read before the edit or the validation the watcher has
    seen) is read again: never used as content, so a forged one costs a read and nothing else."""

    name: str
    uid: str = ""
    generation: int = 0
    observed_generation: int = 0  # its status.observedGeneration: the generation its validation was about

    def outdates(self, agent: Resource[Any, Any]) -> bool:
        """Whether ``agent`` (a copy a worker holds) is behind what the watcher saw of it: an older
        generation, or one whose validation the watcher has seen and the copy has not, or another Agent
        by that name (deleted and made again). A copy newer than the watcher's (its informer is behind)
        is not."""
        if agent.name != self.name:
            return False
        observed = getattr(agent.status, "observed_generation", None) or 0
        return (
            bool(self.uid and agent.uid and self.uid != agent.uid)
            or self.generation > (agent.metadata.generation or 0)
            or self.observed_generation > observed
        )


class ResourceMessage(BaseModel):
    """The payload of every task: which object to look at (and, for tracing, when and why). Only a hint:
    the worker reads the object from the API server and decides from that, so a forged or stale message
    can prompt work but never choose what is done."""

    kind: str
    namespace: str
    name: str
    uid: str = ""
    # the version of the named object that prompted this message ("" when another object's change did)
    resource_version: str = ""
    reason: str = "event"
    enqueued_at: float = Field(default_factory=time.time)
    traceparent: str | None = None
    # a re-check's: the traceparent of the task that scheduled it, linked to (its parent is that task's)
    linked: str | None = None
    # work on a TaskRun or its tool call: the run's Agent as the watcher saw it (None: not known, or a
    # worker's own follow-up, which reads the Agent as it would without)
    agent_seen: AgentSeen | None = None

    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"

    @classmethod
    def recheck(
        cls, resource: Resource[Any, Any], reason: str, traceparent: str | None, linked: str | None = None
    ) -> ResourceMessage:
        """A worker's own follow-up on an object it just read (a re-check when something falls due)."""
        return cls(
            kind=resource.KIND,
            namespace=resource.namespace,
            name=resource.name,
            uid=resource.uid,
            resource_version=resource.resource_version,
            reason=reason,
            traceparent=traceparent,
            linked=linked,
        )


def make_celery(settings: Settings, name: str = "kubechain") -> Celery:
    """The Celery app (producer and consumer share it). Settings follow the at-least-once playbook:
    acks_late + reject on worker loss (the state machines make redelivery harmless), prefetch 1 (KEDA only
    sees ready messages, and a busy worker must not hoard), a visibility timeout well above the longest
    LLM call. A pod's SIGTERM is Celery's warm shutdown (tasks in flight finish within the grace period);
    the soft-shutdown settings apply only to SIGQUIT (or REMAP_SIGTERM=SIGQUIT)."""
    app = Celery(name, broker=settings.redis_url)
    # Above the longest a task runs (an LLM call, a tool up to its execution cap, a write retried until
    # its claim expires) and the longest countdown (an LLM back-off): Redis redelivers an unacked
    # message, a running task's or one waiting out its countdown, after this long.
    visibility = max(
        3600.0,
        settings.llm_timeout_s * 4,
        settings.tool_timeout_s * 4,
        settings.claim_timeout_s * 4,
        settings.llm_backoff_max_s * 4,
    )
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={
            "visibility_timeout": visibility,
            # Without a timeout a synchronous command (a publish, an ack) on a half-open connection waits
            # until TCP gives up: the watcher's single sender thread would stall for many minutes while
            # its replica still holds the leader Lease. Failing fast puts it in the sender's back-off.
            "socket_timeout": settings.redis_socket_timeout_s,
            "socket_connect_timeout": settings.redis_socket_timeout_s,
            "socket_keepalive": True,
            # kombu's default is 10 per channel, and its pool refuses (MaxConnectionsError) rather than
            # waits: with acks_late each task thread acks on its own, and when Redis stalls for a moment
            # the acks of dozens of threads at once failed, each leaving its message unacked and a
            # prefetch slot taken. Connections are made only as needed.
            "max_connections": BROKER_MAX_CONNECTIONS,
        },
        # Each publish is tried once: Celery's default policy tried again 3 times, each waiting out the
        # socket timeout on a Redis that stopped answering (~50 s for one publish, the watcher's sender
        # not checking meanwhile whether it still leads). Every caller backs off or leaves it to the
        # resync; a connection Redis closed (a restart) is made again by the publish itself. (Not
        # task_publish_retry=False: without kombu's ensure(), making the channel is retried instead.)
        task_publish_retry_policy={"max_retries": 0},
        broker_transport=transport_for(settings.redis_url),
        broker_connection_retry_on_startup=True,
        worker_soft_shutdown_timeout=10.0,
        worker_enable_soft_shutdown_on_idle=True,
        # False: a task in flight when Redis goes away finishes its LLM or tool call and writes its outcome
        # (the API server is not Redis). kombu puts its message back on the queue as the connection
        # closes, so another worker may take it meanwhile: it finds the step claimed (and later done).
        # Cancelling is not possible in the thread pool anyway (Celery logged a traceback per task).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_default_queue=QueueName.CONTROL.value,
        task_queues=[Queue(queue.value) for queue in QueueName],
        task_routes={task.value: {"queue": queue.value} for task, queue in TASK_QUEUES.items()},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def enqueue(app: Celery, task: TaskName, message: ResourceMessage, countdown_s: float = 0.0) -> None:
    app.send_task(
        task.value,
        args=[message.model_dump()],
        queue=queue_for(task, message.kind).value,
        countdown=countdown_s if countdown_s > 0 else None,
        # Celery would saferepr() the whole payload for its logs; the key says more.
        argsrepr=f"[{message.key()} ({message.reason})]",
        kwargsrepr="{}",
    )
