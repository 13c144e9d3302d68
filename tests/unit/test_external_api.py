"""externalAPI tools: one deadline for the whole request, body included."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from kubechain.tools.builtin import ToolError
from kubechain.tools.external_api import call_external_api
from tests.unit.http_stub import StubAnswer, StubHTTPServer
from tests.unit.loopback import LoopbackServer
from tests.unit.slow_peers import HeaderTricklingServer
from tests.unit.test_redaction import counting_secret_forms


def serve(handler: type[BaseHTTPRequestHandler], path: str) -> tuple[ThreadingHTTPServer, str]:
    """``handler`` on a local port, in the background; the server and the URL of ``path`` on it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}{path}"


class TricklingServer:
    """Sends its headers at once, then one byte of body every 0.1 s, for as long as anyone reads."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    for _ in range(100_000):
                        self.wfile.write(b".")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    return

            def log_message(self, *_: object) -> None:
                pass

        self.server, self.url = serve(Handler, "/slow")


def calling_in_a_thread(url: str) -> tuple[threading.Thread, list[BaseException | str]]:
    """A POST to ``url`` with a 1 s timeout, on a thread of its own: its result or ToolError, once ended."""
    outcome: list[BaseException | str] = []

    def call() -> None:
        try:
            outcome.append(call_external_api(url, "POST", {}, None, timeout_s=1.0))
        except ToolError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.slow
def test_a_body_that_trickles_in_times_out_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx's timeout bounds each read; a trickle never trips it, so the deadline must."""
    import kubechain.tools.external_api as external_api

    watchdogs: list[object] = []
    real_shut_at = external_api.shut_at

    def spied(extensions: Any, deadline: float) -> object:
        watchdog = real_shut_at(extensions, deadline)
        watchdogs.append(watchdog)
        return watchdog

    monkeypatch.setattr(external_api, "shut_at", spied)
    server = TricklingServer()
    thread, outcome = calling_in_a_thread(server.url)
    thread.join(timeout=60)  # a bound on a hang, not a speed target
    server.server.shutdown()
    assert not thread.is_alive(), "the call outlived its timeout by a minute"
    (error,) = outcome
    assert isinstance(error, ToolError) and "timed out after 1s" in str(error)
    assert len(watchdogs) == 1 and watchdogs[0] is not None, "the connection's socket was found"


@pytest.mark.slow
def test_headers_that_trickle_in_time_out_at_the_deadline_and_the_connection_is_closed() -> None:
    """httpx's timeout bounds each read of the headers too: a server sending one byte of them before each
    read would time out held the call past its claim (another worker then calls the API again)."""
    from kubechain.testing.waiting import wait_for

    with HeaderTricklingServer() as server:
        thread, outcome = calling_in_a_thread(f"{server.url}/slow")
        wait_for(lambda: not thread.is_alive(), timeout_s=30, what="the call to end")
        (error,) = outcome
        assert isinstance(error, ToolError) and "timed out after 1s" in str(error), error
        wait_for(server.hung_up.is_set, timeout_s=30, what="the server to see the connection closed")


@pytest.mark.slow
def test_a_resolver_that_does_not_answer_times_the_call_out_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """getaddrinfo blocks in C, deaf to socket timeouts: a resolver that hangs held the tool call past its
    claim (another worker then calls the API again). The resolution left behind ends when the resolver
    answers at last."""
    from kubechain.testing.waiting import wait_for
    from tests.unit.slow_peers import HangingResolver

    with HangingResolver(monkeypatch, "api.hangs.test") as resolver:
        deadline = time.monotonic() + 1.0
        thread, outcome = calling_in_a_thread("http://api.hangs.test/hook")
        thread.join(timeout=max(0.0, deadline + 10 - time.monotonic()))  # a bound on a hang, not a target
        assert not thread.is_alive(), "the call was still running 10s past its deadline"
        (error,) = outcome
        assert isinstance(error, ToolError) and "timed out after 1s" in str(error), error
        resolver.release()
        wait_for(lambda: resolver.unanswered == 0, timeout_s=30, what="the resolution left behind to end")


def test_the_host_header_and_tls_keep_the_apis_name_though_its_address_is_resolved_apart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The connection is made to the address the name resolved to; the request and the TLS handshake
    (SNI) still name the host."""
    from tests.unit.slow_peers import HangingResolver, SNIRecordingServer

    server = RecordingServer(200)
    port = server.server.server_address[1]
    try:
        with HangingResolver(monkeypatch, "unused.test", {"api.local.test": ["127.0.0.1"]}):
            assert call_external_api(f"http://api.local.test:{port}/x", "GET", {}, None, 10.0) == "ok"
            with SNIRecordingServer(tmp_path) as tls, pytest.raises(ToolError, match="CERTIFICATE_VERIFY"):
                call_external_api(f"https://api.local.test:{tls.port}/x", "GET", {}, None, 10.0)
    finally:
        server.server.shutdown()
    assert server.hosts == [f"api.local.test:{port}"]
    assert tls.names == ["api.local.test"]


def test_a_name_that_resolves_to_no_address_is_a_tool_error_that_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resolver answering no address at all (getaddrinfo's contract says it raises instead, but an NSS
    module may not keep it) failed on an assert: an AssertionError (under python -O, a TypeError for
    raising None) instead of a tool error saying what happened."""
    from tests.unit.slow_peers import HangingResolver

    with (
        HangingResolver(monkeypatch, "unused.test", {"api.nowhere.test": []}),
        pytest.raises(ToolError) as raised,
    ):
        call_external_api("http://api.nowhere.test/x", "POST", {}, None, timeout_s=10.0)
    assert str(raised.value) == (
        "POST http://api.nowhere.test/x failed: ConnectError: api.nowhere.test resolved to no address"
    )


@pytest.mark.parametrize(
    "host", ["a" * 64 + ".example", "api..example"], ids=["label-too-long", "empty-label"]
)
def test_a_host_name_that_cannot_be_resolved_as_written_is_a_tool_error_that_says_so(host: str) -> None:
    """getaddrinfo refuses a name with a label over 63 characters or an empty one with a UnicodeError (its
    IDNA encoding), no OSError: it escaped the call as a surprise, logged with its traceback, and the
    tool call said "failed unexpectedly"."""
    with pytest.raises(ToolError) as raised:
        call_external_api(f"http://{host}/x", "POST", {}, None, timeout_s=10.0)
    said = str(raised.value)
    assert said.startswith(f"POST http://{host}/x failed: ConnectError: {host} is not a valid host name: "), (
        said
    )
    assert "label empty or too long" in said, said


def test_the_deadline_covers_the_connections_made_through_a_proxy_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx builds a transport of its own for each proxy the environment names: each must make its
    connections under the request's deadline, as the default one does."""
    from kubechain.http_watchdog import _DeadlineBackend, end_io_by_deadline

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    client = end_io_by_deadline(httpx.Client())
    transports = [client._transport, *(t for t in client._mounts.values() if t is not None)]
    assert len(transports) == 2
    for transport in transports:
        assert isinstance(transport._pool._network_backend, _DeadlineBackend)  # type: ignore[attr-defined]


@pytest.mark.parametrize("own_timeout_s", [60.0, None], ids=["cut-short-by-its-claim", "its-own-timeout"])
def test_a_call_its_claim_cut_short_says_so_and_names_the_tools_own_timeout(
    own_timeout_s: float | None,
) -> None:
    """A call under a claim written late gets only the claim's time left (here 0.2 s of the tool's 60 s):
    its timeout must not read as the API's slowness, nor as the tool's own timeout."""
    from tests.unit.silent_server import SilentServer

    silent = SilentServer()
    try:
        with pytest.raises(ToolError) as timed_out:
            call_external_api(
                f"http://127.0.0.1:{silent.port}/hook", "POST", {}, None, 0.2, own_timeout_s=own_timeout_s
            )
    finally:
        silent.close()
    cut = "(cut short to end within its claim; the tool's own timeout is 60s)"
    assert "timed out after 0s" in str(timed_out.value)
    assert (cut in str(timed_out.value)) == (own_timeout_s is not None), str(timed_out.value)


def test_a_response_is_cut_at_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubechain.tools.external_api as external_api

    monkeypatch.setattr(external_api, "MAX_RESPONSE_BYTES", 5)
    server = TricklingServer()
    try:
        assert call_external_api(server.url, "POST", {}, None, timeout_s=30.0) == "....."
    finally:
        server.server.shutdown()


def test_the_watchdog_ends_a_read_blocked_past_the_deadline() -> None:
    """The check after each chunk cannot end a read that blocks: a server sending a byte just before each
    read would time out held the call up to one more read timeout past its deadline, past its claim."""
    import socket

    from kubechain.http_watchdog import shut_at
    from kubechain.testing.waiting import wait_for

    ours, theirs = socket.socketpair()

    class Stream:
        def get_extra_info(self, name: str) -> object:
            return ours if name == "socket" else None

    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(ours.recv(10)), daemon=True)
    reader.start()
    watchdog = shut_at({"network_stream": Stream()}, time.monotonic() + 0.05)
    assert watchdog is not None
    wait_for(lambda: not reader.is_alive(), timeout_s=30, what="the blocked read to end")
    assert read == [b""], "shut down under the reader: it sees the end of the stream"
    theirs.close()
    ours.close()


class SecondAnswerHeldServer(LoopbackServer):
    """HTTP/1.1, connections kept alive: the first request is answered at once (its head and body in one
    send), each later one once ``release`` is set. ``peers``: each request's client address (which
    connection it came on)."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.release = threading.Event()
        super().__init__()
        self.url = f"http://127.0.0.1:{self.port}/x"

    def _serve(self, connection: socket.socket) -> None:
        peer = connection.getpeername()
        with connection:
            pending = b""
            while True:
                while b"\r\n\r\n" not in pending:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    pending += chunk
                head, pending = pending.split(b"\r\n\r\n", 1)
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while len(pending) < length:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    pending += chunk
                pending = pending[length:]
                self.peers.append(peer)
                if len(self.peers) > 1:
                    self.release.wait(timeout=60)
                try:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                except OSError:
                    return

    def close(self) -> None:
        self.release.set()
        super().close()


def test_a_calls_watchdog_does_not_shut_the_connection_the_next_call_was_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watchdog of a call's connection was cancelled after its response was closed: reading the body
    to its end closes it, and its connection goes back to the pool the tool calls share. A call taking it
    from there before the first call's deadline had it shut down under it at that deadline, and failed
    (the server 'disconnected without sending a response')."""
    import kubechain.tools.external_api as external_api
    from kubechain import http_watchdog
    from kubechain.testing.waiting import wait_for

    monkeypatch.setattr(external_api, "_client", None)  # a pool of this test's own
    server = SecondAnswerHeldServer()
    second: list[str | ToolError] = []

    def second_call() -> None:
        try:
            second.append(call_external_api(server.url, "POST", {}, None, timeout_s=30.0))
        except ToolError as exc:
            second.append(exc)

    real_decoded = external_api.decoded

    def decoded_then_the_next_call(raw: Any, content_encoding: str) -> Any:
        yield from real_decoded(raw, content_encoding)
        if server.peers[1:]:
            return  # the second call's own body
        # the body read to its end: the next call is given its connection, and the first call's deadline
        # passes while the server holds the second answer
        deadline = http_watchdog._IO_ENDS_BY.get()
        assert deadline is not None
        threading.Thread(target=second_call, daemon=True).start()
        wait_for(lambda: len(server.peers) == 2, timeout_s=30, what="the second request")
        ours, theirs = socket.socketpair()
        with ours, theirs:
            # due with the first call's watchdog, after it: fired, every watch due by then has been
            passed = http_watchdog._shutter.watch(ours, deadline)
            wait_for(lambda: passed.fired, timeout_s=30, what="the first call's deadline to pass")

    monkeypatch.setattr(external_api, "decoded", decoded_then_the_next_call)
    try:
        assert call_external_api(server.url, "POST", {}, None, timeout_s=2.0) == "ok"
        server.release.set()
        wait_for(lambda: second, timeout_s=30, what="the second call to end")
        assert server.peers[0] == server.peers[1], "the second call was given the first one's connection"
        assert second == ["ok"]
    finally:
        server.close()
        if external_api._client is not None:
            external_api._client.close()


class RecordingServer:
    """Answers every request with ``status`` (and ``headers``); records each request line."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.cookies: list[str | None] = []
        self.hosts: list[str | None] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                owner.lines.append(self.requestline)
                owner.hosts.append(self.headers.get("Host"))
                owner.cookies.append(self.headers.get("Cookie"))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = do_DELETE = _answer  # noqa: N815

            def log_message(self, *_: object) -> None:
                pass

        self.server, self.url = serve(Handler, "/x")


def test_a_redirect_is_a_tool_error_not_an_empty_success() -> None:
    """Redirects are not followed (the bearer token would go along); a 302 read as a success told the LLM
    the call had worked."""
    server = RecordingServer(302, {"Location": "https://elsewhere.example/x"})
    try:
        with pytest.raises(
            ToolError, match=r"answered with a redirect \(302\) to https://elsewhere.example/x"
        ):
            call_external_api(server.url, "POST", {"a": 1}, "secret-token", timeout_s=10.0)
    finally:
        server.server.shutdown()


def test_get_arguments_go_in_the_query_as_json_not_as_python() -> None:
    server = RecordingServer(200)
    try:
        arguments: dict[str, Any] = {"q": "a b", "flag": True, "n": 2, "obj": {"k": [1, 2]}, "none": None}
        assert call_external_api(server.url, "GET", arguments, None, timeout_s=10.0) == "ok"
    finally:
        server.server.shutdown()
    from urllib.parse import parse_qs, urlsplit

    query = parse_qs(urlsplit(server.lines[0].split()[1]).query)
    assert query == {"q": ["a b"], "flag": ["true"], "n": ["2"], "obj": ['{"k": [1, 2]}']}


@pytest.mark.parametrize("verb", ["GET", "DELETE"])
def test_get_arguments_are_added_to_the_query_the_tools_url_already_has(verb: str) -> None:
    """A Tool's URL may carry a key or an API version in its query (``?api_key=...&api-version=...``):
    httpx (0.28 on) replaces a URL's query with ``params=``, and every call was refused by the API."""
    server = RecordingServer(200)
    try:
        url = server.url + "?api_key=K&api-version=2024-01-01"
        assert call_external_api(url, verb, {"q": "cats"}, None, timeout_s=10.0) == "ok"
        assert call_external_api(url, verb, {}, None, timeout_s=10.0) == "ok"
    finally:
        server.server.shutdown()
    from urllib.parse import parse_qs, urlsplit

    queries = [parse_qs(urlsplit(line.split()[1]).query) for line in server.lines]
    assert queries == [
        {"api_key": ["K"], "api-version": ["2024-01-01"], "q": ["cats"]},
        {"api_key": ["K"], "api-version": ["2024-01-01"]},
    ]


# A query as an API may need it byte for byte (a signed URL's signature covers it): a bare flag, "%20"
# and "+", lower-case and needless escapes ("%2f", "%7E"), ";" and a byte that is not UTF-8 ("%e9").
QUERY_AS_WRITTEN = "format=json&key=a%2Fb&flag&q=a%20b+c&sig=%2fx%3d&t=%7E&s=a;b&l=%e9"


@pytest.mark.parametrize("verb", ["GET", "DELETE"])
def test_the_query_the_tools_url_has_is_sent_as_written_the_arguments_after_it(verb: str) -> None:
    """It was parsed and encoded again with the arguments: "flag" went as "flag=", "%20" as "+", "%7E" as
    "~", ";" as "%3B" and "%e9" as "%EF%BF%BD", and an API that checks a signature of it refused them."""
    server = RecordingServer(200)
    try:
        url = f"{server.url}?{QUERY_AS_WRITTEN}"
        assert call_external_api(url, verb, {"page": 2, "term": "cats & dogs"}, None, timeout_s=10.0) == "ok"
        assert call_external_api(url, verb, {}, None, timeout_s=10.0) == "ok"
    finally:
        server.server.shutdown()
    assert [line.split()[1] for line in server.lines] == [
        f"/x?{QUERY_AS_WRITTEN}&page=2&term=cats+%26+dogs",
        f"/x?{QUERY_AS_WRITTEN}",
    ]


def test_an_argument_may_not_replace_a_query_parameter_the_tools_url_sets() -> None:
    """What the Tool's URL sets (a tenant, a key) is its author's, not the LLM's to change."""
    server = RecordingServer(200)
    try:
        with pytest.raises(ToolError, match=r"tenant.* set by the Tool's URL"):
            call_external_api(server.url + "?tenant=acme", "GET", {"tenant": "other"}, None, timeout_s=10.0)
    finally:
        server.server.shutdown()
    assert server.lines == []


@pytest.mark.parametrize("verb", ["GET", "POST"])
def test_credentials_in_the_tools_url_are_never_sent_as_basic_auth(verb: str) -> None:
    """httpx sends a URL's ``user:password@`` as HTTP Basic auth: a Tool that validation would refuse (one
    read before its re-validation, a caller of this function) must not send them either, nor quote them."""
    password = "s3cret-Pa55word-0123"
    with StubHTTPServer(lambda request: StubAnswer(body=b"ok")) as server:
        url = server.url.replace("http://", f"http://apiuser:{password}@") + "/x"
        try:
            said = call_external_api(url, verb, {"q": "cats"}, None, timeout_s=10.0)
        except ToolError as exc:
            said = str(exc)
    sent = [request.headers.get("Authorization") for request in server.requests]
    assert not [auth for auth in sent if auth and auth.startswith("Basic ")], sent
    assert server.requests == [], "refused before anything is sent"
    assert "put them in a Secret" in said and "credentialsFrom" in said, said
    assert password not in said and "apiuser" not in said, said


def test_a_cookie_one_tools_api_sets_is_not_sent_with_anyone_elses_calls() -> None:
    """One HTTP client serves every namespace's externalAPI tools: a cookie jar would hand a session one
    tenant's API set to every other tenant's calls to that host."""
    server = RecordingServer(200, {"Set-Cookie": "session=A-SESSION-SECRET; Path=/"})
    try:
        call_external_api(server.url, "POST", {}, "token-of-a", timeout_s=10.0)
        call_external_api(server.url, "POST", {}, "token-of-b", timeout_s=10.0)
    finally:
        server.server.shutdown()
    assert server.cookies == [None, None]


class EchoServer:
    """Answers with the request's Authorization header in the body (a debug endpoint, an error page)."""

    def __init__(self, status: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = f"you sent: {self.headers.get('Authorization')}".encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server, self.url = serve(Handler, "/echo")


@pytest.mark.parametrize("status", [200, 500])
def test_the_bearer_token_an_api_echoes_is_not_kept_in_the_result_or_the_error(status: int) -> None:
    """The result goes to the tool call's status, its Events and the LLM; the error too."""
    server = EchoServer(status)
    try:
        if status == 200:
            said = call_external_api(server.url, "POST", {}, "s3cr3t-t0ken", timeout_s=10.0)
        else:
            with pytest.raises(ToolError) as raised:
                call_external_api(server.url, "POST", {}, "s3cr3t-t0ken", timeout_s=10.0)
            said = str(raised.value)
    finally:
        server.server.shutdown()
    assert "s3cr3t-t0ken" not in said and "you sent: Bearer ***" in said


TOKEN = "tok-0123456789abcdefghijklmnop"


def pieces(text: str, secret: str = TOKEN) -> list[str]:
    return [secret[i : i + 8] for i in range(len(secret) - 7) if secret[i : i + 8] in text]


def answering(monkeypatch: pytest.MonkeyPatch, respond: Callable[[httpx.Request], httpx.Response]) -> None:
    """The shared client, answering every request with ``respond``."""
    import kubechain.tools.external_api as external_api

    def streamed(request: httpx.Request) -> httpx.Response:
        # as from the network: a Response made with content= is read (and decoded) already; its stream
        # (a ByteStream, which may be read again) is the body as sent
        answer = respond(request)
        return httpx.Response(answer.status_code, headers=answer.headers, stream=answer.stream)

    monkeypatch.setattr(external_api, "_client", httpx.Client(transport=httpx.MockTransport(streamed)))


def echoed_token(request: httpx.Request) -> str:
    return request.headers["Authorization"].removeprefix("Bearer ")


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        # an error page echoing the request's headers, the token across the 500-character cut
        pytest.param(500, {}, lambda token: "x" * 470 + f"you sent: Bearer {token}", id="error-body"),
        # a redirect to where the token goes along, the token across the 300-character cut
        pytest.param(
            302,
            {"Location": lambda token: "https://elsewhere.example/" + "p" * 260 + f"/{token}/next"},
            lambda token: "",
            id="redirect-location",
        ),
    ],
)
def test_an_error_quoting_the_token_across_its_cut_keeps_no_piece_of_it(
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    headers: dict[str, Callable[[str], str]],
    body: Callable[[str], str],
) -> None:
    """The error is the tool call's status, its Events and what the LLM reads: cut before the token was
    cut out, it kept the token's start."""

    def respond(request: httpx.Request) -> httpx.Response:
        token = echoed_token(request)
        answer = {name: value(token) for name, value in headers.items()}
        return httpx.Response(status, headers=answer, text=body(token))

    answering(monkeypatch, respond)
    with pytest.raises(ToolError) as raised:
        call_external_api("https://api.example/x", "POST", {}, TOKEN, timeout_s=10.0)
    assert "***" in str(raised.value) and not pieces(str(raised.value)), str(raised.value)


def test_a_body_echoing_the_token_across_the_size_limit_keeps_no_piece_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kubechain.tools.external_api as external_api

    monkeypatch.setattr(external_api, "MAX_RESPONSE_BYTES", 100)
    answering(
        monkeypatch,
        lambda request: httpx.Response(200, text="z" * 90 + echoed_token(request) * 3 + "w" * 500),
    )
    said = call_external_api("https://api.example/x", "POST", {}, TOKEN, timeout_s=10.0)
    assert said.startswith("z" * 90 + "***") and not pieces(said), said


def test_an_answer_is_scrubbed_with_the_tokens_forms_worked_out_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """They were worked out three times a call (the read margin, then each of two scrubs of the same
    body, up to 1 MiB)."""
    import kubechain.redaction as redaction
    import kubechain.tools.external_api as external_api

    answering(monkeypatch, lambda request: httpx.Response(200, text=f"saw {echoed_token(request)}"))
    calls = counting_secret_forms(monkeypatch)
    monkeypatch.setattr(external_api, "secret_forms", redaction.secret_forms, raising=False)
    assert call_external_api("https://api.example/x", "POST", {}, TOKEN, timeout_s=10.0) == "saw ***"
    assert len(calls) == 1


CREDENTIALED_URL = "https://svc:pa55word-0123456789@api.example/x?api_key=qk-0123456789abcdef"


@pytest.mark.parametrize(
    "respond",
    [
        pytest.param(lambda request: httpx.Response(500, text="down"), id="error-status"),
        pytest.param(
            lambda request: httpx.Response(
                302, headers={"Location": "https://elsewhere.example/cb?access_token=at-0123456789abcdef"}
            ),
            id="redirect",
        ),
        pytest.param(lambda request: (_ for _ in ()).throw(httpx.ConnectError("refused")), id="unreachable"),
        pytest.param(lambda request: (_ for _ in ()).throw(httpx.ReadTimeout("slow")), id="timed-out"),
    ],
)
def test_an_error_shows_the_apis_url_without_its_credentials(
    monkeypatch: pytest.MonkeyPatch, respond: Callable[[httpx.Request], httpx.Response]
) -> None:
    """A Tool's URL may carry a password or a key in its query; the error goes to a status, Events and
    the LLM."""
    answering(monkeypatch, respond)
    with pytest.raises(ToolError) as raised:
        call_external_api(CREDENTIALED_URL, "POST", {}, None, timeout_s=10.0)
    said = str(raised.value)
    assert "https://api.example/x?api_key=***" in said, said
    for secret in ("pa55word-0123456789", "qk-0123456789abcdef", "at-0123456789abcdef"):
        assert not pieces(said, secret), said


def gzipped(data: bytes, wbits: int = 31) -> bytes:
    """``data`` compressed (gzip by default; 15: a zlib stream, -15: raw deflate)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


class CompressedServer:
    """Answers every POST with ``body`` as it is, saying ``Content-Encoding: gzip``."""

    def __init__(self, body: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server, self.url = serve(Handler, "/packed")


def test_a_compressed_answer_is_decoded_no_further_than_the_size_limit() -> None:
    """httpx decodes each chunk it reads whole, before the 1 MiB limit is checked: 32 KiB of gzip (one
    read) decoded to 32 MiB in memory at once, per call in flight."""
    import tracemalloc

    server = CompressedServer(gzipped(b"\0" * (32 * 1024 * 1024)))
    tracemalloc.start()
    try:
        said = call_external_api(server.url, "POST", {}, None, timeout_s=30.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        server.server.shutdown()
    assert said == "\0" * (1024 * 1024)
    assert peak < 12 * 1024 * 1024, f"{peak / 2**20:.0f} MiB held at the peak"


TEXT = "the answer, " * 10_000


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzipped(TEXT.encode())),
        ("x-gzip", gzipped(TEXT.encode())),
        ("deflate", gzipped(TEXT.encode(), 15)),
        ("deflate", gzipped(TEXT.encode(), -15)),
        ("identity, gzip", gzipped(TEXT.encode())),
        ("deflate, gzip", gzipped(gzipped(TEXT.encode(), 15))),
    ],
    ids=["gzip", "x-gzip", "deflate-zlib", "deflate-raw", "identity-then-gzip", "deflate-then-gzip"],
)
def test_a_compressed_answer_reads_as_its_text(
    monkeypatch: pytest.MonkeyPatch, encoding: str, body: bytes
) -> None:
    answering(
        monkeypatch,
        lambda request: httpx.Response(
            200, headers={"Content-Encoding": encoding}, stream=httpx.ByteStream(body)
        ),
    )
    assert call_external_api("https://api.example/x", "POST", {}, None, timeout_s=10.0) == TEXT


@pytest.mark.parametrize(
    ("encoding", "body", "said"),
    [
        ("br", b"\x1b\x00", "in Content-Encoding br, which is not decoded"),
        ("gzip, zstd", b"\x28\xb5", "in Content-Encoding gzip, zstd, which is not decoded"),
        ("gzip", b"not gzip at all", "a body that does not decode as gzip"),
        # a server's bug: the HTTP body is whole, its gzip stream is not (read as a short result)
        ("gzip", gzip.compress(b"x" * 5000)[:20], "a body that ends before its gzip stream does"),
    ],
    ids=["unknown", "one-unknown", "corrupt", "cut-short"],
)
def test_an_answer_that_cannot_be_decoded_is_a_tool_error(
    monkeypatch: pytest.MonkeyPatch, encoding: str, body: bytes, said: str
) -> None:
    """httpx passed a body in an encoding it does not know on as it was: bytes read as text."""
    answering(
        monkeypatch,
        lambda request: httpx.Response(
            200, headers={"Content-Encoding": encoding}, stream=httpx.ByteStream(body)
        ),
    )
    with pytest.raises(ToolError, match=said):
        call_external_api("https://api.example/x", "POST", {}, None, timeout_s=10.0)


def test_the_api_is_asked_only_for_the_encodings_that_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def respond(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers["Accept-Encoding"])
        return httpx.Response(200, text="ok")

    answering(monkeypatch, respond)
    call_external_api("https://api.example/x", "POST", {}, None, timeout_s=10.0)
    assert asked == ["gzip, deflate"]


def test_a_connection_that_fails_says_why() -> None:
    """A refused connection, a host not found and a certificate not trusted all read "failed:
    ConnectError": the Tool's author could not tell which to fix."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: refused
    with pytest.raises(ToolError) as raised:
        call_external_api(f"http://127.0.0.1:{port}/x", "POST", {}, None, timeout_s=10.0)
    assert f"POST http://127.0.0.1:{port}/x failed: ConnectError: " in str(raised.value)
    assert "refused" in str(raised.value).lower(), str(raised.value)


def test_why_a_connection_failed_is_said_without_the_token_or_the_urls_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "https://api.example/x?api_key=qk-0123456789abcdef"

    def respond(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"proxy refused {url} (sent Bearer {echoed_token(request)})")

    answering(monkeypatch, respond)
    with pytest.raises(ToolError) as raised:
        call_external_api(url, "POST", {}, TOKEN, timeout_s=10.0)
    said = str(raised.value)
    assert said.endswith(
        "failed: ConnectError: proxy refused https://api.example/x?api_key=*** (sent Bearer ***)"
    )
    for secret in (TOKEN, "qk-0123456789abcdef"):
        assert not pieces(said, secret), said
