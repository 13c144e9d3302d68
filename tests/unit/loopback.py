"""The scaffolding the tests' hand-made network peers share: a TCP server on 127.0.0.1 serving each
connection on a thread of its own until it is closed."""

from __future__ import annotations

import socket
import threading
from types import TracebackType
from typing import Self


class LoopbackServer:
    """Accepts connections on ``listener`` (default: a fresh one on 127.0.0.1) and hands each to
    ``_serve`` on a thread of its own. ``port``: where it listens. A context manager that closes it.
    Subclasses set what ``_serve`` uses before calling ``__init__``, which starts accepting."""

    def __init__(self, listener: socket.socket | None = None) -> None:
        self._listener = listener if listener is not None else socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_head(connection: socket.socket) -> bytes | None:
    """A request's head (its request line and headers, without the blank line that ends them) read from
    ``connection``; None if the client closed it first. What came after the head is dropped."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        head += chunk
    return head.split(b"\r\n\r\n", 1)[0]
