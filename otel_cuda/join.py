"""llm_request windows x buffered steps -> child spans and summary attributes.

vLLM exports `llm_request` only when a request has finished, from the API-server process, while the CUDA work
happened earlier in the engine: so steps are buffered (bounded by age and count, evictions counted) and the
join runs when the span arrives. Phase windows come from the span's start and its gen_ai.latency.*
attributes; a step belongs to a window when its midpoint lies in it, so each step falls in exactly one of two
adjacent windows. A step is shared by every request of its batch: attribute, don't divide.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from opentelemetry import trace
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinConfig:
    request_span_name: str = "llm_request"
    queue_attribute: str = "gen_ai.latency.time_in_queue"
    prefill_attribute: str = "gen_ai.latency.time_in_model_prefill"
    decode_attribute: str = "gen_ai.latency.time_in_model_decode"
    request_id_attribute: str = "gen_ai.request.id"
    instance_key: str = "auto"  # auto | pod | container | host (every traced process is the same instance)
    retention_s: float = 900.0  # long enough for long requests
    max_steps: int = 200_000  # memory cap (~200 bytes a step)
    max_links: int = 16
    wait_s: float = 5.0  # how long a join waits for the pipeline to catch up with the span's end


@dataclass
class BufferedStep:
    pid: int
    start_ns: int  # CLOCK_MONOTONIC
    end_ns: int
    launches: int
    graph_launches: int
    memcpy_bytes: int
    api_ns: int
    sync_ns: int
    context: SpanContext | None
    claimed_by: int = 0  # requests joined so far that took part in this step

    @property
    def mid_ns(self) -> int:
        return (self.start_ns + self.end_ns) // 2


class StepBuffer:
    def __init__(self, config: JoinConfig, monotonic_ns: Callable[[], int] = time.monotonic_ns):
        self.config = config
        self._now = monotonic_ns
        self._steps: list[BufferedStep] = []
        self._mids: list[int] = []
        self._lock = threading.Condition()
        self.watermark_ns = 0  # the pipeline has processed every event stamped before this
        self.evicted = 0
        self._longest = 0  # the longest step seen (ns), to search by end time in a list sorted by midpoint

    def add(self, step: BufferedStep) -> None:
        with self._lock:
            self._longest = max(self._longest, step.end_ns - step.start_ns)
            i = bisect.bisect_right(self._mids, step.mid_ns)
            self._steps.insert(i, step)
            self._mids.insert(i, step.mid_ns)
            self._evict()

    def _evict(self) -> None:
        horizon = self._now() - int(self.config.retention_s * 1e9)
        drop = bisect.bisect_left(self._mids, horizon)
        drop = max(drop, len(self._steps) - self.config.max_steps)
        if drop > 0:
            del self._steps[:drop]
            del self._mids[:drop]
            self.evicted += drop

    def advance(self, watermark_ns: int) -> None:
        with self._lock:
            self.watermark_ns = watermark_ns
            self._lock.notify_all()

    def wait_for(self, mono_ns: int, timeout_s: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self.watermark_ns >= mono_ns, timeout=timeout_s)

    def ends_between(self, start_ns: int, end_ns: int, pids: set[int] | None) -> list[int]:
        """End times of the steps that end in [start_ns, end_ns] (steps are sorted by midpoint, so look a
        little wider and filter)."""
        with self._lock:
            lo = bisect.bisect_left(self._mids, start_ns - self._longest)
            hi = bisect.bisect_right(self._mids, end_ns)
            return sorted(s.end_ns for s in self._steps[lo:hi]
                          if start_ns <= s.end_ns <= end_ns and (pids is None or s.pid in pids))

    def in_window(self, start_ns: int, end_ns: int, pids: set[int] | None) -> list[BufferedStep]:
        with self._lock:
            lo = bisect.bisect_left(self._mids, start_ns)
            hi = bisect.bisect_left(self._mids, end_ns)
            return [s for s in self._steps[lo:hi] if pids is None or s.pid in pids]

    def __len__(self) -> int:
        return len(self._steps)


@dataclass
class JoinCounters:
    requests: int = 0
    joined: int = 0
    no_steps: int = 0
    no_latency_attributes: int = 0
    children: int = 0
    by_request: list = field(default_factory=list)  # recent outcomes for the demo's report (bounded)


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = getattr(v, kind) if kind else None
    return out


def _kv(key: str, value) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def summarize(steps: list[BufferedStep]) -> dict:
    return {
        "cuda.steps": len(steps),
        "cuda.launches": sum(s.launches for s in steps),
        "cuda.graph_launches": sum(s.graph_launches for s in steps),
        "cuda.memcpy.bytes": sum(s.memcpy_bytes for s in steps),
        "cuda.api.duration": sum(s.api_ns for s in steps) / 1e9,
        "cuda.sync.duration": sum(s.sync_ns for s in steps) / 1e9,
        "cuda.requests.shared_by": max((s.claimed_by for s in steps), default=0),
    }


def sample(steps: list[BufferedStep], n: int) -> list[BufferedStep]:
    """Up to n steps spread evenly over the window (first and last included)."""
    with_ctx = [s for s in steps if s.context is not None]
    if len(with_ctx) <= n:
        return with_ctx
    return [with_ctx[round(i * (len(with_ctx) - 1) / (n - 1))] for i in range(n)]


class Joiner:
    """Mutates llm_request spans of an ExportTraceServiceRequest in place (summary attributes) and emits the
    cuda.prefill / cuda.decode children through `tracer_for(pid)`."""

    def __init__(self, config: JoinConfig, buffer: StepBuffer, tracer_for: Callable[[int], trace.Tracer],
                 epoch_offset_ns: Callable[[], int], instance_pids: Callable[[dict], set[int] | None],
                 on_request: Callable[[dict], None] = lambda record: None):
        self.config = config
        self.buffer = buffer
        self.tracer_for = tracer_for
        self.epoch_offset_ns = epoch_offset_ns
        self.instance_pids = instance_pids
        self.on_request = on_request
        self.counters = JoinCounters()

    def handle(self, request) -> None:
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    if span.name == self.config.request_span_name:
                        try:
                            self._join(span, resource)
                        except Exception:
                            log.exception("join of span %s failed; it is forwarded unchanged", span.span_id.hex())

    def windows(self, span, attrs: dict) -> dict[str, tuple[int, int]] | None:
        c = self.config
        try:
            queue, prefill, decode = (float(attrs[c.queue_attribute]), float(attrs[c.prefill_attribute]),
                                      float(attrs[c.decode_attribute]))
        except (KeyError, TypeError, ValueError):
            return None
        start = span.start_time_unix_nano + int(queue * 1e9)
        mid = start + int(prefill * 1e9)
        return {"prefill": (start, mid), "decode": (mid, mid + int(decode * 1e9))}

    def _join(self, span, resource: dict) -> None:
        c = self.config
        self.counters.requests += 1
        attrs = _attrs(span.attributes)
        windows = self.windows(span, attrs)
        outcome = "joined"
        if windows is None:
            # Not vLLM's contract (or an older vLLM): the whole span is one window.
            self.counters.no_latency_attributes += 1
            outcome = "no_latency_attributes"
            windows = {"request": (span.start_time_unix_nano, span.end_time_unix_nano)}
        offset = self.epoch_offset_ns()
        self.buffer.wait_for(span.end_time_unix_nano - offset, self.config.wait_s)
        pids = self.instance_pids(resource)
        shift = self.align(windows, span.end_time_unix_nano, offset, pids) if outcome == "joined" else 0
        windows = {phase: (start + shift, end + shift) for phase, (start, end) in windows.items()}
        parent = SpanContext(int.from_bytes(span.trace_id, "big"), int.from_bytes(span.span_id, "big"),
                             is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        totals: dict[str, list[BufferedStep]] = {}
        for phase, (start, end) in windows.items():
            steps = self.buffer.in_window(start - offset, end - offset, pids)
            for s in steps:
                s.claimed_by += 1
            totals[phase] = steps
            if steps:
                self._child(phase, start, end, steps, parent)
        every = [s for steps in totals.values() for s in steps]
        if not every:
            self.counters.no_steps += 1
            outcome = "no_steps" if outcome == "joined" else outcome
        elif outcome == "joined":
            self.counters.joined += 1
        summary = summarize(every)
        for phase, steps in totals.items():
            summary[f"cuda.{phase}.steps"] = len(steps)
            summary[f"cuda.{phase}.launches"] = sum(s.launches for s in steps)
        summary["cuda.join.outcome"] = outcome
        summary["cuda.join.shift_ns"] = shift
        span.attributes.extend(_kv(k, v) for k, v in summary.items())
        record = {
            "v": 1, "type": "request", "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
            "request_id": attrs.get(c.request_id_attribute), "ts": span.start_time_unix_nano,
            "dur_ns": span.end_time_unix_nano - span.start_time_unix_nano, "outcome": outcome,
            "windows": {p: list(w) for p, w in windows.items()},
            "cuda": {p: {k.removeprefix("cuda."): v for k, v in summarize(steps).items()} for p, steps in totals.items()},
        }
        if len(self.counters.by_request) < 10_000:
            self.counters.by_request.append(record)
        self.on_request(record)

    def align(self, windows: dict, span_end: int, offset: int, pids: set[int] | None) -> int:
        """How far the engine's timeline lies after the span's start (ns).

        vLLM anchors the phases on the API server's arrival time, but the engine measured them after the
        request crossed to it; the span ends after the last token came back. So the engine's [queued, last
        token] lies somewhere in [start, end]; the slack is the two hops and the output processing. The last
        token comes out of a step's closing sync, and so does the first: the shift is the one that puts both
        window ends closest to step ends."""
        prefill_end, decode_end = windows["prefill"][1], windows["decode"][1]
        slack = max(0, span_end - decode_end)
        candidates = self.buffer.ends_between(decode_end - offset, decode_end - offset + slack, pids)
        if not candidates:
            return 0
        prefill_ends = self.buffer.ends_between(prefill_end - offset - 1, prefill_end - offset + slack + 1, pids)

        def miss(shift: int) -> int:  # how far the prefill end then lies from the nearest step end
            target = prefill_end - offset + shift
            return min((abs(e - target) for e in prefill_ends), default=0)

        shifts = [e - (decode_end - offset) for e in candidates]
        return min(shifts, key=lambda d: (miss(d), d))

    def _child(self, phase: str, start: int, end: int, steps: list[BufferedStep], parent: SpanContext) -> None:
        pid = min(s.pid for s in steps)
        links = [Link(s.context, {"cuda.step.relation": "executed_in"}) for s in sample(steps, self.config.max_links)]
        attrs = summarize(steps)
        attrs["cuda.steps.linked"] = len(links)
        attrs["cuda.processes"] = len({s.pid for s in steps})
        span = self.tracer_for(pid).start_span(
            f"cuda.{phase}", kind=SpanKind.INTERNAL, start_time=start,
            context=trace.set_span_in_context(NonRecordingSpan(parent)), links=links, attributes=attrs)
        span.end(end_time=end)
        self.counters.children += 1
