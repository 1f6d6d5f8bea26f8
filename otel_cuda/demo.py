"""`otel-cuda demo`: the whole path on this machine, no GPU needed, every number checked against ground truth.

1. builds the test bed (a fake libcuda.so.1 with the real driver signatures) if needed;
2. starts a recording OTLP receiver standing in for the Collector, and the sidecar (real BPF) exporting to it;
3. runs the fake-driver workload (its own exact call counts are the ground truth) after the sidecar;
4. runs two vLLM-shaped "pods" on the fake driver against the same sidecar, both on vLLM's default async loop and
   exporting `llm_request` spans to the sidecar's receiver: pod A = `vllm_like.py serve --dp 2` (two engine
   processes) in the host's pid namespace, pod B = `vllm_like.py serve --tp 2` (an engine with two worker
   processes) under `unshare --pid --fork`, its own pid namespace (same network and /proc, as a container that
   shares the node's /proc view would see it); sends both concurrent requests, each with a W3C traceparent;
5. sends one more `llm_request`, shaped exactly like vLLM's span of a request aborted before its first token (its
   latency attributes put the "decode window" over the machine's whole uptime): the sidecar must claim no step;
6. stops everything in order and compares what arrived downstream and in the archive with the ground truths: the
   workload's counts, and the engines' own per-request record of steps, launches and graph launches per phase.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
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
# The traced processes: the workload, and every process of either pod that does CUDA work (engines with --tp 1,
# workers with --tp N). The API servers make no CUDA call.
MATCH = rf"(workload .*--tag {TAG}|vllm_like\.py (engine|worker))"
PODS = (  # name, vllm_like options, own pid namespace
    ("A", ("--dp", "2"), False),
    ("B", ("--tp", "2"), True),
)
PHASES = ("prefill", "decode")
COUNTS = ("steps", "launches", "graph_launches")


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


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def archive_records(path: Path) -> list[dict]:
    out = []
    for f in sorted(path.rglob("*.jsonl*")):
        if f.name.endswith(".part"):
            continue
        with (gzip.open(f, "rt") if f.suffix == ".gz" else open(f)) as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


class Pod:
    """One vllm_like server standing in for an inference pod; its log and ground truth go to the work directory."""

    def __init__(self, name: str, options: tuple, own_pid_namespace: bool, receiver_port: int, workdir: Path):
        self.name, self.own_ns = name, own_pid_namespace
        self.port = free_port()
        self.truth_file = workdir / f"vllm-like-{name}-ground-truth.json"
        self.log_file = workdir / f"vllm-like-{name}.log"
        self.truth: dict = {}
        self.api_pid: int | None = None
        argv = [sys.executable, str(TESTBED / "vllm_like.py"), "serve", "--port", str(self.port),
                "--otlp-traces-endpoint", f"http://127.0.0.1:{receiver_port}", "--ground-truth", str(self.truth_file),
                # kernels load a second after libcuda is mapped: discovery attaches in between and sees their names
                "--load-delay", "1", *options]
        if own_pid_namespace:  # no --mount-proc: the host's /proc stays, so the pod still learns its host pids
            argv = ["unshare", "--pid", "--fork", *argv]
        with open(self.log_file, "w") as log:
            self.proc = subprocess.Popen(argv, env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "200",
                                                    "OTEL_SERVICE_NAME": "vllm"},
                                         stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until it serves, then learns its API server's host pid (under unshare, self.proc is unshare)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                self.api_pid = get_json(self.url + "/debug/ground_truth", 1)["api_pid"]
                return
            except OSError:
                time.sleep(0.2)
        tail = self.log_file.read_text()[-1500:]
        raise RuntimeError(f"pod {self.name} ({self.url}) did not start within {timeout:.0f} s:\n{tail}")

    def stop(self) -> dict:
        """SIGTERM to its API server: it stops its engines in order and writes the ground truth."""
        if self.api_pid is not None and self.proc.poll() is None:
            os.kill(self.api_pid, signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.truth = json.loads(self.truth_file.read_text())
        return self.truth

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def send_aborted_request_span(endpoint: str, process_id: int) -> str:
    """One `llm_request` as vLLM exports it for a request aborted after it was scheduled but before its first token
    (vLLM computes the latencies from first_token_ts still 0): time_in_model_prefill = -scheduled_ts, about minus
    the machine's uptime, and time_in_model_decode = last_token_ts, about plus the uptime, on a 50 ms span. Sent
    over OTLP/gRPC with vLLM's resource and scope, as from the API server whose pid is `process_id`. → trace id."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from .loadgen import new_traceparent

    provider = TracerProvider(resource=Resource.create({
        "service.name": "vllm", "vllm.process_id": str(process_id), "vllm.instrumenting_module_name": "vllm.llm_engine"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    traceparent, trace_id, _ = new_traceparent()
    end_ns, now = time.time_ns(), time.monotonic()
    queued_ts, scheduled_ts, first_token_ts, last_token_ts = now - 0.045, now - 0.040, 0.0, now - 0.005
    attributes = {
        "gen_ai.latency.time_to_first_token": 0.0,
        "gen_ai.latency.e2e": 0.05,
        "gen_ai.latency.time_in_queue": scheduled_ts - queued_ts,
        "gen_ai.usage.prompt_tokens": 9,
        "gen_ai.usage.completion_tokens": 0,
        "gen_ai.latency.time_in_model_prefill": first_token_ts - scheduled_ts,
        "gen_ai.latency.time_in_model_decode": last_token_ts - first_token_ts,
        "gen_ai.latency.time_in_model_inference": last_token_ts - scheduled_ts,
        "gen_ai.request.id": "cmpl-otel-cuda-demo-aborted-0",
        "gen_ai.request.top_p": 1.0, "gen_ai.request.max_tokens": 8, "gen_ai.request.temperature": 1.0,
        "gen_ai.request.n": 1,
        "gen_ai.response.finish_reasons": json.dumps(["abort"]),
    }
    ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    span = provider.get_tracer("vllm.tracing.otel").start_span(
        "llm_request", context=ctx, kind=SpanKind.SERVER, start_time=end_ns - 50_000_000, attributes=attributes)
    span.end(end_time=end_ns)
    provider.shutdown()  # SimpleSpanProcessor exported it already; this closes the channel
    return trace_id


def run_demo(args) -> dict:
    from .bpf import Probes
    from .config import resolve
    from .loadgen import LoadConfig, run_load
    from .otlp_sink import OtlpSink
    from .sidecar import start

    build_testbed()
    if shutil.which("unshare") is None:
        raise RuntimeError("unshare is not installed (apt-get install util-linux): pod B runs in its own pid namespace")
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
        match=MATCH, archive=str(archive_dir), receiver_grpc=f"127.0.0.1:{receiver_port}", receiver_http="off",
        metrics_address=f"127.0.0.1:{metrics_port}", health_address="off", discovery_interval="0.1", runtime=True)
    settings = resolve(ns, env={})
    probes = Probes(settings.bpf)
    sidecar = start(settings, probes, env=env)
    stop = threading.Event()
    runner = threading.Thread(target=sidecar.run, args=(stop,), name="sidecar", daemon=True)
    runner.start()
    sidecar.pipeline.ready.wait(10)
    pods: list[Pod] = []
    results: dict[str, list] = {}
    try:
        # 3. the workload, started after the sidecar (it waits a second before its first CUDA call, the time
        # discovery needs to see a new process and attach)
        workload = subprocess.run(
            [str(WORKLOAD), "--tag", TAG, "--threads", str(args.threads), "--steps", str(args.steps),
             "--launches", "16", "--graph-every", "4", "--start-delay-ms", "1000",
             "--weights", str(weights), "--mmap-bytes", str(args.weights_bytes // 2)],
            check=True, capture_output=True, text=True, timeout=300)
        truth = json.loads(workload.stdout)
        # the same workload through the runtime API (cudaLaunchKernel, cudaMemcpyAsync, cudaStreamSynchronize):
        # with --runtime its steps and launches must count once, as the driver-only run's do
        runtime_truth = json.loads(subprocess.run(
            [str(WORKLOAD), "--tag", TAG + "-runtime", "--runtime", "--threads", "2", "--steps", "10",
             "--launches", "4", "--graph-every", "0", "--errors", "0", "--start-delay-ms", "1000"],
            check=True, capture_output=True, text=True, timeout=300).stdout)

        # 4. the two pods, their CUDA processes traced, their API servers exporting llm_request to our receiver
        lag = ("--frontend-lag-ms", args.frontend_lag_ms) if args.frontend_lag_ms else ()
        pods = [Pod(name, options + (lag if name == "B" else ()), own_ns, receiver_port, workdir)
                for name, options, own_ns in PODS]
        for pod in pods:
            pod.wait_ready()

        def load(pod: Pod):
            # requests of two lengths side by side, as real traffic has them: data-parallel engines fed exactly
            # alike would step alike, and no timing could tell which one ran a request
            half = max(1, args.requests // 2)
            configs = [LoadConfig(url=pod.url, n=n, workers=max(1, args.concurrency // 2), max_tokens=m)
                       for n, m in ((half, 6), (args.requests - half, 11)) if n]
            out: list = []
            parts = [threading.Thread(target=lambda c=c: out.extend(run_load(c))) for c in configs]
            for t in parts:
                t.start()
            for t in parts:
                t.join()
            results[pod.name] = out
        senders = [threading.Thread(target=load, args=(pod,), name=f"load-{pod.name}") for pod in pods]
        for t in senders:
            t.start()
        for t in senders:
            t.join()

        # 5. the aborted request's span, as from pod A's API server
        invalid_trace = send_aborted_request_span(f"http://127.0.0.1:{receiver_port}", pods[0].api_pid)
        for pod in pods:
            pod.stop()
        time.sleep(0.5)
    finally:
        for pod in pods:
            pod.kill()
        stop.set()
        runner.join(120)
        summary = sidecar.summary()
        probes.close()
    sent = sum(len(r) for r in results.values())
    sink.wait_for(lambda: sum(1 for s in sink.spans() if s["name"] == "llm_request") >= sent + 1, 10)
    spans = sink.spans()
    metric_names = sorted(sink.metric_names())
    kernel_labels = {p.get("attributes", {}).get("cuda.kernel.name") for p in sink.metric_points("cuda.kernel.launches")}
    incomplete_metric = {}  # the last value of each reason's series, as Prometheus would show it
    for p in sink.metric_points("otel_cuda.join.incomplete"):
        incomplete_metric[p["attributes"]["outcome"]] = p["value"]
    sink.stop()
    out = report(truth, pods, results, invalid_trace, summary, sidecar, spans, metric_names, archive_dir)
    out["runtime"] = runtime_report(runtime_truth, spans)
    out["join_incomplete_metric"] = incomplete_metric
    out["late_attach"] = late_attach()
    out["kernel_names_demangled"] = names_demangled(archive_dir, kernel_labels - {None})
    out["ok"] = (out["ok"] and out["runtime"]["ok"] and out["kernel_names_demangled"]
                 and out["late_attach"]["named"] >= 0.99 * out["late_attach"]["launches"] > 0)
    return out


def runtime_report(truth: dict, spans: list[dict]) -> dict:
    """The --runtime workload's steps and kernel launches as the sidecar's step spans counted them."""
    steps = [s for s in spans if s["name"] == "cuda.step" and s["resource"].get("process.pid") == truth["pid"]]
    out = {"steps": len(steps), "steps_expected": truth["steps_total"],
           "launches_expected": truth["launches_total"],
           "launches_counted": sum(s["attributes"].get("cuda.launches", 0) for s in steps)}
    out["ok"] = out["steps"] == out["steps_expected"] and out["launches_counted"] == out["launches_expected"]
    return out


def late_attach(launches: int = 300) -> dict:
    """A second sidecar started after a process loaded and launched its kernels: how many of the launches that
    follow it names (kernels loaded before attach are named from the driver's objects, late_names.py)."""
    from .bpf import Probes
    from .config import resolve
    from .sidecar import start

    child = subprocess.Popen([sys.executable, str(TESTBED / "late_attach_child.py"), str(TESTBED / "build" / "libcuda.so.1"),
                              str(launches), "now"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={"FAKE_CUDA_SYNC_US": "0", "PATH": "/usr/bin:/bin"})
    probes = None
    try:
        for expect in ("mapped", "ready"):  # its kernels loaded, named and launched once: only now do we attach
            if expect not in json.loads(child.stdout.readline()):
                raise RuntimeError(f"the late-attach process did not get {expect}")
        ns = argparse.Namespace(pid=str(child.pid), no_archive=True, receiver_grpc="off", receiver_http="off",
                                metrics_address="off", health_address="off", discovery_interval="0.1")
        settings = resolve(ns, env={})
        probes = Probes(settings.bpf)
        sidecar = start(settings, probes, env={})
        stop = threading.Event()
        runner = threading.Thread(target=sidecar.run, args=(stop,), name="late-sidecar", daemon=True)
        runner.start()
        seen = sidecar.pipeline.totals.by_pid
        deadline = time.monotonic() + 30
        while not seen.get((child.pid, "cuStreamSynchronize")) and time.monotonic() < deadline:
            child.stdin.write("ping\n")  # until the sidecar sees this process's calls: attached
            child.stdin.flush()
            child.stdout.readline()
            time.sleep(0.1)
        child.stdin.write("go\n")
        child.stdin.flush()
        child.stdout.readline()
        while seen.get((child.pid, "cuLaunchKernel"), 0) < launches and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        runner.join(60)
        names = sidecar.pipeline.names
        return {"launches": names.launches_named + names.launches_unknown, "named": names.launches_named}
    finally:
        child.kill()
        child.wait()
        if probes is not None:
            probes.close()


def names_demangled(archive_dir: Path, metric_labels: set) -> bool:
    """Kernel names are readable where people read them: no mangled name on the metrics, and every mangled name in
    the archive has its demangled form beside it."""
    launches = [r for r in archive_records(archive_dir) if r.get("kernel")]
    mangled = [r for r in launches if r["kernel"].startswith("_Z")]
    return (bool(mangled) and not any(r.get("kernel_demangled", "_Z").startswith("_Z") for r in mangled)
            and not any(name.startswith("_Z") for name in metric_labels))


def _int(v) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def frontend_lag_ms(gt: dict) -> float:
    """How late the frontend saw the request's tokens after its engine stamped them (the less of the first token's
    lag and the last's; both clocks monotonic): what bounds the join's hop `delta` from above, so a lag over a
    step lets a placement a step later fit as well."""
    return round(min(gt["frontend_first_token_ns"] - gt["first_token_ns"],
                     gt["frontend_finished_ns"] - gt["last_token_ns"]) / 1e6, 3)


def unsure_for_a_reason(reasons: set, dp: int, clock_steps: int) -> bool:
    """Timing alone may leave the join unsure, which it must then say: of the step (the frontend saw the tokens
    late, an output thread stalled), of the engine only with data parallelism, of the clock only when the
    sidecar saw the wall clock step."""
    allowed = {"ambiguous_step", "ambiguous_engine"} if dp > 1 else {"ambiguous_step"}
    if clock_steps:
        allowed |= {"clock_step"}
    return bool(reasons) and reasons <= allowed


def judge_requests(pods: list[Pod], spans: list[dict], clock_steps: int) -> tuple[list[dict], dict[str, dict]]:
    """Each pod request's llm_request as it reached the downstream receiver, against its engine's ground truth
    (matched by trace id) → (per request, per pod {"requests", "requests_exact"})."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str, dict[str, dict]] = {}
    for s in spans:
        if s["name"] in ("cuda.prefill", "cuda.decode") and s["parent_span_id"] in by_id:
            children.setdefault(s["parent_span_id"], {})[s["name"]] = s
    truth_by_trace = {r["trace_id"]: (pod.name, r) for pod in pods for r in pod.truth.get("requests", [])}
    per_pod = {pod.name: {"requests": 0, "requests_exact": 0} for pod in pods}
    pod_dp = {pod.name: pod.truth.get("dp") or 1 for pod in pods}
    per_request = []
    for req in spans:
        if req["name"] != "llm_request" or req["trace_id"] not in truth_by_trace:
            continue
        pod, gt = truth_by_trace[req["trace_id"]]
        a = req["attributes"]
        kids = children.get(req["span_id"], {})
        linked = all(f"cuda.{p}" in kids for p in PHASES)
        got = {p: {k: a.get(f"cuda.{p}.{k}") for k in COUNTS} for p in PHASES}
        want = {p: {k: gt[p][k] for k in COUNTS} for p in PHASES}
        exact = linked and got == want and a.get("cuda.engine.pid") == gt["engine_pid"]
        unsure = set((a.get("cuda.join.incomplete") or "").split(",")) - {""}
        lag = frontend_lag_ms(gt)
        per_pod[pod]["requests"] += 1
        per_pod[pod]["requests_exact"] += exact
        per_request.append({
            "pod": pod, "request_id": a.get("gen_ai.request.id"), "trace_id": req["trace_id"],
            "outcome": a.get("cuda.join.outcome"), "complete": a.get("cuda.join.complete") is True, "linked": linked,
            "incomplete": a.get("cuda.join.incomplete"), "dp": pod_dp[pod],
            "engine_pid": a.get("cuda.engine.pid"), "expected_engine_pid": gt["engine_pid"],
            "cuda": got, "expected": want,
            # the children's own launch counts (summed over the ranks, like the ground truth's)
            "launches": {p: kids[f"cuda.{p}"]["attributes"].get("cuda.launches") if f"cuda.{p}" in kids else None
                         for p in PHASES},
            "expected_launches": {p: gt[p]["launches"] for p in PHASES},
            "frontend_lag_ms": lag, "unsure_for_a_reason": unsure_for_a_reason(unsure, pod_dp[pod], clock_steps),
            "ok": exact,
        })
    return per_request, per_pod


def report(truth, pods, results, invalid_trace, summary, sidecar, spans, metric_names, archive_dir) -> dict:
    pid = truth["pid"]
    captured = {f: n for (p, f), n in sidecar.pipeline.totals.by_pid.items() if p == pid}
    expected = {f: n for f, n in truth["calls"].items() if n}
    records = archive_records(archive_dir)
    cuda_lines = [r for r in records if r.get("type") in ("cuda_api", "cuda_runtime")]
    per_request, per_pod = judge_requests(pods, spans, sidecar.telemetry.clock.steps)
    sent = [r for rs in results.values() for r in rs]
    invalid = next((s for s in spans if s["name"] == "llm_request" and s["trace_id"] == invalid_trace), None)
    invalid_attrs = invalid["attributes"] if invalid is not None else {}
    loops = {pod.truth.get("loop") for pod in pods}
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
        "engine_loop": loops.pop() if len(loops) == 1 else "mixed",
        "instances": [{"pod": pod.name, "api_pid": pod.truth.get("api_pid"), "api_ns_pid": pod.truth.get("api_ns_pid"),
                       "own_pid_namespace": pod.own_ns, "dp": pod.truth.get("dp"), "tp": pod.truth.get("tp"),
                       "engine_pids": [e["pid"] for e in pod.truth.get("engines", [])],
                       "rank_pids": [p for e in pod.truth.get("engines", []) for p in e["ranks"]],
                       "requests_sent": len(results.get(pod.name, [])), **per_pod[pod.name]} for pod in pods],
        "requests": len(per_request),
        "requests_sent": len(sent),
        "requests_ok": sum(r.ok for r in sent),
        "requests_linked": sum(r["linked"] for r in per_request),
        "requests_exact": sum(r["ok"] for r in per_request),
        "requests_complete": sum(r["complete"] for r in per_request),
        # where another data-parallel engine, or another step, fits the request's timing as well, the join says
        # it is unsure (cuda.join.complete=false, ambiguous_engine / ambiguous_step) rather than guess; a complete
        # answer must be exact
        "requests_unsure_engine": sum("ambiguous_engine" in (r["incomplete"] or "") for r in per_request),
        "requests_unsure_step": sum("ambiguous_step" in (r["incomplete"] or "") for r in per_request),
        "requests_unsure_for_a_reason": sum(r["unsure_for_a_reason"] for r in per_request),
        "clock_steps": sidecar.telemetry.clock.steps,  # wall-clock steps the sidecar saw during the run
        "requests_complete_but_wrong": sum(r["complete"] and not r["ok"] for r in per_request),
        "invalid_trace_id": invalid_trace,
        "invalid_span_outcome": invalid_attrs.get("cuda.join.outcome") if invalid is not None else "not received",
        # steps the sidecar attributed to the aborted request's nonsense windows (None: its span never arrived)
        "invalid_windows_claimed": (sum(_int(invalid_attrs.get(f"cuda.{p}.steps")) for p in PHASES)
                                    if invalid is not None else None),
        "per_request": per_request,
        "spans": dict(Counter(s["name"] for s in spans)),
        "metrics": metric_names,
        "steps": summary["steps"],
    }
    out["requests_matching_ground_truth"] = out["requests_exact"]
    if model_load is not None:
        weights = truth.get("weights", {})
        out["model_load"] = {**model_load, "expected_bytes_read": weights.get("bytes_read"),
                             "expected_bytes_mapped": weights.get("bytes_mapped")}
    n = out["requests"]
    out["ok"] = (captured == expected and out["events_lost"] == 0 and out["kernel_names_resolved"] == 1.0
                 and out["archive_events"] == out["events_captured_total"]
                 and out["requests_linked"] == n == len(sent) > 0 and out["requests_ok"] == len(sent)
                 and out["requests_complete_but_wrong"] == 0
                 and out["requests_complete"] + out["requests_unsure_for_a_reason"] == n
                 and out["invalid_windows_claimed"] == 0)
    return out


def render(r: dict) -> str:
    exp, cap = r["events_expected"], r["events_captured"]
    lines = [
        f"otel-cuda demo: {'OK' if r['ok'] else 'MISMATCH'}",
        f"  workload calls: expected {sum(exp.values())}, captured {sum(cap.values())} "
        f"({'equal for every function' if exp == cap else 'DIFFERENT'}) over {len(exp)} functions",
        f"  lost {r['events_lost']}, launches named {r['kernel_names_resolved']:.1%}, steps {r['steps']}",
        f"  archive {r['archive']}: {r['archive_events']} cuda_api/cuda_runtime lines (captured "
        f"{r['events_captured_total']}); kernel names demangled: {'yes' if r.get('kernel_names_demangled') else 'NO'}",
        f"  engine loop {r['engine_loop']}",
    ]
    for i in r["instances"]:
        where = (f"pid {i['api_ns_pid']} in its own pid namespace" if i["own_pid_namespace"] else "host pid namespace")
        lines.append(f"  pod {i['pod']}: API pid {i['api_pid']} ({where}), dp {i['dp']} tp {i['tp']}, engines "
                     f"{i['engine_pids']}, CUDA ranks {i['rank_pids']}: requests {i['requests']} of "
                     f"{i['requests_sent']} sent, exact {i['requests_exact']}")
    lines += [
        f"  requests {r['requests']} of {r['requests_sent']} sent; with cuda.prefill + cuda.decode children "
        f"{r['requests_linked']}; per-phase steps, launches, graph launches and engine pid equal to the engines' "
        f"ground truth {r['requests_exact']}; join complete {r['requests_complete']} (all exact: "
        f"{'yes' if r['requests_complete_but_wrong'] == 0 else 'NO'}); unsure which data-parallel engine "
        f"{r['requests_unsure_engine']}, which step {r['requests_unsure_step']}",
        f"  aborted request (invalid latency attributes): outcome {r['invalid_span_outcome']}, steps claimed "
        f"{r['invalid_windows_claimed']} (expected 0)",
        f"  --runtime workload: steps {r['runtime']['steps']} (expected {r['runtime']['steps_expected']}), launches "
        f"{r['runtime']['launches_counted']} (expected {r['runtime']['launches_expected']})",
        f"  sidecar attached after the kernels were loaded: {r['late_attach']['named']} of "
        f"{r['late_attach']['launches']} later launches named",
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
    wrong = [q for q in r["per_request"] if not q["ok"]]
    for q in wrong[:5]:
        lines.append(f"  request {q['request_id']} (pod {q['pod']}): outcome {q['outcome']}, engine pid "
                     f"{q['engine_pid']} (expected {q['expected_engine_pid']}), got {q['cuda']}, "
                     f"expected {q['expected']}")
    if len(wrong) > 5:
        lines.append(f"  … and {len(wrong) - 5} more requests that differ (--json lists them all)")
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
    p = subparsers.add_parser("demo", help="trace the fake-driver test bed and two vLLM-shaped pods end to end")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--workdir", default="otel-cuda-demo", help="where the archive and downstream OTLP file go")
    p.add_argument("--requests", type=int, default=8, help="requests sent to each pod")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per pod")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--weights-bytes", type=int, default=8 << 20, help="size of the fake weights file")
    p.add_argument("--frontend-lag-ms", default=None, metavar="LO,HI",
                   help="pod B's API server handles each engine output LO-HI ms late (a busy frontend; over a step, "
                        "8 ms, the join must say it is unsure of the step rather than guess)")
    p.set_defaults(func=cmd_demo)
