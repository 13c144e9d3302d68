"""A server's tool list changing under an open session: the session hears it (``notifications/tools/list_changed``
of the 2025 protocol, a ``subscriptions/listen`` stream of the 2026-07-28 one) and the manager tells its
``on_tools_changed`` callback, off its event loop. Fakes first; then real servers (``list_changing_server``)
over stdio and streamable HTTP in both protocol eras, and SSE."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from mcp.shared.exceptions import MCPError as SDKError
from mcp_types import CONNECTION_CLOSED, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND
from mcp_types.methods import parse_server_notification

from kubechain.mcp import MCPManager, resolve_spec
from kubechain.mcp import session as session_module
from kubechain.mcp.session import Session
from kubechain.models import MCPServer
from kubechain.testing.waiting import wait_for
from tests.unit import list_changing_server
from tests.unit.test_mcp_manager import UvicornThread, mcp_server, resolve_secret

LIST_CHANGING_SERVER = str(Path(list_changing_server.__file__))
TOOLS_LIST_CHANGED = "notifications/tools/list_changed"


def a_session(on_tools_changed: Any = None, *, tools_list_asked: bool = True) -> Session:
    """A session (never started) as it is once its connect has asked for the tool list, or before."""
    spec = resolve_spec(
        mcp_server("changing", transport="http", url="http://127.0.0.1:1/mcp"), resolve_secret
    )
    session = Session("default/changing", spec, 5.0, 5.0, on_tools_changed=on_tools_changed)
    session._tools_list_asked = tools_list_asked
    return session


# -- the session ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2025-11-25", "2026-07-28"])
def test_a_tools_list_changed_notification_of_either_era_reaches_the_sessions_callback(version: str) -> None:
    """Told apart by its method, not by one protocol version's class: the SDK parses each era's own."""
    heard: list[str] = []
    session = a_session(lambda: heard.append("changed"))
    stamped = {"_meta": {"io.modelcontextprotocol/subscriptionId": "listen-1"}}  # as a listen stream's
    for params in (None, stamped):
        asyncio.run(session._on_message(parse_server_notification(TOOLS_LIST_CHANGED, version, params)))
    assert heard == ["changed", "changed"]


def test_a_change_heard_before_the_connect_asked_for_the_tool_list_is_in_that_list() -> None:
    """A server that adds tools as the client initializes (server-everything does) says so before the
    client lists them: nothing to look up again."""
    heard: list[str] = []
    session = a_session(lambda: heard.append("changed"), tools_list_asked=False)
    asyncio.run(session._on_message(parse_server_notification(TOOLS_LIST_CHANGED, "2025-11-25", None)))
    assert heard == []
    session._tools_list_asked = True
    asyncio.run(session._on_message(parse_server_notification(TOOLS_LIST_CHANGED, "2025-11-25", None)))
    assert heard == ["changed"]


def test_other_messages_are_not_a_change_and_a_raising_callback_does_not_break_the_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    heard: list[str] = []
    session = a_session(lambda: heard.append("changed"))
    for other in ("notifications/prompts/list_changed", "notifications/resources/list_changed"):
        asyncio.run(session._on_message(parse_server_notification(other, "2025-11-25", None)))
    asyncio.run(session._on_message(OSError("the transport hiccuped")))
    assert heard == []

    def raising() -> None:
        raise RuntimeError("the callback failed")

    failing = a_session(raising)
    caplog.set_level(logging.WARNING, logger="kubechain.mcp")
    asyncio.run(failing._on_message(parse_server_notification(TOOLS_LIST_CHANGED, "2025-11-25", None)))
    assert any("the callback failed" in record.getMessage() for record in caplog.records), caplog.text
    asyncio.run(a_session()._on_message(parse_server_notification(TOOLS_LIST_CHANGED, "2025-11-25", None)))


def fake_client(protocol_version: str, list_changed: bool | None) -> Any:
    tools = SimpleNamespace(list_changed=list_changed) if list_changed is not None else None
    return SimpleNamespace(
        protocol_version=protocol_version, server_capabilities=SimpleNamespace(tools=tools)
    )


def test_listen_is_opened_only_at_2026_and_only_if_the_server_advertises_tool_list_changes() -> None:
    listens = session_module.listens_for_tool_changes
    assert listens(fake_client("2026-07-28", True))
    assert not listens(fake_client("2026-07-28", False))
    assert not listens(fake_client("2026-07-28", None))  # no tools capability at all
    assert not listens(fake_client("2025-11-25", True))  # notifications come unasked at 2025


class Backoffs:
    """The session's back-off sleep, made instant: the delays asked for are recorded."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await anyio.lowlevel.checkpoint()


class EndingThenHeldListens:
    """A client whose first subscriptions/listen stream ends at once (its server closed it) and whose
    second stays open until cancelled; ``opened`` counts the streams acknowledged."""

    def __init__(self) -> None:
        self.opened = 0
        self.second_open = anyio.Event()

    @asynccontextmanager
    async def listen(self, *, tools_list_changed: bool) -> AsyncIterator[Any]:
        assert tools_list_changed
        self.opened += 1
        yield self._subscription(ends=self.opened == 1)

    def _subscription(self, *, ends: bool) -> Any:
        parent = self

        class Subscription:
            honored = SimpleNamespace(tools_list_changed=True)

            def __aiter__(self) -> Subscription:
                return self

            async def __anext__(self) -> Any:
                if ends:
                    raise StopAsyncIteration
                parent.second_open.set()
                await anyio.sleep_forever()

        return Subscription()


def test_a_listen_stream_that_ends_is_opened_again_and_what_it_missed_refetched() -> None:
    """No replay: a change made while no stream was open went unheard, so a stream opened again (after the
    tools were listed) counts as a change. The first one, opened before the listing, does not."""
    heard: list[str] = []
    session = a_session(lambda: heard.append("changed"), tools_list_asked=False)
    session._listen_backoff = Backoffs()
    client = EndingThenHeldListens()

    async def scenario() -> None:
        first_attempt = anyio.Event()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(session._follow_tool_list_changes, client, first_attempt)
            await first_attempt.wait()
            session._tools_list_asked = True  # what run() records as it lists the tools
            with anyio.fail_after(10):
                await client.second_open.wait()
            tasks.cancel_scope.cancel()

    anyio.run(scenario)
    assert client.opened == 2
    assert heard == ["changed"], "the stream opened again: what changed meanwhile is looked up"


class ScriptedListens:
    """A client whose subscriptions/listen opens follow ``script``, one entry an attempt: "drops"
    (acknowledged, then lost), "holds" (acknowledged, open until cancelled) or an exception raised before
    the ack. Past the script, every open holds. ``attempts`` counts the opens tried; ``held`` is set when
    one holds."""

    def __init__(self, *script: str | BaseException) -> None:
        self.script = list(script)
        self.attempts = 0
        self.held = anyio.Event()

    @asynccontextmanager
    async def listen(self, *, tools_list_changed: bool) -> AsyncIterator[Any]:
        step = self.script[self.attempts] if self.attempts < len(self.script) else "holds"
        self.attempts += 1
        if isinstance(step, BaseException):
            raise step
        yield self._subscription(drops=step == "drops")

    def _subscription(self, *, drops: bool) -> Any:
        parent = self

        class Subscription:
            honored = SimpleNamespace(tools_list_changed=True)

            def __aiter__(self) -> Subscription:
                return self

            async def __anext__(self) -> Any:
                if drops:
                    raise SubscriptionLost(
                        "subscription 'listen-1' ended without the server's graceful close"
                    )
                parent.held.set()
                await anyio.sleep_forever()

        return Subscription()


@pytest.mark.parametrize(
    "failed_open",
    [
        SDKError(
            INTERNAL_ERROR, "Server returned an error response"
        ),  # a proxy's 502/503 as the server restarts
        SDKError(CONNECTION_CLOSED, "Connection closed"),  # its stream ended before the ack
        SubscriptionLost("subscription 'listen-2' ended before it was acknowledged"),
        TimeoutError(),
    ],
    ids=["http-5xx", "closed-before-ack", "lost-before-ack", "no-ack"],
)
def test_a_reopen_that_fails_on_the_way_is_tried_again_with_the_back_off(failed_open: BaseException) -> None:
    """The stream drops, and opening it again fails while the server restarts: at 2026-07-28 there is no
    session id, so the session stays usable, and it must go on listening once the server is back."""
    session = a_session(lambda: None)
    backoffs = Backoffs()
    session._listen_backoff = backoffs
    client = ScriptedListens("drops", failed_open, "holds")

    async def scenario() -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(session._follow_tool_list_changes, client, anyio.Event())
            with anyio.fail_after(10):
                await client.held.wait()
            tasks.cancel_scope.cancel()

    anyio.run(scenario)
    assert client.attempts >= 3
    assert backoffs.delays == [1.0, 2.0], "the back-off doubles while opens keep failing"


class RetriedAnyway(Exception):
    pass


@pytest.mark.parametrize(
    "refusal",
    [
        SDKError(METHOD_NOT_FOUND, "Method not found"),
        SDKError(INVALID_REQUEST, "subscriptions/listen is not supported"),
        SDKError(INVALID_PARAMS, "unknown notification filter"),
        ListenNotSupportedError("2025-11-25"),
    ],
    ids=["method-not-found", "invalid-request", "invalid-params", "not-supported"],
)
def test_a_server_that_refuses_the_listen_is_not_asked_again(
    refusal: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    session = a_session(lambda: None)

    async def no_retry(delay: float) -> None:
        raise RetriedAnyway(delay)

    session._listen_backoff = no_retry
    client = ScriptedListens(refusal)
    caplog.set_level(logging.INFO, logger="kubechain.mcp")

    async def scenario() -> None:
        with anyio.fail_after(10):
            await session._follow_tool_list_changes(client, anyio.Event())

    anyio.run(scenario)
    assert client.attempts == 1
    assert any("refused" in record.getMessage() for record in caplog.records), caplog.text


# -- the manager ------------------------------------------------------------------------------------


def test_the_managers_callback_runs_off_its_loop_with_the_servers_name() -> None:
    """The callback may block (a worker publishes a message to Redis): never on the loop that every
    session of the process shares."""
    heard: list[tuple[str, str, str]] = []
    manager = MCPManager(
        resolve_secret,
        on_tools_changed=lambda ns, name: heard.append((ns, name, threading.current_thread().name)),
    )
    try:
        loop = manager._ensure_loop()
        loop.call_soon_threadsafe(manager._tools_changed, ("team-a", "fetch"))
        wait_for(lambda: heard, 10, what="the callback")
        namespace, name, thread = heard[0]
        assert (namespace, name) == ("team-a", "fetch")
        assert thread != "kubechain-mcp", "not on the manager's event loop"
    finally:
        manager.close()


def test_a_callback_that_raises_is_logged_and_the_next_change_still_reaches_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    def flaky(namespace: str, name: str) -> None:
        calls.append(name)
        if len(calls) == 1:
            raise ConnectionError("Redis does not answer")

    caplog.set_level(logging.WARNING, logger="kubechain.mcp")
    manager = MCPManager(resolve_secret, on_tools_changed=flaky)
    try:
        loop = manager._ensure_loop()
        loop.call_soon_threadsafe(manager._tools_changed, ("default", "first"))
        loop.call_soon_threadsafe(manager._tools_changed, ("default", "second"))
        wait_for(lambda: calls == ["first", "second"], 10, what=f"both calls, not {calls}")
        assert any("Redis does not answer" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        manager.close()


def test_notices_for_a_server_whose_callback_is_still_queued_or_running_queue_at_most_one_more() -> None:
    """A chatty server, and a callback blocked (Redis does not answer): the notices are merged into the one
    call still queued, not queued one each (memory without limit). One heard while its call runs queues
    exactly one more, which looks at the list after it."""
    entered, release = threading.Event(), threading.Event()
    calls: list[tuple[str, str]] = []

    def blocked(namespace: str, name: str) -> None:
        calls.append((namespace, name))
        entered.set()
        release.wait(30)

    manager = MCPManager(resolve_secret, on_tools_changed=blocked)
    try:
        loop = manager._ensure_loop()
        executor = manager._tools_changed_calls
        assert executor is not None
        loop.call_soon_threadsafe(manager._tools_changed, ("default", "chatty"))
        assert entered.wait(10), "the first call started"
        for _ in range(10_000):
            loop.call_soon_threadsafe(manager._tools_changed, ("default", "chatty"))
        heard = threading.Event()
        loop.call_soon_threadsafe(heard.set)  # after every notice (the loop runs them in order)
        assert heard.wait(10)
        assert executor._work_queue.qsize() <= 1, "one call queued behind the running one, not one a notice"
        release.set()
        done = executor.submit(lambda: None)  # the single thread runs it after every queued call
        done.result(10)
        assert calls == [("default", "chatty")] * 2
    finally:
        release.set()
        manager.close()


# -- real servers -----------------------------------------------------------------------------------


@pytest.fixture
def changes() -> Iterator[tuple[MCPManager, list[tuple[str, str]]]]:
    heard: list[tuple[str, str]] = []
    manager = MCPManager(
        resolve_secret,
        call_timeout_s=30,
        connect_timeout_s=60,
        on_tools_changed=lambda ns, name: heard.append((ns, name)),
    )
    yield manager, heard
    manager.close()


@contextmanager
def list_changing(transport: str, version: str) -> Iterator[MCPServer]:
    """A fresh list-changing server (adding a tool changes it for every session) of the protocol
    ``version``, and the MCPServer for it."""
    if transport == "stdio":
        args = [LIST_CHANGING_SERVER, *(["--legacy"] if version == "2025-11-25" else [])]
        yield mcp_server("changing", transport="stdio", command=sys.executable, args=args)
        return
    sdk_server = list_changing_server.make_server()
    app = (
        sdk_server.sse_app(host="127.0.0.1")
        if transport == "sse"
        else sdk_server.streamable_http_app(host="127.0.0.1")
    )
    if version == "2025-11-25":
        app = list_changing_server.refusing_discover(app)
    with UvicornThread(app) as up:
        path = "sse" if transport == "sse" else "mcp"
        yield mcp_server("changing", transport=transport, url=f"http://127.0.0.1:{up.port}/{path}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("transport", "version"),
    [
        ("stdio", "2025-11-25"),
        ("stdio", "2026-07-28"),
        ("http", "2025-11-25"),
        ("http", "2026-07-28"),
        ("sse", "2026-07-28"),  # an SSE server of the 2025 protocol would answer its discover on the stream
    ],
)
def test_a_tool_added_at_runtime_reaches_the_callback_and_the_next_listing(
    changes: tuple[MCPManager, list[tuple[str, str]]], transport: str, version: str
) -> None:
    """The server adds a tool after the call that asked for it has answered, outside any request: over
    stdio on the pipe, over streamable HTTP on the standalone GET stream (2025) or the listen stream
    (2026-07-28). The session's next listing has it, on the same connection."""
    manager, heard = changes
    with list_changing(transport, version) as server:
        try:
            assert [tool.name for tool in manager.list_tools(server)] == ["add_tool"]
            session = manager._peek("default", "changing")
            assert session is not None and session.client is not None
            assert session.client.protocol_version == version

            assert manager.call_tool(server, "add_tool", {"name": "extra"}).text == "adding extra"
            wait_for(lambda: heard, 30, what="the tool-list change to reach the callback")
            assert heard[0] == ("default", "changing")
            assert [tool.name for tool in manager.list_tools(server)] == ["add_tool", "extra"]
            assert manager._peek("default", "changing") is session, "listed again on the same session"
            assert manager.call_tool(server, "extra", {}).text == "extra ran"
        finally:
            manager.disconnect("default", "changing")  # while its server still answers


@pytest.mark.slow
def test_a_refused_listen_leaves_the_session_working(
    changes: tuple[MCPManager, list[tuple[str, str]]], caplog: pytest.LogCaptureFixture
) -> None:
    """A 2026 server that advertises tool-list changes but refuses subscriptions/listen: the session
    works as before, without hearing of changes (the watcher's resync checks the server)."""
    manager, heard = changes
    app = list_changing_server.make_server().streamable_http_app(host="127.0.0.1")
    caplog.set_level(logging.INFO, logger="kubechain.mcp")
    with UvicornThread(list_changing_server.refusing_method(app, "subscriptions/listen")) as up:
        server = mcp_server("refusing", transport="http", url=f"http://127.0.0.1:{up.port}/mcp")
        assert [tool.name for tool in manager.list_tools(server)] == ["add_tool"]
        wait_for(
            lambda: any("subscriptions/listen" in r.getMessage() for r in caplog.records),
            10,
            what="the refusal to be logged",
        )
        assert manager.call_tool(server, "add_tool", {"name": "extra"}).text == "adding extra"
        wait_for(
            lambda: [tool.name for tool in manager.list_tools(server)] == ["add_tool", "extra"],
            10,
            what="the added tool to be listed",
        )
        assert manager.connected("default", "refusing") and heard == []
        manager.disconnect("default", "refusing")
