"""The benchmark's pure parts: statistics, figure derivation and the report (not the scenarios)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import bench.run as bench_run
from bench.observe import Sighting, Timeline, parse_request_totals, requests_per_run
from bench.scenarios import hello_figures
from kubechain.testing.waiting import wait_for


def test_percentile_interpolates_linearly_like_numpy() -> None:
    assert bench_run.percentile([1, 2, 3, 4], 50) == 2.5
    assert bench_run.percentile([4, 1, 3, 2], 0) == 1
    assert bench_run.percentile([4, 1, 3, 2], 100) == 4
    assert bench_run.percentile(range(1, 101), 95) == pytest.approx(95.05)
    assert bench_run.percentile(range(1, 101), 99) == pytest.approx(99.01)
    assert bench_run.percentile([7.5], 99) == 7.5
    assert bench_run.percentile([], 50) is None
    with pytest.raises(ValueError):
        bench_run.percentile([1, 2], 101)


def test_summarize_scales_and_rounds() -> None:
    stats = bench_run.summarize([0.010, 0.020, 0.030, None], scale=1000.0)
    assert stats == {"n": 3, "mean": 20.0, "min": 10.0, "p50": 20.0, "p95": 29.0, "p99": 29.8, "max": 30.0}
    assert bench_run.summarize([])["p50"] is None


def test_max_overlap_and_write_target() -> None:
    assert (
        bench_run.max_overlap([(0, 2), (1, 3), (2, 4), (5, 6)]) == 2
    )  # an end and a start at t=2 don't overlap
    assert bench_run.max_overlap([]) == 0
    assert bench_run.write_target(400.0, 4.0) == 50.0
    assert bench_run.write_target(None, 4.0) is None


def test_parse_args_sizes_and_validation() -> None:
    full = bench_run.parse_args([])
    assert full.scenario_list == list(bench_run.SCENARIOS)
    assert (full.hello_runs, full.inflight_runs, full.baseline_writes) == (1000, 1000, 3000)
    quick = bench_run.parse_args(["--quick", "--scenarios", "scale,hello", "--env", "KUBECHAIN_KUBE_QPS=500"])
    assert quick.scenario_list == ["hello", "scale"]  # always in the canonical order
    assert (quick.hello_runs, quick.inflight_runs) == (30, 100)
    assert quick.extra_env == {"KUBECHAIN_KUBE_QPS": "500"}
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--scenarios", "nope"])


def test_the_inflight_rows_threads_are_a_number_the_worker_accepts() -> None:
    """The in-flight rows hold 1,000 LLM calls open on two workers: 500 threads each. When the worker's
    --concurrency bound fell below that, both rows (the memory target's) failed at start."""
    from kubechain.cli import main
    from kubechain.settings import MAX_WORKER_CONCURRENCY

    full = bench_run.parse_args([])
    assert (full.inflight_workers, full.inflight_concurrency) == (2, 500)
    worker = main.commands["worker"]  # type: ignore[attr-defined]
    (concurrency,) = [p for p in worker.params if p.name == "concurrency"]
    assert concurrency.type(full.inflight_concurrency) == 500  # raises click.BadParameter when refused
    assert bench_run.parse_args(["--inflight-runs", "100"]).inflight_concurrency == 50
    with pytest.raises(SystemExit):  # said before anything starts, not after the control plane is up
        bench_run.parse_args(["--inflight-concurrency", str(MAX_WORKER_CONCURRENCY + 1)])


def _timeline(name: str, *points: tuple[float, str, str], claimed_at: str | None = None) -> Timeline:
    sightings = [Sighting(t, rv, phase, "MODIFIED") for t, rv, phase in points]
    for s in sightings:
        if s.phase == "SendContextWindowToLLM":
            s.claimed_at = claimed_at
    return Timeline(name, sightings)


def test_hello_figures_from_watch_and_llm_log() -> None:
    # 1970-01-01T00:01:40.250Z = 100.25 s
    timelines = {
        "run-0": _timeline(
            "run-0",
            (100.0, "1", ""),
            (100.1, "2", "ReadyForLLM"),
            (100.3, "3", "SendContextWindowToLLM"),
            (100.6, "4", "FinalAnswer"),
            claimed_at="1970-01-01T00:01:40.250000Z",
        ),
        "run-1": _timeline(
            "run-1",
            (100.0, "5", ""),
            (100.2, "6", "ReadyForLLM"),
            (100.5, "7", "SendContextWindowToLLM"),
            (101.0, "8", "FinalAnswer"),
        ),
    }
    requests = [
        {"first_user": "m0", "turn": 0, "status_code": 200, "received_at": 100.4, "finished_at": 100.5},
        {"first_user": "m1", "turn": 0, "status_code": 200, "received_at": 100.6, "finished_at": 100.8},
    ]
    f = hello_figures(timelines, requests, {"run-0": "m0", "run-1": "m1"}, 100.0, 100.05, 3.0, 400.0)
    assert f["completed"] == 2 and f["failed"] == 0
    assert f["wall_s"] == 1.0 and f["runs_per_s"] == 2.0
    assert f["ready_to_llm_ms"]["n"] == 2 and f["ready_to_llm_ms"]["p50"] == pytest.approx(350.0)
    assert f["answer_to_next_ms"]["max"] == pytest.approx(200.0)
    assert f["ready_to_claim_ms"]["n"] == 1 and f["ready_to_claim_ms"]["p50"] == pytest.approx(150.0)
    assert f["claim_to_llm_ms"]["p50"] == pytest.approx(150.0)
    assert f["writes_per_run"] == 4.0 and f["status_writes_per_run"] == 3.0
    # half the baseline (400 writes/s) over the 3 status writes; the create is the user's write
    assert f["target_runs_per_s"] == 66.67 and f["meets_target"] is False
    assert f["phase_paths"] == {'"">ReadyForLLM>SendContextWindowToLLM>FinalAnswer': 2}
    assert f["wall_99_s"] == 1.0 and f["stragglers"] == []


def test_hello_figures_name_the_stragglers() -> None:
    timelines = {
        f"run-{i}": _timeline(
            f"run-{i}",
            (0.0, f"{i}a", ""),
            (0.1, f"{i}b", "ReadyForLLM"),
            (0.2, f"{i}c", "SendContextWindowToLLM"),
            (0.5, f"{i}d", "FinalAnswer"),
        )
        for i in range(9)
    }
    timelines["slow"] = _timeline(
        "slow",
        (0.0, "s1", ""),
        (0.1, "s2", "ReadyForLLM"),
        (0.2, "s3", "SendContextWindowToLLM"),
        (190.2, "s4", "FinalAnswer"),
    )
    runs = {name: name for name in timelines} | {"lost": "lost"}
    f = hello_figures(timelines, [], runs, 0.0, 0.1, None, None)
    assert f["completed"] == 10 and f["wall_s"] == 190.2
    assert f["wall_99_s"] is None  # 11 runs: 99 % needs all 11, and one never showed up
    lost, slow = f["stragglers"]  # unfinished runs first
    assert lost == {"name": "lost", "latency_s": None, "phases": [], "longest_wait": None}
    assert slow["name"] == "slow" and slow["latency_s"] == 190.2
    assert slow["longest_wait"] == {"phase": "SendContextWindowToLLM", "s": 190.0}


def test_apiserver_request_counters() -> None:
    metrics = "\n".join(
        [
            "# HELP apiserver_request_total ...",
            'apiserver_request_total{code="200",component="apiserver",resource="taskruns",subresource="status",verb="PATCH"} 12',
            'apiserver_request_total{code="409",component="apiserver",resource="taskruns",subresource="status",verb="PATCH"} 2',
            'apiserver_request_total{code="201",component="apiserver",resource="taskruns",subresource="",verb="POST"} 4',
            'apiserver_request_total{code="200",component="apiserver",resource="taskruns",subresource="",verb="WATCH"} 1',
            'apiserver_request_total{code="200",component="",resource="",subresource="/readyz",verb="GET"} 9',
            'etcd_request_duration_seconds_count{operation="get",type="taskruns.kubechain.humanlayer.dev"} 3',
            'etcd_request_duration_seconds_count{operation="update",type="taskruns.kubechain.humanlayer.dev"} 14',
        ]
    )
    after = parse_request_totals(metrics)
    assert after["PATCH taskruns/status"] == 12 and after["PATCH taskruns/status 409"] == 2
    per_run = requests_per_run(parse_request_totals(""), after, runs=2, bench_creates=2)
    assert per_run is not None
    assert per_run["by_request"] == {
        "PATCH taskruns/status": 6.0,
        "PATCH taskruns/status 409": 1.0,
        "POST taskruns": 1.0,
    }
    assert per_run["total"] == 8.0 and per_run["conflicts_409"] == 1.0
    assert per_run["errors"] == {"PATCH taskruns/status 409": 2}
    assert per_run["etcd_by_request"] == {"update taskruns": 7.0, "get taskruns": 1.5}


FIXED_RESULT: dict[str, Any] = {
    "command": ".venv/bin/python -m bench.run --quick",
    "machine": {"nproc": 2, "cpu_model": "AMD EPYC", "ram_gib": 23.5, "kernel": "6.1", "python": "3.11.7"},
    "versions": {
        "kubechain": "0.1.0",
        "kube-apiserver": "v1.33.13",
        "etcd": "v3.5.21",
        "celery": "5.7.0",
        "redis-server": "7.0.15",
    },
    "rows": [
        {
            "scenario": "baseline",
            "label": "baseline",
            "concurrency": 16,
            "n": 600,
            "cpu_s": {"kube-apiserver": 1.4, "bench": 0.7, "machine": 2.66},
            "cpu_wall_s": 1.4,
            "figures": {
                "writes_per_s": 427.6,
                "writes": 600,
                "threads": 16,
                "wall_s": 1.4,
                "latency_ms": {"p50": 30.7, "p95": 77.3, "p99": 103.7},
            },
        },
        {
            "scenario": "hello",
            "label": "hello",
            "workers": 1,
            "pool": "threads",
            "concurrency": 16,
            "n": 30,
            "figures": {
                "runs_per_s": 18.61,
                "completed": 30,
                "wall_s": 1.61,
                "ready_to_llm_ms": {"p50": 440.4, "p95": 772.6, "p99": 825.4},
                "answer_to_next_ms": {"p50": 85.4, "p95": 195.4, "p99": 198.3},
                "writes_per_run": 4.0,
                "events_per_run": 3.0,
                "api_requests_per_run": {"total": 9.1, "etcd_by_request": {"get taskruns": 0.09}},
                "target_runs_per_s": 53.45,
                "meets_target": False,
            },
        },
        {
            "scenario": "fanout",
            "label": "fanout",
            "workers": 1,
            "pool": "threads",
            "concurrency": 64,
            "n": 50,
            "figures": {
                "wall_s": 8.91,
                "ideal_s": 1.0,
                "tool_calls": 50,
                "tool_s": 1.0,
                "trials_wall_s": [8.91],
                "max_concurrent_tools": 25,
            },
        },
        {
            "scenario": "inflight",
            "label": "inflight",
            "workers": 2,
            "pool": "threads",
            "concurrency": 50,
            "n": 100,
            "timed_out": True,
            "figures": {
                "wall_s": 5.15,
                "ideal_s": 2.0,
                "rss_peak_mib": 314.7,
                "completed": 99,
                "failed": 1,
                "max_concurrent_llm": 97,
                "stragglers": [
                    {
                        "name": "run-00268",
                        "latency_s": 200.1,
                        "longest_wait": {"phase": "SendContextWindowToLLM", "s": 189.6},
                    }
                ],
                "api_requests_per_run": {
                    "total": 10.3,
                    "errors": {"PATCH taskruns/status 504": 1, "POST taskruns 409": 3},
                },
            },
        },
        {
            "scenario": "scale",
            "label": "scale-2w",
            "workers": 2,
            "pool": "threads",
            "concurrency": 16,
            "n": 30,
            "figures": {"runs_per_s": 7.3, "target_runs_per_s": 5.0, "meets_target": True},
        },
        {"scenario": "scale", "label": "scale-4w", "figures": {}, "error": "RuntimeError: worker exited"},
    ],
}


def test_render_table_from_a_fixed_result() -> None:
    text = bench_run.render_table(json.loads(json.dumps(FIXED_RESULT)))
    lines = text.splitlines()
    assert lines[0].startswith("machine: 2 CPU × AMD EPYC, 23.5 GiB RAM")
    assert "kube-apiserver v1.33.13" in lines[0] and "redis-server 7.0.15" in lines[0]
    assert lines[1] == "command: .venv/bin/python -m bench.run --quick"
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "scenario"
    body = "\n".join(table)
    assert "428 writes/s" in body and "machine CPU 95% busy" in body  # 2.66 s of 2 cores × 1.4 s
    assert (
        "18.6 runs/s" in body
        and "target ≥ 53.5 runs/s: MISSED" in body
        and "API requests/run 9.1; etcd re-reads/run 0.09" in body
    )
    assert "8.91 s (ideal 1.0 s)" in body and "max concurrent tools 25" in body
    assert "peak RSS 315 MiB" in body and "TIMED OUT" in body and "1 FAILED" in body
    assert "1 straggler(s), worst 200 s (waited 190 s in SendContextWindowToLLM)" in body
    assert "API errors PATCH taskruns/status 504 ×1" in body and "POST taskruns 409" not in body
    assert "target ≥ 5.0" not in body, "the hello verdict does not apply to a scale row"
    assert "ERROR" in body and "worker exited" in body
    # the CPU table only lists rows that measured CPU
    cpu_header = next(i for i, line in enumerate(lines) if line.startswith("CPU seconds"))
    cpu_rows = [line for line in lines[cpu_header:] if line.startswith("| ") and not line.startswith("| row")]
    assert len(cpu_rows) == 1 and "1.4 (100%)" in cpu_rows[0]


def test_render_table_tolerates_an_empty_result() -> None:
    text = bench_run.render_table({})
    assert text.startswith("machine: - CPU × ?")
    assert "| scenario |" in text


def test_light_load_row_is_judged_on_both_overheads() -> None:
    from bench.scenarios import light_load_verdict

    fast = {
        "ready_to_llm_ms": {"p50": 21.0, "p99": 60.0},
        "answer_to_next_ms": {"p50": 30.0, "p99": 90.0},
        "completed": 30,
        "n": 30,
        "failed": 0,
    }
    assert light_load_verdict(fast)["meets_overhead_target"] is True
    stalled = {**fast, "completed": 12}  # a run never finished: the rest were never made
    assert light_load_verdict(stalled)["meets_overhead_target"] is False
    slow_tail = {**fast, "answer_to_next_ms": {"p50": 30.0, "p99": 260.0}}
    assert light_load_verdict(slow_tail)["meets_overhead_target"] is False
    assert light_load_verdict({})["meets_overhead_target"] is False
    row = {
        "scenario": "light",
        "label": "light",
        "n": 30,
        "figures": {"completed": 30, **fast, **light_load_verdict(fast)},
    }
    text = bench_run.render_table({"rows": [row]})
    assert "p50 21/30 ms" in text and "30/30 runs one at a time" in text
    assert "target p50 < 50 ms, p99 < 250 ms: met" in text


def test_external_operator_gets_the_stack_and_is_stopped(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bench.scenarios import ExternalOperator

    stack = SimpleNamespace(
        logs=tmp_path / "logs",
        llm_base_url="http://127.0.0.1:9999/v1",
        env=lambda: {"PATH": os.environ["PATH"], "KUBECONFIG": "/tmp/kubeconfig"},
    )
    command = 'echo "$OPENAI_BASE_URL $KUBECHAIN_BENCH_NAMESPACE $KUBECONFIG"; exec sleep 60'
    operator = ExternalOperator(command, stack, "ns-1").start()  # type: ignore[arg-type]
    assert operator.process is not None
    wait_for(lambda: operator.log_path.read_text().strip() != "", 10, what="the operator's first line")
    assert operator.log_path.read_text().split() == ["http://127.0.0.1:9999/v1", "ns-1", "/tmp/kubeconfig"]
    operator.stop()
    assert operator.process.poll() is not None


def test_throughput_is_judged_with_the_events_posted() -> None:
    from bench.scenarios import with_event_drain

    figures = {"completed": 1000, "wall_s": 10.0, "target_runs_per_s": 90.0, "meets_target": True}
    drained = with_event_drain(figures, 12.5)
    assert drained["runs_per_s_incl_events"] == 80.0 and drained["meets_target"] is False
    assert with_event_drain(figures, 9.0)["runs_per_s_incl_events"] == 100.0  # never before the last run
    row = {"scenario": "hello", "label": "hello", "n": 1000, "figures": {**figures, **drained}}
    text = bench_run.render_table({"rows": [row]})
    assert "(80.0 with Events)" in text and "target ≥ 90.0 runs/s (with Events): MISSED" in text


def test_ready_time_of_a_turn_claimed_as_it_was_made_ready_is_its_claim() -> None:
    from datetime import UTC, datetime

    from bench.scenarios import ready_time

    claimed = datetime.fromtimestamp(100.0, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    created = Sighting(99.0, "1", "", "ADDED", None)
    lagging = Timeline("r", [created, Sighting(100.4, "2", "SendContextWindowToLLM", "MODIFIED", claimed)])
    assert ready_time(lagging) == pytest.approx(100.0)
    queued = Timeline(
        "r",
        [
            created,
            Sighting(100.4, "2", "ReadyForLLM", "MODIFIED", None),
            Sighting(100.5, "3", "SendContextWindowToLLM", "MODIFIED", claimed),
        ],
    )
    assert ready_time(queued) == pytest.approx(100.4)
    assert ready_time(Timeline("r", [])) is None


def test_baseline_and_hello_repeat_in_rounds_and_the_rest_runs_once() -> None:
    full = bench_run.parse_args([])
    assert full.rounds == 5 and bench_run.parse_args(["--quick"]).rounds == 1
    assert bench_run._schedule(full.scenario_list, 3) == [
        *["baseline", "hello"] * 3,
        "baseline",  # the last round is bracketed too
        "light",
        "fanout",
        "inflight",
        "scale",
    ]
    assert bench_run._schedule(["hello", "scale"], 3) == ["hello", "scale"]  # no baseline, nothing to pair
    assert bench_run._schedule(["baseline", "hello"], 1) == ["baseline", "hello"]
    result: dict[str, Any] = {"options": {"scenarios": ["baseline", "hello", "light"]}, "rows": []}
    assert bench_run._round_of("baseline", 3, result) == 1
    result["rows"] += [
        {"scenario": "hello", "label": "hello", "round": 1},
        {"scenario": "hello", "label": "hello-operator", "round": 1},
    ]
    assert bench_run._round_of("hello", 3, result) == 2  # two rows of one round are still one round
    assert bench_run._round_of("light", 3, result) is None
    assert bench_run._round_of("hello", 3, {"options": {"scenarios": ["hello"]}, "rows": []}) is None


def _hello_round(
    round_no: int, baseline: float, rate: float, status_writes_per_run: float | None = None, **extra: Any
) -> dict[str, Any]:
    target = bench_run.write_target(baseline, 4.0)
    figures = {
        "baseline_writes_per_s": baseline,
        "runs_per_s": rate + 10,
        "runs_per_s_incl_events": rate,
        "target_runs_per_s": target,
        "status_writes_per_run": status_writes_per_run,
    }
    return {"scenario": "hello", "label": "hello", "round": round_no, "n": 1000, "figures": figures, **extra}


def test_round_summary_judges_the_median_ratio_against_each_rounds_own_baseline() -> None:
    rows = [
        {"scenario": "baseline", "label": "baseline", "round": 1, "figures": {"writes_per_s": 600.0}},
        _hello_round(1, 600.0, 80.0),  # 80 / 75 = 1.067
        _hello_round(2, 700.0, 80.0),  # 80 / 87.5 = 0.914
        _hello_round(3, 640.0, 84.0),  # 84 / 80 = 1.05
    ]
    summary = bench_run.round_summary(rows, "hello")
    assert summary is not None
    f = summary["figures"]
    assert [r["ratio"] for r in f["rounds"]] == [1.067, 0.914, 1.05]
    assert f["ratio"] == 1.05 and f["meets_target"] is True
    assert f["runs_per_s_incl_events"] == 80.0 and f["baseline_writes_per_s"] == 640.0
    assert bench_run.round_summary(rows[:2], "hello") is None  # one round: nothing to summarise
    slow = bench_run.round_summary([_hello_round(i, 700.0, 80.0) for i in (1, 2)], "hello")
    assert slow is not None and slow["figures"]["meets_target"] is False
    text = bench_run.render_table({"rows": [*rows[:3], summary]})
    assert "| hello #2 " in text and "| hello (median) " in text
    assert "= 1.05 × target" in text and "80.0 vs ≥ 75.0, 80.0 vs ≥ 87.5, 84.0 vs ≥ 80.0" in text
    assert "target (median ratio ≥ 1): met" in text


def test_a_round_whose_hello_row_is_an_error_counts_as_a_ratio_of_0() -> None:
    """Three of five rounds raised (the worker exited, the Agent was never Ready): they were dropped from
    the median, and the two that finished made the verdict "met"."""
    rows: list[dict[str, Any]] = []
    for round_no in range(1, 6):
        rows.append(
            {
                "scenario": "baseline",
                "label": "baseline",
                "round": round_no,
                "figures": {"writes_per_s": 300.0},
            }
        )
        if round_no in (1, 4):
            rows.append(_hello_round(round_no, 300.0, 52.0))  # 52 / 50 = 1.04
        else:
            rows.append(
                {
                    "scenario": "hello",
                    "label": "hello",
                    "round": round_no,
                    "figures": {},
                    "error": "ScenarioTimeout: warm-up runs did not finish",
                }
            )
    rows.append({"scenario": "baseline", "label": "baseline", "round": 6, "figures": {"writes_per_s": 300.0}})
    summary = bench_run.round_summary(rows, "hello")
    assert summary is not None
    f = summary["figures"]
    assert [r["round"] for r in f["rounds"]] == [1, 2, 3, 4, 5]
    assert [r["ratio"] for r in f["rounds"]] == [1.04, 0.0, 0.0, 1.04, 0.0]
    assert [r.get("counted_as_0") for r in f["rounds"]] == [None, "error", "error", None, "error"]
    assert f["ratio"] == 0.0 and f["meets_target"] is False
    text = bench_run.render_table({"rows": [summary]})
    assert "target (median ratio ≥ 1): MISSED" in text
    assert "round 2 error (0)" in text and "52.0 vs ≥ 50.0" in text
    # one errored round of two still gives a summary (and its verdict)
    two = bench_run.round_summary(rows[:4], "hello")
    assert two is not None and [r["ratio"] for r in two["figures"]["rounds"]] == [1.04, 0.0]


class _FakeTime:
    """bench.observe's clock: sleeping moves it on, and nothing else does."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_event_tally_waits_for_the_rows_events_counted_from_where_they_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bench.observe
    from bench.observe import EventTally

    clock = _FakeTime()
    monkeypatch.setattr(bench.observe, "time", clock)

    counts = iter([5, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7])
    tally = EventTally(lambda: next(counts), poll_s=0.001)
    # warm-up Events still arriving (5 -> 7): the row counts from 7, once it stopped changing
    assert tally.settle(clock.monotonic() + 10, quiet_s=0.01) == 7

    reads: list[int] = []

    def later() -> int:
        reads.append([7, 8, 10, 13, 13][len(reads)])
        return reads[-1]

    tally._count = later
    # 7 + 6 = 13: the wait ends at the read that sees 13, and says when that was
    seen_at = tally.wait(6, clock.monotonic() + 10, quiet_s=5)
    assert reads == [7, 8, 10, 13]
    assert seen_at == pytest.approx(clock.now)

    stuck = EventTally(lambda: 3, poll_s=0.001)
    stuck.settle(clock.monotonic() + 10, quiet_s=0.01)
    started = clock.monotonic()
    # fewer than expected and none for quiet_s (an operator that posts none): quiet_s ends it, not the deadline
    stuck.wait(3, started + 30, quiet_s=0.05)
    assert clock.monotonic() - started == pytest.approx(0.05, abs=0.002)
    # and the deadline ends a wait whose Events keep trickling in
    trickle = iter(range(100, 10_000))
    slow = EventTally(lambda: next(trickle), poll_s=0.001)
    slow.before = 100
    started = clock.monotonic()
    slow.wait(1_000_000, started + 0.1, quiet_s=10)
    assert clock.monotonic() - started == pytest.approx(0.1, abs=0.002)


def test_watch_recorder_wait_for_rechecks_only_changed_runs_and_honours_the_deadline() -> None:
    import time
    from concurrent.futures import ThreadPoolExecutor

    from bench.observe import WatchRecorder

    recorder = WatchRecorder("unused-kubeconfig", "taskruns", "ns")

    class Lookups(dict[str, Timeline]):
        """The recorder's timelines, noting each run wait_for checks (``timelines[name]``) and its phase."""

        def __init__(self) -> None:
            super().__init__()
            self.checked: list[tuple[str, str]] = []

        def __getitem__(self, name: str) -> Timeline:
            timeline = super().__getitem__(name)
            self.checked.append((name, timeline.phase))
            return timeline

    timelines = recorder.timelines = Lookups()

    def taskrun(name: str, rv: int, phase: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "resourceVersion": str(rv)}, "status": {"phase": phase}}

    def until(condition: Any, what: str) -> None:
        deadline = time.monotonic() + 10
        while True:
            with recorder.lock:
                if condition():
                    return
            assert time.monotonic() < deadline, f"timed out waiting until {what}"
            time.sleep(0.001)

    recorder.on_event("ADDED", taskrun("run-1", 1, "FinalAnswer"), 1.0)  # done before the wait starts
    recorder.on_event("ADDED", taskrun("run-2", 2, ""), 1.0)
    recorder.on_event("ADDED", taskrun("run-3", 3, ""), 1.0)
    names = ["run-1", "run-2", "run-3"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(recorder.wait_for, names, ("FinalAnswer", "Failed"), time.monotonic() + 10)
        # wait_for sets the phases to wake on, under the lock it checks every run's first state under:
        # from then on, it is waiting and sees each sighting as a change.
        until(lambda: recorder._wake_on == {"FinalAnswer", "Failed"}, "wait_for is waiting")
        assert not waiting.done()
        with recorder.lock:
            del timelines.checked[:]  # the first check of every run
        recorder.on_event("MODIFIED", taskrun("run-2", 4, "ReadyForLLM"), 2.0)
        recorder.on_event("MODIFIED", taskrun("other", 5, "FinalAnswer"), 2.0)
        recorder.on_event("MODIFIED", taskrun("run-2", 6, "Failed"), 3.0)
        until(lambda: ("run-2", "Failed") in timelines.checked, "wait_for rechecked run-2")
        assert not waiting.done(), "run-3 is not done"
        recorder.on_event("MODIFIED", taskrun("run-3", 7, "FinalAnswer"), 4.0)
        assert waiting.result(timeout=10) is True
    # Only runs it waits for whose timelines changed were checked again: not run-1 (done before), not
    # "other" (not waited for), and run-3 only once its change came (not on run-2's wake-up).
    checked = set(timelines.checked)
    assert {name for name, _ in checked} == {"run-2", "run-3"}, timelines.checked
    assert {phase for name, phase in checked if name == "run-3"} == {"FinalAnswer"}, timelines.checked
    recorder.on_event("ADDED", taskrun("run-4", 8, "ReadyForLLM"), 5.0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # a run that never finishes: the deadline ends the wait (one that ignored it would never return)
        deadline = time.monotonic() + 0.2
        assert (
            pool.submit(recorder.wait_for, ["run-4"], ("FinalAnswer",), deadline).result(timeout=30) is False
        )
    recorder.stop()  # never connected: nothing to close


def test_baseline_writes_the_statuses_a_hello_run_writes() -> None:
    from datetime import UTC, datetime

    from bench.scenarios import minimal_statuses, run_statuses

    first, claim, answer = run_statuses("hello baseline", datetime(2026, 12, 1, tzinfo=UTC))
    assert first["phase"] == "ReadyForLLM" and len(first["contextWindow"]) == 2
    assert first["claimedBy"] is None  # as a control worker's prepare writes it, for the queue
    assert claim["phase"] == "SendContextWindowToLLM" and claim["llmAttempts"] == 1
    assert answer["phase"] == "FinalAnswer" and answer["output"] == "Hello from the scripted LLM."
    assert [m["role"] for m in answer["contextWindow"]] == ["system", "user", "assistant"]
    assert answer["claimedBy"] is None  # the merge patch releases the claim
    # consecutive writes of the comparison status differ (an unchanged object is not written at all)
    minimal = minimal_statuses()
    assert len({str(s) for s in minimal}) == len(minimal) == 3


def test_status_writes_rotate_over_each_threads_objects_writing_the_cycle_in_order() -> None:
    import time

    from bench.scenarios import _create_taskruns, _status_writes
    from kubechain.kube.fake import FakeKubeClient

    kube = FakeKubeClient()
    groups = [["a-0", "a-1"], ["b-0", "b-1"]]
    created = _create_taskruns(kube, "ns", ["a-0", "a-1", "b-0", "b-1"])
    written: list[tuple[str, str]] = []
    patch = kube.patch_status

    def recording_patch(run: Any, status: dict[str, Any]) -> Any:
        written.append((run.name, status["phase"]))
        return patch(run, status)

    kube.patch_status = recording_patch  # type: ignore[method-assign]
    cycle = [{"phase": "ReadyForLLM"}, {"phase": "SendContextWindowToLLM"}, {"phase": "FinalAnswer"}]
    burst = _status_writes(kube, "ns", groups, created, cycle, 12, time.monotonic() + 30)
    assert len(burst.latencies) == 12 and burst.conflicts == 0
    assert len(written) == 12, "one write attempt per write: none conflicted"
    per_object = 0
    for name in ("a-0", "a-1", "b-0", "b-1"):  # (threads need not share the writes evenly)
        phases = [phase for n, phase in written if n == name]
        assert phases == [cycle[i % len(cycle)]["phase"] for i in range(len(phases))]
        per_object += len(phases)
    assert per_object == 12, "every write was to one of the four objects, and checked above"
    # a thread never writes the same object twice in a row
    for group in groups:
        mine = [n for n, _ in written if n in group]
        assert all(x != y for x, y in zip(mine, mine[1:], strict=False))


def test_scale_runs_a_series_per_worker_size_with_small_workers_on_fewer_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import scenarios

    calls: list[tuple[int, int, int, str]] = []

    def fake_hello(
        ctx: Any, n: int, workers: int, concurrency: int, scenario: str, label: str, **_: Any
    ) -> Any:
        calls.append((n, workers, concurrency, label))
        if label == "scale-2w-1t":
            raise RuntimeError("stack did not start")
        return [{"label": label}]

    monkeypatch.setattr(scenarios, "hello", fake_hello)
    monkeypatch.setattr(scenarios, "remove_bench_namespaces", lambda ctx: None)
    progress: list[str] = []
    ctx = type("Ctx", (), {"progress": staticmethod(progress.append)})()
    rows = scenarios.scale(ctx, 1000, (1, 2, 4), 300, (16, 1))
    assert calls == [
        (1000, 1, 16, "scale-1w"),
        (1000, 2, 16, "scale-2w"),
        (1000, 4, 16, "scale-4w"),
        (500, 1, 1, "scale-1w-1t"),
        (500, 2, 1, "scale-2w-1t"),
        (500, 4, 1, "scale-4w-1t"),
    ]
    failed = [row for row in rows if row.get("error")]
    assert [row["label"] for row in failed] == ["scale-2w-1t"] and failed[0]["concurrency"] == 1
    assert len(rows) == 6 and progress == ["scale-2w-1t failed: RuntimeError: stack did not start"]


def test_event_posts_are_the_three_events_of_a_run_posted_as_workers_post_them() -> None:
    from bench.scenarios import EVENT_REASONS_OF_A_RUN, _create_taskruns, _event_posts
    from kubechain.kube.fake import FakeKubeClient

    kube = FakeKubeClient()
    runs = list(_create_taskruns(kube, "ns", ["a", "b"]).values())
    wall = _event_posts(kube, runs, 12, 3)
    events = kube.events("ns")
    assert wall > 0 and len(events) == 12, "each post is a new Event (distinct names)"
    assert {e["reason"] for e in events} == set(EVENT_REASONS_OF_A_RUN)
    assert {e["involvedObject"]["name"] for e in events} == {"a", "b"}
    assert {(e["source"]["component"], e["reportingComponent"]) for e in events} == {
        ("taskrun-controller", "kubechain-bench")
    }


def test_baseline_details_compare_an_events_cost_with_a_status_writes() -> None:
    from bench.report import details

    row = {
        "scenario": "baseline",
        "figures": {
            "writes": 3000,
            "cpu_ms_per_write": 6.9,
            "cpu_ms_per_event": 2.1,
            "machine_cpu_ms_per_write": 7.8,
            "machine_cpu_ms_per_event": 3.0,
            "event_posts_per_s": 900.0,
        },
    }
    text = details(row)
    assert (
        "CPU (API server, etcd, kcm, bench) per status write 6.9 ms, per Event 2.1 ms (900 Events/s)" in text
    )
    assert "whole machine 7.8 / 3.0 ms" in text


def test_cpu_per_status_write_counts_the_benchs_processes_not_the_rest_of_the_machine() -> None:
    """ "machine CPU per status write" divided the whole machine's busy time, other people's processes
    (``others``) included, by the writes."""
    from bench.scenarios import cpu_ms_per

    cpu_s = {
        "kube-apiserver": 1.0,
        "etcd": 0.2,
        "kcm": 0.1,
        "bench": 0.5,
        "others": 2.0,
        "irq": 0.1,
        "machine": 3.9,
    }
    assert cpu_ms_per(cpu_s, 100) == {"own": 18.0, "machine": 39.0}
    assert cpu_ms_per({}, 100) == {"own": None, "machine": None}


def test_no_throughput_verdict_counts_only_the_runs_that_finished() -> None:
    """Half the runs stuck for ever still gave "meets_target: True" on the half that finished."""
    from bench.scenarios import with_event_drain

    timelines = {
        f"run-{i}": _timeline(f"run-{i}", (0.0, f"{i}a", ""), (0.1, f"{i}b", "FinalAnswer")) for i in range(5)
    }
    runs = {f"run-{i}": f"m{i}" for i in range(10)}  # five never finish
    f = hello_figures(timelines, [], runs, 0.0, 0.05, 3.0, 30.0)
    assert f["runs_per_s"] == 50.0 and f["target_runs_per_s"] == 5.0
    assert f["meets_target"] is False
    f["n"] = 10
    assert with_event_drain(f, 0.1)["meets_target"] is False
    incomplete = _hello_round(1, 600.0, 500.0)
    incomplete["figures"] |= {"n": 1000, "completed": 500, "failed": 0}
    summary = bench_run.round_summary([incomplete, _hello_round(2, 600.0, 500.0)], "hello")
    assert summary is not None and summary["figures"]["rounds"][0]["ratio"] == 0.0


def test_the_target_divides_by_the_three_writes_a_run_needs_not_by_what_it_wrote() -> None:
    timelines = {
        "r": _timeline(
            "r",
            (0.0, "1", ""),
            (0.1, "2", "ReadyForLLM"),
            (0.2, "3", "x"),
            (0.3, "4", "y"),
            (0.5, "5", "FinalAnswer"),
        )
    }
    f = hello_figures(timelines, [], {"r": "m"}, 0.0, 0.05, 3.0, 600.0)
    assert f["status_writes_per_run"] == 4.0, "measured, and reported"
    assert f["target_runs_per_s"] == 100.0, "half of 600 writes/s over 3, not over the 4 it wrote"


def test_the_go_operator_row_alternates_sides_starts_clean_and_cannot_lose_kubechains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from bench import scenarios

    calls: list[str] = []
    monkeypatch.setattr(scenarios, "remove_bench_namespaces", lambda ctx: calls.append("clean"))
    monkeypatch.setattr(
        scenarios, "hello", lambda ctx, n, **_: calls.append("kubechain") or [{"label": "hello"}]
    )

    def operator(ctx: Any, n: int, **_: Any) -> list[dict[str, Any]]:
        calls.append("operator")
        raise RuntimeError("manager exited 127")

    monkeypatch.setattr(scenarios, "hello_side_by_side", operator)
    ctx = SimpleNamespace(operator_command="/no/such/manager")
    first = bench_run.hello_pair(ctx, 10, 1)
    assert calls == ["kubechain", "clean", "operator"]
    assert first[0] == {"label": "hello"} and first[1]["label"] == "hello-operator" and first[1]["error"]
    calls.clear()
    bench_run.hello_pair(ctx, 10, 2)
    assert calls == ["operator", "clean", "kubechain"]
    calls.clear()
    assert bench_run.hello_pair(SimpleNamespace(operator_command=None), 10, 1) == [{"label": "hello"}]
    assert calls == ["kubechain"]


def test_the_held_inflight_row_judges_memory_only_with_every_call_open_at_once() -> None:
    row = {
        "scenario": "inflight",
        "label": "inflight-held",
        "workers": 2,
        "pool": "threads",
        "concurrency": 500,
        "n": 1000,
        "figures": {
            "held_until_in_flight": 1000,
            "max_concurrent_llm": 1000,
            "rss_peak_mib": 612.0,
            "meets_memory_target": True,
        },
    }
    text = bench_run.render_table({"rows": [row]})
    assert "peak RSS 612 MiB with 1000 LLM calls held at once (target < 1 GiB with all 1000: met)" in text


def test_fanout_is_judged_on_the_whole_turn_from_llm_answer_to_next_request() -> None:
    from bench.scenarios import FANOUT_TARGET_S, _fanout_summary, _fanout_trial

    run = _timeline(
        "r",
        (0.0, "1", ""),
        (0.1, "2", "ReadyForLLM"),
        (0.4, "4", "ToolCallsPending"),
        (1.9, "5", "ReadyForLLM"),
        (2.6, "6", "FinalAnswer"),
    )
    calls = {
        f"c{i}": _timeline(f"c{i}", (0.5, f"c{i}a", "Pending"), (1.6, f"c{i}b", "Succeeded"))
        for i in range(2)
    }
    requests = [
        {"turn": 0, "status_code": 200, "received_at": 0.2, "finished_at": 0.3},
        {"turn": 1, "status_code": 200, "received_at": 2.45, "finished_at": 2.5},
    ]
    trial = _fanout_trial(run, calls, requests, [(0.6, 1.6), (0.6, 1.6)], 2, 0.0, 1.0)
    assert trial["wall_s"] == 1.5, "ToolCallsPending → ReadyForLLM"
    assert trial["turn_wall_s"] == 2.15, "answer sent at 0.3 s → results asked about at 2.45 s"
    summary = _fanout_summary([trial], 2, 1.0)
    assert summary["turn_wall_s"] > FANOUT_TARGET_S and summary["meets_target"] is False
    text = bench_run.render_table({"rows": [{"scenario": "fanout", "label": "fanout", "figures": summary}]})
    assert "LLM answer → next request 2.15 s (target < 2 s: MISSED)" in text


def test_fanout_next_turn_claimed_as_it_was_made_ready_counts_as_ready() -> None:
    from bench.scenarios import _fanout_trial

    run = _timeline(
        "r",
        (0.0, "1", ""),
        (0.1, "2", "SendContextWindowToLLM"),
        (0.4, "4", "ToolCallsPending"),
        (1.7, "5", "SendContextWindowToLLM"),
        (2.6, "6", "FinalAnswer"),
    )
    calls = {"c0": _timeline("c0", (0.5, "c0a", "Pending"), (1.6, "c0b", "Succeeded"))}
    requests = [
        {"turn": 0, "status_code": 200, "received_at": 0.2, "finished_at": 0.3},
        {"turn": 1, "status_code": 200, "received_at": 1.75, "finished_at": 1.8},
    ]
    trial = _fanout_trial(run, calls, requests, [(0.6, 1.6)], 1, 0.0, 1.0)
    assert trial["wall_s"] == 1.3, "ToolCallsPending → the next turn, ready and claimed at once"
    assert trial["fan_in_lag_s"] == 0.1


def test_each_round_is_judged_between_the_baselines_either_side_of_it() -> None:
    """The baseline drifted down within a run (307 → 252): judged against the one before alone, every
    round's bar was set by the machine as it had been earlier."""
    rows = [
        {"scenario": "baseline", "label": "baseline", "round": 1, "figures": {"writes_per_s": 600.0}},
        _hello_round(1, 600.0, 80.0),
        {"scenario": "baseline", "label": "baseline", "round": 2, "figures": {"writes_per_s": 480.0}},
        _hello_round(2, 480.0, 80.0),
        {"scenario": "baseline", "label": "baseline", "round": 3, "figures": {"writes_per_s": 420.0}},
    ]
    summary = bench_run.round_summary(rows, "hello")
    assert summary is not None
    first, second = summary["figures"]["rounds"]
    assert first["baseline_writes_per_s"] == 540.0 and first["target_runs_per_s"] == 90.0  # 0.5 × 540 / 3
    assert second["baseline_before_after"] == [480.0, 420.0] and second["target_runs_per_s"] == 75.0


def test_each_rounds_row_shows_the_verdict_the_median_used_not_the_one_before_the_next_baseline() -> None:
    """A round's row was judged when it was measured, against the baseline before it alone; the median
    then judged the same round between both baselines, and the table showed the two disagreeing
    ("met (1.39 ×)" in the row, 1.24 × in the median's list)."""
    rows = [
        {"scenario": "baseline", "label": "baseline", "round": 1, "figures": {"writes_per_s": 300.0}},
        _hello_round(1, 300.0, 70.0),
        {"scenario": "baseline", "label": "baseline", "round": 2, "figures": {"writes_per_s": 500.0}},
        _hello_round(2, 500.0, 70.0),
        {"scenario": "baseline", "label": "baseline", "round": 3, "figures": {"writes_per_s": 500.0}},
    ]
    rows[1]["figures"].update(ratio=1.4, meets_target=True, ratio_by_measured_writes=0.93)
    summary = bench_run.round_summary(rows, "hello")
    assert summary is not None
    bench_run.judge_rounds_as_summarised(rows, summary)
    first = rows[1]["figures"]
    assert first["target_runs_per_s"] == 66.67  # 0.5 × (300 + 500) / 2 / 3
    assert first["ratio"] == 1.05 and first["meets_target"] is True
    assert first["baseline_before_after"] == [300.0, 500.0]
    second = rows[3]["figures"]
    assert (
        second["target_runs_per_s"] == 83.33 and second["ratio"] == 0.84 and second["meets_target"] is False
    )
    table = bench_run.render_table({"machine": {}, "rows": [*rows, summary]})
    assert "target ≥ 66.7 runs/s (with Events): met (1.05 × (÷3 writes)" in table
    assert "1.40 ×" not in table


def _dead_operator(tmp_path: Path) -> Any:
    """An --operator that printed a line and exited with 3, as one whose flags are wrong does."""
    from types import SimpleNamespace

    from bench.scenarios import ExternalOperator

    stack = SimpleNamespace(
        logs=tmp_path / "logs",
        llm_base_url="http://127.0.0.1:9999/v1",
        env=lambda: {"PATH": os.environ["PATH"]},
    )
    operator = ExternalOperator("echo 'flag provided but not defined: -x'; exit 3", stack, "ns").start()  # type: ignore[arg-type]
    assert operator.process is not None
    operator.process.wait(timeout=10)
    return operator


def test_an_operator_that_exits_fails_the_waits_at_once_with_its_log(tmp_path: Path) -> None:
    """The bench waited out the whole time limit, then said "agent … not ready: {}"."""
    import time

    from bench.observe import WatchRecorder
    from bench.scenarios import OperatorExited, _warm_up, create_agent, wait_agent_ready
    from kubechain.kube.fake import FakeKubeClient

    operator = _dead_operator(tmp_path)
    kube = FakeKubeClient()
    create_agent(kube, "ns")
    far = time.monotonic() + 120
    started = time.monotonic()
    with pytest.raises(OperatorExited, match="operator exited with 3") as exited:
        wait_agent_ready(kube, "ns", "bench-agent", far, check=operator.check)
    assert "flag provided but not defined" in str(exited.value)
    with pytest.raises(OperatorExited):
        _warm_up(kube, "ns", "bench-agent", 2, far, check=operator.check)
    recorder = WatchRecorder("unused-kubeconfig", "taskruns", "ns")
    with pytest.raises(OperatorExited):
        recorder.wait_for(["run-1"], ("FinalAnswer",), far, check=operator.check)
    assert time.monotonic() - started < 30


def test_a_hello_row_checks_its_operator_while_it_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib
    import time
    from types import SimpleNamespace

    from bench import scenarios
    from kubechain.kube.fake import FakeKubeClient

    operator = _dead_operator(tmp_path)
    stack = SimpleNamespace()

    @contextlib.contextmanager
    def fake_row_stack(*_: Any, **__: Any) -> Any:
        scenarios._EXTERNAL[id(stack)] = operator
        try:
            yield stack
        finally:
            scenarios._EXTERNAL.pop(id(stack), None)

    kube = FakeKubeClient()
    kube.close = lambda: None  # type: ignore[method-assign]
    monkeypatch.setattr(scenarios, "row_stack", fake_row_stack)
    monkeypatch.setattr(scenarios, "set_script", lambda stack, script: None)
    ctx = SimpleNamespace(kube=lambda: kube, timeout_factor=1.0, progress=lambda m: None)
    started = time.monotonic()
    with pytest.raises(scenarios.OperatorExited, match="operator exited with 3"):
        scenarios.hello(ctx, 5, label="hello-operator", timeout_s=120, operator="x")  # type: ignore[arg-type]
    assert time.monotonic() - started < 30


def test_an_error_row_keeps_its_configuration_and_shows_only_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from bench import scenarios

    monkeypatch.setattr(scenarios, "remove_bench_namespaces", lambda ctx: None)

    def fail(*_: Any, **__: Any) -> Any:
        raise scenarios.OperatorExited("operator exited with 3: flag provided but not defined: -x")

    monkeypatch.setattr(scenarios, "hello", fail)
    monkeypatch.setattr(scenarios, "hello_side_by_side", fail)
    rows = bench_run.hello_pair(SimpleNamespace(operator_command="/no/manager"), 30, 1)
    kubechain, operator = rows
    keys = {"workers", "pool", "concurrency", "n", "cpu_s", "cpu_wall_s", "timed_out", "figures", "error"}
    assert keys <= kubechain.keys() and keys <= operator.keys()
    assert (kubechain["workers"], kubechain["pool"], kubechain["concurrency"], kubechain["n"]) == (
        1,
        "threads",
        16,
        30,
    )
    assert (operator["label"], operator["pool"], operator["n"]) == ("hello-operator", "external", 30)
    monkeypatch.setattr(scenarios, "inflight", fail)
    args = bench_run.parse_args(["--quick"])
    held = bench_run.inflight_rows(SimpleNamespace(), args)[1]
    assert keys <= held.keys() and (held["label"], held["workers"], held["n"]) == ("inflight-held", 2, 100)

    def boom() -> list[dict[str, Any]]:
        raise RuntimeError("control plane went away")

    result: dict[str, Any] = {"rows": []}
    bench_run._run_guarded("fanout", boom, result)
    assert keys <= result["rows"][0].keys()
    text = bench_run.render_table({"rows": [*rows, held, *result["rows"]]})
    assert "-/- done" not in text and "ready→LLM -" not in text and "0/- runs" not in text
    line = next(line for line in text.splitlines() if line.startswith("| hello-operator "))
    assert "ERROR" in line and "error: OperatorExited: operator exited with 3: flag provided" in line


def test_ctrl_c_keeps_the_rows_a_scenario_had_already_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the third scale row (the second side of a hello pair, inflight-held) lost the rows
    that scenario had measured: README says Ctrl-C still prints and saves what was measured."""
    from types import SimpleNamespace

    from bench import scenarios

    calls: list[str] = []

    def fake_hello(ctx: Any, n: int, **kw: Any) -> list[dict[str, Any]]:
        label = kw.get("label") or "hello"
        calls.append(label)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [{"scenario": kw.get("scenario", "hello"), "label": label, "figures": {"runs_per_s": 50}}]

    monkeypatch.setattr(scenarios, "hello", fake_hello)
    monkeypatch.setattr(scenarios, "remove_bench_namespaces", lambda ctx: None)
    ctx = SimpleNamespace(operator_command="x", progress=lambda m: None)
    result: dict[str, Any] = {"rows": [], "options": {"scenarios": ["scale"]}}
    with pytest.raises(KeyboardInterrupt):
        bench_run._run_guarded("scale", lambda: scenarios.scale(ctx, 10, (1, 2, 4), 300, (16,)), result)
    assert [row["label"] for row in result["rows"]] == ["scale-1w", "scale-2w"]

    calls[:] = ["before"]  # the pair's second side is the third call
    monkeypatch.setattr(
        scenarios, "hello_side_by_side", lambda ctx, n, timeout_s: fake_hello(ctx, n, label="hello-operator")
    )
    result = {"rows": [], "options": {"scenarios": ["hello"]}}
    with pytest.raises(KeyboardInterrupt):
        bench_run._run_guarded("hello", lambda: bench_run.hello_pair(ctx, 10, 1), result, 1)
    assert [(row["label"], row["round"]) for row in result["rows"]] == [("hello", 1)]

    def inflight(ctx: Any, n: int, held: bool, **_: Any) -> list[dict[str, Any]]:
        if held:
            raise KeyboardInterrupt
        return [{"scenario": "inflight", "label": "inflight", "figures": {}}]

    monkeypatch.setattr(scenarios, "inflight", inflight)
    result = {"rows": [], "options": {"scenarios": ["inflight"]}}
    args = bench_run.parse_args(["--quick"])
    with pytest.raises(KeyboardInterrupt):
        bench_run._run_guarded("inflight", lambda: bench_run.inflight_rows(ctx, args), result)
    assert [row["label"] for row in result["rows"]] == ["inflight"]


def test_the_table_of_an_interrupted_run_says_so() -> None:
    text = bench_run.render_table({"rows": [], "interrupted": "Ctrl-C"})
    assert "INTERRUPTED (Ctrl-C)" in text
    assert "INTERRUPTED" not in bench_run.render_table({"rows": []})


def _gone(pid: int) -> bool:
    """The process ended (a zombie still waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_and_sighup_stop_the_bench_as_ctrl_c_does(
    sig: str, code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (or the terminal closing) left the control plane's clean-up, the operator and the temporary
    workdir behind: only a KeyboardInterrupt ran the finally blocks."""
    import signal
    import time

    import kubechain.testing.controlplane
    from bench import scenarios

    stopped: list[str] = []

    class FakeControlPlane:
        def __init__(self, **_: Any) -> None:
            pass

        def start(self) -> None:
            pass

        def install_crds(self, _: Path) -> None:
            pass

        def stop(self) -> None:
            stopped.append("control plane")

    def baseline(*_: Any) -> list[dict[str, Any]]:
        os.kill(os.getpid(), getattr(signal, sig))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the signal interrupts this
            time.sleep(0.01)
        raise AssertionError(f"{sig} did not interrupt the scenario")

    monkeypatch.setattr(kubechain.testing.controlplane, "LocalControlPlane", FakeControlPlane)
    monkeypatch.setattr(bench_run, "versions", lambda cp: {})
    monkeypatch.setattr(scenarios, "remove_bench_namespaces", lambda ctx: None)
    monkeypatch.setattr(scenarios, "baseline", baseline)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    out = tmp_path / "result.json"
    assert bench_run.main(["--scenarios", "baseline", "--json", str(out)]) == code
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before
    assert stopped == ["control plane"]
    result = json.loads(out.read_text())
    assert result["interrupted"] == sig
    assert not Path(result["options"]["workdir"]).exists(), "the temporary workdir is removed"


def test_the_operator_dies_with_the_bench_and_its_process_group_with_its_stop(tmp_path: Path) -> None:
    """The operator ran in a session of its own without a death signal: a bench killed outright left it
    running, and stop() ended its leader only."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    from bench.scenarios import ExternalOperator

    script = f"""
import os, sys, time
from types import SimpleNamespace
from bench.scenarios import ExternalOperator
stack = SimpleNamespace(logs={str(tmp_path / "a")!r}, llm_base_url="http://x/v1", env=lambda: dict(os.environ))
stack.logs = __import__("pathlib").Path(stack.logs)
operator = ExternalOperator("exec sleep 300", stack, "ns").start()
print(operator.pid, flush=True)
time.sleep(300)
"""
    bench = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": "."},
    )
    try:
        assert bench.stdout is not None
        operator_pid = int(bench.stdout.readline())
        assert not _gone(operator_pid)
        bench.kill()  # SIGKILL: no clean-up of its own runs
        bench.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(operator_pid):
            assert time.monotonic() < deadline, "the operator outlived the bench killed by SIGKILL"
            time.sleep(0.05)
    finally:
        bench.kill()
        bench.wait(timeout=10)

    stack = SimpleNamespace(logs=tmp_path / "b", llm_base_url="http://x/v1", env=lambda: dict(os.environ))
    # the command's shell ends at once, leaving a child of its own in its process group
    operator = ExternalOperator("sleep 300 & echo $!", stack, "ns").start()  # type: ignore[arg-type]
    assert operator.process is not None
    operator.process.wait(timeout=10)
    wait_for(lambda: operator.log_path.read_text().strip() != "", 10, what="the child's pid")
    child = int(operator.log_path.read_text().split()[-1])
    assert not _gone(child)
    operator.stop()
    wait_for(lambda: _gone(child), 10, what="the operator's child ended by stop()")


def test_the_cpu_window_ends_at_the_last_event_seen_not_after_the_quiet_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator posting fewer Events than 3 per run (the Go original posts ~1.2) had ~2 idle seconds
    (the quiet wait) added to its CPU window: a lower "machine % busy", more CPU per run."""
    import bench.observe
    from bench.observe import CpuMeter, EventTally

    clock = _FakeTime()
    monkeypatch.setattr(bench.observe, "time", clock)
    used = {"t": clock.now}

    def cpu_so_far() -> float:  # every component busy for half of every second
        return 0.5 * (clock.now - used["t"])

    monkeypatch.setattr(CpuMeter, "_measure", lambda self: {"workers": cpu_so_far()})
    monkeypatch.setattr(bench.observe, "machine_busy_seconds", lambda: (2 * cpu_so_far(), 0.0))
    meter = CpuMeter({"workers": [1]}).start()
    clock.sleep(4.0)  # the runs
    # the row's Events: 10 expected, 4 come (at +0.1 s, +0.3 s), then none
    counts = iter([2, 3, 3, 4] + [4] * 1000)
    tally = EventTally(lambda: next(counts), poll_s=0.1)
    seen_at = tally.wait(10, clock.monotonic() + 60, quiet_s=2.0, on_change=meter.mark)
    assert seen_at == pytest.approx(1004.3)
    assert clock.now == pytest.approx(1006.3), "the wait still lasted until 2 s without a change"
    cpu = meter.stop(at_mark=True)
    assert meter.wall_s == pytest.approx(4.3), "the window ends when the last Event was seen"
    assert cpu["workers"] == pytest.approx(2.15) and cpu["machine"] == pytest.approx(4.3)
    # without a mark (or not asked to use it) the window ends at stop()
    assert CpuMeter({"workers": [1]}).start().stop(at_mark=True) is not None
    assert meter.stop()["workers"] == pytest.approx(3.15) and meter.wall_s == pytest.approx(6.3)


def test_side_by_side_overheads_compare_like_with_like_and_say_what_ready_was() -> None:
    """KubeChain's runs are never ReadyForLLM (the worker claims the turn it makes ready), so their
    "ready" was the claimedAt the worker wrote; the other operator's was when the bench's watch saw
    ReadyForLLM, late by the watch's lag, even after the LLM request (−0.2 ms): two different things
    under one name. Every row now also has create→LLM, from the same events whatever the operator."""
    at = 100.25
    claimed = "1970-01-01T00:01:40.250000Z"  # = 100.25 s
    kubechain = {
        "run-0": _timeline(
            "run-0",
            (100.0, "1", ""),
            (100.4, "2", "SendContextWindowToLLM"),
            (100.7, "3", "FinalAnswer"),
            claimed_at=claimed,
        )
    }
    requests = [
        {"first_user": "m0", "turn": 0, "status_code": 200, "received_at": at + 0.05, "finished_at": 100.6}
    ]
    f = hello_figures(kubechain, requests, {"run-0": "m0"}, 100.0, 100.0, 3.0, 300.0)
    assert f["ready_from"] == {"claimedAt": 1}
    assert f["ready_to_llm_ms"]["p50"] == pytest.approx(50.0)
    assert f["create_to_llm_ms"]["p50"] == pytest.approx(300.0), "ADDED seen at 100.0 → request at 100.3"
    assert f["ready_to_llm_negative"] == 0

    operator = {
        "run-0": _timeline(
            "run-0", (100.0, "1", ""), (100.3002, "2", "ReadyForLLM"), (100.7, "3", "FinalAnswer")
        )
    }
    g = hello_figures(operator, requests, {"run-0": "m0"}, 100.0, 100.0, 3.0, 300.0)
    assert g["ready_from"] == {"ReadyForLLM seen": 1}
    assert g["ready_to_llm_negative"] == 1 and g["ready_to_llm_ms"]["p50"] == pytest.approx(-0.2)
    assert g["create_to_llm_ms"]["p50"] == pytest.approx(300.0)

    rows = [
        {"scenario": "hello", "label": "hello", "n": 1, "figures": {**f, "n": 1}},
        {"scenario": "hello", "label": "hello-operator", "n": 1, "figures": {**g, "n": 1}},
    ]
    text = bench_run.render_table({"rows": rows})
    mine, theirs = (line for line in text.splitlines() if line.startswith("| hello"))
    assert "create→LLM 300/300/300 ms" in mine and "create→LLM 300/300/300 ms" in theirs
    assert "ready→LLM (ready = claimedAt) 50/50/50 ms" in mine
    assert "ready→LLM (ready = ReadyForLLM seen) -0.2/-0.2/-0.2 ms, 1 negative (watch lag)" in theirs
    assert "create→LLM: the run's create seen by the bench's watch" in text  # the legend


@pytest.mark.parametrize(
    "argv",
    [
        ["--rounds", "0"],
        ["--hello-runs", "0"],
        ["--light-runs", "-1"],
        ["--inflight-runs", "0"],
        ["--inflight-workers", "0"],
        ["--inflight-concurrency", "0"],
        ["--baseline-threads", "0"],
        ["--baseline-writes", "0"],
        ["--fanout-trials", "0"],
        ["--scale-workers", "1,0,4"],
        ["--scale-threads", "16,-1"],
        ["--scale-workers", ","],
        ["--timeout-factor", "0"],
    ],
)
def test_zero_or_negative_sizes_are_refused_not_made_defaults(argv: list[str]) -> None:
    """``--rounds 0`` or ``--hello-runs 0`` silently became the defaults (5 rounds, 1,000 runs)."""
    with pytest.raises(SystemExit) as refused:
        bench_run.parse_args(argv)
    assert refused.value.code == 2


def test_sizes_given_are_kept() -> None:
    args = bench_run.parse_args(["--rounds", "1", "--hello-runs", "1", "--scale-workers", "1,3"])
    assert (args.rounds, args.hello_runs, args.scale_counts) == (1, 1, (1, 3))


def _bench_script_tree(tmp_path: Path) -> Path:
    """scripts/bench in a tree of its own whose bootstrap only leaves a mark and a .venv/bin/python that
    records how it was run (the real ones install packages and build binaries for minutes)."""
    import shutil

    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    repo = Path(__file__).resolve().parents[2]
    shutil.copy(repo / "scripts" / "bench", root / "scripts" / "bench")
    (root / "bench").symlink_to(repo / "bench")
    (root / "kubechain").symlink_to(repo / "kubechain")
    (root / "scripts" / "bootstrap.sh").write_text(
        "touch bootstrapped\nmkdir -p .venv/bin\n"
        "printf '#!/bin/sh\\necho \"$@\" > ran\\n' > .venv/bin/python\nchmod +x .venv/bin/python\n"
    )
    return root


def test_scripts_bench_checks_its_arguments_before_the_bootstrap(tmp_path: Path) -> None:
    """--help or a typo cost the whole bootstrap (apt, a ~6-minute build) on a fresh machine first."""
    import shutil
    import subprocess
    import sys

    root = _bench_script_tree(tmp_path)

    def bench(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHON": python}
        return subprocess.run(
            ["bash", str(root / "scripts" / "bench"), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    shown = bench("--help")
    assert shown.returncode == 0 and "--hello-runs" in shown.stdout
    refused = bench("--rounds", "0")
    assert refused.returncode == 2 and "--rounds" in refused.stderr
    assert bench("--scenarios", "nope").returncode == 2
    assert not (root / "bootstrapped").exists()

    ran = bench("--quick", "--rounds", "2")
    assert ran.returncode == 0, ran.stderr
    assert (root / "bootstrapped").exists() and (root / "ran").read_text().split() == [
        "-m",
        "bench.run",
        "--quick",
        "--rounds",
        "2",
    ]
    # a Python that cannot check them (none yet, too old) leaves the check to bench.run after the bootstrap
    (root / "bootstrapped").unlink()
    shutil.rmtree(root / ".venv")
    assert bench("--quick", python="/bin/false").returncode == 0
    assert (root / "bootstrapped").exists()


def test_bench_run_arguments_need_only_the_standard_library() -> None:
    """scripts/bench checks them with the machine's Python, before the bootstrap installed anything."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    code = "import sys; sys.path.insert(0, '.'); from bench.run import parse_args; print(parse_args(['--quick']).hello_runs)"
    # -S: no site-packages (no pydantic, no celery), -E: no PYTHONPATH
    out = subprocess.run([sys.executable, "-S", "-E", "-c", code], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "30"


def test_the_hello_verdict_shows_its_ratio_against_the_measured_writes_too() -> None:
    """The target divides the baseline by a fixed 3 status writes, KubeChain's runs wrote 2.0: the reader
    had to recompute the ratio against what was measured."""
    from bench.scenarios import with_event_drain

    timelines = {
        f"run-{i}": _timeline(
            f"run-{i}", (0.0, f"{i}a", ""), (0.1, f"{i}b", "X"), (0.2, f"{i}c", "FinalAnswer")
        )
        for i in range(6)
    }
    runs = {name: name for name in timelines}
    f = hello_figures(timelines, [], runs, 0.0, 0.01, 3.0, 300.0)
    assert f["status_writes_per_run"] == 2.0
    assert f["target_runs_per_s"] == 50.0  # 0.5 × 300 / 3
    assert f["target_runs_per_s_by_measured_writes"] == 75.0  # 0.5 × 300 / 2
    f["n"] = 6
    f.update(with_event_drain(f, 0.1))  # 6 runs in 0.2 s = 30 runs/s
    assert f["ratio"] == 0.6 and f["ratio_by_measured_writes"] == 0.4
    text = bench_run.render_table({"rows": [{"scenario": "hello", "label": "hello", "n": 6, "figures": f}]})
    assert "target ≥ 50.0 runs/s (with Events): MISSED (0.60 × (÷3 writes); 0.40 × (÷ measured 2.0))" in text

    rows = [
        {"scenario": "baseline", "label": "baseline", "round": 1, "figures": {"writes_per_s": 600.0}},
        _hello_round(1, 600.0, 119.0, status_writes_per_run=2.0),
        {"scenario": "baseline", "label": "baseline", "round": 2, "figures": {"writes_per_s": 600.0}},
        _hello_round(2, 600.0, 119.0, status_writes_per_run=2.0),
        {"scenario": "baseline", "label": "baseline", "round": 3, "figures": {"writes_per_s": 600.0}},
    ]
    summary = bench_run.round_summary(rows, "hello")
    assert summary is not None
    s = summary["figures"]
    assert s["ratio"] == 1.19 and s["meets_target"] is True  # 119 / (0.5 × 600 / 3)
    assert s["ratio_by_measured_writes"] == pytest.approx(0.793)  # 119 / (0.5 × 600 / 2)
    assert s["status_writes_per_run"] == 2.0
    assert [r["ratio_by_measured_writes"] for r in s["rounds"]] == [0.793, 0.793]
    text = bench_run.render_table({"rows": [summary]})
    assert "= 1.19 × target (÷3 writes); 0.79 × (÷ measured 2.0)" in text


def _scale_row(label: str, workers: int, threads: int, rate: float | None, busy: float) -> dict[str, Any]:
    """A scale row of ``rate`` runs/s whose window kept ``busy`` of 2 cores busy (1.0 = both)."""
    figures: dict[str, Any] = {"n": 100, "completed": 100, "failed": 0}
    if rate is not None:
        figures |= {
            "runs_per_s": rate + 1,
            "runs_per_s_incl_events": rate,
            "target_runs_per_s": 5.0,
            "meets_target": True,
            "ratio": rate / 5.0,
        }
    return {
        "scenario": "scale",
        "label": label,
        "workers": workers,
        "pool": "threads",
        "concurrency": threads,
        "n": 100,
        "figures": figures,
        "cpu_s": {"machine": 2 * busy * 10.0},
        "cpu_wall_s": 10.0,
        "timed_out": False,
        "error": None if rate is not None else "RuntimeError: stack did not start",
    }


def test_scale_is_judged_on_throughput_growing_with_workers_until_the_machine_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scale rows showed the hello verdict (runs/s against the write rate) and none for the issue's
    scale target: throughput growing with workers until the API server is the limit."""
    from bench import scenarios

    made = {
        "scale-1w": _scale_row("scale-1w", 1, 16, 20.0, 0.99),
        "scale-2w": _scale_row("scale-2w", 2, 16, 19.0, 0.99),  # flat, but the cores were full: met
        "scale-4w": _scale_row("scale-4w", 4, 16, 19.5, 0.99),
        "scale-1w-1t": _scale_row("scale-1w-1t", 1, 1, 10.0, 0.50),
        "scale-2w-1t": _scale_row("scale-2w-1t", 2, 1, 18.0, 0.70),  # +80 %: met
        "scale-4w-1t": _scale_row("scale-4w-1t", 4, 1, 18.5, 0.95),  # +3 % with cores 70 % busy: MISSED
    }
    monkeypatch.setattr(scenarios, "hello", lambda ctx, n, label, **_: [dict(made[label])])
    monkeypatch.setattr(scenarios, "remove_bench_namespaces", lambda ctx: None)
    monkeypatch.setattr(scenarios, "usable_cpus", lambda: 2)
    ctx = type("Ctx", (), {"progress": staticmethod(lambda m: None)})()
    rows = scenarios.scale(ctx, 100, (1, 2, 4), 300, (16, 1))
    steps = {row["label"]: row["figures"].get("scale_step") for row in rows}
    assert steps["scale-1w"] == {"reference": True}
    assert steps["scale-2w"]["verdict"] == "saturated" and steps["scale-2w"]["meets_target"] is True
    assert steps["scale-2w"]["busy_pct_before"] == 99.0 and steps["scale-2w"]["growth"] == -0.05
    assert steps["scale-2w-1t"]["verdict"] == "grew" and steps["scale-2w-1t"]["growth"] == 0.8
    assert steps["scale-4w-1t"]["verdict"] == "MISSED" and steps["scale-4w-1t"]["meets_target"] is False
    series = {row["label"]: row["figures"].get("scale_series") for row in rows}
    assert series["scale-4w"] == {"threads": 16, "meets_target": True}
    assert series["scale-4w-1t"] == {"threads": 1, "meets_target": False}
    for row in rows:  # the hello verdict does not apply to a scale row
        assert row["figures"].get("target_runs_per_s") is None and row["figures"].get("meets_target") is None
    text = bench_run.render_table({"machine": {"nproc": 2}, "rows": rows})
    assert "target ≥" not in text
    line = {label: next(x for x in text.splitlines() if x.startswith(f"| {label} ")) for label in made}
    assert "first of its series: the reference" in line["scale-1w"]
    assert "vs 1 worker(s): -5 %, machine 99 % busy with 1 (saturated: met)" in line["scale-2w"]
    assert "vs 1 worker(s): +80 % (grew: met)" in line["scale-2w-1t"]
    assert "vs 2 worker(s): +3 %, machine 70 % busy with 2 (MISSED)" in line["scale-4w-1t"]
    assert "scale target (threads × 1): MISSED" in line["scale-4w-1t"]
    assert "scale target (threads × 16): met" in line["scale-4w"]

    made["scale-2w-1t"] = _scale_row("scale-2w-1t", 2, 1, None, 0.0)  # a row that failed
    rows = scenarios.scale(ctx, 100, (1, 2, 4), 300, (1,))
    steps = {row["label"]: row["figures"].get("scale_step") for row in rows}
    assert steps["scale-2w-1t"]["verdict"] == "MISSED"
    assert steps["scale-4w-1t"]["verdict"] is None, "nothing to compare with"
    assert rows[-1]["figures"]["scale_series"]["meets_target"] is False


class _ScriptedWatchKube:
    """A KubeClient's watch_raw and list_raw for a WatchRecorder, each answering from a script: an item
    that is an exception is raised, a list of events is streamed."""

    def __init__(self, watches: list[Any], lists: list[Any]) -> None:
        import threading

        self.watches, self.lists = watches, lists
        self.idle = threading.Event()  # set when the watch script is used up

    def watch_raw(self, *_: Any) -> Any:
        if not self.watches:
            self.idle.set()
            self.idle.wait(0.05)
            return
        item = self.watches.pop(0)
        if isinstance(item, BaseException):
            raise item
        yield from item

    def list_raw(self, *_: Any) -> tuple[list[dict[str, Any]], str]:
        item = self.lists.pop(0) if self.lists else ([], "1")
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        pass


def _taskrun_event(kind: str, name: str, rv: int, phase: str) -> dict[str, Any]:
    return {
        "type": kind,
        "object": {"metadata": {"name": name, "resourceVersion": str(rv)}, "status": {"phase": phase}},
    }


def test_a_watch_whose_relist_fails_once_relists_again() -> None:
    """After 410 Gone the recorder relisted from inside its except clause: a LIST failing then ended the
    recorder's thread, silently, and its row could only time out."""
    import time

    from bench.observe import WatchRecorder
    from kubechain.kube.errors import Gone, Unavailable

    kube = _ScriptedWatchKube(
        watches=[Gone(410, "Expired", "too old"), [_taskrun_event("MODIFIED", "run-1", 7, "FinalAnswer")]],
        lists=[([], "1"), Unavailable(0, "Unavailable", "connection refused"), ([], "5")],
    )
    recorder = WatchRecorder("unused", "taskruns", "ns")
    recorder.__dict__["kube"] = kube
    recorder.start()
    try:
        assert recorder.wait_for(["run-1"], ("FinalAnswer",), time.monotonic() + 10) is True
        assert recorder.errors == 1 and recorder.failure is None
    finally:
        kube.idle.set()
        recorder.stop()


def test_a_recorder_whose_thread_died_fails_its_wait_at_once_with_the_error() -> None:
    import time

    from bench.observe import WatchFailed, WatchRecorder
    from kubechain.kube.errors import Gone

    kube = _ScriptedWatchKube(
        watches=[Gone(410, "Expired", "too old")],
        lists=[([], "1"), RuntimeError("the list's answer was not JSON")],
    )
    recorder = WatchRecorder("unused", "taskruns", "ns")
    recorder.__dict__["kube"] = kube
    recorder.start()
    started = time.monotonic()
    try:
        with pytest.raises(WatchFailed, match="the list's answer was not JSON"):
            recorder.wait_for(["run-1"], ("FinalAnswer",), time.monotonic() + 60)
        assert time.monotonic() - started < 10
    finally:
        kube.idle.set()
        recorder.stop()
