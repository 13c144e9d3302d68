"""The deadline backend and streams of http_watchdog, below any client: what each does at the deadline."""

from __future__ import annotations

import ssl
import time
from typing import Any

import httpcore
import pytest

from kubechain.http_watchdog import _HTTPCORE_ERRORS, _DeadlineStream, io_ending_by


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
