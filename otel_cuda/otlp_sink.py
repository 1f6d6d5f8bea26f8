"""A small real OTLP receiver that records what arrives: the downstream in tests and in `otel-cuda demo`, standing
in for the Collector or Jaeger.

It is an `OtlpReceiver` (gRPC and/or HTTP; traces and metrics) whose handlers keep every request, so what a test
sees went through a real OTLP server. With `json_path`, every request is also appended to that file as one line of
OTLP/JSON, the shape the Collector's file exporter writes, so `otel-cuda verify` can read it later with
`read_otlp_json`.

Run standalone: `python -m otel_cuda.otlp_sink --grpc 127.0.0.1:4317 [--http 127.0.0.1:4318] --json out.jsonl`
(prints one "listening" line, runs until SIGTERM or SIGINT).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable

from google.protobuf.message import Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from otel_cuda.receiver import OtlpReceiver, ReceiverConfig, ReceiverCounters, parse_otlp_json, to_otlp_json

logger = logging.getLogger(__name__)

_SPAN_KINDS = {v: k.removeprefix("SPAN_KIND_") for k, v in trace_pb2.Span.SpanKind.items()}
_STATUS_CODES = {v: k.removeprefix("STATUS_CODE_") for k, v in trace_pb2.Status.StatusCode.items()}


# --- flattening ----------------------------------------------------------------------------------------------------


def any_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP AnyValue as a Python value (arrays as lists, kvlists as dicts, unset as None)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(kvs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def flatten_spans(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """Every span of a request as a flat dict (ids in hex, times in ns, attributes as Python values)."""
    out = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.append({
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "trace_state": span.trace_state,
                    "name": span.name,
                    "kind": _SPAN_KINDS.get(span.kind, str(span.kind)),
                    "start_ns": span.start_time_unix_nano,
                    "end_ns": span.end_time_unix_nano,
                    "attributes": attributes(span.attributes),
                    "events": [
                        {"name": e.name, "time_ns": e.time_unix_nano, "attributes": attributes(e.attributes)}
                        for e in span.events
                    ],
                    "links": [
                        {"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex(),
                         "attributes": attributes(link.attributes), "flags": link.flags}
                        for link in span.links
                    ],
                    "status": {"code": _STATUS_CODES.get(span.status.code, str(span.status.code)),
                               "message": span.status.message},
                    "flags": span.flags,
                    "resource": resource,
                    "scope": ss.scope.name,
                    "scope_version": ss.scope.version,
                })
    return out


def _point(kind: str, metric: Any, point: Any, resource: dict, scope: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": metric.name, "type": kind, "unit": metric.unit, "resource": resource, "scope": scope,
        "attributes": attributes(point.attributes),
        "start_ns": point.start_time_unix_nano, "time_ns": point.time_unix_nano,
    }
    data = getattr(metric, kind)
    if kind in ("sum", "histogram", "exponential_histogram"):
        out["temporality"] = data.aggregation_temporality
    if kind == "sum":
        out["is_monotonic"] = data.is_monotonic
    if kind in ("sum", "gauge"):
        out["value"] = getattr(point, point.WhichOneof("value")) if point.WhichOneof("value") else None
    elif kind == "summary":
        out.update(count=point.count, sum=point.sum,
                   quantiles={q.quantile: q.value for q in point.quantile_values})
    else:
        out.update(count=point.count, sum=point.sum if point.HasField("sum") else None,
                   min=point.min if point.HasField("min") else None,
                   max=point.max if point.HasField("max") else None)
        if kind == "histogram":
            out.update(bucket_counts=list(point.bucket_counts), explicit_bounds=list(point.explicit_bounds))
        else:
            out.update(scale=point.scale, zero_count=point.zero_count,
                       positive={"offset": point.positive.offset, "bucket_counts": list(point.positive.bucket_counts)},
                       negative={"offset": point.negative.offset, "bucket_counts": list(point.negative.bucket_counts)})
    return out


def flatten_metric_points(request: ExportMetricsServiceRequest) -> list[dict[str, Any]]:
    """Every data point of a request as a flat dict carrying its metric's name, type, unit, resource and scope."""
    out = []
    for rm in request.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind:
                    points = getattr(metric, kind).data_points
                    out.extend(_point(kind, metric, p, resource, sm.scope.name) for p in points)
    return out


def read_otlp_json(path: str) -> list[dict[str, Any]]:
    """The spans of an OTLP/JSON-lines file (ours, or the Collector file exporter's) as `flatten_spans` dicts.

    Lines holding metrics or logs are skipped. A last line without its newline is a write in progress and is
    skipped; any other undecodable line raises ValueError naming the line."""
    spans: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not ("resourceSpans" in obj or "resource_spans" in obj):
                continue
            request = parse_otlp_json(line, ExportTraceServiceRequest)
        except ValueError as exc:
            if number == len(lines) and not line.endswith("\n"):
                logger.warning("%s: skipping a partly written last line", path)
                continue
            raise ValueError(f"{path}:{number}: not an OTLP/JSON traces line: {exc}") from exc
        spans.extend(flatten_spans(request))
    return spans


# --- the sink ------------------------------------------------------------------------------------------------------


class OtlpSink:
    """Records every OTLP traces and metrics request it receives; accessors are thread-safe and return copies."""

    def __init__(
        self,
        grpc_address: str | None = "127.0.0.1:0",
        http_address: str | None = None,
        json_path: str | None = None,
        *,
        max_message_bytes: int = 64 * 1024 * 1024,
        queue_size: int = 10_000,
    ) -> None:
        self._config = ReceiverConfig(
            grpc_address=grpc_address, http_address=http_address,
            max_message_bytes=max_message_bytes, queue_size=queue_size,
        )
        self._json_path = json_path
        self._json_file: Any = None
        self.counters = ReceiverCounters()
        self._receiver = OtlpReceiver(self._config, self._record_traces, self.counters,
                                      handle_metrics=self._record_metrics)
        # RLock: a wait_for predicate calls the accessors while wait_for holds the lock.
        self._cond = threading.Condition(threading.RLock())
        self._trace_requests: list[ExportTraceServiceRequest] = []
        self._metric_requests: list[ExportMetricsServiceRequest] = []
        self._spans: list[dict[str, Any]] = []
        self._points: list[dict[str, Any]] = []

    @property
    def grpc_port(self) -> int | None:
        return self._receiver.grpc_port

    @property
    def http_port(self) -> int | None:
        return self._receiver.http_port

    @property
    def grpc_endpoint(self) -> str:
        """For an OTLP gRPC exporter: http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """For an OTLP/HTTP traces exporter: http://127.0.0.1:PORT/v1/traces."""
        return f"http://127.0.0.1:{self.http_port}/v1/traces"

    def start(self) -> OtlpSink:
        if self._json_path is not None:
            self._json_file = open(self._json_path, "a", encoding="utf-8")
        try:
            self._receiver.start()
        except BaseException:
            self._close_json()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Idempotent; everything accepted before it is recorded (and written) first."""
        self._receiver.shutdown(timeout)
        self._close_json()

    def __enter__(self) -> OtlpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _close_json(self) -> None:
        with self._cond:
            if self._json_file is not None:
                self._json_file.close()
                self._json_file = None

    def _write_json(self, request: Message) -> None:
        if self._json_file is not None:
            self._json_file.write(to_otlp_json(request) + "\n")
            self._json_file.flush()  # a reader (otel-cuda verify) may read the file while we run

    # Called from the receiver's single worker thread.
    def _record_traces(self, request: ExportTraceServiceRequest) -> None:
        spans = flatten_spans(request)
        with self._cond:
            self._trace_requests.append(request)
            self._spans.extend(spans)
            self._write_json(request)
            self._cond.notify_all()

    def _record_metrics(self, request: ExportMetricsServiceRequest) -> None:
        points = flatten_metric_points(request)
        with self._cond:
            self._metric_requests.append(request)
            self._points.extend(points)
            self._write_json(request)
            self._cond.notify_all()

    # -- accessors --

    def spans(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._spans)

    def trace_requests(self) -> list[ExportTraceServiceRequest]:
        """The requests exactly as received (protobuf messages; compare them with ==)."""
        with self._cond:
            return list(self._trace_requests)

    def metric_requests(self) -> list[ExportMetricsServiceRequest]:
        with self._cond:
            return list(self._metric_requests)

    def metric_names(self) -> set[str]:
        with self._cond:
            return {p["name"] for p in self._points}

    def metric_points(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [p for p in self._points if p["name"] == name]

    def clear(self) -> None:
        with self._cond:
            self._trace_requests.clear()
            self._metric_requests.clear()
            self._spans.clear()
            self._points.clear()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` (a closure over this sink's accessors) is true; False when `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m otel_cuda.otlp_sink", description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", default=None, metavar="HOST:PORT", help="OTLP/gRPC address (e.g. 127.0.0.1:4317)")
    parser.add_argument("--http", default=None, metavar="HOST:PORT", help="OTLP/HTTP address (e.g. 127.0.0.1:4318)")
    parser.add_argument("--json", default=None, metavar="PATH", help="append every request as one OTLP/JSON line")
    args = parser.parse_args(argv)
    if args.grpc is None and args.http is None:
        args.grpc = "127.0.0.1:4317"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    sink = OtlpSink(grpc_address=args.grpc, http_address=args.http, json_path=args.json)
    try:
        sink.start()
    except OSError as exc:
        print(f"otlp_sink: {exc}", file=sys.stderr)
        return 1
    print(f"otlp_sink listening grpc={sink.grpc_port} http={sink.http_port} json={args.json}", flush=True)
    stop.wait()
    sink.stop()
    print(f"otlp_sink stopped: {len(sink.spans())} spans, {len(sink.metric_names())} metrics", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
