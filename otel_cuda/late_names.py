"""Kernel names for handles loaded before the sidecar attached: read from the driver's own objects.

A CUfunction / CUkernel handle is a pointer to a driver object that holds a pointer to the kernel's name (the
pointer cuFuncGetName / cuKernelGetName hand out). When a launch carries a handle that no name-giving call
named (the sidecar attached after the module was loaded), the name is read from /proc/PID/mem: the object's
words, then the string they point at. docs/late-attach-names.md has the measurements behind DRIVER_LAYOUTS.

What keeps this honest on a driver whose layout differs from the one measured:
- every read is checked: the object must carry the type words measured for its kind (`Check`), the name must
  be a NUL-terminated PTX identifier; anything else is `None` (the launch stays `unknown`, counted);
- two layouts that both pass with different names: `None` (ambiguous, counted), never a pick;
- when a name IS known exactly (a name-giving call seen while attached), the layouts are read for that handle
  too: a layout that passes its checks and gives another name is contradicted, and is off for that process
  (its late names dropped) from then on;
- a process for which many reads failed and none passed stops being read (bounded cost, counted).
Cost: one resolution (two to four preads of /proc/PID/mem, a few µs) per (pid, handle), cached, including
failures; at most `budget` per second on the consumer thread, beyond that the launch is `unknown` for now.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

MAX_NAME = 64 << 10
_IDENT = re.compile(rb"[A-Za-z_$%][A-Za-z0-9_$]*")  # a PTX identifier (what a kernel's entry name is)
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_LOW, _HIGH = 0x10000, 0x0000_8000_0000_0000  # a user-space pointer on x86-64 / arm64 (48-bit)


@dataclass(frozen=True)
class Check:
    """A word of the object that must hold `value` (size 4 or 8 bytes at `offset`)."""

    offset: int
    value: int
    size: int = 8


@dataclass(frozen=True)
class Layout:
    """Where one kind of driver object keeps its name: `name_at` is the offset of the name pointer in the object
    (more offsets: follow a pointer at the first, then at the next, ...)."""

    kind: str  # "CUfunction" | "CUkernel"
    name_at: tuple[int, ...]
    checks: tuple[Check, ...] = ()
    measured: str = ""  # driver and machine it was measured on

    @property
    def span(self) -> int:
        """Bytes of the object one read must cover."""
        ends = [self.name_at[0] + 8] + [c.offset + c.size for c in self.checks]
        return max(ends)


# Measured with bench/gpu/late_attach.py on NVIDIA 580.159.04 / CUDA 13.0 / H200 / PyTorch 2.11 (results:
# bench/results/late-attach-h200.json): in all 65 objects (eager PyTorch, cuBLAS nvjet, Triton, PTX modules and
# libraries) the name pointer is at offset 8 and the first u32 is the object's type, 1 for a CUfunction and 2 for a
# CUkernel. The test bed's fake driver (testbed/fake_cuda.c) builds its objects the same way.
_MEASURED = "NVIDIA 580.159.04, CUDA 13.0, H200"
DRIVER_LAYOUTS: tuple[Layout, ...] = (
    Layout("CUfunction", (8,), (Check(0, 1, 4),), _MEASURED),
    Layout("CUkernel", (8,), (Check(0, 2, 4),), _MEASURED),
)


def valid_name(raw: bytes) -> str | None:
    """The name if `raw` starts with a NUL-terminated PTX identifier, else None."""
    end = raw.find(b"\0")
    if end <= 0 or not _IDENT.fullmatch(raw, 0, end):
        return None
    return raw[:end].decode("ascii")


class ProcessMemory:
    """pread on /proc/PID/mem with the file kept open per process (one open per process, not per read)."""

    def __init__(self):
        self._fds: dict[int, int] = {}

    def __call__(self, pid: int, addr: int, size: int) -> bytes:
        fd = self._fds.get(pid)
        if fd is None:
            fd = self._fds[pid] = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(fd, size, addr)

    def forget(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            os.close(fd)


class _Bucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float]):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.t = burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _Proc:
    __slots__ = ("names", "tried", "passed", "off", "confirm_left")

    def __init__(self, confirm_left: int):
        self.names: dict[int, str | None] = {}  # handle -> name read (None: could not be read; not retried)
        self.tried = 0
        self.passed = 0
        self.off: set[Layout] = set()  # layouts contradicted in this process
        self.confirm_left = confirm_left


class LateNames:
    """Handle -> name read from the traced process's memory (see the module's docstring)."""

    GIVE_UP_AFTER = 64  # reads in a process with none passing: stop reading that process
    CONFIRMATIONS = 32  # exact names per process checked against the layouts

    def __init__(self, read_memory: Callable[[int, int, int], bytes] | None = None,
                 layouts: tuple[Layout, ...] | None = None, rate: float = 1000.0, burst: float = 4096.0,
                 clock: Callable[[], float] = time.monotonic):
        self._own_reader = read_memory is None
        self._read = read_memory if read_memory is not None else ProcessMemory()
        self.layouts = DRIVER_LAYOUTS if layouts is None else layouts
        self._span = max((lay.span for lay in self.layouts), default=0)
        self._bucket = _Bucket(rate, burst, clock)
        self._procs: dict[int, _Proc] = {}
        self.counters: Counter[str] = Counter()

    # -- reading ----------------------------------------------------------------------------------------------
    def _read_names(self, pid: int, handle: int, proc: _Proc) -> dict[Layout, str | None]:
        """Each layout that passes its checks on this object -> the name it points at (None: not an identifier)."""
        out: dict[Layout, str | None] = {}
        if not (_LOW <= handle < _HIGH) or handle & 7 or not self.layouts:
            return out
        try:
            obj = self._read(pid, handle, self._span)
        except OSError:
            return out
        for lay in self.layouts:
            if lay in proc.off or len(obj) < lay.span:
                continue
            if any((_U64 if c.size == 8 else _U32).unpack_from(obj, c.offset)[0] != c.value for c in lay.checks):
                continue
            out[lay] = self._name_at(pid, obj, lay)
        return out

    def _name_at(self, pid: int, obj: bytes, lay: Layout) -> str | None:
        ptr = _U64.unpack_from(obj, lay.name_at[0])[0]
        try:
            for off in lay.name_at[1:]:
                if not (_LOW <= ptr < _HIGH):
                    return None
                ptr = _U64.unpack(self._read(pid, ptr + off, 8))[0]
            if not (_LOW <= ptr < _HIGH):
                return None
            raw = self._read(pid, ptr, 256)
            while raw and b"\0" not in raw and len(raw) < MAX_NAME:
                more = self._read(pid, ptr + len(raw), 4096)
                if not more:
                    break
                raw += more
        except (OSError, struct.error):
            return None
        return valid_name(raw)

    # -- the interface ------------------------------------------------------------------------------------------
    def resolve(self, pid: int, handle: int) -> str | None:
        """The name of a launched handle that no name-giving call named; None when it cannot be read for sure."""
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = _Proc(self.CONFIRMATIONS)
        if handle in proc.names:
            return proc.names[handle]
        if proc.tried >= self.GIVE_UP_AFTER and not proc.passed:
            self.counters["gave_up"] += 1
            return None
        if not self._bucket.take():
            self.counters["deferred"] += 1  # over budget: unknown now, read at a later launch
            return None
        proc.tried += 1
        names = set(self._read_names(pid, handle, proc).values())
        if len(names) == 1 and None not in names:
            name = names.pop()
            proc.passed += 1
            self.counters["read"] += 1
        else:
            name = None
            self.counters["ambiguous" if len(names - {None}) > 1 else "unreadable"] += 1
        proc.names[handle] = name
        return name

    def cached(self, pid: int, handle: int) -> str | None:
        """The name read for a handle, if one was; never reads (for readers on other threads)."""
        proc = self._procs.get(pid)
        return proc.names.get(handle) if proc is not None else None

    def confirm(self, pid: int, handle: int, name: str, kind: str = "") -> None:
        """A name-giving call named `handle` (a `kind` object): check the layouts against it, the first
        CONFIRMATIONS per process. Every layout that passes its checks on the object must read exactly `name`,
        whatever its kind: one that reads another name would name launches wrongly, and is turned off."""
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = _Proc(self.CONFIRMATIONS)
        proc.names.pop(handle, None)  # the exact name wins; the handle may also be a reused address
        if proc.confirm_left <= 0:
            return
        proc.confirm_left -= 1
        read = self._read_names(pid, handle, proc)
        if kind and not any(lay.kind == kind for lay in read):
            self.counters["unconfirmed"] += 1  # no layout of its kind recognised the object
        for lay, got in read.items():
            if got == name:
                self.counters["confirmed"] += 1
            else:
                self.counters["contradicted"] += 1
                proc.off.add(lay)
                log.warning("kernel names from driver memory are off for process %d: the %s layout read %r for "
                            "a handle named %r", pid, lay.kind, got, name)
                proc.names = {h: n for h, n in proc.names.items() if n is None}  # drop what it may have read

    def loaded(self, pid: int) -> None:
        """A module or library was loaded: an unloaded object's address may now hold another kernel."""
        proc = self._procs.get(pid)
        if proc is not None and proc.names:
            proc.names.clear()

    def forget(self, pid: int) -> None:
        self._procs.pop(pid, None)
        if self._own_reader:
            self._read.forget(pid)
