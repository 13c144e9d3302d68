"""Validations that wait on the outside world (an MCP server that never answers) never delay a run.

This module runs its own stack laid out as `kubechain up` lays it out, so its session's shared stack's
watchers are paused meanwhile (see tests.conftest.exclusive_stack).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubechain.testing.stack import LocalStack, StackOptions
from kubechain.testing.waiting import wait_for
from tests.conftest import Kubectl, exclusive_stack
from tests.e2e.conftest import OPENAI_SECRET, ScriptedLLM, apply, get, llm_resource, phase, resource
from tests.unit.silent_server import SilentServer

THREADS = 4  # per worker process: fewer hung servers than this would leave a thread free by chance
HUNG_SERVERS = THREADS + 2


@pytest.fixture(scope="module")
def up_stack(kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    options = StackOptions(
        workdir=tmp_path_factory.mktemp("hung-checks-stack"),
        cluster="current",
        kubeconfig=kubeconfig,
        workers=1,
        worker_concurrency=THREADS,
        checks_workers=1,  # as `kubechain up` runs them (tests/unit/test_queues.py)
        resync_interval_s=2.0,
        stale_after_s=2.0,
        extra_env={
            # Its own leader lease, so it leads at once whatever other stacks hold.
            "KUBECHAIN_LEASE_NAME": f"kubechain-watcher-hung-{uuid.uuid4().hex[:6]}",
            "KUBECHAIN_LEASE_DURATION_S": "4",
        },
    )
    with exclusive_stack(options) as stack:
        yield stack


@pytest.fixture
def hung_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def status(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return dict(get(kubectl, namespace, kind, name).get("status") or {})


def test_a_run_is_prepared_while_mcp_servers_that_never_answer_are_validated(
    kubectl: Kubectl, namespace: str, up_stack: LocalStack, hung_server: SilentServer
) -> None:
    llm = ScriptedLLM(up_stack.llm_url)
    question = f"Still there? ({namespace})"
    llm.add_rule(question, [{"content": "yes"}])
    agent = resource("Agent", "plain", {"llmRef": {"name": "gpt-4o"}, "system": "You answer."})
    apply(kubectl, namespace, OPENAI_SECRET, llm_resource(), agent)
    wait_for(lambda: status(kubectl, namespace, "agent", "plain").get("ready"), 60, what="the Agent Ready")

    # Servers that accept the connection and never answer: each validation holds its thread until the
    # MCP connect timeout (30 s) gives up. More of them than a worker has threads.
    hung = [f"hung-{index}" for index in range(HUNG_SERVERS)]
    url = f"http://127.0.0.1:{hung_server.port}/mcp"
    apply(
        kubectl,
        namespace,
        *(resource("MCPServer", name, {"transport": "http", "url": url}) for name in hung),
    )
    wait_for(lambda: len(hung_server.held) >= THREADS, 60, what=f"{THREADS} validations hanging")

    run = resource("TaskRun", "asked", {"agentRef": {"name": "plain"}, "userMessage": question})
    apply(kubectl, namespace, run)

    wait_for(lambda: phase(kubectl, namespace, "asked") == "FinalAnswer", 120, what="the run to finish")
    # Read after the run finished: a validation that had given up by then has its status written already.
    ended = [name for name in hung if status(kubectl, namespace, "mcpserver", name).get("statusDetail")]
    assert not ended, f"the run waited for hung validations to give up: {ended} had"
    assert get(kubectl, namespace, "taskrun", "asked")["status"]["output"] == "yes"
