"""A sidecar that attaches after the kernels were loaded (issue 12): real uprobes on the fake driver, whose
CUfunction / CUkernel objects are laid out as NVIDIA 580's (testbed/fake_cuda.c, bench/results/late-attach-h200.json).

A ctypes process loads a module and a library, names its kernels and launches each; only THEN does the sidecar
attach by pid; then the process launches 300 more. The names come from the driver's objects (late_names.py) and
must be the process's own, and the same as when the sidecar was attached before the kernels were loaded."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from support.harness import BUILD, RunningSidecar

pytestmark = pytest.mark.root

LAUNCHES = 300

CHILD = (Path(__file__).resolve().parents[2] / "testbed" / "late_attach_child.py").read_text()


def start_child(wait: bool = False) -> subprocess.Popen:
    """The child, its kernels loaded and launched once (wait: only its driver mapped, until start())."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(BUILD / "libcuda.so.1"), str(LAUNCHES),
                             "wait" if wait else "now"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={"FAKE_CUDA_SYNC_US": "0", "PATH": "/usr/bin:/bin"})
    assert json.loads(proc.stdout.readline()) == {"mapped": True}
    if not wait:
        start(proc, send=False)
    return proc


def start(proc: subprocess.Popen, send: bool = True) -> None:
    if send:
        proc.stdin.write("start\n")
        proc.stdin.flush()
    assert json.loads(proc.stdout.readline()) == {"ready": True}


def until_seen(sidecar, proc, timeout: float = 20.0) -> None:
    """Ping until the sidecar has processed one of the child's calls: its probes are attached for that pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.stdin.write("ping\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "pong"
        if sidecar.pipeline.totals.by_pid.get((proc.pid, "cuStreamSynchronize")):
            return
        time.sleep(0.1)
    raise AssertionError("the sidecar never saw the child process")


def run_launches(sidecar, proc) -> list[list[str]]:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    truth = json.loads(proc.stdout.readline())["launches"]
    deadline = time.monotonic() + 20
    seen = sidecar.pipeline.totals.by_pid
    while seen.get((proc.pid, "cuLaunchKernel"), 0) < LAUNCHES and time.monotonic() < deadline:
        time.sleep(0.05)
    return truth


def archived_launches(archive: Path, pid: int) -> list[dict]:
    lines = []
    for f in sorted(archive.rglob("*.jsonl*")):
        with (gzip.open if f.suffix == ".gz" else open)(f, "rt") as fh:
            lines += [json.loads(line) for line in fh]
    out = [r for r in lines if r.get("pid") == pid and r.get("func") == "cuLaunchKernel"]
    return sorted(out, key=lambda r: r["mono_ns"])


def test_names_of_kernels_loaded_before_the_sidecar_attached(probes, tmp_path):
    proc = start_child()
    try:
        sidecar = RunningSidecar(probes, pid=str(proc.pid), no_archive=False, archive=str(tmp_path / "late"))
        until_seen(sidecar, proc)
        truth = run_launches(sidecar, proc)
        # the per-handle readers (the kernel maps' launch counts in cuda.kernel.launches) see the same names
        looked_up = {h: sidecar.pipeline.names.lookup(proc.pid, int(h, 16)) for h, _ in truth}
    finally:
        proc.kill()
    summary = sidecar.stop()
    counters = sidecar.pipeline.names.counters()
    got = archived_launches(tmp_path / "late", proc.pid)

    assert len(got) == len(truth) == LAUNCHES, "every launch after the attach was captured"
    assert [r["args"]["function"] for r in got] == [h for h, _ in truth]
    named = [(r["kernel"], name) for r, (_, name) in zip(got, truth) if r["kernel"] != "unknown"]
    assert len(named) >= 0.99 * LAUNCHES, f"named {len(named)} of {LAUNCHES}"
    assert all(k == name for k, name in named), "a late name is the process's own name for that handle"
    assert counters["launches_named_late"] == len(named) and summary["launches_unknown"] == LAUNCHES - len(named)
    assert counters["late_read"] == len({h for h, _ in truth}), "one read per handle, then cached"
    assert looked_up == dict(truth)
    assert not any(counters.get(f"late_{k}") for k in ("contradicted", "ambiguous", "gave_up", "deferred"))
    assert summary["lost_ringbuf"] == 0


def test_late_names_are_the_names_of_the_attached_before_path(probes, tmp_path):
    """The same process, once with the sidecar attached before the kernels were loaded (names from the
    name-giving calls) and once after (names from the driver's objects): the same name for every launch."""
    by_path = {}
    for path in ("before", "after"):
        if path == "before":  # attached while only the driver is mapped, before the first CUDA call
            proc = start_child(wait=True)
            sidecar = RunningSidecar(probes, pid=str(proc.pid), no_archive=False, archive=str(tmp_path / path))
        else:
            proc = start_child()
            sidecar = RunningSidecar(probes, pid=str(proc.pid), no_archive=False, archive=str(tmp_path / path))
        try:
            until_seen(sidecar, proc)
            if path == "before":
                start(proc)
            truth = run_launches(sidecar, proc)
        finally:
            proc.kill()
        sidecar.stop()
        counters = sidecar.pipeline.names.counters()
        got = archived_launches(tmp_path / path, proc.pid)
        by_path[path] = {"names": [r["kernel"] for r in got][-LAUNCHES:], "truth": [n for _, n in truth],
                         "late": counters["launches_named_late"]}
    before, after = by_path["before"], by_path["after"]
    assert before["late"] == 0, "attached before: every name came from a name-giving call"
    assert after["late"] >= 0.99 * LAUNCHES
    assert before["names"] == before["truth"] and after["names"] == after["truth"]
    assert before["names"] == after["names"]
    assert Counter(after["names"]) == Counter(before["truth"])
