"""The Kubernetes client paces its own requests (a token bucket) and waits out an API server that sheds
load (429 + Retry-After), as client-go does."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from kubechain.kube.client import THROTTLE_RETRIES, THROTTLE_WAIT_MAX_S, KubeClient
from kubechain.kube.connection import ClusterConnection
from kubechain.kube.errors import Gone, Unavailable
from kubechain.kube.ratelimit import TokenBucket
from tests.unit.http_stub import StubAnswer, StubHTTPServer, StubRequest

OK = StubAnswer(201, json.dumps({"kind": "Event", "metadata": {"name": "e"}}).encode())


def refusal(status: int, retry_after: str | None) -> StubAnswer:
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    body = {"kind": "Status", "code": status, "reason": "TooManyRequests", "message": "slow down"}
    return StubAnswer(status, json.dumps(body).encode(), headers)


def serving(answers: list[StubAnswer]) -> Iterator[tuple[StubHTTPServer, KubeClient, list[float]]]:
    queue = list(answers)
    waits: list[float] = []

    def answer(_: StubRequest) -> StubAnswer:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    with StubHTTPServer(answer) as server:
        kube = KubeClient(ClusterConnection(server.url, False, None), sleep=waits.append)
        try:
            yield server, kube, waits
        finally:
            kube.close()


@pytest.fixture
def stub(request: pytest.FixtureRequest) -> Iterator[tuple[StubHTTPServer, KubeClient, list[float]]]:
    yield from serving(request.param)


@pytest.mark.parametrize(
    "stub", [[refusal(429, "2"), refusal(429, None), OK]], indirect=True, ids=["429-then-201"]
)
def test_a_429_is_waited_out_for_as_long_as_it_asks_then_sent_again(
    stub: tuple[StubHTTPServer, KubeClient, list[float]],
) -> None:
    server, kube, waits = stub
    created = kube.request("POST", "/api/v1/namespaces/default/events", body={"kind": "Event"})
    assert created["metadata"]["name"] == "e"
    assert [r.method for r in server.requests] == ["POST"] * 3
    assert waits == [2.0, 1.0]  # the header's value, then the default without one
    assert len({r.body for r in server.requests}) == 1  # the same request each time


@pytest.mark.parametrize("stub", [[refusal(429, "120")]], indirect=True, ids=["429-forever"])
def test_a_server_that_keeps_refusing_is_an_outage_after_a_bounded_wait(
    stub: tuple[StubHTTPServer, KubeClient, list[float]],
) -> None:
    server, kube, waits = stub
    with pytest.raises(Unavailable) as refused:
        kube.request("GET", "/api/v1/namespaces/default/events")
    assert refused.value.status == 429
    assert len(server.requests) == THROTTLE_RETRIES + 1
    assert waits == [THROTTLE_WAIT_MAX_S] * THROTTLE_RETRIES


TOO_LARGE = StubAnswer(
    504,
    json.dumps(
        {
            "kind": "Status",
            "code": 504,
            "reason": "Timeout",
            "message": "Too large resource version: 99, current: 42",
            "details": {"causes": [{"reason": "ResourceVersionTooLarge"}], "retryAfterSeconds": 1},
        }
    ).encode(),
    {"Content-Type": "application/json", "Retry-After": "1"},
)


@pytest.mark.parametrize(
    ("stub", "method", "error"),
    [
        ([refusal(503, "1"), OK], "PUT", Unavailable),  # a write may have been applied
        ([refusal(503, "1"), OK], "GET", Unavailable),
        ([refusal(500, None), OK], "GET", Unavailable),
        ([TOO_LARGE, OK], "GET", Gone),  # the caller reads fresh at once; waiting would only cost time
    ],
    indirect=["stub"],
    ids=["put-503-retry-after", "get-503-retry-after", "get-500", "get-504-too-large-version"],
)
def test_a_5xx_is_the_callers_to_answer_even_with_retry_after(
    stub: tuple[StubHTTPServer, KubeClient, list[float]], method: str, error: type[Exception]
) -> None:
    server, kube, waits = stub
    body: dict[str, object] | None = {"status": {}} if method == "PUT" else None
    with pytest.raises(error):
        kube.request(method, "/apis/x/v1/namespaces/default/taskruns/r/status", body=body)
    assert len(server.requests) == 1
    assert waits == []


def test_a_plain_http_server_through_a_proxy_is_asked_for_by_absolute_url() -> None:
    seen: list[str] = []

    def answer(request: StubRequest) -> StubAnswer:
        seen.append(request.path)
        return StubAnswer(200, b'{"kind": "NamespaceList", "items": []}')

    with StubHTTPServer(answer) as proxy:
        kube = KubeClient(
            ClusterConnection("http://apiserver.internal:8080/k8s", False, None, proxy=proxy.url)
        )
        assert kube.request("GET", "/api/v1/namespaces")["items"] == []
    assert seen == ["http://apiserver.internal:8080/k8s/api/v1/namespaces"]


def test_connections_to_the_api_server_keep_alive_so_a_half_open_watch_is_given_up() -> None:
    """Without keepalive, a watch whose connection a load balancer dropped silently stood still until its
    read timeout (~5 min), and its kind's cache with it."""
    import socket

    for _, kube, _ in serving([OK]):
        kube.request("GET", "/api/v1/namespaces/default/events/e")
        connection = kube._http._new_conn()  # as the pool makes each of its connections
        connection.connect()
        sock = connection.sock
        assert sock is not None
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            probes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            assert idle + probes * interval <= 60


@pytest.mark.parametrize("chunked", [True, False])
def test_a_watch_event_is_handed_on_when_it_arrives_chunked_or_not(chunked: bool) -> None:
    """Behind a proxy that drops chunked encoding, events were held until 64 KiB had come or the watch
    ended (~5 min): the cache, and the resync that reads it, stood still meanwhile."""
    import socket
    import threading

    first_seen = threading.Event()
    server_saw: list[bool] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def event(name: str) -> bytes:
        obj = {"metadata": {"name": name, "namespace": "d", "resourceVersion": "2"}}
        return json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n"

    def serve() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        encoding = b"Transfer-Encoding: chunked" if chunked else b"Connection: close"
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + encoding + b"\r\n\r\n")
        for name in ("first", "second"):
            line = event(name)
            connection.sendall(b"%x\r\n%s\r\n" % (len(line), line) if chunked else line)
            if name == "first":
                server_saw.append(first_seen.wait(10))  # the client has it before anything more is sent
        if chunked:
            connection.sendall(b"0\r\n\r\n")
        connection.close()

    threading.Thread(target=serve, daemon=True).start()
    kube = KubeClient(ClusterConnection(f"http://127.0.0.1:{listener.getsockname()[1]}", False, None))
    try:
        names = []
        for watched in kube.watch_raw("taskruns", None, "1", 30):
            names.append(watched["object"]["metadata"]["name"])
            first_seen.set()
    finally:
        kube.close()
        listener.close()
    assert names == ["first", "second"] and server_saw == [True]


def test_token_bucket_allows_burst_then_paces() -> None:
    clock = [0.0]
    slept: list[float] = []
    bucket = TokenBucket(10, 5, clock=lambda: clock[0], sleep=lambda s: slept.append(s))
    for _ in range(5):
        assert bucket.acquire() == 0
    assert bucket.acquire() == pytest.approx(0.1)
    clock[0] += 1.0
    assert bucket.acquire() == 0
