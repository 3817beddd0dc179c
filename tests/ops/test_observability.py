"""deploy/observability/: the Grafana dashboard and the Prometheus alert rules load, and every
metric their expressions name is one the services really export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import services.egress.metrics
import services.ingress.metrics
import services.tunnel.metrics
import shared.backlog
import shared.redis_metrics
from tests.support.processes import REPO_ROOT

OBSERVABILITY = REPO_ROOT / "deploy" / "observability"
METRIC_MODULES = (services.ingress.metrics, services.tunnel.metrics, services.egress.metrics)
EXPORTING_MODULES = (*METRIC_MODULES, shared.backlog, shared.redis_metrics)

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
NOT_A_METRIC = re.compile(
    r'"(?:[^"\\]|\\.)*"'  # strings (label values, regexes)
    r"|\{[^}]*\}"  # label matchers
    r"|\[[^\]]*\]"  # range and subquery durations
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"  # grouping label lists
    r"|\boffset\s+-?[0-9a-z]+"  # offset durations
    r"|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b"  # numbers
)
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def exported_names() -> set[str]:
    """Every sample name the services' metrics produce, labelled metrics with no child yet included."""
    assert EXPORTING_MODULES  # imported for their metrics, registered in REGISTRY
    names = set()
    for family in REGISTRY.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def metric_names(expression: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names or Grafana variables."""
    stripped = NOT_A_METRIC.sub(" ", expression)
    names = set()
    for match in IDENTIFIER.finditer(stripped):
        word = match.group()
        before = stripped[match.start() - 1] if match.start() else " "
        after = stripped[match.end() :].lstrip()[:1]
        if word in PROMQL_WORDS or after == "(" or before == "$":
            continue
        names.add(word)
    return names


def test_the_metric_name_reader_finds_metrics_and_nothing_else() -> None:
    expression = (
        'histogram_quantile(0.99, sum by (le) (rate(relay_a_bucket{code=~"4..",x="y z"}[$__rate_interval])))'
        " / on (pod) group_left max(relay_b) > 1e-9 and max without (pid) (relay_c) offset 5m"
    )
    assert metric_names(expression) == {"relay_a_bucket", "relay_b", "relay_c"}


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())
    rules: list[dict[str, Any]] = [rule for group in document["groups"] for rule in group["rules"]]
    return rules


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_alert_rules_are_well_formed_prometheus_rules() -> None:
    document = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())
    assert set(document) == {"groups"}
    for group in document["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"]), rule["alert"]
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert re.fullmatch(r"\d+[smhd]", rule.get("for", "0s")), rule
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "alert names are unique"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed; structure checked above")
def test_promtool_accepts_the_rules() -> None:
    completed = subprocess.run(
        ["promtool", "check", "rules", str(OBSERVABILITY / "alerts.yaml")], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_every_expression_names_only_metrics_the_services_export() -> None:
    exported = exported_names()
    expressions = [rule["expr"] for rule in alert_rules()] + dashboard_expressions()
    used: set[str] = set()
    for expression in expressions:
        names = metric_names(expression)
        assert names, f"no metric in {expression!r}"
        assert names <= exported, f"{sorted(names - exported)} in {expression!r} are not exported"
        used |= names
    print(f"{len(expressions)} expressions use {len(used)} of {len(exported)} exported sample names")


def test_the_alerts_cover_what_an_operator_must_hear_about() -> None:
    by_metric: dict[str, list[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            by_metric.setdefault(name, []).append(rule["expr"])
    assert "relay_inbox_oldest_age_seconds" in by_metric
    assert any('state="deferred"' in expr for expr in by_metric["relay_egress_queue_jobs"])
    assert "relay_egress_queue_oldest_age_seconds" in by_metric
    rejection_exprs = by_metric["relay_ingress_rejections_total"]
    assert any('code=~"4.."' in expr for expr in rejection_exprs)
    assert any('code=~"5.."' in expr for expr in rejection_exprs)
    assert any('reason="storage_full"' in expr for expr in rejection_exprs)
    assert any('code!="ok"' in expr for expr in by_metric["relay_tunnel_auth_total"])
    assert {"relay_redis_memory_used_bytes", "relay_redis_memory_max_bytes"} <= set(by_metric)


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert graphs and all(panel["targets"] and panel["gridPos"]["w"] <= 24 for panel in graphs)
    for panel in graphs:
        assert [target["refId"] for target in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert all(panel["datasource"]["uid"].strip("${}") in variables for panel in graphs)
