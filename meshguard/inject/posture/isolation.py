"""meshguard's own checks, stricter than baseline: can a container pass as another one or as
Envoy, rewrite the rules, or reach into the proxy? (Each check's reason:
:data:`meshguard.inject.posture.model.OWN_REASONS`.)

uids and gids (every long-running container its own uid, none the proxy's; a gid that is
set and not the proxy's), capabilities a container *holds* whatever the spelling
(SETUID/SETGID, NET_ADMIN/NET_RAW, SYS_ADMIN; SYS_PTRACE and KILL with a shared process
namespace), ``allowPrivilegeEscalation``, root in a shared process namespace, the proxy's gid
as fsGroup or supplementary group, and Istio's init step holding no more than Istio gives it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any

import meshguard.inject.posture.baseline as pss
import meshguard.inject.posture.capabilities as caps
from meshguard.errors import RefusedError
from meshguard.inject.posture.model import Check, PendingFix, Review, Subject
from meshguard.pod import (
    ISTIO_INIT,
    ISTIO_VALIDATION,
    MESH_INIT_CONTAINERS,
    PROXY_CONTAINER,
    Container,
    Role,
)


def subject(review: Review, container: Container) -> Subject:
    spec = review.spec[container.field][container.index]
    ephemeral = container.role is Role.EPHEMERAL
    where = f"{'ephemeral container' if ephemeral else 'container'} {container.name!r}"
    if container.role not in {Role.PROXY, Role.MESH_INIT} and (
        container.name in MESH_INIT_CONTAINERS or container.name == PROXY_CONTAINER
    ):
        where += f" ({container.where}, not Istio's or meshguard's own: checked as a workload)"
    return Subject(view=container, spec=spec, where=where, fixable=not ephemeral)


# --- pod-level ----------------------------------------------------------------------------


def check_pod_groups(review: Review) -> None:
    context = review.spec.get("securityContext") or {}
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
            fix=PendingFix(apply=lambda: _remove_group(context, gid), target=None),
        )  # fmt: skip


def _remove_group(context: dict[str, Any], gid: int) -> str:
    context["supplementalGroups"] = [g for g in context["supplementalGroups"] if g != gid]
    return f"removed {gid} from supplementalGroups"


# --- Istio's init steps -------------------------------------------------------------------


def check_mesh_init(review: Review, subject: Subject) -> None:
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
            fix=subject.fix(lambda: _set(subject.ensure_context(), "privileged", False)),
        )  # fmt: skip
    allowed = caps.ISTIO_INIT_CAPABILITIES.get(name, frozenset())
    extra = sorted(caps.added(context) - allowed)
    if extra:
        review.report(
            Check.MESH_INIT_PRIVILEGES, where, "securityContext.capabilities.add",
            f"adds {', '.join(extra)}; Istio gives {name} only"
            f" {', '.join(sorted(allowed)) or 'no capabilities'}",
            f"remove {', '.join(extra)} from capabilities.add",
            fix=subject.fix(
                functools.partial(caps.remove_added_canonical, subject.ensure_context, extra)
            ),
        )  # fmt: skip


# --- per container ------------------------------------------------------------------------


def shares_processes(review: Review, subject: Subject) -> bool:
    """The container sees other containers' processes: a shared process namespace, or an
    ephemeral container that targets another container's."""
    return review.spec.get("shareProcessNamespace") is True or bool(
        subject.view.role is Role.EPHEMERAL and subject.spec.get("targetContainerName")
    )


def check_container(review: Review, subject: Subject) -> None:
    where = subject.where
    context = subject.context()
    ensure_context = subject.ensure_context
    shared = shares_processes(review, subject)
    if context.get("allowPrivilegeEscalation") is not False:
        review.report(
            Check.PRIVILEGE_ESCALATION, where, "securityContext.allowPrivilegeEscalation",
            "is not false: a setuid binary could switch to the proxy's uid",
            "set allowPrivilegeEscalation: false",
            fix=subject.fix(lambda: _set(ensure_context(), "allowPrivilegeEscalation", False)),
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
        held = sorted(caps.effective(subject.context()) & names)
        if held:
            review.report(
                check, where, "securityContext.capabilities",
                f"holds {', '.join(held)} ({why})",
                f"drop {', '.join(held)}",
                fix=subject.fix(functools.partial(caps.drop_from, ensure_context, held)),
            )  # fmt: skip


def _set(context: dict[str, Any], key: str, value: object) -> str:
    context[key] = value
    return f"set {key}: {str(value).lower()}"


# --- uids ---------------------------------------------------------------------------------


def check_uids(review: Review) -> None:
    """Every container needs its own uid, not the proxy's; its gid must be set, and not be
    the proxy's; in a shared process namespace it must not be root."""
    pod_context = review.spec.get("securityContext") or {}
    subjects = [subject(review, c) for c in review.pod.workload]
    taken = {review.proxy.uid} | {
        uid
        for s in [*subjects, *(subject(review, c) for c in review.pod.ephemeral)]
        if isinstance(uid := s.context().get("runAsUser"), int)
    }
    allocator = _UidAllocator(review.settings.uid_range, taken)
    owners: dict[int, str] = {}
    for item in subjects:
        where, container = item.where, item.spec
        alongside = item.view.runs_alongside
        uid = item.context().get("runAsUser", pod_context.get("runAsUser"))
        assign = item.fix(_assigner(container, allocator))
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
        final_uid = item.context().get("runAsUser", pod_context.get("runAsUser"))
        if isinstance(final_uid, int) and alongside:
            owners.setdefault(final_uid, item.view.name)
        _check_gid(review, item, final_uid, pod_context)
        _check_shared_pid_root(review, item, final_uid)


def _check_gid(
    review: Review, subject: Subject, uid: object, pod_context: Mapping[str, Any]
) -> None:
    gid = subject.context().get("runAsGroup", pod_context.get("runAsGroup"))
    proxy_gid = review.proxy.gid
    can_fix = subject.fixable and isinstance(uid, int) and uid != proxy_gid
    fix = (
        subject.fix(functools.partial(_set_group_to_uid, subject.spec, pod_context))
        if can_fix
        else None
    )
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


def _check_shared_pid_root(review: Review, subject: Subject, uid: object) -> None:
    if not shares_processes(review, subject) or (isinstance(uid, int) and uid != 0):
        return
    who = "root" if uid == 0 else "the image's user (runAsUser unset, often root)"
    review.report(
        Check.SHARED_PID_ROOT, subject.where, "securityContext.runAsUser",
        f"runs as {who} while sharing the process namespace: it could signal or inspect the"
        " proxy's processes",
        "set a non-root runAsUser, or remove shareProcessNamespace",
    )  # fmt: skip


def check_ephemeral(review: Review, names: Collection[str]) -> None:
    """Ephemeral containers: the same checks as the workload's, refused instead of fixed;
    their uid must be nobody else's (they get no rules: an unknown uid is denied)."""
    pod_context = review.spec.get("securityContext") or {}
    others: dict[int, str] = {}
    for container in review.pod.workload:  # their uids as fixed, if they were
        uid = subject(review, container).context().get("runAsUser", pod_context.get("runAsUser"))
        if isinstance(uid, int):
            others.setdefault(uid, container.name)
    for container in review.pod.ephemeral:
        item = subject(review, container)
        uid = item.context().get("runAsUser", pod_context.get("runAsUser"))
        if container.name not in names:
            if isinstance(uid, int):
                others.setdefault(uid, container.name)
            continue
        pss.check_container(review, item)
        check_container(review, item)
        where = item.where
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
        _check_gid(review, item, uid, pod_context)
        _check_shared_pid_root(review, item, uid)


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
