"""Entering a network namespace by path (``CNI_NETNS``) with ``setns(2)``.

The plugin enters the pod's namespace in its main thread before any other thread exists, so
every thread it starts afterwards (the per-family installers) and every tool they run
(iptables-restore, iptables-save, ip) are in the pod's namespace. Everything that needs the
node's network (the API server) happens before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

from meshguard.errors import MeshguardFailure

CLONE_NEWNET = 0x40000000


class NamespaceGone(MeshguardFailure):
    """The namespace path does not exist (any more)."""


def enter_netns(path: str) -> None:
    """Move the calling (main, only) thread into the network namespace at ``path``."""
    if threading.active_count() != 1:
        raise MeshguardFailure("entering a network namespace needs a single-threaded process")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceGone(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise MeshguardFailure(f"cannot open network namespace {path}: {exc}") from None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise MeshguardFailure(
                f"setns({path}) failed: {os.strerror(error)} (not a network namespace,"
                " or CAP_SYS_ADMIN missing)"
            )
    finally:
        os.close(fd)
