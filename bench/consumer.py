"""bench/consumer — the sidecar's consumer alone: CPU per event, with the producer taken out.

On the development machine a uprobe trap costs 20-30 us, so the traced program, not the sidecar, caps what
bench/ingest can push through (one core makes ~40 000 calls/s): its "events/s per core" is the producer's ceiling.
This bench feeds the sidecar's real stages — built by sidecar.start() as `otel-cuda run` builds them: names, steps,
metrics, spans, the join's step buffer, the archive (gzip JSONL to a directory) — with ring-buffer records made in
memory, as a decode-ready batch source in place of the kernel's ring buffer, and measures the process's CPU time
per event (getrusage, every thread; the archive thread included) once the archive has written everything.

The records are an eager engine's: steps of --launches cuLaunchKernel records (8 kernels, named by
cuModuleGetFunction records first) closed by a cuMemcpyDtoHAsync_v2 + cuEventRecord + cuEventSynchronize,
batches of --batch records (what one ring-buffer read returns under load).

    .venv/bin/python bench/consumer.py [--events 400000] [--archive on|off] [--profile] --json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otel_cuda import events as E  # noqa: E402
from otel_cuda.probes import BY_SYMBOL  # noqa: E402
from otel_cuda.ringbuf import MemoryRing, frame  # noqa: E402

PID = 4242


def records(n_events: int, launches: int) -> list[bytes]:
    """The engine's ring-buffer records, in order."""
    out = []
    ts = time.monotonic_ns()
    name_fn = BY_SYMBOL["cuModuleGetFunction"].func_id
    for k in range(8):
        out.append(E._NAME.pack(E.EV_NAME, 0, E.F_RETURN, name_fn, PID, PID, ts, 1000, 0, 0xA000 + k, 1, 0,
                                f"_ZN4vllm8kernel_{k}EPfPKfi".encode()))
    launch = BY_SYMBOL["cuLaunchKernel"].func_id
    call = E._CALL.pack
    f = {s: BY_SYMBOL[s].func_id for s in ("cuMemcpyDtoHAsync_v2", "cuEventRecord", "cuEventSynchronize")}
    while len(out) < n_events:
        for i in range(launches):
            ts += 5_000
            out.append(E._LAUNCH.pack(E.EV_LAUNCH, 0, 0, launch, PID, PID, ts, 0, -1, 0, 0xA000 + i % 8, 7,
                                      64, 1, 1, 256, 1, 1))
        ts += 5_000
        out.append(call(E.EV_CALL, 0, E.F_RETURN, f["cuMemcpyDtoHAsync_v2"], PID, PID, ts, 3000, 0, 1, 2, 256, 9, 0, 0))
        out.append(call(E.EV_CALL, 0, E.F_RETURN, f["cuEventRecord"], PID, PID, ts + 4000, 500, 0, 9, 77, 0, 0, 0, 0))
        out.append(call(E.EV_CALL, 0, E.F_RETURN, f["cuEventSynchronize"], PID, PID + 1, ts + 5000, 200_000, 0, 0, 77,
                        0, 0, 0, 0))
        ts += 210_000
    return out[:n_events]


class SyntheticProbes(MemoryRing):
    """The kernel side: the records above as ring-buffer reads; empty kernel maps."""

    attached_probes = 0

    def __init__(self, batches: list[bytes]):
        self._batches = batches
        self.done = threading.Event()
        self.backlog = lambda: 0  # events queued for the archive thread

    def read_batch(self, timeout_ms):
        # A producer no faster than the archive: the consumer drops archive lines rather than wait for the
        # archive thread (the ring buffer would fill), so a source that never waits would measure drops.
        while self.backlog() > 16384:
            time.sleep(0.0005)
        if self._batches:
            return self._batches.pop(0)
        self.done.set()
        time.sleep(timeout_ms / 1000)
        return b""

    def select(self, pid): pass
    def deselect(self, pid): pass
    def forget_processes(self, pids): pass
    def attach_library(self, *a): return []
    def detach_library(self, *a): pass
    def lost(self): return 0
    def table_full(self): return 0
    def skipped_runs(self): return 0
    def stats(self): return {}
    def live_bytes(self): return {}
    def kernel_launches(self): return {}
    def table(self, name): return {}

    def __getattr__(self, name):  # any other kernel map the stages read: empty
        return lambda *a, **k: {}


class NoProcesses:
    def pids(self):
        return []

    def info(self, pid, library):
        return None


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(args) -> dict:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import SpanProcessor

    sys.path.insert(0, str(ROOT / "tests"))
    from support.harness import settings as make_settings
    from otel_cuda.sidecar import start

    recs = records(args.events, args.launches)
    batches = [frame(recs[i:i + args.batch]) for i in range(0, len(recs), args.batch)]  # as the kernel frames them
    archive = tempfile.mkdtemp(prefix="bench-consumer-") if args.archive == "on" else None
    settings = make_settings(match="nothing-matches-this", no_archive=archive is None,
                             **({"archive": archive} if archive else {}))
    probes = SyntheticProbes(batches)
    sidecar = start(settings, probes, procfs=NoProcesses(), env={}, span_processor=SpanProcessor(),
                    metric_readers=[InMemoryMetricReader()], self_metric_readers=[InMemoryMetricReader()])
    probes.backlog = lambda: sidecar.pipeline._archive_backlog
    sidecar.pipeline.observer.on_process(__import__("otel_cuda.discovery", fromlist=["ProcInfo"]).ProcInfo(PID, "engine"))
    stop = threading.Event()
    profiler = cProfile.Profile() if args.profile else None
    c0, t0 = cpu(), time.monotonic()
    runner = threading.Thread(target=sidecar.run, args=(stop,))
    if profiler:
        threading.setprofile(None)
        profiler.enable()
        sidecar.run_thread = None
        probes.done.clear()
        target = sidecar.run
        done = threading.Thread(target=lambda: (probes.done.wait(), stop.set()))
        done.start()
        target(stop)
        profiler.disable()
    else:
        runner.start()
        probes.done.wait()
        stop.set()
        runner.join()
    c1, t1 = cpu(), time.monotonic()
    summary = sidecar.pipeline.summary()
    out = {"events": len(recs), "batch": args.batch, "launches_per_step": args.launches, "archive": args.archive,
           "cpu_s": round(c1 - c0, 3), "wall_s": round(t1 - t0, 3),
           "cpu_s_per_100k_events": round((c1 - c0) / len(recs) * 1e5, 3),
           "events_per_s_per_core": round(len(recs) / (c1 - c0)),
           "processed": sum(summary["calls"].values()), "steps": summary["steps"], "archived": summary["archived"],
           "dropped": summary["dropped_queue"],
           "named": summary["launches_named"], "unknown": summary["launches_unknown"]}
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(25)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--launches", type=int, default=40)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--archive", choices=("on", "off"), default="on")
    ap.add_argument("--profile", action="store_true", help="cProfile the consumer's thread (not the archive's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = run(args)
    print(json.dumps(out, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
