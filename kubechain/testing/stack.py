"""The whole system on one machine: control plane, Redis, scripted LLM, watcher and workers as processes.

``kubechain up`` runs it in the foreground; end-to-end tests and benchmarks start it the same way, so what
the tests exercise is what users run.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from kubechain.crdgen import all_crds
from kubechain.kube.client import KubeClient
from kubechain.kube.connection import (
    kubeconfig_exists,
    kubeconfig_path,
    load_connection,
    uses_in_cluster_config,
)
from kubechain.kube.crds import apply_crds
from kubechain.kube.errors import KubeAPIError, transport_reason
from kubechain.queueing import QueueName
from kubechain.statemachines.lease import lease_holder
from kubechain.testing.controlplane import (
    LocalControlPlane,
    ManagedProcess,
    free_port,
    private_dir,
    write_private,
)
from kubechain.testing.redis_server import LocalRedis

Progress = Callable[[str], None]

# How long a watcher or worker may take to be ready (/readyz) at start (imports, Celery, Redis, the watcher's
# first lists).
PROCESS_START_TIMEOUT_S = 120.0


class ProcessStartError(RuntimeError):
    """A watcher or worker exited before it was ready."""


# Restarts of a process that keeps exiting wait 1 s, 2 s, 4 s, ... up to 30 s (a crash loop's back-off, like
# a kubelet's), and start again from 1 s once a process had run for a minute.
RESTART_BACKOFF_INITIAL_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
RESTART_BACKOFF_RESET_S = 60.0


def restart_delay(previous_delay_s: float | None, ran_for_s: float) -> float:
    """How long to wait before restarting a process that exited after running ``ran_for_s`` seconds, given
    the delay before its previous restart (None: never restarted)."""
    if previous_delay_s is None or ran_for_s >= RESTART_BACKOFF_RESET_S:
        return RESTART_BACKOFF_INITIAL_S
    return min(max(previous_delay_s, RESTART_BACKOFF_INITIAL_S) * 2, RESTART_BACKOFF_MAX_S)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _print(message: str) -> None:
    print(f"[kubechain] {message}", file=sys.stderr, flush=True)


@dataclass
class StackOptions:
    workdir: Path
    cluster: str = "local"  # local | current (the kubeconfig's current context)
    # cluster "current" only: a kubeconfig file, or several separated by os.pathsep (merged as kubectl
    # merges $KUBECONFIG); default $KUBECONFIG, else ~/.kube/config. A local control plane's kubeconfig is
    # always the stack's own file, <workdir>/kubeconfig.
    kubeconfig: str | Path | None = None
    # cluster "current" only: the context (of that kubeconfig) every process uses, whatever kubectl
    # switches to while they run; None: the kubeconfig's current context
    context: str | None = None
    workers: int = 1
    worker_queues: str = "control,checks,llm,tools"
    # Processes of their own for the checks queue (validations that call out: MCP servers, LLM providers,
    # HumanLayer), as deploy/ and the Procfile run them; the other workers then leave it to them, so a
    # check that hangs never holds a thread a run's prepare needs. 0: the workers take it too.
    checks_workers: int = 0
    worker_pool: str = "threads"
    worker_concurrency: int = 16
    watchers: int = 1
    # scripted: every provider-openai LLM without a baseUrl is answered by the scripted server (tests,
    # bench); by-key: only those whose API key is "scripted" (kubechain up); real: none
    llm: str = "scripted"
    llm_port: int = 0
    llm_latency_s: float = 0.0
    resync_interval_s: float = 5.0
    stale_after_s: float = 5.0
    claim_timeout_s: float = 180.0
    log_level: str = "INFO"
    # Restart watcher/worker processes that exit, as a Deployment's restart policy would.
    supervise: bool = False
    # Use the Redis that $REDIS_URL names, when set, instead of starting a redis-server (kubechain up).
    # Tests and benchmarks start their own: they flush it and pause its clients.
    redis_from_env: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    # The workers' own, on top of extra_env: a fault only they meet (a chaos test's KUBECONFIG through a
    # proxy that answers them late, while the watcher's stays prompt).
    worker_env: dict[str, str] = field(default_factory=dict)


class LocalStack:
    def __init__(self, options: StackOptions, progress: Progress = _print) -> None:
        self.options = options
        self.progress = progress
        self.workdir = options.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.control_plane: LocalControlPlane | None = None
        self.redis: LocalRedis | None = None
        # What the processes get as KUBECONFIG. A local control plane's is written to a file of the stack's
        # own, never to a user's kubeconfig, and never to a list of files (which kubectl would merge).
        self.kubeconfig: str
        if options.cluster == "local":
            if options.kubeconfig is not None:
                raise ValueError("a local control plane writes its own kubeconfig (<workdir>/kubeconfig)")
            self.kubeconfig = str(self.workdir / "kubeconfig")
        else:
            self.kubeconfig = kubeconfig_path(str(options.kubeconfig) if options.kubeconfig else None)
        self.llm_port = options.llm_port
        self.llm_process: ManagedProcess | None = None
        self.watchers: dict[str, ManagedProcess] = {}
        self.workers: dict[str, ManagedProcess] = {}
        self._queues: dict[str, str] = {}  # worker name -> the queues it consumes (a restart keeps them)
        self.metrics_ports: dict[str, int] = {}  # process name -> its /metrics port
        # The watchers' leader-election identities are unique per stack: two stacks on one cluster (two
        # `kubechain up --cluster current`) must not both believe they hold the Lease as "watcher-0".
        self.instance = secrets.token_hex(3)
        self.restarts: dict[str, int] = {}
        self._restart_delays: dict[str, float] = {}  # name -> the delay before its last restart
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        # what the processes say may quote what they were sent, and the workdir may be one others can read
        private_dir(self.logs)
        # first: a REDIS_URL that does not answer is said before a control plane is built and started
        self.start_redis()
        if self.options.cluster == "local":
            self.progress("starting a local control plane (etcd + kube-apiserver)")
            self.control_plane = LocalControlPlane(
                workdir=control_plane_dir(self.workdir), progress=self.progress
            )
            self.control_plane.start()
            # it carries the control plane's admin token, and the working folder may be one others can read
            write_private(Path(self.kubeconfig), self.control_plane.kubeconfig_path.read_text())
        elif uses_in_cluster_config(self.kubeconfig):  # a pod's (--cluster current): no kubeconfig
            self.progress("using the cluster of the in-cluster configuration (this pod's service account)")
        else:
            self.progress(f"using the cluster of kubeconfig {self.kubeconfig}")
        self.progress("installing the KubeChain CRDs")
        kube = self.kube()
        try:
            apply_crds(kube, all_crds())
        finally:
            kube.close()
        if self.control_plane is not None and self.control_plane.has_controller_manager:
            self.control_plane.restart_controller_manager()  # so GC knows the new kinds at once
        if self.options.llm in ("scripted", "by-key"):
            self.start_llm()
        for index in range(self.options.watchers):
            self.start_watcher(f"watcher-{index}")
        for index in range(self.options.workers):
            self.start_worker(f"worker-{index}", self.queues_of_workers())
        for index in range(self.options.checks_workers):
            self.start_worker(f"checks-{index}", QueueName.CHECKS.value)
        self.wait_until_serving()
        if self.options.supervise:
            threading.Thread(target=self._supervise, name="supervisor", daemon=True).start()
        self.progress(f"KubeChain is up ({time.monotonic() - started:.1f}s); logs in {self.logs}")

    def wait_until_serving(self, timeout_s: float = PROCESS_START_TIMEOUT_S) -> None:
        """Wait until every watcher and worker answers on its /readyz: a worker is ready once its Celery
        consumer takes tasks, a watcher once its first lists are in (it answers /healthz before: "up" did
        not yet mean it had seen what exists). "KubeChain is up" was said as they were spawned, seconds
        before they could act (on 2 cores, the README's first run sat with empty columns meanwhile). One
        that exits first fails the start, naming it and with the last lines it wrote."""
        deadline = time.monotonic() + timeout_s
        for name, process in [*self.watchers.items(), *self.workers.items()]:
            url = f"http://127.0.0.1:{self.metrics_ports[name]}/readyz"
            said = ""  # its last answer: why it is not ready yet
            while True:
                if not process.running():
                    raise ProcessStartError(
                        f"{name} exited with {describe_exit(process.returncode())} before it was ready. "
                        f"Last lines:\n{process.tail(8)}"
                    )
                try:
                    # (a process of this machine: never through a proxy of the environment's)
                    answer = httpx.get(url, timeout=2, trust_env=False)
                    if answer.status_code == 200:
                        break
                    said = answer.text.strip()
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    why = f": {said}" if said else " (no answer on /readyz)"
                    raise TimeoutError(f"{name} was not ready within {timeout_s:.0f}s{why}")
                time.sleep(0.1)

    def start_redis(self) -> None:
        # it says where it is (a REDIS_URL without its password)
        # Its folder and log are the stack's (a temporary folder was left behind when `up` was killed, and
        # its log went with it at every stop)
        self.redis = LocalRedis(
            workdir=self.workdir / "redis",
            log_path=self.logs / "redis.log",
            use_env=self.options.redis_from_env,
            progress=self.progress,
        )
        self.redis.start()

    def _supervise(self) -> None:
        """Restart watcher and worker processes that exit, with an exponential back-off (:func:`restart_delay`)."""
        pending: dict[str, tuple[ManagedProcess, float]] = {}  # name -> (the exited process, when to restart)
        while not self._stopping.wait(0.2):
            now = time.monotonic()
            for group, start in ((self.workers, self.start_worker), (self.watchers, self.start_watcher)):
                for name, process in list(group.items()):
                    if self._stopping.is_set():
                        return
                    if name in pending and pending[name][0] is not process:
                        del pending[name]  # started again by someone else meanwhile
                    if name not in pending:
                        if process.running():
                            continue
                        ran_for = now - process.started_at
                        delay = restart_delay(self._restart_delays.get(name), ran_for)
                        self._restart_delays[name] = delay
                        pending[name] = (process, now + delay)
                        at = datetime.now() + timedelta(seconds=delay)
                        self.progress(
                            f"{name} (pid {process.pid}) exited with {describe_exit(process.returncode())} after "
                            f"{ran_for:.1f}s; restarting it in {delay:g}s, at {at:%H:%M:%S}. Last lines:\n"
                            f"{process.tail(8)}"
                        )
                    elif now >= pending[name][1]:
                        del pending[name]
                        try:
                            start(name)
                            self.restarts[name] = self.restarts.get(name, 0) + 1
                        except Exception as exc:  # noqa: BLE001 - e.g. fork failed: retried after a back-off
                            delay = restart_delay(self._restart_delays.get(name), 0.0)
                            self._restart_delays[name] = delay
                            pending[name] = (process, time.monotonic() + delay)
                            self.progress(
                                f"{name} could not be restarted ({exc}); trying again in {delay:g}s"
                            )

    def stop(self) -> None:
        self._stopping.set()
        for process in [*self.workers.values(), *self.watchers.values()]:
            process.stop(timeout=15)
        if self.llm_process:
            self.llm_process.stop()
        if self.redis:
            self.redis.stop()
        if self.control_plane:
            self.control_plane.stop()

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- components --------------------------------------------------------------------------------

    def kube(self) -> KubeClient:
        return KubeClient(load_connection(self.kubeconfig, self.options.context))

    @property
    def llm_url(self) -> str:
        return f"http://127.0.0.1:{self.llm_port}"

    @property
    def llm_base_url(self) -> str:
        return f"{self.llm_url}/v1"

    def env(self) -> dict[str, str]:
        assert self.redis is not None
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "REDIS_URL": self.redis.url,
            "KUBECHAIN_RESYNC_INTERVAL_S": str(self.options.resync_interval_s),
            "KUBECHAIN_STALE_AFTER_S": str(self.options.stale_after_s),
            "KUBECHAIN_CLAIM_TIMEOUT_S": str(self.options.claim_timeout_s),
            "KUBECHAIN_LOG_LEVEL": self.options.log_level,
            "PYTHONUNBUFFERED": "1",
        }
        # The commands installed beside KubeChain (uvx, npx wrappers: how stdio MCP servers start) are
        # found even from a terminal whose PATH lacks the virtualenv's bin directory.
        bin_dir = os.path.dirname(sys.executable)
        path = env.get("PATH", "")
        if bin_dir not in path.split(os.pathsep):
            env["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
        if self.options.llm == "scripted":
            env["KUBECHAIN_OPENAI_BASE_URL"] = self.llm_base_url
        elif self.options.llm == "by-key":
            env["KUBECHAIN_SCRIPTED_LLM_BASE_URL"] = self.llm_base_url
        # These processes are not pods, even when `up` runs inside one (a dev container, a CI runner): a
        # POD_NAMESPACE inherited from there would move the Lease to a namespace the local cluster lacks.
        env.pop("POD_NAMESPACE", None)
        # Pinned, so that a process restarted after `kubectl config use-context` still talks to the same
        # cluster (and an inherited context name never points into the local control plane's kubeconfig).
        env.pop("KUBECHAIN_KUBE_CONTEXT", None)
        if self.options.context:
            env["KUBECHAIN_KUBE_CONTEXT"] = self.options.context
        env.update(self.options.extra_env)
        return env

    def start_llm(self) -> None:
        self.llm_port = self.llm_port or free_port()
        argv = [sys.executable, "-m", "kubechain.llm.scripted_server", "--port", str(self.llm_port)]
        if self.options.llm_latency_s:
            argv += ["--latency", str(self.options.llm_latency_s)]
        self.llm_process = ManagedProcess("llm", argv, self.logs / "llm.log", env=self.env())
        self.llm_process.start()
        wait_for_http(f"{self.llm_url}/healthz", 30)
        self.progress(f"scripted LLM (OpenAI-compatible) at {self.llm_base_url}")

    def _process_env(self, name: str) -> dict[str, str]:
        port = self.metrics_ports.setdefault(name, free_port())
        return self.env() | {"POD_NAME": self.identity(name), "KUBECHAIN_METRICS_PORT": str(port)}

    def identity(self, name: str) -> str:
        """A process's identity (claims, the Lease): its name, and for watchers this stack's instance."""
        return f"{name}-{self.instance}" if name.startswith("watcher") else name

    def start_watcher(self, name: str) -> ManagedProcess:
        env = self._process_env(name)
        process = ManagedProcess(name, [sys.executable, "-m", "watcher"], self.logs / f"{name}.log", env=env)
        process.start()
        self.watchers[name] = process
        self.progress(f"{name} started (pid {process.pid})")
        return process

    def queues_of_workers(self) -> str:
        """The queues of the workers (``worker-N``): ``worker_queues``, less checks when checks workers
        take it."""
        queues = [queue for queue in self.options.worker_queues.split(",") if queue]
        if self.options.checks_workers:
            queues = [queue for queue in queues if queue != QueueName.CHECKS.value]
        return ",".join(queues)

    def start_worker(self, name: str, queues: str | None = None) -> ManagedProcess:
        """Start worker ``name`` on ``queues``; by default those it consumed when it last ran, or the
        workers' (:meth:`queues_of_workers`)."""
        queues = queues or self._queues.get(name) or self.queues_of_workers()
        argv = [
            sys.executable,
            "-m",
            "kubechain.cli",
            "worker",
            "--queues",
            queues,
            "--pool",
            self.options.worker_pool,
            "--concurrency",
            str(self.options.worker_concurrency),
            "--name",
            name,
        ]
        env = self._process_env(name) | self.options.worker_env
        process = ManagedProcess(name, argv, self.logs / f"{name}.log", env=env)
        process.start()
        self.workers[name] = process
        self._queues[name] = queues
        self.progress(f"{name} started (pid {process.pid}, queues {queues})")
        return process


def log_dirs(options: StackOptions) -> list[Path]:
    """Where a stack's processes log, of the folders that exist: its own (watchers, workers, the scripted
    LLM, Redis) and, with a local control plane, etcd's, kube-apiserver's and kube-controller-manager's
    (not made when the start stopped before the control plane: a REDIS_URL that does not answer)."""
    dirs = [options.workdir / "logs"]
    if options.cluster == "local":
        dirs.append(control_plane_dir(options.workdir) / "logs")
    return [folder for folder in dirs if folder.is_dir()]


def control_plane_dir(workdir: Path) -> Path:
    """A stack's local control plane: its keys, token, kubeconfig, etcd data and logs."""
    return workdir / "controlplane"


def has_cluster_data(workdir: Path) -> bool:
    """Whether an earlier start left the local cluster's etcd data in ``workdir``."""
    return (control_plane_dir(workdir) / "etcd").exists()


def wait_for_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")
        time.sleep(0.1)


@dataclass(frozen=True)
class Unusable:
    """Why the current kube context cannot be used: its kubeconfig cannot be read (``kubeconfig``), or its
    API server does not answer."""

    reason: str
    kubeconfig: bool


def why_unusable(kubeconfig: str | None, *, in_cluster: bool = True) -> Unusable | None:
    """None when the current kube context answers, else why not (``kubechain up`` says it, rather than
    falling back to a local control plane, or failing, without a word). In a pod with no kubeconfig, the
    current context is the pod's in-cluster configuration, as for every process ``up`` starts
    (:func:`load_connection`); ``in_cluster=False``: it is not looked at (``up --cluster auto`` starts a
    local control plane there, as it did, rather than take the cluster a CI runner's pod runs in)."""
    where = kubeconfig_path(kubeconfig)
    if not kubeconfig_exists(kubeconfig):
        if not uses_in_cluster_config(kubeconfig):
            return Unusable(f"cannot load the cluster connection from {where}: no such file", kubeconfig=True)
        if not in_cluster:
            return Unusable(
                f"there is no kubeconfig at {where}, and the in-cluster configuration is used with "
                "--cluster current only",
                kubeconfig=True,
            )
        where = "the in-cluster configuration"
    try:
        client = KubeClient(load_connection(kubeconfig), timeout_s=3)
    except Exception as exc:  # noqa: BLE001 - kubernetes raises many kinds for a bad kubeconfig
        reason = " ".join(str(exc).split())  # a YAML error's lines, on one
        return Unusable(f"cannot load the cluster connection from {where}: {reason}", kubeconfig=True)
    try:
        client.version()
    except KubeAPIError as exc:
        server = client.connection.host
        if exc.status == 0:
            return Unusable(f"its API server at {server} does not answer: {transport_reason(exc)}", False)
        return Unusable(
            f"its API server at {server} answered {exc.status} {exc.reason}: {exc.message}", False
        )
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return Unusable(f"its API server at {client.connection.host} cannot be asked: {exc}", False)
    finally:
        client.close()
    return None


# Where deploy/ runs the watcher's leader election (deploy/base/config.env, rbac.yaml).
DEPLOYED_LEASE = ("kubechain-system", "kubechain-watcher")


def local_lease() -> tuple[str, str]:
    """Where the watcher of a ``kubechain up`` (or of the Procfile) leads: the settings' Lease, as the
    watcher reads it (a variable's name in any case), in "default" unless KUBECHAIN_LEASE_NAMESPACE says
    otherwise: the stack drops POD_NAMESPACE (see ``LocalStack.env``), which the settings would take.
    Raises SettingsInvalid for settings the watcher could not start with."""
    from kubechain.settings import load_settings

    settings = load_settings()
    set_here = "lease_namespace" in settings.model_fields_set  # else POD_NAMESPACE's, or "default"
    return (settings.lease_namespace if set_here else "default", settings.lease_name)


@dataclass(frozen=True)
class HeldLease:
    """A Lease a KubeChain watcher holds: its holder, the Lease (namespace, name), and how long it stays
    held once its holder stops renewing it (its leaseDurationSeconds: a watcher killed frees it then)."""

    holder: str
    lease: tuple[str, str]
    duration_s: float


def running_watcher(kubeconfig: str | None) -> HeldLease | None:
    """A KubeChain watcher leading in the current context's cluster, and the Lease it holds, if any: a
    deployed one (:data:`DEPLOYED_LEASE`), or another ``up``'s (:func:`local_lease`). A second one there
    would act on every resource beside it (deployed), or stand by with workers that get nothing while
    its scripted LLM is not the one answering (another ``up``)."""
    for lease in (DEPLOYED_LEASE, local_lease()):
        held = held_lease(kubeconfig, lease=lease)
        if held is not None:
            return held
    return None


def deployed_watcher(
    kubeconfig: str | None,
    lease: tuple[str, str] = DEPLOYED_LEASE,
    context: str | None = None,
    client: KubeClient | None = None,
) -> str | None:
    """The identity of a KubeChain watcher already leading in the kubeconfig's cluster (deploy/), if any:
    ``kubechain up`` must not start a second KubeChain that would race it for every resource. See
    :func:`held_lease`."""
    held = held_lease(kubeconfig, lease, context, client)
    return held.holder if held is not None else None


def held_lease(
    kubeconfig: str | None,
    lease: tuple[str, str] = DEPLOYED_LEASE,
    context: str | None = None,
    client: KubeClient | None = None,
) -> HeldLease | None:
    """The watcher leading under ``lease`` in the kubeconfig's cluster, if it renewed the Lease within
    the Lease's own duration (default: the settings' lease_duration_s, as the watcher's). ``context``:
    that kube context rather than the current one; ``client``: one to ask with (a caller checking again
    and again keeps one, rather than loading the kubeconfig, exec plugin and all, each time)."""
    from kubechain.settings import Settings

    own = client is None
    kube = client if client is not None else KubeClient(load_connection(kubeconfig, context), timeout_s=5)
    try:
        spec = kube.get_lease(*lease).get("spec") or {}
    except KubeAPIError:
        return None  # no such Lease (or not ours to read): nothing known to be running
    finally:
        if own:
            kube.close()
    default_s = float(Settings.model_fields["lease_duration_s"].default)
    holder = lease_holder(spec, datetime.now(UTC), default_s)
    if holder is None:
        return None
    return HeldLease(holder, lease, float(spec.get("leaseDurationSeconds") or default_s))
