"""The conversation renderer of ``kubechain run`` / ``logs``: plain lines, diffing, tool-call phases."""

from __future__ import annotations

import io
from typing import Any

import pytest

from kubechain.cli.render import (
    ConversationTracker,
    Event,
    PlainRenderer,
    RichRenderer,
    conversation_events,
    make_renderer,
    plain_line,
)
from kubechain.kube.errors import Forbidden, NotFound, Unauthorized, Unavailable
from kubechain.models import TaskRun, TaskRunToolCall

CALL = {"id": "call_0_1_abc", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}

WINDOW: list[dict[str, Any]] = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "Add 2 and 3"},
    {"role": "assistant", "content": "", "toolCalls": [CALL]},
    {"role": "tool", "content": "5", "toolCallId": "call_0_1_abc"},
    {"role": "assistant", "content": "The sum is 5."},
]

EXPECTED = [
    "system: You add numbers.",
    "user: Add 2 and 3",
    'tool call add({"a": 2, "b": 3}) [call_0_1_abc]',
    "tool result add: 5",
    "assistant: The sum is 5.",
]


def taskrun(window: list[dict[str, Any]], phase: str = "FinalAnswer", **status: Any) -> TaskRun:
    return TaskRun.from_wire(
        {
            "apiVersion": "kubechain.humanlayer.dev/v1alpha1",
            "kind": "TaskRun",
            "metadata": {"name": "calc-abc123", "namespace": "ns"},
            "spec": {"agentRef": {"name": "calc"}, "userMessage": "Add 2 and 3"},
            "status": {"phase": phase, "contextWindow": window, **status},
        }
    )


def toolcall(
    name: str, phase: str, call_id: str = "call_0_1_abc", version: str | None = None, **status: Any
) -> TaskRunToolCall:
    metadata = {"name": name, "namespace": "ns", "creationTimestamp": "2025-01-01T00:00:00Z"}
    if version is not None:
        metadata["resourceVersion"] = version
    return TaskRunToolCall.from_wire(
        {
            "metadata": metadata,
            "spec": {
                "toolCallId": call_id,
                "taskRunRef": {"name": "calc-abc123"},
                "toolRef": {"name": "add"},
                "arguments": '{"a":2,"b":3}',
            },
            "status": {"phase": phase, **status},
        }
    )


def lines(events: list[Event]) -> list[str]:
    return [plain_line(event) for event in events]


def test_plain_lines_of_a_whole_conversation() -> None:
    run = taskrun(WINDOW, output="The sum is 5.")
    tracker = ConversationTracker()
    assert lines(tracker.taskrun_events(run)) == EXPECTED
    assert lines(tracker.final_events(run)) == ["final answer: The sum is 5."]


def test_only_new_messages_are_reported() -> None:
    tracker = ConversationTracker()
    assert lines(tracker.taskrun_events(taskrun(WINDOW[:2], "ReadyForLLM"))) == EXPECTED[:2]
    # the same observation again (a resync, a re-get after a watch ended): nothing new
    assert tracker.taskrun_events(taskrun(WINDOW[:2], "SendContextWindowToLLM")) == []
    assert lines(tracker.taskrun_events(taskrun(WINDOW[:3], "ToolCallsPending"))) == EXPECTED[2:3]
    # an older observation arriving late does not repeat anything
    assert tracker.taskrun_events(taskrun(WINDOW[:2], "ReadyForLLM")) == []
    assert tracker.final_events(taskrun(WINDOW[:3], "ToolCallsPending")) == []
    # two messages at once; the tool result is named after the assistant's tool call
    assert (
        lines(tracker.taskrun_events(taskrun(WINDOW, "FinalAnswer", output="The sum is 5."))) == EXPECTED[3:]
    )
    final = taskrun(WINDOW, "FinalAnswer", output="The sum is 5.")
    assert lines(tracker.final_events(final)) == ["final answer: The sum is 5."]
    assert tracker.final_events(final) == [], "the end is reported once"


def test_tool_call_phase_changes_are_reported_once() -> None:
    tracker = ConversationTracker()
    tracker.taskrun_events(taskrun(WINDOW[:3], "ToolCallsPending"))
    assert tracker.toolcall_events(toolcall("calc-tc-01", "Pending")) == []
    assert lines(tracker.toolcall_events(toolcall("calc-tc-01", "Running"))) == [
        "tool add [calc-tc-01] Running"
    ]
    assert tracker.toolcall_events(toolcall("calc-tc-01", "Running")) == []
    assert lines(tracker.toolcall_events(toolcall("calc-tc-01", "AwaitingHumanApproval"))) == [
        "tool add [calc-tc-01] waiting for approval: kubechain approve calc-tc-01"
    ]
    assert lines(tracker.toolcall_events(toolcall("calc-tc-01", "Failed", error="division by zero"))) == [
        "tool add [calc-tc-01] Failed: division by zero"
    ]
    assert lines(
        tracker.toolcall_events(toolcall("calc-tc-02", "ToolCallRejected", "call_x", result="no"))
    ) == ["tool add [calc-tc-02] ToolCallRejected: no"]


def test_a_stale_observation_of_a_tool_call_never_moves_its_shown_phase_back() -> None:
    """``kubechain run`` printed "waiting for approval" again after "ToolCallRejected", from a stale watch
    event (a relist, or a re-get after a watch ended, may hand back an older object)."""
    tracker = ConversationTracker()
    tracker.taskrun_events(taskrun(WINDOW[:3], "ToolCallsPending"))
    shown = []
    for phase, version in [
        ("AwaitingHumanApproval", "5"),
        ("ToolCallRejected", "7"),
        ("AwaitingHumanApproval", "5"),  # stale
        ("AwaitingHumanApproval", None),  # stale, and without a resourceVersion to tell
    ]:
        shown += lines(tracker.toolcall_events(toolcall("calc-tc-01", phase, version=version, result="no")))
    assert shown == [
        "tool add [calc-tc-01] waiting for approval: kubechain approve calc-tc-01",
        "tool add [calc-tc-01] ToolCallRejected: no",
    ]
    # before its end too: an older phase is not shown again, a newer one (a retried request) is
    phases = []
    for phase, version in [
        ("ErrorRequestingHumanApproval", "10"),
        ("AwaitingHumanApproval", "12"),
        ("ErrorRequestingHumanApproval", "10"),  # stale
        ("ReadyToExecuteApprovedTool", "13"),
        ("AwaitingHumanApproval", "12"),  # stale
    ]:
        phases += [
            event.phase
            for event in tracker.sub_agent_toolcall_events(toolcall("sub-tc-01", phase, version=version))
        ]
    assert phases == ["ErrorRequestingHumanApproval", "AwaitingHumanApproval", "ReadyToExecuteApprovedTool"]


def test_tool_outcome_is_printed_before_its_result_when_known() -> None:
    tracker = ConversationTracker()
    tracker.taskrun_events(taskrun(WINDOW[:3], "ToolCallsPending"))
    run = taskrun(WINDOW[:4], "ReadyForLLM")
    assert tracker.needs_toolcalls(run)
    assert lines(tracker.taskrun_events(run, [toolcall("calc-tc-01", "Succeeded", result="5")])) == [
        "tool add [calc-tc-01] Succeeded",
        "tool result add: 5",
    ]
    assert not tracker.needs_toolcalls(taskrun(WINDOW, "FinalAnswer"))


def test_failed_pending_and_retrying() -> None:
    tracker = ConversationTracker()
    pending = taskrun([], "Pending", statusDetail="Waiting for Agent to exist")
    assert lines(tracker.taskrun_events(pending)) == ["pending: Waiting for Agent to exist"]
    assert tracker.taskrun_events(pending) == []
    backoff = taskrun(
        WINDOW[:2], "ErrorBackoff", statusDetail="LLM request failed, retrying in 1.0s", error="500 boom"
    )
    assert lines(tracker.taskrun_events(backoff)) == EXPECTED[:2] + [
        "retrying: LLM request failed, retrying in 1.0s: 500 boom"
    ]
    failed = taskrun(WINDOW[:2], "Failed", error="LLM request failed: status 400")
    assert tracker.taskrun_events(failed) == []
    assert lines(tracker.final_events(failed)) == ["failed: LLM request failed: status 400"]


def test_a_turn_waiting_for_its_agents_validation_is_said_once() -> None:
    """A run in flight whose Agent was edited waits ReadyForLLM, unclaimed, for the edit's validation
    (plan_turn_waits_for_agent). Only a Pending run's wait was said: `kubechain run` and `logs -f` printed
    nothing of this one in plain output, a run that did not move with no word of why."""
    from kubechain.statemachines.taskrun import agent_not_validated_detail

    tracker = ConversationTracker()
    detail = agent_not_validated_detail("calc")
    waiting = taskrun(
        WINDOW[:4], "ReadyForLLM", ready=False, status="Pending", statusDetail=detail, agentName="calc"
    )
    assert lines(tracker.taskrun_events(waiting)) == EXPECTED[:4] + [f"pending: {detail}"]
    assert tracker.taskrun_events(waiting) == [], "said once"
    fan_in = "All tool calls completed, ready to send tool results to LLM"
    assert ConversationTracker().taskrun_events(taskrun([], "ReadyForLLM", statusDetail=fan_in)) == []


def test_a_turn_waiting_for_its_agent_is_told_by_its_status_not_by_its_words() -> None:
    """`kubechain run` told a turn's wait for its Agent by the words of its statusDetail: reworded, the
    wait went unsaid. The run's status says it waits (ReadyForLLM with status Pending, as the workers write
    it: plan_turn_waits_for_agent), whatever the words; a turn about to be claimed (status Ready) does not."""
    from kubechain.statemachines.taskrun import plan_turn_waits_for_agent
    from kubechain.statemachines.transition import Transition

    ready = {"ready": True, "status": "Ready", "statusDetail": "Ready to send to LLM", "agentName": "calc"}
    wait = plan_turn_waits_for_agent(taskrun(WINDOW[:2], "ReadyForLLM", **ready), "calc", Transition({}))
    assert wait is not None
    reworded = 'Agent "calc" was edited; its validation is awaited'
    waiting = taskrun(WINDOW[:2], **{**ready, **wait.status, "statusDetail": reworded})
    assert lines(ConversationTracker().taskrun_events(waiting)) == EXPECTED[:2] + [f"pending: {reworded}"]
    assert ConversationTracker().taskrun_events(taskrun([], "ReadyForLLM", **ready)) == []


def test_multiline_content_stays_on_one_line_and_odd_arguments_verbatim() -> None:
    window: list[dict[str, Any]] = [
        {"role": "user", "content": "line one\nline two"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "toolCalls": [{"id": "c1", "function": {"name": "fetch__get", "arguments": "{not json"}}],
        },
        {"role": "tool", "content": "Error: boom", "toolCallId": "c1"},
        {"role": "tool", "content": "orphan", "toolCallId": "c9"},
    ]
    assert lines(ConversationTracker().taskrun_events(taskrun(window, "ReadyForLLM"))) == [
        "user: line one\\nline two",
        "assistant: Let me check.",
        "tool call fetch__get({not json) [c1]",
        "tool result fetch__get: Error: boom",
        "tool result c9: orphan",
    ]


def test_conversation_events_for_logs() -> None:
    run = taskrun(WINDOW, output="The sum is 5.")
    running = toolcall("calc-tc-02", "Running", "call_other")
    done = toolcall("calc-tc-01", "Succeeded", result="5")
    assert lines(conversation_events(run, [running, done])) == [
        *EXPECTED[:3],
        "tool add [calc-tc-01] Succeeded",
        *EXPECTED[3:],
        "tool add [calc-tc-02] Running",
        "final answer: The sum is 5.",
    ]


def test_renderers() -> None:
    plain = io.StringIO()
    renderer = make_renderer(plain)
    assert isinstance(renderer, PlainRenderer)
    with renderer:
        for event in conversation_events(taskrun(WINDOW, output="The sum is 5."), []):
            renderer.emit(event)
    assert plain.getvalue().splitlines() == [*EXPECTED, "final answer: The sum is 5."]

    fancy = io.StringIO()
    rich_renderer = make_renderer(fancy, rich=True)
    assert isinstance(rich_renderer, RichRenderer)
    with rich_renderer:
        for event in conversation_events(
            taskrun(WINDOW, output="The sum is 5."), [toolcall("t1", "Failed", error="x")]
        ):
            rich_renderer.emit(event)
        rich_renderer.emit(Event("failed", "boom [bold]"))
    text = fancy.getvalue()
    assert "final answer" in text and "The sum is 5." in text and "add" in text and "boom [bold]" in text


# -- following: watches that end or expire start over from a fresh get -------------------------------


class FakeWatchClient:
    """Scripted list/watch answers for one TaskRun (``gets``: the run each list by name finds, None when
    there is none, or an exception; the list's version is the run's plus 100); records the
    resourceVersions watched from."""

    def __init__(self, follower: Any, gets: list[Any], watches: list[Any]) -> None:
        self.follower = follower
        self.gets = gets
        self.watches = watches
        self.watched_from: list[str] = []

    def list_raw(
        self, plural: str, namespace: str, selector: str | None = None, *, field_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        if plural != "taskruns":
            return [], "1"
        assert field_selector == "metadata.name=r"
        answer = self.gets.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer is None:
            return [], "1000"
        return [dict(answer)], str(int(answer["metadata"]["resourceVersion"]) + 100)

    def watch_selected(self, plural: str, namespace: str, version: str, **_: Any) -> Any:
        self.watched_from.append(version)
        script = self.watches.pop(0) if self.watches else None
        if isinstance(script, Exception):
            raise script
        yield from script or []
        if not self.watches and not self.gets:
            self.follower.stop.set()  # the scripted story is over


def wire_run(version: str, phase: str) -> dict[str, Any]:
    return {"metadata": {"name": "r", "resourceVersion": version}, "status": {"phase": phase}}


def test_follower_rewatches_after_gone_and_after_a_watch_ends() -> None:
    from kubechain.cli.resources import Target
    from kubechain.cli.run import Follower
    from kubechain.kube.errors import Gone

    follower = Follower(Target("ns", None, None), "r")
    client = FakeWatchClient(
        follower,
        gets=[wire_run("1", "ReadyForLLM"), wire_run("5", "ToolCallsPending"), wire_run("9", "FinalAnswer")],
        watches=[
            Gone(410, "Expired", "too old"),
            [
                {"type": "BOOKMARK", "object": wire_run("6", "")},
                {"type": "MODIFIED", "object": wire_run("7", "ReadyForLLM")},
            ],
            [],
        ],
    )
    follower._taskrun_loop(client)  # type: ignore[arg-type]
    observed = []
    while not follower.events.empty():
        observed.append(follower.events.get_nowait())
    assert [(o.kind, (o.obj or {}).get("status", {}).get("phase")) for o in observed] == [
        ("taskrun", "ReadyForLLM"),
        ("taskrun", "ToolCallsPending"),
        ("taskrun", "ReadyForLLM"),
        ("taskrun", "FinalAnswer"),
    ]
    assert client.watched_from == ["101", "105", "109"], "from each list's version, not the run's"


def test_follower_reports_deletion() -> None:
    from kubechain.cli.resources import Target
    from kubechain.cli.run import Follower

    follower = Follower(Target("ns", None, None), "r")
    client = FakeWatchClient(
        follower,
        gets=[wire_run("1", "ReadyForLLM")],
        watches=[[{"type": "DELETED", "object": wire_run("2", "")}]],
    )
    follower._taskrun_loop(client)  # type: ignore[arg-type]
    assert [follower.events.get_nowait().kind for _ in range(2)] == ["taskrun", "deleted"]

    # a name never seen is not found (a typo, the wrong namespace), not deleted
    never = Follower(Target("ns", None, None), "r")
    never._taskrun_loop(FakeWatchClient(never, gets=[None], watches=[]))  # type: ignore[arg-type]
    assert never.events.get_nowait().kind == "missing"

    # seen, then gone when the watch is made again
    gone = Follower(Target("ns", None, None), "r")
    gone._taskrun_loop(
        FakeWatchClient(gone, gets=[wire_run("1", "ReadyForLLM"), None], watches=[[]])  # type: ignore[arg-type]
    )
    assert [gone.events.get_nowait().kind for _ in range(2)] == ["taskrun", "deleted"]


def test_logs_follow_on_a_run_that_does_not_exist_says_not_found(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubechain.cli import run as run_module
    from kubechain.cli.resources import Target

    class NoClient:
        def close(self) -> None:
            pass

    monkeypatch.setattr(Target, "client", lambda self, timeout_s=30.0: NoClient())
    monkeypatch.setattr(
        run_module.Follower, "start", lambda self: self.events.put(run_module.Observed("missing"))
    )
    code, last = run_module.follow(Target("ns", None, None), "typo", io.StringIO(), 0)
    assert (code, last) == (run_module.EXIT_OTHER, None)
    assert 'error: taskrun "typo" not found in namespace "ns"' in capsys.readouterr().err


def test_a_watch_that_keeps_expiring_before_any_event_is_retried_with_a_pause() -> None:
    """A run idle for longer than the API server's watch history used to be got and watched again back to
    back, as fast as the client's rate limit allowed, for as long as it stayed idle."""
    from kubechain.cli.resources import Target
    from kubechain.cli.run import Follower
    from kubechain.kube.errors import Gone

    follower = Follower(Target("ns", None, None), "r")
    pauses: list[int] = []

    def pause(failures: int) -> None:
        pauses.append(failures)
        if len(pauses) == 3:
            follower.stop.set()

    follower._retry_pause = pause  # type: ignore[method-assign]
    expired = Gone(410, "Expired", "too old")
    client = FakeWatchClient(
        follower, gets=[wire_run("1", "AwaitingHumanApproval")] * 3, watches=[expired, expired, expired]
    )
    follower._taskrun_loop(client)  # type: ignore[arg-type]
    assert pauses == [1, 2, 3]


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (Forbidden(403, "Forbidden", "taskruns is forbidden"), "the API server refuses: "),
        (Unauthorized(401, "Unauthorized", "Unauthorized"), "the API server refuses: "),
        (
            NotFound(404, "NotFound", "the server could not find the requested resource"),
            "the API server does not know this kind (are KubeChain's CRDs installed?)",
        ),
    ],
)
def test_following_ends_when_the_api_server_refuses_or_lacks_the_kinds(error: Exception, said: str) -> None:
    """`logs -f` used to retry these for ever, saying only "still retrying" twice."""
    from kubechain.cli.resources import Target
    from kubechain.cli.run import Follower

    for loop in ("_taskrun_loop", "_toolcall_loop"):
        follower = Follower(Target("ns", None, None), "r")
        follower._retry_pause = lambda _failures: None  # type: ignore[method-assign]
        client = FakeWatchClient(follower, gets=[error], watches=[])
        asked: list[int] = []

        def refuse(*_a: Any, asked: list[int] = asked, **_k: Any) -> Any:
            asked.append(1)
            raise error

        client.list_raw = refuse  # type: ignore[method-assign]
        getattr(follower, loop)(client)
        seen = [follower.events.get_nowait() for _ in range(follower.events.qsize())]
        assert [o.kind for o in seen] == ["fatal"] and seen[0].message.startswith(said)
        # a 401 may be a token being refreshed (the client reads the credentials again): the third ends it
        assert len(asked) == (3 if isinstance(error, Unauthorized) else 1)


def test_following_gives_up_on_an_api_server_that_stays_unreachable() -> None:
    from kubechain.cli.resources import Target
    from kubechain.cli.run import MAX_FAILURES, Follower

    follower = Follower(Target("ns", None, None), "r")
    follower._retry_pause = lambda _failures: None  # type: ignore[method-assign]
    down = Unavailable(0, "Unavailable", "connection refused")
    follower._taskrun_loop(FakeWatchClient(follower, gets=[down] * MAX_FAILURES, watches=[]))  # type: ignore[arg-type]
    seen = [follower.events.get_nowait() for _ in range(follower.events.qsize())]
    assert [o.kind for o in seen] == ["error", "error", "fatal"]  # "still retrying" at 3 and 10
    assert (
        seen[-1].message == f"gave up after {MAX_FAILURES} failed attempts: 0 Unavailable: connection refused"
    )


def test_follow_stops_with_exit_2_when_following_cannot_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubechain.cli import run as run_module
    from kubechain.cli.resources import Target

    class NoClient:
        def close(self) -> None:
            pass

    monkeypatch.setattr(Target, "client", lambda self, timeout_s=30.0: NoClient())
    monkeypatch.setattr(
        run_module.Follower,
        "start",
        lambda self: self.events.put(run_module.Observed("fatal", message="the API server refuses: 403")),
    )
    code, last = run_module.follow(Target("ns", None, None), "r", io.StringIO(), 0)
    assert (code, last) == (run_module.EXIT_OTHER, None)


def test_a_kubeconfig_whose_ca_file_is_garbage_is_a_cli_error_not_a_traceback(tmp_path: Any) -> None:
    from kubechain.cli.resources import CLIError, Target

    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:1", certificate-authority: "{ca}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
"""
    )
    with pytest.raises(CLIError) as refused:
        Target("ns", str(kubeconfig), None).client()
    assert str(refused.value).startswith(f"cannot load the cluster connection from {kubeconfig}: ")


def test_escape_sequences_from_an_llm_or_a_tool_never_reach_the_terminal() -> None:
    """A fetched page or an answer could clear the screen, rewrite lines or set the clipboard (OSC 52)."""
    hostile = "ok\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07done\r\nnext\x9b31m\ttab"
    window = [
        {"role": "user", "content": "fetch it"},
        {"role": "assistant", "content": hostile},
    ]
    events = list(conversation_events(taskrun(window, output=hostile), []))
    assert lines(events)[1] == "assistant: ok\\x1b[2J\\x1b]52;c;cm0gLXJmIH4=\\x07done\\nnext\\x9b31m\ttab"
    fancy = io.StringIO()
    with make_renderer(fancy, rich=True) as renderer:
        for event in events:
            renderer.emit(event)
        renderer.emit(Event("tool_call", name="add\x1b[8m", arguments="{}", ident="c\x1b]0;x\x07"))
    text = fancy.getvalue()
    # rich writes its own styling sequences (CSI ... m); none of the hostile ones get through
    for sequence in ("\x1b[2J", "\x1b]52", "\x07", "\x9b", "\x1b[8m", "\x1b]0;"):
        assert sequence not in text
    assert "\\x1b[2J" in text


def test_emoji_codes_in_what_a_tool_or_an_llm_said_are_shown_as_they_are() -> None:
    """Rich rewrote ":warning:" or ":100:" in a tool's result or arguments (and any text) as emoji: what
    the terminal showed was not what the tool returned."""
    fancy = io.StringIO()
    with make_renderer(fancy, rich=True) as renderer:
        renderer.emit(
            Event("tool_call", name="fs__write", ident="c1", arguments='{"text": "run :rocket: now"}')
        )
        renderer.emit(Event("tool_result", ":warning: disk :100: full", name="fs__write", ident="c1"))
        renderer.emit(Event("assistant", "done :smile:"))
    text = fancy.getvalue()
    for code in (":rocket:", ":warning:", ":100:", ":smile:"):
        assert code in text, text
    assert not any(emoji in text for emoji in ("\U0001f680", "\u26a0", "\U0001f4af", "\U0001f604"))


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (
            {
                "reason": "NotFound",
                "message": "the server could not find the requested resource",
                "details": {},
            },
            "the API server does not know KubeChain's kinds: its CRDs are not installed in this cluster "
            "(kubechain install --crds-only)",
        ),
        (
            {"reason": "NotFound", "message": 'taskruns "r" not found', "details": {"name": "r"}},
            'taskrun "r" not found in namespace "ns"',
        ),
    ],
)
def test_logs_of_a_run_tells_missing_crds_from_a_missing_run(
    monkeypatch: pytest.MonkeyPatch, body: dict[str, Any], said: str
) -> None:
    from collections.abc import Iterator
    from contextlib import contextmanager

    from click.testing import CliRunner

    from kubechain.cli import main
    from kubechain.cli.resources import Target
    from kubechain.kube.errors import error_for

    class Missing:
        def get(self, *_: Any, **__: Any) -> Any:
            raise error_for(404, body)

    @contextmanager
    def connect(self: Target, timeout_s: float = 30.0) -> Iterator[Missing]:
        yield Missing()

    monkeypatch.setattr(Target, "connect", connect)
    result = CliRunner().invoke(main, ["logs", "r", "-n", "ns"])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: {said}"


def test_a_sub_agents_tool_calls_show_only_approvals_and_their_outcome() -> None:
    tracker = ConversationTracker()
    seen = [
        line
        for phase, extra in [
            ("Pending", {}),
            ("AwaitingHumanApproval", {}),
            ("AwaitingHumanApproval", {}),  # the same phase again: said once
            ("ReadyToExecuteApprovedTool", {}),
            ("Running", {}),
            ("Succeeded", {"result": "5"}),
        ]
        for line in lines(tracker.sub_agent_toolcall_events(toolcall("sub-tc-01", phase, **extra)))
    ]
    assert seen == [
        "tool add (sub-agent run calc-abc123) [sub-tc-01] waiting for approval: kubechain approve sub-tc-01",
        "tool add (sub-agent run calc-abc123) [sub-tc-01] ReadyToExecuteApprovedTool",
    ]
    rejected = tracker.sub_agent_toolcall_events(toolcall("sub-tc-02", "ToolCallRejected", result="not now"))
    assert lines(rejected) == ["tool add (sub-agent run calc-abc123) [sub-tc-02] ToolCallRejected: not now"]
