"""Read archived events back: directories, files (.jsonl, .jsonl.gz) and s3://bucket/prefix, damage tolerated.

Everything that reads the archive (`analyze`, `timeline`, the writer's own crash recovery) goes through
`LineReader`, so a truncated or corrupt file means the same thing everywhere: the readable part is used, and
each problem is reported once, with the file and the line number, to an `on_error(source, line_no, message)`
callback. A problem never stops the reading of the next file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

logger = logging.getLogger(__name__)

OnError = Callable[[str, int, str], None]

GZIP_MAGIC = b"\x1f\x8b"
ARCHIVE_SUFFIXES = (".jsonl.gz", ".jsonl")
_CHUNK = 1 << 20


def log_error(source: str, line_no: int, message: str) -> None:
    """The default `on_error`: one warning per problem."""
    logger.warning("%s:%d: %s", source, line_no, message)


class LineReader:
    """Iterates `(line_no, line_bytes)` over a plain or gzip stream (gzip found by its magic, not its name).

    Multi-member gzip (`cat a.gz b.gz`) is read whole. When the stream is truncated or corrupt, the lines
    decoded before the damage are yielded, an incomplete last line is dropped, and one message says what
    happened. After iteration: `damaged` (the stream did not end cleanly) and `partial_bytes` (the size of a
    dropped incomplete last line; 0 if none). A complete stream's last line without a newline is a line, unless
    `complete_lines_only` (the writer's recovery of a killed file: a line is whole only with its newline).
    """

    def __init__(self, stream: BinaryIO, source: str, on_error: OnError = log_error, complete_lines_only=False):
        self.stream = stream
        self.source = source
        self.on_error = on_error
        self.complete_lines_only = complete_lines_only
        self.damaged = False
        self.partial_bytes = 0

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        problem: list[str] = []
        first = self.stream.read(_CHUNK)
        chunks = self._gunzip(first, problem) if first[:2] == GZIP_MAGIC else self._plain(first)
        line_no = 0
        pending = b""
        for data in chunks:
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            for line in lines:
                line_no += 1
                yield line_no, line
        if pending and self.complete_lines_only and not problem:
            problem.append("no newline at the end")
        if problem:
            self.damaged = True
            if pending:
                self.partial_bytes = len(pending)
                self.on_error(self.source, line_no + 1,
                              f"{problem[0]}; incomplete last line dropped ({len(pending)} bytes)")
            else:
                self.on_error(self.source, line_no + 1,
                              f"{problem[0]} after line {line_no}" if line_no else f"{problem[0]}; no line in it")
        elif pending:
            yield line_no + 1, pending

    def _plain(self, first: bytes) -> Iterator[bytes]:
        data = first
        while data:
            yield data
            data = self.stream.read(_CHUNK)

    def _gunzip(self, first: bytes, problem: list[str]) -> Iterator[bytes]:
        z = zlib.decompressobj(31)
        data = first
        while True:
            out, error, z = _inflate(z, data)
            if out:
                yield out
            if error:
                problem.append(f"corrupt gzip data ({error})")
                return
            if z.eof:
                # Member done: the rest may be another member (concatenated files) or trailing garbage.
                rest = z.unused_data
                if not rest:
                    rest = self.stream.read(_CHUNK)
                    if not rest:
                        return
                if rest[:2] != GZIP_MAGIC:
                    problem.append("trailing bytes after the end of the gzip stream")
                    return
                z = zlib.decompressobj(31)
                data = rest
                continue
            data = self.stream.read(_CHUNK)
            if not data:
                out = z.flush()
                if out:
                    yield out
                problem.append("truncated gzip stream (ends before its end marker)")
                return


def _inflate(z, data: bytes):
    """Decompresses a chunk; on corrupt data, redoes the chunk in small steps from a copy of the state taken before
    it, so the output decoded up to the damage is kept (a single call would lose the whole chunk's output)."""
    saved = z.copy()
    try:
        return z.decompress(data), None, z
    except zlib.error:
        pass
    z, outs = saved, []
    for i in range(0, len(data), 512):
        try:
            outs.append(z.decompress(data[i:i + 512]))
        except zlib.error as e:
            return b"".join(outs), e, z
    return b"".join(outs), None, z  # not reached: the same bytes failed as a whole


def parse_lines(lines: Iterable[tuple[int, bytes]], source: str, on_error: OnError,
                max_reports: int = 10) -> Iterator[dict]:
    """JSON-decodes lines; a bad line is reported and skipped. Blank lines are skipped silently. After
    `max_reports` bad lines in one source (a corrupt stream decodes to garbage for a while) the rest are summed
    up in one message instead of one each."""
    loads = json.loads
    reported = 0
    unreported: list[int] = []

    def bad(line_no: int, message: str) -> None:
        nonlocal reported
        if reported < max_reports:
            reported += 1
            on_error(source, line_no, message)
        else:
            unreported.append(line_no)

    for line_no, line in lines:
        if not line.strip():
            continue
        try:
            record = loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            bad(line_no, f"bad JSON line ({e})")
            continue
        if not isinstance(record, dict):
            bad(line_no, f"not a JSON object ({type(record).__name__})")
            continue
        yield record
    if unreported:
        on_error(source, unreported[0], f"{len(unreported)} more bad lines (lines {unreported[0]}–{unreported[-1]}) "
                                        "not shown one by one")


def is_archive_name(name: str) -> bool:
    return name.endswith(ARCHIVE_SUFFIXES) and not name.startswith(".")


def local_files(path: str) -> list[str]:
    """Archive files under a directory, sorted by path (the layout sorts by node, namespace, pod, time).

    `.part` files (still being written, or left by a killed writer until its next start recovers them) are
    not read; name one explicitly to read it.
    """
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, f) for f in files if is_archive_name(f))
    return sorted(found)


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` → (`bucket`, `some/prefix`)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url}")
    return bucket, prefix.strip("/")


def s3_keys(s3_client, bucket: str, prefix: str) -> list[str]:
    """Archive object keys under a prefix, sorted (list_objects_v2 already returns them in key order)."""
    keys = []
    list_prefix = f"{prefix}/" if prefix else ""
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=list_prefix):
        keys.extend(o["Key"] for o in page.get("Contents", ()) if is_archive_name(o["Key"].rsplit("/", 1)[-1]))
    if not keys and prefix and is_archive_name(prefix.rsplit("/", 1)[-1]):
        keys = [prefix]  # the URL names one object
    return sorted(keys)


def iter_records(paths_or_urls: Iterable[str] | str, s3_client=None, on_error: OnError = log_error) -> Iterator[dict]:
    """Yields archived records, file by file in path/key order, from directories, files, `-` (stdin) and
    `s3://bucket/prefix` URLs (every archive object under the prefix). Damage is reported to `on_error` and
    the readable part is still yielded. `s3_client` is created from the standard credential chain when an
    s3:// URL needs one and none was given.
    """
    if isinstance(paths_or_urls, str):
        paths_or_urls = [paths_or_urls]
    for item in paths_or_urls:
        if item.startswith("s3://"):
            if s3_client is None:
                import boto3  # only when S3 is read: local reading needs no AWS libraries configured
                s3_client = boto3.client("s3")
            yield from _s3_records(s3_client, item, on_error)
        elif item == "-":
            yield from _stream_records(sys.stdin.buffer, "<stdin>", on_error)
        elif os.path.isdir(item):
            files = local_files(item)
            if not files:
                on_error(item, 0, "no archive files (*.jsonl, *.jsonl.gz) in this directory")
            for path in files:
                yield from _file_records(path, on_error)
        else:
            yield from _file_records(item, on_error)


def _stream_records(stream: BinaryIO, source: str, on_error: OnError) -> Iterator[dict]:
    yield from parse_lines(LineReader(stream, source, on_error), source, on_error)


def _file_records(path: str, on_error: OnError) -> Iterator[dict]:
    try:
        f = open(path, "rb")
    except OSError as e:
        on_error(path, 0, f"cannot open ({e.strerror or e})")
        return
    with f:
        try:
            yield from _stream_records(f, path, on_error)
        except OSError as e:  # an I/O error mid-file: keep what was read, go on with the next file
            on_error(path, 0, f"read error ({e.strerror or e})")


def _s3_records(s3_client, url: str, on_error: OnError) -> Iterator[dict]:
    from botocore.exceptions import BotoCoreError, ClientError
    try:
        bucket, prefix = split_s3_url(url)
        keys = s3_keys(s3_client, bucket, prefix)
    except (ValueError, BotoCoreError, ClientError) as e:
        on_error(url, 0, f"cannot list ({e})")
        return
    if not keys:
        on_error(url, 0, "no archive objects (*.jsonl, *.jsonl.gz) under this prefix")
    for key in keys:
        source = f"s3://{bucket}/{key}"
        try:
            body = s3_client.get_object(Bucket=bucket, Key=key)["Body"]
            with body:
                yield from _stream_records(body, source, on_error)
        except (BotoCoreError, ClientError, OSError) as e:
            on_error(source, 0, f"cannot read ({e})")


class ErrorPrinter:
    """An `on_error` for the command line: one line per problem on stderr, `prog: file:line: message`."""

    def __init__(self, prog: str, stream=None):
        self.prog = prog
        self.stream = stream
        self.count = 0

    def __call__(self, source: str, line_no: int, message: str) -> None:
        self.count += 1
        where = f"{source}:{line_no}" if line_no else source
        print(f"{self.prog}: {where}: {message}", file=self.stream or sys.stderr)


def add_input_arguments(parser) -> None:
    """The input arguments `analyze` and `timeline` share."""
    parser.add_argument("paths", nargs="+", metavar="PATH|s3://BUCKET/PREFIX",
                        help="archive files (.jsonl, .jsonl.gz), directories (read recursively), - for stdin, "
                             "or s3:// prefixes")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3-compatible endpoint for s3:// inputs (default: the AWS config / AWS_ENDPOINT_URL)")


def s3_client_for(paths: Iterable[str], endpoint_url: str | None):
    """A boto3 client (standard credential chain) if any input is on S3, else None."""
    if not any(p.startswith("s3://") for p in paths):
        return None
    import boto3
    return boto3.client("s3", endpoint_url=endpoint_url)
