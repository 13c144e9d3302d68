"""The Kubernetes client waits out an API server that sheds load (429 + Retry-After), as client-go does."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from kubechain.kube.client import THROTTLE_RETRIES, THROTTLE_WAIT_MAX_S, KubeClient
from kubechain.kube.connection import ClusterConnection
from kubechain.kube.errors import Unavailable
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
        yield server, KubeClient(ClusterConnection(server.url, False, None), sleep=waits.append), waits


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


@pytest.mark.parametrize("stub", [[refusal(503, "1"), OK]], indirect=True, ids=["503-retry-after"])
def test_a_5xx_with_retry_after_is_waited_out_for_a_read(
    stub: tuple[StubHTTPServer, KubeClient, list[float]],
) -> None:
    server, kube, waits = stub
    assert kube.request("GET", "/api/v1/namespaces/default/events/e")["metadata"]["name"] == "e"
    assert len(server.requests) == 2
    assert waits == [1.0]


@pytest.mark.parametrize("stub", [[refusal(503, "1"), OK]], indirect=True, ids=["503-retry-after"])
def test_a_write_answered_5xx_is_not_sent_again_it_may_have_been_applied(
    stub: tuple[StubHTTPServer, KubeClient, list[float]],
) -> None:
    server, kube, waits = stub
    with pytest.raises(Unavailable):
        kube.request("PUT", "/apis/x/v1/namespaces/default/taskruns/r/status", body={"status": {}})
    assert len(server.requests) == 1
    assert waits == []


@pytest.mark.parametrize("stub", [[refusal(500, None), OK]], indirect=True, ids=["500-bare"])
def test_a_5xx_without_retry_after_is_the_callers_outage(
    stub: tuple[StubHTTPServer, KubeClient, list[float]],
) -> None:
    server, kube, waits = stub
    with pytest.raises(Unavailable):
        kube.request("GET", "/api/v1/namespaces/default/events/e")
    assert len(server.requests) == 1


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


def test_a_socks_proxy_is_refused_with_what_to_do() -> None:
    connection = ClusterConnection("https://127.0.0.1:6443", False, None, proxy="socks5://127.0.0.1:1080")
    with pytest.raises(ValueError, match="only to http:// and https:// proxies"):
        KubeClient(connection)


def test_no_proxy_sends_the_server_direct() -> None:
    connection = ClusterConnection(
        "https://10.0.0.1:443", False, None, proxy="http://proxy:3128", no_proxy="10.0.0.0/8"
    )
    assert connection.proxy_for_server() is None
    assert ClusterConnection("https://10.0.0.1", False, None, proxy="http://p:3128").proxy_for_server()
