"""CLOCK_MONOTONIC -> Unix epoch, and back for a wall-clock time stamped elsewhere.

BPF stamps events with bpf_ktime_get_ns (CLOCK_MONOTONIC); spans and the archive want epoch ns, and the join turns
the epoch times of vLLM's spans back into monotonic ones. NTP's slewing moves both clocks alike
(clock_gettime(2)), so the offset between them changes only when the wall clock is set: an NTP step, a VM's
clock set right after the host paused it (by milliseconds to seconds). So the offset is re-sampled every
`resample_s`, each sample the tightest of a few bracketed reads (a read preempted between its clocks is off by half
the preemption: milliseconds on a loaded machine), and a change of at least `step_ns` between two samples is a
step: the history of offsets says which one held when a given wall-clock time was read, or that the step came
between two samples and nobody can tell. docs/join.md has what was seen on our development machine.
"""

from __future__ import annotations

import threading
import time
from collections import deque


def sample(tries: int = 5) -> tuple[int, int]:
    """(monotonic ns, epoch - monotonic ns) from the tightest of `tries` monotonic/wall/monotonic reads."""
    best = None
    for _ in range(tries):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) // 2, wall)
    _, mono, wall = best
    return mono, wall - mono


class MonotonicToEpoch:
    def __init__(self, resample_s: float = 1.0, step_ns: int = 1_000_000, history: int = 1024, read=sample):
        self.resample_s = resample_s
        self.step_ns = step_ns  # far above a sample's error (half its tightest bracket: well under 0.1 ms)
        self._read = read
        self._lock = threading.Lock()
        # [first sample, last sample, offset]: one offset held between those two monotonic times; a step came
        # somewhere between one segment's last sample and the next one's first
        self._segments: deque[list[int]] = deque(maxlen=history)
        self.steps = 0  # wall-clock steps seen
        self._next = 0.0
        self.offset_ns = 0
        self.resample()

    def resample(self) -> int:
        mono, offset = self._read()
        with self._lock:
            last = self._segments[-1] if self._segments else None
            if last is not None and abs(offset - last[2]) < self.step_ns:
                last[1], last[2] = mono, offset  # the same offset, within a sample's error
            else:
                self.steps += last is not None
                self._segments.append([mono, mono, offset])
            self.offset_ns = offset
        self._next = time.monotonic() + self.resample_s
        return offset

    def offset(self) -> int:
        if time.monotonic() >= self._next:
            self.resample()
        return self.offset_ns

    def to_epoch(self, mono_ns: int) -> int:
        return mono_ns + self.offset()

    def offset_at(self, wall_ns: int) -> tuple[int, bool]:
        """(the offset that held when the wall clock read `wall_ns`, whether that is certain). Uncertain: the time
        falls between the two samples a step came between. Times before the first sample get the oldest offset
        (a step before the sidecar started is not known)."""
        self.resample()  # a time stamped just now must not meet an offset a second old
        with self._lock:
            segments = list(self._segments)
        for i in range(len(segments) - 1, -1, -1):
            first, last, offset = segments[i]
            mono = wall_ns - offset
            later = segments[i + 1][0] if i + 1 < len(segments) else None
            if later is not None and mono >= later:
                continue  # this offset would put the time after the next step: not this one
            if mono >= first or i == 0:
                return offset, later is None or mono <= last
        return segments[-1][2], False
