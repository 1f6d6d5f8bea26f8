"""A real vLLM (CPU build) exporting straight to a recording OTLP receiver: pins the contract our join relies on
(shared/reference/vllm-tracing.md, vllm-cpu.md). It makes no CUDA calls; the CUDA side is tested on the fake driver.
"""
from __future__ import annotations

import json
import secrets
import time
import urllib.request

import pytest

from otel_cuda.loadgen import LoadConfig, run_load
from otel_cuda.otlp_sink import OtlpSink
from otel_cuda.verify import OtlpJsonSource, verify

pytestmark = pytest.mark.e2e

LATENCIES = ("time_in_queue", "time_to_first_token", "time_in_model_prefill", "time_in_model_decode",
             "time_in_model_inference", "e2e")


@pytest.fixture(scope="module")
def traced_vllm(start_vllm, tmp_path_factory):
    json_path = tmp_path_factory.mktemp("otlp") / "spans.jsonl"
    sink = OtlpSink(grpc_address="127.0.0.1:0", json_path=str(json_path)).start()
    try:
        with start_vllm(sink.grpc_endpoint, env={"OTEL_SERVICE_NAME": "vllm"}) as url:
            yield url, sink, json_path
    finally:
        sink.stop()


def post(url, path, body, headers=None, stream=False):
    body = {"model": "tiny-llama", "ignore_eos": True, **body, **({"stream": True} if stream else {})}
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        return resp.read().decode()


def caller():
    t, s = secrets.token_hex(16), secrets.token_hex(8)
    return t, s, f"00-{t}-{s}-01"


def span_by_request_id(sink, request_id, timeout=15):
    def found():
        return [s for s in sink.spans() if s["name"] == "llm_request"
                and s["attributes"].get("gen_ai.request.id") == request_id]
    assert sink.wait_for(lambda: bool(found()), timeout), f"no llm_request with gen_ai.request.id {request_id}"
    spans = found()
    assert len(spans) == 1, spans
    return spans[0]


def assert_contract(span, pid_of_api=None, completion_tokens=None):
    a = span["attributes"]
    assert span["kind"] == "SERVER" and span["scope"] == "vllm.tracing.otel"
    res = span["resource"]
    assert res["service.name"] == "vllm" and res["vllm.instrumenting_module_name"] == "vllm.llm_engine"
    assert isinstance(res["vllm.process_id"], str) and res["vllm.process_id"].isdigit()  # a string in 0.32
    for k in LATENCIES:
        assert isinstance(a[f"gen_ai.latency.{k}"], float) and a[f"gen_ai.latency.{k}"] >= 0, k
    assert a["gen_ai.usage.prompt_tokens"] > 0
    if completion_tokens is not None:
        assert a["gen_ai.usage.completion_tokens"] == completion_tokens
    assert a["gen_ai.request.max_tokens"] > 0 and a["gen_ai.request.n"] == 1
    assert "gen_ai.request.top_p" in a and "gen_ai.request.temperature" in a
    # the phase windows the join derives fit inside the span
    queue, prefill, decode = (a[f"gen_ai.latency.{k}"] for k in ("time_in_queue", "time_in_model_prefill",
                                                                "time_in_model_decode"))
    assert a["gen_ai.latency.time_in_model_inference"] == pytest.approx(prefill + decode, abs=1e-6)
    assert queue + prefill + decode <= (span["end_ns"] - span["start_ns"]) / 1e9 + 1e-3
    assert a["gen_ai.latency.e2e"] == pytest.approx((span["end_ns"] - span["start_ns"]) / 1e9, abs=0.05)


def test_completion_with_traceparent(traced_vllm):
    url, sink, _ = traced_vllm
    t, s, tp = caller()
    out = json.loads(post(url, "/v1/completions", {"prompt": "the engine steps", "max_tokens": 5},
                          {"traceparent": tp, "X-Request-Id": "e2e-c1"}))
    assert out["id"] == "cmpl-e2e-c1" and out["usage"]["completion_tokens"] == 5
    span = span_by_request_id(sink, "cmpl-e2e-c1-0")
    assert (span["trace_id"], span["parent_span_id"]) == (t, s)
    assert span["flags"] & 0x300 == 0x300  # parent is remote
    assert_contract(span, completion_tokens=5)


def test_chat_with_traceparent(traced_vllm):
    url, sink, _ = traced_vllm
    t, s, tp = caller()
    post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
         {"traceparent": tp, "X-Request-Id": "e2e-chat1"})
    span = span_by_request_id(sink, "chatcmpl-e2e-chat1")
    assert (span["trace_id"], span["parent_span_id"]) == (t, s)
    assert_contract(span, completion_tokens=4)


@pytest.mark.parametrize("path,body,request_id", [
    ("/v1/completions", {"prompt": "stream this", "max_tokens": 6}, "cmpl-e2e-s1-0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}, "chatcmpl-e2e-s2"),
])
def test_streaming_requests_are_traced_too(traced_vllm, path, body, request_id):
    url, sink, _ = traced_vllm
    t, s, tp = caller()
    x = request_id.split("-", 1)[1].removesuffix("-0")
    text = post(url, path, body, {"traceparent": tp, "X-Request-Id": x}, stream=True)
    assert text.rstrip().endswith("data: [DONE]")
    span = span_by_request_id(sink, request_id)
    assert (span["trace_id"], span["parent_span_id"]) == (t, s)
    assert_contract(span, completion_tokens=6)


def test_without_traceparent_the_span_is_a_root(traced_vllm):
    url, sink, _ = traced_vllm
    post(url, "/v1/completions", {"prompt": "no parent", "max_tokens": 3}, {"X-Request-Id": "e2e-root"})
    span = span_by_request_id(sink, "cmpl-e2e-root-0")
    assert span["parent_span_id"] == "" and int(span["trace_id"], 16)
    assert span["flags"] & 0x300 == 0x100  # has the "is remote" bit's validity flag, not remote
    assert_contract(span, completion_tokens=3)


def test_not_sampled_traceparent_gives_no_span(traced_vllm):
    url, sink, _ = traced_vllm
    t, s, _ = caller()
    post(url, "/v1/completions", {"prompt": "quiet", "max_tokens": 3},
         {"traceparent": f"00-{t}-{s}-00", "X-Request-Id": "e2e-unsampled"})
    # a sampled request sent after it: once its span is in, the unsampled one would have been too
    post(url, "/v1/completions", {"prompt": "loud", "max_tokens": 3}, {"X-Request-Id": "e2e-after"})
    span_by_request_id(sink, "cmpl-e2e-after-0")
    time.sleep(0.5)
    assert not [x for x in sink.spans() if x["trace_id"] == t]
    assert not [x for x in sink.spans() if x["attributes"].get("gen_ai.request.id") == "cmpl-e2e-unsampled-0"]


def test_startup_spans_are_not_requests(traced_vllm):
    _, sink, _ = traced_vllm
    assert sink.wait_for(lambda: any(s["name"] == "Overall Loading" for s in sink.spans()), 15)
    startup = [s for s in sink.spans() if s["name"] != "llm_request"]
    names = {s["name"] for s in startup}
    assert {"Overall Loading", "Load weights", "Allocate KV cache"} <= names, names
    assert all(s["kind"] == "INTERNAL" for s in startup)
    pids = {s["resource"].get("vllm.process_id") for s in startup}
    assert len(pids) >= 2  # from the API server and the engine / worker processes
    assert any(s["resource"].get("vllm.process_kind") for s in startup)
    overall = next(s for s in startup if s["name"] == "Overall Loading")
    assert overall["parent_span_id"] == ""


def test_loadgen_traces_are_found_by_verify(traced_vllm, tmp_path):
    """loadgen's ids come back in vLLM's spans; without the sidecar, verify names exactly the cuda.* children."""
    url, sink, json_path = traced_vllm
    started = time.time_ns()
    results = run_load(LoadConfig(url=url, n=4, workers=2, stream=True, max_tokens=4))
    assert all(r.ok and r.completion_tokens == 4 for r in results), results
    doc = {"started_ns": started, "finished_ns": time.time_ns(),
           "requests": [r.__dict__ for r in results]}
    out = verify(doc, OtlpJsonSource(str(json_path)), service="vllm", timeout_s=10, interval_s=0.5)
    assert out.complete == 0 and len(out.missing) == 4
    for _req, problems in out.missing.values():
        assert problems == [f"no cuda.prefill child of llm_request {problems[0].rsplit(' ', 1)[-1]}",
                            f"no cuda.decode child of llm_request {problems[0].rsplit(' ', 1)[-1]}"], problems
    for r in results:
        span = span_by_request_id(sink, f"cmpl-{r.request_id}-0")
        assert (span["trace_id"], span["parent_span_id"]) == (r.trace_id, r.span_id)
