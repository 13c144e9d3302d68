"""``kubechain up``: everything on this machine, in the foreground, until Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import click

from kubechain.cli import main


@main.command()
@click.option(
    "--cluster",
    type=click.Choice(["auto", "local", "current"]),
    default="auto",
    show_default=True,
    help="local: start etcd + kube-apiserver here; current: the kubeconfig's current context; "
    "auto: current if it answers, else local",
)
@click.option("--workers", default=1, show_default=True, help="worker processes")
@click.option("--concurrency", default=16, show_default=True, help="threads per worker process")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".kubechain"), show_default=True)
def up(cluster: str, workers: int, concurrency: int, workdir: Path) -> None:
    """Run KubeChain locally: control plane (if needed), Redis, scripted LLM, watcher and workers."""
    from kubechain.testing.stack import LocalStack, StackOptions, cluster_reachable

    def say(message: str) -> None:
        click.echo(click.style("[kubechain] ", fg="cyan") + message, err=True)

    if cluster == "auto":
        cluster = "current" if cluster_reachable(None) else "local"
        say(f"cluster: {'the current kube context' if cluster == 'current' else 'a local control plane'}")
    workdir = workdir.resolve()
    kubeconfig = None
    if cluster == "current":
        kubeconfig = Path(os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config"))
    real_llm = bool(os.environ.get("OPENAI_API_KEY") or os.environ.get("ANTHROPIC_API_KEY"))
    options = StackOptions(
        workdir=workdir,
        cluster=cluster,
        kubeconfig=kubeconfig,
        workers=workers,
        worker_concurrency=concurrency,
        llm="real" if real_llm else "scripted",
        resync_interval_s=15.0,
        stale_after_s=15.0,
        supervise=True,
    )
    stack = LocalStack(options, progress=say)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stack.start()
        if real_llm:
            say("an API key is configured: LLM resources call their real provider")
        else:
            say(
                "no OPENAI_API_KEY: LLMs of provider openai without spec.parameters.baseUrl are answered by the "
                f"local scripted LLM at {stack.llm_base_url}"
            )
        click.echo("\nKubeChain is running. In another terminal:\n")
        click.echo(f"    export KUBECONFIG={stack.kubeconfig}\n")
        click.echo("Press Ctrl-C to stop.\n")
        while not stop.is_set():
            stop.wait(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abort the clean shutdown
        say("stopping")
        started = time.monotonic()
        stack.stop()
        say(f"stopped ({time.monotonic() - started:.1f}s)")
