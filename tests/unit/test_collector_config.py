"""collector-config/: the OpenTelemetry Collector configurations users apply as they are, and the chart's copies.

No otelcol-contrib binary runs here (none is on a package registry this project reaches), so the checks are the
Collector's own structural rules (every pipeline component defined, every defined one used, connectors on both
sides) plus what otel-cuda depends on: current component names, the pod association, the env variables.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "collector-config"
CONFIGS = sorted(CONFIG_DIR.glob("otel-collector*.yaml"))
CHART_COPIES = ROOT / "helm" / "otel-cuda" / "files" / "collector"
CHART_TEMPLATE = ROOT / "helm" / "otel-cuda" / "templates" / "collector.yaml"

# Component types of the contrib distribution these configs may use (current names).
KNOWN = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "k8s_attributes", "batch", "resource", "transform", "filter", "tail_sampling"},
    "exporters": {"otlp_grpc", "otlp_http", "prometheus", "prometheusremotewrite", "awss3", "debug"},
    "connectors": {"spanmetrics"},
    "extensions": {"health_check", "healthcheckv2", "pprof", "zpages"},
}
# Old names, still accepted or removed, that the configs must not use (README.md has the table).
DEPRECATED = {
    "processors": {"k8sattributes", "spanmetrics"},
    "exporters": {"otlp", "otlphttp", "logging", "jaeger", "jaeger_thrift"},
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def ctype(name: str) -> str:
    return name.split("/", 1)[0]


@pytest.fixture(params=CONFIGS, ids=lambda p: p.name)
def config(request) -> tuple[Path, dict]:
    return request.param, load(request.param)


def test_the_three_variants_exist():
    assert {p.name for p in CONFIGS} == {"otel-collector.yaml", "otel-collector-remote-write.yaml",
                                         "otel-collector-s3.yaml"}


def test_pipelines_reference_defined_components_and_all_are_used(config):
    _, cfg = config
    svc = cfg["service"]
    used = {"receivers": set(), "processors": set(), "exporters": set()}
    connectors = set(cfg.get("connectors", {}))
    as_exporter, as_receiver = set(), set()
    for pname, p in svc["pipelines"].items():
        assert ctype(pname) in ("traces", "metrics", "logs"), pname
        assert p.get("receivers") and p.get("exporters"), pname
        for kind in ("receivers", "processors", "exporters"):
            for comp in p.get(kind, []):
                if kind != "processors" and comp in connectors:
                    (as_exporter if kind == "exporters" else as_receiver).add(comp)
                    continue
                assert comp in cfg.get(kind, {}), f"{pname}: {kind} {comp} is not defined"
                used[kind].add(comp)
    for kind in used:
        assert set(cfg.get(kind, {})) == used[kind], f"defined but unused {kind}: {set(cfg.get(kind, {})) - used[kind]}"
    assert as_exporter == as_receiver == connectors  # a connector joins two pipelines
    assert set(svc.get("extensions", [])) == set(cfg.get("extensions", {}))


def test_component_names_are_current(config):
    _, cfg = config
    for kind, known in KNOWN.items():
        for name in cfg.get(kind, {}):
            assert ctype(name) in known, f"{kind}: {name}"
            assert ctype(name) not in DEPRECATED.get(kind, set()), f"{kind}: {name} is a deprecated name"
    assert "s3_partition:" not in config[0].read_text()  # replaced by s3_partition_format


def test_processor_order(config):
    _, cfg = config
    for pname, p in cfg["service"]["pipelines"].items():
        procs = [ctype(x) for x in p["processors"]]
        assert procs[0] == "memory_limiter", pname  # refuse data before anything else holds it
        assert procs[-1] == "batch", pname
        if "k8s_attributes" in procs:  # batching loses the connection context the last association rule needs
            assert procs.index("k8s_attributes") < procs.index("batch"), pname
    assert "k8s_attributes" in cfg["service"]["pipelines"]["traces"]["processors"]
    assert "k8s_attributes" in cfg["service"]["pipelines"]["metrics"]["processors"]


def test_pod_association_uses_what_otel_cuda_sets(config):
    _, cfg = config
    k8s = cfg["processors"]["k8s_attributes"]
    rules = [[(s["from"], s.get("name")) for s in r["sources"]] for r in k8s["pod_association"]]
    assert rules[0] == [("resource_attribute", "k8s.pod.uid")]
    assert [("resource_attribute", "container.id")] in rules
    assert rules[-1] == [("connection", None)]  # last: a DaemonSet's connection IP is its own pod's
    # container.id is usable as an association source only when container attributes are extracted.
    assert {"k8s.container.name", "container.image.name"} & set(k8s["extract"]["metadata"])


def test_exports(config):
    path, cfg = config
    ex = cfg["exporters"]
    assert ex["otlp_grpc/jaeger"]["endpoint"].startswith("${env:OTEL_CUDA_JAEGER_ENDPOINT:-")
    prom = ex.get("prometheus") or ex.get("prometheusremotewrite")
    assert prom["resource_to_telemetry_conversion"]["enabled"] is True  # the dashboards filter on k8s_* labels
    sm = cfg["connectors"]["spanmetrics"]
    assert sm["histogram"]["unit"] == "s" and sm["namespace"] == "traces.span.metrics"
    if "s3" in path.name:
        for name in ("awss3/traces", "awss3/metrics"):
            up = ex[name]["s3uploader"]
            assert "s3_partition_format" in up and up["s3_bucket"] == "${env:OTEL_CUDA_S3_BUCKET}"


def test_env_variables_are_documented_and_set_by_the_chart(config):
    path, _ = config
    text = path.read_text()
    names = set(re.findall(r"\$\{env:(\w+)", text))
    readme = (CONFIG_DIR / "README.md").read_text()
    template = CHART_TEMPLATE.read_text()
    for name in names:
        assert f"`{name}`" in readme, f"{name} is not in collector-config/README.md"
        assert f"name: {name}" in template, f"the chart does not set {name}"
        assert name in text.split("\n\n")[0], f"{name} is not in the header comment of {path.name}"
    # Only the S3 bucket has no default: everything else applies as it is.
    assert set(re.findall(r"\$\{env:(\w+)\}", text)) <= {"OTEL_CUDA_S3_BUCKET"}


def test_chart_copies_are_identical():
    for path in CONFIGS:
        assert (CHART_COPIES / path.name).read_bytes() == path.read_bytes(), \
            f"cp collector-config/{path.name} helm/otel-cuda/files/collector/"
    assert {p.name for p in CHART_COPIES.glob("*.yaml")} == {p.name for p in CONFIGS}


def test_rbac_example_grants_what_k8s_attributes_reads():
    docs = list(yaml.safe_load_all((CONFIG_DIR / "rbac.yaml").read_text()))
    rules = docs[0]["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("", "namespaces"), ("apps", "replicasets")} <= granted
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in rules)
