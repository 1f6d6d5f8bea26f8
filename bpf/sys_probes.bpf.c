/* sys_probes.bpf.c — the system view around the GPU work: file opens, reads, mmaps, mlocks, /dev/nvidia* opens
 * and off-CPU time of the traced processes (BCC dialect, syscall and sched tracepoints).
 *
 * Compiled after cuda_probes.bpf.c into the same program (BpfConfig.extra_sources), so it shares `targets`,
 * traced()/current_ids(), the `events` ring buffer, count_lost() and count_table_full(). Every handler filters in
 * the kernel: an
 * untraced process costs one pid lookup per syscall of the probed kinds, and two hash lookups per context switch.
 *
 * Aggregates (complete even when the ring buffer overflows) are in sys_stats (calls, errors, bytes, time per
 * pid + kind + file kind) and sys_offcpu (off-CPU ns and switches per thread and class). Ring-buffer events
 * (struct oc_sys, enum oc_sys_kind in h.func) only for opens, mmaps/munmaps of files, mlocks, reads (coalesced
 * per thread and file) and off-CPU waits in D state or longer than OFFCPU_EVENT_NS.
 *
 * Settings (cflags):
 *   SYS_COALESCE_NS  reads of one file by one thread within this time of the first become one event (10 ms)
 *   OFFCPU_EVENT_NS  off-CPU waits at least this long are sent as events (1 ms); shorter ones only aggregate
 *   OFFCPU_IO_EVENT_NS  waits in D state (I/O) at least this long are sent too (0: all, so that the model-load
 *                    window's I/O wait is complete; raise it for a page-faulting loader of a huge mmap'd model)
 *   SYS_MAX_FDS      tracked open files and file mappings (65536 each, allocated as used)
 */

#ifndef SYS_COALESCE_NS
#define SYS_COALESCE_NS 10000000ULL
#endif
#ifndef OFFCPU_EVENT_NS
#define OFFCPU_EVENT_NS 1000000ULL
#endif
#ifndef OFFCPU_IO_EVENT_NS
#define OFFCPU_IO_EVENT_NS 0ULL
#endif
#ifndef SYS_MAX_FDS
#define SYS_MAX_FDS 65536
#endif

#define SYS_MAP_ANONYMOUS 0x20
/* sched_switch's prev_state (include/trace/events/sched.h): 0 = runnable, TASK_REPORT_MAX = preempted,
 * else 1 << (task state index - 1): S 0x1, D 0x2, T 0x4, t 0x8, X 0x10, Z 0x20, P 0x40, I 0x80. */
#define SYS_TASK_UNINTERRUPTIBLE 0x2
#define SYS_TASK_EXITING 0x30
#define SYS_TASK_REPORT_MAX 0x100

/* ---- maps ------------------------------------------------------------------------------------- */

struct sys_fd_key {
    u32 pid;
    u32 fd;
};
struct sys_map_key {
    u32 pid;
    u32 _pad0;
    u64 addr;
};
/* An open file (sys_fds) or a file mapping (sys_maps, with its length). */
struct sys_file {
    u64 len;
    u32 kind; /* enum oc_file_kind */
    u32 _pad0;
    char path[OC_NAME_LEN];
};
BPF_F_TABLE("hash", struct sys_fd_key, struct sys_file, sys_fds, SYS_MAX_FDS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct sys_map_key, struct sys_file, sys_maps, SYS_MAX_FDS, BPF_F_NO_PREALLOC);
/* Building a sys_file: too large for the 512-byte stack. */
BPF_PERCPU_ARRAY(sys_scratch, struct sys_file, 1);

/* A syscall between its entry and exit tracepoints, per thread (kernel tid: one syscall at a time). */
struct sys_call {
    u64 ts;
    u64 a[4];
    u32 pid; /* as the sidecar sees them */
    u32 tid;
    u32 func; /* enum oc_sys_kind */
    u32 kind; /* enum oc_file_kind */
};
BPF_TABLE("lru_hash", u32, struct sys_call, sys_inflight, 16384);

/* Reads being coalesced, per thread (kernel tid). */
struct sys_pending {
    u64 ts;    /* entry of the first read */
    u64 dur;   /* time inside the reads */
    u64 bytes;
    u64 calls;
    u32 pid;
    u32 tid;
    u32 fd;
    u32 kind;
};
BPF_TABLE("lru_hash", u32, struct sys_pending, sys_pending, 16384);

BPF_HASH(sys_stats, struct oc_sys_key, struct oc_sys_stat, 16384); /* shared, atomic adds: see `targets` */

/* Threads of traced processes now off CPU (kernel tid -> since when, why). */
struct sys_offcpu_start {
    u64 ts;
    u32 pid;
    u32 tid;
    u32 cls;   /* enum oc_offcpu_class */
    u32 state; /* prev_state as reported */
};
BPF_TABLE("lru_hash", u32, struct sys_offcpu_start, sys_offcpu_start, 65536);
BPF_HASH(sys_offcpu, struct oc_offcpu_key, struct oc_offcpu, 65536);

/* ---- helpers ---------------------------------------------------------------------------------- */

static __always_inline u32 sys_gtid(void)
{
    return (u32)bpf_get_current_pid_tgid(); /* the kernel's tid: a key that needs no namespace translation */
}

static __always_inline void sys_stat_add(u32 pid, u16 func, u16 kind, int err, u64 bytes, u64 ns)
{
    struct oc_sys_key k = {.pid = pid, .func = func, .file_kind = kind};
    struct oc_sys_stat zero = {};
    struct oc_sys_stat *s = sys_stats.lookup_or_try_init(&k, &zero);
    if (!s) {
        count_table_full();
        return;
    }
    __sync_fetch_and_add(&s->calls, 1);
    if (err)
        __sync_fetch_and_add(&s->errors, 1);
    if (bytes)
        __sync_fetch_and_add(&s->bytes, bytes);
    __sync_fetch_and_add(&s->ns, ns);
}

/* path: kernel memory (a map value) or 0 for none. */
static __always_inline void sys_emit(u16 func, u32 pid, u32 tid, u64 ts, u64 dur, s64 result, u64 a0, u64 a1,
                                     u64 a2, u64 a3, const char *path)
{
    struct oc_sys *e = events.ringbuf_reserve(sizeof(struct oc_sys));
    if (!e) {
        count_lost();
        return;
    }
    e->h.type = OC_EV_SYS;
    e->h.layer = 0;
    e->h.flags = OC_F_RETURN;
    e->h._pad0 = 0;
    e->h.func = func;
    e->h._pad1 = 0;
    e->h.pid = pid;
    e->h.tid = tid;
    e->h.ts_ns = ts;
    e->dur_ns = dur;
    e->result = result;
    e->args[0] = a0;
    e->args[1] = a1;
    e->args[2] = a2;
    e->args[3] = a3;
    /* a failed read (path 0) zero-fills the destination */
    bpf_probe_read_kernel(e->path, OC_NAME_LEN, path);
    events.ringbuf_submit(e, ring_wake_flags());
}

static __always_inline void sys_flush(u32 gtid, struct sys_pending *p)
{
    struct sys_pending c = *p;
    sys_pending.delete(&gtid);
    struct sys_fd_key k = {.pid = c.pid, .fd = c.fd};
    struct sys_file *f = sys_fds.lookup(&k);
    sys_emit(OC_SYS_READ, c.pid, c.tid, c.ts, c.dur, 0, c.fd, c.bytes, c.calls, c.kind, f ? f->path : 0);
}

/* Any other system event of the thread ends its coalesced read first (events stay in order per thread). */
static __always_inline void sys_flush_thread(u32 gtid)
{
    struct sys_pending *p = sys_pending.lookup(&gtid);
    if (p)
        sys_flush(gtid, p);
}

/* p[i] for a variable i: the mask is applied in BPF itself (asm) because clang drops a mask it proves redundant,
 * and the verifier, which tracks less than clang knows, then rejects the access. */
_Static_assert(OC_NAME_LEN == 256, "sys_at masks with 255");
static __always_inline char sys_at(const char *p, int i)
{
    u64 idx = (u32)i;
    asm volatile("%0 &= 255" : "+r"(idx));
    return p[idx];
}
#define SYS_AT(p, i) sys_at((p), (i))

static __always_inline int sys_ends_with(const char *p, int len, const char *s, int slen)
{
    if (len < slen)
        return 0;
#pragma unroll
    for (int i = 0; i < 12; i++) {
        if (i >= slen)
            break;
        if (SYS_AT(p, len - slen + i) != s[i])
            return 0;
    }
    return 1;
}

/* A shared library: the last 24 characters hold ".so" at the end or followed by "." (libcuda.so.580.95.05). */
static __always_inline int sys_is_library(const char *p, int len)
{
#pragma unroll
    for (int i = 0; i < 24; i++) {
        int at = len - 3 - i;
        if (at < 0)
            break;
        if (SYS_AT(p, at + 2) == '/')
            break;
        if (SYS_AT(p, at) == '.' && SYS_AT(p, at + 1) == 's' && SYS_AT(p, at + 2) == 'o' &&
            (i == 0 || SYS_AT(p, at + 3) == '.'))
            return 1;
    }
    return 0;
}

/* Python's site-packages/NAME.pth files are path configuration, read by every interpreter at start, not PyTorch
 * checkpoints: the last path component's directory ends in "-packages". */
static __always_inline int sys_in_site_packages(const char *p, int len)
{
#pragma unroll
    for (int i = 1; i < 64; i++) {
        int at = len - 1 - i;
        if (at < 9)
            break;
        if (SYS_AT(p, at) == '/')
            return SYS_AT(p, at - 9) == '-' && SYS_AT(p, at - 8) == 'p' && SYS_AT(p, at - 7) == 'a' &&
                   SYS_AT(p, at - 6) == 'c' && SYS_AT(p, at - 5) == 'k' && SYS_AT(p, at - 4) == 'a' &&
                   SYS_AT(p, at - 3) == 'g' && SYS_AT(p, at - 2) == 'e' && SYS_AT(p, at - 1) == 's';
    }
    return 0;
}

/* n: what bpf_probe_read_user_str returned (length with the NUL, or < 0). */
static __always_inline u32 sys_file_kind(const char *p, int n)
{
    if (n <= 1)
        return OC_FILE_OTHER;
    int len = n - 1;
    if (len > OC_NAME_LEN - 1)
        len = OC_NAME_LEN - 1;
    if (len >= 11 && p[0] == '/' && p[1] == 'd' && p[2] == 'e' && p[3] == 'v' && p[4] == '/' && p[5] == 'n' &&
        p[6] == 'v' && p[7] == 'i' && p[8] == 'd' && p[9] == 'i' && p[10] == 'a')
        return OC_FILE_DEVICE;
    if (sys_ends_with(p, len, ".safetensors", 12) || sys_ends_with(p, len, ".bin", 4) ||
        sys_ends_with(p, len, ".gguf", 5) || sys_ends_with(p, len, ".pt", 3))
        return OC_FILE_WEIGHTS;
    if (sys_ends_with(p, len, ".pth", 4))
        return sys_in_site_packages(p, len) ? OC_FILE_OTHER : OC_FILE_WEIGHTS;
    if (sys_is_library(p, len))
        return OC_FILE_LIBRARY;
    return OC_FILE_OTHER;
}

static __always_inline int sys_enter(u32 func, u32 kind, u64 a0, u64 a1, u64 a2, u64 a3)
{
    u32 pid, tid;
    if (!traced(&pid, &tid))
        return 0;
    struct sys_call c = {.ts = bpf_ktime_get_ns(), .pid = pid, .tid = tid, .func = func, .kind = kind};
    c.a[0] = a0;
    c.a[1] = a1;
    c.a[2] = a2;
    c.a[3] = a3;
    u32 gtid = sys_gtid();
    sys_inflight.update(&gtid, &c);
    return 0;
}

/* Takes the thread's in-flight call of kind `func` into *out; 0 when there is none. */
static __always_inline int sys_take(u32 gtid, u32 func, struct sys_call *out)
{
    struct sys_call *c = sys_inflight.lookup(&gtid);
    if (!c)
        return 0;
    *out = *c;
    sys_inflight.delete(&gtid);
    return out->func == func;
}

/* ---- open / close ----------------------------------------------------------------------------- */

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    return sys_enter(OC_SYS_OPENAT, 0, (u64)args->filename, (u64)args->flags, (u64)args->dfd, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
    u32 gtid = sys_gtid();
    struct sys_call c;
    if (!sys_take(gtid, OC_SYS_OPENAT, &c))
        return 0;
    u64 now = bpf_ktime_get_ns();
    s64 ret = args->ret;
    int zero = 0;
    struct sys_file *f = sys_scratch.lookup(&zero);
    if (!f)
        return 0;
    sys_flush_thread(gtid);
    int n = bpf_probe_read_user_str(f->path, OC_NAME_LEN, (void *)c.a[0]);
    if (n < 0)
        f->path[0] = 0;
    u32 kind = sys_file_kind(f->path, n);
    f->kind = kind;
    f->len = 0;
    sys_stat_add(c.pid, OC_SYS_OPENAT, kind, ret < 0, 0, now - c.ts);
    if (ret >= 0) {
        struct sys_fd_key k = {.pid = c.pid, .fd = (u32)ret};
        if (sys_fds.update(&k, f)) /* full: this file's reads and mmaps go untracked */
            count_table_full();
    }
    sys_emit(kind == OC_FILE_DEVICE ? OC_SYS_DEVICE_OPEN : OC_SYS_OPENAT, c.pid, c.tid, c.ts, now - c.ts, ret,
             (u64)ret, c.a[1], kind, c.a[2], f->path);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    u32 pid, tid;
    if (!traced(&pid, &tid))
        return 0;
    u32 fd = (u32)args->fd;
    u32 gtid = sys_gtid();
    struct sys_pending *p = sys_pending.lookup(&gtid);
    if (p && p->fd == fd)
        sys_flush(gtid, p);
    struct sys_fd_key k = {.pid = pid, .fd = fd};
    sys_fds.delete(&k);
    return 0;
}

/* ---- read / write (files opened while traced only: sockets, pipes and older files are not in sys_fds) -- */

static __always_inline int rw_enter(u64 fd, u32 func)
{
    u32 pid, tid;
    if (!traced(&pid, &tid))
        return 0;
    struct sys_fd_key k = {.pid = pid, .fd = (u32)fd};
    struct sys_file *f = sys_fds.lookup(&k);
    if (!f)
        return 0;
    struct sys_call c = {.ts = bpf_ktime_get_ns(), .pid = pid, .tid = tid, .func = func, .kind = f->kind};
    c.a[0] = fd;
    u32 gtid = sys_gtid();
    sys_inflight.update(&gtid, &c);
    return 0;
}

static __always_inline int rw_exit(s64 ret, u32 func)
{
    u32 gtid = sys_gtid();
    struct sys_call c;
    if (!sys_take(gtid, func, &c))
        return 0;
    u64 dur = bpf_ktime_get_ns() - c.ts;
    u64 bytes = ret > 0 ? (u64)ret : 0;
    sys_stat_add(c.pid, func, c.kind, ret < 0, bytes, dur);
    if (func != OC_SYS_READ || ret < 0)
        return 0;
    u32 fd = (u32)c.a[0];
    struct sys_pending *p = sys_pending.lookup(&gtid);
    if (p) {
        if (p->fd == fd && c.ts - p->ts < SYS_COALESCE_NS) {
            p->bytes += bytes;
            p->calls += 1;
            p->dur += dur;
            if (ret == 0) /* end of file: the batch is complete */
                sys_flush(gtid, p);
            return 0;
        }
        sys_flush(gtid, p);
    }
    if (ret == 0)
        return 0;
    struct sys_pending n = {.ts = c.ts, .dur = dur, .bytes = bytes, .calls = 1, .pid = c.pid, .tid = c.tid,
                            .fd = fd, .kind = c.kind};
    sys_pending.update(&gtid, &n);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return rw_enter(args->fd, OC_SYS_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return rw_exit(args->ret, OC_SYS_READ); }
TRACEPOINT_PROBE(syscalls, sys_enter_pread64) { return rw_enter(args->fd, OC_SYS_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_pread64) { return rw_exit(args->ret, OC_SYS_READ); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return rw_enter(args->fd, OC_SYS_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return rw_exit(args->ret, OC_SYS_READ); }
TRACEPOINT_PROBE(syscalls, sys_enter_preadv) { return rw_enter(args->fd, OC_SYS_READ); }
TRACEPOINT_PROBE(syscalls, sys_exit_preadv) { return rw_exit(args->ret, OC_SYS_READ); }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { return rw_enter(args->fd, OC_SYS_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return rw_exit(args->ret, OC_SYS_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_enter_pwrite64) { return rw_enter(args->fd, OC_SYS_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_exit_pwrite64) { return rw_exit(args->ret, OC_SYS_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return rw_enter(args->fd, OC_SYS_WRITE); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return rw_exit(args->ret, OC_SYS_WRITE); }

/* ---- mmap / munmap of files ------------------------------------------------------------------- */

TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    if (args->flags & SYS_MAP_ANONYMOUS)
        return 0; /* anonymous memory (malloc, allocators): not a file, and far too frequent */
    return sys_enter(OC_SYS_MMAP, 0, args->fd, args->len, args->prot, args->flags);
}

TRACEPOINT_PROBE(syscalls, sys_exit_mmap)
{
    u32 gtid = sys_gtid();
    struct sys_call c;
    if (!sys_take(gtid, OC_SYS_MMAP, &c))
        return 0;
    u64 now = bpf_ktime_get_ns();
    s64 ret = args->ret;
    u32 fd = (u32)c.a[0];
    struct sys_fd_key k = {.pid = c.pid, .fd = fd};
    struct sys_file *f = sys_fds.lookup(&k);
    u32 kind = f ? f->kind : OC_FILE_UNKNOWN;
    int failed = ret < 0 && ret > -4096;
    sys_stat_add(c.pid, OC_SYS_MMAP, kind, failed, failed ? 0 : c.a[1], now - c.ts);
    if (failed)
        return 0;
    sys_flush_thread(gtid);
    int zero = 0;
    struct sys_file *m = sys_scratch.lookup(&zero);
    if (!m)
        return 0;
    bpf_probe_read_kernel(m->path, OC_NAME_LEN, f ? f->path : 0);
    m->len = c.a[1];
    m->kind = kind;
    struct sys_map_key mk = {.pid = c.pid, .addr = (u64)ret};
    if (sys_maps.update(&mk, m))
        count_table_full();
    sys_emit(OC_SYS_MMAP, c.pid, c.tid, c.ts, now - c.ts, ret, fd, c.a[1], kind, (c.a[2] & 0xffffffff) | (c.a[3] << 32),
             m->path);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_munmap)
{
    return sys_enter(OC_SYS_MUNMAP, 0, args->addr, args->len, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_munmap)
{
    u32 gtid = sys_gtid();
    struct sys_call c;
    if (!sys_take(gtid, OC_SYS_MUNMAP, &c))
        return 0;
    if (args->ret != 0)
        return 0;
    struct sys_map_key mk = {.pid = c.pid, .addr = c.a[0]};
    struct sys_file *m = sys_maps.lookup(&mk);
    if (!m)
        return 0; /* not a file mapping seen whole from its start */
    u64 now = bpf_ktime_get_ns();
    u64 len = c.a[1] < m->len ? c.a[1] : m->len;
    u32 kind = m->kind;
    sys_flush_thread(gtid);
    sys_stat_add(c.pid, OC_SYS_MUNMAP, kind, 0, len, now - c.ts);
    sys_emit(OC_SYS_MUNMAP, c.pid, c.tid, c.ts, now - c.ts, 0, c.a[0], len, kind, 0, m->path);
    if (len < m->len) {
        /* the front of the mapping went: the rest is now a mapping at addr + len */
        int zero = 0;
        struct sys_file *rest = sys_scratch.lookup(&zero);
        if (rest) {
            bpf_probe_read_kernel(rest, sizeof(*rest), m);
            rest->len -= len;
            struct sys_map_key rk = {.pid = c.pid, .addr = c.a[0] + len};
            if (sys_maps.update(&rk, rest))
                count_table_full();
        }
    }
    sys_maps.delete(&mk);
    return 0;
}

/* ---- mlock / munlock -------------------------------------------------------------------------- */

TRACEPOINT_PROBE(syscalls, sys_enter_mlock) { return sys_enter(OC_SYS_MLOCK, 0, args->start, args->len, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_mlock2)
{
    return sys_enter(OC_SYS_MLOCK, 0, args->start, args->len, args->flags, 0);
}
TRACEPOINT_PROBE(syscalls, sys_enter_munlock) { return sys_enter(OC_SYS_MUNLOCK, 0, args->start, args->len, 0, 0); }

static __always_inline int mlock_exit(s64 ret, u32 func)
{
    u32 gtid = sys_gtid();
    struct sys_call c;
    if (!sys_take(gtid, func, &c))
        return 0;
    u64 now = bpf_ktime_get_ns();
    sys_flush_thread(gtid);
    sys_emit(func, c.pid, c.tid, c.ts, now - c.ts, ret, c.a[0], c.a[1], c.a[2], 0, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_mlock) { return mlock_exit(args->ret, OC_SYS_MLOCK); }
TRACEPOINT_PROBE(syscalls, sys_exit_mlock2) { return mlock_exit(args->ret, OC_SYS_MLOCK); }
TRACEPOINT_PROBE(syscalls, sys_exit_munlock) { return mlock_exit(args->ret, OC_SYS_MUNLOCK); }

/* ---- scheduling: off-CPU time, measured from switch-out to switch-in ------------------------------ */

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();

    /* switch-in: a traced thread coming back */
    u32 next = (u32)args->next_pid;
    struct sys_offcpu_start *s = sys_offcpu_start.lookup(&next);
    if (s) {
        struct sys_offcpu_start st = *s;
        sys_offcpu_start.delete(&next);
        u64 delta = now - st.ts;
        struct oc_offcpu_key k = {.pid = st.pid, .tid = st.tid, .cls = st.cls};
        struct oc_offcpu zero = {};
        struct oc_offcpu *agg = sys_offcpu.lookup_or_try_init(&k, &zero);
        if (agg) { /* one thread's key: only its own switches update it, so no atomic is needed */
            agg->ns += delta;
            agg->count += 1;
        } else {
            count_table_full();
        }
        if (delta >= OFFCPU_EVENT_NS || (st.cls == OC_OFFCPU_IO && delta >= OFFCPU_IO_EVENT_NS))
            sys_emit(OC_SYS_OFFCPU, st.pid, st.tid, st.ts, delta, 0, st.cls, st.state, 0, 0, 0);
    }

    /* switch-out: the current task is prev */
    u32 pid, tid;
    if (!traced(&pid, &tid))
        return 0;
    u32 gtid = sys_gtid();
    u32 state = (u32)args->prev_state;
    struct sys_pending *p = sys_pending.lookup(&gtid);
    if (p && (now - p->ts >= SYS_COALESCE_NS || (state & SYS_TASK_EXITING)))
        sys_flush(gtid, p);
    if (state & SYS_TASK_EXITING)
        return 0; /* its last switch: it never comes back */
    u32 cls = OC_OFFCPU_SLEEP;
    if (state == 0 || state >= SYS_TASK_REPORT_MAX)
        cls = OC_OFFCPU_INVOLUNTARY;
    else if (state & SYS_TASK_UNINTERRUPTIBLE)
        cls = OC_OFFCPU_IO;
    struct sys_offcpu_start st = {.ts = now, .pid = pid, .tid = tid, .cls = cls, .state = state};
    sys_offcpu_start.update(&gtid, &st);
    return 0;
}
