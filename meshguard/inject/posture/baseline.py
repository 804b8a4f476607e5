"""Pod Security Standards "baseline", versioned: the floor under meshguard's own checks.

A faithful reading of Kubernetes' Pod Security Admission baseline checks
(``k8s.io/pod-security-admission/policy``), each as of the version that introduced or changed
it, so that an operator can pin the floor the way ``pod-security.kubernetes.io/enforce-version``
pins Pod Security Admission (:class:`BaselineVersion`; ``latest`` is v1.37):

- host namespaces (hostNetwork, hostPID, hostIPC), Windows hostProcess (pod and containers),
  privileged containers, hostPath volumes, host ports — every version;
- ``capabilities.add``: only the exact names of :data:`BASELINE_CAPABILITIES`;
- AppArmor: ``appArmorProfile.type`` RuntimeDefault or Localhost (pod and containers), the
  ``container.apparmor.security.beta.kubernetes.io/*`` annotations empty, ``runtime/default``
  or ``localhost/*``;
- SELinux: no user or role, a type of :data:`SELINUX_TYPES` (``container_engine_t`` from
  v1.31);
- ``procMount``: Default or unset; from v1.35 any value when ``hostUsers: false``;
- seccomp: before v1.19 the seccomp annotations (``runtime/default``, ``docker/default``,
  ``localhost/*``), from v1.19 ``seccompProfile.type`` RuntimeDefault or Localhost;
- sysctls: :data:`SAFE_SYSCTLS` as of the version;
- from v1.34, no ``host`` in the httpGet / tcpSocket handlers of liveness, readiness and
  startup probes and of ``lifecycle.postStart`` / ``preStop`` (the kubelet would dial that
  host from the node).

Every container is checked, Istio's proxy and ephemeral containers included. The one
deliberate exception is the mesh's own init step (istio-init, meshguard-init): it needs
NET_ADMIN and NET_RAW to install the pod's rules, which baseline does not allow — exactly
as with Istio itself, whose baseline namespaces need Istio CNI — and meshguard's own
``mesh-init-privileges`` check holds it to what Istio gives it instead. Likewise Istio's
recognized proxy may add NET_ADMIN, which Istio's template gives it in TPROXY interception
mode.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Final

import meshguard.inject.posture.capabilities as caps
from meshguard.inject.posture.baseline_version import BaselineVersion
from meshguard.inject.posture.model import Check, Review, Subject
from meshguard.pod import Role

#: Pod Security Standards baseline capabilities (re-exported for callers).
BASELINE_CAPABILITIES: Final = caps.BASELINE_CAPABILITIES

#: The safe sysctls, by the version that added them.
_SYSCTLS_BY_VERSION: Final[tuple[tuple[int, frozenset[str]], ...]] = (
    (0, frozenset({
        "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start",
    })),
    (27, frozenset({"net.ipv4.ip_local_reserved_ports"})),
    (29, frozenset({
        "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes",
    })),
    (32, frozenset({"net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"})),
    (37, frozenset({"net.ipv4.tcp_slow_start_after_idle", "net.ipv4.tcp_notsent_lowat"})),
)  # fmt: skip
_SELINUX_TYPES_BY_VERSION: Final[tuple[tuple[int, frozenset[str]], ...]] = (
    (0, frozenset({"", "container_t", "container_init_t", "container_kvm_t"})),
    (31, frozenset({"container_engine_t"})),
)
PROC_MOUNT_USERNS_MINOR: Final = 35
SECCOMP_FIELDS_MINOR: Final = 19
PROBE_HOST_MINOR: Final = 34

SECCOMP_POD_ANNOTATION: Final = "seccomp.security.alpha.kubernetes.io/pod"
SECCOMP_CONTAINER_ANNOTATION: Final = "container.seccomp.security.alpha.kubernetes.io/"
APPARMOR_ANNOTATION: Final = "container.apparmor.security.beta.kubernetes.io/"
_PROFILE_TYPES: Final = ("RuntimeDefault", "Localhost")
_SECCOMP_ANNOTATION_VALUES: Final = ("runtime/default", "docker/default")
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
_PROBES: Final = ("livenessProbe", "readinessProbe", "startupProbe")
_HOOKS: Final = ("postStart", "preStop")


def _as_of(
    version: BaselineVersion, table: tuple[tuple[int, frozenset[str]], ...]
) -> frozenset[str]:
    return frozenset().union(*(names for minor, names in table if version.at_least(minor)))


def safe_sysctls(version: BaselineVersion) -> frozenset[str]:
    return _as_of(version, _SYSCTLS_BY_VERSION)


def selinux_types(version: BaselineVersion) -> frozenset[str]:
    return _as_of(version, _SELINUX_TYPES_BY_VERSION)


# --- pod-level ----------------------------------------------------------------------------


def check_pod(review: Review) -> None:
    """Host namespaces, the pod's securityContext (hostProcess, profiles, sysctls), the seccomp
    and AppArmor annotations, hostPath volumes."""
    spec = review.spec
    for key, check, problem in (
        (
            "hostNetwork", Check.HOST_NETWORK,
            "the pod uses the node's network namespace: its loopback is the node's and cannot be"
            " isolated per container",
        ),
        ("hostPID", Check.HOST_PID, "the pod sees the node's processes, the proxy's included"),
        ("hostIPC", Check.HOST_IPC, "the pod shares the node's IPC namespace"),
    ):  # fmt: skip
        if spec.get(key) is True:
            remedy = f"remove {key}"
            if key == "hostNetwork":
                remedy += ', or opt the pod out with meshguard.io/inject: "false"'
            review.report(check, "pod", f"spec.{key}", problem, remedy)
    context = spec.get("securityContext") or {}
    _check_host_process(review, "pod", "spec.securityContext", context)
    _check_profiles(review, "pod", "spec.securityContext", context)
    version = review.settings.baseline
    allowed = safe_sysctls(version)
    for index, sysctl in enumerate(context.get("sysctls") or []):
        name = sysctl.get("name") if isinstance(sysctl, Mapping) else sysctl
        if name not in allowed:
            review.report(
                Check.SYSCTL, "pod", f"spec.securityContext.sysctls[{index}]",
                f"sets {name!r}, which Pod Security Standards baseline {version} does not allow",
                f"remove it (allowed: {', '.join(sorted(allowed))})",
            )  # fmt: skip
    _check_annotations(review)
    for volume in spec.get("volumes") or []:
        _check_volume(review, volume)


def _check_annotations(review: Review) -> None:
    annotations = review.pod.annotations
    if not review.settings.baseline.at_least(SECCOMP_FIELDS_MINOR):
        names = {c.name for c in (*review.pod.containers, *review.pod.ephemeral)}
        keys = [SECCOMP_POD_ANNOTATION, *(SECCOMP_CONTAINER_ANNOTATION + n for n in sorted(names))]
        for key in keys:
            value = annotations.get(key)
            if value is not None and not _seccomp_annotation_allowed(value):
                review.report(
                    Check.SECCOMP, "pod", f"metadata.annotations[{key}]",
                    f"is {value!r}: baseline {review.settings.baseline} allows only"
                    " runtime/default, docker/default or localhost/<profile>",
                    "use runtime/default or a localhost profile",
                )  # fmt: skip
    for key in sorted(k for k in annotations if k.startswith(APPARMOR_ANNOTATION)):
        value = annotations[key]
        if value and value != "runtime/default" and not value.startswith("localhost/"):
            review.report(
                Check.APPARMOR, "pod", f"metadata.annotations[{key}]",
                f"is {value!r}: Pod Security Standards baseline allows only runtime/default or"
                " localhost/<profile>",
                "use runtime/default or a localhost profile",
            )  # fmt: skip


def _seccomp_annotation_allowed(value: str) -> bool:
    return value in _SECCOMP_ANNOTATION_VALUES or value.startswith("localhost/")


def _check_volume(review: Review, volume: Mapping[str, Any]) -> None:
    host_path = volume.get("hostPath")
    if host_path is None:
        return
    path = str((host_path or {}).get("path"))
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


def _exposes_runtime_socket(path: str) -> bool:
    normalized = "/" + path.strip("/")
    return any(
        sock == normalized or sock.startswith(normalized + "/") for sock in RUNTIME_SOCKETS
    ) or (normalized == "/")


# --- every container ----------------------------------------------------------------------


def check_container(review: Review, subject: Subject) -> None:
    """The per-container baseline checks, on any container (Istio's included)."""
    where = subject.where
    for index, port in enumerate(subject.spec.get("ports") or []):
        host_port = port.get("hostPort") if isinstance(port, Mapping) else None
        if host_port:
            review.report(
                Check.HOST_PORT, where, f"ports[{index}].hostPort",
                f"{host_port} binds a port of the node (Pod Security Standards baseline forbids"
                " host ports)",
                "remove hostPort and expose the port through a Service",
            )  # fmt: skip
    context = subject.context()
    _check_proc_mount(review, subject, context)
    _check_profiles(review, where, "securityContext", context)
    _check_host_process(review, where, "securityContext", context)
    _check_probe_hosts(review, subject)
    if subject.view.role is Role.MESH_INIT:
        return  # its privileges: meshguard's mesh-init-privileges (see the module docstring)
    ensure_context = subject.ensure_context
    if context.get("privileged") is True:
        review.report(
            Check.PRIVILEGED, where, "securityContext.privileged",
            "a privileged container holds every capability and can rewrite every network rule"
            " of the pod (Pod Security Standards baseline forbids it)",
            "set privileged: false",
            fix=subject.fix(lambda: _set(ensure_context(), "privileged", False)),
        )  # fmt: skip
    _check_added_capabilities(review, subject, context)


def _check_added_capabilities(review: Review, subject: Subject, context: Mapping[str, Any]) -> None:
    written = caps.added_as_written(context)
    if subject.view.role is Role.PROXY:  # Istio's TPROXY mode (see the module docstring)
        written = [c for c in written if c not in caps.ISTIO_PROXY_CAPABILITIES]
    respelled = [
        c
        for c in written
        if c not in BASELINE_CAPABILITIES and caps.canonical(c) in BASELINE_CAPABILITIES
    ]
    outside = [c for c in written if caps.canonical(c) not in BASELINE_CAPABILITIES]
    allowed = ", ".join(sorted(BASELINE_CAPABILITIES))
    if respelled:
        review.report(
            Check.ADDED_CAPABILITY, subject.where, "securityContext.capabilities.add",
            f"adds {', '.join(respelled)}: baseline allows only its exact names"
            f" ({', '.join(caps.canonical(c) for c in respelled)}), runtimes differ on other"
            " spellings",
            f"write {', '.join(caps.canonical(c) for c in respelled)} instead",
            fix=subject.fix(functools.partial(caps.respell, subject.ensure_context, respelled)),
        )  # fmt: skip
    if outside:
        review.report(
            Check.ADDED_CAPABILITY, subject.where, "securityContext.capabilities.add",
            f"adds {', '.join(outside)}, outside Pod Security Standards baseline",
            f"remove {', '.join(outside)} from capabilities.add (baseline allows adding only"
            f" {allowed})",
            fix=subject.fix(functools.partial(caps.remove_added, subject.ensure_context, outside)),
        )  # fmt: skip


def _check_proc_mount(review: Review, subject: Subject, context: Mapping[str, Any]) -> None:
    proc_mount = context.get("procMount")
    if proc_mount in {None, "Default"}:
        return
    version = review.settings.baseline
    user_namespace = review.spec.get("hostUsers") is False
    if user_namespace and version.at_least(PROC_MOUNT_USERNS_MINOR):
        return  # baseline v1.35+: /proc of a user-namespaced pod exposes nothing of the node
    remedy = "remove procMount (or set Default)"
    allowed = "never"
    if version.at_least(PROC_MOUNT_USERNS_MINOR):
        remedy += ", or run the pod in a user namespace (hostUsers: false)"
        allowed = "only with hostUsers: false"
    review.report(
        Check.PROC_MOUNT, subject.where, "securityContext.procMount",
        f"is {proc_mount}: /proc is not masked (other processes' details are exposed;"
        f" baseline {version} allows it {allowed})",
        remedy,
    )  # fmt: skip


def _check_host_process(
    review: Review, where: str, field_: str, context: Mapping[str, Any]
) -> None:
    options = context.get("windowsOptions") or {}
    if options.get("hostProcess") is True:
        review.report(
            Check.HOST_PROCESS, where, f"{field_}.windowsOptions.hostProcess",
            "runs as a process of the Windows node (Pod Security Standards baseline forbids it)",
            "remove hostProcess",
        )  # fmt: skip


def _check_probe_hosts(review: Review, subject: Subject) -> None:
    if not review.settings.baseline.at_least(PROBE_HOST_MINOR):
        return
    spec = subject.spec
    handlers: list[tuple[str, object]] = [(probe, spec.get(probe)) for probe in _PROBES]
    lifecycle = spec.get("lifecycle")
    if isinstance(lifecycle, Mapping):
        handlers += [(f"lifecycle.{hook}", lifecycle.get(hook)) for hook in _HOOKS]
    for path, handler in handlers:
        if not isinstance(handler, Mapping):
            continue
        for kind in ("httpGet", "tcpSocket"):
            action = handler.get(kind)
            host = action.get("host") if isinstance(action, Mapping) else None
            if host:
                review.report(
                    Check.PROBE_HOST, subject.where, f"{path}.{kind}.host",
                    f"is {host!r}: the kubelet would dial that host from the node (Pod Security"
                    f" Standards baseline forbids it since v1.{PROBE_HOST_MINOR})",
                    f"remove {path}.{kind}.host (the kubelet then dials the pod's IP)",
                )  # fmt: skip


def _check_profiles(review: Review, where: str, field_: str, context: Mapping[str, Any]) -> None:
    """seccomp, AppArmor and SELinux settings of a pod or container securityContext."""
    version = review.settings.baseline
    keys = [("appArmorProfile", Check.APPARMOR)]
    if version.at_least(SECCOMP_FIELDS_MINOR):
        keys.insert(0, ("seccompProfile", Check.SECCOMP))
    for key, check in keys:
        profile = context.get(key)
        if not isinstance(profile, Mapping):
            continue
        kind = profile.get("type")
        if kind not in _PROFILE_TYPES:
            review.report(
                check, where, f"{field_}.{key}.type",
                f"is {kind!r}: Pod Security Standards baseline allows only RuntimeDefault or"
                " Localhost",
                "use RuntimeDefault or Localhost",
            )  # fmt: skip
    selinux = context.get("seLinuxOptions")
    if not isinstance(selinux, Mapping):
        return
    types = selinux_types(version)
    if (selinux.get("type") or "") not in types:
        review.report(
            Check.SELINUX, where, f"{field_}.seLinuxOptions.type",
            f"is {selinux['type']!r}, outside Pod Security Standards baseline {version}'s types",
            f"remove it or use one of {', '.join(sorted(types - {''}))}",
        )  # fmt: skip
    for key in ("user", "role"):
        if selinux.get(key):
            review.report(
                Check.SELINUX, where, f"{field_}.seLinuxOptions.{key}",
                f"is set ({selinux[key]!r}): Pod Security Standards baseline forbids custom"
                " SELinux users and roles",
                f"remove seLinuxOptions.{key}",
            )  # fmt: skip


def _set(context: dict[str, Any], key: str, value: object) -> str:
    context[key] = value
    return f"set {key}: {str(value).lower()}"
