"""The node agent's plugin socket: runs meshguard's CNI plugin for the shim on the node.

A node has no Python. The runtime executes the static shim (``cni-shim/meshguard-cni.c``)
that ``meshguard cni install`` placed in the node's CNI bin dir; the shim forwards the call
here over a unix socket: the ``CNI_*`` variables, stdin, and the pod's network namespace as
an open file descriptor (SCM_RIGHTS). The agent runs ``python -m meshguard.cni`` (the same
plugin, unchanged) with the image's iptables, ``CNI_NETNS`` pointing at the received
descriptor (``/proc/self/fd/N``) and the entry's kubeconfig path mapped from the node's
view to the agent's mount, and answers with the plugin's exit status and stdout.

Request: ``MGCNI1\\n``, ``KEY=VALUE\\0`` ... ``\\0``, a 4-byte big-endian length, stdin.
Answer: the 4-byte big-endian exit status, then stdout until EOF.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import socket
import socketserver
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Final

from meshguard.errors import MalformedInputError, MeshguardFailure

log = logging.getLogger(__name__)

MAGIC: Final = b"MGCNI1\n"
VARIABLES: Final = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS",
                    "CNI_PATH")  # fmt: skip
MAX_REQUEST: Final = 4 * 1024 * 1024 + 64 * 1024
PLUGIN_TIMEOUT_SECONDS: Final = 120.0


@dataclass(frozen=True, kw_only=True)
class Request:
    variables: Mapping[str, str]
    stdin: bytes


def parse_request(body: bytes) -> Request:
    """The request after its magic line: variables, then the length-prefixed stdin."""
    if body.startswith(b"\0"):
        pairs, rest = b"", body[1:]
    else:
        end = body.find(b"\0\0")
        if end < 0:
            raise MalformedInputError("shim request: the variables are not terminated")
        pairs, rest = body[:end], body[end + 2 :]
    variables: dict[str, str] = {}
    for item in filter(None, pairs.split(b"\0")):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if not sep or key not in VARIABLES:
            raise MalformedInputError(f"shim request: unexpected variable {key!r}")
        variables[key] = value
    if len(rest) < 4:
        raise MalformedInputError("shim request: truncated (no stdin length)")
    (length,) = struct.unpack(">I", rest[:4])
    if len(rest) - 4 != length:
        raise MalformedInputError(
            f"shim request: stdin of {len(rest) - 4} bytes, {length} announced"
        )
    return Request(variables=variables, stdin=rest[4:])


def agent_view(stdin: bytes, *, host_conf_dir: PurePath, conf_dir: Path) -> bytes:
    """The network configuration with ``kubernetes.kubeconfig`` as the agent mounts it."""
    try:
        document = json.loads(stdin)
        path = document["kubernetes"]["kubeconfig"]
    except (ValueError, KeyError, TypeError):
        return stdin  # the plugin reports what is wrong with it
    if not isinstance(path, str) or not PurePath(path).is_relative_to(host_conf_dir):
        return stdin
    document["kubernetes"]["kubeconfig"] = str(conf_dir / PurePath(path).relative_to(host_conf_dir))
    return json.dumps(document).encode()


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    socket_path: Path
    conf_dir: Path
    host_conf_dir: PurePath
    plugin: Sequence[str] = (sys.executable, "-m", "meshguard.cni")


def run_plugin(
    request: Request, netns_fd: int | None, *, settings: AgentSettings, environ: Mapping[str, str]
) -> tuple[int, bytes]:
    """Run the plugin for one request; (exit status, stdout). Its stderr goes to ours."""
    env = {**environ, **request.variables}
    if netns_fd is not None:
        env["CNI_NETNS"] = f"/proc/self/fd/{netns_fd}"
    stdin = agent_view(
        request.stdin, host_conf_dir=settings.host_conf_dir, conf_dir=settings.conf_dir
    )
    try:
        done = subprocess.run(
            list(settings.plugin), input=stdin, env=env, stdout=subprocess.PIPE,
            pass_fds=(netns_fd,) if netns_fd is not None else (),
            timeout=PLUGIN_TIMEOUT_SECONDS, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return 1, _error(f"meshguard-cni did not finish in {PLUGIN_TIMEOUT_SECONDS:.0f} s")
    return done.returncode, done.stdout


def _error(msg: str) -> bytes:
    """A CNI error object (I/O failure), as the plugin would print it."""
    error = {"cniVersion": "1.0.0", "code": 5, "msg": msg, "details": ""}
    return json.dumps(error).encode() + b"\n"


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        connection: socket.socket = self.request
        netns_fd: int | None = None
        try:
            netns_fd, body = _receive(connection)
            request = parse_request(body)
            status, stdout = run_plugin(request, netns_fd, settings=self.server.settings,
                                        environ=os.environ)  # fmt: skip
            command = request.variables.get("CNI_COMMAND", "?")
            log.info("meshguard-cni %s for the shim: exit %d", command, status,
                     extra={"fields": {"event": "cni-call", "command": command,
                                       "status": status}})  # fmt: skip
        except (MalformedInputError, OSError) as exc:
            reason = str(exc)
            fields = {"event": "cni-bad-request", "reason": reason}
            log.warning("bad shim request: %s", reason, extra={"fields": fields})
            status, stdout = 1, _error(f"meshguard node agent: {reason}")
        finally:
            if netns_fd is not None:
                os.close(netns_fd)
        with contextlib.suppress(OSError):
            connection.sendall(struct.pack(">I", status) + stdout)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        super().__init__(str(settings.socket_path), _Handler)


def _receive(connection: socket.socket) -> tuple[int | None, bytes]:
    """The descriptor that comes with the first bytes, then everything until the shim's EOF."""
    fds = array.array("i")
    data, ancillary, _flags, _address = connection.recvmsg(
        len(MAGIC), socket.CMSG_SPACE(fds.itemsize)
    )
    netns_fd = None
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            netns_fd = fds[0] if fds else None
            for extra in fds[1:]:
                os.close(extra)
    chunks = [data]
    size = len(data)
    while chunk := connection.recv(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REQUEST:
            if netns_fd is not None:
                os.close(netns_fd)
            raise MalformedInputError(f"shim request larger than {MAX_REQUEST} bytes")
    body = b"".join(chunks)
    if not body.startswith(MAGIC):
        if netns_fd is not None:
            os.close(netns_fd)
        raise MalformedInputError("not a meshguard-cni shim request")
    return netns_fd, body[len(MAGIC) :]


@contextlib.contextmanager
def serving(settings: AgentSettings) -> Iterator[None]:
    """Listen on the socket (root only) while the block runs."""
    path = settings.socket_path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a previous agent's
    old_umask = os.umask(0o077)
    try:
        server = _Server(settings)
    except OSError as exc:
        raise MeshguardFailure(f"cannot listen on {path}: {exc}") from None
    finally:
        os.umask(old_umask)
    thread = threading.Thread(target=server.serve_forever, name="cni-agent", daemon=True)
    thread.start()
    log.info("listening for the shim on %s", path,
             extra={"fields": {"event": "cni-agent-listening", "socket": str(path)}})  # fmt: skip
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
