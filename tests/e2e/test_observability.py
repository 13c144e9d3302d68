"""Metrics scraped from the watcher and worker processes before and after a run.

The e2e stack is shared by the whole session, so every assertion is on the change this test's own run
makes: counters as deltas between a scrape before and one after, labelled by a model and a tool no other
test uses; the watcher's per-phase gauge against what the API server holds."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kubechain.queueing import QueueName
from kubechain.testing.stack import LocalStack
from kubechain.testing.waiting import wait_for
from tests.conftest import Kubectl
from tests.e2e.conftest import OPENAI_SECRET, ScriptedLLM, apply, get, phase, resource

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_once_up(port: int) -> Samples:
    """The first scrape of a process the session may have only just started (its endpoint not yet up)."""

    def attempt() -> Samples | None:
        try:
            return scrape(port)
        except httpx.TransportError:
            return None

    return wait_for(attempt, 30, what=f"/metrics on port {port}")


def families(port: int) -> dict[str, str]:
    """Family name (a counter's without ``_total``) -> type, samples or not."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == val for k, val in labels.items())
    )


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(ls)[label] for n, ls in samples if n == name and label in dict(ls)}


def worker_ports(stack: LocalStack) -> list[int]:
    return [port for process, port in sorted(stack.metrics_ports.items()) if process.startswith("worker")]


def scrape_workers(stack: LocalStack, scrape_one: Callable[[int], Samples] = scrape) -> Samples:
    """Every worker's samples added up (which worker ran which task is theirs to decide)."""
    summed: Samples = {}
    for port in worker_ports(stack):
        for key, value in scrape_one(port).items():
            summed[key] = summed.get(key, 0.0) + value
    return summed


class Delta:
    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return total(self.after, name, **labels) - total(self.before, name, **labels)


def settled(scrape_now: Callable[[], Samples], check: Callable[[Samples], None], what: str) -> Samples:
    """Scrapes until ``check`` (plain asserts) passes: a process counts a task after the status write
    that ended it. Never passing, the last scrape's assertion failure is raised."""
    failure: list[AssertionError] = []

    def passes() -> Samples | None:
        samples = scrape_now()
        try:
            check(samples)
        except AssertionError as exc:
            failure[:] = [exc]
            return None
        return samples

    try:
        return wait_for(passes, 20, what=what)
    except TimeoutError:
        raise failure[0] from None


def phases_in_the_cluster(kubectl: Kubectl) -> dict[str, float]:
    """TaskRuns by phase, counted as kubechain_runs counts them (no phase yet: "New")."""
    runs = json.loads(kubectl("get", "taskruns", "--all-namespaces", "-o", "json").stdout)["items"]
    counts: dict[str, float] = {}
    for run in runs:
        name = run.get("status", {}).get("phase") or "New"
        counts[name] = counts.get(name, 0.0) + 1
    return counts


def runs_gauge(samples: Samples) -> dict[str, float]:
    return {dict(ls)["phase"]: v for (n, ls), v in samples.items() if n == "kubechain_runs" and v}


def test_metrics_change_by_what_one_run_did(
    stack: LocalStack, kubectl: Kubectl, namespace: str, llm: ScriptedLLM
) -> None:
    # Labels no other test of the session uses: the model's and the tool's series are this run's alone.
    model = f"metrics-model-{namespace}"
    tool = f"add-{namespace.removeprefix('t-')}"
    question = f"metrics please {namespace}"
    # A 503 first (overloaded): the turn's retry is an llm_call task, where every other turn is a hand-off
    # (a worker calls the LLM at once for a turn it made ready itself). Then a tool call, then the answer.
    first_turn = {
        "error": {"status": 503, "message": "overloaded", "times": 1},
        "then": {"tool_calls": [{"name": tool, "arguments": {"a": 1, "b": 1}}]},
    }
    llm.add_rule(question, [first_turn, {"content": "two"}])
    watcher_port = stack.metrics_ports["watcher-0"]
    workers_before = scrape_workers(stack, scrape_once_up)
    watcher_before = scrape_once_up(watcher_port)

    llm_resource = resource(
        "LLM",
        "metrics-llm",
        {
            "provider": "openai",
            "apiKeyFrom": {"secretKeyRef": {"name": "openai", "key": "OPENAI_API_KEY"}},
            "parameters": {"model": model},
        },
    )
    add = resource(
        "Tool", tool, {"name": tool, "toolType": "function", "execute": {"builtin": {"name": "add"}}}
    )
    agent = resource(
        "Agent", "counter", {"llmRef": {"name": "metrics-llm"}, "tools": [{"name": tool}], "system": "Count."}
    )
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource, add, agent)
    wait_for(
        lambda: get(kubectl, namespace, "agent", "counter").get("status", {}).get("ready"),
        60,
        what="agent ready",
    )
    apply(
        kubectl,
        namespace,
        resource("TaskRun", "m", {"agentRef": {"name": "counter"}, "userMessage": question}),
    )
    wait_for(lambda: phase(kubectl, namespace, "m") == "FinalAnswer", 60, what="FinalAnswer")
    usage = get(kubectl, namespace, "taskrun", "m")["status"]["tokenUsage"]
    requests = sorted(llm.requests(question), key=lambda r: r["seq"])
    assert [r["status_code"] for r in requests] == [503, 200, 200], requests
    assert {r["model"] for r in requests} == {model}

    def worker_changes(after: Samples) -> None:
        delta = Delta(workers_before, after)
        # Tasks by name and outcome, and their latency (every task once at least: other tests' runs
        # may still be taking turns, so not exactly).
        for task in ("validate", "prepare", "llm_call", "tool_call"):
            assert delta("kubechain_tasks_total", task=task, outcome="ok") >= 1, task
            assert delta("kubechain_task_duration_seconds_count", task=task) >= 1, task
        assert delta("kubechain_llm_handoffs_total", outcome="ok") >= 1
        # LLM requests by model and outcome, with latency and tokens: exactly this run's three requests.
        assert delta("kubechain_llm_requests_total", model=model, outcome="retryable") == 1
        assert delta("kubechain_llm_requests_total", model=model, outcome="ok") == 2
        assert delta("kubechain_llm_requests_total", model=model) == 3
        assert delta("kubechain_llm_request_duration_seconds_count", model=model) == 3
        assert delta("kubechain_llm_request_duration_seconds_sum", model=model) > 0
        assert usage["promptTokens"] > 0 and usage["completionTokens"] > 0, usage
        assert delta("kubechain_llm_tokens_total", model=model, kind="prompt") == usage["promptTokens"]
        assert (
            delta("kubechain_llm_tokens_total", model=model, kind="completion") == usage["completionTokens"]
        )
        # Tool calls by tool, with outcome and latency: the one call.
        assert delta("kubechain_tool_calls_total", tool=tool, outcome="ok") == 1
        assert delta("kubechain_tool_calls_total", tool=tool) == 1
        assert delta("kubechain_tool_call_duration_seconds_count", tool=tool) == 1
        assert delta("kubechain_tool_call_duration_seconds_sum", tool=tool) > 0

    settled(lambda: scrape_workers(stack), worker_changes, "the workers' metrics of the run")
    for port in worker_ports(stack):
        # Counted when a write loses (tests/integration/test_kube_client.py makes one); exposed always.
        assert families(port).get("kubechain_status_write_conflicts") == "counter", port

    def watcher_changes(after: Samples) -> None:
        delta = Delta(watcher_before, after)
        assert delta("kubechain_watch_events_total", kind="TaskRun") >= 3
        assert delta("kubechain_enqueued_total", task="prepare") >= 1
        assert total(after, "kubechain_watcher_leader") == 1
        assert label_values(after, "kubechain_queue_depth", "queue") == {queue.value for queue in QueueName}
        # Runs by phase: this run's FinalAnswer among them, as many of each phase as the cluster holds.
        assert runs_gauge(after) == phases_in_the_cluster(kubectl)
        assert phase(kubectl, namespace, "m") == "FinalAnswer"

    watcher_after = settled(lambda: scrape(watcher_port), watcher_changes, "the watcher's metrics of the run")
    final_answers = total(watcher_after, "kubechain_runs", phase="FinalAnswer")
    assert final_answers >= 1

    kubectl("delete", "taskrun", "m", "--wait=true", namespace=namespace)

    def deletion_counted(after: Samples) -> None:
        assert runs_gauge(after) == phases_in_the_cluster(kubectl)
        assert total(after, "kubechain_runs", phase="FinalAnswer") < final_answers

    settled(lambda: scrape(watcher_port), deletion_counted, "the deleted run's phase uncounted")


def test_healthz_of_the_watcher_and_the_workers(stack: LocalStack) -> None:
    """Liveness is a worker's consumer loop beating (it beats once connected to Redis) and the watcher's
    loop threads living, served beside /metrics on the same port."""
    for process, port in stack.metrics_ports.items():
        answer = wait_for(
            lambda port=port: (a := httpx.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200 and a,
            30,
            what=f"{process} healthy",
        )
        assert answer.text == "ok\n", (process, answer.text)
    assert {"watcher-0", "worker-0"} <= set(stack.metrics_ports)
