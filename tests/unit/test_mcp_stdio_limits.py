"""How many stdio MCP servers (child processes of 50-160 MiB each) one worker process runs at once: those a
checks worker starts to validate MCPServers (KUBECHAIN_MCP_MAX_STDIO_CHECKS), with a stand-in manager whose
tool listing holds until the test lets it go."""

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
