"""The configuration read cache (kubechain.kube.cache), and the one a worker's threads share."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from kubechain.kube.fake import FakeKubeClient


def test_read_cache_never_remembers_absence() -> None:
    from kubechain.kube.cache import TTLReadCache
    from kubechain.kube.errors import NotFound
    from kubechain.kube.fake import FakeKubeClient
    from kubechain.models import Agent

    kube = FakeKubeClient()
    cache = TTLReadCache(kube, ttl_s=60)
    with pytest.raises(NotFound):
        cache.get(Agent, "default", "late")
    kube.create_raw(
        "agents",
        "default",
        {
            "apiVersion": "kubechain.humanlayer.dev/v1alpha1",
            "kind": "Agent",
            "metadata": {"name": "late"},
            "spec": {"llmRef": {"name": "l"}, "system": "s"},
        },
    )
    assert cache.get(Agent, "default", "late").name == "late", "created after a miss: found at once"
    reads = len(kube.requests)
    cache.get(Agent, "default", "late")
    assert len(kube.requests) == reads, "present objects are served from the cache"


def test_a_workers_threads_share_one_config_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its first burst of tasks, on many threads at once, made one cache each (and read the API server
    once per thread)."""
    import time

    import workers.context
    from tests.unit.fakes import FakeLLM, context

    made: list[object] = []
    real = workers.context.TTLReadCache

    def slow_cache(*args: Any) -> Any:
        time.sleep(0.02)  # as long as it takes, other threads must wait for it, not make their own
        made.append(1)
        return real(*args)

    monkeypatch.setattr(workers.context, "TTLReadCache", slow_cache)
    ctx = context(FakeKubeClient(), FakeLLM(lambda _: None))  # type: ignore[arg-type,return-value]
    start = threading.Barrier(16)
    caches: list[object] = []

    def first_use() -> None:
        start.wait()
        caches.append(ctx.config_cache)

    threads = [threading.Thread(target=first_use) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and len({id(cache) for cache in caches}) == 1
