"""The system view around the GPU work: model load, file I/O, /dev/nvidia* opens, off-CPU time.

bpf/sys_probes.bpf.c sends OC_EV_SYS events (opens, coalesced reads, file mmaps, mlocks, long or I/O off-CPU
waits) and keeps aggregates in its sys_* maps. This stage turns them into:
- one `process.model_load` span per traced process: from its start (or first sight) to its first kernel launch,
  a root in the process's own trace, with files opened, bytes read and mapped by file kind, time blocked on I/O,
  and the CUDA allocations and host-to-device bytes of that window;
- metrics read from the kernel aggregates at collection time (exact when the ring buffer overflows):
  `process.disk.io`, `process.context_switches`, `cuda.thread.off_cpu.time`, `cuda.device.opens`;
- archive records (`sys_record`).

The window's end is the first launch's entry time; the span is emitted `settle_s` after that launch was seen, so
that reads the kernel still coalesces, and events of other CPUs still in the ring buffer, are counted.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace import SpanKind

from . import probes
from .events import EV_CALL, EV_LAUNCH, EV_SYS, Event
from .records import SCHEMA_VERSION, moved_bytes

log = logging.getLogger(__name__)

# enum oc_sys_kind (bpf/otel_cuda.h) -> the archive's `func`
SYS_KINDS = {1: "openat", 2: "read", 3: "mmap", 4: "munmap", 5: "mlock", 6: "munlock", 7: "device_open",
             8: "offcpu", 9: "write"}
SYS_ID = {name: i for i, name in SYS_KINDS.items()}
FILE_KINDS = ("other", "weights", "library", "device", "unknown")  # enum oc_file_kind
OFFCPU_CLASSES = ("preempted", "sleep", "io")  # enum oc_offcpu_class: off_cpu.reason
_SWITCH_TYPE = ("involuntary", "voluntary", "voluntary")  # process.context_switch.type per class
_STATES = {0: "R", 0x100: "R+", 0x1: "S", 0x2: "D", 0x4: "T", 0x8: "t", 0x10: "X", 0x20: "Z", 0x40: "P", 0x80: "I"}
# args (a0..a3) per kind; "" = unused
SYS_ARGS = {
    "openat": ("fd", "flags", "file_kind", "dirfd"),
    "device_open": ("fd", "flags", "file_kind", "dirfd"),
    "read": ("fd", "bytes", "calls", "file_kind"),
    "mmap": ("fd", "bytes", "file_kind", "prot_flags"),
    "munmap": ("addr", "bytes", "file_kind", ""),
    "mlock": ("addr", "bytes", "flags", ""),
    "munlock": ("addr", "bytes", "", ""),
    "offcpu": ("class", "state", "", ""),
}
# what a call is, from the probe table: a runtime call counts as what it does (the driver call under it is nested)
_RUNTIME_LAUNCH = frozenset(f for f in probes.LAUNCH_TYPE if probes.BY_ID[f].layer == probes.RUNTIME)
_ALLOCATING = probes.ALLOCS
_COPIES = {p.func_id: p for p in probes.PROBES if p.copies}
MAX_WINDOW_ITEMS = 1_000_000  # per process: beyond this the window's tallies are marked truncated
MAX_WINDOWS = 4096  # processes whose model-load result is kept


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _kind(v: int) -> str:
    return FILE_KINDS[v] if 0 <= v < len(FILE_KINDS) else str(v)


def _result(res: int) -> str:
    if res >= 0 or res < -4095:
        return "ok"
    return errno.errorcode.get(-res, f"E{-res}")


def sys_record(ev: Event, epoch_offset_ns: int) -> dict:
    """One archive record (docs/archive-format.md, type `sys`) for an OC_EV_SYS event."""
    func = SYS_KINDS.get(ev.func, f"sys_{ev.func}")
    a0, a1, a2, a3 = ev.args
    res = _s64(ev.result)
    args: dict = {}
    if func in ("openat", "device_open"):
        args = {"path": ev.name, "flags": a1, "file_kind": _kind(a2)}
        if res >= 0:
            args["fd"] = res
    elif func == "read":
        args = {"path": ev.name, "fd": a0, "bytes": a1, "calls": a2, "file_kind": _kind(a3)}
    elif func == "mmap":
        args = {"path": ev.name, "fd": _s64(a0) if a0 >= 1 << 31 else a0, "bytes": a1, "file_kind": _kind(a2),
                "addr": "0x%x" % res if res >= 0 else None, "prot": a3 & 0xFFFFFFFF, "flags": a3 >> 32}
    elif func == "munmap":
        args = {"path": ev.name, "addr": "0x%x" % a0, "bytes": a1, "file_kind": _kind(a2)}
    elif func in ("mlock", "munlock"):
        args = {"addr": "0x%x" % a0, "bytes": a1}
        if a2:
            args["flags"] = a2
    elif func == "offcpu":
        cls = OFFCPU_CLASSES[a0] if a0 < len(OFFCPU_CLASSES) else str(a0)
        args = {"reason": cls, "switch_type": _SWITCH_TYPE[a0] if a0 < 3 else "voluntary",
                "state": _STATES.get(a1, hex(a1))}
    return {"v": SCHEMA_VERSION, "type": "sys", "ts": ev.ts_ns + epoch_offset_ns, "mono_ns": ev.ts_ns, "pid": ev.pid,
            "tid": ev.tid, "func": func, "phase": "call", "dur_ns": ev.dur_ns,
            "result": None if func == "offcpu" else _result(res), "args": args}


def start_ticks(pid: int, proc: str = "/proc") -> int:
    """Field 22 of /proc/PID/stat: the process's start, clock ticks since boot (0 if unreadable)."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def process_start_mono_ns(pid: int, ticks: int = 0, proc: str = "/proc") -> int | None:
    """A process's start on CLOCK_MONOTONIC (the clock of bpf_ktime_get_ns), from field 22 of /proc/PID/stat
    (clock ticks since boot, CLOCK_BOOTTIME: it counts suspended time, which CLOCK_MONOTONIC does not)."""
    ticks = ticks or start_ticks(pid, proc)
    if not ticks:
        return None
    suspended = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK") - max(0, suspended)


def _thread_of_another(pid: int, proc: str = "/proc") -> bool:
    try:
        with open(f"{proc}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1]) != pid
    except (OSError, ValueError, IndexError):
        pass
    return False


@dataclass
class Window:
    """One process's model-load window and what happened in it (items tallied when it closes)."""

    pid: int
    start_ns: int
    start_source: str  # process_start | first_sight
    traced_from_ns: int  # when tracing of the process began (CLOCK_MONOTONIC)
    end_ns: int | None = None  # first launch (entry time)
    ended_by: str = ""
    close_after: float | None = None  # time.monotonic() at which it may close
    items: list = field(default_factory=list)  # (ts, tag, file kind, bytes, ns, path)
    truncated: bool = False
    result: dict | None = None
    ticks: int = 0  # start in clock ticks since boot: tells a reused pid apart


class SystemView:
    """The system stage. Thread-safe: events arrive on the pipeline thread, process exits on discovery's."""

    def __init__(self, tracers, clock, meter: Meter | None, kernel_maps, settle_s: float = 1.0,
                 max_files: int = 32, max_thread_series: int = 32, proc: str = "/proc",
                 now: Callable[[], float] = time.monotonic):
        self.tracers = tracers
        self.clock = clock
        self.kernel_maps = kernel_maps
        self.settle_s = settle_s
        self.max_files = max_files
        self.max_thread_series = max_thread_series
        self.proc = proc
        self._now = now
        self._lock = threading.Lock()
        self.windows: dict[int, Window] = {}
        self._open: dict[int, Window] = {}  # windows not yet closed
        self.cuda_threads: dict[int, dict[int, None]] = {}  # pid -> tids that made CUDA calls, in order seen
        self._retired_stats: dict[tuple, dict] = {}
        self._retired_offcpu: dict[tuple, dict] = {}
        self.spans = 0
        if meter is not None:
            meter.create_observable_counter("process.disk.io", [self._observe_disk_io], unit="By",
                                            description="Bytes read and written through read/write calls on files "
                                                        "the process opened while traced, by file kind")
            meter.create_observable_counter("process.context_switches", [self._observe_switches],
                                            unit="{context_switch}",
                                            description="Context switches of the process's threads while traced")
            meter.create_observable_counter("cuda.thread.off_cpu.time", [self._observe_off_cpu], unit="s",
                                            description="Time the threads that call CUDA spent off CPU, by reason")
            meter.create_observable_counter("cuda.device.opens", [self._observe_device_opens], unit="{open}",
                                            description="Successful opens of /dev/nvidia* device files")

    # -- observer interface ------------------------------------------------------------------------------
    def on_process(self, info) -> None:
        if _thread_of_another(info.pid, self.proc):
            return  # a thread id announced as a process: its process has the window
        ticks = getattr(info, "start_time", 0) or start_ticks(info.pid, self.proc)
        with self._lock:
            w = self.windows.get(info.pid)
            if w is None or (info.pid not in self._open and ticks and w.ticks and ticks != w.ticks):  # a new process
                self._new_window(info.pid, time.monotonic_ns(), ticks)

    def on_events(self, batch: Iterable[tuple[Event, str | None, int | None]]) -> None:
        # The hot path (tens of thousands of launches a second): a launch of a process whose window is closed
        # costs two dict lookups; CUDA threads are learnt from the other calls (a launching thread also syncs).
        with self._lock:
            open_, windows, threads = self._open, self.windows, self.cuda_threads
            for ev, _kernel, _step in batch:
                t, pid = ev.type, ev.pid
                w = open_.get(pid) if open_ else None
                if w is None:
                    if pid in windows:
                        if t == EV_CALL:
                            self._note_thread(threads, pid, ev.tid)
                        continue  # its window is closed: later events are outside it
                    w = self._new_window(pid, ev.ts_ns, 0)
                elif ev.ts_ns < w.start_ns:  # seen before it was announced (a traced parent's child)
                    w.start_ns = ev.ts_ns
                if t == EV_LAUNCH or (t == EV_CALL and ev.func in _RUNTIME_LAUNCH):
                    self._launched(w, ev.ts_ns)
                elif t == EV_SYS:
                    self._add_sys(w, ev)
                elif t == EV_CALL:
                    self._note_thread(threads, pid, ev.tid)
                    if not ev.nested:
                        self._add_call(w, ev)
            self._close_due(self._now())

    def on_launches(self, run) -> None:
        """on_events for a run of plain launches (LaunchRun): a process's first launch ends its window."""
        with self._lock:
            pids = {key[0] for key in run.groups}
            if not any(pid in self._open or pid not in self.windows for pid in pids):
                return  # every window of these processes is closed (the usual case)
            for pid, first_ns in run.first_ns_by_pid().items():
                w = self._open.get(pid)
                if w is None:
                    if pid in self.windows:
                        continue
                    w = self._new_window(pid, first_ns, 0)
                elif first_ns < w.start_ns:
                    w.start_ns = first_ns
                self._launched(w, first_ns)
            self._close_due(self._now())

    def _launched(self, w: Window, ts_ns: int) -> None:
        """A launch ends the window at the process's first one; the window closes settle_s later."""
        if w.end_ns is None or ts_ns < w.end_ns:
            if w.end_ns is None:
                w.close_after = self._now() + self.settle_s
            w.end_ns, w.ended_by = ts_ns, "first_launch"

    @staticmethod
    def _note_thread(threads: dict, pid: int, tid: int) -> None:
        tids = threads.get(pid)
        if tids is None:
            tids = threads[pid] = {}
        if tid not in tids:
            tids[tid] = None

    def on_idle(self, now_ns: int) -> None:
        with self._lock:
            self._close_due(self._now())

    def on_process_exit(self, info) -> None:
        pid = info.pid
        with self._lock:
            w = self._open.get(pid)
            if w is not None and w.end_ns is None:
                w.end_ns, w.ended_by = time.monotonic_ns(), "exit"
                w.close_after = self._now() + self.settle_s
            self._retire(pid)
        self._forget_kernel_entries(pid)

    def shutdown(self) -> None:
        """Close every open window (spans of processes that never launched end now)."""
        with self._lock:
            for w in list(self._open.values()):
                if w.end_ns is None:
                    w.end_ns, w.ended_by = time.monotonic_ns(), "shutdown"
                w.close_after = 0.0
            self._close_due(float("inf"))

    # -- queries -----------------------------------------------------------------------------------------
    def model_load(self, pid: int) -> dict | None:
        """What the process did in its model-load window (closed or not yet): see _tally."""
        with self._lock:
            w = self.windows.get(pid)
            if w is None:
                return None
            return w.result if w.result is not None else self._tally(w)

    def off_cpu(self, pid: int) -> dict[int, dict]:
        """tid -> {reason: ns}, {reason_switches: n} for every thread of the process seen off CPU."""
        out: dict[int, dict] = {}
        for (p, tid, cls), v in self._offcpu().items():
            if p != pid:
                continue
            row = out.setdefault(tid, {f"{c}_ns": 0 for c in OFFCPU_CLASSES} | {f"{c}_switches": 0 for c in OFFCPU_CLASSES})
            name = OFFCPU_CLASSES[cls] if cls < len(OFFCPU_CLASSES) else str(cls)
            row[f"{name}_ns"] = row.get(f"{name}_ns", 0) + v["ns"]
            row[f"{name}_switches"] = row.get(f"{name}_switches", 0) + v["count"]
        return out

    # -- windows -----------------------------------------------------------------------------------------
    def _new_window(self, pid: int, seen_ns: int, ticks: int) -> Window:
        ticks = ticks or start_ticks(pid, self.proc)
        start = process_start_mono_ns(pid, ticks, self.proc)
        source = "process_start"
        if start is None or start > seen_ns:
            start, source = seen_ns, "first_sight"
        self.windows.pop(pid, None)  # a reused pid's old window goes (re-inserted last: oldest first below)
        w = self.windows[pid] = self._open[pid] = Window(pid, start, source, seen_ns, ticks=ticks)
        if len(self.windows) > MAX_WINDOWS:  # keep the newest closed ones for model_load()
            for old in [p for p in self.windows if p not in self._open][: len(self.windows) - MAX_WINDOWS]:
                del self.windows[old]
        return w

    def _add_sys(self, w: Window, ev: Event) -> None:
        func = SYS_KINDS.get(ev.func)
        a0, a1, a2, a3 = ev.args
        res = _s64(ev.result)
        if func in ("openat", "device_open"):
            if res >= 0:
                item = (ev.ts_ns, "open", a2, 0, 0, ev.name)
            else:
                return
        elif func == "read":
            item = (ev.ts_ns, "read", a3, a1, ev.dur_ns, ev.name)
        elif func == "mmap":
            item = (ev.ts_ns, "map", a2, a1, 0, ev.name)
        elif func == "mlock" and res == 0:
            item = (ev.ts_ns, "mlock", 0, a1, 0, "")
        elif func == "offcpu" and a0 == 2:
            item = (ev.ts_ns, "io", 0, 0, ev.dur_ns, "")
        else:
            return
        self._add(w, item)

    def _add_call(self, w: Window, ev: Event) -> None:
        if ev.has_return and ev.result != 0:
            return
        f = ev.func
        if f in _ALLOCATING:
            self._add(w, (ev.ts_ns, "alloc", 0, ev.args[1], 0, ""))
        elif f in _COPIES and _COPIES[f].direction(ev.args) == "htod":
            self._add(w, (ev.ts_ns, "htod", 0, moved_bytes(ev), 0, ""))

    @staticmethod
    def _add(w: Window, item: tuple) -> None:
        if len(w.items) < MAX_WINDOW_ITEMS:
            w.items.append(item)
        else:
            w.truncated = True

    def _close_due(self, now: float) -> None:
        if not self._open:
            return
        for pid, w in list(self._open.items()):
            if w.close_after is not None and now >= w.close_after:
                del self._open[pid]
                w.result = self._tally(w)
                w.items = []
                try:
                    self._emit(w.result)
                except Exception:  # noqa: BLE001 - a stage boundary: one bad span must not stop the pipeline
                    log.exception("model-load span of process %d", pid)

    def _tally(self, w: Window) -> dict:
        end = w.end_ns
        files: dict[str, list] = {}  # path -> [kind, bytes read, bytes mapped, first ts]
        opened: Counter = Counter()
        read: Counter = Counter()
        mapped: Counter = Counter()
        n = {"read_ns": 0, "io_wait_ns": 0, "mlocked_bytes": 0, "cuda_allocations": 0, "cuda_allocated_bytes": 0,
             "htod_bytes": 0}
        for ts, tag, kind, nbytes, ns, path in w.items:
            if end is not None and ts >= end:
                continue
            k = _kind(kind)
            if tag in ("open", "read", "map") and path:
                f = files.get(path)
                if f is None:
                    f = files[path] = [k, 0, 0, ts]
                f[3] = min(f[3], ts)
            if tag == "open":
                opened[k] += 1
            elif tag == "read":
                read[k] += nbytes
                n["read_ns"] += ns
                if path:
                    files[path][1] += nbytes
            elif tag == "map":
                mapped[k] += nbytes
                if path:
                    files[path][2] += nbytes
            elif tag == "io":
                n["io_wait_ns"] += ns
            elif tag == "mlock":
                n["mlocked_bytes"] += nbytes
            elif tag == "alloc":
                n["cuda_allocations"] += 1
                n["cuda_allocated_bytes"] += nbytes
            elif tag == "htod":
                n["htod_bytes"] += nbytes
        top = sorted(files.items(), key=lambda kv: (-(kv[1][1] + kv[1][2]), kv[1][3]))
        return {
            "pid": w.pid, "start_ns": w.start_ns, "end_ns": end, "start_source": w.start_source,
            "ended_by": w.ended_by or "open", "traced_after_ns": max(0, w.traced_from_ns - w.start_ns),
            "files_opened": sum(opened.values()), "files_opened_by_kind": dict(opened),
            "device_opens": opened.get("device", 0),
            # the model: weights files (libraries and device mappings are in the by-kind tallies and the totals)
            "bytes_read": read.get("weights", 0), "bytes_mapped": mapped.get("weights", 0),
            "bytes_read_by_kind": dict(read), "bytes_mapped_by_kind": dict(mapped),
            "bytes_read_total": sum(read.values()), "bytes_mapped_total": sum(mapped.values()),
            **n, "truncated": w.truncated,
            "files": [{"path": p, "kind": k, "bytes_read": r, "bytes_mapped": m, "first_ns": t}
                      for p, (k, r, m, t) in top[: self.max_files]],
            "files_total": len(files),
        }

    def _emit(self, r: dict) -> None:
        offset = self.clock.offset()
        attrs = {
            "model_load.ended_by": r["ended_by"], "model_load.start_source": r["start_source"],
            "model_load.traced_after": r["traced_after_ns"] / 1e9,
            "model_load.files_opened": r["files_opened"], "model_load.device_opens": r["device_opens"],
            "model_load.bytes_read": r["bytes_read"], "model_load.bytes_mapped": r["bytes_mapped"],
            "model_load.read_time": r["read_ns"] / 1e9, "model_load.io_wait": r["io_wait_ns"] / 1e9,
            "model_load.mlocked_bytes": r["mlocked_bytes"],
            "cuda.memory.allocations": r["cuda_allocations"], "cuda.memory.allocated_bytes": r["cuda_allocated_bytes"],
            "cuda.memcpy.htod_bytes": r["htod_bytes"],
        }
        for key, per_kind in (("files_opened", r["files_opened_by_kind"]), ("bytes_read", r["bytes_read_by_kind"]),
                              ("bytes_mapped", r["bytes_mapped_by_kind"])):
            for kind, v in per_kind.items():
                attrs[f"model_load.{key}.{kind}"] = v
        if r["truncated"]:
            attrs["model_load.truncated"] = True
        tracer = self.tracers.tracer(r["pid"])
        span = tracer.start_span("process.model_load", kind=SpanKind.INTERNAL, start_time=r["start_ns"] + offset,
                                 context=trace.set_span_in_context(trace.INVALID_SPAN), attributes=attrs)
        for f in r["files"]:
            span.add_event("file", {"file.path": f["path"], "otel_cuda.file.kind": f["kind"],
                                    "model_load.bytes_read": f["bytes_read"],
                                    "model_load.bytes_mapped": f["bytes_mapped"]},
                           timestamp=max(f["first_ns"], r["start_ns"]) + offset)
        span.end(end_time=max(r["end_ns"], r["start_ns"]) + offset)
        self.spans += 1

    # -- kernel aggregates ---------------------------------------------------------------------------------
    def _table(self, name: str):
        try:
            return self.kernel_maps.table(name)
        except (KeyError, AttributeError):
            return None

    def _stats(self) -> dict[tuple, dict]:
        """(pid, sys kind, file kind) -> calls, errors, bytes, ns (kernel, with gone processes' last totals)."""
        out = dict(self._retired_stats)
        table = self._table("sys_stats")
        for key, v in (table.items() if table is not None else ()):
            out[(key.pid, key.func, key.file_kind)] = {"calls": v.calls, "errors": v.errors, "bytes": v.bytes, "ns": v.ns}
        return out

    def _offcpu(self) -> dict[tuple, dict]:
        """(pid, tid, class) -> ns, count."""
        out = dict(self._retired_offcpu)
        table = self._table("sys_offcpu")
        for key, v in (table.items() if table is not None else ()):
            out[(key.pid, key.tid, key.cls)] = {"ns": v.ns, "count": v.count}
        return out

    def _retire(self, pid: int) -> None:
        """Keep a gone process's totals: its kernel entries are freed for new processes."""
        self._retired_stats.update({k: v for k, v in self._stats().items() if k[0] == pid})
        self._retired_offcpu.update({k: v for k, v in self._offcpu().items() if k[0] == pid})

    def _forget_kernel_entries(self, pid: int) -> None:
        for name in ("sys_stats", "sys_offcpu", "sys_fds", "sys_maps"):
            self._delete_where(name, lambda k, v: k.pid == pid)
        for name in ("sys_inflight", "sys_pending", "sys_offcpu_start"):
            self._delete_where(name, lambda k, v: v.pid == pid)

    def _delete_where(self, name: str, match) -> None:
        table = self._table(name)
        if table is None:
            return
        try:
            doomed = [k for k, v in table.items() if match(k, v)]
        except Exception:  # noqa: BLE001 - a map the program lacks, or one changing under us
            log.debug("reading %s", name, exc_info=True)
            return
        for k in doomed:
            try:
                del table[k]
            except KeyError:
                pass

    # -- metrics (collection thread) ---------------------------------------------------------------------
    def _observe_disk_io(self, _options: CallbackOptions) -> Iterable[Observation]:
        for (pid, func, kind), agg in self._stats().items():
            if func in (SYS_ID["read"], SYS_ID["write"]) and kind != 3:  # a device's read/write is no disk I/O
                yield Observation(agg["bytes"], {"process.pid": pid, "otel_cuda.file.kind": _kind(kind),
                                                 "disk.io.direction": "read" if func == SYS_ID["read"] else "write"})

    def _observe_device_opens(self, _options: CallbackOptions) -> Iterable[Observation]:
        """Every traced process has a series, 0 until it opens a device: "no GPU device opened" is an answer."""
        opens: Counter = Counter({pid: 0 for pid in self.windows})
        for (pid, func, kind), agg in self._stats().items():
            if func == SYS_ID["openat"] and kind == 3:
                opens[pid] += agg["calls"] - agg["errors"]
        for pid, n in opens.items():
            yield Observation(n, {"process.pid": pid})

    def _observe_switches(self, _options: CallbackOptions) -> Iterable[Observation]:
        by: Counter = Counter()
        for (pid, _tid, cls), v in self._offcpu().items():
            by[(pid, _SWITCH_TYPE[cls] if cls < 3 else "voluntary")] += v["count"]
        for (pid, kind), n in by.items():
            yield Observation(n, {"process.pid": pid, "process.context_switch.type": kind})

    def _observe_off_cpu(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:  # the first threads seen get a series each; later ones share one (no thread.id)
            cuda = {pid: (set(tids), set(list(tids)[: self.max_thread_series])) for pid, tids in self.cuda_threads.items()}
        by: Counter = Counter()
        for (pid, tid, cls), v in self._offcpu().items():
            tids, named = cuda.get(pid, ((), ()))
            if tid in tids:
                by[(pid, tid if tid in named else None, cls)] += v["ns"]
        for (pid, tid, cls), ns in by.items():
            attrs = {"process.pid": pid, "process.context_switch.type": _SWITCH_TYPE[cls] if cls < 3 else "voluntary",
                     "otel_cuda.off_cpu.reason": OFFCPU_CLASSES[cls] if cls < 3 else str(cls)}
            if tid is not None:
                attrs["thread.id"] = tid
            yield Observation(ns / 1e9, attrs)
