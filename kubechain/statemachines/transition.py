"""What a state machine returns: a status patch plus the Events and children that go with it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NewType

from kubechain.models import Resource


@dataclass(frozen=True)
class EventSpec:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Transition:
    """Merge ``status`` into the object's (conditional on its resourceVersion); only if that write wins,
    emit ``events`` and create ``children``."""

    status: dict[str, Any]
    events: list[EventSpec] = field(default_factory=list)
    children: Sequence[Resource[Any, Any]] = field(default_factory=list)
    # A hand-off's claim (taskrun.with_llm_claim): its LLM call is counted as a hand-off, also when made
    # under the claim taken afresh after it was left in doubt. Kept by every copy of a claim.
    handoff: bool = False

    def phase(self) -> str | None:
        value = self.status.get("phase")
        return str(value) if value is not None else None

    def followed_by(self, later: Transition) -> Transition:
        """This transition and ``later`` (decided for the object as this one leaves it) as one write."""
        return Transition(
            status=self.status | later.status,
            events=[*self.events, *later.events],
            children=[*self.children, *later.children],
            handoff=self.handoff or later.handoff,
        )


def validated_as_it_stands(obj: Resource[Any, Any]) -> bool:
    """Whether ``obj``'s status (Ready or not) is about its spec as it is now: a spec edited since was not
    checked, and its old Ready says nothing about it."""
    return bool(getattr(obj.status, "observed_generation", None) == obj.metadata.generation)


def normal(reason: str, message: str) -> EventSpec:
    return EventSpec("Normal", reason, message)


def warning(reason: str, message: str) -> EventSpec:
    return EventSpec("Warning", reason, message)


def timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def precise_timestamp(now: datetime) -> str:
    """RFC 3339 with microseconds (claims compare at sub-second resolution)."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(value: str | None) -> datetime | None:
    """A status timestamp, time-zone aware; None if absent or unreadable. One without a time zone (written
    by hand: the CRD's date-time format accepts "2026-01-01T10:00:00") is taken as UTC, as Kubernetes
    writes them: compared with an aware time it raised TypeError in the watcher and the workers."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def claim_remaining_s(claimed_at: str | None, now: datetime, timeout_s: float) -> float:
    """Seconds until a claim written at ``claimed_at`` expires; 0 if it has or if none."""
    at = parse_timestamp(claimed_at)
    if at is None:
        return 0.0
    return max(0.0, timeout_s - (now - at).total_seconds())


_PARENT_NAMES = {"TaskRunToolCall": "tool call", "TaskRun": "run", "Task": "Task"}


def foreign_child_message(kind: str, name: str, parent_kind: str) -> str:
    """Why a parent failed: an object holds its child's deterministic name but is not the parent's own,
    so its status would be taken for the child's outcome."""
    parent = _PARENT_NAMES.get(parent_kind, parent_kind)
    return (
        f"{kind} {name} was not started by this {parent} (it is not one of its owners, or not as it makes "
        f"it), so its outcome is not this {parent}'s; delete or rename that {kind} and run the task again"
    )


def child_rejected_message(
    kind: str, name: str, code: int, reason: str, detail: str, *, too_large: bool = False
) -> str:
    """Why a parent failed: the API server refused a child it needs (HTTP ``code``) in a way no retry
    changes; ``too_large``: over a size limit (a 413, or etcd's 500)."""
    if too_large:
        return (
            f"cannot create {kind} {name}: the API server refused it as too large ({code} {reason}: "
            f"{detail}); retrying cannot help: what it carries from the LLM's answer (a message, "
            "arguments) is over the size one object may have"
        )
    if code == 422:
        return (
            f"cannot create {kind} {name}: the API server rejected it as invalid ({detail}); "
            "retrying cannot help: fix what it names (often a name or label that is too long) and run the "
            "task again"
        )
    return (
        f"cannot create {kind} {name}: the API server refused it ({code} {reason}: {detail}); "
        "fix what it names (RBAC, a ResourceQuota, an admission policy) and run the "
        "task again"
    )


def status_differs(current: dict[str, Any], patch: dict[str, Any]) -> bool:
    """True when writing ``patch`` would change something (avoids no-op writes and event churn)."""
    return any(current.get(key) != value for key, value in patch.items())


# A status as written, as patch_landed compares it: its long strings (a context window's messages, a tool's
# result) kept as digests, for a write remembered until a read-back tells whether it landed.
StatusFingerprint = NewType("StatusFingerprint", dict[str, Any])
_KEPT_CHARS = 64  # a string no longer than this is kept as it is: its digest would save nothing


@dataclass(frozen=True)
class _Digest:
    sha256: bytes

    @classmethod
    def of(cls, text: str) -> _Digest:
        # surrogatepass: a lone surrogate (an LLM provider's error read with json.loads, say) is not UTF-8,
        # and raising here lost an outcome whose write had gone unanswered
        return cls(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())


def status_fingerprint(patch: dict[str, Any]) -> StatusFingerprint:
    """``patch`` (a status as written) as patch_landed needs it, in a small fraction of its memory."""
    return StatusFingerprint(_fingerprint(json.loads(json.dumps(patch))))


def text_as_stored(text: str) -> str:
    """``text`` as the API server stores it: its JSON decoder turns a lone surrogate ("\\ud800" on the wire)
    into U+FFFD, and a pair sent as two escapes into the one character it encodes."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _fingerprint(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _fingerprint(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_fingerprint(item) for item in value]
    if isinstance(value, str):
        value = text_as_stored(value)
        return _Digest.of(value) if len(value) > _KEPT_CHARS else value
    return value


def _reflects(current: Any, patch: Any) -> bool:
    if isinstance(patch, dict):
        return isinstance(current, dict) and all(
            current.get(key) is None if value is None else _reflects(current.get(key), value)
            for key, value in patch.items()
        )
    if isinstance(patch, list):
        return (
            isinstance(current, list)
            and len(current) == len(patch)
            and all(_reflects(c, p) for c, p in zip(current, patch, strict=True))
        )
    if isinstance(patch, _Digest):
        return isinstance(current, str) and _Digest.of(text_as_stored(current)) == patch
    if isinstance(patch, str):
        return isinstance(current, str) and text_as_stored(current) == patch
    return bool(current == patch)


def patch_landed(current: dict[str, Any], patch: StatusFingerprint) -> bool:
    """Whether the merge patch ``patch`` (a status as written, see status_fingerprint) is reflected in
    ``current`` (as read back): a write answered with an error may have landed. Fields the API server may
    add (schema defaults) are allowed; unlike status_differs, nested objects are compared field by field."""
    return _reflects(current, patch)
