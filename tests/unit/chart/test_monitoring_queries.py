"""The chart's dashboard and alerting rules query only series that kubetune exports.

Every PromQL expression (the Grafana dashboard's panel targets, the PrometheusRules' alert
expressions) is parsed with `promql-parser` (a port of Prometheus' own grammar) and its metric
names are collected; they must be series the operator or the built-in server export. Here the
exporters are exercised in-process; tests/e2e/test_serving_e2e.py compares the same names with a
real scrape of both after an end-to-end run. (`promtool check rules` would need Prometheus built
from its Go module, far too large to build in the test environment: the parser stands in for it.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import yaml

from tests.unit.chart.test_chart_rendering import CHART, Render, only

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}
"""Grafana substitutes these before the query reaches Prometheus."""


def dashboard_queries() -> list[str]:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def rule_queries() -> list[str]:
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def _names(node: Any, found: set[str]) -> None:
    name = getattr(node, "name", None)
    if type(node).__name__ == "VectorSelector" and name:
        found.add(str(name))
    for attribute in ("lhs", "rhs", "expr", "args", "param", "vector_selector"):
        child = getattr(node, attribute, None)
        for item in child if isinstance(child, (list, tuple)) else [child]:
            if item is not None and not isinstance(item, (int, float, str)):
                _names(item, found)


def series_in(query: str) -> set[str]:
    """The metric names a PromQL query selects (after Grafana's variables are substituted)."""
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    found: set[str] = set()
    _names(promql_parser.parse(query), found)
    return found


def queried_series() -> set[str]:
    """Every metric name the dashboard and the rules query."""
    return set().union(*(series_in(q) for q in dashboard_queries() + rule_queries()))


SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum"), "counter": ("",),
            "gauge": ("",), "untyped": ("",)}


def exposed_names(exposition: str) -> set[str]:
    """The series names a text exposition offers: its samples' names, and the families it declares
    (`# TYPE name kind`) with their sample suffixes: a labelled family with no child yet (no job has
    failed a reconcile, none is stalled) is declared but has no sample."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _hash, _type, name, kind = line.split(" ", 3)
            names.update(name + suffix for suffix in SUFFIXES.get(kind.strip(), ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_query_parses_and_selects_kubetune_series() -> None:
    for query in dashboard_queries() + rule_queries():
        names = series_in(query)
        assert names and all(n.startswith("kubetune_") for n in names), query


def test_the_dashboard_covers_what_a_platform_team_watches() -> None:
    queried = set().union(*(series_in(q) for q in dashboard_queries()))
    assert {"kubetune_jobs", "kubetune_job_train_loss", "kubetune_job_tokens_per_second",
            "kubetune_job_queue_wait_seconds_bucket", "kubetune_accelerator_seconds_total",
            "kubetune_serve_requests_total", "kubetune_serve_request_duration_seconds_bucket"} <= queried


def test_the_rules_alert_on_repeated_failures_stalls_and_unavailable_serving() -> None:
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"KubetuneJobFailingRepeatedly", "KubetuneTrainingStalled", "KubetuneServingUnavailable"} <= set(alerts)
    assert "kubetune_job_stalled" in series_in(alerts["KubetuneTrainingStalled"]["expr"])
    for alert in alerts.values():
        assert alert["annotations"]["summary"] and alert["labels"]["severity"] in ("warning", "critical")


def test_every_queried_series_is_exported_by_the_operator_or_the_server() -> None:
    from kubetune.operator import metrics
    from kubetune.trainer.serve import metrics as serve_metrics

    operator = metrics.OperatorMetrics()
    operator.observe_state("ns", "job", "Running")
    operator.observe_usage("ns", "job", "ns", {"training": {"acceleratorSeconds": 1.0}, "tokensProcessed": 1})
    operator.observe_report("ns", "job", 0, {"trainLoss": 1.0, "valLoss": 1.0, "step": 1, "totalSteps": 2,
                                             "tokensPerSecond": 5.0})
    operator.observe_queue_wait("ns", 3.0)
    operator.observe_health("ns", "job", attempts=1, stalled=False, serving_ready=True)
    operator.report_accepted()
    operator.reconcile_failed("ns", "api")
    operator.observe_finished("ns", "Failed", 5.0)
    server = serve_metrics.ServerMetrics()
    server.requests.labels("/v1/chat/completions", "200").inc()
    server.latency.labels("/v1/chat/completions").observe(0.1)
    exported = exposed_names(operator.exposition().decode()) | exposed_names(server.render().decode())
    missing = queried_series() - exported
    assert not missing, f"queried but never exported: {sorted(missing)}"


def test_the_chart_renders_the_rules_and_the_serving_pod_monitor(render: Render) -> None:
    manifests = render({"prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
                        "servingPodMonitor": {"enabled": True}})
    rule = only(manifests, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    monitor = only(manifests, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "serving"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"


def test_both_are_off_by_default(render: Render) -> None:
    kinds = {m["kind"] for m in render({})}
    assert not {"PrometheusRule", "PodMonitor"} & kinds


def test_chart_path_is_the_repositorys() -> None:
    assert Path(CHART, "Chart.yaml").is_file()
