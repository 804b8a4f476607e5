"""A scripted API server: real HTTPS (a test CA's certificate), answering as kube-apiserver
does: GET of a pod (the Pod object, or a 404 Status), GET /api/v1/pods with equality label
and field selectors (a PodList), DELETE of a pod with a UID precondition (200, 404, or 409
when the UID differs); optionally after a delay, and optionally listening inside a network
namespace (a node's). Every request is recorded (method, path, bearer token)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import http.server
import json
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.tls import CertificateAuthority

CLONE_NEWNET = 0x40000000


@dataclass
class ApiScript:
    """What the server answers: pods by (namespace, name), and a delay before each answer."""

    pods: dict[str, bytes] = field(default_factory=dict)
    delay: float = 0.0
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, token

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
        if method == "DELETE" and path in self.pods:
            pod = json.loads(self.pods[path])
            wanted = (json.loads(body or b"{}").get("preconditions") or {}).get("uid")
            if wanted is not None and wanted != pod["metadata"].get("uid"):
                return 409, _status(409, "Precondition failed: UID in precondition")
            del self.pods[path]
            return 200, json.dumps(pod).encode()
        return 404, _status(404, "not found")


def _status(code: int, message: str) -> bytes:
    return json.dumps({"kind": "Status", "code": code, "message": message}).encode()


def _field(pod: Mapping[str, Any], dotted: str) -> Any:
    value: Any = pod
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _list(pods: list[dict[str, Any]], query: Mapping[str, list[str]]) -> tuple[int, bytes]:
    """A PodList of the pods matching ``k=v`` label and field selectors (comma-separated)."""
    selected = pods
    for selector in query.get("labelSelector", []):
        for term in filter(None, selector.split(",")):
            key, _, value = term.partition("=")
            selected = [p for p in selected
                        if (p["metadata"].get("labels") or {}).get(key) == value]  # fmt: skip
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
        def do_GET(self) -> None:
            self._answer("GET")

        def do_DELETE(self) -> None:
            self._answer("DELETE")

        def _answer(self, method: str) -> None:
            time.sleep(script.delay)
            length = int(self.headers.get("Content-Length") or 0)
            request_body = self.rfile.read(length) if length else b""
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            script.requests.append((method, self.path, token))
            code, body = script.answer(method, self.path, request_body)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

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
    ca = CertificateAuthority.create()
    ca.issue(directory / "api.crt", directory / "api.key")
    script = ApiScript()
    server = _created_in(netns_path, _handler(script))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "api.crt", directory / "api.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ca_file = ca.write_ca(directory / "api-ca.crt")
    try:
        yield ApiServer(url=f"https://127.0.0.1:{server.server_address[1]}",
                        ca_pem=ca_file.read_text(), ca_file=ca_file, script=script)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
