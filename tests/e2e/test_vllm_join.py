"""A real vLLM (CPU build) exports its spans to the sidecar; a fake-driver engine is the same instance.

Checks what reaches a downstream OTLP receiver: every vLLM span forwarded (startup spans included), each
llm_request enriched and given cuda.prefill / cuda.decode children in the caller's trace; then `otel-cuda verify`
on the downstream OTLP JSON passes for every request — and fails, naming the request, when one trace is removed.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from otel_cuda.loadgen import LoadConfig, results_document, run_load
from otel_cuda.otlp_sink import OtlpSink
from support.harness import WORKLOAD, RunningSidecar

pytestmark = [pytest.mark.root, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def joined(probes, start_vllm, tmp_path_factory):
    from conftest import free_port

    tmp = tmp_path_factory.mktemp("vllm-join")
    sink = OtlpSink(grpc_address="127.0.0.1:0", json_path=str(tmp / "downstream.jsonl")).start()
    receiver_port = free_port()
    sidecar = RunningSidecar(probes, env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.grpc_port}"},
                             match=r"--tag vllm-e2e-engine", receiver_grpc=f"127.0.0.1:{receiver_port}",
                             instance_key="host", no_archive=False, archive=str(tmp / "archive"))
    # Steps of ~2.5 ms that run all along: every phase window of the real requests (tens of ms here) holds some.
    # Real-time priority: on 2 cores vLLM's CPU prefill would otherwise starve it and stretch a step over a whole
    # phase window; it sleeps most of each step, so vLLM keeps its CPU.
    engine = subprocess.Popen(["chrt", "-f", "5", str(WORKLOAD), "--tag", "vllm-e2e-engine", "--threads", "1", "--steps", "1000000",
                               "--launches", "4", "--graph-every", "4", "--start-delay-ms", "800"],
                              env={**os.environ, "FAKE_CUDA_SYNC_US": "2000"}, stdout=subprocess.DEVNULL)
    results = []
    try:
        with start_vllm(f"http://127.0.0.1:{receiver_port}") as url:
            started = time.time_ns()
            # Long prompts: the tiny model's prefill then lasts several fake steps (it is ~4 ms for a short one).
            prompts = (" ".join(f"word{i} number {i * 7}" for i in range(12)),)
            common = dict(url=url, max_tokens=8, prompts=prompts)
            for cfg in (LoadConfig(n=3, workers=1, api="completions", **common),
                        LoadConfig(n=3, workers=3, api="chat", **common),
                        LoadConfig(n=2, workers=2, api="completions", stream=True, **common),
                        LoadConfig(n=2, workers=1, api="chat", stream=True, **common)):
                results += run_load(cfg)
            # and one request without a traceparent: vLLM makes its span a root
            req = urllib.request.Request(url + "/v1/completions", method="POST",
                                         headers={"Content-Type": "application/json", "X-Request-Id": "no-parent"},
                                         data=json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 4,
                                                          "ignore_eos": True}).encode())
            urllib.request.urlopen(req, timeout=60).read()
            finished = time.time_ns()
            expected = len(results) + 1
            sink.wait_for(lambda: sum(1 for s in sink.spans() if s["name"] == "llm_request") >= expected, 30)
    finally:
        engine.kill()
        engine.wait()
        summary = sidecar.stop()
    sink.wait_for(lambda: False, 1.0)
    doc = results_document(LoadConfig(url="http://vllm"), "tiny-llama", results, started, finished, "e2e")
    (tmp / "results.json").write_text(json.dumps(doc))
    yield sink.spans(), results, summary, sidecar, tmp
    sink.stop()


def test_every_vllm_span_is_forwarded(joined):
    spans, results, summary, sidecar, _ = joined
    vllm_spans = [s for s in spans if "vllm.process_id" in s["resource"]]  # vLLM's own resource
    fwd = sidecar.sidecar.forwarder.stats()
    assert fwd.dropped_spans == 0 and fwd.forwarded_spans == fwd.received_spans
    forwarded_ids = {s["span_id"] for s in spans if s["scope"] != "otel_cuda"}
    assert len(forwarded_ids) == fwd.forwarded_spans, "every span received went downstream, once"
    names = {s["name"] for s in vllm_spans}
    assert "llm_request" in names and len(names - {"llm_request"}) >= 5, f"startup spans forwarded too: {names}"


def test_each_request_is_enriched_and_has_cuda_children(joined):
    spans, results, summary, *_ = joined
    requests = {s["trace_id"]: s for s in spans if s["name"] == "llm_request"}
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    for r in results:
        req = requests[r.trace_id]  # same trace id as the caller's traceparent
        assert req["parent_span_id"] == r.span_id
        a = req["attributes"]
        assert a["cuda.join.outcome"] == "joined" and a["cuda.launches"] > 0, (r.request_id, a, summary)
        assert all(k in a for k in ("gen_ai.latency.time_in_queue", "gen_ai.usage.prompt_tokens")), "vLLM's own kept"
        kids = {s["name"]: s for s in spans if s["parent_span_id"] == req["span_id"]}
        # (per-phase exactness against a ground truth is the demo's test: its engine knows which steps each
        # request took part in; this engine runs beside vLLM, not in step with it)
        assert set(kids) == {"cuda.prefill", "cuda.decode"}, (r.request_id, set(kids), a)
        for kid in kids.values():
            assert kid["trace_id"] == r.trace_id and kid["attributes"]["cuda.steps"] > 0
            assert a[f"{kid['name']}.steps"] == kid["attributes"]["cuda.steps"]
    roots = [s for s in spans if s["name"] == "llm_request" and not s["parent_span_id"]]
    assert len(roots) == 1 and roots[0]["attributes"]["cuda.join.outcome"] == "joined"


def test_verify_passes_and_names_a_missing_trace(joined):
    spans, results, summary, sidecar, tmp = joined
    cmd = [sys.executable, "-m", "otel_cuda.cli", "verify", str(tmp / "results.json"), "--timeout", "0"]
    ok = subprocess.run(cmd + ["--otlp-json", str(tmp / "downstream.jsonl"), "--archive", str(tmp / "archive")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    victim = results[3]
    with open(tmp / "downstream.jsonl") as src, open(tmp / "without-one.jsonl", "w") as dst:
        for line in src:
            doc = json.loads(line)
            for rs in doc.get("resourceSpans", []):
                for ss in rs.get("scopeSpans", []):
                    ss["spans"] = [s for s in ss.get("spans", []) if s.get("traceId") != victim.trace_id]
            dst.write(json.dumps(doc) + "\n")
    bad = subprocess.run(cmd + ["--otlp-json", str(tmp / "without-one.jsonl")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0
    assert victim.request_id in bad.stdout + bad.stderr
