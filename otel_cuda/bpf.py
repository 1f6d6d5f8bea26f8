"""BCC load / attach / detach and map reads. The only module that imports bcc.

Uprobes are per inode: a library is attached once however many processes map it (through whichever
/proc/PID/root path), and the `targets` map decides in the kernel which processes are traced.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import mmap
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from . import events
from .probes import Probe, bpf_cflags
from .ringbuf import MappedRing

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
PROC_PID_INIT_INO = 0xEFFFFFFC  # the initial pid namespace's inode number (include/linux/proc_ns.h)


@dataclass(frozen=True)
class BpfConfig:
    ringbuf_pages: int = 1024  # 4 MiB: ~45 000 call records, over a second of eager PyTorch at full rate
    launch_return: bool = False
    max_allocs: int = 262144
    # (process, launch function, kernel) launch counters: a few thousand kernels per process, 8 ranks a node and
    # restarts within the 60 s before a gone process's entries are freed; beyond it launches count as `unrecorded`
    max_kernels: int = 65536
    # the kernel wakes the consumer once per this many records a CPU submits (a power of two); below it the
    # consumer reads on its poll timeout (read_batch)
    ringbuf_wake_every: int = 256
    # True where runtime (libcudart) probes are attached: driver calls under them are marked nested, at the price of a
    # lookup per call. False, as the sidecar's --runtime default: the benches measure what ships.
    runtime_layer: bool = False
    # The entry->return stash in task-local storage (Linux >= 5.12; Probes falls back to the hash map where the
    # kernel refuses it): a timed call's handlers take 22 % less time than with a hash map (bench/RESULTS.md).
    thread_stash: bool = True
    # further .bpf.c files compiled into the same program; the system view (file I/O, mmap, scheduling) by default
    extra_sources: tuple[str, ...] = (str(BPF_DIR / "sys_probes.bpf.c"),)
    extra_cflags: tuple[str, ...] = ()

    def cflags(self) -> list[str]:
        flags = [
            f"-I{BPF_DIR}",
            f"-DRINGBUF_PAGES={self.ringbuf_pages}",
            f"-DLAUNCH_RETURN={int(self.launch_return)}",
            f"-DMAX_ALLOCS={self.max_allocs}",
            f"-DMAX_KERNELS={self.max_kernels}",
            f"-DRINGBUF_WAKE_EVERY={self.ringbuf_wake_every}",
            f"-DRUNTIME_LAYER={int(self.runtime_layer)}",
            f"-DTHREAD_STASH={int(self.thread_stash)}",
        ]
        ns = os.stat("/proc/self/ns/pid")
        if ns.st_ino != PROC_PID_INIT_INO:
            # In a container's pid namespace the kernel's pids differ from /proc's: ask for ours.
            flags += [f"-DPIDNS_DEV={ns.st_dev}", f"-DPIDNS_INO={ns.st_ino}"]
        return flags + bpf_cflags() + list(self.extra_cflags)


def program_text(config: BpfConfig) -> str:
    parts = [(BPF_DIR / "cuda_probes.bpf.c").read_text()]
    parts += [Path(p).read_text() for p in config.extra_sources]
    return "\n".join(parts)


_BPF_NOEXIST = 1


def _load(bpf_class, config: BpfConfig):
    """Compile the program and load one function that uses the stash: BCC verifies a function only when it is first
    attached, and a refusal must show here, where there is still a fallback."""
    bpf = bpf_class(text=program_text(config).encode(), cflags=config.cflags())
    try:
        bpf.load_func(b"entry_cuStreamSynchronize", bpf_class.KPROBE)
    except Exception:
        bpf.cleanup()
        raise
    return bpf


def fdinfo(fd: int) -> dict[str, str]:
    """What the kernel says of one of this process's BPF program or map descriptors (/proc/self/fdinfo): run_cnt,
    run_time_ns, recursion_misses of a program; map_type, value_size, max_entries, memlock of a map. Empty when the
    descriptor is gone."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def _empty_aggregate() -> dict:
    return {"calls": 0, "errors": 0, "total_ns": 0, "bytes": 0, "hist": [0] * events.OC_HIST_BUCKETS,
            "bytes_by_variant": {}}


class Probes:
    """A loaded BPF program: attach a library's probes, select processes, read the maps."""

    def __init__(self, config: BpfConfig):
        from bcc import BPF  # noqa: PLC0415 - keep bcc out of every import path but this one

        try:
            self._bpf = _load(BPF, config)
        except Exception as exc:
            if not config.thread_stash:
                raise
            # Task storage for tracing programs came with Linux 5.12: older kernels get the hash-map stash.
            log.warning("task-local storage refused (%s); the entry->return stash is a hash map", exc)
            config = replace(config, thread_stash=False)
            self._bpf = _load(BPF, config)
        self.config = config
        self._attached: dict[tuple[int, int], list[tuple[str, str, bool]]] = {}  # inode -> (path, sym, ret)
        self._fds: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._ring: MappedRing | None = None
        self._deselected_launches: dict[int, list[int]] = {}  # pid -> launch counts it had when deselected

    # -- attaching ------------------------------------------------------------------------------------
    def attach_library(self, identity: tuple[int, int], path: str, probes: tuple[Probe, ...]) -> list[str]:
        """Attach `probes` to the library file at `path` (identity = (st_dev, st_ino)). Returns the symbols
        that could not be attached (optional ones missing from this library). Idempotent per identity."""
        with self._lock:
            if identity in self._attached:
                return []
            done: list[tuple[str, str, bool]] = []
            missing: list[str] = []
            # Attach through a descriptor we hold: /proc/PID/root/... dies with the process (a container's
            # file with its mount namespace), and detaching must still name the same file.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[identity] = fd
            path = f"/proc/self/fd/{fd}"
            try:
                for p in probes:
                    returns = not p.entry_only or self.config.launch_return
                    try:
                        self._bpf.attach_uprobe(name=path.encode(), sym=p.symbol.encode(), fn_name=f"entry_{p.symbol}".encode())
                    except Exception:
                        if not p.optional:
                            raise
                        missing.append(p.symbol)
                        continue
                    done.append((path, p.symbol, False))
                    if returns:
                        self._bpf.attach_uretprobe(name=path.encode(), sym=p.symbol.encode(), fn_name=f"return_{p.symbol}".encode())
                        done.append((path, p.symbol, True))
            except Exception:
                self._detach_all(done)
                os.close(self._fds.pop(identity))
                raise
            self._attached[identity] = done
            return missing

    def detach_library(self, identity: tuple[int, int]) -> None:
        with self._lock:
            self._detach_all(self._attached.pop(identity, []))
            fd = self._fds.pop(identity, None)
            if fd is not None:
                os.close(fd)

    def _detach_all(self, attached: list[tuple[str, str, bool]]) -> None:
        for path, sym, ret in attached:
            try:
                if ret:
                    self._bpf.detach_uretprobe(name=path.encode(), sym=sym.encode())
                else:
                    self._bpf.detach_uprobe(name=path.encode(), sym=sym.encode())
            except Exception as exc:  # noqa: BLE001 - detaching the rest matters more
                log.warning("detach %s:%s: %s", path, sym, exc)

    @property
    def attached_libraries(self) -> int:
        return len(self._attached)

    @property
    def attached_probes(self) -> int:
        return sum(len(v) for v in self._attached.values())

    # -- process selection ------------------------------------------------------------------------------
    def select(self, pid: int) -> None:
        from bcc.libbcc import lib  # noqa: PLC0415

        # BPF_NOEXIST: a child the fork tracepoint selected in the kernel keeps the launches it made meanwhile.
        table = self._bpf["targets"]
        key, zeros = table.Key(pid), table.Leaf()
        if lib.bpf_update_elem(table.map_fd, ct.byref(key), ct.byref(zeros), _BPF_NOEXIST) < 0:
            err = ct.get_errno()
            if err != errno.EEXIST:
                raise OSError(err, f"cannot select pid {pid} for tracing: {os.strerror(err)}")

    def deselect(self, pid: int) -> None:
        table = self._bpf["targets"]
        try:
            target = table[table.Key(pid)]
            del table[table.Key(pid)]
        except KeyError:
            return
        self._deselected_launches[pid] = list(target.launches)

    # -- ring buffer ------------------------------------------------------------------------------------
    def read_batch(self, timeout_ms: int) -> bytes:
        """Wait up to timeout_ms for records; return every record available, framed as the kernel frames them
        (ringbuf.py). release() says how much of it was parsed."""
        if self._ring is None:
            self._ring = MappedRing(self._bpf["events"].map_fd, self.config.ringbuf_pages * mmap.PAGESIZE)
        # Returns early when the kernel woke us (RINGBUF_WAKE_EVERY records on a CPU); the records submitted without
        # a wakeup are read at the timeout, so none waits longer than timeout_ms.
        return self._ring.read(timeout_ms)

    def settled(self, chunk: bytes, nbytes: int) -> bytes:
        return self._ring.settled(chunk, nbytes)

    def release(self, nbytes: int) -> None:
        self._ring.release(nbytes)

    # -- aggregates -------------------------------------------------------------------------------------
    def skipped_runs(self) -> int:
        """Program runs the kernel skipped, each an event never seen (`recursion_misses`, Linux >= 5.12). The kernel
        runs one kprobe/tracepoint program per CPU at a time: a system-view tracepoint that fires while another
        tool's kprobe program runs on that CPU is skipped, only counted. Uprobe programs are not subject to this."""
        return sum(int(fdinfo(fn.fd).get("recursion_misses", 0)) for fn in list(self._bpf.funcs.values()))

    def lost(self) -> int:
        """Records the ring buffer refused."""
        return sum(self._bpf["lost"][ct.c_int(events.LOST_RINGBUF)])

    def table_full(self) -> int:
        """Entries a full kernel table refused: aggregates, live allocations, entry->return pairs, tracked files."""
        return sum(self._bpf["lost"][ct.c_int(events.LOST_TABLE)])

    def stats(self) -> dict[tuple[int, int], dict]:
        """(pid, func) -> aggregates: calls, errors, total_ns, bytes, hist, and bytes_by_variant ({variant: bytes};
        a runtime copy's variant is 1 + its cudaMemcpyKind). Launches of the kernel_launches map are read after
        this (kernel_launches()), so that a launch there is never missing here."""
        out: dict[tuple[int, int], dict] = {}
        for key, s in self._bpf["stats"].items():
            agg = out.get((key.pid, key.func))
            if agg is None:
                agg = out[(key.pid, key.func)] = _empty_aggregate()
            agg["calls"] += s.calls
            agg["errors"] += s.errors
            agg["total_ns"] += s.total_ns
            agg["bytes"] += s.bytes
            agg["hist"] = [a + b for a, b in zip(agg["hist"], s.hist)]
            agg["bytes_by_variant"][key.variant] = agg["bytes_by_variant"].get(key.variant, 0) + s.bytes
        launches = dict(self._deselected_launches)
        for key, target in self._bpf["targets"].items():  # a pid selected again adds to what it had
            before = launches.get(key.value, [0] * events.OC_LAUNCH_FUNCS)
            launches[key.value] = [a + b for a, b in zip(before, target.launches)]
        for pid, counts in launches.items():
            for slot, n in enumerate(counts):
                if n:
                    out.setdefault((pid, events.FIRST_LAUNCH_FUNC + slot), _empty_aggregate())["calls"] += n
        return out

    def kernel_launches(self) -> dict[tuple[int, int, int], int]:
        """(pid, launch function, kernel handle) -> launches (the kernel_launches map; graph launches are not in it)."""
        return {(k.pid, k.func, k.handle): v.value for k, v in self._bpf["kernel_launches"].items()}

    def live_bytes(self) -> dict[tuple[int, int], int]:
        """(pid, memory type index) -> live allocated bytes."""
        return {(k.pid, k.mem_type): v.value for k, v in self._bpf["live"].items()}

    def table(self, name: str):
        """Another map of the program (the system probes keep their own)."""
        return self._bpf[name]

    def forget_processes(self, pids: set[int]) -> None:
        """Drop gone processes' map entries so the maps do not fill over restarts (one pass over each map)."""
        for pid in pids:
            self._deselected_launches.pop(pid, None)
        for name in ("stats", "live", "allocs", "kernel_launches"):
            table = self._bpf[name]
            for key in [k for k in table.keys() if k.pid in pids]:
                try:
                    del table[key]
                except KeyError:
                    pass

    def close(self) -> None:
        """Detach everything. Slow where the kernel's RCU grace periods are (each uprobe's release waits for
        one: ~0.1 s in nested virtualisation, far less on bare metal)."""
        for identity in list(self._attached):
            self.detach_library(identity)
        self._bpf.cleanup()
