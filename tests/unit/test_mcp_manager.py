"""MCPManager against real MCP servers: ``mcp-server-time`` and small SDK servers written by the tests
(stdio in a temp file, streamable HTTP and SSE served by uvicorn in a thread)."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp.server.mcpserver import Context
from mcp.server.mcpserver import MCPServer as SDKServer
from mcp.server.mcpserver.exceptions import ToolError

from kubechain.mcp import MCPError, MCPManager, MCPToolResult, command_problem, validate_spec
from kubechain.models import MCPServer
from kubechain.observability.logs import ResourceFilter, resource_context
from tests.unit.test_agent_validation import MALFORMED_URLS, WELL_FORMED_URLS

# Real MCP servers (stdio children, uvicorn, uvx) and real timeouts: seconds per test.
pytestmark = pytest.mark.slow

BIN_DIR = Path(sys.executable).parent
TIME_SERVER = str(BIN_DIR / "mcp-server-time")
# Generous: the machine running the suite may be busy, and a stdio server is a fresh Python process.
CONNECT_TIMEOUT_S = 60.0
SECRETS = {
    ("default", "tokens", "api-key"): "s3cret-env-value",
    ("default", "tokens", "bearer"): "s3cret-bearer-value",
}


def resolve_secret(namespace: str, name: str, key: str) -> str:
    try:
        return SECRETS[(namespace, name, key)]
    except KeyError:
        raise LookupError(f'key "{key}" not found in secret "{name}"') from None


def mcp_server(name: str, **spec: Any) -> MCPServer:
    return MCPServer.model_validate(
        {"metadata": {"name": name, "namespace": "default", "generation": 1}, "spec": spec, "status": {}}
    )


def time_server(name: str, *args: str, idempotent: bool | None = None) -> MCPServer:
    return mcp_server(name, transport="stdio", command=TIME_SERVER, args=list(args), idempotent=idempotent)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def manager() -> Iterator[MCPManager]:
    m = MCPManager(resolve_secret, call_timeout_s=60, connect_timeout_s=CONNECT_TIMEOUT_S)
    yield m
    m.close()


# -- an in-test stdio server ----------------------------------------------------------------------

STDIO_SERVER = textwrap.dedent(
    """
    import os
    from pathlib import Path

    from mcp.server.mcpserver import MCPServer

    server = MCPServer("test-stdio")


    @server.tool()
    def env(name: str) -> str:
        return os.environ.get(name, "<unset>")


    @server.tool()
    def env_reversed(name: str) -> str:
        return os.environ.get(name, "<unset>")[::-1]


    @server.tool()
    async def slow(seconds: float) -> str:
        import anyio

        await anyio.sleep(seconds)
        return "done"


    @server.tool()
    def still_working(marker: str, rounds: int) -> str:
        # answers "still working" (a state-only InputRequiredResult, the 2026 protocol's way) until asked
        # ``rounds`` times
        from mcp_types import InputRequiredResult

        path = Path(marker)
        asked = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(asked))
        if asked <= rounds:
            return InputRequiredResult(request_state=f"asked-{asked}")  # type: ignore[return-value]
        return f"done after {asked} requests"


    @server.tool()
    def die_once(marker: str) -> str:
        path = Path(marker)
        if not path.exists():
            path.write_text("died")
            os._exit(3)
        return "survived"


    if __name__ == "__main__":
        server.run()
    """
)


@pytest.fixture(scope="module")
def stdio_script(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("mcp") / "stdio_server.py"
    path.write_text(STDIO_SERVER)
    return str(path)


def script_server(name: str, script: str, **spec: Any) -> MCPServer:
    return mcp_server(name, transport="stdio", command=sys.executable, args=[script], **spec)


# -- in-test HTTP servers -------------------------------------------------------------------------


def _http_mcp_server() -> Any:
    server = SDKServer("test-http")

    @server.tool()
    def whoami(ctx: Context) -> str:  # type: ignore[type-arg]
        headers = {k.lower(): v for k, v in (ctx.headers or {}).items()}
        if headers.get("authorization") != "Bearer s3cret-bearer-value":
            raise ToolError("unauthorized: missing or wrong Authorization header")
        return f"authorized; x-team={headers.get('x-team')}"

    return server


class UvicornThread:
    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        wait_until(lambda: self.server.started, what="uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    with UvicornThread(_http_mcp_server().streamable_http_app(host="127.0.0.1")) as server:
        yield f"http://127.0.0.1:{server.port}/mcp"


@pytest.fixture(scope="module")
def sse_url() -> Iterator[str]:
    with UvicornThread(_http_mcp_server().sse_app(host="127.0.0.1")) as server:
        yield f"http://127.0.0.1:{server.port}/sse"


BEARER_HEADERS = [
    {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "bearer"}}},
    {"name": "X-Team", "value": "platform"},
]
# The manager resolves "Authorization" to "Bearer <secret>" only if the secret holds the full value:
SECRETS[("default", "tokens", "bearer")] = "Bearer s3cret-bearer-value"


# -- mcp-server-time over stdio -------------------------------------------------------------------


def test_list_tools_returns_full_input_schemas(manager: MCPManager) -> None:
    tools = {tool.name: tool for tool in manager.list_tools(time_server("time-list"))}
    assert set(tools) == {"get_current_time", "convert_time"}
    current = tools["get_current_time"]
    assert current.description == "Get current time in a specific timezone"
    schema = current.input_schema
    assert schema is not None
    assert schema["type"] == "object"
    assert schema["required"] == ["timezone"]
    assert schema["properties"]["timezone"]["type"] == "string"
    assert "IANA timezone name" in schema["properties"]["timezone"]["description"]
    convert = tools["convert_time"].input_schema
    assert convert is not None and set(convert["required"]) == {"source_timezone", "time", "target_timezone"}


def test_call_tool_returns_text_and_reuses_the_session(manager: MCPManager) -> None:
    server = time_server("time-call")
    manager.list_tools(server)
    pid = manager.stdio_pid("default", "time-call")
    assert pid is not None and alive(pid)

    result = manager.call_tool(server, "get_current_time", {"timezone": "UTC"})
    assert not result.is_error
    payload = json.loads(result.text)
    assert payload["timezone"] == "UTC" and "datetime" in payload

    converted = manager.call_tool(
        server, "convert_time", {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}
    )
    assert not converted.is_error and "Asia/Tokyo" in converted.text
    assert manager.stdio_pid("default", "time-call") == pid  # one long-lived child for all of them


def test_is_error_results_and_unknown_tools(manager: MCPManager) -> None:
    server = time_server("time-errors")
    bad = manager.call_tool(server, "get_current_time", {"timezone": "Nowhere/Atlantis"})
    assert bad.is_error
    assert "Invalid timezone" in bad.text

    with pytest.raises(MCPError, match='tool "no_such_tool" not found on MCP server "time-errors"'):
        manager.call_tool(server, "no_such_tool", {})


def test_killed_child_is_restarted_for_an_idempotent_server(manager: MCPManager) -> None:
    server = time_server("time-killed", idempotent=True)
    assert not manager.call_tool(server, "get_current_time", {"timezone": "UTC"}).is_error
    pid = manager.stdio_pid("default", "time-killed")
    assert pid is not None

    os.kill(pid, signal.SIGKILL)  # the next call may race the manager noticing: idempotent allows a retry
    result = manager.call_tool(server, "get_current_time", {"timezone": "UTC"})
    assert not result.is_error and json.loads(result.text)["timezone"] == "UTC"
    new_pid = manager.stdio_pid("default", "time-killed")
    assert new_pid is not None and new_pid != pid and alive(new_pid)


def test_dead_session_noticed_before_a_call_is_restarted_even_if_not_idempotent(manager: MCPManager) -> None:
    server = time_server("time-dead")
    manager.list_tools(server)
    pid = manager.stdio_pid("default", "time-dead")
    assert pid is not None

    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not manager.connected("default", "time-dead"), what="the manager to notice the exit")
    result = manager.call_tool(server, "get_current_time", {"timezone": "UTC"})  # nothing was sent before
    assert not result.is_error
    assert manager.stdio_pid("default", "time-dead") not in (None, pid)


def test_a_sessions_own_log_lines_name_its_server_not_its_first_caller(
    manager: MCPManager, caplog: pytest.LogCaptureFixture
) -> None:
    server = time_server("time-logged")
    with resource_context("TaskRunToolCall", "default", "first-caller"):
        manager.list_tools(server)
    pid = manager.stdio_pid("default", "time-logged")
    assert pid is not None
    caplog.set_level(logging.INFO, logger="kubechain.mcp")
    handler = caplog.handler
    handler.addFilter(ResourceFilter())  # as configure_logging installs it on every handler
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not manager.connected("default", "time-logged"), what="the manager to notice the exit")
    wait_until(
        lambda: any("default/time-logged" in r.getMessage() for r in caplog.records),
        what=f"the session's last line, among {[r.getMessage() for r in caplog.records]}",
    )
    lines = [r for r in caplog.records if "MCP session default/time-logged" in r.getMessage()]
    assert lines and all(
        (getattr(r, "kind", None), getattr(r, "resource", None)) == ("MCPServer", "time-logged")
        for r in lines
    ), [(r.getMessage(), getattr(r, "kind", None), getattr(r, "resource", None)) for r in lines]


def test_changed_spec_reconnects_and_closes_the_old_child(manager: MCPManager) -> None:
    manager.list_tools(time_server("time-spec"))
    old_pid = manager.stdio_pid("default", "time-spec")
    assert old_pid is not None

    tools = manager.list_tools(time_server("time-spec", "--local-timezone", "Europe/Paris"))
    new_pid = manager.stdio_pid("default", "time-spec")
    assert new_pid is not None and new_pid != old_pid
    schema = next(t for t in tools if t.name == "get_current_time").input_schema
    assert schema is not None and "Europe/Paris" in schema["properties"]["timezone"]["description"]
    wait_until(lambda: not alive(old_pid), what="the old child to exit")


def test_at_most_max_stdio_sessions_children_run_and_the_least_recently_used_is_closed_first() -> None:
    """Real stdio children: with max_stdio_sessions=2 (KUBECHAIN_MCP_MAX_STDIO_SESSIONS), a third server
    starts once the child of the one unused for longest is gone; the two others keep theirs."""
    bounded = MCPManager(resolve_secret, connect_timeout_s=CONNECT_TIMEOUT_S, max_stdio_sessions=2)
    try:
        pids: dict[str, int] = {}
        for name in ("lru-a", "lru-b", "lru-c"):
            result = bounded.call_tool(time_server(name), "get_current_time", {"timezone": "UTC"})
            assert not result.is_error, result.text
            pid = bounded.stdio_pid("default", name)
            assert pid is not None
            pids[name] = pid
            assert sum(alive(pid) for pid in pids.values()) <= 2
        assert not alive(pids["lru-a"]), "the least recently used child was gone before the third started"
        assert alive(pids["lru-b"]) and alive(pids["lru-c"])
        bounded.list_tools(time_server("lru-b"))  # b used again: c is now the one unused for longest
        bounded.list_tools(time_server("lru-a"))
        assert not alive(pids["lru-c"]) and alive(pids["lru-b"])
        assert not bounded.connected("default", "lru-c")
    finally:
        bounded.close()
    assert not any(alive(pid) for pid in pids.values())


def test_allowlist(manager: MCPManager) -> None:
    strict = MCPManager(resolve_secret, command_allowlist=["npx", "/usr/bin/uvx"])
    try:
        with pytest.raises(MCPError) as info:
            strict.list_tools(time_server("time-forbidden"))
        assert str(info.value) == (
            f"stdio command '{TIME_SERVER}' is not in the allowlist (KUBECHAIN_MCP_COMMAND_ALLOWLIST); "
            "allowed: npx, /usr/bin/uvx"
        )
    finally:
        strict.close()
    # basename or full path entries allow; an empty allowlist allows everything
    assert command_problem(TIME_SERVER, ["mcp-server-time"]) is None
    assert command_problem(TIME_SERVER, [TIME_SERVER]) is None
    assert command_problem("/tmp/evil/npx", ["/usr/bin/npx"]) is not None
    assert command_problem(TIME_SERVER, []) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("LD_PRELOAD", "it makes the dynamic loader load other code into the command"),
        ("LD_LIBRARY_PATH", "it makes the dynamic loader load other code into the command"),
        ("PATH", "it changes which program a command name runs"),
        ("NODE_OPTIONS", "it makes Node load other code"),
        ("npm_config_registry", "it changes where npx or npm fetch packages from"),
        ("PYTHONPATH", "it makes Python load other code"),
        ("PYTHONSTARTUP", "it makes Python load other code"),
        ("UV_INDEX_URL", "it changes where uvx fetches packages from, or which Python it runs"),
        ("PIP_INDEX_URL", "it changes where pip fetches packages from"),
        ("BASH_ENV", "it makes a shell run other code"),
        ("JAVA_TOOL_OPTIONS", "it makes Java load other code"),
        ("RUBYOPT", "it makes Ruby load other code"),
        ("PERL5OPT", "it makes Perl load other code"),
        ("GIT_SSH_COMMAND", "it changes what git runs or where it fetches from"),
        ("HOME", "it changes where the command reads its configuration and cached packages from"),
    ],
)
def test_with_an_allowlist_the_env_may_not_change_what_an_allowed_command_runs(name: str, why: str) -> None:
    from kubechain.mcp.spec import env_problem

    assert env_problem(["TZ", name], ["npx"]) == (
        f'env var "{name}" may not be set while stdio commands are restricted '
        f"(KUBECHAIN_MCP_COMMAND_ALLOWLIST): {why}"
    )
    assert env_problem([name], []) is None, "without an allowlist anything goes"


def test_with_an_allowlist_ordinary_env_is_allowed() -> None:
    from kubechain.mcp.spec import env_problem

    names = ["API_KEY", "TZ", "PYTHONUNBUFFERED", "PYTHONIOENCODING", "NODE_ENV", "LOG_LEVEL", "GITHUB_TOKEN"]
    assert env_problem(names, ["npx"]) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("GCONV_PATH", "it makes the C library load other code or data"),
        ("LOCPATH", "it makes the C library load other code or data"),
        ("HOSTALIASES", "it changes where the command's network requests go"),
        ("HTTPS_PROXY", "it changes where the command's network requests go"),
        ("https_proxy", "it changes where the command's network requests go"),
        ("HTTP_PROXY", "it changes where the command's network requests go"),
        ("http_proxy", "it changes where the command's network requests go"),
        ("ALL_PROXY", "it changes where the command's network requests go"),
        ("all_proxy", "it changes where the command's network requests go"),
        ("NO_PROXY", "it changes where the command's network requests go"),
        ("no_proxy", "it changes where the command's network requests go"),
        ("SSL_CERT_FILE", "it changes which servers the command trusts"),
        ("SSL_CERT_DIR", "it changes which servers the command trusts"),
        ("NODE_EXTRA_CA_CERTS", "it changes which servers the command trusts"),
        ("REQUESTS_CA_BUNDLE", "it changes which servers the command trusts"),
        ("NODE_TLS_REJECT_UNAUTHORIZED", "it changes which servers the command trusts"),
        ("BASH_FUNC_uvx%%", "it makes a shell run other code"),
        ("YARN_REGISTRY", "it changes where yarn, bun or corepack fetch packages from"),
        ("yarn_registry", "it changes where yarn, bun or corepack fetch packages from"),
        ("BUN_CONFIG_REGISTRY", "it changes where yarn, bun or corepack fetch packages from"),
        ("COREPACK_NPM_REGISTRY", "it changes where yarn, bun or corepack fetch packages from"),
        ("NPM_CONFIG_REGISTRY", "it changes where npx or npm fetch packages from"),
        ("Npm_Config_Registry", "it changes where npx or npm fetch packages from"),
        ("XDG_DATA_HOME", "it changes where the command reads its configuration and cached packages from"),
        ("XDG_CACHE_HOME", "it changes where the command reads its configuration and cached packages from"),
        ("XDG_CONFIG_DIRS", "it changes where the command reads its configuration and cached packages from"),
        ("UV_CACHE_DIR", "it changes where uvx fetches packages from, or which Python it runs"),
    ],
)
def test_with_an_allowlist_the_env_may_not_redirect_what_an_allowed_command_fetches_or_trusts(
    name: str, why: str
) -> None:
    """Each of these was allowed: a C library loading other code, a proxy or a CA bundle of the spec's
    between the command and its package registry, an exported bash function, yarn's, bun's or corepack's
    registry; npm reads its settings in any case, so every spelling of npm_config_* is refused."""
    from kubechain.mcp.spec import env_problem

    assert env_problem([name], ["npx", "uvx"]) == (
        f'env var "{name}" may not be set while stdio commands are restricted '
        f"(KUBECHAIN_MCP_COMMAND_ALLOWLIST): {why}"
    )


def test_with_an_allowlist_env_names_are_matched_in_their_own_case() -> None:
    """Linux environment names are case-sensitive: ld.so reads LD_PRELOAD, execvp PATH, git GIT_*, not
    ld_preload, path or git_dir, which are other variables (a server's own settings). They were refused."""
    from kubechain.mcp.spec import env_problem

    names = ["env", "home", "path", "Path", "ld_preload", "pythonpath", "git_dir", "uv_index_url"]
    assert env_problem(names, ["npx", "uvx"]) is None


def test_with_an_allowlist_a_few_harmless_package_manager_settings_are_allowed() -> None:
    """Settings people put in MCP specs that change neither what runs nor where it comes from (log level,
    answering npx's install prompt, uv's progress bar, git not prompting for a password)."""
    from kubechain.mcp.spec import env_problem

    names = ["npm_config_loglevel", "NPM_CONFIG_LOGLEVEL", "NPM_CONFIG_YES", "npm_config_yes"]
    assert env_problem([*names, "UV_NO_PROGRESS", "GIT_TERMINAL_PROMPT"], ["npx", "uvx"]) is None


@pytest.mark.parametrize(
    ("url", "said"),
    [
        *MALFORMED_URLS,
        (
            "https://apiuser:s3cret@mcp.example/mcp",
            'url holds credentials ("user:password@" before its host)',
        ),
    ],
)
@pytest.mark.parametrize("transport", ["http", "sse"])
def test_an_mcp_server_url_no_client_can_send_to_is_refused_saying_what_to_fix(
    transport: str, url: str, said: str
) -> None:
    """Only the scheme was checked: the rest failed as "Connection failed" in the SDK's words (a DNS error
    for a host with a space), an unclosed IPv6 bracket raised out of the validation (the task retried
    it), and userinfo was sent as Basic auth. Said without quoting the URL."""
    problem = validate_spec(mcp_server("x", transport=transport, url=url).spec)
    assert problem is not None and problem.startswith(said if said.startswith("url ") else f"url {said}")
    assert "s3cret" not in problem and "apiuser" not in problem, problem


@pytest.mark.parametrize("url", WELL_FORMED_URLS)
def test_an_mcp_server_url_a_client_can_send_to_is_taken(url: str) -> None:
    assert validate_spec(mcp_server("x", transport="http", url=url).spec) is None


def test_spec_validation_messages() -> None:
    assert validate_spec(mcp_server("x", transport="stdio").spec) == "command is required for stdio servers"
    assert validate_spec(mcp_server("x", transport="http").spec) == "url is required for http servers"
    assert validate_spec(mcp_server("x", transport="sse").spec) == "url is required for sse servers"
    assert "http:// or https://" in (
        validate_spec(mcp_server("x", transport="http", url="ftp://h/").spec) or ""
    )
    bad_env = mcp_server("x", transport="stdio", command="c", env=[{"name": "A", "valueFrom": {}}]).spec
    assert validate_spec(bad_env) == 'env var "A": valueFrom needs a secretKeyRef'


def test_bad_command_and_early_exit_explain_themselves(manager: MCPManager) -> None:
    with pytest.raises(MCPError, match="cannot start stdio command '/nonexistent/mcp-server'.*No such file"):
        manager.list_tools(mcp_server("missing", transport="stdio", command="/nonexistent/mcp-server"))
    # The server exits at startup: the message carries its exit code and what it printed on stderr.
    with pytest.raises(MCPError, match=r"exit code 1.*invalid --local-timezone 'Bogus/Zone'"):
        manager.list_tools(time_server("time-bogus", "--local-timezone", "Bogus/Zone"))


# -- the in-test stdio server ---------------------------------------------------------------------


def test_env_from_secret_reaches_the_child_and_is_never_logged(
    manager: MCPManager, stdio_script: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("KUBECHAIN_TEST_NOT_INHERITED", "leak")
    server = script_server(
        "env-server",
        stdio_script,
        env=[
            {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "api-key"}}},
            {"name": "PLAIN", "value": "literal"},
        ],
    )
    # The child has the value; an answer that quotes it is cut, one that does not (reversed) shows it came.
    assert manager.call_tool(server, "env", {"name": "API_KEY"}).text == "***"
    assert manager.call_tool(server, "env_reversed", {"name": "API_KEY"}).text == "s3cret-env-value"[::-1]
    assert manager.call_tool(server, "env", {"name": "PLAIN"}).text == "literal"
    assert manager.call_tool(server, "env", {"name": "PATH"}).text != "<unset>"  # minimal inherited env
    assert manager.call_tool(server, "env", {"name": "KUBECHAIN_TEST_NOT_INHERITED"}).text == "<unset>"
    assert "s3cret-env-value" not in caplog.text


def test_secret_rotation_reconnects(manager: MCPManager, stdio_script: str) -> None:
    env = [{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "rotating", "key": "k"}}}]
    server = script_server("rotating-server", stdio_script, env=env)
    SECRETS[("default", "rotating", "k")] = "first"
    try:
        assert manager.call_tool(server, "env_reversed", {"name": "API_KEY"}).text == "tsrif"
        SECRETS[("default", "rotating", "k")] = "second"
        assert manager.call_tool(server, "env_reversed", {"name": "API_KEY"}).text == "dnoces"
    finally:
        del SECRETS[("default", "rotating", "k")]


def test_missing_secret_is_a_clear_error(manager: MCPManager, stdio_script: str) -> None:
    env = [{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "missing"}}}]
    with pytest.raises(
        MCPError, match='cannot resolve env var "API_KEY" from secret "tokens": key "missing" not found'
    ):
        manager.list_tools(script_server("no-secret", stdio_script, env=env))


def test_crash_during_a_call_is_not_retried_unless_idempotent(
    manager: MCPManager, stdio_script: str, tmp_path: Path
) -> None:
    server = script_server("crashy", stdio_script)
    with pytest.raises(MCPError, match="not marked idempotent"):
        manager.call_tool(server, "die_once", {"marker": str(tmp_path / "first")})
    # the session is replaced on the next call
    assert manager.call_tool(server, "die_once", {"marker": str(tmp_path / "first")}).text == "survived"

    retried = script_server("crashy-idempotent", stdio_script, idempotent=True)
    assert manager.call_tool(retried, "die_once", {"marker": str(tmp_path / "second")}).text == "survived"


def test_a_server_still_working_is_asked_again_until_the_call_timeout(
    stdio_script: str, tmp_path: Path
) -> None:
    """A long-running tool answers "still working" (2026 protocol) many times: the call waits for it, as
    long as its timeout allows, instead of failing after the SDK's default ten rounds (~2 s)."""
    patient = MCPManager(resolve_secret, call_timeout_s=60, connect_timeout_s=CONNECT_TIMEOUT_S)
    impatient = MCPManager(resolve_secret, call_timeout_s=1.5, connect_timeout_s=CONNECT_TIMEOUT_S)
    try:
        server = script_server("long-runner", stdio_script)
        result = patient.call_tool(server, "still_working", {"marker": str(tmp_path / "a"), "rounds": 14})
        assert result.text == "done after 15 requests"
        with pytest.raises(MCPError, match="still working after 1.5s.*may have run"):
            impatient.call_tool(server, "still_working", {"marker": str(tmp_path / "b"), "rounds": 1000})
    finally:
        patient.close()
        impatient.close()


def test_a_session_replaced_while_a_caller_holds_it_sends_it_nothing(
    manager: MCPManager, stdio_script: str, tmp_path: Path
) -> None:
    """The caller got the session, then another thread replaced it (its MCPServer changed): the request
    goes to a fresh session rather than to one being stopped, which could cut it off mid-call."""
    from kubechain.mcp.session import ConnectionLost

    server = script_server("replaced", stdio_script)
    assert manager.call_tool(server, "env", {"name": "HOME"}).text
    session = manager._peek("default", "replaced")
    assert session is not None
    session.retired = True  # what _retire does while the caller is between its steps
    marker = tmp_path / "ran"
    with pytest.raises(ConnectionLost) as lost:
        manager._run(lambda: session.call_tool("die_once", {"marker": str(marker)}), 30, "calling")
    assert not lost.value.maybe_executed
    assert not marker.exists(), "the tool did not run"


LISTER = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import anyio
    from mcp.server.mcpserver import MCPServer

    lists = Path(os.environ["LISTS_FILE"])


    class Lister(MCPServer):
        async def list_tools(self):  # 1st: without "late"; 2nd: never answers; then all of them
            count = int(lists.read_text()) + 1 if lists.exists() else 1
            lists.write_text(str(count))
            tools = await super().list_tools()
            if count == 1:
                return [tool for tool in tools if tool.name != "late"]
            if count == 2:
                await anyio.sleep(3600)
            return tools


    server = Lister("lister")


    @server.tool()
    def late() -> str:
        return "late ran"


    server.run()
    """
)


def test_a_tools_list_that_hangs_before_a_call_moves_the_call_to_a_fresh_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The call's tool was not in the first listing, so the session lists again, and that hangs: nothing
    was called yet, so the call goes on, on a fresh session, instead of failing."""
    caplog.set_level(logging.INFO, logger="kubechain")
    script = tmp_path / "lister.py"
    script.write_text(LISTER)
    # The hung listing is given up after the list timeout, short: the connect timeout (starting a python
    # server, twice) is generous, as a loaded machine may take more than 10 s to start one.
    lister = MCPManager(resolve_secret, call_timeout_s=30, connect_timeout_s=120, list_timeout_s=2)
    try:
        server = mcp_server(
            "lister",
            transport="stdio",
            command=sys.executable,
            args=[str(script)],
            env=[{"name": "LISTS_FILE", "value": str(tmp_path / "lists")}],
        )
        assert [t.name for t in lister.list_tools(server)] == []
        assert lister.call_tool(server, "late", {}).text == "late ran"
        assert (tmp_path / "lists").read_text() == "3"
        assert "listing tools timed out after 2s" in caplog.text, "given up at the list timeout"
    finally:
        lister.close()


# -- HTTP transports ------------------------------------------------------------------------------


def test_streamable_http_with_secret_header(
    manager: MCPManager, http_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kubechain")
    server = mcp_server("http-server", transport="http", url=http_url, headers=BEARER_HEADERS)
    assert [t.name for t in manager.list_tools(server)] == ["whoami"]
    result = manager.call_tool(server, "whoami", {})
    assert result == type(result)(text="authorized; x-team=platform", is_error=False)

    unauthenticated = mcp_server("http-anon", transport="http", url=http_url)
    denied = manager.call_tool(unauthenticated, "whoami", {})
    assert denied.is_error and "unauthorized" in denied.text
    assert "s3cret-bearer-value" not in caplog.text

    manager.disconnect("default", "http-server")
    manager.disconnect("default", "http-anon")
    assert not manager.connected("default", "http-server")


def test_sse_with_secret_header(manager: MCPManager, sse_url: str) -> None:
    server = mcp_server("sse-server", transport="sse", url=sse_url, headers=BEARER_HEADERS)
    assert manager.call_tool(server, "whoami", {}).text == "authorized; x-team=platform"
    manager.disconnect("default", "sse-server")


def test_an_http_server_that_speaks_sse_is_said_to_need_transport_sse(
    manager: MCPManager, sse_url: str
) -> None:
    """``transport: http`` at an SSE endpoint failed with the SDK's "Server returned an error response":
    nothing said that the server answered the POST 405 and speaks SSE."""
    server = mcp_server("sse-as-http", transport="http", url=sse_url, headers=BEARER_HEADERS)
    with pytest.raises(MCPError) as failed:
        manager.list_tools(server)
    assert str(failed.value) == (
        f"cannot connect to http {sse_url}: answered HTTP 405 to POST; this server speaks SSE: set transport: sse"
    )


def test_an_http_server_refusing_the_post_that_is_no_sse_server_is_not_said_to_be_one(
    manager: MCPManager, http_url: str
) -> None:
    url = http_url.removesuffix("/mcp") + "/nothing-here"
    with pytest.raises(MCPError) as failed:
        manager.list_tools(mcp_server("http-404", transport="http", url=url))
    text = str(failed.value)
    assert text.startswith(f"cannot connect to http {url}: ") and "SSE" not in text, text


def test_unreachable_http_server(manager: MCPManager) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(MCPError, match=f"cannot connect to http http://127.0.0.1:{port}/mcp"):
        manager.list_tools(mcp_server("http-down", transport="http", url=f"http://127.0.0.1:{port}/mcp"))


def test_a_call_to_an_http_server_gone_since_its_session_opened_was_never_sent(manager: MCPManager) -> None:
    """The POST could not connect, so the tool did not run: the call is retried on a fresh session (which
    finds the server down) instead of being reported as one that may have run."""
    app = _http_mcp_server()
    with UvicornThread(app.streamable_http_app(host="127.0.0.1")) as gone:
        url = f"http://127.0.0.1:{gone.port}/mcp"
        server = mcp_server("http-gone", transport="http", url=url)  # not idempotent
        assert [t.name for t in manager.list_tools(server)] == ["whoami"]
    assert manager.connected("default", "http-gone")  # nothing told the session yet
    with pytest.raises(MCPError) as failed:
        manager.call_tool(server, "whoami", {})
    assert f"cannot connect to http {url}" in str(failed.value)
    assert "may have run" not in str(failed.value)


def test_a_call_may_have_run_if_any_of_its_requests_left_though_a_repeat_could_not_connect() -> None:
    """A call can send tools/call more than once (a server answering "still working" is asked again):
    a repeat that never left does not make the first one unsent."""
    import anyio
    import httpx2

    from kubechain.mcp.session import _ATTEMPT, Attempt, _UnsentCallTransport

    class Refusing(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            raise httpx2.ConnectError("connection refused", request=request)

    call = httpx2.Request(
        "POST", "http://mcp.test/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    )
    listing = httpx2.Request(
        "POST", "http://mcp.test/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    )

    async def send(attempt: Attempt, request: httpx2.Request) -> None:
        token = _ATTEMPT.set(attempt)
        try:
            with pytest.raises(httpx2.ConnectError):
                await _UnsentCallTransport(Refusing()).handle_async_request(request)
        finally:
            _ATTEMPT.reset(token)

    repeated = Attempt()
    repeated.sends = 2  # the first went out; its repeat is the one refused
    anyio.run(send, repeated, call)
    assert repeated.unsent == 1 and repeated.may_have_run

    only = Attempt()
    only.sends = 1
    anyio.run(send, only, call)
    assert not only.may_have_run

    anyio.run(send, only, listing)  # not a tools/call: says nothing about the call
    assert only.unsent == 1


async def _request_messages(receive: Any) -> list[dict[str, Any]]:
    """An ASGI request's body messages, all of them (read to look into the JSON-RPC request)."""
    received = []
    while True:
        message = await receive()
        received.append(message)
        if not message.get("more_body"):
            return received


def _replaying(received: list[dict[str, Any]], receive: Any) -> Any:
    """An ASGI ``receive`` that gives the app the messages already read first, then the rest."""

    async def replay() -> Any:
        return received.pop(0) if received else await receive()

    return replay


def refusing_tool_calls(
    app: Any, status: int, refuse: Callable[[], bool], headers: list[tuple[bytes, bytes]] | None = None
) -> Any:
    """``app`` (ASGI), answering a tools/call POST with a bare ``status`` (no JSON-RPC body, as a proxy
    or gateway would) whenever ``refuse()`` says so."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await app(scope, receive, send)
        received = await _request_messages(receive)
        if b'"tools/call"' in b"".join(m.get("body", b"") for m in received) and refuse():
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"text/plain"), *(headers or [])],
                }
            )
            await send({"type": "http.response.body", "body": b"refused"})
            return None

        return await app(scope, _replaying(received, receive), send)

    return wrapped


def test_an_http_error_status_on_a_tool_call_is_named(manager: MCPManager) -> None:
    """The SDK says only "Server returned an error response": the status says what to fix."""
    app = _http_mcp_server().streamable_http_app(host="127.0.0.1")
    with UvicornThread(refusing_tool_calls(app, 401, lambda: True)) as refusing:
        server = mcp_server("http-401", transport="http", url=f"http://127.0.0.1:{refusing.port}/mcp")
        with pytest.raises(
            MCPError, match=r"error calling tool whoami: http http://127.0.0.1:\d+/mcp answered HTTP 401"
        ):
            manager.call_tool(server, "whoami", {})
        manager.disconnect("default", "http-401")


@pytest.mark.parametrize(
    ("status", "headers", "sent_again"),
    [
        (429, [], True),  # a rate limit: not run
        (503, [(b"retry-after", b"1")], True),  # overloaded, asking to come back: not run
        (503, [], False),  # a proxy's bare 503 may follow a request the server had received
    ],
    ids=["429", "503-retry-after", "503-bare"],
)
def test_a_tool_call_refused_before_it_ran_is_sent_once_more(
    manager: MCPManager, status: int, headers: list[tuple[bytes, bytes]], sent_again: bool
) -> None:
    """Refused before it ran: one more try on a fresh session, even for a server not marked idempotent.
    Otherwise the call may have run, and a server not marked idempotent is not sent it again."""
    refusals = [True]
    app = _http_mcp_server().streamable_http_app(host="127.0.0.1")
    refusing = refusing_tool_calls(app, status, lambda: bool(refusals and refusals.pop()), headers)
    name = f"http-{status}-{len(headers)}"
    with UvicornThread(refusing) as flaky:
        server = mcp_server(name, transport="http", url=f"http://127.0.0.1:{flaky.port}/mcp")
        if sent_again:
            assert "unauthorized" in manager.call_tool(server, "whoami", {}).text  # it ran, once
        else:
            with pytest.raises(MCPError, match=f"answered HTTP {status}.*may have run"):
                manager.call_tool(server, "whoami", {})
        assert refusals == []
        manager.disconnect("default", name)


class ForgetfulLegacyServer:
    """A streamable-HTTP server of the 2025 protocol (it refuses server/discover, so the client makes the
    handshake and holds an Mcp-Session-Id) that can "restart": the session ids it was sent before then get
    the SDK server's own answer to an unknown one, HTTP 404 with a JSON-RPC error in the body."""

    def __init__(self, app: Any, restart_on_call: str | None = None) -> None:
        self.app = app
        self.restart_on_call = restart_on_call  # restart when this tool is called (mid-call)
        self.seen: set[bytes] = set()
        self.forgotten: set[bytes] = set()
        self.refused: list[str] = []  # the requests answered 404, by JSON-RPC method or HTTP method

    def restart(self) -> None:
        self.forgotten |= self.seen

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        session_id = dict(scope["headers"]).get(b"mcp-session-id")
        received = await _request_messages(receive) if scope["method"] == "POST" else []
        body = b"".join(m.get("body", b"") for m in received)
        request = json.loads(body) if body else {}
        if request.get("method") == "server/discover":
            error, status, request_id = {"code": -32601, "message": "Method not found"}, 200, request["id"]
        elif session_id in self.forgotten:
            self.refused.append(request.get("method") or scope["method"])
            error, status, request_id = {"code": -32600, "message": "Session not found"}, 404, None
        else:
            if session_id is not None:
                self.seen.add(session_id)
            if request.get("method") == "tools/call" and request["params"]["name"] == self.restart_on_call:
                self.restart()
            return await self.app(scope, _replaying(received, receive), send)
        answer = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})
        return None


def test_a_legacy_http_session_its_restarted_server_forgot_is_replaced() -> None:
    """A 2025-protocol server that restarted answers the old session id with 404 and a JSON-RPC error
    ("Session not found"), not the SDK client's "Session terminated": every later request of the worker
    failed so, on a session still taken for connected. The request did not run: it goes to a new session."""
    restarting = ForgetfulLegacyServer(_http_mcp_server().streamable_http_app(host="127.0.0.1"))
    m = MCPManager(resolve_secret, call_timeout_s=30, connect_timeout_s=CONNECT_TIMEOUT_S)
    with UvicornThread(restarting) as up:
        try:
            server = mcp_server("http-legacy", transport="http", url=f"http://127.0.0.1:{up.port}/mcp")
            assert "unauthorized" in m.call_tool(server, "whoami", {}).text  # not idempotent: ran once
            first = m._peek("default", "http-legacy")
            assert first is not None and first.client is not None
            assert first.client.protocol_version == "2025-11-25", "the legacy handshake"

            restarting.restart()
            assert "unauthorized" in m.call_tool(server, "whoami", {}).text
            assert restarting.refused[0] == "tools/call" and m._peek("default", "http-legacy") is not first

            restarting.restart()
            assert [t.name for t in m.list_tools(server)] == ["whoami"]
            assert restarting.refused.count("tools/list") == 1 and m.connected("default", "http-legacy")
        finally:
            m.close()


class NoGetRoute(ForgetfulLegacyServer):
    """A stateful server that routes only POST (an Express app with just ``app.post``): the SDK client's
    GET stream, opened with the session id after the handshake, is answered 404 (the spec says 405)."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.gets = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            self.gets += 1
            await send(
                {"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/html")]}
            )
            await send({"type": "http.response.body", "body": b"Cannot GET /mcp"})
            return None
        return await super().__call__(scope, receive, send)


def test_a_404_to_the_get_stream_is_not_a_forgotten_session() -> None:
    """Only a POST answered 404 for our session id says the server forgot it: a 404 to the GET stream
    marked every new session broken, and every call to such a server failed."""
    from kubechain.testing.waiting import wait_for

    no_get = NoGetRoute(_http_mcp_server().streamable_http_app(host="127.0.0.1"))
    m = MCPManager(resolve_secret, call_timeout_s=30, connect_timeout_s=CONNECT_TIMEOUT_S)
    with UvicornThread(no_get) as up:
        try:
            server = mcp_server("http-no-get", transport="http", url=f"http://127.0.0.1:{up.port}/mcp")
            assert "unauthorized" in m.call_tool(server, "whoami", {}).text
            first = m._peek("default", "http-no-get")
            wait_for(lambda: no_get.gets, what="the client's GET stream to be refused")
            assert "unauthorized" in m.call_tool(server, "whoami", {}).text
            assert m._peek("default", "http-no-get") is first and m.connected("default", "http-no-get")
        finally:
            m.close()


@pytest.mark.parametrize(
    ("method", "session", "body", "forgotten"),
    [
        (
            "POST",
            True,
            b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}',
            True,
        ),
        ("POST", True, b"Not Found", True),  # the bare 404 the spec describes
        (
            "POST",
            True,
            b'{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"Method not found"}}',
            False,
        ),
        ("GET", True, b"Cannot GET /mcp", False),
        ("POST", False, b"Not Found", False),  # no session to forget (the handshake itself)
    ],
)
def test_only_a_post_on_our_session_answered_404_about_it_is_a_forgotten_session(
    method: str, session: bool, body: bytes, forgotten: bool
) -> None:
    import asyncio

    import httpx2

    from kubechain.mcp.session import _session_forgotten

    headers = {"mcp-session-id": "abc"} if session else {}
    request = httpx2.Request(method, "http://mcp.example/mcp", headers=headers)
    response = httpx2.Response(404, content=body, request=request)
    assert asyncio.run(_session_forgotten(request, response)) is forgotten


def test_a_probe_its_restarted_server_refuses_gives_the_session_up() -> None:
    """A call timed out and the server restarted meanwhile: the liveness probe's 404 ("Session not found")
    is no answer from a live session, and the next call starts a new one."""
    app = SDKServer("slow-http")

    @app.tool()
    async def slow(seconds: float) -> str:
        import anyio

        await anyio.sleep(seconds)
        return "done"

    restarting = ForgetfulLegacyServer(app.streamable_http_app(host="127.0.0.1"), restart_on_call="slow")
    m = MCPManager(resolve_secret, call_timeout_s=0.5, connect_timeout_s=CONNECT_TIMEOUT_S)
    with UvicornThread(restarting) as up:
        try:
            server = mcp_server("http-probed", transport="http", url=f"http://127.0.0.1:{up.port}/mcp")
            with pytest.raises(MCPError, match="timed out"):
                m.call_tool(server, "slow", {"seconds": 30})
            assert "tools/list" in restarting.refused, "the probe"
            assert not m.connected("default", "http-probed")
        finally:
            m.close()


def test_callers_queued_behind_a_failing_connect_share_its_failure() -> None:
    """A server that accepts connections but never answers: four calls at once make one connect attempt
    between them, and all four hear why, instead of each waiting a whole connect timeout in turn."""
    import concurrent.futures

    from tests.unit.silent_server import SilentServer

    black_hole = SilentServer()
    port = black_hole.port
    slow = MCPManager(resolve_secret, call_timeout_s=5, connect_timeout_s=1)
    try:
        server = mcp_server("black-hole", transport="http", url=f"http://127.0.0.1:{port}/mcp")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(slow.call_tool, server, "whoami", {}) for _ in range(4)]
            errors = [call.exception(timeout=60) for call in calls]
        assert all(isinstance(e, MCPError) and "timed out after 1s connecting" in str(e) for e in errors), (
            errors
        )
        assert len(black_hole.held) == 1, "one connect attempt for the four calls"
    finally:
        slow.close()
        black_hole.close()


def test_an_sse_call_whose_post_is_refused_is_retried_at_once_not_after_its_timeout() -> None:
    """Over SSE the SDK only logs a failed POST: the call waited out its whole timeout, then counted as
    one that may have run. It is now given up at once and, refused before it ran, sent again."""
    refusals = [True]
    app = _http_mcp_server().sse_app(host="127.0.0.1")
    impatient = MCPManager(
        resolve_secret, call_timeout_s=30, connect_timeout_s=CONNECT_TIMEOUT_S, call_budget_s=20
    )
    try:
        with UvicornThread(refusing_tool_calls(app, 503, lambda: bool(refusals and refusals.pop()))) as flaky:
            server = mcp_server("sse-503", transport="sse", url=f"http://127.0.0.1:{flaky.port}/sse")
            assert "unauthorized" in impatient.call_tool(server, "whoami", {}).text  # the tool ran, once
            assert refusals == []
    finally:
        impatient.close()


def redirecting_posts(app: Any, path: str, location: Callable[[str], str] | None = None) -> Any:
    """``app`` (ASGI), answering each POST to ``path`` not yet redirected with 307 to the same path (a
    proxy adding a slash, an http-to-https upgrade); with ``location(query)``, only tools/call POSTs, to it."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        query = scope.get("query_string", b"").decode()
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != path or "hop=1" in query:
            return await app(scope, receive, send)
        received = await _request_messages(receive)
        if location is None or b'"tools/call"' in b"".join(m.get("body", b"") for m in received):
            target = location(query) if location else f"{path}?{query}&hop=1" if query else f"{path}?hop=1"
            await send(
                {
                    "type": "http.response.start",
                    "status": 307,
                    "headers": [(b"location", target.encode()), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return None

        return await app(scope, _replaying(received, receive), send)

    return wrapped


def _counting_server(runs: list[str]) -> Any:
    server = SDKServer("counting")

    @server.tool()
    def charge() -> str:
        runs.append("charged")
        return "charged"

    return server


@pytest.mark.parametrize("transport", ["sse", "http"])
def test_a_tool_call_redirected_within_its_origin_runs_once_and_succeeds(transport: str) -> None:
    """The SDK follows a 307/308 that stays within the server's origin: over SSE the call was taken for
    refused at the 307 hop and abandoned while the SDK delivered the redirected POST, so the tool ran,
    the call was sent again on a fresh session (it ran twice) and the LLM heard it failed."""
    runs: list[str] = []
    counting = _counting_server(runs)
    if transport == "sse":
        app, path, endpoint = counting.sse_app(host="127.0.0.1"), "/messages/", "/sse"
    else:
        app, path, endpoint = counting.streamable_http_app(host="127.0.0.1"), "/mcp", "/mcp"
    m = MCPManager(resolve_secret, call_timeout_s=30, connect_timeout_s=CONNECT_TIMEOUT_S, call_budget_s=40)
    try:
        with UvicornThread(redirecting_posts(app, path)) as up:
            name = f"redirected-{transport}"  # not idempotent
            server = mcp_server(name, transport=transport, url=f"http://127.0.0.1:{up.port}{endpoint}")
            assert m.call_tool(server, "charge", {}).text == "charged"
            assert runs == ["charged"], "the tool ran once"
            assert m.connected("default", name), "the session was kept"
    finally:
        m.close()


def test_an_sse_tool_call_redirected_out_of_its_origin_was_not_run() -> None:
    """A redirect the SDK does not follow (another origin) is a refusal: the tool did not run, and the
    call says so rather than that it may have run."""
    runs: list[str] = []
    app = _counting_server(runs).sse_app(host="127.0.0.1")
    m = MCPManager(resolve_secret, call_timeout_s=30, connect_timeout_s=CONNECT_TIMEOUT_S, call_budget_s=40)
    try:
        elsewhere = redirecting_posts(app, "/messages/", lambda query: f"http://elsewhere.invalid/m?{query}")
        with UvicornThread(elsewhere) as up:
            server = mcp_server("redirected-away", transport="sse", url=f"http://127.0.0.1:{up.port}/sse")
            with pytest.raises(MCPError) as failed:
                m.call_tool(server, "charge", {})
            assert "answered HTTP 307" in str(failed.value) and "may have run" not in str(failed.value)
            assert runs == []
    finally:
        m.close()


@pytest.mark.parametrize(
    ("status", "location", "in_a_row", "abandoned", "may_have_run"),
    [
        (307, "/messages/?hop=1", 1, False, True),  # followed: the call goes on there
        (308, "https://mcp.test/messages/", 1, False, True),  # the https upgrade on default ports: followed
        (307, "http://elsewhere.test/messages/", 1, True, False),  # another origin: not followed, not run
        (307, "/messages/?hop=1", 3, True, False),  # past the client's max_redirects (2 here): not followed
        # the POST would become a GET, not followed; but "see other" is the answer of a POST the server
        # ran (and 301/302 are often used so)
        (303, "/messages/?hop=1", 1, True, True),
        (302, "/messages/?hop=1", 1, True, True),
        (301, "/messages/?hop=1", 1, True, True),
    ],
    ids=["same-origin", "https-upgrade", "other-origin", "too-many", "303", "302", "301"],
)
def test_only_a_redirect_of_a_tool_call_the_sdk_does_not_follow_is_a_refusal(
    status: int, location: str, in_a_row: int, abandoned: bool, may_have_run: bool
) -> None:
    """An SSE message POST answered 303 See Other was taken for refused before it ran (and sent again on
    a new session, not idempotent or not): 303, and the 301/302 a POST-redirect-GET answers with, may
    follow a POST the server ran. Only 307/308, which ask for the same request elsewhere, are refusals."""
    assert _redirected_call(status, location, in_a_row) == (
        abandoned,
        may_have_run,
        status if abandoned else 0,
    )


def _redirected_call(status: int, location: str, in_a_row: int = 1) -> tuple[bool, bool, int]:
    """A tools/call POST answered ``status`` to ``location`` (``in_a_row`` times) through the SSE client's
    transport: (abandoned, may have run, the status noted)."""
    import anyio
    import httpx2

    from kubechain.mcp.session import _ATTEMPT, Attempt, _watching_unsent_calls

    class Redirecting(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            return httpx2.Response(status, headers={"location": location})

    abandoned: list[bool] = []
    client = httpx2.AsyncClient(transport=Redirecting(), max_redirects=2)
    transport = _watching_unsent_calls(client, abandon_on_failure=True)._transport
    call = httpx2.Request(
        "POST", "http://mcp.test/messages/", json={"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    )

    async def send(attempt: Attempt) -> None:
        token = _ATTEMPT.set(attempt)
        try:
            for _ in range(in_a_row):
                await transport.handle_async_request(call)
        finally:
            _ATTEMPT.reset(token)

    attempt = Attempt()
    attempt.sends = 1
    attempt.abandon = lambda: abandoned.append(True)
    anyio.run(send, attempt)
    return bool(abandoned), attempt.may_have_run, attempt.http_status


@pytest.mark.parametrize(
    ("status", "location", "in_a_row", "refused"),
    [
        (307, "/messages/?hop=1", 1, False),
        (308, "https://mcp.test/messages/", 1, False),
        (307, "//mcp.test:80/messages/", 1, False),
        (307, "http://elsewhere.test/messages/", 1, True),
        (307, "http://user:pw@mcp.test/messages/", 1, True),  # userinfo of its own: not followed
        (307, "http://mcp.test:8080/messages/", 1, True),
        (307, "/messages/?hop=1", 3, True),
        (307, "http://[bad", 1, True),  # an invalid Location: not followed
    ],
    ids=[
        "same-origin",
        "https-upgrade",
        "scheme-relative",
        "other-origin",
        "userinfo",
        "other-port",
        "too-many",
        "bad",
    ],
)
@pytest.mark.parametrize("helper", [True, False], ids=["httpx2-helper", "helper-gone"])
def test_a_redirect_is_judged_without_httpx2s_private_helper(
    status: int,
    location: str,
    in_a_row: int,
    refused: bool,
    helper: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The redirect a tools/call POST got was judged with httpx2's private _build_redirect_request: gone
    (renamed by a later httpx2), the transport raised AttributeError, and the call failed as a lost
    connection (streamable HTTP) or waited out its whole timeout (SSE). Its target is now worked out
    here when it is gone (said once in the log)."""
    import httpx2

    import kubechain.mcp.session as session

    if not helper:
        monkeypatch.delattr(httpx2._client.BaseClient, "_build_redirect_request")
    monkeypatch.setattr(session, "_WARNED", set(), raising=False)
    caplog.set_level(logging.WARNING, logger="kubechain.mcp")
    assert _redirected_call(status, location, in_a_row) == (refused, not refused, status if refused else 0)
    _redirected_call(status, location, in_a_row)
    assert caplog.text.count("_build_redirect_request") == (0 if helper else 1), caplog.text


def test_a_redirect_that_cannot_be_judged_is_taken_as_not_followed_and_may_have_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong judging a redirect, the transport answers: the call is given up (never left to
    wait out its timeout) and, not known to be refused, told it may have run."""
    import kubechain.mcp.session as session

    def broken(response: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(session, "next_request_within_origin", broken)
    caplog.set_level(logging.WARNING, logger="kubechain.mcp")
    assert _redirected_call(307, "/messages/?hop=1") == (True, True, 307)
    assert "cannot tell whether the MCP SDK follows" in caplog.text and "RuntimeError: a bug" in caplog.text


def test_a_call_its_transport_could_not_take_was_not_sent() -> None:
    """Over SSE a failed POST ends the SDK's sender: a second call handed to it then fails to be handed
    over at all, and so cannot have run (it is retried, even for a server not marked idempotent)."""
    import anyio
    import mcp_types as types
    from mcp.shared.message import SessionMessage

    from kubechain.mcp.session import _ATTEMPT, Attempt, _WatchedWriteStream

    class Gone:
        async def send(self, item: object) -> None:
            raise anyio.BrokenResourceError

    async def hand_over(attempt: Attempt) -> None:
        token = _ATTEMPT.set(attempt)
        try:
            request = types.JSONRPCRequest(jsonrpc="2.0", id=7, method="tools/call", params={"name": "x"})
            with pytest.raises(anyio.BrokenResourceError):
                await _WatchedWriteStream(Gone()).send(SessionMessage(request))
        finally:
            _ATTEMPT.reset(token)

    attempt = Attempt()
    anyio.run(hand_over, attempt)
    assert attempt.sends == 1 and not attempt.may_have_run


# -- results too large to read ----------------------------------------------------------------------

BIG_RESULTS = textwrap.dedent(
    """
    from pathlib import Path

    from mcp.server.mcpserver import MCPServer

    server = MCPServer("big-results")


    @server.tool()
    def big(kib: int, marker: str) -> str:
        path = Path(marker)
        path.write_text(path.read_text() + "ran\\n" if path.exists() else "ran\\n")
        return "x" * (kib * 1024)


    @server.tool()
    def small() -> str:
        return "small"


    if __name__ == "__main__":
        server.run()
    """
)


def test_a_stdio_result_larger_than_the_limit_fails_the_call_clearly_and_restarts_the_session(
    tmp_path: Path,
) -> None:
    """The SDK read a stdio server's answer whole, however large (quadratically: 32 MB took 36 s, a few
    hundred MB killed the worker and every call in flight). Past the limit the line is no longer read:
    the call fails saying so (not retried, even for an idempotent server: it would run and fail again)."""
    script = tmp_path / "big_results.py"
    script.write_text(BIG_RESULTS)
    marker = tmp_path / "runs"
    m = MCPManager(
        resolve_secret, call_timeout_s=30, connect_timeout_s=CONNECT_TIMEOUT_S, max_message_bytes=256 * 1024
    )
    try:
        server = script_server("big-stdio", str(script), idempotent=True)
        # (an SDK server sends its result twice: as text and as structured content)
        assert len(m.call_tool(server, "big", {"kib": 100, "marker": str(marker)}).text) == 100 * 1024
        pid = m.stdio_pid("default", "big-stdio")
        with pytest.raises(MCPError) as too_large:
            m.call_tool(server, "big", {"kib": 2048, "marker": str(marker)})
        assert str(too_large.value) == (
            "the result of tool big is larger than 256 KiB (KUBECHAIN_MCP_MAX_MESSAGE_BYTES) and was not read; "
            "the session was restarted. The tool may have run: ask it for less (a narrower query, a smaller page)"
        )
        assert marker.read_text() == "ran\nran\n", "run once, not retried"
        assert m.call_tool(server, "small", {}).text == "small"
        assert m.stdio_pid("default", "big-stdio") not in (None, pid), "the session was restarted"
    finally:
        m.close()


@pytest.mark.parametrize("json_response", [True, False], ids=["json", "sse"])
def test_an_http_result_larger_than_the_limit_fails_the_call_clearly(json_response: bool) -> None:
    """A streamable-HTTP server's JSON answer was read whole, however large; one sent as a server-sent
    event (2025 protocol) was cut at the SDK's 1 MiB and reported as a lost connection (and retried on an
    idempotent server)."""
    runs: list[int] = []
    app = SDKServer("big-http")

    @app.tool()
    def big(kib: int) -> str:
        runs.append(kib)
        return "x" * (kib * 1024)

    m = MCPManager(
        resolve_secret, call_timeout_s=30, connect_timeout_s=CONNECT_TIMEOUT_S, max_message_bytes=256 * 1024
    )
    try:
        served = app.streamable_http_app(host="127.0.0.1", json_response=json_response)
        with UvicornThread(served if json_response else ForgetfulLegacyServer(served)) as up:
            name = f"big-http-{'json' if json_response else 'sse'}"
            server = mcp_server(
                name, transport="http", url=f"http://127.0.0.1:{up.port}/mcp", idempotent=True
            )
            # (an SDK server sends its result twice: as text and as structured content)
            assert len(m.call_tool(server, "big", {"kib": 100}).text) == 100 * 1024
            with pytest.raises(MCPError) as too_large:
                m.call_tool(server, "big", {"kib": 2048})
            assert str(too_large.value) == (
                "the result of tool big is larger than 256 KiB (KUBECHAIN_MCP_MAX_MESSAGE_BYTES) and was not "
                "read. The tool ran: ask it for less (a narrower query, a smaller page)"
            )
            assert m.connected("default", name), "the session goes on"
            assert runs == [100, 2048], "not retried"
            assert len(m.call_tool(server, "big", {"kib": 1}).text) == 1024
    finally:
        m.close()


def test_a_legacy_sse_result_is_read_up_to_the_limit_and_one_over_it_is_not_run_again() -> None:
    """The legacy SSE transport read events up to the SDK's own 1 MiB, whatever the limit: a result of
    1.4 MiB ended the session as a lost connection, and was run again on an idempotent server (and told
    so on the second loss). Its events are now read up to the limit; one over it fails its call saying so,
    not retried, and the session is restarted."""
    runs: list[int] = []
    app = SDKServer("big-sse")

    @app.tool()
    def big(kib: int) -> str:
        runs.append(kib)
        return "x" * (kib * 1024)

    m = MCPManager(
        resolve_secret, call_timeout_s=30, connect_timeout_s=CONNECT_TIMEOUT_S, max_message_bytes=2 << 20
    )
    try:
        with UvicornThread(app.sse_app(host="127.0.0.1")) as up:
            url = f"http://127.0.0.1:{up.port}/sse"
            server = mcp_server("big-sse", transport="sse", url=url, idempotent=True)
            # (an SDK server sends its result twice: as text and as structured content)
            assert len(m.call_tool(server, "big", {"kib": 700}).text) == 700 * 1024
            with pytest.raises(MCPError) as too_large:
                m.call_tool(server, "big", {"kib": 1500})
            assert str(too_large.value) == (
                "the result of tool big is larger than 2 MiB (KUBECHAIN_MCP_MAX_MESSAGE_BYTES) and was not read; "
                "the session was restarted. The tool may have run: ask it for less (a narrower query, a smaller page)"
            )
            assert runs == [700, 1500], "not run again"
            assert len(m.call_tool(server, "big", {"kib": 1}).text) == 1024
    finally:
        m.close()


def test_an_event_too_large_is_recognised_whatever_limit_the_sdk_read_it_with() -> None:
    from kubechain.mcp.session import sse_event_limit

    assert sse_event_limit("Server-sent event exceeded the 1048576 byte limit.") == 1 << 20
    assert sse_event_limit("Server-sent event exceeded the 4194304 byte limit.") == 4 << 20
    assert sse_event_limit("Connection closed") is None


def test_without_the_sdks_sse_helper_the_lower_limit_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mcp.client import sse as sdk_sse

    from kubechain.mcp import session

    monkeypatch.delattr(sdk_sse, "sse_within_origin")
    caplog.set_level(logging.WARNING, logger="kubechain.mcp")
    session._install_sse_hook()
    assert "legacy SSE messages are read up to the SDK's own 1 MiB" in caplog.text


class _Body:
    """A response body served in chunks, counting what was read of it."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024) -> None:
        self.data, self.chunk, self.read = data, chunk, 0

    def stream(self) -> Any:
        import httpx2

        body = self

        class Stream(httpx2.AsyncByteStream):
            async def __aiter__(self) -> Any:
                for start in range(0, len(body.data), body.chunk):
                    body.read += min(body.chunk, len(body.data) - start)
                    yield body.data[start : start + body.chunk]

        return Stream()


def _bounded_client(answer: Callable[[Any], Any], **kwargs: Any) -> Any:
    import httpx2

    from kubechain.mcp.session import _watching_unsent_calls

    return _watching_unsent_calls(
        httpx2.AsyncClient(transport=httpx2.MockTransport(answer)), max_body_bytes=256 * 1024, **kwargs
    )


def _with_attempt(attempt: Any, work: Callable[[], Any]) -> Any:
    import anyio

    from kubechain.mcp.session import _ATTEMPT

    async def run() -> Any:
        token = _ATTEMPT.set(attempt)
        try:
            return await work()
        finally:
            _ATTEMPT.reset(token)

    return anyio.run(run)


TOOLS_CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "big"}}


def test_a_compressed_answer_is_bounded_by_its_decoded_size() -> None:
    """The bound counted the bytes on the wire: a gzip answer of 40 KiB that decodes to 40 MiB passed it
    and was decoded whole by the SDK's read."""
    import gzip

    import httpx2

    from kubechain.mcp.session import Attempt, ResultTooLarge

    decoded = (
        b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"' + b"x" * (40 << 20) + b'"}]}}'
    )
    body = _Body(gzip.compress(decoded, 9))
    assert body.data.__len__() < 256 * 1024

    def answer(request: httpx2.Request) -> httpx2.Response:
        headers = {"content-type": "application/json", "content-encoding": "gzip"}
        return httpx2.Response(200, headers=headers, stream=body.stream())

    client = _bounded_client(answer)
    attempt = Attempt()

    async def read() -> None:
        with pytest.raises(ResultTooLarge):
            await client.post("http://mcp.test/mcp", json=TOOLS_CALL)

    _with_attempt(attempt, read)
    assert attempt.too_large

    # an answer within the bound is decoded as before
    decoded = b'{"jsonrpc":"2.0","id":1,"result":{}}'
    body = _Body(gzip.compress(decoded))
    response = _with_attempt(Attempt(), lambda: client.post("http://mcp.test/mcp", json=TOOLS_CALL))
    assert response.content == decoded


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
@pytest.mark.parametrize("cut", [True, False], ids=["cut", "too-large"])
def test_a_body_read_up_to_the_bound_closes_the_stream_it_reads_then_and_there(
    encoding: str, cut: bool
) -> None:
    """Past the bound (a body cut, or ResultTooLarge), the iterator the body was read with (the stream's,
    or the decoder's over it) was left suspended until the garbage collector came by (an "asyncgen not
    finalized" warning, a connection held meanwhile). It is closed before the read ends."""
    import gzip

    import anyio
    import httpx2

    from kubechain.mcp.session import ResultTooLarge, _BoundedBody

    closed: list[str] = []
    data = b"x" * (64 * 1024)
    wire = gzip.compress(data) if encoding == "gzip" else data

    class Stream(httpx2.AsyncByteStream):
        async def __aiter__(self) -> Any:
            try:
                for at in range(0, len(wire), 1024):
                    yield wire[at : at + 1024]
            finally:
                closed.append("closed")

    async def read() -> None:
        headers = httpx2.Headers({"content-encoding": encoding})
        body = _BoundedBody(Stream(), 4096, None, headers, cut=cut)
        got = b""
        try:
            async for chunk in body:
                got += chunk
        except ResultTooLarge:
            assert not cut
            assert closed == ["closed"], "closed before the error is raised"
            return
        assert cut and got == data[:4096]
        assert closed == ["closed"], "closed before the read ends"

    anyio.run(read)


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (307, {"location": "/mcp?hop=1"}),  # followed: the SDK drains its body
        (404, {"content-type": "application/json"}),  # our session unknown: read to see why
        (400, {"content-type": "application/json"}),
    ],
    ids=["followed-redirect", "404", "400"],
)
def test_an_answer_that_is_not_a_result_is_read_only_up_to_the_bound(
    status: int, headers: dict[str, str]
) -> None:
    """A followed redirect's body (drained by the SDK) and a 404's (read to tell a forgotten session) were
    read before the bound was put on, whatever their size; a large error body was taken for a result too
    large, and the LLM told "the tool ran" of a call its server refused. Now each is read up to the bound
    only (the rest not at all), and only a 2xx answer is a result too large to read."""
    import httpx2
    from mcp.shared._httpx_utils import request_within_origin

    from kubechain.mcp.session import Attempt

    body = _Body(b"{" + b" " * (20 << 20) + b"}")
    gone: list[bool] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        if "hop=1" in str(request.url):
            return httpx2.Response(202)
        return httpx2.Response(status, headers=headers, stream=body.stream())

    client = _bounded_client(answer, on_session_gone=lambda: gone.append(True))
    attempt = Attempt()
    attempt.sends = 1
    response = _with_attempt(
        attempt,
        lambda: request_within_origin(
            client, "POST", "http://mcp.test/mcp", json=TOOLS_CALL, headers={"mcp-session-id": "s1"}
        ),
    )
    assert response.status_code == (202 if status == 307 else status)
    assert body.read <= 256 * 1024 + body.chunk, f"{body.read} bytes read"
    assert not attempt.too_large
    assert gone == ([True] if status == 404 else [])
    assert attempt.http_status == (0 if status == 307 else status)


def test_a_stdio_line_is_read_up_to_the_limit_however_it_is_cut_into_chunks() -> None:
    import anyio
    import anyio.abc

    from kubechain.mcp.session import _BoundedLines

    class Chunks(anyio.abc.ByteReceiveStream):
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        async def receive(self, max_bytes: int = 65536) -> bytes:
            if not self.chunks:
                raise anyio.EndOfStream
            return self.chunks.pop(0)

        async def aclose(self) -> None:
            pass

    def read(chunks: list[bytes], limit: int = 4) -> tuple[bytes, list[bytes]]:
        too_large: list[bytes] = []  # the start of each line too long, as the reader was told it
        bounded = _BoundedLines(Chunks(chunks), limit, too_large.append)

        async def all_of_it() -> bytes:
            out = b""
            while True:
                try:
                    out += await bounded.receive()
                except anyio.EndOfStream:
                    return out

        return anyio.run(all_of_it), too_large

    assert read([b"ab", b"cd\n", b"abcd\nab", b"cd"]) == (b"abcd\nabcd\nabcd", [])
    assert read([b"ab", b"cde\n", b"ab\n"]) == (b"ab", [b"abcde"])  # over in the chunk that ends the line
    assert read([b"a\nb\nabcde\nc\n"]) == (b"a\nb\n", [b"abcde"])  # the lines before it are read
    assert read([b"abc", b"de"]) == (b"abc", [b"abcde"])  # no newline yet, already over
    assert read([b"ab\nc", b"d", b"efgh"]) == (b"ab\ncd", [b"cdefgh"])  # its start, from earlier chunks
    assert read([b"abcd\n\nab"]) == (b"abcd\n\nab", [])


@pytest.mark.parametrize(
    ("head", "found"),
    [
        (b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"xxxx', 7),
        (b'{ "id" : "call-7" , "jsonrpc": "2.0", "result": {"content": "xx', "call-7"),
        (b'{"jsonrpc":"2.0","id":12', None),  # the id may go on past what was seen
        (b'{"result":{"content":[{"type":"text","text":"xxxx', None),  # the id after the result
        (b'{"result":{"id":3},"id":4,"jsonrpc":"2.0"', 4),  # an id inside the result is not its id
        (b'{"jsonrpc":"2.0","id":true,"result":', None),
        (b"not json at all", None),
        # a request or notification of the server's (its ids are numbered as ours are): no call's answer
        (b'{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"xxx', "not an answer"),
        (b'{"jsonrpc":"2.0","id":2,"method":"sampling/createMessage","params":{"m":"xx', "not an answer"),
        (b'{"jsonrpc":"2.0","method":"elicitation/create","id":0,"params":{"message":"xx', "not an answer"),
        (b'{"id":1,"jsonrpc":"2.0","params":{"x":"xx', "not an answer"),  # only a request has params
        (b'{"jsonrpc":"2.0","id":5,"error":{"code":-32603,"message":"xxx', 5),
    ],
)
def test_the_id_of_a_message_too_large_is_read_from_its_start(head: bytes, found: object) -> None:
    from kubechain.mcp.session import NOT_AN_ANSWER, _top_level_id

    assert _top_level_id(head) == (NOT_AN_ANSWER if found == "not an answer" else found)


@pytest.mark.parametrize(
    "head",
    [
        b'{"jsonrpc":"2.0","id":2,"method":"sampling/createMessage","params":{"m":"' + b"x" * 5000,
        b'{"jsonrpc":"2.0","method":"notifications/message","params":{"data":"' + b"x" * 5000,
    ],
    ids=["a-request-with-the-calls-id", "a-notification"],
)
def test_a_server_request_or_notification_too_large_is_blamed_on_no_call_in_flight(head: bytes) -> None:
    """A request of the server's (sampling, elicitation, roots/list, ping: ids 0, 1, 2... like ours) too
    large to read was taken for the answer to our call with the same id, and a notification (no id) for the
    answer of the only call in flight: that call was told its result was too large ("ask it for less", not
    retried). The call lost its connection, as with any end of the session (retried where it cannot have
    run or the server is idempotent)."""
    from kubechain.mcp.session import Attempt, ConnectionLost, Session, _BoundedLines
    from kubechain.mcp.spec import ResolvedSpec

    session = Session("stdio-asking", ResolvedSpec(transport="stdio", command="true"), 1, 5)
    session.inflight = 1
    attempt = Attempt()
    attempt.sends = 1
    attempt.request_ids.append(2)
    session._line_too_large(head[: _BoundedLines.HEAD_BYTES])
    ended = session._ended_by_too_large("search", attempt)
    assert isinstance(ended, ConnectionLost), ended
    assert ended.maybe_executed
    assert "larger than" in str(ended) and "ask it for less" not in str(ended), ended
    # an answer to it still is the call's result too large
    answer = Session("stdio-answering", ResolvedSpec(transport="stdio", command="true"), 1, 5)
    answer.inflight = 1
    answer._line_too_large(b'{"jsonrpc":"2.0","id":2,"result":{"content":[{"type":"text","text":"xx')
    assert "ask it for less" in str(answer._ended_by_too_large("search", attempt))


MIXED_ANSWERS = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path

    ID_FIRST = sys.argv[1] == "id-first"
    MARKER = Path(sys.argv[2])
    lock = threading.Lock()

    def send(line):
        with lock:
            sys.stdout.write(line + "\\n")
            sys.stdout.flush()

    def answer(id, result):
        if ID_FIRST:
            send(json.dumps({"jsonrpc": "2.0", "id": id, "result": result}))
        else:
            send(json.dumps({"result": result, "jsonrpc": "2.0", "id": id}))

    def innocent(id):
        time.sleep(2)
        answer(id, {"content": [{"type": "text", "text": "small"}]})

    TOOLS = [{"name": name, "inputSchema": {"type": "object"}} for name in ("big", "innocent")]
    for line in sys.stdin:
        request = json.loads(line)
        method = request.get("method")
        if method == "initialize":
            answer(request["id"], {
                "protocolVersion": request["params"]["protocolVersion"], "capabilities": {"tools": {}},
                "serverInfo": {"name": "mixed-answers", "version": "1"}})
        elif method == "tools/list":
            answer(request["id"], {"tools": TOOLS})
        elif method == "tools/call" and request["params"]["name"] == "innocent":
            with MARKER.open("a") as runs:
                runs.write("ran\\n")
            threading.Thread(target=innocent, args=(request["id"],), daemon=True).start()
        elif method == "tools/call":
            answer(request["id"], {"content": [{"type": "text", "text": "x" * (1 << 20)}]})
        elif "id" in request:
            send(json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": "nope"}}))
    """
)


def _big_beside_innocent(tmp_path: Path, order: str, idempotent: bool) -> tuple[Any, Any, int]:
    """Tool innocent called, then tool big, whose answer is too large, while innocent is in flight on the
    same stdio session: (what big ended with, what innocent did, how many times innocent ran)."""
    script = tmp_path / "mixed_answers.py"
    script.write_text(MIXED_ANSWERS)
    marker = tmp_path / "runs"
    m = MCPManager(
        resolve_secret, call_timeout_s=30, connect_timeout_s=CONNECT_TIMEOUT_S, max_message_bytes=256 * 1024
    )
    try:
        server = mcp_server(
            f"mixed-{order}",
            transport="stdio",
            command=sys.executable,
            args=[str(script), order, str(marker)],
            idempotent=idempotent,
        )
        m.list_tools(server)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            innocent = pool.submit(m.call_tool, server, "innocent", {})
            wait_until(lambda: marker.exists(), what="innocent to be called")
            big = pool.submit(m.call_tool, server, "big", {})
            big_outcome = big.exception(timeout=60)
            innocent_outcome = innocent.exception(timeout=60) or innocent.result()
        return big_outcome, innocent_outcome, marker.read_text().count("ran")
    finally:
        m.close()


def test_a_stdio_answer_too_large_fails_its_own_call_and_not_the_others_in_flight(tmp_path: Path) -> None:
    """A line too large to read ended the session, and every call in flight on it was told its result was
    too large and not retried: an unrelated call on an idempotent server failed with "ask it for less".
    The call the line answers (its id read from the line's start) is told so; the others lost their
    connection, as for any other end of the session: retried here (the server is idempotent)."""
    big, innocent, runs = _big_beside_innocent(tmp_path, "id-first", idempotent=True)
    assert str(big) == (
        "the result of tool big is larger than 256 KiB (KUBECHAIN_MCP_MAX_MESSAGE_BYTES) and was not read; "
        "the session was restarted. The tool may have run: ask it for less (a narrower query, a smaller page)"
    )
    assert innocent == MCPToolResult(text="small"), innocent
    assert runs == 2, "retried on a fresh session"


def test_a_stdio_message_too_large_of_no_known_call_fails_the_calls_in_flight_as_a_lost_connection(
    tmp_path: Path,
) -> None:
    """Whose the line is cannot be read from its start (its id comes after the result): no call in flight
    is told its result was too large; each lost its connection, saying a message was too large."""
    big, innocent, runs = _big_beside_innocent(tmp_path, "result-first", idempotent=False)
    for tool, outcome in (("big", big), ("innocent", innocent)):
        assert str(outcome) == (
            f"error calling tool {tool} on server mixed-result-first: the server sent a message larger than "
            "256 KiB (KUBECHAIN_MCP_MAX_MESSAGE_BYTES), the answer of this call or of another in flight; the "
            "session was closed while the call was in flight; not retried because the MCPServer is not marked "
            "idempotent (spec.idempotent) and the tool may have run"
        ), outcome
    assert runs == 1


# -- result flattening and lifecycle --------------------------------------------------------------


def test_non_text_content_is_described() -> None:
    import mcp_types as types

    from kubechain.mcp.session import flatten_result

    result = types.CallToolResult(
        content=[
            types.TextContent(type="text", text="hello"),
            types.ImageContent(type="image", data="aGVsbG8=", mime_type="image/png"),
            types.EmbeddedResource(
                type="resource", resource=types.TextResourceContents(uri="file:///a.txt", text="A")
            ),
            types.ResourceLink(type="resource_link", name="b", uri="file:///b.bin"),
        ],
        is_error=True,
    )
    flat = flatten_result(result)
    assert flat.is_error
    assert (
        flat.text
        == "hello\n[image content: image/png, 5 bytes]\n[resource: file:///a.txt]\nA\n[resource link: file:///b.bin]"
    )


def test_close_terminates_children_and_is_idempotent() -> None:
    m = MCPManager(resolve_secret, connect_timeout_s=CONNECT_TIMEOUT_S)
    assert m._loop is None  # constructing starts nothing
    m.list_tools(time_server("close-a"))
    m.list_tools(time_server("close-b"))
    pids = [m.stdio_pid("default", "close-a"), m.stdio_pid("default", "close-b")]
    assert all(pid is not None and alive(pid) for pid in pids)
    m.close()
    assert not any(alive(pid) for pid in pids if pid is not None)
    assert m._thread is not None and not m._thread.is_alive()
    m.close()
    with pytest.raises(MCPError, match="closed"):
        m.list_tools(time_server("close-a"))


def test_concurrent_callers_share_one_session(manager: MCPManager) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = time_server("time-concurrent")
    before = time_children()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(
            pool.map(lambda _: manager.call_tool(server, "get_current_time", {"timezone": "UTC"}), range(16))
        )
    assert all(not r.is_error and json.loads(r.text)["timezone"] == "UTC" for r in results)
    assert time_children() - before == {manager.stdio_pid("default", "time-concurrent")}  # one spawn for all


def time_children() -> set[int]:
    """Live mcp-server-time processes whose parent is this test process."""
    return {
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and _ppid(p) == os.getpid()
        and "mcp-server-time" in _cmdline(p)
        and alive(int(p.name))
    }


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def test_a_call_timeout_says_the_tool_may_have_run_and_keeps_the_session(stdio_script: str) -> None:
    """The SDK's read timeout (the call timeout) ends a slow call: the request was sent, so the LLM must
    hear that the tool may have run, or it may call a non-idempotent tool again."""
    m = MCPManager(resolve_secret, call_timeout_s=1, connect_timeout_s=CONNECT_TIMEOUT_S)
    try:
        server = script_server("slow-server", stdio_script)
        assert m.call_tool(server, "slow", {"seconds": 0}).text == "done"
        pid = m.stdio_pid("default", "slow-server")
        with pytest.raises(
            MCPError,
            match=r"error calling tool slow on server slow-server: timed out after 1s; the tool may have run "
            r"\(and may still be running\)",
        ):
            m.call_tool(server, "slow", {"seconds": 30})
        assert m.call_tool(server, "env", {"name": "PLAIN"}).text == "<unset>"
        assert m.stdio_pid("default", "slow-server") == pid
    finally:
        m.close()


def test_a_call_its_claim_cut_short_says_so_and_names_the_calls_own_budget(stdio_script: str) -> None:
    """A call under a claim written late gets only the claim's time left (``within_s``), less than its own
    budget: its timeout says the claim cut it short, and what the call would have had."""
    m = MCPManager(resolve_secret, call_timeout_s=10, call_budget_s=50, connect_timeout_s=CONNECT_TIMEOUT_S)
    try:
        server = script_server("cut-short-server", stdio_script)
        assert m.call_tool(server, "slow", {"seconds": 0}, within_s=30).text == "done"
        with pytest.raises(MCPError) as timed_out:
            m.call_tool(server, "slow", {"seconds": 30}, within_s=2)
        assert str(timed_out.value) == (
            'timed out after 2s calling tool "slow" on MCP server default/cut-short-server (cut short to end '
            "within its claim; the call's own budget is 50s); the tool may have run (and may still be running)"
        )
    finally:
        m.close()


def test_a_call_its_budget_leaves_no_time_for_is_not_sent(stdio_script: str, tmp_path: Path) -> None:
    """With (almost) nothing left of its budget, a call was sent anyway, with a timeout of a few ms, and
    the LLM told it may have run: it is not sent now, and the LLM hears that it did not run."""
    m = MCPManager(resolve_secret, call_timeout_s=10, call_budget_s=50, connect_timeout_s=CONNECT_TIMEOUT_S)
    marker = tmp_path / "asked"
    try:
        server = script_server("no-time-left", stdio_script)
        assert m.call_tool(server, "slow", {"seconds": 0}, within_s=30).text == "done"  # connected
        with pytest.raises(MCPError) as not_sent:
            m.call_tool(server, "still_working", {"marker": str(marker), "rounds": 0}, within_s=0.5)
        assert re.fullmatch(
            r"error calling tool still_working on server no-time-left: not sent, as only 0\.\ds of its "
            r"budget \(its claim's time\) was left; the tool did not run",
            str(not_sent.value),
        ), not_sent.value
        assert not marker.exists(), "the tool did not run"
        assert m.connected("default", "no-time-left"), "the session is kept"
    finally:
        m.close()


def test_a_call_its_budget_ends_before_it_was_sent_does_not_say_it_may_have_run(tmp_path: Path) -> None:
    """The budget ran out while the server was still starting: nothing was sent, and the LLM hears so."""
    script = tmp_path / "slow_start.py"
    script.write_text("import time\ntime.sleep(3600)\n")  # never answers the handshake
    m = MCPManager(resolve_secret, call_timeout_s=10, call_budget_s=50, connect_timeout_s=CONNECT_TIMEOUT_S)
    try:
        with pytest.raises(MCPError) as timed_out:
            m.call_tool(script_server("slow-start", str(script)), "slow", {}, within_s=0.5)
        assert str(timed_out.value) == (
            'timed out after 0.5s calling tool "slow" on MCP server default/slow-start (cut short to end '
            "within its claim; the call's own budget is 50s)"
        )
    finally:
        m.close()


def test_a_server_whose_start_a_budget_cut_short_is_stopped_by_a_close_right_after(tmp_path: Path) -> None:
    """A call's budget ended while its stdio server was still starting: the session's start was cancelled
    and its child left to the session's own clean-up, which close() did not know of (the session was not
    yet the server's), so a close right after (a worker's shutdown, a test's end) stopped the loop with
    the clean-up still under way and the child lived on, orphaned."""
    script = tmp_path / "slow_start.py"
    script.write_text("import time\ntime.sleep(3600)\n")  # never answers the handshake
    m = MCPManager(resolve_secret, call_timeout_s=10, call_budget_s=50, connect_timeout_s=CONNECT_TIMEOUT_S)
    try:
        with pytest.raises(MCPError):
            m.call_tool(script_server("slow-start", str(script)), "slow", {}, within_s=0.5)
    finally:
        m.close()
    survivors = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()
    for pid in survivors:
        os.kill(int(pid), signal.SIGKILL)
    assert len(survivors) == 0


def test_a_calls_own_timeout_and_probe_end_within_its_budget() -> None:
    """A call whose budget (its claim's time left) is shorter than its timeout had it cut by the budget,
    which said less (not even that the tool may have run): the call's own timeout, and the liveness probe
    after it, now fit in the budget, and its message says the tool may have run."""
    app = SDKServer("slow-http")

    @app.tool()
    async def slow(seconds: float) -> str:
        import anyio

        await anyio.sleep(seconds)
        return "done"

    m = MCPManager(resolve_secret, call_timeout_s=60, call_budget_s=6, connect_timeout_s=2)
    try:
        with UvicornThread(app.streamable_http_app(host="127.0.0.1")) as up:
            server = mcp_server("slow-budget", transport="http", url=f"http://127.0.0.1:{up.port}/mcp")
            with pytest.raises(MCPError) as timed_out:
                m.call_tool(server, "slow", {"seconds": 30})
            assert re.fullmatch(
                r"error calling tool slow on server slow-budget: timed out after [\d.]+s \(cut short to end "
                r"within its claim; the tool's own timeout is 60s\); the tool may have run \(and may still be "
                r"running\)",
                str(timed_out.value),
            ), timed_out.value
            assert m.connected("default", "slow-budget"), "the probe had its answer: the session is kept"
    finally:
        m.close()


def test_a_call_in_flight_when_its_server_is_deleted_gets_its_answer_then_the_child_ends(
    manager: MCPManager, stdio_script: str
) -> None:
    """Deleting the MCPServer cut the session under a running call (the tool call then could not tell
    whether it ran); now the call finishes, and the session stops after it."""
    server = script_server("deleted-mid-call", stdio_script)
    assert manager.call_tool(server, "slow", {"seconds": 0}).text == "done"
    pid = manager.stdio_pid("default", "deleted-mid-call")
    assert pid is not None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(manager.call_tool, server, "slow", {"seconds": 1.5})
        wait_until(lambda: _inflight(manager, "deleted-mid-call") == 1, what="the call to be in flight")
        manager.disconnect("default", "deleted-mid-call")
        assert not manager.connected("default", "deleted-mid-call"), "no new call goes to it"
        assert alive(pid), "not cut under the running call"
        assert running.result(timeout=30).text == "done"
    wait_until(lambda: not alive(pid), what="the child to end after its last call")
    assert manager.call_tool(server, "slow", {"seconds": 0}).text == "done", "the next call reconnects"
    assert manager.stdio_pid("default", "deleted-mid-call") != pid
    manager.disconnect("default", "deleted-mid-call")


def _inflight(manager: MCPManager, name: str) -> int:
    session = manager._peek("default", name)
    return session.inflight if session is not None else 0


def test_a_session_left_unused_is_closed_and_its_child_ends() -> None:
    """A deleted MCPServer sends no message to every worker process that used it: its session (a stdio
    child holding the server's secrets) closes once idle, and the next call reconnects."""
    m = MCPManager(resolve_secret, connect_timeout_s=CONNECT_TIMEOUT_S, idle_timeout_s=0.5)
    try:
        server = time_server("idle")
        m.list_tools(server)
        pid = m.stdio_pid("default", "idle")
        assert pid is not None and alive(pid)
        wait_until(
            lambda: not m.connected("default", "idle") and not alive(pid), what="the idle session to close"
        )
        result = m.call_tool(server, "get_current_time", {"timezone": "UTC"})
        assert not result.is_error, "the next call reconnected (the old child is gone)"
    finally:
        m.close()


def test_what_the_manager_keeps_of_a_server_without_a_session_is_forgotten() -> None:
    """Each MCPServer ever asked for kept a lock, a last-use time and its last connect failure, for as long
    as the worker lived: servers that never connected (or were deleted) are forgotten on the next idle pass."""
    m = MCPManager(resolve_secret, connect_timeout_s=CONNECT_TIMEOUT_S, idle_timeout_s=0.2)
    try:
        for name in ("gone-a", "gone-b"):
            with pytest.raises(MCPError, match="cannot start stdio command"):
                m.list_tools(mcp_server(name, transport="stdio", command="/nonexistent/mcp-server"))
        m.list_tools(time_server("idles-out"))
        wait_until(
            lambda: not (m._key_locks or m._last_used or m._connect_failures or m._sessions),
            timeout=20,
            what="the manager to forget the servers it holds no session for",
        )
        assert not m._key_users
    finally:
        m.close()


def test_a_server_someone_is_connecting_to_is_not_forgotten() -> None:
    """A caller holding (or waiting for) a server's lock keeps it: another lock made for a later caller
    would let two connects run at once."""
    import asyncio

    m = MCPManager(resolve_secret)
    busy, idle = ("default", "busy"), ("default", "idle")
    m._key_locks = {busy: asyncio.Lock(), idle: asyncio.Lock()}
    m._key_users = {busy: 1}
    m._last_used = {busy: 0.0, idle: 0.0}
    m._connect_failures = {busy: (0.0, "f", "e"), idle: (0.0, "f", "e")}
    m._forget_unused_keys()
    assert (set(m._key_locks), set(m._last_used), set(m._connect_failures)) == ({busy}, {busy}, {busy})


def test_servers_of_the_same_name_in_two_namespaces_are_two_sessions(
    manager: MCPManager, stdio_script: str
) -> None:
    """The original keyed MCP connections by name only, so namespaces shared (or stole) each other's
    connection (known bug 7)."""

    def in_namespace(namespace: str) -> MCPServer:
        spec = {
            "transport": "stdio",
            "command": sys.executable,
            "args": [stdio_script],
            "env": [{"name": "TEAM", "value": namespace}],
        }
        return MCPServer.model_validate(
            {"metadata": {"name": "shared", "namespace": namespace, "generation": 1}, "spec": spec}
        )

    team_a, team_b = in_namespace("team-a"), in_namespace("team-b")
    try:
        assert manager.call_tool(team_a, "env", {"name": "TEAM"}).text == "team-a"
        assert manager.call_tool(team_b, "env", {"name": "TEAM"}).text == "team-b"
        pid_a, pid_b = manager.stdio_pid("team-a", "shared"), manager.stdio_pid("team-b", "shared")
        assert pid_a is not None and pid_b is not None and pid_a != pid_b
        for _ in range(2):  # interleaved: each call goes to its own namespace's session, none reconnects
            assert manager.call_tool(team_a, "env", {"name": "TEAM"}).text == "team-a"
            assert manager.call_tool(team_b, "env", {"name": "TEAM"}).text == "team-b"
        assert manager.stdio_pid("team-a", "shared") == pid_a and alive(pid_a)
        assert manager.stdio_pid("team-b", "shared") == pid_b and alive(pid_b)
        manager.disconnect("team-a", "shared")
        assert manager.connected("team-b", "shared"), "closing one namespace's session leaves the other"
    finally:
        manager.disconnect("team-a", "shared")
        manager.disconnect("team-b", "shared")


# -- secrets in errors, hung servers, bad answers --------------------------------------------------


def test_a_header_secret_ending_in_a_newline_is_used_without_it(
    manager: MCPManager, http_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`echo token | kubectl create secret ... --from-file`: the value ends in a newline."""
    caplog.set_level(logging.DEBUG)
    SECRETS[("default", "tokens", "from-file")] = "Bearer s3cret-bearer-value\n"
    SECRETS[("default", "tokens", "two-lines")] = "Bearer s3cret-bearer-value\r\nX-Injected: 1"
    try:
        header = {
            "name": "Authorization",
            "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "from-file"}},
        }
        server = mcp_server("http-newline", transport="http", url=http_url, headers=[header])
        assert manager.call_tool(server, "whoami", {}).text.startswith("authorized")
        manager.disconnect("default", "http-newline")

        header["valueFrom"]["secretKeyRef"]["key"] = "two-lines"
        broken = mcp_server("http-two-lines", transport="http", url=http_url, headers=[header])
        with pytest.raises(
            MCPError, match='header "Authorization" from secret "tokens" .* line break'
        ) as error:
            manager.call_tool(broken, "whoami", {})
        assert "s3cret" not in str(error.value) and "s3cret" not in caplog.text
    finally:
        del SECRETS[("default", "tokens", "from-file")], SECRETS[("default", "tokens", "two-lines")]


def test_a_secret_quoted_by_a_failing_server_is_cut_out_of_the_error(manager: MCPManager) -> None:
    """A child that prints its environment and exits: its stderr, which the error quotes, holds the secret."""
    server = mcp_server(
        "chatty-failure",
        transport="stdio",
        command=sys.executable,
        args=["-c", "import os, sys; sys.stderr.write('key=' + os.environ['API_KEY'] + '\\n'); sys.exit(2)"],
        env=[{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "api-key"}}}],
    )
    with pytest.raises(MCPError) as error:
        manager.list_tools(server)
    assert "key=***" in str(error.value) and "s3cret-env-value" not in str(error.value)


BAD_SECOND_LIST = textwrap.dedent(
    """
    import json, sys

    listed = 0
    for line in sys.stdin:
        request = json.loads(line)
        if "id" not in request:
            continue
        method, result = request["method"], {}
        if method == "initialize":
            result = {
                "protocolVersion": request["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "bad-second-list", "version": "1"},
            }
        elif method == "tools/list":
            listed += 1
            good = {"name": "t", "inputSchema": {"type": "object"}}
            result = {"tools": [good] if listed == 1 else [{"name": 5, "inputSchema": "bad"}]}
        print(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}), flush=True)
    """
)


def test_a_malformed_tools_list_on_a_live_session_is_an_mcp_error(tmp_path: Path) -> None:
    script = tmp_path / "bad_second_list.py"
    script.write_text(BAD_SECOND_LIST)
    m = MCPManager(resolve_secret, call_timeout_s=10, connect_timeout_s=CONNECT_TIMEOUT_S)
    try:
        server = script_server("bad-list", str(script))
        assert [tool.name for tool in m.list_tools(server)] == ["t"]
        with pytest.raises(MCPError, match="invalid tools/list answer from MCP server default/bad-list"):
            m.list_tools(server)
    finally:
        m.close()


def test_a_hung_stdio_server_is_restarted_after_a_timed_out_call(stdio_script: str) -> None:
    m = MCPManager(resolve_secret, call_timeout_s=1, connect_timeout_s=CONNECT_TIMEOUT_S)
    server = script_server("hung-server", stdio_script)
    pid = None
    try:
        assert m.call_tool(server, "env", {"name": "PLAIN"}).text == "<unset>"
        pid = m.stdio_pid("default", "hung-server")
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # alive but answering nothing, as a wedged server
        with pytest.raises(MCPError, match="timed out after 1s"):
            m.call_tool(server, "env", {"name": "PLAIN"})
        assert not m.connected("default", "hung-server"), "no answer to the ping: the session is given up"
        assert m.call_tool(server, "env", {"name": "PLAIN"}).text == "<unset>"
        assert m.stdio_pid("default", "hung-server") not in (None, pid)
    finally:
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGCONT)
        m.close()
    assert pid is not None
    wait_until(lambda: not alive(pid), what="the hung child to end")


def test_uvx_is_installed_beside_kubechain_for_stdio_servers() -> None:
    """The original's MCP samples (and the README's) start their servers with `uvx`."""
    uvx = BIN_DIR / "uvx"
    assert uvx.exists(), "uv is a dependency: pip install installs uvx"
    assert subprocess.run([str(uvx), "--version"], capture_output=True, timeout=60).returncode == 0


def test_short_secret_values_are_not_cut_out_of_ordinary_text() -> None:
    from kubechain.mcp.spec import ResolvedSpec

    spec = ResolvedSpec(transport="stdio", secret_values=("1", "true", "s3cret-value\n"))
    assert spec.scrub("timed out after 120s: true story") == "timed out after 120s: true story"
    assert spec.scrub("token s3cret-value rejected") == "token *** rejected"


@pytest.mark.parametrize(("rounds", "may_have_run"), [(1, False), (2, True)])
def test_a_session_lost_after_a_still_working_answer_may_have_run_the_call(
    rounds: int, may_have_run: bool
) -> None:
    """A 404 for the session ("Session terminated") means the server never ran *that* request; but an
    earlier request of the same call, answered "still working", had started the tool, and a server not
    marked idempotent must not be sent it again on a fresh session."""
    import anyio
    from mcp.shared.exceptions import MCPError as SDKError
    from mcp_types import INVALID_REQUEST

    from kubechain.mcp.session import _ATTEMPT, ConnectionLost, Session
    from kubechain.mcp.spec import ResolvedSpec

    class RestartedServer:
        async def call_tool(self, *_: Any, **__: Any) -> Any:
            attempt = _ATTEMPT.get()
            assert attempt is not None
            attempt.sends += rounds  # what the watched write stream counts, one per tools/call request
            raise SDKError(INVALID_REQUEST, "Session terminated")

    session = Session("http-restarting", ResolvedSpec(transport="http", url="http://mcp.test/mcp"), 1, 5)
    session.client = RestartedServer()  # type: ignore[assignment]

    async def call() -> None:
        with pytest.raises(ConnectionLost) as lost:
            await session.call_tool("charge", {})
        assert lost.value.maybe_executed is may_have_run
        assert session.broken

    anyio.run(call)


def test_a_line_the_sdk_cannot_parse_is_logged_without_quoting_it(caplog: pytest.LogCaptureFixture) -> None:
    """A stdio server that prints its key on stdout: the SDK logged the line (inside the validation
    error of its traceback) at ERROR level, cut where no scrubbing could find the secret."""
    from mcp.client.stdio import _parse_line

    import kubechain.mcp.session  # noqa: F401  (installs the filter)

    caplog.set_level(logging.DEBUG, logger="mcp.client.stdio")
    assert isinstance(_parse_line("Using API key sk-live-ABCDEFGH0123456789 for requests"), ValueError)
    assert "Failed to parse JSONRPC message from server" in caplog.text
    assert "sk-live" not in caplog.text


def _sdk_logged(exc: BaseException | None = None, *, bug_of_ours: bool = False) -> logging.LogRecord:
    """What the SDK logs when the message_handler it calls raises (its "client" logger, a traceback): our
    Session._on_message with a bug of ours (a session without its spec), or ``exc`` raised by the SDK."""
    import anyio
    from mcp.client.session import ClientSession

    from kubechain.mcp.session import Session
    from kubechain.observability.logs import WithoutMCPServerData

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    session = Session.__new__(Session)
    session.label, session.spec = "default/buggy", None  # type: ignore[assignment]

    async def handler(message: object) -> None:
        if bug_of_ours:
            await session._on_message(message)
        else:
            assert exc is not None
            raise exc

    class SDKSide:
        _message_handler = staticmethod(handler)

    keep = Keep()
    keep.addFilter(WithoutMCPServerData())
    sdk_logger = logging.getLogger("client")
    sdk_logger.addHandler(keep)
    try:
        anyio.run(ClientSession._deliver_stream_exception, SDKSide(), ValueError("transport broke"))
    finally:
        sdk_logger.removeHandler(keep)
    assert len(records) == 1
    return records[0]


def test_the_traceback_of_our_own_bug_logged_by_the_sdk_is_kept() -> None:
    """An exception raised in our code that the SDK called (a message_handler, a transport wrapper) and
    logged lost its traceback to the filter meant for the server's data: a bug of ours left only its
    type. Raised in kubechain's own code, it keeps its traceback."""
    record = _sdk_logged(bug_of_ours=True)
    assert record.exc_info is not None and record.exc_info[0] is AttributeError
    text = logging.Formatter().format(record)
    assert "_on_message" in text and "kubechain/mcp/session.py" in text


def test_the_traceback_of_what_the_sdk_raised_on_a_servers_data_is_still_dropped() -> None:
    import pydantic

    class Model(pydantic.BaseModel):
        level: int

    try:
        Model.model_validate({"level": "key=s3cret-env-value"})
    except pydantic.ValidationError as exc:
        invalid = exc
    for exc in (invalid, KeyError("s3cret-env-value")):
        record = _sdk_logged(exc)
        assert record.exc_info is None and "s3cret" not in logging.Formatter().format(record)


MALFORMED_NOTIFICATIONS = textwrap.dedent(
    """
    import json, os, sys

    def send(message):
        print(json.dumps({"jsonrpc": "2.0", **message}), flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        if request.get("method") == "initialize":
            send({"id": request["id"], "result": {
                "protocolVersion": request["params"]["protocolVersion"], "capabilities": {"tools": {}},
                "serverInfo": {"name": "malformed-notifications", "version": "1"}}})
        elif request.get("method") == "tools/list":
            key = os.environ["API_KEY"]
            send({"method": "notifications/progress",
                  "params": {"progressToken": {"bad": True}, "progress": "using key " + key}})
            send({"method": "notifications/message", "params": {"level": "nonsense", "data": "key=" + key}})
            send({"id": request["id"], "result": {"tools": [{"name": "t", "inputSchema": {"type": "object"}}]}})
        elif "id" in request:
            send({"id": request["id"], "error": {"code": -32601, "message": "nope"}})
    """
)


def test_a_notification_the_sdk_cannot_read_is_logged_without_quoting_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's client session (its logger is "client", not under "mcp") logged a notification it could
    not validate with the traceback of the validation error, which quotes the server's data: its secret."""
    caplog.set_level(logging.DEBUG)
    script = tmp_path / "malformed_notifications.py"
    script.write_text(MALFORMED_NOTIFICATIONS)
    m = MCPManager(resolve_secret, call_timeout_s=10, connect_timeout_s=CONNECT_TIMEOUT_S)
    try:
        server = script_server(
            "malformed-notifications",
            str(script),
            env=[{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "api-key"}}}],
        )
        assert [tool.name for tool in m.list_tools(server)] == ["t"]
    finally:
        m.close()
    assert "Failed to validate notification: notifications/progress" in caplog.text
    assert "s3cret-env-value" not in caplog.text


def test_an_answer_that_misses_its_output_schema_is_kept_with_a_note() -> None:
    """The SDK checks a tool's answer against its declared output schema and raised after the tool ran:
    the LLM heard "error calling tool" and would call it again (a second issue filed)."""
    from types import SimpleNamespace

    import anyio
    from mcp_types import CallToolResult, TextContent

    from kubechain.mcp.session import (
        _ATTEMPT,
        Session,
        _keep_answers_that_miss_their_schema,
        flatten_result,
    )
    from kubechain.mcp.spec import ResolvedSpec

    answer = CallToolResult(
        content=[TextContent(type="text", text="filed #7")], structured_content={"number": 7}
    )

    async def sdk_check(name: str, result: CallToolResult) -> None:  # what the SDK's check does here
        raise RuntimeError(
            f"Invalid structured content returned by tool {name}: 'issue' is a required property"
        )

    class DriftedServer:
        session = SimpleNamespace(validate_tool_result=sdk_check)

        async def call_tool(self, name: str, *_: Any, **__: Any) -> CallToolResult:
            await self.session.validate_tool_result(name, answer)
            return answer

    client = DriftedServer()
    _keep_answers_that_miss_their_schema(client)  # type: ignore[arg-type]
    session = Session("http-drifted", ResolvedSpec(transport="http", url="http://mcp.test/mcp"), 1, 5)
    session.client = client  # type: ignore[assignment]

    result = anyio.run(session.call_tool, "file_issue", {"title": "crash"})
    flat = flatten_result(result)
    assert not flat.is_error
    assert flat.text == (
        "filed #7\n[note: the tool ran, but its answer does not match its output schema: Invalid structured "
        "content returned by tool file_issue: 'issue' is a required property]"
    )
    assert _ATTEMPT.get() is None


def test_no_session_is_started_once_the_manager_is_closing() -> None:
    """A retry on a fresh session after close() stopped the sessions started a stdio child that the
    loop's stop then cut off, possibly leaving it running."""
    import asyncio

    from kubechain.mcp.presence import ServedServer
    from kubechain.mcp.spec import ResolvedSpec

    closing = MCPManager(resolve_secret, call_timeout_s=5, connect_timeout_s=CONNECT_TIMEOUT_S)
    loop = closing._ensure_loop()
    closing._closed = True  # as close() sets it before stopping the sessions
    try:
        started = asyncio.run_coroutine_threadsafe(
            closing._session_for(
                ("default", "late"), ResolvedSpec(transport="stdio", command="true"), ServedServer("", 1, 0.0)
            ),
            loop,
        )
        with pytest.raises(MCPError, match="the MCP manager is closed"):
            started.result(10)
    finally:
        closing._closed = False
        closing.close()


def test_a_tool_list_that_never_ends_is_cut_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A server whose cursor never runs out: listed up to the cap, and the log says the list was cut."""
    import asyncio
    import logging
    import types as pytypes

    from kubechain.mcp.session import MAX_TOOL_PAGES, Session

    class Endless:
        async def list_tools(self, cursor: str | None = None) -> Any:
            return pytypes.SimpleNamespace(tools=[pytypes.SimpleNamespace(name="t")], next_cursor="more")

    with caplog.at_level(logging.WARNING, logger="kubechain.mcp"):
        tools = asyncio.run(Session._list_all(Endless()))  # type: ignore[arg-type]
    assert len(tools) == MAX_TOOL_PAGES
    assert any(f"more than {MAX_TOOL_PAGES} pages of tools" in r.getMessage() for r in caplog.records)
