"""An LLM request ends by its call's deadline, from the very start of its connection on: the llm_call's
claim runs out then, and another worker may take the turn and pay for the same call again."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from kubechain.llm.anthropic_provider import AnthropicClient
from kubechain.llm.base import LLMError, LLMRequest, LLMResponse
from kubechain.llm.deadline import ending_by
from kubechain.llm.openai_provider import OpenAIClient
from kubechain.models import Message
from kubechain.testing.waiting import wait_for
from tests.unit.http_stub import StubRequest
from tests.unit.slow_peers import (
    HangingResolver,
    HeaderTricklingServer,
    SNIRecordingServer,
    TLSTricklingProxy,
)

ClientClass = type[OpenAIClient] | type[AnthropicClient]
CLIENTS = [pytest.param(OpenAIClient, id="openai"), pytest.param(AnthropicClient, id="anthropic")]
# How long past its deadline a call may be seen to end: a bound on a hang, with room for a busy machine,
# not a speed target (the trickles below go on for a minute).
SLACK_S = 10.0
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def base_url(client_class: ClientClass, origin: str) -> str:
    # the Anthropic SDK adds /v1 to its paths itself
    return f"{origin}/v1" if client_class is OpenAIClient else origin


class CallInAThread:
    """``client.complete`` of a one-message request on a thread of its own, under ``ending_by(ends_by)``
    if given: ``outcome`` holds its answer or LLMError, ``ended`` when (time.monotonic()) it returned."""

    def __init__(self, client: OpenAIClient | AnthropicClient, ends_by: float | None = None) -> None:
        self.outcome: list[LLMResponse | LLMError] = []
        self.ended: float | None = None
        self._thread = threading.Thread(target=self._call, args=(client, ends_by), daemon=True)
        self._thread.start()

    def _call(self, client: OpenAIClient | AnthropicClient, ends_by: float | None) -> None:
        request = LLMRequest(model="m", messages=[Message(role="user", content="hi")])
        try:
            if ends_by is None:
                self.outcome.append(client.complete(request))
            else:
                with ending_by(ends_by):
                    self.outcome.append(client.complete(request))
        except LLMError as exc:
            self.outcome.append(exc)
        finally:
            self.ended = time.monotonic()

    def error_by(self, deadline: float) -> LLMError:
        """The call's LLMError, once it ended (failing if it is still running ``SLACK_S`` after
        ``deadline``): it must have ended by ``deadline`` plus that slack."""
        self._thread.join(timeout=max(0.0, deadline + SLACK_S - time.monotonic()))
        assert not self._thread.is_alive(), f"the call was still running {SLACK_S:g}s past its deadline"
        assert self.ended is not None and self.ended <= deadline + SLACK_S
        (error,) = self.outcome
        assert isinstance(error, LLMError), error
        return error


@pytest.fixture
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No proxy from the environment the tests run in, in either case."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    yield monkeypatch


@pytest.mark.slow
@pytest.mark.parametrize("client_class", CLIENTS)
def test_headers_trickling_in_end_the_call_when_its_claim_runs_out(
    client_class: ClientClass, no_proxies: pytest.MonkeyPatch
) -> None:
    """A server that sends one byte of its headers every 0.1 s, each well under the read timeout, and never
    ends them: the claim's deadline bounded each read of them, not their whole, and the call ran on past
    the claim (another worker then calls the LLM again)."""
    with HeaderTricklingServer() as server:
        client = client_class("sk-test", 30, base_url(client_class, server.url))
        deadline = time.monotonic() + 1.0
        call = CallInAThread(client, ends_by=deadline)
        error = call.error_by(deadline)
        assert error.cut_short and "claim on the call ran out" in str(error), error
        assert error.retryable
        wait_for(server.hung_up.is_set, 30, what="the server to find the connection closed")


@pytest.mark.slow
@pytest.mark.parametrize("client_class", CLIENTS)
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY"])
def test_a_proxy_that_trickles_its_headers_ends_the_call_at_the_clients_timeout(
    client_class: ClientClass, variable: str, no_proxies: pytest.MonkeyPatch
) -> None:
    """httpx builds a transport of its own for each proxy the environment names: its connections must end
    by the deadline too. The proxy here is the trickling server; the LLM's host is only a name the proxy
    would resolve."""
    with HeaderTricklingServer() as proxy:
        no_proxies.setenv(variable, proxy.url)
        client = client_class("sk-test", 1, base_url(client_class, "http://llm.test"))
        deadline = time.monotonic() + 1.0
        call = CallInAThread(client)
        error = call.error_by(deadline)
        assert "no complete answer within 1s" in str(error) and not error.cut_short, error
        assert proxy.heads and proxy.heads[0].startswith(b"POST http://llm.test/v1/"), proxy.heads


@pytest.mark.slow
@pytest.mark.parametrize("client_class", CLIENTS)
def test_redirects_followed_end_the_call_at_the_clients_timeout_not_each_hop(
    client_class: ClientClass, no_proxies: pytest.MonkeyPatch
) -> None:
    """The SDKs follow redirects (up to 20), each hop a request of its own to the transport: each was
    given the whole timeout afresh, and an endpoint redirecting to itself, a little under half the timeout
    each time, held the call for all twenty hops (nine times its timeout)."""
    from tests.unit.http_stub import StubAnswer, StubHTTPServer

    def redirect_slowly(request: StubRequest) -> StubAnswer:
        threading.Event().wait(0.45)  # the slow endpoint, not a wait of the test's
        return StubAnswer(status=307, headers={"Location": request.path})

    with StubHTTPServer(redirect_slowly) as server:
        client = client_class("sk-test", 1, base_url(client_class, server.url))
        deadline = time.monotonic() + 1.0
        error = CallInAThread(client).error_by(deadline)
        assert "no complete answer within 1s" in str(error) and not error.cut_short, error
        assert len(server.requests) <= 3, [request.path for request in server.requests]


@pytest.mark.slow
@pytest.mark.parametrize("client_class", CLIENTS)
def test_an_https_proxy_trickling_the_tunnelled_tls_handshake_ends_the_call_when_its_claim_runs_out(
    client_class: ClientClass, no_proxies: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory
) -> None:
    """Through an https:// proxy, the LLM's TLS runs inside the proxy's: httpcore does that handshake (and
    each read after it) over the outer TLS socket, one timed recv after another, where Python's own
    handshake has one deadline for the whole. A proxy passing the handshake on a byte at a time, each well
    under the read timeout, held the call past its claim."""
    with TLSTricklingProxy(tmp_path) as proxy:  # type: ignore[arg-type]
        no_proxies.setenv("HTTPS_PROXY", proxy.url)
        no_proxies.setenv("SSL_CERT_FILE", str(proxy.ca))  # the proxy's certificate trusted
        client = client_class("sk-test", 30, base_url(client_class, "https://llm.test"))
        deadline = time.monotonic() + 1.0
        error = CallInAThread(client, ends_by=deadline).error_by(deadline)
        assert error.cut_short and "claim on the call ran out" in str(error), error
        assert proxy.targets == ["llm.test:443"], proxy.targets
        wait_for(proxy.hung_up.is_set, 30, what="the proxy to find the connection closed")


def test_every_pool_of_the_sdks_clients_makes_its_connections_under_the_deadline(
    no_proxies: pytest.MonkeyPatch,
) -> None:
    """The default transport and each proxy's (HTTPS_PROXY, ALL_PROXY) have a connection pool of their
    own: each must make and read its connections under the call's deadline."""
    from kubechain.http_watchdog import _DeadlineBackend

    no_proxies.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    no_proxies.setenv("ALL_PROXY", "http://other-proxy.corp:3128")
    for client in (OpenAIClient("sk", 5, None), AnthropicClient("sk", 5, None)):
        http = client._client._client
        transports = [http._transport, *(t for t in http._mounts.values() if t is not None)]
        assert len(transports) == 3, transports
        for transport in transports:
            pool = transport._inner._pool  # type: ignore[attr-defined]
            assert isinstance(pool._network_backend, _DeadlineBackend), type(pool)


@pytest.mark.slow
@pytest.mark.parametrize("client_class", CLIENTS)
def test_a_resolver_that_does_not_answer_ends_the_call_when_its_claim_runs_out(
    client_class: ClientClass, monkeypatch: pytest.MonkeyPatch, no_proxies: pytest.MonkeyPatch
) -> None:
    """getaddrinfo blocks in C, deaf to socket timeouts: a resolver that hangs (a DNS server that drops
    queries, a stuck NSS module) held the call past its claim. The resolution left behind ends when the
    resolver answers at last."""
    with HangingResolver(monkeypatch, "llm.hangs.test") as resolver:
        client = client_class("sk-test", 30, base_url(client_class, "http://llm.hangs.test:8000"))
        deadline = time.monotonic() + 1.0
        error = CallInAThread(client, ends_by=deadline).error_by(deadline)
        assert error.cut_short and "claim on the call ran out" in str(error), error
        assert resolver.asked == ["llm.hangs.test"]
        resolver.release()
        wait_for(lambda: resolver.unanswered == 0, 30, what="the resolution left behind to end")


@pytest.mark.parametrize("client_class", CLIENTS)
def test_a_name_that_does_not_resolve_is_said_as_the_resolver_says_it(
    client_class: ClientClass, monkeypatch: pytest.MonkeyPatch, no_proxies: pytest.MonkeyPatch
) -> None:
    """Resolved apart from the connection, a name that does not resolve still fails as a connection error
    (retried) that says so, with the URL asked."""
    with HangingResolver(monkeypatch, "llm.gone.test") as resolver:
        resolver.release()  # it answers at once: no such name (for now)
        client = client_class("sk-test", 30, base_url(client_class, "http://llm.gone.test:8000"))
        with ending_by(time.monotonic() + 30), pytest.raises(LLMError) as failed:
            client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    said = str(failed.value)
    assert "Temporary failure in name resolution" in said and "http://llm.gone.test:8000/" in said, said
    assert failed.value.retryable and not failed.value.cut_short


@pytest.mark.parametrize("client_class", CLIENTS)
def test_the_host_header_keeps_the_llms_name_though_its_address_is_resolved_apart(
    client_class: ClientClass, monkeypatch: pytest.MonkeyPatch, no_proxies: pytest.MonkeyPatch
) -> None:
    """The connection is made to the address the name resolved to; the request still names the host
    (a virtual host, a gateway routing by name). The first address refusing, the next is tried, as
    socket.create_connection does (here 127.0.0.2, where nothing listens)."""
    from tests.unit.http_stub import StubAnswer, StubHTTPServer
    from tests.unit.test_fuzz_llm import completion

    answer = completion({"role": "assistant", "content": "hello"})
    with (
        HangingResolver(monkeypatch, "unused.test", {"llm.local.test": ["127.0.0.2", "127.0.0.1"]}),
        StubHTTPServer(lambda _: StubAnswer(body=answer)) as server,
    ):
        port = server.url.rsplit(":", 1)[1]
        client = client_class("sk-test", 30, base_url(client_class, f"http://llm.local.test:{port}"))
        with ending_by(time.monotonic() + 30):
            if client_class is OpenAIClient:
                said = client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
                assert said.content == "hello"
            else:  # the stub's answer is OpenAI's: only the request matters here
                with pytest.raises(LLMError):
                    client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    (request,) = server.requests
    assert {k.lower(): v for k, v in request.headers.items()}["host"] == f"llm.local.test:{port}"


@pytest.mark.parametrize("client_class", CLIENTS)
def test_tls_asks_for_the_llms_name_though_its_address_is_resolved_apart(
    client_class: ClientClass,
    monkeypatch: pytest.MonkeyPatch,
    no_proxies: pytest.MonkeyPatch,
    tmp_path: pytest.TempPathFactory,
) -> None:
    """The TLS handshake names the host (SNI), which the server picks its certificate by and the client
    verifies it against, not the address connected to."""
    with (
        HangingResolver(monkeypatch, "unused.test", {"llm.local.test": ["127.0.0.1"]}),
        SNIRecordingServer(tmp_path) as server,  # type: ignore[arg-type]
    ):
        client = client_class("sk-test", 30, base_url(client_class, f"https://llm.local.test:{server.port}"))
        with ending_by(time.monotonic() + 30), pytest.raises(LLMError, match="CERTIFICATE_VERIFY_FAILED"):
            client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    assert server.names == ["llm.local.test"]


def test_a_deadline_set_inside_another_never_extends_it() -> None:
    """The transport sets the request's deadline inside whatever deadline its caller set: the sooner holds."""
    from kubechain.http_watchdog import _IO_ENDS_BY, io_ending_by

    with io_ending_by(100.0):
        with io_ending_by(200.0):
            assert _IO_ENDS_BY.get() == 100.0
        with io_ending_by(50.0):
            assert _IO_ENDS_BY.get() == 50.0
        assert _IO_ENDS_BY.get() == 100.0
    assert _IO_ENDS_BY.get() is None
