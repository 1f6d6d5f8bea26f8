"""Which traced processes served a request span: the vLLM instance (pod) that sent it, and its engines.

A node runs many vLLM pods; one sidecar (DaemonSet mode) traces all of them. vLLM's `vllm.process_id` is the API
server's pid in *its* pid namespace (PID 1 in the official image), so it identifies nothing on its own. In order:

1. the OTLP connection's peer: the socket that sent the span belongs to one process — the API server (or a
   process of its pod). It is found by the peer's address in the TCP tables as each candidate process sees them
   (/proc/PID/net/tcp{,6}: a pod has its own network namespace) and the socket inode among its fds;
2. `vllm.process_id` translated through `NSpid` (/proc/PID/status): a traced process's ancestor whose innermost
   pid equals it — only when exactly one does (two pods both saying "1" name nobody);
3. the pod / container attributes of the span's resource, against the traced processes' own.
Nothing found is `None`: the join reports `unknown_instance` and claims nothing, never "every process".

Engines: vLLM's API server starts one EngineCore per data-parallel rank; with tensor parallelism each EngineCore
starts one worker per rank and only the workers call CUDA. So a traced process belongs to the engine that is the
API server's child on its ancestor path, and the traced processes of one engine are its TP ranks.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Instance:
    api_pid: int | None  # host pid of the API server (None: found by pod / container only)
    engines: dict  # engine pid -> tuple of traced pids (its ranks), sorted
    found_by: str  # peer | process_id | pod | container | host


def ancestor_chain(pid: int, proc: str = "/proc") -> tuple[int, ...]:
    """Parent, grandparent, ... of a process, nearest first."""
    out: list[int] = []
    while pid > 1 and len(out) < 64:
        try:
            with open(f"{proc}/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.append(pid)
    return tuple(out)


def ns_pid(pid: int, proc: str = "/proc") -> int | None:
    """The pid a process has in its own (innermost) pid namespace."""
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _hex_address(ip: str, port: int) -> set[str]:
    """How /proc/net/tcp{,6} write a local address (little-endian words), for both families."""
    addr = ipaddress.ip_address(ip)
    out = set()
    if addr.version == 4:
        out.add(f"{int.from_bytes(addr.packed, 'little'):08X}:{port:04X}")
        addr = ipaddress.IPv6Address(f"::ffff:{ip}")  # a v4 client of a dual-stack socket
    words = [addr.packed[i:i + 4] for i in range(0, 16, 4)]
    out.add("".join(f"{int.from_bytes(w, 'little'):08X}" for w in words) + f":{port:04X}")
    return out


def socket_owner(peer: tuple[str, int], candidates: Iterable[int], proc: str = "/proc") -> int | None:
    """The candidate process holding the socket whose local address is `peer` (the sender's end)."""
    want = _hex_address(*peer)
    for pid in candidates:
        inode = None
        for table in ("tcp", "tcp6"):
            try:
                with open(f"{proc}/{pid}/net/{table}") as f:
                    next(f, None)
                    for line in f:
                        fields = line.split()
                        # inode 0: a closed connection's TIME_WAIT entry, which may share the address
                        if len(fields) > 9 and fields[1] in want and fields[9] != "0":
                            inode = fields[9]
                            break
            except OSError:
                continue
            if inode:
                break
        if not inode:
            continue
        target = f"socket:[{inode}]"
        try:
            for fd in os.listdir(f"{proc}/{pid}/fd"):
                try:
                    if os.readlink(f"{proc}/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def parse_peer(peer: str | tuple | None) -> tuple[str, int] | None:
    """gRPC's "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555", or an HTTP server's (host, port[, ...])."""
    if isinstance(peer, tuple):
        return (str(peer[0]), int(peer[1])) if len(peer) >= 2 else None
    if not peer or not peer.startswith(("ipv4:", "ipv6:")):
        return None
    host, _, port = peer.split(":", 1)[1].rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


class InstanceMap:
    """Resolves a span's resource (and the connection it came on) to the traced processes of its instance.

    `traced` returns the traced pids with their ancestor chains (kept by the observer as processes are selected);
    `attributes_of(pid)` the pod / container attributes of a traced process; `proc` is the /proc to read."""

    def __init__(self, key: str, traced: Callable[[], dict[int, tuple[int, ...]]],
                 attributes_of: Callable[[int], dict], proc: str = "/proc"):
        self.key = key  # auto | pod | container | host
        self._traced = traced
        self._attributes_of = attributes_of
        self._proc = proc
        self._peers: dict[tuple[str, int], int] = {}  # a connection's peer -> its process (connections persist)
        # pid -> its pid in its own namespace, read while it lived: an API server flushes its last spans as it
        # exits, and they are joined after it is gone
        self._ns_pids: dict[int, int] = {}
        self._unknown: set = set()  # senders already reported as matching nothing

    def resolve(self, resource: dict, peer=None) -> Instance | None:
        traced = self._traced()
        if self.key == "host":  # one instance: every traced process, each its own engine
            return Instance(None, {pid: (pid,) for pid in sorted(traced)}, "host")
        if self.key == "auto":
            for how, find in (("peer", lambda: self._by_peer(parse_peer(peer), traced)),
                              ("process_id", lambda: self._by_process_id(resource.get("vllm.process_id"), traced))):
                api = find()
                engines = _engines(api, traced) if api is not None else None
                if engines:
                    return Instance(api, engines, how)
        for attr, how in ((("k8s.pod.uid", "pod"), ("k8s.pod.name", "pod")) if self.key in ("auto", "pod")
                          else (("container.id", "container"),)):
            want = resource.get(attr)
            if want:
                pids = sorted(p for p in traced if self._attributes_of(p).get(attr) == want)
                if pids:
                    return Instance(None, {pid: (pid,) for pid in pids}, how)
        key = (str(peer), resource.get("vllm.process_id"))
        if key not in self._unknown:  # once per sender: a misconfigured selection would repeat it per request
            self._unknown.add(key)
            log.warning("a request span from %s (vllm.process_id %s, sent by process %s) matches no traced process: "
                        "its CUDA work is not joined (outcome unknown_instance); is its engine selected?",
                        peer, resource.get("vllm.process_id"), self._peers.get(parse_peer(peer)))
        return None

    def _by_peer(self, peer: tuple[str, int] | None, traced: dict) -> int | None:
        """The API server: the sender's socket owner, or the ancestor of traced processes it descends from."""
        if peer is None:
            return None
        owner = self._peers.get(peer)
        if owner is not None and os.path.isdir(f"{self._proc}/{owner}"):  # gone: the port may be another's now
            return owner
        candidates = {a for chain in traced.values() for a in chain if a > 1}
        owner = socket_owner(peer, sorted(candidates), self._proc)
        if owner is None:  # a sender that is not an ancestor (a sidecar exporter of the pod): its own chain
            return None
        self._peers[peer] = owner
        if len(self._peers) > 4096:
            del self._peers[next(iter(self._peers))]
        return owner

    def note(self, chain: tuple[int, ...]) -> None:
        """A traced process's ancestors, read at its selection: their namespace pids, while they live."""
        for pid in chain:
            self._ns_pid(pid)

    def _ns_pid(self, pid: int) -> int | None:
        if pid not in self._ns_pids:
            found = ns_pid(pid, self._proc)
            if found is None:
                return None
            self._ns_pids[pid] = found
        return self._ns_pids[pid]

    def _by_process_id(self, value, traced: dict) -> int | None:
        try:
            want = int(value)
        except (TypeError, ValueError):
            return None
        ancestors = {a for chain in traced.values() for a in chain if a > 1}
        if want in ancestors and self._ns_pid(want) == want:  # same pid namespace as ours
            return want
        matches = [a for a in ancestors if self._ns_pid(a) == want]
        return matches[0] if len(matches) == 1 else None


def _engines(api_pid: int, traced: dict[int, tuple[int, ...]]) -> dict[int, tuple[int, ...]]:
    """Traced descendants of the API server, grouped by the API server's child they descend from."""
    engines: dict[int, list[int]] = {}
    for pid, chain in traced.items():
        path = (pid,) + tuple(chain)
        if api_pid not in chain:
            continue
        engine = path[path.index(api_pid) - 1]
        engines.setdefault(engine, []).append(pid)
    return {e: tuple(sorted(p)) for e, p in sorted(engines.items())}
