"""Peers that hold an HTTP client up, for deadline tests: a server that trickles its headers and never ends
them."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType


class HeaderTricklingServer:
    """Answers each request with a status line, then one byte of a header every ``interval_s`` (each well
    under any read timeout), for up to a minute: the headers never end. ``heads``: each request's head (its
    request line and headers) as received; ``hung_up`` is set once a client closed its connection
    mid-trickle. A context manager."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.heads: list[bytes] = []
        self.hung_up = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket) -> None:
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                head += chunk
            self.heads.append(head.split(b"\r\n\r\n", 1)[0])
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(int(60 / self.interval_s)):
                    connection.sendall(b"a")
                    time.sleep(self.interval_s)
            except OSError:
                self.hung_up.set()

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> HeaderTricklingServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
