/* fake_cudart.c — a tiny libcudart.so.13 over the fake driver.
 *
 * Each runtime entry point makes exactly one driver call (the mapping is in README.md), so a test can predict
 * what the driver probes see for a runtime call and check that the sidecar's per-thread nesting marker counts it
 * once. Same build rules as fake_cuda.c: distinct bodies, noinline, never one exported function calling another.
 *
 * The real runtime initialises the driver lazily (cuInit, primary context) on its first call. This one does not,
 * because that would add driver calls a test cannot predict: call cuInit yourself first (the workload does), or
 * every call answers cudaErrorInitializationError coming back from the driver.
 */
#include "cuda_min.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define RT_EXPORT __attribute__((visibility("default"), noinline, used))

/* The driver codes the fake driver returns share their numbers with the runtime's codes
 * (1, 2, 3, 201, 400, 500, 720, 999); anything else becomes cudaErrorUnknown. */
static cudaError_t to_rt(CUresult r)
{
    switch (r) {
    case CUDA_SUCCESS:
    case CUDA_ERROR_INVALID_VALUE:
    case CUDA_ERROR_OUT_OF_MEMORY:
    case CUDA_ERROR_NOT_INITIALIZED:
    case CUDA_ERROR_INVALID_CONTEXT:
    case CUDA_ERROR_INVALID_HANDLE:
    case CUDA_ERROR_NOT_FOUND:
    case CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE:
        return (cudaError_t)r;
    default:
        return cudaErrorUnknown;
    }
}

/* ------------------------------------------------------------------ host stub -> CUfunction
 *
 * nvcc's static constructors register each kernel's host stub; cudaLaunchKernel gets that stub's address back.
 * A pointer-keyed open-addressing table under a rwlock: launches only read it.
 */
struct reg {
    const void *host;
    CUfunction func;
};

static pthread_rwlock_t g_reg_lock = PTHREAD_RWLOCK_INITIALIZER;
static struct reg *g_reg;
static size_t g_reg_cap, g_reg_n;

static size_t slot_of(const void *p, size_t cap)
{
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)(x & (cap - 1));
}

/* Callers hold the write lock. */
static int reg_put(const void *host, CUfunction func)
{
    if ((g_reg_n + 1) * 2 > g_reg_cap) {
        size_t cap = g_reg_cap ? g_reg_cap * 2 : 64;
        struct reg *t = calloc(cap, sizeof(*t));
        if (!t)
            return 0;
        for (size_t i = 0; i < g_reg_cap; i++)
            if (g_reg[i].host) {
                size_t s = slot_of(g_reg[i].host, cap);
                while (t[s].host)
                    s = (s + 1) & (cap - 1);
                t[s] = g_reg[i];
            }
        free(g_reg);
        g_reg = t;
        g_reg_cap = cap;
    }
    size_t s = slot_of(host, g_reg_cap);
    while (g_reg[s].host && g_reg[s].host != host)
        s = (s + 1) & (g_reg_cap - 1);
    if (!g_reg[s].host)
        g_reg_n++;
    g_reg[s].host = host;
    g_reg[s].func = func;
    return 1;
}

static CUfunction reg_get(const void *host)
{
    CUfunction f = NULL;
    pthread_rwlock_rdlock(&g_reg_lock);
    if (g_reg_cap) {
        size_t s = slot_of(host, g_reg_cap);
        while (g_reg[s].host) {
            if (g_reg[s].host == host) {
                f = g_reg[s].func;
                break;
            }
            s = (s + 1) & (g_reg_cap - 1);
        }
    }
    pthread_rwlock_unlock(&g_reg_lock);
    return f;
}

/* ------------------------------------------------------------------ registration (nvcc's static constructors) */

/* The handle nvcc code passes back to us; holds the CUmodule the fat binary was loaded as. */
struct fatbin_handle {
    CUmodule module;
};

/* One driver call: cuModuleLoadData. Returns NULL if the driver refused the image. */
RT_EXPORT void **__cudaRegisterFatBinary(void *fatCubin)
{
    struct fatbin_handle *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    if (cuModuleLoadData(&h->module, fatCubin) != CUDA_SUCCESS) {
        free(h);
        return NULL;
    }
    return (void **)h;
}

/* No driver call. */
RT_EXPORT void __cudaRegisterFatBinaryEnd(void **fatCubinHandle)
{
    (void)fatCubinHandle;
}

/* One driver call: cuModuleUnload. */
RT_EXPORT void __cudaUnregisterFatBinary(void **fatCubinHandle)
{
    struct fatbin_handle *h = (struct fatbin_handle *)fatCubinHandle;
    if (!h)
        return;
    cuModuleUnload(h->module);
    free(h);
}

/* One driver call: cuModuleGetFunction(module, deviceName). A failed lookup leaves the stub unregistered, and a
 * later cudaLaunchKernel of it reaches the driver with the stub address as the handle (INVALID_HANDLE). */
RT_EXPORT void __cudaRegisterFunction(void **fatCubinHandle, const char *hostFun, char *deviceFun,
                                      const char *deviceName, int thread_limit, uint3 *tid, uint3 *bid,
                                      dim3 *bDim, dim3 *gDim, int *wSize)
{
    (void)deviceFun;
    (void)thread_limit;
    (void)tid;
    (void)bid;
    (void)bDim;
    (void)gDim;
    (void)wSize;
    struct fatbin_handle *h = (struct fatbin_handle *)fatCubinHandle;
    CUfunction f = NULL;
    if (!h || !hostFun || !deviceName || cuModuleGetFunction(&f, h->module, deviceName) != CUDA_SUCCESS)
        return;
    pthread_rwlock_wrlock(&g_reg_lock);
    reg_put(hostFun, f);
    pthread_rwlock_unlock(&g_reg_lock);
}

/* ------------------------------------------------------------------ the probed runtime set */

/* One driver call: cuLaunchKernel. An unregistered func is passed through as the handle itself, which is what
 * CUDA 13 does with a cudaKernel_t from __cudaGetKernel (a CUkernel handle); garbage fails in the driver. */
RT_EXPORT cudaError_t cudaLaunchKernel(const void *func, dim3 gridDim, dim3 blockDim, void **args, size_t sharedMem,
                                       cudaStream_t stream)
{
    CUfunction f = reg_get(func);
    if (!f)
        f = (CUfunction)func;
    return to_rt(cuLaunchKernel(f, gridDim.x, gridDim.y, gridDim.z, blockDim.x, blockDim.y, blockDim.z,
                                (unsigned int)sharedMem, stream, args, NULL));
}

/* One driver call, chosen by kind (HostToHost and Default: cuMemcpy). A kind out of range makes no driver call
 * and answers cudaErrorInvalidMemcpyDirection, as the real runtime does before touching the driver. */
RT_EXPORT cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind)
{
    CUdeviceptr d = (CUdeviceptr)(uintptr_t)dst, s = (CUdeviceptr)(uintptr_t)src;
    switch (kind) {
    case cudaMemcpyHostToDevice:
        return to_rt(cuMemcpyHtoD_v2(d, src, count));
    case cudaMemcpyDeviceToHost:
        return to_rt(cuMemcpyDtoH_v2(dst, s, count));
    case cudaMemcpyDeviceToDevice:
        return to_rt(cuMemcpyDtoD_v2(d, s, count));
    case cudaMemcpyHostToHost:
    case cudaMemcpyDefault:
        return to_rt(cuMemcpy(d, s, count));
    }
    return cudaErrorInvalidMemcpyDirection;
}

RT_EXPORT cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                                      cudaStream_t stream)
{
    CUdeviceptr d = (CUdeviceptr)(uintptr_t)dst, s = (CUdeviceptr)(uintptr_t)src;
    switch (kind) {
    case cudaMemcpyHostToDevice:
        return to_rt(cuMemcpyHtoDAsync_v2(d, src, count, stream));
    case cudaMemcpyDeviceToHost:
        return to_rt(cuMemcpyDtoHAsync_v2(dst, s, count, stream));
    case cudaMemcpyDeviceToDevice:
        return to_rt(cuMemcpyDtoDAsync_v2(d, s, count, stream));
    case cudaMemcpyHostToHost:
    case cudaMemcpyDefault:
        return to_rt(cuMemcpyAsync(d, s, count, stream));
    }
    return cudaErrorInvalidMemcpyDirection;
}

/* One driver call: cuMemAlloc_v2 (size 0 therefore fails with cudaErrorInvalidValue, unlike the real runtime,
 * which answers success and NULL without asking the driver). */
RT_EXPORT cudaError_t cudaMalloc(void **devPtr, size_t size)
{
    return to_rt(cuMemAlloc_v2((CUdeviceptr *)devPtr, size));
}

/* One driver call: cuMemFree_v2, except cudaFree(NULL), which is a no-op success with no driver call. */
RT_EXPORT cudaError_t cudaFree(void *devPtr)
{
    if (!devPtr)
        return cudaSuccess;
    return to_rt(cuMemFree_v2((CUdeviceptr)(uintptr_t)devPtr));
}

RT_EXPORT cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
    return to_rt(cuStreamSynchronize(stream));
}

RT_EXPORT cudaError_t cudaDeviceSynchronize(void)
{
    return to_rt(cuCtxSynchronize());
}

RT_EXPORT cudaError_t cudaGraphLaunch(cudaGraphExec_t graphExec, cudaStream_t stream)
{
    return to_rt(cuGraphLaunch(graphExec, stream));
}
