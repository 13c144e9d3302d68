"""The Grafana dashboard only charts metrics the code actually exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

import kubechain.observability.metrics as metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "grafana-dashboard.json"


def test_dashboard_queries_exported_metrics() -> None:
    import watcher.main  # the watcher's own gauge (a worker does not export it)

    exported = set()
    for value in [*vars(metrics).values(), *vars(watcher.main).values()]:
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                exported.add(family.name)
    exported |= {family.name for family in metrics.PhaseCollector(lambda: []).collect()}
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"kubechain_[a-z_]+", target["expr"]))
    base = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in used}
    assert base <= {re.sub(r"_total$", "", name) for name in exported}, base - exported
    assert len(dashboard["panels"]) >= 10
