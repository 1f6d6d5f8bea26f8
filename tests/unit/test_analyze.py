"""`otel-cuda analyze`: the report's numbers against a trace with known ground truth; text and --json; damaged
input reported with file and line while the readable part is still analysed."""

import argparse
import gzip
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from otel_cuda import analyze as analyze_mod  # noqa: E402
from otel_cuda.analyze import analyze, percentiles, render_text  # noqa: E402
from tests.support import trace_samples as ts  # noqa: E402


def lines(records):
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="otel-cuda")
    analyze_mod.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_report_numbers_match_the_ground_truth():
    steps = 10
    r = analyze(ts.make_trace(steps=steps))
    funcs = {f["func"]: f for f in r["functions"]}
    assert funcs["cuLaunchKernel"]["calls"] == 4 * steps and funcs["cuLaunchKernel"]["timed_calls"] == 0
    assert funcs["cuStreamSynchronize"]["total_ns"] == ts.SYNC_NS * steps
    assert funcs["cuStreamSynchronize"]["mean_ns"] == ts.SYNC_NS
    assert r["functions"][0]["func"] == "cuLaunchKernel"  # most calls first

    s = r["steps"]
    assert s["count"] == steps and s["source"] == "cuda_step records"
    assert s["launches_per_step"] == 4 and s["graph_launches_per_step"] == 1
    durations = sorted(ts.STEP_NS + i * 1000 for i in range(steps))
    assert s["duration"]["p50_ms"] == durations[4] / 1e6 and s["duration"]["max_ms"] == durations[-1] / 1e6
    assert s["sync_share"] == pytest.approx(ts.SYNC_NS * steps / sum(durations))

    copies = {c["kind"]: c for c in r["memcpy"]}
    assert copies["htod"]["bytes"] == 8192 * steps and copies["htod"]["sync_bandwidth_gbps"] is None  # async only
    assert copies["dtoh"]["bytes"] == ts.DTOH_BYTES * steps
    assert copies["dtoh"]["sync_bandwidth_gbps"] == pytest.approx(ts.DTOH_BYTES / ts.DTOH_NS)

    dev = r["memory"]["device"]
    assert (dev["allocs"], dev["frees"], dev["peak_bytes"], dev["live_at_end_bytes"]) == (2, 1, 5 << 20, 4 << 20)
    assert r["memory"]["host"]["peak_bytes"] == 2 << 20
    assert [p[1] for p in dev["timeline"]] == [1 << 20, 5 << 20, 4 << 20]

    engine = next(t for t in r["sync"]["threads"] if t["tid"] == 43)
    assert engine["sync_ns"] == ts.SYNC_NS * steps and 0 < engine["share"] < 1

    kernels = {k["kernel"]: k["launches"] for k in r["kernels"]["rows"]}
    assert kernels == {"gemm_kernel": 2 * steps, "flash_fwd_kernel": steps, "rms_norm_kernel": steps}
    assert r["kernels"]["rows"][0]["kernel"] == "gemm_kernel"
    assert "requests" not in r and "cold_start" not in r


def test_requests_and_cold_start_sections_appear_with_their_records():
    r = analyze(ts.make_trace(steps=4, requests=True, sys_records=True))
    assert r["requests"]["count"] == 2
    assert r["requests"]["totals"]["decode"]["launches"] == 8
    assert r["requests"]["slowest"][0]["decode_shared_by"] == 2
    c = r["cold_start"]
    assert c["files"] == 2 and c["bytes"] == 2_500_000_000
    assert c["read_gbps"] == pytest.approx(2_500_000_000 / 1_500_000_000)
    assert c["to_first_cuda_s"] == pytest.approx(3.0)
    assert c["blocked"][0]["func"] == "read"
    text = render_text(r)
    assert "Requests: 2" in text and "Cold start: 2 files" in text


def test_steps_fall_back_to_step_ids_on_calls():
    calls = [rec for rec in ts.make_trace(steps=3) if rec["type"] != "cuda_step"]
    s = analyze(calls)["steps"]
    assert s["count"] == 3 and s["source"] == "step ids on calls" and s["launches_per_step"] == 4


def test_percentiles_nearest_rank():
    p = percentiles([i * 1_000_000 for i in range(1, 101)])
    assert (p["p50_ms"], p["p90_ms"], p["p99_ms"], p["max_ms"]) == (50, 90, 99, 100)
    assert percentiles([]) == {"count": 0}


def test_text_report_reads_like_a_report():
    text = render_text(analyze(ts.make_trace(steps=10)))
    for heading in ("Top functions by calls", "Top functions by time", "Steps", "Time blocked in syncs",
                    "Copies and sets by direction", "Memory (device): peak 5.0 MiB", "Kernels: 40 launches"):
        assert heading in text
    assert "p50 2.004 ms" in text


def test_cli_text_json_and_damaged_input(tmp_path, capsys):
    good, damaged = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    records = ts.make_trace(steps=10)
    good.write_bytes(gzip.compress(lines(records[:40])))
    data = gzip.compress(lines(records[40:]), compresslevel=1)
    damaged.write_bytes(data[: len(data) // 2])
    bad = tmp_path / "c.jsonl"
    bad.write_bytes(lines(records[:2]) + b"{not json\n")

    assert run_cli(["analyze", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "Top functions by calls" in out
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 2
    assert err_lines[0].startswith(f"otel-cuda analyze: {damaged}:") and "truncated gzip" in err_lines[0]
    assert err_lines[1] == f"otel-cuda analyze: {bad}:3: bad JSON line (Expecting property name enclosed in " \
                           f"double quotes: line 1 column 2 (char 1))"

    assert run_cli(["analyze", str(good), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input"]["records"] == 40 and report["input"]["errors"] == 0


def test_cli_exits_1_when_nothing_is_readable(tmp_path, capsys):
    f = tmp_path / "x.jsonl.gz"
    f.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\xff" * 32)  # gzip header, bad deflate
    assert run_cli(["analyze", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}:1: corrupt gzip data" in err and "no readable records" in err
