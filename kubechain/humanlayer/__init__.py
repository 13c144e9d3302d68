"""HumanLayer: the API that reaches humans over Slack or email (approvals and humans as tools)."""

from kubechain.humanlayer.channels import (
    api_key_source,
    channel_config_problem,
    channel_payload,
    email_address_problem,
)
from kubechain.humanlayer.client import (
    HumanLayerAuthError,
    HumanLayerClient,
    HumanLayerConflict,
    HumanLayerError,
    HumanLayerMisconfigured,
    HumanLayerNotFound,
    HumanLayerUnavailable,
)

__all__ = [
    "HumanLayerAuthError",
    "HumanLayerClient",
    "HumanLayerConflict",
    "HumanLayerError",
    "HumanLayerMisconfigured",
    "HumanLayerNotFound",
    "HumanLayerUnavailable",
    "api_key_source",
    "channel_config_problem",
    "channel_payload",
    "email_address_problem",
]
