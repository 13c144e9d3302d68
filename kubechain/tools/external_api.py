"""``externalAPI`` tools: an HTTP request with the arguments as JSON and a bearer token from a Secret."""

from __future__ import annotations

import json
import re
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx

from kubechain.http_watchdog import ShutAtDeadline, end_io_by_deadline, io_ending_by, shut_at
from kubechain.models.tool import CREDENTIALS_IN_URL
from kubechain.redaction import Scrubber, redact_url, scrub_then_cut
from kubechain.tools.builtin import ToolError
from kubechain.tools.deadline import cut_short_note

MAX_RESPONSE_BYTES = 1024 * 1024  # read as bytes, kept as characters
# A compressed body is decoded in pieces of at most this, each counted against MAX_RESPONSE_BYTES.
DECODED_PIECE_BYTES = 64 * 1024
# What the API is asked for: the encodings decoded here (in pieces), which httpx would decode whole.
ACCEPTED_ENCODINGS = "gzip, deflate"

_client: httpx.Client | None = None
_client_lock = threading.Lock()


def _shared_client() -> httpx.Client:
    """One client per process: building one loads the CA bundle (~20 ms of CPU), and fifty tool calls
    of a turn start at once; it also keeps connections to the same API alive between calls."""
    global _client
    with _client_lock:
        if _client is None:
            _client = end_io_by_deadline(
                httpx.Client(
                    verify=True,
                    follow_redirects=False,
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                    # A jar that keeps nothing: the client serves every namespace's tools, and a session
                    # cookie one tenant's API set would go with every other tenant's calls to that host.
                    cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
                )
            )
        return _client


def call_external_api(
    url: str,
    method: str | None,
    arguments: dict[str, Any],
    token: str | None,
    timeout_s: float,
    *,
    own_timeout_s: float | None = None,
) -> str:
    """The response body is the tool result; TLS is verified; non-2xx is a tool error. The bearer token
    is cut out of both: an API that echoes the request (a debug endpoint, an error page) would put it in
    the tool call's status, its Events and the LLM's context. Each text is scrubbed once, the token's
    forms worked out once (the body may be 1 MiB). ``own_timeout_s``: the tool's own timeout, when
    ``timeout_s`` may be its claim's time left instead (a timeout then says which ended the call)."""
    scrub = Scrubber([token] if token else [])
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/plain, */*",
        "Accept-Encoding": ACCEPTED_ENCODINGS,
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    verb = (method or "POST").upper()
    # how the errors name the request: a URL may carry a password or a key in its query
    request = scrub(f"{verb} {redact_url(url)}")
    # Read past the size limit by the token's longest form: one the body holds across the limit is then
    # read whole and cut out (see scrub_then_cut).
    margin = scrub.longest
    # httpx's timeout bounds each read, not the request: a server that trickles its headers or its body
    # would hold the call (and its claim) for ever. Every wait on the network, from the connection on,
    # ends by one deadline (io_ending_by); the body's chunks are checked against it too, and the watchdog
    # shuts the connection at it.
    deadline = time.monotonic() + timeout_s
    by_claim = "" if own_timeout_s is None else cut_short_note(timeout_s, own_timeout_s)
    timed_out = ToolError(f"{request} timed out after {timeout_s:.0f}s{by_claim}")
    options: dict[str, Any] = {}
    if verb in ("GET", "DELETE"):
        target = with_query(url, query_parameters(arguments), request)
    else:
        target, options["json"] = httpx.URL(url), arguments
    if target.userinfo:  # as httpx reads the URL; a Tool's validation refuses it too
        raise ToolError(f"{request}: {CREDENTIALS_IN_URL}")
    try:
        client = _shared_client()
        with (
            io_ending_by(deadline),
            # auth: no Basic auth httpx would make of a URL's userinfo, whatever it takes for one
            client.stream(
                verb, target, headers=headers, timeout=timeout_s, auth=httpx.Auth(), **options
            ) as response,
        ):
            watchdog = shut_at(response.extensions, deadline)
            if watchdog is not None and isinstance(response.stream, httpx.SyncByteStream):  # a sync client's
                response.stream = _WatchedBody(response.stream, watchdog)
            chunks: list[bytes] = []
            size = 0
            cut_short = False
            # httpx decodes each chunk read whole: a few KiB of gzip may decode to GiBs before the
            # size limit is checked
            body_pieces = decoded(response.iter_raw(), response.headers.get("content-encoding", ""))
            for chunk in body_pieces:
                if time.monotonic() > deadline:
                    raise timed_out
                chunks.append(chunk)
                size += len(chunk)
                if size >= MAX_RESPONSE_BYTES + margin:
                    cut_short = True
                    break
            encoding = response.encoding or "utf-8"
    except UndecodableBody as exc:
        raise ToolError(f"{request} answered {exc}") from None
    except httpx.TimeoutException:
        raise timed_out from None
    except httpx.HTTPError as exc:
        if time.monotonic() >= deadline:
            raise timed_out from None  # the watchdog shut the connection
        raise ToolError(f"{request} failed: {why_failed(exc, scrub)}") from None
    # The token is cut out before any cut, which could leave its start where no later redaction finds it.
    body = b"".join(chunks).decode(encoding, "replace")
    unread = margin if cut_short else 0
    if response.status_code >= 400:
        shown = scrub_then_cut(body, scrub, 500, margin=unread)
        raise ToolError(f"{request} returned status {response.status_code}: {shown}")
    if response.status_code >= 300:
        # not followed: the bearer token would go along to wherever it points
        where = scrub_then_cut(redact_url(response.headers.get("location") or "nowhere"), scrub, 300)
        raise ToolError(
            f"{request} answered with a redirect ({response.status_code}) to {where}, which is not "
            "followed: set the Tool's execute.externalAPI.url to the address that answers"
        )
    return scrub_then_cut(body, scrub, MAX_RESPONSE_BYTES, margin=unread)


class _WatchedBody(httpx.SyncByteStream):
    """A response's body whose watchdog is cancelled as the response is closed, before httpcore gives its
    connection back to the pool the tool calls share (iter_raw closes it once the body is read): cancelled
    after, it shut the connection down at this call's deadline under whichever call had it by then."""

    def __init__(self, inner: httpx.SyncByteStream, watchdog: ShutAtDeadline) -> None:
        self._inner = inner
        self._watchdog = watchdog

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        self._watchdog.cancel()
        self._inner.close()


# a URL in an error's text ("scheme://" and what follows up to a space or a quote)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def why_failed(exc: httpx.HTTPError, scrub: Scrubber) -> str:
    """The error's type and text (a host not found, a connection refused, a certificate not trusted each
    say which), without the token or the credentials of a URL it quotes."""
    text = _URL_IN_TEXT.sub(lambda url: redact_url(url.group()), str(exc)).strip()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {scrub_then_cut(text, scrub, 300)}"


class UndecodableBody(Exception):
    """A body in an encoding not decoded here, or one its decoder refuses."""


def decoded(raw: Iterable[bytes], content_encoding: str) -> Iterator[bytes]:
    """The body ``raw`` (as sent, in ``content_encoding``) decoded, in pieces of at most
    DECODED_PIECE_BYTES: each piece is counted before the next is decoded."""
    codings = [
        coding.strip().lower()
        for coding in content_encoding.split(",")
        if coding.strip().lower() not in ("", "identity")
    ]
    if any(coding not in ("gzip", "x-gzip", "deflate") for coding in codings):
        raise UndecodableBody(f"in Content-Encoding {content_encoding}, which is not decoded")
    pieces: Iterable[bytes] = raw
    for coding in reversed(codings):  # listed in the order they were applied
        pieces = _inflated(pieces, "deflate" if coding == "deflate" else "gzip")
    return iter(pieces)


def _inflated(compressed: Iterable[bytes], coding: str) -> Iterator[bytes]:
    # gzip; deflate is a zlib stream, or raw deflate from some servers (httpx tries both, as here)
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS)
    started = False
    try:
        for data in compressed:
            while True:
                try:
                    piece = inflate.decompress(data, DECODED_PIECE_BYTES)
                except zlib.error:
                    if started or coding != "deflate":
                        raise
                    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                    started = True
                    continue
                started = True
                if piece:
                    yield piece
                data = inflate.unconsumed_tail
                # a full piece may have left output in the decoder with all the input taken
                if not data and len(piece) < DECODED_PIECE_BYTES:
                    break
        rest = inflate.flush()
    except zlib.error as exc:
        raise UndecodableBody(f"a body that does not decode as {coding}: {exc}") from None
    if rest:
        yield rest
    # flush() does not raise for a stream that stops short (a server's bug): it would read as a result
    if started and not inflate.eof:
        raise UndecodableBody(f"a body that ends before its {coding} stream does")


def with_query(url: str, parameters: dict[str, str], request: str) -> httpx.URL:
    """``url`` with ``parameters`` encoded after the query it has, which is sent as written: ``params=``
    would replace it (httpx 0.28 on: a Tool's ``?api_key=...`` was dropped), and merging parses it and
    encodes it again (``flag`` as ``flag=``, ``%20`` as ``+``, ``;`` as ``%3B``, ``%e9`` as U+FFFD),
    which an API that checks a signature of it refuses. A parameter the URL sets is the Tool author's (a
    tenant, a key): an argument may not replace it."""
    target = httpx.URL(url)
    taken = sorted(name for name in parameters if name in target.params)
    if taken:
        raise ToolError(
            f"{request}: {', '.join(taken)}: set by the Tool's URL (its query), which an argument may "
            "not replace"
        )
    if not parameters:
        return target
    written = target.query  # the raw query, its escapes as the Tool's author wrote them
    added = str(httpx.QueryParams(parameters)).encode("ascii")
    joined = written + (b"&" if written and not written.endswith(b"&") else b"") + added
    return target.copy_with(query=joined)


def query_parameters(arguments: dict[str, Any]) -> dict[str, str]:
    """GET/DELETE arguments as a query string: strings as they are, other values as JSON (``true``,
    ``{"k": [1, 2]}``; Python's ``str()`` sent ``True`` and ``{'k': [1, 2]}``), nulls left out."""
    return {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in arguments.items()
        if value is not None
    }
