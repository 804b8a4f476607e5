"""A scripted kube-apiserver for pods over real HTTPS: LIST with labelSelector, limit and
continue; WATCH from a resourceVersion with bookmarks; 410 Gone for a compacted version
(as the HTTP status, or as an ERROR event, as kube-apiserver does once the watch started).

Pods live in memory with a global resourceVersion counter; every change is kept in an event
log until :meth:`ScriptedApiServer.compact`. Each request is recorded (path and query), so a
test can say what the client asked. Used by tests/authz/test_watch_api.py and by
benchmarks/authz_store.py.

Beside it, :func:`scripted_api`: a smaller server of pod objects for the CNI side — GET of
one pod (the Pod, or a 404 Status), a PodList with equality label and field selectors, DELETE
with a UID precondition (200, 404, or 409 when the UID differs) — optionally after a delay
and listening inside a network namespace (a node's); it records method, path and token.
Both share the HTTPS plumbing (a test CA's certificate), label selectors and Status objects.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import http.server
import json
import os
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from tests.support.tls import CertificateAuthority

TOKEN = "scripted-token"
CLONE_NEWNET = 0x40000000


@dataclass
class Recorded:
    path: str
    query: dict[str, str]
    peer: int = 0  # the client's port: one per connection


@dataclass
class Script:
    """What the server does besides answering: knobs a test turns."""

    bookmark_seconds: float = 0.5
    #: Hold LIST answers until set (to observe a client that has not synced yet).
    list_gate: threading.Event = field(default_factory=threading.Event)
    #: 410 on a compacted watch: "status" (HTTP 410) or "event" (200 then an ERROR event).
    gone_as: str = "event"
    #: Seconds to wait before each LIST page (a slow API server).
    page_delay: float = 0.0
    #: Answer every request 503 (the API server is down).
    down: bool = False
    #: Paths answered 403 (what the client's RBAC does not allow).
    forbidden: set[str] = field(default_factory=set)


class ScriptedApiServer:
    def __init__(self, tmp: Path) -> None:
        self.script = Script()
        self.script.list_gate.set()
        self._lock = threading.Condition()
        self.lock = threading.Lock()  # counters updated by the handler threads
        self._pods: dict[str, dict[str, Any]] = {}
        self._log: list[tuple[int, str, dict[str, Any]]] = []
        self._version = 1000
        self._oldest = 1000  # watches from an older resourceVersion get 410
        self._snapshots: dict[str, list[dict[str, Any]]] = {}
        #: Namespace objects by name (GET and LIST /api/v1/namespaces).
        self.namespaces: dict[str, dict[str, Any]] = {}
        #: ``namespace/pod:port`` -> a local HTTP server's URL: GET .../proxy/PATH forwarded.
        self.proxied: dict[str, str] = {}
        #: core/v1 Events (LIST of a namespace's, with an equality fieldSelector); None: not
        #: served (404, as a server that has no Events for the client).
        self.events: list[dict[str, Any]] | None = None
        #: Bearer tokens accepted (a verified client certificate is accepted too).
        self.tokens = {TOKEN}
        self.client_ca = CertificateAuthority.create()
        self._closing = False
        self._generation = 0
        self.requests: list[Recorded] = []
        self.list_bytes = 0  # the bytes of every LIST answer, for the benchmark
        handler = type("Handler", (_Handler,), {"api": self})
        client_ca = self.client_ca.write_ca(tmp / "client-ca.crt")
        self._server, self.ca_file = _https_server(tmp, handler, client_ca=client_ca)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedApiServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "scripted",
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.port}",
                        "certificate-authority": str(self.ca_file),
                    },
                }
            ],
            "users": [{"name": "authz", "user": {"token": TOKEN}}],
            "contexts": [{"name": "scripted", "context": {"cluster": "scripted", "user": "authz"}}],
            "current-context": "scripted",
        }
        path.write_text(json.dumps(config))
        return path

    def issue_client_certificate(self, cert: Path, key: Path) -> None:
        """A client certificate the server accepts (kubeconfig's client-certificate)."""
        self.client_ca.issue(cert, key)

    # --- the state, as a test changes it ---------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def keys(self, selector: str = "") -> set[str]:
        with self._lock:
            return {k for k, pod in self._pods.items() if _matches(pod, selector)}

    def put(self, pod: dict[str, Any]) -> None:
        """Create or modify a pod (ADDED or MODIFIED); the server keeps ``pod`` itself."""
        with self._lock:
            stored = pod
            key = _key(stored)
            kind = "MODIFIED" if key in self._pods else "ADDED"
            self._version += 1
            stored["metadata"]["resourceVersion"] = str(self._version)
            self._pods[key] = stored
            self._log.append((self._version, kind, stored))
            self._lock.notify_all()

    def put_many(self, pods: Iterator[dict[str, Any]]) -> None:
        for pod in pods:
            self.put(pod)

    def delete(self, key: str) -> None:
        with self._lock:
            pod = self._pods.pop(key)
            self._version += 1
            gone = copy.deepcopy(pod)
            gone["metadata"]["resourceVersion"] = str(self._version)
            self._log.append((self._version, "DELETED", gone))
            self._lock.notify_all()

    def compact(self) -> None:
        """Forget the event log: a watch from any version seen so far gets 410 Gone."""
        with self._lock:
            self._oldest = self._version
            self._log.clear()
            self._snapshots.clear()  # continue tokens expire too

    @property
    def generation(self) -> int:
        """Bumped by :meth:`end_watches`: a watch that started under an older one ends."""
        return self._generation

    def end_watches(self) -> None:
        """Close every open watch stream (as an API server restart would), including one
        whose request arrived but whose stream has not started yet."""
        with self._lock:
            self._generation += 1
            self._lock.notify_all()

    def watches(self) -> list[Recorded]:
        return [r for r in self.requests if r.query.get("watch") == "1"]

    def lists(self) -> list[Recorded]:
        return [r for r in self.requests if r.query.get("watch") != "1"]

    # --- answers ---------------------------------------------------------------------------

    def add_namespace(self, name: str, **labels: str) -> None:
        self.namespaces[name] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **labels}},
        }

    def get_object(self, path: str, query: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """GET of one pod or namespace, a namespace's pods, or the namespaces."""
        parts = path.removeprefix("/api/v1/").split("/")
        if parts == ["namespaces"]:
            selector = query.get("labelSelector", "")
            items = [n for n in self.namespaces.values() if _matches(n, selector)]
            return 200, {"kind": "NamespaceList", "apiVersion": "v1", "metadata": {},
                         "items": items}  # fmt: skip
        if len(parts) == 2 and parts[0] == "namespaces" and parts[1] in self.namespaces:
            return 200, self.namespaces[parts[1]]
        if len(parts) >= 6 and parts[0] == "namespaces" and parts[2:5:2] == ["pods", "proxy"]:
            name = urllib.parse.unquote(parts[3])  # "pod:port", its colon escaped by clients
            return self._proxy(f"{parts[1]}/{name}", "/".join(parts[5:]), query)
        if len(parts) == 3 and parts[0] == "namespaces" and parts[2] == "pods":
            return self.list_page(query, namespace=parts[1])
        if (
            len(parts) == 3
            and parts[0] == "namespaces"
            and parts[2] == "events"
            and self.events is not None
        ):
            items = self._events_of(parts[1], query.get("fieldSelector", ""))
            return 200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items}
        if len(parts) == 4 and parts[0] == "namespaces" and parts[2] == "pods":
            with self._lock:
                pod = self._pods.get(f"{parts[1]}/{parts[3]}")
            if pod is not None:
                return 200, pod
            return 404, _status(404, "NotFound", f'pods "{parts[3]}" not found')
        return 404, _status(404, "NotFound", "the server could not find the requested resource")

    def _events_of(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """Equality field selectors on ``involvedObject.*`` (what ``describe`` sends)."""
        assert self.events is not None
        terms = [term.partition("=") for term in filter(None, selector.split(","))]
        return [
            event
            for event in self.events
            if event["metadata"].get("namespace") == namespace
            and all(
                event.get("involvedObject", {}).get(key.removeprefix("involvedObject.")) == value
                for key, _, value in terms
            )
        ]

    def _proxy(
        self, target: str, path: str, query: Mapping[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """The pod proxy, as kube-apiserver's: the pod's answer relayed (JSON here)."""
        base = self.proxied.get(target)
        if base is None:
            return 503, _status(503, "ServiceUnavailable", f"no endpoints for {target}")
        url = f"{base}/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.loads(answer.read())

    def list_page(
        self, query: Mapping[str, str], *, namespace: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        self.script.list_gate.wait()
        time.sleep(self.script.page_delay)
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        with self._lock:
            if token:
                snapshot_id, _, offset_text = token.partition(":")
                snapshot = self._snapshots.get(snapshot_id)
                if snapshot is None:
                    return 410, _status(410, "Expired", "the continue token has expired")
                offset = int(offset_text)
            else:
                selector = query.get("labelSelector", "")
                snapshot = [
                    p
                    for p in self._pods.values()
                    if _matches(p, selector)
                    and namespace in (None, p["metadata"].get("namespace", "default"))
                ]
                snapshot_id = f"{self._version}-{len(self._snapshots)}"
                self._snapshots[snapshot_id] = snapshot
                offset = 0
            version = snapshot_id.split("-")[0]
            end = offset + limit if limit else len(snapshot)
            items = snapshot[offset:end]
            more = end < len(snapshot)
        metadata: dict[str, Any] = {"resourceVersion": version}
        if more:
            metadata["continue"] = f"{snapshot_id}:{end}"
        return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items}

    def watch_events(
        self, query: Mapping[str, str], *, generation: int
    ) -> Iterator[dict[str, Any]] | int:
        """The events of a watch, or 410 (the HTTP status) when it starts too old;
        ``generation``: :attr:`generation` when the request arrived."""
        since = int(query.get("resourceVersion") or 0)
        selector = query.get("labelSelector", "")
        bookmarks = query.get("allowWatchBookmarks") == "true"
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        if since < self._oldest and self.script.gone_as == "status":
            return 410
        return self._stream(
            since, selector, bookmarks=bookmarks, deadline=deadline, generation=generation
        )

    def _stream(
        self, since: int, selector: str, *, bookmarks: bool, deadline: float, generation: int
    ) -> Iterator[dict[str, Any]]:
        if since < self._oldest:
            yield {"type": "ERROR", "object": _status(410, "Expired", f"too old: {since}")}
            return
        last_bookmark = time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                if self._closing or generation != self._generation:
                    return
                if since < self._oldest and self.script.gone_as == "event":  # compacted
                    yield {"type": "ERROR", "object": _status(410, "Expired", "too old")}
                    return
                pending = [e for e in self._log if e[0] > since]
                if not pending:
                    self._lock.wait(timeout=0.1)
                    pending = [e for e in self._log if e[0] > since]
            for version, kind, pod in pending:
                since = version
                if _matches(pod, selector):
                    yield {"type": kind, "object": pod}
            if bookmarks and time.monotonic() - last_bookmark > self.script.bookmark_seconds:
                last_bookmark = time.monotonic()
                with self._lock:  # only past what was delivered: nothing skipped
                    if not any(version > since for version, _, _ in self._log):
                        since = max(since, self._version)
                yield {
                    "type": "BOOKMARK",
                    "object": {"kind": "Pod", "metadata": {"resourceVersion": str(since)}},
                }


class _Handler(http.server.BaseHTTPRequestHandler):
    api: ScriptedApiServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        # Read before the down check: a test that sets ``down`` and then ends the watches
        # either gets this request refused or sees its stream end, never one that outlives
        # both (a generation read when the stream starts could miss the end).
        generation = self.api.generation
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        self.api.requests.append(Recorded(url.path, query, self.client_address[1]))
        if self.api.script.down:
            self._json(503, _status(503, "ServiceUnavailable", "the API server is down"))
            return
        # The scheme is case-insensitive, as kube-apiserver reads it (the official Python
        # client's in-cluster loader sends "bearer").
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        certified = bool(self.connection.getpeercert())
        if not (scheme.lower() == "bearer" and token in self.api.tokens) and not certified:
            self._json(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        if url.path in self.api.script.forbidden:
            self._json(403, _status(403, "Forbidden", f"{url.path} is forbidden"))
            return
        if url.path != "/api/v1/pods":
            self._json(*self.api.get_object(url.path, query))
            return
        if query.get("watch") != "1":
            sent = self._json(*self.api.list_page(query))
            with self.api.lock:
                self.api.list_bytes += sent
            return
        events = self.api.watch_events(query, generation=generation)
        if isinstance(events, int):
            self._json(events, _status(events, "Expired", "too old resource version"))
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in events:
                data = json.dumps(event).encode() + b"\n"
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        self.close_connection = True

    def _json(self, status: int, document: dict[str, Any]) -> int:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return len(body)

    def log_message(self, *args: object) -> None:
        pass


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}  # fmt: skip


def _status_bytes(code: int, reason: str, message: str) -> bytes:
    return json.dumps(_status(code, reason, message)).encode()


def _key(pod: Mapping[str, Any]) -> str:
    return f"{pod['metadata'].get('namespace', 'default')}/{pod['metadata']['name']}"


def _matches(obj: Mapping[str, Any], selector: str) -> bool:
    """Equality-based label selectors (``k=v,k2=v2``)."""
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class Churn:
    """Changes to a scripted API server's pods from a thread: one round every ``interval``
    seconds from entering the ``with`` block until leaving it. Subclasses say what a round
    changes (:meth:`round`, called with 0, 1, 2, ...)."""

    def __init__(self, api: ScriptedApiServer, *, interval: float) -> None:
        self.api = api
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def round(self, index: int) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        index = 0
        while not self._stop.wait(self._interval):
            self.round(index)
            index += 1


# --- pod objects for the CNI side ----------------------------------------------------------


@dataclass
class ApiScript:
    """What the server answers: pods by (namespace, name), and a delay before each answer."""

    pods: dict[str, bytes] = field(default_factory=dict)
    delay: float = 0.0
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, token
    #: The client (address, port) of each request: requests on one kept-alive connection
    #: share it.
    clients: list[tuple[str, int]] = field(default_factory=list)
    #: When set, each request waits here first (a barrier of N: the requests of N clients
    #: in flight at once pass together; fewer break it after its timeout, and are answered
    #: 503).
    gate: threading.Barrier | None = None
    #: Close each connection after its answer, without saying so (a server restarting, an
    #: idle timeout): the client finds out when it uses the connection again.
    drop_connections: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)  # core/v1 Events created

    def serve(self, pod: Mapping[str, Any]) -> None:
        metadata = pod["metadata"]
        path = f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}"
        self.pods[path] = json.dumps(pod).encode()

    def served(self) -> list[dict[str, Any]]:
        return [json.loads(body) for body in list(self.pods.values())]

    def answer(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        """The status and body kube-apiserver would answer."""
        path, _, query = target.partition("?")
        if method == "GET" and path == "/api/v1/pods":
            return _list(self.served(), urllib.parse.parse_qs(query))
        if method == "GET" and path in self.pods:
            return 200, self.pods[path]
        if method == "POST" and path.startswith("/api/v1/namespaces/") and path.endswith("/events"):
            event = json.loads(body)
            self.events.append(event)
            return 201, json.dumps(event).encode()
        if method == "DELETE" and path in self.pods:
            pod = json.loads(self.pods[path])
            wanted = (json.loads(body or b"{}").get("preconditions") or {}).get("uid")
            if wanted is not None and wanted != pod["metadata"].get("uid"):
                return 409, _status_bytes(
                    409, "Conflict", "Precondition failed: UID in precondition"
                )
            del self.pods[path]
            return 200, json.dumps(pod).encode()
        return 404, _status_bytes(404, "NotFound", "not found")


def _field(pod: Mapping[str, Any], dotted: str) -> Any:
    value: Any = pod
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _list(pods: list[dict[str, Any]], query: Mapping[str, list[str]]) -> tuple[int, bytes]:
    """A PodList of the pods matching ``k=v`` label and field selectors (comma-separated)."""
    selected = pods
    for selector in query.get("labelSelector", []):
        selected = [p for p in selected if _matches(p, selector)]
    for selector in query.get("fieldSelector", []):
        for term in filter(None, selector.split(",")):
            key, _, value = term.partition("=")
            selected = [p for p in selected if _field(p, key) == value]
    document = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": selected}
    return 200, json.dumps(document).encode()


@dataclass(frozen=True)
class ApiServer:
    url: str
    ca_pem: str
    ca_file: Path
    script: ApiScript


def _handler(script: ApiScript) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        # Kept-alive connections, as kube-apiserver keeps them (every answer has a length),
        # with TCP_NODELAY as Go sets it: the body, written after the headers, is not held
        # back until the client's delayed ACK of the headers (40 ms).
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self._answer("GET")

        def do_DELETE(self) -> None:
            self._answer("DELETE")

        def do_POST(self) -> None:
            self._answer("POST")

        def _answer(self, method: str) -> None:
            script.clients.append(self.client_address)
            gate_open = True
            if script.gate is not None:
                try:
                    script.gate.wait()
                except threading.BrokenBarrierError:
                    gate_open = False
            time.sleep(script.delay)
            length = int(self.headers.get("Content-Length") or 0)
            request_body = self.rfile.read(length) if length else b""
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            script.requests.append((method, self.path, token))
            code, body = script.answer(method, self.path, request_body)
            if not gate_open:
                code, body = (
                    503,
                    _status_bytes(
                        503,
                        "ServiceUnavailable",
                        "fewer requests in flight than the gate waits for",
                    ),
                )
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = script.drop_connections

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def _created_in(
    netns_path: str | None, handler: type[http.server.BaseHTTPRequestHandler]
) -> http.server.ThreadingHTTPServer:
    """The server, its socket created in ``netns_path`` (a socket stays in the namespace it
    was created in; only a short-lived thread enters the namespace)."""
    if netns_path is None:
        return http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    made: list[http.server.ThreadingHTTPServer] = []

    def create() -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = os.open(netns_path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {netns_path}")
        finally:
            os.close(fd)
        made.append(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler))

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    if not made:
        raise RuntimeError(f"could not listen in {netns_path}")
    return made[0]


@contextlib.contextmanager
def scripted_api(directory: Path, *, netns_path: str | None = None) -> Iterator[ApiServer]:
    script = ApiScript()
    server, ca_file = _https_server(directory, _handler(script), netns_path=netns_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ApiServer(url=f"https://127.0.0.1:{server.server_address[1]}",
                        ca_pem=ca_file.read_text(), ca_file=ca_file, script=script)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()


def _https_server(
    directory: Path,
    handler: type[http.server.BaseHTTPRequestHandler],
    *,
    netns_path: str | None = None,
    client_ca: Path | None = None,
) -> tuple[http.server.ThreadingHTTPServer, Path]:
    """A server on 127.0.0.1 (in ``netns_path``, if given) with a certificate of a new test
    CA, and the CA's file for clients; ``client_ca``: client certificates it issued are
    verified (and optional)."""
    ca = CertificateAuthority.create()
    cert, key = directory / "api.crt", directory / "api.key"
    ca.issue(cert, key)
    server = _created_in(netns_path, handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(client_ca)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server, ca.write_ca(directory / "api-ca.crt")
