"""Settings: argument > OTEL_CUDA_* environment variable > seed alias > default, validated at start.

One table (OPTIONS) drives argparse, the environment lookup and the docs; `resolve()` turns the parsed
arguments into the frozen per-stage configs the pipeline is built from.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .bpf import BpfConfig
from .discovery import Selector, SelectionError
from .steps import StepConfig


class ConfigError(ValueError):
    """A setting that cannot work; reported as one line."""


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _pids(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"not a list of process ids: {v!r}") from None


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    aliases: tuple[str, ...] = ()  # the seeds' environment names, accepted as they are
    flag: bool = False  # a switch: --name sets True

    @property
    def env(self) -> str:
        return "OTEL_CUDA_" + self.name.upper()

    @property
    def arg(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("pid", (), _pids, "process ids to trace (comma-separated)"),
    Option("match", None, str, "trace processes whose command line matches this regex", aliases=("TARGET_PROCESS",)),
    Option("cgroup", None, str, "trace processes in this cgroup (path as in /proc/PID/cgroup) or below it"),
    Option("archive", "otel-cuda-archive", str, "archive destination: a directory or s3://bucket/prefix",
           aliases=("TRACE_DIR",)),
    Option("archive_buffer", "/var/lib/otel-cuda/buffer", str, "local staging directory for an s3:// archive"),
    Option("archive_rotate_seconds", 60.0, float, "close an archive file after this many seconds",
           aliases=("TRACE_INTERVAL",)),
    Option("archive_rotate_bytes", 64 << 20, int, "close an archive file at this many bytes"),
    Option("archive_quota_bytes", 10 << 30, int, "local archive data above this is dropped, oldest first, counted"),
    Option("archive_retention_days", 7.0, float, "local archive files older than this are dropped, counted"),
    Option("no_archive", False, _bool, "do not archive events", flag=True),
    Option("launch_return", False, _bool, "probe launch returns too (duration and CUresult; costs ~2x per launch)",
           flag=True),
    Option("runtime", False, _bool, "probe the runtime API (libcudart) too; driver calls under it are not counted twice",
           flag=True),
    Option("no_system_view", False, _bool, "do not trace file I/O, mmap and scheduling of the selected processes "
           "(the system view: its syscall and sched_switch tracepoints cost every process on the node a little)",
           flag=True),
    Option("ringbuf_pages", 1024, int, "ring buffer size in 4 KiB pages (a power of two)"),
    Option("outlier_ms", 1.0, float, "calls slower than this become spans of their own"),
    Option("outlier_bytes", 64 << 20, int, "copies and allocations at least this large become spans of their own"),
    Option("discovery_interval", 0.2, float, "seconds between /proc rescans for new and gone processes"),
    Option("detach_grace", 30.0, float, "seconds a library stays attached after its last traced process exits"),
    Option("metrics_address", "0.0.0.0:9464", str, "Prometheus /metrics endpoint (host:port, or off)"),
    Option("health_address", "0.0.0.0:8081", str, "/healthz and /readyz endpoint (host:port, or off)"),
    Option("receiver_grpc", "127.0.0.1:4317", str, "OTLP/gRPC receiver vLLM exports its spans to (or off)"),
    Option("receiver_http", "127.0.0.1:4318", str, "OTLP/HTTP receiver (or off)"),
    Option("service_name", None, str, "service.name of the traced service (default: its OTEL_SERVICE_NAME, else vllm)"),
    Option("top_k", 20, int, "kernel names on metrics for the top K kernels only (the rest are 'other')"),
    Option("k8s", "off", str, "Kubernetes attributes: off, downward (sidecar) or api (DaemonSet)"),
    Option("pod_selector", None, str, "DaemonSet mode: trace pods with these labels (k=v,k2=v2)"),
    Option("instance_key", "auto", str, "group CUDA processes with API-server spans by: auto, pod, container, host"),
    Option("log_level", "info", str, "debug, info, warning or error"),
)


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    for o in OPTIONS:
        if names is not None and o.name not in names:
            continue
        if o.flag:
            parser.add_argument(o.arg, dest=o.name, action="store_const", const=True, default=None,
                                help=f"{o.help} [{o.env}]")
        else:
            parser.add_argument(o.arg, dest=o.name, default=None, help=f"{o.help} [{o.env}; default {o.default!r}]")


def setting(args: argparse.Namespace, name: str, env: Mapping[str, str] = os.environ) -> Any:
    o = next(o for o in OPTIONS if o.name == name)
    raw = getattr(args, name, None)
    source = o.arg
    if raw is None:
        for var in (o.env, *o.aliases):
            if env.get(var):
                raw, source = env[var], var
                break
    if raw is None:
        return o.default
    if isinstance(raw, bool) or not isinstance(raw, str):
        return raw
    try:
        return o.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _seed_s3(env: Mapping[str, str]) -> str | None:
    """The seeds' S3_BUCKET / S3_PREFIX / UPLOAD_ENABLED become an s3:// archive."""
    bucket = env.get("S3_BUCKET")
    if not bucket or not _bool(env.get("UPLOAD_ENABLED", "true")):
        return None
    prefix = env.get("S3_PREFIX", "").strip("/")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


@dataclass(frozen=True)
class SidecarConfig:
    selector: Selector
    bpf: BpfConfig
    steps: StepConfig
    archive: str | None  # destination, None = no archive
    runtime: bool
    discovery_interval_s: float
    detach_grace_s: float
    options: dict  # every resolved setting by name (for the stages configured from it)


def resolve(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> SidecarConfig:
    values = {o.name: setting(args, o.name, env) for o in OPTIONS}
    try:
        selector = Selector(pids=tuple(values["pid"]), match=values["match"], cgroup=values["cgroup"])
    except SelectionError as exc:
        raise ConfigError(str(exc)) from None
    pages = values["ringbuf_pages"]
    if pages <= 0 or pages & (pages - 1):
        raise ConfigError(f"--ringbuf-pages must be a power of two, not {pages}")
    archive = None if values["no_archive"] else values["archive"]
    if getattr(args, "archive", None) is None and not env.get("OTEL_CUDA_ARCHIVE"):
        archive = _seed_s3(env) or archive
    return SidecarConfig(
        selector=selector,
        bpf=BpfConfig(ringbuf_pages=pages, launch_return=values["launch_return"], runtime_layer=values["runtime"],
                      **({"extra_sources": ()} if values["no_system_view"] else {})),
        steps=StepConfig(outlier_ns=int(values["outlier_ms"] * 1e6), outlier_bytes=values["outlier_bytes"]),
        archive=archive,
        runtime=values["runtime"],
        discovery_interval_s=values["discovery_interval"],
        detach_grace_s=values["detach_grace"],
        options=values,
    )
