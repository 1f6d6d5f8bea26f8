/* fake_cuda.c — a GPU-less libcuda.so.1 for testing otel-cuda's uprobes.
 *
 * Every function exports the real CUDA 12/13 driver signature, so a uprobe on this library sees the same
 * registers and stack as on NVIDIA's. Nothing runs on a device: handles are tagged counters, device pointers are
 * addresses in a range no host mapping is expected to use, and copies only validate their arguments.
 *
 * Why the build flags and attributes matter: uprobes are per address. If the compiler or linker folded two
 * functions with the same body into one address (identical code folding), a probe on cuMemcpyDtoD_v2 would also
 * fire for cuMemcpy. Each exported function therefore counts itself into its own slot (so no two bodies are
 * identical), is marked noinline/used, and the library is built with -fno-ipa-icf -fno-inline. Exported
 * functions never call each other (that would fire two probes for one call); they share static helpers only.
 *
 * Environment (read once at load):
 *   FAKE_CUDA_SYNC_US       microseconds each sync call blocks (cuStreamSynchronize, cuCtxSynchronize,
 *                           cuEventSynchronize); default 200, 0 = return at once
 *   FAKE_CUDA_SYNC_SPIN     1 = busy-wait instead of sleeping (keeps the thread on CPU, like a spinning driver)
 *   FAKE_CUDA_DEVICE_COUNT  devices reported (default 1, at most 16)
 *   FAKE_CUDA_MEM_BYTES     device memory capacity; allocations beyond it fail with OUT_OF_MEMORY (default 80 GiB)
 *   FAKE_CUDA_STATS         path: at exit, write {"pid","calls","errors"} as counted by the library itself
 */
#define _GNU_SOURCE
#include "cuda_min.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define CU_EXPORT __attribute__((visibility("default"), noinline, used))
#define ALWAYS_INLINE static inline __attribute__((always_inline))

typedef unsigned long long u64;

/* ------------------------------------------------------------------ per-function self-accounting */

#define FAKE_FUNCS(X)                                                                                        \
    X(cuInit) X(cuDriverGetVersion) X(cuDeviceGet) X(cuDeviceGetCount) X(cuDevicePrimaryCtxRetain)          \
    X(cuDevicePrimaryCtxGetState) X(cuDevicePrimaryCtxRelease_v2) X(cuCtxCreate_v2) X(cuCtxDestroy_v2)      \
    X(cuCtxSetCurrent) X(cuCtxGetCurrent) X(cuCtxGetDevice) X(cuCtxSynchronize) X(cuGetErrorName)           \
    X(cuGetErrorString) X(cuStreamCreate) X(cuStreamDestroy_v2) X(cuStreamSynchronize) X(cuStreamWaitEvent) \
    X(cuEventCreate) X(cuEventRecord) X(cuEventRecordWithFlags) X(cuEventSynchronize) X(cuEventDestroy_v2) X(cuGraphCreate)           \
    X(cuGraphInstantiateWithFlags) X(cuGraphExecDestroy) X(cuGraphDestroy) X(cuGraphLaunch)                 \
    X(cuModuleLoadData) X(cuModuleLoadDataEx) X(cuModuleUnload) X(cuModuleGetFunction) X(cuLibraryLoadData) \
    X(cuLibraryUnload) X(cuLibraryGetKernel) X(cuKernelGetFunction) X(cuFuncGetName) X(cuKernelGetName)     \
    X(cuLaunchKernel) X(cuLaunchKernelEx)                                                                   \
    X(cuLaunchCooperativeKernel) X(cuMemAlloc_v2) X(cuMemAllocAsync) X(cuMemAllocManaged)                   \
    X(cuMemAllocHost_v2) X(cuMemHostAlloc) X(cuMemCreate) X(cuMemFree_v2) X(cuMemFreeAsync) X(cuMemFreeHost) \
    X(cuMemRelease) X(cuMemcpy) X(cuMemcpyAsync) X(cuMemcpyHtoD_v2) X(cuMemcpyDtoH_v2) X(cuMemcpyDtoD_v2)    \
    X(cuMemcpyHtoDAsync_v2) X(cuMemcpyDtoHAsync_v2) X(cuMemcpyDtoDAsync_v2) X(cuMemcpyPeer)                 \
    X(cuMemcpyPeerAsync) X(cuMemsetD8_v2) X(cuMemsetD16_v2) X(cuMemsetD32_v2) X(cuMemsetD8Async)           \
    X(cuMemsetD16Async) X(cuMemsetD32Async)

enum fake_fn {
#define X(n) FN_##n,
    FAKE_FUNCS(X)
#undef X
        FN_COUNT
};

static const char *const fn_names[FN_COUNT] = {
#define X(n) #n,
    FAKE_FUNCS(X)
#undef X
};

static u64 fn_calls[FN_COUNT];
static u64 fn_errors[FN_COUNT];

/* Every exported function returns through here: counting makes each body unique (see the top of the file). */
ALWAYS_INLINE CUresult done(enum fake_fn fn, CUresult r)
{
    __atomic_fetch_add(&fn_calls[fn], 1, __ATOMIC_RELAXED);
    if (r != CUDA_SUCCESS)
        __atomic_fetch_add(&fn_errors[fn], 1, __ATOMIC_RELAXED);
    return r;
}

/* ------------------------------------------------------------------ settings */

static int g_initialized;
static u64 g_sync_ns = 200 * 1000ULL;
static int g_sync_spin;
static int g_device_count = 1;
static u64 g_dev_capacity = 80ULL << 30;
static const char *g_stats_path;

static u64 env_u64(const char *name, u64 dflt)
{
    const char *v = getenv(name);
    char *end;
    if (!v || !*v)
        return dflt;
    errno = 0;
    u64 x = strtoull(v, &end, 10);
    return (errno || *end) ? dflt : x;
}

__attribute__((constructor)) static void fake_cuda_load(void)
{
    g_sync_ns = env_u64("FAKE_CUDA_SYNC_US", 200) * 1000ULL;
    g_sync_spin = env_u64("FAKE_CUDA_SYNC_SPIN", 0) != 0;
    g_device_count = (int)env_u64("FAKE_CUDA_DEVICE_COUNT", 1);
    if (g_device_count < 1 || g_device_count > 16)
        g_device_count = 1;
    g_dev_capacity = env_u64("FAKE_CUDA_MEM_BYTES", 80ULL << 30);
    g_stats_path = getenv("FAKE_CUDA_STATS");
}

__attribute__((destructor)) static void fake_cuda_unload(void)
{
    if (!g_stats_path || !*g_stats_path)
        return;
    FILE *f = fopen(g_stats_path, "w");
    if (!f)
        return;
    fprintf(f, "{\"pid\":%d,\"calls\":{", (int)getpid());
    const char *sep = "";
    for (int i = 0; i < FN_COUNT; i++) {
        u64 n = __atomic_load_n(&fn_calls[i], __ATOMIC_RELAXED);
        if (n) {
            fprintf(f, "%s\"%s\":%llu", sep, fn_names[i], n);
            sep = ",";
        }
    }
    fprintf(f, "},\"errors\":{");
    sep = "";
    for (int i = 0; i < FN_COUNT; i++) {
        u64 n = __atomic_load_n(&fn_errors[i], __ATOMIC_RELAXED);
        if (n) {
            fprintf(f, "%s\"%s\":%llu", sep, fn_names[i], n);
            sep = ",";
        }
    }
    fprintf(f, "}}\n");
    fclose(f);
}

#define REQUIRE_INIT(fn)                                                                                     \
    do {                                                                                                     \
        if (!__atomic_load_n(&g_initialized, __ATOMIC_ACQUIRE))                                              \
            return done(fn, CUDA_ERROR_NOT_INITIALIZED);                                                     \
    } while (0)

/* ------------------------------------------------------------------ handles
 *
 * A handle is HANDLE_BASE | type << 32 | sequence number. Checking a handle's type is then a mask, with no lock,
 * which keeps the launch path (the hot one) lock-free while still rejecting garbage with the real error code.
 * Objects that carry data (contexts, modules, libraries, functions, kernels) are also kept in the registry.
 */
#define HANDLE_BASE 0x00007e0000000000ULL
#define HANDLE_MASK 0xffffff0000000000ULL

enum htype {
    H_CONTEXT = 1,
    H_MODULE,
    H_FUNCTION,
    H_LIBRARY,
    H_KERNEL,
    H_STREAM,
    H_EVENT,
    H_GRAPH,
    H_GRAPHEXEC,
    H_MEMHANDLE,
};

static u64 g_handle_seq;

/* ------------------------------------------------------------------ CUfunction / CUkernel objects
 *
 * As in NVIDIA's driver (measured on 580.159.04 / CUDA 13.0 / H200 with bench/gpu/late_attach.py, results in
 * bench/results/late-attach-h200.json), a CUfunction or CUkernel handle is the address of a driver object that
 * starts with its type (u32: 1 CUfunction, 2 CUkernel; a CUfunction's first u64 reads 0x1_0000_0001) and holds at
 * offset 8 the pointer to the kernel's name — the pointer cuFuncGetName / cuKernelGetName return; a kernel's
 * CUfunction points at the very string of its CUkernel. otel_cuda/late_names.py reads exactly these words from
 * /proc/PID/mem to name kernels loaded before the sidecar attached, so the test bed runs the same code path.
 *
 * The objects are slots of one anonymous mapping (the driver's are heap objects: anonymous memory too), so the
 * launch path checks a handle without a lock and never dereferences a pointer it was not given: in range,
 * slot-aligned, a slot already handed out, and the type word of that kind.
 */
#define KOBJ_SIZE 128       /* bytes per object slot */
#define KOBJ_MAX (1u << 17) /* slots (16 MiB reserved, touched only as used) */
#define KOBJ_TYPE_OFF 0     /* u32 type; the u32 after it is 1 in a CUfunction, 0 in a CUkernel */
#define KOBJ_NAME_OFF 8     /* the name pointer */
#define KOBJ_FUNCTION 0x100000001ULL
#define KOBJ_KERNEL 0x2ULL

static unsigned char *g_kobj;
static unsigned g_kobj_used;

__attribute__((constructor)) static void kobj_reserve(void)
{
    void *p = mmap(NULL, (size_t)KOBJ_SIZE * KOBJ_MAX, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    g_kobj = p == MAP_FAILED ? NULL : p;
}

static void put64(unsigned char *o, unsigned off, u64 v)
{
    memcpy(o + off, &v, sizeof(v));
}

static u64 get64(const void *o, unsigned off)
{
    u64 v;
    memcpy(&v, (const unsigned char *)o + off, sizeof(v));
    return v;
}

/* Callers hold g_lock. A new CUfunction / CUkernel object whose name pointer is `name`. */
static u64 kobj_new(enum htype t, const char *name)
{
    if (!g_kobj || g_kobj_used >= KOBJ_MAX)
        return 0;
    unsigned char *o = g_kobj + (size_t)g_kobj_used * KOBJ_SIZE;
    put64(o, KOBJ_TYPE_OFF, t == H_KERNEL ? KOBJ_KERNEL : KOBJ_FUNCTION);
    put64(o, KOBJ_NAME_OFF, (u64)(uintptr_t)name);
    __atomic_store_n(&g_kobj_used, g_kobj_used + 1, __ATOMIC_RELEASE);
    return (u64)(uintptr_t)o;
}

ALWAYS_INLINE int is_kobj(const void *p, enum htype t)
{
    uintptr_t a = (uintptr_t)p, base = (uintptr_t)g_kobj;
    if (!g_kobj || a < base || (a - base) % KOBJ_SIZE)
        return 0;
    if ((a - base) / KOBJ_SIZE >= __atomic_load_n(&g_kobj_used, __ATOMIC_ACQUIRE))
        return 0;
    return get64(p, KOBJ_TYPE_OFF) == (t == H_KERNEL ? KOBJ_KERNEL : KOBJ_FUNCTION);
}

static u64 new_handle(enum htype t)
{
    u64 n = __atomic_add_fetch(&g_handle_seq, 1, __ATOMIC_RELAXED) & 0xffffffffULL;
    return HANDLE_BASE | ((u64)t << 32) | n;
}

ALWAYS_INLINE int is_handle(const void *p, enum htype t)
{
    if (t == H_FUNCTION || t == H_KERNEL)
        return is_kobj(p, t);
    u64 h = (u64)(uintptr_t)p, n = h & 0xffffffffULL;
    return (h & HANDLE_MASK) == HANDLE_BASE && ((h >> 32) & 0xff) == (u64)t && n != 0 &&
           n <= (__atomic_load_n(&g_handle_seq, __ATOMIC_RELAXED) & 0xffffffffULL);
}

ALWAYS_INLINE int stream_ok(CUstream s)
{
    return s == NULL || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD || is_handle(s, H_STREAM);
}

/* ------------------------------------------------------------------ registry (named objects) */

#define NBUCKETS 4096

struct obj {
    u64 handle;
    u64 parent; /* module / library for functions and kernels; kernel for a kernel's function */
    int type;
    int device; /* contexts */
    u64 func;   /* kernels: the CUfunction cuKernelGetFunction hands out, 0 until asked */
    char *name;
    struct obj *next_by_handle;
    struct obj *next_by_name;
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static struct obj *g_by_handle[NBUCKETS];
static struct obj *g_by_name[NBUCKETS];

static size_t hash_u64(u64 x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)(x % NBUCKETS);
}

static size_t hash_name(u64 parent, const char *name)
{
    u64 h = 1469598103934665603ULL ^ parent; /* FNV-1a over the name, seeded with the parent */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        h = (h ^ *p) * 1099511628211ULL;
    return hash_u64(h);
}

/* Callers hold g_lock. */
static struct obj *obj_find(u64 handle, int type)
{
    for (struct obj *o = g_by_handle[hash_u64(handle)]; o; o = o->next_by_handle)
        if (o->handle == handle)
            return o->type == type ? o : NULL;
    return NULL;
}

static struct obj *obj_find_name(u64 parent, int type, const char *name)
{
    for (struct obj *o = g_by_name[hash_name(parent, name)]; o; o = o->next_by_name)
        if (o->parent == parent && o->type == type && strcmp(o->name, name) == 0)
            return o;
    return NULL;
}

static struct obj *obj_add(int type, u64 parent, const char *name)
{
    struct obj *o = calloc(1, sizeof(*o));
    if (!o)
        return NULL;
    if (name && !(o->name = strdup(name))) {
        free(o);
        return NULL;
    }
    o->handle = (type == H_FUNCTION || type == H_KERNEL) ? kobj_new(type, o->name) : new_handle(type);
    if (!o->handle) {
        free(o->name);
        free(o);
        return NULL;
    }
    o->parent = parent;
    o->type = type;
    size_t b = hash_u64(o->handle);
    o->next_by_handle = g_by_handle[b];
    g_by_handle[b] = o;
    if (name) {
        b = hash_name(parent, name);
        o->next_by_name = g_by_name[b];
        g_by_name[b] = o;
    }
    return o;
}

/* Only unnamed objects (contexts, modules, libraries) are ever removed; functions and kernels live forever,
 * as their handles may still be cached by the caller after an unload. */
static int obj_remove(u64 handle, int type)
{
    struct obj **pp = &g_by_handle[hash_u64(handle)];
    for (; *pp; pp = &(*pp)->next_by_handle) {
        struct obj *o = *pp;
        if (o->handle == handle && o->type == type && !o->name) {
            *pp = o->next_by_handle;
            free(o);
            return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ memory
 *
 * Device allocations are carved from a bump range starting at 0x7f00_0000_0000 and never touched. Host, pinned
 * and managed allocations are real malloc'd memory because callers read and write them from the CPU.
 */
#define DEV_BASE 0x00007f0000000000ULL
#define DEV_END 0x00007ff000000000ULL
#define DEV_ALIGN 512ULL

enum akind {
    A_DEVICE = 1, /* cuMemAlloc_v2 / cuMemAllocAsync */
    A_MANAGED,    /* cuMemAllocManaged */
    A_HOST,       /* cuMemAllocHost_v2 / cuMemHostAlloc */
    A_PHYS,       /* cuMemCreate: the key is the CUmemGenericAllocationHandle */
};

struct alloc {
    u64 key;
    size_t size;
    int kind;
    struct alloc *next;
};

static struct alloc *g_allocs[NBUCKETS];
static u64 g_dev_next = DEV_BASE;
static u64 g_dev_live; /* device + physical bytes, against g_dev_capacity */

/* Callers hold g_lock. */
static int alloc_add(u64 key, size_t size, int kind)
{
    struct alloc *a = malloc(sizeof(*a));
    if (!a)
        return 0;
    a->key = key;
    a->size = size;
    a->kind = kind;
    size_t b = hash_u64(key);
    a->next = g_allocs[b];
    g_allocs[b] = a;
    return 1;
}

/* Removes the record if its kind is one of kinds_mask (bit per enum akind); returns it detached, or NULL. */
static struct alloc *alloc_take(u64 key, unsigned kinds_mask)
{
    struct alloc **pp = &g_allocs[hash_u64(key)];
    for (; *pp; pp = &(*pp)->next) {
        struct alloc *a = *pp;
        if (a->key == key) {
            if (!(kinds_mask & (1u << a->kind)))
                return NULL;
            *pp = a->next;
            return a;
        }
    }
    return NULL;
}

static CUresult device_alloc(CUdeviceptr *dptr, size_t bytesize)
{
    if (!dptr || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    u64 span = (bytesize + DEV_ALIGN - 1) & ~(DEV_ALIGN - 1);
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_lock);
    if (span < bytesize || g_dev_live + bytesize > g_dev_capacity || g_dev_next + span > DEV_END) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
    } else if (!alloc_add(g_dev_next, bytesize, A_DEVICE)) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        *dptr = g_dev_next;
        g_dev_next += span;
        g_dev_live += bytesize;
    }
    pthread_mutex_unlock(&g_lock);
    return r;
}

static CUresult host_alloc(void **out, size_t bytesize, int kind)
{
    if (!out || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    void *p = NULL;
    if (posix_memalign(&p, 4096, bytesize) != 0)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&g_lock);
    int ok = alloc_add((u64)(uintptr_t)p, bytesize, kind);
    pthread_mutex_unlock(&g_lock);
    if (!ok) {
        free(p);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *out = p;
    return CUDA_SUCCESS;
}

/* cuMemFree_v2 / cuMemFreeAsync: device or managed memory. */
static CUresult device_free(CUdeviceptr dptr)
{
    if (dptr == 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    struct alloc *a = alloc_take(dptr, 1u << A_DEVICE | 1u << A_MANAGED);
    if (a && a->kind == A_DEVICE)
        g_dev_live -= a->size;
    pthread_mutex_unlock(&g_lock);
    if (!a)
        return CUDA_ERROR_INVALID_VALUE;
    if (a->kind == A_MANAGED)
        free((void *)(uintptr_t)dptr);
    free(a);
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------ time */

static void sync_wait(void)
{
    if (!g_sync_ns)
        return;
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    u64 t = (u64)dl.tv_sec * 1000000000ULL + (u64)dl.tv_nsec + g_sync_ns;
    dl.tv_sec = (time_t)(t / 1000000000ULL);
    dl.tv_nsec = (long)(t % 1000000000ULL);
    if (g_sync_spin) {
        struct timespec now;
        do
            clock_gettime(CLOCK_MONOTONIC, &now);
        while ((u64)now.tv_sec * 1000000000ULL + (u64)now.tv_nsec < t);
        return;
    }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL) == EINTR)
        ;
}

/* ------------------------------------------------------------------ lifecycle, devices, contexts */

static u64 g_primary[16];
static int g_primary_refs[16];
static __thread u64 tls_ctx;
static __thread int tls_ctx_device;

CU_EXPORT CUresult cuInit(unsigned int Flags)
{
    if (Flags != 0)
        return done(FN_cuInit, CUDA_ERROR_INVALID_VALUE);
    __atomic_store_n(&g_initialized, 1, __ATOMIC_RELEASE);
    return done(FN_cuInit, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuDriverGetVersion(int *driverVersion)
{
    if (!driverVersion)
        return done(FN_cuDriverGetVersion, CUDA_ERROR_INVALID_VALUE);
    *driverVersion = CUDA_VERSION;
    return done(FN_cuDriverGetVersion, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuDeviceGet(CUdevice *device, int ordinal)
{
    REQUIRE_INIT(FN_cuDeviceGet);
    if (!device)
        return done(FN_cuDeviceGet, CUDA_ERROR_INVALID_VALUE);
    if (ordinal < 0 || ordinal >= g_device_count)
        return done(FN_cuDeviceGet, CUDA_ERROR_INVALID_DEVICE);
    *device = ordinal;
    return done(FN_cuDeviceGet, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuDeviceGetCount(int *count)
{
    REQUIRE_INIT(FN_cuDeviceGetCount);
    if (!count)
        return done(FN_cuDeviceGetCount, CUDA_ERROR_INVALID_VALUE);
    *count = g_device_count;
    return done(FN_cuDeviceGetCount, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    REQUIRE_INIT(FN_cuDevicePrimaryCtxRetain);
    if (!pctx)
        return done(FN_cuDevicePrimaryCtxRetain, CUDA_ERROR_INVALID_VALUE);
    if (dev < 0 || dev >= g_device_count)
        return done(FN_cuDevicePrimaryCtxRetain, CUDA_ERROR_INVALID_DEVICE);
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_lock);
    if (!g_primary[dev]) { /* the primary context is one per device, the same handle every time */
        struct obj *o = obj_add(H_CONTEXT, 0, NULL);
        if (o) {
            o->device = dev;
            g_primary[dev] = o->handle;
        }
    }
    if (g_primary[dev]) {
        g_primary_refs[dev]++;
        *pctx = (CUcontext)(uintptr_t)g_primary[dev];
    } else {
        r = CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_mutex_unlock(&g_lock);
    return done(FN_cuDevicePrimaryCtxRetain, r);
}

CU_EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active)
{
    REQUIRE_INIT(FN_cuDevicePrimaryCtxGetState);
    if (!flags || !active)
        return done(FN_cuDevicePrimaryCtxGetState, CUDA_ERROR_INVALID_VALUE);
    if (dev < 0 || dev >= g_device_count)
        return done(FN_cuDevicePrimaryCtxGetState, CUDA_ERROR_INVALID_DEVICE);
    *flags = 0;
    *active = __atomic_load_n(&g_primary_refs[dev], __ATOMIC_RELAXED) > 0;
    return done(FN_cuDevicePrimaryCtxGetState, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    REQUIRE_INIT(FN_cuDevicePrimaryCtxRelease_v2);
    if (dev < 0 || dev >= g_device_count)
        return done(FN_cuDevicePrimaryCtxRelease_v2, CUDA_ERROR_INVALID_DEVICE);
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_lock);
    if (g_primary_refs[dev] > 0)
        g_primary_refs[dev]--;
    else
        r = CUDA_ERROR_INVALID_CONTEXT;
    pthread_mutex_unlock(&g_lock);
    return done(FN_cuDevicePrimaryCtxRelease_v2, r);
}

CU_EXPORT CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    REQUIRE_INIT(FN_cuCtxCreate_v2);
    if (!pctx || (flags & ~0xffu))
        return done(FN_cuCtxCreate_v2, CUDA_ERROR_INVALID_VALUE);
    if (dev < 0 || dev >= g_device_count)
        return done(FN_cuCtxCreate_v2, CUDA_ERROR_INVALID_DEVICE);
    pthread_mutex_lock(&g_lock);
    struct obj *o = obj_add(H_CONTEXT, 0, NULL);
    if (o)
        o->device = dev;
    pthread_mutex_unlock(&g_lock);
    if (!o)
        return done(FN_cuCtxCreate_v2, CUDA_ERROR_OUT_OF_MEMORY);
    /* a new context becomes current on the calling thread, as in the real driver */
    tls_ctx = o->handle;
    tls_ctx_device = dev;
    *pctx = (CUcontext)(uintptr_t)o->handle;
    return done(FN_cuCtxCreate_v2, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuCtxDestroy_v2(CUcontext ctx)
{
    REQUIRE_INIT(FN_cuCtxDestroy_v2);
    u64 h = (u64)(uintptr_t)ctx;
    int ok = 0;
    pthread_mutex_lock(&g_lock);
    int primary = 0;
    for (int d = 0; d < g_device_count; d++)
        primary |= g_primary[d] == h;
    if (!primary)
        ok = obj_remove(h, H_CONTEXT);
    pthread_mutex_unlock(&g_lock);
    if (!ok)
        return done(FN_cuCtxDestroy_v2, CUDA_ERROR_INVALID_CONTEXT);
    if (tls_ctx == h)
        tls_ctx = 0;
    return done(FN_cuCtxDestroy_v2, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx)
{
    REQUIRE_INIT(FN_cuCtxSetCurrent);
    u64 h = (u64)(uintptr_t)ctx;
    if (h == 0) {
        tls_ctx = 0;
        return done(FN_cuCtxSetCurrent, CUDA_SUCCESS);
    }
    pthread_mutex_lock(&g_lock);
    struct obj *o = obj_find(h, H_CONTEXT);
    int dev = o ? o->device : 0;
    pthread_mutex_unlock(&g_lock);
    if (!o)
        return done(FN_cuCtxSetCurrent, CUDA_ERROR_INVALID_CONTEXT);
    tls_ctx = h;
    tls_ctx_device = dev;
    return done(FN_cuCtxSetCurrent, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuCtxGetCurrent(CUcontext *pctx)
{
    REQUIRE_INIT(FN_cuCtxGetCurrent);
    if (!pctx)
        return done(FN_cuCtxGetCurrent, CUDA_ERROR_INVALID_VALUE);
    *pctx = (CUcontext)(uintptr_t)tls_ctx;
    return done(FN_cuCtxGetCurrent, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuCtxGetDevice(CUdevice *device)
{
    REQUIRE_INIT(FN_cuCtxGetDevice);
    if (!device)
        return done(FN_cuCtxGetDevice, CUDA_ERROR_INVALID_VALUE);
    if (!tls_ctx)
        return done(FN_cuCtxGetDevice, CUDA_ERROR_INVALID_CONTEXT);
    *device = tls_ctx_device;
    return done(FN_cuCtxGetDevice, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuCtxSynchronize(void)
{
    REQUIRE_INIT(FN_cuCtxSynchronize);
    if (!tls_ctx)
        return done(FN_cuCtxSynchronize, CUDA_ERROR_INVALID_CONTEXT);
    sync_wait();
    return done(FN_cuCtxSynchronize, CUDA_SUCCESS);
}

/* ------------------------------------------------------------------ errors */

static const struct {
    CUresult code;
    const char *name;
    const char *text;
} g_errors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_DEINITIALIZED, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_INVALID_PTX, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {CUDA_ERROR_INVALID_SOURCE, "CUDA_ERROR_INVALID_SOURCE", "device kernel image is invalid"},
    {CUDA_ERROR_FILE_NOT_FOUND, "CUDA_ERROR_FILE_NOT_FOUND", "file not found"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE", "too many blocks in cooperative launch"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static int error_index(CUresult e)
{
    for (size_t i = 0; i < sizeof(g_errors) / sizeof(g_errors[0]); i++)
        if (g_errors[i].code == e)
            return (int)i;
    return -1;
}

/* cuGetErrorName/String work before cuInit, as in the real driver. */
CU_EXPORT CUresult cuGetErrorName(CUresult error, const char **pStr)
{
    int i = error_index(error);
    if (!pStr)
        return done(FN_cuGetErrorName, CUDA_ERROR_INVALID_VALUE);
    *pStr = i < 0 ? NULL : g_errors[i].name;
    return done(FN_cuGetErrorName, i < 0 ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS);
}

CU_EXPORT CUresult cuGetErrorString(CUresult error, const char **pStr)
{
    int i = error_index(error);
    if (!pStr)
        return done(FN_cuGetErrorString, CUDA_ERROR_INVALID_VALUE);
    *pStr = i < 0 ? NULL : g_errors[i].text;
    return done(FN_cuGetErrorString, i < 0 ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS);
}

/* ------------------------------------------------------------------ streams, events, graphs */

CU_EXPORT CUresult cuStreamCreate(CUstream *phStream, unsigned int Flags)
{
    REQUIRE_INIT(FN_cuStreamCreate);
    if (!phStream || (Flags & ~(unsigned)CU_STREAM_NON_BLOCKING))
        return done(FN_cuStreamCreate, CUDA_ERROR_INVALID_VALUE);
    *phStream = (CUstream)(uintptr_t)new_handle(H_STREAM);
    return done(FN_cuStreamCreate, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuStreamDestroy_v2(CUstream hStream)
{
    REQUIRE_INIT(FN_cuStreamDestroy_v2);
    return done(FN_cuStreamDestroy_v2, is_handle(hStream, H_STREAM) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE);
}

CU_EXPORT CUresult cuStreamSynchronize(CUstream hStream)
{
    REQUIRE_INIT(FN_cuStreamSynchronize);
    if (!stream_ok(hStream))
        return done(FN_cuStreamSynchronize, CUDA_ERROR_INVALID_HANDLE);
    sync_wait();
    return done(FN_cuStreamSynchronize, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags)
{
    REQUIRE_INIT(FN_cuStreamWaitEvent);
    if (Flags & ~1u)
        return done(FN_cuStreamWaitEvent, CUDA_ERROR_INVALID_VALUE);
    if (!stream_ok(hStream) || !is_handle(hEvent, H_EVENT))
        return done(FN_cuStreamWaitEvent, CUDA_ERROR_INVALID_HANDLE);
    return done(FN_cuStreamWaitEvent, CUDA_SUCCESS); /* a device-side wait: the host returns at once */
}

CU_EXPORT CUresult cuEventCreate(CUevent *phEvent, unsigned int Flags)
{
    REQUIRE_INIT(FN_cuEventCreate);
    if (!phEvent || (Flags & ~0xfu))
        return done(FN_cuEventCreate, CUDA_ERROR_INVALID_VALUE);
    *phEvent = (CUevent)(uintptr_t)new_handle(H_EVENT);
    return done(FN_cuEventCreate, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuEventRecord(CUevent hEvent, CUstream hStream)
{
    REQUIRE_INIT(FN_cuEventRecord);
    if (!is_handle(hEvent, H_EVENT) || !stream_ok(hStream))
        return done(FN_cuEventRecord, CUDA_ERROR_INVALID_HANDLE);
    return done(FN_cuEventRecord, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuEventRecordWithFlags(CUevent hEvent, CUstream hStream, unsigned int flags)
{
    REQUIRE_INIT(FN_cuEventRecordWithFlags);
    if (flags & ~1u) /* CU_EVENT_RECORD_EXTERNAL */
        return done(FN_cuEventRecordWithFlags, CUDA_ERROR_INVALID_VALUE);
    if (!is_handle(hEvent, H_EVENT) || !stream_ok(hStream))
        return done(FN_cuEventRecordWithFlags, CUDA_ERROR_INVALID_HANDLE);
    return done(FN_cuEventRecordWithFlags, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuEventSynchronize(CUevent hEvent)
{
    REQUIRE_INIT(FN_cuEventSynchronize);
    if (!is_handle(hEvent, H_EVENT))
        return done(FN_cuEventSynchronize, CUDA_ERROR_INVALID_HANDLE);
    sync_wait();
    return done(FN_cuEventSynchronize, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuEventDestroy_v2(CUevent hEvent)
{
    REQUIRE_INIT(FN_cuEventDestroy_v2);
    return done(FN_cuEventDestroy_v2, is_handle(hEvent, H_EVENT) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE);
}

CU_EXPORT CUresult cuGraphCreate(CUgraph *phGraph, unsigned int flags)
{
    REQUIRE_INIT(FN_cuGraphCreate);
    if (!phGraph || flags != 0)
        return done(FN_cuGraphCreate, CUDA_ERROR_INVALID_VALUE);
    *phGraph = (CUgraph)(uintptr_t)new_handle(H_GRAPH);
    return done(FN_cuGraphCreate, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuGraphInstantiateWithFlags(CUgraphExec *phGraphExec, CUgraph hGraph, unsigned long long flags)
{
    REQUIRE_INIT(FN_cuGraphInstantiateWithFlags);
    if (!phGraphExec || (flags & ~0xfULL))
        return done(FN_cuGraphInstantiateWithFlags, CUDA_ERROR_INVALID_VALUE);
    if (!is_handle(hGraph, H_GRAPH))
        return done(FN_cuGraphInstantiateWithFlags, CUDA_ERROR_INVALID_HANDLE);
    *phGraphExec = (CUgraphExec)(uintptr_t)new_handle(H_GRAPHEXEC);
    return done(FN_cuGraphInstantiateWithFlags, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuGraphExecDestroy(CUgraphExec hGraphExec)
{
    REQUIRE_INIT(FN_cuGraphExecDestroy);
    return done(FN_cuGraphExecDestroy,
                is_handle(hGraphExec, H_GRAPHEXEC) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE);
}

CU_EXPORT CUresult cuGraphDestroy(CUgraph hGraph)
{
    REQUIRE_INIT(FN_cuGraphDestroy);
    return done(FN_cuGraphDestroy, is_handle(hGraph, H_GRAPH) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE);
}

CU_EXPORT CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)
{
    REQUIRE_INIT(FN_cuGraphLaunch);
    if (!is_handle(hGraphExec, H_GRAPHEXEC) || !stream_ok(hStream))
        return done(FN_cuGraphLaunch, CUDA_ERROR_INVALID_HANDLE);
    return done(FN_cuGraphLaunch, CUDA_SUCCESS);
}

/* ------------------------------------------------------------------ modules, libraries, names */

static CUresult load_container(u64 *out, int type, const void *image)
{
    if (!out || !image)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    struct obj *o = obj_add(type, 0, NULL);
    pthread_mutex_unlock(&g_lock);
    if (!o)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *out = o->handle;
    return CUDA_SUCCESS;
}

/* The real driver answers NOT_FOUND for a name the image lacks; here every name exists except the empty one
 * and those starting with "missing", so tests can ask for a failure by name. The same (parent, name) always
 * yields the same handle. */
static CUresult get_named(u64 *out, u64 parent, int parent_type, int type, const char *name)
{
    if (!out || !name)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_lock);
    if (!obj_find(parent, parent_type)) {
        r = CUDA_ERROR_INVALID_HANDLE;
    } else if (!*name || strncmp(name, "missing", 7) == 0) {
        r = CUDA_ERROR_NOT_FOUND;
    } else {
        struct obj *o = obj_find_name(parent, type, name);
        if (!o)
            o = obj_add(type, parent, name);
        if (o)
            *out = o->handle;
        else
            r = CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_mutex_unlock(&g_lock);
    return r;
}

CU_EXPORT CUresult cuModuleLoadData(CUmodule *module, const void *image)
{
    REQUIRE_INIT(FN_cuModuleLoadData);
    return done(FN_cuModuleLoadData, load_container((u64 *)module, H_MODULE, image));
}

CU_EXPORT CUresult cuModuleLoadDataEx(CUmodule *module, const void *image, unsigned int numOptions,
                                      CUjit_option *options, void **optionValues)
{
    REQUIRE_INIT(FN_cuModuleLoadDataEx);
    if (numOptions && (!options || !optionValues))
        return done(FN_cuModuleLoadDataEx, CUDA_ERROR_INVALID_VALUE);
    for (unsigned i = 0; i < numOptions; i++)
        if ((unsigned)options[i] >= CU_JIT_NUM_OPTIONS)
            return done(FN_cuModuleLoadDataEx, CUDA_ERROR_INVALID_VALUE);
    return done(FN_cuModuleLoadDataEx, load_container((u64 *)module, H_MODULE, image));
}

CU_EXPORT CUresult cuModuleUnload(CUmodule hmod)
{
    REQUIRE_INIT(FN_cuModuleUnload);
    pthread_mutex_lock(&g_lock);
    int ok = obj_remove((u64)(uintptr_t)hmod, H_MODULE);
    pthread_mutex_unlock(&g_lock);
    return done(FN_cuModuleUnload, ok ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE);
}

CU_EXPORT CUresult cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name)
{
    REQUIRE_INIT(FN_cuModuleGetFunction);
    return done(FN_cuModuleGetFunction,
                get_named((u64 *)hfunc, (u64)(uintptr_t)hmod, H_MODULE, H_FUNCTION, name));
}

CU_EXPORT CUresult cuLibraryLoadData(CUlibrary *library, const void *code, CUjit_option *jitOptions,
                                     void **jitOptionsValues, unsigned int numJitOptions,
                                     CUlibraryOption *libraryOptions, void **libraryOptionValues,
                                     unsigned int numLibraryOptions)
{
    REQUIRE_INIT(FN_cuLibraryLoadData);
    if ((numJitOptions && (!jitOptions || !jitOptionsValues)) ||
        (numLibraryOptions && (!libraryOptions || !libraryOptionValues)))
        return done(FN_cuLibraryLoadData, CUDA_ERROR_INVALID_VALUE);
    return done(FN_cuLibraryLoadData, load_container((u64 *)library, H_LIBRARY, code));
}

CU_EXPORT CUresult cuLibraryUnload(CUlibrary library)
{
    REQUIRE_INIT(FN_cuLibraryUnload);
    pthread_mutex_lock(&g_lock);
    int ok = obj_remove((u64)(uintptr_t)library, H_LIBRARY);
    pthread_mutex_unlock(&g_lock);
    return done(FN_cuLibraryUnload, ok ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE);
}

CU_EXPORT CUresult cuLibraryGetKernel(CUkernel *pKernel, CUlibrary library, const char *name)
{
    REQUIRE_INIT(FN_cuLibraryGetKernel);
    return done(FN_cuLibraryGetKernel,
                get_named((u64 *)pKernel, (u64)(uintptr_t)library, H_LIBRARY, H_KERNEL, name));
}

/* A CUkernel is context-independent; the CUfunction for the current context is a distinct handle, stable per
 * kernel (one context here). */
CU_EXPORT CUresult cuKernelGetFunction(CUfunction *pFunc, CUkernel kernel)
{
    REQUIRE_INIT(FN_cuKernelGetFunction);
    if (!pFunc)
        return done(FN_cuKernelGetFunction, CUDA_ERROR_INVALID_VALUE);
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_lock);
    struct obj *k = obj_find((u64)(uintptr_t)kernel, H_KERNEL);
    if (!k) {
        r = CUDA_ERROR_INVALID_HANDLE;
    } else {
        if (!k->func) {
            struct obj *f = obj_add(H_FUNCTION, k->handle, k->name);
            if (f) {
                /* as measured: the CUfunction of a CUkernel points at the kernel's own name string */
                put64((unsigned char *)(uintptr_t)f->handle, KOBJ_NAME_OFF, (u64)(uintptr_t)k->name);
                k->func = f->handle;
            }
        }
        if (k->func)
            *pFunc = (CUfunction)(uintptr_t)k->func;
        else
            r = CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_mutex_unlock(&g_lock);
    return done(FN_cuKernelGetFunction, r);
}

/* The name pointer the object holds (CUDA 12.3+). Declared here: cuda_min.h keeps to what the probes need. */
CUresult cuFuncGetName(const char **name, CUfunction hfunc);
CUresult cuKernelGetName(const char **name, CUkernel hkernel);

static CUresult kobj_name(const char **name, const void *h, enum htype t)
{
    if (!name)
        return CUDA_ERROR_INVALID_VALUE;
    if (!is_kobj(h, t))
        return CUDA_ERROR_INVALID_HANDLE;
    *name = (const char *)(uintptr_t)get64(h, KOBJ_NAME_OFF);
    return CUDA_SUCCESS;
}

CU_EXPORT CUresult cuFuncGetName(const char **name, CUfunction hfunc)
{
    REQUIRE_INIT(FN_cuFuncGetName);
    return done(FN_cuFuncGetName, kobj_name(name, hfunc, H_FUNCTION));
}

CU_EXPORT CUresult cuKernelGetName(const char **name, CUkernel hkernel)
{
    REQUIRE_INIT(FN_cuKernelGetName);
    return done(FN_cuKernelGetName, kobj_name(name, hkernel, H_KERNEL));
}

/* ------------------------------------------------------------------ launches (hot path: no locks) */

/* CUDA 12+ accepts a CUkernel wherever a CUfunction is expected, so both handle types launch. */
ALWAYS_INLINE CUresult check_launch(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                    unsigned bz, CUstream s)
{
    if (!is_handle(f, H_FUNCTION) && !is_handle(f, H_KERNEL))
        return CUDA_ERROR_INVALID_HANDLE;
    if (!gx || !gy || !gz || !bx || !by || !bz || (u64)bx * by * bz > 1024)
        return CUDA_ERROR_INVALID_VALUE;
    if (!stream_ok(s))
        return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS;
}

CU_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                                  unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
                                  unsigned int sharedMemBytes, CUstream hStream, void **kernelParams, void **extra)
{
    REQUIRE_INIT(FN_cuLaunchKernel);
    (void)sharedMemBytes;
    if (kernelParams && extra) /* the real driver takes one or the other */
        return done(FN_cuLaunchKernel, CUDA_ERROR_INVALID_VALUE);
    return done(FN_cuLaunchKernel,
                check_launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream));
}

CU_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **kernelParams, void **extra)
{
    REQUIRE_INIT(FN_cuLaunchKernelEx);
    if (!config || (config->numAttrs && !config->attrs) || (kernelParams && extra))
        return done(FN_cuLaunchKernelEx, CUDA_ERROR_INVALID_VALUE);
    return done(FN_cuLaunchKernelEx, check_launch(f, config->gridDimX, config->gridDimY, config->gridDimZ,
                                                  config->blockDimX, config->blockDimY, config->blockDimZ,
                                                  config->hStream));
}

/* An H100 has 132 SMs; a cooperative grid must be co-resident (at most 32 blocks per SM). */
#define COOP_MAX_BLOCKS (132ULL * 32)

CU_EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                             unsigned int gridDimZ, unsigned int blockDimX, unsigned int blockDimY,
                                             unsigned int blockDimZ, unsigned int sharedMemBytes, CUstream hStream,
                                             void **kernelParams)
{
    REQUIRE_INIT(FN_cuLaunchCooperativeKernel);
    (void)sharedMemBytes;
    (void)kernelParams;
    CUresult r = check_launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream);
    if (r == CUDA_SUCCESS && (u64)gridDimX * gridDimY * gridDimZ > COOP_MAX_BLOCKS)
        r = CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE;
    return done(FN_cuLaunchCooperativeKernel, r);
}

/* ------------------------------------------------------------------ allocation */

CU_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    REQUIRE_INIT(FN_cuMemAlloc_v2);
    return done(FN_cuMemAlloc_v2, device_alloc(dptr, bytesize));
}

CU_EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    REQUIRE_INIT(FN_cuMemAllocAsync);
    if (!stream_ok(hStream))
        return done(FN_cuMemAllocAsync, CUDA_ERROR_INVALID_HANDLE);
    return done(FN_cuMemAllocAsync, device_alloc(dptr, bytesize));
}

CU_EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)
{
    REQUIRE_INIT(FN_cuMemAllocManaged);
    if (!dptr || (flags != CU_MEM_ATTACH_GLOBAL && flags != CU_MEM_ATTACH_HOST))
        return done(FN_cuMemAllocManaged, CUDA_ERROR_INVALID_VALUE);
    void *p = NULL;
    CUresult r = host_alloc(&p, bytesize, A_MANAGED);
    if (r == CUDA_SUCCESS)
        *dptr = (CUdeviceptr)(uintptr_t)p;
    return done(FN_cuMemAllocManaged, r);
}

CU_EXPORT CUresult cuMemAllocHost_v2(void **pp, size_t bytesize)
{
    REQUIRE_INIT(FN_cuMemAllocHost_v2);
    return done(FN_cuMemAllocHost_v2, host_alloc(pp, bytesize, A_HOST));
}

CU_EXPORT CUresult cuMemHostAlloc(void **pp, size_t bytesize, unsigned int Flags)
{
    REQUIRE_INIT(FN_cuMemHostAlloc);
    if (Flags & ~(unsigned)(CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_WRITECOMBINED))
        return done(FN_cuMemHostAlloc, CUDA_ERROR_INVALID_VALUE);
    return done(FN_cuMemHostAlloc, host_alloc(pp, bytesize, A_HOST));
}

CU_EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                               unsigned long long flags)
{
    REQUIRE_INIT(FN_cuMemCreate);
    if (!handle || !prop || flags != 0 || size == 0 || size % FAKE_CUDA_MEM_GRANULARITY != 0 ||
        prop->type != CU_MEM_ALLOCATION_TYPE_PINNED || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return done(FN_cuMemCreate, CUDA_ERROR_INVALID_VALUE);
    if (prop->location.id < 0 || prop->location.id >= g_device_count)
        return done(FN_cuMemCreate, CUDA_ERROR_INVALID_DEVICE);
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_lock);
    u64 h = new_handle(H_MEMHANDLE);
    if (g_dev_live + size > g_dev_capacity || !alloc_add(h, size, A_PHYS)) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        g_dev_live += size;
        *handle = h;
    }
    pthread_mutex_unlock(&g_lock);
    return done(FN_cuMemCreate, r);
}

CU_EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    REQUIRE_INIT(FN_cuMemFree_v2);
    return done(FN_cuMemFree_v2, device_free(dptr));
}

CU_EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)
{
    REQUIRE_INIT(FN_cuMemFreeAsync);
    if (!stream_ok(hStream))
        return done(FN_cuMemFreeAsync, CUDA_ERROR_INVALID_HANDLE);
    return done(FN_cuMemFreeAsync, device_free(dptr));
}

CU_EXPORT CUresult cuMemFreeHost(void *p)
{
    REQUIRE_INIT(FN_cuMemFreeHost);
    if (!p)
        return done(FN_cuMemFreeHost, CUDA_ERROR_INVALID_VALUE);
    pthread_mutex_lock(&g_lock);
    struct alloc *a = alloc_take((u64)(uintptr_t)p, 1u << A_HOST);
    pthread_mutex_unlock(&g_lock);
    if (!a)
        return done(FN_cuMemFreeHost, CUDA_ERROR_INVALID_VALUE);
    free(a);
    free(p);
    return done(FN_cuMemFreeHost, CUDA_SUCCESS);
}

CU_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    REQUIRE_INIT(FN_cuMemRelease);
    pthread_mutex_lock(&g_lock);
    struct alloc *a = alloc_take(handle, 1u << A_PHYS);
    if (a)
        g_dev_live -= a->size;
    pthread_mutex_unlock(&g_lock);
    if (!a)
        return done(FN_cuMemRelease, CUDA_ERROR_INVALID_VALUE);
    free(a);
    return done(FN_cuMemRelease, CUDA_SUCCESS);
}

/* ------------------------------------------------------------------ copies and sets
 *
 * Only argument checks: device pointers are never dereferenced, and host buffers are left alone too, so a test
 * may pass any non-NULL address. Range checks against live allocations are deliberately absent (real code
 * copies into the middle of allocations all the time).
 */

ALWAYS_INLINE CUresult check_copy(u64 dst, u64 src, CUstream s)
{
    if (!dst || !src)
        return CUDA_ERROR_INVALID_VALUE;
    return stream_ok(s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

#define P(x) ((u64)(uintptr_t)(x))

CU_EXPORT CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount)
{
    REQUIRE_INIT(FN_cuMemcpy);
    (void)ByteCount;
    return done(FN_cuMemcpy, check_copy(dst, src, NULL));
}

CU_EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount, CUstream hStream)
{
    REQUIRE_INIT(FN_cuMemcpyAsync);
    (void)ByteCount;
    return done(FN_cuMemcpyAsync, check_copy(dst, src, hStream));
}

CU_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount)
{
    REQUIRE_INIT(FN_cuMemcpyHtoD_v2);
    (void)ByteCount;
    return done(FN_cuMemcpyHtoD_v2, check_copy(dstDevice, P(srcHost), NULL));
}

CU_EXPORT CUresult cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount)
{
    REQUIRE_INIT(FN_cuMemcpyDtoH_v2);
    (void)ByteCount;
    return done(FN_cuMemcpyDtoH_v2, check_copy(P(dstHost), srcDevice, NULL));
}

CU_EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount)
{
    REQUIRE_INIT(FN_cuMemcpyDtoD_v2);
    (void)ByteCount;
    return done(FN_cuMemcpyDtoD_v2, check_copy(dstDevice, srcDevice, NULL));
}

CU_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount,
                                        CUstream hStream)
{
    REQUIRE_INIT(FN_cuMemcpyHtoDAsync_v2);
    (void)ByteCount;
    return done(FN_cuMemcpyHtoDAsync_v2, check_copy(dstDevice, P(srcHost), hStream));
}

CU_EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount, CUstream hStream)
{
    REQUIRE_INIT(FN_cuMemcpyDtoHAsync_v2);
    (void)ByteCount;
    return done(FN_cuMemcpyDtoHAsync_v2, check_copy(P(dstHost), srcDevice, hStream));
}

CU_EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount,
                                        CUstream hStream)
{
    REQUIRE_INIT(FN_cuMemcpyDtoDAsync_v2);
    (void)ByteCount;
    return done(FN_cuMemcpyDtoDAsync_v2, check_copy(dstDevice, srcDevice, hStream));
}

ALWAYS_INLINE CUresult check_peer(CUcontext dctx, CUcontext sctx)
{
    return is_handle(dctx, H_CONTEXT) && is_handle(sctx, H_CONTEXT) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

CU_EXPORT CUresult cuMemcpyPeer(CUdeviceptr dstDevice, CUcontext dstContext, CUdeviceptr srcDevice,
                                CUcontext srcContext, size_t ByteCount)
{
    REQUIRE_INIT(FN_cuMemcpyPeer);
    (void)ByteCount;
    CUresult r = check_peer(dstContext, srcContext);
    return done(FN_cuMemcpyPeer, r ? r : check_copy(dstDevice, srcDevice, NULL));
}

CU_EXPORT CUresult cuMemcpyPeerAsync(CUdeviceptr dstDevice, CUcontext dstContext, CUdeviceptr srcDevice,
                                     CUcontext srcContext, size_t ByteCount, CUstream hStream)
{
    REQUIRE_INIT(FN_cuMemcpyPeerAsync);
    (void)ByteCount;
    CUresult r = check_peer(dstContext, srcContext);
    return done(FN_cuMemcpyPeerAsync, r ? r : check_copy(dstDevice, srcDevice, hStream));
}

/* The destination of a 16/32-bit memset must be aligned to its element size (the real driver checks it). */
ALWAYS_INLINE CUresult check_set(u64 dst, unsigned align, CUstream s)
{
    if (!dst || (dst & (align - 1)))
        return CUDA_ERROR_INVALID_VALUE;
    return stream_ok(s) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CU_EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dstDevice, unsigned char uc, size_t N)
{
    REQUIRE_INIT(FN_cuMemsetD8_v2);
    (void)uc;
    (void)N;
    return done(FN_cuMemsetD8_v2, check_set(dstDevice, 1, NULL));
}

CU_EXPORT CUresult cuMemsetD16_v2(CUdeviceptr dstDevice, unsigned short us, size_t N)
{
    REQUIRE_INIT(FN_cuMemsetD16_v2);
    (void)us;
    (void)N;
    return done(FN_cuMemsetD16_v2, check_set(dstDevice, 2, NULL));
}

CU_EXPORT CUresult cuMemsetD32_v2(CUdeviceptr dstDevice, unsigned int ui, size_t N)
{
    REQUIRE_INIT(FN_cuMemsetD32_v2);
    (void)ui;
    (void)N;
    return done(FN_cuMemsetD32_v2, check_set(dstDevice, 4, NULL));
}

CU_EXPORT CUresult cuMemsetD8Async(CUdeviceptr dstDevice, unsigned char uc, size_t N, CUstream hStream)
{
    REQUIRE_INIT(FN_cuMemsetD8Async);
    (void)uc;
    (void)N;
    return done(FN_cuMemsetD8Async, check_set(dstDevice, 1, hStream));
}

CU_EXPORT CUresult cuMemsetD16Async(CUdeviceptr dstDevice, unsigned short us, size_t N, CUstream hStream)
{
    REQUIRE_INIT(FN_cuMemsetD16Async);
    (void)us;
    (void)N;
    return done(FN_cuMemsetD16Async, check_set(dstDevice, 2, hStream));
}

CU_EXPORT CUresult cuMemsetD32Async(CUdeviceptr dstDevice, unsigned int ui, size_t N, CUstream hStream)
{
    REQUIRE_INIT(FN_cuMemsetD32Async);
    (void)ui;
    (void)N;
    return done(FN_cuMemsetD32Async, check_set(dstDevice, 4, hStream));
}
