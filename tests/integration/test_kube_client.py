"""KubeClient calls whose meaning depends on the real API server's answers."""

from __future__ import annotations

from kubechain.kube.client import KubeClient


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
