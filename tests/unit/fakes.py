"""Test doubles for the worker handlers: an in-memory API server and a scripted in-process LLM."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from kubechain.kube.events import EventRecorder
from kubechain.kube.fake import FakeKubeClient
from kubechain.llm.base import LLMClient, LLMClientFactory, LLMRequest, LLMResponse
from kubechain.models import LLM
from kubechain.queueing import ResourceMessage
from kubechain.settings import Settings
from workers.context import WorkerContext

API = "kubechain.humanlayer.dev/v1alpha1"


class FakeLLM:
    def __init__(self, answer: Callable[[LLMRequest], LLMResponse]) -> None:
        self.answer = answer
        self.requests: list[LLMRequest] = []
        self.lock = threading.Lock()

    def complete(self, request: LLMRequest) -> LLMResponse:
        with self.lock:
            self.requests.append(request)
        return self.answer(request)

    def validate_credentials(self) -> None:
        return None


def context(
    kube: FakeKubeClient,
    llm: FakeLLM,
    identity: str = "w1",
    *,
    continues_llm: bool = False,
    **settings: Any,
) -> WorkerContext:
    def build(_llm: LLM, _key: str, _timeout: float, _base: str | None) -> LLMClient:
        return llm

    return WorkerContext(
        settings=Settings(**settings),
        kube=kube,
        events=EventRecorder(kube, "kubechain-worker", identity),
        llms=LLMClientFactory(10, builders={"openai": build, "anthropic": build}),
        identity=identity,
        enqueue=lambda *_: None,
        continues_llm=continues_llm,
    )


def on_clock(ctx: WorkerContext, now: list[datetime]) -> None:
    """Drive ``ctx``'s wall clock and its monotonic clock (a claim's age) from ``now[0]``, which the test
    moves on."""
    start = now[0]
    ctx.clock = lambda: now[0]
    ctx.monotonic = lambda: (now[0] - start).total_seconds()


def create(
    kube: FakeKubeClient, kind: str, plural: str, name: str, spec: dict[str, Any], namespace: str = "default"
) -> dict[str, Any]:
    return kube.create_raw(
        plural, namespace, {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}
    )


def message(kind: str, name: str, namespace: str = "default") -> ResourceMessage:
    return ResourceMessage(kind=kind, namespace=namespace, name=name)


def ready_agent_setup(kube: FakeKubeClient, tools: list[str] | None = None) -> None:
    kube.add_secret("default", "openai", {"OPENAI_API_KEY": "sk-test"})
    create(kube, "LLM", "llms", "gpt-4o", {"provider": "openai"})
    spec: dict[str, Any] = {"llmRef": {"name": "gpt-4o"}, "system": "be brief"}
    if tools:
        spec["tools"] = [{"name": t} for t in tools]
    create(kube, "Agent", "agents", "a", spec)
