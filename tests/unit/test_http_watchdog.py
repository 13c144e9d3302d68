"""The deadline backend and streams of http_watchdog, below any client: what each does at the deadline."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any

import httpcore
import pytest

from kubechain.http_watchdog import _HTTPCORE_ERRORS, _DeadlineBackend, _DeadlineStream, io_ending_by


class RecordingStream:
    """An httpcore NetworkStream that records whether it was closed and never touches a network."""

    def __init__(self) -> None:
        self.closed = False
        self.tls_started = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return b""

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> RecordingStream:
        self.tls_started = True
        return self

    def get_extra_info(self, info: str) -> Any:
        return None


def test_a_connection_whose_deadline_passed_before_its_tls_handshake_is_closed() -> None:
    """httpcore closes a connection whose handshake fails in its stream's start_tls, not in the caller:
    the deadline's timeout, raised before the handshake, left the connected socket open (until the
    garbage collector found it, the exception chain that held it gone)."""
    inner = RecordingStream()
    stream = _DeadlineStream(inner, _HTTPCORE_ERRORS)
    with io_ending_by(time.monotonic() - 1), pytest.raises(httpcore.ConnectTimeout, match="deadline"):
        stream.start_tls(ssl.create_default_context(), "llm.test", 30)
    assert not inner.tls_started
    assert inner.closed


def test_watches_cancelled_before_their_deadline_are_not_kept_until_it() -> None:
    """Every wait of every request is watched, most for far less than their deadline (a claim's minutes):
    the cancelled ones must not pile up in the shutter's heap until they are due."""
    from kubechain.http_watchdog import _shutter

    ours, theirs = socket.socketpair()
    with ours, theirs:
        far = time.monotonic() + 3600
        for _ in range(10_000):
            assert _shutter.watch(ours, far).cancel() is False
        assert len(_shutter._due) <= 200, len(_shutter._due)


@pytest.mark.slow
def test_a_write_to_a_peer_that_reads_slowly_ends_at_the_deadline() -> None:
    """httpcore writes a buffer send after send, each given the whole timeout: a peer reading a few KiB
    before each would time out (an API, an LLM endpoint or a proxy taking a large request slowly) held
    the write, and the call, past its deadline."""
    from tests.unit.slow_peers import SlowReadingServer

    backend = _DeadlineBackend(httpcore.SyncBackend(), _HTTPCORE_ERRORS)
    small_send_buffer = [(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)]  # a buffer the peer fills at once
    outcome: list[BaseException | None] = []
    with SlowReadingServer() as server:
        deadline = time.monotonic() + 1.0

        def write() -> None:
            with io_ending_by(deadline):
                stream = backend.connect_tcp("127.0.0.1", server.port, 30, socket_options=small_send_buffer)
                try:
                    stream.write(bytes(1024 * 1024), 30)  # some fifty seconds' reading
                    outcome.append(None)
                except httpcore.WriteTimeout as exc:
                    outcome.append(exc)
                finally:
                    stream.close()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(timeout=max(0.0, deadline + 10 - time.monotonic()))  # a bound on a hang, not a target
        assert not writer.is_alive(), "the write was still running 10s past its deadline"
    (error,) = outcome
    assert isinstance(error, httpcore.WriteTimeout), error
    assert 0 < server.received < 1024 * 1024


def test_a_deadline_too_far_for_a_timed_wait_leaves_the_shutter_working() -> None:
    """A deadline past what a lock can wait for (threading.TIMEOUT_MAX, some 292 years: a timeout setting
    of 1e10 s) was an OverflowError in the shutter's thread once it was the next one due: the thread
    ended, and no socket was shut down at its deadline after that, in the whole process."""
    from kubechain.http_watchdog import _Shutter
    from kubechain.testing.waiting import wait_for

    shutter = _Shutter()  # its own thread: the process's may wait for another test's watch
    far_ours, far_theirs = socket.socketpair()
    first_ours, first_theirs = socket.socketpair()
    then_ours, then_theirs = socket.socketpair()
    with far_ours, far_theirs, first_ours, first_theirs, then_ours, then_theirs:
        shutter.watch(far_ours, time.monotonic() + 1e10)
        first = shutter.watch(first_ours, time.monotonic() + 0.05)
        wait_for(lambda: first.fired, timeout_s=30, what="the first deadline")
        # the far one is the next due now
        then = shutter.watch(then_ours, time.monotonic() + 0.05)
        wait_for(lambda: then.fired, timeout_s=10, what="a deadline after the far one was the next due")
        then_ours.settimeout(10)
        assert then_ours.recv(10) == b"", "shut down"
