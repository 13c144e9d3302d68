"""``kubechain worker`` and ``kubechain watcher``: the two long-running processes (see the Procfile)."""

from __future__ import annotations

import click

from kubechain.cli import main


@main.command()
@click.option(
    "--queues", "-Q", default="control,llm,tools", show_default=True, help="Celery queues to consume"
)
@click.option(
    "--pool",
    # No gevent/eventlet: they need monkey-patching before anything else is imported.
    type=click.Choice(["threads", "prefork", "solo"]),
    default="threads",
    show_default=True,
    help="I/O-bound work (LLM and tool calls) wants threads",
)
@click.option("--concurrency", "-c", default=16, show_default=True)
@click.option("--name", "-n", default=None, help="worker node name")
@click.option("--loglevel", default=None)
def worker(queues: str, pool: str, concurrency: int, name: str | None, loglevel: str | None) -> None:
    """Run a worker that executes validate / prepare / llm_call / tool_call tasks."""
    from workers.app import app, settings

    argv = [
        "worker",
        "--queues",
        queues,
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel or settings.log_level,
        "--without-gossip",
        "--without-mingle",
    ]
    if name:
        argv += ["--hostname", f"{name}@%h"]
    app.worker_main(argv)


@main.command()
@click.option("--no-leader-election", is_flag=True, help="run as the only watcher, without a Lease")
def watcher(no_leader_election: bool) -> None:
    """Run the watcher: CRD events → Celery tasks."""
    from watcher.main import main as watcher_main

    watcher_main(["--no-leader-election"] if no_leader_election else [])
