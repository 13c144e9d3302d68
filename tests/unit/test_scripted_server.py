"""Tests of the scripted OpenAI-compatible server, driven through the real ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from kubechain.llm.scripted_server import (
    RequestRecord,
    Script,
    ScriptedLLMServer,
    conversation_key,
    example_from_schema,
    tool_call_id,
)
from kubechain.testing.waiting import wait_for

ADD_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


@pytest.fixture(scope="module")
def module_server() -> Iterator[ScriptedLLMServer]:
    with ScriptedLLMServer() as server:
        yield server


@pytest.fixture
def server(module_server: ScriptedLLMServer) -> ScriptedLLMServer:
    module_server.reset()
    return module_server


def client(server: ScriptedLLMServer, api_key: str = "test", **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=30, **kwargs)


def max_overlap(records: list[RequestRecord]) -> int:
    events: list[tuple[float, int]] = []
    for r in records:
        events.append((r.received_at, 1))
        events.append((r.finished_at, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at equal times
    current = best = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def test_plain_content_rule_and_default(server: ScriptedLLMServer) -> None:
    server.set_script(
        {
            "rules": [
                {
                    "match": {"user_contains": "CAPITAL of the moon"},
                    "turns": [{"content": "The moon has no capital."}],
                }
            ]
        }
    )
    c = client(server)
    resp = c.chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "What is the capital of the Moon?"},
        ],
    )
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-test"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "The moon has no capital."
    assert not resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens > 0

    # no rule matches -> default answer
    resp = c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hello there"}])
    assert resp.choices[0].message.content == "Scripted answer to: hello there"

    # script default template
    server.set_script({"default": {"content_template": "[{model}] you said {user}"}})
    resp = c.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "[m1] you said hi"


def test_rule_matching_on_system_and_model(server: ScriptedLLMServer) -> None:
    server.set_script(
        Script.model_validate(
            {
                "rules": [
                    {"match": {"user_contains": "q", "model": "other"}, "turns": [{"content": "model rule"}]},
                    {
                        "match": {"user_contains": "q", "system_contains": "PIRATE"},
                        "turns": [{"content": "arr"}],
                    },
                    {"match": {"user_contains": "q"}, "turns": [{"content": "plain"}]},
                ]
            }
        )
    )
    c = client(server)
    sys_msg: Any = {"role": "system", "content": "You are a pirate."}
    user_msg: Any = {"role": "user", "content": "a question"}
    assert c.chat.completions.create(model="other", messages=[user_msg]).choices[0].message.content == (
        "model rule"
    )
    got = c.chat.completions.create(model="x", messages=[sys_msg, user_msg]).choices[0].message.content
    assert got == "arr"
    assert c.chat.completions.create(model="x", messages=[user_msg]).choices[0].message.content == "plain"
    assert [r.rule for r in server.requests()] == [0, 1, 2]


def test_two_turn_tool_calls(server: ScriptedLLMServer) -> None:
    server.set_script(
        {
            "rules": [
                {
                    "match": {"user_contains": "add"},
                    "turns": [
                        {
                            "tool_calls": [
                                {"name": "add", "arguments": {"a": 2, "b": 3}},
                                {"name": "add", "arguments": {"a": 1, "b": 1}},
                            ]
                        },
                        {"content_template": "The answer is {last_tool_results}"},
                    ],
                }
            ]
        }
    )
    c = client(server)
    messages: list[Any] = [{"role": "user", "content": "please add 2 and 3"}]
    first = c.chat.completions.create(model="m", messages=messages, tools=[ADD_TOOL])  # type: ignore[list-item]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 2
    expected_ids = [tool_call_id(0, 0, messages), tool_call_id(0, 1, messages)]
    assert [call.id for call in calls] == expected_ids
    assert expected_ids[0].startswith("call_0_0_")
    assert [call.function.name for call in calls] == ["add", "add"]  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"a": 2, "b": 3}  # type: ignore[union-attr]

    # the same request again gives the same ids (deterministic)
    again = c.chat.completions.create(model="m", messages=messages, tools=[ADD_TOOL])  # type: ignore[list-item]
    assert [call.id for call in again.choices[0].message.tool_calls or []] == expected_ids

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": "5"})
    messages.append({"role": "tool", "tool_call_id": calls[1].id, "content": "2"})
    second = c.chat.completions.create(model="m", messages=messages, tools=[ADD_TOOL])  # type: ignore[list-item]
    assert second.choices[0].message.content == "The answer is 5; 2"
    assert second.choices[0].finish_reason == "stop"

    # a third turn repeats the last scripted turn
    messages.append(second.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "user", "content": "thanks"})
    third = c.chat.completions.create(model="m", messages=messages)
    assert third.choices[0].message.content == "The answer is "

    assert [r.turn for r in server.requests()] == [0, 0, 1, 2]


def test_default_after_tool_results(server: ScriptedLLMServer) -> None:
    c = client(server)
    resp = c.chat.completions.create(
        model="m",
        messages=[
            {"role": "user", "content": "what time is it"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "t", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        ],
    )
    assert resp.choices[0].message.content == "Tool results: 12:00"


def test_malformed_arguments_raw_passes_verbatim(server: ScriptedLLMServer) -> None:
    server.set_script(
        {
            "rules": [
                {
                    "match": {"user_contains": "add"},
                    "turns": [{"tool_calls": [{"name": "add", "arguments_raw": "{not json"}]}],
                }
            ]
        }
    )
    resp = client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "add"}])
    calls = resp.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.arguments == "{not json"  # type: ignore[union-attr]


def test_rate_limit_error_then_success(server: ScriptedLLMServer) -> None:
    server.set_script(
        {
            "rules": [
                {
                    "match": {"user_contains": "busy"},
                    "turns": [
                        {
                            "error": {"status": 429, "message": "slow down", "retry_after": 2, "times": 2},
                            "then": {"content": "finally"},
                        }
                    ],
                }
            ]
        }
    )
    c = client(server)
    messages: list[Any] = [{"role": "user", "content": "are you busy?"}]
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as excinfo:
            c.chat.completions.create(model="m", messages=messages)
        assert excinfo.value.status_code == 429
        assert excinfo.value.response.headers["retry-after"] == "2"
        assert excinfo.value.response.headers["retry-after-ms"] == "2000"
        assert "slow down" in excinfo.value.message
        assert excinfo.value.code == "rate_limit_exceeded"
    resp = c.chat.completions.create(model="m", messages=messages)
    assert resp.choices[0].message.content == "finally"

    statuses = [r.status_code for r in server.requests()]
    assert statuses == [429, 429, 200]
    # retries after errors are not duplicates; counted only on request
    assert server.duplicates() == []
    assert server.duplicates(include_errors=True) == [conversation_key(messages)]


def test_server_error_without_then_falls_back_to_same_turn(server: ScriptedLLMServer) -> None:
    server.set_script(
        {"rules": [{"match": {}, "turns": [{"error": {"status": 503, "message": "down"}, "content": "up"}]}]}
    )
    c = client(server)
    with pytest.raises(openai.InternalServerError) as excinfo:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert excinfo.value.status_code == 503
    assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]).choices[
        0
    ].message.content == ("up")


def test_auth(server: ScriptedLLMServer) -> None:
    # no Authorization header at all
    resp = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 401
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert httpx.get(f"{server.base_url}/models").status_code == 401
    assert (
        httpx.get(f"{server.base_url}/models", headers={"Authorization": "Basic dXNlcjpwYXNz"}).status_code
        == 401
    )

    # any non-empty key is accepted when no keys are configured
    models = client(server, api_key="whatever").models.list()
    assert [m.id for m in models.data] == ["scripted-model"]

    # with configured keys, other keys get 401
    with ScriptedLLMServer(api_keys={"sk-good-1234"}) as keyed:
        with pytest.raises(openai.AuthenticationError):
            client(keyed, api_key="sk-bad-9999").chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.AuthenticationError):
            client(keyed, api_key="sk-bad-9999").models.list()
        ok = client(keyed, api_key="sk-good-1234").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert ok.choices[0].message.content == "Scripted answer to: hi"
        records = keyed.requests()
        assert [(r.status_code, r.auth_key_suffix) for r in records] == [(401, "9999"), (200, "1234")]
        dumped = json.dumps([r.model_dump() for r in records])
        assert "sk-good" not in dumped and "sk-bad" not in dumped


def test_empty_turn(server: ScriptedLLMServer) -> None:
    server.set_script({"rules": [{"match": {"user_contains": "silence"}, "turns": [{"empty": True}]}]})
    resp = client(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "silence"}]
    )
    assert not resp.choices[0].message.content
    assert not resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "stop"


def test_tool_calls_all_tools(server: ScriptedLLMServer) -> None:
    server.set_script({"default": {"tool_calls_all_tools": True}})
    other_tool = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {
                    "timezone": {"type": "string", "default": "UTC"},
                    "verbose": {"type": "boolean"},
                },
                "required": ["timezone"],
            },
        },
    }
    resp = client(server).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "demo"}],
        tools=[ADD_TOOL, other_tool],  # type: ignore[list-item]
    )
    calls = resp.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["add", "get_time"]  # type: ignore[union-attr]
    assert [json.loads(c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        {"a": 0, "b": 0},
        {"timezone": "UTC"},
    ]


def test_example_from_schema() -> None:
    assert example_from_schema({}) == {}
    assert example_from_schema({"type": "string", "minLength": 3}) == "xxx"
    assert example_from_schema({"type": "integer", "minimum": 5}) == 5
    assert example_from_schema({"type": "number", "exclusiveMinimum": 0}) == 1
    assert example_from_schema({"type": "string", "enum": ["b", "a"]}) == "b"
    assert example_from_schema({"type": ["null", "boolean"]}) is False
    assert example_from_schema({"anyOf": [{"type": "null"}, {"type": "integer"}]}) == 0
    assert example_from_schema(
        {
            "type": "object",
            "properties": {"xs": {"type": "array", "minItems": 2, "items": {"type": "integer"}}, "o": {}},
            "required": ["xs"],
        }
    ) == {"xs": [0, 0]}


def test_request_log_and_duplicates(server: ScriptedLLMServer) -> None:
    c = client(server, api_key="sk-abcdefWXYZ")
    messages: list[Any] = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first question"},
    ]
    c.chat.completions.create(
        model="m1",
        messages=messages,
        temperature=0.2,
        max_tokens=64,
        top_p=0.9,
        tools=[ADD_TOOL],  # type: ignore[list-item]
    )
    assert server.duplicates() == []
    c.chat.completions.create(model="m1", messages=messages)
    c.chat.completions.create(model="m1", messages=[{"role": "user", "content": "other"}])

    records = server.requests()
    assert [r.seq for r in records] == [1, 2, 3]
    first = records[0]
    assert first.model == "m1"
    assert first.conversation_key == conversation_key(messages)
    assert len(first.conversation_key) == 16
    assert first.first_user == "first question"
    assert first.turn == 0
    assert first.messages_count == 2
    assert first.tool_names == ["add"]
    assert first.temperature == pytest.approx(0.2)
    assert first.max_tokens == 64
    assert first.top_p == pytest.approx(0.9)
    assert first.status_code == 200
    assert first.auth_key_suffix == "WXYZ"
    assert first.received_at <= first.finished_at
    assert records[1].temperature is None and records[1].tool_names == []

    assert server.duplicates() == [conversation_key(messages)]

    # the admin API exposes the same log
    admin = httpx.get(f"{server.url}/_admin/requests").json()
    assert [r["seq"] for r in admin] == [1, 2, 3]
    assert admin[0]["auth_key_suffix"] == "WXYZ"
    assert httpx.get(f"{server.url}/_admin/duplicates").json() == [conversation_key(messages)]

    server.reset()
    assert server.requests() == [] and server.duplicates() == []


def test_admin_api(server: ScriptedLLMServer) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    script = {"rules": [{"match": {"user_contains": "ping"}, "turns": [{"content": "pong"}]}]}
    assert httpx.post(f"{server.url}/_admin/script", json=script).status_code == 200
    assert httpx.get(f"{server.url}/_admin/script").json()["rules"][0]["turns"][0]["content"] == "pong"
    c = client(server)
    assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "ping"}]).choices[
        0
    ].message.content == ("pong")

    bad = httpx.post(f"{server.url}/_admin/script", json={"rules": [{"turns": [{"bogus": 1}]}]})
    assert bad.status_code == 400
    assert bad.json()["error"] == "invalid script"

    assert httpx.post(f"{server.url}/_admin/reset").status_code == 200
    assert httpx.get(f"{server.url}/_admin/requests").json() == []
    # the script is cleared too
    assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "ping"}]).choices[
        0
    ].message.content == ("Scripted answer to: ping")


def test_concurrent_requests_overlap(server: ScriptedLLMServer) -> None:
    server.set_script({"default": {"content_template": "slow {user}", "delay_s": 0.5}})
    n = 100

    async def run() -> list[str | None]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0) as ac:
            responses = await asyncio.gather(
                *(
                    ac.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}])
                    for i in range(n)
                )
            )
        return [r.choices[0].message.content for r in responses]

    contents = asyncio.run(run())
    assert contents == [f"slow q{i}" for i in range(n)]
    records = server.requests()
    assert len(records) == n
    assert all(r.finished_at - r.received_at >= 0.5 for r in records)
    assert max_overlap(records) > 1
    assert server.duplicates() == []


def test_cli_main_runs_in_foreground(tmp_path: Any) -> None:
    script_file = tmp_path / "script.json"
    script_file.write_text(
        json.dumps({"rules": [{"match": {"user_contains": "cli"}, "turns": [{"content": "from file"}]}]})
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubechain.llm.scripted_server", "--port", "0", "--script", str(script_file)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        base_url = None
        for line in proc.stderr:  # blocks until the startup line (pytest-timeout guards a hang)
            if "listening on " in line:
                base_url = line.strip().rsplit("listening on ", 1)[1]
                break
        assert base_url is not None and base_url.endswith("/v1")
        resp = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "cli test"}]
        )
        assert resp.choices[0].message.content == "from file"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_connections_disable_nagle() -> None:
    """Without TCP_NODELAY each answer's body waited ~40 ms behind its headers (delayed ACK)."""
    import socket as socket_module

    from kubechain.llm.scripted_server import _NoDelayHttpProtocol

    listener = socket_module.create_server(("127.0.0.1", 0))
    client = socket_module.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY) == 0

        class Transport:
            def get_extra_info(self, name: str, default: object = None) -> object:
                return accepted if name == "socket" else default

        protocol = _NoDelayHttpProtocol.__new__(_NoDelayHttpProtocol)
        try:
            protocol.connection_made(Transport())  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - the rest of uvicorn's set-up needs a real server
            pass
        assert accepted.getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY) == 1
    finally:
        for sock in (accepted, client, listener):
            sock.close()


def test_answers_can_be_held_until_enough_requests_are_in_flight_together(server: ScriptedLLMServer) -> None:
    """The in-flight bench holds every run's LLM call open at once this way, whatever rate runs arrive at."""
    from concurrent.futures import ThreadPoolExecutor

    server.set_script({"default": {"content": "held"}, "hold_until_in_flight": 3})

    def ask(i: int) -> str:
        answer = client(server).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": f"q{i}"}]
        )
        return answer.choices[0].message.content or ""

    with ThreadPoolExecutor(3) as pool:
        first = [pool.submit(ask, i) for i in range(2)]
        wait_for(lambda: len(server.in_flight()) == 2, 10, what="two requests in flight")
        assert not any(f.done() for f in first), "held: only two of three in flight"
        third = pool.submit(ask, 2)
        assert [f.result(timeout=10) for f in (*first, third)] == ["held"] * 3
    assert max_overlap(server.requests()) == 3


def test_a_new_script_releases_answers_the_old_one_was_holding(server: ScriptedLLMServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server.set_script({"default": {"content": "held"}, "hold_until_in_flight": 5})
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            lambda: client(server).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "q"}]
            )
        )
        wait_for(lambda: len(server.in_flight()) == 1, 10, what="one request held")
        server.set_script({"default": {"content": "next"}})  # from this thread, not the server's loop
        assert waiting.result(timeout=10).choices[0].message.content == "held"


@pytest.mark.slow  # a real 1.5 s answer
def test_a_request_its_caller_gave_up_says_when_the_caller_left(server: ScriptedLLMServer) -> None:
    """A caller that hangs up before its answer (a worker's call cut short at its claim's deadline, a
    crash) is logged with the moment it left: a test can tell when the request ended for its caller, and
    so whether a repeat of it overlapped it."""
    server.set_script({"default": {"content": "late", "delay_s": 1.5}})
    with pytest.raises(openai.APITimeoutError):
        client(server).with_options(timeout=0.3).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "gone"}]
        )
    gave_up = time.time()
    # logged when its answer was due, as any other
    record = wait_for(lambda: next(iter(server.requests()), None), 10, what="the request to be logged")
    assert record.finished_at - record.received_at >= 1.5
    assert record.caller_left_at is not None, "the caller left"
    assert record.received_at < record.caller_left_at <= gave_up + 0.5

    server.set_script({"default": {"content": "prompt", "delay_s": 0.2}})
    c = client(server)
    assert c.chat.completions.create(model="m", messages=[{"role": "user", "content": "here"}]).choices[
        0
    ].message.content == ("prompt")
    assert server.requests()[-1].caller_left_at is None, "a caller that got its answer never left"
