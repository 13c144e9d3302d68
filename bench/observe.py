"""What the benchmark measures with: a timestamping watch, process samplers and a slow HTTP tool.

Everything here runs inside the benchmark process (threads), next to the system under test, and uses
wall-clock ``time.time()`` so that its timestamps compare with the scripted LLM server's request log
(``received_at`` / ``finished_at``, also ``time.time()`` on the same machine).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from kubechain.kube.client import KubeClient
from kubechain.kube.connection import load_connection
from kubechain.kube.errors import Gone, KubeAPIError

log = logging.getLogger("bench")

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def bench_kube(kubeconfig: str, timeout_s: float = 60.0) -> KubeClient:
    """A client without the per-process token bucket getting in the way (the bench is not the SUT)."""
    return KubeClient(
        load_connection(kubeconfig),
        qps=1e6,
        burst=1_000_000,
        timeout_s=timeout_s,
        component="kubechain-bench",
    )


# --------------------------------------------------------------------------------------------------
# Watch recorder
# --------------------------------------------------------------------------------------------------


@dataclass
class Sighting:
    t: float  # time.time() when the bench read the event
    rv: str
    phase: str
    event: str  # ADDED / MODIFIED / DELETED / LIST
    claimed_at: str | None = None  # status.claimedAt (written by the worker, microseconds)


@dataclass
class Timeline:
    name: str
    sightings: list[Sighting] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)  # the last object seen

    def first(self, phase: str, after: float | None = None) -> float | None:
        for s in self.sightings:
            if s.phase == phase and (after is None or s.t >= after):
                return s.t
        return None

    def distinct_rvs(self) -> int:
        return len({s.rv for s in self.sightings if s.event != "DELETED"})

    def phases(self) -> list[str]:
        """Phase sequence as seen (consecutive repeats collapsed)."""
        out: list[str] = []
        for s in self.sightings:
            if not out or out[-1] != s.phase:
                out.append(s.phase)
        return out

    @property
    def phase(self) -> str:
        return self.sightings[-1].phase if self.sightings else ""


class WatchFailed(RuntimeError):
    """The thread of a watch the bench records with ended on an error: what it waited for cannot be seen."""


class NamespaceWatch:
    """Watch one plural in one namespace on a thread, handing each event to ``on_event``. Resumes after
    the watch's server-side timeout; after 410 Gone, ``resync`` starts it over (tried again, like a
    watch, when it fails). An unexpected error ends the thread: ``failure`` holds it, and
    ``_failed`` tells whoever waits on the watch."""

    def __init__(self, kubeconfig: str, plural: str, namespace: str, watch_timeout_s: int = 60) -> None:
        self.kubeconfig = kubeconfig
        self.plural = plural
        self.namespace = namespace
        self.watch_timeout_s = watch_timeout_s
        self._stop = threading.Event()
        self._rv = ""
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.failure: BaseException | None = None

    @cached_property
    def kube(self) -> KubeClient:
        return bench_kube(self.kubeconfig)

    def on_event(self, event_type: str, obj: dict[str, Any], t: float) -> None:
        raise NotImplementedError

    def resync(self) -> None:
        """Where a watch starts without a resourceVersion: here, with the current objects as ADDED."""
        self._rv = ""

    def _failed(self) -> None:
        """The thread ended on ``failure``."""

    def _run(self) -> None:
        try:
            self._watch_until_stopped()
        except Exception as exc:  # noqa: BLE001 - kept for the waiter, which raises it
            if self._stop.is_set():
                return
            log.warning("watch %s in %s stopped: %r", self.plural, self.namespace, exc)
            self.failure = exc
            self._failed()

    def _watch_until_stopped(self) -> None:
        backoff = 0.1
        relist = False
        while not self._stop.is_set():
            try:
                if relist:
                    self.resync()
                    relist = False
                for event in self.kube.watch_raw(self.plural, self.namespace, self._rv, self.watch_timeout_s):
                    t = time.time()
                    if self._stop.is_set():
                        return
                    obj = event.get("object") or {}
                    if event.get("type") != "BOOKMARK":
                        self.on_event(str(event.get("type")), obj, t)
                    self._rv = str((obj.get("metadata") or {}).get("resourceVersion") or "") or self._rv
                    backoff = 0.1
            except Gone:
                relist = True  # (in the try above: a list that fails is tried again, after a back-off)
            except (KubeAPIError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                self.errors += 1
                log.debug("watch %s: %s", self.plural, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def start(self) -> Self:
        self.resync()
        self._thread = threading.Thread(target=self._run, name=f"bench-watch-{self.plural}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if "kube" in self.__dict__:
            self.kube.close()
        if self._thread is not None:
            # A blocked streaming read is not interrupted by close(); the (daemon) thread ends at the
            # next event or at the watch's server-side timeout and hands nothing on after _stop is set.
            self._thread.join(timeout=0.5)


class WatchRecorder(NamespaceWatch):
    """List-then-watch one plural in one namespace; record when each (object, resourceVersion) is first
    seen. Relists on 410 Gone."""

    def __init__(self, kubeconfig: str, plural: str, namespace: str, watch_timeout_s: int = 60) -> None:
        super().__init__(kubeconfig, plural, namespace, watch_timeout_s)
        self.timelines: dict[str, Timeline] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._changed_names: list[str] = []  # every sighting's name, in order: wait_for reads the new ones
        self._wake_on: frozenset[str] = frozenset()  # the phases wait_for waits for

    # -- recording ---------------------------------------------------------------------------------

    def on_event(self, event_type: str, obj: dict[str, Any], t: float) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        rv = str(meta.get("resourceVersion") or "")
        status = obj.get("status") or {}
        phase = str(status.get("phase") or "")
        claimed_at = status.get("claimedAt")
        with self.changed:
            timeline = self.timelines.setdefault(name, Timeline(name))
            if event_type != "DELETED" and any(s.rv == rv for s in timeline.sightings[-3:]):
                return
            timeline.sightings.append(Sighting(t, rv, phase, event_type, claimed_at))
            timeline.last = obj
            self._changed_names.append(name)
            if phase in self._wake_on:
                # Only sightings that can end a wait wake the waiter: waking it on each of the ~4 watch
                # events of every run cost the benchmark a fifth of its CPU.
                self.changed.notify_all()

    def _failed(self) -> None:
        with self.changed:
            self.changed.notify_all()  # wait_for raises it at once, not at its deadline

    def resync(self) -> None:
        # A list, synchronously from start(), so that everything created after start() is seen as an event.
        items, rv = self.kube.list_raw(self.plural, self.namespace)
        t = time.time()
        for item in items:
            self.on_event("LIST", item, t)
        self._rv = rv

    # -- queries -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Timeline]:
        with self.lock:
            return {name: Timeline(name, list(t.sightings), t.last) for name, t in self.timelines.items()}

    def wait_for(
        self,
        names: list[str],
        phases: Iterable[str],
        deadline: float,
        progress: Any = None,
        label: str = "",
        every_s: float = 5.0,
        check: Callable[[], None] | None = None,
    ) -> bool:
        """Wait until every name is in one of ``phases`` (True) or ``deadline`` (monotonic) passes;
        ``check`` is called at every wake-up (at least every 0.5 s) and may raise to end the wait.

        Each wake-up re-checks only the names whose timelines changed since the last one: checking all
        of them on every watch event was a third of the benchmark's CPU with 1,000 runs."""
        wanted = set(phases)
        next_report = time.monotonic() + every_s
        with self.changed:
            self._wake_on = frozenset(wanted)
            seen = len(self._changed_names)
            pending = {n for n in names if not (n in self.timelines and self.timelines[n].phase in wanted)}
        while True:
            if not pending:
                return True
            if self.failure is not None:
                raise WatchFailed(
                    f"the bench's watch of {self.plural} in {self.namespace} stopped: "
                    f"{type(self.failure).__name__}: {self.failure}"
                ) from self.failure
            if check is not None:
                check()
            now = time.monotonic()
            if now >= deadline:
                return False
            if progress is not None and now >= next_report:
                done = len(names) - len(pending)
                progress(f"{label}{done}/{len(names)} in {'/'.join(sorted(wanted))}")
                next_report = now + every_s
            with self.changed:
                self.changed.wait(timeout=min(0.5, max(0.01, deadline - now)))
                changed, seen = self._changed_names[seen:], len(self._changed_names)
                for name in set(changed) & pending:
                    if self.timelines[name].phase in wanted:
                        pending.discard(name)


class EventTally:
    """Counts the Events in one namespace when asked (``KubeClient.count_events``: one small request),
    to tell when the Events of a row's runs are all posted. A watch would instead deliver every Event to
    the benchmark (and make the API server send it) while the row's CPU window is open."""

    def __init__(self, count: Callable[[], int], poll_s: float = 0.05) -> None:
        self._count = count
        self.poll_s = poll_s
        self.before = 0

    @classmethod
    def of(cls, kube: KubeClient, namespace: str) -> EventTally:
        return cls(lambda: kube.count_events(namespace))

    def settle(self, deadline: float, quiet_s: float = 0.5) -> int:
        """Take the count the row's Events add to, once it has not changed for ``quiet_s`` (Events of
        warm-up runs may still be on their way)."""
        self.before, _ = self._poll(None, deadline, quiet_s)
        return self.before

    def wait(
        self,
        expected: int,
        deadline: float,
        quiet_s: float = 2.0,
        on_change: Callable[[], None] | None = None,
    ) -> float:
        """Until ``expected`` Events were added since ``settle``, none were added for ``quiet_s`` or
        ``deadline`` (monotonic) passes: the time (``time.time()``) the last addition was seen, late by
        at most ``poll_s`` plus one request. ``on_change`` is called at the first count and at each one
        that added Events (e.g. :meth:`CpuMeter.mark`: the window ends at the last, not ``quiet_s`` later)."""
        _, seen_at = self._poll(self.before + expected, deadline, quiet_s, on_change)
        return seen_at

    def _poll(
        self,
        target: int | None,
        deadline: float,
        quiet_s: float,
        on_change: Callable[[], None] | None = None,
    ) -> tuple[int, float]:
        count, seen_at = self._count(), time.time()
        if on_change is not None:
            on_change()
        while (target is None or count < target) and time.monotonic() < deadline:
            time.sleep(self.poll_s)
            latest = self._count()
            if latest != count:
                count, seen_at = latest, time.time()
                if on_change is not None:
                    on_change()
            elif time.time() - seen_at >= quiet_s:
                break
        return count, seen_at


# --------------------------------------------------------------------------------------------------
# /proc samplers
# --------------------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def children_map() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc/*/stat."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if not stat:
            continue
        try:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def with_descendants(pids: Iterable[int], children: dict[int, list[int]] | None = None) -> list[int]:
    children = children if children is not None else children_map()
    seen: list[int] = []
    stack = [p for p in pids if p]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack.extend(children.get(pid, []))
    return seen


def rss_kib(pid: int) -> int:
    status = _read(f"/proc/{pid}/status")
    if not status:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (its threads included, its children not)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    # after the comm: state(0) ppid(1) ... utime(11) stime(12)
    try:
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (IndexError, ValueError):
        return 0.0


class RssSampler:
    """Samples the summed VmRSS of some processes and all their descendants every ``interval_s``."""

    def __init__(self, pids: list[int], interval_s: float = 0.2) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (t, total KiB, process count)
        self.peak_per_pid: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        pids = with_descendants(self.pids)
        total = 0
        for pid in pids:
            kib = rss_kib(pid)
            total += kib
            self.peak_per_pid[pid] = max(self.peak_per_pid.get(pid, 0), kib)
        self.samples.append((time.time(), total, len(pids)))
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def peak_kib(self) -> int:
        return max((s[1] for s in self.samples), default=0)

    @property
    def first_kib(self) -> int:
        return self.samples[0][1] if self.samples else 0


def machine_busy_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy (all cores; /proc/stat: total - idle - iowait), and the
    part of it spent in interrupts (irq + softirq: e.g. loopback TCP, not charged to any process)."""
    line = (_read("/proc/stat") or "").splitlines()[0:1]
    if not line:
        return 0.0, 0.0
    values = [int(v) for v in line[0].split()[1:]] + [0] * 8
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    idle = values[3] + values[4]
    return (total - idle) / CLK_TCK, (values[5] + values[6]) / CLK_TCK


@dataclass
class _CpuReading:
    t: float  # time.monotonic()
    cpu: dict[str, float]  # CPU seconds of each group so far
    busy: float  # the machine's busy and interrupt seconds so far
    irq: float


class CpuMeter:
    """CPU seconds used by named groups of processes (with descendants) between start() and stop(),
    plus ``irq`` (interrupt handling, charged to no process) and ``others``: what the rest of the
    machine used meanwhile (other people's tests, say)."""

    def __init__(self, groups: dict[str, list[int]], shallow: Iterable[str] = ()) -> None:
        self.groups = groups
        self.shallow = set(shallow)  # groups measured without descendants (e.g. the bench itself)
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self._mark: _CpuReading | None = None
        self.result: dict[str, float] = {}
        self.wall_s = 0.0

    def _measure(self) -> dict[str, float]:
        children = children_map()
        out: dict[str, float] = {}
        for name, pids in self.groups.items():
            members = pids if name in self.shallow else with_descendants(pids, children)
            out[name] = sum(cpu_seconds(p) for p in members)
        return out

    def _read(self) -> _CpuReading:
        busy, irq = machine_busy_seconds()
        return _CpuReading(time.monotonic(), self._measure(), busy, irq)

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._start = self._measure()
        self._busy0, self._irq0 = machine_busy_seconds()
        self._mark = None
        return self

    def mark(self) -> None:
        """Read the counters now, for ``stop(at_mark=True)`` to end the window here: when what the
        window waits for was last seen to happen, not when the bench stopped waiting for more."""
        self._mark = self._read()

    def stop(self, at_mark: bool = False) -> dict[str, float]:
        """The CPU seconds of the window, ending now or (``at_mark``) at the last :meth:`mark`."""
        reading = self._mark if (at_mark and self._mark is not None) else self._read()
        end = reading.cpu
        busy, irq = reading.busy - self._busy0, reading.irq - self._irq0
        self.wall_s = reading.t - self._t0
        self.result = {name: round(max(0.0, end[name] - self._start.get(name, 0.0)), 2) for name in end}
        self.result["others"] = round(max(0.0, busy - irq - sum(self.result.values())), 2)
        self.result["irq"] = round(irq, 2)
        self.result["machine"] = round(busy, 2)
        return self.result


# --------------------------------------------------------------------------------------------------
# A slow HTTP "tool"
# --------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # 50+ tool calls may connect at once


class SleepServer:
    """A threaded HTTP server that answers every request after ``sleep_s`` (an externalAPI tool target)."""

    def __init__(self, sleep_s: float = 1.0) -> None:
        self.sleep_s = sleep_s
        self.lock = threading.Lock()
        self.records: list[tuple[float, float]] = []  # (arrived, answered)
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                arrived = time.time()
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                time.sleep(server.sleep_s)
                payload = json.dumps(
                    {"slept": server.sleep_s, "echo": body.decode("utf-8", "replace")}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                with server.lock:
                    server.in_flight -= 1
                    server.records.append((arrived, time.time()))

            do_GET = do_POST  # noqa: N815

            def log_message(self, *_: Any) -> None:
                pass

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/sleep"

    def start(self) -> SleepServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="bench-sleep", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# --------------------------------------------------------------------------------------------------
# kube-apiserver request counters
# --------------------------------------------------------------------------------------------------

_REQUEST_TOTAL = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")
_ETCD_TOTAL = re.compile(r"^etcd_request_duration_seconds_count\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
# Keys of the API server's own requests to etcd (a status write whose cached copy was stale reads the
# object from etcd again: "etcd get taskruns" per run shows how often that happened).
ETCD_PREFIX = "etcd "


def parse_request_totals(metrics: str) -> Counter[str]:
    """``apiserver_request_total`` as {"VERB resource[/subresource][ CODE]": count}; the code is only
    part of the key when it is not 2xx (409 = a lost conditional write). The API server's own requests to
    etcd are in it too, as {"etcd OPERATION resource": count} (``etcd_request_duration_seconds_count``)."""
    out: Counter[str] = Counter()
    for line in metrics.splitlines():
        etcd = line.startswith("etcd_request_duration_seconds_count{")
        if not etcd and not line.startswith("apiserver_request_total{"):
            continue
        match = (_ETCD_TOTAL if etcd else _REQUEST_TOTAL).match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match.group("labels")))
        value = int(float(match.group("value")))
        if etcd:
            kind = (labels.get("type") or "?").split(".")[0]
            out[f"{ETCD_PREFIX}{labels.get('operation', '?')} {kind}"] += value
            continue
        resource = labels.get("resource") or ""
        if not resource:
            continue  # /readyz, /metrics, ...
        sub = labels.get("subresource") or ""
        key = f"{labels.get('verb', '?')} {resource}{'/' + sub if sub else ''}"
        code = labels.get("code", "")
        if code and not code.startswith("2"):
            key += f" {code}"
        out[key] += value
    return out


def api_request_totals(cp: Any) -> Counter[str] | None:
    try:
        status, body = cp.request("/metrics", timeout=30)
    except Exception:  # noqa: BLE001 - diagnostics are best effort
        return None
    if status != 200:
        return None
    return parse_request_totals(body.decode("utf-8", "replace"))


def requests_per_run(
    before: Counter[str] | None, after: Counter[str] | None, runs: int, bench_creates: int
) -> dict[str, Any] | None:
    """Per-run API requests during a window, without watches and without the bench's own creates."""
    if before is None or after is None or runs <= 0:
        return None
    diff = Counter({k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0})
    diff["POST taskruns"] -= bench_creates
    etcd = {k[len(ETCD_PREFIX) :]: v for k, v in diff.most_common() if k.startswith(ETCD_PREFIX)}
    diff = Counter({k: v for k, v in diff.items() if v > 0 and not k.startswith(("WATCH ", ETCD_PREFIX))})
    total = sum(diff.values())
    return {
        "total": round(total / runs, 2),
        "conflicts_409": round(sum(v for k, v in diff.items() if k.endswith(" 409")) / runs, 2),
        "by_request": {k: round(v / runs, 2) for k, v in diff.most_common()},
        # absolute counts of the answers that were not 2xx (a rare 504 matters, and rounds to 0 per run)
        "errors": {k: v for k, v in diff.most_common() if k[-3:].isdigit()},
        # the API server's requests to etcd, by operation and resource (creates of the bench's runs included)
        "etcd_by_request": {k: round(v / runs, 2) for k, v in etcd.items()},
    }
