"""testbed/vllm_like.py on the fake driver: its spans follow vLLM's contract, its processes are vLLM's (data
parallel engines, tensor parallel workers, async or sync loop), and its own ground truth adds up.

Needs testbed/build/libcuda.so.1 (`make -C testbed`); VLLM_LIKE_LIBCUDA names another build. No BPF: the ground
truth is checked against itself (every per-request count is the sum over the per-step records, each step's
launches follow from who was in it) and against the engine loop's mechanics (overlap, token timestamps).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
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
SERVING = re.compile(r"on http://127\.0\.0\.1:(\d+) \(api pid (\d+), engine pids ([\d,]+), rank pids ([\d,]+), \w+ loop")


class VllmLike:
    """A running `vllm_like.py serve` (port chosen by the OS, read from its log line). `prefix` runs it under
    another command (unshare)."""

    def __init__(self, tmp_path: Path, endpoint: str | None, *extra: str, env=None, prefix=()):
        self.gt_path = tmp_path / f"gt-{secrets.token_hex(3)}.json"
        self.log_path = tmp_path / f"vllm_like-{secrets.token_hex(3)}.log"
        argv = [*prefix, sys.executable, str(VLLM_LIKE), "serve", "--port", "0", "--ground-truth", str(self.gt_path),
                "--libcuda", str(LIBCUDA), *extra]
        if endpoint:
            argv += ["--otlp-traces-endpoint", endpoint]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100", **(env or {})})
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                m = SERVING.search(self.log_path.read_text())
                if m:
                    self.url, self.api_pid = f"http://127.0.0.1:{m.group(1)}", int(m.group(2))
                    self.engine_pids = [int(p) for p in m.group(3).split(",")]
                    self.rank_pids = [int(p) for p in m.group(4).split(",")]
                    break
                assert self.proc.poll() is None, self.log_path.read_text()
                time.sleep(0.05)
            else:
                raise AssertionError("vllm_like did not start:\n" + self.log_path.read_text())
        except BaseException:
            self.kill()  # never leave a server behind a failed start
            raise

    def post(self, path, body, headers=None):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.load(resp)

    def stop(self, sig=signal.SIGTERM) -> dict:
        """Signals the API process (its host pid: under unshare, self.proc is unshare) and reads the ground truth."""
        if self.proc.poll() is None:
            os.kill(self.api_pid, sig)
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


def concurrently(srv, n: int, max_tokens) -> list[str]:
    """n completions at once (max_tokens: an int or one per request) → their X-Request-Ids."""
    ids = [f"c{i}-{secrets.token_hex(2)}" for i in range(n)]
    tokens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * n
    threads = [threading.Thread(target=srv.post, args=("/v1/completions", {"prompt": "q", "max_tokens": t},
                                                       {"X-Request-Id": x})) for x, t in zip(ids, tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def check_ground_truth(gt: dict, prefill_launches: int = 30, decode_launches: int = 12, graph: bool = False):
    """The ground truth against itself and against the engine loop's mechanics; returns the steps by engine."""
    assert gt["version"] == 2
    loop, tp, lag_lo_ms = gt["loop"], gt["tp"], gt["config"]["token_lag_ms"][0]
    engines = {e["index"]: e for e in gt["engines"]}
    assert len(engines) == gt["dp"] and all(len(e["ranks"]) == tp for e in engines.values())
    by_engine: dict[int, list[dict]] = {}
    for s in gt["steps"]:
        by_engine.setdefault(s["engine_index"], []).append(s)
    for index, steps in by_engine.items():
        e = engines[index]
        assert [s["id"] for s in steps] == list(range(1, len(steps) + 1))  # in order, none lost
        for s in steps:
            assert s["engine_pid"] == e["pid"] and s["rank_pids"] == e["ranks"]
            phases = [p for _, p in s["requests"]]
            n_new, decoding = phases.count("prefill"), "decode" in phases
            per_rank = n_new * prefill_launches + (decoding and not graph) * decode_launches
            for r in s["ranks"]:  # every rank does the whole step (lockstep)
                assert (r["launches"], r["graph_launches"]) == (per_rank, int(decoding and graph))
                assert r["start_ns"] < r["end_ns"] <= s["end_ns"] and r["start_ns"] >= s["start_ns"]
            assert s["launches"] == tp * per_rank and s["graph_launches"] == tp * int(decoding and graph)
            # the engine stamps the step's tokens at least LO ms after the (last rank's) readback sync returned
            assert s["token_ns"] - s["end_ns"] >= lag_lo_ms * 1e6
            assert 1_000_000 <= s["end_ns"] - s["start_ns"] < 200_000_000  # --gpu-us 2000: a few ms
        for a, b in zip(steps, steps[1:]):
            assert a["start_ns"] < b["start_ns"]
            if loop == "sync":  # one thread does it all: a step starts after the previous one's output
                assert a["token_ns"] <= b["start_ns"]
        if loop == "async":  # a batch queue of 2: step N+2 is launched only once step N's output was processed
            for a, c in zip(steps, steps[2:]):
                assert a["token_ns"] <= c["start_ns"]
    steps_of: dict[tuple[str, str], list[dict]] = {}
    for s in gt["steps"]:
        for rid, phase in s["requests"]:
            steps_of.setdefault((rid, phase), []).append(s)
    for r in gt["requests"]:
        assert r["engine_pid"] == engines[r["engine_index"]]["pid"]
        prefill, decode = steps_of.get((r["request_id"], "prefill"), []), steps_of.get((r["request_id"], "decode"), [])
        for phase, mine in (("prefill", prefill), ("decode", decode)):
            assert r[phase] == {"steps": len(mine), "launches": sum(s["launches"] for s in mine),
                                "graph_launches": sum(s["graph_launches"] for s in mine)}
            assert all(s["engine_index"] == r["engine_index"] for s in mine)  # one engine ran all of it
        assert r["prefill"]["steps"] == 1 and r["decode"]["steps"] == r["completion_tokens"] - 1
        (first,) = prefill
        assert all(s["id"] > first["id"] for s in decode)
        assert r["scheduled_ns"] <= first["start_ns"] and r["first_token_ns"] == first["token_ns"]
        assert r["last_token_ns"] == max(s["token_ns"] for s in prefill + decode)
        assert r["queued_ns"] <= r["scheduled_ns"] < r["first_token_ns"] <= r["last_token_ns"]
    finished = {r["request_id"] for r in gt["requests"]}
    if all(rid in finished for s in gt["steps"] for rid, _ in s["requests"]):  # nothing aborted or unfinished
        assert (sum(r["prefill"]["steps"] + r["decode"]["steps"] for r in gt["requests"])
                == sum(len(s["requests"]) for s in gt["steps"]))
        assert (sum(r["prefill"]["launches"] + r["decode"]["launches"] for r in gt["requests"])
                == sum(s["launches"] * len(s["requests"]) for s in gt["steps"]))
    return by_engine


def overlaps(steps: list[dict]) -> int:
    """Consecutive steps of one engine where the next one's first launch came before this one's readback returned."""
    return sum(b["start_ns"] < a["end_ns"] for a, b in zip(steps, steps[1:]))


def test_three_concurrent_requests_follow_the_contract(sink, launch):
    srv = launch(sink.grpc_endpoint)
    assert srv.engine_pids == srv.rank_pids  # --tp 1: the engine does its CUDA work itself
    assert "vllm_like.py engine" in cmdline(srv.engine_pids[0])  # what `--match 'vllm_like\.py engine'` selects
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
    assert not Path(f"/proc/{srv.engine_pids[0]}").exists()  # the engine stopped with the server
    assert len(live_gt["requests"]) == 3 and live_gt["steps"] == gt["steps"]
    assert (gt["loop"], gt["dp"], gt["tp"]) == ("async", 1, 1)  # vLLM's default loop
    assert gt["api_pid"] == gt["api_ns_pid"] == srv.proc.pid  # the host's pid namespace
    assert gt["engines"] == [{"index": 0, "pid": srv.engine_pids[0], "ns_pid": srv.engine_pids[0],
                              "ranks": srv.engine_pids}] and gt["engine_pid"] == srv.engine_pids[0]

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
        assert truth["engine_pid"] == srv.engine_pids[0] and truth["engine_index"] == 0
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
        assert truth["completion_tokens"] == max_tokens
    check_ground_truth(gt)

    startup = [s for s in sink.spans() if s["name"] != "llm_request"]
    names = {s["name"] for s in startup}
    assert {"Overall Loading", "Load weights", "Allocate KV cache"} <= names
    assert all(s["kind"] == "INTERNAL" for s in startup)
    assert len({s["trace_id"] for s in startup}) == 1
    engine_side = [s for s in startup if s["resource"].get("vllm.process_kind") == "engine_core"]
    assert engine_side and all(s["resource"]["vllm.process_id"] == str(srv.engine_pids[0]) for s in engine_side)


def test_async_data_parallel_overlaps_and_stamps_after_the_readback(sink, launch):
    """--dp 2, async loop: requests spread over both engines, each engine's steps overlap (the next step launches
    while the previous readback is still pending), tokens are stamped after the readback."""
    srv = launch(sink.grpc_endpoint, "--dp", "2", "--max-batch", "4")
    assert len(srv.engine_pids) == 2 and all("vllm_like.py engine" in cmdline(p) for p in srv.engine_pids)
    results = run_load(LoadConfig(url=srv.url, n=8, workers=8, max_tokens=8))
    assert all(r.ok and r.completion_tokens == 8 for r in results), results
    assert sink.wait_for(lambda: len(llm_requests(sink)) == 8, 10)
    gt = srv.stop(signal.SIGINT)
    by_engine = check_ground_truth(gt)
    per_engine = [sum(r["engine_index"] == i for r in gt["requests"]) for i in range(2)]
    assert sum(per_engine) == 8 and min(per_engine) >= 3  # the least loaded engine, in turn among equals
    assert {r["engine_pid"] for r in gt["requests"]} == set(srv.engine_pids)
    assert sum(overlaps(steps) for steps in by_engine.values()) > 0
    spans = {s["trace_id"]: s for s in llm_requests(sink)}
    assert {r["trace_id"] for r in gt["requests"]} == set(spans) == {r.trace_id for r in results}
    for r in gt["requests"]:  # every span comes from the one API process, whichever engine ran the request
        assert spans[r["trace_id"]]["resource"]["vllm.process_id"] == str(srv.api_pid)


def test_tensor_parallel_workers_do_the_cuda_work(launch):
    """--tp 2: two worker processes run every step; the engine maps no libcuda; launches are summed over ranks."""
    srv = launch(None, "--tp", "2", "--prefill-launches", "7", "--decode-launches", "5")
    (engine,) = srv.engine_pids
    assert len(srv.rank_pids) == 2 and engine not in srv.rank_pids
    assert all("vllm_like.py worker" in cmdline(p) for p in srv.rank_pids)
    assert all(Path(f"/proc/{p}/stat").read_text().split()[3] == str(engine) for p in srv.rank_pids)
    maps = lambda pid: Path(f"/proc/{pid}/maps").read_text()  # noqa: E731
    assert "libcuda" not in maps(engine) and all("libcuda" in maps(p) for p in srv.rank_pids)
    concurrently(srv, 3, [3, 5, 4])
    gt = srv.stop()
    assert gt["engines"][0]["ranks"] == srv.rank_pids
    check_ground_truth(gt, prefill_launches=7, decode_launches=5)
    truth = {r["completion_tokens"]: r for r in gt["requests"]}
    assert sorted(truth) == [3, 4, 5]
    first = min(gt["steps"], key=lambda s: s["id"])  # nothing decodes yet: 7 launches per new request, per rank
    assert {p for _, p in first["requests"]} == {"prefill"}
    assert first["launches"] == 2 * 7 * len(first["requests"]) and first["ranks"][1]["launches"] == first["launches"] // 2


def test_sync_loop_graph_decode_unsampled_and_root_requests(sink, launch):
    srv = launch(sink.grpc_endpoint, "--loop", "sync", "--graph-decode", "--prefill-launches", "7",
                 "--max-batch", "2")
    t, s = secrets.token_hex(16), secrets.token_hex(8)
    srv.post("/v1/completions", {"prompt": "x", "max_tokens": 3},
             {"traceparent": f"00-{t}-{s}-00", "X-Request-Id": "u"})
    srv.post("/v1/completions", {"prompt": "x", "max_tokens": 5, "temperature": 0}, {"X-Request-Id": "root"})
    concurrently(srv, 3, 8)  # three at once with max batch 2: one waits in the queue
    assert sink.wait_for(lambda: len(llm_requests(sink)) == 4, 10)
    gt = srv.stop()
    assert gt["loop"] == "sync" and gt["graphs"] and gt["config"]["graph_decode"] is True
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
    queued = [r for r in gt["requests"] if r["request_id"].startswith("cmpl-c")]
    assert max(r["scheduled_ns"] - r["queued_ns"] for r in queued) > 1_000_000
    by_engine = check_ground_truth(gt, prefill_launches=7, graph=True)
    assert overlaps(by_engine[0]) == 0


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
    check_ground_truth(gt)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for unshare --pid")
def test_own_pid_namespace_reports_host_pids(sink, launch):
    """Under `unshare --pid --fork` (host /proc kept) the API is pid 1 in its namespace: vllm.process_id is "1", as
    vLLM would send it, while the ground truth names every process by its host pid."""
    srv = launch(sink.grpc_endpoint, "--tp", "2", prefix=("unshare", "--pid", "--fork"))
    assert srv.api_pid != srv.proc.pid and "vllm_like.py serve" in cmdline(srv.api_pid)  # proc is unshare
    concurrently(srv, 1, 3)
    assert sink.wait_for(lambda: len(llm_requests(sink)) == 1, 10)
    gt = srv.stop()
    assert gt["api_pid"] == srv.api_pid and gt["api_ns_pid"] == 1
    assert gt["engines"][0]["pid"] == srv.engine_pids[0] != gt["engines"][0]["ns_pid"]
    assert gt["engines"][0]["ranks"] == srv.rank_pids and gt["requests"][0]["engine_pid"] == srv.engine_pids[0]
    (span,) = llm_requests(sink)
    assert span["resource"]["vllm.process_id"] == "1"
    check_ground_truth(gt)


def test_bad_requests_and_a_missing_driver(launch, tmp_path):
    srv = launch(None)
    for body, status in (({"prompt": 5}, 400), ({"prompt": "x", "n": 2}, 400), ({"prompt": "x", "model": "nope"}, 404)):
        with pytest.raises(urllib.error.HTTPError) as e:
            srv.post("/v1/completions", body)
        assert e.value.code == status
    srv.stop()
    for extra in ((), ("--tp", "2")):  # the engine's own failure, or its workers'
        proc = subprocess.run([sys.executable, str(VLLM_LIKE), "serve", "--port", "0", "--libcuda",
                               str(tmp_path / "nope.so"), *extra], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1
        assert "engine failed to start" in proc.stderr and "make -C testbed" in proc.stderr
