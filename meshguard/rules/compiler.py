"""The ruleset compiler: (pod, policy) -> iptables rules for both address families.

Pure and deterministic: the same pod and policy give the same bytes. This module decides
who is who (each uid's containers, refused when they cannot be told apart) and what each uid
may reach (its own ports, the policy's rules, bounded); :mod:`meshguard.rules.chains` lays
that out as each family's chains (the layout is described there). Settings the two share
are in :mod:`meshguard.rules.settings`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Final

from meshguard import annotation_keys
from meshguard.errors import CompileError, LimitError, PolicyError, Problem
from meshguard.mesh import PROXY_PORT_RANGE
from meshguard.pod import Container, PodView
from meshguard.policy import (
    ANY_CONTAINER,
    PROXY,
    Mode,
    Policy,
    Protocol,
    check_names,
    control_port_warnings,
    parse_mode,
    parse_policy,
)
from meshguard.rules.chains import (
    ACCEPTED_LABEL,
    ANY_SOCKET_OWNER,
    CHECK_CHAIN,
    DENY_CHAIN,
    HAIRPIN_CHAIN,
    LOCAL_CHAIN,
    MULTIPORT_MAX,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
    SNAT_CHAIN,
    SourcePlan,
    dispatch_chain,
    family_ruleset,
    hairpin_ports,
    source_chain,
)
from meshguard.rules.ruleset import Family, Ruleset, SourceIdentity
from meshguard.rules.settings import CompilerSettings

#: Names that have always been the compiler's (its callers import them from here).
__all__ = [
    "ACCEPTED_LABEL",
    "ANY_SOCKET_OWNER",
    "CHECK_CHAIN",
    "DENY_CHAIN",
    "HAIRPIN_CHAIN",
    "LOCAL_CHAIN",
    "MAX_EXPANSION",
    "MAX_RULESET_BYTES",
    "MULTIPORT_MAX",
    "OUTPUT_CHAIN",
    "REDIRECT_CHAIN",
    "SNAT_CHAIN",
    "CompilerSettings",
    "check_expansion",
    "compile_cached",
    "compile_pod",
    "compile_ruleset",
    "dispatch_chain",
    "expansion",
    "hairpin_ports",
    "source_chain",
]


#: Most (source container, port, protocol) grants one pod's ruleset may hold: the policy's
#: rules expanded over their source containers (``from: '*'`` is every container) and
#: protocols, plus each container's own declared ports. Bounds the compiler's work, which
#: the policy's text alone does not (one rule of 256 ports from '*' in a pod of 200
#: containers is 51,200 grants).
MAX_EXPANSION: Final = 4096
#: Largest compiled ruleset (its JSON, recorded in ``meshguard.io/ruleset``): Kubernetes
#: refuses a pod whose annotations together exceed 256 KiB, the policy among them.
MAX_RULESET_BYTES: Final = 160 * 1024


def compile_ruleset(
    pod: PodView,
    policy: Policy,
    *,
    mode: Mode,
    settings: CompilerSettings,
    native_nftables: bool = False,
) -> Ruleset:
    """Compile the pod's policy into the rules meshguard-init installs.

    ``native_nftables`` records that the pod's Istio runs native nftables (see
    :func:`meshguard.rules.backend.uses_native_nftables`); the rules are the same, the
    backend that renders them differs.
    """
    workload = pod.workload
    check_names(policy, containers=[c.name for c in workload])
    check_expansion(pod, policy)
    warnings: list[str] = []
    _check_declared_ports(workload, settings)
    audit = mode is Mode.AUDIT
    plans = _plan_sources(pod, warnings, audit=audit)
    by_container = {name: plan for plan in plans.values() for name in plan.containers}
    _add_own_ports(workload, by_container)
    _add_policy_rules(pod, policy, by_container, settings, warnings, audit=audit)
    warnings.extend(control_port_warnings(policy))

    identities = _source_identities(pod, settings)
    ordered = [plans[uid] for uid in sorted(plans)]
    families = {
        family: family_ruleset(
            family,
            pod=pod,
            policy=policy,
            mode=mode,
            plans=ordered,
            identities=identities,
            settings=settings,
        )
        for family in Family
    }
    ruleset = Ruleset(
        ipv4=families[Family.IPV4],
        ipv6=families[Family.IPV6],
        sources=tuple(identities),
        listener_port=settings.listener_port,
        native_nftables=native_nftables,
        warnings=tuple(warnings),
    )
    size = len(ruleset.to_json())
    if size > MAX_RULESET_BYTES:
        raise LimitError(
            annotation=annotation_keys.POLICY,
            problems=[
                Problem(
                    path="(compiled ruleset)",
                    value=f"{size} bytes",
                    expected=f"at most {MAX_RULESET_BYTES} bytes (meshguard's limit: the"
                    f" ruleset is recorded in {annotation_keys.RULESET}, and Kubernetes caps"
                    " a pod's annotations at 256 KiB); allow fewer ports or sources",
                )
            ],
        )
    return ruleset


def expansion(pod: PodView, policy: Policy) -> int:
    """How many (source container, port, protocol) grants the policy and the containers'
    own ports make in this pod (see :data:`MAX_EXPANSION`); counted, nothing built."""
    workload = pod.workload
    alongside = sum(1 for c in workload if c.runs_alongside)
    grants = sum(len(c.ports) for c in workload)
    for rule in policy.rules:
        sources = alongside if ANY_CONTAINER in rule.sources else len(rule.sources)
        grants += sources * len(rule.ports) * len(rule.protocols)
    return grants


def check_expansion(pod: PodView, policy: Policy) -> None:
    """:class:`LimitError` when the policy expands beyond :data:`MAX_EXPANSION` in this pod."""
    grants = expansion(pod, policy)
    if grants > MAX_EXPANSION:
        raise LimitError(
            annotation=annotation_keys.POLICY,
            problems=[
                Problem(
                    path="rules",
                    value=f"{grants} grants",
                    expected=f"at most {MAX_EXPANSION} grants (meshguard's limit on source"
                    " container x port x protocol over the rules, plus each container's own"
                    f" ports, in this pod of {len(pod.workload)} containers): name fewer"
                    " sources than '*', or fewer ports",
                )
            ],
        )


# --- who is who ---------------------------------------------------------------------------


def _plan_sources(pod: PodView, warnings: list[str], *, audit: bool) -> dict[int, SourcePlan]:
    """Map each uid to the containers running as it; refuse what cannot be told apart — in
    audit mode, warn instead: such a container gets no chain, so its loopback flows are
    logged as an unknown uid's (what enforcing would deny until its uid is fixed)."""
    proxy = pod.proxy_identity
    problems: list[str] = []
    plans: dict[int, SourcePlan] = {}
    alongside = [c for c in pod.workload if c.runs_alongside]
    one_shot = [c for c in pod.workload if not c.runs_alongside]
    for container in alongside:
        if container.uid is None:
            problems.append(
                f"container {container.name!r} has no runAsUser (in its securityContext or the"
                " pod's): meshguard cannot tell its traffic apart; set a distinct runAsUser"
            )
        elif container.uid == proxy.uid:
            problems.append(
                f"container {container.name!r} runs as uid {container.uid}, the proxy's uid:"
                " it would pass as Envoy; give it another runAsUser"
            )
        elif container.uid in plans:
            other = plans[container.uid].containers[0]
            problems.append(
                f"containers {other!r} and {container.name!r} share uid {container.uid}:"
                " meshguard cannot tell them apart; give each a distinct runAsUser"
            )
        else:
            plans[container.uid] = SourcePlan(uid=container.uid, containers=[container.name])
    if problems and audit:
        warnings.extend(
            f"audit mode: {problem} (its flows are logged, not attributed to it)"
            for problem in problems
        )
    elif problems:
        raise CompileError("; ".join(problems))
    for container in one_shot:
        if container.uid is None or container.uid == proxy.uid:
            warnings.append(
                f"init container {container.name!r} has no distinct runAsUser: its loopback"
                " traffic falls under the default deny for unknown uids"
            )
        elif container.uid in plans:
            plans[container.uid].containers.append(container.name)
            warnings.append(
                f"init container {container.name!r} shares uid {container.uid} with"
                f" {plans[container.uid].containers[0]!r}: it gets the same loopback access"
            )
        else:
            plans[container.uid] = SourcePlan(uid=container.uid, containers=[container.name])
    return plans


def _check_declared_ports(workload: Iterable[Container], settings: CompilerSettings) -> None:
    low, high = PROXY_PORT_RANGE
    clashes = [
        f"container {c.name!r} declares port {p.port}, which belongs to the Istio sidecar"
        f" ({low}-{high}) or meshguard ({settings.listener_port}): only the proxy may serve"
        " from it; move the container to another port"
        for c in workload
        for p in c.ports
        if p.port in settings.proxy_ports
    ]
    if clashes:
        raise CompileError("; ".join(clashes))


def _source_identities(pod: PodView, settings: CompilerSettings) -> list[SourceIdentity]:
    """Give each long-running container its own address on the loopback listener."""
    net4 = ipaddress.ip_network(settings.source_net4)
    net6 = ipaddress.ip_network(settings.source_net6)
    named = sorted(
        (c for c in pod.workload if c.runs_alongside and c.uid is not None),
        key=lambda c: c.name,
    )
    if len(named) >= min(net4.num_addresses, net6.num_addresses) - 1:
        raise CompileError(f"too many containers ({len(named)}) for {net4} and {net6}")
    return [
        SourceIdentity(
            container=c.name,
            uid=c.uid,
            address4=str(net4[index]),
            address6=str(net6[index]),
        )
        for index, c in enumerate(named, start=1)
        if c.uid is not None
    ]


# --- what each uid may reach --------------------------------------------------------------


def _add_own_ports(workload: Iterable[Container], plans: dict[str, SourcePlan]) -> None:
    for container in workload:
        plan = plans.get(container.name)
        if plan is None:
            continue
        for protocol in (Protocol.TCP, Protocol.UDP):
            ports = tuple(sorted({p.port for p in container.ports if p.protocol == protocol}))
            if ports:
                plan.allowed.append((protocol, ports, f"own ports of {container.name}"))


def _add_policy_rules(
    pod: PodView,
    policy: Policy,
    plans: dict[str, SourcePlan],
    settings: CompilerSettings,
    warnings: list[str],
    *,
    audit: bool = False,
) -> None:
    problems: list[Problem] = []
    for index, rule in enumerate(policy.rules):
        misplaced = _misplaced_proxy_ports(rule.to, rule.ports, settings)
        if misplaced:
            problems.extend(
                Problem(path=f"rules[{index}].ports", value=port, expected=expected)
                for port, expected in misplaced
            )
            continue
        _warn_undeclared(pod, index, rule.to, rule.ports, warnings)
        unattributed: list[Problem] = []
        sources = _expand_sources(rule.sources, pod, plans, index, unattributed)
        if audit:  # the container has no uid of its own: _plan_sources warned already
            unattributed = []
        problems.extend(unattributed)
        label = f"rules[{index}]: {','.join(rule.sources)} -> {rule.to}"
        for name in sources:
            plan = plans[name]
            if rule.http is None:
                for protocol in rule.protocols:
                    plan.allowed.append((protocol, rule.ports, label))
            elif rule.to == name:
                warnings.append(f"{label}: a container always reaches its own ports; http ignored")
            else:
                plan.redirected.update(rule.ports)
    if problems:
        raise PolicyError(annotation=annotation_keys.POLICY, problems=problems)


def _misplaced_proxy_ports(
    to: str, ports: Sequence[int], settings: CompilerSettings
) -> list[tuple[int, str]]:
    """Ports a rule cannot open: the proxy's, but for the control ports of ``to: proxy``."""
    low, high = PROXY_PORT_RANGE
    control = ", ".join(map(str, settings.protected_proxy_ports))
    if to == PROXY:
        expected = (
            f"a control port of the proxy ({control}); its other ports are entered only"
            " through Istio's capture"
        )
        return [(p, expected) for p in ports if p not in settings.protected_proxy_ports]
    expected = (
        f"a port outside the proxy's {low}-{high} and meshguard's listener"
        f" {settings.listener_port} (to reach the proxy, write to: proxy)"
    )
    return [(p, expected) for p in ports if p in settings.proxy_ports]


def _expand_sources(
    sources: Sequence[str],
    pod: PodView,
    plans: dict[str, SourcePlan],
    index: int,
    problems: list[Problem],
) -> list[str]:
    if ANY_CONTAINER in sources:
        return sorted(c.name for c in pod.workload if c.runs_alongside and c.name in plans)
    missing = [name for name in sources if name not in plans]
    for name in missing:
        problems.append(
            Problem(
                path=f"rules[{index}].from",
                value=name,
                expected="a container with its own runAsUser (this one has none)",
            )
        )
    return [name for name in sources if name in plans]


def _warn_undeclared(
    pod: PodView, index: int, to: str, ports: Sequence[int], warnings: list[str]
) -> None:
    if to == PROXY:
        return
    target = pod.container(to)
    declared = {p.port for p in target.ports} if target else set()
    undeclared = [p for p in ports if declared and p not in declared]
    if undeclared:
        warnings.append(
            f"rules[{index}]: container {to!r} does not declare port(s)"
            f" {', '.join(map(str, undeclared))}; the rule allows them anyway"
        )


@functools.lru_cache(maxsize=512)
def compile_cached(
    containers: tuple[Container, ...],
    policy_text: str | None,
    mode: Mode,
    settings: CompilerSettings,
    native_nftables: bool = False,
) -> Ruleset:
    """:func:`compile_ruleset` memoized on everything it reads: the replicas of one workload
    (same containers, same policy) are compiled once. The pod's name and other annotations
    do not enter the ruleset, so they are not part of the key."""
    pod = PodView(
        name="", namespace=None, annotations={}, containers=containers, host_network=False
    )
    return compile_ruleset(
        pod,
        parse_policy(policy_text),
        mode=mode,
        settings=settings,
        native_nftables=native_nftables,
    )


def compile_pod(
    pod: PodView, *, settings: CompilerSettings, native_nftables: bool = False
) -> Ruleset:
    """Compile from the pod's own annotations (``meshguard.io/policy``, ``meshguard.io/mode``)."""
    policy = parse_policy(pod.annotations.get(annotation_keys.POLICY))
    mode = parse_mode(pod.annotations.get(annotation_keys.MODE))
    return compile_ruleset(
        pod, policy, mode=mode, settings=settings, native_nftables=native_nftables
    )
