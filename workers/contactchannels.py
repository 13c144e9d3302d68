"""``validate`` for ContactChannel: the channel configuration, the API key Secret, then HumanLayer itself.

The original's controller (§2.8) with its strings ("slackConfig is required for slack channel type",
"invalid email address: ...", "invalid HumanLayer API key" (followed by the Secret to fix), "HumanLayer
<type> channel validated successfully"), but a strict email check, the project id actually persisted in ``status.humanLayerProject``,
and network failures reported as such (status Pending rather than Error: nothing to fix). The watcher
re-validates channels that are not Ready on every resync, so a HumanLayer outage heals by itself. A
host of HUMANLAYER_API_BASE that does not resolve, or a TLS certificate not trusted, is a setting to fix
(HumanLayerMisconfigured): Error, saying what to check; but a channel Ready until now (it worked under
these settings) that meets one is Pending first, as in an outage (CoreDNS can answer NXDOMAIN for a while:
an in-cluster Service whose pods restart), and Error only if the next validation, the channel no longer
Ready, meets it again.
"""

from __future__ import annotations

import logging

from kubechain.humanlayer import (
    HumanLayerAuthError,
    HumanLayerClient,
    HumanLayerError,
    HumanLayerMisconfigured,
    HumanLayerUnavailable,
    api_key_source,
    channel_config_problem,
)
from kubechain.kube.errors import NotFound
from kubechain.models import ContactChannel
from kubechain.queueing import ResourceMessage
from kubechain.statemachines.transition import Transition
from kubechain.statemachines.validation import plan_validation
from workers.context import WorkerContext
from workers.transitions import apply_transition
from workers.validators import SecretProblem, get_or_none, read_api_key

log = logging.getLogger(__name__)


def _write(ctx: WorkerContext, channel: ContactChannel, transition: Transition | None) -> None:
    if transition is None:
        return
    try:
        apply_transition(ctx, channel, transition)
    except NotFound:
        pass  # deleted meanwhile: nothing to record


def validate_contactchannel(ctx: WorkerContext, message: ResourceMessage) -> None:
    channel = get_or_none(ctx, ContactChannel, message.namespace, message.name)
    if channel is None:
        return
    problem = channel_config_problem(channel)
    if problem is not None:
        _write(ctx, channel, plan_validation(channel, False, problem))
        return
    ref = channel.spec.api_key_from.secret_key_ref
    try:
        api_key = read_api_key(ctx, channel.namespace, ref.name, ref.key)
    except SecretProblem as exc:
        _write(ctx, channel, plan_validation(channel, False, str(exc), unusable_secret=exc.secret_name))
        return
    try:
        with HumanLayerClient(ctx.settings.humanlayer_api_base, api_key) as client:
            project = client.get_project()
    except HumanLayerError as exc:
        log.info("ContactChannel %s/%s: HumanLayer check failed: %s", channel.namespace, channel.name, exc)
        said = str(exc)
        if isinstance(exc, HumanLayerAuthError):
            said += f" (from {api_key_source(channel)}): put a valid HumanLayer API key there"
        # Pending, not Error, while HumanLayer is unavailable: nothing to fix here, and a question
        # asked via the channel meanwhile waits it out as one whose own request met the outage. A setting
        # to fix met by a channel that worked until now is taken for an outage once: Error only if the
        # next validation (the channel Pending, no longer Ready) meets it again.
        outage = isinstance(exc, HumanLayerUnavailable) or (
            isinstance(exc, HumanLayerMisconfigured) and channel.status.ready is True
        )
        _write(ctx, channel, plan_validation(channel, False, said, pending=outage))
        return
    project_id = project.get("id")
    extra = {"humanLayerProject": str(project_id)} if project_id else {}
    detail = f"HumanLayer {channel.spec.type} channel validated successfully"
    _write(ctx, channel, plan_validation(channel, True, detail, extra=extra))
