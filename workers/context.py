"""Everything a task handler needs, built once per worker process and injected (tests pass fakes)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubechain.kube.cache import TTLReadCache
from kubechain.kube.client import KubeClient
from kubechain.kube.events import EventRecorder
from kubechain.llm.base import LLMClientFactory
from kubechain.queueing import ResourceMessage, TaskName
from kubechain.settings import Settings
from kubechain.statemachines.taskrun import LoopLimits

log = logging.getLogger(__name__)

Enqueue = Callable[[TaskName, ResourceMessage, float], None]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class WorkerContext:
    settings: Settings
    kube: KubeClient
    events: EventRecorder
    llms: LLMClientFactory
    identity: str
    enqueue: Enqueue
    clock: Callable[[], datetime] = utcnow
    sleep: Callable[[float], None] = time.sleep  # for in-task backoff (tests pass a recorder)
    mcp: Any = None  # kubechain.mcp.MCPManager, kept by a worker that runs tool calls (the tools queue)
    # This process consumes the llm queue: a turn it makes ready it also sends to the LLM, in-process.
    continues_llm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    _config: TTLReadCache | None = None
    _config_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def config_cache(self) -> TTLReadCache:
        """Reads of Agents, LLMs, Secrets and Tools for building LLM requests (may be ~2 s old). One per
        context: a worker's first burst of tasks, on many threads at once, made one each and read alike."""
        if self._config is None:
            with self._config_lock:
                if self._config is None:
                    self._config = TTLReadCache(self.kube, self.settings.config_cache_ttl_s)
        return self._config

    @property
    def limits(self) -> LoopLimits:
        s = self.settings
        return LoopLimits(
            claim_timeout_s=s.claim_timeout_s,
            child_creation_grace_s=min(10.0, s.claim_timeout_s / 2),
            max_attempts=s.llm_max_attempts,
            backoff_base_s=s.llm_backoff_base_s,
            backoff_max_s=s.llm_backoff_max_s,
            max_tool_result_bytes=s.max_tool_result_bytes,
            max_context_window_bytes=s.max_context_window_bytes,
            max_tool_calls_per_turn=s.max_tool_calls_per_turn,
        )


def build_context(
    settings: Settings, enqueue: Enqueue, *, continues_llm: bool = False, runs_tools: bool = True
) -> WorkerContext:
    """``runs_tools``: this process consumes the tools queue, so it keeps MCP sessions open for the tool
    calls to come. Without it (a control worker), an MCPServer's validation connects, lists the tools and
    closes: its stdio server does not keep running in a pod sized for no such children."""
    from kubechain.mcp import MCPManager, kube_secret_resolver

    kube = KubeClient.from_settings(settings, "kubechain-worker")
    return WorkerContext(
        settings=settings,
        kube=kube,
        events=EventRecorder(kube, "kubechain-worker", settings.identity, background=True),
        llms=LLMClientFactory(
            settings.llm_timeout_s,
            default_base_urls={"openai": settings.openai_base_url} if settings.openai_base_url else None,
            scripted_base_url=settings.scripted_llm_base_url,
            scripted_key=settings.scripted_llm_key,
        ),
        identity=settings.identity,
        enqueue=enqueue,
        continues_llm=continues_llm,
        # Lazy: its event loop thread and MCP sessions start on the first MCP request.
        mcp=MCPManager(
            kube_secret_resolver(kube),
            call_timeout_s=settings.tool_timeout_s,
            call_budget_s=settings.tool_execution_cap_s,
            command_allowlist=settings.mcp_command_allowlist,
        )
        if runs_tools
        else None,
    )
