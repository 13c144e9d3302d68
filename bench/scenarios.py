"""The benchmark scenarios. Each returns one or more result rows (dicts, see bench/README.md).

Every row except ``baseline`` starts its own :class:`LocalStack` (Redis, scripted LLM, watcher, workers)
against the one shared control plane, in a fresh namespace that only this row's watcher watches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import apiserver_profile
from bench.observe import (
    CpuMeter,
    EventTally,
    RssSampler,
    SleepServer,
    Timeline,
    WatchRecorder,
    api_request_totals,
    bench_kube,
    requests_per_run,
)
from bench.report import (
    STATUS_WRITES_A_RUN_NEEDS,
    judge_scale,
    keep_rows_on_interrupt,
    max_overlap,
    new_row,
    percentile,
    summarize,
    usable_cpus,
    write_target,
)
from kubechain.kube.client import KubeClient
from kubechain.kube.errors import AlreadyExists, Conflict, KubeAPIError, NotFound
from kubechain.kube.events import EventRecorder
from kubechain.models import Agent, TaskRun
from kubechain.statemachines.taskrun import (
    LoopLimits,
    plan_initial_context,
    plan_llm_answer,
    plan_llm_claim,
)
from kubechain.testing.binaries import find_go
from kubechain.testing.controlplane import LocalControlPlane, pdeathsig_preexec, spawn, tail_file
from kubechain.testing.stack import LocalStack, StackOptions

GROUP_VERSION = "kubechain.humanlayer.dev/v1alpha1"
TERMINAL = ("FinalAnswer", "Failed")
Progress = Callable[[str], None]


class ScenarioTimeout(Exception):
    pass


class OperatorExited(RuntimeError):
    """The ``--operator`` command ended while its row needed it (it should run until stopped)."""


# Called while a row waits, to fail it at once when what it waits for can no longer happen.
Check = Callable[[], None]


@dataclass
class BenchContext:
    """What every scenario gets: the shared control plane, options and the baseline figure."""

    cp: LocalControlPlane
    workdir: Path
    progress: Progress
    quick: bool = False
    timeout_factor: float = 1.0
    resync_interval_s: float = 30.0
    stale_after_s: float = 20.0
    log_level: str = "INFO"
    baseline_writes_per_s: float | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # Another operator to run the hello scenario against, side by side (e.g. the Go KubeChain manager).
    operator_command: str | None = None
    # Where to keep kube-apiserver CPU profiles of the measured windows (None: no profiles).
    apiserver_profile_dir: Path | None = None

    @property
    def kubeconfig(self) -> str:
        return str(self.cp.kubeconfig_path)

    def kube(self) -> KubeClient:
        return bench_kube(self.kubeconfig)


@contextlib.contextmanager
def apiserver_profiled(ctx: BenchContext, name: str, figures: dict[str, Any]) -> Iterator[None]:
    """With ``--apiserver-profile``, profile the API server for the block (end it right after the CPU
    window) and put where its CPU went in ``figures["apiserver_profile"]``, computed after the block
    (``go tool pprof`` costs CPU). A profile is a diagnostic: its failure is recorded, never raised."""
    if ctx.apiserver_profile_dir is None:
        yield
        return
    recorder = apiserver_profile.ProfileRecorder(ctx.cp, ctx.apiserver_profile_dir / name).start()
    try:
        yield
    finally:
        files = recorder.stop()
        if recorder.error and not files:
            figures["apiserver_profile"] = {"error": recorder.error}
        else:
            try:
                go = find_go(ctx.progress)
                figures["apiserver_profile"] = apiserver_profile.summarize(
                    go.go, go.env(), ctx.cp.binaries.kube_apiserver, files
                )
            except Exception as exc:  # noqa: BLE001
                figures["apiserver_profile"] = {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------------


def resource(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def create_namespace(kube: KubeClient, prefix: str) -> str:
    name = f"bench-{prefix}-{uuid.uuid4().hex[:6]}"
    kube.request(
        "POST",
        "/api/v1/namespaces",
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    return name


def remove_bench_namespaces(ctx: BenchContext, timeout_s: float = 300) -> None:
    """Delete every row's namespace and wait until they are gone, between rows (never inside a measured
    window), so that each row starts on an API server holding none of the earlier rows' objects (a bigger
    watch cache and heap to collect, a bigger garbage-collector graph could make later rows dearer)."""
    kube = ctx.kube()
    try:
        started = time.monotonic()
        names = [
            str(ns["metadata"]["name"])
            for ns in kube.request("GET", "/api/v1/namespaces").get("items") or []
            if str(ns["metadata"]["name"]).startswith("bench-")
        ]
        for name in names:
            try:
                kube.request("DELETE", f"/api/v1/namespaces/{name}")
            except NotFound:
                pass
        remaining = names
        while remaining and time.monotonic() - started < timeout_s:
            time.sleep(0.5)
            remaining = [n for n in remaining if _namespace_exists(kube, n)]
        if names:
            left = f"; still terminating: {', '.join(remaining)}" if remaining else ""
            ctx.progress(f"removed {len(names)} namespace(s) in {time.monotonic() - started:.1f} s{left}")
    finally:
        kube.close()


def _namespace_exists(kube: KubeClient, name: str) -> bool:
    try:
        kube.request("GET", f"/api/v1/namespaces/{name}")
    except NotFound:
        return False
    return True


def create_agent(
    kube: KubeClient, namespace: str, agent: str = "bench-agent", tools: list[dict[str, Any]] | None = None
) -> None:
    """Secret + LLM (provider openai, no baseUrl: the stack routes it to the scripted server) + Agent."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "openai"},
        "stringData": {"OPENAI_API_KEY": "sk-bench"},
    }
    kube.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body=secret)
    llm = resource(
        "LLM",
        "gpt-4o",
        {"provider": "openai", "apiKeyFrom": {"secretKeyRef": {"name": "openai", "key": "OPENAI_API_KEY"}}},
    )
    kube.create_raw("llms", namespace, llm)
    for tool in tools or []:
        kube.create_raw("tools", namespace, tool)
    spec: dict[str, Any] = {
        "llmRef": {"name": "gpt-4o"},
        "system": "You are a benchmark agent. Answer briefly.",
    }
    if tools:
        spec["tools"] = [{"name": t["metadata"]["name"]} for t in tools]
    kube.create_raw("agents", namespace, resource("Agent", agent, spec))


def wait_agent_ready(
    kube: KubeClient,
    namespace: str,
    agent: str,
    deadline: float,
    tools: int = 0,
    check: Check | None = None,
) -> None:
    while True:
        status = kube.get_raw("agents", namespace, agent).get("status") or {}
        if status.get("ready") and len(status.get("validTools") or []) >= tools:
            return
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise ScenarioTimeout(f"agent {namespace}/{agent} not ready: {status}")
        time.sleep(0.1)


def taskrun(name: str, agent: str, message: str) -> dict[str, Any]:
    return resource("TaskRun", name, {"agentRef": {"name": agent}, "userMessage": message})


def create_runs(
    kube: KubeClient, namespace: str, runs: dict[str, str], agent: str, threads: int = 16
) -> tuple[float, float]:
    """Create the TaskRuns (name -> userMessage) as fast as ``threads`` clients can; (start, end) times."""

    def create(item: tuple[str, str]) -> None:
        name, message = item
        for attempt in range(5):
            try:
                kube.create_raw("taskruns", namespace, taskrun(name, agent, message))
                return
            except AlreadyExists:
                return
            except KubeAPIError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    started = time.time()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-create") as pool:
        list(pool.map(create, runs.items()))
    return started, time.time()


def set_script(stack: LocalStack, script: dict[str, Any]) -> None:
    httpx.post(f"{stack.llm_url}/_admin/script", json=script, timeout=30).raise_for_status()


def llm_requests(stack: LocalStack) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.llm_url}/_admin/requests", timeout=120)
    response.raise_for_status()
    return list(response.json())


def parse_ts(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# Stack per row
# --------------------------------------------------------------------------------------------------


def _pid(process: Any) -> int | None:
    return getattr(process, "pid", None) if process is not None else None


def cpu_groups(ctx: BenchContext, stack: LocalStack | None) -> dict[str, list[int]]:
    cp = ctx.cp
    groups: dict[str, list[int]] = {
        "kube-apiserver": [p for p in [_pid(getattr(cp, "_apiserver", None))] if p],
        "etcd": [p for p in [_pid(getattr(cp, "_etcd", None))] if p],
        "kcm": [p for p in [_pid(getattr(cp, "_kcm", None))] if p],
        "bench": [os.getpid()],
    }
    if stack is not None:
        redis_proc = getattr(stack.redis, "_proc", None)
        groups["redis"] = [p for p in [_pid(redis_proc)] if p]
        groups["llm"] = [p for p in [_pid(stack.llm_process)] if p]
        groups["watcher"] = [p for p in (w.pid for w in stack.watchers.values()) if p]
        groups["workers"] = [p for p in (w.pid for w in stack.workers.values()) if p]
        external = _EXTERNAL.get(id(stack))
        if external is not None and external.pid:
            groups["workers"].append(external.pid)
    return groups


def worker_pids(stack: LocalStack) -> list[int]:
    return [p for p in (w.pid for w in stack.workers.values()) if p]


def _wait_workers_ready(stack: LocalStack, deadline: float, progress: Progress) -> None:
    """Celery logs "<name>@<host> ready." once it consumes; wait for every worker's line."""
    pending = dict(stack.workers)
    while pending:
        for name, process in list(pending.items()):
            if not process.running():
                raise RuntimeError(f"worker {name} exited with {process.returncode()}:\n{process.tail()}")
            try:
                text = process.log_path.read_text(errors="replace")
            except OSError:
                text = ""
            if " ready." in text:
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            progress(f"workers not (yet) logging ready: {', '.join(pending)}; continuing")
            return
        time.sleep(0.1)


@contextlib.contextmanager
def row_stack(
    ctx: BenchContext,
    label: str,
    namespace: str,
    workers: int,
    pool: str,
    concurrency: int,
    llm_latency_s: float = 0.0,
    operator: str | None = None,
) -> Iterator[LocalStack]:
    """A stack for one row: Redis, the scripted LLM and KubeChain's watcher and workers — or, with
    ``operator``, that command instead of the watcher and workers (same API server, same LLM server)."""
    options = StackOptions(
        workdir=ctx.workdir / label,
        cluster="current",
        kubeconfig=Path(ctx.kubeconfig),
        workers=0 if operator else workers,
        watchers=0 if operator else 1,
        worker_pool=pool,
        worker_concurrency=concurrency,
        llm_latency_s=llm_latency_s,
        resync_interval_s=ctx.resync_interval_s,
        stale_after_s=ctx.stale_after_s,
        log_level=ctx.log_level,
        extra_env={
            # only this row's namespace, and a Lease of its own (no wait for the previous row's leader)
            "KUBECHAIN_NAMESPACES": json.dumps([namespace]),
            "KUBECHAIN_LEASE_NAME": f"bench-{namespace}",
            "KUBECHAIN_LEASE_NAMESPACE": namespace,
            **ctx.extra_env,
        },
    )
    stack = LocalStack(options, progress=lambda m: ctx.progress(f"{label}: {m}"))
    external: ExternalOperator | None = None
    try:
        stack.start()
        if operator:
            external = ExternalOperator(operator, stack, namespace).start()
            _EXTERNAL[id(stack)] = external
            ctx.progress(f"{label}: started {operator!r} (pid {external.pid}); log {external.log_path}")
        _wait_workers_ready(stack, time.monotonic() + 60, ctx.progress)
        yield stack
    finally:
        if external is not None:
            external.stop()
            _EXTERNAL.pop(id(stack), None)
        stop_stack(stack, ctx.progress, label)


_EXTERNAL: dict[int, ExternalOperator] = {}  # id(stack) -> the operator running in its place


def operator_check(stack: LocalStack) -> Check | None:
    """What a row's waits call to notice that the operator running in place of KubeChain's processes
    ended (None: KubeChain's own, which the stack restarts)."""
    external = _EXTERNAL.get(id(stack))
    return external.check if external is not None else None


class ExternalOperator:
    """A command run in place of KubeChain's processes. It gets ``KUBECONFIG``, ``OPENAI_BASE_URL``
    (the scripted LLM server) and ``KUBECHAIN_BENCH_NAMESPACE``; its CPU is charged to ``workers``."""

    def __init__(self, command: str, stack: LocalStack, namespace: str) -> None:
        self.command = command
        self.log_path = stack.logs / "operator.log"
        # What KubeChain's own processes get (kubeconfig, Redis, namespace, Lease), plus the OpenAI
        # variable other operators read.
        self.env = stack.env() | {
            "OPENAI_BASE_URL": stack.llm_base_url,
            "KUBECHAIN_BENCH_NAMESPACE": namespace,
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> ExternalOperator:
        """Start the command in a process group of its own; on Linux it gets SIGTERM when the bench dies,
        however it dies (as KubeChain's own processes do)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        preexec = pdeathsig_preexec()
        with self.log_path.open("ab") as log:
            self.process = spawn(
                lambda: subprocess.Popen(  # noqa: S602 - the user's own command line
                    self.command,
                    shell=True,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=preexec,  # noqa: PLW1509 - only a prctl looked up before the fork
                )
            )
        return self

    def check(self) -> None:
        """Raise :class:`OperatorExited`, with the end of its log, when the command has ended."""
        process = self.process
        code = process.poll() if process is not None else None
        if code is not None:
            raise OperatorExited(f"operator exited with {code}: {tail_file(self.log_path, 10)}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the command's process group, SIGKILL after ``timeout_s``; then SIGKILL to what is
        left of the group (children of a shell that ended, one that ignores SIGTERM)."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_stack(stack: LocalStack, progress: Progress, label: str) -> None:
    """Stop the workers and watchers in parallel (each may take its soft-shutdown time), then the rest."""
    started = time.monotonic()
    processes = [*stack.workers.values(), *stack.watchers.values()]
    progress(f"{label}: stopping its stack ({len(processes)} watcher/worker processes)")
    threads = [threading.Thread(target=p.stop, kwargs={"timeout": 20}, daemon=True) for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    stopped_processes = time.monotonic() - started
    stack.stop()  # LLM server, Redis (and whatever did not stop above)
    progress(
        f"{label}: stack stopped (workers+watcher {stopped_processes:.1f} s, total {time.monotonic() - started:.1f} s)"
    )


# --------------------------------------------------------------------------------------------------
# baseline: raw conditional status writes
# --------------------------------------------------------------------------------------------------


def _merged(status: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``status`` after a JSON merge patch of it (None deletes)."""
    merged = {**status, **patch}
    return {key: value for key, value in merged.items() if value is not None}


def run_statuses(message: str, now: datetime) -> list[dict[str, Any]]:
    """The three status writes of a hello run, as KubeChain's state machines produce them for one whose
    turn goes through the queue: the first context window, the LLM-step claim, the final answer. (A
    worker that takes the turn it made ready writes the first two as one.)"""
    system = "You are a benchmark agent. Answer briefly."
    agent = Agent.from_wire(
        resource("Agent", "bench-agent", {"llmRef": {"name": "gpt-4o"}, "system": system})
        | {"status": {"ready": True, "status": "Ready"}}
    )
    wire = taskrun("baseline", "bench-agent", message)
    wire["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    run = TaskRun.from_wire(wire)
    first = plan_initial_context(run, None, False, agent, now)
    assert first is not None
    run = TaskRun.from_wire(wire | {"status": _merged({}, first.status)})
    claim = plan_llm_claim(run, "worker-0", now, LoopLimits()).transition
    assert claim is not None
    run = TaskRun.from_wire(wire | {"status": _merged(run.status.to_wire(), claim.status)})
    usage = {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}
    answer = plan_llm_answer(run, "Hello from the scripted LLM.", [], usage, now, LoopLimits())
    return [first.status, claim.status, answer.status]


def minimal_statuses() -> list[dict[str, Any]]:
    """The four-field status the baseline wrote until it wrote a run's statuses, in three variants so
    that every write changes the object (the API server skips writing an unchanged one)."""
    window = [
        {"role": "system", "content": "You are a benchmark agent. Answer briefly."},
        {"role": "user", "content": "baseline status write"},
    ]
    return [
        {
            "phase": "Pending",
            "statusDetail": f"baseline write {i}",
            "messageCount": i,
            "contextWindow": window,
        }
        for i in range(3)
    ]


@dataclass
class WriteBurst:
    latencies: list[float]
    conflicts: int
    wall_s: float

    @property
    def writes_per_s(self) -> float | None:
        return round(len(self.latencies) / self.wall_s, 1) if self.wall_s > 0 else None


def _create_taskruns(kube: KubeClient, namespace: str, names: list[str]) -> dict[str, TaskRun]:
    """Create TaskRuns nobody works on, as the API server answered the creates."""
    return {
        name: TaskRun.from_wire(kube.create_raw("taskruns", namespace, taskrun(name, "nobody", "baseline")))
        for name in names
    }


def _status_writes(
    kube: KubeClient,
    namespace: str,
    groups: list[list[str]],
    created: dict[str, TaskRun],
    cycle: list[dict[str, Any]],
    writes: int,
    deadline: float,
) -> WriteBurst:
    """``writes`` conditional status writes, one thread per group of objects. A thread writes its objects
    in rotation, each of them ``cycle``'s statuses in order. Rotation matters: an object written again
    the moment its previous write returns is usually still stale in the API server's watch cache, and
    the server then applies the patch twice (first to the cached copy, which fails its resourceVersion
    precondition, then to a fresh read from etcd) — a cost of that access pattern, not of a write.
    ``created``: the objects as created; the first write of each is conditional on that version.

    Each write is KubeChain's own (``KubeClient.patch_status``: the whole status, merged into the version
    written last, PUT with its resourceVersion) — the cheapest conditional status write the API server
    takes (a merge patch of the same statuses costs it about a quarter more CPU)."""
    current = dict(created)
    lock = threading.Lock()
    counter = [0]
    latencies: list[float] = []
    conflicts = [0]

    def writer(names: list[str]) -> None:
        step = 0
        while time.monotonic() < deadline:
            with lock:
                if counter[0] >= writes:
                    return
                counter[0] += 1
            name = names[step % len(names)]
            status = cycle[(step // len(names)) % len(cycle)]
            t0 = time.perf_counter()
            try:
                written = kube.patch_status(current[name], status)
            except Conflict:
                conflicts[0] += 1
                current[name] = kube.get(TaskRun, namespace, name)
                continue
            elapsed = time.perf_counter() - t0
            current[name] = written
            step += 1
            with lock:
                latencies.append(elapsed)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="bench-write") as pool:
        list(pool.map(writer, groups))
    return WriteBurst(latencies, conflicts[0], time.monotonic() - started)


# The Events a hello run's transitions post.
EVENT_REASONS_OF_A_RUN = ("ValidationSucceeded", "SendingContextWindowToLLM", "LLMFinalAnswer")


def _event_posts(kube: KubeClient, runs: list[TaskRun], posts: int, threads: int) -> float:
    """``posts`` Events about ``runs``, as KubeChain's workers post them (same recorder, same body), by
    ``threads`` threads; the wall seconds they took."""
    recorder = EventRecorder(kube, "kubechain-bench", "bench")

    def post(index: int) -> None:
        reason = EVENT_REASONS_OF_A_RUN[index % len(EVENT_REASONS_OF_A_RUN)]
        recorder.emit(runs[index % len(runs)], "Normal", reason, f"bench event {index}", key=str(index))

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-event") as pool:
        list(pool.map(post, range(posts)))
    return time.monotonic() - started


# The components of the baseline's windows (cpu_groups without a stack): what its writes and Events cost.
BASELINE_COMPONENTS = ("kube-apiserver", "etcd", "kcm", "bench")


def cpu_ms_per(cpu_s: dict[str, float], count: int) -> dict[str, float | None]:
    """CPU milliseconds per write (or Event) of a baseline window: ``own``, of the processes taking part
    (API server, etcd, controller-manager, the bench), and of the whole ``machine``, which includes
    interrupts and whatever else ran on it meanwhile (``others``)."""
    if not cpu_s or count <= 0:
        return {"own": None, "machine": None}
    own = sum(cpu_s.get(name, 0.0) for name in BASELINE_COMPONENTS)
    machine = cpu_s.get("machine")
    return {
        "own": round(1000 * own / count, 2),
        "machine": round(1000 * machine / count, 2) if machine is not None else None,
    }


def baseline(
    ctx: BenchContext,
    threads: int = 16,
    writes: int = 3000,
    timeout_s: float = 300,
    objects_per_thread: int = 8,
) -> list[dict[str, Any]]:
    """Conditional status writes as fast as ``threads`` threads can make them, each thread rotating over
    ``objects_per_thread`` objects and writing each the three statuses of a hello run in turn: writes of
    the size and shape of those the hello target divides this rate by, none of them paying for a stale
    watch cache (see ``_status_writes``). For comparison with earlier results, the same number of writes
    by the earlier method follows, outside the CPU window: a minimal status, one fresh object per thread."""
    row = new_row("baseline", "baseline", None, None, threads, writes)
    deadline = time.monotonic() + timeout_s * ctx.timeout_factor
    ctx.baseline_writes_per_s = None  # a round that fails judges its hello against nothing, not the last
    kube = ctx.kube()
    try:
        namespace = create_namespace(kube, "baseline")
        groups = [[f"write-{t:02d}-{o}" for o in range(objects_per_thread)] for t in range(threads)]
        created = _create_taskruns(kube, namespace, [name for group in groups for name in group])
        ctx.progress(
            f"baseline: {writes} conditional status writes (a run's three statuses) by {threads} threads"
        )
        cpu = CpuMeter(cpu_groups(ctx, None), shallow=["bench"]).start()
        with apiserver_profiled(ctx, namespace, row["figures"]):
            statuses = run_statuses("hello baseline", datetime.now(UTC))
            burst = _status_writes(kube, namespace, groups, created, statuses, writes, deadline)
            row["cpu_s"] = cpu.stop()
        row["cpu_wall_s"] = round(cpu.wall_s, 2)
        ctx.progress(f"baseline: {burst.writes_per_s} writes/s; now {writes} by the earlier method")
        singles = [[f"earlier-{t:02d}"] for t in range(threads)]
        singles_created = _create_taskruns(kube, namespace, [name for (name,) in singles])
        earlier = _status_writes(
            kube, namespace, singles, singles_created, minimal_statuses(), writes, deadline
        )
        # What an Event costs next to a status write (each hello run posts three): the machine's CPU
        # per post, measured the same way, outside the status writes' window. (An Event names its
        # object's uid; the resourceVersion it carries, the created one, does not change its cost.)
        event_cpu = CpuMeter(cpu_groups(ctx, None), shallow=["bench"]).start()
        event_wall = _event_posts(kube, list(created.values()), writes, threads)
        per_event = cpu_ms_per(event_cpu.stop(), writes)
        per_write = cpu_ms_per(row["cpu_s"], len(burst.latencies))
        row["timed_out"] = len(burst.latencies) < writes
        row["figures"] |= {
            "threads": threads,
            "objects": threads * objects_per_thread,
            "writes": len(burst.latencies),
            "wall_s": round(burst.wall_s, 2),
            "writes_per_s": burst.writes_per_s,
            "latency_ms": summarize(burst.latencies, 1000.0, 2),
            "conflicts": burst.conflicts,
            "earlier_method_writes_per_s": earlier.writes_per_s,
            "cpu_ms_per_write": per_write["own"],
            "machine_cpu_ms_per_write": per_write["machine"],
            "event_posts_per_s": round(writes / event_wall, 1) if event_wall > 0 else None,
            "cpu_ms_per_event": per_event["own"],
            "machine_cpu_ms_per_event": per_event["machine"],
            "namespace": namespace,
        }
        ctx.baseline_writes_per_s = burst.writes_per_s
        ctx.progress(f"baseline: {burst.writes_per_s} writes/s (earlier method: {earlier.writes_per_s})")
    finally:
        kube.close()
    return [row]


# --------------------------------------------------------------------------------------------------
# hello / scale: many single-turn runs at once
# --------------------------------------------------------------------------------------------------


def hello_figures(
    timelines: dict[str, Timeline],
    requests: list[dict[str, Any]],
    runs: dict[str, str],
    started: float,
    created: float,
    events_per_run: float | None,
    baseline_writes_per_s: float | None,
) -> dict[str, Any]:
    """Throughput, per-turn overheads and writes per run from what the watch and the LLM log saw."""
    by_user: dict[str, list[dict[str, Any]]] = {}
    for request in requests:
        by_user.setdefault(str(request.get("first_user")), []).append(request)
    finals: list[float] = []
    ready_to_llm: list[float] = []
    ready_from: dict[str, int] = {}
    create_to_llm: list[float] = []
    answer_to_next: list[float] = []
    ready_to_claim: list[float] = []
    claim_to_llm: list[float] = []
    create_to_ready: list[float] = []
    latency: list[float] = []
    rv_counts: list[int] = []
    failed = 0
    duplicates = 0
    phase_paths: dict[str, int] = {}
    for name, message in runs.items():
        timeline = timelines.get(name)
        if timeline is None:
            continue
        if timeline.phase == "Failed":
            failed += 1
        final = timeline.first("FinalAnswer")
        added = timeline.sightings[0].t if timeline.sightings else None
        moment = ready_moment(timeline)
        ready = moment[0] if moment is not None else None
        if final is not None:
            finals.append(final)
            rv_counts.append(timeline.distinct_rvs())
            path = ">".join(p or '""' for p in timeline.phases())
            phase_paths[path] = phase_paths.get(path, 0) + 1
            if added is not None:
                latency.append(final - added)
        if added is not None and ready is not None:
            create_to_ready.append(ready - added)
        ok = [r for r in by_user.get(message, []) if r.get("status_code") == 200]
        first_turn = [r for r in ok if r.get("turn") == 0]
        duplicates += max(0, len(first_turn) - 1)
        first = min(first_turn, key=lambda r: r["received_at"]) if first_turn else None
        if first is not None and added is not None:
            # the same two events whatever the operator: its create and its LLM request
            create_to_llm.append(first["received_at"] - added)
        if first is not None and moment is not None and ready is not None:
            ready_to_llm.append(first["received_at"] - ready)
            ready_from[moment[1]] = ready_from.get(moment[1], 0) + 1
            claim = next(
                (
                    parse_ts(s.claimed_at)
                    for s in timeline.sightings
                    if s.phase == "SendContextWindowToLLM" and s.claimed_at
                ),
                None,
            )
            if claim is not None:
                # a turn claimed in the write that made it ready never waited for a claim
                if timeline.first("ReadyForLLM") is not None:
                    ready_to_claim.append(claim - ready)
                claim_to_llm.append(first["received_at"] - claim)
        if first is not None and final is not None:
            answer_to_next.append(final - first["finished_at"])
    completed = len(finals)
    wall = (max(finals) - started) if finals else None
    finals.sort()
    needed = math.ceil(0.99 * len(runs))
    wall_99 = finals[needed - 1] - started if needed and len(finals) >= needed else None
    stragglers = _stragglers(timelines, runs, latency)
    runs_per_s = completed / wall if wall else None
    writes_per_run = sum(rv_counts) / len(rv_counts) if rv_counts else None
    # Measured for the report: the create (its first resourceVersion) is the user's write.
    status_writes = writes_per_run - 1 if writes_per_run and writes_per_run > 1 else None
    # The target divides by the status writes a run needs, fixed: measured, a version that wrote more
    # would lower its own bar.
    target = write_target(baseline_writes_per_s, STATUS_WRITES_A_RUN_NEEDS)
    # ... and shown beside it, divided by the writes measured, so the reader need not recompute it
    target_measured = write_target(baseline_writes_per_s, status_writes)
    all_done = completed == len(runs) and failed == 0
    return {
        "completed": completed,
        "failed": failed,
        "create_s": round(created - started, 2),
        "wall_s": round(wall, 2) if wall else None,
        "wall_99_s": round(wall_99, 2) if wall_99 else None,
        "runs_per_s": round(runs_per_s, 2) if runs_per_s else None,
        "stragglers": stragglers,
        "ready_to_llm_ms": summarize(ready_to_llm, 1000.0),
        "ready_from": ready_from,
        # ready seen by the watch after the LLM request: the watch's lag, not a time travel
        "ready_to_llm_negative": sum(1 for d in ready_to_llm if d < 0),
        "create_to_llm_ms": summarize(create_to_llm, 1000.0),
        "answer_to_next_ms": summarize(answer_to_next, 1000.0),
        "ready_to_claim_ms": summarize(ready_to_claim, 1000.0),
        "claim_to_llm_ms": summarize(claim_to_llm, 1000.0),
        "create_to_ready_ms": summarize(create_to_ready, 1000.0),
        "run_latency_s": summarize(latency, 1.0, 2),
        "writes_per_run": round(writes_per_run, 2) if writes_per_run else None,
        "status_writes_per_run": round(status_writes, 2) if status_writes else None,
        "events_per_run": round(events_per_run, 2) if events_per_run is not None else None,
        "phase_paths": phase_paths,
        "duplicate_llm_requests": duplicates,
        "baseline_writes_per_s": baseline_writes_per_s,
        "target_runs_per_s": round(target, 2) if target else None,
        "target_runs_per_s_by_measured_writes": round(target_measured, 2) if target_measured else None,
        # No verdict on a throughput some runs never reached: it would count only the runs that did.
        "meets_target": (all_done and runs_per_s >= target) if (runs_per_s and target) else None,
    }


EVENTS_PER_HELLO_RUN = len(EVENT_REASONS_OF_A_RUN)
HELLO_THREADS = 16  # threads of a hello worker


def with_event_drain(figures: dict[str, Any], drained_s: float) -> dict[str, Any]:
    """Throughput counted until the runs' Events were posted too; the target is judged on it."""
    completed = figures.get("completed") or 0
    wall = max(drained_s, figures.get("wall_s") or 0.0)
    rate = completed / wall if completed and wall > 0 else None
    target = figures.get("target_runs_per_s")
    out: dict[str, Any] = {
        "events_drained_s": round(drained_s, 2),
        "runs_per_s_incl_events": round(rate, 2) if rate else None,
    }
    if target is not None and rate is not None:
        out["meets_target"] = rate >= target and completed == figures.get("n") and not figures.get("failed")
        out["ratio"] = round(rate / target, 3)
    measured = figures.get("target_runs_per_s_by_measured_writes")
    if measured and rate is not None:
        out["ratio_by_measured_writes"] = round(rate / measured, 3)
    return out


# Per-turn overhead targets at light load (milliseconds).
LIGHT_P50_MS = 50.0
LIGHT_P99_MS = 250.0


def light_load_verdict(figures: dict[str, Any]) -> dict[str, Any]:
    """Both per-turn overheads (ready→LLM request, LLM answer→next phase) against the targets."""
    checks = {}
    for key in ("ready_to_llm_ms", "answer_to_next_ms"):
        stats = figures.get(key) or {}
        p50, p99 = stats.get("p50"), stats.get("p99")
        checks[key] = p50 is not None and p99 is not None and p50 < LIGHT_P50_MS and p99 < LIGHT_P99_MS
    all_done = figures.get("completed") == figures.get("n") and not figures.get("failed")
    return {
        "target_p50_ms": LIGHT_P50_MS,
        "target_p99_ms": LIGHT_P99_MS,
        "meets_overhead_target": all_done and all(checks.values()),
        # the hello targets (runs/s against the write rate) do not apply to runs made one at a time
        "target_runs_per_s": None,
        "meets_target": None,
    }


def light(ctx: BenchContext, n: int, timeout_s: float = 300) -> list[dict[str, Any]]:
    return hello(ctx, n, scenario="light", timeout_s=timeout_s, sequential=True)


def hello_side_by_side(ctx: BenchContext, n: int, timeout_s: float = 300) -> list[dict[str, Any]]:
    """The hello row again with ``ctx.operator_command`` (e.g. the Go operator) in place of KubeChain."""
    if not ctx.operator_command:
        return []
    rows = hello(ctx, n, label="hello-operator", timeout_s=timeout_s, operator=ctx.operator_command)
    for row in rows:
        row["workers"], row["pool"], row["concurrency"] = None, "external", None
        row["figures"]["operator_command"] = ctx.operator_command
    return rows


# What "ready" was for a run's first turn (``ready_from`` counts them): each is a different clock, so
# ready→LLM compares like with like only between rows whose runs have the same.
READY_SEEN = "ReadyForLLM seen"  # the bench's watch saw ReadyForLLM (late by the watch's lag)
READY_CLAIMED = "claimedAt"  # never ReadyForLLM: the claim time the worker wrote with the turn
READY_CLAIM_SEEN = "SendContextWindowToLLM seen"  # never ReadyForLLM, no claimedAt: when the watch saw it


def ready_moment(timeline: Timeline) -> tuple[float, str] | None:
    """When the first turn became ready, and which clock says so (``READY_*``): first seen as ReadyForLLM
    in the watch (KubeChain's turns that went through the queue, the Go operator's) or, for a turn the
    worker that made it ready took itself (ReadyForLLM and the claim written as one: KubeChain's hello
    runs), the claim time it wrote: under load the watch lags by more than the few ms between that write
    and the LLM request, which would make ready→LLM negative."""
    for sighting in timeline.sightings:
        if sighting.phase == "ReadyForLLM":
            return sighting.t, READY_SEEN
        if sighting.phase == "SendContextWindowToLLM":
            claimed = parse_ts(sighting.claimed_at) if sighting.claimed_at else None
            return (claimed, READY_CLAIMED) if claimed is not None else (sighting.t, READY_CLAIM_SEEN)
    return None


def ready_time(timeline: Timeline) -> float | None:
    moment = ready_moment(timeline)
    return moment[0] if moment is not None else None


def _stragglers(
    timelines: dict[str, Timeline], runs: dict[str, str], latencies: list[float], limit: int = 10
) -> list[dict[str, Any]]:
    """Runs that took more than max(10 s, 5 × the median) or did not finish, with where they waited."""
    median = percentile(latencies, 50) or 0.0
    out: list[dict[str, Any]] = []
    for name in runs:
        timeline = timelines.get(name)
        if timeline is None or not timeline.sightings:
            out.append({"name": name, "latency_s": None, "phases": [], "longest_wait": None})
            continue
        final = timeline.first("FinalAnswer") or timeline.first("Failed")
        first = timeline.sightings[0].t
        latency = (final - first) if final is not None else None
        if latency is not None and latency <= max(10.0, 5 * median):
            continue
        gaps = [
            (b.t - a.t, a.phase) for a, b in zip(timeline.sightings, timeline.sightings[1:], strict=False)
        ]
        longest = max(gaps, default=(0.0, timeline.phase))
        out.append(
            {
                "name": name,
                "latency_s": round(latency, 2) if latency is not None else None,
                "phases": timeline.phases(),
                "longest_wait": {"phase": longest[1], "s": round(longest[0], 2)},
            }
        )
    out.sort(key=lambda s: -(s["latency_s"] if s["latency_s"] is not None else math.inf))
    return out[:limit] + ([{"more": len(out) - limit}] if len(out) > limit else [])


def cpu_per_run(cpu_s: dict[str, float], runs: int) -> dict[str, float] | None:
    """CPU milliseconds per completed run, by component (from the measured window)."""
    if not cpu_s or not runs:
        return None
    return {
        name: round(1000 * seconds / runs, 1)
        for name, seconds in cpu_s.items()
        if name not in ("machine", "others")
    }


def _events_per_run(kube: KubeClient, namespace: str, names: set[str]) -> float | None:
    try:
        events: Any = kube.list_events(namespace)  # (mypy mistakes client.py's "list" for its method)
    except KubeAPIError:
        return None
    mine = [e for e in events if (e.get("involvedObject") or {}).get("name") in names]
    return len(mine) / len(names) if names else None


def _warm_up(
    kube: KubeClient, namespace: str, agent: str, count: int, deadline: float, check: Check | None = None
) -> None:
    """A few runs through the whole loop first (connections, imports, first-request costs)."""
    warm = {f"warmup-{i}": f"warm-up {namespace} #{i}" for i in range(count)}
    create_runs(kube, namespace, warm, agent, threads=count)
    end = min(deadline, time.monotonic() + 90)
    phases: list[Any] = []
    while time.monotonic() < end:
        items, _ = kube.list_raw("taskruns", namespace)
        phases = [(i.get("status") or {}).get("phase") for i in items if i["metadata"]["name"] in warm]
        if len(phases) == count and all(p in TERMINAL for p in phases):
            return
        if check is not None:
            check()
        time.sleep(0.2)
    raise ScenarioTimeout(f"warm-up runs did not finish: {phases}")


def hello(
    ctx: BenchContext,
    n: int,
    workers: int = 1,
    pool: str = "threads",
    concurrency: int = HELLO_THREADS,
    scenario: str = "hello",
    label: str | None = None,
    timeout_s: float = 300,
    sequential: bool = False,
    operator: str | None = None,
) -> list[dict[str, Any]]:
    """``n`` runs created at once (``sequential``: one at a time, each after the previous finished —
    the light-load row, where per-turn overheads are measured without queueing behind other runs)."""
    label = label or scenario
    row = new_row(scenario, label, workers, pool, concurrency, n)
    deadline = time.monotonic() + timeout_s * ctx.timeout_factor
    kube = ctx.kube()
    try:
        namespace = create_namespace(kube, label)
        row["figures"]["namespace"] = namespace
        with row_stack(ctx, label, namespace, workers, pool, concurrency, operator=operator) as stack:
            check = operator_check(stack)
            set_script(stack, {"default": {"content": "Hello from the scripted LLM."}})
            create_agent(kube, namespace)
            wait_agent_ready(kube, namespace, "bench-agent", deadline, check=check)
            _warm_up(kube, namespace, "bench-agent", max(2, 2 * workers), deadline, check=check)
            runs = {f"run-{i:05d}": f"hello {label} {namespace} #{i}" for i in range(n)}
            recorder = WatchRecorder(ctx.kubeconfig, "taskruns", namespace).start()
            event_tally = EventTally.of(kube, namespace)
            event_tally.settle(deadline)
            try:
                api_before = api_request_totals(ctx.cp)
                cpu = CpuMeter(cpu_groups(ctx, stack), shallow=["bench"]).start()
                with apiserver_profiled(ctx, namespace, row["figures"]):
                    if sequential:
                        ctx.progress(f"{label}: {n} TaskRuns one after another ({workers} worker(s))")
                        started, created, done = time.time(), time.time(), True
                        for name, message in runs.items():
                            create_runs(kube, namespace, {name: message}, "bench-agent", threads=1)
                            created = time.time()
                            if not recorder.wait_for(
                                [name], TERMINAL, deadline, ctx.progress, label, check=check
                            ):
                                # the rest would be created back to back: no longer light load
                                done = False
                                break
                    else:
                        ctx.progress(
                            f"{label}: creating {n} TaskRuns at once ({workers} worker(s), {pool} × {concurrency})"
                        )
                        started, created = create_runs(kube, namespace, runs, "bench-agent")
                        ctx.progress(
                            f"{label}: {n} created in {created - started:.1f} s; waiting for FinalAnswer"
                        )
                        done = recorder.wait_for(
                            list(runs), TERMINAL, deadline, ctx.progress, f"{label}: ", check=check
                        )
                    # The window (and its CPU) ends when every Event exists, so none of the work a run
                    # causes falls outside it (workers post a transition's Events before going on, but
                    # another operator, or an older KubeChain, may post them later). One that posts
                    # fewer is waited for until none came for 2 s; the window still ends at the last
                    # Event (or FinalAnswer) seen, so those idle seconds are not counted.
                    events_done = event_tally.wait(EVENTS_PER_HELLO_RUN * n, deadline, on_change=cpu.mark)
                    row["cpu_s"] = cpu.stop(at_mark=True)
                row["cpu_wall_s"] = round(cpu.wall_s, 2)
                row["timed_out"] = not done
                time.sleep(0.5)  # the last events of the last runs
                row["figures"]["api_requests_per_run"] = requests_per_run(
                    api_before, api_request_totals(ctx.cp), n, n
                )
            finally:
                recorder.stop()
            timelines = recorder.snapshot()
            requests = llm_requests(stack)
        events = _events_per_run(kube, namespace, set(runs))
        row["figures"].update(
            hello_figures(timelines, requests, runs, started, created, events, ctx.baseline_writes_per_s)
        )
        f = row["figures"]
        f["cpu_ms_per_run"] = cpu_per_run(row["cpu_s"], f["completed"])
        f["n"] = n
        f.update(with_event_drain(f, events_done - started))
        if sequential:
            f.update(light_load_verdict(f))
        ctx.progress(f"{label}: {f['runs_per_s']} runs/s; ready→LLM p50 {f['ready_to_llm_ms']['p50']} ms")
    finally:
        kube.close()
    return [row]


def scale(
    ctx: BenchContext,
    n: int,
    worker_counts: tuple[int, ...] = (1, 2, 4),
    timeout_s: float = 300,
    thread_counts: tuple[int, ...] = (16, 1),
) -> list[dict[str, Any]]:
    """hello with each worker count, for each size of worker (threads per process). With 16 threads one
    worker already keeps this machine's cores busy; with 1 thread a worker cannot, so that series shows
    throughput growing with workers until the shared cores are the limit. Small workers get half of the
    runs (each row takes ~10-25 s: long enough to average over this machine's drift). The rows are judged
    on that, not on the hello target (:func:`judge_scale`)."""
    rows: list[dict[str, Any]] = []
    try:
        _scale_rows(ctx, n, worker_counts, timeout_s, thread_counts, rows)
    except KeyboardInterrupt as exc:
        keep_rows_on_interrupt(exc, rows)
        raise
    judge_scale(rows, usable_cpus())
    return rows


def _scale_rows(
    ctx: BenchContext,
    n: int,
    worker_counts: tuple[int, ...],
    timeout_s: float,
    thread_counts: tuple[int, ...],
    rows: list[dict[str, Any]],
) -> None:
    for threads in thread_counts:
        runs = n if threads >= HELLO_THREADS else max(10, n // 2)
        for count in worker_counts:
            label = f"scale-{count}w" if threads == HELLO_THREADS else f"scale-{count}w-{threads}t"
            remove_bench_namespaces(ctx)
            try:
                rows += hello(
                    ctx,
                    runs,
                    workers=count,
                    concurrency=threads,
                    scenario="scale",
                    label=label,
                    timeout_s=timeout_s,
                )
            except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                row = new_row("scale", label, count, "threads", threads, runs)
                row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                ctx.progress(f"{label} failed: {row['error']}")


# --------------------------------------------------------------------------------------------------
# fanout: 50 parallel 1-second tool calls
# --------------------------------------------------------------------------------------------------


def fanout(
    ctx: BenchContext,
    tool_calls: int = 50,
    tool_s: float = 1.0,
    trials: int = 3,
    concurrency: int = 64,
    timeout_s: float = 240,
) -> list[dict[str, Any]]:
    row = new_row("fanout", "fanout", 1, "threads", concurrency, tool_calls)
    deadline = time.monotonic() + timeout_s * ctx.timeout_factor
    kube = ctx.kube()
    sleeper = SleepServer(tool_s).start()
    try:
        namespace = create_namespace(kube, "fanout")
        row["figures"]["namespace"] = namespace
        tool = resource(
            "Tool",
            "sleep1",
            {
                "name": "sleep1",
                "toolType": "externalAPI",
                "description": f"Waits {tool_s:g} s and answers",
                "parameters": {"type": "object", "properties": {"i": {"type": "integer"}}, "required": ["i"]},
                "execute": {"externalAPI": {"url": sleeper.url, "method": "POST", "timeoutSeconds": 60}},
            },
        )
        with row_stack(ctx, "fanout", namespace, 1, "threads", concurrency) as stack:
            calls = [{"name": "sleep1", "arguments": {"i": i}} for i in range(tool_calls)]
            set_script(
                stack,
                {
                    "rules": [
                        {
                            "match": {"user_contains": "FANOUT"},
                            "turns": [{"tool_calls": calls}, {"content": "fan-out done"}],
                        }
                    ],
                    "default": {"content": "warm"},
                },
            )
            create_agent(kube, namespace, tools=[tool])
            wait_agent_ready(kube, namespace, "bench-agent", deadline, tools=1)
            _warm_up(kube, namespace, "bench-agent", 2, deadline)
            runs_rec = WatchRecorder(ctx.kubeconfig, "taskruns", namespace).start()
            calls_rec = WatchRecorder(ctx.kubeconfig, "taskruntoolcalls", namespace).start()
            cpu = CpuMeter(cpu_groups(ctx, stack), shallow=["bench"]).start()
            trial_figures: list[dict[str, Any]] = []
            try:
                for trial in range(trials):
                    name = f"fanout-{trial}"
                    message = f"FANOUT trial {trial} {namespace}"
                    sleeper_before = len(sleeper.records)
                    api_before = api_request_totals(ctx.cp)
                    sleeper.max_in_flight = 0
                    ctx.progress(
                        f"fanout: trial {trial + 1}/{trials}: {tool_calls} tool calls × {tool_s:g} s"
                    )
                    started, _ = create_runs(kube, namespace, {name: message}, "bench-agent", threads=1)
                    done = runs_rec.wait_for([name], TERMINAL, deadline, ctx.progress, "fanout: ")
                    if not done:
                        row["timed_out"] = True
                        break
                    time.sleep(0.5)  # let the last tool-call events arrive
                    api = requests_per_run(api_before, api_request_totals(ctx.cp), 1, 1)
                    trial_figures.append(
                        _fanout_trial(
                            runs_rec.snapshot()[name],
                            {k: v for k, v in calls_rec.snapshot().items() if k.startswith(f"{name}-")},
                            [r for r in llm_requests(stack) if r.get("first_user") == message],
                            sleeper.records[sleeper_before:],
                            sleeper.max_in_flight,
                            started,
                            tool_s,
                        )
                    )
                    trial_figures[-1]["api_requests"] = api
                    ctx.progress(
                        f"fanout: trial {trial + 1}: ToolCallsPending→ReadyForLLM {trial_figures[-1]['wall_s']} s"
                    )
            finally:
                row["cpu_s"] = cpu.stop()
                row["cpu_wall_s"] = round(cpu.wall_s, 2)
                runs_rec.stop()
                calls_rec.stop()
        row["figures"].update(_fanout_summary(trial_figures, tool_calls, tool_s))
    finally:
        sleeper.stop()
        kube.close()
    return [row]


def _fanout_trial(
    run: Timeline,
    toolcalls: dict[str, Timeline],
    requests: list[dict[str, Any]],
    tool_requests: list[tuple[float, float]],
    max_in_flight: int,
    started: float,
    tool_s: float,
) -> dict[str, Any]:
    pending = run.first("ToolCallsPending")
    # the next turn is ready when seen as ReadyForLLM, or already claimed by the worker that made it so
    readied = (
        [run.first(p, after=pending) for p in ("ReadyForLLM", "SendContextWindowToLLM")] if pending else []
    )
    ready2 = min((t for t in readied if t is not None), default=None)
    final = run.first("FinalAnswer")

    def rel(t: float | None) -> float | None:
        return round(t - pending, 3) if (t is not None and pending is not None) else None

    created = [t.sightings[0].t for t in toolcalls.values() if t.sightings]
    succeeded = [t.first("Succeeded") for t in toolcalls.values()]
    succeeded_t = [t for t in succeeded if t is not None]
    llm_s = sum(r["finished_at"] - r["received_at"] for r in requests if r.get("status_code") == 200)
    whole = (final - started) if final is not None else None
    ok = [r for r in requests if r.get("status_code") == 200]
    answered = [r["finished_at"] for r in ok if r.get("turn") == 0]
    asked_again = [r["received_at"] for r in ok if r.get("turn") == 1]
    return {
        "wall_s": round(ready2 - pending, 3) if (ready2 is not None and pending is not None) else None,
        # the whole turn as the LLM sees it: its answer sent → the next request with the 50 results
        "turn_wall_s": round(min(asked_again) - max(answered), 3) if (answered and asked_again) else None,
        "toolcalls_seen": len(toolcalls),
        "toolcalls_succeeded": len(succeeded_t),
        "tool_requests": len(tool_requests),
        "last_toolcall_created_s": rel(max(created)) if created else None,
        "first_tool_request_s": rel(min(a for a, _ in tool_requests)) if tool_requests else None,
        "last_tool_request_s": rel(max(a for a, _ in tool_requests)) if tool_requests else None,
        "last_tool_answer_s": rel(max(b for _, b in tool_requests)) if tool_requests else None,
        "last_succeeded_seen_s": rel(max(succeeded_t)) if succeeded_t else None,
        "fan_in_lag_s": round(ready2 - max(succeeded_t), 3) if (ready2 is not None and succeeded_t) else None,
        "max_concurrent_tools": max_in_flight,
        "max_concurrent_tools_log": max_overlap(tool_requests),
        "llm_requests": len(requests),
        "run_s": round(whole, 3) if whole is not None else None,
        "llm_s": round(llm_s, 3),
        "run_minus_llm_s": round(whole - llm_s, 3) if whole is not None else None,
        "phase_path": ">".join(p or '""' for p in run.phases()),
        "ideal_s": tool_s,
    }


FANOUT_TARGET_S = 2.0


def _fanout_summary(trials: list[dict[str, Any]], tool_calls: int, tool_s: float) -> dict[str, Any]:
    if not trials:
        return {"tool_calls": tool_calls, "tool_s": tool_s, "ideal_s": tool_s, "trials": []}
    walls = [t["wall_s"] for t in trials if t["wall_s"] is not None]
    median_trial = sorted(trials, key=lambda t: t["wall_s"] if t["wall_s"] is not None else math.inf)[
        len(trials) // 2
    ]
    out = {k: v for k, v in median_trial.items() if k != "phase_path"}
    out.update(
        {
            "tool_calls": tool_calls,
            "tool_s": tool_s,
            "ideal_s": tool_s,
            "trials_wall_s": walls,
            "overhead_s": round(median_trial["wall_s"] - tool_s, 3)
            if median_trial["wall_s"] is not None
            else None,
            "trials_turn_wall_s": [t.get("turn_wall_s") for t in trials],
            "target_s": FANOUT_TARGET_S,
            # judged on the whole turn (LLM answer → next LLM request), not only the phase in between
            "meets_target": (
                median_trial.get("turn_wall_s") is not None
                and median_trial["turn_wall_s"] < FANOUT_TARGET_S
                and median_trial.get("toolcalls_succeeded") == tool_calls
            ),
            "trials": trials,
        }
    )
    return out


# --------------------------------------------------------------------------------------------------
# inflight: 1,000 runs with a 2 s LLM
# --------------------------------------------------------------------------------------------------


INFLIGHT_RSS_TARGET_KIB = 1024 * 1024  # 1 GiB of worker RSS for 1,000 runs in flight


def inflight(
    ctx: BenchContext,
    n: int,
    llm_s: float = 2.0,
    workers: int = 2,
    concurrency: int | None = None,
    timeout_s: float = 900,
    held: bool = False,
) -> list[dict[str, Any]]:
    """``n`` runs at once with an ``llm_s`` LLM: completion time against the ideal, and the workers'
    peak RSS. Runs reach the LLM only as fast as the API server takes their writes, so with a 2 s LLM
    ~150 of them are in its hands at any moment; ``held``: every answer waits until all ``n`` requests
    are in flight together, so the peak RSS is that of ``n`` calls held at once (the memory target)."""
    concurrency = concurrency or max(16, math.ceil(n / workers))
    label = "inflight-held" if held else "inflight"
    row = new_row("inflight", label, workers, "threads", concurrency, n)
    deadline = time.monotonic() + timeout_s * ctx.timeout_factor
    kube = ctx.kube()
    try:
        namespace = create_namespace(kube, label)
        row["figures"]["namespace"] = namespace
        with row_stack(ctx, label, namespace, workers, "threads", concurrency) as stack:
            set_script(stack, {"default": {"content": "warm"}})
            create_agent(kube, namespace)
            wait_agent_ready(kube, namespace, "bench-agent", deadline)
            _warm_up(kube, namespace, "bench-agent", max(2, 2 * workers), deadline)
            script: dict[str, Any] = {"default": {"content": "Slow hello."}, "latency_s": llm_s}
            if held:
                script["hold_until_in_flight"] = n
            set_script(stack, script)
            runs = {f"run-{i:05d}": f"inflight {namespace} #{i}" for i in range(n)}
            rss = RssSampler(worker_pids(stack), 0.2).start()
            recorder = WatchRecorder(ctx.kubeconfig, "taskruns", namespace).start()
            try:
                time.sleep(0.5)  # a few idle RSS samples
                api_before = api_request_totals(ctx.cp)
                cpu = CpuMeter(cpu_groups(ctx, stack), shallow=["bench"]).start()
                ctx.progress(
                    f"{label}: creating {n} TaskRuns ({llm_s:g} s LLM{', held until all are in flight' if held else ''}; "
                    f"{workers} × {concurrency} threads)"
                )
                started, created = create_runs(kube, namespace, runs, "bench-agent")
                ctx.progress(f"{label}: {n} created in {created - started:.1f} s; waiting for FinalAnswer")
                done = recorder.wait_for(list(runs), TERMINAL, deadline, ctx.progress, f"{label}: ")
                row["cpu_s"] = cpu.stop()
                row["cpu_wall_s"] = round(cpu.wall_s, 2)
                row["timed_out"] = not done
                time.sleep(0.5)
                api_per_run = requests_per_run(api_before, api_request_totals(ctx.cp), n, n)
            finally:
                recorder.stop()
                rss.stop()
            timelines = recorder.snapshot()
            requests = [
                r for r in llm_requests(stack) if str(r.get("first_user") or "").startswith("inflight ")
            ]
        base = hello_figures(timelines, requests, runs, started, created, None, ctx.baseline_writes_per_s)
        writes_per_run = base.get("writes_per_run")
        floor = (
            (n * writes_per_run / ctx.baseline_writes_per_s)
            if (writes_per_run and ctx.baseline_writes_per_s)
            else None
        )
        ok = [r for r in requests if r.get("status_code") == 200]
        idle = rss.first_kib
        concurrent = max_overlap((r["received_at"], r["finished_at"]) for r in ok)
        row["figures"].update(
            {
                "completed": base["completed"],
                "failed": base["failed"],
                "llm_s": llm_s,
                "ideal_s": llm_s,
                "create_s": base["create_s"],
                "wall_s": base["wall_s"],
                "wall_99_s": base["wall_99_s"],
                "wall_over_ideal": round(base["wall_s"] / llm_s, 1) if base["wall_s"] else None,
                "stragglers": base["stragglers"],
                "runs_per_s": base["runs_per_s"],
                "run_latency_s": base["run_latency_s"],
                "ready_to_llm_ms": base["ready_to_llm_ms"],
                "answer_to_next_ms": base["answer_to_next_ms"],
                "writes_per_run": writes_per_run,
                "write_floor_s": round(floor, 2) if floor else None,
                "held_until_in_flight": n if held else None,
                "max_concurrent_llm": concurrent,
                "last_llm_request_s": round(max(r["received_at"] for r in ok) - started, 2) if ok else None,
                "llm_requests": len(requests),
                "duplicate_llm_requests": base["duplicate_llm_requests"],
                "rss_idle_mib": round(idle / 1024, 1),
                "rss_peak_mib": round(rss.peak_kib / 1024, 1),
                # per call held at the peak: the runs whose calls were open then, not all n
                "rss_per_run_kib": round((rss.peak_kib - idle) / concurrent, 1) if concurrent else None,
                "meets_memory_target": (
                    concurrent >= n and rss.peak_kib < INFLIGHT_RSS_TARGET_KIB if held else None
                ),
                "rss_peak_per_process_mib": {
                    str(pid): round(kib / 1024, 1) for pid, kib in rss.peak_per_pid.items()
                },
                "rss_samples": len(rss.samples),
                "phase_paths": base["phase_paths"],
                "api_requests_per_run": api_per_run,
            }
        )
        f = row["figures"]
        f["cpu_ms_per_run"] = cpu_per_run(row["cpu_s"], f["completed"])
        ctx.progress(
            f"{label}: {f['completed']}/{n} in {f['wall_s']} s; {concurrent} LLM calls at once at most; "
            f"peak worker RSS {f['rss_peak_mib']} MiB"
        )
    finally:
        kube.close()
    return [row]
