"""`otel-cuda timeline`: the output parses, every event has the fields Perfetto requires, slices nest per track,
the input is streamed, and damaged input is reported with file and line while the rest is still converted."""

import argparse
import gzip
import io
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from otel_cuda import timeline  # noqa: E402
from otel_cuda.timeline import write_trace  # noqa: E402
from tests.support import trace_samples as ts  # noqa: E402

REQUIRED = {"name", "ph", "ts", "pid", "tid"}


def lines(records):
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="otel-cuda")
    timeline.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def check_trace(trace: dict) -> list[dict]:
    """What Perfetto's JSON importer needs: a traceEvents array; name/ph/ts/pid/tid on every event, dur on X,
    id and cat on async events; X slices on one track nest (no partial overlap)."""
    events = trace["traceEvents"]
    for e in events:
        assert REQUIRED <= e.keys(), e
        assert isinstance(e["ts"], (int, float)) and isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0
        if e["ph"] in ("b", "e"):
            assert "id" in e and "cat" in e
        if e["ph"] == "i":
            assert e["s"] in ("t", "p", "g")
    tracks = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            tracks[(e["pid"], e["tid"])].append((e["ts"], -e["dur"], e["ts"] + e["dur"]))
    for slices in tracks.values():
        stack = []
        for start, _, end in sorted(slices):
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-6, "slices overlap without nesting"
            stack.append(end)
    return events


def test_trace_has_tracks_slices_instants_and_requests():
    out = io.StringIO()
    records = ts.make_trace(steps=6, requests=True, sys_records=True)
    counts = write_trace(records, out)
    events = check_trace(json.loads(out.getvalue()))
    assert counts["records"] == len(records) and counts["skipped"] == 0
    meta = {(e["name"], e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M"}
    assert meta[("process_name", 42, 0)] == "pid 42"
    assert meta[("thread_name", 42, 43)] == "tid 43" and meta[("thread_name", 42, 44)] == "tid 44"
    assert meta[("process_name", 0, 0)] == "llm requests"
    ph = Counter(e["ph"] for e in events)
    assert ph["i"] == 6 * 5  # 4 kernel launches + 1 graph launch per step, entry-only
    steps = [e for e in events if e.get("cat") == "cuda_step"]
    assert len(steps) == 6 and steps[0]["ph"] == "X" and steps[0]["dur"] == ts.STEP_NS / 1000
    assert steps[0]["args"]["launches"] == 4
    launches = [e for e in events if e["ph"] == "i"]
    assert {e["name"] for e in launches} == set(ts.KERNELS) | {"cuGraphLaunch"}  # kernel names on launches
    assert launches[0]["args"]["func"] == "cuLaunchKernel" and launches[0]["args"]["grid"] == [128, 1, 1]
    sync = next(e for e in events if e["name"] == "cuStreamSynchronize")
    assert sync["dur"] == ts.SYNC_NS / 1000 and sync["args"]["result"] == "CUDA_SUCCESS"
    # µs since 00:00 UTC of the first record's day, exact to the ns
    origin = json.loads(out.getvalue())["otherData"]["origin_epoch_ns"]
    first = next(e for e in events if e["ph"] != "M")
    assert round(first["ts"] * 1000) + origin == records[0]["ts"]
    req = [e for e in events if e.get("cat") == "request"]
    assert Counter(e["ph"] for e in req) == {"b": 3 * 4, "e": 3 * 4}  # request + 3 windows, 3 requests


def test_input_is_streamed_not_collected():
    out = io.StringIO()
    seen_output_while_reading = []

    def records():
        for i, r in enumerate(ts.make_trace(steps=200)):
            if i == 1500:
                seen_output_while_reading.append(out.tell())
            yield r

    write_trace(records(), out)
    assert seen_output_while_reading[0] > 10_000  # events were already written before the input ended
    check_trace(json.loads(out.getvalue()))


def test_records_without_ts_or_pid_are_skipped_and_counted():
    out = io.StringIO()
    skipped = []
    good = ts.make_trace(steps=1)
    counts = write_trace([{"v": 1, "type": "cuda_api", "func": "x"}, {"v": 1, "type": "cuda_api", "ts": 5}] + good,
                         out, on_skip=lambda r, why: skipped.append(why))
    assert counts["skipped"] == 2 and skipped == ["no integer ts", "no integer pid/tid"]
    check_trace(json.loads(out.getvalue()))


def test_cli_on_truncated_and_corrupt_input_reports_and_converts_the_rest(tmp_path, capsys):
    records = ts.make_trace(steps=20)
    good = tmp_path / "in" / "a.jsonl.gz"
    good.parent.mkdir()
    good.write_bytes(gzip.compress(lines(records[:100])))
    data = gzip.compress(lines(records[100:]), compresslevel=1)
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "in" / "c.jsonl").write_bytes(b"garbage\n" + lines(records[:1]))

    out = tmp_path / "trace.json"
    assert run_cli(["timeline", str(tmp_path / "in"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'in' / 'b.jsonl.gz'}:" in err and "truncated gzip" in err
    assert f"{tmp_path / 'in' / 'c.jsonl'}:1: bad JSON line" in err
    events = check_trace(json.loads(out.read_text()))
    assert sum(e["ph"] != "M" for e in events) > 100

    gz = tmp_path / "trace.json.gz"
    assert run_cli(["timeline", str(good), "-o", str(gz)]) == 0
    check_trace(json.loads(gzip.decompress(gz.read_bytes())))


def test_cli_exits_1_and_still_writes_valid_json_when_nothing_is_readable(tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert run_cli(["timeline", str(tmp_path / "missing.jsonl"), "-o", str(out)]) == 1
    assert json.loads(out.read_text())["traceEvents"] == []
    assert "missing.jsonl: cannot open" in capsys.readouterr().err
