"""Servers on loopback as subprocesses, for tests and benchmarks alike.

Free ports, stopping a process, its memory, the tail of its log, the meshguard command lines
that serve, and waiting until an HTTPS or gRPC server answers (saying why it did not: its
log's tail, never a bare timeout).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.keys import signing_key_file, trusted_keys_file

HOST = "127.0.0.1"
READY_TIMEOUT = 20.0


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[Any], *, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


def rss_kib(pid: int) -> int:
    """The resident set size of a process (``VmRSS``), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file; empty when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_logged(
    argv: list[str], log_file: Path, *, stdout: bool = True
) -> subprocess.Popen[bytes]:
    """Start a server whose log (stderr, and stdout unless ``stdout`` is false) goes to
    ``log_file``: one line per request would fill an unread pipe and stall it."""
    with log_file.open("wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log if stdout else subprocess.DEVNULL,
            stderr=log,
        )


def serve_webhook_argv(cert_file: Path, key_file: Path, port: int) -> list[str]:
    """``meshguard serve-webhook`` on HOST:port with this certificate."""
    return [sys.executable, "-m", "meshguard", "serve-webhook", "--cert", str(cert_file),
            "--key", str(key_file), "--host", HOST, "--port", str(port),
            "--signing-key", str(signing_key_file(cert_file.parent))]  # fmt: skip


def serve_authz_argv(pod_file: Path, port: int) -> list[str]:
    """``meshguard serve-authz`` on ``port`` for the pods of ``pod_file``, no metrics port."""
    return [sys.executable, "-m", "meshguard", "serve-authz", "--pods", str(pod_file),
            "--port", str(port), "--metrics-port", "0",
            "--trusted-keys", str(trusted_keys_file(pod_file.parent))]  # fmt: skip


def https_get(port: int, path: str, ca_file: Path, *, timeout: float = 10) -> tuple[int, bytes]:
    """GET https://HOST:port/path trusting ``ca_file``: the status and the body."""
    context = ssl.create_default_context(cafile=str(ca_file))
    connection = http.client.HTTPSConnection(HOST, port, context=context, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_https_ready(
    process: subprocess.Popen[Any], *, name: str, port: int, ca_file: Path, log_file: Path
) -> None:
    """Until GET /readyz answers 200; RuntimeError with the log's tail if it exits or not."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start:\n{log_tail(log_file)}")
        try:
            if https_get(port, "/readyz", ca_file, timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready within {READY_TIMEOUT:.0f} s:\n{log_tail(log_file)}")


def wait_grpc_serving(address: str, process: subprocess.Popen[Any], log_file: Path) -> None:
    """Until the gRPC health service at ``address`` says SERVING; RuntimeError otherwise."""
    deadline = time.monotonic() + READY_TIMEOUT
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"serve-authz exited:\n{log_tail(log_file)}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"serve-authz not serving:\n{log_tail(log_file)}")


def wait_for(condition: Callable[[], bool], *, timeout: float = 300, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """The process's children, whichever of its threads started them."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            found += [int(child) for child in (task / "children").read_text().split()]
    return sorted(found)


def listeners(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return len(out.splitlines())
