"""The archive's fast path for launches writes exactly the record to_record() builds."""

import json

from otel_cuda import events as E
from otel_cuda.records import launch_line, record_line, to_record


def launch(func: int, flags: int = 0):
    return E.decode(E._LAUNCH.pack(E.EV_LAUNCH, 0, flags, func, 10, 11, 1000, 0, -1, 4096, 0x7E0300000003, 0x55,
                                   8, 2, 1, 128, 1, 1))


def test_launch_line_is_the_record():
    for func in (1, 2, 3, 4):  # cuLaunchKernel, cuLaunchKernelEx, cuLaunchCooperativeKernel, cuGraphLaunch
        for kernel in (None, "k", 'we"ird\\name<float>', "unknown"):
            for step in (None, 7):
                ev, k = launch(func), None if func == 4 else kernel
                line = launch_line(ev, 5_000_000_000, k, step)
                assert line.endswith("\n") and json.loads(line) == to_record(ev, 5_000_000_000, k, step)


def test_launches_with_a_return_or_nested_take_the_general_path():
    for flags in (E.F_RETURN, E.F_NESTED):
        ev = launch(1, flags)
        assert launch_line(ev, 0, "k", None) is None
        assert json.loads(record_line(to_record(ev, 0, "k", None))) == to_record(ev, 0, "k", None)
