"""OpenAI and any OpenAI-compatible endpoint (vLLM, Ollama, LiteLLM, the scripted test server)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

import httpx2
import openai

from kubechain.llm.base import (
    LLMError,
    LLMRequest,
    LLMResponse,
    retryable_status,
    sampling_set,
    status_headers,
    token_usage,
    unanswered_because,
)
from kubechain.llm.deadline import AnswerTooLarge, answer_too_large, timeout_error, with_deadline
from kubechain.llm.model_list import SDKErrors, check_model_list
from kubechain.models import Message, ToolCall, ToolCallFunction
from kubechain.redaction import redact
from kubechain.retry_after import retry_after_s


def message_to_openai(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type or "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in message.tool_calls
        ]
        if not message.content:
            out["content"] = None
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def _tool_call(index: int, call: dict[str, Any], function: dict[str, Any]) -> ToolCall:
    """A tool call as the answer gives it, with what some OpenAI-compatible servers leave out made up.
    Gemini's endpoint, llama.cpp, LM Studio and others send no ``id`` (or an empty one), and some send the
    arguments as an object: read strictly, such an answer was taken for garbage and paid for again on
    every attempt, or (an empty id) its tools ran and the next request, whose tool messages named no call,
    was refused for good."""
    name = function["name"]
    arguments = function.get("arguments")
    if arguments is None:
        arguments = ""
    elif not isinstance(arguments, str):
        arguments = json.dumps(arguments)
    given = call.get("id")
    call_id = given if isinstance(given, str) and given else _made_up_id(index, name, arguments)
    return ToolCall(
        id=call_id,
        type=call.get("type") or "function",
        function=ToolCallFunction(name=name, arguments=arguments),
    )


def _made_up_id(index: int, name: str, arguments: str) -> str:
    # unique within the answer (the index), the same for the same answer; a lone surrogate (a broken
    # emoji) is cleaned only where the answer is recorded, and must not make this raise before
    digest = hashlib.sha256(f"{index}\0{name}\0{arguments}".encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"call_{digest}"


def _response_from(completion: dict[str, Any], api_key: str) -> LLMResponse:
    """An OpenAI chat completion (its JSON) as our response; KeyError/TypeError/ValueError if the shape
    is wrong. ``api_key`` is cut out of the text an error quotes before it is shortened (a gateway may
    echo the request's headers), which could leave the key's start where no later redaction finds it."""
    choices = completion.get("choices")
    if not choices:
        # Retried (bounded by the attempts), as the original did: gateways answer 200 with no choices,
        # often with an error object, during an upstream hiccup.
        error = completion.get("error")
        detail = error.get("message") if isinstance(error, dict) else error
        suffix = f": {redact(str(detail), [api_key])[:300]}" if detail else ""
        raise LLMError(f"LLM returned no completion choices{suffix}", retryable=True)
    message = choices[0]["message"]
    calls = [
        _tool_call(index, call, function)
        for index, call in enumerate(message.get("tool_calls") or [])
        # custom (non-function) tool calls have no function: not ours to run
        if (function := call.get("function")) is not None
    ]
    usage = None
    if isinstance(counts := completion.get("usage"), dict):
        # counts as compatible servers give them: any missing, negative or no number is 0 (token_usage)
        usage = token_usage(
            counts.get("prompt_tokens"), counts.get("completion_tokens"), counts.get("total_tokens")
        )
    content = _text_of(message.get("content"))
    refusal = message.get("refusal")
    if not content and not calls and isinstance(refusal, str) and refusal:
        # The model declined (OpenAI's refusal field): say so, rather than "an empty response".
        raise LLMError(f"LLM refused to answer: {redact(refusal, [api_key])[:500]}", retryable=False)
    finish_reason = choices[0].get("finish_reason")
    # the content filter (OpenAI's, Azure's) stops an answer as a limit does: what came may be cut off
    content_filtered = finish_reason == "content_filter"
    return LLMResponse(
        content=content,
        tool_calls=calls,
        usage=usage,
        truncated=finish_reason == "length" or content_filtered,
        content_filtered=content_filtered,
    )


def _text_of(content: Any) -> str:
    """The answer's text: a string, or (some compatible servers, reasoning models) a list of parts, whose
    text parts are joined and the rest (reasoning, images) left out."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    raise TypeError(f"message content is a {type(content).__name__}")


OFFICIAL_HOST = "api.openai.com"
# OpenAI's regional (data residency) hosts, eu.api.openai.com and the like, and Azure OpenAI's (its
# deployments have names of their own, so the model's name cannot tell): public, Foundry, US Gov, China
OFFICIAL_HOST_SUFFIXES = (
    ".api.openai.com",
    ".openai.azure.com",
    ".cognitiveservices.azure.com",
    ".openai.azure.us",
    ".openai.azure.cn",
)
# OpenAI's reasoning models (o1, o3-mini, o4-mini, gpt-5, gpt-5.1, ...), a gateway's "openai/" prefix or
# not, or a fine-tune's "ft:"; any case
REASONING_MODEL = re.compile(r"(?:^|[/:])(?:o[1-9]|gpt-5)(?:[-.:]|$)", re.IGNORECASE)


def is_official_host(host: str) -> bool:
    """Whether ``host`` is OpenAI's (or Azure OpenAI's), which take the token limit as
    ``max_completion_tokens``."""
    host = host.lower().rstrip(".")
    return host == OFFICIAL_HOST or host.endswith(OFFICIAL_HOST_SUFFIXES)


# gpt-5-chat-latest and the like are no reasoning models, though named like one: they take temperature
CHAT_MODEL = re.compile(r"gpt-5[^/:]*-chat(?:[-.:]|$)", re.IGNORECASE)
REASONING_REFUSES = "OpenAI's reasoning models (o1, o3, o4-mini, gpt-5, ...) refuse sampling parameters"
SAMPLING_REFUSED_BY_REASONING = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
# Why a parameter the LLM resource sets is not sent (see sampling_sent; kubechain.llm.base.parameter_notes)
NOT_SENT_BECAUSE = {
    "top_k": "OpenAI's API has no top_k",
    **dict.fromkeys(SAMPLING_REFUSED_BY_REASONING, REASONING_REFUSES),
}


def sampling_sent(request: LLMRequest) -> dict[str, float | int]:
    """The sampling parameters sent, of those the LLM resource sets: not top_k (none in the API), and none
    to a reasoning model, which refuses them ("Unsupported value: 'temperature' does not support 0.2 with
    this model", 400, failed every run), behind any endpoint (a gateway passes them on)."""
    model = request.model
    reasoning = REASONING_MODEL.search(model) is not None and CHAT_MODEL.search(model) is None
    refused = {"top_k", *SAMPLING_REFUSED_BY_REASONING} if reasoning else {"top_k"}
    return {key: value for key, value in sampling_set(request).items() if key not in refused}


def request_body(request: LLMRequest, *, official: bool) -> dict[str, Any]:
    """The chat completion request. OpenAI itself takes the token limit as ``max_completion_tokens``
    (its reasoning models refuse ``max_tokens``), and so does a reasoning model behind a gateway, which
    passes the body on; compatible servers (vLLM, Ollama, LiteLLM) know ``max_tokens``."""
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [message_to_openai(message) for message in request.messages],
    }
    if request.tools:
        body["tools"] = [tool.to_openai() for tool in request.tools]
    body.update(sampling_sent(request))
    if request.max_tokens is not None:
        takes_completion_tokens = official or REASONING_MODEL.search(request.model) is not None
        body["max_completion_tokens" if takes_completion_tokens else "max_tokens"] = request.max_tokens
    return body


NOT_UNDER_V1 = "; OpenAI-compatible servers usually serve their API under /v1: does baseUrl lack it?"


SDK_ERRORS = SDKErrors(
    openai.APIStatusError, (openai.APITimeoutError, openai.APIConnectionError), openai.OpenAIError
)


class OpenAIClient:
    def __init__(self, api_key: str, timeout_s: float, base_url: str | None = None) -> None:
        self._timeout_s = timeout_s
        self._api_key = api_key
        self._client = openai.OpenAI(
            api_key=api_key,
            base_url=base_url or None,
            max_retries=0,
            timeout=timeout_s,
            # timeout_s bounds the whole call, not each read
            http_client=with_deadline(openai.DefaultHttpxClient(), timeout_s),
        )
        # the URL the SDK settled on: the argument, else OPENAI_BASE_URL, else api.openai.com
        self._official = is_official_host(self._client.base_url.host)

    def complete(self, request: LLMRequest) -> LLMResponse:
        kwargs = request_body(request, official=self._official)
        started = time.monotonic()  # the client's timeout runs from here (timeout_error)
        try:
            # The client's own POST (same transport, headers, errors) with the body as built here:
            # chat.completions.create would first re-walk it against the SDK's TypedDicts, which cost a
            # quarter of a worker's CPU per turn. The answer is read from its JSON directly, not built
            # into the SDK's ChatCompletion first (a third of the SDK's CPU per call).
            http_response = self._client.post(
                "/chat/completions", body=kwargs, cast_to=httpx2.Response, options={}
            )
            return _response_from(json.loads(http_response.content), self._api_key)
        except openai.APIStatusError as exc:
            status = exc.status_code
            headers = status_headers(exc)
            retryable = retryable_status(status, headers)
            if status == 429 and getattr(exc, "code", None) == "insufficient_quota":
                # OpenAI's "You exceeded your current quota": a bill to pay, not a rate to wait out (it
                # was retried for ~20 minutes before the run failed)
                retryable = False
            raise LLMError(
                f"LLM request failed with status {status}: {_short_body(exc, self._api_key)}",
                retryable=retryable,
                status_code=status,
                retry_after_s=retry_after_s(headers),
            ) from exc
        except openai.APITimeoutError as exc:
            # the deadline transport's, or a phase's own timeout: either way, no whole answer in time
            raise timeout_error(started, self._timeout_s) from exc
        except AnswerTooLarge as exc:  # raised through the SDK as it is (openai) ...
            raise LLMError(f"LLM request failed: {exc}", retryable=False) from exc
        except openai.APIConnectionError as exc:
            too_large = answer_too_large(exc)  # ... or as the cause of a connection error (anthropic)
            said = str(too_large) if too_large is not None else unanswered_because(exc)
            raise LLMError(f"LLM request failed: {said}", retryable=too_large is None) from exc
        except openai.OpenAIError as exc:
            raise LLMError(f"LLM request failed: {exc}", retryable=False) from exc
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError, httpx2.HTTPError) as exc:
            # Garbage from the endpoint (invalid UTF-8, not JSON, wrong shape, a body cut short):
            # retry, bounded by max attempts.
            raise LLMError(
                f"LLM returned an unreadable response: {type(exc).__name__}: "
                f"{redact(str(exc), [self._api_key])[:200]}",
                retryable=True,
            ) from exc

    def validate_credentials(self) -> None:
        hint = "" if "v1" in self._client.base_url.path.split("/") else NOT_UNDER_V1
        check_model_list(
            self._client.models.with_raw_response.list, SDK_ERRORS, api_key=self._api_key, not_found_hint=hint
        )


def _short_body(exc: openai.APIStatusError, api_key: str) -> str:
    try:
        text = exc.response.text
    except Exception:  # noqa: BLE001 - the body is only decoration for the message
        text = str(exc)
    # before the cut, which could leave the start of an echoed key that no later redaction recognises
    return redact(text, [api_key])[:500]
