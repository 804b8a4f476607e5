"""Finding the network namespace of each pod on the node, without CNI: from /proc, by cgroup.

The node agent watches the denials of pods in init-container mode too, where no CNI call
hands it a pod's namespace. It finds them as Istio's CNI node agent does
(``cni/pkg/nodeagent/podcgroupns.go``): every process of a pod runs in a cgroup whose path
names the pod's UID (``.../kubepods/burstable/pod<uid>/<container>`` with cgroupfs,
``.../kubepods-burstable-pod<uid with _>.slice/...`` with systemd), so ``/proc/<pid>/cgroup``
maps the process to its pod and ``/proc/<pid>/ns/net`` is that pod's network namespace. It
needs the host's PID namespace (``hostPID: true``) to see the pods' processes, and
SYS_ADMIN (to enter a namespace) and SYS_PTRACE-free read access to ``/proc/<pid>/ns/net``
of other users' processes, which root in the host PID namespace has (``CAP_SYS_PTRACE`` is
needed only where the ptrace access mode check applies: same root user, so it does not).

A namespace equal to the agent's own (a ``hostNetwork`` pod's, the node's) is never
returned: the node's netfilter is not a pod's. Pure parsing plus one bounded scan.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Processes looked at per scan, at most (a node runs a few thousand).
MAX_PROCESSES: Final = 65536
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)


@dataclass(frozen=True, kw_only=True)
class PodNetns:
    """One pod's network namespace as one of its processes shows it."""

    uid: str
    pid: int
    #: ``/proc/<pid>/ns/net``: valid while the process lives (the agent binds at once).
    path: str
    inode: int


def pod_uid_of(cgroup: str) -> str | None:
    """The pod UID a ``/proc/<pid>/cgroup`` text names (the last one, the innermost), if any."""
    found = _POD_UID.findall(cgroup)
    return found[-1].replace("_", "-") if found else None


def scan(proc: Path = Path("/proc")) -> dict[str, PodNetns]:
    """Pod UID -> its network namespace, for every pod with a process on this node."""
    own = _inode(Path("/proc/self/ns/net"))  # the agent's: the node's, with hostNetwork
    pods: dict[str, PodNetns] = {}
    for pid in _pids(proc):
        try:
            cgroup = (proc / str(pid) / "cgroup").read_text(encoding="utf-8", errors="replace")
            uid = pod_uid_of(cgroup)
            if uid is None or uid in pods:
                continue
            path = proc / str(pid) / "ns" / "net"
            inode = _inode(path)
        except OSError:  # the process ended, or is not ours to read
            continue
        if inode is None or inode == own:
            continue
        pods[uid] = PodNetns(uid=uid, pid=pid, path=str(path), inode=inode)
    return pods


def _pids(proc: Path) -> Iterator[int]:
    try:
        names = os.listdir(proc)
    except OSError:
        return
    count = 0
    for name in names:
        if name.isdigit():
            count += 1
            if count > MAX_PROCESSES:
                return
            yield int(name)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
