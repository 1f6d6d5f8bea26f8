"""Command line: argparse -> config -> run / demo / doctor / analyze / timeline / replay / loadgen / verify.

Bad input is one clear line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading

from . import __version__, config as cfg, doctor

log = logging.getLogger("otel_cuda")


class UsageError(Exception):
    """Reported as `otel-cuda: <message>` with exit code 2."""


# Subcommands that live in their own module, each with register(subparsers).
PLUGINS = ("analyze", "timeline", "replay", "loadgen", "verify", "demo")


def _preflight(settings: cfg.SidecarConfig | None = None) -> None:
    """Fail early, with the remedy, on what would otherwise fail deep inside BCC."""
    checks = [doctor.check_privileges(), doctor.check_uprobes(), doctor.check_bcc()]
    bad = [c for c in checks if not c.ok]
    if bad:
        raise UsageError(f"{bad[0].detail} — {bad[0].remedy}")


def cmd_run(args: argparse.Namespace) -> int:
    # A stop asked for while BPF compiles (seconds) must still end in a drained, flushed exit, not a kill.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    settings = cfg.resolve(args)
    logging.getLogger().setLevel(settings.options["log_level"].upper())
    _preflight(settings)
    from .bpf import Probes  # noqa: PLC0415 - bcc loads only for the commands that trace
    from .sidecar import StartError, start  # noqa: PLC0415

    try:
        probes = Probes(settings.bpf)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load the BPF program: {first} — run `otel-cuda doctor` for the cause") from None
    try:
        sidecar = start(settings, probes)
    except StartError as exc:
        probes.close()
        raise UsageError(str(exc)) from None
    try:
        sidecar.pipeline.discovery.check_explicit_pids()
    except ValueError as exc:
        sidecar.close()
        probes.close()
        raise UsageError(str(exc)) from None

    if args.duration:
        timer = threading.Timer(args.duration, stop.set)
        timer.daemon = True
        timer.start()
    log.info("otel-cuda %s: waiting for %s", __version__, _describe(settings.selector))
    try:
        sidecar.run(stop)
    finally:
        summary = sidecar.summary()
        probes.close()
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True, default=str)
    print(render_summary(summary), file=sys.stderr)
    return 0


def _describe(selector) -> str:
    parts = []
    if selector.pids:
        parts.append("pids " + ",".join(map(str, selector.pids)))
    if selector.match:
        parts.append(f"processes matching {selector.match!r}")
    if selector.cgroup:
        parts.append(f"cgroup {selector.cgroup}")
    return " or ".join(parts)


def render_summary(s: dict) -> str:
    calls = s["calls"]
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
    api = sum(s["api_time_s"].values())
    lines = [
        f"otel-cuda: {sum(calls.values())} calls from {s['processes']} process(es), {s['steps']} steps, "
        f"{api * 1e3:.1f} ms in API calls with a probed return",
        "  top: " + ", ".join(f"{k} {v}" for k, v in top),
        f"  lost in ring buffer {s['lost_ringbuf']}, refused by full kernel tables {s['kernel_table_full']}, "
        f"skipped by the kernel {s['skipped_by_kernel']}, "
        f"dropped {s['dropped_queue']}, decode errors {s['decode_errors']}, "
        f"unnamed launches {s['launches_unknown']} (named {s['kernel_names_resolved']:.1%}), archived {s['archived']}",
    ]
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    pids = tuple(args.pid or ())
    checks = doctor.run_checks(pids)
    print(doctor.render(checks))
    return 0 if doctor.healthy(checks) else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otel-cuda", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"otel-cuda {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the sidecar: trace CUDA calls of the selected processes")
    cfg.add_arguments(run)
    run.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    run.add_argument("--summary-json", default=None, help="write the exit summary as JSON to this file")
    run.set_defaults(func=cmd_run)

    doc = sub.add_parser("doctor", help="check that this machine can trace CUDA calls")
    doc.add_argument("--pid", type=int, action="append", help="also check that this process maps libcuda")
    doc.set_defaults(func=cmd_doctor)

    for name in PLUGINS:
        try:
            module = importlib.import_module(f"otel_cuda.{name}")
        except ImportError as exc:
            log.debug("subcommand %s unavailable: %s", name, exc)
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (UsageError, cfg.ConfigError) as exc:
        print(f"otel-cuda: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


_preflight_checks = _preflight
