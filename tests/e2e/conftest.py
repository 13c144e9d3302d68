"""End-to-end: the watcher and a worker run as separate processes; tests speak kubectl."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubechain.testing.stack import LocalStack, StackOptions
from tests.conftest import SHARED_STACKS, Kubectl


@pytest.fixture(scope="session")
def stack(kubeconfig: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    options = StackOptions(
        workdir=tmp_path_factory.mktemp("stack"),
        cluster="current",
        kubeconfig=kubeconfig,
        workers=1,
        worker_concurrency=16,
        resync_interval_s=2.0,
        stale_after_s=2.0,
        extra_env={"REDIS_URL": redis_url},
    )
    with LocalStack(options) as running:
        SHARED_STACKS.append(running)
        try:
            yield running
        finally:
            SHARED_STACKS.remove(running)


class ScriptedLLM:
    """Talks to the scripted LLM process's admin API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def add_rule(self, user_contains: str, turns: list[dict[str, Any]]) -> None:
        current = httpx.get(f"{self.url}/_admin/script").json()
        current.setdefault("rules", []).insert(0, {"match": {"user_contains": user_contains}, "turns": turns})
        httpx.post(f"{self.url}/_admin/script", json=current).raise_for_status()

    def in_flight(self, first_user: str) -> list[dict[str, Any]]:
        return [r for r in httpx.get(f"{self.url}/_admin/inflight").json() if r["first_user"] == first_user]

    def requests(self, first_user: str) -> list[dict[str, Any]]:
        return [r for r in httpx.get(f"{self.url}/_admin/requests").json() if r["first_user"] == first_user]


@pytest.fixture(scope="session")
def llm(stack: LocalStack) -> ScriptedLLM:
    return ScriptedLLM(stack.llm_url)


def apply(kubectl: Kubectl, namespace: str, *docs: dict[str, Any]) -> None:
    kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs), namespace=namespace)


def get(kubectl: Kubectl, namespace: str, kind: str, name: str) -> dict[str, Any]:
    result = kubectl("get", kind, name, "-o", "json", namespace=namespace, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def phase(kubectl: Kubectl, namespace: str, name: str) -> str:
    return str(get(kubectl, namespace, "taskrun", name).get("status", {}).get("phase", ""))


def event_reasons(kubectl: Kubectl, namespace: str, kind: str, name: str) -> list[str]:
    events = json.loads(kubectl("get", "events", "-o", "json", namespace=namespace).stdout)["items"]
    mine = [e for e in events if e["involvedObject"]["name"] == name and e["involvedObject"]["kind"] == kind]
    mine.sort(key=lambda e: (e.get("eventTime") or e.get("firstTimestamp") or "", e["metadata"]["name"]))
    return [e["reason"] for e in mine]


def resource(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubechain.humanlayer.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }


# The README's builtin "add" Tool, with the parameters schema the LLM is shown.
ADD_TOOL = resource(
    "Tool",
    "add",
    {
        "name": "add",
        "toolType": "function",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
        "execute": {"builtin": {"name": "add"}},
    },
)


def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data}


OPENAI_SECRET = secret("openai", {"OPENAI_API_KEY": "sk-scripted"})


def llm_resource(name: str = "gpt-4o") -> dict[str, Any]:
    return resource(
        "LLM",
        name,
        {"provider": "openai", "apiKeyFrom": {"secretKeyRef": {"name": "openai", "key": "OPENAI_API_KEY"}}},
    )


def deploy_tool(url: str) -> dict[str, Any]:
    """An externalAPI Tool ``deploy(version)`` posting to ``url`` that needs a human's approval first."""
    return resource(
        "Tool",
        "deploy",
        {
            "name": "deploy",
            "toolType": "externalAPI",
            "parameters": {"type": "object", "properties": {"version": {"type": "string"}}},
            "execute": {"externalAPI": {"url": url, "method": "POST", "requiresApproval": True}},
        },
    )
