"""One otel-cuda tracer in a process of its own, as the sidecar runs: otel_cuda.bpf.Probes attached to one library
file, the sidecar's stages consuming the ring buffer. Its CPU time (getrusage of this process) is the sidecar's
cost. Driven over stdin by bench/percall.py, bench/ingest.py and bench/gpu/decode_bench.py; answers JSON lines:

  stats                    counters and CPU so far
  wait SYMBOL N [ARCHIVE]  wait until N events of SYMBOL were processed (and the archive queue is empty), then stats
  settle                   wait until the counters stop moving (0.3 s) and the archive queue is empty, then stats
  detach                   detach the uprobes, deselect the process, detach the tracepoints: nothing of ours runs
  attach                   undo detach (the BPF program, its maps and the pipeline's state, names included, stay)
  quit                     stop the sidecar (drain, close) and print its summary

Usage: tracer.py --lib PATH --pid PID [--archive DIR] [--consumer auto|sidecar|pipeline]
                 [--symbols default|cuLaunchKernel,...] [--ringbuf-pages N] [--cpus 0] [--detached]
--symbols default attaches what the sidecar attaches (the driver probe table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as bl  # noqa: E402
from otel_cuda.probes import BY_ID  # noqa: E402

DEFAULT_SYMBOLS = "cuLaunchKernel,cuStreamSynchronize,cuMemcpyHtoD_v2,cuModuleGetFunction"


class Tracer:
    def __init__(self, args):
        self.args = args
        self.probes = bl.load_probes(args.ringbuf_pages)
        full = args.consumer == "sidecar" or (args.consumer == "auto" and bl.have_otel())
        self.sc = bl.InProcessSidecar(self.probes, args.pid, args.archive, full=full)
        st = os.stat(args.lib)
        self.identity = (st.st_dev, st.st_ino)
        if args.symbols == "default":
            from otel_cuda import probes as probe_table

            self.probe_set = probe_table.DRIVER_PROBES
        else:
            self.probe_set = tuple(bl.probe(s) for s in args.symbols.split(","))
        self.symbols = [p.symbol for p in self.probe_set]
        self.tracepoints: list[bytes] = []
        self.attached = False
        self.missing: list[str] = []

    def attach(self) -> None:
        if self.attached:
            return
        bpf = self.probes._bpf
        for tp in self.tracepoints:
            bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__" + tp.replace(b":", b"__"))
        self.tracepoints = []
        for pid in self.args.pid:
            self.probes.select(pid)
        self.missing = self.probes.attach_library(self.identity, self.args.lib, self.probe_set)
        self.attached = True

    def detach(self) -> None:
        if not self.attached:
            return
        self.probes.detach_library(self.identity)
        for pid in self.args.pid:
            self.probes.deselect(pid)
        bpf = self.probes._bpf
        self.tracepoints = list(bpf.tracepoint_fds)
        for tp in self.tracepoints:
            bpf.detach_tracepoint(tp)
        self.attached = False

    def stats(self) -> dict:
        p = self.sc.pipeline
        bpf = {}
        for s in self.symbols:
            e = [bl.prog_runtime(fd) for fd in bl.prog_fds(self.probes._bpf, [f"entry_{s}"])]
            r = [bl.prog_runtime(fd) for fd in bl.prog_fds(self.probes._bpf, [f"return_{s}"])]
            bpf[s] = {"entry": e[0] if e else None, "return": r[0] if r else None}
        return {"calls": dict(p.totals.calls), "lost": self.probes.lost(), "dropped": self.sc.dropped(),
                "archived": p.totals.archived, "queue": p.events_to_archive.qsize(), "cpu_s": bl.cpu_self(),
                "named": p.names.launches_named, "unknown": p.names.launches_unknown,
                "unknown_by_function": {BY_ID[f].symbol: n for f, n in p.names.unknown_by_func.items()},
                "records": self.sc.records(),
                "calls_by_pid": self.calls_by_pid(),
                "batches": p.reader.counters.batches, "bpf": bpf, "attached": self.attached,
                "missing": self.missing, "t": time.monotonic()}

    def calls_by_pid(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for (pid, _), n in list(self.sc.pipeline.totals.by_pid.items()):
            out[pid] = out.get(pid, 0) + n
        return out

    def settle(self, quiet_s: float = 0.3, timeout: float = 30.0) -> None:
        """Return once the CUDA calls processed have not changed for quiet_s and the archive has no backlog.
        Only CUDA calls: a traced PyTorch process never goes quiet in the system view (its idle threads' off-CPU
        waits), and waiting for that cost the first GPU runs a 30 s timeout per settle."""
        deadline = time.monotonic() + timeout
        p = self.sc.pipeline
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            now = sum(p.totals.calls.values())
            if now != last:
                last, since = now, time.monotonic()
            elif p.events_to_archive.qsize() == 0 and time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--pid", required=True, type=lambda v: tuple(int(p) for p in v.split(",")),
                    help="the traced process, or several: PID,PID,...")
    ap.add_argument("--archive")
    ap.add_argument("--consumer", choices=("auto", "sidecar", "pipeline"), default="auto")
    ap.add_argument("--symbols", default=DEFAULT_SYMBOLS)
    ap.add_argument("--ringbuf-pages", type=int)
    ap.add_argument("--cpus", default="")
    ap.add_argument("--detached", action="store_true", help="start with nothing attached (send `attach`)")
    args = ap.parse_args()
    bl.pin_self(args.cpus)
    bl.enable_bpf_stats()
    t = Tracer(args)
    t.sc.start()
    if args.detached:
        t.attached = True  # the program's tracepoints are attached at load
        t.detach()
    else:
        t.attach()
    print(json.dumps({"ready": True, "kind": t.sc.kind, "missing": t.missing, "pid": os.getpid(),
                      "symbols": len(t.symbols)}), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd = parts[0]
        try:
            if cmd == "quit":
                break
            if cmd == "wait":
                t.sc.wait_calls(parts[1], int(parts[2]), archive=len(parts) > 3 and parts[3] == "1")
            elif cmd == "settle":
                t.settle()
            elif cmd == "attach":
                t0 = time.monotonic()
                t.attach()
                print(json.dumps({"attached": True, "s": time.monotonic() - t0, "missing": t.missing}), flush=True)
                continue
            elif cmd == "detach":
                t0 = time.monotonic()
                t.detach()
                print(json.dumps({"attached": False, "s": time.monotonic() - t0}), flush=True)
                continue
            elif cmd != "stats":
                print(json.dumps({"error": f"unknown command {cmd}"}), flush=True)
                continue
            print(json.dumps(t.stats()), flush=True)
        except Exception as exc:  # noqa: BLE001 - answer, so the driver of this process is not left waiting
            print(json.dumps({"error": repr(exc)}), flush=True)
    t.detach()
    summary = t.sc.stop()
    print(json.dumps({"summary": {k: summary.get(k) for k in ("lost_ringbuf", "dropped_queue", "archived",
                                                               "decode_errors", "launches_named",
                                                               "launches_unknown")}}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
