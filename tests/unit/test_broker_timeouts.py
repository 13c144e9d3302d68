"""The broker's timeouts: a Redis that stops answering without closing the connection makes a publish fail,
not hang; and nothing is redelivered while a task or countdown may still be running."""

from __future__ import annotations

import socket
import threading

import pytest

from kubechain.queueing import ResourceMessage, TaskName, enqueue, make_celery
from kubechain.settings import Settings
from kubechain.testing.waiting import wait_for
from tests.unit.silent_server import SilentServer


@pytest.mark.slow
def test_a_publish_to_a_silent_broker_fails_within_the_socket_timeout() -> None:
    """Once, not retried: Celery's default publish retry policy sent it again 3 times, each waiting out
    the socket timeout, so one publish to a Redis that stopped answering blocked ~50 s (the watcher's
    single sender thread with it, not checking whether it still leads). Its callers back off themselves."""
    broker = SilentServer()  # a broker gone behind a NAT or a failover
    settings = Settings(redis_url=f"redis://127.0.0.1:{broker.port}/0", redis_socket_timeout_s=0.2)
    app = make_celery(settings)
    app.conf.broker_connection_retry_on_startup = False
    outcome: list[BaseException | None] = []

    def publish() -> None:
        try:
            enqueue(app, TaskName.VALIDATE, ResourceMessage(kind="Agent", namespace="default", name="a"))
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - what the watcher's sender catches
            outcome.append(exc)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(timeout=60)  # a bound on a hang, not a speed target
    assert not thread.is_alive(), "the publish hung on a broker that never answers"
    (error,) = outcome
    assert error is not None and "timeout" in f"{type(error).__name__} {error}".lower()
    # Each attempt opens a connection (a timed-out one is dropped). Connections are accepted in the order
    # they were made: once this last one is, every attempt's has been.
    last = socket.create_connection(("127.0.0.1", broker.port))
    wait_for(lambda: any(held.getpeername() == last.getsockname() for held in broker.held), timeout_s=10)
    last.close()
    broker.close()
    assert len(broker.held) - 1 == 1, "tried once"


def test_the_broker_redelivers_nothing_before_the_longest_task_or_countdown_is_over() -> None:
    """A claim timeout (a tool's execution cap follows it) or an LLM back-off above an hour had Redis
    redeliver running tasks and waiting countdowns once an hour, the copies piling up."""
    from kubechain.queueing import make_celery
    from kubechain.settings import Settings

    for settings in (Settings(claim_timeout_s=7200.0), Settings(llm_backoff_max_s=7200.0)):
        app = make_celery(settings)
        assert app.conf.broker_transport_options["visibility_timeout"] >= 2 * 7200.0
