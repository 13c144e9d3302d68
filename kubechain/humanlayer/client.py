"""A small synchronous client for the HumanLayer API endpoints KubeChain uses.

    GET  {base}/humanlayer/v1/project                      whose project an API key belongs to
    POST {base}/humanlayer/v1/function_calls               ask a human to approve a tool call
    GET  {base}/humanlayer/v1/function_calls/{call_id}     ... and read the decision
    POST {base}/humanlayer/v1/contact_requests             ask a human a question (humans as tools)
    GET  {base}/humanlayer/v1/contact_requests/{call_id}   ... and read the answer

Every request carries ``Authorization: Bearer <ContactChannel API key>``. TLS certificates are verified and
every request ends by a deadline: its connect timeout plus its timeout, the host's name resolution, the
headers and the body included (httpx times each read alone, and the resolution not at all: an API or a
proxy trickling its answer, or a resolver that does not answer, held a ContactChannel's check, or an
approval's request, without bound). An answer is read up to MAX_ANSWER_BYTES, uncompressed: a larger one
is refused, not held. Errors say what went wrong without ever containing the key.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any
from urllib.parse import quote

import httpx

from kubechain.http_watchdog import end_io_by_deadline, io_ending_by
from kubechain.redaction import redact, redact_url

DEFAULT_TIMEOUT_S = 10.0  # each read and write; the connect has its own, at most CONNECT_TIMEOUT_S
CONNECT_TIMEOUT_S = 5.0
API_PREFIX = "/humanlayer/v1"
# The largest answer echoes a call's spec: its arguments fit a Kubernetes object (1.5 MiB), at most three
# times that as JSON's \u escapes; an answer past this is not HumanLayer's, and is not read further.
MAX_ANSWER_BYTES = 8 * 1024 * 1024


class HumanLayerError(Exception):
    """HumanLayer answered with an error, or could not be reached (``status`` is None then)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class HumanLayerUnavailable(HumanLayerError):
    """Network failure, timeout, 429 or 5xx: try again later."""


class HumanLayerMisconfigured(HumanLayerError):
    """The API cannot be reached as configured: the host of HUMANLAYER_API_BASE does not resolve (a
    typo), or its TLS certificate is not trusted here. Not an outage: waiting does not fix it."""


class HumanLayerAuthError(HumanLayerError):
    """401/403: the API key is not valid (for this request)."""


class HumanLayerNotFound(HumanLayerError):
    """404: HumanLayer does not know this call id."""


class HumanLayerConflict(HumanLayerError):
    """409: a call with this id exists already (e.g. a retried POST)."""


class HumanLayerClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not (api_key.isascii() and api_key.isprintable()):
            # An HTTP header carries visible ASCII only; httpx would raise an error that quotes the key.
            raise HumanLayerAuthError(
                "the HumanLayer API key contains characters an HTTP header cannot carry (non-ASCII, or a "
                "control character such as a newline): check the value in its Secret"
            )
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        connect_timeout_s = min(CONNECT_TIMEOUT_S, timeout_s)
        self.request_timeout_s = connect_timeout_s + timeout_s  # the whole of one request
        try:
            http = httpx.Client(
                base_url=self.base_url,
                headers={
                    "Authorization": f"Bearer {api_key}",
                    "Accept": "application/json",
                    # httpx inflates each compressed piece whole, before it can be counted
                    "Accept-Encoding": "identity",
                },
                timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
                verify=True,
                follow_redirects=False,
                transport=transport,
            )
            # (a transport given, a test's, makes no connections to bound)
            self._http = end_io_by_deadline(http) if transport is None else http
        except (httpx.InvalidURL, ValueError) as exc:  # e.g. "http://[::1": no httpx.HTTPError
            said = redact(str(exc), [api_key])[:200]
            raise HumanLayerError(
                f"invalid HumanLayer API URL {redact_url(self.base_url)!r} ({type(exc).__name__}: {said}): "
                "set HUMANLAYER_API_BASE to an http:// or https:// URL, e.g. https://api.humanlayer.dev"
            ) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HumanLayerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never show the key
        return f"HumanLayerClient({redact_url(self.base_url)!r})"

    # -- endpoints -----------------------------------------------------------------------------------

    def get_project(self) -> dict[str, Any]:
        return self._request("GET", f"{API_PREFIX}/project")

    def create_function_call(self, run_id: str, call_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Request approval. Idempotent by ``call_id``: if HumanLayer already has the call (409), return it."""
        body = {"run_id": run_id, "call_id": call_id, "spec": spec}
        try:
            return self._request("POST", f"{API_PREFIX}/function_calls", body)
        except HumanLayerConflict:
            return self.get_function_call(call_id)

    def get_function_call(self, call_id: str) -> dict[str, Any]:
        return self._request("GET", f"{API_PREFIX}/function_calls/{_segment(call_id)}")

    def create_contact_request(self, run_id: str, call_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Ask a human. Idempotent by ``call_id`` like :meth:`create_function_call`."""
        body = {"run_id": run_id, "call_id": call_id, "spec": spec}
        try:
            return self._request("POST", f"{API_PREFIX}/contact_requests", body)
        except HumanLayerConflict:
            return self.get_contact_request(call_id)

    def get_contact_request(self, call_id: str) -> dict[str, Any]:
        return self._request("GET", f"{API_PREFIX}/contact_requests/{_segment(call_id)}")

    # -- transport -----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        where = f"{method} {redact_url(self.base_url + path)}"
        content: bytes | None = None
        headers: dict[str, str] | None = None
        if body is not None:
            try:
                # ASCII JSON, encoded here: a lone surrogate (an LLM's "\ud83d", half an emoji) goes as its
                # escape, where httpx's UTF-8 encoding raised UnicodeEncodeError.
                content = json.dumps(body, ensure_ascii=True, allow_nan=False).encode("ascii")
            except (ValueError, TypeError, RecursionError) as exc:
                raise HumanLayerError(
                    f"cannot encode the request to HumanLayer as JSON ({where}): {type(exc).__name__}: {exc}"
                ) from None
            headers = {"Content-Type": "application/json"}
        answer = b""  # the answer's body
        unreadable: str | None = None  # why the answer's body was not read
        try:
            # the headers and the body by the deadline, every wait on the network cut to the time left
            with (
                io_ending_by(time.monotonic() + self.request_timeout_s),
                self._http.stream(method, path, content=content, headers=headers) as response,
            ):
                if not 300 <= response.status_code < 400:  # a redirect's body is not looked at
                    try:
                        answer = _bounded_body(response)
                    except _UnreadableAnswer as exc:
                        unreadable = str(exc)
        except httpx.TimeoutException as exc:
            raise HumanLayerUnavailable(
                f"HumanLayer API did not answer in time ({where}, within {self.request_timeout_s:g}s): "
                f"{type(exc).__name__}"
            ) from None
        except httpx.HTTPError as exc:
            # its text may quote the answer (a header line HTTP does not allow), which an echoing proxy
            # filled with the request's headers
            said = redact(str(exc), [self._api_key])
            to_check = _setting_to_check(exc)
            if to_check is not None:
                raise HumanLayerMisconfigured(
                    f"cannot reach the HumanLayer API ({where}): {type(exc).__name__}: {said}: {to_check}"
                ) from None
            raise HumanLayerUnavailable(
                f"cannot reach the HumanLayer API ({where}): {type(exc).__name__}: {said}"
            ) from None
        except (httpx.InvalidURL, ValueError) as exc:  # UnicodeError is a ValueError; neither an HTTPError
            # raised building the request: nothing was sent, and sending it again will not help
            said = redact(str(exc), [self._api_key])[:200]
            raise HumanLayerError(
                f"cannot send the request to HumanLayer ({where}): {type(exc).__name__}: {said}"
            ) from None
        status = response.status_code
        if 300 <= status < 400:
            # Not followed (the key would go wherever it leads): an http:// base for an https-only API, or
            # a base URL that moved, is the setting's to fix.
            location = response.headers.get("Location")
            leads = (
                f"to {redact(redact_url(location), [self._api_key])[:200]}"
                if location
                else "without a Location"
            )
            raise HumanLayerError(
                f"HumanLayer API answered {where} with a redirect (HTTP {status}) {leads}, which is not "
                "followed: check HUMANLAYER_API_BASE (e.g. https:// rather than http://)",
                status,
            )
        if status >= 400:
            detail = unreadable or _detail(answer, response.encoding, self._api_key)
            suffix = f": {detail}" if detail else ""
            if status == 401:
                raise HumanLayerAuthError("invalid HumanLayer API key", status)
            if status == 403:
                raise HumanLayerAuthError(
                    f"HumanLayer API key not permitted for {where} (HTTP 403){suffix}", status
                )
            if status == 404:
                raise HumanLayerNotFound(f"not found at HumanLayer ({where}){suffix}", status)
            if status == 409:
                raise HumanLayerConflict(f"conflict at HumanLayer ({where}){suffix}", status)
            if status == 429 or status >= 500:
                raise HumanLayerUnavailable(
                    f"HumanLayer API unavailable ({where}): HTTP {status}{suffix}", status
                )
            raise HumanLayerError(f"HumanLayer rejected the request ({where}): HTTP {status}{suffix}", status)
        if unreadable is not None:
            raise HumanLayerError(
                f"invalid response from HumanLayer ({where}): {unreadable}: check that HUMANLAYER_API_BASE "
                "is the HumanLayer API's URL",
                status,
            )
        try:
            payload = json.loads(answer)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than json parses
            raise HumanLayerError(f"invalid response from HumanLayer ({where}): not JSON", status) from None
        if not isinstance(payload, dict):
            raise HumanLayerError(
                f"invalid response from HumanLayer ({where}): expected a JSON object", status
            )
        return payload


# getaddrinfo's answers that a name does not exist (or has no address): a typo, unlike EAI_AGAIN (the
# resolver did not answer) or EAI_FAIL, which may pass
_NAME_NOT_FOUND = {
    code
    for code in (getattr(socket, name, None) for name in ("EAI_NONAME", "EAI_NODATA"))
    if code is not None
}


def _setting_to_check(exc: BaseException) -> str | None:
    """What to check when a connection failed because of how the API is set, not an outage: its host
    does not resolve, or its TLS certificate is not trusted. None for what may pass (a timeout, a
    refused or reset connection, a resolver that did not answer)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, socket.gaierror) and cause.errno in _NAME_NOT_FOUND:
            return "its host is not found: check the host in HUMANLAYER_API_BASE"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                "its TLS certificate is not trusted: check the host in HUMANLAYER_API_BASE, and the CA "
                "certificates this process trusts (SSL_CERT_FILE or SSL_CERT_DIR, e.g. for a proxy that "
                "inspects TLS)"
            )
        cause = cause.__cause__ or cause.__context__
    return None


def _segment(call_id: str) -> str:
    """A call id as one path segment: percent-encoded whole ("/", "?", "#", a control character), so it
    names a call and nothing else, and builds a URL httpx accepts."""
    return quote(call_id, safe="", errors="surrogatepass")


class _UnreadableAnswer(Exception):
    """An answer's body not read: too large, or compressed."""


def _bounded_body(response: httpx.Response) -> bytes:
    """The body of a streamed ``response``, at most MAX_ANSWER_BYTES: read as sent (httpx would inflate a
    compressed piece whole) and piece by piece, the reading stopped past the bound, unless its
    Content-Length says so first."""
    coding = response.headers.get("Content-Encoding", "").strip().lower()
    if coding not in ("", "identity"):
        raise _UnreadableAnswer(
            f"the answer is in Content-Encoding {coding[:40]!r}, where none was asked for"
        )
    too_large = _UnreadableAnswer(
        f"the answer is over {MAX_ANSWER_BYTES:,} bytes, more than any HumanLayer answer (not read further)"
    )
    declared = response.headers.get("Content-Length", "").strip()
    if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
        raise too_large
    pieces: list[bytes] = []
    size = 0
    # a piece is what one read of the connection gave, up to 64 KiB; a response read already (one a given
    # transport made of bytes) has its content, and no stream left
    read = [response.content] if response.is_stream_consumed else response.iter_raw()
    for piece in read:
        size += len(piece)
        if size > MAX_ANSWER_BYTES:
            raise too_large
        pieces.append(piece)
    return b"".join(pieces)


def _detail(body: bytes, encoding: str | None, api_key: str) -> str:
    """A short, printable reason from an error body (HumanLayer/FastAPI use ``{"detail": ...}``), without
    the key a proxy may have echoed: cut out before the text is shortened, which could leave its start."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        text = body.decode(encoding or "utf-8", "replace").strip()
    else:
        detail = payload.get("detail") if isinstance(payload, dict) and "detail" in payload else payload
        text = detail if isinstance(detail, str) else json.dumps(detail)
    return redact(text, [api_key])[:200]
