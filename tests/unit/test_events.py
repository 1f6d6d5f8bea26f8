"""Decoding ring-buffer records from bytes, and the reader's handling of bad records (no kernel needed)."""

import ctypes

import pytest

from otel_cuda import events, probes
from otel_cuda.records import to_record
from otel_cuda.source import RingReader


def call_bytes(func="cuMemcpyDtoHAsync_v2", result=0, dur=5300, args=(0x7F0000001000, 0x7F0000000000, 4096, 5, 0, 0),
               flags=events.F_RETURN):
    c = events.Call()
    c.h.type, c.h.flags, c.h.func, c.h.pid, c.h.tid, c.h.ts_ns = events.EV_CALL, flags, probes.BY_SYMBOL[func].func_id, 42, 43, 1000
    c.dur_ns, c.result = dur, result
    for i, a in enumerate(args):
        c.args[i] = a
    return bytes(c)


def launch_bytes(handle=0x1000):
    e = events.Launch()
    e.h.type, e.h.func, e.h.pid, e.h.tid, e.h.ts_ns = events.EV_LAUNCH, 1, 42, 43, 2000
    e.result, e.handle, e.stream, e.shared_mem = -1, handle, 5, 128
    e.grid[:] = [128, 1, 1]
    e.block[:] = [256, 1, 1]
    return bytes(e)


def name_bytes(name=b"flash_fwd_kernel", handle=0x1000):
    n = events.Name()
    n.h.type, n.h.flags, n.h.func, n.h.pid, n.h.tid = events.EV_NAME, events.F_RETURN, 60, 42, 43
    n.handle, n.parent, n.name = handle, 0x99, name
    return bytes(n)


def test_call_record_decodes_to_named_args():
    ev = events.decode(call_bytes())
    rec = to_record(ev, epoch_offset_ns=10**18, kernel=None, step=7)
    assert rec["func"] == "cuMemcpyDtoHAsync_v2" and rec["phase"] == "call" and rec["dur_ns"] == 5300
    assert rec["ts"] == 10**18 + 1000 and rec["result"] == "CUDA_SUCCESS" and rec["step"] == 7
    assert rec["args"] == {"dst": "0x7f0000001000", "src": "0x7f0000000000", "bytes": 4096, "stream": "0x5",
                           "kind": "dtoh"}


def test_launch_and_name_records():
    launch = events.decode(launch_bytes())
    rec = to_record(launch, 0, kernel="flash_fwd_kernel", step=1)
    assert rec["phase"] == "entry" and rec["result"] is None and rec["dur_ns"] is None
    assert rec["args"] == {"function": "0x1000", "grid": [128, 1, 1], "block": [256, 1, 1], "shared_mem": 128,
                           "stream": "0x5"}
    name = events.decode(name_bytes())
    assert name.name == "flash_fwd_kernel" and name.args == (0x1000, 0x99, 0)


def test_failed_call_keeps_its_cuda_result_name():
    ev = events.decode(call_bytes(func="cuMemAlloc_v2", result=2, args=(0, 1 << 40, 0, 0, 0, 0)))
    assert to_record(ev, 0, None, None)["result"] == "CUDA_ERROR_OUT_OF_MEMORY"
    assert probes.result_name(12345) == "CUDA_ERROR_12345"


@pytest.mark.parametrize("bad", [b"", b"\x09" + bytes(40), call_bytes()[:20]])
def test_bad_records_raise_decode_error(bad):
    with pytest.raises(events.DecodeError):
        events.decode(bad)


def test_reader_counts_bad_records_and_delivers_the_rest():
    batches = [[call_bytes(), b"\x07junk", launch_bytes()], []]
    delivered = []
    reader = RingReader(lambda timeout: batches.pop(0) if batches else [], events.decode, delivered.extend)
    assert reader.pump(0) == 3
    assert [e.type for e in delivered] == [events.EV_CALL, events.EV_LAUNCH]
    assert reader.counters.decode_errors == 1 and reader.counters.records == 3
    reader.drain()  # empty batch ends the drain
