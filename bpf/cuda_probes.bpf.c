/* cuda_probes.bpf.c — uprobes on the CUDA driver API (BCC dialect).
 *
 * One entry handler per function (argument positions differ) and one return handler per function that
 * shares do_return(). Settings arrive as cflags (-DNAME=value) from otel_cuda/bpf.py:
 *   RINGBUF_PAGES   ring buffer size in pages (power of two)
 *   LAUNCH_RETURN   1 = probe launch returns too (duration + CUresult); default entry only
 *   PIDNS_DEV/INO   the sidecar's pid namespace, so pids match what it sees in /proc
 *   MAX_ALLOCS      live allocations tracked for free sizes
 *   MAX_KERNELS     (process, launch function, kernel) launch counters
 * and, from the probe table (otel_cuda/probes.py bpf_cflags), what each function does: OC_CLASS_<fn> (enum
 * call_class), OC_BYTES_<fn> / OC_SCALE_<fn> (byte count slot, bytes per element), OC_MEM_<fn> (enum oc_mem_type),
 * OC_LAUNCH_<fn> (enum oc_launch_type), OC_KINDARG_<fn> (a runtime copy's cudaMemcpyKind slot).
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
#ifndef MAX_ALLOCS
#define MAX_ALLOCS 262144
#endif
#ifndef RINGBUF_WAKE_EVERY
#define RINGBUF_WAKE_EVERY 256 /* a power of two */
#endif
#ifndef THREAD_STASH
#define THREAD_STASH 1 /* 0: the entry->return stash in a hash map (kernels without task storage for tracing) */
#endif
#ifndef RUNTIME_LAYER
#define RUNTIME_LAYER 1
#endif
#ifndef MAX_KERNELS
#define MAX_KERNELS 65536
#endif
#ifndef OC_CLASS_cuMemAlloc_v2
#error "compile with otel_cuda.probes.bpf_cflags(): what each function does comes from the probe table"
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

/* Processes to trace (key: tgid as the sidecar sees it), with their entry-only launch counts. Uprobes fire for
 * every process that maps the probed inode, so this filter is what keeps other GPU processes on the node out.
 *
 * The aggregate maps here are shared by all CPUs and updated with atomic adds, and preallocated. Not per-CPU:
 * a per-CPU map holds max_entries x CPUs values (`stats` alone would pin 600 MB on a 128-CPU node, charged to the
 * sidecar's memory limit), and a per-CPU map that is not preallocated gets its values from a small per-CPU cache
 * that a burst of first calls empties: the insert fails and the counts are lost (seen here on a new process). An
 * uncontended atomic add costs a few ns; a (process, function) key is updated by that process's threads only. */
BPF_HASH(targets, u32, struct oc_target, 16384);

/* What the kernel side could not keep, per CPU and enum oc_lost slot (summed by user space). */
BPF_PERCPU_ARRAY(lost, u64, OC_LOST_SLOTS);

/* Per (pid, function) aggregates: complete even when the ring buffer overflows. Entry-only launches are counted
 * in `targets` instead (the launch handler has that entry in hand: no second map update). */
BPF_HASH(stats, struct oc_stat_key, struct oc_stat, 16384);

/* Launches per (pid, launch function, kernel handle): cuda.kernel.launches, exact when the ring buffer overflows
 * (names are mapped in user space at collection). A full table is counted (OC_LOST_TABLE); user space shows what
 * it could not hold as the difference to the per-function counts, under the name `unrecorded`. */
BPF_HASH(kernel_launches, struct oc_kernel_key, u64, MAX_KERNELS);

/* Live allocation bytes per (pid, memory type). */
BPF_HASH(live, struct oc_live_key, s64, 4096);

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

/* Entry -> return stash: what an entry saw, for its return. Thread-local storage, a few slots a thread (a runtime
 * call and the driver call under it are both in flight on one thread), found by function: a hash map keyed by
 * (thread, function) cost an update, a lookup and a delete per call (~45 % of a timed call's handlers). The hash
 * map stays as the fallback: for a thread whose storage the kernel could not create at that moment (creation is
 * refused while another BPF program on the same CPU holds the task-storage lock, e.g. one preempted inside it), and
 * for kernels without task storage in uprobe programs (THREAD_STASH=0). */
#define STASH_SLOTS 4
struct stash_slot {
    u64 ts_ns;
    u64 args[OC_ARGS];
    u32 grid[3]; /* launches with LAUNCH_RETURN only */
    u32 block[3];
    u32 shared_mem;
    u16 func; /* 0: free */
    u8 nested;
    u8 in_map; /* 1: this slot is a stash_map entry */
};
struct stash_key {
    u32 tid; /* the kernel's, not the namespace's: entry and return only need to agree */
    u16 func;
    u16 _pad0;
};
BPF_HASH(stash_map, struct stash_key, struct stash_slot, 16384);
#if THREAD_STASH
struct thread_stash {
    struct stash_slot slot[STASH_SLOTS];
};
BPF_TASK_STORAGE(stashes, struct thread_stash);
#endif

/* Threads inside a probed runtime (libcudart) call: driver calls under them are marked nested. The value is the
 * runtime function, with RT_DRIVER_LAUNCH set once a driver kernel launch ran under it (that launch is counted in
 * kernel_launches with its CUfunction; a runtime launch without one is counted there under its host stub). */
BPF_HASH(in_runtime, u32, u32, 16384);
#define RT_DRIVER_LAUNCH (1U << 16)

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

/* The calling process's entry in `targets`, NULL when it is not traced. */
static __always_inline struct oc_target *target_of(u32 *pid, u32 *tid)
{
    if (current_ids(pid, tid))
        return 0;
    return targets.lookup(pid);
}

static __always_inline int traced(u32 *pid, u32 *tid)
{
    return target_of(pid, tid) != 0;
}

static __always_inline void count_lost_in(int slot)
{
    u64 *n = lost.lookup(&slot);
    if (n)
        *n += 1;
}

/* A record the ring buffer refused. */
static __always_inline void count_lost(void) { count_lost_in(OC_LOST_RINGBUF); }

/* A kernel table was full (or could not allocate): what its entry would have held is missing. */
static __always_inline void count_table_full(void) { count_lost_in(OC_LOST_TABLE); }

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

static __always_inline void account(u32 pid, u16 func, u16 variant, u64 dur_ns, int has_return, s32 result,
                                   u64 bytes)
{
    struct oc_stat_key key = {.pid = pid, .func = func, .variant = variant};
    struct oc_stat zero = {};
    struct oc_stat *s = stats.lookup_or_try_init(&key, &zero);
    if (!s) {
        count_table_full();
        return;
    }
    __sync_fetch_and_add(&s->calls, 1);
    if (bytes)
        __sync_fetch_and_add(&s->bytes, bytes);
    if (has_return) {
        __sync_fetch_and_add(&s->total_ns, dur_ns);
        if (result != 0)
            __sync_fetch_and_add(&s->errors, 1);
        u32 b = log2_bucket(dur_ns);
        if (b < OC_HIST_BUCKETS)
            __sync_fetch_and_add(&s->hist[b], 1);
    }
}

/* One launch of `handle` through `func`. */
static __always_inline void kernel_count(u32 pid, u16 func, u64 handle)
{
    struct oc_kernel_key key = {.pid = pid, .func = func, .handle = handle};
    u64 zero = 0;
    u64 *n = kernel_launches.lookup_or_try_init(&key, &zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        count_table_full();
}

static __always_inline void live_add(u32 pid, u32 mem_type, s64 delta)
{
    struct oc_live_key key = {.pid = pid, .mem_type = mem_type};
    s64 zero = 0;
    s64 *v = live.lookup_or_try_init(&key, &zero);
    if (v)
        __sync_fetch_and_add(v, delta);
    else
        count_table_full();
}

static __always_inline u8 nested_now(u32 tid)
{
#if RUNTIME_LAYER
    return in_runtime.lookup(&tid) != 0;
#else
    return 0; /* no runtime probes attached: nothing marks a thread, and a lookup per call is saved */
#endif
}

/* A kernel launch under a runtime call: that call need not count itself in kernel_launches (only runtime launches
 * reach here, so the driver-only path pays nothing). */
static __always_inline void mark_driver_launch(u32 tid)
{
    u32 *rt = in_runtime.lookup(&tid);
    if (rt)
        *rt |= RT_DRIVER_LAUNCH; /* only this thread touches its entry */
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

static __always_inline struct stash_slot *map_stash_put(u16 func)
{
    struct stash_key k = {.tid = (u32)bpf_get_current_pid_tgid(), .func = func};
    struct stash_slot fresh = {};
    fresh.func = func;
    fresh.in_map = 1;
    if (stash_map.update(&k, &fresh)) { /* full: this call's return is lost */
        count_table_full();
        return 0;
    }
    return stash_map.lookup(&k);
}

static __always_inline struct stash_slot *map_stash_find(u16 func)
{
    struct stash_key k = {.tid = (u32)bpf_get_current_pid_tgid(), .func = func};
    return stash_map.lookup(&k);
}

#if THREAD_STASH
/* A slot of this thread's stash for an entry of `func` to fill: a free one (or one `func` left, whose return never
 * came), else the oldest, whose return is then lost and counted so; a hash-map entry if the thread has no storage
 * and the kernel will not create it now. */
static __always_inline struct stash_slot *stash_put(u16 func)
{
    struct thread_stash *t = stashes.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0,
                                                      BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!t)
        return map_stash_put(func);
    int pick = -1, oldest = 0;
    u64 oldest_ts = ~0ULL;
#pragma unroll
    for (int i = 0; i < STASH_SLOTS; i++) {
        u16 f = t->slot[i].func;
        if (pick < 0 && (f == 0 || f == func))
            pick = i;
        if (t->slot[i].ts_ns < oldest_ts) {
            oldest_ts = t->slot[i].ts_ns;
            oldest = i;
        }
    }
    if (pick < 0) {
        count_table_full(); /* every slot taken: the oldest entry's return is lost */
        pick = oldest;
    }
    if (pick < 0 || pick >= STASH_SLOTS)
        return 0;
    struct stash_slot *v = &t->slot[pick];
    v->func = func;
    v->in_map = 0;
    return v;
}

static __always_inline struct stash_slot *stash_find(u16 func)
{
    struct thread_stash *t = stashes.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0, 0);
    if (t) {
#pragma unroll
        for (int i = 0; i < STASH_SLOTS; i++)
            if (t->slot[i].func == func)
                return &t->slot[i];
    }
    return map_stash_find(func);
}
#else
static __always_inline struct stash_slot *stash_put(u16 func) { return map_stash_put(func); }
static __always_inline struct stash_slot *stash_find(u16 func) { return map_stash_find(func); }
#endif

/* The return has read its stash: the slot is free again (a hash-map entry is deleted: the pointer is invalid
 * afterwards). */
static __always_inline void stash_done(struct stash_slot *v)
{
    if (v->in_map) {
        struct stash_key k = {.tid = (u32)bpf_get_current_pid_tgid(), .func = v->func};
        stash_map.delete(&k);
    } else {
        v->func = 0;
    }
}

/* The entry's stash for this return on this thread (NULL: the entry was not traced). The caller calls stash_done()
 * once it has read it. */
static __always_inline struct stash_slot *stash_of(u16 func, u32 *pid, u32 *tid)
{
    if (current_ids(pid, tid))
        return 0;
    return stash_find(func);
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

/* ltype: OC_LAUNCH_<function> (a constant: launch_entry is inlined per function). */
static __always_inline int launch_entry(struct pt_regs *ctx, u16 func, int ltype, u64 handle, u64 stream, u32 gx,
                                        u32 gy, u32 gz, u32 bx, u32 by, u32 bz, u32 shmem)
{
    u32 pid, tid;
    struct oc_target *target = target_of(&pid, &tid);
    if (!target)
        return 0;
    u64 ts = bpf_ktime_get_ns();
    u8 nested = nested_now(tid);
    int kernel = ltype != OC_LAUNCH_GRAPH;
    if (nested && kernel)
        mark_driver_launch(tid);
#if LAUNCH_RETURN
    struct stash_slot *v = stash_put(func);
    if (!v)
        return 0;
    v->ts_ns = ts;
    v->nested = nested;
    v->args[0] = handle;
    v->args[1] = stream;
    v->grid[0] = gx; v->grid[1] = gy; v->grid[2] = gz;
    v->block[0] = bx; v->block[1] = by; v->block[2] = bz;
    v->shared_mem = shmem;
#else
    u32 slot = func - OC_FN_cuLaunchKernel; /* a constant: launch_entry is inlined per function */
    if (!nested && slot < OC_LAUNCH_FUNCS)
        __sync_fetch_and_add(&target->launches[slot], 1);
    if (kernel)
        kernel_count(pid, func, handle); /* nested too: it names the runtime launch above it */
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

static __always_inline int launch_return(struct pt_regs *ctx, u16 func, int ltype)
{
#if LAUNCH_RETURN
    u32 pid, tid;
    struct stash_slot *v = stash_of(func, &pid, &tid);
    if (!v)
        return 0;
    u64 dur = bpf_ktime_get_ns() - v->ts_ns;
    s32 result = (s32)PT_REGS_RC(ctx);
    if (!v->nested)
        account(pid, func, 0, dur, 1, result, 0);
    if (ltype != OC_LAUNCH_GRAPH)
        kernel_count(pid, func, v->args[0]); /* counted where the call is: at return, as in `stats` */
    struct oc_launch *e = events.ringbuf_reserve(sizeof(struct oc_launch));
    if (!e) {
        count_lost();
        stash_done(v);
        return 0;
    }
    launch_fill(e, pid, tid, func, v->ts_ns, v->args[0], v->args[1], v->grid[0], v->grid[1], v->grid[2],
                v->block[0], v->block[1], v->block[2], v->shared_mem);
    e->h.flags = OC_F_RETURN | (v->nested ? OC_F_NESTED : 0);
    e->dur_ns = dur;
    e->result = result;
    events.ringbuf_submit(e, ring_wake_flags());
    stash_done(v);
#endif
    return 0;
}

/* CUresult cuLaunchKernel(CUfunction f, gx, gy, gz, bx, by, bz, sharedMemBytes, hStream, params, extra) */
int entry_cuLaunchKernel(struct pt_regs *ctx)
{
    struct stack_args a = stack_args_789(ctx);
    return launch_entry(ctx, OC_FN_cuLaunchKernel, OC_LAUNCH_cuLaunchKernel, P1(ctx), a.a9, P2(ctx), P3(ctx), P4(ctx), P5(ctx), P6(ctx), a.a7,
                        a.a8);
}
int return_cuLaunchKernel(struct pt_regs *ctx) { return launch_return(ctx, OC_FN_cuLaunchKernel, OC_LAUNCH_cuLaunchKernel); }

/* CUresult cuLaunchCooperativeKernel(CUfunction f, gx, gy, gz, bx, by, bz, sharedMemBytes, hStream, params) */
int entry_cuLaunchCooperativeKernel(struct pt_regs *ctx)
{
    struct stack_args a = stack_args_789(ctx);
    return launch_entry(ctx, OC_FN_cuLaunchCooperativeKernel, OC_LAUNCH_cuLaunchCooperativeKernel, P1(ctx), a.a9, P2(ctx), P3(ctx), P4(ctx), P5(ctx),
                        P6(ctx), a.a7, a.a8);
}
int return_cuLaunchCooperativeKernel(struct pt_regs *ctx) { return launch_return(ctx, OC_FN_cuLaunchCooperativeKernel, OC_LAUNCH_cuLaunchCooperativeKernel); }

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
    return launch_entry(ctx, OC_FN_cuLaunchKernelEx, OC_LAUNCH_cuLaunchKernelEx, P2(ctx), c.stream, c.grid[0], c.grid[1], c.grid[2],
                        c.block[0], c.block[1], c.block[2], c.shared_mem);
}
int return_cuLaunchKernelEx(struct pt_regs *ctx) { return launch_return(ctx, OC_FN_cuLaunchKernelEx, OC_LAUNCH_cuLaunchKernelEx); }

/* CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream) */
int entry_cuGraphLaunch(struct pt_regs *ctx)
{
    return launch_entry(ctx, OC_FN_cuGraphLaunch, OC_LAUNCH_cuGraphLaunch, P1(ctx), P2(ctx), 0, 0, 0, 0, 0, 0, 0);
}
int return_cuGraphLaunch(struct pt_regs *ctx) { return launch_return(ctx, OC_FN_cuGraphLaunch, OC_LAUNCH_cuGraphLaunch); }

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
    struct stash_slot *v = stash_put(func);
    if (!v)
        return 0;
    v->ts_ns = bpf_ktime_get_ns();
    v->nested = nested_now(tid);
    v->args[0] = a0;
    v->args[1] = a1;
    v->args[2] = a2;
    v->args[3] = a3;
    v->args[4] = a4;
    v->args[5] = a5;
    return 0;
}

/* bytes_arg: index of the byte count in args (-1: none); bytes_scale multiplies it (memset element size).
 * mem_type: for allocations. kind_arg: a runtime copy's cudaMemcpyKind slot (-1: none): its aggregate is kept per
 * direction. kernel_launch: a runtime launch with no driver launch under it: count it in kernel_launches. */
static __always_inline int call_return(struct pt_regs *ctx, u16 func, int cls, int bytes_arg, int bytes_scale,
                                       u32 mem_type, int kind_arg, int kernel_launch)
{
    u32 pid, tid;
    struct stash_slot *v = stash_of(func, &pid, &tid);
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
    stash_done(v);

    u64 bytes = 0;
    if (bytes_arg >= 0 && bytes_arg < OC_ARGS && result == 0) /* a failed call moved or allocated nothing */
        bytes = args[bytes_arg] * bytes_scale;
    u16 variant = 0;
    if (kind_arg >= 0 && kind_arg < OC_ARGS)
        variant = 1 + (args[kind_arg] < 7 ? (u16)args[kind_arg] : 7);
    if (kernel_launch)
        kernel_count(pid, func, args[0]);

    if (cls == CLASS_ALLOC) {
        /* args[0] becomes the pointer the call wrote; args[2] the memory type */
        args[0] = result == 0 ? read_u64(args[0]) : 0;
        args[2] = mem_type;
        if (result == 0 && args[0]) {
            struct alloc_key ak = {.pid = pid, .ptr = args[0]};
            struct alloc_val av = {.bytes = bytes, .mem_type = mem_type};
            if (allocs.update(&ak, &av)) /* full: left out of the live total, which its free could not undo */
                count_table_full();
            else
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
        account(pid, func, variant, dur, 1, result, cls == CLASS_FREE ? 0 : bytes);

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

/* Declares the entry and return handler of one function: which argument goes to which slot is said here; what the
 * call does (class, byte count slot, element size, memory type) comes from the probe table. */
#define CALL(fn, a0, a1, a2, a3, a4, a5)                                                                         \
    int entry_##fn(struct pt_regs *ctx) { return call_entry(ctx, OC_FN_##fn, a0, a1, a2, a3, a4, a5); }          \
    int return_##fn(struct pt_regs *ctx)                                                                         \
    {                                                                                                            \
        return call_return(ctx, OC_FN_##fn, OC_CLASS_##fn, OC_BYTES_##fn, OC_SCALE_##fn, OC_MEM_##fn, -1, 0);     \
    }

/* memory: (CUdeviceptr *dptr, size_t bytes, ...) */
CALL(cuMemAlloc_v2, P1(ctx), P2(ctx), 0, 0, 0, 0)
CALL(cuMemAllocAsync, P1(ctx), P2(ctx), 0, P3(ctx), 0, 0) /* args[3] stream */
CALL(cuMemAllocManaged, P1(ctx), P2(ctx), 0, P3(ctx), 0, 0) /* args[3] flags */
CALL(cuMemAllocHost_v2, P1(ctx), P2(ctx), 0, 0, 0, 0)
CALL(cuMemHostAlloc, P1(ctx), P2(ctx), 0, P3(ctx), 0, 0) /* args[3] flags */
CALL(cuMemCreate, P1(ctx), P2(ctx), 0, P4(ctx), 0, 0) /* args[3] flags */
CALL(cuMemFree_v2, P1(ctx), 0, 0, 0, 0, 0)
CALL(cuMemFreeAsync, P1(ctx), 0, 0, 0, P2(ctx), 0) /* args[4] stream */
CALL(cuMemFreeHost, P1(ctx), 0, 0, 0, 0, 0)
CALL(cuMemRelease, P1(ctx), 0, 0, 0, 0, 0)

/* copy: args = dst, src, bytes, stream */
CALL(cuMemcpy, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0)
CALL(cuMemcpyAsync, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0)
CALL(cuMemcpyHtoD_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0)
CALL(cuMemcpyDtoH_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0)
CALL(cuMemcpyDtoD_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0)
CALL(cuMemcpyHtoDAsync_v2, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0)
CALL(cuMemcpyDtoHAsync_v2, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0)
CALL(cuMemcpyDtoDAsync_v2, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0)
/* (dstDevice, dstContext, srcDevice, srcContext, bytes[, stream]) -> dst, src, bytes, stream */
CALL(cuMemcpyPeer, P1(ctx), P3(ctx), P5(ctx), 0, 0, 0)
CALL(cuMemcpyPeerAsync, P1(ctx), P3(ctx), P5(ctx), P6(ctx), 0, 0)
/* set: (dst, value, N[, stream]) -> dst, value, N, stream; bytes = N * element size */
CALL(cuMemsetD8_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0)
CALL(cuMemsetD16_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0)
CALL(cuMemsetD32_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0)
CALL(cuMemsetD8Async, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0)
CALL(cuMemsetD16Async, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0)
CALL(cuMemsetD32Async, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0, 0)

/* sync: args = stream, event, flags */
CALL(cuStreamSynchronize, P1(ctx), 0, 0, 0, 0, 0)
CALL(cuCtxSynchronize, 0, 0, 0, 0, 0, 0)
CALL(cuEventSynchronize, 0, P1(ctx), 0, 0, 0, 0)
CALL(cuStreamWaitEvent, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0)
/* (hEvent, hStream[, flags]) -> stream, event, flags: which step a later cuEventSynchronize waits for */
CALL(cuEventRecord, P2(ctx), P1(ctx), 0, 0, 0, 0)
CALL(cuEventRecordWithFlags, P2(ctx), P1(ctx), P3(ctx), 0, 0, 0)

/* names: cuKernelGetFunction(CUfunction *out, CUkernel k) -> function, kernel */
CALL(cuKernelGetFunction, P1(ctx), P2(ctx), 0, 0, 0, 0)
/* loads: (out handle, image, ...) -> handle */
CALL(cuModuleLoadData, P1(ctx), 0, 0, 0, 0, 0)
CALL(cuModuleLoadDataEx, P1(ctx), 0, 0, 0, 0, 0)
CALL(cuLibraryLoadData, P1(ctx), 0, 0, 0, 0, 0)

/* lifecycle: cuInit(flags) -> flags; cuDevicePrimaryCtxRetain(CUcontext*, dev) -> context, device;
 * cuCtxCreate_v2(CUcontext*, flags, dev) -> context, flags, device */
CALL(cuInit, 0, P1(ctx), 0, 0, 0, 0)
CALL(cuDevicePrimaryCtxRetain, P1(ctx), P2(ctx), 0, 0, 0, 0)
CALL(cuCtxCreate_v2, P1(ctx), P2(ctx), P3(ctx), 0, 0, 0)

/* ---- name-giving calls: (out handle, module/library, const char *name) ------------------------- */

static __always_inline int name_return(struct pt_regs *ctx, u16 func)
{
    u32 pid, tid;
    struct stash_slot *v = stash_of(func, &pid, &tid);
    if (!v)
        return 0;
    s32 result = (s32)PT_REGS_RC(ctx);
    u64 ts = v->ts_ns, dur = bpf_ktime_get_ns() - v->ts_ns, out = v->args[0], parent = v->args[1];
    u64 name_addr = v->args[2];
    u8 nested = v->nested;
    stash_done(v);
    if (!nested)
        account(pid, func, 0, dur, 1, result, 0);
    /* Built in the ring buffer itself: a per-CPU scratch could be overwritten by another thread's probe while this
     * one is preempted (uprobe programs run preemptible, migration disabled). */
    struct oc_name *e = events.ringbuf_reserve(sizeof(struct oc_name));
    if (!e) {
        count_lost();
        return 0;
    }
    fill_header(&e->h, OC_EV_NAME, OC_LAYER_DRIVER, OC_F_RETURN | (nested ? OC_F_NESTED : 0), func, pid, tid, ts);
    e->dur_ns = dur;
    e->result = result;
    e->_pad0 = 0;
    e->handle = result == 0 ? read_u64(out) : 0;
    e->parent = parent;
    e->name_addr = name_addr;
    long n = bpf_probe_read_user_str(e->name, OC_NAME_LEN, (void *)name_addr);
    if (n <= 1) {
        /* Unreadable here (a page not present: a probe cannot fault it in) or empty: no name, never "". User space
         * reads it from name_addr; a handle it cannot name stays unknown. */
        e->name[0] = 0;
        if (result == 0)
            e->h.flags |= OC_F_NAME_UNREAD | OC_F_TRUNCATED;
    } else if (n == OC_NAME_LEN) {
        e->h.flags |= OC_F_TRUNCATED;
    }
    /* Wake the consumer now, not at the RINGBUF_WAKE_EVERY mark: a name cut at OC_NAME_LEN is completed from the
     * process's memory, which must still be there when the record is read (a short-lived process could be gone
     * by the next poll timeout). Name-giving calls are a few per kernel, at load time. */
    events.ringbuf_submit(e, BPF_RB_FORCE_WAKEUP);
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
    struct oc_target fresh = {};
    selected = targets.update(&child, &fresh) == 0; /* else (full) the sidecar selects it when it reads the event */
#endif
    proc_event(OC_PROC_FORK, pid, tid, child, selected);
    return 0;
}

/* ---- runtime layer (libcudart), optional ------------------------------------------------------- */
/* A runtime call marks its thread so the driver call it makes is flagged nested and not counted twice. */

static __always_inline int runtime_entry(struct pt_regs *ctx, u16 func, u64 a0, u64 a1, u64 a2, u64 a3, u64 a4)
{
    u32 pid, tid;
    if (!traced(&pid, &tid))
        return 0;
    u32 f = func;
    in_runtime.update(&tid, &f);
    struct stash_slot *v = stash_put(func);
    if (!v)
        return 0;
    v->ts_ns = bpf_ktime_get_ns();
    v->nested = 0;
    v->args[0] = a0;
    v->args[1] = a1;
    v->args[2] = a2;
    v->args[3] = a3;
    v->args[4] = a4;
    v->args[5] = 0;
    return 0;
}

/* ltype: OC_LAUNCH_<function>; kind_arg: OC_KINDARG_<function> (both constants from the probe table). */
static __always_inline int runtime_return(struct pt_regs *ctx, u16 func, int bytes_arg, int ltype, int kind_arg)
{
    u32 pid, tid;
    if (current_ids(&pid, &tid))
        return 0;
    u32 mark = 0;
    u32 *rt = in_runtime.lookup(&tid);
    if (rt) {
        mark = *rt;
        in_runtime.delete(&tid);
    }
    int kernel_launch = (ltype == OC_LAUNCH_KERNEL || ltype == OC_LAUNCH_COOPERATIVE) && !(mark & RT_DRIVER_LAUNCH);
    return call_return(ctx, func, CLASS_PLAIN, bytes_arg, 1, 0, kind_arg, kernel_launch);
}

#define RUNTIME(fn, a0, a1, a2, a3, a4)                                                                           \
    int entry_##fn(struct pt_regs *ctx) { return runtime_entry(ctx, OC_FN_##fn, a0, a1, a2, a3, a4); }           \
    int return_##fn(struct pt_regs *ctx)                                                                         \
    {                                                                                                            \
        return runtime_return(ctx, OC_FN_##fn, OC_BYTES_##fn, OC_LAUNCH_##fn, OC_KINDARG_##fn);                  \
    }

/* cudaLaunchKernel(const void *func, dim3 grid, dim3 block, void **args, size_t shmem, cudaStream_t s):
 * dim3 (12 bytes) travels in two registers each, so func, grid.xy, grid.z, block.xy, block.z, args. */
RUNTIME(cudaLaunchKernel, P1(ctx), P2(ctx), P4(ctx), ARG8(ctx), 0)
RUNTIME(cudaMemcpy, P1(ctx), P2(ctx), P3(ctx), P4(ctx), 0)            /* dst, src, count, kind */
RUNTIME(cudaMemcpyAsync, P1(ctx), P2(ctx), P3(ctx), P5(ctx), P4(ctx)) /* dst, src, count, stream, kind */
RUNTIME(cudaMalloc, P1(ctx), P2(ctx), 0, 0, 0)                        /* out ptr, size */
RUNTIME(cudaFree, P1(ctx), 0, 0, 0, 0)
RUNTIME(cudaStreamSynchronize, P1(ctx), 0, 0, 0, 0)
RUNTIME(cudaDeviceSynchronize, 0, 0, 0, 0, 0)
RUNTIME(cudaGraphLaunch, P1(ctx), P2(ctx), 0, 0, 0)
