"""A real, local Kubernetes control plane: etcd + kube-apiserver (+ kube-controller-manager).

Modelled on controller-runtime's envtest, but driven from Python::

    with LocalControlPlane() as cp:
        api = cp.api_client()
        ...

All processes listen on free loopback ports, keep their data and logs under ``workdir`` and run in their
own process group; they are stopped by :meth:`LocalControlPlane.stop`, by an ``atexit`` hook, and (on
Linux) by ``PR_SET_PDEATHSIG`` if the Python process dies abruptly, even by SIGKILL.
"""

from __future__ import annotations

import atexit
import base64
import concurrent.futures
import contextlib
import ctypes
import datetime as dt
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from kubechain.testing.binaries import ControlPlaneBinaries, Progress, default_progress, ensure_binaries

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

logger = logging.getLogger(__name__)

CLUSTER_NAME = "kubechain-local"
ADMIN_USER = "kubechain-admin"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KCM_CONTROLLERS = "garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller"


class ControlPlaneError(RuntimeError):
    """A control-plane component failed to start or become ready."""


# --------------------------------------------------------------------------- process helpers


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct currently-free TCP ports on 127.0.0.1."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


PR_SET_PDEATHSIG = 1
T = TypeVar("T")


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def pdeathsig_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux only, else None) that makes the kernel send the child ``sig`` when its parent
    dies, however it dies (SIGKILL included).

    prctl is looked up here, in the parent, so that the child runs no dlopen between fork and exec. If the
    parent died before the prctl took effect, the child has already been re-parented and would never get
    the signal: it exits at once instead. The kernel sends the signal when the *thread* that forked the
    child ends, so fork only from a thread that lives as long as the process: see :func:`spawn`.
    """
    prctl = _libc_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class _Spawner:
    """One daemon thread that forks children for the threads that are not the main thread.

    PR_SET_PDEATHSIG fires when the thread that forked a child ends, not when its process does: a child
    forked by a thread that stops (``kubechain up``'s supervisor restarting a worker, a test's helper
    thread) would be sent SIGTERM then, or, without PDEATHSIG, would outlive a supervisor killed by
    SIGKILL. The main thread and this thread end only with the process.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fork: Callable[[], T]) -> T:
        if threading.current_thread() is threading.main_thread():
            return fork()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # not yet, or in a forked child
                self._thread = threading.Thread(target=self._loop, name="kubechain-spawner", daemon=True)
                self._thread.start()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._requests.put((fork, done))
        return done.result()

    def _loop(self) -> None:
        while True:
            fork, done = self._requests.get()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(fork())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                done.set_exception(exc)


_spawner = _Spawner()


def spawn(fork: Callable[[], T]) -> T:
    """Run ``fork`` (a ``subprocess.Popen(...)``) on a thread that lives as long as the process: the
    calling thread if it is the main thread, else the spawner thread. See :class:`_Spawner`."""
    return _spawner.run(fork)


def tail_file(path: Path, lines: int = 30, since: int = 0) -> str:
    """The last ``lines`` lines of ``path``, from byte ``since`` on (what one run of a process wrote)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(since, fh.tell() - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(data.splitlines()[-lines:])


class ManagedProcess:
    """A child process in its own process group with stdout+stderr appended to a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.monotonic() of the last start
        self._log_offset = 0  # where the last start's output begins in the log (appended to across runs)

    def start(self) -> None:
        """Start the process; on Linux it dies (SIGTERM) with this Python process, even killed by SIGKILL."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting %s: %s", self.name, " ".join(self.argv))
        preexec = pdeathsig_preexec()
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {dt.datetime.now().isoformat()} starting: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.proc = spawn(
                lambda: subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=preexec,  # noqa: PLW1509 - only a prctl looked up before the fork
                    env=self.env,
                )
            )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.info(
                    "%s (pid %d) still running %.0fs after SIGTERM; killing", self.name, proc.pid, timeout
                )
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=timeout)
        # reap anything else left in the group (the group id is the child's pid)
        self._signal_group(proc, signal.SIGKILL)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def tail(self, lines: int = 30) -> str:
        """The last lines of the last start's output (not an earlier run's, which the log also holds)."""
        return tail_file(self.log_path, lines, since=self._log_offset)


_live: weakref.WeakSet[Any] = weakref.WeakSet()


def _register_for_exit(obj: Any) -> None:
    _live.add(obj)


def _unregister_for_exit(obj: Any) -> None:
    _live.discard(obj)


@atexit.register
def _stop_all_at_exit() -> None:
    for obj in list(_live):
        with contextlib.suppress(Exception):
            obj.stop()


# --------------------------------------------------------------------------- PKI


def private_dir(path: Path) -> None:
    """``path``, made if need be, open to this user alone: what is written in it (keys, the admin token,
    the kubeconfig) is never readable by others, not even between a write and a chmod. Only for folders
    KubeChain makes for itself (a control plane's, under a stack's working folder): never a user's own."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by this user alone from its first byte (created with mode
    0600, not chmodded after the write), even in a folder others can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)  # a file that was there keeps its mode through O_CREAT
        handle.write(text)


def _write_pki(pki: Path) -> None:
    """CA, kube-apiserver serving cert (localhost/127.0.0.1) and service-account RSA key pair."""
    private_dir(pki)
    try:
        _write_pki_cryptography(pki)
    except ImportError:
        _write_pki_openssl(pki)
    for key in ("ca.key", "apiserver.key", "sa.key"):
        (pki / key).chmod(0o600)


_SANS_DNS = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
_SANS_IP = ("127.0.0.1", "10.0.0.1")


def _write_pki_cryptography(pki: Path) -> None:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def new_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def key_pem(key: rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=3650)
    ca_key = new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubechain-local-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in _SANS_DNS]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in _SANS_IP]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = new_key()
    (pki / "ca.key").write_bytes(key_pem(ca_key))
    (pki / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (pki / "apiserver.key").write_bytes(key_pem(srv_key))
    (pki / "apiserver.crt").write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    (pki / "sa.key").write_bytes(key_pem(sa_key))
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _write_pki_openssl(pki: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ControlPlaneError(
            "generating the control plane's certificates needs the Python package `cryptography` "
            "or the `openssl` command; install one of them"
        )

    def run(*args: str) -> None:
        proc = subprocess.run([openssl, *args], cwd=pki, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
        "-subj", "/CN=kubechain-local-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
        "-subj", "/CN=kube-apiserver")  # fmt: skip
    san = ",".join([*(f"DNS:{d}" for d in _SANS_DNS), *(f"IP:{i}" for i in _SANS_IP)])
    (pki / "apiserver.ext").write_text(
        f"subjectAltName={san}\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n"
    )
    run("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "apiserver.crt", "-days", "3650", "-extfile", "apiserver.ext")  # fmt: skip
    run("genrsa", "-traditional", "-out", "sa.key", "2048")
    run("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")


# --------------------------------------------------------------------------- control plane


class LocalControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on loopback, usable as a context manager."""

    def __init__(
        self,
        workdir: Path | None = None,
        binaries: ControlPlaneBinaries | None = None,
        progress: Progress | None = None,
        with_controller_manager: bool = True,
        start_timeout: float = 90.0,
        extra_apiserver_args: Iterable[str] = (),
        crd_dirs: Iterable[Path] = (),
    ) -> None:
        self._owns_workdir = workdir is None
        self._workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="kubechain-cp-"))
        )
        self._binaries = binaries
        self._progress: Callable[[str], None] = progress or default_progress
        self._with_kcm = with_controller_manager
        self._start_timeout = start_timeout
        self._extra_apiserver_args = list(extra_apiserver_args)
        self._crd_dirs = [Path(d) for d in crd_dirs]
        self._etcd: ManagedProcess | None = None
        self._apiserver: ManagedProcess | None = None
        self._kcm: ManagedProcess | None = None
        self._etcd_client_port = 0
        self._etcd_peer_port = 0
        self._apiserver_port = 0
        self._token = secrets.token_urlsafe(32)
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- properties

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def kubeconfig_path(self) -> Path:
        return self._workdir / "kubeconfig.yaml"

    @property
    def server_url(self) -> str:
        if not self._apiserver_port:
            raise ControlPlaneError("control plane not started")
        return f"https://127.0.0.1:{self._apiserver_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self._etcd_client_port}"

    @property
    def token(self) -> str:
        """Bearer token of the admin user (group system:masters)."""
        return self._token

    @property
    def ca_path(self) -> Path:
        return self._workdir / "pki" / "ca.crt"

    @property
    def binaries(self) -> ControlPlaneBinaries:
        if self._binaries is None:
            raise ControlPlaneError("control plane not started")
        return self._binaries

    @property
    def has_controller_manager(self) -> bool:
        return self._kcm is not None

    @property
    def log_paths(self) -> dict[str, Path]:
        return {name: self._workdir / "logs" / f"{name}.log" for name in ("etcd", "kube-apiserver", "kcm")}

    def env(self) -> dict[str, str]:
        """Environment variables pointing a client at this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig_path)}

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalControlPlane:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        with self._lock:
            if self._apiserver is not None:
                return
            started = time.monotonic()
            _register_for_exit(self)
            try:
                if self._binaries is None:
                    self._binaries = ensure_binaries(self._progress)
                private_dir(self._workdir)
                (self._workdir / "logs").mkdir(exist_ok=True)
                if not (self._workdir / "pki" / "sa.key").exists():
                    _write_pki(self._workdir / "pki")
                self._write_token_file()
                self._etcd_client_port, self._etcd_peer_port, self._apiserver_port = free_ports(3)
                self._write_kubeconfig()
                self._start_etcd()
                self.start_apiserver()
                for crd_dir in self._crd_dirs:  # before the controller-manager, so its GC knows them
                    self.install_crds(crd_dir, restart_controller_manager=False)
                if self._with_kcm:
                    self._start_kcm()
            except BaseException:
                self.stop()
                raise
            # its kubeconfig is logged, not said: `kubechain up` says the one to use, its own copy
            logger.info("control plane kubeconfig: %s", self.kubeconfig_path)
            self._progress(f"control plane ready at {self.server_url} in {time.monotonic() - started:.1f}s")

    def stop(self) -> None:
        with self._lock:
            for proc in (self._kcm, self._apiserver, self._etcd):
                if proc is not None:
                    try:
                        proc.stop(timeout=5.0)
                    except Exception:  # noqa: BLE001 - keep stopping the others
                        logger.exception("failed to stop %s", proc.name)
            self._kcm = self._apiserver = self._etcd = None
            _unregister_for_exit(self)
            if self._owns_workdir and self._workdir.exists():
                shutil.rmtree(self._workdir, ignore_errors=True)

    # ----------------------------------------------------------------- files

    def _write_token_file(self) -> None:
        path = self._workdir / "pki" / "tokens.csv"
        write_private(path, f'{self._token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')

    def _write_kubeconfig(self) -> None:
        ca_data = base64.b64encode(self.ca_path.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": CLUSTER_NAME,
                    "cluster": {"server": self.server_url, "certificate-authority-data": ca_data},
                }
            ],
            "users": [{"name": ADMIN_USER, "user": {"token": self._token}}],
            "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": ADMIN_USER}}],
            "current-context": CLUSTER_NAME,
            "preferences": {},
        }
        write_private(self.kubeconfig_path, yaml.safe_dump(config, sort_keys=False))

    # ----------------------------------------------------------------- etcd

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self._etcd_client_port}"
        peer = f"http://127.0.0.1:{self._etcd_peer_port}"
        argv = [
            str(self.binaries.etcd),
            "--name=kubechain",
            f"--data-dir={self._workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=kubechain={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",
            f"--quota-backend-bytes={4 * 1024**3}",
            "--log-level=warn",
        ]
        self._etcd = ManagedProcess("etcd", argv, self.log_paths["etcd"])
        t0 = time.monotonic()
        self._progress(f"starting etcd on {client}")
        self._etcd.start()
        self._wait(
            "etcd",
            lambda: self._http_ok(f"{client}/health", expect=b'"health":"true"'),
            procs=[self._etcd],
            timeout=self._start_timeout,
        )
        logger.info("etcd ready in %.1fs", time.monotonic() - t0)

    # ----------------------------------------------------------------- kube-apiserver

    def _apiserver_argv(self) -> list[str]:
        pki = self._workdir / "pki"
        return [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--secure-port={self._apiserver_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://localhost",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            "--event-ttl=1h",
            # the "kubernetes" Service endpoints cannot be a loopback address; don't reconcile them
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
            *self._extra_apiserver_args,
        ]

    def start_apiserver(self, timeout: float | None = None) -> None:
        """(Re)start kube-apiserver on the same port against the same etcd and wait for ``/readyz``."""
        with self._lock:
            if self._apiserver is not None and self._apiserver.running():
                return
            if self._etcd is None or not self._etcd.running():
                raise ControlPlaneError("etcd is not running")
            self._apiserver = ManagedProcess(
                "kube-apiserver", self._apiserver_argv(), self.log_paths["kube-apiserver"]
            )
            t0 = time.monotonic()
            self._progress(f"starting kube-apiserver on {self.server_url}")
            self._apiserver.start()
            self._wait(
                "kube-apiserver /readyz",
                self._apiserver_ready,
                procs=[self._apiserver, self._etcd],
                timeout=timeout or self._start_timeout,
            )
            self._progress(f"kube-apiserver ready in {time.monotonic() - t0:.1f}s")

    def stop_apiserver(self, timeout: float = 2.0) -> None:
        """Stop only kube-apiserver (etcd data, port and controller-manager stay) — for chaos tests.

        SIGTERM, then SIGKILL after ``timeout`` seconds: kube-apiserver's graceful shutdown waits for
        clients holding watches (controller-manager, operators), which can take long; nothing is lost by
        killing it because every write is already committed in etcd.
        """
        with self._lock:
            if self._apiserver is not None:
                self._progress("stopping kube-apiserver")
                self._apiserver.stop(timeout=timeout)
            self._apiserver = None

    def apiserver_running(self) -> bool:
        return self._apiserver is not None and self._apiserver.running()

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_path))
        return self._ssl

    def request(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET ``path`` on the apiserver as the admin user; returns (status, body)."""
        req = urllib.request.Request(
            self.server_url + path, headers={"Authorization": f"Bearer {self._token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self._ssl_context()) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    def _apiserver_ready(self) -> str | None:
        """None when ready, else a short reason."""
        try:
            status, body = self.request("/readyz?verbose", timeout=2.0)
        except (OSError, ssl.SSLError) as exc:
            return f"not answering ({exc.__class__.__name__})"
        if status == 200:
            return None
        failing = [ln.strip() for ln in body.decode("utf-8", "replace").splitlines() if "failed" in ln]
        return f"HTTP {status}: {', '.join(failing[:4]) or body[:200].decode('utf-8', 'replace')}"

    # ----------------------------------------------------------------- kube-controller-manager

    def _start_kcm(self, why: str = "") -> None:
        kcm = self.binaries.kube_controller_manager
        if kcm is None:
            logger.warning(
                "kube-controller-manager binary not available: no garbage collection of owned objects"
            )
            marker = self.binaries.kube_apiserver.parent / "kube-controller-manager.failed"
            retry = (
                f" (its build failed once: delete {marker} to build it again at the next start)"
                if marker.exists()
                else ""
            )
            self._progress(
                f"kube-controller-manager not available; owned objects will not be garbage-collected{retry}"
            )
            return
        pki = self._workdir / "pki"
        port = free_port()
        argv = [
            str(kcm),
            f"--kubeconfig={self.kubeconfig_path}",
            f"--controllers={KCM_CONTROLLERS}",
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",  # only for /healthz (an always-allowed path); self-signed in memory
            f"--cluster-name={CLUSTER_NAME}",
            "--v=1",
        ]
        self._kcm = ManagedProcess("kube-controller-manager", argv, self.log_paths["kcm"])
        t0 = time.monotonic()
        self._progress(
            f"restarting kube-controller-manager ({why})"
            if why
            else "starting kube-controller-manager (garbage collector, namespace, serviceaccount)"
        )
        self._kcm.start()
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        self._wait(
            "kube-controller-manager /healthz",
            lambda: self._http_ok(f"https://127.0.0.1:{port}/healthz", expect=b"ok", context=insecure),
            procs=[self._kcm],
            timeout=self._start_timeout,
        )
        logger.info("kube-controller-manager healthy in %.1fs", time.monotonic() - t0)

    # ----------------------------------------------------------------- waiting

    def _http_ok(self, url: str, expect: bytes, context: ssl.SSLContext | None = None) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=2.0, context=context) as resp:
                body = resp.read()
        except (OSError, urllib.error.URLError) as exc:
            return f"not answering ({exc.__class__.__name__})"
        return None if expect in body else f"unhealthy: {body[:200]!r}"

    def _wait(
        self,
        what: str,
        check: Callable[[], str | None],
        procs: Sequence[ManagedProcess | None],
        timeout: float,
    ) -> None:
        started = time.monotonic()
        deadline = started + timeout
        next_report = started + 5.0
        reason: str | None = "not checked yet"
        interval = 0.05
        while True:
            for proc in procs:
                if proc is not None and not proc.running():
                    raise ControlPlaneError(
                        f"{proc.name} exited with code {proc.returncode()} while waiting for {what}; "
                        f"last log lines ({proc.log_path}):\n{proc.tail()}"
                    )
            reason = check()
            if reason is None:
                return
            now = time.monotonic()
            if now >= deadline:
                tails = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.tail()}" for p in procs if p is not None)
                raise ControlPlaneError(
                    f"timed out after {timeout:.0f}s waiting for {what}: {reason}\n{tails}"
                )
            if now >= next_report:
                self._progress(f"waiting for {what} ({now - started:.0f}s): {reason}")
                next_report = now + 5.0
            time.sleep(interval)
            interval = min(interval * 1.5, 0.25)

    # ----------------------------------------------------------------- clients & CRDs

    def api_client(self) -> ApiClient:
        """A new ``kubernetes.client.ApiClient`` for the admin user (close it when done)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig_path), context=CLUSTER_NAME)

    def install_crds(
        self, crd_dir: Path, timeout: float = 60.0, restart_controller_manager: bool = True
    ) -> list[str]:
        """Create-or-replace every CRD in ``crd_dir/*.yaml`` (or one file) and wait until Established.

        kube-controller-manager's garbage collector only rediscovers resource types every 30 s (and
        then backs off), so objects owned by a brand-new custom resource would be collected only after
        ~40 s.  When a CRD was created or changed and ``restart_controller_manager`` is true, the
        controller-manager is restarted (~0.5 s) so that its garbage collector knows the new kinds.
        Returns the CRD names.
        """
        from kubernetes.client import ApiextensionsV1Api
        from kubernetes.client.exceptions import ApiException

        crd_dir = Path(crd_dir)
        files = (
            sorted(crd_dir.glob("*.yaml")) + sorted(crd_dir.glob("*.yml")) if crd_dir.is_dir() else [crd_dir]
        )
        docs: list[dict[str, Any]] = []
        for f in files:
            for doc in yaml.safe_load_all(f.read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    docs.append(doc)
        if not docs:
            raise ControlPlaneError(f"no CustomResourceDefinition found in {crd_dir}")
        names: list[str] = []
        changed = False
        with self.api_client() as client:
            api: Any = ApiextensionsV1Api(client)  # raw JSON (_preload_content=False) below
            for doc in docs:
                name = doc["metadata"]["name"]
                names.append(name)
                try:
                    api.create_custom_resource_definition(body=doc, _preload_content=False)
                    logger.info("created CRD %s", name)
                    changed = True
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    current = json.loads(
                        api.read_custom_resource_definition(name, _preload_content=False).data
                    )
                    body = dict(doc)
                    body["metadata"] = {
                        **doc["metadata"],
                        "resourceVersion": current["metadata"]["resourceVersion"],
                    }
                    replaced = json.loads(
                        api.replace_custom_resource_definition(name, body=body, _preload_content=False).data
                    )
                    if replaced["metadata"].get("generation") != current["metadata"].get("generation"):
                        changed = True
                    logger.info("replaced CRD %s", name)

            def pending() -> str | None:
                waiting = []
                for name in names:
                    crd = json.loads(api.read_custom_resource_definition(name, _preload_content=False).data)
                    conds = {c["type"]: c["status"] for c in crd.get("status", {}).get("conditions") or []}
                    if conds.get("Established") != "True":
                        waiting.append(name)
                return f"not established: {', '.join(waiting)}" if waiting else None

            self._wait("CRDs to be established", pending, procs=[self._apiserver], timeout=timeout)
        self._progress(f"installed {len(names)} CRD(s) from {crd_dir}")
        if changed and restart_controller_manager and self._kcm is not None:
            self.restart_controller_manager()
        return names

    def restart_controller_manager(self) -> None:
        """Restart kube-controller-manager (e.g. so its garbage collector picks up new CRDs at once)."""
        with self._lock:
            if self._kcm is not None:
                self._kcm.stop(timeout=5.0)
                self._kcm = None
            self._start_kcm("so that its garbage collector knows the new CRDs")
