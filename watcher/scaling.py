"""``GET /scaling``: each worker queue's demand as JSON, for KEDA's metrics-api scaler."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)


def serve_scaling(port: int, answer: Callable[[], dict[str, Any] | None]) -> ThreadingHTTPServer | None:
    """Serve ``answer()`` at /scaling on ``port`` (0: not served) from a daemon thread. None from ``answer``
    (the queues' lengths are unknown: Redis does not answer) is a 503, so the scaler keeps the replicas it
    has (or its fallback) rather than reading 0 and scaling in."""
    if port <= 0:
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?", 1)[0] != "/scaling":
                self.send_error(404)
                return
            try:
                body = answer()
            except Exception:  # noqa: BLE001 - a scrape must not take the watcher down
                log.exception("computing /scaling failed")
                body = None
            if body is None:
                self.send_error(503, "queue lengths unknown (Redis does not answer)")
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            pass  # one line per scrape every few seconds would drown the watcher's log

    server = ThreadingHTTPServer(("", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="scaling", daemon=True).start()
    log.info("queue demand on :%d/scaling", port)
    return server
