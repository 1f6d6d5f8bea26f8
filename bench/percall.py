"""bench/cpu — per-call cost on the fake driver, every variant side by side in one run.

Method. One bench_driver process (testbed/bench_driver.c), pinned to one core, has a private copy of the fake
libcuda.so.1 per variant (uprobes are per inode, so each variant's tracer attaches to its own copy):

  none           no probe (the call itself: a few ns)
  floor          empty BPF programs (BCC, `int e(void *ctx) { return 0; }`): entry on cuLaunchKernel, entry +
                 return on the timed function
  ours           otel_cuda.bpf.Probes as the sidecar loads it (default settings: launch entry-only, the timed
                 function entry + return), the sidecar's stages consuming the ring buffer in a process of their
                 own (bench/tracer.py: telemetry and the archive, as `otel-cuda run` builds them)
  seed           bpftrace printing one JSON line per cuLaunchKernel call into a file (the seeds' design)

All tracers stay attached for the whole run and sit on the other core. Each round makes N calls of cuLaunchKernel
per copy, then N of the timed function (cuStreamSynchronize with FAKE_CUDA_SYNC_US=0, or cuMemcpyHtoD_v2),
interleaved 32 calls per copy at a time, so all variants are measured in the same milliseconds. Per-call cost =
the elapsed time of the median 32-call chunk / 32 (other processes' time slices drop out); overhead = that minus
the no-probe copy's; ratios per round, median over rounds. The consumers' CPU (the tracer process's rusage,
bpftrace's /proc/PID/stat) is reported per event; lost events are counted for both (ours: the kernel's `lost`
counter, queue drops and events missing from the count; bpftrace: "Lost N events" and lines missing from its file).
With the kernel's run-time statistics (BPF_ENABLE_STATS) the BPF program bodies' own ns per run are reported too.
--gap-bytes B: the driver writes B bytes of cache lines between two calls, so that the probes run with cold caches
as between an inference server's launches (a tight loop keeps the trap path and the program hot, and flatters both).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as bl  # noqa: E402

CHUNK = 32


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench/cpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=8000, help="calls per variant per round and function")
    ap.add_argument("--warmup", type=int, default=1024)
    ap.add_argument("--timed-func", choices=("sync", "htod"), default="sync",
                    help="the call whose duration we record: cuStreamSynchronize (FAKE_CUDA_SYNC_US=0) or "
                         "cuMemcpyHtoD_v2")
    ap.add_argument("--consumer", choices=("auto", "sidecar", "pipeline"), default="auto",
                    help="sidecar (auto, where opentelemetry is installed): the stages of `otel-cuda run` (telemetry, archive); pipeline: build() with the "
                         "null observer")
    ap.add_argument("--no-archive", action="store_true", help="run the consumer without the archive")
    ap.add_argument("--no-seed", action="store_true", help="skip the bpftrace variant")
    ap.add_argument("--no-ingest", action="store_true", help="skip the ingest suite (bench/ingest)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and calls (and a quick ingest suite)")
    ap.add_argument("--metric", choices=("median", "p10", "cpu", "wall"), default="median",
                    help="per-call cost: elapsed time of the median 32-call chunk (default), of the 10th "
                         "percentile chunk, the driver thread's CPU time, or the mean elapsed time")
    bl.add_gap_option(ap)
    ap.add_argument("--tracer-cpu", default="0")
    ap.add_argument("--workload-cpu", default="1")
    bl.add_libcuda_option(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON object (the figures) on stdout")
    ap.add_argument("--out", help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    bl.use_libcuda(args.libcuda)
    if args.quick:
        args.rounds = min(args.rounds, 3)
        args.n = min(args.n, 4000)
    return args


class PerCall:
    def __init__(self, args):
        self.args = args
        self.timed = args.timed_func
        self.timed_sym = bl.SYMBOL[self.timed]
        self.stats_fd = bl.enable_bpf_stats()
        self.variants = ["none", "floor", "ours"] + ([] if args.no_seed else ["seed"])
        self.driver = d = bl.Driver(self.variants, cpus=args.workload_cpu, gap_bytes=args.gap_bytes)
        self.archive_dirs: list[str] = []
        self.floor = bl.EmptyProbes()
        self.floor.attach(d.lib("floor"), "cuLaunchKernel", False)
        self.floor.attach(d.lib("floor"), self.timed_sym, True)
        self.floor_fds = {"entry_launch": bl.prog_fds(self.floor.bpf, ["e"]), "timed": bl.prog_fds(self.floor.bpf, ["e", "r"])}
        self.tracers: dict[str, bl.Tracer] = {}
        archive = None
        if not args.no_archive:
            archive = tempfile.mkdtemp(prefix="bench-archive-ours-")
            self.archive_dirs.append(archive)
        self.tracers["ours"] = bl.Tracer(d.lib("ours"), d.pid, cpus=args.tracer_cpu, archive=archive,
                                         consumer=args.consumer,
                                         symbols=f"cuLaunchKernel,{self.timed_sym},cuModuleGetFunction")
        self.seed = None
        if "seed" in self.variants:
            self.seed = bl.SeedBpftrace(d.lib("seed"), "cuLaunchKernel", d.pid, cpus=args.tracer_cpu)
            self.seed.wait_attached(lambda: d.run("launch", CHUNK))
            self.seed_calls, self.seed_from = 0, time.monotonic_ns()  # calls counted from here on
        d.name()  # the kernel's name event, seen by the tracers attached now: their launches are named
        w = d.run("launch", args.warmup)
        d.run(self.timed, args.warmup)
        if self.seed:
            self.seed_calls += w["seed"]["n"]
        self.rounds: list[dict] = []

    def cost(self, r: dict) -> float:
        return {"median": r["median_ns_per_call"], "p10": r["p10_ns_per_call"], "cpu": r["cpu_ns_per_call"],
                "wall": r["ns_per_call"]}[self.args.metric]

    def one(self, func: str) -> dict:
        """One interleaved run of `func` on every copy, with what each tracer did meanwhile."""
        sym = bl.SYMBOL[func]
        archive = bool(self.archive_dirs)
        before = {v: t.stats() for v, t in self.tracers.items()}
        seed0 = (self.seed.lines(), self.seed.cpu()) if self.seed else None
        floor_timer = bl.ProgTimer(self.floor_fds["entry_launch" if func == "launch" else "timed"])
        res = self.driver.run(func, self.args.n)
        floor_prog = floor_timer.result()
        out = {v: {"ns_per_call": self.cost(r), "median_ns_per_call": r["median_ns_per_call"],
                   "p10_ns_per_call": r["p10_ns_per_call"], "cpu_ns_per_call": r["cpu_ns_per_call"],
                   "wall_ns_per_call": r["ns_per_call"], "calls": r["n"]} for v, r in res.items()}
        if self.stats_fd is not None:
            out["floor"]["bpf_ns_per_run"] = sum(x for x in floor_prog.values() if x is not None)
        for v, t in self.tracers.items():
            b = before[v]
            n = res[v]["n"]
            a = t.wait(sym, b["calls"].get(sym, 0) + n, archive)
            got = a["calls"].get(sym, 0) - b["calls"].get(sym, 0)
            o = out[v]
            o.update(events=got, missing=n - got, lost_ringbuf=a["lost"] - b["lost"], dropped=a["dropped"] - b["dropped"],
                     consumer_cpu_s=a["cpu_s"] - b["cpu_s"], consumer_cpu_ns_per_event=(a["cpu_s"] - b["cpu_s"]) * 1e9 / max(got, 1),
                     batches=a["batches"] - b["batches"])
            if func == "launch":
                named, unknown = a["named"] - b["named"], a["unknown"] - b["unknown"]
                o["named_share"] = named / (named + unknown) if named + unknown else None
            body = 0.0
            for kind in ("entry", "return"):
                x0, x1 = b["bpf"][sym][kind], a["bpf"][sym][kind]
                if x0 and x1 and x1[1] > x0[1]:
                    body += (x1[0] - x0[0]) / (x1[1] - x0[1])
            o["bpf_ns_per_run"] = body if self.stats_fd is not None else None
        if self.seed and func == "launch":
            # bpftrace's file is written through a stdio buffer: lines of this run may still sit in it; the loss is
            # settled from the totals after bpftrace exits (close())
            n = res["seed"]["n"]
            self.seed_calls += n
            lines = self.seed.wait_output(seed0[0] + n - 64, quiet_s=0.5) - seed0[0]
            cpu = self.seed.cpu() - seed0[1]
            out["seed"].update(lines=lines, tracer_cpu_s=cpu, tracer_cpu_ns_per_event=cpu * 1e9 / max(n, 1))
        return out

    def run(self) -> dict:
        for i in range(self.args.rounds):
            rnd = {}
            for func in ("launch", self.timed):
                try:
                    rnd[func if func == "launch" else "timed"] = self.one(func)
                except Exception as exc:  # noqa: BLE001 - a failed run is reported, the rest goes on
                    bl.log(f"round {i + 1}: {func} failed: {exc}")
                    rnd[func if func == "launch" else "timed"] = {"error": str(exc)}
            self.rounds.append(rnd)
            bl.log(f"round {i + 1}/{self.args.rounds}: " + "; ".join(
                f"{k}: " + ", ".join(f"{v}={x.get('ns_per_call', float('nan')):.0f}" for v, x in rnd[k].items()
                                     if isinstance(x, dict)) for k in ("launch", "timed")))
        return self.summarise()

    def summarise(self) -> dict:
        def ratio(a, b):
            return None if a is None or b is None or b <= 0 else a / b

        def oh(rnd, v):
            base, x = rnd.get("none", {}).get("ns_per_call"), rnd.get(v, {}).get("ns_per_call")
            return None if base is None or x is None else x - base

        per_round = []
        for r in self.rounds:
            L, T = r.get("launch", {}), r.get("timed", {})
            ours_l, seed = L.get("ours", {}), L.get("seed", {})
            ours_total = None if oh(L, "ours") is None else oh(L, "ours") + ours_l.get("consumer_cpu_ns_per_event", 0)
            seed_total = None if oh(L, "seed") is None else oh(L, "seed") + seed.get("tracer_cpu_ns_per_event", 0)
            per_round.append({
                "overhead_ns": {"launch": {v: oh(L, v) for v in self.variants if v != "none"},
                                "timed": {v: oh(T, v) for v in self.variants if v not in ("none", "seed")}},
                "launch_vs_entry_floor": ratio(oh(L, "ours"), oh(L, "floor")),
                "timed_vs_entry_return_floor": ratio(oh(T, "ours"), oh(T, "floor")),
                "ours_vs_seed": ratio(oh(L, "ours"), oh(L, "seed")),
                "ours_vs_seed_total_cpu": ratio(ours_total, seed_total),
                "entry_return_floor_vs_entry_floor": ratio(oh(T, "floor"), oh(L, "floor")),
            })

        def med(key):
            return bl.median([p[key] for p in per_round])

        def col(run, v, key):
            return [r.get(run, {}).get(v, {}).get(key) for r in self.rounds]

        def total(run, v, key):
            vals = [x for x in col(run, v, key) if x is not None]
            return sum(vals) if vals else None

        def lost(v):
            return sum((total(run, v, k) or 0) for run in ("launch", "timed") for k in ("lost_ringbuf", "dropped", "missing"))

        out = {
            "suite": "cpu",
            "percall_launch_ratio_vs_entry_floor": med("launch_vs_entry_floor"),
            "percall_timed_ratio_vs_entry_return_floor": med("timed_vs_entry_return_floor"),
            "seed_bpftrace_ratio": med("ours_vs_seed"),
            "seed_bpftrace_ratio_total_cpu": med("ours_vs_seed_total_cpu"),
            "seed_bpftrace_lost": None,  # settled in close(), once bpftrace has flushed its file
            "seed_bpftrace_calls": None,
            "ours_lost": lost("ours"),
            "ours_events": (total("launch", "ours", "events") or 0) + (total("timed", "ours", "events") or 0),
            "launches_named_share": bl.median(col("launch", "ours", "named_share")),
            "ns_per_call": {run: {v: bl.median(col(run, v, "ns_per_call")) for v in self.variants}
                            for run in ("launch", "timed")},
            "overhead_ns": {run: {v: bl.median([p["overhead_ns"][run].get(v) for p in per_round])
                                  for v in self.variants if v != "none" and not (run == "timed" and v == "seed")}
                            for run in ("launch", "timed")},
            "bpf_ns_per_run": {run: {v: bl.median(col(run, v, "bpf_ns_per_run")) for v in ("floor", "ours")}
                            for run in ("launch", "timed")},
            "entry_return_floor_vs_entry_floor": med("entry_return_floor_vs_entry_floor"),
            "consumer_cpu_ns_per_event": {run: bl.median(col(run, "ours", "consumer_cpu_ns_per_event"))
                                          for run in ("launch", "timed")},
            "seed_bpftrace_cpu_ns_per_event": bl.median(col("launch", "seed", "tracer_cpu_ns_per_event")),
            "timed_function": self.timed_sym,
            "consumer": next(iter(self.tracers.values())).kind if self.tracers else None,
            "params": {k: getattr(self.args, k) for k in ("rounds", "n", "warmup", "metric", "gap_bytes", "tracer_cpu",
                                                          "workload_cpu")} | {"chunk": CHUNK},
            "per_round": per_round,
            "rounds": self.rounds,
        }
        return out

    def close(self, res: dict | None = None) -> None:
        try:
            if self.seed:
                r = self.seed.stop()
                if res is not None:
                    res["seed_bpftrace_calls"] = self.seed_calls
                    lines = self.seed.lines_since(self.seed_from)
                    res["seed_bpftrace_lines"] = lines
                    res["seed_bpftrace_reported_lost"] = r["reported_lost"]
                    res["seed_bpftrace_lost"] = max(self.seed_calls - lines, r["reported_lost"])
                shutil.rmtree(self.seed.dir, ignore_errors=True)
            for name, t in self.tracers.items():
                bl.log(f"{name} tracer: {t.close()}")
        finally:
            self.floor.close()
            self.driver.close()
            for d in self.archive_dirs:
                shutil.rmtree(d, ignore_errors=True)


def table(res: dict) -> str:
    def f(x, fmt="{:.3f}"):
        return "n/a" if x is None else fmt.format(x)

    lines = ["variant    run     ns/call  overhead ns  BPF body ns/run", "-" * 58]
    for run in ("launch", "timed"):
        for v, n in res["ns_per_call"][run].items():
            if run == "timed" and v == "seed":
                continue
            lines.append(f"{v:<10} {run:<6} {f(n, '{:>8.0f}')}  {f(res['overhead_ns'][run].get(v), '{:>11.0f}')}  "
                         f"{f(res['bpf_ns_per_run'][run].get(v), '{:>15.0f}')}")
    cons = res["consumer_cpu_ns_per_event"]
    lines += ["",
              f"launch / empty entry floor           {f(res['percall_launch_ratio_vs_entry_floor'])}  (goal <= 1.2)",
              f"timed call / empty entry+ret floor   {f(res['percall_timed_ratio_vs_entry_return_floor'])}  "
              "(goal <= 1.2)",
              f"ours / seed bpftrace (traced thread) {f(res['seed_bpftrace_ratio'])}  (goal <= 1, aim 0.8)",
              f"ours / seed bpftrace (+ tracer CPU)  {f(res['seed_bpftrace_ratio_total_cpu'])}",
              f"seed bpftrace lost                   {res['seed_bpftrace_lost']} of {res['seed_bpftrace_calls']}",
              f"ours lost                            {res['ours_lost']} of {res['ours_events']}",
              f"consumer CPU ns/event                {f(cons['launch'], '{:.0f}')} (launch), "
              f"{f(cons['timed'], '{:.0f}')} (timed); bpftrace {f(res['seed_bpftrace_cpu_ns_per_event'], '{:.0f}')}",
              f"launches named                       {f(res['launches_named_share'])}"]
    for k in ("ingest_events_per_s_zero_loss", "cpu_s_per_100k_events", "consumer_events_per_s_per_core"):
        if k in res:
            lines.append(f"{k:<36} {json.dumps(res[k])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/cpu needs root (BPF)", file=sys.stderr)
        return 2
    bl.build_testbed()
    bl.pin_self(args.tracer_cpu)
    t0 = time.monotonic()
    res: dict = {}
    bench = None
    try:
        bench = PerCall(args)
        res = bench.run()
    except Exception as exc:  # noqa: BLE001 - report what there is
        bl.log(f"per-call suite failed: {exc!r}")
        res = {"suite": "cpu", "error": repr(exc)}
    finally:
        if bench is not None:
            bench.close(res)
    res["machine"] = bl.machine()
    res["command"] = "bench/cpu " + " ".join(sys.argv[1:] if argv is None else argv)
    res["percall_wall_s"] = round(time.monotonic() - t0, 1)
    if not args.no_ingest:
        import ingest

        ing_args = ["--quick"] if args.quick else ["--seconds", "2", "--contended-calls", "100000",
                                                    "--rates", ",".join(map(str, ingest.CPU_SUITE_RATES))]
        if args.no_seed:
            ing_args.append("--no-seed")
        ing = ingest.run(ingest.parse_args(ing_args + ["--tracer-cpu", args.tracer_cpu,
                                                       "--workload-cpu", args.workload_cpu]))
        res["ingest"] = ing
        for k in ("ingest_events_per_s_zero_loss", "cpu_s_per_100k_events", "consumer_events_per_s_per_core"):
            res[k] = ing.get(k)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if args.json:
        print(json.dumps(res))
    elif "error" not in res:
        print(table(res))
    else:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
