"""Entering a network namespace by path (``CNI_NETNS``) with ``setns(2)``, for one thread.

A network namespace belongs to a thread, not to the process: :func:`entered` moves the
calling thread into the pod's namespace for a block and back into its own afterwards. What
the thread does inside — the threads it starts (the per-family installers), the tools they
run (iptables-restore, iptables-save, ip, nft: a child starts in its parent thread's
namespace), the sockets it creates (the namespace's install lock) — is in the pod's
namespace; the process's other threads are not affected. Everything that needs the node's
network (the API server) happens before the block.

The one-process plugin enters from its main thread; the node agent from a thread of its own
per call (never its main thread), which ends with the call, so a thread that could not
return is never used again.

``/proc/net`` shows the namespace of the process's main thread, not of the calling thread:
inside the block, read ``/proc/thread-self/net`` (:func:`thread_has_ipv6`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from meshguard.errors import MeshguardFailure

CLONE_NEWNET: Final = 0x40000000
_OWN_NETNS: Final = "/proc/thread-self/ns/net"


class NamespaceGone(MeshguardFailure):
    """The namespace path does not exist (any more)."""


@contextlib.contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the block with the calling thread in the network namespace at ``path``."""
    own = _open(_OWN_NETNS)
    try:
        target = _open(path)
        try:
            _setns(target, path)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own, "this thread's own network namespace")
    finally:
        os.close(own)


def thread_has_ipv6() -> bool:
    """Whether the calling thread's network namespace has IPv6 (as the installer decides)."""
    return Path("/proc/thread-self/net/if_inet6").exists()


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceGone(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise MeshguardFailure(f"cannot open network namespace {path}: {exc}") from None


@functools.cache
def _libc() -> ctypes.CDLL:
    # The symbols already loaded (libc's among them): ctypes.util.find_library would run
    # ldconfig, tens of milliseconds at every call of the one-process plugin.
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise MeshguardFailure(
            f"setns({what}) failed: {os.strerror(error)} (not a network namespace,"
            " or CAP_SYS_ADMIN missing)"
        )
