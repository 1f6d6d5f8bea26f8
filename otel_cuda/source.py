"""Ring buffer -> decoded events, in batches.

The reader takes its record source and its decode function as parameters, so it is tested with bytes and no
kernel. Records that do not decode are counted (decode_error) and skipped; the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from .events import DecodeError, Event

log = logging.getLogger(__name__)


@dataclass
class SourceCounters:
    records: int = 0
    decode_errors: int = 0
    batches: int = 0


class RingReader:
    def __init__(
        self,
        read_batch: Callable[[int], list[bytes]],
        decode: Callable[[bytes], Event],
        deliver: Callable[[list[Event]], None],
        poll_ms: int = 100,
    ):
        self.read_batch = read_batch
        self.decode = decode
        self.deliver = deliver
        self.poll_ms = poll_ms
        self.counters = SourceCounters()

    def pump(self, timeout_ms: int) -> int:
        """Read what is available (waiting up to timeout_ms), decode and deliver it. Returns records read."""
        raw = self.read_batch(timeout_ms)
        if not raw:
            return 0
        decoded: list[Event] = []
        decode = self.decode
        for data in raw:
            try:
                decoded.append(decode(data))
            except DecodeError as exc:
                self.counters.decode_errors += 1
                if self.counters.decode_errors <= 3:
                    log.warning("skipping a ring-buffer record: %s", exc)
        self.counters.records += len(raw)
        self.counters.batches += 1
        self.deliver(decoded)
        return len(raw)

    def drain(self) -> None:
        """Read until the ring buffer is empty (shutdown: nothing the kernel wrote is left behind)."""
        while self.pump(0):
            pass

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.pump(self.poll_ms)
        self.drain()
