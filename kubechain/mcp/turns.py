"""Turns: at most ``limit`` holders at once in a process, the others waiting in the order they came.

A checks worker validates a stdio MCPServer by starting it (a child process: mcp-server-time takes 68 MiB,
npx's server-everything 160 MiB with npm's own process), listing its tools and stopping it. Each of its
threads could start one at once, past what its pod holds; each validation of a stdio server now takes a
turn (KUBECHAIN_MCP_MAX_STDIO_CHECKS) for as long as its server runs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Turns:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a limit of {limit} would let nothing run")
        self.limit = limit
        self._condition = threading.Condition()
        self._running = 0
        self._line: deque[object] = deque()  # the waiters, first come first
        # Waiters telling that they wait (a status write): their place is kept, the others may pass them.
        self._away: set[object] = set()

    @property
    def running(self) -> int:
        with self._condition:
            return self._running

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._line)

    @contextmanager
    def turn(self, on_wait: Callable[[], None] | None = None, notice_after_s: float = 0.0) -> Iterator[None]:
        """The block, in this thread's turn. ``on_wait()``: called once, on this thread and holding no turn,
        when none came within ``notice_after_s``; what it raises gives up the place in line."""
        me = object()
        with self._condition:
            self._line.append(me)
            came = self._condition.wait_for(lambda: self._next(me), notice_after_s)
            if came:
                self._take(me)
        if not came:
            try:
                if on_wait is not None:
                    with self._condition:
                        self._away.add(me)
                    try:
                        on_wait()
                    finally:
                        with self._condition:
                            self._away.discard(me)
                with self._condition:
                    self._condition.wait_for(lambda: self._next(me))
                    self._take(me)
            except BaseException:
                with self._condition:
                    if me in self._line:
                        self._line.remove(me)
                        self._condition.notify_all()  # one behind may be next now
                raise
        try:
            yield
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify_all()

    def _next(self, me: object) -> bool:
        """Whether ``me`` may take a turn: one is free for each waiter before it that is not away."""
        free = self.limit - self._running
        for waiter in self._line:
            if free <= 0:
                return False
            if waiter is me:
                return True
            if waiter not in self._away:
                free -= 1
        return False

    def _take(self, me: object) -> None:
        self._line.remove(me)
        self._running += 1
        self._condition.notify_all()  # a turn still free goes to the next in line
