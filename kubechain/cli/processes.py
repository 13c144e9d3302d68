"""``kubechain worker`` and ``kubechain watcher``: the two long-running processes (see the Procfile)."""

from __future__ import annotations

import logging
from typing import Any

import click

from kubechain.cli import main
from kubechain.settings import LOG_LEVELS, MAX_WORKER_CONCURRENCY


@main.command()
@click.option(
    "--queues", "-Q", default="control,checks,llm,tools", show_default=True, help="Celery queues to consume"
)
@click.option(
    "--pool",
    # No gevent/eventlet: they need monkey-patching before anything else is imported.
    type=click.Choice(["threads", "prefork", "solo"]),
    default="threads",
    show_default=True,
    help="I/O-bound work (LLM and tool calls) wants threads",
)
@click.option(
    "--concurrency",
    "-c",
    default=16,
    show_default=True,
    # each thread acks on its own broker connection when Redis is slow: kept within the pool's size
    type=click.IntRange(1, MAX_WORKER_CONCURRENCY),
)
@click.option("--name", "-n", default=None, help="worker node name")
@click.option(
    "--loglevel",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default=None,
    help="log level (default: KUBECHAIN_LOG_LEVEL, else INFO)",
)
def worker(queues: str, pool: str, concurrency: int, name: str | None, loglevel: str | None) -> None:
    """Run a worker that executes validate / prepare / llm_call / tool_call tasks."""
    check_startup("kubechain-worker")
    from workers.app import app, settings

    if loglevel:
        # the setting the worker's logging is set up from (on Celery's setup_logging signal, and here for
        # JSON logs): given to Celery alone, the option changed nothing
        settings.log_level = loglevel.upper()
    argv = [
        "worker",
        "--queues",
        queues,
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
    ]
    if name:
        argv += ["--hostname", f"{name}@%h"]
    if settings.log_json:
        # no banner (raw text; kept in text mode, where it says what is consumed): celery's own option
        argv.insert(0, "--quiet")
        _only_log_lines(settings.log_level)
    exit_code = _run_celery(app, argv)
    if exit_code:
        raise SystemExit(exit_code)


def _run_celery(app: Any, argv: list[str]) -> int:
    """``app.worker_main(argv)``, with the exit code it drops (Celery's ``app.start`` does not return
    its command's): a worker that stopped on an error (its /metrics port taken, an unrecoverable error)
    exited 0, as if asked to stop."""
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app  # as app.start does
    try:
        return int(celery_command.main(args=argv, standalone_mode=False) or 0)
    finally:
        celery_command.params[0].default = None


def _only_log_lines(level: str) -> None:
    """A JSON log holds nothing but JSON lines: logging is set up now, before Celery warns of anything
    at start (running as root, say), and the lines Celery writes raw at shutdown ("worker: Warm shutdown
    (MainProcess)") are log lines. Celery sets logging up again once started, the same way."""
    import celery.apps.worker

    from kubechain.observability.logs import configure_logging

    configure_logging(level, json_output=True)
    said = logging.getLogger("celery.apps.worker")

    def say(message: str, f: object = None) -> None:  # celery's safe_say, as a log line
        said.info(message.strip())

    celery.apps.worker.safe_say = say


@main.command()
@click.option("--no-leader-election", is_flag=True, help="run as the only watcher, without a Lease")
def watcher(no_leader_election: bool) -> None:
    """Run the watcher: CRD events → Celery tasks."""
    check_startup("kubechain-watcher")
    from watcher.main import main as watcher_main

    watcher_main(["--no-leader-election"] if no_leader_election else [])


def check_startup(component: str) -> None:
    """Refuses to start on a setting or kubeconfig the process cannot work with, in one line that names
    it: the watcher ended in a traceback, and a worker started, answered its health checks and then failed
    every task, because its cluster connection is made at its first task."""
    from kubechain.cli.resources import CLIError, client_or_refuse
    from kubechain.kube.client import KubeClient
    from kubechain.settings import SettingsInvalid, load_settings

    try:
        settings = load_settings()
    except SettingsInvalid as exc:
        raise CLIError(f"{component}: {exc}", 2) from None
    client_or_refuse(
        lambda: KubeClient.from_settings(settings, component), settings.kubeconfig, f"{component}: "
    ).close()
