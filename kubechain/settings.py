"""Process settings, from the environment (prefix ``KUBECHAIN_``) — injected, never read ad hoc."""

from __future__ import annotations

import json
import os
import socket
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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


def http_url_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) URL with a host that a client can send requests to, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:  # "http://[::1": an unclosed bracket
        return f"is not a URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "has no http:// or https:// scheme"
    if not parts.hostname:
        return "has no host"
    return None


DEFAULT_HUMANLAYER_API_BASE = "https://api.humanlayer.dev"


def _default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


# Redis connections per broker channel (kombu's default is 10); a worker's --concurrency stays within
# half of it, since each thread acks on its own connection when Redis is slow. Connections are opened only
# as needed; the bound must still let one worker hold 500 LLM calls open (the in-flight bench's 2 × 500).
BROKER_MAX_CONNECTIONS = 1024
MAX_WORKER_CONCURRENCY = BROKER_MAX_CONNECTIONS // 2

# The largest KUBECHAIN_MAX_CONTEXT_WINDOW_BYTES: under etcd's default request limit (1.5 MiB) by what the
# rest of a TaskRun may take.
MAX_CONTEXT_WINDOW_BYTES = 1258291  # 1.2 MiB
# The largest KUBECHAIN_MAX_TOOL_RESULT_BYTES (102 KiB): a limit is of UTF-8 bytes, but Go's JSON, as etcd
# stores the objects, writes "<", ">", "&", control characters, U+2028 and U+2029 in 6 bytes each, so one
# result may take 6 times its limit stored; and a failed call writes its error twice (error and
# statusDetail of its TaskRunToolCall). 6 x 2: such a call still fits its own object, and one result so
# escaped takes at most half of the largest window, the rest left for the conversation. A turn's results
# are not all bounded by it (128 calls of even 10 KB each are over the largest window): a window they take
# past its limit fails its run as ContextWindowTooLarge, saying so.
MAX_TOOL_RESULT_BYTES = MAX_CONTEXT_WINDOW_BYTES // 12


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUBECHAIN_", extra="ignore")

    # Kubernetes
    kubeconfig: str | None = Field(default=None, validation_alias="KUBECONFIG")
    kube_context: str | None = None
    namespaces: NameList = Field(default_factory=list, description="watched namespaces; empty = all")
    # A per-process budget; the API server's own priority and fairness protects it from many processes.
    kube_qps: float = 1000.0
    kube_burst: int = 2000
    kube_timeout_s: float = 30.0

    # Celery / Redis
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    # A Redis that vanished without closing the connection (failover, a NAT or firewall timeout) must make
    # a publish or an ack fail, not wait for TCP to give up (~15 minutes).
    redis_socket_timeout_s: float = 10.0

    # LLMs: where provider "openai" goes when an LLM has no spec.parameters.baseUrl (None: api.openai.com)
    openai_base_url: str | None = None
    # kubechain up's scripted LLM: provider-openai LLMs without a baseUrl whose API key is exactly
    # scripted_llm_key are answered there; any other key reaches the real provider (or openai_base_url).
    scripted_llm_base_url: str | None = None
    scripted_llm_key: str = "scripted"

    # Agent loop
    llm_timeout_s: float = 120.0
    # A provider outage of a quarter of an hour (or a long Retry-After) is ridden out: 14 attempts with
    # back-off doubling from 1 s to 5 min between them wait 14-28 min in all before a run fails.
    llm_max_attempts: int = 14
    llm_backoff_base_s: float = 1.0
    llm_backoff_max_s: float = 300.0
    tool_timeout_s: float = 120.0
    # A claim older than this is presumed dead (its worker crashed) and may be re-taken.
    claim_timeout_s: float = 180.0
    max_tool_result_bytes: int = 64 * 1024
    # Measured as etcd stores the TaskRun (Go's JSON), with its spec and annotations; what the object also
    # holds (metadata, managedFields, the rest of its status) takes the rest of etcd's 1.5 MiB.
    max_context_window_bytes: int = 1024 * 1024
    # Tool calls one LLM answer may ask for: each is an object, an execution and a message in every later
    # request, and a 1 MiB context window holds ~10,000 tiny ones.
    max_tool_calls_per_turn: int = Field(default=128, ge=1)
    # The deepest a sub-agent's run may be: a user's run is at depth 0, its sub-agents' at 1 (LABEL_DEPTH).
    max_delegation_depth: int = 5
    # Sub-agent runs of one user's run, at every depth: depth alone lets 20 delegations a turn over 5
    # levels start 20**5 runs. Those that exist are counted (a deleted one frees its place). A soft cap:
    # it is counted, then each child created, so delegations anywhere in the run's tree checked at once
    # may each pass it by one.
    max_sub_agent_runs: int = Field(default=100, ge=1)
    # A sub-agent's run that has not started after this long (its Agent never became Ready) is deleted
    # and its delegating tool call fails with the reason, so the parent run is not blocked forever.
    sub_agent_start_timeout_s: float = 900.0
    # How long a worker may reuse what it read of an Agent, LLM, Secret, Tool or MCPServer to build an
    # LLM request (the run itself is always read fresh).
    config_cache_ttl_s: float = 2.0

    # Watcher
    resync_interval_s: float = 30.0
    stale_after_s: float = 20.0
    lease_name: str = "kubechain-watcher"
    # The pod's own namespace in a cluster (POD_NAMESPACE, from the downward API), so an overlay that moves
    # KubeChain to another namespace moves the Lease with it.
    lease_namespace: str = Field(default_factory=lambda: os.environ.get("POD_NAMESPACE") or "default")
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

    # Observability
    metrics_port: int = 0
    # Watcher: GET /scaling answers each worker queue's demand (backlog + steps in hand) as JSON, for
    # KEDA's metrics-api scaler (0: not served)
    scaling_port: int = 0
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
    def _tool_result_fits_in_a_context_window(cls, value: int) -> int:
        # Past this a result is let through that a run cannot store: it fails later, after the call.
        if not 0 < value <= MAX_TOOL_RESULT_BYTES:
            raise ValueError(
                f"{value} is not between 1 and {MAX_TOOL_RESULT_BYTES} (a twelfth of the largest context "
                f"window, {MAX_CONTEXT_WINDOW_BYTES} bytes): a result may take 6 times its size as etcd "
                "stores it, and a failed call's is stored twice; a larger one could not be stored in its "
                "TaskRunToolCall or its run's context window"
            )
        return value

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
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{variable}: {message}" if variable else message)
        raise SettingsInvalid("invalid settings: " + "; ".join(problems)) from None
    except SettingsError as exc:  # a value that is not even parsed (JSON for a list field)
        raise SettingsInvalid(f"invalid settings: {exc}") from None
