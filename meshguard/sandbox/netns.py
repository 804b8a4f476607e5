"""A network namespace standing in for a pod's, and processes running inside it.

Creates a namespace with ``lo`` up and an ``eth0`` carrying the pod's addresses (so
traffic to the pod's own IP takes ``lo``, as in a pod, and remote destinations have a
route for Istio's outbound capture), runs commands in it, and removes it and every process
it started on exit — also on errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Self

from meshguard.errors import MeshguardFailure, UsageError
from meshguard.process import run_command


@dataclass(frozen=True, kw_only=True)
class PodAddresses:
    ipv4: str = "10.1.2.3"
    ipv6: str = "fd00:10::3"
    prefix4: int = 24
    prefix6: int = 64


@dataclass
class NetworkNamespace:
    """``with NetworkNamespace() as ns: ns.run([...])`` — needs root and iproute2."""

    addresses: PodAddresses = field(default_factory=PodAddresses)
    name: str = field(default_factory=lambda: f"meshguard-{secrets.token_hex(4)}")
    _processes: list[subprocess.Popen[str]] = field(default_factory=list)
    _stderr_files: list[IO[str]] = field(default_factory=list)

    def __enter__(self) -> Self:
        run_command(["ip", "netns", "add", self.name])
        try:
            for argv in self._setup_commands():
                self.run(argv)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _setup_commands(self) -> list[list[str]]:
        pod = self.addresses
        return [
            ["ip", "link", "set", "lo", "up"],
            # As container runtimes set it for pods: any uid may bind ports below 1024.
            ["sysctl", "-q", "-w", "net.ipv4.ip_unprivileged_port_start=0"],
            # A veth pair whose far end stays in the namespace: eth0 only needs to exist and
            # carry the pod's addresses and routes (dummy links are not in every kernel).
            ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer"],
            ["ip", "link", "set", "eth0-peer", "up"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "addr", "add", f"{pod.ipv4}/{pod.prefix4}", "dev", "eth0"],
            ["ip", "-6", "addr", "add", f"{pod.ipv6}/{pod.prefix6}", "dev", "eth0", "nodad"],
            ["ip", "route", "add", "default", "dev", "eth0"],
            ["ip", "-6", "route", "add", "default", "dev", "eth0"],
        ]

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, stdin: str | None = None) -> str:
        return run_command(self.argv(argv), stdin=stdin)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        ready_line: str | None = None,
        env: Mapping[str, str] | None = None,
        stderr: IO[str] | None = None,
    ) -> subprocess.Popen[str]:
        """Start a long-running process in the namespace; wait for its ready line.

        Its stderr goes to ``stderr``, or to a temporary file (never an undrained pipe that
        would block a chatty process), read back when it fails to start.
        """
        if stderr is None:
            stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed with the process
            self._stderr_files.append(stderr)
        process = subprocess.Popen(
            self.argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready_line is not None else subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._processes.append(process)
        if ready_line is not None:
            line = process.stdout.readline() if process.stdout else ""
            if line.strip() != ready_line:
                _stop(process)
                stderr.seek(0)
                err = stderr.read().strip()[-500:]
                raise MeshguardFailure(f"{' '.join(argv)} did not start: {err}")
        return process

    def stop(self, process: subprocess.Popen[str]) -> None:
        """Stop one process this namespace started (e.g. to show a fault)."""
        _stop(process)
        self._processes.remove(process)

    def close(self) -> None:
        for process in reversed(self._processes):
            _stop(process)
        self._processes.clear()
        for file in self._stderr_files:
            file.close()
        self._stderr_files.clear()
        with contextlib.suppress(MeshguardFailure):
            run_command(["ip", "netns", "delete", self.name])


def probe_command(*, uid: int, gid: int, groups: Sequence[int] = ()) -> list[str]:
    """argv of a probe client running as uid/gid (to be run through :meth:`run`)."""
    return [
        sys.executable, "-m", "meshguard.sandbox.probe", "probe",
        "--uid", str(uid), "--gid", str(gid), "--groups", ",".join(map(str, groups)),
    ]  # fmt: skip


def serve_command(
    *, name: str, uid: int, gid: int, tcp: Sequence[int], udp: Sequence[int]
) -> list[str]:
    return [
        sys.executable, "-m", "meshguard.sandbox.probe", "serve", "--name", name,
        "--uid", str(uid), "--gid", str(gid),
        "--tcp", ",".join(map(str, tcp)), "--udp", ",".join(map(str, udp)),
    ]  # fmt: skip


def record_command(
    *, uid: int, gid: int, tcp: Sequence[int] = (), udp: Sequence[int] = (), seconds: float
) -> list[str]:
    """argv of a recorder: what a process of uid/gid listening on these ports receives."""
    return [
        sys.executable, "-m", "meshguard.sandbox.probe", "record",
        "--uid", str(uid), "--gid", str(gid), "--seconds", str(seconds),
        "--tcp", ",".join(map(str, tcp)), "--udp", ",".join(map(str, udp)),
    ]  # fmt: skip


def serve_http_command(
    *, name: str, uid: int, gid: int, ports: Sequence[int], forbid: Sequence[str] = ()
) -> list[str]:
    """argv of HTTP echo servers as uid/gid; paths starting with one of ``forbid`` get 403."""
    if any("," in prefix or not prefix.startswith("/") for prefix in forbid):
        raise UsageError(f"--forbid: path prefixes start with / and hold no comma: {forbid!r}")
    return [
        sys.executable, "-m", "meshguard.sandbox.probe", "serve-http", "--name", name,
        "--uid", str(uid), "--gid", str(gid), "--tcp", ",".join(map(str, ports)),
        *(["--forbid", ",".join(forbid)] if forbid else []),
    ]  # fmt: skip


def _stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    if process.poll() is None:
        process.terminate()
    try:
        return process.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()
