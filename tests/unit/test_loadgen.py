"""otel-cuda loadgen against a small fake OpenAI server: headers, concurrency, streaming TTFT, results file."""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import ThreadingHTTPServer

import pytest

from support.http_json import JsonHandler

from otel_cuda import cli
from otel_cuda.loadgen import LoadConfig, new_traceparent, percentile, read_prompts, run_load, summarize

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")


class FakeOpenAI:
    """An OpenAI-compatible server that records each request's headers and body and its own concurrency."""

    def __init__(self, delay_s=0.0, first_token_delay_s=0.0, token_delay_s=0.0, fail_every=0):
        self.delay_s, self.first_token_delay_s, self.token_delay_s = delay_s, first_token_delay_s, token_delay_s
        self.fail_every = fail_every
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        fake = self

        class H(JsonHandler):

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                self._json(404, {"error": "no"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}  # urllib capitalizes names
                    fake.requests.append({"path": self.path, "headers": headers, "body": body})
                    number = len(fake.requests)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                time.sleep(fake.delay_s)
                with fake.lock:  # before answering: the client may send its next request as soon as it has this one
                    fake.in_flight -= 1
                self._answer(body, number)

            def _answer(self, body, number):
                if fake.fail_every and number % fake.fail_every == 0:
                    return self._json(500, {"object": "error", "message": "boom"})
                chat = self.path == "/v1/chat/completions"
                n = body.get("max_tokens", 16)
                rid = ("chatcmpl-" if chat else "cmpl-") + self.headers.get("X-Request-Id", "x")
                usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
                if not body.get("stream"):
                    choice = ({"message": {"role": "assistant", "content": "a " * n}} if chat else {"text": "a " * n})
                    return self._json(200, {"id": rid, "choices": [{"index": 0, **choice, "finish_reason": "length"}],
                                            "usage": usage})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()

                def event(obj):
                    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                    self.wfile.write(b"data: " + data + b"\n\n")
                    self.wfile.flush()
                if chat:  # vLLM's first chat chunk carries the role and no text: it must not count as the first token
                    event({"id": rid, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                time.sleep(fake.first_token_delay_s)
                for i in range(n):
                    if i:
                        time.sleep(fake.token_delay_s)
                    piece = {"delta": {"content": " a"}} if chat else {"text": " a"}
                    event({"id": rid, "choices": [{"index": 0, **piece, "finish_reason": None}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    event({"id": rid, "choices": [], "usage": usage})
                event(b"[DONE]")
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def make_server():
    servers = []

    def make(**kw):
        s = FakeOpenAI(**kw)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.close()


def test_traceparent_is_w3c_sampled_and_random():
    seen = set()
    for _ in range(200):
        tp, trace_id, span_id = new_traceparent()
        m = TRACEPARENT.match(tp)
        assert m and m.groups() == (trace_id, span_id)
        assert int(trace_id, 16) and int(span_id, 16)
        seen.add(trace_id)
    assert len(seen) == 200


def test_each_request_carries_fresh_ids_and_results_match_headers(make_server):
    srv = make_server()
    results = run_load(LoadConfig(url=srv.url, n=6, max_tokens=4), run_id="lg-test")
    assert [r.index for r in results] == list(range(6))
    assert all(r.ok and r.status == 200 for r in results)
    headers = [req["headers"] for req in srv.requests]
    parsed = [TRACEPARENT.match(h["traceparent"]).groups() for h in headers]
    assert len({t for t, _ in parsed}) == 6 and len({s for _, s in parsed}) == 6
    assert len({h["x-request-id"] for h in headers}) == 6
    by_rid = {h["x-request-id"]: TRACEPARENT.match(h["traceparent"]).groups() for h in headers}
    for r in results:
        assert r.request_id.startswith("lg-test-")
        assert by_rid[r.request_id] == (r.trace_id, r.span_id)
        assert r.response_id == f"cmpl-{r.request_id}"
        assert r.completion_tokens == 4 and r.prompt_tokens == 3 and r.ttft_s is None
    body = srv.requests[0]["body"]
    assert body["model"] == "fake-model"  # the first of /v1/models
    assert body["max_tokens"] == 4 and body["ignore_eos"] is True and "stream" not in body


def test_sequential_runs_one_at_a_time(make_server):
    srv = make_server(delay_s=0.05)
    t0 = time.monotonic()
    results = run_load(LoadConfig(url=srv.url, model="m", n=5, workers=1))
    assert all(r.ok for r in results)
    assert srv.max_in_flight == 1
    assert time.monotonic() - t0 >= 5 * 0.05


def test_parallel_workers_overlap(make_server):
    srv = make_server(delay_s=0.2)
    t0 = time.monotonic()
    results = run_load(LoadConfig(url=srv.url, model="m", n=8, workers=4))
    wall = time.monotonic() - t0
    assert all(r.ok for r in results)
    assert srv.max_in_flight == 4
    assert wall < 8 * 0.2 * 0.75  # sequential would take 1.6 s


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_streaming_measures_ttft(make_server, api):
    srv = make_server(first_token_delay_s=0.15, token_delay_s=0.03)
    results = run_load(LoadConfig(url=srv.url, model="m", n=2, api=api, stream=True, max_tokens=5))
    for r in results:
        assert r.ok, r.error
        assert 0.14 <= r.ttft_s < r.latency_s
        assert r.latency_s >= 0.15 + 4 * 0.03
        assert r.completion_tokens == 5
    req = srv.requests[0]
    assert req["path"] == ("/v1/chat/completions" if api == "chat" else "/v1/completions")
    assert req["body"]["stream"] is True and req["body"]["stream_options"] == {"include_usage": True}
    if api == "chat":
        assert req["body"]["messages"][0]["role"] == "user"


def test_failures_are_results_not_exceptions(make_server):
    srv = make_server(fail_every=2)
    results = run_load(LoadConfig(url=srv.url, model="m", n=4, workers=2))
    assert sorted(r.status for r in results) == [200, 200, 500, 500]
    bad = [r for r in results if not r.ok]
    assert all("boom" in r.error for r in bad)
    refused = run_load(LoadConfig(url="http://127.0.0.1:9", model="m", n=1, timeout_s=2))
    assert refused[0].status == 0 and not refused[0].ok and refused[0].error


def test_progress_lines_on_long_runs(make_server):
    import io
    srv = make_server(delay_s=0.05)
    buf = io.StringIO()
    cfg = LoadConfig(url=srv.url, model="m", n=6, progress_every_s=0.1)
    run_load(cfg, progress=buf)
    assert re.search(r"loadgen: \d+/6 done, 0 failed", buf.getvalue())


def test_cli_writes_results_and_table(make_server, tmp_path, capsys):
    srv = make_server()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n\ntwo\n")
    out = tmp_path / "results.json"
    rc = cli.main(["loadgen", "--url", srv.url, "-n", "4", "--workers", "2", "--api", "chat", "--stream",
                   "--prompts", str(prompts), "--max-tokens", "3", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["version"] == 1 and doc["model"] == "fake-model" and doc["api"] == "chat" and doc["stream"] is True
    assert doc["started_ns"] <= doc["requests"][0]["start_ns"] <= doc["finished_ns"]
    assert doc["summary"]["count"] == 4 and doc["summary"]["ok"] == 4 and doc["summary"]["completion_tokens"] == 12
    assert {r["request_id"] for r in doc["requests"]} == {req["headers"]["x-request-id"] for req in srv.requests}
    assert [req["body"]["messages"][0]["content"] for req in srv.requests].count("one") == 2
    table = capsys.readouterr().out
    assert "latency p50 / p95" in table and "4 (4 ok, 0 failed)" in table


def test_cli_unreachable_server_is_one_line(capsys):
    rc = cli.main(["loadgen", "--url", "http://127.0.0.1:9", "-n", "1"])
    assert rc == 2
    assert "cannot list models" in capsys.readouterr().err


def test_helpers(tmp_path):
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 95) == 95.0
    p = tmp_path / "p.json"
    p.write_text('["a", "b"]')
    assert read_prompts(str(p)) == ("a", "b")
    s = summarize([], 1.0)
    assert s["count"] == 0 and s["latency_p50_s"] is None
    with pytest.raises(ValueError):
        LoadConfig(api="embeddings")
