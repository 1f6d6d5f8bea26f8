"""bench/cpu — per-call cost on the fake driver, every variant side by side in one run.

Method: one bench_driver process (testbed/bench_driver.c) pinned to one core makes N calls of one fake driver
function in a tight loop and times itself with CLOCK_MONOTONIC; the tracer (this process: BCC, the in-process
sidecar) and bpftrace are pinned to the other core. For each of R rounds, in an order rotated per round:

  none_launch / none_timed   no probe (the call itself: a few ns)
  floor_entry                empty BPF program on cuLaunchKernel entry (BCC)
  ours_launch                otel_cuda.bpf.Probes on cuLaunchKernel (default: entry only), the sidecar consuming
  floor_entry_return         empty BPF programs on entry + return of the timed function
  ours_timed                 otel_cuda.bpf.Probes on the timed function (entry + return: its duration recorded)
  seed_bpftrace              bpftrace printing one JSON line per cuLaunchKernel call into a file (the seeds' design)

Overhead of a variant = its ns/call minus the no-probe ns/call of the same function in the same round; ratios
are taken per round and the median over rounds is reported. The consumer's CPU (this process's rusage while the
events are read, decoded, aggregated, archived) and bpftrace's CPU (/proc/PID/stat) are reported per event.
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

VARIANTS = ("none_launch", "floor_entry", "ours_launch", "seed_bpftrace", "none_timed", "floor_entry_return",
            "ours_timed")  # with --proposed, ours_launch_proposed and ours_timed_proposed follow their current twin


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench/cpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20000, help="calls per traced variant per round")
    ap.add_argument("--n-none", type=int, default=2000000, help="calls per no-probe variant per round")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--timed-func", choices=("sync", "htod"), default="sync",
                    help="the call whose duration we record: cuStreamSynchronize (FAKE_CUDA_SYNC_US=0) or "
                         "cuMemcpyHtoD_v2")
    ap.add_argument("--consumer", choices=("sidecar", "pipeline"), default="sidecar",
                    help="sidecar: the stages of `otel-cuda run` (telemetry, archive); pipeline: build() with the "
                         "null observer")
    ap.add_argument("--no-archive", action="store_true", help="run the consumer without the archive")
    ap.add_argument("--no-seed", action="store_true", help="skip the bpftrace variant")
    ap.add_argument("--proposed", action="store_true",
                    help="also measure the proposed ring-buffer wakeup policy (benchlib.WAKE_HELPER) side by side")
    ap.add_argument("--no-ingest", action="store_true", help="skip the ingest suite (bench/ingest)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and calls (and a quick ingest suite)")
    ap.add_argument("--tracer-cpu", default="0")
    ap.add_argument("--workload-cpu", default="1")
    ap.add_argument("--json", action="store_true", help="print one JSON object (the figures) on stdout")
    ap.add_argument("--out", help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 3)
        args.n = min(args.n, 10000)
        args.n_none = min(args.n_none, 1000000)
    return args


class PerCall:
    def __init__(self, args):
        self.args = args
        self.timed = args.timed_func
        self.timed_sym = bl.SYMBOL[self.timed]
        self.stats_fd = bl.enable_bpf_stats()
        self.driver = bl.Driver(cpus=args.workload_cpu)
        self.floor = bl.EmptyProbes()
        self.archive_dirs: list[str] = []
        self.tracers = {"ours": self._tracer(bl.load_probes())}
        if args.proposed:
            self.tracers["ours_proposed"] = self._tracer(bl.load_proposed_probes())
        self.sidecar = self.tracers["ours"][1]
        self.probes = self.tracers["ours"][0]
        self.rounds: list[dict] = []

    def _tracer(self, probes):
        archive_dir = None
        if not self.args.no_archive:
            archive_dir = tempfile.mkdtemp(prefix="bench-archive-")
            self.archive_dirs.append(archive_dir)
        sc = bl.InProcessSidecar(probes, self.driver.pid, archive_dir, full=self.args.consumer == "sidecar")
        sc.start()
        return probes, sc

    # one variant -------------------------------------------------------------------------------------------------
    def none(self, func: str) -> dict:
        r = self.driver.run(func, self.args.n_none)
        return {"ns_per_call": r["ns_per_call"], "calls": r["n"]}

    def floor_variant(self, func: str, returns: bool) -> dict:
        self.floor.attach(self.driver.lib_path, bl.SYMBOL[func], returns)
        try:
            self.driver.run(func, self.args.warmup)
            timer = bl.ProgTimer(bl.prog_fds(self.floor.bpf, ["e", "r"] if returns else ["e"]))
            r = self.driver.run(func, self.args.n)
            prog = timer.result()
        finally:
            self.floor.detach()
        return {"ns_per_call": r["ns_per_call"], "calls": r["n"], "bpf_ns_per_run": sum(
            v for v in prog.values() if v is not None) if self.stats_fd is not None else None}

    def ours(self, func: str, which: str = "ours") -> dict:
        probes, sc = self.tracers[which]
        d = self.driver
        sym = bl.SYMBOL[func]
        attach = (bl.probe(sym), bl.probe("cuModuleGetFunction"))
        missing = probes.attach_library(d.lib_identity, d.lib_path, attach)
        assert not missing, missing
        archive = bool(self.archive_dirs)
        try:
            d.name()  # the kernel's name event: launches after it are named
            d.run(func, self.args.warmup)
            sc.wait_calls(sym, sc.calls(sym) + self.args.warmup, archive=archive)
            names = sc.pipeline.names
            named0, unknown0 = names.launches_named, names.launches_unknown
            calls0, lost0, drop0 = sc.calls(sym), probes.lost(), sc.dropped()
            timer = bl.ProgTimer(bl.prog_fds(probes._bpf, [f"entry_{sym}", f"return_{sym}"]))
            cpu0, t0 = bl.cpu_self(), time.monotonic()
            r = d.run(func, self.args.n)
            prog = timer.result()
            got = sc.wait_calls(sym, calls0 + r["n"], archive=archive) - calls0
            cpu1, t1 = bl.cpu_self(), time.monotonic()
        finally:
            probes.detach_library(d.lib_identity)
        lost = probes.lost() - lost0
        dropped = sc.dropped() - drop0
        named = names.launches_named - named0
        unknown = names.launches_unknown - unknown0
        return {"ns_per_call": r["ns_per_call"], "calls": r["n"], "events": got, "lost_ringbuf": lost,
                "dropped": dropped, "missing": r["n"] - got,
                "consumer_cpu_s": cpu1 - cpu0, "consumer_wall_s": t1 - t0,
                "consumer_cpu_ns_per_event": (cpu1 - cpu0) * 1e9 / max(got, 1),
                "bpf_ns_per_run": sum(v for v in prog.values() if v is not None) if self.stats_fd is not None else None,
                "named_share": named / (named + unknown) if func == "launch" and named + unknown else None}

    def seed(self) -> dict:
        d = self.driver
        seed = bl.SeedBpftrace(d.lib_path, "cuLaunchKernel", d.pid, cpus=self.args.tracer_cpu)
        try:
            pokes = seed.wait_attached(lambda: d.run("launch", 1))
            d.run("launch", self.args.warmup)
            before = seed.wait_output(pokes + self.args.warmup)
            cpu0 = seed.cpu()
            r = d.run("launch", self.args.n)
            lines = seed.wait_output(before + r["n"]) - before
            cpu1 = seed.cpu()
        finally:
            res = seed.stop()
            shutil.rmtree(seed.dir, ignore_errors=True)
        lost_lines = max(0, r["n"] - lines)
        return {"ns_per_call": r["ns_per_call"], "calls": r["n"], "lines": lines, "reported_lost": res["reported_lost"],
                "lost": max(lost_lines, res["reported_lost"]), "tracer_cpu_s": cpu1 - cpu0,
                "tracer_cpu_ns_per_event": (cpu1 - cpu0) * 1e9 / max(lines, 1)}

    def variant(self, name: str) -> dict:
        if name == "none_launch":
            return self.none("launch")
        if name == "none_timed":
            return self.none(self.timed)
        if name == "floor_entry":
            return self.floor_variant("launch", False)
        if name == "floor_entry_return":
            return self.floor_variant(self.timed, True)
        if name.startswith("ours_"):
            func = "launch" if name.startswith("ours_launch") else self.timed
            return self.ours(func, "ours_proposed" if name.endswith("_proposed") else "ours")
        if name == "seed_bpftrace":
            return self.seed()
        raise ValueError(name)

    # the run -----------------------------------------------------------------------------------------------------
    def variants(self) -> list[str]:
        out = []
        for v in VARIANTS:
            if self.args.no_seed and v == "seed_bpftrace":
                continue
            out.append(v)
            if self.args.proposed and v in ("ours_launch", "ours_timed"):
                out.append(v + "_proposed")
        return out

    def run(self) -> dict:
        variants = self.variants()
        for i in range(self.args.rounds):
            k = i % len(variants)
            order = variants[k:] + variants[:k]
            rnd = {"order": order}
            for v in order:
                try:
                    rnd[v] = self.variant(v)
                except Exception as exc:  # noqa: BLE001 - a failed variant is reported, the rest goes on
                    bl.log(f"round {i + 1}: {v} failed: {exc}")
                    rnd[v] = {"error": str(exc)}
            self.rounds.append(rnd)
            bl.log(f"round {i + 1}/{self.args.rounds}: " + ", ".join(
                f"{v}={rnd[v].get('ns_per_call', float('nan')):.0f}ns" for v in variants))
        return self.summarise(variants)

    def summarise(self, variants) -> dict:
        def ns(r, v):
            return r.get(v, {}).get("ns_per_call")

        def overhead(r, v):
            base = "none_launch" if v in ("floor_entry", "seed_bpftrace") or v.startswith("ours_launch") \
                else "none_timed"
            a, b = ns(r, v), ns(r, base)
            return None if a is None or b is None else a - b

        def ratio(a, b):
            return None if a is None or b is None or b <= 0 else a / b

        per_round = []
        for r in self.rounds:
            oh = {v: overhead(r, v) for v in variants if not v.startswith("none")}
            ours_l, seed = r.get("ours_launch", {}), r.get("seed_bpftrace", {})
            ours_total = None if oh.get("ours_launch") is None else oh["ours_launch"] + ours_l.get(
                "consumer_cpu_ns_per_event", 0)
            seed_total = None if oh.get("seed_bpftrace") is None else oh["seed_bpftrace"] + seed.get(
                "tracer_cpu_ns_per_event", 0)
            per_round.append({
                "overhead_ns": oh,
                "launch_proposed_vs_entry_floor": ratio(oh.get("ours_launch_proposed"), oh.get("floor_entry")),
                "timed_proposed_vs_entry_return_floor": ratio(oh.get("ours_timed_proposed"),
                                                              oh.get("floor_entry_return")),
                "proposed_vs_seed": ratio(oh.get("ours_launch_proposed"), oh.get("seed_bpftrace")),
                "launch_vs_entry_floor": ratio(oh.get("ours_launch"), oh.get("floor_entry")),
                "timed_vs_entry_return_floor": ratio(oh.get("ours_timed"), oh.get("floor_entry_return")),
                "ours_vs_seed": ratio(oh.get("ours_launch"), oh.get("seed_bpftrace")),
                "ours_vs_seed_total_cpu": ratio(ours_total, seed_total),
                "entry_return_floor_vs_entry_floor": ratio(oh.get("floor_entry_return"), oh.get("floor_entry")),
            })

        def med(key):
            return bl.median([p[key] for p in per_round])

        def total(v, key):
            vals = [r.get(v, {}).get(key) for r in self.rounds]
            vals = [x for x in vals if x is not None]
            return sum(vals) if vals else None

        out = {
            "suite": "cpu",
            "percall_launch_ratio_vs_entry_floor": med("launch_vs_entry_floor"),
            "percall_timed_ratio_vs_entry_return_floor": med("timed_vs_entry_return_floor"),
            "seed_bpftrace_ratio": med("ours_vs_seed"),
            "seed_bpftrace_ratio_total_cpu": med("ours_vs_seed_total_cpu"),
            "proposed": {
                "percall_launch_ratio_vs_entry_floor": med("launch_proposed_vs_entry_floor"),
                "percall_timed_ratio_vs_entry_return_floor": med("timed_proposed_vs_entry_return_floor"),
                "seed_bpftrace_ratio": med("proposed_vs_seed"),
                "consumer_cpu_ns_per_event": {
                    "launch": bl.median([r.get("ours_launch_proposed", {}).get("consumer_cpu_ns_per_event")
                                         for r in self.rounds]),
                    "timed": bl.median([r.get("ours_timed_proposed", {}).get("consumer_cpu_ns_per_event")
                                        for r in self.rounds])},
                "lost": sum((total(v, k) or 0) for v in ("ours_launch_proposed", "ours_timed_proposed")
                            for k in ("lost_ringbuf", "dropped", "missing")),
            } if self.args.proposed else None,
            "seed_bpftrace_lost": total("seed_bpftrace", "lost"),
            "seed_bpftrace_calls": total("seed_bpftrace", "calls"),
            "ours_lost": sum((total(v, k) or 0) for v in ("ours_launch", "ours_timed")
                             for k in ("lost_ringbuf", "dropped", "missing")),
            "ours_events": (total("ours_launch", "events") or 0) + (total("ours_timed", "events") or 0),
            "launches_named_share": bl.median([r.get("ours_launch", {}).get("named_share") for r in self.rounds]),
            "ns_per_call": {v: bl.median([ns(r, v) for r in self.rounds]) for v in variants},
            "overhead_ns": {v: bl.median([p["overhead_ns"].get(v) for p in per_round])
                            for v in variants if not v.startswith("none")},
            "entry_return_floor_vs_entry_floor": med("entry_return_floor_vs_entry_floor"),
            "consumer_cpu_ns_per_event": {
                "launch": bl.median([r.get("ours_launch", {}).get("consumer_cpu_ns_per_event") for r in self.rounds]),
                "timed": bl.median([r.get("ours_timed", {}).get("consumer_cpu_ns_per_event") for r in self.rounds])},
            "bpf_ns_per_run": {v: bl.median([r.get(v, {}).get("bpf_ns_per_run") for r in self.rounds])
                               for v in variants if v.startswith(("floor", "ours"))},
            "seed_bpftrace_cpu_ns_per_event": bl.median(
                [r.get("seed_bpftrace", {}).get("tracer_cpu_ns_per_event") for r in self.rounds]),
            "timed_function": self.timed_sym,
            "consumer": self.sidecar.kind,
            "params": {k: getattr(self.args, k) for k in ("rounds", "n", "n_none", "warmup", "tracer_cpu",
                                                          "workload_cpu")},
            "per_round": per_round,
            "rounds": self.rounds,
        }
        return out

    def close(self) -> None:
        try:
            for name, (_probes, sc) in self.tracers.items():
                summary = sc.stop()
                bl.log(f"{name} sidecar summary: lost_ringbuf={summary.get('lost_ringbuf')} "
                       f"dropped_queue={summary.get('dropped_queue')} archived={summary.get('archived')}")
        finally:
            self.floor.close()
            self.driver.close()
            for d in self.archive_dirs:
                shutil.rmtree(d, ignore_errors=True)


def table(res: dict) -> str:
    ns, oh, prog = res["ns_per_call"], res["overhead_ns"], res.get("bpf_ns_per_run", {})

    def f(x, fmt="{:.3f}"):
        return "n/a" if x is None else fmt.format(x)

    lines = ["variant                 ns/call  overhead ns  BPF body ns/run", "-" * 62]
    for v, n in ns.items():
        lines.append(f"{v:<22} {f(n, '{:>8.0f}')}  {f(oh.get(v), '{:>11.0f}')}  {f(prog.get(v), '{:>15.0f}')}")
    lines += ["",
              f"launch / empty entry floor           {f(res['percall_launch_ratio_vs_entry_floor'])}  (goal <= 1.2)",
              f"timed call / empty entry+ret floor   {f(res['percall_timed_ratio_vs_entry_return_floor'])}  "
              "(goal <= 1.2)",
              f"ours / seed bpftrace (traced thread) {f(res['seed_bpftrace_ratio'])}  (goal <= 1, aim 0.8)",
              f"ours / seed bpftrace (+ tracer CPU)  {f(res['seed_bpftrace_ratio_total_cpu'])}",
              f"seed bpftrace lost                   {res['seed_bpftrace_lost']} of {res['seed_bpftrace_calls']}",
              f"ours lost                            {res['ours_lost']} of {res['ours_events']}",
              f"consumer CPU ns/event                {f(res['consumer_cpu_ns_per_event']['launch'], '{:.0f}')} "
              f"(launch), {f(res['consumer_cpu_ns_per_event']['timed'], '{:.0f}')} (timed); bpftrace "
              f"{f(res['seed_bpftrace_cpu_ns_per_event'], '{:.0f}')}",
              f"launches named                       {f(res['launches_named_share'])}"]
    p = res.get("proposed")
    if p:
        lines += [f"proposed: launch / entry floor       {f(p['percall_launch_ratio_vs_entry_floor'])}",
                  f"proposed: timed / entry+ret floor    {f(p['percall_timed_ratio_vs_entry_return_floor'])}",
                  f"proposed: ours / seed bpftrace       {f(p['seed_bpftrace_ratio'])}",
                  f"proposed: consumer CPU ns/event      {f(p['consumer_cpu_ns_per_event']['launch'], '{:.0f}')} "
                  f"(launch), {f(p['consumer_cpu_ns_per_event']['timed'], '{:.0f}')} (timed); lost {p['lost']}"]
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
    bench = PerCall(args)
    try:
        res = bench.run()
    finally:
        bench.close()
    res["machine"] = bl.machine()
    res["command"] = "bench/cpu " + " ".join(sys.argv[1:] if argv is None else argv)
    res["percall_wall_s"] = round(time.monotonic() - t0, 1)
    if not args.no_ingest:
        import ingest

        ing = ingest.run(ingest.parse_args(["--quick"] if args.quick else []), probes=bench.probes)
        res["ingest"] = ing
        for k in ("ingest_events_per_s_zero_loss", "cpu_s_per_100k_events", "consumer_events_per_s_per_core"):
            res[k] = ing.get(k)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if args.json:
        print(json.dumps(res))
    else:
        print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
