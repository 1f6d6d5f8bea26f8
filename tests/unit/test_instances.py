"""Which traced processes a request span belongs to: the sender's connection, its pid namespace, its engines."""

import os
import socket
import subprocess
import sys

from otel_cuda.instances import InstanceMap, ancestor_chain, parse_peer, socket_owner


def test_the_sending_process_is_found_from_the_connection():
    server = socket.create_server(("127.0.0.1", 0))
    child = subprocess.Popen([sys.executable, "-c", "import socket,sys,time; s=socket.create_connection(('127.0.0.1', "
                              f"{server.getsockname()[1]})); print(s.getsockname()[1], flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        conn, peer = server.accept()
        assert peer[1] == port
        grpc_peer = f"ipv4:127.0.0.1:{port}"
        assert parse_peer(grpc_peer) == ("127.0.0.1", port) and parse_peer(peer) == ("127.0.0.1", port)
        assert socket_owner(parse_peer(grpc_peer), [os.getpid(), child.pid]) == child.pid
        assert socket_owner(("127.0.0.1", port), [os.getpid()]) is None  # not ours
        conn.close()
    finally:
        child.kill()
        child.wait()
        server.close()
    assert parse_peer("unix:/tmp/x") is None and parse_peer("ipv6:[::1]:4317") == ("::1", 4317)


def fake_proc(tmp_path, procs):
    """procs: pid -> (ppid, innermost ns pid)."""
    for pid, (ppid, nspid) in procs.items():
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} (python3) S {ppid} 1 1 0")
        (d / "status").write_text(f"Name:\tpython3\nNSpid:\t{pid}" + (f"\t{nspid}" if nspid != pid else "") + "\n")
    return str(tmp_path)


def test_two_pods_each_api_server_pid_1_in_its_namespace(tmp_path):
    # pod A: API 100 (pid 1 inside) -> EngineCore 101 (DP rank 0) and 102 (DP rank 1), each doing CUDA itself
    # pod B: API 200 (pid 1 inside) -> EngineCore 201 -> workers 202, 203 (TP ranks)
    # pod C: API 300, same namespace as the sidecar -> EngineCore 301
    proc = fake_proc(tmp_path, {100: (50, 1), 101: (100, 7), 102: (100, 8), 200: (60, 1), 201: (200, 5),
                                202: (201, 6), 203: (201, 9), 300: (1, 300), 301: (300, 301)})
    traced = {pid: ancestor_chain(pid, proc) for pid in (101, 102, 202, 203, 301)}
    assert traced[202] == (201, 200, 60)
    m = InstanceMap("auto", lambda: traced, lambda pid: {}, proc=proc)
    assert m.resolve({"vllm.process_id": "1"}) is None, "two pods say 1: neither may be guessed"
    c = m.resolve({"vllm.process_id": "300"})
    assert (c.api_pid, c.engines, c.found_by) == (300, {301: (301,)}, "process_id")
    assert m.resolve({"vllm.process_id": "999"}) is None
    m._peers[("10.0.0.5", 4000)] = 200  # as _by_peer caches a connection's owner
    b = m.resolve({"vllm.process_id": "1"}, peer="ipv4:10.0.0.5:4000")
    assert (b.api_pid, b.engines, b.found_by) == (200, {201: (202, 203)}, "peer")
    m._peers[("10.0.0.6", 4001)] = 100
    a = m.resolve({"vllm.process_id": "1"}, peer=("10.0.0.6", 4001))
    assert a.engines == {101: (101,), 102: (102,)}
    host = InstanceMap("host", lambda: traced, lambda pid: {}, proc=proc).resolve({})
    assert host.engines == {p: (p,) for p in sorted(traced)}


def test_pod_attributes_when_no_process_is_named(tmp_path):
    proc = fake_proc(tmp_path, {101: (100, 101), 201: (200, 201)})
    traced = {pid: ancestor_chain(pid, proc) for pid in (101, 201)}
    pods = {101: {"k8s.pod.uid": "a"}, 201: {"k8s.pod.uid": "b"}}
    m = InstanceMap("auto", lambda: traced, pods.get, proc=proc)
    assert m.resolve({"k8s.pod.uid": "b"}).engines == {201: (201,)}
    assert m.resolve({"k8s.pod.uid": "c"}) is None


def test_a_sender_that_exited_before_its_last_spans_were_joined(tmp_path):
    """vLLM's API server flushes its last llm_request spans as it shuts down: the join runs after it is gone."""
    import shutil

    proc = fake_proc(tmp_path, {200: (60, 1), 201: (200, 5), 202: (201, 6)})  # pod B: API pid 1 in its namespace
    traced = {pid: ancestor_chain(pid, proc) for pid in (202,)}
    m = InstanceMap("auto", lambda: traced, lambda pid: {}, proc=proc)
    m.note(traced[202])  # at selection, while everything lives
    for pid in (200, 201, 202):
        shutil.rmtree(tmp_path / str(pid))
    found = m.resolve({"vllm.process_id": "1"})
    assert (found.api_pid, found.engines) == (200, {201: (202,)})
