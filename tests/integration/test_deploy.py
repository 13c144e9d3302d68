"""The in-cluster installation (deploy/) against the real local kube-apiserver.

* deploy/release/kubechain.yaml is exactly `kubectl kustomize deploy` (below its header comment);
* the API server accepts every object of it (server-side dry run: schema, defaulting, admission
  including Pod Security "restricted" warnings for the workloads);
* the RBAC grants the processes what they need and nothing they must not have (`kubectl auth can-i` as
  the ServiceAccounts, with the RBAC objects created for real and deleted afterwards).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import kubectl_binary

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RELEASE = DEPLOY / "release" / "kubechain.yaml"
NAMESPACE = "kubechain-system"
GROUP = "kubechain.humanlayer.dev"
WORKER = f"system:serviceaccount:{NAMESPACE}:kubechain-worker"
WATCHER = f"system:serviceaccount:{NAMESPACE}:kubechain-watcher"
APPROVER_USER = "kubechain-test-approver"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def strip_header(text: str) -> str:
    """The release file without its leading comment lines (the header scripts/render-release adds)."""
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


def release_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RELEASE.read_text()) if d]


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


# ------------------------------------------------------------------------------------------ rendering


def test_release_file_is_the_kustomize_build() -> None:
    built = subprocess.run(
        [kubectl_binary(), "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    assert strip_header(RELEASE.read_text()) == built.stdout, (
        "deploy/release/kubechain.yaml is stale: run scripts/render-release"
    )


def test_base_and_keda_build_on_their_own() -> None:
    for path in (DEPLOY / "base", DEPLOY / "keda"):
        built = subprocess.run(
            [kubectl_binary(), "kustomize", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert built.returncode == 0, f"{path}: {built.stderr}"
        kinds = [d["kind"] for d in yaml.safe_load_all(built.stdout) if d]
        assert "CustomResourceDefinition" not in kinds  # CRDs come from deploy/kustomization.yaml only
        assert kinds, path


# ------------------------------------------------------------------------------------------ the cluster


@pytest.fixture(scope="module")
def system_namespace(kubectl: Kubectl) -> Iterator[str]:
    """kubechain-system, created for real from the release's Namespace (a server-side dry run of objects
    in a namespace that does not exist yet is rejected), deleted afterwards if this module created it."""
    existed = kubectl("get", "namespace", NAMESPACE, check=False).returncode == 0
    if not existed:
        namespace_doc = [d for d in release_docs() if d["kind"] == "Namespace"]
        assert len(namespace_doc) == 1
        kubectl("apply", "-f", "-", input=dump(namespace_doc))
    yield NAMESPACE
    if not existed:
        kubectl("delete", "namespace", NAMESPACE, "--wait=false", "--ignore-not-found", check=False)


def test_release_applies_with_server_side_dry_run(kubectl: Kubectl, system_namespace: str) -> None:
    result = kubectl("apply", "--dry-run=server", "-f", str(RELEASE), check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    applied = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(applied) == len(release_docs()), result.stdout
    assert all(line.endswith("(server dry run)") for line in applied), result.stdout
    # the namespace enforces (and warns for) Pod Security "restricted": no workload may violate it
    assert "PodSecurity" not in result.stderr, result.stderr


def can_i(
    kubectl: Kubectl, who: str, verb: str, resource: str, *extra: str, namespace: str = "default"
) -> bool:
    result = kubectl("auth", "can-i", verb, resource, f"--as={who}", *extra, namespace=namespace, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i: {result.stdout}\n{result.stderr}"
    return answer == "yes"


@pytest.fixture(scope="module")
def rbac(kubectl: Kubectl, system_namespace: str) -> Iterator[None]:
    """The release's ServiceAccounts, (Cluster)Roles and bindings, created for real, plus a binding of
    kubechain-approver to a test user; all deleted afterwards."""
    docs = [d for d in release_docs() if d["kind"] in RBAC_KINDS]
    docs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kubechain-test-approver"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "kubechain-approver",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": APPROVER_USER}],
        }
    )
    manifest = dump(docs)
    kubectl("apply", "-f", "-", input=manifest)
    try:
        yield
    finally:
        kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", input=manifest, check=False)


@pytest.mark.parametrize(
    ("verb", "resource", "extra", "allowed"),
    [
        ("patch", f"taskruns.{GROUP}", ("--subresource=status",), True),
        ("update", f"taskruns.{GROUP}", ("--subresource=status",), True),  # a transition's PUT
        ("update", f"taskruntoolcalls.{GROUP}", ("--subresource=status",), True),
        ("update", f"agents.{GROUP}", ("--subresource=status",), True),
        ("patch", f"taskruntoolcalls.{GROUP}", ("--subresource=status",), True),
        ("patch", f"llms.{GROUP}", ("--subresource=status",), True),
        ("get", f"agents.{GROUP}", (), True),
        ("list", f"taskruns.{GROUP}", (), True),
        ("create", f"taskruns.{GROUP}", (), True),
        ("create", f"taskruntoolcalls.{GROUP}", (), True),
        ("create", "events", (), True),
        ("get", "secrets", (), True),
        # nothing the workers do: watching (the watcher's job), reading /status alone, patching Events
        ("watch", f"agents.{GROUP}", (), False),
        ("get", f"taskruns.{GROUP}", ("--subresource=status",), False),
        ("patch", "events", (), False),
        # a sub-agent's run nothing will read any more (and nothing else) may be deleted
        ("delete", f"taskruns.{GROUP}", (), True),
        # never: other deletes, spec writes, Secret enumeration, other kinds' creation
        ("delete", f"taskruntoolcalls.{GROUP}", (), False),
        ("delete", f"agents.{GROUP}", (), False),
        ("deletecollection", f"taskruns.{GROUP}", (), False),
        ("update", f"taskruns.{GROUP}", (), False),
        ("patch", f"taskruns.{GROUP}", (), False),
        ("create", f"agents.{GROUP}", (), False),
        ("list", "secrets", (), False),
        ("watch", "secrets", (), False),
        ("create", "pods", (), False),
    ],
)
def test_worker_rbac(
    kubectl: Kubectl, rbac: None, verb: str, resource: str, extra: tuple[str, ...], allowed: bool
) -> None:
    assert can_i(kubectl, WORKER, verb, resource, *extra) is allowed


@pytest.mark.parametrize(
    ("owner_kind", "allowed"),
    [("Task", True), ("TaskRun", True), ("TaskRunToolCall", True), ("LLM", False)],
)
def test_worker_may_create_children_that_block_their_owners_deletion(
    kubectl: Kubectl, rbac: None, namespace: str, owner_kind: str, allowed: bool
) -> None:
    """The API server runs OwnerReferencesPermissionEnforcement (tests/conftest.py), as OpenShift and
    hardened clusters do: a child with blockOwnerDeletion needs `update` on its owner's finalizers. The
    worker creates TaskRuns owned by a Task, a TaskRun (its tool calls are created the same way) and a
    TaskRunToolCall; an LLM owns nothing, and shows the plugin is on."""
    child = {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "TaskRun",
        "metadata": {
            "name": "owned",
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/v1alpha1",
                    "kind": owner_kind,
                    "name": "owner",
                    "uid": "00000000-0000-0000-0000-000000000001",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {"agentRef": {"name": "agent"}, "userMessage": "hi"},
    }
    result = kubectl(
        "create", "--dry-run=server", f"--as={WORKER}", "-f", "-", input=dump([child]), namespace=namespace,
        check=False,
    )  # fmt: skip
    if allowed:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0 and "cannot set blockOwnerDeletion" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("verb", "resource", "extra", "namespace", "allowed"),
    [
        ("list", f"taskruns.{GROUP}", (), "default", True),
        ("watch", f"mcpservers.{GROUP}", (), "default", True),
        ("get", f"contactchannels.{GROUP}", (), "default", True),
        ("create", "leases.coordination.k8s.io", (), NAMESPACE, True),
        ("get", "leases.coordination.k8s.io/kubechain-watcher", (), NAMESPACE, True),
        ("update", "leases.coordination.k8s.io/kubechain-watcher", (), NAMESPACE, True),
        # the watcher only reads: no status writes, no creation, no Secrets, no other Leases
        ("patch", f"taskruns.{GROUP}", ("--subresource=status",), "default", False),
        ("create", f"taskruns.{GROUP}", (), "default", False),
        ("get", "secrets", (), "default", False),
        ("update", "leases.coordination.k8s.io/someone-else", (), NAMESPACE, False),
        ("create", "leases.coordination.k8s.io", (), "default", False),
    ],
)
def test_watcher_rbac(
    kubectl: Kubectl,
    rbac: None,
    verb: str,
    resource: str,
    extra: tuple[str, ...],
    namespace: str,
    allowed: bool,
) -> None:
    assert can_i(kubectl, WATCHER, verb, resource, *extra, namespace=namespace) is allowed


@pytest.mark.parametrize(
    ("verb", "resource", "extra", "allowed"),
    [
        ("patch", f"taskruntoolcalls.{GROUP}", (), True),
        ("get", f"taskruntoolcalls.{GROUP}", (), True),
        ("patch", f"taskruntoolcalls.{GROUP}", ("--subresource=status",), False),
        ("delete", f"taskruntoolcalls.{GROUP}", (), False),
        ("patch", f"taskruns.{GROUP}", (), False),
        ("get", "secrets", (), False),
    ],
)
def test_approver_rbac(
    kubectl: Kubectl, rbac: None, verb: str, resource: str, extra: tuple[str, ...], allowed: bool
) -> None:
    assert can_i(kubectl, APPROVER_USER, verb, resource, *extra) is allowed


def test_the_wheel_carries_the_release_manifest(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("kubechain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "kubechain/manifests/kubechain.yaml" in archive.namelist()
