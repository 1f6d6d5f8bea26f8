"""`otel-cuda doctor`: can this machine trace CUDA calls? Each check says ok/fail and, on fail, the remedy."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Callable

from .discovery import LIBCUDA, LiveProcFS

CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_PERFMON, CAP_BPF = 21, 19, 38, 39


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    remedy: str = ""
    required: bool = True  # an optional feature's failure is shown but does not fail the doctor


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> Check:
    caps = _effective_caps()
    have = lambda c: bool(caps >> c & 1)  # noqa: E731
    if os.geteuid() == 0 and have(CAP_SYS_ADMIN):
        return Check("privileges", True, "root")
    needed = {"CAP_BPF": CAP_BPF, "CAP_PERFMON": CAP_PERFMON, "CAP_SYS_PTRACE": CAP_SYS_PTRACE}
    missing = [n for n, c in needed.items() if not have(c)]
    if not missing:
        return Check("privileges", True, "CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE")
    return Check("privileges", False, f"not root; missing {', '.join(missing)}",
                 "run as root (sudo otel-cuda ...) or grant CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE")


TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracefs_dir(dirs: tuple[str, ...] = TRACEFS_DIRS) -> str | None:
    for d in dirs:
        if os.path.exists(f"{d}/uprobe_events"):
            return d
    return None


def check_tracefs() -> Check:
    d = tracefs_dir()
    if d:
        return Check("tracefs", True, d)
    return Check("tracefs", False, "no uprobe_events under /sys/kernel/tracing or /sys/kernel/debug/tracing",
                 "mount -t tracefs nodev /sys/kernel/tracing (or run scripts/setup.sh)")


def check_uprobes(sysfs: str = "/sys", tracefs_dirs: tuple[str, ...] = TRACEFS_DIRS) -> Check:
    if os.path.exists(f"{sysfs}/bus/event_source/devices/uprobe/type"):
        return Check("uprobes", True, "uprobe PMU present")
    if tracefs_dir(tracefs_dirs):
        return Check("uprobes", True, "uprobe_events present")
    return Check("uprobes", False, "this kernel offers no uprobes",
                 "use a kernel built with CONFIG_UPROBES=y and CONFIG_UPROBE_EVENTS=y")


def check_btf() -> Check:
    if os.path.exists("/sys/kernel/btf/vmlinux"):
        return Check("btf", True, "/sys/kernel/btf/vmlinux")
    return Check("btf", False, "no kernel BTF (BCC uprobes do not need it)", "a kernel with CONFIG_DEBUG_INFO_BTF=y",
                 required=False)


def check_headers() -> Check:
    build = f"/lib/modules/{platform.release()}/build"
    if os.path.exists(f"{build}/include"):
        return Check("kernel headers", True, os.path.realpath(build))
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return Check("kernel headers", True, "/sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS)")
    return Check("kernel headers", False, f"{build} is missing",
                 "apt-get install linux-headers-$(uname -r) or linux-headers-amd64 and link it there "
                 "(scripts/setup.sh does this)")


def check_bcc() -> Check:
    try:
        import bcc  # noqa: F401, PLC0415
    except ImportError as exc:
        return Check("bcc", False, f"cannot import bcc: {exc}",
                     "apt-get install python3-bpfcc; use a venv made with --system-site-packages")
    return Check("bcc", True, f"bcc {getattr(bcc, '__version__', '?')}")


def check_bpf_load() -> Check:
    try:
        from bcc import BPF  # noqa: PLC0415

        BPF(text="int probe(void *ctx) { return 0; }").cleanup()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Check("bpf", False, f"cannot load a BPF program: {first}",
                     "run as root; check kernel headers and that the bpf() syscall is allowed (seccomp)")
    return Check("bpf", True, "a BPF program loads")


def check_target(pid: int) -> Check:
    info = LiveProcFS().info(pid, LIBCUDA)
    if info is None:
        return Check(f"target {pid}", False, f"no such process {pid} (or not readable)", "check the pid; run as root")
    if not info.libraries:
        return Check(f"target {pid}", False, f"process {pid} maps no libcuda.so",
                     "pick the process that runs CUDA (vLLM: the EngineCore or worker, not the API server)")
    return Check(f"target {pid}", True, ", ".join(lib.mapped_path for lib in info.libraries))


BASIC: tuple[Callable[[], Check], ...] = (check_privileges, check_tracefs, check_uprobes, check_btf, check_headers,
                                          check_bcc)


def run_checks(pids: tuple[int, ...] = (), load: bool = True) -> list[Check]:
    checks = [c() for c in BASIC]
    if load and all(c.ok for c in checks if c.name in ("privileges", "bcc", "kernel headers")):
        checks.append(check_bpf_load())
    checks += [check_target(p) for p in pids]
    return checks


def render(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        status = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"{status}  {c.name:<15} {c.detail}")
        if not c.ok and c.remedy:
            lines.append(f"      {'':<15} remedy: {c.remedy}")
    return "\n".join(lines)


def healthy(checks: list[Check]) -> bool:
    return all(c.ok or not c.required for c in checks)
