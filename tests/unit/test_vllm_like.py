"""testbed/vllm_like.py on the fake driver: its spans follow vLLM's contract and its ground truth adds up.

Needs testbed/build/libcuda.so.1 (`make -C testbed`); VLLM_LIKE_LIBCUDA names another build.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from otel_cuda.loadgen import LoadConfig, run_load
from otel_cuda.otlp_sink import OtlpSink

ROOT = Path(__file__).resolve().parents[2]
VLLM_LIKE = ROOT / "testbed" / "vllm_like.py"
LIBCUDA = Path(os.environ.get("VLLM_LIKE_LIBCUDA") or ROOT / "testbed" / "build" / "libcuda.so.1")

pytestmark = pytest.mark.usefixtures("testbed")  # builds the fake driver (tests/conftest.py)

LATENCIES = ("time_in_queue", "time_to_first_token", "time_in_model_prefill", "time_in_model_decode",
             "time_in_model_inference", "e2e")


class VllmLike:
    """A running `vllm_like.py serve` (port chosen by the OS, read from its log line)."""

    def __init__(self, tmp_path: Path, endpoint: str | None, *extra: str, env=None):
        self.gt_path = tmp_path / f"gt-{secrets.token_hex(3)}.json"
        self.log_path = tmp_path / "vllm_like.log"
        argv = [sys.executable, str(VLLM_LIKE), "serve", "--port", "0", "--ground-truth", str(self.gt_path),
                "--libcuda", str(LIBCUDA), *extra]
        if endpoint:
            argv += ["--otlp-traces-endpoint", endpoint]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100", "FAKE_CUDA_SYNC_US": "2000",
                                          **(env or {})})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = re.search(r"on http://127\.0\.0\.1:(\d+) \(engine pid (\d+)", self.log_path.read_text())
            if m:
                self.url, self.engine_pid = f"http://127.0.0.1:{m.group(1)}", int(m.group(2))
                break
            assert self.proc.poll() is None, self.log_path.read_text()
            time.sleep(0.05)
        else:
            raise AssertionError("vllm_like did not start:\n" + self.log_path.read_text())

    def post(self, path, body, headers=None):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.load(resp)

    def stop(self, sig=signal.SIGTERM) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            assert self.proc.wait(20) == 0, self.log_path.read_text()
        self.log.close()
        return json.loads(self.gt_path.read_text())

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture
def sink():
    s = OtlpSink(grpc_address="127.0.0.1:0").start()
    yield s
    s.stop()


@pytest.fixture
def launch(tmp_path):
    running = []

    def start(*args, **kw):
        v = VllmLike(tmp_path, *args, **kw)
        running.append(v)
        return v
    yield start
    for v in running:
        v.kill()


def llm_requests(sink):
    return [s for s in sink.spans() if s["name"] == "llm_request"]


def test_three_concurrent_requests_follow_the_contract(sink, launch):
    srv = launch(sink.grpc_endpoint)
    cmdline = Path(f"/proc/{srv.engine_pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "vllm_like.py engine" in cmdline  # what `--match 'vllm_like.py engine'` selects
    assert srv.get("/v1/models")["data"][0]["id"] == "vllm-like"

    calls = [  # (path, body, x-request-id, max_tokens)
        ("/v1/completions", {"prompt": "one two three", "max_tokens": 4}, "a1", 4),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}, "b2", 6),
        ("/v1/completions", {"prompt": "stream me", "max_tokens": 8, "stream": True}, "c3", 8),
    ]
    callers = {x: (secrets.token_hex(16), secrets.token_hex(8)) for _, _, x, _ in calls}
    answers = {}

    def send(path, body, x):
        t, s = callers[x]
        answers[x] = srv.post(path, body, {"traceparent": f"00-{t}-{s}-01", "tracestate": "k=v", "X-Request-Id": x})
    threads = [threading.Thread(target=send, args=(p, b, x)) for p, b, x, _ in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a[0] == 200 for a in answers.values())
    assert answers["a1"][1]["X-Request-Id"] == "a1"
    assert json.loads(answers["b2"][2])["choices"][0]["finish_reason"] == "length"
    events = [ln[6:] for ln in answers["c3"][2].splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 8 + 2  # 8 tokens, the finish chunk, [DONE]

    assert sink.wait_for(lambda: len(llm_requests(sink)) == 3, 10)
    live_gt = srv.get("/debug/ground_truth")
    gt = srv.stop()
    assert not Path(f"/proc/{srv.engine_pid}").exists()  # the engine stopped with the server
    assert len(live_gt["requests"]) == 3 and live_gt["steps"] == gt["steps"]

    expect_id = {"a1": "cmpl-a1-0", "b2": "chatcmpl-b2", "c3": "cmpl-c3-0"}
    gts = {r["request_id"]: r for r in gt["requests"]}
    spans = {s["attributes"]["gen_ai.request.id"]: s for s in llm_requests(sink)}
    assert set(spans) == set(expect_id.values()) == set(gts)
    for _, _, x, max_tokens in calls:
        span, truth = spans[expect_id[x]], gts[expect_id[x]]
        a = span["attributes"]
        assert span["kind"] == "SERVER" and span["scope"] == "vllm.tracing.otel"
        assert (span["trace_id"], span["parent_span_id"]) == callers[x]  # the caller's traceparent
        assert span["trace_state"] == "k=v"
        assert span["flags"] & 0x300 == 0x300  # "parent is remote", as the SDK marks it
        assert span["resource"]["service.name"] == "vllm"
        assert span["resource"]["vllm.process_id"] == str(srv.proc.pid)
        assert span["resource"]["vllm.instrumenting_module_name"] == "vllm.llm_engine"
        for k in LATENCIES:
            assert isinstance(a[f"gen_ai.latency.{k}"], float) and a[f"gen_ai.latency.{k}"] >= 0
        assert a["gen_ai.usage.completion_tokens"] == max_tokens and a["gen_ai.usage.prompt_tokens"] > 0
        assert a["gen_ai.request.max_tokens"] == max_tokens and a["gen_ai.request.n"] == 1
        assert a["gen_ai.request.temperature"] == 1.0 and a["gen_ai.request.top_p"] == 1.0
        assert a["gen_ai.response.finish_reasons"] == '["length"]'
        # the span and the ground truth tell the same story
        assert truth["trace_id"] == span["trace_id"] and truth["span_id"] == span["span_id"] and truth["sampled"]
        assert span["start_ns"] == truth["arrival_ns"]
        assert a["gen_ai.latency.e2e"] == pytest.approx((span["end_ns"] - span["start_ns"]) / 1e9, abs=1e-6)
        assert a["gen_ai.latency.time_in_queue"] == pytest.approx((truth["scheduled_ns"] - truth["queued_ns"]) / 1e9)
        assert a["gen_ai.latency.time_in_model_prefill"] == pytest.approx(
            (truth["first_token_ns"] - truth["scheduled_ns"]) / 1e9)
        assert a["gen_ai.latency.time_in_model_decode"] == pytest.approx(
            (truth["last_token_ns"] - truth["first_token_ns"]) / 1e9)
        assert a["gen_ai.latency.time_in_model_inference"] == pytest.approx(
            (truth["last_token_ns"] - truth["scheduled_ns"]) / 1e9)
        arrival_mono = truth["arrival_ns"] - gt["mono_to_epoch_ns"]
        assert arrival_mono - 5_000_000 < truth["queued_ns"]  # the engine queued it after it arrived (± clock reads)
        assert truth["queued_ns"] <= truth["scheduled_ns"] < truth["first_token_ns"] <= truth["last_token_ns"]
        assert truth["prefill"]["steps"] == 1 and truth["decode"]["steps"] == max_tokens - 1
    check_ground_truth(gt, prefill_launches=30, decode_launches=12)

    startup = [s for s in sink.spans() if s["name"] != "llm_request"]
    names = {s["name"] for s in startup}
    assert {"Overall Loading", "Load weights", "Allocate KV cache"} <= names
    assert all(s["kind"] == "INTERNAL" for s in startup)
    assert len({s["trace_id"] for s in startup}) == 1
    engine_side = [s for s in startup if s["resource"].get("vllm.process_kind") == "engine_core"]
    assert engine_side and all(s["resource"]["vllm.process_id"] == str(srv.engine_pid) for s in engine_side)


def check_ground_truth(gt: dict, prefill_launches: int, decode_launches: int, graph: bool = False):
    """Every request's per-phase counts are the sums over the steps it took part in, and each step's launches
    follow from who was in it."""
    steps = gt["steps"]
    assert [s["id"] for s in steps] == sorted(s["id"] for s in steps)
    for a, b in zip(steps, steps[1:], strict=False):
        assert a["start_ns"] < a["end_ns"] <= b["start_ns"]  # one engine thread: steps never overlap
    for s in steps:
        phases = [p for _, p in s["requests"]]
        n_new, decoding = phases.count("prefill"), "decode" in phases
        assert s["launches"] == n_new * prefill_launches + (decoding and not graph) * decode_launches
        assert s["graph_launches"] == int(decoding and graph)
        assert 1_000_000 <= s["end_ns"] - s["start_ns"] < 100_000_000  # FAKE_CUDA_SYNC_US=2000: a few ms
    for r in gt["requests"]:
        for phase in ("prefill", "decode"):
            mine = [s for s in steps if [r["request_id"], phase] in s["requests"]]
            assert r[phase] == {"steps": len(mine), "launches": sum(s["launches"] for s in mine),
                                "graph_launches": sum(s["graph_launches"] for s in mine)}
            for s in mine:  # the phase's steps lie inside the engine's phase window
                lo, hi = ((r["scheduled_ns"], r["first_token_ns"]) if phase == "prefill"
                          else (r["first_token_ns"], r["last_token_ns"]))
                assert lo <= s["start_ns"] and s["end_ns"] <= hi
        assert r["prefill"]["steps"] + r["decode"]["steps"] == r["completion_tokens"]


def test_graph_decode_unsampled_and_root_requests(sink, launch):
    srv = launch(sink.grpc_endpoint, "--graph-decode", "--prefill-launches", "7", "--max-batch", "2")
    t, s = secrets.token_hex(16), secrets.token_hex(8)
    srv.post("/v1/completions", {"prompt": "x", "max_tokens": 3},
             {"traceparent": f"00-{t}-{s}-00", "X-Request-Id": "u"})
    srv.post("/v1/completions", {"prompt": "x", "max_tokens": 5, "temperature": 0}, {"X-Request-Id": "root"})
    # three at once with max batch 2: one waits in the queue
    threads = [threading.Thread(target=srv.post, args=("/v1/completions", {"prompt": "q", "max_tokens": 8},
                                                       {"X-Request-Id": f"q{i}"})) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sink.wait_for(lambda: len(llm_requests(sink)) == 4, 10)
    gt = srv.stop()
    assert gt["graphs"] and gt["config"]["graph_decode"] is True
    truth = {r["request_id"]: r for r in gt["requests"]}
    assert truth["cmpl-u-0"]["sampled"] is False and truth["cmpl-u-0"]["span_id"] is None
    assert truth["cmpl-u-0"]["trace_id"] == t
    spans = {x["attributes"]["gen_ai.request.id"]: x for x in llm_requests(sink)}
    assert "cmpl-u-0" not in spans  # a not-sampled traceparent: no span, as with vLLM
    root = spans["cmpl-root-0"]
    assert root["parent_span_id"] == "" and root["trace_id"] == truth["cmpl-root-0"]["trace_id"]
    assert "gen_ai.request.temperature" not in root["attributes"]  # vLLM omits a zero temperature
    assert truth["cmpl-root-0"]["decode"] == {"steps": 4, "launches": 0, "graph_launches": 4}
    assert max(len(st["requests"]) for st in gt["steps"]) <= 2
    assert max(truth[f"cmpl-q{i}-0"]["scheduled_ns"] - truth[f"cmpl-q{i}-0"]["queued_ns"] for i in range(3)) > 1_000_000
    check_ground_truth(gt, prefill_launches=7, decode_launches=12, graph=True)


def test_loadgen_streams_against_it_and_sigint_writes_ground_truth(sink, launch):
    srv = launch(sink.grpc_endpoint, env={"OTEL_SERVICE_NAME": "my-llm"})
    results = run_load(LoadConfig(url=srv.url, n=6, workers=3, stream=True, max_tokens=5))
    assert all(r.ok and r.completion_tokens == 5 and r.ttft_s is not None for r in results), results
    assert sink.wait_for(lambda: len(llm_requests(sink)) == 6, 10)
    gt = srv.stop(signal.SIGINT)
    by_trace = {s["trace_id"]: s for s in llm_requests(sink)}
    for r in results:
        span = by_trace[r.trace_id]
        assert span["parent_span_id"] == r.span_id
        assert span["attributes"]["gen_ai.request.id"] == f"cmpl-{r.request_id}-0"
        assert span["resource"]["service.name"] == "my-llm"
    assert {r["trace_id"] for r in gt["requests"]} == {r.trace_id for r in results}
    check_ground_truth(gt, prefill_launches=30, decode_launches=12)


def test_bad_requests_and_a_missing_driver(launch, tmp_path):
    srv = launch(None)
    for body, status in (({"prompt": 5}, 400), ({"prompt": "x", "n": 2}, 400), ({"prompt": "x", "model": "nope"}, 404)):
        with pytest.raises(urllib.error.HTTPError) as e:
            srv.post("/v1/completions", body)
        assert e.value.code == status
    srv.stop()
    proc = subprocess.run([sys.executable, str(VLLM_LIKE), "serve", "--port", "0", "--libcuda",
                           str(tmp_path / "nope.so")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "make -C testbed" in proc.stderr
