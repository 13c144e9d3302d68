"""The Anthropic provider through the official SDK against a local Messages API: mapping both ways."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kubechain.llm.anthropic_provider import AnthropicClient
from kubechain.llm.base import LLMError, LLMRequest, ToolDefinition
from kubechain.models import Message, ToolCall, ToolCallFunction


class FakeAnthropic:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.reply: dict[str, Any] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                owner.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                owner.requests[-1]["_api_key"] = self.headers.get("x-api-key") or self.headers.get(
                    "authorization", ""
                ).removeprefix("Bearer ")
                self._reply(
                    owner.status,
                    owner.reply
                    if owner.status == 200
                    else {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
                )

            def do_GET(self) -> None:  # noqa: N802 - GET /v1/models: the key check
                key = self.headers.get("x-api-key") or self.headers.get("authorization", "").removeprefix(
                    "Bearer "
                )
                ok = key == "sk-ant-good"
                self._reply(
                    200 if ok else 401,
                    {"data": [{"type": "model", "id": "claude-sonnet-4-5"}], "has_more": False}
                    if ok
                    else {
                        "type": "error",
                        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
                    },
                )

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status == 429:
                    self.send_header("retry-after", "3")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    server = FakeAnthropic()
    yield server
    server.server.shutdown()


def test_messages_tools_and_answers_map_both_ways(fake: FakeAnthropic) -> None:
    fake.reply = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "text", "text": "Let me add."},
            {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 1, "b": 2}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 11, "output_tokens": 7},
    }
    client = AnthropicClient("sk-ant-test", 5, fake.url)
    schema = {
        "type": "object",
        "properties": {"a": {"type": "number", "description": "first"}, "b": {"enum": [1, 2]}},
    }
    request = LLMRequest(
        model="claude-x",
        temperature=0.2,
        max_tokens=100,
        tools=[ToolDefinition(name="add", description="Add", parameters=schema)],
        messages=[
            Message(role="system", content="be brief"),
            Message(role="user", content="1+2?"),
            Message(
                role="assistant",
                content="",
                tool_calls=[
                    ToolCall(
                        id="toolu_0", function=ToolCallFunction(name="add", arguments='{"a": 0, "b": 1}')
                    )
                ],
            ),
            Message(role="tool", content="1", tool_call_id="toolu_0"),
        ],
    )
    response = client.complete(request)
    sent = fake.requests[0]
    assert sent["_api_key"] == "sk-ant-test"
    assert sent["system"] == "be brief" and sent["max_tokens"] == 100 and sent["temperature"] == 0.2
    assert sent["tools"] == [{"name": "add", "description": "Add", "input_schema": schema}], (
        "schemas pass through whole"
    )
    assert sent["messages"][1]["content"][0] == {
        "type": "tool_use",
        "id": "toolu_0",
        "name": "add",
        "input": {"a": 0, "b": 1},
    }
    assert sent["messages"][2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": "1"}],
    }
    assert response.content == "Let me add."
    assert response.tool_calls[0].function.name == "add" and json.loads(
        response.tool_calls[0].function.arguments
    ) == {"a": 1, "b": 2}
    assert response.usage is not None and response.usage.total_tokens == 18


def test_rate_limits_are_retryable_with_retry_after(fake: FakeAnthropic) -> None:
    fake.status = 429
    with pytest.raises(LLMError) as caught:
        AnthropicClient("k", 5, fake.url).complete(
            LLMRequest(model="m", messages=[Message(role="user", content="hi")])
        )
    assert caught.value.retryable and caught.value.status_code == 429 and caught.value.retry_after_s == 3.0


@pytest.mark.parametrize(
    "reply",
    [
        {},
        {"content": None, "usage": {"input_tokens": 1, "output_tokens": 1}},
        {"content": "text", "usage": {"input_tokens": 1, "output_tokens": 1}},
    ],
    ids=["empty", "null-content", "string-content"],
)
def test_an_answer_of_the_wrong_shape_is_an_llm_error(fake: FakeAnthropic, reply: dict[str, Any]) -> None:
    """The SDK does not check the answer's shape (a proxy's, say): it must fail as an LLMError, which the
    worker records, not as an exception that escapes the worker after its claim."""
    fake.reply = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", **reply}
    with pytest.raises(LLMError) as caught:
        AnthropicClient("k", 5, fake.url).complete(
            LLMRequest(model="m", messages=[Message(role="user", content="hi")])
        )
    assert "unreadable response" in str(caught.value)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (None, None),
        ({"input_tokens": None, "output_tokens": 1}, (0, 1, 1)),
        ({"input_tokens": -5, "output_tokens": 2}, (0, 2, 2)),
        ({"input_tokens": "7", "output_tokens": 2.5}, (7, 2, 9)),
    ],
    ids=["null-usage", "null-token-count", "negative-token-count", "token-counts-not-ints"],
)
def test_token_counts_a_proxy_gets_wrong_are_made_sane_and_the_answer_kept(
    fake: FakeAnthropic, usage: dict[str, Any] | None, expected: tuple[int, int, int] | None
) -> None:
    """The answer is paid for: counts missing or wrong (a proxy's) were an unreadable answer (paid again
    on every attempt), and a negative one broke its recording. A count is a non-negative int, 0 when
    it is not one."""
    fake.reply = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": usage,
    }
    response = AnthropicClient("k", 5, fake.url).complete(
        LLMRequest(model="m", messages=[Message(role="user", content="hi")])
    )
    assert response.content == "hi"
    got = response.usage
    assert (got and (got.prompt_tokens, got.completion_tokens, got.total_tokens)) == expected


def test_tool_arguments_it_cannot_parse_are_passed_raw() -> None:
    """Not JSON, nested deeper than json parses (RecursionError), or JSON but no object (Anthropic takes
    only an object, and refused the whole request with a 400): the turn still goes out."""
    from kubechain.llm.anthropic_provider import to_anthropic_messages

    for raw in ("{oops", "[" * 100_000, "null", "[1, 2]", "42", '"text"'):
        call = ToolCall(id="c1", type="function", function=ToolCallFunction(name="add", arguments=raw))
        _, messages = to_anthropic_messages([Message(role="assistant", content="", tool_calls=[call])])
        (block,) = messages[0]["content"]
        assert block["input"] == {"_raw": raw}


def test_an_anthropic_key_is_checked_by_listing_models(fake: FakeAnthropic) -> None:
    """The original only checked that the Secret existed: a wrong key was Ready until every run failed."""
    AnthropicClient("sk-ant-good", 5, fake.url).validate_credentials()
    with pytest.raises(LLMError) as raised:
        AnthropicClient("sk-ant-revoked", 5, fake.url).validate_credentials()
    assert str(raised.value) == "invalid API key (status code: 401)" and not raised.value.retryable


@pytest.mark.parametrize("stop_reason", ["max_tokens", "model_context_window_exceeded"])
def test_an_answer_stopped_at_a_limit_says_it_was_cut_off_and_which(
    fake: FakeAnthropic, stop_reason: str
) -> None:
    """One stopped at the model's context window was taken for whole: a FinalAnswer with no Warning."""
    fake.reply = {
        "id": "msg_2",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "The answer is"}],
        "stop_reason": stop_reason,
        "usage": {"input_tokens": 11, "output_tokens": 4096},
    }
    answer = AnthropicClient("sk-ant-test", 5, fake.url).complete(
        LLMRequest(model="claude-x", messages=[Message(role="user", content="hi")])
    )
    assert answer.content == "The answer is" and answer.truncated
    assert answer.context_window_full == (stop_reason == "model_context_window_exceeded")


def _tool_call_step_refuses(call: ToolCall) -> bool:
    """Whether the tool call step would refuse ``call`` before running anything (invalid arguments)."""
    from kubechain.models import LocalObjectReference, TaskRunToolCall
    from kubechain.models.base import ObjectMeta
    from kubechain.models.toolcall import TaskRunToolCallSpec
    from kubechain.statemachines.toolcall import parse_arguments

    toolcall = TaskRunToolCall(
        metadata=ObjectMeta(name="tc"),
        spec=TaskRunToolCallSpec(
            tool_call_id=call.id,
            task_run_ref=LocalObjectReference(name="r"),
            tool_ref=LocalObjectReference(name=call.function.name),
            arguments=call.function.arguments,
        ),
    )
    return parse_arguments(toolcall)[1] is not None


@pytest.mark.parametrize("stop_reason", ["max_tokens", "model_context_window_exceeded"])
def test_a_tool_call_cut_off_at_the_limit_is_never_run(fake: FakeAnthropic, stop_reason: str) -> None:
    """The last block of an answer stopped at a limit may be a tool_use whose input was cut short: like
    OpenAI's cut-off arguments, the tool call step must refuse it (and tell the LLM) rather than run it.
    The calls before it are whole and run."""
    fake.reply = {
        "id": "msg_3",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "text", "text": "Writing both files."},
            {"type": "tool_use", "id": "toolu_1", "name": "write", "input": {"path": "a", "text": "x"}},
            {"type": "tool_use", "id": "toolu_2", "name": "write", "input": {"path": "b"}},
        ],
        "stop_reason": stop_reason,
        "usage": {"input_tokens": 11, "output_tokens": 4096},
    }
    answer = AnthropicClient("sk-ant-test", 5, fake.url).complete(
        LLMRequest(model="claude-x", messages=[Message(role="user", content="hi")])
    )
    whole, cut = answer.tool_calls
    assert json.loads(whole.function.arguments) == {"path": "a", "text": "x"}
    assert not _tool_call_step_refuses(whole)
    assert (cut.id, cut.function.name) == ("toolu_2", "write")
    assert _tool_call_step_refuses(cut)
    assert cut.function.arguments.startswith('{"path": "b"'), "what the LLM sent is kept, left open"


def test_a_tool_call_before_text_at_the_limit_is_whole(fake: FakeAnthropic) -> None:
    """Only the last block can have been cut: a tool_use followed by more output ended on its own."""
    fake.reply = {
        "id": "msg_4",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 1}},
            {"type": "text", "text": "And then"},
        ],
        "stop_reason": "max_tokens",
        "usage": {"input_tokens": 11, "output_tokens": 4096},
    }
    answer = AnthropicClient("sk-ant-test", 5, fake.url).complete(
        LLMRequest(model="claude-x", messages=[Message(role="user", content="hi")])
    )
    assert answer.truncated and not _tool_call_step_refuses(answer.tool_calls[0])


def _refused(fake: FakeAnthropic, content: list[dict[str, Any]], **extra: Any) -> LLMError:
    fake.reply = {
        "id": "msg_5",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": content,
        "stop_reason": "refusal",
        "usage": {"input_tokens": 11, "output_tokens": 3},
        **extra,
    }
    with pytest.raises(LLMError) as raised:
        AnthropicClient("sk-ant-test", 5, fake.url).complete(
            LLMRequest(model="claude-x", messages=[Message(role="user", content="hi")])
        )
    return raised.value


def test_a_refusal_fails_as_openais_does_not_as_an_answer(fake: FakeAnthropic) -> None:
    """stop_reason "refusal": the text is what came before the model was stopped, not an answer."""
    refused = _refused(
        fake,
        [{"type": "text", "text": "Hello.."}],
        stop_details={
            "type": "refusal",
            "category": "cyber",
            "explanation": "This request was declined because it could enable cyber harm.",
        },
    )
    assert not refused.retryable and refused.status_code is None
    assert str(refused) == (
        "LLM refused to answer: Hello.. (cyber: This request was declined because it could enable cyber harm.)"
    )


def test_a_refusal_without_text_or_details_still_says_it_refused(fake: FakeAnthropic) -> None:
    refused = _refused(fake, [])
    assert str(refused) == "LLM refused to answer: no text" and not refused.retryable


def test_a_refusal_with_a_tool_call_runs_nothing_and_its_text_is_cut(fake: FakeAnthropic) -> None:
    refused = _refused(
        fake,
        [
            {"type": "text", "text": "x" * 5000},
            {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 1}},
        ],
    )
    assert str(refused) == "LLM refused to answer: " + "x" * 500 and not refused.retryable


def test_a_failed_tool_calls_result_is_sent_as_an_error() -> None:
    """So the model knows the call failed, rather than reading "Error: ..." as what the tool returned."""
    from kubechain.llm.anthropic_provider import to_anthropic_messages

    call = ToolCall(id="toolu_1", function=ToolCallFunction(name="add", arguments="{}"))
    _, messages = to_anthropic_messages(
        [
            Message(
                role="assistant", content="", tool_calls=[call, call.model_copy(update={"id": "toolu_2"})]
            ),
            Message(role="tool", content="Error: boom", tool_call_id="toolu_1", is_error=True),
            Message(role="tool", content="3", tool_call_id="toolu_2"),
        ]
    )
    assert messages[1]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Error: boom", "is_error": True},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "3"},
    ]


KEY = "sk-ant-api03-0123456789abcdefghijklmnop"


def pieces(text: str, secret: str = KEY) -> list[str]:
    return [secret[i : i + 8] for i in range(len(secret) - 7) if secret[i : i + 8] in text]


def test_a_refusal_quoting_the_key_across_its_cut_keeps_no_piece_of_it(fake: FakeAnthropic) -> None:
    """Its text and its reason were cut before the key was cut out (as the client wrapper does, too
    late): the key's start stayed, in the call's status, an Event and the log."""
    from kubechain.llm.base import without_key

    fake.reply = {
        "id": "msg_6",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "x" * 480 + KEY}],
        "stop_reason": "refusal",
        "stop_details": {"type": "refusal", "category": "cyber", "explanation": "y" * 280 + KEY},
        "usage": {"input_tokens": 11, "output_tokens": 3},
    }
    with pytest.raises(LLMError) as raised:
        AnthropicClient(KEY, 5, fake.url).complete(
            LLMRequest(model="claude-x", messages=[Message(role="user", content="hi")])
        )
    said = str(without_key(raised.value, KEY))
    assert said.startswith("LLM refused to answer: xxx") and not pieces(said), said


def test_an_unreadable_answer_quoting_the_key_across_its_cut_keeps_no_piece_of_it(
    fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubechain.llm.anthropic_provider as provider
    from kubechain.llm.base import without_key

    def unreadable(*_: Any) -> Any:
        raise ValueError("z" * 175 + f"'x-api-key': '{KEY}'")

    monkeypatch.setattr(provider, "_response_from", unreadable)
    fake.reply = {"id": "msg_7", "type": "message", "role": "assistant", "model": "m", "content": []}
    with pytest.raises(LLMError) as raised:
        AnthropicClient(KEY, 5, fake.url).complete(
            LLMRequest(model="m", messages=[Message(role="user", content="hi")])
        )
    said = str(without_key(raised.value, KEY))
    assert "unreadable response" in said and not pieces(said), said


def _sent_sampling(fake: FakeAnthropic, **sampling: Any) -> dict[str, Any]:
    fake.reply = {
        "id": "msg_s",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    AnthropicClient("sk-ant-test", 5, fake.url).complete(
        LLMRequest(model="claude-x", messages=[Message(role="user", content="hi")], **sampling)
    )
    sent = fake.requests[-1]
    return {key: sent[key] for key in ("temperature", "top_p", "top_k") if key in sent}


def test_temperature_and_top_p_together_send_temperature_only(fake: FakeAnthropic) -> None:
    """Claude's current models (Sonnet 4.5, Opus 4.1, ...) answer 400 "temperature and top_p cannot both
    be specified for this model": every run of an LLM setting both failed for good, the LLM Ready."""
    assert _sent_sampling(fake, temperature=0.2, top_p=0.9) == {"temperature": 0.2}
    assert _sent_sampling(fake, top_p=0.9) == {"top_p": 0.9}
    assert _sent_sampling(fake, temperature=0.0) == {"temperature": 0.0}
    assert _sent_sampling(fake) == {}


def test_an_anthropic_llms_top_k_is_sent(fake: FakeAnthropic) -> None:
    """topK was in the CRD (and the README) but never sent. With temperature, as Claude takes them."""
    from kubechain.llm.base import build_request
    from kubechain.models import LLM

    parameters = {
        "model": "claude-x",
        "temperature": "0.2",
        "topP": "0.9",
        "topK": 40,
        "frequencyPenalty": "0.5",
        "presencePenalty": "0.5",
    }
    llm = LLM.model_validate(
        {
            "metadata": {"name": "l", "namespace": "default"},
            "spec": {"provider": "anthropic", "parameters": parameters},
        }
    )
    request = build_request(llm, [Message(role="user", content="hi")], [])
    assert _sent_sampling(fake, **request.model_dump(exclude={"model", "messages", "tools"})) == {
        "temperature": 0.2,
        "top_k": 40,
    }
    sent = fake.requests[-1]
    assert not {"frequency_penalty", "presence_penalty"} & set(sent), "Anthropic has no penalties"


def test_whitespace_only_text_beside_a_tool_call_is_not_replayed() -> None:
    """Anthropic refuses a text block of whitespace only ("text content blocks must contain non-whitespace
    text"): a turn whose tool calls came after "\\n\\n" failed every later request of the run."""
    from kubechain.llm.anthropic_provider import to_anthropic_messages

    call = ToolCall(id="c1", type="function", function=ToolCallFunction(name="add", arguments="{}"))
    for text in ("\n\n", " ", "\t\n "):
        _, messages = to_anthropic_messages([Message(role="assistant", content=text, tool_calls=[call])])
        assert [block["type"] for block in messages[0]["content"]] == ["tool_use"], text
    _, messages = to_anthropic_messages([Message(role="assistant", content=" I'll add.", tool_calls=[call])])
    assert messages[0]["content"][0] == {"type": "text", "text": " I'll add."}
