"""Handle -> kernel name, per process.

cuModuleGetFunction and cuLibraryGetKernel give a handle its name; cuKernelGetFunction gives a CUfunction
the name of its CUkernel; a CUkernel may be launched directly (CUDA 12+ accepts it as a CUfunction), so both
kinds of handle live in one table. A handle launched that no such call named (loaded before the sidecar
attached) is named from the driver's own object in the process's memory (late_names.py), checked, once per
handle. What cannot be named is `unknown`, never guessed, and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from . import probes
from .events import EV_CALL, EV_LAUNCH, EV_NAME, F_TRUNCATED, Event
from .late_names import LateNames

log = logging.getLogger(__name__)
MAX_NAME = 64 << 10  # C++ template kernel names run to a few KiB; stop somewhere


def read_process_memory(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(size)

UNKNOWN = "unknown"
_KERNEL_GET_FUNCTION = probes.BY_SYMBOL["cuKernelGetFunction"].func_id
_GRAPH_LAUNCH = probes.BY_SYMBOL["cuGraphLaunch"].func_id
_KIND = {probes.BY_SYMBOL["cuModuleGetFunction"].func_id: "CUfunction",
         probes.BY_SYMBOL["cuLibraryGetKernel"].func_id: "CUkernel"}
_LOADS = {probes.BY_SYMBOL[s].func_id for s in ("cuModuleLoadData", "cuModuleLoadDataEx", "cuLibraryLoadData")}


class KernelNames:
    """`read_memory(pid, addr, size)` completes names longer than the event's buffer: the name passed to
    cuModuleGetFunction lives in the loaded module, still mapped when the event is read."""

    def __init__(self, read_memory: Callable[[int, int, int], bytes] = read_process_memory,
                 late: LateNames | None = None):
        self._read_memory = read_memory
        # names of handles loaded before attach; the default reads /proc/PID/mem (through the same reader when
        # one is passed in, so tests give both paths one fake memory)
        self.late = late if late is not None else LateNames(
            None if read_memory is read_process_memory else read_memory)
        self.names_truncated = 0  # names that stay cut short (the process was gone before we could read them)
        self._names: dict[int, dict[int, str]] = {}  # pid -> handle -> name
        self.launches_named = 0
        self.launches_unknown = 0
        self.unknown_by_pid: Counter[int] = Counter()
        self.unknown_by_func: Counter[int] = Counter()  # which launch function the unnamed launches came through
        self.launches_named_late = 0  # named from the driver's object (late_names), included in launches_named

    def observe(self, ev: Event) -> Event:
        """Learn from a name-giving call; returns the event with its name completed where it was truncated."""
        whole = True
        if ev.type == EV_NAME and ev.flags & F_TRUNCATED:
            cut = self.names_truncated
            ev = ev._replace(name=self._complete(ev))
            whole = self.names_truncated == cut
        if ev.type == EV_NAME and ev.result == 0 and ev.args[0] and ev.name:  # "": never a name
            self._names.setdefault(ev.pid, {})[ev.args[0]] = ev.name
            if whole:  # an exact name: what the driver's object must say too
                self.late.confirm(ev.pid, ev.args[0], ev.name, _KIND.get(ev.func, ""))
        elif ev.type == EV_CALL and ev.func == _KERNEL_GET_FUNCTION and ev.result == 0:
            function, kernel = ev.args[0], ev.args[1]
            table = self._names.setdefault(ev.pid, {})
            name = table.get(kernel)
            if function and name is not None:
                table[function] = name
                self.late.confirm(ev.pid, function, name, "CUfunction")
        elif ev.type == EV_CALL and ev.func in _LOADS and ev.result == 0:
            self.late.loaded(ev.pid)
        return ev

    def _complete(self, ev: Event) -> str:
        addr = ev.args[2]
        try:
            raw = b""
            while b"\0" not in raw and len(raw) < MAX_NAME:
                chunk = self._read_memory(ev.pid, addr + len(raw), 4096)
                if not chunk:
                    break
                raw += chunk
            name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
            if name.startswith(ev.name):
                return name
        except OSError as exc:
            log.debug("cannot read the full kernel name of pid %d: %s", ev.pid, exc)
        self.names_truncated += 1
        return ev.name

    def name_of_launch(self, ev: Event) -> str | None:
        """The launched kernel's name, `unknown`, or None for a graph launch (it runs many kernels)."""
        if ev.type != EV_LAUNCH or ev.func == _GRAPH_LAUNCH:
            return None
        return self.name_of_launches(ev.pid, ev.func, ev.args[0])

    def name_of_launches(self, pid: int, func: int, handle: int, n: int = 1) -> str:
        """The name of n kernel launches of one handle (a launch run's group, source.py), counted n times."""
        name = self._names.get(pid, {}).get(handle)
        if name is None:
            name = self.late.resolve(pid, handle)
            if name is None:
                self.launches_unknown += n
                self.unknown_by_pid[pid] += n
                self.unknown_by_func[func] += n
                return UNKNOWN
            self.launches_named_late += n
        self.launches_named += n
        return name

    def lookup(self, pid: int, handle: int) -> str | None:
        """The name of a CUfunction / CUkernel handle of pid, None when not known (no counting: for collection).
        Names read from the driver's objects count once a launch of the handle was named (no read here)."""
        name = self._names.get(pid, {}).get(handle)
        return name if name is not None else self.late.cached(pid, handle)

    def forget(self, pid: int) -> None:
        self._names.pop(pid, None)
        self.late.forget(pid)

    def counters(self) -> dict:
        """What naming did, for the summary and self-metrics: launches named (of them, from driver memory),
        unknown, and the late reader's outcomes (read, unreadable, ambiguous, deferred, gave_up, confirmed,
        contradicted)."""
        return {"launches_named": self.launches_named, "launches_named_late": self.launches_named_late,
                "launches_unknown": self.launches_unknown, "names_truncated": self.names_truncated,
                **{f"late_{k}": v for k, v in sorted(self.late.counters.items())}}

    @property
    def resolved_fraction(self) -> float:
        total = self.launches_named + self.launches_unknown
        return self.launches_named / total if total else 1.0
