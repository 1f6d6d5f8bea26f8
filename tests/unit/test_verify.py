"""otel-cuda verify against Jaeger's query API (v1 and v3 shapes, over real HTTP), OTLP/JSON files and archives."""
from __future__ import annotations

import base64
import datetime
import gzip
import json
import secrets
import threading
from http.server import ThreadingHTTPServer

import pytest

from support.http_json import JsonHandler
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from otel_cuda import cli
from otel_cuda.receiver import to_otlp_json
from otel_cuda.verify import JaegerSource, Span, check_archive, check_trace, verify

T0 = 1_795_000_000_000_000_000  # epoch ns of the fake run


def make_run(n=3, tokens=4):
    reqs = [{"index": i, "request_id": f"lg-test-{i:06d}", "trace_id": secrets.token_hex(16),
             "span_id": secrets.token_hex(8), "status": 200, "ok": True, "completion_tokens": tokens}
            for i in range(n)]
    return {"version": 1, "started_ns": T0, "finished_ns": T0 + 10**9, "requests": reqs}


def trace_for(req, *, drop=(), service="vllm", parent=None):
    """The spans a complete join produces for one request (names in `drop` left out)."""
    llm = secrets.token_hex(8)
    spans = [Span(req["trace_id"], llm, parent if parent is not None else req["span_id"], "llm_request", service,
                  {"gen_ai.request.id": f"cmpl-{req['request_id']}-0"}),
             Span(req["trace_id"], secrets.token_hex(8), llm, "cuda.prefill", service, {"cuda.steps": 1}),
             Span(req["trace_id"], secrets.token_hex(8), llm, "cuda.decode", service, {"cuda.steps": 3})]
    return [s for s in spans if s.name not in drop]


# --- the three shapes ------------------------------------------------------------------------------------------

def jaeger_v1(spans):
    procs, out = {}, []
    for s in spans:
        pid = procs.setdefault(s.service, f"p{len(procs) + 1}")
        refs = [{"refType": "CHILD_OF", "traceID": s.trace_id, "spanID": s.parent_span_id}] if s.parent_span_id else []
        out.append({"traceID": s.trace_id, "spanID": s.span_id, "operationName": s.name, "references": refs,
                    "startTime": T0 // 1000, "duration": 1000, "processID": pid,
                    "tags": [{"key": k, "type": "string", "value": v} for k, v in s.attributes.items()]})
    return {"data": [{"traceID": spans[0].trace_id, "spans": out,
                      "processes": {p: {"serviceName": svc, "tags": []} for svc, p in procs.items()}}],
            "total": 0, "limit": 0, "offset": 0, "errors": None}


def to_proto(spans) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    by_service = {}
    for s in spans:
        by_service.setdefault(s.service, []).append(s)
    for service, group in by_service.items():
        rs = req.resource_spans.add()
        rs.resource.attributes.append(common_pb2.KeyValue(key="service.name",
                                                          value=common_pb2.AnyValue(string_value=service)))
        ss = rs.scope_spans.add()
        for s in group:
            ss.spans.append(trace_pb2.Span(
                trace_id=bytes.fromhex(s.trace_id), span_id=bytes.fromhex(s.span_id),
                parent_span_id=bytes.fromhex(s.parent_span_id) if s.parent_span_id else b"", name=s.name,
                start_time_unix_nano=T0, end_time_unix_nano=T0 + 1000,
                attributes=[common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(int_value=v)) if isinstance(v, int)
                            else common_pb2.KeyValue(key=k, value=common_pb2.AnyValue(string_value=v))
                            for k, v in s.attributes.items()]))
    return req


def jaeger_v3(spans, base64_ids=False):
    """Jaeger v2's api_v3 answer: grpc-gateway's {"result": TracesData}, ids as hex (OTLP/JSON), or as base64 (plain
    protobuf JSON, which some gateways write)."""
    doc = json.loads(to_otlp_json(to_proto(spans)))
    if base64_ids:
        for rs in doc["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if s.get(key):
                            s[key] = base64.b64encode(bytes.fromhex(s[key])).decode()
    return {"result": doc}


class FakeJaeger:
    """Serves stored traces in the v1 or the v3 shape, as Jaeger's query service does; 404 for unknown ids."""

    def __init__(self, api: str):
        self.api = api
        self.traces: dict[str, list[Span]] = {}
        self.hits = 0
        self.base64_ids = False
        fake = self

        class H(JsonHandler):
            protocol_version = "HTTP/1.0"  # one request a connection, as this fake always answered

            def do_GET(self):
                fake.hits += 1
                if fake.api == "v3":
                    if self.path == "/api/v3/services":
                        return self._json(200, {"services": ["vllm"]})
                    if self.path.startswith("/api/v3/traces/"):
                        spans = fake.traces.get(self.path.rsplit("/", 1)[-1])
                        if spans:
                            return self._json(200, jaeger_v3(spans, base64_ids=fake.base64_ids))
                        return self._json(404, {"error": {"httpCode": 404, "message": "trace not found"}})
                else:
                    if self.path == "/api/services":
                        return self._json(200, {"data": ["vllm"], "total": 1})
                    if self.path.startswith("/api/traces/"):
                        spans = fake.traces.get(self.path.rsplit("/", 1)[-1])
                        if spans:
                            return self._json(200, jaeger_v1(spans))
                        return self._json(404, {"data": None, "errors": [{"code": 404, "msg": "trace not found"}]})
                self._json(404, {"error": "no route"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["v1", "v3"])
def jaeger(request):
    j = FakeJaeger(request.param)
    yield j
    j.close()


def write_results(tmp_path, run):
    p = tmp_path / "results.json"
    p.write_text(json.dumps(run))
    return str(p)


# --- Jaeger ----------------------------------------------------------------------------------------------------------

def test_jaeger_complete_run_passes(jaeger, tmp_path, capsys):
    run = make_run()
    for r in run["requests"]:
        jaeger.traces[r["trace_id"]] = trace_for(r)
    rc = cli.main(["verify", write_results(tmp_path, run), "--jaeger", jaeger.url, "--timeout", "0",
                   "--service", "vllm"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "3/3 traces complete" in out and "MISSING" not in out


def test_jaeger_missing_trace_names_the_request(jaeger, tmp_path, capsys):
    run = make_run()
    for r in run["requests"][:2]:
        jaeger.traces[r["trace_id"]] = trace_for(r)
    gone = run["requests"][2]
    rc = cli.main(["verify", write_results(tmp_path, run), "--jaeger", jaeger.url, "--timeout", "0.5",
                   "--interval", "0.1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"MISSING request {gone['request_id']} trace {gone['trace_id']}: no spans in the trace" in out
    assert "2/3 traces complete" in out
    assert sum(1 for line in out.splitlines() if line.startswith("MISSING")) == 1


def test_jaeger_api_is_detected(jaeger):
    run = make_run(n=1)
    jaeger.traces[run["requests"][0]["trace_id"]] = trace_for(run["requests"][0])
    src = JaegerSource(jaeger.url)
    spans = src.fetch([run["requests"][0]["trace_id"]])[run["requests"][0]["trace_id"]]
    assert src.api == jaeger.api
    assert {s.name for s in spans} == {"llm_request", "cuda.prefill", "cuda.decode"}
    llm = next(s for s in spans if s.name == "llm_request")
    assert llm.parent_span_id == run["requests"][0]["span_id"] and llm.service == "vllm"
    assert llm.attributes["gen_ai.request.id"] == f"cmpl-{run['requests'][0]['request_id']}-0"


def test_v3_base64_ids_are_read_too():
    j = FakeJaeger("v3")
    j.base64_ids = True
    try:
        req = make_run(n=1)["requests"][0]
        j.traces[req["trace_id"]] = trace_for(req)
        spans = JaegerSource(j.url, api="v3").fetch([req["trace_id"]])[req["trace_id"]]
        assert check_trace(req, spans) == []
    finally:
        j.close()


def test_late_spans_are_waited_for(jaeger):
    run = make_run(n=2)
    first, late = run["requests"]
    jaeger.traces[first["trace_id"]] = trace_for(first)
    calls = []

    def sleep(s):  # the sidecar's join lands between two looks
        calls.append(s)
        jaeger.traces[late["trace_id"]] = trace_for(late)
    out = verify(run, JaegerSource(jaeger.url), timeout_s=30, interval_s=0.01, sleep=sleep)
    assert out.ok and out.complete == 2 and len(calls) == 1


# --- what counts as complete ---------------------------------------------------------------------------------------

def test_check_trace_names_each_gap():
    req = make_run(n=1)["requests"][0]
    assert check_trace(req, trace_for(req)) == []
    assert check_trace(req, []) == ["no spans in the trace"]
    assert check_trace(req, trace_for(req, drop=("cuda.decode",)))[0].startswith("no cuda.decode child of llm_request")
    assert check_trace(req, trace_for(req, drop=("cuda.prefill",)))[0].startswith("no cuda.prefill child")
    assert "no llm_request span" in check_trace(req, trace_for(req, drop=("llm_request",)))[0]
    wrong = check_trace(req, trace_for(req, parent="ab" * 8))
    assert wrong == [f"llm_request's parent is {'ab' * 8}, not loadgen's span {req['span_id']}"]
    assert "of service 'vllm'" in check_trace(req, trace_for(req, service="other"), service="vllm")[0]
    # children of another span do not count
    spans = trace_for(req)
    stray = [Span(s.trace_id, s.span_id, "cd" * 8, s.name, s.service) if s.name == "cuda.decode" else s for s in spans]
    assert check_trace(req, stray)[0].startswith("no cuda.decode child")
    # one generated token: there is no decode phase to join
    one = {**req, "completion_tokens": 1}
    assert check_trace(one, trace_for(one, drop=("cuda.decode",))) == []


def test_failed_requests_are_skipped_and_listed(jaeger, tmp_path, capsys):
    run = make_run(n=2)
    run["requests"][1].update(ok=False, status=500)
    jaeger.traces[run["requests"][0]["trace_id"]] = trace_for(run["requests"][0])
    rc = cli.main(["verify", write_results(tmp_path, run), "--jaeger", jaeger.url, "--timeout", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"skipped request {run['requests'][1]['request_id']}" in out and "1/1 traces complete" in out


# --- OTLP/JSON file ---------------------------------------------------------------------------------------------------

def test_otlp_json_file(tmp_path, capsys):
    run = make_run()
    path = tmp_path / "spans.jsonl"
    with open(path, "w") as f:
        for r in run["requests"]:
            # spans of one trace split over two export requests, as batch processors do
            spans = trace_for(r)
            f.write(to_otlp_json(to_proto(spans[:1])) + "\n")
            f.write(to_otlp_json(to_proto(spans[1:])) + "\n")
    results = write_results(tmp_path, run)
    assert cli.main(["verify", results, "--otlp-json", str(path), "--timeout", "0"]) == 0
    assert "3/3 traces complete" in capsys.readouterr().out

    # the same file without one trace
    gone = run["requests"][1]
    lines = [ln for ln in path.read_text().splitlines() if gone["trace_id"] not in ln]  # OTLP/JSON ids are hex
    path.write_text("\n".join(lines) + "\n")
    assert cli.main(["verify", results, "--otlp-json", str(path), "--timeout", "0"]) == 1
    out = capsys.readouterr().out
    assert f"MISSING request {gone['request_id']} trace {gone['trace_id']}" in out
    assert "2/3 traces complete" in out


def test_bad_results_file_is_a_usage_error(tmp_path, capsys):
    p = tmp_path / "r.json"
    p.write_text("{}")
    assert cli.main(["verify", str(p), "--otlp-json", str(tmp_path / "x.jsonl")]) == 2
    assert "cannot read loadgen results" in capsys.readouterr().err


# --- archive ---------------------------------------------------------------------------------------------------------

def write_archive(root, name, records):
    path = root / "node=n1/namespace=_/pod=_/date=2026-11-17/hour=10" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def test_archive_directory(tmp_path, capsys):
    run = make_run(n=1)
    arch = tmp_path / "archive"
    write_archive(arch, f"{(T0 - 3600 * 10**9) // 10**6:013d}-1-old-000000.jsonl.gz",
                  [{"v": 1, "type": "cuda_api", "ts": T0 - 3600 * 10**9, "func": "cuInit"}])
    ok, msg = check_archive(str(arch), run["started_ns"], run["finished_ns"])
    assert not ok and "1 archive files in all" in msg
    write_archive(arch, f"{T0 // 10**6:013d}-1-run-000000.jsonl.gz",
                  [{"v": 1, "type": "cuda_api", "ts": T0 + 5, "func": "cuLaunchKernel"}])
    ok, msg = check_archive(str(arch), run["started_ns"], run["finished_ns"])
    assert ok and "1 of 2 archive files" in msg
    assert not check_archive(str(tmp_path / "nowhere"), T0, T0)[0]


def test_archive_is_required_when_asked(jaeger, tmp_path, capsys):
    run = make_run(n=1)
    jaeger.traces[run["requests"][0]["trace_id"]] = trace_for(run["requests"][0])
    arch = tmp_path / "archive"
    arch.mkdir()
    args = ["verify", write_results(tmp_path, run), "--jaeger", jaeger.url, "--timeout", "0", "--archive", str(arch)]
    assert cli.main(args) == 1
    assert "MISSING archive: no *.jsonl.gz" in capsys.readouterr().out
    write_archive(arch, f"{T0 // 10**6:013d}-1-run-000000.jsonl.gz", [{"v": 1, "ts": T0 + 1, "func": "cuInit"}])
    assert cli.main(args) == 0


def test_archive_s3():
    moto = pytest.importorskip("moto")
    import boto3

    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="traces")
        now = datetime.datetime.now(datetime.timezone.utc)
        start_ns = int(now.timestamp() * 1e9) - 5 * 10**9
        run = {"started_ns": start_ns, "finished_ns": start_ns + 10**9}
        ok, msg = check_archive("s3://traces/otel-cuda", run["started_ns"], run["finished_ns"], s3)
        assert not ok and "0 archive objects" in msg
        s3.put_object(Bucket="traces", Key="other/1-x.jsonl.gz", Body=b"")
        s3.put_object(Bucket="traces", Key=f"otel-cuda/node=n/{start_ns // 10**6:013d}-1-r-000000.jsonl.gz", Body=b"")
        ok, msg = check_archive("s3://traces/otel-cuda", run["started_ns"], run["finished_ns"], s3)
        assert ok and "1 of 1" in msg
        # an object from long before the run does not count
        ok, _ = check_archive("s3://traces/otel-cuda", start_ns + 3600 * 10**9, start_ns + 3601 * 10**9, s3)
        assert not ok
