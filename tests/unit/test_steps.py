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


# --- vLLM's engine loops, as driver calls (vllm/v1/worker/gpu/async_utils.py and the engine core's batch queue) ---
MAIN, COPY = 0x100, 0x200  # streams
PREP, TMP = 0xE1, 0xE2  # events: input copies done, copy stream waits on main
LAUNCHER, OUTPUT = 1, 2  # threads


def vllm_step(t, ts, launches, *, readback_thread, ready=0xE3):
    """One step's calls on the launching thread: wait for the previous step's input copies, copy the inputs, launch,
    then read the sampled tokens back on the copy stream and record `ready` (each in-flight step has its own event,
    as each AsyncOutput makes a torch.cuda.Event). Returns the wait on `ready` (to feed later, as made by
    `readback_thread`) and the time after the step's calls."""
    t.process(call("cuEventSynchronize", ts, 10, tid=LAUNCHER, args=(0, PREP, 0, 0, 0, 0)), None)
    t.process(call("cuMemcpyHtoDAsync_v2", ts + 20, 5, args=(0, 0, 256, MAIN, 0, 0)), None)
    t.process(call("cuEventRecord", ts + 30, 2, args=(MAIN, PREP, 0, 0, 0, 0)), None)
    for i in range(launches):
        t.process(launch(ts + 40 + i), "k")
    ts += 40 + launches
    t.process(call("cuEventRecord", ts, 2, args=(MAIN, TMP, 0, 0, 0, 0)), None)
    t.process(call("cuStreamWaitEvent", ts + 5, 2, args=(COPY, TMP, 0, 0, 0, 0)), None)
    t.process(call("cuMemcpyDtoHAsync_v2", ts + 10, 5, args=(0, 0, 64, COPY, 0, 0)), None)
    t.process(call("cuMemcpyDtoHAsync_v2", ts + 20, 5, args=(0, 0, 8, COPY, 0, 0)), None)
    t.process(call("cuEventRecord", ts + 30, 2, args=(COPY, ready, 0, 0, 0, 0)), None)
    return call("cuEventSynchronize", ts + 40, 500, tid=readback_thread, args=(0, ready, 0, 0, 0, 0)), ts + 40


def test_async_scheduling_steps_close_at_the_output_threads_wait():
    """vLLM's default loop: step N+1 is launched before step N's tokens are read back, on another thread."""
    steps = []
    t = StepTracker(StepConfig(), steps.append, lambda e, k: None)
    wait1, ts = vllm_step(t, 0, 5, readback_thread=OUTPUT)
    wait2, ts = vllm_step(t, ts + 100, 7, readback_thread=OUTPUT, ready=0xE4)  # launched while step 1 is in flight
    assert steps == []  # the launching thread's wait on its own input-copy event closed nothing
    t.process(wait1, None)  # the output thread gets step 1's tokens
    assert [(s.launches, s.closed_by, s.closed_tid, s.memcpy_bytes) for s in steps] == [(5, "event", OUTPUT, 72)]
    assert steps[0].end_ns == wait1.ts_ns + wait1.dur_ns and steps[0].sync_ns == 500
    wait3, ts = vllm_step(t, ts + 1000, 3, readback_thread=OUTPUT, ready=0xE5)
    t.process(wait2, None)
    t.process(wait3, None)
    assert [s.launches for s in steps] == [5, 7, 3]
    assert steps[1].start_ns < steps[0].end_ns  # the overlap async scheduling is for


def test_synchronous_loop_reads_back_on_the_launching_thread():
    steps = []
    t = StepTracker(StepConfig(), steps.append, lambda e, k: None)
    ts = 0
    for n in (4, 6):
        wait, ts = vllm_step(t, ts, n, readback_thread=LAUNCHER)
        t.process(wait, None)
        ts += 1000
    assert [(s.launches, s.closed_by, s.closed_tid) for s in steps] == [(4, "event", LAUNCHER), (6, "event", LAUNCHER)]


def test_wait_on_an_event_recorded_before_attach_closes_only_the_waiting_threads_own_launches():
    steps = []
    t = StepTracker(StepConfig(), steps.append, lambda e, k: None)
    t.process(launch(0, tid=LAUNCHER), "k")
    t.process(call("cuEventSynchronize", 10, 5, tid=OUTPUT, args=(0, 0xBEEF, 0, 0, 0, 0)), None)
    assert steps == []  # another thread's wait on an unknown event says nothing about this thread's launches
    t.process(call("cuEventSynchronize", 20, 5, tid=LAUNCHER, args=(0, 0xBEEF, 0, 0, 0, 0)), None)
    assert [(s.launches, s.closed_by) for s in steps] == [(1, "thread")]


def test_stream_and_context_waits_from_another_thread():
    steps = []
    t = StepTracker(StepConfig(), steps.append, lambda e, k: None)
    t.process(launch(0, tid=1), "k")
    t.process(call("cuMemcpyDtoHAsync_v2", 5, 1, tid=1, args=(0, 0, 8, COPY, 0, 0)), None)
    t.process(launch(10, tid=1), "k")  # the next step
    t.process(call("cuStreamSynchronize", 20, 1, tid=2, args=(MAIN, 0, 0, 0, 0, 0)), None)
    assert steps == []  # not the readback's stream
    t.process(call("cuStreamSynchronize", 30, 1, tid=2, args=(COPY, 0, 0, 0, 0, 0)), None)
    assert [(s.launches, s.closed_by) for s in steps] == [(1, "stream")]
    t.process(call("cuCtxSynchronize", 40, 1, tid=2), None)
    assert len(steps) == 1  # thread 1 is still launching its next step: its own wait will end it
    t.process(call("cuCtxSynchronize", 50, 1, tid=1), None)
    assert [(s.launches, s.closed_by) for s in steps[1:]] == [(1, "context")]


def test_a_readback_never_waited_for_is_bounded():
    steps = []
    t = StepTracker(StepConfig(max_waiting=2, idle_close_ns=10_000), steps.append, lambda e, k: None)
    for i in range(3):
        t.process(launch(i * 100), "k")
        t.process(call("cuMemcpyDtoHAsync_v2", i * 100 + 50, 1, args=(0, 0, 8, COPY, 0, 0)), None)
    assert [(s.id, s.closed_by) for s in steps] == [(1, "overflow")]
    t.tick(250 + 10_001)  # the last readback was issued at 250
    assert [s.closed_by for s in steps] == ["overflow", "idle", "idle"]
