"""late_attach_child.py — a process whose kernels are loaded and launched before a sidecar attaches (issue 12).

Used by tests/integration/test_late_attach.py and `otel-cuda demo`. Usage: late_attach_child.py LIBCUDA N wait|now.
The process under test: maps the driver; with argv[3] == "wait", waits for "start" before its first CUDA call;
loads, names and launches each kernel once; then on "go" makes LAUNCHES launches round-robin, prints them in order
as (handle, name), and stays until killed. "ping" at any point -> one cuStreamSynchronize (probed, whatever it
returns: tells the test that the sidecar sees this process).
"""
import ctypes, json, sys
cu = ctypes.CDLL(sys.argv[1])
vp = ctypes.c_void_p
def ok(rc, what):
    if rc != 0:
        raise SystemExit(f"{what}: {rc}")
def ping():
    cu.cuStreamSynchronize(None)
    print("pong", flush=True)
print(json.dumps({"mapped": True}), flush=True)
if sys.argv[3] == "wait":
    for line in sys.stdin:
        if line.strip() == "start":
            break
        ping()
ok(cu.cuInit(0), "cuInit")
dev, ctx = ctypes.c_int(), vp()
ok(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ok(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
ok(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
mod, lib = vp(), vp()
ok(cu.cuModuleLoadData(ctypes.byref(mod), b"fatbin"), "cuModuleLoadData")
ok(cu.cuLibraryLoadData(ctypes.byref(lib), b"fatbin", None, None, 0, None, None, 0), "cuLibraryLoadData")
MODULE = [
    "_ZN2at6native29vectorized_elementwise_kernelILi4ENS0_11FillFunctorIfEENS_6detail5ArrayIPcLi1EEEEEviT0_T1_",
    "flash_fwd_kernel",
    "triton_poi_fused_add_mul_0",
    # over the 256 bytes of a name record: the attached-before path completes it from memory
    "_ZN7cutlass6KernelINS_4gemm6kernel13GemmUniversalINS1_11threadblock13MmaMultistageINS_9GemmShapeILi128ELi256E"
    "Li64EEENS_5ArrayINS_10bfloat16_tELi8ELb0EEENS_6layout8RowMajorESA_NSB_11ColumnMajorENS8_IfLi4ELb1EEELi3EEENS_8"
    "epilogue11threadblock8EpilogueIS7_NSG_6thread17LinearCombinationIS9_Li8EffEELi1EEENS4_30GemmIdentityThreadblock"
    "SwizzleILi8EEEEEEEvNT_6ParamsE",
]
LIBRARY = ["nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT", "_ZN4vllm15rms_norm_kernelIN3c108BFloat16EEEvPT_PKS3_S6_fii"]
handles = []  # (handle, name): module functions; library kernels launched as CUkernel and through their CUfunction
for name in MODULE:
    f = vp()
    ok(cu.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()), "cuModuleGetFunction")
    handles.append((f.value, name))
for name in LIBRARY:
    k, f = vp(), vp()
    ok(cu.cuLibraryGetKernel(ctypes.byref(k), lib, name.encode()), "cuLibraryGetKernel")
    ok(cu.cuKernelGetFunction(ctypes.byref(f), k), "cuKernelGetFunction")
    handles += [(k.value, name), (f.value, name)]
def launch(h):
    ok(cu.cuLaunchKernel(vp(h), 1, 1, 1, 32, 1, 1, 0, None, None, None), "cuLaunchKernel")
for h, _ in handles:
    launch(h)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    if line.strip() == "ping":
        ping()
    elif line.strip() == "go":
        done = []
        for i in range(int(sys.argv[2])):
            h, name = handles[i % len(handles)]
            launch(h)
            done.append(["0x%x" % h, name])
        print(json.dumps({"launches": done}), flush=True)
