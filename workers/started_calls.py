"""Tool calls a worker runs in its own process, right after creating them (see STARTED_BY_ANNOTATION).

A turn's tool calls went from the worker that created them to the watcher, through the queue, to a worker
that read each again before claiming it: for a fan-out of fifty, a quarter of the machine's work while they
start. A worker that consumes the tools queue itself starts them at once instead, from the objects the API
server answered the creates with (as current as a read). Everything else is as for a message: the claim is
a conditional write, and a call this process cannot take (its slots are busy) goes through the queue.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kubechain.models import TaskRunToolCall

log = logging.getLogger(__name__)


class CallStarter:
    """Runs ``run(toolcall, asked_at)`` on one of ``slots`` threads; ``start`` says False when all are
    taken."""

    def __init__(self, slots: int, run: Callable[[TaskRunToolCall, float], None]) -> None:
        self.slots = slots
        self._run = run
        self._busy = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def start(self, toolcall: TaskRunToolCall, asked_at: float) -> bool:
        with self._lock:
            if self._busy >= self.slots:
                return False
            self._busy += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="started-call")
            pool = self._pool
        # in the creator's context: its log lines' fields, and its span (the run's trace)
        pool.submit(contextvars.copy_context().run, self._run_one, toolcall, asked_at)
        return True

    def _run_one(self, toolcall: TaskRunToolCall, asked_at: float) -> None:
        try:
            self._run(toolcall, asked_at)
        except Exception:  # noqa: BLE001 - ``run`` hands what it cannot finish to the queue; a thread must not die
            log.exception("tool call %s/%s started here failed", toolcall.namespace, toolcall.name)
        finally:
            with self._lock:
                self._busy -= 1
