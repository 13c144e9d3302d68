"""One deadline for a whole LLM request, which the SDKs' timeouts are not.

httpx's timeouts bound each phase and each read: a server that trickles its body (a gateway sending
keep-alive whitespace before a slow non-streaming answer does) never trips a read timeout, and the call can
outlast its claim; another worker then takes the turn and the same paid call is made twice. Both provider
clients (``openai``, ``anthropic``) are given an HTTP client whose transport ends any request that runs
past the deadline, with the read timeout they already report as a timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx2

# As the openai and anthropic SDKs' own clients (1000 / 100 / 5 s).
CONNECTION_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100, keepalive_expiry=5.0)


class _DeadlineStream(httpx2.SyncByteStream):
    def __init__(
        self, inner: httpx2.SyncByteStream, deadline: float, total_s: float, request: httpx2.Request
    ):
        self._inner = inner
        self._deadline = deadline
        self._total_s = total_s
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            if time.monotonic() > self._deadline:
                raise _overdue(self._total_s, self._request)
            yield chunk

    def close(self) -> None:
        self._inner.close()


class DeadlineTransport(httpx2.BaseTransport):
    """Ends a request whose answer has not been read in full ``total_s`` after it started."""

    def __init__(self, total_s: float, inner: httpx2.BaseTransport | None = None) -> None:
        self._total_s = total_s
        self._inner = inner or httpx2.HTTPTransport(limits=CONNECTION_LIMITS)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        deadline = time.monotonic() + self._total_s
        response = self._inner.handle_request(request)
        if time.monotonic() > deadline:
            response.close()
            raise _overdue(self._total_s, request)
        assert isinstance(response.stream, httpx2.SyncByteStream)
        response.stream = _DeadlineStream(response.stream, deadline, self._total_s, request)
        return response

    def close(self) -> None:
        self._inner.close()


def _overdue(total_s: float, request: httpx2.Request) -> httpx2.ReadTimeout:
    return httpx2.ReadTimeout(f"no complete answer within {total_s:g}s", request=request)


def deadline_client(total_s: float) -> httpx2.Client:
    """An HTTP client for a provider SDK (``http_client=``): its requests end ``total_s`` after they start."""
    return httpx2.Client(transport=DeadlineTransport(total_s), timeout=total_s, follow_redirects=True)
