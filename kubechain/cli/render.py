"""Rendering a TaskRun's conversation: what happened, as events, printed plain (pipes) or with rich (TTYs).

:class:`ConversationTracker` turns successive observations of a TaskRun and its TaskRunToolCalls into
:class:`Event` s, each reported once: the context-window messages not printed yet, tool-call phase
changes, waiting/retrying notices and the final answer or failure. ``kubechain run`` feeds it from
watches, ``kubechain logs`` feeds it once. Renderers only print events.

The plain format is one event per line (newlines inside content are written as ``\\n``) and is meant
to be stable for scripts::

    system: You add numbers.
    user: Add 2 and 3
    tool call add({"a": 2, "b": 3}) [call_0_1_ab12cd34]
    tool add [sums-0a1b2c3-tc-01] Succeeded
    tool result add: 5
    assistant: The sum is 5.
    final answer: The sum is 5.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import IO, TYPE_CHECKING, Literal, Protocol

from kubechain.models import TaskRun, TaskRunToolCall
from kubechain.models.common import Message
from kubechain.models.taskrun import TaskRunPhase
from kubechain.models.toolcall import TERMINAL_TOOLCALL_PHASES, ToolCallPhase
from kubechain.statemachines.taskrun import turn_waits_for_agent

if TYPE_CHECKING:
    from rich.status import Status

EventKind = Literal[
    "system",
    "user",
    "assistant",
    "tool_call",
    "tool_result",
    "tool_status",
    "pending",
    "retrying",
    "final",
    "failed",
]


@dataclass(frozen=True)
class Event:
    """One thing to report. ``name`` is a tool's function name; ``ident`` a tool call id (``tool_call``,
    ``tool_result``) or a TaskRunToolCall name (``tool_status``); ``phase`` a TaskRunToolCall phase."""

    kind: EventKind
    text: str = ""
    name: str = ""
    ident: str = ""
    arguments: str = ""
    phase: str = ""


# C0 controls but newline and tab, DEL, and C1 controls: from an LLM's answer or a tool's result (a web
# page an MCP server fetched) an escape sequence would clear the screen, rewrite earlier lines, or set the
# clipboard (OSC 52) of whoever follows the run.
_CONTROLS = {code: f"\\x{code:02x}" for code in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}
_CONTROLS[0x0D] = "\n"  # a carriage return is a line break (as in \r\n)


def terminal_safe(text: str) -> str:
    """``text`` with control characters a terminal would act on written as ``\\xNN`` (a CR as a newline)."""
    return text.replace("\r\n", "\n").translate(_CONTROLS)


def safe_event(event: Event) -> Event:
    """``event`` with every text field made :func:`terminal_safe`."""
    return replace(
        event,
        text=terminal_safe(event.text),
        name=terminal_safe(event.name),
        ident=terminal_safe(event.ident),
        arguments=terminal_safe(event.arguments),
        phase=terminal_safe(event.phase),
    )


def one_line(text: str) -> str:
    return terminal_safe(text).replace("\n", "\\n")


def normalize_arguments(arguments: str) -> str:
    """Tool arguments as compact, stable JSON (``{"a": 2, "b": 3}``); verbatim when not JSON."""
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except (ValueError, TypeError):
        return arguments


def approve_hint(toolcall_name: str) -> str:
    return f"waiting for approval: kubechain approve {toolcall_name}"


def plain_line(event: Event) -> str:
    """The stable one-line form of an event."""
    event = safe_event(event)
    kind = event.kind
    if kind in ("system", "user", "assistant"):
        return f"{kind}: {one_line(event.text)}"
    if kind == "tool_call":
        return f"tool call {event.name}({one_line(event.arguments)}) [{event.ident}]"
    if kind == "tool_result":
        return f"tool result {event.name}: {one_line(event.text)}"
    if kind == "tool_status":
        prefix = f"tool {event.name} [{event.ident}]"
        if event.phase == ToolCallPhase.AWAITING_HUMAN_APPROVAL:
            return f"{prefix} {approve_hint(event.ident)}"
        return f"{prefix} {event.phase}" + (f": {one_line(event.text)}" if event.text else "")
    if kind == "pending":
        return f"pending: {one_line(event.text)}"
    if kind == "retrying":
        return f"retrying: {one_line(event.text)}"
    if kind == "final":
        return f"final answer: {one_line(event.text)}"
    return f"failed: {one_line(event.text)}"


# -- tracking what was printed ---------------------------------------------------------------------


SUB_AGENT_PHASES_SHOWN = frozenset(
    {
        ToolCallPhase.AWAITING_HUMAN_APPROVAL,
        ToolCallPhase.ERROR_REQUESTING_HUMAN_APPROVAL,
        ToolCallPhase.READY_TO_EXECUTE_APPROVED_TOOL,
        ToolCallPhase.TOOL_CALL_REJECTED,
    }
)


class ConversationTracker:
    """Remembers what was reported, so each observation yields only what is new."""

    def __init__(self) -> None:
        self.messages_seen = 0
        self.tool_names: dict[str, str] = {}  # tool call id -> function name (from assistant messages)
        self.toolcall_phases: dict[str, str] = {}  # TaskRunToolCall name -> last reported phase
        # TaskRunToolCall name -> the resourceVersion its reported phase was read at
        self.toolcall_versions: dict[str, str] = {}
        self.terminal_tool_call_ids: set[str] = set()  # tool call ids whose outcome was reported
        self.last_notice: tuple[str, str] | None = None
        self.finished = False

    # messages

    def message_events(self, message: Message) -> list[Event]:
        if message.role in ("system", "user"):
            return [Event(message.role, message.content)]
        if message.role == "assistant":
            events: list[Event] = []
            if message.content or not message.tool_calls:
                events.append(Event("assistant", message.content))
            for call in message.tool_calls or []:
                self.tool_names[call.id] = call.function.name
                events.append(
                    Event(
                        "tool_call",
                        name=call.function.name,
                        ident=call.id,
                        arguments=normalize_arguments(call.function.arguments),
                    )
                )
            return events
        call_id = message.tool_call_id or ""
        name = self.tool_names.get(call_id) or message.name or call_id or "?"
        return [Event("tool_result", message.content, name=name, ident=call_id)]

    def new_messages(self, run: TaskRun) -> list[Message]:
        return list(run.status.context_window or [])[self.messages_seen :]

    def needs_toolcalls(self, run: TaskRun) -> bool:
        """Whether unreported tool results would be printed before their tool call's outcome."""
        return any(
            m.role == "tool" and (m.tool_call_id or "") not in self.terminal_tool_call_ids
            for m in self.new_messages(run)
        )

    def taskrun_events(self, run: TaskRun, toolcalls: Sequence[TaskRunToolCall] = ()) -> list[Event]:
        """New messages (a tool call's outcome, when known from ``toolcalls``, just before its result)
        and waiting/retrying notices. The final answer or failure comes from :meth:`final_events`."""
        by_call_id: dict[str, list[TaskRunToolCall]] = {}
        for toolcall in toolcalls:
            by_call_id.setdefault(toolcall.spec.tool_call_id, []).append(toolcall)
        events: list[Event] = []
        window = list(run.status.context_window or [])
        for message in window[self.messages_seen :]:
            if message.role == "tool":
                for toolcall in by_call_id.get(message.tool_call_id or "", []):
                    events.extend(self.toolcall_events(toolcall))
            events.extend(self.message_events(message))
        self.messages_seen = max(self.messages_seen, len(window))
        events.extend(self._notice(run))
        return events

    def _notice(self, run: TaskRun) -> list[Event]:
        status = run.status
        notice: tuple[str, str] | None = None
        if (run.phase == TaskRunPhase.PENDING and status.status_detail) or turn_waits_for_agent(run):
            notice = ("pending", status.status_detail or "")
        elif run.phase == TaskRunPhase.ERROR_BACKOFF:
            detail = status.status_detail or "LLM request failed"
            notice = ("retrying", f"{detail}: {status.error}" if status.error else detail)
        if notice is None or notice == self.last_notice:
            return []
        self.last_notice = notice
        return [Event("pending" if notice[0] == "pending" else "retrying", notice[1])]

    # tool calls

    def knows_tool_call(self, toolcall: TaskRunToolCall) -> bool:
        return toolcall.spec.tool_call_id in self.tool_names

    def _is_news(self, toolcall: TaskRunToolCall) -> bool:
        """Whether ``toolcall`` may move its shown phase: not once that phase is terminal, and not when
        it is older than what was shown. A watch's relist, or a re-get after a watch ended, may hand back
        an older object: "waiting for approval" was printed again after the call was rejected."""
        shown = self.toolcall_phases.get(toolcall.name)
        if shown == toolcall.phase or shown in TERMINAL_TOOLCALL_PHASES:
            return False
        # resourceVersions are opaque to clients, but the API server's (etcd's revisions) are integers
        # that grow: compared only when both are
        seen, version = self.toolcall_versions.get(toolcall.name, ""), toolcall.resource_version
        return not (seen.isdigit() and version.isdigit() and int(version) <= int(seen))

    def _shown(self, toolcall: TaskRunToolCall) -> None:
        self.toolcall_phases[toolcall.name] = toolcall.phase
        self.toolcall_versions[toolcall.name] = toolcall.resource_version

    def toolcall_events(self, toolcall: TaskRunToolCall) -> list[Event]:
        phase = toolcall.phase
        if phase in ("", ToolCallPhase.PENDING) or not self._is_news(toolcall):
            return []
        self._shown(toolcall)
        if phase in TERMINAL_TOOLCALL_PHASES:
            self.terminal_tool_call_ids.add(toolcall.spec.tool_call_id)
        detail = ""
        if phase == ToolCallPhase.FAILED:
            detail = toolcall.status.error or toolcall.status.status_detail or ""
        elif phase == ToolCallPhase.TOOL_CALL_REJECTED:
            detail = toolcall.status.result or toolcall.status.error or ""
        elif phase == ToolCallPhase.ERROR_REQUESTING_HUMAN_APPROVAL:
            detail = toolcall.status.error or toolcall.status.status_detail or ""
        name = self.tool_names.get(toolcall.spec.tool_call_id) or toolcall.spec.tool_ref.name
        return [Event("tool_status", detail, name=name, ident=toolcall.name, phase=phase)]

    def sub_agent_toolcall_events(self, toolcall: TaskRunToolCall) -> list[Event]:
        """A tool call of a sub-agent's run (anywhere below the followed run): only what a person must act
        on or wants to hear about, an approval asked for and its outcome; the rest is the sub-agent's own
        business, and its answer comes back as the delegating tool call's result."""
        phase = toolcall.phase
        if phase not in SUB_AGENT_PHASES_SHOWN or not self._is_news(toolcall):
            return []
        self._shown(toolcall)
        detail = ""
        if phase == ToolCallPhase.TOOL_CALL_REJECTED:
            detail = toolcall.status.result or ""
        elif phase == ToolCallPhase.ERROR_REQUESTING_HUMAN_APPROVAL:
            detail = toolcall.status.error or toolcall.status.status_detail or ""
        name = f"{toolcall.spec.tool_ref.name} (sub-agent run {toolcall.spec.task_run_ref.name})"
        return [Event("tool_status", detail, name=name, ident=toolcall.name, phase=phase)]

    # the end

    def final_events(self, run: TaskRun) -> list[Event]:
        if self.finished or not run.is_terminal():
            return []
        self.finished = True
        if run.phase == TaskRunPhase.FINAL_ANSWER:
            return [Event("final", run.status.output or "")]
        return [Event("failed", run.status.error or run.status.status_detail or "TaskRun failed")]


def conversation_events(run: TaskRun, toolcalls: Sequence[TaskRunToolCall]) -> list[Event]:
    """Everything about a run at once (``kubechain logs``): messages, each tool call's outcome before
    its result, tool calls still in progress, then the final answer or failure."""
    tracker = ConversationTracker()
    ordered = sorted(toolcalls, key=lambda t: (t.metadata.creation_timestamp or "", t.name))
    events = tracker.taskrun_events(run, ordered)
    for toolcall in ordered:
        events.extend(tracker.toolcall_events(toolcall))
    events.extend(tracker.final_events(run))
    return events


# -- renderers -------------------------------------------------------------------------------------


class Renderer(Protocol):
    def emit(self, event: Event) -> None: ...

    def status(self, text: str) -> None: ...

    def __enter__(self) -> Renderer: ...

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class PlainRenderer:
    """One line per event; progress (``status``) is not printed."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def emit(self, event: Event) -> None:
        self.stream.write(plain_line(event) + "\n")
        self.stream.flush()

    def emit_all(self, events: Iterable[Event]) -> None:
        for event in events:
            self.emit(event)

    def status(self, text: str) -> None:
        pass

    def __enter__(self) -> PlainRenderer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass


PHASE_STYLES: dict[str, str] = {
    ToolCallPhase.SUCCEEDED.value: "green",
    ToolCallPhase.FAILED.value: "bold red",
    ToolCallPhase.TOOL_CALL_REJECTED.value: "red",
    ToolCallPhase.AWAITING_HUMAN_APPROVAL.value: "bold yellow",
}


class RichRenderer:
    """Colours and panels for a terminal, with a spinner showing the run's phase while waiting."""

    def __init__(self, stream: IO[str], spinner: bool = True) -> None:
        from rich.console import Console

        # emoji=False: ":warning:" in a tool's result is text to show as it is, as markup is (escape)
        self.console = Console(file=stream, highlight=False, emoji=False)
        self._spinner = spinner
        self._status: Status | None = None
        self._last_assistant: str | None = None

    def emit(self, event: Event) -> None:
        from rich.markup import escape
        from rich.panel import Panel
        from rich.text import Text

        console = self.console
        event = safe_event(event)
        kind = event.kind
        if kind == "system":
            console.print(Text("system: ", style="bold dim") + Text(event.text, style="dim"))
        elif kind == "user":
            console.print(Panel(Text(event.text), title="user", title_align="left", border_style="cyan"))
        elif kind == "assistant":
            self._last_assistant = event.text
            console.print(
                Panel(
                    Text(event.text or "(empty)"), title="assistant", title_align="left", border_style="green"
                )
            )
        elif kind == "tool_call":
            console.print(
                f"[bold yellow]→ {escape(event.name)}[/]({escape(event.arguments)}) [dim]\\[{escape(event.ident)}][/]"
            )
        elif kind == "tool_result":
            console.print(f"[bold magenta]← {escape(event.name)}:[/] {escape(event.text)}")
        elif kind == "tool_status":
            style = PHASE_STYLES.get(event.phase, "dim")
            if event.phase == ToolCallPhase.AWAITING_HUMAN_APPROVAL:
                body = f"{escape(approve_hint(event.ident))}  (or: kubechain reject {escape(event.ident)} --comment ...)"
            else:
                body = escape(event.phase) + (f": {escape(event.text)}" if event.text else "")
            console.print(f"  [dim]{escape(event.name)} \\[{escape(event.ident)}][/] [{style}]{body}[/]")
        elif kind == "pending":
            console.print(f"[yellow]pending:[/] {escape(event.text)}")
        elif kind == "retrying":
            console.print(f"[yellow]retrying:[/] {escape(event.text)}")
        elif kind == "final":
            if event.text and event.text == self._last_assistant:
                console.print("[bold green]✓ final answer[/] [dim](above)[/]")
            else:
                console.print(
                    Panel(
                        Text(event.text), title="final answer", title_align="left", border_style="bold green"
                    )
                )
        else:
            console.print(
                Panel(Text(event.text), title="failed", title_align="left", border_style="bold red")
            )

    def status(self, text: str) -> None:
        if self._status is not None:
            from rich.text import Text

            self._status.update(Text(terminal_safe(text)))

    def __enter__(self) -> RichRenderer:
        if self._spinner and self.console.is_terminal:
            self._status = self.console.status("starting")
            self._status.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def make_renderer(stream: IO[str], rich: bool | None = None) -> PlainRenderer | RichRenderer:
    """Rich when ``stream`` is a terminal (or ``rich`` says so), plain lines otherwise."""
    if rich is None:
        isatty = getattr(stream, "isatty", None)
        rich = bool(isatty and isatty())
    return RichRenderer(stream) if rich else PlainRenderer(stream)
