"""The Helm chart, through the real Helm engine (helm-sdkpy) and the Kubernetes schemas (kubernetes-validate).

Lint: Helm's own lint of a copy of the chart whose values.yaml holds each documented mode and toggle (Lint reads
the chart's values.yaml only), which also checks the values against values.schema.json.
Render: a real `helm install` of each value set into a local HTTP server that answers like kube-apiserver
(discovery, the release Secret, creates); the manifest Helm installs is validated with kubernetes-validate.
"""

from __future__ import annotations

import asyncio
import copy
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

helm = pytest.importorskip("helm_sdkpy", reason="helm-sdkpy is the Helm engine (scripts/setup.sh --test)")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "otel-cuda"
K8S_VERSION = "1.35.0"  # a current release; 1.29 (the chart's kubeVersion floor) is checked for the native sidecar
DEFAULT_VALUES = yaml.safe_load((CHART / "values.yaml").read_text())

# The capabilities otel-cuda gets by default (documented in values.yaml, docs/kubernetes.md, the Dockerfile):
# BPF + PERFMON load the programs and open uprobe perf events, SYS_PTRACE reads other processes' /proc/PID/root and
# maps, SYS_RESOURCE lifts RLIMIT_MEMLOCK for BPF maps on kernels before 5.11.
DOCUMENTED_CAPS = {"BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"}
DOCUMENTED_HOST_PATHS = {"/lib/modules", "/usr/src", "/sys/kernel/tracing"}
DAEMONSET_HOST_PATHS = DOCUMENTED_HOST_PATHS | {"/sys/fs/cgroup"}

# Every documented mode and toggle, by name. ci/*.yaml are added below (chart-testing's convention).
VALUE_SETS: dict[str, dict] = {
    "default": {},
    "daemonset": {"mode": "daemonset"},
    "daemonset-no-vllm": {"mode": "daemonset", "vllm": {"enabled": False}},
    "daemonset-hostport-no-service": {"mode": "daemonset", "daemonset": {"hostPort": True,
                                                                          "receiverService": {"enabled": False}}},
    "daemonset-k8s-off": {"mode": "daemonset", "agent": {"k8sAttributes": "off", "podSelector": ""}},
    "sidecar-plain-container": {"agent": {"nativeSidecar": False, "sidecarReadiness": True}},
    "sidecar-http-protocol": {"agent": {"otlp": {"protocol": "http/protobuf"}}},
    "existing-backends": {
        "agent": {"otlp": {"endpoint": "http://otel-collector.observability:4317"}},
        "collector": {"enabled": False}, "jaeger": {"enabled": False}, "prometheus": {"enabled": False},
        "grafana": {"enabled": False}, "dashboards": {"namespace": "monitoring"}},
    "collector-with-external-jaeger": {"jaeger": {"enabled": False, "endpoint": "jaeger-collector.tracing:4317",
                                                  "queryUrl": "http://jaeger-query.tracing:16686"}},
    "collector-remote-write": {"collector": {"config": "remote-write"}},
    "collector-s3": {"collector": {"config": "s3", "s3": {"bucket": "traces-bucket"},
                                   "serviceAccountAnnotations": {
                                       "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/otel"}}},
    "archive-s3-secret": {"agent": {"archive": {"destination": "s3://bucket/otel-cuda"},
                                    "s3": {"region": "eu-west-1", "existingSecret": "s3-keys",
                                           "endpoint": "http://minio.minio:9000"}}},
    "archive-s3-irsa": {"agent": {"archive": {"destination": "s3://bucket/otel-cuda"}},
                        "serviceAccount": {"annotations": {
                            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/otel-cuda"}}},
    "archive-hostpath": {"agent": {"archive": {"volume": {"type": "hostPath"}}}},
    "archive-pvc": {"agent": {"archive": {"volume": {"type": "persistentVolumeClaim", "claimName": "otel-cuda"}}}},
    "model-cache-pvc": {"vllm": {"modelCache": {"type": "persistentVolumeClaim", "storageClassName": "local-path"}}},
    "model-cache-existing-claim": {"vllm": {"modelCache": {"type": "persistentVolumeClaim",
                                                           "existingClaim": "models"}}},
    "model-cache-hostpath": {"vllm": {"modelCache": {"type": "hostPath"}}},
    "hf-token-and-args": {"vllm": {"hfToken": {"secretName": "hf"}, "servedModelName": "qwen",
                                   "extraArgs": ["--max-model-len", "4096"], "collectDetailedTraces": "all",
                                   "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}]}},
    "scheduling": {"nodeSelector": {"nvidia.com/gpu.present": "true"}, "runtimeClassName": "nvidia",
                   "priorityClassName": "high", "affinity": {}, "imagePullSecrets": ["regcred"],
                   "commonLabels": {"team": "ml"}},
    "privileged-opt-in": {"agent": {"security": {"privileged": True}}},
    "extra-capabilities": {"agent": {"security": {"extraCapabilities": ["SYS_ADMIN", "CAP_DAC_READ_SEARCH"],
                                                  "seccompProfile": {"type": "Unconfined"},
                                                  "appArmorProfile": {"type": "Unconfined"}}}},
    "host-paths-minimal": {"agent": {"hostPaths": {"tracefs": False, "kernelHeaders": False}}},
    "host-paths-debugfs-writable": {"agent": {"hostPaths": {"debugfs": True, "tracefsWritable": True}}},
    "agent-extras": {"agent": {"extraArgs": ["--archive-rotate-seconds=30"], "resourceAttributes": {
        "deployment.environment.name": "prod"}, "extraEnv": [{"name": "OTEL_CUDA_X", "value": "1"}],
        "prometheusScrape": True}},
    "service-account-existing": {"serviceAccount": {"create": False, "name": "gpu-sa"}},
    "grafana-existing-secret": {"grafana": {"adminPassword": {"existingSecret": "grafana-admin"},
                                            "anonymousViewer": False}},
    "prometheus-cluster-wide": {"prometheus": {"clusterWide": True, "extraScrapeConfigs": [
        {"job_name": "dcgm", "static_configs": [{"targets": ["dcgm-exporter.gpu-operator:9400"]}]}]}},
    "dashboards-off-with-grafana": {"dashboards": {"enabled": False}},
}
for _f in sorted((CHART / "ci").glob("*.yaml")):
    VALUE_SETS[f"ci/{_f.name}"] = yaml.safe_load(_f.read_text()) or {}

INVALID_SETS = {
    "unknown-mode": ({"mode": "kubelet"}, "mode"),
    "sidecar-without-vllm": ({"vllm": {"enabled": False}}, r"vllm[./]enabled"),
    "no-export-target": ({"collector": {"enabled": False}}, r"agent[./]otlp[./]endpoint"),
    "s3-collector-without-bucket": ({"collector": {"config": "s3"}}, r"s3[./]bucket"),
    "bad-capability-type": ({"agent": {"security": {"extraCapabilities": "SYS_ADMIN"}}}, None),
    "unknown-key": ({"agent": {"matchh": "x"}}, None),
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# --- a kube-apiserver stand-in, enough for `helm install` ------------------------------------------------------
RESOURCES = {
    ("", "v1"): [("configmaps", "ConfigMap", True), ("secrets", "Secret", True), ("services", "Service", True),
                 ("serviceaccounts", "ServiceAccount", True), ("pods", "Pod", True),
                 ("persistentvolumeclaims", "PersistentVolumeClaim", True), ("namespaces", "Namespace", False)],
    ("apps", "v1"): [("deployments", "Deployment", True), ("daemonsets", "DaemonSet", True),
                     ("statefulsets", "StatefulSet", True)],
    ("rbac.authorization.k8s.io", "v1"): [("roles", "Role", True), ("rolebindings", "RoleBinding", True),
                                          ("clusterroles", "ClusterRole", False),
                                          ("clusterrolebindings", "ClusterRoleBinding", False)],
}


class FakeKubeAPI:
    def __init__(self, minor: str = "35"):
        self.created: list[dict] = []
        created = self.created

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/version":
                    return self._send(200, {"major": "1", "minor": minor, "gitVersion": f"v1.{minor}.0"})
                if path == "/api":
                    return self._send(200, {"kind": "APIVersions", "versions": ["v1"]})
                if path == "/apis":
                    return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                        {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                         "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
                        for g, v in RESOURCES if g]})
                for (g, v), res in RESOURCES.items():
                    if path == (f"/apis/{g}/{v}" if g else f"/api/{v}"):
                        return self._send(200, {"kind": "APIResourceList", "groupVersion": f"{g}/{v}" if g else v,
                                                "resources": [{"name": n, "singularName": "", "namespaced": ns,
                                                               "kind": k, "verbs": ["create", "get", "list",
                                                                                    "update", "delete"]}
                                                              for n, k, ns in res]})
                if path.endswith("/secrets") and "labelSelector" in self.path:
                    return self._send(200, {"kind": "SecretList", "apiVersion": "v1", "items": []})
                return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404})

            def _body(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if "protobuf" in (self.headers.get("Content-Type") or ""):
                    return None  # Helm's release record; its content is not what is checked here
                return json.loads(raw)

            def do_POST(self):
                body = self._body()
                if body is None:
                    return self._send(201, {"kind": "Secret", "apiVersion": "v1",
                                            "metadata": {"name": "release", "resourceVersion": "1"}})
                created.append(body)
                return self._send(201, body)

            def do_PUT(self):
                body = self._body()
                return self._send(200, body or {"kind": "Secret", "apiVersion": "v1",
                                                "metadata": {"name": "release", "resourceVersion": "2"}})

            do_PATCH = do_PUT

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.kubeconfig = yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.server.server_port}"}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "llm"}}]})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def kube():
    api = FakeKubeAPI()
    yield api
    api.close()


_counter = iter(range(10**6))


def install(kube: FakeKubeAPI, values: dict) -> tuple[list[dict], str]:
    """`helm install` the chart with values; the rendered objects and NOTES.txt."""
    cfg = helm.Configuration(namespace="llm", kubeconfig=kube.kubeconfig)
    release = asyncio.run(helm.Install(cfg).run(f"rel{next(_counter)}", str(CHART), values=values or None,
                                                wait=False, timeout=60))
    docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    notes = (release.get("info") or {}).get("notes", "")
    return docs, notes


def lint(values: dict, tmp_path: Path) -> dict:
    chart = tmp_path / "otel-cuda"
    shutil.copytree(CHART, chart)
    (chart / "values.yaml").write_text(yaml.safe_dump(merge(DEFAULT_VALUES, values), sort_keys=False))
    cfg = helm.Configuration(namespace="llm")
    return asyncio.run(helm.Lint(cfg).run(str(chart)))


def pod_specs(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            yield d, d["spec"]["template"]["spec"]


def containers(spec):
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def agent_container(docs):
    found = [c for _, s in pod_specs(docs) for c in containers(s) if c["name"] == "otel-cuda"]
    assert len(found) == 1, f"expected one otel-cuda container, found {len(found)}"
    return found[0]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


# --- lint ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lints_clean(name, tmp_path):
    result = lint(VALUE_SETS[name], tmp_path)
    assert not result.get("Messages"), (name, result)  # not even INFO (severity 1)
    assert not result.get("Errors"), (name, result)


@pytest.mark.parametrize("name", list(INVALID_SETS))
def test_lint_rejects_bad_values(name, tmp_path):
    values, _ = INVALID_SETS[name]
    result = lint(values, tmp_path)
    assert any(m["Severity"] >= 3 for m in result.get("Messages") or []), (name, result)


# --- render and validate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_renders_valid_kubernetes_objects(name, kube):
    docs, _ = install(kube, VALUE_SETS[name])
    assert docs
    for d in docs:
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")


@pytest.mark.parametrize("name", ["default", "daemonset"])
def test_valid_on_the_oldest_supported_kubernetes(name, kube):
    for d in install(kube, VALUE_SETS[name])[0]:
        kubernetes_validate.validate(d, "1.29.0", strict=True)


@pytest.mark.parametrize("name", list(INVALID_SETS))
def test_install_refuses_bad_values_with_a_remedy(name, kube):
    values, hint = INVALID_SETS[name]
    with pytest.raises(helm.HelmError) as err:
        install(kube, values)
    if hint:
        assert re.search(hint, str(err.value)), str(err.value)


# --- least privilege -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "daemonset", "existing-backends"])
def test_default_pods_are_least_privilege(name, kube):
    docs, _ = install(kube, VALUE_SETS[name])
    daemon = name == "daemonset"
    for owner, spec in pod_specs(docs):
        assert not spec.get("hostNetwork"), owner["metadata"]["name"]
        assert not spec.get("hostIPC")
        is_agent = any(c["name"] == "otel-cuda" for c in containers(spec))
        assert bool(spec.get("hostPID")) == (daemon and is_agent), owner["metadata"]["name"]
        host_paths = {v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
        assert host_paths <= (DAEMONSET_HOST_PATHS if daemon else DOCUMENTED_HOST_PATHS), host_paths
        for c in containers(spec):
            sc = c.get("securityContext") or {}
            assert not sc.get("privileged"), f"{c['name']} is privileged"
            added = set((sc.get("capabilities") or {}).get("add") or [])
            if c["name"] == "otel-cuda":
                assert added == DOCUMENTED_CAPS, added
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
                mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
                for p in ("/lib/modules", "/usr/src", "/sys/kernel/tracing"):
                    assert mounts[p]["readOnly"] is True, p
            else:
                assert not added, f"{c['name']} adds capabilities {added}"


def test_privileged_and_extra_capabilities_are_opt_in(kube):
    sc = agent_container(install(kube, VALUE_SETS["privileged-opt-in"])[0])["securityContext"]
    assert sc["privileged"] is True and "capabilities" not in sc
    sc = agent_container(install(kube, VALUE_SETS["extra-capabilities"])[0])["securityContext"]
    assert set(sc["capabilities"]["add"]) == DOCUMENTED_CAPS | {"SYS_ADMIN", "DAC_READ_SEARCH"}
    assert sc["seccompProfile"] == {"type": "Unconfined"}


def test_documented_capabilities_match_the_docs():
    # The set is stated in values.yaml and docs/kubernetes.md; a change must change them together.
    for text in ((CHART / "values.yaml").read_text(), (ROOT / "docs" / "kubernetes.md").read_text()):
        assert "BPF, PERFMON, SYS_PTRACE, SYS_RESOURCE" in re.sub(r"\s+", " ", text.replace("# ", ""))


# --- what each mode wires -------------------------------------------------------------------------------------
def test_sidecar_mode_wiring(kube):
    docs, _ = install(kube, {})
    [vllm] = [d for d in by_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"]
              == "inference"]
    spec = vllm["spec"]["template"]["spec"]
    assert spec["shareProcessNamespace"] is True
    assert spec["automountServiceAccountToken"] is False  # the sidecar reads no API in this mode
    [agent] = spec["initContainers"]
    assert agent["name"] == "otel-cuda" and agent["restartPolicy"] == "Always"  # native sidecar, starts first
    [vllm_c] = spec["containers"]
    assert "--otlp-traces-endpoint=http://127.0.0.1:4317" in vllm_c["args"]
    assert vllm_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["path"] for p in (vllm_c["startupProbe"]["httpGet"], vllm_c["livenessProbe"]["httpGet"],
                                vllm_c["readinessProbe"]["httpGet"])} == {"/health"}
    assert vllm["spec"]["strategy"]["type"] == "Recreate"
    args, env = agent["args"], {e["name"]: e for e in agent["env"]}
    assert args[0] == "run" and "--k8s=downward" in args and "--match=vllm|VLLM" in args
    assert "--receiver-grpc=127.0.0.1:4317" in args and "--receiver-http=127.0.0.1:4318" in args
    assert "--metrics-address=0.0.0.0:9464" in args and "--health-address=0.0.0.0:8081" in args
    assert env["K8S_POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    assert env["K8S_CONTAINER_NAME"]["value"] == "vllm"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].endswith("-collector:4317")
    assert agent["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "readinessProbe" not in agent  # a tracing problem must not take vLLM out of its Service
    assert not by_kind(docs, "DaemonSet")
    assert not [r for r in by_kind(docs, "ClusterRole") if "collector" not in r["metadata"]["name"]]


def test_daemonset_mode_wiring(kube):
    docs, _ = install(kube, {"mode": "daemonset"})
    [ds] = by_kind(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True and spec["automountServiceAccountToken"] is True
    agent = spec["containers"][0]
    args = agent["args"]
    assert "--k8s=api" in args and "--pod-selector=app.kubernetes.io/component=inference" in args
    assert "--receiver-grpc=0.0.0.0:4317" in args
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "K8S_POD_NAME" not in {e["name"] for e in agent["env"]}
    # RBAC: read pods, nothing else.
    [role] = [r for r in by_kind(docs, "ClusterRole") if "collector" not in r["metadata"]["name"]]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    [binding] = [b for b in by_kind(docs, "ClusterRoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"]
    # The node-local receiver, and vLLM pointed at it; the vLLM pod is selected by the default selector.
    [svc] = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-receiver")]
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    [vllm] = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-vllm")]
    vspec = vllm["spec"]["template"]["spec"]
    assert "shareProcessNamespace" not in vspec
    assert f"--otlp-traces-endpoint=http://{svc['metadata']['name']}.llm.svc:4317" in vspec["containers"][0]["args"]
    assert vllm["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "inference"


def test_daemonset_hostport_variant(kube):
    docs, _ = install(kube, VALUE_SETS["daemonset-hostport-no-service"])
    ports = {p["name"]: p for p in agent_container(docs)["ports"]}
    assert ports["otlp-grpc"]["hostPort"] == 4317 and "hostPort" not in ports["metrics"]
    [vllm] = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-vllm")]
    assert "--otlp-traces-endpoint=http://$(HOST_IP):4317" in vllm["spec"]["template"]["spec"]["containers"][0]["args"]


def test_s3_archive_settings(kube):
    docs, _ = install(kube, VALUE_SETS["archive-s3-secret"])
    agent = agent_container(docs)
    env = {e["name"]: e for e in agent["env"]}
    assert "--archive=s3://bucket/otel-cuda" in agent["args"]
    assert "--archive-buffer=/var/lib/otel-cuda/buffer" in agent["args"]
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.minio:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    docs, notes = install(kube, VALUE_SETS["archive-s3-irsa"])
    [vllm] = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-vllm")]
    [sa] = [s for s in by_kind(docs, "ServiceAccount")
            if s["metadata"]["name"] == vllm["spec"]["template"]["spec"]["serviceAccountName"]]
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/otel-cuda")
    assert "AWS_ACCESS_KEY_ID" not in {e["name"] for e in agent_container(docs)["env"]}
    assert "IRSA" in notes


def test_collector_deploys_the_repository_configs(kube):
    for name, file in (("default", "otel-collector.yaml"), ("collector-remote-write", "otel-collector-remote-write.yaml"),
                       ("collector-s3", "otel-collector-s3.yaml")):
        docs, _ = install(kube, VALUE_SETS[name])
        [cm] = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-collector")]
        assert cm["data"]["config.yaml"].strip() == (ROOT / "collector-config" / file).read_text().strip(), name


def test_dashboard_configmap_has_the_sidecar_label(kube):
    docs, _ = install(kube, VALUE_SETS["existing-backends"])
    [cm] = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert json.loads(cm["data"]["otel-cuda.json"])["uid"] == "otel-cuda-overview"


def test_notes_say_how_to_open_jaeger_and_grafana(kube):
    _, notes = install(kube, {})
    assert re.search(r"port-forward svc/\S+-jaeger 16686:16686", notes)
    assert re.search(r"port-forward svc/\S+-grafana 3000:3000", notes)
    _, notes = install(kube, VALUE_SETS["existing-backends"])
    assert "grafana_dashboard=1" in notes and "Jaeger" in notes


# --- documentation of values ---------------------------------------------------------------------------------
def _documented_keys(text: str) -> list[str]:
    """Keys of values.yaml that lack a '# --' comment and are not inside a value documented as a whole."""
    lines = text.splitlines()
    entries = []  # (indent, key, documented)
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_.\"/-]+):", line)
        if not m or line.lstrip().startswith("#") or line.lstrip().startswith("- "):
            continue
        j, doc = i - 1, False
        while j >= 0 and lines[j].lstrip().startswith("#"):
            doc = doc or lines[j].lstrip().startswith("# --")
            j -= 1
        entries.append((len(m.group(1)), m.group(2), doc))
    missing, stack = [], []  # the ancestors of the current key: (indent, key, documented)
    for indent, key, doc in entries:
        while stack and stack[-1][0] >= indent:
            stack.pop()
        # A documented parent none of whose direct children is documented is a value documented as a whole
        # (resources, probes, annotations): its children need no comment of their own.
        opaque = any(pdoc and not any(c[2] for c in _children(entries, pi, pk)) for pi, pk, pdoc in stack)
        if not doc and not opaque:
            missing.append(".".join([s[1] for s in stack] + [key]))
        stack.append((indent, key, doc))
    return missing


def _children(entries, indent, key):
    out, inside, child_indent = [], False, None
    for e in entries:
        if inside:
            if e[0] <= indent:
                break
            if child_indent is None:
                child_indent = e[0]
            if e[0] == child_indent:
                out.append(e)
        elif e[0] == indent and e[1] == key:
            inside = True
    return out


def test_every_value_is_documented():
    assert _documented_keys((CHART / "values.yaml").read_text()) == []


def test_schema_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(values, node, path):
        assert node.get("additionalProperties") is False or "properties" not in node or path == "", path
        for k, v in values.items():
            props = node.get("properties", {})
            assert k in props, f"{path}{k} is not in values.schema.json"
            if isinstance(v, dict) and props[k].get("properties"):
                walk(v, props[k], f"{path}{k}.")

    walk(DEFAULT_VALUES, schema, "")


# --- the image ---------------------------------------------------------------------------------------------------
def test_dockerfile_is_minimal_and_matches_the_chart():
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (the Go Dockerfile parser)")
    cmds = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    stages = [i for i, c in enumerate(cmds) if c.cmd == "FROM"]
    assert len(stages) == 2 and all(cmds[i].value[0].startswith("debian:") for i in stages)
    runtime = cmds[stages[1]:]
    installs = " ".join(c.value[0] for c in runtime if c.cmd == "RUN")
    assert "python3-bpfcc" in installs
    for heavy in ("gcc", "clang", "build-essential", "linux-headers", "bpfcc-tools", "python3-pip"):
        assert not re.search(rf"(?<![\w-]){re.escape(heavy)}(?![\w-])", installs), heavy
    assert [c.value for c in runtime if c.cmd == "ENTRYPOINT"] == [("otel-cuda",)]
    exposed = {int(p) for c in runtime if c.cmd == "EXPOSE" for p in c.value}
    agent = DEFAULT_VALUES["agent"]
    assert exposed == {agent["receiver"]["grpcPort"], agent["receiver"]["httpPort"], agent["metricsPort"],
                       agent["healthPort"]}
    assert "useradd" in installs + " ".join(c.value[0] for c in runtime if c.cmd == "RUN")
    # Every path the build copies is let through .dockerignore.
    ignore = (ROOT / ".dockerignore").read_text()
    for c in cmds[:stages[1]]:
        if c.cmd == "COPY":
            for src in c.value[:-1]:
                assert f"!{src.rstrip('/').replace('[', '').replace(']', '')}" in ignore.replace("/", ""), src


@pytest.mark.parametrize("name", ["default", "daemonset", "archive-s3-secret", "agent-extras", "sidecar-http-protocol"])
def test_agent_command_line_is_what_otel_cuda_accepts(name, kube):
    """The rendered `otel-cuda run ...` parses and resolves with the sidecar's own CLI and settings."""
    from otel_cuda import cli, config

    agent = agent_container(install(kube, VALUE_SETS[name])[0])
    env = {e["name"]: e.get("value", "from-the-cluster") for e in agent["env"]}
    args = cli.parser().parse_args(agent["args"])  # SystemExit on an unknown flag
    assert args.command == "run"
    settings = config.resolve(args, env)
    assert settings.options["k8s"] in ("downward", "api")
    assert settings.options["metrics_address"].endswith(f":{DEFAULT_VALUES['agent']['metricsPort']}")
