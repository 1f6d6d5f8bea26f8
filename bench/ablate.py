"""bench/ablate.py — where the launch handler's time goes: its BPF run time with one part taken out at a time.

Variants of our program (bpf/cuda_probes.bpf.c as the sidecar loads it, without the runtime layer), each attached
to its own copy of the library (uprobes are per inode) in one bench_driver process, all called in the same
interleaved rounds; the kernel's run-time statistics (BPF_ENABLE_STATS) give each variant's ns per run:

  ours            the launch handler as it is
  no_stack_read   without the one bpf_probe_read_user of the 7th-9th arguments (block z, shared memory, stream)
  no_ring_buffer  without the ring-buffer record (reserve, fill, submit)
  no_clock        without bpf_ktime_get_ns
  no_kernel_count without the per-kernel launch counter (a hash update keyed by pid, function and handle)
  registers_only  without the stack read and the per-kernel counter: a launch record of what the registers hold
  empty           `return 0` (the floor: what running any program costs)

The difference to `ours` is that part's cost. A variant is a text substitution of the program, for this
measurement only; each substitution must match exactly once, so a change of the program that breaks one says so.
Every variant's ring buffer is read between rounds, so no reserve fails for a full buffer. --gap-bytes 2097152 has
the driver write 2 MiB of cache lines between two launches: the handler then runs with cold caches, as it does
between the ~15 us of framework code an inference server runs per launch, and each part costs what it costs there.

    sudo .venv/bin/python bench/ablate.py [--rounds 5] [--n 20000] [--gap-bytes 0] [--libcuda PATH] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as bl  # noqa: E402

LAUNCH_BODY = """    struct oc_launch *e = events.ringbuf_reserve(sizeof(struct oc_launch));
    if (!e) {
        count_lost();
        return 0;
    }
    launch_fill(e, pid, tid, func, ts, handle, stream, gx, gy, gz, bx, by, bz, shmem);
    if (nested)
        e->h.flags |= OC_F_NESTED;
    events.ringbuf_submit(e, ring_wake_flags());"""

NO_STACK_READ = ("    struct stack_args a = {};\n    bpf_probe_read_user(&a, sizeof(a), (void *)(PT_REGS_SP(ctx) + 8));",
                 "    struct stack_args a = {};")
NO_KERNEL_COUNT = ("    if (kernel)\n        kernel_count(pid, func, handle); /* nested too: it names the runtime launch above it */",
                   "")
VARIANTS = {
    "ours": [],
    "no_stack_read": [NO_STACK_READ],
    "no_kernel_count": [NO_KERNEL_COUNT],
    "registers_only": [NO_STACK_READ, NO_KERNEL_COUNT],
    "no_ring_buffer": [(LAUNCH_BODY, "    (void)ts;")],
    "no_clock": [("    u64 ts = bpf_ktime_get_ns();\n    u8 nested = nested_now(tid);",
                  "    u64 ts = 0;\n    u8 nested = nested_now(tid);")],
    "empty": [("int entry_cuLaunchKernel(struct pt_regs *ctx)\n{",
               "int entry_cuLaunchKernel(struct pt_regs *ctx)\n{\n    return 0;")],
}


def variant_text(base: str, subs) -> str:
    for old, new in subs:
        if base.count(old) != 1:
            raise ValueError(f"substitution does not match the program once: {old[:70]!r}")
        base = base.replace(old, new)
    return base


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20000, help="launches per variant per round")
    bl.add_libcuda_option(ap)
    bl.add_gap_option(ap)
    ap.add_argument("--workload-cpu", default="1")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    bl.use_libcuda(args.libcuda)
    return args


def run(args) -> dict:
    from bcc import BPF

    from otel_cuda import bpf as bpf_mod

    config = bpf_mod.BpfConfig(runtime_layer=False)
    base = bpf_mod.program_text(config)
    bl.build_testbed()
    driver = bl.Driver(tuple(VARIANTS), cpus=args.workload_cpu, gap_bytes=args.gap_bytes)
    stats_fd = bl.enable_bpf_stats()
    programs = {}
    callbacks = []
    try:
        for name, subs in VARIANTS.items():
            b = BPF(text=variant_text(base, subs).encode(), cflags=config.cflags())
            b.attach_uprobe(name=driver.lib(name).encode(), sym=b"cuLaunchKernel", fn_name=b"entry_cuLaunchKernel")
            targets = b["targets"]
            targets[targets.Key(driver.pid)] = targets.Leaf()
            callbacks.append(lambda _ctx, _data, _size: 0)  # BCC holds the callback weakly
            b["events"].open_ring_buffer(callbacks[-1])
            programs[name] = b
        per_run: dict[str, list[float]] = {n: [] for n in VARIANTS}
        for _ in range(args.rounds):
            before = {n: bl.prog_runtime(bl.prog_fds(b, ["entry_cuLaunchKernel"])[0]) for n, b in programs.items()}
            driver.run("launch", args.n)
            for n, b in programs.items():
                ns, cnt = bl.prog_runtime(bl.prog_fds(b, ["entry_cuLaunchKernel"])[0])
                per_run[n].append((ns - before[n][0]) / max(1, cnt - before[n][1]))
                b.ring_buffer_consume()
                lost = sum(b["lost"][ctypes.c_int(0)])
                if lost:
                    raise RuntimeError(f"variant {n} lost {lost} records: the ring buffer filled between reads")
    finally:
        for b in programs.values():
            b.cleanup()
        driver.close()
        if stats_fd is not None:
            os.close(stats_fd)
    med = {n: statistics.median(xs) for n, xs in per_run.items()}
    return {"suite": "ablate", "bpf_ns_per_run": med, "rounds": per_run,
            "part_ns": {n: med["ours"] - v for n, v in med.items() if n != "ours"},
            "library": os.environ.get(bl.REAL_LIBCUDA_ENV, str(bl.LIBCUDA)), "machine": bl.machine(),
            "command": "bench/ablate.py " + " ".join(sys.argv[1:])}


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/ablate.py needs root (BPF)", file=sys.stderr)
        return 2
    res = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"launch handler, BPF ns per run (median of {args.rounds} rounds of {args.n}; {res['library']})")
        for n, v in res["bpf_ns_per_run"].items():
            part = "" if n == "ours" else f"   (ours - this: {res['part_ns'][n]:.0f} ns)"
            print(f"  {n:<15} {v:7.0f}{part}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
