"""List-then-watch one kind into a cache, relisting on 410 Gone and resuming after connection errors."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kubechain.kube.client import KubeClient
from kubechain.kube.errors import Forbidden, Gone, KubeAPIError, NotFound
from kubechain.observability.logs import resource_fields
from kubechain.statemachines.routing import cached_form

log = logging.getLogger(__name__)

Key = tuple[str, str]
# (kind, event type, new object, previous object or None, synthesized): synthesized is True for a DELETED
# the informer made itself, for a cached object a relist no longer finds (deleted while the watch was
# down, or missed): the object is the cached copy, possibly stale, and when it went is not known
Handler = Callable[[str, str, dict[str, Any], dict[str, Any] | None, bool], None]


def list_problem(plural: str, error: KubeAPIError) -> str:
    """Why a kind cannot be listed, and what to fix."""
    if isinstance(error, NotFound) and error.kind_unknown:
        return f"{plural}: the API server does not serve this kind: its CRD is not installed (kubechain install --crds-only)"
    if isinstance(error, Forbidden):
        return (
            f"{plural}: the watcher may not list it ({error.message}); grant its ServiceAccount list and watch "
            "(deploy/base holds the RBAC)"
        )
    return f"{plural}: {error}"


def object_key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def log_fields(kind: str, obj: dict[str, Any]) -> dict[str, str]:
    """The fields that name ``obj`` on a log line (a tool call's run is in its spec, not its name)."""
    namespace, name = object_key(obj)
    run = ((obj.get("spec") or {}).get("taskRunRef") or {}).get("name")
    return resource_fields(kind, namespace, name, run=str(run or ""))


def _label(obj: dict[str, Any] | None, label: str) -> str:
    if obj is None:
        return ""
    return str(((obj.get("metadata") or {}).get("labels") or {}).get(label) or "")


MAX_HANDLER_ATTEMPTS = 5
SHORT_WATCH_S = 1.0  # a watch that ends sooner without a single event is treated as a failure


class Informer:
    def __init__(
        self,
        kube: KubeClient,
        kind: str,
        plural: str,
        namespace: str | None,
        handler: Handler,
        stop: threading.Event,
        watch_timeout_s: int = 290,
        index_labels: Sequence[str] = (),
        monotonic: Callable[[], float] = time.monotonic,
        after_first_list: Callable[[], None] | None = None,
    ) -> None:
        self.kube = kube
        self.kind = kind
        self.plural = plural
        self.namespace = namespace
        self.handler = handler
        self.stop = stop
        self.watch_timeout_s = watch_timeout_s
        self._monotonic = monotonic
        self.cache: dict[Key, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        # Why the first list is not in yet, if it failed (/readyz says it): what to fix, not only "waiting"
        self.list_problem: str | None = None
        self.resource_version = ""
        self.relists = 0
        # The last list took longer than the API server keeps this kind's history (its watch expired
        # before a single event): the next one is served from the API server's watch cache instead.
        self.list_from_watch_cache = False
        # object -> (the version whose handler failed, how many times): one entry per object, dropped
        # once the object is handled (a newer version, its deletion), so none outlives what it counts
        self._failures: dict[Key, tuple[str, int]] = {}
        # (label, namespace, value) -> keys of the cached objects with that value of one of index_labels
        # (client-go's Indexer): finding a turn's tool calls, or a run's, must not scan every tool call ever
        # cached.
        self.index_labels = tuple(index_labels)
        self._index: dict[tuple[str, str, str], set[Key]] = {}
        # Given, the first list only fills the cache (the handler does not hear of its objects) and this is
        # called once it is in: its owner decides what they need from the whole cache (a resync). Routed as
        # events, they would prompt again at every start what finished long ago.
        self.after_first_list = after_first_list

    def snapshot(self) -> dict[Key, dict[str, Any]]:
        with self.lock:
            return dict(self.cache)

    def indexed(self, label: str, namespace: str, value: str) -> list[dict[str, Any]]:
        """The cached objects in ``namespace`` whose ``label`` (one of index_labels) is ``value``."""
        with self.lock:
            keys = self._index.get((label, namespace, value), ())
            return [self.cache[key] for key in keys if key in self.cache]

    def _store(self, key: Key, obj: dict[str, Any] | None) -> None:
        """Put ``obj`` (None: remove) in the cache under ``key``, keeping the index; the lock is held."""
        previous = self.cache.pop(key, None) if obj is None else self.cache.get(key)
        if obj is not None:
            self.cache[key] = obj
        for label in self.index_labels:
            before, after = _label(previous, label), _label(obj, label)
            if before == after:
                continue
            if before:
                bucket = self._index.get((label, key[0], before))
                if bucket is not None:
                    bucket.discard(key)
                    if not bucket:
                        del self._index[(label, key[0], before)]
            if after:
                self._index.setdefault((label, key[0], after), set()).add(key)

    def _apply(
        self, event_type: str, obj: dict[str, Any], synthesized: bool = False, quiet: bool = False
    ) -> None:
        """Cache what the event says and tell the handler, unless ``quiet`` (into the cache only)."""
        # Nothing here reads managedFields; dropped, they cost no cache memory (controller-runtime's
        # TransformStripManagedFields).
        (obj.get("metadata") or {}).pop("managedFields", None)
        key = object_key(obj)
        with self.lock:
            previous = self.cache.get(key)
            if event_type == "DELETED":
                self._store(key, None)
            else:
                if previous is not None and previous["metadata"].get("resourceVersion") == obj[
                    "metadata"
                ].get("resourceVersion"):
                    return  # a duplicate delivery of something we have already seen
                self._store(key, cached_form(self.kind, obj))
        if quiet:
            return
        try:
            self.handler(self.kind, event_type, obj, previous, synthesized)
        except BaseException:
            version = str(obj["metadata"].get("resourceVersion"))
            failed_version, failures = self._failures.get(key, (version, 0))
            failures = failures + 1 if failed_version == version else 1
            self._failures[key] = (version, failures)
            if failures >= MAX_HANDLER_ATTEMPTS:
                # Not for ever: every later event of this kind waits behind a redelivered one. The resync
                # looks at the object again.
                log.error(
                    "giving up on %s %s after %d failed attempts",
                    event_type,
                    key,
                    failures,
                    extra=log_fields(self.kind, obj),
                )
                self._failures.pop(key, None)
                return
            # Not handled: the watch resumes before this event, and its redelivery must not be taken for
            # a duplicate of something already seen.
            with self.lock:
                self._store(key, previous)
            raise
        if self._failures:
            self._failures.pop(key, None)

    def relist(self) -> None:
        # In pages, each applied (and reduced to its cached form) before the next is fetched: a kind with
        # years of finished runs must not have to fit in memory twice over, raw and parsed, at every
        # start and after every 410.
        seen = set()
        resource_version = ""
        first = not self.synced.is_set()
        quiet = first and self.after_first_list is not None
        if self.list_from_watch_cache:
            self.list_from_watch_cache = False
            pages = self.kube.list_pages(self.plural, self.namespace, from_watch_cache=True)
        else:
            pages = self.kube.list_pages(self.plural, self.namespace)
        for items, page_version in pages:
            resource_version = page_version  # every page's: the snapshot the watch resumes from
            for item in items:
                item.setdefault("kind", self.kind)
                seen.add(object_key(item))
                self._apply("ADDED", item, quiet=quiet)
        with self.lock:
            vanished = [obj for key, obj in self.cache.items() if key not in seen]
        for obj in vanished:
            self._apply("DELETED", obj, synthesized=True, quiet=quiet)
        # Every object listed was handled (or given up on): a failure still counted is of one that was
        # gone before the list (its version was never cached), and no event of it will come again.
        self._failures.clear()
        self.resource_version = resource_version
        self.relists += 1
        self.list_problem = None
        self.synced.set()
        if first and self.after_first_list is not None:
            self.after_first_list()

    def _held_open(self, opened: float | None) -> bool:
        """Whether a watch opened at ``opened`` was held open (SHORT_WATCH_S or longer): the API server
        answered it, so what the back-off grew during an outage must not delay the next hiccup, whether
        the watch ended normally or in an error."""
        return opened is not None and self._monotonic() - opened >= SHORT_WATCH_S

    def run(self) -> None:
        backoff = 0.2  # errors and watches that end at once
        slow_list_backoff = 0.2  # 410s right after a list: kept across relists, which are their cause
        while not self.stop.is_set():
            received = 0
            listed = not self.resource_version
            # When the watch was opened (the request is sent on the first read, which returns only with
            # the first event: when it connected is not seen here). None: it never got that far.
            opened: float | None = None
            try:
                if listed:
                    self.relist()
                    backoff = 0.2  # the API server answers: whatever grew during an outage starts over
                opened = self._monotonic()
                for event in self.kube.watch_raw(
                    self.plural, self.namespace, self.resource_version, self.watch_timeout_s
                ):
                    if self.stop.is_set():
                        return
                    received += 1
                    obj = event.get("object") or {}
                    rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if event.get("type") == "BOOKMARK":
                        self.resource_version = rv or self.resource_version
                        backoff = 0.2  # the watch is open and the API server answers
                        continue
                    self._apply(str(event.get("type")), obj)
                    self.resource_version = rv or self.resource_version
                    backoff = slow_list_backoff = 0.2
                if self._held_open(opened):
                    # Held open (a quiet kind's watch ends at its timeout without an event): the API server
                    # answers, and what grew during an outage must not delay the next hiccup.
                    backoff = 0.2
                elif not received:
                    # client-go's "very short watch": something in the way (a proxy) answers and closes at
                    # once; reopening at once would spin.
                    log.warning(
                        "watch of %s ended at once without an event; retrying in %.1fs", self.plural, backoff
                    )
                    self.stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
            except Gone:
                self.resource_version = ""
                if received:
                    log.info("watch of %s expired (410 Gone); relisting", self.plural)
                else:
                    # Expired before a single event. Right after a list, the list took longer than the API
                    # server keeps a kind's history: listing the same way would only repeat that, so the
                    # next list is one answer from its watch cache. Either way, not back to back.
                    self.list_from_watch_cache = listed
                    if not listed:
                        # Resumed from a version the API server no longer keeps (e.g. after an outage):
                        # it answered, and a list is the way on, at once.
                        log.info("watch of %s expired (410 Gone) on resuming; relisting", self.plural)
                        continue
                    log.warning(
                        "watch of %s expired (410 Gone) before its first event: its list took longer than "
                        "the API server keeps history, so the next is from the API server's watch cache; "
                        "relisting in %.1fs",
                        self.plural,
                        slow_list_backoff,
                    )
                    self.stop.wait(slow_list_backoff)
                    slow_list_backoff = min(slow_list_backoff * 2, 30.0)
            except KubeAPIError as exc:
                if not self.synced.is_set():
                    self.list_problem = list_problem(self.plural, exc)
                if self._held_open(opened):
                    backoff = 0.2  # held open, then reset (a load balancer ending idle connections)
                log.warning("watch of %s failed: %s; retrying in %.1fs", self.plural, exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except Exception:  # noqa: BLE001 - a watcher thread must never die
                if self._held_open(opened):
                    backoff = 0.2
                log.exception("unexpected error watching %s; retrying in %.1fs", self.plural, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
