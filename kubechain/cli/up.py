"""``kubechain up``: everything on this machine, in the foreground, until Ctrl-C."""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO

import click

from kubechain.cli import main
from kubechain.settings import MAX_WORKER_CONCURRENCY

# `up`'s working folder, by default: what is in a folder of that name is an earlier `up`'s (lock_workdir)
DEFAULT_WORKDIR = ".kubechain"


@main.command()
@click.option(
    "--cluster",
    type=click.Choice(["auto", "local", "current"]),
    default="auto",
    show_default=True,
    help="local: start etcd + kube-apiserver here; current: the kubeconfig's current context; "
    "auto: current if it answers and runs no KubeChain of its own, else local",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="worker processes")
@click.option(
    "--concurrency",
    default=16,
    show_default=True,
    # the bound `kubechain worker` itself checks: a larger one made every worker exit at once, restarted
    # again and again with a back-off
    type=click.IntRange(1, MAX_WORKER_CONCURRENCY),
    help="threads per worker process",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path(DEFAULT_WORKDIR),
    show_default=True,
    help="the folder of the local cluster's data, keys, kubeconfig and the logs (one `up` at a time)",
)
def up(cluster: str, workers: int, concurrency: int, workdir: Path) -> None:
    """Run KubeChain locally: control plane (if needed), Redis, scripted LLM, watcher and workers."""
    from kubechain.cli.resources import CLIError, client_or_refuse
    from kubechain.kube.client import KubeClient
    from kubechain.kube.connection import current_context, kubeconfig_path, load_connection
    from kubechain.settings import SettingsInvalid
    from kubechain.testing.controlplane import ControlPlaneError
    from kubechain.testing.stack import (
        DEPLOYED_LEASE,
        LocalStack,
        StackOptions,
        deployed_watcher,
        has_cluster_data,
        log_dirs,
        running_watcher,
        why_unusable,
    )

    def say(message: str) -> None:
        click.echo(click.style("[kubechain] ", fg="cyan") + message, err=True)

    log_level = processes_log_level()

    # a pod's in-cluster configuration (no kubeconfig) is the current context when asked for by name only
    unusable = why_unusable(None, in_cluster=cluster == "current") if cluster != "local" else None
    try:
        leading = running_watcher(None) if cluster != "local" and unusable is None else None
    except SettingsInvalid as exc:  # the Lease a local watcher takes is one of its settings
        raise CLIError(f"{exc} (the watcher and workers `up` starts read them too)", 2) from None
    holder = leading.holder if leading is not None else None
    running = second = ""
    if leading is not None:
        lease = "/".join(leading.lease)
        running = f"KubeChain already runs in the current cluster (its watcher {holder} holds Lease {lease}"
        if leading.lease == DEPLOYED_LEASE:  # under its own Lease: both would lead
            running += ")"
            second = "a second one would race it for every resource"
        else:  # the Lease a local watcher would take: it would stand by
            running += (
                ": another `kubechain up`, or the Procfile's watcher; one that was killed frees it within "
                f"{leading.duration_s:g} s)"
            )
            second = "a second one would stand by, its workers and scripted LLM unused"
    if cluster == "auto":
        cluster = "current" if unusable is None and holder is None else "local"
        if unusable is not None:
            say(f"not using the current kube context: {unusable.reason}")
        elif holder is not None:
            say(f"{running}: using a local control plane instead")
        say(f"cluster: {'the current kube context' if cluster == 'current' else 'a local control plane'}")
    elif cluster == "current" and unusable is not None:
        # one line, before anything starts: a garbled kubeconfig was a YAML parser's traceback, and a
        # cluster that does not answer failed the start's CRD install in urllib3's words
        if unusable.kubeconfig:
            raise CLIError(unusable.reason, 2)
        raise CLIError(f"cannot use the current kube context: {unusable.reason}")
    elif cluster == "current" and holder is not None:
        raise CLIError(f"{running}; {second}: use --cluster local")
    workdir = workdir.resolve()
    # current: the kubeconfig as kubectl reads it ($KUBECONFIG may list several files, merged); local: the
    # stack writes its own <workdir>/kubeconfig
    kubeconfig = kubeconfig_path() if cluster == "current" else None
    # the context the local processes use: later checks look there, whatever kubectl switches to meanwhile
    context = None
    if cluster == "current":
        try:
            context = current_context(kubeconfig)
        except Exception as exc:  # noqa: BLE001 - the kubeconfig changed since it was read just above
            reason = " ".join(str(exc).split())
            raise CLIError(f"cannot load the cluster connection from {kubeconfig}: {reason}", 2) from None
    options = StackOptions(
        workdir=workdir,
        cluster=cluster,
        kubeconfig=kubeconfig,
        context=context,
        workers=workers,
        worker_concurrency=concurrency,
        # validations that call out run in a process of their own, as deployed: an MCP server or LLM
        # endpoint that hangs holds none of the threads that prepare runs
        checks_workers=1,
        # The Secret an LLM names decides (the README's walkthrough makes it "scripted" without a key),
        # not whether OPENAI_API_KEY happens to be set in this terminal.
        llm="by-key",
        resync_interval_s=15.0,
        stale_after_s=15.0,
        log_level=log_level,
        supervise=True,
        redis_from_env=True,  # a Redis of the user's own ($REDIS_URL), if named; else a redis-server here
    )
    lease_reader: KubeClient | None = None  # asks, every DEPLOYED_CHECK_S, whether KubeChain was deployed
    if cluster == "current":
        # a missing or garbled kubeconfig, or a context whose credential plugin fails, is said here, before
        # anything starts (the stack's own start raised it as a traceback)
        lease_reader = client_or_refuse(
            lambda: KubeClient(load_connection(kubeconfig, context), timeout_s=5), kubeconfig
        )
    lock: IO[str] | None = None
    try:
        # before the stack, which makes the folder if need be: made here, it is private from the start.
        # Released in the finally below (and by the kernel if this process dies).
        lock = lock_workdir(workdir)
        stack = LocalStack(options, progress=say)
    except BaseException:
        if lock is not None:
            lock.close()
        if lease_reader is not None:
            lease_reader.close()
        raise
    stop = threading.Event()
    starting = True
    terminated = False
    stopped_by: list[int] = []  # the signal that asked for the stop: the exit status says which

    def on_termination(signum: int, _frame: object) -> None:
        nonlocal terminated
        stop.set()
        if not stopped_by:
            stopped_by.append(signum)
        if starting and not terminated:
            # as Ctrl-C does: the start (a 6-minute cold build of the control plane, say) ends now, and
            # what it started is stopped below; only once, so that the stopping itself is not cut short
            terminated = True
            raise Terminated
        terminated = True

    previous_sigterm = signal.signal(signal.SIGTERM, on_termination)
    # the terminal `up` runs in was closed: by default the process ended at once, without stopping what
    # it started in order (the control plane's etcd mid-write among them)
    previous_sighup = signal.signal(signal.SIGHUP, on_termination)
    # Set, not assumed: a shell without job control starts a background job (`kubechain up &` in a script)
    # with SIGINT ignored, and Python then leaves it ignored: `kill -INT` and Ctrl-C did nothing.
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    displaced_by: str | None = None
    failed: str | None = None
    had_data = cluster == "local" and has_cluster_data(workdir)
    try:
        try:
            stack.start()
            starting = False
        except start_failures() as exc:
            failed = f"could not start KubeChain: {exc}"
            if logs := log_dirs(options):
                failed += f"\n(logs: {', '.join(map(str, logs))})"
            if had_data and isinstance(exc, ControlPlaneError):
                # the README's way out, said where it helps: an earlier run's data the control plane
                # cannot start on (a data file damaged by a kill mid-write, a full disk)
                failed += (
                    f"\nIf the local cluster's data is damaged, delete {workdir} to start from nothing "
                    "(what was created in the local cluster is lost)"
                )
            return
        say(
            'LLMs of provider openai whose API key is "scripted" (and that set no spec.parameters.baseUrl) are '
            f"answered by the local scripted LLM at {stack.llm_base_url}; any other key calls the real provider"
        )
        click.echo("\nKubeChain is running. In another terminal:\n")
        click.echo(f"    {export_line(stack.kubeconfig, os.environ.get('PATH', ''), sys.executable)}\n")
        click.echo("Press Ctrl-C to stop.\n")
        next_check = time.monotonic() + DEPLOYED_CHECK_S
        while not stop.is_set():
            stop.wait(1.0)
            if cluster == "current" and time.monotonic() >= next_check:
                # KubeChain deployed into this cluster since we started: its watcher leads under its own
                # Lease, so both would act on every resource. The local one makes way.
                next_check = time.monotonic() + DEPLOYED_CHECK_S
                try:
                    displaced_by = deployed_watcher(kubeconfig, context=context, client=lease_reader)
                except Exception:  # noqa: BLE001 - a check that cannot be made now is made at the next one
                    displaced_by = None
                if displaced_by is not None:
                    break
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM or SIGHUP while starting (Terminated)
        interrupted = True
    else:
        interrupted = False
    finally:
        starting = False
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abort the clean shutdown
        if lease_reader is not None:
            lease_reader.close()
        say("stopping")
        started = time.monotonic()
        stack.stop()
        say(f"stopped ({time.monotonic() - started:.1f}s)")
        lock.close()
        # as they were (when `up` runs in a process that goes on: a test's)
        signal.signal(signal.SIGINT, previous_sigint)
        signal.signal(signal.SIGTERM, previous_sigterm)
        signal.signal(signal.SIGHUP, previous_sighup)
        if failed is not None:
            raise CLIError(failed)
    if displaced_by is not None:
        raise CLIError(
            f"KubeChain was deployed in the current cluster meanwhile (its watcher {displaced_by} holds Lease "
            f"{'/'.join(DEPLOYED_LEASE)}): the local processes stopped rather than race it for every resource"
        )
    # as a shell reports a process ended by SIGTERM, SIGHUP or SIGINT: a supervisor, or a script, tells a stop it
    # asked for from a failure (1, 2) and from an end of its own (none: `up` runs until stopped)
    if terminated:
        sys.exit(128 + (stopped_by[0] if stopped_by else signal.SIGTERM))  # 143 for SIGTERM, 129 for SIGHUP
    if interrupted:
        sys.exit(EXIT_SIGINT)


def processes_log_level() -> str:
    """The log level of the watcher and workers ``up`` starts: KUBECHAIN_LOG_LEVEL, the setting the README
    documents for them, when it is set in up's environment (the stack gives its processes a level of its
    own, which replaced it), else INFO. One they would refuse is refused here, before anything starts."""
    from kubechain.cli.resources import CLIError
    from kubechain.settings import log_level_named

    level = os.environ.get("KUBECHAIN_LOG_LEVEL", "")
    if not level.strip():
        return "INFO"
    try:
        return log_level_named(level)
    except ValueError as exc:
        raise CLIError(
            f"invalid settings: KUBECHAIN_LOG_LEVEL: {exc} (the watcher and workers read it)", 2
        ) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP while ``up`` starts: ends the start as Ctrl-C does."""


EXIT_SIGINT = 128 + signal.SIGINT  # 130


# How often `up --cluster current` checks that KubeChain has not been deployed into the cluster meanwhile.
DEPLOYED_CHECK_S = 15.0


def start_failures() -> tuple[type[BaseException], ...]:
    """The errors of a start that say what went wrong and what to do (imported here: every ``kubechain``
    command imports this module, and only ``up`` needs them)."""
    from kubechain.kube.errors import KubeAPIError
    from kubechain.testing.binaries import BinaryError
    from kubechain.testing.controlplane import ControlPlaneError
    from kubechain.testing.redis_server import RedisError
    from kubechain.testing.stack import ProcessStartError

    # OSError: a port, a file, a binary that would not start
    return (
        BinaryError,
        ControlPlaneError,
        RedisError,
        KubeAPIError,
        ProcessStartError,
        TimeoutError,
        OSError,
    )


# What an earlier `up` leaves in its working folder: .lock (every `up` since it is taken), logs (every one,
# an `up --cluster current` from before the .lock nothing else), controlplane and kubeconfig (a local
# cluster's), redis (the Redis it ran).
WORKDIR_MARKS = (".lock", "logs", "controlplane", "kubeconfig", "redis")


def lock_workdir(workdir: Path) -> IO[str]:
    """Take ``workdir`` for this process, or say who has it: a second ``up`` on the same folder rewrote
    the first one's token and kubeconfig, then waited 90 s on etcd's locked data file and blamed etcd.

    A new folder is made open to this user alone. A folder that exists keeps its mode (``up`` once made
    a shared 1777 folder private, even when its start then failed): the secrets in it are private files
    and folders of their own (the kubeconfig, ``controlplane/``). It must be empty or an earlier ``up``'s:
    ``--workdir .`` in a checkout, or ``~``, would be filled with a control plane, keys and logs, and
    deleting the folder is how the README starts from nothing."""
    from kubechain.cli.resources import CLIError

    try:
        workdir.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        _check_existing_workdir(workdir)
    except NotADirectoryError:
        above = next((parent for parent in reversed(workdir.parents) if parent.is_file()), workdir.parent)
        raise CLIError(f"cannot make --workdir {workdir}: {above} is not a folder", 2) from None
    except OSError as exc:  # in a folder this user cannot write in, on a read-only disk
        raise CLIError(f"cannot make --workdir {workdir}: {exc.strerror or exc}", 2) from None
    try:
        handle = open(workdir / ".lock", "a+")  # noqa: SIM115 - held open for the process's lifetime
    except OSError as exc:  # a folder of ours this user may not write in (made read-only), a full disk
        raise CLIError(f"cannot write in --workdir {workdir}: {exc.strerror or exc}", 2) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CLIError(
            f"another `kubechain up` ({holder}) is using {workdir}: stop it, or give this one its own "
            "folder with --workdir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _check_existing_workdir(workdir: Path) -> None:
    """An existing --workdir must be a folder of this user's, empty or an earlier ``up``'s (see
    :func:`lock_workdir`)."""
    from kubechain.cli.resources import CLIError

    try:
        if not workdir.is_dir():
            raise CLIError(f"--workdir {workdir} is not a folder", 2)
        if workdir.stat().st_uid != os.geteuid():
            raise CLIError(
                f"{workdir} belongs to another user: give `kubechain up` a folder of your own with --workdir",
                2,
            )
        if (
            workdir.name != DEFAULT_WORKDIR
            and any(workdir.iterdir())
            and not any((workdir / mark).exists() for mark in WORKDIR_MARKS)
        ):
            raise CLIError(
                f"{workdir} is not empty and is not a KubeChain working folder (it has none of "
                f"{', '.join(WORKDIR_MARKS)}): `kubechain up` keeps a control plane, its keys and logs "
                "there; give it a new or empty folder with --workdir",
                2,
            )
    except OSError as exc:  # a folder this user cannot read
        raise CLIError(f"cannot read --workdir {workdir}: {exc.strerror or exc}", 2) from None


def export_line(kubeconfig: str, path: str, python: str) -> str:
    """What another terminal needs: the kubeconfig, and the virtualenv's bin directory (kubechain,
    kubectl and honcho are installed there) on the PATH unless it is already."""
    bin_dir = os.path.dirname(python)
    exported = f"export KUBECONFIG={shlex.quote(kubeconfig)}"  # a checkout path may hold a space
    if bin_dir in path.split(os.pathsep):
        return exported
    if shlex.quote(bin_dir) != bin_dir:
        return f'{exported} PATH={shlex.quote(bin_dir)}:"$PATH"'
    return f'{exported} PATH="{bin_dir}:$PATH"'
