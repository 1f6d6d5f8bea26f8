"""bench/gpu/async_engine.py — a vLLM-shaped engine with async-scheduling readback, traced by the real sidecar.

Issue 11's GPU item: does the sidecar find the steps of vLLM's default (async-scheduling) engine loop on a real
GPU, and does the join claim exactly the steps each request ran in?

Two processes:
* the driver (default role) starts the engine as a child, starts the real sidecar in its own process
  (otel_cuda.sidecar.start with the BPF probes, selecting the child by pid, OTLP/gRPC receiver on 127.0.0.1,
  instance_key=host), tells the engine to go, and compares what the sidecar saw with the engine's ground truth;
* the engine (--role engine): a small model (embedding, a few torch.nn.Linear layers, an LM head, argmax sampler;
  bf16), continuous batching of requests of varying max_tokens arriving over time, and vLLM's async-scheduling
  loop (vllm/v1/worker/gpu_model_runner.py + vllm/v1/engine/core.py batch queue):
    - a launching thread, per step: waits on the previous step's input-copy event, copies the inputs host->device
      (non_blocking from pinned buffers), records the input-copy event, launches the forward (optionally with a
      GPU spin so the GPU, not the CPU, sets the pace), then copy_stream.wait_stream(main),
      sampled.to("cpu", non_blocking=True) on the copy stream and a per-step torch.cuda.Event(blocking=True)
      recorded on the copy stream;
    - an output thread: event.synchronize() for each step in order, stamps the tokens (time.monotonic_ns) right
      after;
    - batch queue of 2: the launcher runs at most one step ahead of the output thread;
    - per finished request, vLLM's llm_request span (queue / prefill / decode / ttft latencies, completion tokens,
      resource vllm.process_id), sent as OTLP/gRPC ExportTraceServiceRequest to the sidecar's receiver (built with
      opentelemetry-proto and grpc directly: the same bytes the SDK's OTLP exporter sends).
  The engine's ground truth: per step its start, its end (the stamp after the readback wait) and batch; per
  request the step indexes of its prefill (first token) and decodes.

The driver prints one JSON object last (and writes it to --out): steps seen by the sidecar vs the engine's, how
many engine steps have a sidecar step ending within 0.5 ms, requests joined, requests whose cuda.prefill.steps == 1
and cuda.decode.steps == completion_tokens - 1 and whose claimed steps are exactly the engine's (by end times),
and lost events.

On the GPU machine (prepare .gpu/ here first, see bench/gpu/run.sh):
    source .gpu/activate.sh; PYTHONPATH=.gpu/py python3 bench/gpu/async_engine.py --out $OUT/async.json
Without a GPU (logic only): python bench/gpu/async_engine.py --device cpu --no-sidecar
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MATCH_NS = 500_000  # an engine step and a sidecar step are the same when their ends differ by less than this


# ---------------------------------------------------------------------------------------------------- engine
class _CpuEvent:
    """torch.cuda.Event's surface for a dry run on CPU (everything there is synchronous)."""

    def __init__(self, **_kw):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class _CpuStream:
    def wait_stream(self, other):
        pass


def engine_main(args) -> None:
    import contextlib

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu for a dry run)")
    dev = torch.device(args.device)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    rng = random.Random(args.seed)
    D, V, B = args.hidden, args.vocab, args.max_batch
    layers = [torch.nn.Linear(D, D, bias=False).to(dev, dtype) for _ in range(args.layers)]
    head = torch.nn.Linear(D, V, bias=False).to(dev, dtype)
    emb = (torch.randn(V, D, device=dev) * 0.02).to(dtype)

    Event = (lambda: torch.cuda.Event(blocking=True)) if cuda else _CpuEvent
    main = torch.cuda.current_stream() if cuda else None
    copy_stream = torch.cuda.Stream() if cuda else _CpuStream()
    stream_ctx = (lambda s: torch.cuda.stream(s)) if cuda else (lambda s: contextlib.nullcontext())
    pin = cuda
    ids_host = torch.zeros(B, dtype=torch.int64, pin_memory=pin)
    src_host = torch.zeros(B, dtype=torch.int64, pin_memory=pin)
    ids_dev = torch.zeros(B, dtype=torch.int64, device=dev)
    src_dev = torch.zeros(B, dtype=torch.int64, device=dev)
    prev_sampled = torch.zeros(B, dtype=torch.int64, device=dev)
    sleep_cycles = int(args.gpu_sleep_us * 1900)  # ~1.9 GHz SM clock (H200 boost 1.98)

    def forward(n: int):
        src = src_dev[:n]
        ids = torch.where(src >= 0, prev_sampled[src.clamp(min=0)], ids_dev[:n])
        x = emb[ids]
        for layer in layers:
            x = torch.nn.functional.gelu(layer(x))
        if cuda and sleep_cycles:
            torch.cuda._sleep(sleep_cycles)
        sampled = head(x).argmax(-1)
        prev_sampled[:n].copy_(sampled)
        return sampled

    # requests: arrivals over time (Poisson), max_tokens 1..max_tokens (some of each extreme)
    reqs = []
    t = 0.0
    for i in range(args.requests):
        t += rng.expovariate(args.rate)
        mt = rng.choice([1, 2, args.max_tokens]) if i % 10 == 0 else rng.randint(1, args.max_tokens)
        reqs.append({"id": f"req-{i}", "arrival_off_ns": int(t * 1e9), "max_tokens": mt, "prompt_token": rng.randrange(V),
                     "tokens": 0, "prefill_step": None, "decode_steps": [], "rows": []})

    in_flight = threading.Semaphore(2)  # vLLM's batch queue of 2: at most one step ahead of the output thread
    to_output: queue.Queue = queue.Queue()
    to_export: queue.Queue = queue.Queue()
    steps: list[dict] = []
    errors: list[str] = []

    def step_once(index: int, batch: list[dict], prev_rows: dict, prev_input_event) -> tuple:
        """One step on the launching thread; returns (its rows by request id, its input-copy event)."""
        t0 = time.monotonic_ns()
        if prev_input_event is not None:
            prev_input_event.synchronize()  # the pinned input buffers may be rewritten
        n = len(batch)
        rows = {}
        for row, r in enumerate(batch):
            rows[r["id"]] = row
            if r["id"] in prev_rows:
                ids_host[row] = 0
                src_host[row] = prev_rows[r["id"]]
            else:
                ids_host[row] = r["prompt_token"]
                src_host[row] = -1
        ids_dev[:n].copy_(ids_host[:n], non_blocking=True)
        src_dev[:n].copy_(src_host[:n], non_blocking=True)
        input_event = Event()
        input_event.record(main) if cuda else None
        sampled = forward(n)
        copy_stream.wait_stream(main)
        with stream_ctx(copy_stream):
            if cuda:
                sampled.record_stream(copy_stream)
            out = sampled.to("cpu", non_blocking=True)
            ready = Event()
            ready.record(copy_stream) if cuda else None
        to_output.put((index, [r["id"] for r in batch], ready, out, t0))
        return rows, input_event

    def launcher(run_start: int, warmup: int) -> None:
        waiting = list(reqs)  # by arrival
        running: list[dict] = []
        prev_rows: dict = {}
        prev_event = None
        index = 0
        scheduled_tokens: dict[str, int] = {}
        warm = [{"id": f"warm-{i}", "prompt_token": i, "max_tokens": 10**9} for i in range(B)]
        for w in range(warmup):  # same loop, not counted (kernels loaded, allocator warm)
            in_flight.acquire()
            prev_rows, prev_event = step_once(-1 - w, warm, prev_rows, prev_event)
        to_output.put("warm")
        prev_rows = {}
        while waiting or running:
            now = time.monotonic_ns()
            while waiting and len(running) < B and run_start + waiting[0]["arrival_off_ns"] <= now:
                r = waiting.pop(0)
                r["scheduled_ns"] = now
                running.append(r)
                scheduled_tokens[r["id"]] = 0
            if not running:
                time.sleep(max(0.0, (run_start + waiting[0]["arrival_off_ns"] - time.monotonic_ns()) / 1e9))
                continue
            in_flight.acquire()
            batch = list(running)
            for r in batch:
                scheduled_tokens[r["id"]] += 1
            # async scheduling: the scheduler knows a request ends at max_tokens without seeing its tokens
            running = [r for r in running if scheduled_tokens[r["id"]] < r["max_tokens"]]
            prev_rows, prev_event = step_once(index, batch, prev_rows, prev_event)
            index += 1
        to_output.put(None)

    def output_thread() -> None:
        by_id = {r["id"]: r for r in reqs}
        while True:
            item = to_output.get()
            if item is None:
                break
            if item == "warm":
                steps.clear()
                continue
            index, ids, ready, out, t0 = item
            s0 = time.monotonic_ns()
            ready.synchronize()
            t_end = time.monotonic_ns()  # the tokens are here
            toks = out.tolist()
            del out, ready
            if index >= 0:
                steps.append({"index": index, "start_ns": t0, "sync_start_ns": s0, "end_ns": t_end, "batch": len(ids)})
                for rid, _tok in zip(ids, toks):
                    r = by_id[rid]
                    r["tokens"] += 1
                    if r["prefill_step"] is None:
                        r["prefill_step"] = index
                        r["first_ns"] = t_end
                    else:
                        r["decode_steps"].append(index)
                    if r["tokens"] == r["max_tokens"]:
                        r["last_ns"] = t_end
                        r["finished_ns"] = time.monotonic_ns()
                        to_export.put(r)
            in_flight.release()
        to_export.put(None)

    def exporter(offset_ns: int) -> None:
        """vLLM's llm_request spans over OTLP/gRPC, batched like the SDK's BatchSpanProcessor (~every 50 ms)."""
        stub = None
        if args.otlp:
            import grpc
            from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
            from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
            from opentelemetry.proto.resource.v1.resource_pb2 import Resource
            from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

            channel = grpc.insecure_channel(args.otlp)
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)

            def kv(k, v):
                if isinstance(v, int):
                    return KeyValue(key=k, value=AnyValue(int_value=v))
                if isinstance(v, float):
                    return KeyValue(key=k, value=AnyValue(double_value=v))
                return KeyValue(key=k, value=AnyValue(string_value=str(v)))

            resource = Resource(attributes=[kv("service.name", "vllm"), kv("vllm.process_id", os.getpid())])
        done = False
        while not done:
            batch = []
            deadline = time.monotonic() + 0.05
            while time.monotonic() < deadline or not batch:
                try:
                    r = to_export.get(timeout=max(0.001, deadline - time.monotonic()))
                except queue.Empty:
                    if time.monotonic() >= deadline and not batch:
                        deadline = time.monotonic() + 0.05
                    continue
                if r is None:
                    done = True
                    break
                batch.append(r)
            if not batch or stub is None:
                continue
            spans = []
            for r in batch:
                arrival = run_start_holder[0] + r["arrival_off_ns"]
                r["span_id"] = os.urandom(8).hex()
                r["trace_id"] = os.urandom(16).hex()
                attrs = {
                    "gen_ai.request.id": r["id"],
                    "gen_ai.latency.time_in_queue": (r["scheduled_ns"] - arrival) / 1e9,
                    "gen_ai.latency.time_in_model_prefill": (r["first_ns"] - r["scheduled_ns"]) / 1e9,
                    "gen_ai.latency.time_in_model_decode": (r["last_ns"] - r["first_ns"]) / 1e9,
                    "gen_ai.latency.time_to_first_token": (r["first_ns"] - arrival) / 1e9,
                    "gen_ai.latency.e2e": (r["last_ns"] - arrival) / 1e9,
                    "gen_ai.usage.completion_tokens": r["tokens"],
                    "gen_ai.usage.prompt_tokens": 1,
                    "gen_ai.request.max_tokens": r["max_tokens"],
                }
                spans.append(Span(trace_id=bytes.fromhex(r["trace_id"]), span_id=bytes.fromhex(r["span_id"]),
                                  name="llm_request", kind=Span.SPAN_KIND_SERVER,
                                  start_time_unix_nano=arrival + offset_ns,
                                  end_time_unix_nano=r["finished_ns"] + offset_ns,
                                  attributes=[kv(k, v) for k, v in attrs.items()]))
            req = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[ResourceSpans(
                resource=resource, scope_spans=[ScopeSpans(scope=InstrumentationScope(name="vllm.llm_engine"),
                                                           spans=spans)])])
            try:
                stub.Export(req, timeout=30)
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                errors.append(f"export: {exc!r}"[:300])

    # ready: CUDA initialised, the model on the device (libcuda loaded: the sidecar can attach)
    with torch.no_grad():
        forward(B)
        if cuda:
            torch.cuda.synchronize()
    print(f"READY {os.getpid()}", flush=True)
    line = sys.stdin.readline().strip()
    if line != "GO":
        raise SystemExit(f"engine: expected GO, got {line!r}")
    before = time.monotonic_ns()
    offset_ns = time.time_ns() - (before + time.monotonic_ns()) // 2
    run_start_holder = [0]
    out_t = threading.Thread(target=output_thread, name="output")
    exp_t = threading.Thread(target=exporter, args=(offset_ns,), name="exporter")
    out_t.start()
    exp_t.start()
    run_start_holder[0] = time.monotonic_ns() + int(args.warmup_s * 1e9)

    def launch_all():
        with torch.no_grad():
            launcher(run_start_holder[0], args.warmup_steps)

    launch_t = threading.Thread(target=launch_all, name="launcher")
    launch_t.start()
    launch_t.join()
    out_t.join()
    exp_t.join()
    result = {
        "pid": os.getpid(), "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "launcher_tid": launch_t.native_id, "output_tid": out_t.native_id,
        "steps": steps, "errors": errors,
        "requests": [{k: r.get(k) for k in ("id", "max_tokens", "tokens", "prefill_step", "decode_steps",
                                            "arrival_off_ns", "scheduled_ns", "first_ns", "last_ns", "span_id")}
                     for r in reqs],
        "run_start_ns": run_start_holder[0],
    }
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------- driver
def start_sidecar(pid: int, port: int):
    """The real sidecar on the engine's pid, in this process; returns (sidecar, stop, thread, seen steps, joins)."""
    from otel_cuda import config as cfg
    from otel_cuda.bpf import Probes
    from otel_cuda.sidecar import start

    over = dict(pid=(pid,), no_archive=True, metrics_address="off", health_address="off",
                receiver_grpc=f"127.0.0.1:{port}", receiver_http="off", instance_key="host",
                discovery_interval=0.1, detach_grace=3600.0)
    ns = argparse.Namespace(**{o.name: None for o in cfg.OPTIONS})
    for k, v in over.items():
        setattr(ns, k, v)
    settings = cfg.resolve(ns, env={})
    probes = Probes(settings.bpf)
    sidecar = start(settings, probes, env={})
    tel = sidecar.telemetry
    seen: list[dict] = []
    joins: dict[str, dict] = {}
    on_step = tel.on_step

    def record_step(step):  # every step the tracker closed, with the rule that closed it
        seen.append({"pid": step.pid, "tid": step.tid, "start_ns": step.start_ns, "end_ns": step.end_ns,
                     "launches": step.launches, "closed_by": step.closed_by, "closed_tid": step.closed_tid})
        on_step(step)

    tel.on_step = record_step
    joiner = tel.joiner
    local = threading.local()
    match = joiner.match

    def capture_match(*a, **kw):
        m = match(*a, **kw)
        local.match = m
        return m

    joiner.match = capture_match
    on_request = joiner.on_request

    def capture_request(record):
        m = getattr(local, "match", None)
        local.match = None
        rec = {"outcome": record["outcome"], "complete": record["complete"], "incomplete": record["incomplete"],
               "cuda": record["cuda"]}
        if m is not None:
            rec["claimed"] = {p: [s.end_ns for s in v] for p, v in m.phases.items()}
            rec["shift_ns"] = m.delta
        joins[record["span_id"]] = rec
        on_request(record)

    joiner.on_request = capture_request
    stop = threading.Event()
    thread = threading.Thread(target=sidecar.run, args=(stop,), daemon=True, name="sidecar")
    thread.start()
    sidecar.pipeline.ready.wait(30)
    return sidecar, probes, stop, thread, seen, joins


def compare(truth: dict, seen: list[dict], joins: dict) -> dict:
    pid = truth["pid"]
    esteps = truth["steps"]
    e_ends = [s["end_ns"] for s in esteps]
    lo = esteps[0]["start_ns"] - MATCH_NS if esteps else 0
    hi = esteps[-1]["end_ns"] + MATCH_NS if esteps else 0
    window = sorted((s for s in seen if s["pid"] == pid and lo <= s["end_ns"] <= hi), key=lambda s: s["end_ns"])
    # pair engine and sidecar steps in order (both sorted by end): ends closer than MATCH_NS are the same step
    pairs: dict[int, int] = {}  # sidecar step end -> engine step index
    diffs = []
    i = j = 0
    while i < len(window) and j < len(esteps):
        s_end, e_end = window[i]["end_ns"], esteps[j]["end_ns"]
        if abs(e_end - s_end) < MATCH_NS:
            pairs[s_end] = esteps[j]["index"]
            diffs.append(e_end - s_end)
            i += 1
            j += 1
        elif s_end < e_end:
            i += 1
        else:
            j += 1
    matched = len(pairs)
    closed_by: dict[str, int] = {}
    for s in window:
        closed_by[s["closed_by"]] = closed_by.get(s["closed_by"], 0) + 1
    launchers = {s["tid"] for s in window}
    closers = {s["closed_tid"] for s in window}

    def engine_index(end_ns: int) -> int | None:
        return pairs.get(end_ns)

    # the same steps paired by position instead (valid when both saw the same number in the window): tells a
    # wrong claim from an engine stamp that came >= 0.5 ms after the sidecar's end (the output thread descheduled)
    by_order = ({s["end_ns"]: e["index"] for s, e in zip(window, esteps)} if len(window) == len(esteps) else None)
    late = ([e["index"] for s, e in zip(window, esteps) if abs(e["end_ns"] - s["end_ns"]) >= MATCH_NS]
            if by_order is not None else None)
    reqs = truth["requests"]
    exact = counts_ok = joined = exact_by_order = 0
    bad: list[dict] = []
    for r in reqs:
        j = joins.get(r.get("span_id") or "")
        if j is None:
            bad.append({"id": r["id"], "why": "no join"})
            continue
        joined += j["outcome"] == "joined"
        n = r["tokens"]
        cp = j["cuda"].get("prefill", {}).get("steps")
        cd = j["cuda"].get("decode", {}).get("steps")
        ok_counts = cp == 1 and cd == n - 1
        counts_ok += ok_counts
        claimed = j.get("claimed", {})
        got_p = [engine_index(e) for e in claimed.get("prefill", [])]
        got_d = [engine_index(e) for e in claimed.get("decode", [])]
        ok = ok_counts and got_p == [r["prefill_step"]] and got_d == r["decode_steps"]
        exact += ok
        if by_order is not None:
            exact_by_order += (ok_counts and [by_order.get(e) for e in claimed.get("prefill", [])] == [r["prefill_step"]]
                               and [by_order.get(e) for e in claimed.get("decode", [])] == r["decode_steps"])
        if not ok and len(bad) < 20:
            bad.append({"id": r["id"], "tokens": n, "outcome": j["outcome"], "prefill_steps": cp, "decode_steps": cd,
                        "engine_prefill": r["prefill_step"], "claimed_prefill": got_p,
                        "engine_decode": r["decode_steps"], "claimed_decode": got_d})
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] if xs else None  # noqa: E731
    return {
        "engine_steps": len(esteps),
        "sidecar_steps_in_window": len(window),
        "engine_steps_matched_lt_0.5ms": matched,
        "end_diff_us_engine_minus_sidecar": {"median": statistics.median(diffs) / 1e3 if diffs else None,
                                             "p99": q(diffs, 0.99) / 1e3 if diffs else None,
                                             "max_abs": max(map(abs, diffs)) / 1e3 if diffs else None},
        "sidecar_steps_closed_by": closed_by,
        "sidecar_launching_tids": sorted(launchers),
        "sidecar_closing_tids": sorted(closers),
        "engine_launcher_tid": truth.get("launcher_tid"), "engine_output_tid": truth.get("output_tid"),
        "requests": len(reqs),
        "requests_joined": joined,
        "requests_counts_ok": counts_ok,
        "requests_exact": exact,
        "engine_steps_paired_by_order_with_end_diff_ge_0.5ms": late,
        "requests_exact_pairing_by_order": exact_by_order if by_order is not None else None,
        "mismatches": bad,
    }


def driver_main(args) -> int:
    script = str(Path(__file__).resolve())
    cmd = [sys.executable, script, "--role", "engine", "--device", args.device,
           "--otlp", "" if args.no_sidecar else f"127.0.0.1:{args.port}"]
    for k in ("requests", "rate", "max_tokens", "max_batch", "hidden", "vocab", "layers", "gpu_sleep_us",
              "warmup_steps", "warmup_s", "seed"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.monotonic()
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    ready = child.stdout.readline().split()
    if not ready or ready[0] != "READY":
        child.kill()
        raise SystemExit(f"engine did not start: {ready}")
    pid = int(ready[1])
    result: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:], "engine_pid": pid}
    sidecar = None
    if not args.no_sidecar:
        sidecar, probes, stop, thread, seen, joins = start_sidecar(pid, args.port)
        deadline = time.monotonic() + 20
        while pid not in sidecar.telemetry.processes and time.monotonic() < deadline:
            time.sleep(0.05)
        result["attached_after_s"] = round(time.monotonic() - t0, 2)
        time.sleep(0.5)  # uprobes in place
    else:
        seen, joins = [], {}
    child.stdin.write("GO\n")
    child.stdin.flush()
    truth = None
    for line in child.stdout:
        if line.startswith("RESULT "):
            truth = json.loads(line[7:])
    rc = child.wait()
    result["engine_rc"] = rc
    if truth is None:
        result["error"] = "engine gave no result"
    if sidecar is not None:
        want = len(truth["requests"]) if truth else 0
        deadline = time.monotonic() + 30
        while len(joins) < want and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        thread.join(60)
        summary = sidecar.summary()
        probes.close()
        result["lost"] = {k: summary.get(k) for k in ("lost_ringbuf", "skipped_by_kernel", "kernel_table_full",
                                                       "decode_errors", "dropped_queue")}
        result["join_counters"] = summary.get("join")
        result["sidecar_steps_total"] = summary.get("steps")
        result["calls"] = {k: v for k, v in summary.get("calls", {}).items()
                           if k in ("cuLaunchKernel", "cuLaunchKernelEx", "cuEventSynchronize", "cuEventRecord",
                                    "cuMemcpyDtoHAsync_v2", "cuMemcpyHtoDAsync_v2", "cuMemcpyAsync",
                                    "cuStreamWaitEvent", "cuStreamSynchronize")}
    if truth:
        result["engine"] = {"device": truth["device"], "torch": truth["torch"], "errors": truth["errors"],
                            "steps": len(truth["steps"]),
                            "step_ms_median": statistics.median((s["end_ns"] - s["start_ns"]) / 1e6
                                                                for s in truth["steps"]) if truth["steps"] else None,
                            "batch_mean": statistics.mean(s["batch"] for s in truth["steps"]) if truth["steps"] else None,
                            "requests_finished": sum(r["tokens"] == r["max_tokens"] for r in truth["requests"])}
        if sidecar is not None:
            result.update(compare(truth, seen, joins))
        if args.truth_out:
            Path(args.truth_out).write_text(json.dumps({"truth": truth, "sidecar_steps": seen, "joins": joins}))
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if truth else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", choices=("driver", "engine"), default="driver")
    p.add_argument("--device", default="cuda")
    p.add_argument("--otlp", default="", help="engine: host:port of the OTLP/gRPC receiver ('' = none)")
    p.add_argument("--port", type=int, default=14317, help="driver: the sidecar's OTLP/gRPC receiver port")
    p.add_argument("--no-sidecar", action="store_true", help="driver: run the engine alone (logic check)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=60.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--gpu-sleep-us", type=float, default=1000.0, help="GPU spin per step (0: CPU-bound steps)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--warmup-s", type=float, default=0.3, help="arrivals start this long after GO")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="")
    p.add_argument("--truth-out", default="", help="driver: also write the raw truth, sidecar steps and joins")
    args = p.parse_args(argv)
    if args.role == "engine":
        engine_main(args)
        return 0
    return driver_main(args)


if __name__ == "__main__":
    sys.exit(main())
