"""A short-lived read cache for objects whose freshness does not matter for a decision (informer-style).

Workers build every LLM request from the Agent, LLM, Secret and Tools; reading them for every turn of
every run costs several API calls per turn, while a change to them may take a couple of seconds to apply.
The TaskRun and TaskRunToolCall being decided on are never read through this cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kubechain.kube.client import KubeClient
from kubechain.models import Resource

R = TypeVar("R", bound=Resource[Any, Any])
T = TypeVar("T")


class TTLReadCache:
    def __init__(self, kube: KubeClient, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[tuple[str, ...], tuple[float, Any]] = {}
        self._loading: dict[tuple[str, ...], threading.Lock] = {}
        self._lock = threading.Lock()

    def _fresh(self, key: tuple[str, ...], now: float) -> tuple[bool, Any]:
        entry = self._entries.get(key)
        if entry is not None and now - entry[0] < self.ttl_s:
            return True, entry[1]
        return False, None

    def _cached(self, key: tuple[str, ...], load: Callable[[], T]) -> T:
        """Only objects that exist are cached: a "not found" is always re-read, because the usual next
        event is the object being created (and a stale absence would fail a run). Concurrent misses of
        one key make one read (fifty tool calls of one turn start at once and all need the same Tool)."""
        with self._lock:
            hit, value = self._fresh(key, self._clock())
            if hit:
                return value  # type: ignore[no-any-return]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                hit, value = self._fresh(key, self._clock())
            if hit:
                return value  # type: ignore[no-any-return]
            started = self._clock()
            try:
                value = load()
            except BaseException:
                with self._lock:
                    self._loading.pop(key, None)
                raise
            with self._lock:
                self._entries[key] = (started, value)
                self._loading.pop(key, None)
                if len(self._entries) > 10_000:
                    self._entries = {k: v for k, v in self._entries.items() if started - v[0] < self.ttl_s}
            return value

    def get(self, model: type[R], namespace: str, name: str) -> R:
        if self.ttl_s <= 0:
            return self.kube.get(model, namespace, name)
        return self._cached((model.KIND, namespace, name), lambda: self.kube.get(model, namespace, name))

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        if self.ttl_s <= 0:
            return self.kube.read_secret(namespace, name)
        return self._cached(("Secret", namespace, name), lambda: self.kube.read_secret(namespace, name))
