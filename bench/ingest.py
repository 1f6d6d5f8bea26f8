"""bench/ingest — ingest capacity: raise the event rate until the sidecar loses events.

Method. The producer is bench_driver (testbed/bench_driver.c) on one core, making cuLaunchKernel calls paced to a
target rate (calls due at start + i/rate; it sleeps when more than 200 us ahead), for --seconds per step. The
consumer is the sidecar's stages in a process of their own on the other core (bench/tracer.py: otel_cuda.bpf.Probes
with the default settings, telemetry, and the archive to a local directory or none). Each step raises the rate;
the last step is flat out (the producer's own limit: one uprobe trap per call). Per step:

  achieved rate         calls / elapsed time of the producer
  lost                  the kernel's `lost` counter (ring buffer full) + events dropped between stages + events
                        missing from the pipeline's count once it has drained
  kept up               the consumer had processed everything within 0.5 s of the producer's last call (a step that
                        only survived because the 4 MiB ring buffer absorbed a backlog does not count as sustained)
  CPU s per 100k        the consumer process's CPU time (getrusage: every thread, user + system) over the step and
                        its drain, per 100 000 events; events/s per core = 100 000 / that

ingest_events_per_s_zero_loss = the highest achieved rate of a step with zero loss that kept up, all steps below it
lossless too; cpu_s_per_100k_events = the CPU at that step. Both with the archive off and on.
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

RATES = (5000, 10000, 20000, 30000, 40000, 50000, 60000, 80000, 100000, 0)  # 0 = flat out
QUICK_RATES = (10000, 30000, 50000, 0)
CPU_SUITE_RATES = (10000, 30000, 50000, 80000, 0)  # bench/cpu's ingest part (bench/ingest: the full sweep)
SYM = "cuLaunchKernel"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench/ingest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", help="comma-separated calls/s per step (0 = flat out); default " +
                    ",".join(map(str, RATES)))
    ap.add_argument("--seconds", type=float, default=3.0, help="producer time per step")
    ap.add_argument("--archive", choices=("both", "off", "on"), default="both")
    ap.add_argument("--consumer", choices=("auto", "sidecar", "pipeline"), default="auto",
                    help="auto: the sidecar's stages (telemetry) where opentelemetry is installed, else the pipeline")
    ap.add_argument("--no-seed", action="store_true", help="skip the sweep with the seeds' bpftrace design")
    ap.add_argument("--contended-calls", type=float, default=200000,
                    help="calls of the contended run (producer threads on every core, consumer unpinned); 0 = skip")
    ap.add_argument("--keep-going", action="store_true", help="do not stop at the first step that loses events")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter steps")
    ap.add_argument("--tracer-cpu", default="0")
    ap.add_argument("--workload-cpu", default="1")
    bl.add_libcuda_option(ap)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    bl.use_libcuda(args.libcuda)
    if args.rates:
        args.rate_list = tuple(float(r) for r in args.rates.split(","))
    else:
        args.rate_list = QUICK_RATES if args.quick else RATES
    if args.quick:
        args.seconds = min(args.seconds, 1.5)
        args.contended_calls = min(args.contended_calls, 100000)
    return args


def sweep(args, driver: bl.Driver, archive: bool) -> dict:
    adir = tempfile.mkdtemp(prefix="bench-ingest-archive-") if archive else None
    tracer = bl.Tracer(driver.lib("ingest"), driver.pid, cpus=args.tracer_cpu, archive=adir, consumer=args.consumer,
                       symbols=f"{SYM},cuModuleGetFunction")
    steps = []
    try:
        driver.name()
        driver.run("launch", 2000)  # warm up: the first events build the pipeline's per-process state
        tracer.wait(SYM, tracer.stats()["calls"].get(SYM, 0), archive)
        for rate in args.rate_list:
            n = int((rate if rate > 0 else 60000) * args.seconds)
            b = tracer.stats()
            r = driver.run("launch", n, rate=rate)["ingest"]
            produced_at = time.monotonic()
            a = tracer.wait(SYM, b["calls"].get(SYM, 0) + r["n"], archive)
            got = a["calls"].get(SYM, 0) - b["calls"].get(SYM, 0)
            lost_ring, dropped = a["lost"] - b["lost"], a["dropped"] - b["dropped"]
            lost = lost_ring + dropped + max(0, r["n"] - got)
            lag = max(0.0, a["t"] - produced_at)
            cpu = a["cpu_s"] - b["cpu_s"]
            span = r["wall_ns"] / 1e9 + lag
            step = {"target_rate": rate or "max", "calls": r["n"], "rate": round(r["rate"]), "events": got,
                    "lost": lost, "lost_ringbuf": lost_ring, "dropped": dropped, "drain_lag_s": round(lag, 3),
                    "kept_up": lost == 0 and lag < 0.5, "consumer_cpu_s": round(cpu, 4),
                    "cpu_s_per_100k_events": round(cpu * 1e5 / max(got, 1), 4),
                    "consumer_utilisation": round(cpu / span, 3) if span > 0 else None,
                    "producer_cpu_ns_per_call": r["cpu_ns_per_call"], "batches": a["batches"] - b["batches"]}
            steps.append(step)
            bl.log(f"ingest archive={'on' if archive else 'off'}: "
                   f"target {step['target_rate']}/s -> {step['rate']}/s, lost {lost}, lag {lag:.2f}s, "
                   f"{step['cpu_s_per_100k_events']:.3f} CPU s/100k, consumer at {step['consumer_utilisation']}")
            if lost and not args.keep_going:
                break
    finally:
        tracer.close()
        if adir:
            shutil.rmtree(adir, ignore_errors=True)
    prefix = []  # the steps up to the first that lost events or fell behind
    for s in steps:
        if not s["kept_up"]:
            break
        prefix.append(s)
    best = max(prefix, key=lambda s: s["rate"]) if prefix else None  # the fastest of them
    flat = next((s for s in steps if s["target_rate"] == "max"), None)
    if best is None:
        limit = "consumer (lost events or fell behind at the lowest rate)"
    elif len(prefix) == len(steps) and flat is not None:
        limit = "producer: the traced thread's uprobe trap caps the rate; the consumer kept up flat out"
    elif len(prefix) == len(steps):
        limit = "not reached: every step kept up (raise --rates)"
    else:
        limit = "consumer: the next step lost events or fell behind"
    return {"archive": archive, "consumer": tracer.kind, "steps": steps,
            "events_per_s_zero_loss": best["rate"] if best else 0,
            "cpu_s_per_100k_events": best["cpu_s_per_100k_events"] if best else None,
            "events_per_s_per_core": round(1e5 / best["cpu_s_per_100k_events"]) if best and best[
                "cpu_s_per_100k_events"] else None,
            "limited_by": limit}


# bpftrace writes its output file through a stdio buffer (about 40 of these lines): lines still in it at the end of
# a step are not lost; the sweep's loss is settled from the totals once bpftrace has exited and flushed.
SEED_BUFFERED_LINES = 64


def seed_sweep(args, driver: bl.Driver) -> dict:
    """The same steps with the seeds' design as the consumer: bpftrace printing one JSON line per call to a file."""
    seed = bl.SeedBpftrace(driver.lib("ingest"), SYM, driver.pid, cpus=args.tracer_cpu)
    steps = []
    total_calls = 0
    counted_from = time.monotonic_ns()
    try:
        seed.wait_attached(lambda: driver.run("launch", 1, rate=1))
        counted_from = time.monotonic_ns()  # calls counted from here on (the attach pokes before are not)
        base = seed.lines()
        for rate in args.rate_list:
            n = int((rate if rate > 0 else 60000) * args.seconds)
            cpu0 = seed.cpu()
            r = driver.run("launch", n, rate=rate)["ingest"]
            total_calls += r["n"]
            produced_at = time.monotonic()
            lines = seed.wait_output(base + r["n"] - SEED_BUFFERED_LINES, quiet_s=1.0) - base
            lag = time.monotonic() - produced_at
            cpu = seed.cpu() - cpu0
            missing = max(0, r["n"] - lines)
            ok = missing <= SEED_BUFFERED_LINES and lag < 0.5
            steps.append({"target_rate": rate or "max", "calls": r["n"], "rate": round(r["rate"]), "lines": lines,
                          "lost": 0 if missing <= SEED_BUFFERED_LINES else missing, "drain_lag_s": round(lag, 3),
                          "kept_up": ok, "cpu_s_per_100k_events": round(cpu * 1e5 / max(lines, 1), 4),
                          "producer_cpu_ns_per_call": r["cpu_ns_per_call"]})
            bl.log(f"ingest seed bpftrace: target {rate or 'max'}/s -> {round(r['rate'])}/s, missing {missing}, "
                   f"lag {lag:.2f}s")
            base = seed.lines()
            if not ok and not args.keep_going:
                break
    finally:
        res = seed.stop()
        res["lines"] = seed.lines_since(counted_from) if steps else 0
        shutil.rmtree(seed.dir, ignore_errors=True)
    prefix = []
    for st in steps:
        if not st["kept_up"]:
            break
        prefix.append(st)
    best = max(prefix, key=lambda st: st["rate"]) if prefix else None
    return {"archive": None, "consumer": "bpftrace (the seeds' design)", "steps": steps,
            "calls_total": total_calls, "lines_total": res["lines"], "lost_total": max(0, total_calls - res["lines"]),
            "reported_lost": res["reported_lost"], "events_per_s_zero_loss": best["rate"] if best else 0,
            "cpu_s_per_100k_events": best["cpu_s_per_100k_events"] if best else None,
            "events_per_s_per_core": round(1e5 / best["cpu_s_per_100k_events"]) if best and best[
                "cpu_s_per_100k_events"] else None,
            "limited_by": "producer" if prefix and len(prefix) == len(steps) else "bpftrace (lost or fell behind)"}


def contended(args, kind: str) -> dict:
    """Producer threads on every core, flat out, and the consumer unpinned: the consumer has to win CPU time from
    the workload, as a sidecar does on a busy node. One run per consumer kind (ours, seed)."""
    threads = os.cpu_count() or 2
    driver = bl.Driver(("ingest",), cpus="")
    n = int(args.contended_calls)
    try:
        driver.name()
        if kind == "seed":
            seed = bl.SeedBpftrace(driver.lib("ingest"), SYM, driver.pid, cpus="")
            try:
                seed.wait_attached(lambda: driver.run("launch", 1, rate=1))
                t0 = time.monotonic_ns()
                r = driver.run("launch", n, rate=0, threads=threads)["ingest"]
                seed.wait_output(seed.lines() + n - SEED_BUFFERED_LINES, quiet_s=1.0)
            finally:
                res = seed.stop()
                lines = seed.lines_since(t0) if "t0" in locals() else 0
                shutil.rmtree(seed.dir, ignore_errors=True)
            return {"consumer": "bpftrace (the seeds' design)", "calls": r["n"], "rate": round(r["rate"]),
                    "events": lines, "lost": max(0, r["n"] - lines), "reported_lost": res["reported_lost"]}
        adir = tempfile.mkdtemp(prefix="bench-ingest-archive-")
        tracer = bl.Tracer(driver.lib("ingest"), driver.pid, cpus="", archive=adir, consumer=args.consumer,
                           symbols=f"{SYM},cuModuleGetFunction")
        try:
            b = tracer.stats()
            r = driver.run("launch", n, rate=0, threads=threads)["ingest"]
            a = tracer.wait(SYM, b["calls"].get(SYM, 0) + r["n"], True)
        finally:
            tracer.close()
            shutil.rmtree(adir, ignore_errors=True)
        got = a["calls"].get(SYM, 0) - b["calls"].get(SYM, 0)
        return {"consumer": tracer.kind, "calls": r["n"],
                "rate": round(r["rate"]), "events": got, "lost": r["n"] - got, "lost_ringbuf": a["lost"] - b["lost"],
                "cpu_s_per_100k_events": round((a["cpu_s"] - b["cpu_s"]) * 1e5 / max(got, 1), 4)}
    finally:
        driver.close()


def run(args, driver: bl.Driver | None = None) -> dict:
    own = driver is None
    t0 = time.monotonic()
    if own:
        bl.build_testbed()
        driver = bl.Driver(("ingest",), cpus=args.workload_cpu)
    out: dict = {"suite": "ingest", "seconds_per_step": args.seconds}
    sweeps = []
    try:
        modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.archive]
        for archive in modes:
            try:
                sweeps.append(sweep(args, driver, archive))
            except Exception as exc:  # noqa: BLE001 - report what there is
                bl.log(f"ingest sweep archive={archive} failed: {exc!r}")
                sweeps.append({"archive": archive, "error": repr(exc)})
        if args.contended_calls:
            out["contended"] = {}
            for kind in ("ours",) + (() if args.no_seed else ("seed",)):
                try:
                    c = out["contended"][kind] = contended(args, kind)
                    bl.log(f"ingest contended, {kind}: {c['calls']} calls at {c['rate']}/s on every core, "
                           f"{c['lost']} lost")
                except Exception as exc:  # noqa: BLE001
                    bl.log(f"ingest contended {kind} failed: {exc!r}")
                    out["contended"][kind] = {"error": repr(exc)}
        if not args.no_seed:
            try:
                sweeps.append(seed_sweep(args, driver))
            except Exception as exc:  # noqa: BLE001
                bl.log(f"ingest seed sweep failed: {exc!r}")
                sweeps.append({"archive": None, "error": repr(exc)})
    finally:
        if own:
            driver.close()

    def key(s):
        if s["archive"] is None:
            return "seed_bpftrace"
        return "archive_on" if s["archive"] else "archive_off"

    out["sweeps"] = {key(s): s for s in sweeps}
    out["ingest_events_per_s_zero_loss"] = {key(s): s.get("events_per_s_zero_loss") for s in sweeps}
    out["cpu_s_per_100k_events"] = {key(s): s.get("cpu_s_per_100k_events") for s in sweeps}
    out["consumer_events_per_s_per_core"] = {key(s): s.get("events_per_s_per_core") for s in sweeps}
    out["limited_by"] = {key(s): s.get("limited_by") for s in sweeps}
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out


def table(res: dict) -> str:
    lines = []
    for kind, c in res.get("contended", {}).items():
        lines.append(f"contended ({kind}): " + (c["error"] if "error" in c else
                     f"{c['calls']} calls at {c['rate']}/s on every core, {c['events']} events, {c['lost']} lost"
                     f" [{c['consumer']}]"))
    for name, s in res["sweeps"].items():
        lines.append(f"{name}: {s.get('consumer', '')}")
        if "error" in s:
            lines.append(f"  failed: {s['error']}")
            continue
        lines.append("  target/s   achieved/s   lost   lag s  kept up  CPU s/100k  consumer busy")
        for st in s["steps"]:
            lines.append(f"  {str(st['target_rate']):>8} {st['rate']:>12} {st['lost']:>6} {st['drain_lag_s']:>7.2f}"
                         f"  {str(st['kept_up']):>7} {st['cpu_s_per_100k_events']:>11.3f}  "
                         f"{st.get('consumer_utilisation', '')}")
        if "lost_total" in s:
            lines.append(f"  bpftrace, all steps: {s['lines_total']} lines for {s['calls_total']} calls "
                         f"({s['lost_total']} lost; bpftrace reported {s['reported_lost']})")
        lines.append(f"  zero loss up to {s['events_per_s_zero_loss']}/s; {s['cpu_s_per_100k_events']} CPU s per 100k "
                     f"events ({s['events_per_s_per_core']}/s per core); limited by {s['limited_by']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/ingest needs root (BPF)", file=sys.stderr)
        return 2
    bl.pin_self(args.tracer_cpu)
    res = run(args)
    res["machine"] = bl.machine()
    res["command"] = "bench/ingest " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
