"""Kernel maps + events -> the OTel instruments of the DESIGN.md metric table.

Counts, bytes and live allocations are read from the in-kernel aggregates at collection time: they stay exact
when the ring buffer overflows. Per-event work is only what the kernel cannot know: durations as histograms
(calls with a probed return), kernel names (top-K) and CUresult names of failures.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from . import probes
from .events import EV_LAUNCH, EV_SYS, Event
from .steps import Step

_LAUNCH_TYPE = {"cuLaunchKernel": "kernel", "cuLaunchKernelEx": "kernel", "cuLaunchCooperativeKernel": "cooperative",
                "cuGraphLaunch": "graph", "cudaLaunchKernel": "kernel", "cudaGraphLaunch": "graph"}
OTHER = "other"


class TopK:
    """Kernel names on metrics for the K busiest kernels only, the rest `other`, every series monotonic.

    A name is admitted (for good) when it ranks in the top K at a collection while places remain; its series
    counts launches from then on, and launches before admission stay in `other` — unless no `other` series of
    that process has been exported yet, so the first collection shows the busiest kernels whole. No counter
    ever falls.
    """

    def __init__(self, k: int):
        self.k = k
        self.totals: Counter[tuple] = Counter()  # (pid, launch type, name) -> launches
        self.base: dict[tuple, int] = {}  # admitted key -> launches at admission
        self._other_exported: set[tuple] = set()  # (pid, launch type) whose `other` series went out

    def add(self, key: tuple) -> None:
        self.totals[key] += 1

    def observe(self) -> list[tuple[tuple, int]]:
        admitted_names = {k[2] for k in self.base}
        if len(admitted_names) < self.k:
            by_name: Counter[str] = Counter()
            for (_, _, name), n in self.totals.items():
                by_name[name] += n
            for name, _ in by_name.most_common():
                if len(admitted_names) >= self.k:
                    break
                admitted_names.add(name)
        other: Counter[tuple] = Counter()
        out = []
        for key, n in list(self.totals.items()):
            pid, ltype, name = key
            if name in admitted_names:
                base = self.base.setdefault(key, n if (pid, ltype) in self._other_exported else 0)
                out.append((key, n - base))
                other[(pid, ltype, OTHER)] += base
            else:
                other[(pid, ltype, OTHER)] += n
        self._other_exported.update((pid, ltype) for pid, ltype, _ in other)
        return out + [(k, n) for k, n in other.items()]


class CudaMetrics:
    """Instruments of the traced service. `stats`, `live` and `lost` read the kernel maps (bpf.Probes)."""

    def __init__(self, meter: Meter, stats: Callable[[], dict], live: Callable[[], dict], top_k: int = 20):
        self._stats = stats
        self._live = live
        self._lock = threading.Lock()
        self._topk = TopK(top_k)
        self._errors: Counter[tuple[int, str, str]] = Counter()  # (pid, function, CUresult) of failed calls
        self._retired_stats: dict[tuple[int, int], dict] = {}  # gone processes keep their last totals

        meter.create_observable_counter("cuda.api.calls", [self._observe_calls], unit="{call}",
                                        description="CUDA API calls by function and result")
        self._duration = meter.create_histogram("cuda.api.duration", unit="s",
                                                description="Duration of CUDA API calls with a probed return")
        meter.create_observable_counter("cuda.kernel.launches", [self._observe_launches], unit="{launch}",
                                        description="Kernel and graph launches; names for the top-K kernels only")
        meter.create_observable_counter("cuda.memcpy.bytes", [self._observe_memcpy], unit="By",
                                        description="Bytes copied or set, by direction")
        meter.create_observable_up_down_counter("cuda.memory.allocated", [self._observe_live], unit="By",
                                                description="Live allocated bytes by memory type")
        meter.create_observable_counter("cuda.memory.allocations", [self._observe_allocations], unit="{allocation}",
                                        description="Successful allocations by memory type")
        self._sync = meter.create_histogram("cuda.sync.duration", unit="s",
                                            description="Time the host blocked in synchronize calls")
        self._step = meter.create_histogram("cuda.step.duration", unit="s",
                                            description="Engine step duration: first launch to the closing sync")

    # -- per event ---------------------------------------------------------------------------------------
    def on_events(self, batch: Iterable[tuple[Event, str | None, int | None]]) -> None:
        duration, sync = self._duration.record, self._sync.record
        with self._lock:
            for ev, kernel, _ in batch:
                if ev.nested or ev.type == EV_SYS:  # system events: their func ids are enum oc_sys_kind
                    continue
                p = probes.BY_ID.get(ev.func)
                if p is None:
                    continue
                if ev.type == EV_LAUNCH:
                    ltype = _LAUNCH_TYPE.get(p.symbol, "kernel")
                    self._topk.add((ev.pid, ltype, "" if ltype == "graph" else kernel))
                if not ev.has_return:
                    continue
                attrs = {"cuda.function": p.symbol, "process.pid": ev.pid}
                duration(ev.dur_ns / 1e9, attrs)
                if p.sync_kind and p.symbol != "cuStreamWaitEvent":
                    sync(ev.dur_ns / 1e9, {"cuda.sync.kind": p.sync_kind, "process.pid": ev.pid})
                if ev.result != 0:
                    self._errors[(ev.pid, p.symbol, probes.result_name(ev.result))] += 1

    def on_step(self, step: Step) -> None:
        self._step.record(step.duration_ns / 1e9, {"process.pid": step.pid})

    def retire(self, pid: int) -> None:
        """Keep a gone process's totals (the kernel map entries are then freed for new processes)."""
        for key, agg in self._stats().items():
            if key[0] == pid:
                self._retired_stats[key] = agg

    # -- collection ----------------------------------------------------------------------------------------
    def _all_stats(self) -> dict:
        merged = dict(self._retired_stats)
        merged.update(self._stats())
        return merged

    def _observe_calls(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            errors = dict(self._errors)
        for (pid, func), agg in self._all_stats().items():
            p = probes.BY_ID.get(func)
            if p is None:
                continue
            base = {"cuda.function": p.symbol, "process.pid": pid}
            if p.entry_only and not agg["total_ns"] and not agg["errors"]:
                yield Observation(agg["calls"], base)  # entry only: the result is not known
                continue
            yield Observation(agg["calls"] - agg["errors"], {**base, "cuda.api.result": "CUDA_SUCCESS"})
            named = 0
            for (epid, efunc, code), n in errors.items():
                if epid == pid and efunc == p.symbol:
                    named += n
                    yield Observation(n, {**base, "cuda.api.result": code})
            if agg["errors"] > named:  # failures whose events the ring buffer lost
                yield Observation(agg["errors"] - named, {**base, "cuda.api.result": "CUDA_ERROR_UNRECORDED"})

    def _observe_launches(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            series = self._topk.observe()
        for (pid, ltype, name), n in series:
            attrs = {"cuda.launch.type": ltype, "process.pid": pid}
            if ltype != "graph":
                attrs["cuda.kernel.name"] = name
            yield Observation(n, attrs)

    def _observe_memcpy(self, _options: CallbackOptions) -> Iterable[Observation]:
        by_kind: Counter[tuple[int, str]] = Counter()
        for (pid, func), agg in self._all_stats().items():
            p = probes.BY_ID.get(func)
            if p is not None and p.memcpy_kind:
                by_kind[(pid, p.memcpy_kind)] += agg["bytes"]
        for (pid, kind), n in by_kind.items():
            yield Observation(n, {"cuda.memcpy.kind": kind, "process.pid": pid})

    def _observe_live(self, _options: CallbackOptions) -> Iterable[Observation]:
        for (pid, mem_type), n in self._live().items():
            name = probes.MEMORY_TYPES[mem_type] if mem_type < len(probes.MEMORY_TYPES) else str(mem_type)
            yield Observation(n, {"cuda.memory.type": name, "process.pid": pid})

    def _observe_allocations(self, _options: CallbackOptions) -> Iterable[Observation]:
        by_type: Counter[tuple[int, str]] = Counter()
        for (pid, func), agg in self._all_stats().items():
            p = probes.BY_ID.get(func)
            if p is not None and p.symbol in probes.ALLOCATING:
                by_type[(pid, p.memory_type)] += agg["calls"] - agg["errors"]
        for (pid, mtype), n in by_type.items():
            yield Observation(n, {"cuda.memory.type": mtype, "process.pid": pid})
