"""Cutting secret values out of text that leaves the worker (statuses, Events, logs, the LLM's context)."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

# Values shorter than this are left: replacing a "1" or a "true" everywhere would garble the text.
MIN_SCRUBBED_CHARS = 6
REDACTED = "***"


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value (and its stripped form) replaced by ``***``, longest first."""
    for value in sorted(secrets, key=len, reverse=True):
        for form in {value, value.strip()}:
            if len(form) >= MIN_SCRUBBED_CHARS:
                text = text.replace(form, REDACTED)
    return text


def redact_url(url: str) -> str:
    """The URL without userinfo (``https://user:token@host`` → ``https://host``) and without the values of
    its query (``?api_key=abc`` → ``?api_key=***``: hosted MCP servers often take their key there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(
        f"{name}=***" if sep else name
        for name, sep, _ in (p.partition("=") for p in parts.query.split("&") if p)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
