"""Real uprobes on the fake driver: what the sidecar captures equals what the workload says it did."""

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from otel_cuda.demangle import readable

from otel_cuda.probes import BY_ID, BY_SYMBOL as BY_ID_SYMBOL

from support.harness import RunningSidecar, WORKLOAD, run_workload, start_workload

pytestmark = pytest.mark.root


def captured(pipeline, pid):
    return {f: n for (p, f), n in pipeline.totals.by_pid.items() if p == pid}


def metric_points(reader, name):
    data = reader.get_metrics_data()
    out = []
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    out += list(m.data.data_points)
    return out



def readable_counts(by_kernel: dict) -> dict:
    """The workload's launches per kernel, under the demangled names the metrics carry."""
    out = Counter()
    for name, n in by_kernel.items():
        out[readable(name)] += n
    return dict(out)

def test_multithreaded_workload_started_after_the_sidecar(probes, tmp_path):
    sidecar = RunningSidecar(probes, match=r"workload .*--tag capture-mt", no_archive=False,
                             archive=str(tmp_path / "archive"))
    truth = run_workload("--tag", "capture-mt", "--threads", "4", "--steps", "12", "--launches", "6",
                         "--graph-every", "3", "--start-delay-ms", "1500")
    time.sleep(0.5)
    summary = sidecar.stop()
    pid = truth["pid"]
    got = captured(sidecar.pipeline, pid)
    assert got == {f: n for f, n in truth["calls"].items() if n}, "captured calls differ from the workload's own count"
    assert summary["lost_ringbuf"] == 0 and summary["dropped_queue"] == 0 and summary["decode_errors"] == 0
    assert summary["skipped_by_kernel"] == 0 and summary["kernel_table_full"] == 0
    # every name is whole, the long ones (over the record's 256 bytes) completed from the process's memory
    assert summary["launches_unknown"] == 0 and summary["kernel_names_truncated"] == 0

    # every line of the archive is a valid record; their count is what was captured
    import gzip
    lines = []
    for f in sorted((tmp_path / "archive").rglob("*.jsonl*")):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            lines += [json.loads(line) for line in fh]
    cuda = [r for r in lines if r["type"] == "cuda_api" and r["pid"] == pid]
    assert len(cuda) == sum(truth["calls"].values())
    launches = Counter(r["kernel"] for r in cuda if r["func"] != "cuGraphLaunch" and r["func"].startswith("cuLaunch"))
    assert dict(launches) == truth["launches_by_kernel"]
    failed = Counter((r["func"], r["result"]) for r in cuda if r["result"] not in (None, "CUDA_SUCCESS"))
    assert failed == Counter({(f, code): n for f, codes in truth["error_codes"].items() for code, n in codes.items()})
    assert sum(1 for r in cuda if r["step"] is not None and r["func"] == "cuStreamSynchronize") >= truth["steps_total"]

    # metrics from the kernel's aggregates agree with the ground truth
    memcpy = {p.attributes["cuda.memcpy.kind"]: p.value for p in metric_points(sidecar.metrics, "cuda.memcpy.bytes")
              if p.attributes["process.pid"] == pid}
    assert {k: v for k, v in memcpy.items() if v} == {k: v for k, v in truth["bytes"].items() if v}
    live = {p.attributes["cuda.memory.type"]: p.value for p in metric_points(sidecar.metrics, "cuda.memory.allocated")
            if p.attributes["process.pid"] == pid}
    assert live and all(v == 0 for v in live.values()), "everything allocated was freed"
    steps = [s for s in sidecar.spans.get_finished_spans() if s.name == "cuda.step" and s.resource.attributes["process.pid"] == pid]
    assert len(steps) == truth["steps_total"]
    assert sum(s.attributes["cuda.launches"] for s in steps) == sum(truth["launches_by_kernel"].values())


def test_attaches_to_a_running_process_by_pid(probes):
    proc = start_workload("--tag", "capture-pid", "--threads", "2", "--steps", "5", "--launches", "3",
                          "--start-delay-ms", "2500")
    try:
        sidecar = RunningSidecar(probes, pid=str(proc.pid))
        truth = json.loads(proc.communicate(timeout=60)[0])
        time.sleep(0.3)
    finally:
        proc.kill()
    sidecar.stop()
    assert captured(sidecar.pipeline, proc.pid) == {f: n for f, n in truth["calls"].items() if n}


def test_restart_and_filtering(probes):
    sidecar = RunningSidecar(probes, match=r"--tag traced-one")
    first = run_workload("--tag", "traced-one", "--threads", "1", "--steps", "4", "--start-delay-ms", "800")
    other = start_workload("--tag", "not-traced", "--threads", "1", "--steps", "4", "--start-delay-ms", "800")
    second = run_workload("--tag", "traced-one", "--threads", "2", "--steps", "3", "--start-delay-ms", "800")
    other_truth = json.loads(other.communicate(timeout=60)[0])
    time.sleep(0.3)
    sidecar.stop()
    assert captured(sidecar.pipeline, first["pid"]) == {f: n for f, n in first["calls"].items() if n}
    assert captured(sidecar.pipeline, second["pid"]) == {f: n for f, n in second["calls"].items() if n}
    assert captured(sidecar.pipeline, other_truth["pid"]) == {}, "a process that does not match is not traced"
    assert sidecar.pipeline.discovery.counters.processes_exited >= 2


def test_runtime_layer_counts_each_call_once(probes):
    sidecar = RunningSidecar(probes, match=r"--tag capture-rt", runtime=True)
    truth = run_workload("--tag", "capture-rt", "--runtime", "--threads", "2", "--steps", "5", "--launches", "4",
                         "--start-delay-ms", "1500")
    time.sleep(0.3)
    sidecar.stop()
    pid = truth["pid"]
    got = captured(sidecar.pipeline, pid)
    runtime = {f: n for f, n in truth["runtime_calls"].items() if n}
    # every runtime call is seen, and so is the driver call it makes (flagged nested in the archive)
    assert {f: got.get(f) for f in runtime} == runtime
    assert {f: got.get(f, 0) for f in truth["calls"] if truth["calls"][f]} == {f: n for f, n in truth["calls"].items() if n}
    # ...but counted once: the kernel's per-function counts leave the nested driver calls out
    stats = {BY_ID[func].symbol: agg["calls"] for (spid, func), agg in probes.stats().items() if spid == pid}
    launches_via_runtime = runtime.get("cudaLaunchKernel", 0)
    assert stats["cudaLaunchKernel"] == launches_via_runtime
    assert stats.get("cuLaunchKernel", 0) == truth["calls"]["cuLaunchKernel"] - launches_via_runtime
    assert sum(stats.values()) == sum(truth["calls"].values())  # runtime + non-nested driver = one count per call


def capture_all(probes, tag: str, threads: int, **sidecar_settings):
    """A sidecar on `probes` and a workload run under it: asserts every call was captured; returns the workload's
    own counts and the kernel's aggregates for its pid by function name."""
    sidecar = RunningSidecar(probes, match=rf"--tag {tag}", **sidecar_settings)
    truth = run_workload("--tag", tag, "--threads", str(threads), "--steps", "4", "--launches", "3",
                         "--start-delay-ms", "1500")
    time.sleep(0.3)
    sidecar.stop()
    assert captured(sidecar.pipeline, truth["pid"]) == {f: n for f, n in truth["calls"].items() if n}
    return truth, {BY_ID[f].symbol: agg for (pid, f), agg in probes.stats().items() if pid == truth["pid"]}


def test_launch_return_probes_add_duration_and_result(testbed, tmp_path):
    """--launch-return: launches are probed at return too (a program of its own; the default is entry only)."""
    from otel_cuda.bpf import BpfConfig, Probes

    lr_probes = Probes(BpfConfig(launch_return=True))
    try:
        truth, stats = capture_all(lr_probes, "capture-lr", threads=1, launch_return=True)
        launches = stats["cuLaunchKernel"]
        assert launches["calls"] == truth["calls"]["cuLaunchKernel"] and launches["total_ns"] > 0
        assert sum(launches["hist"]) == launches["calls"], "every launch has a duration"
    finally:
        lr_probes.close()


def test_task_storage_refused_falls_back_to_the_hash_map_stash(testbed, monkeypatch):
    """Kernels before 5.12 refuse task-local storage in uprobe programs: asked for the thread-local stash
    (BpfConfig.thread_stash), Probes loads the hash-map stash instead, and captures every call."""
    from otel_cuda import bpf
    from otel_cuda.bpf import BpfConfig, Probes

    real_load = bpf._load

    def old_kernel_load(bpf_class, config):
        if config.thread_stash:
            raise Exception("cannot call helper 156 (task_storage_get)")  # what the verifier of 5.10 says
        return real_load(bpf_class, config)

    monkeypatch.setattr(bpf, "_load", old_kernel_load)
    hash_probes = Probes(BpfConfig(thread_stash=True))
    assert not hash_probes.config.thread_stash
    try:
        truth, stats = capture_all(hash_probes, "capture-hash", threads=2)
        sync = stats["cuStreamSynchronize"]
        assert sync["calls"] == truth["calls"]["cuStreamSynchronize"] and sum(sync["hist"]) == sync["calls"]
    finally:
        hash_probes.close()


def test_kernel_map_memory_does_not_grow_with_the_node_cpu_count(probes):
    """The maps are charged to the sidecar's memory limit (memory cgroup, Linux >= 5.11): what the chart's limit
    holds on this 2-CPU machine must hold on a 256-CPU GPU node. Per-CPU maps hold max_entries values per CPU."""
    per_cpu_types = {5, 6, 10}  # BPF_MAP_TYPE_PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
    cpus = os.cpu_count()
    projected = 0
    from otel_cuda.bpf import fdinfo

    for fd in os.listdir("/proc/self/fd"):
        info = fdinfo(int(fd))
        if "map_type" not in info:
            continue
        projected += int(info["memlock"])
        if int(info["map_type"]) in per_cpu_types:
            value = (int(info["value_size"]) + 7) // 8 * 8
            projected += int(info["max_entries"]) * value * (256 - cpus)
    assert 10 << 20 < projected <= 128 << 20, f"{projected / 2**20:.0f} MiB of BPF maps on a 256-CPU node"


def test_a_full_kernel_table_is_counted_and_keeps_live_memory_consistent(testbed):
    """Allocations beyond the allocation table's size (BpfConfig.max_allocs) are counted (otel_cuda.kernel_tables.full), and
    left out of the live total, so their frees do not leave it wrong."""
    from otel_cuda.bpf import BpfConfig, Probes

    small = Probes(BpfConfig(max_allocs=2))
    try:
        truth, _ = capture_all(small, "capture-full", threads=1)
        allocs = ("cuMemAlloc_v2", "cuMemAllocAsync", "cuMemAllocManaged", "cuMemAllocHost_v2", "cuMemHostAlloc",
                  "cuMemCreate")
        succeeded = sum(truth["calls"][f] - sum(truth["error_codes"].get(f, {}).values()) for f in allocs)
        assert succeeded > 2
        assert small.table_full() == succeeded - 2  # all of one thread's allocations are live at once
        assert small.lost() == 0
        assert all(v == 0 for (pid, _), v in small.live_bytes().items() if pid == truth["pid"])
    finally:
        small.close()


def test_a_gone_process_frees_its_kernel_entries_and_keeps_its_totals(probes):
    """The kernel maps do not fill over process restarts: a gone process's entries are deleted (after
    Pipeline.kernel_entry_grace_s, 60 s by default) and its call counts stay in the exported metrics."""
    sidecar = RunningSidecar(probes, match=r"workload .*--tag capture-gone")
    sidecar.pipeline.kernel_entry_grace_s = 0.0
    truth = run_workload("--tag", "capture-gone", "--threads", "2", "--steps", "3", "--launches", "2",
                         "--start-delay-ms", "1500")
    pid = truth["pid"]
    deadline = time.monotonic() + 10
    while any(p == pid for p, _ in probes.stats()) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not any(p == pid for p, _ in probes.stats()), "the gone process's kernel entries are freed"
    finally:
        sidecar.stop()
    calls = Counter()
    for point in metric_points(sidecar.metrics, "cuda.api.calls"):
        if point.attributes["process.pid"] == pid:
            calls[point.attributes["cuda.function"]] += point.value
    assert dict(calls) == {f: n for f, n in truth["calls"].items() if n}


LAUNCH_FUNCS = {p.symbol for p in BY_ID.values() if p.launch}


def launch_series(reader, pid):
    """cuda.kernel.launches of pid: {(launch type, kernel name or None): launches}."""
    return {(p.attributes["cuda.launch.type"], p.attributes.get("cuda.kernel.name")): p.value
            for p in metric_points(reader, "cuda.kernel.launches") if p.attributes["process.pid"] == pid and p.value}


def api_calls(reader, pid):
    calls = Counter()
    for p in metric_points(reader, "cuda.api.calls"):
        if p.attributes["process.pid"] == pid:
            calls[p.attributes["cuda.function"]] += p.value
    return calls


def histogram_counts(reader, name, key, pid):
    return {p.attributes[key]: (p.count, sum(p.bucket_counts)) for p in metric_points(reader, name)
            if p.attributes["process.pid"] == pid}


def test_metrics_stay_exact_when_the_ring_buffer_overflows(testbed):
    """A ring buffer of 4 pages (16 KiB, ~170 launch records) and a workload that launches 2400 kernels in bursts the
    consumer cannot keep up with: hundreds of events are lost, every metric still equals the workload's own count, because
    each one is read from a kernel aggregate (launches per kernel from kernel_launches, durations from the kernel's
    log2 histograms)."""
    from otel_cuda.bpf import BpfConfig, Probes

    tiny = Probes(BpfConfig(ringbuf_pages=4))
    try:
        sidecar = RunningSidecar(tiny, match=r"workload .*--tag capture-overflow")
        truth = run_workload("--tag", "capture-overflow", "--threads", "2", "--steps", "30", "--launches", "40",
                             "--graph-every", "3", "--errors", "0", "--start-delay-ms", "1500")
        time.sleep(0.3)
        summary = sidecar.stop()
        pid = truth["pid"]
        assert summary["lost_ringbuf"] > 100, summary["lost_ringbuf"]  # it did overflow

        calls = api_calls(sidecar.metrics, pid)
        assert dict(calls) == {f: n for f, n in truth["calls"].items() if n}
        launches = launch_series(sidecar.metrics, pid)
        assert sum(launches.values()) == sum(calls[f] for f in LAUNCH_FUNCS)
        assert sum(launches.values()) == truth["launches_total"] + truth["graph_launches"]
        # per kernel too: the kernel counted each under its handle, named at collection (names are few, woken at once)
        assert summary["launches_unknown"] == 0 and ("kernel", "unrecorded") not in launches
        by_name = Counter()
        for (ltype, name), n in launches.items():
            if ltype != "graph":
                by_name[name] += n
        assert dict(by_name) == readable_counts(truth["launches_by_kernel"])  # metric labels are demangled
        assert launches[("graph", None)] == truth["graph_launches"]

        # the duration histograms count every call with a return, each once (kernel log2 buckets)
        durations = histogram_counts(sidecar.metrics, "cuda.api.duration", "cuda.function", pid)
        timed = {f: n for f, n in truth["calls"].items() if n and not BY_ID_SYMBOL[f].entry_only}
        assert {f: c for f, (c, _) in durations.items()} == timed
        assert all(c == b for c, b in durations.values())
        syncs = histogram_counts(sidecar.metrics, "cuda.sync.duration", "cuda.sync.kind", pid)
        assert syncs == {"stream": (truth["calls"]["cuStreamSynchronize"],) * 2,
                         "context": (truth["calls"]["cuCtxSynchronize"],) * 2,
                         "event": (truth["calls"]["cuEventSynchronize"],) * 2}
    finally:
        tiny.close()


def test_a_full_kernel_launch_table_counts_the_rest_as_unrecorded(testbed):
    """With room for two (process, function, kernel) counters, the launches the table could not hold are not lost
    from cuda.kernel.launches: they are its `unrecorded` series, and the series still add up to the launch calls."""
    from otel_cuda.bpf import BpfConfig, Probes

    small = Probes(BpfConfig(max_kernels=2))
    try:
        sidecar = RunningSidecar(small, match=r"workload .*--tag capture-kfull")
        truth = run_workload("--tag", "capture-kfull", "--threads", "1", "--steps", "4", "--launches", "6",
                             "--graph-every", "2", "--errors", "0", "--start-delay-ms", "1500")
        time.sleep(0.3)
        sidecar.stop()
        pid = truth["pid"]
        launches = launch_series(sidecar.metrics, pid)
        calls = api_calls(sidecar.metrics, pid)
        assert sum(launches.values()) == sum(calls[f] for f in LAUNCH_FUNCS)
        assert sum(launches.values()) == truth["launches_total"] + truth["graph_launches"]
        unrecorded = sum(n for (_, name), n in launches.items() if name == "unrecorded")
        recorded = sum(small.kernel_launches().get(k, 0) for k in small.kernel_launches() if k[0] == pid)
        assert unrecorded == truth["launches_total"] - recorded > 0
        assert small.table_full() >= unrecorded
    finally:
        small.close()


def test_runtime_layer_steps_launches_and_allocations_equal_the_driver_only_run(probes):
    """The same workload through libcudart (--runtime, runtime probes on) and straight on the driver: steps, kernel
    launches by name, graph launches and allocations come out equal, and equal to the workload's own counts. The
    driver call under each runtime call is flagged nested: cudaMalloc is one allocation, not two; a step opened by
    cudaLaunchKernel, sealed by cudaMemcpyAsync(DeviceToHost) and closed by cudaStreamSynchronize is one step."""
    sidecar = RunningSidecar(probes, match=r"workload .*--tag capture-layers", runtime=True)
    args = ("--threads", "2", "--steps", "5", "--launches", "4", "--graph-every", "2", "--errors", "0",
            "--start-delay-ms", "1500")
    driver = run_workload("--tag", "capture-layers", *args)
    runtime = run_workload("--tag", "capture-layers", "--runtime", *args)
    time.sleep(0.3)
    summary = sidecar.stop()
    assert summary["lost_ringbuf"] == 0
    spans = sidecar.spans.get_finished_spans()
    allocations = {}
    got = {}
    for name, truth in (("driver", driver), ("runtime", runtime)):
        pid = truth["pid"]
        steps = [s for s in spans if s.name == "cuda.step" and s.resource.attributes["process.pid"] == pid]
        launches = launch_series(sidecar.metrics, pid)
        by_name = Counter()
        for (ltype, kernel), n in launches.items():
            if ltype != "graph":
                by_name[kernel] += n
        got[name] = {
            "steps": len(steps),
            "step_launches": sum(s.attributes["cuda.launches"] for s in steps),
            "step_graph_launches": sum(s.attributes["cuda.graph_launches"] for s in steps),
            "closed_by": Counter(s.attributes.get("cuda.step.closed_by") for s in steps),
            "launches_by_kernel": dict(by_name),
            "graph_launches": launches.get(("graph", None), 0),
        }
        assert got[name] == {
            "steps": truth["steps_total"], "step_launches": truth["launches_total"],
            "step_graph_launches": truth["graph_launches"], "closed_by": got[name]["closed_by"],
            "launches_by_kernel": readable_counts(truth["launches_by_kernel"]),
            "graph_launches": truth["graph_launches"]}, name
        allocations[name] = {p.attributes["cuda.memory.type"]: p.value
                             for p in metric_points(sidecar.metrics, "cuda.memory.allocations")
                             if p.attributes["process.pid"] == pid}
        # each allocation once: the driver's count has cudaMalloc's cuMemAlloc_v2 in it, the metric has cudaMalloc
        device = sum(truth["calls"][f] for f in ("cuMemAlloc_v2", "cuMemAllocAsync", "cuMemCreate"))
        assert allocations[name]["device"] == device, name
    assert got["runtime"] == got["driver"]
    assert allocations["runtime"]["device"] == allocations["driver"]["device"] + runtime["options"]["threads"]
