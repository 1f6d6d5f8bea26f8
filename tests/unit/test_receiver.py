"""OtlpReceiver over real sockets: the real OTel SDK exporters in, every refusal answered per OTLP and counted."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_cuda import receiver as rx
from otel_cuda.receiver import OtlpReceiver, ReceiverBindError, ReceiverConfig, parse_otlp_json, to_otlp_json

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
METRICS_EXPORT = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
LOGS_EXPORT = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"


class Collect:
    """A handler recording what it is given; optionally blocked until released."""

    def __init__(self, gate: threading.Event | None = None, delay: float = 0.0) -> None:
        self.requests: list = []
        self.gate = gate
        self.delay = delay
        self.cond = threading.Condition()
        self.entered = threading.Event()  # set once the worker is inside the handler

    def __call__(self, request) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        with self.cond:
            self.requests.append(request)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.requests) >= n, timeout)

    def span_names(self) -> list[str]:
        return [s.name for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]


def make_request(n_spans: int = 1, name: str = "s", pad: int = 0) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    for i in range(n_spans):
        span = scope_spans.spans.add(
            trace_id=bytes.fromhex("0af7651916cd43dd8448eb211c80319c"),
            span_id=(i + 1).to_bytes(8, "big"),
            name=f"{name}{i}",
            kind=trace_pb2.Span.SPAN_KIND_SERVER,
            start_time_unix_nano=1_000,
            end_time_unix_nano=2_000,
        )
        if pad:
            span.attributes.add(key="pad").value.string_value = "x" * pad
    return request


@pytest.fixture
def start_receiver():
    started: list[OtlpReceiver] = []

    def start(handle=None, handlers=None, **config) -> OtlpReceiver:
        config.setdefault("grpc_address", "127.0.0.1:0")
        config.setdefault("http_address", "127.0.0.1:0")
        receiver = OtlpReceiver(ReceiverConfig(**config), handle or Collect(), **(handlers or {}))
        receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.shutdown(timeout=2)


def grpc_call(port: int, body: bytes, method: str = TRACE_EXPORT):
    """Raw bytes over gRPC; returns (code, details, trailing metadata dict)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(method)
        try:
            call(body, timeout=5)
            return grpc.StatusCode.OK, "", {}
        except grpc.RpcError as error:
            return error.code(), error.details(), dict(error.trailing_metadata() or ())


def http_post(port: int, body: bytes, content_type: str = "application/x-protobuf", path: str = "/v1/traces",
              method: str = "POST", **headers: str):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type, **headers})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def status_of(body: bytes, content_type: str = "application/x-protobuf") -> status_pb2.Status:
    if content_type == "application/json":
        return parse_otlp_json(body, status_pb2.Status)
    return status_pb2.Status.FromString(body)


def requests_counted(receiver: OtlpReceiver, **attrs: str) -> int:
    return receiver.counters.get(rx.RECEIVED_REQUESTS, **attrs)


def test_real_sdk_exporters_grpc_and_http_reach_the_handler(start_receiver):
    handle = Collect()
    receiver = start_receiver(handle)
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "vllm", "vllm.process_id": 42}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(SimpleSpanProcessor(
        GrpcSpanExporter(endpoint=f"http://127.0.0.1:{receiver.grpc_port}", insecure=True, timeout=5)))
    provider.add_span_processor(SimpleSpanProcessor(
        HttpSpanExporter(endpoint=f"http://127.0.0.1:{receiver.http_port}/v1/traces", timeout=5)))
    with provider.get_tracer("vllm.tracing.otel").start_as_current_span(
        "llm_request", attributes={"gen_ai.latency.e2e": 0.5, "gen_ai.usage.prompt_tokens": 7}
    ):
        pass
    assert handle.wait(2)
    provider.shutdown()
    expected = encode_spans(memory.get_finished_spans())
    assert handle.requests == [expected, expected]  # both transports deliver exactly what the SDK encoded
    assert requests_counted(receiver, outcome=rx.ACCEPTED, transport="grpc") == 1
    assert requests_counted(receiver, outcome=rx.ACCEPTED, transport="http") == 1
    assert receiver.counters.get(rx.RECEIVED_SPANS, outcome=rx.ACCEPTED) == 2


def test_http_json_and_gzip_bodies_are_accepted(start_receiver):
    handle = Collect()
    receiver = start_receiver(handle)
    request = make_request(2, name="json")
    # OTLP/JSON as the spec writes it: hex ids, integer enum.
    body = to_otlp_json(request)
    span_json = json.loads(body)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span_json["traceId"] == "0af7651916cd43dd8448eb211c80319c" and span_json["kind"] == 2
    status, headers, reply = http_post(receiver.http_port, body.encode(), "application/json; charset=utf-8")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert parse_otlp_json(reply, ExportTraceServiceResponse) == ExportTraceServiceResponse()
    status, headers, reply = http_post(receiver.http_port, gzip.compress(make_request(1, "gz").SerializeToString()),
                                       **{"Content-Encoding": "gzip"})
    assert status == 200 and headers["Content-Type"] == "application/x-protobuf"
    assert ExportTraceServiceResponse.FromString(reply) == ExportTraceServiceResponse()
    assert handle.wait(2)
    assert handle.requests[0] == request
    assert handle.span_names() == ["json0", "json1", "gz0"]


def test_malformed_requests_are_refused_counted_and_serving_continues(start_receiver):
    handle = Collect()
    receiver = start_receiver(handle)
    code, details, _ = grpc_call(receiver.grpc_port, b"\xff\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cannot decode" in details
    bad_bodies = [
        (b"\xff\xff\xff\xff", "application/x-protobuf", {}),
        (b"{not json", "application/json", {}),
        (b'{"resourceSpans": "not a list"}', "application/json", {}),
        (b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}', "application/json", {}),
        (b"[1, 2]", "application/json", {}),
        (b"not gzip at all", "application/x-protobuf", {"Content-Encoding": "gzip"}),
        (gzip.compress(make_request().SerializeToString())[:-12], "application/x-protobuf",
         {"Content-Encoding": "gzip"}),  # truncated
    ]
    for body, content_type, headers in bad_bodies:
        status, reply_headers, reply = http_post(receiver.http_port, body, content_type, **headers)
        assert status == 400, body
        assert reply_headers["Content-Type"] == content_type.split(";")[0]
        assert status_of(reply, content_type).message  # a google.rpc.Status saying why
    assert requests_counted(receiver, outcome=rx.MALFORMED, transport="grpc") == 1
    assert requests_counted(receiver, outcome=rx.MALFORMED, transport="http") == len(bad_bodies)
    # Still serving, on both transports.
    assert grpc_call(receiver.grpc_port, make_request(name="ok-grpc").SerializeToString())[0] == grpc.StatusCode.OK
    assert http_post(receiver.http_port, make_request(name="ok-http").SerializeToString())[0] == 200
    assert handle.wait(2)
    assert handle.span_names() == ["ok-grpc0", "ok-http0"]


def test_oversized_requests_are_refused_and_counted(start_receiver):
    handle = Collect()
    limit = 64 * 1024
    receiver = start_receiver(handle, max_message_bytes=limit)
    big = make_request(pad=limit + 10)
    code, details, _ = grpc_call(receiver.grpc_port, big.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"limit of {limit} bytes" in details
    status, _, reply = http_post(receiver.http_port, big.SerializeToString())
    assert status == 413 and "exceeds" in status_of(reply).message
    status, _, reply = http_post(receiver.http_port, to_otlp_json(big).encode(), "application/json")
    assert status == 413 and "exceeds" in status_of(reply, "application/json").message
    # A gzip bomb: small on the wire, over the limit once inflated.
    bomb = gzip.compress(make_request(pad=limit * 4).SerializeToString())
    assert len(bomb) < limit
    status, _, _ = http_post(receiver.http_port, bomb, **{"Content-Encoding": "gzip"})
    assert status == 413
    assert requests_counted(receiver, outcome=rx.OVERSIZED, transport="grpc") == 1
    assert requests_counted(receiver, outcome=rx.OVERSIZED, transport="http") == 3
    # The connection after a 413 is still usable, and the receiver keeps serving.
    connection = http.client.HTTPConnection("127.0.0.1", receiver.http_port, timeout=5)
    connection.request("POST", "/v1/traces", body=big.SerializeToString(),
                       headers={"Content-Type": "application/x-protobuf"})
    first = connection.getresponse()
    first.read()
    connection.request("POST", "/v1/traces", body=make_request(name="after").SerializeToString(),
                       headers={"Content-Type": "application/x-protobuf"})
    assert (first.status, connection.getresponse().status) == (413, 200)
    connection.close()
    assert grpc_call(receiver.grpc_port, make_request(name="grpc-after").SerializeToString())[0] == grpc.StatusCode.OK
    assert handle.wait(2)
    assert handle.span_names() == ["after0", "grpc-after0"]


def test_unsupported_media_paths_and_methods(start_receiver):
    receiver = start_receiver()
    body = make_request().SerializeToString()
    assert http_post(receiver.http_port, body, "text/plain")[0] == 415
    assert http_post(receiver.http_port, body, **{"Content-Encoding": "br"})[0] == 415
    assert requests_counted(receiver, outcome=rx.UNSUPPORTED_MEDIA_TYPE) == 2
    assert http_post(receiver.http_port, body, path="/v1/nothing")[0] == 404
    assert requests_counted(receiver, outcome=rx.NOT_FOUND) == 1
    status, headers, _ = http_post(receiver.http_port, b"", method="GET")
    assert status == 405 and headers["Allow"] == "POST"


def test_metrics_and_logs_without_handler_are_unimplemented_clearly(start_receiver):
    receiver = start_receiver()
    metrics = ExportMetricsServiceRequest()
    metrics.resource_metrics.add().scope_metrics.add().metrics.add(name="m").gauge.data_points.add(as_int=1)
    code, details, _ = grpc_call(receiver.grpc_port, metrics.SerializeToString(), METRICS_EXPORT)
    assert code == grpc.StatusCode.UNIMPLEMENTED and "takes no metrics" in details
    assert grpc_call(receiver.grpc_port, b"", LOGS_EXPORT)[0] == grpc.StatusCode.UNIMPLEMENTED
    status, _, reply = http_post(receiver.http_port, metrics.SerializeToString(), path="/v1/metrics")
    assert status == 501 and "Collector" in status_of(reply).message
    assert http_post(receiver.http_port, b"", path="/v1/logs")[0] == 501
    assert requests_counted(receiver, outcome=rx.UNIMPLEMENTED) == 4


def test_metrics_with_a_handler_are_accepted_unchanged(start_receiver):
    metrics_seen = Collect()
    receiver = start_receiver(handlers={"handle_metrics": metrics_seen})
    metrics = ExportMetricsServiceRequest()
    metrics.resource_metrics.add().scope_metrics.add().metrics.add(name="m").gauge.data_points.add(as_int=1)
    assert grpc_call(receiver.grpc_port, metrics.SerializeToString(), METRICS_EXPORT)[0] == grpc.StatusCode.OK
    assert http_post(receiver.http_port, metrics.SerializeToString(), path="/v1/metrics")[0] == 200
    assert metrics_seen.wait(2)
    assert metrics_seen.requests == [metrics, metrics]
    assert receiver.counters.get(rx.RECEIVED_METRIC_POINTS, outcome=rx.ACCEPTED) == 2


def test_queue_full_is_retryable_with_a_delay_and_counted(start_receiver):
    gate = threading.Event()
    handle = Collect(gate=gate)
    receiver = start_receiver(handle, queue_size=2, retry_after_s=0.25)
    body = make_request().SerializeToString()
    # The worker takes the first request and blocks on the gate; two more fill the queue.
    assert grpc_call(receiver.grpc_port, body)[0] == grpc.StatusCode.OK
    assert handle.entered.wait(2)
    assert http_post(receiver.http_port, body)[0] == 200
    assert http_post(receiver.http_port, body)[0] == 200
    code, _, trailers = grpc_call(receiver.grpc_port, body)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
    assert retry.retry_delay.ToMilliseconds() == 250
    details = status_pb2.Status.FromString(trailers["grpc-status-details-bin"]).details
    assert details[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    status, headers, reply = http_post(receiver.http_port, body)
    assert status == 503 and headers["Retry-After"] == "1"
    assert "queue is full" in status_of(reply).message
    assert requests_counted(receiver, outcome=rx.QUEUE_FULL) == 2
    assert receiver.counters.get(rx.RECEIVED_SPANS, outcome=rx.QUEUE_FULL) == 2
    gate.set()
    assert handle.wait(3)
    assert len(handle.requests) == 3  # exactly the accepted ones


def test_a_port_already_taken_raises_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for config in (ReceiverConfig(grpc_address=f"127.0.0.1:{port}", http_address=None),
                       ReceiverConfig(grpc_address=None, http_address=f"127.0.0.1:{port}"),
                       ReceiverConfig(grpc_address="127.0.0.1:0", http_address=f"127.0.0.1:{port}")):
            receiver = OtlpReceiver(config, Collect())
            with pytest.raises(ReceiverBindError, match=f"address 127.0.0.1:{port} already in use") as info:
                receiver.start()
            assert isinstance(info.value, OSError)
            receiver.shutdown(timeout=1)  # harmless after a failed start


def test_handler_errors_are_counted_and_the_worker_survives(start_receiver):
    seen = []

    def handle(request):
        seen.append(request)
        if len(seen) == 1:
            raise RuntimeError("boom")

    receiver = start_receiver(handle)
    for _ in range(3):
        assert http_post(receiver.http_port, make_request().SerializeToString())[0] == 200
    deadline = time.monotonic() + 2
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(seen) == 3
    assert receiver.counters.get(rx.HANDLER_ERRORS, signal="traces") == 1


def test_shutdown_drains_everything_accepted_and_is_idempotent():
    handle = Collect(delay=0.02)
    receiver = OtlpReceiver(ReceiverConfig(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0",
                                           queue_size=100), handle)
    receiver.start()
    grpc_port, http_port = receiver.grpc_port, receiver.http_port
    for i in range(15):
        assert grpc_call(grpc_port, make_request(name=f"g{i}-").SerializeToString())[0] == grpc.StatusCode.OK
        assert http_post(http_port, make_request(name=f"h{i}-").SerializeToString())[0] == 200
    assert len(handle.requests) < 30  # the slow handler is still behind
    started = time.monotonic()
    receiver.shutdown(timeout=5)
    assert len(handle.requests) == 30
    assert time.monotonic() - started < 3
    receiver.shutdown(timeout=5)  # idempotent
    assert grpc_call(grpc_port, make_request().SerializeToString())[0] == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(OSError):
        http_post(http_port, make_request().SerializeToString())


def test_shutdown_is_bounded_when_the_handler_is_stuck():
    gate = threading.Event()
    receiver = OtlpReceiver(ReceiverConfig(grpc_address=None, http_address="127.0.0.1:0"), Collect(gate=gate))
    receiver.start()
    for _ in range(3):
        assert http_post(receiver.http_port, make_request().SerializeToString())[0] == 200
    started = time.monotonic()
    receiver.shutdown(timeout=0.5)
    assert time.monotonic() - started < 2.5
    assert receiver.counters.get(rx.DROPPED_AT_SHUTDOWN, signal="traces") == 2  # one was in the handler
    gate.set()


def test_otlp_json_helpers_use_hex_ids_and_integer_enums():
    request = make_request(1)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.parent_span_id = bytes.fromhex("b7ad6b7169203331")
    link = span.links.add(trace_id=span.trace_id, span_id=bytes.fromhex("00f067aa0ba902b7"))
    link.attributes.add(key="k").value.int_value = 3
    line = to_otlp_json(request)
    assert "\n" not in line
    obj = json.loads(line)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert obj["parentSpanId"] == "b7ad6b7169203331"
    assert obj["links"][0]["spanId"] == "00f067aa0ba902b7"
    assert parse_otlp_json(line, ExportTraceServiceRequest) == request
    # Unknown fields are ignored, as OTLP/JSON receivers must.
    obj_with_extra = json.loads(line)
    obj_with_extra["somethingNew"] = {"x": 1}
    assert parse_otlp_json(json.dumps(obj_with_extra), ExportTraceServiceRequest) == request


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_the_sdk_exporter_retries_a_full_queue_and_gets_through(start_receiver, transport):
    # What vLLM's exporter does when the sidecar is behind: our RetryInfo / Retry-After makes it wait and retry.
    gate = threading.Event()
    handle = Collect(gate=gate)
    receiver = start_receiver(handle, queue_size=1, retry_after_s=0.25)
    if transport == "grpc":
        exporter = GrpcSpanExporter(endpoint=f"http://127.0.0.1:{receiver.grpc_port}", insecure=True, timeout=10)
    else:
        exporter = HttpSpanExporter(endpoint=f"http://127.0.0.1:{receiver.http_port}/v1/traces", timeout=10)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    tracer.start_span("first").end()  # taken by the worker, which blocks
    assert handle.entered.wait(2)
    tracer.start_span("second").end()  # fills the queue
    threading.Timer(0.4, gate.set).start()
    tracer.start_span("third").end()  # refused at first, retried after the delay we asked for
    assert handle.wait(3)
    provider.shutdown()
    assert handle.span_names() == ["first", "second", "third"]
    assert requests_counted(receiver, outcome=rx.QUEUE_FULL, transport=transport) >= 1
