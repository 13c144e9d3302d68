"""A local HumanLayer-compatible API server for tests and local runs.

Implements the endpoints KubeChain uses, with HumanLayer's shapes (``FunctionCall`` / ``HumanContact``:
``{run_id, call_id, spec, status}``):

    GET  /humanlayer/v1/project
    POST /humanlayer/v1/function_calls            GET /humanlayer/v1/function_calls/{call_id}
    POST /humanlayer/v1/contact_requests          GET /humanlayer/v1/contact_requests/{call_id}
    POST /humanlayer/v1/agent/function_calls/{call_id}/respond     {approved, comment}
    POST /humanlayer/v1/agent/human_contacts/{call_id}/respond     {response}
    GET  /healthz

and an admin API (no auth) so tests can play the human and break things:

    GET  /_admin/state                                   every call, request counts
    POST /_admin/function_calls/{call_id}/respond        {approved, comment?, user?}
    POST /_admin/contact_requests/{call_id}/respond      {response, user?}
    POST /_admin/down                                    {mode: "503" | "drop" | "lose-answer" | "oversized" | null}
    POST /_admin/api_keys                                {keys: [...] | null}   (null: any key is valid)

In-process use (a thread)::

    with HumanLayerTestServer(api_keys={"hl-test"}) as hl:
        ...  # point HUMANLAYER_API_BASE at hl.url
        hl.approve(call_id, comment="ok")

As a process: ``python -m kubechain.humanlayer.testserver --port 8765 [--api-key KEY]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubechain.humanlayer.client import MAX_ANSWER_BYTES

PREFIX = "/humanlayer/v1"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class HumanLayerTestServer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_keys: Iterable[str] | None = None,
        project_id: str = "proj-kubechain-test",
    ) -> None:
        self.project_id = project_id
        self._lock = threading.RLock()
        self._api_keys: set[str] | None = set(api_keys) if api_keys is not None else None
        self._down: str | None = None
        self.function_calls: dict[str, dict[str, Any]] = {}
        self.contact_requests: dict[str, dict[str, Any]] = {}
        # (method, path) of every API request (admin requests excluded), and POSTs per call id
        self.requests: list[tuple[str, str]] = []
        self.posts: dict[str, int] = {}
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> HumanLayerTestServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="humanlayer-test",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> HumanLayerTestServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- what tests do -------------------------------------------------------------------------------

    def set_down(self, mode: str | bool | None) -> None:
        """``"503"`` (or True): answer every API request with 503; ``"drop"``: close the connection
        without an answer; ``"lose-answer"``: carry out each POST, then close the connection without its
        answer; ``"oversized"``: answer every API request with a JSON object over the client's
        MAX_ANSWER_BYTES; None/False: back to normal."""
        with self._lock:
            self._down = "503" if mode is True else (str(mode) if mode else None)

    def set_api_keys(self, keys: Iterable[str] | None) -> None:
        """Only these keys are valid (401 otherwise); None accepts any non-empty key."""
        with self._lock:
            self._api_keys = set(keys) if keys is not None else None

    def approve(self, call_id: str, comment: str = "", user: str = "approver@example.com") -> dict[str, Any]:
        return self.respond_to_function_call(call_id, True, comment, user)

    def reject(self, call_id: str, comment: str, user: str = "approver@example.com") -> dict[str, Any]:
        return self.respond_to_function_call(call_id, False, comment, user)

    def respond_to_function_call(
        self, call_id: str, approved: bool, comment: str = "", user: str = ""
    ) -> dict[str, Any]:
        with self._lock:
            call = self.function_calls[call_id]
            if call["status"].get("approved") is None:
                call["status"].update(
                    approved=approved,
                    comment=comment,
                    responded_at=_now(),
                    user_info={"email": user} if user else {},
                )
            return copy.deepcopy(call)

    def respond(self, call_id: str, response: str, user: str = "human@example.com") -> dict[str, Any]:
        """Answer a contact request (humans as tools)."""
        with self._lock:
            contact = self.contact_requests[call_id]
            if contact["status"].get("responded_at") is None:
                contact["status"].update(
                    response=response, responded_at=_now(), user_info={"email": user} if user else {}
                )
            return copy.deepcopy(contact)

    def function_call(self, call_id: str) -> dict[str, Any] | None:
        with self._lock:
            call = self.function_calls.get(call_id)
            return copy.deepcopy(call) if call else None

    def pending_function_calls(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(c) for c in self.function_calls.values() if c["status"].get("approved") is None
            ]

    def pending_contact_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(c)
                for c in self.contact_requests.values()
                if c["status"].get("responded_at") is None
            ]

    def request_count(self, method: str, path_prefix: str) -> int:
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(path_prefix))

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "function_calls": copy.deepcopy(list(self.function_calls.values())),
                "contact_requests": copy.deepcopy(list(self.contact_requests.values())),
                "posts": dict(self.posts),
                "requests": [list(r) for r in self.requests],
                "down": self._down,
            }

    # -- the API -------------------------------------------------------------------------------------

    def _handle(self, method: str, path: str, auth: str | None, body: Any) -> tuple[int, Any]:
        """(status, JSON payload); status 0 means: drop the connection."""
        path = path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/healthz":
            return 200, {"status": "ok"}
        if path.startswith("/_admin/"):
            return self._admin(method, path, body)
        with self._lock:
            lose_answer = self._down == "lose-answer" and method == "POST"
            if lose_answer:
                self._down = None
        if lose_answer:
            # The request lands; its answer never reaches the client (a timeout, a proxy reset).
            try:
                self._handle(method, path, auth, body)
            finally:
                with self._lock:
                    self._down = "lose-answer"
            return 0, None
        with self._lock:
            self.requests.append((method, path))
            if self._down == "drop":
                return 0, None
            if self._down == "oversized":
                return 200, {"padding": "x" * MAX_ANSWER_BYTES}
            if self._down:
                return 503, {"detail": "HumanLayer is down (test server)"}
            key = auth[len("Bearer ") :] if auth and auth.startswith("Bearer ") else ""
            if not key or (self._api_keys is not None and key not in self._api_keys):
                return 401, {"detail": "Invalid API key"}
            if not path.startswith(PREFIX + "/"):
                return 404, {"detail": "Not Found"}
            route = path[len(PREFIX) + 1 :].split("/")
            if method == "GET" and route == ["project"]:
                return 200, {
                    "id": self.project_id,
                    "name": "KubeChain test project",
                    "project_slug": "kubechain-test",
                    "org_slug": "test-org",
                }
            if route[0] in ("function_calls", "contact_requests"):
                store = self.function_calls if route[0] == "function_calls" else self.contact_requests
                if method == "POST" and len(route) == 1:
                    return self._create(route[0], store, body)
                if method == "GET" and len(route) == 2:
                    found = store.get(route[1])
                    return (
                        (200, copy.deepcopy(found))
                        if found
                        else (404, {"detail": f"call {route[1]} not found"})
                    )
            if method == "POST" and len(route) == 4 and route[0] == "agent" and route[3] == "respond":
                return self._respond(route[1], route[2], body)
        return 405, {"detail": f"{method} {path} not supported by the test server"}

    def _create(self, kind: str, store: dict[str, dict[str, Any]], body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            return 422, {"detail": "body must be a JSON object"}
        run_id, call_id, spec = body.get("run_id"), body.get("call_id"), body.get("spec")
        if not isinstance(run_id, str) or not run_id or not isinstance(call_id, str) or not call_id:
            return 422, {"detail": "run_id and call_id are required strings"}
        if len(run_id) + len(call_id) > 64:
            return 422, {"detail": "run_id + call_id must not exceed 64 characters"}
        if not isinstance(spec, dict):
            return 422, {"detail": "spec is required"}
        if kind == "function_calls" and (
            not isinstance(spec.get("fn"), str) or not isinstance(spec.get("kwargs", {}), dict)
        ):
            return 422, {"detail": "spec.fn (string) and spec.kwargs (object) are required"}
        if kind == "contact_requests" and not isinstance(spec.get("msg"), str):
            return 422, {"detail": "spec.msg (string) is required"}
        self.posts[call_id] = self.posts.get(call_id, 0) + 1
        existing = store.get(call_id)
        if existing is not None:
            if existing["run_id"] != run_id or existing["spec"] != spec:
                return 409, {"detail": f"call_id {call_id} already exists"}
            return 200, copy.deepcopy(existing)
        status: dict[str, Any] = {"requested_at": _now(), "responded_at": None, "user_info": None}
        if kind == "function_calls":
            status.update(approved=None, comment=None, reject_option_name=None)
        else:
            status.update(response=None, response_option_name=None)
        store[call_id] = {"run_id": run_id, "call_id": call_id, "spec": copy.deepcopy(spec), "status": status}
        return 200, copy.deepcopy(store[call_id])

    def _respond(self, kind: str, call_id: str, body: Any) -> tuple[int, Any]:
        body = body if isinstance(body, dict) else {}
        if kind == "function_calls" and call_id in self.function_calls:
            return 200, self.respond_to_function_call(
                call_id,
                bool(body.get("approved")),
                str(body.get("comment") or ""),
                str(body.get("user") or ""),
            )
        if kind in ("human_contacts", "contact_requests") and call_id in self.contact_requests:
            return 200, self.respond(call_id, str(body.get("response") or ""), str(body.get("user") or ""))
        return 404, {"detail": f"call {call_id} not found"}

    def _admin(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        body = body if isinstance(body, dict) else {}
        route = path.split("/")[2:]
        if method == "GET" and route == ["state"]:
            return 200, self.state()
        if method == "POST" and route == ["down"]:
            self.set_down(body.get("mode"))
            return 200, {"down": self._down}
        if method == "POST" and route == ["api_keys"]:
            self.set_api_keys(body.get("keys"))
            return 200, {"ok": True}
        if method == "POST" and len(route) == 3 and route[2] == "respond":
            with self._lock:
                return self._respond(route[0], route[1], body)
        return 404, {"detail": f"no admin route {method} {path}"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    self._send(400, {"detail": "invalid JSON"})
                    return
                status, payload = owner._handle(method, self.path, self.headers.get("Authorization"), body)
                if status == 0:
                    self.close_connection = True
                    return
                self._send(status, payload)

            def _send(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: an answer it refused ("oversized")

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def log_message(self, *_: object) -> None:
                pass

        return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A local HumanLayer-compatible API for tests and demos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--api-key", action="append", default=None, help="accepted API key (repeatable; default: any)"
    )
    args = parser.parse_args(argv)
    server = HumanLayerTestServer(args.host, args.port, api_keys=args.api_key)
    print(f"HumanLayer test API at {server.url} (admin: {server.url}/_admin/state)", flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._server.server_close()


if __name__ == "__main__":
    main()
