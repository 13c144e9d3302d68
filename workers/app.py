"""The Celery app and its four tasks. Each task is a thin shell: parse the payload, call the handler."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import Celery, bootsteps, signals
from celery.concurrency import get_implementation
from prometheus_client import REGISTRY, CollectorRegistry

from kubechain.heap import freeze_startup_heap
from kubechain.kube.errors import Unavailable
from kubechain.observability.health import HEARTBEAT_INTERVAL_S, Heartbeat
from kubechain.observability.logs import configure_logging, resource_context
from kubechain.observability.metrics import (
    TASK_QUEUE_SECONDS,
    TASK_SECONDS,
    TASKS,
    MetricsPortUnavailable,
    process_exited,
    registry_for,
    serve,
)
from kubechain.observability.tracing import context_from, flush_tracing, setup_tracing, span
from kubechain.queueing import (
    SENT_AT_HEADER,
    QueueName,
    ResourceMessage,
    TaskName,
    enqueue,
    make_celery,
)
from kubechain.settings import Settings, SettingsInvalid, load_settings, warn_of_unknown_variables
from workers.context import WorkerContext, build_context

log = logging.getLogger(__name__)


def _settings_or_exit() -> Settings:
    """The settings, or the process stops in one line naming what is wrong, as ``kubechain worker`` says
    it: started by ``celery -A workers.app worker`` (without the CLI's checks), it was Celery's "Unable to
    load celery application" and pydantic's traceback. (A SystemExit is no Exception: Celery's loading of
    the app lets it through, with its code.)"""
    try:
        return load_settings()
    except SettingsInvalid as exc:
        print(f"kubechain-worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


settings = _settings_or_exit()
app: Celery = make_celery(settings)

_context: WorkerContext | None = None
_context_lock = threading.Lock()
_metrics_registry: CollectorRegistry = REGISTRY
_prefork_parent = False
_thread_pool_size = 0  # the threads pool's size, for the tool calls this worker starts itself
# The consumer's event loop (which takes messages and acks them) beats this from its own timer: /healthz
# fails when the loop is stuck, while /metrics, served by a thread of its own, would still answer.
consumer_heartbeat = Heartbeat()


class ConsumerHeartbeat(bootsteps.StartStopStep):
    """Beats ``consumer_heartbeat`` from the consumer's timer while it is connected to the broker."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer: Any = None

    def start(self, parent: Any) -> None:
        consumer_heartbeat.beat()
        self._timer = parent.timer.call_repeatedly(HEARTBEAT_INTERVAL_S, consumer_heartbeat.beat)

    def stop(self, parent: Any) -> None:
        # Celery stops the consumer's steps to reconnect after losing the broker: a restart of the
        # process would not bring Redis back, so that wait is no reason to fail the liveness probe.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        consumer_heartbeat.pause("reconnecting to the broker")

    shutdown = stop


app.steps["consumer"].add(ConsumerHeartbeat)


def context() -> WorkerContext:
    """One context per worker process (threads share it; prefork children build their own)."""
    global _context
    with _context_lock:
        if _context is None:
            _context = build_context(
                settings,
                lambda task, message, countdown: enqueue(app, task, message, countdown),
                continues_llm=QueueName.LLM.value in app.amqp.queues.consume_from,
                runs_tools=QueueName.TOOLS.value in app.amqp.queues.consume_from,
                started_call_slots=_thread_pool_size,
            )
        return _context


def set_context(ctx: WorkerContext | None) -> None:
    """For tests: inject a context (fakes) instead of building one from the environment."""
    global _context
    with _context_lock:
        _context = ctx


def queue_wait_s(request: Any, message: ResourceMessage, now: float) -> float:
    """How long a message waited for a worker once it was due: from max(published, eta) to ``now``. A
    countdown or an autoretry's backoff is waiting on purpose. The publish time is the message header (a
    retry carries the first payload's ``enqueued_at``); the payload's time only without one."""
    due = float(getattr(request, SENT_AT_HEADER, None) or message.enqueued_at)
    eta = request.eta
    if eta is not None:
        eta = datetime.fromisoformat(eta) if isinstance(eta, str) else eta
        due = max(due, (eta if eta.tzinfo else eta.replace(tzinfo=UTC)).timestamp())
    return max(0.0, now - due)


def _run(
    task: TaskName,
    handler: Callable[[WorkerContext, ResourceMessage], None],
    payload: dict[str, Any],
    request: Any,
) -> None:
    message = ResourceMessage.model_validate(payload)
    name = task.value.removeprefix("kubechain.")
    TASK_QUEUE_SECONDS.labels(name).observe(queue_wait_s(request, message, time.time()))
    ctx = context()
    served = ctx.settings.namespaces
    if served and message.namespace not in served:
        # The watcher sends nothing about other namespaces: this came from someone else on the broker.
        log.warning(
            "ignoring task %s for %s: namespace not in KUBECHAIN_NAMESPACES", task.value, message.key()
        )
        TASKS.labels(name, "ignored").inc()
        return
    started = time.perf_counter()
    outcome = "ok"
    # (every line here names the message's resource: see _name_the_resource)
    try:
        with span(
            f"{name} {message.kind}",
            context_from(message.traceparent, ""),
            message.linked,
            **{
                "kubechain.namespace": message.namespace,
                "kubechain.name": message.name,
                "kubechain.reason": message.reason,
            },
        ):
            handler(ctx, message)
    except Unavailable as exc:
        retries = int(getattr(request, "retries", 0) or 0)
        if retries >= MAX_RETRIES:  # Celery gives up: this one is dropped, and counted as an error
            outcome = "error"
            log.error("task %s gave up after %d retries for %s: %s", task.value, retries, message.key(), exc)
        else:
            outcome = "retry"
        raise
    except Exception as exc:
        outcome = "error"
        log.exception("task %s failed for %s", task.value, message.key())
        setattr(exc, _TRACEBACK_LOGGED, True)
        raise
    finally:
        TASKS.labels(name, outcome).inc()
        TASK_SECONDS.labels(name).observe(time.perf_counter() - started)


# Set on an exception whose traceback _run logged: Celery's own line for the failure then leaves it out.
# (One Celery has to wrap to pickle loses the mark: its traceback is logged twice, never not at all.)
_TRACEBACK_LOGGED = "_kubechain_traceback_logged"


class _CeleryFailureLine(logging.Filter):
    """Celery's line for a failed task stays (it has Celery's task id), without what it repeats: the whole
    line once more as text in a ``data`` field, and the traceback when _run has logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("data", None)
        if record.exc_info and getattr(record.exc_info[1], _TRACEBACK_LOGGED, False):
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("celery.app.trace").addFilter(_CeleryFailureLine())


@signals.task_prerun.connect
def _name_the_resource(task: Any = None, args: Any = (), **_: Any) -> None:
    """Every line of a task names the message's resource, from here to task_postrun: Celery logs a
    failure after the task function has returned, and before task_postrun."""
    payload = args[0] if args and isinstance(args[0], dict) else {}  # (parsed and checked in _run)
    kind, namespace, name = (str(payload.get(key) or "") for key in ("kind", "namespace", "name"))
    log_context = contextlib.ExitStack()
    log_context.enter_context(resource_context(kind, namespace, name, task.name))
    # (kept on the request, which is this run's own: one kept by task id could be another delivery's)
    task.request.kubechain_log_context = log_context


@signals.task_postrun.connect
def _stop_naming_it(task: Any = None, **_: Any) -> None:
    log_context = getattr(task.request, "kubechain_log_context", None)
    if log_context is not None:
        log_context.close()


MAX_RETRIES = 20
RETRY = {
    "autoretry_for": (Unavailable,),
    "retry_backoff": True,
    "retry_backoff_max": 30,
    "max_retries": MAX_RETRIES,
}


@app.task(name=TaskName.VALIDATE.value, bind=True, **RETRY)
def validate(self: Any, payload: dict[str, Any]) -> None:
    from workers.validators import validate as handler

    _run(TaskName.VALIDATE, handler, payload, self.request)


@app.task(name=TaskName.PREPARE.value, bind=True, **RETRY)
def prepare(self: Any, payload: dict[str, Any]) -> None:
    from workers.prepare import prepare as handler

    _run(TaskName.PREPARE, handler, payload, self.request)


@app.task(name=TaskName.LLM_CALL.value, bind=True, **RETRY)
def llm_call(self: Any, payload: dict[str, Any]) -> None:
    from workers.llm_call import llm_call as handler

    _run(TaskName.LLM_CALL, handler, payload, self.request)


@app.task(name=TaskName.TOOL_CALL.value, bind=True, **RETRY)
def tool_call(self: Any, payload: dict[str, Any]) -> None:
    from workers.tool_call import tool_call as handler

    _run(TaskName.TOOL_CALL, handler, payload, self.request)


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(settings.log_level, settings.log_json)
    warn_of_unknown_variables()


@signals.worker_init.connect
def _choose_metrics_registry(sender: Any = None, **_: Any) -> None:
    global _metrics_registry, _prefork_parent, _thread_pool_size
    # the pool is a class (from the CLI) or a name (from the config); Celery resolves it right after this
    prefork = sender is not None and issubclass(
        get_implementation(sender.pool_cls), get_implementation("prefork")
    )
    # A threads pool's worker runs the tool calls it creates itself, on as many threads again: a prefork
    # child runs one task at a time, and a gevent worker's threads would be greenlets (both leave them
    # to the queue).
    threads = sender is not None and issubclass(
        get_implementation(sender.pool_cls), get_implementation("threads")
    )
    _thread_pool_size = int(getattr(sender, "concurrency", 0) or 0) if threads else 0
    _metrics_registry = registry_for(prefork, settings.prometheus_multiproc_dir)
    _prefork_parent = prefork


@signals.worker_init.connect
def _settle_heap(**_: Any) -> None:
    """Import the task handlers and the OpenAI SDK now rather than on the first task, then freeze the
    start-up heap (before prefork children are forked, so its pages stay shared)."""
    # Imported by the first task's first OpenAI client, the SDK held that task (the first run after
    # `kubechain up`) for seconds. The Anthropic SDK (~40 MiB) waits for a worker's first Anthropic LLM.
    import kubechain.llm.openai_provider  # noqa: F401
    import workers.llm_call
    import workers.prepare
    import workers.tool_call
    import workers.validators  # noqa: F401

    freeze_startup_heap()


@signals.worker_ready.connect
def _start_metrics(**_: Any) -> None:
    # A prefork parent runs no tasks, and children forked after it set up tracing would inherit its
    # exporter (a gRPC channel is not fork-safe): each child sets up its own (worker_process_init).
    if not _prefork_parent:
        setup_tracing("kubechain-worker")
    try:
        serve(settings.metrics_port, _metrics_registry, consumer_heartbeat.health)
    except MetricsPortUnavailable as exc:
        # Raised here, it was swallowed by Celery's signal dispatch: the worker ran on with neither /metrics
        # nor /healthz, until its liveness probe killed it (tasks in flight). It stops before it takes any
        # task instead (a SystemExit passes Celery's dispatch: the worker stops with this exit code).
        log.error("%s; the worker stops", exc)
        raise SystemExit(1) from None


@signals.worker_process_init.connect
def _child_tracing(**_: Any) -> None:
    # prefork children are forked before worker_ready: each sets up its own exporter
    setup_tracing("kubechain-worker")


@signals.worker_process_shutdown.connect
def _child_exited(pid: int | None = None, **_: Any) -> None:
    process_exited(pid or os.getpid(), settings.prometheus_multiproc_dir)
    # billiard ends a child with os._exit: no exit handler runs, so the spans its batch processor still
    # holds (a run's root span among them, written last) are sent now or never.
    flush_tracing()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    ctx = _context
    if ctx is not None:
        ctx.events.flush()
        if ctx.mcp is not None:
            ctx.mcp.close()
