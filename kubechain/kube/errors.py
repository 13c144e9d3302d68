"""Exceptions of the Kubernetes client layer: one class per API outcome callers decide on."""

from __future__ import annotations

import re
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
    @property
    def kind_unknown(self) -> bool:
        """The API server does not serve the kind at all (its CRD is not installed), rather than lacking
        the one object: its Status then names no object ("the server could not find the requested
        resource")."""
        return not (self.body.get("details") or {}).get("name")


class Conflict(KubeAPIError):
    """409 on a write: the resourceVersion precondition failed; someone else moved first."""


class AlreadyExists(KubeAPIError):
    """409 on a create: an object with that name exists (a retried create is harmless)."""


class Gone(KubeAPIError):
    """The watch cannot resume from the requested resourceVersion; relist. 410 when it is too old; also
    the 504 "Too large resource version" of one newer than the API server has (e.g. after an etcd
    restore), which client-go's reflector answers with a relist too."""


class Invalid(KubeAPIError):
    """422: the object failed schema or CEL validation."""


class Forbidden(KubeAPIError):
    pass


class TooLarge(KubeAPIError):
    """The object or request is over a size limit: the API server's 413 for a body over 3 MiB, or etcd's
    refusal of an object over its request limit (1.5 MiB by default), which the API server answers with a
    500, and gRPC's ResourceExhausted for a request over the API server's etcd client limit (2 MiB), also
    a 500. Retrying the same write cannot succeed."""


class Unavailable(KubeAPIError):
    """The API server could not be reached or answered 5xx / 429; retry later."""


class Unauthorized(Unavailable):
    """401: the credentials were not accepted. Usually a moment's trouble (a token being refreshed, an
    authentication webhook down): retried like an outage, with the credentials read again, never taken as
    a refusal for good as a 403 is."""


ETCD_TOO_LARGE = "etcdserver: request is too large"
# the API server's etcd client refusing to send (or etcd to receive) a message over gRPC's size limit:
# "rpc error: code = ResourceExhausted desc = trying to send message larger than max (2500513 vs. 2097152)"
_GRPC_TOO_LARGE = re.compile(r"code = ResourceExhausted desc = .*message larger than max")


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
    if status == 504 and _too_large_resource_version(body):
        return Gone(status, reason or "Timeout", message, body)
    if status == 422:
        return Invalid(status, reason or "Invalid", message, body)
    if status == 401:
        return Unauthorized(status, reason or "Unauthorized", message, body)
    if status == 403:
        return Forbidden(status, reason or "Forbidden", message, body)
    if status == 413 or (status == 500 and (ETCD_TOO_LARGE in message or _GRPC_TOO_LARGE.search(message))):
        return TooLarge(status, reason or "RequestEntityTooLarge", message, body)
    if status == 429 or status >= 500:
        return Unavailable(status, reason or "Unavailable", message, body)
    return KubeAPIError(status, reason or "Error", message, body)


def _too_large_resource_version(body: dict[str, Any]) -> bool:
    # apimachinery's IsTooLargeResourceVersion: the cause, or the message of servers that predate it
    causes = (body.get("details") or {}).get("causes") or []
    return any(
        isinstance(cause, dict) and cause.get("reason") == "ResourceVersionTooLarge" for cause in causes
    ) or "Too large resource version" in str(body.get("message") or "")


# urllib3's "HTTPSConnection(host='127.0.0.1', port=1): " before its reason
_CONNECTION_PREFIX = re.compile(r"^\w+\(host=[^)]*\):\s*")


def transport_reason(exc: KubeAPIError) -> str:
    """Why a request got no answer (status 0), in the transport's words without urllib3's wrapping
    (MaxRetryError('HTTPSConnectionPool(...): Max retries exceeded with url: ... (Caused by ...')):
    "Failed to establish a new connection: [Errno 111] Connection refused", say."""
    cause = exc.__cause__
    reason = getattr(cause, "reason", None) or cause
    if reason is None:
        return exc.message
    return _CONNECTION_PREFIX.sub("", str(reason)) or exc.message
