"""Anthropic's Messages API through the official ``anthropic`` package."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import anthropic
from anthropic.types import StopReason

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
from kubechain.redaction import Scrubber, redact
from kubechain.retry_after import retry_after_s

DEFAULT_MAX_TOKENS = 4096


def to_anthropic_messages(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """System prompt apart; assistant tool calls become tool_use blocks, tool results tool_result blocks."""
    system_parts: list[str] = []
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            system_parts.append(message.content)
            continue
        if message.role == "tool":
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id or "",
                "content": message.content,
            }
            if message.is_error:
                block["is_error"] = True  # else the model reads "Error: ..." as what the tool returned
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
            continue
        if message.role == "assistant" and message.tool_calls:
            blocks: list[dict[str, Any]] = []
            if message.content.strip():  # Anthropic refuses a text block of whitespace only
                blocks.append({"type": "text", "text": message.content})
            for call in message.tool_calls:
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except (ValueError, RecursionError):  # not JSON, or nested deeper than json parses
                    arguments = {"_raw": call.function.arguments}
                if not isinstance(arguments, dict):
                    # JSON but no object ("null", "[]", "42", from another provider's turn): Anthropic
                    # takes only an object as a tool_use's input and would refuse the request with a 400
                    arguments = {"_raw": call.function.arguments}
                blocks.append(
                    {"type": "tool_use", "id": call.id, "name": call.function.name, "input": arguments}
                )
            out.append({"role": "assistant", "content": blocks})
            continue
        out.append({"role": message.role, "content": message.content})
    return "\n\n".join(system_parts), out


def without_v1(base_url: str | None) -> str | None:
    """``base_url`` without a trailing /v1: the SDK adds it to every path (/v1/messages), so a baseUrl
    written as OpenAI-compatible ones are (ending in /v1) asked /v1/v1/messages, a 404 on every run."""
    return re.sub(r"/v1/*$", "", base_url) if base_url else base_url


SDK_ERRORS = SDKErrors(
    anthropic.APIStatusError,
    (anthropic.APITimeoutError, anthropic.APIConnectionError),
    anthropic.AnthropicError,
)


# Why a parameter the LLM resource sets is not sent (see sampling_sent; kubechain.llm.base.parameter_notes)
NOT_SENT_BECAUSE = {
    "top_p": "Claude's current models refuse temperature and top_p together (temperature is sent)",
    "frequency_penalty": "Anthropic's API has no penalties",
    "presence_penalty": "Anthropic's API has no penalties",
}


def sampling_sent(request: LLMRequest) -> dict[str, float | int]:
    """The sampling parameters sent, of those the LLM resource sets: not temperature and top_p together
    (Claude's current models refuse the request, "temperature and top_p cannot both be specified for
    this model", which failed every run: temperature is sent), and no penalties (none in the API)."""
    sent = {key: value for key, value in sampling_set(request).items() if key not in NOT_SENT_BECAUSE}
    if request.top_p is not None and request.temperature is None:
        sent["top_p"] = request.top_p
    return sent


class AnthropicClient:
    def __init__(self, api_key: str, timeout_s: float, base_url: str | None = None) -> None:
        self._timeout_s = timeout_s
        self._api_key = api_key
        self._client = anthropic.Anthropic(
            api_key=api_key,
            base_url=without_v1(base_url) or None,
            max_retries=0,
            timeout=timeout_s,
            # timeout_s bounds the whole call, not each read
            http_client=with_deadline(anthropic.DefaultHttpxClient(), timeout_s),
        )

    def complete(self, request: LLMRequest) -> LLMResponse:
        system, messages = to_anthropic_messages(request.messages)
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS,
        }
        if system:
            kwargs["system"] = system
        if request.tools:
            kwargs["tools"] = [
                {"name": tool.name, "description": tool.description, "input_schema": tool.parameters}
                for tool in request.tools
            ]
        # Recent SDKs no longer take sampling parameters as arguments: sent in the body, only those set.
        sampling = sampling_sent(request)
        if sampling:
            kwargs["extra_body"] = sampling
        started = time.monotonic()  # the client's timeout runs from here (timeout_error)
        try:
            return _response_from(self._client.messages.create(**kwargs), self._api_key)
        except anthropic.APIStatusError as exc:
            status = exc.status_code
            headers = status_headers(exc)
            raise LLMError(
                # redacted before the cut, which could leave the start of an echoed key
                f"LLM request failed with status {status}: {redact(str(exc), [self._api_key])[:500]}",
                retryable=retryable_status(status, headers),
                status_code=status,
                retry_after_s=retry_after_s(headers),
            ) from exc
        except anthropic.APITimeoutError as exc:
            # the deadline transport's, or a phase's own timeout: either way, no whole answer in time
            raise timeout_error(started, self._timeout_s) from exc
        except AnswerTooLarge as exc:  # raised through the SDK as it is (openai) ...
            raise LLMError(f"LLM request failed: {exc}", retryable=False) from exc
        except anthropic.APIConnectionError as exc:
            too_large = answer_too_large(exc)  # ... or as the cause of a connection error (anthropic)
            said = str(too_large) if too_large is not None else unanswered_because(exc)
            raise LLMError(f"LLM request failed: {said}", retryable=too_large is None) from exc
        except anthropic.AnthropicError as exc:
            raise LLMError(f"LLM request failed: {exc}", retryable=False) from exc
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            # The SDK does not check the answer's shape: a body of the wrong shape (from a proxy, say)
            # fails here, when it is read.
            said = redact(str(exc), [self._api_key])[:200]  # before the cut, as above
            raise LLMError(
                f"LLM returned an unreadable response: {type(exc).__name__}: {said}", retryable=True
            ) from exc

    def validate_credentials(self) -> None:
        check_model_list(
            lambda: self._client.models.with_raw_response.list(limit=1), SDK_ERRORS, api_key=self._api_key
        )


# The answer stopped at a limit: its last block may have been cut short.
CUT_OFF_AT: frozenset[StopReason] = frozenset({"max_tokens", "model_context_window_exceeded"})


def _response_from(response: Any, api_key: str) -> LLMResponse:
    """An Anthropic message as our response; ``api_key`` is cut out of the text a refusal quotes before
    it is shortened (a gateway may echo the request's headers), which could leave the key's start where
    no later redaction finds it."""
    text: list[str] = []
    calls: list[ToolCall] = []
    stop_reason = getattr(response, "stop_reason", None)
    blocks = response.content
    if stop_reason == "refusal":
        raise _refusal(blocks, getattr(response, "stop_details", None), api_key)
    for index, block in enumerate(blocks):
        if block.type == "text":
            text.append(block.text)
        elif block.type == "tool_use":
            arguments = json.dumps(block.input)
            if stop_reason in CUT_OFF_AT and index == len(blocks) - 1:
                # Its input may lack its end, yet comes as a whole object: left open, as OpenAI's cut-off
                # arguments come, so that the tool call step refuses it (invalid JSON, the LLM is told)
                # instead of running it.
                arguments = arguments[:-1]
            calls.append(
                ToolCall(
                    id=block.id,
                    type="function",
                    function=ToolCallFunction(name=block.name, arguments=arguments),
                )
            )
    # a proxy's counts may be missing or wrong: each is made a non-negative int (token_usage), not
    # taken for an unreadable answer (paid again on every attempt)
    counts = getattr(response, "usage", None)
    usage = (
        token_usage(getattr(counts, "input_tokens", None), getattr(counts, "output_tokens", None))
        if counts is not None
        else None
    )
    return LLMResponse(
        content="".join(text),
        tool_calls=calls,
        usage=usage,
        truncated=stop_reason in CUT_OFF_AT,
        context_window_full=stop_reason == "model_context_window_exceeded",
    )


def _refusal(blocks: Any, details: Any, api_key: str) -> LLMError:
    """A refused answer as OpenAI's is: not retried (the same context is refused again). Its text is what
    came before the model was stopped, not an answer; ``stop_details`` (when sent) says why."""
    said = "".join(block.text for block in blocks if block.type == "text").strip()
    why = ": ".join(
        str(part)
        for part in (getattr(details, "category", None), getattr(details, "explanation", None))
        if part
    )
    # the key cut out before the cuts, which could leave its start where no later redaction finds it
    scrub = Scrubber([api_key])
    said, why = scrub(said), scrub(why)
    reason = f" ({why[:300]})" if why else ""
    return LLMError(f"LLM refused to answer: {said[:500] or 'no text'}{reason}", retryable=False)
