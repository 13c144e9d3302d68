"""Delegation to sub-agents (pure): cycles and the depth limit, and the names of sub-agent runs."""

from __future__ import annotations

import re

from kubechain.statemachines.toolcall import child_run_name


def test_delegation_rules() -> None:
    from kubechain.statemachines.toolcall import delegation_problem

    assert delegation_problem(["boss"], "helper", 5) is None
    assert delegation_problem(["a", "b"], "a", 5) == "delegation cycle: a → b → a"
    assert "depth limit of 2" in (delegation_problem(["a", "b", "c"], "d", 2) or "")
    long = child_run_name("x" * 60 + "-abc1234-tc-01", "helper")
    assert len(long) <= 63 and long == child_run_name("x" * 60 + "-abc1234-tc-01", "helper")
    assert child_run_name("run-abc-tc-01", "helper") == "delegate-run-abc-tc-01-helper"


def test_the_delegation_depth_limit_is_the_depth_of_the_deepest_sub_agent_run() -> None:
    """A user's run is at depth 0 (the depth label), its sub-agent's at 1: a limit of N lets N levels of
    sub-agents run. A limit of 1 refused the first delegation (``chain``: the agents of the delegating
    run and of those above it, so the new run's depth is its length)."""
    from kubechain.statemachines.toolcall import delegation_problem

    assert delegation_problem(["a0"], "a1", 1) is None
    refused = delegation_problem(["a0", "a1"], "a2", 1) or ""
    assert refused.startswith("delegation depth limit of 1 reached: a sub-agent run at depth 2"), refused
    assert delegation_problem([f"a{i}" for i in range(5)], "a5", 5) is None
    assert delegation_problem([f"a{i}" for i in range(6)], "a6", 5) is not None
    assert delegation_problem(["a0"], "a1", 0) is not None, "0: no delegation at all"


def test_a_shortened_child_run_name_is_still_a_valid_name() -> None:
    dns_subdomain = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
    # Valid Agent names with a "." or "-" wherever the cut may land.
    agents = ["xxxxxxxxxxxxxxxx.research-team", "a" * 80] + [f"{'a' * k}.b-{'c' * 20}" for k in range(5, 30)]
    for agent in agents:
        name = child_run_name("hello-world-1-ab12cd3-tc-01", agent)
        assert len(name) <= 63 and dns_subdomain.fullmatch(name), name
        assert name == child_run_name("hello-world-1-ab12cd3-tc-01", agent), "stable"
