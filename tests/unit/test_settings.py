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
        ("http://[::1", 'has an IPv6 host without its closing "]"'),
        ("api.humanlayer.dev", "has no scheme: start it with https:// or http://"),
        ("localhost:8765", "has no scheme: start it with https:// or http://"),
        ("ftp://hl.example", "has scheme ftp://, not http:// or https://"),
        ("https://", "has no host"),
        ("https://user:pa55word-123@hl.example:port/", "has a port that is no number from 1 to 65535"),
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


@pytest.mark.parametrize("limit", ["87382", "1048576", "0"])
def test_a_tool_result_limit_a_context_window_cannot_hold_is_refused(
    monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """A limit past what a TaskRun's window can hold let results through that failed their run later, as
    too large to store (an API's 1 MiB answer, after the call was made). The default window (1 MiB) holds
    results of up to 87381 bytes, the largest one (1.2 MiB) 104857."""
    monkeypatch.setenv("KUBECHAIN_MAX_TOOL_RESULT_BYTES", limit)
    with pytest.raises(SettingsInvalid) as refused:
        load_settings()
    text = str(refused.value)
    assert text.startswith(
        f"invalid settings: KUBECHAIN_MAX_TOOL_RESULT_BYTES: {limit} is not between 1 and 87381, a twelfth of "
        "KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES (1048576): "
    ), text
    monkeypatch.setenv("KUBECHAIN_MAX_TOOL_RESULT_BYTES", "87381")
    assert load_settings().max_tool_result_bytes == 87381
    monkeypatch.setenv("KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES", str(MAX_CONTEXT_WINDOW_BYTES))
    monkeypatch.setenv("KUBECHAIN_MAX_TOOL_RESULT_BYTES", "104857")
    assert load_settings().max_tool_result_bytes == 104857 == MAX_CONTEXT_WINDOW_BYTES // 12


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        # logging.setLevel's traceback at the watcher's start; a worker's --loglevel error named no setting
        ("KUBECHAIN_LOG_LEVEL", "LOUD", "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        # OverflowError from the socket: a worker ran on without /metrics and /healthz
        ("KUBECHAIN_METRICS_PORT", "70000", "less than or equal to 65535"),
        ("KUBECHAIN_METRICS_PORT", "-1", "greater than or equal to 0"),
        ("KUBECHAIN_SCALING_PORT", "65536", "less than or equal to 65535"),
        ("KUBECHAIN_REDIS_SOCKET_TIMEOUT_S", "0", "greater than 0"),
        # kombu took a URL without a scheme for AMQP on port 5672 and retried it for ever
        ("REDIS_URL", "localhost:6379", "redis://, rediss://, unix:// or sentinel://"),
        ("REDIS_URL", "http://localhost:6379/0", "redis://, rediss://, unix:// or sentinel://"),
        # the client's own check, said as a kubeconfig that could not be loaded
        ("KUBECHAIN_KUBE_QPS", "0", "greater than 0"),
        ("KUBECHAIN_KUBE_BURST", "0", "greater than or equal to 1"),
        # int() made 0.5 a Lease of 0 s and 2 one renewed every 2 s that its holder stops acting on at 1.3 s
        ("KUBECHAIN_LEASE_DURATION_S", "0.5", "a whole number of seconds, at least 4"),
        ("KUBECHAIN_LEASE_DURATION_S", "-15", "a whole number of seconds, at least 4"),
        ("KUBECHAIN_LEASE_DURATION_S", "2", "a whole number of seconds, at least 4"),
        ("KUBECHAIN_LEASE_DURATION_S", "inf", "finite number"),
        # the API server refuses every write of the Lease: no watcher ever leads
        ("KUBECHAIN_LEASE_NAME", "Kubechain_Watcher", "a DNS-1123 subdomain"),
        ("KUBECHAIN_LEASE_NAMESPACE", "kube.system", "a DNS-1123 label"),
        # a busy loop of full resyncs
        ("KUBECHAIN_RESYNC_INTERVAL_S", "0", "greater than or equal to 1"),
        ("KUBECHAIN_NAMESPACES", "default,Team_A", "a DNS-1123 label"),
        # every claim expired at once (nan compares false with everything: no check refused it)
        ("KUBECHAIN_CLAIM_TIMEOUT_S", "nan", "finite number"),
        ("KUBECHAIN_LLM_TIMEOUT_S", "0", "greater than 0"),
        ("KUBECHAIN_TOOL_TIMEOUT_S", "-1", "greater than 0"),
        ("KUBECHAIN_KUBE_TIMEOUT_S", "0", "greater than 0"),
        ("KUBECHAIN_STALE_AFTER_S", "0", "greater than 0"),
        ("KUBECHAIN_LLM_MAX_ATTEMPTS", "0", "greater than or equal to 1"),
        ("KUBECHAIN_LLM_BACKOFF_BASE_S", "nan", "finite number"),
        ("KUBECHAIN_MAX_TOOL_RESULT_BYTES", "0", "is not between 1 and 87381"),
        ("KUBECHAIN_MAX_DELEGATION_DEPTH", "-1", "greater than or equal to 0"),
        ("KUBECHAIN_SUB_AGENT_START_TIMEOUT_S", "0", "greater than 0"),
        ("KUBECHAIN_CONFIG_CACHE_TTL_S", "-1", "greater than or equal to 0"),
    ],
)
def test_a_setting_out_of_its_bounds_is_refused_naming_the_variable_its_value_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, allowed: str
) -> None:
    """Each was taken as it came: a traceback at start (a log level, a port past 65535), or a process that
    ran and misbehaved (a busy loop, a part-time leader, every claim expired at once)."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsInvalid) as refused:
        load_settings()
    text = str(refused.value)
    named = value.rpartition(",")[2]  # (of a list, the name that is wrong)
    assert text.startswith(f"invalid settings: {variable}: ") and named in text and allowed in text, text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("variable", "value", "field", "taken"),
    [
        ("KUBECHAIN_LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("KUBECHAIN_METRICS_PORT", "65535", "metrics_port", 65535),
        ("KUBECHAIN_METRICS_PORT", "0", "metrics_port", 0),
        (
            "REDIS_URL",
            "rediss://:secret@redis.example:6380/1",
            "redis_url",
            "rediss://:secret@redis.example:6380/1",
        ),
        ("REDIS_URL", "unix:///run/redis.sock?db=0", "redis_url", "unix:///run/redis.sock?db=0"),
        ("KUBECHAIN_LEASE_DURATION_S", "4", "lease_duration_s", 4),
        ("KUBECHAIN_LEASE_DURATION_S", "15.0", "lease_duration_s", 15),
        ("KUBECHAIN_LEASE_NAME", "kubechain.watcher-2", "lease_name", "kubechain.watcher-2"),
        ("KUBECHAIN_RESYNC_INTERVAL_S", "1", "resync_interval_s", 1.0),
        ("KUBECHAIN_NAMESPACES", "default,team-a", "namespaces", ["default", "team-a"]),
        ("KUBECHAIN_CONFIG_CACHE_TTL_S", "0", "config_cache_ttl_s", 0.0),
    ],
)
def test_a_setting_within_its_bounds_is_taken(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, taken: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(), field) == taken


def test_a_refused_redis_url_is_said_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis.example:6379/0?password=pa55word")
    with pytest.raises(SettingsInvalid) as refused:
        load_settings()
    monkeypatch.setenv("REDIS_URL", "http://user:pa55word@redis.example:6379/0")
    with pytest.raises(SettingsInvalid) as refused_too:
        load_settings()
    for text in (str(refused.value), str(refused_too.value)):
        assert text.startswith("invalid settings: REDIS_URL: ") and "pa55word" not in text, text


def test_a_mistyped_kubechain_variable_is_named_with_the_setting_it_is_closest_to() -> None:
    """KUBECHAIN_MAX_TOOL_RESULT_BYTE=1 was ignored without a word: the limit stayed 64 KiB."""
    from kubechain.settings import unknown_variables

    environ = {
        "KUBECHAIN_MAX_TOOL_RESULT_BYTE": "1",
        "kubechain_log_levl": "DEBUG",  # pydantic-settings reads names in any case
        "KUBECHAIN_FROBNICATE": "yes",
        # read: by a setting (in any case), by the CLI, under another name, or a Service's link
        "KUBECHAIN_METRICS_PORT": "9090",
        "Kubechain_Lease_Namespace": "team-a",
        "KUBECHAIN_CLI_WATCH_TIMEOUT_S": "5",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "KUBECHAIN_REDIS_SERVICE_HOST": "10.0.0.1",
        "KUBECHAIN_REDIS_PORT_6379_TCP_ADDR": "10.0.0.1",
        "KUBECHAIN_WATCHER_SERVICE_HOST": "10.0.0.2",
        "KUBECHAIN_WATCHER_PORT": "tcp://10.0.0.2:9090",
    }
    assert unknown_variables(environ) == [
        "KUBECHAIN_FROBNICATE is not a KubeChain setting: it is ignored",
        "KUBECHAIN_MAX_TOOL_RESULT_BYTE is not a KubeChain setting: it is ignored (did you mean "
        "KUBECHAIN_MAX_TOOL_RESULT_BYTES?)",
        "kubechain_log_levl is not a KubeChain setting: it is ignored (did you mean KUBECHAIN_LOG_LEVEL?)",
    ]


def test_a_mistyped_port_variable_is_warned_of_unless_a_service_of_its_name_is_linked() -> None:
    """Every name ending in _PORT was taken for a Kubernetes service link: KUBECHAIN_METRIC_PORT=9090 (for
    KUBECHAIN_METRICS_PORT) was ignored without a word, and the worker served no /metrics and /healthz.
    Kubernetes sets a service's links together with its <SERVICE>_SERVICE_HOST."""
    from kubechain.settings import unknown_variables

    mistyped = {
        "KUBECHAIN_METRIC_PORT": "9090",
        "KUBECHAIN_SCALING_PORT_8081_TCP": "8081",
        "KUBECHAIN_METRICS_SERVICE_PORT": "9090",
    }
    assert unknown_variables(mistyped) == [
        f"{variable} is not a KubeChain setting: it is ignored (did you mean {closest}?)"
        for variable, closest in [
            ("KUBECHAIN_METRICS_SERVICE_PORT", "KUBECHAIN_METRICS_PORT"),
            ("KUBECHAIN_METRIC_PORT", "KUBECHAIN_METRICS_PORT"),
            ("KUBECHAIN_SCALING_PORT_8081_TCP", "KUBECHAIN_SCALING_PORT"),
        ]
    ]
    linked = {  # what a pod gets for a Service named kubechain-metrics, with its service links kept
        "KUBECHAIN_METRICS_SERVICE_HOST": "10.0.0.3",
        "KUBECHAIN_METRICS_SERVICE_PORT": "9090",
        "KUBECHAIN_METRICS_SERVICE_PORT_HTTP": "9090",
        "KUBECHAIN_METRICS_PORT_9090_TCP": "tcp://10.0.0.3:9090",
        "KUBECHAIN_METRICS_PORT_9090_TCP_PROTO": "tcp",
        "KUBECHAIN_METRICS_PORT_9090_TCP_PORT": "9090",
        "KUBECHAIN_METRICS_PORT_9090_TCP_ADDR": "10.0.0.3",
    }
    assert unknown_variables(linked) == []


def test_mistyped_variables_are_warned_of_once_a_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import kubechain.settings
    from kubechain.settings import warn_of_unknown_variables

    monkeypatch.setattr(kubechain.settings, "_unknown_variables_said", False)
    monkeypatch.setenv("KUBECHAIN_MAX_TOOL_RESULT_BYTE", "1")
    with caplog.at_level("WARNING", logger="kubechain.settings"):
        warn_of_unknown_variables()
        warn_of_unknown_variables()  # Celery sets logging up again, in each prefork child too
    assert [record.getMessage() for record in caplog.records] == [
        "KUBECHAIN_MAX_TOOL_RESULT_BYTE is not a KubeChain setting: it is ignored (did you mean "
        "KUBECHAIN_MAX_TOOL_RESULT_BYTES?)"
    ]


def test_a_tool_result_limit_is_bounded_by_the_configured_context_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A result is added to its run's window, which is KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES: a result limit
    the largest window allows, but not the configured one, let results through that failed their run as
    ContextWindowTooLarge after the call (a window of 64 KiB and the default 64 KiB results)."""
    monkeypatch.setenv("KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES", "120000")
    monkeypatch.setenv("KUBECHAIN_MAX_TOOL_RESULT_BYTES", "60000")
    with pytest.raises(SettingsInvalid) as refused:
        load_settings()
    assert str(refused.value) == (
        "invalid settings: KUBECHAIN_MAX_TOOL_RESULT_BYTES: 60000 is not between 1 and 10000, a twelfth of "
        "KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES (120000): a result may take 6 times its size as etcd stores it, "
        "and a failed call's is stored twice; a larger one could not be stored in its TaskRunToolCall or "
        "its run's context window"
    )
    monkeypatch.setenv("KUBECHAIN_MAX_TOOL_RESULT_BYTES", "10000")
    assert load_settings().max_tool_result_bytes == 10000
    # left unset, the limit is the default's 64 KiB or what the window allows, whichever is smaller
    monkeypatch.delenv("KUBECHAIN_MAX_TOOL_RESULT_BYTES")
    assert load_settings().max_tool_result_bytes == 10000
    monkeypatch.delenv("KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES")
    assert load_settings().max_tool_result_bytes == 64 * 1024
