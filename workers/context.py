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
from kubechain.mcp.turns import Turns
from kubechain.models import Resource, TaskRunToolCall
from kubechain.queueing import ResourceMessage, TaskName
from kubechain.settings import Settings
from kubechain.statemachines.taskrun import LoopLimits
from kubechain.statemachines.transition import Transition

log = logging.getLogger(__name__)

Enqueue = Callable[[TaskName, ResourceMessage, float], None]


def utcnow() -> datetime:
    return datetime.now(UTC)


# Long after a task's retries (20, backing off to 30 s apiece) and the watcher's resyncs would have come
# back to a claim in doubt: one still remembered then is for an object this process will not see again.
CLAIM_IN_DOUBT_KEPT_S = 3600.0
# So many claims in doubt at once: the API server has been unreachable for long. The oldest is dropped
# past it (a retry in this process then waits for that claim to expire, as one in another process does).
CLAIMS_IN_DOUBT_MAX = 1000
# The fields of a claim's status that say whose it is; see claim_only.
CLAIM_FIELDS = ("phase", "claimedBy", "claimedAt")


def claim_only(claim: Transition) -> Transition:
    """``claim`` as re-applied (stamped afresh) to an object that holds it: its fields that say whose claim
    it is, and its Events and children, still due (the write's answer was lost). The rest of its status
    landed in the same write as those fields, so it is on the object already (a hand-off wrote the whole
    context window): written again, it could only undo what changed since."""
    status = {key: value for key, value in claim.status.items() if key in CLAIM_FIELDS}
    return Transition(status, list(claim.events), list(claim.children), handoff=claim.handoff)


class ClaimsInDoubt:
    """Claims this process wrote but could not confirm (the write's answer and its read-backs were lost,
    or its fresh stamp's answer was, or refused; see workers.transitions.apply_claim), so it never made
    the call they were for. Only the writer can
    tell: the claim names the pod, which all its threads and processes share. A later task of this
    process that finds one of them on its object claims it afresh (a conditional write, so of several
    tasks finding it one wins) instead of leaving it to expire as another worker's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (kind, namespace, name) -> claimedAt -> the claim, as claim_only keeps it
        self._claims: dict[tuple[str, str, str], dict[str, Transition]] = {}
        # (object, claimedAt) -> when remembered; the oldest first
        self._since: dict[tuple[tuple[str, str, str], str], float] = {}
        self._dropped = False  # the cap was reached once: logged then

    @staticmethod
    def _key(obj: Resource[Any, Any]) -> tuple[str, str, str]:
        return obj.KIND, obj.namespace, obj.name

    def add(self, obj: Resource[Any, Any], claimed_at: str, transition: Transition) -> None:
        """Remember the claim ``transition`` wrote (stamped ``claimed_at``) on ``obj``. Every one is kept
        until a claim of this process there is confirmed: a re-claim in doubt may not land, its
        predecessor then still being the one on the object. Expired ones, and the oldest past
        CLAIMS_IN_DOUBT_MAX, are dropped."""
        key = self._key(obj)
        with self._lock:
            now = time.monotonic()  # under the lock: the order kept is the order of these times
            self._since.pop((key, claimed_at), None)  # remembered again: the newest
            self._since[(key, claimed_at)] = now
            self._claims.setdefault(key, {})[claimed_at] = claim_only(transition)
            while True:  # from the oldest: the just added one is never dropped
                (old_key, old_at), since = next(iter(self._since.items()))
                if now - since <= CLAIM_IN_DOUBT_KEPT_S and len(self._since) <= CLAIMS_IN_DOUBT_MAX:
                    break
                if now - since <= CLAIM_IN_DOUBT_KEPT_S and not self._dropped:
                    self._dropped = True
                    log.warning(
                        "more than %d claims in doubt: dropping the oldest (a retry finding one waits for it "
                        "to expire)",
                        CLAIMS_IN_DOUBT_MAX,
                    )
                del self._since[(old_key, old_at)]
                claims = self._claims[old_key]
                del claims[old_at]
                if not claims:
                    del self._claims[old_key]

    def held(self, obj: Resource[Any, Any], holds: Callable[[str], bool]) -> Transition | None:
        """The claim in doubt that ``obj`` holds, if any (a copy, to stamp anew; see claim_only):
        ``holds(claimed_at)`` says whether the object holds this process's claim stamped so."""
        with self._lock:
            claims = dict(self._claims.get(self._key(obj), {}))
        for claimed_at, transition in claims.items():
            if holds(claimed_at):
                log.info(
                    "%s %s/%s holds a claim this worker wrote but could not confirm, so never acted on: "
                    "claiming it again",
                    obj.KIND,
                    obj.namespace,
                    obj.name,
                )
                return Transition(
                    dict(transition.status),
                    list(transition.events),
                    list(transition.children),
                    handoff=transition.handoff,
                )
        return None

    def forget(self, obj: Resource[Any, Any]) -> None:
        """A claim of this process on ``obj`` was confirmed: any it had in doubt there is superseded."""
        key = self._key(obj)
        with self._lock:
            for claimed_at in self._claims.pop(key, {}):
                self._since.pop((key, claimed_at), None)


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
    # A claim's age is this process's elapsed time: the wall clock may be stepped (its claimedAt, which
    # other processes read, is still stamped from ``clock``).
    monotonic: Callable[[], float] = time.monotonic
    mcp: Any = None  # kubechain.mcp.MCPManager, kept by a worker that runs tool calls (the tools queue)
    claims_in_doubt: ClaimsInDoubt = field(default_factory=ClaimsInDoubt, repr=False)
    # This process consumes the llm queue: a turn it makes ready it also sends to the LLM, in-process.
    continues_llm: bool = False
    # This process consumes the tools queue: the tool calls it creates it also starts, in-process
    # (workers.started_calls); False when it cannot take one now. None: it leaves them to the queue.
    start_tool_call: Callable[[TaskRunToolCall, float], bool] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _config: TTLReadCache | None = None
    _config_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stdio_checks: Turns | None = field(default=None, repr=False)

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
    def stdio_check_turns(self) -> Turns:
        """Turns of the validations that start a stdio MCP server and stop it after (a checks worker's):
        at most KUBECHAIN_MCP_MAX_STDIO_CHECKS such servers run at once in this process."""
        if self._stdio_checks is None:
            with self._config_lock:
                if self._stdio_checks is None:
                    self._stdio_checks = Turns(self.settings.mcp_max_stdio_checks)
        return self._stdio_checks

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
    settings: Settings,
    enqueue: Enqueue,
    *,
    continues_llm: bool = False,
    runs_tools: bool = True,
    started_call_slots: int = 0,
) -> WorkerContext:
    """``runs_tools``: this process consumes the tools queue, so it keeps MCP sessions open for the tool
    calls to come. Without it (a checks worker), an MCPServer's validation connects, lists the tools and
    closes: its stdio server does not keep running in a pod sized for no such children.
    ``started_call_slots``: how many of the tool calls it creates it may run at once itself (its pool's
    threads; 0: none, they go through the queue)."""
    from kubechain.mcp import MCPManager, kube_secret_resolver
    from kubechain.mcp.presence import kube_server_lister
    from workers.mcpservers import ToolsChangedRevalidator  # it imports this module

    kube = KubeClient.from_settings(settings, "kubechain-worker")
    ctx = WorkerContext(
        settings=settings,
        kube=kube,
        # A fan-out's fifty ToolCallCreated Events are posted a second later: meanwhile its tool calls,
        # claimed and started, have the API server (on 2 cores, 0.45 s to start them all, not 0.6)
        events=EventRecorder(kube, "kubechain-worker", settings.identity, background=True, delay_s=1.0),
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
            max_message_bytes=settings.mcp_max_message_bytes,
            # its sessions stay open: a server's tool list changing under one is validated again, and one
            # deleted or edited is closed (no message reaches every worker that used it)
            on_tools_changed=ToolsChangedRevalidator(enqueue),
            list_servers=kube_server_lister(kube, settings.namespaces),
            max_stdio_sessions=settings.mcp_max_stdio_sessions,
        )
        if runs_tools
        else None,
    )
    if runs_tools and started_call_slots > 0:
        from workers.started_calls import CallStarter
        from workers.tool_call import run_started

        ctx.start_tool_call = CallStarter(
            started_call_slots, lambda toolcall, asked_at: run_started(ctx, toolcall, asked_at)
        ).start
    return ctx
