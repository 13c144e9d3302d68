"""scripts/lib/venv.sh: which virtualenvs bootstrap.sh starts over instead of failing inside pip later."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def venv_problem(venv: Path, checkout: Path = ROOT) -> str | None:
    """What venv_problem says about ``venv`` (None: nothing wrong)."""
    done = subprocess.run(
        ["bash", "-c", '. "$0" && venv_problem "$1" "$2"', ROOT / "scripts/lib/venv.sh", venv, checkout],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stderr == ""
    return done.stdout.strip() if done.returncode == 0 else None


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    return path


def site_packages(venv: Path) -> Path:
    relative = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    return venv / relative


def test_a_fresh_venv_and_none_at_all_are_fine(tmp_path: Path) -> None:
    assert venv_problem(tmp_path / "absent") is None
    assert venv_problem(make_venv(tmp_path / "venv")) is None


def test_a_venv_whose_interpreter_is_gone_is_started_over(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "venv")
    for python in (venv / "bin").glob("python*"):
        python.unlink()
    (venv / "bin" / "python").symlink_to(tmp_path / "removed-python3.11")
    assert (
        venv_problem(venv)
        == "its python does not run (the interpreter it was made with was removed or moved)"
    )


@pytest.mark.parametrize(
    ("version", "too_old"), [("3.9", True), ("3.10", True), ("3.11", False), ("4.0", False)]
)
def test_a_venv_made_by_a_too_old_python_is_started_over(tmp_path: Path, version: str, too_old: bool) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    # answers the version question only (no KubeChain installed in it)
    python.write_text(f'#!/bin/sh\ncase "$*" in *version_info*) echo {version} ;; *) exit 1 ;; esac\n')
    python.chmod(0o755)
    said = venv_problem(venv)
    if too_old:
        assert said == f"it was made with Python {version}; KubeChain needs Python >= 3.11"
    else:
        assert said is None


def test_a_venv_moved_from_elsewhere_is_started_over(tmp_path: Path) -> None:
    made = make_venv(tmp_path / "old-checkout" / ".venv")
    pip = made / "bin" / "pip"
    pip.write_text(f"#!{made}/bin/python3\nimport sys\n")  # what pip's launcher looks like
    pip.chmod(0o755)
    moved = tmp_path / "new-checkout" / ".venv"
    moved.parent.mkdir()
    made.rename(moved)
    assert venv_problem(moved) == f"it was made at {made} and moved (its scripts still run that path)"
    pip.parent.mkdir(parents=True)  # a venv made there again: this one is still not it
    assert venv_problem(moved) == f"it was made at {made} and moved (its scripts still run that path)"


def test_a_venv_running_another_checkouts_kubechain_is_started_over(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "venv")
    other = tmp_path / "other-checkout"
    (other / "kubechain").mkdir(parents=True)
    (other / "kubechain" / "__init__.py").write_text("")
    (site_packages(venv) / "kubechain-editable.pth").write_text(f"{other}\n")  # an editable install
    assert venv_problem(venv) == f"it runs KubeChain from {other}, not from this checkout"
    assert venv_problem(venv, checkout=other) is None
