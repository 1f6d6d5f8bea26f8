"""bench/gpu/late_attach.py — kernel names for a sidecar that attaches after the kernels were loaded (issue 12).

One process, three parts (every part's failure is caught and reported; what was measured is always written):

 A. Layout: in this process, CUfunction / CUkernel handles whose names are known — a PTX module
    (cuModuleLoadData + cuModuleGetFunction), a library (cuLibraryLoadData + cuLibraryGetKernel +
    cuKernelGetFunction), Triton kernels — and, for each, the pointer cuFuncGetName / cuKernelGetName return.
    The driver object behind each handle is read from /proc/self/mem (never dereferenced in Python, so a wrong
    guess cannot crash the process) and searched for that pointer: directly, one pointer away, or a copy of the
    string. The offsets common to every handle of a kind are the derived layouts (--layouts derived: part B runs
    with them; default: with the shipped otel_cuda.late_names.DRIVER_LAYOUTS).
 B. Late attach: a PyTorch eager decode (cuBLAS matmuls, eager elementwise / reduction / attention kernels and a
    Triton kernel) warms up, loading every kernel it uses; THEN the real sidecar's stages start in a process of
    their own (bench/gpu/late_tracer.py → bench/tracer.py, the default driver probe set, archive on) and attach
    by pid; then N more steps run under torch.profiler (CUPTI). The archive's launches of that window: the share
    named, and per launch the name against the one CUPTI reports (identical, identical once demangled, other).
 C. Ground truth per handle: every handle launched in the window, asked in-process (cuFuncGetName /
    cuKernelGetName, the driver's own answer) and dumped as in A; late_names.LateNames run in-process on them with
    the layouts of A, and with type checks derived from all handles; named / wrong / unknown per variant.
 Also: which of the launching libraries carry an ELF .symtab (host-stub symbolization, candidate 2) and fatbins.

--dry-run: no GPU, no torch: the fake driver (testbed/build/libcuda.so.1) and ctypes launches; tests this script.
Usage (GPU machine, repository root): source .gpu/activate.sh; python3 bench/gpu/late_attach.py --out DIR
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent))

import benchlib as bl  # noqa: E402

from otel_cuda import late_names  # noqa: E402

U64 = struct.Struct("<Q")
LAUNCH_FUNCS = ("cuLaunchKernel", "cuLaunchKernelEx", "cuLaunchCooperativeKernel")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- this process's memory, read safely ----------------------------------------------------------------------------

class SelfMem:
    def __init__(self):
        self.fd = os.open("/proc/self/mem", os.O_RDONLY)
        self.reads = 0

    def read(self, addr: int, size: int) -> bytes:
        if not (0x10000 <= addr < 1 << 47):
            return b""
        self.reads += 1
        try:
            return os.pread(self.fd, size, addr)
        except OSError:
            return b""

    def __call__(self, pid: int, addr: int, size: int) -> bytes:  # the LateNames reader interface
        data = self.read(addr, size)
        if not data:
            raise OSError(5, "unreadable")
        return data

    def cstr(self, addr: int, limit: int = 65536) -> bytes | None:
        raw = b""
        while len(raw) < limit:
            chunk = self.read(addr + len(raw), 4096 - ((addr + len(raw)) & 4095))
            if not chunk:
                return None
            raw += chunk
            if b"\0" in raw:
                return raw.split(b"\0", 1)[0]
        return None


def read_maps() -> list[tuple[int, int, str, str]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return out


def where(maps, addr: int) -> str:
    for lo, hi, perm, path in maps:
        if lo <= addr < hi:
            return f"{os.path.basename(path) or '[anon]'} {perm}"
    return "-"


# ---- A. the driver library and handles with known names ------------------------------------------------------------

class Driver:
    def __init__(self, path: str):
        self.cu = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        self.path = next((p for _, _, _, p in read_maps() if re.search(r"/libcuda\.so[.0-9]*$", p)), path)
        vp = ctypes.c_void_p
        for fn in ("cuFuncGetName", "cuKernelGetName"):
            try:
                f = getattr(self.cu, fn)
                f.argtypes = [ctypes.POINTER(vp), vp]
                f.restype = ctypes.c_int
            except AttributeError:
                pass
        self.version = ctypes.c_int(0)
        self.cu.cuDriverGetVersion(ctypes.byref(self.version))

    def call(self, fn: str, *args) -> int:
        return getattr(self.cu, fn)(*args)

    def names_of(self, handle: int) -> dict:
        """What the driver says about a handle: cuFuncGetName and cuKernelGetName, pointer and string."""
        out = {}
        for fn in ("cuFuncGetName", "cuKernelGetName"):
            if not hasattr(self.cu, fn):
                out[fn] = {"rc": "missing"}
                continue
            p = ctypes.c_void_p(0)
            rc = getattr(self.cu, fn)(ctypes.byref(p), ctypes.c_void_p(handle))
            entry = {"rc": rc}
            if rc == 0 and p.value:
                entry["ptr"] = p.value
                entry["name"] = ctypes.string_at(p.value).decode("utf-8", "replace")
            out[fn] = entry
        return out


PTX_MODULE = """
.version 7.0
.target sm_80
.address_size 64
.visible .entry oc_probe_short() { ret; }
.visible .entry _Z16oc_probe_mangledPfi(.param .u64 p0, .param .u32 p1) { ret; }
.visible .entry %s(.param .u64 p0) { ret; }
""" % ("oc_probe_" + "long_" * 60 + "name")
PTX_LIBRARY = """
.version 7.0
.target sm_80
.address_size 64
.visible .entry oc_lib_kernel_a(.param .u64 p0, .param .u64 p1) { ret; }
.visible .entry _ZN2oc3lib8kernel_bEv() { ret; }
"""


def ptx_entries(ptx: str) -> list[str]:
    return re.findall(r"\.entry\s+([A-Za-z_$%][A-Za-z0-9_$]*)", ptx)


def known_handles(drv: Driver) -> list[dict]:
    """Handles with known names and how they were made: [{"handle", "kind", "via", "name"}]."""
    vp, out = ctypes.c_void_p, []
    mod = vp()
    image = ctypes.create_string_buffer(PTX_MODULE.encode())
    rc = drv.call("cuModuleLoadData", ctypes.byref(mod), image)
    if rc != 0:
        raise RuntimeError(f"cuModuleLoadData: {rc}")
    for name in ptx_entries(PTX_MODULE):
        f = vp()
        rc = drv.call("cuModuleGetFunction", ctypes.byref(f), mod, name.encode())
        if rc == 0:
            out.append({"handle": f.value, "kind": "CUfunction", "via": "cuModuleGetFunction", "name": name})
    lib = vp()
    code = ctypes.create_string_buffer(PTX_LIBRARY.encode())
    rc = drv.call("cuLibraryLoadData", ctypes.byref(lib), code, None, None, 0, None, None, 0)
    if rc != 0:
        raise RuntimeError(f"cuLibraryLoadData: {rc}")
    for name in ptx_entries(PTX_LIBRARY):
        k, f = vp(), vp()
        if drv.call("cuLibraryGetKernel", ctypes.byref(k), lib, name.encode()) == 0:
            out.append({"handle": k.value, "kind": "CUkernel", "via": "cuLibraryGetKernel", "name": name})
            if drv.call("cuKernelGetFunction", ctypes.byref(f), k) == 0:
                out.append({"handle": f.value, "kind": "CUfunction", "via": "cuKernelGetFunction", "name": name,
                            "kernel": k.value})
    return out


def scan(mem: SelfMem, maps, handle: int, name: str, ptr: int | None, deep: bool = True) -> dict:
    """Where the object behind `handle` keeps `name`: offsets of the driver's name pointer (direct), pairs of
    offsets one pointer away (indirect), offsets of pointers to another copy of the string, the string inline."""
    obj = b""
    for size in (1024, 512, 256, 128, 64):
        obj = mem.read(handle, size)
        if obj:
            break
    nb = name.encode()
    res = {"handle": hex(handle), "name_ptr": hex(ptr) if ptr else None, "obj_len": len(obj),
           "obj": obj[:256].hex(), "h_in": where(maps, handle), "p_in": where(maps, ptr) if ptr else None,
           "p_minus_h": (ptr - handle) if ptr else None}
    words = [U64.unpack_from(obj, o)[0] for o in range(0, len(obj) - 7, 8)]
    res["direct"] = [i * 8 for i, w in enumerate(words) if ptr and w == ptr]
    i = obj.find(nb[:48] if len(nb) >= 8 else nb + b"\0")
    res["inline"] = i if i >= 0 else None
    res["words"] = [where(maps, w) if 0x10000 <= w < 1 << 47 else "int" for w in words[:32]]
    copies, indirect = [], []
    if deep:
        for i, w in enumerate(words[:64]):
            if not (0x10000 <= w < 1 << 47) or w & 7:
                continue
            blk = mem.read(w, 512)
            if not blk:
                continue
            if w != ptr and blk.startswith(nb[:511]) and (len(nb) >= 511 or blk[len(nb):len(nb) + 1] == b"\0"):
                copies.append(i * 8)
            if ptr:
                indirect += [(i * 8, o) for o in range(0, len(blk) - 7, 8) if U64.unpack_from(blk, o)[0] == ptr]
    res["copies"] = copies
    res["indirect"] = indirect[:16]
    return res


def words_at(scan_: dict, offset: int) -> int | None:
    obj = bytes.fromhex(scan_["obj"])
    return U64.unpack_from(obj, offset)[0] if offset + 8 <= len(obj) else None


def derive(scans_by_kind: dict[str, list[dict]], check_span: int = 64) -> dict:
    """Layouts from scans: the direct name-pointer offset common to all handles of a kind (else the commonest,
    with its coverage), and type checks: words in the first `check_span` bytes equal in every object of the kind,
    not pointers, and different from the other kind's words there (where the other kind was seen)."""
    out = {}
    for kind, scans in scans_by_kind.items():
        scans = [s for s in scans if s.get("obj")]
        if not scans:
            continue
        found = None
        for how in ("direct", "copies", "indirect"):  # the driver's pointer, a pointer to a copy, one hop away
            sets = [{tuple(x) if isinstance(x, (list, tuple)) else (x,) for x in s.get(how, [])} for s in scans]
            common = set.intersection(*sets) if sets else set()
            if common:
                found = (list(min(common)), len(scans), how)
                break
        if found is None:
            counts = Counter(o for s in scans for o in set(s["direct"]))
            if not counts:
                out[kind] = {"n": len(scans), "name_at": None}
                continue
            o, cover = counts.most_common(1)[0]
            found = ([o], cover, "direct (partial)")
        name_at, cover, how = found
        off = name_at[0]
        checks = []
        others = [s for k, ss in scans_by_kind.items() if k != kind for s in ss if s.get("obj")]
        for o in range(0, check_span, 8):
            if o == off:
                continue
            vals = {words_at(s, o) for s in scans}
            if len(vals) != 1 or None in vals:
                continue
            v = vals.pop()
            if 0x10000 <= v < 1 << 47:
                continue  # a pointer (ASLR: not the same in another process)
            if others and any(words_at(s, o) == v for s in others):
                continue
            checks.append([o, v, 8])
        out[kind] = {"n": len(scans), "name_at": name_at, "found": how, "coverage": cover, "checks_all": checks,
                     "checks": checks[:2]}
    return out


def layouts_from(derived: dict, with_checks: bool) -> list[dict]:
    return [{"kind": k, "name_at": d["name_at"], "checks": d["checks"] if with_checks else [],
             "measured": "bench/gpu/late_attach.py"} for k, d in derived.items() if d.get("name_at")]


def to_layouts(spec: list[dict]) -> tuple:
    return tuple(late_names.Layout(d["kind"], tuple(d["name_at"]), tuple(late_names.Check(*c) for c in d["checks"]))
                 for d in spec)


# ---- B. the workload -----------------------------------------------------------------------------------------------

class TorchDecode:
    """A small Llama-like eager decode: per layer a Triton RMSNorm, cuBLAS projections, SDPA attention over a KV
    cache, an eager RMSNorm (reductions and elementwise kernels), SiLU-gated MLP; argmax sampling."""

    def __init__(self, layers=4, hidden=1024, heads=8, batch=8, max_len=256, vocab=8192, device="cuda"):
        self.device = device
        import torch

        self.torch, self.compiled = torch, []
        try:
            import triton
            import triton.language as tl
        except ImportError:
            triton = None
        self.triton = triton
        if triton is not None:
            self.kernel = self._triton_kernel(triton, tl)
        self._init(layers, hidden, heads, batch, max_len, vocab)

    @staticmethod
    def _triton_kernel(triton, tl):
        @triton.jit
        def rmsnorm_kernel(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK: tl.constexpr):
            row = tl.program_id(0)
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            var = tl.sum(x * x, axis=0) / n_cols
            y = x * tl.rsqrt(var + eps) * w
            tl.store(y_ptr + row * n_cols + cols, y.to(tl.bfloat16), mask=mask)

        return rmsnorm_kernel

    def _init(self, layers, hidden, heads, batch, max_len, vocab):
        torch = self.torch
        dev, dt = self.device, torch.bfloat16
        g = torch.Generator(device=dev).manual_seed(0)
        r = lambda *s: (torch.randn(*s, device=dev, dtype=dt, generator=g) * 0.02)  # noqa: E731
        self.L, self.H, self.nh, self.B, self.T = layers, hidden, heads, batch, max_len
        self.hd = hidden // heads
        self.emb = r(vocab, hidden)
        self.w = [dict(n1=torch.ones(hidden, device=dev, dtype=dt), qkv=r(3 * hidden, hidden), o=r(hidden, hidden),
                       n2=torch.ones(hidden, device=dev, dtype=dt), up=r(2 * 2 * hidden, hidden),
                       down=r(hidden, 2 * hidden)) for _ in range(layers)]
        self.nf = torch.ones(hidden, device=dev, dtype=dt)
        self.k = torch.zeros(layers, batch, heads, max_len, self.hd, device=dev, dtype=dt)
        self.v = torch.zeros_like(self.k)

    def rms_triton(self, x, w):
        if self.triton is None:
            return self.rms_eager(x, w)
        y = self.torch.empty_like(x)
        rows = x.numel() // self.H
        try:
            c = self.kernel[(rows,)](x, w, y, self.H, 1e-6, BLOCK=self.triton.next_power_of_2(self.H))
        except Exception as exc:  # noqa: BLE001 - no Triton kernel then, the rest of the decode still runs
            log(f"Triton kernel failed, eager RMSNorm instead: {exc!r}")
            self.triton_error, self.triton = repr(exc)[:500], None
            return self.rms_eager(x, w)
        if c is not None and len(self.compiled) < 4 and all(c is not k for k in self.compiled):
            self.compiled.append(c)
        return y

    @staticmethod
    def rms_eager(x, w):
        xf = x.float()
        return (xf * (xf.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()).to(x.dtype) * w

    def step(self, tokens, pos: int):
        torch = self.torch
        F = torch.nn.functional
        x = F.embedding(tokens, self.emb)  # [B, 1, H]
        for i, w in enumerate(self.w):
            h = self.rms_triton(x, w["n1"])
            q, k, v = (h @ w["qkv"].t()).view(self.B, 1, 3, self.nh, self.hd).unbind(2)
            self.k[i, :, :, pos] = k[:, 0]
            self.v[i, :, :, pos] = v[:, 0]
            a = F.scaled_dot_product_attention(q.transpose(1, 2), self.k[i, :, :, :pos + 1],
                                               self.v[i, :, :, :pos + 1])
            x = x + a.transpose(1, 2).reshape(self.B, 1, self.H) @ w["o"].t()
            h = self.rms_eager(x, w["n2"])
            gate, up = (h @ w["up"].t()).chunk(2, -1)
            x = x + (F.silu(gate) * up) @ w["down"].t()
        logits = self.rms_eager(x, self.nf) @ self.emb.t()
        return logits.argmax(-1)

    def run(self, steps: int):
        tok = self.torch.zeros(self.B, 1, dtype=self.torch.long, device=self.device)
        for pos in range(steps):
            tok = self.step(tok, pos)
        if self.device == "cuda":
            self.torch.cuda.synchronize()


class FakeDecode:
    """--dry-run: the known handles of part A launched round-robin through the fake driver."""

    def __init__(self, drv: Driver, handles: list[dict]):
        self.drv, self.handles = drv, [h["handle"] for h in handles]

    def run(self, steps: int):
        for s in range(steps):
            for h in self.handles:
                rc = self.drv.call("cuLaunchKernel", ctypes.c_void_p(h), 1, 1, 1, 32, 1, 1, 0, None, None, None)
                if rc != 0:
                    raise RuntimeError(f"cuLaunchKernel: {rc}")


# ---- the sidecar in a process of its own ---------------------------------------------------------------------------

class Sidecar(bl.TracerProcess):
    def __init__(self, lib: str, pid: int, archive: str, layouts_file: str, python: str):
        super().__init__([python, str(HERE / "late_tracer.py"), "--layouts", layouts_file, "--lib", lib,
                          "--pid", str(pid), "--archive", archive, "--symbols", "default"])


def read_archive(d: str) -> list[dict]:
    lines = []
    for f in sorted(Path(d).rglob("*.jsonl*")):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            for line in fh:
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
    return lines


# ---- CUPTI (torch.profiler) kernel names, demangling ---------------------------------------------------------------

def profiled_kernels(prof) -> list[tuple[int, str]]:
    out = []
    try:
        for e in prof.profiler.kineto_results.events():
            if str(e.device_type()).endswith("CUDA") and not e.name().startswith(("Memcpy", "Memset")):
                out.append((e.start_ns() if hasattr(e, "start_ns") else e.start_us() * 1000, e.name()))
    except Exception:  # noqa: BLE001 - another torch: FunctionEvents
        for e in prof.events():
            if str(getattr(e, "device_type", "")).endswith("CUDA") and not e.name.startswith(("Memcpy", "Memset")):
                out.append((int(e.time_range.start * 1000), e.name))
    out.sort()
    return out


def demangler():
    for tool in ("c++filt", "cu++filt", "llvm-cxxfilt"):
        path = shutil.which(tool)
        if path:
            return tool, path
    return None, None


def demangle_all(names: list[str]) -> dict[str, str]:
    tool, path = demangler()
    if not path or not names:
        return {}
    out = subprocess.run([path], input="\n".join(names) + "\n", capture_output=True, text=True, timeout=60).stdout
    dem = out.split("\n")
    return dict(zip(names, dem)) if len(dem) >= len(names) else {}


# ---- ELF facts for candidates 2 and 3 ------------------------------------------------------------------------------

def elf_facts(path: str) -> dict:
    """Sections of interest: .symtab (local symbols: host stubs), .dynsym size, .nv_fatbin size."""
    out = {"path": path}
    try:
        with open(path, "rb") as f:
            hdr = f.read(64)
            if hdr[:4] != b"\x7fELF" or hdr[4] != 2:
                return {**out, "error": "not ELF64"}
            shoff, = struct.unpack_from("<Q", hdr, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", hdr, 0x3A)
            f.seek(shoff)
            sh = f.read(shentsize * shnum)
            secs = [struct.unpack_from("<IIQQQQIIQQ", sh, i * shentsize) for i in range(shnum)]
            stro = secs[shstrndx][4]
            f.seek(stro)
            strtab = f.read(secs[shstrndx][5])
            names = {strtab[s[0]:strtab.index(b"\0", s[0])].decode(): s for s in secs}
            out["symtab_symbols"] = names[".symtab"][5] // 24 if ".symtab" in names else 0
            out["dynsym_symbols"] = names[".dynsym"][5] // 24 if ".dynsym" in names else 0
            out["nv_fatbin_bytes"] = names[".nv_fatbin"][5] if ".nv_fatbin" in names else 0
            out["size"] = os.path.getsize(path)
    except Exception as exc:  # noqa: BLE001
        out["error"] = repr(exc)
    return out


# ---- the run -------------------------------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.res: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args), "errors": {},
                          "steps_s": {}}
        self.tmp = tempfile.mkdtemp(prefix="otel-cuda-late-")
        self.mem = SelfMem()

    @contextmanager
    def part(self, name: str):
        t0 = time.monotonic()
        log(f"== {name} ({time.monotonic() - self.t0:.0f} s in)")
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - reported, the rest goes on
            self.res["errors"][name] = "".join(traceback.format_exception(exc))[-3000:]
            log(f"!! {name}: {exc!r}")
        finally:
            self.res["steps_s"][name] = round(time.monotonic() - t0, 1)
            self.save()

    def save(self):
        os.makedirs(self.args.out, exist_ok=True)
        with open(os.path.join(self.args.out, "late-attach.json"), "w") as f:
            json.dump(self.res, f, indent=1, default=str)

    def main(self):
        a = self.args
        lib = a.libcuda or ("libcuda.so.1" if not a.dry_run else str(ROOT / "testbed/build/libcuda.so.1"))
        if a.dry_run:
            os.environ.setdefault("FAKE_CUDA_SYNC_US", "0")
        self.drv = Driver(lib)
        self.res["libcuda"] = os.path.realpath(self.drv.path)
        self.res["driver_version"] = self.drv.version.value
        log(f"libcuda {self.res['libcuda']} (driver API {self.drv.version.value})")
        if a.dry_run:
            dev, ctx = ctypes.c_int(), ctypes.c_void_p()
            assert self.drv.call("cuInit", 0) == 0
            self.drv.call("cuDeviceGet", ctypes.byref(dev), 0)
            self.drv.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
            self.drv.call("cuCtxSetCurrent", ctx)
        else:
            import torch

            torch.zeros(1, device="cuda")  # the primary context, current on this thread
            self.res["torch"] = torch.__version__
            self.res["gpu"] = torch.cuda.get_device_name(0)

        self.workload = None
        with self.part("workload"):
            if a.dry_run:
                self.workload = FakeDecode(self.drv, [])
            else:
                self.workload = TorchDecode(layers=a.layers, batch=a.batch)
                self.workload.run(2)  # compiles the Triton kernel, loads the first kernels
                import torch

                self.res["torch_cuda"] = torch.version.cuda
                self.res["triton"] = getattr(self.workload.triton, "__version__", None)
        self.res["CUDA_MODULE_LOADING"] = os.environ.get("CUDA_MODULE_LOADING")
        with self.part("A_layout"):
            self.part_a()
        with self.part("B_late_attach"):
            self.part_b()
        with self.part("C_ground_truth"):
            self.part_c()
        if not a.no_early:
            with self.part("D_attached_before"):
                self.part_d()
        with self.part("elf"):
            libs = sorted({p for _, _, _, p in read_maps()
                           if re.search(r"/(libtorch_cuda|libcublasLt|libcublas|libcudart|libc10_cuda)[^/]*\.so", p)})
            self.res["elf"] = [elf_facts(p) for p in libs]
        self.res["seconds"] = round(time.monotonic() - self.t0, 1)
        self.save()
        self.table()

    # -- A ------------------------------------------------------------------------------------------------------------
    def part_a(self):
        handles = known_handles(self.drv)
        if isinstance(self.workload, FakeDecode):
            self.workload.handles = [h["handle"] for h in handles]
        elif self.workload is not None:
            for c in self.workload.compiled:
                try:
                    c._init_handles()
                except Exception:  # noqa: BLE001
                    pass
                fn = getattr(c, "function", None)
                name = getattr(c, "name", None) or getattr(getattr(c, "metadata", None), "name", None)
                if fn:
                    handles.append({"handle": int(fn), "kind": "CUfunction", "via": "triton", "name": name})
        maps = read_maps()
        scans = []
        for h in handles:
            asked = self.drv.names_of(h["handle"])
            own = asked["cuKernelGetName" if h["kind"] == "CUkernel" else "cuFuncGetName"]
            s = scan(self.mem, maps, h["handle"], own.get("name") or h["name"] or "", own.get("ptr"))
            if h.get("kernel"):  # where a kernel's CUfunction points back at its CUkernel
                s["kernel_at"] = [o for o in range(0, len(s["obj"]) // 2 - 7, 8) if words_at(s, o) == h["kernel"]]
                h = {**h, "kernel": hex(h["kernel"])}
            s.update(h, handle=hex(h["handle"]), asked={k: {kk: (hex(vv) if kk == "ptr" else vv)
                                                          for kk, vv in v.items()} for k, v in asked.items()},
                     driver_name_ok=own.get("name") == h["name"])
            scans.append(s)
        self.res["A"] = {"handles": scans}
        by_kind: dict[str, list] = {}
        for s in scans:
            by_kind.setdefault(s["kind"], []).append(s)
        derived = derive(by_kind)
        self.res["A"]["derived"] = derived
        self.layouts_b = layouts_from(derived, with_checks=False)
        log(f"A: {len(scans)} handles; derived {json.dumps(derived)}")

    # -- B ------------------------------------------------------------------------------------------------------------
    def part_b(self):
        a = self.args
        self.workload.run(a.steps)  # warm: every kernel of a step is loaded and launched before the sidecar starts
        if not a.dry_run:  # CUPTI's first start, also before the sidecar
            import torch

            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]):
                self.workload.run(1)
        layouts_file = os.path.join(self.tmp, "layouts.json")
        if a.layouts == "builtin":  # the sidecar as shipped: otel_cuda.late_names.DRIVER_LAYOUTS
            self.layouts_b = [{"kind": lay.kind, "name_at": list(lay.name_at),
                               "checks": [[c.offset, c.value, c.size] for c in lay.checks]}
                              for lay in late_names.DRIVER_LAYOUTS]
        with open(layouts_file, "w") as f:
            json.dump(self.layouts_b, f)
        self.res["B"] = {"layouts": self.layouts_b}
        archive = os.path.join(self.tmp, "archive")
        t = time.monotonic()
        sc = Sidecar(self.drv.path, os.getpid(), archive, layouts_file, a.python or sys.executable)
        self.res["B"]["sidecar_start_s"] = round(time.monotonic() - t, 2)
        self.res["B"]["tracer_kind"] = sc.ready.get("kind")
        time.sleep(0.5)
        before = sc.ask("stats")
        prof = None
        t_start = time.monotonic_ns()
        if a.dry_run:
            self.workload.run(a.steps)
        else:
            import torch

            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                self.workload.run(a.steps)
        t_end = time.monotonic_ns()
        settled = sc.ask("settle")
        summary = sc.close()
        self.res["B"].update(stats_before={k: before.get(k) for k in ("calls", "named", "unknown", "lost")},
                             stats_after={k: settled.get(k) for k in ("calls", "named", "unknown",
                                                                     "unknown_by_function", "lost", "dropped")},
                             summary=summary)
        lines = read_archive(archive)
        me = os.getpid()
        launches = [r for r in lines if r.get("pid") == me and r.get("func") in LAUNCH_FUNCS
                    and t_start <= r.get("mono_ns", 0) <= t_end]
        launches.sort(key=lambda r: r["mono_ns"])
        names_calls = Counter(r["func"] for r in lines if r.get("pid") == me
                              and r.get("func") in ("cuModuleGetFunction", "cuLibraryGetKernel", "cuKernelGetFunction",
                                                    "cuModuleLoadData", "cuModuleLoadDataEx", "cuLibraryLoadData"))
        self.window = launches
        named = [r for r in launches if r.get("kernel") not in (None, "unknown")]
        by_func = Counter(r["func"] for r in launches)
        self.res["B"].update(window_launches=len(launches), window_named=len(named),
                             window_named_share=round(len(named) / len(launches), 4) if launches else None,
                             launches_by_function=dict(by_func), name_giving_calls_seen=dict(names_calls),
                             distinct_handles=len({r["args"]["function"] for r in launches}))
        log(f"B: {len(named)}/{len(launches)} launches named after a late attach")
        if prof is not None:
            self.compare_cupti(launches, profiled_kernels(prof))

    def compare_cupti(self, launches, cupti):
        ours = [r.get("kernel") or "unknown" for r in launches]
        theirs = [n for _, n in cupti]
        dem = demangle_all(sorted({n for n in ours if n.startswith("_Z")}))
        tool = demangler()[0]
        same = same_dem = other = 0
        examples = []
        for o, t in zip(ours, theirs):
            if o == t:
                same += 1
            elif dem.get(o) == t:
                same_dem += 1
            else:
                other += 1
                if len(examples) < 12 and (o, t) not in examples:
                    examples.append((o, t))
        distinct = sorted(set(ours) | set(theirs))
        index = {n: i for i, n in enumerate(distinct)}
        self.res["B"]["cupti"] = {
            "kernels": len(theirs), "launches": len(ours), "demangler": tool,
            "identical": same, "identical_demangled": same_dem, "different": other, "examples_different": examples,
            "names": distinct, "ours_seq": [index[n] for n in ours], "cupti_seq": [index[n] for n in theirs],
            "multiset_equal_after_demangling": Counter(dem.get(n, n) for n in ours) == Counter(theirs),
        }
        log(f"B: CUPTI {len(theirs)} kernels vs {len(ours)} launches: identical {same}, once demangled {same_dem}, "
            f"other {other}")

    # -- D ------------------------------------------------------------------------------------------------------------
    def part_d(self):
        """The same workload in a new process with the sidecar attached BEFORE its first CUDA call and the late path
        off: the names the name-giving calls give, against those the late path gave in B."""
        a = self.args
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", "--steps", str(a.steps),
                                  "--layers", str(a.layers), "--batch", str(a.batch)]
                                 + (["--dry-run"] if a.dry_run else [])
                                 + (["--libcuda", a.libcuda] if a.libcuda else []),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            hello = json.loads(child.stdout.readline())
            archive = os.path.join(self.tmp, "archive-early")
            sc = Sidecar(hello["libcuda"], child.pid, archive, "off", a.python or sys.executable)
            time.sleep(0.5)
            child.stdin.write("go\n")
            child.stdin.flush()
            window = json.loads(child.stdout.readline())
            child.wait(120)
            sc.ask("settle")
            summary = sc.close()
        finally:
            if child.poll() is None:
                child.kill()
        launches = [r for r in read_archive(archive) if r.get("pid") == child.pid and r.get("func") in LAUNCH_FUNCS
                    and window["t_start"] <= r.get("mono_ns", 0) <= window["t_end"]]
        early = Counter(r.get("kernel") or "unknown" for r in launches)
        late = Counter(r.get("kernel") or "unknown" for r in getattr(self, "window", []))
        self.res["D"] = {"summary": summary, "window_launches": len(launches),
                         "window_named": sum(n for k, n in early.items() if k != "unknown"),
                         "names_early": len(early), "names_late": len(late),
                         "same_multiset": early == late, "same_names": set(early) == set(late),
                         "only_early": sorted(set(early) - set(late))[:20],
                         "only_late": sorted(set(late) - set(early))[:20]}
        log(f"D: attached before: {self.res['D']['window_named']}/{len(launches)} named; same names as the late "
            f"path: {self.res['D']['same_names']} (multiset {self.res['D']['same_multiset']})")

    # -- C ------------------------------------------------------------------------------------------------------------
    def part_c(self):
        launches = getattr(self, "window", [])
        count = Counter(int(r["args"]["function"], 16) for r in launches)
        late_name = {}
        for r in launches:
            late_name.setdefault(int(r["args"]["function"], 16), r.get("kernel"))
        maps = read_maps()
        rows = []
        for h, n in count.most_common():
            asked = self.drv.names_of(h)
            f, k = asked["cuFuncGetName"], asked["cuKernelGetName"]
            kind = ("CUfunction" if f.get("rc") == 0 and k.get("rc") != 0 else
                    "CUkernel" if k.get("rc") == 0 and f.get("rc") != 0 else
                    "both" if f.get("rc") == 0 else "neither")
            drv_name = f.get("name") or k.get("name")
            ptr = f.get("ptr") or k.get("ptr")
            s = scan(self.mem, maps, h, drv_name or "", ptr, deep=len(rows) < 64)
            s.update(kind=kind, launches=n, driver_name=drv_name, sidecar_name=late_name.get(h),
                     asked={k2: {kk: (hex(vv) if kk == "ptr" else vv) for kk, vv in v.items() if kk != "name"}
                            for k2, v in asked.items()},
                     k_name_ptr=hex(k["ptr"]) if k.get("ptr") else None)
            rows.append(s)
        self.res["C"] = {"handles": rows, "kinds": dict(Counter(r["kind"] for r in rows))}
        agree = sum(r["launches"] for r in rows if r["sidecar_name"] == r["driver_name"] and r["driver_name"])
        wrong = sum(r["launches"] for r in rows if r["sidecar_name"] not in (None, "unknown", r["driver_name"]))
        self.res["C"]["sidecar_vs_driver"] = {"launches": sum(count.values()), "agree": agree, "wrong": wrong}
        # LateNames in-process on the same handles: the layouts B ran with, and with derived type checks
        by_kind: dict[str, list] = {}
        for r in rows:
            if r["kind"] in ("CUfunction", "CUkernel"):
                by_kind.setdefault(r["kind"], []).append(r)
        for r in self.res.get("A", {}).get("handles", []):
            by_kind.setdefault(r["kind"], []).append(r)
        derived_c = derive(by_kind)
        self.res["C"]["derived_all"] = derived_c
        variants = {"B_layouts": getattr(self, "layouts_b", []),
                    "A_with_checks": layouts_from(self.res.get("A", {}).get("derived", {}), True),
                    "all_with_checks": layouts_from(derived_c, True),
                    "builtin": [{"kind": lay.kind, "name_at": list(lay.name_at),
                                 "checks": [[c.offset, c.value, c.size] for c in lay.checks]}
                                for lay in late_names.DRIVER_LAYOUTS]}
        ev = {}
        for vname, spec in variants.items():
            ln = late_names.LateNames(read_memory=self.mem, layouts=to_layouts(spec), burst=1e9)
            t = time.perf_counter()
            got = {h: ln.resolve(os.getpid(), h) for h in count}
            dt = time.perf_counter() - t
            named = sum(n for h, n in count.items() if got[h])
            right = sum(n for h, n in count.items() if got[h] and got[h] == next(
                (r["driver_name"] for r in rows if int(r["handle"], 16) == h), None))
            ev[vname] = {"layouts": spec, "handles": len(count), "handles_named": sum(1 for v in got.values() if v),
                         "launches_named": named, "launches_right": right, "launches_wrong": named - right,
                         "us_per_handle": round(dt / max(1, len(count)) * 1e6, 1), "counters": dict(ln.counters)}
        self.res["C"]["late_names_in_process"] = ev
        log(f"C: {len(rows)} handles, kinds {self.res['C']['kinds']}; "
            + "; ".join(f"{k}: {v['launches_right']}/{sum(count.values())} right, {v['launches_wrong']} wrong"
                        for k, v in ev.items()))

    def table(self):
        r = self.res
        b, c = r.get("B", {}), r.get("C", {})
        print("\n== late attach: kernel names from the driver's objects")
        print(f"libcuda {r.get('libcuda')}, GPU {r.get('gpu', 'none (dry run)')}, torch {r.get('torch', '-')}")
        for k, d in r.get("A", {}).get("derived", {}).items():
            print(f"A  {k:10s} n={d['n']:3d} name pointer at {d.get('name_at')} (coverage {d.get('coverage')}), "
                  f"checks {d.get('checks')}")
        print(f"B  late-attached sidecar: {b.get('window_named')}/{b.get('window_launches')} launches named "
              f"({b.get('window_named_share')}), name-giving calls seen in the window: "
              f"{b.get('name_giving_calls_seen')}")
        cu = b.get("cupti")
        if cu:
            print(f"B  vs CUPTI: {cu['kernels']} kernels / {cu['launches']} launches; identical {cu['identical']}, "
                  f"identical once demangled ({cu['demangler']}) {cu['identical_demangled']}, other {cu['different']}")
        if c:
            print(f"C  handles by kind {c.get('kinds')}; sidecar vs driver {c.get('sidecar_vs_driver')}")
            for k, v in c.get("late_names_in_process", {}).items():
                print(f"C  {k:16s} {v['launches_right']} right / {v['launches_wrong']} wrong of "
                      f"{sum(h['launches'] for h in c['handles'])}; {v['us_per_handle']} us per handle")
        d = r.get("D")
        if d:
            print(f"D  attached before (late path off): {d['window_named']}/{d['window_launches']} named; "
                  f"same names as the late path: {d['same_names']}, same counts: {d['same_multiset']}")
        if r["errors"]:
            print("errors:", ", ".join(r["errors"]))


def child_main(args) -> int:
    """Part D's process: tells its libcuda, waits for `go` (the sidecar attached), then loads and runs."""
    lib = args.libcuda or ("libcuda.so.1" if not args.dry_run else str(ROOT / "testbed/build/libcuda.so.1"))
    if args.dry_run:
        os.environ.setdefault("FAKE_CUDA_SYNC_US", "0")
    else:
        import torch  # noqa: F401 - imported (not initialised) before the sidecar attaches
    drv = Driver(lib)
    print(json.dumps({"libcuda": os.path.realpath(drv.path)}), flush=True)
    sys.stdin.readline()
    if args.dry_run:
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        drv.call("cuInit", 0)
        drv.call("cuDeviceGet", ctypes.byref(dev), 0)
        drv.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
        drv.call("cuCtxSetCurrent", ctx)
        wl = FakeDecode(drv, [])
        wl.handles = [h["handle"] for h in known_handles(drv)]
    else:
        wl = TorchDecode(layers=args.layers, batch=args.batch)
        wl.run(2)
    wl.run(args.steps)
    t_start = time.monotonic_ns()
    wl.run(args.steps)
    print(json.dumps({"t_start": t_start, "t_end": time.monotonic_ns()}), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out"))
    ap.add_argument("--libcuda")
    ap.add_argument("--python", help="python for the sidecar process (default: this one)")
    ap.add_argument("--steps", type=int, default=40, help="decode steps warm-up, and in the traced window")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--deadline-s", type=int, default=480, help="write what was measured and exit after this")
    ap.add_argument("--layouts", choices=("builtin", "derived"), default="builtin",
                    help="what the late-attached sidecar reads with: the shipped DRIVER_LAYOUTS, or the name offsets "
                         "part A derived in this run (no type checks: for a driver not measured yet)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--no-early", action="store_true", help="skip part D")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)
    run = Run(args)

    def on_alarm(*_):
        run.res["errors"]["deadline"] = f"stopped after {args.deadline_s} s"
        run.save()
        run.table()
        os._exit(3)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.deadline_s)
    run.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
