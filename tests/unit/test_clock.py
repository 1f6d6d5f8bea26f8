"""Monotonic <-> epoch: the offset notices the wall clock's steps, and says which offset held when a wall-clock
time was read (the join's question about a vLLM span)."""

import time

from otel_cuda import clock
from otel_cuda.clock import MonotonicToEpoch

S = 1_000_000_000
MS = 1_000_000
OFF = 1_764_000_000 * S


def scripted(*samples):
    """A reader that returns these (monotonic, offset) samples in turn, then the last one again."""
    it = iter(samples)
    last = [None]

    def read():
        last[0] = next(it, last[0])
        return last[0]
    return read


def test_a_sample_is_the_tightest_of_its_reads_so_a_preempted_read_does_not_skew_it(monkeypatch):
    # the first read is preempted 30 ms between its wall and second monotonic reads: on its own it would put the
    # offset 15 ms off; the second is tight
    mono = iter([0, 30 * MS, 40 * MS, 40 * MS + 500] + [50 * MS, 50 * MS + 400] * 3)
    wall = iter([OFF, OFF + 40 * MS + 250] + [OFF + 50 * MS + 200] * 3)
    monkeypatch.setattr(time, "monotonic_ns", lambda: next(mono))
    monkeypatch.setattr(time, "time_ns", lambda: next(wall))
    assert clock.sample(tries=5) == (50 * MS + 200, OFF)


def test_a_sample_within_a_millisecond_is_the_same_offset_and_a_step_is_remembered():
    c = MonotonicToEpoch(read=scripted((0, OFF), (1 * S, OFF + 200_000), (2 * S, OFF + 18 * MS)))
    assert (c.resample(), c.steps) == (OFF + 200_000, 0)  # 0.2 ms apart: a sample's error at most, the same offset
    assert (c.resample(), c.steps) == (OFF + 18 * MS, 1)  # stepped 17.8 ms
    before, between, after = 0.5 * S, 1.5 * S, 2.5 * S  # monotonic times of three wall-clock readings
    assert c.offset_at(int(before + OFF + 200_000)) == (OFF + 200_000, True)
    assert c.offset_at(int(between + OFF + 200_000)) == (OFF + 200_000, False)  # the step came around then
    assert c.offset_at(int(after + OFF + 18 * MS)) == (OFF + 18 * MS, True)
    assert c.offset() == OFF + 18 * MS and c.to_epoch(5) == OFF + 18 * MS + 5


def test_a_time_before_the_first_sample_gets_the_oldest_offset():
    c = MonotonicToEpoch(read=scripted((10 * S, OFF)))
    assert c.offset_at(OFF + 3 * S) == (OFF, True)


def test_the_real_clocks_agree_with_a_fresh_sample():
    c = MonotonicToEpoch()
    wall = time.time_ns()
    offset, sure = c.offset_at(wall)
    assert sure and abs(offset - (wall - time.monotonic_ns())) < 5 * MS
