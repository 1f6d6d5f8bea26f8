"""`otel-cuda loadgen`: drive an OpenAI-compatible server (vLLM, testbed/vllm_like.py) with traceable requests.

Every request carries a fresh sampled W3C `traceparent` (random trace and span ids) and an `X-Request-Id`, so
each one becomes its own trace whose root is the span id loadgen made up; `otel-cuda verify` later looks each
trace up by that id and checks that `llm_request` and its `cuda.prefill` / `cuda.decode` children arrived.

    otel-cuda loadgen --url http://127.0.0.1:8000 -n 200 --workers 8 --stream --out results.json

Results file (JSON): {"version": 1, "run_id", "url", "model", "api", "stream", "max_tokens", "n", "workers",
"started_ns", "finished_ns" (epoch ns), "summary": {count, ok, failed, wall_s, latency_p50_s, latency_p95_s,
ttft_p50_s, ttft_p95_s, completion_tokens, tokens_per_s}, "requests": [Result as a dict, in request order]}.
Only the standard library: urllib and threads.
"""
from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, TextIO

RESULTS_VERSION = 1
DEFAULT_PROMPTS = ("The quick brown fox jumps over the lazy dog.",)


@dataclass(frozen=True)
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first of GET /v1/models
    api: str = "completions"  # or "chat"
    stream: bool = False
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    n: int = 10
    workers: int = 1  # 1 = one request after another
    max_tokens: int = 16
    # vLLM's extension: generate exactly max_tokens, so every request has a decode phase to verify. Servers that
    # reject unknown fields need --no-ignore-eos.
    ignore_eos: bool = True
    timeout_s: float = 120.0
    progress_every_s: float = 5.0

    def __post_init__(self):
        if self.api not in ("completions", "chat"):
            raise ValueError(f"api must be completions or chat, not {self.api!r}")
        if self.n < 1 or self.workers < 1 or self.max_tokens < 1:
            raise ValueError("n, workers and max_tokens must be at least 1")
        if not self.prompts:
            raise ValueError("no prompts")


@dataclass(frozen=True)
class Result:
    index: int
    request_id: str  # the X-Request-Id sent (vLLM: gen_ai.request.id = cmpl-<it>-0 / chatcmpl-<it>)
    trace_id: str  # 32 hex: the trace of this request
    span_id: str  # 16 hex: the caller span, which llm_request must name as its parent
    status: int  # HTTP status; 0 when no response came
    ok: bool
    latency_s: float
    ttft_s: float | None  # streams only: until the first chunk carrying text
    prompt_tokens: int | None
    completion_tokens: int | None
    start_ns: int  # epoch ns
    end_ns: int
    response_id: str | None = None
    error: str | None = None


@dataclass
class _Progress:
    total: int
    done: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool):
        with self.lock:
            self.done += 1
            self.failed += 0 if ok else 1


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace_id, span_id): version 00, random non-zero ids, sampled."""
    trace_id = span_id = "0"
    while int(trace_id, 16) == 0:
        trace_id = secrets.token_hex(16)
    while int(span_id, 16) == 0:
        span_id = secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def first_model(url: str, timeout: float = 10.0, opener=urllib.request.urlopen) -> str:
    with opener(urllib.request.Request(url.rstrip("/") + "/v1/models"), timeout=timeout) as resp:
        data = json.load(resp).get("data") or []
    if not data:
        raise RuntimeError(f"{url}/v1/models lists no model")
    return data[0]["id"]


def _body(config: LoadConfig, model: str, prompt: str) -> dict:
    body: dict = {"model": model, "max_tokens": config.max_tokens}
    if config.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if config.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if config.ignore_eos:
        body["ignore_eos"] = True
    return body


def _piece(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def one_request(config: LoadConfig, model: str, index: int, run_id: str, opener=urllib.request.urlopen) -> Result:
    """Sends request `index` and measures it; never raises (a failure is a Result with ok=False)."""
    traceparent, trace_id, span_id = new_traceparent()
    request_id = f"{run_id}-{index:06d}"
    prompt = config.prompts[index % len(config.prompts)]
    path = "/v1/chat/completions" if config.api == "chat" else "/v1/completions"
    req = urllib.request.Request(
        config.url.rstrip("/") + path, data=json.dumps(_body(config, model, prompt)).encode(), method="POST",
        headers={"Content-Type": "application/json", "traceparent": traceparent, "X-Request-Id": request_id})
    start_ns, t0 = time.time_ns(), time.monotonic()
    status, ttft, usage, response_id, error, pieces = 0, None, {}, None, None, 0
    chat = config.api == "chat"
    try:
        with opener(req, timeout=config.timeout_s) as resp:
            status = resp.status
            if config.stream:
                for raw in resp:  # server-sent events: "data: {json}" lines, ending with "data: [DONE]"
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = str(chunk["error"])
                        break
                    response_id = response_id or chunk.get("id")
                    usage = chunk.get("usage") or usage
                    if _piece(chunk, chat):
                        pieces += 1
                        if ttft is None:
                            ttft = time.monotonic() - t0
            else:
                body = json.load(resp)
                response_id, usage = body.get("id"), body.get("usage") or {}
    except urllib.error.HTTPError as e:
        status = e.code
        error = e.read(500).decode("utf-8", "replace") or e.reason
    except (OSError, ValueError) as e:  # connection refused/reset, timeout, bad JSON
        error = f"{type(e).__name__}: {e}"
    latency = time.monotonic() - t0
    completion = usage.get("completion_tokens")
    if completion is None and config.stream and status == 200:
        completion = pieces
    return Result(index=index, request_id=request_id, trace_id=trace_id, span_id=span_id, status=status,
                  ok=status == 200 and error is None, latency_s=latency, ttft_s=ttft,
                  prompt_tokens=usage.get("prompt_tokens"), completion_tokens=completion, start_ns=start_ns,
                  end_ns=time.time_ns(), response_id=response_id, error=error)


def run_load(config: LoadConfig, *, opener=urllib.request.urlopen, progress: TextIO | None = None,
             run_id: str | None = None) -> list[Result]:
    """Sends config.n requests, config.workers at a time; returns the results in request order."""
    model = config.model or first_model(config.url, opener=opener)
    run_id = run_id or f"lg-{secrets.token_hex(4)}"
    state = _Progress(config.n)
    stop = threading.Event()
    t0 = time.monotonic()

    def report():  # a line every few seconds on long runs, so a stuck server shows
        while not stop.wait(config.progress_every_s):
            with state.lock:
                done, failed = state.done, state.failed
            rate = done / max(time.monotonic() - t0, 1e-9)
            print(f"loadgen: {done}/{state.total} done, {failed} failed, {rate:.1f} req/s", file=progress, flush=True)

    if progress is not None:
        threading.Thread(target=report, name="loadgen-progress", daemon=True).start()

    def task(i: int) -> Result:
        r = one_request(config, model, i, run_id, opener)
        state.add(r.ok)
        return r

    try:
        if config.workers == 1:
            results = [task(i) for i in range(config.n)]
        else:
            with ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="loadgen") as pool:
                results = list(pool.map(task, range(config.n)))
    finally:
        stop.set()
    return results


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def summarize(results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    return {"count": len(results), "ok": len(ok), "failed": len(results) - len(ok), "wall_s": wall_s,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "completion_tokens": tokens, "tokens_per_s": tokens / wall_s if wall_s > 0 else None}


def render_summary(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1e3:.1f} ms"
    rows = [("requests", f"{s['count']} ({s['ok']} ok, {s['failed']} failed)"),
            ("latency p50 / p95", f"{ms(s['latency_p50_s'])} / {ms(s['latency_p95_s'])}"),
            ("ttft p50 / p95", f"{ms(s['ttft_p50_s'])} / {ms(s['ttft_p95_s'])}"),
            ("tokens", f"{s['completion_tokens']} in {s['wall_s']:.2f} s"
                       + (f" ({s['tokens_per_s']:.1f} tokens/s)" if s["tokens_per_s"] is not None else ""))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def results_document(config: LoadConfig, model: str, results: list[Result], started_ns: int, finished_ns: int,
                     run_id: str) -> dict:
    return {"version": RESULTS_VERSION, "run_id": run_id, "url": config.url, "model": model, "api": config.api,
            "stream": config.stream, "max_tokens": config.max_tokens, "n": config.n, "workers": config.workers,
            "started_ns": started_ns, "finished_ns": finished_ns,
            "summary": summarize(results, (finished_ns - started_ns) / 1e9),
            "requests": [asdict(r) for r in results]}


def read_prompts(path: str) -> tuple[str, ...]:
    """One prompt per line (blank lines skipped), or a JSON list of strings."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        prompts = tuple(str(p) for p in json.loads(text))
    else:
        prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise ValueError(f"{path} holds no prompt")
    return prompts


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    prompts = read_prompts(args.prompts) if args.prompts else ((args.prompt,) if args.prompt else DEFAULT_PROMPTS)
    return LoadConfig(url=args.url, model=args.model, api=args.api, stream=args.stream, prompts=prompts, n=args.n,
                      workers=args.workers, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                      timeout_s=args.timeout)


def cmd_loadgen(args: argparse.Namespace, *, opener: Callable = urllib.request.urlopen) -> int:
    from .cli import UsageError  # noqa: PLC0415 (cli imports this module)

    try:
        config = config_from_args(args)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    try:
        model = config.model or first_model(config.url, opener=opener)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UsageError(f"cannot list models at {config.url}/v1/models: {e} — is the server up? (or pass --model)"
                         ) from None
    run_id = f"lg-{secrets.token_hex(4)}"
    print(f"loadgen: {config.n} {config.api}{' stream' if config.stream else ''} requests to {config.url} "
          f"(model {model}, {config.workers} worker(s), run {run_id})", file=sys.stderr)
    started = time.time_ns()
    results = run_load(LoadConfig(**{**asdict(config), "model": model}), opener=opener, progress=sys.stderr,
                       run_id=run_id)
    finished = time.time_ns()
    doc = results_document(config, model, results, started, finished, run_id)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    print(render_summary(doc["summary"]))
    for r in [r for r in results if not r.ok][:5]:
        print(f"loadgen: request {r.request_id} failed: HTTP {r.status} {r.error or ''}".rstrip(), file=sys.stderr)
    if args.out:
        print(f"loadgen: results in {args.out}", file=sys.stderr)
    return 0 if doc["summary"]["ok"] == len(results) else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("loadgen", help="send traceable requests to an OpenAI-compatible server",
                              description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    p.add_argument("--stream", action="store_true", help="stream the responses (server-sent events); measures TTFT")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="the prompt of every request")
    g.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one per line (or a JSON list), cycled")
    p.add_argument("-n", type=int, default=10, help="number of requests (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="requests in flight at once; 1 = sequential")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask vLLM to generate exactly --max-tokens (default on)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--out", default=None, metavar="RESULTS.json", help="write per-request results here")
    p.set_defaults(func=cmd_loadgen)
