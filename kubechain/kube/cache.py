"""A short-lived read cache for objects whose freshness does not matter for a decision (informer-style).

Workers build every LLM request from the Agent, LLM, Secret and Tools; reading them for every turn of
every run costs several API calls per turn, while a change to them may take a couple of seconds to apply.
The TaskRun and TaskRunToolCall being decided on are never read through this cache (a tool call's parent
run is, shared by the turn's sibling calls: what is read of it does not change, or is checked again).

An entry is let go of once its TTL is over, at the next read of any key: the cache holds what was read in
the last TTL (at most ``max_entries`` of it), not everything ever read (a parent run's context window is
up to 1 MiB).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from kubechain.kube.client import KubeClient
from kubechain.models import Resource

R = TypeVar("R", bound=Resource[Any, Any])
T = TypeVar("T")


class _Flight:
    """A read in progress: when it began, and what it brought once done."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.done = threading.Event()
        self.value: Any = None
        self.failed = False


class TTLReadCache:
    def __init__(
        self,
        kube: KubeClient,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
    ) -> None:
        self.kube = kube
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        # key -> (when its read started, the object), oldest first: what has expired is at the front
        self._entries: OrderedDict[tuple[str, ...], tuple[float, Any]] = OrderedDict()
        self._flights: dict[tuple[str, ...], _Flight] = {}  # the latest read begun of each key
        self._lock = threading.Lock()

    def _drop_expired(self, now: float) -> None:
        """Let go of the entries whose TTL is over (the lock is held). Amortized O(1) a read: each entry is
        dropped once. One whose read was slow may sit behind a younger one, for at most as long as it took."""
        while self._entries:
            stored_at, _ = next(iter(self._entries.values()))
            if now - stored_at < self.ttl_s:
                return
            self._entries.popitem(last=False)

    def now(self) -> float:
        """This cache's clock: what ``read_since`` is measured on."""
        return self._clock()

    def _fresh(self, key: tuple[str, ...], now: float, read_since: float | None) -> tuple[bool, Any]:
        self._drop_expired(now)
        entry = self._entries.get(key)
        if (
            entry is not None
            and now - entry[0] < self.ttl_s
            and (read_since is None or entry[0] >= read_since)
        ):
            return True, entry[1]
        return False, None

    def _store(self, key: tuple[str, ...], started: float, value: Any) -> None:
        """(The lock is held.) Stored at the back, in the order of its read; never over a copy whose read
        began later."""
        current = self._entries.get(key)
        if current is not None and current[0] > started:
            return
        self._entries.pop(key, None)
        self._entries[key] = (started, value)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _cached(
        self,
        key: tuple[str, ...],
        load: Callable[[], T],
        behind: Callable[[T], bool] | None = None,
        read_since: float | None = None,
    ) -> T:
        """Only objects that exist are cached: a "not found" is always re-read, because the usual next
        event is the object being created (and a stale absence would fail a run). Concurrent misses of
        one key share one read (fifty tool calls of one turn start at once and all need the same Tool):
        the one in flight is joined and its copy looked at first. A copy ``behind`` says is outdated is a
        miss too: read again, and stored in its place. With ``read_since``, only a copy whose read began
        then or later will do, and a read begun earlier is not waited for: a fan-out's calls reach this
        one after another, and each would wait out a read, then make one."""

        def usable(value: T) -> bool:
            return not (behind is not None and behind(value))

        with self._lock:
            hit, value = self._fresh(key, self._clock(), read_since)
            if hit and usable(value):
                return value  # type: ignore[no-any-return]
            flight = self._flights.get(key)
            joined = flight is not None and (read_since is None or flight.started >= read_since)
            if flight is None or not joined:
                flight = self._flights[key] = _Flight(self._clock())
        if joined:
            flight.done.wait()
            if not flight.failed and usable(flight.value):
                return flight.value  # type: ignore[no-any-return]
            # it failed (its error read as ours) or brought a copy behind: a read of our own
            with self._lock:
                flight = self._flights[key] = _Flight(self._clock())
        try:
            value = load()
            flight.value = value
            with self._lock:
                self._store(key, flight.started, value)
        except BaseException:
            flight.failed = True
            raise
        finally:
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]
            flight.done.set()
        return value

    def get(
        self,
        model: type[R],
        namespace: str,
        name: str,
        *,
        behind: Callable[[R], bool] | None = None,
        read_since: float | None = None,
    ) -> R:
        """The object, read up to ``ttl_s`` ago; ``behind``: whether a copy is known to be outdated (a
        newer version was seen elsewhere), then read now. What it reads is returned whatever ``behind``
        says of it: it can cost a read, never choose the content. ``read_since`` (a time of ``now``): only
        a read begun since then will do. A read from the API server is current when it begins, so such a
        copy holds every change made before ``read_since``, and callers asking before it began share it."""
        if self.ttl_s <= 0:
            return self.kube.get(model, namespace, name)
        key, load = (model.KIND, namespace, name), lambda: self.kube.get(model, namespace, name)
        return self._cached(key, load, behind, read_since)

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        if self.ttl_s <= 0:
            return self.kube.read_secret(namespace, name)
        return self._cached(("Secret", namespace, name), lambda: self.kube.read_secret(namespace, name))
