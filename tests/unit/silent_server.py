"""A TCP server for tests that accepts connections and never answers (a peer gone behind a NAT, a hung
server), keeping each connection it accepted."""

from __future__ import annotations

import socket
import threading


class SilentServer:
    """``held``: every connection accepted so far, in order."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()
