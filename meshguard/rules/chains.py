"""The chain layout: what each uid may reach -> the filter and nat tables of one family.

The second half of the compiler (:mod:`meshguard.rules.compiler` plans who is who and what
each uid may reach; this lays the plans out as chains). The layout, per family:

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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from meshguard.pod import PodView
from meshguard.policy import ANY_CONTAINER, PROXY, Action, Mode, Policy, Protocol
from meshguard.rules.ruleset import Family, FamilyRuleset, Hook, SourceIdentity, Table
from meshguard.rules.settings import AUDIT_PREFIX, DENY_PREFIX, CompilerSettings

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


def source_chain(uid: int) -> str:
    return f"MESHGUARD_SRC_{uid}"


def dispatch_chain(depth: int, first_uid: int) -> str:
    """The chain of one uid range; ranges of one depth never overlap, so the name is unique."""
    return f"MESHGUARD_UIDS{depth}_{first_uid}"


@dataclass
class SourcePlan:
    """What one uid may reach, accumulated from its containers and the policy."""

    uid: int
    containers: list[str]
    allowed: list[tuple[Protocol, tuple[int, ...], str]] = field(default_factory=list)
    redirected: set[int] = field(default_factory=set)


def family_ruleset(
    family: Family,
    *,
    pod: PodView,
    policy: Policy,
    mode: Mode,
    plans: Sequence[SourcePlan],
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
    plans: Sequence[SourcePlan],
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


def _local_rules(plans: Sequence[SourcePlan], settings: CompilerSettings) -> list[tuple[str, str]]:
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
    plan: SourcePlan, *, policy: Policy, settings: CompilerSettings
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
    """``MESHGUARD_DENY``: report the packet (rate-limited, to the node agent's NFLOG group),
    then reject it (enforce) or let it pass (audit). NFLOG is no verdict: the packet goes on
    to the next rule whether it was logged or the limit skipped it."""
    group = settings.denial_log_group
    if mode is Mode.AUDIT:
        if group is None:
            # The rule before NFLOG, as it was (iptables' default burst).
            report = (
                f"-m limit --limit {settings.audit_log_rate} -j LOG"
                ' --log-prefix "meshguard-audit: " --log-uid'
            )
        else:
            report = _nflog(settings, prefix=AUDIT_PREFIX, group=group)
        return [report, "-j RETURN"]
    unreachable = "icmp-port-unreachable" if family is Family.IPV4 else "icmp6-port-unreachable"
    reports = [] if group is None else [_nflog(settings, prefix=DENY_PREFIX, group=group)]
    return [
        *reports,
        "-p tcp -j REJECT --reject-with tcp-reset",
        f"-j REJECT --reject-with {unreachable}",
    ]


def _nflog(settings: CompilerSettings, *, prefix: str, group: int) -> str:
    """The denial log rule, in iptables-save's own spelling."""
    return f'{settings.denial_limit} -j NFLOG --nflog-prefix "{prefix}" --nflog-group {group}'


def _nat_table(
    family: Family,
    *,
    pod: PodView,
    plans: Sequence[SourcePlan],
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
