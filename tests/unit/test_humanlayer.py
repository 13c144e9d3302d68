"""The HumanLayer client against the local test server, channel checks, and ContactChannel validation."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from kubechain.humanlayer import (
    HumanLayerAuthError,
    HumanLayerClient,
    HumanLayerError,
    HumanLayerNotFound,
    HumanLayerUnavailable,
    channel_payload,
    email_address_problem,
)
from kubechain.humanlayer.testserver import HumanLayerTestServer
from kubechain.kube.fake import FakeKubeClient
from kubechain.llm.base import LLMResponse
from kubechain.models import ContactChannel
from kubechain.testing.waiting import wait_for
from tests.unit.fakes import FakeLLM, context, create, message
from workers.validators import validate

KEY = "hl-secret-key-123"


@pytest.fixture
def hl() -> Iterator[HumanLayerTestServer]:
    with HumanLayerTestServer(api_keys={KEY}) as server:
        yield server


# -- email addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "approver@example.com",
        "first.last+tag@sub.example.co.uk",
        "a@b.io",
        "o'brien@example.org",
        "x@xn--bcher-kva.example",
    ],
)
def test_valid_email_addresses(address: str) -> None:
    assert email_address_problem(address) is None


@pytest.mark.parametrize(
    "address",
    [
        "test@example..com",
        "test@.example.com",
        "test@example.com.",
        "test@example",
        "test@example.c0m",
        "test@example.c",
        "te..st@example.com",
        ".test@example.com",
        "test.@example.com",
        "test@@example.com",
        "test@exa mple.com",
        "Test User <test@example.com>",
        "test@-example.com",
        "test@example-.com",
        "@example.com",
        " test@example.com",
        "",
    ],
)
def test_invalid_email_addresses(address: str) -> None:
    assert email_address_problem(address) is not None


# -- client and test server --------------------------------------------------------------------------


def test_project_and_auth(hl: HumanLayerTestServer) -> None:
    with HumanLayerClient(hl.url, KEY) as client:
        assert client.get_project()["id"] == hl.project_id
    with (
        HumanLayerClient(hl.url, "wrong") as client,
        pytest.raises(HumanLayerAuthError, match="invalid HumanLayer API key"),
    ):
        client.get_project()


def test_function_call_round_trip_is_idempotent_by_call_id(hl: HumanLayerTestServer) -> None:
    spec = {
        "fn": "fetch__fetch",
        "kwargs": {"url": "https://example.com"},
        "channel": {"email": {"address": "a@example.com"}},
    }
    with HumanLayerClient(hl.url, KEY) as client:
        created = client.create_function_call("run-1", "kc-1", spec)
        assert created["call_id"] == "kc-1" and created["status"]["approved"] is None
        again = client.create_function_call("run-1", "kc-1", spec)
        assert again == created, "a retried POST is the same call"
        assert len(hl.function_calls) == 1 and hl.posts["kc-1"] == 2
        # A different request under the same id: 409 at the server, the client returns the existing call.
        other = client.create_function_call("run-1", "kc-1", {"fn": "other", "kwargs": {}})
        assert other["spec"]["fn"] == "fetch__fetch"
        hl.reject("kc-1", "not that site")
        status = client.get_function_call("kc-1")["status"]
        assert status["approved"] is False and status["comment"] == "not that site"
        hl.approve("kc-1", "changed my mind")
        assert client.get_function_call("kc-1")["status"]["approved"] is False, "the first answer is final"
        with pytest.raises(HumanLayerNotFound):
            client.get_function_call("kc-unknown")


def test_contact_request_round_trip(hl: HumanLayerTestServer) -> None:
    with HumanLayerClient(hl.url, KEY) as client:
        client.create_contact_request("run-2", "kc-2", {"msg": "What is the budget?"})
        assert client.get_contact_request("kc-2")["status"]["response"] is None
        hl.respond("kc-2", "42k")
        status = client.get_contact_request("kc-2")["status"]
        assert status["response"] == "42k" and status["responded_at"]


def test_admin_http_api(hl: HumanLayerTestServer) -> None:
    with HumanLayerClient(hl.url, KEY) as client:
        client.create_function_call("run-3", "kc-3", {"fn": "f", "kwargs": {}})
    response = httpx.post(
        f"{hl.url}/_admin/function_calls/kc-3/respond", json={"approved": True, "comment": "ok"}
    )
    assert response.status_code == 200 and response.json()["status"]["approved"] is True
    assert httpx.post(f"{hl.url}/_admin/down", json={"mode": "503"}).json() == {"down": "503"}
    with HumanLayerClient(hl.url, KEY) as client, pytest.raises(HumanLayerUnavailable, match="HTTP 503"):
        client.get_project()
    httpx.post(f"{hl.url}/_admin/down", json={"mode": None})
    state = httpx.get(f"{hl.url}/_admin/state").json()
    assert [c["call_id"] for c in state["function_calls"]] == ["kc-3"]


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_down_server_is_unavailable(hl: HumanLayerTestServer, mode: str) -> None:
    hl.set_down(mode)
    with HumanLayerClient(hl.url, KEY) as client, pytest.raises(HumanLayerUnavailable) as raised:
        client.get_project()
    assert KEY not in str(raised.value)


def test_unreachable_server_is_unavailable() -> None:
    server = HumanLayerTestServer()
    url = server.url
    server._server.server_close()  # never started: nothing listens
    with (
        HumanLayerClient(url, KEY, timeout_s=2) as client,
        pytest.raises(HumanLayerUnavailable, match="cannot reach"),
    ):
        client.get_project()


def serving(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """``handler`` served on a local port by a thread of its own: the server and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class BodyTricklingServer:
    """Answers with its headers at once, then one byte of a JSON body every 0.1 s for a minute."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(600):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass

            def log_message(self, *_: Any) -> None:
                pass

        self.server, self.url = serving(Handler)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["headers-trickle", "body-trickles", "resolver-hangs"])
def test_a_request_ends_by_its_timeout_however_the_peer_holds_it_up(
    monkeypatch: pytest.MonkeyPatch, peer: str
) -> None:
    """httpx times each read, and resolving the host's name not at all: a HumanLayer API (or a proxy)
    trickling its answer, or a resolver that does not answer, held a ContactChannel's check (a thread of
    the checks pool) or an approval's request without bound. The whole request now ends by its timeouts
    (the connect's and the answer's, 2 s here), as an outage: the channel is Pending, and checked again."""
    from tests.unit.slow_peers import HangingResolver, HeaderTricklingServer

    with contextlib.ExitStack() as peers:
        if peer == "headers-trickle":
            url = peers.enter_context(HeaderTricklingServer()).url
        elif peer == "body-trickles":
            body = BodyTricklingServer()
            peers.callback(body.close)
            url = body.url
        else:
            resolver = peers.enter_context(HangingResolver(monkeypatch, "api.hangs.test"))
            peers.callback(
                lambda: wait_for(lambda: resolver.unanswered == 0, 30, what="the resolution to end")
            )
            peers.callback(resolver.release)
            url = "http://api.hangs.test"
        outcome: list[BaseException | dict[str, Any]] = []

        def ask() -> None:
            try:
                with HumanLayerClient(url, KEY, timeout_s=1) as client:
                    outcome.append(client.get_project())
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                outcome.append(exc)

        asking = threading.Thread(target=ask, daemon=True)
        started = time.monotonic()
        asking.start()
        asking.join(timeout=12)  # a bound on a hang, not a speed target
        assert not asking.is_alive(), f"the request ran for {time.monotonic() - started:.0f}s (timeout 1 s)"
    (error,) = outcome
    assert isinstance(error, HumanLayerUnavailable) and "did not answer in time" in str(error), error


def test_an_approvals_humanlayer_call_is_bounded_as_its_claim_reckons() -> None:
    from workers.approvals import HUMANLAYER_CALL_S

    with HumanLayerClient("https://api.humanlayer.dev", KEY) as client:
        assert client.request_timeout_s == HUMANLAYER_CALL_S


def test_slack_and_email_payloads() -> None:
    slack = ContactChannel.from_wire(
        {
            "metadata": {"name": "s"},
            "spec": {
                "type": "slack",
                "apiKeyFrom": {"secretKeyRef": {"name": "hl", "key": "k"}},
                "slack": {
                    "channelOrUserID": "C0123",
                    "contextAboutChannelOrUser": "the ops channel",
                    "allowedResponderIDs": ["U1"],
                },
            },
        }
    )
    assert channel_payload(slack) == {
        "slack": {
            "channel_or_user_id": "C0123",
            "context_about_channel_or_user": "the ops channel",
            "allowed_responder_ids": ["U1"],
        }
    }
    email = ContactChannel.from_wire(
        {
            "metadata": {"name": "e"},
            "spec": {
                "type": "email",
                "apiKeyFrom": {"secretKeyRef": {"name": "hl", "key": "k"}},
                "email": {
                    "address": "a@example.com",
                    "contextAboutUser": "the approver",
                    "subject": "Approve?",
                },
            },
        }
    )
    assert channel_payload(email) == {
        "email": {
            "address": "a@example.com",
            "context_about_user": "the approver",
            "experimental_subject_line": "Approve?",
        }
    }


# -- ContactChannel validation -----------------------------------------------------------------------


def channel_spec(kind: str = "email", **config: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": kind,
        "apiKeyFrom": {"secretKeyRef": {"name": "humanlayer", "key": "HUMANLAYER_API_KEY"}},
    }
    if kind == "email":
        spec["email"] = {"address": "approver@example.com", **config}
    elif kind == "slack":
        spec["slack"] = {"channelOrUserID": "C07ABC", **config}
    return spec


def validated_status(kube: FakeKubeClient, url: str, name: str = "cc") -> dict[str, Any]:
    ctx = context(kube, FakeLLM(lambda r: LLMResponse()), humanlayer_api_base=url)
    validate(ctx, message("ContactChannel", name))
    return dict(kube.get_raw("contactchannels", "default", name).get("status") or {})


@pytest.mark.parametrize("kind", ["email", "slack"])
def test_contact_channel_validates_and_records_the_project(hl: HumanLayerTestServer, kind: str) -> None:
    kube = FakeKubeClient()
    kube.add_secret("default", "humanlayer", {"HUMANLAYER_API_KEY": KEY})
    create(kube, "ContactChannel", "contactchannels", "cc", channel_spec(kind))
    status = validated_status(kube, hl.url)
    assert status["ready"] is True and status["status"] == "Ready"
    assert status["statusDetail"] == f"HumanLayer {kind} channel validated successfully"
    assert status["humanLayerProject"] == hl.project_id
    assert kube.event_reasons("cc") == ["Initializing", "ValidationSucceeded"]
    assert hl.request_count("GET", "/humanlayer/v1/project") == 1
    validated_status(kube, hl.url)
    assert kube.event_reasons("cc") == ["Initializing", "ValidationSucceeded"], (
        "nothing changed, nothing written"
    )


def test_invalid_api_key(hl: HumanLayerTestServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    kube = FakeKubeClient()
    kube.add_secret("default", "humanlayer", {"HUMANLAYER_API_KEY": "hl-wrong-key"})
    create(kube, "ContactChannel", "contactchannels", "cc", channel_spec())
    status = validated_status(kube, hl.url)
    assert status["ready"] is False and status["status"] == "Error"
    assert status["statusDetail"] == (
        'invalid HumanLayer API key (from key "HUMANLAYER_API_KEY" of Secret "humanlayer"): '
        "put a valid HumanLayer API key there"
    ), "the original's words, then which Secret to fix"
    assert "ValidationFailed" in kube.event_reasons("cc")
    assert "hl-wrong-key" not in caplog.text
    # Fixing the Secret and re-validating (the watcher's resync does that) makes it Ready.
    kube.request("DELETE", "/api/v1/namespaces/default/secrets/humanlayer")
    kube.add_secret("default", "humanlayer", {"HUMANLAYER_API_KEY": KEY})
    assert validated_status(kube, hl.url)["status"] == "Ready"


def test_strict_email_check_rejects_double_dots(hl: HumanLayerTestServer) -> None:
    kube = FakeKubeClient()
    kube.add_secret("default", "humanlayer", {"HUMANLAYER_API_KEY": KEY})
    create(
        kube,
        "ContactChannel",
        "contactchannels",
        "cc",
        {**channel_spec(), "email": {"address": "test@example..com"}},
    )
    status = validated_status(kube, hl.url)
    assert status["status"] == "Error" and status["statusDetail"].startswith("invalid email address:")
    assert hl.request_count("GET", "/humanlayer/v1/project") == 0, (
        "a bad channel is not checked against HumanLayer"
    )


@pytest.mark.parametrize(
    ("spec_change", "secret", "detail"),
    [
        ({"type": "slack"}, {"HUMANLAYER_API_KEY": KEY}, "slackConfig is required for slack channel type"),
        (
            {"type": "email", "email": None},
            {"HUMANLAYER_API_KEY": KEY},
            "emailConfig is required for email channel type",
        ),
        ({}, None, 'failed to get secret: secrets "humanlayer" not found'),
        ({}, {"OTHER": "x"}, 'key "HUMANLAYER_API_KEY" not found in secret "humanlayer"'),
        ({}, {"HUMANLAYER_API_KEY": "  "}, "empty API key provided"),
    ],
)
def test_configuration_problems(
    hl: HumanLayerTestServer, spec_change: dict[str, Any], secret: dict[str, str] | None, detail: str
) -> None:
    kube = FakeKubeClient()
    if secret is not None:
        kube.add_secret("default", "humanlayer", secret)
    spec = {key: value for key, value in {**channel_spec(), **spec_change}.items() if value is not None}
    if spec["type"] == "slack":
        spec.pop("email", None)
    create(kube, "ContactChannel", "contactchannels", "cc", spec)
    status = validated_status(kube, hl.url)
    assert status["status"] == "Error" and detail in status["statusDetail"]


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_humanlayer_outage_is_a_clear_error_and_heals(hl: HumanLayerTestServer, mode: str) -> None:
    kube = FakeKubeClient()
    kube.add_secret("default", "humanlayer", {"HUMANLAYER_API_KEY": KEY})
    create(kube, "ContactChannel", "contactchannels", "cc", channel_spec())
    hl.set_down(mode)
    status = validated_status(kube, hl.url)
    assert status["ready"] is False and status["status"] == "Pending", "not wrong: waiting for HumanLayer"
    assert "HumanLayer API" in status["statusDetail"] and hl.url in status["statusDetail"]
    assert KEY not in status["statusDetail"]
    hl.set_down(None)
    assert validated_status(kube, hl.url)["status"] == "Ready"


@pytest.mark.parametrize("status", [200, 400])
def test_an_answer_nested_deeper_than_json_parses_is_an_invalid_response(status: int) -> None:
    """RecursionError is not a ValueError: it escaped the client, after the request's claim."""
    from tests.unit.http_stub import StubAnswer, StubHTTPServer

    nested = StubAnswer(status, b"[" * 100_000 + b"]" * 100_000)
    with (
        StubHTTPServer(lambda _: nested) as server,
        HumanLayerClient(server.url, KEY) as client,
        pytest.raises(HumanLayerError),
    ):
        client.get_project()


@pytest.mark.parametrize("status", [400, 403, 404, 409, 500])
def test_an_error_body_that_echoes_the_api_key_does_not_carry_it_into_the_error(status: int) -> None:
    """The error text becomes a tool call's status, an Event and a log line; a proxy that echoes the
    request's headers must not put the key there, not even the start of it before the 200-character cut."""
    from tests.unit.http_stub import StubAnswer, StubHTTPServer

    def echo(request: Any) -> StubAnswer:
        sent = {name.lower(): value for name, value in request.headers.items()}.get("authorization", "")
        detail = "y" * 170 + f" you sent {sent}; again: {sent}"
        return StubAnswer(status, json.dumps({"detail": detail}).encode())

    with (
        StubHTTPServer(echo) as server,
        HumanLayerClient(server.url, KEY) as client,
        pytest.raises(HumanLayerError) as failed,
    ):
        client.get_project()
    text = str(failed.value)
    assert "you sent" in text
    assert not [KEY[i : i + 6] for i in range(len(KEY) - 5) if KEY[i : i + 6] in text], text


def test_a_malformed_answer_that_echoes_the_api_key_does_not_carry_it_into_the_error() -> None:
    """A proxy that echoes the request's headers into a header line HTTP does not allow: the HTTP library's
    error quotes the line, and its text went into the error (a ContactChannel's status, a tool call's,
    their Events and log lines) with the key in it."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def echo_into_a_bad_header_line() -> None:
        connection, _ = listener.accept()
        with connection:
            received = b""
            while b"\r\n\r\n" not in received:
                received += connection.recv(4096)
            (sent,) = [line for line in received.split(b"\r\n") if line.lower().startswith(b"authorization:")]
            connection.sendall(
                b"HTTP/1.1 502 Bad Gateway\r\nX-Echo " + sent + b"\r\nContent-Length: 0\r\n\r\n"
            )

    server = threading.Thread(target=echo_into_a_bad_header_line, daemon=True)
    server.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with listener, HumanLayerClient(url, KEY) as client, pytest.raises(HumanLayerUnavailable) as failed:
        client.get_project()
    server.join(10)
    text = str(failed.value)
    assert "illegal header line" in text and "Bearer ***" in text, text
    assert not [KEY[i : i + 6] for i in range(len(KEY) - 5) if KEY[i : i + 6] in text], text


def test_an_api_url_with_credentials_is_shown_without_them() -> None:
    """A base URL may carry a proxy's user and password; errors and the client's repr name the URL."""
    from tests.unit.http_stub import StubAnswer, StubHTTPServer

    with StubHTTPServer(lambda _: StubAnswer(404, b'{"detail": "no such call"}')) as server:
        url = server.url.replace("://", "://proxy-user:pa55word-0123456789@")
        with HumanLayerClient(url, KEY) as client, pytest.raises(HumanLayerNotFound) as failed:
            client.get_function_call("c1")
        shown = repr(client)
    assert f"GET {server.url}/humanlayer/v1/function_calls/c1" in str(failed.value)
    assert "pa55word" not in str(failed.value) and "pa55word" not in shown, (str(failed.value), shown)


def recording_client(base: str = "https://hl.example") -> tuple[HumanLayerClient, list[httpx.Request]]:
    """A client whose requests are kept (and answered with the posted body, or {}), never sent."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=request.content or b"{}")

    return HumanLayerClient(base, KEY, transport=httpx.MockTransport(answer)), seen


def test_a_lone_surrogate_in_a_request_is_sent_as_its_json_escape() -> None:
    """An LLM writing "\\ud83d" (half an emoji) in a tool's arguments: httpx encodes its JSON body as UTF-8,
    which has no lone surrogates, and raised UnicodeEncodeError after the request's claim."""
    client, seen = recording_client()
    spec = {"fn": "fetch", "kwargs": {"url": "https://example.com/\ud83d"}}
    answer = client.create_function_call("r", "kc-1", spec)
    (request,) = seen
    assert request.headers["content-type"] == "application/json"
    assert b'"https://example.com/\\ud83d"' in request.content and request.content.isascii()
    assert json.loads(request.content) == {"run_id": "r", "call_id": "kc-1", "spec": spec} == answer


@pytest.mark.parametrize("base", ["http://[::1", "http://[::1]:port"])
def test_a_malformed_api_base_is_a_humanlayer_error(base: str) -> None:
    """httpx.InvalidURL is no httpx.HTTPError: it escaped the client (a ContactChannel's validation crashed,
    and a tool call's request after its claim)."""
    with pytest.raises(HumanLayerError, match="HUMANLAYER_API_BASE") as failed:
        HumanLayerClient(base, KEY)
    assert not isinstance(failed.value, HumanLayerUnavailable), "a setting to fix, not an outage"


@pytest.mark.parametrize(
    "raised",
    [
        httpx.InvalidURL(f"Invalid non-printable ASCII character in URL {KEY}"),
        UnicodeEncodeError("utf-8", "\ud83d", 0, 1, "surrogates not allowed"),
        ValueError(f"something else {KEY}"),
    ],
    ids=["InvalidURL", "UnicodeEncodeError", "ValueError"],
)
def test_what_else_httpx_raises_building_a_request_is_a_humanlayer_error(
    monkeypatch: pytest.MonkeyPatch, raised: Exception
) -> None:
    """Only httpx.HTTPError was mapped: anything else httpx raised while building the request escaped the
    client, after the request's claim."""
    client, _ = recording_client()

    def refuse(*_: Any, **__: Any) -> httpx.Request:
        raise raised

    monkeypatch.setattr(client._http, "build_request", refuse)
    with pytest.raises(HumanLayerError, match=type(raised).__name__) as failed:
        client.get_function_call("kc-1")
    assert not isinstance(failed.value, HumanLayerUnavailable)
    assert KEY not in str(failed.value)


def test_call_ids_are_quoted_in_url_paths() -> None:
    """A call id is one path segment: a "/" or "?" must not reach another endpoint, and a control
    character must not make every request raise httpx.InvalidURL."""
    client, seen = recording_client()
    client.get_function_call("kc-1/../../project?x=\n")
    client.get_contact_request("kc-2 #")
    assert [request.url.raw_path for request in seen] == [
        b"/humanlayer/v1/function_calls/kc-1%2F..%2F..%2Fproject%3Fx%3D%0A",
        b"/humanlayer/v1/contact_requests/kc-2%20%23",
    ]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_reported_as_one_naming_where_it_leads(status: int) -> None:
    """The client follows no redirects (the key would go wherever one leads): a 3xx was reported as "not
    JSON". An http:// base for an https-only API is the usual cause."""

    def redirect(request: httpx.Request) -> httpx.Response:
        location = f"https://user:pw-{KEY}@api.humanlayer.dev{request.url.path}?token={KEY}"
        return httpx.Response(status, headers={"Location": location})

    with HumanLayerClient(
        "http://api.humanlayer.dev", KEY, transport=httpx.MockTransport(redirect)
    ) as client:
        with pytest.raises(HumanLayerError) as failed:
            client.get_project()
    text = str(failed.value)
    assert f"redirect (HTTP {status})" in text and "HUMANLAYER_API_BASE" in text, text
    assert "https://api.humanlayer.dev/humanlayer/v1/project?token=***" in text, text
    assert KEY not in text and "pw-" not in text
    assert not isinstance(failed.value, HumanLayerUnavailable) and failed.value.status == status


def test_a_redirect_without_a_location_says_so() -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(302))
    with HumanLayerClient("https://hl.example", KEY, transport=transport) as client:
        with pytest.raises(HumanLayerError, match=r"redirect \(HTTP 302\) without a Location"):
            client.get_project()


def test_a_malformed_api_base_is_a_validation_error_not_a_crash() -> None:
    """Settings refuse one at start (test_settings); a worker that has one anyway (settings built by hand)
    records it in the channel's status: httpx.InvalidURL escaped ContactChannel validation."""
    kube = FakeKubeClient()
    kube.add_secret("default", "humanlayer", {"HUMANLAYER_API_KEY": KEY})
    create(kube, "ContactChannel", "contactchannels", "cc", channel_spec())
    ctx = context(kube, FakeLLM(lambda r: LLMResponse()))
    ctx.settings = ctx.settings.model_copy(update={"humanlayer_api_base": "http://[::1"})
    validate(ctx, message("ContactChannel", "cc"))
    status = kube.get_raw("contactchannels", "default", "cc")["status"]
    assert status["ready"] is False and "HUMANLAYER_API_BASE" in status["statusDetail"], status


def failing_transport(cause: BaseException) -> httpx.MockTransport:
    """A transport whose every request fails as httpx fails it: a ConnectError caused by ``cause``."""

    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(str(cause), request=request) from cause

    return httpx.MockTransport(fail)


NOT_RESOLVED = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
NOT_TRUSTED = ssl.SSLCertVerificationError(
    1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate (_ssl.c:1006)"
)


@pytest.mark.parametrize(
    ("cause", "check"),
    [
        (NOT_RESOLVED, "check the host in HUMANLAYER_API_BASE"),
        (NOT_TRUSTED, "CA certificates"),
    ],
    ids=["host-not-found", "certificate-not-trusted"],
)
def test_a_host_that_does_not_resolve_or_a_certificate_not_trusted_is_a_setting_to_fix(
    cause: BaseException, check: str
) -> None:
    """A mistyped HUMANLAYER_API_BASE host, or a certificate this process does not trust (a TLS-inspecting
    proxy's), was HumanLayerUnavailable, an outage to wait out: the channel stayed Pending for ever."""
    with (
        HumanLayerClient("https://api.humanlayr.dev", KEY, transport=failing_transport(cause)) as client,
        pytest.raises(HumanLayerError) as raised,
    ):
        client.get_project()
    assert not isinstance(raised.value, HumanLayerUnavailable), raised.value
    said = str(raised.value)
    assert "https://api.humanlayr.dev/humanlayer/v1/project" in said and check in said, said
    assert "HUMANLAYER_API_BASE" in said


@pytest.mark.parametrize(
    "cause",
    [
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        ssl.SSLError(1, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol"),
    ],
    ids=["dns-server-unavailable", "refused", "reset", "tls-handshake-cut"],
)
def test_what_may_pass_is_still_an_outage(cause: BaseException) -> None:
    with (
        HumanLayerClient("https://api.humanlayer.dev", KEY, transport=failing_transport(cause)) as client,
        pytest.raises(HumanLayerUnavailable),
    ):
        client.get_project()


@pytest.mark.parametrize(
    "cause", [NOT_RESOLVED, NOT_TRUSTED], ids=["host-not-found", "certificate-not-trusted"]
)
def test_a_channel_whose_api_base_cannot_be_used_as_set_is_in_error_not_pending(
    monkeypatch: pytest.MonkeyPatch, cause: BaseException
) -> None:
    """Pending says "nothing to fix, HumanLayer is unavailable", and a question asked via a Pending channel
    waits the long outage budget: a typo in HUMANLAYER_API_BASE kept both for ever. (A channel not Ready:
    one that was Ready meets it as an outage first, see below.)"""

    def fail(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(str(cause), request=request) from cause

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", fail)
    kube = FakeKubeClient()
    kube.add_secret("default", "humanlayer", {"HUMANLAYER_API_KEY": KEY})
    create(kube, "ContactChannel", "contactchannels", "cc", channel_spec())
    status = validated_status(kube, "https://api.humanlayr.dev")
    assert status["ready"] is False and status["status"] == "Error", status
    assert "HUMANLAYER_API_BASE" in status["statusDetail"], status


@pytest.mark.parametrize(
    "cause", [NOT_RESOLVED, NOT_TRUSTED], ids=["host-not-found", "certificate-not-trusted"]
)
def test_a_ready_channel_meeting_an_api_base_it_cannot_use_is_pending_and_in_error_only_if_it_goes_on(
    hl: HumanLayerTestServer, monkeypatch: pytest.MonkeyPatch, cause: BaseException
) -> None:
    """A channel that worked under these settings until now and meets a host that does not resolve (CoreDNS
    can answer NXDOMAIN for a while, an in-cluster Service whose pods restart) was written Error at once, as
    for a typo. It is Pending (an outage, saying what to check); Error only if the next validation, the
    channel no longer Ready, still meets it."""
    kube = FakeKubeClient()
    kube.add_secret("default", "humanlayer", {"HUMANLAYER_API_KEY": KEY})
    create(kube, "ContactChannel", "contactchannels", "cc", channel_spec())
    assert validated_status(kube, hl.url)["status"] == "Ready"

    def fail(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(str(cause), request=request) from cause

    with monkeypatch.context() as patched:
        patched.setattr(httpx.HTTPTransport, "handle_request", fail)
        status = validated_status(kube, hl.url)
        assert status["ready"] is False and status["status"] == "Pending", status
        assert "HUMANLAYER_API_BASE" in status["statusDetail"], status
        status = validated_status(kube, hl.url)
        assert status["ready"] is False and status["status"] == "Error", status
        assert "HUMANLAYER_API_BASE" in status["statusDetail"], status
    # it heals: a resync validates it again
    assert validated_status(kube, hl.url)["status"] == "Ready"


# -- the size of an answer ---------------------------------------------------------------------------


def json_of_size(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes: ``{"id": "xxx..."}``."""
    return b'{"id": "' + b"x" * (size - 10) + b'"}'


class SizedAnswerServer:
    """Answers every request with ``status`` and a JSON body of ``size`` bytes, framed by its
    Content-Length ("length"), in chunks ("chunked"), or by closing the connection ("close"). With
    ``ends=False`` the body's end never comes (no last chunk, no close): the connection is held open until
    ``close()``, and a client that reads a whole body before it looks at its size waits for it."""

    def __init__(self, framing: str, size: int, *, status: int = 200, ends: bool = True) -> None:
        released = self.released = threading.Event()
        body = json_of_size(size)
        pieces = [body[start : start + 65536] for start in range(0, len(body), 65536)]

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if framing == "length":
                    self.send_header("Content-Length", str(len(body)))
                elif framing == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for piece in pieces:
                        self.wfile.write(
                            b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece
                        )
                    if ends and framing == "chunked":
                        self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    if not ends:
                        released.wait(60)  # a bound on a hang, not a pause
                except OSError:
                    pass  # the client stopped reading and closed the connection
                self.close_connection = True

            def log_message(self, *_: Any) -> None:
                pass

        self.server, self.url = serving(Handler)

    def __enter__(self) -> SizedAnswerServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    ("framing", "ends"),
    [("length", True), ("chunked", False), ("close", False)],
    ids=["content-length", "chunked-unending", "close-delimited-unending"],
)
def test_an_answer_over_the_bound_is_refused_without_reading_it_whole(framing: str, ends: bool) -> None:
    """The answer was read whole, whatever its size (only the request's deadline bounded it): an endpoint
    at a user-set HUMANLAYER_API_BASE made a worker hold hundreds of MiB. Reading stops past
    MAX_ANSWER_BYTES, and the answer is a bad one, as one not JSON is. A body that never ends is refused
    at once (by its size, not by the deadline): the client did not wait for the whole of it."""
    from kubechain.humanlayer.client import MAX_ANSWER_BYTES

    with (
        SizedAnswerServer(framing, MAX_ANSWER_BYTES + 1, ends=ends) as server,
        HumanLayerClient(server.url, KEY, timeout_s=3) as client,
        pytest.raises(HumanLayerError) as refused,
    ):
        client.get_project()
    assert type(refused.value) is HumanLayerError, "not an outage: waiting does not make it smaller"
    assert f"over {MAX_ANSWER_BYTES:,} bytes" in str(refused.value), str(refused.value)
    assert f"GET {server.url}/humanlayer/v1/project" in str(refused.value)
    assert "HUMANLAYER_API_BASE" in str(refused.value), "says what to check"


def test_an_error_answer_over_the_bound_keeps_its_status() -> None:
    """A 503 is an outage whatever its body (a proxy's error page): retried as one, the body not shown."""
    from kubechain.humanlayer.client import MAX_ANSWER_BYTES

    with (
        SizedAnswerServer("chunked", MAX_ANSWER_BYTES + 1, status=503, ends=False) as server,
        HumanLayerClient(server.url, KEY, timeout_s=3) as client,
        pytest.raises(HumanLayerUnavailable) as failed,
    ):
        client.get_project()
    assert "HTTP 503" in str(failed.value) and f"over {MAX_ANSWER_BYTES:,} bytes" in str(failed.value)
    assert "xxxxxxxxxx" not in str(failed.value)


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_an_answer_as_large_as_the_bound_is_read(framing: str) -> None:
    from kubechain.humanlayer.client import MAX_ANSWER_BYTES

    with (
        SizedAnswerServer(framing, MAX_ANSWER_BYTES) as server,
        HumanLayerClient(server.url, KEY) as client,
    ):
        assert len(client.get_project()["id"]) == MAX_ANSWER_BYTES - 10


def test_answers_are_asked_for_uncompressed_and_a_compressed_one_is_not_inflated() -> None:
    """httpx inflates each compressed piece whole: 10 KiB of gzip is 10 MiB, past any bound before it is
    counted. HumanLayer's answers are small; they are asked for as they are, and one compressed anyway
    is refused unread."""
    import gzip

    seen: list[httpx.Request] = []
    bomb = gzip.compress(json_of_size(10 * 1024 * 1024))

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=bomb, headers={"Content-Encoding": "gzip"})

    client = HumanLayerClient("https://hl.example", KEY, transport=httpx.MockTransport(answer))
    with client, pytest.raises(HumanLayerError, match="in Content-Encoding 'gzip'") as refused:
        client.get_project()
    assert type(refused.value) is HumanLayerError
    assert [request.headers["accept-encoding"] for request in seen] == ["identity"]
