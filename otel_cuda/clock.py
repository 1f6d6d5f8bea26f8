"""CLOCK_MONOTONIC -> Unix epoch.

BPF stamps events with bpf_ktime_get_ns (CLOCK_MONOTONIC); spans and the archive want epoch ns. The offset
drifts as NTP slews the wall clock, so it is re-sampled every `resample_s`, bracketing the wall-clock read
between two monotonic reads to keep the error under a microsecond or so.
"""

from __future__ import annotations

import time


class MonotonicToEpoch:
    def __init__(self, resample_s: float = 10.0):
        self.resample_s = resample_s
        self._next = 0.0
        self.offset_ns = 0
        self.resample()

    def resample(self) -> int:
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        self.offset_ns = wall - (before + after) // 2
        self._next = time.monotonic() + self.resample_s
        return self.offset_ns

    def offset(self) -> int:
        if time.monotonic() >= self._next:
            self.resample()
        return self.offset_ns

    def to_epoch(self, mono_ns: int) -> int:
        return mono_ns + self.offset()
