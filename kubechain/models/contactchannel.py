"""ContactChannel: where a human is reached (Slack or email through HumanLayer)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kubechain.models.base import KubeModel, Resource
from kubechain.models.common import UNUSABLE_SECRET_DESCRIPTION, APIKeySource, ReadyStatus


class SlackChannelConfig(KubeModel):
    channel_or_user_id: str = Field(
        alias="channelOrUserID",
        pattern=r"^[CU][A-Z0-9]+$",
        description="The Slack channel (C...) or user (U...) id that requests are sent to.",
    )
    context_about_channel_or_user: str | None = Field(
        default=None,
        description="Who is reached there, sent to HumanLayer; also the description of this channel's "
        'human contact tool offered to the LLM (default "Contact a human via Slack").',
    )
    allowed_responder_ids: list[str] | None = Field(
        default=None,
        alias="allowedResponderIDs",
        description="The Slack user ids allowed to answer (HumanLayer's allowed_responder_ids); unset, no "
        "such limit is sent. Must not be empty when set.",
    )


class EmailChannelConfig(KubeModel):
    address: str = Field(pattern=r"^.+@.+\..+$", description="The email address that requests are sent to.")
    context_about_user: str | None = Field(
        default=None,
        description="Who is reached there, sent to HumanLayer; also the description of this channel's "
        'human contact tool offered to the LLM (default "Contact a human via email").',
    )
    subject: str | None = Field(
        default=None, description="The subject line of the emails (HumanLayer's experimental_subject_line)."
    )


class ContactChannelSpec(KubeModel):
    type: Literal["slack", "email"] = Field(
        description="How the human is reached: slack (set spec.slack) or email (set spec.email)."
    )
    api_key_from: APIKeySource = Field(
        description="The Secret key holding the HumanLayer API key, checked against HumanLayer when the "
        "channel is validated."
    )
    slack: SlackChannelConfig | None = Field(default=None, description="Where to ask, for type slack.")
    email: EmailChannelConfig | None = Field(default=None, description="Where to ask, for type email.")


class ContactChannelStatus(ReadyStatus):
    human_layer_project: str | None = Field(
        default=None, description="The id of the HumanLayer project the API key belongs to."
    )
    unusable_secret: str | None = Field(default=None, description=UNUSABLE_SECRET_DESCRIPTION)


class ContactChannel(Resource[ContactChannelSpec, ContactChannelStatus]):
    KIND: ClassVar[str] = "ContactChannel"
    PLURAL: ClassVar[str] = "contactchannels"
    status: ContactChannelStatus = Field(default_factory=ContactChannelStatus)
