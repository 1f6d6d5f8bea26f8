"""Handle -> kernel name, per process.

cuModuleGetFunction and cuLibraryGetKernel give a handle its name; cuKernelGetFunction gives a CUfunction
the name of its CUkernel; a CUkernel may be launched directly (CUDA 12+ accepts it as a CUfunction), so both
kinds of handle live in one table. What cannot be named is `unknown`, never guessed, and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from . import probes
from .events import EV_CALL, EV_LAUNCH, EV_NAME, F_TRUNCATED, Event

log = logging.getLogger(__name__)
MAX_NAME = 64 << 10  # C++ template kernel names run to a few KiB; stop somewhere


def read_process_memory(pid: int, addr: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return f.read(size)

UNKNOWN = "unknown"
_KERNEL_GET_FUNCTION = probes.BY_SYMBOL["cuKernelGetFunction"].func_id
_GRAPH_LAUNCH = probes.BY_SYMBOL["cuGraphLaunch"].func_id


class KernelNames:
    """`read_memory(pid, addr, size)` completes names longer than the event's buffer: the name passed to
    cuModuleGetFunction lives in the loaded module, still mapped when the event is read."""

    def __init__(self, read_memory: Callable[[int, int, int], bytes] = read_process_memory):
        self._read_memory = read_memory
        self.names_truncated = 0  # names that stay cut short (the process was gone before we could read them)
        self._names: dict[int, dict[int, str]] = {}  # pid -> handle -> name
        self.launches_named = 0
        self.launches_unknown = 0
        self.unknown_by_pid: Counter[int] = Counter()
        self.unknown_by_func: Counter[int] = Counter()  # which launch function the unnamed launches came through

    def observe(self, ev: Event) -> Event:
        """Learn from a name-giving call; returns the event with its name completed where it was truncated."""
        if ev.type == EV_NAME and ev.flags & F_TRUNCATED:
            ev = ev._replace(name=self._complete(ev))
        if ev.type == EV_NAME and ev.result == 0 and ev.args[0]:
            self._names.setdefault(ev.pid, {})[ev.args[0]] = ev.name
        elif ev.type == EV_CALL and ev.func == _KERNEL_GET_FUNCTION and ev.result == 0:
            function, kernel = ev.args[0], ev.args[1]
            table = self._names.setdefault(ev.pid, {})
            if function and kernel in table:
                table[function] = table[kernel]
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
        name = self._names.get(ev.pid, {}).get(ev.args[0])
        if name is None:
            self.launches_unknown += 1
            self.unknown_by_pid[ev.pid] += 1
            self.unknown_by_func[ev.func] += 1
            return UNKNOWN
        self.launches_named += 1
        return name

    def lookup(self, pid: int, handle: int) -> str | None:
        """The name of a CUfunction / CUkernel handle of pid, None when not known (no counting: for collection)."""
        return self._names.get(pid, {}).get(handle)

    def forget(self, pid: int) -> None:
        self._names.pop(pid, None)

    @property
    def resolved_fraction(self) -> float:
        total = self.launches_named + self.launches_unknown
        return self.launches_named / total if total else 1.0
