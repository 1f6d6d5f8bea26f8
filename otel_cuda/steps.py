"""Events -> engine steps.

An inference engine's step is a burst of kernel launches on one thread closed by a host sync: vLLM reads the
sampled tokens back every step (a device->host copy and a stream synchronize). A step opens at the first
launch on a thread with no open step and closes at the end of the next host-blocking call on that thread
(stream / context / event synchronize, or a synchronous device->host copy). A step left open longer than
`idle_close_ns` after its last call is closed by `tick()` (a thread that stopped launching).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import probes
from .events import EV_CALL, EV_LAUNCH, F_NESTED, F_RETURN, Event
from .records import moved_bytes

_GRAPH_LAUNCH = probes.BY_SYMBOL["cuGraphLaunch"].func_id
_CLOSES_STEP = {p.func_id for p in probes.PROBES
                if p.layer == probes.DRIVER and (p.sync_kind in ("stream", "context") or p.symbol in (
                    "cuEventSynchronize", "cuMemcpyDtoH_v2"))}
_SYNC = {p.func_id for p in probes.PROBES if p.sync_kind}


@dataclass(frozen=True)
class StepConfig:
    outlier_ns: int = 1_000_000  # calls at least this slow become spans of their own (DESIGN: 1 ms)
    outlier_bytes: int = 64 << 20  # copies / allocations at least this large too
    idle_close_ns: int = 2_000_000_000
    max_outliers_per_step: int = 16  # span volume stays bounded whatever the workload does


@dataclass
class Step:
    id: int
    pid: int
    tid: int
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

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


class StepTracker:
    def __init__(self, config: StepConfig, on_step: Callable[[Step], None], on_outlier: Callable[[Event, str | None], None]):
        self.config = config
        self.on_step = on_step
        self.on_outlier = on_outlier  # outliers outside any step
        self._open: dict[int, Step] = {}  # tid -> open step
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
        if ev.type == EV_LAUNCH and not ev.flags & (F_RETURN | F_NESTED) and ev.func != _GRAPH_LAUNCH:
            return self._launch(ev, kernel)
        step = self._open.get(ev.tid)
        if step is None and ev.type == EV_LAUNCH and not ev.nested:
            step = self._start(ev)
        end = ev.ts_ns + ev.dur_ns
        self._last_ns[ev.tid] = end
        if step is None:
            if self.is_outlier(ev):
                self.on_outlier(ev, kernel)
            return None
        step.calls += 1
        step.end_ns = max(step.end_ns, end)
        if ev.type == EV_LAUNCH:
            if ev.nested:
                pass
            elif ev.func == _GRAPH_LAUNCH:
                step.graph_launches += 1
            else:
                step.launches += 1
                if kernel is not None:
                    step.kernels[kernel] = step.kernels.get(kernel, 0) + 1
        if ev.has_return and not ev.nested:
            step.api_ns += ev.dur_ns
            if ev.func in _SYNC:
                step.sync_ns += ev.dur_ns
        step.memcpy_bytes += moved_bytes(ev)
        if self.is_outlier(ev):
            if len(step.outliers) < self.config.max_outliers_per_step:
                step.outliers.append((ev, kernel))
            else:
                step.outliers_dropped += 1
        if ev.func in _CLOSES_STEP and ev.has_return and not ev.nested:
            self._close(ev.tid)
        return step.id

    def _launch(self, ev: Event, kernel: str | None) -> int:
        """process() for the hot event, a kernel launch probed at entry only: no duration, no bytes, never an
        outlier (a third of the consumer's time per launch went to those checks)."""
        step = self._open.get(ev.tid) or self._start(ev)
        self._last_ns[ev.tid] = ev.ts_ns
        step.calls += 1
        if ev.ts_ns > step.end_ns:
            step.end_ns = ev.ts_ns
        step.launches += 1
        if kernel is not None:
            step.kernels[kernel] = step.kernels.get(kernel, 0) + 1
        return step.id

    def _start(self, ev: Event) -> Step:
        """A launch on a thread with no open step opens one."""
        step = self._open[ev.tid] = Step(self._next_id, ev.pid, ev.tid, ev.ts_ns)
        self._next_id += 1
        return step

    def _close(self, tid: int) -> None:
        step = self._open.pop(tid, None)
        if step is not None:
            self.on_step(step)

    def tick(self, now_ns: int) -> None:
        """Close steps whose thread has been quiet for idle_close_ns."""
        for tid in [t for t, s in self._open.items() if now_ns - self._last_ns.get(t, s.start_ns) > self.config.idle_close_ns]:
            self._close(tid)

    def close_all(self) -> None:
        for tid in list(self._open):
            self._close(tid)

    def forget_process(self, pid: int) -> None:
        for tid in [t for t, s in list(self._open.items()) if s.pid == pid]:  # list(): one step, for other threads
            self._close(tid)
