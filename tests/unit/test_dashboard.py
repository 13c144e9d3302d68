"""The Grafana dashboard only charts metrics the code actually exports, by labels they have."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

import kubechain.observability.metrics as metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "grafana-dashboard.json"

# The labels Prometheus adds to every series it scrapes through the PodMonitor (its target labels).
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance"}
SERIES = re.compile(r"(kubechain_[a-z_]+)(?:\{([^}]*)\})?")


def exported() -> dict[str, set[str]]:
    """Each series name /metrics can show, with the labels the code gives it."""
    import watcher.main  # the watcher's own gauge (a worker does not export it)

    series: dict[str, set[str]] = {"kubechain_runs": {"phase"}}  # (computed at scrape time)
    for value in [*vars(metrics).values(), *vars(watcher.main).values()]:
        if isinstance(value, MetricWrapperBase):
            labels = set(value._labelnames)
            for family in value.describe():
                suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
                for suffix in suffixes.get(family.type, [""]):
                    series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def unknown_labels(expr: str, series: dict[str, set[str]]) -> set[str]:
    """The labels ``expr`` groups or selects by that a series it reads does not have."""
    used = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}
    for _, selector in SERIES.findall(expr):
        used |= {re.split(r"[=!]", match)[0].strip() for match in selector.split(",") if match.strip()}
    unknown = set()
    for name, _ in SERIES.findall(expr):
        unknown |= used - series.get(name, set()) - TARGET_LABELS
    return unknown


def test_dashboard_queries_exported_metrics_by_labels_they_have() -> None:
    series = exported()
    used = {name for expr in exprs() for name, _ in SERIES.findall(expr)}
    assert used <= set(series), used - set(series)
    assert {expr: unknown_labels(expr, series) for expr in exprs() if unknown_labels(expr, series)} == {}
    assert len(json.loads(DASHBOARD.read_text())["panels"]) >= 10


def test_the_label_check_finds_a_label_the_metric_does_not_have() -> None:
    expr = 'sum by (model, pod) (rate(kubechain_tasks_total{namespace=~"$namespace", tool="x"}[5m]))'
    assert unknown_labels(expr, exported()) == {"model", "tool"}


def test_rates_use_grafanas_rate_interval_at_the_podmonitors_scrape_interval() -> None:
    """A fixed [1m] window holds two samples at the PodMonitor's 30 s interval (one if a scrape is late:
    the panel has a gap). $__rate_interval follows the zoom and is at least four scrape intervals, taking
    a query's Min step as the scrape interval (else the data source's setting, 15 s by default: [1m])."""
    import yaml

    podmonitor = yaml.safe_load(DASHBOARD.with_name("podmonitor.yaml").read_text())
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    ranges = {window for expr in exprs() for window in re.findall(r"\[([^\]]+)\]", expr)}
    assert ranges == {"$__rate_interval"}
    dashboard = json.loads(DASHBOARD.read_text())
    steps = {target.get("interval") for panel in dashboard["panels"] for target in panel["targets"]}
    assert steps == {endpoint["interval"]}


def test_every_panel_follows_the_namespace_variable() -> None:
    """Two installations scraped by one Prometheus (say, staging and production) were added up."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables: dict[str, Any] = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    query = variables["namespace"]["query"]
    query = query["query"] if isinstance(query, dict) else query
    metric = re.fullmatch(r"label_values\((kubechain_[a-z_]+), namespace\)", query)
    assert metric is not None and metric.group(1) in exported(), query
    for expr in exprs():
        for name, selector in SERIES.findall(expr):
            assert 'namespace=~"$namespace"' in selector, (name, expr)


def test_gauges_every_replica_exports_are_taken_once_per_installation_then_added_up() -> None:
    """Both watcher replicas export the runs by phase and the queue depths (the same numbers): taken
    once (max) per installation, then added up over the installations the namespace variable picks.
    A max over all of them showed only the largest installation's."""
    for expr in exprs():
        for group in re.findall(r"\bmax by \(([^)]*)\)", expr):
            labels = {label.strip() for label in group.split(",")}
            assert labels & {"namespace", "pod"}, expr
            if "namespace" in labels:
                outer = re.match(r"sum by \(([^)]*)\) \(max by", expr)
                assert outer is not None and "namespace" not in outer.group(1), expr


def test_watch_events_are_added_up_over_the_watchers() -> None:
    """Only the leading watcher counts them (a standby acts on none): a sum counts each event once."""
    (events,) = [expr for expr in exprs() if "kubechain_watch_events_total" in expr]
    assert events.startswith("sum by (kind) ("), events
