"""Process settings, from the environment (prefix ``KUBECHAIN_``) — injected, never read ad hoc."""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import socket
from collections.abc import Mapping
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubechain.models.labels import is_namespace_name, is_object_name
from kubechain.models.urls import http_url_problem
from kubechain.redaction import redact_url


def _names(value: Any) -> Any:
    """A list from the environment as people write it: ``uvx,npx`` (or one name), or a JSON list."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in text.split(",") if part.strip()]


# Comma-separated or a JSON list; pydantic-settings would otherwise accept only JSON and refuse to start.
NameList = Annotated[list[str], NoDecode, BeforeValidator(_names)]


ENV_PREFIX = "KUBECHAIN_"
DEFAULT_HUMANLAYER_API_BASE = "https://api.humanlayer.dev"
NOT_A_NAMESPACE_NAME = (
    "is not a namespace name: a DNS-1123 label (lower-case letters, digits and '-', at most 63)"
)


def _default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


# Redis connections per broker channel (kombu's default is 10); a worker's --concurrency stays within
# half of it, since each thread acks on its own connection when Redis is slow. Connections are opened only
# as needed; the bound must still let one worker hold 500 LLM calls open (the in-flight bench's 2 × 500).
BROKER_MAX_CONNECTIONS = 1024
MAX_WORKER_CONCURRENCY = BROKER_MAX_CONNECTIONS // 2

# How often the watcher's leader renews its Lease; it stops acting at two thirds of the Lease's duration
# since its last renewal (before another replica may take over), so the duration must leave that more than
# one renewal: at 2 s the leader acted for 1.3 s of every 2.
LEASE_RETRY_PERIOD_S = 2.0
MIN_LEASE_DURATION_S = 4

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# What kombu and redis-py connect to Redis with (sentinel: kombu's; anything else kombu takes for another
# broker, AMQP on port 5672 for a URL without a scheme, and retries for ever)
REDIS_URL_SCHEMES = ("redis", "rediss", "unix", "sentinel")

# The largest KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES: under etcd's default request limit (1.5 MiB) by what the
# rest of a TaskRun may take.
MAX_CONTEXT_WINDOW_BYTES = 1258291  # 1.2 MiB
# KUBECHAIN_MAX_TOOL_RESULT_BYTES is at most KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES (the configured one: each
# result is added to its run's window) divided by this: a limit is of UTF-8 bytes, but Go's JSON, as etcd
# stores the objects, writes "<", ">", "&", control characters, U+2028 and U+2029 in 6 bytes each, so one
# result may take 6 times its limit stored; and a failed call writes its error twice (error and
# statusDetail of its TaskRunToolCall). 6 x 2: such a call still fits its own object (its arguments aside:
# they may be as large as the window, and a result refused beside them ends the call saying so, see
# plan_outcome_too_large), and one result so escaped takes at most half of the window, the rest left for
# the conversation. A turn's results are not
# all bounded by it (128 calls of even 10 KB each are over the largest window): a window they take past
# its limit fails its run as ContextWindowTooLarge, saying so.
WINDOW_BYTES_PER_TOOL_RESULT_BYTE = 12
DEFAULT_MAX_TOOL_RESULT_BYTES = 64 * 1024


class Settings(BaseSettings):
    # No float setting is nan or infinite: nan compares false with everything, so no bound refused it (a
    # claim timeout of nan made every claim expire at once).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", allow_inf_nan=False)

    # Kubernetes
    kubeconfig: str | None = Field(default=None, validation_alias="KUBECONFIG")
    kube_context: str | None = None
    namespaces: NameList = Field(default_factory=list, description="watched namespaces; empty = all")
    # A per-process budget; the API server's own priority and fairness protects it from many processes.
    kube_qps: float = Field(default=1000.0, gt=0)
    kube_burst: int = Field(default=2000, ge=1)
    kube_timeout_s: float = Field(default=30.0, gt=0)

    # Celery / Redis
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    # A Redis that vanished without closing the connection (failover, a NAT or firewall timeout) must make
    # a publish or an ack fail, not wait for TCP to give up (~15 minutes).
    redis_socket_timeout_s: float = Field(default=10.0, gt=0)

    # LLMs: where provider "openai" goes when an LLM has no spec.parameters.baseUrl (None: api.openai.com)
    openai_base_url: str | None = None
    # kubechain up's scripted LLM: provider-openai LLMs without a baseUrl whose API key is exactly
    # scripted_llm_key are answered there; any other key reaches the real provider (or openai_base_url).
    scripted_llm_base_url: str | None = None
    scripted_llm_key: str = "scripted"

    # Agent loop
    llm_timeout_s: float = Field(default=120.0, gt=0)
    # A provider outage of a quarter of an hour (or a long Retry-After) is ridden out: 14 attempts with
    # back-off doubling from 1 s to 5 min between them wait 14-28 min in all before a run fails.
    llm_max_attempts: int = Field(default=14, ge=1)
    llm_backoff_base_s: float = Field(default=1.0, gt=0)
    llm_backoff_max_s: float = Field(default=300.0, gt=0)
    tool_timeout_s: float = Field(default=120.0, gt=0)
    # A claim older than this is presumed dead (its worker crashed) and may be re-taken.
    claim_timeout_s: float = Field(default=180.0, gt=0)
    # Measured as etcd stores the TaskRun (Go's JSON), with its spec and annotations; what the object also
    # holds (metadata, managedFields, the rest of its status) takes the rest of etcd's 1.5 MiB. (Before
    # max_tool_result_bytes, whose check reads it.)
    max_context_window_bytes: int = 1024 * 1024
    # Bounded by the window (_tool_result_fits_in_a_context_window); unset, the default or what the window
    # allows, whichever is smaller (_tool_result_limit_the_window_allows), not refused
    max_tool_result_bytes: int = Field(default=DEFAULT_MAX_TOOL_RESULT_BYTES, validate_default=False)
    # Tool calls one LLM answer may ask for: each is an object, an execution and a message in every later
    # request, and a 1 MiB context window holds ~10,000 tiny ones.
    max_tool_calls_per_turn: int = Field(default=128, ge=1)
    # The deepest a sub-agent's run may be: a user's run is at depth 0, its sub-agents' at 1 (LABEL_DEPTH).
    max_delegation_depth: int = Field(default=5, ge=0)
    # Sub-agent runs of one user's run, at every depth: depth alone lets 20 delegations a turn over 5
    # levels start 20**5 runs. Those that exist are counted (a deleted one frees its place). A soft cap:
    # it is counted, then each child created, so delegations anywhere in the run's tree checked at once
    # may each pass it by one.
    max_sub_agent_runs: int = Field(default=100, ge=1)
    # A sub-agent's run that has not started after this long (its Agent never became Ready) is deleted
    # and its delegating tool call fails with the reason, so the parent run is not blocked forever.
    sub_agent_start_timeout_s: float = Field(default=900.0, gt=0)
    # How long a worker may reuse what it read of an Agent, LLM, Secret, Tool or MCPServer to build an
    # LLM request (the run itself is always read fresh).
    config_cache_ttl_s: float = Field(default=2.0, ge=0)

    # Watcher
    # Each resync goes over every cached object: at less than a second apart the watcher does little else.
    resync_interval_s: float = Field(default=30.0, ge=1)
    stale_after_s: float = Field(default=20.0, gt=0)
    lease_name: str = "kubechain-watcher"
    # The pod's own namespace in a cluster (POD_NAMESPACE, from the downward API), so an overlay that moves
    # KubeChain to another namespace moves the Lease with it.
    lease_namespace: str = Field(default_factory=lambda: os.environ.get("POD_NAMESPACE") or "default")
    # Whole seconds, as the Lease stores it; see _lease_outlasts_its_renewals for the least.
    lease_duration_s: float = 15.0
    identity: str = Field(default_factory=_default_identity)

    # Integrations
    humanlayer_api_base: str = Field(
        default=DEFAULT_HUMANLAYER_API_BASE, validation_alias="HUMANLAYER_API_BASE"
    )
    mcp_command_allowlist: NameList = Field(default_factory=list)
    # The largest message read from an MCP server (a tool's result): a longer one fails its call, saying
    # so, instead of being read whole (a few hundred MB would take the worker down). The default is
    # kubechain.mcp.common.DEFAULT_MAX_MESSAGE_BYTES (not imported: settings import nothing of the app).
    mcp_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    # Stdio MCP servers (child processes: 70 MiB for a small Python one, 160 MiB for an npx one with npm's
    # own process) one worker process runs at once. A checks worker starts the one it validates and stops
    # it after: 4 fit its 1 GiB (deploy/base/workers.yaml) beside the worker; the others wait their turn.
    mcp_max_stdio_checks: int = Field(default=4, ge=1, le=64)
    # A tools worker keeps a session (its child) per stdio server its calls use, until unused for 15 min:
    # at most this many, the one unused for longest closed to start another. 16 fit its 4 GiB.
    mcp_max_stdio_sessions: int = Field(default=16, ge=1, le=256)

    # Observability
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # Watcher: GET /scaling answers each worker queue's demand (backlog + steps in hand) as JSON, for
    # KEDA's metrics-api scaler (0: not served)
    scaling_port: int = Field(default=0, ge=0, le=65535)
    # Where a prefork worker's processes keep their metrics for /metrics to add up (prometheus_client's
    # multiprocess mode, which reads it from the environment at import: set it before the process starts).
    prometheus_multiproc_dir: str | None = Field(default=None, validation_alias="PROMETHEUS_MULTIPROC_DIR")
    log_level: str = "INFO"
    log_json: bool = False

    @property
    def tool_execution_cap_s(self) -> float:
        """The longest a tool call may run (a Tool's own timeoutSeconds, an MCP call with its reconnect):
        it must end, and its outcome be written, before its claim expires and another worker starts it."""
        return max(self.tool_timeout_s, self.claim_timeout_s - 30.0)

    @property
    def claim_margin_s(self) -> float:
        """What a claim leaves past the longest LLM or tool call (30 s by default): a third of it for the
        claim's own write and Events (claim_confirm_budget_s), the rest for writing the call's outcome
        (claim_outcome_margin_s)."""
        return self.claim_timeout_s - max(self.llm_timeout_s, self.tool_execution_cap_s)

    @property
    def claim_confirm_budget_s(self) -> float:
        """How old a claim confirmed by reading it back may be when its worker makes the call under it (an
        older one is stamped afresh first; one whose write was answered is acted on whatever its age): a
        third of claim_margin_s (10 s by default)."""
        return self.claim_margin_s / 3

    @property
    def claim_outcome_margin_s(self) -> float:
        """What a claim keeps past its call for writing the call's outcome: the rest of claim_margin_s (20 s
        by default). A call under a claim older than claim_confirm_budget_s (its write answered late) is
        cut short by what it is over, so that it still ends in time."""
        return self.claim_margin_s - self.claim_confirm_budget_s

    @field_validator("humanlayer_api_base")
    @classmethod
    def _humanlayer_api_base_is_an_http_url(cls, value: str) -> str:
        if not value.strip():
            # empty is unset (a template's empty default): an installation that uses no HumanLayer
            # must not be stopped by it
            return DEFAULT_HUMANLAYER_API_BASE
        # Found at start, not as a ContactChannel's validation error (a malformed URL) or as what looks
        # like a HumanLayer outage (no scheme) on every request.
        problem = http_url_problem(value)
        if problem is not None:
            raise ValueError(
                f"{redact_url(value)!r} {problem}: set it to the HumanLayer API's URL, e.g. "
                f"{DEFAULT_HUMANLAYER_API_BASE}"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level_is_a_level(cls, value: str) -> str:
        return log_level_named(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url_names_redis(cls, value: str) -> str:
        try:
            scheme = urlsplit(value).scheme
        except ValueError as exc:
            raise ValueError(f"{redact_url(value)!r} is not a URL ({exc})") from None
        if scheme not in REDIS_URL_SCHEMES:
            schemes = ", ".join(f"{name}://" for name in REDIS_URL_SCHEMES[:-1])
            raise ValueError(
                f"{redact_url(value)!r} has no {schemes} or {REDIS_URL_SCHEMES[-1]}:// scheme, e.g. "
                "redis://127.0.0.1:6379/0"
            )
        return value

    @field_validator("lease_duration_s")
    @classmethod
    def _lease_outlasts_its_renewals(cls, value: float) -> float:
        # The Lease holds whole seconds (int() made 0.5 a Lease of 0 s), and its leader stops acting at
        # two thirds of it: that must be more than one renewal (LEASE_RETRY_PERIOD_S) apart.
        if value != int(value) or value < MIN_LEASE_DURATION_S:
            raise ValueError(
                f"{value:g} is not a whole number of seconds, at least {MIN_LEASE_DURATION_S}: the leader "
                f"renews its Lease every {LEASE_RETRY_PERIOD_S:g} s and stops acting at two thirds of its "
                "duration since the last renewal"
            )
        return value

    @field_validator("lease_name")
    @classmethod
    def _lease_name_is_an_object_name(cls, value: str) -> str:
        if not is_object_name(value):
            raise ValueError(
                f"{value!r} is not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', at most 253 "
                "characters), as the API server requires of a Lease's name"
            )
        return value

    @field_validator("lease_namespace")
    @classmethod
    def _lease_namespace_is_a_namespace_name(cls, value: str) -> str:
        if not is_namespace_name(value):
            raise ValueError(f"{value!r} {NOT_A_NAMESPACE_NAME}")
        return value

    @field_validator("namespaces")
    @classmethod
    def _namespaces_are_namespace_names(cls, value: list[str]) -> list[str]:
        # Each is watched: an informer of a namespace that cannot exist lists nothing, for ever.
        wrong = [name for name in value if not is_namespace_name(name)]
        if wrong:
            raise ValueError(f"{', '.join(map(repr, wrong))} {NOT_A_NAMESPACE_NAME}")
        return value

    @field_validator("max_context_window_bytes")
    @classmethod
    def _context_window_fits_in_etcd(cls, value: int) -> int:
        # Past this the API server, not the limit, refuses a large window: a run's answer is paid for and
        # then cannot be stored.
        if not 0 < value <= MAX_CONTEXT_WINDOW_BYTES:
            raise ValueError(
                f"{value} is not between 1 and {MAX_CONTEXT_WINDOW_BYTES} (1.2 MiB): a TaskRun, its window "
                "included, must fit etcd's 1.5 MiB request limit (its --max-request-bytes default) with "
                "room for its metadata and the rest of its status"
            )
        return value

    @field_validator("max_tool_result_bytes")
    @classmethod
    def _tool_result_fits_in_a_context_window(cls, value: int, info: ValidationInfo) -> int:
        # Past this a result is let through that a run cannot store: it fails later, after the call.
        # (A window out of its own bounds is not in info.data, and is said of itself: the largest is used.)
        window = info.data.get("max_context_window_bytes")
        of = "" if window is not None else "the largest "
        window = MAX_CONTEXT_WINDOW_BYTES if window is None else window
        largest = max(1, window // WINDOW_BYTES_PER_TOOL_RESULT_BYTE)
        if not 0 < value <= largest:
            raise ValueError(
                f"{value} is not between 1 and {largest}, a twelfth of {of}KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES "
                f"({window}): a result may take 6 times its size as etcd stores it, and a failed call's is "
                "stored twice; a larger one could not be stored in its TaskRunToolCall or its run's context "
                "window"
            )
        return value

    @model_validator(mode="after")
    def _tool_result_limit_the_window_allows(self) -> Self:
        # A smaller window alone must not stop a process that never set the result limit: the default
        # gives way to it instead.
        if "max_tool_result_bytes" not in self.model_fields_set:
            allowed = max(1, self.max_context_window_bytes // WINDOW_BYTES_PER_TOOL_RESULT_BYTE)
            self.max_tool_result_bytes = min(DEFAULT_MAX_TOOL_RESULT_BYTES, allowed)
        return self

    @model_validator(mode="after")
    def _claims_outlive_calls(self) -> Self:
        # A claim that expires while its LLM or tool call is still running lets resync hand the step to a
        # second worker: the call would be made twice.
        longest = max(self.llm_timeout_s, self.tool_timeout_s)
        if self.claim_timeout_s <= longest:
            raise ValueError(
                f"KUBECHAIN_CLAIM_TIMEOUT_S ({self.claim_timeout_s:g} s) must be longer than "
                f"KUBECHAIN_LLM_TIMEOUT_S ({self.llm_timeout_s:g} s) and KUBECHAIN_TOOL_TIMEOUT_S "
                f"({self.tool_timeout_s:g} s), or a call still running would be started again by another "
                "worker: raise the claim timeout or lower the call timeouts"
            )
        return self


_ALIASES = {
    info.validation_alias for info in Settings.model_fields.values() if isinstance(info.validation_alias, str)
}


class SettingsInvalid(ValueError):
    """The environment holds a setting a process cannot start with; the message names the variable."""


# KUBECHAIN_* variables read elsewhere than here: the CLI's watch timeout; what the bench gives its command
OTHER_VARIABLES = frozenset({"KUBECHAIN_CLI_WATCH_TIMEOUT_S", "KUBECHAIN_BENCH_NAMESPACE"})
# What Kubernetes sets for a Service named kubechain-* in a pod that keeps its service links
# (KUBECHAIN_REDIS_SERVICE_HOST, KUBECHAIN_REDIS_PORT_6379_TCP_ADDR, KUBECHAIN_REDIS_PORT), after the
# service's name; always with its <SERVICE>_SERVICE_HOST
_SERVICE_LINK = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?)")

log = logging.getLogger(__name__)
_unknown_variables_said = False


def setting_variables() -> list[str]:
    """The KUBECHAIN_* variables the settings read."""
    return sorted(
        f"{ENV_PREFIX}{field.upper()}"
        for field, info in Settings.model_fields.items()
        if not isinstance(info.validation_alias, str)
    )


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each KUBECHAIN_* variable in ``environ`` that nothing reads, naming the setting it is
    closest to: a mistyped one (KUBECHAIN_MAX_TOOL_RESULT_BYTE) was ignored without a word."""
    known = setting_variables()
    read = {*known, *OTHER_VARIABLES}
    services = {
        name[: -len("_SERVICE_HOST")] for name in map(str.upper, environ) if name.endswith("_SERVICE_HOST")
    }
    lines = []
    for variable in sorted(environ):
        name = variable.upper()  # pydantic-settings reads names in any case
        if not name.startswith(ENV_PREFIX) or name in read or _is_service_link(name, services):
            continue
        line = f"{variable} is not a KubeChain setting: it is ignored"
        closest = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        lines.append(f"{line} (did you mean {closest[0]}?)" if closest else line)
    return lines


def _is_service_link(name: str, services: set[str]) -> bool:
    """Whether ``name`` is a link Kubernetes set for one of ``services`` (each named by its
    <SERVICE>_SERVICE_HOST): the form alone does not say, a mistyped KUBECHAIN_METRIC_PORT has it."""
    return any(
        name[:at] in services and _SERVICE_LINK.fullmatch(name, at) is not None
        for at, character in enumerate(name)
        if character == "_"
    )


def warn_of_unknown_variables() -> None:
    """Logs :func:`unknown_variables` of this process's environment, once a process (the worker's logging
    is set up again by Celery, and in each prefork child)."""
    global _unknown_variables_said
    if _unknown_variables_said:
        return
    _unknown_variables_said = True
    for line in unknown_variables(os.environ):
        log.warning(line)


def log_level_named(value: str) -> str:
    """``value`` (any case, spaces around it) as one of LOG_LEVELS; ValueError saying which they are."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not a log level: one of {', '.join(LOG_LEVELS)}")
    return level


def load_settings() -> Settings:
    """``Settings()``, with what is wrong said as ``VARIABLE: problem`` lines instead of pydantic's report."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            info = Settings.model_fields.get(field)
            alias = info.validation_alias if info is not None else None
            variable = alias if isinstance(alias, str) else f"KUBECHAIN_{field.upper()}" if field else ""
            if field in _ALIASES:  # a field read under its own name (REDIS_URL) is located by that name
                variable = field
            if error["type"] == "value_error":  # our own validators' words, which name the value (redacted)
                message = str(error["msg"]).removeprefix("Value error, ")
            else:  # pydantic's bound ("Input should be greater than 0"): the value it was said of first
                message = f"{error.get('input')!r}: {error['msg']}"
            problems.append(f"{variable}: {message}" if variable else message)
        raise SettingsInvalid("invalid settings: " + "; ".join(problems)) from None
    except SettingsError as exc:  # a value that is not even parsed (JSON for a list field)
        raise SettingsInvalid(f"invalid settings: {exc}") from None
