"""``kubechain run``, ``logs``, ``approve`` and ``reject``: start a conversation, follow it, decide tool calls.

Following a run: two threads watch the TaskRun (field selector on its name) and its TaskRunToolCalls
(label selector) and put every observed object on one queue; the main thread renders what is new. Each
watch starts from the resourceVersion of a fresh list, and a watch that ends (its timeoutSeconds, a
dropped connection) or answers 410 Gone starts over with a fresh list, so the terminal state is never
missed. Following ends when the API server refuses us, does not know the kinds, or stays unreachable.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import string
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import click
import httpx

from kubechain.cli import main
from kubechain.cli.render import (
    ConversationTracker,
    Event,
    conversation_events,
    make_renderer,
)
from kubechain.cli.resources import CLIError, Target, api_error, dump, kube_options, not_found, resource_ref
from kubechain.kube.client import KubeClient
from kubechain.kube.errors import Conflict, Forbidden, Gone, KubeAPIError, NotFound, Unauthorized
from kubechain.models import (
    LABEL_TASKRUNTOOLCALL,
    LLM,
    Agent,
    ContactChannel,
    LocalObjectReference,
    MCPServer,
    ObjectMeta,
    TaskRun,
    TaskRunPhase,
    TaskRunSpec,
    TaskRunToolCall,
    ToolCallPhase,
    label_value,
)
from kubechain.models.labels import LABEL_AGENT, LABEL_ROOT_RUN, root_run_of
from kubechain.statemachines.approval import UNDECIDED_PHASES, annotation_decision

log = logging.getLogger(__name__)

ANNOTATION_APPROVAL = "kubechain.humanlayer.dev/approval"
ANNOTATION_APPROVAL_COMMENT = "kubechain.humanlayer.dev/approval-comment"

EXIT_FINAL_ANSWER = 0
EXIT_FAILED = 1
EXIT_OTHER = 2

# Consecutive failed requests after which following a run gives up (~1 minute of retries).
MAX_FAILURES = 15
UNAUTHORIZED_FAILURES = 3
# Server-side timeoutSeconds of each watch; the watch then starts over from a fresh list.
DEFAULT_WATCH_TIMEOUT_S = 60
WATCH_TIMEOUT_VARIABLE = "KUBECHAIN_CLI_WATCH_TIMEOUT_S"  # (tests shorten it to see re-watches)
NAME_ALPHABET = string.ascii_lowercase + string.digits


def watch_timeout_s() -> int:
    """Each watch's timeoutSeconds, from KUBECHAIN_CLI_WATCH_TIMEOUT_S (unset or empty: 60). Read when a
    run is followed, not as the CLI is imported: a value that was no whole number was a traceback from
    every command, ``kubechain worker`` and ``watcher`` among them."""
    written = os.environ.get(WATCH_TIMEOUT_VARIABLE, "").strip()
    if not written:
        return DEFAULT_WATCH_TIMEOUT_S
    # (0 asks the API server for no timeout of ours, and it refuses one below 0)
    if not written.isdecimal() or int(written) < 1:
        raise CLIError(
            f"{WATCH_TIMEOUT_VARIABLE}: {written!r} is not a whole number of seconds, at least 1", EXIT_OTHER
        )
    return int(written)


def random_suffix(length: int = 6) -> str:
    return "".join(secrets.choice(NAME_ALPHABET) for _ in range(length))


# -- watching --------------------------------------------------------------------------------------


class WatchClient(KubeClient):
    """A KubeClient whose watches can be narrowed with field and label selectors."""

    def watch_selected(
        self,
        plural: str,
        namespace: str,
        resource_version: str,
        *,
        field_selector: str | None = None,
        label_selector: str | None = None,
        timeout_s: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Watch events ({"type", "object"}) from ``resource_version``; Gone on 410. ``timeout_s``: the
        server's, by default :func:`watch_timeout_s` (checked when the command started)."""
        return self.watch_raw(
            plural,
            namespace,
            resource_version,
            watch_timeout_s() if timeout_s is None else timeout_s,
            field_selector=field_selector,
            label_selector=label_selector,
        )


@dataclass
class Observed:
    """What a watch thread saw: an object, its deletion, or a problem worth telling the user."""

    kind: (
        str  # "taskrun" | "toolcall" | "subtoolcall" | "deleted" | "missing" (never seen) | "error" | "fatal"
    )
    obj: dict[str, Any] | None = None
    message: str = ""


class Follower:
    """Watches one TaskRun and its TaskRunToolCalls, putting what it sees on ``events``."""

    def __init__(self, target: Target, name: str) -> None:
        self.target = target
        self.name = name
        self.events: queue.Queue[Observed] = queue.Queue()
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._uid = ""  # the run's root-run uid, read by its own loop for the sub-agents' loop
        self._uid_known = threading.Event()

    def start(self) -> None:
        for loop in (self._taskrun_loop, self._toolcall_loop, self._sub_agent_loop):
            thread = threading.Thread(target=self._guard(loop), daemon=True, name=f"follow-{loop.__name__}")
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self.stop.set()

    def _guard(self, loop: Callable[[WatchClient], None]) -> Callable[[], None]:
        def run() -> None:
            from kubechain.kube.connection import load_connection

            try:
                client = WatchClient(load_connection(self.target.kubeconfig, self.target.context))
            except Exception as exc:  # noqa: BLE001
                self.events.put(Observed("fatal", message=f"cannot connect: {exc}"))
                return
            try:
                loop(client)
            except Exception as exc:  # noqa: BLE001 - reported to the main thread, which stops
                self.events.put(Observed("fatal", message=f"{type(exc).__name__}: {exc}"))
            finally:
                client.close()

        return run

    def _retry_pause(self, failures: int) -> None:
        self.stop.wait(min(5.0, 0.2 * (2**failures)))

    def _failed(self, exc: KubeAPIError, failures: int, quiet: bool = False) -> bool:
        """Whether following must end on ``exc`` (reported as "fatal"): the API server refuses us (403, or
        401 three times in a row: the client reads the credentials again after each, and a token being
        refreshed is refused once), does not know the kind (a list's 404: the CRDs are not installed), or
        has not answered ``MAX_FAILURES`` times in a row. Otherwise it is retried, and the user hears about
        it now and then. ``quiet``: a loop following is not about (the sub-agents') only stops, silently;
        the run's own loops meet the same errors and say so."""
        if isinstance(exc, Forbidden) or (
            isinstance(exc, Unauthorized) and failures >= UNAUTHORIZED_FAILURES
        ):
            message = f"the API server refuses: {exc}"
        elif isinstance(exc, NotFound):
            message = f"the API server does not know this kind (are KubeChain's CRDs installed?): {exc}"
        elif failures >= MAX_FAILURES:
            message = f"gave up after {failures} failed attempts: {exc}"
        else:
            if failures in (3, 10) and not quiet:
                self.events.put(Observed("error", message=f"still retrying: {exc}"))
            return False
        if not quiet:
            self.events.put(Observed("fatal", message=message))
        return True

    def _taskrun_loop(self, client: WatchClient) -> None:
        """List the run by name (the list's resourceVersion is the collection's, current, where the run's own
        may be older than the API server's watch history), then watch from there."""
        ns, failures = self.target.namespace, 0
        by_name = f"metadata.name={self.name}"
        while not self.stop.is_set():
            try:
                items, version = client.list_raw(TaskRun.PLURAL, ns, field_selector=by_name)
            except KubeAPIError as exc:
                failures += 1
                if self._failed(exc, failures):
                    return
                self._retry_pause(failures)
                continue
            if not items:
                # never seen: a mistyped name or the wrong namespace, not a deletion
                self.events.put(Observed("deleted" if self._uid_known.is_set() else "missing"))
                return
            if not self._uid_known.is_set():
                metadata = items[0].get("metadata") or {}
                self._uid = root_run_of(metadata.get("labels") or {}, metadata.get("uid"))
                self._uid_known.set()
            self.events.put(Observed("taskrun", items[0]))
            try:
                for event in client.watch_selected(TaskRun.PLURAL, ns, version, field_selector=by_name):
                    if self.stop.is_set():
                        return
                    failures = 0
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind in ("ADDED", "MODIFIED"):
                        self.events.put(Observed("taskrun", obj))
                    elif kind == "DELETED":
                        self.events.put(Observed("deleted"))
                        return
            except Gone:
                failures += 1  # expired before any event: not back to back
                self._retry_pause(failures)
            except (KubeAPIError, httpx.HTTPError) as exc:
                failures += 1
                if isinstance(exc, KubeAPIError) and self._failed(exc, failures):
                    return
                self._retry_pause(failures)
            # a watch that ended normally: loop, list again (never miss the terminal state), re-watch

    def _toolcall_loop(self, client: WatchClient) -> None:
        self._watch_toolcalls(client, f"{LABEL_TASKRUNTOOLCALL}={label_value(self.name)}", "toolcall")

    def _sub_agent_loop(self, client: WatchClient) -> None:
        """The tool calls of the sub-agent runs below this one (they carry the root run's uid), for the
        approvals they wait for: without them a run waiting on a sub-agent's approval just sat there.
        Starts once the run's own loop has read the run (and so its uid)."""
        while not self._uid_known.wait(0.5):
            if self.stop.is_set():
                return
        own = label_value(self.name)
        selector = f"{LABEL_ROOT_RUN}={self._uid},{LABEL_TASKRUNTOOLCALL}!={own}"
        self._watch_toolcalls(client, selector, "subtoolcall")

    def _watch_toolcalls(self, client: WatchClient, selector: str, kind: str) -> None:
        ns, failures = self.target.namespace, 0
        while not self.stop.is_set():
            try:
                items, version = client.list_raw(TaskRunToolCall.PLURAL, ns, selector)
            except KubeAPIError as exc:
                failures += 1
                if self._failed(exc, failures, quiet=kind != "toolcall"):
                    return
                self._retry_pause(failures)
                continue
            for item in items:
                self.events.put(Observed(kind, item))
            try:
                for event in client.watch_selected(
                    TaskRunToolCall.PLURAL, ns, version, label_selector=selector
                ):
                    if self.stop.is_set():
                        return
                    failures = 0
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self.events.put(Observed(kind, event.get("object") or {}))
            except Gone:
                failures += 1
                self._retry_pause(failures)
            except (KubeAPIError, httpx.HTTPError) as exc:
                failures += 1
                if isinstance(exc, KubeAPIError) and self._failed(exc, failures, quiet=kind != "toolcall"):
                    return
                self._retry_pause(failures)


# How often a run that waits for its Agent has what the Agent waits for looked at.
BLOCKER_CHECK_S = 3.0


class Blockers:
    """What a Pending run's Agent waits for that is in Error: its LLM, MCP servers and contact channels
    (and the Agent itself). The run says only 'LLM "x" is not ready', and waited the whole timeout while
    the LLM's own status said why. Each is said once, and again when its statusDetail changes (or once
    out of Error, it falls into Error again)."""

    def __init__(self, kube: KubeClient, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.said: dict[str, str] = {}  # 'LLM "x"' -> the statusDetail said

    def check(self, run: TaskRun) -> list[Event]:
        if run.phase != TaskRunPhase.PENDING or run.spec.agent_ref is None:
            return []
        current = dict(self._in_error(run.spec.agent_ref.name, run.status.status_detail or ""))
        events = [
            Event("pending", f"{what} is in Error: {detail}")
            for what, detail in current.items()
            if self.said.get(what) != detail
        ]
        self.said = current
        return events

    def _in_error(self, agent_name: str, run_detail: str) -> Iterator[tuple[str, str]]:
        # missing: the run says it waits for it to exist; unreadable now: asked again later
        agent = self._get(Agent, agent_name)
        if agent is None:
            return
        detail = agent.status.status_detail or "(no detail)"
        if agent.status.status == "Error" and detail not in run_detail:  # the run quotes its Agent's
            yield f'agent "{agent_name}"', detail
        spec = agent.spec
        wanted: list[tuple[Any, str]] = [(LLM, spec.llm_ref.name)]
        wanted += [(MCPServer, ref.name) for ref in spec.mcp_servers]
        wanted += [(ContactChannel, ref.name) for ref in spec.human_contact_channels]
        for model, name in wanted:
            obj = self._get(model, name)  # a missing one is in the Agent's own detail, which the run quotes
            if obj is not None and obj.status.status == "Error":
                yield f'{model.KIND} "{name}"', obj.status.status_detail or "(no detail)"

    def _get(self, model: Any, name: str) -> Any:
        """The object, or None when it cannot be had: missing, the API server not answering, or an object
        the model cannot read (an LLM of a provider it does not know, written under the Go original's
        CRD): what the run waits for is said as a help, and never ends `kubechain run`."""
        try:
            return self.kube.get(model, self.namespace, name)
        except KubeAPIError:
            return None
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, or anything unexpected
            log.debug('not looking into %s "%s": %s', model.KIND, name, exc, exc_info=True)
            return None


def _phase_text(run: TaskRun) -> str:
    detail = run.status.status_detail
    return f"{run.name}: {run.phase or 'Initializing'}" + (f" ({detail})" if detail else "")


def follow(target: Target, name: str, stream: IO[str], timeout_s: float) -> tuple[int, dict[str, Any] | None]:
    """Print the run's conversation as it happens until it ends. Returns (exit code, last TaskRun)."""
    watch_timeout_s()  # refused here, in one line, not by each watch thread
    tracker = ConversationTracker()
    follower = Follower(target, name)
    last: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    kube = target.client()
    renderer = make_renderer(stream)
    blockers = Blockers(kube, target.namespace)
    next_blocker_check = 0.0

    def check_blockers() -> None:
        nonlocal next_blocker_check
        next_blocker_check = time.monotonic() + BLOCKER_CHECK_S
        if last is not None:
            emit(blockers.check(TaskRun.from_wire(last)))

    def emit(events: list[Event]) -> None:
        for event in events:
            renderer.emit(event)

    def list_toolcalls() -> list[TaskRunToolCall]:
        try:
            return kube.list(
                TaskRunToolCall, target.namespace, f"{LABEL_TASKRUNTOOLCALL}={label_value(name)}"
            )
        except KubeAPIError:
            return []

    def on_taskrun(raw: dict[str, Any]) -> int | None:
        nonlocal last
        last = raw
        run = TaskRun.from_wire(raw)
        renderer.status(_phase_text(run))
        toolcalls = list_toolcalls() if tracker.needs_toolcalls(run) or run.is_terminal() else []
        emit(tracker.taskrun_events(run, toolcalls))
        if run.phase == TaskRunPhase.PENDING:
            check_blockers()
        if not run.is_terminal():
            return None
        for toolcall in toolcalls:
            emit(tracker.toolcall_events(toolcall))
        emit(tracker.final_events(run))
        return EXIT_FINAL_ANSWER if run.phase == "FinalAnswer" else EXIT_FAILED

    def on_toolcall(raw: dict[str, Any]) -> int | None:
        toolcall = TaskRunToolCall.from_wire(raw)
        if not tracker.knows_tool_call(toolcall):
            # the assistant message asking for it is not printed yet: print it first
            try:
                code = on_taskrun(kube.get_raw(TaskRun.PLURAL, target.namespace, name))
            except KubeAPIError:
                code = None
            if code is not None:
                return code
        emit(tracker.toolcall_events(toolcall))
        return None

    try:
        with renderer:
            follower.start()
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    phase = (last or {}).get("status", {}).get("phase") or "Initializing"
                    click.echo(
                        f"error: timed out after {timeout_s:g}s waiting for TaskRun {name} (phase {phase})",
                        err=True,
                    )
                    return EXIT_OTHER, last
                try:
                    observed = follower.events.get(
                        timeout=min(remaining, 1.0) if remaining is not None else 1.0
                    )
                except queue.Empty:
                    if time.monotonic() >= next_blocker_check:
                        check_blockers()  # a run that waits sees no event of its own meanwhile
                    continue
                code: int | None = None
                if observed.kind == "taskrun" and observed.obj is not None:
                    code = on_taskrun(observed.obj)
                elif observed.kind == "toolcall" and observed.obj is not None:
                    code = on_toolcall(observed.obj)
                elif observed.kind == "subtoolcall" and observed.obj is not None:
                    emit(tracker.sub_agent_toolcall_events(TaskRunToolCall.from_wire(observed.obj)))
                elif observed.kind == "deleted":
                    click.echo(f"error: TaskRun {name} was deleted", err=True)
                    return EXIT_OTHER, last
                elif observed.kind == "missing":
                    click.echo(
                        f'error: taskrun "{name}" not found in namespace "{target.namespace}"', err=True
                    )
                    return EXIT_OTHER, last
                elif observed.kind == "error":
                    click.echo(f"warning: watching TaskRun {name}: {observed.message}", err=True)
                elif observed.kind == "fatal":
                    click.echo(f"error: cannot follow TaskRun {name}: {observed.message}", err=True)
                    return EXIT_OTHER, last
                if code is not None:
                    return code, last
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; the run goes on (kubechain logs {name})", err=True)
        return 130, last
    finally:
        follower.close()
        kube.close()


# -- commands --------------------------------------------------------------------------------------


@main.command()
@click.argument("message")
@click.option("--agent", "-a", "agent_name", required=True, help="the Agent that answers")
@click.option("--name", default=None, help="TaskRun name (default: <agent>-<6 random characters>)")
@click.option(
    "--no-wait", is_flag=True, help="create the TaskRun, print its name (with -o: the object) and exit"
)
@click.option(
    "--output",
    "-o",
    type=click.Choice(["json", "yaml"]),
    default=None,
    help="print the final TaskRun object (the conversation then goes to stderr)",
)
@click.option(
    "--timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="seconds to wait for the end (0: no limit)",
)
@click.option(
    "--wait-for-agent",
    is_flag=True,
    help="start the run even if the agent does not exist yet (it waits for it); else that is an error",
)
@kube_options
def run(
    target: Target,
    message: str,
    agent_name: str,
    name: str | None,
    no_wait: bool,
    output: str | None,
    timeout: float,
    wait_for_agent: bool,
) -> None:
    """Ask an agent something: create a TaskRun and stream the conversation until its final answer.

    Exit code: 0 final answer, 1 failed, 2 timeout or another error, 130 after Ctrl-C (the run goes on).
    """
    if not message.strip():
        raise CLIError("the message is empty", EXIT_OTHER)
    if not no_wait:
        watch_timeout_s()  # before the run is created: it could not be followed
    name = name or f"{agent_name}-{random_suffix()}"[:253]
    taskrun = TaskRun(
        metadata=ObjectMeta(
            name=name, namespace=target.namespace, labels={LABEL_AGENT: label_value(agent_name)}
        ),
        spec=TaskRunSpec(agent_ref=LocalObjectReference(name=agent_name), user_message=message),
    )
    with target.connect() as kube:
        try:
            kube.get(Agent, target.namespace, agent_name)
        except NotFound as missing:
            if missing.kind_unknown:
                raise not_found(missing, "", EXIT_OTHER) from None
            if not wait_for_agent:
                # a mistyped name made a run that waited the whole timeout and was left Pending
                raise CLIError(
                    f'agent "{agent_name}" not found in namespace "{target.namespace}"'
                    f"{agents_there(kube, target.namespace)}: create it first, or pass --wait-for-agent to "
                    "start the run and have it wait for the agent",
                    EXIT_OTHER,
                ) from None
            click.echo(
                f'warning: agent "{agent_name}" does not exist in namespace "{target.namespace}" (yet); '
                "the run waits for it",
                err=True,
            )
        except KubeAPIError as exc:
            raise api_error(exc, f"cannot read agent {agent_name}", EXIT_OTHER) from None
        body = taskrun.to_wire()
        body["kind"] = TaskRun.KIND
        body.pop("status", None)
        try:
            created = kube.create_raw(TaskRun.PLURAL, target.namespace, body)
        except KubeAPIError as exc:
            raise api_error(exc, f"cannot create {resource_ref('TaskRun', name)}", EXIT_OTHER) from None
    if no_wait:
        click.echo(dump(created, output) if output else name)
        return
    click.echo(f"{resource_ref('TaskRun', name)} created", err=True)
    stream = sys.stderr if output else sys.stdout
    code, last = follow(target, name, stream, timeout)
    if output and last is not None:
        click.echo(dump(last, output))
    sys.exit(code)


def agents_there(kube: KubeClient, namespace: str, shown: int = 10) -> str:
    """The Agents of ``namespace``, as " (agents there: a, b, ...)" (a mistyped name is seen beside the right
    one), or "" when there are none or they cannot be listed."""
    try:
        names = sorted(agent.name for agent in kube.list(Agent, namespace))
    except KubeAPIError:
        return ""
    if not names:
        return " (it has no agents)"
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return f" (agents there: {', '.join(names[:shown])}{more})"


@main.command()
@click.argument("taskrun")
@click.option("--output", "-o", type=click.Choice(["json"]), default=None, help="the conversation as JSON")
@click.option(
    "--follow", "-f", "follow_", is_flag=True, help="keep printing until the run ends (exit codes as run)"
)
@kube_options
def logs(target: Target, taskrun: str, output: str | None, follow_: bool) -> None:
    """Print a TaskRun's conversation, its tool calls' outcomes and its final answer or error."""
    code = 0
    if follow_:
        code, last = follow(target, taskrun, sys.stderr if output else sys.stdout, 0)
        if not output or last is None:
            sys.exit(code)
    with target.connect() as kube:
        try:
            run_ = kube.get(TaskRun, target.namespace, taskrun)
            selector = f"{LABEL_TASKRUNTOOLCALL}={label_value(taskrun)}"
            toolcalls = kube.list(TaskRunToolCall, target.namespace, selector)
        except NotFound as missing:
            raise not_found(
                missing, f'taskrun "{taskrun}" not found in namespace "{target.namespace}"'
            ) from None
        except KubeAPIError as exc:
            raise api_error(exc, f"cannot read taskrun {taskrun}") from None
    if output == "json":
        click.echo(json.dumps(conversation_json(run_, toolcalls), indent=2, ensure_ascii=False))
        sys.exit(code)
    renderer = make_renderer(sys.stdout)
    for event in conversation_events(run_, toolcalls):
        renderer.emit(event)
    if not run_.is_terminal():
        click.echo(f"(in progress: {_phase_text(run_)}; kubechain logs -f {taskrun} to follow)", err=True)


def conversation_json(run_: TaskRun, toolcalls: list[TaskRunToolCall]) -> dict[str, Any]:
    return {
        "name": run_.name,
        "namespace": run_.namespace,
        "phase": run_.phase,
        "contextWindow": [m.to_wire() for m in run_.status.context_window or []],
        "toolCalls": [
            {
                "name": t.name,
                "tool": t.spec.tool_ref.name,
                "toolCallId": t.spec.tool_call_id,
                "arguments": t.spec.arguments,
                "phase": t.phase,
                **({"result": t.status.result} if t.status.result is not None else {}),
                **({"error": t.status.error} if t.status.error is not None else {}),
                **(
                    {"approval": t.metadata.annotations[ANNOTATION_APPROVAL]}
                    if ANNOTATION_APPROVAL in t.metadata.annotations
                    else {}
                ),
            }
            for t in sorted(toolcalls, key=lambda t: (t.metadata.creation_timestamp or "", t.name))
        ],
        "output": run_.status.output,
        "error": run_.status.error,
    }


def decide(target: Target, name: str, decision: str, comment: str | None) -> None:
    """Set the approval annotations, once: a decision already recorded wins (exit 1)."""
    ref = resource_ref("TaskRunToolCall", name)
    with target.connect() as kube:
        for _ in range(5):
            try:
                toolcall = kube.get(TaskRunToolCall, target.namespace, name)
            except NotFound as missing:
                raise not_found(
                    missing, f'taskruntoolcall "{name}" not found in namespace "{target.namespace}"'
                ) from None
            except KubeAPIError as exc:
                raise api_error(exc, f"cannot read {ref}") from None
            existing = annotation_decision(toolcall)  # as the workers read it ("Approved " counts)
            # The decision the status recorded is the one that counted (HumanLayer's, say): an annotation
            # set by hand after it, which the workers ignored, must not be told as the decision.
            if toolcall.phase == ToolCallPhase.TOOL_CALL_REJECTED:
                already: bool | None = False
            elif toolcall.phase == ToolCallPhase.READY_TO_EXECUTE_APPROVED_TOOL:
                already = True
            elif existing is not None and (toolcall.phase in UNDECIDED_PHASES or existing.approved):
                already = existing.approved  # recorded or about to be (a rejection counts only so)
            else:
                already = None
            if already is not None:
                click.echo(f"{ref} already {'approved' if already else 'rejected'}; ignoring", err=True)
                sys.exit(1)
            # (any other value is not a decision: the workers ignore it, and this one replaces it)
            if toolcall.phase not in UNDECIDED_PHASES:
                raise CLIError(
                    f"{ref} is {toolcall.phase}: it is not waiting for a decision, and the workers would "
                    "ignore this one"
                )
            annotations = {ANNOTATION_APPROVAL: decision}
            if comment is not None:
                annotations[ANNOTATION_APPROVAL_COMMENT] = comment
            try:
                # resourceVersion makes the patch conditional: a concurrent decision wins, we re-read.
                kube.patch_metadata(
                    TaskRunToolCall.PLURAL,
                    target.namespace,
                    name,
                    {"annotations": annotations, "resourceVersion": toolcall.resource_version},
                )
            except Conflict:
                continue
            except KubeAPIError as exc:
                raise api_error(exc, f"cannot annotate {ref}") from None
            click.echo(f"{ref} {decision}")
            return
    raise CLIError(f"cannot annotate {ref}: it kept changing (conflicts)")


@main.command()
@click.argument("name")
@click.option("--comment", default=None, help="a note for the record (and the LLM)")
@kube_options
def approve(target: Target, name: str, comment: str | None) -> None:
    """Approve a tool call awaiting human approval (a TaskRunToolCall name)."""
    decide(target, name, "approved", comment)


@main.command()
@click.argument("name")
@click.option("--comment", required=True, help="why: sent back to the LLM")
@kube_options
def reject(target: Target, name: str, comment: str) -> None:
    """Reject a tool call awaiting human approval; the comment goes back to the LLM."""
    decide(target, name, "rejected", comment)
