"""archive_read: damaged files are reported once with file and line, and their readable part is still read."""

import gzip
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from otel_cuda.archive_read import LineReader, iter_records  # noqa: E402


def lines(n, start=0):
    return b"".join(json.dumps({"v": 1, "type": "cuda_api", "seq": i, "pad": "x" * 50}).encode() + b"\n"
                    for i in range(start, start + n))


class Errors(list):
    def __call__(self, source, line_no, message):
        self.append((source, line_no, message))


def read(paths):
    errors = Errors()
    return [r.get("seq") for r in iter_records(paths, on_error=errors)], errors


def test_truncated_gzip_yields_the_readable_part_and_one_message(tmp_path):
    data = gzip.compress(lines(2000), compresslevel=1)
    f = tmp_path / "t.jsonl.gz"
    f.write_bytes(data[: len(data) * 6 // 10])
    got, errors = read(str(f))
    assert 0 < len(got) < 2000 and got == list(range(len(got)))
    [(source, line_no, message)] = errors
    assert source == str(f) and line_no == len(got) + 1
    assert "truncated gzip" in message


def test_corrupt_gzip_keeps_what_decoded_before_the_damage(tmp_path):
    data = bytearray(gzip.compress(lines(2000), compresslevel=1))
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    f = tmp_path / "c.jsonl.gz"
    f.write_bytes(bytes(data))
    got, errors = read(str(f))
    assert got[:10] == list(range(10))
    assert len(errors) >= 1 and all(e[0] == str(f) for e in errors)
    assert any("corrupt gzip" in m or "bad JSON" in m for _, _, m in errors)


def test_bad_json_lines_are_reported_with_their_line_number_and_skipped(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_bytes(lines(2) + b'{"v":1,"type":\n' + b"[1,2]\n" + b"\n" + lines(1, start=2))
    got, errors = read(str(f))
    assert got == [0, 1, 2]
    assert [(e[1], e[2].split(" (")[0]) for e in errors] == [(3, "bad JSON line"), (4, "not a JSON object")]


def test_plain_file_without_final_newline_is_whole(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(lines(3).rstrip(b"\n"))
    assert read(str(f)) == ([0, 1, 2], [])


def test_concatenated_gzip_members_and_gzip_detected_by_content(tmp_path):
    f = tmp_path / "cat.data"  # any name: gzip is recognised by its magic bytes
    f.write_bytes(gzip.compress(lines(3)) + gzip.compress(lines(2, start=3)))
    assert read(str(f)) == ([0, 1, 2, 3, 4], [])


def test_garbage_after_the_gzip_stream_is_reported(tmp_path):
    f = tmp_path / "g.jsonl.gz"
    f.write_bytes(gzip.compress(lines(3)) + b"garbage")
    got, errors = read(str(f))
    assert got == [0, 1, 2] and "trailing bytes" in errors[0][2]


def test_directory_reads_archive_files_in_path_order_and_skips_part_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "2.jsonl.gz").write_bytes(gzip.compress(lines(2, start=4)))
    (tmp_path / "a" / "1.jsonl").write_bytes(lines(2, start=2))
    (tmp_path / "a" / "0.jsonl.gz").write_bytes(gzip.compress(lines(2)))
    (tmp_path / "a" / "9.jsonl.gz.part").write_bytes(b"in progress")
    (tmp_path / "a" / "notes.txt").write_bytes(b"not an archive file")
    assert read(str(tmp_path)) == ([0, 1, 2, 3, 4, 5], [])


def test_missing_path_and_empty_directory_are_reported(tmp_path):
    got, errors = read([str(tmp_path / "nope.jsonl"), str(tmp_path)])
    assert got == []
    assert [e[0] for e in errors] == [str(tmp_path / "nope.jsonl"), str(tmp_path)]


def test_line_reader_complete_lines_only_drops_an_unterminated_tail():
    reader = LineReader(io.BytesIO(lines(2) + b'{"v":1'), "x", on_error=Errors(), complete_lines_only=True)
    assert [n for n, _ in reader] == [1, 2]
    assert reader.damaged and reader.partial_bytes == 6
