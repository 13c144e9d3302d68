"""Long-lived MCP client sessions for a worker process, behind a synchronous API.

One session per MCPServer per process, keyed by (namespace, name) and a fingerprint of the resolved spec
(transport, command, args, env, url, headers — secrets included), so an edited spec or a rotated secret
reconnects and the old session is closed once its in-flight calls finish. All sessions run on one
background event loop thread that the manager starts on first use; Celery task threads call the sync
methods, which submit coroutines to that loop and wait for them.

Restarts: a session found dead before a call is replaced silently (nothing was sent). A call that fails
because the connection broke is retried on a fresh session only if its request never left this process,
or if the server is declared idempotent (``spec.idempotent``); otherwise MCPError says so.

Idle sessions close: every process that used an MCPServer holds a session (a stdio child with the
server's secrets in its environment), and no message reaches every process when the MCPServer is deleted
or stops being used (a tool call that finds it deleted disconnects it; nothing else may name it again). A
session unused for ``idle_timeout_s`` is closed; the next call reconnects. Given ``list_servers``, the
manager also asks every ``sweep_interval_s`` whether the MCPServers of its sessions are still there as they
were, and closes the session of one deleted, replaced or edited (kubechain.mcp.presence).

Stdio sessions at once: each is a child process (70 MiB for a small Python server, 160 MiB for an npx one
with npm's own process), and a tools worker kept one for every MCPServer a call used within the idle
timeout, however many. Given ``max_stdio_sessions``, a new one is started only when fewer run (starting and
closing ones counted until their child is gone): the one unused for longest, with no call in flight or
waiting, is closed to make room, and with every one busy the caller waits for one to be free, within its
budget (nothing is sent to a server it could not start).

Tool-list changes: a session that hears its server's tool list changed tells ``on_tools_changed``
(namespace, name), on a thread of its own: the callback may block, the loop is every session's.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from kubechain.mcp.common import DEFAULT_MAX_MESSAGE_BYTES, MCPError, MCPToolResult
from kubechain.mcp.presence import (
    SWEEP_INTERVAL_S,
    ServedServer,
    ServerLister,
    served,
    sessions_to_close,
    still_served,
)
from kubechain.mcp.spec import ResolvedSpec, SecretResolver, command_problem, env_problem, resolve_spec
from kubechain.mcp.tool_list import scrubbed_tools
from kubechain.models import MCPServer, MCPTool
from kubechain.observability.logs import detached_context, resource_context
from kubechain.tools.deadline import cut_short_note

if TYPE_CHECKING:
    from kubechain.mcp.session import Attempt, Session

log = logging.getLogger("kubechain.mcp")

T = TypeVar("T")
Key = tuple[str, str]

MAY_HAVE_RUN = "the tool may have run (and may still be running)"
# A call with less than this left of its budget is not sent.
MIN_TIME_TO_SEND_S = 1.0
CLOSE_TIMEOUT_S = 20.0
IDLE_TIMEOUT_S = 15 * 60.0  # longer than the watcher's longest gap between checks of a connected server
_live_managers: weakref.WeakSet[MCPManager] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for manager in list(_live_managers):
        try:
            manager.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            log.exception("closing an MCP manager at exit failed")


class MCPManager:
    def __init__(
        self,
        resolve_secret: SecretResolver,
        call_timeout_s: float = 120,
        call_budget_s: float | None = None,
        connect_timeout_s: float = 30,
        command_allowlist: Sequence[str] | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        on_tools_changed: Callable[[str, str], None] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        list_servers: ServerLister | None = None,
        sweep_interval_s: float | None = None,
        list_timeout_s: float | None = None,
        max_stdio_sessions: int | None = None,
    ) -> None:
        """Cheap: no thread, loop or process starts until the first request. ``on_tools_changed(namespace,
        name)``: a session heard that its server's tool list changed (called on a thread of its own, in
        order; notices for a server whose call has not started yet are merged into it; what it raises is
        logged). Without it sessions do not listen for that. ``max_message_bytes``: the longest message
        read from a server (a tool's result): a call whose answer is longer fails saying so.
        ``list_servers``: the MCPServers there are (kubechain.mcp.presence.kube_server_lister), asked on a
        thread of its own every ``sweep_interval_s`` (default SWEEP_INTERVAL_S) while sessions are open;
        without it only a deletion a call or a validation finds closes a session before its idle timeout.
        ``list_timeout_s``: how long a tools/list on an open session (a call's tool not in its listing) may
        go unanswered before the session is taken for hung and the call moves to a fresh one; at most, and
        by default, ``connect_timeout_s``.
        ``max_stdio_sessions``: the most stdio sessions (children) open at once (None: no bound)."""
        self._resolve_secret = resolve_secret
        self.call_timeout_s = float(call_timeout_s)
        # The whole of one call_tool (connecting, a reconnect and its retry included): under the tool
        # call's claim, so the call ends before another worker may take it over.
        self.call_budget_s = call_budget_s
        self.connect_timeout_s = float(connect_timeout_s)
        self.list_timeout_s = list_timeout_s
        self.command_allowlist = [entry for entry in (command_allowlist or []) if entry]
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_message_bytes = max_message_bytes
        self._on_tools_changed = on_tools_changed
        self._list_servers = list_servers
        self.sweep_interval_s = float(SWEEP_INTERVAL_S if sweep_interval_s is None else sweep_interval_s)
        self.max_stdio_sessions = max_stdio_sessions
        self._sweeps: concurrent.futures.ThreadPoolExecutor | None = None  # the list's thread (blocking I/O)
        # One thread, started with the loop: notices are passed on in the order they came.
        self._tools_changed_calls: concurrent.futures.ThreadPoolExecutor | None = None
        # The servers with a call queued and not started: a chatty server whose callback is blocked (a
        # broker that is down) must not queue one call a notice, without limit. Loop and callback threads.
        self._tools_changed_queued: set[Key] = set()
        self._tools_changed_lock = threading.Lock()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        # Owned by the loop thread:
        self._sessions: dict[Key, Session] = {}
        self._retiring: set[Session] = set()
        self._starting: set[Session] = set()  # sessions connecting, or left to stop by a cancelled start
        self._key_locks: dict[Key, asyncio.Lock] = {}
        # the callers using a key: holding or waiting for its lock, or with a request on its session to come
        self._key_users: dict[Key, int] = {}
        # Set (and replaced) when a stdio session may have made room: a request on one ended, one ended,
        # or a key's last caller left.
        self._room_changed = asyncio.Event()
        self._last_used: dict[Key, float] = {}
        # A connect that failed answers the callers that were queued behind it (each would otherwise wait a
        # whole connect timeout in turn, the last of many finding its budget spent); later callers try anew.
        self._connect_failures: dict[Key, tuple[float, str, str]] = {}  # when, fingerprint, error

    # -- public sync API ---------------------------------------------------------------------------

    def check_command(self, server: MCPServer) -> None:
        """MCPError if ``server`` is a stdio server whose command the allowlist forbids, or whose env would
        change what an allowed command runs (LD_PRELOAD, PATH, NODE_OPTIONS...)."""
        if server.spec.transport == "stdio" and server.spec.command:
            problem = command_problem(server.spec.command, self.command_allowlist) or env_problem(
                [var.name for var in server.spec.env or []], self.command_allowlist
            )
            if problem is not None:
                raise MCPError(problem)

    def list_tools(self, server: MCPServer) -> list[MCPTool]:
        """The server's tools (connecting if needed), with their full input schemas."""
        resolved = self._resolve(server)
        key = (server.namespace, server.name)
        serves = served(server, time.monotonic())
        budget = 4 * self.connect_timeout_s + 10
        deadline = time.monotonic() + budget
        tools = self._run(
            lambda: self._while_used(key, self._alist_tools(key, resolved, serves, deadline)),
            budget,
            f"listing tools of MCP server {_label(key)}",
            resolved,
        )
        return scrubbed_tools(tools, resolved.scrubber, _label(key))

    def resolve(self, server: MCPServer) -> ResolvedSpec:
        """The server's spec with its Secrets read (MCPError if it is invalid, its command not allowed or
        a Secret unreadable; an API-server hiccup is the error's ``__cause__``). Reading them before a
        tool call is claimed lets a transient failure be retried instead of failing the call."""
        return self._resolve(server)

    def call_tool(
        self,
        server: MCPServer,
        tool: str,
        arguments: dict[str, Any],
        resolved: ResolvedSpec | None = None,
        within_s: float | None = None,
    ) -> MCPToolResult:
        """Call ``tool``; ``resolved`` (from :meth:`resolve`) saves reading the Secrets again; ``within_s``:
        the longest the whole call may take, if shorter than this manager's budget (its claim's time left)."""
        resolved = resolved if resolved is not None else self._resolve(server)
        key = (server.namespace, server.name)
        serves = served(server, time.monotonic())
        idempotent = bool(server.spec.idempotent)
        own = 2 * (2 * self.connect_timeout_s + self.call_timeout_s) + 10
        if self.call_budget_s is not None:
            own = min(own, self.call_budget_s)
        budget = own if within_s is None else max(0.001, min(own, within_s))
        deadline = time.monotonic() + budget
        attempts: list[Attempt] = []  # one a tools/call handed to a session, to tell if one may have run
        return self._run(
            lambda: self._while_used(
                key, self._acall_tool(key, resolved, serves, idempotent, tool, arguments, deadline, attempts)
            ),
            budget,
            f'calling tool "{tool}" on MCP server {_label(key)}',
            resolved,
            timed_out_note=cut_short_note(budget, own, "the call's own budget"),
            may_have_run=lambda: any(attempt.may_have_run for attempt in attempts),
        )

    def disconnect(self, namespace: str, name: str) -> None:
        """Close the session of one MCPServer, if this process has one: at once when idle, else once the
        calls in flight are done (none starts on it meanwhile; the next call makes a new session)."""
        with self._lock:
            if self._loop is None or self._closed:
                return
        key = (namespace, name)
        self._run(
            lambda: self._adisconnect(key), CLOSE_TIMEOUT_S + 5, f"disconnecting MCP server {_label(key)}"
        )

    def connected(self, namespace: str, name: str) -> bool:
        """Whether this process holds a live session for the MCPServer (diagnostics, tests)."""
        session = self._peek(namespace, name)
        return session is not None and session.usable

    def stdio_pid(self, namespace: str, name: str) -> int | None:
        """The pid of the MCPServer's stdio child in this process, if any (diagnostics, tests)."""
        session = self._peek(namespace, name)
        return session.pid if session is not None and not session.dead else None

    def close(self) -> None:
        """Close every session and terminate stdio children, then stop the loop. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise RuntimeError("MCPManager.close() called from its own event loop")
        try:
            asyncio.run_coroutine_threadsafe(self._aclose_all(), loop).result(CLOSE_TIMEOUT_S + 5)
        except Exception as exc:
            log.warning("closing MCP sessions failed: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if self._tools_changed_calls is not None:
            # not waiting: a callback stuck on a broker that is down must not hold up the close
            self._tools_changed_calls.shutdown(wait=False, cancel_futures=True)
        if self._sweeps is not None:
            self._sweeps.shutdown(wait=False, cancel_futures=True)  # a list in flight ends by its timeout
        _live_managers.discard(self)

    # -- plumbing ----------------------------------------------------------------------------------

    def _resolve(self, server: MCPServer) -> ResolvedSpec:
        """Resolves secrets in the calling thread (blocking API calls stay off the loop)."""
        resolved = resolve_spec(server, self._resolve_secret)
        self.check_command(server)
        return resolved

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise MCPError("the MCP manager is closed")
            if self._loop is None:
                import kubechain.mcp.session  # noqa: F401  (imports the SDK; installs the spawn hook)

                if self._on_tools_changed is not None:
                    self._tools_changed_calls = concurrent.futures.ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix="kubechain-mcp-tools-changed"
                    )
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_run_loop, args=(loop,), name="kubechain-mcp", daemon=True)
                thread.start()
                loop.call_soon_threadsafe(
                    lambda: loop.create_task(self._close_idle_sessions()), context=detached_context()
                )
                if self._list_servers is not None:
                    self._sweeps = concurrent.futures.ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix="kubechain-mcp-sweep"
                    )
                    loop.call_soon_threadsafe(
                        lambda: loop.create_task(self._close_sessions_of_changed_servers()),
                        context=detached_context(),
                    )
                self._loop, self._thread = loop, thread
                _live_managers.add(self)
            return self._loop

    def _run(
        self,
        make: Callable[[], Awaitable[T]],
        timeout: float,
        what: str,
        resolved: ResolvedSpec | None = None,
        *,
        timed_out_note: str = "",
        may_have_run: Callable[[], bool] | None = None,
    ) -> T:
        """``make()`` on the loop within ``timeout``; ``may_have_run``: whether a tool call ended by the
        timeout may have run (the LLM is told so)."""
        loop = self._ensure_loop()

        async def wrapped() -> T:
            return await make()

        future = asyncio.run_coroutine_threadsafe(wrapped(), loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            if may_have_run is not None and may_have_run():
                timed_out_note += f"; {MAY_HAVE_RUN}"
            raise MCPError(f"timed out after {timeout:g}s {what}{timed_out_note}") from None
        except concurrent.futures.CancelledError:
            raise MCPError(f"the MCP manager was closed while {what}") from None
        except MCPError as exc:
            # Errors become statuses, Events, log lines and tool results the LLM reads: a server's or a
            # library's text may quote a header or env value, so the spec's secrets are cut out here.
            text = resolved.scrub(str(exc)) if resolved is not None else str(exc)
            if text != str(exc):
                raise MCPError(text) from None
            raise

    def _peek(self, namespace: str, name: str) -> Session | None:
        with self._lock:
            if self._loop is None or self._closed:
                return None
        return self._sessions.get((namespace, name))

    # -- on the loop -------------------------------------------------------------------------------

    async def _session_for(
        self, key: Key, resolved: ResolvedSpec, serves: ServedServer, deadline: float | None = None
    ) -> tuple[Session, bool]:
        """The live session for this spec, connecting one if needed; (session, freshly connected).
        ``serves``: the MCPServer as the caller read it, which the session is kept for; ``deadline``
        (time.monotonic): when the caller's budget ends (for waiting for room for a stdio session)."""
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        arrived = self._last_used[key] = time.monotonic()
        with self._used(key):  # its lock is not forgotten meanwhile
            async with lock:
                session, fresh = await self._locked_session_for(key, resolved, arrived, deadline)
                session.serves = still_served(session.serves, serves)
                return session, fresh

    @contextlib.contextmanager
    def _used(self, key: Key) -> Iterator[None]:
        """A caller uses ``key`` (its lock, or its session for a request to come): its session is not
        closed to make room, nor its lock forgotten."""
        self._key_users[key] = self._key_users.get(key, 0) + 1
        try:
            yield
        finally:
            self._key_users[key] -= 1
            if not self._key_users[key]:
                del self._key_users[key]
                self._room_may_have_changed()

    def _room_may_have_changed(self) -> None:
        changed, self._room_changed = self._room_changed, asyncio.Event()
        changed.set()

    def _live_stdio_sessions(self) -> list[Session]:
        """The stdio sessions whose child may still run: open, starting, or closing."""
        every = {*self._sessions.values(), *self._retiring, *self._starting}
        return [s for s in every if s.spec.transport == "stdio" and not s.finished.is_set()]

    async def _room_for_a_stdio_session(self, key: Key, deadline: float | None) -> None:
        """Returns once fewer than ``max_stdio_sessions`` stdio sessions run, closing the one unused for
        longest that no caller uses; MCPError if none is free by ``deadline`` (less the time to send)."""
        limit = self.max_stdio_sessions
        assert limit is not None
        said = False
        while True:
            if self._closed:
                raise MCPError("the MCP manager is closed")
            live = self._live_stdio_sessions()
            if len(live) < limit:
                return
            changed = self._room_changed
            if len([s for s in live if not s.leaving]) >= limit:
                idle = [
                    (self._last_used.get(k, 0.0), k, s)
                    for k, s in self._sessions.items()
                    if s.spec.transport == "stdio"
                    and not (s.inflight or s.leaving or s.finished.is_set())
                    and k not in self._key_users
                ]
                if idle:
                    _, lru, session = min(idle, key=lambda entry: entry[0])
                    log.info(
                        "MCP server %s: closing its session, unused for longest, to start %s "
                        "(KUBECHAIN_MCP_MAX_STDIO_SESSIONS: %d)",
                        _label(lru),
                        _label(key),
                        limit,
                    )
                    self._retire(lru, session)
                    continue  # it stops: waited for below, until its child is gone
            if not said:
                said = True
                log.info(
                    "MCP server %s: waiting for one of its %d stdio sessions to be free "
                    "(KUBECHAIN_MCP_MAX_STDIO_SESSIONS)",
                    _label(key),
                    limit,
                )
            left = None if deadline is None else deadline - MIN_TIME_TO_SEND_S - time.monotonic()
            try:
                if left is not None and left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                raise MCPError(
                    f"MCP server {_label(key)} not started: this worker runs {limit} stdio MCP "
                    f"server{'' if limit == 1 else 's'}, as many as it may at once "
                    "(KUBECHAIN_MCP_MAX_STDIO_SESSIONS), each busy with a call, and none was free in time; "
                    "nothing was sent to it"
                ) from None

    async def _locked_session_for(
        self, key: Key, resolved: ResolvedSpec, arrived: float, deadline: float | None = None
    ) -> tuple[Session, bool]:
        """_session_for, under the key's lock (``arrived``: when the caller asked)."""
        from kubechain.mcp.session import Session

        if self._closed:
            # closing (a retry after its sessions were stopped): a new session, a new stdio child,
            # would outlive the close and be cut off by the loop's stop
            raise MCPError("the MCP manager is closed")
        current = self._sessions.get(key)
        if current is not None:
            if current.fingerprint == resolved.fingerprint() and current.usable:
                self._last_used[key] = time.monotonic()
                return current, False
            reason = (
                "its spec changed"
                if current.fingerprint != resolved.fingerprint()
                else "the connection was lost"
            )
            log.info("MCP server %s: reconnecting (%s)", _label(key), reason)
            self._retire(key, current)
        fingerprint = resolved.fingerprint()
        failed = self._connect_failures.get(key)
        if failed is not None and failed[1] == fingerprint and failed[0] >= arrived:
            raise MCPError(failed[2])  # it failed while this caller waited for the lock
        if resolved.transport == "stdio" and self.max_stdio_sessions is not None:
            await self._room_for_a_stdio_session(key, deadline)
        # From here to _starting.add() nothing awaits: another caller given the same room counts this one.
        tools_changed = functools.partial(self._tools_changed, key) if self._on_tools_changed else None
        session = Session(
            _label(key),
            resolved,
            self.connect_timeout_s,
            self.call_timeout_s,
            on_tools_changed=tools_changed,
            max_message_bytes=self.max_message_bytes,
            list_timeout_s=self.list_timeout_s,
            on_released=self._room_may_have_changed,
        )
        # Known to close() while it starts: a caller whose budget ends mid-start leaves the session to stop
        # (its stdio child too) on its own, and a close meanwhile (a worker's shutdown) must wait for that
        # rather than stop the loop under it and leave the child orphaned.
        self._starting.add(session)
        try:
            await session.start()
        except MCPError as exc:
            self._connect_failures[key] = (time.monotonic(), fingerprint, str(exc))
            raise
        finally:
            if session.finished.is_set() or session.usable:
                self._starting.discard(session)
            else:  # cancelled mid-start: forgotten once it has stopped
                asyncio.get_running_loop().create_task(self._forget_when_finished(session))
        self._connect_failures.pop(key, None)
        self._sessions[key] = session
        # used from now: a connect slower than the idle timeout must not leave it idle already
        self._last_used[key] = time.monotonic()
        return session, True

    def _tools_changed(self, key: Key) -> None:
        """A session of ``key`` heard that its server's tool list changed: the callback runs on its own
        thread, never on the loop (a worker's publishes to Redis; a broker that is down blocks it)."""
        callback, calls = self._on_tools_changed, self._tools_changed_calls
        if callback is None or calls is None or self._closed:
            return
        with self._tools_changed_lock:
            if key in self._tools_changed_queued:
                return  # the call queued has not started: it is told of the list as it is after this change
            self._tools_changed_queued.add(key)
        try:
            calls.submit(self._call_tools_changed, callback, key)
        except RuntimeError:  # shut down: the manager is closing
            with self._tools_changed_lock:
                self._tools_changed_queued.discard(key)

    def _call_tools_changed(self, callback: Callable[[str, str], None], key: Key) -> None:
        """On the callback's thread. No longer queued once started: a notice heard from now on may be of a
        change the callback has already looked past, so it queues one more call."""
        with self._tools_changed_lock:
            self._tools_changed_queued.discard(key)
        _call_tools_changed(callback, key)

    async def _close_idle_sessions(self) -> None:
        interval = min(60.0, max(0.05, self.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for key, session in list(self._sessions.items()):
                if now - self._last_used.get(key, now) > self.idle_timeout_s and not session.inflight:
                    log.info(
                        "MCP server %s: closing its session, unused for %.0fs",
                        _label(key),
                        self.idle_timeout_s,
                    )
                    self._retire(key, session)
                    self._last_used.pop(key, None)
            self._forget_unused_keys()

    async def _close_sessions_of_changed_servers(self) -> None:
        """Every ``sweep_interval_s`` while sessions are open: one list of their MCPServers (on its own
        thread), then each session whose server is gone, replaced or edited is retired (it stops once the
        calls in flight on it are done; the next call makes a new one). A list that fails closes nothing:
        the idle timeout is left."""
        assert self._list_servers is not None and self._sweeps is not None
        lister, thread = self._list_servers, self._sweeps
        failing = False
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            namespaces = frozenset(key[0] for key in self._sessions)
            if not namespaces:
                continue  # no session: no request
            listed_from = time.monotonic()
            try:
                listed = await asyncio.get_running_loop().run_in_executor(thread, lister, namespaces)
            except Exception as exc:  # noqa: BLE001 - the API server down, a namespace not granted
                (log.debug if failing else log.warning)(
                    "cannot tell whether the MCPServers of this worker's sessions still exist: %s", exc
                )
                failing = True
                continue
            failing = False
            # The sessions as they are now (some may have been replaced while the list was made).
            sessions = {key: s.serves for key, s in self._sessions.items() if s.serves is not None}
            for key, why in sessions_to_close(sessions, listed, listed_from):
                log.info("MCP server %s: closing its session: %s", _label(key), why)
                self._retire(key, self._sessions[key])

    def _forget_unused_keys(self) -> None:
        """Forget the lock, last use and connect failure of each server with no session and no caller (one
        that never connected, was deleted or went idle): kept, they grew with every server ever asked for.
        A lock some caller holds or waits for is kept: a new one for a later caller would let two connects
        of the same server run at once."""
        for key in [
            key for key in self._key_locks if key not in self._sessions and key not in self._key_users
        ]:
            del self._key_locks[key]
            self._last_used.pop(key, None)
            self._connect_failures.pop(key, None)

    def _retire(self, key: Key, session: Session) -> None:
        if self._sessions.get(key) is session:
            del self._sessions[key]
        if session.finished.is_set():
            return
        self._retiring.add(session)
        session.retire()
        asyncio.get_running_loop().create_task(self._forget_when_finished(session))

    async def _forget_when_finished(self, session: Session) -> None:
        await session.finished.wait()
        self._retiring.discard(session)
        self._starting.discard(session)

    async def _while_used(self, key: Key, request: Awaitable[T]) -> T:
        """``request`` (a coroutine of this manager's, not started yet) run with ``key`` in use, from its
        session's start to its request: the session is not closed to make room meanwhile."""
        with self._used(key):
            return await request

    async def _alist_tools(
        self, key: Key, resolved: ResolvedSpec, serves: ServedServer, deadline: float | None = None
    ) -> list[Any]:
        from kubechain.mcp.session import ConnectionLost, describe_error

        for attempt in (1, 2):
            session, fresh = await self._session_for(key, resolved, serves, deadline)
            if fresh:
                return list(session.tools)
            try:
                return await session.refresh_tools()
            except ConnectionLost as lost:
                self._retire(key, session)
                if attempt == 2:
                    raise MCPError(str(lost)) from lost
                log.info("MCP server %s: %s; reconnecting to list tools", _label(key), lost)
            except MCPError:
                raise
            except Exception as exc:  # e.g. a tools/list answer the SDK cannot parse
                raise MCPError(
                    f"invalid tools/list answer from MCP server {_label(key)}: {describe_error(exc)}"
                ) from exc
        raise AssertionError("unreachable")

    async def _acall_tool(
        self,
        key: Key,
        resolved: ResolvedSpec,
        serves: ServedServer,
        idempotent: bool,
        tool: str,
        arguments: dict[str, Any],
        deadline: float,
        attempts: list[Attempt],
    ) -> MCPToolResult:
        """``deadline`` (time.monotonic): when the caller's budget ends; ``attempts`` gets each call's."""
        from mcp.shared.exceptions import MCPError as SDKError
        from mcp_types import INVALID_PARAMS, REQUEST_TIMEOUT

        from kubechain.mcp.session import Attempt, ConnectionLost, describe_error, flatten_result

        label = _label(key)
        for attempt in (1, 2):
            session, fresh = await self._session_for(key, resolved, serves, deadline)
            timeout = self.call_timeout_s
            try:
                if tool not in {t.name for t in session.tools} and not fresh:
                    await session.refresh_tools()  # the server may have added it since we listed
                if tool not in {t.name for t in session.tools}:
                    raise MCPError(f'tool "{tool}" not found on MCP server "{key[1]}"')
                left = deadline - time.monotonic()
                if left < MIN_TIME_TO_SEND_S:
                    # Sent, it would be given up before any answer could come, and taken for one that
                    # may have run.
                    ran = any(earlier.may_have_run for earlier in attempts)
                    raise MCPError(
                        f"error calling tool {tool} on server {key[1]}: not sent{' again' if ran else ''}, as "
                        f"only {max(left, 0):.1f}s of its budget (its claim's time) was left; "
                        + (f"its first attempt: {MAY_HAVE_RUN}" if ran else "the tool did not run")
                    )
                # The call's own timeout, and the probe after it, end within the budget where they can: its
                # message says more than the budget's (what timed out, whether the server still answers).
                timeout = _call_timeout(self.call_timeout_s, left, session.time_after_a_call())
                attempts.append(sent := Attempt())
                result = flatten_result(
                    await session.call_tool(tool, arguments, timeout_s=timeout, attempt=sent)
                )
                # What the server answers goes to the status, an Event and the LLM: not its own secrets.
                return MCPToolResult(text=resolved.scrub(result.text), is_error=result.is_error)
            except ConnectionLost as lost:
                self._retire(key, session)
                if attempt == 2:
                    raise MCPError(
                        f"error calling tool {tool} on server {key[1]}: {lost} (after a restart)"
                    ) from lost
                if lost.maybe_executed and not idempotent:
                    raise MCPError(
                        f"error calling tool {tool} on server {key[1]}: {lost} while the call was in flight; "
                        "not retried because the MCPServer is not marked idempotent (spec.idempotent) "
                        "and the tool may have run"
                    ) from lost
                log.info(
                    "MCP server %s: %s; restarting the session and retrying tool %s (%s)",
                    label,
                    lost,
                    tool,
                    "idempotent server" if lost.maybe_executed else "the request was never sent",
                )
            except SDKError as exc:
                if exc.code == REQUEST_TIMEOUT:
                    # The SDK's read timeout (the call timeout, so it fires before the session's own) starts
                    # once the request is written: the LLM must not take the tool for one that did not run.
                    cut_short = cut_short_note(timeout, self.call_timeout_s)
                    raise MCPError(
                        f"error calling tool {tool} on server {key[1]}: timed out after {timeout:g}s{cut_short}; "
                        f"{MAY_HAVE_RUN}"
                    ) from exc
                if exc.code == INVALID_PARAMS and "unknown tool" in exc.message.lower():
                    raise MCPError(f'tool "{tool}" not found on MCP server "{key[1]}"') from exc
                raise MCPError(f"error calling tool {tool} on server {key[1]}: {exc.message}") from exc
            except MCPError:
                raise
            except Exception as exc:
                raise MCPError(
                    f"error calling tool {tool} on server {key[1]}: {describe_error(exc)}"
                ) from exc
        raise AssertionError("unreachable")

    async def _adisconnect(self, key: Key) -> None:
        session = self._sessions.pop(key, None)
        if session is None:
            return
        if session.inflight:
            # A call already running on a deleted MCPServer still gets its answer (cutting the session
            # would leave the tool call not knowing whether it ran); no new call starts on it.
            self._retire(key, session)
            return
        session.stop()
        if not await session.wait_finished(CLOSE_TIMEOUT_S - 5):
            session.cancel()
            await session.wait_finished(5)

    async def _aclose_all(self) -> None:
        sessions = [*self._sessions.values(), *self._retiring, *self._starting]
        self._sessions.clear()
        for session in sessions:
            session.stop()
        await _wait_all(sessions, CLOSE_TIMEOUT_S - 6)
        stuck = [session for session in sessions if not session.finished.is_set()]
        for session in stuck:
            log.warning("MCP session %s did not close in time; cancelling it", session.label)
            session.cancel()
        await _wait_all(stuck, 5)


async def _wait_all(sessions: list[Session], timeout: float) -> None:
    if sessions:
        await asyncio.wait([asyncio.ensure_future(s.finished.wait()) for s in sessions], timeout=timeout)


def _call_tools_changed(callback: Callable[[str, str], None], key: Key) -> None:
    namespace, name = key
    with resource_context("MCPServer", namespace, name):
        try:
            callback(namespace, name)
        except Exception as exc:  # noqa: BLE001 - best effort: the watcher's resync checks the server too
            log.warning("MCP server %s: passing on its tool-list change failed: %s", _label(key), exc)


def _call_timeout(own_s: float, left_s: float, after_s: float) -> float:
    """A call's timeout: its own, or what its budget leaves once ``after_s`` (the session's margin and probe
    after a timeout, and a second for the answer to come back) is kept; all that is left if that is all."""
    room = round(left_s - after_s - 1.0, 1)
    if room >= own_s:
        return own_s
    return room if room > 0 else max(round(left_s, 1), 0.001)


def _label(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        # Whatever is still pending (a call racing close()) is cancelled, so its waiter returns.
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=5))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
