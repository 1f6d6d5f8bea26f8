/* bench_driver.c — the per-call micro-benchmark: N calls of one fake driver function in a tight loop, timed
 * with CLOCK_MONOTONIC by the process itself.
 *
 *   bench_driver --func launch|sync|htod [--n N] [--rate R] [--threads T]     one run, one JSON line
 *   bench_driver --serve                                                      commands on stdin (below)
 *
 * Serve mode keeps one process (one set of mapped libraries, one pid) alive while a tracer attaches and
 * detaches between runs, so every variant of bench/cpu measures the very same call site. Commands, one a line,
 * each answered by one JSON line on stdout:
 *   run FUNC N [RATE [THREADS]]   N calls in all (split over THREADS threads), paced to RATE calls/s (0 = flat out)
 *   name                          ask for the kernel's handle by name again (a tracer attached after start
 *                                 learns the name from this call; the fake returns the same handle)
 *   quit
 * FUNC: launch = cuLaunchKernel (entry-only probe by default), sync = cuStreamSynchronize (run with
 * FAKE_CUDA_SYNC_US=0 so it returns at once), htod = cuMemcpyHtoD_v2 of 64 bytes (only validated).
 */
#define _GNU_SOURCE
#include "cuda_min.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef unsigned long long u64;

static CUmodule g_module;
static CUfunction g_func;
static CUdeviceptr g_dptr;
static char g_host[64];
static const char g_image[] = "\x7f" "ELF fake cubin for the otel-cuda micro-benchmark";
static const char g_kernel_name[] = "bench_empty_kernel(float*, int)";

enum fn { FN_LAUNCH, FN_SYNC, FN_HTOD };

static u64 now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (u64)t.tv_sec * 1000000000ULL + (u64)t.tv_nsec;
}

static void sleep_until(u64 t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ULL), .tv_nsec = (long)(t % 1000000000ULL)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL))
        ;
}

static int die(const char *what, CUresult r)
{
    fprintf(stderr, "bench_driver: %s failed: %d\n", what, (int)r);
    exit(1);
}

static void setup(void)
{
    CUresult r;
    CUdevice dev;
    CUcontext ctx;
    if ((r = cuInit(0)))
        die("cuInit", r);
    if ((r = cuDeviceGet(&dev, 0)))
        die("cuDeviceGet", r);
    if ((r = cuDevicePrimaryCtxRetain(&ctx, dev)))
        die("cuDevicePrimaryCtxRetain", r);
    if ((r = cuCtxSetCurrent(ctx)))
        die("cuCtxSetCurrent", r);
    if ((r = cuModuleLoadData(&g_module, g_image)))
        die("cuModuleLoadData", r);
    if ((r = cuModuleGetFunction(&g_func, g_module, g_kernel_name)))
        die("cuModuleGetFunction", r);
    if ((r = cuMemAlloc_v2(&g_dptr, 1 << 20)))
        die("cuMemAlloc_v2", r);
}

struct job {
    enum fn fn;
    u64 n;
    double rate; /* calls/s for this thread; 0 = flat out */
    u64 start_ns, end_ns, errors;
    pthread_t thread;
};

static inline CUresult call(enum fn fn, void **params)
{
    switch (fn) {
    case FN_LAUNCH:
        return cuLaunchKernel(g_func, 1, 1, 1, 128, 1, 1, 0, NULL, params, NULL);
    case FN_SYNC:
        return cuStreamSynchronize(NULL);
    default:
        return cuMemcpyHtoD_v2(g_dptr, g_host, sizeof(g_host));
    }
}

static void *worker(void *arg)
{
    struct job *j = arg;
    int a = 0;
    void *params[] = {&a};
    u64 errors = 0;
    u64 start = now_ns();
    if (j->rate <= 0) {
        for (u64 i = 0; i < j->n; i++)
            errors += call(j->fn, params) != CUDA_SUCCESS;
    } else {
        /* Paced: call i is due at start + i/rate; when ahead by more than 200 us, sleep until due (so calls come
         * in short bursts and an idle producer leaves the core to the consumer). */
        double interval = 1e9 / j->rate;
        for (u64 i = 0; i < j->n; i++) {
            u64 due = start + (u64)(interval * (double)i);
            u64 t = now_ns();
            if (due > t + 200000)
                sleep_until(due);
            errors += call(j->fn, params) != CUDA_SUCCESS;
        }
    }
    j->start_ns = start;
    j->end_ns = now_ns();
    j->errors = errors;
    return NULL;
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

static const char *fn_symbol(enum fn fn)
{
    return fn == FN_LAUNCH ? "cuLaunchKernel" : fn == FN_SYNC ? "cuStreamSynchronize" : "cuMemcpyHtoD_v2";
}

static void run(enum fn fn, u64 n, double rate, int threads)
{
    struct job jobs[64];
    if (threads < 1)
        threads = 1;
    if (threads > 64)
        threads = 64;
    for (int t = 0; t < threads; t++) {
        jobs[t] = (struct job){.fn = fn, .n = n / threads + ((u64)t < n % threads), .rate = rate / threads};
    }
    if (threads == 1) {
        worker(&jobs[0]);
    } else {
        for (int t = 0; t < threads; t++)
            pthread_create(&jobs[t].thread, NULL, worker, &jobs[t]);
        for (int t = 0; t < threads; t++)
            pthread_join(jobs[t].thread, NULL);
    }
    u64 first = jobs[0].start_ns, last = jobs[0].end_ns, errors = 0, busy = 0;
    for (int t = 0; t < threads; t++) {
        if (jobs[t].start_ns < first)
            first = jobs[t].start_ns;
        if (jobs[t].end_ns > last)
            last = jobs[t].end_ns;
        errors += jobs[t].errors;
        busy += jobs[t].end_ns - jobs[t].start_ns;
    }
    u64 wall = last - first;
    /* ns_per_call: one thread's time per call (flat out, this is the cost of a call); rate: calls/s overall */
    printf("{\"func\":\"%s\",\"n\":%llu,\"threads\":%d,\"target_rate\":%.0f,\"wall_ns\":%llu,"
           "\"ns_per_call\":%.1f,\"rate\":%.1f,\"errors\":%llu}\n",
           fn_symbol(fn), n, threads, rate, wall, n ? (double)busy / (double)n : 0.0,
           wall ? (double)n * 1e9 / (double)wall : 0.0, errors);
    fflush(stdout);
}

static int serve(void)
{
    char line[256];
    printf("{\"ready\":true,\"pid\":%d,\"kernel\":\"%s\",\"function\":\"0x%llx\"}\n", (int)getpid(), g_kernel_name,
           (u64)(uintptr_t)g_func);
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
            CUfunction f;
            CUresult r = cuModuleGetFunction(&f, g_module, g_kernel_name);
            printf("{\"name\":%s}\n", r == CUDA_SUCCESS && f == g_func ? "true" : "false");
            fflush(stdout);
            continue;
        }
        enum fn fn;
        if (strcmp(cmd, "run") || k < 3 || parse_fn(fname, &fn)) {
            printf("{\"error\":\"bad command\"}\n");
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
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--serve")) {
            serve_mode = 1;
        } else if (!strcmp(a, "--func") && v) {
            if (parse_fn(v, &fn)) {
                fprintf(stderr, "bench_driver: --func launch|sync|htod\n");
                return 2;
            }
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
            fprintf(stderr, "usage: bench_driver [--serve] [--func launch|sync|htod] [--n N] [--rate R] [--threads T]\n");
            return 2;
        }
    }
    setup();
    if (serve_mode)
        return serve();
    run(fn, n, rate, threads);
    return 0;
}
