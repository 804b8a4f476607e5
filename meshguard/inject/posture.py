"""Posture checks: can any container of the pod escape its loopback rules or pass as Envoy?

Each check looks at the pod spec (after Istio's injection) and reports findings: a container
that runs with the proxy's uid or gid, can gain it (CAP_SETUID/SETGID, setuid binaries
without ``allowPrivilegeEscalation: false``, a group membership), can rewrite the rules
(NET_ADMIN, privileged, SYS_ADMIN), can craft packets (NET_RAW), can enter the proxy
(SYS_PTRACE with a shared process namespace), or shares the node's network or runtime.

Per check an action is configured: ``deny`` refuses the pod, naming the container, the field
and the fix; ``fix`` patches the spec (dropping a capability, assigning a uid, ...) and says
what it changed. Some findings cannot be fixed without breaking the workload (host network,
a runtime socket, the proxy's gid as fsGroup): they are always refused.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from meshguard.errors import RefusedError
from meshguard.pod import MESH_INIT_CONTAINERS, PROXY_CONTAINER, ProxyIdentity

#: Linux capabilities a container runtime grants by default (containerd, CRI-O, Docker).
DEFAULT_CAPABILITIES: Final = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
        "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)  # fmt: skip
RUNTIME_SOCKETS: Final = (
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
    "/var/run/crio/crio.sock",
    "/run/crio/crio.sock",
    "/var/run/cri-dockerd.sock",
    "/run/podman/podman.sock",
)


class Action(enum.StrEnum):
    DENY = "deny"
    FIX = "fix"


class Check(enum.StrEnum):
    PROXY_UID = "proxy-uid"
    PROXY_GID = "proxy-gid"
    MISSING_UID = "missing-uid"
    SHARED_UID = "shared-uid"
    SUPPLEMENTAL_GROUPS = "supplemental-groups"
    FS_GROUP = "fs-group"
    SETUID_CAPABILITY = "setuid-capability"
    PRIVILEGE_ESCALATION = "privilege-escalation"
    NET_CAPABILITY = "net-capability"
    PRIVILEGED = "privileged"
    SYS_ADMIN = "sys-admin"
    SYS_PTRACE = "sys-ptrace"
    HOST_NETWORK = "host-network"
    HOST_PID = "host-pid"
    RUNTIME_SOCKET = "runtime-socket"


#: Checks with no safe automatic fix: always refused.
UNFIXABLE: Final = frozenset(
    {Check.FS_GROUP, Check.HOST_NETWORK, Check.HOST_PID, Check.RUNTIME_SOCKET}
)


@dataclass(frozen=True, kw_only=True)
class PostureSettings:
    """What to do per check, and where assigned uids come from."""

    default_action: Action = Action.FIX
    actions: Mapping[Check, Action] = field(default_factory=dict)
    uid_range: tuple[int, int] = (20000, 29999)

    def action(self, check: Check) -> Action:
        if check in UNFIXABLE:
            return Action.DENY
        return self.actions.get(check, self.default_action)


@dataclass(frozen=True)
class Finding:
    check: Check
    where: str  # "container 'app'" or "pod"
    field: str  # e.g. "securityContext.privileged"
    problem: str
    remedy: str
    fixed: bool

    def __str__(self) -> str:
        if self.fixed:
            return f"meshguard fixed {self.where}: {self.field}: {self.problem}; {self.remedy}"
        return f"{self.where}: {self.field}: {self.problem}; fix: {self.remedy} [{self.check}]"


@dataclass
class _Review:
    spec: dict[str, Any]
    proxy: ProxyIdentity
    settings: PostureSettings
    findings: list[Finding] = field(default_factory=list)

    def report(  # noqa: PLR0917 - call sites read as one finding per line
        self,
        check: Check,
        where: str,
        field_: str,
        problem: str,
        remedy: str,
        fix: Callable[[], str] | None = None,
    ) -> None:
        """Record a finding; in fix mode apply ``fix``, which says what it changed."""
        fixed = fix is not None and self.settings.action(check) is Action.FIX
        if fix is not None and fixed:
            remedy = fix()
        self.findings.append(
            Finding(
                check=check, where=where, field=field_, problem=problem, remedy=remedy, fixed=fixed
            )
        )


def review_posture(
    spec: dict[str, Any], *, proxy: ProxyIdentity, settings: PostureSettings
) -> list[Finding]:
    """Check (and in fix mode, patch in place) the pod spec; every finding, fixed or not."""
    review = _Review(spec=spec, proxy=proxy, settings=settings)
    _check_pod(review)
    for name, container, _ in _guarded_containers(spec):
        _check_container(review, name, container)
    _check_uids(review)
    return review.findings


def refusals(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if not f.fixed]


# --- pod-level ----------------------------------------------------------------------------


def _check_pod(review: _Review) -> None:
    spec = review.spec
    if spec.get("hostNetwork") is True:
        review.report(
            Check.HOST_NETWORK, "pod", "spec.hostNetwork",
            "the pod uses the node's network namespace: its loopback is the node's and cannot be"
            " isolated per container",
            "remove hostNetwork, or opt the pod out with meshguard.io/inject: \"false\"",
        )  # fmt: skip
    if spec.get("hostPID") is True:
        review.report(
            Check.HOST_PID, "pod", "spec.hostPID",
            "the pod sees the node's processes, the proxy's included",
            "remove hostPID",
        )  # fmt: skip
    context = spec.get("securityContext") or {}
    gid = review.proxy.gid
    if context.get("fsGroup") == gid:
        review.report(
            Check.FS_GROUP, "pod", "spec.securityContext.fsGroup",
            f"is the proxy's gid {gid}: every container joins the proxy's group",
            f"use another fsGroup than {gid}",
        )  # fmt: skip
    groups = context.get("supplementalGroups") or []
    if isinstance(groups, list) and gid in groups:
        review.report(
            Check.SUPPLEMENTAL_GROUPS, "pod", "spec.securityContext.supplementalGroups",
            f"contains the proxy's gid {gid}",
            f"remove {gid} from supplementalGroups",
            fix=lambda: _remove_group(context, gid),
        )  # fmt: skip
    for volume in spec.get("volumes") or []:
        path = ((volume or {}).get("hostPath") or {}).get("path")
        if isinstance(path, str) and _exposes_runtime_socket(path):
            review.report(
                Check.RUNTIME_SOCKET, "pod", f"spec.volumes[{volume.get('name')}].hostPath.path",
                f"{path} exposes the container runtime's socket: any container mounting it can"
                " start a privileged container",
                "do not mount the runtime socket into a meshguard pod",
            )  # fmt: skip


def _remove_group(context: dict[str, Any], gid: int) -> str:
    context["supplementalGroups"] = [g for g in context["supplementalGroups"] if g != gid]
    return f"removed {gid} from supplementalGroups"


def _exposes_runtime_socket(path: str) -> bool:
    normalized = "/" + path.strip("/")
    return any(
        sock == normalized or sock.startswith(normalized + "/") for sock in RUNTIME_SOCKETS
    ) or (normalized == "/")


# --- per container ------------------------------------------------------------------------


def _guarded_containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(name, container, runs alongside) for every container of the workload: all but the
    proxy and the mesh's init steps. One-shot init containers do not run alongside."""
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or []:
            name = container.get("name")
            if name == PROXY_CONTAINER or name in MESH_INIT_CONTAINERS:
                continue
            alongside = key == "containers" or container.get("restartPolicy") == "Always"
            yield name, container, alongside


def _check_container(review: _Review, name: str, container: dict[str, Any]) -> None:
    where = f"container {name!r}"
    context: dict[str, Any] = container.get("securityContext") or {}

    def ensure_context() -> dict[str, Any]:
        container["securityContext"] = context
        return context

    if context.get("privileged") is True:
        review.report(
            Check.PRIVILEGED, where, "securityContext.privileged",
            "a privileged container can rewrite every network rule of the pod",
            "set privileged: false",
            fix=lambda: _set(ensure_context(), "privileged", False),
        )  # fmt: skip
    if context.get("allowPrivilegeEscalation") is not False:
        review.report(
            Check.PRIVILEGE_ESCALATION, where, "securityContext.allowPrivilegeEscalation",
            "is not false: a setuid binary could switch to the proxy's uid",
            "set allowPrivilegeEscalation: false",
            fix=lambda: _set(ensure_context(), "allowPrivilegeEscalation", False),
        )  # fmt: skip
    capabilities = _effective_capabilities(context)
    dangerous = [
        (Check.NET_CAPABILITY, {"NET_ADMIN", "NET_RAW"}, "can rewrite the rules or craft packets"),
        (Check.SETUID_CAPABILITY, {"SETUID", "SETGID"}, "can switch to the proxy's uid or gid"),
        (Check.SYS_ADMIN, {"SYS_ADMIN"}, "can change the pod's namespaces and rules"),
    ]
    if review.spec.get("shareProcessNamespace") is True:
        dangerous.append(
            (
                Check.SYS_PTRACE,
                {"SYS_PTRACE"},
                "can trace the proxy in the shared process namespace",
            )
        )
    for check, names, why in dangerous:
        held = sorted(capabilities & names)
        if held:
            review.report(
                check, where, "securityContext.capabilities",
                f"holds {', '.join(held)} ({why})",
                f"drop {', '.join(held)}",
                fix=functools.partial(_drop_from, ensure_context, held),
            )  # fmt: skip


def _set(context: dict[str, Any], key: str, value: object) -> str:
    context[key] = value
    return f"set {key}: {str(value).lower()}"


def _effective_capabilities(context: Mapping[str, Any]) -> set[str]:
    if context.get("privileged") is True:
        return {"ALL", "NET_ADMIN", "NET_RAW", "SETUID", "SETGID", "SYS_ADMIN", "SYS_PTRACE"}
    capabilities = context.get("capabilities") or {}
    add = {_cap(c) for c in capabilities.get("add") or []}
    drop = {_cap(c) for c in capabilities.get("drop") or []}
    if "ALL" in add:
        return {"NET_ADMIN", "NET_RAW", "SETUID", "SETGID", "SYS_ADMIN", "SYS_PTRACE"} - drop
    if "ALL" in drop:
        return add - drop
    return (set(DEFAULT_CAPABILITIES) | add) - drop


def _cap(name: object) -> str:
    return str(name).upper().removeprefix("CAP_")


def _drop_from(context_of: Callable[[], dict[str, Any]], names: list[str]) -> str:
    return _drop(context_of(), names)


def _drop(context: dict[str, Any], names: Iterable[str]) -> str:
    capabilities = context.setdefault("capabilities", {})
    add = [c for c in capabilities.get("add") or [] if _cap(c) not in set(names) | {"ALL"}]
    if "add" in capabilities:
        capabilities["add"] = add
    drop = list(capabilities.get("drop") or [])
    if "ALL" not in {_cap(c) for c in drop}:
        drop += [n for n in names if n not in {_cap(c) for c in drop}]
    capabilities["drop"] = drop
    return f"dropped {', '.join(names)}"


# --- uids ---------------------------------------------------------------------------------


def _check_uids(review: _Review) -> None:
    """Every container needs its own uid, not the proxy's; its gid must not be the proxy's."""
    pod_context = review.spec.get("securityContext") or {}
    containers = list(_guarded_containers(review.spec))
    taken = {review.proxy.uid} | {
        uid for _, c, _ in containers if isinstance(uid := _context_of(c).get("runAsUser"), int)
    }
    allocator = _UidAllocator(review.settings.uid_range, taken)
    owners: dict[int, str] = {}
    for name, container, alongside in containers:
        where = f"container {name!r}"
        uid = _context_of(container).get("runAsUser", pod_context.get("runAsUser"))
        assign = _assigner(container, allocator)
        remedy = "set a distinct runAsUser (or let meshguard assign one: posture action fix)"
        if uid is None:
            review.report(
                Check.MISSING_UID, where, "securityContext.runAsUser",
                "is not set: meshguard cannot tell this container's traffic apart", remedy, assign,
            )  # fmt: skip
        elif uid == review.proxy.uid:
            review.report(
                Check.PROXY_UID, where, "securityContext.runAsUser",
                f"is the proxy's uid {uid}: the container would pass as Envoy", remedy, assign,
            )  # fmt: skip
        elif uid in owners and alongside:
            review.report(
                Check.SHARED_UID, where, "securityContext.runAsUser",
                f"uid {uid} is also {owners[uid]!r}'s: meshguard cannot tell them apart",
                remedy, assign,
            )  # fmt: skip
        final_uid = _context_of(container).get("runAsUser", pod_context.get("runAsUser"))
        if isinstance(final_uid, int) and alongside:
            owners.setdefault(final_uid, name)
        gid = _context_of(container).get("runAsGroup", pod_context.get("runAsGroup"))
        if gid == review.proxy.gid:
            review.report(
                Check.PROXY_GID, where, "securityContext.runAsGroup",
                f"is the proxy's gid {gid}: Istio's capture would treat the container as Envoy",
                "set runAsGroup to another gid",
                functools.partial(_set_group_to_uid, container, pod_context),
            )  # fmt: skip


def _context_of(container: dict[str, Any]) -> dict[str, Any]:
    context: dict[str, Any] = container.get("securityContext") or {}
    return context


def _assigner(container: dict[str, Any], allocator: _UidAllocator) -> Callable[[], str]:
    def assign() -> str:
        uid = allocator.take()
        container.setdefault("securityContext", {})["runAsUser"] = uid
        return f"assigned runAsUser {uid}"

    return assign


def _set_group_to_uid(container: dict[str, Any], pod_context: Mapping[str, Any]) -> str:
    context = container.setdefault("securityContext", {})
    gid = context.get("runAsUser", pod_context.get("runAsUser"))
    context["runAsGroup"] = gid
    return f"set runAsGroup {gid}"


class _UidAllocator:
    """Hands out the lowest free uid of the range, deterministically."""

    def __init__(self, uid_range: tuple[int, int], taken: set[int]) -> None:
        self._next, self._last = uid_range
        self._taken = taken

    def peek(self) -> int:
        uid = self._next
        while uid in self._taken:
            uid += 1
        return uid

    def take(self) -> int:
        uid = self.peek()
        if uid > self._last:
            raise RefusedError(f"no free uid left in meshguard's uid range (up to {self._last})")
        self._taken.add(uid)
        self._next = uid + 1
        return uid
