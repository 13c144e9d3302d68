"""How long a server asks a client to wait before trying again (the Retry-After family of headers)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime


def retry_after_s(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """``retry-after-ms`` (OpenAI's), else ``retry-after`` as seconds or as an HTTP date; None if the
    headers say nothing usable. ``headers`` must look names up case-insensitively (httpx's, urllib3's)."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
