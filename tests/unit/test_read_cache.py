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


def test_a_copy_known_to_be_behind_is_read_again_even_the_one_a_read_in_flight_brings() -> None:
    """A worker told of a later version of an Agent (workers.llm_call, the watcher's agent_seen) must not
    take the copy another thread of its process was reading as the edit landed (whether it waits for that
    read or finds it stored): it finds it behind and reads again, storing the newer copy for the others.
    A copy that is not behind costs no read."""
    from kubechain.kube.cache import TTLReadCache
    from kubechain.kube.client import custom_path
    from kubechain.models import Agent
    from tests.unit.fakes import create

    class HeldRead(FakeKubeClient):
        """Holds the first GET, once answered, until released."""

        def __init__(self) -> None:
            super().__init__()
            self.answered = threading.Event()
            self.release = threading.Event()
            self.held = False

        def request(self, method: str, path: str, **kwargs: Any) -> Any:  # type: ignore[override]
            result = super().request(method, path, **kwargs)
            if method == "GET" and not self.held:
                self.held = True
                self.answered.set()
                assert self.release.wait(10)
            return result

    kube = HeldRead()
    create(kube, "Agent", "agents", "a", {"llmRef": {"name": "l"}, "system": "s"})
    cache = TTLReadCache(kube, ttl_s=3600.0)
    read_first: list[Agent] = []
    first = threading.Thread(target=lambda: read_first.append(cache.get(Agent, "default", "a")))
    first.start()
    assert kube.answered.wait(10)  # its copy is of generation 1, not stored yet
    kube.request("PATCH", custom_path("agents", "default", "a"), body={"spec": {"system": "edited"}})
    read_second: list[Agent] = []

    def behind(agent: Agent) -> bool:
        return (agent.metadata.generation or 0) < 2

    second = threading.Thread(
        target=lambda: read_second.append(cache.get(Agent, "default", "a", behind=behind))
    )
    second.start()
    kube.release.set()
    first.join(10)
    second.join(10)
    assert read_first[0].metadata.generation == 1
    assert read_second[0].metadata.generation == 2, "waited for the read in flight, found it behind"
    reads = len(kube.requests)
    assert cache.get(Agent, "default", "a").spec.system == "edited", "stored in its place"
    assert cache.get(Agent, "default", "a", behind=behind).metadata.generation == 2
    assert len(kube.requests) == reads, "not behind: from the cache"


def test_only_a_read_begun_since_read_since_will_do_and_callers_asking_before_it_began_share_it() -> None:
    """Before a tool call runs unapproved, its Tool's approval setting must be as the API server had it
    when the task began (workers.approvals): each of a fan-out's fifty calls read it from etcd. A read
    begun since will do: it is current when it starts. One in flight since earlier will not."""
    from kubechain.kube.cache import TTLReadCache
    from kubechain.kube.client import custom_path
    from kubechain.models import Agent
    from tests.unit.fakes import create

    class HeldRead(FakeKubeClient):
        """Holds a GET, once answered, while ``hold`` is set."""

        def __init__(self) -> None:
            super().__init__()
            self.hold = threading.Event()
            self.answered = threading.Event()
            self.release = threading.Event()

        def request(self, method: str, path: str, **kwargs: Any) -> Any:  # type: ignore[override]
            result = super().request(method, path, **kwargs)
            if method == "GET" and self.hold.is_set():
                self.hold.clear()
                self.answered.set()
                assert self.release.wait(10)
            return result

    def get_count(kube: FakeKubeClient) -> int:
        return sum(1 for r in kube.requests if r[0] == "GET")

    kube = HeldRead()
    create(kube, "Agent", "agents", "a", {"llmRef": {"name": "l"}, "system": "s"})
    now = [100.0]
    cache = TTLReadCache(kube, ttl_s=3600.0, clock=lambda: now[0])
    assert cache.get(Agent, "default", "a").spec.system == "s"  # read at 100
    now[0] = 101.0
    asked_at = cache.now()
    kube.request("PATCH", custom_path("agents", "default", "a"), body={"spec": {"system": "edited"}})
    reads = get_count(kube)
    assert cache.get(Agent, "default", "a").spec.system == "s", "any copy within its TTL: the cached one"
    assert cache.get(Agent, "default", "a", read_since=asked_at).spec.system == "edited"
    assert get_count(kube) == reads + 1
    assert cache.get(Agent, "default", "a", read_since=asked_at).spec.system == "edited"
    assert cache.get(Agent, "default", "a", read_since=asked_at - 0.5).spec.system == "edited"
    assert get_count(kube) == reads + 1, "asked before that read began: it will do"

    # a read in flight since before a caller asked will not do: not waited for, it reads at once
    now[0] = 102.0
    kube.hold.set()
    first: list[Agent] = []
    reader = threading.Thread(
        target=lambda: first.append(cache.get(Agent, "default", "a", read_since=cache.now()))
    )
    reader.start()
    assert kube.answered.wait(10)  # its copy says "edited", not stored yet
    now[0] = 103.0
    later = cache.now()
    kube.request("PATCH", custom_path("agents", "default", "a"), body={"spec": {"system": "again"}})
    second: list[Agent] = []
    waiting = threading.Thread(
        target=lambda: second.append(cache.get(Agent, "default", "a", read_since=later))
    )
    waiting.start()
    waiting.join(10)
    assert second and second[0].spec.system == "again", "read while the earlier read was held"
    kube.release.set()
    reader.join(10)
    assert first[0].spec.system == "edited"
    assert get_count(kube) == reads + 3
    assert cache.get(Agent, "default", "a", read_since=later).spec.system == "again", (
        "the earlier read, done last, is not stored over the later one"
    )
    assert get_count(kube) == reads + 3

    # callers asking before a read began join it while it is in flight
    now[0] = 104.0
    kube.hold.set()
    kube.answered.clear()
    kube.release.clear()
    asked = cache.now()
    now[0] = 105.0
    firsts: list[Agent] = []
    leader = threading.Thread(
        target=lambda: firsts.append(cache.get(Agent, "default", "a", read_since=asked))
    )
    leader.start()
    assert kube.answered.wait(10)
    joiners = [
        threading.Thread(target=lambda: firsts.append(cache.get(Agent, "default", "a", read_since=asked)))
        for _ in range(3)
    ]
    for joiner in joiners:
        joiner.start()
    kube.release.set()
    for thread in [leader, *joiners]:
        thread.join(10)
    assert len(firsts) == 4 and get_count(kube) == reads + 4
