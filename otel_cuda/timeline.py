"""`otel-cuda timeline PATH -o trace.json`: archived events → Chrome/Perfetto trace-event JSON, streamed.

Each record becomes an event as it is read (never the whole input in memory): a track per process and thread
(`process_name` / `thread_name` metadata the first time one appears), steps and timed calls as complete slices
("X"), entry-only launches as thread-scoped instants ("i"), requests as async slices on an `llm requests` process
with their queue/prefill/decode windows nested. Timestamps are µs since 00:00 UTC of the first record's day,
so they read as the time of day and stay exact in a double (the origin is in `otherData.origin_epoch_ns`).
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Iterable
from typing import TextIO

from .archive_read import ErrorPrinter, add_input_arguments, iter_records, s3_client_for
from .demangle import readable

REQUESTS_PID = 0  # traced processes have pids > 0; 0 is free for the requests track
_DAY_NS = 86_400 * 10**9
_encode = json.JSONEncoder(separators=(",", ":")).encode


class TraceWriter:
    """Writes `{"traceEvents":[…], …}` one event at a time; `close()` ends the array and the object."""

    def __init__(self, out: TextIO):
        self.out = out
        self.origin: int | None = None
        self.events = 0
        self._named: set = set()
        out.write('{"displayTimeUnit":"ns","traceEvents":[')

    def us(self, ts_ns: int) -> float:
        if self.origin is None:
            self.origin = ts_ns - ts_ns % _DAY_NS
        return round((ts_ns - self.origin) / 1000, 3)

    def emit(self, event: dict) -> None:
        self.out.write(("\n," if self.events else "\n") + _encode(event))
        self.events += 1

    def track(self, pid: int, tid: int, process: str | None = None, thread: str | None = None) -> None:
        if pid not in self._named:
            self._named.add(pid)
            self.emit({"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "tid": 0,
                       "args": {"name": process or f"pid {pid}"}})
        if (pid, tid) not in self._named:
            self._named.add((pid, tid))
            self.emit({"name": "thread_name", "ph": "M", "ts": 0, "pid": pid, "tid": tid,
                       "args": {"name": thread or f"tid {tid}"}})

    def close(self) -> None:
        self.out.write("\n],\"otherData\":" + _encode({"origin_epoch_ns": self.origin, "events": self.events,
                                                       "source": "otel-cuda timeline"}) + "}\n")


def write_trace(records: Iterable[dict], out: TextIO, on_skip=None) -> dict:
    """Streams records into trace events on `out`; returns counts. `on_skip(record, why)` for unusable ones."""
    w = TraceWriter(out)
    counts = {"records": 0, "events": 0, "skipped": 0}
    for r in records:
        counts["records"] += 1
        kind = r.get("type")
        ts = r.get("ts")
        if not isinstance(ts, int):
            counts["skipped"] += 1
            if on_skip:
                on_skip(r, "no integer ts")
            continue
        if kind == "request":
            _request(w, r, ts)
            continue
        pid, tid = r.get("pid"), r.get("tid")
        if not isinstance(pid, int) or not isinstance(tid, int):
            counts["skipped"] += 1
            if on_skip:
                on_skip(r, "no integer pid/tid")
            continue
        w.track(pid, tid)
        if kind == "cuda_step":
            args = {k: r.get(k) for k in ("step", "launches", "graph_launches", "memcpy_bytes", "api_ns", "sync_ns")}
            w.emit({"name": f"step {r.get('step')}", "cat": "cuda_step", "ph": "X", "ts": w.us(ts),
                    "dur": (r.get("dur_ns") or 0) / 1000, "pid": pid, "tid": tid, "args": args})
            continue
        func = r.get("func") or kind or "?"
        args = dict(r.get("args") or {})
        for k in ("result", "step", "kernel", "nested", "phase"):
            if r.get(k) is not None:
                args[k] = r[k]
        kernel = readable(r.get("kernel"))
        name = kernel if kernel and kernel != "unknown" else func
        if kernel:
            args["func"] = func
        event = {"name": name, "cat": kind or "?", "ts": w.us(ts), "pid": pid, "tid": tid, "args": args}
        dur = r.get("dur_ns")
        if isinstance(dur, int):
            event["ph"] = "X"
            event["dur"] = dur / 1000
        else:
            event["ph"] = "i"
            event["s"] = "t"  # thread-scoped instant: drawn on its thread's track
        w.emit(event)
    w.close()
    counts["events"] = w.events
    return counts


def _request(w: TraceWriter, r: dict, ts: int) -> None:
    w.track(REQUESTS_PID, 0, process="llm requests", thread="requests")
    rid = str(r.get("request_id") or r.get("span_id") or r.get("trace_id") or f"at-{ts}")
    common = {"cat": "request", "id": rid, "pid": REQUESTS_PID, "tid": 0}
    args = {k: r.get(k) for k in ("request_id", "trace_id", "span_id") if r.get(k) is not None}
    args["cuda"] = r.get("cuda") or {}
    end = ts + (r.get("dur_ns") or 0)
    w.emit({"name": "llm_request", "ph": "b", "ts": w.us(ts), "args": args, **common})
    windows = r.get("windows") or {}
    for phase in ("queue", "prefill", "decode"):
        span = windows.get(phase)
        if isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span):
            # clamp into the request so the async slices nest
            start, stop = max(ts, span[0]), min(end, span[1])
            if stop >= start:
                w.emit({"name": phase, "ph": "b", "ts": w.us(start), "args": (r.get("cuda") or {}).get(phase) or {},
                        **common})
                w.emit({"name": phase, "ph": "e", "ts": w.us(stop), **common})
    w.emit({"name": "llm_request", "ph": "e", "ts": w.us(end), **common})


# ---- command line -------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("timeline", help="archive → Chrome/Perfetto trace JSON",
                              description="Convert archived CUDA events to Chrome/Perfetto trace-event JSON "
                                          "(open it at ui.perfetto.dev). Streams: input of any size. Damaged input "
                                          "is reported on stderr (file:line); exit 1 only if nothing was readable.")
    add_input_arguments(p)
    p.add_argument("-o", "--output", required=True, help="trace file to write (.json, or .json.gz; - for stdout)")
    p.set_defaults(func=run)


def run(args) -> int:
    errors = ErrorPrinter("otel-cuda timeline")
    skipped: list[str] = []

    def on_skip(record: dict, why: str) -> None:
        if len(skipped) < 5:
            skipped.append(f"{why}: {_encode(record)[:120]}")

    records = iter_records(args.paths, s3_client=s3_client_for(args.paths, args.endpoint_url), on_error=errors)
    if args.output == "-":
        counts = write_trace(records, sys.stdout, on_skip)
    else:
        opener = gzip.open if args.output.endswith(".gz") else open
        with opener(args.output, "wt", encoding="utf-8") as out:
            counts = write_trace(records, out, on_skip)
    for line in skipped:
        print(f"otel-cuda timeline: record skipped ({line})", file=sys.stderr)
    if counts["skipped"] > len(skipped):
        print(f"otel-cuda timeline: {counts['skipped']} records skipped in all", file=sys.stderr)
    if not counts["records"]:
        print("otel-cuda timeline: no readable records", file=sys.stderr)
        return 1
    if args.output != "-":
        print(f"otel-cuda timeline: {counts['events']} events from {counts['records']} records → {args.output}",
              file=sys.stderr)
    return 0
