"""Events -> engine steps.

An engine step is a burst of kernel launches that ends when the host has the step's result (vLLM: the sampled
tokens). Where the launches are issued and where the host waits for them differ by engine loop, so a step opens on
its launching thread but can be closed by any thread of the process:

* launches on a thread with no open step open one (that thread's step);
* the sampled-token readback — a device->host copy issued on the launching thread — *seals* the step: later
  launches on that thread open the next step, while the sealed one waits for its readback to complete. Copies,
  event records and stream waits issued right after the seal (vLLM copies several tensors) still belong to it;
* the step *closes* at the end of the host wait that covers it:
  - `cuEventSynchronize(E)` on any thread, where E was recorded (cuEventRecord) on the launching thread after the
    step's launches: vLLM's default async-scheduling loop records `copy_event` after the readback copies and its
    output thread waits on it (vllm/v1/worker/gpu/async_utils.py `AsyncOutput`); the synchronous loop records an
    event after the copy and waits on it on the same thread (`_to_list`). Closing also closes the launching
    thread's older sealed steps (same thread, earlier work);
  - `cuStreamSynchronize(S)` on the launching thread (every step of that thread), or on another thread of the
    process for steps whose readback went to stream S; `cuCtxSynchronize` or a synchronous `cuMemcpyDtoH_v2` on
    the launching thread;
  - a wait on an event recorded before the step's launches (vLLM's launching thread waits on the previous step's
    input-copy event at the start of each step) covers no step and closes nothing; a wait on an event never seen
    recorded (the sidecar attached later) closes the waiting thread's own open step only.
* a step left open or waiting longer than `idle_close_ns` is closed by `tick()`, and a thread keeps at most
  `max_waiting` sealed steps (a readback whose wait is never seen must not hold steps forever); `closed_by` says
  which rule closed each step.

What a call is (a launch, a readback, an event record, which wait) comes from the probe table (probes.py), for the
runtime layer as for the driver: cudaLaunchKernel launches, cudaMemcpyAsync(DeviceToHost) reads back,
cudaStreamSynchronize / cudaDeviceSynchronize wait. The driver call under a runtime call is flagged nested and
counts for nothing here (its record comes first, as the runtime call's is written at its return), so a step is
counted once whichever layers are probed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from . import probes
from .events import EV_CALL, EV_LAUNCH, F_NESTED, F_RETURN, Event
from .records import moved_bytes

# Roles from the probe table (both layers)
_LAUNCH = probes.LAUNCH_TYPE  # func -> kernel | cooperative | graph
_GRAPH_LAUNCH = probes.GRAPH_LAUNCHES
_READBACK = probes.READBACKS  # copies that may be a device->host readback (see probes.is_readback)
_SYNC_COPY = frozenset(f for f in _READBACK if probes.BY_ID[f].blocking)  # a readback that waits for its result
_RECORD = probes.RECORDS
_EVENT_SYNC = frozenset(f for f, k in probes.SYNC_KIND.items() if k == "event")
_STREAM_SYNC = frozenset(f for f, k in probes.SYNC_KIND.items() if k == "stream")
_CTX_SYNC = frozenset(f for f, k in probes.SYNC_KIND.items() if k == "context")
# calls that still belong to a sealed step when they follow its readback on the launching thread
_TAIL = _RECORD | probes.STREAM_WAITS
# host-blocking waits (cuStreamWaitEvent only enqueues a device-side wait)
_SYNC = frozenset(probes.SYNC_KIND)
_is_readback = probes.is_readback
_MAX_EVENTS = 1 << 16  # (pid, event) -> step entries kept; torch reuses a few handles, so this is generous


@dataclass(frozen=True)
class StepConfig:
    outlier_ns: int = 1_000_000  # calls at least this slow become spans of their own (DESIGN: 1 ms)
    outlier_bytes: int = 64 << 20  # copies / allocations at least this large too
    idle_close_ns: int = 2_000_000_000
    max_outliers_per_step: int = 16  # span volume stays bounded whatever the workload does
    max_waiting: int = 8  # sealed steps a thread may have waiting for their readback


@dataclass
class Step:
    id: int
    pid: int
    tid: int  # the launching thread
    start_ns: int  # CLOCK_MONOTONIC
    end_ns: int = 0
    launches: int = 0
    graph_launches: int = 0
    memcpy_bytes: int = 0
    api_ns: int = 0  # time inside probed calls with a return (launches are entry-only by default)
    sync_ns: int = 0
    calls: int = 0
    outliers: list = field(default_factory=list)  # (Event, kernel name or None)
    outliers_dropped: int = 0
    kernels: dict = field(default_factory=dict)  # kernel name -> launches in this step
    sealed_ns: int = -1  # when the readback was issued (-1: still launching)
    readback_stream: int = -1
    closed_by: str = ""  # event | stream | context | copy | thread | idle | overflow | exit
    closed_tid: int = 0  # the thread whose wait closed it
    closed: bool = False

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


class StepTracker:
    def __init__(self, config: StepConfig, on_step: Callable[[Step], None], on_outlier: Callable[[Event, str | None], None]):
        self.config = config
        self.on_step = on_step
        self.on_outlier = on_outlier  # outliers outside any step
        self._open: dict[int, Step] = {}  # tid -> its step still launching
        self._waiting: dict[int, deque[Step]] = {}  # tid -> its sealed steps waiting for their readback, oldest first
        self._events: dict[tuple[int, int], Step | None] = {}  # (pid, CUevent) -> the step a wait on it covers
        self._next_id = 1
        self._last_ns: dict[int, int] = {}

    def is_outlier(self, ev: Event) -> bool:
        if not ev.has_return:
            return False
        if ev.dur_ns >= self.config.outlier_ns:
            return True
        p = probes.BY_ID.get(ev.func)
        if p is not None and p.group == "memory" and ev.type == EV_CALL and ev.args[1] >= self.config.outlier_bytes:
            return True
        return moved_bytes(ev) >= self.config.outlier_bytes

    def process(self, ev: Event, kernel: str | None) -> int | None:
        """Account one event; returns the id of the step it belongs to, or None."""
        if ev.type == EV_LAUNCH and not ev.flags & (F_RETURN | F_NESTED) and ev.func not in _GRAPH_LAUNCH:
            return self._launch(ev, kernel)
        tid, func = ev.tid, ev.func
        step = self._open.get(tid)
        if ev.nested:  # the runtime call above it is the one that counts
            return self._account(step, ev, kernel)
        if step is None and func in _LAUNCH and (ev.type == EV_LAUNCH or ev.type == EV_CALL):
            step = self._start(ev.pid, tid, ev.ts_ns)
        end = ev.ts_ns + ev.dur_ns
        self._last_ns[tid] = end
        if not ev.has_return or ev.type != EV_CALL:
            return self._account(step, ev, kernel)
        readback = func in _READBACK and _is_readback(func, ev.args)
        if step is None and (readback or func in _TAIL):
            waiting = self._waiting.get(tid)
            step = waiting[-1] if waiting else None
        if readback and step is not None and step.sealed_ns < 0:
            self._seal(step, ev)
        if func in _RECORD:
            self._remember_event(ev.pid, ev.args[1], step)
            return self._account(step, ev, kernel)
        closing = self._closing(ev, readback)
        if not closing:
            return self._account(step, ev, kernel)
        how, steps = closing
        last = steps[-1]
        self._account(last, ev, kernel)  # the wait belongs to the (youngest) step it completes
        for s in steps:
            self._close(s, end, how, tid)
        return last.id

    # -- accounting ---------------------------------------------------------------------------------------
    def _account(self, step: Step | None, ev: Event, kernel: str | None) -> int | None:
        if ev.nested:  # part of the runtime call above it: its time, bytes and launch are that call's
            return step.id if step is not None else None
        if step is None:
            if self.is_outlier(ev):
                self.on_outlier(ev, kernel)
            return None
        step.calls += 1
        end = ev.ts_ns + ev.dur_ns
        if end > step.end_ns:
            step.end_ns = end
        ltype = _LAUNCH.get(ev.func)
        if ltype == "graph":
            step.graph_launches += 1
        elif ltype is not None:
            step.launches += 1
            if kernel is not None:
                step.kernels[kernel] = step.kernels.get(kernel, 0) + 1
        if ev.has_return:
            step.api_ns += ev.dur_ns
            if ev.func in _SYNC:
                step.sync_ns += ev.dur_ns
        step.memcpy_bytes += moved_bytes(ev)
        if self.is_outlier(ev):
            if len(step.outliers) < self.config.max_outliers_per_step:
                step.outliers.append((ev, kernel))
            else:
                step.outliers_dropped += 1
        return step.id

    def _launch(self, ev: Event, kernel: str | None) -> int:
        """process() for the hot event, a kernel launch probed at entry only: no duration, no bytes, never an
        outlier (a third of the consumer's time per launch went to those checks)."""
        ts = ev.ts_ns
        return self.launches(ev.pid, ev.tid, ts, ts, ts, 1, ((kernel, 1),) if kernel is not None else ())

    def launches(self, pid: int, tid: int, first_ns: int, last_ns: int, max_ns: int, n: int, kernels) -> int:
        """n entry-only launches of one thread in a row (first, last and latest stamps; (kernel, launches)
        pairs): the same as n _launch() calls. Returns the id of the thread's step."""
        step = self._open.get(tid) or self._start(pid, tid, first_ns)
        self._last_ns[tid] = last_ns
        step.calls += n
        if max_ns > step.end_ns:
            step.end_ns = max_ns
        step.launches += n
        counts = step.kernels
        for kernel, k in kernels:
            counts[kernel] = counts.get(kernel, 0) + k
        return step.id

    # -- boundaries ---------------------------------------------------------------------------------------
    def _start(self, pid: int, tid: int, ts_ns: int) -> Step:
        """A launch on a thread with no open step opens one."""
        step = self._open[tid] = Step(self._next_id, pid, tid, ts_ns)
        self._next_id += 1
        return step

    def _seal(self, step: Step, ev: Event) -> None:
        """The readback was issued: the step's launches are over; it waits for the host to see the result."""
        step.sealed_ns = ev.ts_ns
        step.readback_stream = ev.args[3]
        del self._open[step.tid]
        waiting = self._waiting.setdefault(step.tid, deque())
        waiting.append(step)
        if len(waiting) > self.config.max_waiting:
            old = waiting[0]
            self._close(old, old.end_ns, "overflow", step.tid)

    def _remember_event(self, pid: int, event: int, step: Step | None) -> None:
        key = (pid, event)
        self._events.pop(key, None)  # re-recorded: newest last, so the oldest entry is the one evicted
        self._events[key] = step
        if len(self._events) > _MAX_EVENTS:
            del self._events[next(iter(self._events))]

    def _closing(self, ev: Event, readback: bool) -> tuple[str, list[Step]] | None:
        """Which steps the host wait `ev` completes (oldest first), and the rule that says so."""
        func, tid, pid = ev.func, ev.tid, ev.pid
        if func in _EVENT_SYNC:
            key = (pid, ev.args[1])
            if key in self._events:
                step = self._events[key]
                if step is None or step.closed:
                    return None
                return "event", self._thread_steps(step.tid, upto=step)
            open_step = self._open.get(tid)  # recorded before we attached: only this thread's own launches
            return ("thread", [open_step]) if open_step is not None else None
        if func in _STREAM_SYNC:
            stream = ev.args[0]
            steps = self._thread_steps(tid)
            for other, waiting in self._waiting.items():
                match = [s for s in waiting if s.readback_stream == stream and s.pid == pid]
                if other != tid and match:
                    steps += self._thread_steps(other, upto=match[-1])
            return ("stream", steps) if steps else None
        if func in _CTX_SYNC or (readback and func in _SYNC_COPY):
            # A device-wide wait from another thread completes that thread's steps too, but it is the launching
            # thread's own wait or its matched readback that ends them there: leave them to it.
            steps = self._thread_steps(tid)
            return ("context" if func in _CTX_SYNC else "copy", steps) if steps else None
        return None

    def _thread_steps(self, tid: int, upto: Step | None = None) -> list[Step]:
        """A thread's unclosed steps, oldest first (sealed ones, then the open one), up to and including `upto`."""
        steps = list(self._waiting.get(tid, ()))
        if tid in self._open:
            steps.append(self._open[tid])
        if upto is not None:
            steps = steps[:steps.index(upto) + 1] if upto in steps else []
        return steps

    def _process_steps(self, pid: int) -> list[Step]:
        return ([s for w in self._waiting.values() for s in w if s.pid == pid]
                + [s for s in self._open.values() if s.pid == pid])

    def _close(self, step: Step, end_ns: int, how: str, by_tid: int) -> None:
        if step.closed:
            return
        step.closed, step.closed_by, step.closed_tid = True, how, by_tid
        step.end_ns = max(step.end_ns, end_ns)
        if self._open.get(step.tid) is step:
            del self._open[step.tid]
        else:
            waiting = self._waiting.get(step.tid)
            if waiting:
                waiting.remove(step)
                if not waiting:
                    del self._waiting[step.tid]
        self.on_step(step)

    def tick(self, now_ns: int) -> None:
        """Close steps whose thread has been quiet for idle_close_ns, and sealed steps whose readback wait was
        not seen within it."""
        idle = self.config.idle_close_ns
        for step in [s for s in self._open.values() if now_ns - self._last_ns.get(s.tid, s.start_ns) > idle]:
            self._close(step, step.end_ns, "idle", step.tid)
        for step in [s for w in self._waiting.values() for s in w if now_ns - s.sealed_ns > idle]:
            self._close(step, step.end_ns, "idle", step.tid)

    def close_all(self) -> None:
        for step in [s for w in list(self._waiting.values()) for s in w] + list(self._open.values()):
            self._close(step, step.end_ns, "exit", step.tid)

    def forget_process(self, pid: int) -> None:
        for step in self._process_steps(pid):
            self._close(step, step.end_ns, "exit", step.tid)
        for key in [k for k in self._events if k[0] == pid]:
            del self._events[key]
