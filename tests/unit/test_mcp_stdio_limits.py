"""How many stdio MCP servers (child processes of 70-160 MiB each) one worker process runs at once: those a
checks worker starts to validate MCPServers (KUBECHAIN_MCP_MAX_STDIO_CHECKS), with a stand-in manager whose
tool listing holds until the test lets it go, and the sessions a tools worker keeps for tool calls
(KUBECHAIN_MCP_MAX_STDIO_SESSIONS), with stand-in sessions whose calls hold until the test lets them go."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import workers.mcpservers as mcpservers
from kubechain.kube.fake import FakeKubeClient
from kubechain.llm.base import LLMResponse
from kubechain.models import MCPServer, MCPTool
from tests.unit.fakes import FakeLLM, context, create, message
from workers.validators import validate


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class StdioServers:
    """The stdio servers the stand-in managers run: one runs from its listing until its manager closes
    (a checks worker's validation stops its server), and its listing answers once the test lets it."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.running: set[str] = set()
        self.most_at_once = 0
        self.let_go: set[str] = set()

    def start(self, name: str) -> None:
        with self.condition:
            self.running.add(name)
            self.most_at_once = max(self.most_at_once, len(self.running))
            self.condition.notify_all()
            self.condition.wait_for(lambda: name in self.let_go)

    def stop(self, name: str) -> None:
        with self.condition:
            self.running.discard(name)
            self.condition.notify_all()

    def release(self, *names: str) -> None:
        with self.condition:
            self.let_go.update(names)
            self.condition.notify_all()


class CheckingManager:
    """A checks worker's temporary MCPManager (one a validation, closed after it)."""

    def __init__(self, servers: StdioServers) -> None:
        self.servers = servers
        self.started: str | None = None

    def check_command(self, server: MCPServer) -> None:
        return None

    def list_tools(self, server: MCPServer) -> list[MCPTool]:
        self.started = server.name
        self.servers.start(server.name)
        return [MCPTool(name="now", description="the time", input_schema={"type": "object"})]

    def close(self) -> None:
        if self.started is not None:
            self.servers.stop(self.started)


def no_llm(_: Any) -> LLMResponse:
    raise AssertionError("no LLM here")


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> StdioServers:
    running = StdioServers()
    monkeypatch.setattr(mcpservers, "_temporary_manager", lambda ctx: CheckingManager(running))
    return running


def status(kube: FakeKubeClient, name: str) -> dict[str, Any]:
    return kube.get_raw("mcpservers", "default", name).get("status") or {}


def test_a_checks_worker_starts_at_most_its_setting_of_stdio_servers_at_once(
    servers: StdioServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each thread of a checks worker (16 in deploy/base/workers.yaml) started the stdio server it
    validated: 30 MCPServers applied at once, or the watcher's first resync of a cluster holding them,
    started 16 at once (16 x 70-160 MiB) in a pod limited to 1 GiB. At most KUBECHAIN_MCP_MAX_STDIO_CHECKS
    now run at once; a server not yet checked that waits for its turn says so (Pending, never Error)."""
    monkeypatch.setattr(mcpservers, "TURN_NOTICE_S", 0.0, raising=False)  # say so at once
    kube = FakeKubeClient()
    ctx = context(kube, FakeLLM(no_llm), mcp_max_stdio_checks=2)  # a checks worker: no MCPManager kept
    names = ["a", "b", "c"]
    for name in names:
        create(kube, "MCPServer", "mcpservers", name, {"transport": "stdio", "command": "mcp-server-time"})
    checks = [threading.Thread(target=validate, args=(ctx, message("MCPServer", name))) for name in names]
    for check in checks:
        check.start()

    def waiting() -> list[str]:
        return [name for name in names if status(kube, name).get("statusDetail", "").startswith("Waiting")]

    try:
        wait_until(
            lambda: len(servers.running) + len(waiting()) == len(names),
            what="each server to be started or waiting for its turn",
        )
        assert len(servers.running) == 2
        [waiter] = waiting()
        assert status(kube, waiter) == {
            "connected": False,
            "status": "Pending",
            "statusDetail": "Waiting to be checked: this worker is checking 2 stdio MCP servers, as many "
            "as it runs at once (KUBECHAIN_MCP_MAX_STDIO_CHECKS)",
            "observedGeneration": 1,
        }
        assert waiter not in servers.running
    finally:
        servers.release(*names)
        for check in checks:
            check.join(30)
    assert servers.most_at_once == 2
    for name in names:
        assert status(kube, name)["status"] == "Ready", status(kube, name)
    assert {event["type"] for event in kube.events()} == {"Normal"}, "waiting is no failure"


def test_a_server_checked_as_it_stands_keeps_its_status_while_it_waits_for_a_turn() -> None:
    """Only a server not yet checked as it stands (new, or edited since) says it waits: a Ready one
    re-checked by the watcher's resync stays Ready, an Error one keeps saying why, until the check ends."""
    fresh = MCPServer.model_validate(
        {
            "metadata": {"name": "s", "generation": 2},
            "spec": {"transport": "stdio", "command": "mcp-server-time"},
            "status": {},
        }
    )
    transition = mcpservers.plan_waiting_for_a_turn(fresh, 4)
    assert transition is not None and transition.status["status"] == "Pending"
    assert [event.reason for event in transition.events] == ["Initializing"]
    for status_now in ("Ready", "Error"):
        checked = fresh.model_copy(
            update={
                "status": fresh.status.model_copy(update={"status": status_now, "observed_generation": 2})
            }
        )
        assert mcpservers.plan_waiting_for_a_turn(checked, 4) is None
    edited = fresh.model_copy(
        update={"status": fresh.status.model_copy(update={"status": "Ready", "observed_generation": 1})}
    )
    assert mcpservers.plan_waiting_for_a_turn(edited, 4) is not None


# -- Turns ----------------------------------------------------------------------------------------


def test_turns_go_in_the_order_asked_and_a_waiter_that_gives_up_leaves_the_line() -> None:
    from kubechain.mcp.turns import Turns

    turns = Turns(1)
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with turns.turn():
            holding.set()
            release.wait(30)

    def take(name: str, on_wait: Callable[[], None] | None = None) -> None:
        try:
            with turns.turn(on_wait):
                order.append(name)
        except RuntimeError:
            order.append(f"{name} gave up")

    def give_up() -> None:
        raise RuntimeError("the status write failed")

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    waiters = []
    for name, on_wait, in_line in (
        ("first", None, 1),
        ("quitter", give_up, 1),  # told at once that it waits, it gives up: out of the line
        ("second", None, 2),
        ("third", None, 3),
    ):
        waiter = threading.Thread(target=take, args=(name, on_wait))
        waiter.start()
        waiters.append(waiter)
        if on_wait is not None:
            waiter.join(30)
        wait_until(lambda: turns.waiting == in_line, what=f"{name} in line")  # noqa: B023
    assert order == ["quitter gave up"] and turns.waiting == 3 and turns.running == 1
    release.set()
    for thread in (holder, *waiters):
        thread.join(30)
    assert order == ["quitter gave up", "first", "second", "third"]
    assert turns.running == 0 and turns.waiting == 0


# -- a tools worker's sessions (KUBECHAIN_MCP_MAX_STDIO_SESSIONS) -------------------------------------


class StdioChildren:
    """The stand-in sessions' children: which run (from start to finish), the most at once, and a gate per
    server that its tool calls wait at (open unless the test closes it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.calling: set[str] = set()
        self.stopped_in_a_call: list[str] = []
        self.most_at_once = 0
        self.gates: dict[str, threading.Event] = {}

    def gate(self, label: str) -> threading.Event:
        with self.lock:
            if label not in self.gates:
                self.gates[label] = threading.Event()
                self.gates[label].set()  # open until closed
            return self.gates[label]

    def close_gate(self, name: str) -> None:
        self.gate(f"default/{name}").clear()

    def open_gate(self, name: str) -> None:
        self.gate(f"default/{name}").set()


class FakeStdioSession:
    """kubechain.mcp.session.Session's face to the manager, without a process: a child "runs" from its
    start until it finishes (soon after a stop, as a real one exits)."""

    children: StdioChildren

    def __init__(self, label: str, spec: Any, connect_timeout_s: float, call_timeout_s: float, **hooks: Any):
        import asyncio

        import mcp_types as types

        self.label, self.spec = label, spec
        self.fingerprint = spec.fingerprint()
        self.tools = [types.Tool(name="now", input_schema={"type": "object"})]
        self.serves: Any = None
        self.dead = self.retired = self.stopping = False
        self.inflight = 0
        self.finished = asyncio.Event()
        self.process = None
        self._on_released: Callable[[], None] | None = hooks.get("on_released")

    @property
    def usable(self) -> bool:
        return not (self.dead or self.retired or self.stopping)

    @property
    def leaving(self) -> bool:
        return self.retired or self.stopping

    @property
    def pid(self) -> int | None:
        return None

    async def start(self) -> None:
        with self.children.lock:
            self.children.running.add(self.label)
            self.children.most_at_once = max(self.children.most_at_once, len(self.children.running))

    def stop(self) -> None:
        import asyncio

        if not self.stopping:
            self.stopping = True
            asyncio.get_running_loop().call_soon(self._exited)

    def _exited(self) -> None:
        with self.children.lock:
            self.children.running.discard(self.label)
            if self.inflight:
                self.children.stopped_in_a_call.append(self.label)
        self.dead = True
        self.finished.set()
        if self._on_released is not None:
            self._on_released()

    cancel = stop

    def retire(self) -> None:
        self.retired = True
        if self.inflight == 0:
            self.stop()

    async def wait_finished(self, timeout: float) -> bool:
        import asyncio

        try:
            await asyncio.wait_for(asyncio.shield(self.finished.wait()), timeout)
        except TimeoutError:
            return False
        return True

    async def refresh_tools(self) -> list[Any]:
        return self.tools

    def time_after_a_call(self) -> float:
        return 0.0

    async def call_tool(
        self, tool: str, arguments: dict[str, Any], *, timeout_s: Any = None, attempt: Any = None
    ):
        import asyncio

        import mcp_types as types

        self.inflight += 1
        with self.children.lock:
            self.children.calling.add(self.label)
        try:
            if attempt is not None:
                attempt.sends += 1
            await asyncio.to_thread(self.children.gate(self.label).wait, 30)
            return types.CallToolResult(content=[types.TextContent(type="text", text=f"ran on {self.label}")])
        finally:
            self.inflight -= 1
            with self.children.lock:
                self.children.calling.discard(self.label)
            if self.retired and self.inflight == 0:
                self.stop()
            if self._on_released is not None:
                self._on_released()


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> StdioChildren:
    import kubechain.mcp.session as session_module

    running = StdioChildren()
    monkeypatch.setattr(FakeStdioSession, "children", running, raising=False)
    monkeypatch.setattr(session_module, "Session", FakeStdioSession)
    return running


@pytest.fixture
def tools_worker(kube: FakeKubeClient, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A tools worker's context (its MCPManager keeps sessions) over the in-memory API server."""
    from kubechain.kube.client import KubeClient
    from kubechain.settings import Settings
    from workers.context import build_context

    monkeypatch.setattr(KubeClient, "from_settings", classmethod(lambda cls, settings, component: kube))
    made: list[Any] = []

    def build(**settings: Any) -> Any:
        made.append(build_context(Settings(**settings), lambda *_: None, runs_tools=True))
        return made[-1]

    yield build
    for ctx in made:
        ctx.events.flush()
        ctx.mcp.close()


@pytest.fixture
def kube() -> FakeKubeClient:
    return FakeKubeClient()


def stdio_server(kube: FakeKubeClient, name: str) -> MCPServer:
    create(kube, "MCPServer", "mcpservers", name, {"transport": "stdio", "command": "mcp-server-time"})
    return kube.get(MCPServer, "default", name)


def test_a_tools_worker_closes_its_least_recently_used_stdio_session_to_start_another(
    kube: FakeKubeClient, children: StdioChildren, tools_worker: Any
) -> None:
    """A tools worker kept a session (a stdio child of 70-160 MiB) for every MCPServer a call used in the
    last 15 minutes, however many: 30 servers in use were 30 children in a pod limited to 4 GiB. It now
    holds at most KUBECHAIN_MCP_MAX_STDIO_SESSIONS, closing the one unused for longest to start another."""
    ctx = tools_worker(mcp_max_stdio_sessions=2)
    servers = {name: stdio_server(kube, name) for name in ("a", "b", "c")}
    for name in ("a", "b", "c"):
        assert ctx.mcp.call_tool(servers[name], "now", {}).text == f"ran on default/{name}"
    assert children.running == {"default/b", "default/c"}
    assert children.most_at_once == 2
    ctx.mcp.call_tool(servers["b"], "now", {})  # b used after c: c is the one unused for longest
    ctx.mcp.call_tool(servers["a"], "now", {})
    assert children.running == {"default/a", "default/b"}
    assert children.most_at_once == 2


def test_a_session_with_a_call_in_flight_is_never_closed_for_another(
    kube: FakeKubeClient, children: StdioChildren, tools_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With every session busy, a call to another server waits for one to be free (within its budget),
    then closes it: a call in flight is never cut off for room."""
    import concurrent.futures
    import logging

    caplog.set_level(logging.INFO, logger="kubechain.mcp")
    ctx = tools_worker(mcp_max_stdio_sessions=2)
    servers = {name: stdio_server(kube, name) for name in ("a", "b", "c")}
    children.close_gate("a")
    children.close_gate("b")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        calls = {name: pool.submit(ctx.mcp.call_tool, servers[name], "now", {}) for name in ("a", "b")}
        wait_until(lambda: children.calling == {"default/a", "default/b"}, what="a and b in calls")
        calls["c"] = pool.submit(ctx.mcp.call_tool, servers["c"], "now", {})
        wait_until(
            lambda: any("waiting for one of its 2 stdio sessions" in r.getMessage() for r in caplog.records),
            what="c to wait for room",
        )
        assert children.running == {"default/a", "default/b"}
        children.open_gate("a")
        assert calls["a"].result(30).text == "ran on default/a"
        assert calls["c"].result(30).text == "ran on default/c"
        assert children.running == {"default/b", "default/c"}
        children.open_gate("b")
        assert calls["b"].result(30).text == "ran on default/b"
    assert children.most_at_once == 2
    assert children.stopped_in_a_call == []


def test_a_call_that_finds_no_free_session_within_its_budget_is_not_sent(
    kube: FakeKubeClient, children: StdioChildren, tools_worker: Any
) -> None:
    from kubechain.mcp import MCPError

    ctx = tools_worker(mcp_max_stdio_sessions=1)
    busy, other = stdio_server(kube, "busy"), stdio_server(kube, "other")
    children.close_gate("busy")
    in_flight = threading.Thread(target=ctx.mcp.call_tool, args=(busy, "now", {}))
    in_flight.start()
    try:
        wait_until(lambda: children.calling == {"default/busy"}, what="a call in flight")
        with pytest.raises(MCPError) as failed:
            ctx.mcp.call_tool(other, "now", {}, within_s=1.5)
        assert str(failed.value) == (
            "MCP server default/other not started: this worker runs 1 stdio MCP server, as many as it "
            "may at once (KUBECHAIN_MCP_MAX_STDIO_SESSIONS), each busy with a call, and none was free in "
            "time; nothing was sent to it"
        )
        assert children.running == {"default/busy"}
    finally:
        children.open_gate("busy")
        in_flight.join(30)
