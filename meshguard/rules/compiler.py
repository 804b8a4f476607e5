"""The ruleset compiler: (pod, policy) -> iptables rules for both address families.

Pure and deterministic: the same pod and policy give the same bytes. The layout, per family:

``filter`` — ``OUTPUT`` jumps first, for every packet, to ``MESHGUARD_OUTPUT``, which
  returns TCP segments past the handshake of a connection meshguard accepted (a TCP 4-tuple
  belongs to one socket: another uid cannot reuse it), has every other packet decided by
  ``MESHGUARD_CHECK`` and, when that lets it pass in the flow's original direction, labels
  the flow's conntrack entry as accepted (conntrack label :data:`ACCEPTED_LABEL`). A flow
  from before the rules (a connection a user init container or a native sidecar opened, a
  UDP entry it seeded) carries no label, so neither its established segments nor its
  "replies" are exempt: each packet is checked as a new flow would be. ``MESHGUARD_CHECK``
  1. checks hairpin flows — the proxy dialing the pod's own address, which Istio redirects
     to its inbound listener — in ``MESHGUARD_HAIRPIN``: only ports every container may
     reach pass, since the kernel no longer knows which container started the flow;
  2. returns everything else of the proxy (its uid and gid: Envoy, pilot-agent);
  3. rejects any other uid sending *from* the proxy's ports (15000-15090, the loopback
     listener), on any interface: a process that binds them before Envoy does can receive
     a SYN but never answer it;
  4. sends (goto) every locally delivered flow to ``MESHGUARD_LOCAL``, whatever its protocol
     (TCP, UDP, UDP-Lite, SCTP, DCCP, ICMP, raw): whatever leaves through ``lo``, and what a
     process's socket sends through another interface to a local, broadcast or multicast
     address (the kernel loops those back). The kernel's own control traffic to multicast
     groups (neighbour discovery, MLD, IGMP: no process's socket) is not a flow of the pod;
  5. lets every other packet (the pod's egress) go on to Istio's rules untouched.
``MESHGUARD_LOCAL``
  1. returns replies of accepted flows (conntrack REPLY direction and meshguard's label:
     they travel under the server's uid), and the ICMP errors and resets the kernel (or a
     REJECT) sends back about a flow (RELATED, REPLY direction);
  2. returns flows that Istio or meshguard REDIRECTed to the proxy (outbound capture,
     DNS capture, the loopback listener) — only when conntrack saw the redirect;
  3. sends (goto) each known uid to its own chain ``MESHGUARD_SRC_<uid>``, which returns
     the container's own ports and the ports the policy allows (per protocol: TCP, UDP),
     then applies the default to everything else, every protocol alike;
     past four uids through a tree of uid-range chains ``MESHGUARD_UIDS<depth>_<uid>``, so
     the rules a NEW packet walks grow with the log of the number of containers;
  4. sends any other uid (one no container runs as, or no socket) to ``MESHGUARD_DENY``.
  Original-direction packets of established UDP flows take the same path as new ones: a
  conntrack entry is not a permission (another uid can bind a closed socket's port).
  ``MESHGUARD_DENY`` rejects (enforce) or logs and lets pass (audit).

``nat`` — ``OUTPUT`` jumps first, ahead of Istio's ``ISTIO_OUTPUT``, to
  ``MESHGUARD_REDIRECT``: the proxy's flows and flows to non-local addresses return to
  Istio's capture; a flow to a local address REDIRECTs to the loopback listener when an
  ``http`` rule covers it, and is otherwise ACCEPTed — left un-NATed, so Istio's capture
  never turns a flow between containers into a flow of the proxy (TCP to ``<pod IP>:53``
  would otherwise reach Envoy's outbound listener and be re-dialed as uid 1337).
  ``POSTROUTING -o lo`` jumps to ``MESHGUARD_SNAT``, which rewrites the redirected flow's
  source to the container's own address so that one static Envoy listener can tell source
  containers apart (127.0.100.N, and a ULA prefix routed locally on IPv6).

In the filter table packets are only ever RETURNed or rejected: meshguard subtracts, it
never accepts on behalf of rules that run after it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from meshguard import annotation_keys
from meshguard.errors import CompileError, LimitError, PolicyError, Problem
from meshguard.mesh import (
    CONTROL_PORTS,
    DNS_CAPTURE_PORT,
    INBOUND_CAPTURE_PORT,
    ISTIO_RESERVED_PORTS,
    OUTBOUND_CAPTURE_PORT,
    PROXY_PORT_RANGE,
)
from meshguard.pod import Container, PodView
from meshguard.policy import (
    ANY_CONTAINER,
    PROXY,
    Action,
    Mode,
    Policy,
    Protocol,
    check_names,
    control_port_warnings,
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
CHECK_CHAIN: Final = "MESHGUARD_CHECK"
LOCAL_CHAIN: Final = "MESHGUARD_LOCAL"
HAIRPIN_CHAIN: Final = "MESHGUARD_HAIRPIN"
DENY_CHAIN: Final = "MESHGUARD_DENY"
REDIRECT_CHAIN: Final = "MESHGUARD_REDIRECT"
SNAT_CHAIN: Final = "MESHGUARD_SNAT"
MULTIPORT_MAX: Final = 15
#: The conntrack label (bit) of a flow meshguard's rules accepted in its original direction.
#: A label, not a ``ct mark``: Istio's TPROXY mode overwrites the whole mark of its flows
#: (``CONNMARK --save-mark``), and an entry made before the rules were loaded cannot carry a
#: label at all (the kernel gives entries label space only while a rule uses labels).
ACCEPTED_LABEL: Final = 100
#: Every uid a socket can have: a packet matches only when a process's socket sent it, never
#: for the kernel's own packets (neighbour discovery, MLD, IGMP, resets of closed ports).
ANY_SOCKET_OWNER: Final = "-m owner --uid-owner 0-4294967294"
#: Most (source container, port, protocol) grants one pod's ruleset may hold: the policy's
#: rules expanded over their source containers (``from: '*'`` is every container) and
#: protocols, plus each container's own declared ports. Bounds the compiler's work, which
#: the policy's text alone does not (one rule of 256 ports from '*' in a pod of 200
#: containers is 51,200 grants).
MAX_EXPANSION: Final = 4096
#: Largest compiled ruleset (its JSON, recorded in ``meshguard.io/ruleset``): Kubernetes
#: refuses a pod whose annotations together exceed 256 KiB, the policy among them.
MAX_RULESET_BYTES: Final = 160 * 1024


def source_chain(uid: int) -> str:
    return f"MESHGUARD_SRC_{uid}"


def dispatch_chain(depth: int, first_uid: int) -> str:
    """The chain of one uid range; ranges of one depth never overlap, so the name is unique."""
    return f"MESHGUARD_UIDS{depth}_{first_uid}"


@dataclass(frozen=True, kw_only=True)
class CompilerSettings:
    """What the compiler assumes about the proxy; defaults match a stock Istio sidecar."""

    #: The proxy's ports that a rule may open to a container (``to: proxy``); every other
    #: port of the proxy is never reached directly (Istio's capture is the only way in).
    protected_proxy_ports: tuple[int, ...] = CONTROL_PORTS
    outbound_capture_port: int = OUTBOUND_CAPTURE_PORT
    inbound_capture_port: int = INBOUND_CAPTURE_PORT
    dns_capture_port: int = DNS_CAPTURE_PORT
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

    @property
    def proxy_ports(self) -> frozenset[int]:
        """Every port that belongs to the proxy: Istio's reserved range and the listener."""
        return ISTIO_RESERVED_PORTS | {self.listener_port}

    @property
    def proxy_port_spec(self) -> str:
        """The proxy's ports as a multiport list (the range, and the listener if outside)."""
        low, high = PROXY_PORT_RANGE
        extra = "" if low <= self.listener_port <= high else f",{self.listener_port}"
        return f"{low}:{high}{extra}"


@dataclass
class _SourcePlan:
    """What one uid may reach, accumulated from its containers and the policy."""

    uid: int
    containers: list[str]
    allowed: list[tuple[Protocol, tuple[int, ...], str]] = field(default_factory=list)
    redirected: set[int] = field(default_factory=set)


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


def _plan_sources(pod: PodView, warnings: list[str], *, audit: bool) -> dict[int, _SourcePlan]:
    """Map each uid to the containers running as it; refuse what cannot be told apart — in
    audit mode, warn instead: such a container gets no chain, so its loopback flows are
    logged as an unknown uid's (what enforcing would deny until its uid is fixed)."""
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
            plans[container.uid] = _SourcePlan(uid=container.uid, containers=[container.name])
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
    tables = (
        _filter_table(family, pod=pod, policy=policy, mode=mode, plans=plans, settings=settings),
        _nat_table(family, pod=pod, plans=plans, identities=identities, settings=settings),
    )
    routes: tuple[str, ...] = ()
    if family is Family.IPV6 and any(plan.redirected for plan in plans):
        routes = (settings.source_net6,)
    return FamilyRuleset(family=family, tables=tables, local_routes=routes)


def _filter_table(
    family: Family,
    *,
    pod: PodView,
    policy: Policy,
    mode: Mode,
    plans: Sequence[_SourcePlan],
    settings: CompilerSettings,
) -> Table:
    dispatch_chains, dispatch = _dispatch_rules(
        [p.uid for p in plans], chain=LOCAL_CHAIN, fanout=settings.dispatch_fanout
    )
    rules = [
        *_output_rules(),
        *_entry_rules(family, pod=pod, settings=settings),
        *_hairpin_rules(policy),
        *_local_rules(plans, settings),
        *dispatch,
    ]
    for plan in plans:
        rules.extend(_source_rules(plan, policy=policy, settings=settings))
    rules.extend((DENY_CHAIN, spec) for spec in _deny_rules(family, mode, settings))
    chains = (
        OUTPUT_CHAIN,
        CHECK_CHAIN,
        LOCAL_CHAIN,
        HAIRPIN_CHAIN,
        DENY_CHAIN,
        *dispatch_chains,
        *(source_chain(p.uid) for p in plans),
    )
    return Table(
        name="filter",
        chains=chains,
        hooks=(Hook(chain="OUTPUT", spec=f"-j {OUTPUT_CHAIN}"),),
        rules=tuple(rules),
    )


def _output_rules() -> list[tuple[str, str]]:
    """``MESHGUARD_OUTPUT``: the hook's chain. Accepted TCP connections past the handshake
    leave at once; every other packet is decided by ``MESHGUARD_CHECK``, and a flow it lets
    pass in the original direction is labeled accepted (a rejected packet never comes back
    here, so only what the rules accepted is ever labeled)."""
    label = f"-m connlabel --label {ACCEPTED_LABEL}"
    return [
        (OUTPUT_CHAIN, f"-p tcp -m tcp ! --tcp-flags SYN SYN {label} -j RETURN"),
        (OUTPUT_CHAIN, f"-j {CHECK_CHAIN}"),
        (OUTPUT_CHAIN, f"-m conntrack --ctdir ORIGINAL {label} --set"),
    ]


def _entry_rules(
    family: Family, *, pod: PodView, settings: CompilerSettings
) -> list[tuple[str, str]]:
    """``MESHGUARD_CHECK``: every packet the pod sends but accepted TCP passes here."""
    proxy_ports = settings.proxy_port_spec
    # Every protocol: what the policy does not open is denied, whether TCP, UDP, UDP-Lite,
    # SCTP, DCCP, ICMP or a raw protocol. Only packets a process's socket sent: the kernel's
    # own multicast (neighbour discovery, MLD, IGMP) must go out, and carries nobody's data.
    if family is Family.IPV4:
        looped = [
            f"{ANY_SOCKET_OWNER} -m addrtype --dst-type LOCAL,BROADCAST,MULTICAST -g {LOCAL_CHAIN}"
        ]
    else:
        # ip6tables' addrtype ANDs multicast with the other types: one rule each.
        looped = [
            f"-d ff00::/8 {ANY_SOCKET_OWNER} -g {LOCAL_CHAIN}",
            f"{ANY_SOCKET_OWNER} -m addrtype --dst-type LOCAL -g {LOCAL_CHAIN}",
        ]
    return [
        (
            CHECK_CHAIN,
            f"-p tcp -m tcp --dport {settings.inbound_capture_port}"
            f" -m conntrack --ctstate DNAT -j {HAIRPIN_CHAIN}",
        ),
        (CHECK_CHAIN, f"{pod.proxy_identity.owner_match} -j RETURN"),
        # A reset is what the kernel itself answers for a closed port (from a socket of its
        # own): harmless, and refusing it would turn "connection refused" into a timeout.
        (
            CHECK_CHAIN,
            f"-p tcp -m tcp ! --tcp-flags RST RST -m multiport --sports {proxy_ports}"
            f" -j {DENY_CHAIN}",
        ),
        (CHECK_CHAIN, f"-p udp -m multiport --sports {proxy_ports} -j {DENY_CHAIN}"),
        (CHECK_CHAIN, f"-o lo -g {LOCAL_CHAIN}"),
        *((CHECK_CHAIN, spec) for spec in looped),
    ]


def _hairpin_rules(policy: Policy) -> list[tuple[str, str]]:
    """``MESHGUARD_HAIRPIN``: the proxy dialing the pod itself, on behalf of some container.

    A container that calls its own pod through a Service VIP is captured to Envoy, which
    dials the pod IP as the proxy; Istio sends that to the inbound listener, and Envoy
    delivers it from 127.0.0.6. By then no one knows which container started it, so only
    ports that a plain rule opens to every container (``from: "*"``) pass.
    """
    ports = hairpin_ports(policy)
    return [
        *((HAIRPIN_CHAIN, f"-m conntrack --ctorigdstport {port} -j RETURN") for port in ports),
        (HAIRPIN_CHAIN, f"-j {DENY_CHAIN}"),
    ]


def hairpin_ports(policy: Policy) -> list[int]:
    """The TCP ports a plain rule opens to every container (``from: "*"``): the only ones a
    hairpin through the proxy may reach."""
    return sorted(
        {
            port
            for rule in policy.rules
            if ANY_CONTAINER in rule.sources
            and rule.http is None
            and rule.to != PROXY
            and Protocol.TCP in rule.protocols
            for port in rule.ports
        }
    )


def _local_rules(plans: Sequence[_SourcePlan], settings: CompilerSettings) -> list[tuple[str, str]]:
    """``MESHGUARD_LOCAL``, before the uid dispatch: replies, and redirected flows."""
    captured_tcp = [settings.outbound_capture_port, settings.dns_capture_port]
    if any(plan.redirected for plan in plans):
        captured_tcp.append(settings.listener_port)
    return [
        # A reply passes only for a flow the rules accepted: an entry made before them (or
        # seeded by another process) is no permission for the "reply" direction.
        (
            LOCAL_CHAIN,
            f"-m conntrack --ctstate ESTABLISHED --ctdir REPLY"
            f" -m connlabel --label {ACCEPTED_LABEL} -j RETURN",
        ),
        # Errors and resets about a flow, in its reply direction: the kernel's ICMP errors and
        # the resets of meshguard's own REJECT (whose flow is never accepted, so never
        # labeled). Only the kernel and CAP_NET_RAW (no container has it) send them.
        (LOCAL_CHAIN, "-m conntrack --ctstate RELATED --ctdir REPLY -j RETURN"),
        *(
            (LOCAL_CHAIN, f"{spec} -m conntrack --ctstate DNAT -j RETURN")
            for spec in _port_matches(Protocol.TCP, captured_tcp)
        ),
        *(
            (LOCAL_CHAIN, f"{spec} -m conntrack --ctstate DNAT -j RETURN")
            for spec in _port_matches(Protocol.UDP, (settings.dns_capture_port,))
        ),
    ]


def _source_rules(
    plan: _SourcePlan, *, policy: Policy, settings: CompilerSettings
) -> list[tuple[str, str]]:
    """``MESHGUARD_SRC_<uid>``: what one uid may reach, then the default."""
    chain = source_chain(plan.uid)
    rules = [
        (chain, f'{spec} -m comment --comment "{comment}" -j RETURN')
        for protocol, ports, comment in plan.allowed
        for spec in _port_matches(protocol, ports)
    ]
    if policy.default_action is Action.ALLOW:
        # The proxy's ports stay the proxy's: only the control ports a rule names (returned
        # above) are reachable, and never Envoy's capture ports directly.
        rules.extend(
            (chain, f"-p {protocol.value} -m multiport --dports {settings.proxy_port_spec}"
             f" -j {DENY_CHAIN}")
            for protocol in (Protocol.TCP, Protocol.UDP)
        )  # fmt: skip
        rules.append((chain, "-j RETURN"))
    else:
        rules.append((chain, f"-j {DENY_CHAIN}"))
    return rules


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
        (REDIRECT_CHAIN, "! -o lo -m addrtype ! --dst-type LOCAL -j RETURN"),
    ]
    snat: list[tuple[str, str]] = []
    for plan in plans:
        if not plan.redirected or plan.uid not in address_of:
            continue
        owner = f"-m owner --uid-owner {plan.uid}"
        rules.extend(
            (REDIRECT_CHAIN, f"{spec} {owner} -j REDIRECT --to-ports {listener}")
            for spec in _port_matches(Protocol.TCP, sorted(plan.redirected))
        )
        snat.append(
            (
                SNAT_CHAIN,
                f"-p tcp -m tcp --dport {listener} {owner} -m conntrack --ctstate DNAT"
                f" -j SNAT --to-source {address_of[plan.uid]}",
            )
        )
    # The end of nat for a flow between the pod's own processes: Istio's capture after this
    # hook would hand it to the proxy, which re-dials it as uid 1337 (a relay around the
    # policy). Un-NATed, the filter table decides it by its real port.
    rules.append((REDIRECT_CHAIN, "-j ACCEPT"))
    return Table(
        name="nat",
        chains=(REDIRECT_CHAIN, SNAT_CHAIN),
        hooks=(
            Hook(chain="OUTPUT", spec=f"-j {REDIRECT_CHAIN}"),
            Hook(chain="POSTROUTING", spec=f"-o lo -j {SNAT_CHAIN}"),
        ),
        rules=(*rules, *snat),
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
