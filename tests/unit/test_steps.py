"""Step detection and kernel naming on synthetic event streams."""

from otel_cuda import events, probes
from otel_cuda.events import Event
from otel_cuda.names import KernelNames
from otel_cuda.steps import StepConfig, StepTracker

F = {p.symbol: p.func_id for p in probes.PROBES}


def launch(ts, tid=1, handle=0x10, func="cuLaunchKernel", pid=7):
    return Event(events.EV_LAUNCH, 0, 0, F[func], pid, tid, ts, 0, -1, (handle, 5, 1, 1, 1, 1, 1, 1, 0))


def call(func, ts, dur, tid=1, args=(0, 0, 0, 0, 0, 0), result=0, pid=7):
    return Event(events.EV_CALL, 0, events.F_RETURN, F[func], pid, tid, ts, dur, result, args)


def test_a_step_is_a_launch_burst_closed_by_a_sync_per_thread():
    steps, outliers = [], []
    t = StepTracker(StepConfig(outlier_ns=10**6), steps.append, lambda e, k: outliers.append(e))
    assert t.process(call("cuMemAlloc_v2", 0, 100, args=(1, 64, 0, 0, 0, 0)), None) is None  # before any launch
    a = t.process(launch(1000), "k1")
    b = t.process(launch(1100, tid=2), "k2")  # another thread: another step
    t.process(launch(1200, func="cuGraphLaunch"), None)
    t.process(call("cuMemcpyDtoHAsync_v2", 1300, 50, args=(0, 0, 4096, 5, 0, 0)), None)
    assert t.process(call("cuStreamSynchronize", 1400, 2_000_000), None) == a
    assert a != b and len(steps) == 1
    s = steps[0]
    assert (s.launches, s.graph_launches, s.memcpy_bytes, s.start_ns, s.end_ns) == (1, 1, 4096, 1000, 2_001_400)
    assert s.sync_ns == 2_000_000 and [e.func for e, _ in s.outliers] == [F["cuStreamSynchronize"]]
    t.close_all()
    assert len(steps) == 2 and steps[1].tid == 2


def test_quiet_thread_closes_its_step():
    steps = []
    t = StepTracker(StepConfig(idle_close_ns=1000), steps.append, lambda e, k: None)
    t.process(launch(0), "k")
    t.tick(500)
    assert steps == []
    t.tick(2000)
    assert len(steps) == 1


def test_names_from_module_library_and_kernel_get_function():
    names = KernelNames()
    names.observe(Event(events.EV_NAME, 0, 1, F["cuModuleGetFunction"], 7, 1, 0, 0, 0, (0x10, 0x1, 0), "gemm"))
    names.observe(Event(events.EV_NAME, 0, 1, F["cuLibraryGetKernel"], 7, 1, 0, 0, 0, (0x20, 0x2, 0), "flash"))
    names.observe(call("cuKernelGetFunction", 0, 1, args=(0x30, 0x20, 0, 0, 0, 0)))
    assert names.name_of_launch(launch(0, handle=0x10)) == "gemm"
    assert names.name_of_launch(launch(0, handle=0x20)) == "flash"  # a CUkernel launched directly
    assert names.name_of_launch(launch(0, handle=0x30)) == "flash"  # the CUfunction of that kernel
    assert names.name_of_launch(launch(0, handle=0x40)) == "unknown"
    assert names.name_of_launch(launch(0, handle=0x10, pid=8)) == "unknown"  # handles are per process
    assert names.name_of_launch(launch(0, func="cuGraphLaunch")) is None
    assert names.launches_unknown == 2 and names.resolved_fraction == 3 / 5
    assert names.unknown_by_func == {F["cuLaunchKernel"]: 2}  # which launch path the unnamed ones took
