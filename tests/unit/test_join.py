"""The join: llm_request spans (per vLLM's contract) x buffered steps -> children and summary attributes."""

import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext

from otel_cuda.join import BufferedStep, Joiner, JoinConfig, StepBuffer

MS = 1_000_000
OFFSET = 1_700_000_000_000 * MS  # epoch = monotonic + OFFSET in these tests
TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
PARENT = bytes.fromhex("b7ad6b7169203331")
SPAN = bytes.fromhex("00f067aa0ba902b7")


def llm_request(start_mono, queue=0.010, prefill=0.020, decode=0.050, with_latency=True):
    attrs = {"gen_ai.request.id": "cmpl-abc-0", "gen_ai.usage.prompt_tokens": 5}
    if with_latency:
        attrs.update({"gen_ai.latency.time_in_queue": queue, "gen_ai.latency.time_in_model_prefill": prefill,
                      "gen_ai.latency.time_in_model_decode": decode})
    kvs = [KeyValue(key=k, value=AnyValue(double_value=v) if isinstance(v, float) else
                    AnyValue(int_value=v) if isinstance(v, int) else AnyValue(string_value=v)) for k, v in attrs.items()]
    start = start_mono + OFFSET
    span = PbSpan(trace_id=TRACE, span_id=SPAN, parent_span_id=PARENT, name="llm_request", kind=PbSpan.SPAN_KIND_SERVER,
                  start_time_unix_nano=start, end_time_unix_nano=start + int((queue + prefill + decode) * 1e9) + MS,
                  attributes=kvs)
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name", value=AnyValue(string_value="vllm"))
    rs.scope_spans.add().spans.append(span)
    startup = rs.scope_spans.add().spans.add()
    startup.name, startup.trace_id, startup.span_id = "Load weights", TRACE, bytes(8)
    return req


def step(start, dur, launches, pid=7, n=1):
    ctx = SpanContext(0x1234, 0x5000 + start // MS, is_remote=False)
    return BufferedStep(pid, start, start + dur, launches, 0, 4096, dur // 2, dur // 4, ctx)


def make(config=JoinConfig(wait_s=0.0), now=lambda: 6_000 * MS):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    buf = StepBuffer(config, monotonic_ns=now)
    records = []
    joiner = Joiner(config, buf, lambda pid: provider.get_tracer("t"), lambda: OFFSET, lambda res: None, records.append)
    return joiner, buf, exporter, records


def attrs_of(pb_span):
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in pb_span.attributes}


def test_children_summarise_the_steps_in_each_window():
    joiner, buf, exporter, records = make()
    t0 = 1_000 * MS
    # queue [t0, t0+10ms) prefill [+10, +30) decode [+30, +80)
    buf.add(step(t0 + 2 * MS, 2 * MS, 99))  # in the queue window: nobody's
    buf.add(step(t0 + 12 * MS, 10 * MS, 30))  # prefill
    for i in range(5):
        buf.add(step(t0 + 31 * MS + i * 9 * MS, 8 * MS, 12))  # decode
    buf.add(step(t0 + 79 * MS, 4 * MS, 77))  # midpoint after the decode window: not ours
    req = llm_request(t0)
    joiner.handle(req)
    children = {s.name: s for s in exporter.get_finished_spans()}
    assert set(children) == {"cuda.prefill", "cuda.decode"}
    prefill, decode = children["cuda.prefill"], children["cuda.decode"]
    assert prefill.attributes["cuda.launches"] == 30 and prefill.attributes["cuda.steps"] == 1
    assert decode.attributes["cuda.launches"] == 60 and decode.attributes["cuda.steps"] == 5
    for child in (prefill, decode):
        assert child.context.trace_id == int.from_bytes(TRACE, "big")
        assert child.parent.span_id == int.from_bytes(SPAN, "big")
        assert all(link.context.trace_id == 0x1234 for link in child.links)
    assert prefill.start_time == t0 + 10 * MS + OFFSET and prefill.end_time == t0 + 30 * MS + OFFSET
    assert len(decode.links) == 5
    summary = attrs_of(req.resource_spans[0].scope_spans[0].spans[0])
    assert summary["cuda.launches"] == 90 and summary["cuda.join.outcome"] == "joined"
    assert attrs_of(req.resource_spans[0].scope_spans[1].spans[0]) == {}, "startup spans pass untouched"
    assert records[0]["cuda"]["decode"]["launches"] == 60 and records[0]["request_id"] == "cmpl-abc-0"


def test_shared_steps_are_attributed_to_every_request():
    joiner, buf, exporter, _ = make()
    t0 = 1_000 * MS
    for i in range(4):
        buf.add(step(t0 + 31 * MS + i * 10 * MS, 8 * MS, 10))
    joiner.handle(llm_request(t0))
    joiner.handle(llm_request(t0))
    decodes = [s for s in exporter.get_finished_spans() if s.name == "cuda.decode"]
    assert [d.attributes["cuda.launches"] for d in decodes] == [40, 40]
    assert [d.attributes["cuda.requests.shared_by"] for d in decodes] == [1, 2]


def test_missing_latency_attributes_and_empty_windows_are_clear_outcomes():
    joiner, buf, exporter, records = make()
    req = llm_request(5_000 * MS, with_latency=False)
    joiner.handle(req)
    assert attrs_of(req.resource_spans[0].scope_spans[0].spans[0])["cuda.join.outcome"] == "no_latency_attributes"
    assert joiner.counters.no_latency_attributes == 1 and joiner.counters.no_steps == 1
    req = llm_request(9_000 * MS)
    joiner.handle(req)
    assert attrs_of(req.resource_spans[0].scope_spans[0].spans[0])["cuda.join.outcome"] == "no_steps"
    assert exporter.get_finished_spans() == ()
    buf.add(step(5_001 * MS, MS, 3))
    req = llm_request(5_000 * MS, with_latency=False)
    joiner.handle(req)
    assert [s.name for s in exporter.get_finished_spans()] == ["cuda.request"]
    assert records[-1]["outcome"] == "no_latency_attributes"


def test_buffer_is_bounded_and_counts_evictions():
    now = [0]
    buf = StepBuffer(JoinConfig(max_steps=3, retention_s=1.0), monotonic_ns=lambda: now[0])
    for i in range(5):
        buf.add(step(i * MS, MS, 1))
    assert len(buf) == 3 and buf.evicted == 2
    now[0] = 10**10
    buf.add(step(10**10 - MS, MS, 1))
    assert len(buf) == 1 and buf.evicted == 5


def test_join_waits_for_the_pipeline_to_catch_up():
    config = JoinConfig(wait_s=2.0)
    joiner, buf, exporter, _ = make(config)
    t0 = time.monotonic_ns()
    import threading
    def late():
        time.sleep(0.2)
        buf.add(step(t0 + 31 * MS, 8 * MS, 5))
        buf.advance(t0 + 10**9)
    threading.Thread(target=late).start()
    joiner.handle(llm_request(t0))
    assert [s.attributes["cuda.launches"] for s in exporter.get_finished_spans() if s.name == "cuda.decode"] == [5]
