"""A small, realistic archive for analyze/timeline tests, with its ground truth.

One engine thread (pid 42, tid 43) runs `steps` steps; each step: 4 kernel launches (entry-only), 1 graph launch,
an async HtoD copy, a synchronous DtoH copy, a cuStreamSynchronize, and one cuda_step record. Step 0 also
allocates 1 MiB and 4 MiB (device) and frees the 1 MiB; a second thread (tid 44) allocates 2 MiB of host memory.
Optionally request records (one per two steps) and sys records (a cold start reading two files).
"""

T0 = 1_763_900_000_000_000_000  # ns since the epoch
MONO0 = 123_456_789
KERNELS = ["flash_fwd_kernel", "gemm_kernel", "gemm_kernel", "rms_norm_kernel"]
STEP_NS = 2_000_000
SYNC_NS = 1_200_000
DTOH_BYTES = 4096
DTOH_NS = 4096  # 1 GB/s: bytes/ns


def call(ts, func, dur=None, result="CUDA_SUCCESS", pid=42, tid=43, step=None, kernel=None, **args):
    r = {"v": 1, "type": "cuda_api", "ts": T0 + ts, "mono_ns": MONO0 + ts, "pid": pid, "tid": tid, "func": func,
         "phase": "entry" if dur is None else "call", "dur_ns": dur, "result": None if dur is None else result,
         "args": args, "step": step}
    if kernel is not None:
        r["kernel"] = kernel
    return r


def make_trace(steps=10, requests=False, sys_records=False):
    recs = []
    if sys_records:
        recs += [
            {"v": 1, "type": "sys", "ts": T0 - 3_000_000_000, "pid": 42, "tid": 43, "func": "openat",
             "dur_ns": 10_000, "args": {"path": "/models/model-00001.safetensors", "fd": 7}},
            {"v": 1, "type": "sys", "ts": T0 - 2_900_000_000, "pid": 42, "tid": 43, "func": "read",
             "dur_ns": 1_000_000_000, "args": {"path": "/models/model-00001.safetensors", "fd": 7,
                                               "bytes": 2_000_000_000}},
            {"v": 1, "type": "sys", "ts": T0 - 1_800_000_000, "pid": 42, "tid": 43, "func": "read",
             "dur_ns": 500_000_000, "args": {"path": "/models/config.json", "fd": 8, "bytes": 500_000_000}},
        ]
    for s in range(steps):
        base = s * 3_000_000
        t = base
        if s == 0:
            recs.append(call(t, "cuMemAlloc_v2", 20_000, step=s, ptr="0x7f0000000000", bytes=1 << 20,
                             memory_type="device"))
            recs.append(call(t + 30_000, "cuMemAlloc_v2", 20_000, step=s, ptr="0x7f0000100000", bytes=4 << 20,
                             memory_type="device"))
            recs.append(call(t + 60_000, "cuMemFree_v2", 10_000, step=s, ptr="0x7f0000000000", bytes=1 << 20,
                             memory_type="device"))
            recs.append(call(t + 80_000, "cuMemAllocHost_v2", 50_000, tid=44, ptr="0x7e0000000000", bytes=2 << 20,
                             memory_type="host"))
            t += 100_000
        for k, name in enumerate(KERNELS):
            recs.append(call(t + k * 10_000, "cuLaunchKernel", step=s, kernel=name, function=f"0x{0x1000 + k:x}",
                             grid=[128, 1, 1], block=[256, 1, 1], shared_mem=0, stream="0x5"))
        t += 50_000
        recs.append(call(t, "cuGraphLaunch", step=s, graph="0x9000", stream="0x5"))
        recs.append(call(t + 10_000, "cuMemcpyHtoDAsync_v2", 3_000, step=s, dst="0x7f0000100000",
                         src="0x7e0000000000", bytes=8192, kind="htod", stream="0x5"))
        recs.append(call(t + 20_000, "cuMemcpyDtoH_v2", DTOH_NS, step=s, dst="0x7e0000000000",
                         src="0x7f0000100000", bytes=DTOH_BYTES, kind="dtoh"))
        sync_start = base + STEP_NS - SYNC_NS
        recs.append(call(sync_start, "cuStreamSynchronize", SYNC_NS, step=s, stream="0x5"))
        recs.append({"v": 1, "type": "cuda_step", "step": s, "pid": 42, "tid": 43, "ts": T0 + base,
                     "mono_ns": MONO0 + base, "dur_ns": STEP_NS + s * 1000, "launches": 4, "graph_launches": 1,
                     "memcpy_bytes": 8192 + DTOH_BYTES, "api_ns": 200_000, "sync_ns": SYNC_NS})
        if requests and s % 2 == 1:
            start = T0 + (s - 1) * 3_000_000
            recs.append({"v": 1, "type": "request", "trace_id": f"{s:032x}", "span_id": f"{s:016x}",
                         "request_id": f"req-{s}", "ts": start, "dur_ns": 6_000_000,
                         "windows": {"queue": [start, start + 100_000], "prefill": [start + 100_000, start + 3_000_000],
                                     "decode": [start + 3_000_000, start + 6_000_000]},
                         "cuda": {"prefill": {"steps": 1, "launches": 4, "graph_launches": 1, "memcpy_bytes": 12288,
                                              "api_ns": 200_000, "sync_ns": SYNC_NS, "shared_by": 1},
                                  "decode": {"steps": 1, "launches": 4, "graph_launches": 1, "memcpy_bytes": 12288,
                                             "api_ns": 200_000, "sync_ns": SYNC_NS, "shared_by": 2}}})
    return recs
