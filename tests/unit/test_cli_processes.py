"""``kubechain watcher`` and ``kubechain worker``: what they refuse to start on, in one line each."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_worker_refuses_pools_it_cannot_run(pool: str) -> None:
    """gevent/eventlet need monkey-patching before any import; the CLI would start them unpatched."""
    from click.testing import CliRunner

    from kubechain.cli import main

    result = CliRunner().invoke(main, ["worker", "--pool", pool])
    assert result.exit_code == 2
    assert "Invalid value for '--pool'" in result.output


@pytest.mark.parametrize(
    ("command", "environment", "said"),
    [
        (
            "watcher",
            {"KUBECHAIN_NAMESPACES": "[x"},
            "kubechain-watcher: invalid settings: KUBECHAIN_NAMESPACES: ",
        ),
        (
            "worker",
            {"KUBECHAIN_LLM_TIMEOUT_S": "300"},
            "kubechain-worker: invalid settings: KUBECHAIN_CLAIM_TIMEOUT_S (180 s) must be longer than "
            "KUBECHAIN_LLM_TIMEOUT_S (300 s)",
        ),
        ("worker", {"KUBECHAIN_KUBE_QPS": "many"}, "KUBECHAIN_KUBE_QPS: Input should be a valid number"),
        ("watcher", {}, "kubechain-watcher: cannot load the cluster connection from "),
        ("worker", {}, "kubechain-worker: cannot load the cluster connection from "),
    ],
)
def test_the_processes_refuse_to_start_on_a_bad_setting_or_kubeconfig_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str, environment: dict[str, str], said: str
) -> None:
    """The watcher ended in a traceback; a worker started, answered its health checks, then failed every
    task (its cluster connection is made at its first task)."""
    from click.testing import CliRunner

    import watcher.main
    from kubechain.cli import main

    started: list[object] = []
    monkeypatch.setattr(watcher.main, "main", lambda *args: started.append(args))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(main, [command])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert said in result.output
    assert "Traceback" not in result.output and not started


def test_a_worker_runs_no_more_threads_than_its_broker_connections_serve() -> None:
    """Each task thread acks on a broker connection of its own when Redis is slow: more threads than
    the pool has connections is refused at start, with the bound."""
    from click.testing import CliRunner

    from kubechain.cli import main
    from kubechain.settings import BROKER_MAX_CONNECTIONS

    result = CliRunner().invoke(main, ["worker", "--concurrency", str(BROKER_MAX_CONNECTIONS)])
    assert result.exit_code == 2 and f"1<=x<={BROKER_MAX_CONNECTIONS // 2}" in result.output
