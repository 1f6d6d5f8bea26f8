/* cuda_probes.bpf.c — uprobes on the CUDA driver API (BCC dialect).
 *
 * One entry handler per function (argument positions differ) and one return handler per function that
 * shares do_return(). Settings arrive as cflags (-DNAME=value) from otel_cuda/bpf.py:
 *   RINGBUF_PAGES   ring buffer size in pages (power of two)
 *   LAUNCH_RETURN   1 = probe launch returns too (duration + CUresult); default entry only
 *   PIDNS_DEV/INO   the sidecar's pid namespace, so pids match what it sees in /proc
 *   MAX_INFLIGHT    entries in the entry->return stash
 *   MAX_ALLOCS      live allocations tracked for free sizes
 * Events and aggregates are laid out in otel_cuda.h (the contract).
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include "otel_cuda.h"

#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024
#endif
#ifndef LAUNCH_RETURN
#define LAUNCH_RETURN 0
#endif
#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 16384
#endif
#ifndef MAX_ALLOCS
#define MAX_ALLOCS 262144
#endif
#ifndef RINGBUF_WAKE_EVERY
#define RINGBUF_WAKE_EVERY 256 /* a power of two */
#endif
#ifndef RUNTIME_LAYER
#define RUNTIME_LAYER 1
#endif

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* Records submitted per CPU: the consumer is woken once per RINGBUF_WAKE_EVERY of them, not at every record it has
 * caught up with (the kernel's default for flags 0, which a consumer idle on another core always has). A wakeup
 * costs the traced thread an irq_work (a self-IPI) inside the probe, and the consumer a context switch to read a
 * batch of one. Records below the mark are read on the consumer's poll timeout (bpf.py read_batch). */
BPF_PERCPU_ARRAY(ring_submitted, u64, 1);

static __always_inline u64 ring_wake_flags(void)
{
    int zero = 0;
    u64 *n = ring_submitted.lookup(&zero);
    if (!n)
        return BPF_RB_FORCE_WAKEUP;
    *n += 1;
    return (*n & (RINGBUF_WAKE_EVERY - 1)) ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP;
}

/* Processes to trace (key: tgid as the sidecar sees it). Uprobes fire for every process that maps the
 * probed inode, so this filter is what keeps other GPU processes on the node out. */
BPF_HASH(targets, u32, u8, 16384);

/* Events the ring buffer refused, per CPU (summed by user space). */
BPF_PERCPU_ARRAY(lost, u64, 1);

/* Per (pid, function) aggregates: complete even when the ring buffer overflows. Per-CPU so the hot path
 * takes no atomic. */
BPF_PERCPU_HASH(stats, struct oc_stat_key, struct oc_stat, 16384);

/* Live allocation bytes per (pid, memory type); signed per-CPU deltas whose sum is the live total. */
BPF_PERCPU_HASH(live, struct oc_live_key, s64, 4096);

struct alloc_key {
    u32 pid;
    u32 _pad0;
    u64 ptr;
};
struct alloc_val {
    u64 bytes;
    u32 mem_type;
    u32 _pad0;
};
/* ptr -> size, so a free knows how much it releases. */
BPF_HASH(allocs, struct alloc_key, struct alloc_val, MAX_ALLOCS);

struct inflight_key {
    u32 tid;
    u16 func;
    u16 _pad0;
};
struct inflight_val {
    u64 ts_ns;
    u64 args[OC_ARGS];
    u32 grid[3];  /* launches with LAUNCH_RETURN only */
    u32 block[3];
    u32 shared_mem;
    u8 nested;
    u8 _pad0[3];
};
/* Entry -> return stash, keyed by thread and function (a runtime call and the driver call under it
 * are both in flight on one thread). */
BPF_HASH(inflight, struct inflight_key, struct inflight_val, MAX_INFLIGHT);

/* Threads inside a probed runtime (libcudart) call: driver calls under them are marked nested. */
BPF_HASH(in_runtime, u32, u32, 16384);

/* Scratch for building a name event (too large for the 512-byte BPF stack). */
BPF_PERCPU_ARRAY(name_scratch, struct oc_name, 1);

/* ---- identity and filtering ------------------------------------------------------------------- */

static __always_inline int current_ids(u32 *pid, u32 *tid)
{
#ifdef PIDNS_INO
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(PIDNS_DEV, PIDNS_INO, &ns, sizeof(ns)))
        return -1;
    *pid = ns.tgid;
    *tid = ns.pid;
#else
    u64 id = bpf_get_current_pid_tgid();
    *pid = id >> 32;
    *tid = (u32)id;
#endif
    return 0;
}

static __always_inline int traced(u32 *pid, u32 *tid)
{
    if (current_ids(pid, tid))
        return 0;
    return targets.lookup(pid) != 0;
}

static __always_inline void count_lost(void)
{
    int zero = 0;
    u64 *n = lost.lookup(&zero);
    if (n)
        *n += 1;
}

static __always_inline u32 log2_bucket(u64 v)
{
    u32 r = 0;
#pragma unroll
    for (int shift = 16; shift > 0; shift >>= 1) {
        if (v >= (1ULL << shift)) {
            v >>= shift;
            r += shift;
        }
    }
    return r < OC_HIST_BUCKETS ? r : OC_HIST_BUCKETS - 1;
}

static __always_inline void account(u32 pid, u16 func, u64 dur_ns, int has_return, s32 result, u64 bytes)
{
    struct oc_stat_key key = {.pid = pid, .func = func};
    struct oc_stat zero = {};
    struct oc_stat *s = stats.lookup_or_try_init(&key, &zero);
    if (!s)
        return;
    s->calls += 1;
    s->bytes += bytes;
    if (has_return) {
        s->total_ns += dur_ns;
        if (result != 0)
            s->errors += 1;
        u32 b = log2_bucket(dur_ns);
        if (b < OC_HIST_BUCKETS)
            s->hist[b] += 1;
    }
}

static __always_inline void live_add(u32 pid, u32 mem_type, s64 delta)
{
    struct oc_live_key key = {.pid = pid, .mem_type = mem_type};
    s64 zero = 0;
    s64 *v = live.lookup_or_try_init(&key, &zero);
    if (v)
        *v += delta;
}

static __always_inline u8 nested_now(u32 tid)
{
#if RUNTIME_LAYER
    return in_runtime.lookup(&tid) != 0;
#else
    return 0; /* no runtime probes attached: nothing marks a thread, and a lookup per call is saved */
#endif
}

/* Every record starts with this header (the padding is written too: records are read as bytes). */
static __always_inline void fill_header(struct oc_header *h, u8 type, u8 layer, u8 flags, u16 func, u32 pid,
                                        u32 tid, u64 ts)
{
    h->type = type;
    h->layer = layer;
    h->flags = flags;
    h->_pad0 = 0;
    h->func = func;
    h->_pad1 = 0;
    h->pid = pid;
    h->tid = tid;
    h->ts_ns = ts;
}

/* ---- argument access -------------------------------------------------------------------------- */
/* Arguments 7..9 of the launch calls are on the stack on x86-64 (above the return address). */
/* A bpf_probe_read_user costs ~100 ns (a quarter of the launch handler): the launches' three stack arguments are
 * read in one go; ARG8 alone for cudaLaunchKernel's stream. */
struct stack_args {
    u64 a7, a8, a9;
};
#if defined(__x86_64__) || defined(__TARGET_ARCH_x86)
static __always_inline u64 stack_arg(struct pt_regs *ctx, int n)
{
    u64 v = 0;
    bpf_probe_read_user(&v, sizeof(v), (void *)(PT_REGS_SP(ctx) + 8 * (n - 6)));
    return v;
}
static __always_inline struct stack_args stack_args_789(struct pt_regs *ctx)
{
    struct stack_args a = {};
    bpf_probe_read_user(&a, sizeof(a), (void *)(PT_REGS_SP(ctx) + 8));
    return a;
}
#define ARG8(ctx) stack_arg(ctx, 8)
#else /* arm64: eight register arguments, the ninth at sp */
static __always_inline struct stack_args stack_args_789(struct pt_regs *ctx)
{
    struct stack_args a = {.a7 = ctx->regs[6], .a8 = ctx->regs[7]};
    bpf_probe_read_user(&a.a9, sizeof(a.a9), (void *)PT_REGS_SP(ctx));
    return a;
}
#define ARG8(ctx) ((u64)ctx->regs[7])
#endif
#define P1(ctx) ((u64)PT_REGS_PARM1(ctx))
#define P2(ctx) ((u64)PT_REGS_PARM2(ctx))
#define P3(ctx) ((u64)PT_REGS_PARM3(ctx))
#define P4(ctx) ((u64)PT_REGS_PARM4(ctx))
#define P5(ctx) ((u64)PT_REGS_PARM5(ctx))
#define P6(ctx) ((u64)PT_REGS_PARM6(ctx))

static __always_inline u64 read_u64(u64 addr)
{
    u64 v = 0;
    if (addr)
        bpf_probe_read_user(&v, sizeof(v), (void *)addr);
    return v;
}

/* The entry's stash for this return on this thread (NULL: the entry was not traced). `k` is its key, for the
 * caller to delete the stash once it has read it. */
static __always_inline struct inflight_val *stash_of(u16 func, u32 *pid, u32 *tid, struct inflight_key *k)
{
    if (current_ids(pid, tid))
        return 0;
    k->tid = *tid;
    k->func = func;
    k->_pad0 = 0;
    return inflight.lookup(k);
}

/* ---- launches (entry only unless LAUNCH_RETURN) ------------------------------------------------ */

static __always_inline void launch_fill(struct oc_launch *e, u32 pid, u32 tid, u16 func, u64 ts, u64 handle,
                                        u64 stream, u32 gx, u32 gy, u32 gz, u32 bx, u32 by, u32 bz, u32 shmem)
{
    fill_header(&e->h, OC_EV_LAUNCH, OC_LAYER_DRIVER, 0, func, pid, tid, ts);
    e->dur_ns = 0;
    e->result = -1;
    e->shared_mem = shmem;
    e->handle = handle;
    e->stream = stream;
    e->grid[0] = gx;
    e->grid[1] = gy;
    e->grid[2] = gz;
    e->block[0] = bx;
    e->block[1] = by;
    e->block[2] = bz;
}

static __always_inline int launch_entry(struct pt_regs *ctx, u16 func, u64 handle, u64 stream, u32 gx, u32 gy,
                                        u32 gz, u32 bx, u32 by, u32 bz, u32 shmem)
{
    u32 pid, tid;
    if (!traced(&pid, &tid))
        return 0;
    u64 ts = bpf_ktime_get_ns();
    u8 nested = nested_now(tid);
#if LAUNCH_RETURN
    struct inflight_key k = {.tid = tid, .func = func};
    struct inflight_val v = {.ts_ns = ts, .nested = nested};
    v.args[0] = handle;
    v.args[1] = stream;
    v.grid[0] = gx; v.grid[1] = gy; v.grid[2] = gz;
    v.block[0] = bx; v.block[1] = by; v.block[2] = bz;
    v.shared_mem = shmem;
    inflight.update(&k, &v);
#else
    if (!nested)
        account(pid, func, 0, 0, 0, 0);
    struct oc_launch *e = events.ringbuf_reserve(sizeof(struct oc_launch));
    if (!e) {
        count_lost();
        return 0;
    }
    launch_fill(e, pid, tid, func, ts, handle, stream, gx, gy, gz, bx, by, bz, shmem);
    if (nested)
        e->h.flags |= OC_F_NESTED;
    events.ringbuf_submit(e, ring_wake_flags());
#endif
    return 0;
}

static __always_inline int launch_return(struct pt_regs *ctx, u16 func)
{
#if LAUNCH_RETURN
    u32 pid, tid;
    struct inflight_key k;
    struct inflight_val *v = stash_of(func, &pid, &tid, &k);
    if (!v)
        return 0;
    u64 dur = bpf_ktime_get_ns() - v->ts_ns;
    s32 result = (s32)PT_REGS_RC(ctx);
    if (!v->nested)
        account(pid, func, dur, 1, result, 0);
    struct oc_launch *e = events.ringbuf_reserve(sizeof(struct oc_launch));
    if (!e) {
        count_lost();
        inflight.delete(&k);
        return 0;
    }
    launch_fill(e, pid, tid, func, v->ts_ns, v->args[0], v->args[1], v->grid[0], v->grid[1], v->grid[2],
                v->block[0], v->block[1], v->block[2], v->shared_mem);
    e->h.flags = OC_F_RETURN | (v->nested ? OC_F_NESTED : 0);
    e->dur_ns = dur;
    e->result = result;
    events.ringbuf_submit(e, ring_wake_flags());
    inflight.delete(&k);
#endif
    return 0;
}

/* CUresult cuLaunchKernel(CUfunction f, gx, gy, gz, bx, by, bz, sharedMemBytes, hStream, params, extra) */
int entry_cuLaunchKernel(struct pt_regs *ctx)
{
    struct stack_args a = stack_args_789(ctx);
    return launch_entry(ctx, OC_FN_cuLaunchKernel, P1(ctx), a.a9, P2(ctx), P3(ctx), P4(ctx), P5(ctx), P6(ctx), a.a7,
                        a.a8);
}
int return_cuLaunchKernel(struct pt_regs *ctx) { return launch_return(ctx, OC_FN_cuLaunchKernel); }

/* CUresult cuLaunchCooperativeKernel(CUfunction f, gx, gy, gz, bx, by, bz, sharedMemBytes, hStream, params) */
int entry_cuLaunchCooperativeKernel(struct pt_regs *ctx)
{
    struct stack_args a = stack_args_789(ctx);
    return launch_entry(ctx, OC_FN_cuLaunchCooperativeKernel, P1(ctx), a.a9, P2(ctx), P3(ctx), P4(ctx), P5(ctx),
                        P6(ctx), a.a7, a.a8);
}
int return_cuLaunchCooperativeKernel(struct pt_regs *ctx) { return launch_return(ctx, OC_FN_cuLaunchCooperativeKernel); }

/* CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) */
struct launch_config {
    u32 grid[3];
    u32 block[3];
    u32 shared_mem;
    u32 _pad0;
    u64 stream;
};
int entry_cuLaunchKernelEx(struct pt_regs *ctx)
{
    struct launch_config c = {};
    bpf_probe_read_user(&c, sizeof(c), (void *)P1(ctx));
    return launch_entry(ctx, OC_FN_cuLaunchKernelEx, P2(ctx), c.stream, c.grid[0], c.grid[1], c.grid[2],
                        c.block[0], c.block[1], c.block[2], c.shared_mem);
}
int return_cuLaunchKernelEx(struct pt_regs *ctx) { return launch_return(ctx, OC_FN_cuLaunchKernelEx); }

/* CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream) */
int entry_cuGraphLaunch(struct pt_regs *ctx)
{
    return launch_entry(ctx, OC_FN_cuGraphLaunch, P1(ctx), P2(ctx), 0, 0, 0, 0, 0, 0, 0);
}
int return_cuGraphLaunch(struct pt_regs *ctx) { return launch_return(ctx, OC_FN_cuGraphLaunch); }

/* ---- every other call: entry stashes, return emits -------------------------------------------- */

enum call_class {
    CLASS_PLAIN = 0, /* args as captured at entry */
    CLASS_ALLOC,     /* args[0] = out pointer (read at return), args[1] = bytes */
    CLASS_FREE,      /* args[0] = pointer / handle; size found in allocs */
    CLASS_OUT_HANDLE /* args[0] = out pointer to a handle (read at return) */
};

static __always_inline int call_entry(struct pt_regs *ctx, u16 func, u64 a0, u64 a1, u64 a2, u64 a3, u64 a4, u64 a5)
{
    u32 pid, tid;
    if (!traced(&pid, &tid))
        return 0;
    struct inflight_key k = {.tid = tid, .func = func};
    struct inflight_val v = {.ts_ns = bpf_ktime_get_ns(), .nested = nested_now(tid)};
    v.args[0] = a0;
    v.args[1] = a1;
    v.args[2] = a2;
    v.args[3] = a3;
    v.args[4] = a4;
    v.args[5] = a5;
    inflight.update(&k, &v);
    return 0;
}

/* bytes_arg: index of the byte count in args (-1: none); bytes_scale multiplies it (memset element size).
 * mem_type: for allocations. */
static __always_inline int call_return(struct pt_regs *ctx, u16 func, int cls, int bytes_arg, int bytes_scale,
                                       u32 mem_type)
{
    u32 pid, tid;
    struct inflight_key k;
    struct inflight_val *v = stash_of(func, &pid, &tid, &k);
    if (!v)
        return 0;
    u64 dur = bpf_ktime_get_ns() - v->ts_ns;
    s32 result = (s32)PT_REGS_RC(ctx);
    u64 args[OC_ARGS];
#pragma unroll
    for (int i = 0; i < OC_ARGS; i++)
        args[i] = v->args[i];
    u64 ts = v->ts_ns;
    u8 nested = v->nested;
    inflight.delete(&k);

    u64 bytes = 0;
    if (bytes_arg >= 0 && bytes_arg < OC_ARGS)
        bytes = args[bytes_arg] * bytes_scale;

    if (cls == CLASS_ALLOC) {
        /* args[0] becomes the pointer the call wrote; args[2] the memory type */
        args[0] = result == 0 ? read_u64(args[0]) : 0;
        args[2] = mem_type;
        if (result == 0 && args[0]) {
            struct alloc_key ak = {.pid = pid, .ptr = args[0]};
            struct alloc_val av = {.bytes = bytes, .mem_type = mem_type};
            allocs.update(&ak, &av);
            live_add(pid, mem_type, (s64)bytes);
        } else {
            bytes = 0;
        }
    } else if (cls == CLASS_FREE) {
        /* args[1] becomes the size freed (from the matching allocation), args[2] its memory type,
         * args[3] 1 when the allocation was seen */
        struct alloc_key ak = {.pid = pid, .ptr = args[0]};
        struct alloc_val *av = allocs.lookup(&ak);
        args[1] = 0;
        args[2] = mem_type;
        args[3] = 0;
        if (av) {
            args[1] = av->bytes;
            args[2] = av->mem_type;
            args[3] = 1;
            if (result == 0) {
                live_add(pid, av->mem_type, -(s64)av->bytes);
                allocs.delete(&ak);
            }
        }
    } else if (cls == CLASS_OUT_HANDLE) {
        args[0] = result == 0 ? read_u64(args[0]) : 0;
    }

    if (!nested)
        account(pid, func, dur, 1, result, cls == CLASS_FREE ? 0 : bytes);

    struct oc_call *e = events.ringbuf_reserve(sizeof(struct oc_call));
    if (!e) {
        count_lost();
        return 0;
    }
    fill_header(&e->h, OC_EV_CALL, func >= OC_FN_cudaLaunchKernel ? OC_LAYER_RUNTIME : OC_LAYER_DRIVER,
                OC_F_RETURN | (nested ? OC_F_NESTED : 0), func, pid, tid, ts);
    e->dur_ns = dur;
    e->result = result;
    e->_pad0 = 0;
#pragma unroll
    for (int i = 0; i < OC_ARGS; i++)
        e->args[i] = args[i];
    events.ringbuf_submit(e, ring_wake_flags());
    return 0;
}

/* Declares the entry and return handler of one function. */
#define CALL(fn, a0, a1, a2, a3, a4, a5, cls, bytes_arg, scale, mem_type)                                        \
    int entry_##fn(struct pt_regs *ctx) { return call_entry(ctx, OC_FN_##fn, a0, a1, a2, a3, a4, a5); }          \
    int return_##fn(struct pt_regs *ctx) { return call_return(ctx, OC_FN_##fn, cls, bytes_arg, scale, mem_type); }

/* memory: (CUdeviceptr *dptr, size_t bytes, ...) */
CALL(cuMemAlloc_v2, P1(ctx), P2(ctx), 0, 0, 0, 0, CLASS_ALLOC, 1, 1, OC_MEM_DEVICE)
CALL(cuMemAllocAsync, P1(ctx), P2(ctx), 0, P3(ctx), 0, 0, CLASS_ALLOC, 1, 1, OC_MEM_DEVICE)   /* args[3] stream */
CALL(cuMemAllocManaged, P1(ctx), P2(ctx), 0, P3(ctx), 0, 0, CLASS_ALLOC, 1, 1, OC_MEM_MANAGED) /* args[3] flags */
CALL(cuMemAllocHost_v2, P1(ctx), P2(ctx), 0, 0, 0, 0, CLASS_ALLOC, 1, 1, OC_MEM_HOST)
CALL(cuMemHostAlloc, P1(ctx), P2(ctx), 0, P3(ctx), 0, 0, CLASS_ALLOC, 1, 1, OC_MEM_HOST)       /* args[3] flags */
CALL(cuMemCreate, P1(ctx), P2(ctx), 0, P4(ctx), 0, 0, CLASS_ALLOC, 1, 1, OC_MEM_DEVICE)        /* args[3] flags */
CALL(cuMemFree_v2, P1(ctx), 0, 0, 0, 0, 0, CLASS_FREE, -1, 1, OC_MEM_DEVICE)
CALL(cuMemFreeAsync, P1(ctx), 0, 0, 0, P2(ctx), 0, CLASS_FREE, -1, 1, OC_MEM_DEVICE)          /* args[4] stream */
CALL(cuMemFreeHost, P1(ctx), 0, 0, 0, 0, 0, CLASS_FREE, -1, 1, OC_MEM_HOST)
CALL(cuMemRelease, P1(ctx), 0, 0, 0, 0, 0, CLASS_FREE, -1, 1, OC_MEM_DEVICE)

/* copy: args = dst, src, bytes, stream */
CALL(cuMemcpy, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0, CLASS_PLAIN, 2, 1, 0)
CALL(cuMemcpyAsync, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0, CLASS_PLAIN, 2, 1, 0)
CALL(cuMemcpyHtoD_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0, CLASS_PLAIN, 2, 1, 0)
CALL(cuMemcpyDtoH_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0, CLASS_PLAIN, 2, 1, 0)
CALL(cuMemcpyDtoD_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0, CLASS_PLAIN, 2, 1, 0)
CALL(cuMemcpyHtoDAsync_v2, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0, CLASS_PLAIN, 2, 1, 0)
CALL(cuMemcpyDtoHAsync_v2, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0, CLASS_PLAIN, 2, 1, 0)
CALL(cuMemcpyDtoDAsync_v2, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0, CLASS_PLAIN, 2, 1, 0)
/* (dstDevice, dstContext, srcDevice, srcContext, bytes[, stream]) -> dst, src, bytes, stream */
CALL(cuMemcpyPeer, P1(ctx), P3(ctx), P5(ctx), 0, 0, 0, CLASS_PLAIN, 2, 1, 0)
CALL(cuMemcpyPeerAsync, P1(ctx), P3(ctx), P5(ctx), P6(ctx), 0, 0, CLASS_PLAIN, 2, 1, 0)
/* set: (dst, value, N[, stream]) -> dst, value, N, stream; bytes = N * element size */
CALL(cuMemsetD8_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0, CLASS_PLAIN, 2, 1, 0)
CALL(cuMemsetD16_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0, CLASS_PLAIN, 2, 2, 0)
CALL(cuMemsetD32_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0, CLASS_PLAIN, 2, 4, 0)
CALL(cuMemsetD8Async, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0, CLASS_PLAIN, 2, 1, 0)
CALL(cuMemsetD16Async, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0, CLASS_PLAIN, 2, 2, 0)
CALL(cuMemsetD32Async, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0, CLASS_PLAIN, 2, 4, 0)

/* sync: args = stream, event, flags */
CALL(cuStreamSynchronize, P1(ctx), 0, 0, 0, 0, 0, CLASS_PLAIN, -1, 1, 0)
CALL(cuCtxSynchronize, 0, 0, 0, 0, 0, 0, CLASS_PLAIN, -1, 1, 0)
CALL(cuEventSynchronize, 0, P1(ctx), 0, 0, 0, 0, CLASS_PLAIN, -1, 1, 0)
CALL(cuStreamWaitEvent, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0, CLASS_PLAIN, -1, 1, 0)

/* names: cuKernelGetFunction(CUfunction *out, CUkernel k) -> function, kernel */
CALL(cuKernelGetFunction, P1(ctx), P2(ctx), 0, 0, 0, 0, CLASS_OUT_HANDLE, -1, 1, 0)
/* loads: (out handle, image, ...) -> handle */
CALL(cuModuleLoadData, P1(ctx), 0, 0, 0, 0, 0, CLASS_OUT_HANDLE, -1, 1, 0)
CALL(cuModuleLoadDataEx, P1(ctx), 0, 0, 0, 0, 0, CLASS_OUT_HANDLE, -1, 1, 0)
CALL(cuLibraryLoadData, P1(ctx), 0, 0, 0, 0, 0, CLASS_OUT_HANDLE, -1, 1, 0)

/* lifecycle: cuInit(flags) -> flags; cuDevicePrimaryCtxRetain(CUcontext*, dev) -> context, device;
 * cuCtxCreate_v2(CUcontext*, flags, dev) -> context, flags, device */
CALL(cuInit, 0, P1(ctx), 0, 0, 0, 0, CLASS_PLAIN, -1, 1, 0)
CALL(cuDevicePrimaryCtxRetain, P1(ctx), P2(ctx), 0, 0, 0, 0, CLASS_OUT_HANDLE, -1, 1, 0)
CALL(cuCtxCreate_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0, CLASS_OUT_HANDLE, -1, 1, 0)

/* ---- name-giving calls: (out handle, module/library, const char *name) ------------------------- */

static __always_inline int name_return(struct pt_regs *ctx, u16 func)
{
    u32 pid, tid;
    struct inflight_key k;
    struct inflight_val *v = stash_of(func, &pid, &tid, &k);
    if (!v)
        return 0;
    int zero = 0;
    struct oc_name *e = name_scratch.lookup(&zero);
    if (!e) {
        inflight.delete(&k);
        return 0;
    }
    s32 result = (s32)PT_REGS_RC(ctx);
    fill_header(&e->h, OC_EV_NAME, OC_LAYER_DRIVER, OC_F_RETURN | (v->nested ? OC_F_NESTED : 0), func, pid, tid,
                v->ts_ns);
    e->dur_ns = bpf_ktime_get_ns() - v->ts_ns;
    e->result = result;
    e->handle = result == 0 ? read_u64(v->args[0]) : 0;
    e->parent = v->args[1];
    e->name_addr = v->args[2];
    e->name[0] = 0;
    int n = bpf_probe_read_user_str(e->name, OC_NAME_LEN, (void *)v->args[2]);
    if (n == OC_NAME_LEN)
        e->h.flags |= OC_F_TRUNCATED;
    if (!v->nested)
        account(pid, func, e->dur_ns, 1, result, 0);
    inflight.delete(&k);
    if (events.ringbuf_output(e, sizeof(*e), ring_wake_flags()))
        count_lost();
    return 0;
}

int entry_cuModuleGetFunction(struct pt_regs *ctx)
{
    return call_entry(ctx, OC_FN_cuModuleGetFunction, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0);
}
int return_cuModuleGetFunction(struct pt_regs *ctx) { return name_return(ctx, OC_FN_cuModuleGetFunction); }

int entry_cuLibraryGetKernel(struct pt_regs *ctx)
{
    return call_entry(ctx, OC_FN_cuLibraryGetKernel, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0);
}
int return_cuLibraryGetKernel(struct pt_regs *ctx) { return name_return(ctx, OC_FN_cuLibraryGetKernel); }

/* ---- processes: new ones are looked at at once, not at the next /proc scan ----------------------- */
/* A polling discovery would miss the first calls of a process that loads libcuda right after exec (its
 * kernel names with them); the exec event makes user space classify it within a ring-buffer wakeup. */

static __always_inline void proc_event(u16 kind, u32 pid, u32 tid, u32 child, u8 selected)
{
    struct oc_proc *e = events.ringbuf_reserve(sizeof(struct oc_proc));
    if (!e) {
        count_lost();
        return;
    }
    fill_header(&e->h, OC_EV_PROC, 0, 0, kind, pid, tid, bpf_ktime_get_ns());
    e->child_pid = child;
    e->selected = selected;
    e->_pad0[0] = e->_pad0[1] = e->_pad0[2] = 0;
    events.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP); /* rare, and discovery waits on it */
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 pid, tid;
    if (current_ids(&pid, &tid))
        return 0;
    proc_event(OC_PROC_EXEC, pid, tid, 0, 0);
    return 0;
}

/* task_newtask, not sched_process_fork: it carries the clone flags, so new threads (which share the traced
 * tgid already) are told apart from new processes without reading kernel structs, whose layout the headers
 * BCC compiles against may not match. */
#define OC_CLONE_THREAD 0x00010000
TRACEPOINT_PROBE(task, task_newtask)
{
    u32 pid, tid;
    if (args->clone_flags & OC_CLONE_THREAD)
        return 0;
    if (!traced(&pid, &tid))
        return 0;
    u32 child = 0;
    u8 selected = 0;
#ifndef PIDNS_INO
    /* Without a pid namespace of our own the tracepoint's pid is ours too: select the child before it runs. */
    child = args->pid;
    u8 one = 1;
    targets.update(&child, &one);
    selected = 1;
#endif
    proc_event(OC_PROC_FORK, pid, tid, child, selected);
    return 0;
}

/* ---- runtime layer (libcudart), optional ------------------------------------------------------- */
/* A runtime call marks its thread so the driver call it makes is flagged nested and not counted twice. */

static __always_inline int runtime_entry(struct pt_regs *ctx, u16 func, u64 a0, u64 a1, u64 a2, u64 a3)
{
    u32 pid, tid;
    if (!traced(&pid, &tid))
        return 0;
    u32 f = func;
    in_runtime.update(&tid, &f);
    struct inflight_key k = {.tid = tid, .func = func};
    struct inflight_val v = {.ts_ns = bpf_ktime_get_ns()};
    v.args[0] = a0;
    v.args[1] = a1;
    v.args[2] = a2;
    v.args[3] = a3;
    inflight.update(&k, &v);
    return 0;
}

static __always_inline int runtime_return(struct pt_regs *ctx, u16 func, int bytes_arg)
{
    u32 pid, tid;
    if (current_ids(&pid, &tid))
        return 0;
    in_runtime.delete(&tid);
    return call_return(ctx, func, CLASS_PLAIN, bytes_arg, 1, 0);
}

#define RUNTIME(fn, a0, a1, a2, a3, bytes_arg)                                                                    \
    int entry_##fn(struct pt_regs *ctx) { return runtime_entry(ctx, OC_FN_##fn, a0, a1, a2, a3); }               \
    int return_##fn(struct pt_regs *ctx) { return runtime_return(ctx, OC_FN_##fn, bytes_arg); }

/* cudaLaunchKernel(const void *func, dim3 grid, dim3 block, void **args, size_t shmem, cudaStream_t s):
 * dim3 (12 bytes) travels in two registers each, so func, grid.xy, grid.z, block.xy, block.z, args. */
RUNTIME(cudaLaunchKernel, P1(ctx), P2(ctx), P4(ctx), ARG8(ctx), -1)
RUNTIME(cudaMemcpy, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 2)      /* dst, src, count, kind */
RUNTIME(cudaMemcpyAsync, P1(ctx), P2(ctx), P3(ctx), P5(ctx), 2) /* dst, src, count, stream */
RUNTIME(cudaMalloc, P1(ctx), P2(ctx), 0, 0, 1)                  /* out ptr, size */
RUNTIME(cudaFree, P1(ctx), 0, 0, 0, -1)
RUNTIME(cudaStreamSynchronize, P1(ctx), 0, 0, 0, -1)
RUNTIME(cudaDeviceSynchronize, 0, 0, 0, 0, -1)
RUNTIME(cudaGraphLaunch, P1(ctx), P2(ctx), 0, 0, -1)
