"""The system view with real tracepoints: what the sidecar reports equals what the traced programs say they did."""

import gzip
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support.harness import ROOT, RunningSidecar, run_workload

pytestmark = pytest.mark.root
LIBCUDA = ROOT / "testbed" / "build" / "libcuda.so.1"
LAUNCHES = {"cuLaunchKernel", "cuLaunchKernelEx", "cuLaunchCooperativeKernel", "cuGraphLaunch"}


def archive(path: Path) -> list[dict]:
    out = []
    for f in sorted(path.rglob("*.jsonl*")):
        if f.name.endswith(".part"):
            continue
        with (gzip.open(f, "rt") if f.suffix == ".gz" else open(f)) as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


def metric_points(reader, name) -> list:
    data = reader.get_metrics_data()
    return [p for rm in (data.resource_metrics if data else []) for sm in rm.scope_metrics for m in sm.metrics
            if m.name == name for p in m.data.data_points]


def fs_type(path: Path) -> str:
    best, kind = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mount, fstype = parts[4], parts[parts.index("-") + 1]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def test_model_load_and_off_cpu_of_the_workload(probes, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(os.urandom(24 << 20))
    mapped = 10 << 20
    fd = os.open(weights, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # a cold read: the workload waits for the disk
    os.close(fd)

    sidecar = RunningSidecar(probes, match=r"workload .*--tag sysview-ml", no_archive=False,
                             archive=str(tmp_path / "archive"))
    truth = run_workload("--tag", "sysview-ml", "--threads", "2", "--steps", "5", "--start-delay-ms", "1000",
                         "--weights", str(weights), "--mmap-bytes", str(mapped), "--sleep-ms-total", "400")
    time.sleep(0.5)
    summary = sidecar.stop()
    pid = truth["pid"]
    system = sidecar.sidecar.telemetry.system
    assert summary["lost_ringbuf"] == 0 and summary["dropped_queue"] == 0

    # the model-load window: what the workload read and mapped before its first launch, ending at that launch
    ml = system.model_load(pid)
    size = weights.stat().st_size
    assert truth["weights"]["bytes_read"] == size and truth["weights"]["bytes_mapped"] == mapped
    assert ml["bytes_read"] == ml["bytes_read_by_kind"]["weights"] == size
    assert ml["bytes_mapped"] == ml["bytes_mapped_by_kind"]["weights"] == mapped
    # (the dynamic loader's reads and maps of libc & co are in too when the exec event selected it in time)
    assert set(ml["bytes_read_by_kind"]) <= {"weights", "library"}
    assert ml["files_opened_by_kind"]["weights"] == 1 and ml["mlocked_bytes"] == truth["weights"]["mlocked_bytes"]
    assert ml["files"][0]["path"] == str(weights)
    records = archive(tmp_path / "archive")
    first_launch = min(r["mono_ns"] for r in records if r["pid"] == pid and r.get("func") in LAUNCHES)
    assert ml["end_ns"] == first_launch and ml["ended_by"] == "first_launch"
    assert ml["start_source"] == "process_start" and ml["start_ns"] < first_launch - 10**9  # the start delay
    if fs_type(tmp_path) not in ("tmpfs", "ramfs"):
        assert ml["io_wait_ns"] > 0, "a cold read waits in D state"

    (span,) = [s for s in sidecar.spans.get_finished_spans()
               if s.name == "process.model_load" and s.resource.attributes["process.pid"] == pid]
    assert span.parent is None
    assert not [s for s in sidecar.spans.get_finished_spans() if s.parent and s.parent.span_id == span.context.span_id]
    offset = sidecar.sidecar.telemetry.clock.offset()
    assert abs(span.end_time - (first_launch + offset)) < 1_000_000
    assert span.attributes["model_load.bytes_read"] == span.attributes["model_load.bytes_read.weights"] == size
    assert span.attributes["model_load.bytes_mapped"] == span.attributes["model_load.bytes_mapped.weights"] == mapped

    # the archive: the sys records of the weights file add up to what the workload did
    mine = [r for r in records if r["type"] == "sys" and r["pid"] == pid]
    opens = [r for r in mine if r["func"] == "openat" and r["args"]["path"] == str(weights)]
    assert len(opens) == 1 and opens[0]["args"]["file_kind"] == "weights" and opens[0]["result"] == "ok"
    reads = [r for r in mine if r["func"] == "read" and r["args"]["path"] == str(weights)]
    assert sum(r["args"]["bytes"] for r in reads) == size
    assert sum(r["args"]["calls"] for r in reads) >= size // (1 << 20)
    maps = [r for r in mine if r["func"] == "mmap" and r["args"]["path"] == str(weights)]
    assert [r["args"]["bytes"] for r in maps] == [mapped]
    assert [r["args"]["bytes"] for r in mine if r["func"] == "munmap" and r["args"]["path"] == str(weights)] == [mapped]
    assert [r["args"]["bytes"] for r in mine if r["func"] in ("mlock", "munlock")] == [65536, 65536]
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs" / "archive-schema.json").read_text())
    for r in mine:
        jsonschema.validate(r, schema)

    # off-CPU time of the thread that slept a known total, within 10 % (it also waited in one cuCtxSynchronize)
    sleeper = truth["sleep"]["tid"]
    off = system.off_cpu(pid)[sleeper]
    voluntary = off["sleep_ns"] + off["io_ns"]
    assert abs(voluntary - truth["sleep"]["slept_ns"]) <= 0.1 * truth["sleep"]["slept_ns"], off
    assert off["sleep_switches"] >= 10
    series = [p for p in metric_points(sidecar.metrics, "cuda.thread.off_cpu.time")
              if p.attributes["process.pid"] == pid and p.attributes.get("thread.id") == sleeper
              and p.attributes["process.context_switch.type"] == "voluntary"]
    assert abs(sum(p.value for p in series) * 1e9 - truth["sleep"]["slept_ns"]) <= 0.1 * truth["sleep"]["slept_ns"]
    disk = {p.attributes["otel_cuda.file.kind"]: p.value for p in metric_points(sidecar.metrics, "process.disk.io")
            if p.attributes["process.pid"] == pid and p.attributes["disk.io.direction"] == "read"}
    assert disk["weights"] == size and set(disk) <= {"weights", "library"}


CHILD = textwrap.dedent(r"""
    import ctypes, mmap, os, sys, threading, time
    ctypes.CDLL(sys.argv[1])  # maps the (fake) libcuda: a process discovery selects
    root, spin_cpu = sys.argv[2], int(sys.argv[3])
    time.sleep(1.5)  # selected at exec; give the sidecar time anyway
    proc = os.open("/proc", os.O_RDONLY)
    os.chroot(root)  # /dev/nvidia* here are plain files of the test's own tree
    os.chdir("/")

    def switches():
        with open(os.open("thread-self/status", os.O_RDONLY, dir_fd=proc)) as f:
            d = dict(l.split(":", 1) for l in f if "ctxt_switches" in l)
        return int(d["voluntary_ctxt_switches"]), int(d["nonvoluntary_ctxt_switches"])

    print("ready", os.getpid(), threading.get_native_id(), flush=True)
    sys.stdin.readline()  # the test reads the sidecar's counts of this thread now
    before = switches()
    ctl = os.open("/dev/nvidiactl", os.O_RDWR)
    dev = os.open("/dev/nvidia0", os.O_RDWR)
    m = mmap.mmap(dev, 4096)
    m.close()
    try:
        os.open("/dev/nvidia-missing", os.O_RDONLY)
    except FileNotFoundError:
        pass
    w = os.open("/w.gguf", os.O_RDONLY)
    size = os.fstat(w).st_size
    for off in range(0, size, 64 << 10):  # 16 preads: one coalesced record
        os.pread(w, 64 << 10, off)
    os.close(w)
    out = os.open("/out.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.write(out, b"x" * 5000)
    os.close(out)
    os.sched_setaffinity(0, {spin_cpu})  # share a CPU with a spinner: preempted now and then
    t = time.monotonic()
    while time.monotonic() - t < 0.4:
        pass
    for _ in range(5):
        time.sleep(0.01)
    after = switches()
    print(after[0] - before[0], after[1] - before[1], size, flush=True)
    sys.stdin.readline()  # and now again
    time.sleep(0.3)
""")


def test_device_opens_io_and_context_switches_of_a_selected_process_only(probes, tmp_path):
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    for name in ("nvidia0", "nvidiactl"):
        (root / "dev" / name).write_bytes(b"\0" * 8192)
    (root / "w.gguf").write_bytes(os.urandom(1 << 20))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cpu = sorted(os.sched_getaffinity(0))[0]
    spinner = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    sidecar = RunningSidecar(probes, match=r"child\.py .* sysview-traced", no_archive=False,
                             archive=str(tmp_path / "archive"))
    system = sidecar.sidecar.telemetry.system
    try:
        children = [subprocess.Popen([sys.executable, str(script), str(LIBCUDA), str(root), str(cpu), tag],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    for tag in ("sysview-traced", "sysview-other")]
        counts = []
        for child in children:
            _, pid, tid = child.stdout.readline().split()
            before = system.off_cpu(int(pid)).get(int(tid), {})
            child.stdin.write("go\n")
            child.stdin.flush()
            vol, invol, size = map(int, child.stdout.readline().split())
            after = system.off_cpu(int(pid)).get(int(tid), {})
            child.stdin.write("go\n")
            child.stdin.flush()
            counts.append((int(pid), int(tid), vol, invol, size, before, after))
        for child in children:
            child.wait(timeout=60)
        time.sleep(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    sidecar.stop()
    assert [c.returncode for c in children] == [0, 0]
    (pid, tid, vol, invol, size, before, after), (other_pid, *_) = counts

    records = [r for r in archive(tmp_path / "archive") if r["type"] == "sys"]
    mine = [r for r in records if r["pid"] == pid]
    assert not [r for r in records if r["pid"] == other_pid], "a process not selected is not traced"
    devs = [r for r in mine if r["func"] == "device_open"]
    assert [(r["args"]["path"], r["result"]) for r in devs] == [("/dev/nvidiactl", "ok"), ("/dev/nvidia0", "ok"),
                                                                ("/dev/nvidia-missing", "ENOENT")]
    assert [(r["args"]["file_kind"], r["args"]["bytes"]) for r in mine
            if r["func"] == "mmap" and r["args"]["path"] == "/dev/nvidia0"] == [("device", 4096)]
    reads = [r for r in mine if r["func"] == "read" and r["args"]["path"] == "/w.gguf"]
    assert sum(r["args"]["bytes"] for r in reads) == size and sum(r["args"]["calls"] for r in reads) == 16
    assert len(reads) < 16, "consecutive reads of one file are coalesced"

    opens = [p for p in metric_points(sidecar.metrics, "cuda.device.opens") if p.attributes["process.pid"] == pid]
    assert [p.value for p in opens] == [2]
    disk = {(p.attributes["disk.io.direction"], p.attributes["otel_cuda.file.kind"]): p.value
            for p in metric_points(sidecar.metrics, "process.disk.io") if p.attributes["process.pid"] == pid}
    assert disk[("read", "weights")] == size and disk[("write", "other")] == 5000
    assert not [p for p in metric_points(sidecar.metrics, "process.disk.io") if p.attributes["process.pid"] == other_pid]

    # context switches of the main thread by type, against the kernel's own per-thread counts. Ours are read
    # while the child waits for the test, so they also hold the switches between those waits and the child's
    # own reads: the wait for "go" itself (voluntary, unless "go" came first) and any preemption around the reads.
    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert before and invol > 0 and vol >= 5  # 5 sleeps
    assert vol <= delta("sleep_switches") + delta("io_switches") <= vol + 2, (before, after, vol, invol)
    assert invol <= delta("preempted_switches") <= invol + max(5, invol // 50), (before, after, vol, invol)
    switches = {p.attributes["process.context_switch.type"]: p.value
                for p in metric_points(sidecar.metrics, "process.context_switches") if p.attributes["process.pid"] == pid}
    assert switches["voluntary"] >= vol and switches["involuntary"] >= invol
