"""The kernel's BPF ring buffer, read through its own memory mapping: framed bytes out, no call per record.

BCC's reader calls back into Python once per record (ctypes: ~1.6 us a record, a third of the consumer's budget at
200 000 events/s). The ring buffer is mapped into our memory instead, as libbpf maps it
(kernel/bpf/ringbuf.c): the consumer page (read-write: our position), then the producer page and the data pages,
read-only, the data mapped twice in a row so that a span that wraps is contiguous. read() copies everything between
the two positions at once; the caller parses the framing (source.py), asks settled() for a copy that is consistent
up to what it parsed, and release()s that.

Two orderings matter. The positions are read and written as single 8-byte loads and stores (numpy views): a store
byte by byte (struct.pack_into) lets the kernel read a torn consumer position and refuse records as if the ring
were full. And a record's header may be copied after its submit while its data was copied before (memcpy does not
copy in address order): settled() copies the parsed span again — every record in it was submitted before this
second copy began — and returns it when it differs from the first.

Framing (the kernel's ABI): each record is an 8-byte header — u32 length with BUSY (not yet submitted) and
DISCARD bits, u32 page offset — then the record, padded to 8 bytes.
"""

from __future__ import annotations

import mmap
import select
import struct
import time
from collections.abc import Iterable

import numpy as np

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER = 8
_HDR = struct.Struct("<II")


def framed_size(length: int) -> int:
    """Bytes a record of `length` bytes takes in the ring buffer."""
    return (length + HEADER + 7) & ~7


def frame(records: Iterable[bytes]) -> bytes:
    """Records as the kernel frames them (for test doubles and benchmarks that feed the pipeline from memory)."""
    out = bytearray()
    for rec in records:
        out += _HDR.pack(len(rec), 0) + rec + b"\0" * (framed_size(len(rec)) - HEADER - len(rec))
    return bytes(out)


class MemoryRing:
    """The consumer's side of a ring buffer held in memory (test doubles and benchmarks derive from it): what was
    read never changes, so nothing is re-copied and nothing is given back."""

    def settled(self, chunk: bytes, nbytes: int) -> bytes:
        return chunk

    def release(self, nbytes: int) -> None:
        pass


class MappedRing:
    """One BPF_MAP_TYPE_RINGBUF map, by its fd and data size (a power of two pages)."""

    def __init__(self, map_fd: int, size: int, batch_bytes: int = 256 * 96, batch_wait_s: float = 0.002):
        page = mmap.PAGESIZE
        self.size = size
        self.batch_bytes = min(batch_bytes, size // 4)
        self.batch_wait_s = batch_wait_s
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._consumer_pos = np.frombuffer(self._consumer, np.uint64, count=1)
        self._producer_pos = np.frombuffer(self._producer, np.uint64, count=1)
        self._data = memoryview(self._producer)[page:]
        self._poll = select.poll()
        self._poll.register(map_fd, select.POLLIN)
        self.resettled = 0  # reads whose records were submitted while being copied (parsed again)

    def _positions(self) -> tuple[int, int]:
        return int(self._consumer_pos[0]), int(self._producer_pos[0])

    def read(self, timeout_ms: int) -> bytes:
        """Everything written since the last release, copied out: the kernel may overwrite it once released.
        Records still BUSY at its end are read again next time. With a timeout, waits for a batch: up to
        timeout_ms when there is nothing (the kernel wakes us every RINGBUF_WAKE_EVERY records), `batch_wait_s`
        when there is less than `batch_bytes` — a consumer faster than its producer would otherwise read a
        record or two at a time, paying its per-read work for each (at 76 000 launches/s on the development
        machine: 1.7 records a read and 0.8 of a core, against 0.2 with this wait)."""
        cons, prod = self._positions()
        if timeout_ms and prod - cons < self.batch_bytes:
            if cons == prod:
                self._poll.poll(timeout_ms)
            else:
                time.sleep(min(self.batch_wait_s, timeout_ms / 1000))
            cons, prod = self._positions()
        start = cons & (self.size - 1)
        return bytes(self._data[start:start + (prod - cons)])

    def settled(self, chunk: bytes, nbytes: int) -> bytes:
        """`chunk` when its first nbytes are what the ring holds now, else the ring's bytes (see the module doc)."""
        start = int(self._consumer_pos[0]) & (self.size - 1)
        again = self._data[start:start + nbytes]
        if memoryview(chunk)[:nbytes] == again:
            return chunk
        self.resettled += 1
        return bytes(again)

    def release(self, nbytes: int) -> None:
        """The first nbytes of the last read are parsed: the kernel may reuse them."""
        if nbytes:
            self._consumer_pos[0] = int(self._consumer_pos[0]) + nbytes

    def close(self) -> None:
        del self._consumer_pos, self._producer_pos
        self._data.release()
        self._producer.close()
        self._consumer.close()
