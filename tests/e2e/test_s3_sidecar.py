"""The sidecar archiving to a real S3 HTTP server (moto) is SIGKILLed and restarted: every event of the workload
written before the kill is in S3 exactly once, counted against the workload's own ground truth."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from support.harness import run_workload
from support.s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, free_port

pytestmark = [pytest.mark.root, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]


def wait_ready(port, proc, timeout=120):
    """The sidecar's /readyz: BPF loaded and the pipeline running (compiling takes seconds on a busy machine)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the sidecar exited"
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the sidecar did not become ready")


def start_sidecar(s3, buffer, log, health_port):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_REGION": REGION, "AWS_ENDPOINT_URL_S3": s3.url, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "otel_cuda.cli", "run", "--match", "--tag s3-kill", "--archive", "s3://traces/run1",
         "--archive-buffer", str(buffer), "--metrics-address", "off",
         "--health-address", f"127.0.0.1:{health_port}", "--receiver-grpc", "off", "--receiver-http", "off", "--discovery-interval", "0.1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def s3_records(client):
    out = []
    for obj in client.list_objects_v2(Bucket="traces", Prefix="run1/").get("Contents", []):
        body = client.get_object(Bucket="traces", Key=obj["Key"])["Body"].read()
        out += [json.loads(line) for line in gzip.decompress(body).splitlines() if line.strip()]
    return out


def test_sigkill_during_the_run_loses_nothing_written_and_duplicates_nothing(tmp_path, testbed):
    with S3Server() as s3:
        client = s3.client()
        client.create_bucket(Bucket="traces")
        buffer = tmp_path / "buffer"
        with open(tmp_path / "sidecar.log", "w") as log:
            health = free_port()
            first = start_sidecar(s3, buffer, log, health)
            wait_ready(health, first)
            truth = run_workload("--tag", "s3-kill", "--threads", "2", "--steps", "10", "--launches", "4",
                                 "--start-delay-ms", "1000")
            time.sleep(2.5)  # past the archive's 1 s flush; the file is still open (rotation: 60 s), not uploaded
            assert not s3_records(client), "nothing was uploaded before the kill: recovery is what is tested"
            first.send_signal(signal.SIGKILL)
            first.wait()
            second = start_sidecar(s3, buffer, log, health)  # recovers the killed run's files and uploads them
            wait_ready(health, second)
            deadline = time.time() + 60
            expected = sum(truth["calls"].values())
            while time.time() < deadline:
                got = [r for r in s3_records(client) if r.get("pid") == truth["pid"] and r["type"] == "cuda_api"]
                if len(got) >= expected:
                    break
                time.sleep(1)
            second.send_signal(signal.SIGTERM)
            assert second.wait(120) == 0
        records = [r for r in s3_records(client) if r.get("pid") == truth["pid"] and r["type"] == "cuda_api"]
        identities = Counter((r["tid"], r["mono_ns"], r["func"]) for r in records)
        assert records and max(identities.values()) == 1, "an event reached S3 twice"
        assert Counter(r["func"] for r in records) == Counter({f: n for f, n in truth["calls"].items() if n})
        assert not list(buffer.rglob("*.jsonl.gz")), "uploaded files are deleted locally"
