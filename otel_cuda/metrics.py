"""Kernel maps + events -> the OTel instruments of the DESIGN.md metric table.

Every figure is read from the in-kernel aggregates at collection time, so it stays exact when the ring buffer
overflows: calls and failures per function, bytes by direction, live bytes and allocations, launches per kernel
(`kernel_launches`, named at collection) and the duration histograms (the kernel's log2 histograms, exported by
KernelHistograms). What the kernel cannot know is per event: the CUresult name of a failure (failures whose events
were lost show as CUDA_ERROR_UNRECORDED) and the engine steps (cuda.step.duration; the ring buffer's losses are
otel_cuda.events{outcome=lost_ringbuf}).

cuda.kernel.launches, per process and launch type: the kernels' names for the top-K kernels, the rest `other`;
`unknown` for launches of a handle no name-giving call named; `unrecorded` for launches the per-function counts
have but the per-kernel table could not hold (it was full: otel_cuda.kernel_tables.full). So the series of a
process always add up to its launch calls (cuda.api.calls of the launch functions).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics._internal.instrument import _Histogram
from opentelemetry.sdk.metrics.export import (AggregationTemporality, Histogram, HistogramDataPoint, Metric,
                                              MetricReader, MetricsData, ResourceMetrics, ScopeMetrics)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from . import probes
from .demangle import readable
from .events import EV_LAUNCH, EV_SYS, OC_HIST_BUCKETS, Event
from .steps import Step

OTHER = "other"
UNKNOWN = "unknown"  # as names.UNKNOWN
UNRECORDED = "unrecorded"
SCOPE = "otel_cuda"
# Explicit bounds of the kernel's log2 buckets, in seconds: bucket i counts [2^i, 2^(i+1)) ns.
LOG2_BOUNDS_S = tuple((1 << (i + 1)) / 1e9 for i in range(OC_HIST_BUCKETS - 1))


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

    def add(self, key: tuple, n: int = 1) -> None:
        self.totals[key] += n

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


class KernelLaunches:
    """Launch counts per (pid, launch function, kernel handle), counted in the kernel, attributed to the kernel's name
    at collection.

    The counts only grow, so each collection attributes what was added since the last one to the handle's name as
    known then: every series stays monotonic, and a handle named later (its name record read after its launches
    were counted) has its earlier launches under its name too. A handle still unnamed is held back while the
    consumer has not yet read every record written before the collection began (its name record may be among
    them: the name-giving call returned before the first launch of its handle); then it counts as `unknown`.
    """

    def __init__(self, top_k: int, counts: Callable[[], dict], name: Callable[[int, int], str | None]):
        self.topk = TopK(top_k)
        self._counts = counts  # (pid, func, handle) -> launches
        self.name = name  # (pid, handle) -> kernel name or None
        self.names_read_before = 0  # the consumer has read every record written before this (CLOCK_MONOTONIC)
        self._seen: dict[tuple[int, int, int], int] = {}  # key -> launches attributed
        self._held: dict[tuple[int, int, int], int] = {}  # unnamed key -> when it was first held back
        self._unrecorded: dict[tuple[int, str], int] = {}  # (pid, launch type) -> launches (monotonic)

    def absorb(self, counts: dict, pids: set[int] | None = None, final: bool = False) -> None:
        started = time.monotonic_ns()
        for key, n in counts.items():
            pid, func, handle = key
            if pids is not None and pid not in pids:
                continue
            last = self._seen.get(key, 0)
            delta = n - last if n >= last else n  # fewer: the entry was freed and made anew (a reused pid)
            if not delta:
                continue
            name = self.name(pid, handle)
            if name is None:
                held = self._held.setdefault(key, started)
                if not final and self.names_read_before < held:
                    continue
                name = UNKNOWN
            self._held.pop(key, None)
            self._seen[key] = n
            self.topk.add((pid, probes.LAUNCH_TYPE.get(func, "kernel"), name), delta)

    def series(self, totals: dict[tuple[int, str], int], counts: dict) -> list[tuple[tuple, int]]:
        """(pid, launch type, name) -> launches; `totals`: launch calls per (pid, launch type), from `stats`."""
        recorded: Counter[tuple[int, str]] = Counter()
        for (pid, func, _), n in counts.items():
            recorded[(pid, probes.LAUNCH_TYPE.get(func, "kernel"))] += n
        out = self.topk.observe()
        for (pid, ltype), total in totals.items():
            if ltype == "graph":
                out.append(((pid, ltype, ""), total))
                continue
            missing = total - recorded.get((pid, ltype), 0)  # totals were read first: never overstated
            if missing > self._unrecorded.get((pid, ltype), 0):
                self._unrecorded[(pid, ltype)] = missing
        out += [((pid, ltype, UNRECORDED), n) for (pid, ltype), n in self._unrecorded.items()]
        return out


class KernelHistograms:
    """cuda.api.duration and cuda.sync.duration from the kernel's log2 histograms: exact whatever the ring buffer lost.

    The OTel Python SDK has no asynchronous histogram instrument (opentelemetry-specification#2713) and, in 1.45, no
    MetricProducer, so these points are made at collection and added to what a reader collects: install(reader)
    wraps the collect callback the MeterProvider gave it. Bucket i of the kernel counts durations in
    [2^i, 2^(i+1)) ns and goes out as the explicit bucket (2^i, 2^(i+1)] ns in seconds (the two differ for durations
    of exactly 2^i ns only); bucket 0 holds everything below 2 ns, the last everything from 2^31 ns (2.1 s) on. The
    sum is the kernel's exact total; min and max are not known and left unset. Points are cumulative unless the
    reader prefers delta for histograms.
    """

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats
        self._lock = threading.Lock()
        self._start: dict[tuple, int] = {}  # series -> when it was first seen (its cumulative start)
        self._last: dict[int, tuple[int, dict]] = {}  # id(delta reader) -> (time, series -> (count, sum, buckets))

    def points(self) -> dict[tuple[str, tuple], tuple[int, float, list[int]]]:
        """(instrument, attributes) -> (count, sum in seconds, bucket counts)."""
        out: dict[tuple[str, tuple], list] = {}

        def add(key, hist, total_ns):
            cur = out.get(key)
            if cur is None:
                out[key] = [sum(hist), total_ns / 1e9, list(hist)]
            else:
                cur[0] += sum(hist)
                cur[1] += total_ns / 1e9
                cur[2] = [a + b for a, b in zip(cur[2], hist)]

        for (pid, func), agg in self._stats().items():
            hist = agg.get("hist")
            p = probes.BY_ID.get(func)
            if p is None or not hist or not any(hist):
                continue
            add(("cuda.api.duration", (("cuda.function", p.symbol), ("process.pid", pid))), hist, agg["total_ns"])
            if p.sync_kind:
                add(("cuda.sync.duration", (("cuda.sync.kind", p.sync_kind), ("process.pid", pid))), hist,
                    agg["total_ns"])
        return {k: (c, s, b) for k, (c, s, b) in out.items()}

    def metrics(self, delta_for: int | None = None) -> list[Metric]:
        """The two instruments' points now; `delta_for`: id of a reader that wants the change since its last call."""
        now = time.time_ns()
        points = self.points()
        with self._lock:
            for key in points:
                self._start.setdefault(key, now)
            start = dict(self._start)
            last_time, last = self._last.get(delta_for, (0, {})) if delta_for is not None else (0, {})
            if delta_for is not None:
                self._last[delta_for] = (now, points)
        by_name: dict[str, list[HistogramDataPoint]] = {"cuda.api.duration": [], "cuda.sync.duration": []}
        for key, (count, total, buckets) in points.items():
            name, attrs = key
            begin = start[key]
            if delta_for is not None:
                pc, ps, pb = last.get(key, (0, 0.0, [0] * len(buckets)))
                count, total, buckets = count - pc, total - ps, [a - b for a, b in zip(buckets, pb)]
                begin = max(begin, last_time)
            by_name[name].append(HistogramDataPoint(
                attributes=dict(attrs), start_time_unix_nano=begin, time_unix_nano=now, count=count, sum=total,
                bucket_counts=buckets, explicit_bounds=LOG2_BOUNDS_S, min=None, max=None))
        temporality = AggregationTemporality.DELTA if delta_for is not None else AggregationTemporality.CUMULATIVE
        descriptions = {"cuda.api.duration": "Duration of CUDA API calls with a probed return",
                        "cuda.sync.duration": "Time the host blocked in synchronize calls"}
        return [Metric(name, descriptions[name], "s", Histogram(points, temporality))
                for name, points in by_name.items() if points]

    def install(self, reader: MetricReader, resource) -> None:
        """Add the histograms to everything `reader` collects (it must be registered with its MeterProvider)."""
        inner = reader._collect  # noqa: SLF001 - the SDK's only hook for points made outside an instrument
        if inner is None:
            raise ValueError("the reader is not registered with a MeterProvider")
        delta = reader._instrument_class_temporality.get(_Histogram) == AggregationTemporality.DELTA  # noqa: SLF001

        def collect(r, timeout_millis: float = 10_000):
            data = inner(r, timeout_millis=timeout_millis)
            extra = self.metrics(id(reader) if delta else None)
            return merge(data, extra, resource) if extra else data

        reader._set_collect_callback(collect)  # noqa: SLF001


def merge(data: MetricsData | None, extra: list[Metric], resource) -> MetricsData:
    """`data` with `extra` added to its otel_cuda scope (made if missing)."""
    resource_metrics = list(data.resource_metrics) if data is not None else []
    if not resource_metrics:
        resource_metrics = [ResourceMetrics(resource, [], "")]
    rm = resource_metrics[0]
    scopes = list(rm.scope_metrics)
    for i, sm in enumerate(scopes):
        if sm.scope.name == SCOPE:
            scopes[i] = ScopeMetrics(sm.scope, list(sm.metrics) + extra, sm.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(InstrumentationScope(SCOPE), extra, ""))
    resource_metrics[0] = ResourceMetrics(rm.resource, scopes, rm.schema_url)
    return MetricsData(resource_metrics)


class CudaMetrics:
    """Instruments of the traced service. `stats`, `live` and `kernel_launches` read the kernel maps (bpf.Probes);
    `kernel_name(pid, handle)` names a handle (KernelNames.lookup). Without `kernel_launches` (replay: no kernel
    maps, the archive holds every launch) launches are counted from the launch events."""

    def __init__(self, meter: Meter, stats: Callable[[], dict], live: Callable[[], dict], top_k: int = 20,
                 kernel_launches: Callable[[], dict] | None = None,
                 kernel_name: Callable[[int, int], str | None] = lambda pid, handle: None):
        self._stats = stats
        self._live = live
        self._kernel_launches = kernel_launches
        self._lock = threading.Lock()
        self.launches = KernelLaunches(top_k, self._all_kernel_launches, kernel_name)
        self._final = False
        self._errors: Counter[tuple[int, str, str]] = Counter()  # (pid, function, CUresult) of failed calls
        self._retired_stats: dict[tuple[int, int], dict] = {}  # gone processes keep their last totals
        self._retired_kernels: dict[tuple[int, int, int], int] = {}
        self.histograms = KernelHistograms(self._all_stats)

        meter.create_observable_counter("cuda.api.calls", [self._observe_calls], unit="{call}",
                                        description="CUDA API calls by function and result")
        meter.create_observable_counter("cuda.kernel.launches", [self._observe_launches], unit="{launch}",
                                        description="Kernel and graph launches; names for the top-K kernels only")
        meter.create_observable_counter("cuda.memcpy.bytes", [self._observe_memcpy], unit="By",
                                        description="Bytes copied or set, by direction")
        meter.create_observable_up_down_counter("cuda.memory.allocated", [self._observe_live], unit="By",
                                                description="Live allocated bytes by memory type")
        meter.create_observable_counter("cuda.memory.allocations", [self._observe_allocations], unit="{allocation}",
                                        description="Successful allocations by memory type")
        self._step = meter.create_histogram("cuda.step.duration", unit="s",
                                            description="Engine step duration: first launch to the closing sync")

    # -- per event ---------------------------------------------------------------------------------------
    def on_events(self, batch: Iterable[tuple[Event, str | None, int | None]]) -> None:
        by_events = self._kernel_launches is None
        with self._lock:
            for ev, kernel, _ in batch:
                if ev.nested or ev.type == EV_SYS:  # system events: their func ids are enum oc_sys_kind
                    continue
                if by_events and ev.func in probes.LAUNCH_TYPE and (ev.type == EV_LAUNCH or ev.has_return):
                    ltype = probes.LAUNCH_TYPE[ev.func]
                    self.launches.topk.add((ev.pid, ltype, "" if ltype == "graph" else kernel or UNKNOWN))
                if ev.has_return and ev.result != 0:
                    p = probes.BY_ID.get(ev.func)
                    if p is not None:
                        self._errors[(ev.pid, p.symbol, probes.result_name(ev.result))] += 1

    def on_launches(self, run) -> None:
        """on_events for a run of plain launches (LaunchRun): only launch counts, and only without the kernel's
        per-kernel counts (a plain launch has no result)."""
        if self._kernel_launches is not None:
            return
        with self._lock:
            for (pid, _tid, func, _handle), n in run.groups.items():
                self.launches.topk.add((pid, probes.LAUNCH_TYPE[func], run.kernels[(pid, _tid, func, _handle)]), n)

    def on_step(self, step: Step) -> None:
        self._step.record(step.duration_ns / 1e9, {"process.pid": step.pid})

    def names_read_before(self, now_ns: int) -> None:
        """The consumer has read every record written before now_ns: unnamed kernels seen before are unknown."""
        self.launches.names_read_before = now_ns

    def retire(self, pid: int) -> None:
        """Keep a gone process's totals (the kernel map entries are then freed for new processes)."""
        for key, agg in self._stats().items():
            if key[0] == pid:
                self._retired_stats[key] = agg
        if self._kernel_launches is not None:
            with self._lock:
                self._retired_kernels.update({k: n for k, n in self._kernel_launches().items() if k[0] == pid})

    def settle(self, pid: int) -> None:
        """The consumer has read everything the gone process wrote and is about to forget its kernel names: its
        launches are attributed now, with the names it had."""
        if self._kernel_launches is None:
            return
        with self._lock:
            self.launches.absorb(self._all_kernel_launches(), pids={pid}, final=True)

    def final(self) -> None:
        """The consumer has stopped: nothing more will be named."""
        self._final = True

    # -- collection ----------------------------------------------------------------------------------------
    def _all_stats(self) -> dict:
        merged = dict(self._retired_stats)
        merged.update(self._stats())
        return merged

    def _all_kernel_launches(self) -> dict:
        merged = dict(self._retired_kernels)
        if self._kernel_launches is not None:
            merged.update(self._kernel_launches())
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
            if self._kernel_launches is None:
                series = self.launches.topk.observe()
            else:
                totals: Counter[tuple[int, str]] = Counter()
                for (pid, func), agg in self._all_stats().items():  # first: the per-kernel counts are never behind
                    if func in probes.LAUNCH_TYPE:
                        totals[(pid, probes.LAUNCH_TYPE[func])] += agg["calls"]
                counts = self._all_kernel_launches()
                self.launches.absorb(counts, final=self._final)
                series = self.launches.series(totals, counts)
        for (pid, ltype, name), n in series:
            attrs = {"cuda.launch.type": ltype, "process.pid": pid}
            if ltype != "graph":
                attrs["cuda.kernel.name"] = readable(name)
            yield Observation(n, attrs)

    def _observe_memcpy(self, _options: CallbackOptions) -> Iterable[Observation]:
        by_kind: Counter[tuple[int, str]] = Counter()
        for (pid, func), agg in self._all_stats().items():
            p = probes.BY_ID.get(func)
            if p is None or not p.copies:
                continue
            for variant, n in (agg.get("bytes_by_variant") or {0: agg["bytes"]}).items():
                kind = probes.CUDA_MEMCPY_KINDS.get(variant - 1, "default") if variant else p.memcpy_kind
                by_kind[(pid, kind or "default")] += n
        for (pid, kind), n in by_kind.items():
            yield Observation(n, {"cuda.memcpy.kind": kind, "process.pid": pid})

    def _observe_live(self, _options: CallbackOptions) -> Iterable[Observation]:
        for (pid, mem_type), n in self._live().items():
            name = probes.MEMORY_TYPES[mem_type] if mem_type < len(probes.MEMORY_TYPES) else str(mem_type)
            yield Observation(n, {"cuda.memory.type": name, "process.pid": pid})

    def _observe_allocations(self, _options: CallbackOptions) -> Iterable[Observation]:
        """A runtime allocation counts once: the driver call under it is nested, left out of `stats`."""
        by_type: Counter[tuple[int, str]] = Counter()
        for (pid, func), agg in self._all_stats().items():
            if func in probes.ALLOCS:
                by_type[(pid, probes.BY_ID[func].memory_type)] += agg["calls"] - agg["errors"]
        for (pid, mtype), n in by_type.items():
            yield Observation(n, {"cuda.memory.type": mtype, "process.pid": pid})
