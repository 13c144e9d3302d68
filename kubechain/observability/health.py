"""``/healthz`` for liveness probes: a process is alive while the loops that do its work turn, not merely
while the thread that serves ``/metrics`` answers (it keeps answering when everything else is stuck).
``/readyz`` for readiness (and for ``kubechain up``'s "KubeChain is up"): the same verdict, ``alive`` then
meaning ready, from a check of its own where a process is alive before it is ready (the watcher during its
first lists)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Health:
    alive: bool
    detail: str


HealthCheck = Callable[[], Health]

# A worker's consumer loop wakes at least every 10 s (Celery's timer cap) and beats every 5 s: a minute
# without a beat is a loop that is stuck, not one that is busy (tasks run on the pool's threads).
HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_STALE_AFTER_S = 60.0


class Heartbeat:
    """Beaten by a loop that should keep turning; stale when it has not been for ``stale_after_s``.

    ``pause`` says the loop is stopped for a reason outside the process (a worker reconnecting to its
    broker): restarting the process would not help, so it still counts as alive, with the reason shown."""

    def __init__(
        self, stale_after_s: float = HEARTBEAT_STALE_AFTER_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._paused: tuple[str, float] | None = None

    def beat(self) -> None:
        with self._lock:
            self._last = self._clock()
            self._paused = None

    def pause(self, why: str) -> None:
        with self._lock:
            if self._paused is None:
                self._paused = (why, self._clock())

    def health(self) -> Health:
        with self._lock:
            now = self._clock()
            if self._paused is not None:
                why, since = self._paused
                return Health(True, f"{why} (for {now - since:.0f}s)")
            if self._last is None:
                return Health(False, "starting: the loop has not turned yet")
            age = now - self._last
            if age > self.stale_after_s:
                return Health(False, f"stuck: the loop has not turned for {age:.0f}s")
            return Health(True, "ok")


def threads_health(threads: Callable[[], Iterable[threading.Thread]]) -> HealthCheck:
    """Alive while every one of ``threads()`` is: a loop thread that died (a bug) would leave its work
    undone for good while the process looks healthy."""

    def check() -> Health:
        dead = sorted(thread.name for thread in threads() if not thread.is_alive())
        if dead:
            return Health(False, f"thread(s) ended: {', '.join(dead)}")
        return Health(True, "ok")

    return check
