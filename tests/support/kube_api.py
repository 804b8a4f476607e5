"""A scripted API server: real HTTPS (a test CA's certificate), answering GETs of pods as
kube-apiserver does (the Pod object, or a 404 Status), optionally after a delay, and
optionally listening inside a network namespace (a node's)."""

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

    def serve(self, pod: Mapping[str, Any]) -> None:
        metadata = pod["metadata"]
        path = f"/api/v1/namespaces/{metadata['namespace']}/pods/{metadata['name']}"
        self.pods[path] = json.dumps(pod).encode()


@dataclass(frozen=True)
class ApiServer:
    url: str
    ca_pem: str
    ca_file: Path
    script: ApiScript


def _handler(script: ApiScript) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(script.delay)
            body = script.pods.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body or b'{"kind":"Status","message":"not found"}')

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
