"""pid -> container -> pod: the Kubernetes resource attributes of a traced process.

Two ways to know the pod, chosen by ``K8sConfig.mode``:

- ``downward`` (sidecar mode): the chart puts the pod's identity into this container's environment through the
  downward API (K8S_POD_NAME, K8S_POD_UID, K8S_NAMESPACE, K8S_NODE_NAME, K8S_CONTAINER_NAME = the traced
  container). Only ``container.id`` comes from the traced process itself (its /proc/PID/cgroup).
- ``api`` (DaemonSet mode): one sidecar per node traces processes of many pods. Each process's cgroup names its
  container id; a cache of the node's pods (listed once, then kept fresh by a watch, both filtered on the server by
  ``spec.nodeName`` and the label selector) maps container ids to pods.

Nothing here may stop tracing: every failure (API unreachable, RBAC refused, unreadable cgroup) is logged once
with its cause and turned into missing attributes plus a reason the caller can show (``lookup(pid).reason``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

MODES = ("off", "downward", "api")

# Downward-API environment -> OpenTelemetry resource attribute (semantic conventions, k8s.* registry).
DOWNWARD_ENV = {
    "K8S_POD_NAME": "k8s.pod.name",
    "K8S_POD_UID": "k8s.pod.uid",
    "K8S_NAMESPACE": "k8s.namespace.name",
    "K8S_NODE_NAME": "k8s.node.name",
    "K8S_CONTAINER_NAME": "k8s.container.name",
}

# A container id is 64 hex digits, as the runtime names the cgroup leaf:
#   cgroup v2, systemd driver: .../kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope   (containerd, k3s)
#                              .../crio-<id>.scope                                             (cri-o)
#                              .../docker-<id>.scope                                           (docker)
#   cgroupfs driver (v1 or v2): /kubepods/burstable/pod<uid>/<id>  ;  /docker/<id>
# cri-o's monitor process lives in crio-conmon-<id>.scope: that is not the container, so it is refused.
_CONTAINER_ID = re.compile(r"(?:^|[/-])(?<!conmon-)([0-9a-f]{64})(?:\.scope)?$")
# The pod uid is in the parent cgroup: pod<uid> (cgroupfs, dashes) or ...-pod<uid>.slice (systemd, underscores).
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?(?:/|$)")
# containerStatuses[].containerID: "containerd://<id>", "cri-o://<id>", "docker://<id>".
_RUNTIME_PREFIX = re.compile(r"^[a-z0-9-]+://")


@dataclass(frozen=True)
class K8sConfig:
    """Settings of the resolver (from --k8s, K8S_NODE_NAME, --pod-selector)."""

    mode: str = "off"
    node_name: str = ""
    pod_selector: str = ""  # a Kubernetes label selector, applied by the API server
    namespace: str = ""  # optional: watch one namespace only (then a Role is enough instead of a ClusterRole)
    proc_root: str = "/proc"
    # Before the first successful list nothing is known: tracing a --match'ed process that may not be selected
    # is better than tracing nothing while the API is down ("keeps tracing"). Set False to wait for the API.
    select_when_unknown: bool = True
    watch_timeout_seconds: int = 300  # server-side end of one watch; the loop then re-watches
    request_timeout_seconds: float = 10.0
    retry_max_seconds: float = 30.0
    refresh_on_miss_seconds: float = 2.0  # a pid of a brand-new pod may precede the watch event: re-list, but rarely

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"k8s mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode == "api" and not self.node_name:
            raise ValueError("k8s mode 'api' needs the node name (K8S_NODE_NAME from the downward API)")


@dataclass(frozen=True)
class Lookup:
    """What is known of one pid: attributes to put on its resource, and why any are missing ('' when none)."""

    attributes: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    selected: bool = True


@dataclass(frozen=True)
class _Pod:
    uid: str
    name: str
    namespace: str
    node: str
    ip: str
    containers: tuple[tuple[str, str], ...]  # (container id, container name)


def in_cluster_api() -> tuple[Any | None, str]:
    """A CoreV1Api from the pod's service account, or (None, why not). For the pipeline to pass to PodResolver."""
    try:
        import kubernetes

        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_incluster_config(client_configuration=cfg)
        # urllib3 retries each failed connection 3 times and warns each time; the watch loop retries on its own.
        cfg.retries = False
        return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(cfg)), ""
    except Exception as exc:
        return None, f"no in-cluster Kubernetes config ({type(exc).__name__}: {exc})"


def downward_api_attributes(env: Mapping[str, str]) -> dict[str, str]:
    """k8s.* resource attributes from the downward-API environment the chart sets; unset or empty ones left out."""
    return {attr: env[var] for var, attr in DOWNWARD_ENV.items() if env.get(var)}


def container_id_from_cgroup(text: str) -> str:
    """The container id in the content of /proc/PID/cgroup (v1 or v2), '' when the process is in none.

    The last matching line wins in v1 (every controller names the same leaf); paths seen through a cgroup namespace
    (``0::/../cri-containerd-<id>.scope``) keep their leaf, which is all that is needed.
    """
    found = ""
    for line in text.splitlines():
        path = line.split(":", 2)[-1].strip()
        for part in reversed(path.split("/")):
            m = _CONTAINER_ID.search(part)
            if m and "conmon" not in part:
                found = m.group(1)
                break
    return found


def pod_uid_from_cgroup(text: str) -> str:
    """The pod uid in a kubelet cgroup path (pod<uid> or ...-pod<uid_with_underscores>.slice), '' if none."""
    for line in text.splitlines():
        m = _POD_UID.search(line.split(":", 2)[-1])
        if m:
            return m.group(1).replace("_", "-")
    return ""


class _OnceLog:
    """Log each distinct problem once at WARNING, again only after it was resolved (then INFO says so)."""

    def __init__(self) -> None:
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def problem(self, key: str, message: str, *args: Any) -> None:
        with self._lock:
            first = key not in self._active
            self._active.add(key)
        (logger.warning if first else logger.debug)(message, *args)

    def resolved(self, key: str, message: str, *args: Any) -> None:
        with self._lock:
            was = key in self._active
            self._active.discard(key)
        if was:
            logger.info(message, *args)


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if status == 401 or status == 403:
        return f"the API server refused ({status}): check the service account's RBAC (get/list/watch pods)"
    if status:
        return f"the API server answered {status} {getattr(exc, 'reason', '')}".strip()
    return f"the Kubernetes API is unreachable ({type(exc).__name__}: {exc})"


def _pod_from_model(pod: Any) -> _Pod:
    meta, spec, status = pod.metadata, pod.spec, pod.status
    containers: list[tuple[str, str]] = []
    if status is not None:
        for statuses in (status.container_statuses, status.init_container_statuses,
                         status.ephemeral_container_statuses):
            for cs in statuses or ():
                if cs.container_id:
                    containers.append((_RUNTIME_PREFIX.sub("", cs.container_id), cs.name))
    return _Pod(
        uid=meta.uid or "",
        name=meta.name or "",
        namespace=meta.namespace or "",
        node=(spec.node_name if spec is not None else "") or "",
        ip=(status.pod_ip if status is not None else "") or "",
        containers=tuple(containers),
    )


class PodResolver:
    """Resource attributes and label selection of traced pids; cached, refreshed in the background, never raises.

    ``api`` is a ``kubernetes.client.CoreV1Api`` (``None`` outside DaemonSet mode, or when no in-cluster config
    could be loaded: then every lookup says so). ``env`` defaults to ``os.environ`` (downward mode).
    """

    def __init__(self, config: K8sConfig, api: Any | None = None, *, env: Mapping[str, str] | None = None,
                 start: bool = True) -> None:
        self.config = config
        self._api = api
        self._downward = downward_api_attributes(os.environ if env is None else env)
        self._log = _OnceLog()
        self._lock = threading.Lock()
        self._pods: dict[str, _Pod] = {}  # uid -> pod
        self._by_container: dict[str, tuple[_Pod, str]] = {}  # container id -> (pod, container name)
        self._by_ip: dict[str, _Pod] = {}
        self._synced = False
        self._sync_error = "" if api is not None else "no Kubernetes API client (not in a cluster, or no config)"
        self._last_miss_refresh = float("-inf")
        self._rv: str | None = None  # resourceVersion of the last list, where the watch starts
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None
        if config.mode == "api":
            if api is None:
                self._log.problem("noapi", "k8s: %s; pods stay unresolved", self._sync_error)
            elif start:
                # One synchronous list so that the first pids discovered are resolved; then a watch keeps it fresh.
                self._relist()
                self._thread = threading.Thread(target=self._watch_loop, name="otel-cuda-k8s-watch", daemon=True)
                self._thread.start()

    # --- the interface the pipeline calls -------------------------------------------------------------------
    def resource_attributes(self, pid: int) -> dict[str, str]:
        return self.lookup(pid).attributes

    def selected(self, pid: int) -> bool:
        return self.lookup(pid).selected

    def close(self) -> None:
        """Stop the watch; idempotent, returns within about a second."""
        self._stop.set()
        t = self._thread
        if t is None or t is threading.current_thread():
            return
        # Watch.stop() shuts the response's socket down so a blocked read returns now — but only once the response
        # exists; a watch whose request is in flight would block until the server writes. So stop it again until
        # the thread ends.
        deadline = time.monotonic() + 2.0
        while t.is_alive() and time.monotonic() < deadline:
            w = self._watch
            if w is not None:
                w.stop()
            t.join(timeout=0.05)

    def lookup(self, pid: int) -> Lookup:
        """Attributes, selection and the reason for anything missing, for one pid. Never raises."""
        try:
            return self._lookup(pid)
        except Exception as exc:  # a stage boundary: resolution must not break tracing
            logger.exception("k8s: resolving pid %s failed", pid)
            return Lookup({}, f"internal error: {exc}", True)

    def pod_attributes_for_ip(self, ip: str) -> dict[str, str]:
        """The pod with this IP on this node (DaemonSet mode): for spans a pod sent to the receiver. {} if unknown."""
        with self._lock:
            pod = self._by_ip.get(ip)
        return self._pod_attributes(pod) if pod else {}

    @property
    def synced(self) -> bool:
        return self._synced

    # --- internals ------------------------------------------------------------------------------------------
    def _lookup(self, pid: int) -> Lookup:
        mode = self.config.mode
        if mode == "off":
            return Lookup({}, "", True)
        cgroup, why = self._read_cgroup(pid)
        cid = container_id_from_cgroup(cgroup)
        if mode == "downward":
            attrs = dict(self._downward)
            if cid:
                attrs["container.id"] = cid
            reason = why or ("" if self._downward else "downward-API variables (K8S_POD_NAME, ...) are not set")
            return Lookup(attrs, reason, True)

        # api mode
        node_attrs = {"k8s.node.name": self.config.node_name}
        if why:
            return Lookup(node_attrs, why, self._unknown_selection())
        if not cid:
            return Lookup(node_attrs, f"pid {pid} is in no container (cgroup {cgroup.strip()[:120]!r})", False)
        hit = self._find(cid)
        if hit is None and self._synced:
            self._refresh_on_miss()
            hit = self._find(cid)
        if hit is not None:
            pod, cname = hit
            attrs = self._pod_attributes(pod)
            attrs["k8s.container.name"] = cname
            attrs["container.id"] = cid
            return Lookup(attrs, "", True)
        attrs = dict(node_attrs, **{"container.id": cid})
        uid = pod_uid_from_cgroup(cgroup)
        if uid:
            attrs["k8s.pod.uid"] = uid  # lets the Collector's k8s_attributes fill in the rest
        if not self._synced:
            return Lookup(attrs, f"pod list not available: {self._sync_error}", self._unknown_selection())
        return Lookup(attrs, f"container {cid[:12]} is in no pod on node {self.config.node_name} matching "
                             f"selector {self.config.pod_selector or '(all)'}", False)

    def _unknown_selection(self) -> bool:
        return self.config.select_when_unknown and not self._synced

    def _read_cgroup(self, pid: int) -> tuple[str, str]:
        path = os.path.join(self.config.proc_root, str(int(pid)), "cgroup")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read(), ""
        except OSError as exc:
            reason = f"cannot read {path}: {exc.strerror or exc}"
            self._log.problem(f"cgroup:{type(exc).__name__}", "k8s: %s", reason)
            return "", reason

    def _find(self, cid: str) -> tuple[_Pod, str] | None:
        with self._lock:
            return self._by_container.get(cid)

    def _pod_attributes(self, pod: _Pod) -> dict[str, str]:
        attrs = {"k8s.pod.name": pod.name, "k8s.pod.uid": pod.uid, "k8s.namespace.name": pod.namespace,
                 "k8s.node.name": pod.node or self.config.node_name}
        return {k: v for k, v in attrs.items() if v}

    def _list_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"field_selector": f"spec.nodeName={self.config.node_name}"}
        if self.config.pod_selector:
            kw["label_selector"] = self.config.pod_selector
        return kw

    def _list_call(self) -> Any:
        if self.config.namespace:
            return lambda **kw: self._api.list_namespaced_pod(self.config.namespace, **kw)
        return self._api.list_pod_for_all_namespaces

    def _relist(self) -> str | None:
        """Replace the cache with a fresh list; the resourceVersion to watch from, None on failure."""
        try:
            result = self._list_call()(_request_timeout=self.config.request_timeout_seconds, **self._list_kwargs())
        except Exception as exc:
            self._sync_error = _describe(exc)
            self._log.problem("list", "k8s: listing pods on node %s failed: %s; pod attributes stay missing "
                              "until it works (tracing goes on)", self.config.node_name, self._sync_error)
            return None
        pods = [_pod_from_model(p) for p in (result.items or [])]
        with self._lock:
            self._pods = {p.uid: p for p in pods}
            self._reindex()
        self._synced = True
        self._sync_error = ""
        self._log.resolved("list", "k8s: pod list on node %s works again (%d pods)", self.config.node_name, len(pods))
        self._rv = (result.metadata.resource_version if result.metadata else None) or ""
        return self._rv

    def _reindex(self) -> None:
        self._by_container = {cid: (p, name) for p in self._pods.values() for cid, name in p.containers}
        self._by_ip = {p.ip: p for p in self._pods.values() if p.ip}

    def _apply(self, kind: str, pod: _Pod) -> None:
        with self._lock:
            if kind == "DELETED":
                self._pods.pop(pod.uid, None)
            else:
                self._pods[pod.uid] = pod
            self._reindex()

    def _refresh_on_miss(self) -> None:
        # A process can start before the kubelet reports its container id and the watch delivers it; one rate
        # limited re-list catches that without turning every unknown pid into an API call.
        import time

        now = time.monotonic()
        if now - self._last_miss_refresh < self.config.refresh_on_miss_seconds:
            return
        self._last_miss_refresh = now
        self._relist()

    def _watch_loop(self) -> None:
        from kubernetes import watch

        backoff = 1.0
        rv = self._rv  # None: the first list failed, so list before watching
        while not self._stop.is_set():
            if rv is None:
                rv = self._relist()
                if rv is None:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.config.retry_max_seconds)
                    continue
            try:
                self._watch = watch.Watch()
                kw = self._list_kwargs()
                if rv:
                    kw["resource_version"] = rv
                for event in self._watch.stream(self._list_call(), timeout_seconds=self.config.watch_timeout_seconds,
                                                _request_timeout=self.config.watch_timeout_seconds + 30, **kw):
                    if self._stop.is_set():
                        break
                    kind, obj = event.get("type"), event.get("object")
                    if kind in ("ADDED", "MODIFIED", "DELETED") and obj is not None and hasattr(obj, "metadata"):
                        self._apply(kind, _pod_from_model(obj))
                rv = self._watch.resource_version or rv
                backoff = 1.0
                self._log.resolved("watch", "k8s: watching pods works again")
            except Exception as exc:
                if self._stop.is_set():
                    break
                gone = getattr(exc, "status", None) == 410
                if not gone:
                    self._log.problem("watch", "k8s: watching pods failed: %s; re-listing", _describe(exc))
                rv = None  # list again: the cache may have missed events
                self._stop.wait(0 if gone else backoff)
                backoff = min(backoff * 2, self.config.retry_max_seconds)
            finally:
                self._watch = None
