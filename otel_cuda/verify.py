"""`otel-cuda verify`: check that every request of a loadgen run became a complete trace, and that the run was archived.

    otel-cuda verify results.json --jaeger http://127.0.0.1:16686 [--archive DIR|s3://bucket/prefix] [--timeout 60]
    otel-cuda verify results.json --otlp-json spans.jsonl

For each request in the results (by the trace id loadgen made): the trace holds an `llm_request` span (of
--service, when given) whose parent is loadgen's span, with `cuda.prefill` and `cuda.decode` children (parent
span id = the llm_request's span id). `cuda.decode` is expected only when the request produced 2+ tokens (with
one token there is no decode phase). Spans come from Jaeger's HTTP query API — v1 `/api/traces/{id}` (Jaeger
1.x and the UI API of 2.x) or v2's `/api/v3/traces/{id}` (OTLP/JSON) — or from an OTLP/JSON-lines file such as
the Collector's file exporter or `otel_cuda.otlp_sink` writes. With --archive: the archive holds files (directory:
*.jsonl.gz with events whose `ts` falls in the run; s3: objects under the prefix written during or after the run).

Late spans are normal (batch processors, the sidecar's join, Jaeger's indexing): incomplete requests are looked up
again until --timeout. Prints one line per incomplete request (request id, trace id, what is missing) and exits 1
if any; 0 when all are complete. Requests that failed at load time have no trace to check and are skipped (listed).
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

ARCHIVE_SLACK_NS = 2_000_000_000  # clocks and file rotation: an event a little outside the run still counts


# --- spans, normalised ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 lowercase hex
    span_id: str  # 16 lowercase hex
    parent_span_id: str  # "" for a root
    name: str
    service: str | None
    attributes: dict = field(default_factory=dict, hash=False, compare=False)


def _hex_id(value: str | None, width: int) -> str:
    """An id as lowercase hex of `width` chars: from hex (Jaeger v1, OTLP/JSON) or base64 (protobuf JSON)."""
    if not value:
        return ""
    if re.fullmatch(r"[0-9a-fA-F]+", value) and len(value) <= width:
        return value.lower().zfill(width)  # Jaeger v1 may drop leading zeros
    try:
        return base64.b64decode(value, validate=True).hex().zfill(width)
    except ValueError:
        return value.lower()


def _any_value(v: dict) -> Any:
    """An OTLP/JSON AnyValue as a Python value."""
    if not isinstance(v, dict) or not v:
        return None
    kind, val = next(iter(v.items()))
    if kind == "intValue":
        return int(val)
    if kind == "arrayValue":
        return [_any_value(x) for x in (val or {}).get("values", [])]
    if kind == "kvlistValue":
        return {kv["key"]: _any_value(kv.get("value", {})) for kv in (val or {}).get("values", [])}
    return val


def spans_from_otlp_json(doc: dict) -> list[Span]:
    """Spans of an OTLP/JSON TracesData (`resourceSpans`, or snake_case), as Jaeger v2's api_v3 returns it."""
    out = []
    for rs in doc.get("resourceSpans") or doc.get("resource_spans") or []:
        res = {kv["key"]: _any_value(kv.get("value", {})) for kv in (rs.get("resource") or {}).get("attributes", [])}
        for ss in rs.get("scopeSpans") or rs.get("scope_spans") or []:
            for s in ss.get("spans", []):
                out.append(Span(
                    trace_id=_hex_id(s.get("traceId") or s.get("trace_id"), 32),
                    span_id=_hex_id(s.get("spanId") or s.get("span_id"), 16),
                    parent_span_id=_hex_id(s.get("parentSpanId") or s.get("parent_span_id"), 16),
                    name=s.get("name", ""), service=res.get("service.name"),
                    attributes={kv["key"]: _any_value(kv.get("value", {})) for kv in s.get("attributes", [])}))
    return out


def spans_from_jaeger_v1(doc: dict) -> list[Span]:
    """Spans of a Jaeger v1 `/api/traces/{id}` answer ({"data": [{"spans", "processes"}]})."""
    out = []
    for trace in doc.get("data") or []:
        processes = trace.get("processes") or {}
        for s in trace.get("spans", []):
            trace_id = _hex_id(s.get("traceID"), 32)
            parent = next((r.get("spanID") for r in s.get("references") or []
                           if r.get("refType") == "CHILD_OF" and _hex_id(r.get("traceID"), 32) == trace_id), "")
            out.append(Span(
                trace_id=trace_id, span_id=_hex_id(s.get("spanID"), 16),
                parent_span_id=_hex_id(parent, 16), name=s.get("operationName", ""),
                service=(processes.get(s.get("processID")) or {}).get("serviceName"),
                attributes={t["key"]: t.get("value") for t in s.get("tags") or []}))
    return out


def spans_from_flat(dicts: Iterable[dict]) -> list[Span]:
    """Spans from otlp_sink's flat dicts (read_otlp_json)."""
    return [Span(trace_id=d["trace_id"], span_id=d["span_id"], parent_span_id=d.get("parent_span_id") or "",
                 name=d["name"], service=(d.get("resource") or {}).get("service.name"),
                 attributes=d.get("attributes") or {}) for d in dicts]


# --- where the spans come from --------------------------------------------------------------------------------------

class JaegerSource:
    """Looks traces up one by one in Jaeger's query service. `api`: "v1", "v3" or "auto" (ask /api/v3/services)."""

    def __init__(self, base_url: str, api: str = "auto", opener: Callable = urllib.request.urlopen,
                 timeout: float = 10):
        self.base = base_url.rstrip("/")
        self.api, self.opener, self.timeout = api, opener, timeout

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with self.opener(urllib.request.Request(self.base + path, headers={"Accept": "application/json"}),
                             timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _detect(self) -> str:
        try:
            status, body = self._get("/api/v3/services")
            if status == 200 and "services" in json.loads(body or b"{}"):
                return "v3"
        except (OSError, ValueError):
            pass
        return "v1"

    def fetch(self, trace_ids: Iterable[str]) -> dict[str, list[Span]]:
        if self.api == "auto":
            self.api = self._detect()
        out = {}
        for tid in trace_ids:
            path = f"/api/v3/traces/{tid}" if self.api == "v3" else f"/api/traces/{tid}"
            try:
                status, body = self._get(path)
            except OSError as e:
                raise SourceError(f"cannot reach Jaeger at {self.base}: {e}") from e
            if status == 404:
                out[tid] = []
                continue
            if status != 200:
                raise SourceError(f"Jaeger answered HTTP {status} for {path}: {body[:200]!r}")
            out[tid] = self.parse(body)
        return out

    def parse(self, body: bytes) -> list[Span]:
        if self.api == "v1":
            return spans_from_jaeger_v1(json.loads(body))
        # api_v3 is a gRPC stream behind grpc-gateway: one or more {"result": TracesData} objects, one per line.
        spans = []
        for part in _json_objects(body.decode("utf-8")):
            spans.extend(spans_from_otlp_json(part.get("result", part)))
        return spans


class OtlpJsonSource:
    """Re-reads an OTLP/JSON-lines file on every round (it may still be growing)."""

    def __init__(self, path: str):
        self.path = path

    def fetch(self, trace_ids: Iterable[str]) -> dict[str, list[Span]]:
        from .otlp_sink import read_otlp_json  # noqa: PLC0415

        wanted = set(trace_ids)
        try:
            flat = read_otlp_json(self.path)
        except FileNotFoundError:
            flat = []
        except OSError as e:
            raise SourceError(f"cannot read {self.path}: {e}") from e
        out: dict[str, list[Span]] = {t: [] for t in wanted}
        for s in spans_from_flat(d for d in flat if d["trace_id"] in wanted):
            out[s.trace_id].append(s)
        return out


class SourceError(RuntimeError):
    pass


def _json_objects(text: str) -> Iterable[dict]:
    dec, i = json.JSONDecoder(), 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        obj, i = dec.raw_decode(text, i)
        if isinstance(obj, dict):
            yield obj


# --- the checks ---------------------------------------------------------------------------------------------------

def check_trace(request: dict, spans: list[Span], service: str | None = None) -> list[str]:
    """What is missing from one request's trace (empty: complete)."""
    if not spans:
        return ["no spans in the trace"]
    llm = [s for s in spans if s.name == "llm_request" and (service is None or s.service == service)]
    if not llm:
        others = sorted({s.name for s in spans})
        where = f" of service {service!r}" if service else ""
        return [f"no llm_request span{where} (trace has: {', '.join(others)})"]
    problems = []
    parented = [s for s in llm if s.parent_span_id == request["span_id"]]
    if not parented:
        problems.append(f"llm_request's parent is {llm[0].parent_span_id or 'none'}, not loadgen's span "
                        f"{request['span_id']}")
        parented = llm
    want = ["cuda.prefill"]
    if request.get("completion_tokens") is None or request["completion_tokens"] > 1:
        want.append("cuda.decode")
    for name in want:
        if not any(s.name == name and s.parent_span_id == r.span_id for r in parented for s in spans):
            problems.append(f"no {name} child of llm_request {parented[0].span_id}")
    return problems


def check_archive(dest: str, started_ns: int, finished_ns: int, s3_client=None) -> tuple[bool, str]:
    """(ok, what was found) for the run's archive: a directory or s3://bucket/prefix."""
    lo, hi = started_ns - ARCHIVE_SLACK_NS, finished_ns + ARCHIVE_SLACK_NS
    if dest.startswith("s3://"):
        return _check_s3(dest, lo, hi, s3_client)
    return _check_dir(dest, lo, hi)


def _name_start_ns(name: str) -> int | None:
    m = re.match(r"(\d{13})-", name.rsplit("/", 1)[-1])  # <start_ms>-<pid>-<run>-<seq>.jsonl.gz
    return int(m.group(1)) * 1_000_000 if m else None


def _check_dir(path: str, lo: int, hi: int) -> tuple[bool, str]:
    from .archive_read import iter_records, local_files  # noqa: PLC0415

    import os  # noqa: PLC0415
    if not os.path.isdir(path):
        return False, f"archive directory {path} does not exist"
    files = [f for f in local_files(path) if f.endswith(".jsonl.gz")]
    candidates = [f for f in files if (_name_start_ns(f) or 0) <= hi]
    hits = 0
    for f in candidates:
        for rec in iter_records(f, on_error=lambda *_: None):
            if isinstance(rec.get("ts"), int) and lo <= rec["ts"] <= hi:
                hits += 1
                break  # one event in the run's span is enough for this file
    if not hits:
        return False, f"no *.jsonl.gz under {path} holds an event from the run ({len(files)} archive files in all)"
    return True, f"{hits} of {len(files)} archive files under {path} hold events from the run"


def _check_s3(url: str, lo: int, hi: int, s3_client) -> tuple[bool, str]:
    from .archive_read import is_archive_name, split_s3_url  # noqa: PLC0415

    bucket, prefix = split_s3_url(url)
    if s3_client is None:
        import boto3  # noqa: PLC0415
        s3_client = boto3.client("s3")
    total = fresh = 0
    try:
        list_prefix = f"{prefix}/" if prefix else ""
        pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=list_prefix)
        for page in pages:
            for o in page.get("Contents", ()):
                if not is_archive_name(o["Key"].rsplit("/", 1)[-1]):
                    continue
                total += 1
                start = _name_start_ns(o["Key"])
                modified = int(o["LastModified"].timestamp() * 1e9)
                # Written during or after the run (uploads lag rotation), and opened before it ended.
                if modified >= lo and (start is None or start <= hi):
                    fresh += 1
    except Exception as e:  # botocore's errors, credentials, endpoint: one line, not a traceback
        return False, f"cannot list {url}: {e}"
    if not fresh:
        return False, f"no archive object under {url} from the run ({total} archive objects in all)"
    return True, f"{fresh} of {total} archive objects under {url} are from the run"


@dataclass
class Outcome:
    checked: int = 0
    complete: int = 0
    skipped: list = field(default_factory=list)  # requests that failed at load time
    missing: dict = field(default_factory=dict)  # trace_id → (request, [problems])
    archive: tuple[bool, str] | None = None

    @property
    def ok(self) -> bool:
        return not self.missing and (self.archive is None or self.archive[0])


def verify(results: dict, source, *, service: str | None = None, timeout_s: float = 60.0, interval_s: float = 2.0,
           archive: str | None = None, s3_client=None, sleep=time.sleep, clock=time.monotonic,
           log: Callable[[str], None] = lambda _m: None) -> Outcome:
    """Checks every ok request of a loadgen results document, retrying incomplete ones until timeout_s."""
    out = Outcome()
    pending = {}
    for r in results.get("requests", []):
        if r.get("ok", True):
            pending[r["trace_id"]] = r
        else:
            out.skipped.append(r)
    out.checked = len(pending)
    deadline = clock() + timeout_s
    while True:
        traces = source.fetch(list(pending))
        for tid, req in list(pending.items()):
            problems = check_trace(req, traces.get(tid, []), service)
            if problems:
                out.missing[tid] = (req, problems)
            else:
                out.missing.pop(tid, None)
                pending.pop(tid)
                out.complete += 1
        if archive and (out.archive is None or not out.archive[0]):
            out.archive = check_archive(archive, results["started_ns"], results["finished_ns"], s3_client)
        if out.ok or clock() >= deadline:
            return out
        log(f"verify: {len(pending)} of {out.checked} traces incomplete"
            + ("" if out.archive is None or out.archive[0] else ", archive not found yet") + "; looking again")
        sleep(min(interval_s, max(0.0, deadline - clock())))


def render(out: Outcome) -> list[str]:
    lines = []
    for tid, (req, problems) in out.missing.items():
        lines.append(f"MISSING request {req.get('request_id')} trace {tid}: {'; '.join(problems)}")
    for req in out.skipped:
        lines.append(f"skipped request {req.get('request_id')} trace {req.get('trace_id')}: failed at load time "
                     f"(HTTP {req.get('status')})")
    if out.archive is not None:
        lines.append(("archive: " if out.archive[0] else "MISSING archive: ") + out.archive[1])
    lines.append(f"verify: {out.complete}/{out.checked} traces complete"
                 + (f", {len(out.skipped)} failed requests skipped" if out.skipped else "")
                 + ("" if out.ok else " — FAILED"))
    return lines


def cmd_verify(args: argparse.Namespace, *, opener: Callable = urllib.request.urlopen, s3_client=None) -> int:
    from .cli import UsageError  # noqa: PLC0415 (cli imports this module)

    try:
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)
        results["requests"]  # noqa: B018  (a loadgen results file has them)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot read loadgen results {args.results}: {e}") from None
    if args.jaeger:
        source = JaegerSource(args.jaeger, api=args.jaeger_api, opener=opener)
    else:
        source = OtlpJsonSource(args.otlp_json)
    if args.archive and args.archive.startswith("s3://") and s3_client is None:
        import boto3  # noqa: PLC0415
        s3_client = boto3.client("s3", endpoint_url=args.endpoint_url)
    try:
        out = verify(results, source, service=args.service, timeout_s=args.timeout, interval_s=args.interval,
                     archive=args.archive, s3_client=s3_client, log=lambda m: print(m, file=sys.stderr))
    except SourceError as e:
        raise UsageError(str(e)) from None
    for line in render(out):
        print(line)
    return 0 if out.ok else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check that a loadgen run's traces (and archive) are complete",
                              description=__doc__.splitlines()[0])
    p.add_argument("results", metavar="RESULTS.json", help="the file `otel-cuda loadgen --out` wrote")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--jaeger", metavar="URL", help="Jaeger query service, e.g. http://127.0.0.1:16686")
    src.add_argument("--otlp-json", metavar="FILE", help="OTLP/JSON lines (Collector file exporter, otlp_sink)")
    p.add_argument("--jaeger-api", choices=("auto", "v1", "v3"), default="auto",
                   help="v1 = /api/traces (Jaeger 1.x, 2.x UI API), v3 = /api/v3/traces (Jaeger 2.x); auto asks")
    p.add_argument("--archive", metavar="DIR|s3://BUCKET/PREFIX", default=None,
                   help="also check that the run was archived there")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// archive")
    p.add_argument("--service", default=None, help="only an llm_request of this service.name counts (e.g. vllm)")
    p.add_argument("--timeout", type=float, default=60.0, help="keep looking for late spans this long (s)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between looks")
    p.set_defaults(func=cmd_verify)
