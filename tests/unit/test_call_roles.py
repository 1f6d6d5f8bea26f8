"""What a call is (launch, readback, wait, allocation, copy direction) comes from one table in probes.py; the stages
and the BPF program read it from there. Runtime-layer calls count as what they do, once, whatever the nested driver
call under them says. Launch counts and durations come from kernel aggregates, exported as series that never fall."""

import re

from pathlib import Path

from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.resources import Resource

from otel_cuda import events, probes
from otel_cuda.events import Event
from otel_cuda.metrics import LOG2_BOUNDS_S, CudaMetrics, KernelLaunches
from otel_cuda.records import from_record, moved_bytes, to_record
from otel_cuda.ringbuf import MemoryRing
from otel_cuda.steps import StepConfig, StepTracker

F = {p.symbol: p.func_id for p in probes.PROBES}
BPF = Path(__file__).resolve().parents[2] / "bpf" / "cuda_probes.bpf.c"
NESTED = events.F_RETURN | events.F_NESTED
RESOURCE = Resource.create({"service.name": "t"})


def launch(ts, tid=1, handle=0x10, func="cuLaunchKernel", flags=0, pid=7):
    return Event(events.EV_LAUNCH, 0, flags, F[func], pid, tid, ts, 0, -1, (handle, 5, 1, 1, 1, 1, 1, 1, 0))


def call(func, ts, dur, tid=1, args=(0, 0, 0, 0, 0, 0), flags=events.F_RETURN, result=0, pid=7):
    layer = events.LAYER_RUNTIME if probes.BY_SYMBOL[func].layer == probes.RUNTIME else 0
    return Event(events.EV_CALL, layer, flags, F[func], pid, tid, ts, dur, result, args)


def driver_step(t, ts, tid=1):
    t.process(launch(ts, tid), "k")
    t.process(launch(ts + 10, tid, func="cuGraphLaunch"), None)
    t.process(call("cuMemcpyDtoHAsync_v2", ts + 20, 5, tid, args=(0, 0, 1024, 9, 0, 0)), None)
    t.process(call("cuStreamSynchronize", ts + 30, 50, tid, args=(9, 0, 0, 0, 0, 0)), None)


def runtime_step(t, ts, tid=1):
    """What the ring buffer holds for a --runtime step: each nested driver call's record comes before the runtime
    call's, which is written at its return (with its entry time)."""
    t.process(launch(ts + 2, tid, flags=events.F_NESTED), "k")
    t.process(call("cudaLaunchKernel", ts, 5, tid, args=(0xABC, 0, 0, 9, 0, 0)), "k")
    t.process(launch(ts + 12, tid, func="cuGraphLaunch", flags=events.F_NESTED), None)
    t.process(call("cudaGraphLaunch", ts + 10, 5, tid, args=(0x77, 9, 0, 0, 0, 0)), None)
    t.process(call("cuMemcpyDtoHAsync_v2", ts + 22, 2, tid, args=(0, 0, 1024, 9, 0, 0), flags=NESTED), None)
    t.process(call("cudaMemcpyAsync", ts + 20, 5, tid, args=(0, 0, 1024, 9, 2, 0)), None)  # kind 2: DeviceToHost
    t.process(call("cuStreamSynchronize", ts + 32, 40, tid, args=(9, 0, 0, 0, 0, 0), flags=NESTED), None)
    t.process(call("cudaStreamSynchronize", ts + 30, 50, tid, args=(9, 0, 0, 0, 0, 0)), None)


def run(step_fn, n=3):
    steps = []
    t = StepTracker(StepConfig(), steps.append, lambda e, k: None)
    for i in range(n):
        step_fn(t, 1000 * (i + 1))
    t.close_all()
    return steps


def test_runtime_steps_are_the_driver_steps():
    driver, runtime = run(driver_step), run(runtime_step)
    shape = [(s.launches, s.graph_launches, s.memcpy_bytes, s.closed_by, s.kernels) for s in driver]
    assert shape == [(1, 1, 1024, "stream", {"k": 1})] * 3
    assert [(s.launches, s.graph_launches, s.memcpy_bytes, s.closed_by, s.kernels) for s in runtime] == shape
    assert [s.calls for s in runtime] == [s.calls for s in driver] == [4] * 3  # nested driver calls are not calls
    assert [s.sync_ns for s in runtime] == [50] * 3  # the wait counted once


def test_runtime_sync_copy_and_device_sync_close_steps():
    steps = []
    t = StepTracker(StepConfig(), steps.append, lambda e, k: None)
    t.process(call("cudaLaunchKernel", 100, 5), "k")
    t.process(call("cudaMemcpy", 200, 5, args=(0, 0, 64, 4, 0, 0)), None)  # cudaMemcpyDefault: no readback
    assert steps == []
    t.process(call("cudaMemcpy", 300, 5, args=(0, 0, 64, 2, 0, 0)), None)  # DeviceToHost, synchronous: closes
    t.process(call("cudaLaunchKernel", 400, 5), "k")
    t.process(call("cudaDeviceSynchronize", 500, 5), None)
    assert [s.closed_by for s in steps] == ["copy", "context"]


def test_the_table_says_what_each_call_does():
    by = probes.BY_SYMBOL
    assert probes.LAUNCH_TYPE[F["cudaLaunchKernel"]] == "kernel" and probes.LAUNCH_TYPE[F["cudaGraphLaunch"]] == "graph"
    assert by["cudaMalloc"].alloc and by["cudaMalloc"].memory_type == "device"
    assert F["cudaMalloc"] in probes.ALLOCS and "cudaMalloc" in probes.ALLOCATING
    assert by["cudaStreamSynchronize"].sync_kind == "stream" and by["cudaDeviceSynchronize"].sync_kind == "context"
    assert not by["cuStreamWaitEvent"].sync_kind and by["cuStreamWaitEvent"].stream_wait  # the host does not block
    assert probes.is_readback(F["cudaMemcpyAsync"], (0, 0, 8, 1, 2, 0))
    assert not probes.is_readback(F["cudaMemcpyAsync"], (0, 0, 8, 1, 1, 0))
    assert probes.is_readback(F["cuMemcpyDtoH_v2"], (0,) * 6) and not probes.is_readback(F["cuMemcpy"], (0,) * 6)
    assert by["cudaMemcpyAsync"].direction((0, 0, 8, 1, 1, 0)) == "htod"


def test_the_bpf_program_takes_what_each_call_does_from_the_table():
    """No second table in C: the handlers' class, byte slot, element size, memory type, launch type and
    cudaMemcpyKind slot are -D flags from probes.bpf_cflags(), and every CALL/RUNTIME line gives argument
    positions only."""
    flags = dict(f[2:].split("=", 1) for f in probes.bpf_cflags())
    assert flags["OC_CLASS_cuMemAlloc_v2"] == "1" and flags["OC_CLASS_cuMemFreeHost"] == "2"
    assert flags["OC_CLASS_cudaMalloc"] == "0"  # live bytes are the nested cuMemAlloc_v2's
    assert flags["OC_MEM_cuMemFreeHost"] == "1" and flags["OC_SCALE_cuMemsetD32Async"] == "4"
    assert flags["OC_BYTES_cuMemcpyPeer"] == "2" and flags["OC_BYTES_cuMemFree_v2"] == "-1"
    assert flags["OC_LAUNCH_cudaLaunchKernel"] == "1" and flags["OC_LAUNCH_cuGraphLaunch"] == "3"
    assert flags["OC_KINDARG_cudaMemcpyAsync"] == "4"
    src = BPF.read_text()
    lines = re.findall(r"^(CALL|RUNTIME)\((\w+), (.*)\)", src, re.M)
    assert {name for _, name, _ in lines} == {p.symbol for p in probes.PROBES if p.group != "launch" or
                                               p.layer == probes.RUNTIME} - {"cuModuleGetFunction", "cuLibraryGetKernel"}
    for macro, name, args in lines:  # argument positions only (a comma outside parentheses separates them)
        assert len(re.findall(r",(?![^(]*\))", args)) + 1 == (6 if macro == "CALL" else 5), name
    assert "OC_CLASS_##fn, OC_BYTES_##fn, OC_SCALE_##fn, OC_MEM_##fn" in src
    assert "OC_BYTES_##fn, OC_LAUNCH_##fn, OC_KINDARG_##fn" in src


def test_bytes_and_archive_kind_of_runtime_copies():
    ev = call("cudaMemcpyAsync", 0, 5, args=(0x1, 0x2, 1024, 9, 2, 0))
    assert moved_bytes(ev) == 1024
    rec = to_record(ev, 0, None, None)
    assert rec["args"]["kind"] == "dtoh" and rec["args"]["bytes"] == 1024
    assert from_record(rec).args[4] == 2  # replayed with its cudaMemcpyKind
    assert moved_bytes(call("cuMemsetD16Async", 0, 5, args=(0, 0, 100, 0, 0, 0))) == 200


# ---- launches from the kernel's per-kernel counts ------------------------------------------------------------------

def series(reader, name="cuda.kernel.launches"):
    data = reader.get_metrics_data()
    out = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    for p in m.data.data_points:
                        out[tuple(sorted(p.attributes.items()))] = p
    return out


class Maps:
    def __init__(self):
        self.stats_ = {}
        self.kernels = {}

    def stats(self):
        return {k: dict(v) for k, v in self.stats_.items()}

    def kernel_launches(self):
        return dict(self.kernels)

    def launch(self, func, handle, n=1, pid=7, nested=False):
        self.kernels[(pid, F[func], handle)] = self.kernels.get((pid, F[func], handle), 0) + n
        if not nested:
            self.count(func, n, pid)

    def count(self, func, n=1, pid=7, hist=None, total_ns=0):
        agg = self.stats_.setdefault((pid, F[func]), {"calls": 0, "errors": 0, "total_ns": 0, "bytes": 0,
                                                      "hist": [0] * 32})
        agg["calls"] += n
        if hist:
            agg["hist"] = [a + b for a, b in zip(agg["hist"], hist)]
            agg["total_ns"] += total_ns


def metrics(maps, names=None, top_k=20, reader=None):
    """CudaMetrics on `maps`, wired as telemetry.Telemetry wires it (histograms added to the reader's collection)."""
    reader = reader or InMemoryMetricReader()
    names = {} if names is None else names
    m = CudaMetrics(MeterProvider(metric_readers=[reader], resource=RESOURCE).get_meter("otel_cuda"), maps.stats,
                    lambda: {}, top_k, kernel_launches=maps.kernel_launches, kernel_name=lambda pid, h: names.get(h))
    m.histograms.install(reader, RESOURCE)
    return m, reader


def launches_by_name(reader):
    out = {}
    for attrs, p in series(reader).items():
        a = dict(attrs)
        out[(a["cuda.launch.type"], a.get("cuda.kernel.name"))] = p.value
    return out


def test_launches_by_kernel_add_up_to_the_launch_calls_runtime_included():
    maps, names = Maps(), {0x10: "gemm", 0x20: "flash"}
    m, reader = metrics(maps, names)
    m.names_read_before(10**30)
    maps.launch("cuLaunchKernel", 0x10, 5)
    maps.launch("cuLaunchCooperativeKernel", 0x20, 2)
    maps.launch("cuLaunchKernel", 0x20, 3, nested=True)  # under cudaLaunchKernel: counted as that call
    maps.count("cudaLaunchKernel", 4)
    maps.launch("cudaLaunchKernel", 0xABC, 1, nested=True)  # a runtime launch with no driver launch under it
    maps.count("cuGraphLaunch", 2)
    assert launches_by_name(reader) == {("kernel", "gemm"): 5, ("kernel", "flash"): 3, ("cooperative", "flash"): 2,
                                        ("kernel", "unknown"): 1, ("kernel", "other"): 0,
                                        ("cooperative", "other"): 0, ("graph", None): 2}


def test_a_kernel_named_after_its_launches_were_counted_gets_them_and_no_series_falls():
    maps, names = Maps(), {}
    m, reader = metrics(maps, names)
    maps.launch("cuLaunchKernel", 0x10, 5)
    m.names_read_before(0)  # the consumer has not read the records written before this collection
    assert launches_by_name(reader) == {}  # held back: its name record may not have been read yet
    names[0x10] = "gemm"  # ... it was
    maps.launch("cuLaunchKernel", 0x10, 2)
    assert launches_by_name(reader)[("kernel", "gemm")] == 7
    maps.launch("cuLaunchKernel", 0x99, 3)  # never named
    m.names_read_before(10**30)
    got = launches_by_name(reader)
    # `unknown` is admitted to the top K now; as for any name admitted after the first export, the launches
    # before its admission stay in `other` (TopK)
    assert got == {("kernel", "gemm"): 7, ("kernel", "unknown"): 0, ("kernel", "other"): 3}
    maps.launch("cuLaunchKernel", 0x99, 2)
    assert launches_by_name(reader)[("kernel", "unknown")] == 2
    names[0x99] = "late"  # named after it was counted unknown: what was counted stays (no series falls)
    maps.launch("cuLaunchKernel", 0x99, 1)
    got = launches_by_name(reader)
    assert got[("kernel", "unknown")] == 2 and got[("kernel", "late")] == 0 and got[("kernel", "other")] == 4
    assert sum(got.values()) == maps.stats()[(7, F["cuLaunchKernel"])]["calls"] == 13


def test_launches_the_kernel_table_could_not_hold_are_unrecorded():
    maps, names = Maps(), {0x10: "gemm"}
    m, reader = metrics(maps, names)
    m.names_read_before(10**30)
    maps.launch("cuLaunchKernel", 0x10, 5)
    maps.count("cuLaunchKernel", 4)  # counted per function, not per kernel: the table was full
    got = launches_by_name(reader)
    assert got[("kernel", "gemm")] == 5 and got[("kernel", "unrecorded")] == 4
    assert sum(got.values()) == maps.stats()[(7, F["cuLaunchKernel"])]["calls"]


def test_a_gone_process_keeps_its_launches_with_their_names_after_its_kernel_entries_go():
    maps, names = Maps(), {0x10: "gemm"}
    m, reader = metrics(maps, names)
    maps.launch("cuLaunchKernel", 0x10, 5)
    m.retire(7)
    m.settle(7)  # the pipeline read its last records and forgets its names next
    names.clear()
    maps.kernels.clear()
    maps.stats_.clear()
    assert launches_by_name(reader)[("kernel", "gemm")] == 5


# ---- durations from the kernel's log2 histograms -----------------------------------------------------------------

def test_durations_are_the_kernel_histograms_with_log2_bounds():
    maps = Maps()
    hist = [0] * 32
    hist[10], hist[20] = 3, 1  # 3 calls in [1024, 2048) ns, 1 in [2^20, 2^21) ns
    maps.count("cuStreamSynchronize", 4, hist=hist, total_ns=3 * 1500 + 1_500_000)
    maps.count("cudaStreamSynchronize", 1, hist=[1] + [0] * 31, total_ns=1)
    maps.count("cuLaunchKernel", 9)  # entry only: no duration
    m, reader = metrics(maps)
    api = {dict(a)["cuda.function"]: p for a, p in series(reader, "cuda.api.duration").items()}
    assert set(api) == {"cuStreamSynchronize", "cudaStreamSynchronize"}
    p = api["cuStreamSynchronize"]
    assert p.count == 4 and p.bucket_counts == hist and abs(p.sum - (4500 + 1_500_000) / 1e9) < 1e-12
    assert list(p.explicit_bounds) == list(LOG2_BOUNDS_S) and LOG2_BOUNDS_S[9] == 1024 / 1e9
    assert p.min is None and p.max is None
    sync = {dict(a)["cuda.sync.kind"]: p for a, p in series(reader, "cuda.sync.duration").items()}
    assert sync["stream"].count == 5  # driver and runtime waits of one kind together
    maps.count("cuStreamSynchronize", 1, hist=hist, total_ns=0)
    again = {dict(a)["cuda.function"]: p for a, p in series(reader, "cuda.api.duration").items()}
    assert again["cuStreamSynchronize"].count == 8  # cumulative


def test_a_delta_reader_gets_the_change_since_its_last_collection():
    maps = Maps()
    hist = [0] * 32
    hist[5] = 2
    maps.count("cuCtxSynchronize", 2, hist=hist, total_ns=80)
    _, reader = metrics(maps, reader=InMemoryMetricReader(
        preferred_temporality={Histogram: AggregationTemporality.DELTA}))
    assert [p.count for p in series(reader, "cuda.api.duration").values()] == [2]
    maps.count("cuCtxSynchronize", 1, hist=hist[:5] + [1] + hist[6:], total_ns=40)
    points = list(series(reader, "cuda.api.duration").values())
    assert [p.count for p in points] == [1] and points[0].bucket_counts[5] == 1


def test_prometheus_sees_classic_buckets():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from otel_cuda.telemetry import prometheus_reader

    maps = Maps()
    hist = [0] * 32
    hist[10] = 3
    maps.count("cuStreamSynchronize", 3, hist=hist, total_ns=3000)
    registry = CollectorRegistry()
    metrics(maps, reader=prometheus_reader(registry))
    samples = {(s.name, s.labels.get("le")): s.value
               for family in text_string_to_metric_families(generate_latest(registry).decode())
               for s in family.samples if s.labels.get("cuda_function") == "cuStreamSynchronize"}
    assert samples[("cuda_api_duration_seconds_bucket", "1.024e-06")] == 0
    assert samples[("cuda_api_duration_seconds_bucket", "2.048e-06")] == 3
    assert samples[("cuda_api_duration_seconds_count", None)] == 3


# ---- the pipeline: a runtime launch's kernel, and names the probe could not read -----------------------------------

class NoKernel(MemoryRing):
    def read_batch(self, timeout_ms):
        return b""

    def lost(self):
        return 0

    def table_full(self):
        return 0

    def skipped_runs(self):
        return 0


class Records:
    def __init__(self):
        self.batches = []

    def on_events(self, batch):
        self.batches.append(list(batch))

    def __getattr__(self, name):  # the rest of the Observer interface: nothing to do
        return lambda *a, **k: None


def pipeline_with(memory=b""):
    from otel_cuda.names import KernelNames
    from otel_cuda.pipeline import build

    from support.harness import settings

    observer = Records()
    p = build(settings(match="x"), NoKernel(), procfs=None, observer=observer)
    p.names = KernelNames(read_memory=lambda pid, addr, size: memory[addr - 0x5000:][:size])
    return p, observer


def name_record(handle, name, flags=events.F_RETURN, addr=0x5000):
    return Event(events.EV_NAME, 0, flags, F["cuModuleGetFunction"], 7, 1, 0, 10, 0, (handle, 0x1, addr), name)


def test_a_runtime_launch_carries_the_kernel_of_the_driver_launch_under_it():
    p, seen = pipeline_with()
    p.on_events([name_record(0x10, "gemm"),
                 launch(105, handle=0x10, flags=events.F_NESTED),
                 call("cudaLaunchKernel", 100, 20, args=(0xABC, 0, 0, 9, 0, 0)),
                 call("cudaLaunchKernel", 200, 20, args=(0xABD, 0, 0, 9, 0, 0))])  # no driver launch under it
    kernels = [k for ev, k, _ in seen.batches[0] if ev.func == F["cudaLaunchKernel"]]
    assert kernels == ["gemm", "unknown"]
    rec = to_record(seen.batches[0][2][0], 0, kernels[0], None)
    assert rec["func"] == "cudaLaunchKernel" and rec["kernel"] == "gemm"


def test_a_name_the_probe_could_not_read_is_read_from_the_process_and_counted():
    """bpf name_return: an unreadable (or empty) name comes as "" flagged NAME_UNREAD | TRUNCATED, so user space
    reads it at name_addr, as it completes a name cut at 256 bytes."""
    p, _ = pipeline_with(memory=b"flash_fwd_kernel\0")
    p.on_events([name_record(0x20, "", flags=events.F_RETURN | events.F_NAME_UNREAD | events.F_TRUNCATED),
                 launch(300, handle=0x20)])
    assert p.names.lookup(7, 0x20) == "flash_fwd_kernel"
    assert p.totals.names_unread == 1 and p.summary()["kernel_names_unread"] == 1


def test_a_name_that_stays_unreadable_leaves_its_kernel_unknown():
    p, _ = pipeline_with(memory=b"")  # the process's memory cannot be read either
    p.on_events([name_record(0x30, "", flags=events.F_RETURN | events.F_NAME_UNREAD | events.F_TRUNCATED)])
    assert p.names.lookup(7, 0x30) is None
    assert p.names.name_of_launch(launch(400, handle=0x30)) == "unknown"
