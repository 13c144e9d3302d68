"""Interrupting a start as `up` does (its SIGTERM handler raises Terminated, a KeyboardInterrupt, in the main
thread; Ctrl-C raises KeyboardInterrupt there), and telling whether the processes it ran are gone."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path


class Interrupted(KeyboardInterrupt):
    """What `up`'s SIGTERM handler raises while it starts (Terminated), or Ctrl-C."""


@contextlib.contextmanager
def interrupted_once(ready: Path) -> Iterator[None]:
    """Within: a signal handler raises Interrupted in the main thread once ``ready`` exists (a child
    writes it once it has started what it starts), as `up`'s SIGTERM handler raises Terminated."""
    armed = [ready]

    def handler(*_: object) -> None:
        if armed and armed[0].exists():
            armed.clear()
            raise Interrupted

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, left for an init that does not reap, has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def a_child_and_grandchild(pids: Path, then: str = "wait") -> str:
    """A shell script (``sh -c``) that writes its pid to ``pids``/child.pid, starts a grandchild that
    ignores SIGTERM (as a busy compiler or dpkg may not end on it at once), writes that one's pid to
    ``pids``/grandchild.pid, and runs ``then``."""
    return (
        f'echo $$ > "{pids}/child.pid"\n'
        "(trap '' TERM; exec sleep 60) &\n"
        f'echo $! > "{pids}/grandchild.pid.tmp" && mv "{pids}/grandchild.pid.tmp" "{pids}/grandchild.pid"\n'
        f"{then}\n"
    )


def survivors(pids: Path, within_s: float = 2.0) -> list[int]:
    """The processes of :func:`a_child_and_grandchild` still running ``within_s`` from now (a process sent
    SIGKILL ends when the kernel next schedules it, not when kill() returns)."""
    found = [int((pids / f"{name}.pid").read_text()) for name in ("child", "grandchild")]
    deadline = time.monotonic() + within_s
    while (running := [pid for pid in found if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running
