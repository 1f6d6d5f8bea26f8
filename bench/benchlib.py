"""Shared pieces of the benchmark suites: the micro-benchmark driver process, the empty "floor" BPF programs,
the seed's bpftrace design, and the real sidecar running in-process as the consumer.

Everything here measures on the fake driver (testbed/build/libcuda.so.1). On the 2-core development machines a
uprobe trap costs 20-30 us (nested virtualisation), so only ratios measured in one run mean anything there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUILD = ROOT / "testbed" / "build"
DRIVER = BUILD / "bench_driver"
LIBCUDA = BUILD / "libcuda.so.1"
# BENCH_LIBCUDA=PATH (bench/cpu and bench/ingest --libcuda): copies of this library instead of the fake, called
# uninitialised (bench_driver --no-init): the real driver's entry points on the GPU machine's kernel, no GPU work.
REAL_LIBCUDA_ENV = "BENCH_LIBCUDA"
SYMBOL = {"launch": "cuLaunchKernel", "sync": "cuStreamSynchronize", "htod": "cuMemcpyHtoD_v2"}


def add_libcuda_option(ap) -> None:
    ap.add_argument("--libcuda", help="copies of this library (the real libcuda on the GPU machine), called "
                    "uninitialised, instead of the fake driver")


def add_gap_option(ap) -> None:
    ap.add_argument("--gap-bytes", type=int, default=0,
                    help="bytes of cache lines the driver writes between two calls (0: a tight loop, the probes stay hot; "
                         "2097152: they run with cold caches, as between an inference server's launches)")


def use_libcuda(path: str | None) -> None:
    """Drivers started from now on call copies of `path` (bench_driver --no-init) instead of the fake driver."""
    if path:
        os.environ[REAL_LIBCUDA_ENV] = os.path.realpath(path)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_testbed() -> None:
    if shutil.which("make") is None and DRIVER.exists():
        return  # built elsewhere and carried along (the GPU machine has no compiler)
    subprocess.run(["make", "-s", "-C", str(ROOT / "testbed")], check=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cpu_self() -> float:
    """CPU seconds of this process, all threads, user + system (the in-process sidecar is most of it)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_of(pid: int) -> float:
    """CPU seconds of another process (utime + stime of all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict:
    u = os.uname()
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"uname": f"{u.sysname} {u.nodename} {u.release} {u.version} {u.machine}", "nproc": os.cpu_count(),
            "cpu": model, "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ---- the micro-benchmark process ------------------------------------------------------------------------------

class Driver:
    """testbed/build/bench_driver --serve pinned to `cpus`, with one private copy of the fake libcuda per variant
    (`variants`, in order). Uprobes are per inode: each variant's tracer attaches to its own copy, and other users
    of this machine (whose sidecars and tests attach to testbed/build/libcuda.so.1) never fire in ours. A flat-out
    run interleaves the copies chunk by chunk (see testbed/bench_driver.c), so the variants share every drift."""

    def __init__(self, variants=("none",), cpus: str = "1", env: dict | None = None, lib: str | None = None,
                 gap_bytes: int = 0):
        """`lib`: call this copy of the library (the first variant's) instead of a private one: processes that
        share one copy share its probes, as the processes of a node share its libcuda. `gap_bytes`: cache lines
        written between two calls (bench_driver --gap-bytes), so that the probes run cold as in a real workload."""
        self.dir = tempfile.mkdtemp(prefix="otel-cuda-bench-")
        shutil.copy2(DRIVER, self.dir)
        self.variants = list(variants)
        self.libs: dict[str, str] = {}
        real = os.environ.get(REAL_LIBCUDA_ENV)
        for v in self.variants:
            os.makedirs(os.path.join(self.dir, v))
            self.libs[v] = os.path.join(self.dir, v, LIBCUDA.name)
            shutil.copy2(real or LIBCUDA, self.libs[v])
        if lib:
            self.libs[self.variants[0]] = lib
        full_env = {**os.environ, "FAKE_CUDA_SYNC_US": "0", **(env or {})}
        cmd = [os.path.join(self.dir, DRIVER.name), "--serve"] + (["--no-init"] if real else [])
        if gap_bytes:
            cmd += ["--gap-bytes", str(gap_bytes)]
        for v in self.variants:
            cmd += ["--lib", self.libs[v]]
        if cpus:
            cmd = ["taskset", "-c", cpus] + cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=full_env)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench_driver did not start (rc {self.proc.wait()})")
        self.pid = json.loads(line)["pid"]

    def lib(self, variant: str) -> str:
        return self.libs[variant]

    def identity(self, variant: str) -> tuple[int, int]:
        st = os.stat(self.libs[variant])
        return (st.st_dev, st.st_ino)

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _read(self) -> dict:
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError(f"bench_driver exited (rc {self.proc.poll()})")
        return json.loads(out)

    def run(self, func: str, n: int, rate: float = 0, threads: int = 1) -> dict:
        """{variant: the driver's figures for its copy}; a paced or threaded run uses the first copy only."""
        self._send(f"run {func} {n} {rate} {threads}")
        out = {}
        while True:
            r = self._read()
            if r.get("done"):
                return out
            if "error" in r:
                raise RuntimeError(r["error"])
            out[self.variants[r["lib"]]] = r

    def name(self) -> None:
        self._send("name")
        self._read()

    def close(self) -> None:
        try:
            self._send("quit")
            self.proc.wait(5)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class TracerProcess:
    """A tracer in a process of its own, spoken to in lines: commands on stdin, one JSON object answered on stdout
    (other output is passed over). The first object says it is ready."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()
        if not self.ready.get("ready"):
            raise RuntimeError(f"tracer did not start: {self.ready}")

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"tracer exited (rc {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        try:
            out = self.ask("quit")
            self.proc.wait(120)
            return out
        except Exception as exc:  # noqa: BLE001
            self.proc.kill()
            return {"error": str(exc)}


class Tracer(TracerProcess):
    """bench/tracer.py in a process of its own (pinned to `cpus`): our probes on one copy, the sidecar consuming."""

    def __init__(self, lib: str, pid: int | tuple[int, ...], cpus: str = "0", archive: str | None = None,
                 consumer: str = "auto", symbols: str | None = None, ringbuf_pages: int | None = None,
                 detached: bool = False, python: str | None = None):
        py = python or sys.executable
        cmd = [py, str(Path(__file__).with_name("tracer.py")), "--lib", lib, "--pid",
               ",".join(map(str, (pid,) if isinstance(pid, int) else pid)), "--consumer", consumer]
        if archive:
            cmd += ["--archive", archive]
        if symbols:
            cmd += ["--symbols", symbols]
        if ringbuf_pages:
            cmd += ["--ringbuf-pages", str(ringbuf_pages)]
        if cpus:
            cmd += ["--cpus", cpus]
        if detached:
            cmd.append("--detached")
        super().__init__(cmd)
        self.kind = self.ready["kind"]
        self.pid = self.ready["pid"]

    def stats(self) -> dict:
        return self.ask("stats")

    def wait(self, symbol: str, n: int, archive: bool) -> dict:
        return self.ask(f"wait {symbol} {n} {int(archive)}")

    def settle(self) -> dict:
        return self.ask("settle")

    def attach(self) -> dict:
        return self.ask("attach")

    def detach(self) -> dict:
        return self.ask("detach")


# ---- the floors: empty BPF programs ---------------------------------------------------------------------------

FLOOR_PROGRAM = r"""
#include <uapi/linux/ptrace.h>
int e(struct pt_regs *ctx) { return 0; }
int r(struct pt_regs *ctx) { return 0; }
"""


class EmptyProbes:
    """`int e(void *ctx) { return 0; }` (and its return twin) attached with BCC: what a uprobe costs at least."""

    def __init__(self):
        from bcc import BPF

        self.bpf = BPF(text=FLOOR_PROGRAM)
        self._attached: list[tuple[str, str, bool]] = []

    def attach(self, lib: str, sym: str, returns: bool) -> None:
        self.bpf.attach_uprobe(name=lib.encode(), sym=sym.encode(), fn_name=b"e")
        self._attached.append((lib, sym, False))
        if returns:
            self.bpf.attach_uretprobe(name=lib.encode(), sym=sym.encode(), fn_name=b"r")
            self._attached.append((lib, sym, True))

    def detach(self) -> None:
        for lib, sym, ret in self._attached:
            if ret:
                self.bpf.detach_uretprobe(name=lib.encode(), sym=sym.encode())
            else:
                self.bpf.detach_uprobe(name=lib.encode(), sym=sym.encode())
        self._attached = []

    def close(self) -> None:
        self.detach()
        self.bpf.cleanup()


# ---- the seed's design: bpftrace printing one JSON line per call ----------------------------------------------

# What the seeds run: a uprobe per driver function that prints one JSON line per call in bpftrace's user space,
# the process picked by pid, the output a file shipped to S3 later. Entry-only for the launch (the cheapest form
# of the design); the fields are the seeds' archive fields (ts, pid, tid, type, func, phase).
SEED_SCRIPT = r"""
uprobe:%(lib)s:%(sym)s /pid == %(pid)d/
{
  printf("{\"ts\":%%lld,\"pid\":%%d,\"tid\":%%d,\"type\":\"cuda_api\",\"func\":\"%(sym)s\",\"phase\":\"entry\"}\n",
         nsecs, pid, tid);
}
"""


_TS = re.compile(rb'\{"ts":(\d+),')


class SeedBpftrace:
    """One bpftrace run on `sym` of `lib` for process `pid`, its output in a file. Lost events: what bpftrace
    says on stderr ("Lost N events") and, independently, calls made minus lines written."""

    def __init__(self, lib: str, sym: str, pid: int, cpus: str = "0", workdir: str | None = None):
        self.dir = workdir or tempfile.mkdtemp(prefix="bench-seed-")
        self.script = os.path.join(self.dir, "seed.bt")
        self.out = os.path.join(self.dir, "seed.jsonl")
        self.err = os.path.join(self.dir, "seed.err")
        self.sym = sym
        with open(self.script, "w") as f:
            f.write(SEED_SCRIPT % {"lib": lib, "sym": sym, "pid": pid})
        cmd = ["bpftrace", "-o", self.out, self.script]
        if cpus:
            cmd = ["taskset", "-c", cpus] + cmd
        self._err_f = open(self.err, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err_f)

    def lines(self) -> int:
        try:
            with open(self.out, "rb") as f:
                return sum(1 for line in f if line.startswith(b"{"))
        except FileNotFoundError:
            return 0

    def lines_since(self, ts_ns: int) -> int:
        """Lines stamped at or after ts_ns (CLOCK_MONOTONIC: bpftrace's nsecs is time.monotonic_ns()): the calls
        made from then on that reached the file, whatever was made before (attach pokes) and however buffered."""
        n = 0
        with open(self.out, "rb") as f:
            for line in f:
                m = _TS.match(line)
                if m and int(m.group(1)) >= ts_ns:
                    n += 1
        return n

    def wait_attached(self, poke, timeout: float = 60.0) -> int:
        """Call poke() (one call of the probed function) until a line shows up; returns the pokes made."""
        deadline = time.monotonic() + timeout
        pokes = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bpftrace exited: {open(self.err).read().strip()}")
            poke()
            pokes += 1
            time.sleep(0.2)
            if self.lines() > 0:
                return pokes
        raise RuntimeError("bpftrace did not attach in time")

    def cpu(self) -> float:
        return cpu_of(self.proc.pid)

    def wait_output(self, expected: int, quiet_s: float = 1.0, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.lines()
            if n >= expected:
                return n
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since > quiet_s:
                return n
            time.sleep(0.05)
        return self.lines()

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err_f.close()
        err = open(self.err).read()
        # bpftrace reports perf-buffer overflows as "Lost N events" in its output (the -o file), older versions on
        # stderr: both are read
        reported = sum(int(n) for n in re.findall(r"Lost (\d+) events", err))
        try:
            with open(self.out, "rb") as f:
                reported += sum(int(n) for n in re.findall(rb"Lost (\d+) events", f.read()))
        except OSError:
            pass
        return {"lines": self.lines(), "reported_lost": reported, "stderr": err.strip()[-500:]}


# ---- the real sidecar, in-process ----------------------------------------------------------------------------

def have_otel() -> bool:
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        return False
    return True


class Processes:
    """A /proc double that shows the sidecar's discovery the benchmark's processes, with no library: discovery
    selects them in the kernel (targets map) and the benchmark attaches exactly the probes a variant measures."""

    def __init__(self, pids: tuple[int, ...]):
        from otel_cuda.discovery import ProcInfo

        self.infos = {pid: ProcInfo(pid, f"bench_driver {pid}", (), 1, ()) for pid in pids}

    def pids(self):
        return list(self.infos)

    def info(self, pid, library=None):
        return self.infos.get(pid)


def sidecar_settings(pids: tuple[int, ...], archive_dir: str | None):
    from otel_cuda import config as cfg

    args = argparse.Namespace(**{o.name: None for o in cfg.OPTIONS})
    values = dict(pid=tuple(pids), metrics_address="off", health_address="off", receiver_grpc="off", receiver_http="off",
                  detach_grace=3600.0,
                  # BENCH_DISCOVERY_INTERVAL: seconds between rescans (to bisect what the rescans cost the workload)
                  discovery_interval=float(os.environ.get("BENCH_DISCOVERY_INTERVAL", 0.2)))
    if archive_dir:
        values["archive"] = archive_dir
    else:
        values["no_archive"] = True
    for k, v in values.items():
        setattr(args, k, v)
    return cfg.resolve(args, env={})


class InProcessSidecar:
    """The sidecar's stages built as `otel-cuda run` builds them (sidecar.start: telemetry with an in-memory
    metric reader, archive to a directory when asked), or, without opentelemetry, pipeline.build() with the null
    observer. run() in a thread consumes the ring buffer exactly as the real sidecar's main loop does."""

    def __init__(self, probes, pids: int | tuple[int, ...], archive_dir: str | None = None, full: bool = True):
        self.probes = probes
        self.pids = (pids,) if isinstance(pids, int) else tuple(pids)
        settings = sidecar_settings(self.pids, archive_dir)
        procfs = Processes(self.pids)
        self.full = full and have_otel()
        self.why_not_full = "" if self.full else "opentelemetry is not installed"
        if self.full:
            try:
                from opentelemetry.sdk.metrics.export import InMemoryMetricReader
                from opentelemetry.sdk.trace import SpanProcessor

                from otel_cuda.sidecar import start
            except ImportError as exc:  # the GPU machine may lack the receiver's deps (grpc protos)
                self.full, self.why_not_full = False, f"the sidecar does not import here: {exc}"
        if self.full:
            self.sidecar = start(settings, probes, procfs=procfs, env={}, span_processor=SpanProcessor(),
                                 metric_readers=[InMemoryMetricReader()], self_metric_readers=[InMemoryMetricReader()])
            self.pipeline = self.sidecar.pipeline
        else:
            from otel_cuda.pipeline import build

            archive = None
            if archive_dir:
                from otel_cuda.archive import Archive, ArchiveConfig

                archive = Archive(ArchiveConfig(destination=archive_dir))
            self.sidecar = None
            self.pipeline = build(settings, probes, procfs, archive=archive)
        self.kind = ("sidecar (telemetry" if self.full else "pipeline (null observer") + (
            ", archive on)" if archive_dir else ", archive off)") + (
            f" [{self.why_not_full}]" if full and not self.full else "")
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    # running as the sidecar does
    def start(self) -> None:
        if self.full:
            target = self.sidecar.run
        else:
            def target(stop):
                self.pipeline.start()
                try:
                    self.pipeline.run(stop)
                finally:
                    self.pipeline.close()
        self.thread = threading.Thread(target=target, args=(self.stop_event,), name="sidecar", daemon=True)
        self.thread.start()
        self.pipeline.ready.wait(10)
        deadline = time.monotonic() + 5
        while not set(self.pids) <= set(self.pipeline.discovery.tracked) and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> dict:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(120)
        elif self.sidecar is not None:
            self.sidecar.close()
        else:
            self.pipeline.close()
        return self.pipeline.summary()

    # counters
    def records(self) -> int:
        return self.pipeline.reader.counters.records

    def archived(self) -> int:
        return self.pipeline.totals.archived

    def dropped(self) -> int:
        return self.pipeline.totals.dropped_queue + self.pipeline.reader.counters.decode_errors

    def calls(self, symbol: str) -> int:
        """Events of one function the pipeline processed (the system probes' records are not counted)."""
        return self.pipeline.totals.calls.get(symbol, 0)

    def wait_calls(self, symbol: str, target: int, archive: bool = False, timeout: float = 60.0,
                   quiet_s: float = 2.0) -> int:
        """Wait until `target` events of `symbol` were processed and the archive queue is empty (if asked), or
        nothing moved for quiet_s."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        q = self.pipeline.events_to_archive
        while time.monotonic() < deadline:
            n = self.calls(symbol)
            if n >= target and (not archive or q.qsize() == 0):
                if archive:
                    time.sleep(0.01)  # the record taken off the queue last is being written
                return n
            progress = (n, q.qsize())
            if progress != last:
                last, since = progress, time.monotonic()
            elif time.monotonic() - since > quiet_s:
                return n
            time.sleep(0.005)
        return self.calls(symbol)

    def wait_records(self, target: int, archive: bool = False, timeout: float = 30.0, quiet_s: float = 2.0) -> int:
        """Wait until `target` records were read (and archived, if asked) or nothing moved for quiet_s."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.records()
            done = n >= target and (not archive or self.archived() + self.pipeline.totals.dropped_queue >= n)
            if done:
                return n
            progress = n + (self.archived() if archive else 0)
            if progress != last:
                last, since = progress, time.monotonic()
            elif time.monotonic() - since > quiet_s:
                return n
            time.sleep(0.005)
        return self.records()


def bpf_config(module, ringbuf_pages: int | None = None):
    """Our default BpfConfig; BENCH_NO_SYSTEM_VIEW=1 leaves the system view's tracepoints out (to bisect costs)."""
    kw = {} if ringbuf_pages is None else {"ringbuf_pages": ringbuf_pages}
    if os.environ.get("BENCH_NO_SYSTEM_VIEW"):
        kw["extra_sources"] = ()
    return module.BpfConfig(**kw)


def load_probes(ringbuf_pages: int | None = None):
    from otel_cuda import bpf

    return bpf.Probes(bpf_config(bpf, ringbuf_pages))


def probe(symbol: str):
    from otel_cuda.probes import BY_SYMBOL

    return BY_SYMBOL[symbol]


@dataclass
class Pinning:
    tracer: str = "0"
    workload: str = "1"


def pin_self(cpus: str) -> None:
    """Pin this process (threads started later inherit it): the tracer's side of the machine."""
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


# ---- BPF run-time statistics: what the program body itself costs, apart from the trap -----------------------

def enable_bpf_stats():
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): the kernel times every BPF program run while the returned fd is open
    (closed with this process, so nothing stays switched on). None where the kernel refuses."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 2)(0, 0)  # enable_stats.type = BPF_STATS_RUN_TIME
    fd = libc.syscall(321, 32, ctypes.byref(attr), ctypes.sizeof(attr))  # SYS_bpf, BPF_ENABLE_STATS (x86-64)
    return fd if fd >= 0 else None


def prog_runtime(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded BPF program."""
    from otel_cuda.bpf import fdinfo

    info = fdinfo(fd)
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


def prog_fds(bpf, names) -> list[int]:
    fds = []
    for n in names:
        f = bpf.funcs.get(n.encode() if isinstance(n, str) else n)
        if f is not None:
            fds.append(f.fd)
    return fds


class ProgTimer:
    """ns per run of the given programs over a window (needs enable_bpf_stats())."""

    def __init__(self, fds: list[int]):
        self.fds = fds
        self.start = [prog_runtime(fd) for fd in fds]

    def result(self) -> dict:
        out = {}
        for fd, (ns0, c0) in zip(self.fds, self.start):
            ns1, c1 = prog_runtime(fd)
            out[fd] = ((ns1 - ns0) / (c1 - c0)) if c1 > c0 else None
        return out
