"""``/healthz``: the liveness of a worker is its consumer loop turning, of the watcher its loop threads
living; ``/metrics`` alone answered from a thread of its own while the rest was stuck."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from kubechain.observability.health import Health, Heartbeat, threads_health
from kubechain.observability.metrics import serve
from tests.unit.test_metrics import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_heartbeat_is_alive_while_beaten_and_stuck_once_it_stops() -> None:
    clock = Clock()
    heartbeat = Heartbeat(stale_after_s=60, clock=clock)
    assert heartbeat.health() == Health(False, "starting: the loop has not turned yet")
    heartbeat.beat()
    clock.now += 59
    assert heartbeat.health() == Health(True, "ok")
    clock.now += 2
    assert heartbeat.health() == Health(False, "stuck: the loop has not turned for 61s")
    heartbeat.beat()
    assert heartbeat.health().alive


def test_a_paused_heartbeat_is_alive_and_says_why_until_it_beats_again() -> None:
    clock = Clock()
    heartbeat = Heartbeat(stale_after_s=60, clock=clock)
    heartbeat.beat()
    heartbeat.pause("reconnecting to the broker")
    clock.now += 300
    heartbeat.pause("reconnecting to the broker")  # a second stop keeps the first one's time
    assert heartbeat.health() == Health(True, "reconnecting to the broker (for 300s)")
    heartbeat.beat()
    clock.now += 61
    assert not heartbeat.health().alive, "beating again ends the pause: a loop stuck after it is stuck"


def test_threads_health_names_the_threads_that_ended() -> None:
    stop = threading.Event()
    living = threading.Thread(target=stop.wait, name="watch-taskruns", daemon=True)
    ended = threading.Thread(target=lambda: None, name="enqueue", daemon=True)
    living.start()
    ended.start()
    ended.join()
    try:
        assert threads_health(lambda: [living])() == Health(True, "ok")
        assert threads_health(lambda: [living, ended])() == Health(False, "thread(s) ended: enqueue")
    finally:
        stop.set()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_metrics_port_serves_healthz_beside_metrics() -> None:
    registry = CollectorRegistry()
    Counter("kubechain_test_things", "things", registry=registry).inc()
    verdicts = [Health(True, "ok"), Health(False, "stuck: the loop has not turned for 75s")]

    def check() -> Health:
        if not verdicts:
            raise RuntimeError("boom")
        return verdicts.pop(0)

    port = free_port()
    serve(port, registry, check)
    base = f"http://127.0.0.1:{port}"
    assert get(f"{base}/healthz") == (200, "ok\n")
    assert get(f"{base}/healthz") == (503, "stuck: the loop has not turned for 75s\n")
    status, body = get(f"{base}/healthz")
    assert status == 503 and "the health check failed" in body and "boom" in body
    status, body = get(f"{base}/metrics")
    assert status == 200 and "kubechain_test_things_total 1.0" in body


class FakeTimer:
    def __init__(self) -> None:
        self.beats: list[Any] = []
        self.cancelled = 0

    def call_repeatedly(self, seconds: float, fun: Any) -> FakeTimer:
        self.beats.append((seconds, fun))
        return self

    def cancel(self) -> None:
        self.cancelled += 1


def test_the_worker_beats_from_its_consumer_timer_and_pauses_while_it_reconnects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import workers.app as worker_app

    clock = Clock()
    heartbeat = Heartbeat(stale_after_s=60, clock=clock)
    monkeypatch.setattr(worker_app, "consumer_heartbeat", heartbeat)
    assert worker_app.ConsumerHeartbeat in worker_app.app.steps["consumer"], "the consumer runs the step"
    consumer = type("Consumer", (), {"timer": FakeTimer()})()
    step = worker_app.ConsumerHeartbeat(consumer)

    step.start(consumer)
    assert heartbeat.health() == Health(True, "ok")
    [(seconds, beat)] = consumer.timer.beats
    assert seconds <= 10, "well inside the stale limit"
    clock.now += 61
    assert not heartbeat.health().alive
    beat()  # the consumer's loop fires the timer
    assert heartbeat.health().alive

    step.stop(consumer)  # Celery lost the broker and stops the consumer's steps to reconnect
    assert consumer.timer.cancelled == 1
    clock.now += 600
    assert heartbeat.health() == Health(True, "reconnecting to the broker (for 600s)")
    step.start(consumer)
    assert heartbeat.health() == Health(True, "ok")


def test_the_metrics_port_serves_readyz_as_its_readiness_check_says_or_else_as_healthz() -> None:
    registry = CollectorRegistry()
    ready = [Health(False, "starting: the first list of taskruns is not in yet"), Health(True, "ok")]
    port = free_port()
    serve(port, registry, lambda: Health(True, "ok"), readiness=lambda: ready.pop(0))
    base = f"http://127.0.0.1:{port}"
    assert get(f"{base}/readyz") == (503, "starting: the first list of taskruns is not in yet\n")
    assert get(f"{base}/healthz") == (200, "ok\n"), (
        "alive meanwhile: a long first list is no reason to restart"
    )
    assert get(f"{base}/readyz") == (200, "ok\n")

    alone = free_port()  # a worker: ready when alive
    serve(alone, registry, lambda: Health(False, "starting: the loop has not turned yet"))
    assert get(f"http://127.0.0.1:{alone}/readyz") == (503, "starting: the loop has not turned yet\n")


class Running:
    """A watcher process that runs (its answers come from a stub server)."""

    def running(self) -> bool:
        return True


def test_up_is_up_once_the_watcher_has_listed_what_exists_not_when_it_first_answers(tmp_path: Path) -> None:
    """`kubechain up` said KubeChain was up once the watcher answered on /healthz, which it does before its
    first lists of the resources: "up" did not yet mean it had seen what exists."""
    from kubechain.testing.stack import LocalStack, StackOptions
    from tests.unit.http_stub import StubAnswer, StubHTTPServer, StubRequest

    readiness_asked: list[str] = []

    def answer(request: StubRequest) -> StubAnswer:
        if request.path == "/readyz":
            readiness_asked.append(request.path)
            if len(readiness_asked) < 3:
                return StubAnswer(503, b"starting: the first list of taskruns is not in yet\n")
        return StubAnswer(200, b"ok\n")

    stack = LocalStack(StackOptions(workdir=tmp_path), progress=lambda _: None)
    with StubHTTPServer(answer) as watcher:
        stack.watchers["watcher-0"] = Running()  # type: ignore[assignment]
        stack.metrics_ports["watcher-0"] = int(watcher.url.rsplit(":", 1)[1])
        stack.wait_until_serving(timeout_s=30)
    assert len(readiness_asked) == 3, "up waited until the watcher said it was ready"
