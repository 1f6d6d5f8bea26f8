"""vllm_like.py — a vLLM-shaped server on the fake CUDA driver: the traced peer of `otel-cuda demo` and the tests.

It reproduces what otel-cuda has to join, with known answers:
  * vLLM V1's processes. The API server (HTTP, OpenTelemetry, no CUDA) spawns --dp engine processes (data
    parallel: each request goes to exactly one engine, the least loaded, round robin among equals). With --tp 1 an
    engine does the CUDA work itself (vLLM's UniProcExecutor); with --tp N it spawns N worker processes (ranks,
    vLLM's MultiprocExecutor) that run every step in lockstep, and the engine makes no CUDA call at all. Command
    lines: engines contain `vllm_like.py engine`, workers `vllm_like.py worker` (select both with
    `otel-cuda … --match 'vllm_like\\.py (engine|worker)'`). CUDA goes through ctypes to testbed/build/libcuda.so.1
    (`make -C testbed`) with the real signatures.
  * vLLM's engine loop at the driver level, --loop async (the default, as vLLM >= 0.14 on GPU) or --loop sync; see
    "The step" below. Continuous batching: each step runs a prefill forward per newly scheduled request and one
    decode forward (or one cuGraphLaunch with --graph-decode) for the running ones; every scheduled request gets
    one token per step and runs exactly max_tokens steps (finish reason "length", like vLLM with ignore_eos).
  * one `llm_request` span per finished request, exported from the API process exactly as vLLM 0.32 does
    (shared/reference/vllm-tracing.md): kind SERVER, scope `vllm.tracing.otel`, start = arrival (wall clock),
    parent = the caller's `traceparent` (root without one; none at all for an unsampled one), the
    gen_ai.latency.* / gen_ai.usage.* / gen_ai.request.* attributes computed like vLLM from the engine's monotonic
    timestamps, resource service.name (OTEL_SERVICE_NAME, default `vllm`), vllm.process_id (os.getpid() of the API
    process: "1" when it is the first process of its own pid namespace), vllm.instrumenting_module_name; plus
    startup spans ("Overall Loading", …, INTERNAL);
  * a ground truth kept by the engines themselves: which steps, launches and graph launches each request took part
    in, per engine and rank, with host pids.

The step, per rank (what vLLM's GPU model runner does; streams and events are created once and reused):
  async (vllm/v1/worker/gpu/async_utils.py AsyncOutput, and the engine core's batch queue of 2):
    launching thread  cuEventSynchronize(prep_event)   the previous step's input copy is done (skipped on the first
                                                       step): vLLM's prepare_inputs_event, before the pinned input
                                                       buffers are overwritten
                      cuMemcpyHtoDAsync_v2(inputs, main), cuEventRecord(prep_event, main)
                      cuLaunchKernel × n (or cuGraphLaunch)                              on the main stream
                      cuEventRecord(tmp_event, main), cuStreamWaitEvent(copy, tmp_event)  copy_stream.wait_stream(main)
                      cuMemcpyDtoHAsync_v2 × 2 (sampled token ids, num sampled tokens)   on the copy stream
                      cuEventRecord(copy_event, copy)
                      then the engine schedules and launches the NEXT step before this one's output is processed
    output thread     cuEventSynchronize(copy_event), step by step in order, then hands the output to the engine
  sync: the readback on the launching thread (vLLM's `_to_list`); no prep event (vLLM has one only with async
    scheduling): cuMemcpyHtoDAsync_v2, the launches, cuMemcpyDtoHAsync_v2(main), cuEventRecord(transfer_event,
    main), cuEventSynchronize(transfer_event), then the output.
  The engine then processes the output: its tokens are stamped with time.monotonic_ns() a random --token-lag-ms
  LO,HI (default 1,4; seeded by --seed) after the readback sync returned (the last rank's), as vLLM's engine core
  stamps outputs once the worker hands them over; first/last token times come from those stamps. Async scheduling
  has already put the running requests into the next step with a placeholder token, but never past max_tokens, so
  a request is in exactly max_tokens steps. The API server handles each output at once, or --frontend-lag-ms
  LO,HI after its stamp (in order; a busy frontend, as vLLM's gets under load): the span's time_to_first_token
  and end then lag the engine by that much.
  GPU time: the fake blocks FAKE_CUDA_SYNC_US (--sync-us, default 200) inside every sync call, whatever the event.
  On its own that would make the launching thread's wait on the prep event (long done on a real GPU) as slow as the
  output thread's wait on the copy event, and the next step could never launch before the previous readback
  returned. So each rank also keeps a simulated GPU (--gpu-us, default 2000: one step's forward pass; steps run on
  it in order): before a sync call it sleeps the part of the wait the fake will not block, and the call returns
  when the simulated GPU reaches the event (SimulatedGpu below).

Usage
  python testbed/vllm_like.py serve --port 8000 --otlp-traces-endpoint http://127.0.0.1:4317 \\
      --ground-truth /tmp/gt.json [--host 127.0.0.1] [--model vllm-like] [--loop async|sync] [--dp 1] [--tp 1] \\
      [--max-batch 8] [--prefill-launches 30] [--decode-launches 12] [--graph-decode] [--gpu-us 2000] \\
      [--sync-us 200] [--token-lag-ms 1,4] [--frontend-lag-ms 0] [--seed 0] [--load-delay 0] [--libcuda PATH]
  (`engine` and `worker` are the subcommands the server spawns itself; they speak JSON lines on stdin/stdout.)
  Kernel names reach a sidecar only if it attached before cuModuleGetFunction / cuLibraryGetKernel ran: each CUDA
  process maps libcuda and calls cuInit at once, then waits --load-delay seconds before loading kernels (give ~2 s
  when the sidecar starts with or after the server; it attaches within a second of libcuda being mapped).

  HTTP: POST /v1/completions, POST /v1/chat/completions (`stream: true` → SSE, `stream_options.include_usage`),
  GET /health, GET /v1/models, GET /debug/ground_truth. Headers: `traceparent`/`tracestate` (W3C),
  `X-Request-Id: X` → gen_ai.request.id `cmpl-X-0` (completions) / `chatcmpl-X` (chat), echoed back.
  Every request runs to max_tokens (default 16): finish reason `length`, like vLLM with ignore_eos.
  Environment: OTEL_SERVICE_NAME, OTEL_BSP_SCHEDULE_DELAY (batch processor, ms), OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
  (grpc | http/protobuf), FAKE_CUDA_SYNC_US (the fake's in-call sync sleep; --sync-us wins; default 200).
  SIGTERM / SIGINT to the server (or its process group): stop serving, stop the engines (each finishes the steps in
  flight, stops its workers, frees its memory and exits 0), flush spans, write the ground truth, exit 0. Engines
  ignore SIGINT and stop by themselves on SIGTERM or when the server goes away (stdin EOF); the server then exits
  1. Workers ignore both signals and stop when their engine closes their pipe.
  Run it in its own pid namespace (`unshare --pid --fork python testbed/vllm_like.py serve …`, host /proc kept):
  vllm.process_id is then "1" and the ground truth still names every process by its host pid (NSpid).
  Only the latest 200 000 steps and 50 000 requests are kept in the ground truth.

Ground truth (JSON; written to --ground-truth on exit, and served live at GET /debug/ground_truth)
  {"version": 2,
   "api_pid": host pid of the API process, "api_ns_pid": its pid in its own namespace (= vllm.process_id),
   "loop": "async" | "sync", "dp": int, "tp": int,
   "engines": [{"index": int, "pid": host pid, "ns_pid": int, "ranks": [host pids doing its CUDA work, by rank]}],
   "engine_pid": engines[0].pid (version 1's key),
   "mono_to_epoch_ns": int,           # epoch_ns = monotonic_ns + this (CLOCK_MONOTONIC, as bpf_ktime_get_ns)
   "config": {"max_batch", "prefill_launches", "decode_launches", "graph_decode", "sync_us", "gpu_us", "loop",
              "dp", "tp", "token_lag_ms": [lo, hi], "frontend_lag_ms": [lo, hi], "seed"},
   "kernels": {"0x…handle": "name", …},  # CUfunction handles as the launches pass them (every CUDA process)
   "graphs": ["0x…"],                 # CUgraphExec handles (with --graph-decode)
   "requests": [{                     # finished requests, in finishing order
       "request_id": "cmpl-X-0", "trace_id": "32 hex", "span_id": "16 hex" | null (unsampled: no span),
       "sampled": bool, "arrival_ns": epoch ns (= the span's start),
       "engine_pid": host pid of the engine that ran it, "engine_index": int,
       "queued_ns", "scheduled_ns", "first_token_ns", "last_token_ns": monotonic ns (engine),
       "frontend_first_token_ns", "frontend_finished_ns": monotonic ns (when the API server saw them),
       "prompt_tokens": int, "completion_tokens": int,
       "prefill": {"steps": int, "launches": int, "graph_launches": int},
       "decode":  {"steps": int, "launches": int, "graph_launches": int}}],
   "steps": [{"engine_index": int, "engine_pid": int, "id": int (per engine, from 1),
              "start_ns": first launch (earliest rank), "end_ns": readback sync's return (latest rank),
              "token_ns": when the engine stamped the step's tokens,
              "launches": cuLaunchKernel calls, "graph_launches": cuGraphLaunch calls (both summed over the ranks),
              "rank_pids": [int], "ranks": [{"rank", "pid", "start_ns", "end_ns", "launches", "graph_launches"}],
              "requests": [["cmpl-X-0", "prefill" | "decode"], …]}]}
  Steps are engine steps, counted once however many ranks ran them; launches are summed over the ranks. A
  request's prefill is the one step that first schedules it; its decode is every later step through the one whose
  output gave its last token. A step shared by several requests counts fully for each (attribute, don't divide).
  With async scheduling a step starts before the previous one's readback returns, and a request's first decode
  step starts inside its prefill window (the scheduled → first token interval). As in vLLM, the span's phase
  windows are anchored on the API's arrival time, which is earlier than the engine's queued_ns by the IPC hop.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json
import logging
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_LIBCUDA = HERE / "build" / "libcuda.so.1"
DEFAULT_SYNC_US = 200  # what the fake blocks inside each sync call (FAKE_CUDA_SYNC_US)
DEFAULT_GPU_US = 8000  # one step's forward pass: a small model's decode step on a GPU takes ~5-30 ms
MAX_KEPT_STEPS = 200_000  # ground truth is bounded: a long demo keeps the latest steps / requests
MAX_KEPT_REQUESTS = 50_000
DEFAULT_MAX_TOKENS = 16
LOOPS = ("async", "sync")
BATCH_QUEUE_DEPTH = {"async": 2, "sync": 1}  # vLLM's engine core: batch_queue_size 2 with async scheduling
RANK_TIMEOUT_S = 60.0  # a rank that does not answer a step in this long is taken as dead

log = logging.getLogger("vllm_like")


def host_pid() -> int:
    """This process's pid in the host's pid namespace: the first field of NSpid in /proc/self/status.

    With the host's /proc mounted (a pod that has its own pid namespace but not its own /proc, or a sidecar's view),
    /proc/self is resolved in the namespace of that procfs, so NSpid lists the host pid first. os.getpid() is the
    pid inside our own namespace, which is what vLLM puts in vllm.process_id."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return os.getpid()

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
    "cuMemcpyHtoDAsync_v2": ([c_u64, c_void_p, c_size_t, c_void_p], True),
    "cuMemcpyDtoHAsync_v2": ([c_void_p, c_u64, c_size_t, c_void_p], True),
    "cuStreamSynchronize": ([c_void_p], True),
    "cuStreamWaitEvent": ([c_void_p, c_void_p, c_uint], True),
    "cuEventCreate": ([P(c_void_p), c_uint], True),
    "cuEventRecord": ([c_void_p, c_void_p], True),
    "cuEventSynchronize": ([c_void_p], True),
    "cuEventDestroy_v2": ([c_void_p], False),
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
# One rank's CUDA work: the engine process itself with --tp 1, each worker process with --tp N
# ------------------------------------------------------------------------------------------------------------
CU_STREAM_NON_BLOCKING = 0x1  # PyTorch's side streams
CU_EVENT_BLOCKING_SYNC, CU_EVENT_DISABLE_TIMING = 0x1, 0x2
BLOCKING_EVENT = CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING  # torch.cuda.Event(blocking=True)
PLAIN_EVENT = CU_EVENT_DISABLE_TIMING  # torch.cuda.Event() / torch.Event()


def mono_to_epoch_ns() -> int:
    """epoch - monotonic from the tightest of a few bracketed reads (one read preempted between its two clocks would
    be off by the preemption)."""
    reads = [(time.monotonic_ns(), time.time_ns(), time.monotonic_ns()) for _ in range(5)]
    best = min(reads, key=lambda r: r[2] - r[0])
    return best[1] - (best[0] + best[2]) // 2


def parse_lag(text: str) -> tuple[float, float]:
    """'LO,HI' (ms) → (lo, hi); one number means a fixed lag."""
    parts = [float(x) for x in str(text).split(",")]
    lo, hi = (parts[0], parts[-1]) if len(parts) in (1, 2) else (-1.0, -1.0)
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"a lag wants LO,HI (ms) with 0 <= LO <= HI, not {text!r}")
    return lo, hi


@dataclass(frozen=True)
class EngineConfig:
    libcuda: str = str(DEFAULT_LIBCUDA)
    max_batch: int = 8
    prefill_launches: int = 30
    decode_launches: int = 12
    graph_decode: bool = False
    sync_us: int = DEFAULT_SYNC_US
    gpu_us: int = DEFAULT_GPU_US
    load_delay_s: float = 0.0
    loop: str = "async"
    tp: int = 1
    token_lag_ms: tuple[float, float] = (1.0, 4.0)
    seed: int = 0
    weight_bytes: int = 4 << 20
    kv_cache_bytes: int = 64 << 20

    def argv(self) -> list[str]:
        """The options an engine or a worker process is started with (add_engine_options reads them back)."""
        lo, hi = self.token_lag_ms
        return ["--libcuda", self.libcuda, "--max-batch", str(self.max_batch),
                "--prefill-launches", str(self.prefill_launches), "--decode-launches", str(self.decode_launches),
                "--sync-us", str(self.sync_us), "--gpu-us", str(self.gpu_us), "--load-delay", str(self.load_delay_s), "--loop", self.loop,
                "--tp", str(self.tp), "--token-lag-ms", f"{lo},{hi}", "--seed", str(self.seed),
                *(["--graph-decode"] if self.graph_decode else [])]

    @classmethod
    def from_args(cls, args, sync_us: int | None = None) -> EngineConfig:
        return cls(libcuda=args.libcuda, max_batch=args.max_batch, prefill_launches=args.prefill_launches,
                   decode_launches=args.decode_launches, graph_decode=args.graph_decode,
                   sync_us=args.sync_us if sync_us is None else sync_us, gpu_us=args.gpu_us,
                   load_delay_s=args.load_delay,
                   loop=args.loop, tp=args.tp, token_lag_ms=args.token_lag_ms, seed=args.seed)


@dataclass(frozen=True)
class Launched:
    """What the launching thread leaves to the output thread for one step (async scheduling)."""
    start_ns: int  # just before the first launch
    launches: int
    graph_launches: int
    copy_event: object  # the CUevent recorded on the copy stream after the readback copies
    done_ns: int  # when the simulated GPU reaches that event


class SimulatedGpu:
    """The device the fake driver does not have. The fake blocks FAKE_CUDA_SYNC_US inside every sync call whatever
    the event, so a wait on an event the GPU passed long ago (vLLM's prep event, most steps) would cost as much as
    the wait for a forward pass, and the launching thread could never get ahead of the GPU as it does on a real
    one. Here the main stream runs each step's work for gpu_ns, in order, starting once the previous step's work is
    done; an event completes when the stream gets there. Before a sync call the rank sleeps the part of that wait
    the fake will not block, so the call returns when the simulated GPU reaches the event (and never earlier than
    FAKE_CUDA_SYNC_US after the call: the fake still blocks that long in it)."""

    def __init__(self, gpu_us: int, sync_us: int):
        self.gpu_ns, self.sync_ns = gpu_us * 1000, sync_us * 1000
        self.free_ns = 0  # when the main stream has finished the work queued so far

    def begin_step(self) -> int:
        """The step's input copy was queued: → when the GPU reaches it (the step's GPU start)."""
        return max(time.monotonic_ns(), self.free_ns)

    def end_step(self, gpu_start_ns: int, n_new: int, n_decoding: int) -> int:
        """The step's last call was queued: → when the GPU finishes the step (not before that call was issued).
        Like a real forward pass its time grows with the work in the batch: a prompt costs far more than a
        decoded token, so engines with different batches step at different paces."""
        work = self.gpu_ns * (0.6 + 0.3 * n_new + 0.05 * n_decoding)
        self.free_ns = max(gpu_start_ns + int(work), time.monotonic_ns())
        return self.free_ns

    def wait_before_sync(self, done_ns: int):
        delay = done_ns - self.sync_ns - time.monotonic_ns()
        if delay > 0:
            time.sleep(delay / 1e9)


class GpuModel:
    """What one rank does on the 'GPU': setup (context, streams, events, kernels, weights, KV cache, graphs), then
    each step's driver calls in vLLM's order (the module docstring lists them)."""

    def __init__(self, driver: Driver, cfg: EngineConfig):
        self.d, self.cfg = driver, cfg
        self.phases: list[tuple[str, int, int]] = []  # startup spans: (name, start mono ns, end mono ns)
        self.kernels: dict[str, int] = {}  # short name → CUfunction handle
        self.names: dict[str, str] = {}  # "0x…" handle → kernel name
        self.graph_exec = None
        self.device_name = "?"
        self._keep = []  # buffers the driver may still point at
        self._prep_recorded = False  # the first step has no previous input copy to wait for
        self._prep_done_ns = 0  # when the simulated GPU reaches the prep event
        self._copies = 0
        self.gpu = SimulatedGpu(cfg.gpu_us, cfg.sync_us)

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

    def hello(self, rank: int) -> dict:
        """What the rank tells its engine (and the engine the API server) once it is ready."""
        return {"rank": rank, "pid": host_pid(), "ns_pid": os.getpid(), "device": self.device_name,
                "kernels": self.names, "graphs": [hex(self.graph_exec.value)] if self.graph_exec is not None else [],
                "phases": self.phases, "missing_symbols": self.d.missing}

    def _stream(self):
        s = c_void_p()
        self.d.cuStreamCreate(ctypes.byref(s), CU_STREAM_NON_BLOCKING)
        return s

    def _event(self, flags: int):
        e = c_void_p()
        self.d.cuEventCreate(ctypes.byref(e), flags)
        return e

    def _init(self):
        d = self.d
        d.cuInit(0)
        self.dev = c_int()
        d.cuDeviceGet(ctypes.byref(self.dev), 0)
        self.ctx = c_void_p()
        d.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), self.dev)
        self.bind_thread()
        if d.has("cuDeviceGetName"):
            buf = ctypes.create_string_buffer(256)
            d.cuDeviceGetName(buf, 256, self.dev)
            self.device_name = buf.value.decode(errors="replace")
        # Streams and events live as long as the process, as the model runner's do: one handle per use, reused
        # every step (the sidecar sees the same few handles again and again, as with torch).
        self.stream = self._stream()  # the main stream: input copies and the forward pass
        self.events: list = []
        if self.cfg.loop == "async":
            self.copy_stream = self._stream()  # the output copy stream of AsyncOutput
            self.prep_event = self._event(BLOCKING_EVENT)  # prepare_inputs_event
            self.wait_event = self._event(PLAIN_EVENT)  # the event of copy_stream.wait_stream(main_stream)
            # One copy event per batch-queue slot: a slot's event is recorded again two steps later, and the engine
            # only launches that step once it has processed this one, i.e. after the output thread's sync returned.
            self.copy_events = [self._event(BLOCKING_EVENT) for _ in range(BATCH_QUEUE_DEPTH["async"])]
            self.events = [self.prep_event, self.wait_event, *self.copy_events]
        else:
            self.transfer_event = self._event(PLAIN_EVENT)  # _to_list's transfer_event
            self.events = [self.transfer_event]

    def bind_thread(self):
        """A new thread has no current context (vLLM's output thread sets the device first for that reason)."""
        if self.d.has("cuCtxSetCurrent"):
            self.d.cuCtxSetCurrent(self.ctx)

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

    def _alloc(self, nbytes: int):
        p = c_u64()
        self.d.cuMemAlloc_v2(ctypes.byref(p), nbytes)
        return p

    def _alloc_kv(self):
        rows = max(1, self.cfg.max_batch)
        self.kv = self._alloc(self.cfg.kv_cache_bytes)
        # the step's device buffers and their host sides: input ids in, sampled ids and their count out
        self.inputs_dev, self.inputs_host = self._alloc(8 * rows), ctypes.create_string_buffer(8 * rows)
        self.sampled_dev, self.sampled_host = self._alloc(8 * rows), ctypes.create_string_buffer(8 * rows)
        self.num_sampled_dev, self.num_sampled_host = self._alloc(4 * rows), ctypes.create_string_buffer(4 * rows)

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

    def _forward(self, n_new: int, n_decoding: int) -> tuple[int, int, int]:
        """The step's kernels on the main stream → (mono ns just before the first launch, launches, graph launches):
        a prefill forward per newly scheduled request, one batched decode forward for the running ones."""
        start = time.monotonic_ns()
        launches = graphs = 0
        for _ in range(n_new):
            launches += self._launch_all(self.prefill_plan)
        if n_decoding:
            if self.graph_exec is not None:
                self.d.cuGraphLaunch(self.graph_exec, self.stream)
                graphs += 1
            else:
                launches += self._launch_all(self.decode_plan)
        return start, launches, graphs

    def _copy_inputs(self, n: int):
        self.d.cuMemcpyHtoDAsync_v2(self.inputs_dev.value, self.inputs_host, 8 * n, self.stream)

    def launch(self, n_new: int, n_decoding: int) -> Launched:
        """Async scheduling: the launching thread's part of a step. It returns without waiting for the GPU."""
        d, n = self.d, n_new + n_decoding
        if self._prep_recorded:  # the previous step's input copy must be done before its pinned buffer is reused
            self.gpu.wait_before_sync(self._prep_done_ns)
            d.cuEventSynchronize(self.prep_event)
        self._copy_inputs(n)
        d.cuEventRecord(self.prep_event, self.stream)
        self._prep_recorded = True
        gpu_start = self._prep_done_ns = self.gpu.begin_step()
        start, launches, graphs = self._forward(n_new, n_decoding)
        d.cuEventRecord(self.wait_event, self.stream)  # copy_stream.wait_stream(main_stream)
        d.cuStreamWaitEvent(self.copy_stream, self.wait_event, 0)
        d.cuMemcpyDtoHAsync_v2(self.sampled_host, self.sampled_dev.value, 8 * n, self.copy_stream)
        d.cuMemcpyDtoHAsync_v2(self.num_sampled_host, self.num_sampled_dev.value, 4 * n, self.copy_stream)
        event = self.copy_events[self._copies % len(self.copy_events)]
        self._copies += 1
        d.cuEventRecord(event, self.copy_stream)
        return Launched(start, launches, graphs, event, self.gpu.end_step(gpu_start, n_new, n_decoding))

    def wait_output(self, launched: Launched) -> int:
        """Async scheduling, the output thread: AsyncOutput.get_output's copy_event.synchronize() → its return."""
        self.gpu.wait_before_sync(launched.done_ns)
        self.d.cuEventSynchronize(launched.copy_event)
        return time.monotonic_ns()

    def step_sync(self, n_new: int, n_decoding: int) -> tuple[int, int, int, int]:
        """The synchronous loop's whole step on one thread → (start, end = the sync's return, launches, graphs)."""
        d, n = self.d, n_new + n_decoding
        self._copy_inputs(n)
        gpu_start = self.gpu.begin_step()
        start, launches, graphs = self._forward(n_new, n_decoding)
        d.cuMemcpyDtoHAsync_v2(self.sampled_host, self.sampled_dev.value, 8 * n, self.stream)
        d.cuEventRecord(self.transfer_event, self.stream)
        self.gpu.wait_before_sync(self.gpu.end_step(gpu_start, n_new, n_decoding))
        d.cuEventSynchronize(self.transfer_event)
        return start, time.monotonic_ns(), launches, graphs

    def teardown(self):
        d = self.d
        if self.graph_exec is not None and d.has("cuGraphExecDestroy"):
            d.cuGraphExecDestroy(self.graph_exec)
            if d.has("cuGraphDestroy"):
                d.cuGraphDestroy(self.graph)
        for name in ("num_sampled_dev", "sampled_dev", "inputs_dev", "kv", "weights"):
            p = getattr(self, name, None)
            if p is not None and p.value:
                d.cuMemFree_v2(p.value)
        if d.has("cuEventDestroy_v2"):
            for e in getattr(self, "events", []):
                d.cuEventDestroy_v2(e)
        if d.has("cuStreamDestroy_v2"):
            for name in ("copy_stream", "stream"):
                if getattr(self, name, None) is not None:
                    d.cuStreamDestroy_v2(getattr(self, name))


class LocalRank:
    """A rank whose CUDA work runs in this process. `submit` runs the launching part on the caller's thread (the
    engine's own with --tp 1, a worker's main thread otherwise); with async scheduling an output thread then waits
    for each step's copy event, in order, and delivers the step's output. `deliver` gets one dict per step:
    {"step", "rank", "pid" (host), "start_ns", "end_ns", "launches", "graph_launches"}, or {"error": text}."""

    def __init__(self, model: GpuModel, loop: str, rank: int, deliver):
        self.model, self.rank, self.deliver = model, rank, deliver
        self.pid = host_pid()
        self._pending: queue.Queue = queue.Queue()
        self._thread = None
        if loop == "async":
            self._thread = threading.Thread(target=self._output_loop, name="async-output", daemon=True)
            self._thread.start()

    def submit(self, step_id: int, n_new: int, n_decoding: int):
        if self._thread is None:
            start, end, launches, graphs = self.model.step_sync(n_new, n_decoding)
            self.deliver(self._output(step_id, start, end, launches, graphs))
        else:
            self._pending.put((step_id, self.model.launch(n_new, n_decoding)))

    def _output_loop(self):
        self.model.bind_thread()
        while (item := self._pending.get()) is not None:
            step_id, launched = item
            try:
                end = self.model.wait_output(launched)
            except CudaError as e:
                self.deliver({"error": f"rank {self.rank}: {e}"})
                continue
            self.deliver(self._output(step_id, launched.start_ns, end, launched.launches, launched.graph_launches))

    def _output(self, step_id, start, end, launches, graphs) -> dict:
        return {"step": step_id, "rank": self.rank, "pid": self.pid, "start_ns": start, "end_ns": end,
                "launches": launches, "graph_launches": graphs}

    def close(self):
        """Waits for the outputs of every submitted step: the output thread ends idle, before the teardown."""
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join()


class WorkerRank:
    """A rank in a worker process (vLLM's MultiprocExecutor WorkerProc), seen from its engine: each step is sent to
    it, its output comes back from its output thread (or, in the sync loop, its main thread) once it synchronised."""

    def __init__(self, cfg: EngineConfig, engine_index: int, rank: int, deliver):
        argv = [sys.executable, str(Path(__file__).resolve()), "worker", "--engine-index", str(engine_index),
                "--rank", str(rank), *cfg.argv()]
        self.rank, self.deliver = rank, deliver
        self.hello: dict | None = None
        self.fatal: str | None = None
        self.ready = threading.Event()
        self.closing = False
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=self._read, name=f"rank{rank}-outbox", daemon=True).start()

    def _read(self):
        try:
            for line in self.proc.stdout:
                msg = json.loads(line)
                op = msg.get("op")
                if op == "out":
                    self.deliver(msg["out"])
                elif op == "hello":
                    self.hello = msg
                    self.ready.set()
                elif op == "fatal":
                    self.fatal = msg.get("error")
        finally:
            self.ready.set()
            if not self.closing:
                self.deliver({"error": f"worker rank {self.rank} (pid {self.proc.pid}) exited: {self.fatal or '?'}"})

    def _send(self, msg: dict):
        with self._lock:
            try:
                self.proc.stdin.write(json.dumps(msg) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass  # its reader reports the exit

    def submit(self, step_id: int, n_new: int, n_decoding: int):
        self._send({"op": "step", "id": step_id, "n_new": n_new, "n_decoding": n_decoding})

    def close(self, timeout: float = 10.0):
        self.closing = True
        self._send({"op": "shutdown"})
        with self._lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker rank %d did not stop in %.0f s: killing it", self.rank, timeout)
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------------------------------------------------
# The engine process: scheduler and engine-core loop over its ranks
# ------------------------------------------------------------------------------------------------------------
@dataclass
class PhaseCount:
    steps: int = 0
    launches: int = 0
    graph_launches: int = 0

    def add(self, launches: int, graphs: int):
        self.steps += 1
        self.launches += launches
        self.graph_launches += graphs


@dataclass
class EngineRequest:
    id: int
    request_id: str
    max_tokens: int
    queued_ns: int
    scheduled_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0
    scheduled: int = 0  # steps it was put in; runs one ahead of `generated` while a step is in flight (async)
    generated: int = 0
    aborted: bool = False
    prefill: PhaseCount = field(default_factory=PhaseCount)
    decode: PhaseCount = field(default_factory=PhaseCount)

    def summary(self) -> dict:
        return {"id": self.id, "queued_ns": self.queued_ns, "scheduled_ns": self.scheduled_ns,
                "first_token_ns": self.first_token_ns, "last_token_ns": self.last_token_ns,
                "completion_tokens": self.generated, "prefill": asdict(self.prefill), "decode": asdict(self.decode)}


@dataclass
class PlannedStep:
    id: int
    new: list  # first scheduled here: this step is their prefill
    decoding: list  # scheduled before: decode (with async scheduling, on a placeholder for a token still in flight)

    def members(self) -> list[list[str]]:
        return [[r.request_id, "decode"] for r in self.decoding] + [[r.request_id, "prefill"] for r in self.new]


class Scheduler:
    """vLLM's scheduler reduced to what the ground truth needs: first come first served up to max_batch running
    requests; a running request goes into every step until it has been put in max_tokens of them. Counting the
    steps scheduled rather than the tokens received is what async scheduling does with its placeholders, and it
    keeps a request out of any step past its last token."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.waiting: collections.deque[EngineRequest] = collections.deque()
        self.running: list[EngineRequest] = []  # from its first step until its last token came back
        self._next_id = 1

    def add(self, r: EngineRequest):
        self.waiting.append(r)

    def abort(self, rid: int):
        self.waiting = collections.deque(r for r in self.waiting if r.id != rid)
        for r in self.running:
            if r.id == rid:
                r.aborted = True  # a step in flight still carries it; its output is dropped
        self.running = [r for r in self.running if r.id != rid]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r.scheduled < r.max_tokens for r in self.running)

    def schedule(self) -> PlannedStep | None:
        decoding = [r for r in self.running if r.scheduled < r.max_tokens]
        new = []
        while self.waiting and len(self.running) + len(new) < self.max_batch:
            new.append(self.waiting.popleft())
        if not (new or decoding):
            return None
        now = time.monotonic_ns()  # vLLM's SCHEDULED event: one timestamp per schedule() call
        for r in new:
            r.scheduled_ns = now
        self.running += new
        for r in decoding + new:
            r.scheduled += 1
        step = PlannedStep(self._next_id, new, decoding)
        self._next_id += 1
        return step

    def update(self, step: PlannedStep, launches: int, graphs: int, token_ns: int):
        """A step's output: its work counts for each of its requests, each gets a token → (tokens, finished)."""
        for r in step.new:
            r.prefill.add(launches, graphs)
        for r in step.decoding:
            r.decode.add(launches, graphs)
        tokens, finished = [], []
        for r in step.decoding + step.new:
            if r.aborted:
                continue
            r.generated += 1
            if r.generated == 1:
                r.first_token_ns = token_ns
            r.last_token_ns = token_ns
            tokens.append([r.id, r.generated - 1])
            if r.generated >= r.max_tokens:
                finished.append(r)
        if finished:
            done = {id(r) for r in finished}
            self.running = [r for r in self.running if id(r) not in done]
        return tokens, finished


class Engine:
    """The engine core's loop. Each step goes to every rank; with async scheduling up to BATCH_QUEUE_DEPTH steps
    are in flight and the next step is scheduled and launched before the oldest one's output is processed, as
    vLLM's step_with_batch_queue does. IPC with the API server: JSON lines (`receive` queues one from the reader
    thread; `send` writes one)."""

    def __init__(self, cfg: EngineConfig, ranks: list, results: queue.Queue, send, index: int = 0):
        self.cfg, self.ranks, self.results, self.send = cfg, ranks, results, send
        self.inbox: queue.Queue = queue.Queue()
        self.sched = Scheduler(cfg.max_batch)
        self.depth = BATCH_QUEUE_DEPTH[cfg.loop]
        self.in_flight: collections.deque[PlannedStep] = collections.deque()
        self.outputs: dict[int, list[dict]] = {}  # step id → the rank outputs received so far
        self.stop = threading.Event()
        self.rng = random.Random(cfg.seed * 1_000_003 + index)  # token-timestamp lags: reproducible per engine
        self.steps_done = 0

    def receive(self, msg):
        """Called by the reader thread: the queued timestamp is taken on arrival, as EngineCore.add_request does."""
        if msg is not None and msg.get("op") == "add":
            msg["queued_ns"] = time.monotonic_ns()
        self.inbox.put(msg)

    def _handle(self, msg) -> None:
        if msg is None or msg.get("op") == "shutdown":
            self.stop.set()
        elif msg.get("op") == "add":
            self.sched.add(EngineRequest(msg["id"], msg["request_id"], max(1, int(msg["max_tokens"])),
                                         msg["queued_ns"]))
        elif msg.get("op") == "abort":
            self.sched.abort(msg["id"])

    def _drain_inbox(self, block: bool):
        try:  # block only when idle: a busy engine takes what arrived between steps
            self._handle(self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait())
            while True:
                self._handle(self.inbox.get_nowait())
        except queue.Empty:
            pass

    def run(self):
        while True:
            self._drain_inbox(block=not self.in_flight and not self.sched.has_work())
            if self.stop.is_set():
                break
            if len(self.in_flight) < self.depth:
                step = self.sched.schedule()
                if step is not None:
                    self._submit(step)
                    if len(self.in_flight) < self.depth:
                        continue  # fill the batch queue before blocking on its oldest step
            if self.in_flight:
                self._complete(self.in_flight.popleft())
        while self.in_flight:  # stopping: take the outputs of what the ranks were given
            self._complete(self.in_flight.popleft())

    def _submit(self, step: PlannedStep):
        self.in_flight.append(step)
        for rank in self.ranks:
            rank.submit(step.id, len(step.new), len(step.decoding))

    def _collect(self, step_id: int) -> list[dict]:
        deadline = time.monotonic() + RANK_TIMEOUT_S
        while len(self.outputs.get(step_id, ())) < len(self.ranks):
            try:
                out = self.results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"step {step_id}: only {len(self.outputs.get(step_id, ()))} of {len(self.ranks)} "
                                   f"ranks answered within {RANK_TIMEOUT_S:.0f} s") from None
            if "error" in out:
                raise RuntimeError(out["error"])
            self.outputs.setdefault(out["step"], []).append(out)
        return sorted(self.outputs.pop(step_id), key=lambda o: o["rank"])

    def _complete(self, step: PlannedStep):
        """Takes a step's output from every rank, then processes it like the engine core's update_from_output."""
        outs = self._collect(step.id)
        end = max(o["end_ns"] for o in outs)
        # The engine core gets the output a little after the readback returned (IPC, deserialising, the
        # scheduler's update) and stamps it then: the tokens' timestamps lag the sync by a random LO–HI ms.
        lo, hi = self.cfg.token_lag_ms
        stamp_at = end + int(self.rng.uniform(lo, hi) * 1e6)
        while (token_ns := time.monotonic_ns()) < stamp_at:
            time.sleep((stamp_at - token_ns) / 1e9)
        launches = sum(o["launches"] for o in outs)
        graphs = sum(o["graph_launches"] for o in outs)
        tokens, finished = self.sched.update(step, launches, graphs, token_ns)
        self.steps_done += 1
        ranks = [{k: o[k] for k in ("rank", "pid", "start_ns", "end_ns", "launches", "graph_launches")} for o in outs]
        self.send({
            "op": "step",
            "step": {"id": step.id, "start_ns": min(o["start_ns"] for o in outs), "end_ns": end, "token_ns": token_ns,
                     "launches": launches, "graph_launches": graphs, "rank_pids": [o["pid"] for o in outs],
                     "ranks": ranks, "requests": step.members()},
            "tokens": tokens,
            "finished": [r.summary() for r in finished],
        })


def ipc_channel():
    """→ send(msg): JSON lines on a private copy of stdout. fd 1 then points at stderr, so that nothing the driver or
    a library prints can corrupt the channel."""
    ipc = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    lock = threading.Lock()

    def send(msg):
        with lock:
            ipc.write(json.dumps(msg, separators=(",", ":")) + "\n")
    return send


def engine_main(args) -> int:
    send = ipc_channel()
    logging.basicConfig(level=logging.INFO,
                        format=f"(EngineCore_DP{args.engine_index} pid=%(process)d) %(levelname)s %(message)s")
    cfg = EngineConfig.from_args(args)
    results: queue.Queue = queue.Queue()
    ranks: list = []
    model = None
    try:
        if cfg.tp == 1:  # UniProcExecutor: this process is rank 0
            model = GpuModel(Driver(cfg.libcuda), cfg)
            model.setup()
            ranks = [LocalRank(model, cfg.loop, 0, results.put)]
            rank_hellos = [model.hello(0)]
        else:  # MultiprocExecutor: the workers do the CUDA work; this process makes no CUDA call
            ranks = [WorkerRank(cfg, args.engine_index, r, results.put) for r in range(cfg.tp)]
            for w in ranks:
                w.ready.wait()
            failed = [f"worker rank {w.rank}: {w.fatal or 'exited'}" for w in ranks if w.hello is None]
            if failed:
                raise CudaError("; ".join(failed))
            rank_hellos = [{k: v for k, v in w.hello.items() if k != "op"} for w in ranks]
    except Exception as e:  # one boundary: the API process turns this into its exit message
        log.exception("engine setup failed")
        send({"op": "fatal", "error": str(e)})
        for r in ranks:
            r.close()
        return 1
    engine = Engine(cfg, ranks, results, send, args.engine_index)

    def on_signal(signum, _frame):  # finish the steps in flight, then stop: the API writes the ground truth
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

    kernels, graphs = {}, []
    for h in rank_hellos:
        kernels.update(h["kernels"])
        graphs += [g for g in h["graphs"] if g not in graphs]
    send({"op": "hello", "index": args.engine_index, "pid": host_pid(), "ns_pid": os.getpid(),
          "mono_to_epoch_ns": mono_to_epoch_ns(), "ranks": rank_hellos,
          "device": rank_hellos[0]["device"], "kernels": kernels, "graphs": graphs,
          "phases": rank_hellos[0]["phases"], "missing_symbols": rank_hellos[0]["missing_symbols"]})
    log.info("engine ready: %s loop, tp %d (rank pids %s), max batch %d, driver %s", cfg.loop, cfg.tp,
             [h["pid"] for h in rank_hellos], cfg.max_batch, cfg.libcuda)
    rc = 0
    try:
        engine.run()
    except Exception:  # a rank died or a CUDA call failed: the API process sees the engine go
        log.exception("engine loop failed")
        rc = 1
    finally:
        for r in ranks:
            r.close()
        if model is not None:
            model.teardown()
        try:
            send({"op": "bye", "steps": engine.steps_done})
        except (BrokenPipeError, ValueError):
            pass
    return rc


def worker_main(args) -> int:
    """One rank of a --tp N engine: steps in on stdin, outputs out on stdout, in vLLM's per-step call order."""
    send = ipc_channel()
    logging.basicConfig(level=logging.INFO, format=f"(VllmWorker DP{args.engine_index} TP{args.rank} "
                                                   "pid=%(process)d) %(levelname)s %(message)s")
    # The engine stops its workers in order (it closes our stdin once its steps are done); a group-wide signal
    # must not take a rank away under a step in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cfg = EngineConfig.from_args(args)
    try:
        model = GpuModel(Driver(cfg.libcuda), cfg)
        model.setup()
    except Exception as e:
        log.exception("worker setup failed")
        send({"op": "fatal", "error": str(e)})
        return 1

    def deliver(out):
        try:
            send({"op": "out", "out": out})
        except (BrokenPipeError, ValueError):
            pass  # the engine went away; stdin's EOF stops us
    rank = LocalRank(model, cfg.loop, args.rank, deliver)
    send({"op": "hello", **model.hello(args.rank)})
    rc = 0
    try:
        for line in sys.stdin:
            msg = json.loads(line) if line.strip() else {}
            if msg.get("op") == "step":
                rank.submit(msg["id"], msg["n_new"], msg["n_decoding"])
            elif msg.get("op") == "shutdown":
                break
    except Exception:
        log.exception("worker step failed")
        rc = 1
    finally:
        rank.close()
        model.teardown()
        try:
            send({"op": "bye"})
        except (BrokenPipeError, ValueError):
            pass
    return rc


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
    dp: int = 1
    engine: EngineConfig = EngineConfig()
    frontend_lag_ms: tuple[float, float] = (0.0, 0.0)  # how late the API server handles each engine output


class EngineClient:
    """One engine process as the API server sees it: spawned with a pipe each way, its messages read on a thread
    and handed to `on_message(client, msg)` (msg None once it exited)."""

    def __init__(self, cfg: EngineConfig, index: int, env: dict, on_message):
        argv = [sys.executable, str(Path(__file__).resolve()), "engine", "--engine-index", str(index), *cfg.argv()]
        self.index, self.on_message = index, on_message
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        self.hello: dict | None = None
        self.fatal: str | None = None
        self.ready = threading.Event()
        self.gone = threading.Event()
        self.send_lock = threading.Lock()
        threading.Thread(target=self._read, name=f"engine{index}-outbox", daemon=True).start()

    def _read(self):
        try:
            for line in self.proc.stdout:
                msg = json.loads(line)
                op = msg.get("op")
                if op == "step":
                    self.on_message(self, msg)
                elif op == "hello":
                    self.hello = msg
                    self.ready.set()
                elif op == "fatal":
                    self.fatal = msg.get("error")
        finally:
            self.gone.set()
            self.ready.set()
            self.on_message(self, None)

    def send(self, msg: dict):
        line = json.dumps(msg) + "\n"
        with self.send_lock:  # many handler threads write to one pipe
            try:
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass

    def close_input(self):
        self.send({"op": "shutdown"})
        with self.send_lock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def wait(self, timeout: float):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("engine %d did not stop in %.0f s: killing it", self.index, timeout)
            self.proc.kill()
            self.proc.wait()
        self.gone.wait(2)


class Engines:
    """The API server's engines (data parallel): each request goes to exactly one of them — the one with the fewest
    requests in flight, round robin among equals, as vLLM's DP load balancer does with its engines' queue
    lengths — their step messages become token events for the waiting HTTP handlers, and the ground truth is
    gathered here."""

    def __init__(self, cfg: EngineConfig, dp: int, env: dict, frontend_lag_ms: tuple[float, float] = (0.0, 0.0)):
        self.cfg, self.dp = cfg, dp
        self.frontend_lag_ms = frontend_lag_ms
        self._lag_rng = random.Random(cfg.seed)
        self.lock = threading.Lock()
        self.waiters: dict[int, tuple[int, queue.Queue]] = {}  # request id → (engine index, its event queue)
        self.load = [0] * dp  # requests in flight per engine
        self._rr = 0
        self._next_id = 0
        self.steps: collections.deque = collections.deque(maxlen=MAX_KEPT_STEPS)
        self.requests: collections.deque = collections.deque(maxlen=MAX_KEPT_REQUESTS)
        self.clients = [EngineClient(cfg, i, env, self._on_message) for i in range(dp)]

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(c.ready.wait(max(0.0, deadline - time.monotonic())) for c in self.clients)

    def failure(self) -> str | None:
        """Why an engine did not start, once all are ready or gone (None: all started)."""
        for c in self.clients:
            if c.hello is None:
                return f"engine {c.index}: {c.fatal or f'exit code {c.proc.wait()}'}"
        return None

    def healthy(self) -> bool:
        return all(c.ready.is_set() and not c.gone.is_set() for c in self.clients)

    def any_gone(self) -> bool:
        return any(c.gone.is_set() for c in self.clients)

    def hellos(self) -> list[dict]:
        return [c.hello or {} for c in self.clients]

    def _on_message(self, client: EngineClient, msg: dict | None):
        if msg is None:  # the engine exited: its requests will not finish
            with self.lock:
                mine = [rid for rid, (i, _) in self.waiters.items() if i == client.index]
                lost = [self.waiters.pop(rid)[1] for rid in mine]
                self.load[client.index] = 0
            for q in lost:
                q.put(("error", "engine exited"))
            return
        lo, hi = self.frontend_lag_ms
        if hi > 0:  # a busy API server (vLLM's output handler falls behind under load) handles each output late
            due = msg["step"]["token_ns"] + int(self._lag_rng.uniform(lo, hi) * 1e6)
            while (mono := time.monotonic_ns()) < due:
                time.sleep((due - mono) / 1e9)
        now = time.time_ns()  # when the frontend sees the outputs: vLLM's iteration timestamp
        mono = time.monotonic_ns()  # the same moment on the engines' clock, for the ground truth
        engine = {"engine_index": client.index, "engine_pid": (client.hello or {}).get("pid")}
        with self.lock:
            self.steps.append({**engine, **msg["step"]})
            for rid, index in msg["tokens"]:
                w = self.waiters.get(rid)
                if w is not None:
                    w[1].put(("token", index, now, mono))
            for fin in msg["finished"]:
                w = self.waiters.pop(fin["id"], None)
                if w is not None:
                    self.load[w[0]] -= 1
                    w[1].put(("finished", {**fin, **engine}, now, mono))

    def add(self, request_id: str, max_tokens: int) -> tuple[int, queue.Queue]:
        q: queue.Queue = queue.Queue()
        with self.lock:
            self._next_id += 1
            rid = self._next_id
            order = [(self._rr + k) % self.dp for k in range(self.dp)]
            index = min(order, key=lambda i: self.load[i])  # the first least-loaded one after the last pick
            self._rr = (index + 1) % self.dp
            self.load[index] += 1
            self.waiters[rid] = (index, q)
        client = self.clients[index]
        if client.gone.is_set():
            q.put(("error", "engine exited"))
        client.send({"op": "add", "id": rid, "request_id": request_id, "max_tokens": max_tokens})
        return rid, q

    def abort(self, rid: int):
        with self.lock:
            w = self.waiters.pop(rid, None)
            if w is not None:
                self.load[w[0]] -= 1
        if w is not None:
            self.clients[w[0]].send({"op": "abort", "id": rid})

    def record(self, request: dict):
        with self.lock:
            self.requests.append(request)

    def shutdown(self, timeout: float = 10.0):
        for c in self.clients:  # all at once: each finishes its steps in flight and stops its workers
            c.close_input()
        for c in self.clients:
            c.wait(timeout)

    def ground_truth(self) -> dict:
        c = self.cfg
        hellos = self.hellos()
        engines = [{"index": cl.index, "pid": h.get("pid"), "ns_pid": h.get("ns_pid"),
                    "ranks": [r.get("pid") for r in h.get("ranks", [])]} for cl, h in zip(self.clients, hellos)]
        kernels, graphs = {}, []
        for h in hellos:
            kernels.update(h.get("kernels", {}))
            graphs += [g for g in h.get("graphs", []) if g not in graphs]
        with self.lock:
            requests, steps = list(self.requests), list(self.steps)
        return {
            "version": 2, "api_pid": host_pid(), "api_ns_pid": os.getpid(),
            "loop": c.loop, "dp": self.dp, "tp": c.tp, "engines": engines, "engine_pid": engines[0]["pid"],
            "mono_to_epoch_ns": hellos[0].get("mono_to_epoch_ns"),
            "config": {"max_batch": c.max_batch, "prefill_launches": c.prefill_launches,
                       "decode_launches": c.decode_launches, "graph_decode": c.graph_decode, "sync_us": c.sync_us,
                       "gpu_us": c.gpu_us,
                       "loop": c.loop, "dp": self.dp, "tp": c.tp, "token_lag_ms": list(c.token_lag_ms),
                       "frontend_lag_ms": list(self.frontend_lag_ms), "seed": c.seed},
            "kernels": kernels, "graphs": graphs, "requests": requests, "steps": steps,
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
            "vllm.process_id": str(os.getpid()),  # a string, as vLLM 0.32 sends it; the namespace's pid, as vLLM
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

    def startup_spans(self, t_start_ns: int, t_ready_ns: int, hellos: list[dict]):
        """Like vLLM's startup spans, one trace: 'Overall Loading' (root, this process, scope
        vllm.v1.engine.core_client) with each engine's setup phases as children, sent with that engine's resource
        (vllm.process_kind=engine_core, vllm.process_name=EngineCore_DP<i>), as vLLM's EngineCores send their own."""
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        root = self.provider.get_tracer("vllm.v1.engine.core_client").start_span(
            "Overall Loading", kind=SpanKind.INTERNAL, start_time=t_start_ns)
        ctx = trace.set_span_in_context(root)
        for hello in hellos:
            offset = hello.get("mono_to_epoch_ns") or 0
            engine_provider = self._provider({"vllm.process_id": str(hello.get("ns_pid", 0)),
                                              "vllm.process_kind": "engine_core",
                                              "vllm.process_name": f"EngineCore_DP{hello.get('index', 0)}"})
            engine_tracer = engine_provider.get_tracer("vllm.v1.engine.core")
            for name, start, end in hello.get("phases", []):
                engine_tracer.start_span(name, context=ctx, kind=SpanKind.INTERNAL, start_time=start + offset).end(
                    end_time=end + offset)
            engine_provider.shutdown()  # flush now: these spans never change again
        root.end(end_time=t_ready_ns)

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

    def __init__(self, cfg: ServeConfig, engines: Engines, tracing: Tracing):
        self.cfg, self.engines, self.tracing = cfg, engines, tracing
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
        self.engines.record({
            "request_id": request_id, "trace_id": trace_id, "span_id": span_id, "sampled": sampled,
            "arrival_ns": arrival_ns, "engine_pid": fin["engine_pid"], "engine_index": fin["engine_index"],
            "queued_ns": fin["queued_ns"], "scheduled_ns": fin["scheduled_ns"],
            "first_token_ns": fin["first_token_ns"], "last_token_ns": fin["last_token_ns"],
            "prompt_tokens": prompt_tokens, "completion_tokens": fin["completion_tokens"],
            "prefill": fin["prefill"], "decode": fin["decode"],
            # when this frontend saw the first token and the finish (monotonic ns): how late it was
            "frontend_first_token_ns": fin["frontend_ns"]["first_token"],
            "frontend_finished_ns": fin["frontend_ns"]["finished"],
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
            ok = fe.engines.healthy()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/v1/models":
            self._json(200, fe.models())
        elif self.path == "/debug/ground_truth":
            self._json(200, fe.engines.ground_truth())
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
        if fe.engines.any_gone():
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, "engine is not running")
        carrier = {k.lower(): v for k, v in self.headers.items() if k.lower() in ("traceparent", "tracestate")}
        x_request_id = self.headers.get("X-Request-Id") or uuid.uuid4().hex
        response_id = f"chatcmpl-{x_request_id}" if chat else f"cmpl-{x_request_id}"
        request_id = response_id if chat else f"{response_id}-0"  # vLLM's per-prompt suffix for completions
        # vLLM's arrival_time: stamped by the frontend once the request is parsed, just before it goes to the engine
        arrival_ns = time.time_ns()
        rid, events = fe.engines.add(request_id, params["max_tokens"])
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        out = _Output(self, chat, stream, response_id, fe.cfg.model, include_usage, x_request_id)
        first_token_wall = first_token_mono = None
        try:
            while True:
                ev = events.get(timeout=300)
                if ev[0] == "token":
                    first_token_wall, first_token_mono = first_token_wall or ev[2], first_token_mono or ev[3]
                    out.token(WORDS[(rid + ev[1]) % len(WORDS)])
                elif ev[0] == "finished":
                    fin, finish_wall = ev[1], ev[2]
                    fin["frontend_ns"] = {"first_token": first_token_mono or ev[3], "finished": ev[3]}
                    fe.finish(carrier, request_id, arrival_ns, first_token_wall or finish_wall, fin, finish_wall,
                              prompt_tokens, params)
                    out.done(prompt_tokens, fin["completion_tokens"])
                    return
                else:
                    return out.fail(ev[1])
        except queue.Empty:
            fe.engines.abort(rid)
            out.fail("timed out waiting for the engine")
        except (BrokenPipeError, ConnectionResetError):
            fe.engines.abort(rid)  # the client went away; vLLM aborts the request too


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
    ecfg = replace(EngineConfig.from_args(args, sync_us=sync_us), libcuda=str(Path(args.libcuda).resolve()))
    cfg = ServeConfig(host=args.host, port=args.port, model=args.model, otlp_traces_endpoint=args.otlp_traces_endpoint,
                      ground_truth=args.ground_truth, dp=args.dp, engine=ecfg, frontend_lag_ms=args.frontend_lag_ms)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    tracing = Tracing(cfg.otlp_traces_endpoint)
    engines = Engines(ecfg, cfg.dp, {**os.environ, "FAKE_CUDA_SYNC_US": str(sync_us)}, cfg.frontend_lag_ms)
    while not engines.wait_ready(0.2):
        if stop.is_set():
            engines.shutdown()
            return 0
    failure = engines.failure()
    if failure is not None:
        log.error("engine failed to start: %s", failure)
        engines.shutdown()
        return 1
    tracing.startup_spans(t_start, time.time_ns(), engines.hellos())
    frontend = Frontend(cfg, engines, tracing)
    server = make_server(frontend, cfg.host, cfg.port)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True).start()
    log.info("serving %s on http://%s:%d (api pid %d, engine pids %s, rank pids %s, %s loop, dp %d, tp %d, %s); "
             "spans to %s", cfg.model, cfg.host, server.server_address[1], host_pid(),
             ",".join(str(h["pid"]) for h in engines.hellos()),
             ",".join(str(r["pid"]) for h in engines.hellos() for r in h["ranks"]), ecfg.loop, cfg.dp, ecfg.tp,
             "graph decode" if ecfg.graph_decode else "eager decode", cfg.otlp_traces_endpoint or "nowhere")
    rc = 0
    while not stop.wait(0.2):
        if engines.any_gone() and not stop.wait(1.0):  # a group-wide SIGTERM may reach an engine first
            log.error("an engine exited unexpectedly (codes %s)", [c.proc.poll() for c in engines.clients])
            rc = 1
            break
    log.info("shutting down")
    server.shutdown()
    engines.shutdown()
    server.server_close()
    tracing.provider.shutdown()  # flushes the batch processor: every finished request's span leaves
    if cfg.ground_truth:
        gt = engines.ground_truth()
        write_json_atomic(cfg.ground_truth, gt)
        log.info("ground truth: %s (%d requests, %d steps)", cfg.ground_truth, len(gt["requests"]), len(gt["steps"]))
    return rc


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def add_engine_options(p: argparse.ArgumentParser):
    p.add_argument("--libcuda", default=os.environ.get("VLLM_LIKE_LIBCUDA", str(DEFAULT_LIBCUDA)),
                   help="the CUDA driver to load (default: testbed/build/libcuda.so.1, the fake)")
    p.add_argument("--loop", choices=LOOPS, default="async",
                   help="async: vLLM's default async scheduling (batch queue of 2, readback synchronised on an output "
                        "thread); sync: the readback synchronised on the launching thread (default async)")
    p.add_argument("--tp", type=positive, default=1,
                   help="tensor parallel ranks per engine: N > 1 spawns N worker processes that do the CUDA work")
    p.add_argument("--max-batch", type=positive, default=8, help="most requests running in one engine (default 8)")
    p.add_argument("--prefill-launches", type=int, default=30, help="kernel launches per new request's prefill")
    p.add_argument("--decode-launches", type=int, default=12, help="kernel launches per decode step (eager)")
    p.add_argument("--graph-decode", action="store_true", help="decode with one cuGraphLaunch per step")
    p.add_argument("--gpu-us", type=int, default=DEFAULT_GPU_US,
                   help="simulated GPU time of a step's forward pass: an event sync returns when the simulated GPU "
                        f"reaches the event, and at least FAKE_CUDA_SYNC_US after the call (default {DEFAULT_GPU_US})")
    p.add_argument("--token-lag-ms", type=parse_lag, default=(1.0, 4.0), metavar="LO,HI",
                   help="the engine stamps a step's tokens a random LO–HI ms after its readback sync returned "
                        "(default 1,4)")
    p.add_argument("--seed", type=int, default=0, help="seeds the token-timestamp lags (default 0)")
    p.add_argument("--load-delay", type=float, default=0.0, metavar="S",
                   help="seconds between mapping libcuda (cuInit) and loading the kernels, as a real engine spends "
                        "loading the model: give a sidecar started beside it time to attach and see the names")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vllm_like.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="the API server (spawns the engines)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", default="vllm-like", help="the served model name")
    s.add_argument("--otlp-traces-endpoint", default=None, help="e.g. http://127.0.0.1:4317 (none: no spans)")
    s.add_argument("--ground-truth", default=None, help="where to write the ground truth JSON on exit")
    s.add_argument("--dp", type=positive, default=1, help="data parallel engine processes (default 1)")
    s.add_argument("--sync-us", type=int, default=None,
                   help="FAKE_CUDA_SYNC_US for the engines: what the fake blocks inside every sync call (default: "
                        f"that variable, else {DEFAULT_SYNC_US})")
    s.add_argument("--frontend-lag-ms", type=parse_lag, default=(0.0, 0.0), metavar="LO,HI",
                   help="handle each engine output LO-HI ms after the engine stamped it, in order: a busy API server "
                        "(default 0: at once)")
    add_engine_options(s)
    for name, what in (("engine", "internal: an engine process the server spawns"),
                       ("worker", "internal: a worker process (one rank) an engine spawns with --tp > 1")):
        e = sub.add_parser(name, help=what)
        e.add_argument("--engine-index", type=int, default=0)
        e.add_argument("--sync-us", type=int, default=DEFAULT_SYNC_US)
        if name == "worker":
            e.add_argument("--rank", type=int, default=0)
        add_engine_options(e)
    args = ap.parse_args(argv)
    return {"serve": serve_main, "engine": engine_main, "worker": worker_main}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
