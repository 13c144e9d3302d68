"""LLM: a provider, its credentials and request parameters."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kubechain.models.base import KubeModel, Resource
from kubechain.models.common import APIKeySource, ReadyStatus, SecretKeyRef

# Anchored versions of the original's patterns (its temperature pattern was an unanchored alternation).
UNIT_INTERVAL_PATTERN = r"^(0(\.[0-9]+)?|1(\.0+)?)$"
# -2.0 to 2.0, OpenAI's range (the original's pattern let 2.5 through, which OpenAI refuses at every run)
PENALTY_PATTERN = r"^-?(2(\.0+)?|[01](\.[0-9]+)?)$"


class LLMParameters(KubeModel):
    """Request parameters, named as ACP names them; any OpenAI-compatible endpoint via ``baseUrl``."""

    model: str | None = None
    base_url: str | None = None
    temperature: str | None = Field(default=None, pattern=UNIT_INTERVAL_PATTERN)
    max_tokens: int | None = Field(default=None, ge=1)
    top_p: str | None = Field(default=None, pattern=UNIT_INTERVAL_PATTERN)
    top_k: int | None = Field(default=None, ge=1)
    frequency_penalty: str | None = Field(default=None, pattern=PENALTY_PATTERN)
    presence_penalty: str | None = Field(default=None, pattern=PENALTY_PATTERN)


class LLMSpec(KubeModel):
    provider: Literal["openai", "anthropic"]
    # Optional (as in ACP): without it the key is read from Secret <provider>, key <PROVIDER>_API_KEY,
    # which is what the README's `kubectl create secret generic anthropic --from-literal=...` creates.
    api_key_from: APIKeySource | None = None
    # The original README's shorthand (spec.model); parameters.model wins when both are set.
    model: str | None = None
    temperature: str | None = Field(default=None, pattern=UNIT_INTERVAL_PATTERN)
    max_tokens: int | None = Field(default=None, ge=1)
    parameters: LLMParameters | None = None

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
    pass


class LLM(Resource[LLMSpec, LLMStatus]):
    KIND: ClassVar[str] = "LLM"
    PLURAL: ClassVar[str] = "llms"
    status: LLMStatus = Field(default_factory=LLMStatus)
