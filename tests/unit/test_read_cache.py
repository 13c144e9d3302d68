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


def test_read_cache_lets_go_of_what_has_expired() -> None:
    """Expired entries were dropped only once the cache held 10,000: a tools worker reads each call's
    parent TaskRun through it, context window and all, and kept every run it had served (1,000 runs of
    100 KB each held 107 MB an hour after their 2 s TTL), deleted runs too."""
    import gc
    import weakref

    from kubechain.kube.cache import TTLReadCache
    from kubechain.kube.errors import NotFound
    from kubechain.models import TaskRun
    from tests.unit.fakes import create

    kube = FakeKubeClient()
    for index in range(3):
        create(kube, "TaskRun", "taskruns", f"r{index}", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    now = [0.0]
    cache = TTLReadCache(kube, ttl_s=2.0, clock=lambda: now[0])
    read = [weakref.ref(cache.get(TaskRun, "default", f"r{index}")) for index in range(3)]
    now[0] += 1.0
    gc.collect()
    assert all(ref() is not None for ref in read), "within its TTL an entry is kept"
    kube.request("DELETE", "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/taskruns/r0")
    now[0] += 3600.0
    with pytest.raises(NotFound):
        cache.get(TaskRun, "default", "r0")  # any later read, even a miss, lets go of the expired
    gc.collect()
    assert [ref() for ref in read] == [None, None, None]


def test_read_cache_holds_no_more_than_its_bound_of_entries() -> None:
    """Within the TTL too: a burst of distinct reads must not grow it without limit."""
    import gc
    import weakref

    from kubechain.kube.cache import TTLReadCache
    from kubechain.models import TaskRun
    from tests.unit.fakes import create

    kube = FakeKubeClient()
    for index in range(4):
        create(kube, "TaskRun", "taskruns", f"r{index}", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    cache = TTLReadCache(kube, ttl_s=60.0, clock=lambda: 0.0, max_entries=3)
    read = [weakref.ref(cache.get(TaskRun, "default", f"r{index}")) for index in range(4)]
    gc.collect()
    assert read[0]() is None and all(ref() is not None for ref in read[1:]), "the oldest goes first"
    reads = len(kube.requests)
    cache.get(TaskRun, "default", "r3")
    assert len(kube.requests) == reads, "the newest are still served from the cache"
