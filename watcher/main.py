"""The watcher process: lists and watches every KubeChain kind and turns state into Celery tasks.

It does no LLM or tool work. Events map to tasks by kind and phase; a change in an object's readiness
re-triggers the objects that depend on it; a periodic resync re-enqueues anything that sits in a
non-terminal state, so nothing is stranded by a lost message, a dead worker, a Redis flush or a restart.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Gauge

from kubechain.heap import freeze_startup_heap
from kubechain.kube.client import KubeClient
from kubechain.models import KINDS, LABEL_TASKRUNTOOLCALL, LABEL_TOOLCALLREQUEST, label_value
from kubechain.observability.health import Health
from kubechain.observability.logs import resource_fields
from kubechain.observability.metrics import (
    ENQUEUED,
    QUEUE_DEPTH,
    WATCH_EVENTS,
    register_phase_collector,
)
from kubechain.observability.tracing import export_run_span, run_context, setup_tracing, span, traceparent_of
from kubechain.queueing import AgentSeen, ResourceMessage, TaskName
from kubechain.settings import Settings, SettingsInvalid, load_settings, warn_of_unknown_variables
from kubechain.statemachines.demand import demand
from kubechain.statemachines.routing import (
    BUILT_FROM_THE_RUNS_AGENT,
    VALIDATED_KINDS,
    Work,
    agent_seen,
    dependents,
    is_terminal,
    readiness,
    ready_with_unready_dependencies,
    run_agent_name,
    run_just_ended,
    tasks_missing_their_output,
    tasks_missing_their_run,
    trace_uid_of,
    work_for,
    work_for_calls_of_ended_run,
    work_for_deleted_sub_agent_run,
    work_for_deleted_toolcall,
)
from kubechain.statemachines.toolcall import DELEGATED_FROM_ANNOTATION, started_in_process
from kubechain.statemachines.transition import parse_timestamp
from watcher.informer import Informer, Key, log_fields, object_key
from watcher.leader import LeaderElector
from watcher.outbox import Empty, MergingQueue
from watcher.scaling import serve_scaling

log = logging.getLogger(__name__)

Send = Callable[[TaskName, ResourceMessage, float], None]


INITIAL_SYNC_TIMEOUT_S = 30.0

# Defined here, not with the shared metrics: a worker that imported it would export a constant 0.
IS_LEADER = Gauge("kubechain_watcher_leader", "1 when this watcher holds the leader Lease")


def _name(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def _run_name(toolcall: dict[str, Any]) -> str:
    """The name of the TaskRun a tool call is of."""
    return str(((toolcall.get("spec") or {}).get("taskRunRef") or {}).get("name") or "")


def _is_about(work: Work, kind: str, obj: dict[str, Any]) -> bool:
    """Whether ``work`` is on ``obj`` itself (then obj's resourceVersion is the worked-on object's own)."""
    return (work.kind, work.name) == (kind, _name(obj))


class Watcher:
    def __init__(
        self,
        settings: Settings,
        kube: KubeClient,
        send: Send,
        *,
        leader_election: bool = True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.kube = kube
        self._send = send
        self._clock = clock
        self.stop_event = threading.Event()
        # A resync asked for now (by the lease thread, run by the resync thread), and whether it is a new
        # leader's, which does not know what was sent before it
        self._resync_requested = threading.Event()
        self._force_next_resync = threading.Event()
        # While start() waits for the first lists, nothing is sent: the resync after the wait decides what
        # their objects need, as a new leader's does. (No first list's objects are routed as events, each
        # finished run would prompt its Task and its delegating tool call again at every restart; a list
        # still going when the wait ends asks for a resync once it is in: _on_first_list.)
        self._awaiting_first_lists = False
        # each worker queue's Redis list length, as last read (None: Redis did not answer)
        self.queue_depths: dict[str, int] | None = None
        namespaces: list[str | None] = list(settings.namespaces) or [None]
        self.informers: list[Informer] = [
            Informer(
                kube,
                info.kind,
                info.plural,
                namespace,
                self._on_event,
                self.stop_event,
                # a turn's calls (fan-in), and a run's (its end stops those that still wait)
                index_labels=(LABEL_TOOLCALLREQUEST, LABEL_TASKRUNTOOLCALL)
                if info.kind == "TaskRunToolCall"
                else (),
                after_first_list=self._on_first_list,
            )
            for info in KINDS
            for namespace in namespaces
        ]
        self.elector: LeaderElector | None = None
        if leader_election:
            self.elector = LeaderElector(
                kube,
                settings.lease_namespace,
                settings.lease_name,
                settings.identity,
                settings.lease_duration_s,
                on_started_leading=self._on_started_leading,
                on_resumed_leading=self._on_resumed_leading,
            )
        self._outbox: MergingQueue[tuple[Work, str, bool]] = MergingQueue()
        # (task, kind, namespace, name) -> (resourceVersion enqueued, when, resync re-enqueues since)
        self._recent: dict[tuple[str, str, str, str], tuple[str, float, int]] = {}
        self._recent_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.enqueued = 0

    # -- decisions ---------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        if self._awaiting_first_lists:
            return False
        return self.elector is None or self.elector.is_leader

    def cache(self) -> dict[str, dict[Key, dict[str, Any]]]:
        view: dict[str, dict[Key, dict[str, Any]]] = {}
        for informer in self.informers:
            view.setdefault(informer.kind, {}).update(informer.snapshot())
        return view

    def _cached(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        # one informer per (kind, namespace) when the watcher is limited to namespaces: look in each
        for informer in self.informers:
            if informer.kind == kind:
                with informer.lock:
                    obj = informer.cache.get((namespace, name))
                if obj is not None:
                    return obj
        return None

    def taskrun_phases(self) -> list[str]:
        return [
            str((obj.get("status") or {}).get("phase") or "")
            for informer in self.informers
            if informer.kind == "TaskRun"
            for obj in informer.snapshot().values()
        ]

    def _on_first_list(self) -> None:
        """An informer's first list is in. One in before start()'s wait ended is in the start-up resync (or
        a new leader's); a later one's objects were in neither, and an ordinary resync decides for them."""
        if not self._awaiting_first_lists:
            self._resync_requested.set()

    def _on_event(
        self,
        kind: str,
        event_type: str,
        obj: dict[str, Any],
        previous: dict[str, Any] | None,
        synthesized: bool = False,
    ) -> None:
        if not self._may_send(dropping=lambda: self._event_work(kind, event_type, obj, previous)):
            return
        # only while leading: a standby sees every event too, and a sum over both replicas counted it twice
        WATCH_EVENTS.labels(kind, event_type).inc()
        # Not for a deletion a relist found (synthesized): its object is the cached copy, which may be
        # from before a worker's write ended the run (and exported its root) while the watch was down.
        if kind == "TaskRun" and event_type == "DELETED" and not synthesized and not is_terminal(kind, obj):
            self._end_deleted_run(obj)
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        deleted = event_type == "DELETED"
        if deleted:
            # Never the same state as a version sent before: a relist's DELETED carries the cached copy's
            # version, which may have prompted the same work already (the object becoming Ready). (Nor a
            # version for a worker to read.)
            rv = f"deleted:{rv}"
        for work in self._event_work(kind, event_type, obj, previous):
            self._submit(work, rv, own_version=not deleted and _is_about(work, kind, obj))

    def _end_deleted_run(self, obj: dict[str, Any]) -> None:
        """The root span of a run deleted before it ended: the worker whose write ends a run makes it, and
        this run has no such write. Made from the deleted object as the event carries it (no request),
        from its creation to its deletion, as an error. Best effort, as the workers' is."""
        metadata = obj.get("metadata") or {}
        uid = str(metadata.get("uid") or "")
        if not uid:
            return
        try:
            now = self._clock()
            phase = str((obj.get("status") or {}).get("phase") or "") or "not started"
            export_run_span(
                uid,
                str(metadata.get("name") or ""),
                str(metadata.get("namespace") or ""),
                parse_timestamp(metadata.get("creationTimestamp")) or now,
                parse_timestamp(metadata.get("deletionTimestamp")) or now,
                f"TaskRun deleted before it ended (phase {phase})",
                linked_from=(metadata.get("annotations") or {}).get(DELEGATED_FROM_ANNOTATION),
            )
        except Exception:  # noqa: BLE001 - tracing (a custom sampler, an exporter) must not stop the watch
            log.exception("could not export the root span of deleted run %s", uid)

    def _event_work(
        self, kind: str, event_type: str, obj: dict[str, Any], previous: dict[str, Any] | None
    ) -> list[Work]:
        """The work an event calls for: the object's own, and that of the objects that depend on it."""
        now = self._clock()
        works: list[Work] = []
        if event_type != "DELETED":
            works = work_for(kind, obj, now, self.settings.claim_timeout_s)
            if kind == "TaskRunToolCall" and works and not self._prompts_its_run(obj):
                works = [work for work in works if work.kind != "TaskRun"]
            if kind == "TaskRunToolCall" and event_type == "ADDED" and started_in_process(obj):
                # its creator runs it (a message would only have a worker find it claimed); resync
                # finds it if that worker was lost first
                works = [work for work in works if work.kind != "TaskRunToolCall"]
            if kind == "TaskRun" and run_just_ended(obj, previous):
                works += work_for_calls_of_ended_run(obj, self._calls_of_run(obj))
        elif kind == "TaskRunToolCall" and self._cancels_a_call_of_a_live_run(obj):
            works = [work_for_deleted_toolcall(obj)]
        elif kind == "TaskRun":
            works = work_for_deleted_sub_agent_run(obj)
        if kind in VALIDATED_KINDS:
            after = None if event_type == "DELETED" else obj
            if readiness(kind, after) != readiness(kind, previous):
                works += dependents(kind, obj, self.cache())
        return works

    def _prompts_its_run(self, obj: dict[str, Any]) -> bool:
        """Fan-in: only the last of a turn's tool calls to finish prompts the parent (resync covers a hint
        lost on the way), and none prompts a run that has ended: a relist after a restart delivers every
        finished tool call ever made again, and each was a message for a worker to find nothing to do."""
        run = self._owning_run(obj)
        if run is not None and is_terminal("TaskRun", run):
            return False
        return self._all_siblings_finished(obj)

    def _cancels_a_call_of_a_live_run(self, obj: dict[str, Any]) -> bool:
        """A tool call deleted by hand while its run goes on (not with its run): the run's fan-in hears it
        now, not at its next resync, if the deleted call was the last its turn waited for."""
        run = self._owning_run(obj)
        if run is None or is_terminal("TaskRun", run) or (run.get("metadata") or {}).get("deletionTimestamp"):
            return False
        return self._all_siblings_finished(obj)

    def _owning_run(self, toolcall: dict[str, Any]) -> dict[str, Any] | None:
        """The cached TaskRun the tool call names, if it is the one that owns it (a run of that name made
        again since is not)."""
        metadata = toolcall.get("metadata") or {}
        run = self._cached("TaskRun", str(metadata.get("namespace") or ""), _run_name(toolcall))
        owners = {ref.get("uid") for ref in metadata.get("ownerReferences") or []}
        return run if run is not None and (run.get("metadata") or {}).get("uid") in owners else None

    def _calls_of_run(self, run: dict[str, Any]) -> list[dict[str, Any]]:
        """The cached tool calls labelled as ``run``'s (by label_value of its name: a long name's hash may
        be shared, and anyone may set a label, so routing keeps only those it owns)."""
        namespace, name = object_key(run)
        return [
            call
            for informer in self.informers
            if informer.kind == "TaskRunToolCall"
            for call in informer.indexed(LABEL_TASKRUNTOOLCALL, namespace, label_value(name))
        ]

    def _all_siblings_finished(self, obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        request = labels.get(LABEL_TOOLCALLREQUEST)
        namespace = (obj.get("metadata") or {}).get("namespace")
        if not request:
            return True
        # Of its own run only: a request id is 7 hex digits of a hash, and another run's open turn may
        # have the same.
        run = _run_name(obj)
        return all(
            is_terminal("TaskRunToolCall", sibling)
            for informer in self.informers
            if informer.kind == "TaskRunToolCall"
            for sibling in informer.indexed(LABEL_TOOLCALLREQUEST, str(namespace or ""), str(request))
            if _run_name(sibling) == run
        )

    def _submit(self, work: Work, rv: str, *, resync: bool = False, own_version: bool = False) -> bool:
        """Queue ``work`` for the sender unless the same state was just queued; True if it added to the
        outbox (work already waiting there is replaced by this newer state instead). ``rv`` is the version
        of the object whose change prompted the work; ``own_version`` says it is the worked-on object's."""
        key = (work.task.value, work.kind, work.namespace, work.name)
        now = time.monotonic()
        with self._recent_lock:
            last = self._recent.get(key)
            retries = 0
            resent = False
            if last is not None:
                last_rv, at, retries = last
                if resync:
                    # Back off per object: a backlog of queued work must not be re-enqueued every tick.
                    wait = (
                        min(work.max_recheck_s, self.settings.stale_after_s * (2 ** min(retries, 8)))
                        if last_rv == rv
                        else self.settings.stale_after_s
                    )
                    if now - at < wait:
                        return False
                    resent = last_rv == rv
                    if not resent:
                        retries = 0
                elif last_rv == rv and work.countdown_s == 0:
                    return False  # the same state was already enqueued
                else:
                    retries = 0
            added = self._outbox.put(key, (work, rv, own_version))
            # Not counted when merged into the same work still waiting (Redis down): no more messages
            # than before, and each tick of a long outage doubling the wait held back the one sent on
            # recovery, if lost, for 300 s.
            if resent and added:
                retries += 1
            self._recent[key] = (rv, now, retries)
        return added

    def _forget(self, works: Iterable[Work]) -> None:
        """Forget having sent ``works`` (dropped unsent in a lapse): the resync sends them again at once."""
        with self._recent_lock:
            for work in works:
                self._recent.pop((work.task.value, work.kind, work.namespace, work.name), None)

    def resync(self, *, force: bool = False) -> int:
        """Re-enqueue whatever is not finished. ``force`` ignores the staleness window (a new leader, which
        does not know what was sent before it). A replica that does not lead notes the skipped tick as
        dropped work."""
        if not self._may_send():
            self._keep_forced(force)
            return 0
        now = self._clock()
        count = 0
        cache = self.cache()
        try:
            for kind, obj, work in self._resync_work(cache, now):
                if not self._may_send():
                    # Stopped acting during a long resync: the next leader's resync has the rest, or this
                    # replica's when it acts again (still a new leader's, if this one was).
                    self._keep_forced(force)
                    break
                rv = str(obj["metadata"].get("resourceVersion", ""))
                if force:
                    # (the object whose state calls for the work may be unchanged while what it depends
                    # on changed: its version alone cannot tell what was already sent)
                    with self._recent_lock:
                        self._recent.pop((work.task.value, work.kind, work.namespace, work.name), None)
                count += self._submit(
                    work,
                    rv,
                    resync=True,
                    own_version=_is_about(work, kind, obj),
                )
        finally:
            self._forget_finished()  # else what it remembers only grows while resyncs fail
        if count:
            log.info("resync re-enqueued %d resources", count)
        return count

    def _keep_forced(self, force: bool) -> None:
        """A new leader's resync that could not run (the replica was not acting yet, or stopped half way)
        is asked for again as a new leader's: its request was taken, and an ordinary one would hold back
        what this replica sent when it last led (remembered for minutes) though another led since."""
        if force:
            self._force_next_resync.set()

    def _resync_work(
        self, cache: dict[str, dict[Key, dict[str, Any]]], now: datetime
    ) -> list[tuple[str, dict[str, Any], Work]]:
        """Each piece of work a resync calls for, with the object (and its kind) whose state calls for it.
        An object routing cannot handle (a bug, a hand-written status) is logged and passed over: it must
        not stop the resync of every other object at every tick."""
        out = []
        for kind, objects in cache.items():
            for obj in objects.values():
                try:
                    works = work_for(kind, obj, now, self.settings.claim_timeout_s, resync=True)
                except Exception:  # noqa: BLE001
                    namespace, name = object_key(obj)
                    log.exception(
                        "resync passed over %s %s/%s", kind, namespace, name, extra=log_fields(kind, obj)
                    )
                    continue
                out += [(kind, obj, work) for work in works]
        # (these skip objects being deleted, as work_for does)
        for check in (tasks_missing_their_run, tasks_missing_their_output, ready_with_unready_dependencies):
            try:
                works = check(cache)
            except Exception:  # noqa: BLE001
                log.exception("resync passed over its check %s", check.__name__)
                continue
            out += [(work.kind, cache[work.kind][(work.namespace, work.name)], work) for work in works]
        return out

    def _forget_finished(self) -> None:
        horizon = time.monotonic() - max(600.0, self.settings.stale_after_s * 10)
        with self._recent_lock:
            for key in [key for key, (_, at, _) in self._recent.items() if at < horizon]:
                del self._recent[key]

    def _on_started_leading(self) -> None:
        # Not here, on the lease thread: a resync of thousands of objects would hold up the renewals that
        # keep this replica the leader (and a late renewal starts a lapse).
        self._force_next_resync.set()
        self._resync_requested.set()

    def _on_resumed_leading(self) -> None:
        # What was dropped in the lapse was forgotten as sent (see _may_send), so an ordinary resync sends
        # it; the rest keeps its staleness window and back-off.
        self._resync_requested.set()

    # -- threads -----------------------------------------------------------------------------------

    def message_for(self, work: Work, rv: str, own_version: bool = False) -> ResourceMessage:
        """The task payload: which object, and the version seen of it when that version is the object's
        own (the worker may read it from the API server's watch cache, no older than that). Work on a
        TaskRun (or its tool calls) carries a span of the run's trace, and the run's Agent as cached here
        (made when sent, not when queued: the newest this watcher has seen)."""
        message = ResourceMessage(
            kind=work.kind,
            namespace=work.namespace,
            name=work.name,
            resource_version=rv if own_version else "",
            reason=work.reason,
            agent_seen=self._agent_seen(work) if work.task in BUILT_FROM_THE_RUNS_AGENT else None,
        )
        # The trace is the one of the run the work is about: work that another object's change asked for
        # (an Agent became Ready, a sub-agent's run finished) carries that object's, or none.
        try:
            target = self._cached(work.kind, work.namespace, work.name)
            trace_uid = (trace_uid_of(work.kind, target) if target is not None else "") or work.trace_uid
            if trace_uid:
                with span(
                    f"enqueue {work.task.value}",
                    run_context(trace_uid),
                    **{
                        "kubechain.kind": work.kind,
                        "kubechain.name": work.name,
                        "kubechain.reason": work.reason,
                    },
                ) as current:
                    message.traceparent = traceparent_of(current)
        except Exception:  # noqa: BLE001 - tracing (a custom sampler, an exporter) must not stop the work
            log.exception(
                "could not trace the enqueue of %s; sending it without a trace",
                message.key(),
                extra=self._log_fields(work),
            )
        return message

    def _agent_seen(self, work: Work) -> AgentSeen | None:
        """The Agent of the run ``work`` is on (or of the tool call's run), as cached; None if unknown."""
        target = self._cached(work.kind, work.namespace, work.name)
        run = self._owning_run(target) if target is not None and work.kind == "TaskRunToolCall" else target
        if run is None:
            return None
        name = run_agent_name(run, lambda task: self._cached("Task", work.namespace, task))
        agent = self._cached("Agent", work.namespace, name) if name else None
        return agent_seen(agent) if agent is not None else None

    def _log_fields(self, work: Work) -> dict[str, str]:
        """The fields that name the work's object on a log line (a tool call's run from the cache)."""
        cached = self._cached(work.kind, work.namespace, work.name)
        if cached is None:
            return resource_fields(work.kind, work.namespace, work.name)
        return log_fields(work.kind, cached)

    def _may_send(self, dropping: Callable[[], Iterable[Work]] = tuple) -> bool:
        """Whether this replica still leads; one that does not drops the work (an event, a resync tick,
        what it has not sent yet) and notes it. The new leader's resync covers it, and sending it too would
        only duplicate the new leader's work (and flood Redis when a send that was failing goes through
        again). In a lapse of its own Lease, ``dropping()`` is the work dropped: forgotten as sent, the
        resync when it resumes sends it (an ordinary one would hold back what it last sent recently)."""
        if self.is_leader:
            return True
        if self.elector is not None:
            self.elector.note_ignored(forget=lambda: self._forget(dropping()))
        return False

    def _sender(self) -> None:
        backoff = 0.2
        while not self.stop_event.is_set():
            try:
                work, rv, own_version = self._outbox.get(timeout=0.5)
            except Empty:
                continue
            message = self.message_for(work, rv, own_version)
            unsent = [work]
            while not self.stop_event.is_set() and self._may_send(dropping=unsent.copy):
                try:
                    self._send(work.task, message, work.countdown_s)
                    self.enqueued += 1
                    ENQUEUED.labels(work.task.value.removeprefix("kubechain."), work.reason).inc()
                    backoff = 0.2
                    break
                except Exception as exc:  # noqa: BLE001 - Redis down: keep trying, resync covers the rest
                    log.warning(
                        "could not enqueue %s for %s: %s",
                        work.task.value,
                        message.key(),
                        exc,
                        extra=self._log_fields(work),
                    )
                    self.stop_event.wait(backoff)
                    backoff = min(backoff * 2, 10.0)

    def _resync_loop(self) -> None:
        while not self.stop_event.is_set():
            self._resync_requested.wait(self.settings.resync_interval_s)
            if self.stop_event.is_set():
                return
            try:
                self.resync(force=self._take_resync_request())
            except Exception:  # noqa: BLE001
                log.exception("resync failed")

    def _take_resync_request(self) -> bool:
        """Take the request for a resync, if one was made; whether it is a new leader's (forced)."""
        # Each cleared only once seen set, the request before its kind (set in the other order): one made
        # after these checks wakes the next wait at once.
        if self._resync_requested.is_set():
            self._resync_requested.clear()
        forced = self._force_next_resync.is_set()
        if forced:
            self._force_next_resync.clear()
        return forced

    def _gauges_loop(self) -> None:
        client: Any = None
        while not self.stop_event.wait(2.0):
            client = self.update_gauges(client)

    def update_gauges(self, client: Any = None) -> Any:
        """Set the leader and queue-depth gauges once; returns the Redis client to use next time."""
        import redis

        from kubechain.queueing import QueueName

        IS_LEADER.set(1 if self.is_leader else 0)
        try:
            client = client or redis.Redis.from_url(self.settings.redis_url, socket_timeout=2)
            depths = {queue.value: int(client.llen(queue.value)) for queue in QueueName}
            for queue_name, depth in depths.items():
                QUEUE_DEPTH.labels(queue_name).set(depth)
            self.queue_depths = depths
        except Exception:  # noqa: BLE001 - the leader gauge must go on (a sentinel:// URL, Redis down)
            # No depth rather than the last one: a dashboard must not show an empty (or a frozen) queue
            # while Redis does not answer.
            QUEUE_DEPTH.clear()
            self.queue_depths = None
            log.debug("queue depth unavailable", exc_info=True)
        return client

    def scaling(self) -> dict[str, dict[str, int]] | None:
        """Each worker queue's demand (backlog + steps in hand), or None while the backlog is unknown."""
        depths = self.queue_depths
        return None if depths is None else demand(depths, self.cache())

    def loop_threads(self) -> list[threading.Thread]:
        """The threads the watcher's work depends on: if one ends (a bug), /healthz says so and the
        kubelet restarts the process rather than leaving a kind unwatched or nothing sent."""
        threads = list(self._threads)
        if self.elector is not None and self.elector.thread is not None:
            threads.append(self.elector.thread)
        return threads

    def readiness(self) -> Health:
        """Ready once every informer's first list is in: before, what exists is not yet seen (nor acted on),
        though the process is alive (/healthz) however long a list takes. /readyz, what `kubechain up` waits
        for and the readinessProbe asks (the Service that answers /scaling then has only replicas whose cache
        holds what exists)."""
        waiting = [
            informer.plural + (f" in {informer.namespace}" if informer.namespace else "")
            for informer in self.informers
            if not informer.synced.is_set()
        ]
        if waiting:
            problems = [informer.list_problem for informer in self.informers if informer.list_problem]
            failing = f"; failing: {'; '.join(problems)}" if problems else ""
            return Health(False, f"starting: the first list of {', '.join(waiting)} is not in yet{failing}")
        return Health(True, "ok")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def start(self) -> None:
        self._awaiting_first_lists = True
        for informer in self.informers:
            self._spawn(informer.run, f"watch-{informer.plural}")
        self._spawn(self._sender, "enqueue")
        self._spawn(self._resync_loop, "resync")
        self._spawn(self._gauges_loop, "gauges")
        # One deadline for all: an informer that cannot sync (a namespace without RBAC, a missing CRD)
        # must not hold up leader election once per kind; events and resync cope with a partial cache.
        deadline = time.monotonic() + INITIAL_SYNC_TIMEOUT_S
        for informer in self.informers:
            informer.synced.wait(timeout=max(0.0, deadline - time.monotonic()))
        self._awaiting_first_lists = False
        if self.elector is not None:
            self.elector.start()
        else:
            self.resync(force=True)
        log.info(
            "watcher started", extra={"kinds": len(KINDS), "namespaces": self.settings.namespaces or "all"}
        )

    def stop(self) -> None:
        self.stop_event.set()
        self._resync_requested.set()  # wakes the resync thread to see the stop
        if self.elector is not None:
            self.elector.stop()
        # Watch threads block in reads; closing the client ends them. All threads are daemons: one
        # overall deadline, not one per thread.
        self.kube.close()
        deadline = time.monotonic() + 3.0
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def run_forever(self) -> None:
        self.start()
        try:
            while not self.stop_event.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()


def main(argv: list[str] | None = None) -> None:
    import argparse
    import signal

    from kubechain.observability.logs import configure_logging
    from kubechain.queueing import enqueue, make_celery

    parser = argparse.ArgumentParser(description="KubeChain watcher: CRD events → Celery tasks")
    parser.add_argument("--no-leader-election", action="store_true")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsInvalid as exc:  # one line, as `kubechain watcher` says it, not a traceback
        print(f"kubechain-watcher: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_json)
    warn_of_unknown_variables()
    app = make_celery(settings)
    kube = KubeClient.from_settings(settings, "kubechain-watcher")
    watcher = Watcher(
        settings,
        kube,
        lambda task, message, countdown: enqueue(app, task, message, countdown),
        leader_election=not args.no_leader_election,
    )
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop_event.set())
    from kubechain.observability.health import threads_health
    from kubechain.observability.metrics import MetricsPortUnavailable, serve

    register_phase_collector(watcher.taskrun_phases)
    setup_tracing("kubechain-watcher")
    try:
        serve(settings.metrics_port, health=threads_health(watcher.loop_threads), readiness=watcher.readiness)
    except MetricsPortUnavailable as exc:
        log.error("%s; the watcher stops", exc)
        raise SystemExit(1) from None
    serve_scaling(settings.scaling_port, watcher.scaling)
    freeze_startup_heap()
    watcher.run_forever()


if __name__ == "__main__":
    main()
