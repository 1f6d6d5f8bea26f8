"""build(): wires the stages with named queues; Pipeline.run(stop) runs them until stop is set.

    ring buffer ─▶ RingReader ─▶ on_events / on_launches: names ─▶ steps ─▶ events_to_archive ─▶ archive
                                                          │         └──▶ steps_to_spans ─▶ spans / join
                                                          └──▶ metrics (per-event instruments; the rest from maps)

Most events are kernel launches probed at entry; the reader hands a run of them over as one array, and
on_launches does for the run, per (pid, thread, function, handle) group, what on_events does per event.
    discovery ─▶ select / attach / detach in the kernel

A disabled stage is a pass-through object with the same interface (NullArchive, NullTelemetry), not an `if`.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from . import events as ev_mod
from . import probes as probe_table
from .clock import MonotonicToEpoch
from .discovery import LIBCUDA, LIBCUDA_OR_RUNTIME, LIBCUDART, Discovery, Library, ProcInfo
from .events import Event, LaunchRun
from .names import UNKNOWN, KernelNames
from .records import launch_line, launch_run_text, record_line, symbol, to_record
from .source import RingReader
from .steps import Step, StepTracker
from .system import sys_record

log = logging.getLogger(__name__)
_RUNTIME_KERNEL_LAUNCH = frozenset(f for f in probe_table.KERNEL_LAUNCHES if probe_table.BY_ID[f].layer == probe_table.RUNTIME)


class ArchiveSink(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...
    def stats(self) -> dict: ...


class Observer(Protocol):
    """What the telemetry stage takes from the pipeline (metrics, spans, join)."""

    def on_events(self, batch: list[tuple[Event, str | None, int | None]]) -> None: ...
    def on_launches(self, run: LaunchRun) -> None: ...
    def on_step(self, step: Step) -> None: ...
    def on_outlier(self, ev: Event, kernel: str | None) -> None: ...
    def on_process(self, info: ProcInfo) -> None: ...
    def on_process_exit(self, info: ProcInfo) -> None: ...
    def before_forget(self, pid: int) -> None: ...
    def on_idle(self, now_ns: int) -> None: ...
    def shutdown(self) -> None: ...


class NullArchive:
    enabled = False  # the pipeline builds no record for it and queues nothing
    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


class NullObserver:
    def on_events(self, batch):
        pass

    def on_launches(self, run):
        pass

    def on_step(self, step):
        pass

    def on_outlier(self, ev, kernel):
        pass

    def on_process(self, info):
        pass

    def on_process_exit(self, info):
        pass

    def before_forget(self, pid):
        pass

    def on_idle(self, now_ns):
        pass

    def shutdown(self):
        pass


@dataclass
class Totals:
    """What the sidecar saw, for the exit summary and the demo's report."""

    calls: Counter = field(default_factory=Counter)  # function -> events processed
    by_pid: Counter = field(default_factory=Counter)  # (pid, function) -> events processed
    errors: Counter = field(default_factory=Counter)
    dur_ns: Counter = field(default_factory=Counter)
    bytes_moved: int = 0
    names_unread: int = 0  # name records whose name the probe could not read (user space tried the process)
    steps: int = 0
    archived: int = 0
    dropped_queue: int = 0


class Pipeline:
    """The stages and the edges between them; build() wires it."""

    names: KernelNames
    steps: StepTracker
    reader: RingReader
    discovery: Discovery

    def __init__(self, probes, archive: ArchiveSink, observer: Observer, clock: MonotonicToEpoch,
                 attach_set: tuple[tuple, tuple], archive_queue_size: int = 65536):
        self.probes = probes
        self.archive = archive
        self.observer = observer
        self.clock = clock
        self.attach_set = attach_set  # (probes for libcuda, probes for libcudart)
        self.totals = Totals()
        # one item per ring-buffer batch, (epoch offset, [(event, kernel, step)]), or a record of another stage;
        # bounded in events (batches are 1 to thousands of events, as the load goes)
        self.events_to_archive: queue.Queue = queue.Queue()
        self._archive_limit = archive_queue_size
        self._archive_backlog = 0  # events queued for the archive thread
        self._backlog_lock = threading.Lock()
        self._archiving = getattr(archive, "enabled", True)
        self.ready = threading.Event()
        self._stopped = False
        self._exits: list[ProcInfo] = []  # gone processes whose names and steps the consumer has yet to forget
        self._exits_lock = threading.Lock()
        # A gone process's kernel aggregates are deleted this long after its exit (its totals were kept by the
        # observer at exit), so the maps do not fill over restarts; until then its counts can still be read.
        self.kernel_entry_grace_s = 60.0
        self._kernel_entries_due: dict[int, float] = {}  # pid -> when its kernel entries go
        self._nested_launch: dict[int, tuple[int, str | None]] = {}  # tid -> (ts, kernel) of a launch under a runtime call

    # -- discovery callbacks ------------------------------------------------------------------------------
    def on_select(self, info: ProcInfo) -> None:
        with self._exits_lock:  # a pid reused before the consumer forgot its last owner: forget it now
            reused = [e for e in self._exits if e.pid == info.pid]
            self._exits = [e for e in self._exits if e.pid != info.pid]
        self._forget(reused)
        self.probes.select(info.pid)
        log.info("tracing process %d: %s", info.pid, info.cmdline[:120])
        self.observer.on_process(info)

    def on_exit(self, info: ProcInfo) -> None:
        """Discovery's thread: stop tracing and keep the process's totals now; forget its kernel names and steps
        only once the consumer has read what it left in the ring buffer (its last launches still need names)."""
        self.probes.deselect(info.pid)
        log.info("process %d exited", info.pid)
        self.observer.on_process_exit(info)
        with self._exits_lock:
            self._exits.append(info)

    def _take_exits(self) -> list[ProcInfo]:
        with self._exits_lock:
            exits, self._exits = self._exits, []
        return exits

    def _forget(self, exits: list[ProcInfo]) -> None:
        for info in exits:
            self.steps.forget_process(info.pid)
            self.observer.before_forget(info.pid)  # metrics name its last launches while the names are there
            self.names.forget(info.pid)
            self._kernel_entries_due[info.pid] = time.monotonic() + self.kernel_entry_grace_s

    def _free_kernel_entries(self) -> None:
        now = time.monotonic()
        # list() copies in one step: on_select (discovery's thread) may add a reused pid meanwhile
        due = {pid for pid, t in list(self._kernel_entries_due.items()) if t <= now}
        if not due:
            return
        for pid in due:
            self._kernel_entries_due.pop(pid, None)
        # a pid traced again meanwhile owns its entries now (they add up across both: counters stay monotonic)
        due -= self.discovery.tracked_pids()
        if due:
            try:
                self.probes.forget_processes(due)
            except Exception:  # noqa: BLE001 - the maps fill sooner; the consumer must go on
                log.exception("could not free the kernel entries of gone processes %s", sorted(due))

    def on_library(self, lib: Library) -> None:
        try:
            probes = self.attach_set[LIBCUDART.search(lib.mapped_path) is not None]
            missing = self.probes.attach_library(lib.identity, lib.path, probes)
        except Exception as exc:
            self.discovery.counters.attach_failures += 1
            log.error("cannot attach to %s: %s", lib.mapped_path, exc)
            return
        log.info("attached %d probes to %s%s", self.probes.attached_probes, lib.mapped_path,
                 f" (not in this library: {', '.join(missing)})" if missing else "")

    def on_library_unused(self, lib: Library) -> None:
        self.probes.detach_library(lib.identity)
        log.info("detached from %s", lib.mapped_path)

    # -- the hot path: one call per ring-buffer batch ------------------------------------------------------
    def on_events(self, batch: list[Event]) -> None:
        names, steps, totals = self.names, self.steps, self.totals
        offset = self.clock.offset()
        annotated = []
        for ev in batch:
            if ev.type == ev_mod.EV_PROC:
                if ev.func == ev_mod.PROC_FORK:
                    if ev.args[0]:
                        self.discovery.consider(ev.args[0], inherited=True)
                else:
                    self.discovery.consider(ev.pid)
                continue
            if ev.type == ev_mod.EV_SYS:
                annotated.append((ev, None, None))
                continue
            ev = names.observe(ev)
            kernel = names.name_of_launch(ev)
            if ev.type == ev_mod.EV_LAUNCH and ev.nested:
                # its record comes before the runtime launch's (written at the runtime call's return), which
                # carries no CUfunction: the name goes with the runtime launch
                self._nested_launch[ev.tid] = (ev.ts_ns, kernel)
            elif ev.func in _RUNTIME_KERNEL_LAUNCH and ev.type == ev_mod.EV_CALL:
                under = self._nested_launch.pop(ev.tid, None)
                inside = under is not None and ev.ts_ns <= under[0] <= ev.ts_ns + ev.dur_ns
                kernel = under[1] if inside else UNKNOWN
            elif ev.type == ev_mod.EV_NAME and ev.flags & ev_mod.F_NAME_UNREAD:
                totals.names_unread += 1
            step = steps.process(ev, kernel)
            func = symbol(ev)
            totals.calls[func] += 1
            totals.by_pid[(ev.pid, func)] += 1
            if ev.has_return:
                totals.dur_ns[func] += ev.dur_ns
                if ev.result != 0:
                    totals.errors[func] += 1
            annotated.append((ev, kernel, step))
        if self._archiving and annotated:  # one hand-over per batch; the archive thread formats the lines
            self._to_archive((offset, annotated), len(annotated))
        self.observer.on_events(annotated)

    def on_launches(self, rows) -> None:
        """on_events for a run of plain launches (source.py): the same names, steps, counts, archive lines and
        observations, worked out once per (pid, thread, function, handle) group instead of once per launch."""
        run = LaunchRun(rows)
        offset = self.clock.offset()
        groups = run.groups = Counter(run.keys)
        names, calls, by_pid = self.names, self.totals.calls, self.totals.by_pid
        per_thread: dict[tuple[int, int], list] = {}  # (pid, tid) -> [(kernel, launches)]
        for key, n in groups.items():
            pid, tid, func, handle = key
            kernel = run.kernels[key] = names.name_of_launches(pid, func, handle, n)
            per_thread.setdefault((pid, tid), []).append((kernel, n))
            func_name = probe_table.BY_ID[func].symbol
            calls[func_name] += n
            by_pid[(pid, func_name)] += n
        ts = run.rows["ts"]
        for (pid, tid), kernels in per_thread.items():
            mine = ts if len(per_thread) == 1 else ts[run.rows["tid"] == tid]
            n = sum(k for _, k in kernels)
            run.steps[tid] = self.steps.launches(pid, tid, int(mine[0]), int(mine[-1]), int(mine.max()), n, kernels)
        if self._archiving:
            self._to_archive((offset, run), len(run))
        self.observer.on_launches(run)

    def on_step(self, step: Step) -> None:
        self.totals.steps += 1
        self.observer.on_step(step)

    # -- threads ----------------------------------------------------------------------------------------
    def _archive_loop(self) -> None:
        write_text = getattr(self.archive, "write_text", None)
        while True:
            item = self.events_to_archive.get()
            if item is None:  # close(): everything queued before it has been written
                return
            n = 1 if isinstance(item, dict) else len(item[1])  # a record, or (offset, events or a LaunchRun)
            with self._backlog_lock:
                self._archive_backlog -= n
            try:
                if isinstance(item, dict):  # a record of another stage (the join's request records)
                    self.archive.write(item)
                elif write_text is not None:
                    write_text("".join(self._lines(*item)), n)
                else:
                    for rec in self._records(*item):
                        self.archive.write(rec)
                self.totals.archived += n
            except Exception:
                log.exception("archive write failed; the records are counted as dropped")
                self.totals.dropped_queue += n

    def _to_archive(self, item, n: int) -> None:
        with self._backlog_lock:
            if self._archive_backlog + n > self._archive_limit:
                self.totals.dropped_queue += n
                return
            self._archive_backlog += n
        self.events_to_archive.put_nowait(item)

    @staticmethod
    def _records(offset: int, annotated):
        if isinstance(annotated, LaunchRun):
            yield from map(json.loads, launch_run_text(offset, annotated).splitlines())
            return
        for ev, kernel, step in annotated:
            yield sys_record(ev, offset) if ev.type == ev_mod.EV_SYS else to_record(ev, offset, kernel, step)

    @staticmethod
    def _lines(offset: int, annotated) -> list[str]:
        if isinstance(annotated, LaunchRun):
            return [launch_run_text(offset, annotated)]
        out = []
        for ev, kernel, step in annotated:
            line = launch_line(ev, offset, kernel, step)
            if line is None:
                line = record_line(sys_record(ev, offset) if ev.type == ev_mod.EV_SYS
                                   else to_record(ev, offset, kernel, step))
            out.append(line)
        return out

    def archive_record(self, record: dict) -> None:
        """Queue a record from another stage (the join's request records)."""
        self._to_archive(record, 1)

    def start(self) -> None:
        self._archive_thread = threading.Thread(target=self._archive_loop, name="archive", daemon=True)
        self._archive_thread.start()

    def run(self, stop: threading.Event) -> None:
        """Run until stop is set; then drain the ring buffer and close open steps. close() flushes the rest."""
        discovery = threading.Thread(target=self.discovery.run, args=(stop,), name="discovery", daemon=True)
        discovery.start()
        self.ready.set()
        exits: list[ProcInfo] = []
        try:
            while not stop.is_set():
                now = time.monotonic_ns()
                exits = self._take_exits()  # gone before this read, so everything they wrote is read by it
                self.reader.pump(self.reader.poll_ms)
                self._forget(exits)
                exits = []
                self._free_kernel_entries()
                self.steps.tick(now)
                self.observer.on_idle(now)
        finally:
            discovery.join(timeout=5)
            self.reader.drain()
            self._forget(exits + self._take_exits())
            self.steps.close_all()
            self.observer.on_idle(time.monotonic_ns())

    def close(self) -> None:
        """Write what is queued and close the archive. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if getattr(self, "_archive_thread", None) is not None:
            self.events_to_archive.put(None)
            self._archive_thread.join()
        self.archive.close()

    def summary(self) -> dict:
        t = self.totals
        return {
            "calls": dict(t.calls),
            "errors": dict(t.errors),
            "api_time_s": {k: v / 1e9 for k, v in t.dur_ns.items()},
            "steps": t.steps,
            "lost_ringbuf": self.probes.lost(),
            "skipped_by_kernel": self.probes.skipped_runs(),
            "kernel_table_full": self.probes.table_full(),
            "decode_errors": self.reader.counters.decode_errors,
            "dropped_queue": t.dropped_queue,
            "archived": t.archived,
            "launches_named": self.names.launches_named,
            "launches_unknown": self.names.launches_unknown,
            "launches_unknown_by_function": {probe_table.BY_ID[f].symbol: n
                                             for f, n in self.names.unknown_by_func.items()},
            "kernel_names_resolved": self.names.resolved_fraction,
            "kernel_names_truncated": self.names.names_truncated,
            "kernel_names_unread": self.totals.names_unread,
            "processes": self.discovery.counters.processes_seen,
            "archive": self.archive.stats(),
        }


def build(config, probes, procfs, archive: ArchiveSink | None = None, observer: Observer | None = None,
          clock: MonotonicToEpoch | None = None, admit=lambda pid: True) -> Pipeline:
    """Wire the stages. `probes` is a loaded bpf.Probes (or a double with the same methods)."""
    p = Pipeline(probes, archive or NullArchive(), observer or NullObserver(), clock or MonotonicToEpoch(),
                 attach_set=(probe_table.DRIVER_PROBES, probe_table.RUNTIME_PROBES))
    p.names = KernelNames()
    p.steps = StepTracker(config.steps, on_step=p.on_step, on_outlier=p.observer.on_outlier)
    p.reader = RingReader(probes.read_batch, probes.settled, probes.release, ev_mod.decode, deliver_events=p.on_events,
                          deliver_launches=p.on_launches)
    p.discovery = Discovery(config.selector, procfs, on_select=p.on_select, on_exit=p.on_exit,
                            on_library=p.on_library, on_library_unused=p.on_library_unused,
                            library=LIBCUDA_OR_RUNTIME if config.runtime else LIBCUDA,
                            interval_s=config.discovery_interval_s, detach_grace_s=config.detach_grace_s,
                            admit=admit)
    return p
