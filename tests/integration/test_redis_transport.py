"""The broker transport against a real Redis: messages published from several threads arrive, acks clear
kombu's unacked index, and the channel reuses one Redis client instead of building one per operation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from kubechain.queueing import QueueName, ResourceMessage, TaskName, enqueue, make_celery
from kubechain.redis_transport import TRANSPORT_PATH, Channel, Transport, transport_for
from kubechain.settings import Settings

pytestmark = pytest.mark.integration


def test_transport_is_chosen_for_plain_redis_urls_only() -> None:
    assert transport_for("redis://127.0.0.1:6379/0") == TRANSPORT_PATH
    assert transport_for("rediss://redis.example:6380/0") is None
    assert transport_for("sentinel://sentinel:26379") is None


def test_publish_consume_ack_reuse_one_client(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sync_clients_by_channel: list[int] = []
    original = Channel._create_client

    def counting(self: Channel, asynchronous: bool = False) -> Any:
        if not asynchronous:
            sync_clients_by_channel.append(id(self))
        return original(self, asynchronous=asynchronous)

    monkeypatch.setattr(Channel, "_create_client", counting)
    db_url = redis_url.rsplit("/", 1)[0] + "/7"
    redis.Redis.from_url(db_url).flushdb()
    app = make_celery(Settings(redis_url=db_url), name="transport-test")
    messages = [ResourceMessage(kind="TaskRun", namespace="ns", name=f"run-{i}") for i in range(40)]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda m: enqueue(app, TaskName.PREPARE, m), messages))

    received: list[dict[str, Any]] = []
    with app.connection_for_read() as connection:
        assert isinstance(connection.transport, Transport)
        queue = connection.SimpleQueue(QueueName.CONTROL.value)
        for _ in messages:
            message = queue.get(timeout=10)
            received.append(message.headers)
            message.ack()
        queue.close()

    assert sorted(h["argsrepr"] for h in received) == sorted(f"[{m.key()} (event)]" for m in messages)
    client = redis.Redis.from_url(db_url)
    assert client.hlen("unacked") == 0
    assert client.zcard("unacked_index") == 0
    # 40 publishes, 40 unacked-index writes and 40 acks: kombu alone makes a client for each (120+).
    # With the transport, each channel (a few pooled producers, one consumer) makes its client once.
    assert sync_clients_by_channel
    assert len(sync_clients_by_channel) == len(set(sync_clients_by_channel)), sync_clients_by_channel


def test_acks_from_more_threads_than_kombus_default_pool_all_land(redis_url: str) -> None:
    """Each task thread acks its own message (acks_late), through the consumer channel's connection pool,
    which kombu caps at 10 and which refuses (MaxConnectionsError) rather than waits. When Redis stalls
    for a moment (an fsync, CLIENT PAUSE here), 64 threads acking at once each hold a connection: 54
    acks failed, and each left its message in ``unacked`` (redelivered an hour later) and one of the
    worker's prefetch slots in use for good."""
    import threading

    db_url = redis_url.rsplit("/", 1)[0] + "/8"
    client = redis.Redis.from_url(db_url)
    client.flushdb()
    app = make_celery(Settings(redis_url=db_url), name="ack-pool-test")
    app.conf.worker_prefetch_multiplier = 64
    threads = 64
    for i in range(threads):
        enqueue(app, TaskName.PREPARE, ResourceMessage(kind="TaskRun", namespace="ns", name=f"run-{i}"))
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(QueueName.CONTROL.value)
        queue.consumer.qos(prefetch_count=threads)
        messages = [queue.get(timeout=10) for _ in range(threads)]
        assert client.hlen("unacked") == threads
        failures: list[BaseException] = []
        start = threading.Barrier(threads + 1)

        def ack(message: Any) -> None:
            start.wait()
            try:
                message.ack()
            except Exception as exc:  # noqa: BLE001 - what Celery logs as "Couldn't ack" and goes on
                failures.append(exc)

        workers = [threading.Thread(target=ack, args=(m,)) for m in messages]
        for worker in workers:
            worker.start()
        client.execute_command("CLIENT", "PAUSE", "300", "WRITE")  # every ack waits, holding its connection
        start.wait()
        for worker in workers:
            worker.join(timeout=30)
        queue.close()
    assert failures == []
    assert client.hlen("unacked") == 0
