"""The chart's Grafana dashboard and PrometheusRule read only what the operator exports.

promtool is not available, so each PromQL expression is taken apart here: every series it names
must be one `operator/metrics.py` serves (a counter's `_total`, a histogram's `_bucket`, `_sum`,
`_count`, a gauge, or one of RunCollector's gauges), and every label it matches or groups on must
be one of those series' labels (`le` for buckets). `up` is Prometheus's own series per target.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from selfalign.operator import metrics

from .test_chart import CHART, find, render

DASHBOARD = CHART / "files" / "dashboards" / "selfalign.json"
# Labels Prometheus adds to a scraped target's series (the ServiceMonitor's job, instance, ...).
TARGET_LABELS = {"job", "instance", "pod", "service", "container", "endpoint"}
PROMETHEUS_SERIES = {"up": {"namespace", *TARGET_LABELS}}
FUNCTIONS = {"sum", "count", "avg", "min", "max", "rate", "increase", "irate", "histogram_quantile", "time",
             "absent", "topk", "bottomk", "label_values", "clamp_min", "delta", "max_over_time", "vector"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset"}


def exported() -> dict[str, set[str]]:
    """{series name: its labels}, from the collectors metrics.py defines."""
    series: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        name, labels = collector._name, set(collector._labelnames)
        if collector._type == "counter":
            series[f"{name}_total"] = labels
        elif collector._type == "histogram":
            series.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels})
        else:
            series[name] = labels
    series.update({name: set(labels) for name, (_, labels) in metrics.RUN_GAUGES.items()})
    return series


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """(series names, label names) an expression uses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (values, regexes, $variables)
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    text = re.sub(r"\{[^}]*\}", "", text)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"[A-Za-z_:][\w:]*", text))
    arguments = set(re.findall(r"label_values\([^,]+,\s*(\w+)\)", expr))  # label_values(series, label)
    return words - FUNCTIONS - KEYWORDS - arguments, labels | arguments


def check(expr: str) -> None:
    known = {**exported(), **PROMETHEUS_SERIES}
    series, labels = names_in(expr)
    assert series, f"no series in {expr!r}"
    unknown = series - set(known)
    assert not unknown, f"{expr!r} names series the operator does not export: {sorted(unknown)}"
    allowed = set().union(*(known[name] for name in series)) | TARGET_LABELS
    assert labels <= allowed, f"{expr!r} uses labels its series lack: {sorted(labels - allowed)}"


def panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", ()))  # a collapsed row holds its panels
    return found


def test_the_checker_refuses_a_series_or_label_the_operator_does_not_export():
    with pytest.raises(AssertionError, match="does not export"):
        check('sum(selfalign_stage_seconds{stage="train"})')
    with pytest.raises(AssertionError, match="lack"):
        check('sum by (run) (rate(selfalign_stage_duration_seconds_count[5m]))')  # no run on histograms
    check('sum by (le, stage) (rate(selfalign_stage_duration_seconds_bucket{namespace=~"$namespace"}[5m]))')


def test_the_dashboard_parses_and_every_query_names_what_the_operator_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", ())]
    assert len(queries) >= 10 and len({panel["id"] for panel in panels(dashboard)}) == len(panels(dashboard))
    for expr in queries:
        check(expr)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            check(variable["query"]["query"])
    used = {name for expr in queries for name in names_in(expr)[0]}
    # Queue time and run time, per namespace and run: the asks.
    assert {"selfalign_stage_queued_seconds_sum", "selfalign_stage_duration_seconds_sum",
            "selfalign_stage_since_timestamp_seconds", "selfalign_run_phase"} <= used


def test_the_chart_ships_the_dashboard_behind_a_value_with_grafanas_sidecar_label():
    assert not find(render("default"), "ConfigMap")
    (config_map,) = find(render("namespaced-ha"), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["selfalign.json"]) == json.loads(DASHBOARD.read_text())


def test_the_alerts_name_what_the_operator_exports_and_cover_failure_deadline_waiting_and_down():
    assert not find(render("default"), "PrometheusRule")
    (rule,) = find(render("namespaced-ha"), "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"SelfAlignRunFailed", "SelfAlignStagePastDeadline", "SelfAlignStageWaiting",
                           "SelfAlignOperatorDown"}
    for alert in alerts.values():
        check(alert["expr"])
        assert alert["labels"]["severity"] and alert["annotations"]["summary"]
    assert "3600" in alerts["SelfAlignStageWaiting"]["expr"]
    assert 'job="sa-selfalign-metrics"' in alerts["SelfAlignOperatorDown"]["expr"]
    (service,) = [d for d in render("namespaced-ha") if d["kind"] == "Service"]
    assert service["metadata"]["name"] == "sa-selfalign-metrics"  # the job the ServiceMonitor scrapes


def test_the_service_monitor_keeps_the_runs_namespace_label():
    (monitor,) = find(render("namespaced-ha"), "ServiceMonitor")
    assert all(endpoint["honorLabels"] is True for endpoint in monitor["spec"]["endpoints"])


@pytest.mark.parametrize(("rendering", "expected"), [("default", "text"), ("namespaced-ha", "json")])
def test_the_log_format_value_reaches_the_operator(rendering, expected):
    (deployment,) = find(render(rendering), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert f"--log-format={expected}" in container["args"]


def test_the_dashboard_file_is_the_one_the_chart_reads():
    template = (CHART / "templates" / "dashboard.yaml").read_text()
    assert f'"{DASHBOARD.relative_to(CHART).as_posix()}"' in template
    assert Path(DASHBOARD).stat().st_size < 1024 * 1024  # a ConfigMap's limit
