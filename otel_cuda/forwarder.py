"""Sends the spans the sidecar received (and joined) on upstream, to the OTel Collector, as raw OTLP requests.

`forward()` never blocks its caller (the receiver's worker, i.e. vLLM's export path): it appends to a queue bounded
in spans, and one sender thread exports the queue head with the gRPC `TraceService.Export` stub or an OTLP/HTTP
protobuf POST. While the upstream is down the head is retried with exponential backoff (honouring the upstream's
RetryInfo / Retry-After); the gRPC channel's own reconnect backoff is capped by the same settings so that recovery
follows within one max backoff of the upstream coming back.

When the queue holds more spans than `queue_max_spans` the OLDEST batches are dropped: during an outage the recent
spans are the ones worth having (they describe the system now, and they are what a user looking at a live problem
after recovery will search for); keeping the oldest would freeze the sidecar's view at the moment the outage began
and throw away everything after it, recovery period included. The batch being sent is not evicted (it is the one
already on the wire); memory is therefore at most `queue_max_spans` queued spans plus that one batch.

Every span received is counted exactly once as forwarded or dropped (by reason), or is still queued/in flight:
`received == forwarded + dropped + queued + in_flight` at all times, and after `shutdown()` queued = in_flight = 0.
Retryability follows the OTLP spec: gRPC CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE,
DATA_LOSS, and RESOURCE_EXHAUSTED only with RetryInfo; HTTP 429, 502, 503, 504; connection errors and timeouts.
"""

from __future__ import annotations

import email.utils
import gzip
import logging
import os
import random
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Literal, Mapping, Protocol
from urllib.parse import urlsplit

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.util.re import parse_env_headers

logger = logging.getLogger(__name__)

OtlpProtocol = Literal["grpc", "http/protobuf"]

# Drop reasons (ForwarderStats.dropped_by_reason keys).
NO_UPSTREAM = "no_upstream"  # no endpoint configured
QUEUE_FULL = "queue_full"  # evicted, oldest first, to keep the queue under its bound
REJECTED = "rejected"  # the upstream refused the batch for good (non-retryable error)
PARTIAL_REJECTED = "partial_rejected"  # the upstream accepted the batch but reported these spans rejected
SHUTDOWN = "shutdown"  # still queued when shutdown's time ran out, or forwarded after shutdown


@dataclass(frozen=True)
class ForwarderConfig:
    endpoint: str | None = None  # None: forward nowhere (every span counted as dropped, "no_upstream")
    protocol: OtlpProtocol = "grpc"
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0  # seconds, per export attempt
    insecure: bool | None = None  # gRPC without a scheme: plaintext when True; None → from the scheme (http = plain)
    compression: Literal["gzip"] | None = None
    certificate_file: str | None = None  # CA bundle for TLS; None → system roots
    queue_max_spans: int = 20_000
    retry_initial_backoff: float = 1.0
    retry_max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"ForwarderConfig: protocol {self.protocol!r} not supported (grpc or http/protobuf)")
        if self.compression not in (None, "gzip"):
            raise ValueError(f"ForwarderConfig: compression {self.compression!r} not supported (gzip or None)")
        if self.endpoint is not None and self.protocol == "http/protobuf" and "://" not in self.endpoint:
            raise ValueError(f"ForwarderConfig: an OTLP/HTTP endpoint is a URL, got {self.endpoint!r}")
        if self.queue_max_spans <= 0 or self.timeout <= 0:
            raise ValueError("ForwarderConfig: queue_max_spans and timeout must be positive")
        if not 0 < self.retry_initial_backoff <= self.retry_max_backoff:
            raise ValueError("ForwarderConfig: need 0 < retry_initial_backoff <= retry_max_backoff")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: object) -> ForwarderConfig:
        """Settings from the standard OTEL_EXPORTER_OTLP_[TRACES_]* variables; `overrides` (config field names)
        win. As the spec says, a TRACES endpoint is used as is, while the generic OTEL_EXPORTER_OTLP_ENDPOINT gets
        /v1/traces appended for OTLP/HTTP; timeouts are in milliseconds (the spec's unit)."""

        def get(name: str) -> str | None:
            value = env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")
            return value.strip() if value and value.strip() else None

        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"ForwarderConfig.from_env: unknown settings {sorted(unknown)}")
        values: dict[str, object] = {}
        protocol = (get("PROTOCOL") or "grpc").lower()
        values["protocol"] = protocol
        signal_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        if signal_endpoint:
            values["endpoint"] = signal_endpoint
        elif base_endpoint:
            values["endpoint"] = (
                base_endpoint.rstrip("/") + "/v1/traces" if protocol == "http/protobuf" else base_endpoint
            )
        if (headers := get("HEADERS")) is not None:
            values["headers"] = tuple(parse_env_headers(headers, liberal=True).items())
        if (timeout := get("TIMEOUT")) is not None:
            values["timeout"] = float(timeout) / 1000.0
        if (insecure := get("INSECURE")) is not None:
            values["insecure"] = insecure.lower() == "true"
        if (compression := get("COMPRESSION")) is not None:
            values["compression"] = None if compression.lower() == "none" else compression.lower()
        if (certificate := get("CERTIFICATE")) is not None:
            values["certificate_file"] = certificate
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ForwarderStats:
    received_spans: int
    forwarded_spans: int
    dropped_spans: int
    dropped_by_reason: Mapping[str, int]
    retries: int  # export attempts that were retries of a batch
    failures: int  # export attempts that failed (retryable or not)
    queued_spans: int  # waiting, at most queue_max_spans
    queued_batches: int
    in_flight_spans: int  # the batch being sent
    last_error: str | None


@dataclass(frozen=True)
class ExportResult:
    ok: bool
    retryable: bool = False
    retry_after: float | None = None  # the upstream's requested delay, seconds
    rejected_spans: int = 0  # partial success
    error: str | None = None


class TraceExporter(Protocol):
    def export(self, request: trace_service_pb2.ExportTraceServiceRequest, timeout: float) -> ExportResult: ...

    def close(self) -> None: ...


# --- gRPC ----------------------------------------------------------------------------------------------------------

_GRPC_RETRYABLE = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})


def _grpc_retry_delay(error: grpc.RpcError) -> float | None:
    """RetryInfo from the trailers: the standard grpc-status-details-bin, or the key the Python SDK uses."""
    try:
        metadata = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a malformed trailer just means "no hint"
        return None
    retry = error_details_pb2.RetryInfo()
    try:
        if "google.rpc.retryinfo-bin" in metadata:
            retry.ParseFromString(metadata["google.rpc.retryinfo-bin"])
            return retry.retry_delay.ToTimedelta().total_seconds()
        if "grpc-status-details-bin" in metadata:
            status = status_pb2.Status.FromString(metadata["grpc-status-details-bin"])
            for detail in status.details:
                if detail.Unpack(retry):
                    return retry.retry_delay.ToTimedelta().total_seconds()
    except DecodeError:
        return None
    return None


class GrpcTraceExporter:
    def __init__(self, config: ForwarderConfig) -> None:
        assert config.endpoint is not None
        parts = urlsplit(config.endpoint if "://" in config.endpoint else f"//{config.endpoint}")
        target = parts.netloc
        if parts.scheme == "https":
            secure = True
        elif parts.scheme == "http":
            secure = False
        else:  # no scheme: the spec's OTEL_EXPORTER_OTLP_INSECURE, default false (TLS)
            secure = not config.insecure
        options = [
            # grpc's own reconnect backoff grows to 120 s by default; while it waits, every RPC fails fast without
            # trying to connect, so an upstream back after an outage would go unnoticed for up to 2 minutes.
            ("grpc.initial_reconnect_backoff_ms", int(config.retry_initial_backoff * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(config.retry_initial_backoff * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(config.retry_max_backoff * 1000)),
        ]
        compression = grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression
        if secure:
            roots = None
            if config.certificate_file:
                with open(config.certificate_file, "rb") as f:
                    roots = f.read()
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(target, credentials, options=options, compression=compression)
        else:
            self._channel = grpc.insecure_channel(target, options=options, compression=compression)
        self._stub = trace_service_pb2_grpc.TraceServiceStub(self._channel)
        self._metadata = tuple((k.lower(), v) for k, v in config.headers)  # gRPC metadata keys are lower case

    def export(self, request: trace_service_pb2.ExportTraceServiceRequest, timeout: float) -> ExportResult:
        try:
            response = self._stub.Export(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            delay = _grpc_retry_delay(error)
            retryable = code in _GRPC_RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None)
            details = error.details()  # type: ignore[attr-defined]
            return ExportResult(False, retryable, delay, error=f"gRPC {code.name}: {details}")
        return ExportResult(True, rejected_spans=response.partial_success.rejected_spans)

    def close(self) -> None:
        self._channel.close()


# --- HTTP ----------------------------------------------------------------------------------------------------------

_HTTP_RETRYABLE = frozenset({429, 502, 503, 504})


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class HttpTraceExporter:
    """OTLP/HTTP protobuf with the standard library: one POST per batch, no session state to go stale."""

    def __init__(self, config: ForwarderConfig) -> None:
        assert config.endpoint is not None
        self._url = config.endpoint
        self._gzip = config.compression == "gzip"
        self._headers = {k: v for k, v in config.headers}
        self._headers["Content-Type"] = "application/x-protobuf"
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        https = self._url.startswith("https")
        self._ssl = ssl.create_default_context(cafile=config.certificate_file) if https else None

    def export(self, request: trace_service_pb2.ExportTraceServiceRequest, timeout: float) -> ExportResult:
        body = request.SerializeToString()
        if self._gzip:
            body = gzip.compress(body)
        http_request = urllib.request.Request(self._url, data=body, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(http_request, timeout=timeout, context=self._ssl) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            with error:
                detail = error.read(512).decode("utf-8", "replace")
            return ExportResult(False, error.code in _HTTP_RETRYABLE, _retry_after(error.headers.get("Retry-After")),
                                error=f"HTTP {error.code}: {detail}")
        except (urllib.error.URLError, OSError) as error:  # refused, reset, timed out: the upstream may come back
            return ExportResult(False, True, error=f"{type(error).__name__}: {error}")
        rejected = 0
        try:
            rejected = trace_service_pb2.ExportTraceServiceResponse.FromString(payload).partial_success.rejected_spans
        except DecodeError:
            pass  # a 2xx is success whatever its body
        return ExportResult(True, rejected_spans=rejected)

    def close(self) -> None:
        pass


def make_exporter(config: ForwarderConfig) -> TraceExporter:
    return GrpcTraceExporter(config) if config.protocol == "grpc" else HttpTraceExporter(config)


# --- the forwarder -------------------------------------------------------------------------------------------------


_EVICTION_LOG_INTERVAL_S = 10.0


@dataclass(eq=False)
class _Batch:
    request: trace_service_pb2.ExportTraceServiceRequest
    spans: int
    settled: bool = field(default=False)


class Forwarder:
    """Bounded, non-blocking, retrying OTLP trace forwarder; see the module docstring.

    The sender thread starts with the first `forward()` (or an explicit, idempotent `start()`), so a forwarder
    that is never used holds no thread. The forwarder takes ownership of each request passed to `forward()`: do not
    mutate it afterwards."""

    def __init__(
        self,
        config: ForwarderConfig,
        exporter: TraceExporter | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._exporter = exporter if exporter is not None or config.endpoint is None else make_exporter(config)
        self._rng = rng or random.Random()
        self._cond = threading.Condition()  # guards everything below
        self._queue: deque[_Batch] = deque()
        self._queued_spans = 0
        self._in_flight: _Batch | None = None
        self._closing = False
        self._deadline: float | None = None
        self._stop = threading.Event()  # set when shutdown's time is up: cuts every backoff wait
        self._thread: threading.Thread | None = None
        self._shutdown_done = False
        self._received = 0
        self._forwarded = 0
        self._dropped: dict[str, int] = {}
        self._retries = 0
        self._failures = 0
        self._last_error: str | None = None
        self._evicted_unlogged = 0
        self._upstream_up = True  # for logging transitions only
        self._next_eviction_log = 0.0

    def start(self) -> Forwarder:
        with self._cond:
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        if self._thread is None and self._exporter is not None and not self._closing:
            self._thread = threading.Thread(target=self._run, name="otlp-forwarder", daemon=True)
            self._thread.start()

    def __enter__(self) -> Forwarder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def forward(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        """Queue a request for upstream; never blocks (beyond a short lock), never raises for a full queue."""
        spans = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self._cond:
            self._received += spans
            if self._exporter is None:
                self._drop_locked(spans, NO_UPSTREAM)
                return
            if self._closing:
                self._drop_locked(spans, SHUTDOWN)
                return
            if spans == 0:
                return
            self._start_locked()
            self._queue.append(_Batch(request, spans))
            self._queued_spans += spans
            evicted = 0
            while self._queued_spans > self._config.queue_max_spans and self._queue:
                oldest = self._queue.popleft()
                self._queued_spans -= oldest.spans
                self._settle_locked(oldest, dropped_reason=QUEUE_FULL)
                evicted += oldest.spans
            self._cond.notify()
        if evicted:
            self._log_eviction(evicted)

    def stats(self) -> ForwarderStats:
        with self._cond:
            return ForwarderStats(
                received_spans=self._received,
                forwarded_spans=self._forwarded,
                dropped_spans=sum(self._dropped.values()),
                dropped_by_reason=dict(self._dropped),
                retries=self._retries,
                failures=self._failures,
                queued_spans=self._queued_spans,
                queued_batches=len(self._queue),
                in_flight_spans=self._in_flight.spans if self._in_flight else 0,
                last_error=self._last_error,
            )

    def shutdown(self, timeout: float = 5.0) -> None:
        """Try to send what is queued within `timeout` seconds; count the rest as dropped ("shutdown"). Idempotent."""
        with self._cond:
            if self._shutdown_done:
                return
            self._shutdown_done = True
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            # Time is up: cut any backoff wait. An export in progress ends by itself, its timeout having been
            # capped at the deadline.
            self._stop.set()
            thread.join(1.0)
            if thread.is_alive():
                logger.warning("forwarder sender did not stop within %.1fs of shutdown", timeout + 1.0)
        with self._cond:
            # Whatever the sender left (or all of it, when it never ran) is dropped now, each batch exactly once.
            leftovers = list(self._queue)
            if self._in_flight is not None and (thread is None or not thread.is_alive()):
                leftovers.append(self._in_flight)
                self._in_flight = None
            self._queue.clear()
            self._queued_spans = 0
            for batch in leftovers:
                self._settle_locked(batch, dropped_reason=SHUTDOWN)
        if self._exporter is not None:
            self._exporter.close()

    # -- internals (all *_locked under self._cond) --

    def _log_eviction(self, spans: int) -> None:
        # During an outage every forward() evicts: one warning per interval, with the total, not one per call.
        now = time.monotonic()
        with self._cond:
            self._evicted_unlogged += spans
            if now < self._next_eviction_log:
                return
            spans, self._evicted_unlogged = self._evicted_unlogged, 0
            self._next_eviction_log = now + _EVICTION_LOG_INTERVAL_S
        logger.warning("forward queue over %d spans (upstream slow or down): dropped the oldest %d spans",
                       self._config.queue_max_spans, spans)

    def _drop_locked(self, spans: int, reason: str) -> None:
        if spans:
            self._dropped[reason] = self._dropped.get(reason, 0) + spans

    def _settle_locked(self, batch: _Batch, *, forwarded: int = 0, dropped_reason: str | None = None) -> None:
        if batch.settled:
            return
        batch.settled = True
        self._forwarded += forwarded
        if dropped_reason is not None:
            self._drop_locked(batch.spans - forwarded, dropped_reason)

    def _remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _next_batch(self) -> _Batch | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue or self._stop.is_set():
                return None
            batch = self._queue.popleft()
            self._queued_spans -= batch.spans
            self._in_flight = batch
            return batch

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._send(batch)
                with self._cond:
                    self._in_flight = None
        except Exception:  # the thread boundary: log, and let shutdown count what is left as dropped
            logger.exception("forwarder sender failed")

    def _send(self, batch: _Batch) -> None:
        backoff = self._config.retry_initial_backoff
        attempt = 0
        while True:
            remaining = self._remaining()
            if self._stop.is_set() or (remaining is not None and remaining <= 0):
                with self._cond:
                    self._settle_locked(batch, dropped_reason=SHUTDOWN)
                return
            timeout = self._config.timeout if remaining is None else min(self._config.timeout, remaining)
            result = self._exporter.export(batch.request, timeout)  # type: ignore[union-attr]
            with self._cond:
                if attempt:
                    self._retries += 1
                attempt += 1
                if result.ok:
                    rejected = min(result.rejected_spans, batch.spans)
                    self._settle_locked(batch, forwarded=batch.spans - rejected,
                                        dropped_reason=PARTIAL_REJECTED if rejected else None)
                    if not self._upstream_up:
                        self._upstream_up = True
                        logger.info("upstream export recovered")
                    return
                self._failures += 1
                self._last_error = result.error
                if not result.retryable:
                    self._settle_locked(batch, dropped_reason=REJECTED)
            if not result.retryable:
                logger.warning("upstream refused %d spans for good: %s", batch.spans, result.error)
                return
            if self._upstream_up:  # log the transitions, not every attempt of an outage
                self._upstream_up = False
                logger.warning("upstream export failing (%s); retrying with backoff, queue bounded at %d spans",
                               result.error, self._config.queue_max_spans)
            delay = result.retry_after if result.retry_after is not None else backoff * self._rng.uniform(0.8, 1.2)
            delay = min(delay, self._config.retry_max_backoff)
            backoff = min(backoff * 2, self._config.retry_max_backoff)
            remaining = self._remaining()
            if remaining is not None:
                delay = min(delay, max(0.0, remaining))
            self._stop.wait(delay)
