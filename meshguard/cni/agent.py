"""The node agent's plugin socket: answers the shim's CNI calls in-process, in milliseconds.

A node has no Python. The runtime executes the static shim (``cni-shim/meshguard-cni.c``)
that ``meshguard cni install`` placed in the node's CNI bin dir; the shim forwards the call
here over a unix socket: the ``CNI_*`` variables, stdin, and the pod's network namespace as
an open file descriptor (SCM_RIGHTS). The agent runs the plugin's own code
(:func:`meshguard.cni.plugin.main`, what ``python -m meshguard.cni`` runs) in a thread of
its own per call, with ``CNI_NETNS`` pointing at the received descriptor
(``/proc/self/fd/N``) and the entry's kubeconfig path mapped from the node's view to the
agent's mount, and answers with the plugin's exit status and stdout.

What the long-lived agent adds to the one-process plugin, and nothing else:

- no process per call: no interpreter start, no imports, no TLS handshake — the pod is read
  on a kept-alive connection (:class:`~meshguard.cni.kube.KeptAlive`), fresh at every call;
- the install runs in the pod's namespace from the call's thread (``setns`` of that thread
  only, :mod:`meshguard.cni.netns`; the tools it starts are in that namespace), under the
  namespace's install lock like every installer;
- calls for different pods run in parallel, at most ``max_calls`` at once (a call waits for
  a slot within its timeout, then fails with "try again later"); shims connected at once are
  bounded too (``CONNECTIONS_PER_CALL`` per slot; beyond, "try again later" at once), and a
  shim that sends no end of request is dropped after the call timeout;
- a call is bounded: after ``call_timeout`` seconds the shim gets a CNI error (the runtime
  fails the sandbox and retries); the call's thread runs on to its own bounds (the GET's
  timeout, the lock's, the tools') but installs nothing once the GET returns late, and the
  slot it holds is freed only when it ends. The received descriptor belongs to the call's
  thread until it ends, so its number cannot be reused under it.

On stop the socket goes first (a shim then fails ADD closed and lets DEL pass), then the
calls in progress are answered and their threads end (each within the call timeout) before
:func:`serving` returns.

Only the received descriptor is ever entered: a call without one (a DEL whose namespace is
gone) has no ``CNI_NETNS``.

Request: ``MGCNI1\\n``, ``KEY=VALUE\\0`` ... ``\\0``, a 4-byte big-endian length, stdin.
Answer: the 4-byte big-endian exit status, then stdout until EOF.
"""

from __future__ import annotations

import array
import contextlib
import io
import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Final

from meshguard.cni import plugin
from meshguard.cni.kube import Connections, KeptAlive
from meshguard.cni.protocol import CniError, Code
from meshguard.cni.watch import DenialWatch, serving_metrics
from meshguard.errors import MalformedInputError, MeshguardFailure
from meshguard.kube_api import ApiAccess, ApiError

log = logging.getLogger(__name__)

MAGIC: Final = b"MGCNI1\n"
VARIABLES: Final = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS",
                    "CNI_PATH")  # fmt: skip
MAX_REQUEST: Final = 4 * 1024 * 1024 + 64 * 1024
#: A call's bound: above the plugin's own (the GET's 5 s, the install lock's 30 s by default),
#: below kubelet's runtime request timeout (2 min).
CALL_TIMEOUT_SECONDS: Final = 60.0
#: Calls run at once (pods whose sandboxes the node creates together); more wait for a slot.
MAX_CALLS: Final = 16
#: Shims connected at once, per call slot: beyond, a call is refused at once ("try again").
CONNECTIONS_PER_CALL: Final = 4


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
    call_timeout: float = CALL_TIMEOUT_SECONDS
    max_calls: int = MAX_CALLS
    #: Watch the denials of the pods it installs into (:mod:`meshguard.cni.watch`).
    watch_denials: bool = False
    #: Serve their counters on this port's /metrics (with ``watch_denials``; None: not).
    metrics_port: int | None = None


@dataclass(frozen=True, kw_only=True)
class _Call:
    """One call's thread: what it reads the API server with, and whether it was given up."""

    connections: KeptAlive
    abandoned: threading.Event
    timeout: float

    def get(self, access: ApiAccess, path: str, *, what: str, limit: int) -> bytes:
        body = self.connections.get(access, path, what=what, limit=limit)
        if self.abandoned.is_set():  # the runtime has its error: install nothing now
            cause = f"the node agent gave up on this call after {self.timeout:g} s"
            raise ApiError(f"{what}: {cause}", cause=cause)
        return body


def run_plugin(
    request: Request,
    netns_fd: int | None,
    *,
    settings: AgentSettings,
    environ: Mapping[str, str],
    connections: Connections,
) -> tuple[int, bytes]:
    """Run the plugin's code for one request in this thread; (exit status, stdout)."""
    env = {**environ, **request.variables}
    # Only the namespace the shim sent is entered, never a path in the agent's own view.
    env["CNI_NETNS"] = f"/proc/self/fd/{netns_fd}" if netns_fd is not None else ""
    stdin = agent_view(
        request.stdin, host_conf_dir=settings.host_conf_dir, conf_dir=settings.conf_dir
    )
    stdout = io.StringIO()
    host = plugin.Host(connections=connections, xtables_lock_per_namespace=True)
    status = plugin.main(environ=env, stdin=io.StringIO(stdin.decode("utf-8", "replace")),
                         stdout=stdout, host=host)  # fmt: skip
    return status, stdout.getvalue().encode()


def _error(msg: str, *, code: Code = Code.IO_FAILURE) -> bytes:
    """A CNI error object, as the plugin would print it."""
    return json.dumps(CniError(code, msg).document("1.0.0")).encode() + b"\n"


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        connection: socket.socket = self.request
        started = time.perf_counter()
        connection.settimeout(self.server.settings.call_timeout)  # a shim that sends no EOF
        try:
            netns_fd, body = _receive(connection)
        except (MalformedInputError, OSError) as exc:
            status, stdout = self._refused(str(exc))
        else:
            try:
                request = parse_request(body)
            except MalformedInputError as exc:
                if netns_fd is not None:
                    os.close(netns_fd)
                status, stdout = self._refused(str(exc))
            else:
                status, stdout = self.server.answer(request, netns_fd)  # owns netns_fd now
                command = request.variables.get("CNI_COMMAND", "?")
                ms = round((time.perf_counter() - started) * 1000, 1)
                log.info("meshguard-cni %s for the shim: exit %d", command, status,
                         extra={"fields": {"event": "cni-call", "command": command,
                                           "status": status, "ms": ms}})  # fmt: skip
        with contextlib.suppress(OSError):
            connection.sendall(struct.pack(">I", status) + stdout)

    @staticmethod
    def _refused(reason: str) -> tuple[int, bytes]:
        fields = {"event": "cni-bad-request", "reason": reason}
        log.warning("bad shim request: %s", reason, extra={"fields": fields})
        return 1, _error(f"meshguard node agent: {reason}")


_Request = socket.socket | tuple[bytes, socket.socket]  # what socketserver hands over


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.connections = KeptAlive()
        self.watch = DenialWatch(connections=self.connections) if settings.watch_denials else None
        self.slots = threading.BoundedSemaphore(settings.max_calls)
        # Shims connected (each has a thread, receiving or waiting for a slot): bounded too.
        self.max_open = CONNECTIONS_PER_CALL * settings.max_calls
        self.open = threading.BoundedSemaphore(self.max_open)
        super().__init__(str(settings.socket_path), _Handler)

    def process_request(self, request: _Request, client_address: object) -> None:
        if self.open.acquire(blocking=False):
            super().process_request(request, client_address)
            return
        fields = {"event": "cni-agent-busy", "connections": self.max_open}
        log.warning("%d shims connected: call refused", self.max_open, extra={"fields": fields})
        if isinstance(request, socket.socket):
            with contextlib.suppress(OSError):
                request.setblocking(False)
                message = f"meshguard node agent: {self.max_open} calls waiting, try again later"
                request.send(struct.pack(">I", 1) + _error(message, code=Code.TRY_AGAIN_LATER))
        self.shutdown_request(request)

    def process_request_thread(self, request: _Request, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.open.release()

    def drain(self) -> int:
        """Wait for the shims connected to be answered (each within the call timeout) and for
        the calls' threads to end (a call given up on too); how many were left."""
        deadline = time.monotonic() + self.settings.call_timeout + 1
        return sum(
            _wait_free(semaphore, size, deadline=deadline)
            for semaphore, size in ((self.open, self.max_open),
                                    (self.slots, self.settings.max_calls))
        )  # fmt: skip

    def answer(self, request: Request, netns_fd: int | None) -> tuple[int, bytes]:
        """Run the call in a thread of its own, within the call timeout; closes ``netns_fd``."""
        timeout = self.settings.call_timeout
        deadline = time.monotonic() + timeout
        if not self.slots.acquire(timeout=timeout):
            if netns_fd is not None:
                os.close(netns_fd)
            return 1, _error(
                f"meshguard node agent: all {self.settings.max_calls} call slots were busy for"
                f" {timeout:g} s, try again later",
                code=Code.TRY_AGAIN_LATER,
            )
        call = _Call(connections=self.connections, abandoned=threading.Event(), timeout=timeout)
        future: Future[tuple[int, bytes]] = Future()
        worker = threading.Thread(target=self._work, args=(request, netns_fd, call, future),
                                  name="cni-call", daemon=True)  # fmt: skip
        try:
            worker.start()
        except RuntimeError as exc:  # no thread to be had
            self.slots.release()
            if netns_fd is not None:
                os.close(netns_fd)
            return 1, _error(f"meshguard node agent: cannot start the call: {exc}")
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            call.abandoned.set()
            command = request.variables.get("CNI_COMMAND", "?")
            log.warning("meshguard-cni %s did not finish in %g s", command, timeout,
                        extra={"fields": {"event": "cni-call-timeout", "command": command,
                                          "timeout_s": timeout}})  # fmt: skip
            return 1, _error(f"meshguard-cni did not finish in {timeout:g} s")

    def _work(
        self,
        request: Request,
        netns_fd: int | None,
        call: _Call,
        future: Future[tuple[int, bytes]],
    ) -> None:
        command = request.variables.get("CNI_COMMAND")
        kept: int | None = None  # the namespace, for the denial watch after the answer
        try:
            if self.watch is not None and command == "ADD" and netns_fd is not None:
                kept = os.dup(netns_fd)
            answer = run_plugin(request, netns_fd, settings=self.settings,
                                environ=os.environ, connections=call)  # fmt: skip
        except Exception as exc:  # a bug must fail the call, not the agent
            log.exception("meshguard-cni failed in the node agent",
                          extra={"fields": {"event": "cni-call-crashed"}})  # fmt: skip
            answer = 1, _error(f"meshguard node agent: internal error: {exc!r}")
        finally:
            if netns_fd is not None:
                os.close(netns_fd)
            self.slots.release()
        future.set_result(answer)
        if self.watch is not None:
            try:
                self._watch(request, answer[0], kept)
            except Exception:  # the call is answered: a bug here must not end the agent
                log.exception("denial watch failed", extra={"fields": {"event": "watch-crashed"}})

    def _watch(self, request: Request, status: int, kept: int | None) -> None:
        """After the answer: start (ADD) or end (DEL) the sandbox's denial watch."""
        assert self.watch is not None
        command = request.variables.get("CNI_COMMAND")
        if command == "DEL":
            self.watch.deleted(variables=request.variables)
        if kept is None:
            return
        if status != 0:
            os.close(kept)
            return
        stdin = agent_view(
            request.stdin, host_conf_dir=self.settings.host_conf_dir,
            conf_dir=self.settings.conf_dir,
        )  # fmt: skip
        self.watch.added(variables=request.variables, stdin=stdin, netns_fd=kept)

    def server_close(self) -> None:
        super().server_close()
        if self.watch is not None:
            self.watch.close()
        self.connections.close()


def _wait_free(semaphore: threading.BoundedSemaphore, size: int, *, deadline: float) -> int:
    """Wait until all ``size`` units of ``semaphore`` are free; how many were not."""
    taken = 0
    while taken < size and semaphore.acquire(timeout=max(0.0, deadline - time.monotonic())):
        taken += 1
    for _ in range(taken):
        semaphore.release()
    return size - taken


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
        with contextlib.ExitStack() as stack:
            if server.watch is not None and settings.metrics_port is not None:
                stack.enter_context(
                    serving_metrics(server.watch.counters, port=settings.metrics_port)
                )
            yield
    finally:
        # No new call (a shim finds no socket: ADD fails closed, DEL passes), then the calls
        # in progress are answered and end before the process may.
        server.shutdown()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if left := server.drain():
            fields = {"event": "cni-agent-stopped", "in_progress": left}
            log.warning("%d calls still in progress at exit", left, extra={"fields": fields})
        server.server_close()
