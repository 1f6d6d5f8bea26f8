"""`otel-cuda replay PATH --otlp-endpoint URL`: archived events -> the same OTel metrics and spans the live
sidecar makes (backfill after an outage of the Collector or the backend).

The archive holds every call, so the stages run as they do live: kernel names come from the records, steps are
rebuilt by the same StepTracker, spans keep their original times, and what the kernel's maps would have held
is rebuilt from the events (RecordedMaps). Joined requests are re-emitted as cuda.prefill / cuda.decode children
of their llm_request (the original span ids are in the `request` records). Metric points carry the time of the
replay (OTLP metrics cannot be back-dated by the SDK); their values are the archive's totals.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Iterable

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from . import probes
from .events import EV_CALL, EV_LAUNCH, Event
from .join import JoinConfig
from .records import from_record, moved_bytes
from .steps import StepConfig, StepTracker
from . import telemetry as tel


class RecordedMaps:
    """The kernel's aggregates (bpf.Probes.stats / live_bytes / lost), rebuilt from events."""

    def __init__(self):
        self._stats: dict[tuple[int, int], dict] = {}
        self._live: Counter[tuple[int, int]] = Counter()

    def add(self, ev: Event) -> None:
        if ev.nested:
            return
        agg = self._stats.setdefault((ev.pid, ev.func), {"calls": 0, "errors": 0, "total_ns": 0, "bytes": 0,
                                                         "hist": [0] * 32})
        agg["calls"] += 1
        if ev.has_return:
            agg["total_ns"] += ev.dur_ns
            agg["errors"] += ev.result != 0
            agg["hist"][min(max(ev.dur_ns, 1).bit_length() - 1, 31)] += 1
        p = probes.BY_ID[ev.func]
        # live memory from the driver layer only (nested calls included): a runtime cudaMalloc/cudaFree is the driver
        # call under it, and carries no memory type of its own
        driver = p.layer == probes.DRIVER
        if ev.type == EV_CALL and p.symbol in probes.ALLOCATING and ev.result == 0:
            agg["bytes"] += ev.args[1]
            if driver:
                self._live[(ev.pid, ev.args[2])] += ev.args[1]
        elif (ev.type == EV_CALL and driver and p.group == "memory" and "known" in p.args and ev.result == 0
              and ev.args[3]):
            self._live[(ev.pid, ev.args[2])] -= ev.args[1]
        else:
            agg["bytes"] += moved_bytes(ev)

    def stats(self) -> dict:
        return self._stats

    def live_bytes(self) -> dict:
        return dict(self._live)

    def lost(self) -> int:
        return 0

    def skipped_runs(self) -> int:
        return 0

    def table_full(self) -> int:
        return 0


class RecordedClock:
    """The monotonic->epoch offset the live sidecar used, read off each record (ts - mono_ns)."""

    offset_ns = 0

    def offset(self) -> int:
        return self.offset_ns

    def offset_at(self, wall_ns: int) -> tuple[int, bool]:
        return self.offset_ns, True


class ReplayResources(tel.Resources):
    """Resources of processes that are gone: from the archive and the settings, not from /proc."""

    def for_pid(self, pid, info=None):
        res = self._by_pid.get(pid)
        if res is None:
            res = self._by_pid[pid] = Resource.create({"service.name": self.service_name(), "process.pid": pid,
                                                       "host.name": self.host, "otel_cuda.replayed": True})
        return res


def replay(records: Iterable[dict], telemetry: tel.Telemetry, maps: RecordedMaps, clock: RecordedClock) -> dict:
    steps = StepTracker(StepConfig(), on_step=telemetry.on_step, on_outlier=telemetry.on_outlier)
    counts: Counter[str] = Counter()
    for rec in records:
        if rec.get("type") == "request":
            counts["requests"] += emit_request_children(rec, telemetry)
            continue
        ev = from_record(rec)
        if ev is None:
            counts["skipped"] += 1
            continue
        clock.offset_ns = rec["ts"] - rec["mono_ns"]
        maps.add(ev)
        kernel = rec.get("kernel") if ev.type == EV_LAUNCH else None
        telemetry.on_events([(ev, kernel, steps.process(ev, kernel))])
        counts["events"] += 1
    steps.close_all()
    counts["steps"] = len(telemetry.steps)
    return dict(counts)


def emit_request_children(rec: dict, telemetry: tel.Telemetry) -> int:
    parent = SpanContext(int(rec["trace_id"], 16), int(rec["span_id"], 16), is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    pid = min(telemetry.resources._by_pid, default=0)
    made = 0
    for phase, (start, end) in rec.get("windows", {}).items():
        summary = rec.get("cuda", {}).get(phase) or {}
        if not summary.get("steps"):
            continue
        span = telemetry.tracers.tracer(pid).start_span(
            f"cuda.{phase}", kind=SpanKind.INTERNAL, start_time=start,
            context=trace.set_span_in_context(NonRecordingSpan(parent)),
            attributes={f"cuda.{k}": v for k, v in summary.items()})
        span.end(end_time=end)
        made = 1
    return made


def run(args) -> int:
    from .archive_read import ErrorPrinter, iter_records, s3_client_for

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": args.otlp_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": args.protocol}
    errors = ErrorPrinter("otel-cuda replay")
    maps, clock = RecordedMaps(), RecordedClock()
    resources = ReplayResources(tel.ResourceConfig(service_name=args.service_name))
    meter_provider = MeterProvider(resource=resources.instance(), metric_readers=[tel.otlp_metric_reader(env)])
    telemetry = tel.Telemetry(meter_provider, MeterProvider(), BatchSpanProcessor(tel.otlp_span_exporter(env)),
                              resources, maps, clock, JoinConfig(retention_s=10**9))
    records = iter_records(args.paths, s3_client=s3_client_for(args.paths, args.endpoint_url), on_error=errors)
    try:
        counts = replay(records, telemetry, maps, clock)
    finally:
        telemetry.shutdown()
    print(f"otel-cuda replay: {counts.get('events', 0)} events, {counts.get('steps', 0)} steps, "
          f"{counts.get('requests', 0)} requests re-exported to {args.otlp_endpoint}; {errors.count} input problems",
          file=sys.stderr)
    return 0 if counts.get("events") else 1


def register(subparsers) -> None:
    from .archive_read import add_input_arguments

    p = subparsers.add_parser("replay", help="re-export archived events as OTel metrics and spans (backfill)")
    add_input_arguments(p)
    p.add_argument("--otlp-endpoint", required=True, help="where to send them, e.g. http://collector:4317")
    p.add_argument("--protocol", default="grpc", choices=("grpc", "http/protobuf"))
    p.add_argument("--service-name", default=None, help="service.name of the replayed service (default vllm)")
    p.set_defaults(func=run)
