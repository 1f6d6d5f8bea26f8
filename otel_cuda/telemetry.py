"""Resource, providers, OTLP exporters, the Prometheus endpoint, and the pipeline's observer.

The traced service's spans carry the Resource of the process that made the calls (service.name of the traced
service, process.*, host.name, k8s.*); its metrics carry an instance Resource with `process.pid` on each point
(one Prometheus endpoint cannot hold a Resource per process). The sidecar's own counters use
service.name=otel-cuda. Every exporter is configured by the standard OTEL_EXPORTER_OTLP_* variables.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, ExponentialBucketHistogramAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor

from .discovery import ProcInfo
from .events import Event
from .instances import InstanceMap, ancestor_chain
from .join import BufferedStep, Joiner, StepBuffer
from .metrics import CudaMetrics
from .spans import StepSpans, Tracers
from .system import SystemView
from .steps import Step

log = logging.getLogger(__name__)

# Prometheus cannot take exponential histograms from this SDK: seconds buckets from 1 µs to 10 s there.
SECONDS_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                   5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def otlp_configured(env: Mapping[str, str] = os.environ) -> bool:
    return any(env.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                                    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))


def _protocol(signal: str, env: Mapping[str, str]) -> str:
    return env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"


def _endpoint(signal: str, env: Mapping[str, str]) -> dict:
    """Exporter arguments from `env` (the exporters read os.environ themselves; the sidecar's settings may come
    from elsewhere, e.g. the demo): the signal's endpoint as is, or the generic one (+ /v1/<signal> for HTTP)."""
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    generic = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    kwargs: dict = {}
    if _protocol(signal.upper(), env) == "grpc":
        if specific or generic:
            kwargs["endpoint"] = specific or generic
        insecure = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_INSECURE") or env.get("OTEL_EXPORTER_OTLP_INSECURE")
        if insecure is not None:
            kwargs["insecure"] = insecure.lower() == "true"
        elif kwargs.get("endpoint", "").startswith("http://"):
            kwargs["insecure"] = True
    elif specific or generic:
        kwargs["endpoint"] = specific or generic.rstrip("/") + f"/v1/{signal}"
    return kwargs


def otlp_span_exporter(env: Mapping[str, str] = os.environ):
    if _protocol("TRACES", env) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(**_endpoint("traces", env))


def otlp_metric_reader(env: Mapping[str, str] = os.environ, interval_ms: int | None = None) -> MetricReader:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    aggregation = {Histogram: ExponentialBucketHistogramAggregation()}
    if _protocol("METRICS", env) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return PeriodicExportingMetricReader(OTLPMetricExporter(preferred_aggregation=aggregation, **_endpoint("metrics", env)),
                                         export_interval_millis=interval_ms)


def prometheus_reader(registry, target_info: bool = True) -> MetricReader:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    reader = PrometheusMetricReader(disable_target_info=not target_info, registry=registry)
    # The reader has no preferred_aggregation argument; explicit seconds buckets beat its default (0..10000).
    reader._instrument_class_aggregation[Histogram] = ExplicitBucketHistogramAggregation(SECONDS_BUCKETS)
    return reader


def serve_prometheus(address: str, registry):
    """Start /metrics on host:port; returns the server (for shutdown)."""
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve /metrics on {address}: {exc.strerror}") from None
    return server


def target_environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = f.read().split(b"\0")
    except OSError:
        return {}
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


@dataclass(frozen=True)
class ResourceConfig:
    service_name: str | None = None  # of the traced service; None: the target's OTEL_SERVICE_NAME, else "vllm"
    default_service_name: str = "vllm"
    extra: Mapping[str, str] = field(default_factory=dict)  # k8s attributes known for the whole instance


class Resources:
    """Resource per traced process, built once when it is selected."""

    def __init__(self, config: ResourceConfig, k8s_attributes: Callable[[int], dict] = lambda pid: {}):
        self.config = config
        self.k8s_attributes = k8s_attributes
        self._by_pid: dict[int, Resource] = {}
        self.host = socket.gethostname()

    def service_name(self, pid: int | None = None) -> str:
        if self.config.service_name:
            return self.config.service_name
        if pid is not None:
            name = target_environ(pid).get("OTEL_SERVICE_NAME")
            if name:
                return name
        return self.config.default_service_name

    def instance(self) -> Resource:
        return Resource.create({"service.name": self.service_name(), "host.name": self.host, **self.config.extra})

    def for_pid(self, pid: int, info: ProcInfo | None = None) -> Resource:
        res = self._by_pid.get(pid)
        if res is None:
            exe = ""
            try:
                exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
            except OSError:
                pass
            attrs = {"service.name": self.service_name(pid), "process.pid": pid, "host.name": self.host,
                     **self.config.extra, **self.k8s_attributes(pid)}
            if exe:
                attrs["process.executable.name"] = exe
            if info is not None and info.cmdline:
                attrs["process.command_line"] = info.cmdline[:1024]
            res = self._by_pid[pid] = Resource.create(attrs)
        return res

    def forget(self, pid: int) -> None:
        self._by_pid.pop(pid, None)


class SelfMetrics:
    """otel_cuda.* counters of the sidecar itself (service.name=otel-cuda): nothing is dropped silently."""

    # (instrument, group of self_counts() it reads, unit, description); each group is {outcome: count}
    BY_OUTCOME = (
        ("otel_cuda.events", "events", "{event}",
         "Events by outcome: processed, lost_ringbuf, skipped_by_kernel, dropped_queue, decode_error"),
        ("otel_cuda.launches", "launch_names", "{launch}", "Launches by kernel name: named, unknown"),
        ("otel_cuda.archive.records", "archive", "{record}", "Archive records by outcome: written, dropped_<reason>"),
        ("otel_cuda.archive.uploads", "archive_uploads", "{file}", "Archive files uploaded to S3 and failed upload attempts"),
        ("otel_cuda.join.requests", "join", "{request}", "Request spans joined, by outcome"),
        ("otel_cuda.join.incomplete", "join_incomplete", "{request}",
         "Request spans joined with cuda.join.complete=false, by reason (ringbuf_loss, kernel_table_full, "
         "steps_evicted, attached_mid_request, ambiguous_engine, ambiguous_step, timing_mismatch, clock_step); a "
         "request may have several"),
        ("otel_cuda.receiver.spans", "receiver", "{span}", "Spans received and forwarded, by outcome"),
    )

    def __init__(self, meter, read: Callable[[], dict]):
        self._read = read
        for name, group, unit, description in self.BY_OUTCOME:
            meter.create_observable_counter(name, [self._by_outcome(group)], unit=unit, description=description)
        meter.create_observable_counter("otel_cuda.steps.evicted", [self._single("steps_evicted")], unit="{step}",
                                        description="Buffered steps evicted before a request could claim them")
        meter.create_observable_counter("otel_cuda.kernel_tables.full", [self._single("kernel_table_full")],
                                        unit="{entry}", description="Entries a full kernel table refused: an "
                                        "aggregate, a kernel's launch counter (its launches are then "
                                        "cuda.kernel.name=unrecorded), an allocation's size, an entry->return pair "
                                        "or a tracked file")
        meter.create_observable_counter("otel_cuda.kernel_names.truncated", [self._single("kernel_names_truncated")],
                                        unit="{name}", description="Kernel names left cut at 256 bytes (the process "
                                        "was gone before the rest could be read from its memory)")
        meter.create_observable_counter("otel_cuda.kernel_names.unread", [self._single("kernel_names_unread")],
                                        unit="{name}", description="Kernel names the probe could not read (or "
                                        "empty): read from the process's memory instead, else the kernel is unknown")
        meter.create_observable_gauge("otel_cuda.archive.pending", [self._single("archive_pending_bytes")], unit="By",
                                      description="Archive bytes on local disk waiting for upload")

    def _by_outcome(self, group: str):
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            for outcome, n in self._read().get(group, {}).items():
                yield Observation(n, {"outcome": outcome})

        return observe

    def _single(self, key: str):
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(self._read().get(key, 0))

        return observe


class Telemetry:
    """The pipeline's observer: metrics, step and outlier spans, the step buffer for the join."""

    def __init__(self, meter_provider: MeterProvider, self_meter_provider: MeterProvider, span_processor: SpanProcessor,
                 resources: Resources, kernel_maps, clock, joiner_config, top_k: int = 20,
                 on_request: Callable[[dict], None] = lambda r: None):
        self.meter_provider = meter_provider
        self.self_meter_provider = self_meter_provider
        self.resources = resources
        self.kernel_maps = kernel_maps
        self.clock = clock
        self.tracers = Tracers(span_processor, resources.for_pid)
        self.spans = StepSpans(self.tracers, clock)
        # launches per kernel from the kernel's table where there is one (replay has none: from the events)
        self.metrics = CudaMetrics(meter_provider.get_meter("otel_cuda"), kernel_maps.stats, kernel_maps.live_bytes,
                                   top_k, kernel_launches=getattr(kernel_maps, "kernel_launches", None))
        # cuda.api.duration / cuda.sync.duration come from the kernel's histograms, added to what each reader collects
        # (the SDK has no asynchronous histogram): the readers the MeterProvider was built with
        for reader in meter_provider._metric_readers:  # noqa: SLF001
            self.metrics.histograms.install(reader, meter_provider._sdk_config.resource)  # noqa: SLF001
        self.system = SystemView(self.tracers, clock, meter_provider.get_meter("otel_cuda"), kernel_maps)
        self.steps = StepBuffer(joiner_config)
        self.processes: dict[int, ProcInfo] = {}
        self.ancestors: dict[int, tuple[int, ...]] = {}  # traced pid -> its ancestors, parent first
        self.instances = InstanceMap(joiner_config.instance_key, lambda: dict(self.ancestors),
                                     lambda pid: self.resources.for_pid(pid).attributes)
        self.joiner = Joiner(joiner_config, self.steps, self.tracers.tracer, clock.offset_at, self.instances.resolve,
                             on_request=on_request)
        self._losses = (0, 0, time.monotonic_ns())  # ring-buffer losses and kernel-table refusals at the last look
        self.pipeline = None
        self.extra_counts: list[Callable[[], dict]] = []  # archive / receiver / forwarder stats
        SelfMetrics(self_meter_provider.get_meter("otel_cuda.self"), self.self_counts)
        self._stopped = False

    def attach_pipeline(self, pipeline) -> None:
        self.pipeline = pipeline
        self.metrics.launches.name = pipeline.names.lookup

    # -- Observer ----------------------------------------------------------------------------------------
    def on_events(self, batch) -> None:
        self.metrics.on_events(batch)
        self.system.on_events(batch)

    def on_launches(self, run) -> None:
        self.metrics.on_launches(run)
        self.system.on_launches(run)

    def on_idle(self, now_ns: int) -> None:
        """The pipeline has processed every event stamped before now_ns: joins waiting on it may proceed."""
        self._note_losses(now_ns)
        self.metrics.names_read_before(now_ns)
        self.steps.advance(now_ns)
        self.system.on_idle(now_ns)

    def _note_losses(self, now_ns: int) -> None:
        """Loss is counted per CPU, not stamped: the interval since the last look is where it happened, and a
        request window that overlaps it is not complete."""
        if self.pipeline is None:
            return
        lost, full, since = self._losses
        now_lost, now_full = self.pipeline.probes.lost(), self.pipeline.probes.table_full()
        if now_lost > lost:
            self.steps.gap(since, now_ns, "ringbuf_loss")
        if now_full > full:
            self.steps.gap(since, now_ns, "kernel_table_full")
        self._losses = (now_lost, now_full, now_ns)

    def on_step(self, step: Step) -> None:
        self.metrics.on_step(step)
        context = self.spans.on_step(step)
        self.steps.add(BufferedStep(step.pid, step.start_ns, step.end_ns, step.launches, step.graph_launches,
                                    step.memcpy_bytes, step.api_ns, step.sync_ns, context,
                                    sealed_ns=step.sealed_ns))

    def on_outlier(self, ev: Event, kernel: str | None) -> None:
        self.spans.on_outlier(ev, kernel)

    def on_process(self, info: ProcInfo) -> None:
        self.processes[info.pid] = info
        self.ancestors[info.pid] = ancestor_chain(info.pid)
        self.instances.note(self.ancestors[info.pid])
        self.steps.traced_since(info.pid, time.monotonic_ns())
        self.resources.for_pid(info.pid, info)
        self.system.on_process(info)

    def before_forget(self, pid: int) -> None:
        """The pipeline read everything the gone process wrote; its kernel names go next."""
        self.metrics.settle(pid)

    def on_process_exit(self, info: ProcInfo) -> None:
        self.metrics.retire(info.pid)
        self.system.on_process_exit(info)
        self.processes.pop(info.pid, None)
        # Spans of its last steps may still be joined: keep its tracer and resource until shutdown.

    def self_counts(self) -> dict:
        out: dict = {"events": {}, "join": {}, "steps_evicted": self.steps.evicted}
        if self.pipeline is not None:
            p = self.pipeline
            out["events"] = {"processed": sum(p.totals.calls.values()), "lost_ringbuf": p.probes.lost(),
                             "skipped_by_kernel": p.probes.skipped_runs(), "dropped_queue": p.totals.dropped_queue,
                             "decode_error": p.reader.counters.decode_errors}
            out["launch_names"] = {"named": p.names.launches_named, "unknown": p.names.launches_unknown}
            out["kernel_names_truncated"] = p.names.names_truncated
            out["kernel_names_unread"] = p.totals.names_unread
            out["kernel_table_full"] = p.probes.table_full()
        j = self.joiner.counters
        out["join"] = j.outcomes()
        out["join_incomplete"] = dict(j.incomplete_by)
        for extra in self.extra_counts:
            out.update(extra())
        return out

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.system.shutdown()  # model-load spans of processes still loading end now
        self.metrics.final()  # the consumer has stopped: kernels still unnamed are unknown
        self.tracers.shutdown()
        for provider in (self.meter_provider, self.self_meter_provider):
            try:
                provider.force_flush()
            finally:
                provider.shutdown()
