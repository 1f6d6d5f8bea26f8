"""The probe table: which CUDA functions are probed, how, what their captured arguments mean, and what each call
does (launches, waits, allocates, frees, copies in which direction) — the one place every stage reads that from.

Ids match `enum oc_func` in bpf/otel_cuda.h (tests/unit/test_contract.py checks). The BPF handler of a
function is `entry_<symbol>` / `return_<symbol>`. Argument names say what each slot of `oc_call.args`
holds after the return handler ran (e.g. an allocation's out-pointer slot holds the pointer written).

What a call does is read from here by steps.py (launches open steps, readbacks seal them, waits close them),
metrics.py (launch types, sync kinds, allocations, copy directions), system.py (first launch, allocations and
host-to-device bytes of the model-load window), records.py (bytes moved, copy kind) and the BPF program, which is
compiled with bpf_cflags() (which handler class, byte count slot and element size, memory type, launch type and
copy-direction slot each function has: no second copy of the table in C).

A runtime-layer call (libcudart) does what the driver call under it does; that driver call is flagged nested
(F_NESTED) and left out of every count, so a runtime call counts once, as itself.
"""

from __future__ import annotations

from dataclasses import dataclass

DRIVER = "driver"
RUNTIME = "runtime"

# cudaMemcpyKind -> direction (cudaMemcpyHostToHost and cudaMemcpyDefault: the runtime infers it; "default")
CUDA_MEMCPY_KINDS = {0: "default", 1: "htod", 2: "dtoh", 3: "dtod", 4: "default"}


@dataclass(frozen=True)
class Probe:
    symbol: str
    func_id: int
    group: str  # launch | memory | copy | set | sync | event | names | lifecycle
    args: tuple[str, ...]  # names of oc_call.args slots ("" = unused)
    layer: str = DRIVER
    entry_only: bool = False  # launches: entry only unless --launch-return
    optional: bool = False  # a library may not export it (older drivers): attach with can_fail
    # -- what the call does -------------------------------------------------------------------------------
    launch: str = ""  # kernel | cooperative | graph: it launches work on the device
    memcpy_kind: str = ""  # copies and sets: htod | dtoh | dtod | peer | default | memset; "" with kind_arg
    kind_arg: int = -1  # runtime copies: the slot holding the cudaMemcpyKind, so the direction is per call
    blocking: bool = False  # a copy that returns once done (not stream-ordered): a readback by it is a host wait
    element_size: int = 0  # sets: bytes per element (the call counts elements)
    alloc: bool = False  # allocates memory_type memory
    free: bool = False  # frees memory (its size comes from the allocation the kernel remembered)
    memory_type: str = ""  # device | host | managed (allocations and frees)
    sync_kind: str = ""  # the host blocks until the stream / context / event is done
    records_event: bool = False  # records an event a later wait (on any thread) may name
    stream_wait: bool = False  # enqueues a device-side wait on an event: the host does not block
    out_handle: bool = False  # args[0] is an out pointer the call writes: read at return

    @property
    def copies(self) -> bool:
        return bool(self.memcpy_kind) or self.kind_arg >= 0

    def direction(self, args: tuple) -> str:
        """The direction of this call's copy (htod, dtoh, ...), "" for a call that copies nothing."""
        if self.kind_arg >= 0:
            return CUDA_MEMCPY_KINDS.get(args[self.kind_arg], "default")
        return self.memcpy_kind

    def readback(self, args: tuple) -> bool:
        """A device->host copy: what a step's result (vLLM's sampled tokens) comes back by."""
        return self.direction(args) == "dtoh" if self.copies else False


_COPY = ("dst", "src", "bytes", "stream")
_ALLOC = ("ptr", "bytes", "memory_type", "stream")
_FREE = ("ptr", "bytes", "memory_type", "known", "stream")
_SET = ("dst", "value", "elements", "stream")

PROBES: tuple[Probe, ...] = (
    # launch (struct oc_launch carries their arguments)
    Probe("cuLaunchKernel", 1, "launch", (), entry_only=True, launch="kernel"),
    Probe("cuLaunchKernelEx", 2, "launch", (), entry_only=True, optional=True, launch="kernel"),
    Probe("cuLaunchCooperativeKernel", 3, "launch", (), entry_only=True, optional=True, launch="cooperative"),
    Probe("cuGraphLaunch", 4, "launch", (), entry_only=True, optional=True, launch="graph"),
    # memory
    Probe("cuMemAlloc_v2", 10, "memory", _ALLOC[:3], alloc=True, memory_type="device", out_handle=True),
    Probe("cuMemAllocAsync", 11, "memory", _ALLOC, optional=True, alloc=True, memory_type="device", out_handle=True),
    Probe("cuMemAllocManaged", 12, "memory", _ALLOC[:3] + ("flags",), optional=True, alloc=True,
          memory_type="managed", out_handle=True),
    Probe("cuMemAllocHost_v2", 13, "memory", _ALLOC[:3], alloc=True, memory_type="host", out_handle=True),
    Probe("cuMemHostAlloc", 14, "memory", _ALLOC[:3] + ("flags",), alloc=True, memory_type="host", out_handle=True),
    Probe("cuMemCreate", 15, "memory", ("handle", "bytes", "memory_type", "flags"), optional=True, alloc=True,
          memory_type="device", out_handle=True),
    Probe("cuMemFree_v2", 16, "memory", _FREE[:4], free=True, memory_type="device"),
    Probe("cuMemFreeAsync", 17, "memory", _FREE, optional=True, free=True, memory_type="device"),
    Probe("cuMemFreeHost", 18, "memory", _FREE[:4], free=True, memory_type="host"),
    Probe("cuMemRelease", 19, "memory", ("handle", "bytes", "memory_type", "known"), optional=True, free=True,
          memory_type="device"),
    # copy
    Probe("cuMemcpy", 30, "copy", _COPY[:3], memcpy_kind="default", blocking=True),
    Probe("cuMemcpyAsync", 31, "copy", _COPY, memcpy_kind="default"),
    Probe("cuMemcpyHtoD_v2", 32, "copy", _COPY[:3], memcpy_kind="htod", blocking=True),
    Probe("cuMemcpyDtoH_v2", 33, "copy", _COPY[:3], memcpy_kind="dtoh", blocking=True),
    Probe("cuMemcpyDtoD_v2", 34, "copy", _COPY[:3], memcpy_kind="dtod", blocking=True),
    Probe("cuMemcpyHtoDAsync_v2", 35, "copy", _COPY, memcpy_kind="htod"),
    Probe("cuMemcpyDtoHAsync_v2", 36, "copy", _COPY, memcpy_kind="dtoh"),
    Probe("cuMemcpyDtoDAsync_v2", 37, "copy", _COPY, memcpy_kind="dtod"),
    Probe("cuMemcpyPeer", 38, "copy", _COPY[:3], optional=True, memcpy_kind="peer", blocking=True),
    Probe("cuMemcpyPeerAsync", 39, "copy", _COPY, optional=True, memcpy_kind="peer"),
    # set (bytes = elements x element size, computed in the kernel)
    Probe("cuMemsetD8_v2", 40, "set", _SET[:3], memcpy_kind="memset", element_size=1),
    Probe("cuMemsetD16_v2", 41, "set", _SET[:3], memcpy_kind="memset", element_size=2),
    Probe("cuMemsetD32_v2", 42, "set", _SET[:3], memcpy_kind="memset", element_size=4),
    Probe("cuMemsetD8Async", 43, "set", _SET, memcpy_kind="memset", element_size=1),
    Probe("cuMemsetD16Async", 44, "set", _SET, memcpy_kind="memset", element_size=2),
    Probe("cuMemsetD32Async", 45, "set", _SET, memcpy_kind="memset", element_size=4),
    # sync
    Probe("cuStreamSynchronize", 50, "sync", ("stream",), sync_kind="stream"),
    Probe("cuCtxSynchronize", 51, "sync", (), sync_kind="context"),
    Probe("cuEventSynchronize", 52, "sync", ("", "event"), sync_kind="event"),
    Probe("cuStreamWaitEvent", 53, "sync", ("stream", "event", "flags"), stream_wait=True),
    # not a wait: an event recorded after a step's launches (or its token readback) is what a later
    # cuEventSynchronize on another thread waits for; steps.py closes that step there
    Probe("cuEventRecord", 54, "event", ("stream", "event"), records_event=True),
    Probe("cuEventRecordWithFlags", 55, "event", ("stream", "event", "flags"), optional=True, records_event=True),
    # names
    Probe("cuModuleGetFunction", 60, "names", ()),
    Probe("cuLibraryGetKernel", 61, "names", (), optional=True),
    Probe("cuKernelGetFunction", 62, "names", ("function", "kernel"), optional=True, out_handle=True),
    Probe("cuModuleLoadData", 63, "names", ("handle",), out_handle=True),
    Probe("cuModuleLoadDataEx", 64, "names", ("handle",), optional=True, out_handle=True),
    Probe("cuLibraryLoadData", 65, "names", ("handle",), optional=True, out_handle=True),
    # lifecycle
    Probe("cuInit", 70, "lifecycle", ("", "flags")),
    Probe("cuDevicePrimaryCtxRetain", 71, "lifecycle", ("context", "device"), out_handle=True),
    Probe("cuCtxCreate_v2", 72, "lifecycle", ("context", "flags", "device"), optional=True, out_handle=True),
    # runtime layer (libcudart), off by default. Each does what the (nested) driver call under it does.
    Probe("cudaLaunchKernel", 100, "launch", ("host_stub", "grid_xy", "block_xy", "stream"), layer=RUNTIME,
          optional=True, launch="kernel"),
    Probe("cudaMemcpy", 101, "copy", ("dst", "src", "bytes", "kind"), layer=RUNTIME, optional=True, kind_arg=3,
          blocking=True),
    Probe("cudaMemcpyAsync", 102, "copy", _COPY + ("kind",), layer=RUNTIME, optional=True, kind_arg=4),
    Probe("cudaMalloc", 103, "memory", ("out", "bytes"), layer=RUNTIME, optional=True, alloc=True,
          memory_type="device"),
    Probe("cudaFree", 104, "memory", ("ptr",), layer=RUNTIME, optional=True, free=True, memory_type="device"),
    Probe("cudaStreamSynchronize", 105, "sync", ("stream",), layer=RUNTIME, optional=True, sync_kind="stream"),
    Probe("cudaDeviceSynchronize", 106, "sync", (), layer=RUNTIME, optional=True, sync_kind="context"),
    Probe("cudaGraphLaunch", 107, "launch", ("graph", "stream"), layer=RUNTIME, optional=True, launch="graph"),
)

BY_ID: dict[int, Probe] = {p.func_id: p for p in PROBES}
BY_SYMBOL: dict[str, Probe] = {p.symbol: p for p in PROBES}
DRIVER_PROBES = tuple(p for p in PROBES if p.layer == DRIVER)
RUNTIME_PROBES = tuple(p for p in PROBES if p.layer == RUNTIME)

MEMORY_TYPES = ("device", "host", "managed")  # index = enum oc_mem_type
LAUNCH_TYPES = ("kernel", "cooperative", "graph")  # index + 1 = OC_LAUNCH_<symbol> in the BPF program

# Sets of function ids by role, for the stages' hot paths (membership tests per event).
ALLOCATING = frozenset(p.symbol for p in PROBES if p.alloc)  # symbols (spans.py, replay.py)
LAUNCH_TYPE: dict[int, str] = {p.func_id: p.launch for p in PROBES if p.launch}
KERNEL_LAUNCHES = frozenset(f for f, t in LAUNCH_TYPE.items() if t != "graph")
GRAPH_LAUNCHES = frozenset(f for f, t in LAUNCH_TYPE.items() if t == "graph")
ALLOCS = frozenset(p.func_id for p in PROBES if p.alloc)
SYNC_KIND: dict[int, str] = {p.func_id: p.sync_kind for p in PROBES if p.sync_kind}  # host-blocking waits
RECORDS = frozenset(p.func_id for p in PROBES if p.records_event)
STREAM_WAITS = frozenset(p.func_id for p in PROBES if p.stream_wait)
# copies that can be a readback (device->host): func id -> the cudaMemcpyKind slot, -1 when always one
READBACKS: dict[int, int] = {p.func_id: p.kind_arg for p in PROBES
                             if p.memcpy_kind == "dtoh" or (p.kind_arg >= 0 and p.copies)}


def is_readback(func: int, args: tuple) -> bool:
    """A device->host copy (for a runtime copy: its cudaMemcpyKind says DeviceToHost)."""
    slot = READBACKS.get(func)
    if slot is None:
        return False
    return slot < 0 or args[slot] == 2  # cudaMemcpyDeviceToHost


def moved_bytes(p: Probe, args: tuple) -> int:
    """Bytes a successful copy or set of `p` with captured `args` moved."""
    if not p.copies:
        return 0
    if p.element_size:
        return args[2] * p.element_size
    return args[2]


# ---- the BPF side: compiled with these, so the C has no table of its own --------------------------------------
_CLASS_PLAIN, _CLASS_ALLOC, _CLASS_FREE, _CLASS_OUT_HANDLE = 0, 1, 2, 3  # enum call_class in cuda_probes.bpf.c


def bpf_class(p: Probe) -> int:
    """How the return handler treats the call's arguments. A runtime allocation or free is plain: the live bytes
    and the pointer->size table are kept by the driver call under it (else they would count twice)."""
    if p.layer == DRIVER and p.alloc:
        return _CLASS_ALLOC
    if p.layer == DRIVER and p.free:
        return _CLASS_FREE
    return _CLASS_OUT_HANDLE if p.out_handle else _CLASS_PLAIN


def bpf_cflags() -> list[str]:
    """-D flags that give the BPF program each function's part of this table: OC_CLASS_<symbol> (enum call_class),
    OC_BYTES_<symbol> (the args slot holding the byte or element count, -1: none), OC_SCALE_<symbol> (bytes per
    element), OC_MEM_<symbol> (enum oc_mem_type), OC_LAUNCH_<symbol> (0, or 1 + index in LAUNCH_TYPES) and
    OC_KINDARG_<symbol> (the cudaMemcpyKind slot of a runtime copy, -1: none)."""
    flags = []
    for p in PROBES:
        count = "elements" if p.element_size else "bytes"
        slot = p.args.index(count) if count in p.args and not p.free and (p.alloc or p.copies) else -1
        flags += [
            f"-DOC_CLASS_{p.symbol}={bpf_class(p)}",
            f"-DOC_BYTES_{p.symbol}={slot}",
            f"-DOC_SCALE_{p.symbol}={p.element_size or 1}",
            f"-DOC_MEM_{p.symbol}={MEMORY_TYPES.index(p.memory_type) if p.memory_type else 0}",
            f"-DOC_LAUNCH_{p.symbol}={LAUNCH_TYPES.index(p.launch) + 1 if p.launch else 0}",
            f"-DOC_KINDARG_{p.symbol}={p.kind_arg}",
        ]
    return flags


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

