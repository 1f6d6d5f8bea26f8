/* otel_cuda.h — the kernel <-> user-space contract of otel-cuda.
 *
 * Every record on the ring buffer starts with struct oc_header, whose first byte says which struct follows.
 * Structs are naturally aligned with explicit padding (never packed) so the ctypes mirror in
 * otel_cuda/events.py matches byte for byte; tests/unit/test_contract.py compiles this header and checks
 * every size and offset, and the function ids below against the probe table in otel_cuda/probes.py.
 */
#ifndef OTEL_CUDA_H
#define OTEL_CUDA_H

#define OC_ARGS 6          /* captured arguments per call; their meaning per function is in probes.py */
#define OC_NAME_LEN 256    /* kernel names longer than this are truncated (and flagged) */
#define OC_HIST_BUCKETS 32 /* log2(ns) latency buckets: bucket i counts durations in [2^i, 2^(i+1)) ns */

enum oc_event_type {
    OC_EV_CALL = 1,   /* struct oc_call: any probed call except launches and name-giving calls */
    OC_EV_LAUNCH = 2, /* struct oc_launch: cuLaunchKernel & co, cuGraphLaunch */
    OC_EV_NAME = 3,   /* struct oc_name: cuModuleGetFunction / cuLibraryGetKernel, with the name */
    OC_EV_SYS = 4,    /* struct oc_sys: system events around the GPU work (file I/O, mmap, scheduling) */
    OC_EV_PROC = 5,   /* struct oc_proc: a process exec'd or forked: discovery looks at it at once */
};

enum oc_proc_kind {
    OC_PROC_EXEC = 1, /* h.pid exec'd a new program */
    OC_PROC_FORK = 2, /* h.pid forked child_pid; a traced parent's child is traced from its first instruction */
};

enum oc_layer {
    OC_LAYER_DRIVER = 0,  /* libcuda */
    OC_LAYER_RUNTIME = 1, /* libcudart */
};

/* Slots of the `lost` per-CPU counters: what the kernel side could not keep. */
enum oc_lost {
    OC_LOST_RINGBUF = 0, /* a record the ring buffer refused (full) */
    OC_LOST_TABLE = 1,   /* a kernel table was full: an aggregate, a live allocation, an entry->return pair or a
                            tracked file is missing */
    OC_LOST_SLOTS = 2,
};

enum oc_flags {
    OC_F_RETURN = 1,    /* the return was probed: dur_ns and result are valid */
    OC_F_NESTED = 2,    /* a driver call made inside a probed runtime call on the same thread */
    OC_F_TRUNCATED = 4, /* the record does not hold the whole name (cut at OC_NAME_LEN, or not readable by the
                           probe): user space reads it from name_addr */
    OC_F_NAME_UNREAD = 8, /* the probe could not read the name (or it was empty): oc_name.name is "" */
};

/* Function ids. Append only: ids are archived. probes.py holds the same table with argument names. */
enum oc_func {
    /* launch */
    OC_FN_cuLaunchKernel = 1,
    OC_FN_cuLaunchKernelEx = 2,
    OC_FN_cuLaunchCooperativeKernel = 3,
    OC_FN_cuGraphLaunch = 4,
    /* memory */
    OC_FN_cuMemAlloc_v2 = 10,
    OC_FN_cuMemAllocAsync = 11,
    OC_FN_cuMemAllocManaged = 12,
    OC_FN_cuMemAllocHost_v2 = 13,
    OC_FN_cuMemHostAlloc = 14,
    OC_FN_cuMemCreate = 15,
    OC_FN_cuMemFree_v2 = 16,
    OC_FN_cuMemFreeAsync = 17,
    OC_FN_cuMemFreeHost = 18,
    OC_FN_cuMemRelease = 19,
    /* copy / set */
    OC_FN_cuMemcpy = 30,
    OC_FN_cuMemcpyAsync = 31,
    OC_FN_cuMemcpyHtoD_v2 = 32,
    OC_FN_cuMemcpyDtoH_v2 = 33,
    OC_FN_cuMemcpyDtoD_v2 = 34,
    OC_FN_cuMemcpyHtoDAsync_v2 = 35,
    OC_FN_cuMemcpyDtoHAsync_v2 = 36,
    OC_FN_cuMemcpyDtoDAsync_v2 = 37,
    OC_FN_cuMemcpyPeer = 38,
    OC_FN_cuMemcpyPeerAsync = 39,
    OC_FN_cuMemsetD8_v2 = 40,
    OC_FN_cuMemsetD16_v2 = 41,
    OC_FN_cuMemsetD32_v2 = 42,
    OC_FN_cuMemsetD8Async = 43,
    OC_FN_cuMemsetD16Async = 44,
    OC_FN_cuMemsetD32Async = 45,
    /* sync */
    OC_FN_cuStreamSynchronize = 50,
    OC_FN_cuCtxSynchronize = 51,
    OC_FN_cuEventSynchronize = 52,
    OC_FN_cuStreamWaitEvent = 53,
    OC_FN_cuEventRecord = 54, /* not a sync: tells which step a later event sync waits for */
    OC_FN_cuEventRecordWithFlags = 55,
    /* names */
    OC_FN_cuModuleGetFunction = 60,
    OC_FN_cuLibraryGetKernel = 61,
    OC_FN_cuKernelGetFunction = 62,
    OC_FN_cuModuleLoadData = 63,
    OC_FN_cuModuleLoadDataEx = 64,
    OC_FN_cuLibraryLoadData = 65,
    /* lifecycle */
    OC_FN_cuInit = 70,
    OC_FN_cuDevicePrimaryCtxRetain = 71,
    OC_FN_cuCtxCreate_v2 = 72,
    /* runtime layer (libcudart), optional */
    OC_FN_cudaLaunchKernel = 100,
    OC_FN_cudaMemcpy = 101,
    OC_FN_cudaMemcpyAsync = 102,
    OC_FN_cudaMalloc = 103,
    OC_FN_cudaFree = 104,
    OC_FN_cudaStreamSynchronize = 105,
    OC_FN_cudaDeviceSynchronize = 106,
    OC_FN_cudaGraphLaunch = 107,
    OC_FN_MAX = 128,
};

struct oc_header {
    __u8 type;  /* enum oc_event_type */
    __u8 layer; /* enum oc_layer */
    __u8 flags; /* enum oc_flags */
    __u8 _pad0;
    __u16 func; /* enum oc_func (or enum oc_sys_kind for OC_EV_SYS) */
    __u16 _pad1;
    __u32 pid;   /* thread-group id in the sidecar's pid namespace */
    __u32 tid;   /* thread id in the sidecar's pid namespace */
    __u64 ts_ns; /* entry time, CLOCK_MONOTONIC (bpf_ktime_get_ns) */
};

struct oc_call {
    struct oc_header h;
    __u64 dur_ns;  /* entry to return; 0 without OC_F_RETURN */
    __s32 result;  /* CUresult; -1 without OC_F_RETURN */
    __u32 _pad0;
    __u64 args[OC_ARGS];
};

struct oc_launch {
    struct oc_header h;
    __u64 dur_ns;
    __s32 result;
    __u32 shared_mem; /* dynamic shared memory bytes */
    __u64 handle;     /* CUfunction / CUkernel, or CUgraphExec for cuGraphLaunch */
    __u64 stream;
    __u32 grid[3];
    __u32 block[3];
    __u64 _pad1; /* as long as oc_call: the consumer reads runs of both as one array (otel_cuda/source.py) */
};
_Static_assert(sizeof(struct oc_launch) == sizeof(struct oc_call), "launch and call records must be one size");

struct oc_name {
    struct oc_header h;
    __u64 dur_ns;
    __s32 result;
    __u32 _pad0;
    __u64 handle; /* CUfunction / CUkernel written by the call */
    __u64 parent; /* CUmodule / CUlibrary it came from */
    __u64 name_addr; /* where the name lives in the process: user space reads the rest of a truncated one */
    char name[OC_NAME_LEN];
};

/* System events (bpf/sys_probes.bpf.c): h.func is an enum oc_sys_kind; the meaning of args per kind is in
 * otel_cuda/system.py (SYS_ARGS) and below. Append only: kinds are archived. */
enum oc_sys_kind {
    OC_SYS_OPENAT = 1,      /* args: fd (= result), open flags, enum oc_file_kind, dirfd; path; failed opens too */
    OC_SYS_READ = 2,        /* args: fd, bytes, calls, enum oc_file_kind; path; dur_ns = time inside the calls.
                             * Consecutive reads of one file by one thread are coalesced: ts = the first one's entry */
    OC_SYS_MMAP = 3,        /* args: fd, bytes, enum oc_file_kind, prot | flags << 32; result = address; path */
    OC_SYS_MUNMAP = 4,      /* args: address, bytes, enum oc_file_kind, 0; path (of a file mapping seen mapped) */
    OC_SYS_MLOCK = 5,       /* args: address, bytes, flags (mlock2), 0 */
    OC_SYS_MUNLOCK = 6,     /* args: address, bytes, 0, 0 */
    OC_SYS_DEVICE_OPEN = 7, /* an OC_SYS_OPENAT of /dev/nvidia*: same args */
    OC_SYS_OFFCPU = 8,      /* args: enum oc_offcpu_class, prev_state as the sched_switch tracepoint reports it;
                             * ts = switched out, dur_ns = off CPU until switched back in. Sent for waits of at
                             * least OFFCPU_EVENT_NS, and D-state waits of at least OFFCPU_IO_EVENT_NS (0); all of
                             * them are in sys_offcpu */
    OC_SYS_WRITE = 9,       /* aggregates only (sys_stats): no events */
    OC_SYS_MAX = 16,
};

/* What an opened file is, from its path (classified in the kernel at open). */
enum oc_file_kind {
    OC_FILE_OTHER = 0,
    OC_FILE_WEIGHTS = 1, /* *.safetensors, *.bin, *.gguf, *.pt, *.pth (not in a ...-packages directory) */
    OC_FILE_LIBRARY = 2, /* *.so, *.so.N... */
    OC_FILE_DEVICE = 3,  /* /dev/nvidia* */
    OC_FILE_UNKNOWN = 4, /* a descriptor opened before the process was traced (mmap only) */
    OC_FILE_KINDS = 5,
};

/* Why a thread was off CPU (from sched_switch's prev_state). */
enum oc_offcpu_class {
    OC_OFFCPU_INVOLUNTARY = 0, /* preempted or yielded while runnable */
    OC_OFFCPU_SLEEP = 1,       /* voluntary: interruptible sleep (S) and other states */
    OC_OFFCPU_IO = 2,          /* voluntary: uninterruptible sleep (D): file reads, page faults of mapped files */
};

struct oc_proc {
    struct oc_header h; /* func = enum oc_proc_kind */
    __u32 child_pid;    /* fork: the child (0 when it cannot be named in the sidecar's pid namespace) */
    __u8 selected;      /* fork: the child was selected in the kernel (its parent is traced) */
    __u8 _pad0[3];
};

struct oc_sys {
    struct oc_header h;
    __u64 dur_ns;
    __s64 result;
    __u64 args[4];
    char path[OC_NAME_LEN];
};

/* In-kernel aggregates (read by user space, never cleared by it). */

/* The value of `targets` (pid -> this): being there selects the process; the counts are its entry-only
 * launches, kept here because the launch handler has this entry in hand already (a second map update per launch,
 * in `stats`, cost ~10 % of the handler). Index: func - OC_FN_cuLaunchKernel. A kernel launch also counts in
 * `kernel_launches` (per kernel, ~70 ns of a ~760 ns handler here); these per-function counts are the exact
 * total even when that table is full (the difference is cuda.kernel.name="unrecorded"). */
#define OC_LAUNCH_FUNCS 4 /* OC_FN_cuLaunchKernel .. OC_FN_cuGraphLaunch */
struct oc_target {
    __u64 launches[OC_LAUNCH_FUNCS];
};

struct oc_stat_key {
    __u32 pid;
    __u16 func;
    __u16 variant; /* 0; a runtime copy: 1 + its cudaMemcpyKind, so its bytes are known by direction */
};

struct oc_stat {
    __u64 calls;
    __u64 errors;   /* result != CUDA_SUCCESS */
    __u64 total_ns; /* sum of durations of calls with a probed return */
    __u64 bytes;    /* bytes allocated / copied / set */
    __u64 hist[OC_HIST_BUCKETS];
};

/* Per-kernel launch counts (the `kernel_launches` map, value: __u64 launches): cuda.kernel.launches is read from
 * here, so it stays exact when the ring buffer overflows. Every driver kernel launch counts under its handle, a
 * nested one (under cudaLaunchKernel) too: it carries the CUfunction the name-giving calls named; a runtime launch
 * counts under its host stub only when no driver launch ran under it. Graph launches are not here (no name). */
struct oc_kernel_key {
    __u32 pid;
    __u16 func;   /* the launch function: cuLaunchKernel, cuLaunchKernelEx, cuLaunchCooperativeKernel, cudaLaunchKernel */
    __u16 _pad0;
    __u64 handle; /* CUfunction / CUkernel as launched; cudaLaunchKernel: the host stub */
};

enum oc_launch_type { /* OC_LAUNCH_<function> (cflags from probes.bpf_cflags): what a launch function launches */
    OC_LAUNCH_NONE = 0,
    OC_LAUNCH_KERNEL = 1,
    OC_LAUNCH_COOPERATIVE = 2,
    OC_LAUNCH_GRAPH = 3,
};

enum oc_mem_type {
    OC_MEM_DEVICE = 0,
    OC_MEM_HOST = 1,
    OC_MEM_MANAGED = 2,
};

struct oc_live_key {
    __u32 pid;
    __u32 mem_type; /* enum oc_mem_type */
};

/* System aggregates (sys_stats): per (pid, enum oc_sys_kind, enum oc_file_kind). */
struct oc_sys_key {
    __u32 pid;
    __u16 func; /* enum oc_sys_kind: OPENAT, READ, WRITE, MMAP, MUNMAP */
    __u16 file_kind;
};

struct oc_sys_stat {
    __u64 calls;
    __u64 errors;
    __u64 bytes;
    __u64 ns; /* time inside the calls */
};

/* Off-CPU aggregates (sys_offcpu): per thread and class. */
struct oc_offcpu_key {
    __u32 pid;
    __u32 tid;
    __u32 cls; /* enum oc_offcpu_class */
    __u32 _pad0;
};

struct oc_offcpu {
    __u64 ns;
    __u64 count; /* context switches (counted when the thread is switched back in) */
};

#endif
