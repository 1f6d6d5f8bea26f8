"""Events → rotated, gzip-compressed JSONL files → a local directory or s3://bucket/prefix, without silent loss.

Life of a file (docs/archive.md has the whole contract):
  write() appends lines to `<staging>/<relative key>.part`; every `flush_seconds` (and on rotation and flush())
  the deflate stream is sync-flushed and fsynced, so a SIGKILL loses at most the lines of the last second.
  Rotation (time or size) finishes the gzip stream, fsyncs and renames `.part` → final name: a final name is
  always a complete file. For s3:// destinations an uploader thread uploads closed files oldest first to the key
  `<prefix>/<relative key>` (the same for every attempt and every run: a re-upload overwrites, never duplicates),
  confirms the object with head_object (size and ETag) and only then deletes the local file. At start, files
  left by an earlier run are uploaded, and `.part` files of a killed writer are rebuilt from their readable
  whole lines. A quota and a retention age bound local data; what they drop is counted in stats() and logged.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from .archive_read import LineReader, split_s3_url

logger = logging.getLogger(__name__)

MiB = 1 << 20
PART = ".part"
_RECOVER = ".recover"  # a .part being rebuilt; deleted and redone if a crash interrupts the rebuild
_LOCK_NAME = ".otel-cuda-archive.lock"
_BATCH_BYTES = 64 * 1024  # lines are compressed in batches: one zlib call per batch, not per line
_encode = json.JSONEncoder(separators=(",", ":")).encode  # = json.dumps(separators=...), minus a per-call setup
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ArchiveConfig:
    destination: str = "otel-cuda-archive"  # a directory, or s3://bucket/prefix
    buffer_dir: str = "/var/lib/otel-cuda/archive-buffer"  # local staging for s3:// (survive restarts: a volume)
    rotate_seconds: float = 60.0
    rotate_bytes: int = 64 * MiB  # compressed bytes on disk (= object size)
    flush_seconds: float = 1.0  # the most a SIGKILL can lose; also the maintenance tick
    quota_bytes: int = 1024 * MiB  # local files (closed + current); oldest closed files dropped beyond it
    retention_days: float = 7.0  # local files older than this (by start time) are dropped
    compress: bool = True
    compress_level: int = 3  # zlib level; 1–3 cost a fraction of level 6's CPU for JSON lines
    node: str = field(default_factory=socket.gethostname)
    namespace: str = "unknown"
    pod: str = "unknown"
    s3_endpoint_url: str | None = None  # only for a client the Archive builds itself (none injected)
    s3_region: str | None = None
    multipart_threshold_bytes: int = 8 * MiB
    multipart_chunksize_bytes: int = 8 * MiB
    upload_concurrency: int = 4
    backoff_initial_seconds: float = 1.0  # failed upload → retry after this, doubling up to the max; never given
    backoff_max_seconds: float = 60.0  # up: a file leaves the buffer by confirmed upload or counted drop only
    close_timeout_seconds: float = 20.0  # close() retries pending uploads this long (inside k8s' 30 s grace)
    verify_etag: bool = True  # off for stores whose ETag is not an MD5 (SSE-KMS); size is then the only check

    def __post_init__(self):
        if self.destination.startswith("s3://"):
            split_s3_url(self.destination)  # raises on a malformed URL now, not in the uploader thread
        for name in ("rotate_seconds", "rotate_bytes", "flush_seconds", "quota_bytes", "retention_days",
                     "backoff_initial_seconds", "backoff_max_seconds", "multipart_chunksize_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"archive {name} must be > 0")
        if self.quota_bytes <= self.rotate_bytes:
            raise ValueError("archive quota_bytes must exceed rotate_bytes (the open file counts against it)")
        if not 0 <= self.compress_level <= 9:
            raise ValueError("archive compress_level must be 0..9")

    @property
    def is_s3(self) -> bool:
        return self.destination.startswith("s3://")

    @property
    def staging_dir(self) -> str:
        return self.buffer_dir if self.is_s3 else self.destination


def relative_key(config: ArchiveConfig, start_ms: int, pid: int, run_id: str, seq: int) -> str:
    """`node=…/namespace=…/pod=…/date=YYYY-MM-DD/hour=HH/<start_ms>-<pid>-<run>-<seq>.jsonl.gz` (UTC).

    Zero-padded epoch ms first, so keys sort by node, namespace, pod, then time; `run` is random per Archive so
    a restarted sidecar with the same pid (pid 1 in a container) never reuses a name.
    """
    t = time.gmtime(start_ms / 1000)
    ext = ".jsonl.gz" if config.compress else ".jsonl"
    return (f"node={_safe(config.node)}/namespace={_safe(config.namespace)}/pod={_safe(config.pod)}/"
            f"date={t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}/hour={t.tm_hour:02d}/"
            f"{start_ms:013d}-{pid}-{run_id}-{seq:06d}{ext}")


def _safe(value: str) -> str:
    return _UNSAFE.sub("_", value) or "unknown"


class _GzipSink:
    """One gzip member written with Z_SYNC_FLUSH points: everything before a sync() decodes, trailer or not."""

    def __init__(self, raw, level: int):
        self.raw = raw
        self.size = 0
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip header and trailer

    def write(self, data: bytes) -> None:
        out = self._z.compress(data)
        if out:
            self.raw.write(out)
            self.size += len(out)

    def _emit(self, mode: int) -> None:
        out = self._z.flush(mode)
        self.raw.write(out)
        self.size += len(out)
        self.raw.flush()

    def sync(self) -> None:
        self._emit(zlib.Z_SYNC_FLUSH)

    def finish(self) -> None:
        self._emit(zlib.Z_FINISH)


class _PlainSink:
    def __init__(self, raw, level: int = 0):
        self.raw = raw
        self.size = 0

    def write(self, data: bytes) -> None:
        self.raw.write(data)
        self.size += len(data)

    def sync(self) -> None:
        self.raw.flush()

    finish = sync


@dataclass
class _Closed:
    """A complete local file: waiting for upload (s3) or part of the local archive (directory)."""
    path: str
    rel: str
    size: int
    lines: int | None  # None for a file from an earlier run until something counts it
    start_ms: int
    in_flight: bool = False


def _start_ms(name: str, path: str) -> int:
    head = os.path.basename(name).split("-", 1)[0]
    return int(head) if head.isdigit() else int(os.path.getmtime(path) * 1000)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in LineReader(f, path, on_error=lambda *a: None))


def expected_etag(path: str, size: int, threshold: int, chunksize: int) -> str:
    """The ETag S3 gives an object uploaded by upload_file with this TransferConfig: MD5 of the bytes, or for a
    multipart upload MD5 of the parts' MD5s plus `-<parts>` (part size as s3transfer adjusts it)."""
    from s3transfer.utils import ChunksizeAdjuster
    with open(path, "rb") as f:
        if size < threshold:
            md5 = hashlib.md5(usedforsecurity=False)
            for chunk in iter(lambda: f.read(MiB), b""):
                md5.update(chunk)
            return md5.hexdigest()
        part = ChunksizeAdjuster().adjust_chunksize(chunksize, size)
        digests = [hashlib.md5(chunk, usedforsecurity=False).digest() for chunk in iter(lambda: f.read(part), b"")]
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def _describe(e: BaseException) -> str:
    # botocore messages name the operation and error code, never credentials; strip URL userinfo anyway.
    return re.sub(r"://[^/@\s]+@", "://", f"{type(e).__name__}: {e}")


class Archive:
    """Writes records as JSON lines; see the module doc. Thread-safe; `write` is the hot path."""

    def __init__(self, config: ArchiveConfig, s3_client=None, clock: Callable[[], float] = time.time):
        self.config = config
        self._clock = clock
        self._root = os.path.abspath(config.staging_dir)
        os.makedirs(self._root, exist_ok=True)
        self._lock_file = self._take_dir_lock()
        self._lock = threading.Lock()
        self._stop = threading.Event()  # stop writing and ticking; the uploader drains what is pending
        self._abandon = threading.Event()  # close_timeout passed: the uploader gives up, files stay for next run
        self._pid = os.getpid()
        self._run_id = os.urandom(4).hex()
        self._seq = 0
        self._batch_limit = min(_BATCH_BYTES, max(1, config.rotate_bytes // 8))
        self._closing = False
        # the open file
        self._buf: list[bytes] = []  # chunks of whole lines, written to the file in batches
        self._buf_bytes = 0
        self._sink = None
        self._part = self._rel = None
        self._file_lines = 0
        self._opened_at = 0.0
        self._start_ms = 0
        self._lines_at_sync = 0
        # closed local files by relative key
        self._index: dict[str, _Closed] = {}
        self._stats = dict.fromkeys((
            "lines_written", "lines_flushed", "files_closed", "files_uploaded", "bytes_uploaded", "upload_failures",
            "files_dropped_quota", "lines_dropped_quota", "files_dropped_retention", "lines_dropped_retention",
            "lines_dropped_write_error", "lines_dropped_closed", "files_recovered", "lines_recovered",
            "partial_lines_dropped"), 0)
        self._error_logged_at = 0.0
        leftover_parts = self._scan()
        if config.is_s3:
            self._bucket, self._prefix = split_s3_url(config.destination)
            if s3_client is None:
                import boto3  # standard credential chain: IRSA, instance profile, env
                s3_client = boto3.client("s3", endpoint_url=config.s3_endpoint_url, region_name=config.s3_region)
            from boto3.s3.transfer import TransferConfig
            self._s3 = s3_client
            self._transfer = TransferConfig(multipart_threshold=config.multipart_threshold_bytes,
                                            multipart_chunksize=config.multipart_chunksize_bytes,
                                            max_concurrency=config.upload_concurrency)
        # Three threads, so that slow work never delays the 1 s flush: the flusher only flushes and rotates;
        # the housekeeper recovers leftovers and enforces quota/retention; the uploader talks to S3.
        self._threads = [threading.Thread(target=self._flush_loop, name="otel-cuda-archive-flush", daemon=True),
                         threading.Thread(target=self._housekeep_loop, args=(leftover_parts,),
                                          name="otel-cuda-archive-housekeep", daemon=True)]
        self._uploader = None
        if config.is_s3:
            self._uploader = threading.Thread(target=self._upload_loop, name="otel-cuda-archive-upload", daemon=True)
            self._threads.append(self._uploader)
        for t in self._threads:
            t.start()

    # ---- hot path -------------------------------------------------------------------------------------------

    def write(self, record: dict) -> None:
        """Appends one record as a JSON line. Not yet durable: see flush() and the flush_seconds guarantee."""
        self.write_text(_encode(record) + "\n", 1)

    def write_text(self, text: str, lines: int) -> None:
        """Appends `lines` preformatted JSON lines given as one string, under one lock: the pipeline's batch path."""
        data = text.encode()
        with self._lock:
            if self._sink is None and not self._open_locked():
                return
            self._buf.append(data)
            self._buf_bytes += len(data)
            self._file_lines += lines
            self._stats["lines_written"] += lines
            if self._buf_bytes >= self._batch_limit:
                try:
                    self._drain_locked()
                    if self._sink.size >= self.config.rotate_bytes:
                        self._rotate_locked()
                except OSError as e:
                    self._write_failed_locked(e)

    @property
    def lines_written(self) -> int:
        return self._stats["lines_written"]

    # ---- public control -------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Makes every line written so far durable (sync-flushed and fsynced) before returning."""
        self._sync(force=True)

    def close(self) -> None:
        """Closes the current file, uploads what is pending (retrying up to close_timeout_seconds), stops the
        threads. Idempotent. Files not uploaded stay in the buffer and are uploaded by the next run."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._sink is not None:
                try:
                    self._rotate_locked()
                except OSError as e:
                    self._write_failed_locked(e)
        self._stop.set()
        for t in self._threads:
            if t is not self._uploader:
                t.join()
        if self._uploader is not None:
            self._uploader.join(self.config.close_timeout_seconds)
            self._abandon.set()
            self._uploader.join(1.0)
            left = self.stats()["pending_files"]
            if left:
                logger.warning("archive: %d files not uploaded within %.0f s at close; they stay in %s for the "
                               "next run", left, self.config.close_timeout_seconds, self._root)
        self._lock_file.close()  # releases the flock

    def stats(self) -> dict:
        with self._lock:
            s = dict(self._stats)
            local = list(self._index.values())
            current = self._sink.size if self._sink is not None else 0
        s["local_files"] = len(local)
        s["local_bytes"] = sum(e.size for e in local) + current
        pending = local if self.config.is_s3 else ()
        s["pending_files"] = len(pending)
        s["pending_bytes"] = sum(e.size for e in pending)
        return s

    # ---- files ----------------------------------------------------------------------------------------------

    def _take_dir_lock(self):
        # Recovery rewrites .part files: a second writer on the same directory would rebuild the other's live
        # file. flock is released by the kernel when a killed process dies, so a restart always gets it.
        f = open(os.path.join(self._root, _LOCK_NAME), "a+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RuntimeError(f"archive directory {self._root} is in use by another writer") from None
            raise
        return f

    def _scan(self) -> list[str]:
        """Indexes complete files left from earlier runs; returns the .part files to recover."""
        parts = []
        for root, dirs, files in os.walk(self._root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                path = os.path.join(root, name)
                if name.startswith("."):
                    continue
                if name.endswith(_RECOVER):
                    os.unlink(path)  # an interrupted rebuild; its .part is still there and is rebuilt again
                elif name.endswith(PART):
                    if os.path.exists(path[:-len(PART)]):
                        os.unlink(path)  # rebuilt already; the crash came between rename and unlink
                    else:
                        parts.append(path)
                elif name.endswith((".jsonl.gz", ".jsonl")):
                    rel = os.path.relpath(path, self._root)
                    self._index[rel] = _Closed(path, rel, os.path.getsize(path), None, _start_ms(name, path))
        if self._index or parts:
            logger.info("archive: %d complete and %d partial files from an earlier run in %s",
                        len(self._index), len(parts), self._root)
        return sorted(parts)

    def _open_locked(self) -> bool:
        if self._closing:
            self._stats["lines_dropped_closed"] += 1
            self._log_error_rate_limited("archive: write after close; record dropped (counted)")
            return False
        self._opened_at = self._clock()
        self._start_ms = int(self._opened_at * 1000)
        raw = None
        while raw is None:
            self._seq += 1
            rel = relative_key(self.config, self._start_ms, self._pid, self._run_id, self._seq)
            part = os.path.join(self._root, rel + PART)
            try:
                os.makedirs(os.path.dirname(part), exist_ok=True)
                if os.path.exists(part[:-len(PART)]):
                    continue  # a name already used (same ms, pid and run): take the next seq
                raw = open(part, "xb")  # exclusive: never append to someone else's file
            except OSError as e:
                self._stats["lines_dropped_write_error"] += 1
                self._log_error_rate_limited(f"archive: cannot create {part} ({e}); record dropped (counted)")
                return False
        self._part, self._rel = part, rel
        self._sink = (_GzipSink if self.config.compress else _PlainSink)(raw, self.config.compress_level)
        self._file_lines = self._lines_at_sync = 0
        return True

    def _drain_locked(self) -> None:
        if self._buf:
            self._sink.write(b"".join(self._buf))  # on OSError the batch stays, for _write_failed_locked to count
            self._buf.clear()
            self._buf_bytes = 0

    def _rotate_locked(self) -> None:
        """Finishes the current file: trailer, fsync, rename .part → final (atomic), index it."""
        sink, part, rel = self._sink, self._part, self._rel
        self._drain_locked()
        sink.finish()
        os.fsync(sink.raw.fileno())
        sink.raw.close()
        self._sink = None
        final = part[:-len(PART)]
        os.rename(part, final)
        _fsync_dir(os.path.dirname(final))
        self._index[rel] = _Closed(final, rel, sink.size, self._file_lines, self._start_ms)
        self._stats["files_closed"] += 1
        self._stats["lines_flushed"] = self._stats["lines_written"]

    def _write_failed_locked(self, e: OSError) -> None:
        """Disk full or I/O error: the lines not yet in the file are dropped (counted) and the file is given up:
        closed if it still can be, else left as .part for the next start to recover."""
        lost = sum(chunk.count(b"\n") for chunk in self._buf)  # chunks of lines
        self._buf.clear()
        self._buf_bytes = 0
        self._stats["lines_dropped_write_error"] += lost
        self._log_error_rate_limited(f"archive: write to {self._part} failed ({e}); {lost} lines dropped (counted)")
        sink, self._sink = self._sink, None
        if sink is None:
            return
        try:
            sink.finish()
            sink.raw.close()
            os.rename(self._part, self._part[:-len(PART)])
            self._index[self._rel] = _Closed(self._part[:-len(PART)], self._rel, sink.size,
                                             self._file_lines - lost, self._start_ms)
            self._stats["files_closed"] += 1
        except OSError:
            try:
                sink.raw.close()
            except OSError:
                pass
            logger.error("archive: left %s for recovery at the next start", self._part)

    def _log_error_rate_limited(self, message: str) -> None:
        now = time.monotonic()
        if now - self._error_logged_at >= 10:
            self._error_logged_at = now
            logger.error(message)

    def _sync(self, force: bool) -> None:
        """Sync-flushes the deflate stream under the lock; fsyncs outside it (on a dup of the descriptor, which
        stays valid if the file rotates meanwhile) so writers never wait for the disk."""
        with self._lock:
            if self._sink is None or (not force and self._stats["lines_written"] == self._lines_at_sync):
                return
            written = self._stats["lines_written"]
            try:
                self._drain_locked()
                self._sink.sync()
                fd = os.dup(self._sink.raw.fileno())
            except OSError as e:
                self._write_failed_locked(e)
                return
            self._lines_at_sync = written
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            self._stats["lines_flushed"] = max(self._stats["lines_flushed"], written)

    # ---- flusher and housekeeper threads ---------------------------------------------------------------------

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.config.flush_seconds):
            try:
                self._sync(force=False)
                with self._lock:
                    # size too: a sync flush makes the size exact, and writes may have stopped right after it
                    if self._sink is not None and (self._clock() - self._opened_at >= self.config.rotate_seconds
                                                   or self._sink.size >= self.config.rotate_bytes):
                        try:
                            self._rotate_locked()
                        except OSError as e:
                            self._write_failed_locked(e)
            except Exception:  # thread boundary: keep flushing whatever went wrong once
                logger.exception("archive: periodic flush failed; retrying at the next tick")

    def _housekeep_loop(self, leftover_parts: list[str]) -> None:
        try:
            for part in leftover_parts:
                if self._stop.is_set():
                    return
                self._recover(part)
        except Exception:
            logger.exception("archive: recovery of files from an earlier run failed; they stay for the next start")
        while not self._stop.wait(self.config.flush_seconds):
            try:
                self._enforce_limits()
            except Exception:
                logger.exception("archive: quota/retention check failed; retrying at the next tick")

    def _recover(self, part: str) -> None:
        """Rebuilds a killed writer's .part into a complete file of its whole lines, under the same key."""
        final = part[:-len(PART)]
        tmp = final + _RECOVER
        with open(part, "rb") as src, open(tmp, "wb") as raw:
            reader = LineReader(src, part, on_error=lambda f, n, m: logger.warning("archive: %s:%d: %s", f, n, m),
                                complete_lines_only=True)
            sink = (_GzipSink if final.endswith(".gz") else _PlainSink)(raw, self.config.compress_level)
            batch, lines = [], 0
            for _, line in reader:
                batch.append(line + b"\n")
                lines += 1
                if len(batch) >= 4096:
                    sink.write(b"".join(batch))
                    batch.clear()
            sink.write(b"".join(batch))
            sink.finish()
            os.fsync(raw.fileno())
        partial = 1 if reader.partial_bytes else 0
        if lines:
            os.rename(tmp, final)
            _fsync_dir(os.path.dirname(final))
        else:
            os.unlink(tmp)
        os.unlink(part)
        rel = os.path.relpath(final, self._root)
        with self._lock:
            if lines:
                self._index[rel] = _Closed(final, rel, sink.size, lines, _start_ms(final, final))
                self._stats["files_recovered"] += 1
                self._stats["lines_recovered"] += lines
            self._stats["partial_lines_dropped"] += partial
        logger.warning("archive: recovered %s from an interrupted writer: %d whole lines%s", rel, lines,
                       ", incomplete last line dropped (counted)" if partial else "")

    def _enforce_limits(self) -> None:
        """Retention first (age by start time), then quota (oldest first); a file being uploaded is skipped."""
        cfg = self.config
        cutoff_ms = (self._clock() - cfg.retention_days * 86400) * 1000
        victims: list[tuple[_Closed, str]] = []
        with self._lock:
            total = sum(e.size for e in self._index.values()) + (self._sink.size if self._sink else 0)
            if total <= cfg.quota_bytes and all(e.start_ms >= cutoff_ms for e in self._index.values()):
                return  # the common case, without sorting thousands of files every tick
            entries = sorted((e for e in self._index.values() if not e.in_flight), key=lambda e: (e.start_ms, e.rel))
            for e in entries:
                if e.start_ms < cutoff_ms:
                    victims.append((e, "retention"))
                elif total > cfg.quota_bytes:
                    victims.append((e, "quota"))
                else:
                    continue
                total -= e.size
            for e, _ in victims:
                del self._index[e.rel]  # out of the index first: the uploader can no longer pick it
        for e, reason in victims:
            lines = e.lines if e.lines is not None else _count_lines(e.path)
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass
            with self._lock:
                self._stats[f"files_dropped_{reason}"] += 1
                self._stats[f"lines_dropped_{reason}"] += lines
                self._prune_dirs_locked(e.path)
            why = (f"quota of {cfg.quota_bytes} bytes reached" if reason == "quota"
                   else f"older than {cfg.retention_days:g} days")
            logger.warning("archive: dropped %s (%d lines, %d bytes, not %s): %s", e.rel, lines, e.size,
                           "uploaded" if cfg.is_s3 else "kept", why)

    def _prune_dirs_locked(self, path: str) -> None:
        # Under the lock: the writer's makedirs + open of a new file happens under it too, so no race.
        d = os.path.dirname(path)
        while d != self._root and d.startswith(self._root):
            try:
                os.rmdir(d)
            except OSError:
                return
            d = os.path.dirname(d)

    # ---- upload thread --------------------------------------------------------------------------------------

    def _key(self, rel: str) -> str:
        return f"{self._prefix}/{rel}" if self._prefix else rel

    def _next_pending(self) -> _Closed | None:
        with self._lock:
            waiting = [e for e in self._index.values() if not e.in_flight]
            if not waiting:
                return None
            entry = min(waiting, key=lambda e: (e.start_ms, e.rel))
            entry.in_flight = True
            return entry

    def _upload_loop(self) -> None:
        cfg = self.config
        backoff = cfg.backoff_initial_seconds
        while True:
            entry = self._next_pending()
            if entry is None:
                if self._stop.is_set():
                    return
                self._stop.wait(min(cfg.flush_seconds, 0.5))
                continue
            try:
                ok = self._upload(entry)
            except Exception:  # thread boundary: a bug must not end uploading; the file stays and is retried
                logger.exception("archive: upload of %s failed unexpectedly", entry.rel)
                ok = False
                with self._lock:
                    self._stats["upload_failures"] += 1
            finally:
                entry.in_flight = False
            if ok:
                backoff = cfg.backoff_initial_seconds
                continue
            if self._abandon.is_set():
                return  # close_timeout passed: the rest waits in the buffer for the next run
            # While running, the stop event cuts the wait short (close() begins the drain); while draining,
            # the abandon event does, and waits are short so that the drain gets several tries.
            draining = self._stop.is_set()
            wait = backoff * random.uniform(0.5, 1.0)  # jitter: sidecars recovering from an outage together
            (self._abandon if draining else self._stop).wait(min(wait, 1.0) if draining else wait)
            backoff = min(backoff * 2, cfg.backoff_max_seconds)

    def _upload(self, entry: _Closed) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError
        from boto3.exceptions import S3UploadFailedError
        cfg = self.config
        key = self._key(entry.rel)
        where = f"s3://{self._bucket}/{key}"
        try:
            size = os.path.getsize(entry.path)
            etag = (expected_etag(entry.path, size, cfg.multipart_threshold_bytes, cfg.multipart_chunksize_bytes)
                    if cfg.verify_etag else None)
        except FileNotFoundError:
            logger.error("archive: %s vanished from the buffer before upload (deleted by someone else)", entry.path)
            with self._lock:
                self._index.pop(entry.rel, None)
            return True
        extra = {"ContentType": "application/gzip" if entry.rel.endswith(".gz") else "application/x-ndjson"}
        if entry.lines is not None:
            extra["Metadata"] = {"lines": str(entry.lines)}
        try:
            self._s3.upload_file(entry.path, self._bucket, key, ExtraArgs=extra, Config=self._transfer)
            head = self._s3.head_object(Bucket=self._bucket, Key=key)
        except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as e:
            with self._lock:
                self._stats["upload_failures"] += 1
            logger.warning("archive: upload to %s failed, kept locally, will retry: %s", where, _describe(e))
            return False
        got_etag = head.get("ETag", "").strip('"')
        if head.get("ContentLength") != size or (etag is not None and got_etag != etag):
            with self._lock:
                self._stats["upload_failures"] += 1
            logger.warning("archive: %s not confirmed (size %s, ETag %s; expected %d, %s); kept, will retry",
                           where, head.get("ContentLength"), got_etag, size, etag or "any")
            return False
        os.unlink(entry.path)  # only now: the object is confirmed
        with self._lock:
            self._index.pop(entry.rel, None)
            self._prune_dirs_locked(entry.path)
            self._stats["files_uploaded"] += 1
            self._stats["bytes_uploaded"] += size
        logger.info("archive: uploaded %s (%d bytes, %s lines)", where, size,
                    entry.lines if entry.lines is not None else "?")
        return True
