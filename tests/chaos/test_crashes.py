"""Workers, watchers, Redis and the API server fail mid-run; every run still finishes, nothing twice."""

from __future__ import annotations

import json
import time
from itertools import accumulate

import httpx
import pytest

from kubechain.testing.stack import LocalStack
from kubechain.testing.waiting import wait_for
from tests.chaos.conftest import kill
from tests.chaos.late_claims_proxy import LateClaimsProxy
from tests.conftest import Kubectl
from tests.e2e.conftest import OPENAI_SECRET, ScriptedLLM, apply, get, llm_resource, phase, resource
from tests.e2e.test_observability import scrape, total
from tests.e2e.test_tools import SlowAPI
from workers.transitions import RECORD_RETRY_BUDGET_S, RECORD_RETRY_MAX_S, backoff_delays


def setup_agent(
    kubectl: Kubectl, namespace: str, tools: list[dict] | None = None, name: str = "agent"
) -> None:
    spec = {"llmRef": {"name": "gpt-4o"}, "system": "You are reliable."}
    if tools:
        spec["tools"] = [{"name": t["metadata"]["name"]} for t in tools]
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), *(tools or []), resource("Agent", name, spec))
    wait_for(
        lambda: get(kubectl, namespace, "agent", name).get("status", {}).get("ready"), 60, what="agent ready"
    )


def status(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict:
    return get(kubectl, namespace, kind, name).get("status", {})


def test_worker_killed_mid_llm_call(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    question = f"slow thought {namespace}"
    chaos_llm.add_rule(question, [{"content": "finally", "delay_s": 3}])
    setup_agent(kubectl, namespace)
    apply(
        kubectl, namespace, resource("TaskRun", "r", {"agentRef": {"name": "agent"}, "userMessage": question})
    )
    claimed = wait_for(
        lambda: (
            (s := status(kubectl, namespace, "taskrun", "r")).get("phase") == "SendContextWindowToLLM"
            and s.get("claimedBy")
        ),
        60,
        what="the LLM claim",
    )
    wait_for(lambda: chaos_llm.in_flight(question), 30, what="the LLM request to arrive")
    kill(chaos_stack, str(claimed))
    wait_for(
        lambda: phase(kubectl, namespace, "r") == "FinalAnswer", 90, what="another worker to finish the run"
    )
    final = status(kubectl, namespace, "taskrun", "r")
    assert final["output"] == "finally"
    turns = [r["turn"] for r in chaos_llm.requests(question)]
    assert turns == [0, 0], "the interrupted turn was repeated exactly once"


@pytest.mark.parametrize("idempotent", [False, True], ids=["not-idempotent", "idempotent"])
def test_worker_killed_mid_tool_call(
    idempotent: bool, chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    api = SlowAPI(3.0)
    try:
        question = f"slow tool {namespace}"
        chaos_llm.add_rule(
            question,
            [
                {"tool_calls": [{"name": "work", "arguments": {"x": 1}}]},
                {"content_template": "{last_tool_results}"},
            ],
        )
        tool = resource(
            "Tool",
            "work",
            {
                "name": "work",
                "toolType": "externalAPI",
                "idempotent": idempotent,
                "execute": {"externalAPI": {"url": api.url}},
            },
        )
        setup_agent(kubectl, namespace, [tool])
        apply(
            kubectl,
            namespace,
            resource("TaskRun", "r", {"agentRef": {"name": "agent"}, "userMessage": question}),
        )

        def running() -> str | None:
            calls = json.loads(kubectl("get", "taskruntoolcall", "-o", "json", namespace=namespace).stdout)[
                "items"
            ]
            running = [c for c in calls if c.get("status", {}).get("phase") == "Running"]
            return running[0]["status"]["claimedBy"] if running else None

        holder = wait_for(running, 60, what="the tool call to run")
        kill(chaos_stack, holder)
        wait_for(lambda: phase(kubectl, namespace, "r") == "FinalAnswer", 90, what="the run to finish")
        output = status(kubectl, namespace, "taskrun", "r")["output"]
        if idempotent:
            assert '"echo"' in output, "the idempotent tool was run again and succeeded"
        else:
            assert "lost mid-execution" in output and "not declared idempotent" in output
            assert len(api.intervals) <= 1, "a non-idempotent tool is never started twice"
    finally:
        api.server.shutdown()


@pytest.mark.stack(supervise=True)  # a worker may die on the reset (kombu); its Deployment restarts it
def test_redis_loses_every_queued_message(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    question = f"redis flush {namespace}"
    chaos_llm.add_rule(question, [{"content": "survived", "delay_s": 1}])
    setup_agent(kubectl, namespace)
    runs = [
        resource("TaskRun", f"r{i}", {"agentRef": {"name": "agent"}, "userMessage": f"{question} #{i}"})
        for i in range(20)
    ]
    apply(kubectl, namespace, *runs)
    wait_for(
        lambda: chaos_llm.in_flight(f"{question} #0") or chaos_llm.in_flight(f"{question} #1"),
        60,
        what="work in flight",
    )
    assert chaos_stack.redis is not None
    chaos_stack.redis.restart(flush=True)
    for i in range(20):
        wait_for(lambda i=i: phase(kubectl, namespace, f"r{i}") == "FinalAnswer", 120, what=f"r{i}")
    for i in range(20):
        turns = [r["turn"] for r in chaos_llm.requests(f"{question} #{i}")]
        # A call cut off by the flush may be repeated once after its claim expires; never more.
        assert 1 <= len(turns) <= 2, (i, turns)


@pytest.mark.stack(watchers=2)
def test_leader_watcher_killed(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    question = f"watcher dies {namespace}"
    chaos_llm.add_rule(question, [{"content": "still here"}])
    setup_agent(kubectl, namespace)

    def leader() -> str | None:
        lease = json.loads(
            kubectl(
                "get", "lease", "kubechain-watcher", "-o", "json", namespace="default", check=False
            ).stdout
            or "{}"
        )
        return lease.get("spec", {}).get("holderIdentity")

    holder = wait_for(leader, 30, what="a leader")
    kill(chaos_stack, next(name for name in chaos_stack.watchers if chaos_stack.identity(name) == holder))
    runs = [
        resource("TaskRun", f"r{i}", {"agentRef": {"name": "agent"}, "userMessage": f"{question} #{i}"})
        for i in range(10)
    ]
    apply(kubectl, namespace, *runs)
    for i in range(10):
        wait_for(lambda i=i: phase(kubectl, namespace, f"r{i}") == "FinalAnswer", 90, what=f"r{i}")
    assert wait_for(lambda: (h := leader()) != holder and h, 30, what="a new leader")
    for i in range(10):
        assert len(chaos_llm.requests(f"{question} #{i}")) == 1


# Under the chaos tier's claims (6 s, calls ending 2/3 s before them: KUBECHAIN_LLM_TIMEOUT_S 5) a claim
# whose write is answered LATE_ANSWER_S after its stamp leaves its call under 2.9 s: an answer that takes
# OUTAGE_ANSWER_S is cut short. (One answered later than 4.3 s, leaving under a second, is not acted on.)
OUTAGE_ANSWER_S = 3.0
LATE_ANSWER_S = 2.5


def answer_holders_next_try_s() -> tuple[float, float]:
    """When, after its answer, a worker holding one through an outage (its writes refused) tries to write
    it for the last time before its longest wait between tries, and how long that wait is."""
    delays = list(backoff_delays(RECORD_RETRY_BUDGET_S))
    tries = list(accumulate(delays))
    last = next(i for i, delay in enumerate(delays[1:]) if delay == RECORD_RETRY_MAX_S)
    return tries[last], delays[last + 1]


def requests_of(llm: ScriptedLLM, prefix: str, *, answering: bool = False) -> list[dict]:
    """The requests logged (``answering``: in flight) whose first user message starts with ``prefix``."""
    listed = httpx.get(f"{llm.url}/_admin/{'inflight' if answering else 'requests'}").json()
    return [r for r in listed if (r["first_user"] or "").startswith(prefix)]


@pytest.mark.stack(late_claims=True)
def test_api_server_outage(
    chaos_stack: LocalStack,
    chaos_llm: ScriptedLLM,
    kubectl: Kubectl,
    namespace: str,
    control_plane: object,
    late_claims: LateClaimsProxy,
) -> None:
    """The API server goes away under ten LLM calls, long enough for their claims to expire, and comes
    back answering claim writes late, as a loaded machine makes it: the answers held through the outage
    are lost with their claims, and the calls made again under claims answered late are cut short and
    made once more. Not a count of requests (load decides it) but what the claims guarantee: no two calls
    of a turn at once, and an answered call made again at most once."""
    question = f"apiserver outage {namespace}"
    chaos_llm.add_rule(question, [{"content": "back online", "delay_s": OUTAGE_ANSWER_S}])
    setup_agent(kubectl, namespace)
    runs = [
        resource("TaskRun", f"r{i}", {"agentRef": {"name": "agent"}, "userMessage": f"{question} #{i}"})
        for i in range(10)
    ]
    apply(kubectl, namespace, *runs)
    wait_for(lambda: chaos_llm.in_flight(f"{question} #0"), 60, what="work in flight")
    control_plane.stop_apiserver()  # type: ignore[attr-defined]
    # The outage itself (the fault injected, not a wait for a condition). It ends just after the workers
    # holding the answers of the calls it cut off have tried to write them, their next try 15 s away
    # (their tries are timed from the answers, which the scripted LLM logs): each claim, expired by then,
    # is taken again first, as when the restart takes 16 s on a loaded machine.
    held = wait_for(
        lambda: not requests_of(chaos_llm, question, answering=True) and requests_of(chaos_llm, question),
        30,
        what="the calls the outage cut off to be answered",
    )
    tried_s, next_try_s = answer_holders_next_try_s()
    assert next_try_s >= 10, "the restart and the claims taken again fit before the holders try again"
    time.sleep(max(0.0, max(r["finished_at"] for r in held) + tried_s + 0.5 - time.time()))
    # It comes back answering the workers late, as on a loaded machine: a claim written now is acted on,
    # its call cut short to end within it, and the turn claimed again.
    late_claims.lag_s = LATE_ANSWER_S
    control_plane.start_apiserver()  # type: ignore[attr-defined]
    wait_for(
        lambda: any(r["caller_left_at"] for r in requests_of(chaos_llm, question)),
        60,
        what="a call cut short under a claim answered late",
    )
    late_claims.lag_s = 0.0
    for i in range(10):
        wait_for(lambda i=i: phase(kubectl, namespace, f"r{i}") == "FinalAnswer", 120, what=f"r{i}")
    for i in range(10):
        assert status(kubectl, namespace, "taskrun", f"r{i}")["output"] == "back online"
        requests = sorted(chaos_llm.requests(f"{question} #{i}"), key=lambda r: r["received_at"])
        # What the claims guarantee, however loaded the machine: no two calls of a turn at once. Each is
        # made under a claim of its own and ends, for its worker, before that claim can be taken again
        # (answered, or cut short when its claim, answered late, ran out); only then is it made again.
        for earlier, later in zip(requests, requests[1:], strict=False):
            ended = earlier["caller_left_at"] or earlier["finished_at"]
            assert ended <= later["received_at"], (f"r{i}: two calls of one turn at once", requests)
        # A call answered is made again only when its answer was lost with its claim (taken again once it
        # expired in the outage), once: a second time fails the run. Calls cut short are retried as
        # attempts (llmAttempts), each a paid request, as many as load makes.
        answered = [r for r in requests if r["caller_left_at"] is None]
        assert 1 <= len(answered) <= 2, (f"r{i}: an answered call made again more than once", requests)


def test_deleting_a_run_mid_llm_call_stops_it(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    question = f"delete me {namespace}"
    chaos_llm.add_rule(
        question,
        [
            {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}], "delay_s": 2},
            {"content": "never"},
        ],
    )
    add = resource(
        "Tool", "add", {"name": "add", "toolType": "function", "execute": {"builtin": {"name": "add"}}}
    )
    setup_agent(kubectl, namespace, [add])
    apply(
        kubectl, namespace, resource("TaskRun", "r", {"agentRef": {"name": "agent"}, "userMessage": question})
    )
    wait_for(lambda: chaos_llm.in_flight(question), 60, what="the LLM request")

    def tasks_done() -> float:  # by every worker: either may be the one making the call
        ports = [port for name, port in chaos_stack.metrics_ports.items() if name in chaos_stack.workers]
        return sum(total(scrape(port), "kubechain_tasks_total") for port in ports)

    done_before = tasks_done()  # the task making the call is not done
    kubectl("delete", "taskrun", "r", "--wait=false", namespace=namespace)
    wait_for(lambda: not get(kubectl, namespace, "taskrun", "r"), 30, what="deletion")
    # The in-flight call returns, and the task that made it ends (whatever it then tried) before we look.
    wait_for(
        lambda: chaos_llm.requests(question) and not chaos_llm.in_flight(question), 30, what="the LLM answer"
    )
    wait_for(
        lambda: tasks_done() > done_before,
        30,
        what="the worker to finish the task that made the LLM call",
    )
    wait_for(lambda: chaos_stack.workers["worker-0"].running(), 5, what="worker alive")
    calls = json.loads(kubectl("get", "taskruntoolcall", "-o", "json", namespace=namespace).stdout)["items"]
    assert calls == [], "no tool calls were created for a deleted run"
    assert len(chaos_llm.requests(question)) == 1


def test_hundred_runs_with_a_worker_killed_midway(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str, kube: object
) -> None:
    prefix = f"burst {namespace}"
    chaos_llm.add_rule(prefix, [{"content": "ok", "delay_s": 0.5}])
    setup_agent(kubectl, namespace)
    for i in range(100):
        kube.create_raw(  # type: ignore[attr-defined]
            "taskruns",
            namespace,
            {
                "apiVersion": "kubechain.humanlayer.dev/v1alpha1",
                "kind": "TaskRun",
                "metadata": {"name": f"r{i}"},
                "spec": {"agentRef": {"name": "agent"}, "userMessage": f"{prefix} #{i}"},
            },
        )

    def finished() -> int:
        items, _ = kube.list_raw("taskruns", namespace)  # type: ignore[attr-defined]
        return sum(1 for item in items if item.get("status", {}).get("phase") == "FinalAnswer")

    wait_for(lambda: finished() >= 20, 120, what="20 runs done")
    kill(chaos_stack, "worker-0")
    # The dead worker's claims are frozen now: exactly the turns the crash interrupted (whether its LLM
    # call was still running or had answered but not been recorded yet).
    items, _ = kube.list_raw("taskruns", namespace)  # type: ignore[attr-defined]
    interrupted = {
        item["spec"]["userMessage"]
        for item in items
        if item.get("status", {}).get("phase") == "SendContextWindowToLLM"
        and item["status"].get("claimedBy") == "worker-0"
    }
    wait_for(lambda: finished() == 100, 180, what="all 100 runs")
    requests = [
        r for r in httpx.get(f"{chaos_llm.url}/_admin/requests").json() if r["first_user"].startswith(prefix)
    ]
    per_run: dict[str, int] = {}
    for record in requests:
        per_run[record["first_user"]] = per_run.get(record["first_user"], 0) + 1
    assert set(per_run) == {f"{prefix} #{i}" for i in range(100)}, "every run asked the LLM"
    repeated = {run for run, count in per_run.items() if count > 1}
    assert all(count <= 2 for count in per_run.values()), "a turn is repeated at most once"
    assert repeated <= interrupted, "only calls cut off by the crash were repeated"


def test_deleting_the_task_mid_tool_call_stops_its_run(
    chaos_stack: LocalStack, chaos_llm: ScriptedLLM, kubectl: Kubectl, namespace: str
) -> None:
    api = SlowAPI(3.0)
    try:
        question = f"delete my task {namespace}"
        chaos_llm.add_rule(
            question, [{"tool_calls": [{"name": "work", "arguments": {"x": 1}}]}, {"content": "never"}]
        )
        tool = resource(
            "Tool",
            "work",
            {"name": "work", "toolType": "externalAPI", "execute": {"externalAPI": {"url": api.url}}},
        )
        setup_agent(kubectl, namespace, [tool])
        apply(kubectl, namespace, resource("Task", "t", {"agentRef": {"name": "agent"}, "message": question}))

        def running_call() -> bool:
            calls = json.loads(kubectl("get", "taskruntoolcall", "-o", "json", namespace=namespace).stdout)[
                "items"
            ]
            return any(c.get("status", {}).get("phase") == "Running" for c in calls)

        wait_for(running_call, 60, what="the tool call to run")
        owner = get(kubectl, namespace, "taskrun", "t-1")["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "Task" and owner["name"] == "t"
        kubectl("delete", "task", "t", "--wait=false", namespace=namespace)
        # The garbage collector removes the run and its tool calls (owner references all the way down).
        wait_for(lambda: not get(kubectl, namespace, "taskrun", "t-1"), 60, what="the run to be collected")
        wait_for(
            lambda: (
                json.loads(kubectl("get", "taskruntoolcall", "-o", "json", namespace=namespace).stdout)[
                    "items"
                ]
                == []
            ),
            60,
            what="its tool calls to be collected",
        )
        wait_for(lambda: len(api.intervals) == 1, 30, what="the in-flight tool call to return")
        assert len(chaos_llm.requests(question)) == 1, "no LLM call after the deletion"
        assert len(api.intervals) == 1, "the tool was not started again"
    finally:
        api.server.shutdown()
