"""ContactChannel checks and the ``channel`` object HumanLayer expects (pure)."""

from __future__ import annotations

import re
from typing import Any

from kubechain.models import ContactChannel

SLACK_ID = re.compile(r"^[CU][A-Z0-9]+$")

# RFC 5322 dot-atom local part (no quoted strings, no comments, no display names).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_TLD = re.compile(r"^(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})$")


def email_address_problem(address: str) -> str | None:
    """Why ``address`` is not a plain ``local@domain`` address, or None.

    Stricter than the CRD pattern (``.+@.+\\..+``) and than ``email.utils.parseaddr``: no display names,
    no empty or consecutive dots, domain labels of letters/digits/hyphens, a top-level domain of letters
    (or an IDN ``xn--`` label). ``test@example..com`` is invalid.
    """
    if address != address.strip() or not address:
        return "address must not be empty or contain surrounding whitespace"
    if len(address) > 254:
        return "address is longer than 254 characters"
    if address.count("@") != 1:
        return "address must contain exactly one @"
    local, domain = address.split("@")
    if not local or len(local) > 64:
        return "the part before @ must be 1 to 64 characters"
    if not _LOCAL.match(local):
        return f"invalid local part {local!r} (no empty or consecutive dots, no spaces or quotes)"
    labels = domain.split(".")
    if len(labels) < 2:
        return f"domain {domain!r} needs at least two labels (e.g. example.com)"
    if any(label == "" for label in labels):
        return f"domain {domain!r} has an empty label (leading, trailing or consecutive dots)"
    for label in labels:
        if not _LABEL.match(label):
            return f"invalid domain label {label!r}"
    if not _TLD.match(labels[-1]):
        return f"invalid top-level domain {labels[-1]!r}"
    return None


def channel_config_problem(channel: ContactChannel) -> str | None:
    """What is wrong with the channel's own configuration (the original's strings), or None."""
    spec = channel.spec
    if spec.type == "slack":
        if spec.slack is None:
            return "slackConfig is required for slack channel type"
        if not SLACK_ID.match(spec.slack.channel_or_user_id):
            return (
                f"invalid slack channelOrUserID {spec.slack.channel_or_user_id!r}: must match ^[CU][A-Z0-9]+$"
            )
        if spec.slack.allowed_responder_ids is not None and not spec.slack.allowed_responder_ids:
            return "slack allowedResponderIDs must not be empty when set"
        return None
    if spec.type == "email":
        if spec.email is None:
            return "emailConfig is required for email channel type"
        problem = email_address_problem(spec.email.address)
        return f"invalid email address: {problem}" if problem else None
    return f"unsupported channel type: {spec.type}"


def api_key_source(channel: ContactChannel) -> str:
    """Where the channel's HumanLayer API key comes from, as an error names it for fixing."""
    ref = channel.spec.api_key_from.secret_key_ref
    return f'key "{ref.key}" of Secret "{ref.name}"'


def channel_payload(channel: ContactChannel) -> dict[str, Any]:
    """The ``channel`` object of a HumanLayer function call or contact request."""
    spec = channel.spec
    if spec.type == "slack" and spec.slack is not None:
        slack: dict[str, Any] = {"channel_or_user_id": spec.slack.channel_or_user_id}
        if spec.slack.context_about_channel_or_user:
            slack["context_about_channel_or_user"] = spec.slack.context_about_channel_or_user
        if spec.slack.allowed_responder_ids:
            slack["allowed_responder_ids"] = list(spec.slack.allowed_responder_ids)
        return {"slack": slack}
    if spec.type == "email" and spec.email is not None:
        email: dict[str, Any] = {"address": spec.email.address}
        if spec.email.context_about_user:
            email["context_about_user"] = spec.email.context_about_user
        if spec.email.subject:
            email["experimental_subject_line"] = spec.email.subject
        return {"email": email}
    raise ValueError(f"ContactChannel {channel.name} has no {spec.type} configuration")
