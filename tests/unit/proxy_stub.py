"""A forward proxy for tests that speaks only CONNECT (as HTTPS clients use one) and remembers each target."""

from __future__ import annotations

import base64
import socket
import threading

from tests.unit.loopback import LoopbackServer, read_head


class ConnectProxy(LoopbackServer):
    """``targets``: the host:port of every CONNECT, in order. With ``credentials`` ("user:password") it
    answers 407 to a CONNECT without them. A context manager."""

    def __init__(self, credentials: str | None = None) -> None:
        self.targets: list[str] = []
        self.refused = 0
        self._authorization = (
            "Basic " + base64.b64encode(credentials.encode()).decode() if credentials is not None else None
        )
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = read_head(client)
            if head is None:
                return
            request_line, *header_lines = head.decode().split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            if self._authorization is not None and headers.get("proxy-authorization") != self._authorization:
                self.refused += 1
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                return
            self.targets.append(target)
            host, port = target.rsplit(":", 1)
            with socket.create_connection((host, int(port))) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
                _pipe(client, upstream)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
