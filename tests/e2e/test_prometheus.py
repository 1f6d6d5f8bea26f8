"""A real Prometheus server (Debian's package) scrapes the sidecar; PromQL returns the workload's call counts."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from support.harness import RunningSidecar, run_workload

pytestmark = [pytest.mark.root, pytest.mark.e2e]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def promql(port, query):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return {json.dumps(x["metric"], sort_keys=True): float(x["value"][1]) for x in body["data"]["result"]}


@pytest.fixture
def prometheus(tmp_path):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (scripts/setup.sh --test installs Debian's package)"
    metrics_port, port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: otel-cuda, static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n")
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1)
            break
        except OSError:
            time.sleep(0.3)
    yield metrics_port, port
    proc.terminate()
    proc.wait(30)


def test_promql_returns_the_call_counts(probes, prometheus):
    metrics_port, port = prometheus
    sidecar = RunningSidecar(probes, env={}, match=r"--tag prom-e2e", metrics_address=f"127.0.0.1:{metrics_port}")
    try:
        truth = run_workload("--tag", "prom-e2e", "--threads", "2", "--steps", "6", "--launches", "5",
                             "--start-delay-ms", "800")
        pid = truth["pid"]
        want = {f: n for f, n in truth["calls"].items() if n}
        query = f'sum by (cuda_function) (cuda_api_calls_total{{process_pid="{pid}"}})'
        got = {}
        deadline = time.time() + 30
        while time.time() < deadline:
            got = {json.loads(k)["cuda_function"]: int(v) for k, v in promql(port, query).items()}
            if got == want:
                break
            time.sleep(1)
        assert got == want
        launches = promql(port, f'sum(cuda_kernel_launches_total{{process_pid="{pid}",cuda_launch_type!="graph"}})')
        assert list(launches.values()) == [float(sum(truth["launches_by_kernel"].values()))]
        events = promql(port, 'otel_cuda_events_total{outcome=~"lost_ringbuf|skipped_by_kernel"}')
        assert list(events.values()) == [0.0, 0.0]
        want_named = {"named": float(sum(truth["launches_by_kernel"].values())), "unknown": 0.0}
        named = {}
        deadline = time.time() + 10  # counted as the events are read, which may trail the kernel's aggregates
        while named != want_named and time.time() < deadline:
            named = {json.loads(k)["outcome"]: v for k, v in
                     promql(port, "sum by (outcome) (otel_cuda_launches_total)").items()}
            time.sleep(0.5)
        assert named == want_named
    finally:
        sidecar.stop()
