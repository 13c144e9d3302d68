"""The benchmark's API-server profile: categories of sampled stacks, the recorder, the report line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.apiserver_profile import OTHER, ProfileRecorder, category_of, cpu_shares
from bench.report import apiserver_profile_summary
from kubechain.testing.waiting import wait_for

SEPARATOR = "-----------+-------------------------------------------------------"
PATCH = [
    "k8s.io/apiextensions-apiserver/pkg/registry/customresource.(*StatusREST).Update",
    "k8s.io/apiserver/pkg/endpoints/handlers.(*patcher).patchResource.func2",
    "k8s.io/apiserver/pkg/endpoints/handlers/finisher.finishRequest.func1",
]
EVENT = [
    "k8s.io/apiserver/pkg/endpoints/handlers.CreateResource.createHandler.func1",
    "k8s.io/apiserver/pkg/endpoints/handlers/finisher.finishRequest.func1",
]
GC = ["runtime.gcDrain", "runtime.gcBgMarkWorker"]


def traces(*samples: tuple[str, list[str]]) -> str:
    header = "File: kube-apiserver\nType: cpu\nDuration: 2s, Total samples = 100ms (5%)\n"
    blocks = [
        f"{value:>10}   {frames[0]}\n" + "".join(f"             {frame}\n" for frame in frames[1:])
        for value, frames in samples
    ]
    return header + "".join(f"{SEPARATOR}\n{block}" for block in blocks) + SEPARATOR + "\n"


def test_a_stack_goes_to_the_first_category_that_marks_it() -> None:
    assert category_of(["runtime.mallocgc", *PATCH]) == "status writes"
    # A status write's TLS read is still the status write's; a bare TLS read is transport.
    assert category_of(["crypto/tls.(*Conn).Read", *PATCH]) == "status writes"
    assert category_of(["crypto/tls.(*Conn).Read", "net/http.(*conn).serve"]) == "HTTP, TLS and filters"
    assert category_of(EVENT) == "Events (creates of core objects)"
    assert (
        category_of(
            [
                "k8s.io/apiserver/pkg/endpoints/handlers.CreateResource.createHandler.func1",
                "k8s.io/apiextensions-apiserver/pkg/apiserver.(*crdHandler).serveResource.CreateResource.createHandler.func9.2",
            ]
        )
        == "creates (custom resources)"
    )
    assert category_of(GC) == "Go garbage collection"
    assert category_of(["runtime.futex", "runtime.mcall"]) == OTHER


def test_cpu_shares_add_up_the_samples_of_each_category_in_any_unit() -> None:
    text = traces(
        ("40ms", ["runtime.memmove", *PATCH]),
        ("0.02s", PATCH),
        ("10ms", EVENT),
        ("20000us", GC),
        ("10ms", ["runtime.futex"]),
    )
    assert cpu_shares(text) == {
        "status writes": 60.0,
        "Events (creates of core objects)": 10.0,
        "Go garbage collection": 20.0,
        OTHER: 10.0,
    }
    # Largest first (the order the report shows them in).
    assert list(cpu_shares(text))[:2] == ["status writes", "Go garbage collection"]
    assert cpu_shares("File: kube-apiserver\nType: cpu\n") == {}


class FakeSource:
    """Answers /debug/pprof/profile like the API server: after the profile's seconds (here: at once
    for the first ``answers``; later ones end when the recorder is being stopped)."""

    def __init__(self, status: int = 200, answers: int = 2) -> None:
        self.status = status
        self.answers = answers
        self.paths: list[str] = []
        self.stopping: Callable[[], bool] = lambda: True

    def request(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        self.paths.append(path)
        if len(self.paths) > self.answers:
            wait_for(self.stopping, timeout_s=10, what="the recorder to be stopped")
        return self.status, f"profile {len(self.paths)}".encode()


def test_recorder_keeps_consecutive_profiles_until_stopped(tmp_path: Path) -> None:
    source = FakeSource()
    recorder = ProfileRecorder(source, tmp_path / "profiles" / "hello", chunk_s=3)
    source.stopping = lambda: recorder.stopping
    recorder.start()
    wait_for(lambda: len(source.paths) == 3, timeout_s=10, what="a third profile requested")
    files = recorder.stop()
    # The profile being taken when stop was asked for is kept too: it covers the window's end.
    assert [f.name for f in files] == ["hello-1.pprof", "hello-2.pprof", "hello-3.pprof"]
    assert [f.read_bytes() for f in files] == [b"profile 1", b"profile 2", b"profile 3"]
    assert set(source.paths) == {"/debug/pprof/profile?seconds=3"}
    assert recorder.error is None


@pytest.mark.parametrize(
    ("source", "error"),
    [(FakeSource(status=404), "answered 404 (is --profiling=true set?)"), (None, "RuntimeError: refused")],
)
def test_recorder_notes_why_there_is_no_profile(
    tmp_path: Path, source: FakeSource | None, error: str
) -> None:
    class Refusing:
        def request(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
            raise RuntimeError("refused")

    recorder = ProfileRecorder(source or Refusing(), tmp_path / "p").start()
    wait_for(lambda: recorder.error is not None, timeout_s=10, what="the recorder to give up")
    assert recorder.stop() == []
    assert recorder.error is not None and recorder.error.endswith(error)


def test_report_line_lists_the_shares_or_says_why_there_are_none() -> None:
    profile = {"cpu_shares_pct": {"status writes": 41.2, "Go garbage collection": 14.6}}
    assert (
        apiserver_profile_summary({"apiserver_profile": profile})
        == "API server CPU: status writes 41 %, Go garbage collection 15 %"
    )
    assert apiserver_profile_summary({"apiserver_profile": {"error": "no profile was taken"}}) == (
        "API server profile: no profile was taken"
    )
    assert apiserver_profile_summary({}) is None
