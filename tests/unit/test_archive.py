"""Archive writer on a directory destination: layout, rotation, atomic close, flush guarantee, recovery of a
killed writer's .part, quota and retention (counted), the record schema. S3 is in test_archive_s3.py."""

import gzip
import json
import os
import re
import sys
import time
import zlib
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from otel_cuda.archive import Archive, ArchiveConfig  # noqa: E402
from otel_cuda.archive_read import iter_records, local_files  # noqa: E402
from tests.support.trace_samples import make_trace  # noqa: E402

LAYOUT = re.compile(r"node=n1/namespace=ns1/pod=p1/date=\d{4}-\d\d-\d\d/hour=\d\d/"
                    r"\d{13}-\d+-[0-9a-f]{8}-\d{6}\.jsonl(\.gz)?$")


def rec(seq, pad=0):
    r = {"v": 1, "type": "cuda_api", "ts": 1_763_900_000_000_000_000 + seq, "mono_ns": seq, "pid": 42, "tid": 43,
         "func": "cuLaunchKernel", "phase": "entry", "dur_ns": None, "result": None,
         "args": {"seq": seq}, "kernel": "k", "step": seq // 10}
    if pad:
        r["args"]["pad"] = os.urandom(pad).hex()  # incompressible: files fill up predictably
    return r


def config(dest, **kw):
    kw.setdefault("flush_seconds", 0.02)
    return ArchiveConfig(destination=str(dest), node="n1", namespace="ns1", pod="p1", **kw)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def seqs(path):
    return [r["args"]["seq"] for r in iter_records(str(path), on_error=pytest.fail)]


class FakeClock:
    def __init__(self, t=1_763_900_000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_directory_roundtrip_layout_and_exact_lines(tmp_path):
    a = Archive(config(tmp_path))
    records = [rec(i) for i in range(500)]
    for r in records:
        a.write(r)
    a.close()
    files = local_files(str(tmp_path))
    assert len(files) == 1
    assert LAYOUT.search(os.path.relpath(files[0], tmp_path).replace(os.sep, "/"))
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".part")]
    raw = gzip.decompress(Path(files[0]).read_bytes())  # strict: a complete gzip stream with its trailer
    assert raw == b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
    assert list(iter_records(str(tmp_path))) == records
    s = a.stats()
    assert (s["lines_written"], s["lines_flushed"], s["files_closed"]) == (500, 500, 1)
    assert a.lines_written == 500


def test_plain_files_when_compression_is_off(tmp_path):
    a = Archive(config(tmp_path, compress=False))
    a.write(rec(1))
    a.close()
    [f] = local_files(str(tmp_path))
    assert f.endswith(".jsonl") and Path(f).read_bytes().startswith(b'{"v":1,')


def test_rotation_by_size_keeps_every_line_in_order(tmp_path):
    a = Archive(config(tmp_path, rotate_bytes=32768, quota_bytes=1 << 30, flush_seconds=3600))
    n = 3000
    for i in range(n):
        a.write(rec(i, pad=40))
    a.close()
    files = local_files(str(tmp_path))
    assert len(files) >= 3
    # zlib hands out compressed bytes in chunks of about 32 KiB: a file overshoots by at most one chunk
    assert all(32768 <= os.path.getsize(f) <= 32768 + 40 * 1024 for f in files[:-1])
    assert seqs(tmp_path) == list(range(n))
    assert a.stats()["files_closed"] == len(files)


def test_rotation_by_time(tmp_path):
    clock = FakeClock()
    a = Archive(config(tmp_path, rotate_seconds=60), clock=clock)
    a.write(rec(0))
    clock.t += 61
    assert wait_for(lambda: a.stats()["files_closed"] == 1)
    a.write(rec(1))
    a.close()
    assert len(local_files(str(tmp_path))) == 2
    assert seqs(tmp_path) == [0, 1]


def test_flush_is_durable_and_a_killed_writers_part_is_recovered_once(tmp_path):
    """What SIGKILL leaves: the .part as of the last flush (sync point, no trailer). A new Archive rebuilds it."""
    live, snap = tmp_path / "live", tmp_path / "snap"
    a = Archive(config(live, flush_seconds=3600))  # no background flush: only the explicit one
    for i in range(100):
        a.write(rec(i))
    a.flush()
    assert a.stats()["lines_flushed"] == 100
    [part] = [Path(r, f) for r, _, fs in os.walk(live) for f in fs if f.endswith(".part")]
    snap_part = snap / part.relative_to(live)
    snap_part.parent.mkdir(parents=True)
    snap_part.write_bytes(part.read_bytes())  # the bytes a SIGKILL right now would leave on disk
    for i in range(100, 110):
        a.write(rec(i))  # written, not flushed: not in the snapshot
    a.close()

    b = Archive(config(snap))
    assert wait_for(lambda: b.stats()["files_recovered"] == 1)
    b.close()
    final = Path(str(snap_part)[:-len(".part")])
    assert final.exists() and not snap_part.exists()
    assert seqs(snap) == list(range(100))
    assert len(gzip.decompress(final.read_bytes()).splitlines()) == 100  # a complete gzip file now
    s = b.stats()
    assert (s["lines_recovered"], s["partial_lines_dropped"]) == (100, 0)


def _write_part(path, data, finish=False, compress=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        z = zlib.compressobj(3, zlib.DEFLATED, 31)
        data = z.compress(data) + z.flush(zlib.Z_FINISH if finish else zlib.Z_SYNC_FLUSH)
    path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_recovery_drops_a_trailing_partial_line_and_counts_it(tmp_path, compress):
    lines = b"".join(json.dumps(rec(i)).encode() + b"\n" for i in range(10))
    ext = ".jsonl.gz" if compress else ".jsonl"
    part = tmp_path / "node=n1/namespace=ns1/pod=p1/date=2025-11-23/hour=12" / f"1763899200000-7-aa-000001{ext}.part"
    _write_part(part, lines + b'{"v":1,"type":"cuda_a', compress=compress)
    a = Archive(config(tmp_path, compress=compress))
    assert wait_for(lambda: a.stats()["files_recovered"] == 1)
    a.close()
    assert seqs(tmp_path) == list(range(10))
    s = a.stats()
    assert (s["lines_recovered"], s["partial_lines_dropped"]) == (10, 1)


def test_recovery_after_a_crash_between_rename_and_unlink_keeps_one_copy(tmp_path):
    lines = b"".join(json.dumps(rec(i)).encode() + b"\n" for i in range(5))
    d = tmp_path / "node=n1/namespace=ns1/pod=p1/date=2025-11-23/hour=12"
    _write_part(d / "1763899200000-7-aa-000001.jsonl.gz", lines, finish=True)
    _write_part(d / "1763899200000-7-aa-000001.jsonl.gz.part", lines)
    _write_part(d / "1763899200000-7-aa-000002.jsonl.gz.recover", lines)  # an interrupted rebuild: redone/removed
    a = Archive(config(tmp_path))
    a.close()
    assert sorted(os.listdir(d)) == ["1763899200000-7-aa-000001.jsonl.gz"]
    assert seqs(tmp_path) == list(range(5))


def test_quota_drops_oldest_files_first_and_counts_every_line(tmp_path, caplog):
    caplog.set_level("WARNING", logger="otel_cuda.archive")
    a = Archive(config(tmp_path, compress=False, rotate_bytes=2048, quota_bytes=8192))
    n = 400
    for i in range(n):
        a.write(rec(i, pad=20))
    a.close()
    b = Archive(config(tmp_path, compress=False, rotate_bytes=2048, quota_bytes=8192))  # start: over quota
    assert wait_for(lambda: b.stats()["local_bytes"] <= 8192)
    b.close()
    kept = seqs(tmp_path)
    dropped = a.stats()["lines_dropped_quota"] + b.stats()["lines_dropped_quota"]
    assert dropped > 0 and a.stats()["files_dropped_quota"] + b.stats()["files_dropped_quota"] > 0
    assert len(kept) + dropped == n  # every line is either still there or counted
    assert kept == list(range(n - len(kept), n))  # the newest survive: oldest dropped first
    assert sum(os.path.getsize(f) for f in local_files(str(tmp_path))) <= 8192
    assert any("quota" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


def test_retention_drops_old_files_counted_including_leftovers_from_an_earlier_run(tmp_path):
    clock = FakeClock()
    a = Archive(config(tmp_path), clock=clock)
    for i in range(10):
        a.write(rec(i))
    a.close()  # a file started at t0

    clock.t += 8 * 86400  # eight days later, a new run
    b = Archive(config(tmp_path, retention_days=7), clock=clock)
    for i in range(10, 13):
        b.write(rec(i))
    assert wait_for(lambda: b.stats()["files_dropped_retention"] == 1)
    b.close()
    s = b.stats()
    assert s["lines_dropped_retention"] == 10  # counted by reading the leftover file
    assert seqs(tmp_path) == [10, 11, 12]


def test_close_is_idempotent_and_late_writes_are_counted(tmp_path):
    a = Archive(config(tmp_path))
    a.write(rec(0))
    a.close()
    a.close()
    a.write(rec(1))
    assert a.stats()["lines_dropped_closed"] == 1
    assert seqs(tmp_path) == [0]


def test_a_file_that_cannot_be_created_drops_records_counted_not_raised(tmp_path):
    (tmp_path / "node=n1").write_text("a file where the partition directory should be")
    a = Archive(config(tmp_path))
    for i in range(3):
        a.write(rec(i))
    a.close()
    assert a.stats()["lines_dropped_write_error"] == 3 and a.stats()["lines_written"] == 0


def test_one_writer_per_directory(tmp_path):
    a = Archive(config(tmp_path))
    with pytest.raises(RuntimeError, match="in use"):
        Archive(config(tmp_path))
    a.close()
    Archive(config(tmp_path)).close()  # released by close (and by the kernel when a writer is killed)


def test_config_is_validated():
    with pytest.raises(ValueError, match="quota"):
        ArchiveConfig(rotate_bytes=100, quota_bytes=100)
    with pytest.raises(ValueError, match="bucket"):
        ArchiveConfig(destination="s3:///prefix")
    with pytest.raises(ValueError, match="flush_seconds"):
        ArchiveConfig(flush_seconds=0)
    with pytest.raises(AttributeError):
        ArchiveConfig().rotate_bytes = 1  # frozen


# ---- schema ------------------------------------------------------------------------------------------------

SCHEMA = json.loads((ROOT / "docs" / "archive-schema.json").read_text())
BRIEF_EXAMPLES = [
    {"v": 1, "type": "cuda_api", "ts": 1763900000000000000, "mono_ns": 123456789, "pid": 42, "tid": 43,
     "func": "cuMemcpyDtoHAsync_v2", "phase": "call", "dur_ns": 5300, "result": "CUDA_SUCCESS",
     "args": {"dst": "0x7f0000001000", "src": "0x7f0000000000", "bytes": 4096, "kind": "dtoh", "stream": "0x5"},
     "step": 17},
    {"v": 1, "type": "cuda_api", "ts": 1763900000000000000, "mono_ns": 1, "pid": 42, "tid": 43,
     "func": "cuLaunchKernel", "phase": "entry", "dur_ns": None, "result": None,
     "args": {"function": "0x1000", "grid": [128, 1, 1], "block": [256, 1, 1], "shared_mem": 0, "stream": "0x5"},
     "kernel": "flash_fwd_kernel", "step": 17},
    {"v": 1, "type": "cuda_step", "step": 17, "pid": 42, "tid": 43, "ts": 1763900000000000000, "mono_ns": 1,
     "dur_ns": 2100000, "launches": 20, "graph_launches": 1, "memcpy_bytes": 4096, "api_ns": 8000,
     "sync_ns": 1900000},
]


def test_schema_accepts_the_documented_records():
    validator = jsonschema.Draft202012Validator(SCHEMA)
    validator.check_schema(SCHEMA)
    for r in BRIEF_EXAMPLES + make_trace(steps=3, requests=True, sys_records=True):
        validator.validate(r)


@pytest.mark.parametrize("bad", [
    {"v": 2, "type": "cuda_api"},
    {"v": 1, "type": "cuda_api", "ts": 1, "mono_ns": 1, "pid": 1, "tid": 1, "func": "cuInit", "phase": "call",
     "dur_ns": None, "result": "CUDA_SUCCESS", "args": {}},  # a call needs its duration
    {"v": 1, "type": "cuda_api", "ts": 1, "mono_ns": 1, "pid": 1, "tid": 1, "func": "cuMemFree_v2", "phase": "call",
     "dur_ns": 1, "result": "CUDA_SUCCESS", "args": {"ptr": 140737488355328}},  # pointers are hex strings
    {"v": 1, "type": "cuda_step", "step": 1},
    {"v": 1, "type": "nope"},
])
def test_schema_rejects_malformed_records(bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)
