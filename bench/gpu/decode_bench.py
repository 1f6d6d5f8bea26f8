"""bench/gpu/decode_bench.py — the whole GPU measurement in one process (bench/gpu/run.sh runs it).

What it measures, on the real libcuda of the machine, with the sidecar's BPF program and stages running in
processes of their own (bench/tracer.py: otel_cuda.bpf.Probes with the default probe set, the pipeline, the
archive to a local directory; telemetry too where opentelemetry is installed). Per-call cost is bench/percall.py's
(bench/gpu/run.sh runs both):

 1. Eager decode: a randomly initialised Llama-style model (transformers LlamaForCausalLM, no download), HF
    `generate` with a KV cache. Untraced and traced phases alternate inside this one process (the tracer attaches
    and detaches between phases; pair i runs untraced first when i is even, traced first when odd); tokens/s per
    phase; the median of the per-pair ratios traced/untraced.
 2. CUDA-graph decode: one decode step of a Llama-style model (own code, static KV cache, on-device position)
    captured in a CUDA graph and replayed, the sampled tokens read back to the host every step as vLLM does; the
    same alternation of phases.
 3. Captured launches against an independent count: eager, torch.profiler (CUPTI) kernels over a window while
    traced, against the launches the sidecar processed over the same window; graph, the replays this process
    made against the cuGraphLaunch events processed.
 4. The share of launches with a kernel name (the tracer attaches before the first CUDA call and stays attached
    through a whole warm-up phase, so every kernel the phases launch is loaded, and named, while it watches).

Every step's failure is caught and reported; what was measured is always written (JSON under --out) and the short
table printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import benchlib as bl  # noqa: E402

LAUNCH_SYMBOLS = ("cuLaunchKernel", "cuLaunchKernelEx", "cuLaunchCooperativeKernel")
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out"), help="directory for the results")
    ap.add_argument("--pairs", type=int, default=7, help="untraced/traced pairs per decode workload (>= 7)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--eager-batch", type=int, default=8)
    ap.add_argument("--eager-prompt", type=int, default=32)
    ap.add_argument("--eager-tokens", type=int, default=128, help="new tokens per eager phase")
    ap.add_argument("--graph-batch", type=int, default=32)
    ap.add_argument("--graph-steps", type=int, default=800, help="graph replays per phase")
    ap.add_argument("--graph-max-len", type=int, default=2048, help="static KV cache length")
    ap.add_argument("--no-archive", action="store_true", help="the tracers run without the archive")
    ap.add_argument("--floor", action="store_true",
                    help="a third phase per pair: empty BPF programs on the functions ours probes (what any uprobe "
                         "tracer of these calls costs the workload)")
    ap.add_argument("--skip", default="", help="comma-separated: eager,graph,count")
    ap.add_argument("--tracer-cpus", default="",
                    help="pin the tracer to these CPUs (e.g. 8,9) and this process to the others: whether the "
                         "tracer sharing a core (or its hyperthread sibling) with the decode loop explains a slowdown")
    ap.add_argument("--deadline-s", type=float, default=0,
                    help="start no pair that would end after this many seconds from the start (0: no limit); the "
                         "pairs done are reported, so a run under a time limit still has results")
    ap.add_argument("--libcuda", help="the libcuda to load (default: libcuda.so.1 as the loader finds it)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: a tiny model on the CPU, the fake libcuda given by --libcuda (tests this script)")
    return ap.parse_args(argv)


LAUNCH_API = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
              "cudaLaunchCooperativeKernel", "cuLaunchCooperativeKernel")


def maps_read_cost(reads: int = 20) -> dict:
    """Lines of /proc/self/maps and the median time to read it whole: what discovery pays for each read of a
    selected CUDA process's maps (each scan until it maps libcuda, then every 50 scans)."""
    times = []
    for _ in range(reads):
        t = time.perf_counter()
        with open("/proc/self/maps") as f:
            text = f.read()
        times.append(time.perf_counter() - t)
    return {"lines": text.count("\n"), "read_ms": round(sorted(times)[len(times) // 2] * 1e3, 3)}


def host_steal_s() -> float:
    """CPU seconds the hypervisor took from this VM's vCPUs so far (/proc/stat `steal`, all CPUs): how noisy the
    loan was during a phase."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def count_profiled(prof):
    """(GPU kernels executed, launch API calls seen, those by name, where the counts came from) of a torch.profiler
    run: one kernel per launch, memcpy and memset activities left out."""
    kernels = runtime = 0
    names: dict[str, int] = {}
    try:
        events = prof.profiler.kineto_results.events()
        for e in events:
            name, dev = e.name(), str(e.device_type())
            if dev.endswith("CUDA"):
                if not name.startswith(("Memcpy", "Memset")):
                    kernels += 1
            elif name in LAUNCH_API:
                runtime += 1
                names[name] = names.get(name, 0) + 1
        return kernels, runtime, names, "kineto_results"
    except Exception:  # noqa: BLE001 - another torch version: the FunctionEvent list
        kernels = runtime = 0
        names = {}
        for e in prof.events():
            dev = str(getattr(e, "device_type", ""))
            if dev.endswith("CUDA"):
                if not e.name.startswith(("Memcpy", "Memset")):
                    kernels += 1
            elif e.name in LAUNCH_API:
                runtime += 1
                names[e.name] = names.get(e.name, 0) + 1
        return kernels, runtime, names, "events"


class Run:
    def __init__(self, args):
        self.args = args
        self.res: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args), "errors": {},
                          "machine": bl.machine()}
        self.tracers: dict[str, bl.Tracer] = {}
        self.t0 = time.monotonic()
        self.active: str | None = None
        self.tmp = tempfile.mkdtemp(prefix="otel-cuda-gpu-bench-")
        self.skip = set(filter(None, args.skip.split(",")))

    # -- bookkeeping ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, name: str):
        t0 = time.monotonic()
        bl.log(f"== {name}")
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every step's failure is reported, the rest goes on
            self.res["errors"][name] = "".join(traceback.format_exception(exc))[-3000:]
            bl.log(f"!! {name} failed: {exc!r}")
        finally:
            self.res.setdefault("step_seconds", {})[name] = round(time.monotonic() - t0, 1)
            self.save()

    def save(self) -> None:
        os.makedirs(self.args.out, exist_ok=True)
        with open(os.path.join(self.args.out, "gpu_results.json"), "w") as f:
            json.dump(self.res, f, indent=1, default=str)

    # -- the driver library and the tracers -------------------------------------------------------------------
    def load_libcuda(self) -> None:
        name = self.args.libcuda or "libcuda.so.1"
        if self.args.dry_run:
            os.environ.setdefault("FAKE_CUDA_SYNC_US", "0")  # the fake's syncs return at once (read at load)
        self.cu = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        path = None
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and re.search(r"/libcuda\.so(\.\d+)*$", parts[5].strip()):
                    path = parts[5].strip()
                    break
        if path is None:
            raise RuntimeError("libcuda is not mapped after loading it")
        self.lib = os.path.realpath(path)
        self.res["libcuda"] = self.lib
        bl.log(f"libcuda: {self.lib}")

    def start_tracers(self) -> None:
        if self.args.tracer_cpus:
            mine = os.sched_getaffinity(0) - {int(c) for c in self.args.tracer_cpus.split(",")}
            os.sched_setaffinity(0, mine)  # threads started later (PyTorch's) inherit it
        archive = None if self.args.no_archive else os.path.join(self.tmp, "archive-ours")
        t0 = time.monotonic()
        self.tracers["ours"] = bl.Tracer(self.lib, os.getpid(), cpus=self.args.tracer_cpus, archive=archive,
                                         symbols="default", detached=True)
        self.res.setdefault("tracers", {})["ours"] = {"kind": self.tracers["ours"].kind,
                                                      "start_s": round(time.monotonic() - t0, 2)}
        self.res["consumer"] = self.tracers["ours"].kind
        if self.args.floor:
            self.tracers["floor"] = FloorTracer(self.lib)
            self.res["tracers"]["floor"] = {"kind": self.tracers["floor"].kind}

    def attach(self, names) -> None:
        for n, t in self.tracers.items():
            if n in names:
                r = t.attach()
                self.res.setdefault("attach_s", []).append(round(r.get("s", 0), 3))
                if r.get("missing") is not None:
                    self.res["tracers"][n]["missing_symbols"] = r["missing"]
            else:
                r = t.detach()
                self.res.setdefault("detach_s", []).append(round(r.get("s", 0), 3))

    def only(self, name: str | None) -> None:
        """Exactly one tracer attached (None: untraced)."""
        if self.active == name and name is not None:
            return
        self.active = "?"
        for n, t in self.tracers.items():
            if n != name:
                t.detach()
        if name is not None:
            r = self.tracers[name].attach()
            self.res.setdefault("attach_s", []).append(round(r.get("s", 0), 3))
        self.active = name

    # -- 1./2. decode workloads ----------------------------------------------------------------------------------
    def build_models(self) -> None:
        import torch

        a = self.args
        self.torch = torch
        self.device = "cpu" if a.dry_run else "cuda"
        dtype = torch.float32 if a.dry_run else torch.bfloat16
        torch.manual_seed(0)
        self.dtype = dtype
        if a.dry_run:
            a.layers, a.hidden, a.heads, a.vocab = 2, 64, 4, 512
        self.res["model"] = {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "vocab": a.vocab,
                             "intermediate": a.hidden * 11 // 4, "dtype": str(dtype), "torch": torch.__version__}

    def build_eager(self) -> None:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM

        a, torch = self.args, self.torch
        cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                          num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                          max_position_embeddings=4096)
        with torch.device(self.device):
            model = LlamaForCausalLM(cfg)
        self.model = model.to(self.dtype).eval()
        self.model.generation_config.pad_token_id = 0
        self.res["model"]["transformers"] = transformers.__version__
        self.ids = torch.randint(0, a.vocab, (a.eager_batch, a.eager_prompt), device=self.device)
        self.mask = torch.ones_like(self.ids)

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def eager_phase(self, tokens: int | None = None) -> float:
        a, torch = self.args, self.torch
        tokens = tokens or a.eager_tokens
        self.sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=self.mask, max_new_tokens=tokens,
                                      min_new_tokens=tokens, do_sample=False, use_cache=True)
        self.sync()
        dt = time.perf_counter() - t0
        new = (out.shape[1] - self.ids.shape[1]) * out.shape[0]
        return new / dt

    def make_step(self):
        """One decode step of a Llama-style model over a static KV cache, everything on the device (the position
        too), so that it can be captured in a CUDA graph: returns (step, the sampled-token buffer)."""
        torch = self.torch
        F = torch.nn.functional
        a = self.args
        B, H, L, nh, V, T = a.graph_batch, a.hidden, a.layers, a.heads, a.vocab, a.graph_max_len
        hd = H // nh
        I = H * 11 // 4
        dev, dt = self.device, self.dtype
        g = torch.Generator(device=dev).manual_seed(0)

        def w(*shape):
            return (torch.randn(*shape, device=dev, generator=g) * 0.02).to(dt)

        p = {"emb": w(V, H), "head": w(H, V), "norm": torch.ones(H, device=dev, dtype=dt)}
        layers = [{"qkv": w(H, 3 * H), "o": w(H, H), "gate": w(H, I), "up": w(H, I), "down": w(I, H),
                   "n1": torch.ones(H, device=dev, dtype=dt), "n2": torch.ones(H, device=dev, dtype=dt)}
                  for _ in range(L)]
        kc = torch.zeros(L, B, nh, T, hd, device=dev, dtype=dt)
        vc = torch.zeros(L, B, nh, T, hd, device=dev, dtype=dt)
        ids = torch.zeros(B, dtype=torch.long, device=dev)
        pos = torch.zeros(1, dtype=torch.long, device=dev)
        ar = torch.arange(T, device=dev)

        def rms(x, weight):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt) * weight

        def step():
            x = p["emb"][ids]  # (B, H)
            mask = (ar <= pos).view(1, 1, 1, T)
            for i, lw in enumerate(layers):
                h = rms(x, lw["n1"])
                q, k, v = (h @ lw["qkv"]).view(B, 3, nh, 1, hd).unbind(1)
                kc[i].index_copy_(2, pos, k.contiguous())
                vc[i].index_copy_(2, pos, v.contiguous())
                att = F.scaled_dot_product_attention(q, kc[i], vc[i], attn_mask=mask)
                x = x + att.reshape(B, H) @ lw["o"]
                h = rms(x, lw["n2"])
                x = x + (F.silu(h @ lw["gate"]) * (h @ lw["up"])) @ lw["down"]
            logits = rms(x, p["norm"]) @ p["head"]
            ids.copy_(logits.argmax(-1))
            pos.add_(1).remainder_(T)

        return step, ids

    def build_graph(self) -> None:
        torch = self.torch
        step, ids = self.make_step()
        self.graph_ids = ids
        step()  # once eagerly, synchronised: an error in the step shows here with its own traceback
        self.sync()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()
        self.sync()
        self.graph_replays = 0

    def graph_phase(self, steps: int | None = None) -> float:
        steps = steps or self.args.graph_steps
        ids, replay = self.graph_ids, self.graph.replay
        self.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            replay()
            ids.cpu()  # the sampled tokens, read back every step as vLLM does (copy + sync)
        dt = time.perf_counter() - t0
        self.graph_replays += steps
        return steps * ids.shape[0] / dt

    def pairs(self, name: str, phase) -> None:
        """Alternating phases in this process; tokens/s each; the median of per-pair ratios. After every switch
        (the tracer attaching or detaching) one whole phase runs unmeasured: the first phase after a switch ran at
        a fraction of the speed of the next ones in the first GPU runs, traced or not (its tokens/s are kept as
        `first_tokens_per_s`)."""
        modes = [None] + [m for m in ("ours", "floor") if m in self.tracers]
        rows = []
        t_start = time.monotonic()
        for i in range(self.args.pairs):
            if rows and self.out_of_time((time.monotonic() - t_start) / len(rows)):
                bl.log(f"{name}: {len(rows)} pairs, no time for more (--deadline-s)")
                break
            k = i % len(modes)
            order = modes[k:] + modes[:k]
            row = {}
            for m in order:
                self.only(m)
                first = phase()
                before = self.tracers[m].settle() if m else None
                t0, cpu0, steal0 = time.monotonic(), time.thread_time(), host_steal_s()
                tps = phase()
                wall = time.monotonic() - t0
                # The launching thread's CPU time for the same tokens: what the probes cost it, without the GPU waits
                # and, where the guest kernel accounts steal (CONFIG_PARAVIRT_TIME_ACCOUNTING), the time the host
                # took; host_steal_s says how much that was. Whether it is steadier than tokens/s on a busy loan is
                # to be seen (on the development machine it was not: see bench/RESULTS.md).
                row[m or "untraced"] = {"tokens_per_s": tps, "phase_s": wall, "first_tokens_per_s": first,
                                        "thread_cpu_s": time.thread_time() - cpu0,
                                        "host_steal_s": host_steal_s() - steal0}
                if m:
                    after = self.tracers[m].settle()
                    row[m].update(self.capture(before, after, wall))
            rows.append(row)
            bl.log(f"{name} pair {i + 1}: " + ", ".join(
                f"{m} {v['tokens_per_s']:.0f} tok/s (first {v['first_tokens_per_s']:.0f})" for m, v in row.items()))
        self.only(None)
        out = {"pairs": rows, "modes": [m or "untraced" for m in modes]}
        for m in modes[1:]:
            ratios = [r[m]["tokens_per_s"] / r["untraced"]["tokens_per_s"] for r in rows]
            out[f"{m}_ratio_median"] = statistics.median(ratios)
            out[f"{m}_ratios"] = ratios
            out[f"{m}_tokens_per_s_median"] = statistics.median(r[m]["tokens_per_s"] for r in rows)
            cpu = [r[m]["thread_cpu_s"] / r["untraced"]["thread_cpu_s"] for r in rows]
            out[f"{m}_thread_cpu_ratios"] = cpu
            out[f"{m}_thread_cpu_ratio_median"] = statistics.median(cpu)
            named = sum(r[m]["named"] for r in rows)
            unknown = sum(r[m]["unknown"] for r in rows)
            out[f"{m}_named_share"] = named / (named + unknown) if named + unknown else None
            out[f"{m}_lost"] = sum(r[m]["lost"] for r in rows)
            out[f"{m}_sidecar_cpu_share"] = statistics.median(r[m]["sidecar_cpu_s"] / r[m]["wall_s"] for r in rows)
        out["untraced_tokens_per_s_median"] = statistics.median(r["untraced"]["tokens_per_s"] for r in rows)
        out["host_steal_s_per_phase_s"] = sum(v["host_steal_s"] for r in rows for v in r.values()) / sum(
            v["phase_s"] for r in rows for v in r.values())
        self.res[name] = out

    @staticmethod
    def capture(before: dict, after: dict, wall: float | None = None) -> dict:
        """What the tracer processed between two of its stats; sidecar CPU share over `wall` (the phase)."""
        def d(key):
            return after[key] - before[key]

        calls = {k: v - before["calls"].get(k, 0) for k, v in after["calls"].items() if v - before["calls"].get(k, 0)}
        unknown_by = {k: v - before.get("unknown_by_function", {}).get(k, 0)
                      for k, v in after.get("unknown_by_function", {}).items()}
        return {"launches": sum(calls.get(s, 0) for s in LAUNCH_SYMBOLS), "graph_launches": calls.get("cuGraphLaunch", 0),
                "calls": calls, "named": d("named"), "unknown": d("unknown"),
                "unknown_by_function": {k: v for k, v in unknown_by.items() if v},
                "lost": d("lost") + d("dropped"),
                "sidecar_cpu_s": d("cpu_s"), "wall_s": wall if wall else after["t"] - before["t"]}

    def out_of_time(self, next_s: float) -> bool:
        """Would a step of `next_s` seconds end after --deadline-s?"""
        d = self.args.deadline_s
        return bool(d) and time.monotonic() - self.t0 + next_s > d

    # -- 3. counts against an independent count ------------------------------------------------------------------
    def count_eager(self) -> None:
        torch = self.torch
        from torch.profiler import ProfilerActivity, profile

        self.only("ours")
        self.eager_phase(8)
        before = self.tracers["ours"].settle()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        with profile(activities=activities) as prof:
            self.eager_phase(32)
        after = self.tracers["ours"].settle()
        kernels, runtime, names, source = count_profiled(prof)
        cap = self.capture(before, after)
        self.res["count_eager"] = {"profiler_source": source, "profiler_kernels": kernels, "profiler_launch_api_calls": runtime,
                                   "profiler_launch_api_by_name": names, "captured_launches": cap["launches"],
                                   "captured_by_function": {s: cap["calls"].get(s, 0) for s in LAUNCH_SYMBOLS},
                                   "equal": cap["launches"] == kernels, "named": cap["named"], "unknown": cap["unknown"],
                                   "unknown_by_function": cap["unknown_by_function"],
                                   "lost": cap["lost"]}
        self.only(None)
        _ = torch

    def count_graph(self) -> None:
        self.only("ours")
        self.graph_phase(10)
        before = self.tracers["ours"].settle()
        replays0 = self.graph_replays
        self.graph_phase(500)
        after = self.tracers["ours"].settle()
        cap = self.capture(before, after)
        made = self.graph_replays - replays0
        self.res["count_graph"] = {"replays": made, "captured_graph_launches": cap["graph_launches"],
                                   "equal": made == cap["graph_launches"], "lost": cap["lost"],
                                   "other_calls": cap["calls"]}
        self.only(None)

    # -- the run --------------------------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        with self.step("setup: libcuda"):
            self.load_libcuda()
        if "setup: libcuda" in self.res["errors"]:
            return
        with self.step("setup: tracers"):
            self.start_tracers()
            self.attach(set(self.tracers))  # before the first CUDA call: every module's names are seen
        traced = "setup: tracers" not in self.res["errors"] and "ours" in self.tracers
        with self.step("setup: CUDA, models, warm-up (traced)"):
            import torch

            if not a.dry_run:
                torch.cuda.init()
                torch.zeros(1, device="cuda")
                self.res["gpu"] = torch.cuda.get_device_name(0)
            self.build_models()
            if "eager" not in self.skip or "count" not in self.skip:
                self.build_eager()
                # A whole phase, not a few tokens: kernels load lazily at their first launch, and the longer
                # sequences of a full phase pick kernels a short one never runs; one first launched while the tracer
                # is detached is never named (the H100 run of the second session: 1.5 % of launches unnamed).
                self.eager_phase()
            self.sync()
            for t in self.tracers.values():
                t.settle()
            self.only(None)
            self.res["maps"] = maps_read_cost()
            bl.log(f"this process's maps: {self.res['maps']['lines']} lines, read in {self.res['maps']['read_ms']} ms "
                   "(what one read of a selected process's maps costs discovery)")
        if "setup: CUDA, models, warm-up (traced)" in self.res["errors"]:
            return
        if not traced:
            bl.log("no tracer: the decode phases run untraced only")
        # The CUDA-graph part comes last and is built only now: a device-side error in it (the first attempt
        # had one) poisons the CUDA context, and must not cost the eager figures.
        if "eager" not in self.skip:
            with self.step("eager decode pairs"):
                self.pairs("eager", self.eager_phase)
        if "count" not in self.skip and traced:
            with self.step("launch counts: eager"):
                self.count_eager()
        if a.dry_run or ("graph" in self.skip and "count" in self.skip):
            return
        with self.step("CUDA graph: build"):
            self.only(None)
            self.build_graph()
            self.graph_phase(20)
        if "CUDA graph: build" in self.res["errors"]:
            return
        if "graph" not in self.skip:
            with self.step("CUDA-graph decode pairs"):
                self.pairs("graph", self.graph_phase)
        if "count" not in self.skip and traced:
            with self.step("launch counts: graph"):
                self.count_graph()

    def close(self) -> None:
        for n, t in self.tracers.items():
            try:
                self.res.setdefault("tracers", {}).setdefault(n, {})["summary"] = t.close()
            except Exception as exc:  # noqa: BLE001
                self.res["errors"][f"close {n}"] = repr(exc)
        self.res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()


def fmt(x, f="{:.3f}"):
    return "n/a" if x is None else f.format(x)


class FloorTracer:
    """Empty BPF programs (bl.EmptyProbes) on the functions ours probes, entry and, where ours has one, return: the
    tracer interface of bl.Tracer that pairs() uses, with nothing to count."""

    kind = "empty programs on ours's probe set"

    def __init__(self, lib: str):
        from otel_cuda.probes import DRIVER_PROBES

        self.lib, self.probes = lib, DRIVER_PROBES
        self.empty = bl.EmptyProbes()

    def attach(self) -> dict:
        t0, missing = time.monotonic(), []
        for p in self.probes:
            try:
                self.empty.attach(self.lib, p.symbol, returns=not p.entry_only)
            except Exception:  # noqa: BLE001 - optional symbols this libcuda lacks, as ours skips them
                missing.append(p.symbol)
        return {"s": time.monotonic() - t0, "missing": missing}

    def detach(self) -> dict:
        t0 = time.monotonic()
        self.empty.detach()
        return {"s": time.monotonic() - t0}

    def settle(self) -> dict:
        return {"calls": {}, "named": 0, "unknown": 0, "lost": 0, "dropped": 0, "cpu_s": 0.0, "t": time.monotonic()}

    def close(self) -> dict:
        self.empty.close()
        return {}


def table(res: dict) -> str:
    lines = [f"otel-cuda GPU benchmark — {res.get('gpu', 'no GPU')}, {res.get('libcuda', '?')}",
             f"consumer: {res.get('consumer')}; started {res.get('started')}", ""]
    for name, goal in (("eager", 0.95), ("graph", 0.99)):
        r = res.get(name)
        if not r:
            continue
        lines.append(f"{name} decode: untraced {fmt(r['untraced_tokens_per_s_median'], '{:.0f}')} tok/s (median)")
        if "ours_ratio_median" in r:
            lines.append(f"  ours      {fmt(r['ours_tokens_per_s_median'], '{:.0f}')} tok/s, traced/untraced "
                         f"{fmt(r['ours_ratio_median'])} (median of {len(r['ours_ratios'])} pairs; goal >= "
                         f"{goal}), named {fmt(r['ours_named_share'])}, lost {r['ours_lost']}, sidecar CPU "
                         f"{fmt(r['ours_sidecar_cpu_share'], '{:.2f}')} cores")
        if "floor_ratio_median" in r:
            lines.append(f"  empty probes on the same functions {fmt(r['floor_tokens_per_s_median'], '{:.0f}')} tok/s, "
                         f"traced/untraced {fmt(r['floor_ratio_median'])} (the uprobe floor; ours/floor "
                         f"{fmt(statistics.median(o / f for o, f in zip(r['ours_ratios'], r['floor_ratios'])))})")
        if "ours_thread_cpu_ratio_median" in r:
            floor = (f", empty probes {fmt(r['floor_thread_cpu_ratio_median'])}"
                     if "floor_thread_cpu_ratio_median" in r else "")
            lines.append(f"  launching thread's CPU time for the same tokens, traced/untraced: ours "
                         f"{fmt(r['ours_thread_cpu_ratio_median'])}{floor}; host steal "
                         f"{fmt(r['host_steal_s_per_phase_s'], '{:.2f}')} CPU s per phase second")
    ce, cg = res.get("count_eager"), res.get("count_graph")
    if ce:
        lines.append(f"eager launches: captured {ce['captured_launches']} vs profiler kernels {ce['profiler_kernels']} "
                     f"(launch API calls {ce['profiler_launch_api_calls']}) equal={ce['equal']}, lost {ce['lost']}")
    if cg:
        lines.append(f"graph launches: captured {cg['captured_graph_launches']} vs replays {cg['replays']} "
                     f"equal={cg['equal']}, lost {cg['lost']}")
    if res.get("errors"):
        lines.append("")
        lines.append("FAILED steps: " + ", ".join(res["errors"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pairs < 7:
        bl.log("--pairs below 7: the issue asks for at least 7 pairs")
    run = Run(args)
    try:
        run.run()
    finally:
        run.close()
        subprocess.run(["rm", "-rf", run.tmp], check=False)
        print(table(run.res), flush=True)
        print(f"\nfull results: {os.path.join(args.out, 'gpu_results.json')}", flush=True)
    return 1 if run.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
