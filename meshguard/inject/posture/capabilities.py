"""Linux capabilities: the sets the checks compare with, what a runtime grants, and the
edits the fixes make to ``capabilities.add`` / ``drop``.

Two readings on purpose: Pod Security Standards baseline compares the names in
``capabilities.add`` exactly as written (``CHOWN`` is allowed, ``chown`` and ``CAP_CHOWN``
are not: runtimes differ on how they read other spellings), while meshguard's own checks of
what a container *holds* read every spelling a runtime might accept (case and ``CAP_``
ignored), so that ``cap_net_raw`` is not a way around them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from meshguard.pod import ISTIO_INIT

#: Linux capabilities a container runtime grants by default (containerd, CRI-O, Docker).
DEFAULT_CAPABILITIES: Final = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
        "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)  # fmt: skip
#: Pod Security Standards "baseline" (every version): the only names ``add`` may hold.
BASELINE_CAPABILITIES: Final = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
        "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)  # fmt: skip
#: Every Linux capability (what ``add: [ALL]`` and ``privileged`` grant).
ALL_CAPABILITIES: Final = frozenset(
    {
        "AUDIT_CONTROL", "AUDIT_READ", "AUDIT_WRITE", "BLOCK_SUSPEND", "BPF",
        "CHECKPOINT_RESTORE", "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID",
        "IPC_LOCK", "IPC_OWNER", "KILL", "LEASE", "LINUX_IMMUTABLE", "MAC_ADMIN",
        "MAC_OVERRIDE", "MKNOD", "NET_ADMIN", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_RAW",
        "PERFMON", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_ADMIN", "SYS_BOOT",
        "SYS_CHROOT", "SYS_MODULE", "SYS_NICE", "SYS_PACCT", "SYS_PTRACE", "SYS_RAWIO",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "SYSLOG", "WAKE_ALARM",
    }
)  # fmt: skip
#: What Istio's injection templates add to its init steps; they may hold nothing more.
ISTIO_INIT_CAPABILITIES: Final[Mapping[str, frozenset[str]]] = {
    ISTIO_INIT: frozenset({"NET_ADMIN", "NET_RAW"}),
}
#: What Istio's sidecar template adds to istio-proxy (TPROXY interception mode), exempt from
#: baseline's list as Istio's init step is: without it Istio's TPROXY mode cannot work.
ISTIO_PROXY_CAPABILITIES: Final = frozenset({"NET_ADMIN"})


def canonical(name: object) -> str:
    """The name a runtime may read ``name`` as (``cap_net_raw`` -> ``NET_RAW``)."""
    return str(name).strip().upper().removeprefix("CAP_")


def added_as_written(context: Mapping[str, Any]) -> list[str]:
    """``capabilities.add`` exactly as written (what baseline compares)."""
    return [str(c) for c in (context.get("capabilities") or {}).get("add") or []]


def added(context: Mapping[str, Any]) -> set[str]:
    return {canonical(c) for c in added_as_written(context)}


def effective(context: Mapping[str, Any]) -> set[str]:
    """What the runtime grants (containerd and CRI-O: ALL in drop wins over ALL in add, then
    the single names are added and dropped)."""
    if context.get("privileged") is True:
        return set(ALL_CAPABILITIES)
    capabilities = context.get("capabilities") or {}
    add = {canonical(c) for c in capabilities.get("add") or []}
    drop = {canonical(c) for c in capabilities.get("drop") or []}
    base = set(ALL_CAPABILITIES) if "ALL" in add else set(DEFAULT_CAPABILITIES)
    if "ALL" in drop:
        base = set()
    return (base | (add - {"ALL"})) - drop


def respell(context_of: Callable[[], dict[str, Any]], names: list[str]) -> str:
    """Replace non-canonical spellings of allowed capabilities by baseline's own."""
    capabilities = context_of().setdefault("capabilities", {})
    capabilities["add"] = [
        canonical(c) if str(c) in names else c for c in capabilities.get("add") or []
    ]
    return f"wrote {', '.join(f'{n} as {canonical(n)}' for n in names)} in capabilities.add"


def remove_added(context_of: Callable[[], dict[str, Any]], names: list[str]) -> str:
    """Remove the listed entries (as written) from ``capabilities.add``."""
    capabilities = context_of().setdefault("capabilities", {})
    capabilities["add"] = [c for c in capabilities.get("add") or [] if str(c) not in names]
    return f"removed {', '.join(names)} from capabilities.add"


def remove_added_canonical(context_of: Callable[[], dict[str, Any]], names: list[str]) -> str:
    """Remove every spelling of the listed capabilities from ``capabilities.add``."""
    capabilities = context_of().setdefault("capabilities", {})
    capabilities["add"] = [c for c in capabilities.get("add") or [] if canonical(c) not in names]
    return f"removed {', '.join(names)} from capabilities.add"


def drop_from(context_of: Callable[[], dict[str, Any]], names: list[str]) -> str:
    return drop(context_of(), names)


def drop(context: dict[str, Any], names: Iterable[str]) -> str:
    names = list(names)
    capabilities = context.setdefault("capabilities", {})
    add = [c for c in capabilities.get("add") or [] if canonical(c) not in set(names) | {"ALL"}]
    if "add" in capabilities:
        capabilities["add"] = add
    dropped = list(capabilities.get("drop") or [])
    if "ALL" not in {canonical(c) for c in dropped}:
        dropped += [n for n in names if n not in {canonical(c) for c in dropped}]
    capabilities["drop"] = dropped
    return f"dropped {', '.join(names)}"
