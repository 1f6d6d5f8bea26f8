"""scripts/k3s-workflow.sh: shellcheck, its dry run (every command, in order, none run), the seed's settings in the
helm arguments, and those exact helm arguments rendered by the real Helm engine against the real chart.

No cluster, Docker engine or GPU is needed: the dry run prints the plan; the helm values it would pass are linted
and installed (helm-sdkpy) into the kube-apiserver stand-in of test_chart.py, and every object the script names
(deployments, services, containers, ports, labels, the Grafana Secret) is looked up in what Helm rendered.
"""
from __future__ import annotations

import asyncio
import copy
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "k3s-workflow.sh"
CHART = ROOT / "helm" / "otel-cuda"
DOC = ROOT / "docs" / "workflow.md"
BASH = shutil.which("bash") or "/bin/bash"

# The seed's settings, all at once (and the secrets that must never be printed).
SEED_ENV = {
    "S3_BUCKET": "seed-bucket", "S3_PREFIX": "/runs/a/", "UPLOAD_ENABLED": "true", "TRACE_INTERVAL": "30",
    "TRACE_DIR": "/data/traces", "TARGET_PROCESS": "VLLM::EngineCore|python{1,2}",
    "HF_TOKEN": "hf_DoNotPrintMe123", "AWS_ACCESS_KEY_ID": "AKIADONOTPRINT", "AWS_SECRET_ACCESS_KEY": "s3cr3t/DoNotPrint",
    "S3_ENDPOINT": "http://minio.example.net:9000", "S3_REGION": "eu-west-1",
    "MODEL": "meta-llama/Llama-3.2-1B-Instruct", "VLLM_ARGS": "--max-model-len 4096", "VLLM_IMAGE": "reg.local:5000/vllm/otel:v1",
}
SECRETS = ("hf_DoNotPrintMe123", "AKIADONOTPRINT", "s3cr3t/DoNotPrint")


def script_env(tmp_path: Path, **extra: str) -> dict:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "IMAGE_TAG": "test", "BUILDER": "docker", "OUT_DIR": str(tmp_path / "out")}
    env.update(extra)
    return env


def sh(tmp_path: Path, *args: str, env: dict | None = None, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SCRIPT), *args], cwd=tmp_path, env=env or script_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=60)


def dry(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    p = sh(tmp_path, "--dry-run", *args, **extra)
    assert p.returncode == 0, p.stderr + p.stdout
    return p


def commands(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def find(cmds: list[str], pattern: str, start: int = 0) -> int:
    for i in range(start, len(cmds)):
        if re.search(pattern, cmds[i]):
            return i
    raise AssertionError(f"no command after #{start} matches {pattern!r}:\n" + "\n".join(cmds[start:]))


def helm_line(cmds: list[str]) -> list[str]:
    [line] = [c for c in cmds if c.startswith("helm upgrade --install ")]
    return shlex.split(line)


# --- helm's --set / --set-string, as Helm's strvals reads them ------------------------------------------------------
def _split_unescaped(s: str, sep: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            cur += s[i:i + 2]
            i += 2
            continue
        if s[i] == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += s[i]
        i += 1
    return parts + [cur]


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _typed(v: str):
    if v in ("true", "false"):
        return v == "true"
    if v == "null":
        return None
    if re.fullmatch(r"-?[0-9]+", v):
        return int(v)
    return v


def _put(values: dict, key: str, value) -> None:
    node: dict | list = values
    parts = key.split(".")
    for n, part in enumerate(parts):
        m = re.fullmatch(r"([^\[]+)(?:\[(\d+)\])?", part)
        name, idx = m.group(1), m.group(2)
        last = n == len(parts) - 1
        if idx is None:
            if last:
                node[name] = value
            else:
                node = node.setdefault(name, {})
        else:
            lst = node.setdefault(name, [])
            i = int(idx)
            while len(lst) <= i:
                lst.append(None)
            if last:
                lst[i] = value
            else:
                lst[i] = lst[i] if isinstance(lst[i], dict) else {}
                node = lst[i]


def helm_values(argv: list[str]) -> dict:
    """The values the helm command line sets (-f files are not expected here)."""
    values: dict = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--set", "--set-string"):
            for pair in _split_unescaped(argv[i + 1], ","):
                key, _, raw = pair.partition("=")
                v = _unescape(raw)
                _put(values, key, v if a == "--set-string" else _typed(v))
            i += 2
            continue
        assert a not in ("-f", "--values", "--set-json", "--set-file"), a
        i += 1
    return values


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# --- shellcheck, usage ------------------------------------------------------------------------------------------------
def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.fail("shellcheck not found: install it with `bash scripts/setup.sh --test`")
    p = subprocess.run([shellcheck, "--severity=style", "--external-sources", str(SCRIPT)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_help_lists_every_command(tmp_path):
    p = sh(tmp_path, "help")
    assert p.returncode == 0, p.stderr
    for c in ("all", "build", "import", "install", "wait", "prompt", "batch", "verify", "status", "logs", "destroy",
              "--dry-run"):
        assert re.search(rf"^\s+{re.escape(c)}\b", p.stdout, re.M), c


@pytest.mark.parametrize("args", [["bogus"], ["--dry-run", "deploy"], ["--frobnicate", "all"], [], ["all", "extra"]])
def test_unknown_command_exits_nonzero_with_usage(tmp_path, args):
    p = sh(tmp_path, *args)
    assert p.returncode != 0
    assert "usage: scripts/k3s-workflow.sh" in p.stderr
    assert not commands(p.stdout)


# --- the dry run of `all` ---------------------------------------------------------------------------------------------
def test_dry_run_all_prints_every_step_in_order(tmp_path):
    p = dry(tmp_path, "all")
    cmds = commands(p.stdout)
    out = str(tmp_path / "out")
    steps = [
        r"^docker build --build-arg VERSION=\S+ -t otel-cuda:test \.$",
        r"^docker save otel-cuda:test \| (sudo )?k3s ctr images import -$",
        r"^kubectl get nodes",
        r"^kubectl get runtimeclass nvidia$",
        r"^helm upgrade --install otel-cuda \./helm/otel-cuda --namespace llm --create-namespace ",
        r"^kubectl -n llm rollout status deploy/otel-cuda-collector ",
        r"^kubectl -n llm rollout status deploy/otel-cuda-jaeger ",
        r"^kubectl -n llm rollout status deploy/otel-cuda-vllm --timeout=30m$",
        r"^kubectl -n llm exec deploy/otel-cuda-vllm -c otel-cuda -- python3 -c .*/readyz",
        r"^kubectl -n llm port-forward svc/otel-cuda-vllm 8000:8000 .*&$",
        r"^curl .*--retry .* http://127\.0\.0\.1:8000/health$",
        rf"^\.venv/bin/otel-cuda loadgen --url http://127\.0\.0\.1:8000 .* -n 1 --workers 1 --out {out}/single\.json$",
        rf"^\.venv/bin/otel-cuda loadgen --url http://127\.0\.0\.1:8000 .* -n 32 --workers 8 --out {out}/batch\.json$",
        r"^kubectl -n llm port-forward svc/otel-cuda-jaeger 16686:16686 .*&$",
        rf"^\.venv/bin/otel-cuda verify {out}/single\.json --jaeger http://127\.0\.0\.1:16686",
        rf"^\.venv/bin/otel-cuda verify {out}/batch\.json --jaeger http://127\.0\.0\.1:16686",
        # no S3: the archive is copied from the pod's volume after it rotates, and checked
        r"^sleep 75$",
        rf"^kubectl -n llm cp -c otel-cuda '<vllm-pod>:/var/lib/otel-cuda/archive' {out}/archive$",
        rf"^\.venv/bin/otel-cuda verify {out}/batch\.json .*--archive {out}/archive$",
    ]
    at = -1
    for pattern in steps:
        at = find(cmds, pattern, at + 1)
    assert at == len(cmds) - 1, cmds[at + 1:]
    # Then where to look, after the last command.
    tail = p.stdout[p.stdout.rindex("\n+ "):]
    for needle in ("where to look", "Jaeger:", "http://127.0.0.1:16686", "port-forward svc/otel-cuda-jaeger 16686:16686",
                   "Grafana:", "port-forward svc/otel-cuda-grafana 3000:3000", "otel-cuda: CUDA inside vLLM",
                   "Prometheus:", "S3:", "otel-cuda analyze /var/lib/otel-cuda/archive", f"{out}/batch.json"):
        assert needle in tail, needle
    # A dry run claims no success.
    assert "OK:" not in p.stdout and "verified:" not in p.stdout and "built otel-cuda" not in p.stdout


def test_dry_run_runs_nothing(tmp_path):
    # Every tool the plan names is a stub that records being called; none may be.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("docker", "nerdctl", "buildah", "kubectl", "helm", "k3s", "sudo", "curl", "sleep", "mkdir", "rm",
                 "python3"):
        (stubs / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {log}\nexit 1\n")
        (stubs / tool).chmod(0o755)
    env = script_env(tmp_path, PATH=f"{stubs}:{os.environ['PATH']}", **SEED_ENV)
    for args in (["--dry-run", "all"], ["--dry-run", "status"], ["--dry-run", "logs"], ["--dry-run", "destroy"]):
        p = sh(tmp_path, *args, env=env)
        assert p.returncode == 0, p.stderr
        assert commands(p.stdout)
    assert not log.exists(), log.read_text()
    assert not (tmp_path / "out").exists()


def test_dry_run_env_is_the_same_as_the_flag(tmp_path):
    a = dry(tmp_path, "all").stdout
    b = sh(tmp_path, "all", DRY_RUN="1")
    assert b.returncode == 0, b.stderr
    assert commands(b.stdout) == commands(a)


def test_install_is_self_contained(tmp_path):
    values = helm_values(helm_line(commands(dry(tmp_path, "install").stdout)))
    assert values["mode"] == "sidecar"
    for part in ("vllm", "collector", "jaeger", "prometheus", "grafana"):
        assert values[part]["enabled"] is True, part
    assert values["image"] == {"repository": "otel-cuda", "tag": "test", "pullPolicy": "Never"}
    assert values["runtimeClassName"] == "nvidia"
    assert values["vllm"]["modelCache"] == {"type": "persistentVolumeClaim", "storageClassName": "local-path"}
    assert "archive" not in values.get("agent", {})  # no seed settings: the chart's defaults


def test_batch_sequential_and_stream(tmp_path):
    cmds = commands(dry(tmp_path, "batch", BATCH_MODE="sequential", BATCH_N="5", STREAM="1").stdout)
    line = cmds[find(cmds, r"otel-cuda loadgen ")]
    assert re.search(r" --stream .*-n 5 --workers 1 ", line), line
    p = sh(tmp_path, "--dry-run", "batch", BATCH_MODE="sometimes")
    assert p.returncode != 0 and "remedy:" in p.stderr


# --- the seed's settings ---------------------------------------------------------------------------------------------
def test_seed_env_maps_into_helm_values(tmp_path):
    p = dry(tmp_path, "all", **SEED_ENV)
    cmds = commands(p.stdout)
    values = helm_values(helm_line(cmds))
    agent = values["agent"]
    assert agent["match"] == "VLLM::EngineCore|python{1,2}"  # TARGET_PROCESS (its comma escaped for --set)
    assert agent["archive"]["destination"] == "s3://seed-bucket/runs/a"  # S3_BUCKET + S3_PREFIX, UPLOAD_ENABLED
    assert agent["archive"]["rotateSeconds"] == 30  # TRACE_INTERVAL, an integer as the schema wants
    assert agent["archive"]["volume"] == {"type": "hostPath", "hostPath": "/data/traces"}  # TRACE_DIR on the node
    assert agent["s3"] == {"existingSecret": "otel-cuda-s3", "endpoint": "http://minio.example.net:9000",
                           "region": "eu-west-1"}
    assert values["vllm"]["model"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert values["vllm"]["hfToken"] == {"secretName": "otel-cuda-hf-token"}
    assert values["vllm"]["image"] == {"repository": "reg.local:5000/vllm/otel", "tag": "v1"}
    assert values["vllm"]["extraArgs"] == ["--max-model-len", "4096"]
    # The Secrets are made from stdin before the install; the values never reach the output (or an argv).
    i_hf = find(cmds, r"create secret generic otel-cuda-hf-token --from-env-file=/dev/stdin .*\| kubectl -n llm apply")
    i_s3 = find(cmds, r"create secret generic otel-cuda-s3 --from-env-file=/dev/stdin .*\| kubectl -n llm apply")
    assert max(i_hf, i_s3) < find(cmds, r"^helm upgrade --install ")
    for secret in SECRETS:
        assert secret not in p.stdout + p.stderr
    # verify checks the S3 archive, waiting at least one rotation plus the upload.
    line = cmds[find(cmds, r"otel-cuda verify \S+/batch\.json ")]
    assert "--archive s3://seed-bucket/runs/a --endpoint-url http://minio.example.net:9000" in line
    assert "kubectl -n llm cp" not in p.stdout
    loadgen = cmds[find(cmds, r"otel-cuda loadgen ")]
    assert "--model meta-llama/Llama-3.2-1B-Instruct" in loadgen
    assert "s3://seed-bucket/runs/a" in p.stdout[p.stdout.rindex("\n+ "):]  # where to look


def test_upload_disabled_keeps_the_archive_local(tmp_path):
    cmds = commands(dry(tmp_path, "all", S3_BUCKET="b", UPLOAD_ENABLED="false").stdout)
    assert "destination" not in helm_values(helm_line(cmds)).get("agent", {}).get("archive", {})
    find(cmds, r"^kubectl -n llm cp -c otel-cuda ")


def test_s3_trace_dir_is_the_destination(tmp_path):
    values = helm_values(helm_line(commands(dry(tmp_path, "install", TRACE_DIR="s3://tb/p").stdout)))
    assert values["agent"]["archive"] == {"destination": "s3://tb/p"}


@pytest.mark.parametrize("env", [{"TRACE_INTERVAL": "1.5"}, {"TRACE_INTERVAL": "0"}, {"TRACE_DIR": "traces"},
                                 {"UPLOAD_ENABLED": "maybe", "S3_BUCKET": "b"}, {"MODEL_CACHE": "nfs"}])
def test_bad_settings_fail_with_a_remedy(tmp_path, env):
    p = sh(tmp_path, "--dry-run", "install", **env)
    assert p.returncode != 0
    assert "FAILED:" in p.stderr and "remedy:" in p.stderr


def test_missing_tool_fails_with_a_remedy(tmp_path):
    # A real (not dry) run on a machine without kubectl: stops before anything, naming how to get it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "id", "dirname", "git"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    p = sh(tmp_path, "install", PATH=str(bin_dir))
    assert p.returncode == 1
    assert "FAILED: kubectl not found" in p.stderr and "remedy:" in p.stderr


@pytest.mark.parametrize("builder,build,imports", [
    ("nerdctl", r"^nerdctl build .*-t otel-cuda:test \.$", [r"^nerdctl save otel-cuda:test \| (sudo )?k3s ctr images import -$"]),
    ("buildah", r"^buildah bud .*-t otel-cuda:test \.$", [r"^buildah push otel-cuda:test docker-archive:\S+\.tar:otel-cuda:test$",
                                                          r"^(sudo )?k3s ctr images import \S+\.tar$"]),
])
def test_other_builders(tmp_path, builder, build, imports):
    cmds = commands(dry(tmp_path, "build", BUILDER=builder).stdout)
    find(cmds, build)
    cmds = commands(dry(tmp_path, "import", BUILDER=builder).stdout)
    at = -1
    for pattern in imports:
        at = find(cmds, pattern, at + 1)


# --- status, logs, destroy ---------------------------------------------------------------------------------------------
def test_status_logs_destroy(tmp_path):
    cmds = commands(dry(tmp_path, "status").stdout)
    assert cmds == ["helm -n llm status otel-cuda",
                    "kubectl -n llm get deploy,pods,svc,pvc -l app.kubernetes.io/instance=otel-cuda -o wide",
                    "kubectl -n llm get events --sort-by=.lastTimestamp"]
    cmds = commands(dry(tmp_path, "logs").stdout)
    assert cmds == ["kubectl -n llm logs deploy/otel-cuda-vllm -c otel-cuda --tail=200",
                    "kubectl -n llm logs deploy/otel-cuda-vllm -c vllm --tail=200"]
    assert commands(dry(tmp_path, "logs", "collector").stdout) == [
        "kubectl -n llm logs deploy/otel-cuda-collector --tail=200"]
    assert sh(tmp_path, "--dry-run", "logs", "nope").returncode != 0
    cmds = commands(dry(tmp_path, "destroy").stdout)
    assert cmds == ["helm -n llm uninstall otel-cuda --ignore-not-found --wait",
                    "kubectl delete namespace llm --ignore-not-found --wait=true --timeout=5m"]
    assert commands(dry(tmp_path, "destroy", KEEP_NAMESPACE="1").stdout) == [
        "helm -n llm uninstall otel-cuda --ignore-not-found --wait"]
    cmds = commands(dry(tmp_path, "destroy", NAMESPACE="gpu", RELEASE="demo").stdout)
    assert cmds[0] == "helm -n gpu uninstall demo --ignore-not-found --wait"


# --- the exact helm values, through the real Helm engine and chart ------------------------------------------------------
def _helm():
    return pytest.importorskip("helm_sdkpy", reason="helm-sdkpy is the Helm engine (scripts/setup.sh --test)")


@pytest.fixture(scope="module")
def kube():
    _helm()
    from test_chart import FakeKubeAPI  # the kube-apiserver stand-in of the chart's tests (tests/unit)

    api = FakeKubeAPI()
    yield api
    api.close()


def helm_lint(values: dict, tmp_path: Path) -> dict:
    helm = _helm()
    chart = tmp_path / "chart" / "otel-cuda"
    shutil.copytree(CHART, chart)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    (chart / "values.yaml").write_text(yaml.safe_dump(merge(defaults, values), sort_keys=False))
    return asyncio.run(helm.Lint(helm.Configuration(namespace="llm")).run(str(chart)))


def helm_install(kube, release: str, namespace: str, values: dict) -> tuple[list[dict], str]:
    helm = _helm()
    cfg = helm.Configuration(namespace=namespace, kubeconfig=kube.kubeconfig)
    rel = asyncio.run(helm.Install(cfg).run(release, str(CHART), values=values, wait=False, timeout=60))
    return [d for d in yaml.safe_load_all(rel["manifest"]) if d], (rel.get("info") or {}).get("notes", "")


CASES = {
    "defaults": {},
    "seed": SEED_ENV,
    "other-release": {"RELEASE": "demo", "NAMESPACE": "gpu", "RUNTIME_CLASS": "", "MODEL_CACHE": "emptyDir",
                      "HF_TOKEN_SECRET": "hf", "S3_BUCKET": "b", "S3_SECRET": "keys", "VLLM_GPUS": "2"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_scripts_helm_values_render_against_the_chart(case, kube, tmp_path):
    env = CASES[case]
    release, namespace = env.get("RELEASE", "otel-cuda"), env.get("NAMESPACE", "llm")
    p = dry(tmp_path, "all", **env)
    cmds = commands(p.stdout)
    argv = helm_line(cmds)
    assert argv[3:7] == [release, "./helm/otel-cuda", "--namespace", namespace]
    values = helm_values(argv)

    result = helm_lint(values, tmp_path)
    assert not result.get("Errors"), result
    assert not [m for m in result.get("Messages") or [] if m["Severity"] >= 2], result  # warnings or errors
    docs, _ = helm_install(kube, release, namespace, values)

    import kubernetes_validate

    for d in docs:
        kubernetes_validate.validate(d, "1.35.0", strict=True)
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deployments = {name: d for (kind, name), d in objects.items() if kind == "Deployment"}
    services = {name: d for (kind, name), d in objects.items() if kind == "Service"}

    # Every deployment and container the script waits on, execs into, reads logs of or copies from exists.
    logs = [c for which in ("", "collector", "jaeger", "prometheus", "grafana")
            for c in commands(dry(tmp_path, "logs", *([which] if which else []), **env).stdout)]
    for c in cmds + logs + [line for line in p.stdout.splitlines() if "kubectl" in line]:
        for name in re.findall(r"deploy/([a-z0-9-]+)", c):
            assert name in deployments, (name, c)
            spec = deployments[name]["spec"]["template"]["spec"]
            names = {x["name"] for x in spec.get("containers", []) + spec.get("initContainers", [])}
            for container in re.findall(r"(?:-c|logs \S+ -c) ([a-z0-9-]+)", c):
                assert container in names, (container, c)
        # Every service it port-forwards to, on a port that service has.
        for name, port in re.findall(r"port-forward svc/([a-z0-9-]+) \d+:(\d+)", c):
            assert name in services, (name, c)
            assert int(port) in {sp["port"] for sp in services[name]["spec"]["ports"]}, (name, port)
    vllm = deployments[re.search(r"rollout status deploy/(\S+-vllm) ", "\n".join(cmds)).group(1)]
    pod = vllm["spec"]["template"]
    spec = pod["spec"]
    agent = next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "otel-cuda")
    vllm_c = next(c for c in spec["containers"] if c["name"] == "vllm")

    # The label selector of `kubectl get pod -l` (archive copy) and `status` selects the vLLM pod.
    status = commands(dry(tmp_path, "status", **env).stdout)
    selectors = re.findall(r"-l (\S+)", "\n".join(cmds + status))
    assert selectors
    for sel in selectors:
        for pair in sel.split(","):
            k, _, v = pair.partition("=")
            assert pod["metadata"]["labels"].get(k) == v, (pair, pod["metadata"]["labels"])
    # The readiness check's port is the sidecar's health port, and the archive path is where it writes.
    ready = cmds[find(cmds, r"exec deploy/\S+ -c otel-cuda -- python3 ")]
    port = int(re.search(r"127\.0\.0\.1:(\d+)/readyz", ready).group(1))
    assert port in {p_["containerPort"] for p_ in agent["ports"]}
    # The Grafana password line names the Secret and key the chart creates.
    m = re.search(r"get secret (\S+) -o jsonpath='\{\.data\.([a-z-]+)\}'", p.stdout)
    assert ("Secret", m.group(1)) in objects and m.group(2) in objects[("Secret", m.group(1))].get("data", {})

    # The image built and imported is the one the sidecar runs, from K3s's store.
    assert agent["image"] == "otel-cuda:test" and agent["imagePullPolicy"] == "Never"
    args = agent["args"]
    if case == "defaults":
        assert "--archive=/var/lib/otel-cuda/archive" in args
        source = shlex.split(cmds[find(cmds, r"kubectl -n llm cp ")])[6]
        assert f"--archive={source.split(':', 1)[1]}" in args  # the copy reads where the sidecar writes
        assert spec["runtimeClassName"] == "nvidia"
        [pvc] = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        assert pvc["spec"]["storageClassName"] == "local-path"
        assert f"--model={values['vllm']['model']}" in vllm_c["args"] or values["vllm"]["model"] in vllm_c["args"]
    if case == "seed":
        assert "--match=VLLM::EngineCore|python{1,2}" in args
        assert "--archive=s3://seed-bucket/runs/a" in args
        assert "--archive-rotate-seconds=30" in args
        env_ = {e["name"]: e for e in agent["env"]}
        assert env_["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "otel-cuda-s3"
        assert env_["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.example.net:9000"
        volumes = [v for v in spec["volumes"] if "hostPath" in v and v["hostPath"]["path"] == "/data/traces"]
        assert volumes, spec["volumes"]
        assert any(m_["name"] == volumes[0]["name"] and m_["mountPath"] == "/var/lib/otel-cuda"
                   for m_ in agent["volumeMounts"]), agent["volumeMounts"]
        venv = {e["name"]: e for e in vllm_c.get("env", [])}
        assert venv["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "otel-cuda-hf-token"
        assert vllm_c["image"] == "reg.local:5000/vllm/otel:v1"
        assert "--max-model-len" in vllm_c["args"] and "4096" in vllm_c["args"]
        assert any("meta-llama/Llama-3.2-1B-Instruct" in a for a in vllm_c["args"])
    if case == "other-release":
        assert "runtimeClassName" not in spec
        assert vllm_c["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert "--archive=s3://b" in args
        assert {e["name"]: e for e in agent["env"]}["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "keys"
        assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


# --- the doc --------------------------------------------------------------------------------------------------------------
def test_doc_covers_every_command_and_setting(tmp_path):
    text = DOC.read_text()
    usage = sh(tmp_path, "help").stdout
    settings = re.findall(r"^  ([A-Z][A-Z0-9_]+)\s", usage.split("settings")[1], re.M)
    assert len(settings) > 20
    for name in settings:
        assert f"`{name}`" in text, f"{name} is not in docs/workflow.md"
    for c in ("all", "build", "import", "install", "wait", "prompt", "batch", "verify", "where", "status", "logs",
              "destroy", "--dry-run"):
        assert f"k3s-workflow.sh {c}" in text or f"k3s-workflow.sh --dry-run {c}" in text or c == "--dry-run" and c in text, c
    assert "## What was not run here" in text


# --- a real (not dry) run of `all`, the cluster and the image tools stubbed ----------------------------------------------
# docker, k3s, helm and kubectl are stubs that record their argv and stdin (kubectl port-forward becomes a sleep
# that the script must stop on exit; kubectl cp writes an archive file of the run). One local HTTP server is both
# vLLM (health, models, completions: it notes each request's traceparent) and Jaeger's query API (the trace of
# each request: llm_request under loadgen's span, with cuda.prefill and cuda.decode children). curl, loadgen and
# verify are the real ones.
STUB = r'''#!PYTHON
import gzip, json, os, sys
tool = os.path.basename(sys.argv[0])
argv = [tool] + sys.argv[1:]
rec = {"argv": argv, "pid": os.getpid()}

def log():
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps(rec) + "\n")

if tool == "kubectl" and "port-forward" in argv:
    log()
    os.execv("/bin/sleep", ["sleep", "300"])
if tool == "docker" and argv[1] == "save":
    log(); sys.stdout.write("image-tar"); sys.exit(0)
if (tool == "k3s" and argv[-1] == "-") or (tool == "kubectl" and ("apply" in argv or "--from-env-file=/dev/stdin" in argv)):
    rec["stdin"] = sys.stdin.read()
if tool == "kubectl" and "create" in argv:
    log(); sys.stdout.write("apiVersion: v1\nkind: Secret\n"); sys.exit(0)
if tool == "kubectl" and "get" in argv and "nodes" in argv and any(a.startswith("jsonpath") for a in argv):
    log(); sys.stdout.write("1 "); sys.exit(0)
if tool == "kubectl" and "get" in argv and "pod" in argv:
    log(); sys.stdout.write("vllm-pod-0"); sys.exit(0)
if tool == "kubectl" and "cp" in argv:
    dest = argv[-1]
    batch = json.load(open(os.path.join(os.environ["OUT_DIR"], "batch.json")))
    os.makedirs(os.path.join(dest, "node", "llm"), exist_ok=True)
    with gzip.open(os.path.join(dest, "node", "llm", "1-2-3-0.jsonl.gz"), "wt") as f:
        f.write(json.dumps({"v": 1, "type": "cuda_api", "ts": batch["started_ns"] + 1, "pid": 1, "tid": 1,
                            "func": "cuLaunchKernel", "phase": "entry"}) + "\n")
log()
'''


class FakeVllmAndJaeger:
    def __init__(self, complete: bool = True):
        import json
        import threading
        from http.server import ThreadingHTTPServer

        from support.http_json import JsonHandler

        self.traces: dict[str, str] = {}  # trace id -> loadgen's span id
        fake = self

        class H(JsonHandler):

            def do_GET(self):
                if self.path in ("/health", "/"):
                    return self._json(200, {})
                if self.path == "/v1/models":
                    return self._json(200, {"data": [{"id": "m", "object": "model"}]})
                m = re.fullmatch(r"/api/traces/([0-9a-f]{32})", self.path)
                if m and m.group(1) in fake.traces:
                    tid, parent = m.group(1), fake.traces[m.group(1)]
                    llm = "a" * 16

                    def span(sid, name, parent_id):
                        return {"traceID": tid, "spanID": sid, "operationName": name, "processID": "p1", "tags": [],
                                "references": [{"refType": "CHILD_OF", "traceID": tid, "spanID": parent_id}]}
                    spans = [span(llm, "llm_request", parent), span("b" * 16, "cuda.prefill", llm)]
                    if complete:
                        spans.append(span("c" * 16, "cuda.decode", llm))
                    return self._json(200, {"data": [{"traceID": tid, "spans": spans,
                                                      "processes": {"p1": {"serviceName": "vllm"}}}]})
                return self._json(404, {"errors": [{"code": 404, "msg": "not found"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                _, tid, sid, _ = self.headers["traceparent"].split("-")
                fake.traces[tid] = sid
                n = body.get("max_tokens", 16)
                self._json(200, {"id": "cmpl-1", "choices": [{"index": 0, "text": "a " * n, "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _planned(dry_stdout: str, tools: set[str]) -> list[list[str]]:
    """The dry run's commands as argv lists (pipelines split, redirections and comments dropped), for `tools`."""
    out = []
    for line in commands(dry_stdout):
        for part in line.split(" | "):
            argv = [a for a in shlex.split(part, comments=True) if not re.match(r"^(>|2>|&$)", a)]
            if argv and argv[0] in tools:
                out.append(argv)
    return out


@pytest.mark.parametrize("complete", [True, False])
def test_real_run_of_all_against_stubs(tmp_path, complete):
    import json
    import sys

    if not shutil.which("curl"):
        pytest.skip("curl is needed (apt-get install curl)")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    tools = {"docker", "k3s", "helm", "kubectl", "sleep"}
    for tool in tools:
        (stubs / tool).write_text(STUB.replace("PYTHON", sys.executable))
        (stubs / tool).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    server = FakeVllmAndJaeger(complete=complete)
    try:
        env = script_env(tmp_path, PATH=f"{stubs}:{os.environ['PATH']}", STUB_LOG=str(log),
                         VLLM_LOCAL_PORT=str(server.port), JAEGER_LOCAL_PORT=str(server.port),
                         MODEL="m", HF_TOKEN="hf_DoNotPrintMe123", TARGET_PROCESS="vllm", BATCH_N="6",
                         BATCH_WORKERS="3", VERIFY_TIMEOUT="3", KUBECONFIG=str(tmp_path / "kubeconfig"))
        plan = subprocess.run([BASH, str(SCRIPT), "--dry-run", "all"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
        assert plan.returncode == 0, plan.stderr
        p = subprocess.run([BASH, str(SCRIPT), "all"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    finally:
        server.close()
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    out_dir = tmp_path / "out"
    # What ran is what the dry run printed, in the same order (the pod name is known only when it runs).
    expected = [[a.replace("<vllm-pod>", "vllm-pod-0") for a in argv] for argv in _planned(plan.stdout, tools)]
    if not complete:  # verify fails before the archive is copied
        expected = [a for a in expected if a[0] != "sleep" and "cp" not in a and "pod" not in a]
    assert [c["argv"] for c in calls] == expected
    # The Hugging Face token went through stdin only.
    [secret] = [c for c in calls if "create" in c["argv"] and "secret" in c["argv"]]
    assert secret["stdin"] == "HF_TOKEN=hf_DoNotPrintMe123\n"
    assert not [c for c in calls if any("hf_DoNotPrintMe123" in a for a in c["argv"])]
    assert "hf_DoNotPrintMe123" not in p.stdout + p.stderr
    # The port-forwards it started are stopped.
    for c in calls:
        if "port-forward" in c["argv"]:
            with pytest.raises(ProcessLookupError):
                os.kill(c["pid"], 0)
    single = json.loads((out_dir / "single.json").read_text())
    batch = json.loads((out_dir / "batch.json").read_text())
    assert single["n"] == 1 and batch["n"] == 6 and batch["workers"] == 3
    assert "where to look" in p.stdout
    assert f"/trace/{single['requests'][0]['trace_id']}" in p.stdout
    if complete:
        assert p.returncode == 0, p.stdout + p.stderr
        assert "OK: built, deployed, traced and verified" in p.stdout
        assert (out_dir / "archive").is_dir()
    else:
        assert p.returncode == 1
        assert "no cuda.decode child" in p.stdout + p.stderr
        assert "FAILED: otel-cuda verify" in p.stderr and "remedy:" in p.stderr
