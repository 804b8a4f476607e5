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

The pod's attribution (its containers' uids, the proxy's) comes only from the admitted
record the webhook signed: the pod read from the API server is verified against the
webhook's public keys (:func:`verified_view`, :mod:`meshguard.attestation`) before its
``meshguard.io/status`` is read; a pod that does not verify is not watched (and says so).
Pods in init-container mode, whose namespaces no CNI call hands over, are found on the node
by :mod:`meshguard.cni.node_watch`, into the same watch (:meth:`DenialWatch.watch`). The
last :data:`RECENT_PER_POD` denials of each pod are kept for ``meshguard describe``
(``GET /denials`` beside ``/metrics``); Kubernetes Events are optional
(:mod:`meshguard.cni.events`).
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import logging
import os
import select
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from meshguard import annotation_keys
from meshguard.attestation import AttestationError, TrustedKeys, verify_pod
from meshguard.cni.denials import Denial, DenialCounters, PodView, attribute
from meshguard.cni.kube import Connections, api_access, get_pod
from meshguard.cni.nflog import Group, bind_group
from meshguard.cni.protocol import CniError, parse_args, read_netconf
from meshguard.errors import MeshguardError, MeshguardFailure
from meshguard.rules.settings import DENIAL_LOG_GROUP
from meshguard.status import MalformedStatusError, read_status

log = logging.getLogger(__name__)

#: The NFLOG group meshguard's rules log denials to.
NFLOG_GROUP: Final = DENIAL_LOG_GROUP
MAX_PODS: Final = 1024
LINES_PER_SECOND: Final = 20
#: Denials kept per pod for ``meshguard describe`` (the newest; older ones only counted).
RECENT_PER_POD: Final = 20
_READ_SECONDS: Final = 0.5


@dataclass(frozen=True, kw_only=True)
class _Watched:
    pod: PodView
    group: Group
    lines: list[float]  # the times of this second's lines (the rate limit)


class DenialWatch:
    """The pods watched, and the thread that reads them."""

    def __init__(
        self,
        *,
        connections: Connections,
        group: int = NFLOG_GROUP,
        on_denial: Callable[[Denial], None] | None = None,
    ) -> None:
        self._connections = connections
        self._group = group
        self._on_denial = on_denial
        self._recent: dict[tuple[str, str], collections.deque[dict[str, Any]]] = {}
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
            try:
                view = self._pod_view(variables, stdin)
            except (MeshguardError, CniError, OSError) as exc:
                reason = exc.msg if isinstance(exc, CniError) else str(exc)
                fields = {"event": "denial-watch-failed", "reason": reason}
                log.warning("denial watch not started: %s", reason, extra={"fields": fields})
                return
            if view is not None:
                sandbox = variables.get("CNI_CONTAINERID", "")
                self.watch(key=sandbox, view=view, netns=f"/proc/self/fd/{netns_fd}")
        finally:
            os.close(netns_fd)

    def watch(self, *, key: str, view: PodView, netns: str) -> bool:
        """Watch ``view``'s pod in the network namespace at ``netns`` under ``key`` (a
        sandbox, or a pod's UID); a pod watched under ``key`` before is replaced. False
        (logged) when it cannot be: too many pods, or the namespace's group is not ours."""
        with self._lock:
            if key not in self._pods and len(self._pods) >= MAX_PODS:
                log.warning("denial watch: %d pods watched, not %s/%s", MAX_PODS,
                            view.namespace, view.name,
                            extra={"fields": {"event": "denial-watch-full"}})  # fmt: skip
                return False
        try:
            group = bind_group(netns, group=self._group)
        except (MeshguardError, OSError) as exc:
            fields = {"event": "denial-watch-failed", "reason": str(exc),
                      "namespace": view.namespace, "pod": view.name}  # fmt: skip
            log.warning("denial watch not started: %s", exc, extra={"fields": fields})
            return False
        with self._lock:
            previous = self._pods.pop(key, None)
            self._pods[key] = _Watched(pod=view, group=group, lines=[])
            if previous is not None:
                self._closing.append(previous.group)
        fields = {"event": "denial-watch-started", "namespace": view.namespace, "pod": view.name}
        log.info("watching the pod's denials", extra={"fields": fields})
        return True

    def unwatch(self, *, key: str) -> None:
        """The watch under ``key`` ends: its socket, its series and its recent denials."""
        with self._lock:
            watched = self._pods.pop(key, None)
            if watched is not None:
                self._closing.append(watched.group)
                self._recent.pop((watched.pod.namespace, watched.pod.name), None)
        if watched is not None:
            self.counters.forget(namespace=watched.pod.namespace, pod=watched.pod.name)

    def watch_keys(self) -> set[str]:
        with self._lock:
            return set(self._pods)

    def recent(self, *, namespace: str, pod: str) -> list[dict[str, Any]]:
        """The pod's newest denials (at most :data:`RECENT_PER_POD`), oldest first."""
        with self._lock:
            return list(self._recent.get((namespace, pod), ()))

    def deleted(self, *, variables: Mapping[str, str]) -> None:
        """After a DEL: the sandbox's watch, socket and series end."""
        self.unwatch(key=variables.get("CNI_CONTAINERID", ""))

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
        if not conf.trusted_keys:
            raise MeshguardFailure(
                "the network configuration has no trustedKeys: a pod's denials are attributed"
                " only from its verified admitted record"
            )
        trusted = TrustedKeys.from_pem(conf.trusted_keys, origin="trustedKeys")
        access = api_access(conf.kubernetes, os.environ)
        pod = get_pod(access, namespace=namespace, name=name, connections=self._connections)
        return verified_view(pod, trusted=trusted)

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
            # One wait for every pod's socket (poll: no FD_SETSIZE limit), then read only the
            # ones with messages: an idle node costs one wakeup per _READ_SECONDS, whatever
            # the number of pods. Sockets are closed only by this thread (``closing``).
            poller = select.poll()
            by_fd = {watched.group.fileno(): watched for watched in pods}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(_READ_SECONDS * 1000):
                watched = by_fd[fd]
                with contextlib.suppress(OSError, MeshguardError):
                    for logged in watched.group.read(timeout=0):
                        denial = attribute(logged, watched.pod)
                        if denial is not None:
                            self._record(watched, denial)

    def _record(self, watched: _Watched, denial: Denial) -> None:
        self.counters.add(denial)
        with self._lock:
            recent = self._recent.setdefault(
                (denial.namespace, denial.pod), collections.deque(maxlen=RECENT_PER_POD)
            )
            recent.append({**denial.__dict__, "time": round(time.time(), 3)})
        if self._on_denial is not None:
            self._on_denial(denial)
        now = time.monotonic()
        watched.lines[:] = [t for t in watched.lines if now - t < 1.0]
        if len(watched.lines) >= LINES_PER_SECOND:
            return
        watched.lines.append(now)
        fields = {**denial.__dict__, "event": "loopback-denial"}
        log.info("loopback connection denied", extra={"fields": fields})


def verified_view(pod: Mapping[str, Any], *, trusted: TrustedKeys) -> PodView | None:
    """The pod's attribution, from its admitted record once the webhook's signature over it
    verifies for this pod (:func:`meshguard.attestation.verify_pod`); None for a pod
    meshguard did not admit (no status). :class:`AttestationError` for one whose record is
    not what the webhook signed for it: never attributed from unverified annotations."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    namespace, name = str(metadata.get("namespace", "")), str(metadata.get("name", ""))
    annotations = metadata.get("annotations") or {}
    if annotation_keys.STATUS not in annotations:
        return None
    verify_pod(trusted, metadata=metadata, spec=spec, where=f"pod {namespace}/{name}")
    try:
        status = read_status(annotations.get(annotation_keys.STATUS))
    except MalformedStatusError as exc:
        raise AttestationError(f"pod {namespace}/{name}: {exc}") from None
    if status is None:
        return None
    return PodView(namespace=namespace, name=name, status=status, ports=_ports(pod))


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
def serving_metrics(
    counters: DenialCounters, *, port: int, watch: DenialWatch | None = None
) -> Iterator[int]:
    """``GET /metrics`` (the Prometheus text format of ``counters``) on ``port`` of every
    address while the block runs; yields the port (0: one the kernel chose). With
    ``watch``, ``GET /denials?namespace=NS&pod=NAME`` too: the pod's recent denials
    (``{"namespace", "pod", "denials": [...]}``, the JSON lines' fields and ``time``)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == "/denials" and watch is not None:
                self._denials(urllib.parse.parse_qs(query))
                return
            if path != "/metrics":
                self.send_error(404, "only /metrics and /denials are served here")
                return
            self._send(counters.exposition().encode(), "text/plain; version=0.0.4; charset=utf-8")

        def _denials(self, query: Mapping[str, list[str]]) -> None:
            assert watch is not None
            namespace, pod = query.get("namespace", [""])[0], query.get("pod", [""])[0]
            if not namespace or not pod:
                self.send_error(400, "GET /denials?namespace=NS&pod=NAME: both are required")
                return
            recent = watch.recent(namespace=namespace, pod=pod)
            document = {"namespace": namespace, "pod": pod, "denials": recent}
            self._send(json.dumps(document, sort_keys=True).encode(), "application/json")

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
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
