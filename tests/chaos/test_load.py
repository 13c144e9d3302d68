"""1,000 TaskRuns at once with two worker processes: all finish, one LLM request per turn, bounded memory."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kubechain.testing.stack import LocalStack
from kubechain.testing.waiting import wait_for
from tests.chaos.test_crashes import setup_agent
from tests.conftest import Kubectl
from tests.e2e.conftest import ScriptedLLM

RUNS = int(__import__("os").environ.get("KUBECHAIN_LOAD_RUNS", "1000"))


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the worker's pool)."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


# The product's claim timeout, not the crash tests' 6 s: nothing is killed here, and on a machine slow
# enough that a claim write takes seconds, 6 s claims were answered too late to act on and runs failed as
# interrupted twice, which says nothing about load.
@pytest.mark.stack(workers=2, worker_concurrency=32, claim_timeout_s=180.0)
def test_thousand_runs_at_once(
    chaos_stack: LocalStack,
    chaos_llm: ScriptedLLM,
    kubectl: Kubectl,
    namespace: str,
    kube: object,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prefix = f"load {namespace}"
    chaos_llm.add_rule(prefix, [{"content_template": "done: {user}"}])
    setup_agent(kubectl, namespace)
    body = lambda i: {  # noqa: E731
        "apiVersion": "kubechain.humanlayer.dev/v1alpha1",
        "kind": "TaskRun",
        "metadata": {"name": f"run-{i:04d}"},
        "spec": {"agentRef": {"name": "agent"}, "userMessage": f"{prefix} #{i}"},
    }
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: kube.create_raw("taskruns", namespace, body(i)), range(RUNS)))  # type: ignore[attr-defined]
    created = time.monotonic()
    peak = {"rss": 0}

    def finished() -> bool:
        peak["rss"] = max(peak["rss"], sum(rss_kib(p.pid) for p in chaos_stack.workers.values() if p.pid))
        items, _ = kube.list_raw("taskruns", namespace)  # type: ignore[attr-defined]
        return sum(1 for item in items if item.get("status", {}).get("phase") == "FinalAnswer") == RUNS

    wait_for(finished, 600, interval_s=0.5, what=f"{RUNS} FinalAnswers")
    done = time.monotonic()
    requests = [
        r
        for r in __import__("httpx").get(f"{chaos_llm.url}/_admin/requests").json()
        if r["first_user"].startswith(prefix)
    ]
    assert len(requests) == RUNS, "exactly one LLM request per run (one turn each)"
    assert len({r["first_user"] for r in requests}) == RUNS, "zero duplicates"
    with capsys.disabled():
        print(
            f"\n[load] {RUNS} runs: created in {created - started:.1f}s, all FinalAnswer after {done - started:.1f}s "
            f"({RUNS / (done - started):.1f} runs/s); peak RSS of 2 worker processes {peak['rss'] / 1024:.0f} MiB"
        )
    assert peak["rss"] < 1024 * 1024, "worker memory stays under 1 GiB"
