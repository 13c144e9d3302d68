"""KubeClient calls whose meaning depends on the real API server's answers."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from kubechain.kube.client import METADATA_LIST, KubeClient
from kubechain.kube.errors import Conflict, Gone, NotFound
from kubechain.models import LocalObjectReference, ObjectMeta, TaskRun, TaskRunSpec
from kubechain.testing.stack import DEPLOYED_LEASE, deployed_watcher
from kubechain.testing.waiting import wait_for


def test_count_events_counts_beyond_the_one_item_it_lists(kube: KubeClient, namespace: str) -> None:
    assert kube.count_events(namespace) == 0
    for index in range(5):
        kube.create_event(
            namespace,
            {
                "metadata": {"name": f"counted-{index}"},
                "involvedObject": {"kind": "TaskRun", "name": "run", "namespace": namespace},
                "reason": "Counted",
                "message": "one of five",
                "type": "Normal",
            },
        )
    assert kube.count_events(namespace) == 5


def test_deployed_watcher_finds_a_kubechain_leading_in_the_cluster(
    kube: KubeClient, kubeconfig: Path, namespace: str
) -> None:
    """What keeps ``kubechain up`` from starting a second KubeChain in a cluster that runs one (deploy/).
    The Lease is in a namespace of this test's own (deploy/'s kubechain-system comes and goes with other
    tests)."""
    lease_at = (namespace, DEPLOYED_LEASE[1])
    assert deployed_watcher(str(kubeconfig), lease_at) is None
    renewed = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    spec = {"holderIdentity": "watcher-0", "leaseDurationSeconds": 15, "renewTime": renewed}
    lease = kube.create_lease(
        namespace, {"metadata": {"name": lease_at[1], "namespace": namespace}, "spec": spec}
    )
    assert deployed_watcher(str(kubeconfig), lease_at) == "watcher-0"
    lease["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"
    kube.replace_lease(namespace, lease_at[1], lease)
    assert deployed_watcher(str(kubeconfig), lease_at) is None, "a lease its holder stopped renewing"


def test_a_delete_with_a_resource_version_removes_only_the_object_in_that_state(
    kube: KubeClient, namespace: str
) -> None:
    run = kube.create(
        TaskRun(
            metadata=ObjectMeta(name="doomed", namespace=namespace),
            spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="hi"),
        )
    )
    moved = kube.patch_status(run, {"phase": "Pending"})
    with pytest.raises(Conflict):
        kube.delete(TaskRun.PLURAL, namespace, run.name, resource_version=run.resource_version)
    assert kube.get_raw(TaskRun.PLURAL, namespace, run.name)["metadata"]["uid"] == run.uid
    kube.delete(TaskRun.PLURAL, namespace, run.name, resource_version=moved.resource_version)
    with pytest.raises(NotFound):
        kube.get_raw(TaskRun.PLURAL, namespace, run.name)


def test_a_status_write_that_loses_to_another_writer_is_counted_as_a_conflict_of_its_kind(
    kube: KubeClient, namespace: str
) -> None:
    """kubechain_status_write_conflicts_total: the API server's 409 to a status write made from a stale
    resourceVersion, both ways a status is written (a PUT of the whole status, a merge patch); a 409
    to a write that is not a status write is not one."""

    def conflicts(kind: str) -> float:
        return REGISTRY.get_sample_value("kubechain_status_write_conflicts_total", {"kind": kind}) or 0.0

    run = kube.create(
        TaskRun(
            metadata=ObjectMeta(name="contested", namespace=namespace),
            spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="hi"),
        )
    )
    moved = kube.patch_status(run, {"phase": "Pending"})  # another writer, first
    before, other_kind = conflicts(TaskRun.PLURAL), conflicts("toolcalls")

    with pytest.raises(Conflict):
        kube.patch_status(run, {"phase": "Failed"})
    assert conflicts(TaskRun.PLURAL) == before + 1
    with pytest.raises(Conflict):
        kube.patch_status_raw(TaskRun.PLURAL, namespace, run.name, run.resource_version, {"phase": "Failed"})
    assert conflicts(TaskRun.PLURAL) == before + 2

    with pytest.raises(Conflict):
        kube.delete(TaskRun.PLURAL, namespace, run.name, resource_version=run.resource_version)
    assert conflicts(TaskRun.PLURAL) == before + 2
    assert conflicts("toolcalls") == other_kind
    assert kube.get(TaskRun, namespace, run.name).phase == "Pending"
    assert kube.get(TaskRun, namespace, run.name).resource_version == moved.resource_version


def test_a_list_in_pages_is_one_snapshot_of_every_object(kube: KubeClient, namespace: str) -> None:
    for index in range(7):
        kube.create(
            TaskRun(
                metadata=ObjectMeta(name=f"paged-{index}", namespace=namespace),
                spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="hi"),
            )
        )
    pages = list(kube.list_pages(TaskRun.PLURAL, namespace, page_size=3))
    assert [len(items) for items, _ in pages] == [3, 3, 1]
    names = [item["metadata"]["name"] for items, _ in pages for item in items]
    assert sorted(names) == [f"paged-{i}" for i in range(7)]
    versions = {version for _, version in pages}
    assert len(versions) == 1 and versions != {""}  # every page is of the first page's snapshot


def test_a_list_from_the_watch_cache_is_one_answer_a_watch_can_resume_from(
    kube: KubeClient, namespace: str
) -> None:
    for index in range(7):
        kube.create(
            TaskRun(
                metadata=ObjectMeta(name=f"cached-{index}", namespace=namespace),
                spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="hi"),
            )
        )
    newest = kube.get_raw(TaskRun.PLURAL, namespace, "cached-6")["metadata"]["resourceVersion"]
    pages: list[tuple[list[dict[str, Any]], str]] = []

    def everything_listed() -> bool:  # the watch cache may be a moment behind the last create
        pages[:] = kube.list_pages(TaskRun.PLURAL, namespace, page_size=3, from_watch_cache=True)
        return len(pages[0][0]) == 7

    wait_for(everything_listed, timeout_s=10, what="the watch cache to hold every run")
    assert len(pages) == 1, "unpaged, whatever the page size"
    (items, version) = pages[0]
    assert int(version) >= int(newest)
    kube.patch_status(kube.get(TaskRun, namespace, "cached-3"), {"phase": "Pending"})
    events = kube.watch_raw(TaskRun.PLURAL, namespace, version, 10)
    first = next(e for e in events if e["type"] != "BOOKMARK")
    assert (first["type"], first["object"]["metadata"]["name"]) == ("MODIFIED", "cached-3")


def test_count_raw_counts_a_label_selector_s_objects_up_to_a_limit_from_their_metadata(
    kube: KubeClient, namespace: str
) -> None:
    for index in range(5):
        kube.create(
            TaskRun(
                metadata=ObjectMeta(
                    name=f"counted-{index}", namespace=namespace, labels={"tree": "a" if index < 4 else "b"}
                ),
                spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="hi"),
            )
        )
    assert kube.count_raw(TaskRun.PLURAL, namespace, "tree=a", 10) == 4
    assert kube.count_raw(TaskRun.PLURAL, namespace, "tree=a", 3) == 3
    assert kube.count_raw(TaskRun.PLURAL, namespace, "tree=c", 3) == 0
    # what the API server sends for that count is the objects' metadata, not their specs
    listed = kube.request(
        "GET",
        f"/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/{namespace}/taskruns",
        params={"labelSelector": "tree=b"},
        accept=METADATA_LIST,
    )
    assert listed["kind"] == "PartialObjectMetadataList"
    assert [item["metadata"]["name"] for item in listed["items"]] == ["counted-4"]
    assert "spec" not in listed["items"][0]


def test_a_read_no_older_than_a_version_is_that_version_or_newer(kube: KubeClient, namespace: str) -> None:
    """What a worker's first read asks for: the version the watcher saw, or newer (the watch cache may
    answer); a later version than the server has seen is refused as Gone, which the worker reads past."""
    run = kube.create(
        TaskRun(
            metadata=ObjectMeta(name="cached", namespace=namespace),
            spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="hi"),
        )
    )
    moved = kube.patch_status(run, {"phase": "Pending"})
    for seen in (run.resource_version, moved.resource_version):
        got = kube.get(TaskRun, namespace, run.name, not_older_than=seen)
        assert int(got.resource_version) >= int(seen) and got.uid == run.uid
    assert kube.get(TaskRun, namespace, run.name, not_older_than=moved.resource_version).phase == "Pending"
    with pytest.raises(Gone):  # after the API server's few seconds of waiting for its cache to get there
        kube.get(TaskRun, namespace, run.name, not_older_than=str(int(moved.resource_version) + 10**9))


def _kubeconfig_with_proxy(kubeconfig: Path, proxy_url: str, tmp_path: Path) -> str:
    import yaml

    config = yaml.safe_load(kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["proxy-url"] = proxy_url
    path = tmp_path / "kubeconfig-with-proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_kubeconfig_proxy_url_carries_every_request_to_the_api_server(
    kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubechain.kube.connection import load_connection
    from tests.unit.proxy_stub import ConnectProxy

    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with ConnectProxy() as proxy:
        connection = load_connection(_kubeconfig_with_proxy(kubeconfig, proxy.url, tmp_path))
        kube = KubeClient(connection)
        try:
            names = [ns["metadata"]["name"] for ns in kube.request("GET", "/api/v1/namespaces")["items"]]
        finally:
            kube.close()
    assert "default" in names  # TLS to the API server, inside the tunnel, checked as without a proxy
    server = connection.host.removeprefix("https://")
    assert proxy.targets == [server]


def test_https_proxy_from_the_environment_leaves_a_server_on_this_machine_direct(
    kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As kubectl (Go's ProxyFromEnvironment): a proxy set for the machine's egress is not used for a
    loopback API server, which it could not reach."""
    from kubechain.kube.connection import load_connection
    from tests.unit.proxy_stub import ConnectProxy

    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        kube = KubeClient(load_connection(str(kubeconfig)))
        try:
            assert kube.request("GET", "/api/v1/namespaces/default")["metadata"]["name"] == "default"
        finally:
            kube.close()
    assert proxy.targets == []


EXEC_PLUGIN = """
import json, pathlib, sys
folder = pathlib.Path(sys.argv[1])
status = {"clientCertificateData": (folder / "tls.crt").read_text(), "clientKeyData": (folder / "tls.key").read_text()}
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": status}))
"""


def _client_certificate(issuer: tuple[bytes, bytes] | None) -> tuple[str, str]:
    """A client certificate for an admin (group system:masters), signed by ``issuer`` (CA cert and key,
    PEM), or by a CA of its own (one the API server does not trust) when None."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
            x509.NameAttribute(NameOID.COMMON_NAME, "exec-plugin-user"),
        ]
    )
    if issuer is None:
        issuer_name, signing_key = subject, key
    else:
        ca_cert = x509.load_pem_x509_certificate(issuer[0])
        issuer_name = ca_cert.subject
        signing_key = serialization.load_pem_private_key(issuer[1], password=None)  # type: ignore[assignment]
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signing_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def test_a_new_client_certificate_from_an_exec_plugin_is_used_after_a_401(
    control_plane: object, kubeconfig: Path, tmp_path: Path
) -> None:
    """An exec plugin's certificate expires (Teleport, some cloud logins): the API server answers 401, the
    credentials are loaded again, and the plugin's new certificate is the one the next connection shows."""
    import sys

    import yaml

    from kubechain.kube.connection import load_connection
    from kubechain.kube.errors import Unauthorized

    pki = Path(control_plane.ca_path).parent  # type: ignore[attr-defined]
    issuer = ((pki / "ca.crt").read_bytes(), (pki / "ca.key").read_bytes())
    folder = tmp_path / "credentials"
    folder.mkdir()
    (tmp_path / "plugin.py").write_text(EXEC_PLUGIN)

    def plugin_answers(certificate: tuple[str, str]) -> None:
        (folder / "tls.crt").write_text(certificate[0])
        (folder / "tls.key").write_text(certificate[1])

    config = yaml.safe_load(kubeconfig.read_text())
    config["users"] = [
        {
            "name": "exec-user",
            "user": {
                "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1beta1",
                    "command": sys.executable,
                    "args": [str(tmp_path / "plugin.py"), str(folder)],
                    "interactiveMode": "Never",
                }
            },
        }
    ]
    config["contexts"][0]["context"]["user"] = "exec-user"
    path = tmp_path / "kubeconfig-exec.yaml"
    path.write_text(yaml.safe_dump(config))

    plugin_answers(_client_certificate(None))  # what the plugin gave at start: no longer accepted
    kube = KubeClient(load_connection(str(path)))
    try:
        plugin_answers(_client_certificate(issuer))  # a fresh one, as after the plugin's own renewal
        with pytest.raises(Unauthorized):
            kube.request("GET", "/api/v1/namespaces/default")
        assert kube.request("GET", "/api/v1/namespaces/default")["metadata"]["name"] == "default"
    finally:
        kube.close()


def test_a_proxy_urls_user_and_password_are_sent_to_the_proxy(
    kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubechain.kube.connection import load_connection
    from tests.unit.proxy_stub import ConnectProxy

    with ConnectProxy(credentials="kube user:p@ss") as proxy:
        with_password = proxy.url.replace("http://", "http://kube%20user:p%40ss@")
        kube = KubeClient(load_connection(_kubeconfig_with_proxy(kubeconfig, with_password, tmp_path)))
        try:
            assert kube.request("GET", "/api/v1/namespaces/default")["metadata"]["name"] == "default"
        finally:
            kube.close()
    assert len(proxy.targets) == 1 and proxy.refused == 0


def test_a_missing_kind_and_a_missing_object_are_told_apart(kube: KubeClient, namespace: str) -> None:
    """The CLI says "CRDs not installed" for the first, "not found" for the second."""
    with pytest.raises(NotFound) as missing_object:
        kube.get_raw(TaskRun.PLURAL, namespace, "no-such-run")
    assert not missing_object.value.kind_unknown
    with pytest.raises(NotFound) as missing_kind:
        kube.get_raw("nosuchkinds", namespace, "x")
    assert missing_kind.value.kind_unknown


def test_a_context_window_the_limit_lets_through_is_one_etcd_stores(kube: KubeClient, namespace: str) -> None:
    """kube-apiserver stores a custom resource as Go's JSON writes it, "<", ">" and "&" in 6 bytes each.
    Ten HTML tool results of 60 KiB passed the 1 MiB limit as Python measures them (~630 KB) and the API
    server refused the write (etcd: "request is too large", 1.7 MB as stored). Measured as stored, the
    limit refuses them, and as many results as it lets through are stored."""
    from kubechain.kube.errors import TooLarge
    from kubechain.models import Message
    from kubechain.statemachines.taskrun import LoopLimits, _too_large, _wire_window

    row = "<tr><td>12</td><td>34</td><td>a&amp;b</td></tr>\n"
    table = row * (60 * 1024 // len(row))

    def window(results: int) -> list[Message]:
        messages = [Message(role="system", content="s"), Message(role="user", content="scrape the tables")]
        for i in range(results):
            call = {"id": f"c{i}", "function": {"name": "fetch", "arguments": "{}"}}
            messages.append(Message(role="assistant", content="", tool_calls=[call]))
            messages.append(Message(role="tool", content=table, tool_call_id=f"c{i}"))
        return messages

    run = kube.create(
        TaskRun(
            metadata=ObjectMeta(name="html", namespace=namespace),
            spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="scrape the tables"),
        )
    )
    assert _too_large(run, window(10), LoopLimits()) is not None
    with pytest.raises(TooLarge):
        kube.patch_status(run, {"contextWindow": _wire_window(window(10))})
    fitting = max(n for n in range(11) if _too_large(run, window(n), LoopLimits()) is None)
    assert fitting >= 5
    stored = kube.patch_status(run, {"contextWindow": _wire_window(window(fitting))})
    assert len(stored.status.context_window or []) == 2 + 2 * fitting


def test_a_write_over_the_etcd_clients_limit_is_too_large_not_an_outage(
    kube: KubeClient, namespace: str
) -> None:
    """Between etcd's 1.5 MiB and the API server's 3 MiB body limit, a write past the API server's etcd
    client limit (2 MiB) is refused with a 500 naming gRPC's ResourceExhausted, not etcd's "request is
    too large": taken for an outage, it was retried as if it could succeed."""
    from kubechain.kube.errors import TooLarge

    run = kube.create(
        TaskRun(
            metadata=ObjectMeta(name="huge", namespace=namespace),
            spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="m"),
        )
    )
    with pytest.raises(TooLarge) as refused:
        kube.patch_status(run, {"error": "x" * (2_500_000)})
    assert refused.value.status == 500


@pytest.mark.parametrize("name", ["x?watch=true", "x#y", "x?"])
def test_a_name_with_characters_of_a_url_names_no_object_on_the_api_server(
    kube: KubeClient, namespace: str, name: str
) -> None:
    """Sent as it was, a name from elsewhere (a function an LLM called) with a "?" or "#" in it read the
    object named by what came before ("x#y" read the Tool "x"), or set a query: percent-encoded, it is one
    name, which no object has."""
    from kubechain.models import Tool, ToolSpec

    kube.create(Tool(metadata=ObjectMeta(name="x", namespace=namespace), spec=ToolSpec(description="d")))
    with pytest.raises(NotFound):
        kube.get(Tool, namespace, name)
    assert kube.get(Tool, namespace, "x").name == "x"


def test_list_metadata_gives_each_objects_name_uid_and_generation_over_pages(
    kube: KubeClient, namespace: str
) -> None:
    for index in range(3):
        kube.create(
            TaskRun(
                metadata=ObjectMeta(name=f"meta-{index}", namespace=namespace),
                spec=TaskRunSpec(agent_ref=LocalObjectReference(name="a"), user_message="hi"),
            )
        )
    first = kube.get_raw(TaskRun.PLURAL, namespace, "meta-0")["metadata"]
    listed = kube.list_metadata(TaskRun.PLURAL, namespace, page_size=2)
    assert sorted(meta["name"] for meta in listed) == ["meta-0", "meta-1", "meta-2"]
    (meta,) = [meta for meta in listed if meta["name"] == "meta-0"]
    assert (meta["namespace"], meta["uid"], meta["generation"]) == (namespace, first["uid"], 1)
