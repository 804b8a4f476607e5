"""Posture checks: can any container of the pod escape its loopback rules or pass as Envoy?

Each check looks at the pod spec (after Istio's injection) and reports findings: a container
that runs with the proxy's uid or gid, can gain it (CAP_SETUID/SETGID, setuid binaries
without ``allowPrivilegeEscalation: false``, a group membership, an image-chosen group), can
rewrite the rules (NET_ADMIN, privileged, SYS_ADMIN), can craft packets (NET_RAW), can enter
or kill the proxy (SYS_PTRACE, KILL or root with a shared process namespace), or shares the
node's network, processes, IPC or files. Pod Security Standards "baseline" is the floor:
added capabilities outside its list, hostPath volumes, host ports, unmasked /proc, unconfined
seccomp or AppArmor, custom SELinux types and unsafe sysctls are refused too.

Which containers are checked comes from the pod view's classification
(:func:`meshguard.pod.read_pod`), never from names: Istio's and meshguard's own containers
are exempt only where Istio's status and their place say they are theirs, and even then
Istio's init steps may hold no more than Istio gives them. Ephemeral (``kubectl debug``)
containers get the same checks; they cannot be patched after the fact, so their findings
are always refusals.

Per check an action is configured: ``deny`` refuses the pod, naming the container, the field
and the fix; ``fix`` patches the spec (dropping a capability, assigning a uid, ...) and says
what it changed. Some findings cannot be fixed without breaking the workload (host network,
a hostPath, the proxy's gid as fsGroup, ...): they are always refused.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from meshguard.errors import RefusedError
from meshguard.pod import (
    ISTIO_INIT,
    ISTIO_VALIDATION,
    MESH_INIT_CONTAINERS,
    PROXY_CONTAINER,
    Container,
    PodView,
    ProxyIdentity,
    Role,
)

#: Linux capabilities a container runtime grants by default (containerd, CRI-O, Docker).
DEFAULT_CAPABILITIES: Final = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
        "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)  # fmt: skip
#: Pod Security Standards "baseline": the only capabilities a container may add.
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
#: Pod Security Standards "baseline": the sysctls a pod may set.
SAFE_SYSCTLS: Final = frozenset(
    {
        "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes",
    }
)  # fmt: skip
#: Pod Security Standards "baseline": the SELinux types a pod may ask for ("" = unset).
SAFE_SELINUX_TYPES: Final = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
RUNTIME_SOCKETS: Final = (
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
    "/var/run/crio/crio.sock",
    "/run/crio/crio.sock",
    "/var/run/cri-dockerd.sock",
    "/run/podman/podman.sock",
)
SECCOMP_POD_ANNOTATION: Final = "seccomp.security.alpha.kubernetes.io/pod"
SECCOMP_CONTAINER_ANNOTATION: Final = "container.seccomp.security.alpha.kubernetes.io/"
APPARMOR_ANNOTATION: Final = "container.apparmor.security.beta.kubernetes.io/"


class PostureAction(enum.StrEnum):
    DENY = "deny"
    FIX = "fix"


class Check(enum.StrEnum):
    """One posture check each; the value is its id in findings and in the settings.

    ``proxy-uid``, ``missing-uid``, ``shared-uid``: runAsUser is the proxy's, unset, or
    another container's (fix: assign a free uid). ``proxy-gid``: runAsGroup is the proxy's;
    ``missing-gid``: runAsGroup unset, so the image's /etc/passwd picks it (fix: runAsGroup =
    the container's uid). ``supplemental-groups``: the proxy's gid in supplementalGroups (fix:
    remove it); ``fs-group``: fsGroup is the proxy's gid (refused).
    ``setuid-capability`` (SETUID/SETGID), ``net-capability`` (NET_ADMIN/NET_RAW),
    ``sys-admin``, ``sys-ptrace`` (with a shared process namespace), ``kill-capability``
    (KILL with a shared process namespace): fix drops them. ``added-capability``: a
    capability added outside Pod Security Standards baseline, or ``ALL`` (fix: remove it from
    ``add``). ``privileged``, ``privilege-escalation``: fix sets them false.
    ``mesh-init-privileges``: Istio's init step (as Istio's status lists it) is privileged or
    adds more than Istio gives it (fix: unset / remove). ``shared-pid-root``: a container runs
    as root (or an unknown user) in a shared process namespace (refused).
    Always refused: ``host-network``, ``host-pid``, ``host-ipc``, ``host-path`` (any hostPath
    volume), ``runtime-socket`` (a hostPath onto the container runtime's socket),
    ``host-port``, ``host-process``, ``proc-mount`` (Unmasked), ``seccomp`` (Unconfined),
    ``apparmor`` (unconfined), ``selinux`` (custom type, user or role), ``sysctl`` (outside
    baseline's safe set).
    """

    PROXY_UID = "proxy-uid"
    PROXY_GID = "proxy-gid"
    MISSING_UID = "missing-uid"
    MISSING_GID = "missing-gid"
    SHARED_UID = "shared-uid"
    SUPPLEMENTAL_GROUPS = "supplemental-groups"
    FS_GROUP = "fs-group"
    SETUID_CAPABILITY = "setuid-capability"
    PRIVILEGE_ESCALATION = "privilege-escalation"
    NET_CAPABILITY = "net-capability"
    ADDED_CAPABILITY = "added-capability"
    KILL_CAPABILITY = "kill-capability"
    PRIVILEGED = "privileged"
    SYS_ADMIN = "sys-admin"
    SYS_PTRACE = "sys-ptrace"
    SHARED_PID_ROOT = "shared-pid-root"
    MESH_INIT_PRIVILEGES = "mesh-init-privileges"
    HOST_NETWORK = "host-network"
    HOST_PID = "host-pid"
    HOST_IPC = "host-ipc"
    HOST_PATH = "host-path"
    RUNTIME_SOCKET = "runtime-socket"
    HOST_PORT = "host-port"
    HOST_PROCESS = "host-process"
    PROC_MOUNT = "proc-mount"
    SECCOMP = "seccomp"
    APPARMOR = "apparmor"
    SELINUX = "selinux"
    SYSCTL = "sysctl"


#: Checks with no safe automatic fix: always refused.
UNFIXABLE: Final = frozenset(
    {
        Check.FS_GROUP, Check.HOST_NETWORK, Check.HOST_PID, Check.HOST_IPC, Check.HOST_PATH,
        Check.RUNTIME_SOCKET, Check.HOST_PORT, Check.HOST_PROCESS, Check.PROC_MOUNT,
        Check.SECCOMP, Check.APPARMOR, Check.SELINUX, Check.SYSCTL, Check.SHARED_PID_ROOT,
    }
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PostureSettings:
    """What to do per check, and where assigned uids come from."""

    default_action: PostureAction = PostureAction.FIX
    actions: Mapping[Check, PostureAction] = field(default_factory=dict)
    uid_range: tuple[int, int] = (20000, 29999)

    def action(self, check: Check) -> PostureAction:
        if check in UNFIXABLE:
            return PostureAction.DENY
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
    pod: PodView
    settings: PostureSettings
    findings: list[Finding] = field(default_factory=list)

    @property
    def proxy(self) -> ProxyIdentity:
        return self.pod.proxy_identity

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
        fixed = fix is not None and self.settings.action(check) is PostureAction.FIX
        if fix is not None and fixed:
            remedy = fix()
        self.findings.append(
            Finding(
                check=check, where=where, field=field_, problem=problem, remedy=remedy, fixed=fixed
            )
        )


@dataclass(frozen=True)
class _Subject:
    """A container under review: its view, its spec (edited in place by fixes), its label."""

    view: Container
    spec: dict[str, Any]
    where: str
    #: Ephemeral containers cannot be patched once added: their findings are refusals.
    fixable: bool

    def context(self) -> dict[str, Any]:
        context: dict[str, Any] = self.spec.get("securityContext") or {}
        return context

    def ensure_context(self) -> dict[str, Any]:
        context = self.context()
        self.spec["securityContext"] = context
        return context

    def fix(self, fix: Callable[[], str]) -> Callable[[], str] | None:
        return fix if self.fixable else None


def review_posture(
    spec: dict[str, Any], *, pod: PodView, settings: PostureSettings
) -> list[Finding]:
    """Check (and in fix mode, patch in place) the pod spec; every finding, fixed or not.

    ``pod`` is the view of this very spec: its classification says which containers are
    Istio's, meshguard's and the workload's.
    """
    review = _Review(spec=spec, pod=pod, settings=settings)
    _check_pod(review)
    for container in pod.containers:
        _check_baseline_fields(review, _subject(review, container))
    for container in pod.mesh_init:
        _check_mesh_init(review, _subject(review, container))
    for container in pod.workload:
        _check_container(review, _subject(review, container))
    _check_uids(review)
    _check_ephemeral(review, {c.name for c in pod.ephemeral})
    return review.findings


def review_ephemeral(
    spec: dict[str, Any], *, pod: PodView, settings: PostureSettings, names: Collection[str]
) -> list[Finding]:
    """The findings on the named ephemeral containers (``kubectl debug`` adding them)."""
    review = _Review(spec=spec, pod=pod, settings=settings)
    _check_ephemeral(review, names)
    return review.findings


def refusals(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if not f.fixed]


def _subject(review: _Review, container: Container) -> _Subject:
    spec = review.spec[container.field][container.index]
    ephemeral = container.role is Role.EPHEMERAL
    where = f"{'ephemeral container' if ephemeral else 'container'} {container.name!r}"
    if container.role not in {Role.PROXY, Role.MESH_INIT} and (
        container.name in MESH_INIT_CONTAINERS or container.name == PROXY_CONTAINER
    ):
        where += f" ({container.where}, not Istio's or meshguard's own: checked as a workload)"
    return _Subject(view=container, spec=spec, where=where, fixable=not ephemeral)


# --- pod-level ----------------------------------------------------------------------------


def _check_pod(review: _Review) -> None:
    spec = review.spec
    for key, check, problem in (
        (
            "hostNetwork", Check.HOST_NETWORK,
            "the pod uses the node's network namespace: its loopback is the node's and cannot be"
            " isolated per container",
        ),
        ("hostPID", Check.HOST_PID, "the pod sees the node's processes, the proxy's included"),
        ("hostIPC", Check.HOST_IPC, "the pod shares the node's IPC namespace (Pod Security"
         " Standards baseline forbids it)"),
    ):  # fmt: skip
        if spec.get(key) is True:
            remedy = f"remove {key}"
            if key == "hostNetwork":
                remedy += ', or opt the pod out with meshguard.io/inject: "false"'
            review.report(check, "pod", f"spec.{key}", problem, remedy)
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
    _check_profiles(review, "pod", "spec.securityContext", context)
    for index, sysctl in enumerate(context.get("sysctls") or []):
        name = sysctl.get("name")
        if name not in SAFE_SYSCTLS:
            review.report(
                Check.SYSCTL, "pod", f"spec.securityContext.sysctls[{index}]",
                f"sets {name!r}, which Pod Security Standards baseline does not allow",
                f"remove it (allowed: {', '.join(sorted(SAFE_SYSCTLS))})",
            )  # fmt: skip
    annotations = review.pod.annotations
    if annotations.get(SECCOMP_POD_ANNOTATION, "").lower() == "unconfined":
        review.report(
            Check.SECCOMP, "pod", f"metadata.annotations[{SECCOMP_POD_ANNOTATION}]",
            "is unconfined: the pod's syscalls are not filtered",
            "use runtime/default or a localhost profile",
        )  # fmt: skip
    for volume in spec.get("volumes") or []:
        _check_volume(review, volume)


def _check_volume(review: _Review, volume: Mapping[str, Any]) -> None:
    path = (volume.get("hostPath") or {}).get("path")
    if path is None:
        return
    field_ = f"spec.volumes[{volume.get('name')}].hostPath.path"
    if _exposes_runtime_socket(path):
        review.report(
            Check.RUNTIME_SOCKET, "pod", field_,
            f"{path} exposes the container runtime's socket: any container mounting it can"
            " start a privileged container",
            "do not mount the runtime socket into a meshguard pod",
        )  # fmt: skip
    else:
        review.report(
            Check.HOST_PATH, "pod", field_,
            f"volume {volume.get('name')!r} mounts the node's {path}: Pod Security Standards"
            " baseline forbids hostPath volumes (node files, sockets and /proc reach past the"
            " pod's isolation)",
            "use an emptyDir, a configMap/secret, or a PersistentVolumeClaim instead",
        )  # fmt: skip


def _remove_group(context: dict[str, Any], gid: int) -> str:
    context["supplementalGroups"] = [g for g in context["supplementalGroups"] if g != gid]
    return f"removed {gid} from supplementalGroups"


def _exposes_runtime_socket(path: str) -> bool:
    normalized = "/" + path.strip("/")
    return any(
        sock == normalized or sock.startswith(normalized + "/") for sock in RUNTIME_SOCKETS
    ) or (normalized == "/")


# --- Pod Security Standards baseline fields, every container ------------------------------


def _check_baseline_fields(review: _Review, subject: _Subject) -> None:
    """Fields baseline forbids on any container, Istio's included (Istio sets none of them)."""
    where = subject.where
    for index, port in enumerate(subject.spec.get("ports") or []):
        host_port = port.get("hostPort")
        if host_port:
            review.report(
                Check.HOST_PORT, where, f"ports[{index}].hostPort",
                f"{host_port} binds a port of the node (Pod Security Standards baseline forbids"
                " host ports)",
                "remove hostPort and expose the port through a Service",
            )  # fmt: skip
    context = subject.context()
    proc_mount = context.get("procMount")
    if proc_mount not in {None, "Default"}:
        review.report(
            Check.PROC_MOUNT, where, "securityContext.procMount",
            f"is {proc_mount}: /proc is not masked (other processes' details are exposed)",
            "remove procMount (or set Default)",
        )  # fmt: skip
    _check_profiles(review, where, "securityContext", context)
    annotations = review.pod.annotations
    name = subject.view.name
    for prefix, check, allowed in (
        (SECCOMP_CONTAINER_ANNOTATION, Check.SECCOMP, ("runtime/default", "docker/default")),
        (APPARMOR_ANNOTATION, Check.APPARMOR, ("runtime/default",)),
    ):
        value = annotations.get(prefix + name)
        if value is not None and value not in allowed and not value.startswith("localhost/"):
            review.report(
                check, where, f"metadata.annotations[{prefix}{name}]",
                f"is {value!r}: Pod Security Standards baseline allows only"
                f" {', '.join(allowed)} or localhost/<profile>",
                "use runtime/default or a localhost profile",
            )  # fmt: skip
    options = (subject.spec.get("securityContext") or {}).get("windowsOptions") or {}
    if options.get("hostProcess") is True:
        review.report(
            Check.HOST_PROCESS, where, "securityContext.windowsOptions.hostProcess",
            "runs the container as a process of the Windows node",
            "remove hostProcess",
        )  # fmt: skip


def _check_profiles(review: _Review, where: str, field_: str, context: Mapping[str, Any]) -> None:
    """seccomp, AppArmor and SELinux settings of a pod or container securityContext."""
    for key, check in (("seccompProfile", Check.SECCOMP), ("appArmorProfile", Check.APPARMOR)):
        kind = (context.get(key) or {}).get("type")
        if kind == "Unconfined":
            review.report(
                check, where, f"{field_}.{key}.type",
                "is Unconfined (Pod Security Standards baseline forbids it)",
                "use RuntimeDefault or Localhost",
            )  # fmt: skip
    selinux = context.get("seLinuxOptions") or {}
    if (selinux.get("type") or "") not in SAFE_SELINUX_TYPES:
        review.report(
            Check.SELINUX, where, f"{field_}.seLinuxOptions.type",
            f"is {selinux['type']!r}, outside Pod Security Standards baseline's types",
            f"remove it or use one of {', '.join(sorted(SAFE_SELINUX_TYPES - {''}))}",
        )  # fmt: skip
    for key in ("user", "role"):
        if selinux.get(key):
            review.report(
                Check.SELINUX, where, f"{field_}.seLinuxOptions.{key}",
                f"is set ({selinux[key]!r}): Pod Security Standards baseline forbids custom"
                " SELinux users and roles",
                f"remove seLinuxOptions.{key}",
            )  # fmt: skip


# --- Istio's init steps -------------------------------------------------------------------


def _check_mesh_init(review: _Review, subject: _Subject) -> None:
    """Istio's own init step holds what Istio's template gives it and nothing more, so a
    pod that merely claims Istio's status cannot smuggle a privileged container in."""
    name = subject.view.name
    if name not in {ISTIO_INIT, ISTIO_VALIDATION}:
        return  # meshguard-init is recognized only as exactly the container meshguard makes
    context = subject.context()
    where = f"{subject.where} (Istio's init step)"
    if context.get("privileged") is True:
        review.report(
            Check.MESH_INIT_PRIVILEGES, where, "securityContext.privileged",
            "Istio's init step needs only NET_ADMIN and NET_RAW, not a privileged container",
            "set privileged: false",
            fix=lambda: _set(subject.ensure_context(), "privileged", False),
        )  # fmt: skip
    allowed = ISTIO_INIT_CAPABILITIES.get(name, frozenset())
    extra = sorted(_added(context) - allowed)
    if extra:
        review.report(
            Check.MESH_INIT_PRIVILEGES, where, "securityContext.capabilities.add",
            f"adds {', '.join(extra)}; Istio gives {name} only"
            f" {', '.join(sorted(allowed)) or 'no capabilities'}",
            f"remove {', '.join(extra)} from capabilities.add",
            fix=functools.partial(_remove_added, subject.ensure_context, extra),
        )  # fmt: skip


# --- per container ------------------------------------------------------------------------


def _shares_processes(review: _Review, subject: _Subject) -> bool:
    """The container sees other containers' processes: a shared process namespace, or an
    ephemeral container that targets another container's."""
    return review.spec.get("shareProcessNamespace") is True or bool(
        subject.view.role is Role.EPHEMERAL and subject.spec.get("targetContainerName")
    )


def _check_container(review: _Review, subject: _Subject) -> None:
    where = subject.where
    context = subject.context()
    ensure_context = subject.ensure_context
    shared = _shares_processes(review, subject)

    if context.get("privileged") is True:
        review.report(
            Check.PRIVILEGED, where, "securityContext.privileged",
            "a privileged container can rewrite every network rule of the pod",
            "set privileged: false",
            fix=subject.fix(lambda: _set(ensure_context(), "privileged", False)),
        )  # fmt: skip
    if context.get("allowPrivilegeEscalation") is not False:
        review.report(
            Check.PRIVILEGE_ESCALATION, where, "securityContext.allowPrivilegeEscalation",
            "is not false: a setuid binary could switch to the proxy's uid",
            "set allowPrivilegeEscalation: false",
            fix=subject.fix(lambda: _set(ensure_context(), "allowPrivilegeEscalation", False)),
        )  # fmt: skip
    specific = {"NET_ADMIN", "NET_RAW", "SETUID", "SETGID", "SYS_ADMIN"}
    if shared:
        specific |= {"SYS_PTRACE", "KILL"}
    added = _added(context)
    outside = sorted(added - BASELINE_CAPABILITIES - specific - {"ALL"})
    if "ALL" in added:
        outside.insert(0, "ALL")
    if outside:
        review.report(
            Check.ADDED_CAPABILITY, where, "securityContext.capabilities.add",
            f"adds {', '.join(outside)}, outside Pod Security Standards baseline",
            f"remove {', '.join(outside)} from capabilities.add (baseline allows adding only"
            f" {', '.join(sorted(BASELINE_CAPABILITIES - {'SETUID', 'SETGID'}))})",
            fix=subject.fix(functools.partial(_remove_added, ensure_context, outside)),
        )  # fmt: skip
    dangerous = [
        (Check.NET_CAPABILITY, {"NET_ADMIN", "NET_RAW"}, "can rewrite the rules or craft packets"),
        (Check.SETUID_CAPABILITY, {"SETUID", "SETGID"}, "can switch to the proxy's uid or gid"),
        (Check.SYS_ADMIN, {"SYS_ADMIN"}, "can change the pod's namespaces and rules"),
    ]
    if shared:
        dangerous += [
            (Check.SYS_PTRACE, {"SYS_PTRACE"},
             "can trace the proxy in the shared process namespace"),
            (Check.KILL_CAPABILITY, {"KILL"},
             "can kill the proxy in the shared process namespace and take over its ports"),
        ]  # fmt: skip
    for check, names, why in dangerous:
        held = sorted(_effective_capabilities(subject.context()) & names)
        if held:
            review.report(
                check, where, "securityContext.capabilities",
                f"holds {', '.join(held)} ({why})",
                f"drop {', '.join(held)}",
                fix=subject.fix(functools.partial(_drop_from, ensure_context, held)),
            )  # fmt: skip


def _set(context: dict[str, Any], key: str, value: object) -> str:
    context[key] = value
    return f"set {key}: {str(value).lower()}"


def _added(context: Mapping[str, Any]) -> set[str]:
    return {_cap(c) for c in (context.get("capabilities") or {}).get("add") or []}


def _effective_capabilities(context: Mapping[str, Any]) -> set[str]:
    """What the runtime grants (containerd and CRI-O: ALL in drop wins over ALL in add, then
    the single names are added and dropped)."""
    if context.get("privileged") is True:
        return set(ALL_CAPABILITIES)
    capabilities = context.get("capabilities") or {}
    add = {_cap(c) for c in capabilities.get("add") or []}
    drop = {_cap(c) for c in capabilities.get("drop") or []}
    base = set(ALL_CAPABILITIES) if "ALL" in add else set(DEFAULT_CAPABILITIES)
    if "ALL" in drop:
        base = set()
    return (base | (add - {"ALL"})) - drop


def _cap(name: object) -> str:
    return str(name).strip().upper().removeprefix("CAP_")


def _remove_added(context_of: Callable[[], dict[str, Any]], names: list[str]) -> str:
    capabilities = context_of().setdefault("capabilities", {})
    capabilities["add"] = [c for c in capabilities.get("add") or [] if _cap(c) not in names]
    return f"removed {', '.join(names)} from capabilities.add"


def _drop_from(context_of: Callable[[], dict[str, Any]], names: list[str]) -> str:
    return _drop(context_of(), names)


def _drop(context: dict[str, Any], names: Iterable[str]) -> str:
    names = list(names)
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
    """Every container needs its own uid, not the proxy's; its gid must be set, and not be
    the proxy's; in a shared process namespace it must not be root."""
    pod_context = review.spec.get("securityContext") or {}
    subjects = [_subject(review, c) for c in review.pod.workload]
    taken = {review.proxy.uid} | {
        uid
        for s in [*subjects, *(_subject(review, c) for c in review.pod.ephemeral)]
        if isinstance(uid := s.context().get("runAsUser"), int)
    }
    allocator = _UidAllocator(review.settings.uid_range, taken)
    owners: dict[int, str] = {}
    for subject in subjects:
        where, container = subject.where, subject.spec
        alongside = subject.view.runs_alongside
        uid = subject.context().get("runAsUser", pod_context.get("runAsUser"))
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
        final_uid = subject.context().get("runAsUser", pod_context.get("runAsUser"))
        if isinstance(final_uid, int) and alongside:
            owners.setdefault(final_uid, subject.view.name)
        _check_gid(review, subject, final_uid, pod_context)
        _check_shared_pid_root(review, subject, final_uid)


def _check_gid(
    review: _Review, subject: _Subject, uid: object, pod_context: Mapping[str, Any]
) -> None:
    gid = subject.context().get("runAsGroup", pod_context.get("runAsGroup"))
    proxy_gid = review.proxy.gid
    can_fix = subject.fixable and isinstance(uid, int) and uid != proxy_gid
    fix = functools.partial(_set_group_to_uid, subject.spec, pod_context) if can_fix else None
    if gid is None:
        review.report(
            Check.MISSING_GID, subject.where, "securityContext.runAsGroup",
            "is not set: the image's /etc/passwd picks the group, which may be the proxy's gid"
            f" {proxy_gid}",
            "set runAsGroup to a gid of its own (posture action fix sets the container's uid)",
            fix,
        )  # fmt: skip
    elif gid == proxy_gid:
        review.report(
            Check.PROXY_GID, subject.where, "securityContext.runAsGroup",
            f"is the proxy's gid {gid}: Istio's capture would treat the container as Envoy",
            "set runAsGroup to another gid",
            fix,
        )  # fmt: skip


def _check_shared_pid_root(review: _Review, subject: _Subject, uid: object) -> None:
    if not _shares_processes(review, subject) or (isinstance(uid, int) and uid != 0):
        return
    who = "root" if uid == 0 else "the image's user (runAsUser unset, often root)"
    review.report(
        Check.SHARED_PID_ROOT, subject.where, "securityContext.runAsUser",
        f"runs as {who} while sharing the process namespace: it could signal or inspect the"
        " proxy's processes",
        "set a non-root runAsUser, or remove shareProcessNamespace",
    )  # fmt: skip


def _check_ephemeral(review: _Review, names: Collection[str]) -> None:
    """Ephemeral containers: the same checks as the workload's, refused instead of fixed;
    their uid must be nobody else's (they get no rules: an unknown uid is denied)."""
    pod_context = review.spec.get("securityContext") or {}
    others: dict[int, str] = {}
    for container in review.pod.workload:  # their uids as fixed, if they were
        uid = _subject(review, container).context().get("runAsUser", pod_context.get("runAsUser"))
        if isinstance(uid, int):
            others.setdefault(uid, container.name)
    for container in review.pod.ephemeral:
        subject = _subject(review, container)
        uid = subject.context().get("runAsUser", pod_context.get("runAsUser"))
        if container.name not in names:
            if isinstance(uid, int):
                others.setdefault(uid, container.name)
            continue
        _check_baseline_fields(review, subject)
        _check_container(review, subject)
        where = subject.where
        remedy = "set a runAsUser that no container of the pod uses and is not the proxy's"
        if uid is None:
            review.report(
                Check.MISSING_UID, where, "securityContext.runAsUser",
                "is not set: the image picks the user, which may be the proxy's", remedy,
            )  # fmt: skip
        elif uid == review.proxy.uid:
            review.report(
                Check.PROXY_UID, where, "securityContext.runAsUser",
                f"is the proxy's uid {uid}: the container would pass as Envoy", remedy,
            )  # fmt: skip
        elif uid in others:
            review.report(
                Check.SHARED_UID, where, "securityContext.runAsUser",
                f"uid {uid} is also {others[uid]!r}'s: the container would get its rules",
                remedy,
            )  # fmt: skip
        if isinstance(uid, int):
            others.setdefault(uid, container.name)
        _check_gid(review, subject, uid, pod_context)
        _check_shared_pid_root(review, subject, uid)


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
