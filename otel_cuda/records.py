"""Decoded events -> archive records (docs/archive-format.md), and the facts several stages read off an event."""

from __future__ import annotations

from . import probes
from .events import EV_CALL, EV_LAUNCH, EV_NAME, LAYER_RUNTIME, Event

SCHEMA_VERSION = 1
_MEMSET_ELEMENT = {"cuMemsetD8_v2": 1, "cuMemsetD16_v2": 2, "cuMemsetD32_v2": 4,
                   "cuMemsetD8Async": 1, "cuMemsetD16Async": 2, "cuMemsetD32Async": 4}
_HANDLE_ARGS = {"ptr", "dst", "src", "stream", "event", "handle", "context", "function", "kernel", "graph",
                "host_stub", "out", "parent"}


def symbol(ev: Event) -> str:
    p = probes.BY_ID.get(ev.func)
    return p.symbol if p else f"func_{ev.func}"


def moved_bytes(ev: Event) -> int:
    """Bytes a copy or set moved (0 for anything else, and for a failed call)."""
    if ev.type != EV_CALL or (ev.flags & 1 and ev.result != 0):
        return 0
    p = probes.BY_ID.get(ev.func)
    if p is None or not p.memcpy_kind:
        return 0
    if p.group == "set":
        return ev.args[2] * _MEMSET_ELEMENT[p.symbol]
    return ev.args[2]


def _hex(v: int) -> str:
    return "0x%x" % v


def args_of(ev: Event) -> dict:
    p = probes.BY_ID.get(ev.func)
    if ev.type == EV_LAUNCH:
        handle, stream, gx, gy, gz, bx, by, bz, shmem = ev.args
        key = "graph" if p and p.symbol == "cuGraphLaunch" else "function"
        if key == "graph":
            return {"graph": _hex(handle), "stream": _hex(stream)}
        return {key: _hex(handle), "grid": [gx, gy, gz], "block": [bx, by, bz], "shared_mem": shmem,
                "stream": _hex(stream)}
    if ev.type == EV_NAME:
        return {"handle": _hex(ev.args[0]), "parent": _hex(ev.args[1]), "name": ev.name}
    out: dict = {}
    names = p.args if p else ()
    for i, name in enumerate(names):
        if not name:
            continue
        v = ev.args[i]
        if name == "memory_type":
            out[name] = probes.MEMORY_TYPES[v] if v < len(probes.MEMORY_TYPES) else str(v)
        elif name == "known":
            continue
        elif name in _HANDLE_ARGS:
            out[name] = _hex(v)
        else:
            out[name] = v
    if p and p.group == "memory" and "known" in names and not ev.args[names.index("known")]:
        out["bytes"] = None  # a free of memory allocated before the sidecar attached
    if p and p.memcpy_kind:
        out["kind"] = p.memcpy_kind
        out["bytes"] = moved_bytes(ev)
    return out


def to_record(ev: Event, epoch_offset_ns: int, kernel: str | None, step: int | None) -> dict:
    returned = ev.has_return
    rec = {
        "v": SCHEMA_VERSION,
        "type": "cuda_runtime" if ev.layer == LAYER_RUNTIME else "cuda_api",
        "ts": ev.ts_ns + epoch_offset_ns,
        "mono_ns": ev.ts_ns,
        "pid": ev.pid,
        "tid": ev.tid,
        "func": symbol(ev),
        "phase": "call" if returned else "entry",
        "dur_ns": ev.dur_ns if returned else None,
        "result": probes.result_name(ev.result) if returned else None,
        "args": args_of(ev),
        "step": step,
    }
    if kernel is not None:
        rec["kernel"] = kernel
    if ev.nested:
        rec["nested"] = True
    return rec
