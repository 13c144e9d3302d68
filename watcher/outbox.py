"""The watcher's queue of work waiting to be sent to Celery, merged by key like client-go's workqueue.

While Redis is down the sender cannot drain it, and every resync and watch event would otherwise add one
more copy of the same work: the queue grew with each tick and flooded Redis when it came back. Here a key
that is already waiting is not queued again; its item is replaced, so the latest state is what gets sent.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class Empty(Exception):
    pass


class MergingQueue(Generic[Item]):
    """FIFO by the time a key was first queued; at most one waiting item per key."""

    def __init__(self) -> None:
        self._order: deque[Hashable] = deque()
        self._items: dict[Hashable, Item] = {}
        self._ready = threading.Condition()

    def put(self, key: Hashable, item: Item) -> bool:
        """Queue ``item`` under ``key``; False if the key was already waiting (its item is replaced)."""
        with self._ready:
            waiting = key in self._items
            self._items[key] = item
            if waiting:
                return False
            self._order.append(key)
            self._ready.notify()
            return True

    def get(self, timeout: float | None = None) -> Item:
        """The oldest waiting item; Empty after ``timeout`` seconds without one."""
        with self._ready:
            if not self._ready.wait_for(lambda: bool(self._order), timeout):
                raise Empty
            return self._items.pop(self._order.popleft())

    def get_nowait(self) -> Item:
        return self.get(timeout=0)

    def empty(self) -> bool:
        with self._ready:
            return not self._order

    def qsize(self) -> int:
        with self._ready:
            return len(self._order)
