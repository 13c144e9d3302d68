"""ContactChannel: where a human is reached (Slack or email through HumanLayer)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kubechain.models.base import KubeModel, Resource
from kubechain.models.common import APIKeySource, ReadyStatus


class SlackChannelConfig(KubeModel):
    channel_or_user_id: str = Field(alias="channelOrUserID", pattern=r"^[CU][A-Z0-9]+$")
    context_about_channel_or_user: str | None = None
    allowed_responder_ids: list[str] | None = Field(default=None, alias="allowedResponderIDs")


class EmailChannelConfig(KubeModel):
    address: str = Field(pattern=r"^.+@.+\..+$")
    context_about_user: str | None = None
    subject: str | None = None


class ContactChannelSpec(KubeModel):
    type: Literal["slack", "email"]
    api_key_from: APIKeySource
    slack: SlackChannelConfig | None = None
    email: EmailChannelConfig | None = None


class ContactChannelStatus(ReadyStatus):
    human_layer_project: str | None = None


class ContactChannel(Resource[ContactChannelSpec, ContactChannelStatus]):
    KIND: ClassVar[str] = "ContactChannel"
    PLURAL: ClassVar[str] = "contactchannels"
    status: ContactChannelStatus = Field(default_factory=ContactChannelStatus)
