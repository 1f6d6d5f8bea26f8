"""A vLLM general plugin for the test bed: the real vLLM (CPU build) drives the fake CUDA driver, step for step.

vLLM's CPU build makes no CUDA calls, so on its own it cannot show that otel-cuda joins a request to the engine
steps that served it. This plugin makes each engine step of the real vLLM also do, on the fake libcuda
(testbed/build/libcuda.so.1, real driver signatures), what vLLM's GPU model runner does in its synchronous loop,
and writes down which requests each step served, as vLLM's own scheduler decided. The sidecar's steps are then
vLLM's steps, and a test can compare its per-request numbers with this ground truth exactly.

How it hooks in (vLLM 0.32):
  * `vllm.general_plugins` entry point (the dist-info next to this package; put testbed/vllm_shim on PYTHONPATH).
    vLLM calls every general plugin in every process: the API server, EngineCore and the worker.
  * It does nothing unless OTEL_CUDA_VLLM_SHIM names a directory, and nothing outside the process that runs the
    model: on the CPU platform that is always the multiprocessing executor's worker (vllm/platforms/cpu.py turns
    the "uni" executor into "mp"), whose multiprocessing name MultiprocExecutor sets to `VllmWorker-<rank>` and
    whose process title becomes `VLLM::Worker`. There the plugin runs inside WorkerWrapperBase.init_worker, just
    before the worker class (CPUWorker -> CPUModelRunner) is imported, so patching the class reaches every
    instance.
  * CPUModelRunner.load_model (after the process title is set): the driver is loaded (dlopen), then, after
    OTEL_CUDA_VLLM_SHIM_DELAY_S (default 1 s: a sidecar attaches within a discovery interval of a process mapping
    libcuda, and kernel names reach it only if it is attached before cuModuleGetFunction), the setup calls:
    cuInit, cuDeviceGet, cuDevicePrimaryCtxRetain, cuCtxSetCurrent, cuStreamCreate, cuEventCreate, cuMemAlloc_v2
    (weights, I/O buffer), cuModuleLoadData + cuModuleGetFunction (named kernels).
  * CPUModelRunner.execute_model / sample_tokens: vLLM 0.32 splits a step in two RPCs on the worker's one
    busy-loop thread; CPU scheduling is synchronous (vllm/platforms/cpu.py sets async_scheduling = False), so
    every step is: cuMemcpyHtoDAsync_v2 (inputs), FORWARD_LAUNCHES + one attention launch per scheduled request
    (cuLaunchKernel), [vLLM's real CPU forward pass], SAMPLER_LAUNCHES launches, [vLLM's real sampling], then the
    sampled-token readback: cuMemcpyDtoHAsync_v2, cuEventRecord(event, stream), cuEventSynchronize(event), all on
    one stream and one thread. A step with no scheduled tokens (vLLM returns at once) makes no call.

Ground truth: OTEL_CUDA_VLLM_SHIM/worker-<pid>.jsonl, one JSON object a line, flushed as written:
  {"kind": "init", "pid", "tid", "ancestors": [ppid, its parent, ... up to 1], "libcuda": path,
   "forward_launches", "sampler_launches", "kernels": {"0x<CUfunction>": name}}
  {"kind": "step", "step": n (from 1), "pid", "tid",
   "start_ns": CLOCK_MONOTONIC ns just before the first launch, "end_ns": when the readback cuEventSynchronize
   returned, "launches": cuLaunchKernel calls, "graph_launches": 0, "scheduled_tokens": vLLM's batch size in tokens,
   "requests": [{"engine_id": vLLM's internal id, "request_id": the span's gen_ai.request.id,
                 "phase": "prefill" | "decode", "tokens": tokens scheduled for it in this step,
                 "computed_tokens": tokens vLLM had computed for it before this step}, ...]}
A request is in prefill when vLLM schedules it for the first time (scheduled_new_reqs) or is still computing its
prompt (num_computed_tokens < prompt length: chunked prefill); otherwise the step decodes one token for it.
vLLM 0.32 makes its internal request id unique by appending "-" and 8 hex digits to the external one
(InputProcessor.assign_request_id); the llm_request span carries the external one (`cmpl-<X-Request-Id>-0`,
`chatcmpl-<X-Request-Id>`), so `request_id` is the internal id without that suffix.

Environment: OTEL_CUDA_VLLM_SHIM (directory; turns the plugin on), OTEL_CUDA_VLLM_SHIM_LIBCUDA (default
testbed/build/libcuda.so.1), OTEL_CUDA_VLLM_SHIM_DELAY_S (default 1.0), FAKE_CUDA_SYNC_US (read by the fake
driver: how long cuEventSynchronize blocks).
"""
from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import re
import threading
import time
from pathlib import Path

log = logging.getLogger("otel_cuda_vllm_shim")

ENV_DIR = "OTEL_CUDA_VLLM_SHIM"
DEFAULT_LIBCUDA = Path(__file__).resolve().parents[2] / "build" / "libcuda.so.1"

# Kernels named like vLLM's (mangled where vLLM's are), loaded from one PTX module so launches carry names.
RMS_NORM = "_ZN4vllm15rms_norm_kernelEPfPKfS2_fii"
GEMM = "ampere_sgemm_128x64_tn"
ROTARY = "_ZN4vllm23rotary_embedding_kernelEPKlPfS2_PKfiiii"
CACHE = "_ZN4vllm24reshape_and_cache_kernelEPKfS1_PfS2_PKliiii"
ATTENTION = "flash_fwd_kernel"
PENALTIES = "_ZN4vllm22apply_penalties_kernelEPfPKii"
ARGMAX = "_ZN4vllm14argmax_samplerEPKfPli"
FORWARD = (RMS_NORM, GEMM, ROTARY, CACHE)  # + one ATTENTION launch per scheduled request
SAMPLER = (PENALTIES, ARGMAX)
FORWARD_LAUNCHES, SAMPLER_LAUNCHES = len(FORWARD), len(SAMPLER)  # a step: 6 + one per scheduled request

_INTERNAL_SUFFIX = re.compile(r"-[0-9a-f]{8}$")  # InputProcessor.assign_request_id: f"{external}-{uuid:.8}"

P = ctypes.POINTER
_u64, _vp = ctypes.c_uint64, ctypes.c_void_p
_SIGNATURES = {  # cuda.h: CUresult is an int; handles are pointers; CUdeviceptr is a 64-bit unsigned integer
    "cuInit": [ctypes.c_uint],
    "cuDeviceGet": [P(ctypes.c_int), ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [P(_vp), ctypes.c_int],
    "cuCtxSetCurrent": [_vp],
    "cuStreamCreate": [P(_vp), ctypes.c_uint],
    "cuEventCreate": [P(_vp), ctypes.c_uint],
    "cuEventRecord": [_vp, _vp],
    "cuEventSynchronize": [_vp],
    "cuMemAlloc_v2": [P(_u64), ctypes.c_size_t],
    "cuModuleLoadData": [P(_vp), _vp],
    "cuModuleGetFunction": [P(_vp), _vp, ctypes.c_char_p],
    "cuMemcpyHtoDAsync_v2": [_u64, _vp, ctypes.c_size_t, _vp],
    "cuMemcpyDtoHAsync_v2": [_vp, _u64, ctypes.c_size_t, _vp],
    "cuLaunchKernel": [_vp, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                       ctypes.c_uint, ctypes.c_uint, _vp, P(_vp), P(_vp)],
}
CU_STREAM_NON_BLOCKING = 1  # PyTorch's side streams
CU_EVENT_DISABLE_TIMING = 2  # what torch.cuda.Event() creates by default


def register() -> None:
    """The vllm.general_plugins entry point: vLLM calls it once in each of its processes."""
    out_dir = os.environ.get(ENV_DIR)
    if not out_dir or not multiprocessing.current_process().name.startswith("VllmWorker"):
        return  # off, or not the process that runs the model (API server, EngineCore)
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner, "_otel_cuda_shim", False):
        return
    shim = Shim(Path(out_dir), os.environ.get("OTEL_CUDA_VLLM_SHIM_LIBCUDA", str(DEFAULT_LIBCUDA)),
                float(os.environ.get("OTEL_CUDA_VLLM_SHIM_DELAY_S", "1.0")))
    load_model, execute_model, sample_tokens = (CPUModelRunner.load_model, CPUModelRunner.execute_model,
                                                CPUModelRunner.sample_tokens)

    def shim_load_model(self, *args, **kwargs):
        result = load_model(self, *args, **kwargs)
        shim.init()
        return result

    def shim_execute_model(self, scheduler_output, *args, **kwargs):
        shim.begin_step(self, scheduler_output)
        result = execute_model(self, scheduler_output, *args, **kwargs)
        if result is not None:  # no sample_tokens() follows (nothing scheduled, or a non-sampling path)
            shim.end_step()
        return result

    def shim_sample_tokens(self, *args, **kwargs):
        shim.sample()
        result = sample_tokens(self, *args, **kwargs)
        shim.end_step()
        return result

    CPUModelRunner.load_model = shim_load_model
    CPUModelRunner.execute_model = shim_execute_model
    CPUModelRunner.sample_tokens = shim_sample_tokens
    CPUModelRunner._otel_cuda_shim = True
    log.info("otel-cuda shim: engine steps of pid %d call %s; ground truth in %s", os.getpid(), shim.libcuda,
             shim.path)


class Shim:
    def __init__(self, out_dir: Path, libcuda: str, delay_s: float):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"worker-{os.getpid()}.jsonl"
        self.libcuda, self.delay_s = libcuda, delay_s
        self.lib = None
        self.step: dict | None = None  # the step in flight between execute_model and sample_tokens
        self.sampled = False
        self.steps = 0

    # -- the driver ------------------------------------------------------------------------------------------
    def _call(self, name: str, *args) -> None:
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            raise RuntimeError(f"otel-cuda shim: {name} returned CUresult {rc}")

    def init(self) -> None:
        lib = ctypes.CDLL(self.libcuda)  # maps libcuda: from here on a sidecar's discovery sees this process
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        self.lib = lib
        time.sleep(self.delay_s)  # let a sidecar attach before the first call (kernel names need it)
        self._call("cuInit", 0)
        dev = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(dev), 0)
        self.ctx, self.stream, self.event = _vp(), _vp(), _vp()
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(self.ctx), dev)
        self._call("cuCtxSetCurrent", self.ctx)
        self._call("cuStreamCreate", ctypes.byref(self.stream), CU_STREAM_NON_BLOCKING)
        self._call("cuEventCreate", ctypes.byref(self.event), CU_EVENT_DISABLE_TIMING)
        self.weights, self.io = _u64(), _u64()
        self._call("cuMemAlloc_v2", ctypes.byref(self.weights), 4 << 20)
        self._call("cuMemAlloc_v2", ctypes.byref(self.io), 1 << 20)
        self.host = ctypes.create_string_buffer(1 << 20)  # pinned-buffer stand-in: the copies' host side
        names = sorted(set(FORWARD + SAMPLER + (ATTENTION,)))
        entries = "".join(f".visible .entry {n}()\n{{\n\tret;\n}}\n" for n in names)
        self.image = ctypes.create_string_buffer((".version 8.0\n.target sm_90\n.address_size 64\n\n" + entries).encode())
        module = _vp()
        self._call("cuModuleLoadData", ctypes.byref(module), self.image)
        self.kernels = {}
        for n in names:
            f = _vp()
            self._call("cuModuleGetFunction", ctypes.byref(f), module, n.encode())
            self.kernels[n] = f
        ancestors, pid = [], os.getpid()
        while pid > 1 and (pid := _parent(pid)):  # so a test can name vLLM's processes after they are gone
            ancestors.append(pid)
        self._write({"kind": "init", "pid": os.getpid(), "tid": threading.get_native_id(), "ancestors": ancestors,
                     "libcuda": self.libcuda, "forward_launches": FORWARD_LAUNCHES,
                     "sampler_launches": SAMPLER_LAUNCHES,
                     "kernels": {hex(f.value): n for n, f in self.kernels.items()}})

    def _launch(self, name: str) -> None:
        self._call("cuLaunchKernel", self.kernels[name], 64, 1, 1, 128, 1, 1, 0, self.stream, None, None)

    # -- one engine step ---------------------------------------------------------------------------------------
    def begin_step(self, runner, scheduler_output) -> None:
        """Before vLLM's forward pass: who is in the batch (read before vLLM updates its state), the input copy
        and the forward launches."""
        if self.lib is None or not scheduler_output.total_num_scheduled_tokens:
            return  # vLLM returns at once: no forward pass, no device work
        requests = _batch(runner, scheduler_output)
        tokens = scheduler_output.total_num_scheduled_tokens
        self._call("cuMemcpyHtoDAsync_v2", self.io, self.host, min(16 * tokens, len(self.host)), self.stream)
        self.step = {"kind": "step", "step": self.steps + 1, "pid": os.getpid(), "tid": threading.get_native_id(),
                     "start_ns": time.monotonic_ns(), "end_ns": 0, "launches": 0, "graph_launches": 0,
                     "scheduled_tokens": tokens, "requests": requests}
        self.sampled = False
        for name in FORWARD + (ATTENTION,) * len(requests):
            self._launch(name)
        self.step["launches"] += FORWARD_LAUNCHES + len(requests)

    def sample(self) -> None:
        """Before vLLM's sampling: the sampler kernels."""
        if self.step is not None and not self.sampled:
            for name in SAMPLER:
                self._launch(name)
            self.step["launches"] += SAMPLER_LAUNCHES
            self.sampled = True

    def end_step(self) -> None:
        """After vLLM's sampling: the sampled tokens come back (copy, event recorded after it, wait on it)."""
        if self.step is None:
            return
        self.sample()  # a step that returned its output without sample_tokens() still samples
        step, self.step = self.step, None
        self._call("cuMemcpyDtoHAsync_v2", self.host, self.io, 8 * len(step["requests"]), self.stream)
        self._call("cuEventRecord", self.event, self.stream)
        self._call("cuEventSynchronize", self.event)
        step["end_ns"] = time.monotonic_ns()
        self.steps += 1
        self._write(step)

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _batch(runner, scheduler_output) -> list[dict]:
    """The requests of this step and their phase, as vLLM's scheduler decided it."""
    computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
    prefill = set(computed)  # scheduled for the first time
    cached = scheduler_output.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        computed[req_id] = cached.num_computed_tokens[i]
        state = runner.requests.get(req_id)  # vLLM's per-request state from earlier steps: knows the prompt length
        if state is not None and computed[req_id] < state.num_prompt_tokens:
            prefill.add(req_id)  # chunked prefill: still computing its prompt
    return [{"engine_id": req_id, "request_id": _INTERNAL_SUFFIX.sub("", req_id),
             "phase": "prefill" if req_id in prefill else "decode", "tokens": n, "computed_tokens": computed.get(req_id)}
            for req_id, n in scheduler_output.num_scheduled_tokens.items()]


def _parent(pid: int) -> int:
    """The parent's pid; 0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0
