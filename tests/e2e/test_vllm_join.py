"""A real vLLM (CPU build) whose own engine steps call the fake CUDA driver; the sidecar joins them to its spans.

vLLM's CPU build makes no CUDA calls. The test bed's vLLM plugin (testbed/vllm_shim, loaded through vLLM's
`vllm.general_plugins` entry point) makes every engine step of vLLM's worker also do on the fake libcuda what the
GPU model runner does (input copy, kernel launches, sampled-token readback through an event), and writes down
which requests each step served and in which phase, as vLLM's scheduler decided. So the sidecar's steps are
vLLM's steps, and each request's cuda.* numbers have one right answer: the ground truth's.

The sidecar selects vLLM's worker (`VLLM::Worker`, the process that maps libcuda) and finds the instance of each
llm_request by itself (instance_key "auto": vllm.process_id is the API server, whose descendants the engine and
worker are). Checked on what reaches a downstream OTLP receiver: every vLLM span forwarded once; for every
request, the enrichment and the cuda.prefill / cuda.decode children equal the ground truth; `otel-cuda verify`
passes, and fails naming the request when one trace is removed.
"""

import json
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from otel_cuda.loadgen import LoadConfig, results_document, run_load
from otel_cuda.otlp_sink import OtlpSink
from support.harness import RunningSidecar

pytestmark = [pytest.mark.root, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "testbed" / "vllm_shim"  # the plugin package + its dist-info (entry point), put on PYTHONPATH
LONG_PROMPT = " ".join(f"word{i} number {i * 7}" for i in range(12))
SHORT_PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def joined(probes, start_vllm, tmp_path_factory):
    from conftest import free_port

    tmp = tmp_path_factory.mktemp("vllm-join")
    truth_dir = tmp / "ground-truth"
    sink = OtlpSink(grpc_address="127.0.0.1:0", json_path=str(tmp / "downstream.jsonl")).start()
    receiver_port = free_port()
    # Started before vLLM: the worker maps libcuda while loading the model and the shim waits 1 s before its
    # first call, so the sidecar is attached (and sees the kernel names) before any CUDA call.
    sidecar = RunningSidecar(probes, env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.grpc_port}"},
                             match=r"^VLLM::Worker", receiver_grpc=f"127.0.0.1:{receiver_port}",
                             instance_key="auto", no_archive=False, archive=str(tmp / "archive"))
    shim_env = {"PYTHONPATH": str(SHIM),  # only the shim: otel-cuda's own environment stays out of vLLM's
                "OTEL_CUDA_VLLM_SHIM": str(truth_dir),
                "FAKE_CUDA_SYNC_US": "300"}  # the readback's wait: short, vLLM's CPU forward pass dominates a step
    results, root_request = [], None
    try:
        with start_vllm(f"http://127.0.0.1:{receiver_port}", env=shim_env) as url:
            started = time.time_ns()
            # Sequential and concurrent, plain and streaming, two lengths: concurrent requests share steps, a
            # prefill of one lands in the decode of another.
            for cfg in (LoadConfig(url=url, n=3, workers=1, api="completions", max_tokens=8, prompts=(LONG_PROMPT,)),
                        LoadConfig(url=url, n=3, workers=3, api="chat", max_tokens=8,
                                   prompts=(LONG_PROMPT, SHORT_PROMPT)),
                        LoadConfig(url=url, n=2, workers=2, api="completions", stream=True, max_tokens=5,
                                   prompts=(SHORT_PROMPT,)),
                        LoadConfig(url=url, n=2, workers=1, api="chat", stream=True, max_tokens=5,
                                   prompts=(LONG_PROMPT,))):
                results += run_load(cfg)
            # and one request without a traceparent: vLLM makes its span a root
            req = urllib.request.Request(url + "/v1/completions", method="POST",
                                         headers={"Content-Type": "application/json", "X-Request-Id": "no-parent"},
                                         data=json.dumps({"model": "tiny-llama", "prompt": "hi", "max_tokens": 4,
                                                          "ignore_eos": True}).encode())
            root_request = json.load(urllib.request.urlopen(req, timeout=60))
            finished = time.time_ns()
            expected = len(results) + 1
            sink.wait_for(lambda: sum(1 for s in sink.spans() if s["name"] == "llm_request") >= expected, 30)
    finally:
        summary = sidecar.stop()
    sink.wait_for(lambda: False, 1.0)
    doc = results_document(LoadConfig(url="http://vllm"), "tiny-llama", results, started, finished, "e2e")
    (tmp / "results.json").write_text(json.dumps(doc))
    yield sink.spans(), results, root_request, summary, sidecar, tmp, read_truth(truth_dir)
    sink.stop()


# ---------------------------------------------------------------------------------------------------------------
# The ground truth the shim wrote in vLLM's worker
# ---------------------------------------------------------------------------------------------------------------
def read_truth(truth_dir: Path) -> dict:
    """{"init": the worker's init record, "steps": its steps in order}; one worker (tensor parallelism 1)."""
    files = sorted(truth_dir.glob("worker-*.jsonl"))
    assert len(files) == 1, f"one vLLM worker wrote ground truth: {files} (is the shim loaded? see vLLM's log)"
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert records and records[0]["kind"] == "init"
    return {"init": records[0], "steps": [r for r in records[1:] if r["kind"] == "step"]}


def per_request(steps: list[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """gen_ai.request.id -> phase -> {steps, launches, graph_launches} over the steps that served it: a shared
    step counts fully for each request in it (attribute, don't divide)."""
    out: dict = defaultdict(lambda: {p: {"steps": 0, "launches": 0, "graph_launches": 0}
                                     for p in ("prefill", "decode")})
    for step in steps:
        for req in step["requests"]:
            phase = out[req["request_id"]][req["phase"]]
            phase["steps"] += 1
            phase["launches"] += step["launches"]
            phase["graph_launches"] += step["graph_launches"]
    return dict(out)


def engine_pid(truth: dict, api_pid: int) -> int:
    """The API server's child on the path to the worker (vLLM's EngineCore): the worker's ancestors run
    [parent, grandparent, ..., 1]."""
    chain = [truth["init"]["pid"], *truth["init"]["ancestors"]]
    assert api_pid in chain[1:], f"the worker {chain[0]} descends from the API server {api_pid}: {chain}"
    return chain[chain.index(api_pid) - 1]


def llm_requests(spans) -> dict[str, dict]:
    """gen_ai.request.id -> the forwarded llm_request span."""
    return {s["attributes"]["gen_ai.request.id"]: s for s in spans if s["name"] == "llm_request"}


# ---------------------------------------------------------------------------------------------------------------
def test_every_vllm_span_is_forwarded(joined):
    spans, results, root_request, summary, sidecar, *_ = joined
    vllm_spans = [s for s in spans if "vllm.process_id" in s["resource"]]  # vLLM's own resource
    fwd = sidecar.sidecar.forwarder.stats()
    assert fwd.dropped_spans == 0 and fwd.forwarded_spans == fwd.received_spans
    forwarded_ids = {s["span_id"] for s in spans if s["scope"] != "otel_cuda"}
    assert len(forwarded_ids) == fwd.forwarded_spans, "every span received went downstream, once"
    names = {s["name"] for s in vllm_spans}
    assert "llm_request" in names and len(names - {"llm_request"}) >= 5, f"startup spans forwarded too: {names}"
    assert len(llm_requests(spans)) == len(results) + 1


def test_the_ground_truth_is_vllms_schedule(joined):
    """The shim's record agrees with what vLLM told the client: each request's prompt was computed in its prefill
    steps, which produced the first token, and every further token took one decode step."""
    spans, results, root_request, summary, sidecar, tmp, truth = joined
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert sorted(r.completion_tokens for r in results) == sorted([8] * 6 + [5] * 4)  # ignore_eos: all of them
    assert root_request["usage"]["completion_tokens"] == 4
    served = defaultdict(lambda: {"prefill": [], "decode": []})  # request id -> phase -> its entries, in order
    for step in truth["steps"]:
        for req in step["requests"]:
            served[req["request_id"]][req["phase"]].append(req)
    usage = {s["attributes"]["gen_ai.request.id"]: (s["attributes"]["gen_ai.usage.prompt_tokens"],
                                                    s["attributes"]["gen_ai.usage.completion_tokens"])
             for s in llm_requests(spans).values()}
    assert set(served) == set(usage), "the worker's steps served exactly the requests vLLM traced"
    for rid, (prompt_tokens, completion_tokens) in usage.items():
        prefill, decode = served[rid]["prefill"], served[rid]["decode"]
        assert prefill and prefill[-1]["computed_tokens"] + prefill[-1]["tokens"] == prompt_tokens, (rid, prefill)
        assert [d["tokens"] for d in decode] == [1] * (completion_tokens - 1), (rid, decode)
    init = truth["init"]
    assert all(s["launches"] == init["forward_launches"] + init["sampler_launches"] + len(s["requests"])
               for s in truth["steps"])


def test_the_sidecars_steps_are_vllms_steps(joined):
    """One cuda.step span per engine step of vLLM's worker, with its launches, in order."""
    spans, *_, truth = joined
    worker = truth["init"]["pid"]
    steps = sorted((s for s in spans if s["name"] == "cuda.step" and s["resource"].get("process.pid") == worker),
                   key=lambda s: s["start_ns"])
    assert [(s["attributes"]["cuda.launches"], s["attributes"]["cuda.graph_launches"]) for s in steps] == \
           [(t["launches"], t["graph_launches"]) for t in truth["steps"]]


def test_each_request_is_joined_to_exactly_its_steps(joined):
    spans, results, root_request, summary, sidecar, tmp, truth = joined
    requests = llm_requests(spans)
    truth_by_request = per_request(truth["steps"])
    got, want = {}, {}
    for rid, req in requests.items():
        a = req["attributes"]
        t = truth_by_request.get(rid, {})
        # The decode steps are matched by count, so they must equal vLLM's own token count too.
        want[rid] = {"cuda.join.outcome": "joined", "cuda.join.complete": True,
                     "cuda.engine.pid": engine_pid(truth, int(req["resource"]["vllm.process_id"])), "cuda.ranks": 1,
                     "decode steps = completion_tokens - 1": a["gen_ai.usage.completion_tokens"] - 1}
        got[rid] = {k: a.get(k) for k in ("cuda.join.outcome", "cuda.join.complete", "cuda.engine.pid", "cuda.ranks")}
        got[rid]["decode steps = completion_tokens - 1"] = a.get("cuda.decode.steps")
        kids = {s["name"]: s for s in spans if s["parent_span_id"] == req["span_id"]}
        for phase in ("prefill", "decode"):
            kid = kids.get(f"cuda.{phase}")  # the child span, in the caller's trace, says the same
            kid_attrs = kid["attributes"] if kid else {}
            for k in ("steps", "launches", "graph_launches"):
                want[rid][f"cuda.{phase}.{k}"] = want[rid][f"child cuda.{phase}: cuda.{k}"] = t.get(phase, {}).get(k)
                got[rid][f"cuda.{phase}.{k}"] = a.get(f"cuda.{phase}.{k}")
                got[rid][f"child cuda.{phase}: cuda.{k}"] = kid_attrs.get(f"cuda.{k}")
            want[rid][f"child cuda.{phase}: trace, cuda.ranks"] = (req["trace_id"], 1)
            got[rid][f"child cuda.{phase}: trace, cuda.ranks"] = kid and (kid["trace_id"], kid_attrs.get("cuda.ranks"))
    print("\nrequest: sidecar vs ground truth (prefill steps/launches, decode steps/launches)")  # shown with -s
    columns = ("cuda.prefill.steps", "cuda.prefill.launches", "cuda.decode.steps", "cuda.decode.launches")
    for rid in sorted(got):
        print(f"  {rid}: {[got[rid][c] for c in columns]} vs {[want[rid][c] for c in columns]}")
    wrong = {rid: {k: {"sidecar": got[rid][k], "truth": v} for k, v in want[rid].items() if got[rid][k] != v}
             for rid in want}
    wrong = {rid: diff for rid, diff in wrong.items() if diff}
    assert not wrong, json.dumps(wrong, indent=1)


def test_spans_keep_the_callers_trace(joined):
    spans, results, root_request, *_ = joined
    requests = {s["trace_id"]: s for s in spans if s["name"] == "llm_request"}
    for r in results:
        req = requests[r.trace_id]  # same trace id as the caller's traceparent
        assert req["parent_span_id"] == r.span_id
        assert all(k in req["attributes"] for k in ("gen_ai.latency.time_in_queue", "gen_ai.usage.prompt_tokens"))
    roots = [s for s in spans if s["name"] == "llm_request" and not s["parent_span_id"]]
    assert [s["attributes"]["gen_ai.request.id"] for s in roots] == ["cmpl-no-parent-0"]


def test_verify_passes_and_names_a_missing_trace(joined):
    spans, results, root_request, summary, sidecar, tmp, truth = joined
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
