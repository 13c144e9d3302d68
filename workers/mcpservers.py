"""``validate`` for MCPServer: check the approval channel and the spec, connect, record the tool list.

The original's controller (§2.7): ContactChannelNotFound / ContactChannelNotReady, "Validation failed: ...",
"Connection failed: ...", and on success ``connected=true``, "Connected successfully with N tools" and a
``Connected`` event. The watcher re-validates servers that are not connected on every resync, so failures
need no retry scheduling here. A re-validation that finds nothing changed reuses this process's session
and writes nothing.

A tools worker's session that hears its server's tool list changed has the server validated again
(:class:`ToolsChangedRevalidator`): the new list reaches ``status.tools``, and from there the Agents.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from kubechain.kube.errors import Unavailable
from kubechain.mcp import MCPError, MCPManager, UnusableSecret, kube_secret_resolver, validate_spec
from kubechain.models import ContactChannel, MCPServer, MCPTool
from kubechain.models.base import stored_json_bytes
from kubechain.queueing import ResourceMessage, TaskName
from kubechain.statemachines.transition import Transition, normal, validated_as_it_stands, warning
from kubechain.statemachines.validation import plan_validation
from workers.context import Enqueue, WorkerContext
from workers.transitions import apply_transition
from workers.validators import get_or_none

log = logging.getLogger(__name__)


def _write(ctx: WorkerContext, server: MCPServer, transition: Transition | None) -> None:
    if transition is not None:
        apply_transition(ctx, server, transition)


def _failure(
    server: MCPServer, detail: str, reason: str, *, pending: bool = False, unusable_secret: str | None = None
) -> Transition | None:
    transition = plan_validation(
        server, False, detail, pending=pending, ready_field="connected", unusable_secret=unusable_secret
    )
    if transition is not None:
        transition.events = [warning(reason, detail)]
    return transition


# The tool list is recorded in the MCPServer's status, which etcd stores with the rest of the object
# (1.5 MiB per object by default): past this, the status write itself is refused, again at every resync,
# and the server stayed Pending with no word of why. It is also sent to the LLM on every turn.
MAX_TOOL_LIST_BYTES = 512 * 1024


def plan_connected(server: MCPServer, tools: list[MCPTool]) -> Transition | None:
    """The success status; ``tools`` is only written when the list differs from the recorded one."""
    wire = [tool.to_wire() for tool in tools]
    size = stored_json_bytes(wire)  # as etcd stores it: a description's "<" is 6 bytes there
    if size > MAX_TOOL_LIST_BYTES:
        detail = (
            f"Validation failed: the server lists {len(tools)} tools taking {size:,} bytes (names, "
            f"descriptions and input schemas), more than the {MAX_TOOL_LIST_BYTES:,} an MCPServer's status "
            "holds; configure the server to offer fewer tools"
        )
        return _failure(server, detail, "ToolListTooLarge")
    recorded = [tool.to_wire() for tool in server.status.tools] if server.status.tools is not None else None
    extra: dict[str, Any] = {} if wire == recorded else {"tools": wire}
    detail = f"Connected successfully with {len(tools)} tools"
    transition = plan_validation(server, True, detail, extra=extra, ready_field="connected")
    if transition is not None:
        status = server.status
        was_connected = status.connected and status.status == "Ready" and validated_as_it_stands(server)
        transition.events = (
            [] if was_connected else [normal("Connected", "MCP server connected successfully")]
        )
    return transition


# A validation that waits longer than this for its turn to start its stdio server says so in the status.
TURN_NOTICE_S = 2.0


def plan_waiting_for_a_turn(server: MCPServer, limit: int) -> Transition | None:
    """The status of a server whose check waits for a turn to start it: Pending, saying so, for one not
    yet checked as it stands (new, or edited since). One that was keeps what its last check found (Ready
    included) until this one says otherwise."""
    if validated_as_it_stands(server):
        return None
    detail = (
        f"Waiting to be checked: this worker is checking {limit} stdio MCP servers, as many as it runs at "
        "once (KUBECHAIN_MCP_MAX_STDIO_CHECKS)"
    )
    transition = plan_validation(server, False, detail, pending=True, ready_field="connected")
    if transition is not None:
        # waiting is no failure: no ValidationFailed warning
        transition.events = [event for event in transition.events if event.reason == "Initializing"]
    return transition


# A server that says its tool list changed many times in a row is validated once now and once more when
# this window ends, not once a notice.
TOOLS_CHANGED_WINDOW_S = 2.0


class _Slot(NamedTuple):
    """A server's last validate: when it is due, or, when its enqueue failed, when to try again."""

    at: float
    enqueued: bool


class ToolsChangedRevalidator:
    """``MCPManager``'s ``on_tools_changed`` in a tools worker: enqueues a validate of the MCPServer, at
    most one per server per window. A change within the window of the last validate enqueued gets one
    more, due when the window ends (a countdown), so the last change is never lost; changes until then
    are covered by it, since it lists the tools after them. Best effort: an enqueue that fails is logged
    and not tried again for a window (a broker that is down blocks each try for ~40 s), then at the next
    change; the watcher's resync, which checks connected servers too, is the safety net."""

    def __init__(
        self,
        enqueue: Enqueue,
        window_s: float = TOOLS_CHANGED_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._enqueue = enqueue
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        # (namespace, name) -> its last validate; one entry per server heard from within about a window
        self._due: dict[tuple[str, str], _Slot] = {}
        self._pruned_at = float("-inf")

    def __call__(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._lock:  # the enqueue too: two changes at once must not both take the same slot
            now = self._clock()
            self._prune(now)
            slot = self._due.get(key)
            if slot is not None and now < slot.at:
                log.debug(
                    "MCPServer %s/%s: tool-list change %s",
                    namespace,
                    name,
                    "covered by the validate due" if slot.enqueued else "not enqueued: backing off",
                )
                return
            # After a failed enqueue nothing is due, and its back-off kept the validates a window apart.
            run_at = now if slot is None or not slot.enqueued else max(now, slot.at + self.window_s)
            message = ResourceMessage(
                kind=MCPServer.KIND, namespace=namespace, name=name, reason="tools-changed"
            )
            try:
                self._enqueue(TaskName.VALIDATE, message, run_at - now)
            except Exception as exc:  # noqa: BLE001 - the resync is the safety net
                log.warning("could not enqueue tools-changed of %s/%s: %s", namespace, name, exc)
                self._due[key] = _Slot(now + self.window_s, enqueued=False)
                return
            self._due[key] = _Slot(run_at, enqueued=True)
        log.info(
            "MCPServer %s/%s: its tool list changed; validating it%s",
            namespace,
            name,
            f" in {run_at - now:.1f}s" if run_at > now else "",
        )

    def _prune(self, now: float) -> None:
        """Forgets the servers whose slot is past by more than a window (a deleted server's would stay for
        ever): their next change is validated at once either way. At most once a window, under the lock."""
        if now - self._pruned_at < self.window_s:
            return
        self._pruned_at = now
        for key in [key for key, slot in self._due.items() if now - slot.at > self.window_s]:
            del self._due[key]


def _temporary_manager(ctx: WorkerContext) -> MCPManager:
    settings = ctx.settings
    return MCPManager(
        kube_secret_resolver(ctx.kube),
        call_timeout_s=settings.tool_timeout_s,
        command_allowlist=settings.mcp_command_allowlist,
        max_message_bytes=settings.mcp_max_message_bytes,
    )


def validate_mcpserver(ctx: WorkerContext, message: ResourceMessage) -> None:
    server = get_or_none(ctx, MCPServer, message.namespace, message.name)
    if server is None:
        if ctx.mcp is not None:
            ctx.mcp.disconnect(message.namespace, message.name)
        return
    channel_ref = server.spec.approval_contact_channel
    if channel_ref is not None:
        channel = get_or_none(ctx, ContactChannel, server.namespace, channel_ref.name)
        if channel is None:
            detail = f'ContactChannel "{channel_ref.name}" not found'
            _write(ctx, server, _failure(server, detail, "ContactChannelNotFound"))
            return
        if not channel.status.ready:
            detail = f'ContactChannel "{channel_ref.name}" is not ready'
            _write(ctx, server, _failure(server, detail, "ContactChannelNotReady", pending=True))
            return
    problem = validate_spec(server.spec)
    if problem is not None:
        _write(ctx, server, _failure(server, f"Validation failed: {problem}", "ValidationFailed"))
        return

    manager: MCPManager = ctx.mcp if ctx.mcp is not None else _temporary_manager(ctx)
    try:
        manager.check_command(server)  # before any wait for a turn: it starts nothing
    except MCPError as exc:
        if manager is not ctx.mcp:
            manager.close()
        _write(ctx, server, _failure(server, f"Validation failed: {exc}", "ValidationFailed"))
        return
    waited: list[MCPServer] = []  # the server as the status saying it waits left it
    read = server

    def say_waiting() -> None:
        transition = plan_waiting_for_a_turn(read, ctx.settings.mcp_max_stdio_checks)
        if transition is not None:
            waited.append(apply_transition(ctx, read, transition))

    # A checks worker starts the stdio server it validates and stops it after: in a turn, so that its
    # threads do not run more such children at once than its pod holds. (A worker that keeps its
    # sessions for tool calls bounds them in its MCPManager: KUBECHAIN_MCP_MAX_STDIO_SESSIONS.)
    in_turn = (
        ctx.stdio_check_turns.turn(say_waiting, TURN_NOTICE_S)
        if manager is not ctx.mcp and server.spec.transport == "stdio"
        else contextlib.nullcontext()
    )
    with in_turn:
        server = waited[-1] if waited else server
        try:
            tools = manager.list_tools(server)
        except MCPError as exc:
            if isinstance(exc.__cause__, Unavailable):
                raise exc.__cause__ from exc  # reading a secret failed transiently: let the task retry
            log.info("MCPServer %s/%s: connection failed: %s", server.namespace, server.name, exc)
            unusable = exc.secret_name if isinstance(exc, UnusableSecret) else None
            failure = _failure(
                server, f"Connection failed: {exc}", "ConnectionFailed", unusable_secret=unusable
            )
            _write(ctx, server, failure)
            return
        finally:
            if manager is not ctx.mcp:
                manager.close()  # its stdio child has exited before the turn is given up
    transition = plan_connected(server, tools)
    _write(ctx, server, transition)
    recorded = server.status.tools
    if transition is not None and "tools" in transition.status and recorded is not None:
        log.info(
            "MCPServer %s/%s: its tools changed (%d before, %d now)",
            server.namespace,
            server.name,
            len(recorded),
            len(tools),
            extra={
                "kind": MCPServer.KIND,
                "namespace": server.namespace,
                "resource": server.name,
                "old_tool_count": len(recorded),
                "new_tool_count": len(tools),
            },
        )
