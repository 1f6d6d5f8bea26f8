"""The join: llm_request spans (per vLLM's contract) x buffered steps -> children and summary attributes.

The engines here are simulated the way vLLM's run (async scheduling: a step is launched before the previous step's
tokens are read back; tokens are stamped a few ms after the readback; the frontend sees arrival before the engine
queues the request and the tokens after the engine made them), and every request knows the steps it took part in.
"""

import random
import threading
import time
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext

from otel_cuda.instances import Instance
from otel_cuda.join import BufferedStep, Joiner, JoinConfig, StepBuffer

MS = 1_000_000
OFFSET = 1_700_000_000_000 * MS  # epoch = monotonic + OFFSET in these tests
PARENT = bytes.fromhex("b7ad6b7169203331")


def kvs(attrs: dict):
    return [KeyValue(key=k, value=AnyValue(double_value=v) if isinstance(v, float) else
                     AnyValue(int_value=v) if isinstance(v, int) else AnyValue(string_value=v))
            for k, v in attrs.items()]


def llm_request(start_mono, end_mono, queue, prefill, decode, ttft=None, tokens=None, span_id=1, extra=()):
    """An ExportTraceServiceRequest with one llm_request span built to vLLM's contract (latencies in ns here)."""
    attrs = {"gen_ai.request.id": f"cmpl-{span_id}-0", "gen_ai.usage.prompt_tokens": 5}
    if queue is not None:
        attrs.update({"gen_ai.latency.time_in_queue": queue / 1e9, "gen_ai.latency.time_in_model_prefill": prefill / 1e9,
                      "gen_ai.latency.time_in_model_decode": decode / 1e9})
    if ttft is not None:
        attrs["gen_ai.latency.time_to_first_token"] = ttft / 1e9
    if tokens is not None:
        attrs["gen_ai.usage.completion_tokens"] = tokens
    span = PbSpan(trace_id=span_id.to_bytes(16, "big"), span_id=span_id.to_bytes(8, "big"), parent_span_id=PARENT,
                  name="llm_request", kind=PbSpan.SPAN_KIND_SERVER, start_time_unix_nano=start_mono + OFFSET,
                  end_time_unix_nano=end_mono + OFFSET, attributes=kvs(attrs))
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name", value=AnyValue(string_value="vllm"))
    rs.scope_spans.add().spans.append(span)
    for name, sid in extra:
        rs.scope_spans[0].spans.add(trace_id=span.trace_id, span_id=sid, parent_span_id=span.span_id, name=name)
    startup = rs.scope_spans.add().spans.add()
    startup.name, startup.trace_id, startup.span_id = "Load weights", span.trace_id, bytes(8)
    return req


def span_attrs(req, scope=0):
    pb = req.resource_spans[0].scope_spans[scope].spans[0]
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in pb.attributes}


def make(engines, config=JoinConfig(wait_s=0.0), now=lambda: 10**9):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    buf = StepBuffer(config, monotonic_ns=now)
    records = []
    instance = None if engines is None else Instance(1, engines, "peer")
    joiner = Joiner(config, buf, lambda pid: provider.get_tracer("t"), lambda wall: (OFFSET, True),
                    lambda resource, peer: instance, records.append)
    return joiner, buf, exporter, records


@dataclass
class Request:
    id: int
    arrival: int
    tokens: int
    engine: int = 0
    queued: int = 0
    scheduled: int = 0
    first: int = 0
    last: int = 0
    end: int = 0
    prefill: list = field(default_factory=list)  # the lead rank's step indexes
    decode: list = field(default_factory=list)


class Engine:
    """One engine of a simulated vLLM: async scheduling, token stamps 1-4 ms after each readback."""

    def __init__(self, pid, ranks, buf, rng, period_ms=(6, 9), launches=(20, 40)):
        self.pid, self.ranks, self.buf, self.rng = pid, ranks, buf, rng
        self.period_ms, self.launches = period_ms, launches
        self.t = 0
        self.steps = []  # (start, end, launches per rank)

    def run(self, requests, until):
        waiting = sorted(requests, key=lambda r: r.arrival)
        running = []
        prev_end = prev_stamp = 0
        t = 0
        while t < until and (waiting or running):
            ready = [r for r in waiting if r.queued <= t]
            for r in ready:
                waiting.remove(r)
                r.scheduled = t
                running.append(r)
            if not running:
                t = min(r.queued for r in waiting)
                continue
            start = t + MS // 10  # launched right after scheduling
            sealed = start + self.rng.randint(MS // 5, MS)  # the launches issued, the readback copy too
            end = max(sealed, prev_end) + int(self.rng.uniform(*self.period_ms) * MS)
            n = self.rng.randint(*self.launches)
            k = len(self.steps)
            self.steps.append((start, end, n))
            for rank in self.ranks:
                jitter = self.rng.randint(0, 200_000)  # ranks' readbacks end a little apart
                self.buf.add(BufferedStep(rank, start, end + jitter, n, 0, 64, 0, 0, SpanContext(0x99, k + 1, False),
                                          sealed_ns=sealed))
            stamp = end + self.rng.randint(1 * MS, 4 * MS)  # vLLM stamps the tokens after processing the output
            for r in running:
                if not r.prefill:
                    r.prefill.append(k)
                    r.first = stamp
                else:
                    r.decode.append(k)
                r.last = stamp
            done = [r for r in running if len(r.decode) + 1 == r.tokens]
            for r in done:
                running.remove(r)
                r.end = stamp + self.rng.randint(MS // 2, 3 * MS)  # the frontend processes the last output
            prev_end = end
            # async scheduling with vLLM's batch queue of 2: the next step is scheduled while this one runs, but
            # not before the previous step's output was processed
            t = max(sealed + self.rng.randint(MS // 10, MS), prev_stamp)
            prev_stamp = stamp

    def expected(self, r, phase):
        idx = r.prefill if phase == "prefill" else r.decode
        return len(idx), sum(self.steps[i][2] for i in idx) * len(self.ranks)


def simulate(buf, engines_spec, n_requests, seed):
    rng = random.Random(seed)
    engines = [Engine(pid, ranks, buf, rng, period_ms=period) for pid, ranks, period in engines_spec]
    requests = []
    for i in range(n_requests):
        r = Request(i + 1, arrival=rng.randint(0, 300) * MS, tokens=rng.randint(2, 12),
                    engine=rng.randrange(len(engines)))
        r.queued = r.arrival + rng.randint(MS // 5, 2 * MS)  # tokenized and sent to the engine
        requests.append(r)
    for k, e in enumerate(engines):
        e.run([r for r in requests if r.engine == k], until=10**12)
    return engines, requests


def span_of(r, frontend_lag=300_000):
    """The frontend gets each output `frontend_lag` after the engine stamped it (a little, unless it is busy)."""
    queue, prefill, decode = r.scheduled - r.queued, r.first - r.scheduled, r.last - r.first
    ttft = r.first - r.arrival + frontend_lag
    return llm_request(r.arrival, max(r.end, r.last + frontend_lag), queue, prefill, decode, ttft=ttft,
                       tokens=r.tokens, span_id=r.id)


def check_every_request_is_exact(engines_spec, n=40, seeds=range(5), frontend_lag_ms=None, unsure_of=(),
                                 guessed_right=None):
    """Every request joined with exactly its steps, or said to be unsure (`cuda.join.complete=false`) for one of
    the reasons `unsure_of` allows. Returns how many were unsure; `guessed_right` collects, per unsure request,
    whether the join's best guess was right all the same."""
    unsure = 0
    for seed in seeds:
        joiner, buf, exporter, records = make({pid: tuple(ranks) for pid, ranks, _ in engines_spec})
        engines, requests = simulate(buf, engines_spec, n, seed)
        lag = random.Random(seed)
        for r in sorted(requests, key=lambda r: r.end):
            req = span_of(r, int(lag.uniform(*frontend_lag_ms) * MS) if frontend_lag_ms else 300_000)
            joiner.handle(req)
            got = span_attrs(req)
            e = engines[r.engine]
            want = {"cuda.join.outcome": "joined", "cuda.engine.pid": e.pid, "cuda.ranks": len(e.ranks),
                    **{f"cuda.{p}.{k}": v for p in ("prefill", "decode")
                       for k, v in zip(("steps", "launches"), e.expected(r, p))}}
            if got.get("cuda.join.incomplete") in unsure_of:
                unsure += 1
                assert got["cuda.join.complete"] is False
                if guessed_right is not None:
                    guessed_right.append({k: got.get(k) for k in want} == want)
                continue
            assert {k: got.get(k) for k in want} == want, f"seed {seed}, request {r.id}"
            assert got["cuda.join.complete"] is True
        assert joiner.counters.joined == n
    return unsure


def test_async_scheduling_with_token_lag_places_every_request_on_its_own_steps():
    assert check_every_request_is_exact([(100, [100], (6, 9))]) == 0


def test_data_parallel_engines_each_request_on_the_engine_that_ran_it():
    """Two engines stepping side by side: where both fit every fact, the join says so instead of guessing."""
    unsure = check_every_request_is_exact([(100, [100], (5, 8)), (200, [200], (7, 11))],
                                          unsure_of=("ambiguous_engine",))
    assert unsure <= 200 // 10, f"{unsure} of 200 requests could not be placed on one engine"


def test_tensor_parallel_ranks_counted_once_launches_summed():
    assert check_every_request_is_exact([(100, [101, 102], (6, 9))], n=20, seeds=range(2)) == 0


def test_a_frontend_lagging_by_more_than_a_step_makes_the_join_unsure_never_wrong():
    """A busy API server sees the engine's outputs late: 0-20 ms here, steps every 6-9 ms. Then a placement a step
    later fits the facts as well; the join must say it is unsure (`ambiguous_step`) rather than give a wrong answer
    as a sure one — and of the placements that fit, the one needing the least hop is its best guess."""
    right = []
    for engines in ([(100, [100], (6, 9))], [(100, [101, 102], (6, 9))]):
        unsure = check_every_request_is_exact(engines, frontend_lag_ms=(0, 20), unsure_of=("ambiguous_step",),
                                              guessed_right=right)
        assert 0 < unsure < 200 * 0.6, unsure  # with a lag under a step (the tests above) there are none
    assert right.count(True) >= 0.9 * len(right), f"{right.count(True)} of {len(right)} guesses right"
    # the engine is not in doubt when only one engine exists, and a lag that breaks a fact would say so
    assert check_every_request_is_exact([(100, [100], (6, 9))], frontend_lag_ms=(0.1, 0.5)) == 0


def test_a_request_no_placement_fits_is_joined_on_the_least_broken_and_said_to_be():
    """The engine says the first token came 1 ms after arrival and the frontend saw it then, but no step had ended
    by then (an engine stalled before stamping, a clock step): the least broken placement, marked as such."""
    joiner, buf, _, _ = make({100: (100,)})
    for k in range(6):
        buf.add(BufferedStep(100, k * 10 * MS, k * 10 * MS + 8 * MS, 10 + k, 0, 0, 0, 0, None))
    req = llm_request(0, 40 * MS, 0, 1 * MS, 10 * MS, ttft=1 * MS, tokens=2)
    joiner.handle(req)
    got = span_attrs(req)
    assert (got["cuda.join.outcome"], got["cuda.join.complete"], got["cuda.join.incomplete"]) == (
        "joined", False, "timing_mismatch")
    assert (got["cuda.prefill.launches"], got["cuda.decode.launches"]) == (10, 11)  # the first step: least broken


def test_a_wall_clock_step_during_a_request_leaves_its_join_unsure():
    """The VM's wall clock stepped 18 ms while the request ran (its span's start and end were read on either side
    of the step), or around its end between two samples: the windows cannot be placed for sure."""
    for offset_at in (lambda wall: (OFFSET + (18 * MS if wall > OFFSET + 150 * MS else 0), True),
                      lambda wall: (OFFSET, wall < OFFSET + 150 * MS)):
        joiner, buf, _, _ = make({100: (100,)})
        joiner.offset_at = offset_at
        _, requests = simulate(buf, [(100, [100], (6, 9))], 40, seed=1)
        r = next(r for r in requests if r.arrival < 150 * MS < r.end)
        req = span_of(r)
        joiner.handle(req)
        got = span_attrs(req)
        assert got["cuda.join.complete"] is False and "clock_step" in got["cuda.join.incomplete"].split(",")
        assert joiner.counters.incomplete_by["clock_step"] == 1


def test_children_are_in_the_callers_trace_with_links_to_the_steps():
    joiner, buf, exporter, _ = make({100: (100,)})
    engines, requests = simulate(buf, [(100, [100], (6, 9))], 1, seed=7)
    r = requests[0]
    req = span_of(r)
    joiner.handle(req)
    children = {s.name: s for s in exporter.get_finished_spans()}
    assert set(children) == {"cuda.prefill", "cuda.decode"}
    for child in children.values():
        assert child.context.trace_id == r.id and child.parent.span_id == r.id
        assert all(link.context.trace_id == 0x99 for link in child.links)
    assert [link.context.span_id for link in children["cuda.decode"].links] == [k + 1 for k in r.decode][:16]
    assert children["cuda.decode"].end_time <= r.end + OFFSET
    assert span_attrs(req, 0).get("cuda.join.outcome") == "joined"
    assert span_attrs(req, 1) == {}, "startup spans pass untouched"


def test_server_phase_spans_become_the_parents():
    joiner, buf, exporter, _ = make({100: (100,)})
    _, requests = simulate(buf, [(100, [100], (6, 9))], 1, seed=3)
    r = requests[0]
    pre, dec = (0xA1).to_bytes(8, "big"), (0xA2).to_bytes(8, "big")
    req = span_of(r)
    phase = llm_request(r.arrival, r.end, 0, 0, 0, span_id=r.id, extra=(("vllm_prefill", pre), ("vllm_decode", dec)))
    req.resource_spans[0].scope_spans[0].spans.extend(phase.resource_spans[0].scope_spans[0].spans[1:])
    joiner.handle(req)
    parents = {s.name: s.parent.span_id for s in exporter.get_finished_spans()}
    assert parents == {"cuda.prefill": 0xA1, "cuda.decode": 0xA2}


def test_shared_steps_are_attributed_to_every_request():
    joiner, buf, exporter, _ = make({100: (100,)})
    _, requests = simulate(buf, [(100, [100], (6, 9))], 6, seed=11)
    for r in requests:
        joiner.handle(span_of(r))
    shared = max(s.attributes["cuda.requests.shared_by"] for s in exporter.get_finished_spans())
    steps_of = [set(r.prefill + r.decode) for r in requests]
    assert shared == max(sum(k in s for s in steps_of) for k in set().union(*steps_of))


def test_an_aborted_requests_impossible_latencies_claim_nothing():
    joiner, buf, exporter, records = make({100: (100,)})
    for k in range(50_000 // 1000):
        buf.add(BufferedStep(100, k * MS, k * MS + MS // 2, 10, 0, 0, 0, 0, None))
    start = 10 * MS
    uptime = 3600 * 10**9  # decode ~ the machine's uptime, prefill negative: vLLM's attributes of an aborted request
    for queue, prefill, decode in ((0, -5 * MS, uptime), (0, 1 * MS, uptime), (float("nan"), 0, 0)):
        req = llm_request(start, start + 50 * MS, queue, prefill, decode, ttft=MS, tokens=3)
        joiner.handle(req)
        attrs = span_attrs(req)
        assert attrs["cuda.join.outcome"] == "invalid_latency_attributes" and attrs["cuda.join.complete"] is False
        assert "cuda.prefill.steps" not in attrs and "cuda.steps" in attrs and attrs["cuda.steps"] == 0
    assert exporter.get_finished_spans() == () and joiner.counters.invalid_latency_attributes == 3
    assert all(s.claimed_by == 0 for s in buf.ending_between(100, 0, 10**12))
    assert records[-1]["outcome"] == "invalid_latency_attributes"


def test_unknown_instance_claims_nothing():
    joiner, buf, exporter, _ = make(None)
    _, requests = simulate(buf, [(100, [100], (6, 9))], 1, seed=1)
    req = span_of(requests[0])
    joiner.handle(req)
    assert span_attrs(req)["cuda.join.outcome"] == "unknown_instance" and exporter.get_finished_spans() == ()
    assert joiner.counters.unknown_instance == 1


def test_loss_eviction_and_a_late_attach_make_the_join_incomplete():
    for touch, reason in ((lambda b, r: b.gap(r.first - MS, r.first, "ringbuf_loss"), "ringbuf_loss"),
                          (lambda b, r: b.traced_since(100, r.queued + MS), "attached_mid_request"),
                          (lambda b, r: b.gap(r.end + 10 * MS, r.end + 20 * MS, "ringbuf_loss"), None)):
        joiner, buf, _, records = make({100: (100,)})
        _, requests = simulate(buf, [(100, [100], (6, 9))], 1, seed=5)
        r = requests[0]
        touch(buf, r)
        req = span_of(r)
        joiner.handle(req)
        attrs = span_attrs(req)
        assert attrs["cuda.join.outcome"] == "joined"
        assert attrs["cuda.join.complete"] is (reason is None)
        assert attrs.get("cuda.join.incomplete") == reason and records[0]["incomplete"] == ([reason] if reason else [])
    now = [0]
    buf = StepBuffer(JoinConfig(max_steps=3), monotonic_ns=lambda: now[0])
    for i in range(5):
        buf.add(BufferedStep(100, i * MS, i * MS + MS // 2, 1, 0, 0, 0, 0, None))
    assert buf.incomplete([100], MS, 5 * MS) == ["steps_evicted"] and buf.incomplete([100], 2 * MS, 5 * MS) == []


def test_missing_latency_attributes_and_empty_windows_are_clear_outcomes():
    joiner, buf, exporter, records = make({100: (100,)})
    req = llm_request(5_000 * MS, 5_010 * MS, None, None, None)
    joiner.handle(req)
    assert span_attrs(req)["cuda.join.outcome"] == "no_latency_attributes"
    assert joiner.counters.no_latency_attributes == 1 and joiner.counters.no_steps == 1
    req = llm_request(9_000 * MS, 9_100 * MS, 10 * MS, 20 * MS, 50 * MS, tokens=4)
    joiner.handle(req)
    assert span_attrs(req)["cuda.join.outcome"] == "no_steps"
    assert exporter.get_finished_spans() == ()
    buf.add(BufferedStep(100, 5_001 * MS, 5_002 * MS, 3, 0, 0, 0, 0, None))
    req = llm_request(5_000 * MS, 5_010 * MS, None, None, None)
    joiner.handle(req)
    assert [s.name for s in exporter.get_finished_spans()] == ["cuda.request"]
    assert records[-1]["outcome"] == "no_latency_attributes" and span_attrs(req)["cuda.launches"] == 3


def test_buffer_is_bounded_and_counts_evictions():
    now = [0]
    buf = StepBuffer(JoinConfig(max_steps=3, retention_s=1.0), monotonic_ns=lambda: now[0])
    for i in range(5):
        buf.add(BufferedStep(100 + i % 2, i * MS, i * MS + MS, 1, 0, 0, 0, 0, None))
    assert len(buf) == 3 and buf.evicted == 2
    assert [s.start_ns for p in (100, 101) for s in buf.ending_between(p, 0, 10**12)] == [2 * MS, 4 * MS, 3 * MS]
    now[0] = 10**10
    buf.add(BufferedStep(100, 10**10 - MS, 10**10, 1, 0, 0, 0, 0, None))
    assert len(buf) == 1 and buf.evicted == 5


def test_join_waits_for_the_pipeline_to_catch_up():
    joiner, buf, exporter, _ = make({100: (100,)}, JoinConfig(wait_s=2.0))
    t0 = time.monotonic_ns()

    def late():
        time.sleep(0.2)
        buf.add(BufferedStep(100, t0 + 12 * MS, t0 + 20 * MS, 30, 0, 0, 0, 0, None))
        buf.add(BufferedStep(100, t0 + 21 * MS, t0 + 40 * MS, 5, 0, 0, 0, 0, None))
        buf.advance(t0 + 10**9)

    threading.Thread(target=late).start()
    req = llm_request(t0, t0 + 45 * MS, 10 * MS, 12 * MS, 20 * MS, tokens=2)
    joiner.handle(req)
    assert (span_attrs(req)["cuda.prefill.launches"], span_attrs(req)["cuda.decode.launches"]) == (30, 5)


def test_a_process_of_the_engine_without_steps_is_not_a_rank():
    """vLLM's worker forks `file -b python3` at start (platform.architecture()): traced, gone, never a rank."""
    joiner, buf, _, _ = make({100: (100, 555)})
    _, requests = simulate(buf, [(100, [100], (6, 9))], 1, seed=2)
    req = span_of(requests[0])
    joiner.handle(req)
    assert span_attrs(req)["cuda.ranks"] == 1
