"""Decoding ring-buffer records from bytes, and the reader's handling of bad records (no kernel needed)."""

import ctypes

import numpy as np
import pytest

from otel_cuda import events, probes
from otel_cuda.records import to_record
from otel_cuda.ringbuf import frame
from otel_cuda.source import RingReader


def call_bytes(func="cuMemcpyDtoHAsync_v2", result=0, dur=5300, args=(0x7F0000001000, 0x7F0000000000, 4096, 5, 0, 0),
               flags=events.F_RETURN):
    c = events.Call()
    c.h.type, c.h.flags, c.h.func, c.h.pid, c.h.tid, c.h.ts_ns = events.EV_CALL, flags, probes.BY_SYMBOL[func].func_id, 42, 43, 1000
    c.dur_ns, c.result = dur, result
    for i, a in enumerate(args):
        c.args[i] = a
    return bytes(c)


def launch_bytes(handle=0x1000, flags=0):
    e = events.Launch()
    e.h.flags = flags
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


def reader_of(chunks, min_run=16):
    delivered = []
    reader = RingReader(lambda timeout: chunks.pop(0) if chunks else b"", lambda chunk, n: chunk,
                        lambda n: released.append(n),
                        events.decode, delivered.extend, lambda run: delivered.append(run), min_run=min_run)
    released: list[int] = []
    return reader, delivered, released


def test_reader_counts_bad_records_and_delivers_the_rest():
    reader, delivered, released = reader_of([frame([call_bytes(), b"\x07junk", launch_bytes()])])
    assert reader.pump(0) == 3
    assert [e.type for e in delivered] == [events.EV_CALL, events.EV_LAUNCH]
    assert reader.counters.decode_errors == 1 and reader.counters.records == 3
    assert released == [96 + 16 + 96]  # the 5-byte junk record takes 16: all parsed
    reader.drain()  # empty batch ends the drain


def test_reader_stops_at_a_record_not_yet_submitted_and_skips_discarded_ones():
    busy = bytearray(frame([launch_bytes()]))
    busy[3] |= 0x80  # BUSY: reserved, not yet submitted
    discarded = bytearray(frame([call_bytes()]))
    discarded[3] |= 0x40
    reader, delivered, released = reader_of([bytes(discarded) + frame([call_bytes()]) + bytes(busy)])
    assert reader.pump(0) == 1
    assert [e.type for e in delivered] == [events.EV_CALL]
    assert released == [2 * 96]  # the busy record is read again next time


def test_reader_hands_runs_of_plain_launches_over_as_arrays_in_order():
    plain = [launch_bytes() for _ in range(20)]
    recs = [call_bytes()] + plain + [launch_bytes(flags=events.F_RETURN)] + plain[:3] + [name_bytes()] + plain
    reader, delivered, released = reader_of([frame(recs)])
    assert reader.pump(0) == len(recs)
    kinds = [("run", len(d)) if isinstance(d, np.ndarray) else d.type for d in delivered]
    # the three launches between the return-probed one and the name are too few for an array
    assert kinds == [events.EV_CALL, ("run", 20), events.EV_LAUNCH, *[events.EV_LAUNCH] * 3, events.EV_NAME,
                     ("run", 20)]
    run = delivered[1]
    assert run["pid"].tolist() == [ev.pid for ev in map(events.decode, plain)]
    assert reader.counters.launch_runs == 2 and reader.counters.launches_in_runs == 40


def test_records_submitted_while_being_copied_are_parsed_from_the_settled_copy():
    """The first copy of a record can hold its header as submitted and its data from before (ringbuf.py): the reader
    parses the copy the ring confirms, not the first."""
    stale = frame([call_bytes(dur=1), launch_bytes()])
    fresh = frame([call_bytes(dur=5300), launch_bytes()])
    delivered = []
    reader = RingReader(lambda timeout: stale, lambda chunk, n: fresh, lambda n: None, events.decode,
                        delivered.extend, delivered.append)
    assert reader.pump(0) == 2
    assert [e.dur_ns for e in delivered] == [5300, 0]
