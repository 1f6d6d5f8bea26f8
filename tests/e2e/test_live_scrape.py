"""Every metric the dashboards query from the sidecar exists, with that exact Prometheus name, in a live scrape."""

import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support.harness import RunningSidecar, run_workload

pytestmark = [pytest.mark.root, pytest.mark.e2e]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_dashboards import dashboard_metric_families  # noqa: E402


def test_dashboard_metrics_exist_in_a_live_scrape(probes, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * (1 << 20))
    sidecar = RunningSidecar(probes, env={}, match=r"--tag live-scrape", metrics_address=f"127.0.0.1:{port}")
    try:
        run_workload("--tag", "live-scrape", "--threads", "2", "--steps", "5", "--start-delay-ms", "800",
                     "--weights", str(weights), "--sleep-ms-total", "50")
        time.sleep(0.5)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        sidecar.stop()
    scraped = {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", text, re.M)}
    ours = {name for name, source in dashboard_metric_families().items() if source in ("sidecar", "system")}
    assert ours, "the dashboards query sidecar metrics"
    missing = sorted(n for n in ours if n not in scraped and f"{n}_bucket" not in scraped)
    assert not missing, f"queried by a dashboard but not exported: {missing}"
