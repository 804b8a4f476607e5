"""The ruleset compiler: (pod, policy) -> iptables rules for both address families.

Pure and deterministic: the same pod and policy give the same bytes. The layout, per family:

``filter`` — ``OUTPUT -o lo`` jumps first to ``MESHGUARD_OUTPUT``, which
  1. returns packets of established flows (replies travel under the server's uid);
  2. returns everything of the proxy (its uid and gid: Envoy, pilot-agent are never
     restricted);
  3. returns flows that Istio or meshguard REDIRECTed to the proxy (outbound capture,
     DNS capture, the loopback listener) — only when conntrack saw the redirect;
  4. sends (goto) each known uid to its own chain ``MESHGUARD_SRC_<uid>``, which returns
     the container's own ports and the ports the policy allows, then applies the default;
     past four uids through a tree of uid-range chains ``MESHGUARD_UIDS<depth>_<uid>``, so
     the rules a NEW packet walks grow with the log of the number of containers;
  5. sends any other uid (one no container runs as, or no socket) to ``MESHGUARD_DENY``.
  ``MESHGUARD_DENY`` rejects (enforce) or logs and lets pass (audit).

``nat`` (only when a rule has ``http``) — ``OUTPUT -o lo`` jumps first, ahead of Istio's
  ``ISTIO_OUTPUT``, to ``MESHGUARD_REDIRECT``, which REDIRECTs a source's L7-covered ports to
  the loopback listener; ``POSTROUTING -o lo`` jumps to ``MESHGUARD_SNAT``, which rewrites the
  redirected flow's source to the container's own address so that one static Envoy listener
  can tell source containers apart (127.0.100.N, and a ULA prefix routed locally on IPv6).

Packets are only ever RETURNed or rejected: meshguard subtracts, it never accepts on behalf
of rules that run after it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from meshguard import names
from meshguard.errors import CompileError, PolicyError, Problem
from meshguard.pod import Container, PodView
from meshguard.policy import (
    ANY_CONTAINER,
    PROXY,
    Action,
    Mode,
    Policy,
    Protocol,
    check_names,
    parse_mode,
    parse_policy,
)
from meshguard.rules.ruleset import (
    Family,
    FamilyRuleset,
    Hook,
    Ruleset,
    SourceIdentity,
    Table,
)

OUTPUT_CHAIN: Final = "MESHGUARD_OUTPUT"
DENY_CHAIN: Final = "MESHGUARD_DENY"
REDIRECT_CHAIN: Final = "MESHGUARD_REDIRECT"
SNAT_CHAIN: Final = "MESHGUARD_SNAT"
MULTIPORT_MAX: Final = 15
#: Ports of the sidecar that no workload container may declare.
ISTIO_RESERVED_PORTS: Final = frozenset(
    {15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090}
)


def source_chain(uid: int) -> str:
    return f"MESHGUARD_SRC_{uid}"


def dispatch_chain(depth: int, first_uid: int) -> str:
    """The chain of one uid range; ranges of one depth never overlap, so the name is unique."""
    return f"MESHGUARD_UIDS{depth}_{first_uid}"


@dataclass(frozen=True, kw_only=True)
class CompilerSettings:
    """What the compiler assumes about the proxy; defaults match a stock Istio sidecar."""

    protected_proxy_ports: tuple[int, ...] = (15000, 15004, 15020, 15021, 15090)
    outbound_capture_port: int = 15001
    dns_capture_port: int = 15053
    listener_port: int = 15007
    source_net4: str = "127.0.100.0/24"
    source_net6: str = "fd6d:6775::/112"
    audit_log_rate: str = "10/sec"
    #: Most rules a NEW packet walks per level of the uid dispatch (see ``_dispatch_rules``);
    #: a fanout of at least the number of uids gives the flat layout, one rule per uid.
    dispatch_fanout: int = 4

    def __post_init__(self) -> None:
        if self.dispatch_fanout < 2:
            raise ValueError(f"dispatch_fanout must be at least 2, got {self.dispatch_fanout}")


@dataclass
class _SourcePlan:
    """What one uid may reach, accumulated from its containers and the policy."""

    uid: int
    containers: list[str]
    allowed: list[tuple[Protocol, tuple[int, ...], str]] = field(default_factory=list)
    redirected: set[int] = field(default_factory=set)


def compile_ruleset(
    pod: PodView, policy: Policy, *, mode: Mode, settings: CompilerSettings
) -> Ruleset:
    """Compile the pod's policy into the rules meshguard-init installs."""
    workload = pod.workload
    check_names(policy, containers=[c.name for c in workload])
    warnings: list[str] = []
    _check_declared_ports(workload, settings)
    plans = _plan_sources(pod, warnings)
    by_container = {name: plan for plan in plans.values() for name in plan.containers}
    _add_own_ports(workload, by_container)
    _add_policy_rules(pod, policy, by_container, settings, warnings)

    identities = _source_identities(pod, settings)
    ordered = [plans[uid] for uid in sorted(plans)]
    families = {
        family: _family_ruleset(
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
    return Ruleset(
        ipv4=families[Family.IPV4],
        ipv6=families[Family.IPV6],
        sources=tuple(identities),
        listener_port=settings.listener_port,
        warnings=tuple(warnings),
    )


# --- who is who ---------------------------------------------------------------------------


def _plan_sources(pod: PodView, warnings: list[str]) -> dict[int, _SourcePlan]:
    """Map each uid to the containers running as it; refuse what cannot be told apart."""
    proxy = pod.proxy_identity
    problems: list[str] = []
    plans: dict[int, _SourcePlan] = {}
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
            plans[container.uid] = _SourcePlan(uid=container.uid, containers=[container.name])
    if problems:
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
            plans[container.uid] = _SourcePlan(uid=container.uid, containers=[container.name])
    return plans


def _check_declared_ports(workload: Iterable[Container], settings: CompilerSettings) -> None:
    reserved = ISTIO_RESERVED_PORTS | {settings.listener_port}
    clashes = [
        f"container {c.name!r} declares port {p.port}, which the Istio sidecar or meshguard uses"
        for c in workload
        for p in c.ports
        if p.port in reserved
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


def _add_own_ports(workload: Iterable[Container], plans: dict[str, _SourcePlan]) -> None:
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
    plans: dict[str, _SourcePlan],
    settings: CompilerSettings,
    warnings: list[str],
) -> None:
    problems: list[Problem] = []
    for index, rule in enumerate(policy.rules):
        if settings.listener_port in rule.ports:
            problems.append(
                Problem(
                    path=f"rules[{index}].ports",
                    value=settings.listener_port,
                    expected="a port other than meshguard's loopback listener port",
                )
            )
            continue
        _warn_undeclared(pod, index, rule.to, rule.ports, warnings)
        sources = _expand_sources(rule.sources, pod, plans, index, problems)
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
        raise PolicyError(annotation=names.POLICY, problems=problems)


def _expand_sources(
    sources: Sequence[str],
    pod: PodView,
    plans: dict[str, _SourcePlan],
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


# --- rendering per family -----------------------------------------------------------------


def _family_ruleset(
    family: Family,
    *,
    pod: PodView,
    policy: Policy,
    mode: Mode,
    plans: Sequence[_SourcePlan],
    identities: Sequence[SourceIdentity],
    settings: CompilerSettings,
) -> FamilyRuleset:
    tables = [
        _filter_table(family, pod=pod, policy=policy, mode=mode, plans=plans, settings=settings)
    ]
    routes: tuple[str, ...] = ()
    if any(plan.redirected for plan in plans):
        tables.append(
            _nat_table(family, pod=pod, plans=plans, identities=identities, settings=settings)
        )
        if family is Family.IPV6:
            routes = (settings.source_net6,)
    return FamilyRuleset(family=family, tables=tuple(tables), local_routes=routes)


def _filter_table(
    family: Family,
    *,
    pod: PodView,
    policy: Policy,
    mode: Mode,
    plans: Sequence[_SourcePlan],
    settings: CompilerSettings,
) -> Table:
    captured_tcp = [settings.outbound_capture_port, settings.dns_capture_port]
    if any(plan.redirected for plan in plans):
        captured_tcp.append(settings.listener_port)
    rules: list[tuple[str, str]] = [
        (OUTPUT_CHAIN, "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"),
        (OUTPUT_CHAIN, f"{pod.proxy_identity.owner_match} -j RETURN"),
        *(
            (OUTPUT_CHAIN, f"{spec} -m conntrack --ctstate DNAT -j RETURN")
            for spec in _port_matches(Protocol.TCP, captured_tcp)
        ),
        *(
            (OUTPUT_CHAIN, f"{spec} -m conntrack --ctstate DNAT -j RETURN")
            for spec in _port_matches(Protocol.UDP, (settings.dns_capture_port,))
        ),
    ]
    dispatch_chains, dispatch = _dispatch_rules(
        [p.uid for p in plans], chain=OUTPUT_CHAIN, fanout=settings.dispatch_fanout
    )
    rules.extend(dispatch)
    protected = (*settings.protected_proxy_ports, settings.listener_port)
    for plan in plans:
        chain = source_chain(plan.uid)
        for protocol, ports, comment in plan.allowed:
            rules.extend(
                (chain, f'{spec} -m comment --comment "{comment}" -j RETURN')
                for spec in _port_matches(protocol, ports)
            )
        if policy.default_action is Action.ALLOW:
            rules.extend(
                (chain, f"{spec} -j {DENY_CHAIN}")
                for spec in _port_matches(Protocol.TCP, protected)
            )
            rules.append((chain, "-j RETURN"))
        else:
            rules.append((chain, f"-j {DENY_CHAIN}"))
    rules.extend((DENY_CHAIN, spec) for spec in _deny_rules(family, mode, settings))
    chains = (OUTPUT_CHAIN, DENY_CHAIN, *dispatch_chains, *(source_chain(p.uid) for p in plans))
    return Table(
        name="filter",
        chains=chains,
        hooks=(Hook(chain="OUTPUT", spec=f"-o lo -j {OUTPUT_CHAIN}"),),
        rules=tuple(rules),
    )


def _dispatch_rules(
    uids: Sequence[int], *, chain: str, fanout: int, depth: int = 1
) -> tuple[list[str], list[tuple[str, str]]]:
    """Send each uid's NEW packets to its source chain, and any other uid to the default.

    Up to ``fanout`` uids get one rule each. More are split into that many contiguous uid
    ranges, each its own chain (``--uid-owner LO-HI``), recursively: a NEW packet walks at
    most ``fanout * ceil(log_fanout(n))`` rules instead of ``n`` (12 instead of 64 at 64
    containers with the default fanout of 4). Every chain ends in the default deny, since a
    range also holds uids that no container runs as. Returns the range chains and the rules.
    """
    chains: list[str] = []
    rules: list[tuple[str, str]] = []
    nested: list[tuple[str, str]] = []  # after this chain's rules, for a readable payload
    for group in _split(uids, fanout):
        lo, hi = group[0], group[-1]
        # -g, not -j: a RETURN in the source chain must leave OUTPUT's meshguard hook, not
        # fall through to the default at the end of this chain.
        if lo == hi:
            rules.append((chain, f"-m owner --uid-owner {lo} -g {source_chain(lo)}"))
            continue
        sub = dispatch_chain(depth, lo)
        rules.append((chain, f"-m owner --uid-owner {lo}-{hi} -g {sub}"))
        sub_chains, sub_rules = _dispatch_rules(group, chain=sub, fanout=fanout, depth=depth + 1)
        chains += [sub, *sub_chains]
        nested += sub_rules
    rules.append((chain, f"-j {DENY_CHAIN}"))
    return chains, rules + nested


def _split(items: Sequence[int], parts: int) -> list[Sequence[int]]:
    """``items`` in at most ``parts`` contiguous groups of near-equal size."""
    if len(items) <= parts:
        return [items[i : i + 1] for i in range(len(items))]
    size, extra = divmod(len(items), parts)
    groups: list[Sequence[int]] = []
    start = 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        groups.append(items[start:end])
        start = end
    return groups


def _deny_rules(family: Family, mode: Mode, settings: CompilerSettings) -> list[str]:
    if mode is Mode.AUDIT:
        return [
            f"-m limit --limit {settings.audit_log_rate} -j LOG"
            ' --log-prefix "meshguard-audit: " --log-uid',
            "-j RETURN",
        ]
    unreachable = "icmp-port-unreachable" if family is Family.IPV4 else "icmp6-port-unreachable"
    return [
        "-p tcp -j REJECT --reject-with tcp-reset",
        f"-j REJECT --reject-with {unreachable}",
    ]


def _nat_table(
    family: Family,
    *,
    pod: PodView,
    plans: Sequence[_SourcePlan],
    identities: Sequence[SourceIdentity],
    settings: CompilerSettings,
) -> Table:
    address_of = {s.uid: (s.address4 if family is Family.IPV4 else s.address6) for s in identities}
    listener = settings.listener_port
    rules: list[tuple[str, str]] = [
        (REDIRECT_CHAIN, f"{pod.proxy_identity.owner_match} -j RETURN"),
    ]
    for plan in plans:
        if not plan.redirected or plan.uid not in address_of:
            continue
        owner = f"-m owner --uid-owner {plan.uid}"
        rules.extend(
            (REDIRECT_CHAIN, f"{spec} {owner} -j REDIRECT --to-ports {listener}")
            for spec in _port_matches(Protocol.TCP, sorted(plan.redirected))
        )
        rules.append(
            (
                SNAT_CHAIN,
                f"-p tcp -m tcp --dport {listener} {owner} -m conntrack --ctstate DNAT"
                f" -j SNAT --to-source {address_of[plan.uid]}",
            )
        )
    return Table(
        name="nat",
        chains=(REDIRECT_CHAIN, SNAT_CHAIN),
        hooks=(
            Hook(chain="OUTPUT", spec=f"-o lo -j {REDIRECT_CHAIN}"),
            Hook(chain="POSTROUTING", spec=f"-o lo -j {SNAT_CHAIN}"),
        ),
        rules=tuple(rules),
    )


def _port_matches(protocol: Protocol, ports: Iterable[int]) -> list[str]:
    """Port matches in iptables-save's own spelling, at most 15 ports per multiport rule."""
    unique = sorted(set(ports))
    name = protocol.value
    if len(unique) == 1:
        return [f"-p {name} -m {name} --dport {unique[0]}"]
    return [
        f"-p {name} -m multiport --dports {','.join(map(str, unique[i : i + MULTIPORT_MAX]))}"
        for i in range(0, len(unique), MULTIPORT_MAX)
    ]


@functools.lru_cache(maxsize=512)
def compile_cached(
    containers: tuple[Container, ...],
    policy_text: str | None,
    mode: Mode,
    settings: CompilerSettings,
) -> Ruleset:
    """:func:`compile_ruleset` memoized on everything it reads: the replicas of one workload
    (same containers, same policy) are compiled once. The pod's name and other annotations
    do not enter the ruleset, so they are not part of the key."""
    pod = PodView(
        name="", namespace=None, annotations={}, containers=containers, host_network=False
    )
    return compile_ruleset(pod, parse_policy(policy_text), mode=mode, settings=settings)


def compile_pod(pod: PodView, *, settings: CompilerSettings) -> Ruleset:
    """Compile from the pod's own annotations (``meshguard.io/policy``, ``meshguard.io/mode``)."""
    policy = parse_policy(pod.annotations.get(names.POLICY))
    mode = parse_mode(pod.annotations.get(names.MODE))
    return compile_ruleset(pod, policy, mode=mode, settings=settings)
