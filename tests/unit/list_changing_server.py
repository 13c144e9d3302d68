"""An MCP server for tests whose tool list changes at runtime (MCP Python SDK): its ``add_tool`` tool adds
a tool a moment after the call has answered, outside any request, and says so the way each protocol era
does: ``notifications/tools/list_changed`` on the connection (2025 protocol: stdout, or the standalone GET
stream of streamable HTTP) and a ``tools_list_changed`` event on the client's ``subscriptions/listen``
streams (2026-07-28).

Run as a stdio server: ``python list_changing_server.py [--legacy]``; ``--legacy`` refuses
``server/discover``, as a server of the 2025 protocol does, so the client makes the initialize handshake.
Over HTTP: ``make_server().streamable_http_app(...)`` (see ``refusing_discover`` for the 2025 protocol).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import anyio
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.mcpserver import Context
from mcp.server.mcpserver import MCPServer as SDKServer
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus, ToolsListChanged
from mcp.shared.message import SessionMessage
from mcp_types import ErrorData, JSONRPCError, JSONRPCRequest

# After the add_tool call has answered: the notification comes outside any request.
CHANGE_DELAY_S = 0.2


def make_server() -> SDKServer:
    bus = InMemorySubscriptionBus()
    server = SDKServer("list-changing", subscriptions=bus)
    pending: set[asyncio.Task[None]] = set()

    async def change_later(name: str, session: Any) -> None:
        await asyncio.sleep(CHANGE_DELAY_S)

        def added() -> str:
            return f"{name} ran"

        server.add_tool(added, name=name, description=f"added at runtime: {name}")
        await bus.publish(ToolsListChanged())  # 2026-07-28: the listen streams
        try:
            await session.send_tool_list_changed()  # 2025: the connection (dropped on a 2026 one)
        except Exception as exc:  # noqa: BLE001 - a fixture: say why on stderr
            print(f"send_tool_list_changed failed: {exc!r}", file=sys.stderr)

    @server.tool()
    async def add_tool(name: str, ctx: Context) -> str:  # type: ignore[type-arg]
        """Adds a tool called ``name`` a moment from now, then says the tool list changed."""
        task = asyncio.get_running_loop().create_task(change_later(name, ctx.session))
        pending.add(task)
        task.add_done_callback(pending.discard)
        return f"adding {name}"

    return server


def refusing_discover(app: Any) -> Any:
    """``app`` (ASGI) as a streamable-HTTP server of the 2025 protocol: ``server/discover`` is answered
    "Method not found", so the client falls back to the initialize handshake."""
    return refusing_method(app, "server/discover")


def refusing_method(app: Any, method: str) -> Any:
    """``app`` (ASGI), answering every request of ``method`` "Method not found"."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await app(scope, receive, send)
        received = []
        while True:
            message = await receive()
            received.append(message)
            if not message.get("more_body"):
                break
        body = b"".join(m.get("body", b"") for m in received)
        request = json.loads(body) if body else {}
        if isinstance(request, dict) and request.get("method") == method:
            answer = {
                "jsonrpc": "2.0",
                "id": request["id"],
                "error": {"code": -32601, "message": "Method not found"},
            }
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
            return None

        async def replay() -> Any:
            return received.pop(0) if received else await receive()

        return await app(scope, replay, send)

    return wrapped


async def serve_stdio(legacy: bool) -> None:
    server = make_server()
    lowlevel = server._lowlevel_server
    options = lowlevel.create_initialization_options(NotificationOptions(tools_changed=True))
    async with stdio_server() as (read, write):
        if not legacy:
            await lowlevel.run(read, write, options)
            return
        # The era is decided by the first request the server sees: server/discover is answered here and
        # never reaches it.
        forward, forwarded = anyio.create_memory_object_stream[SessionMessage | Exception](16)

        async def refuse_discover() -> None:
            async with forward:
                async for item in read:
                    message = item.message if isinstance(item, SessionMessage) else None
                    if isinstance(message, JSONRPCRequest) and message.method == "server/discover":
                        error = ErrorData(code=-32601, message="Method not found")
                        await write.send(
                            SessionMessage(JSONRPCError(jsonrpc="2.0", id=message.id, error=error))
                        )
                        continue
                    await forward.send(item)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(refuse_discover)
            await lowlevel.run(forwarded, write, options)


if __name__ == "__main__":
    anyio.run(serve_stdio, "--legacy" in sys.argv[1:])
