"""`otel-cuda analyze PATH|s3://…`: what an archive says about a run, for a person (text) or a program (--json).

One pass over the records (inputs can be large): counters and small per-step / per-thread tables, never the
records themselves. Times in the report are ns unless a key says otherwise (`_ms`, `_s`, `_gbps`).
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable

from .archive_read import ErrorPrinter, add_input_arguments, iter_records, s3_client_for
from .demangle import readable

LAUNCH = {"cuLaunchKernel", "cuLaunchKernelEx", "cuLaunchCooperativeKernel",
          "cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel"}
GRAPH_LAUNCH = {"cuGraphLaunch", "cudaGraphLaunch"}
# Host-blocking waits only: cuStreamWaitEvent enqueues a device-side wait and returns at once.
SYNC = {"cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize",
        "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}
ALLOC = {"cuMemAlloc_v2", "cuMemAllocAsync", "cuMemAllocManaged", "cuMemAllocHost_v2", "cuMemHostAlloc",
         "cuMemCreate", "cudaMalloc", "cudaMallocAsync", "cudaMallocManaged", "cudaMallocHost", "cudaHostAlloc"}
FREE = {"cuMemFree_v2", "cuMemFreeAsync", "cuMemFreeHost", "cuMemRelease", "cudaFree", "cudaFreeAsync",
        "cudaFreeHost"}
COPY_PREFIXES = ("cuMemcpy", "cuMemset", "cudaMemcpy", "cudaMemset")
OK_RESULTS = {None, "CUDA_SUCCESS", "cudaSuccess"}
SYS_READS = {"read", "pread64", "readv", "preadv", "preadv2"}
TIMELINE_POINTS = 48


def _memory_type(func: str, args: dict) -> str:
    t = args.get("memory_type")
    if t:
        return t
    return "host" if "Host" in func else "managed" if "Managed" in func else "device"


def percentiles(values: list[int]) -> dict:
    """Nearest-rank p50/p90/p99, max and mean of ns values, in ms."""
    if not values:
        return {"count": 0}
    v = sorted(values)
    n = len(v)

    def rank(p: float) -> float:
        return v[min(n - 1, max(0, -(-p * n // 100) - 1))] / 1e6

    return {"count": n, "p50_ms": rank(50), "p90_ms": rank(90), "p99_ms": rank(99), "max_ms": v[-1] / 1e6,
            "mean_ms": sum(v) / n / 1e6}


def _downsample(points: list[tuple[int, int]], t0: int) -> list[list[float]]:
    """Live bytes over time as at most TIMELINE_POINTS [seconds since start, peak live bytes in that bucket]."""
    if len(points) <= TIMELINE_POINTS:
        return [[(ts - t0) / 1e9, live] for ts, live in points]
    first, last = points[0][0], points[-1][0]
    width = max(1, (last - first) // TIMELINE_POINTS + 1)
    buckets: dict[int, tuple[int, int]] = {}
    for ts, live in points:
        b = (ts - first) // width
        if b not in buckets or live > buckets[b][1]:
            buckets[b] = (ts, live)
    return [[(ts - t0) / 1e9, live] for ts, live in (buckets[b] for b in sorted(buckets))]


def analyze(records: Iterable[dict], top: int = 15) -> dict:
    by_type: Counter = Counter()
    funcs: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])  # calls, timed calls, total ns, max, errors
    kernels: Counter = Counter()
    threads: dict[tuple, list[int]] = {}  # (pid, tid) → [first ts, last end, sync ns, sync calls]
    copies: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # calls, bytes, sync-copy bytes, sync-copy ns
    mem_events: list[tuple[int, int, str]] = []  # (ts, ±bytes, memory type)
    mem_counts: Counter = Counter()
    live_ptrs: dict[tuple, int] = {}
    step_records: list[dict] = []
    call_steps: dict[tuple, list[int]] = {}  # (pid, step) → [first ts, last end, launches, graph launches]
    requests: list[dict] = []
    sys_recs: list[tuple] = []  # compact sys records; the cold start is each process's part before its first launch
    first_cuda_ts: dict[int, int] = {}
    first_launch_ts: dict[int, int] = {}
    t_min = t_max = None

    for r in records:
        kind = r.get("type")
        by_type[kind] += 1
        ts = r.get("ts")
        dur = r.get("dur_ns") or 0
        if isinstance(ts, int):
            t_min = ts if t_min is None or ts < t_min else t_min
            end = ts + (dur if isinstance(dur, int) else 0)
            t_max = end if t_max is None or end > t_max else t_max
        if kind in ("cuda_api", "cuda_runtime"):
            if not isinstance(ts, int):
                continue
            func = r.get("func") or "?"
            args = r.get("args") or {}
            pid, tid = r.get("pid"), r.get("tid")
            f = funcs[func]
            f[0] += 1
            if r.get("dur_ns") is not None:
                f[1] += 1
                f[2] += dur
                f[3] = max(f[3], dur)
            ok = r.get("result") in OK_RESULTS
            if not ok:
                f[4] += 1
            if pid not in first_cuda_ts or ts < first_cuda_ts[pid]:
                first_cuda_ts[pid] = ts
            if (func in LAUNCH or func in GRAPH_LAUNCH) and (pid not in first_launch_ts or ts < first_launch_ts[pid]):
                first_launch_ts[pid] = ts
            th = threads.get((pid, tid))
            if th is None:
                th = threads[(pid, tid)] = [ts, end, 0, 0]
            th[0] = min(th[0], ts)
            th[1] = max(th[1], end)
            if r.get("nested"):
                continue  # the enclosing runtime call already counts the work below
            if func in LAUNCH:
                kernels[readable(r.get("kernel")) or "unknown"] += 1
            if func in SYNC:
                th[2] += dur
                th[3] += 1
            if func.startswith(COPY_PREFIXES) and ok:
                c = copies[args.get("kind") or ("memset" if "emset" in func else "default")]
                c[0] += 1
                nbytes = args.get("bytes") or 0
                c[1] += nbytes
                if "Async" not in func and dur > 0:  # an async call's duration is its enqueue time, not the copy
                    c[2] += nbytes
                    c[3] += dur
            elif func in ALLOC and ok:
                mtype = _memory_type(func, args)
                nbytes = args.get("bytes") or 0
                mem_counts[(mtype, "allocs")] += 1
                live_ptrs[(pid, args.get("ptr") or args.get("handle"))] = nbytes
                mem_events.append((ts + dur, nbytes, mtype))
            elif func in FREE and ok:
                mtype = _memory_type(func, args)
                mem_counts[(mtype, "frees")] += 1
                known = live_ptrs.pop((pid, args.get("ptr") or args.get("handle")), None)
                nbytes = args.get("bytes") if args.get("bytes") is not None else known
                if nbytes is None:
                    mem_counts[(mtype, "unmatched_frees")] += 1
                else:
                    mem_events.append((ts, -nbytes, mtype))
            step = r.get("step")
            if step is not None:
                s = call_steps.get((pid, step))
                if s is None:
                    s = call_steps[(pid, step)] = [ts, end, 0, 0]
                s[0] = min(s[0], ts)
                s[1] = max(s[1], end)
                s[2] += func in LAUNCH
                s[3] += func in GRAPH_LAUNCH
        elif kind == "cuda_step":
            step_records.append({k: r.get(k) or 0 for k in ("dur_ns", "launches", "graph_launches", "sync_ns",
                                                             "api_ns", "memcpy_bytes")})
        elif kind == "request":
            requests.append(r)
        elif kind == "sys":
            if isinstance(ts, int):
                a = r.get("args") or {}
                sys_recs.append((r.get("pid"), ts, dur if isinstance(dur, int) else 0, r.get("func") or "?",
                                 a.get("path"), a.get("file_kind"), a.get("bytes") or 0, a.get("reason"),
                                 r.get("result") in (None, "ok")))

    report: dict = {
        "input": {"records": sum(by_type.values()), "by_type": dict(by_type),
                  "processes": len({p for p, _ in threads}), "threads": len(threads),
                  "start_ts": t_min, "end_ts": t_max, "wall_s": ((t_max - t_min) / 1e9) if t_min is not None else 0},
        "functions": _functions(funcs),
        "steps": _steps(step_records, call_steps),
        "memcpy": _copies(copies),
        "memory": _memory(mem_events, mem_counts, t_min),
        "sync": _sync(threads),
        "kernels": _kernels(kernels, top),
        "top": top,
    }
    if requests:
        report["requests"] = _requests(requests, top)
    if by_type.get("sys"):
        report["cold_start"] = _cold_start(sys_recs, first_cuda_ts, first_launch_ts, top)
    return report


def _functions(funcs: dict) -> list[dict]:
    rows = [{"func": name, "calls": c, "timed_calls": n, "total_ns": total, "mean_ns": (total // n) if n else None,
             "max_ns": mx if n else None, "errors": err} for name, (c, n, total, mx, err) in funcs.items()]
    return sorted(rows, key=lambda r: (-r["calls"], r["func"]))


def _steps(step_records: list[dict], call_steps: dict) -> dict:
    if step_records:
        source = "cuda_step records"
        rows = step_records
    else:
        # No step records (an archive of calls only): a step is the span of the calls that carry its id.
        source = "step ids on calls"
        rows = [{"dur_ns": end - start, "launches": n, "graph_launches": g} for start, end, n, g in call_steps.values()]
    if not rows:
        return {"count": 0, "source": None}
    n = len(rows)
    out = {"count": n, "source": source, "duration": percentiles([r["dur_ns"] for r in rows]),
           "launches_per_step": sum(r["launches"] for r in rows) / n,
           "graph_launches_per_step": sum(r["graph_launches"] for r in rows) / n,
           "max_launches": max(r["launches"] for r in rows)}
    if step_records:
        total = sum(r["dur_ns"] for r in rows) or 1
        out["sync_share"] = sum(r["sync_ns"] for r in rows) / total
        out["api_share"] = sum(r["api_ns"] for r in rows) / total
        out["memcpy_bytes_per_step"] = sum(r["memcpy_bytes"] for r in rows) / n
    return out


def _copies(copies: dict) -> list[dict]:
    rows = []
    for kind, (calls, nbytes, timed_bytes, timed_ns) in copies.items():
        rows.append({"kind": kind, "calls": calls, "bytes": nbytes,
                     "sync_bandwidth_gbps": (timed_bytes / timed_ns) if timed_ns else None})  # bytes/ns = GB/s
    return sorted(rows, key=lambda r: -r["bytes"])


def _memory(events: list, counts: Counter, t0: int | None) -> dict:
    out = {}
    for mtype in sorted({t for t, _ in counts}):
        live = peak = 0
        peak_ts = None
        points = []
        for ts, delta, t in sorted(e for e in events if e[2] == mtype):
            live += delta
            if live > peak:
                peak, peak_ts = live, ts
            points.append((ts, live))
        out[mtype] = {"allocs": counts[(mtype, "allocs")], "frees": counts[(mtype, "frees")],
                      "unmatched_frees": counts[(mtype, "unmatched_frees")], "peak_bytes": peak,
                      "peak_at_s": ((peak_ts - t0) / 1e9) if peak_ts is not None and t0 is not None else None,
                      "live_at_end_bytes": live, "timeline": _downsample(points, t0 or 0)}
    return out


def _sync(threads: dict) -> dict:
    rows = []
    for (pid, tid), (first, last, sync_ns, sync_calls) in threads.items():
        wall = last - first
        rows.append({"pid": pid, "tid": tid, "sync_calls": sync_calls, "sync_ns": sync_ns, "wall_ns": wall,
                     "share": (sync_ns / wall) if wall > 0 else 0.0})
    rows.sort(key=lambda r: (-r["sync_ns"], str(r["pid"]), str(r["tid"])))
    total_sync = sum(r["sync_ns"] for r in rows)
    total_wall = sum(r["wall_ns"] for r in rows)
    return {"share": (total_sync / total_wall) if total_wall else 0.0, "sync_ns": total_sync, "threads": rows}


def _kernels(kernels: Counter, top: int) -> dict:
    total = sum(kernels.values())
    rows = [{"kernel": k, "launches": n, "share": n / total} for k, n in kernels.most_common()]
    return {"launches": total, "distinct": len(kernels), "rows": rows}


def _requests(requests: list[dict], top: int) -> dict:
    phases = ("prefill", "decode")
    totals = {p: Counter() for p in phases}
    for r in requests:
        for p in phases:
            for k, v in ((r.get("cuda") or {}).get(p) or {}).items():
                if isinstance(v, (int, float)) and k != "shared_by":
                    totals[p][k] += v
    slowest = sorted(requests, key=lambda r: -(r.get("dur_ns") or 0))[:top]
    rows = []
    for r in slowest:
        cuda = r.get("cuda") or {}
        rows.append({"request_id": r.get("request_id"), "trace_id": r.get("trace_id"), "dur_ns": r.get("dur_ns"),
                     **{f"{p}_{k}": (cuda.get(p) or {}).get(k) for p in phases
                        for k in ("steps", "launches", "sync_ns", "shared_by")}})
    return {"count": len(requests), "duration": percentiles([r.get("dur_ns") or 0 for r in requests]),
            "totals": {p: dict(totals[p]) for p in phases}, "slowest": rows}


def _cold_start(recs: list[tuple], first_cuda_ts: dict, first_launch_ts: dict, top: int) -> dict:
    """Each process's sys records before its first kernel launch (all of them for a process that never launched):
    files, bytes read and mapped by file kind, read speed, what blocked (calls, and off-CPU time by reason)."""
    paths: set = set()
    by_func: Counter = Counter()
    ns_by_func: Counter = Counter()
    bytes_by_path: Counter = Counter()
    kind_of: dict = {}
    read_kind: Counter = Counter()
    mapped_kind: Counter = Counter()
    nbytes = read_ns = device_opens = 0
    first_ts = last_end = None
    for pid, ts, dur, func, path, kind, size, reason, ok in recs:
        end = first_launch_ts.get(pid)
        if end is not None and ts >= end:
            continue
        first_ts = ts if first_ts is None else min(first_ts, ts)
        last_end = ts + dur if last_end is None else max(last_end, ts + dur)
        key = f"offcpu:{reason}" if func == "offcpu" and reason else func
        by_func[key] += 1
        ns_by_func[key] += dur
        if func == "device_open" and ok:
            device_opens += 1
        if path and ok and func != "munmap":
            paths.add(path)
            kind_of.setdefault(path, kind)
        if func in SYS_READS:
            read_ns += dur
            read_kind[kind or "other"] += size
        elif func == "mmap":
            mapped_kind[kind or "other"] += size
        else:
            continue
        if func in SYS_READS or kind not in ("library", "device", "unknown"):  # address space of libraries: not data
            nbytes += size
            if path:
                bytes_by_path[path] += size
    first_cuda = min(first_cuda_ts.values()) if first_cuda_ts else None
    first_launch = min(first_launch_ts.values()) if first_launch_ts else None
    reads = sum(read_kind.values())
    return {"files": len(paths), "bytes": nbytes, "read_ns": read_ns, "read_gbps": (reads / read_ns) if read_ns else None,
            "bytes_read_by_kind": dict(read_kind), "bytes_mapped_by_kind": dict(mapped_kind),
            "device_opens": device_opens, "io_wait_ns": ns_by_func.get("offcpu:io", 0),
            "span_s": ((last_end - first_ts) / 1e9) if first_ts is not None else 0,
            "to_first_cuda_s": ((first_cuda - first_ts) / 1e9) if first_cuda is not None and first_ts is not None else None,
            "to_first_launch_s": ((first_launch - first_ts) / 1e9)
            if first_launch is not None and first_ts is not None else None,
            "blocked": [{"func": f, "calls": by_func[f], "total_ns": ns} for f, ns in ns_by_func.most_common(top)],
            "top_files": [{"path": p, "kind": kind_of.get(p), "bytes": b} for p, b in bytes_by_path.most_common(top)]}


# ---- text ---------------------------------------------------------------------------------------------------

def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ms(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.3f}"


def _table(headers: list[str], rows: list[list]) -> list[str]:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # first column left-aligned (names), the rest right-aligned (numbers)
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return ["  " + fmt(r).rstrip() for r in cells]


def render_text(report: dict) -> str:
    top = report.get("top", 15)
    i = report["input"]
    types = ", ".join(f"{k} {v}" for k, v in sorted(i["by_type"].items(), key=str))
    out = [f"Archive: {i['records']} records ({types}), {i['processes']} processes, {i['threads']} threads, "
           f"{i['wall_s']:.3f} s of wall time"]

    funcs = report["functions"]
    if funcs:
        out += ["", f"Top functions by calls (of {len(funcs)})"]
        out += _table(["function", "calls", "total ms", "mean ms", "max ms", "errors"],
                      [[f["func"], f["calls"], _ms(f["total_ns"] if f["timed_calls"] else None), _ms(f["mean_ns"]),
                        _ms(f["max_ns"]), f["errors"]] for f in funcs[:top]])
        by_time = sorted((f for f in funcs if f["timed_calls"]), key=lambda f: -f["total_ns"])[:top]
        if by_time:
            out += ["", "Top functions by time (entry to return; launches are entry-only unless probed on return)"]
            out += _table(["function", "total ms", "calls", "mean ms"],
                          [[f["func"], _ms(f["total_ns"]), f["calls"], _ms(f["mean_ns"])] for f in by_time])

    s = report["steps"]
    out += ["", "Steps"]
    if s["count"]:
        d = s["duration"]
        out.append(f"  {s['count']} steps (from {s['source']}): duration p50 {d['p50_ms']:.3f} ms, p90 "
                   f"{d['p90_ms']:.3f} ms, p99 {d['p99_ms']:.3f} ms, max {d['max_ms']:.3f} ms")
        out.append(f"  per step: {s['launches_per_step']:.1f} launches (max {s['max_launches']}), "
                   f"{s['graph_launches_per_step']:.2f} graph launches")
        if "sync_share" in s:
            out.append(f"  of step time: {s['sync_share']:.1%} waiting in syncs, {s['api_share']:.1%} in CUDA calls; "
                       f"{_bytes(s['memcpy_bytes_per_step'])} copied per step")
    else:
        out.append("  none (no cuda_step records and no step ids on calls)")

    sync = report["sync"]
    if sync["threads"]:
        out += ["", f"Time blocked in syncs: {sync['share']:.1%} of the threads' wall time"]
        out += _table(["pid/tid", "sync calls", "sync ms", "wall ms", "share"],
                      [[f"{t['pid']}/{t['tid']}", t["sync_calls"], _ms(t["sync_ns"]), _ms(t["wall_ns"]),
                        f"{t['share']:.1%}"] for t in sync["threads"][:top]])

    if report["memcpy"]:
        out += ["", "Copies and sets by direction (bandwidth: host-observed, synchronous copies only)"]
        out += _table(["kind", "calls", "bytes", "GB/s"],
                      [[c["kind"], c["calls"], _bytes(c["bytes"]),
                        "-" if c["sync_bandwidth_gbps"] is None else f"{c['sync_bandwidth_gbps']:.2f}"]
                       for c in report["memcpy"]])

    for mtype, m in report["memory"].items():
        out += ["", f"Memory ({mtype}): peak {_bytes(m['peak_bytes'])}"
                    + (f" at +{m['peak_at_s']:.6f} s" if m["peak_at_s"] is not None else "")
                    + f", {_bytes(m['live_at_end_bytes'])} live at the end; {m['allocs']} allocs, {m['frees']} frees"
                    + (f" ({m['unmatched_frees']} of unknown size)" if m["unmatched_frees"] else "")]
        if m["timeline"]:
            peak = max(p[1] for p in m["timeline"]) or 1
            for t, live in m["timeline"]:
                out.append(f"  +{t:12.6f} s {_bytes(live):>11} {'#' * round(40 * live / peak)}")

    k = report["kernels"]
    if k["launches"]:
        out += ["", f"Kernels: {k['launches']} launches of {k['distinct']} kernels"]
        out += _table(["kernel", "launches", "share"],
                      [[r["kernel"], r["launches"], f"{r['share']:.1%}"] for r in k["rows"][:top]])

    if "requests" in report:
        r = report["requests"]
        d = r["duration"]
        out += ["", f"Requests: {r['count']}, duration p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms, "
                    f"max {d['max_ms']:.1f} ms (CUDA work of shared steps is attributed, not divided)"]
        out += _table(["request", "ms", "prefill steps", "prefill launches", "decode steps", "decode launches",
                       "decode sync ms", "shared by"],
                      [[x["request_id"] or x["trace_id"] or "?", _ms(x["dur_ns"]), x["prefill_steps"] or 0,
                        x["prefill_launches"] or 0, x["decode_steps"] or 0, x["decode_launches"] or 0,
                        _ms(x["decode_sync_ns"] or 0), x["decode_shared_by"] or "-"] for x in r["slowest"]])

    if "cold_start" in report:
        c = report["cold_start"]
        out += ["", f"Cold start: {c['files']} files, {_bytes(c['bytes'])} read"
                    + (f" at {c['read_gbps']:.2f} GB/s" if c["read_gbps"] else "")
                    + (f"; first CUDA call {c['to_first_cuda_s']:.3f} s after the first file access"
                       if c["to_first_cuda_s"] is not None else "")]
        kinds = sorted(set(c.get("bytes_read_by_kind", {})) | set(c.get("bytes_mapped_by_kind", {})))
        if kinds:
            out += _table(["file kind", "read", "mapped"],
                          [[k, _bytes(c["bytes_read_by_kind"].get(k, 0)), _bytes(c["bytes_mapped_by_kind"].get(k, 0))]
                           for k in kinds])
        if c.get("io_wait_ns") or c.get("device_opens"):
            out.append(f"  blocked on I/O (D state) {_ms(c['io_wait_ns'])} ms; /dev/nvidia* opens {c['device_opens']}")
        if c["blocked"]:
            out += _table(["blocked in", "calls", "total ms"], [[b["func"], b["calls"], _ms(b["total_ns"])]
                                                                for b in c["blocked"]])
        if c["top_files"]:
            out += _table(["file", "bytes"], [[f["path"], _bytes(f["bytes"])] for f in c["top_files"]])
    return "\n".join(out) + "\n"


# ---- command line -------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="summarise an archive (files, directories, s3://)",
                              description="Summarise archived CUDA events: top functions, steps, copies, memory, "
                                          "syncs, kernels, requests. Damaged input is reported on stderr (file:line) "
                                          "and the readable part is still used; exit 1 only if nothing was readable.")
    add_input_arguments(p)
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--top", type=int, default=15, help="rows per table (default 15)")
    p.set_defaults(func=run)


def run(args) -> int:
    errors = ErrorPrinter("otel-cuda analyze")
    records = iter_records(args.paths, s3_client=s3_client_for(args.paths, args.endpoint_url), on_error=errors)
    report = analyze(records, top=args.top)
    report["input"]["errors"] = errors.count
    if not report["input"]["records"]:
        print("otel-cuda analyze: no readable records", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_text(report))
    return 0
