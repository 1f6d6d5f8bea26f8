"""Which processes to trace, where their libcuda is, and when they come and go.

vLLM V1 runs an API server (no CUDA), an EngineCore and, with tensor parallelism, workers; they start minutes
apart, load libcuda late (when torch initialises CUDA) and restart. So discovery rescans /proc, selects by PID,
cmdline regex or cgroup, selects a matching process in the kernel at once (before it maps libcuda), and
reports each new library file (by inode, seen through /proc/PID/root so containers resolve) to be attached.

Everything runs on discovery's own thread, off the event path: the consumer hands exec/fork events over with
`consider()`, which only queues (an exec storm on a busy node must not stall the ring-buffer reader). Scans are
incremental: a process judged once is read again whole only if it execs (an exec event re-judges it) or its
command line changes (vLLM renames its processes with setproctitle, no exec: `VLLM::EngineCore`) — only the
command line of judged processes is re-read, every `rejudge_every` scans. A selected process's maps are read each
scan only until it maps libcuda (torch loads it late, at CUDA init), then every `remap_every` scans: a CUDA process
maps thousands of regions (~1 860 in PyTorch on the H200, 1.45 ms a read): 5 reads a second of each traced process
cost as much as scanning 500 others.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Protocol

log = logging.getLogger(__name__)

LIBCUDA = re.compile(r"/libcuda\.so(\.\d+)*$")
LIBCUDART = re.compile(r"/libcudart\.so(\.\d+)*$")
LIBCUDA_OR_RUNTIME = re.compile(r"/libcuda(rt)?\.so(\.\d+)*$")


class SelectionError(ValueError):
    """A target selection that cannot work (bad regex, no such pid): reported as one line."""


@dataclass(frozen=True)
class Selector:
    pids: tuple[int, ...] = ()
    match: str | None = None  # regex searched in the NUL-joined-by-space cmdline
    cgroup: str | None = None  # a cgroup path (as in /proc/PID/cgroup) the process must be in or under

    def __post_init__(self):
        if not (self.pids or self.match or self.cgroup):
            raise SelectionError("no target: give --pid, --match or --cgroup")
        if self.match is not None:
            try:
                re.compile(self.match)
            except re.error as exc:
                raise SelectionError(f"invalid --match regex {self.match!r}: {exc}") from None

    def matches(self, proc: "ProcInfo") -> bool:
        if self.pids and proc.pid in self.pids:
            return True
        if self.match and re.search(self.match, proc.cmdline):
            return True
        if self.cgroup and any(c == self.cgroup or c.startswith(self.cgroup.rstrip("/") + "/") for c in proc.cgroups):
            return True
        return False


@dataclass(frozen=True)
class Library:
    identity: tuple[int, int]  # (st_dev, st_ino) of the file: uprobes are per inode
    path: str  # a path the sidecar can open: /proc/PID/root/<mapped path>
    mapped_path: str  # as the target sees it


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    cmdline: str
    cgroups: tuple[str, ...] = ()
    start_time: int = 0  # clock ticks since boot (field 22 of stat): tells a restarted pid apart
    libraries: tuple[Library, ...] = ()


class ProcFS(Protocol):
    def pids(self) -> Iterable[int]: ...
    def info(self, pid: int, library: re.Pattern | None) -> ProcInfo | None: ...  # library None: maps not read


class LiveProcFS:
    """The real /proc."""

    def __init__(self, root: str = "/proc"):
        self.root = root

    def pids(self) -> Iterable[int]:
        for name in os.listdir(self.root):
            if name.isdigit():
                yield int(name)

    def info(self, pid: int, library: re.Pattern | None = LIBCUDA) -> ProcInfo | None:
        base = f"{self.root}/{pid}"
        cmdline = self.cmdline(pid)
        if cmdline is None:
            return None
        try:
            with open(f"{base}/stat", "rb") as f:
                stat = f.read().decode("utf-8", "replace")
            start_time = int(stat.rsplit(")", 1)[1].split()[19])
            with open(f"{base}/cgroup") as f:
                cgroups = tuple(line.strip().split(":", 2)[2] for line in f if line.count(":") >= 2)
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
            return None
        return ProcInfo(pid, cmdline, cgroups, start_time,
                        tuple(self.libraries(pid, library)) if library is not None else ())

    def cmdline(self, pid: int) -> str | None:
        try:
            with open(f"{self.root}/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            return None

    def libraries(self, pid: int, library: re.Pattern) -> list[Library]:
        found: dict[tuple[int, int], Library] = {}
        try:
            with open(f"{self.root}/{pid}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) < 6:
                        continue
                    mapped = parts[5].strip()
                    if not library.search(mapped):
                        continue
                    path = f"{self.root}/{pid}/root{mapped}"
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    found.setdefault((st.st_dev, st.st_ino), Library((st.st_dev, st.st_ino), path, mapped))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return []
        return list(found.values())


@dataclass
class _Tracked:
    info: ProcInfo
    reported_no_library: bool = False

    @property
    def maps_driver(self) -> bool:
        return any(LIBCUDA.search(lib.mapped_path) for lib in self.info.libraries)


@dataclass
class DiscoveryCounters:
    processes_seen: int = 0
    processes_exited: int = 0
    without_library: int = 0
    attach_failures: int = 0
    considered: int = 0  # exec / fork events handed over by the consumer
    considered_dropped: int = 0  # ... refused because discovery's queue was full (the next scan still sees them)
    scanned_full: int = 0  # processes read whole (cmdline, stat, cgroup) by scans: new pids only
    detail: list[str] = field(default_factory=list)


class Discovery:
    """Rescans /proc and calls back: on_select(pid) as soon as a process matches, on_library(lib) for each new
    library file, on_exit(pid) when a selected process is gone, on_library_unused(lib) when no selected
    process maps a library any more."""

    def __init__(
        self,
        selector: Selector,
        procfs: ProcFS,
        on_select: Callable[[ProcInfo], None],
        on_exit: Callable[[ProcInfo], None],
        on_library: Callable[[Library], None],
        on_library_unused: Callable[[Library], None],
        library: re.Pattern = LIBCUDA,
        interval_s: float = 0.2,
        detach_grace_s: float = 30.0,
        clock=time.monotonic,
        admit: Callable[[int], bool] = lambda pid: True,
        self_pid: int | None = None,  # never traced: the sidecar itself (tests name a pid no fake process has)
    ):
        self.selector = selector
        self.procfs = procfs
        self.on_select = on_select
        self.on_exit = on_exit
        self.on_library = on_library
        self.on_library_unused = on_library_unused
        self.library = library
        self.interval_s = interval_s
        self.detach_grace_s = detach_grace_s
        self.admit = admit  # a further say, e.g. the DaemonSet's pod label selector (k8s.PodResolver.selected)
        self._clock = clock
        self._unused_since: dict[tuple[int, int], float] = {}
        self.counters = DiscoveryCounters()
        self._tracked: dict[int, _Tracked] = {}
        self._lock = threading.RLock()  # scan() runs on its thread, consider() on the pipeline's
        self._libraries: dict[tuple[int, int], Library] = {}
        self._self_pid = os.getpid() if self_pid is None else self_pid
        self._judged: dict[int, str] = {}  # pid -> cmdline, seen and not selected; an exec event re-judges one
        self.rejudge_every = 5  # scans between re-reads of the judged processes' command lines
        self.remap_every = 50  # scans between re-reads of the maps of a process that maps libcuda (10 s)
        self._scans = 0
        self._pending: queue.Queue = queue.Queue(maxsize=65536)  # (pid, inherited) from the consumer

    def check_explicit_pids(self) -> None:
        """--pid names processes that must exist at start: say so at once rather than trace nothing. When
        --pid is the only selection and none of them maps libcuda, the user picked the wrong process (the
        vLLM API server makes no CUDA calls): an error; one such pid among others is only reported."""
        infos = []
        for pid in self.selector.pids:
            info = self.procfs.info(pid, self.library)
            if info is None:
                raise SelectionError(f"no such process: {pid}")
            infos.append(info)
        only_pids = not (self.selector.match or self.selector.cgroup)
        if infos and only_pids and not any(i.libraries for i in infos):
            listed = ", ".join(str(i.pid) for i in infos)
            raise SelectionError(f"process {listed} maps no libcuda.so — pick the process that makes CUDA calls "
                                 "(vLLM: the EngineCore or a worker, not the API server)")

    def tracked_pids(self) -> set[int]:
        """For other threads, without the lock a scan holds: set() of a dict of ints is one step under the GIL."""
        return set(self._tracked)

    @property
    def tracked(self) -> dict[int, ProcInfo]:
        return {pid: t.info for pid, t in self._tracked.items()}

    def consider(self, pid: int, inherited: bool = False) -> None:
        """A process just exec'd, or a traced process forked it (`inherited`: then it is traced whatever its
        command line, as the kernel already does). Only queues: discovery's thread looks at it within a wakeup."""
        self.counters.considered += 1
        try:
            self._pending.put_nowait((pid, inherited))
        except queue.Full:
            self.counters.considered_dropped += 1

    def consider_now(self, pid: int, inherited: bool = False) -> None:
        """Look at one process now (discovery's thread)."""
        with self._lock:
            if pid in self._tracked or pid == self._self_pid:
                return
            self._judged.pop(pid, None)  # an exec: its command line may match now
            info = self.procfs.info(pid, self.library)
            if info is None:
                return
            if not (inherited or (self.selector.matches(info) and self.admit(pid))):
                self._judged[pid] = info.cmdline
                return
            self._track(info)

    def _take_pending(self, timeout: float) -> None:
        """Handle queued exec / fork events, waiting up to `timeout` for the first."""
        try:
            item = self._pending.get(timeout=timeout) if timeout > 0 else self._pending.get_nowait()
        except queue.Empty:
            return
        while True:
            self.consider_now(*item)
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                return

    def _track(self, info: ProcInfo) -> "_Tracked":
        known = self._tracked[info.pid] = _Tracked(info)
        self.counters.processes_seen += 1
        self.on_select(info)
        self._note_libraries(known, info)
        return known

    def _note_libraries(self, known: "_Tracked", info: ProcInfo) -> None:
        for lib in info.libraries:
            if lib.identity not in self._libraries:
                self._libraries[lib.identity] = lib
                self.on_library(lib)
        if not info.libraries and not known.reported_no_library:
            known.reported_no_library = True
            self.counters.without_library += 1
            log.warning("process %d (%s) maps no CUDA library yet; it stays selected", info.pid, info.cmdline[:80])

    def scan(self) -> None:
        with self._lock:
            self._scan()

    def _scan(self) -> None:
        seen: set[int] = set()
        running = set(self.procfs.pids())
        for pid in [p for p in self._judged if p not in running]:  # gone; a reused pid is new again
            del self._judged[pid]
        self._scans += 1
        if self._scans % self.rejudge_every == 0:  # renamed without an exec: judge again
            for pid, cmdline in list(self._judged.items()):
                if self._cmdline(pid) != cmdline:
                    del self._judged[pid]
        for pid in running:
            if pid == self._self_pid or pid in self._judged:
                continue
            known = self._tracked.get(pid)
            if known is None:  # a new pid: is it selected? (maps only once it is)
                self.counters.scanned_full += 1
                brief = self.procfs.info(pid, None)
                if brief is None:
                    continue
                if not (self.selector.matches(brief) and self.admit(pid)):
                    self._judged[pid] = brief.cmdline
                    continue
            read_maps = known is None or not known.maps_driver or self._scans % self.remap_every == 0
            info = self.procfs.info(pid, self.library if read_maps else None)
            if info is None:
                continue
            if known and known.info.start_time != info.start_time:
                self._forget(pid)  # the pid was reused by a new process
                known = None
                if not read_maps:
                    info = self.procfs.info(pid, self.library)
                    if info is None:
                        continue
                if not (self.selector.matches(info) and self.admit(pid)):
                    self._judged[pid] = info.cmdline
                    continue
            elif not read_maps:
                info = replace(info, libraries=known.info.libraries)
            seen.add(pid)
            if known is None:
                self._track(info)
            else:
                known.info = info
                self._note_libraries(known, info)
        for pid in [p for p in self._tracked if p not in seen]:
            self._forget(pid)
        self._release_unused()

    def _cmdline(self, pid: int) -> str | None:
        read = getattr(self.procfs, "cmdline", None)
        if read is not None:
            return read(pid)
        info = self.procfs.info(pid, None)
        return info.cmdline if info else None

    def _forget(self, pid: int) -> None:
        tracked = self._tracked.pop(pid)
        self.counters.processes_exited += 1
        self.on_exit(tracked.info)

    def _release_unused(self) -> None:
        """Detach a library no selected process maps, once it has been unused for detach_grace_s: vLLM
        restarts its engine, and re-attaching costs more than waiting (each uprobe's release waits for an
        RCU grace period)."""
        in_use = {lib.identity for t in self._tracked.values() for lib in t.info.libraries}
        now = self._clock()
        for identity in list(self._libraries):
            if identity in in_use:
                self._unused_since.pop(identity, None)
                continue
            since = self._unused_since.setdefault(identity, now)
            if now - since >= self.detach_grace_s:
                del self._unused_since[identity]
                self.on_library_unused(self._libraries.pop(identity))

    def run(self, stop: threading.Event) -> None:
        next_scan = 0.0
        while not stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_scan:
                    self.scan()
                    next_scan = now + self.interval_s
                # exec / fork events between scans; short waits so that stop is seen within 0.1 s
                self._take_pending(min(0.1, max(0.0, next_scan - time.monotonic())))
            except Exception:
                log.exception("discovery scan failed; retrying")
                stop.wait(self.interval_s)
