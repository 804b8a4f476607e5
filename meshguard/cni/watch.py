"""The node agent's watch on its pods' denials (issue 26 item 2, CNI mode; opt-in).

After an ADD the agent answered for a pod meshguard injected, it keeps a copy of the pod's
namespace descriptor, binds :data:`NFLOG_GROUP` there (:mod:`meshguard.cni.nflog`) and reads
the pod once more for attribution (its admitted status and declared ports). One thread
reads every pod's group: each packet a meshguard rule logged becomes a
:class:`~meshguard.cni.denials.Denial`, written as one JSON line (at most
:data:`LINES_PER_SECOND` per pod; the rest only counted) and counted in the agent's
:class:`~meshguard.cni.denials.DenialCounters`. The pod's DEL ends its watch, its socket
and its series. At most :data:`MAX_PODS` pods are watched; nothing of the watch can fail or
delay a CNI call (it works after the answer, off the call's path).

Not built yet: meshguard's rules do not log to NFLOG (the group and prefixes are what they
are to use); the counters are not served over HTTP; init-container pods are not watched.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from meshguard import annotation_keys
from meshguard.cni.denials import Denial, DenialCounters, PodView, attribute
from meshguard.cni.kube import Connections, api_access, get_pod
from meshguard.cni.nflog import Group, bind_group
from meshguard.cni.protocol import CniError, parse_args, read_netconf
from meshguard.errors import MeshguardError, MeshguardFailure
from meshguard.status import MalformedStatusError, read_status

log = logging.getLogger(__name__)

#: The NFLOG group meshguard's rules are to log denials to.
NFLOG_GROUP: Final = 4747
MAX_PODS: Final = 1024
LINES_PER_SECOND: Final = 20
_READ_SECONDS: Final = 0.5


@dataclass(frozen=True, kw_only=True)
class _Watched:
    pod: PodView
    group: Group
    lines: list[float]  # the times of this second's lines (the rate limit)


class DenialWatch:
    """The pods watched, and the thread that reads them."""

    def __init__(self, *, connections: Connections, group: int = NFLOG_GROUP) -> None:
        self._connections = connections
        self._group = group
        self._lock = threading.Lock()
        self._pods: dict[str, _Watched] = {}  # by sandbox (CNI_CONTAINERID)
        # Sockets the reader closes: it may be waiting on one (closed under it, its number
        # could be reused by the next socket opened).
        self._closing: list[Group] = []
        self._stop = threading.Event()
        self.counters = DenialCounters()
        self._reader = threading.Thread(target=self._read_all, name="denial-watch", daemon=True)
        self._reader.start()

    def added(self, *, variables: Mapping[str, str], stdin: bytes, netns_fd: int) -> None:
        """After a successful ADD: watch the sandbox, if meshguard injected its pod. Takes
        ``netns_fd`` (a copy the caller made) and closes it."""
        try:
            view = self._pod_view(variables, stdin)
            if view is None:
                return
            with self._lock:
                if len(self._pods) >= MAX_PODS:
                    log.warning("denial watch: %d pods watched, not %s/%s", MAX_PODS,
                                view.namespace, view.name,
                                extra={"fields": {"event": "denial-watch-full"}})  # fmt: skip
                    return
            group = bind_group(f"/proc/self/fd/{netns_fd}", group=self._group)
        except (MeshguardError, CniError, OSError) as exc:
            reason = exc.msg if isinstance(exc, CniError) else str(exc)
            fields = {"event": "denial-watch-failed", "reason": reason}
            log.warning("denial watch not started: %s", reason, extra={"fields": fields})
            return
        finally:
            os.close(netns_fd)
        sandbox = variables.get("CNI_CONTAINERID", "")
        with self._lock:
            previous = self._pods.pop(sandbox, None)
            self._pods[sandbox] = _Watched(pod=view, group=group, lines=[])
            if previous is not None:
                self._closing.append(previous.group)

    def deleted(self, *, variables: Mapping[str, str]) -> None:
        """After a DEL: the sandbox's watch, socket and series end."""
        with self._lock:
            watched = self._pods.pop(variables.get("CNI_CONTAINERID", ""), None)
            if watched is not None:
                self._closing.append(watched.group)
        if watched is not None:
            self.counters.forget(namespace=watched.pod.namespace, pod=watched.pod.name)

    def watched(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted((w.pod.namespace, w.pod.name) for w in self._pods.values())

    def close(self) -> None:
        self._stop.set()
        self._reader.join(timeout=5)
        with self._lock:
            groups = [w.group for w in self._pods.values()] + self._closing
            self._pods, self._closing = {}, []
        for group in groups:
            group.close()

    def _pod_view(self, variables: Mapping[str, str], stdin: bytes) -> PodView | None:
        args = parse_args(variables.get("CNI_ARGS", ""))
        namespace, name = args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")
        if not namespace or not name:
            return None
        conf = read_netconf(stdin.decode("utf-8", "replace"))
        access = api_access(conf.kubernetes, os.environ)
        pod = get_pod(access, namespace=namespace, name=name, connections=self._connections)
        annotations = pod["metadata"].get("annotations") or {}
        try:
            status = read_status(annotations.get(annotation_keys.STATUS))
        except MalformedStatusError:
            return None
        if status is None:
            return None
        return PodView(namespace=namespace, name=name, status=status, ports=_ports(pod))

    def _read_all(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                pods = list(self._pods.values())
                closing, self._closing = self._closing, []
            for group in closing:
                group.close()
            if not pods:
                self._stop.wait(_READ_SECONDS)
                continue
            for watched in pods:
                with contextlib.suppress(OSError, MeshguardError):  # closed under us: DEL
                    for logged in watched.group.read(timeout=_READ_SECONDS / len(pods)):
                        denial = attribute(logged, watched.pod)
                        if denial is not None:
                            self._record(watched, denial)

    def _record(self, watched: _Watched, denial: Denial) -> None:
        self.counters.add(denial)
        now = time.monotonic()
        watched.lines[:] = [t for t in watched.lines if now - t < 1.0]
        if len(watched.lines) >= LINES_PER_SECOND:
            return
        watched.lines.append(now)
        fields = {**denial.__dict__, "event": "loopback-denial"}
        log.info("loopback connection denied", extra={"fields": fields})


def _ports(pod: Mapping[str, Any]) -> dict[int, str]:
    spec = pod.get("spec") or {}
    ports: dict[int, str] = {}
    for field in ("initContainers", "containers"):
        for container in spec.get(field) or []:
            for port in container.get("ports") or []:
                number = port.get("containerPort") if isinstance(port, dict) else None
                if isinstance(number, int):
                    ports.setdefault(number, str(container.get("name", "")))
    return ports


@contextlib.contextmanager
def serving_metrics(counters: DenialCounters, *, port: int) -> Iterator[int]:
    """``GET /metrics`` (the Prometheus text format of ``counters``) on ``port`` of every
    address while the block runs; yields the port (0: one the kernel chose)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = counters.exposition().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass  # a scrape is not an event

    try:
        server = http.server.ThreadingHTTPServer(("", port), Handler)
    except OSError as exc:
        raise MeshguardFailure(f"cannot serve metrics on port {port}: {exc}") from None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
