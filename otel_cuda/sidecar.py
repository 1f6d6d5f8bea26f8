"""The sidecar's composition root: every stage built from the settings, started, and stopped in order.

Stop order matters: the ring buffer is drained and open steps closed first (their spans feed the join), then
the OTLP receiver drains into the join and the forwarder, then the forwarder, the archive and the exporters
flush. Each wait is bounded.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlparse

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from . import telemetry as tel
from .clock import MonotonicToEpoch
from .config import SidecarConfig
from .discovery import LiveProcFS
from .join import JoinConfig
from .pipeline import Pipeline, build

log = logging.getLogger(__name__)


class StartError(RuntimeError):
    """A stage could not start (port taken, archive unwritable): one line for the user."""


def _address(value: str | None) -> str | None:
    return None if value in (None, "", "off", "none") else value


class HealthServer:
    """/healthz: the process serves; /readyz: the BPF program is loaded and the pipeline runs."""

    def __init__(self, address: str, ready: threading.Event):
        ready_event = ready

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path == "/healthz":
                    code = 200
                elif self.path == "/readyz":
                    code = 200 if ready_event.is_set() else 503
                else:
                    code = 404
                body = {200: b"ok\n", 503: b"starting\n", 404: b"not found\n"}[code]
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args):
                pass

        host, _, port = address.rpartition(":")
        try:
            self.server = http.server.ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        except OSError as exc:
            raise StartError(f"cannot serve /healthz on {address}: {exc.strerror}") from None
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="health", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Sidecar:
    settings: SidecarConfig
    probes: object
    pipeline: Pipeline
    telemetry: tel.Telemetry
    receiver: object | None
    forwarder: object | None
    servers: list

    def run(self, stop: threading.Event) -> None:
        self.pipeline.start()
        try:
            self.pipeline.run(stop)
        finally:
            self.close()

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.shutdown()
        if self.forwarder is not None:
            self.forwarder.shutdown(timeout=10.0)
        self.pipeline.close()
        self.telemetry.shutdown()
        for server in self.servers:
            try:
                server.close() if hasattr(server, "close") else server.shutdown()
            except Exception:  # noqa: BLE001 - shutting down anyway
                log.debug("closing %s", server, exc_info=True)

    def summary(self) -> dict:
        s = self.pipeline.summary()
        s["join"] = {k: v for k, v in vars(self.telemetry.joiner.counters).items() if k != "by_request"}
        s["steps_buffered"] = len(self.telemetry.steps)
        s["steps_evicted"] = self.telemetry.steps.evicted
        if self.forwarder is not None:
            st = self.forwarder.stats()
            s["forwarder"] = {"forwarded_spans": st.forwarded_spans, "dropped_spans": st.dropped_spans,
                              "dropped_by_reason": dict(st.dropped_by_reason)}
        return s


def open_archive(destination: str | None, options: dict, env: Mapping[str, str] = os.environ):
    if destination is None:
        return None
    from .archive import Archive, ArchiveConfig

    try:
        config = ArchiveConfig(
            destination=destination, buffer_dir=options["archive_buffer"],
            rotate_seconds=options["archive_rotate_seconds"], rotate_bytes=options["archive_rotate_bytes"],
            quota_bytes=options["archive_quota_bytes"], retention_days=options["archive_retention_days"],
            node=env.get("K8S_NODE_NAME") or socket.gethostname(), namespace=env.get("K8S_NAMESPACE") or "unknown",
            pod=env.get("K8S_POD_NAME") or "unknown",
            s3_endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None)
    except ValueError as exc:
        raise StartError(str(exc)) from None

    if not destination.startswith("s3://"):
        try:
            os.makedirs(destination, exist_ok=True)
            probe = os.path.join(destination, ".write-test")
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise StartError(f"archive directory {destination} is not writable: {exc.strerror}") from None
    try:
        return Archive(config)
    except (OSError, RuntimeError) as exc:  # RuntimeError: another writer holds the directory's lock
        raise StartError(f"cannot open the archive at {destination}: {exc}") from None


def _k8s_resolver(options: dict, env: Mapping[str, str]):
    from .k8s import K8sConfig, PodResolver, in_cluster_api

    mode = options["k8s"]
    if mode == "off":
        return None
    api, why = (in_cluster_api() if mode == "api" else (None, ""))
    if mode == "api" and api is None:
        log.warning("k8s: %s; tracing goes on without pod attributes", why)
    try:
        config = K8sConfig(mode=mode, node_name=env.get("K8S_NODE_NAME", ""), pod_selector=options["pod_selector"] or "")
    except ValueError as exc:
        raise StartError(str(exc)) from None
    return PodResolver(config, api, env=env)


def start(settings: SidecarConfig, probes, procfs=None, env: Mapping[str, str] = os.environ,
          span_processor: SpanProcessor | None = None, metric_readers: list | None = None,
          self_metric_readers: list | None = None, forwarder_config=None) -> Sidecar:
    """Build and start every stage but the pipeline loop (Sidecar.run). Readers and the span processor may be
    passed in (tests: InMemoryMetricReader / InMemorySpanExporter); by default they follow the settings and the
    standard OTEL_* variables."""
    from .forwarder import Forwarder, ForwarderConfig
    from .receiver import OtlpReceiver, ReceiverBindError, ReceiverConfig

    opts = settings.options
    servers: list = []
    archive = open_archive(settings.archive, opts, env)
    resolver = _k8s_resolver(opts, env)
    if resolver is not None:
        servers.append(resolver)
    resources = tel.Resources(tel.ResourceConfig(service_name=opts["service_name"] or env.get("OTEL_SERVICE_NAME")),
                              k8s_attributes=resolver.resource_attributes if resolver else (lambda pid: {}))

    otlp = tel.otlp_configured(env)
    if span_processor is None:
        span_processor = BatchSpanProcessor(tel.otlp_span_exporter(env)) if otlp else SpanProcessor()
    readers = list(metric_readers or [])
    self_readers = list(self_metric_readers or [])
    metrics_address = _address(opts["metrics_address"])
    if metric_readers is None:
        if otlp:
            readers.append(tel.otlp_metric_reader(env))
            self_readers.append(tel.otlp_metric_reader(env))
        if metrics_address:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry()
            readers.append(tel.prometheus_reader(registry))
            self_readers.append(tel.prometheus_reader(registry, target_info=False))
            try:
                servers.append(tel.serve_prometheus(metrics_address, registry))
            except OSError as exc:
                raise StartError(str(exc)) from None
    meter_provider = MeterProvider(resource=resources.instance(), metric_readers=readers)
    self_provider = MeterProvider(resource=Resource.create({"service.name": "otel-cuda"}), metric_readers=self_readers)

    clock = MonotonicToEpoch()
    join_config = JoinConfig(instance_key=opts["instance_key"])
    telemetry = tel.Telemetry(meter_provider, self_provider, span_processor, resources, probes, clock, join_config,
                              top_k=opts["top_k"])
    admit = resolver.selected if resolver is not None and opts["k8s"] == "api" else (lambda pid: True)
    pipeline = build(settings, probes, procfs or LiveProcFS(), archive=archive, observer=telemetry, clock=clock,
                     admit=admit)
    telemetry.attach_pipeline(pipeline)
    telemetry.joiner.on_request = pipeline.archive_record
    if archive is not None:
        def archive_counts() -> dict:
            stats = archive.stats()
            return {"archive": _archive_outcomes(stats), "archive_pending_bytes": stats.get("pending_bytes", 0),
                    "archive_uploads": {"uploaded": stats.get("files_uploaded", 0),
                                        "failed": stats.get("upload_failures", 0)}}

        telemetry.extra_counts.append(archive_counts)

    receiver = forwarder = None
    grpc_address, http_address = _address(opts["receiver_grpc"]), _address(opts["receiver_http"])
    if grpc_address or http_address:
        fwd_config = forwarder_config or ForwarderConfig.from_env(env)
        if fwd_config.endpoint and any(_same_address(fwd_config.endpoint, a) for a in (grpc_address, http_address)):
            raise StartError(f"the OTLP upstream {fwd_config.endpoint} is this sidecar's own receiver: spans would loop")
        forwarder = Forwarder(fwd_config)

        def handle(request, peer):
            try:
                telemetry.joiner.handle(request, peer)
            finally:  # vLLM's spans go upstream whatever the join did
                forwarder.forward(request)

        receiver = OtlpReceiver(ReceiverConfig(grpc_address=grpc_address, http_address=http_address), handle,
                                with_peer=True)
        try:
            receiver.start()
        except ReceiverBindError as exc:
            raise StartError(str(exc)) from None
        telemetry.extra_counts.append(lambda: {"receiver": _receiver_outcomes(receiver, forwarder)})

    health_address = _address(opts["health_address"])
    if health_address:
        servers.append(HealthServer(health_address, pipeline.ready))
    return Sidecar(settings, probes, pipeline, telemetry, receiver, forwarder, servers)


def _same_address(endpoint: str, address: str | None) -> bool:
    if not address:
        return False
    url = urlparse(endpoint if "://" in endpoint else "//" + endpoint)
    host, _, port = address.rpartition(":")
    return url.port == int(port) and url.hostname in ("127.0.0.1", "localhost", "::1", host)


def _archive_outcomes(stats: dict) -> dict:
    """Every line the archive did not deliver, by reason (docs/archive.md)."""
    out = {"written": stats.get("lines_written", 0)}
    for key, n in stats.items():
        if key.startswith("lines_dropped_"):
            out["dropped_" + key.removeprefix("lines_dropped_")] = n
    out["dropped_partial_line"] = stats.get("partial_lines_dropped", 0)
    return out


def _receiver_outcomes(receiver, forwarder) -> dict:
    st = forwarder.stats()
    out = {"forwarded": st.forwarded_spans}
    for reason, n in st.dropped_by_reason.items():
        out[f"dropped_{reason}"] = n
    for (name, attrs), n in receiver.counters.snapshot().items():
        labels = dict(attrs)
        if name == "received_spans" and labels.get("outcome") != "accepted":
            key = f"refused_{labels.get('outcome')}"
            out[key] = out.get(key, 0) + n
    return out
