"""A worker told that an MCP server's tool list changed enqueues a validate of the MCPServer: at most one
per server per window, and never losing the last change (a trailing validate, by countdown)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from kubechain.kube.fake import FakeKubeClient
from kubechain.mcp import MCPManager, kube_secret_resolver
from kubechain.models import Agent, MCPServer
from kubechain.queueing import ResourceMessage, TaskName
from kubechain.settings import Settings
from kubechain.statemachines.routing import dependents, readiness
from kubechain.statemachines.toolset import tool_definitions
from kubechain.testing.waiting import wait_for
from tests.unit.test_mcp_tools_changed import LIST_CHANGING_SERVER
from tests.unit.test_mcpserver_validate import create, make_context, run_validate, unreachable_kubeconfig
from workers.mcpservers import TOOLS_CHANGED_WINDOW_S, ToolsChangedRevalidator
from workers.validators import validate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Sent = list[tuple[TaskName, ResourceMessage, float]]


def recorder() -> tuple[Sent, ToolsChangedRevalidator, Clock]:
    sent: Sent = []
    clock = Clock()
    revalidator = ToolsChangedRevalidator(
        lambda task, message, countdown: sent.append((task, message, countdown)), window_s=2.0, clock=clock
    )
    return sent, revalidator, clock


def countdowns(sent: Sent) -> list[float]:
    return [round(countdown, 3) for _, _, countdown in sent]


def test_a_change_after_a_quiet_spell_is_validated_at_once() -> None:
    sent, changed, _ = recorder()
    changed("team-a", "fetch")
    [(task, message, countdown)] = sent
    assert task == TaskName.VALIDATE and countdown == 0
    assert (message.kind, message.namespace, message.name) == ("MCPServer", "team-a", "fetch")
    assert message.reason == "tools-changed"


def test_a_burst_is_one_validate_now_and_one_at_the_end_of_the_window() -> None:
    """The first validate may have listed the tools before the later changes: the last change is
    validated once more, when the window ends; changes until then are covered by that one."""
    sent, changed, clock = recorder()
    changed("default", "fetch")
    for step in range(1, 20):
        clock.now = 1000.0 + step * 0.1  # a change every 100 ms
        changed("default", "fetch")
    assert countdowns(sent) == [0, 1.9], "one now, one trailing when the window ends (at 1002.0)"

    clock.now = 1002.5  # after the trailing validate was due: the next may come a window after it
    changed("default", "fetch")
    clock.now = 1003.0
    changed("default", "fetch")
    assert countdowns(sent) == [0, 1.9, 1.5]

    clock.now = 1010.0  # quiet since: at once again
    changed("default", "fetch")
    assert countdowns(sent) == [0, 1.9, 1.5, 0]


def test_servers_are_coalesced_apart() -> None:
    sent, changed, clock = recorder()
    changed("default", "fetch")
    changed("default", "search")
    changed("other", "fetch")
    clock.now += 0.5
    changed("default", "search")
    assert [(m.namespace, m.name, round(c, 3)) for _, m, c in sent] == [
        ("default", "fetch", 0),
        ("default", "search", 0),
        ("other", "fetch", 0),
        ("default", "search", 1.5),
    ]


def test_a_failing_enqueue_is_logged_not_raised_and_backs_off_for_a_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that is down blocks each enqueue (~40 s): a chatty server's notices must not try it one
    each. The change is not lost: the next notice after the back-off enqueues at once."""
    attempts: list[float] = []
    down = True

    def broker(task: TaskName, message: ResourceMessage, countdown: float) -> None:
        attempts.append(countdown)
        if down:
            raise ConnectionError("Redis does not answer")

    clock = Clock()
    changed = ToolsChangedRevalidator(broker, window_s=2.0, clock=clock)
    caplog.set_level(logging.WARNING)
    changed("default", "fetch")  # no exception: the watcher's resync is the safety net
    assert "Redis does not answer" in caplog.text and "default/fetch" in caplog.text
    for step in range(1, 20):
        clock.now = 1000.0 + step * 0.1
        changed("default", "fetch")
    assert attempts == [0], "within the back-off: not tried again at once"

    down = False
    clock.now = 1002.0
    changed("default", "fetch")
    assert attempts == [0, 0], "after the back-off: enqueued at once (nothing was validated meanwhile)"
    clock.now = 1002.5
    changed("default", "fetch")
    assert [round(c, 3) for c in attempts] == [0, 0, 1.5], "then coalesced as usual"


def test_servers_not_heard_from_for_a_while_are_forgotten() -> None:
    """One entry per server heard from, not for ever: a deleted server's would stay otherwise."""
    sent, changed, clock = recorder()
    for name in ("gone", "quiet", "chatty"):
        changed("default", name)
    clock.now = 1001.5  # "gone" and "quiet" were due at 1000.0: within a window, still kept
    changed("default", "chatty")
    assert set(changed._due) == {("default", "gone"), ("default", "quiet"), ("default", "chatty")}
    clock.now = 1004.5  # past by more than a window: forgotten
    changed("default", "chatty")
    assert set(changed._due) == {("default", "chatty")}
    clock.now = 1014.5
    changed("default", "other")
    assert set(changed._due) == {("default", "other")}
    assert countdowns(sent) == [0, 0, 0, 0.5, 0, 0], "forgetting changes no countdown"


def test_the_window_is_short() -> None:
    assert 0 < TOOLS_CHANGED_WINDOW_S <= 5


def test_a_tools_workers_manager_passes_tool_list_changes_to_the_queue(tmp_path: Path) -> None:
    """build_context gives the tools worker's MCPManager a revalidator on the worker's own enqueue."""
    from workers.context import build_context

    sent: Sent = []
    ctx = build_context(
        Settings(kubeconfig=unreachable_kubeconfig(tmp_path)),
        lambda task, message, countdown: sent.append((task, message, countdown)),
        runs_tools=True,
    )
    try:
        loop = ctx.mcp._ensure_loop()
        loop.call_soon_threadsafe(ctx.mcp._tools_changed, ("default", "fetch"))
        wait_for(lambda: sent, 10, what="the validate to be enqueued")
        [(task, message, countdown)] = sent
        assert (task, message.kind, message.name, message.reason, countdown) == (
            TaskName.VALIDATE,
            "MCPServer",
            "fetch",
            "tools-changed",
            0,
        )
    finally:
        ctx.events.flush()
        ctx.mcp.close()
        ctx.kube.close()


@pytest.mark.slow
def test_a_tool_added_at_runtime_reaches_the_status_and_the_agents_that_use_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """End to end but for the broker: the session hears the change, the validate it enqueues writes the
    new list (and logs the change), the watcher re-validates the Agent, whose LLM is offered the tool."""
    kube = FakeKubeClient()
    sent: Sent = []
    manager = MCPManager(
        kube_secret_resolver(kube),
        connect_timeout_s=60,
        on_tools_changed=ToolsChangedRevalidator(
            lambda task, message, countdown: sent.append((task, message, countdown))
        ),
    )
    ctx = make_context(kube, manager)
    try:
        spec = {"transport": "stdio", "command": sys.executable, "args": [LIST_CHANGING_SERVER]}
        create(kube, "MCPServer", "mcpservers", "changing", spec)
        create(
            kube,
            "Agent",
            "agents",
            "helper",
            {"llmRef": {"name": "gpt"}, "system": "Help.", "mcpServers": [{"name": "changing"}]},
        )
        before = run_validate(ctx, "changing")
        assert [tool["name"] for tool in before["status"]["tools"]] == ["add_tool"]

        server = MCPServer.model_validate(before)
        assert manager.call_tool(server, "add_tool", {"name": "extra"}).text == "adding extra"
        wait_for(lambda: sent, 30, what="a validate to be enqueued")
        [(task, message, countdown)] = sent
        assert (task, message.name, message.reason, countdown) == (
            TaskName.VALIDATE,
            "changing",
            "tools-changed",
            0,
        )

        caplog.set_level(logging.INFO, logger="workers.mcpservers")
        validate(ctx, message)  # this worker's session lists the tools again (a control worker connects)
        after = kube.get_raw("mcpservers", "default", "changing")
        assert [tool["name"] for tool in after["status"]["tools"]] == ["add_tool", "extra"]
        assert after["status"]["statusDetail"] == "Connected successfully with 2 tools"
        [line] = [r.__dict__ for r in caplog.records if "tools changed" in r.getMessage()]
        assert (line["resource"], line["old_tool_count"], line["new_tool_count"]) == ("changing", 1, 2)

        agent_raw = kube.get_raw("agents", "default", "helper")
        assert readiness("MCPServer", after) != readiness("MCPServer", before)
        works = dependents("MCPServer", after, {"Agent": {("default", "helper"): agent_raw}})
        assert [(w.kind, w.name) for w in works] == [("Agent", "helper")]
        validate(ctx, ResourceMessage(kind="Agent", namespace="default", name="helper"))
        agent = Agent.model_validate(kube.get_raw("agents", "default", "helper"))
        assert [s.tools for s in agent.status.valid_mcp_servers or []] == [["add_tool", "extra"]]
        offered = tool_definitions(agent, [], [MCPServer.model_validate(after)], [], [])
        assert [d.name for d in offered] == ["changing__add_tool", "changing__extra"]
    finally:
        manager.close()
