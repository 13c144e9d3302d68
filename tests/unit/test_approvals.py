"""Approvals and humans as tools: the tool_call handler on the in-memory API server + the HumanLayer test server.

Time is a fake clock (re-checks are due by the status, not by sleeping); the re-checks the handler schedules
are recorded instead of sent to Celery, and the tests deliver them by calling the handler again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kubechain.humanlayer.client import HumanLayerAuthError, HumanLayerClient
from kubechain.humanlayer.testserver import HumanLayerTestServer
from kubechain.kube.errors import Unavailable
from kubechain.kube.fake import FakeKubeClient
from kubechain.llm.base import LLMRequest, LLMResponse
from kubechain.mcp.common import MCPError, MCPToolResult
from kubechain.models import MCPServer, TaskRun, TaskRunToolCall, ToolCall, ToolCallFunction
from kubechain.queueing import ResourceMessage, TaskName
from kubechain.settings import Settings
from kubechain.statemachines import approval as machine
from kubechain.statemachines.routing import work_for
from kubechain.statemachines.taskrun import expected_toolcalls, toolcall_name
from kubechain.statemachines.transition import precise_timestamp
from tests.unit.fakes import FakeLLM, context, create, message
from tests.unit.test_toolcall_robustness import (
    HTML,
    LARGEST_WINDOW,
    NEAR_A_WINDOW,
    ClaimAnswerLost,
    etcd_refused,
)
from tests.unit.test_workers_on_fake import ReadGateKube, run_concurrently
from workers.context import WorkerContext
from workers.llm_call import llm_call
from workers.prepare import prepare
from workers.tool_call import tool_call
from workers.transitions import apply_transition
from workers.validators import validate

KEY = "hl-approvals-secret-key"
REQ = "abc1234"  # the turn add_toolcall's calls belong to
TC = toolcall_name("r", REQ, 1)
ARGS = {"url": "https://example.com/page"}


class Clock:
    """The wall clock (called) and a monotonic one, moved on together."""

    def __init__(self) -> None:
        self.now = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
        self.elapsed = 0.0

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.elapsed

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.elapsed += seconds


class FakeMCP:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def resolve(self, server: MCPServer) -> Any:
        return None

    def call_tool(
        self,
        server: MCPServer,
        tool: str,
        arguments: dict[str, Any],
        resolved: Any = None,
        within_s: Any = None,
    ) -> MCPToolResult:
        self.calls.append((server.name, tool, arguments))
        return MCPToolResult(text=f"contents of {arguments.get('url')}")


class CountingAPI:
    """An externalAPI tool endpoint that counts its calls."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                owner.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.send_header("Content-Length", "8")
                self.end_headers()
                self.wfile.write(b"deployed")

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/deploy"


@dataclass
class World:
    kube: FakeKubeClient
    hl: HumanLayerTestServer
    clock: Clock
    mcp: FakeMCP
    scheduled: list[tuple[TaskName, ResourceMessage, float]] = field(default_factory=list)

    def ctx(self, identity: str = "w1", **settings: Any) -> WorkerContext:
        ctx = context(
            self.kube, FakeLLM(lambda r: LLMResponse()), identity, humanlayer_api_base=self.hl.url, **settings
        )
        ctx.clock, ctx.monotonic = self.clock, self.clock.monotonic
        ctx.mcp = self.mcp
        ctx.enqueue = lambda task, msg, countdown: self.scheduled.append((task, msg, countdown))
        return ctx

    def run(self, name: str = TC, identity: str = "w1") -> None:
        tool_call(self.ctx(identity), message("TaskRunToolCall", name))

    def status(self, name: str = TC) -> dict[str, Any]:
        return dict(self.kube.get_raw("taskruntoolcalls", "default", name).get("status") or {})

    def resource_version(self, name: str = TC) -> str:
        return str(self.kube.get_raw("taskruntoolcalls", "default", name)["metadata"]["resourceVersion"])

    def annotate(self, decision: str, comment: str | None = None, name: str = TC) -> None:
        annotations = {machine.APPROVAL_ANNOTATION: decision}
        if comment is not None:
            annotations[machine.APPROVAL_COMMENT_ANNOTATION] = comment
        self.kube.patch_metadata("taskruntoolcalls", "default", name, {"annotations": annotations})

    def events(self, name: str = TC) -> list[str]:
        return self.kube.event_reasons(name)

    def event_messages(self, name: str = TC) -> list[str]:
        return [e["message"] for e in self.kube.events() if e["involvedObject"]["name"] == name]

    def last_countdown(self) -> float:
        assert self.scheduled, "a re-check was scheduled"
        task, msg, countdown = self.scheduled[-1]
        assert task == TaskName.TOOL_CALL and msg.name == TC and msg.reason == machine.RECHECK_REASON
        return countdown

    def calls_to_humanlayer(self) -> list[tuple[str, str]]:
        """HumanLayer requests other than the ContactChannel validation's project lookup."""
        return [r for r in self.hl.requests if not r[1].endswith("/project")]

    def gets(self, kind: str = "function_calls") -> int:
        return self.hl.request_count("GET", f"/humanlayer/v1/{kind}/")


@pytest.fixture
def hl() -> Iterator[HumanLayerTestServer]:
    with HumanLayerTestServer(api_keys={KEY}) as server:
        yield server


def channel(kube: FakeKubeClient, name: str = "approvals") -> None:
    spec = {
        "type": "email",
        "apiKeyFrom": {"secretKeyRef": {"name": "humanlayer", "key": "HUMANLAYER_API_KEY"}},
        "email": {"address": "approver@example.com", "contextAboutUser": "the on-call approver"},
    }
    create(kube, "ContactChannel", "contactchannels", name, spec)


@pytest.fixture
def world(hl: HumanLayerTestServer) -> World:
    """An agent with an MCP server whose tools need approval via the ContactChannel "approvals"."""
    return new_world(hl, FakeKubeClient())


def new_world(hl: HumanLayerTestServer, kube: FakeKubeClient) -> World:
    w = World(kube, hl, Clock(), FakeMCP())
    kube.add_secret("default", "humanlayer", {"HUMANLAYER_API_KEY": KEY})
    channel(kube)
    validate(w.ctx(), message("ContactChannel", "approvals"))
    assert w.kube.get_raw("contactchannels", "default", "approvals")["status"]["ready"] is True
    create(
        kube,
        "MCPServer",
        "mcpservers",
        "fetch",
        {"transport": "stdio", "command": "fetch-server", "approvalContactChannel": {"name": "approvals"}},
    )
    agent = {
        "llmRef": {"name": "gpt-4o"},
        "system": "be careful",
        "mcpServers": [{"name": "fetch"}],
        "humanContactChannels": [{"name": "approvals"}],
    }
    create(kube, "Agent", "agents", "a", agent)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "fetch it"})
    return w


def add_toolcall(w: World, tool: str = "fetch__fetch", arguments: dict[str, Any] | str = ARGS) -> str:
    """A tool call made as the run makes its calls: the run's turn (ToolCallsPending) asks for it, and
    it is created as the run creates it. The first is TC; each adds the next call of the same turn."""
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    run = w.kube.get(TaskRun, "default", "r")
    window = [m.to_wire() for m in run.status.context_window or []]
    if run.status.tool_call_request_id != REQ or not window:
        window = [
            {"role": "system", "content": "be careful"},
            {"role": "user", "content": "fetch it"},
            {"role": "assistant", "content": "", "toolCalls": []},
        ]
    index = len(window[-1]["toolCalls"]) + 1
    window[-1]["toolCalls"].append(
        {"id": f"call-{index}", "type": "function", "function": {"name": tool, "arguments": raw}}
    )
    run = w.kube.patch_status(
        run,
        {
            "phase": "ToolCallsPending",
            "toolCallRequestId": REQ,
            "contextWindow": window,
            "toolCallsCreatedFor": REQ,
        },
    )
    child = expected_toolcalls(run)[index - 1]
    w.kube.create(child)
    return child.name


def awaiting_approval(w: World) -> str:
    add_toolcall(w)
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanApproval" and status["externalCallID"]
    return str(status["externalCallID"])


def test_a_forged_message_cannot_approve_a_call_or_change_its_arguments(world: World) -> None:
    """Anyone who can write to Redis can send a message: it may name the call, carry the call's current
    resourceVersion and a doctored copy of it, but the worker decides from the API server's copy."""
    w = world
    awaiting_approval(w)
    forged = w.kube.get_raw("taskruntoolcalls", "default", TC)
    forged["status"]["phase"] = "ReadyToExecuteApprovedTool"
    forged["spec"]["arguments"] = json.dumps({"url": "https://attacker.example/exfil"})
    payload = message("TaskRunToolCall", TC).model_dump() | {
        "resource_version": forged["metadata"]["resourceVersion"],
        "snapshot": forged,  # what older watchers sent: ignored
    }
    tool_call(w.ctx(), ResourceMessage.model_validate(payload))
    assert w.mcp.calls == [] and w.status()["phase"] == "AwaitingHumanApproval"


# -- approval via HumanLayer -------------------------------------------------------------------------


def test_approved_via_humanlayer_then_executed_once(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    w = world
    add_toolcall(w)
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanApproval" and status["status"] == "Ready"
    assert status["statusDetail"] == "Waiting for human approval via contact channel approvals"
    call_id = status["externalCallID"]
    assert call_id.startswith("kc-") and "claimedBy" not in status and status["startTime"]
    assert w.events() == ["AwaitingHumanApproval", "HumanLayerRequestSent"]
    assert w.event_messages()[0] == "Tool execution requires approval via contact channel approvals"
    request = w.hl.function_call(call_id)
    assert request is not None and request["run_id"] == TC
    assert request["spec"] == {
        "fn": "fetch__fetch",
        "kwargs": ARGS,
        "channel": {
            "email": {"address": "approver@example.com", "context_about_user": "the on-call approver"}
        },
    }
    assert w.last_countdown() == pytest.approx(2.0)

    # A duplicate delivery before the re-check is due does nothing: no HumanLayer call, no write.
    rv = w.resource_version()
    w.run()
    assert w.gets() == 0 and w.resource_version() == rv and w.hl.posts[call_id] == 1

    w.clock.advance(2)
    w.run()
    assert w.gets() == 1 and w.status()["attempts"] == 1 and w.status()["phase"] == "AwaitingHumanApproval"
    assert w.last_countdown() == pytest.approx(2.0)
    w.clock.advance(2)
    w.run()
    assert w.gets() == 2 and w.last_countdown() == pytest.approx(4.0), "back-off: 2 s, 2 s, 4 s, ..."

    w.hl.approve(call_id, "looks safe", user="alice@example.com")
    w.clock.advance(4)
    w.run()
    status = w.status()
    assert status["phase"] == "ReadyToExecuteApprovedTool"
    assert (
        status["statusDetail"]
        == "Ready to execute approved tool (approved via HumanLayer by alice@example.com)"
    )
    assert w.mcp.calls == [], "the approval write and the execution are separate steps"
    # The watcher routes ReadyToExecuteApprovedTool to tool_call at once:
    assert [
        wk.task
        for wk in work_for(
            "TaskRunToolCall", w.kube.get_raw("taskruntoolcalls", "default", TC), w.clock(), 180
        )
    ] == [TaskName.TOOL_CALL]
    w.run()
    w.run()
    status = w.status()
    assert status["phase"] == "Succeeded" and status["result"] == "contents of https://example.com/page"
    assert status["attempts"] == 1
    assert w.mcp.calls == [("fetch", "fetch", ARGS)]
    assert w.events() == [
        "AwaitingHumanApproval",
        "HumanLayerRequestSent",
        "ToolCallApproved",
        "ExecutionSucceeded",
    ]
    assert "Tool call approved via HumanLayer by alice@example.com: looks safe" in w.event_messages()
    assert w.hl.posts[call_id] == 1
    # The API key never shows up in logs, status or events.
    assert (
        KEY not in caplog.text
        and KEY not in json.dumps(status)
        and all(KEY not in m for m in w.event_messages())
    )


def test_rejection_reaches_the_llm_and_the_run_goes_on(world: World) -> None:
    w = world
    answers: list[str] = []

    def answer(request: LLMRequest) -> LLMResponse:
        if request.messages[-1].role == "tool":
            answers.append(request.messages[-1].content)
            return LLMResponse(content=f"Understood: {request.messages[-1].content}")
        return LLMResponse(
            tool_calls=[
                ToolCall(id="c1", function=ToolCallFunction(name="fetch__fetch", arguments=json.dumps(ARGS)))
            ]
        )

    llm = FakeLLM(answer)
    ctx = context(w.kube, llm, humanlayer_api_base=w.hl.url)
    ctx.clock, ctx.mcp = w.clock, w.mcp
    w.kube.add_secret("default", "openai", {"OPENAI_API_KEY": "sk-test"})
    create(w.kube, "LLM", "llms", "gpt-4o", {"provider": "openai"})
    w.kube.patch_status_raw(
        "mcpservers",
        "default",
        "fetch",
        None,
        {"connected": True, "status": "Ready", "tools": [{"name": "fetch"}]},
    )
    validate(ctx, message("LLM", "gpt-4o"))
    validate(ctx, message("Agent", "a"))
    assert w.kube.get_raw("agents", "default", "a")["status"]["ready"] is True
    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    (name,) = [n for (_, plural, _, n) in w.kube.objects if plural == "taskruntoolcalls"]

    w.run(name)
    call_id = w.status(name)["externalCallID"]
    w.hl.reject(call_id, "do not fetch that site")
    w.clock.advance(2)
    w.run(name)
    status = w.status(name)
    assert status["phase"] == "ToolCallRejected" and status["status"] == "Succeeded"
    assert (
        status["statusDetail"] == "Tool execution rejected (rejected via HumanLayer by approver@example.com)"
    )
    assert status["result"] == "do not fetch that site" and status["completionTime"]
    assert w.mcp.calls == []
    w.run(name)  # terminal: nothing more happens
    assert w.mcp.calls == []

    prepare(ctx, message("TaskRun", "r"))
    llm_call(ctx, message("TaskRun", "r"))
    run = w.kube.get_raw("taskruns", "default", "r")["status"]
    assert answers == ["User denied `fetch__fetch` with feedback: do not fetch that site"]
    assert run["phase"] == "FinalAnswer" and run["output"].startswith("Understood: User denied")


@pytest.mark.parametrize("mode", ["503", "drop"])
def test_humanlayer_down_then_recovers(world: World, mode: str) -> None:
    w = world
    w.hl.set_down(mode)
    add_toolcall(w)
    w.run()
    status = w.status()
    assert status["phase"] == "ErrorRequestingHumanApproval" and status["status"] == "Error"
    assert status["error"].startswith("HumanLayer request failed:") and w.hl.url in status["error"]
    assert f"kubechain approve {TC}" in status["statusDetail"], (
        "the detail says how to decide without HumanLayer"
    )
    assert status["attempts"] == 1 and "externalCallID" not in status and "claimedBy" not in status
    assert w.events() == ["AwaitingHumanApproval", "HumanLayerRequestFailed"]
    assert w.last_countdown() == pytest.approx(2.0)
    posts = w.hl.request_count("POST", "/humanlayer/v1/function_calls")

    w.run()  # not due yet
    assert w.hl.request_count("POST", "/humanlayer/v1/function_calls") == posts
    w.clock.advance(2)
    w.run()
    assert w.status()["attempts"] == 2 and w.status()["phase"] == "ErrorRequestingHumanApproval"
    assert w.events().count("HumanLayerRequestFailed") == 1, "the same error is reported once"
    assert w.last_countdown() == pytest.approx(4.0)

    w.hl.set_down(None)
    w.clock.advance(4)
    w.run()
    status = w.status()
    assert (
        status["phase"] == "AwaitingHumanApproval" and status["status"] == "Ready" and "error" not in status
    )
    assert status["statusDetail"] == "Waiting for human approval via contact channel approvals"
    call_id = status["externalCallID"]
    assert w.events()[-1] == "HumanLayerRequestSent"
    w.hl.approve(call_id)
    w.clock.advance(2)
    w.run()
    w.run()
    assert w.status()["phase"] == "Succeeded" and len(w.mcp.calls) == 1


def test_outage_while_waiting_keeps_waiting(world: World) -> None:
    w = world
    call_id = awaiting_approval(w)
    w.hl.set_down("503")
    w.clock.advance(2)
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanApproval" and status["externalCallID"] == call_id
    assert "last check failed" in status["statusDetail"] and "HumanLayerCheckFailed" in w.events()
    w.hl.set_down(None)
    w.hl.approve(call_id)
    w.clock.advance(2)
    w.run()
    assert w.status()["phase"] == "ReadyToExecuteApprovedTool"


def test_an_oversized_humanlayer_answer_is_a_failed_request_then_a_failed_check(world: World) -> None:
    """An answer over the client's bound (an endpoint at a user-set HUMANLAYER_API_BASE sending hundreds of
    MiB) is a bad HumanLayer answer: the request is retried as a failed one, the waiting call keeps
    waiting; both say the answer was over the bound."""
    from kubechain.humanlayer.client import MAX_ANSWER_BYTES

    w = world
    over = f"over {MAX_ANSWER_BYTES:,} bytes"
    w.hl.set_down("oversized")
    add_toolcall(w)
    w.run()
    status = w.status()
    assert status["phase"] == "ErrorRequestingHumanApproval" and status["attempts"] == 1, status
    assert status["error"].startswith("HumanLayer request failed:") and over in status["error"], status
    assert w.events()[-1] == "HumanLayerRequestFailed"
    w.hl.set_down(None)
    w.clock.advance(w.last_countdown())
    w.run()
    call_id = w.status()["externalCallID"]
    w.hl.set_down("oversized")
    w.clock.advance(2)
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanApproval" and status["externalCallID"] == call_id, status
    assert "last check failed" in status["statusDetail"] and over in status["statusDetail"], status
    assert "HumanLayerCheckFailed" in w.events()


@pytest.mark.parametrize(
    ("breakage", "reason", "error"),
    [
        ("no-channel", "NoContactChannel", 'ContactChannel "approvals" not found'),
        ("not-ready", "NoContactChannel", 'ContactChannel "approvals" is not ready'),
        ("no-key", "NoAPIKey", 'failed to get the HumanLayer API key of ContactChannel "approvals"'),
    ],
)
def test_channel_problems_are_errors_requesting_approval(
    world: World, breakage: str, reason: str, error: str
) -> None:
    w = world
    if breakage == "no-channel":
        w.kube.delete("contactchannels", "default", "approvals")
    elif breakage == "not-ready":
        w.kube.patch_status_raw(
            "contactchannels", "default", "approvals", None, {"ready": False, "status": "Error"}
        )
    else:
        w.kube.request("DELETE", "/api/v1/namespaces/default/secrets/humanlayer")
    add_toolcall(w)
    w.run()
    status = w.status()
    assert status["phase"] == "ErrorRequestingHumanApproval" and status["error"].startswith(error)
    assert w.events() == [reason]
    assert w.hl.request_count("POST", "/humanlayer/v1/function_calls") == 0
    # A kubectl decision still works while HumanLayer cannot be asked, and is routed at once.
    w.annotate("approved")
    raw = w.kube.get_raw("taskruntoolcalls", "default", TC)
    assert [wk.reason for wk in work_for("TaskRunToolCall", raw, w.clock(), 180)] == ["approval-annotation"]
    w.run()
    assert w.status()["phase"] == "ReadyToExecuteApprovedTool"


def test_humanlayer_losing_the_call_means_asking_again(world: World) -> None:
    w = world
    call_id = awaiting_approval(w)
    w.hl.function_calls.clear()
    for _ in range(machine.NOT_FOUND_CHECKS_BEFORE_RESEND - 1):  # not found (yet): counted, not resent
        w.clock.advance(w.last_countdown())
        w.run()
        assert w.hl.posts[call_id] == 1
    w.clock.advance(w.last_countdown())
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanApproval" and status["externalCallID"] == call_id
    assert w.hl.function_call(call_id) is not None and w.hl.posts[call_id] == 2


@pytest.mark.slow
def test_a_humanlayer_that_never_finds_the_request_is_not_sent_it_every_two_seconds(world: World) -> None:
    """Each 404 on a status check sent the request again, and the next check was due 2 s later: a POST
    and an Event every 2 s for ever."""
    w = world
    call_id = awaiting_approval(w)
    started = w.clock()
    while w.clock() - started < timedelta(minutes=10):
        w.hl.function_calls.clear()  # HumanLayer (or a proxy in front of it) never finds it
        w.clock.advance(w.last_countdown())
        w.run()
    assert w.hl.posts[call_id] <= 25, w.hl.posts  # ~2 a minute, not 300


def test_concurrent_deliveries_send_one_request(hl: HumanLayerTestServer) -> None:
    kube = ReadGateKube()
    w = new_world(hl, kube)
    add_toolcall(w)
    # All six read the new tool call (one resourceVersion) before any of them writes its claim.
    with kube.gate("taskruntoolcalls", TC, 6):
        run_concurrently([partial(w.run, identity=f"w{i}") for i in range(6)])
    status = w.status()
    assert status["phase"] == "AwaitingHumanApproval"
    assert w.hl.posts == {status["externalCallID"]: 1}
    assert w.events() == ["AwaitingHumanApproval", "HumanLayerRequestSent"]
    assert len(kube.first_read_rvs) == 6 and len(set(kube.first_read_rvs)) == 1, (
        "all six decided on one version"
    )
    assert kube.conflicts >= 5, "the five losing claims conflicted"


def test_concurrent_rechecks_die_out(world: World) -> None:
    """Resync and scheduled re-checks may pile up; only a due one asks HumanLayer, and its write makes the
    others early, so they neither ask nor schedule another."""
    w = world
    awaiting_approval(w)
    w.clock.advance(2)
    before = len(w.scheduled)
    for _ in range(5):
        w.run()
    assert w.gets() == 1 and len(w.scheduled) == before + 1


def test_a_dead_requester_is_taken_over_after_the_claim_timeout(world: World) -> None:
    w = world
    add_toolcall(w)
    toolcall = w.kube.get(TaskRunToolCall, "default", TC)
    claimed = apply_transition(
        w.ctx(),
        toolcall,
        machine.plan_ask_claim(toolcall, machine.APPROVAL, "approvals", "dead-worker", w.clock()),
    )
    # The dead worker even got its request through before dying.
    call_id = machine.call_id(claimed)
    w.hl._handle(
        "POST",
        "/humanlayer/v1/function_calls",
        f"Bearer {KEY}",
        {
            "run_id": TC,
            "call_id": call_id,
            "spec": {
                "fn": "fetch__fetch",
                "kwargs": ARGS,
                "channel": {
                    "email": {"address": "approver@example.com", "context_about_user": "the on-call approver"}
                },
            },
        },
    )
    w.run()
    assert w.status()["claimedBy"] == "dead-worker", "a fresh claim is respected"
    w.clock.advance(machine.REQUEST_CLAIM_TIMEOUT_S + 1)
    w.run()
    status = w.status()
    assert (
        status["phase"] == "AwaitingHumanApproval"
        and status["externalCallID"] == call_id
        and "claimedBy" not in status
    )
    assert len(w.hl.function_calls) == 1, "the retried request is the same HumanLayer call"
    assert w.hl.posts[call_id] == 1, "looked up, not sent again (nor left to HumanLayer to deduplicate)"


class ThrottledSecretReads(FakeKubeClient):
    """Once armed, reading the HumanLayer Secret takes longer than a request claim lasts (an API server
    shedding load: each 429 may be waited out up to 5 x 10 s); records the request claims written."""

    def __init__(self) -> None:
        super().__init__()
        self.clock: Clock | None = None
        self.claims: list[dict[str, Any]] = []

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        if self.clock is not None and method == "GET" and path.endswith("/secrets/humanlayer"):
            self.clock.advance(machine.REQUEST_CLAIM_TIMEOUT_S + 1)
        status = (kwargs.get("body") or {}).get("status") or {}
        if method in ("PATCH", "PUT") and status.get("claimedBy"):
            self.claims.append(dict(status))
        return super().request(method, path, **kwargs)


def test_a_request_claim_is_stamped_after_the_channel_and_its_secret_were_read(
    hl: HumanLayerTestServer,
) -> None:
    """The claim's time was taken before the ContactChannel and its Secret were read (uncached): after a
    slow read it was already expired when written, and a second worker (a resync) could take it over and
    send the request concurrently."""
    kube = ThrottledSecretReads()
    w = new_world(hl, kube)
    add_toolcall(w)
    kube.clock = w.clock
    w.run()
    (claim,) = kube.claims
    assert claim["claimedAt"] == precise_timestamp(w.clock()), "stamped when written, after the reads"
    claimed = TaskRunToolCall.model_validate(
        {**kube.get_raw("taskruntoolcalls", "default", TC), "status": claim}
    )
    assert machine.request_in_flight(claimed, w.clock()), "another worker leaves it to its holder"
    assert w.status()["phase"] == "AwaitingHumanApproval" and w.hl.posts == {w.status()["externalCallID"]: 1}


class SlowFirstEvent(FakeKubeClient):
    """Once armed, the next Event POST takes the API client's whole read timeout; records the request
    claims written."""

    def __init__(self) -> None:
        super().__init__()
        self.clock: Clock | None = None
        self.claims: list[dict[str, Any]] = []

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        if self.clock is not None and method == "POST" and path.endswith("/events"):
            self.clock.advance(Settings().kube_timeout_s)
            self.clock = None
        status = (kwargs.get("body") or {}).get("status") or {}
        if method in ("PATCH", "PUT") and status.get("claimedBy"):
            self.claims.append(dict(status))
        return super().request(method, path, **kwargs)


def test_a_request_claim_whose_event_took_long_is_acted_on_without_another_write(
    hl: HumanLayerTestServer,
) -> None:
    """The claim's Event, posted inline, waited out the API client's read timeout (30 s): the request is
    sent once under that claim, without a fresh stamp (which would add writes where they cost most). A
    second worker that took the claim over would look the request up before sending (it is found)."""
    kube = SlowFirstEvent()
    w = new_world(hl, kube)
    add_toolcall(w)
    kube.clock = w.clock
    w.run()
    assert kube.clock is None, "the claim's Event was posted"
    assert len(kube.claims) == 1, "one claim write"
    assert w.status()["phase"] == "AwaitingHumanApproval" and w.hl.posts == {w.status()["externalCallID"]: 1}
    assert w.events().count("AwaitingHumanApproval") == 1, "the claim's Event is posted once"


@pytest.mark.parametrize("contact", [False, True], ids=["approval", "human-contact"])
def test_a_request_claim_left_in_doubt_is_sent_under_at_once_by_the_retry_in_this_process(
    hl: HumanLayerTestServer, contact: bool
) -> None:
    """The claim landed, its answer and every read-back lost: Celery's retry in this process found its own
    claim in flight and left it (and the call) until it expired and the next resync came."""
    phase = "AwaitingHumanInput" if contact else "AwaitingHumanApproval"
    kube = ClaimAnswerLost(phase, down=10**6)
    w = new_world(hl, kube)
    if contact:
        add_toolcall(w, "approvals__human_contact_email", {"message": "ok?"})
    else:
        add_toolcall(w)
    ctx = w.ctx()
    ctx.sleep = lambda _s: None
    with pytest.raises(Unavailable):
        tool_call(ctx, message("TaskRunToolCall", TC))
    kube.down = 0
    assert w.status()["claimedBy"] == "w1" and w.hl.posts == {}
    tool_call(ctx, message("TaskRunToolCall", TC))  # Celery's retry, at once
    assert w.status()["phase"] == phase and w.hl.posts == {w.status()["externalCallID"]: 1}
    assert w.events().count("AwaitingHumanContact" if contact else "AwaitingHumanApproval") == 1


@pytest.mark.parametrize("contact", [False, True], ids=["approval", "human-contact"])
def test_a_request_claim_in_flight_elsewhere_is_checked_again_when_it_expires(
    hl: HumanLayerTestServer, contact: bool
) -> None:
    """A worker that finds another's request claim (maybe one left in doubt by a worker that could not
    confirm it) came back only with the next resync, up to a minute after the claim expired."""
    w = new_world(hl, FakeKubeClient())
    if contact:
        add_toolcall(w, "approvals__human_contact_email", {"message": "ok?"})
    else:
        add_toolcall(w)
    call = w.kube.get(TaskRunToolCall, "default", TC)
    phase = "AwaitingHumanInput" if contact else "AwaitingHumanApproval"
    claimed_at = w.clock.now - timedelta(seconds=10)
    w.kube.patch_status(call, {"phase": phase, "claimedBy": "w9", "claimedAt": precise_timestamp(claimed_at)})
    w.run(identity="w2")
    assert w.hl.posts == {} and w.last_countdown() == pytest.approx(machine.REQUEST_CLAIM_TIMEOUT_S - 10)
    w.clock.advance(w.last_countdown())
    w.run(identity="w2")  # the re-check
    assert w.hl.posts == {w.status()["externalCallID"]: 1}


# -- approval with kubectl ---------------------------------------------------------------------------


@pytest.fixture
def counting_api() -> Iterator[CountingAPI]:
    api = CountingAPI()
    yield api
    api.server.shutdown()


def without_approval(w: World) -> None:
    """The fetch MCP server's tools run without asking anyone."""
    w.kube.request(
        "PATCH",
        "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/mcpservers/fetch",
        body={"spec": {"approvalContactChannel": None}},
    )


def deploy_tool(w: World, external_api: dict[str, Any]) -> None:
    """The Agent's only Tool, "deploy" (an externalAPI call), and a call of it with version 1.2.3."""
    tool = {"name": "deploy", "toolType": "externalAPI", "execute": {"externalAPI": external_api}}
    create(w.kube, "Tool", "tools", "deploy", tool)
    w.kube.request(
        "PATCH",
        "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/agents/a",
        body={"spec": {"tools": [{"name": "deploy"}]}},
    )
    add_toolcall(w, "deploy", {"version": "1.2.3"})


def kubectl_only(w: World, api: CountingAPI) -> None:
    """A Tool with requiresApproval: no channel, decided with kubectl."""
    deploy_tool(w, {"url": api.url, "method": "POST", "requiresApproval": True})


def test_kubectl_approval_of_a_tool_without_channel(world: World, counting_api: CountingAPI) -> None:
    w = world
    kubectl_only(w, counting_api)
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanApproval" and "externalCallID" not in status
    assert f"kubechain approve {TC}" in status["statusDetail"]
    assert (
        f"kubectl annotate taskruntoolcall {TC} kubechain.humanlayer.dev/approval=approved"
        in status["statusDetail"]
    )
    assert w.events() == ["AwaitingHumanApproval"] and w.scheduled == [] and w.calls_to_humanlayer() == []
    rv = w.resource_version()
    w.run()
    assert w.resource_version() == rv, "waiting writes nothing"
    raw = w.kube.get_raw("taskruntoolcalls", "default", TC)
    assert work_for("TaskRunToolCall", raw, w.clock(), 180) == [], (
        "without a decision only the resync looks at it"
    )

    w.annotate("approved", "ship it")
    raw = w.kube.get_raw("taskruntoolcalls", "default", TC)
    (work,) = work_for("TaskRunToolCall", raw, w.clock(), 180)
    assert work.task == TaskName.TOOL_CALL and work.reason == "approval-annotation"
    w.run()
    status = w.status()
    assert status["phase"] == "ReadyToExecuteApprovedTool"
    assert status["statusDetail"] == "Ready to execute approved tool (approved via kubectl)"
    assert "Tool call approved via kubectl: ship it" in w.event_messages()
    w.run()
    assert w.status()["phase"] == "Succeeded" and w.status()["result"] == "deployed"
    assert counting_api.bodies == [{"version": "1.2.3"}]


@pytest.mark.parametrize(
    ("comment", "result"), [("wrong version", "wrong version"), (None, machine.NO_FEEDBACK)]
)
def test_kubectl_rejection(world: World, counting_api: CountingAPI, comment: str | None, result: str) -> None:
    w = world
    kubectl_only(w, counting_api)
    w.run()
    w.annotate("rejected", comment)
    w.run()
    status = w.status()
    assert status["phase"] == "ToolCallRejected" and status["status"] == "Succeeded"
    assert (
        status["statusDetail"] == "Tool execution rejected (rejected via kubectl)"
        and status["result"] == result
    )
    assert counting_api.bodies == []


def test_kubectl_decision_on_a_humanlayer_call(world: World) -> None:
    w = world
    call_id = awaiting_approval(w)
    w.annotate("approved")
    w.run()  # the annotation is routed at once; no need to wait for the re-check to be due
    assert w.status()["statusDetail"] == "Ready to execute approved tool (approved via kubectl)"
    assert w.gets() == 0
    w.hl.reject(call_id, "too late")
    w.run()
    assert w.status()["phase"] == "Succeeded" and len(w.mcp.calls) == 1


def test_second_decision_is_ignored(world: World) -> None:
    w = world
    call_id = awaiting_approval(w)
    w.hl.approve(call_id, "yes")
    w.clock.advance(2)
    w.run()
    assert w.status()["phase"] == "ReadyToExecuteApprovedTool"
    # A kubectl rejection arriving after the recorded approval changes nothing.
    w.annotate("rejected", "no!")
    raw = w.kube.get_raw("taskruntoolcalls", "default", TC)
    assert [wk.task for wk in work_for("TaskRunToolCall", raw, w.clock(), 180)] == [TaskName.TOOL_CALL]
    w.run()
    status = w.status()
    assert status["phase"] == "Succeeded" and status["result"] == "contents of https://example.com/page"
    w.annotate("approved")
    w.run()
    assert w.status() == status and len(w.mcp.calls) == 1
    assert w.events().count("ToolCallApproved") == 1 and "ToolCallRejected" not in w.events()


@pytest.mark.parametrize("approved", [True, False])
def test_a_humanlayer_responder_named_at_great_length_is_named_briefly(world: World, approved: bool) -> None:
    """Who decided is HumanLayer's to say (user_info), and it went into the statusDetail whole: a name of
    2 MB (a malformed answer, a proxy's page) made the decision's write too large for etcd at every
    check, and the call waited for good with its decision made."""
    w = world
    call_id = awaiting_approval(w)
    who = "x" * 2_000_000 + "\nsecond line"
    w.hl.respond_to_function_call(call_id, approved, "fine", who)
    w.clock.advance(2)
    w.run()
    status = w.status()
    assert status["phase"] == ("ReadyToExecuteApprovedTool" if approved else "ToolCallRejected")
    assert len(status["statusDetail"]) < 300 and "\n" not in status["statusDetail"]
    assert "by xxxxxxxx" in status["statusDetail"]
    assert all(len(m) < 1100 for m in w.event_messages())


def test_unknown_annotation_value_is_not_a_decision(world: World) -> None:
    w = world
    awaiting_approval(w)
    w.annotate("maybe")
    w.run()
    assert w.status()["phase"] == "AwaitingHumanApproval"


@pytest.mark.parametrize("value", ["approve", "reject", "yes"])
def test_an_annotation_value_that_is_not_a_decision_is_said_to_be_ignored(world: World, value: str) -> None:
    """`kubectl annotate ... approval=approve` (the CLI's verb, not the value) decided nothing, and
    nothing said so: the person who set it took the call for approved while it waited on."""
    w = world
    awaiting_approval(w)
    w.annotate(value)
    w.run()
    w.run()  # a second delivery (or the resync) says it again no more
    assert w.status()["phase"] == "AwaitingHumanApproval"
    assert w.events().count("ApprovalAnnotationIgnored") == 1
    (said,) = [m for m in w.event_messages() if value in m and "approval" in m]
    assert f'"{value}" is not a decision' in said and '"approved" or "rejected"' in said
    w.annotate("Approved ")  # corrected (a case or a space aside): decided
    w.run()
    assert w.status()["phase"] == "ReadyToExecuteApprovedTool"


def test_a_kubectl_only_wait_shows_an_ignored_annotation_value(
    world: World, counting_api: CountingAPI
) -> None:
    w = world
    kubectl_only(w, counting_api)
    w.run()
    w.annotate("approve")
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanApproval"
    assert 'approval="approve" is not a decision' in status["statusDetail"]
    assert w.events() == ["AwaitingHumanApproval", "ApprovalAnnotationIgnored"]
    w.annotate("approved")
    w.run()
    w.run()
    assert w.status()["phase"] == "Succeeded" and counting_api.bodies == [{"version": "1.2.3"}]


def test_invalid_arguments_are_not_sent_for_approval(world: World) -> None:
    w = world
    add_toolcall(w, arguments="{not json")
    w.run()
    status = w.status()
    assert status["phase"] == "Failed" and status["statusDetail"] == "Invalid arguments JSON"
    assert w.calls_to_humanlayer() == [] and w.mcp.calls == []


def test_tools_without_approval_run_directly(world: World) -> None:
    w = world
    without_approval(w)
    add_toolcall(w)
    w.run()
    assert w.status()["phase"] == "Succeeded" and w.calls_to_humanlayer() == []
    assert w.status()["statusDetail"] == "MCP tool executed successfully"  # the original's text


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (MCPToolResult(text="no such page", is_error=True), "tool execution error: no such page"),
        (MCPError("timed out after 30s calling fetch"), "timed out after 30s calling fetch"),
    ],
    ids=["tool-error-result", "server-error"],
)
def test_a_failed_mcp_call_says_so_with_the_originals_detail(
    world: World, monkeypatch: pytest.MonkeyPatch, failure: MCPToolResult | MCPError, error: str
) -> None:
    w = world
    without_approval(w)

    def call_tool(
        server: MCPServer, tool: str, arguments: dict[str, Any], resolved: Any = None, within_s: Any = None
    ) -> MCPToolResult:
        if isinstance(failure, Exception):
            raise failure
        return failure

    monkeypatch.setattr(w.mcp, "call_tool", call_tool)
    add_toolcall(w)
    w.run()
    status = w.status()
    assert status["phase"] == "Failed" and status["error"] == error
    assert status["statusDetail"] == f"MCP tool execution failed: {error}"


# -- humans as tools ---------------------------------------------------------------------------------


def test_human_contact_round_trip(world: World) -> None:
    w = world
    add_toolcall(w, "approvals__human_contact_email", {"message": "What is the budget for Q3?"})
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanInput" and status["status"] == "Ready"
    assert status["statusDetail"] == "Waiting for human input via contact channel approvals"
    call_id = status["externalCallID"]
    contact = w.hl.contact_requests[call_id]
    assert contact["run_id"] == TC
    assert contact["spec"] == {
        "msg": "What is the budget for Q3?",
        "channel": {
            "email": {"address": "approver@example.com", "context_about_user": "the on-call approver"}
        },
    }
    assert w.events() == ["AwaitingHumanContact", "HumanLayerRequestSent"]
    assert w.last_countdown() == pytest.approx(2.0)
    w.clock.advance(2)
    w.run()
    assert w.gets("contact_requests") == 1 and w.status()["phase"] == "AwaitingHumanInput"
    w.hl.respond(call_id, "42k, but ask finance first", user="bob@example.com")
    w.clock.advance(2)
    w.run()
    status = w.status()
    assert status["phase"] == "Succeeded" and status["result"] == "42k, but ask finance first"
    assert status["statusDetail"] == "Human responded via contact channel approvals"
    assert w.events()[-1] == "HumanResponded"
    w.run()
    assert w.hl.posts == {call_id: 1} and w.gets("contact_requests") == 2


@pytest.mark.parametrize("phase", ["AwaitingHumanApproval", "ReadyToExecuteApprovedTool", "AwaitingSubAgent"])
def test_a_call_whose_tool_now_asks_a_human_fails_instead_of_waiting_forever(
    world: World, phase: str
) -> None:
    """The call waits in another kind's phase (its Tool was changed to a human contact meanwhile): the
    contact flow ignored it, and so did everything else, at every resync, for good."""
    w = world
    add_toolcall(w, "approvals__human_contact_email", {"message": "What is the budget for Q3?"})
    w.kube.patch_status_raw("taskruntoolcalls", "default", TC, None, {"phase": phase})
    w.run()
    status = w.status()
    assert status["phase"] == "Failed", status
    assert 'tool "approvals__human_contact_email" now asks a human' in status["error"]
    assert w.hl.contact_requests == {}, "no human was asked"


@pytest.mark.parametrize("claim_age_s, phase", [(5, "Running"), (3600, "Failed")], ids=["live", "lost"])
def test_a_running_call_whose_tool_now_asks_a_human_is_ended_once_its_worker_is_lost(
    world: World, claim_age_s: float, phase: str
) -> None:
    """It ran as another kind of tool (an MCP server's, renamed into a channel since); the contact flow
    ignored a Running call, so one whose worker died stayed Running for good. A live claim is left alone."""
    w = world
    add_toolcall(w, "approvals__human_contact_email", {"message": "What is the budget for Q3?"})
    claimed_at = w.clock.now - timedelta(seconds=claim_age_s)
    running = {"phase": "Running", "claimedBy": "lost-worker", "claimedAt": precise_timestamp(claimed_at)}
    w.kube.patch_status_raw("taskruntoolcalls", "default", TC, None, running | {"attempts": 1})
    w.run()
    status = w.status()
    assert status["phase"] == phase, status
    if phase == "Failed":
        assert "(lost-worker) was lost mid-execution" in status["error"] and status.get("claimedBy") is None
    assert w.calls_to_humanlayer() == [], "no human was asked"


def test_a_question_whose_channel_was_deleted_fails_instead_of_waiting_forever(world: World) -> None:
    w = world
    add_toolcall(w, "approvals__human_contact_email", {"message": "What is the budget for Q3?"})
    w.run()
    assert w.status()["phase"] == "AwaitingHumanInput"
    w.kube.request(
        "DELETE", "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/contactchannels/approvals"
    )
    w.clock.advance(2)
    w.run()
    status = w.status()
    assert status["phase"] == "Failed"
    assert status["error"] == (
        'the human contact request can no longer be answered: ContactChannel "approvals" not found'
    )
    assert w.events()[-1] == "NoContactChannel"


def test_human_contact_needs_a_message(world: World) -> None:
    w = world
    add_toolcall(w, "approvals__human_contact_email", {"question": "?"})
    w.run()
    status = w.status()
    assert status["phase"] == "Failed" and 'non-empty "message"' in status["error"]
    assert w.calls_to_humanlayer() == []


@pytest.mark.parametrize(
    ("down", "limit", "at_least_s"),
    [
        ("503", machine.HUMAN_CONTACT_MAX_ATTEMPTS_IN_OUTAGE, 15 * 60),
        ("revoked", machine.HUMAN_CONTACT_MAX_ATTEMPTS, 0),
    ],
    ids=["outage-ridden-out", "refusal-fails-sooner"],
)
@pytest.mark.slow
def test_human_contact_fails_after_repeated_failures(
    world: World, down: str, limit: int, at_least_s: float
) -> None:
    """An outage of HumanLayer (5xx) is waited out far longer than a refusal (a revoked key)."""
    w = world
    if down == "revoked":
        w.hl.set_api_keys({"another-key"})  # 401 for ours
    else:
        w.hl.set_down(down)
    add_toolcall(w, "approvals__human_contact_email", {"message": "anyone there?"})
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanInput" and status["status"] == "Error" and status["attempts"] == 1
    assert status["error"].startswith("HumanLayer request failed:")
    waited = 0.0
    for attempt in range(2, limit):
        waited += w.last_countdown()
        w.clock.advance(w.last_countdown())
        w.run()
        assert w.status()["attempts"] == attempt and w.status()["phase"] == "AwaitingHumanInput"
    waited += w.last_countdown()
    w.clock.advance(w.last_countdown())
    w.run()
    assert waited >= at_least_s, waited
    status = w.status()
    assert status["phase"] == "Failed" and status["status"] == "Error"
    assert status["error"].startswith(
        f"could not contact a human via contact channel approvals after {limit} attempts"
    )
    assert w.events().count("HumanLayerRequestFailed") == 2, "first failure and the final one"


def test_a_question_whose_ready_channel_meets_a_host_that_does_not_resolve_waits_it_out_as_an_outage(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The channel is Ready: HumanLayer was reached under these settings until now, and a host that does
    not resolve is more likely a brief DNS blip (CoreDNS answering NXDOMAIN while an in-cluster Service's
    pods restart) than a typo. The question was given the short budget of a refused one; it waits the
    outage budget, its error saying what to check. (A typo is found by the channel's validation, which
    is Error when it meets it while not Ready, and a question asked via a channel in Error fails.)"""
    import socket

    import httpx

    w = world
    cause = socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def fail(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(str(cause), request=request) from cause

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", fail)
    add_toolcall(w, "approvals__human_contact_email", {"message": "anyone there?"})
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanInput" and status["status"] == "Error", status
    assert "check the host in HUMANLAYER_API_BASE" in status["error"], status["error"]
    assert f"(attempt 1 of {machine.HUMAN_CONTACT_MAX_ATTEMPTS_IN_OUTAGE};" in status["statusDetail"], status


def test_a_ready_channel_whose_api_base_cannot_be_used_is_validated_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A HUMANLAYER_API_BASE mistyped after the channel was Ready: its questions waited the outage budget
    (~18 minutes) each and the channel stayed Ready, since only channels not Ready are validated again by
    the resync. The request that meets it validates the channel again (at most once a window), which
    writes it Pending, then Error at the resync's next validation if it goes on."""
    import socket

    import httpx

    w = world
    cause = socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def fail(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(str(cause), request=request) from cause

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", fail)
    names = [add_toolcall(w, "approvals__human_contact_email", {"message": f"q{i}"}) for i in range(3)]
    for name in names:
        w.run(name)
    assert _deliver_validates(w, set()) == 1  # one for the three requests, not one each
    channel = w.kube.get_raw("contactchannels", "default", "approvals")["status"]
    assert channel["ready"] is False and channel["status"] == "Pending", channel
    assert "check the host in HUMANLAYER_API_BASE" in channel["statusDetail"], channel


def test_human_contact_recovers_after_an_outage(world: World) -> None:
    w = world
    w.hl.set_down("drop")
    add_toolcall(w, "approvals__human_contact_email", {"message": "anyone there?"})
    w.run()
    assert w.status()["status"] == "Error"
    w.hl.set_down(None)
    w.clock.advance(w.last_countdown())
    w.run()
    status = w.status()
    assert (
        status["phase"] == "AwaitingHumanInput" and status["status"] == "Ready" and status["externalCallID"]
    )


# -- pure pieces -------------------------------------------------------------------------------------


def test_recheck_delays_back_off_to_a_minute_then_after_an_hour_to_five() -> None:
    """Each check writes the status (attempts, claimedAt): a minute apart for ever, 1,000 calls waiting
    for people were ~17 status writes a second for as long as they waited."""
    assert [machine.recheck_delay(n) for n in range(8)] == [2, 2, 4, 8, 16, 32, 60, 60]
    first_long = next(n for n in range(1000) if machine.recheck_delay(n) > 60)
    waited = sum(machine.recheck_delay(n) for n in range(first_long))
    assert 3600 <= waited < 3600 + 60, "a minute apart for the first hour"
    long_ones = [machine.recheck_delay(n) for n in range(first_long, first_long + 4)]
    assert long_ones == [120, 240, 300, 300]
    # a human who answers the next day (the exponent capped: 2.0 ** 1024 overflows)
    assert machine.recheck_delay(1025) == machine.recheck_delay(100_000) == 300


@pytest.mark.slow
def test_a_call_waiting_for_hours_is_checked_every_five_minutes_after_the_first_hour(world: World) -> None:
    w = world
    call_id = awaiting_approval(w)
    started = w.clock()
    while w.clock() - started < timedelta(hours=3):
        w.clock.advance(w.last_countdown())
        w.run()
    checks = w.gets()
    assert checks <= 65 + 2 * 12 + 2, checks  # ~65 in the first hour, then 12 an hour (180 a minute apart)
    assert w.last_countdown() == pytest.approx(300)
    w.hl.approve(call_id)
    w.clock.advance(w.last_countdown())
    w.run()
    assert w.status()["phase"] == "ReadyToExecuteApprovedTool"


def test_call_ids_are_deterministic_and_short() -> None:
    one = TaskRunToolCall.from_wire(
        {
            "metadata": {"name": "x" * 63, "uid": "u-1"},
            "spec": {
                "toolCallId": "c",
                "taskRunRef": {"name": "r"},
                "toolRef": {"name": "t"},
                "arguments": "{}",
            },
        }
    )
    two = TaskRunToolCall.from_wire(
        {
            "metadata": {"name": "y", "uid": "u-1"},
            "spec": {
                "toolCallId": "c",
                "taskRunRef": {"name": "r"},
                "toolRef": {"name": "t"},
                "arguments": "{}",
            },
        }
    )
    assert machine.call_id(one) == machine.call_id(two) and len(machine.call_id(one)) == 13
    assert len(machine.run_id(one)) + len(machine.call_id(one)) == 64


@pytest.mark.parametrize(
    "status",
    [{"approved": "false"}, {"approved": 1}, "pending"],
    ids=["string-false", "number", "string-status"],
)
def test_a_malformed_humanlayer_answer_is_a_failed_check_not_a_decision(world: World, status: Any) -> None:
    w = world
    call_id = awaiting_approval(w)
    w.hl.function_calls[call_id]["status"] = status
    w.clock.advance(2)
    w.run()
    current = w.status()
    assert current["phase"] == "AwaitingHumanApproval", "only an explicit true approves"
    assert "HumanLayer answered with a malformed" in current["statusDetail"]
    assert "HumanLayerCheckFailed" in w.events()


def test_an_api_key_an_http_header_cannot_carry_is_a_clear_error(world: World) -> None:
    w = world
    secret = "hl-s\u00e9cret"
    w.kube.request("DELETE", "/api/v1/namespaces/default/secrets/humanlayer")
    w.kube.add_secret("default", "humanlayer", {"HUMANLAYER_API_KEY": secret})
    validate(w.ctx(), message("ContactChannel", "approvals"))
    status = w.kube.get_raw("contactchannels", "default", "approvals")["status"]
    assert status["ready"] is False and "cannot carry" in status["statusDetail"]
    add_toolcall(w)
    w.run()
    current = w.status()
    assert current["phase"] == "ErrorRequestingHumanApproval" and "cannot carry" in current["error"]
    assert not current.get("claimedBy"), "the claim is released with the failure"
    texts = [json.dumps(current), *w.event_messages()]
    assert not any(secret in text for text in texts)


def test_a_request_humanlayer_forgot_is_sent_again_with_its_full_attempts(world: World) -> None:
    w = world
    add_toolcall(w, "approvals__human_contact_email", {"message": "anyone there?"})
    w.run()
    for _ in range(machine.HUMAN_CONTACT_MAX_ATTEMPTS + 1):  # more checks than a send may fail
        w.clock.advance(w.last_countdown())
        w.run()
    checked = TaskRunToolCall.from_wire(w.kube.get_raw("taskruntoolcalls", "default", TC))
    assert (checked.status.attempts or 0) > machine.HUMAN_CONTACT_MAX_ATTEMPTS
    # HumanLayer forgot the request: it is claimed to be sent again, and that send then fails once.
    claim = machine.plan_ask_claim(checked, machine.CONTACT, "approvals", "w1", w.clock())
    assert claim.status["attempts"] == 0, "the checks before HumanLayer forgot it are not failed sends"
    resend = checked.model_copy(update={"status": checked.status.model_copy(update={"attempts": 0})})
    failed = machine.plan_contact_failed(
        resend, "approvals", "HumanLayer request failed: 503", "X", w.clock()
    )
    assert failed.status["phase"] == "AwaitingHumanInput" and failed.status["attempts"] == 1


@pytest.mark.parametrize("reply", ["missing", "empty"])
def test_a_humanlayer_reply_without_a_call_id_is_asked_once_under_the_deterministic_id(
    world: World, monkeypatch: pytest.MonkeyPatch, reply: str
) -> None:
    """The original stored the call id HumanLayer answered with; an empty one made every pass ask again
    (known bug 12)."""
    w = world
    handle = w.hl._handle

    def without_call_id(method: str, path: str, auth: str | None, body: Any) -> tuple[int, Any]:
        status, payload = handle(method, path, auth, body)
        if method == "POST" and path.endswith("/function_calls") and isinstance(payload, dict):
            payload = {k: v for k, v in payload.items() if k != "call_id"}
            if reply == "empty":
                payload["call_id"] = ""
        return status, payload

    monkeypatch.setattr(w.hl, "_handle", without_call_id)
    add_toolcall(w)
    expected = machine.call_id(TaskRunToolCall.from_wire(w.kube.get_raw("taskruntoolcalls", "default", TC)))
    for _ in range(4):
        w.run()
        assert w.status()["phase"] == "AwaitingHumanApproval"
        w.clock.advance(w.last_countdown())
    assert w.hl.request_count("POST", "/humanlayer/v1/function_calls") == 1, "asked once, not every pass"
    assert w.hl.posts == {expected: 1} and w.gets() == 3, "later passes check the request"
    assert w.status()["externalCallID"] == expected
    assert w.events() == ["AwaitingHumanApproval", "HumanLayerRequestSent"]

    w.hl.approve(expected)
    w.run()
    w.run()
    assert w.status()["phase"] == "Succeeded" and len(w.mcp.calls) == 1


# -- Secrets read before the claim ------------------------------------------------------------------


def test_an_mcp_secret_read_failing_for_a_moment_leaves_the_call_unclaimed_for_a_retry(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world
    without_approval(w)
    reads: list[str] = []

    def resolve(server: MCPServer) -> str:
        reads.append(server.name)
        if len(reads) == 1:
            cause = Unavailable(503, "ServiceUnavailable", "etcdserver: leader changed")
            raise MCPError(f'cannot resolve env var "TOKEN" from secret "fetch": {cause}') from cause
        return "the resolved spec"

    monkeypatch.setattr(w.mcp, "resolve", resolve)
    add_toolcall(w)
    with pytest.raises(Unavailable):  # the task's autoretry takes it from here
        w.run()
    assert w.status().get("phase") in (None, "", "Pending") and w.mcp.calls == []
    w.run()
    assert w.status()["phase"] == "Succeeded" and len(w.mcp.calls) == 1


def test_an_external_api_secret_read_failing_for_a_moment_leaves_the_call_unclaimed(
    world: World, counting_api: CountingAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world
    w.kube.add_secret("default", "deploy-token", {"token": "t0ken"})
    credentials = {"name": "deploy-token", "key": "token"}
    deploy_tool(w, {"url": counting_api.url, "method": "POST", "credentialsFrom": credentials})
    real_read = w.kube.read_secret
    failures = [Unavailable(503, "ServiceUnavailable", "etcdserver: leader changed")]

    def read_secret(namespace: str, name: str) -> dict[str, str]:
        if failures:
            raise failures.pop()
        return real_read(namespace, name)

    monkeypatch.setattr(w.kube, "read_secret", read_secret)
    with pytest.raises(Unavailable):
        w.run()
    assert w.status().get("phase") in (None, "", "Pending") and counting_api.bodies == []
    w.run()
    assert w.status()["phase"] == "Succeeded" and counting_api.bodies == [{"version": "1.2.3"}]


def test_a_rejection_of_a_call_that_needed_no_approval_stops_it(world: World) -> None:
    """`kubechain reject` on a still-Pending call printed "rejected", and the tool ran anyway."""
    w = world
    without_approval(w)
    add_toolcall(w)
    w.annotate("rejected", "do NOT fetch that")
    w.run()
    status = w.status()
    assert status["phase"] == "ToolCallRejected" and status["result"] == "do NOT fetch that"
    assert w.mcp.calls == [] and w.calls_to_humanlayer() == []


def test_a_rejected_question_is_not_asked(world: World) -> None:
    w = world
    add_toolcall(w, "approvals__human_contact_email", {"message": "What is the budget for Q3?"})
    w.annotate("rejected", "do not bother finance")
    w.run()
    assert w.status()["phase"] == "ToolCallRejected" and w.calls_to_humanlayer() == []


def test_a_long_human_answer_is_bounded_like_a_tool_result(world: World) -> None:
    """By the worker's configured limit (KUBECHAIN_MAX_TOOL_RESULT_BYTES), as tool results are."""
    w = world
    add_toolcall(w, "approvals__human_contact_email", {"message": "Tell me everything"})
    w.run()
    w.hl.respond(w.status()["externalCallID"], "x" * 200_000, user="bob@example.com")
    w.clock.advance(2)
    tool_call(w.ctx(max_tool_result_bytes=10_000), message("TaskRunToolCall", TC))
    status = w.status()
    assert status["phase"] == "Succeeded" and 10_000 <= len(status["result"].encode()) < 10_200
    assert status["result"].startswith("xxx")


def test_a_human_answer_too_large_to_store_beside_the_calls_arguments_fails_the_call_at_once(
    world: World,
) -> None:
    """The answer's write, refused as too large (the question's arguments near the largest window, the
    answer as long as the limit lets it be and written 6 bytes a character), was raised at every check:
    the call waited for good, asking HumanLayer again and again, and its run with it."""
    w = world
    add_toolcall(
        w, "approvals__human_contact_email", {"message": "Tell me everything", "background": NEAR_A_WINDOW}
    )
    tool_call(w.ctx(**LARGEST_WINDOW), message("TaskRunToolCall", TC))
    call_id = w.status()["externalCallID"]
    w.hl.respond(call_id, HTML, user="bob@example.com")
    w.clock.advance(2)
    tool_call(w.ctx(**LARGEST_WINDOW), message("TaskRunToolCall", TC))
    status = w.status()
    assert status["phase"] == "Failed" and status["status"] == "Error", status.get("error")
    assert status["error"].startswith("the human's answer (104856 bytes, ") and etcd_refused(status["error"])
    assert f"it stays in HumanLayer (contact request {call_id})" in status["error"]
    assert w.events()[-1] == "ResultTooLarge"
    checks = w.gets("contact_requests")
    w.clock.advance(60)
    w.run()
    assert w.gets("contact_requests") == checks, "not asked again"


def test_a_rejection_whose_feedback_is_too_large_to_store_beside_the_calls_arguments_stands_without_it(
    world: World,
) -> None:
    """The rejection's write, refused as too large (the feedback is stored twice: in its annotation and as
    the result), was raised at every delivery: the call was neither rejected nor run. The decision stands,
    its result saying the feedback could not be stored."""
    w = world
    without_approval(w)
    add_toolcall(w, arguments={**ARGS, "background": "n" * 900_000})
    w.annotate("rejected", "<>&" * 21_000)  # 63 KB: an annotation may be 256 KiB
    w.run()
    status = w.status()
    assert status["phase"] == "ToolCallRejected" and status["status"] == "Succeeded", status
    assert status["result"].startswith("(the rejection's feedback (63000 bytes, ")
    assert etcd_refused(status["result"]) and "reject with a shorter comment" in status["result"]
    assert w.events()[-2:] == ["ToolCallRejected", "ResultTooLarge"]
    assert w.mcp.calls == []


def test_an_approval_channel_added_a_moment_ago_holds_for_the_next_call(world: World) -> None:
    """The MCPServer came from a 2 s cache: a call right after approval was switched on ran unasked."""
    w = world
    ctx = w.ctx(config_cache_ttl_s=3600)  # however slow this test runs, the cached copy is still fresh
    without_approval(w)
    warm = add_toolcall(w)
    tool_call(ctx, message("TaskRunToolCall", warm))  # caches the server without approval
    assert w.status(warm)["phase"] == "Succeeded"
    w.kube.request(
        "PATCH",
        "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/mcpservers/fetch",
        body={"spec": {"approvalContactChannel": {"name": "approvals"}}},
    )
    second = add_toolcall(w)
    tool_call(ctx, message("TaskRunToolCall", second))
    assert w.status(second)["phase"] == "AwaitingHumanApproval"
    assert len(w.mcp.calls) == 1, "only the call made before approval was switched on ran"


@pytest.mark.parametrize(
    "tool", ["fetch__fetch", "approvals__human_contact_email"], ids=["approval", "question"]
)
def test_a_request_whose_answer_was_lost_is_looked_up_before_it_is_sent_again(
    world: World, tool: str
) -> None:
    """It landed; only its answer was lost. Sent again, it would rely on how HumanLayer treats a
    duplicate call id (known only for the test server)."""
    w = world
    w.hl.set_down("lose-answer")
    add_toolcall(w, tool, ARGS if tool == "fetch__fetch" else {"message": "budget?"})
    w.run()
    assert w.status()["status"] == "Error" and w.status()["attempts"] == 1
    w.hl.set_down(None)
    w.clock.advance(w.last_countdown())
    w.run()
    status = w.status()
    assert status["status"] == "Ready" and status["externalCallID"]
    assert w.hl.posts == {status["externalCallID"]: 1}, "found, not sent a second time"


# -- what HumanLayer requests meet after their claim ---------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "arguments", "phase"),
    [
        ("fetch__fetch", '{"url": "https://example.com/\\ud83d"}', "AwaitingHumanApproval"),
        ("approvals__human_contact_email", '{"message": "ok? \\ud83d"}', "AwaitingHumanInput"),
    ],
    ids=["approval", "question"],
)
def test_a_lone_surrogate_in_the_arguments_is_sent_to_humanlayer(
    world: World, tool: str, arguments: str, phase: str
) -> None:
    """Half an emoji from the LLM ("\\ud83d" in its JSON): httpx raised UnicodeEncodeError encoding the
    body, after the claim; every delivery claimed again and crashed again, and nothing was recorded."""
    w = world
    add_toolcall(w, tool, arguments)
    w.run()
    status = w.status()
    assert status["phase"] == phase and status["status"] == "Ready" and status["externalCallID"], status
    sent = (w.hl.function_calls or w.hl.contact_requests)[status["externalCallID"]]["spec"]
    assert "\ud83d" in json.dumps(sent, ensure_ascii=False), "sent as its JSON escape, read back the same"


def boom(*_: Any, **__: Any) -> Any:
    """A surprise from the HumanLayer client (a bug, a library's exception no one mapped), quoting the key."""
    raise RuntimeError(f"unexpected: sent with {KEY}")


@pytest.mark.parametrize(
    ("tool", "send"),
    [("fetch__fetch", "create_function_call"), ("approvals__human_contact_email", "create_contact_request")],
    ids=["approval", "question"],
)
def test_an_unexpected_exception_after_the_request_claim_is_a_failed_attempt(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tool: str, send: str
) -> None:
    """Only HumanLayerError was caught: anything else left the claim written and the task crashed, with
    attempts still 0; the claim expired, the next delivery crashed again, for good (a question never used
    up HUMAN_CONTACT_MAX_ATTEMPTS, so the LLM was never told)."""
    from kubechain.humanlayer import HumanLayerClient

    w = world
    monkeypatch.setattr(HumanLayerClient, send, boom)
    add_toolcall(w, tool, ARGS if tool == "fetch__fetch" else {"message": "budget?"})
    w.run()
    status = w.status()
    assert status["status"] == "Error" and status["attempts"] == 1 and not status.get("claimedBy"), status
    assert "RuntimeError: unexpected" in status["error"]
    assert w.events()[-1] == "HumanLayerRequestFailed"
    assert "Traceback" in caplog.text and "RuntimeError" in caplog.text
    texts = [json.dumps(status), *w.event_messages(), caplog.text]
    assert not [text for text in texts if KEY in text], "the key is redacted everywhere"
    if tool == "fetch__fetch":
        assert status["phase"] == "ErrorRequestingHumanApproval"
        assert f"kubechain approve {TC}" in status["statusDetail"], "how to decide without HumanLayer"
        return
    for _ in range(machine.HUMAN_CONTACT_MAX_ATTEMPTS - 1):  # the refusal budget ends it
        w.clock.advance(w.last_countdown())
        w.run()
    status = w.status()
    assert status["phase"] == "Failed" and "RuntimeError: unexpected" in status["error"], status


@pytest.mark.parametrize(
    ("tool", "fetch"),
    [("fetch__fetch", "get_function_call"), ("approvals__human_contact_email", "get_contact_request")],
    ids=["approval", "question"],
)
def test_an_unexpected_exception_in_a_status_check_is_a_failed_check(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tool: str, fetch: str
) -> None:
    from kubechain.humanlayer import HumanLayerClient

    w = world
    add_toolcall(w, tool, ARGS if tool == "fetch__fetch" else {"message": "budget?"})
    w.run()
    sent = w.status()
    assert sent["externalCallID"]
    monkeypatch.setattr(HumanLayerClient, fetch, boom)
    w.clock.advance(w.last_countdown())
    w.run()
    status = w.status()
    assert status["phase"] == sent["phase"] and status["externalCallID"] == sent["externalCallID"]
    assert status["attempts"] == 1 and "last check failed: RuntimeError: unexpected" in status["statusDetail"]
    assert w.events()[-1] == "HumanLayerCheckFailed" and "Traceback" in caplog.text
    texts = [json.dumps(status), *w.event_messages(), caplog.text]
    assert not [text for text in texts if KEY in text], "the key is redacted everywhere"
    assert w.last_countdown() > 0, "checked again later"


def test_an_unexpected_exception_reading_the_answer_is_a_failed_check(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world
    call_id = awaiting_approval(w)
    w.hl.approve(call_id)
    monkeypatch.setattr(machine, "humanlayer_decision", boom)
    w.clock.advance(w.last_countdown())
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanApproval" and "RuntimeError" in status["statusDetail"]
    monkeypatch.undo()
    w.clock.advance(w.last_countdown())
    w.run()
    assert w.status()["phase"] == "ReadyToExecuteApprovedTool"


@pytest.mark.parametrize("answered_id", ["bad\nid", "kc-0123456789"], ids=["control-char", "another-call"])
@pytest.mark.parametrize(
    "tool", ["fetch__fetch", "approvals__human_contact_email"], ids=["approval", "question"]
)
def test_the_call_id_humanlayer_answers_with_is_not_trusted(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    answered_id: str,
    tool: str,
) -> None:
    """The id in HumanLayer's answer became externalCallID and went unescaped into the check's URL: one
    with a control character made every check raise httpx.InvalidURL (stuck), one of another call read
    that call's decision. The id sent is ours and deterministic: it is the one kept."""
    from kubechain.humanlayer import HumanLayerClient

    w = world
    send = "create_function_call" if tool == "fetch__fetch" else "create_contact_request"
    real = getattr(HumanLayerClient, send)

    def answer_with_another_id(self: Any, run_id: str, call_id: str, spec: dict[str, Any]) -> Any:
        return real(self, run_id, call_id, spec) | {"call_id": answered_id}

    monkeypatch.setattr(HumanLayerClient, send, answer_with_another_id)
    w.hl.function_calls["kc-0123456789"] = {"call_id": "kc-0123456789", "status": {"approved": True}}
    add_toolcall(w, tool, ARGS if tool == "fetch__fetch" else {"message": "budget?"})
    ours = machine.call_id(TaskRunToolCall.from_wire(w.kube.get_raw("taskruntoolcalls", "default", TC)))
    w.run()
    assert w.status()["externalCallID"] == ours
    assert f"with call id {answered_id!r}; keeping the id sent" in caplog.text
    w.clock.advance(w.last_countdown())
    w.run()  # checks our call: not approved by another's decision, and no crash
    status = w.status()
    assert status["phase"] in ("AwaitingHumanApproval", "AwaitingHumanInput") and status["attempts"] == 1
    assert "last check failed" not in status["statusDetail"]
    if tool == "fetch__fetch":
        w.hl.approve(ours)
    else:
        w.hl.respond(ours, "42k")
    w.clock.advance(w.last_countdown())
    w.run()
    assert w.status()["phase"] in ("ReadyToExecuteApprovedTool", "Succeeded")


@pytest.mark.parametrize("stage", ["request", "check"])
def test_a_refused_api_key_names_the_channel_and_its_secret_and_the_channel_is_validated_again(
    world: World, stage: str
) -> None:
    """A refused key ("invalid HumanLayer API key") on a tool call said neither which ContactChannel nor which Secret to
    fix, and the channel, validated when it was created, stayed Ready."""
    w = world
    if stage == "request":
        w.hl.set_api_keys({"another-key"})  # ours was revoked
        add_toolcall(w)
        w.run()
        shown = w.status()["error"]
    else:
        awaiting_approval(w)
        w.hl.set_api_keys({"another-key"})
        w.clock.advance(w.last_countdown())
        w.run()
        shown = w.status()["statusDetail"]
    assert (
        'ContactChannel "approvals" (API key from key "HUMANLAYER_API_KEY" of Secret "humanlayer"): '
        "invalid HumanLayer API key" in shown
    ), shown
    assert any('Secret "humanlayer"' in m for m in w.event_messages())
    validates = [(task, msg) for task, msg, _ in w.scheduled if task == TaskName.VALIDATE]
    assert [(msg.kind, msg.name) for _, msg in validates] == [("ContactChannel", "approvals")]
    validate(w.ctx(), validates[0][1])
    channel = w.kube.get_raw("contactchannels", "default", "approvals")["status"]
    assert channel["ready"] is False and channel["statusDetail"].startswith("invalid HumanLayer API key")
    assert 'key "HUMANLAYER_API_KEY" of Secret "humanlayer"' in channel["statusDetail"]


def _deliver_validates(w: World, delivered: set[int]) -> int:
    """Runs the ContactChannel validates the worker enqueued and not yet run, as Celery would; how many."""
    todo = [
        (i, msg)
        for i, (task, msg, _) in enumerate(w.scheduled)
        if task == TaskName.VALIDATE and i not in delivered
    ]
    for i, msg in todo:
        validate(w.ctx(), msg)
        delivered.add(i)
    return len(todo)


@pytest.mark.parametrize("where", ["request", "check"])
def test_a_403_does_not_validate_the_channel_again(
    world: World, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A 403 (a key HumanLayer knows, not permitted for this request) passes the channel's validation
    (GET /project): every failed request or check of every waiting call enqueued one more validate and
    GET /project, for as long as they waited (1,000 waiting calls: ~17 validates a second)."""
    w = world

    def refused(*_: Any) -> dict[str, Any]:
        raise HumanLayerAuthError("HumanLayer API key not permitted for POST /function_calls (HTTP 403)", 403)

    names = [add_toolcall(w) for _ in range(3)]
    if where == "check":
        for name in names:
            w.run(name)
        monkeypatch.setattr(HumanLayerClient, "get_function_call", refused)
    else:
        monkeypatch.setattr(HumanLayerClient, "create_function_call", refused)
    projects = w.hl.request_count("GET", "/humanlayer/v1/project")
    for _round in range(4):
        w.clock.advance(120)
        for name in names:
            w.run(name)
        assert 'ContactChannel "approvals" (API key from' in w.event_messages(names[0])[-1]
    assert [msg.name for task, msg, _ in w.scheduled if task == TaskName.VALIDATE] == []
    assert w.hl.request_count("GET", "/humanlayer/v1/project") == projects
    assert w.kube.get_raw("contactchannels", "default", "approvals")["status"]["ready"] is True


def test_a_401_validates_the_channel_again_at_most_once_a_window(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 401 from requests while GET /project still passes (a proxy, a key HumanLayer refuses for one
    endpoint): the channel stays Ready, and each failed request enqueued a validate of its own."""
    w = world

    def refused(*_: Any) -> dict[str, Any]:
        raise HumanLayerAuthError("invalid HumanLayer API key", 401)

    monkeypatch.setattr(HumanLayerClient, "create_function_call", refused)
    names = [add_toolcall(w) for _ in range(3)]
    delivered: set[int] = set()
    per_round = []
    for _round in range(4):
        for name in names:
            w.run(name)
        per_round.append(_deliver_validates(w, delivered))
        w.clock.advance(120)
    assert w.kube.get_raw("contactchannels", "default", "approvals")["status"]["ready"] is True
    assert per_round == [1, 1, 1, 1]  # one per window (60 s), not one per failed request


def test_the_channels_validated_again_are_remembered_for_a_window_and_at_most_so_many() -> None:
    from workers.approvals import _Revalidations

    seen = _Revalidations(60.0, 2)
    assert seen.first(("a", "1"), 0.0) and not seen.first(("a", "1"), 59.0)
    assert seen.first(("a", "2"), 1.0)  # a new version of the channel: validated again
    assert seen.first(("a", "1"), 60.0)  # the window is over
    assert seen.first(("b", "1"), 61.0) and seen.first(("c", "1"), 61.0)
    assert len(seen._at) == 2 and seen.first(("a", "1"), 62.0)  # past the bound, the oldest went


@pytest.mark.parametrize("before", ["first-request", "after-a-failed-request"])
def test_a_question_whose_channel_is_gone_when_it_is_sent_fails_at_once(world: World, before: str) -> None:
    """Gone when the request is checked, a question failed at once; gone when it was (first or again)
    sent, it was retried HUMAN_CONTACT_MAX_ATTEMPTS times (about 2 minutes) for the same end."""
    w = world
    if before == "after-a-failed-request":
        w.hl.set_down("503")
        add_toolcall(w, "approvals__human_contact_email", {"message": "budget?"})
        w.run()
        assert w.status()["status"] == "Error" and w.status()["attempts"] == 1
        w.clock.advance(w.last_countdown())
    w.kube.request(
        "DELETE", "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/contactchannels/approvals"
    )
    if before == "first-request":
        add_toolcall(w, "approvals__human_contact_email", {"message": "budget?"})
    w.run()
    status = w.status()
    assert status["phase"] == "Failed", status
    assert status["error"] == 'no human can be contacted: ContactChannel "approvals" not found'
    assert w.events()[-1] == "NoContactChannel"
    assert w.hl.request_count("POST", "/humanlayer/v1/contact_requests") == (before != "first-request")


@pytest.mark.parametrize(
    ("breakage", "limit"),
    [("503", machine.HUMAN_CONTACT_MAX_ATTEMPTS_IN_OUTAGE), ("revoked", machine.HUMAN_CONTACT_MAX_ATTEMPTS)],
    ids=["humanlayer-down", "key-refused"],
)
def test_a_question_whose_channel_is_not_ready_because_humanlayer_is_down_rides_the_outage_out(
    world: World, breakage: str, limit: int
) -> None:
    """The channel's validation met a HumanLayer outage (its status Pending, not Error): the question
    waits as long as one whose own request meets the outage, not as briefly as one HumanLayer refuses."""
    w = world
    if breakage == "503":
        w.hl.set_down("503")
    else:
        w.hl.set_api_keys({"another-key"})
    validate(w.ctx(), message("ContactChannel", "approvals"))
    channel = w.kube.get_raw("contactchannels", "default", "approvals")["status"]
    assert channel["ready"] is False and channel["status"] == ("Pending" if breakage == "503" else "Error")
    add_toolcall(w, "approvals__human_contact_email", {"message": "budget?"})
    w.run()
    status = w.status()
    assert status["phase"] == "AwaitingHumanInput" and status["status"] == "Error", status
    assert status["error"].startswith('ContactChannel "approvals" is not ready: ')
    assert f"(attempt 1 of {limit};" in status["statusDetail"], status["statusDetail"]
