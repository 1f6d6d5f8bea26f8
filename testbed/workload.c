/* workload.c — drives the fake libcuda.so.1 like an inference engine does, and prints its own exact call counts
 * as JSON: the ground truth that otel-cuda's tests compare the sidecar's capture to.
 *
 * Shape of the run (see README.md for the options and the JSON):
 *   main:    cuInit, device, primary + created context, a module and a library, kernel handles by name,
 *            optional runtime registration (__cudaRegisterFatBinary/Function), deliberate errors, optional
 *            weight-file I/O; then starts the workers (and the sleeper) and joins them.
 *   workers: allocate every way, copy and set, then S steps (L launches, an occasional graph launch, a small
 *            DtoH of the "sampled tokens", a stream sync closing the step), the remaining copy/sync calls once,
 *            a context sync, and free everything.
 *   sleeper: one cuCtxSynchronize, then T ms of nanosleep (off-CPU time a scheduler probe should see).
 *
 * Counting: every call of a function in bpf/otel_cuda.h's enum oc_func goes through note() in the thread that
 * makes it (thread-local tallies, merged at the end), successful or not. A runtime call counts once under
 * runtime_calls and once under calls for the driver call it makes. "Noise" calls (cuCtxGetDevice & co.) are
 * made but never counted, since the sidecar does not probe them.
 */
#define _GNU_SOURCE
#include "cuda_min.h"

#include <linux/types.h>
#include "otel_cuda.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef unsigned long long u64;

#define KiB (1024ULL)
#define MiB (1024ULL * 1024ULL)

/* ------------------------------------------------------------------ the probed set, by name
 * Built from the contract's ids, so a function renamed or dropped there fails to compile here. */
#define OC_DRIVER_FUNCS(X)                                                                                   \
    X(cuLaunchKernel) X(cuLaunchKernelEx) X(cuLaunchCooperativeKernel) X(cuGraphLaunch) X(cuMemAlloc_v2)    \
    X(cuMemAllocAsync) X(cuMemAllocManaged) X(cuMemAllocHost_v2) X(cuMemHostAlloc) X(cuMemCreate)          \
    X(cuMemFree_v2) X(cuMemFreeAsync) X(cuMemFreeHost) X(cuMemRelease) X(cuMemcpy) X(cuMemcpyAsync)         \
    X(cuMemcpyHtoD_v2) X(cuMemcpyDtoH_v2) X(cuMemcpyDtoD_v2) X(cuMemcpyHtoDAsync_v2) X(cuMemcpyDtoHAsync_v2) \
    X(cuMemcpyDtoDAsync_v2) X(cuMemcpyPeer) X(cuMemcpyPeerAsync) X(cuMemsetD8_v2) X(cuMemsetD16_v2)         \
    X(cuMemsetD32_v2) X(cuMemsetD8Async) X(cuMemsetD16Async) X(cuMemsetD32Async) X(cuStreamSynchronize)     \
    X(cuCtxSynchronize) X(cuEventSynchronize) X(cuStreamWaitEvent) X(cuEventRecord) X(cuEventRecordWithFlags) \
    X(cuModuleGetFunction)                                                                                   \
    X(cuLibraryGetKernel) X(cuKernelGetFunction) X(cuModuleLoadData) X(cuModuleLoadDataEx)                 \
    X(cuLibraryLoadData) X(cuInit) X(cuDevicePrimaryCtxRetain) X(cuCtxCreate_v2)

#define OC_RUNTIME_FUNCS(X)                                                                                  \
    X(cudaLaunchKernel) X(cudaMemcpy) X(cudaMemcpyAsync) X(cudaMalloc) X(cudaFree) X(cudaStreamSynchronize)  \
    X(cudaDeviceSynchronize) X(cudaGraphLaunch)

struct fn_name {
    int id;
    const char *name;
};

static const struct fn_name g_driver_funcs[] = {
#define X(n) {OC_FN_##n, #n},
    OC_DRIVER_FUNCS(X)
#undef X
};

static const struct fn_name g_runtime_funcs[] = {
#define X(n) {OC_FN_##n, #n},
    OC_RUNTIME_FUNCS(X)
#undef X
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* ------------------------------------------------------------------ kernels
 *
 * Real names from real stacks (CUTLASS, PyTorch, vLLM, FlashAttention, cuBLAS, Triton), mangled where the real
 * ones are. Index 4 is 360 characters, longer than OC_NAME_LEN (256), so the default run exercises truncation.
 * Each fixed kernel has a host stub whose ELF symbol IS the kernel name (as nvcc emits), which cudaLaunchKernel
 * receives in --runtime mode, so the ELF-symbolization fallback has something true to find.
 */
#define FIXED_KERNELS(X)                                                                                     \
    X(0, "_ZN7cutlass6KernelINS_4gemm6kernel4GemmIEEEEvNT_6ParamsE")                                         \
    X(1, "_ZN2at6native29vectorized_elementwise_kernelILi4ENS0_11FillFunctorIfEENS_6detail5ArrayIPcLi1EEEEEviT0_T1_") \
    X(2, "flash_fwd_kernel")                                                                                 \
    X(3, "rms_norm_kernel")                                                                                  \
    X(4, "_ZN7cutlass6KernelINS_4gemm6kernel13GemmUniversalINS1_11threadblock13MmaMultistageINS_9GemmShapeILi128ELi256ELi64EEENS_5ArrayINS_10bfloat16_tELi8ELb0EEENS_6layout8RowMajorESA_NSB_11ColumnMajorENS8_IfLi4ELb1EEELi3EEENS_8epilogue11threadblock8EpilogueIS7_NSG_6thread17LinearCombinationIS9_Li8EffEELi1EEENS4_30GemmIdentityThreadblockSwizzleILi8EEEEEEEvNT_6ParamsE") \
    X(5, "triton_poi_fused_add_mul_0")                                                                       \
    X(6, "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn")                                      \
    X(7, "_ZN4vllm15rms_norm_kernelIN3c108BFloat16EEEvPT_PKS3_S6_fii")                                        \
    X(8, "_ZN5flash16flash_fwd_kernelINS_23Flash_fwd_kernel_traitsILi128ELi128ELi64ELi4ELb0ELb0EN7cutlass10bfloat16_tEEELb1ELb0ELb0ELb0ELb1ELb1ELb0ELb0EEEvNS_16Flash_fwd_paramsE") \
    X(9, "_ZN4vllm18act_and_mul_kernelIN3c108BFloat16EXadL_ZNS_11silu_kernelIS2_EET_RKS4_EELb1EEEvPS4_PS5_i") \
    X(10, "_ZN4vllm30reshape_and_cache_flash_kernelIN3c108BFloat16ES2_LNS_18Fp8KVCacheDataTypeE0EEEvPKT_S6_PT0_S8_PKliiiiiPKfSC_") \
    X(11, "_ZN2at6native13reduce_kernelILi512ELi1ENS0_8ReduceOpIfNS0_7MeanOpsIffffEEjfLi4EEEEEvT1_")          \
    X(12, "_ZN2at6native18elementwise_kernelILi128ELi2EZNS0_22gpu_kernel_impl_nocastINS0_13BinaryFunctorIfffNS0_15binary_internal10MulFunctorIfEEEEEEvRNS_18TensorIteratorBaseERKT_EUliE_EEviT1_") \
    X(13, "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas") \
    X(14, "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN")                                                        \
    X(15, "triton_red_fused__softmax_1")

typedef cudaError_t (*stub_fn)(dim3, dim3, size_t, cudaStream_t, void **);

/* The host stub of a kernel launches itself by address, exactly like nvcc's __device_stub__. */
#define X(id, sym)                                                                                           \
    cudaError_t kstub_##id(dim3 g, dim3 b, size_t shm, cudaStream_t s, void **args) __asm__(sym);            \
    __attribute__((noinline, used)) cudaError_t kstub_##id(dim3 g, dim3 b, size_t shm, cudaStream_t s,       \
                                                           void **args)                                      \
    {                                                                                                        \
        return cudaLaunchKernel((const void *)kstub_##id, g, b, args, shm, s);                               \
    }
FIXED_KERNELS(X)
#undef X

static const char *const g_fixed_names[] = {
#define X(id, sym) sym,
    FIXED_KERNELS(X)
#undef X
};

static const stub_fn g_fixed_stubs[] = {
#define X(id, sym) kstub_##id,
    FIXED_KERNELS(X)
#undef X
};

#define NFIXED ((int)NELEM(g_fixed_names))
#define MAX_KERNELS 4096

struct kernel {
    char *name;
    int via_library;  /* 0: cuModuleGetFunction; 1: cuLibraryGetKernel + cuKernelGetFunction */
    CUfunction func;  /* from cuModuleGetFunction, or cuKernelGetFunction of kern */
    CUkernel kern;    /* library kernels only */
    const void *host; /* --runtime: what cudaLaunchKernel gets (stub, or an anonymous heap byte) */
};

/* Stand-ins for the images; the fake driver never parses them. */
static const char g_cubin_image[] = "\x7f" "ELF fake cubin for otel-cuda testbed";
static const char g_ptx_image[] = ".version 8.5\n.target sm_90\n.address_size 64\n";
static const char g_fatbin_image[] = "fake fatbin for otel-cuda testbed";

/* ------------------------------------------------------------------ options */

struct opts {
    int threads, kernels, runtime, step_log;
    u64 steps, launches, graph_every, errors, start_delay_ms, mmap_bytes, sleep_ms_total, step_us;
    int mmap_set;
    const char *weights, *out;
};

static void usage(FILE *f)
{
    fputs("usage: workload [--threads N] [--steps S] [--launches L] [--graph-every G] [--kernels K]\n"
          "                [--errors E] [--start-delay-ms D] [--runtime] [--weights PATH [--mmap-bytes N]]\n"
          "                [--sleep-ms-total T] [--step-us U] [--out FILE] [--step-log] [--tag TEXT]\n",
          f);
}

static void bad_option(const char *fmt, const char *arg)
{
    fprintf(stderr, "workload: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (try --help)\n");
    exit(2);
}

static u64 parse_num(const char *opt, const char *v, u64 lo, u64 hi)
{
    char *end;
    if (!v || !*v || *v == '-' || *v == '+')
        bad_option("%s needs a non-negative integer", opt);
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (*end)
        bad_option("%s needs a non-negative integer", opt);
    if (errno || x < lo || x > hi) {
        char msg[128];
        snprintf(msg, sizeof(msg), "%%s: value out of range [%llu, %llu]", lo, hi);
        bad_option(msg, opt);
    }
    return x;
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
    *o = (struct opts){.threads = 4, .kernels = 8, .steps = 50, .launches = 20, .graph_every = 5, .errors = 2};
    for (int i = 1; i < argc; i++) {
        char name[64];
        const char *a = argv[i], *val = NULL, *eq = strchr(a, '=');
        if (strncmp(a, "--", 2) != 0)
            bad_option("unexpected argument '%s'", a);
        size_t n = eq ? (size_t)(eq - a) : strlen(a);
        if (n >= sizeof(name))
            bad_option("unknown option '%s'", a);
        memcpy(name, a, n);
        name[n] = 0;
#define FLAG(s) (strcmp(name, s) == 0 && (eq ? (bad_option("%s takes no value", s), 0) : 1))
#define VALUE(s) (strcmp(name, s) == 0 && ((val = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL)) || \
                                            (bad_option("%s needs a value", s), 0)))
        if (FLAG("--help")) {
            usage(stdout);
            exit(0);
        } else if (FLAG("--runtime")) {
            o->runtime = 1;
        } else if (FLAG("--step-log")) {
            o->step_log = 1;
        } else if (VALUE("--threads")) {
            o->threads = (int)parse_num(name, val, 1, 1024);
        } else if (VALUE("--steps")) {
            o->steps = parse_num(name, val, 0, 100000000);
        } else if (VALUE("--launches")) {
            o->launches = parse_num(name, val, 0, 100000000);
        } else if (VALUE("--graph-every")) {
            o->graph_every = parse_num(name, val, 0, 100000000);
        } else if (VALUE("--kernels")) {
            o->kernels = (int)parse_num(name, val, 2, MAX_KERNELS);
        } else if (VALUE("--errors")) {
            o->errors = parse_num(name, val, 0, 1000000);
        } else if (VALUE("--start-delay-ms")) {
            o->start_delay_ms = parse_num(name, val, 0, 86400000);
        } else if (VALUE("--weights")) {
            if (!*val)
                bad_option("%s needs a path", name);
            o->weights = val;
        } else if (VALUE("--mmap-bytes")) {
            o->mmap_bytes = parse_num(name, val, 0, ULLONG_MAX);
            o->mmap_set = 1;
        } else if (VALUE("--sleep-ms-total")) {
            o->sleep_ms_total = parse_num(name, val, 0, 86400000);
        } else if (VALUE("--step-us")) {
            o->step_us = parse_num(name, val, 0, 60000000);
        } else if (VALUE("--tag")) {
            (void)val; /* only marks the command line, so a tracer can select this run by --match */
        } else if (VALUE("--out")) {
            if (!*val)
                bad_option("%s needs a path", name);
            o->out = val;
        } else {
            bad_option("unknown option '%s'", a);
        }
#undef FLAG
#undef VALUE
    }
    if (o->mmap_set && !o->weights)
        bad_option("%s requires --weights", "--mmap-bytes");
    struct stat st;
    if (o->weights && (stat(o->weights, &st) != 0 || !S_ISREG(st.st_mode)))
        bad_option("--weights: '%s' is not a readable regular file", o->weights);
}

/* ------------------------------------------------------------------ tallies */

enum { B_HTOD, B_DTOH, B_DTOD, B_PEER, B_DEFAULT, B_MEMSET, B_COUNT };
static const char *const g_byte_kinds[B_COUNT] = {"htod", "dtoh", "dtod", "peer", "default", "memset"};
enum { M_DEVICE, M_HOST, M_MANAGED, M_COUNT };
static const char *const g_mem_kinds[M_COUNT] = {"device", "host", "managed"};

#define MAX_ERR_CODES 64

struct tally {
    u64 calls[OC_FN_MAX];
    u64 errors[OC_FN_MAX];
    u64 rt_calls[OC_FN_MAX];
    struct {
        int fn;
        CUresult code;
        u64 n;
    } codes[MAX_ERR_CODES];
    int ncodes;
    u64 *by_kernel; /* [kernels] successful kernel launches */
    u64 graph_launches, steps;
    u64 bytes[B_COUNT];
    u64 alloc[M_COUNT], freed[M_COUNT];
};

static void tally_init(struct tally *t, int kernels)
{
    memset(t, 0, sizeof(*t));
    t->by_kernel = calloc((size_t)kernels, sizeof(u64));
    if (!t->by_kernel) {
        fprintf(stderr, "workload: out of memory\n");
        exit(1);
    }
}

static CUresult note(struct tally *t, int fn, CUresult r)
{
    t->calls[fn]++;
    if (r == CUDA_SUCCESS)
        return r;
    t->errors[fn]++;
    for (int i = 0; i < t->ncodes; i++)
        if (t->codes[i].fn == fn && t->codes[i].code == r) {
            t->codes[i].n++;
            return r;
        }
    if (t->ncodes < MAX_ERR_CODES)
        t->codes[t->ncodes++] = (typeof(t->codes[0])){fn, r, 1};
    return r;
}

/* A runtime call: counted under its own name and under the one driver call it makes. */
static cudaError_t note_rt(struct tally *t, int rtfn, int drvfn, cudaError_t r)
{
    t->rt_calls[rtfn]++;
    note(t, drvfn, (CUresult)r);
    return r;
}

static void must(CUresult r, const char *what, int line)
{
    if (r != CUDA_SUCCESS) {
        const char *name = NULL;
        cuGetErrorName(r, &name);
        fprintf(stderr, "workload: %s failed: %s (%d) at workload.c:%d\n", what, name ? name : "?", (int)r, line);
        exit(1);
    }
}

/* A counted driver call whose result the caller inspects. */
#define DRV(t, fn, call) note((t), OC_FN_##fn, (call))
/* A counted driver call that must succeed: a failure is a test-bed bug, so stop loudly. */
#define OK(t, fn, call) must(note((t), OC_FN_##fn, (call)), #fn, __LINE__)
/* A counted runtime call (and its driver call) that must succeed. */
#define RT_OK(t, rtfn, drvfn, call) must((CUresult)note_rt((t), OC_FN_##rtfn, OC_FN_##drvfn, (call)), #rtfn, __LINE__)
/* An uncounted driver call (not in the probed set). */
#define NOISE(call) must((call), #call, __LINE__)

/* ------------------------------------------------------------------ shared state */

static struct opts g_opt;
static struct kernel *g_kernels;
static CUdevice g_dev;
static CUcontext g_ctx, g_pctx;

static u64 now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (u64)ts.tv_sec * 1000000000ULL + (u64)ts.tv_nsec;
}

static void spin_us(u64 us)
{
    u64 end = now_ns() + us * 1000ULL;
    while (now_ns() < end)
        ;
}

static void sleep_ns(u64 ns)
{
    struct timespec req = {(time_t)(ns / 1000000000ULL), (long)(ns % 1000000000ULL)}, rem;
    while (nanosleep(&req, &rem) == -1 && errno == EINTR)
        req = rem;
}

static pid_t gettid_(void)
{
    return (pid_t)syscall(SYS_gettid);
}

/* ------------------------------------------------------------------ kernels: load and name */

static void setup_kernels(struct tally *t, CUmodule *module, CUlibrary *library)
{
    OK(t, cuModuleLoadData, cuModuleLoadData(module, g_cubin_image));

    /* All 8 arguments used, so the two passed on the stack (libraryOptionValues, numLibraryOptions) carry data. */
    CUjit_option jit_opts[] = {CU_JIT_MAX_REGISTERS};
    void *jit_vals[] = {(void *)(uintptr_t)128};
    CUlibraryOption lib_opts[] = {CU_LIBRARY_BINARY_IS_PRESERVED};
    void *lib_vals[] = {(void *)(uintptr_t)1};
    OK(t, cuLibraryLoadData, cuLibraryLoadData(library, g_cubin_image, jit_opts, jit_vals, 1, lib_opts, lib_vals, 1));

    g_kernels = calloc((size_t)g_opt.kernels, sizeof(*g_kernels));
    if (!g_kernels) {
        fprintf(stderr, "workload: out of memory\n");
        exit(1);
    }
    /* Kernels past the fixed list have no symbol: their "host stub" is a heap byte, as for a JIT kernel whose
     * name only the driver knows. */
    char *anon = g_opt.kernels > NFIXED ? malloc((size_t)(g_opt.kernels - NFIXED)) : NULL;
    static const char *const patterns[] = {"triton_poi_fused_add_%d", "triton_red_fused_mean_pow_%d",
                                           "triton_per_fused__softmax_%d"};
    for (int i = 0; i < g_opt.kernels; i++) {
        struct kernel *k = &g_kernels[i];
        char buf[64];
        if (i < NFIXED) {
            k->name = (char *)g_fixed_names[i];
            k->host = (const void *)g_fixed_stubs[i];
        } else {
            snprintf(buf, sizeof(buf), patterns[i % 3], i);
            k->name = strdup(buf);
            k->host = anon + (i - NFIXED);
        }
        k->via_library = i & 1; /* interleaved, so any K >= 2 has both kinds */
        if (!k->via_library) {
            OK(t, cuModuleGetFunction, cuModuleGetFunction(&k->func, *module, k->name));
        } else {
            OK(t, cuLibraryGetKernel, cuLibraryGetKernel(&k->kern, *library, k->name));
            OK(t, cuKernelGetFunction, cuKernelGetFunction(&k->func, k->kern));
        }
    }

    /* Asking again must give the same handles, as lazy-loading runtimes do (and the sidecar must not mind). */
    CUfunction again_f = NULL, again_k = NULL;
    OK(t, cuModuleGetFunction, cuModuleGetFunction(&again_f, *module, g_kernels[0].name));
    OK(t, cuKernelGetFunction, cuKernelGetFunction(&again_k, g_kernels[1].kern));
    if (again_f != g_kernels[0].func || again_k != g_kernels[1].func) {
        fprintf(stderr, "workload: the driver gave a different handle for the same name or kernel\n");
        exit(1);
    }
}

/* --runtime: what nvcc's static constructors do, made here after cuInit (this fake runtime does not init the
 * driver itself). Driver calls: 1 cuModuleLoadData + K cuModuleGetFunction. */
static void **register_runtime(struct tally *t)
{
    void **fatbin = __cudaRegisterFatBinary((void *)g_fatbin_image);
    note(t, OC_FN_cuModuleLoadData, fatbin ? CUDA_SUCCESS : CUDA_ERROR_INVALID_IMAGE);
    must(fatbin ? CUDA_SUCCESS : CUDA_ERROR_INVALID_IMAGE, "__cudaRegisterFatBinary", __LINE__);
    for (int i = 0; i < g_opt.kernels; i++) {
        __cudaRegisterFunction(fatbin, (const char *)g_kernels[i].host, g_kernels[i].name, g_kernels[i].name, -1,
                               NULL, NULL, NULL, NULL, NULL);
        note(t, OC_FN_cuModuleGetFunction, CUDA_SUCCESS);
    }
    __cudaRegisterFatBinaryEnd(fatbin);
    return fatbin;
}

/* ------------------------------------------------------------------ deliberate errors (main thread)
 * Ordered so that the default (2) touches neither launches nor syncs, whose counts tests like to predict. */
static void make_errors(struct tally *t, CUmodule module, CUlibrary library)
{
    for (u64 i = 0; i < g_opt.errors; i++) {
        CUdeviceptr p;
        CUfunction f;
        CUkernel k;
        char name[64];
        CUresult want, got;
        switch (i % 7) {
        case 0:
            want = CUDA_ERROR_INVALID_VALUE;
            got = DRV(t, cuMemAlloc_v2, cuMemAlloc_v2(&p, 0));
            break;
        case 1:
            snprintf(name, sizeof(name), "missing_kernel_%llu", i);
            want = CUDA_ERROR_NOT_FOUND;
            got = DRV(t, cuModuleGetFunction, cuModuleGetFunction(&f, module, name));
            break;
        case 2:
            want = CUDA_ERROR_INVALID_VALUE;
            got = DRV(t, cuMemFree_v2, cuMemFree_v2(0xdead0000ULL));
            break;
        case 3:
            want = CUDA_ERROR_OUT_OF_MEMORY;
            got = DRV(t, cuMemAlloc_v2, cuMemAlloc_v2(&p, 1ULL << 50));
            break;
        case 4:
            snprintf(name, sizeof(name), "missing_lib_kernel_%llu", i);
            want = CUDA_ERROR_NOT_FOUND;
            got = DRV(t, cuLibraryGetKernel, cuLibraryGetKernel(&k, library, name));
            break;
        case 5:
            want = CUDA_ERROR_INVALID_HANDLE;
            got = DRV(t, cuStreamSynchronize, cuStreamSynchronize((CUstream)(uintptr_t)0xbad0));
            break;
        default:
            want = CUDA_ERROR_INVALID_HANDLE;
            got = DRV(t, cuLaunchKernel, cuLaunchKernel(NULL, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL));
            break;
        }
        if (got != want) {
            fprintf(stderr, "workload: deliberate error %llu returned %d, expected %d\n", i, (int)got, (int)want);
            exit(1);
        }
    }
}

/* ------------------------------------------------------------------ weights (file I/O before the first launch) */

struct weights {
    u64 bytes_read, bytes_mapped, mlocked;
    void *map;
};

static void load_weights(struct weights *w)
{
    int fd = open(g_opt.weights, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "workload: --weights: cannot open '%s': %s\n", g_opt.weights, strerror(errno));
        exit(2);
    }
    char *buf = malloc(MiB);
    if (!buf) {
        fprintf(stderr, "workload: out of memory\n");
        exit(1);
    }
    for (;;) {
        ssize_t n = read(fd, buf, MiB);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            fprintf(stderr, "workload: --weights: read failed: %s\n", strerror(errno));
            exit(1);
        }
        if (n == 0)
            break;
        w->bytes_read += (u64)n;
    }
    free(buf);

    /* Map no more than the file holds: touching a page past EOF would SIGBUS. */
    u64 len = g_opt.mmap_set ? g_opt.mmap_bytes : w->bytes_read;
    if (len > w->bytes_read)
        len = w->bytes_read;
    if (len) {
        w->map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (w->map == MAP_FAILED) {
            fprintf(stderr, "workload: --weights: mmap failed: %s\n", strerror(errno));
            exit(1);
        }
        long page = sysconf(_SC_PAGESIZE);
        volatile unsigned char sink = 0;
        for (u64 off = 0; off < len; off += (u64)page)
            sink ^= ((volatile unsigned char *)w->map)[off];
        (void)sink;
        w->bytes_mapped = len;
    }
    close(fd);

    /* Pinning memory is what a loader does before registering host buffers; 64 KiB fits the default RLIMIT. */
    void *pin = NULL;
    if (posix_memalign(&pin, 4096, 64 * KiB) == 0) {
        memset(pin, 0, 64 * KiB);
        if (mlock(pin, 64 * KiB) == 0) {
            w->mlocked = 64 * KiB;
            munlock(pin, 64 * KiB);
        }
        free(pin);
    }
}

/* ------------------------------------------------------------------ the sleeper */

struct sleeper {
    pid_t tid;
    u64 slept_ns;
    struct tally t;
};

static void *sleeper_main(void *arg)
{
    struct sleeper *s = arg;
    s->tid = gettid_();
    NOISE(cuCtxSetCurrent(g_ctx));
    OK(&s->t, cuCtxSynchronize, cuCtxSynchronize());
    u64 piece = g_opt.sleep_ms_total * 1000000ULL / 10;
    for (int i = 0; i < 10; i++) {
        u64 t0 = now_ns();
        sleep_ns(piece);
        s->slept_ns += now_ns() - t0;
    }
    return NULL;
}

/* ------------------------------------------------------------------ workers */

struct step_rec {
    u64 start_ns, end_ns, launches, graph_launches;
};

struct worker {
    int idx;
    pid_t tid;
    pthread_t thread;
    struct tally t;
    struct step_rec *steps;
};

/* Sizes are fixed so that tests can compute them; they are also reported in alloc_bytes. */
#define SZ_DEV_A (8 * MiB)      /* cuMemAlloc_v2 */
#define SZ_DEV_B (4 * MiB)      /* cuMemAllocAsync */
#define SZ_MANAGED (1 * MiB)    /* cuMemAllocManaged */
#define SZ_PINNED (1 * MiB)     /* cuMemAllocHost_v2 */
#define SZ_HOSTALLOC (256 * KiB) /* cuMemHostAlloc */
#define SZ_PHYS (2 * MiB)       /* cuMemCreate (one granule) */
#define SZ_RT (1 * MiB)         /* cudaMalloc, --runtime only */
#define SZ_TOKENS 1024          /* per-step DtoH of the sampled tokens */

static void launch_one(struct worker *w, u64 n, CUstream stream, CUdeviceptr arg)
{
    struct tally *t = &w->t;
    int ki = (int)((u64)(w->idx * 3) + n) % g_opt.kernels;
    struct kernel *k = &g_kernels[ki];
    unsigned nelem = 4096;
    void *params[] = {&arg, &nelem};
    unsigned gx = (unsigned)(ki + 1) * 8, gy = 1 + (unsigned)(n % 4), bx = 128u * (1 + (unsigned)(ki & 1));
    unsigned shm = (unsigned)(ki % 4) * 4096;

    if (g_opt.runtime) {
        dim3 g = {gx, gy, 1}, b = {bx, 1, 1};
        cudaError_t r = ki < NFIXED ? g_fixed_stubs[ki](g, b, shm, stream, params)
                                    : cudaLaunchKernel(k->host, g, b, params, shm, stream);
        RT_OK(t, cudaLaunchKernel, cuLaunchKernel, r);
        t->by_kernel[ki]++;
        return;
    }

    /* Library kernels alternate, per round over the kernels, between the CUkernel itself (allowed since
     * CUDA 12) and the CUfunction cuKernelGetFunction gave for it. */
    CUfunction f = (k->via_library && ((n / (u64)g_opt.kernels) & 1) == 0) ? (CUfunction)k->kern : k->func;
    switch (n % 3) {
    case 0:
        OK(t, cuLaunchKernel, cuLaunchKernel(f, gx, gy, 1, bx, 1, 1, shm, stream, params, NULL));
        break;
    case 1: {
        CUlaunchAttribute attr = {.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION};
        attr.value.programmaticStreamSerializationAllowed = 1;
        CUlaunchConfig cfg = {.gridDimX = gx, .gridDimY = gy, .gridDimZ = 1, .blockDimX = bx, .blockDimY = 1,
                              .blockDimZ = 1, .sharedMemBytes = shm, .hStream = stream, .attrs = &attr,
                              .numAttrs = 1};
        OK(t, cuLaunchKernelEx, cuLaunchKernelEx(&cfg, f, params, NULL));
        break;
    }
    default:
        OK(t, cuLaunchCooperativeKernel, cuLaunchCooperativeKernel(f, 132, 1, 1, bx, 1, 1, shm, stream, params));
        break;
    }
    t->by_kernel[ki]++;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct tally *t = &w->t;
    w->tid = gettid_();

    /* Like every PyTorch thread: bind the context, make a stream, an event and a captured graph. */
    CUstream s;
    CUevent ev;
    CUgraph graph;
    CUgraphExec exec;
    NOISE(cuCtxSetCurrent(g_ctx));
    NOISE(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    NOISE(cuEventCreate(&ev, CU_EVENT_DISABLE_TIMING));
    NOISE(cuGraphCreate(&graph, 0));
    NOISE(cuGraphInstantiateWithFlags(&exec, graph, 0));

    /* Allocate every way. */
    CUdeviceptr a, b, managed, rt = 0;
    void *pinned, *hostbuf;
    CUmemGenericAllocationHandle phys;
    CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED,
                                .location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = g_dev}};
    OK(t, cuMemAlloc_v2, cuMemAlloc_v2(&a, SZ_DEV_A));
    OK(t, cuMemAllocAsync, cuMemAllocAsync(&b, SZ_DEV_B, s));
    OK(t, cuMemAllocManaged, cuMemAllocManaged(&managed, SZ_MANAGED, CU_MEM_ATTACH_GLOBAL));
    OK(t, cuMemAllocHost_v2, cuMemAllocHost_v2(&pinned, SZ_PINNED));
    OK(t, cuMemHostAlloc, cuMemHostAlloc(&hostbuf, SZ_HOSTALLOC, CU_MEMHOSTALLOC_PORTABLE));
    OK(t, cuMemCreate, cuMemCreate(&phys, SZ_PHYS, &prop, 0));
    t->alloc[M_DEVICE] += SZ_DEV_A + SZ_DEV_B + SZ_PHYS;
    t->alloc[M_MANAGED] += SZ_MANAGED;
    t->alloc[M_HOST] += SZ_PINNED + SZ_HOSTALLOC;
    if (g_opt.runtime) {
        RT_OK(t, cudaMalloc, cuMemAlloc_v2, cudaMalloc((void **)&rt, SZ_RT));
        t->alloc[M_DEVICE] += SZ_RT;
    }
    memset(pinned, 0x5a, SZ_PINNED); /* host allocations are real memory: the caller may write them */
    memset((void *)(uintptr_t)managed, 0, SZ_MANAGED);

    /* Upload and clear. Memset byte counts are elements x element size. */
    OK(t, cuMemcpyHtoD_v2, cuMemcpyHtoD_v2(a, pinned, 1 * MiB));
    OK(t, cuMemcpyHtoDAsync_v2, cuMemcpyHtoDAsync_v2(b, hostbuf, SZ_HOSTALLOC, s));
    t->bytes[B_HTOD] += 1 * MiB + SZ_HOSTALLOC;
    OK(t, cuMemsetD8_v2, cuMemsetD8_v2(a, 0, 1 * MiB));
    OK(t, cuMemsetD16_v2, cuMemsetD16_v2(a, 0, 512 * KiB));
    OK(t, cuMemsetD32_v2, cuMemsetD32_v2(b, 0, 256 * KiB));
    OK(t, cuMemsetD8Async, cuMemsetD8Async(b, 0, 64 * KiB, s));
    OK(t, cuMemsetD16Async, cuMemsetD16Async(b + 64 * KiB, 0, 32 * KiB, s));
    OK(t, cuMemsetD32Async, cuMemsetD32Async(a + 1 * MiB, 0, 16 * KiB, s));
    t->bytes[B_MEMSET] += 1 * MiB + 2 * 512 * KiB + 4 * 256 * KiB + 64 * KiB + 2 * 32 * KiB + 4 * 16 * KiB;

    /* A JIT-compiled module per thread, as Triton loads its kernels. */
    CUmodule jit;
    CUjit_option jopt[] = {CU_JIT_OPTIMIZATION_LEVEL, CU_JIT_GENERATE_LINE_INFO};
    void *jval[] = {(void *)(uintptr_t)4, (void *)(uintptr_t)1};
    OK(t, cuModuleLoadDataEx, cuModuleLoadDataEx(&jit, g_ptx_image, 2, jopt, jval));

    /* The steps: a burst of launches closed by reading the sampled tokens back and syncing on them. */
    u64 n = 0;
    for (u64 st = 0; st < g_opt.steps; st++) {
        u64 t0 = now_ns(), graphs = 0;
        CUdevice dev;
        unsigned int flags;
        int active;
        for (int i = 0; i < 3; i++) /* what eager PyTorch asks before every op */
            NOISE(cuCtxGetDevice(&dev));
        NOISE(cuDevicePrimaryCtxGetState(dev, &flags, &active));
        for (u64 j = 0; j < g_opt.launches; j++)
            launch_one(w, n++, s, a);
        if (g_opt.graph_every && (st + 1) % g_opt.graph_every == 0) {
            if (g_opt.runtime)
                RT_OK(t, cudaGraphLaunch, cuGraphLaunch, cudaGraphLaunch(exec, s));
            else
                OK(t, cuGraphLaunch, cuGraphLaunch(exec, s));
            graphs = 1;
        }
        if (g_opt.step_us)
            spin_us(g_opt.step_us);
        if (g_opt.runtime) {
            RT_OK(t, cudaMemcpyAsync, cuMemcpyDtoHAsync_v2,
                  cudaMemcpyAsync(pinned, (void *)(uintptr_t)a, SZ_TOKENS, cudaMemcpyDeviceToHost, s));
            RT_OK(t, cudaStreamSynchronize, cuStreamSynchronize, cudaStreamSynchronize(s));
        } else {
            OK(t, cuMemcpyDtoHAsync_v2, cuMemcpyDtoHAsync_v2(pinned, a, SZ_TOKENS, s));
            OK(t, cuStreamSynchronize, cuStreamSynchronize(s));
        }
        t->bytes[B_DTOH] += SZ_TOKENS;
        t->graph_launches += graphs;
        t->steps++;
        if (w->steps)
            w->steps[st] = (struct step_rec){t0, now_ns(), g_opt.launches, graphs};
    }

    /* Everything else once, outside the steps. */
    OK(t, cuMemcpy, cuMemcpy(b, a, 64 * KiB));
    OK(t, cuMemcpyAsync, cuMemcpyAsync(a + 2 * MiB, b, 64 * KiB, s));
    t->bytes[B_DEFAULT] += 2 * 64 * KiB;
    OK(t, cuMemcpyDtoD_v2, cuMemcpyDtoD_v2(b, a, 128 * KiB));
    OK(t, cuMemcpyDtoDAsync_v2, cuMemcpyDtoDAsync_v2(a, b, 128 * KiB, s));
    t->bytes[B_DTOD] += 2 * 128 * KiB;
    OK(t, cuMemcpyDtoH_v2, cuMemcpyDtoH_v2(pinned, a, 256 * KiB));
    t->bytes[B_DTOH] += 256 * KiB;
    OK(t, cuMemcpyPeer, cuMemcpyPeer(b, g_pctx, a, g_ctx, 512 * KiB));
    OK(t, cuMemcpyPeerAsync, cuMemcpyPeerAsync(a, g_ctx, b, g_pctx, 512 * KiB, s));
    t->bytes[B_PEER] += 2 * 512 * KiB;
    if (g_opt.runtime) {
        RT_OK(t, cudaMemcpy, cuMemcpy, cudaMemcpy((void *)(uintptr_t)rt, (void *)(uintptr_t)a, 64 * KiB,
                                                  cudaMemcpyDefault));
        t->bytes[B_DEFAULT] += 64 * KiB;
    }
    OK(t, cuEventRecord, cuEventRecord(ev, s));
    OK(t, cuEventRecordWithFlags, cuEventRecordWithFlags(ev, s, 0));
    OK(t, cuStreamWaitEvent, cuStreamWaitEvent(s, ev, 0));
    OK(t, cuEventSynchronize, cuEventSynchronize(ev));

    /* Free everything (async first, the context sync then covers it), so live bytes return to 0. */
    OK(t, cuMemFreeAsync, cuMemFreeAsync(b, s));
    if (g_opt.runtime)
        RT_OK(t, cudaDeviceSynchronize, cuCtxSynchronize, cudaDeviceSynchronize());
    else
        OK(t, cuCtxSynchronize, cuCtxSynchronize());
    OK(t, cuMemFree_v2, cuMemFree_v2(a));
    OK(t, cuMemFree_v2, cuMemFree_v2(managed));
    OK(t, cuMemFreeHost, cuMemFreeHost(pinned));
    OK(t, cuMemFreeHost, cuMemFreeHost(hostbuf));
    OK(t, cuMemRelease, cuMemRelease(phys));
    t->freed[M_DEVICE] += SZ_DEV_A + SZ_DEV_B + SZ_PHYS;
    t->freed[M_MANAGED] += SZ_MANAGED;
    t->freed[M_HOST] += SZ_PINNED + SZ_HOSTALLOC;
    if (g_opt.runtime) {
        RT_OK(t, cudaFree, cuMemFree_v2, cudaFree((void *)(uintptr_t)rt));
        t->freed[M_DEVICE] += SZ_RT;
    }

    NOISE(cuModuleUnload(jit));
    NOISE(cuGraphExecDestroy(exec));
    NOISE(cuGraphDestroy(graph));
    NOISE(cuEventDestroy_v2(ev));
    NOISE(cuStreamDestroy_v2(s));
    return NULL;
}

/* ------------------------------------------------------------------ output */

static void merge(struct tally *dst, const struct tally *src)
{
    for (int i = 0; i < OC_FN_MAX; i++) {
        dst->calls[i] += src->calls[i];
        dst->errors[i] += src->errors[i];
        dst->rt_calls[i] += src->rt_calls[i];
    }
    for (int i = 0; i < src->ncodes; i++) {
        int j = 0;
        while (j < dst->ncodes && !(dst->codes[j].fn == src->codes[i].fn && dst->codes[j].code == src->codes[i].code))
            j++;
        if (j == dst->ncodes) {
            if (dst->ncodes == MAX_ERR_CODES)
                continue;
            dst->codes[dst->ncodes++] = (typeof(dst->codes[0])){src->codes[i].fn, src->codes[i].code, 0};
        }
        dst->codes[j].n += src->codes[i].n;
    }
    for (int k = 0; k < g_opt.kernels; k++)
        dst->by_kernel[k] += src->by_kernel[k];
    dst->graph_launches += src->graph_launches;
    dst->steps += src->steps;
    for (int i = 0; i < B_COUNT; i++)
        dst->bytes[i] += src->bytes[i];
    for (int i = 0; i < M_COUNT; i++) {
        dst->alloc[i] += src->alloc[i];
        dst->freed[i] += src->freed[i];
    }
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(f, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(f, "\\u%04x", *p);
        else
            fputc(*p, f);
    }
    fputc('"', f);
}

static void write_json(FILE *f, const struct tally *t, pid_t main_tid, const struct worker *ws,
                       const struct weights *wt, const struct sleeper *sl)
{
    const struct opts *o = &g_opt;
    fprintf(f, "{\"pid\":%d,\"main_tid\":%d,\"threads\":[", (int)getpid(), (int)main_tid);
    for (int i = 0; i < o->threads; i++)
        fprintf(f, "%s%d", i ? "," : "", (int)ws[i].tid);
    fprintf(f, "],\"options\":{\"threads\":%d,\"steps\":%llu,\"launches\":%llu,\"graph_every\":%llu,"
               "\"kernels\":%d,\"errors\":%llu,\"runtime\":%s,\"step_us\":%llu,\"sleep_ms_total\":%llu,"
               "\"start_delay_ms\":%llu},",
            o->threads, o->steps, o->launches, o->graph_every, o->kernels, o->errors, o->runtime ? "true" : "false",
            o->step_us, o->sleep_ms_total, o->start_delay_ms);
    /* Parsed as fake_cuda.c parses it (anything but a plain number means the default). */
    const char *sync_env = getenv("FAKE_CUDA_SYNC_US");
    char *end;
    errno = 0;
    u64 sync_us = sync_env && *sync_env ? strtoull(sync_env, &end, 10) : 200;
    if (sync_env && *sync_env && (errno || *end))
        sync_us = 200;
    fprintf(f, "\"fake_sync_us\":%llu,", sync_us);

    fprintf(f, "\"calls\":{");
    for (size_t i = 0; i < NELEM(g_driver_funcs); i++)
        fprintf(f, "%s\"%s\":%llu", i ? "," : "", g_driver_funcs[i].name, t->calls[g_driver_funcs[i].id]);
    fprintf(f, "},\"errors\":{");
    const char *sep = "";
    for (size_t i = 0; i < NELEM(g_driver_funcs); i++)
        if (t->errors[g_driver_funcs[i].id]) {
            fprintf(f, "%s\"%s\":%llu", sep, g_driver_funcs[i].name, t->errors[g_driver_funcs[i].id]);
            sep = ",";
        }
    /* "error_codes": {"func": {"CUDA_ERROR_...": n}} — what cuda.api.result should show per function. */
    fprintf(f, "},\"error_codes\":{");
    sep = "";
    for (size_t i = 0; i < NELEM(g_driver_funcs); i++) {
        const char *inner = "";
        for (int c = 0; c < t->ncodes; c++) {
            if (t->codes[c].fn != g_driver_funcs[i].id)
                continue;
            const char *name = NULL;
            cuGetErrorName(t->codes[c].code, &name);
            if (!*inner)
                fprintf(f, "%s\"%s\":{", sep, g_driver_funcs[i].name);
            fprintf(f, "%s\"%s\":%llu", inner, name ? name : "CUDA_ERROR_UNKNOWN", t->codes[c].n);
            inner = ",";
            sep = ",";
        }
        if (*inner)
            fputc('}', f);
    }
    fprintf(f, "},");
    if (o->runtime) {
        fprintf(f, "\"runtime_calls\":{");
        for (size_t i = 0; i < NELEM(g_runtime_funcs); i++)
            fprintf(f, "%s\"%s\":%llu", i ? "," : "", g_runtime_funcs[i].name, t->rt_calls[g_runtime_funcs[i].id]);
        fprintf(f, "},");
    }

    u64 launches = 0;
    fprintf(f, "\"launches_by_kernel\":{");
    for (int k = 0; k < o->kernels; k++) {
        fprintf(f, "%s", k ? "," : "");
        json_str(f, g_kernels[k].name);
        fprintf(f, ":%llu", t->by_kernel[k]);
        launches += t->by_kernel[k];
    }
    fprintf(f, "},\"launches_total\":%llu,\"graph_launches\":%llu,\"steps_total\":%llu,", launches,
            t->graph_launches, t->steps);

    fprintf(f, "\"bytes\":{");
    for (int i = 0; i < B_COUNT; i++)
        fprintf(f, "%s\"%s\":%llu", i ? "," : "", g_byte_kinds[i], t->bytes[i]);
    fprintf(f, "},\"alloc_bytes\":{");
    for (int i = 0; i < M_COUNT; i++)
        fprintf(f, "%s\"%s\":%llu", i ? "," : "", g_mem_kinds[i], t->alloc[i]);
    fprintf(f, "},\"freed_bytes\":{");
    for (int i = 0; i < M_COUNT; i++)
        fprintf(f, "%s\"%s\":%llu", i ? "," : "", g_mem_kinds[i], t->freed[i]);
    fprintf(f, "},");

    fprintf(f, "\"kernels\":[");
    for (int k = 0; k < o->kernels; k++) {
        const struct kernel *kk = &g_kernels[k];
        fprintf(f, "%s{\"name\":", k ? "," : "");
        json_str(f, kk->name);
        fprintf(f, ",\"via\":\"%s\",\"function\":%llu,\"kernel\":%llu,\"host_stub\":%llu}",
                kk->via_library ? "library" : "module", (u64)(uintptr_t)kk->func, (u64)(uintptr_t)kk->kern,
                o->runtime ? (u64)(uintptr_t)kk->host : 0ULL);
    }
    fprintf(f, "]");

    if (o->step_log) {
        fprintf(f, ",\"steps\":[");
        sep = "";
        for (int i = 0; i < o->threads; i++)
            for (u64 s = 0; s < o->steps; s++) {
                const struct step_rec *r = &ws[i].steps[s];
                fprintf(f, "%s{\"tid\":%d,\"start_ns\":%llu,\"end_ns\":%llu,\"launches\":%llu,\"graph_launches\":%llu}",
                        sep, (int)ws[i].tid, r->start_ns, r->end_ns, r->launches, r->graph_launches);
                sep = ",";
            }
        fprintf(f, "]");
    }
    if (o->weights) {
        fprintf(f, ",\"weights\":{\"path\":");
        json_str(f, o->weights);
        fprintf(f, ",\"bytes_read\":%llu,\"bytes_mapped\":%llu,\"mlocked_bytes\":%llu}", wt->bytes_read,
                wt->bytes_mapped, wt->mlocked);
    }
    if (o->sleep_ms_total)
        fprintf(f, ",\"sleep\":{\"tid\":%d,\"slept_ns\":%llu}", (int)sl->tid, sl->slept_ns);
    fprintf(f, "}\n");
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    parse_opts(argc, argv, &g_opt);
    pid_t main_tid = gettid_();
    if (g_opt.start_delay_ms)
        sleep_ns(g_opt.start_delay_ms * 1000000ULL);

    struct tally tm;
    tally_init(&tm, g_opt.kernels);

    /* Bring-up, as cudart does it on first use. */
    int ver, count;
    const char *ename;
    OK(&tm, cuInit, cuInit(0));
    NOISE(cuDriverGetVersion(&ver));
    NOISE(cuDeviceGetCount(&count));
    NOISE(cuDeviceGet(&g_dev, 0));
    OK(&tm, cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain(&g_pctx, g_dev));
    OK(&tm, cuCtxCreate_v2, cuCtxCreate_v2(&g_ctx, 0, g_dev));
    NOISE(cuGetErrorName(CUDA_SUCCESS, &ename));

    CUmodule module;
    CUlibrary library;
    setup_kernels(&tm, &module, &library);
    void **fatbin = g_opt.runtime ? register_runtime(&tm) : NULL;
    make_errors(&tm, module, library);

    struct weights wt = {0};
    if (g_opt.weights)
        load_weights(&wt);

    struct sleeper sl = {0};
    pthread_t sleeper_thread;
    if (g_opt.sleep_ms_total) {
        tally_init(&sl.t, g_opt.kernels);
        if (pthread_create(&sleeper_thread, NULL, sleeper_main, &sl) != 0) {
            fprintf(stderr, "workload: pthread_create failed\n");
            return 1;
        }
    }

    struct worker *ws = calloc((size_t)g_opt.threads, sizeof(*ws));
    if (!ws) {
        fprintf(stderr, "workload: out of memory\n");
        return 1;
    }
    for (int i = 0; i < g_opt.threads; i++) {
        ws[i].idx = i;
        tally_init(&ws[i].t, g_opt.kernels);
        if (g_opt.step_log && g_opt.steps &&
            !(ws[i].steps = calloc((size_t)g_opt.steps, sizeof(struct step_rec)))) {
            fprintf(stderr, "workload: out of memory for --step-log\n");
            return 1;
        }
        if (pthread_create(&ws[i].thread, NULL, worker_main, &ws[i]) != 0) {
            fprintf(stderr, "workload: pthread_create failed\n");
            return 1;
        }
    }
    for (int i = 0; i < g_opt.threads; i++) {
        pthread_join(ws[i].thread, NULL);
        merge(&tm, &ws[i].t);
    }
    if (g_opt.sleep_ms_total) {
        pthread_join(sleeper_thread, NULL);
        merge(&tm, &sl.t);
    }

    if (fatbin)
        __cudaUnregisterFatBinary(fatbin);
    NOISE(cuModuleUnload(module));
    NOISE(cuLibraryUnload(library));
    NOISE(cuCtxDestroy_v2(g_ctx));
    NOISE(cuDevicePrimaryCtxRelease_v2(g_dev));
    if (wt.map)
        munmap(wt.map, wt.bytes_mapped);

    /* --out: write beside the target and rename, so a test polling for the file never reads half of it. */
    FILE *f = stdout;
    char tmp[PATH_MAX];
    if (g_opt.out) {
        snprintf(tmp, sizeof(tmp), "%s.tmp.%d", g_opt.out, (int)getpid());
        if (!(f = fopen(tmp, "w"))) {
            fprintf(stderr, "workload: --out: cannot write '%s': %s\n", tmp, strerror(errno));
            return 1;
        }
    }
    write_json(f, &tm, main_tid, ws, &wt, &sl);
    if (g_opt.out) {
        if (fclose(f) != 0 || rename(tmp, g_opt.out) != 0) {
            fprintf(stderr, "workload: --out: cannot write '%s': %s\n", g_opt.out, strerror(errno));
            return 1;
        }
    } else {
        fflush(stdout);
    }
    return 0;
}
