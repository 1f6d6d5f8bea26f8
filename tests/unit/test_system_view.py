"""The system stage on synthetic events and fake kernel maps: model-load windows and spans, metrics, archive records."""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_cuda import events, probes, system
from otel_cuda.events import Event
from otel_cuda.metrics import CudaMetrics
from otel_cuda.spans import Tracers

F = {p.symbol: p.func_id for p in probes.PROBES}
S = system.SYS_ID
OFFSET = 1_700_000_000_000_000_000
PID = 4242


def sys_ev(kind, ts, a=(0, 0, 0, 0), dur=0, result=0, path="", tid=PID, pid=PID):
    return Event(events.EV_SYS, 0, events.F_RETURN, S[kind], pid, tid, ts, dur, result, tuple(a), path)


def call(func, ts, args=(0, 0, 0, 0, 0, 0), dur=10, result=0, tid=PID, pid=PID, flags=events.F_RETURN):
    return Event(events.EV_CALL, 0, flags, F[func], pid, tid, ts, dur, result, tuple(args))


def launch(ts, tid=PID, pid=PID):
    return Event(events.EV_LAUNCH, 0, 0, F["cuLaunchKernel"], pid, tid, ts, 0, -1, (1, 2, 1, 1, 1, 1, 1, 1, 0))


class Clock:
    def offset(self):
        return OFFSET


class Now:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@dataclass(frozen=True)
class StatKey:
    pid: int
    func: int
    file_kind: int


@dataclass(frozen=True)
class OffKey:
    pid: int
    tid: int
    cls: int


class Table(dict):
    """A BCC table double: items() as BCC gives them, del by key."""


class Maps:
    def __init__(self):
        self.tables = {name: Table() for name in ("sys_stats", "sys_offcpu", "sys_fds", "sys_maps", "sys_inflight",
                                                  "sys_pending", "sys_offcpu_start")}

    def table(self, name):
        return self.tables[name]

    def stat(self, pid, kind, file_kind, calls=0, errors=0, nbytes=0, ns=0):
        self.tables["sys_stats"][StatKey(pid, S[kind], file_kind)] = SimpleNamespace(calls=calls, errors=errors,
                                                                                     bytes=nbytes, ns=ns)

    def off(self, pid, tid, cls, ns, count):
        self.tables["sys_offcpu"][OffKey(pid, tid, cls)] = SimpleNamespace(ns=ns, count=count)


@pytest.fixture
def view(tmp_path):
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    now = Now()
    maps = Maps()
    tracers = Tracers(SimpleSpanProcessor(spans), lambda pid: Resource.create({"process.pid": pid}))
    v = system.SystemView(tracers, Clock(), MeterProvider(metric_readers=[reader]).get_meter("t"), maps,
                          settle_s=1.0, proc=str(tmp_path), now=now)
    return SimpleNamespace(v=v, spans=spans, reader=reader, now=now, maps=maps, proc=tmp_path)


def points(reader, name):
    out = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    for p in m.data.data_points:
                        out[tuple(sorted(p.attributes.items()))] = p.value
    return out


def load_sequence():
    """A cold start: open + read the weights (coalesced), a library, mmap, mlock, an I/O wait, CUDA set-up."""
    return [
        (sys_ev("openat", 1_000, (3, 0, 1, 0), dur=5, result=3, path="/m/model.safetensors"), None, None),
        (sys_ev("device_open", 1_100, (4, 2, 3, 0), result=4, path="/dev/nvidiactl"), None, None),
        (sys_ev("openat", 1_150, (2**64 - 2, 0, 0, 0), result=-2, path="/nope"), None, None),  # ENOENT: not counted
        (sys_ev("read", 2_000, (3, 6 << 20, 6, 1), dur=600, path="/m/model.safetensors"), None, None),
        (sys_ev("read", 3_000, (3, 2 << 20, 2, 1), dur=200, path="/m/model.safetensors"), None, None),
        (sys_ev("openat", 3_500, (5, 0, 2, 0), result=5, path="/lib/libfoo.so.1"), None, None),
        (sys_ev("mmap", 3_600, (5, 4096, 2, 5), result=0x7F0000, path="/lib/libfoo.so.1"), None, None),
        (sys_ev("mmap", 4_000, (3, 4 << 20, 1, 1 | (2 << 32)), result=0x7E0000, path="/m/model.safetensors"), None,
         None),
        (sys_ev("mlock", 4_100, (0x1000, 65536, 0, 0)), None, None),
        (sys_ev("offcpu", 4_200, (2, 2, 0, 0), dur=700), None, None),  # D state: I/O wait
        (sys_ev("offcpu", 4_300, (1, 1, 0, 0), dur=5_000_000), None, None),  # a sleep: not I/O
        (call("cuMemAlloc_v2", 5_000, (0x7F00, 1 << 20, 0, 0, 0, 0)), None, None),
        (call("cuMemAlloc_v2", 5_100, (0, 1 << 50, 0, 0, 0, 0), result=2), None, None),  # failed: not counted
        (call("cuMemcpyHtoD_v2", 5_200, (0x7F00, 0x1000, 123456, 0, 0, 0)), None, None),
        (call("cuMemcpyHtoD_v2", 5_250, (0x7F00, 0x1000, 1, 0, 0, 0), flags=events.F_RETURN | events.F_NESTED),
         None, None),  # nested under a runtime call: counted there
    ]


def test_model_load_window_from_start_to_first_launch(view):
    v = view.v
    batch = load_sequence()  # no /proc entry: the window starts at first sight
    batch += [(launch(9_000, tid=PID + 1), "k", None),  # the first launch arrives after a later one
              (sys_ev("read", 9_500, (3, 999, 1, 1), path="/m/model.safetensors"), None, None)]  # after: outside
    v.on_events(batch[:-2] + [(launch(10_000), "k", None)])
    v.on_events(batch[-2:])
    v.on_idle(0)
    assert not view.spans.get_finished_spans(), "the span waits settle_s for late events"
    r = v.model_load(PID)
    assert r["end_ns"] == 9_000 and r["ended_by"] == "first_launch"
    assert r["bytes_read"] == r["bytes_read_total"] == 8 << 20 and r["bytes_read_by_kind"] == {"weights": 8 << 20}
    assert r["bytes_mapped"] == 4 << 20 and r["bytes_mapped_total"] == (4 << 20) + 4096
    assert r["bytes_mapped_by_kind"] == {"weights": 4 << 20, "library": 4096}
    assert r["files_opened"] == 3 and r["device_opens"] == 1
    assert r["files_opened_by_kind"] == {"weights": 1, "device": 1, "library": 1}
    assert r["read_ns"] == 800 and r["io_wait_ns"] == 700 and r["mlocked_bytes"] == 65536
    assert (r["cuda_allocations"], r["cuda_allocated_bytes"], r["htod_bytes"]) == (1, 1 << 20, 123456)
    assert r["files"][0] == {"path": "/m/model.safetensors", "kind": "weights", "bytes_read": 8 << 20,
                             "bytes_mapped": 4 << 20, "first_ns": 1_000}

    view.now.t += 1.5
    v.on_idle(0)
    (span,) = view.spans.get_finished_spans()
    assert span.name == "process.model_load" and span.parent is None
    assert span.end_time == 9_000 + OFFSET
    assert span.start_time == r["start_ns"] + OFFSET and r["start_source"] == "first_sight"
    a = span.attributes
    assert a["model_load.bytes_read"] == 8 << 20 and a["model_load.bytes_mapped"] == 4 << 20
    assert a["model_load.bytes_read.weights"] == 8 << 20 and a["model_load.bytes_mapped.library"] == 4096
    assert a["model_load.bytes_read.weights"] == 8 << 20 and a["model_load.bytes_mapped.weights"] == 4 << 20
    assert a["model_load.io_wait"] == pytest.approx(700e-9) and a["cuda.memcpy.htod_bytes"] == 123456
    assert span.resource.attributes["process.pid"] == PID
    assert [e.attributes["file.path"] for e in span.events] == ["/m/model.safetensors", "/lib/libfoo.so.1",
                                                                 "/dev/nvidiactl"]
    # closed: later events change nothing, and the result is kept
    v.on_events([(sys_ev("read", 12_000, (3, 5, 1, 1)), None, None)])
    assert v.model_load(PID)["bytes_read"] == 8 << 20 and len(view.spans.get_finished_spans()) == 1


def test_each_process_span_is_a_root_of_its_own_trace(view):
    v = view.v
    v.on_events([(launch(5_000, pid=1), "k", None), (launch(6_000, pid=2), "k", None)])
    v.shutdown()
    s1, s2 = view.spans.get_finished_spans()
    assert s1.parent is None and s2.parent is None and s1.context.trace_id != s2.context.trace_id
    assert {s.resource.attributes["process.pid"] for s in (s1, s2)} == {1, 2}


def test_window_start_is_the_process_start_from_proc(view, tmp_path):
    import os
    import time

    (tmp_path / str(PID)).mkdir()
    ticks = 12345
    fields = ["S", "1"] + ["0"] * 17 + [str(ticks)] + ["0"] * 20  # field 22 = the 20th after the ")"
    (tmp_path / str(PID) / "stat").write_text(f"{PID} (my prog) " + " ".join(fields))
    (tmp_path / str(PID) / "status").write_text(f"Name:\tx\nTgid:\t{PID}\n")
    hz = os.sysconf("SC_CLK_TCK")
    suspended = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    expect = ticks * 10**9 // hz - max(0, suspended)
    assert abs(system.process_start_mono_ns(PID, proc=str(tmp_path)) - expect) < 10**6
    view.v.on_process(SimpleNamespace(pid=PID, start_time=0))
    w = view.v.windows[PID]
    assert w.start_source == "process_start" and abs(w.start_ns - expect) < 10**6


def test_a_thread_reported_as_a_process_gets_no_window(view, tmp_path):
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "status").write_text("Name:\tx\nTgid:\t70\n")
    view.v.on_process(SimpleNamespace(pid=77, start_time=0))
    assert 77 not in view.v.windows


def test_process_exit_before_any_launch_ends_the_window(view):
    v = view.v
    v.on_events([(sys_ev("openat", 1_000, (3, 0, 1, 0), result=3, path="/w.gguf"), None, None)])
    view.maps.stat(PID, "read", 1, calls=3, nbytes=300)
    v.on_process_exit(SimpleNamespace(pid=PID))
    r = v.model_load(PID)
    assert r["ended_by"] == "exit" and r["end_ns"] >= 1_000
    view.now.t += 2
    v.on_idle(0)
    (span,) = view.spans.get_finished_spans()
    assert span.attributes["model_load.ended_by"] == "exit"
    # the kernel's entries are freed, the totals kept for the counters
    assert not view.maps.tables["sys_stats"]
    io = points(view.reader, "process.disk.io")
    assert io[(("disk.io.direction", "read"), ("otel_cuda.file.kind", "weights"), ("process.pid", PID))] == 300


def test_metrics_from_kernel_aggregates(view):
    v, m = view.v, view.maps
    m.stat(PID, "read", 1, calls=10, nbytes=10 << 20)
    m.stat(PID, "read", 0, calls=2, nbytes=100)
    m.stat(PID, "write", 0, calls=1, nbytes=50)
    m.stat(PID, "read", 3, calls=1, nbytes=8)  # a device's read: no disk I/O
    m.stat(PID, "openat", 3, calls=5, errors=1)
    m.stat(PID, "openat", 1, calls=1)
    m.off(PID, PID, 1, 900, 3)  # main thread: CUDA
    m.off(PID, PID, 2, 100, 1)
    m.off(PID, PID, 0, 50, 2)
    m.off(PID, PID + 9, 1, 7_000, 4)  # a thread that never called CUDA: counts switches, not off-CPU time
    v.on_events([(call("cuStreamSynchronize", 1, (5, 0, 0, 0, 0, 0)), None, None)])
    io = points(view.reader, "process.disk.io")
    assert io == {
        (("disk.io.direction", "read"), ("otel_cuda.file.kind", "weights"), ("process.pid", PID)): 10 << 20,
        (("disk.io.direction", "read"), ("otel_cuda.file.kind", "other"), ("process.pid", PID)): 100,
        (("disk.io.direction", "write"), ("otel_cuda.file.kind", "other"), ("process.pid", PID)): 50,
    }
    assert points(view.reader, "cuda.device.opens") == {(("process.pid", PID),): 4}
    assert points(view.reader, "process.context_switches") == {
        (("process.context_switch.type", "voluntary"), ("process.pid", PID)): 8,
        (("process.context_switch.type", "involuntary"), ("process.pid", PID)): 2,
    }
    off = points(view.reader, "cuda.thread.off_cpu.time")
    base = (("process.pid", PID), ("thread.id", PID))
    assert off == {
        (("otel_cuda.off_cpu.reason", "sleep"), ("process.context_switch.type", "voluntary")) + base: 900e-9,
        (("otel_cuda.off_cpu.reason", "io"), ("process.context_switch.type", "voluntary")) + base: 100e-9,
        (("otel_cuda.off_cpu.reason", "preempted"), ("process.context_switch.type", "involuntary")) + base: 50e-9,
    }
    assert v.off_cpu(PID)[PID] == {"preempted_ns": 50, "sleep_ns": 900, "io_ns": 100, "preempted_switches": 2,
                                   "sleep_switches": 3, "io_switches": 1}


def test_per_thread_series_are_bounded(view):
    v, m = view.v, view.maps
    v.max_thread_series = 2
    for tid in (10, 11, 12, 13):
        v.on_events([(call("cuStreamSynchronize", tid, tid=tid), None, None)])
        m.off(PID, tid, 1, 1000 * tid, 1)
    off = points(view.reader, "cuda.thread.off_cpu.time")
    by_thread = {dict(k).get("thread.id"): val for k, val in off.items()}
    assert by_thread == {10: 10e-6, 11: 11e-6, None: pytest.approx(25e-6)}


def test_sys_records():
    assert system.sys_record(sys_ev("openat", 10, (3, 0o2000000, 1, 2**64 - 100), dur=7, result=3,
                                    path="/m/x.safetensors"), 1000) == {
        "v": 1, "type": "sys", "ts": 1010, "mono_ns": 10, "pid": PID, "tid": PID, "func": "openat", "phase": "call",
        "dur_ns": 7, "result": "ok",
        "args": {"path": "/m/x.safetensors", "fd": 3, "flags": 0o2000000, "file_kind": "weights"}}
    failed = system.sys_record(sys_ev("openat", 10, (2**64 - 2, 0, 0, 0), result=-2, path="/nope"), 0)
    assert failed["result"] == "ENOENT" and "fd" not in failed["args"]
    rd = system.sys_record(sys_ev("read", 10, (3, 4096, 4, 1), dur=9, path="/m/x.bin"), 0)
    assert rd["func"] == "read" and rd["args"] == {"path": "/m/x.bin", "fd": 3, "bytes": 4096, "calls": 4,
                                                   "file_kind": "weights"}
    mm = system.sys_record(sys_ev("mmap", 10, (3, 8192, 1, 1 | (2 << 32)), result=0x7F00_0000_0000, path="/m/x.bin"), 0)
    assert mm["args"] == {"path": "/m/x.bin", "fd": 3, "bytes": 8192, "file_kind": "weights", "addr": "0x7f0000000000",
                          "prot": 1, "flags": 2}
    un = system.sys_record(sys_ev("munmap", 10, (0x7F00_0000_0000, 8192, 1, 0), path="/m/x.bin"), 0)
    assert un["args"] == {"path": "/m/x.bin", "addr": "0x7f0000000000", "bytes": 8192, "file_kind": "weights"}
    dev = system.sys_record(sys_ev("device_open", 10, (5, 2, 3, 0), result=5, path="/dev/nvidia0"), 0)
    assert dev["func"] == "device_open" and dev["args"]["file_kind"] == "device"
    ml = system.sys_record(sys_ev("mlock", 10, (0x1000, 65536, 0, 0)), 0)
    assert ml["func"] == "mlock" and ml["args"] == {"addr": "0x1000", "bytes": 65536}
    off = system.sys_record(sys_ev("offcpu", 10, (2, 2, 0, 0), dur=5_000), 0)
    assert off["func"] == "offcpu" and off["dur_ns"] == 5_000 and off["result"] is None
    assert off["args"] == {"reason": "io", "switch_type": "voluntary", "state": "D"}
    pre = system.sys_record(sys_ev("offcpu", 10, (0, 0x100, 0, 0), dur=5_000), 0)
    assert pre["args"] == {"reason": "preempted", "switch_type": "involuntary", "state": "R+"}


def test_records_validate_against_the_archive_schema():
    import json
    from pathlib import Path

    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" / "archive-schema.json").read_text())
    for ev, _, _ in load_sequence():
        if ev.type == events.EV_SYS:
            jsonschema.validate(system.sys_record(ev, OFFSET), schema)


def test_cuda_metrics_ignore_system_events():
    reader = InMemoryMetricReader()
    m = CudaMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"), lambda: {}, lambda: {})
    m.on_events([(sys_ev("openat", 10, (3, 0, 1, 0), dur=5, result=-2), None, None)])  # func 1 = cuLaunchKernel's id
    assert not points(reader, "cuda.api.duration")


def test_a_reused_pid_gets_a_new_window(view):
    v = view.v
    v.on_process(SimpleNamespace(pid=PID, start_time=100))
    v.on_events([(launch(v.windows[PID].start_ns + 5), "k", None)])
    v.shutdown()
    first = v.windows[PID]
    v.on_process(SimpleNamespace(pid=PID, start_time=100))  # the same process announced again: kept
    assert v.windows[PID] is first
    v.on_process(SimpleNamespace(pid=PID, start_time=200))  # another process with the pid
    assert v.windows[PID] is not first and v.windows[PID].end_ns is None
