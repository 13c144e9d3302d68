"""kombu's Redis transport with one synchronous Redis client per channel.

kombu builds a new ``redis.Redis`` for every publish, ack and unacked-index write. redis-py 5+ fills a
~150-entry response-callback table in each new client, which was ~10 % of a worker's CPU and ~5 % of the
watcher's in the hello benchmark. A ``redis.Redis`` over a connection pool is thread-safe, so a channel can
keep one. It is rebuilt when kombu replaces the channel's pool (after a fork or a reconnect).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from kombu.transport import redis as kombu_redis

TRANSPORT_PATH = "kubechain.redis_transport:Transport"


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    _sync_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        if self._sync_client is None or self._sync_client.connection_pool is not pool:
            self._sync_client = self._create_client()
        yield self._sync_client


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """This transport for plain ``redis://`` URLs; kombu's own choice for the rest (``rediss``, sentinel)."""
    return TRANSPORT_PATH if urlparse(broker_url).scheme == "redis" else None
