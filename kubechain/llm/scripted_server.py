"""A local, scriptable, OpenAI-compatible chat-completions server.

Used by integration/e2e tests (which script exact answers per test), by benchmarks (thousands of
concurrent slow requests: the server is fully asyncio, delays use ``asyncio.sleep``) and by
``kubechain up`` when no real API key is configured (the default answer is sensible).

Endpoints
---------
* ``POST /v1/chat/completions`` -- OpenAI request/response shape (``Authorization: Bearer`` required).
* ``GET  /v1/models``           -- model list (same auth rules), used for API-key validation.
* ``POST /_admin/script``       -- replace the script (JSON, see :class:`Script`).
* ``GET  /_admin/script``       -- the current script.
* ``GET  /_admin/requests``     -- the request log (JSON list of :class:`RequestRecord`).
* ``GET  /_admin/duplicates``   -- conversation keys requested more than once (successfully).
* ``POST /_admin/reset``        -- clear request log, error counters and script.
* ``GET  /healthz``

Script semantics
----------------
The turn index of a request is the number of ``assistant`` messages already in ``messages``. The first
rule whose ``match`` fits (substring of the first user message / of the system messages, both
case-insensitive; exact model) answers with ``turns[turn]`` (the last entry repeats). Without a
matching rule: if the last message is a tool message the answer is ``"Tool results: ..."``, else the
script's ``default`` turn, else ``"Scripted answer to: {user}"``.

Run standalone: ``python -m kubechain.llm.scripted_server --port 8765 [--script f.json] [--latency 0.5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = [
    "DEFAULT_MODEL",
    "ErrorSpec",
    "Match",
    "RequestRecord",
    "Rule",
    "Script",
    "ScriptedLLMServer",
    "ToolCallSpec",
    "Turn",
    "build_app",
    "conversation_hash",
    "conversation_key",
    "example_from_schema",
    "main",
    "tool_call_id",
]

logger = logging.getLogger("kubechain.llm.scripted_server")

DEFAULT_MODEL = "scripted-model"
DEFAULT_TEMPLATE = "Scripted answer to: {user}"
TOOL_RESULTS_TEMPLATE = "Tool results: {last_tool_results}"
SHUTTING_DOWN = "The scripted LLM server is shutting down."


# --------------------------------------------------------------------------------------------------
# Script models
# --------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Match(_Strict):
    """Conditions of a rule; unset fields match anything."""

    user_contains: str | None = None
    """Case-insensitive substring of the FIRST user message."""
    system_contains: str | None = None
    """Case-insensitive substring of the system (or developer) messages, joined."""
    model: str | None = None
    """Exact requested model name."""


class ToolCallSpec(_Strict):
    name: str
    arguments: dict[str, Any] | None = None
    """JSON-encoded by the server."""
    arguments_raw: str | None = None
    """Sent verbatim (e.g. malformed JSON)."""

    @model_validator(mode="after")
    def _one_kind_of_arguments(self) -> ToolCallSpec:
        if self.arguments is not None and self.arguments_raw is not None:
            raise ValueError("set at most one of 'arguments' and 'arguments_raw'")
        return self

    def encoded_arguments(self) -> str:
        if self.arguments_raw is not None:
            return self.arguments_raw
        return json.dumps(self.arguments if self.arguments is not None else {})


class ErrorSpec(_Strict):
    status: int = 500
    message: str = "scripted error"
    retry_after: float | None = None
    """Seconds; sent as ``Retry-After`` (and ``retry-after-ms``) headers."""
    times: int = Field(default=1, ge=1)
    """How many times the error is returned for one conversation+turn before the turn's ``then``
    (or, without ``then``, the rest of the same turn) is used."""
    type: str | None = None
    """OpenAI error ``type``; derived from the status when unset."""
    code: str | None = None
    """OpenAI error ``code``; derived from the status when unset."""


class Turn(_Strict):
    """One scripted assistant answer. Fields combine: ``content``/``content_template`` may accompany
    ``tool_calls``; ``error`` takes precedence until exhausted; ``delay_s`` applies to any turn."""

    content: str | None = None
    content_template: str | None = None
    """Placeholders: ``{user}``, ``{last_tool_results}``, ``{model}`` (other braces are literal)."""
    tool_calls: list[ToolCallSpec] | None = None
    tool_calls_all_tools: bool = False
    """Call every tool offered in the request once, with minimal valid arguments from its schema."""
    error: ErrorSpec | None = None
    then: Turn | None = None
    """Used once ``error`` has been returned ``error.times`` times."""
    empty: bool = False
    """No content and no tool calls."""
    delay_s: float = Field(default=0.0, ge=0.0)
    finish_reason: str | None = None
    """Override (default: ``tool_calls`` when there are tool calls, else ``stop``)."""

    @model_validator(mode="after")
    def _one_kind_of_content(self) -> Turn:
        if self.content is not None and self.content_template is not None:
            raise ValueError("set at most one of 'content' and 'content_template'")
        return self


class Rule(_Strict):
    match: Match = Field(default_factory=Match)
    turns: list[Turn] = Field(default_factory=list)


class Script(_Strict):
    rules: list[Rule] = Field(default_factory=list)
    default: Turn | None = None
    """Answer when no rule matches (and the last message is not a tool result)."""
    latency_s: float | None = Field(default=None, ge=0.0)
    """Added to every answer; overrides the server's constructor ``latency_s`` when set."""
    hold_until_in_flight: int | None = Field(default=None, ge=1)
    """Answers (after their latency) wait until this many requests have been in flight at once, then all
    go: a benchmark can hold that many runs in flight together, whatever rate they arrive at."""
    hold_max_s: float = Field(default=300.0, ge=0.0)
    """The longest an answer waits for ``hold_until_in_flight`` (then it goes anyway)."""


class RequestRecord(BaseModel):
    """One ``/v1/chat/completions`` request (including rejected ones)."""

    seq: int
    received_at: float
    finished_at: float
    model: str | None
    conversation_key: str
    """sha256 of the JSON of the ``messages`` list, first 16 hex chars."""
    first_user: str | None
    turn: int
    messages_count: int
    tool_names: list[str]
    temperature: float | None
    max_tokens: int | None
    top_p: float | None
    status_code: int
    auth_key_suffix: str | None
    """Last 4 characters of the API key only (never the full key)."""
    rule: int | None = None
    """Index of the matching rule (None: default answer or rejected request)."""
    caller_left_at: float | None = None
    """When its caller closed the connection while the answer waited (its latency, delay or hold): a
    caller that gave up (a deadline, a crash), for whom the request ended then. None: it was there for
    the answer."""


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def conversation_key(messages: Any) -> str:
    """sha256 of the JSON of the whole ``messages`` list (16 hex chars): identifies one LLM call."""
    return hashlib.sha256(_canonical_json(messages).encode()).hexdigest()[:16]


def conversation_hash(messages: Sequence[Any]) -> str:
    """Short (8 hex) hash of the conversation's opening (the messages before the first assistant
    message): stable across the turns of one conversation. Used in tool call ids."""
    opening: list[Any] = []
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "assistant":
            break
        opening.append(message)
    return hashlib.sha256(_canonical_json(opening).encode()).hexdigest()[:8]


def tool_call_id(turn: int, index: int, messages: Sequence[Any]) -> str:
    """Deterministic tool call id: ``call_<turn>_<index>_<conversation_hash>``."""
    return f"call_{turn}_{index}_{conversation_hash(messages)}"


def _text(content: Any) -> str:
    """Text of a message ``content`` (a string or a list of content parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return str(content)


def _messages_of(messages: Sequence[Any]) -> list[dict[str, Any]]:
    return [m for m in messages if isinstance(m, dict)]


def _first_user(messages: Sequence[dict[str, Any]]) -> str | None:
    for message in messages:
        if message.get("role") == "user":
            return _text(message.get("content"))
    return None


def _system_text(messages: Sequence[dict[str, Any]]) -> str:
    return "\n".join(_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))


def _turn_index(messages: Sequence[dict[str, Any]]) -> int:
    return sum(1 for m in messages if m.get("role") == "assistant")


def _last_tool_results(messages: Sequence[dict[str, Any]]) -> str:
    last_assistant = -1
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            last_assistant = i
    return "; ".join(
        _text(m.get("content")) for m in messages[last_assistant + 1 :] if m.get("role") == "tool"
    )


def _tool_names(tools: Any) -> list[str]:
    names: list[str] = []
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                function = tool.get("function")
                if isinstance(function, dict) and isinstance(function.get("name"), str):
                    names.append(function["name"])
    return names


def _render(template: str, *, user: str, last_tool_results: str, model: str) -> str:
    # Plain replacement (not str.format) so that other braces, e.g. JSON, stay literal.
    return (
        template.replace("{user}", user)
        .replace("{last_tool_results}", last_tool_results)
        .replace("{model}", model)
    )


def example_from_schema(schema: Any, _depth: int = 0) -> Any:
    """A minimal value valid for a (simple) JSON schema: ``default``/``const``/``enum``/``examples``
    first, then the smallest value of the type honouring min constraints; objects get their
    ``required`` properties only."""
    if not isinstance(schema, dict) or _depth > 16:
        return {} if _depth == 0 else None
    if "default" in schema:
        return schema["default"]
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    examples = schema.get("examples")
    if isinstance(examples, list) and examples:
        return examples[0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return example_from_schema((non_null or options)[0], _depth + 1)
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and all_of:
        merged: dict[str, Any] = {}
        for part in all_of:
            if isinstance(part, dict):
                for k, v in part.items():
                    if k in ("properties",) and isinstance(v, dict):
                        merged.setdefault("properties", {}).update(v)
                    elif k == "required" and isinstance(v, list):
                        merged.setdefault("required", []).extend(v)
                    else:
                        merged.setdefault(k, v)
        return example_from_schema(merged, _depth + 1)

    schema_type = schema.get("type")
    if isinstance(schema_type, list):
        non_null_types = [t for t in schema_type if t != "null"]
        schema_type = non_null_types[0] if non_null_types else "null"
    if schema_type is None:
        schema_type = "object" if "properties" in schema else None

    if schema_type == "object":
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        assert isinstance(properties, dict) and isinstance(required, list)
        return {name: example_from_schema(properties.get(name, {}), _depth + 1) for name in required}
    if schema_type == "array":
        min_items = int(schema.get("minItems", 0) or 0)
        return [example_from_schema(schema.get("items", {}), _depth + 1) for _ in range(min_items)]
    if schema_type == "string":
        return "x" * int(schema.get("minLength", 0) or 0)
    if schema_type in ("integer", "number"):
        value: float = 0
        minimum, exclusive_minimum, maximum = (
            schema.get("minimum"),
            schema.get("exclusiveMinimum"),
            schema.get("maximum"),
        )
        if isinstance(minimum, int | float):
            value = minimum
        elif isinstance(exclusive_minimum, int | float):
            value = exclusive_minimum + 1
        elif isinstance(maximum, int | float) and maximum < 0:
            value = maximum
        if schema_type == "integer":
            return int(math.ceil(value))
        return value
    if schema_type == "boolean":
        return False
    if schema_type == "null":
        return None
    return {} if _depth == 0 else None


def _default_error_kind(status: int) -> tuple[str, str | None]:
    if status == 400:
        return "invalid_request_error", None
    if status == 401:
        return "invalid_request_error", "invalid_api_key"
    if status == 403:
        return "permission_denied", None
    if status == 404:
        return "invalid_request_error", "model_not_found"
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


def _error_response(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    code: str | None = None,
    retry_after: float | None = None,
) -> JSONResponse:
    default_type, default_code = _default_error_kind(status)
    headers: dict[str, str] = {}
    if retry_after is not None:
        seconds = int(retry_after) if float(retry_after).is_integer() else retry_after
        headers["Retry-After"] = str(seconds)
        headers["retry-after-ms"] = str(int(round(retry_after * 1000)))
    body = {
        "error": {
            "message": message,
            "type": type_ or default_type,
            "param": None,
            "code": code if code is not None else default_code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _approx_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4) if text else 0


# --------------------------------------------------------------------------------------------------
# Server state + ASGI app
# --------------------------------------------------------------------------------------------------


class _State:
    """Script, error counters and request log; thread-safe (the event loop thread writes, the Python
    API and the admin endpoints read)."""

    def __init__(self, script: Script | None, latency_s: float, api_keys: set[str] | None) -> None:
        self.lock = threading.Lock()
        self.script = script or Script()
        self.latency_s = latency_s
        self.api_keys = set(api_keys) if api_keys is not None else None
        self.log: list[RequestRecord] = []
        # Requests being answered right now: seq -> {first_user, turn, received_at}.
        self.inflight: dict[int, dict[str, Any]] = {}
        self.error_counts: Counter[tuple[str, int, int]] = Counter()
        self.seq = 0
        # Set (in the event loop) once hold_until_in_flight requests were in flight together.
        self._held: asyncio.Event | None = None
        self._held_loop: asyncio.AbstractEventLoop | None = None
        # Set (in the event loop) when the server shuts down: pending delays end at once.
        self._stopping: asyncio.Event | None = None
        self._stopping_loop: asyncio.AbstractEventLoop | None = None

    def _stopping_event(self) -> asyncio.Event:
        """The shutdown event of the running loop (only called from the event loop thread)."""
        loop = asyncio.get_running_loop()
        if self._stopping is None or self._stopping_loop is not loop:
            self._stopping = asyncio.Event()
            self._stopping_loop = loop
        return self._stopping

    def begin_shutdown(self) -> None:
        """Wakes up every pending delay (called in the event loop by the server's shutdown)."""
        self._stopping_event().set()

    async def pause(self, seconds: float) -> bool:
        """Sleeps ``seconds`` (without blocking other requests); False if interrupted by shutdown."""
        stopping = self._stopping_event()
        if stopping.is_set():
            return False
        if seconds <= 0:
            return True
        try:
            await asyncio.wait_for(stopping.wait(), timeout=seconds)
        except TimeoutError:
            return True
        return False

    def set_script(self, script: Script | dict[str, Any]) -> None:
        parsed = script if isinstance(script, Script) else Script.model_validate(script)
        with self.lock:
            self.script = parsed
            self.error_counts.clear()
        self._release_held()

    def _release_held(self) -> None:
        """Answers held under the old script go now; a new script holds afresh (from any thread: the
        Event belongs to the event loop)."""
        with self.lock:
            released, loop = self._held, self._held_loop
            self._held = None
        if released is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(released.set)

    def get_script(self) -> Script:
        with self.lock:
            return self.script

    def next_seq(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def record(self, record: RequestRecord) -> None:
        with self.lock:
            self.log.append(record)
            self.inflight.pop(record.seq, None)

    def begin(self, seq: int, first_user: str | None, turn: int, received_at: float) -> None:
        """(event loop thread)"""
        with self.lock:
            self.inflight[seq] = {
                "seq": seq,
                "first_user": first_user,
                "turn": turn,
                "received_at": received_at,
            }
            hold = self.script.hold_until_in_flight
            reached = hold is not None and len(self.inflight) >= hold
        if reached:
            self._held_event().set()

    def _held_event(self) -> asyncio.Event:
        """(event loop thread)"""
        loop = asyncio.get_running_loop()
        with self.lock:
            if self._held is None or self._held_loop is not loop:
                self._held = asyncio.Event()
                self._held_loop = loop
            return self._held

    async def hold(self) -> bool:
        """Waits, if the script says so, until enough requests were in flight at once; False if the
        server shut down meanwhile (event loop thread)."""
        script = self.get_script()
        if script.hold_until_in_flight is None:
            return True
        held = self._held_event()
        stopping = self._stopping_event()
        waits = [asyncio.ensure_future(held.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=script.hold_max_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return not stopping.is_set()

    def in_flight(self) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(entry) for entry in self.inflight.values()]

    def requests(self) -> list[RequestRecord]:
        with self.lock:
            records = list(self.log)
        return sorted((r.model_copy(deep=True) for r in records), key=lambda r: r.seq)

    def duplicates(self, include_errors: bool = False) -> list[str]:
        counts: Counter[str] = Counter()
        for record in self.requests():
            if include_errors or record.status_code == 200:
                counts[record.conversation_key] += 1
        return [key for key, n in counts.items() if n > 1]

    def reset(self) -> None:
        with self.lock:
            self.log.clear()
            self.script = Script()
            self.error_counts.clear()
            self.seq = 0
        self._release_held()

    def effective_latency(self) -> float:
        with self.lock:
            return self.script.latency_s if self.script.latency_s is not None else self.latency_s

    def bump_error(self, key: tuple[str, int, int]) -> int:
        """Increments and returns the number of times the error ``key`` was served before."""
        with self.lock:
            before = self.error_counts[key]
            self.error_counts[key] = before + 1
            return before

    def models(self) -> list[str]:
        with self.lock:
            names = [DEFAULT_MODEL]
            for rule in self.script.rules:
                if rule.match.model and rule.match.model not in names:
                    names.append(rule.match.model)
            return names


def _bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value or None


def _check_auth(state: _State, key: str | None) -> JSONResponse | None:
    if key is None:
        return _error_response(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    if state.api_keys is not None and key not in state.api_keys:
        return _error_response(401, f"Incorrect API key provided: ...{key[-4:]}.", code="invalid_api_key")
    return None


class _Answer:
    def __init__(self, turn: Turn, rule: int | None) -> None:
        self.turn = turn
        self.rule = rule


def _select_turn(script: Script, messages: list[dict[str, Any]], model: str) -> _Answer:
    turn_index = _turn_index(messages)
    first_user = (_first_user(messages) or "").lower()
    system = _system_text(messages).lower()
    for i, rule in enumerate(script.rules):
        m = rule.match
        if m.user_contains is not None and m.user_contains.lower() not in first_user:
            continue
        if m.system_contains is not None and m.system_contains.lower() not in system:
            continue
        if m.model is not None and m.model != model:
            continue
        if not rule.turns:
            break
        return _Answer(rule.turns[min(turn_index, len(rule.turns) - 1)], i)
    if messages and messages[-1].get("role") == "tool":
        return _Answer(Turn(content_template=TOOL_RESULTS_TEMPLATE), None)
    if script.default is not None:
        return _Answer(script.default, None)
    return _Answer(Turn(content_template=DEFAULT_TEMPLATE), None)


class _CallerWatch:
    """Notes when the caller of a request closes its connection, while its answer waits: the request
    ended then for the caller (a worker's call cut short at its deadline, a crash), whatever the log's
    ``finished_at`` says (when the answer was due). Watched only while an answer waits: a task per
    request costs the server time that benchmarks measure."""

    def __init__(self, request: Request) -> None:
        self.left_at: float | None = None
        self._watching = asyncio.ensure_future(self._watch(request))

    async def _watch(self, request: Request) -> None:
        # The request's body is read: uvicorn answers receive() only when the connection closes.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.left_at = time.time()

    def stop(self) -> float | None:
        """When the caller left, if it did; no longer watched from here (the answer is sent)."""
        self._watching.cancel()
        return self.left_at


def build_app(state: _State) -> Starlette:
    """The Starlette app serving ``state``."""

    async def chat_completions(request: Request) -> Response:
        received_at = time.time()
        seq = state.next_seq()
        key = _bearer_key(request)
        body: Any = None
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        raw_messages = body.get("messages") if isinstance(body, dict) else None
        messages = _messages_of(raw_messages) if isinstance(raw_messages, list) else []
        params: dict[str, Any] = body if isinstance(body, dict) else {}
        model = params.get("model") if isinstance(params.get("model"), str) else None
        turn_index = _turn_index(messages)
        conv_key = conversation_key(raw_messages if isinstance(raw_messages, list) else [])
        rule_index: int | None = None
        caller: _CallerWatch | None = None
        state.begin(seq, _first_user(messages), turn_index, received_at)

        def log(status: int) -> None:
            max_tokens = params.get("max_tokens", params.get("max_completion_tokens"))
            state.record(
                RequestRecord(
                    seq=seq,
                    received_at=received_at,
                    finished_at=time.time(),
                    model=model,
                    conversation_key=conv_key,
                    first_user=_first_user(messages),
                    turn=turn_index,
                    messages_count=len(raw_messages) if isinstance(raw_messages, list) else 0,
                    tool_names=_tool_names(params.get("tools")),
                    temperature=_float_or_none(params.get("temperature")),
                    max_tokens=max_tokens if isinstance(max_tokens, int) else None,
                    top_p=_float_or_none(params.get("top_p")),
                    status_code=status,
                    auth_key_suffix=key[-4:] if key else None,
                    rule=rule_index,
                    caller_left_at=caller.stop() if caller is not None else None,
                )
            )

        auth_error = _check_auth(state, key)
        if auth_error is not None:
            log(auth_error.status_code)
            return auth_error
        if not isinstance(body, dict):
            log(400)
            return _error_response(400, "The request body must be a JSON object.")
        if not isinstance(raw_messages, list) or not raw_messages:
            log(400)
            return _error_response(400, "'messages' must be a non-empty array.", code="invalid_messages")
        if params.get("stream"):
            log(400)
            return _error_response(400, "The scripted LLM server does not support stream=true.")

        model_name = model or DEFAULT_MODEL
        script = state.get_script()
        answer = _select_turn(script, messages, model_name)
        rule_index = answer.rule
        turn = answer.turn
        latency = state.effective_latency()
        if latency + turn.delay_s > 0 or turn.error is not None or script.hold_until_in_flight is not None:
            caller = _CallerWatch(request)

        depth = 0
        while turn.error is not None:
            served = state.bump_error((conv_key, turn_index, depth))
            if served < turn.error.times:
                if not await state.pause(latency + turn.delay_s):
                    log(503)
                    return _error_response(503, SHUTTING_DOWN)
                err = turn.error
                log(err.status)
                return _error_response(
                    err.status, err.message, type_=err.type, code=err.code, retry_after=err.retry_after
                )
            turn = turn.then if turn.then is not None else turn.model_copy(update={"error": None})
            depth += 1

        if not await state.pause(latency + turn.delay_s) or not await state.hold():
            log(503)
            return _error_response(503, SHUTTING_DOWN)

        user = _first_user(messages) or ""
        tool_results = _last_tool_results(messages)
        content: str | None = None
        tool_calls: list[dict[str, Any]] = []
        if not turn.empty:
            if turn.content is not None:
                content = turn.content
            elif turn.content_template is not None:
                content = _render(
                    turn.content_template, user=user, last_tool_results=tool_results, model=model_name
                )
            specs: list[tuple[str, str]] = [(c.name, c.encoded_arguments()) for c in turn.tool_calls or []]
            if turn.tool_calls_all_tools:
                for tool in params.get("tools") or []:
                    if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
                        continue
                    function = tool["function"]
                    name = function.get("name")
                    if isinstance(name, str):
                        args = example_from_schema(function.get("parameters") or {"type": "object"})
                        specs.append((name, json.dumps(args if isinstance(args, dict) else {})))
            tool_calls = [
                {
                    "id": tool_call_id(turn_index, i, messages),
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
                for i, (name, arguments) in enumerate(specs)
            ]
            if content is None and not tool_calls:
                # A turn without anything to say (e.g. tool_calls_all_tools without tools).
                content = _render(
                    DEFAULT_TEMPLATE, user=user, last_tool_results=tool_results, model=model_name
                )

        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        finish_reason = turn.finish_reason or ("tool_calls" if tool_calls else "stop")
        prompt_tokens = sum(_approx_tokens(_text(m.get("content"))) for m in messages) + 3 * len(messages)
        completion_tokens = _approx_tokens(content or "") + sum(
            _approx_tokens(c["function"]["name"] + c["function"]["arguments"]) for c in tool_calls
        )
        response = {
            "id": f"chatcmpl-{conv_key}-{seq}",
            "object": "chat.completion",
            "created": int(received_at),
            "model": model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "kubechain-scripted",
        }
        log(200)
        return JSONResponse(response)

    async def models(request: Request) -> Response:
        auth_error = _check_auth(state, _bearer_key(request))
        if auth_error is not None:
            return auth_error
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "kubechain"} for name in state.models()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def admin_set_script(request: Request) -> Response:
        try:
            payload = await request.json()
            state.set_script(Script.model_validate(payload))
        except json.JSONDecodeError as exc:
            return JSONResponse({"error": f"invalid JSON: {exc}"}, status_code=400)
        except ValidationError as exc:
            return JSONResponse({"error": "invalid script", "details": exc.errors(include_url=False)}, 400)
        return JSONResponse({"ok": True})

    async def admin_get_script(request: Request) -> Response:
        return JSONResponse(state.get_script().model_dump(mode="json", exclude_none=True))

    async def admin_requests(request: Request) -> Response:
        return JSONResponse([r.model_dump(mode="json") for r in state.requests()])

    async def admin_duplicates(request: Request) -> Response:
        include_errors = request.query_params.get("include_errors", "").lower() in ("1", "true", "yes")
        return JSONResponse(state.duplicates(include_errors=include_errors))

    async def admin_reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"ok": True})

    async def admin_inflight(request: Request) -> Response:
        return JSONResponse(state.in_flight())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/_admin/script", admin_set_script, methods=["POST"]),
        Route("/_admin/script", admin_get_script, methods=["GET"]),
        Route("/_admin/requests", admin_requests, methods=["GET"]),
        Route("/_admin/duplicates", admin_duplicates, methods=["GET"]),
        Route("/_admin/inflight", admin_inflight, methods=["GET"]),
        Route("/_admin/reset", admin_reset, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    return Starlette(routes=routes)


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# --------------------------------------------------------------------------------------------------
# Server runner
# --------------------------------------------------------------------------------------------------


class _UvicornServer(uvicorn.Server):
    """Signals ``ready`` once listening (or once startup has failed); on shutdown, first ends the
    pending scripted delays (those requests get a 503) so that stopping is fast."""

    def __init__(self, config: uvicorn.Config, state: _State) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._state.begin_shutdown()
        await super().shutdown(sockets=sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _NoDelayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (a C parser: 0.45–0.65 ms of server CPU per chat completion, against
    0.76–0.91 ms with h11) that disables Nagle on every connection. asyncio does so only for sockets
    whose ``proto`` says TCP, which the ones accepted here do not; with Nagle on, each response body
    waited ~40 ms behind its headers for the client's delayed ACK — a delay real LLM APIs do not add."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def _uvicorn_config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=_NoDelayHttpProtocol,
        host=host,
        port=port,
        log_level="warning",
        log_config=None,  # don't reconfigure the host's logging; uvicorn loggers propagate to root
        access_log=False,
        limit_concurrency=None,
        backlog=2048,
        lifespan="off",
        timeout_graceful_shutdown=2,
        timeout_keep_alive=30,
    )


class ScriptedLLMServer:
    """Scripted OpenAI-compatible server running uvicorn in a background thread (own event loop)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        script: Script | None = None,
        latency_s: float = 0.0,
        api_keys: set[str] | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._state = _State(script, latency_s, api_keys)
        self.app = build_app(self._state)
        self._server: _UvicornServer | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts serving; returns once the socket is listening. ``port=0`` picks a free port."""
        if self._thread is not None:
            raise RuntimeError("ScriptedLLMServer already started")
        sock = _bind(self.host, self._requested_port)
        self._socket = sock
        self._port = sock.getsockname()[1]
        server = _UvicornServer(_uvicorn_config(self.app, self.host, self._port), self._state)
        self._server = server
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
                    runner.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                errors.append(exc)
            finally:
                server.ready.set()

        self._thread = threading.Thread(target=run, name=f"scripted-llm-{self._port}", daemon=True)
        self._thread.start()
        server.ready.wait(timeout=30)
        if errors or not server.started:
            self.stop()
            raise RuntimeError(f"scripted LLM server failed to start on {self.host}:{self._port}: {errors}")
        logger.info("scripted LLM server listening on %s", self.base_url)

    def stop(self) -> None:
        """Stops the server (in-flight requests get up to 2 s, then are cancelled)."""
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=5)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        self._server = None
        self._thread = None
        self._socket = None

    def __enter__(self) -> ScriptedLLMServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- info --------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ScriptedLLMServer not started")
        return self._port

    @property
    def url(self) -> str:
        """Root URL (admin endpoints live here), e.g. ``http://127.0.0.1:PORT``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    # -- script / log ------------------------------------------------------------------------------

    def set_script(self, script: Script | dict[str, Any]) -> None:
        self._state.set_script(script)

    @property
    def script(self) -> Script:
        return self._state.get_script()

    def requests(self) -> list[RequestRecord]:
        """The request log, ordered by arrival (``seq``)."""
        return self._state.requests()

    def in_flight(self) -> list[dict[str, Any]]:
        """The requests being answered now (``/_admin/inflight``)."""
        return self._state.in_flight()

    def duplicates(self, include_errors: bool = False) -> list[str]:
        """Conversation keys requested more than once. Only successful (200) requests count unless
        ``include_errors`` (so retries after scripted errors are not duplicates)."""
        return self._state.duplicates(include_errors=include_errors)

    def reset(self) -> None:
        """Clears the request log, the error counters and the script."""
        self._state.reset()


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kubechain.llm.scripted_server",
        description="Scripted OpenAI-compatible chat-completions server (for tests, benchmarks, demos).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--script", type=Path, default=None, help="JSON script file")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        dest="api_keys",
        help="accepted API key (repeatable); default: any non-empty key",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    script = Script.model_validate_json(args.script.read_text()) if args.script else None
    state = _State(script, args.latency, set(args.api_keys) if args.api_keys else None)
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    server = _UvicornServer(_uvicorn_config(build_app(state), args.host, port), state)

    def announce() -> None:
        server.ready.wait()
        if server.started:
            logger.info("scripted LLM server listening on http://%s:%d/v1", host, port)
            sys.stderr.flush()

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


if __name__ == "__main__":
    main()
