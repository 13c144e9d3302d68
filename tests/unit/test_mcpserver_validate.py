"""validate(MCPServer) on the in-memory API server with a real MCPManager and ``mcp-server-time``."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubechain.kube.events import EventRecorder
from kubechain.kube.fake import FakeKubeClient
from kubechain.llm.base import LLMClientFactory
from kubechain.mcp import MCPManager, kube_secret_resolver
from kubechain.queueing import ResourceMessage
from kubechain.settings import Settings
from workers.context import WorkerContext
from workers.validators import validate

# Real MCP servers (stdio children) behind the validation: about a second per test.
pytestmark = pytest.mark.slow

API = "kubechain.humanlayer.dev/v1alpha1"
TIME_SERVER = str(Path(sys.executable).parent / "mcp-server-time")


def make_context(kube: FakeKubeClient, mcp: MCPManager | None, **settings: Any) -> WorkerContext:
    return WorkerContext(
        settings=Settings(**settings),
        kube=kube,
        events=EventRecorder(kube, "kubechain-worker", "w1"),
        llms=LLMClientFactory(10),
        identity="w1",
        enqueue=lambda *_: None,
        mcp=mcp,
    )


def create(kube: FakeKubeClient, kind: str, plural: str, name: str, spec: dict[str, Any]) -> None:
    kube.create_raw(
        plural, "default", {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}
    )


def run_validate(ctx: WorkerContext, name: str) -> dict[str, Any]:
    validate(ctx, ResourceMessage(kind="MCPServer", namespace="default", name=name))
    return ctx.kube.get_raw("mcpservers", "default", name)


@pytest.fixture
def kube() -> FakeKubeClient:
    return FakeKubeClient()


@pytest.fixture
def manager(kube: FakeKubeClient) -> Iterator[MCPManager]:
    m = MCPManager(kube_secret_resolver(kube), connect_timeout_s=60)
    yield m
    m.close()


def test_connects_and_records_tools(kube: FakeKubeClient, manager: MCPManager) -> None:
    create(kube, "MCPServer", "mcpservers", "time", {"transport": "stdio", "command": TIME_SERVER})
    ctx = make_context(kube, manager)
    obj = run_validate(ctx, "time")
    status = obj["status"]
    assert status["connected"] is True
    assert status["status"] == "Ready"
    assert status["statusDetail"] == "Connected successfully with 2 tools"
    assert status["observedGeneration"] == 1
    tools = {tool["name"]: tool for tool in status["tools"]}
    assert set(tools) == {"get_current_time", "convert_time"}
    assert tools["get_current_time"]["inputSchema"]["required"] == ["timezone"]
    assert kube.event_reasons("time") == ["Connected"]
    event = kube.events()[-1]
    assert event["type"] == "Normal" and event["message"] == "MCP server connected successfully"

    # Nothing changed: the session is reused and nothing is written.
    pid = manager.stdio_pid("default", "time")
    again = run_validate(ctx, "time")
    assert again["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
    assert kube.event_reasons("time") == ["Connected"]
    assert manager.stdio_pid("default", "time") == pid


def test_spec_change_reconnects_and_updates_tools(kube: FakeKubeClient, manager: MCPManager) -> None:
    create(kube, "MCPServer", "mcpservers", "time", {"transport": "stdio", "command": TIME_SERVER})
    ctx = make_context(kube, manager)
    run_validate(ctx, "time")
    old_pid = manager.stdio_pid("default", "time")
    kube.request(
        "PATCH",
        f"/apis/{API}/namespaces/default/mcpservers/time",
        body={"spec": {"args": ["--local-timezone", "Europe/Paris"]}},
    )
    status = run_validate(ctx, "time")["status"]
    assert status["observedGeneration"] == 2
    schema = next(t for t in status["tools"] if t["name"] == "get_current_time")["inputSchema"]
    assert "Europe/Paris" in schema["properties"]["timezone"]["description"]
    assert manager.stdio_pid("default", "time") not in (None, old_pid)
    assert kube.event_reasons("time") == ["Connected", "Connected"]


def test_bad_command_is_a_connection_failure(kube: FakeKubeClient, manager: MCPManager) -> None:
    create(
        kube,
        "MCPServer",
        "mcpservers",
        "broken",
        {"transport": "stdio", "command": "/nonexistent/mcp-server"},
    )
    status = run_validate(make_context(kube, manager), "broken")["status"]
    assert status["connected"] is False
    assert status["status"] == "Error"
    assert status["statusDetail"].startswith(
        "Connection failed: cannot start stdio command '/nonexistent/mcp-server'"
    )
    assert kube.event_reasons("broken") == ["ConnectionFailed"]
    assert kube.events()[-1]["type"] == "Warning"


def test_missing_approval_channel(kube: FakeKubeClient, manager: MCPManager) -> None:
    spec = {"transport": "stdio", "command": TIME_SERVER, "approvalContactChannel": {"name": "approvals"}}
    create(kube, "MCPServer", "mcpservers", "guarded", spec)
    status = run_validate(make_context(kube, manager), "guarded")["status"]
    assert status == {
        "connected": False,
        "status": "Error",
        "statusDetail": 'ContactChannel "approvals" not found',
        "observedGeneration": 1,
    }
    assert kube.event_reasons("guarded") == ["ContactChannelNotFound"]
    assert manager.stdio_pid("default", "guarded") is None  # never connected


def test_approval_channel_not_ready_is_pending(kube: FakeKubeClient, manager: MCPManager) -> None:
    kube.add_secret("default", "hl", {"key": "hl-key"})
    channel = {
        "type": "slack",
        "apiKeyFrom": {"secretKeyRef": {"name": "hl", "key": "key"}},
        "slack": {"channelOrUserID": "C123"},
    }
    create(kube, "ContactChannel", "contactchannels", "approvals", channel)
    spec = {"transport": "stdio", "command": TIME_SERVER, "approvalContactChannel": {"name": "approvals"}}
    create(kube, "MCPServer", "mcpservers", "guarded", spec)
    ctx = make_context(kube, manager)
    status = run_validate(ctx, "guarded")["status"]
    assert (
        status["status"] == "Pending" and status["statusDetail"] == 'ContactChannel "approvals" is not ready'
    )
    assert kube.event_reasons("guarded") == ["ContactChannelNotReady"]

    kube.patch_status_raw("contactchannels", "default", "approvals", None, {"ready": True, "status": "Ready"})
    status = run_validate(ctx, "guarded")["status"]
    assert status["connected"] is True and status["statusDetail"] == "Connected successfully with 2 tools"
    assert kube.event_reasons("guarded") == ["ContactChannelNotReady", "Connected"]


def test_an_mcp_server_whose_url_holds_credentials_is_an_error_with_an_event_and_a_log_line(
    kube: FakeKubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """It was connected to, its userinfo sent as HTTP Basic auth, the password in a spec whoever reads
    MCPServers reads; now refused before any connection, without quoting it."""
    import json
    import logging

    create(
        kube,
        "MCPServer",
        "mcpservers",
        "remote",
        {"transport": "http", "url": "https://bot:s3cret@mcp.example/mcp"},
    )
    with caplog.at_level(logging.WARNING):
        status = run_validate(make_context(kube, None), "remote")["status"]
    assert (status["status"], status["connected"]) == ("Error", False), status
    assert status["statusDetail"].startswith('Validation failed: url holds credentials ("user:password@"')
    assert "spec.headers" in status["statusDetail"]
    assert kube.event_reasons("remote") == ["ValidationFailed"]
    assert status["statusDetail"] in caplog.text
    events = [e["message"] for e in kube.events() if e["involvedObject"]["name"] == "remote"]
    for where in (json.dumps(status), *events, caplog.text):
        assert "s3cret" not in where and "bot:" not in where, where


def test_invalid_spec_and_allowlist_are_validation_failures(kube: FakeKubeClient) -> None:
    create(kube, "MCPServer", "mcpservers", "no-url", {"transport": "http"})
    create(kube, "MCPServer", "mcpservers", "forbidden", {"transport": "stdio", "command": TIME_SERVER})
    ctx = make_context(kube, None, mcp_command_allowlist=["npx"])  # no worker manager: a temporary one
    status = run_validate(ctx, "no-url")["status"]
    assert status["statusDetail"] == "Validation failed: url is required for http servers"
    assert status["status"] == "Error" and status["connected"] is False
    status = run_validate(ctx, "forbidden")["status"]
    assert status["statusDetail"] == (
        f"Validation failed: stdio command '{TIME_SERVER}' is not in the allowlist "
        "(KUBECHAIN_MCP_COMMAND_ALLOWLIST); allowed: npx"
    )
    assert kube.event_reasons("forbidden") == ["ValidationFailed"]


def test_with_an_allowlist_env_that_changes_what_the_command_runs_is_a_validation_failure(
    kube: FakeKubeClient,
) -> None:
    """An allowed command with LD_PRELOAD, NODE_OPTIONS or PATH set by the spec runs whatever they say:
    with an allowlist the spec may not set them (the status names the variable and why)."""
    env = [{"name": "TZ_HINT", "value": "UTC"}, {"name": "LD_PRELOAD", "value": "/tmp/evil.so"}]
    spec = {"transport": "stdio", "command": TIME_SERVER, "env": env}
    create(kube, "MCPServer", "mcpservers", "preloaded", spec)
    ctx = make_context(kube, None, mcp_command_allowlist=["mcp-server-time"])
    status = run_validate(ctx, "preloaded")["status"]
    assert status["status"] == "Error" and status["connected"] is False
    assert status["statusDetail"] == (
        'Validation failed: env var "LD_PRELOAD" may not be set while stdio commands are restricted '
        "(KUBECHAIN_MCP_COMMAND_ALLOWLIST): it makes the dynamic loader load other code into the command"
    )
    assert kube.event_reasons("preloaded") == ["ValidationFailed"]


def test_env_secret_from_the_cluster(kube: FakeKubeClient) -> None:
    env = [{"name": "TZ_HINT", "valueFrom": {"secretKeyRef": {"name": "time-secrets", "key": "hint"}}}]
    create(
        kube, "MCPServer", "mcpservers", "time", {"transport": "stdio", "command": TIME_SERVER, "env": env}
    )
    ctx = make_context(kube, None)  # a temporary manager, closed after the validation
    status = run_validate(ctx, "time")["status"]
    assert status["status"] == "Error"
    assert status["statusDetail"] == (
        'Connection failed: cannot resolve env var "TZ_HINT" from secret "time-secrets": '
        'secret "time-secrets" not found in namespace "default"'
    )
    kube.add_secret("default", "time-secrets", {"hint": "UTC"})
    status = run_validate(ctx, "time")["status"]  # what the watcher's resync does
    assert status["connected"] is True and status["statusDetail"] == "Connected successfully with 2 tools"
    assert kube.event_reasons("time") == ["ConnectionFailed", "Connected"]


def test_deleted_server_is_disconnected(kube: FakeKubeClient, manager: MCPManager) -> None:
    create(kube, "MCPServer", "mcpservers", "time", {"transport": "stdio", "command": TIME_SERVER})
    ctx = make_context(kube, manager)
    run_validate(ctx, "time")
    assert manager.connected("default", "time")
    kube.delete("mcpservers", "default", "time")
    validate(ctx, ResourceMessage(kind="MCPServer", namespace="default", name="time"))
    assert not manager.connected("default", "time")


def test_a_deleted_servers_session_closes_when_a_tool_call_names_it(
    kube: FakeKubeClient, manager: MCPManager
) -> None:
    """A tools worker's session (its stdio child, with the server's secrets in its environment) of an
    MCPServer since deleted: the next tool call that names the server, and finds it gone, closes it. It
    stayed open until the session's idle timeout (15 minutes): validations run in other processes."""
    from tests.unit.fakes import message
    from tests.unit.test_mcp_manager import alive
    from tests.unit.test_toolcall_robustness import agent_with, calling, start_turn, toolcall_status
    from workers.tool_call import tool_call

    create(kube, "MCPServer", "mcpservers", "time", {"transport": "stdio", "command": TIME_SERVER})
    ctx = agent_with(
        kube, calling("time__get_current_time", '{"timezone": "UTC"}'), {}, mcpServers=[{"name": "time"}]
    )
    ctx.mcp = manager  # a worker that runs tool calls: its sessions stay open
    run_validate(ctx, "time")
    validate(ctx, message("Agent", "a"))
    (name,) = start_turn(ctx, kube)
    pid = manager.stdio_pid("default", "time")
    assert pid is not None and manager.connected("default", "time")

    kube.delete("mcpservers", "default", "time")
    tool_call(ctx, message("TaskRunToolCall", name))
    assert 'MCP server "time" not found' in toolcall_status(kube, name)["error"]
    assert not manager.connected("default", "time"), "the session of a deleted server is still open"
    assert not alive(pid), "its stdio child still runs"


def test_a_tools_workers_sessions_of_servers_deleted_or_edited_close_within_a_sweep(
    kube: FakeKubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tools worker's session of an MCPServer deleted (its stdio child, with the server's secrets in
    its environment) stayed open until its 15-minute idle timeout when no tool call named the server
    again. The worker now lists its sessions' MCPServers (metadata, one list a sweep) and closes those of
    servers gone or edited; the others are kept."""
    import kubechain.mcp.manager as manager_module
    from kubechain.kube.client import KubeClient, custom_path
    from kubechain.models import MCPServer
    from tests.unit.test_mcp_manager import alive, wait_until
    from workers.context import build_context

    monkeypatch.setattr(manager_module, "SWEEP_INTERVAL_S", 0.2, raising=False)
    monkeypatch.setattr(KubeClient, "from_settings", classmethod(lambda cls, settings, component: kube))
    ctx = build_context(Settings(), lambda *_: None, runs_tools=True)
    names = ("deleted", "edited", "kept")
    try:
        for name in names:
            create(kube, "MCPServer", "mcpservers", name, {"transport": "stdio", "command": TIME_SERVER})
            ctx.mcp.list_tools(kube.get(MCPServer, "default", name))
        pids = {name: ctx.mcp.stdio_pid("default", name) for name in names}
        assert all(pids.values()), pids
        before = len(kube.requests)

        kube.delete("mcpservers", "default", "deleted")
        edit = {"spec": {"args": ["--local-timezone", "UTC"]}}
        kube.request("PATCH", custom_path("mcpservers", "default", "edited"), body=edit)
        wait_until(
            lambda: not alive(pids["deleted"]) and not alive(pids["edited"]),
            15,
            what="the sessions of the deleted and the edited server to close",
        )
        assert not ctx.mcp.connected("default", "deleted") and not ctx.mcp.connected("default", "edited")
        assert ctx.mcp.connected("default", "kept") and ctx.mcp.stdio_pid("default", "kept") == pids["kept"]
        asked = {(method, path) for method, path in kube.requests[before:]} - {
            ("DELETE", custom_path("mcpservers", "default", "deleted")),
            ("PATCH", custom_path("mcpservers", "default", "edited")),
        }
        assert asked == {("GET", custom_path("mcpservers", "default"))}, "one list of their namespace a sweep"
    finally:
        ctx.events.flush()
        ctx.mcp.close()


def unreachable_kubeconfig(tmp_path: Path) -> str:
    """A kubeconfig naming an API server nobody answers at (for building a worker's context)."""
    import yaml

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("runs_tools", [True, False], ids=["tools-worker", "control-worker"])
def test_only_a_worker_that_runs_tool_calls_keeps_mcp_sessions(tmp_path: Path, runs_tools: bool) -> None:
    """A control worker validates MCPServers with a manager it closes afterwards (its pods are not sized
    for stdio servers left running); a tools worker keeps its sessions for the calls to come."""
    from workers.context import build_context

    ctx = build_context(
        Settings(kubeconfig=unreachable_kubeconfig(tmp_path)), lambda *_: None, runs_tools=runs_tools
    )
    try:
        assert isinstance(ctx.mcp, MCPManager) if runs_tools else ctx.mcp is None
    finally:
        ctx.events.flush()
        if ctx.mcp is not None:
            ctx.mcp.close()
        ctx.kube.close()


MANY_TOOLS_SERVER = """
from mcp.server.mcpserver import MCPServer

server = MCPServer("many-tools")
for i in range(300):
    def tool(x: str) -> str:
        return x
    server.add_tool(tool, name=f"tool_{i:03}", description="long description " * 120)
server.run()
"""


def test_a_tool_list_too_large_for_the_status_is_a_clear_failure(
    kube: FakeKubeClient, manager: MCPManager, tmp_path: Path
) -> None:
    """300 tools of ~2 KB each: written into the status, it was refused by etcd again at every resync,
    and the MCPServer stayed Pending with no word of why."""
    script = tmp_path / "many_tools.py"
    script.write_text(MANY_TOOLS_SERVER)
    create(
        kube,
        "MCPServer",
        "mcpservers",
        "many",
        {"transport": "stdio", "command": sys.executable, "args": [str(script)]},
    )
    status = run_validate(make_context(kube, manager), "many")["status"]
    assert status["connected"] is False and status["status"] == "Error"
    assert status["statusDetail"].startswith("Validation failed: the server lists 300 tools taking ")
    assert "more than the 524,288 an MCPServer's status holds" in status["statusDetail"]
    assert "tools" not in status, "the list is not recorded"
    assert kube.event_reasons("many") == ["ToolListTooLarge"]


def test_a_tool_list_is_measured_as_etcd_stores_it() -> None:
    """Go's JSON, which the API server stores with, writes "<", ">" and "&" in 6 bytes each: 100 tools
    whose descriptions hold 1,000 of them were 100 KB as measured, 600 KB as stored."""
    from kubechain.models import MCPServer, MCPTool
    from workers.mcpservers import plan_connected

    server = MCPServer.from_wire(
        {"metadata": {"name": "s", "namespace": "default"}, "spec": {"transport": "stdio", "command": "x"}}
    )
    tools = [MCPTool(name=f"tool_{i:03}", description="<" * 1000) for i in range(100)]
    refused = plan_connected(server, tools)
    assert refused is not None and refused.status["status"] == "Error"
    assert "the server lists 100 tools taking 603,701 bytes" in refused.status["statusDetail"]
    fits = plan_connected(server, tools[:80])
    assert fits is not None and fits.status["status"] == "Ready"


GATED_SERVER = """
import os
import sys
import time
from pathlib import Path

gate = Path(sys.argv[1])
(gate.parent / f"started-{os.getpid()}").touch()
while not gate.exists():  # the test says when it may answer
    time.sleep(0.02)

from mcp.server.mcpserver import MCPServer

server = MCPServer("gated")


@server.tool()
def now() -> str:
    return "now"


server.run()
"""


def test_a_checks_worker_runs_at_most_its_setting_of_stdio_servers_at_once(
    kube: FakeKubeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real stdio children: with KUBECHAIN_MCP_MAX_STDIO_CHECKS=2, three MCPServers validated at once by a
    checks worker (no MCPManager kept) run two servers; the third says it waits, and starts once one of
    them has been checked and stopped. None is left running."""
    import threading

    import workers.mcpservers as mcpservers
    from tests.unit.test_mcp_manager import alive, wait_until

    monkeypatch.setattr(mcpservers, "TURN_NOTICE_S", 0.0, raising=False)
    script = tmp_path / "gated.py"
    script.write_text(GATED_SERVER)
    gate = tmp_path / "gate"
    ctx = make_context(kube, None, mcp_max_stdio_checks=2)
    names = ["one", "two", "three"]
    for name in names:
        spec = {"transport": "stdio", "command": sys.executable, "args": [str(script), str(gate)]}
        create(kube, "MCPServer", "mcpservers", name, spec)

    def started() -> list[int]:
        return [int(path.name.removeprefix("started-")) for path in tmp_path.glob("started-*")]

    def status_of(name: str) -> dict[str, Any]:
        return kube.get_raw("mcpservers", "default", name).get("status") or {}

    def waiting() -> list[str]:
        return [name for name in names if status_of(name).get("statusDetail", "").startswith("Waiting")]

    checks = [threading.Thread(target=run_validate, args=(ctx, name)) for name in names]
    for check in checks:
        check.start()
    try:
        wait_until(lambda: len(started()) == 2 and len(waiting()) == 1, what="two started, one waiting")
        assert all(alive(pid) for pid in started())
    finally:
        gate.touch()
        for check in checks:
            check.join(60)
    assert len(started()) == 3
    for name in names:
        assert status_of(name)["statusDetail"] == "Connected successfully with 1 tools"
    wait_until(lambda: not any(alive(pid) for pid in started()), 15, what="every server to have stopped")


@pytest.fixture(scope="module")
def served_urls() -> Iterator[dict[str, str]]:
    """transport -> the URL of an MCP server (the SDK's, under uvicorn in a thread) listing one tool."""
    from tests.unit.test_mcp_manager import UvicornThread, _http_mcp_server

    with (
        UvicornThread(_http_mcp_server().streamable_http_app(host="127.0.0.1")) as http,
        UvicornThread(_http_mcp_server().sse_app(host="127.0.0.1")) as sse,
    ):
        yield {"http": f"http://127.0.0.1:{http.port}/mcp", "sse": f"http://127.0.0.1:{sse.port}/sse"}


@pytest.mark.parametrize(
    ("header", "said"),
    [
        (
            {"name": "X-Api-Key", "value": "sk-s3cret…"},
            'header "X-Api-Key": its value contains a character an HTTP header cannot carry '
            "(character 10, not ASCII); remove it",
        ),
        (
            {"name": "X-Api-Key", "value": "sk-s3cret\u00a0tail"},
            'header "X-Api-Key": its value contains a character an HTTP header cannot carry '
            "(character 10, not ASCII); remove it",
        ),
        (
            {"name": "X-Api-Key", "value": "sk-s3cret\r\nX-Injected: 1"},
            'header "X-Api-Key": its value contains a line break or another control character; remove it',
        ),
        (
            {"name": "X-Api-Key", "value": "sk-s3cret\x01"},
            'header "X-Api-Key": its value contains a line break or another control character; remove it',
        ),
        (
            {"name": "X Api Key", "value": "sk-s3cret"},
            'header name "X Api Key" has a character no header name may hold (character 2): a name is '
            "letters, digits and any of !#$%&'*+-.^_`|~, without spaces or a colon",
        ),
        (
            {"name": "Authorization:", "value": "Bearer sk-s3cret"},
            'header name "Authorization:" has a character no header name may hold (character 14): a name '
            "is letters, digits and any of !#$%&'*+-.^_`|~, without spaces or a colon",
        ),
        (
            {"name": "X-Schlüssel", "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "bearer"}}},
            'header name "X-Schlüssel" has a character no header name may hold (character 7): a name is '
            "letters, digits and any of !#$%&'*+-.^_`|~, without spaces or a colon",
        ),
    ],
    ids=["ellipsis", "no-break-space", "line-break", "control-character", "space-in-name", "colon", "umlaut"],
)
@pytest.mark.parametrize("transport", ["http", "sse"])
def test_a_header_no_http_request_can_carry_is_a_validation_failure_naming_it(
    kube: FakeKubeClient, served_urls: dict[str, str], transport: str, header: dict[str, Any], said: str
) -> None:
    """A header whose name is no HTTP token, or whose value holds a non-ASCII or control character, passed
    validation and failed at every connect, in the HTTP library's words (a UnicodeEncodeError,
    "LocalProtocolError: Illegal header value b'...'" quoting the value, or the server's HTTP 400). Now a
    validation failure that names the header and says what to fix, without quoting its value."""
    import json

    kube.add_secret("default", "tokens", {"bearer": "Bearer sk-s3cret"})
    spec = {"transport": transport, "url": served_urls[transport], "headers": [header]}
    create(kube, "MCPServer", "mcpservers", "remote", spec)
    status = run_validate(make_context(kube, None), "remote")["status"]
    assert (status["status"], status["connected"]) == ("Error", False), status
    assert status["statusDetail"] == f"Validation failed: {said}"
    assert kube.event_reasons("remote") == ["ValidationFailed"]
    events = [e["message"] for e in kube.events() if e["involvedObject"]["name"] == "remote"]
    for where in (json.dumps(status), *events):
        assert "s3cret" not in where, where


def test_a_header_value_written_with_a_line_break_at_its_end_is_sent_without_it(
    kube: FakeKubeClient, served_urls: dict[str, str]
) -> None:
    """A YAML block scalar (``value: |``) ends in a line break, which no header may hold: as a Secret's
    value is, the literal value is sent without the spaces and line breaks around it."""
    headers = [{"name": "X-Team", "value": " platform\n"}]
    create(
        kube,
        "MCPServer",
        "mcpservers",
        "remote",
        {"transport": "http", "url": served_urls["http"], "headers": headers},
    )
    status = run_validate(make_context(kube, None), "remote")["status"]
    assert status["statusDetail"] == "Connected successfully with 1 tools", status


@pytest.mark.parametrize("transport", ["http", "sse"])
def test_a_header_secret_no_http_request_can_carry_is_said_without_its_value_and_checked_again_soon(
    kube: FakeKubeClient, served_urls: dict[str, str], transport: str
) -> None:
    """A Secret's header value with a pasted "…" failed at every connect with httpx's UnicodeEncodeError,
    which names neither the header nor the Secret, and, not being a Secret problem to the watcher, was
    checked again at its slow back-off. Now it names the header, Secret and key (never the value), and the
    watcher checks it again within SECRET_RECHECK_S; the fixed Secret connects."""
    from kubechain.statemachines.routing import SECRET_RECHECK_S, waits_for_a_secret, work_for

    kube.add_secret("default", "tokens", {"bearer": "Bearer sk-s3cret…"})
    header = {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "tokens", "key": "bearer"}}}
    spec = {"transport": transport, "url": served_urls[transport], "headers": [header]}
    create(kube, "MCPServer", "mcpservers", "remote", spec)
    ctx = make_context(kube, None)
    obj = run_validate(ctx, "remote")
    status = obj["status"]
    assert (status["status"], status["connected"]) == ("Error", False), status
    assert status["statusDetail"] == (
        'Connection failed: header "Authorization" from secret "tokens" (key "bearer") contains a '
        "character an HTTP header cannot carry (character 17, not ASCII); store the value without it"
    )
    assert waits_for_a_secret(obj)
    from datetime import UTC, datetime

    (work,) = work_for("MCPServer", obj, datetime.now(UTC), 180, resync=True)
    assert work.max_recheck_s == SECRET_RECHECK_S

    kube.request("DELETE", "/api/v1/namespaces/default/secrets/tokens")  # the Secret, fixed
    kube.add_secret("default", "tokens", {"bearer": "Bearer sk-s3cret"})
    status = run_validate(ctx, "remote")["status"]  # what the watcher's re-check does
    assert status["statusDetail"] == "Connected successfully with 1 tools", status


SET_BY_THE_CLIENT = "is set by the HTTP client for each request, from its body: remove it"


@pytest.mark.parametrize(
    ("transport", "name", "value", "said"),
    [
        *(
            (transport, name, value, SET_BY_THE_CLIENT)
            for transport in ("http", "sse")
            for name, value in (
                ("Content-Length", "0"),
                ("content-length", "100000"),
                ("Transfer-Encoding", "gzip"),
            )
        ),
        (
            "sse",
            "Content-Type",
            "text/plain",
            "is not application/json: the client posts every MCP message as JSON, and an SSE server refuses "
            "one said to be anything else; remove it",
        ),
        ("http", "Content-Type", "text/plain", None),  # the SDK sets its own for each message
        ("http", "Transfer-Encoding", "chunked", None),
        ("sse", "Transfer-Encoding", "chunked", None),
        ("sse", "Content-Type", "application/json; charset=utf-8", None),
    ],
)
def test_a_header_that_contradicts_the_body_the_client_sends_is_a_validation_failure(
    kube: FakeKubeClient, served_urls: dict[str, str], transport: str, name: str, value: str, said: str | None
) -> None:
    """The HTTP client frames each request's body itself: a Content-Length in the spec failed every connect
    ("LocalProtocolError: Too much data for declared Content-Length", or "Connection closed" over SSE), a
    Transfer-Encoding other than chunked too ("Only Transfer-Encoding: chunked is supported"), and over SSE
    a Content-Type other than JSON made the server refuse each message, which the SDK only logs ("Connection
    closed"). Now a validation failure naming the header; the values that work still connect."""
    headers = [{"name": name, "value": value}]
    spec = {"transport": transport, "url": served_urls[transport], "headers": headers}
    create(kube, "MCPServer", "mcpservers", "remote", spec)
    status = run_validate(make_context(kube, None), "remote")["status"]
    if said is None:
        assert status["statusDetail"] == "Connected successfully with 1 tools", status
    else:
        assert status["statusDetail"] == f'Validation failed: header "{name}" {said}', status
        assert kube.event_reasons("remote") == ["ValidationFailed"]


FROM_THE_SECRET = 'from secret "headers" (key "value")'


@pytest.mark.parametrize(
    ("transport", "name", "value", "said"),
    [
        *(
            (
                transport,
                "Transfer-Encoding",
                "gzip",
                f'Connection failed: header "Transfer-Encoding" {FROM_THE_SECRET} is not chunked, the only '
                "Transfer-Encoding the HTTP client sends (it frames each request's body itself): store "
                "chunked, or remove the header",
            )
            for transport in ("http", "sse")
        ),
        (
            "sse",
            "Content-Type",
            "text/plain",
            f'Connection failed: header "Content-Type" {FROM_THE_SECRET} is not application/json: the client '
            "posts every MCP message as JSON, and an SSE server refuses one said to be anything else; store "
            "application/json, or remove the header",
        ),
        ("http", "Transfer-Encoding", "chunked\n", None),  # a Secret made with echo
        ("sse", "Transfer-Encoding", "Chunked", None),
        ("sse", "Content-Type", "application/json; charset=utf-8", None),
        ("http", "Content-Type", "text/plain", None),  # the SDK sets its own for each message
    ],
)
def test_a_header_secret_that_contradicts_the_body_the_client_sends_is_said_without_its_value(
    kube: FakeKubeClient, served_urls: dict[str, str], transport: str, name: str, value: str, said: str | None
) -> None:
    """A Transfer-Encoding or (over SSE) Content-Type header read from a Secret was refused at validation
    whatever the Secret held, as if written in the spec without a value ("is set by the HTTP client ...:
    remove it", "is not application/json"), so chunked and application/json from a Secret never connected
    and a wrong value was not said to be the Secret's. Now the Secret's value is checked when it is read,
    as a literal's is: refused naming the header, Secret and key (never the value), in
    status.unusableSecret so the watcher checks it again within SECRET_RECHECK_S; the fixed Secret
    connects, and the values that work connect."""
    import json

    from kubechain.statemachines.routing import waits_for_a_secret

    kube.add_secret("default", "headers", {"value": value})
    header = {"name": name, "valueFrom": {"secretKeyRef": {"name": "headers", "key": "value"}}}
    spec = {"transport": transport, "url": served_urls[transport], "headers": [header]}
    create(kube, "MCPServer", "mcpservers", "remote", spec)
    ctx = make_context(kube, None)
    obj = run_validate(ctx, "remote")
    status = obj["status"]
    if said is None:
        assert status["statusDetail"] == "Connected successfully with 1 tools", status
        return
    assert (status["status"], status["connected"]) == ("Error", False), status
    assert status["statusDetail"] == said
    assert status["unusableSecret"] == "headers" and waits_for_a_secret(obj)
    assert kube.event_reasons("remote") == ["ConnectionFailed"]
    events = [e["message"] for e in kube.events() if e["involvedObject"]["name"] == "remote"]
    for where in (json.dumps(status), *events):
        assert value not in where, where

    allowed = "chunked" if name == "Transfer-Encoding" else "application/json"
    kube.request("DELETE", "/api/v1/namespaces/default/secrets/headers")  # the Secret, fixed
    kube.add_secret("default", "headers", {"value": allowed})
    status = run_validate(ctx, "remote")["status"]  # what the watcher's re-check does
    assert status["statusDetail"] == "Connected successfully with 1 tools", status
    assert "unusableSecret" not in status


def test_a_content_length_header_from_a_secret_is_a_validation_failure_before_it_is_read(
    kube: FakeKubeClient, served_urls: dict[str, str]
) -> None:
    """A Content-Length contradicts every body whatever its value: refused by its name, as one written in
    the spec is, without reading the Secret."""
    header = {"name": "Content-Length", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "value"}}}
    spec = {"transport": "http", "url": served_urls["http"], "headers": [header]}
    create(kube, "MCPServer", "mcpservers", "remote", spec)
    status = run_validate(make_context(kube, None), "remote")["status"]
    assert status["statusDetail"] == f'Validation failed: header "Content-Length" {SET_BY_THE_CLIENT}', status
    assert "unusableSecret" not in status


NUL_IN_ENV = "contains a NUL character, which no environment variable can hold"


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        (
            {"command": TIME_SERVER + "\x00"},
            "Validation failed: command contains a NUL character, which no program's name can hold; remove it",
        ),
        (
            {"command": TIME_SERVER, "args": ["--local-timezone", "UTC\x00"]},
            "Validation failed: args[1] contains a NUL character, which no command-line argument can hold; "
            "remove it",
        ),
        (
            {"command": TIME_SERVER, "env": [{"name": "TZ=UTC", "value": "1"}]},
            'Validation failed: env var name "TZ=UTC" contains "=", which ends a variable\'s name: '
            "write its value in value",
        ),
        (
            {"command": TIME_SERVER, "env": [{"name": "TZ\x00", "value": "UTC"}]},
            'Validation failed: env var name "TZ\\0" contains a NUL character, which no variable\'s name '
            "can hold; remove it",
        ),
        (
            {"command": TIME_SERVER, "env": [{"name": "API_KEY", "value": "s3cret\x00"}]},
            f'Validation failed: env var "API_KEY": its value {NUL_IN_ENV}; remove it',
        ),
        (
            {
                "command": TIME_SERVER,
                "env": [
                    {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "binary"}}}
                ],
            },
            f'Connection failed: env var "API_KEY" from secret "keys" (key "binary") {NUL_IN_ENV}; '
            "store the value without it",
        ),
    ],
    ids=["command", "arg", "equals-in-name", "nul-in-name", "nul-in-value", "nul-in-secret"],
)
def test_a_stdio_command_args_or_env_no_process_can_be_started_with_is_refused_naming_it(
    kube: FakeKubeClient, spec: dict[str, Any], said: str
) -> None:
    """A NUL character in the command, an argument or an env var, or a "=" in an env var's name, passed
    validation and failed at every start as "MCP handshake with stdio command ... failed: ValueError:
    embedded null byte" (or "illegal environment variable name"), naming neither the field nor that no
    handshake was tried. Now refused naming it; a Secret's value, which the watcher re-checks within
    SECRET_RECHECK_S, never quoted."""
    import json

    from kubechain.statemachines.routing import waits_for_a_secret

    kube.add_secret("default", "keys", {"binary": "s3cret\x00tail"})
    create(kube, "MCPServer", "mcpservers", "local", {"transport": "stdio", **spec})
    obj = run_validate(make_context(kube, None), "local")
    status = obj["status"]
    assert (status["status"], status["connected"]) == ("Error", False), status
    assert status["statusDetail"] == said
    assert waits_for_a_secret(obj) == said.startswith("Connection failed: ")
    assert "s3cret" not in json.dumps(status)


def test_a_stdio_command_written_with_its_arguments_or_a_line_break_says_what_to_fix(
    kube: FakeKubeClient,
) -> None:
    """A command line in ``command`` ("mcp-server-time --local-timezone UTC") failed as "No such file or
    directory", leaving the reader to see why; one with a line break at its end (``command: |``) put the
    break in the status too. Now the one says arguments go in args, the other fails validation."""
    spec = {"transport": "stdio", "command": f"{TIME_SERVER} --local-timezone UTC"}
    create(kube, "MCPServer", "mcpservers", "command-line", spec)
    ctx = make_context(kube, None)
    status = run_validate(ctx, "command-line")["status"]
    assert status["statusDetail"] == (
        f"Connection failed: cannot start stdio command '{TIME_SERVER} --local-timezone UTC': [Errno 2] No such "
        f"file or directory: '{TIME_SERVER} --local-timezone UTC'; command is a program alone: write its "
        "arguments in args"
    ), status
    create(
        kube, "MCPServer", "mcpservers", "block-scalar", {"transport": "stdio", "command": f"{TIME_SERVER}\n"}
    )
    status = run_validate(ctx, "block-scalar")["status"]
    assert status["statusDetail"] == (
        "Validation failed: command starts or ends with a space or a line break: remove it"
    ), status
    assert kube.event_reasons("block-scalar") == ["ValidationFailed"]
