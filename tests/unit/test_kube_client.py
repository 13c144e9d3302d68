"""KubeClient logic that holds against any API server, on the in-memory one (see also
tests/integration/test_kube_client.py)."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from kubechain.kube.fake import FakeKubeClient
from kubechain.models import TaskRun
from tests.unit.fakes import create


def test_a_status_write_merges_into_the_version_it_read() -> None:
    """patch_status PUTs the whole status: the read version's (fields this model does not know kept),
    with the patch merged in (None deletes); a version that moved meanwhile is a Conflict."""
    from kubechain.kube.errors import Conflict

    kube = FakeKubeClient()
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    kube.patch_status_raw(
        "taskruns", "default", "r", None, {"phase": "ReadyForLLM", "error": "old", "fromANewerVersion": 7}
    )
    run = kube.get(TaskRun, "default", "r")
    written = kube.patch_status(run, {"phase": "FinalAnswer", "output": "42", "error": None})
    stored = kube.get_raw("taskruns", "default", "r")
    assert stored["status"] == {"phase": "FinalAnswer", "output": "42", "fromANewerVersion": 7}
    assert stored["spec"] == {"agentRef": {"name": "a"}, "userMessage": "hi"}
    assert written.status.output == "42" and written.resource_version == stored["metadata"]["resourceVersion"]
    assert kube.requests[-2][0] == "PUT"
    with pytest.raises(Conflict):
        kube.patch_status(run, {"phase": "Failed"})
    assert kube.get_raw("taskruns", "default", "r")["status"]["phase"] == "FinalAnswer"
    # A model not read from the API server has no known wire status: a conditional merge patch instead.
    built = TaskRun.model_validate(kube.get_raw("taskruns", "default", "r"))
    kube.patch_status(built, {"error": "e"})
    assert kube.requests[-1][0] == "PATCH"
    assert kube.get_raw("taskruns", "default", "r")["status"]["fromANewerVersion"] == 7
    with pytest.raises(Conflict):
        kube.patch_status(built, {"error": "stale"})


@pytest.mark.parametrize("name", ["x?watch=true", "x#y", "x y"])
def test_a_name_from_elsewhere_is_one_path_segment(name: str) -> None:
    """A Tool's name comes from the LLM (the function it called), a Secret's from a Tool's spec: sent as
    it was, "x?watch=true" set a query."""
    from kubechain.kube.client import KubeClient
    from kubechain.kube.connection import ClusterConnection
    from kubechain.kube.errors import NotFound
    from kubechain.models import Tool
    from tests.unit.http_stub import StubAnswer, StubHTTPServer, StubRequest

    def answer(request: StubRequest) -> StubAnswer:
        return StubAnswer(404, json.dumps({"kind": "Status", "code": 404, "reason": "NotFound"}).encode())

    with StubHTTPServer(answer) as server:
        kube = KubeClient(ClusterConnection(server.url, False, None))
        with pytest.raises(NotFound):
            kube.get(Tool, "default", name)
        with pytest.raises(NotFound):
            kube.read_secret("default", name)
    tool_path, secret_path = [request.path for request in server.requests]
    assert (
        tool_path
        == f"/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/tools/{quote(name, safe='')}"
    )
    assert secret_path == f"/api/v1/namespaces/default/secrets/{quote(name, safe='')}"


@pytest.mark.parametrize("name", [".", "..", "../../otherns/tools/x", "a/b", "a%2Fb"])
def test_a_name_no_object_may_have_is_not_sent(name: str) -> None:
    """ "../../otherns/tools/x" read another namespace's object through anything between the worker and
    the API server that resolves dot segments; percent-encoded, the API server splits it at its "/" all
    the same, and leaves "." and ".." as they are. No object may be named so: NotFound, and no request."""
    from kubechain.kube.errors import NotFound
    from kubechain.models import Tool

    kube = FakeKubeClient()
    create(kube, "Tool", "tools", "x", {"description": "d"}, namespace="otherns")
    with pytest.raises(NotFound) as missing:
        kube.get(Tool, "default", name)
    assert not missing.value.kind_unknown
    with pytest.raises(NotFound):
        kube.read_secret("default", name)
    assert [request for request in kube.requests if request[0] == "GET"] == []
    assert kube.get(Tool, "otherns", "x").name == "x"


@pytest.mark.parametrize(
    "message",
    [
        "etcdserver: request is too large",
        # the API server's etcd client, over its 2 MiB send limit, and etcd, over its receive limit
        "rpc error: code = ResourceExhausted desc = trying to send message larger than max (2500513 vs. 2097152)",
        "rpc error: code = ResourceExhausted desc = grpc: received message larger than max (3000000 vs. 2097152)",
    ],
)
def test_a_500_for_a_request_over_etcds_limits_is_too_large_not_an_outage(message: str) -> None:
    from kubechain.kube.errors import TooLarge, error_for

    assert type(error_for(500, {"reason": "InternalError", "message": message})) is TooLarge


def test_a_500_for_other_resource_exhaustion_is_an_outage() -> None:
    from kubechain.kube.errors import Unavailable, error_for

    refused = error_for(500, {"message": "rpc error: code = ResourceExhausted desc = too many requests"})
    assert type(refused) is Unavailable
