"""An HTTPS proxy in front of a local control plane's API server that answers LLM claim writes late, as a
loaded API server does: the condition under which a worker acts on a claim with little of it left."""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import urllib3
import yaml

from kubechain.testing.controlplane import LocalControlPlane
from tests.unit.loopback import LoopbackServer

# A TaskRun's status written (the kube client PUTs the whole status) with the phase of an LLM call: a
# claim of that call (taken, handed off with its turn, or stamped afresh).
_TASKRUN_STATUS = re.compile(
    r"^/apis/kubechain\.humanlayer\.dev/v1alpha1/namespaces/[^/]+/taskruns/[^/]+/status"
)
_CLAIM_PHASE = "SendContextWindowToLLM"
# Said by each side about its own connection, not passed on.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "upgrade"}


class LateClaimsProxy(LoopbackServer):
    """Serves HTTPS with the API server's own certificate (so a kubeconfig needs only its port changed)
    and passes each request on to the API server at once; the answer to a TaskRun's LLM claim write is
    held ``lag_s`` before it is sent back (0: none). While the API server
    is down a new connection is closed before its TLS handshake, and a request on an open one closes it:
    as the API server itself would. For clients that send a body with Content-Length and never watch (the
    workers). A context manager."""

    def __init__(self, control_plane: LocalControlPlane) -> None:
        pki = control_plane.workdir / "pki"
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(pki / "apiserver.crt", pki / "apiserver.key")
        server = urlsplit(control_plane.server_url)
        assert server.hostname is not None and server.port is not None
        self._upstream_address = (server.hostname, server.port)
        self._upstream = urllib3.HTTPSConnectionPool(
            server.hostname,
            server.port,
            ca_certs=str(control_plane.ca_path),
            maxsize=64,
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
            retries=False,
        )
        self.lag_s = 0.0
        super().__init__()

    def kubeconfig(self, kubeconfig: Path, written: Path) -> Path:
        """``kubeconfig`` (the control plane's) with its server reached through this proxy, written to
        ``written``."""
        config = yaml.safe_load(kubeconfig.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        written.write_text(yaml.safe_dump(config, sort_keys=False))
        written.chmod(0o600)
        return written

    def _serve(self, connection: socket.socket) -> None:
        try:
            socket.create_connection(self._upstream_address, timeout=5).close()
            tls = self._tls.wrap_socket(connection, server_side=True)
        except OSError:  # the API server is down (or the client left mid-handshake): refused, as it would be
            connection.close()
            return
        with tls, tls.makefile("rb") as reader:
            while (request := _read_request(reader)) is not None:
                method, target, headers, body = request
                try:
                    answer = self._upstream.urlopen(
                        method, target, body=body, headers=headers, decode_content=False, redirect=False
                    )
                except urllib3.exceptions.HTTPError:
                    return  # the API server went away: so does this connection
                if self.lag_s > 0 and self._is_claim(method, target, body):
                    time.sleep(self.lag_s)
                kept = [(k, v) for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP]
                head = [f"HTTP/1.1 {answer.status} {answer.reason or ''}", *(f"{k}: {v}" for k, v in kept)]
                head.append(f"Content-Length: {len(answer.data)}")
                try:
                    tls.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + answer.data)
                except OSError:
                    return

    @staticmethod
    def _is_claim(method: str, target: str, body: bytes | None) -> bool:
        if method not in ("PUT", "PATCH") or not body or not _TASKRUN_STATUS.match(target):
            return False
        status = json.loads(body).get("status") or {}
        return bool(status.get("phase") == _CLAIM_PHASE and status.get("claimedBy"))

    def close(self) -> None:
        super().close()
        self._upstream.close()


def _read_request(reader: BinaryIO) -> tuple[str, str, dict[str, str], bytes | None] | None:
    """The next request on a connection (method, target, headers, body), None once the client closed it."""
    try:
        line = reader.readline()
        if not line.strip():
            return None
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (header := reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = header.decode("latin-1").partition(":")
            headers[name.strip()] = value.strip()
        length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
        body = reader.read(length) if length else None
    except (OSError, ValueError):
        return None
    kept = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
    return method, target, kept, body
