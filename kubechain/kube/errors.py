"""Exceptions of the Kubernetes client layer: one class per API outcome callers decide on."""

from __future__ import annotations

from typing import Any


class KubeAPIError(Exception):
    """An API server answer other than success."""

    def __init__(self, status: int, reason: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}


class NotFound(KubeAPIError):
    pass


class Conflict(KubeAPIError):
    """409 on a write: the resourceVersion precondition failed; someone else moved first."""


class AlreadyExists(KubeAPIError):
    """409 on a create: an object with that name exists (a retried create is harmless)."""


class Gone(KubeAPIError):
    """410: the requested resourceVersion is too old for a watch; relist."""


class Invalid(KubeAPIError):
    """422: the object failed schema or CEL validation."""


class Forbidden(KubeAPIError):
    pass


class Unavailable(KubeAPIError):
    """The API server could not be reached or answered 5xx / 429; retry later."""


def error_for(status: int, body: dict[str, Any] | None, fallback: str = "") -> KubeAPIError:
    body = body or {}
    reason = str(body.get("reason") or "")
    message = str(body.get("message") or fallback)
    if status == 404:
        return NotFound(status, reason or "NotFound", message, body)
    if status == 409:
        if reason == "AlreadyExists":
            return AlreadyExists(status, reason, message, body)
        return Conflict(status, reason or "Conflict", message, body)
    if status == 410:
        return Gone(status, reason or "Expired", message, body)
    if status == 422:
        return Invalid(status, reason or "Invalid", message, body)
    if status in (401, 403):
        return Forbidden(status, reason or "Forbidden", message, body)
    if status == 429 or status >= 500:
        return Unavailable(status, reason or "Unavailable", message, body)
    return KubeAPIError(status, reason or "Error", message, body)
