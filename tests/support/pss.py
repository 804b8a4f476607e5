"""Pod Security Standards (baseline and restricted), checked as the PodSecurity admission
controller checks them (kubernetes.io/docs/concepts/security/pod-security-standards, policy
version "latest"): a pod spec and its annotations in, the set of violations out.

Each violation is an (owner, check) pair: the owner is ``"pod"`` for the pod's own fields
(its securityContext, volumes, sysctls, annotations) or the container's name (names are
unique in a pod), the check names the rule and the value that breaks it. As the controller
does, a field set on the pod is judged on the pod, and a container is judged by its own
context where it sets the field and by the pod's where it does not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

Level = Literal["baseline", "restricted"]
POD = "pod"

BASELINE_CAPABILITIES = frozenset(
    {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
     "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
)  # fmt: skip
SAFE_SYSCTLS = frozenset(
    {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
     "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
     "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
     "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
     "net.ipv4.tcp_keepalive_probes"}
)  # fmt: skip
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t",
                           "container_engine_t"})  # fmt: skip
RESTRICTED_VOLUMES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
     "projected", "secret"}
)  # fmt: skip
#: seccomp and AppArmor profile types baseline allows (unset is allowed too).
CONFINED_PROFILES = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


class Violation(NamedTuple):
    """One rule a pod breaks: who breaks it ("pod" or a container's name) and which."""

    owner: str
    check: str


def violations(
    spec: Mapping[str, Any], *, level: Level, annotations: Mapping[str, str]
) -> set[Violation]:
    """What the pod (its spec and metadata.annotations) fails at ``level``."""
    pod_context = spec.get("securityContext") or {}
    found = {Violation(POD, check) for check in _pod_baseline(spec, annotations)}
    found |= {Violation(POD, check) for check in _context_baseline(pod_context)}
    for name, container in containers(spec):
        found |= {Violation(name, check) for check in _container_baseline(container)}
    if level == "restricted":
        found |= {Violation(POD, check) for check in _pod_restricted(spec)}
        for name, container in containers(spec):
            checks = _container_restricted(container, pod_context)
            found |= {Violation(name, check) for check in checks}
    return found


def checks_of(found: Iterable[Violation], owner: str) -> set[str]:
    """The checks ``owner`` (a container's name, or "pod") fails among ``found``."""
    return {violation.check for violation in found if violation.owner == owner}


def containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(name, container) for every init, regular and ephemeral container."""
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in spec.get(key) or []:
            yield str(container.get("name")), container


def _pod_baseline(spec: Mapping[str, Any], annotations: Mapping[str, str]) -> Iterator[str]:
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            yield key
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            yield f"hostPath volume {volume.get('name')}"
    for sysctl in (spec.get("securityContext") or {}).get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield f"sysctl {sysctl.get('name')}"
    for key, value in annotations.items():
        if key.startswith(APPARMOR_ANNOTATION) and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            yield f"annotation {key}={value}"


def _context_baseline(context: Mapping[str, Any]) -> Iterator[str]:
    """The rules baseline applies alike to the pod's securityContext and a container's."""
    if (context.get("windowsOptions") or {}).get("hostProcess"):
        yield "hostProcess"
    seccomp = (context.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in CONFINED_PROFILES:
        yield f"seccomp {seccomp}"
    apparmor = (context.get("appArmorProfile") or {}).get("type")
    if apparmor is not None and apparmor not in CONFINED_PROFILES:
        yield f"appArmor {apparmor}"
    selinux = context.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES:
        yield f"seLinuxOptions.type {selinux.get('type')}"
    for key in ("user", "role"):
        if selinux.get(key):
            yield f"seLinuxOptions.{key}"


def _container_baseline(container: Mapping[str, Any]) -> Iterator[str]:
    context = container.get("securityContext") or {}
    yield from _context_baseline(context)
    if context.get("privileged"):
        yield "privileged"
    if context.get("procMount") not in (None, "Default"):
        yield "procMount"
    for port in container.get("ports") or []:
        if port.get("hostPort"):
            yield f"hostPort {port.get('hostPort')}"
    added = set((context.get("capabilities") or {}).get("add") or [])
    for capability in sorted(added - BASELINE_CAPABILITIES):
        yield f"capability {capability}"


def _pod_restricted(spec: Mapping[str, Any]) -> Iterator[str]:
    for volume in spec.get("volumes") or []:
        # a volume that names no source is an emptyDir (the API's default)
        for kind in sorted(set(volume) - {"name"} - RESTRICTED_VOLUMES):
            yield f"volume type {kind}"
    pod_context = spec.get("securityContext") or {}
    if pod_context.get("runAsNonRoot") is False:
        yield "runAsNonRoot"
    if pod_context.get("runAsUser") == 0:
        yield "runAsUser 0"


def _container_restricted(
    container: Mapping[str, Any], pod_context: Mapping[str, Any]
) -> Iterator[str]:
    context = container.get("securityContext") or {}
    effective = {**pod_context, **context}
    if context.get("allowPrivilegeEscalation") is not False:
        yield "allowPrivilegeEscalation"
    if effective.get("runAsNonRoot") is not True:
        yield "runAsNonRoot"
    if effective.get("runAsUser") == 0:
        yield "runAsUser 0"
    if (effective.get("seccompProfile") or {}).get("type") not in CONFINED_PROFILES:
        yield "seccompProfile"
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        yield "capabilities drop ALL"
    for capability in sorted(set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}):
        yield f"restricted capability {capability}"
