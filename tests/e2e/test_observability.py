"""Metrics scraped from the watcher and worker processes after a run."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kubechain.testing.stack import LocalStack
from kubechain.testing.waiting import wait_for
from tests.conftest import Kubectl
from tests.e2e.conftest import OPENAI_SECRET, ScriptedLLM, apply, get, llm_resource, phase, resource


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == val for k, val in labels.items())
    )


def test_metrics_after_a_run(stack: LocalStack, kubectl: Kubectl, namespace: str, llm: ScriptedLLM) -> None:
    question = f"metrics please {namespace}"
    llm.add_rule(
        question, [{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 1}}]}, {"content": "two"}]
    )
    add = resource(
        "Tool", "add", {"name": "add", "toolType": "function", "execute": {"builtin": {"name": "add"}}}
    )
    agent = resource(
        "Agent", "counter", {"llmRef": {"name": "gpt-4o"}, "tools": [{"name": "add"}], "system": "Count."}
    )
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), add, agent)
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

    worker = scrape(stack.metrics_ports["worker-0"])
    # A worker that consumes the llm queue makes the calls of the turns it made ready itself (hand-off).
    llm_turns = total(worker, "kubechain_tasks_total", task="llm_call", outcome="ok")
    assert llm_turns + total(worker, "kubechain_llm_handoffs_total", outcome="ok") >= 2
    assert total(worker, "kubechain_tasks_total", task="tool_call", outcome="ok") >= 1
    assert total(worker, "kubechain_llm_requests_total", outcome="ok") >= 2
    assert total(worker, "kubechain_llm_tokens_total", kind="prompt") > 0
    assert total(worker, "kubechain_tool_calls_total", tool="add", outcome="ok") >= 1
    assert total(worker, "kubechain_llm_request_duration_seconds_count") >= 2

    watcher = wait_for(
        lambda: (
            (s := scrape(stack.metrics_ports["watcher-0"]))
            and total(s, "kubechain_runs", phase="FinalAnswer") >= 1
            and s
        ),
        10,
        what="watcher gauges",
    )
    assert total(watcher, "kubechain_watch_events_total", kind="TaskRun") >= 3
    assert total(watcher, "kubechain_enqueued_total", task="prepare") >= 2
    assert total(watcher, "kubechain_watcher_leader") == 1
    assert any(n == "kubechain_queue_depth" for n, _ in watcher)


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
