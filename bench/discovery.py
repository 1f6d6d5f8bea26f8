"""bench/discovery — what discovery costs on a busy node, and whether an exec storm costs the consumer events.

Part `scan` (no BPF): N idle processes (`sleep`) besides the machine's own; discovery's first scan (every process
read whole: cmdline, stat, cgroup), a steady scan (only the selected processes are read again, with their maps),
a re-judging scan (the command lines of every judged process re-read: once every `rejudge_every` scans), and for
comparison what every scan cost before discovery became incremental (every process read whole, maps included).
Each figure is the median of --repeat runs of that scan, in milliseconds of wall time on discovery's thread.

Part `storm` (root, real BPF on the fake driver): the sidecar traces the test bed's workload while a process
execs short processes (`/bin/true`, posix_spawn in a loop) as fast as it can for the workload's whole run; the sidecar
sees every exec (the exec tracepoint) and hands each to discovery. Reported: execs per second achieved, the
workload's own call counts against the sidecar's, and every loss counter — the goal is 0 lost at >= 1000 execs/s.

    .venv/bin/python bench/discovery.py scan --processes 500 --json
    .venv/bin/python bench/discovery.py storm --json        (as root)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


# exec short processes as fast as one core allows until SIGTERM, then print how many
STORM = """
import os, signal, sys
n = 0
signal.signal(signal.SIGTERM, lambda *a: (print(n, flush=True), os._exit(0)))
while True:
    os.waitpid(os.posix_spawn("/bin/true", ["true"], os.environ), 0)
    n += 1
"""


def timed(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(samples), 3)


def scan_bench(args) -> dict:
    from otel_cuda.discovery import LIBCUDA, Discovery, LiveProcFS, Selector

    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(args.processes)]
    try:
        procfs = LiveProcFS()
        pids = list(procfs.pids())

        def fresh():
            return Discovery(Selector(match=r"workload .*--tag bench-discovery"), procfs, on_select=lambda i: None,
                             on_exit=lambda i: None, on_library=lambda lib: None, on_library_unused=lambda lib: None)

        first = timed(lambda: fresh().scan(), args.repeat)
        d = fresh()
        d.scan()
        d.rejudge_every = 10**9
        steady = timed(d.scan, args.repeat)
        d.rejudge_every = 1
        rejudge = timed(d.scan, args.repeat)
        before = timed(lambda: [procfs.info(pid, LIBCUDA) for pid in procfs.pids()], args.repeat)
        return {"processes_on_machine": len(pids), "idle_processes_added": args.processes,
                "first_scan_ms": first, "steady_scan_ms": steady, "rejudging_scan_ms": rejudge,
                "scan_before_incremental_ms": before, "interval_s": 0.2, "rejudge_every": 5,
                "steady_share_of_a_core": round((steady * 4 + rejudge) / 5 / 200, 4)}
    finally:
        for p in sleepers:
            p.kill()
        for p in sleepers:
            p.wait()


def storm_bench(args) -> dict:
    from otel_cuda.bpf import Probes
    from support.harness import RunningSidecar, build_testbed, WORKLOAD

    build_testbed()
    from support.harness import settings

    probes = Probes(settings(match=r"workload .*--tag bench-storm").bpf)
    sidecar = RunningSidecar(probes, match=r"workload .*--tag bench-storm")
    storm = subprocess.Popen([sys.executable, "-c", STORM if args.execs else "import time; time.sleep(3600)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        work = subprocess.run([str(WORKLOAD), "--tag", "bench-storm", "--threads", "1", "--steps", str(args.steps),
                               "--launches", "16", "--step-us", str(args.step_us), "--start-delay-ms", "1000"],
                              capture_output=True, text=True, check=True)
        elapsed = time.monotonic() - t0
    finally:
        storm.terminate()
        execs = int(storm.communicate(timeout=10)[0] or 0) if args.execs else 0
    time.sleep(0.5)
    summary = sidecar.stop()
    probes.close()
    truth = json.loads(work.stdout)
    pid = truth["pid"]
    captured = {f: n for (p, f), n in sidecar.pipeline.totals.by_pid.items() if p == pid}
    expected = {f: n for f, n in truth["calls"].items() if n}
    d = sidecar.pipeline.discovery.counters
    return {"execs": execs, "seconds": round(elapsed, 2), "execs_per_s": round(execs / elapsed),
            "considered": d.considered, "considered_dropped": d.considered_dropped,
            "workload_calls_expected": sum(expected.values()), "workload_calls_captured": sum(captured.values()),
            "equal_for_every_function": captured == expected,
            "lost_ringbuf": summary["lost_ringbuf"], "skipped_by_kernel": summary["skipped_by_kernel"],
            "dropped_queue": summary["dropped_queue"], "decode_errors": summary["decode_errors"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("scan")
    s.add_argument("--processes", type=int, default=500)
    s.add_argument("--repeat", type=int, default=7)
    s.add_argument("--json", action="store_true")
    t = sub.add_parser("storm")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--step-us", type=int, default=1000, help="the workload's host time per step (paces its events)")
    t.add_argument("--no-execs", dest="execs", action="store_false", help="the same run without the storm")
    t.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = scan_bench(args) if args.part == "scan" else storm_bench(args)
    print(json.dumps(out, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
