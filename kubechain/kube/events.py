"""Kubernetes Events (core/v1) with deterministic names, so a retried transition never duplicates one."""

from __future__ import annotations

import contextvars
import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any, Literal

from kubechain.kube.client import KubeClient
from kubechain.kube.errors import AlreadyExists
from kubechain.models import Resource

log = logging.getLogger(__name__)

EventType = Literal["Normal", "Warning"]
MAX_MESSAGE = 1024
# An Event this process posted (or found there) in the last ten minutes is not posted again: its name says
# it is the same one, and a condition checked again and again (an ignored approval annotation, at every
# HumanLayer check) made a refused create each time. Well within the API server's Event TTL (1 h).
REMEMBER_POSTED_S = 600.0
REMEMBER_POSTED_MAX = 4096


def event_name(object_name: str, uid: str, reason: str, key: str) -> str:
    digest = hashlib.sha256(f"{uid}/{reason}/{key}".encode()).hexdigest()[:16]
    return f"{object_name[:200]}.{digest}"


class EventRecorder:
    """Posts Events about KubeChain objects. Best effort: a failure is logged, never raised.

    ``emit`` posts before it returns. With ``background=True`` the recorder also has sender threads,
    and ``emit(..., deferred=True)`` leaves the post to them (an Event's name is deterministic, so the
    order of posting does not matter): for bursts, such as the Events of dozens of children created at
    once, that should not hold up the work that follows. ``delay_s``: how long a deferred Event waits
    before it is posted, so that the burst's own work (fifty tool calls claimed and started) has the API
    server first; ``flush`` posts what waits at once."""

    def __init__(
        self,
        client: KubeClient,
        controller: str,
        instance: str,
        *,
        background: bool = False,
        senders: int = 4,
        delay_s: float = 0.0,
    ) -> None:
        self._client = client
        self.controller = controller
        self.instance = instance
        self._delay_s = delay_s
        self._hurry = threading.Event()  # set by flush: what waits is posted now
        self._posted: OrderedDict[str, float] = OrderedDict()  # namespace/name -> when, oldest first
        self._posted_lock = threading.Lock()
        # each deferred post, when it is due, with its caller's context: the sender's log lines name what
        # the caller's do
        self._queue: queue.Queue[tuple[float, contextvars.Context, str, dict[str, Any]] | None] | None = None
        if background:
            self._queue = queue.Queue(maxsize=10_000)
            for index in range(senders):
                threading.Thread(target=self._send_loop, name=f"events-{index}", daemon=True).start()

    def _send_loop(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                due, context, namespace, body = item
                # due in the order queued: a sender waits only for the earliest of what it has not taken
                wait_s = due - time.monotonic()
                if wait_s > 0:
                    self._hurry.wait(wait_s)
                context.run(self._post, namespace, body)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until queued Events are posted, e.g. before a process exits."""
        self._hurry.set()
        deadline = time.monotonic() + timeout_s
        while self._queue is not None and self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        self._hurry.clear()

    def _posted_lately(self, key: str) -> bool:
        now = time.monotonic()
        with self._posted_lock:
            while self._posted:
                oldest, at = next(iter(self._posted.items()))
                if now - at < REMEMBER_POSTED_S and len(self._posted) <= REMEMBER_POSTED_MAX:
                    break
                del self._posted[oldest]
            return key in self._posted

    def _remember_posted(self, key: str) -> None:
        with self._posted_lock:
            self._posted.pop(key, None)
            self._posted[key] = time.monotonic()

    def _post(self, namespace: str, body: dict[str, Any]) -> None:
        key = f"{namespace}/{body['metadata']['name']}"
        try:
            self._client.create_event(namespace, body)
            self._remember_posted(key)
        except AlreadyExists:
            self._remember_posted(key)
        except Exception as exc:  # noqa: BLE001 - best effort: a sender thread must not die, a task not fail
            reason = body.get("reason")
            involved = body["involvedObject"]
            log.warning("could not record event %s on %s/%s: %s", reason, namespace, involved["name"], exc)

    def emit(
        self,
        obj: Resource[Any, Any],
        event_type: EventType,
        reason: str,
        message: str,
        *,
        key: str,
        component: str | None = None,
        deferred: bool = False,
    ) -> None:
        """Record ``reason`` on ``obj``. ``key`` names the transition (e.g. the resourceVersion the
        transition produced): the same (object, reason, key) always maps to the same Event name.
        ``deferred``: a sender thread posts it (when the recorder has them), not this call."""
        name = event_name(obj.name, obj.uid, reason, key)
        if self._posted_lately(f"{obj.namespace}/{name}"):
            return
        now = datetime.now(UTC)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": name,
                "namespace": obj.namespace,
            },
            "involvedObject": {
                "apiVersion": obj.api_version,
                "kind": obj.KIND,
                "name": obj.name,
                "namespace": obj.namespace,
                "uid": obj.uid,
                "resourceVersion": obj.resource_version,
            },
            "reason": reason,
            # the API server's limit counts bytes: a cut by characters let long non-ASCII messages fail
            "message": message.encode("utf-8", "replace")[:MAX_MESSAGE].decode("utf-8", "ignore"),
            "type": event_type,
            # kubectl describe's "From": the original's recorder for the kind (taskrun-controller, ...)
            "source": {"component": component or f"{obj.KIND.lower()}-controller"},
            "firstTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "lastTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "count": 1,
            "action": reason,
            "reportingComponent": self.controller,
            "reportingInstance": self.instance[:128],
        }
        if deferred and self._queue is not None:
            try:
                due = time.monotonic() + self._delay_s
                self._queue.put_nowait((due, contextvars.copy_context(), obj.namespace, body))
                return
            except queue.Full:
                pass  # overloaded: post inline rather than drop
        self._post(obj.namespace, body)
