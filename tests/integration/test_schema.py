"""The generated CRDs on a real API server: samples apply, bad input is rejected, status is a subresource."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kubechain.crdgen import all_crds
from kubechain.kube.errors import Conflict, Invalid
from kubechain.models import LLM
from kubechain.testing.waiting import wait_for
from tests.conftest import FIXTURES, Kubectl

SAMPLES = sorted((FIXTURES / "original").glob("*.yaml"))


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_original_sample_applies_and_reads_back(sample: Path, kubectl: Kubectl, namespace: str) -> None:
    import yaml

    docs = [d for d in yaml.safe_load_all(sample.read_text()) if d]
    for doc in docs:
        doc["metadata"].pop("namespace", None)  # each test applies into its own namespace
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), namespace=namespace)
    for doc in docs:
        got = json.loads(
            kubectl(
                "get", doc["kind"].lower(), doc["metadata"]["name"], "-o", "json", namespace=namespace
            ).stdout
        )
        if "spec" in doc:
            for key, value in doc["spec"].items():
                assert got["spec"][key] == value, f"{doc['kind']} {key} did not round-trip"


INVALID = {
    "llm-provider-foo": """
apiVersion: kubechain.humanlayer.dev/v1alpha1
kind: LLM
metadata: {name: bad-llm}
spec:
  provider: foo
  apiKeyFrom: {secretKeyRef: {name: openai, key: OPENAI_API_KEY}}
""",
    "mcpserver-transport-ftp": """
apiVersion: kubechain.humanlayer.dev/v1alpha1
kind: MCPServer
metadata: {name: bad-mcp}
spec: {transport: ftp, url: "ftp://example.com"}
""",
    "agent-without-system": """
apiVersion: kubechain.humanlayer.dev/v1alpha1
kind: Agent
metadata: {name: bad-agent}
spec:
  llmRef: {name: gpt-4o}
""",
    "contactchannel-slack-id-x123": """
apiVersion: kubechain.humanlayer.dev/v1alpha1
kind: ContactChannel
metadata: {name: bad-channel}
spec:
  type: slack
  apiKeyFrom: {secretKeyRef: {name: hl, key: api-key}}
  slack: {channelOrUserID: x123}
""",
    "llm-temperature-1.5": """
apiVersion: kubechain.humanlayer.dev/v1alpha1
kind: LLM
metadata: {name: hot-llm}
spec:
  provider: openai
  temperature: "1.5"
  apiKeyFrom: {secretKeyRef: {name: openai, key: OPENAI_API_KEY}}
""",
    "taskrun-without-task-or-agent": """
apiVersion: kubechain.humanlayer.dev/v1alpha1
kind: TaskRun
metadata: {name: bad-run}
spec: {userMessage: "hello"}
""",
    "taskrun-without-spec": """
apiVersion: kubechain.humanlayer.dev/v1alpha1
kind: TaskRun
metadata: {name: no-spec}
""",
    "stdio-mcpserver-without-command": """
apiVersion: kubechain.humanlayer.dev/v1alpha1
kind: MCPServer
metadata: {name: no-command}
spec: {transport: stdio}
""",
    "mcpserver-quantity-lots": """
apiVersion: kubechain.humanlayer.dev/v1alpha1
kind: MCPServer
metadata: {name: greedy}
spec: {transport: stdio, command: uvx, resources: {limits: {memory: lots}}}
""",
}

EXPECTED_ERROR = {
    "llm-provider-foo": 'Unsupported value: "foo"',
    "mcpserver-transport-ftp": 'Unsupported value: "ftp"',
    "agent-without-system": "spec.system: Required value",
    "contactchannel-slack-id-x123": "spec.slack.channelOrUserID",
    "llm-temperature-1.5": "spec.temperature",
    "taskrun-without-task-or-agent": "set spec.taskRef, or spec.agentRef together with a non-empty spec.userMessage",
    "taskrun-without-spec": "spec: Required value",
    "stdio-mcpserver-without-command": "command is required for stdio transport",
    "mcpserver-quantity-lots": "spec.resources.limits.memory",
}


def test_resource_quantities_are_numbers_or_strings_as_in_a_pod(kubectl: Kubectl, namespace: str) -> None:
    manifest = """
apiVersion: kubechain.humanlayer.dev/v1alpha1
kind: MCPServer
metadata: {name: sized}
spec:
  transport: stdio
  command: uvx
  resources: {limits: {cpu: 1, memory: 128Mi}, requests: {cpu: 100m, memory: 1e6}}
"""
    kubectl("apply", "-f", "-", input=manifest, namespace=namespace)
    got = json.loads(kubectl("get", "mcpserver", "sized", "-o", "json", namespace=namespace).stdout)
    assert got["spec"]["resources"] == {
        "limits": {"cpu": 1, "memory": "128Mi"},
        "requests": {"cpu": "100m", "memory": 1000000},
    }


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_manifest_is_rejected(case: str, kubectl: Kubectl, namespace: str) -> None:
    result = kubectl("apply", "-f", "-", input=INVALID[case], check=False, namespace=namespace)
    assert result.returncode != 0
    assert EXPECTED_ERROR[case] in result.stderr, result.stderr


LLM_BODY = {
    "apiVersion": "kubechain.humanlayer.dev/v1alpha1",
    "kind": "LLM",
    "metadata": {"name": "gpt-4o"},
    "spec": {"provider": "openai", "apiKeyFrom": {"secretKeyRef": {"name": "openai", "key": "k"}}},
}


def test_status_write_does_not_change_spec(kube: object, namespace: str) -> None:
    created = LLM.from_wire(kube.create_raw("llms", namespace, LLM_BODY))  # type: ignore[attr-defined]
    body = {"spec": {"provider": "anthropic"}, "status": {"ready": True, "status": "Ready"}}
    kube.request(  # type: ignore[attr-defined]
        "PATCH",
        f"/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/{namespace}/llms/gpt-4o/status",
        body=body,
        content_type="application/merge-patch+json",
    )
    after = kube.get(LLM, namespace, "gpt-4o")  # type: ignore[attr-defined]
    assert after.spec.provider == "openai"
    assert after.status.ready is True
    assert after.metadata.generation == created.metadata.generation


def test_stale_status_write_raises_conflict(kube: object, namespace: str) -> None:
    created = LLM.from_wire(kube.create_raw("llms", namespace, LLM_BODY))  # type: ignore[attr-defined]
    kube.patch_status(created, {"status": "Pending", "statusDetail": "first writer"})  # type: ignore[attr-defined]
    with pytest.raises(Conflict):
        kube.patch_status(created, {"status": "Ready", "statusDetail": "stale writer"})  # type: ignore[attr-defined]
    assert kube.get(LLM, namespace, "gpt-4o").status.status_detail == "first writer"  # type: ignore[attr-defined]


def test_status_schema_is_enforced(kube: object, namespace: str) -> None:
    created = LLM.from_wire(kube.create_raw("llms", namespace, LLM_BODY))  # type: ignore[attr-defined]
    with pytest.raises(Invalid):
        kube.patch_status(created, {"status": "Bogus"})  # type: ignore[attr-defined]


def test_printer_columns_match_the_original(kubectl: Kubectl, namespace: str) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({**LLM_BODY, "metadata": {"name": "gpt-4o"}}),
        namespace=namespace,
    )
    header = kubectl("get", "llm", "-o", "wide", namespace=namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "PROVIDER", "READY", "STATUS", "DETAIL"]
    run = {
        "apiVersion": "kubechain.humanlayer.dev/v1alpha1",
        "kind": "TaskRun",
        "metadata": {"name": "r"},
        "spec": {"agentRef": {"name": "a"}, "userMessage": "hi"},
    }
    kubectl("apply", "-f", "-", input=json.dumps(run), namespace=namespace)
    header = kubectl("get", "taskrun", "-o", "wide", namespace=namespace).stdout.splitlines()[0].split()
    assert header == [
        "NAME",
        "READY",
        "STATUS",
        "DETAIL",
        "PHASE",
        "TASK",
        "AGENT",  # ours: a run made from agentRef + userMessage has no Task
        "PREVIEW",
        "OUTPUT",
        "ERROR",
        "STARTED",
        "COMPLETED",
    ]
    header = kubectl("get", "taskrun", namespace=namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "STATUS", "PHASE", "TASK", "PREVIEW", "OUTPUT"]


def test_status_writes_are_managed_under_the_component_name(kubeconfig: Path, namespace: str) -> None:
    """kubectl's managedFields (and audit logs) name the writer after its User-Agent."""
    from kubechain.kube.client import KubeClient
    from kubechain.kube.connection import load_connection

    worker = KubeClient(load_connection(str(kubeconfig)), component="kubechain-worker")
    try:
        created = LLM.from_wire(worker.create_raw("llms", namespace, LLM_BODY))
        worker.patch_status(created, {"status": "Ready", "statusDetail": "validated"})
        managed = worker.get_raw("llms", namespace, "gpt-4o")["metadata"]["managedFields"]
    finally:
        worker.close()
    by_subresource = {entry.get("subresource", ""): entry["manager"] for entry in managed}
    assert by_subresource == {"": "kubechain-worker", "status": "kubechain-worker"}


def test_a_tool_calls_spec_cannot_be_edited_but_it_can_be_approved(kube: object, namespace: str) -> None:
    """An approver may annotate a waiting call; what the LLM asked for (tool, arguments) stays as asked."""
    body = {
        "apiVersion": "kubechain.humanlayer.dev/v1alpha1",
        "kind": "TaskRunToolCall",
        "metadata": {"name": "waiting"},
        "spec": {
            "toolCallId": "call-1",
            "taskRunRef": {"name": "r"},
            "toolRef": {"name": "fetch__fetch"},
            "arguments": '{"url": "https://example.com"}',
        },
    }
    kube.create_raw("taskruntoolcalls", namespace, body)  # type: ignore[attr-defined]
    path = f"/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/{namespace}/taskruntoolcalls/waiting"
    with pytest.raises(Invalid, match="spec is immutable"):
        kube.request(  # type: ignore[attr-defined]
            "PATCH",
            path,
            body={"spec": {"arguments": '{"url": "https://attacker.example"}'}},
            content_type="application/merge-patch+json",
        )
    kube.patch_metadata(  # type: ignore[attr-defined]
        "taskruntoolcalls",
        namespace,
        "waiting",
        {"annotations": {"kubechain.humanlayer.dev/approval": "approved"}},
    )
    got = kube.get_raw("taskruntoolcalls", namespace, "waiting")  # type: ignore[attr-defined]
    assert got["spec"]["arguments"] == '{"url": "https://example.com"}'
    assert got["metadata"]["annotations"]["kubechain.humanlayer.dev/approval"] == "approved"


@pytest.mark.parametrize(
    ("spec", "edit", "refused"),
    [
        ({"agentRef": {"name": "a"}, "userMessage": "hi"}, {"agentRef": {"name": "b"}}, "spec.agentRef"),
        ({"agentRef": {"name": "a"}, "userMessage": "hi"}, {"userMessage": "bye"}, "spec.userMessage"),
        ({"taskRef": {"name": "t"}}, {"agentRef": {"name": "b"}}, "spec.agentRef"),
        ({"taskRef": {"name": "t"}}, {"taskRef": {"name": "u"}}, "spec.taskRef"),
    ],
    ids=["agentRef-changed", "userMessage-changed", "agentRef-added", "taskRef-changed"],
)
def test_what_a_taskrun_runs_cannot_be_edited_once_it_exists(
    spec: dict[str, object], edit: dict[str, object], refused: str, kube: object, namespace: str
) -> None:
    """A run edited mid-way took its later turns with another Agent (agentRef, or taskRef naming a Task of
    another Agent) than its first, on the same context window; its spec said one thing, its window another
    (userMessage). Labels and annotations may still change."""
    body = {"apiVersion": "kubechain.humanlayer.dev/v1alpha1", "kind": "TaskRun", "metadata": {"name": "r"}}
    kube.create_raw("taskruns", namespace, {**body, "spec": spec})  # type: ignore[attr-defined]
    path = f"/apis/kubechain.humanlayer.dev/v1alpha1/namespaces/{namespace}/taskruns/r"
    with pytest.raises(Invalid, match=f"{refused} is immutable"):
        kube.request(  # type: ignore[attr-defined]
            "PATCH", path, body={"spec": edit}, content_type="application/merge-patch+json"
        )
    kube.patch_metadata("taskruns", namespace, "r", {"labels": {"team": "a"}})  # type: ignore[attr-defined]
    got = kube.get_raw("taskruns", namespace, "r")  # type: ignore[attr-defined]
    assert got["spec"] == spec and got["metadata"]["labels"] == {"team": "a"}


def _crd_description(plural: str, field_path: str) -> str:
    """The description the generated CRD gives ``field_path`` (``spec.userMessage``) of kind ``plural``."""
    crd = next(c for c in all_crds() if c["spec"]["names"]["plural"] == plural)
    node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for name in field_path.split("."):
        node = node["properties"][name]
    return str(node.get("description", ""))


@pytest.mark.parametrize("field_path", ["spec.userMessage", "status.phase"])
def test_kubectl_explain_shows_a_fields_description(
    field_path: str, kubectl: Kubectl, tmp_path: Path
) -> None:
    """`kubectl explain` reads the API server's OpenAPI document, published from the CRDs: each field says
    what it is there, as its model describes it."""
    target = f"taskrun.{field_path}"
    attempts = itertools.count()

    def explained() -> str | None:
        # a fresh cache each time: a discovery document cached before the CRD was published lacks it
        cache = tmp_path / f"cache-{next(attempts)}"
        result = kubectl("explain", target, f"--cache-dir={cache}", check=False)
        return result.stdout if result.returncode == 0 and "FIELD:" in result.stdout else None

    output = wait_for(explained, timeout_s=60, interval_s=0.5, what=f"kubectl explain {target}")
    described = " ".join(output.split())  # kubectl wraps a description over several lines
    description = " ".join(_crd_description("taskruns", field_path).split())
    assert "DESCRIPTION:" in output and description and description in described, output


def test_a_validation_stopped_at_a_secret_names_it_in_a_status_the_api_server_keeps(
    kube: object, namespace: str
) -> None:
    """status.unusableSecret (what the watcher's short re-check goes by) is stored by the real API server
    as the worker writes it, and removed by the validation after the Secret is created (a merge patch's
    null), not pruned as a field the schema does not know."""
    from kubechain.llm.base import LLMResponse
    from kubechain.statemachines.routing import waits_for_a_secret
    from tests.integration import create_secret
    from tests.unit.fakes import FakeLLM, context, create, message
    from workers.validators import validate

    ctx = context(kube, FakeLLM(lambda request: LLMResponse(content="ok")), config_cache_ttl_s=0)  # type: ignore[arg-type]
    create(kube, "LLM", "llms", "gpt-4o", LLM_BODY["spec"], namespace)  # type: ignore[arg-type]
    validate(ctx, message("LLM", "gpt-4o", namespace))
    stopped = kube.get_raw("llms", namespace, "gpt-4o")  # type: ignore[attr-defined]
    assert (stopped["status"]["status"], stopped["status"].get("unusableSecret")) == ("Error", "openai")
    assert waits_for_a_secret(stopped)
    create_secret(kube, namespace, "openai", {"k": "sk-test"})
    validate(ctx, message("LLM", "gpt-4o", namespace))
    fixed = kube.get_raw("llms", namespace, "gpt-4o")  # type: ignore[attr-defined]
    assert fixed["status"]["status"] == "Ready" and "unusableSecret" not in fixed["status"]
    assert not waits_for_a_secret(fixed)
