"""Grafana dashboards of the chart, and the metric names they query.

`dashboard_metric_names()` and `collector_metric_names()` are for the live-scrape test too: it scrapes the
sidecar's /metrics and the Collector's :8889 and checks that each name exists (the `source` tells which endpoint).
Import them from a test in this directory (`from test_dashboards import dashboard_metric_names`), or print them:
`python tests/unit/test_dashboards.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "helm" / "otel-cuda" / "files" / "dashboards").glob("*.json"))
COLLECTOR_CONFIG = ROOT / "collector-config" / "otel-collector.yaml"

PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar", "group", "count_values",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "histogram_sum",
    "histogram_count", "histogram_avg", "histogram_fraction", "label_values", "label_replace", "abs", "clamp_min",
    "clamp_max", "vector", "scalar", "time", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
    "inf", "nan",
}
GRAFANA_VARIABLES = {"__rate_interval", "__range", "__interval", "__range_s", "__interval_ms"}

# Names otel-cuda's sidecar exports (DESIGN.md "What comes out"; Prometheus names), and the issue-6 system metrics
# whose names the live-scrape test is to confirm.
SIDECAR_FAMILIES = {
    "cuda_api_calls_total", "cuda_api_duration_seconds", "cuda_kernel_launches_total", "cuda_memcpy_bytes_total",
    "cuda_memory_allocated_bytes", "cuda_memory_allocations_total", "cuda_sync_duration_seconds",
    "cuda_step_duration_seconds", "otel_cuda_events_total",
}
SYSTEM_FAMILIES = {"process_disk_io_bytes_total", "process_context_switches_total",
                   "cuda_thread_off_cpu_time_seconds_total", "cuda_device_opens_total"}  # otel_cuda/system.py


def _family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def _source(name: str) -> str:
    fam = _family(name)
    if name.startswith("vllm:"):
        return "vllm"
    if name.startswith("DCGM_"):
        return "dcgm"
    if fam in SYSTEM_FAMILIES:
        return "system"
    if name in collector_metric_names():
        return "collector"
    return "sidecar"


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not labels, functions, keywords, durations or Grafana variables)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^{}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # grouping labels
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)", e):
        word = m.group(1)
        rest = e[m.end():].lstrip()
        if word.lower() in PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def _panels(dashboard: dict):
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])  # collapsed rows keep their panels inside


def _queries(dashboard: dict):
    """(panel or variable title, row title, PromQL) for every query of the dashboard."""
    row = ""
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            row = p.get("title", "")
        for q in [p, *p.get("panels", [])]:
            for t in q.get("targets", []):
                if t.get("expr"):
                    yield q.get("title", ""), row, t["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            inner = re.match(r"label_values\((.*),\s*\w+\)$", query)
            yield f"variable {var['name']}", "", inner.group(1) if inner else query


def dashboard_metric_names() -> dict[str, str]:
    """Every metric name the dashboards query -> where it comes from: sidecar (otel-cuda's /metrics, or the
    Collector re-exposing it), system (issue 6, names unconfirmed), collector (made by the Collector: spanmetrics),
    vllm (vLLM's /metrics), dcgm (dcgm-exporter). Names are as queried: histograms as _bucket / _sum / _count."""
    names: dict[str, str] = {}
    for path in DASHBOARDS:
        for _, _, expr in _queries(json.loads(path.read_text())):
            for name in promql_metric_names(expr):
                names[name] = _source(name)
    return dict(sorted(names.items()))


def dashboard_metric_families() -> dict[str, str]:
    """Like dashboard_metric_names(), with histogram series folded into their family (cuda_api_duration_seconds).

    Histogram panels query both the classic `_bucket` / `_sum` / `_count` series and the native histogram of the
    same name, because the sidecar's exponential histograms reach Prometheus as native histograms through the
    Collector, while its own /metrics text shows classic ones: a family is present if either form is."""
    return dict(sorted({_family(n): s for n, s in dashboard_metric_names().items()}.items()))


def collector_metric_names() -> set[str]:
    """The Prometheus names of the metrics the Collector itself makes (spanmetrics), from collector-config/."""
    cfg = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    sm = cfg["connectors"]["spanmetrics"]
    prefix = sm.get("namespace", "traces.span.metrics").replace(".", "_")
    unit = {"s": "seconds", "ms": "milliseconds"}[sm.get("histogram", {}).get("unit", "ms")]
    duration = f"{prefix}_duration_{unit}"
    return {f"{prefix}_calls_total", f"{duration}_bucket", f"{duration}_sum", f"{duration}_count"}


# --- tests ---------------------------------------------------------------------------------------------------
@pytest.fixture(params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request) -> dict:
    return json.loads(request.param.read_text())


def test_there_is_a_dashboard():
    assert DASHBOARDS


def test_panel_ids_are_unique_and_laid_out(dashboard):
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    for p in _panels(dashboard):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    cells = set()
    for p in _panels(dashboard):  # no two panels cover the same grid cell
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps at {(x, y)}"
                cells.add((x, y))


def test_dashboard_identity_and_datasource(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables  # works with any Grafana's Prometheus, not a hard-coded uid
    for p in _panels(dashboard):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


def test_queries_are_well_formed(dashboard):
    variables = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_VARIABLES
    for title, _, expr in _queries(dashboard):
        for open_, close in ("()", "{}", "[]"):
            assert expr.count(open_) == expr.count(close), (title, expr)
        for var in re.findall(r"\$\{?(\w+)", expr):
            assert var in variables, (title, var)
        assert promql_metric_names(expr), (title, expr)


def test_required_panels_are_present(dashboard):
    titles = " | ".join(p.get("title", "") for p in _panels(dashboard)).lower()
    for needed in ("calls/s by function", "latency (heatmap)", "kernel launches/s", "top kernels",
                   "memcpy bandwidth by direction", "device memory allocated", "share of time in syncs",
                   "step duration", "lost", "time to first token", "inter-token latency", "gpu utilisation"):
        assert needed in titles, needed
    assert any(p["type"] == "heatmap" for p in _panels(dashboard))


def test_metric_names_are_the_documented_ones():
    names = dashboard_metric_names()
    assert set(names.values()) <= {"sidecar", "system", "collector", "vllm", "dcgm"}
    sidecar = {_family(n) for n, s in names.items() if s == "sidecar"}
    assert sidecar == SIDECAR_FAMILIES, sidecar ^ SIDECAR_FAMILIES
    assert {n for n, s in names.items() if s == "collector"} <= collector_metric_names()
    assert {"vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
            "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= set(names)


def test_system_metrics_stay_in_their_marked_row():
    for path in DASHBOARDS:
        for title, row, expr in _queries(json.loads(path.read_text())):
            if any(_family(n) in SYSTEM_FAMILIES for n in promql_metric_names(expr)):
                assert row.lower().startswith("system"), (title, row)


def test_metric_name_parser():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le, cuda_function) (rate(cuda_api_duration_seconds_bucket'
        '{k8s_pod_name=~"$pod", x="a{b}"}[$__rate_interval])) or sum by (cuda_function) '
        '(rate(cuda_api_duration_seconds{k8s_pod_name=~"$pod"}[5m])))') == {
        "cuda_api_duration_seconds_bucket", "cuda_api_duration_seconds"}
    assert promql_metric_names('sum(vllm:num_requests_running{namespace=~"$namespace"})') == {
        "vllm:num_requests_running"}


if __name__ == "__main__":
    print(json.dumps({"dashboard": dashboard_metric_names(), "families": dashboard_metric_families(),
                      "collector": sorted(collector_metric_names())}, indent=2))
