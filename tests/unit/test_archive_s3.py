"""Archive → a real S3 HTTP server (moto[server]) through boto3: byte-identical round trip, multipart, an S3
outage with zero loss, leftovers uploaded at start, SIGKILL mid-upload → every flushed record in S3 exactly once,
no credentials in logs, and reading s3:// back (analyze included)."""

import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from queue import Empty, Queue

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from otel_cuda import analyze  # noqa: E402
from otel_cuda.archive import Archive, ArchiveConfig  # noqa: E402
from otel_cuda.archive_read import iter_records  # noqa: E402
from tests.support.s3_server import ACCESS_KEY, SECRET_KEY, S3Server, free_port  # noqa: E402

CHILD = ROOT / "tests" / "support" / "archive_child.py"


@pytest.fixture(scope="module")
def server():
    with S3Server() as s:
        yield s


@pytest.fixture
def bucket(server):
    name = f"b-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    return name


def rec(seq, pad=0):
    r = {"v": 1, "type": "cuda_api", "ts": 1_763_900_000_000_000_000 + seq * 1000, "mono_ns": seq, "pid": 42,
         "tid": 43, "func": "cuLaunchKernel", "phase": "entry", "dur_ns": None, "result": None,
         "args": {"seq": seq}, "kernel": "k", "step": seq // 10}
    if pad:
        r["args"]["pad"] = os.urandom(pad).hex()
    return r


def s3_config(bucket, buffer_dir, **kw):
    kw.setdefault("flush_seconds", 0.02)
    kw.setdefault("backoff_initial_seconds", 0.02)
    kw.setdefault("backoff_max_seconds", 0.2)
    kw.setdefault("close_timeout_seconds", 10)
    return ArchiveConfig(destination=f"s3://{bucket}/archive", buffer_dir=str(buffer_dir), node="n1",
                         namespace="ns1", pod="p1", **kw)


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def s3_seqs(client, bucket):
    errors = []
    got = [r["args"]["seq"] for r in iter_records(f"s3://{bucket}/archive", s3_client=client,
                                                  on_error=lambda *e: errors.append(e))]
    assert not errors
    return got


class CopyingClient:
    """The real client, plus a copy of each file as it is handed to upload_file (the local file is deleted
    once the upload is confirmed, so this is the only way to compare bytes afterwards)."""

    def __init__(self, client, copies: Path):
        self._client = client
        self.copies = copies
        self.uploaded: list[str] = []

    def upload_file(self, filename, bucket, key, **kw):
        shutil.copy(filename, self.copies / key.replace("/", "_"))
        self.uploaded.append(key)
        return self._client.upload_file(filename, bucket, key, **kw)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_upload_is_byte_identical_keyed_by_node_namespace_pod_time_and_deleted_after_confirmation(
        server, bucket, tmp_path):
    copies = tmp_path / "copies"
    copies.mkdir()
    client = CopyingClient(server.client(), copies)
    a = Archive(s3_config(bucket, tmp_path / "buf", rotate_bytes=32768), s3_client=client)
    records = [rec(i, pad=32) for i in range(3000)]
    for r in records:
        a.write(r)
    a.close()
    s = a.stats()
    assert s["files_uploaded"] == s["files_closed"] == len(client.uploaded) >= 2
    assert (s["pending_files"], s["upload_failures"]) == (0, 0)
    assert s["bytes_uploaded"] == sum(p.stat().st_size for p in copies.iterdir())
    for key in client.uploaded:
        assert key.startswith("archive/node=n1/namespace=ns1/pod=p1/date=")
        body = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == (copies / key.replace("/", "_")).read_bytes()
    assert sorted(client.uploaded) == client.uploaded  # oldest first, and keys sort by time
    everything = b"".join(gzip.decompress(server.client().get_object(Bucket=bucket, Key=k)["Body"].read())
                          for k in client.uploaded)
    assert everything == b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
    assert not [f for _, _, fs in os.walk(tmp_path / "buf") for f in fs if not f.startswith(".")]  # all deleted


def test_large_file_goes_multipart_and_its_etag_is_verified(server, bucket, tmp_path):
    client = server.client()
    mib = 1 << 20
    a = Archive(s3_config(bucket, tmp_path / "buf", multipart_threshold_bytes=5 * mib,
                          multipart_chunksize_bytes=5 * mib, quota_bytes=256 * mib), s3_client=client)
    n = 0
    while a.stats()["local_bytes"] < 6 * mib:  # random hex: about 6 MiB compressed
        for _ in range(2000):
            a.write(rec(n, pad=200))
            n += 1
        a.flush()
    a.close()
    [obj] = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert obj["ETag"].strip('"').endswith("-2")  # two parts
    head = client.head_object(Bucket=bucket, Key=obj["Key"])
    assert head["Metadata"] == {"lines": str(n)}
    assert a.stats()["files_uploaded"] == 1
    assert s3_seqs(client, bucket) == list(range(n))


def test_s3_outage_keeps_files_and_uploads_them_when_it_returns_zero_loss(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="otel_cuda")
    with S3Server() as server:
        client = server.client()
        client.create_bucket(Bucket="outage")
        a = Archive(s3_config("outage", tmp_path / "buf", rotate_bytes=4096), s3_client=client)
        for i in range(200):
            a.write(rec(i, pad=32))
        a.flush()
        assert wait_for(lambda: a.stats()["files_uploaded"] >= 1)
        before = s3_seqs(client, "outage")  # a restarted moto starts empty: keep what landed before the outage
        assert before

        server.stop()
        for i in range(200, 600):
            a.write(rec(i, pad=32))
        a.flush()
        assert wait_for(lambda: a.stats()["upload_failures"] >= 2 and a.stats()["pending_files"] >= 1)
        assert any(f.endswith(".jsonl.gz") for _, _, fs in os.walk(tmp_path / "buf") for f in fs)

        server.start()
        client.create_bucket(Bucket="outage")
        for i in range(600, 700):
            a.write(rec(i, pad=32))
        a.close()
        after = s3_seqs(client, "outage")
        s = a.stats()
    assert s["pending_files"] == 0 and s["lines_written"] == 700
    got = Counter(before + after)
    assert sorted(got) == list(range(700)) and set(got.values()) == {1}  # zero loss, nothing twice
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "failed, kept locally, will retry" in messages and "s3://outage/archive/node=n1" in messages
    assert ACCESS_KEY not in messages and SECRET_KEY not in messages


def test_files_left_by_an_earlier_run_are_uploaded_at_start(server, bucket, tmp_path):
    dead = ArchiveConfig(destination=f"s3://{bucket}/archive", buffer_dir=str(tmp_path / "buf"), node="n1",
                         namespace="ns1", pod="p1", flush_seconds=0.02, close_timeout_seconds=0.5,
                         backoff_initial_seconds=0.02, rotate_bytes=4096)
    nobody = S3Server(port=free_port()).client()  # nothing listens there: every upload fails
    a = Archive(dead, s3_client=nobody)
    for i in range(300):
        a.write(rec(i, pad=32))
        if i % 100 == 99:
            a.flush()  # makes the compressed size exact: the flusher rotates at 4 KiB
            assert wait_for(lambda: a.stats()["files_closed"] == (i + 1) // 100)
    a.close()
    assert a.stats()["pending_files"] >= 2 and a.stats()["files_uploaded"] == 0

    b = Archive(s3_config(bucket, tmp_path / "buf"), s3_client=server.client())
    assert wait_for(lambda: b.stats()["pending_files"] == 0)
    b.close()
    assert b.stats()["files_uploaded"] == a.stats()["pending_files"]
    assert s3_seqs(server.client(), bucket) == list(range(300))


def _read_lines(stream, queue):
    for line in stream:
        queue.put(line.strip())


@pytest.mark.parametrize("block", ["before-put", "after-put", "after-head"])
def test_sigkill_during_upload_then_restart_every_flushed_record_exactly_once(server, bucket, tmp_path, block):
    """A child sidecar writes numbered records, flushing after each batch and printing the last flushed number,
    and is SIGKILLed while its uploader is inside an upload (`block` says where). A restart on the same buffer
    directory recovers the killed writer's .part and re-uploads: every flushed record must be in S3 exactly once;
    unflushed ones may be lost (the documented last second) but never duplicated."""
    buf = tmp_path / "buf"
    cmd = [sys.executable, str(CHILD), "write", server.url, bucket, "archive", str(buf), "--count", "1000",
           "--tail", "60", "--block", block]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    lines: Queue = Queue()
    threading.Thread(target=_read_lines, args=(child.stdout, lines), daemon=True).start()
    flushed, tail, blocked = -1, None, False
    deadline = time.monotonic() + 30
    try:
        while not (blocked and tail is not None):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except Empty:
                pytest.fail(f"child did not reach the kill point (blocked={blocked}, tail={tail})")
            if line.startswith("FLUSHED "):
                flushed = int(line.split()[1])
            elif line.startswith("TAIL "):
                tail = int(line.split()[1])
            elif line == "BLOCKED":
                blocked = True
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert flushed == 999 and tail == 1059
    left = [f for _, _, fs in os.walk(buf) for f in fs]
    assert any(f.endswith(".part") for f in left)  # killed with a file open
    assert any(f.endswith(".jsonl.gz") for f in left)  # and with closed files not yet confirmed

    drain = subprocess.run([sys.executable, str(CHILD), "drain", server.url, bucket, "archive", str(buf)],
                           capture_output=True, text=True, timeout=60)
    assert drain.returncode == 0, drain.stderr
    stats = json.loads(drain.stdout.strip().splitlines()[-1])
    # the killed writer's .part is rebuilt (flushed lines in it) or, holding only unflushed lines, removed
    assert stats["files_recovered"] <= 1 and stats["pending_files"] == 0 and stats["files_uploaded"] >= 2

    counts = Counter(s3_seqs(server.client(), bucket))
    assert [s for s in range(flushed + 1) if counts[s] != 1] == []  # every flushed record exactly once
    assert {s for s, c in counts.items() if c > 1} == set()  # nothing twice, tail included
    assert set(counts) <= set(range(tail + 1))
    assert not [f for _, _, fs in os.walk(buf) for f in fs if not f.startswith(".")]


def test_s3_objects_are_read_back_with_damage_reported_and_analyze_runs_on_s3(server, bucket, tmp_path,
                                                                               monkeypatch, capsys):
    client = server.client()
    good = b"".join(json.dumps(rec(i)).encode() + b"\n" for i in range(50))
    client.put_object(Bucket=bucket, Key="archive/a.jsonl.gz", Body=gzip.compress(good))
    broken = gzip.compress(good)
    client.put_object(Bucket=bucket, Key="archive/b.jsonl.gz", Body=broken[: len(broken) // 2])
    client.put_object(Bucket=bucket, Key="archive/notes.txt", Body=b"ignored")
    errors = []
    got = [r["args"]["seq"] for r in iter_records(f"s3://{bucket}/archive", s3_client=client,
                                                  on_error=lambda *e: errors.append(e))]
    assert got[:50] == list(range(50)) and len(got) > 50
    [(source, line_no, message)] = errors
    assert source == f"s3://{bucket}/archive/b.jsonl.gz" and line_no == len(got) - 50 + 1
    assert "truncated gzip" in message

    import argparse
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    parser = argparse.ArgumentParser(prog="otel-cuda")
    analyze.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", f"s3://{bucket}/archive", "--endpoint-url", server.url, "--json"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["functions"][0] == {**json.loads(out)["functions"][0], "func": "cuLaunchKernel",
                                               "calls": len(got)}
    assert f"s3://{bucket}/archive/b.jsonl.gz:{line_no}: truncated gzip" in err
