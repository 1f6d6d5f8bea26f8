"""`otel-cuda demo --json` end to end: real BPF, real OTLP over gRPC, the archive, the join — against ground truth."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from otel_cuda.otlp_sink import read_otlp_json

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, testbed):
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("needs root")
    workdir = tmp_path_factory.mktemp("demo")
    out = subprocess.run([sys.executable, "-m", "otel_cuda.cli", "demo", "--json", "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), workdir


def test_captured_equals_the_workloads_own_count(demo):
    result, _ = demo
    assert result["events_captured"] == result["events_expected"]
    assert len(result["events_expected"]) == 43  # every function of the default driver set was called
    assert result["events_lost"] == 0
    assert result["kernel_names_resolved"] == 1.0
    assert result["archive_events"] == result["events_captured_total"] > sum(result["events_expected"].values())


def test_every_request_has_cuda_children_matching_the_engine(demo):
    result, _ = demo
    assert result["requests"] == result["requests_sent"] == result["requests_linked"] > 0
    for r in result["per_request"]:
        assert r["launches"] == r["expected_launches"], r
    assert {"cuda.api.calls", "cuda.api.duration", "cuda.kernel.launches", "cuda.memcpy.bytes",
            "cuda.memory.allocated", "cuda.memory.allocations", "cuda.sync.duration", "cuda.step.duration",
            "otel_cuda.events"} <= set(result["metrics"])


def test_span_tree_at_the_downstream_receiver(demo):
    _, workdir = demo
    spans = read_otlp_json(workdir / "downstream-otlp.jsonl")
    by_id = {s["span_id"]: s for s in spans}
    requests = [s for s in spans if s["name"] == "llm_request"]
    steps = {s["span_id"]: s for s in spans if s["name"] == "cuda.step"}
    assert requests and steps
    for req in requests:
        assert req["kind"] == "SERVER" and req["attributes"]["cuda.join.outcome"] == "joined"
        kids = [s for s in spans if s["parent_span_id"] == req["span_id"]]
        assert sorted(k["name"] for k in kids) == ["cuda.decode", "cuda.prefill"]
        a = req["attributes"]
        # the engine's timeline, placed in the span where its step ends line up (docs/join.md)
        queue_end = req["start_ns"] + a["cuda.join.shift_ns"] + int(a["gen_ai.latency.time_in_queue"] * 1e9)
        prefill_end = queue_end + int(a["gen_ai.latency.time_in_model_prefill"] * 1e9)
        decode_end = prefill_end + int(a["gen_ai.latency.time_in_model_decode"] * 1e9)
        window = {"cuda.prefill": (queue_end, prefill_end), "cuda.decode": (prefill_end, decode_end)}
        for kid in kids:
            assert kid["trace_id"] == req["trace_id"]  # the caller's traceparent's trace
            lo, hi = window[kid["name"]]
            assert abs(kid["start_ns"] - lo) <= 1000 and abs(kid["end_ns"] - hi) <= 1000
            assert kid["links"], "children link to the steps they summarise"
            for link in kid["links"]:
                step = steps[link["span_id"]]  # every link resolves to a cuda.step span that arrived
                mid = (step["start_ns"] + step["end_ns"]) // 2
                assert lo - 5_000_000 <= mid <= hi + 5_000_000
            assert kid["attributes"]["cuda.launches"] + kid["attributes"]["cuda.graph_launches"] > 0
        assert req["parent_span_id"], "loadgen sent a traceparent: llm_request is its child"
        assert req["parent_span_id"] not in by_id  # the caller's span is not ours


def test_replay_reexports_the_archive_as_the_live_sidecar_did(demo):
    from otel_cuda.otlp_sink import OtlpSink

    result, workdir = demo
    live = read_otlp_json(workdir / "downstream-otlp.jsonl")
    with OtlpSink(grpc_address="127.0.0.1:0") as sink:
        out = subprocess.run([sys.executable, "-m", "otel_cuda.cli", "replay", str(workdir / "archive"),
                              "--otlp-endpoint", f"http://127.0.0.1:{sink.grpc_port}"],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        sink.wait_for(lambda: "cuda.api.calls" in sink.metric_names(), 10)
        replayed = sink.spans()
        latest = {}  # cumulative points: each export repeats the series, the last one is the total
        for point in sink.metric_points("cuda.api.calls"):
            latest[tuple(sorted(point["attributes"].items()))] = point
        calls = {}
        for point in latest.values():
            f = point["attributes"]["cuda.function"]
            calls[f] = calls.get(f, 0) + point["value"]
    count = lambda spans, name: sum(1 for s in spans if s["name"] == name)  # noqa: E731
    assert count(replayed, "cuda.step") == count(live, "cuda.step") == result["steps"]
    assert count(replayed, "cuda.prefill") == count(live, "cuda.prefill") == result["requests"]
    live_steps = sorted((s["start_ns"], s["end_ns"], s["attributes"]["cuda.launches"]) for s in live if s["name"] == "cuda.step")
    replayed_steps = sorted((s["start_ns"], s["end_ns"], s["attributes"]["cuda.launches"]) for s in replayed
                            if s["name"] == "cuda.step")
    assert replayed_steps == live_steps, "replayed steps keep their original times and contents"
    expected = {}
    for (f, n) in result["events_expected"].items():
        expected[f] = expected.get(f, 0) + n
    assert all(calls[f] >= n for f, n in expected.items())
    assert sum(calls.values()) == result["events_captured_total"]
