"""Hand-off: a worker that makes a turn ready (and consumes the llm queue) makes its LLM call itself.

Its ReadyForLLM write carries the claim of the turn's LLM call (phase SendContextWindowToLLM), so the
turn costs one status write less, the watcher does not also queue it, and no other worker takes it
unless that claim expires (its worker died).
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from kubechain.kube.cache import TTLReadCache
from kubechain.kube.errors import Unavailable, error_for
from kubechain.kube.fake import FakeKubeClient
from kubechain.llm.base import LLMResponse
from kubechain.llm.deadline import call_deadline
from kubechain.models import LLM, Agent, TaskRun, ToolCall, ToolCallFunction
from kubechain.queueing import TaskName
from kubechain.settings import Settings
from kubechain.statemachines.routing import work_for
from kubechain.statemachines.taskrun import plan_initial_context, with_llm_claim
from kubechain.statemachines.transition import Transition, precise_timestamp
from tests.unit.fakes import FakeLLM, context, create, message, on_clock
from tests.unit.test_toolcall_robustness import ClaimAnsweredLate, ClaimAnswerLost, ClaimLandsLate
from tests.unit.test_workers_on_fake import validated
from workers.context import WorkerContext
from workers.llm_call import llm_call
from workers.prepare import prepare
from workers.tool_call import tool_call
from workers.transitions import apply_transition
from workers.validators import validate

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class CountingKube(FakeKubeClient):
    """Counts requests by verb and path suffix, and records every status write's phase."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.phases: list[str] = []

    def request(self, method: str, path: str, **kwargs: Any) -> Any:  # type: ignore[override]
        self.calls.append((method, path))
        result = super().request(method, path, **kwargs)
        body = kwargs.get("body")
        if method in ("PATCH", "PUT") and path.endswith("/status") and isinstance(body, dict):
            phase = (body.get("status") or {}).get("phase")
            if phase:
                self.phases.append(str(phase))
        return result

    def gets(self, plural: str) -> int:
        return sum(1 for method, path in self.calls if method == "GET" and f"/{plural}/" in path)


def run_status(kube: FakeKubeClient, name: str = "r") -> dict[str, Any]:
    return kube.get_raw("taskruns", "default", name).get("status") or {}


def test_prepare_claims_the_turn_it_makes_ready_and_makes_the_call() -> None:
    kube = CountingKube()
    llm = new_run(kube)
    version = kube.get_raw("taskruns", "default", "r")["metadata"]["resourceVersion"]
    kube.calls.clear()
    kube.request_params.clear()

    ctx = context(kube, llm, continues_llm=True)
    prepare(ctx, message("TaskRun", "r").model_copy(update={"resource_version": version}))

    assert kube.gets("taskruns") == 1, "one read (from the watch cache), then each write's answer"
    assert kube.request_params[0] == {"resourceVersion": version}
    status = run_status(kube)
    assert status["phase"] == "FinalAnswer" and status["llmAttempts"] == 0
    assert kube.phases == ["SendContextWindowToLLM", "FinalAnswer"], "ready and claimed in one write"
    assert len(llm.requests) == 1
    assert [m.role for m in llm.requests[0].messages] == ["system", "user"]
    assert kube.event_reasons("r") == ["ValidationSucceeded", "SendingContextWindowToLLM", "LLMFinalAnswer"]


class MovedFirstKube(CountingKube):
    """Another writer changes run "r" just before this worker's first status write of it."""

    moved = False

    def request(self, method: str, path: str, **kwargs: Any) -> Any:  # type: ignore[override]
        if not self.moved and method in ("PUT", "PATCH") and path.endswith("/taskruns/r/status"):
            self.moved = True
            self.patch_status_raw("taskruns", "default", "r", None, {"statusDetail": "someone else"})
        return super().request(method, path, **kwargs)


def test_a_hand_off_whose_write_conflicts_is_decided_again_and_not_counted() -> None:
    kube = MovedFirstKube()
    llm = new_run(kube)
    handoffs = ("kubechain_llm_handoffs_total", {"outcome": "error"})
    errors_before = REGISTRY.get_sample_value(*handoffs) or 0.0
    ok_before = REGISTRY.get_sample_value("kubechain_llm_handoffs_total", {"outcome": "ok"}) or 0.0
    prepare(context(kube, llm, continues_llm=True), message("TaskRun", "r"))
    assert kube.moved and run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1
    assert (REGISTRY.get_sample_value(*handoffs) or 0.0) == errors_before, "a lost race is not an error"
    assert REGISTRY.get_sample_value("kubechain_llm_handoffs_total", {"outcome": "ok"}) == ok_before + 1


class AnswerLostKube(CountingKube):
    """The first status write of run "r" is applied, but its answer is lost (a timeout)."""

    lost = False

    def request(self, method: str, path: str, **kwargs: Any) -> Any:  # type: ignore[override]
        result = super().request(method, path, **kwargs)
        if not self.lost and method in ("PUT", "PATCH") and path.endswith("/taskruns/r/status"):
            self.lost = True
            raise Unavailable(0, "Unavailable", "read timed out")
        return result


def test_a_hand_off_whose_write_landed_unanswered_goes_on_and_posts_its_events() -> None:
    kube = AnswerLostKube()
    llm = new_run(kube)
    prepare(context(kube, llm, continues_llm=True), message("TaskRun", "r"))
    assert kube.lost and run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1
    assert kube.event_reasons("r") == ["ValidationSucceeded", "SendingContextWindowToLLM", "LLMFinalAnswer"]


def interruptions_seen(kube: FakeKubeClient) -> tuple[FakeLLM, list[Any]]:
    """An LLM answering "done" that notes the run's llmInterruptions as each request is made."""
    seen: list[Any] = []

    def answer(_request: Any) -> LLMResponse:
        seen.append(run_status(kube).get("llmInterruptions"))
        return LLMResponse(content="done")

    return FakeLLM(answer), seen


@pytest.mark.parametrize("retried_after_s", [1, 181], ids=["claim-live", "claim-expired"])
def test_an_llm_claim_its_worker_could_not_confirm_is_taken_over_by_its_retry_and_called_once(
    retried_after_s: int,
) -> None:
    """The claim landed, its answer and every read-back within the budget were lost: the retry in this
    process knows it never called the LLM, so the turn is neither left until the claim expires nor
    counted as interrupted (nor as a hand-off: the llm_call task claimed it)."""
    before = handoffs()
    kube = ClaimAnswerLost("SendContextWindowToLLM", down=10**6)
    llm, seen = interruptions_seen(kube)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm)
    ctx.sleep = lambda _s: None
    prepare(ctx, message("TaskRun", "r"))
    with pytest.raises(Unavailable):
        llm_call(ctx, message("TaskRun", "r"))
    kube.down = 0
    assert run_status(kube)["claimedBy"] == "w1" and llm.requests == []
    later = datetime.now(UTC) + timedelta(seconds=retried_after_s)
    ctx.clock = lambda: later
    llm_call(ctx, message("TaskRun", "r"))  # Celery's retry
    assert run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1
    assert seen == [None], "not counted as an interrupted call"
    assert kube.event_reasons("r").count("SendingContextWindowToLLM") == 1
    assert handoffs_since(before) == (0, 0)


@pytest.mark.parametrize("handed_off", [False, True], ids=["llm_call", "hand-off"])
def test_an_llm_claim_confirmed_too_late_to_act_on_is_stamped_afresh_and_called_once(
    handed_off: bool,
) -> None:
    """The claim's answer was lost at the API client's read timeout, when the claim was already too old to
    call the LLM under: read back as ours, it is stamped afresh and the LLM called now. It was left to
    Celery's retry, which another pod may get: the turn then stalled until the claim expired (~3.5 min)
    and was counted as interrupted."""
    now = [datetime.now(UTC)]
    kube = ClaimAnsweredLate("SendContextWindowToLLM", now)
    seen: list[tuple[Any, Any]] = []  # (llmInterruptions, claimedAt) as the LLM is called

    def answer(_request: Any) -> LLMResponse:
        status = run_status(kube)
        seen.append((status.get("llmInterruptions"), status.get("claimedAt")))
        return LLMResponse(content="done")

    llm = FakeLLM(answer)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm, continues_llm=handed_off)
    on_clock(ctx, now)
    prepare(ctx, message("TaskRun", "r"))
    if not handed_off:
        llm_call(ctx, message("TaskRun", "r"))
    assert run_status(kube)["phase"] == "FinalAnswer" and kube.writes == 2
    assert seen == [(None, precise_timestamp(now[0]))], "called once, under the fresh stamp, not interrupted"
    assert kube.event_reasons("r").count("SendingContextWindowToLLM") == 1


class SlowEvents(FakeKubeClient):
    """Every Event POST takes the API client's whole read timeout (the recorder swallows its error, after
    the wait); ``moved``: the run's metadata is written after the first one (a label, say)."""

    def __init__(self, clock: list[datetime], moved: bool = False) -> None:
        super().__init__()
        self.clock, self.moving = clock, moved

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        if method == "POST" and path.endswith("/events"):
            self.clock[0] += timedelta(seconds=Settings().kube_timeout_s)
            if self.moving:
                self.moving = False
                self.patch_metadata("taskruns", "default", "r", {"labels": {"example.com/team": "a"}})
        return super().request(method, path, **kwargs)


@pytest.mark.parametrize("moved", [False, True], ids=["run-unchanged", "run-moved-meanwhile"])
def test_a_hand_off_whose_events_took_long_calls_its_llm_once_without_another_claim_write(
    moved: bool,
) -> None:
    """The hand-off's Events are posted inline, after its claim: each may wait out the API client's read
    timeout (an API server at its slowest). The LLM is called once, under the claim as written (a fresh
    stamp would add writes where they cost most), and the Events are posted once; a metadata write
    meanwhile does not stop the answer being recorded."""
    now = [datetime.now(UTC)]
    kube = SlowEvents(now, moved)
    ages: list[float] = []
    lefts: list[float] = []

    def answer(_request: Any) -> LLMResponse:
        ages.append(claim_age(kube, now[0]))
        lefts.append((call_deadline() or float("inf")) - time.monotonic())
        return LLMResponse(content="done")

    llm = FakeLLM(answer)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm, continues_llm=True)
    on_clock(ctx, now)
    prepare(ctx, message("TaskRun", "r"))
    assert run_status(kube)["phase"] == "FinalAnswer" and len(ages) == 1
    assert ages[0] >= 2 * Settings().kube_timeout_s, "called under the claim as written, not a fresh stamp"
    # ... but cut short to end while that claim holds, with time left to record the answer
    settings = ctx.settings
    assert lefts[0] == pytest.approx(
        settings.claim_timeout_s - ages[0] - settings.claim_outcome_margin_s, abs=1
    )
    assert kube.event_reasons("r").count("SendingContextWindowToLLM") == 1


def claim_age(kube: FakeKubeClient, now: datetime) -> float:
    return (now - claim_time(kube.get_raw("taskruns", "default", "r"))).total_seconds()


def hand_off_left_in_doubt() -> tuple[ClaimAnswerLost, FakeLLM, WorkerContext]:
    """A hand-off whose claim write landed but whose answer, and every read-back, was lost: its prepare
    raised for Celery to retry, with the API server back."""
    kube = ClaimAnswerLost("SendContextWindowToLLM", down=10**6)
    llm = new_run(kube)
    ctx = context(kube, llm, continues_llm=True)
    ctx.sleep = lambda _s: None
    with pytest.raises(Unavailable):
        prepare(ctx, message("TaskRun", "r"))
    kube.down = 0
    return kube, llm, ctx


def test_a_hand_off_its_worker_could_not_confirm_is_taken_over_by_the_retried_prepare() -> None:
    kube, llm, ctx = hand_off_left_in_doubt()
    assert run_status(kube)["phase"] == "SendContextWindowToLLM" and llm.requests == []
    prepare(ctx, message("TaskRun", "r"))  # Celery's retry
    assert run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1
    assert kube.event_reasons("r") == ["ValidationSucceeded", "SendingContextWindowToLLM", "LLMFinalAnswer"]


def handoffs() -> tuple[float, float]:
    """kubechain_llm_handoffs_total as counted so far: (ok, error)."""
    return (
        REGISTRY.get_sample_value("kubechain_llm_handoffs_total", {"outcome": "ok"}) or 0.0,
        REGISTRY.get_sample_value("kubechain_llm_handoffs_total", {"outcome": "error"}) or 0.0,
    )


def handoffs_since(before: tuple[float, float]) -> tuple[float, float]:
    return (handoffs()[0] - before[0], handoffs()[1] - before[1])


@pytest.mark.parametrize("how", ["read-backs unanswered", "answered too late"])
def test_a_hand_off_left_in_doubt_is_counted_once_when_its_retry_makes_the_call(how: str) -> None:
    """Counted as the hand-off it is, as one whose claim was confirmed at once is: once, when its call is
    made (by the retried prepare, under the claim taken afresh), not when it was left in doubt."""
    before = handoffs()
    if how == "read-backs unanswered":
        kube, llm, ctx = hand_off_left_in_doubt()
    else:  # answered with under a second of the claim left for its call
        now = [datetime.now(UTC)]
        kube = ClaimLandsLate("SendContextWindowToLLM", now, Settings().claim_timeout_s - 5)
        llm = new_run(kube)
        ctx = context(kube, llm, continues_llm=True)
        on_clock(ctx, now)
        with pytest.raises(Unavailable):
            prepare(ctx, message("TaskRun", "r"))
    assert run_status(kube)["claimedBy"] == "w1" and llm.requests == []
    assert handoffs_since(before) == (0, 0), "no call was made under the claim in doubt"
    prepare(ctx, message("TaskRun", "r"))  # Celery's retry
    prepare(ctx, message("TaskRun", "r"))  # redelivered
    assert run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1
    assert handoffs_since(before) == (1, 0)


@pytest.mark.parametrize("how", ["answer lost", "confirmed too late"])
def test_a_hand_off_whose_claim_was_confirmed_by_reading_it_back_is_counted_once(how: str) -> None:
    """Its write landed, its answer lost: read back as ours (and stamped afresh, if by then too old to call
    under), the call is made at once and counted once; a redelivered prepare counts nothing."""
    before = handoffs()
    now = [datetime.now(UTC)]
    kube = AnswerLostKube() if how == "answer lost" else ClaimAnsweredLate("SendContextWindowToLLM", now)
    llm = new_run(kube)
    ctx = context(kube, llm, continues_llm=True)
    on_clock(ctx, now)
    prepare(ctx, message("TaskRun", "r"))
    prepare(ctx, message("TaskRun", "r"))  # redelivered
    assert run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1
    assert handoffs_since(before) == (1, 0)


def test_a_hand_off_left_in_doubt_is_remembered_without_its_context_window() -> None:
    """Its claim wrote the whole context window (up to 1 MiB), and a claim in doubt is kept for up to an
    hour (for good, if the retry went to another pod). A re-claim, found only on a run that holds the
    claim and so all it wrote, needs only to stamp it afresh and post its Events."""
    kube, llm, ctx = hand_off_left_in_doubt()
    held = ctx.claims_in_doubt.held(kube.get(TaskRun, "default", "r"), lambda _claimed_at: True)
    assert held is not None and sorted(held.status) == ["claimedAt", "claimedBy", "phase"], sorted(
        held.status
    )
    assert [event.reason for event in held.events] == ["ValidationSucceeded", "SendingContextWindowToLLM"]
    prepare(ctx, message("TaskRun", "r"))  # Celery's retry
    assert run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1


def test_without_the_llm_queue_the_turn_is_left_to_the_queue() -> None:
    kube = FakeKubeClient()
    llm = new_run(kube)
    prepare(context(kube, llm, continues_llm=False), message("TaskRun", "r"))
    status = run_status(kube)
    assert status["phase"] == "ReadyForLLM" and not status.get("claimedBy")
    assert [w.task for w in work_for("TaskRun", kube.get_raw("taskruns", "default", "r"), NOW, 180)] == [
        TaskName.LLM_CALL
    ]
    assert llm.requests == []


def test_a_run_that_cannot_call_its_llm_fails_in_the_write_that_would_have_claimed_it() -> None:
    kube = CountingKube()
    llm = new_run(kube)
    kube.request("DELETE", "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/llms/gpt-4o")
    counted = [
        REGISTRY.get_sample_value("kubechain_llm_handoffs_total", {"outcome": o}) for o in ("ok", "error")
    ]
    prepare(context(kube, llm, continues_llm=True), message("TaskRun", "r"))
    after = [
        REGISTRY.get_sample_value("kubechain_llm_handoffs_total", {"outcome": o}) for o in ("ok", "error")
    ]
    assert after == counted, "no LLM call was handed to anyone"
    status = run_status(kube)
    assert kube.phases == ["Failed"] and llm.requests == []
    assert status["error"] == 'Failed to get LLM: LLM "gpt-4o" not found'
    assert len(status["contextWindow"]) == 2 and not status.get("claimedBy")
    assert kube.event_reasons("r") == ["ValidationSucceeded", "LLMFetchFailed"]


def new_run(kube: FakeKubeClient) -> FakeLLM:
    """Validated LLM and Agent, and a new direct TaskRun "r"; the LLM answers "done"."""
    llm = FakeLLM(lambda r: LLMResponse(content="done"))
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    return llm


def claimed_run(kube: FakeKubeClient, holder: str) -> tuple[FakeLLM, dict[str, Any]]:
    """A run whose ready-and-claimed write was made by ``holder``, which then died before its call."""
    llm = new_run(kube)
    ctx = context(kube, llm, identity=holder, continues_llm=True)
    run = kube.get(TaskRun, "default", "r")
    agent = kube.get(Agent, "default", "a")
    ready = plan_initial_context(run, None, False, agent, ctx.clock())
    assert ready is not None
    apply_transition(ctx, run, with_llm_claim(ready, holder, ctx.clock()))
    return llm, kube.get_raw("taskruns", "default", "r")


def claim_time(obj: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(obj["status"]["claimedAt"].replace("Z", "+00:00"))


def test_a_fresh_claim_is_not_queued_nor_taken_nor_repeated_by_a_retried_prepare() -> None:
    kube = FakeKubeClient()
    llm, obj = claimed_run(kube, "w1")
    assert (obj["status"]["phase"], obj["status"]["claimedBy"]) == ("SendContextWindowToLLM", "w1")
    claimed = claim_time(obj)

    assert work_for("TaskRun", obj, claimed, 180) == []
    assert work_for("TaskRun", obj, claimed + timedelta(seconds=60), 180, resync=True) == []
    llm_call(context(kube, llm, identity="w2"), message("TaskRun", "r"))
    # The same worker's prepare, redelivered: its first delivery may be making the call right now.
    prepare(context(kube, llm, identity="w1", continues_llm=True), message("TaskRun", "r"))
    assert llm.requests == [] and run_status(kube)["phase"] == "SendContextWindowToLLM"


def test_an_expired_claim_is_requeued_by_resync_and_its_turn_repeated_once() -> None:
    kube = FakeKubeClient()
    llm, obj = claimed_run(kube, "w1")
    later = claim_time(obj) + timedelta(seconds=181)

    assert work_for("TaskRun", obj, later, 180) == [], "only resync re-takes a claim"
    (work,) = work_for("TaskRun", obj, later, 180, resync=True)
    assert (work.task, work.reason) == (TaskName.LLM_CALL, "stale-claim")

    other = context(kube, llm, identity="w2")
    other.clock = lambda: later
    llm_call(other, message("TaskRun", "r"))
    status = run_status(kube)
    assert status["phase"] == "FinalAnswer" and len(llm.requests) == 1
    assert kube.event_reasons("r").count("SendingContextWindowToLLM") == 2


def test_an_earlier_versions_hand_off_is_queued_and_taken_at_once() -> None:
    """Until this version a worker wrote ReadyForLLM with its own claimedBy and claimed the turn in a
    second write; a run left so by a worker of that version is taken like any ReadyForLLM."""
    kube = FakeKubeClient()
    llm = new_run(kube)
    prepare(context(kube, llm), message("TaskRun", "r"))
    now = datetime.now(UTC)
    handed = {"claimedBy": "old-worker", "claimedAt": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    kube.patch_status(kube.get(TaskRun, "default", "r"), handed)
    obj = kube.get_raw("taskruns", "default", "r")
    assert [w.task for w in work_for("TaskRun", obj, now, 180)] == [TaskName.LLM_CALL]
    llm_call(context(kube, llm, identity="w2"), message("TaskRun", "r"))
    assert run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1


def test_fan_in_hands_the_next_turn_to_the_worker_that_completed_it() -> None:
    kube = CountingKube()
    answers = iter(
        [
            LLMResponse(
                tool_calls=[
                    ToolCall(id="c1", function=ToolCallFunction(name="add", arguments='{"a": 1, "b": 2}'))
                ]
            ),
            LLMResponse(content="3"),
        ]
    )
    llm = FakeLLM(lambda r: next(answers))
    validated(kube, llm, ["add"])
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "1+2?"})
    ctx = context(kube, llm, continues_llm=True)
    prepare(ctx, message("TaskRun", "r"))
    assert run_status(kube)["phase"] == "ToolCallsPending"
    (name,) = [item["metadata"]["name"] for item in kube.list_raw("taskruntoolcalls", "default")[0]]
    tool_call(ctx, message("TaskRunToolCall", name))
    prepare(ctx, message("TaskRun", "r"))  # the fan-in hint
    assert run_status(kube)["phase"] == "FinalAnswer"
    assert "ReadyForLLM" not in kube.phases and kube.phases.count("SendContextWindowToLLM") == 2
    assert [m.role for m in llm.requests[1].messages] == ["system", "user", "assistant", "tool"]
    assert len(llm.requests) == 2


def test_redelivered_messages_never_rewind_a_run() -> None:
    """Messages redelivered after the run finished, each naming the version that once called for it."""
    kube = FakeKubeClient()
    llm = new_run(kube)
    created = kube.get_raw("taskruns", "default", "r")["metadata"]["resourceVersion"]
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    ready = kube.get_raw("taskruns", "default", "r")["metadata"]["resourceVersion"]
    llm_call(ctx, message("TaskRun", "r"))
    assert run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1

    llm_call(ctx, message("TaskRun", "r").model_copy(update={"resource_version": ready}))
    prepare(ctx, message("TaskRun", "r").model_copy(update={"resource_version": created}))
    assert run_status(kube)["phase"] == "FinalAnswer", "an old message never rewinds a run"
    assert len(llm.requests) == 1


class StaleCacheKube(FakeKubeClient):
    """Answers a read "no older than" a version with the copy it held at that version (a watch cache
    that has not seen the later writes), or with 504 Too large resource version when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[str, dict[str, Any]] = {}
        self.too_large = False

    def request(self, method: str, path: str, **kwargs: Any) -> Any:  # type: ignore[override]
        wanted = (kwargs.get("params") or {}).get("resourceVersion")
        if method == "GET" and wanted and path.endswith("/taskruns/r"):
            self.requests.append((method, path))
            self.request_params.append(dict(kwargs["params"]))
            if self.too_large:
                raise error_for(504, {"reason": "Timeout", "message": "Too large resource version: 99"})
            return copy.deepcopy(self.held[wanted])
        return super().request(method, path, **kwargs)


def test_a_stale_cached_read_conflicts_and_the_next_read_is_fresh() -> None:
    kube = StaleCacheKube()
    llm = new_run(kube)
    ctx = context(kube, llm)
    prepare(ctx, message("TaskRun", "r"))
    ready = kube.get_raw("taskruns", "default", "r")
    kube.held[ready["metadata"]["resourceVersion"]] = ready
    llm_call(ctx, message("TaskRun", "r"))
    assert run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1

    kube.requests.clear()
    kube.request_params.clear()
    llm_call(
        ctx,
        message("TaskRun", "r").model_copy(update={"resource_version": ready["metadata"]["resourceVersion"]}),
    )
    assert len(llm.requests) == 1, "the stale copy's claim conflicted; the fresh read found the answer"
    reads = [
        params
        for (method, path), params in zip(kube.requests, kube.request_params, strict=False)
        if method == "GET" and path.endswith("/r")
    ]
    assert reads[-2:] == [{"resourceVersion": ready["metadata"]["resourceVersion"]}, {}]


def test_a_watch_cache_behind_the_version_falls_back_to_a_fresh_read() -> None:
    kube = StaleCacheKube()
    llm = new_run(kube)
    kube.too_large = True
    version = kube.get_raw("taskruns", "default", "r")["metadata"]["resourceVersion"]
    prepare(
        context(kube, llm, continues_llm=True),
        message("TaskRun", "r").model_copy(update={"resource_version": version}),
    )
    assert run_status(kube)["phase"] == "FinalAnswer" and len(llm.requests) == 1


def test_a_message_for_a_deleted_run_ends_quietly() -> None:
    kube = FakeKubeClient()
    llm = new_run(kube)
    version = kube.get_raw("taskruns", "default", "r")["metadata"]["resourceVersion"]
    kube.request("DELETE", "/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/default/taskruns/r")
    ctx = context(kube, llm, continues_llm=True)
    prepare(ctx, message("TaskRun", "r").model_copy(update={"resource_version": version}))
    assert llm.requests == []


def test_concurrent_cache_misses_make_one_read() -> None:
    kube = CountingKube()
    create(kube, "LLM", "llms", "gpt-4o", {"provider": "openai"})
    start = threading.Barrier(8)
    entered = [0]
    entered_lock = threading.Lock()
    all_entered = threading.Event()  # set once all eight readers are about to call cache.get
    loads = []
    original = kube.get

    def blocking_get(model: Any, namespace: str, name: str) -> Any:
        # The first load cannot finish (and fill the cache) before every reader has asked for the key:
        # all eight miss, and only the per-key loading lock stops each of them loading it.
        loads.append(name)
        assert all_entered.wait(10), "not all readers called cache.get"
        return original(model, namespace, name)

    kube.get = blocking_get  # type: ignore[method-assign]
    cache = TTLReadCache(kube, ttl_s=60)

    def reader() -> str:
        start.wait(10)
        with entered_lock:
            entered[0] += 1
            if entered[0] == 8:
                all_entered.set()
        return cache.get(LLM, "default", "gpt-4o").name

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(reader) for _ in range(8)]
        results = [future.result(timeout=30) for future in futures]
    assert results == ["gpt-4o"] * 8
    assert len(loads) == 1, f"{len(loads)} reads of one key"


def test_the_claim_is_stamped_after_the_configuration_was_read() -> None:
    """Reading the Agent, LLM and Secret may wait out an API server shedding load (429s): a claim stamped
    before that reached the LLM call already old, and could expire while the call still ran."""
    now = [NOW]
    seen: list[str] = []

    class SlowLLMRead(FakeKubeClient):
        def get_raw(self, plural: str, namespace: str, name: str, **kwargs: Any) -> dict[str, Any]:
            if plural == "llms":
                now[0] += timedelta(seconds=50)  # throttled
            return super().get_raw(plural, namespace, name, **kwargs)

    kube = SlowLLMRead()

    def answer(request: Any) -> LLMResponse:
        seen.append(str(run_status(kube)["claimedAt"]))
        return LLMResponse(content="done")

    llm = FakeLLM(answer)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm, continues_llm=True, config_cache_ttl_s=0)
    ctx.clock = lambda: now[0]
    prepare(ctx, message("TaskRun", "r"))
    assert run_status(kube)["phase"] == "FinalAnswer"
    (claimed_at,) = seen
    assert datetime.fromisoformat(claimed_at.replace("Z", "+00:00")) == now[0], "stamped after the reads"


def test_a_hand_off_claim_stays_one_when_written_with_more() -> None:
    """Transition.handoff is kept by every way a claim is copied or joined: a hand-off's claim followed by
    (or following) another transition is still counted as a hand-off."""
    claim = Transition(status={"claimedBy": "w"}, handoff=True)
    assert claim.followed_by(Transition(status={"x": 1})).handoff
    assert Transition(status={"x": 1}).followed_by(claim).handoff
    assert not Transition(status={"x": 1}).followed_by(Transition(status={"y": 2})).handoff


@pytest.mark.parametrize("handoff", [True, False], ids=["hand-off", "llm_call"])
def test_a_claim_left_in_doubt_whose_turn_then_waits_for_its_agent_counts_no_attempt(handoff: bool) -> None:
    """A claim counts the attempt it is for (llmAttempts) when it is written. One left in doubt, never
    acted on, whose turn then waited for its Agent's edit to be validated kept that count: the turn's
    first LLM request was counted as its second (of KUBECHAIN_LLM_MAX_ATTEMPTS), though no request had
    been made."""
    from kubechain.kube.client import custom_path

    kube = ClaimAnswerLost("SendContextWindowToLLM", down=10**6)
    counted: list[int] = []  # llmAttempts as each LLM request was made

    def answer(_request: object) -> LLMResponse:
        counted.append(run_status(kube)["llmAttempts"])
        return LLMResponse(content="done")

    llm = FakeLLM(answer)
    validated(kube, llm)
    create(kube, "TaskRun", "taskruns", "r", {"agentRef": {"name": "a"}, "userMessage": "hi"})
    ctx = context(kube, llm, continues_llm=handoff, config_cache_ttl_s=0)
    ctx.sleep = lambda _s: None
    if not handoff:
        prepare(ctx, message("TaskRun", "r"))
        assert run_status(kube)["phase"] == "ReadyForLLM"
    with pytest.raises(Unavailable):
        (prepare if handoff else llm_call)(ctx, message("TaskRun", "r"))
    kube.down = 0
    assert (run_status(kube)["claimedBy"], run_status(kube)["llmAttempts"]) == ("w1", 1)
    kube.request("PATCH", custom_path("agents", "default", "a"), body={"spec": {"system": "be verbose"}})
    (prepare if handoff else llm_call)(ctx, message("TaskRun", "r"))  # Celery's retry: the turn waits
    status = run_status(kube)
    assert (status["phase"], status.get("claimedBy"), status["llmAttempts"]) == ("ReadyForLLM", None, 0)
    validate(ctx, message("Agent", "a"))
    llm_call(ctx, message("TaskRun", "r"))
    assert counted == [1], "the turn's first request is its first attempt"
    assert run_status(kube)["phase"] == "FinalAnswer"
