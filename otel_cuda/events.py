"""ctypes mirrors of bpf/otel_cuda.h and the decoded event type.

The ctypes structures are the contract's mirror (tests/unit/test_contract.py compiles the C header and compares
sizes and offsets); decoding uses precompiled `struct` formats derived from them, because the ring-buffer
reader decodes tens of thousands of events a second and `struct.unpack_from` is several times cheaper than
ctypes `from_buffer_copy`.
"""

from __future__ import annotations

import ctypes as ct
import struct
from typing import NamedTuple

import numpy as np

OC_ARGS = 6
OC_NAME_LEN = 256
OC_HIST_BUCKETS = 32

EV_CALL, EV_LAUNCH, EV_NAME, EV_SYS, EV_PROC = 1, 2, 3, 4, 5
PROC_EXEC, PROC_FORK = 1, 2
LAYER_DRIVER, LAYER_RUNTIME = 0, 1
F_RETURN, F_NESTED, F_TRUNCATED, F_NAME_UNREAD = 1, 2, 4, 8
LOST_RINGBUF, LOST_TABLE = 0, 1  # slots of the kernel's `lost` counters (enum oc_lost)


class Header(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint8),
        ("layer", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("_pad0", ct.c_uint8),
        ("func", ct.c_uint16),
        ("_pad1", ct.c_uint16),
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("ts_ns", ct.c_uint64),
    ]


class Call(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("dur_ns", ct.c_uint64),
        ("result", ct.c_int32),
        ("_pad0", ct.c_uint32),
        ("args", ct.c_uint64 * OC_ARGS),
    ]


class Launch(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("dur_ns", ct.c_uint64),
        ("result", ct.c_int32),
        ("shared_mem", ct.c_uint32),
        ("handle", ct.c_uint64),
        ("stream", ct.c_uint64),
        ("grid", ct.c_uint32 * 3),
        ("block", ct.c_uint32 * 3),
        ("_pad1", ct.c_uint64),
    ]


class Name(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("dur_ns", ct.c_uint64),
        ("result", ct.c_int32),
        ("_pad0", ct.c_uint32),
        ("handle", ct.c_uint64),
        ("parent", ct.c_uint64),
        ("name_addr", ct.c_uint64),
        ("name", ct.c_char * OC_NAME_LEN),
    ]


class Sys(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("dur_ns", ct.c_uint64),
        ("result", ct.c_int64),
        ("args", ct.c_uint64 * 4),
        ("path", ct.c_char * OC_NAME_LEN),
    ]


class Proc(ct.Structure):
    _fields_ = [("h", Header), ("child_pid", ct.c_uint32), ("selected", ct.c_uint8), ("_pad0", ct.c_uint8 * 3)]


OC_LAUNCH_FUNCS = 4  # launch functions counted in `targets`: func ids 1..4 (cuLaunchKernel .. cuGraphLaunch)
FIRST_LAUNCH_FUNC = 1  # OC_FN_cuLaunchKernel


class Target(ct.Structure):
    _fields_ = [("launches", ct.c_uint64 * OC_LAUNCH_FUNCS)]


class StatKey(ct.Structure):
    _fields_ = [("pid", ct.c_uint32), ("func", ct.c_uint16), ("variant", ct.c_uint16)]


class KernelKey(ct.Structure):
    _fields_ = [("pid", ct.c_uint32), ("func", ct.c_uint16), ("_pad0", ct.c_uint16), ("handle", ct.c_uint64)]


class Stat(ct.Structure):
    _fields_ = [
        ("calls", ct.c_uint64),
        ("errors", ct.c_uint64),
        ("total_ns", ct.c_uint64),
        ("bytes", ct.c_uint64),
        ("hist", ct.c_uint64 * OC_HIST_BUCKETS),
    ]


class LiveKey(ct.Structure):
    _fields_ = [("pid", ct.c_uint32), ("mem_type", ct.c_uint32)]


class Event(NamedTuple):
    """One probed call, decoded. `args` depends on `type`:
    EV_CALL: the six captured slots (meaning per function in probes.py);
    EV_LAUNCH: (handle, stream, grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_mem);
    EV_NAME: (handle, parent, name address) with `name` set; EV_SYS: four slots (see system.py) with `name` = path;
    EV_PROC: (child pid, selected in the kernel)."""

    type: int
    layer: int
    flags: int
    func: int
    pid: int
    tid: int
    ts_ns: int
    dur_ns: int
    result: int
    args: tuple
    name: str = ""

    @property
    def has_return(self) -> bool:
        return bool(self.flags & F_RETURN)

    @property
    def nested(self) -> bool:
        return bool(self.flags & F_NESTED)


# Precompiled layouts (little-endian, as the kernel writes them on every supported architecture).
_HEADER = "<BBBxHxxIIQ"
_CALL = struct.Struct(_HEADER + "Qi4x" + "6Q")
_LAUNCH = struct.Struct(_HEADER + "QiIQQ3I3I8x")
_NAME = struct.Struct(_HEADER + "Qi4xQQQ%ds" % OC_NAME_LEN)
_SYS = struct.Struct(_HEADER + "Qq4Q%ds" % OC_NAME_LEN)
_PROC = struct.Struct(_HEADER + "IB3x")


class DecodeError(ValueError):
    pass


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode(data: bytes, offset: int = 0) -> Event:
    """Decode one ring-buffer record (at `offset` in `data`). Raises DecodeError for a record that matches no struct
    of the contract."""
    if len(data) <= offset:
        raise DecodeError("empty record")
    kind = data[offset]
    try:
        if kind == EV_LAUNCH:
            t, layer, flags, func, pid, tid, ts, dur, res, shmem, handle, stream, gx, gy, gz, bx, by, bz = (
                _LAUNCH.unpack_from(data, offset)
            )
            return Event(t, layer, flags, func, pid, tid, ts, dur, res, (handle, stream, gx, gy, gz, bx, by, bz, shmem))
        if kind == EV_CALL:
            t, layer, flags, func, pid, tid, ts, dur, res, *args = _CALL.unpack_from(data, offset)
            return Event(t, layer, flags, func, pid, tid, ts, dur, res, tuple(args))
        if kind == EV_NAME:
            t, layer, flags, func, pid, tid, ts, dur, res, handle, parent, name_addr, name = _NAME.unpack_from(data,
                                                                                                              offset)
            return Event(t, layer, flags, func, pid, tid, ts, dur, res, (handle, parent, name_addr), _cstr(name))
        if kind == EV_SYS:
            t, layer, flags, func, pid, tid, ts, dur, res, a0, a1, a2, a3, path = _SYS.unpack_from(data, offset)
            return Event(t, layer, flags, func, pid, tid, ts, dur, res, (a0, a1, a2, a3), _cstr(path))
        if kind == EV_PROC:
            t, layer, flags, func, pid, tid, ts, child, selected = _PROC.unpack_from(data, offset)
            return Event(t, layer, flags, func, pid, tid, ts, 0, 0, (child, selected))
    except struct.error as exc:
        raise DecodeError(f"record of type {kind} is {len(data) - offset} bytes: {exc}") from None
    raise DecodeError(f"unknown record type {kind} ({len(data) - offset} bytes)")


SIZES = {EV_CALL: _CALL.size, EV_LAUNCH: _LAUNCH.size, EV_NAME: _NAME.size, EV_SYS: _SYS.size, EV_PROC: _PROC.size}

# Call and launch records have one size (bpf/otel_cuda.h asserts it), so a run of them in the ring buffer is an
# array with a fixed stride: FRAMED_LAUNCH views it, the kernel's 8-byte framing header included, without a Python
# call per record (source.py). Fields of a launch record; for call records only the header fields mean anything.
FIXED_SIZE = _CALL.size
FRAMED_STRIDE = (FIXED_SIZE + 8 + 7) & ~7
_F = 8  # the framing header comes first
FRAMED_LAUNCH = np.dtype({
    "names": ["len", "type", "flags", "func", "pid", "tid", "ts", "shmem", "handle", "stream",
              "gx", "gy", "gz", "bx", "by", "bz"],
    "formats": ["<u4", "u1", "u1", "<u2", "<u4", "<u4", "<u8", "<u4", "<u8", "<u8",
                "<u4", "<u4", "<u4", "<u4", "<u4", "<u4"],
    "offsets": [0, _F + Launch.h.offset + Header.type.offset, _F + Header.flags.offset, _F + Header.func.offset,
                _F + Header.pid.offset, _F + Header.tid.offset, _F + Header.ts_ns.offset,
                _F + Launch.shared_mem.offset, _F + Launch.handle.offset, _F + Launch.stream.offset,
                *(_F + Launch.grid.offset + 4 * i for i in range(3)), *(_F + Launch.block.offset + 4 * i for i in range(3))],
    "itemsize": FRAMED_STRIDE,
})


class LaunchRun:
    """A run of plain kernel launches (entry-only, not nested, not graph launches) as the ring buffer held them,
    with what the pipeline worked out for them: one object per run, not per launch. `keys[i]` is row i's
    (pid, tid, func, handle); `groups` counts the keys; `kernels` names each key; `steps` maps tid -> step id."""

    __slots__ = ("rows", "keys", "groups", "kernels", "steps")

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        self.keys: list[tuple[int, int, int, int]] = list(zip(rows["pid"].tolist(), rows["tid"].tolist(),
                                                              rows["func"].tolist(), rows["handle"].tolist()))
        self.groups: dict[tuple[int, int, int, int], int] = {}
        self.kernels: dict[tuple[int, int, int, int], str] = {}
        self.steps: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def first_ns_by_pid(self) -> dict[int, int]:
        """pid -> its earliest launch stamp in the run."""
        pids = {k[0] for k in self.groups}
        if len(pids) == 1:
            return {pids.pop(): int(self.rows["ts"].min())}
        return {pid: int(self.rows["ts"][self.rows["pid"] == pid].min()) for pid in pids}
