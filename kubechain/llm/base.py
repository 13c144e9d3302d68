"""The LLM transport boundary: one request/response shape for every provider, and a test double."""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from pydantic import BaseModel, Field

from kubechain.models import LLM, Message, ToolCall
from kubechain.models.taskrun import TokenUsage
from kubechain.redaction import redact, redact_url

# What OpenAI and Anthropic accept as a function name: a tool's, and a call's in a request's messages.
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_FUNCTION_NAME = 64
NOT_IN_FUNCTION_NAME = re.compile(r"[^a-zA-Z0-9_-]")
# What a call the LLM made with no name is named in the messages sent back (an empty name fails the
# request for good: OpenAI's 400 "function.name: empty string").
UNNAMED_CALL = "unnamed_tool"


class ToolDefinition(BaseModel):
    """A function the LLM may call. ``parameters`` is the JSON schema, passed through whole."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


class LLMRequest(BaseModel):
    model: str
    messages: list[Message]
    tools: list[ToolDefinition] = Field(default_factory=list)
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    top_k: int | None = None  # Anthropic's; OpenAI's API has none
    frequency_penalty: float | None = None  # OpenAI's; Anthropic's API has none
    presence_penalty: float | None = None  # OpenAI's


MAX_TOKEN_COUNT = 2**53 - 1  # beyond this a count is no count (and loses precision in JSON readers)


def token_count(value: object) -> int:
    """A token count as an answer gives it, as a non-negative int: 0 when it is missing, negative or no
    number (an OpenAI-compatible server's, a proxy's). The answer it comes with is paid for: a count
    must never be why it is lost (a negative one made the token counter raise before it was written)."""
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return min(max(int(value), 0), MAX_TOKEN_COUNT)


def token_usage(prompt: object, completion: object, total: object = None) -> TokenUsage:
    """Usage from an answer's counts, each made sane (``token_count``); a total left out (some compatible
    servers do) or unusable is the sum."""
    prompt_tokens, completion_tokens = token_count(prompt), token_count(completion)
    return TokenUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=token_count(total) or min(prompt_tokens + completion_tokens, MAX_TOKEN_COUNT),
    )


class LLMResponse(BaseModel):
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: TokenUsage | None = None
    truncated: bool = False  # cut off at a limit (finish_reason "length", stop_reason "max_tokens", ...)
    # that limit was the model's context window, not maxTokens (which raised would not help)
    context_window_full: bool = False
    # stopped by the provider's content filter (OpenAI's finish_reason "content_filter"), not at a limit
    content_filtered: bool = False


class LLMError(Exception):
    """A failed LLM request. ``retryable`` errors (429, 5xx, timeouts) back off and retry; others fail.
    ``cut_short``: a timeout its call's deadline caused (its worker's claim running out, see
    ``kubechain.llm.deadline``), not the LLM's slowness: retried, and still counted as an attempt (each
    retry is a paid call), its statusDetail and final error saying why."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        cut_short: bool = False,
        unchecked: bool = False,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        self.cut_short = cut_short
        # a credentials check that could not be made, which says nothing against the key (see
        # ``credentials_error``)
        self.unchecked = unchecked


def retryable_status(status_code: int, headers: Mapping[str, str] | None) -> bool:
    """Whether a call answered ``status_code`` may succeed again: 408, 409 (a lock timeout), 429 and 5xx,
    and any status the provider marks ``x-should-retry: true``. A ``false`` is not taken as final: in the
    SDKs it only stops their own immediate retries, and proxies send it on a 429 or 5xx once their own
    retries are spent; final here would fail runs (and a Ready LLM) for good in a short outage."""
    said = headers.get("x-should-retry") if headers is not None else None
    return said == "true" or status_code in (408, 409, 429) or status_code >= 500


def status_headers(exc: Exception) -> Mapping[str, str] | None:
    """The headers of the answer an SDK's status error carries, if any."""
    response = getattr(exc, "response", None)
    return response.headers if response is not None else None


# What OpenAI answers (401, or 403) a restricted or project key without the "Models: Read" permission,
# which may still chat: "You have insufficient permissions for this operation. Missing scopes: ..."
MISSING_PERMISSION = ("missing scope", "insufficient permission")


def endpoint_said(cause: Exception) -> str:
    """The message of an SDK's status error (its body's error message), else the error as text."""
    body = getattr(cause, "body", None)
    inner = body.get("error", body) if isinstance(body, dict) else None
    said = inner.get("message") if isinstance(inner, dict) else None
    return said if isinstance(said, str) and said else str(cause)


def unanswered_because(exc: Exception) -> str:
    """Why an SDK's request got no answer (its connection error), in the transport's words, and the URL
    asked (redacted): the SDKs say only "Connection error.", their cause what failed, "[Errno 111]
    Connection refused", a name that does not resolve, "[SSL: CERTIFICATE_VERIFY_FAILED] ...", so that
    whoever reads it knows what to fix."""
    cause = exc.__cause__ or exc.__context__
    said = (str(cause) or type(cause).__name__) if cause is not None else str(exc)
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    return f"{said} ({redact_url(str(url))})" if url is not None else said


def credentials_error(
    status_code: int | None, cause: Exception, *, api_key: str, not_found_hint: str = ""
) -> LLMError:
    """What a failed credentials check (listing models) means: an HTTP status, or no answer at all.
    ``api_key`` is cut out of what the endpoint said before that is shortened (a gateway may echo the
    request's headers), which could leave the key's start where no later redaction finds it.
    ``not_found_hint``: what to say of a 404 (where the provider's API usually is)."""
    if status_code is None:
        said = redact(unanswered_because(cause), [api_key])
        return LLMError(f"could not reach the LLM endpoint: {said}", retryable=True)
    if status_code == 404:
        # A compatible endpoint or gateway without a model list, which says nothing against the key; or a
        # wrong baseUrl, whose runs will fail with a 404 too: the URL asked says which.
        request = getattr(getattr(cause, "response", None), "request", None)
        where = f" at {redact_url(str(request.url))}" if request is not None else ""
        return LLMError(
            f"the endpoint has no model list{where} (404){not_found_hint}",
            retryable=False,
            status_code=404,
            unchecked=True,
        )
    said = redact(endpoint_said(cause), [api_key])
    if status_code in (401, 403) and any(words in said.lower() for words in MISSING_PERMISSION):
        # The key is good but may not list models: not the key's fault, and its runs may well work.
        return LLMError(
            f"the key may not list models (status code: {status_code}): {said[:300]}",
            retryable=False,
            status_code=status_code,
            unchecked=True,
        )
    if status_code == 401:
        return LLMError(
            f"invalid API key (status code: {status_code})", retryable=False, status_code=status_code
        )
    # 408, 409 and 429 pass, as 5xx do (and as they do for a completion): a key check that met a rate
    # limit must not take a working LLM, and every Agent on it, out of service
    return LLMError(
        f"endpoint answered status {status_code}",
        retryable=retryable_status(status_code, status_headers(cause)),
        status_code=status_code,
    )


def model_list_error(content_type: str | None, cause: Exception, *, api_key: str) -> LLMError:
    """A credentials check answered 200 with something that is no model list (a web page: a baseUrl that
    is a site, or a proxy's login page; JSON of another shape). Not retried: the endpoint is wrong.
    ``api_key``: cut out before the cut (see credentials_error)."""
    if content_type is not None and "json" not in content_type.lower():
        hint = f"it answered {content_type.split(';')[0].strip() or 'no content type'}, not JSON"
    else:
        hint = f"{type(cause).__name__}: {redact(str(cause), [api_key])[:200]}"
    return LLMError(
        f"the base URL did not answer with a model list: {hint} (is baseUrl the API's own URL?)",
        retryable=False,
    )


class LLMClient(Protocol):
    def complete(self, request: LLMRequest) -> LLMResponse: ...

    def validate_credentials(self) -> None:
        """Raise LLMError when the endpoint rejects the key (a cheap authenticated call)."""


# (llm, api key, timeout, base URL or None) -> client
ClientBuilder = Callable[[LLM, str, float, str | None], LLMClient]


def without_key(error: LLMError, api_key: str) -> LLMError:
    """``error`` as it may leave the worker (a status, an Event, a log line): the key cut out of its
    message, and without the SDK's exception chained to it, which repeats the endpoint's whole answer.
    Gateways and debug proxies echo the request's headers into their error bodies."""
    clean = LLMError(
        redact(str(error), [api_key]),
        retryable=error.retryable,
        status_code=error.status_code,
        retry_after_s=error.retry_after_s,
        cut_short=error.cut_short,
        unchecked=error.unchecked,
    )
    clean.__suppress_context__ = True
    return clean


class _KeyScrubbing:
    """A provider client whose errors never carry its key (see ``without_key``)."""

    def __init__(self, client: LLMClient, api_key: str) -> None:
        self._client = client
        self._api_key = api_key

    def complete(self, request: LLMRequest) -> LLMResponse:
        try:
            return self._client.complete(request)
        except LLMError as exc:
            raise without_key(exc, self._api_key) from None

    def validate_credentials(self) -> None:
        try:
            self._client.validate_credentials()
        except LLMError as exc:
            raise without_key(exc, self._api_key) from None


MAX_CACHED_CLIENTS = 64


class LLMClientFactory:
    """Builds provider clients and reuses them per (provider, endpoint, key) so connections are pooled."""

    def __init__(
        self,
        timeout_s: float,
        builders: dict[str, ClientBuilder] | None = None,
        default_base_urls: dict[str, str] | None = None,
        *,
        scripted_base_url: str | None = None,
        scripted_key: str = "scripted",
    ) -> None:
        self._timeout_s = timeout_s
        self._builders = builders or default_builders()
        # Where an LLM without spec.parameters.baseUrl goes (a proxy, a test server).
        self._default_base_urls = default_base_urls or {}
        # kubechain up's scripted server answers provider-openai LLMs without a baseUrl whose key is
        # ``scripted_key``: the Secret decides, not the environment `up` happened to be started in.
        self._scripted = (scripted_key, scripted_base_url) if scripted_base_url else None
        # Least recently used first. Bounded: every rotated key or new baseUrl would otherwise leave its
        # client (and its connection pool) behind for the worker's life. An evicted client is dropped, not
        # closed: a call may still be using it, and its connections close when it is collected.
        self._cache: OrderedDict[tuple[str, str, str], LLMClient] = OrderedDict()
        self._lock = threading.Lock()

    def for_llm(self, llm: LLM, api_key: str) -> LLMClient:
        base_url = (llm.spec.parameters.base_url if llm.spec.parameters else None) or ""
        if not base_url and self._scripted is not None and llm.spec.provider == "openai":
            scripted_key, scripted_url = self._scripted
            base_url = scripted_url if api_key == scripted_key else ""
        base_url = base_url or self._default_base_urls.get(llm.spec.provider, "")
        key = (llm.spec.provider, base_url, api_key)
        with self._lock:
            client = self._cache.get(key)
            if client is not None:
                self._cache.move_to_end(key)
            else:
                builder = self._builders.get(llm.spec.provider)
                if builder is None:
                    raise LLMError(f"unsupported LLM provider {llm.spec.provider!r}", retryable=False)
                try:
                    client = _KeyScrubbing(builder(llm, api_key, self._timeout_s, base_url or None), api_key)
                except Exception as exc:  # e.g. httpx2.InvalidURL for a baseUrl it cannot parse
                    raise LLMError(
                        f"invalid LLM endpoint {redact_url(base_url)!r}: {exc}", retryable=False
                    ) from exc
                self._cache[key] = client
                while len(self._cache) > MAX_CACHED_CLIENTS:
                    self._cache.popitem(last=False)
            return client


def default_builders() -> dict[str, ClientBuilder]:
    """A client builder per provider. Each imports its provider's SDK when it first builds a client: the
    Anthropic SDK alone adds ~40 MiB to a worker, which one whose LLMs are all OpenAI's need not hold."""

    def openai_client(llm: LLM, key: str, timeout_s: float, base_url: str | None) -> LLMClient:
        from kubechain.llm.openai_provider import OpenAIClient

        return OpenAIClient(key, timeout_s, base_url)

    def anthropic_client(llm: LLM, key: str, timeout_s: float, base_url: str | None) -> LLMClient:
        from kubechain.llm.anthropic_provider import AnthropicClient

        return AnthropicClient(key, timeout_s, base_url)

    return {"openai": openai_client, "anthropic": anthropic_client}


def build_request(llm: LLM, messages: list[Message], tools: list[ToolDefinition]) -> LLMRequest:
    """Honour the LLM resource's model, temperature, maxTokens, topP, topK and penalties (the original
    ignored them); each provider sends those its API takes (``parameter_notes`` says which are not)."""
    params = llm.spec.parameters

    def number(raw: str | None) -> float | None:
        return float(raw) if raw else None

    return LLMRequest(
        model=llm.spec.effective_model(),
        messages=[_as_sent(message) for message in messages],
        tools=tools,
        temperature=llm.spec.effective_temperature(),
        max_tokens=llm.spec.effective_max_tokens(),
        top_p=number(params.top_p) if params else None,
        top_k=params.top_k if params else None,
        frequency_penalty=number(params.frequency_penalty) if params else None,
        presence_penalty=number(params.presence_penalty) if params else None,
    )


def _as_sent(message: Message) -> Message:
    """``message`` as the providers take it: a call whose name the LLM left empty, or made of characters
    no function name has (a compatible server's), is named in their stead (its TaskRunToolCall failed as
    an unknown tool, which its result says). The window keeps the name as the LLM gave it."""
    calls = message.tool_calls or []
    if all(FUNCTION_NAME.fullmatch(call.function.name) for call in calls):
        return message
    sent = [
        call
        if FUNCTION_NAME.fullmatch(call.function.name)
        else call.model_copy(
            update={"function": call.function.model_copy(update={"name": _renamed(call.function.name)})}
        )
        for call in calls
    ]
    return message.model_copy(update={"tool_calls": sent})


def _renamed(name: str) -> str:
    """A name no provider takes, as sent instead: suffixed with a hash of it, so it is never the name of
    a tool the LLM may really call ("get weather" sent as "get_weather" showed that tool called and
    answered "unknown tool"), nor the same as another renamed one."""
    if not name:
        return UNNAMED_CALL
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{NOT_IN_FUNCTION_NAME.sub('_', name)[: MAX_FUNCTION_NAME - len(digest) - 1]}_{digest}"


# The LLM resource's sampling parameters: the LLMRequest field (and wire name) of each, and its CRD name
SAMPLING_PARAMETERS = {
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
    "frequency_penalty": "frequencyPenalty",
    "presence_penalty": "presencePenalty",
}


def sampling_set(request: LLMRequest) -> dict[str, float | int]:
    """The sampling parameters the LLM resource sets, by LLMRequest field."""
    values = {field: getattr(request, field) for field in SAMPLING_PARAMETERS}
    return {field: value for field, value in values.items() if value is not None}


class SamplingPolicy(Protocol):
    """A provider's rule for sampling parameters (each provider module is one)."""

    NOT_SENT_BECAUSE: dict[str, str]

    def sampling_sent(self, request: LLMRequest) -> dict[str, float | int]: ...


def _sampling_policy(provider: str) -> SamplingPolicy | None:
    # only the provider asked about is imported (and with it its SDK: see default_builders)
    if provider == "openai":
        from kubechain.llm import openai_provider

        return cast(SamplingPolicy, openai_provider)
    if provider == "anthropic":
        from kubechain.llm import anthropic_provider

        return cast(SamplingPolicy, anthropic_provider)
    return None


def parameter_notes(llm: LLM) -> list[str]:
    """What of the LLM resource's parameters its provider is not sent, and why: for its validation to say
    (the LLM is Ready; its runs work without them). Derived from what the provider's request sends
    (``sampling_sent``), so the rule is written once."""
    policy = _sampling_policy(llm.spec.provider)
    if policy is None:
        return []
    request = build_request(llm, [], [])
    sent = policy.sampling_sent(request)
    unsent_by_reason: dict[str, list[str]] = {}
    for field in sampling_set(request):
        if field not in sent:
            reason = policy.NOT_SENT_BECAUSE[field]
            unsent_by_reason.setdefault(reason, []).append(SAMPLING_PARAMETERS[field])
    return [
        f"{' and '.join(names)} {'are' if len(names) > 1 else 'is'} not sent: {reason}"
        for reason, names in unsent_by_reason.items()
    ]
