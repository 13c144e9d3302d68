"""Cutting secret values out of text that leaves the worker (statuses, Events, logs, the LLM's context)."""

from __future__ import annotations

from collections.abc import Iterable

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
