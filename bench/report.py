"""Pure helpers of the benchmark: statistics, machine/version facts, and the result table."""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default "linear" method); None for no values."""
    data = sorted(float(v) for v in values if v is not None and not math.isnan(float(v)))
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if len(data) == 1:
        return data[0]
    rank = (len(data) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return data[low]
    return data[low] + (data[high] - data[low]) * (rank - low)


def summarize(values: Iterable[float | None], scale: float = 1.0, digits: int = 1) -> dict[str, Any]:
    """n, mean, min, p50, p95, p99, max of ``values`` (times ``scale``, e.g. 1000 for s -> ms)."""
    data = [float(v) * scale for v in values if v is not None]
    if not data:
        return {"n": 0, "mean": None, "min": None, "p50": None, "p95": None, "p99": None, "max": None}

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return {
        "n": len(data),
        "mean": r(sum(data) / len(data)),
        "min": r(min(data)),
        "p50": r(percentile(data, 50)),
        "p95": r(percentile(data, 95)),
        "p99": r(percentile(data, 99)),
        "max": r(max(data)),
    }


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The largest number of intervals (start, end) open at the same instant."""
    points: list[tuple[float, int]] = []
    for start, end in intervals:
        points.append((start, 1))
        points.append((end, -1))
    points.sort(key=lambda p: (p[0], p[1]))  # an end before a start at the same instant
    best = current = 0
    for _, delta in points:
        current += delta
        best = max(best, current)
    return best


def write_target(
    baseline_writes_per_s: float | None, writes_per_run: float | None, share: float = 0.5
) -> float | None:
    """Runs/s the design should reach: ``share`` of the API server's status-write rate spent on the
    status writes one run needs."""
    if not baseline_writes_per_s or not writes_per_run:
        return None
    return share * baseline_writes_per_s / writes_per_run


# The Go original's three: Initializing, ReadyForLLM, FinalAnswer; KubeChain's, for a run whose turn goes
# through the queue: ReadyForLLM (the context window), the LLM claim, FinalAnswer (with the hand-off, the
# first two are one write). The hello target divides by this, fixed: measured, a version that wrote more
# would lower its own bar, and one that writes less should gain by it.
STATUS_WRITES_A_RUN_NEEDS = 3


def keep_rows_on_interrupt(exc: BaseException, rows: Sequence[dict[str, Any]]) -> None:
    """Put ``rows``, measured before ``exc`` (a Ctrl-C) stopped the scenario measuring them, on the
    exception, for :func:`rows_kept_on` to report: an interrupted run still saves what it measured."""
    setattr(exc, "bench_rows", [*rows, *rows_kept_on(exc)])  # noqa: B010 - an attribute of our own


def rows_kept_on(exc: BaseException) -> list[dict[str, Any]]:
    return list(getattr(exc, "bench_rows", []))


def new_row(
    scenario: str, label: str, workers: int | None, pool: str | None, concurrency: int | None, n: int | None
) -> dict[str, Any]:
    """A result row with every key the JSON and the table read (an error row too)."""
    return {
        "scenario": scenario,
        "label": label,
        "workers": workers,
        "pool": pool,
        "concurrency": concurrency,
        "n": n,
        "figures": {},
        "cpu_s": {},
        "cpu_wall_s": None,
        "timed_out": False,
        "error": None,
    }


def error_row(
    scenario: str,
    label: str,
    error: BaseException,
    workers: int | None = None,
    pool: str | None = None,
    concurrency: int | None = None,
    n: int | None = None,
) -> dict[str, Any]:
    """The row of a configuration whose measurement raised."""
    row = new_row(scenario, label, workers, pool, concurrency, n)
    row["error"] = f"{type(error).__name__}: {error}"
    return row


# The scale target: throughput grows with workers until the API server is the limit. A step (a row with
# more workers than the one before it in its series) met it when its throughput grew by the margin, or
# when it could not: the machine was already saturated — its CPU (all cores; the API server shares them
# with everything else) at least SATURATED_BUSY_PCT busy in the previous row's window.
SCALE_GROWTH_MARGIN = 0.10
SATURATED_BUSY_PCT = 90.0
# The hello verdict's figures, which do not apply to a scale row (judged by judge_scale instead).
HELLO_VERDICT_FIGURES = (
    "target_runs_per_s",
    "target_runs_per_s_by_measured_writes",
    "meets_target",
    "ratio",
    "ratio_by_measured_writes",
)


def _judged_rate(row: dict[str, Any]) -> float | None:
    """A row's throughput (with Events), or None when it has none to compare: an error, or runs that
    failed or never finished."""
    f = row.get("figures") or {}
    if row.get("error") or f.get("failed") or (f.get("n") is not None and f.get("completed") != f.get("n")):
        return None
    rate = f.get("runs_per_s_incl_events") or f.get("runs_per_s")
    return float(rate) if rate else None


def judge_scale(rows: Sequence[dict[str, Any]], ncpu: int | None) -> None:
    """Judge the scale rows on the scale target, in place: each row of a series (one thread count) gets
    ``scale_step`` against the row with the next fewer workers, the last of a series ``scale_series``
    (met when every step judged met it), and the hello verdict's figures are dropped from them."""
    series: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(row.get("concurrency"), []).append(row)
    for threads, members in series.items():
        members = sorted(members, key=lambda r: r.get("workers") or 0)
        verdicts: list[bool] = []
        for index, row in enumerate(members):
            f = row.setdefault("figures", {})
            for key in HELLO_VERDICT_FIGURES:
                f.pop(key, None)
            if index == 0:
                f["scale_step"] = {"reference": True}
                continue
            before = members[index - 1]
            rate, rate_before = _judged_rate(row), _judged_rate(before)
            busy = _busy_pct(before, ncpu)
            step: dict[str, Any] = {
                "vs_workers": before.get("workers"),
                "vs_runs_per_s": rate_before,
                "busy_pct_before": round(busy, 1) if busy is not None else None,
                "growth": round(rate / rate_before - 1, 3) if rate is not None and rate_before else None,
            }
            if rate_before is None:
                step["verdict"], step["meets_target"] = None, None  # nothing to compare with
            elif rate is None:
                step["verdict"], step["meets_target"] = "MISSED", False
            elif step["growth"] >= SCALE_GROWTH_MARGIN:
                step["verdict"], step["meets_target"] = "grew", True
            elif busy is not None and busy >= SATURATED_BUSY_PCT:
                step["verdict"], step["meets_target"] = "saturated", True
            else:
                step["verdict"], step["meets_target"] = "MISSED", False
            if step["meets_target"] is not None:
                verdicts.append(step["meets_target"])
            f["scale_step"] = step
        if len(members) > 1:
            members[-1]["figures"]["scale_series"] = {
                "threads": threads,
                "meets_target": bool(verdicts) and all(verdicts),
            }


def round_summary(rows: Sequence[dict[str, Any]], label: str) -> dict[str, Any] | None:
    """The median over repeated rounds of one throughput row (``label``, e.g. "hello").

    Each round's throughput is judged against the baselines measured just before and just after it (their
    mean, when the round has both: the baseline drifts within a run, mostly downwards, and the one before
    alone would set every round's bar by the machine as it was earlier), so a machine that is busier in one
    round than another moves both figures together; the verdict is on the median of those per-round
    ratios. A round whose row of ``label`` is an error (the row raised: a worker or operator exited, the
    Agent was never Ready, a time limit) or in which runs failed or never finished delivered none of the
    target: it counts as a ratio of 0 (``counted_as_0`` says why), never left out of the median."""
    baselines = {
        row["round"]: (row.get("figures") or {}).get("writes_per_s")
        for row in rows
        if row.get("scenario") == "baseline" and not row.get("error") and row.get("round") is not None
    }
    rounds = []
    for row in rows:
        f = row.get("figures") or {}
        if row.get("label") != label or row.get("round") is None:
            continue
        rate = f.get("runs_per_s_incl_events") or f.get("runs_per_s")
        target = f.get("target_runs_per_s")
        before, after = baselines.get(row["round"]), baselines.get(row["round"] + 1)
        bracket = (before + after) / 2 if before and after else None
        if bracket is not None:
            target = write_target(bracket, STATUS_WRITES_A_RUN_NEEDS)
        counted_as_0 = None
        if row.get("error"):
            counted_as_0 = "error"
        elif f.get("n") is not None and (f.get("completed") != f.get("n") or f.get("failed")):
            counted_as_0 = "unfinished runs"
        ratio = round(rate / target, 3) if rate is not None and target else None
        # the same against the status writes this round's runs were measured to make (shown, not judged)
        writes = f.get("status_writes_per_run")
        measured = write_target(bracket or f.get("baseline_writes_per_s"), writes)
        ratio_measured = round(rate / measured, 3) if rate is not None and measured else None
        entry = {
            "round": row["round"],
            "baseline_writes_per_s": round(bracket, 1) if bracket else f.get("baseline_writes_per_s"),
            "baseline_before_after": [before, after] if bracket else None,
            "runs_per_s": f.get("runs_per_s"),
            "runs_per_s_incl_events": f.get("runs_per_s_incl_events"),
            "target_runs_per_s": round(target, 2) if target else target,
            # a round that delivered none of the target counts as 0, whatever the baseline was
            "ratio": 0.0 if counted_as_0 else ratio,
            "status_writes_per_run": writes,
            "ratio_by_measured_writes": 0.0 if counted_as_0 else ratio_measured,
        }
        if counted_as_0:
            entry["counted_as_0"] = counted_as_0
        rounds.append(entry)
    if len(rounds) < 2:
        return None

    def median(key: str) -> float | None:
        value = percentile([r[key] for r in rounds if r[key] is not None], 50)
        return round(value, 3 if key.startswith("ratio") else 1) if value is not None else None

    ratio = median("ratio")
    first = next(r for r in rows if r.get("label") == label)
    return {
        "scenario": "summary",
        "label": f"{label} (median)",
        "workers": first.get("workers"),
        "pool": first.get("pool"),
        "concurrency": first.get("concurrency"),
        "n": first.get("n"),
        "figures": {
            "of": label,
            "rounds": rounds,
            "baseline_writes_per_s": median("baseline_writes_per_s"),
            "runs_per_s": median("runs_per_s"),
            "runs_per_s_incl_events": median("runs_per_s_incl_events"),
            "target_runs_per_s": median("target_runs_per_s"),
            "ratio": ratio,
            "meets_target": ratio >= 1.0 if ratio is not None else None,
            # the verdict divides by the 3 status writes a run needs; this, by those measured
            "status_writes_per_run": median("status_writes_per_run"),
            "ratio_by_measured_writes": median("ratio_by_measured_writes"),
        },
        "cpu_s": {},
        "cpu_wall_s": None,
        "timed_out": False,
        "error": None,
    }


def judge_rounds_as_summarised(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Each round's row, judged as the median judged it: between the baselines either side of it. A row
    is judged when it is measured, before the baseline after it exists; left so, its verdict and ratio
    disagreed with the same round's in the median's list."""
    label = summary["figures"]["of"]
    by_round = {entry["round"]: entry for entry in summary["figures"]["rounds"]}
    for row in rows:
        entry = by_round.get(row.get("round")) if row.get("label") == label else None
        if entry is None or not entry.get("baseline_before_after") or row.get("error"):
            continue
        f = row.setdefault("figures", {})
        f["baseline_writes_per_s"] = entry["baseline_writes_per_s"]
        f["baseline_before_after"] = entry["baseline_before_after"]
        f["target_runs_per_s"] = entry["target_runs_per_s"]
        f["ratio"] = entry["ratio"]
        f["ratio_by_measured_writes"] = entry["ratio_by_measured_writes"]
        f["meets_target"] = (
            not entry.get("counted_as_0") and entry["ratio"] is not None and entry["ratio"] >= 1.0
        )


# --------------------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def usable_cpus() -> int:
    """The cores this process may run on (``nproc``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 0


def machine_info() -> dict[str, Any]:
    cpuinfo = _read("/proc/cpuinfo")
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), ""
    )
    meminfo = _read("/proc/meminfo")
    mem_kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
    os_release = _read("/etc/os-release")
    pretty = next(
        (
            line.split("=", 1)[1].strip('"')
            for line in os_release.splitlines()
            if line.startswith("PRETTY_NAME=")
        ),
        "",
    )
    return {
        "nproc": usable_cpus(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": pretty,
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def redis_server_version(binary: str = "redis-server") -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else (out.strip() or None)


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    """``value`` formatted with ``spec`` (+ suffix), or "-" when it is missing."""
    if value is None:
        return "-"
    try:
        return f"{value:{spec}}{suffix}"
    except (TypeError, ValueError):
        return f"{value}{suffix}"


def _pcts(stats: dict[str, Any] | None, unit: str = "ms", spec: str = ".0f") -> str:
    stats = stats or {}
    return f"{fmt(stats.get('p50'), spec)}/{fmt(stats.get('p95'), spec)}/{fmt(stats.get('p99'), spec)} {unit}"


# Figures that are not measurements: a row (an error's) holding only these measured nothing.
_SET_UP_FIGURES = frozenset(
    {"namespace", "operator_command", "apiserver_profile", "scale_step", "scale_series"}
)


def headline(row: dict[str, Any]) -> str:
    f = row.get("figures") or {}
    scenario = row.get("scenario")
    if row.get("error") and not set(f) - _SET_UP_FIGURES:
        return "ERROR"
    if scenario == "baseline":
        return f"{fmt(f.get('writes_per_s'), '.0f')} writes/s"
    if scenario == "summary":
        return (
            f"{fmt(f.get('runs_per_s'), '.1f')} runs/s ({fmt(f.get('runs_per_s_incl_events'), '.1f')} with Events)"
            f" = {fmt(f.get('ratio'), '.2f')} × target{_ratios_by_writes(f, with_fixed=False)}"
        )
    if scenario in ("hello", "scale"):
        drained = f.get("runs_per_s_incl_events")
        suffix = f" ({fmt(drained, '.1f')} with Events)" if drained is not None else ""
        return f"{fmt(f.get('runs_per_s'), '.1f')} runs/s{suffix}"
    if scenario == "light":
        return (
            f"p50 {fmt((f.get('ready_to_llm_ms') or {}).get('p50'), '.0f')}"
            f"/{fmt((f.get('answer_to_next_ms') or {}).get('p50'), '.0f')} ms"
        )
    if scenario == "fanout":
        verdict = {True: "met", False: "MISSED", None: "-"}[f.get("meets_target")]
        return (
            f"{fmt(f.get('wall_s'), '.2f')} s (ideal {fmt(f.get('ideal_s'), '.1f')} s); LLM answer → next "
            f"request {fmt(f.get('turn_wall_s'), '.2f')} s (target < {fmt(f.get('target_s'), '.0f')} s: {verdict})"
        )
    if scenario == "inflight":
        if f.get("held_until_in_flight"):
            verdict = {True: "met", False: "MISSED", None: "-"}[f.get("meets_memory_target")]
            return (
                f"peak RSS {fmt(f.get('rss_peak_mib'), '.0f')} MiB with {fmt(f.get('max_concurrent_llm'))} "
                f"LLM calls held at once (target < 1 GiB with all {fmt(f.get('held_until_in_flight'))}: {verdict})"
            )
        return (
            f"{fmt(f.get('wall_s'), '.1f')} s (ideal {fmt(f.get('ideal_s'), '.1f')} s); "
            f"peak RSS {fmt(f.get('rss_peak_mib'), '.0f')} MiB"
        )
    return "-"


def apiserver_profile_summary(f: dict[str, Any]) -> str | None:
    """Where the API server's CPU went in the row's window (``--apiserver-profile``)."""
    profile = f.get("apiserver_profile") or {}
    if profile.get("error"):
        return f"API server profile: {profile['error']}"
    shares = profile.get("cpu_shares_pct") or {}
    if not shares:
        return None
    return "API server CPU: " + ", ".join(f"{name} {pct:.0f} %" for name, pct in shares.items())


def _scale_verdict(f: dict[str, Any]) -> list[str]:
    """A scale row's step against the one with fewer workers, and its series' verdict."""
    parts: list[str] = []
    step = f.get("scale_step") or {}
    if step.get("reference"):
        parts.append("first of its series: the reference")
    elif step:
        growth = step.get("growth")
        text = f"vs {fmt(step.get('vs_workers'))} worker(s): " + (
            f"{100 * growth:+.0f} %" if growth is not None else "no throughput"
        )
        if step.get("verdict") in ("saturated", "MISSED") and step.get("busy_pct_before") is not None:
            text += f", machine {step['busy_pct_before']:.0f} % busy with {fmt(step.get('vs_workers'))}"
        verdict = {"grew": "grew: met", "saturated": "saturated: met", "MISSED": "MISSED"}.get(
            step.get("verdict") or "", "not judged"
        )
        parts.append(f"{text} ({verdict})")
    series = f.get("scale_series")
    if series:
        verdict = "met" if series.get("meets_target") else "MISSED"
        parts.append(f"scale target (threads × {fmt(series.get('threads'))}): {verdict}")
    return parts


def _ratios_by_writes(f: dict[str, Any], with_fixed: bool = True) -> str:
    """The ratio judged (the baseline ÷ the 3 status writes a run needs) and beside it the ratio against
    the status writes measured, e.g. "; 1.19 × (÷3 writes); 0.79 × (÷ measured 2.0)"."""
    out = ""
    if with_fixed and f.get("ratio") is not None:
        out += f"; {fmt(f['ratio'], '.2f')} × (÷{STATUS_WRITES_A_RUN_NEEDS} writes)"
    elif not with_fixed and f.get("ratio") is not None:
        out += f" (÷{STATUS_WRITES_A_RUN_NEEDS} writes)"
    if f.get("ratio_by_measured_writes") is not None:
        out += (
            f"; {fmt(f['ratio_by_measured_writes'], '.2f')} × "
            f"(÷ measured {fmt(f.get('status_writes_per_run'), '.1f')})"
        )
    return out


def _ready_to_llm(f: dict[str, Any], label: str = "") -> str:
    """ready→LLM, saying what "ready" was (it differs between operators, see bench/README) and how many
    were negative (the watch saw ReadyForLLM after the request)."""
    sources = f.get("ready_from") or {}
    ready = f" (ready = {' / '.join(sources)})" if sources else ""
    negative = f.get("ready_to_llm_negative") or 0
    spec = ".1f" if negative else ".0f"  # -0.2 ms would round to "-0"
    text = f"ready→LLM{ready} {label}{_pcts(f.get('ready_to_llm_ms'), spec=spec)}"
    return f"{text}, {negative} negative (watch lag)" if negative else text


def _round_cell(r: dict[str, Any]) -> str:
    """One round of a median row: its throughput against its target, or why it counted as 0."""
    if r.get("counted_as_0") == "error":
        return f"round {fmt(r.get('round'))} error (0)"
    cell = f"{fmt(r.get('runs_per_s_incl_events'), '.1f')} vs ≥ {fmt(r.get('target_runs_per_s'), '.1f')}"
    return f"{cell} ({r['counted_as_0']}: 0)" if r.get("counted_as_0") else cell


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line of the table (an error's log tail has several), cut at ``limit``."""
    flat = " | ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def details(row: dict[str, Any]) -> str:
    f = row.get("figures") or {}
    scenario = row.get("scenario")
    if row.get("error") and not set(f) - _SET_UP_FIGURES:
        # nothing was measured: the scenario's figures would all be "-"
        return "; ".join([f"error: {one_line(row['error'])}", *_scale_verdict(f)])
    parts: list[str] = []
    if scenario == "baseline":
        parts.append(
            f"{fmt(f.get('writes'))} writes by {fmt(f.get('threads'))} threads in {fmt(f.get('wall_s'), '.1f')} s"
        )
        parts.append(f"latency p50/p95/p99 {_pcts(f.get('latency_ms'), spec='.1f')}")
        if f.get("conflicts"):
            parts.append(f"{f['conflicts']} conflicts")
        if f.get("objects"):
            parts.append(f"{fmt(f['objects'])} objects, a run's 3 statuses in turn")
        if f.get("cpu_ms_per_event") is not None and f.get("cpu_ms_per_write"):
            if "machine_cpu_ms_per_write" in f:
                parts.append(
                    f"CPU (API server, etcd, kcm, bench) per status write {fmt(f['cpu_ms_per_write'], '.1f')} ms, "
                    f"per Event {fmt(f['cpu_ms_per_event'], '.1f')} ms ({fmt(f.get('event_posts_per_s'), '.0f')} "
                    f"Events/s); whole machine {fmt(f['machine_cpu_ms_per_write'], '.1f')} / "
                    f"{fmt(f.get('machine_cpu_ms_per_event'), '.1f')} ms"
                )
            else:  # results from before: the whole machine's, other processes included
                parts.append(
                    f"machine CPU per status write {fmt(f['cpu_ms_per_write'], '.1f')} ms, per Event "
                    f"{fmt(f['cpu_ms_per_event'], '.1f')} ms ({fmt(f.get('event_posts_per_s'), '.0f')} Events/s)"
                )
        if f.get("earlier_method_writes_per_s") is not None:
            earlier = fmt(f["earlier_method_writes_per_s"], ".0f")
            parts.append(f"earlier method (minimal status, 1 object/thread): {earlier} writes/s")
    elif scenario in ("hello", "scale"):
        parts.append(f"{fmt(f.get('completed'))}/{fmt(row.get('n'))} done in {fmt(f.get('wall_s'), '.1f')} s")
        if f.get("create_to_llm_ms") is not None:  # (not in results from before it was measured)
            parts.append(f"create→LLM {_pcts(f.get('create_to_llm_ms'))}")
        parts.append(_ready_to_llm(f))
        parts.append(f"answer→next phase {_pcts(f.get('answer_to_next_ms'))}")
        parts.append(
            f"writes/run {fmt(f.get('writes_per_run'), '.1f')} (1 create + {fmt(f.get('status_writes_per_run'), '.1f')}"
            f" status; +{fmt(f.get('events_per_run'), '.1f')} events)"
        )
        api = f.get("api_requests_per_run") or {}
        if api:
            parts.append(f"API requests/run {fmt(api.get('total'), '.1f')}")
            # a status write that met a stale watch-cache copy re-reads the object from etcd
            stale = (api.get("etcd_by_request") or {}).get("get taskruns")
            if stale is not None:
                parts.append(f"etcd re-reads/run {fmt(stale, '.2f')}")
        cpu = f.get("cpu_ms_per_run") or {}
        if cpu:
            parts.append(
                f"CPU/run workers {fmt(cpu.get('workers'), '.0f')} ms, apiserver {fmt(cpu.get('kube-apiserver'), '.0f')} ms"
            )
        parts += _scale_verdict(f)
        target = f.get("target_runs_per_s") if scenario == "hello" else None  # scale: judge_scale's
        if target is not None:
            verdict = "met" if f.get("meets_target") else "MISSED"
            judged = " (with Events)" if f.get("runs_per_s_incl_events") is not None else ""
            ratios = _ratios_by_writes(f).removeprefix("; ")
            parts.append(f"target ≥ {target:.1f} runs/s{judged}: {verdict}{f' ({ratios})' if ratios else ''}")
        if f.get("duplicate_llm_requests"):
            parts.append(f"{f['duplicate_llm_requests']} duplicate LLM requests")
    elif scenario == "summary":
        rounds = f.get("rounds") or []
        parts.append(
            f"median of {len(rounds)} rounds, each judged against "
            + (
                "the mean of the baselines before and after it: "
                if all(r.get("baseline_before_after") for r in rounds)
                else "the baseline just before it: "
            )
            + ", ".join(_round_cell(r) for r in rounds)
        )
        if f.get("meets_target") is not None:
            parts.append(f"target (median ratio ≥ 1): {'met' if f['meets_target'] else 'MISSED'}")
    elif scenario == "light":
        parts.append(f"{fmt(f.get('completed'))}/{fmt(row.get('n'))} runs one at a time")
        if f.get("create_to_llm_ms") is not None:
            parts.append(f"create→LLM {_pcts(f.get('create_to_llm_ms'))}")
        parts.append(_ready_to_llm(f, "p50/p95/p99 "))
        parts.append(f"answer→next phase {_pcts(f.get('answer_to_next_ms'))}")
        if f.get("meets_overhead_target") is not None:
            verdict = "met" if f["meets_overhead_target"] else "MISSED"
            parts.append(
                f"target p50 < {fmt(f.get('target_p50_ms'), '.0f')} ms, "
                f"p99 < {fmt(f.get('target_p99_ms'), '.0f')} ms: {verdict}"
            )
    elif scenario == "fanout":
        parts.append(f"{fmt(f.get('tool_calls'))} tool calls × {fmt(f.get('tool_s'), '.0f')} s")
        trials = f.get("trials_wall_s")
        if trials:
            parts.append("trials " + ", ".join(f"{t:.2f}" for t in trials) + " s")
        parts.append(f"last TRTC created +{fmt(f.get('last_toolcall_created_s'), '.2f')} s")
        parts.append(
            f"first/last tool request +{fmt(f.get('first_tool_request_s'), '.2f')}/+{fmt(f.get('last_tool_request_s'), '.2f')} s"
        )
        parts.append(f"max concurrent tools {fmt(f.get('max_concurrent_tools'))}")
        parts.append(f"fan-in lag {fmt(f.get('fan_in_lag_s'), '.2f')} s")
        api = f.get("api_requests") or {}
        if api:
            parts.append(
                f"API requests {fmt(api.get('total'), '.0f')} ({fmt(api.get('conflicts_409'), '.0f')} answered 409)"
            )
        parts.append(f"run minus LLM {fmt(f.get('run_minus_llm_s'), '.2f')} s")
    elif scenario == "inflight":
        parts.append(
            f"{fmt(f.get('completed'))}/{fmt(row.get('n'))} done, 99% by {fmt(f.get('wall_99_s'), '.1f')} s"
        )
        parts.append(f"creates took {fmt(f.get('create_s'), '.1f')} s")
        parts.append(f"max concurrent LLM requests {fmt(f.get('max_concurrent_llm'))}")
        parts.append(f"run latency p50/p95/p99 {_pcts(f.get('run_latency_s'), 's', '.1f')}")
        parts.append(f"write floor {fmt(f.get('write_floor_s'), '.1f')} s")
        api = f.get("api_requests_per_run") or {}
        if api:
            parts.append(f"API requests/run {fmt(api.get('total'), '.1f')}")
        parts.append(
            f"RSS idle {fmt(f.get('rss_idle_mib'), '.0f')} MiB, +{fmt(f.get('rss_per_run_kib'), '.0f')} KiB/run"
        )
    stragglers = [s for s in f.get("stragglers") or [] if s.get("name")]
    if stragglers:
        worst = stragglers[0]
        wait = worst.get("longest_wait") or {}
        parts.append(
            f"{len(stragglers)} straggler(s), worst {fmt(worst.get('latency_s'), '.0f')} s "
            f"(waited {fmt(wait.get('s'), '.0f')} s in {wait.get('phase') or '?'})"
        )
    api = f.get("api_requests_per_run") or f.get("api_requests") or {}
    errors = {k: v for k, v in (api.get("errors") or {}).items() if not k.endswith(" 409")}
    if errors:
        parts.append("API errors " + ", ".join(f"{k} ×{v}" for k, v in errors.items()))
    profile = apiserver_profile_summary(f)
    if profile:
        parts.append(profile)
    if f.get("failed"):
        parts.append(f"{f['failed']} FAILED")
    if row.get("timed_out"):
        parts.append("TIMED OUT")
    if row.get("error"):
        parts.append(f"error: {one_line(row['error'])}")
    return "; ".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = (
        [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
        if rows
        else [len(h) for h in header]
    )

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def machine_line(result: dict[str, Any]) -> str:
    m = result.get("machine") or {}
    v = result.get("versions") or {}
    return (
        f"machine: {fmt(m.get('nproc'))} CPU × {m.get('cpu_model') or '?'}, {fmt(m.get('ram_gib'))} GiB RAM, "
        f"Linux {m.get('kernel') or '?'}, Python {m.get('python') or '?'} | kubechain {v.get('kubechain') or '?'}, "
        f"kube-apiserver {v.get('kube-apiserver') or '?'}, etcd {v.get('etcd') or '?'}, celery {v.get('celery') or '?'}, "
        f"redis-server {v.get('redis-server') or '?'}"
    )


OVERHEAD_LEGEND = (
    "create→LLM: the run's create seen by the bench's watch → its first LLM request received (the same "
    "events whatever the operator: compare rows with it);",
    'ready→LLM: the turn ready → its LLM request; ready = "ReadyForLLM seen": when the bench\'s watch saw '
    'ReadyForLLM (late by the watch\'s lag, so it can be negative), "claimedAt": the claim time a worker '
    "wrote for a turn it claimed in the write that made it ready (KubeChain's hello runs: never ReadyForLLM);",
    "answer→next phase: the LLM's answer sent → the next phase seen by the bench's watch (p50/p95/p99).",
)


CPU_COLUMNS = (
    "kube-apiserver",
    "etcd",
    "kcm",
    "redis",
    "llm",
    "watcher",
    "workers",
    "bench",
    "irq",
    "others",
)


def _busy_pct(row: dict[str, Any], ncpu: int | None) -> float | None:
    """How much of the machine's CPU the measured window used (100 % = every core busy): where it is
    ~100 %, throughput is bounded by the cores, not by the worker count."""
    machine, wall = (row.get("cpu_s") or {}).get("machine"), row.get("cpu_wall_s")
    if machine is None or not wall or not ncpu:
        return None
    return 100.0 * machine / (wall * ncpu)


def _row_name(row: dict[str, Any]) -> str:
    name = str(row.get("label") or row.get("scenario") or "?")
    return f"{name} #{row['round']}" if row.get("round") else name


def render_table(result: dict[str, Any]) -> str:
    """The human-readable report: machine line, command, the results table and a CPU table."""
    rows = result.get("rows") or []
    lines = [machine_line(result), f"command: {result.get('command') or '?'}", ""]
    if result.get("interrupted"):
        lines[-1:] = [
            f"INTERRUPTED ({result['interrupted']}): the rows below are those measured before it; "
            "the rest of the run was not measured",
            "",
        ]
    body = []
    ncpu = (result.get("machine") or {}).get("nproc")
    for row in rows:
        busy_pct = _busy_pct(row, ncpu)
        body.append(
            [
                _row_name(row),
                fmt(row.get("workers")),
                str(row.get("pool") or "-"),
                fmt(row.get("concurrency")),
                fmt(row.get("n")),
                headline(row),
                details(row) + (f"; machine CPU {busy_pct:.0f}% busy" if busy_pct is not None else ""),
            ]
        )
    lines += _table(["scenario", "workers", "pool", "conc", "n", "result", "details"], body)
    if any(row.get("scenario") in ("hello", "scale", "light") for row in rows):
        lines += ["", *OVERHEAD_LEGEND]
    cpu_rows = []
    for row in rows:
        cpu = row.get("cpu_s") or {}
        wall = row.get("cpu_wall_s")
        if not cpu or not wall:
            continue
        cells = [_row_name(row), f"{wall:.1f}"]
        for name in CPU_COLUMNS:
            value = cpu.get(name)
            cells.append("-" if value is None else f"{value:.1f} ({100 * value / wall:.0f}%)")
        cpu_rows.append(cells)
    busy = [
        _row_name(row)
        for row in rows
        if (row.get("cpu_s") or {}).get("others")
        and row.get("cpu_wall_s")
        and row["cpu_s"]["others"] / row["cpu_wall_s"] > 0.25
    ]
    if cpu_rows:
        ncpu = (result.get("machine") or {}).get("nproc") or "?"
        lines += [
            "",
            f"CPU seconds used during each measured window (percent of one core; {ncpu} cores = {ncpu}00%; "
            "irq = interrupt handling; others = processes outside the benchmark):",
        ]
        lines += _table(["row", "wall s", *CPU_COLUMNS], cpu_rows)
    if busy:
        lines += [
            "",
            f"note: other processes used more than a quarter of a core while measuring {', '.join(busy)}",
        ]
    return "\n".join(lines)
