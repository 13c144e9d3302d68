"""A hard deadline for an HTTP answer being read, which httpx's timeouts are not.

httpx (and httpx2, the LLM SDKs' fork of it, over httpcore2) time each read, not the whole answer: a
server that sends a little just before each read would time out holds the caller up to one more read
timeout past its deadline. For a call made under a claim (an LLM turn, a tool call) that is past the
claim, and another worker makes the call again. The same holds before the answer: a server that
trickles its status line and headers, or a slow TLS handshake, is read one timed read after another; and
resolving the host's name (getaddrinfo, which no socket timeout reaches) is not timed at all. Every wait is
given the time left, and the socket waited on is shut down at the deadline (by one thread for all,
``_Shutter``), which ends a call made of many waits (TLS inside an https:// proxy's) too.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpcore
import httpcore2
import httpx
import httpx2

from kubechain.name_resolution import ResolutionTimedOut, addresses_by, is_address

log = logging.getLogger(__name__)


class ShutAtDeadline:
    """A socket to be shut down at a deadline, unless cancelled first (``cancel``)."""

    __slots__ = ("deadline", "sock", "cancelled", "fired")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.deadline = deadline
        self.sock = sock
        self.cancelled = False
        self.fired = False  # shut down at its deadline

    def cancel(self) -> bool:
        """Not to be shut down (any more); whether it was, at its deadline."""
        return _shutter.cancel(self)


# The longest the shutter's thread waits at once before it looks at its heap again.
_LONGEST_WAIT_S = 3600.0


class _Shutter:
    """One thread that shuts sockets down at their deadlines (a heap of them): a wait blocked on one, in
    whatever thread, returns at once. Cheap enough for every wait of a request (a lock and a heap push),
    where a timer would be a thread each."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._changed = threading.Condition()
        self._due: list[tuple[float, int, ShutAtDeadline]] = []
        self._order = itertools.count()  # ties broken in order, never by comparing the watches
        self._cancelled = 0  # cancelled watches still in the heap
        self._started_in: int | None = None  # the process the thread runs in (none in a fork's child)

    def watch(self, sock: socket.socket, deadline: float) -> ShutAtDeadline:
        watch = ShutAtDeadline(sock, deadline)
        with self._changed:
            if self._started_in != os.getpid():
                self._started_in = os.getpid()
                threading.Thread(target=self._shut_when_due, name="shut at deadline", daemon=True).start()
            heapq.heappush(self._due, (deadline, next(self._order), watch))
            if self._due[0][2] is watch:
                self._changed.notify()  # sooner than what the thread waits for
        return watch

    def cancel(self, watch: ShutAtDeadline) -> bool:
        with self._changed:
            if not watch.cancelled and not watch.fired:
                watch.cancelled = True
                self._cancelled += 1
                # most watches are cancelled long before they are due: dropped once they are most of the
                # heap, which would otherwise hold every request's until its deadline
                if self._cancelled > 64 and self._cancelled * 2 > len(self._due):
                    self._due = [due for due in self._due if not due[2].cancelled]
                    heapq.heapify(self._due)
                    self._cancelled = 0
            return watch.fired

    def _shut_when_due(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    _, _, watch = heapq.heappop(self._due)
                    if watch.cancelled:
                        self._cancelled -= 1
                        continue
                    watch.fired = True
                    try:
                        # the plain socket's: an SSLSocket's own would drop its TLS object under the
                        # reading thread
                        socket.socket.shutdown(watch.sock, socket.SHUT_RDWR)
                    except OSError:
                        pass  # already closed: the request ended meanwhile
                # at most an hour at a time: a wait past threading.TIMEOUT_MAX (a deadline some 292 years
                # off) raises, which would end this thread and every deadline of the process with it
                self._changed.wait(min(self._due[0][0] - now, _LONGEST_WAIT_S) if self._due else None)


_shutter = _Shutter()
os.register_at_fork(after_in_child=_shutter._reset)  # a fork's child has no thread, and maybe a held lock


def shut_at(extensions: Mapping[str, Any], deadline: float) -> ShutAtDeadline | None:
    """Shuts down, at ``deadline`` (monotonic), the connection an httpx response (given by its
    ``extensions``) is read from: a read blocked on it returns at once, in whatever thread it waits.
    Cancel it when the answer was read, before the response is closed: its connection then goes back to
    the pool, and may be another request's by the deadline. None if the connection's socket is not known."""
    stream = extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if not isinstance(sock, socket.socket):
        return None
    return _shutter.watch(sock, deadline)


# The latest (time.monotonic()) the network I/O of the current request may end: set around a request by
# ``io_ending_by``, read by the streams of a client ``end_io_by_deadline`` was applied to.
_IO_ENDS_BY: ContextVar[float | None] = ContextVar("kubechain_http_io_ends_by", default=None)


@contextmanager
def io_ending_by(monotonic_deadline: float) -> Iterator[None]:
    """Requests made in this context (this thread's), on a client ``end_io_by_deadline`` was applied to,
    end by ``monotonic_deadline`` (or by the deadline of an enclosing ``io_ending_by``, if sooner): from
    the connection on, headers included, each wait on the network is cut to the time left, and one that
    starts past it is a timeout (httpx's ConnectTimeout, ReadTimeout, WriteTimeout). The connection is
    then closed by httpcore, not returned to the pool."""
    enclosing = _IO_ENDS_BY.get()
    token = _IO_ENDS_BY.set(monotonic_deadline if enclosing is None else min(enclosing, monotonic_deadline))
    try:
        yield
    finally:
        _IO_ENDS_BY.reset(token)


@dataclass(frozen=True)
class _CoreErrors:
    """The exceptions of one httpcore (httpcore, or httpcore2 under httpx2): its httpx maps only its own
    to httpx's (an SDK's APITimeoutError comes from httpx2's timeouts)."""

    connect_timeout: type[Exception]
    read_timeout: type[Exception]
    write_timeout: type[Exception]
    connect_error: type[Exception]


_HTTPCORE_ERRORS = _CoreErrors(
    httpcore.ConnectTimeout, httpcore.ReadTimeout, httpcore.WriteTimeout, httpcore.ConnectError
)
_HTTPCORE2_ERRORS = _CoreErrors(
    httpcore2.ConnectTimeout, httpcore2.ReadTimeout, httpcore2.WriteTimeout, httpcore2.ConnectError
)


def _time_left(timeout: float | None, overdue: type[Exception]) -> float | None:
    deadline = _IO_ENDS_BY.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise overdue("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _NetworkStream(Protocol):
    """What httpcore and httpcore2 both ask of a connection (their NetworkStream)."""

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes: ...

    def write(self, buffer: bytes, timeout: float | None = None) -> None: ...

    def close(self) -> None: ...

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> Any: ...

    def get_extra_info(self, info: str) -> Any: ...


_Done = TypeVar("_Done")


class _DeadlineStream:
    """A connection whose every wait ends by the deadline of the request using it (a pooled connection
    serves one request after another, each with its own deadline). An httpcore NetworkStream by its
    methods, for httpcore's pools and httpcore2's alike.

    Each call is given the time left as its timeout, and its socket is shut down at the deadline if the
    call still waits then: httpcore's calls may wait many times, each for the whole timeout. A TLS
    connection inside another (to an https:// origin through an https:// proxy) is httpcore's own, over
    the outer TLS socket: its handshake, and each read of it, is one timed recv after another, where
    Python's TLS has one deadline for a whole handshake or read; and a write is one timed send after
    another, on any connection."""

    def __init__(self, inner: _NetworkStream, errors: _CoreErrors) -> None:
        self._inner = inner
        self._errors = errors

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        left = _time_left(timeout, self._errors.read_timeout)
        data, shut = self._ending_by_deadline(
            lambda: self._inner.read(max_bytes, left), self._errors.read_timeout
        )
        if shut and not data:  # the end of the stream the shutdown made, not the server's
            raise self._errors.read_timeout("the request's deadline has passed")
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # httpcore sends the buffer piece by piece, each send given the whole timeout: a peer reading a
        # little before each would time out holds the write for as long as the buffer lasts
        left = _time_left(timeout, self._errors.write_timeout)
        self._ending_by_deadline(lambda: self._inner.write(buffer, left), self._errors.write_timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> _DeadlineStream:
        try:
            left = _time_left(timeout, self._errors.connect_timeout)
        except self._errors.connect_timeout:
            # closed here, as the inner stream closes itself when its handshake fails: httpcore does not
            # close a connection whose start_tls raised
            self._inner.close()
            raise
        # shut as the handshake ended: the next call is past the deadline, a timeout, and httpcore closes
        # the connection then
        secured, _ = self._ending_by_deadline(
            lambda: self._inner.start_tls(ssl_context, server_hostname, left), self._errors.connect_timeout
        )
        return _DeadlineStream(secured, self._errors)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def _ending_by_deadline(self, wait: Callable[[], _Done], overdue: type[Exception]) -> tuple[_Done, bool]:
        """``wait()``, a call of the inner stream, with its socket shut down at the deadline if it still
        waits then: what it returned, and whether the socket was shut (as it returned). ``overdue`` if it
        raised after the shutdown: what the call met then, a closed connection, is said as the timeout
        it is."""
        deadline = _IO_ENDS_BY.get()
        sock = self._inner.get_extra_info("socket") if deadline is not None else None
        if deadline is None or not isinstance(sock, socket.socket):
            return wait(), False
        watch = _shutter.watch(sock, deadline)
        try:
            done = wait()
        except Exception as exc:
            if watch.cancel():
                raise overdue("the request's deadline has passed") from exc
            raise
        return done, watch.cancel()


class _NetworkBackend(Protocol):
    """What httpcore and httpcore2 both ask of a network backend."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> _NetworkStream: ...

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> _NetworkStream: ...

    def sleep(self, seconds: float) -> None: ...


class _DeadlineBackend:
    """Makes connections (``_DeadlineStream``) under the current request's deadline, the host's name
    resolved by it too. An httpcore NetworkBackend by its methods."""

    def __init__(self, inner: _NetworkBackend, errors: _CoreErrors) -> None:
        self._inner = inner
        self._errors = errors

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> _DeadlineStream:
        deadline = _IO_ENDS_BY.get()
        if deadline is None or is_address(host):
            left = _time_left(timeout, self._errors.connect_timeout)
            stream = self._inner.connect_tcp(host, port, left, local_address, socket_options)
            return _DeadlineStream(stream, self._errors)
        # The inner backend would resolve the name with getaddrinfo, which no timeout bounds: resolved
        # here by the deadline, each address is connected to in turn, as socket.create_connection tries
        # them. The host's name stays the request's: TLS asks for it (SNI) and the Host header names it.
        try:
            addresses = addresses_by(host, port, deadline)
        except ResolutionTimedOut as exc:
            raise self._errors.connect_timeout(str(exc)) from None
        except OSError as exc:  # the name does not resolve: said as the inner backend says it
            raise self._errors.connect_error(str(exc)) from exc
        except UnicodeError as exc:  # a label over 63 characters, or empty: getaddrinfo's IDNA encoding
            raise self._errors.connect_error(f"{host} is not a valid host name: {exc}") from exc
        if not addresses:  # getaddrinfo raises rather than answer none, but an NSS module may not
            raise self._errors.connect_error(f"{host} resolved to no address")
        options = None if socket_options is None else list(socket_options)  # used once per address
        *earlier, last = addresses
        for address in earlier:
            try:
                return self._connect_to(address, port, timeout, local_address, options)
            except (self._errors.connect_error, self._errors.connect_timeout):
                continue  # refused, or no answer within the connect timeout: the next address
        return self._connect_to(last, port, timeout, local_address, options)  # its failure is said

    def _connect_to(
        self,
        address: str,
        port: int,
        timeout: float | None,
        local_address: str | None,
        socket_options: list[Any] | None,
    ) -> _DeadlineStream:
        left = _time_left(timeout, self._errors.connect_timeout)  # none left: a timeout, as it is
        stream = self._inner.connect_tcp(address, port, left, local_address, socket_options)
        return _DeadlineStream(stream, self._errors)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> _DeadlineStream:
        left = _time_left(timeout, self._errors.connect_timeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, left, socket_options), self._errors)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


Client = TypeVar("Client", httpx.Client, httpx2.Client)


def end_io_by_deadline(client: Client) -> Client:
    """``client`` (an httpx or an httpx2 client), its connections (direct and through each proxy from the
    environment) made and read under ``io_ending_by``'s deadline. httpx exposes no network backend: it is
    set on each transport's httpcore pool, which keeps it for the connections it makes. A pool without
    one (an httpx that changed) is said once in the log; its requests keep httpx's per-read timeouts."""
    transports: list[Any] = [client._transport, *client._mounts.values()]
    for transport in transports:
        if transport is None:
            continue  # a NO_PROXY pattern: the default transport serves it
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, _DeadlineBackend):
            continue  # applied before
        if isinstance(backend, httpcore.NetworkBackend):
            pool._network_backend = _DeadlineBackend(backend, _HTTPCORE_ERRORS)  # type: ignore[union-attr]
        elif isinstance(backend, httpcore2.NetworkBackend):
            pool._network_backend = _DeadlineBackend(backend, _HTTPCORE2_ERRORS)  # type: ignore[union-attr]
        else:
            log.warning(
                "cannot bound the whole of a request on %s (%s has no httpcore pool with a network "
                "backend): a server that trickles its headers is timed per read",
                type(transport).__name__,
                type(client).__module__,
            )
    return client
