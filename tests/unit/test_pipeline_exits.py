"""A process's exit as the pipeline's threads see it: discovery notices it while the ring buffer may still hold the
process's last records. Kernel side and /proc are doubles; the pipeline, discovery and their threads are real."""

import threading
import time

from otel_cuda import events as E
from otel_cuda.discovery import ProcInfo
from otel_cuda.pipeline import build
from otel_cuda.probes import BY_SYMBOL
from otel_cuda.ringbuf import MemoryRing, frame

from support.harness import settings

PID = 4_194_304 + 42  # above the kernel's PID_MAX_LIMIT: never this test's own pid, which discovery skips
HANDLE = 0xA000


class FakeProcFS:
    """/proc with the processes the test says are running."""

    def __init__(self):
        self.running: dict[int, ProcInfo] = {}

    def pids(self):
        return list(self.running)

    def info(self, pid, library):
        return self.running.get(pid)


class HeldRing(MemoryRing):
    """The kernel side: records the consumer reads only while the ring is not held."""

    def __init__(self):
        self.records: list[bytes] = []
        self.held = False
        self.deselected = threading.Event()

    def read_batch(self, timeout_ms):
        time.sleep(timeout_ms / 1000 if self.held or not self.records else 0)
        if self.held:
            return b""
        out, self.records = self.records, []
        return frame(out)

    def select(self, pid):
        pass

    def deselect(self, pid):
        self.deselected.set()

    def forget_processes(self, pids):
        pass

    def stats(self):
        return {}

    def lost(self):
        return 0


def name_record(pid, handle, name):
    func = BY_SYMBOL["cuModuleGetFunction"].func_id
    return E._NAME.pack(E.EV_NAME, 0, E.F_RETURN, func, pid, pid, time.monotonic_ns(), 1000, 0, handle, 1, 0,
                        name.encode())


def launch_record(pid, handle):
    func = BY_SYMBOL["cuLaunchKernel"].func_id
    return E._LAUNCH.pack(E.EV_LAUNCH, 0, 0, func, pid, pid, time.monotonic_ns(), 0, -1, 0, handle, 7, 1, 1, 1,
                          32, 1, 1)


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def started(procfs, ring):
    pipeline = build(settings(match="workload", discovery_interval=0.02), ring, procfs)
    stop = threading.Event()
    thread = threading.Thread(target=pipeline.run, args=(stop,), daemon=True)
    thread.start()
    procfs.running[PID] = ProcInfo(PID, "workload --tag exits", start_time=1)
    assert wait_for(lambda: PID in pipeline.discovery.tracked_pids())
    ring.records.append(name_record(PID, HANDLE, "gemm_kernel"))
    assert wait_for(lambda: not ring.records)  # read: the name is known
    return pipeline, stop, thread


def test_launches_read_after_the_exit_was_noticed_keep_their_kernel_names():
    procfs, ring = FakeProcFS(), HeldRing()
    pipeline, stop, thread = started(procfs, ring)
    ring.held = True  # the process's last launches are in the ring buffer, not read yet
    ring.records.append(launch_record(PID, HANDLE))
    del procfs.running[PID]
    assert ring.deselected.wait(5)  # discovery noticed the exit
    ring.held = False
    assert wait_for(lambda: pipeline.names.launches_named + pipeline.names.launches_unknown == 1)
    stop.set()
    thread.join(5)
    assert (pipeline.names.launches_named, pipeline.names.launches_unknown) == (1, 0)
    assert pipeline.names._names.get(PID) is None, "forgotten once read"


def test_a_reused_pid_does_not_inherit_the_gone_process_names():
    procfs, ring = FakeProcFS(), HeldRing()
    pipeline, stop, thread = started(procfs, ring)
    ring.held = True
    del procfs.running[PID]
    assert ring.deselected.wait(5)
    procfs.running[PID] = ProcInfo(PID, "workload --tag exits", start_time=2)  # a new process, same pid
    assert wait_for(lambda: PID in pipeline.discovery.tracked_pids())
    ring.records.append(launch_record(PID, HANDLE))  # the same handle value, not a kernel it named
    ring.held = False
    assert wait_for(lambda: pipeline.names.launches_named + pipeline.names.launches_unknown == 1)
    stop.set()
    thread.join(5)
    assert (pipeline.names.launches_named, pipeline.names.launches_unknown) == (0, 1)
