"""One deadline for a whole LLM request, which the SDKs' timeouts are not.

httpx's timeouts bound each phase and each read: a server that trickles its body (a gateway sending
keep-alive whitespace before a slow non-streaming answer does), or stalls just short of the read timeout
before each chunk, never trips one, and the call can outlast its claim; another worker then takes the turn
and the same paid call is made twice. Both provider clients (``openai``, ``anthropic``) send through their
SDK's own default HTTP client (its connection limits, keep-alive socket options and proxies from the
environment), with every transport of it wrapped so that a request ends at the deadline, with the read
timeout the SDKs already report as a timeout. The whole exchange is bounded, not only the body: every
connection of the client's pools (the default one's and each proxy's) is made and read under
http_watchdog's ``io_ending_by``, so a server that trickles its headers, a slow TLS handshake or a
connection that does not open ends at the deadline too."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import httpx2

from kubechain.http_watchdog import ShutAtDeadline, end_io_by_deadline, io_ending_by, shut_at
from kubechain.llm.base import LLMError

# An answer is read into memory whole and parsed: one past this (hundreds of MB from whatever endpoint an
# LLM resource names) would take the worker, and every call in flight on it, down. A real answer is some
# hundred KB at most (its token limit); a context window is cut at 1 MiB.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


# The latest (time.monotonic()) the requests of the current call may end, if sooner than their client's
# timeout: set by the worker from its claim's time left (ending_by).
_ENDS_BY: ContextVar[float | None] = ContextVar("kubechain_llm_request_ends_by", default=None)


@contextmanager
def ending_by(monotonic_deadline: float) -> Iterator[None]:
    """Requests made in this context (this thread's) end by ``monotonic_deadline`` at the latest, even
    when their client's own timeout is longer: the claim the worker calls under runs out then."""
    token = _ENDS_BY.set(monotonic_deadline)
    try:
        yield
    finally:
        _ENDS_BY.reset(token)


def call_deadline() -> float | None:
    """The current call's deadline (time.monotonic()), if ``ending_by`` set one."""
    return _ENDS_BY.get()


def timeout_error(started: float, timeout_s: float) -> LLMError:
    """What an LLM request started at ``started`` (time.monotonic()) that timed out is reported as: the
    client's ``timeout_s``, or, when the call's own deadline (``ending_by``) came first and has passed, the
    claim's time that ended it (``cut_short``: the LLM did not fail; the run says so, and the attempt still
    counts, since each retry is a paid call)."""
    ends_by = call_deadline()
    if ends_by is not None and ends_by < started + timeout_s and time.monotonic() >= ends_by:
        return LLMError(
            "LLM request timed out: no complete answer before the worker's claim on the call ran out (its "
            "claim was written late: an API server slow to answer)",
            retryable=True,
            cut_short=True,
        )
    return LLMError(f"LLM request timed out: no complete answer within {timeout_s:g}s", retryable=True)


class AnswerTooLarge(Exception):
    """The answer went past MAX_ANSWER_BYTES and was not read further (a retry would get the same)."""


def answer_too_large(exc: BaseException) -> AnswerTooLarge | None:
    """The AnswerTooLarge an SDK error was raised from (the SDKs wrap it as a connection error)."""
    cause = exc.__cause__
    return cause if isinstance(cause, AnswerTooLarge) else None


class _DeadlineStream(httpx2.SyncByteStream):
    def __init__(
        self,
        inner: httpx2.SyncByteStream,
        deadline: float,
        total_s: float,
        request: httpx2.Request,
        watchdog: ShutAtDeadline | None = None,
    ):
        self._inner = inner
        self._deadline = deadline
        self._total_s = total_s
        self._request = request
        # The read timeout below is fixed when the body starts: a read after the first chunk could still
        # wait that long again past the deadline. The watchdog shuts the connection at the deadline.
        self._watchdog = watchdog

    def __iter__(self) -> Iterator[bytes]:
        # The body's reads wait at most what is left: httpcore takes the read timeout from this dict (the
        # request's own) when it starts reading the body (for a pool end_io_by_deadline could not reach;
        # io_ending_by below cuts each read for the others).
        timeouts = self._request.extensions.get("timeout")
        if isinstance(timeouts, dict):
            left = max(0.001, self._deadline - time.monotonic())
            read = timeouts.get("read")
            timeouts["read"] = left if read is None else min(read, left)
        received = 0
        chunks = iter(self._inner)
        try:
            while True:
                # each read of the connection under the deadline (its waits cut to the time left): the
                # SDK reads the body after handle_request has returned, outside its io_ending_by
                with io_ending_by(self._deadline):
                    chunk = next(chunks, None)
                if chunk is None:
                    break
                if time.monotonic() > self._deadline:
                    raise _overdue(self._total_s, self._request)
                received += len(chunk)
                if received > MAX_ANSWER_BYTES:
                    raise AnswerTooLarge(
                        f"the answer is over {MAX_ANSWER_BYTES:,} bytes; it was not read further"
                    )
                yield chunk
        except httpx2.TransportError:
            if time.monotonic() >= self._deadline:
                raise _overdue(self._total_s, self._request) from None  # the watchdog shut it
            raise

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._inner.close()


@dataclass(frozen=True)
class _Exchange:
    """When (time.monotonic()) a request and the redirects it is answered with must have been answered by,
    and the time that was (``total_s``). httpx hands a request's extensions on to each redirect it follows,
    a request to the transport of its own, as this under ``_EXCHANGE``: the SDKs follow up to 20."""

    deadline: float
    total_s: float


_EXCHANGE = "kubechain_exchange"


class DeadlineTransport(httpx2.BaseTransport):
    """Ends a request whose answer has not been read in full ``total_s`` after it started, or by the
    deadline of the call it is made in (``ending_by``), if that is sooner; the redirects it is answered
    with (which the SDKs follow) by the same deadline."""

    def __init__(self, total_s: float, inner: httpx2.BaseTransport) -> None:
        self._total_s = total_s
        self._inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        started = time.monotonic()
        exchange = request.extensions.get(_EXCHANGE)
        if not isinstance(exchange, _Exchange):
            deadline = started + self._total_s
            ends_by = call_deadline()
            if ends_by is not None and ends_by < deadline:
                deadline = max(started, ends_by)
            exchange = request.extensions[_EXCHANGE] = _Exchange(deadline, deadline - started)
        # else a redirect followed: it ends by the deadline of the request that was redirected
        deadline, total_s = exchange.deadline, exchange.total_s
        # The client's timeout bounds each phase: the wait for a free connection of the pool (no network
        # I/O, which io_ending_by bounds) must end at the deadline too, when that is sooner (the call's,
        # or a redirect's, which comes after the time the request redirected took).
        timeouts = request.extensions.get("timeout")
        if isinstance(timeouts, dict):
            left = max(0.001, deadline - started)
            request.extensions["timeout"] = {
                phase: left if value is None else min(value, left) for phase, value in timeouts.items()
            }
        # connect, TLS, the request and the headers: each wait cut to the time left (a server sending
        # its headers a byte at a time never trips a per-read timeout)
        with io_ending_by(deadline):
            response = self._inner.handle_request(request)
        if time.monotonic() > deadline:
            response.close()
            raise _overdue(total_s, request)
        assert isinstance(response.stream, httpx2.SyncByteStream)
        watchdog = shut_at(response.extensions, deadline)
        response.stream = _DeadlineStream(response.stream, deadline, total_s, request, watchdog)
        return response

    def close(self) -> None:
        self._inner.close()


def _overdue(total_s: float, request: httpx2.Request) -> httpx2.ReadTimeout:
    return httpx2.ReadTimeout(f"no complete answer within {total_s:g}s", request=request)


def with_deadline(client: httpx2.Client, total_s: float) -> httpx2.Client:
    """``client`` (an SDK's ``DefaultHttpxClient()``), its requests ending ``total_s`` after they start.
    Its transports are wrapped in place: the default one and each proxy's (``HTTPS_PROXY``, ``ALL_PROXY``,
    ``NO_PROXY``), which httpx builds only when no transport is given to it; and the connection pool of
    each makes and reads its connections under the request's deadline (end_io_by_deadline)."""
    end_io_by_deadline(client)  # on the pools, before the transports holding them are wrapped
    client._transport = DeadlineTransport(total_s, client._transport)
    client._mounts = {
        pattern: None if transport is None else DeadlineTransport(total_s, transport)
        for pattern, transport in client._mounts.items()
    }
    return client
