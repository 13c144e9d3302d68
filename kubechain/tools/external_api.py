"""``externalAPI`` tools: an HTTP request with the arguments as JSON and a bearer token from a Secret."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from kubechain.tools.builtin import ToolError

MAX_RESPONSE_BYTES = 1024 * 1024

_client: httpx.Client | None = None
_client_lock = threading.Lock()


def _shared_client() -> httpx.Client:
    """One client per process: building one loads the CA bundle (~20 ms of CPU), and fifty tool calls
    of a turn start at once; it also keeps connections to the same API alive between calls."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(
                verify=True,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
        return _client


def call_external_api(
    url: str, method: str | None, arguments: dict[str, Any], token: str | None, timeout_s: float
) -> str:
    """The response body is the tool result; TLS is verified; non-2xx is a tool error."""
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/plain, */*"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    verb = (method or "POST").upper()
    try:
        client = _shared_client()
        if verb in ("GET", "DELETE"):
            response = client.request(
                verb,
                url,
                params={k: str(v) for k, v in arguments.items()},
                headers=headers,
                timeout=timeout_s,
            )
        else:
            response = client.request(verb, url, json=arguments, headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        raise ToolError(f"{verb} {url} timed out after {timeout_s:.0f}s") from None
    except httpx.HTTPError as exc:
        raise ToolError(f"{verb} {url} failed: {type(exc).__name__}") from None
    body = response.text[:MAX_RESPONSE_BYTES]
    if response.status_code >= 400:
        raise ToolError(f"{verb} {url} returned status {response.status_code}: {body[:500]}")
    return body
