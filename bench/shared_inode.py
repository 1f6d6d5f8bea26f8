"""bench/shared_inode — what our uprobes cost processes we do NOT trace that share the library file.

Uprobes are per inode. On a GPU node the NVIDIA container toolkit mounts the host's libcuda.so into every GPU pod,
so every pod maps the same inode: a probe attached by one sidecar traps in every process on the node that calls the
function, traced or not; the BPF program then finds the process outside its pid filter and returns. With one
sidecar per pod (sidecar mode) each sidecar attaches its own probes to that inode, and every call runs every
sidecar's program.

Method (as bench/cpu): one bench_driver process pinned to one core with a private copy of the fake libcuda.so.1 per
variant, cuLaunchKernel calls interleaved 32 at a time across the copies, per-call cost = median 32-call chunk / 32,
overhead = that minus the unprobed copy's; median over rounds. Variants:
  none          no probe
  floor         an empty entry program
  other_pod     our probes (bench/tracer.py, the sidecar's default program) selecting another pid
  other_pod_x2  two such tracers on the same copy (two sidecars on one node, neither tracing this process)
  ours          our probes selecting this process (the traced case, for scale)

    .venv/bin/python bench/shared_inode.py [--rounds 7] [--n 8000] --json        (as root)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as bl  # noqa: E402

VARIANTS = ("none", "floor", "other_pod", "other_pod_x2", "ours")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    bl.build_testbed()
    driver = bl.Driver(VARIANTS, cpus="1")
    floor = bl.EmptyProbes()
    floor.attach(driver.lib("floor"), "cuLaunchKernel", False)
    not_traced = 1  # a pid that is not the driver's: the filter turns the calls away
    tracers = [bl.Tracer(driver.lib("other_pod"), not_traced, cpus="0", symbols="cuLaunchKernel"),
               bl.Tracer(driver.lib("other_pod_x2"), not_traced, cpus="0", symbols="cuLaunchKernel"),
               bl.Tracer(driver.lib("other_pod_x2"), not_traced, cpus="0", symbols="cuLaunchKernel"),
               bl.Tracer(driver.lib("ours"), driver.pid, cpus="0", symbols="cuLaunchKernel")]
    try:
        driver.run("launch", 1024)
        rounds = []
        for _ in range(args.rounds):
            res = driver.run("launch", args.n)
            base = res["none"]["median_ns_per_call"]
            rounds.append({v: res[v]["median_ns_per_call"] - base for v in VARIANTS if v != "none"})
        events = [t.stats()["calls"].get("cuLaunchKernel", 0) for t in tracers]
    finally:
        for t in tracers:
            t.close()
        floor.close()
        driver.close()
    med = {v: bl.median([r[v] for r in rounds]) for v in rounds[0]}
    out = {"machine": bl.machine(), "rounds": args.rounds, "calls_per_round": args.n,
           "overhead_ns_per_call": med,
           "other_pod_vs_entry_floor": med["other_pod"] / med["floor"],
           "other_pod_x2_vs_entry_floor": med["other_pod_x2"] / med["floor"],
           "ours_vs_entry_floor": med["ours"] / med["floor"],
           "events_seen_by_tracers": {"other_pod": events[0], "other_pod_x2": events[1] + events[2],
                                      "ours": events[3]},
           "per_round": rounds}
    print(json.dumps(out, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items() if k != "per_round"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
