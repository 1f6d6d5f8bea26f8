"""Forwarder over real sockets: SDK → receiver → forwarder → OtlpSink unchanged; outages bounded, counted and
recovered from."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from otel_cuda import forwarder as fw
from otel_cuda.forwarder import Forwarder, ForwarderConfig
from otel_cuda.otlp_sink import OtlpSink
from otel_cuda.receiver import OtlpReceiver, ReceiverConfig

FAST = dict(timeout=1.0, retry_initial_backoff=0.05, retry_max_backoff=0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch(n_spans: int, name: str) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    for i in range(n_spans):
        scope_spans.spans.add(trace_id=b"\x01" * 16, span_id=(i + 1).to_bytes(8, "big"), name=f"{name}.{i}")
    return request


def endpoint_for(protocol: str, port: int) -> str:
    return f"http://127.0.0.1:{port}" + ("/v1/traces" if protocol == "http/protobuf" else "")


def sink_on(protocol: str, port: int = 0) -> OtlpSink:
    if protocol == "grpc":
        return OtlpSink(grpc_address=f"127.0.0.1:{port}")
    return OtlpSink(grpc_address=None, http_address=f"127.0.0.1:{port}")


def sink_port(sink: OtlpSink, protocol: str) -> int:
    return sink.grpc_port if protocol == "grpc" else sink.http_port


def balanced(stats: fw.ForwarderStats) -> bool:
    return stats.received_spans == (stats.forwarded_spans + stats.dropped_spans + stats.queued_spans
                                    + stats.in_flight_spans)


# --- configuration -------------------------------------------------------------------------------------------------


def test_from_env_follows_the_otlp_exporter_variables():
    assert ForwarderConfig.from_env({}) == ForwarderConfig()
    config = ForwarderConfig.from_env({
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=secret%20value,x-tenant=a",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
    })
    assert config.endpoint == "http://collector:4318/v1/traces"  # the generic endpoint gets the signal path
    assert config.protocol == "http/protobuf"
    assert dict(config.headers) == {"api-key": "secret value", "x-tenant": "a"}
    assert config.timeout == 2.5 and config.compression == "gzip"
    # The TRACES variables win and are used as given; explicit overrides win over both.
    config = ForwarderConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4317",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4317",
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        },
        queue_max_spans=10,
    )
    assert (config.endpoint, config.protocol, config.insecure, config.queue_max_spans) == (
        "collector:4317", "grpc", True, 10)
    with pytest.raises(ValueError, match="http/json"):
        ForwarderConfig.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(TypeError, match="nope"):
        ForwarderConfig.from_env({}, nope=1)


def test_no_upstream_counts_everything_as_dropped():
    forwarder = Forwarder(ForwarderConfig(endpoint=None)).start()
    forwarder.forward(batch(3, "x"))
    forwarder.shutdown()
    stats = forwarder.stats()
    assert (stats.received_spans, stats.forwarded_spans, stats.dropped_by_reason) == (3, 0, {fw.NO_UPSTREAM: 3})


# --- the whole path, unchanged -------------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["grpc", "http/protobuf"])
def test_sdk_to_receiver_to_forwarder_to_sink_is_byte_identical(upstream):
    sink = sink_on(upstream).start()
    forwarder = Forwarder(ForwarderConfig(endpoint=endpoint_for(upstream, sink_port(sink, upstream)),
                                          protocol=upstream, **FAST)).start()
    handled: list[ExportTraceServiceRequest] = []

    def handle(request):  # what the lead's join does, minus the join
        handled.append(request)
        forwarder.forward(request)

    receiver = OtlpReceiver(ReceiverConfig(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0"), handle)
    receiver.start()
    try:
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource({"service.name": "vllm", "vllm.process_id": 4242}))
        provider.add_span_processor(SimpleSpanProcessor(memory))
        provider.add_span_processor(SimpleSpanProcessor(
            GrpcSpanExporter(endpoint=f"http://127.0.0.1:{receiver.grpc_port}", insecure=True, timeout=5)))
        provider.add_span_processor(SimpleSpanProcessor(
            HttpSpanExporter(endpoint=f"http://127.0.0.1:{receiver.http_port}/v1/traces", timeout=5)))
        tracer = provider.get_tracer("vllm.tracing.otel", "0.32.0")
        # The caller's traceparent: a remote, sampled parent, as vLLM extracts it.
        remote = SpanContext(trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id=0x00F067AA0BA902B7,
                             is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        linked = SpanContext(trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331,
                             is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        span = tracer.start_span(
            "llm_request", context=trace.set_span_in_context(NonRecordingSpan(remote)), kind=SpanKind.SERVER,
            attributes={"gen_ai.latency.time_in_queue": 0.001, "gen_ai.usage.prompt_tokens": 12,
                        "gen_ai.request.id": "cmpl-abc-0", "gen_ai.response.finish_reasons": '["stop"]',
                        "flag": True, "list": (1, 2, 3)},
            links=[Link(linked, {"cuda.step": 7})], start_time=1_700_000_000_000_000_000,
        )
        span.add_event("first_token", {"n": 1}, timestamp=1_700_000_000_100_000_000)
        span.set_status(Status(StatusCode.ERROR, "aborted"))
        span.end(end_time=1_700_000_000_500_000_000)
        provider.shutdown()

        assert sink.wait_for(lambda: len(sink.trace_requests()) == 2, timeout=5)
        expected = encode_spans(memory.get_finished_spans())
        assert handled == [expected, expected]
        assert sink.trace_requests() == [expected, expected]  # protobuf equality: every field, byte for byte
        assert [r.SerializeToString() for r in sink.trace_requests()] == [expected.SerializeToString()] * 2

        got = sink.spans()[0]
        assert got["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert got["parent_span_id"] == "00f067aa0ba902b7"
        assert got["span_id"] == format(span.get_span_context().span_id, "016x")
        assert got["flags"] == 0x300  # "parent is remote": has-is-remote | is-remote
        assert got["name"] == "llm_request" and got["kind"] == "SERVER"
        assert got["attributes"]["gen_ai.usage.prompt_tokens"] == 12 and got["attributes"]["list"] == [1, 2, 3]
        assert got["links"] == [{"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331",
                                 "attributes": {"cuda.step": 7}, "flags": 0x100}]
        assert got["events"] == [{"name": "first_token", "time_ns": 1_700_000_000_100_000_000, "attributes": {"n": 1}}]
        assert got["status"] == {"code": "ERROR", "message": "aborted"}
        assert got["resource"]["vllm.process_id"] == 4242
        assert (got["scope"], got["scope_version"]) == ("vllm.tracing.otel", "0.32.0")
    finally:
        receiver.shutdown()
        forwarder.shutdown()
        sink.stop()
    stats = forwarder.stats()
    assert (stats.received_spans, stats.forwarded_spans, stats.dropped_spans) == (2, 2, 0)


# --- outages -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["grpc", "http/protobuf"])
def test_upstream_down_bounds_memory_counts_drops_and_recovers(upstream):
    port = free_port()
    forwarder = Forwarder(ForwarderConfig(endpoint=endpoint_for(upstream, port), protocol=upstream,
                                          queue_max_spans=50, **FAST)).start()
    try:
        forwarder.forward(batch(10, "b00"))
        deadline = time.monotonic() + 2
        while forwarder.stats().in_flight_spans == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # let the sender take the first batch, so that what follows is deterministic
        started = time.monotonic()
        for i in range(1, 30):  # 300 spans in all against a 50-span bound, while nothing listens
            forwarder.forward(batch(10, f"b{i:02d}"))
            stats = forwarder.stats()
            assert stats.queued_spans <= 50
            assert balanced(stats)
        assert time.monotonic() - started < 0.5  # forward never waits for the upstream
        time.sleep(0.5)  # several failed attempts
        stats = forwarder.stats()
        assert stats.failures >= 2 and stats.retries >= 1 and stats.forwarded_spans == 0
        assert stats.last_error
        assert stats.queued_spans == 50 and stats.in_flight_spans == 10  # the bound, plus the batch on the wire
        assert stats.dropped_by_reason == {fw.QUEUE_FULL: 240}
        assert balanced(stats)

        with sink_on(upstream, port) as sink:  # the upstream comes back
            assert sink.wait_for(lambda: len(sink.spans()) == 60, timeout=5)
            forwarder.forward(batch(10, "after"))
            assert sink.wait_for(lambda: len(sink.spans()) == 70, timeout=5)
            names = sorted({s["name"].split(".")[0] for s in sink.spans()})
            # The batch that was on the wire (the first), then the newest five: oldest-first eviction.
            assert names == ["after", "b00", "b25", "b26", "b27", "b28", "b29"]
            # The sink holds a batch before the sender has read the reply and counted it: wait for the count.
            deadline = time.monotonic() + 5
            while forwarder.stats().forwarded_spans < 70 and time.monotonic() < deadline:
                time.sleep(0.005)
        stats = forwarder.stats()
        assert (stats.received_spans, stats.forwarded_spans, stats.dropped_spans) == (310, 70, 240)
        assert stats.queued_spans == stats.in_flight_spans == 0
    finally:
        forwarder.shutdown(timeout=1)


def test_shutdown_drains_the_queue_to_a_live_upstream():
    with OtlpSink() as sink:
        forwarder = Forwarder(ForwarderConfig(endpoint=sink.grpc_endpoint, **FAST))  # no start(): forward starts it
        for i in range(40):
            forwarder.forward(batch(5, f"q{i}"))
        forwarder.shutdown(timeout=5)
        assert sink.wait_for(lambda: len(sink.spans()) == 200, timeout=5)
    stats = forwarder.stats()
    assert (stats.forwarded_spans, stats.dropped_spans, stats.queued_spans) == (200, 0, 0)
    forwarder.forward(batch(2, "late"))  # after shutdown: counted, not sent
    assert forwarder.stats().dropped_by_reason == {fw.SHUTDOWN: 2}
    forwarder.shutdown()  # idempotent


def test_shutdown_with_the_upstream_down_is_bounded_and_counts_the_rest():
    forwarder = Forwarder(ForwarderConfig(endpoint=f"http://127.0.0.1:{free_port()}", timeout=5.0,
                                          retry_initial_backoff=2.0, retry_max_backoff=5.0)).start()
    for i in range(5):
        forwarder.forward(batch(4, f"d{i}"))
    time.sleep(0.2)  # the sender is in its first backoff
    started = time.monotonic()
    forwarder.shutdown(timeout=0.5)
    assert time.monotonic() - started < 1.5
    stats = forwarder.stats()
    assert (stats.received_spans, stats.forwarded_spans, stats.dropped_by_reason) == (20, 0, {fw.SHUTDOWN: 20})
    assert stats.queued_spans == stats.in_flight_spans == 0


# --- what the upstream says ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["grpc", "http/protobuf"])
def test_a_permanent_refusal_is_dropped_without_retrying(upstream):
    with OtlpSink(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", max_message_bytes=1024) as sink:
        forwarder = Forwarder(ForwarderConfig(endpoint=endpoint_for(upstream, sink_port(sink, upstream)),
                                              protocol=upstream, **FAST)).start()
        forwarder.forward(batch(100, "too-big"))  # over the sink's 1 KiB: INVALID_ARGUMENT / 413
        forwarder.forward(batch(1, "fine"))
        assert sink.wait_for(lambda: len(sink.spans()) == 1, timeout=5)
        forwarder.shutdown()
    stats = forwarder.stats()
    assert (stats.forwarded_spans, stats.dropped_by_reason) == (1, {fw.REJECTED: 100})
    assert (stats.failures, stats.retries) == (1, 0)


@pytest.mark.parametrize("upstream", ["grpc", "http/protobuf"])
def test_throttling_upstream_is_retried_after_its_delay(upstream):
    # The upstream is another OtlpReceiver whose queue is full: RESOURCE_EXHAUSTED + RetryInfo / 503 + Retry-After.
    gate = threading.Event()
    seen: list[ExportTraceServiceRequest] = []

    def slow(request):
        gate.wait(10)
        seen.append(request)

    upstream_receiver = OtlpReceiver(ReceiverConfig(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0",
                                                    queue_size=1, retry_after_s=0.1), slow)
    upstream_receiver.start()
    port = upstream_receiver.grpc_port if upstream == "grpc" else upstream_receiver.http_port
    forwarder = Forwarder(ForwarderConfig(endpoint=endpoint_for(upstream, port), protocol=upstream,
                                          timeout=1.0, retry_initial_backoff=0.05, retry_max_backoff=2.0)).start()
    try:
        for i in range(3):
            forwarder.forward(batch(1, f"t{i}"))
        deadline = time.monotonic() + 3
        while forwarder.stats().failures == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert forwarder.stats().failures >= 1  # the third batch met a full queue
        gate.set()
        deadline = time.monotonic() + 5
        while forwarder.stats().forwarded_spans < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = forwarder.stats()
        assert (stats.forwarded_spans, stats.dropped_spans) == (3, 0) and stats.retries >= 1
    finally:
        forwarder.shutdown()
        upstream_receiver.shutdown()
    assert [r.resource_spans[0].scope_spans[0].spans[0].name for r in seen] == ["t0.0", "t1.0", "t2.0"]


class _PartialServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):  # noqa: N802 - the generated name
        response = trace_service_pb2.ExportTraceServiceResponse()
        response.partial_success.rejected_spans = 2
        response.partial_success.error_message = "two spans too old"
        return response


def test_partial_success_counts_the_rejected_spans():
    server = grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_PartialServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        forwarder = Forwarder(ForwarderConfig(endpoint=f"http://127.0.0.1:{port}", **FAST)).start()
        forwarder.forward(batch(5, "p"))
        forwarder.shutdown(timeout=3)
    finally:
        server.stop(0)
    stats = forwarder.stats()
    assert (stats.forwarded_spans, stats.dropped_by_reason) == (3, {fw.PARTIAL_REJECTED: 2})
