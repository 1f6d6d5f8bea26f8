"""Decoded events -> archive records (docs/archive-format.md), and the facts several stages read off an event."""

from __future__ import annotations

import json

import numpy as np

from . import probes
from .demangle import readable
from .events import EV_CALL, EV_LAUNCH, EV_NAME, LAYER_RUNTIME, Event, LaunchRun

SCHEMA_VERSION = 1
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
    return probes.moved_bytes(p, ev.args) if p is not None else 0


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
    if p and p.copies:
        out["kind"] = p.direction(ev.args)  # a runtime copy: from its cudaMemcpyKind
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
        if readable(kernel) != kernel:
            rec["kernel_demangled"] = readable(kernel)
    if ev.nested:
        rec["nested"] = True
    return rec


def _int(v) -> int:
    if v is None:
        return 0
    if isinstance(v, str):
        return int(v, 16) if v.startswith("0x") else int(v)
    return int(v)


def from_record(rec: dict) -> Event | None:
    """The event an archive record was made from (replay): None for records that are not calls."""
    p = probes.BY_SYMBOL.get(rec.get("func", ""))
    if p is None or rec.get("type") not in ("cuda_api", "cuda_runtime"):
        return None
    a = rec.get("args") or {}
    returned = rec.get("phase") == "call"
    flags = (1 if returned else 0) | (2 if rec.get("nested") else 0)
    result = _RESULT_CODES.get(rec.get("result"), 0) if returned else -1
    head = (flags, p.func_id, rec["pid"], rec["tid"], rec["mono_ns"], rec.get("dur_ns") or 0, result)
    layer = LAYER_RUNTIME if p.layer == probes.RUNTIME else 0
    if p.group == "launch" and p.layer == probes.DRIVER:
        grid, block = a.get("grid") or [0, 0, 0], a.get("block") or [0, 0, 0]
        handle = _int(a.get("graph") if "graph" in a else a.get("function"))
        return Event(EV_LAUNCH, layer, *head, (handle, _int(a.get("stream")), *grid, *block, _int(a.get("shared_mem"))))
    if p.symbol in ("cuModuleGetFunction", "cuLibraryGetKernel"):
        return Event(EV_NAME, layer, *head, (_int(a.get("handle")), _int(a.get("parent")), 0), a.get("name", ""))
    slots = []
    for name in p.args:
        if name == "memory_type":
            slots.append(probes.MEMORY_TYPES.index(a[name]) if a.get(name) in probes.MEMORY_TYPES else 0)
        elif name == "known":
            slots.append(0 if a.get("bytes") is None else 1)
        elif name == "kind":  # a runtime copy's direction, archived by name
            slots.append(_MEMCPY_KIND_CODES.get(a.get(name), 4))
        else:
            slots.append(_int(a.get(name)))
    return Event(EV_CALL, layer, *head, tuple(slots + [0] * (6 - len(slots))))


_RESULT_CODES = {name: code for code, name in probes.CU_RESULTS.items()}
_MEMCPY_KIND_CODES = {"htod": 1, "dtoh": 2, "dtod": 3, "default": 4}  # cudaMemcpyKind


# ---- the archive's hot path: launches (most events) formatted straight to a JSON line ----------------------------
# Parsed, equal to to_record(...) (tests/unit/test_records.py: test_launch_line_is_the_record); about a fifth of the
# CPU of building the dict and encoding it.
_LAUNCH_TIMES = '{"v":%d,"type":"%s","ts":%%d,"mono_ns":%%d,'  # % (version, type); then % (ts, mono_ns)
_LAUNCH_WHO = '"pid":%%d,"tid":%%d,"func":"%s","phase":"entry","dur_ns":null,"result":null,"args":'  # % symbol
_LAUNCH_ARGS = '{"function":"0x%x","grid":[%d,%d,%d],"block":[%d,%d,%d],"shared_mem":%d,"stream":"0x%x"}'
_GRAPH_ARGS = '{"graph":"0x%x","stream":"0x%x"}'
_quoted_names: dict[str, str] = {}  # kernel name -> its JSON string (names repeat: escaped once)
_heads: dict[tuple[int, int], str] = {}
_encode = json.JSONEncoder(separators=(",", ":")).encode


def _head(func: int, layer: int) -> str:
    head = _heads.get((func, layer))
    if head is None:
        head = _heads[(func, layer)] = (
            _LAUNCH_TIMES % (SCHEMA_VERSION, "cuda_runtime" if layer == LAYER_RUNTIME else "cuda_api") + _who(func))
    return head


def _who(func: int) -> str:
    p = probes.BY_ID.get(func)
    return _LAUNCH_WHO % (p.symbol if p else f"func_{func}")


def _quoted(kernel: str) -> str:
    """A kernel's JSON value, with ,"kernel_demangled":... where the readable name differs; escaped once per name."""
    q = _quoted_names.get(kernel)
    if q is None:
        q = _quoted_names[kernel] = json.dumps(kernel) + (
            ',"kernel_demangled":' + json.dumps(readable(kernel)) if readable(kernel) != kernel else "")
    return q


def launch_line(ev: Event, epoch_offset_ns: int, kernel: str | None, step: int | None) -> str | None:
    """The archive line of an entry-only launch event; None for anything else (use record_line)."""
    if ev.type != EV_LAUNCH or ev.flags:
        return None
    head = _head(ev.func, ev.layer)
    handle, stream, gx, gy, gz, bx, by, bz, shmem = ev.args
    if ev.func == _GRAPH_LAUNCH_ID:
        args = _GRAPH_ARGS % (handle, stream)
    else:
        args = _LAUNCH_ARGS % (handle, gx, gy, gz, bx, by, bz, shmem, stream)
    tail = ',"step":%s' % ("null" if step is None else step)
    if kernel is not None:
        tail += ',"kernel":' + _quoted(kernel)
    return (head % (ev.ts_ns + epoch_offset_ns, ev.ts_ns, ev.pid, ev.tid)) + args + tail + "}\n"


def launch_run_text(epoch_offset_ns: int, run: LaunchRun) -> str:
    """The archive lines of a run of plain launches (source.py), equal to launch_line() of each. Launches of one
    kernel from one thread mostly repeat everything but their time: everything after "mono_ns" is formatted once
    per distinct (function, pid, tid, arguments) and each line is its two times and that text."""
    rows = run.rows
    raw = rows.view(np.uint8).reshape(len(rows), rows.itemsize)
    static = np.ascontiguousarray(raw[:, _STATIC_BYTES]).view(f"V{_STATIC_BYTES.size}").ravel()
    _, first, inverse = np.unique(static, return_index=True, return_inverse=True)
    tails = np.empty(len(first), dtype=object)
    for shape, i in enumerate(first.tolist()):
        pid, tid, func, handle = key = run.keys[i]
        r = rows[i]
        tails[shape] = _who(func) % (pid, tid) + _LAUNCH_ARGS % (
            handle, r["gx"], r["gy"], r["gz"], r["bx"], r["by"], r["bz"], r["shmem"], r["stream"]) + (
            ',"step":%d,"kernel":%s}\n' % (run.steps[tid], _quoted(run.kernels[key])))
    ts = rows["ts"]
    return "".join(map(_RUN_LINE.__mod__, zip((ts.astype(np.int64) + epoch_offset_ns).tolist(), ts.tolist(),
                                              tails[inverse].tolist())))


def record_line(rec: dict) -> str:
    """Any record as the archive writes it: compact JSON and a newline."""
    return _encode(rec) + "\n"


_GRAPH_LAUNCH_ID = probes.BY_SYMBOL["cuGraphLaunch"].func_id
# launch_run_text: a plain launch line is these two times, then text that only its static bytes decide (the record
# from its function to its block, less its time stamp: offsets within events.FRAMED_LAUNCH rows)
_RUN_LINE = _LAUNCH_TIMES % (SCHEMA_VERSION, "cuda_api") + "%s"
_STATIC_BYTES = np.r_[12:24, 32:88]
