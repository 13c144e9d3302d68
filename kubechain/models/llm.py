"""LLM: a provider, its credentials and request parameters."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kubechain.models.base import KubeModel, Resource
from kubechain.models.common import UNUSABLE_SECRET_DESCRIPTION, APIKeySource, ReadyStatus, SecretKeyRef

# Anchored versions of the original's patterns (its temperature pattern was an unanchored alternation).
UNIT_INTERVAL_PATTERN = r"^(0(\.[0-9]+)?|1(\.0+)?)$"
# -2.0 to 2.0, OpenAI's range (the original's pattern let 2.5 through, which OpenAI refuses at every run)
PENALTY_PATTERN = r"^-?(2(\.0+)?|[01](\.[0-9]+)?)$"


class LLMParameters(KubeModel):
    """Request parameters, named as ACP names them; any OpenAI-compatible endpoint via ``baseUrl``."""

    model: str | None = Field(
        default=None,
        description="The model to call (wins over spec.model). Default: gpt-4o for openai, "
        "claude-sonnet-4-5 for anthropic.",
    )
    base_url: str | None = Field(
        default=None,
        description="The API's base URL, for any OpenAI-compatible server (vLLM, Ollama, LiteLLM; usually "
        "ending in /v1) or an Anthropic proxy (with or without /v1). Unset: the provider's own API (for "
        "openai, KUBECHAIN_OPENAI_BASE_URL of the workers when set).",
    )
    temperature: str | None = Field(
        default=None,
        pattern=UNIT_INTERVAL_PATTERN,
        description='Sampling temperature, 0 to 1, as a string ("0.7"); wins over spec.temperature. Not '
        "sent to OpenAI's reasoning models (o1, o3, gpt-5...), which refuse it.",
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="The most tokens one answer may take (wins over spec.maxTokens); an answer cut off at it "
        "gives a Warning Event LLMResponseTruncated.",
    )
    top_p: str | None = Field(
        default=None,
        pattern=UNIT_INTERVAL_PATTERN,
        description='Nucleus sampling, 0 to 1, as a string ("0.9"). Not sent to OpenAI\'s reasoning models, '
        "nor to Anthropic when temperature is set too.",
    )
    top_k: int | None = Field(
        default=None,
        ge=1,
        description="Sample from the k likeliest tokens only. Sent with provider anthropic only (OpenAI's "
        "API has no such parameter).",
    )
    frequency_penalty: str | None = Field(
        default=None,
        pattern=PENALTY_PATTERN,
        description='Frequency penalty, -2 to 2, as a string ("0.5"). Sent with provider openai only (Anthropic\'s API has '
        "none), and not to OpenAI's reasoning models.",
    )
    presence_penalty: str | None = Field(
        default=None,
        pattern=PENALTY_PATTERN,
        description='Presence penalty, -2 to 2, as a string ("0.5"). Sent with provider openai only (Anthropic\'s API has '
        "none), and not to OpenAI's reasoning models.",
    )


class LLMSpec(KubeModel):
    provider: Literal["openai", "anthropic"] = Field(
        description="The API to call: openai (OpenAI, Azure OpenAI or any OpenAI-compatible server, see "
        "parameters.baseUrl) or anthropic."
    )
    # Optional (as in ACP): without it the key is read from Secret <provider>, key <PROVIDER>_API_KEY,
    # which is what the README's `kubectl create secret generic anthropic --from-literal=...` creates.
    api_key_from: APIKeySource | None = Field(
        default=None,
        description="The Secret key holding the provider's API key. Default: Secret <provider>, key "
        "OPENAI_API_KEY or ANTHROPIC_API_KEY.",
    )
    # The original README's shorthand (spec.model); parameters.model wins when both are set.
    model: str | None = Field(
        default=None, description="Shorthand for parameters.model, which wins when both are set."
    )
    temperature: str | None = Field(
        default=None,
        pattern=UNIT_INTERVAL_PATTERN,
        description='Sampling temperature, 0 to 1, as a string ("0.7"); parameters.temperature wins.',
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="The most tokens one answer may take; parameters.maxTokens wins.",
    )
    parameters: LLMParameters | None = Field(
        default=None,
        description="The model, endpoint and request parameters. What the provider is not sent, the LLM's "
        "statusDetail says once it is validated.",
    )

    def api_key_ref(self) -> SecretKeyRef:
        if self.api_key_from is not None:
            return self.api_key_from.secret_key_ref
        return SecretKeyRef(name=self.provider, key=f"{self.provider.upper()}_API_KEY")

    def effective_model(self) -> str:
        if self.parameters and self.parameters.model:
            return self.parameters.model
        if self.model:
            return self.model
        # The original's claude-3-5-sonnet-latest was retired in October 2025: every run would get a 404.
        return "gpt-4o" if self.provider == "openai" else "claude-sonnet-4-5"

    def effective_temperature(self) -> float | None:
        raw = (self.parameters.temperature if self.parameters else None) or self.temperature
        return float(raw) if raw is not None else None

    def effective_max_tokens(self) -> int | None:
        return (self.parameters.max_tokens if self.parameters else None) or self.max_tokens


class LLMStatus(ReadyStatus):
    unusable_secret: str | None = Field(default=None, description=UNUSABLE_SECRET_DESCRIPTION)


class LLM(Resource[LLMSpec, LLMStatus]):
    KIND: ClassVar[str] = "LLM"
    PLURAL: ClassVar[str] = "llms"
    status: LLMStatus = Field(default_factory=LLMStatus)
