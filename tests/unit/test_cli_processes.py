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
        (
            "worker",
            {"KUBECHAIN_KUBE_QPS": "many"},
            "KUBECHAIN_KUBE_QPS: 'many': Input should be a valid number",
        ),
        # OverflowError in Celery's worker_ready, which swallowed it: the worker ran without /metrics
        # and /healthz
        (
            "worker",
            {"KUBECHAIN_METRICS_PORT": "70000"},
            "kubechain-worker: invalid settings: KUBECHAIN_METRICS_PORT: '70000': Input should be less than "
            "or equal to 65535",
        ),
        # logging's traceback
        (
            "watcher",
            {"KUBECHAIN_LOG_LEVEL": "LOUD"},
            "kubechain-watcher: invalid settings: KUBECHAIN_LOG_LEVEL: 'LOUD' is not a log level: one of "
            "DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
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


def test_the_watcher_run_as_a_module_refuses_a_bad_setting_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m watcher`` (not through the CLI's checks) ended in logging's traceback."""
    import watcher.main

    monkeypatch.setenv("KUBECHAIN_LOG_LEVEL", "LOUD")
    with pytest.raises(SystemExit) as exited:
        watcher.main.main([])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "kubechain-watcher: invalid settings: KUBECHAIN_LOG_LEVEL: 'LOUD' is not a log level: one of "
        "DEBUG, INFO, WARNING, ERROR, CRITICAL\n"
    )


@pytest.mark.slow  # starts Celery, ~5 s each
@pytest.mark.parametrize(
    ("environment", "said"),
    [
        (
            {"KUBECHAIN_LOG_LEVEL": "LOUD"},
            "KUBECHAIN_LOG_LEVEL: 'LOUD' is not a log level: one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        ({"KUBECHAIN_NAMESPACES": "[x"}, "KUBECHAIN_NAMESPACES: "),
    ],
)
def test_a_worker_started_by_celery_itself_refuses_a_bad_setting_in_one_line(
    environment: dict[str, str], said: str
) -> None:
    """``celery -A workers.app worker`` (as a user or a Procfile of their own may start it, without
    ``kubechain worker``'s checks) said it in Celery's "Unable to load celery application" and pydantic's
    traceback, some 40 lines."""
    import os
    import subprocess
    import sys

    started = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo"],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2, started.stderr
    assert started.stdout == ""
    assert started.stderr.startswith(f"kubechain-worker: invalid settings: {said}"), started.stderr
    assert started.stderr.count("\n") == 1, started.stderr


def test_a_worker_runs_no_more_threads_than_its_broker_connections_serve() -> None:
    """Each task thread acks on a broker connection of its own when Redis is slow: more threads than
    the pool has connections is refused at start, with the bound."""
    from click.testing import CliRunner

    from kubechain.cli import main
    from kubechain.settings import BROKER_MAX_CONNECTIONS

    result = CliRunner().invoke(main, ["worker", "--concurrency", str(BROKER_MAX_CONNECTIONS)])
    assert result.exit_code == 2 and f"1<=x<={BROKER_MAX_CONNECTIONS // 2}" in result.output


@pytest.mark.parametrize("json_logs", [True, False])
def test_a_worker_logging_json_starts_without_celerys_banner(
    monkeypatch: pytest.MonkeyPatch, json_logs: bool
) -> None:
    """The banner is raw text on stdout: in a JSON log, where every line is an object, it is noise a log
    pipeline cannot parse. Read as text, at a terminal, it says what the worker consumes: kept there."""
    from click.testing import CliRunner

    import workers.app
    from kubechain.cli import main, processes

    started: list[list[str]] = []
    monkeypatch.setattr(processes, "check_startup", lambda component: None)
    monkeypatch.setattr(processes, "_only_log_lines", lambda level: None)  # this process's logging stays
    monkeypatch.setattr(workers.app.settings, "log_json", json_logs)
    monkeypatch.setattr(processes, "_run_celery", lambda app, argv: started.append(argv) or 0)
    result = CliRunner().invoke(main, ["worker"])
    assert result.exit_code == 0, result.output
    (argv,) = started
    assert ("--quiet" in argv[: argv.index("worker")]) is json_logs  # celery's option, not its worker's


@pytest.mark.slow
def test_a_worker_logging_json_writes_nothing_but_json_lines(tmp_path: Path) -> None:
    """Started, then stopped as Kubernetes stops it (SIGTERM): everything it wrote on stdout and stderr
    (Celery's banner and shutdown lines among what it wrote raw) is one JSON object a line."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading

    from kubechain.testing.waiting import wait_for

    with socket.socket() as s:  # a port nothing listens on: the broker is never reached
        s.bind(("127.0.0.1", 0))
        broker_port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u, namespace: default}}]\n"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "KUBECONFIG": str(kubeconfig),
        "KUBECHAIN_LOG_JSON": "true",
        "REDIS_URL": f"redis://127.0.0.1:{broker_port}/0",
        "OTEL_SDK_DISABLED": "true",
        "KUBECHAIN_MAX_TOOL_RESULT_BYTE": "1",  # mistyped: warned of once, in a line of JSON too
    }
    worker = subprocess.Popen(
        [sys.executable, "-c", "from kubechain.cli import main; main(['worker', '-c', '2'])"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.extend(worker.stdout or []), daemon=True),
        threading.Thread(target=lambda: err.extend(worker.stderr or []), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        # started: its consumer tries the broker (after the banner would have been written)
        wait_for(
            lambda: worker.poll() is not None or any("Cannot connect" in line for line in err),
            timeout_s=60,
            what="a connection error",
        )
        assert worker.poll() is None, "".join(err)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    for reader in readers:
        reader.join(timeout=10)
    lines = [line for line in out + err if line.strip()]
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not not_json, "".join(not_json)
    assert any("shutdown" in json.loads(line)["message"].lower() for line in lines), "".join(lines)
    warned = [line for line in lines if "KUBECHAIN_MAX_TOOL_RESULT_BYTE " in line]
    assert len(warned) == 1 and json.loads(warned[0])["message"] == (
        "KUBECHAIN_MAX_TOOL_RESULT_BYTE is not a KubeChain setting: it is ignored (did you mean "
        "KUBECHAIN_MAX_TOOL_RESULT_BYTES?)"
    ), "".join(lines)


def test_a_worker_that_stops_on_an_error_exits_with_its_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's worker_main drops the worker's exit code: one stopped by an error (its /metrics port
    taken, an unrecoverable error) exited 0, as if it had been asked to stop."""
    from click.testing import CliRunner

    import workers.app
    from kubechain.cli import main, processes

    monkeypatch.setattr(processes, "check_startup", lambda component: None)
    for code in (1, 0):

        class Stopped:  # Celery's worker, stopped with this exit code
            exitcode = code

            def __init__(self, **_: object) -> None:
                pass

            def start(self) -> None:
                pass

        monkeypatch.setattr(workers.app.app, "Worker", Stopped)
        result = CliRunner().invoke(main, ["worker"])
        assert result.exit_code == code, result.output


@pytest.mark.parametrize("json_logs", [True, False])
def test_a_workers_loglevel_option_sets_its_log_level(
    monkeypatch: pytest.MonkeyPatch, json_logs: bool
) -> None:
    """`kubechain worker --loglevel DEBUG` logged at KUBECHAIN_LOG_LEVEL (INFO) all the same: Celery was
    given the level, but the worker's logging, set up on Celery's setup_logging signal, read the setting."""
    from celery import signals
    from click.testing import CliRunner

    import workers.app
    from kubechain.cli import main, processes

    configured: list[str] = []
    monkeypatch.setattr(workers.app.settings, "log_level", "INFO")
    monkeypatch.setattr(workers.app.settings, "log_json", json_logs)
    monkeypatch.setattr(workers.app, "configure_logging", lambda level, json_output: configured.append(level))
    monkeypatch.setattr(processes, "_only_log_lines", lambda level: configured.append(level))
    monkeypatch.setattr(processes, "check_startup", lambda component: None)

    def run_celery(app: object, argv: list[str]) -> int:
        # as Celery's worker sets its logging up: the signal, with the level it was given
        signals.setup_logging.send(sender=None, loglevel=10, logfile=None, format="", colorize=False)
        return 0

    monkeypatch.setattr(processes, "_run_celery", run_celery)
    result = CliRunner().invoke(main, ["worker", "--loglevel", "debug"])
    assert result.exit_code == 0, result.output
    assert configured and set(configured) == {"DEBUG"}, configured
    refused = CliRunner().invoke(main, ["worker", "--loglevel", "LOUD"])
    assert refused.exit_code == 2 and "'LOUD' is not one of" in refused.output, refused.output
