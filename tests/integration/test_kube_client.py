"""KubeClient calls whose meaning depends on the real API server's answers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubechain.kube.client import KubeClient
from kubechain.kube.errors import Conflict, Gone, NotFound
from kubechain.models import LocalObjectReference, ObjectMeta, TaskRun, TaskRunSpec
from kubechain.testing.stack import DEPLOYED_LEASE, deployed_watcher


def test_count_events_counts_beyond_the_one_item_it_lists(kube: KubeClient, namespace: str) -> None:
    assert kube.count_events(namespace) == 0
    for index in range(5):
        kube.create_event(
            namespace,
            {
                "metadata": {"name": f"counted-{index}"},
                "involvedObject": {"kind": "TaskRun", "name": "run", "namespace": namespace},
                "reason": "Counted",
                "message": "one of five",
                "type": "Normal",
            },
        )
    assert kube.count_events(namespace) == 5


def test_deployed_watcher_finds_a_kubechain_leading_in_the_cluster(
    kube: KubeClient, kubeconfig: Path, namespace: str
) -> None:
    """What keeps ``kubechain up`` from starting a second KubeChain in a cluster that runs one (deploy/).
    The Lease is in a namespace of this test's own (deploy/'s kubechain-system comes and goes with other
    tests)."""
    lease_at = (namespace, DEPLOYED_LEASE[1])
    assert deployed_watcher(str(kubeconfig), lease_at) is None
    renewed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    spec = {"holderIdentity": "watcher-0", "leaseDurationSeconds": 15, "renewTime": renewed}
    lease = kube.create_lease(
        namespace, {"metadata": {"name": lease_at[1], "namespace": namespace}, "spec": spec}
    )
    assert deployed_watcher(str(kubeconfig), lease_at) == "watcher-0"
    lease["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"
    kube.replace_lease(namespace, lease_at[1], lease)
    assert deployed_watcher(str(kubeconfig), lease_at) is None, "a lease its holder stopped renewing"


def test_a_delete_with_a_resource_version_removes_only_the_object_in_that_state(
    kube: KubeClient, namespace: str
) -> None:
    run = kube.create(
        TaskRun(
            metadata=ObjectMeta(name="doomed", namespace=namespace),
            spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="hi"),
        )
    )
    moved = kube.patch_status(run, {"phase": "Pending"})
    with pytest.raises(Conflict):
        kube.delete(TaskRun.PLURAL, namespace, run.name, resource_version=run.resource_version)
    assert kube.get_raw(TaskRun.PLURAL, namespace, run.name)["metadata"]["uid"] == run.uid
    kube.delete(TaskRun.PLURAL, namespace, run.name, resource_version=moved.resource_version)
    with pytest.raises(NotFound):
        kube.get_raw(TaskRun.PLURAL, namespace, run.name)


def test_a_list_in_pages_is_one_snapshot_of_every_object(kube: KubeClient, namespace: str) -> None:
    for index in range(7):
        kube.create(
            TaskRun(
                metadata=ObjectMeta(name=f"paged-{index}", namespace=namespace),
                spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="hi"),
            )
        )
    pages = list(kube.list_pages(TaskRun.PLURAL, namespace, page_size=3))
    assert [len(items) for items, _ in pages] == [3, 3, 1]
    names = [item["metadata"]["name"] for items, _ in pages for item in items]
    assert sorted(names) == [f"paged-{i}" for i in range(7)]
    versions = {version for _, version in pages}
    assert len(versions) == 1 and versions != {""}  # every page is of the first page's snapshot


def test_a_read_no_older_than_a_version_is_that_version_or_newer(kube: KubeClient, namespace: str) -> None:
    """What a worker's first read asks for: the version the watcher saw, or newer (the watch cache may
    answer); a later version than the server has seen is refused as Gone, which the worker reads past."""
    run = kube.create(
        TaskRun(
            metadata=ObjectMeta(name="cached", namespace=namespace),
            spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="hi"),
        )
    )
    moved = kube.patch_status(run, {"phase": "Pending"})
    for seen in (run.resource_version, moved.resource_version):
        got = kube.get(TaskRun, namespace, run.name, not_older_than=seen)
        assert int(got.resource_version) >= int(seen) and got.uid == run.uid
    assert kube.get(TaskRun, namespace, run.name, not_older_than=moved.resource_version).phase == "Pending"
    with pytest.raises(Gone):  # after the API server's few seconds of waiting for its cache to get there
        kube.get(TaskRun, namespace, run.name, not_older_than=str(int(moved.resource_version) + 10**9))


def _kubeconfig_with_proxy(kubeconfig: Path, proxy_url: str, tmp_path: Path) -> str:
    import yaml

    config = yaml.safe_load(kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["proxy-url"] = proxy_url
    path = tmp_path / "kubeconfig-with-proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_kubeconfig_proxy_url_carries_every_request_to_the_api_server(
    kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubechain.kube.connection import load_connection
    from tests.unit.proxy_stub import ConnectProxy

    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with ConnectProxy() as proxy:
        connection = load_connection(_kubeconfig_with_proxy(kubeconfig, proxy.url, tmp_path))
        kube = KubeClient(connection)
        try:
            names = [ns["metadata"]["name"] for ns in kube.request("GET", "/api/v1/namespaces")["items"]]
        finally:
            kube.close()
    assert "default" in names  # TLS to the API server, inside the tunnel, checked as without a proxy
    server = connection.host.removeprefix("https://")
    assert proxy.targets == [server]


def test_https_proxy_from_the_environment_leaves_a_server_on_this_machine_direct(
    kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As kubectl (Go's ProxyFromEnvironment): a proxy set for the machine's egress is not used for a
    loopback API server, which it could not reach."""
    from kubechain.kube.connection import load_connection
    from tests.unit.proxy_stub import ConnectProxy

    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        kube = KubeClient(load_connection(str(kubeconfig)))
        try:
            assert kube.request("GET", "/api/v1/namespaces/default")["metadata"]["name"] == "default"
        finally:
            kube.close()
    assert proxy.targets == []
