"""``python -m bench.run``: KubeChain's performance, measured on this machine (see bench/README.md).

    python -m bench.run [--scenarios baseline,hello,fanout,inflight,scale] [--quick]
                        [--json bench/results/latest.json]

Starts ONE local control plane (etcd + kube-apiserver + kube-controller-manager) with the CRDs installed;
every row then starts its own stack (Redis, scripted LLM server, watcher, workers) against it, in a fresh
namespace, so rows are comparable. Prints a table and writes a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.apiserver_profile import PROFILING_FLAG
from bench.report import (
    details,
    error_row,
    fmt,
    headline,
    judge_rounds_as_summarised,
    keep_rows_on_interrupt,
    machine_info,
    machine_line,
    max_overlap,
    percentile,
    redis_server_version,
    render_table,
    round_summary,
    rows_kept_on,
    summarize,
    write_target,
)

__all__ = [
    "SCENARIOS",
    "details",
    "fmt",
    "headline",
    "judge_rounds_as_summarised",
    "machine_info",
    "machine_line",
    "main",
    "max_overlap",
    "parse_args",
    "percentile",
    "render_table",
    "summarize",
    "write_target",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = REPO_ROOT / "deploy" / "crds"
SCENARIOS = ("baseline", "hello", "light", "fanout", "inflight", "scale")
DEFAULT_JSON = Path("bench/results/latest.json")

# Sizes: (full, --quick)
SIZES = {
    "baseline_writes": (3000, 600),
    "hello_runs": (1000, 30),
    "light_runs": (30, 10),
    "inflight_runs": (1000, 100),
    "fanout_trials": (3, 1),
    "rounds": (5, 1),
}
# Per-scenario time limits in seconds (multiplied by --timeout-factor); scale is per row.
TIMEOUTS = {"baseline": 300, "hello": 300, "light": 300, "fanout": 240, "inflight": 900, "scale": 300}

_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def positive_int(text: str) -> int:
    """A count or a size: a whole number of at least 1 (0 is refused, never taken for "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """Comma-separated counts, at least one."""
    values = tuple(positive_int(part.strip()) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"no number in {text!r}")
    return values


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _max_worker_concurrency() -> int | None:
    """The workers' --concurrency bound; None where the project's packages are not installed (scripts/bench
    checks the arguments with the machine's Python before its bootstrap: the run checks them again)."""
    try:
        from kubechain.settings import MAX_WORKER_CONCURRENCY
    except ImportError:
        return None
    return MAX_WORKER_CONCURRENCY


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, in this order: {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run of every scenario)")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results (default {DEFAULT_JSON})"
    )
    parser.add_argument(
        "--hello-runs", type=positive_int, default=None, help="TaskRuns of hello and of each scale row"
    )
    parser.add_argument(
        "--operator",
        default=None,
        metavar="COMMAND",
        help="also run hello against this command instead of KubeChain's processes, side by side "
        "(e.g. the Go KubeChain manager); it gets KUBECONFIG and OPENAI_BASE_URL",
    )
    parser.add_argument(
        "--light-runs", type=positive_int, default=None, help="TaskRuns of the light-load row (one at a time)"
    )
    parser.add_argument("--inflight-runs", type=positive_int, default=None)
    parser.add_argument(
        "--inflight-workers", type=positive_int, default=2, help="worker processes of the inflight row"
    )
    parser.add_argument(
        "--inflight-concurrency",
        type=positive_int,
        default=None,
        help="threads per worker (default: runs / workers)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=None,
        help="repeat baseline → hello this many times and judge hello on the median (default 5; --quick 1)",
    )
    parser.add_argument("--baseline-threads", type=positive_int, default=16)
    parser.add_argument("--baseline-writes", type=positive_int, default=None)
    parser.add_argument("--fanout-trials", type=positive_int, default=None)
    parser.add_argument(
        "--scale-workers", type=positive_ints, default="1,2,4", help="worker process counts of the scale rows"
    )
    parser.add_argument(
        "--scale-threads",
        type=positive_ints,
        default="16,1",
        help="threads per worker of each scale series (1: workers too small to fill the machine alone)",
    )
    parser.add_argument(
        "--resync-interval", type=float, default=30.0, help="watcher resync (the product default)"
    )
    parser.add_argument(
        "--stale-after", type=float, default=20.0, help="watcher staleness window (product default)"
    )
    parser.add_argument("--log-level", default="INFO", help="KUBECHAIN_LOG_LEVEL of watcher and workers")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of every watcher and worker (repeatable), e.g. KUBECHAIN_KUBE_QPS=1000",
    )
    parser.add_argument(
        "--timeout-factor", type=positive_float, default=1.0, help="multiply every scenario time limit"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="logs and data (default: a temporary directory)"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep the logs and etcd data afterwards")
    parser.add_argument(
        "--apiserver-profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="run kube-apiserver with --profiling=true, keep CPU profiles of the baseline and hello/scale "
        "windows in DIR (for `go tool pprof`) and show where its CPU went on those rows",
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.scenario_list = [s for s in SCENARIOS if s in chosen]
    size = 1 if args.quick else 0
    for name in ("hello_runs", "light_runs", "inflight_runs", "baseline_writes", "fanout_trials", "rounds"):
        if getattr(args, name) is None:
            setattr(args, name, SIZES[name][size])
    if args.inflight_concurrency is None:
        args.inflight_concurrency = max(16, math.ceil(args.inflight_runs / args.inflight_workers))
    limit = _max_worker_concurrency()
    if limit is not None and args.inflight_concurrency > limit:
        parser.error(
            f"the in-flight rows would need {args.inflight_concurrency} threads per worker; a worker runs "
            f"at most {limit}: raise --inflight-workers"
        )
    args.scale_counts = args.scale_workers
    bad = [e for e in args.env if "=" not in e]
    if bad:
        parser.error(f"--env wants KEY=VALUE, got {', '.join(bad)}")
    args.extra_env = dict(e.split("=", 1) for e in args.env)
    return args


def command_line(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(str(Path.cwd())) else sys.executable
    return " ".join(shlex.quote(a) for a in [exe, "-m", "bench.run", *args])


def versions(cp: Any) -> dict[str, Any]:
    import celery
    import kombu

    import kubechain

    out: dict[str, Any] = {
        "kubechain": kubechain.__version__,
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis-server": redis_server_version(shutil.which("redis-server") or "redis-server"),
        "python": sys.version.split()[0],
    }
    try:
        binaries = cp.binaries
        out["etcd"] = binaries.versions.get("etcd")
        out["kube-apiserver"] = binaries.versions.get("kubernetes")
    except Exception:  # noqa: BLE001 - facts are best effort
        pass
    try:
        from bench.observe import bench_kube

        kube = bench_kube(str(cp.kubeconfig_path))
        try:
            out["kube-apiserver"] = kube.version().get("gitVersion") or out.get("kube-apiserver")
        finally:
            kube.close()
    except Exception:  # noqa: BLE001
        pass
    out["git"] = git_revision()
    for name in ("httpx", "openai", "pydantic"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", None)
        except ImportError:
            pass
    return out


def git_revision() -> str | None:
    """The commit measured (``-dirty`` when the work tree has uncommitted changes)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


ROUNDED = ("baseline", "hello")


def _in_rounds(chosen: Sequence[str], rounds: int) -> bool:
    return rounds > 1 and all(s in chosen for s in ROUNDED)


def _schedule(chosen: Sequence[str], rounds: int) -> list[str]:
    """The scenarios in order, with baseline → hello repeated ``rounds`` times and a baseline after the
    last (machine load drifts, so each hello round is judged against the baselines either side of it)."""
    if not _in_rounds(chosen, rounds):
        return list(chosen)
    rest = [s for s in chosen if s not in ROUNDED]
    # a closing baseline: the last round, like the others, is judged between the baselines either side
    return [*(s for _ in range(rounds) for s in ROUNDED), "baseline", *rest]


def _round_of(name: str, rounds: int, result: dict[str, Any]) -> int | None:
    if name not in ROUNDED or not _in_rounds(result["options"]["scenarios"], rounds):
        return None
    return 1 + max(
        (row.get("round") or 0 for row in result["rows"] if row.get("scenario") == name), default=0
    )


def _run_guarded(
    name: str, fn: Callable[[], list[dict[str, Any]]], result: dict[str, Any], round_no: int | None = None
) -> None:
    """Run one scenario; an exception becomes an error row (the other scenarios still run)."""
    started = time.monotonic()
    progress(f"=== {name}{f' (round {round_no})' if round_no else ''} ===")

    def add(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            row.setdefault("elapsed_s", round(time.monotonic() - started, 1))
            if round_no:
                row["round"] = round_no
        result["rows"].extend(rows)

    try:
        rows = fn()
    except KeyboardInterrupt as exc:
        # the rows the scenario finished before the interrupt are reported; the one it was measuring is not
        add(rows_kept_on(exc))
        raise
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        rows = [error_row(name, name, exc)]
    add(rows)
    progress(f"=== {name} done in {time.monotonic() - started:.0f}s ===")


def hello_pair(ctx: Any, n: int, round_no: int) -> list[dict[str, Any]]:
    """KubeChain's hello row and, with ``--operator``, the other operator's, each on an API server
    holding none of the other's objects, in alternating order (the second of a pair runs on a machine
    the first has warmed); one failing does not lose the other's row."""
    from bench import scenarios

    # (label, measure, the row's workers/pool/concurrency should it fail)
    sides: list[tuple[str, Callable[[], list[dict[str, Any]]], tuple[int | None, str, int | None]]] = [
        (
            "hello",
            lambda: scenarios.hello(ctx, n, timeout_s=TIMEOUTS["hello"]),
            (1, "threads", scenarios.HELLO_THREADS),
        )
    ]
    if ctx.operator_command:
        operator = (
            "hello-operator",
            lambda: scenarios.hello_side_by_side(ctx, n, timeout_s=TIMEOUTS["hello"]),
            (None, "external", None),
        )
        sides = [*sides, operator] if round_no % 2 else [operator, *sides]
    rows: list[dict[str, Any]] = []
    for index, (label, measure, (workers, pool, concurrency)) in enumerate(sides):
        if index:
            scenarios.remove_bench_namespaces(ctx)
        try:
            rows += measure()
        except KeyboardInterrupt as exc:
            keep_rows_on_interrupt(exc, rows)
            raise
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row = error_row("hello", label, exc, workers, pool, concurrency, n)
            if label == "hello-operator":
                row["figures"]["operator_command"] = ctx.operator_command
            rows.append(row)
    return rows


def inflight_rows(ctx: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The in-flight row as runs arrive (completion time), then with every LLM answer held until all runs
    are in flight together (the workers' memory with that many calls open), on a clean API server."""
    from bench import scenarios

    rows: list[dict[str, Any]] = []
    for held in (False, True):
        if held:
            scenarios.remove_bench_namespaces(ctx)
        try:
            rows += scenarios.inflight(
                ctx,
                args.inflight_runs,
                workers=args.inflight_workers,
                concurrency=args.inflight_concurrency,
                timeout_s=TIMEOUTS["inflight"],
                held=held,
            )
        except KeyboardInterrupt as exc:
            keep_rows_on_interrupt(exc, rows)
            raise
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the other (the memory verdict)
            traceback.print_exc()
            label = "inflight-held" if held else "inflight"
            rows.append(
                error_row(
                    "inflight",
                    label,
                    exc,
                    args.inflight_workers,
                    "threads",
                    args.inflight_concurrency,
                    args.inflight_runs,
                )
            )
    return rows


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the bench is, so that it stops as on Ctrl-C: every ``finally``
    runs (stacks, the operator and the control plane stopped, the temporary workdir removed) and what
    was measured is reported."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM and SIGHUP raise :class:`Signalled`. Only the
    first: one more while the bench is cleaning up would cut the clean-up short."""
    received: list[int] = []

    def interrupt(signum: int, _frame: Any) -> None:
        if received:
            progress(f"{signal.Signals(signum).name} again: still stopping")
            return
        received.append(signum)
        raise Signalled(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupt_cause(exc: KeyboardInterrupt) -> str:
    return signal.Signals(exc.signum).name if isinstance(exc, Signalled) else "Ctrl-C"


def interrupt_exit_status(cause: str) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended (Ctrl-C: SIGINT)."""
    return 128 + (signal.SIGINT if cause == "Ctrl-C" else signal.Signals[cause]).value


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    from bench import scenarios
    from kubechain.testing.controlplane import LocalControlPlane

    if os.environ.pop("REDIS_URL", None):
        progress("ignoring REDIS_URL: every row starts a Redis of its own")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kubechain-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": command_line(argv),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": {},
        "options": {
            "quick": args.quick,
            "scenarios": args.scenario_list,
            "hello_runs": args.hello_runs,
            "light_runs": args.light_runs,
            "inflight_runs": args.inflight_runs,
            "baseline_writes": args.baseline_writes,
            "baseline_threads": args.baseline_threads,
            "rounds": args.rounds,
            "scale_workers": list(args.scale_counts),
            "scale_threads": list(args.scale_threads),
            "resync_interval_s": args.resync_interval,
            "stale_after_s": args.stale_after,
            "log_level": args.log_level,
            "extra_env": args.extra_env,
            "workdir": str(workdir),
            "apiserver_profile": str(args.apiserver_profile) if args.apiserver_profile else None,
        },
        "rows": [],
    }
    progress(f"workdir {workdir}")
    cp = LocalControlPlane(
        workdir=workdir / "controlplane",
        progress=progress,
        extra_apiserver_args=[PROFILING_FLAG] if args.apiserver_profile else [],
    )
    try:
        cp.start()
        cp.install_crds(CRD_DIR)
        result["versions"] = versions(cp)
        progress(machine_line(result))
        ctx = scenarios.BenchContext(
            cp=cp,
            workdir=workdir,
            progress=progress,
            quick=args.quick,
            timeout_factor=args.timeout_factor,
            resync_interval_s=args.resync_interval,
            stale_after_s=args.stale_after,
            log_level=args.log_level,
            extra_env=args.extra_env,
            operator_command=args.operator,
            apiserver_profile_dir=args.apiserver_profile,
        )
        hello_rounds = itertools.count(1)
        plan: dict[str, Callable[[], list[dict[str, Any]]]] = {
            "baseline": lambda: scenarios.baseline(
                ctx, args.baseline_threads, args.baseline_writes, TIMEOUTS["baseline"]
            ),
            "hello": lambda: hello_pair(ctx, args.hello_runs, next(hello_rounds)),
            "light": lambda: scenarios.light(ctx, args.light_runs, timeout_s=TIMEOUTS["light"]),
            "fanout": lambda: scenarios.fanout(ctx, trials=args.fanout_trials, timeout_s=TIMEOUTS["fanout"]),
            "inflight": lambda: inflight_rows(ctx, args),
            "scale": lambda: scenarios.scale(
                ctx, args.hello_runs, args.scale_counts, TIMEOUTS["scale"], args.scale_threads
            ),
        }
        try:
            for name in _schedule(args.scenario_list, args.rounds):
                # every row starts on an API server that holds no earlier row's objects
                scenarios.remove_bench_namespaces(ctx)
                _run_guarded(name, plan[name], result, _round_of(name, args.rounds, result))
            for label in ("hello", "hello-operator"):
                summary = round_summary(result["rows"], label)
                if summary:
                    judge_rounds_as_summarised(result["rows"], summary)
                    result["rows"].append(summary)
        except KeyboardInterrupt as exc:
            result["interrupted"] = interrupt_cause(exc)
            progress(f"interrupted ({result['interrupted']}): reporting what was measured")
    finally:
        progress("stopping the control plane")
        cp.stop()
        if not args.keep_workdir and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            progress(f"logs kept in {workdir}")
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return result


def save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with stop_signals_interrupt():
        try:
            result = run(args, argv)
        except KeyboardInterrupt as exc:  # before any scenario started (the control plane's start-up)
            cause = interrupt_cause(exc)
            progress(f"interrupted ({cause}) before anything was measured")
            return interrupt_exit_status(cause)
        table = render_table(result)
        print(table, flush=True)
        save(result, args.json)
        progress(f"results written to {args.json}")
    if result.get("interrupted"):
        return interrupt_exit_status(str(result["interrupted"]))
    failed = [r for r in result["rows"] if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
