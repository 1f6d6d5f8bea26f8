"""Run the real sidecar in-process (real BPF on the fake driver) with in-memory telemetry, and the test bed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
from pathlib import Path

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_cuda import config as cfg

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "testbed" / "build"
WORKLOAD = BUILD / "workload"


def build_testbed() -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT / "testbed")], check=True)


def settings(**overrides) -> cfg.SidecarConfig:
    """Sidecar settings as the CLI would make them; servers off unless asked (tests run in parallel ports)."""
    args = argparse.Namespace(**{o.name: None for o in cfg.OPTIONS})
    defaults = dict(no_archive=True, metrics_address="off", health_address="off", receiver_grpc="off",
                    receiver_http="off", detach_grace=3600.0, discovery_interval=0.1)
    defaults.update(overrides)
    for k, v in defaults.items():
        setattr(args, k, v)
    return cfg.resolve(args, env={})


class RunningSidecar:
    """`env` set: telemetry as the settings and that environment say (Prometheus endpoint, OTLP exporters);
    otherwise in-memory readers and span exporter that the test reads."""

    def __init__(self, probes, env: dict | None = None, **overrides):
        from otel_cuda.sidecar import start

        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        self.self_metrics = InMemoryMetricReader()
        self.settings = settings(**overrides)
        if env is None:
            self.sidecar = start(self.settings, probes, env={}, span_processor=SimpleSpanProcessor(self.spans),
                                 metric_readers=[self.metrics], self_metric_readers=[self.self_metrics])
        else:
            self.sidecar = start(self.settings, probes, env=env)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.sidecar.run, args=(self.stop_event,), daemon=True)
        self.thread.start()
        self.sidecar.pipeline.ready.wait(10)

    @property
    def pipeline(self):
        return self.sidecar.pipeline

    def stop(self) -> dict:
        self.stop_event.set()
        self.thread.join(60)
        return self.sidecar.summary()


def run_workload(*args: str, env: dict | None = None, timeout: float = 120) -> dict:
    """Run the fake-driver workload to completion; returns its ground-truth JSON."""
    out = subprocess.run([str(WORKLOAD), *args], check=True, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout)


def start_workload(*args: str, argv0: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([argv0 or str(WORKLOAD), *args], executable=str(WORKLOAD), stdout=subprocess.PIPE,
                            text=True)
