"""An MCPServer's secrets (env and header values from Kubernetes Secrets) never leave the worker: not
through a stdio child's stderr, its tool list, a header's parts or a note on an answer."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kubechain.mcp.spec import ResolvedSpec
from tests.unit.test_redaction import PEM_KEY, counting_secret_forms, pieces

SECRET = "s3cret-0123456789abcdefghij"


def stderr_seen(written: str, secret: str, caplog: pytest.LogCaptureFixture) -> str:
    """What a stdio child's stderr ``written`` leaves behind: the tail kept for errors, the debug log."""
    from kubechain.mcp.session import _StderrTail

    caplog.set_level(logging.DEBUG, logger="kubechain.mcp.stderr")
    tail = _StderrTail("default/chatty", ResolvedSpec(transport="stdio", secret_values=(secret,)).scrubber)

    async def child_writes() -> None:
        pipe = tail.open_writer()

        def write() -> None:  # in a thread: a full pipe blocks until the reader on this loop drains it
            with pipe:
                pipe.write(written)

        await asyncio.to_thread(write)
        await tail.drain(30)

    asyncio.run(child_writes())
    return "\n".join([*tail.lines, *(record.getMessage() for record in caplog.records)])


def test_a_multi_line_secret_on_stderr_is_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    """Its body, that is: its markers, in every PEM text, are shown."""
    seen = stderr_seen(f"loaded key:\n{PEM_KEY}ready\n", PEM_KEY, caplog)
    assert "ready" in seen and "-----BEGIN PRIVATE KEY-----" in seen, seen
    for line in PEM_KEY.splitlines()[1:-1]:
        assert not pieces(line, seen), seen


@pytest.mark.parametrize(
    ("filler", "repeats"),
    [("", 600), ("x" * 200, 600), ("", 5000)],
    ids=["16-KiB-line", "136-KiB-line", "135-KiB-line-of-secrets"],
)
def test_a_secret_in_a_long_stderr_line_is_scrubbed_whole(
    filler: str, repeats: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A line longer than a read was flushed in pieces, each scrubbed alone: a secret across the cut
    between two pieces was not recognised in either. A line too long to keep whole shows only its start,
    and nothing of what might be a secret cut where it stopped being kept."""
    seen = stderr_seen("env: " + f"{filler}{SECRET}," * repeats + "\nnext line\n", SECRET, caplog)
    assert "next line" in seen
    assert not pieces(SECRET, seen), pieces(SECRET, seen)
    # scrubbed to a seventh, the kept 64 KiB of the last are all within the margin left out
    assert (f"env: {filler}***," in seen) is (repeats < 5000), seen[:200]


def test_a_servers_secret_forms_are_worked_out_once_not_for_every_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every answer and stderr line of a server is scrubbed; working out the forms of its secrets cost
    more than scrubbing a short line."""
    calls = counting_secret_forms(monkeypatch)
    spec = ResolvedSpec(transport="stdio", secret_values=(SECRET, PEM_KEY))
    for n in range(100):
        assert spec.scrub(f"line {n}: {SECRET}") == f"line {n}: ***"
    assert len(calls) == 1


def test_a_secret_longer_than_the_stderr_margin_leaves_no_piece_of_it_where_a_long_line_is_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A kubeconfig with its certificates, JSON-escaped, is longer than the fixed 16 KiB left out before a
    long line's cut: a copy of it across the cut showed its first 4 KiB."""
    import base64
    import random

    secret = base64.b64encode(random.Random(7).randbytes(30_000)).decode()  # 40,000 characters
    seen = stderr_seen(f"env: {secret},{secret}\nnext line\n", secret, caplog)  # cut inside the second
    assert "next line" in seen
    assert not pieces(secret, seen), seen[:200]


def test_a_long_multi_line_secret_leaves_the_start_of_a_long_line_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What is left out before a long line's cut is the secret's longest form: a multi-line secret (a JSON
    config of 40 KB) percent-encoded is two to three times as long, which left out all of the 64 KiB kept.
    Its credentials are looked for percent-encoded, not its whole."""
    config = {
        f"service_{i}": {"url": f"http://svc-{i}.internal:8080/v1", "enabled": True} for i in range(450)
    }
    secret = json.dumps(config, indent=2)
    seen = stderr_seen("starting " + "x" * 70_000 + "\nnext line\n", secret, caplog)
    assert "next line" in seen and "starting xxxxxxxx" in seen, seen[:200]


def http_server_with_authorization(value: str) -> ResolvedSpec:
    from kubechain.mcp.spec import resolve_spec
    from kubechain.models import MCPServer

    server = MCPServer.model_validate(
        {
            "metadata": {"name": "hosted", "namespace": "default"},
            "spec": {
                "transport": "http",
                "url": "https://mcp.example.com/mcp",
                "headers": [
                    {
                        "name": "Authorization",
                        "valueFrom": {"secretKeyRef": {"name": "auth", "key": "header"}},
                    }
                ],
            },
        }
    )
    return resolve_spec(server, lambda namespace, name, key: value)


@pytest.mark.parametrize("scheme", ["Bearer", "token", "ApiKey"])
def test_the_credential_of_a_header_secret_is_cut_out_without_its_scheme(scheme: str) -> None:
    """headers[].valueFrom holds the whole value ("Bearer <token>"); an error quotes the token alone."""
    spec = http_server_with_authorization(f"{scheme} {SECRET}\n")
    said = spec.scrub(f"401 Unauthorized: token {SECRET!r} is revoked")
    assert not pieces(SECRET, said) and "token '***' is revoked" in said, said


def test_the_parts_of_a_basic_auth_header_secret_are_cut_out() -> None:
    import base64

    credentials = "svc-reporting:p4ssw0rd-of-svc"
    encoded = base64.b64encode(credentials.encode()).decode()
    spec = http_server_with_authorization(f"Basic {encoded}")
    for quoted in (encoded, credentials, "p4ssw0rd-of-svc"):
        said = spec.scrub(f"auth failed for {quoted}: locked")
        assert said == "auth failed for ***: locked", (quoted, said)
    # a password too short to match safely is left (it would garble ordinary text), as any short value is
    short = http_server_with_authorization("Basic " + base64.b64encode(b"admin:12345").decode())
    assert short.scrub("retry 12345 of admin") == "retry 12345 of admin"


DB_URL = "postgres://app:pa55w0rd-9f8e7d@db.internal:5432/orders"
PIN = "73914628"
LEAKY_TOOLS_SERVER = textwrap.dedent(
    """
    import os
    from typing import Annotated

    from pydantic import Field

    from mcp.server.mcpserver import MCPServer

    DB_URL = os.environ["DB_URL"]
    server = MCPServer("leaky-tools")


    @server.tool(description=f"Runs SQL against {DB_URL}")
    def query(sql: Annotated[str, Field(description=f"SQL for {DB_URL}")] = f"select 1 -- {DB_URL}") -> str:
        return "ok"


    @server.tool()
    def unlock(pin: int = int(os.environ["PIN"])) -> str:
        return "unlocked"


    if __name__ == "__main__":
        server.run()
    """
)


def stdio_server_with_secrets(tmp_path: Path, name: str, source: str, **env_keys: str) -> Any:
    """An MCPServer running ``source`` (a Python script) over stdio, each environment variable named in
    ``env_keys`` from that key of the Secret "db"."""
    from kubechain.models import MCPServer

    script = tmp_path / f"{name}.py"
    script.write_text(source)
    return MCPServer.model_validate(
        {
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "transport": "stdio",
                "command": sys.executable,
                "args": [str(script)],
                "env": [
                    {"name": var, "valueFrom": {"secretKeyRef": {"name": "db", "key": key}}}
                    for var, key in env_keys.items()
                ],
            },
        }
    )


@pytest.mark.slow
def test_a_tool_list_that_quotes_the_servers_secrets_is_scrubbed(tmp_path: Path) -> None:
    """The tools go to the MCPServer's status and into every LLM request: a server that describes itself
    with a value from its environment must not put it there."""
    from kubechain.mcp import MCPManager

    secrets = {"db-url": DB_URL, "pin": PIN}
    server = stdio_server_with_secrets(
        tmp_path, "leaky-tools", LEAKY_TOOLS_SERVER, DB_URL="db-url", PIN="pin"
    )
    manager = MCPManager(lambda namespace, name, key: secrets[key], connect_timeout_s=60)
    try:
        tools = {tool.name: tool for tool in manager.list_tools(server)}
    finally:
        manager.close()
    listed = json.dumps([tool.model_dump(by_alias=True) for tool in tools.values()])
    assert not pieces(DB_URL, listed) and not pieces(PIN, listed), listed
    assert tools["query"].description == "Runs SQL against ***"
    schema = tools["query"].input_schema
    assert schema is not None and schema["properties"]["sql"]["description"] == "SQL for ***"
    # the PIN as a number ("default": 73914628) is left out, the parameter kept
    schema = tools["unlock"].input_schema
    assert schema is not None and schema["properties"]["pin"] == {"title": "Pin", "type": "integer"}, schema


DB_TOOLS_SERVER = textwrap.dedent(
    """
    import os

    from mcp.server.mcpserver import MCPServer

    server = MCPServer("db-tools")


    @server.tool(description=f"Runs SQL as {os.environ['POSTGRES_USER']}")
    def postgres_query(sql: str) -> str:
        return f"ran {sql}"


    @server.tool(name=f"rotate_{os.environ['API_TOKEN']}")
    def rotate() -> str:
        return "rotated"


    if __name__ == "__main__":
        server.run()
    """
)


@pytest.mark.slow
def test_a_tool_whose_name_holds_a_low_entropy_secret_keeps_its_name_and_can_be_called(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database user name ("postgres") is a secret value too: cut out of "postgres_query", the LLM
    called "***_query", which the server does not know. A name that holds a credential is no name to
    offer: that tool is left out, and the log says so without it."""
    from kubechain.mcp import MCPManager

    secrets = {"user": "postgres", "token": SECRET.replace("-", "")}
    server = stdio_server_with_secrets(
        tmp_path, "db-tools", DB_TOOLS_SERVER, POSTGRES_USER="user", API_TOKEN="token"
    )
    caplog.set_level(logging.WARNING, logger="kubechain.mcp")
    manager = MCPManager(lambda namespace, name, key: secrets[key], connect_timeout_s=60)
    try:
        tools = manager.list_tools(server)
        assert [tool.name for tool in tools] == ["postgres_query"]
        assert tools[0].description == "Runs SQL as ***", "a description is prose: scrubbed"
        assert manager.call_tool(server, "postgres_query", {"sql": "select 1"}).text == "ran select 1"
    finally:
        manager.close()
    assert "rotate_***" in caplog.text and not pieces(secrets["token"], caplog.text), caplog.text


def schema_scrubbed(schema: dict[str, Any], *secrets: str) -> dict[str, Any] | None:
    """``schema`` as a tool's input schema leaves the worker, the server's secrets being ``secrets``."""
    from types import SimpleNamespace

    from kubechain.mcp.tool_list import scrubbed_tools

    scrub = ResolvedSpec(transport="stdio", secret_values=secrets).scrubber
    (tool,) = scrubbed_tools([SimpleNamespace(name="t", description=None, input_schema=schema)], scrub, "s")
    return tool.input_schema


def test_a_secret_in_a_schemas_number_costs_that_keyword_alone() -> None:
    """Scrubbed as JSON text, "maximum": 1234567 became "maximum": ***7, no JSON: the tool lost every
    parameter to a schema that takes any arguments."""
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 1, "maximum": 1234567},
            "q": {"type": "string", "description": "rows of 123456"},
        },
        "required": ["q"],
    }
    assert schema_scrubbed(schema, "123456") == {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 1},
            "q": {"type": "string", "description": "rows of ***"},
        },
        "required": ["q"],
    }


def test_a_pattern_a_secret_leaves_no_regular_expression_is_dropped_alone() -> None:
    schema = {
        "type": "object",
        "properties": {"token": {"type": "string", "pattern": f"^{SECRET}$"}, "q": {"type": "string"}},
    }
    assert schema_scrubbed(schema, SECRET) == {
        "type": "object",
        "properties": {"token": {"type": "string"}, "q": {"type": "string"}},
    }, "^***$ is no regular expression"
    plain = {"type": "object", "properties": {"q": {"type": "string"}}}
    assert schema_scrubbed(plain, SECRET) == plain


def test_the_names_in_a_schema_are_kept_whole_as_a_tools_name_is() -> None:
    """A property, a required one, a value to choose: the LLM sends them back, cut they name nothing.
    One that holds more of a secret than a word is left out; a property named like a keyword is a name."""
    schema = {
        "type": "object",
        "properties": {
            "postgres_db": {"type": "string", "enum": ["postgres", DB_URL], "description": "as postgres"},
            f"key_{SECRET}": {"type": "string"},
            "type": {"type": "string", "description": f"see {DB_URL}"},
        },
        "required": ["postgres_db", f"key_{SECRET}"],
    }
    assert schema_scrubbed(schema, "postgres", SECRET, DB_URL) == {
        "type": "object",
        "properties": {
            "postgres_db": {"type": "string", "enum": ["postgres"], "description": "as ***"},
            "type": {"type": "string", "description": "see ***"},
        },
        "required": ["postgres_db"],
    }


def test_a_tool_is_left_out_only_if_its_name_holds_more_of_a_secret_than_a_word() -> None:
    """A credential, or a value with more than a word's characters; a database user is a word."""
    from types import SimpleNamespace

    from kubechain.mcp.tool_list import scrubbed_tools

    scrub = ResolvedSpec(transport="stdio", secret_values=(SECRET, "postgres", "pa55!word")).scrubber
    listed = [
        SimpleNamespace(name=name, description=None, input_schema=None)
        for name in ("postgres_query", f"use_{SECRET}", "login_pa55!word", "postgres_tables")
    ]
    assert [tool.name for tool in scrubbed_tools(listed, scrub, "s")] == ["postgres_query", "postgres_tables"]


def test_an_answer_off_its_schema_is_noted_and_logged_without_the_secret_it_quotes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """jsonschema's message quotes the offending value ("'s3cret...' is not of type 'integer'"): it was
    logged unscrubbed, and the note on the answer was cut before the manager scrubbed it, which left the
    start of a secret across the cut."""
    from types import SimpleNamespace

    import anyio
    from mcp_types import CallToolResult, TextContent

    from kubechain.mcp.session import Session, _keep_answers_that_miss_their_schema, flatten_result

    answer = CallToolResult(content=[TextContent(type="text", text="done")], structured_content={"n": SECRET})

    async def sdk_check(name: str, result: CallToolResult) -> None:  # what the SDK's check does here
        raise RuntimeError(
            f"Invalid structured content returned by tool {name}: {'x' * 230} '{SECRET}' is not of type 'integer'"
        )

    class DriftedServer:
        session = SimpleNamespace(validate_tool_result=sdk_check)

        async def call_tool(self, name: str, *_: Any, **__: Any) -> CallToolResult:
            await self.session.validate_tool_result(name, answer)
            return answer

    client = DriftedServer()
    _keep_answers_that_miss_their_schema(client)  # type: ignore[arg-type]
    spec = ResolvedSpec(transport="http", url="http://mcp.test/mcp", secret_values=(SECRET,))
    session = Session("default/drifted", spec, 1, 5)
    session.client = client  # type: ignore[assignment]
    caplog.set_level(logging.DEBUG, logger="kubechain.mcp")

    result = anyio.run(session.call_tool, "count", {})
    noted = spec.scrub(flatten_result(result).text)  # as the manager hands it on
    assert "does not match its output schema" in noted and "output schema" in caplog.text
    assert not pieces(SECRET, noted), noted
    assert not pieces(SECRET, caplog.text), caplog.text


def test_a_probe_that_fails_quoting_the_servers_secret_is_logged_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a call timed out, tools/list probes the server: what its failure says (a tools/list answer
    the SDK cannot read, quoted by the validation error) was logged as it was."""
    from kubechain.mcp.session import Session

    class Garbled:
        async def list_tools(self) -> None:
            raise ValueError(f"invalid tools/list answer: {{'env': {{'DB_TOKEN': '{SECRET}'}}}}")

    session = Session("default/db", ResolvedSpec(transport="stdio", secret_values=(SECRET,)), 5, 5)
    with caplog.at_level(logging.DEBUG, logger="kubechain.mcp"):
        asyncio.run(session._check_alive(Garbled()))  # type: ignore[arg-type]
    assert "no answer to tools/list" in caplog.text and "'DB_TOKEN': '***'" in caplog.text, caplog.text
    assert not pieces(SECRET, caplog.text), caplog.text
