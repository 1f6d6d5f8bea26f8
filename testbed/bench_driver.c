/* bench_driver.c — the per-call micro-benchmark: calls of one fake driver function in a tight loop, timed with
 * CLOCK_MONOTONIC by the process itself.
 *
 *   bench_driver [--lib PATH]... [--no-init] [--gap-bytes B] --func launch|sync|htod [--n N] [--rate R] [--threads T]
 *   bench_driver [--lib PATH]... [--no-init] [--gap-bytes B] --serve       (commands on stdin)
 *
 * Each --lib is a copy of the fake libcuda.so.1 (a file of its own: uprobes are per inode), dlopen'ed with its own
 * state; default: libcuda.so.1 next to this program. With several libraries a flat-out run interleaves them:
 * CHUNK calls into the first, CHUNK into the second, ... round and round, so that every variant a benchmark
 * attaches to its own copy (no probe, an empty program, ours, bpftrace) is measured in the same milliseconds as
 * the others, and drift on a shared, nested-virtualised machine (where a trap's cost wanders by 2x over minutes)
 * cancels out of their ratios.
 *
 * Serve mode keeps the process (its pid, its mapped copies) alive while tracers attach. Commands, one a line, each
 * answered by JSON on stdout (one line per library for `run`, then {"done":true}):
 *   run FUNC N [RATE [THREADS]]   N calls per library (flat out: interleaved; paced to RATE calls/s: first only)
 *   name                          ask each library for the kernel's handle by name again (a tracer attached after
 *                                 start learns the name from this call; the fake returns the same handle)
 *   quit
 * --gap-bytes B: between two calls of a flat-out run, write one byte per cache line of a private B-byte buffer, as a
 * real workload runs its own code between CUDA calls (PyTorch: ~15 us a launch): the probes then run with cold
 * caches, as they do in an inference server, where a tight loop keeps them hot. Gap time is in every variant's
 * chunks alike, so it drops out of the overheads (variant minus the unprobed copy).
 * --no-init: look the functions up but initialise nothing, so each call returns CUDA_ERROR_NOT_INITIALIZED at once
 * (a copy of the real libcuda: the probes' cost does not depend on what the function does, and one process cannot
 * hold several initialised real drivers). `name` then answers false.
 * FUNC: launch = cuLaunchKernel (entry-only probe by default), sync = cuStreamSynchronize (run with
 * FAKE_CUDA_SYNC_US=0 so it returns at once), htod = cuMemcpyHtoD_v2 of 64 bytes (only validated).
 *
 * Per library: ns_per_call (mean elapsed), median_ns_per_call / p10_ns_per_call (over its chunks of CHUNK calls:
 * a time slice lost to another process spoils one chunk, not the median), cpu_ns_per_call (thread CPU time; the
 * interrupt work a call causes may be charged elsewhere).
 */
#define _GNU_SOURCE
#include "cuda_min.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef unsigned long long u64;

#define CHUNK 32
#define MAX_LIBS 16

static int g_init = 1;
static size_t g_gap_bytes;
static volatile unsigned char *g_gap;

static inline void gap_work(void)
{
    for (size_t i = 0; i < g_gap_bytes; i += 64)
        g_gap[i]++;
}
static const char g_image[] = "\x7f" "ELF fake cubin for the otel-cuda micro-benchmark";
static const char g_kernel_name[] = "bench_empty_kernel(float*, int)";

struct lib {
    const char *path;
    CUresult (*cuInit)(unsigned int);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuModuleLoadData)(CUmodule *, const void *);
    CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *);
    CUresult (*cuMemAlloc_v2)(CUdeviceptr *, size_t);
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                               CUstream, void **, void **);
    CUresult (*cuStreamSynchronize)(CUstream);
    CUresult (*cuMemcpyHtoD_v2)(CUdeviceptr, const void *, size_t);
    CUcontext ctx;
    CUmodule module;
    CUfunction func;
    CUdeviceptr dptr;
};

static struct lib g_libs[MAX_LIBS];
static int g_nlibs;
static char g_host[64];

enum fn { FN_LAUNCH, FN_SYNC, FN_HTOD };

static u64 now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (u64)t.tv_sec * 1000000000ULL + (u64)t.tv_nsec;
}

static u64 thread_cpu_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (u64)t.tv_sec * 1000000000ULL + (u64)t.tv_nsec;
}

static void sleep_until(u64 t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ULL), .tv_nsec = (long)(t % 1000000000ULL)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL))
        ;
}

static void die(const char *what, const char *detail)
{
    fprintf(stderr, "bench_driver: %s: %s\n", what, detail);
    exit(1);
}

#define SYM(l, name)                                                                                         \
    do {                                                                                                     \
        *(void **)&(l)->name = dlsym(h, #name);                                                              \
        if (!(l)->name)                                                                                      \
            die((l)->path, "missing " #name);                                                                \
    } while (0)
#define OK(l, call)                                                                                          \
    do {                                                                                                     \
        CUresult r_ = (call);                                                                                \
        if (r_ != CUDA_SUCCESS) {                                                                            \
            char b_[32];                                                                                     \
            snprintf(b_, sizeof(b_), "error %d", (int)r_);                                                   \
            die(#call, b_);                                                                                  \
        }                                                                                                    \
    } while (0)

static void open_lib(struct lib *l, const char *path)
{
    l->path = path;
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h)
        die(path, dlerror());
    SYM(l, cuInit);
    SYM(l, cuDeviceGet);
    SYM(l, cuDevicePrimaryCtxRetain);
    SYM(l, cuCtxSetCurrent);
    SYM(l, cuModuleLoadData);
    SYM(l, cuModuleGetFunction);
    SYM(l, cuMemAlloc_v2);
    SYM(l, cuLaunchKernel);
    SYM(l, cuStreamSynchronize);
    SYM(l, cuMemcpyHtoD_v2);
    if (!g_init)
        return;
    CUdevice dev;
    OK(l, l->cuInit(0));
    OK(l, l->cuDeviceGet(&dev, 0));
    OK(l, l->cuDevicePrimaryCtxRetain(&l->ctx, dev));
    OK(l, l->cuModuleLoadData(&l->module, g_image));
    OK(l, l->cuModuleGetFunction(&l->func, l->module, g_kernel_name));
    OK(l, l->cuMemAlloc_v2(&l->dptr, 1 << 20));
}

static inline CUresult call(const struct lib *l, enum fn fn, void **params)
{
    switch (fn) {
    case FN_LAUNCH:
        return l->cuLaunchKernel(l->func, 1, 1, 1, 128, 1, 1, 0, NULL, params, NULL);
    case FN_SYNC:
        return l->cuStreamSynchronize(NULL);
    default:
        return l->cuMemcpyHtoD_v2(l->dptr, g_host, sizeof(g_host));
    }
}

static int cmp_u64(const void *a, const void *b)
{
    u64 x = *(const u64 *)a, y = *(const u64 *)b;
    return x < y ? -1 : x > y;
}

struct result {
    u64 n, elapsed_ns, cpu_ns, errors;
    double median, p10; /* ns per call, over chunks */
};

/* Flat out, all libraries interleaved chunk by chunk; n calls per library (rounded down to whole chunks). */
static void run_interleaved(enum fn fn, u64 n, struct result *res)
{
    int a = 0;
    void *params[] = {&a};
    u64 nchunks = n / CHUNK ? n / CHUNK : 1;
    u64 *chunks[MAX_LIBS];
    for (int k = 0; k < g_nlibs; k++) {
        chunks[k] = malloc(nchunks * sizeof(u64));
        if (!chunks[k])
            die("malloc", "out of memory");
        memset(&res[k], 0, sizeof(res[k]));
        g_libs[k].cuCtxSetCurrent(g_libs[k].ctx);
    }
    for (u64 c = 0; c < nchunks; c++) {
        for (int i = 0; i < g_nlibs; i++) {
            int k = (int)((c + (u64)i) % (u64)g_nlibs); /* rotate who goes first */
            const struct lib *l = &g_libs[k];
            u64 errors = 0;
            u64 c0 = thread_cpu_ns();
            u64 t0 = now_ns();
            for (int j = 0; j < CHUNK; j++) {
                errors += call(l, fn, params) != CUDA_SUCCESS;
                gap_work();
            }
            u64 t1 = now_ns();
            res[k].cpu_ns += thread_cpu_ns() - c0;
            chunks[k][c] = t1 - t0;
            res[k].elapsed_ns += t1 - t0;
            res[k].errors += errors;
            res[k].n += CHUNK;
        }
    }
    for (int k = 0; k < g_nlibs; k++) {
        qsort(chunks[k], nchunks, sizeof(u64), cmp_u64);
        res[k].median = (double)chunks[k][nchunks / 2] / CHUNK;
        res[k].p10 = (double)chunks[k][nchunks / 10] / CHUNK;
        free(chunks[k]);
    }
}

struct job {
    enum fn fn;
    u64 n;
    double rate; /* calls/s for this thread */
    u64 start_ns, end_ns, cpu_ns, errors;
    pthread_t thread;
};

/* Paced (ingest): call i is due at start + i/rate; when ahead by more than 200 us, sleep until due (so calls come
 * in short bursts and an idle producer leaves the core to the consumer). First library only. */
static void *paced_worker(void *arg)
{
    struct job *j = arg;
    const struct lib *l = &g_libs[0];
    int a = 0;
    void *params[] = {&a};
    u64 errors = 0;
    l->cuCtxSetCurrent(l->ctx);
    u64 cpu0 = thread_cpu_ns();
    u64 start = now_ns();
    double interval = j->rate > 0 ? 1e9 / j->rate : 0;
    for (u64 i = 0; i < j->n; i++) {
        if (interval > 0) {
            u64 due = start + (u64)(interval * (double)i);
            if (due > now_ns() + 200000)
                sleep_until(due);
        }
        errors += call(l, j->fn, params) != CUDA_SUCCESS;
    }
    j->start_ns = start;
    j->end_ns = now_ns();
    j->cpu_ns = thread_cpu_ns() - cpu0;
    j->errors = errors;
    return NULL;
}

static const char *fn_symbol(enum fn fn)
{
    return fn == FN_LAUNCH ? "cuLaunchKernel" : fn == FN_SYNC ? "cuStreamSynchronize" : "cuMemcpyHtoD_v2";
}

static void print_result(int lib, enum fn fn, int threads, double rate, u64 wall, const struct result *r)
{
    printf("{\"lib\":%d,\"path\":\"%s\",\"func\":\"%s\",\"n\":%llu,\"threads\":%d,\"target_rate\":%.0f,"
           "\"wall_ns\":%llu,\"ns_per_call\":%.1f,\"median_ns_per_call\":%.1f,\"p10_ns_per_call\":%.1f,"
           "\"cpu_ns_per_call\":%.1f,\"rate\":%.1f,\"errors\":%llu}\n",
           lib, g_libs[lib].path, fn_symbol(fn), r->n, threads, rate, wall,
           r->n ? (double)r->elapsed_ns / (double)r->n : 0.0, r->median, r->p10,
           r->n ? (double)r->cpu_ns / (double)r->n : 0.0, wall ? (double)r->n * 1e9 / (double)wall : 0.0, r->errors);
}

static void run(enum fn fn, u64 n, double rate, int threads)
{
    if (rate <= 0 && threads <= 1) {
        struct result res[MAX_LIBS];
        u64 t0 = now_ns();
        run_interleaved(fn, n, res);
        u64 wall = now_ns() - t0;
        for (int k = 0; k < g_nlibs; k++)
            print_result(k, fn, 1, 0, wall, &res[k]);
    } else {
        struct job jobs[64];
        if (threads < 1)
            threads = 1;
        if (threads > 64)
            threads = 64;
        for (int t = 0; t < threads; t++)
            jobs[t] = (struct job){.fn = fn, .n = n / threads + ((u64)t < n % threads), .rate = rate / threads};
        for (int t = 0; t < threads; t++)
            pthread_create(&jobs[t].thread, NULL, paced_worker, &jobs[t]);
        for (int t = 0; t < threads; t++)
            pthread_join(jobs[t].thread, NULL);
        u64 first = jobs[0].start_ns, last = jobs[0].end_ns;
        struct result r = {0};
        for (int t = 0; t < threads; t++) {
            if (jobs[t].start_ns < first)
                first = jobs[t].start_ns;
            if (jobs[t].end_ns > last)
                last = jobs[t].end_ns;
            r.n += jobs[t].n;
            r.elapsed_ns += jobs[t].end_ns - jobs[t].start_ns;
            r.cpu_ns += jobs[t].cpu_ns;
            r.errors += jobs[t].errors;
        }
        print_result(0, fn, threads, rate, last - first, &r);
    }
    printf("{\"done\":true}\n");
    fflush(stdout);
}

static int parse_fn(const char *s, enum fn *fn)
{
    if (!strcmp(s, "launch"))
        *fn = FN_LAUNCH;
    else if (!strcmp(s, "sync"))
        *fn = FN_SYNC;
    else if (!strcmp(s, "htod"))
        *fn = FN_HTOD;
    else
        return -1;
    return 0;
}

static int serve(void)
{
    char line[256];
    printf("{\"ready\":true,\"pid\":%d,\"kernel\":\"%s\",\"libs\":%d}\n", (int)getpid(), g_kernel_name, g_nlibs);
    fflush(stdout);
    while (fgets(line, sizeof(line), stdin)) {
        char cmd[32] = "", fname[32] = "";
        u64 n = 0;
        double rate = 0;
        int threads = 1;
        int k = sscanf(line, "%31s %31s %llu %lf %d", cmd, fname, &n, &rate, &threads);
        if (k < 1)
            continue;
        if (!strcmp(cmd, "quit"))
            break;
        if (!strcmp(cmd, "name")) {
            int ok = 1;
            for (int i = 0; i < g_nlibs; i++) {
                CUfunction f;
                ok &= g_libs[i].cuModuleGetFunction(&f, g_libs[i].module, g_kernel_name) == CUDA_SUCCESS &&
                      f == g_libs[i].func;
            }
            printf("{\"name\":%s}\n", ok ? "true" : "false");
            fflush(stdout);
            continue;
        }
        enum fn fn;
        if (strcmp(cmd, "run") || k < 3 || parse_fn(fname, &fn)) {
            printf("{\"error\":\"bad command\"}\n{\"done\":true}\n");
            fflush(stdout);
            continue;
        }
        run(fn, n, rate, threads);
    }
    return 0;
}

int main(int argc, char **argv)
{
    enum fn fn = FN_LAUNCH;
    u64 n = 100000;
    double rate = 0;
    int threads = 1, serve_mode = 0;
    const char *paths[MAX_LIBS];
    int npaths = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--serve")) {
            serve_mode = 1;
        } else if (!strcmp(a, "--no-init")) {
            g_init = 0;
        } else if (!strcmp(a, "--lib") && v) {
            if (npaths == MAX_LIBS)
                die("--lib", "too many");
            paths[npaths++] = v;
            i++;
        } else if (!strcmp(a, "--func") && v) {
            if (parse_fn(v, &fn)) {
                fprintf(stderr, "bench_driver: --func launch|sync|htod\n");
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--gap-bytes") && v) {
            g_gap_bytes = strtoull(v, NULL, 10);
            i++;
        } else if (!strcmp(a, "--n") && v) {
            n = strtoull(v, NULL, 10);
            i++;
        } else if (!strcmp(a, "--rate") && v) {
            rate = strtod(v, NULL);
            i++;
        } else if (!strcmp(a, "--threads") && v) {
            threads = atoi(v);
            i++;
        } else {
            fprintf(stderr, "usage: bench_driver [--lib PATH]... [--no-init] [--serve] [--func launch|sync|htod] [--n N] "
                            "[--rate R] [--threads T] [--gap-bytes B]\n");
            return 2;
        }
    }
    static char self_lib[PATH_MAX + 16];
    if (!npaths) {
        char exe[PATH_MAX];
        ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
        if (len <= 0)
            die("/proc/self/exe", "unreadable");
        exe[len] = 0;
        char *slash = strrchr(exe, '/');
        *slash = 0;
        snprintf(self_lib, sizeof(self_lib), "%s/libcuda.so.1", exe);
        paths[npaths++] = self_lib;
    }
    if (g_gap_bytes && !(g_gap = calloc(1, g_gap_bytes)))
        die("--gap-bytes", "out of memory");
    for (int i = 0; i < npaths; i++)
        open_lib(&g_libs[g_nlibs++], paths[i]);
    if (serve_mode)
        return serve();
    run(fn, n, rate, threads);
    return 0;
}
