"""A hard deadline for an HTTP answer being read, which httpx's timeouts are not.

httpx (and the SDKs' httpx) time each read, not the whole answer: a server that sends a little just before
each read would time out holds the caller up to one more read timeout past its deadline. For a call made
under a claim (an LLM turn, a tool call) that is past the claim, and another worker makes the call again.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Mapping
from typing import Any


def shut_at(extensions: Mapping[str, Any], deadline: float) -> threading.Timer | None:
    """A timer that shuts down, at ``deadline`` (monotonic), the connection an httpx response (given by
    its ``extensions``) is read from: a read blocked on it returns at once, in whatever thread it waits.
    Cancel it when the answer was read. None if the connection's socket is not known."""
    stream = extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if not isinstance(sock, socket.socket):
        return None

    def shut() -> None:
        try:
            # the plain socket's: an SSLSocket's own would drop its TLS object under the reading thread
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: the request ended meanwhile

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), shut)
    timer.daemon = True
    timer.start()
    return timer
