"""Process settings from the environment: the values they accept and the combinations they refuse."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubechain.settings import MAX_CONTEXT_WINDOW_BYTES, Settings, SettingsInvalid, load_settings


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


@pytest.mark.parametrize(
    "base",
    ["https://api.humanlayer.dev", "http://127.0.0.1:8765", "http://[::1]:8765/", "https://proxy.example/hl"],
)
def test_a_humanlayer_api_base_is_an_http_or_https_url(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    monkeypatch.setenv("HUMANLAYER_API_BASE", base)
    assert load_settings().humanlayer_api_base == base


@pytest.mark.parametrize("base", ["", "  "])
def test_an_empty_humanlayer_api_base_is_unset(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    """HUMANLAYER_API_BASE= (a template's empty default) stopped every process at start, even where no
    HumanLayer is used: it is unset, as an empty OTEL_TRACES_EXPORTER is."""
    monkeypatch.setenv("HUMANLAYER_API_BASE", base)
    assert load_settings().humanlayer_api_base == "https://api.humanlayer.dev"


@pytest.mark.parametrize(
    ("base", "problem"),
    [
        ("http://[::1", "is not a URL (Invalid IPv6 URL)"),
        ("api.humanlayer.dev", "has no http:// or https:// scheme"),
        ("localhost:8765", "has no http:// or https:// scheme"),
        ("ftp://hl.example", "has no http:// or https:// scheme"),
        ("https://", "has no host"),
        ("https://user:pa55word-123@hl.example:port/", "is not a URL (Port could not be cast"),
    ],
)
def test_a_malformed_humanlayer_api_base_is_refused_saying_what_to_fix(
    monkeypatch: pytest.MonkeyPatch, base: str, problem: str
) -> None:
    """A malformed one crashed ContactChannel validation (httpx.InvalidURL); one without a scheme made
    every HumanLayer request fail as if HumanLayer were down."""
    monkeypatch.setenv("HUMANLAYER_API_BASE", base)
    with pytest.raises(SettingsInvalid) as refused:
        load_settings()
    text = str(refused.value)
    assert text.startswith("invalid settings: HUMANLAYER_API_BASE: ") and problem in text, text
    assert "set it to the HumanLayer API's URL, e.g. https://api.humanlayer.dev" in text
    assert "pa55word" not in text


@pytest.mark.parametrize("limit", ["2097152", "0"])
def test_a_context_window_limit_etcd_cannot_store_is_refused(
    monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """Over ~1.2 MiB the API server refuses the window before the limit does (etcd stores at most 1.5 MiB
    an object): an answer was paid for and then could not be stored."""
    monkeypatch.setenv("KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES", limit)
    with pytest.raises(SettingsInvalid) as refused:
        load_settings()
    assert str(refused.value) == (
        f"invalid settings: KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES: {limit} is not between 1 and 1258291 "
        "(1.2 MiB): a TaskRun, its window included, must fit etcd's 1.5 MiB request limit (its "
        "--max-request-bytes default) with room for its metadata and the rest of its status"
    )
    monkeypatch.setenv("KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES", "1258291")
    assert load_settings().max_context_window_bytes == 1258291


@pytest.mark.parametrize("limit", ["104858", "1048576", "0"])
def test_a_tool_result_limit_a_context_window_cannot_hold_is_refused(
    monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """A limit past what a TaskRun's window can hold let results through that failed their run later, as
    too large to store (an API's 1 MiB answer, after the call was made)."""
    monkeypatch.setenv("KUBECHAIN_MAX_TOOL_RESULT_BYTES", limit)
    with pytest.raises(SettingsInvalid) as refused:
        load_settings()
    text = str(refused.value)
    assert text.startswith(
        f"invalid settings: KUBECHAIN_MAX_TOOL_RESULT_BYTES: {limit} is not between 1 and 104857 "
    ), text
    monkeypatch.setenv("KUBECHAIN_MAX_TOOL_RESULT_BYTES", "104857")
    assert load_settings().max_tool_result_bytes == 104857 == MAX_CONTEXT_WINDOW_BYTES // 12
