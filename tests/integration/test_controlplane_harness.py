"""The real local control plane (etcd + kube-apiserver + kube-controller-manager) and Redis harness."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubechain.testing import K8S_VERSION, LocalControlPlane, LocalRedis

pytestmark = pytest.mark.integration

GROUP = "harness.kubechain.dev"
CRD_YAML = f"""\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.{GROUP}
spec:
  group: {GROUP}
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      subresources: {{status: {{}}}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
            status: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
"""


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cp() -> Iterator[LocalControlPlane]:
    with LocalControlPlane() as plane:
        yield plane


@pytest.fixture(scope="module")
def api(cp: LocalControlPlane) -> Iterator[client.ApiClient]:
    with cp.api_client() as api_client:
        yield api_client


@pytest.fixture(scope="module")
def widget_crd(cp: LocalControlPlane, tmp_path_factory: pytest.TempPathFactory) -> str:
    crd_dir = tmp_path_factory.mktemp("crds")
    (crd_dir / "widget.yaml").write_text(CRD_YAML)
    assert cp.install_crds(crd_dir) == [f"widgets.{GROUP}"]
    assert cp.install_crds(crd_dir, timeout=30) == [f"widgets.{GROUP}"]  # idempotent (replace path)
    return f"widgets.{GROUP}"


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    name = f"harness-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    client.CoreV1Api(api).delete_namespace(name)


def test_version_and_kubeconfig(cp: LocalControlPlane, api: client.ApiClient) -> None:
    status, body = cp.request("/version")
    assert status == 200
    assert json.loads(body)["gitVersion"] == K8S_VERSION
    assert client.VersionApi(api).get_code().git_version == K8S_VERSION
    assert cp.kubeconfig_path.is_file()
    assert "kubechain-local" in cp.kubeconfig_path.read_text()
    assert cp.server_url.startswith("https://127.0.0.1:")


def test_namespace_and_configmap(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cm"), data={"k": "v"})
    )
    assert core.read_namespaced_config_map("cm", namespace).data == {"k": "v"}


def test_crd_status_subresource_conflict(api: client.ApiClient, namespace: str, widget_crd: str) -> None:
    objs: Any = client.CustomObjectsApi(api)  # returns plain dicts
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 1},
    }
    created = objs.create_namespaced_custom_object(GROUP, "v1alpha1", namespace, "widgets", body)
    stale_rv = created["metadata"]["resourceVersion"]

    created["status"] = {"phase": "Ready"}
    updated = objs.replace_namespaced_custom_object_status(
        GROUP, "v1alpha1", namespace, "widgets", "w1", created
    )
    assert updated["status"] == {"phase": "Ready"}
    assert updated["metadata"]["resourceVersion"] != stale_rv

    stale = dict(updated, status={"phase": "Failed"})
    stale["metadata"] = dict(updated["metadata"], resourceVersion=stale_rv)
    with pytest.raises(ApiException) as err:
        objs.replace_namespaced_custom_object_status(GROUP, "v1alpha1", namespace, "widgets", "w1", stale)
    assert err.value.status == 409
    current = objs.get_namespaced_custom_object(GROUP, "v1alpha1", namespace, "widgets", "w1")
    assert current["status"] == {"phase": "Ready"}


def test_garbage_collection_of_orphans(
    cp: LocalControlPlane, api: client.ApiClient, namespace: str, widget_crd: str
) -> None:
    if not cp.has_controller_manager:
        pytest.skip("kube-controller-manager binary not available: no garbage collector")
    core = client.CoreV1Api(api)
    objs: Any = client.CustomObjectsApi(api)
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    assert owner.metadata is not None
    widget = objs.create_namespaced_custom_object(
        GROUP,
        "v1alpha1",
        namespace,
        "widgets",
        {"apiVersion": f"{GROUP}/v1alpha1", "kind": "Widget", "metadata": {"name": "owner"}},
    )
    refs = {
        "dep-of-cm": client.V1OwnerReference(
            api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
        ),
        "dep-of-cr": client.V1OwnerReference(
            api_version=f"{GROUP}/v1alpha1", kind="Widget", name="owner", uid=widget["metadata"]["uid"]
        ),
    }
    for name, ref in refs.items():
        core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, owner_references=[ref]))
        )
    core.delete_namespaced_config_map("owner", namespace)
    objs.delete_namespaced_custom_object(GROUP, "v1alpha1", namespace, "widgets", "owner")

    def dependents_gone() -> bool:
        names = {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items if cm.metadata}
        return not names & set(refs)

    wait_for(dependents_gone, timeout=60, what="the garbage collector to delete the orphaned ConfigMaps")


def test_redis_ping_and_restart() -> None:
    with LocalRedis() as server:
        assert server.managed, "the harness runs its own Redis, whatever REDIS_URL says"
        assert server.url.startswith("redis://127.0.0.1:")
        r = redis.Redis.from_url(server.url)
        try:
            assert r.ping()
            r.set("kept", "1")
            server.restart(flush=False)
            assert r.get("kept") == b"1"
            server.restart(flush=True)
            assert r.ping()
            assert r.get("kept") is None
        finally:
            r.close()


def test_apiserver_restart_keeps_data(cp: LocalControlPlane, api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="survivor"))
    )
    url = cp.server_url
    cp.stop_apiserver()
    assert not cp.apiserver_running()
    with pytest.raises(OSError):
        cp.request("/readyz", timeout=1.0)
    cp.start_apiserver()
    assert cp.server_url == url
    assert core.read_namespaced_config_map("survivor", namespace).data is None
