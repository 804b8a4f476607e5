"""The vocabulary of the posture checks: the checks, where each comes from, the actions, the
findings, and the review state the check families share.

A check is either Pod Security Standards "baseline" (:data:`Origin.BASELINE`, versioned in
:mod:`meshguard.inject.posture.baseline`) or meshguard's own (:data:`Origin.MESHGUARD`),
stricter than baseline for a reason that :data:`OWN_REASONS` states: the loopback rules tell
containers apart by uid, so anything that lets a container pass as another one (or as Envoy),
rewrite the rules, or reach into the proxy is refused or fixed, even where baseline allows
it.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from meshguard.inject.posture.baseline_version import LATEST, BaselineVersion
from meshguard.pod import Container, PodView, ProxyIdentity


class PostureAction(enum.StrEnum):
    """What a finding leads to: ``deny`` refuses the pod; ``fix`` patches what has a safe
    patch and refuses the rest; ``report`` changes nothing and refuses nothing (the finding
    becomes an admission warning and is recorded in ``meshguard.io/status``)."""

    DENY = "deny"
    FIX = "fix"
    REPORT = "report"


class Outcome(enum.StrEnum):
    """What became of one finding: every finding is fixed, refused or (action ``report``)
    reported — never silently kept."""

    FIXED = "fixed"
    REFUSED = "refused"
    REPORTED = "reported"


class Origin(enum.StrEnum):
    BASELINE = "baseline"
    MESHGUARD = "meshguard"


class Check(enum.StrEnum):
    """One posture check each; the value is its id in findings and in the settings.

    Pod Security Standards baseline (as of the version the settings pin): ``host-process``,
    ``host-network``, ``host-pid``, ``host-ipc``, ``privileged``, ``added-capability``
    (``capabilities.add`` beyond baseline's list, exact spellings only), ``host-path`` and
    ``runtime-socket`` (hostPath volumes), ``host-port``, ``apparmor``, ``selinux``,
    ``proc-mount``, ``seccomp``, ``sysctl``, ``probe-host`` (v1.34+).
    meshguard's own, stricter (the reason of each in :data:`OWN_REASONS`): ``proxy-uid``,
    ``missing-uid``, ``shared-uid``, ``proxy-gid``, ``missing-gid``,
    ``supplemental-groups``, ``fs-group``, ``setuid-capability``, ``privilege-escalation``,
    ``net-capability``, ``sys-admin``, ``sys-ptrace``, ``kill-capability``,
    ``shared-pid-root``, ``mesh-init-privileges``.
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
    PROBE_HOST = "probe-host"


BASELINE_CHECKS: Final = frozenset(
    {
        Check.HOST_PROCESS, Check.HOST_NETWORK, Check.HOST_PID, Check.HOST_IPC,
        Check.PRIVILEGED, Check.ADDED_CAPABILITY, Check.HOST_PATH, Check.RUNTIME_SOCKET,
        Check.HOST_PORT, Check.APPARMOR, Check.SELINUX, Check.PROC_MOUNT, Check.SECCOMP,
        Check.SYSCTL, Check.PROBE_HOST,
    }
)  # fmt: skip

#: Why each of meshguard's own checks is stricter than baseline.
OWN_REASONS: Final[Mapping[Check, str]] = {
    Check.PROXY_UID: "the loopback rules let the proxy's uid through: a container running"
    " as it passes as Envoy",
    Check.MISSING_UID: "the rules tell containers apart by uid: an unset uid is the image's"
    " choice, maybe another container's or the proxy's",
    Check.SHARED_UID: "two containers with one uid get each other's loopback access",
    Check.PROXY_GID: "Istio's capture exempts the proxy's gid: a container in it bypasses"
    " the capture",
    Check.MISSING_GID: "an unset gid is the image's choice, maybe the proxy's",
    Check.SUPPLEMENTAL_GROUPS: "a supplementary proxy gid passes Istio's gid-owner match",
    Check.FS_GROUP: "fsGroup makes every container a member of that gid",
    Check.SETUID_CAPABILITY: "SETUID/SETGID (which baseline allows, and runtimes grant by"
    " default) let a process switch to the proxy's uid or gid",
    Check.PRIVILEGE_ESCALATION: "a setuid binary could switch to the proxy's uid (baseline"
    " leaves this to restricted)",
    Check.NET_CAPABILITY: "NET_RAW (a runtime default baseline keeps) crafts packets that"
    " skip the rules; NET_ADMIN rewrites them",
    Check.SYS_ADMIN: "SYS_ADMIN changes namespaces and the rules",
    Check.SYS_PTRACE: "with a shared process namespace, SYS_PTRACE traces the proxy",
    Check.KILL_CAPABILITY: "with a shared process namespace, KILL (a baseline capability)"
    " stops the proxy, whose ports can then be taken",
    Check.SHARED_PID_ROOT: "root in a shared process namespace signals and inspects the"
    " proxy's processes",
    Check.MESH_INIT_PRIVILEGES: "a pod claiming Istio's status must not smuggle a privileged"
    " container in as Istio's init step",
}

#: Checks with no safe automatic fix: refused in fix mode (reported in report mode).
UNFIXABLE: Final = frozenset(
    {
        Check.FS_GROUP, Check.HOST_NETWORK, Check.HOST_PID, Check.HOST_IPC, Check.HOST_PATH,
        Check.RUNTIME_SOCKET, Check.HOST_PORT, Check.HOST_PROCESS, Check.PROC_MOUNT,
        Check.SECCOMP, Check.APPARMOR, Check.SELINUX, Check.SYSCTL, Check.SHARED_PID_ROOT,
        Check.PROBE_HOST,
    }
)  # fmt: skip

#: Refused whatever the action, ``report`` included: meshguard-init would install the rules
#: into the node's own network namespace.
ALWAYS_REFUSED: Final = frozenset({Check.HOST_NETWORK})


def origin(check: Check) -> Origin:
    return Origin.BASELINE if check in BASELINE_CHECKS else Origin.MESHGUARD


@dataclass(frozen=True, kw_only=True)
class PostureSettings:
    """What to do per check, which baseline version is the floor, where assigned uids come
    from."""

    default_action: PostureAction = PostureAction.FIX
    actions: Mapping[Check, PostureAction] = field(default_factory=dict)
    uid_range: tuple[int, int] = (20000, 29999)
    #: The Pod Security Standards version the baseline floor follows (``latest`` default).
    baseline: BaselineVersion = LATEST
    #: The action for pods in audit mode (``meshguard.io/mode``, the namespace's or the
    #: cluster's default): ``report`` by default, so that audit changes no pod.
    audit_action: PostureAction = PostureAction.REPORT

    def action(self, check: Check) -> PostureAction:
        chosen = self.actions.get(check, self.default_action)
        if check in ALWAYS_REFUSED or (check in UNFIXABLE and chosen is PostureAction.FIX):
            return PostureAction.DENY
        return chosen

    def for_audit(self) -> PostureSettings:
        """The settings for a pod in audit mode: every check takes ``audit_action``."""
        return PostureSettings(
            default_action=self.audit_action,
            uid_range=self.uid_range,
            baseline=self.baseline,
            audit_action=self.audit_action,
        )


#: Where a fix writes: ``(field, index)`` of a container in the spec, or None for the pod.
FixTarget = tuple[str, int] | None


@dataclass(frozen=True, kw_only=True)
class Fix:
    """The change a fixed finding makes, as data: the ``securityContext`` its target has once
    this fix (and the fixes before it) are made. Applying the fixes of a review in order
    (:func:`apply_fixes`) gives the pod the review decided on."""

    target: FixTarget
    security_context: Mapping[str, Any]


def final_fixes(findings: Iterable[Finding]) -> tuple[Fix, ...]:
    """The fix each target ends with (its last), in the order of the targets' last fixes:
    what :func:`apply_fixes` writes, one ``securityContext`` per target."""
    last: dict[FixTarget, Fix] = {}
    for finding in findings:
        if finding.fix is not None:
            last.pop(finding.fix.target, None)  # written in the order of its last fix
            last[finding.fix.target] = finding.fix
    return tuple(last.values())


def apply_fixes(spec: dict[str, Any], findings: Iterable[Finding]) -> None:
    """Make the fixes of ``findings`` (the ones fixed) in ``spec``, in order: each target
    ends with the context its last fix leaves, the one written."""
    for fix in final_fixes(findings):
        owner = spec if fix.target is None else spec[fix.target[0]][fix.target[1]]
        owner["securityContext"] = copy.deepcopy(dict(fix.security_context))


@dataclass(frozen=True)
class Finding:
    check: Check
    where: str  # "container 'app'" or "pod"
    field: str  # e.g. "securityContext.privileged"
    problem: str
    remedy: str
    outcome: Outcome
    #: "Pod Security baseline v1.37" or "meshguard's own": whose rule it is.
    source: str = ""
    #: What the fix changes (fixed findings only).
    fix: Fix | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def fixed(self) -> bool:
        return self.outcome is Outcome.FIXED

    def __str__(self) -> str:
        tag = f"[{self.check}] ({self.source})" if self.source else f"[{self.check}]"
        # Admission warnings are cut at 256 characters: whose rule it is comes first there.
        if self.outcome is Outcome.FIXED:
            return (
                f"meshguard fixed {self.where} {tag}: {self.field}: {self.problem}; {self.remedy}"
            )
        if self.outcome is Outcome.REPORTED:
            return (
                f"meshguard found, changed nothing (posture report) {self.where} {tag}:"
                f" {self.field}: {self.problem}; fix: {self.remedy}"
            )
        return f"{self.where}: {self.field}: {self.problem}; fix: {self.remedy} {tag}"


@dataclass(frozen=True, kw_only=True)
class PendingFix:
    """A fix the review may make: ``apply`` edits the review's working copy and says what it
    changed; ``target`` is whose ``securityContext`` it edits."""

    apply: Callable[[], str]
    target: FixTarget


@dataclass
class Review:
    """One posture review: a working copy of the spec (the fixes decided so far made in it,
    so that later checks see them; the spec itself is never edited), its view, the
    findings."""

    spec: dict[str, Any]
    pod: PodView
    settings: PostureSettings
    findings: list[Finding] = field(default_factory=list)

    @classmethod
    def of(cls, spec: Mapping[str, Any], *, pod: PodView, settings: PostureSettings) -> Review:
        return cls(spec=working_copy(spec), pod=pod, settings=settings)

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
        fix: PendingFix | None = None,
    ) -> None:
        """Record a finding; in fix mode make ``fix`` in the working copy and record it."""
        action = self.settings.action(check)
        made: Fix | None = None
        if action is PostureAction.REPORT:
            outcome = Outcome.REPORTED
        elif fix is not None and action is PostureAction.FIX:
            remedy = fix.apply()
            made = Fix(target=fix.target, security_context=copy.deepcopy(self._context(fix.target)))
            outcome = Outcome.FIXED
        else:
            outcome = Outcome.REFUSED
        baseline = self.settings.baseline
        source = (
            f"Pod Security baseline v1.{baseline.minor}"
            if origin(check) is Origin.BASELINE
            else "meshguard's own"
        )
        self.findings.append(
            Finding(
                check=check,
                where=where,
                field=field_,
                problem=problem,
                remedy=remedy,
                outcome=outcome,
                source=source,
                fix=made,
            )
        )

    def _context(self, target: FixTarget) -> dict[str, Any]:
        owner = self.spec if target is None else self.spec[target[0]][target[1]]
        context: dict[str, Any] = owner.get("securityContext") or {}
        return context


def working_copy(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec with its own copies of the pod's and every container's ``securityContext``
    (all a fix edits), sharing everything else with ``spec``."""
    copied = dict(spec)
    if isinstance(spec.get("securityContext"), dict):
        copied["securityContext"] = copy.deepcopy(spec["securityContext"])
    for key in ("initContainers", "containers", "ephemeralContainers"):
        items = spec.get(key)
        if isinstance(items, list):
            copied[key] = [_container_copy(item) for item in items]
    return copied


def _container_copy(item: object) -> object:
    if not isinstance(item, dict):
        return item
    copied = dict(item)
    if isinstance(item.get("securityContext"), dict):
        copied["securityContext"] = copy.deepcopy(item["securityContext"])
    return copied


@dataclass(frozen=True)
class Subject:
    """A container under review: its view, its spec in the review's working copy (edited by
    fixes there), its label."""

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

    def fix(self, fix: Callable[[], str]) -> PendingFix | None:
        """``fix`` as this container's, if it can be fixed at all."""
        if not self.fixable:
            return None
        return PendingFix(apply=fix, target=(self.view.field, self.view.index))
