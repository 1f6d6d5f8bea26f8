"""OtlpSink: a real OTLP receiver that records; its JSON-lines file and read_otlp_json; the standalone process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from otel_cuda.otlp_sink import OtlpSink, read_otlp_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def emit_spans(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("vllm.tracing.otel")
    parent = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with tracer.start_as_current_span(
        "llm_request", context=trace.set_span_in_context(NonRecordingSpan(parent)), kind=SpanKind.SERVER,
        attributes={"s": "x", "i": 3, "f": 0.25, "b": False, "strs": ["a", "b"]},
        links=[Link(SpanContext(0x1, 0x2, is_remote=False), {"why": "step"})],
    ) as span:
        span.add_event("evt", {"k": 1})
        with tracer.start_as_current_span("child"):
            pass


def test_spans_arrive_flat_over_grpc_and_http(tmp_path):
    with OtlpSink(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0") as sink:
        provider = TracerProvider(resource=Resource({"service.name": "svc"}))
        provider.add_span_processor(SimpleSpanProcessor(GrpcSpanExporter(endpoint=sink.grpc_endpoint, insecure=True)))
        provider.add_span_processor(SimpleSpanProcessor(HttpSpanExporter(endpoint=sink.http_endpoint)))
        emit_spans(provider)
        provider.shutdown()
        assert sink.wait_for(lambda: len(sink.spans()) == 4, timeout=5)
        spans = sink.spans()
    request = next(s for s in spans if s["name"] == "llm_request")
    child = next(s for s in spans if s["name"] == "child")
    assert request["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" == child["trace_id"]
    assert request["parent_span_id"] == "00f067aa0ba902b7" and child["parent_span_id"] == request["span_id"]
    assert request["kind"] == "SERVER" and child["kind"] == "INTERNAL"
    assert request["flags"] == 0x300 and child["flags"] == 0x100
    assert request["attributes"] == {"s": "x", "i": 3, "f": 0.25, "b": False, "strs": ["a", "b"]}
    assert request["links"] == [{"trace_id": "00000000000000000000000000000001", "span_id": "0000000000000002",
                                 "attributes": {"why": "step"}, "flags": 0x100}]
    assert request["events"][0]["name"] == "evt" and request["events"][0]["attributes"] == {"k": 1}
    assert request["status"] == {"code": "UNSET", "message": ""}
    assert request["resource"]["service.name"] == "svc" and request["scope"] == "vllm.tracing.otel"
    assert 0 < request["start_ns"] <= child["start_ns"] <= child["end_ns"] <= request["end_ns"]


def test_metric_points_of_every_kind():
    with OtlpSink(grpc_address="127.0.0.1:0", http_address="127.0.0.1:0") as sink:
        readers = [
            PeriodicExportingMetricReader(GrpcMetricExporter(endpoint=sink.grpc_endpoint, insecure=True),
                                          export_interval_millis=60_000),
            PeriodicExportingMetricReader(HttpMetricExporter(endpoint=f"http://127.0.0.1:{sink.http_port}/v1/metrics"),
                                          export_interval_millis=60_000),
        ]
        exponential = View(instrument_name="cuda.exp", aggregation=ExponentialBucketHistogramAggregation())
        provider = MeterProvider(metric_readers=readers, resource=Resource({"service.name": "m"}), views=[exponential])
        meter = provider.get_meter("otel_cuda")
        meter.create_counter("cuda.calls", unit="{call}").add(5, {"cuda.function": "cuLaunchKernel"})
        meter.create_up_down_counter("cuda.inflight").add(-2)
        meter.create_observable_gauge("cuda.mem", callbacks=[lambda _: [Observation(1.5, {"gpu": "0"})]])
        meter.create_histogram("cuda.dur", unit="s").record(0.003)
        meter.create_histogram("cuda.exp").record(4.0)
        provider.shutdown()  # flushes both readers
        assert sink.wait_for(lambda: len(sink.metric_requests()) == 2, timeout=5)
        assert sink.metric_names() == {"cuda.calls", "cuda.inflight", "cuda.mem", "cuda.dur", "cuda.exp"}
        calls = sink.metric_points("cuda.calls")
        gauge = sink.metric_points("cuda.mem")[0]
        hist = sink.metric_points("cuda.dur")[0]
        exp = sink.metric_points("cuda.exp")[0]
        updown = sink.metric_points("cuda.inflight")[0]
    assert len(calls) == 2  # one per transport
    assert calls[0]["value"] == 5 and calls[0]["attributes"] == {"cuda.function": "cuLaunchKernel"}
    assert calls[0]["type"] == "sum" and calls[0]["is_monotonic"] and calls[0]["unit"] == "{call}"
    assert calls[0]["resource"] == {"service.name": "m", **{k: v for k, v in calls[0]["resource"].items()
                                                            if k.startswith("telemetry.")}}
    assert (updown["value"], updown["is_monotonic"]) == (-2, False)
    assert (gauge["type"], gauge["value"], gauge["attributes"]) == ("gauge", 1.5, {"gpu": "0"})
    assert hist["type"] == "histogram" and hist["count"] == 1 and hist["sum"] == pytest.approx(0.003)
    assert sum(hist["bucket_counts"]) == 1 and hist["explicit_bounds"]
    assert exp["type"] == "exponential_histogram" and exp["count"] == 1 and exp["max"] == 4.0
    assert sum(exp["positive"]["bucket_counts"]) == 1


def test_json_file_round_trips_through_read_otlp_json(tmp_path):
    path = tmp_path / "out.jsonl"
    with OtlpSink(json_path=str(path)) as sink:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(GrpcSpanExporter(endpoint=sink.grpc_endpoint, insecure=True)))
        emit_spans(provider)
        provider.shutdown()
        metrics = MeterProvider(metric_readers=[PeriodicExportingMetricReader(
            GrpcMetricExporter(endpoint=sink.grpc_endpoint, insecure=True), export_interval_millis=60_000)])
        metrics.get_meter("m").create_counter("c").add(1)
        metrics.shutdown()
        assert sink.wait_for(lambda: len(sink.spans()) == 2 and sink.metric_names(), timeout=5)
        expected = sink.spans()
    lines = path.read_text().splitlines()
    assert len(lines) == 3  # two span requests and one metrics request, one line each
    first = json.loads(lines[0])["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert len(first["traceId"]) == 32 and isinstance(first["kind"], int)  # hex ids, integer enums
    assert read_otlp_json(str(path)) == expected


COLLECTOR_LINE = json.dumps({  # the shape of the Collector's file exporter (the OTLP spec's JSON example)
    "resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "vllm"}}]},
        "scopeSpans": [{
            "scope": {"name": "vllm.tracing.otel"},
            "spans": [{
                "traceId": "5B8EFFF798038103D269B633813FC60C", "spanId": "EEE19B7EC3C1B174",
                "parentSpanId": "EEE19B7EC3C1B173", "flags": 768, "name": "llm_request", "kind": 2,
                "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": "1544712661000000000",
                "attributes": [{"key": "gen_ai.usage.prompt_tokens", "value": {"intValue": "12"}},
                               {"key": "gen_ai.latency.e2e", "value": {"doubleValue": 0.5}}],
                "status": {"code": 1}, "futureField": {"ignored": True},
            }],
        }],
        "schemaUrl": "https://opentelemetry.io/schemas/1.26.0",
    }],
})


def test_read_otlp_json_reads_the_collector_file_exporter_format(tmp_path):
    path = tmp_path / "collector.jsonl"
    metrics_line = json.dumps({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "x"}]}]}]})
    path.write_text(COLLECTOR_LINE + "\n\n" + metrics_line + "\n" + COLLECTOR_LINE[:40])  # last line being written
    spans = read_otlp_json(str(path))
    assert spans == [{
        "trace_id": "5b8efff798038103d269b633813fc60c", "span_id": "eee19b7ec3c1b174",
        "parent_span_id": "eee19b7ec3c1b173", "trace_state": "", "name": "llm_request", "kind": "SERVER",
        "start_ns": 1544712660000000000, "end_ns": 1544712661000000000,
        "attributes": {"gen_ai.usage.prompt_tokens": 12, "gen_ai.latency.e2e": 0.5}, "events": [], "links": [],
        "status": {"code": "OK", "message": ""}, "flags": 768, "resource": {"service.name": "vllm"},
        "scope": "vllm.tracing.otel", "scope_version": "",
    }]
    path.write_text(COLLECTOR_LINE + "\n{broken\n" + COLLECTOR_LINE + "\n")
    with pytest.raises(ValueError, match=r"collector.jsonl:2"):
        read_otlp_json(str(path))


def test_wait_for_times_out_false():
    with OtlpSink() as sink:
        started = time.monotonic()
        assert sink.wait_for(lambda: bool(sink.spans()), timeout=0.2) is False
        assert time.monotonic() - started < 1


def test_standalone_process_records_until_sigterm(tmp_path):
    path = tmp_path / "standalone.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "otel_cuda.otlp_sink", "--grpc", "127.0.0.1:0", "--json", str(path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("otlp_sink listening grpc="), line + process.stderr.read()
        port = int(line.split("grpc=")[1].split()[0])
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(
            GrpcSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True, timeout=5)))
        emit_spans(provider)
        provider.shutdown()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "2 spans" in out
    assert sorted(s["name"] for s in read_otlp_json(str(path))) == ["child", "llm_request"]
