"""Process settings from the environment: the values they accept and the combinations they refuse."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubechain.settings import Settings


def test_settings_refuse_a_claim_that_could_expire_during_a_call() -> None:
    assert Settings(claim_timeout_s=180, llm_timeout_s=120, tool_timeout_s=120).claim_timeout_s == 180
    for timeouts in ({"llm_timeout_s": 300}, {"tool_timeout_s": 180}):
        with pytest.raises(ValidationError, match="KUBECHAIN_CLAIM_TIMEOUT_S .* must be longer than"):
            Settings(claim_timeout_s=180, **timeouts)


@pytest.mark.parametrize(
    ("written", "names"),
    [
        ("uvx,npx", ["uvx", "npx"]),
        ("uvx", ["uvx"]),
        (" uvx , npx ,", ["uvx", "npx"]),
        ('["uvx","npx"]', ["uvx", "npx"]),
        ("", []),
    ],
)
def test_name_lists_from_the_environment_are_comma_separated_or_json(
    monkeypatch: pytest.MonkeyPatch, written: str, names: list[str]
) -> None:
    monkeypatch.setenv("KUBECHAIN_MCP_COMMAND_ALLOWLIST", written)
    monkeypatch.setenv("KUBECHAIN_NAMESPACES", written)
    settings = Settings()
    assert settings.mcp_command_allowlist == names and settings.namespaces == names
