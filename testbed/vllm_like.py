"""vllm_like.py — a vLLM-shaped server on the fake CUDA driver: the traced peer of `otel-cuda demo` and the tests.

It reproduces what otel-cuda has to join, with known answers:
  * two processes like vLLM V1: an API server (HTTP, OpenTelemetry, no CUDA) and an engine whose command line
    contains `vllm_like.py engine` (select it with `otel-cuda … --match 'vllm_like.py engine'`) and which calls the
    CUDA driver API through ctypes on testbed/build/libcuda.so.1 (`make -C testbed`) with the real signatures;
  * a continuous-batching loop: each step launches prefill kernels for newly scheduled requests and decode kernels
    (or one cuGraphLaunch with --graph-decode) for the running ones, reads the sampled tokens back with
    cuMemcpyDtoHAsync_v2 and waits in cuStreamSynchronize (the fake sleeps FAKE_CUDA_SYNC_US there), producing one
    token per running request per step;
  * one `llm_request` span per finished request, exported from the API process exactly as vLLM 0.32 does
    (shared/reference/vllm-tracing.md): kind SERVER, scope `vllm.tracing.otel`, start = arrival (wall clock),
    parent = the caller's `traceparent` (root without one; none at all for an unsampled one), the
    gen_ai.latency.* / gen_ai.usage.* / gen_ai.request.* attributes computed like vLLM from the engine's monotonic
    timestamps, resource service.name (OTEL_SERVICE_NAME, default `vllm`), vllm.process_id,
    vllm.instrumenting_module_name=vllm.llm_engine; plus startup spans ("Overall Loading", …, INTERNAL);
  * a ground-truth file saying which steps, launches and graph launches each request took part in.

Usage
  python testbed/vllm_like.py serve --port 8000 --otlp-traces-endpoint http://127.0.0.1:4317 \
      --ground-truth /tmp/gt.json [--host 127.0.0.1] [--model vllm-like] [--max-batch 8] \
      [--prefill-launches 30] [--decode-launches 12] [--graph-decode] [--sync-us 2000] [--load-delay 0]
      [--libcuda PATH]
  (`engine` is the subcommand the server spawns itself; it speaks JSON lines on stdin/stdout.)
  Kernel names reach a sidecar only if it attached before cuModuleGetFunction / cuLibraryGetKernel ran: the engine
  maps libcuda and calls cuInit at once, then waits --load-delay seconds before loading kernels (give ~2 s when
  the sidecar starts with or after the server; it attaches within a second of libcuda being mapped).

  HTTP: POST /v1/completions, POST /v1/chat/completions (`stream: true` → SSE, `stream_options.include_usage`),
  GET /health, GET /v1/models, GET /debug/ground_truth. Headers: `traceparent`/`tracestate` (W3C),
  `X-Request-Id: X` → gen_ai.request.id `cmpl-X-0` (completions) / `chatcmpl-X` (chat), echoed back.
  Every request runs to max_tokens (default 16): finish reason `length`, like vLLM with ignore_eos.
  Environment: OTEL_SERVICE_NAME, OTEL_BSP_SCHEDULE_DELAY (batch processor, ms), OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
  (grpc | http/protobuf), FAKE_CUDA_SYNC_US (the fake's sync sleep; --sync-us wins; default 2000 → 2–5 ms steps).
  SIGTERM / SIGINT to the server (or its process group): stop serving, stop the engine (it finishes its step, frees
  its memory and exits 0), flush spans, write the ground truth, exit 0. The engine ignores SIGINT (the server
  stops it) and stops by itself on SIGTERM or when the server goes away (stdin EOF); the server then exits 1.
  Only the latest 200 000 steps and 50 000 requests are kept in the ground truth.

Ground truth (JSON; written to --ground-truth on exit, and served live at GET /debug/ground_truth)
  {"version": 1,
   "api_pid": int, "engine_pid": int,
   "mono_to_epoch_ns": int,           # epoch_ns = monotonic_ns + this (CLOCK_MONOTONIC, as bpf_ktime_get_ns)
   "config": {"max_batch", "prefill_launches", "decode_launches", "graph_decode", "sync_us"},
   "kernels": {"0x…handle": "name", …},  # CUfunction handles as the launches pass them
   "graphs": ["0x…"],                 # CUgraphExec handles (with --graph-decode)
   "requests": [{                     # finished requests, in finishing order
       "request_id": "cmpl-X-0", "trace_id": "32 hex", "span_id": "16 hex" | null (unsampled: no span),
       "sampled": bool, "arrival_ns": epoch ns (= the span's start),
       "queued_ns", "scheduled_ns", "first_token_ns", "last_token_ns": monotonic ns (engine),
       "prompt_tokens": int, "completion_tokens": int,
       "prefill": {"steps": int, "launches": int, "graph_launches": int},
       "decode":  {"steps": int, "launches": int, "graph_launches": int}}],
   "steps": [{"id": int, "start_ns", "end_ns": monotonic ns (first launch → sync return),
              "launches": int (cuLaunchKernel calls), "graph_launches": int (cuGraphLaunch calls),
              "requests": [["cmpl-X-0", "prefill" | "decode"], …]}]}
  A request's prefill is the one step that schedules it (its first token comes out of that step); its decode is
  every later step until its last token. A step shared by several requests counts fully for each (attribute,
  don't divide). Note, as in vLLM: the span's phase windows are anchored on the API's arrival time, which is
  earlier than the engine's queued_ns by the IPC hop (ground truth has both), so windows lead the steps slightly.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_LIBCUDA = HERE / "build" / "libcuda.so.1"
DEFAULT_SYNC_US = 2000
MAX_KEPT_STEPS = 200_000  # ground truth is bounded: a long demo keeps the latest steps / requests
MAX_KEPT_REQUESTS = 50_000
DEFAULT_MAX_TOKENS = 16

log = logging.getLogger("vllm_like")

# ------------------------------------------------------------------------------------------------------------
# Kernels: names like vLLM's (mangled where vLLM's are) so the sidecar's name table and demangling are exercised.
# ------------------------------------------------------------------------------------------------------------
MODULE_KERNELS = (  # loaded with cuModuleLoadData + cuModuleGetFunction
    "_ZN4vllm15rms_norm_kernelEPfPKfS2_fii",
    "ampere_sgemm_128x64_tn",
    "_ZN4vllm23rotary_embedding_kernelEPKlPfS2_PKfiiii",
    "_ZN4vllm24reshape_and_cache_kernelEPKfS1_PfS2_PKliiii",
    "flash_fwd_kernel",
    "_ZN4vllm19silu_and_mul_kernelEPfPKfi",
)
LIBRARY_KERNELS = (  # loaded with cuLibraryLoadData + cuLibraryGetKernel (CUDA 12 lazy loading, as torch does)
    "_ZN4vllm22apply_penalties_kernelEPfPKii",
    "_ZN4vllm14argmax_samplerEPKfPli",
)
# One transformer layer's launch order; a step's launches cycle through it and end with the sampler kernels.
LAYER = ("rms", "gemm", "rope", "cache", "attn", "gemm", "rms", "gemm", "silu", "gemm")
SHORT = {"rms": MODULE_KERNELS[0], "gemm": MODULE_KERNELS[1], "rope": MODULE_KERNELS[2], "cache": MODULE_KERNELS[3],
         "attn": MODULE_KERNELS[4], "silu": MODULE_KERNELS[5], "pen": LIBRARY_KERNELS[0], "argmax": LIBRARY_KERNELS[1]}
GEOMETRY = {  # (grid, block, shared memory bytes): plausible shapes, fixed so launches are cheap to issue
    "rms": ((64, 1, 1), (256, 1, 1), 0), "gemm": ((16, 8, 1), (128, 1, 1), 12288),
    "rope": ((64, 1, 1), (128, 1, 1), 0), "cache": ((64, 1, 1), (128, 1, 1), 0),
    "attn": ((4, 8, 1), (128, 1, 1), 49152), "silu": ((64, 1, 1), (256, 1, 1), 0),
    "pen": ((1, 1, 1), (256, 1, 1), 0), "argmax": ((8, 1, 1), (1024, 1, 1), 4096),
}


def launch_plan(n: int) -> list[str]:
    """n kernel launches of a forward pass: layers, then penalties + argmax sampling (as many as fit)."""
    if n <= 0:
        return []
    tail = ["pen", "argmax"][-min(2, n):] if n >= 1 else []
    body = [LAYER[i % len(LAYER)] for i in range(n - len(tail))]
    return body + tail


def ptx_image(names) -> bytes:
    """A PTX text declaring the entries: what cuModuleLoadData/cuLibraryLoadData get from a real build, minus code."""
    entries = "".join(f".visible .entry {n}()\n{{\n\tret;\n}}\n" for n in names)
    return (".version 8.0\n.target sm_90\n.address_size 64\n\n" + entries).encode() + b"\0"


# ------------------------------------------------------------------------------------------------------------
# The driver, through ctypes with the signatures of cuda.h (CUresult is an int enum; handles are pointers;
# CUdeviceptr is an unsigned 64-bit integer; CUdevice an int).
# ------------------------------------------------------------------------------------------------------------
P = ctypes.POINTER
c_void_p, c_uint, c_int, c_size_t, c_u64, c_char_p = (ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_size_t,
                                                       ctypes.c_uint64, ctypes.c_char_p)
SIGNATURES = {
    # name: (argtypes, required)
    "cuInit": ([c_uint], True),
    "cuDeviceGet": ([P(c_int), c_int], True),
    "cuDeviceGetName": ([c_char_p, c_int, c_int], False),
    "cuDevicePrimaryCtxRetain": ([P(c_void_p), c_int], True),
    "cuDevicePrimaryCtxRelease_v2": ([c_int], False),
    "cuCtxSetCurrent": ([c_void_p], False),
    "cuStreamCreate": ([P(c_void_p), c_uint], True),
    "cuStreamDestroy_v2": ([c_void_p], False),
    "cuModuleLoadData": ([P(c_void_p), c_void_p], True),
    "cuModuleGetFunction": ([P(c_void_p), c_void_p, c_char_p], True),
    "cuModuleUnload": ([c_void_p], False),
    "cuLibraryLoadData": ([P(c_void_p), c_void_p, P(c_int), P(c_void_p), c_uint, P(c_int), P(c_void_p), c_uint], True),
    "cuLibraryGetKernel": ([P(c_void_p), c_void_p, c_char_p], True),
    "cuKernelGetFunction": ([P(c_void_p), c_void_p], False),
    "cuLibraryUnload": ([c_void_p], False),
    "cuMemAlloc_v2": ([P(c_u64), c_size_t], True),
    "cuMemFree_v2": ([c_u64], True),
    "cuMemcpyHtoD_v2": ([c_u64, c_void_p, c_size_t], True),
    "cuMemcpyDtoHAsync_v2": ([c_void_p, c_u64, c_size_t, c_void_p], True),
    "cuStreamSynchronize": ([c_void_p], True),
    "cuLaunchKernel": ([c_void_p, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_void_p, P(c_void_p),
                        P(c_void_p)], True),
    "cuGraphLaunch": ([c_void_p, c_void_p], False),
    "cuStreamBeginCapture_v2": ([c_void_p, c_int], False),
    "cuStreamEndCapture": ([c_void_p, P(c_void_p)], False),
    "cuGraphCreate": ([P(c_void_p), c_uint], False),
    "cuGraphInstantiateWithFlags": ([P(c_void_p), c_void_p, ctypes.c_ulonglong], False),
    "cuGraphExecDestroy": ([c_void_p], False),
    "cuGraphDestroy": ([c_void_p], False),
    "cuGetErrorName": ([c_int, P(c_char_p)], False),
}


class CudaError(RuntimeError):
    pass


class Driver:
    """The fake (or a real) libcuda with argtypes set; `d.cuX(...)` raises CudaError on a non-zero CUresult."""

    def __init__(self, path: str):
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise CudaError(f"cannot load {path}: {e} (build the fake driver: make -C testbed)") from e
        self.path = path
        self.missing: list[str] = []
        for name, (argtypes, required) in SIGNATURES.items():
            fn = getattr(self.lib, name, None)
            if fn is None:
                if required:
                    raise CudaError(f"{path} lacks {name}")
                self.missing.append(name)
                continue
            fn.argtypes, fn.restype = argtypes, c_int
            setattr(self, "_" + name, fn)
            setattr(self, name, self._checked(name, fn))

    def has(self, name: str) -> bool:
        return hasattr(self, "_" + name)

    def _checked(self, name, fn):
        def call(*args):
            rc = fn(*args)
            if rc != 0:
                raise CudaError(f"{name} returned {rc} ({self.error_name(rc)})")
        call.__name__ = name
        return call

    def error_name(self, rc: int) -> str:
        if not self.has("cuGetErrorName"):
            return "?"
        s = c_char_p()
        return s.value.decode() if self._cuGetErrorName(rc, ctypes.byref(s)) == 0 and s.value else "?"


# ------------------------------------------------------------------------------------------------------------
# The engine process
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineConfig:
    libcuda: str = str(DEFAULT_LIBCUDA)
    max_batch: int = 8
    prefill_launches: int = 30
    decode_launches: int = 12
    graph_decode: bool = False
    sync_us: int = DEFAULT_SYNC_US
    load_delay_s: float = 0.0
    weight_bytes: int = 4 << 20
    kv_cache_bytes: int = 64 << 20


@dataclass
class PhaseCount:
    steps: int = 0
    launches: int = 0
    graph_launches: int = 0


@dataclass
class EngineRequest:
    id: int
    request_id: str
    max_tokens: int
    queued_ns: int
    scheduled_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0
    generated: int = 0
    prefill: PhaseCount = field(default_factory=PhaseCount)
    decode: PhaseCount = field(default_factory=PhaseCount)


class GpuModel:
    """What the engine does on the 'GPU': setup (context, kernels, weights, KV cache, graphs) and one step."""

    def __init__(self, driver: Driver, cfg: EngineConfig):
        self.d, self.cfg = driver, cfg
        self.phases: list[tuple[str, int, int]] = []  # startup spans: (name, start mono ns, end mono ns)
        self.kernels: dict[str, int] = {}  # short name → CUfunction handle
        self.names: dict[str, str] = {}  # "0x…" handle → kernel name
        self.graph_exec = None
        self._keep = []  # buffers the driver may still point at

    def _phase(self, name, fn):
        t0 = time.monotonic_ns()
        fn()
        self.phases.append((name, t0, time.monotonic_ns()))

    def setup(self):
        self._phase("Init device", self._init)
        if self.cfg.load_delay_s > 0:  # what a real engine spends importing torch and reading weights
            self._phase("Initialize model", lambda: time.sleep(self.cfg.load_delay_s))
        self._phase("Load kernels", self._load_kernels)
        self._phase("Load weights", self._load_weights)
        self._phase("Allocate KV cache", self._alloc_kv)
        if self.cfg.graph_decode:
            self._phase("Capture CUDA graphs", self._capture)

    def _init(self):
        d = self.d
        d.cuInit(0)
        self.dev = c_int()
        d.cuDeviceGet(ctypes.byref(self.dev), 0)
        self.ctx = c_void_p()
        d.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), self.dev)
        if d.has("cuCtxSetCurrent"):
            d.cuCtxSetCurrent(self.ctx)
        self.stream = c_void_p()
        d.cuStreamCreate(ctypes.byref(self.stream), 1)  # CU_STREAM_NON_BLOCKING, as PyTorch's side streams
        self.device_name = "?"
        if d.has("cuDeviceGetName"):
            buf = ctypes.create_string_buffer(256)
            d.cuDeviceGetName(buf, 256, self.dev)
            self.device_name = buf.value.decode(errors="replace")

    def _load_kernels(self):
        d = self.d
        image = ptx_image(MODULE_KERNELS)
        self._keep.append(image)
        self.module = c_void_p()
        d.cuModuleLoadData(ctypes.byref(self.module), image)
        handles = {}
        for name in MODULE_KERNELS:
            f = c_void_p()
            d.cuModuleGetFunction(ctypes.byref(f), self.module, name.encode())
            handles[name] = f.value
        lib_image = ptx_image(LIBRARY_KERNELS)
        self._keep.append(lib_image)
        self.library = c_void_p()
        d.cuLibraryLoadData(ctypes.byref(self.library), lib_image, None, None, 0, None, None, 0)
        for name in LIBRARY_KERNELS:
            k = c_void_p()
            d.cuLibraryGetKernel(ctypes.byref(k), self.library, name.encode())
            if d.has("cuKernelGetFunction"):
                f = c_void_p()
                d.cuKernelGetFunction(ctypes.byref(f), k)
                handles[name] = f.value
            else:  # CUDA 12: a CUkernel may be passed to cuLaunchKernel where a CUfunction is expected
                handles[name] = k.value
        self.kernels = {short: handles[full] for short, full in SHORT.items()}
        self.names = {hex(h or 0): name for name, h in handles.items()}
        # kernel params: one device pointer and an int, as pointers-to-arguments (the cuLaunchKernel convention)
        self._arg_ptr, self._arg_n = c_u64(0), c_int(128)
        self._params = (c_void_p * 2)(ctypes.addressof(self._arg_ptr), ctypes.addressof(self._arg_n))
        self.params = ctypes.cast(self._params, P(c_void_p))
        self.prefill_plan = [self._launch_args(k) for k in launch_plan(self.cfg.prefill_launches)]
        self.decode_plan = [self._launch_args(k) for k in launch_plan(self.cfg.decode_launches)]

    def _launch_args(self, short):
        (gx, gy, gz), (bx, by, bz), smem = GEOMETRY[short]
        return (self.kernels[short], gx, gy, gz, bx, by, bz, smem)

    def _load_weights(self):
        d, n = self.d, self.cfg.weight_bytes
        self.weights = c_u64()
        d.cuMemAlloc_v2(ctypes.byref(self.weights), n)
        host = ctypes.create_string_buffer(n)
        chunk = 1 << 20  # layer by layer, as a loader streams safetensors shards
        for off in range(0, n, chunk):
            d.cuMemcpyHtoD_v2(self.weights.value + off, ctypes.addressof(host) + off, min(chunk, n - off))
        self._arg_ptr.value = self.weights.value

    def _alloc_kv(self):
        d = self.d
        self.kv = c_u64()
        d.cuMemAlloc_v2(ctypes.byref(self.kv), self.cfg.kv_cache_bytes)
        self.tokens_dev = c_u64()
        nbytes = 8 * max(1, self.cfg.max_batch)
        d.cuMemAlloc_v2(ctypes.byref(self.tokens_dev), nbytes)
        self.tokens_host = ctypes.create_string_buffer(nbytes)

    def _capture(self):
        """Like vLLM's CUDA-graph capture: a warm-up forward, then the decode forward captured into one graph."""
        d = self.d
        if not (d.has("cuGraphLaunch") and d.has("cuGraphInstantiateWithFlags")):
            raise CudaError("--graph-decode needs cuGraphInstantiateWithFlags and cuGraphLaunch in the driver")
        self._launch_all(self.decode_plan)  # warm-up run, eager
        d.cuStreamSynchronize(self.stream)
        self.graph = c_void_p()
        if d.has("cuStreamBeginCapture_v2") and d.has("cuStreamEndCapture"):
            d.cuStreamBeginCapture_v2(self.stream, 0)  # CU_STREAM_CAPTURE_MODE_GLOBAL
            self._launch_all(self.decode_plan)
            d.cuStreamEndCapture(self.stream, ctypes.byref(self.graph))
        elif d.has("cuGraphCreate"):  # the fake has no stream capture: an (empty) graph stands in for it
            d.cuGraphCreate(ctypes.byref(self.graph), 0)
        else:
            raise CudaError("--graph-decode needs stream capture or cuGraphCreate in the driver")
        self.graph_exec = c_void_p()
        d.cuGraphInstantiateWithFlags(ctypes.byref(self.graph_exec), self.graph, 0)

    def _launch_all(self, plan) -> int:
        launch, stream, params = self.d.cuLaunchKernel, self.stream, self.params
        for f, gx, gy, gz, bx, by, bz, smem in plan:
            launch(f, gx, gy, gz, bx, by, bz, smem, stream, params, None)
        return len(plan)

    def step(self, n_new: int, n_decoding: int) -> tuple[int, int, int, int]:
        """One engine step → (start mono ns, end mono ns, kernel launches, graph launches)."""
        start = time.monotonic_ns()
        launches = graphs = 0
        for _ in range(n_new):  # each newly scheduled request runs its prompt through the model
            launches += self._launch_all(self.prefill_plan)
        if n_decoding:  # one batched forward for every running request
            if self.graph_exec is not None:
                self.d.cuGraphLaunch(self.graph_exec, self.stream)
                graphs += 1
            else:
                launches += self._launch_all(self.decode_plan)
        nbytes = 8 * (n_new + n_decoding)
        self.d.cuMemcpyDtoHAsync_v2(self.tokens_host, self.tokens_dev.value, nbytes, self.stream)
        self.d.cuStreamSynchronize(self.stream)  # the host waits for the sampled tokens: the step's end
        return start, time.monotonic_ns(), launches, graphs

    def teardown(self):
        d = self.d
        if self.graph_exec is not None and d.has("cuGraphExecDestroy"):
            d.cuGraphExecDestroy(self.graph_exec)
            if d.has("cuGraphDestroy"):
                d.cuGraphDestroy(self.graph)
        for ptr in ("tokens_dev", "kv", "weights"):
            if getattr(self, ptr, None) is not None and getattr(self, ptr).value:
                d.cuMemFree_v2(getattr(self, ptr).value)
        if d.has("cuStreamDestroy_v2") and getattr(self, "stream", None) is not None:
            d.cuStreamDestroy_v2(self.stream)


class Engine:
    """The continuous-batching loop. IPC: JSON lines; `inbox` yields messages, `send` writes one."""

    def __init__(self, model: GpuModel, cfg: EngineConfig, send):
        self.model, self.cfg, self.send = model, cfg, send
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: collections.deque[EngineRequest] = collections.deque()
        self.running: list[EngineRequest] = []
        self.stop = threading.Event()
        self.step_id = 0

    def receive(self, msg):
        """Called by the reader thread: the queued timestamp is taken on arrival, as EngineCore.add_request does."""
        if msg is not None and msg.get("op") == "add":
            msg["queued_ns"] = time.monotonic_ns()
        self.inbox.put(msg)

    def _handle(self, msg) -> None:
        if msg is None or msg.get("op") == "shutdown":
            self.stop.set()
        elif msg.get("op") == "add":
            self.waiting.append(EngineRequest(msg["id"], msg["request_id"], max(1, int(msg["max_tokens"])),
                                              msg["queued_ns"]))
        elif msg.get("op") == "abort":
            self.waiting = collections.deque(r for r in self.waiting if r.id != msg["id"])
            self.running = [r for r in self.running if r.id != msg["id"]]

    def run(self):
        while not self.stop.is_set():
            idle = not (self.waiting or self.running)
            try:  # block only when idle: a busy engine polls its inbox between steps
                msg = self.inbox.get(timeout=0.5) if idle else self.inbox.get_nowait()
                self._handle(msg)
                while True:
                    self._handle(self.inbox.get_nowait())
            except queue.Empty:
                pass
            if self.stop.is_set():
                break
            new = []
            while self.waiting and len(self.running) + len(new) < self.cfg.max_batch:
                new.append(self.waiting.popleft())
            if new or self.running:
                self._step(new)

    def _step(self, new: list[EngineRequest]):
        decoding = self.running
        start, end, launches, graphs = self.model.step(len(new), len(decoding))
        self.step_id += 1
        members = [(r.request_id, "decode") for r in decoding] + [(r.request_id, "prefill") for r in new]
        for r in new:
            r.scheduled_ns, r.first_token_ns = start, end
            self._count(r.prefill, launches, graphs)
        for r in decoding:
            self._count(r.decode, launches, graphs)
        batch = decoding + new
        finished = []
        for r in batch:
            r.generated += 1
            r.last_token_ns = end
            if r.generated >= r.max_tokens:
                finished.append(r)
        self.running = [r for r in batch if r.generated < r.max_tokens]
        self.send({
            "op": "step",
            "step": {"id": self.step_id, "start_ns": start, "end_ns": end, "launches": launches,
                     "graph_launches": graphs, "requests": members},
            "tokens": [[r.id, r.generated - 1] for r in batch],
            "finished": [self._summary(r) for r in finished],
        })

    @staticmethod
    def _count(phase: PhaseCount, launches: int, graphs: int):
        phase.steps += 1
        phase.launches += launches
        phase.graph_launches += graphs

    @staticmethod
    def _summary(r: EngineRequest) -> dict:
        return {"id": r.id, "queued_ns": r.queued_ns, "scheduled_ns": r.scheduled_ns,
                "first_token_ns": r.first_token_ns, "last_token_ns": r.last_token_ns,
                "completion_tokens": r.generated, "prefill": asdict(r.prefill), "decode": asdict(r.decode)}


def engine_main(args) -> int:
    # The IPC channel is a private copy of stdout; fd 1 then points at stderr so that nothing the driver or a
    # library prints can corrupt the JSON lines.
    ipc = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, format="(EngineCore pid=%(process)d) %(levelname)s %(message)s")
    lock = threading.Lock()

    def send(msg):
        with lock:
            ipc.write(json.dumps(msg, separators=(",", ":")) + "\n")

    cfg = EngineConfig(libcuda=args.libcuda, max_batch=args.max_batch, prefill_launches=args.prefill_launches,
                       decode_launches=args.decode_launches, graph_decode=args.graph_decode, sync_us=args.sync_us,
                       load_delay_s=args.load_delay)
    try:
        model = GpuModel(Driver(cfg.libcuda), cfg)
        model.setup()
    except Exception as e:  # one boundary: the API process turns this into its exit message
        log.exception("engine setup failed")
        send({"op": "fatal", "error": str(e)})
        return 1
    engine = Engine(model, cfg, send)

    def on_signal(signum, _frame):  # finish the step in flight, then stop: the API writes the ground truth
        engine.stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    # Ctrl-C reaches the whole process group: the API server answers it and stops the engine in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def reader():
        for line in sys.stdin:
            if line.strip():
                engine.receive(json.loads(line))
        engine.receive(None)  # the API process went away
    threading.Thread(target=reader, name="engine-inbox", daemon=True).start()

    send({"op": "hello", "pid": os.getpid(), "mono_to_epoch_ns": time.time_ns() - time.monotonic_ns(),
          "device": model.device_name, "kernels": model.names,
          "graphs": [hex(model.graph_exec.value)] if model.graph_exec is not None else [],
          "phases": model.phases, "missing_symbols": model.d.missing})
    log.info("engine ready: %d kernels, max batch %d, driver %s", len(model.names), cfg.max_batch, cfg.libcuda)
    try:
        engine.run()
    finally:
        model.teardown()
        try:
            send({"op": "bye", "steps": engine.step_id})
        except (BrokenPipeError, ValueError):
            pass
    return 0


# ------------------------------------------------------------------------------------------------------------
# The API-server process
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "vllm-like"
    otlp_traces_endpoint: str | None = None
    ground_truth: str | None = None
    engine: EngineConfig = EngineConfig()


class EngineClient:
    """Spawns the engine, routes its step messages to waiting requests and keeps the ground truth."""

    def __init__(self, cfg: EngineConfig, env: dict):
        argv = [sys.executable, str(Path(__file__).resolve()), "engine", "--libcuda", cfg.libcuda,
                "--max-batch", str(cfg.max_batch), "--prefill-launches", str(cfg.prefill_launches),
                "--decode-launches", str(cfg.decode_launches), "--sync-us", str(cfg.sync_us),
                "--load-delay", str(cfg.load_delay_s)]
        if cfg.graph_decode:
            argv.append("--graph-decode")
        self.cfg = cfg
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        self.hello: dict | None = None
        self.fatal: str | None = None
        self.ready = threading.Event()
        self.gone = threading.Event()
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.waiters: dict[int, queue.Queue] = {}
        self.steps: collections.deque = collections.deque(maxlen=MAX_KEPT_STEPS)
        self.requests: collections.deque = collections.deque(maxlen=MAX_KEPT_REQUESTS)
        self._next_id = 0
        threading.Thread(target=self._read, name="engine-outbox", daemon=True).start()

    def _read(self):
        try:
            for line in self.proc.stdout:
                msg = json.loads(line)
                op = msg.get("op")
                if op == "step":
                    self._on_step(msg)
                elif op == "hello":
                    self.hello = msg
                    self.ready.set()
                elif op == "fatal":
                    self.fatal = msg.get("error")
        finally:
            self.gone.set()
            self.ready.set()
            with self.lock:
                waiters = list(self.waiters.values())
            for q in waiters:
                q.put(("error", "engine exited"))

    def _on_step(self, msg):
        now = time.time_ns()  # when the frontend sees the outputs: vLLM's iteration timestamp
        self.steps.append(msg["step"])
        with self.lock:
            for rid, index in msg["tokens"]:
                q = self.waiters.get(rid)
                if q is not None:
                    q.put(("token", index, now))
            for fin in msg["finished"]:
                q = self.waiters.pop(fin["id"], None)
                if q is not None:
                    q.put(("finished", fin, now))

    def _send(self, msg):
        line = json.dumps(msg) + "\n"
        with self.send_lock:  # many handler threads write to one pipe
            try:
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass

    def add(self, request_id: str, max_tokens: int) -> tuple[int, queue.Queue]:
        q: queue.Queue = queue.Queue()
        with self.lock:
            self._next_id += 1
            rid = self._next_id
            self.waiters[rid] = q
        if self.gone.is_set():
            q.put(("error", "engine exited"))
        self._send({"op": "add", "id": rid, "request_id": request_id, "max_tokens": max_tokens})
        return rid, q

    def abort(self, rid: int):
        with self.lock:
            self.waiters.pop(rid, None)
        self._send({"op": "abort", "id": rid})

    def shutdown(self, timeout: float = 10.0):
        self._send({"op": "shutdown"})
        with self.send_lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("engine did not stop in %.0f s: killing it", timeout)
            self.proc.kill()
            self.proc.wait()
        self.gone.wait(2)

    def ground_truth(self, api_pid: int) -> dict:
        h = self.hello or {}
        c = self.cfg
        return {
            "version": 1, "api_pid": api_pid, "engine_pid": h.get("pid"),
            "mono_to_epoch_ns": h.get("mono_to_epoch_ns"),
            "config": {"max_batch": c.max_batch, "prefill_launches": c.prefill_launches,
                       "decode_launches": c.decode_launches, "graph_decode": c.graph_decode, "sync_us": c.sync_us},
            "kernels": h.get("kernels", {}), "graphs": h.get("graphs", []),
            "requests": list(self.requests), "steps": list(self.steps),
        }


class Tracing:
    """The API process's tracer, set up as vLLM's init_tracer does (scope vllm.tracing.otel, batch processor)."""

    def __init__(self, endpoint: str | None, provider=None):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.endpoint = endpoint
        self.propagator = TraceContextTextMapPropagator()
        self.provider = provider or self._provider({})
        self.tracer = self.provider.get_tracer("vllm.tracing.otel")

    def _provider(self, extra: dict):
        """A TracerProvider with vLLM's resource (plus `extra`), exporting through a batch processor."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or "vllm",
            "vllm.process_id": str(os.getpid()),  # a string, as vLLM 0.32 sends it
            "vllm.instrumenting_module_name": "vllm.llm_engine",
            **extra,
        })
        provider = TracerProvider(resource=resource)
        if self.endpoint:
            provider.add_span_processor(BatchSpanProcessor(self._exporter(self.endpoint)))  # honours OTEL_BSP_*
        return provider

    @staticmethod
    def _exporter(endpoint: str):
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            return OTLPSpanExporter(endpoint=endpoint)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=endpoint, insecure=True)

    def startup_spans(self, t_start_ns: int, t_ready_ns: int, hello: dict):
        """Like vLLM's startup spans, one trace: 'Overall Loading' (root, this process, scope
        vllm.v1.engine.core_client) with the engine's setup phases as children, sent with the engine's resource
        (vllm.process_kind=engine_core), as vLLM's EngineCore sends its own."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        offset = hello.get("mono_to_epoch_ns") or 0
        engine_provider = self._provider({"vllm.process_id": str(hello.get("pid", 0)),
                                          "vllm.process_kind": "engine_core", "vllm.process_name": "EngineCore_DP0"})
        root = self.provider.get_tracer("vllm.v1.engine.core_client").start_span(
            "Overall Loading", kind=SpanKind.INTERNAL, start_time=t_start_ns)
        ctx = trace.set_span_in_context(root)
        engine_tracer = engine_provider.get_tracer("vllm.v1.engine.core")
        for name, start, end in hello.get("phases", []):
            engine_tracer.start_span(name, context=ctx, kind=SpanKind.INTERNAL, start_time=start + offset).end(
                end_time=end + offset)
        root.end(end_time=t_ready_ns)
        engine_provider.shutdown()  # flush now: these spans never change again

    def request_span(self, carrier: dict, start_ns: int, end_ns: int, attributes: dict):
        """Exports `llm_request`; returns (trace_id hex, span_id hex | None, sampled)."""
        from opentelemetry.trace import SpanKind

        ctx = self.propagator.extract(carrier=carrier)
        span = self.tracer.start_span("llm_request", context=ctx, kind=SpanKind.SERVER, start_time=start_ns,
                                      attributes=attributes)
        sc = span.get_span_context()
        span.end(end_time=end_ns)
        sampled = span.is_recording() or bool(sc.trace_flags.sampled)
        return f"{sc.trace_id:032x}", (f"{sc.span_id:016x}" if sampled else None), sampled


WORDS = "the engine steps and every kernel launch waits on the stream before tokens come back".split()


def count_tokens(text: str) -> int:
    return 1 + len(re.findall(r"\w+|[^\w\s]", text))  # bos + words and punctuation: a stand-in tokenizer


class Frontend:
    """Request handling, independent of HTTP: OpenAI request body → engine → events (tokens, finish)."""

    def __init__(self, cfg: ServeConfig, engine: EngineClient, tracing: Tracing):
        self.cfg, self.engine, self.tracing = cfg, engine, tracing
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.cfg.model, "object": "model", "created": self.created,
                                            "owned_by": "vllm-like", "root": self.cfg.model, "parent": None,
                                            "max_model_len": 256}]}

    @staticmethod
    def parse(chat: bool, body: dict) -> tuple[int, dict]:
        """→ (prompt tokens, sampling params); raises ValueError with the message for a 400."""
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("'messages' must be a non-empty list")
            prompt_tokens = 1 + sum(3 + count_tokens(str(m.get("content", ""))) for m in messages) + 2
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                prompt_tokens = count_tokens(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                prompt_tokens = len(prompt)
            else:
                raise ValueError("'prompt' must be a string or a list of token ids (one prompt per request here)")
            max_tokens = body.get("max_tokens")
        params = {"max_tokens": int(max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS),
                  "temperature": float(body.get("temperature") if body.get("temperature") is not None else 1.0),
                  "top_p": float(body.get("top_p") if body.get("top_p") is not None else 1.0),
                  "n": int(body.get("n") or 1)}
        if params["n"] != 1:
            raise ValueError("only n=1 is supported")
        if params["max_tokens"] < 1:
            raise ValueError("max_tokens must be at least 1")
        return prompt_tokens, params

    def finish(self, carrier, request_id, arrival_ns, first_token_wall_ns, fin, finish_wall_ns, prompt_tokens, params):
        """Exports llm_request exactly like vLLM's OutputProcessor.do_tracing and records the ground truth."""
        s = 1e-9
        attrs = {
            "gen_ai.request.id": request_id,
            "gen_ai.usage.prompt_tokens": prompt_tokens,
            "gen_ai.usage.completion_tokens": fin["completion_tokens"],
            "gen_ai.latency.time_in_queue": (fin["scheduled_ns"] - fin["queued_ns"]) * s,
            "gen_ai.latency.time_to_first_token": (first_token_wall_ns - arrival_ns) * s,
            "gen_ai.latency.e2e": (finish_wall_ns - arrival_ns) * s,
            "gen_ai.latency.time_in_model_prefill": (fin["first_token_ns"] - fin["scheduled_ns"]) * s,
            "gen_ai.latency.time_in_model_decode": (fin["last_token_ns"] - fin["first_token_ns"]) * s,
            "gen_ai.latency.time_in_model_inference": (fin["last_token_ns"] - fin["scheduled_ns"]) * s,
            "gen_ai.response.finish_reasons": json.dumps(["length"]),
        }
        # vLLM 0.32 sets these four only when truthy (temperature 0 → no attribute); mirror that.
        for key in ("top_p", "max_tokens", "temperature", "n"):
            if params[key]:
                attrs[f"gen_ai.request.{key}"] = params[key]
        trace_id, span_id, sampled = self.tracing.request_span(carrier, arrival_ns, finish_wall_ns, attrs)
        self.engine.requests.append({
            "request_id": request_id, "trace_id": trace_id, "span_id": span_id, "sampled": sampled,
            "arrival_ns": arrival_ns, "queued_ns": fin["queued_ns"], "scheduled_ns": fin["scheduled_ns"],
            "first_token_ns": fin["first_token_ns"], "last_token_ns": fin["last_token_ns"],
            "prompt_tokens": prompt_tokens, "completion_tokens": fin["completion_tokens"],
            "prefill": fin["prefill"], "decode": fin["decode"],
        })


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vllm-like/1"
    frontend: Frontend  # set on the subclass made by make_server

    def log_message(self, fmt, *args):  # access log at debug level: a load test would drown the console
        log.debug("%s " + fmt, self.address_string(), *args)

    def _json(self, status: int, obj: dict, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str):
        self._json(status, {"object": "error", "message": message, "type": status.phrase, "code": int(status)})

    def do_GET(self):
        fe = self.frontend
        if self.path == "/health":
            ok = fe.engine.ready.is_set() and not fe.engine.gone.is_set()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/v1/models":
            self._json(200, fe.models())
        elif self.path == "/debug/ground_truth":
            self._json(200, fe.engine.ground_truth(os.getpid()))
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

    def do_POST(self):
        chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            prompt_tokens, params = Frontend.parse(chat, body)
        except (ValueError, TypeError) as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        fe = self.frontend
        if body.get("model") not in (None, fe.cfg.model):
            return self._error(HTTPStatus.NOT_FOUND, f"The model `{body.get('model')}` does not exist.")
        if fe.engine.gone.is_set():
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, "engine is not running")
        carrier = {k.lower(): v for k, v in self.headers.items() if k.lower() in ("traceparent", "tracestate")}
        x_request_id = self.headers.get("X-Request-Id") or uuid.uuid4().hex
        response_id = f"chatcmpl-{x_request_id}" if chat else f"cmpl-{x_request_id}"
        request_id = response_id if chat else f"{response_id}-0"  # vLLM's per-prompt suffix for completions
        # vLLM's arrival_time: stamped by the frontend once the request is parsed, just before it goes to the engine
        arrival_ns = time.time_ns()
        rid, events = fe.engine.add(request_id, params["max_tokens"])
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        out = _Output(self, chat, stream, response_id, fe.cfg.model, include_usage, x_request_id)
        first_token_wall = None
        try:
            while True:
                ev = events.get(timeout=300)
                if ev[0] == "token":
                    first_token_wall = first_token_wall or ev[2]
                    out.token(WORDS[(rid + ev[1]) % len(WORDS)])
                elif ev[0] == "finished":
                    fin, finish_wall = ev[1], ev[2]
                    fe.finish(carrier, request_id, arrival_ns, first_token_wall or finish_wall, fin, finish_wall,
                              prompt_tokens, params)
                    out.done(prompt_tokens, fin["completion_tokens"])
                    return
                else:
                    return out.fail(ev[1])
        except queue.Empty:
            fe.engine.abort(rid)
            out.fail("timed out waiting for the engine")
        except (BrokenPipeError, ConnectionResetError):
            fe.engine.abort(rid)  # the client went away; vLLM aborts the request too


class _Output:
    """Writes one OpenAI response, whole or as server-sent events over chunked transfer encoding."""

    def __init__(self, h: Handler, chat, stream, response_id, model, include_usage, x_request_id):
        self.h, self.chat, self.stream, self.id, self.model = h, chat, stream, response_id, model
        self.include_usage, self.x_request_id = include_usage, x_request_id
        self.created = int(time.time())
        self.text: list[str] = []
        self.started = False

    def _start_stream(self):
        h = self.h
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("X-Request-Id", self.x_request_id)
        h.end_headers()
        self.started = True

    def _event(self, obj):
        data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
        self.h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.h.wfile.flush()

    def _chunk(self, piece: str | None, finish: str | None, usage=None) -> dict:
        if self.chat:
            if piece is None:
                delta = {}
            elif len(self.text) == 1:  # the first token's chunk also names the role, as vLLM's does
                delta = {"role": "assistant", "content": piece}
            else:
                delta = {"content": piece}
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            obj = "chat.completion.chunk"
        else:
            choices = [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}]
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices if usage is None else [], **({"usage": usage} if usage else {})}

    def token(self, word: str):
        piece = " " + word
        self.text.append(piece)
        if self.stream:
            if not self.started:
                self._start_stream()
            self._event(self._chunk(piece, None))

    def done(self, prompt_tokens: int, completion_tokens: int):
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if self.stream:
            if not self.started:
                self._start_stream()
            self._event(self._chunk(None, "length") if self.chat else self._chunk("", "length"))
            if self.include_usage:
                self._event(self._chunk(None, None, usage))
            self._event("[DONE]")
            self.h.wfile.write(b"0\r\n\r\n")
            self.h.wfile.flush()
            return
        text = "".join(self.text)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "length"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
            obj = "text_completion"
        self.h._json(200, {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                           "choices": [choice], "usage": usage}, {"X-Request-Id": self.x_request_id})

    def fail(self, message: str):
        if self.started:  # mid-stream: an error event, then close, as vLLM does
            self._event({"error": {"message": message, "type": "InternalServerError", "code": 500}})
            self.h.wfile.write(b"0\r\n\r\n")
            self.h.close_connection = True
        else:
            self.h._error(HTTPStatus.INTERNAL_SERVER_ERROR, message)


def make_server(frontend: Frontend, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"frontend": frontend})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def write_json_atomic(path: str, obj: dict):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def serve_main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="(APIServer pid=%(process)d) %(levelname)s %(message)s")
    t_start = time.time_ns()
    sync_us = args.sync_us if args.sync_us is not None else int(os.environ.get("FAKE_CUDA_SYNC_US") or DEFAULT_SYNC_US)
    ecfg = EngineConfig(libcuda=str(Path(args.libcuda).resolve()), max_batch=args.max_batch,
                        prefill_launches=args.prefill_launches, decode_launches=args.decode_launches,
                        graph_decode=args.graph_decode, sync_us=sync_us, load_delay_s=args.load_delay)
    cfg = ServeConfig(host=args.host, port=args.port, model=args.model,
                      otlp_traces_endpoint=args.otlp_traces_endpoint, ground_truth=args.ground_truth, engine=ecfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    tracing = Tracing(cfg.otlp_traces_endpoint)
    engine = EngineClient(ecfg, {**os.environ, "FAKE_CUDA_SYNC_US": str(sync_us)})
    while not engine.ready.wait(0.2):
        if stop.is_set():
            engine.shutdown()
            return 0
    if engine.hello is None:
        log.error("engine failed to start: %s", engine.fatal or f"exit code {engine.proc.wait()}")
        engine.shutdown()
        return 1
    tracing.startup_spans(t_start, time.time_ns(), engine.hello)
    frontend = Frontend(cfg, engine, tracing)
    server = make_server(frontend, cfg.host, cfg.port)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True).start()
    log.info("serving %s on http://%s:%d (engine pid %d, %s); spans to %s", cfg.model, cfg.host,
             server.server_address[1], engine.hello["pid"], "graph decode" if ecfg.graph_decode else "eager decode",
             cfg.otlp_traces_endpoint or "nowhere")
    rc = 0
    while not stop.wait(0.2):
        if engine.gone.is_set() and not stop.wait(1.0):  # a group-wide SIGTERM may reach the engine first
            log.error("engine exited unexpectedly (code %s)", engine.proc.poll())
            rc = 1
            break
    log.info("shutting down")
    server.shutdown()
    engine.shutdown()
    server.server_close()
    tracing.provider.shutdown()  # flushes the batch processor: every finished request's span leaves
    if cfg.ground_truth:
        write_json_atomic(cfg.ground_truth, engine.ground_truth(os.getpid()))
        log.info("ground truth: %s (%d requests, %d steps)", cfg.ground_truth, len(engine.requests), len(engine.steps))
    return rc


def add_engine_options(p: argparse.ArgumentParser):
    p.add_argument("--libcuda", default=os.environ.get("VLLM_LIKE_LIBCUDA", str(DEFAULT_LIBCUDA)),
                   help="the CUDA driver to load (default: testbed/build/libcuda.so.1, the fake)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests in one step (default 8)")
    p.add_argument("--prefill-launches", type=int, default=30, help="kernel launches per new request's prefill")
    p.add_argument("--decode-launches", type=int, default=12, help="kernel launches per decode step (eager)")
    p.add_argument("--graph-decode", action="store_true", help="decode with one cuGraphLaunch per step")
    p.add_argument("--load-delay", type=float, default=0.0, metavar="S",
                   help="seconds between mapping libcuda (cuInit) and loading the kernels, as a real engine spends "
                        "loading the model: give a sidecar started beside it time to attach and see the names")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vllm_like.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="the API server (spawns the engine)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", default="vllm-like", help="the served model name")
    s.add_argument("--otlp-traces-endpoint", default=None, help="e.g. http://127.0.0.1:4317 (none: no spans)")
    s.add_argument("--ground-truth", default=None, help="where to write the ground truth JSON on exit")
    s.add_argument("--sync-us", type=int, default=None,
                   help=f"FAKE_CUDA_SYNC_US for the engine (default: that variable, else {DEFAULT_SYNC_US})")
    add_engine_options(s)
    e = sub.add_parser("engine", help="internal: the engine process the server spawns")
    e.add_argument("--sync-us", type=int, default=DEFAULT_SYNC_US)
    add_engine_options(e)
    args = ap.parse_args(argv)
    return serve_main(args) if args.cmd == "serve" else engine_main(args)


if __name__ == "__main__":
    sys.exit(main())
