"""Steps and outliers -> spans, each under the Resource of the process that made the calls.

Span volume is bounded by design: one `cuda.step` per engine step, at most `max_outliers_per_step` outlier
call spans under it, and outliers outside steps as roots. No span per launch.
"""

from __future__ import annotations

import threading
from typing import Callable

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import SpanContext, SpanKind

from . import probes
from .clock import MonotonicToEpoch
from .demangle import readable
from .events import Event
from .records import moved_bytes, symbol
from .steps import Step

SCOPE = "otel_cuda"


class Tracers:
    """A TracerProvider per traced process (its own Resource), all feeding one span processor, so one batch
    and one exporter serve every process; the OTLP encoder groups spans by resource."""

    def __init__(self, processor: SpanProcessor, resource_for: Callable[[int], Resource]):
        self._processor = processor
        self._resource_for = resource_for
        self._tracers: dict[int, trace.Tracer] = {}  # one per process: get_tracer() builds a new one each call
        self._lock = threading.Lock()

    def tracer(self, pid: int) -> trace.Tracer:
        with self._lock:
            tracer = self._tracers.get(pid)
            if tracer is None:
                provider = TracerProvider(resource=self._resource_for(pid))
                provider.add_span_processor(self._processor)
                tracer = self._tracers[pid] = provider.get_tracer(SCOPE)
            return tracer

    def forget(self, pid: int) -> None:
        with self._lock:
            self._tracers.pop(pid, None)

    def shutdown(self) -> None:
        self._processor.force_flush()
        self._processor.shutdown()


def call_attributes(ev: Event, kernel: str | None) -> dict:
    attrs = {"cuda.function": symbol(ev), "thread.id": ev.tid}
    if ev.has_return:
        attrs["cuda.api.result"] = probes.result_name(ev.result)
    moved = moved_bytes(ev)
    if moved:
        attrs["cuda.memcpy.bytes"] = moved
        attrs["cuda.memcpy.kind"] = probes.BY_ID[ev.func].memcpy_kind
    p = probes.BY_ID.get(ev.func)
    if p is not None and p.symbol in probes.ALLOCATING:
        attrs["cuda.memory.bytes"] = ev.args[1]
        attrs["cuda.memory.type"] = p.memory_type
    if kernel:
        attrs["cuda.kernel.name"] = readable(kernel)
        if attrs["cuda.kernel.name"] != kernel:
            attrs["cuda.kernel.mangled_name"] = kernel
    return attrs


class StepSpans:
    def __init__(self, tracers: Tracers, clock: MonotonicToEpoch):
        self.tracers = tracers
        self.clock = clock
        self.spans = 0

    def on_step(self, step: Step) -> SpanContext:
        """Emit the step's span and its outlier children; returns the step span's context (for links)."""
        offset = self.clock.offset()
        tracer = self.tracers.tracer(step.pid)
        span = tracer.start_span(
            "cuda.step", kind=SpanKind.INTERNAL, start_time=step.start_ns + offset,
            context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root: no live request span exists yet
            attributes={
                "cuda.step.id": step.id,
                "cuda.launches": step.launches,
                "cuda.graph_launches": step.graph_launches,
                "cuda.memcpy.bytes": step.memcpy_bytes,
                "cuda.api.duration": step.api_ns / 1e9,
                "cuda.sync.duration": step.sync_ns / 1e9,
                "cuda.calls": step.calls,
                "cuda.outliers.dropped": step.outliers_dropped,
                "thread.id": step.tid,  # the launching thread
                "cuda.step.closed_by": step.closed_by,  # which host wait ended it (steps.py)
                "cuda.step.readback_thread": step.closed_tid,
            },
        )
        parent = trace.set_span_in_context(span)
        for ev, kernel in step.outliers:
            self._call_span(tracer, ev, kernel, parent, offset)
        span.end(end_time=step.end_ns + offset)
        self.spans += 1 + len(step.outliers)
        return span.get_span_context()

    def on_outlier(self, ev: Event, kernel: str | None) -> None:
        """A slow or large call outside any step (model load, KV-cache allocation): a root span."""
        self._call_span(self.tracers.tracer(ev.pid), ev, kernel, trace.set_span_in_context(trace.INVALID_SPAN),
                        self.clock.offset())
        self.spans += 1

    @staticmethod
    def _call_span(tracer, ev: Event, kernel, parent, offset: int) -> None:
        span = tracer.start_span(symbol(ev), kind=SpanKind.INTERNAL, start_time=ev.ts_ns + offset, context=parent,
                                 attributes=call_attributes(ev, kernel))
        if ev.has_return and ev.result != 0:
            span.set_status(trace.Status(trace.StatusCode.ERROR, probes.result_name(ev.result)))
        span.end(end_time=ev.ts_ns + ev.dur_ns + offset)
