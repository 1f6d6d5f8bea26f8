"""Runs of launches handed over as arrays (source.py -> Pipeline.on_launches) give what one event at a time gives:
the same archive lines, steps, kernel names and counts, for an engine whose launches, readbacks and waits interleave
on several threads and processes."""

import json
import random

from otel_cuda import events as E
from otel_cuda.pipeline import build
from otel_cuda.probes import BY_SYMBOL
from otel_cuda.ringbuf import MemoryRing, frame

from support.harness import settings

F = {s: BY_SYMBOL[s].func_id for s in ("cuModuleGetFunction", "cuLaunchKernel", "cuLaunchKernelEx", "cuGraphLaunch",
                                       "cuMemcpyDtoHAsync_v2", "cuEventRecord", "cuEventSynchronize")}
KERNELS = {0xA0: "_ZN4vllm10gemm_smallEv", 0xA1: "flash_fwd_kernel", 0xA2: "rms_norm"}  # 0xAF is never named


class Ring(MemoryRing):
    def __init__(self, chunks):
        self.chunks = chunks

    def read_batch(self, timeout_ms):
        return self.chunks.pop(0) if self.chunks else b""

    def __getattr__(self, name):  # kernel maps: empty
        return lambda *a, **k: 0 if name in ("lost", "table_full", "skipped_runs") else {}


class Lines:
    enabled = True

    def __init__(self):
        self.lines = []

    def write(self, record):
        self.lines.append(record)

    def write_text(self, text, lines):
        got = [json.loads(line) for line in text.splitlines()]
        assert len(got) == lines
        self.lines += got

    def close(self):
        pass

    def stats(self):
        return {}


class FixedClock:
    def offset(self):
        return 1_764_000_000_000_000_000


class Steps:
    def __init__(self):
        self.steps = []

    def on_step(self, step):
        self.steps.append((step.id, step.pid, step.tid, step.start_ns, step.end_ns, step.launches, step.graph_launches,
                           step.calls, dict(step.kernels), step.closed_by))

    def __getattr__(self, name):
        return lambda *a, **k: None


def engine(seed=7):
    """Two engine processes, each a launching thread and an output thread; steps of 5-60 launches (some through
    cuLaunchKernelEx, some of a kernel never named, a graph launch now and then), each closed by a readback, an
    event record and the output thread's event sync. Returns the records and the launches each step made."""
    rnd = random.Random(seed)
    out, truth, ts = [], [], 1_000_000
    for pid in (100, 200):
        for handle, name in KERNELS.items():
            out.append(E._NAME.pack(E.EV_NAME, 0, E.F_RETURN, F["cuModuleGetFunction"], pid, pid, ts, 10, 0, handle,
                                    1, 0, name.encode()))
    for step in range(40):
        for pid in (100, 200):
            n = rnd.choice((5, 15, 16, 17, 40, 60))
            for i in range(n):
                ts += rnd.randrange(1, 4000)
                func = F["cuLaunchKernelEx"] if i % 7 == 3 else F["cuLaunchKernel"]
                handle = rnd.choice((0xA0, 0xA1, 0xA2, 0xA2, 0xAF))
                out.append(E._LAUNCH.pack(E.EV_LAUNCH, 0, 0, func, pid, pid, ts, 0, -1, i % 3 * 128, handle, 7,
                                          rnd.choice((1, 64)), 1, 1, 256, 1, 1))
            if step % 9 == 4:
                ts += 100
                out.append(E._LAUNCH.pack(E.EV_LAUNCH, 0, 0, F["cuGraphLaunch"], pid, pid, ts, 0, -1, 0, 0xE0, 7,
                                          0, 0, 0, 0, 0, 0))
            truth.append((pid, n))
            ts += 500
            out.append(E._CALL.pack(E.EV_CALL, 0, E.F_RETURN, F["cuMemcpyDtoHAsync_v2"], pid, pid, ts, 300, 0,
                                    1, 2, 256, 7, 0, 0))
            out.append(E._CALL.pack(E.EV_CALL, 0, E.F_RETURN, F["cuEventRecord"], pid, pid, ts + 400, 50, 0,
                                    9, 77 + pid, 0, 0, 0, 0))
            out.append(E._CALL.pack(E.EV_CALL, 0, E.F_RETURN, F["cuEventSynchronize"], pid, pid + 1, ts + 600,
                                    20_000, 0, 0, 77 + pid, 0, 0, 0, 0))
            ts += 21_000
    return out, truth


def run_pipeline(records, min_run, chunk=300):
    ring = Ring([frame(records[i:i + chunk]) for i in range(0, len(records), chunk)])
    archive, steps = Lines(), Steps()
    p = build(settings(match="x"), ring, procfs=None, archive=archive, observer=steps, clock=FixedClock())
    p.reader.min_run = min_run
    p.start()
    p.reader.drain()
    p.steps.close_all()
    p.close()
    return p, archive.lines, steps.steps


def test_runs_and_single_events_give_the_same_lines_steps_and_counts():
    records, truth = engine()
    runs, lines, steps = run_pipeline(records, min_run=16)
    single, single_lines, single_steps = run_pipeline(records, min_run=10 ** 9)
    assert runs.reader.counters.launch_runs > 20 and single.reader.counters.launch_runs == 0
    assert lines == single_lines
    assert steps == single_steps
    assert runs.totals.calls == single.totals.calls and runs.totals.by_pid == single.totals.by_pid
    assert runs.names.counters() == single.names.counters()
    # and both are right: every step the engine made, with its launches and kernels
    assert [(s[1], s[5]) for s in steps] == truth
    assert all(s[9] == "event" for s in steps)
    assert len(lines) == len(records)
    launches = [rec for rec in lines if rec["func"] in ("cuLaunchKernel", "cuLaunchKernelEx")]
    assert {rec["kernel"] for rec in launches} == {*KERNELS.values(), "unknown"}
    assert sum(1 for rec in launches if rec["kernel"] == "unknown") == runs.names.launches_unknown
    assert runs.names.launches_named + runs.names.launches_unknown == sum(n for _, n in truth)
