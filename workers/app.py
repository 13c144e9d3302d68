"""The Celery app and its four tasks. Each task is a thin shell: parse the payload, call the handler."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery, signals

from kubechain.kube.errors import Unavailable
from kubechain.observability.logs import configure_logging, resource_context
from kubechain.observability.metrics import TASK_QUEUE_SECONDS, TASK_SECONDS, TASKS, serve
from kubechain.observability.tracing import context_from, setup_tracing, span
from kubechain.queueing import QueueName, ResourceMessage, TaskName, enqueue, make_celery
from kubechain.settings import Settings
from workers.context import WorkerContext, build_context

log = logging.getLogger(__name__)

settings = Settings()
app: Celery = make_celery(settings)

_context: WorkerContext | None = None
_context_lock = threading.Lock()


def context() -> WorkerContext:
    """One context per worker process (threads share it; prefork children build their own)."""
    global _context
    with _context_lock:
        if _context is None:
            _context = build_context(
                settings,
                lambda task, message, countdown: enqueue(app, task, message, countdown),
                continues_llm=QueueName.LLM.value in app.amqp.queues.consume_from,
            )
        return _context


def set_context(ctx: WorkerContext | None) -> None:
    """For tests: inject a context (fakes) instead of building one from the environment."""
    global _context
    with _context_lock:
        _context = ctx


def _run(
    task: TaskName, handler: Callable[[WorkerContext, ResourceMessage], None], payload: dict[str, Any]
) -> None:
    message = ResourceMessage.model_validate(payload)
    name = task.value.removeprefix("kubechain.")
    TASK_QUEUE_SECONDS.labels(name).observe(max(0.0, time.time() - message.enqueued_at))
    started = time.perf_counter()
    outcome = "ok"
    try:
        with (
            resource_context(message.kind, message.namespace, message.name, task.value),
            span(
                f"{name} {message.kind}/{message.name}",
                context_from(message.traceparent, ""),
                **{"kubechain.namespace": message.namespace, "kubechain.reason": message.reason},
            ),
        ):
            handler(context(), message)
    except Unavailable:
        outcome = "retry"
        raise
    except Exception:
        outcome = "error"
        log.exception("task %s failed for %s", task.value, message.key())
        raise
    finally:
        TASKS.labels(name, outcome).inc()
        TASK_SECONDS.labels(name).observe(time.perf_counter() - started)


RETRY = {"autoretry_for": (Unavailable,), "retry_backoff": True, "retry_backoff_max": 30, "max_retries": 20}


@app.task(name=TaskName.VALIDATE.value, **RETRY)
def validate(payload: dict[str, Any]) -> None:
    from workers.validators import validate as handler

    _run(TaskName.VALIDATE, handler, payload)


@app.task(name=TaskName.PREPARE.value, **RETRY)
def prepare(payload: dict[str, Any]) -> None:
    from workers.prepare import prepare as handler

    _run(TaskName.PREPARE, handler, payload)


@app.task(name=TaskName.LLM_CALL.value, **RETRY)
def llm_call(payload: dict[str, Any]) -> None:
    from workers.llm_call import llm_call as handler

    _run(TaskName.LLM_CALL, handler, payload)


@app.task(name=TaskName.TOOL_CALL.value, **RETRY)
def tool_call(payload: dict[str, Any]) -> None:
    from workers.tool_call import tool_call as handler

    _run(TaskName.TOOL_CALL, handler, payload)


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(settings.log_level, settings.log_json)


@signals.worker_ready.connect
def _start_metrics(**_: Any) -> None:
    setup_tracing("kubechain-worker")  # first: a /metrics port already taken must not also cost traces
    serve(settings.metrics_port)


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    ctx = _context
    if ctx is not None:
        ctx.events.flush()
        if ctx.mcp is not None:
            ctx.mcp.close()
