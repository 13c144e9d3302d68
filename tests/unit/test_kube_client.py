"""KubeClient logic that holds against any API server, on the in-memory one (see also
tests/integration/test_kube_client.py)."""

from __future__ import annotations

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
