"""One live MCP client connection, owned by one asyncio task on the manager's event loop.

The SDK's transports (``stdio_client``, ``streamable_http_client``, ``sse_client``) and ``Client`` are async
context managers built on anyio task groups, whose cancel scopes must be exited by the task that entered
them. So each connection lives in one long-lived task (:meth:`Session.run`) that enters them, signals
``ready`` and waits until it is told to stop or the connection is lost. Requests are plain coroutines on
the same loop that go through the live ``Client``.

This module imports the MCP SDK; the manager imports it lazily (only when its loop starts).
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import json
import logging
import os
import re
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from types import TracebackType
from typing import Any, TextIO

import anyio
import anyio.abc
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client import InputRequiredRoundsExceededError
from mcp.client import sse as sdk_sse
from mcp.client import stdio as sdk_stdio
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, get_default_environment, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError
from mcp.shared._httpx_utils import create_mcp_http_client, next_request_within_origin
from mcp.shared.exceptions import MCPError as SDKError
from mcp.shared.message import SessionMessage
from mcp_types import (
    CONNECTION_CLOSED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    REQUEST_TIMEOUT,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from kubechain.mcp.common import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_SETTING,
    MCPError,
    MCPToolResult,
    describe_size,
)
from kubechain.mcp.presence import ServedServer
from kubechain.mcp.spec import ResolvedSpec
from kubechain.observability.logs import WithoutMCPServerData, detached_context
from kubechain.redaction import Scrubber, redact_url, scrub_then_cut

log = logging.getLogger("kubechain.mcp")
stderr_log = logging.getLogger("kubechain.mcp.stderr")


def _keep_server_data_out_of_sdk_logs() -> None:
    """WithoutMCPServerData on each of the SDK's loggers (its client session's is "client"), for handlers
    other than the one configure_logging installs it on (a test's, an embedding application's). A logger
    the SDK makes later (a module imported lazily) is covered by that handler's only."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name in ("mcp", "client") or name.startswith("mcp."):
            if isinstance(logger, logging.Logger) and not any(
                isinstance(f, WithoutMCPServerData) for f in logger.filters
            ):
                logger.addFilter(WithoutMCPServerData())


_keep_server_data_out_of_sdk_logs()

CLIENT_INFO = types.Implementation(name="kubechain", version="0.1.0")

# Inherited by stdio children on top of the SDK's minimal set (HOME, LOGNAME, PATH, SHELL, TERM, USER):
# locale, time zone, temp dir, proxies and CA bundles, which servers that call out commonly need.
EXTRA_INHERITED_ENV = (
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
)
SSE_READ_TIMEOUT_S = 300.0
# How long a failed connect to an http server waits for the GET that tells whether it speaks SSE instead.
SSE_PROBE_TIMEOUT_S = 5.0
MAX_TOOL_PAGES = 100
# How long a server whose call timed out has to answer a probe before its session is restarted.
PROBE_TIMEOUT_S = 5.0
STDERR_TAIL_LINES = 20
# A stderr line is scrubbed whole, up to this length; of a longer one, only the start is shown, leaving out
# what may be the start of a secret cut at the limit: the margin, or the longest secret's length if more (a
# kubeconfig with its certificates, JSON-escaped, may be longer).
STDERR_LINE_KEPT = 64 * 1024
STDERR_SECRET_MARGIN = 16 * 1024
STDERR_LINE_SHOWN = 4096

# A server's tool list changed: the 2025 protocol sends this unasked; at 2026-07-28 it comes on a
# subscriptions/listen stream the client opened. Each era has its own class: the method tells them apart.
TOOLS_LIST_CHANGED = "notifications/tools/list_changed"
# How long a connect waits for the listen stream's acknowledgment before listing the tools anyway (a
# server slow to acknowledge must not slow every connect; a late acknowledgment refetches the list).
LISTEN_ACK_WAIT_S = 5.0
# A listen stream that ended (a proxy's idle timeout, a server restart) is opened again after this,
# doubling up to the maximum while streams keep ending sooner than that.
LISTEN_RETRY_MIN_S = 1.0
LISTEN_RETRY_MAX_S = 60.0
# The answers to subscriptions/listen that say the server will not have it: not asked again on this session.
# Any other failure (a proxy's 502/503 while the server restarts, a stream that ended before its ack, no
# ack in time) is passing, and retried with the back-off: given up on, the session, which at 2026-07-28
# has no id to lose and stays usable, would never hear of a change again.
LISTEN_REFUSALS = frozenset({METHOD_NOT_FOUND, INVALID_REQUEST, INVALID_PARAMS})


def child_environment(spec_env: dict[str, str]) -> dict[str, str]:
    """A minimal inherited environment plus the spec's variables (which win)."""
    env = get_default_environment()
    for key in EXTRA_INHERITED_ENV:
        value = os.environ.get(key)
        if value is not None and not value.startswith("()"):
            env[key] = value
    env.update(spec_env)
    return env


# -- knowing the stdio child process ----------------------------------------------------------------
# stdio_client does not expose the process it spawns. We wrap the SDK's spawn helper once so the task
# that opens a session can learn the process (pid, exit code) through a context variable, and bound what
# is read of its stdout, before the SDK's reader starts; other callers of the SDK are unaffected. If a
# future SDK renames the helper, sessions have no process handle and their lines are not bounded (said
# once in the log).

_SPAWNED: contextvars.ContextVar[Callable[[Any], None] | None] = contextvars.ContextVar(
    "kubechain_mcp_spawned", default=None
)


def _install_spawn_hook() -> None:
    original = getattr(sdk_stdio, "_create_platform_compatible_process", None)
    if original is None:
        log.warning("the MCP SDK's stdio spawn helper is gone: stdio messages are read without a size limit")
        return
    if getattr(original, "_kubechain_hook", False):
        return

    async def spawn(*args: Any, **kwargs: Any) -> Any:
        process = await original(*args, **kwargs)
        sink = _SPAWNED.get()
        if sink is not None:
            sink(process)
        return process

    spawn._kubechain_hook = True  # type: ignore[attr-defined]
    sdk_stdio._create_platform_compatible_process = spawn


class _BoundedLines(anyio.abc.ByteReceiveStream):
    """A stdio child's stdout, read up to ``limit`` bytes a line. The SDK's reader keeps a line until its
    end comes, however long (adding each chunk to what it holds: quadratic), so a server answering a few
    hundred MB took the worker, and every call in flight, down. Past the limit ``on_too_large`` is told
    the start of the long line (HEAD_BYTES, to tell whose answer it is), the complete lines before it are
    still passed on, and then the stream ends: the session sees the server gone and is restarted."""

    HEAD_BYTES = 4096

    def __init__(
        self, inner: anyio.abc.ByteReceiveStream, limit: int, on_too_large: Callable[[bytes], None]
    ) -> None:
        self._inner = inner
        self._limit = limit
        self._on_too_large = on_too_large
        self._pending = 0  # bytes of the line not ended yet
        self._head = b""  # the first of them
        self._over = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._over:
            raise anyio.EndOfStream
        data = await self._inner.receive(max_bytes)
        start, pending, head = 0, self._pending, self._head
        while (end := data.find(b"\n", start)) >= 0 and pending + end - start <= self._limit:
            start, pending, head = end + 1, 0, b""
        if end < 0 and pending + len(data) - start <= self._limit:
            self._pending = pending + len(data) - start
            self._head = head + data[start : start + self.HEAD_BYTES - len(head)]
            return data
        self._over = True
        self._on_too_large(
            (head + data[start : start + self.HEAD_BYTES]).split(b"\n", 1)[0][: self.HEAD_BYTES]
        )
        if start:
            return data[:start]  # the lines before the long one
        raise anyio.EndOfStream

    async def aclose(self) -> None:
        await self._inner.aclose()


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _after_space(text: str, at: int) -> int:
    match = _JSON_SPACE.match(text, at)
    return match.end() if match is not None else at


class _NotAnAnswer(enum.Enum):
    NOT_AN_ANSWER = "not an answer"


# A message of the server's that is no answer: a request (sampling, elicitation, roots/list, ping), whose
# ids are numbered as ours are, or a notification.
NOT_AN_ANSWER = _NotAnAnswer.NOT_AN_ANSWER


def _top_level_id(head: bytes) -> int | str | _NotAnAnswer | None:
    """The JSON-RPC id of a message from its first bytes, if it is there: before any value too long to be
    in them (an SDK server writes "jsonrpc", then "id", then the result). NOT_AN_ANSWER if a top-level
    "method" (or "params") is seen, before or after the id: a request or notification of the server's.
    None if it cannot be told."""
    text = head.decode("utf-8", "ignore")  # a character cut at the end is dropped
    decoder = json.JSONDecoder()
    at = _after_space(text, 0)
    if not text.startswith("{", at):
        return None
    at += 1
    found: int | str | None = None
    seen_id = False
    try:
        while True:
            at = _after_space(text, at)
            if not text.startswith('"', at):
                return found
            key, at = decoder.raw_decode(text, at)
            if key in ("method", "params"):
                return NOT_AN_ANSWER
            if seen_id and key in ("result", "error"):
                return found  # an answer: its value may be too long to be seen
            at = _after_space(text, at)
            if not text.startswith(":", at):
                return found
            at = _after_space(text, at + 1)
            value, at = decoder.raw_decode(text, at)
            at = _after_space(text, at)
            if at >= len(text):
                return found  # the value may go on past what was seen (a number cut short)
            if key == "id":
                seen_id = True
                if isinstance(value, int | str) and not isinstance(value, bool):
                    found = value
            if not text.startswith(",", at):
                return found
            at += 1
    except (ValueError, RecursionError):  # cut short inside a value, not JSON, nested too deep
        return found


_install_spawn_hook()


# -- bounding a legacy SSE stream's events ---------------------------------------------------------
# sse_client reads its event stream with the SDK's default event size (1 MiB) and has no option for it:
# a longer result ended the session as a lost connection (and was run again on an idempotent server). We
# wrap the SDK's helper that opens the stream once, so a session can set its own limit, and hear of an
# event over it, through a context variable (other callers of the SDK are unaffected). If a future SDK
# renames the helper, events are read up to the SDK's 1 MiB, and one longer is a lost connection (said
# once in the log).

# (the limit, what to call when an event is longer)
_SSE_EVENTS: contextvars.ContextVar[tuple[int, Callable[[], None]] | None] = contextvars.ContextVar(
    "kubechain_mcp_sse_events", default=None
)
_SSE_EVENT_TOO_LARGE = re.compile(r"exceeded the (\d+) byte limit")


def sse_event_limit(message: str) -> int | None:
    """The limit an event was longer than, if ``message`` is httpx2's for that ("Server-sent event exceeded
    the N byte limit")."""
    match = _SSE_EVENT_TOO_LARGE.search(message)
    return int(match.group(1)) if match else None


class _WatchedEvents:
    """The SDK's event source for a legacy SSE stream, telling ``on_too_large`` when an event is longer
    than its limit (which ends the stream)."""

    def __init__(self, inner: Any, on_too_large: Callable[[], None]) -> None:
        self._inner = inner
        self._on_too_large = on_too_large

    @property
    def response(self) -> httpx2.Response:
        response: httpx2.Response = self._inner.response
        return response

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            async for event in self._inner:
                yield event
        except httpx2.SSEError as exc:
            if sse_event_limit(str(exc)) is not None:
                self._on_too_large()
            raise


def _install_sse_hook() -> None:
    original = getattr(sdk_sse, "sse_within_origin", None)
    if original is None:
        log.warning(
            "the MCP SDK's SSE stream helper is gone: legacy SSE messages are read up to the SDK's own 1 MiB"
        )
        return
    if getattr(original, "_kubechain_hook", False):
        return

    @asynccontextmanager
    async def sse_within_origin(client: Any, url: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        bounds = _SSE_EVENTS.get()
        if bounds is not None:
            kwargs["max_event_size"] = bounds[0]
        async with original(client, url, *args, **kwargs) as events:
            yield events if bounds is None else _WatchedEvents(events, bounds[1])

    sse_within_origin._kubechain_hook = True  # type: ignore[attr-defined]
    sdk_sse.sse_within_origin = sse_within_origin  # type: ignore[assignment]


_install_sse_hook()


# -- knowing whether a tools/call request left this process -----------------------------------------


# A server answering "still working" (a state-only InputRequiredResult, 2026 protocol) is asked again after
# 50 ms, doubling to at most 250 ms (the SDK's driver): as many rounds as a call timeout holds, not the
# SDK's default 10 (~2 s), which failed every long-running tool.
STILL_WORKING_MAX_DELAY_S = 0.25
STILL_WORKING_MARGIN_S = 0.5


def still_working_rounds(call_timeout_s: float) -> int:
    return int(call_timeout_s / STILL_WORKING_MAX_DELAY_S) + 10


# What the SDK says of a non-2xx answer without a JSON-RPC error in it (the status is known only to us).
SDK_STATUS_STAND_IN = "Server returned an error response"
MCP_SESSION_ID = "mcp-session-id"


class Attempt:
    """Per call: how many tools/call requests were handed to the transport, and how many of those never
    left (their connection could not be made). One call may send several (a server answering "still
    working" is asked again): it may have run if any one left."""

    def __init__(self) -> None:
        self.sends = 0
        self.unsent = 0
        self.http_status = 0  # the last error status an HTTP server answered a tools/call POST with
        self.session_gone = False  # a tools/call POST was answered 404 for our session id
        self.redirects = 0  # redirects in a row of a tools/call POST that the SDK followed
        self.unjudged = False  # a redirect it got could not be judged: not known to be refused
        self.too_large = False  # the answer to a tools/call POST was longer than the limit: not read
        self.request_ids: list[Any] = []  # the JSON-RPC ids of its tools/call requests
        # SSE only: a failed POST is only logged by the SDK, and the call would wait out its timeout;
        # the transport calls abandon() instead, saying why in ``failure``
        self.abandon: Callable[[], None] | None = None
        self.failure = ""
        # why the answer does not match the output schema the tool declares (the SDK would raise after the
        # tool ran, and its answer would be lost), as the validator said it: unscrubbed
        self.schema_problem = ""

    @property
    def may_have_run(self) -> bool:
        return self.sends > self.unsent


_ATTEMPT: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "kubechain_mcp_attempt", default=None
)


class _WatchedWriteStream:
    """The transport's write stream, marking the current call's Attempt as sent when its request goes out."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def send(self, item: SessionMessage, /) -> None:
        message = item.message
        if isinstance(message, types.JSONRPCRequest) and message.method == "tools/call":
            attempt = _ATTEMPT.get()
            if attempt is not None:
                attempt.sends += 1  # a started write counts: it may have been delivered
                attempt.request_ids.append(message.id)
                try:
                    await self._inner.send(item)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    attempt.unsent += 1  # the transport's sender was gone: never handed over
                    raise
                return
        await self._inner.send(item)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedWriteStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self.aclose()
        return None


class _UnsentCallTransport(httpx2.AsyncBaseTransport):
    """The HTTP client's transport, unmarking the current call's Attempt when the POST carrying its
    tools/call never left: the connection could not be made (refused, unreachable, connect or pool
    timeout), so no byte of it reached the server. A tool behind a server that was down is then retried
    on a fresh session, not reported as one that may have run. It also notes an error status the POST
    was answered with, which the SDK reports only as "Server returned an error response", and tells
    ``on_session_gone`` when a request carrying a session id is answered 404: the server no longer knows
    the session (it restarted) and ran nothing sent on it. The SDK turns that 404 into "Session terminated"
    only when its body is not a JSON-RPC error; the SDK's own server sends one ("Session not found").
    ``on_refused_post`` is told the error status (4xx, 5xx) any POST is answered with."""

    def __init__(
        self,
        inner: httpx2.AsyncBaseTransport,
        *,
        abandon_on_failure: bool = False,
        on_session_gone: Callable[[], None] | None = None,
        on_refused_post: Callable[[int], None] | None = None,
        redirects: httpx2.AsyncClient | None = None,
        max_body_bytes: int | None = None,
    ) -> None:
        self._inner = inner
        self._max_body_bytes = max_body_bytes
        self._abandon_on_failure = abandon_on_failure
        self._on_session_gone = on_session_gone
        self._on_refused_post = on_refused_post
        self._redirects = redirects  # the client whose redirects the SDK follows (within its origin)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            response = await self._inner.handle_async_request(request)
        except Exception as exc:
            attempt = _ATTEMPT.get()
            if attempt is not None and _carries_tools_call(request):
                if isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout | httpx2.PoolTimeout):
                    attempt.unsent += 1
                self._abandon(attempt, f"{type(exc).__name__}: {exc}")
            raise
        status = response.status_code
        attempt = _ATTEMPT.get()
        self._bound_body(request, response, attempt)
        if attempt is not None and 300 <= status < 400:
            followed = _carries_tools_call(request) and self._followed(attempt, request, response)
            if followed:
                # The SDK sends the call on to where it was redirected (a proxy adding a slash, an
                # http-to-https upgrade): the call goes on there. Taken for a refusal, the call was
                # abandoned while the redirected POST ran the tool, and then sent again on a new session.
                return response
            if followed is None:
                attempt.unjudged = True
        elif attempt is not None:
            attempt.redirects = 0  # the end of a chain of redirects
        session_gone = await _session_forgotten(request, response)
        if session_gone and self._on_session_gone is not None:
            self._on_session_gone()
        if status >= 400 and request.method == "POST" and self._on_refused_post is not None:
            self._on_refused_post(status)
        if status >= 300:
            if attempt is not None and _carries_tools_call(request):
                attempt.http_status = status
                attempt.session_gone = attempt.session_gone or session_gone
                refused = _refused_before_running(status, response.headers, sse=self._abandon_on_failure)
                if refused and not attempt.unjudged:
                    attempt.unsent += 1
                self._abandon(attempt, f"answered HTTP {status}")
        return response

    def _bound_body(
        self, request: httpx2.Request, response: httpx2.Response, attempt: Attempt | None
    ) -> None:
        """Bounds what is read of the answer to a POST, before anyone reads it (the SDK drains a followed
        redirect's body, and _session_forgotten reads a 404's). An event stream's events are bounded by
        the SDK (max_sse_event_size). Only a 2xx answer of streamable HTTP is a result too large to read
        (an error, then, that notes it on the call's Attempt): any other body (an error status's, a
        redirect's, an SSE message POST's, which the SDK does not use) is cut at the bound."""
        content_type = response.headers.get("content-type", "").lower()
        if self._max_body_bytes is None or request.method != "POST" or "event-stream" in content_type:
            return
        result = 200 <= response.status_code < 300 and not self._abandon_on_failure
        response.stream = _BoundedBody(
            response.stream,
            self._max_body_bytes,
            attempt if result else None,
            response.headers,
            cut=not result,
        )

    def _followed(self, attempt: Attempt, request: httpx2.Request, response: httpx2.Response) -> bool | None:
        """Whether the SDK follows this redirect: one within the server's origin that keeps the method
        (``next_request_within_origin``), up to the client's ``max_redirects`` in a row. None: it cannot
        be told (a bug, said in the log), which is taken as not followed but not as refused either."""
        client = self._redirects
        if client is None or not response.has_redirect_location:
            return False
        try:
            # The client sets the response's ``request`` and ``next_request`` only once the transport has
            # answered: they are set here on a stand-in, as the client sets them.
            stand_in = httpx2.Response(response.status_code, headers=response.headers, request=request)
            stand_in.next_request = _redirect_request(client, request, stand_in)
            if stand_in.next_request is None or next_request_within_origin(stand_in) is None:
                return False
        except Exception as exc:  # noqa: BLE001 - the transport must answer, whatever this finds
            log.warning(
                "cannot tell whether the MCP SDK follows a redirect of a tool call (%s); the call is given "
                "up and may have run",
                describe_error(exc),
            )
            return None
        attempt.redirects += 1
        return attempt.redirects <= client.max_redirects

    def _abandon(self, attempt: Attempt, failure: str) -> None:
        if self._abandon_on_failure and attempt.abandon is not None:
            attempt.failure = failure
            attempt.abandon()

    async def aclose(self) -> None:
        await self._inner.aclose()


class ResultTooLarge(httpx2.StreamError):
    """An HTTP answer longer than the limit: no more of it is read. (A StreamError: the SDK answers the
    request it was for with a JSON-RPC error quoting this message, and the session goes on.)"""


class _BoundedBody(httpx2.AsyncByteStream):
    """A response body read up to ``limit`` bytes as decoded: past it, ResultTooLarge (the call's Attempt,
    if any, notes it) or, with ``cut``, the end of the body. A compressed body is decoded here, where it is
    counted (its Content-Encoding is taken off the headers, so the client does not decode it again): a
    few KiB of gzip may decode to GiBs."""

    def __init__(
        self,
        inner: Any,
        limit: int,
        attempt: Attempt | None,
        headers: httpx2.Headers | None = None,
        *,
        cut: bool = False,
    ) -> None:
        self._inner = inner
        self._limit = limit
        self._attempt = attempt
        self._cut = cut
        self._encoded: httpx2.Headers | None = None
        if headers is not None and any(
            value.strip().lower() not in ("", "identity")
            for value in headers.get_list("content-encoding", split_commas=True)
        ):
            self._encoded = httpx2.Headers({"content-encoding": headers["content-encoding"]})
            del headers["content-encoding"]
            headers.pop("content-length", None)  # the encoded length

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        # closed when the read ends (cut, too large), not left suspended until the garbage collector comes
        async with aclosing(self._chunks()) as chunks:
            async for chunk in chunks:
                if read + len(chunk) > self._limit:
                    if self._cut:
                        if read < self._limit:
                            yield chunk[: self._limit - read]
                        return
                    if self._attempt is not None:
                        self._attempt.too_large = True
                    raise ResultTooLarge(
                        f"the answer is larger than {describe_size(self._limit)} ({MAX_MESSAGE_SETTING}): "
                        "not read"
                    )
                read += len(chunk)
                yield chunk

    async def _chunks(self) -> AsyncGenerator[bytes]:
        if self._encoded is None:
            source: AsyncIterator[bytes] = self._inner.__aiter__()
        else:
            # decoded as the client would (httpx2 decodes in bounded pieces), through its public API
            source = httpx2.Response(200, headers=self._encoded, stream=self._inner).aiter_bytes()
        try:
            async for chunk in source:
                yield chunk
        finally:
            aclose = getattr(source, "aclose", None)  # an async generator's (the stream's, the decoder's)
            if aclose is not None:
                await aclose()

    async def aclose(self) -> None:
        await self._inner.aclose()


# What was said once in the log (a helper of httpx2's gone).
_WARNED: set[str] = set()


def _redirect_request(
    client: httpx2.AsyncClient, request: httpx2.Request, response: httpx2.Response
) -> httpx2.Request | None:
    """The request that follows ``response``'s redirect, as the client builds it (its ``next_request``);
    None for an invalid Location, which the client does not follow either. Built with httpx2's private
    helper while it has one, else worked out here: the Location joined to the request's URL, the method
    kept by 307/308 (301/302 turn a POST into a GET, 303 anything but HEAD), the headers kept."""
    build = getattr(client, "_build_redirect_request", None)
    if build is not None:
        try:
            built: httpx2.Request = build(request, response)
        except httpx2.RemoteProtocolError:
            return None
        return built
    if "_build_redirect_request" not in _WARNED:
        _WARNED.add("_build_redirect_request")
        log.warning(
            "httpx2 has no AsyncClient._build_redirect_request any more: the redirects of MCP tool calls "
            "are judged by KubeChain's own reading of them"
        )
    try:
        url = httpx2.URL(response.headers["location"])
        if url.scheme and not url.host:
            url = url.copy_with(host=request.url.host)
        if url.is_relative_url:
            url = request.url.join(url)
    except httpx2.InvalidURL:
        return None
    method = request.method
    if (response.status_code in (302, 303) and method != "HEAD") or (
        response.status_code == 301 and method == "POST"
    ):
        method = "GET"
    return httpx2.Request(method, url, headers=request.headers)


async def _session_forgotten(request: httpx2.Request, response: httpx2.Response) -> bool:
    """Whether the server answered a message we sent on our session with 404, the spec's answer to a
    session id it does not know (it restarted). Only a POST says so: a server that routes only POST
    answers the client's GET stream 404 too. And not a JSON-RPC error about something else in the body."""
    if response.status_code != 404 or request.method != "POST" or MCP_SESSION_ID not in request.headers:
        return False
    try:
        await response.aread()  # bounded (cut at the message limit); the SDK reads it again from memory
    except httpx2.HTTPError:
        return True  # no JSON-RPC answer to read
    try:
        error = json.loads(response.content).get("error")
    except (ValueError, AttributeError, RecursionError):
        return True  # no JSON-RPC answer: the bare 404 the spec describes
    message = str(error.get("message") or "") if isinstance(error, dict) else ""
    return not message or "session" in message.lower()


def _refused_before_running(status: int, headers: httpx2.Headers, *, sse: bool) -> bool:
    """Whether an error status means the request was not run. An SSE server answers a message's POST
    before handling it (202), so any 4xx, 429, 503 or 307/308 the SDK did not follow (those it follows
    never get here) is a refusal, but not a 303 See Other, the answer to a POST that was handled (nor a
    301/302, which a POST-redirect-GET answers with too); a streamable-HTTP server answers
    when done, so only a rate limit (429) or an overload that asks to come back (503 with Retry-After) is
    sure not to have run it: a proxy's bare 503 may follow a request the server had received."""
    if sse:
        return (status < 500 and status not in (301, 302, 303)) or status == 503
    return status == 429 or (status == 503 and "retry-after" in headers)


def _carries_tools_call(request: httpx2.Request) -> bool:
    if request.method != "POST":
        return False
    try:
        body = json.loads(request.content)
    except (ValueError, httpx2.RequestNotRead):
        return False
    return isinstance(body, dict) and body.get("method") == "tools/call"


def _watching_unsent_calls(
    client: httpx2.AsyncClient,
    *,
    abandon_on_failure: bool = False,
    on_session_gone: Callable[[], None] | None = None,
    on_refused_post: Callable[[int], None] | None = None,
    max_body_bytes: int | None = None,
) -> httpx2.AsyncClient:
    """``client`` with every transport (its own and its proxy mounts) wrapped by _UnsentCallTransport."""
    wrap = functools.partial(
        _UnsentCallTransport,
        abandon_on_failure=abandon_on_failure,
        on_session_gone=on_session_gone,
        on_refused_post=on_refused_post,
        redirects=client,
        max_body_bytes=max_body_bytes,
    )
    client._transport = wrap(client._transport)
    client._mounts = {
        pattern: None if transport is None else wrap(transport)
        for pattern, transport in client._mounts.items()
    }
    return client


def _sse_http_client(
    headers: dict[str, str] | None = None,
    timeout: httpx2.Timeout | None = None,
    auth: httpx2.Auth | None = None,
) -> httpx2.AsyncClient:
    return _watching_unsent_calls(create_mcp_http_client(headers, timeout, auth), abandon_on_failure=True)


class _WatchedReadStream:
    """The transport's read stream, calling ``on_eof`` when it ends (the server went away)."""

    def __init__(self, inner: Any, on_eof: Callable[[], None]) -> None:
        self._inner = inner
        self._on_eof = on_eof

    @property
    def last_context(self) -> contextvars.Context | None:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            item: SessionMessage | Exception = await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_eof()
            raise
        return item

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _WatchedReadStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self.aclose()
        return None


# -- the child's stderr -------------------------------------------------------------------------------


class _StderrTail:
    """Reads a stdio child's stderr through a pipe: lines go to the debug log, the last few are kept for
    error messages (a server that exits at startup usually says why there)."""

    def __init__(self, label: str, scrub: Scrubber | None = None) -> None:
        self.label = label
        # a child that prints its environment must not put its secrets in our logs
        self._scrub = scrub if scrub is not None else Scrubber(())
        self.lines: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._read_fd: int | None = None
        self._task: asyncio.Task[None] | None = None

    def open_writer(self) -> TextIO:
        read_fd, write_fd = os.pipe()
        self._read_fd = read_fd
        self._task = asyncio.get_running_loop().create_task(self._pump(read_fd))
        return os.fdopen(write_fd, "w")

    async def _pump(self, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        buffer = b""
        skipping = False  # through the rest of a line too long to keep
        try:
            while chunk := await reader.read(4096):
                *ends, start = chunk.split(b"\n")
                for end in ends:
                    if not skipping:
                        self._add(buffer + end)
                    buffer, skipping = b"", False
                if not skipping:
                    buffer += start
                    if len(buffer) > STDERR_LINE_KEPT:
                        # Its start only, never in pieces: a secret across the cut between two pieces
                        # would be recognised in neither.
                        self._add(buffer, cut_short=True)
                        buffer, skipping = b"", True
            if buffer:
                self._add(buffer)
        finally:
            transport.close()

    def _add(self, raw: bytes, cut_short: bool = False) -> None:
        margin = max(STDERR_SECRET_MARGIN, self._scrub.longest) if cut_short else 0
        text = raw.decode("utf-8", "replace").rstrip()
        line = scrub_then_cut(text, self._scrub, STDERR_LINE_SHOWN, margin=margin)
        if line.strip():
            self.lines.append(" ".join(line.split())[:400])
            stderr_log.debug("[%s] %s", self.label, line)

    async def drain(self, timeout: float) -> None:
        """Let the reader reach EOF (the child exited), then stop it."""
        task = self._task
        if task is None:
            return
        if not task.done():
            await asyncio.wait([task], timeout=timeout)
        if not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=1)

    def tail(self, max_lines: int = 6, max_chars: int = 600) -> str:
        text = " | ".join(list(self.lines)[-max_lines:])
        return text if len(text) <= max_chars else "..." + text[-max_chars:]


# -- describing failures ----------------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for inner in exc.exceptions:
            out.extend(_leaves(inner))
        return out
    return [exc]


def describe_error(exc: BaseException) -> str:
    """A one-line, secret-free description (exception groups unwrapped to their causes)."""
    parts: list[str] = []
    for leaf in _leaves(exc):
        if isinstance(leaf, asyncio.CancelledError | anyio.get_cancelled_exc_class()):
            continue
        if isinstance(leaf, SDKError):
            text = leaf.message
        elif isinstance(leaf, MCPError | OSError):
            text = str(leaf)
        elif isinstance(leaf, httpx2.HTTPStatusError):
            text = f"HTTP {leaf.response.status_code} from {redact_url(str(leaf.request.url))}"
        else:
            text = f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
        if text not in parts:
            parts.append(text)
    return "; ".join(parts) or type(exc).__name__


class ConnectionLost(Exception):
    """The session cannot be used any more. ``maybe_executed``: the failed request may have reached the
    server (then only an idempotent call may be retried)."""

    def __init__(self, message: str, *, maybe_executed: bool) -> None:
        super().__init__(message)
        self.maybe_executed = maybe_executed


# -- results ------------------------------------------------------------------------------------------


def _b64_size(data: str) -> int:
    return len(data.strip().rstrip("=")) * 3 // 4


def _keep_answers_that_miss_their_schema(client: Client) -> None:
    """The SDK checks a tool's answer against the output schema the tool declares and raises when it does
    not match, after the tool ran: its answer was lost and the call reported failed, so the LLM would call
    it again (a second issue filed, a second payment). The answer is kept instead, with a note saying
    what did not match."""
    session = client.session
    check = session.validate_tool_result

    async def noted(name: str, result: types.CallToolResult) -> None:
        try:
            await check(name, result)
        except RuntimeError as mismatch:
            attempt = _ATTEMPT.get()
            if attempt is not None:
                attempt.schema_problem = str(mismatch)  # noted and logged by the call, which can scrub it
            else:
                log.warning("MCP tool %s answered off its declared output schema", name)

    session.validate_tool_result = noted  # type: ignore[method-assign]


def flatten_result(result: types.CallToolResult) -> MCPToolResult:
    """Text blocks joined by newlines; other content described in brackets."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.ImageContent):
            parts.append(f"[image content: {block.mime_type}, {_b64_size(block.data)} bytes]")
        elif isinstance(block, types.AudioContent):
            parts.append(f"[audio content: {block.mime_type}, {_b64_size(block.data)} bytes]")
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource link: {block.uri}]")
        elif isinstance(block, types.EmbeddedResource):
            resource = block.resource
            if isinstance(resource, types.TextResourceContents):
                parts.append(f"[resource: {resource.uri}]\n{resource.text}")
            else:
                mime = f"{resource.mime_type}, " if resource.mime_type else ""
                parts.append(f"[resource: {resource.uri}, {mime}{_b64_size(resource.blob)} bytes]")
        else:
            parts.append(f"[{getattr(block, 'type', 'unknown')} content]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return MCPToolResult(text="\n".join(parts), is_error=bool(result.is_error))


# -- hearing that the tool list changed --------------------------------------------------------------


def listens_for_tool_changes(client: Client) -> bool:
    """Whether to open a subscriptions/listen stream for tool-list changes: only the 2026-07-28 protocol
    has it (a 2025 server sends its notifications unasked), and only a server that advertises them."""
    if client.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    tools = client.server_capabilities.tools
    return tools is not None and bool(tools.list_changed)


# -- the session --------------------------------------------------------------------------------------


class Session:
    """One connection to one MCPServer spec (identified by ``fingerprint``). Loop-thread only."""

    def __init__(
        self,
        label: str,
        spec: ResolvedSpec,
        connect_timeout_s: float,
        call_timeout_s: float,
        on_tools_changed: Callable[[], None] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        list_timeout_s: float | None = None,
        on_released: Callable[[], None] | None = None,
    ) -> None:
        """``on_tools_changed``: called (on the loop, so it must not block) when the server says its tool
        list changed; without it the session does not listen for that. ``max_message_bytes``: the longest
        message read from the server (a longer stdio line ends the session). ``list_timeout_s``: how long
        a tools/list on the open session (refresh_tools) may go unanswered before the session is taken for
        hung; at most, and by default, ``connect_timeout_s``, which covers starting the server too.
        ``on_released``: called (on the loop) when a request on it ends and when it has ended, its stdio
        child gone."""
        self.label = label
        self.spec = spec
        self.fingerprint = spec.fingerprint()
        self.connect_timeout_s = connect_timeout_s
        self.list_timeout_s = min(connect_timeout_s, list_timeout_s or connect_timeout_s)
        self.call_timeout_s = call_timeout_s
        self.client: Client | None = None
        self.tools: list[types.Tool] = []
        # The MCPServer the session was last used for (the manager's): kept while it is there as it was.
        self.serves: ServedServer | None = None
        self.process: Any = None  # the stdio child (anyio Process) when the spawn hook is in place
        self.dead = False  # the connection ended (or never came up)
        self.broken = False  # a request saw the connection fail: no new requests
        self.forgotten = False  # the server answered our session id with 404 (it restarted)
        self.max_message_bytes = max_message_bytes
        # (stdio) the server wrote a line longer than max_message_bytes: the session ended, and how many
        # requests were in flight then (the one a call waited for, or maybe another's), and the id of the
        # request it answered, when its start says (None: not known; NOT_AN_ANSWER: a request or notification)
        self.too_large_inflight: int | None = None
        self.too_large_id: int | str | _NotAnAnswer | None = None
        self.retired = False  # replaced or discarded: stop once in-flight calls are done
        self.inflight = 0
        self.finished = asyncio.Event()
        self._wake = anyio.Event()
        self._stopping = False
        self._scope: anyio.CancelScope | None = None
        self._stderr = _StderrTail(label, spec.scrubber) if spec.transport == "stdio" else None
        self._task: asyncio.Task[None] | None = None
        self._on_tools_changed = on_tools_changed
        # The connect has asked for the tool list: a change heard before that is in the list; one heard
        # from then on (or missed by a listen stream opened since) may not be.
        self._tools_list_asked = False
        # Waits out the listen stream's back-off (replaceable: tests make it instant).
        self._listen_backoff: Callable[[float], Awaitable[None]] = anyio.sleep
        # (http) the error status the last POST was answered with, which the SDK does not say
        self._refused_post_status: int | None = None
        self._on_released = on_released

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.client is not None and not (self.dead or self.broken or self.retired)

    @property
    def leaving(self) -> bool:
        """Retired or told to stop: it ends without being told again."""
        return self.retired or self._stopping

    @property
    def pid(self) -> int | None:
        return getattr(self.process, "pid", None)

    async def start(self) -> None:
        """Connect and list tools within the connect timeout; MCPError if that fails."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        namespace, _, name = self.label.partition("/")
        self._task = asyncio.get_running_loop().create_task(
            self.run(ready),
            name=f"mcp-session {self.label}",
            context=detached_context("MCPServer", namespace, name),  # not the first caller's
        )
        try:
            await asyncio.wait_for(asyncio.shield(ready), self.connect_timeout_s)
        except TimeoutError:
            ready.cancel()
            self.cancel()
            await self.wait_finished(10)
            raise MCPError(
                self._explain(
                    f"timed out after {self.connect_timeout_s:g}s connecting to {self.spec.describe()}"
                )
            ) from None
        except asyncio.CancelledError:
            ready.cancel()
            self.cancel()
            raise

    async def run(self, ready: asyncio.Future[None]) -> None:
        error: BaseException | None = None
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                client = Client(
                    self._transport(),  # type: ignore[arg-type]
                    mode="auto",
                    cache=None,
                    client_info=CLIENT_INFO,
                    message_handler=self._on_message,
                    input_required_max_rounds=still_working_rounds(self.call_timeout_s),
                )
                async with client, anyio.create_task_group() as background:
                    _keep_answers_that_miss_their_schema(client)
                    self.client = client
                    if self._on_tools_changed is not None and listens_for_tool_changes(client):
                        # Listening before listing: a change made between the two is not missed.
                        first_attempt = anyio.Event()
                        background.start_soon(self._follow_tool_list_changes, client, first_attempt)
                        with anyio.move_on_after(min(LISTEN_ACK_WAIT_S, self.connect_timeout_s / 4)):
                            await first_attempt.wait()
                    self._tools_list_asked = True
                    with anyio.fail_after(self.connect_timeout_s):
                        self.tools = await self._list_all(client)
                    log.info(
                        "MCP session %s connected (%s, protocol %s, %d tools%s)",
                        self.label,
                        self.spec.describe(),
                        client.protocol_version,
                        len(self.tools),
                        f", pid {self.pid}" if self.pid else "",
                    )
                    if not ready.done():
                        ready.set_result(None)
                    if not self._stopping:
                        await self._wake.wait()
                    background.cancel_scope.cancel()
        except Exception as exc:
            error = exc
        finally:
            self.dead = True
            self.client = None
            if self._stderr is not None:
                await self._stderr.drain(1.0 if error is not None or not ready.done() else 0.2)
            if not ready.done():
                what = describe_error(error) if error is not None else "the connection closed during setup"
                if self.too_large_inflight is not None:
                    what = self._lost_message()
                elif self._refused_post_status is not None:
                    what = await self._refused_post(what, self._refused_post_status)
                ready.set_exception(MCPError(self._explain(self._connect_failure(what, error))))
            elif error is not None and not self._stopping:
                log.warning("MCP session %s ended: %s", self.label, self._explain(describe_error(error)))
            else:
                log.info("MCP session %s closed", self.label)
            self.finished.set()
            if self._on_released is not None:
                self._on_released()

    def _post_refused(self, status: int) -> None:
        self._refused_post_status = status

    async def _refused_post(self, what: str, status: int) -> str:
        """``what`` with the SDK's stand-in replaced by the status the server answered the POST with, and,
        when the server does not take POSTs at this URL (404, 405) but streams events from it, what to do:
        ``transport: http`` at a legacy SSE endpoint failed as "Server returned an error response"."""
        what = what.replace(SDK_STATUS_STAND_IN, f"answered HTTP {status} to POST")
        if status in (404, 405) and await self._streams_events():
            what += "; this server speaks SSE: set transport: sse"
        return what

    async def _streams_events(self) -> bool:
        """Whether a GET of the server's URL (with its headers) is answered with an event stream, as an SSE
        server's is. Only its headers are read, within a few seconds."""
        assert self.spec.url is not None
        timeout = min(SSE_PROBE_TIMEOUT_S, self.connect_timeout_s)
        try:
            with anyio.fail_after(timeout):
                async with (
                    create_mcp_http_client(
                        headers=dict(self.spec.headers), timeout=httpx2.Timeout(timeout)
                    ) as http,
                    http.stream("GET", self.spec.url, headers={"Accept": "text/event-stream"}) as response,
                ):
                    content_type = response.headers.get("content-type", "").lower()
                    return response.status_code == 200 and content_type.startswith("text/event-stream")
        except Exception:  # noqa: BLE001 - no answer is no hint: the failure is said without one
            return False

    def _connect_failure(self, what: str, error: BaseException | None) -> str:
        if self.spec.transport == "stdio":
            leaves = _leaves(error) if error is not None else []
            if any(isinstance(leaf, OSError) for leaf in leaves) and self.process is None:
                command = self.spec.command or ""
                if any(isinstance(leaf, FileNotFoundError) for leaf in leaves) and len(command.split()) > 1:
                    # "npx -y some-server" in command: the whole line is taken for a program's name
                    what += "; command is a program alone: write its arguments in args"
                return f"cannot start stdio command '{command}': {what}"
            return f"MCP handshake with stdio command '{self.spec.command}' failed: {what}"
        return f"cannot connect to {self.spec.describe()}: {what}"

    def _explain(self, message: str) -> str:
        """Adds the child's exit code and last stderr lines, when there are any."""
        extra = []
        returncode = getattr(self.process, "returncode", None)
        if returncode is not None:
            extra.append(f"exit code {returncode}")
        if self._stderr is not None and self._stderr.lines:
            extra.append(f"stderr: {self._stderr.tail()}")
        return self.spec.scrub(f"{message} ({'; '.join(extra)})" if extra else message)

    def stop(self) -> None:
        """Close gracefully (stdio: close stdin, then terminate the process group if it lingers)."""
        self._stopping = True
        self._wake.set()

    def cancel(self) -> None:
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()
        self._wake.set()

    def retire(self) -> None:
        """No new calls; stop as soon as none are in flight."""
        self.retired = True
        if self.inflight == 0 or self.dead:
            self.stop()

    async def wait_finished(self, timeout: float) -> bool:
        if self._task is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self.finished.wait()), timeout)
        except TimeoutError:
            return False
        return True

    def _spawned(self, process: Any) -> None:
        """The stdio child is started (the SDK's reader has not started yet): its stdout is bounded."""
        self.process = process
        stdout = getattr(process, "_stdout", None)
        if isinstance(stdout, anyio.abc.ByteReceiveStream):
            process._stdout = _BoundedLines(stdout, self.max_message_bytes, self._line_too_large)
        else:
            log.warning("MCP session %s: its server's stdout cannot be bounded (anyio changed?)", self.label)

    def _line_too_large(self, head: bytes = b"") -> None:
        """The server wrote a message too large to read (``head``: its start, when known): the session ends."""
        log.warning(
            "MCP session %s: the server wrote a message larger than %s (%s); the session is closed",
            self.label,
            describe_size(self.max_message_bytes),
            MAX_MESSAGE_SETTING,
        )
        self.too_large_inflight = self.inflight
        self.too_large_id = _top_level_id(head) if head else None
        self.broken = True

    def _too_large_answered(self, attempt: Attempt) -> bool | None:
        """Whether the message too large to read answered this call: its id says, or else it was the only
        request in flight. None: it cannot be told. A request or notification of the server's answers none,
        even the only call in flight (a request's id is numbered as ours are: it is not our call's)."""
        if self.too_large_id is NOT_AN_ANSWER:
            return False
        if self.too_large_id is not None:
            return self.too_large_id in attempt.request_ids
        return True if self.too_large_inflight == 1 else None

    def _ended_by_too_large(self, tool: str, attempt: Attempt) -> Exception | None:
        """What a call whose session a message too large ended fails with, if one did: the call it answered
        is told its result was too large (not retried: it would run and fail again); any other lost its
        connection, as with any end of a session (retried if it cannot have run, or may run twice)."""
        if self.too_large_inflight is None:
            return None
        answered = self._too_large_answered(attempt)
        if answered:
            return self._too_large(tool, ran=False)
        self.broken = True
        if self.too_large_id is NOT_AN_ANSWER:
            whose = "a request or notification of the server's, not an answer"
        elif answered is False:
            whose = "not this call's answer"
        else:
            whose = "the answer of this call or of another in flight"
        return ConnectionLost(self._lost_message(whose), maybe_executed=attempt.may_have_run)

    def _too_large(self, tool: str, *, ran: bool, limit: int | None = None) -> MCPError:
        """The error for a call whose answer was longer than the limit (ran: it surely came from the tool;
        ``limit``: the one it was read with, if not ours)."""
        what = f"the result of tool {tool}"
        restarted = "; the session was restarted" if self.too_large_inflight is not None else ""
        outcome = "the tool ran" if ran else "the tool may have run"
        bound = f"{describe_size(self.max_message_bytes)} ({MAX_MESSAGE_SETTING})"
        if limit is not None and limit != self.max_message_bytes:
            bound = f"{describe_size(limit)} (the MCP SDK's limit for this stream)"
        return MCPError(
            f"{what} is larger than {bound} and was "
            f"not read{restarted}. {outcome[0].upper()}{outcome[1:]}: ask it for less (a narrower query, a "
            "smaller page)"
        )

    def _session_gone(self) -> None:
        if not self.forgotten:
            log.info("MCP session %s: the server no longer knows this session (it restarted?)", self.label)
        self.forgotten = True
        self.broken = True

    def _lost(self) -> None:
        if not self._stopping and not self.dead:
            log.info("MCP session %s: the server closed the connection", self.label)
        self.dead = True
        self._wake.set()

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, Exception):
            # a server's text may quote its own environment (secrets among it): scrubbed like every error
            log.debug(
                "MCP session %s: transport error: %s", self.label, self.spec.scrub(describe_error(message))
            )
        elif getattr(message, "method", None) == TOOLS_LIST_CHANGED:
            # Either era: the SDK hands the frames of a listen stream to this handler too.
            self._signal_tools_changed()
        await anyio.lowlevel.checkpoint()

    def _signal_tools_changed(self) -> None:
        if self._on_tools_changed is None or self._stopping or not self._tools_list_asked:
            return
        log.debug("MCP session %s: the server's tool list changed", self.label)
        try:
            self._on_tools_changed()
        except Exception as exc:  # noqa: BLE001 - hearing of a change must never break the session
            log.warning("MCP session %s: passing on a tool-list change failed: %s", self.label, exc)

    async def _follow_tool_list_changes(self, client: Client, first_attempt: anyio.Event) -> None:
        """Hold a subscriptions/listen stream for tool-list changes open (2026-07-28), opening it again when
        it ends. Its events reach ``_on_message`` (which passes them on): here they are only consumed.
        Never fails the session: a server that refuses the stream is only not listened to."""
        delay = LISTEN_RETRY_MIN_S
        while not (self.dead or self.broken or self._stopping):
            opened_at: float | None = None
            try:
                async with AsyncExitStack() as stack:
                    with anyio.fail_after(self.connect_timeout_s):
                        subscription = await stack.enter_async_context(client.listen(tools_list_changed=True))
                    if not subscription.honored.tools_list_changed:
                        log.info(
                            "MCP session %s: the server does not send tool-list changes on subscriptions/listen",
                            self.label,
                        )
                        return
                    opened_at = anyio.current_time()
                    first_attempt.set()
                    # No replay: a change made since the tools were listed, while no stream was open,
                    # went unheard (nothing is signalled before the list is asked for).
                    self._signal_tools_changed()
                    async for _event in subscription:
                        pass
                ended = "the server closed it"
            except (SDKError, ListenNotSupportedError) as exc:
                refused = isinstance(exc, ListenNotSupportedError) or exc.code in LISTEN_REFUSALS
                if refused and not (self.dead or self.broken or self._stopping):
                    log.info(
                        "MCP session %s: subscriptions/listen refused (%s); tool-list changes are not followed",
                        self.label,
                        self.spec.scrub(describe_error(exc)),
                    )
                    return
                ended = self.spec.scrub(describe_error(exc))
            except Exception as exc:  # noqa: BLE001 - lost, unacknowledged, a transport error: tried again
                ended = self.spec.scrub(describe_error(exc))
            finally:
                first_attempt.set()
            if self.dead or self.broken or self._stopping:
                return
            # A stream that stayed open a good while: not a server that drops it at once.
            if opened_at is not None and anyio.current_time() - opened_at >= LISTEN_RETRY_MAX_S:
                delay = LISTEN_RETRY_MIN_S
            log.info(
                "MCP session %s: its subscriptions/listen stream %s (%s); listening again in %gs",
                self.label,
                "ended" if opened_at is not None else "could not be opened",
                ended,
                delay,
            )
            await self._listen_backoff(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX_S)

    @asynccontextmanager
    async def _transport(self) -> AsyncIterator[tuple[_WatchedReadStream, _WatchedWriteStream]]:
        spec = self.spec
        async with AsyncExitStack() as stack:
            if spec.transport == "stdio":
                assert spec.command is not None and self._stderr is not None
                params = StdioServerParameters(
                    command=spec.command, args=list(spec.args), env=child_environment(dict(spec.env))
                )
                errlog = self._stderr.open_writer()
                token = _SPAWNED.set(self._spawned)
                try:
                    read, write = await stack.enter_async_context(stdio_client(params, errlog=errlog))
                finally:
                    _SPAWNED.reset(token)
                    errlog.close()  # the child holds its own copy
            elif spec.transport == "http":
                assert spec.url is not None
                timeout = httpx2.Timeout(
                    self.connect_timeout_s, read=max(SSE_READ_TIMEOUT_S, self.call_timeout_s)
                )
                http = await stack.enter_async_context(
                    _watching_unsent_calls(
                        create_mcp_http_client(headers=dict(spec.headers), timeout=timeout),
                        on_session_gone=self._session_gone,
                        on_refused_post=self._post_refused,
                        max_body_bytes=self.max_message_bytes,
                    )
                )
                read, write = await stack.enter_async_context(
                    streamable_http_client(
                        spec.url, http_client=http, max_sse_event_size=self.max_message_bytes
                    )
                )
            else:
                assert spec.url is not None
                bounded = _SSE_EVENTS.set((self.max_message_bytes, self._line_too_large))
                try:
                    read, write = await stack.enter_async_context(
                        sse_client(
                            spec.url,
                            headers=dict(spec.headers),
                            timeout=self.connect_timeout_s,
                            sse_read_timeout=max(SSE_READ_TIMEOUT_S, self.call_timeout_s),
                            httpx_client_factory=_sse_http_client,
                        )
                    )
                finally:
                    _SSE_EVENTS.reset(bounded)
            yield _WatchedReadStream(read, self._lost), _WatchedWriteStream(write)

    # -- requests ---------------------------------------------------------------------------------

    @staticmethod
    async def _list_all(client: Client) -> list[types.Tool]:
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_TOOL_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        else:
            # a server whose cursors never end (or that lists more than anyone could offer an LLM)
            log.warning(
                "MCP server listed more than %d pages of tools; using the %d tools of the first %d",
                MAX_TOOL_PAGES,
                len(tools),
                MAX_TOOL_PAGES,
            )
        return tools

    def _lost_message(self, whose: str = "") -> str:
        if self.too_large_inflight is not None:
            return (
                f"the server sent a message larger than {describe_size(self.max_message_bytes)} "
                f"({MAX_MESSAGE_SETTING}){', ' + whose if whose else ''}; the session was closed"
            )
        if self.forgotten:
            return "the server no longer knows this session (it restarted?)"
        if self.process is not None and getattr(self.process, "returncode", None) is not None:
            return self._explain("the MCP server process exited")
        return self._explain(f"the connection to {self.spec.describe()} was lost")

    def _check_usable(self) -> Client:
        client = self.client
        if client is None or self.dead or self.broken:
            raise ConnectionLost(self._lost_message(), maybe_executed=False)
        if self.retired or self._stopping:
            # Replaced (its MCPServer changed) while this caller held it, e.g. between listing tools and
            # calling one: a request sent now could be cut off by the stop, so it goes to a fresh session.
            raise ConnectionLost(self._explain("the session was replaced"), maybe_executed=False)
        return client

    async def refresh_tools(self) -> list[types.Tool]:
        client = self._check_usable()
        self.inflight += 1
        try:
            with anyio.fail_after(self.list_timeout_s):
                self.tools = await self._list_all(client)
        except TimeoutError:
            # No answer to tools/list for a whole list timeout: hung, not slow. A fresh session is
            # tried instead (nothing was called: a tool call waiting on this list goes on there).
            self.broken = True
            raise ConnectionLost(
                self._explain(f"listing tools timed out after {self.list_timeout_s:g}s"),
                maybe_executed=False,
            ) from None
        except SDKError as exc:
            if exc.code == CONNECTION_CLOSED or self.dead or self.forgotten:
                self.broken = True
                raise ConnectionLost(self._lost_message(), maybe_executed=False) from exc
            raise MCPError(f"failed to list tools: {exc.message}") from exc
        finally:
            self._release()
        return self.tools

    def time_after_a_call(self) -> float:
        """What a call needs past its timeout: the margin of its "still working" rounds and a liveness probe."""
        return STILL_WORKING_MARGIN_S + min(PROBE_TIMEOUT_S, self.connect_timeout_s)

    async def call_tool(
        self,
        tool: str,
        arguments: dict[str, Any],
        *,
        timeout_s: float | None = None,
        attempt: Attempt | None = None,
    ) -> types.CallToolResult:
        """The raw result. ConnectionLost if the session died (saying whether the request may have run);
        SDK errors (JSON-RPC error responses, timeouts) propagate. ``timeout_s``: shorter than the call
        timeout when the caller's budget is; ``attempt``: the caller's, to see whether the request left."""
        client = self._check_usable()
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        attempt = attempt if attempt is not None else Attempt()
        token = _ATTEMPT.set(attempt)
        self.inflight += 1
        try:
            # The whole call, "still working" rounds included, within the call timeout (and a moment: a
            # single request that times out is the SDK's to report, and is followed by a liveness probe).
            with anyio.fail_after(timeout + STILL_WORKING_MARGIN_S):
                with anyio.CancelScope() as abandoned:
                    attempt.abandon = abandoned.cancel
                    result = await client.call_tool(tool, arguments, read_timeout_seconds=timeout)
                    if attempt.schema_problem:
                        # the validator's message quotes the offending value, which may be a secret
                        problem = scrub_then_cut(attempt.schema_problem, self.spec.scrub, 300)
                        log.warning("MCP tool %s answered off its declared output schema: %s", tool, problem)
                        note = f"[note: the tool ran, but its answer does not match its output schema: {problem}]"
                        result.content = [*result.content, types.TextContent(type="text", text=note)]
                    return result
            # Abandoned: the POST carrying the call failed (SSE), and this session's POSTs have stopped.
            self.broken = True
            raise ConnectionLost(
                self._explain(f"sending the call to {self.spec.describe()} failed ({attempt.failure})"),
                maybe_executed=attempt.may_have_run,
            )
        except (TimeoutError, InputRequiredRoundsExceededError):
            if attempt.failure:
                self.broken = True  # its POSTs have stopped (SSE): nothing more will come of it
            else:
                await self._check_alive(client)  # a server still answering is slow, not hung
            raise MCPError(
                f"the server was still working after {timeout:g}s; the tool may have run "
                "(and may still be running)"
            ) from None
        except SDKError as exc:
            if (ended := self._ended_by_too_large(tool, attempt)) is not None:
                raise ended from exc
            limit = sse_event_limit(exc.message) if exc.code == CONNECTION_CLOSED else None
            if attempt.too_large or limit is not None:
                # an HTTP answer (its own event stream's or body): the session goes on
                raise self._too_large(tool, ran=True, limit=limit) from exc
            if exc.code == CONNECTION_CLOSED or self.dead:
                self.broken = True
                raise ConnectionLost(self._lost_message(), maybe_executed=attempt.may_have_run) from exc
            if attempt.session_gone or (exc.code == INVALID_REQUEST and exc.message == "Session terminated"):
                # HTTP 404 for our session id, whatever its body: the server restarted and never ran this
                # request. An earlier request of the same call (before a "still working" answer) did start it.
                self.broken = True
                raise ConnectionLost(
                    "the server no longer knows this session (it restarted?)",
                    maybe_executed=attempt.sends - attempt.unsent > 1,
                ) from exc
            if exc.code == REQUEST_TIMEOUT:
                await self._check_alive(client)
            if exc.code == INTERNAL_ERROR and exc.message == SDK_STATUS_STAND_IN and attempt.http_status:
                status = attempt.http_status
                if status in (429, 503):
                    # overloaded or rate-limited: another try on a fresh session if the call cannot have
                    # run (this was its first request, refused before running) or may run twice
                    self.broken = True
                    raise ConnectionLost(
                        f"{self.spec.describe()} answered HTTP {status}", maybe_executed=attempt.may_have_run
                    ) from exc
                raise MCPError(
                    f"error calling tool {tool}: {self.spec.describe()} answered HTTP {status}"
                ) from exc
            raise
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            if (ended := self._ended_by_too_large(tool, attempt)) is not None:
                raise ended from exc
            self.broken = True
            raise ConnectionLost(self._lost_message(), maybe_executed=attempt.may_have_run) from exc
        finally:
            _ATTEMPT.reset(token)
            self._release()

    async def _check_alive(self, client: Client) -> None:
        """After a call timed out: a server that answers nothing to a small request either is hung (a
        stopped or wedged stdio child, a proxy that swallows requests). The session is marked broken so
        the next request starts a fresh one, rather than every request waiting out its timeout on it for
        ever; a server that answers (even with an error) is only slow, and keeps its session. The probe is
        tools/list: ping is gone from the protocol."""
        try:
            with anyio.fail_after(min(PROBE_TIMEOUT_S, self.connect_timeout_s)):
                await client.list_tools()
            return
        except SDKError as exc:
            if exc.code != CONNECTION_CLOSED and not self.dead and not self.forgotten:
                return  # an error answer is an answer (but not a 404 for our session: see _session_gone)
            problem = exc.message
        except Exception as exc:  # noqa: BLE001 - any failure to answer means the same
            problem = describe_error(exc) if str(exc) else type(exc).__name__
        log.warning(
            "MCP session %s: no answer to tools/list after a call timed out (%s); it will be restarted",
            self.label,
            self.spec.scrub(problem),  # the server's text, which may quote its environment
        )
        self.broken = True

    def _release(self) -> None:
        self.inflight -= 1
        if self.retired and self.inflight == 0:
            self.stop()
        if self._on_released is not None:
            self._on_released()
