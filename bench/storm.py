"""bench/storm — a node's launch storm: N processes launching flat out on every CPU, traced by one sidecar.

Method. --processes bench_driver processes (testbed/bench_driver.c), each with --threads threads, call
cuLaunchKernel flat out through one shared copy of the library (uprobes are per inode: one attach serves every
process, as a node's libcuda serves its pods), all at the same time, unpinned, so that the workload takes every
CPU. One sidecar (bench/tracer.py: the sidecar's stages, archive on to a local directory) traces them all and is
not pinned either: it wins CPU time from the workload as a DaemonSet does. Each driver counts its own calls; the
sidecar counts what it processed per process and what the kernel could not keep.

  calls           every driver's own count, summed (ground truth)
  captured        events the sidecar processed, per process and summed
  lost_ringbuf    records the ring buffer refused, counted in the kernel (records of every kind: the system view's
                  scheduling records of the launching threads share the ring buffer)
  uncounted_loss  calls - captured beyond lost_ringbuf: must be 0 (no silent loss)
  sidecar CPU     the sidecar process's CPU seconds over the storm and its drain, per 100 000 events

    bench/storm [--processes 8] [--threads 2] [--calls 200000] [--rate 0] [--archive on|off] [--libcuda PATH]
                [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as bl  # noqa: E402

SYM = "cuLaunchKernel"


def run(args) -> dict:
    bl.build_testbed()
    first = bl.Driver(("storm",), cpus="")
    drivers = [first] + [bl.Driver(("storm",), cpus="", lib=first.lib("storm")) for _ in range(args.processes - 1)]
    adir = tempfile.mkdtemp(prefix="bench-storm-archive-") if args.archive == "on" else None
    try:
        for d in drivers:
            d.name()  # the kernel's name before tracing starts (the sidecar reads it from memory)
        tracer = bl.Tracer(first.lib("storm"), tuple(d.pid for d in drivers), cpus="", archive=adir,
                           symbols=f"{SYM},cuModuleGetFunction")
        try:
            before = tracer.stats()
            results: dict[int, dict] = {}

            def storm(d):
                results[d.pid] = d.run("launch", args.calls, rate=args.rate, threads=args.threads)["storm"]

            t0 = time.monotonic()
            threads = [threading.Thread(target=storm, args=(d,)) for d in drivers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            calls = sum(r["n"] for r in results.values())
            lost_ringbuf = tracer.stats()["lost"] - before["lost"]
            # wait for everything that reached the ring buffer to be processed and archived
            after = tracer.wait(SYM, before["calls"].get(SYM, 0) + calls - lost_ringbuf, adir is not None)
        finally:
            final = tracer.close()
        captured_by_pid = {int(pid): n - before["calls_by_pid"].get(pid, 0)
                           for pid, n in after["calls_by_pid"].items()}
        captured = after["calls"].get(SYM, 0) - before["calls"].get(SYM, 0)
        cpu = after["cpu_s"] - before["cpu_s"]
        return {
            "suite": "storm", "processes": args.processes, "threads_per_process": args.threads, "cpus": os.cpu_count(),
            "rate_per_process": args.rate or "flat out",
            "archive": args.archive, "consumer": tracer.kind, "calls": calls, "wall_s": round(wall, 3),
            "rate": round(calls / wall), "captured": captured, "lost_ringbuf": lost_ringbuf,
            "dropped": after["dropped"] - before["dropped"],
            "uncounted_loss": max(0, calls - captured - lost_ringbuf),
            "per_process": [{"pid": pid, "calls": r["n"], "captured": captured_by_pid.get(pid, 0)}
                            for pid, r in sorted(results.items())],
            "sidecar_cpu_s": round(cpu, 3), "cpu_s_per_100k_events": round(cpu * 1e5 / max(captured, 1), 4),
            "sidecar_cores_during_storm": round(cpu / wall, 2),
            "archived": after["archived"] - before["archived"], "tracer_exit": final,
        }
    finally:
        for d in drivers:
            d.close()
        if adir:
            shutil.rmtree(adir, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/storm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="launching threads per process")
    ap.add_argument("--calls", type=int, default=200_000, help="calls per process")
    ap.add_argument("--rate", type=float, default=0, help="calls/s per process (0: flat out)")
    ap.add_argument("--archive", choices=("on", "off"), default="on")
    bl.add_libcuda_option(ap)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    bl.use_libcuda(args.libcuda)
    t0 = time.monotonic()
    out = run(args)
    out["wall_total_s"] = round(time.monotonic() - t0, 1)
    out["machine"] = bl.machine()
    out["command"] = "bench/storm " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text if args.json else
          f"{out['processes']} processes x {out['threads_per_process']} threads: {out['calls']} calls at "
          f"{out['rate']}/s; captured {out['captured']}, lost in the ring buffer {out['lost_ringbuf']}, "
          f"uncounted {out['uncounted_loss']}; sidecar {out['sidecar_cpu_s']} CPU s "
          f"({out['cpu_s_per_100k_events']} per 100k events, {out['sidecar_cores_during_storm']} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
