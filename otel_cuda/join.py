"""llm_request spans x buffered engine steps -> cuda.prefill / cuda.decode children and summary attributes.

vLLM exports `llm_request` when a request has finished, from the API-server process, while the CUDA work ran
earlier in its engines; so steps are buffered per process (bounded by age and count, evictions counted) and the
join runs when the span arrives. docs/join.md explains each rule with vLLM's code; in short:

* instance: the span's sender resolves to the API server and its engines (instances.py); unknown -> outcome
  `unknown_instance`, nothing claimed;
* windows: vLLM's latencies are the engine's own intervals (queued -> scheduled -> first token -> last token), but
  anchored on the frontend's arrival time, which precedes the engine's queued time by an unknown hop `delta` >= 0.
  Impossible values (negative, not finite, longer than the span) -> `invalid_latency_attributes`, nothing claimed;
* alignment: an engine step's tokens are stamped after its readback ends, so the step that produced a token at
  time T is the last one ending at or before T. With `n` completion tokens the request's last-token step lies
  exactly n-1 steps after its first-token step (one token per step, no speculative decoding), and `delta` is at
  most the frontend's lag behind the engine (time_to_first_token vs queue + prefill; span end vs last token). The
  join tries every placement on every engine of the instance (data parallel: one per rank) and keeps those
  that break no fact; of them, the one needing the least `delta` is taken (its steps are claimed). Where
  another one breaks nothing either — another engine, or a step later on the same one because the frontend
  lagged the engine by more than a step or two readbacks ended before one token was stamped — the answer is a
  guess and says so (`ambiguous_engine`,
  `ambiguous_step`); where every placement breaks a fact, the least broken is kept (`timing_mismatch`);
* tensor parallel: the ranks of an engine step together; steps are counted once (the lowest-pid rank's), launches
  and bytes summed over ranks (each rank's step nearest in time); `cuda.ranks` says how many;
* completeness: `cuda.join.complete=false` with the reasons when ring-buffer loss, a full kernel table, eviction
  or tracing that began mid-request touched the request's windows, or timing alone could not decide (above);
* where the server exports its own phase spans (vLLM's proposed `vllm_prefill` / `vllm_decode`, SGLang's
  `prefill_forward` / `decode_forward`) in the same batch, the children go under them instead of the request.
A step is shared by every request of its batch: attribute, don't divide (`cuda.requests.shared_by`).
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from opentelemetry import trace
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from .instances import Instance

log = logging.getLogger(__name__)

PHASE_SPANS = (("vllm_prefill", "prefill"), ("vllm_decode", "decode"),  # vLLM's proposed per-phase spans
               ("prefill_forward", "prefill"), ("decode_forward", "decode"))  # SGLang


@dataclass(frozen=True)
class JoinConfig:
    request_span_name: str = "llm_request"
    queue_attribute: str = "gen_ai.latency.time_in_queue"
    prefill_attribute: str = "gen_ai.latency.time_in_model_prefill"
    decode_attribute: str = "gen_ai.latency.time_in_model_decode"
    ttft_attribute: str = "gen_ai.latency.time_to_first_token"
    completion_tokens_attribute: str = "gen_ai.usage.completion_tokens"
    request_id_attribute: str = "gen_ai.request.id"
    phase_spans: tuple = PHASE_SPANS
    instance_key: str = "auto"  # auto | pod | container | host (every traced process is one instance)
    retention_s: float = 900.0  # long enough for long requests
    max_steps: int = 200_000  # memory cap (~200 bytes a step)
    max_links: int = 16
    wait_s: float = 5.0  # how long a join waits for the pipeline to catch up with the span's end
    tolerance_ns: int = 200_000  # slack for float-second rounding and the epoch->monotonic conversion


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
    sealed_ns: int = -1  # when its readback was issued (-1: not seen)

    @property
    def mid_ns(self) -> int:
        return (self.start_ns + self.end_ns) // 2


class StepBuffer:
    """Steps per process, sorted by end time; what could make a window incomplete (gaps, evictions, attach)."""

    def __init__(self, config: JoinConfig, monotonic_ns: Callable[[], int] = time.monotonic_ns):
        self.config = config
        self._now = monotonic_ns
        self._ends: dict[int, list[int]] = {}
        self._steps: dict[int, list[BufferedStep]] = {}
        self._count = 0
        self._lock = threading.Condition()
        self.watermark_ns = 0  # the pipeline has processed every event stamped before this
        self.evicted = 0
        self._evicted_until: dict[int, int] = {}  # pid -> end of its newest evicted step
        self._gaps: deque = deque(maxlen=4096)  # (start_ns, end_ns, reason): events lost in that interval
        self._traced_since: dict[int, int] = {}  # pid -> when its tracing began

    def add(self, step: BufferedStep) -> None:
        with self._lock:
            ends = self._ends.setdefault(step.pid, [])
            i = bisect.bisect_right(ends, step.end_ns)
            ends.insert(i, step.end_ns)
            self._steps.setdefault(step.pid, []).insert(i, step)
            self._count += 1
            self._evict()

    def _evict(self) -> None:
        horizon = self._now() - int(self.config.retention_s * 1e9)
        for pid, ends in self._ends.items():
            self._drop(pid, bisect.bisect_left(ends, horizon))
        while self._count > self.config.max_steps:
            oldest = min((e[0], pid) for pid, e in self._ends.items() if e)[1]
            self._drop(oldest, 1)

    def _drop(self, pid: int, n: int) -> None:
        if n <= 0:
            return
        self._evicted_until[pid] = self._ends[pid][n - 1]
        del self._ends[pid][:n]
        del self._steps[pid][:n]
        self._count -= n
        self.evicted += n

    def traced_since(self, pid: int, mono_ns: int) -> None:
        """Tracing of pid began at mono_ns: a window that starts earlier misses its steps before that."""
        with self._lock:
            self._traced_since.setdefault(pid, mono_ns)

    def gap(self, start_ns: int, end_ns: int, reason: str) -> None:
        """Events were lost somewhere in [start_ns, end_ns] (ring buffer full, kernel table full)."""
        with self._lock:
            self._gaps.append((start_ns, end_ns, reason))

    def incomplete(self, pids, start_ns: int, end_ns: int) -> list[str]:
        """Why the steps of `pids` in [start_ns, end_ns] may not all be here (empty: they are)."""
        with self._lock:
            why = {reason for s, e, reason in self._gaps if s <= end_ns and e >= start_ns}
            if any(self._evicted_until.get(p, -1) >= start_ns for p in pids):
                why.add("steps_evicted")
            if any(self._traced_since.get(p, start_ns) > start_ns for p in pids):
                why.add("attached_mid_request")
        return sorted(why)

    def advance(self, watermark_ns: int) -> None:
        with self._lock:
            self.watermark_ns = watermark_ns
            self._lock.notify_all()

    def wait_for(self, mono_ns: int, timeout_s: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self.watermark_ns >= mono_ns, timeout=timeout_s)

    def ending_between(self, pid: int, lo_ns: int, hi_ns: int) -> list[BufferedStep]:
        """Steps of pid that end in [lo_ns, hi_ns], by end time."""
        with self._lock:
            ends = self._ends.get(pid, ())
            return self._steps[pid][bisect.bisect_left(ends, lo_ns):bisect.bisect_right(ends, hi_ns)] if ends else []

    def __len__(self) -> int:
        return self._count


@dataclass
class JoinCounters:
    requests: int = 0
    joined: int = 0
    no_steps: int = 0
    no_latency_attributes: int = 0
    invalid_latency_attributes: int = 0
    unknown_instance: int = 0
    incomplete: int = 0
    incomplete_by: dict = field(default_factory=dict)  # reason -> joined requests it applied to
    children: int = 0
    by_request: list = field(default_factory=list)  # recent outcomes for the demo's report (bounded)

    def outcomes(self) -> dict:
        return {k: getattr(self, k) for k in ("joined", "no_steps", "no_latency_attributes",
                                              "invalid_latency_attributes", "unknown_instance")}


@dataclass(frozen=True)
class Latencies:
    """A request's phases in ns relative to the span's start, as vLLM's attributes give them."""

    queue: int
    prefill: int
    decode: int
    ttft: int | None
    tokens: int | None  # completion tokens


@dataclass
class Match:
    """The steps of one engine that a request took part in, per phase and rank."""

    engine: int
    rank_pids: tuple  # the engine's processes that ran steps in the request's span (a short-lived child is none)
    delta: int  # the engine's timeline lies this far after the span's anchors (ns)
    phases: dict  # phase -> list of the lead rank's steps
    ranks: dict  # phase -> list of every rank's steps (the lead's included)
    score: tuple
    unsure: tuple = ()  # why timing alone cannot vouch for this placement (cuda.join.incomplete reasons)


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


def summarize(lead: list[BufferedStep], every_rank: list[BufferedStep] | None = None) -> dict:
    """Steps are counted once (the lead rank's); work is summed over every rank."""
    work = lead if every_rank is None else every_rank
    return {
        "cuda.steps": len(lead),
        "cuda.launches": sum(s.launches for s in work),
        "cuda.graph_launches": sum(s.graph_launches for s in work),
        "cuda.memcpy.bytes": sum(s.memcpy_bytes for s in work),
        "cuda.api.duration": sum(s.api_ns for s in work) / 1e9,
        "cuda.sync.duration": sum(s.sync_ns for s in work) / 1e9,
        "cuda.requests.shared_by": max((s.claimed_by for s in lead), default=0),
    }


def sample(steps: list[BufferedStep], n: int) -> list[BufferedStep]:
    """Up to n steps spread evenly over the window (first and last included)."""
    with_ctx = [s for s in steps if s.context is not None]
    if len(with_ctx) <= n:
        return with_ctx
    return [with_ctx[round(i * (len(with_ctx) - 1) / (n - 1))] for i in range(n)]


def latencies(attrs: dict, config: JoinConfig, span_ns: int) -> Latencies | str:
    """The request's phases, or the outcome that says why there are none."""
    c = config
    try:
        queue, prefill, decode = (float(attrs[c.queue_attribute]), float(attrs[c.prefill_attribute]),
                                  float(attrs[c.decode_attribute]))
    except (KeyError, TypeError, ValueError):
        return "no_latency_attributes"
    ttft = attrs.get(c.ttft_attribute)
    try:
        ttft = float(ttft) if ttft is not None else None
        tokens = int(attrs[c.completion_tokens_attribute]) if c.completion_tokens_attribute in attrs else None
    except (TypeError, ValueError):
        return "invalid_latency_attributes"
    values = (queue, prefill, decode) + ((ttft,) if ttft is not None else ())
    if not all(math.isfinite(v) and v >= 0 for v in values) or (tokens is not None and tokens < 0):
        return "invalid_latency_attributes"  # an aborted request's (negative prefill, decode ~ uptime)
    ns = [int(v * 1e9) for v in (queue, prefill, decode)]
    tol = c.tolerance_ns
    if sum(ns) > span_ns + tol or (ttft is not None and ns[0] + ns[1] > int(ttft * 1e9) + tol):
        return "invalid_latency_attributes"  # phases that do not fit in the span: nothing of it can be placed
    return Latencies(*ns, int(ttft * 1e9) if ttft is not None else None, tokens)


class Joiner:
    """Mutates llm_request spans of an ExportTraceServiceRequest in place (summary attributes) and emits the
    cuda.prefill / cuda.decode children through `tracer_for(pid)`."""

    def __init__(self, config: JoinConfig, buffer: StepBuffer, tracer_for: Callable[[int], trace.Tracer],
                 offset_at: Callable[[int], tuple[int, bool]], instance_of: Callable[[dict, object], Instance | None],
                 on_request: Callable[[dict], None] = lambda record: None):
        self.config = config
        self.buffer = buffer
        self.tracer_for = tracer_for
        self.offset_at = offset_at  # epoch - monotonic when the wall clock read a time, and whether that is sure
        self.instance_of = instance_of
        self.on_request = on_request
        self.counters = JoinCounters()
        self._phase_names = dict(config.phase_spans)

    def handle(self, request, peer=None) -> None:
        phase_parents: dict[tuple[bytes, bytes], dict[str, bytes]] = {}
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    phase = self._phase_names.get(span.name)
                    if phase:
                        phase_parents.setdefault((span.trace_id, span.parent_span_id), {})[phase] = span.span_id
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    if span.name == self.config.request_span_name:
                        try:
                            self._join(span, resource, peer, phase_parents.get((span.trace_id, span.span_id), {}))
                        except Exception:
                            log.exception("join of span %s failed; it is forwarded unchanged", span.span_id.hex())

    def _join(self, span, resource: dict, peer, phase_parents: dict) -> None:
        c = self.config
        self.counters.requests += 1
        attrs = _attrs(span.attributes)
        start, end = span.start_time_unix_nano, span.end_time_unix_nano
        lat = latencies(attrs, c, end - start)
        instance = None if lat == "invalid_latency_attributes" else self.instance_of(resource, peer)
        # the offset that held when the span ended; one the wall clock stepped around, or that changed between the
        # span's start and end (its latencies then mix two clocks), leaves the windows unsure
        (offset, sure), (start_offset, start_sure) = self.offset_at(end), self.offset_at(start)
        clock_step = not (sure and start_sure and abs(start_offset - offset) <= c.tolerance_ns)
        windows: dict[str, tuple[int, int]] = {}
        lead: dict[str, list[BufferedStep]] = {}
        ranks: dict[str, list[BufferedStep]] = {}
        engine, n_ranks, delta, incomplete, match = None, 0, 0, [], None
        if lat == "invalid_latency_attributes":
            outcome = lat
        elif instance is None:
            outcome = "unknown_instance"
        else:
            self.buffer.wait_for(end - offset, c.wait_s)
            if isinstance(lat, str):  # not vLLM's contract (or an older vLLM): the whole span is one window
                outcome = lat
                windows = {"request": (start, end)}
                pids = [p for r in instance.engines.values() for p in r]
                steps = [s for p in pids for s in self.buffer.ending_between(p, start - offset, end - offset)
                         if s.mid_ns >= start - offset]
                lead, ranks = {"request": steps}, {"request": steps}
                n_ranks = len({s.pid for s in steps})
            else:
                match = self.match(lat, start - offset, end - offset, instance)
                outcome = "joined" if match is not None else "no_steps"
                if match is not None:
                    engine, delta, lead, ranks = match.engine, match.delta, match.phases, match.ranks
                    n_ranks = len(match.rank_pids)
                    prefill_end = start + lat.queue + lat.prefill + delta
                    windows = {"prefill": (max(start, prefill_end - lat.prefill), prefill_end),
                               "decode": (prefill_end, min(end, prefill_end + lat.decode))}
            if windows and any(lead.values()):
                pids = sorted({s.pid for v in ranks.values() for s in v})
                lo = min(w[0] for w in windows.values()) - offset
                incomplete = self.buffer.incomplete(pids, lo, max(w[1] for w in windows.values()) - offset)
                if match is not None:
                    incomplete += match.unsure
                if clock_step:
                    incomplete.append("clock_step")
        every = [s for steps in lead.values() for s in steps]
        if not every and outcome == "joined":
            outcome = "no_steps"
        if not every and outcome == "no_latency_attributes":
            self.counters.no_steps += 1  # both: a window of the whole span, and nothing in it
        for s in every:
            s.claimed_by += 1
        setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)
        self.counters.incomplete += bool(incomplete)
        for why in incomplete:
            self.counters.incomplete_by[why] = self.counters.incomplete_by.get(why, 0) + 1
        parent_ids = {p: phase_parents.get(p, span.span_id) for p in windows}
        for phase, (w_start, w_end) in windows.items():
            if lead.get(phase):
                self._child(phase, w_start, w_end, lead[phase], ranks[phase], span.trace_id, parent_ids[phase],
                            engine, n_ranks)
        summary = summarize(every, [s for steps in ranks.values() for s in steps])
        for phase in windows:
            phase_summary = summarize(lead.get(phase, []), ranks.get(phase, []))
            for key in ("steps", "launches", "graph_launches"):
                summary[f"cuda.{phase}.{key}"] = phase_summary[f"cuda.{key}"]
        summary["cuda.join.outcome"] = outcome
        summary["cuda.join.complete"] = outcome == "joined" and not incomplete
        if incomplete:
            summary["cuda.join.incomplete"] = ",".join(incomplete)
        if engine is not None:
            summary["cuda.engine.pid"] = engine
            summary["cuda.join.shift_ns"] = delta
        if n_ranks:
            summary["cuda.ranks"] = n_ranks
        if instance is not None:
            summary["cuda.join.instance_by"] = instance.found_by
        span.attributes.extend(_kv(k, v) for k, v in summary.items())
        record = {
            "v": 1, "type": "request", "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
            "request_id": attrs.get(c.request_id_attribute), "ts": start, "dur_ns": end - start,
            "outcome": outcome, "complete": summary["cuda.join.complete"], "incomplete": incomplete,
            "engine_pid": engine, "ranks": n_ranks, "windows": {p: list(w) for p, w in windows.items()},
            "cuda": {p: {k.removeprefix("cuda."): v for k, v in summarize(lead[p], ranks[p]).items()}
                     for p in windows if p in lead},
        }
        if len(self.counters.by_request) < 10_000:
            self.counters.by_request.append(record)
        self.on_request(record)

    # -- alignment ---------------------------------------------------------------------------------------
    def match(self, lat: Latencies, start: int, end: int, instance: Instance) -> Match | None:
        """The engine and prefill step that fit the request best (times in CLOCK_MONOTONIC ns), or None."""
        scheduled0 = start + lat.queue  # vLLM's `scheduled`, were the engine's clock anchored at the arrival
        # delta (the engine's lag behind the frontend's arrival) is at most how far the frontend lags the engine:
        # it saw the first token at start + ttft and the last one before the span ended
        max_delta = max(0, end - (scheduled0 + lat.prefill + lat.decode))
        if lat.ttft is not None:
            max_delta = min(max_delta, max(0, start + lat.ttft - scheduled0 - lat.prefill))
        fits = []
        for engine, pids in instance.engines.items():
            ranks = [(pid, steps) for pid in pids if (steps := self.buffer.ending_between(pid, start, end))]
            if not ranks:
                continue
            lead = ranks[0][1]
            ends = [s.end_ns for s in lead]  # a step's tokens exist once every rank has read it back
            # the other ranks' steps a little beyond the span too: a rank whose last step ended just after it
            others = [a for pid, _ in ranks[1:]
                      if len(a := _aligned(lead, self.buffer.ending_between(pid, start - 10**9, end + 10**9)))
                      == len(lead)]
            for aligned in others:
                ends = [max(e, o.end_ns) for e, o in zip(ends, aligned)]
            fits += [(score, engine, (ranks, others), delta, k, i)
                     for score, delta, k, i in self._fits(lat, lead, ends, scheduled0, max_delta,
                                                          same_thread=len(pids) == 1 and pids[0] == engine)]
        if not fits:
            return None
        fits.sort(key=lambda f: f[0])  # what a placement breaks, then the least hop it needs
        score, engine, (ranks, others), delta, k, i = fits[0]
        every_rank = [ranks[0][1]] + others
        phases = {"prefill": every_rank[0][k:k + 1], "decode": every_rank[0][k + 1:i + 1]}
        every = {"prefill": [r[k] for r in every_rank], "decode": [s for r in every_rank for s in r[k + 1:i + 1]]}
        return Match(engine, tuple(pid for pid, _ in ranks), delta, phases, every, score, _unsure(fits))

    def _fits(self, lat: Latencies, steps: list[BufferedStep], ends: list[int], scheduled0: int, max_delta: int,
              same_thread: bool = False):
        """(score, delta, prefill step index, last-token step index) of each placement of the request on one
        rank's steps (sorted by end; `ends`: when every rank had read each back) that is possible.

        The facts, for a prefill step k and n = completion tokens (one per step: the last-token step is i = k+n-1):
        the scheduler took the request before step k's first launch — and, where the engine launches the steps
        itself (`same_thread`: one rank, vLLM's UniProcExecutor schedules and launches on one thread), after step
        k-1's readback was issued; a token is stamped after its step's readback ended and before the step two
        later was launched (with async scheduling the engine processes a step's output while the next one runs,
        and must have it before scheduling the one after); and delta lies in [0, max_delta].
        (Tensor-parallel workers get each step over IPC: their steps lag the scheduler.)
        Each fact bounds delta; a placement whose bounds cross breaks a fact by that much. The facts bound delta
        from above only by how far the frontend lags the engine (max_delta): while that lag is under a step, one
        placement breaks nothing, unless two steps' readbacks ended before one token was stamped (an output thread
        that stalled). When the frontend lags by more (a busy API server), the placements a step later break
        nothing either, each needing a larger delta. The score is (what the facts are broken by, the
        least delta the facts allow, the two token lags at it): the hop from the frontend to the engine's queue is
        usually far shorter than a step, so the placement that needs the least of it is the likeliest — a guess
        all the same, which match() reports as one (`ambiguous_step`)."""
        tol = self.config.tolerance_ns
        first0 = scheduled0 + lat.prefill
        last0 = first0 + lat.decode
        out = []
        for k, step in enumerate(steps):
            if step.start_ns < scheduled0 - tol:
                continue  # launched before the request can have been scheduled
            if lat.tokens:
                i = k + lat.tokens - 1
                if i >= len(steps):
                    continue
            else:
                i = max(k, bisect.bisect_right(ends, last0 + step.start_ns - scheduled0) - 1)
            low = max(0, ends[k] - first0, ends[i] - last0)
            if same_thread and k and steps[k - 1].sealed_ns >= 0:
                low = max(low, steps[k - 1].sealed_ns - scheduled0)
            high = min(max_delta, step.start_ns - scheduled0,
                       # ... and the engine stamped a step's tokens before it could schedule two steps later
                       # (vLLM's batch queue holds two steps), so before that step's first launch
                       steps[k + 2].start_ns - first0 if k + 2 < len(steps) else max_delta,
                       steps[i + 2].start_ns - last0 if i + 2 < len(steps) else max_delta)
            broken = max(0, low - high - tol)
            delta = min(max(low, 0), max(high, 0))
            lags = (first0 + delta - ends[k]) + (last0 + delta - ends[i])
            out.append(((broken, delta, lags), delta, k, i))
        return out

    def _child(self, phase: str, start: int, end: int, lead: list[BufferedStep], every_rank: list[BufferedStep],
               trace_id: bytes, parent_id: bytes, engine: int | None, ranks: int) -> None:
        parent = SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(parent_id, "big"), is_remote=True,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED))
        links = [Link(s.context, {"cuda.step.relation": "executed_in"}) for s in sample(lead, self.config.max_links)]
        attrs = summarize(lead, every_rank)
        attrs["cuda.steps.linked"] = len(links)
        attrs["cuda.processes"] = len({s.pid for s in every_rank})
        attrs["cuda.ranks"] = ranks
        if engine is not None:
            attrs["cuda.engine.pid"] = engine
        span = self.tracer_for(min(s.pid for s in lead)).start_span(
            f"cuda.{phase}", kind=SpanKind.INTERNAL, start_time=start,
            context=trace.set_span_in_context(NonRecordingSpan(parent)), links=links, attributes=attrs)
        span.end(end_time=max(start, end))
        self.counters.children += 1


def _unsure(fits: list) -> tuple:
    """Why the best placement (fits[0], sorted) is not certain: another one breaks no fact either — on another
    engine, or a step off on the same one (the frontend lagged the engine by more than a step, or the output
    thread stalled so that two steps' readbacks ended before one token was stamped) — and which of them ran the
    request is a guess."""
    broken, engine = fits[0][0][0], fits[0][1]
    if broken:
        return ("timing_mismatch",)  # every placement breaks a fact: the best is the least wrong
    others = [f[1] for f in fits[1:] if f[0][0] == 0]
    # another engine: data-parallel engines in lockstep (MoE models) or simply stepping alike
    return tuple(why for why, found in (("ambiguous_engine", any(e != engine for e in others)),
                                        ("ambiguous_step", engine in others)) if found)


def _aligned(lead: list[BufferedStep], other: list[BufferedStep]) -> list[BufferedStep]:
    """The other rank's steps that are the lead's, in the lead's order (tensor-parallel ranks run the same steps in
    the same order, a little apart in time): the run of as many consecutive steps whose ends lie nearest the
    lead's over the whole list; [] when the other rank has not as many."""
    if not other or not lead:
        return []
    near = bisect.bisect_left([s.end_ns for s in other], lead[0].end_ns)
    runs = range(max(0, near - 2), min(len(other) - len(lead), near + 2) + 1)
    if not runs:
        return []
    best = min(runs, key=lambda j: sum(abs(other[j + n].end_ns - s.end_ns) for n, s in enumerate(lead)))
    return other[best:best + len(lead)]
