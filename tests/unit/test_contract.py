"""The kernel<->user contract: bpf/otel_cuda.h compiled by gcc against the ctypes mirror and the probe table."""

import re
import subprocess
from pathlib import Path

import pytest

from otel_cuda import events, probes

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "otel_cuda.h"

STRUCTS = {
    "oc_header": events.Header,
    "oc_call": events.Call,
    "oc_launch": events.Launch,
    "oc_name": events.Name,
    "oc_sys": events.Sys,
    "oc_proc": events.Proc,
    "oc_target": events.Target,
    "oc_stat_key": events.StatKey,
    "oc_kernel_key": events.KernelKey,
    "oc_stat": events.Stat,
    "oc_live_key": events.LiveKey,
}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    """sizeof and offsetof of every field, as the C compiler lays the header out."""
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/types.h>', f'#include "{HEADER}"',
             "int main(void) {"]
    for cname, mirror in STRUCTS.items():
        lines.append(f'printf("{cname} size %zu\\n", sizeof(struct {cname}));')
        for field, _ in mirror._fields_:
            lines.append(f'printf("{cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
    lines.append("return 0; }")
    src = tmp_path_factory.mktemp("contract") / "layout.c"
    src.write_text("\n".join(lines))
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


@pytest.mark.parametrize("cname", sorted(STRUCTS))
def test_struct_layout_matches_header(c_layout, cname):
    import ctypes

    mirror = STRUCTS[cname]
    assert int(c_layout[f"{cname} size"]) == ctypes.sizeof(mirror)
    for field, _ in mirror._fields_:
        assert int(c_layout[f"{cname}.{field}"]) == getattr(mirror, field).offset, field


def test_decode_formats_cover_whole_structs():
    import ctypes

    assert events.SIZES == {
        events.EV_CALL: ctypes.sizeof(events.Call),
        events.EV_LAUNCH: ctypes.sizeof(events.Launch),
        events.EV_NAME: ctypes.sizeof(events.Name),
        events.EV_SYS: ctypes.sizeof(events.Sys),
        events.EV_PROC: ctypes.sizeof(events.Proc),
    }


def test_lost_slots_match_header_enum():
    text = HEADER.read_text()
    slots = {m.group(1): int(m.group(2)) for m in re.finditer(r"OC_LOST_(\w+)\s*=\s*(\d+)", text)}
    assert slots == {"RINGBUF": events.LOST_RINGBUF, "TABLE": events.LOST_TABLE, "SLOTS": 2}


def test_function_ids_match_header_enum():
    text = HEADER.read_text()
    enum = {m.group(1): int(m.group(2)) for m in re.finditer(r"OC_FN_(\w+)\s*=\s*(\d+)", text)}
    enum.pop("MAX")
    assert enum == {p.symbol: p.func_id for p in probes.PROBES}


def test_every_probe_has_handlers_in_the_bpf_program():
    src = (HEADER.parent / "cuda_probes.bpf.c").read_text()
    for p in probes.PROBES:
        macro = re.search(rf"(CALL|RUNTIME)\({p.symbol},", src)
        assert macro or f"entry_{p.symbol}(" in src, p.symbol
        assert macro or f"return_{p.symbol}(" in src, p.symbol


def test_launch_counts_in_targets_cover_exactly_the_launch_functions():
    text = HEADER.read_text()
    assert int(re.search(r"#define OC_LAUNCH_FUNCS (\d+)", text).group(1)) == events.OC_LAUNCH_FUNCS
    launches = sorted(p.func_id for p in probes.PROBES if p.symbol in ("cuLaunchKernel", "cuLaunchKernelEx",
                                                                       "cuLaunchCooperativeKernel", "cuGraphLaunch"))
    # launch_entry() indexes oc_target.launches with func - OC_FN_cuLaunchKernel
    assert launches == list(range(events.FIRST_LAUNCH_FUNC, events.FIRST_LAUNCH_FUNC + events.OC_LAUNCH_FUNCS))
