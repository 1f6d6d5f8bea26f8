"""The sidecar's OTLP front door: vLLM's `--otlp-traces-endpoint` points here.

Two servers (OTLP/gRPC and OTLP/HTTP) decode each export request and put it on one bounded queue; a single worker
thread hands each request to `handle`. Decoding happens on the transport threads so a malformed request is refused
(and counted) while its sender is still waiting; the handler never sees bytes. The queue being bounded is what turns
an overloaded sidecar into the OTLP "retry later" answer instead of unbounded memory: the sender's SDK keeps the
spans and retries.

Answers follow the OTLP specification (protocol/otlp.md):
- gRPC: OK; RESOURCE_EXHAUSTED *with* a RetryInfo when the queue is full (the spec makes RESOURCE_EXHAUSTED
  retryable only when RetryInfo says so); UNAVAILABLE while shutting down (retryable); INVALID_ARGUMENT for an
  undecodable or oversized message (neither ever succeeds on retry, so we want the sender to drop it at once);
  UNIMPLEMENTED for a signal this receiver has no handler for.
- HTTP: 200 with an Export*ServiceResponse in the request's encoding; 400 malformed; 404 unknown path; 405 not POST;
  411 no Content-Length; 413 oversized; 415 unsupported Content-Type or Content-Encoding; 501 signal without handler;
  503 with Retry-After when the queue is full or the receiver is shutting down. Error bodies are a google.rpc.Status
  in the request's encoding, as the spec asks.

Metrics and logs: accepted (and queued like traces) only when a handler for them is passed (`handle_metrics`,
`handle_logs`); without one they are answered UNIMPLEMENTED / 501 with a message saying so, never a bare 404.

OTLP/JSON differs from protobuf's canonical JSON mapping in one way that matters: trace and span ids are hex
strings, not base64 (and enums are integers). `parse_otlp_json` / `to_otlp_json` do that translation around
`google.protobuf.json_format`, and the sink reuses them.
"""

from __future__ import annotations

import base64
import errno
import http.server
import json
import logging
import math
import socket
import threading
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import urlsplit

import grpc
from google.protobuf import any_pb2, duration_pb2, json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

logger = logging.getLogger(__name__)

# Request outcomes, the `outcome` attribute of every counter below.
ACCEPTED = "accepted"
MALFORMED = "malformed"
OVERSIZED = "oversized"
QUEUE_FULL = "queue_full"
SHUTTING_DOWN = "shutting_down"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
UNIMPLEMENTED = "unimplemented"
NOT_FOUND = "not_found"

# Counter names.
RECEIVED_REQUESTS = "received_requests"  # attributes: signal, transport, outcome
RECEIVED_SPANS = "received_spans"  # attributes: transport, outcome (only outcomes where the request decoded)
RECEIVED_METRIC_POINTS = "received_metric_points"
RECEIVED_LOG_RECORDS = "received_log_records"
HANDLER_ERRORS = "handler_errors"  # attributes: signal
DROPPED_AT_SHUTDOWN = "dropped_at_shutdown"  # attributes: signal; batches still queued when shutdown timed out

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


class ReceiverBindError(OSError):
    """A receiver address could not be bound (usually: the port is taken)."""


@dataclass(frozen=True)
class ReceiverConfig:
    grpc_address: str | None = "127.0.0.1:4317"  # None disables the gRPC server
    http_address: str | None = "127.0.0.1:4318"  # None disables the HTTP server
    max_message_bytes: int = 4 * 1024 * 1024  # per request, both transports, compressed and decompressed
    queue_size: int = 256  # export requests (batches) waiting for the handler
    retry_after_s: float = 1.0  # the delay we ask a sender to wait when the queue is full
    grpc_workers: int = 4
    http_idle_timeout_s: float = 30.0  # an idle keep-alive connection is closed after this

    def __post_init__(self) -> None:
        if self.grpc_address is None and self.http_address is None:
            raise ValueError("ReceiverConfig: at least one of grpc_address and http_address is needed")
        if self.max_message_bytes <= 0 or self.queue_size <= 0 or self.grpc_workers <= 0:
            raise ValueError("ReceiverConfig: max_message_bytes, queue_size and grpc_workers must be positive")
        if self.retry_after_s < 0:
            raise ValueError("ReceiverConfig: retry_after_s must not be negative")


class Counters(Protocol):
    """Where the receiver counts; adapt it to an OTel Counter with `counter.add(value, attributes)`."""

    def add(self, name: str, value: int, attributes: Mapping[str, str]) -> None: ...


class ReceiverCounters:
    """The default `Counters`: in memory, thread-safe, queried by name and a subset of attributes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}

    def add(self, name: str, value: int, attributes: Mapping[str, str]) -> None:
        key = (name, tuple(sorted(attributes.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + value

    def get(self, name: str, **attributes: str) -> int:
        """Sum of `name` over every series whose attributes include `attributes`."""
        wanted = set(attributes.items())
        with self._lock:
            return sum(v for (n, attrs), v in self._values.items() if n == name and wanted <= set(attrs))

    def snapshot(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], int]:
        with self._lock:
            return dict(self._values)


# --- OTLP/JSON -----------------------------------------------------------------------------------------------------

# Every bytes field of the OTLP messages that OTLP/JSON writes as hex (spans, links, log records, exemplars).
_ID_FIELDS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


def _rewrite_ids(node: Any, convert: Callable[[str], str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_FIELDS:
                if not isinstance(value, str):
                    raise ValueError(f"{key} must be a string, not {type(value).__name__}")
                node[key] = convert(value)
            else:
                _rewrite_ids(value, convert)
    elif isinstance(node, list):
        for item in node:
            _rewrite_ids(item, convert)


def _hex_to_b64(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode("ascii")


def _b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def parse_otlp_json(data: bytes | str, message_cls: type[Message]) -> Message:
    """Decode OTLP/JSON (hex ids, integer or named enums, unknown fields ignored as the spec asks).

    Raises ValueError for anything that is not a valid OTLP/JSON message of `message_cls`."""
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("an OTLP/JSON request is a JSON object")
        _rewrite_ids(obj, _hex_to_b64)
        return json_format.ParseDict(obj, message_cls(), ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from exc


def to_otlp_json(message: Message) -> str:
    """One-line OTLP/JSON, the shape the Collector's file exporter writes (camelCase, hex ids, integer enums)."""
    obj = json_format.MessageToDict(message, use_integers_for_enums=True)
    _rewrite_ids(obj, _b64_to_hex)
    return json.dumps(obj, separators=(",", ":"))


# --- signals -------------------------------------------------------------------------------------------------------


def count_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def count_metric_points(request: metrics_service_pb2.ExportMetricsServiceRequest) -> int:
    total = 0
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind:
                    total += len(getattr(metric, kind).data_points)
    return total


def count_log_records(request: logs_service_pb2.ExportLogsServiceRequest) -> int:
    return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)


@dataclass(frozen=True)
class _Signal:
    name: str
    request_cls: type[Message]
    response_cls: type[Message]
    grpc_service: str
    http_path: str
    item_counter: str
    count_items: Callable[[Any], int]


_SIGNALS = (
    _Signal(
        "traces",
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
        trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name,
        "/v1/traces",
        RECEIVED_SPANS,
        count_spans,
    ),
    _Signal(
        "metrics",
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
        metrics_service_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name,
        "/v1/metrics",
        RECEIVED_METRIC_POINTS,
        count_metric_points,
    ),
    _Signal(
        "logs",
        logs_service_pb2.ExportLogsServiceRequest,
        logs_service_pb2.ExportLogsServiceResponse,
        logs_service_pb2.DESCRIPTOR.services_by_name["LogsService"].full_name,
        "/v1/logs",
        RECEIVED_LOG_RECORDS,
        count_log_records,
    ),
)
_BY_PATH = {s.http_path: s for s in _SIGNALS}


# --- the queue -----------------------------------------------------------------------------------------------------


class _BatchQueue:
    """Bounded FIFO whose `close()` is the worker's one stop signal: after it nothing more is accepted, and `take()`
    returns what is left, then None."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: deque[tuple[_Signal, Callable[..., None], Message, Any]] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def offer(self, item: tuple[_Signal, Callable[..., None], Message, Any]) -> str:
        with self._cond:
            if self._closed:
                return SHUTTING_DOWN
            if len(self._items) >= self._capacity:
                return QUEUE_FULL
            self._items.append(item)
            self._cond.notify()
            return ACCEPTED

    def take(self) -> tuple[_Signal, Callable[..., None], Message, Any] | None:
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            return self._items.popleft() if self._items else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[tuple[_Signal, Callable[..., None], Message, Any]]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items


# --- the receiver --------------------------------------------------------------------------------------------------


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"receiver address {address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _bind_error(transport: str, address: str, cause: BaseException | None = None) -> ReceiverBindError:
    """Name the address and, where a probe can tell, the reason (grpcio only says 'Failed to bind')."""
    code = errno.EADDRINUSE
    try:
        host, port = _split_host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        code = 0
    except OSError as exc:
        code = exc.errno or 0
    except ValueError:
        code = 0
    if code == errno.EADDRINUSE:
        reason = "already in use"
    else:
        reason = f"cannot be bound ({cause or errno.errorcode.get(code, code)})"
    return ReceiverBindError(code or errno.EINVAL, f"OTLP {transport} receiver: address {address} {reason}")


class OtlpReceiver:
    """OTLP/gRPC + OTLP/HTTP receiver feeding `handle` from one worker thread; see the module docstring."""

    def __init__(
        self,
        config: ReceiverConfig,
        handle: Callable[[trace_service_pb2.ExportTraceServiceRequest], None],
        counters: Counters | None = None,
        *,
        handle_metrics: Callable[[metrics_service_pb2.ExportMetricsServiceRequest], None] | None = None,
        handle_logs: Callable[[logs_service_pb2.ExportLogsServiceRequest], None] | None = None,
        with_peer: bool = False,
    ) -> None:
        self._config = config
        # with_peer: handlers are called as handler(request, peer), peer = the sending connection's address
        # (gRPC's "ipv4:HOST:PORT" / "ipv6:[HOST]:PORT", or (HOST, PORT) over HTTP): the join finds the process
        # that sent a span from it.
        self._with_peer = with_peer
        self._handlers: dict[str, Callable[[Any], None] | None] = {
            "traces": handle,
            "metrics": handle_metrics,
            "logs": handle_logs,
        }
        self.counters: Counters = counters if counters is not None else ReceiverCounters()
        self._queue = _BatchQueue(config.queue_size)
        self._lifecycle = threading.Lock()
        self._started = False
        self._stopped = False
        self._worker: threading.Thread | None = None
        self._grpc_server: grpc.Server | None = None
        self._http_server: _HttpServer | None = None
        self._http_thread: threading.Thread | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None

    # -- lifecycle --

    def start(self) -> None:
        """Bind and serve. Raises ReceiverBindError naming the address when it cannot be bound."""
        with self._lifecycle:
            if self._started:
                raise RuntimeError("OtlpReceiver.start() called twice")
            self._started = True
            self._worker = threading.Thread(target=self._work, name="otlp-receiver-worker", daemon=True)
            self._worker.start()
            try:
                if self._config.grpc_address is not None:
                    self._start_grpc(self._config.grpc_address)
                if self._config.http_address is not None:
                    self._start_http(self._config.http_address)
            except BaseException:
                self._stop_servers(grace=0.0)
                self._queue.close()
                self._stopped = True
                raise

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, let the handler see every request already accepted, join the threads; at most `timeout`
        seconds. Idempotent. Requests still queued when the time is up are counted in `dropped_at_shutdown`."""
        with self._lifecycle:
            if self._stopped:
                return
            self._stopped = True
        deadline = time.monotonic() + timeout
        # Close the queue first: from here every request is answered "unavailable, retry" rather than accepted and
        # then lost, and the worker exits as soon as the queue is empty.
        self._queue.close()
        self._stop_servers(grace=min(1.0, timeout))
        if self._worker is not None:
            self._worker.join(max(0.0, deadline - time.monotonic()))
            if self._worker.is_alive():
                left = self._queue.drain()
                for signal, *_ in left:
                    self.counters.add(DROPPED_AT_SHUTDOWN, 1, {"signal": signal.name})
                logger.warning("receiver shutdown timed out after %.1fs; %d batches not handled", timeout, len(left))

    def __enter__(self) -> OtlpReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _start_grpc(self, address: str) -> None:
        handlers = [
            grpc.method_handlers_generic_handler(
                signal.grpc_service,
                {
                    "Export": grpc.unary_unary_rpc_method_handler(
                        self._grpc_behavior(signal),
                        # Raw bytes in: we decode ourselves, so a malformed message is ours to count and answer.
                        request_deserializer=None,
                        response_serializer=None,
                    )
                },
            )
            for signal in _SIGNALS
        ]
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self._config.grpc_workers, thread_name_prefix="otlp-grpc"),
            handlers=handlers,
            options=[
                # grpcio refuses a message over its limit before our code runs, uncounted. Its limit is set above
                # ours so that oversized requests reach us and are counted; the ceiling still bounds memory, and
                # only requests above it (4x ours) are refused by grpcio alone.
                ("grpc.max_receive_message_length", 4 * self._config.max_message_bytes),
                # grpcio sets SO_REUSEPORT by default, which would let us bind a port another process listens on
                # and silently share its traffic.
                ("grpc.so_reuseport", 0),
            ],
        )
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio >= 1.5x raises; older versions return 0
            server.stop(0)
            raise _bind_error("gRPC", address, exc) from exc
        if port == 0:
            server.stop(0)
            raise _bind_error("gRPC", address)
        server.start()
        self._grpc_server = server
        self.grpc_port = port

    def _start_http(self, address: str) -> None:
        host, port = _split_host_port(address)
        server_cls = _HttpServer6 if ":" in host else _HttpServer
        try:
            server = server_cls((host, port), _make_http_handler(self))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ReceiverBindError(exc.errno, f"OTLP HTTP receiver: address {address} already in use") from exc
            raise ReceiverBindError(exc.errno,
                                    f"OTLP HTTP receiver: address {address} cannot be bound ({exc})") from exc
        self._http_server = server
        self.http_port = server.server_address[1]
        self._http_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="otlp-http", daemon=True
        )
        self._http_thread.start()

    def _stop_servers(self, grace: float) -> None:
        if self._grpc_server is not None:
            # stop() refuses new RPCs at once and waits up to `grace` for those in flight (which now get
            # UNAVAILABLE from the closed queue, or already were accepted).
            self._grpc_server.stop(grace).wait(grace + 1.0)
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
        if self._http_thread is not None:
            self._http_thread.join(1.0)

    def _work(self) -> None:
        while True:
            item = self._queue.take()
            if item is None:
                return
            signal, handler, request, peer = item
            try:
                if self._with_peer:
                    handler(request, peer)
                else:
                    handler(request)
            except Exception:  # the thread boundary: one bad request must not stop the pipeline
                logger.exception("OTLP %s handler failed; request dropped", signal.name)
                self.counters.add(HANDLER_ERRORS, 1, {"signal": signal.name})

    # -- the shared path --

    def _count(self, signal: _Signal, transport: str, outcome: str, items: int | None = None) -> None:
        self.counters.add(RECEIVED_REQUESTS, 1, {"signal": signal.name, "transport": transport, "outcome": outcome})
        if items is not None:
            self.counters.add(signal.item_counter, items, {"transport": transport, "outcome": outcome})

    def _submit(self, signal: _Signal, transport: str, request: Message, peer=None) -> str:
        """Queue a decoded request; returns the outcome, already counted."""
        handler = self._handlers[signal.name]
        assert handler is not None  # callers check for UNIMPLEMENTED before decoding
        items = signal.count_items(request)
        # An empty request carries nothing to handle or forward: answer OK without using a queue slot.
        outcome = self._queue.offer((signal, handler, request, peer)) if items else ACCEPTED
        self._count(signal, transport, outcome, items)
        return outcome

    def _decode(self, signal: _Signal, transport: str, body: bytes, json_body: bool) -> tuple[Message | None, str]:
        try:
            if json_body:
                return parse_otlp_json(body, signal.request_cls), ""
            return signal.request_cls.FromString(body), ""
        except (DecodeError, ValueError) as exc:
            self._count(signal, transport, MALFORMED)
            return None, f"cannot decode OTLP {signal.name} request: {exc}"

    def _too_big(self, size: int) -> str:
        return f"request of {size} bytes exceeds this receiver's limit of {self._config.max_message_bytes} bytes"

    def _unimplemented(self, signal: _Signal) -> str:
        return (
            f"this otel-cuda receiver takes no {signal.name} (no handler configured); "
            f"send {signal.name} to the OpenTelemetry Collector directly"
        )

    # -- gRPC --

    def _grpc_behavior(self, signal: _Signal) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def export(raw: bytes, context: grpc.ServicerContext) -> bytes:
            if self._handlers[signal.name] is None:
                self._count(signal, "grpc", UNIMPLEMENTED)
                context.abort(grpc.StatusCode.UNIMPLEMENTED, self._unimplemented(signal))
            if len(raw) > self._config.max_message_bytes:
                self._count(signal, "grpc", OVERSIZED)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, self._too_big(len(raw)))
            request, error = self._decode(signal, "grpc", raw, json_body=False)
            if request is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
            outcome = self._submit(signal, "grpc", request, context.peer())
            if outcome == QUEUE_FULL:
                message = "otel-cuda receiver queue is full; retry later"
                context.set_trailing_metadata(self._retry_info_metadata(message))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
            if outcome == SHUTTING_DOWN:
                context.abort(grpc.StatusCode.UNAVAILABLE, "otel-cuda receiver is shutting down")
            return b""  # an empty Export*ServiceResponse: full success

        return export

    def _retry_info_metadata(self, message: str) -> tuple[tuple[str, bytes], ...]:
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(self._config.retry_after_s),
                                              nanos=int(self._config.retry_after_s % 1 * 1e9))
        )
        detail = any_pb2.Any()
        detail.Pack(retry)
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
        # The standard place (grpc-status-details-bin, read by Go/Java clients) and the key the Python SDK's
        # exporter reads (google.rpc.retryinfo-bin): vLLM uses the Python SDK.
        return (
            ("grpc-status-details-bin", status.SerializeToString()),
            ("google.rpc.retryinfo-bin", retry.SerializeToString()),
        )

    # -- HTTP --

    def _http_export(self, req: _HttpHandler) -> None:
        path = urlsplit(req.path).path
        signal = _BY_PATH.get(path)
        if signal is None:
            self.counters.add(RECEIVED_REQUESTS, 1, {"signal": "unknown", "transport": "http", "outcome": NOT_FOUND})
            return req.reply_error(404, code_pb2.NOT_FOUND, f"no OTLP endpoint at {path}", json_body=True)
        media = req.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        json_body = media == JSON
        if self._handlers[signal.name] is None:
            self._count(signal, "http", UNIMPLEMENTED)
            return req.reply_error(501, code_pb2.UNIMPLEMENTED, self._unimplemented(signal), json_body)
        encoding = req.headers.get("Content-Encoding", "identity").strip().lower()
        if media not in (PROTOBUF, JSON) or encoding not in ("identity", "", "gzip", "deflate"):
            self._count(signal, "http", UNSUPPORTED_MEDIA_TYPE)
            what = f"Content-Type {media!r}" if media not in (PROTOBUF, JSON) else f"Content-Encoding {encoding!r}"
            return req.reply_error(
                415, code_pb2.INVALID_ARGUMENT,
                f"unsupported {what}; use {PROTOBUF} or {JSON}, optionally gzip", json_body=True,
            )
        length_header = req.headers.get("Content-Length")
        if length_header is None or not length_header.strip().isdigit():
            self._count(signal, "http", MALFORMED)
            req.close_connection = True  # we cannot tell where the body ends
            return req.reply_error(411, code_pb2.INVALID_ARGUMENT, "a Content-Length is required", json_body)
        length = int(length_header)
        if length > self._config.max_message_bytes:
            self._count(signal, "http", OVERSIZED)
            req.discard_body(length)
            return req.reply_error(413, code_pb2.INVALID_ARGUMENT, self._too_big(length), json_body)
        body = req.rfile.read(length)
        if len(body) < length:
            self._count(signal, "http", MALFORMED)
            req.close_connection = True  # the client hung up mid-body; there is no one to answer
            return None
        if encoding in ("gzip", "deflate"):
            body, error, status = self._inflate(body, encoding)
            if error:
                self._count(signal, "http", OVERSIZED if status == 413 else MALFORMED)
                return req.reply_error(status, code_pb2.INVALID_ARGUMENT, error, json_body)
        request, error = self._decode(signal, "http", body, json_body)
        if request is None:
            return req.reply_error(400, code_pb2.INVALID_ARGUMENT, error, json_body)
        outcome = self._submit(signal, "http", request, req.client_address)
        if outcome == QUEUE_FULL:
            return req.reply_error(503, code_pb2.RESOURCE_EXHAUSTED, "otel-cuda receiver queue is full; retry later",
                                   json_body, retry_after=self._config.retry_after_s)
        if outcome == SHUTTING_DOWN:
            return req.reply_error(503, code_pb2.UNAVAILABLE, "otel-cuda receiver is shutting down",
                                   json_body, retry_after=self._config.retry_after_s)
        return req.reply_message(200, signal.response_cls(), json_body)

    def _inflate(self, body: bytes, encoding: str) -> tuple[bytes, str, int]:
        """Decompress with the size limit applied to the output, so a small gzip bomb cannot exhaust memory."""
        limit = self._config.max_message_bytes
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            data = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            return b"", f"cannot {encoding}-decode the body: {exc}", 400
        if len(data) > limit:
            return b"", f"decompressed request exceeds this receiver's limit of {limit} bytes", 413
        if not inflater.eof:
            return b"", f"truncated {encoding} body", 400
        return data, "", 200


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a stuck keep-alive connection must not hold up shutdown


class _HttpServer6(_HttpServer):
    address_family = socket.AF_INET6


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK's session reuses its connection
    receiver: OtlpReceiver  # set by _make_http_handler
    # When an oversized body is small enough we read and discard it, so the client can read our 413 instead of
    # a connection reset (closing with unread data makes the kernel send RST).
    _DISCARD_LIMIT = 64 * 1024 * 1024

    def do_POST(self) -> None:
        try:
            self.receiver._http_export(self)
        except Exception:  # the thread boundary: answer 500 and keep serving
            logger.exception("OTLP/HTTP request failed")
            self.close_connection = True
            try:
                self.reply_error(500, code_pb2.INTERNAL, "internal error", json_body=True)
            except OSError:
                pass

    def _not_post(self) -> None:
        self.close_connection = True
        self.reply_error(405, code_pb2.UNIMPLEMENTED, "OTLP/HTTP takes POST only", json_body=True, allow="POST")

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_post

    def discard_body(self, length: int) -> None:
        if length > max(self._DISCARD_LIMIT, 4 * self.receiver._config.max_message_bytes):
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                self.close_connection = True
                return
            length -= len(chunk)

    def reply_message(self, status: int, message: Message, json_body: bool, **headers: Any) -> None:
        if json_body:
            body, media = to_otlp_json(message).encode(), JSON
        else:
            body, media = message.SerializeToString(), PROTOBUF
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-").title(), str(value))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_error(self, status: int, code: int, message: str, json_body: bool,
                    retry_after: float | None = None, **headers: Any) -> None:
        if retry_after is not None:
            headers["retry_after"] = math.ceil(retry_after)  # Retry-After takes whole seconds
        self.reply_message(status, status_pb2.Status(code=code, message=message), json_body, **headers)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("otlp-http %s " + format, self.address_string(), *args)


def _make_http_handler(receiver: OtlpReceiver) -> type[_HttpHandler]:
    return type(
        "OtlpHttpHandler",
        (_HttpHandler,),
        {"receiver": receiver, "timeout": receiver._config.http_idle_timeout_s},
    )
