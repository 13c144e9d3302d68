"""Hostile LLM output never crashes a worker: every case ends in a clear status."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubechain.kube.fake import FakeKubeClient
from kubechain.llm.anthropic_provider import AnthropicClient
from kubechain.llm.base import FUNCTION_NAME, LLMClientFactory, LLMError, LLMRequest, LLMResponse
from kubechain.llm.deadline import ending_by, timeout_error
from kubechain.llm.openai_provider import OpenAIClient
from kubechain.models import LLM, Message, ToolCall, ToolCallFunction
from kubechain.testing.waiting import wait_for
from tests.unit.fakes import FakeLLM, context, create, message
from tests.unit.test_workers_on_fake import validated
from workers.llm_call import llm_call
from workers.prepare import prepare
from workers.tool_call import tool_call

tool_names = st.one_of(
    st.sampled_from(["add", "nope", "srv__tool", "delegate_to_agent__ghost", "x__human_contact_email", ""]),
    st.text(max_size=20),
)
arguments = st.one_of(
    st.sampled_from(['{"a": 1, "b": 2}', "{not json", "[]", "null", '{"a": "x"}', ""]), st.text(max_size=30)
)
calls = st.lists(
    st.builds(
        lambda n, a, i: ToolCall(id=f"c{i}", function=ToolCallFunction(name=n, arguments=a)),
        tool_names,
        arguments,
        st.integers(0, 10**6),
    ),
    max_size=4,
    unique_by=lambda c: c.id,
)
contents = st.one_of(
    st.text(max_size=50), st.just("x" * 200_000), st.just("\ud800 lone surrogate"), st.just("")
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.tuples(contents, calls), second=st.tuples(contents, calls))
def test_any_llm_output_ends_in_a_clear_status(
    first: tuple[str, list[ToolCall]], second: tuple[str, list[ToolCall]]
) -> None:
    kube = FakeKubeClient()
    answers = iter([first, second, ("done", [])])

    def answer(request: LLMRequest) -> LLMResponse:
        content, tool_calls = next(answers, ("done", []))
        return LLMResponse(content=content, tool_calls=tool_calls)

    llm = FakeLLM(answer)
    validated(kube, llm, ["add"])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "go"})
    ctx = context(kube, llm, max_context_window_bytes=150_000)
    for _ in range(6):
        prepare(ctx, message("TaskRun", "r"))
        llm_call(ctx, message("TaskRun", "r"))
        for _, plural, _, name in list(kube.objects):
            if plural == "taskruntoolcalls":
                tool_call(ctx, message("TaskRunToolCall", name))
    status = kube.get_raw("taskruns", "default", "r")["status"]
    assert status["phase"] in ("FinalAnswer", "Failed"), status.get("statusDetail")
    if status["phase"] == "Failed":
        assert status["error"]
    for _, plural, _, name in kube.objects:
        if plural == "taskruntoolcalls":
            call = kube.get_raw("taskruntoolcalls", "default", name)["status"]
            assert call["phase"] in ("Succeeded", "Failed"), call
            assert call["phase"] == "Succeeded" or call["error"]


class RawLLM:
    """An HTTP server answering chat completions with whatever bytes a test wants."""

    def __init__(self) -> None:
        self.body = b""
        self.trickle_s = 0.0  # > 0: send the body a byte at a time, this far apart
        self.headers_after_s = 0.0  # a pause before the answer's headers
        self.sent_in_full = 0
        self.left_before_first_byte = 0  # answers whose client had hung up before its body began
        self.left_before_headers = 0  # answers (delayed by headers_after_s) whose client had hung up first
        self.left_at_byte: dict[bytes, int] = {}  # per body: the byte before which its client was gone
        self.requests: list[bytes] = []  # the request bodies, in order
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _client_left(self) -> bool:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

            def do_POST(self) -> None:  # noqa: N802
                body = owner.body  # this answer's, whatever a later test sets meanwhile
                owner.requests.append(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(owner.headers_after_s)
                if owner.headers_after_s and self._client_left():
                    owner.left_before_headers += 1
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not owner.trickle_s:
                    self.wfile.write(body)
                    return
                try:
                    for i in range(len(body)):
                        if i == 0:
                            time.sleep(owner.trickle_s)
                            if self._client_left():
                                owner.left_before_first_byte += 1
                                return
                        elif self._client_left():
                            owner.left_at_byte[body] = i
                            return
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(owner.trickle_s)
                except BrokenPipeError:
                    return  # the client gave up
                owner.sent_in_full += 1

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A connection reset between select() and accept() would leave a blocking accept() waiting for
        # ever, and shutdown() with it (seen once in the unit tier): a timeout hands control back.
        self.server.socket.settimeout(1.0)
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def raw_llm() -> Iterator[RawLLM]:
    server = RawLLM()
    yield server
    server.server.shutdown()


def completion(message: dict) -> bytes:
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
    ).encode()


UNREADABLE = "LLM returned an unreadable response: "


@pytest.mark.parametrize(
    ("body", "error", "retryable", "answer"),
    [
        pytest.param(
            json.dumps(
                {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}
            ).encode(),
            "LLM returned no completion choices",
            True,  # as the original: a gateway's hiccup; retried, bounded by the attempts
            None,
            id="empty-choices",
        ),
        pytest.param(
            json.dumps({"error": {"message": "upstream overloaded", "type": "server_error"}}).encode(),
            "LLM returned no completion choices: upstream overloaded",
            True,
            None,
            id="error-object-with-200",
        ),
        pytest.param(
            b'{"choices": [{"message": {"role": "assistant", "content": "caf\xe9 \xff\xfe"}}]}',
            UNREADABLE + "UnicodeDecodeError: ",
            True,  # garbage from the endpoint: retried, bounded by the attempts
            None,
            id="invalid-utf8",
        ),
        pytest.param(b"this is not json", UNREADABLE + "JSONDecodeError: ", True, None, id="not-json"),
        pytest.param(b"", UNREADABLE + "JSONDecodeError: ", True, None, id="empty-body"),
        pytest.param(
            completion(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "1", "type": "function", "function": {"name": "add", "arguments": "{oops"}}
                    ],
                }
            ),
            None,
            None,
            # a well-formed completion: its broken arguments are the tool call's to report, verbatim
            LLMResponse(
                content="",
                tool_calls=[
                    ToolCall(
                        id="1", type="function", function=ToolCallFunction(name="add", arguments="{oops")
                    )
                ],
            ),
            id="malformed-arguments",
        ),
        pytest.param(
            b"[" * 100_000 + b"]" * 100_000, UNREADABLE + "RecursionError: ", True, None, id="deeply-nested"
        ),
        pytest.param(
            completion(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm"},
                        {"type": "text", "text": "The answer "},
                        {"type": "text", "text": "is 4."},
                    ],
                }
            ),
            None,
            None,
            LLMResponse(content="The answer is 4."),
            id="content-as-parts",
        ),
        pytest.param(
            json.dumps(
                {
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "The answer is"},
                            "finish_reason": "length",
                        }
                    ]
                }
            ).encode(),
            None,
            None,
            LLMResponse(content="The answer is", truncated=True),
            id="cut-off-at-the-token-limit",
        ),
        pytest.param(
            json.dumps(
                {
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "The answer is"},
                            "finish_reason": "content_filter",
                        }
                    ]
                }
            ).encode(),
            None,
            None,
            # stopped by OpenAI's (or Azure's) content filter: what came may be cut off, as at a limit
            LLMResponse(content="The answer is", truncated=True, content_filtered=True),
            id="stopped-by-the-content-filter",
        ),
        pytest.param(
            completion({"role": "assistant", "content": None, "refusal": "I can't help with that."}),
            "LLM refused to answer: I can't help with that.",
            False,  # asking again gets the same answer
            None,
            id="refusal",
        ),
    ],
)
def test_provider_client_turns_garbage_into_errors_or_answers(
    raw_llm: RawLLM, body: bytes, error: str | None, retryable: bool | None, answer: LLMResponse | None
) -> None:
    raw_llm.body = body
    client = OpenAIClient("sk-test", 5, raw_llm.url)
    request = LLMRequest(model="m", messages=[Message(role="user", content="hi")])
    if error is None:
        assert client.complete(request) == answer
        return
    with pytest.raises(LLMError) as raised:
        client.complete(request)
    assert str(raised.value).startswith(error), str(raised.value)
    assert raised.value.retryable is retryable
    assert raised.value.status_code is None


def test_provider_client_reads_answers_tool_calls_and_usage(raw_llm: RawLLM) -> None:
    """The completion's JSON maps onto our response: content, function tool calls (a custom tool call,
    which has no function, is not ours to run), token counts; a tool-call turn's null content is ""."""
    raw_llm.body = json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "add", "arguments": '{"a": 1}'},
                            },
                            {"id": "c2", "type": "custom", "custom": {"name": "grammar", "input": "x"}},
                            {"id": "c3", "function": {"name": "srv__tool"}},
                        ],
                    },
                }
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }
    ).encode()
    client = OpenAIClient("sk-test", 5, raw_llm.url)
    response = client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    assert response.content == ""
    assert response.tool_calls == [
        ToolCall(id="c1", type="function", function=ToolCallFunction(name="add", arguments='{"a": 1}')),
        ToolCall(id="c3", type="function", function=ToolCallFunction(name="srv__tool", arguments="")),
    ]
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (7, 3)
    assert response.usage.total_tokens == 10

    raw_llm.body = completion({"role": "assistant", "content": "The answer is 42."})
    response = client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    assert (response.content, response.tool_calls, response.usage) == ("The answer is 42.", [], None)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"prompt_tokens": -1, "completion_tokens": 3, "total_tokens": 2}, (0, 3, 2)),
        ({"prompt_tokens": "12", "completion_tokens": None}, (12, 0, 12)),
        ({"prompt_tokens": 4.0, "completion_tokens": True, "total_tokens": float("nan")}, (4, 0, 4)),
        ({"prompt_tokens": 10**400, "completion_tokens": 1}, (2**53 - 1, 1, 2**53 - 1)),
        ("lots", None),
    ],
    ids=["negative", "string-and-null", "float-bool-nan", "huge", "not-an-object"],
)
def test_token_counts_an_openai_compatible_server_gets_wrong_are_made_sane_and_the_answer_kept(
    counts: object, expected: tuple[int, int, int] | None
) -> None:
    """A count below 0 reached a Prometheus counter, which raised after the answer was paid for: the
    answer was lost and the LLM paid again once the claim expired. A count is a non-negative int (0
    when it is not one), and usage that is no object at all is no usage."""
    from kubechain.llm.openai_provider import _response_from

    body = json.loads(completion({"role": "assistant", "content": "hi"})) | {"usage": counts}
    response = _response_from(body, "sk-test")
    assert response.content == "hi"
    got = response.usage
    assert (got and (got.prompt_tokens, got.completion_tokens, got.total_tokens)) == expected


def test_tool_calls_without_an_id_or_with_object_arguments_get_an_id_and_json_arguments(
    raw_llm: RawLLM,
) -> None:
    """Gemini's OpenAI-compatible endpoint, llama.cpp and LM Studio send no id or an empty one, some send
    the arguments as an object. Such an answer was taken for garbage (paid for again on every attempt) or,
    with an empty id, its tools ran and the next request, naming no call in its tool messages, was refused."""
    calls = [
        {"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}},
        {"id": "", "type": "function", "function": {"name": "add", "arguments": {"a": 2}}},
        {"id": None, "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}},
    ]
    raw_llm.body = completion({"role": "assistant", "content": None, "tool_calls": calls})
    client = OpenAIClient("sk-test", 5, raw_llm.url)
    first = client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    ids = [call.id for call in first.tool_calls]
    assert all(ids) and len(set(ids)) == 3, "every call named, and told apart"
    assert [call.function.arguments for call in first.tool_calls] == ['{"a": 1}', '{"a": 2}', '{"a": 1}']
    again = client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    assert [call.id for call in again.tool_calls] == ids, "the same answer, the same ids"
    # the next request's tool messages name the calls they answer
    window = [
        Message(role="user", content="hi"),
        Message(role="assistant", content="", tool_calls=first.tool_calls),
        *[Message(role="tool", content="3", tool_call_id=call_id) for call_id in ids],
    ]
    client.complete(LLMRequest(model="m", messages=window))
    sent = json.loads(raw_llm.requests[-1])["messages"]
    assert [m["id"] for m in sent[1]["tool_calls"]] == ids
    assert [m["tool_call_id"] for m in sent[2:]] == ids


@pytest.mark.parametrize("client_class", [OpenAIClient, AnthropicClient])
def test_an_endpoint_that_cannot_be_reached_is_named_with_why(
    client_class: type[OpenAIClient] | type[AnthropicClient],
) -> None:
    """The SDKs say only "Connection error.": a run's error and an LLM's validation said no more, neither
    which URL nor what failed (refused, a name that does not resolve, a certificate not trusted)."""
    base_url = "http://user:pa55word@127.0.0.1:1/v1"  # nothing listens on port 1
    client = client_class("sk-test", 5, base_url)
    with pytest.raises(LLMError) as call:
        client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    with pytest.raises(LLMError) as check:
        client.validate_credentials()
    for error, path in ((call.value, "/v1/chat/completions"), (check.value, "/v1/models")):
        if client_class is AnthropicClient:
            path = path.replace("chat/completions", "messages")
        assert "Connection refused" in str(error) and f"http://127.0.0.1:1{path}" in str(error), str(error)
        assert "pa55word" not in str(error)
    assert call.value.retryable and check.value.retryable


def test_a_tool_call_without_an_id_whose_arguments_hold_a_lone_surrogate_is_read(raw_llm: RawLLM) -> None:
    """A broken emoji ("\\ud83d" escaped in the JSON) in an id-less call's arguments: making up its id
    raised UnicodeEncodeError, taken for an unreadable answer and paid for again up to llmMaxAttempts
    times, though the surrogate is cleaned where the answer is recorded (as for a call with an id)."""
    raw_llm.body = (
        b'{"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", '
        b'"content": null, "tool_calls": [{"type": "function", "function": {"name": "note", '
        b'"arguments": "{\\"text\\": \\"hi \\ud83d\\"}"}}]}}]}'
    )
    client = OpenAIClient("sk-test", 5, raw_llm.url)
    (call,) = client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")])).tool_calls
    assert call.function.arguments == '{"text": "hi \ud83d"}'  # cleaned where the answer is recorded
    assert call.id.startswith("call_") and call.id.isascii()


@pytest.mark.slow
@pytest.mark.parametrize("client_class", [OpenAIClient, AnthropicClient])
def test_an_answer_trickling_in_past_the_timeout_ends_the_call_at_the_timeout(
    raw_llm: RawLLM, client_class: type[OpenAIClient] | type[AnthropicClient]
) -> None:
    """httpx's timeouts bound each read: a byte every 50 ms never trips one, and the call would outlast its
    claim (another worker would make it again)."""
    raw_llm.body = completion({"role": "assistant", "content": "slow"})  # ~150 bytes: ~7 s at this pace
    raw_llm.trickle_s = 0.05
    try:
        client = client_class("sk-test", 1, raw_llm.url if client_class is OpenAIClient else raw_llm.url[:-3])
        with pytest.raises(LLMError) as raised:
            client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
        assert "no complete answer within 1s" in str(raised.value) and raised.value.retryable
        assert not raised.value.cut_short, "the LLM's own timeout: an attempt that counts"
        assert raw_llm.sent_in_full == 0, "the call ended before the server finished its answer"
    finally:
        raw_llm.trickle_s = 0.0


def test_openai_itself_gets_max_completion_tokens_and_compatible_servers_max_tokens() -> None:
    """OpenAI's reasoning models refuse max_tokens: every run of an LLM with maxTokens failed with a 400."""
    from kubechain.llm.openai_provider import request_body

    request = LLMRequest(model="gpt-4o", messages=[Message(role="user", content="hi")], max_tokens=64)
    assert request_body(request, official=True)["max_completion_tokens"] == 64
    assert "max_tokens" not in request_body(request, official=True)
    assert request_body(request, official=False)["max_tokens"] == 64
    assert (
        OpenAIClient("sk", 5, None)._official and OpenAIClient("sk", 5, "https://api.openai.com/v1")._official
    )
    assert not OpenAIClient("sk", 5, "http://vllm.local:8000/v1")._official


def _sent_through_the_sdk(base_url: str, model: str, request: LLMRequest | None = None) -> dict[str, Any]:
    """The body OpenAIClient's SDK posts to ``base_url`` (a MockTransport answers it) for ``request``, by
    default one for ``model`` with a token limit."""
    import httpx2

    sent: list[dict[str, Any]] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return httpx2.Response(200, content=completion({"role": "assistant", "content": "ok"}))

    client = OpenAIClient("sk", 5, base_url)
    client._client._client = httpx2.Client(transport=httpx2.MockTransport(answer))
    client.complete(
        request or LLMRequest(model=model, messages=[Message(role="user", content="hi")], max_tokens=64)
    )
    return sent[0]


@pytest.mark.parametrize(
    ("base_url", "model", "field"),
    [
        ("https://api.openai.com/v1", "gpt-4o", "max_completion_tokens"),
        # OpenAI's regional data residency hosts, and Azure OpenAI (its v1 API): o-series and gpt-5 models
        # there refused max_tokens, failing every run of an LLM with maxTokens
        ("https://eu.api.openai.com/v1", "o3", "max_completion_tokens"),
        ("https://us.api.openai.com/v1", "gpt-5", "max_completion_tokens"),
        ("https://my-resource.openai.azure.com/openai/v1", "o4-mini", "max_completion_tokens"),
        # Azure's deployments have names of their own: the host must tell (Foundry, US Gov, China)
        ("https://my-resource.cognitiveservices.azure.com/openai/v1", "prod-chat", "max_completion_tokens"),
        ("https://my-resource.openai.azure.us/openai/v1", "prod-chat", "max_completion_tokens"),
        ("https://my-resource.openai.azure.cn/openai/v1", "prod-chat", "max_completion_tokens"),
        # a fine-tune of a reasoning model, and names in capitals
        ("https://gateway.corp/v1", "ft:o4-mini-2025-04-16:org::abc123", "max_completion_tokens"),
        ("https://gateway.corp/v1", "GPT-5", "max_completion_tokens"),
        ("https://gateway.corp/v1", "ft:gpt-4o-2024-08-06:org::abc123", "max_tokens"),
        # a gateway in front of OpenAI passes the body on: a reasoning model's name says what it takes
        ("https://gateway.corp/v1", "o3-mini", "max_completion_tokens"),
        ("https://gateway.corp/v1", "openai/gpt-5.1", "max_completion_tokens"),
        ("https://gateway.corp/v1", "o1", "max_completion_tokens"),
        ("http://vllm.local:8000/v1", "meta-llama/Llama-3.1-8B-Instruct", "max_tokens"),
        ("http://vllm.local:8000/v1", "gpt-oss-20b", "max_tokens"),
        ("http://vllm.local:8000/v1", "gpt-4o", "max_tokens"),
        ("https://notapi.openai.com.evil.example/v1", "gpt-4o", "max_tokens"),
        ("https://openai.azure.com.example/v1", "gpt-4o", "max_tokens"),
    ],
)
def test_openai_hosts_and_reasoning_models_get_max_completion_tokens(
    base_url: str, model: str, field: str
) -> None:
    body = _sent_through_the_sdk(base_url, model)
    other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
    assert body[field] == 64 and other not in body, body


@pytest.mark.slow
def test_a_stall_just_short_of_the_read_timeout_before_the_body_ends_at_the_deadline(raw_llm: RawLLM) -> None:
    """Headers at 0.6 s, then 0.9 s before the first byte: each wait is under the 1 s read timeout, so
    the call used to run until the first byte (1.5 s) and only then see its deadline had passed."""
    raw_llm.body = completion({"role": "assistant", "content": "slow"})
    raw_llm.headers_after_s, raw_llm.trickle_s = 0.6, 0.9
    try:
        with pytest.raises(LLMError, match="no complete answer within 1s"):
            OpenAIClient("sk-test", 1, raw_llm.url).complete(
                LLMRequest(model="m", messages=[Message(role="user", content="hi")])
            )
        wait_for(lambda: raw_llm.left_before_first_byte == 1, 10, what="the server to find the client gone")
    finally:
        raw_llm.headers_after_s, raw_llm.trickle_s = 0.0, 0.0


@pytest.mark.slow
@pytest.mark.parametrize("client_class", [OpenAIClient, AnthropicClient])
def test_a_stall_after_the_first_byte_ends_at_the_deadline_not_a_read_timeout_later(
    raw_llm: RawLLM, client_class: type[OpenAIClient] | type[AnthropicClient]
) -> None:
    """A byte at 0.9 s, the next at 1.8 s: each wait is under the read timeout (fixed at ~1 s when the body
    began), so the call used to wait for the second byte, past its deadline, before it could see it had
    passed; a call may run past its claim that way, and another worker make it again. The connection is
    now shut at the deadline: the server finds its client gone before the second byte."""
    body = raw_llm.body = completion({"role": "assistant", "content": "stalls after its first byte"})
    raw_llm.trickle_s = 0.9
    try:
        client = client_class("sk-test", 1, raw_llm.url if client_class is OpenAIClient else raw_llm.url[:-3])
        with pytest.raises(LLMError, match="no complete answer within 1s"):
            client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
        wait_for(lambda: body in raw_llm.left_at_byte, 10, what="the server to find the client gone")
        assert raw_llm.left_at_byte.pop(body) == 1
    finally:
        raw_llm.trickle_s = 0.0


def test_the_deadline_client_keeps_the_sdks_proxies_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a transport of its own, httpx ignores HTTPS_PROXY: every call from behind a proxy failed."""
    from kubechain.llm.deadline import DeadlineTransport

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    for client in (OpenAIClient("sk", 5, None), AnthropicClient("sk", 5, None)):
        http = client._client._client
        assert http._mounts, "a proxy mount, as the SDK's own client has"
        assert all(isinstance(t, DeadlineTransport) for t in [http._transport, *http._mounts.values()])


def test_openai_is_told_by_the_url_the_sdk_uses_which_may_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://vllm.local:8000/v1")
    assert not OpenAIClient("sk", 5, None)._official


@pytest.mark.parametrize("client_class", [OpenAIClient, AnthropicClient])
def test_an_answer_over_the_size_limit_is_not_read_further_nor_retried(
    raw_llm: RawLLM, client_class: type[OpenAIClient] | type[AnthropicClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer is read whole into memory: hundreds of MB from whatever endpoint an LLM resource names
    would take the worker (and every call in flight on it) down, and a retry would get the same again."""
    import kubechain.llm.deadline as deadline

    monkeypatch.setattr(deadline, "MAX_ANSWER_BYTES", 64)
    raw_llm.body = completion({"role": "assistant", "content": "x" * 200})
    client = client_class("sk-test", 5, raw_llm.url if client_class is OpenAIClient else raw_llm.url[:-3])
    with pytest.raises(LLMError) as raised:
        client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    assert "the answer is over 64 bytes; it was not read further" in str(raised.value)
    assert not raised.value.retryable


@pytest.mark.slow
def test_an_exhausted_quota_is_not_retried_but_a_rate_limit_is() -> None:
    """OpenAI answers both with 429; "insufficient_quota" does not clear by waiting (it was retried for
    ~20 minutes before the run failed)."""
    from tests.unit.http_stub import StubAnswer, StubHTTPServer

    def body(code: str, message: str) -> bytes:
        return json.dumps({"error": {"message": message, "type": code, "code": code}}).encode()

    answers = {
        "quota": body("insufficient_quota", "You exceeded your current quota"),
        "rate": body("rate_limit_exceeded", "Rate limit reached"),
    }
    for case, retryable in (("quota", False), ("rate", True)):
        with StubHTTPServer(
            lambda _, case=case: StubAnswer(429, answers[case], {"Content-Type": "application/json"})
        ) as server:
            client = OpenAIClient("sk-test", 5, f"{server.url}/v1")
            with pytest.raises(LLMError) as failed:
                client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
        assert failed.value.retryable is retryable, case
        assert failed.value.status_code == 429


@pytest.mark.slow
@pytest.mark.parametrize("client_class", [OpenAIClient, AnthropicClient])
@pytest.mark.parametrize("status", [400, 401, 500])
def test_an_endpoint_that_echoes_the_api_key_does_not_put_it_in_the_error(
    client_class: type[OpenAIClient] | type[AnthropicClient], status: int
) -> None:
    """The error text becomes the run's status.error, a Warning Event and a log line. Gateways and debug
    proxies echo the request's headers into error bodies; the key must not ride along, not even the part
    of it before the 500-character cut."""
    from tests.unit.http_stub import StubAnswer, StubHTTPServer

    key = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"

    def echo(request: Any) -> StubAnswer:
        headers = {name.lower(): value for name, value in request.headers.items()}
        sent = headers.get("authorization") or headers.get("x-api-key") or ""
        # the key straddles the cut at 500 characters, and comes again in full after it
        message = "x" * 440 + f" you sent {sent}; again: {sent}"
        body = {"error": {"message": message, "type": "invalid_request_error"}}
        return StubAnswer(status, json.dumps(body).encode())

    with StubHTTPServer(echo) as server:
        base = f"{server.url}/v1" if client_class is OpenAIClient else server.url
        provider = "openai" if client_class is OpenAIClient else "anthropic"
        llm = LLM.model_validate(
            {
                "metadata": {"name": "echo", "namespace": "default"},
                "spec": {
                    "provider": provider,
                    "apiKeyFrom": {"secretKeyRef": {"name": "k", "key": "k"}},
                    "parameters": {"model": "m", "baseUrl": base},
                },
            }
        )
        client = LLMClientFactory(5).for_llm(llm, key)  # as the workers get their clients
        with pytest.raises(LLMError) as failed:
            client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    assert server.requests, "the stub was never asked"
    texts = []
    error: BaseException | None = failed.value
    while error is not None:  # the chained exceptions too: a logged traceback prints them
        texts.append(str(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    leaked = [key[i : i + 8] for i in range(len(key) - 7) if any(key[i : i + 8] in t for t in texts)]
    assert "you sent" in texts[0] and not leaked, texts


def test_a_200_answer_without_choices_whose_error_echoes_the_api_key_does_not_put_it_in_the_error() -> None:
    """Gateways answer 200 with no choices and an error object during an upstream hiccup; one that echoes
    the request's headers there put the key's start in the error: it was cut to 300 characters before
    the client's wrapper cut the key out."""
    from tests.unit.http_stub import StubAnswer, StubHTTPServer

    key = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"

    def echo(request: Any) -> StubAnswer:
        sent = {name.lower(): value for name, value in request.headers.items()}.get("authorization", "")
        message = "x" * 250 + f" upstream refused {sent}"  # the key straddles the cut at 300 characters
        return StubAnswer(200, json.dumps({"error": {"message": message}}).encode())

    with StubHTTPServer(echo) as server:
        llm = LLM.model_validate(
            {
                "metadata": {"name": "echo", "namespace": "default"},
                "spec": {
                    "provider": "openai",
                    "apiKeyFrom": {"secretKeyRef": {"name": "k", "key": "k"}},
                    "parameters": {"model": "m", "baseUrl": f"{server.url}/v1"},
                },
            }
        )
        client = LLMClientFactory(5).for_llm(llm, key)
        with pytest.raises(LLMError) as failed:
            client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    text = str(failed.value)
    leaked = [key[i : i + 8] for i in range(len(key) - 7) if key[i : i + 8] in text]
    assert "no completion choices" in text and failed.value.retryable and not leaked, text


def test_a_timeout_is_put_down_to_the_claim_only_when_its_deadline_came_before_the_clients_own() -> None:
    """Only a call its claim's deadline (ending_by) ended, sooner than the LLM client's own timeout would
    have, is cut short: its attempt is not counted. One the client's timeout ended first is the LLM's."""
    started = time.monotonic()
    assert not timeout_error(started, 30).cut_short, "no deadline: the client's own timeout"
    with ending_by(started):
        cut = timeout_error(started, 30)
    assert cut.cut_short and cut.retryable and "claim on the call ran out" in str(cut)
    long_ago = time.monotonic() - 31
    with ending_by(long_ago + 30.5):  # passed, but after the client's 30 s had ended the request
        own = timeout_error(long_ago, 30)
    assert not own.cut_short and "no complete answer within 30s" in str(own)
    with ending_by(time.monotonic() + 60):
        assert not timeout_error(time.monotonic(), 30).cut_short, "the deadline is still to come"


@pytest.mark.slow
@pytest.mark.parametrize("client_class", [OpenAIClient, AnthropicClient])
def test_a_call_ends_when_its_claim_runs_out_though_its_client_would_wait_longer(
    raw_llm: RawLLM, client_class: type[OpenAIClient] | type[AnthropicClient]
) -> None:
    """A worker acts on a claim whose write was answered late; the call under it must end while the claim
    holds (ending_by), though the client's own timeout (30 s) would wait for this answer (headers at 2 s)."""
    raw_llm.body = completion({"role": "assistant", "content": "too late"})
    raw_llm.headers_after_s = 2.0
    try:
        client = client_class(
            "sk-test", 30, raw_llm.url if client_class is OpenAIClient else raw_llm.url[:-3]
        )
        request = LLMRequest(model="m", messages=[Message(role="user", content="hi")])
        with (
            ending_by(time.monotonic() + 0.3),
            pytest.raises(LLMError, match="claim on the call ran out") as failed,
        ):
            client.complete(request)
        assert failed.value.cut_short, (
            "the claim's time ended it, not the LLM's: the run's statusDetail says so"
        )
        # ended at the deadline, not when the headers came: the server finds its client gone before then
        wait_for(lambda: raw_llm.left_before_headers == 1, 10, what="the server to find the client gone")
    finally:
        raw_llm.headers_after_s = 0.0


ALL_PARAMETERS = {
    "model": "m",
    "temperature": "0.2",
    "maxTokens": 64,
    "topP": "0.9",
    "topK": 40,
    "frequencyPenalty": "0.5",
    "presencePenalty": "-1.5",
}


def _llm(provider: str, parameters: dict[str, Any]) -> LLM:
    return LLM.model_validate(
        {
            "metadata": {"name": "l", "namespace": "default"},
            "spec": {"provider": provider, "parameters": parameters},
        }
    )


def test_an_openai_llms_penalties_are_sent() -> None:
    """frequencyPenalty and presencePenalty were in the CRD (and the README) but never sent."""
    from kubechain.llm.base import build_request

    request = build_request(_llm("openai", ALL_PARAMETERS), [Message(role="user", content="hi")], [])
    body = _sent_through_the_sdk("http://vllm.local:8000/v1", "m", request)
    sent = {
        key: body.get(key)
        for key in ("temperature", "max_tokens", "top_p", "frequency_penalty", "presence_penalty")
    }
    assert sent == {
        "temperature": 0.2,
        "max_tokens": 64,
        "top_p": 0.9,
        "frequency_penalty": 0.5,
        "presence_penalty": -1.5,
    }
    assert "top_k" not in body, "OpenAI's API has no top_k: validation says it is not sent"
    plain = _sent_through_the_sdk("http://vllm.local:8000/v1", "m", build_request(_llm("openai", {}), [], []))
    assert not {"frequency_penalty", "presence_penalty", "top_k"} & set(plain)


@pytest.mark.parametrize(
    "model", ["gpt-5-mini", "gpt-5.1", "o1", "o3-mini", "o4-mini", "openai/o3", "ft:gpt-5:acme::x"]
)
def test_an_openai_reasoning_model_is_sent_no_sampling_parameters_and_validation_says_so(model: str) -> None:
    """OpenAI's reasoning models refuse temperature (other than 1), top_p and the penalties ("Unsupported
    value: 'temperature' does not support 0.2 with this model", 400): every run of such an LLM failed,
    and its validation had said nothing."""
    from kubechain.llm.base import build_request, parameter_notes

    llm = _llm("openai", ALL_PARAMETERS | {"model": model})
    body = _sent_through_the_sdk("https://api.openai.com/v1", model, build_request(llm, [], []))
    assert not {"temperature", "top_p", "top_k", "frequency_penalty", "presence_penalty"} & set(body)
    assert body["max_completion_tokens"] == 64
    assert parameter_notes(llm) == [
        "temperature and topP and frequencyPenalty and presencePenalty are not sent: OpenAI's reasoning models "
        "(o1, o3, o4-mini, gpt-5, ...) refuse sampling parameters",
        "topK is not sent: OpenAI's API has no top_k",
    ]


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-5-chat-latest", "gpt-4.1-mini"])
def test_an_openai_model_that_samples_is_sent_its_sampling_parameters(model: str) -> None:
    """gpt-5-chat-latest is no reasoning model, though named like one: it takes temperature."""
    from kubechain.llm.base import build_request, parameter_notes

    llm = _llm("openai", ALL_PARAMETERS | {"model": model})
    body = _sent_through_the_sdk("https://api.openai.com/v1", model, build_request(llm, [], []))
    assert {"temperature", "top_p", "frequency_penalty", "presence_penalty"} <= set(body)
    assert parameter_notes(llm) == ["topK is not sent: OpenAI's API has no top_k"]


def test_a_call_named_as_no_provider_takes_is_sent_back_under_a_name_it_takes() -> None:
    """OpenAI refuses a request whose messages hold a call with no name ("function.name: empty string") or
    one outside its pattern (a compatible server's "functions.add"), and Anthropic alike: the run failed
    at its next turn. The window keeps the LLM's name; the request carries one the provider takes."""
    from kubechain.llm.base import build_request
    from kubechain.models import ToolCall, ToolCallFunction

    names = ["add", "", "functions.add", "x" * 70]
    calls = [
        ToolCall(id=f"c{i}", function=ToolCallFunction(name=n, arguments="{}")) for i, n in enumerate(names)
    ]
    window = [Message(role="user", content="hi"), Message(role="assistant", content="", tool_calls=calls)]
    request = build_request(_llm("openai", {}), window, [])
    sent = [call.function.name for call in request.messages[1].tool_calls or []]
    assert sent[:2] == ["add", "unnamed_tool"]
    assert all(FUNCTION_NAME.fullmatch(name) for name in sent), sent
    # a renamed call is never sent under the name of a tool the LLM may really call ("functions_add",
    # the first 64 x's): its history would show that tool called and answered "unknown tool"
    assert sent[2].startswith("functions_add_") and sent[3].startswith("x" * 50) and sent[3] != "x" * 64
    assert [call.function.name for call in window[1].tool_calls or []] == names


def test_names_renamed_to_be_sent_stay_apart() -> None:
    """ "get weather" and "get.weather" were both sent as "get_weather", the name of the tool offered."""
    from kubechain.llm.base import build_request
    from kubechain.models import ToolCall, ToolCallFunction

    names = ["get_weather", "get weather", "get.weather"]
    calls = [
        ToolCall(id=f"c{i}", function=ToolCallFunction(name=n, arguments="{}")) for i, n in enumerate(names)
    ]
    window = [Message(role="user", content="hi"), Message(role="assistant", content="", tool_calls=calls)]
    sent = [
        call.function.name
        for call in build_request(_llm("openai", {}), window, []).messages[1].tool_calls or []
    ]
    assert len(set(sent)) == 3 and sent[0] == "get_weather", sent


@pytest.mark.parametrize("client_class", [OpenAIClient, AnthropicClient])
@pytest.mark.parametrize(
    ("status", "should_retry", "retryable"),
    [
        (409, None, True),  # a lock timeout, as both SDKs retry it
        (408, None, True),
        (400, None, False),
        (400, "true", True),  # the provider's own word, as both SDKs honour it
        # a "false" only stops the SDK's immediate retries, and proxies send it on a 429 or 5xx once their
        # own retries are spent: taken as final, a short outage failed runs (and a Ready LLM) for good
        (500, "false", True),
        (429, "false", True),
        (409, "false", True),
        (400, "false", False),
        (503, "maybe", True),
    ],
)
def test_a_failed_call_is_retried_as_the_sdks_would_retry_it(
    client_class: type[OpenAIClient] | type[AnthropicClient],
    status: int,
    should_retry: str | None,
    retryable: bool,
) -> None:
    from tests.unit.http_stub import StubAnswer, StubHTTPServer

    headers = {"Content-Type": "application/json"}
    if should_retry is not None:
        headers["x-should-retry"] = should_retry
    body = json.dumps({"type": "error", "error": {"type": "conflict", "message": "try again"}}).encode()
    with StubHTTPServer(lambda _: StubAnswer(status, body, headers)) as server:
        client = client_class("sk-test", 5, f"{server.url}/v1")
        with pytest.raises(LLMError) as failed:
            client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")]))
    assert failed.value.status_code == status
    assert failed.value.retryable is retryable


def test_a_usage_without_a_total_counts_prompt_and_completion(raw_llm: RawLLM) -> None:
    """Some OpenAI-compatible servers leave total_tokens out: the run's tokenUsage.totalTokens was 0."""
    answer = json.loads(completion({"role": "assistant", "content": "ok"}))
    answer["usage"] = {"prompt_tokens": 7, "completion_tokens": 3}
    raw_llm.body = json.dumps(answer).encode()
    client = OpenAIClient("sk-test", 5, raw_llm.url)
    usage = client.complete(LLMRequest(model="m", messages=[Message(role="user", content="hi")])).usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        7,
        3,
        10,
    )
