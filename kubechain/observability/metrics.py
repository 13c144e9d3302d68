"""Prometheus metrics of watcher and workers (``/metrics`` on KUBECHAIN_METRICS_PORT)."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from kubechain.observability.health import HealthCheck

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# A tool call's: an execution (milliseconds to KUBECHAIN_TOOL_TIMEOUT_S), or a delegation, whose sub-agent's
# whole run takes minutes (one that never starts fails after KUBECHAIN_SUB_AGENT_START_TIMEOUT_S, 15 min).
TOOL_LATENCY_BUCKETS = (*LATENCY_BUCKETS, 600, 1200, 1800, 3600)
# A person's answer: seconds (a kubectl decision at hand) to a day (one left overnight).
HUMAN_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400)

TASKS = Counter("kubechain_tasks_total", "Celery tasks run, by task and outcome", ["task", "outcome"])
TASK_SECONDS = Histogram(
    "kubechain_task_duration_seconds", "Celery task duration", ["task"], buckets=LATENCY_BUCKETS
)
TASK_QUEUE_SECONDS = Histogram(
    "kubechain_task_queue_wait_seconds",
    "Time from enqueue to the task starting",
    ["task"],
    buckets=LATENCY_BUCKETS,
)
HANDOFFS = Counter(
    "kubechain_llm_handoffs_total",
    "Turns a worker made ready and then sent to the LLM itself, without a round trip through the queue",
    ["outcome"],
)
LLM_REQUESTS = Counter(
    "kubechain_llm_requests_total", "LLM requests, by model and outcome", ["model", "outcome"]
)
LLM_SECONDS = Histogram(
    "kubechain_llm_request_duration_seconds", "LLM request latency", ["model"], buckets=LATENCY_BUCKETS
)
LLM_TOKENS = Counter(
    "kubechain_llm_tokens_total", "LLM tokens, by model and kind (prompt, completion)", ["model", "kind"]
)
TOOL_CALLS = Counter(
    "kubechain_tool_calls_total",
    "Tool calls ended, by tool and outcome (ok, error, invalid_arguments, rejected), each counted once",
    ["tool", "outcome"],
)
TOOL_SECONDS = Histogram(
    "kubechain_tool_call_duration_seconds",
    "Tool call latency: an executed call's execution (not its wait for an approval); a delegated call's "
    "time from its start to its end (a call that asked a human, or that never ran, is not observed)",
    ["tool"],
    buckets=TOOL_LATENCY_BUCKETS,
)
HUMAN_WAIT_SECONDS = Histogram(
    "kubechain_human_wait_seconds",
    "Time a tool call waited for a person, by kind: approval (from its request to the decision recorded, "
    "approved or rejected), contact (a human-contact tool's question, from its request to the answer "
    "recorded)",
    ["kind"],
    buckets=HUMAN_WAIT_BUCKETS,
)
STATUS_CONFLICTS = Counter(
    "kubechain_status_write_conflicts_total",
    "Conditional status writes that lost to another writer (409)",
    ["kind"],
)
API_REQUESTS = Counter(
    "kubechain_kube_requests_total", "Kubernetes API requests, by verb and code", ["verb", "code"]
)
WATCH_EVENTS = Counter(
    "kubechain_watch_events_total",
    "Watch events the leading watcher acted on (a standby's are not counted)",
    ["kind", "type"],
)
ENQUEUED = Counter(
    "kubechain_enqueued_total", "Tasks enqueued by the watcher, by task and reason", ["task", "reason"]
)
# (multiprocess_mode only matters for prefork workers: one series, not one per child process ever forked)
QUEUE_DEPTH = Gauge(
    "kubechain_queue_depth",
    "Messages waiting in a Celery queue (Redis list length)",
    ["queue"],
    multiprocess_mode="livemax",
)


def tool_label(name: str) -> str:
    """Bound label cardinality: MCP tools are labelled by server, others by name (LLM-chosen names vary)."""
    return name.split("__", 1)[0] + "__*" if "__" in name else name[:64]


def count_tool_call(tool: str, outcome: str, seconds: float | None) -> None:
    """One tool call ended (``tool``: a name that resolved, not any the LLM made up), with its latency when
    it ran at all (None: it did not, or its time was a person's). A rejected call's is not observed: it
    never ran, and its time is a human's wait, which among the tool's executions would pin their p99 at
    the top bucket (it is observed by observe_human_wait)."""
    label = tool_label(tool)
    TOOL_CALLS.labels(label, outcome).inc()
    if seconds is not None and outcome != "rejected":
        TOOL_SECONDS.labels(label).observe(seconds)


def observe_human_wait(kind: str, seconds: float) -> None:
    """A person answered a tool call (``kind``: "approval" or "contact") ``seconds`` after being asked."""
    HUMAN_WAIT_SECONDS.labels(kind).observe(seconds)


# Models a process labels its LLM metrics with, before the rest are counted as "other": a model name is
# any string an LLM resource gives (each new one ~25 series, kept for the process's life).
MAX_MODEL_LABELS = 50
_model_labels: set[str] = set()
_model_labels_lock = threading.Lock()


def model_label(model: str) -> str:
    """Bound label cardinality: the first MAX_MODEL_LABELS models (cut to 64 characters), then "other"."""
    label = model[:64]
    with _model_labels_lock:
        if label in _model_labels:
            return label
        if len(_model_labels) >= MAX_MODEL_LABELS:
            return "other"
        _model_labels.add(label)
        return label


class PhaseCollector(Collector):
    """``kubechain_runs{phase}`` computed at scrape time from the watcher's cache."""

    def __init__(self, phases: Callable[[], Iterable[str]]) -> None:
        self._phases = phases

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("kubechain_runs", "TaskRuns by phase", labels=["phase"])
        counts: dict[str, int] = {}
        for phase in self._phases():
            counts[phase or "New"] = counts.get(phase or "New", 0) + 1
        for phase, count in sorted(counts.items()):
            family.add_metric([phase], count)
        yield family


def register_phase_collector(phases: Callable[[], Iterable[str]]) -> None:
    REGISTRY.register(PhaseCollector(phases))


_MULTIPROCESS_FILE = re.compile(r"(?:counter|histogram|summary|gauge_[a-z]+)_(\d+)\.db")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def registry_for(prefork: bool, multiproc_dir: str | None) -> CollectorRegistry:
    """What /metrics serves. A prefork worker runs its tasks in child processes: their samples reach the
    parent's endpoint only through prometheus_client's multiprocess files."""
    if not prefork:
        return REGISTRY
    if not multiproc_dir:
        log.warning(
            "--pool prefork runs tasks in child processes, and without PROMETHEUS_MULTIPROC_DIR /metrics "
            "shows none of their metrics: set it to an empty writable directory (an emptyDir in Kubernetes), "
            "or use --pool threads"
        )
        return REGISTRY
    # An earlier run's files (a restarted container keeps its emptyDir) would be added up again. Only
    # prometheus_client's own files, and only of processes that are gone: the directory may hold others'.
    for stale in Path(multiproc_dir).glob("*.db"):
        match = _MULTIPROCESS_FILE.fullmatch(stale.name)
        if match and not _alive(int(match.group(1))):
            stale.unlink(missing_ok=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)
    return registry


def process_exited(pid: int, multiproc_dir: str | None) -> None:
    """Drop a dead prefork child's live gauges (its counters and histograms stay counted)."""
    if multiproc_dir:
        mark_process_dead(pid, multiproc_dir)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # a probe every few seconds is not worth a log line


def metrics_app(
    registry: CollectorRegistry, health: HealthCheck | None, readiness: HealthCheck | None = None
) -> WSGIApplication:
    """``/metrics`` (anything else, as prometheus_client serves it), and, given ``health``, ``/healthz`` and
    ``/readyz`` (``readiness``; without it, ready is alive): 200 or 503 with a line saying why."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if health is None or path not in ("/healthz", "/readyz"):
            return metrics(environ, start_response)
        check = readiness if path == "/readyz" and readiness is not None else health
        try:
            verdict = check()
        except Exception as exc:  # noqa: BLE001 - the check itself failing is an answer, not a crash
            alive, detail = False, f"the health check failed: {exc!r}"
        else:
            alive, detail = verdict.alive, verdict.detail
        body = (detail + "\n").encode()
        status = "200 OK" if alive else "503 Service Unavailable"
        start_response(
            status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app


class MetricsPortUnavailable(RuntimeError):
    """The /metrics port cannot be listened on (taken by another process, say)."""


def serve(
    port: int,
    registry: CollectorRegistry = REGISTRY,
    health: HealthCheck | None = None,
    readiness: HealthCheck | None = None,
) -> None:
    """Start the /metrics (and, given ``health``, /healthz and /readyz) endpoint from a daemon thread (port
    0: none). MetricsPortUnavailable, saying which port and which setting, when the port cannot be listened
    on."""
    if port <= 0:
        return
    try:
        server = make_server(
            "0.0.0.0",
            port,
            metrics_app(registry, health, readiness),
            ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
    except OSError as exc:
        served = "/metrics, /healthz and /readyz" if health else "/metrics"
        raise MetricsPortUnavailable(
            f"cannot serve {served} on port {port}: {exc.strerror or exc}; set KUBECHAIN_METRICS_PORT "
            "to a free port (each process on a host needs its own), or 0 for none"
        ) from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on :%d/metrics%s", port, ", /healthz and /readyz" if health else "")
