"""`otel-cuda demo`: the whole path on this machine, no GPU needed, every number checked against ground truth.

1. builds the test bed (a fake libcuda.so.1 with the real driver signatures) if needed;
2. starts a recording OTLP receiver standing in for the Collector, and the sidecar (real BPF) exporting to it;
3. runs the fake-driver workload (its own exact call counts are the ground truth) after the sidecar;
4. runs a vLLM-shaped server (API process + engine process on the fake driver) exporting `llm_request` spans to
   the sidecar's receiver, and sends it concurrent requests, each with a W3C traceparent;
5. stops everything in order and compares what arrived downstream and in the archive with the ground truths.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTBED = REPO / "testbed"
WORKLOAD = TESTBED / "build" / "workload"
TAG = "otel-cuda-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_testbed() -> None:
    try:
        subprocess.run(["make", "-s", "-C", str(TESTBED)], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("make is not installed (apt-get install make gcc, or run scripts/setup.sh)") from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"building the test bed failed: {exc.stderr.strip()[-500:]}") from None


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def archive_records(path: Path) -> list[dict]:
    out = []
    for f in sorted(path.rglob("*.jsonl*")):
        if f.name.endswith(".part"):
            continue
        with (gzip.open(f, "rt") if f.suffix == ".gz" else open(f)) as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


def run_demo(args) -> dict:
    from .bpf import Probes
    from .config import resolve
    from .loadgen import LoadConfig, run_load
    from .otlp_sink import OtlpSink
    from .sidecar import start

    build_testbed()
    workdir = Path(args.workdir).resolve()
    archive_dir = workdir / "archive"
    if archive_dir.exists():
        for f in archive_dir.rglob("*"):
            if f.is_file():
                f.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    weights = workdir / "model.safetensors"
    if not weights.exists() or weights.stat().st_size != args.weights_bytes:
        with open(weights, "wb") as f:
            f.write(os.urandom(args.weights_bytes))

    sink = OtlpSink(grpc_address="127.0.0.1:0", json_path=str(workdir / "downstream-otlp.jsonl")).start()
    receiver_port, metrics_port = free_port(), free_port()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.grpc_port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    ns = argparse.Namespace(
        match=rf"(workload .*--tag {TAG}|vllm_like\.py engine)", archive=str(archive_dir),
        receiver_grpc=f"127.0.0.1:{receiver_port}", receiver_http="off",
        metrics_address=f"127.0.0.1:{metrics_port}", health_address="off", discovery_interval="0.1")
    settings = resolve(ns, env={})
    probes = Probes(settings.bpf)
    sidecar = start(settings, probes, env=env)
    stop = threading.Event()
    runner = threading.Thread(target=sidecar.run, args=(stop,), name="sidecar", daemon=True)
    runner.start()
    sidecar.pipeline.ready.wait(10)
    server = None
    try:
        # 3. the workload, started after the sidecar (it waits a second before its first CUDA call, the time
        # discovery needs to see a new process and attach)
        workload = subprocess.run(
            [str(WORKLOAD), "--tag", TAG, "--threads", str(args.threads), "--steps", str(args.steps),
             "--launches", "16", "--graph-every", "4", "--start-delay-ms", "1000",
             "--weights", str(weights), "--mmap-bytes", str(args.weights_bytes // 2)],
            check=True, capture_output=True, text=True, timeout=300)
        truth = json.loads(workload.stdout)

        # 4. the vLLM-shaped server, its engine traced, its API server exporting llm_request to our receiver
        port = free_port()
        truth_file = workdir / "vllm-like-ground-truth.json"
        server = subprocess.Popen(
            [sys.executable, str(TESTBED / "vllm_like.py"), "serve", "--port", str(port),
             "--otlp-traces-endpoint", f"http://127.0.0.1:{receiver_port}", "--ground-truth", str(truth_file)],
            env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_SERVICE_NAME": "vllm"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        wait_http(f"http://127.0.0.1:{port}/health", 60)
        time.sleep(1.0)  # the engine starts its CUDA work now; discovery attaches within a scan
        results = run_load(LoadConfig(url=f"http://127.0.0.1:{port}", n=args.requests, workers=args.concurrency,
                                      max_tokens=8))
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        engine_truth = json.loads(truth_file.read_text())
        time.sleep(0.5)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        stop.set()
        runner.join(120)
        summary = sidecar.summary()
        probes.close()
    sink.wait_for(lambda: sum(1 for s in sink.spans() if s["name"] == "llm_request") >= len(results), 10)
    spans = sink.spans()
    metric_names = sorted(sink.metric_names())
    sink.stop()
    return report(args, truth, engine_truth, results, summary, sidecar, spans, metric_names, archive_dir)


def report(args, truth, engine_truth, results, summary, sidecar, spans, metric_names, archive_dir) -> dict:
    pid = truth["pid"]
    captured = {f: n for (p, f), n in sidecar.pipeline.totals.by_pid.items() if p == pid}
    expected = {f: n for f, n in truth["calls"].items() if n}
    records = archive_records(archive_dir)
    cuda_lines = [r for r in records if r.get("type") == "cuda_api"]

    by_id = {s["span_id"]: s for s in spans}
    requests = [s for s in spans if s["name"] == "llm_request"]
    children: dict[str, dict[str, dict]] = {}
    for s in spans:
        if s["name"] in ("cuda.prefill", "cuda.decode") and s["parent_span_id"] in by_id:
            children.setdefault(s["parent_span_id"], {})[s["name"]] = s
    truth_by_trace = {r["trace_id"]: r for r in engine_truth["requests"]}
    linked = matching = 0
    per_request = []
    for req in requests:
        kids = children.get(req["span_id"], {})
        both = "cuda.prefill" in kids and "cuda.decode" in kids
        linked += both
        gt = truth_by_trace.get(req["trace_id"], {})
        got = {p: kids[f"cuda.{p}"]["attributes"].get("cuda.launches") if f"cuda.{p}" in kids else None
               for p in ("prefill", "decode")}
        want = {p: gt.get(p, {}).get("launches") for p in ("prefill", "decode")}
        ok = both and got == want
        matching += ok
        per_request.append({"request_id": req["attributes"].get("gen_ai.request.id"), "trace_id": req["trace_id"],
                            "launches": got, "expected_launches": want, "ok": ok})
    model_load = sidecar.telemetry.system.model_load(pid) if getattr(sidecar.telemetry, "system", None) else None
    out = {
        "events_expected": expected,
        "events_captured": captured,
        "events_lost": (summary["lost_ringbuf"] + summary["skipped_by_kernel"] + summary["dropped_queue"]
                        + summary["decode_errors"]),
        "kernel_names_resolved": summary["kernel_names_resolved"],
        "archive": str(archive_dir),
        "archive_events": len(cuda_lines),
        "events_captured_total": sum(summary["calls"].values()),
        "requests": len(requests),
        "requests_sent": len(results),
        "requests_ok": sum(r.ok for r in results),
        "requests_linked": linked,
        "requests_matching_ground_truth": matching,
        "per_request": per_request,
        "spans": dict(Counter(s["name"] for s in spans)),
        "metrics": metric_names,
        "steps": summary["steps"],
    }
    if model_load is not None:
        weights = truth.get("weights", {})
        out["model_load"] = {**model_load, "expected_bytes_read": weights.get("bytes_read"),
                             "expected_bytes_mapped": weights.get("bytes_mapped")}
    out["ok"] = (captured == expected and out["events_lost"] == 0 and out["kernel_names_resolved"] == 1.0
                 and out["archive_events"] == out["events_captured_total"]
                 and linked == len(requests) == len(results) > 0 and matching == linked)
    return out


def render(r: dict) -> str:
    exp, cap = r["events_expected"], r["events_captured"]
    lines = [
        f"otel-cuda demo: {'OK' if r['ok'] else 'MISMATCH'}",
        f"  workload calls: expected {sum(exp.values())}, captured {sum(cap.values())} "
        f"({'equal for every function' if exp == cap else 'DIFFERENT'}) over {len(exp)} functions",
        f"  lost {r['events_lost']}, launches named {r['kernel_names_resolved']:.1%}, steps {r['steps']}",
        f"  archive {r['archive']}: {r['archive_events']} cuda_api lines (captured {r['events_captured_total']})",
        f"  requests {r['requests']} of {r['requests_sent']} sent; with cuda.prefill + cuda.decode children "
        f"{r['requests_linked']}; launch counts equal to the engine's ground truth {r['requests_matching_ground_truth']}",
        "  spans downstream: " + ", ".join(f"{k} {v}" for k, v in sorted(r["spans"].items())),
        "  metrics downstream: " + ", ".join(r["metrics"]),
    ]
    if "model_load" in r:
        m = r["model_load"]
        lines.append(f"  model load: read {m.get('bytes_read')} B (expected {m['expected_bytes_read']}), mapped "
                     f"{m.get('bytes_mapped')} B (expected {m['expected_bytes_mapped']})")
    for f in sorted(set(exp) | set(cap)):
        if exp.get(f) != cap.get(f):
            lines.append(f"  differs: {f} expected {exp.get(f)} captured {cap.get(f)}")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    from .cli import UsageError, _preflight_checks

    _preflight_checks()
    try:
        result = run_demo(args)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(result, indent=1, sort_keys=True) if args.json else render(result))
    return 0 if result["ok"] else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="trace the fake-driver test bed and a vLLM-shaped server end to end")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--workdir", default="otel-cuda-demo", help="where the archive and downstream OTLP file go")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--weights-bytes", type=int, default=8 << 20, help="size of the fake weights file")
    p.set_defaults(func=cmd_demo)
