"""One otel-cuda tracer in a process of its own, as the sidecar runs: otel_cuda.bpf.Probes attached to one copy of
the fake libcuda, the sidecar's stages consuming the ring buffer. Its CPU time (getrusage of this process) is the
sidecar's cost. Driven over stdin by bench/percall.py and bench/ingest.py; answers JSON lines:

  stats                    counters and CPU so far
  wait SYMBOL N [ARCHIVE]  wait until N events of SYMBOL were processed (and the archive queue is empty), then stats
  quit                     stop the sidecar (drain, close) and print its summary

Usage: tracer.py --lib PATH --pid PID [--proposed] [--archive DIR] [--consumer sidecar|pipeline]
                 [--symbols cuLaunchKernel,...] [--ringbuf-pages N] [--cpus 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as bl  # noqa: E402

DEFAULT_SYMBOLS = "cuLaunchKernel,cuStreamSynchronize,cuMemcpyHtoD_v2,cuModuleGetFunction"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--proposed", action="store_true")
    ap.add_argument("--archive")
    ap.add_argument("--consumer", choices=("sidecar", "pipeline"), default="sidecar")
    ap.add_argument("--symbols", default=DEFAULT_SYMBOLS)
    ap.add_argument("--ringbuf-pages", type=int)
    ap.add_argument("--cpus", default="")
    args = ap.parse_args()
    bl.pin_self(args.cpus)
    bl.enable_bpf_stats()
    probes = bl.load_proposed_probes(args.ringbuf_pages) if args.proposed else bl.load_probes(args.ringbuf_pages)
    sc = bl.InProcessSidecar(probes, args.pid, args.archive, full=args.consumer == "sidecar")
    st = os.stat(args.lib)
    symbols = args.symbols.split(",")
    missing = probes.attach_library((st.st_dev, st.st_ino), args.lib, tuple(bl.probe(s) for s in symbols))
    sc.start()
    entry_fds = {s: bl.prog_fds(probes._bpf, [f"entry_{s}"]) for s in symbols}
    return_fds = {s: bl.prog_fds(probes._bpf, [f"return_{s}"]) for s in symbols}

    def stats() -> dict:
        p = sc.pipeline
        bpf = {}
        for s in symbols:
            e = [bl.prog_runtime(fd) for fd in entry_fds[s]]
            r = [bl.prog_runtime(fd) for fd in return_fds[s]]
            bpf[s] = {"entry": e[0] if e else None, "return": r[0] if r else None}
        return {"calls": dict(p.totals.calls), "lost": probes.lost(), "dropped": sc.dropped(),
                "archived": p.totals.archived, "queue": p.events_to_archive.qsize(), "cpu_s": bl.cpu_self(),
                "named": p.names.launches_named, "unknown": p.names.launches_unknown, "records": sc.records(),
                "batches": p.reader.counters.batches, "bpf": bpf, "t": time.monotonic()}

    print(json.dumps({"ready": True, "kind": sc.kind, "missing": missing, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        if parts[0] == "stats":
            print(json.dumps(stats()), flush=True)
        elif parts[0] == "wait":
            sc.wait_calls(parts[1], int(parts[2]), archive=len(parts) > 3 and parts[3] == "1")
            print(json.dumps(stats()), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {parts[0]}"}), flush=True)
    summary = sc.stop()
    print(json.dumps({"summary": {k: summary.get(k) for k in ("lost_ringbuf", "dropped_queue", "archived",
                                                               "decode_errors")}}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
