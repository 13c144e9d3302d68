"""Peers that hold an HTTP client up, for deadline tests: a server that trickles its headers and never ends
them, a resolver that does not answer for one name, a TLS server that records the name a client asks
for (SNI), an https:// proxy that trickles the TLS handshake of the tunnel it opens, and a server that
reads what it is sent a little at a time."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.unit.loopback import LoopbackServer, read_head


class HeaderTricklingServer(LoopbackServer):
    """Answers each request with a status line, then one byte of a header every ``interval_s`` (each well
    under any read timeout), for up to a minute: the headers never end. ``heads``: each request's head (its
    request line and headers) as received; ``hung_up`` is set once a client closed its connection
    mid-trickle. A context manager."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.heads: list[bytes] = []
        self.hung_up = threading.Event()
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            head = read_head(connection)
            if head is None:
                return
            self.heads.append(head)
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(int(60 / self.interval_s)):
                    connection.sendall(b"a")
                    time.sleep(self.interval_s)
            except OSError:
                self.hung_up.set()


class HangingResolver:
    """``socket.getaddrinfo`` patched: ``hanging`` (a name) blocks until ``release()`` (then fails as a
    resolver that gave up does), each name of ``addresses`` resolves to its addresses, in order, anything
    else as before. ``asked``: the names asked for, in order; ``unanswered``: how many resolutions of
    ``hanging`` are blocked now. A context manager that releases the hang on exit, so that no resolution
    is left blocked after its test."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, hanging: str, addresses: dict[str, list[str]] | None = None
    ) -> None:
        self.asked: list[str] = []
        self.unanswered = 0
        self._released = threading.Event()
        self._lock = threading.Lock()
        real: Callable[..., Any] = socket.getaddrinfo

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            name = host.decode() if isinstance(host, bytes) else host
            if name == hanging:
                with self._lock:
                    self.asked.append(name)
                    self.unanswered += 1
                try:
                    self._released.wait()
                finally:
                    with self._lock:
                        self.unanswered -= 1
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            if addresses and name in addresses:
                self.asked.append(name)
                return [info for address in addresses[name] for info in real(address, port, *args, **kwargs)]
            return real(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> HangingResolver:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class SNIRecordingServer(LoopbackServer):
    """A TLS server (a certificate of a CA no client trusts) that records the server name each client asks
    for in its handshake (``names``) and then ends the connection. A context manager."""

    def __init__(self, pki: Path) -> None:
        from kubechain.testing.controlplane import _write_pki

        _write_pki(pki)
        self.names: list[str | None] = []
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(pki / "apiserver.crt", pki / "apiserver.key")
        self._context.sni_callback = self._record_name  # type: ignore[assignment]
        super().__init__()

    def _record_name(self, _sock: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        self.names.append(name)

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(30)
            try:
                self._context.wrap_socket(connection, server_side=True).close()
            except OSError:
                pass  # the client refused the certificate: the name was recorded before


class TLSTricklingProxy(LoopbackServer):
    """An https:// proxy (TLS with its client, under a certificate of the CA written to ``pki`` as
    ``ca.crt``, for 127.0.0.1) that opens the tunnel a CONNECT asks for, and then plays the tunnelled
    server's part of the TLS handshake a byte every ``interval_s``, for up to a minute: the header of a
    16 KiB handshake record, then its content, which never ends. ``targets``: each CONNECT's host:port;
    ``hung_up`` is set once a client closed its connection mid-trickle. A context manager."""

    def __init__(self, pki: Path, interval_s: float = 0.1) -> None:
        from kubechain.testing.controlplane import _write_pki

        _write_pki(pki)
        self.ca = pki / "ca.crt"
        self.interval_s = interval_s
        self.targets: list[str] = []
        self.hung_up = threading.Event()
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(pki / "apiserver.crt", pki / "apiserver.key")
        super().__init__()
        self.url = f"https://127.0.0.1:{self.port}"

    def _serve(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(30)
            with self._context.wrap_socket(connection, server_side=True) as client:
                head = read_head(client)
                if head is None:
                    return
                self.targets.append(head.split(b" ", 2)[1].decode())
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                client.recv(65536)  # the tunnelled ClientHello
                record = b"\x16\x03\x03\x40\x00" + bytes(16384)  # a handshake record, 16 KiB
                for offset in range(min(len(record), int(60 / self.interval_s))):
                    client.sendall(record[offset : offset + 1])
                    time.sleep(self.interval_s)
        except OSError:
            self.hung_up.set()


class SlowReadingServer(LoopbackServer):
    """Accepts connections with a receive buffer of a few KiB and reads from each ``piece`` bytes every
    ``interval_s`` (each read well under any write timeout), for up to a minute: a client writing more
    than its buffers hold waits on it send after send. ``received``: the bytes read in all. A context
    manager."""

    def __init__(self, piece: int = 4096, interval_s: float = 0.2) -> None:
        self.piece = piece
        self.interval_s = interval_s
        self.received = 0
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # taken on by each connection
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        super().__init__(listener)

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            for _ in range(int(60 / self.interval_s)):
                try:
                    data = connection.recv(self.piece)
                except OSError:
                    return
                if not data:
                    return
                self.received += len(data)
                time.sleep(self.interval_s)
