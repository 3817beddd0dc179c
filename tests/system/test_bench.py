"""The benchmark harness works end to end (smoke mode: one tiny round of every figure)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.report import Metric, Target, render_markdown
from tests.support.processes import REPO_ROOT

SMOKE_TIMEOUT_S = 90
FIGURES = {
    "ingress_rate",
    "inbound_latency",
    "tunnel_throughput",
    "egress_rate",
    "idle_tunnels",
    "auth_rate",
    "e2e_cpu",
    "delivering_rate",
    "sender_auth_rate",
}
ZERO_ALLOWED_UNITS = {"messages", "s"}  # a backlog and its drain time may well be nothing


def test_ratio_is_median_over_median_and_target_compares_it() -> None:
    metric = Metric(
        "rate",
        "msg/s",
        rounds=[90.0, 100.0, 300.0],
        baseline_rounds=[50.0, 60.0, 40.0],
        baseline_name="bare",
        target=Target("ratio_at_least", 1.8),
    )
    summary = metric.summary()
    assert summary["value"] == {"median": 100.0, "min": 90.0, "max": 300.0, "n": 3}
    assert summary["ratio"] == 2.0
    assert summary["paired_ratios"] == [1.8, 100.0 / 60.0, 7.5]
    assert summary["target_met"] is True
    slow = Metric("p99", "ms", rounds=[4.5, 3.0, 5.0], target=Target("value_at_most", 4.0)).summary()
    assert slow["ratio"] is None and slow["target_met"] is False


def test_smoke_run_measures_every_figure_and_writes_both_reports(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["mode"] == "smoke"
    machine = document["machine"]
    assert machine["cores"] >= 1 and machine["python"] and machine["redis"].count(".") >= 1
    figures = {figure["figure"]: figure for figure in document["figures"]}
    assert set(figures) == FIGURES
    for name, figure in figures.items():
        assert figure["errors"] == [], name
        assert any(metric["target"] for metric in figure["metrics"]), name  # others are diagnostics
        for metric in figure["metrics"]:
            assert metric["value"] is not None, (name, metric["name"])
            assert metric["value"]["median"] > 0 or metric["unit"] in ZERO_ALLOWED_UNITS, (name, metric["name"])
            if metric["baseline_name"]:
                assert metric["baseline"]["median"] > 0 and metric["ratio"] > 0, (name, metric["name"])
    markdown = (tmp_path / "report.md").read_text()
    assert markdown == render_markdown(document)
    assert "| Ingress accept rate |" in markdown and "Redis " + machine["redis"] in markdown
