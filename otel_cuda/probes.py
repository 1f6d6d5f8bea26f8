"""The probe table: which CUDA functions are probed, how, and what their captured arguments mean.

Ids match `enum oc_func` in bpf/otel_cuda.h (tests/unit/test_contract.py checks). The BPF handler of a
function is `entry_<symbol>` / `return_<symbol>`. Argument names say what each slot of `oc_call.args`
holds after the return handler ran (e.g. an allocation's out-pointer slot holds the pointer written).
"""

from __future__ import annotations

from dataclasses import dataclass

DRIVER = "driver"
RUNTIME = "runtime"


@dataclass(frozen=True)
class Probe:
    symbol: str
    func_id: int
    group: str  # launch | memory | copy | set | sync | event | names | lifecycle
    args: tuple[str, ...]  # names of oc_call.args slots ("" = unused)
    layer: str = DRIVER
    entry_only: bool = False  # launches: entry only unless --launch-return
    optional: bool = False  # a library may not export it (older drivers): attach with can_fail
    memcpy_kind: str = ""  # htod | dtoh | dtod | peer | default | memset
    memory_type: str = ""  # device | host | managed (allocations and frees)
    sync_kind: str = ""  # stream | context | event


_COPY = ("dst", "src", "bytes", "stream")
_ALLOC = ("ptr", "bytes", "memory_type", "stream")
_FREE = ("ptr", "bytes", "memory_type", "known", "stream")

PROBES: tuple[Probe, ...] = (
    # launch (struct oc_launch carries their arguments)
    Probe("cuLaunchKernel", 1, "launch", (), entry_only=True),
    Probe("cuLaunchKernelEx", 2, "launch", (), entry_only=True, optional=True),
    Probe("cuLaunchCooperativeKernel", 3, "launch", (), entry_only=True, optional=True),
    Probe("cuGraphLaunch", 4, "launch", (), entry_only=True, optional=True),
    # memory
    Probe("cuMemAlloc_v2", 10, "memory", _ALLOC[:3], memory_type="device"),
    Probe("cuMemAllocAsync", 11, "memory", _ALLOC, optional=True, memory_type="device"),
    Probe("cuMemAllocManaged", 12, "memory", _ALLOC[:3] + ("flags",), optional=True, memory_type="managed"),
    Probe("cuMemAllocHost_v2", 13, "memory", _ALLOC[:3], memory_type="host"),
    Probe("cuMemHostAlloc", 14, "memory", _ALLOC[:3] + ("flags",), memory_type="host"),
    Probe("cuMemCreate", 15, "memory", ("handle", "bytes", "memory_type", "flags"), optional=True, memory_type="device"),
    Probe("cuMemFree_v2", 16, "memory", _FREE[:4], memory_type="device"),
    Probe("cuMemFreeAsync", 17, "memory", _FREE, optional=True, memory_type="device"),
    Probe("cuMemFreeHost", 18, "memory", _FREE[:4], memory_type="host"),
    Probe("cuMemRelease", 19, "memory", ("handle", "bytes", "memory_type", "known"), optional=True, memory_type="device"),
    # copy
    Probe("cuMemcpy", 30, "copy", _COPY[:3], memcpy_kind="default"),
    Probe("cuMemcpyAsync", 31, "copy", _COPY, memcpy_kind="default"),
    Probe("cuMemcpyHtoD_v2", 32, "copy", _COPY[:3], memcpy_kind="htod"),
    Probe("cuMemcpyDtoH_v2", 33, "copy", _COPY[:3], memcpy_kind="dtoh"),
    Probe("cuMemcpyDtoD_v2", 34, "copy", _COPY[:3], memcpy_kind="dtod"),
    Probe("cuMemcpyHtoDAsync_v2", 35, "copy", _COPY, memcpy_kind="htod"),
    Probe("cuMemcpyDtoHAsync_v2", 36, "copy", _COPY, memcpy_kind="dtoh"),
    Probe("cuMemcpyDtoDAsync_v2", 37, "copy", _COPY, memcpy_kind="dtod"),
    Probe("cuMemcpyPeer", 38, "copy", _COPY[:3], optional=True, memcpy_kind="peer"),
    Probe("cuMemcpyPeerAsync", 39, "copy", _COPY, optional=True, memcpy_kind="peer"),
    # set (bytes = elements x element size, computed in the kernel)
    Probe("cuMemsetD8_v2", 40, "set", ("dst", "value", "elements"), memcpy_kind="memset"),
    Probe("cuMemsetD16_v2", 41, "set", ("dst", "value", "elements"), memcpy_kind="memset"),
    Probe("cuMemsetD32_v2", 42, "set", ("dst", "value", "elements"), memcpy_kind="memset"),
    Probe("cuMemsetD8Async", 43, "set", ("dst", "value", "elements", "stream"), memcpy_kind="memset"),
    Probe("cuMemsetD16Async", 44, "set", ("dst", "value", "elements", "stream"), memcpy_kind="memset"),
    Probe("cuMemsetD32Async", 45, "set", ("dst", "value", "elements", "stream"), memcpy_kind="memset"),
    # sync
    Probe("cuStreamSynchronize", 50, "sync", ("stream",), sync_kind="stream"),
    Probe("cuCtxSynchronize", 51, "sync", (), sync_kind="context"),
    Probe("cuEventSynchronize", 52, "sync", ("", "event"), sync_kind="event"),
    Probe("cuStreamWaitEvent", 53, "sync", ("stream", "event", "flags"), sync_kind="event"),
    # not a wait: an event recorded after a step's launches (or its token readback) is what a later
    # cuEventSynchronize on another thread waits for; steps.py closes that step there
    Probe("cuEventRecord", 54, "event", ("stream", "event")),
    Probe("cuEventRecordWithFlags", 55, "event", ("stream", "event", "flags"), optional=True),
    # names
    Probe("cuModuleGetFunction", 60, "names", ()),
    Probe("cuLibraryGetKernel", 61, "names", (), optional=True),
    Probe("cuKernelGetFunction", 62, "names", ("function", "kernel"), optional=True),
    Probe("cuModuleLoadData", 63, "names", ("handle",)),
    Probe("cuModuleLoadDataEx", 64, "names", ("handle",), optional=True),
    Probe("cuLibraryLoadData", 65, "names", ("handle",), optional=True),
    # lifecycle
    Probe("cuInit", 70, "lifecycle", ("", "flags")),
    Probe("cuDevicePrimaryCtxRetain", 71, "lifecycle", ("context", "device")),
    Probe("cuCtxCreate_v2", 72, "lifecycle", ("context", "flags", "device"), optional=True),
    # runtime layer (libcudart), off by default
    Probe("cudaLaunchKernel", 100, "launch", ("host_stub", "grid_xy", "block_xy", "stream"), layer=RUNTIME, optional=True),
    Probe("cudaMemcpy", 101, "copy", ("dst", "src", "bytes", "kind"), layer=RUNTIME, optional=True, memcpy_kind="default"),
    Probe("cudaMemcpyAsync", 102, "copy", _COPY, layer=RUNTIME, optional=True, memcpy_kind="default"),
    Probe("cudaMalloc", 103, "memory", ("out", "bytes"), layer=RUNTIME, optional=True),
    Probe("cudaFree", 104, "memory", ("ptr",), layer=RUNTIME, optional=True),
    Probe("cudaStreamSynchronize", 105, "sync", ("stream",), layer=RUNTIME, optional=True, sync_kind="stream"),
    Probe("cudaDeviceSynchronize", 106, "sync", (), layer=RUNTIME, optional=True, sync_kind="context"),
    Probe("cudaGraphLaunch", 107, "launch", ("graph", "stream"), layer=RUNTIME, optional=True),
)

BY_ID: dict[int, Probe] = {p.func_id: p for p in PROBES}
BY_SYMBOL: dict[str, Probe] = {p.symbol: p for p in PROBES}
DRIVER_PROBES = tuple(p for p in PROBES if p.layer == DRIVER)
RUNTIME_PROBES = tuple(p for p in PROBES if p.layer == RUNTIME)

ALLOCATING = frozenset({"cuMemAlloc_v2", "cuMemAllocAsync", "cuMemAllocManaged", "cuMemAllocHost_v2", "cuMemHostAlloc",
                        "cuMemCreate"})
MEMORY_TYPES = ("device", "host", "managed")  # index = enum oc_mem_type

# CUresult names for the codes a driver call commonly returns (cuda.h); others are rendered CUDA_ERROR_<n>.
CU_RESULTS: dict[int, str] = {
    0: "CUDA_SUCCESS",
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    200: "CUDA_ERROR_INVALID_IMAGE",
    201: "CUDA_ERROR_INVALID_CONTEXT",
    209: "CUDA_ERROR_NO_BINARY_FOR_GPU",
    218: "CUDA_ERROR_INVALID_PTX",
    300: "CUDA_ERROR_INVALID_SOURCE",
    400: "CUDA_ERROR_INVALID_HANDLE",
    500: "CUDA_ERROR_NOT_FOUND",
    600: "CUDA_ERROR_NOT_READY",
    700: "CUDA_ERROR_ILLEGAL_ADDRESS",
    701: "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
    702: "CUDA_ERROR_LAUNCH_TIMEOUT",
    719: "CUDA_ERROR_LAUNCH_FAILED",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    999: "CUDA_ERROR_UNKNOWN",
}


def result_name(code: int) -> str:
    return CU_RESULTS.get(code) or ("CUDA_SUCCESS" if code == 0 else f"CUDA_ERROR_{code}")

