"""KubeClient calls whose meaning depends on the real API server's answers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from kubechain.kube.client import KubeClient
from kubechain.kube.errors import AlreadyExists
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
    kube: KubeClient, kubeconfig: Path
) -> None:
    """What keeps ``kubechain up`` from starting a second KubeChain in a cluster that runs one (deploy/)."""
    namespace, name = DEPLOYED_LEASE
    try:
        kube.request(
            "POST",
            "/api/v1/namespaces",
            body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        )
    except AlreadyExists:
        pass
    assert deployed_watcher(str(kubeconfig)) is None
    renewed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    spec = {"holderIdentity": "watcher-0", "leaseDurationSeconds": 15, "renewTime": renewed}
    lease = kube.create_lease(namespace, {"metadata": {"name": name, "namespace": namespace}, "spec": spec})
    try:
        assert deployed_watcher(str(kubeconfig)) == "watcher-0"
        lease["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"
        kube.replace_lease(namespace, name, lease)
        assert deployed_watcher(str(kubeconfig)) is None, "a lease its holder stopped renewing"
    finally:
        kube.request("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")
