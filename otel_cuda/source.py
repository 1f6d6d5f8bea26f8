"""Ring buffer -> decoded events and launch runs, in order.

The reader takes its byte source (read, settled, release: ringbuf.py; framed as the kernel frames the ring buffer)
and two deliveries as parameters, so it is tested with bytes and no kernel. Most records are kernel launches probed at entry; a run of
them is delivered as one array (FRAMED_LAUNCH rows over the bytes read) to `deliver_launches`, and everything
else, decoded one by one into Events, to `deliver_events`, in ring-buffer order. Call and launch records have one
size, so the framing of a run of them is checked for the whole run at once. Records that do not decode are
counted (decode_error) and skipped; the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import probes
from .events import EV_LAUNCH, FIXED_SIZE, FRAMED_LAUNCH, FRAMED_STRIDE, DecodeError, Event
from .ringbuf import BUSY_BIT, DISCARD_BIT, HEADER, framed_size

log = logging.getLogger(__name__)
_HEADER_LEN = struct.Struct("<I")
_GRAPH_LAUNCH = probes.BY_SYMBOL["cuGraphLaunch"].func_id
MAX_WINDOW = 8192  # fixed-size records checked per step; halves the work lost when a run ends early


@dataclass
class SourceCounters:
    records: int = 0
    decode_errors: int = 0
    batches: int = 0
    launch_runs: int = 0  # runs delivered as arrays
    launches_in_runs: int = 0


class RingReader:
    """`min_run`: a shorter run of launches is delivered as Events (an array's fixed cost is a few Events')."""

    def __init__(
        self,
        read: Callable[[int], bytes],
        settled: Callable[[bytes, int], bytes],
        release: Callable[[int], None],
        decode: Callable[[bytes, int], Event],
        deliver_events: Callable[[list[Event]], None],
        deliver_launches: Callable[[np.ndarray], None],
        poll_ms: int = 100,
        min_run: int = 16,
    ):
        self.read = read
        self.settled = settled
        self.release = release
        self.decode = decode
        self.deliver_events = deliver_events
        self.deliver_launches = deliver_launches
        self.poll_ms = poll_ms
        self.min_run = min_run
        self.counters = SourceCounters()

    def pump(self, timeout_ms: int) -> int:
        """Read what is available (waiting up to timeout_ms), decode and deliver it. Returns records read."""
        return self._pump(timeout_ms)[0]

    def _pump(self, timeout_ms: int) -> tuple[int, int]:
        chunk = self.read(timeout_ms)
        if not chunk:
            return 0, 0
        parts, used, records, bad = self._split(chunk)
        settled = self.settled(chunk, used)
        if settled is not chunk:  # records were submitted while being copied: parse the consistent copy
            parts, used, records, bad = self._split(settled)
        self.release(used)  # copied out and parsed: the kernel may write there again while we deliver
        for exc in bad:
            self.counters.decode_errors += 1
            if self.counters.decode_errors <= 3:
                log.warning("skipping a ring-buffer record: %s", exc)
        for part in parts:
            if isinstance(part, list):
                self.deliver_events(part)
            else:
                self.counters.launch_runs += 1
                self.counters.launches_in_runs += len(part)
                self.deliver_launches(part)
        self.counters.records += records
        self.counters.batches += 1
        return records, used

    def _split(self, chunk: bytes) -> tuple[list, int, int, list]:
        """The chunk's records as [list of Events | array of launches], the bytes parsed, the records parsed, and
        why the records that did not decode did not. Parsing stops at a record the kernel has not submitted yet
        (BUSY): it is read again next time."""
        parts: list = []
        bad: list = []
        events: list[Event] = []
        pos, end, records, window = 0, len(chunk), 0, 256
        while pos + HEADER <= end:
            k = min((end - pos) // FRAMED_STRIDE, window)
            if k >= self.min_run:
                run = np.frombuffer(chunk, FRAMED_LAUNCH, count=k, offset=pos)
                fixed = run["len"] == FIXED_SIZE  # BUSY / DISCARD bits make it differ too
                if not fixed.all():
                    k = int(fixed.argmin())
                    run = run[:k]
                window = min(window * 2, MAX_WINDOW) if k == len(fixed) else 256
                if k:
                    events = self._fixed(chunk, pos, run, parts, events, bad)
                    pos += k * FRAMED_STRIDE
                    records += k
                    continue
            length = _HEADER_LEN.unpack_from(chunk, pos)[0]
            if length & BUSY_BIT:
                break
            size = length & ~(BUSY_BIT | DISCARD_BIT)
            nxt = pos + framed_size(size)
            if nxt > end:  # a header that points past what was read: the framing is broken, stop here
                bad.append(f"record of {size} bytes at {pos} runs past the {end} bytes read")
                pos = end
                break
            if not length & DISCARD_BIT:
                records += 1
                try:
                    events.append(self.decode(chunk[pos + HEADER:pos + HEADER + size], 0))
                except DecodeError as exc:
                    bad.append(exc)
            pos = nxt
        if events:
            parts.append(events)
        return parts, pos, records, bad

    def _fixed(self, chunk: bytes, pos: int, run: np.ndarray, parts: list, events: list[Event], bad: list) -> list[Event]:
        """A run of call/launch records: runs of plain launches (entry-only, not nested, not a graph) as arrays,
        the rest as Events. Returns the Events not yet closed into a part."""
        plain = (run["type"] == EV_LAUNCH) & (run["flags"] == 0) & (run["func"] != _GRAPH_LAUNCH)
        edges = np.flatnonzero(plain[1:] != plain[:-1]) + 1
        start = 0
        for stop in [*edges.tolist(), len(run)]:
            if plain[start] and stop - start >= self.min_run:
                if events:
                    parts.append(events)
                    events = []
                parts.append(run[start:stop])
            else:
                decode = self.decode
                for i in range(start, stop):
                    try:
                        events.append(decode(chunk, pos + i * FRAMED_STRIDE + HEADER))
                    except DecodeError as exc:
                        bad.append(exc)
            start = stop
        return events

    def drain(self) -> None:
        """Read until the ring buffer is empty (shutdown: nothing the kernel wrote is left behind)."""
        while self._pump(0)[1]:  # bytes, not records: a chunk may hold only discarded ones
            pass

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.pump(self.poll_ms)
        self.drain()
