"""Discovery off the event path: exec / fork events only queue; scans read each process once, not every scan."""

import threading
import time

from otel_cuda.discovery import Discovery, Library, ProcInfo, Selector

LIB = Library((1, 2), "/proc/1/root/usr/lib/libcuda.so.1", "/usr/lib/libcuda.so.1")


class CountingProcFS:
    def __init__(self, procs):
        self.procs = dict(procs)  # pid -> cmdline
        self.full_reads = 0  # info() calls
        self.maps_reads = 0  # info() calls that read maps
        self.cmdline_reads = 0
        self.libraries = {}  # pid -> the libraries its maps show (default: LIB for an "engine")
        self.gate = threading.Event()
        self.gate.set()

    def pids(self):
        return list(self.procs)

    def info(self, pid, library):
        self.gate.wait()
        if pid not in self.procs:
            return None
        self.full_reads += 1
        self.maps_reads += library is not None
        libs = self.libraries.get(pid, (LIB,) if "engine" in self.procs[pid] else ()) if library is not None else ()
        return ProcInfo(pid, self.procs[pid], (), 1, libs)

    def cmdline(self, pid):
        self.cmdline_reads += 1
        return self.procs.get(pid)


def make(procfs):
    selected, libraries = [], []
    d = Discovery(Selector(match="VLLM::EngineCore|engine"), procfs, on_select=lambda i: selected.append(i.pid),
                  on_exit=lambda i: None, on_library=libraries.append, on_library_unused=lambda lib: None,
                  self_pid=0)  # the test's own pid may be one of the fake ones (CI machines start pids low)
    return d, selected, libraries


def test_a_scan_reads_each_unselected_process_once_and_the_maps_of_selected_ones_only():
    procfs = CountingProcFS({pid: f"/usr/bin/other {pid}" for pid in range(1000, 1500)} | {2000: "python engine"})
    d, selected, libraries = make(procfs)
    d.scan()
    assert selected == [2000] and libraries == [LIB]
    assert procfs.full_reads == 501 + 1 and procfs.maps_reads == 1  # the selected one is read again with its maps
    procfs.full_reads = procfs.maps_reads = 0
    d.scan()
    assert (procfs.full_reads, procfs.maps_reads) == (1, 0), "only the selected process is read again, not its maps"
    procfs.procs[3000] = "/usr/bin/new"
    d.scan()
    assert procfs.full_reads == 1 + 1 + 1  # the selected one, and the new pid once


def test_maps_are_read_every_scan_until_libcuda_is_mapped_then_every_remap_every_scans():
    procfs = CountingProcFS({2000: "python engine"})  # selected by --match, libcuda not loaded yet
    d, _, libraries = make(procfs)
    runtime = Library((1, 3), "/proc/2000/root/usr/lib/libcudart.so.12", "/usr/lib/libcudart.so.12")
    procfs.libraries[2000] = (runtime,)  # the runtime first (torch imports it), the driver at CUDA init
    for _ in range(3):
        d.scan()
    assert procfs.maps_reads == 3 and libraries == [runtime], "no libcuda yet: the maps are read every scan"
    procfs.libraries[2000] = (runtime, LIB)
    d.scan()
    assert libraries == [runtime, LIB]
    procfs.maps_reads = 0
    for _ in range(2 * d.remap_every):
        d.scan()
    assert procfs.maps_reads == 2, "libcuda mapped: maps re-read once every remap_every scans"
    assert d.tracked[2000].libraries == (runtime, LIB), "the libraries stay known between re-reads"


def test_a_process_renamed_without_exec_is_selected_within_a_few_scans():
    procfs = CountingProcFS({4000: "python -c from multiprocessing.spawn import spawn_main"})
    d, selected, _ = make(procfs)
    d.scan()
    procfs.procs[4000] = "VLLM::EngineCore"  # setproctitle: no exec event
    for _ in range(d.rejudge_every):
        d.scan()
    assert selected == [4000]
    assert procfs.cmdline_reads == 1


def test_consider_only_queues_while_a_scan_holds_discovery():
    procfs = CountingProcFS({5000: "python engine"})
    d, selected, _ = make(procfs)
    stop = threading.Event()
    procfs.gate.clear()  # the first scan blocks inside /proc
    runner = threading.Thread(target=d.run, args=(stop,))
    runner.start()
    try:
        consumer = threading.Thread(target=lambda: [d.consider(6000 + pid) for pid in range(10_000)])
        consumer.start()
        consumer.join(10)
        assert not consumer.is_alive(), "the consumer's thread must not wait for a scan"
        assert d.counters.considered == 10_000 and d.counters.considered_dropped == 0
        procfs.procs[7000] = "python engine"
        d.consider(7000)
        procfs.gate.set()
        deadline = time.monotonic() + 5
        while 7000 not in selected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(selected) == [5000, 7000]
    finally:
        stop.set()
        procfs.gate.set()
        runner.join(5)
