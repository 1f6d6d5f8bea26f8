"""otel_cuda.k8s against a real local HTTP server that answers like the Kubernetes API, through the real client."""

from __future__ import annotations

import http.server
import json
import logging
import queue
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import kubernetes
import pytest

from otel_cuda.k8s import (
    K8sConfig,
    PodResolver,
    container_id_from_cgroup,
    downward_api_attributes,
    pod_uid_from_cgroup,
)

NODE = "gpu-node-1"
CID_VLLM = "a" * 63 + "1"
CID_SIDE = "b" * 63 + "2"
CID_OTHER = "c" * 63 + "3"
CID_LATE = "d" * 63 + "4"
UID_VLLM = "5f0c1d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f"
UID_OTHER = "11111111-2222-4333-8444-555555555555"
UID_LATE = "66666666-7777-4888-9999-000000000000"


# --- cgroup parsing ------------------------------------------------------------------------------------------
CGROUPS = {
    "containerd cgroup v2, systemd driver": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_VLLM.replace('-', '_')}.slice/"
        f"cri-containerd-{CID_VLLM}.scope\n", CID_VLLM, UID_VLLM),
    "k3s containerd, cgroupfs driver": (
        f"0::/kubepods/besteffort/pod{UID_VLLM}/{CID_VLLM}\n", CID_VLLM, UID_VLLM),
    "cgroup v1, several controllers": (
        "12:pids:/kubepods/burstable/pod{u}/{c}\n11:memory:/kubepods/burstable/pod{u}/{c}\n"
        "1:name=systemd:/kubepods/burstable/pod{u}/{c}\n".format(u=UID_VLLM, c=CID_VLLM), CID_VLLM, UID_VLLM),
    "cri-o": (
        f"0::/kubepods.slice/kubepods-pod{UID_VLLM.replace('-', '_')}.slice/crio-{CID_VLLM}.scope\n",
        CID_VLLM, UID_VLLM),
    "docker": (f"0::/system.slice/docker-{CID_VLLM}.scope\n", CID_VLLM, ""),
    "docker cgroupfs v1": (f"4:cpu,cpuacct:/docker/{CID_VLLM}\n", CID_VLLM, ""),
    "seen through a cgroup namespace": (f"0::/../cri-containerd-{CID_VLLM}.scope\n", CID_VLLM, ""),
    "own cgroup namespace root": ("0::/\n", "", ""),
    "host process": ("0::/system.slice/sshd.service\n", "", ""),
    "cri-o monitor is not the container": (
        f"0::/kubepods.slice/kubepods-pod{UID_VLLM.replace('-', '_')}.slice/crio-conmon-{CID_VLLM}.scope\n",
        "", UID_VLLM),
}


@pytest.mark.parametrize("name", list(CGROUPS))
def test_cgroup_formats(name):
    text, cid, uid = CGROUPS[name]
    assert container_id_from_cgroup(text) == cid
    assert pod_uid_from_cgroup(text) == uid


def test_downward_api_attributes_maps_and_skips_empty():
    env = {"K8S_POD_NAME": "vllm-0", "K8S_POD_UID": UID_VLLM, "K8S_NAMESPACE": "llm", "K8S_NODE_NAME": NODE,
           "K8S_CONTAINER_NAME": "", "PATH": "/bin"}
    assert downward_api_attributes(env) == {
        "k8s.pod.name": "vllm-0", "k8s.pod.uid": UID_VLLM, "k8s.namespace.name": "llm", "k8s.node.name": NODE}


def test_config_is_validated():
    with pytest.raises(ValueError):
        K8sConfig(mode="kubelet")
    with pytest.raises(ValueError):
        K8sConfig(mode="api")  # no node name


# --- a fake /proc ----------------------------------------------------------------------------------------------
@pytest.fixture
def proc(tmp_path: Path) -> Path:
    def put(pid: int, text: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)

    put(100, f"0::/kubepods/burstable/pod{UID_VLLM}/{CID_VLLM}\n")
    put(101, f"0::/kubepods/burstable/pod{UID_VLLM}/{CID_SIDE}\n")
    put(200, f"0::/kubepods.slice/kubepods-pod{UID_OTHER.replace('-', '_')}.slice/cri-containerd-{CID_OTHER}.scope\n")
    put(300, f"0::/kubepods/besteffort/pod{UID_LATE}/{CID_LATE}\n")
    put(400, "0::/system.slice/kubelet.service\n")
    return tmp_path


def test_downward_mode_reads_env_and_container_id(proc):
    env = {"K8S_POD_NAME": "vllm-0", "K8S_POD_UID": UID_VLLM, "K8S_NAMESPACE": "llm", "K8S_NODE_NAME": NODE,
           "K8S_CONTAINER_NAME": "vllm"}
    r = PodResolver(K8sConfig(mode="downward", proc_root=str(proc)), None, env=env)
    assert r.resource_attributes(100) == {
        "k8s.pod.name": "vllm-0", "k8s.pod.uid": UID_VLLM, "k8s.namespace.name": "llm", "k8s.node.name": NODE,
        "k8s.container.name": "vllm", "container.id": CID_VLLM}
    assert r.selected(100)
    r.close()


def test_downward_mode_without_env_says_why(proc):
    r = PodResolver(K8sConfig(mode="downward", proc_root=str(proc)), None, env={})
    look = r.lookup(100)
    assert look.attributes == {"container.id": CID_VLLM}
    assert "K8S_POD_NAME" in look.reason


def test_off_mode_adds_nothing(proc):
    r = PodResolver(K8sConfig(mode="off", proc_root=str(proc)), None, env={"K8S_POD_NAME": "x"})
    assert r.resource_attributes(100) == {} and r.selected(100)


# --- a fake Kubernetes API server --------------------------------------------------------------------------
def pod(name, uid, ns, containers, ip, labels=None, node=NODE, rv="10"):
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": rv, "labels": labels or {}},
        "spec": {"nodeName": node, "containers": [{"name": n, "image": "x"} for n, _ in containers]},
        "status": {"phase": "Running", "podIP": ip,
                   "containerStatuses": [{"name": n, "containerID": f"containerd://{c}", "image": "x", "imageID": "",
                                          "ready": True, "restartCount": 0} for n, c in containers]},
    }


class FakeAPI:
    """Answers GET /api/v1/pods (list and watch) the way kube-apiserver does; records every query."""

    def __init__(self, pods, status=200):
        self.pods = list(pods)
        self.status = status
        self.queries: list[dict[str, list[str]]] = []
        self.events: queue.Queue = queue.Queue()
        self.closing = threading.Event()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                q = urllib.parse.parse_qs(url.query)
                api.queries.append(q)
                if url.path != "/api/v1/pods":
                    return self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                if api.status != 200:
                    return self._json(api.status, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                   "reason": "Forbidden", "code": api.status,
                                                   "message": 'pods is forbidden: User "system:serviceaccount:x:y" '
                                                              'cannot list resource "pods"'})
                if q.get("watch") == ["true"]:
                    return self._watch(float(q.get("timeoutSeconds", ["5"])[0]))
                items = [p for p in api.pods if self._matches(p, q)]
                return self._json(200, {"kind": "PodList", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": "42"}, "items": items})

            def _matches(self, p, q):
                for sel in q.get("fieldSelector", []):
                    key, _, val = sel.partition("=")
                    if key == "spec.nodeName" and p["spec"]["nodeName"] != val:
                        return False
                for sel in q.get("labelSelector", []):
                    for term in sel.split(","):
                        key, _, val = term.partition("=")
                        if p["metadata"]["labels"].get(key) != val:
                            return False
                return True

            def _json(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _watch(self, timeout):
                # As kube-apiserver does: HTTP/1.1, chunked, one JSON event per line, until timeoutSeconds.
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                end = time.monotonic() + timeout
                try:
                    while time.monotonic() < end and not api.closing.is_set():
                        try:
                            ev = api.events.get(timeout=0.05)
                        except queue.Empty:
                            continue
                        line = (json.dumps(ev) + "\n").encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass
                self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def client(self):
        cfg = kubernetes.client.Configuration()
        cfg.host = self.url
        return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))

    def stop(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


VLLM_POD = pod("vllm-7d9f-abcde", UID_VLLM, "llm", [("vllm", CID_VLLM), ("otel-cuda", CID_SIDE)], "10.42.0.17",
               labels={"app.kubernetes.io/name": "vllm"})
OTHER_POD = pod("trainer-0", UID_OTHER, "research", [("train", CID_OTHER)], "10.42.0.18",
                labels={"app.kubernetes.io/name": "trainer"})
ELSEWHERE_POD = pod("vllm-elsewhere", "99999999-8888-4777-a666-555555555555", "llm", [("vllm", "e" * 64)],
                    "10.42.1.5", labels={"app.kubernetes.io/name": "vllm"}, node="gpu-node-2")


@pytest.fixture
def api():
    server = FakeAPI([VLLM_POD, OTHER_POD, ELSEWHERE_POD])
    yield server
    server.stop()


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def api_config(proc, **kw):
    return K8sConfig(mode="api", node_name=NODE, proc_root=str(proc), watch_timeout_seconds=2, **kw)


def test_api_mode_resolves_pid_to_pod(api, proc):
    r = PodResolver(api_config(proc), api.client())
    try:
        assert r.synced
        assert r.resource_attributes(100) == {
            "k8s.pod.name": "vllm-7d9f-abcde", "k8s.pod.uid": UID_VLLM, "k8s.namespace.name": "llm",
            "k8s.node.name": NODE, "k8s.container.name": "vllm", "container.id": CID_VLLM}
        assert r.resource_attributes(200)["k8s.pod.name"] == "trainer-0"
        assert r.pod_attributes_for_ip("10.42.0.17")["k8s.pod.uid"] == UID_VLLM
        # Only this node's pods were asked for, filtered by the server.
        assert api.queries[0]["fieldSelector"] == [f"spec.nodeName={NODE}"]
        assert "labelSelector" not in api.queries[0]
    finally:
        r.close()


def test_api_mode_label_selector_chooses_pods(api, proc):
    r = PodResolver(api_config(proc, pod_selector="app.kubernetes.io/name=vllm"), api.client())
    try:
        assert api.queries[0]["labelSelector"] == ["app.kubernetes.io/name=vllm"]
        assert r.selected(100)
        other = r.lookup(200)
        assert not other.selected and "selector app.kubernetes.io/name=vllm" in other.reason
        # What can be known without the pod is still there for the Collector to join on.
        assert other.attributes == {"k8s.node.name": NODE, "container.id": CID_OTHER, "k8s.pod.uid": UID_OTHER}
        host = r.lookup(400)
        assert not host.selected and "in no container" in host.reason
    finally:
        r.close()


def test_watch_keeps_the_cache_fresh(api, proc):
    r = PodResolver(api_config(proc), api.client())
    try:
        assert wait_for(lambda: any(q.get("watch") == ["true"] for q in api.queries))
        watch_q = next(q for q in api.queries if q.get("watch") == ["true"])
        assert watch_q["resourceVersion"] == ["42"] and watch_q["fieldSelector"] == [f"spec.nodeName={NODE}"]
        late = pod("late-0", UID_LATE, "llm", [("vllm", CID_LATE)], "10.42.0.30", rv="43")
        api.events.put({"type": "ADDED", "object": late})
        assert wait_for(lambda: r.resource_attributes(300).get("k8s.pod.name") == "late-0")
        api.pods.remove(VLLM_POD)  # the server's state and its event agree, as they do in a cluster
        api.events.put({"type": "DELETED", "object": VLLM_POD})
        assert wait_for(lambda: "k8s.pod.name" not in r.resource_attributes(100))
    finally:
        r.close()


def test_new_pod_before_its_watch_event_is_found_by_one_relist(api, proc):
    r = PodResolver(api_config(proc, refresh_on_miss_seconds=0.0), api.client())
    try:
        api.pods.append(pod("late-0", UID_LATE, "llm", [("vllm", CID_LATE)], "10.42.0.30"))
        assert r.resource_attributes(300)["k8s.pod.name"] == "late-0"
    finally:
        r.close()


def test_api_unreachable_keeps_tracing_and_says_why(proc, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = kubernetes.client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    client = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))
    caplog.set_level(logging.DEBUG, logger="otel_cuda.k8s")
    r = PodResolver(api_config(proc, request_timeout_seconds=1.0), client)
    try:
        looks = [r.lookup(100) for _ in range(5)]
        look = looks[-1]
        assert look.selected  # not known, so traced (select_when_unknown)
        assert look.attributes == {"k8s.node.name": NODE, "container.id": CID_VLLM, "k8s.pod.uid": UID_VLLM}
        assert "unreachable" in look.reason
        time.sleep(1.5)  # the watch thread retries meanwhile
        warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING and rec.name == "otel_cuda.k8s"]
        assert len(warnings) == 1, [w.getMessage() for w in warnings]  # logged once, not per retry or per pid
        assert "tracing goes on" in warnings[0].getMessage()
    finally:
        t0 = time.monotonic()
        r.close()
        assert time.monotonic() - t0 < 3


def test_api_unreachable_can_be_told_to_wait(proc):
    cfg = kubernetes.client.Configuration()
    cfg.host = "http://127.0.0.1:1"
    client = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg))
    r = PodResolver(api_config(proc, select_when_unknown=False, request_timeout_seconds=1.0), client)
    try:
        assert not r.selected(100)
    finally:
        r.close()


def test_rbac_refusal_is_named(proc):
    server = FakeAPI([VLLM_POD], status=403)
    try:
        r = PodResolver(api_config(proc), server.client())
        look = r.lookup(100)
        assert "RBAC" in look.reason and "403" in look.reason
        r.close()
    finally:
        server.stop()


def test_no_client_and_missing_pid_never_raise(proc):
    r = PodResolver(api_config(proc), None)
    assert "no Kubernetes API client" in r.lookup(100).reason
    gone = r.lookup(999999)
    assert "cannot read" in gone.reason and gone.attributes == {"k8s.node.name": NODE}
    r.close()
    r.close()  # idempotent


def test_close_is_prompt_while_a_watch_is_open(api, proc):
    r = PodResolver(K8sConfig(mode="api", node_name=NODE, proc_root=str(proc), watch_timeout_seconds=60),
                    api.client())
    assert wait_for(lambda: any(q.get("watch") == ["true"] for q in api.queries))
    t0 = time.monotonic()
    r.close()
    assert time.monotonic() - t0 < 2.5
    assert not r._thread.is_alive()


def test_in_cluster_api_outside_a_cluster_says_why(monkeypatch):
    from otel_cuda.k8s import in_cluster_api

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    api, why = in_cluster_api()
    assert api is None and "in-cluster" in why
