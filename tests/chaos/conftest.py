"""Chaos tier: each test gets its own stack (own Redis, two workers) so faults stay contained."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubechain.testing.controlplane import LocalControlPlane
from kubechain.testing.stack import LocalStack, StackOptions
from tests.chaos.late_claims_proxy import LateClaimsProxy
from tests.conftest import exclusive_stack
from tests.e2e.conftest import ScriptedLLM

CLAIM_TIMEOUT_S = 6.0


@pytest.fixture
def late_claims(control_plane: LocalControlPlane) -> Iterator[LateClaimsProxy]:
    """A proxy in front of the API server that answers LLM claim writes as late as a test says; the
    workers of a stack marked ``stack(late_claims=True)`` reach the API server through it (the watcher
    does not)."""
    with LateClaimsProxy(control_plane) as proxy:
        yield proxy


@pytest.fixture
def chaos_stack(kubeconfig: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalStack]:
    marker = request.node.get_closest_marker("stack")
    overrides = dict(marker.kwargs) if marker else {}
    worker_env: dict[str, str] = {}
    if overrides.pop("late_claims", False):
        proxy: LateClaimsProxy = request.getfixturevalue("late_claims")
        worker_env["KUBECONFIG"] = str(proxy.kubeconfig(kubeconfig, tmp_path / "kubeconfig-late-claims"))
    options = StackOptions(
        workdir=tmp_path / "stack",
        cluster="current",
        kubeconfig=kubeconfig,
        workers=overrides.pop("workers", 2),
        worker_concurrency=overrides.pop("worker_concurrency", 16),
        watchers=overrides.pop("watchers", 1),
        resync_interval_s=1.0,
        stale_after_s=1.0,
        claim_timeout_s=overrides.pop("claim_timeout_s", CLAIM_TIMEOUT_S),
        supervise=overrides.pop("supervise", False),
        extra_env={
            "KUBECHAIN_LEASE_DURATION_S": "4",
            # calls must end within a claim (Settings checks it); the scripted delays here are ≤ 3 s
            "KUBECHAIN_LLM_TIMEOUT_S": "5",
            "KUBECHAIN_TOOL_TIMEOUT_S": "5",
            **overrides.pop("env", {}),
        },
        worker_env=worker_env,
    )
    with exclusive_stack(options) as stack:
        yield stack


@pytest.fixture
def chaos_llm(chaos_stack: LocalStack) -> ScriptedLLM:
    return ScriptedLLM(chaos_stack.llm_url)


def kill(stack: LocalStack, name: str) -> None:
    process = stack.workers.get(name) or stack.watchers[name]
    assert process.pid is not None
    os.killpg(process.pid, signal.SIGKILL)
    assert process.proc is not None
    process.proc.wait(10)
