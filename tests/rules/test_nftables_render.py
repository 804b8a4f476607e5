"""The nftables table as rendered (pure, no kernel): the base chains hold the early returns
that most packets leave by, so they pay no jump; nothing else moves."""

from __future__ import annotations

from meshguard.rules.nft_render import Chain, _hoist_early_returns, build
from meshguard.rules.nft_translate import translate
from meshguard.rules.ruleset import Family
from tests.rules.test_backends import compiled


def chains_of(table_chains: tuple[Chain, ...]) -> dict[str, tuple[str, ...]]:
    return {chain.name: chain.rules for chain in table_chains}


def test_an_accepted_tcp_segment_leaves_at_the_hooks_first_rule() -> None:
    chains = chains_of(build(compiled(native=True)).chains)
    first, *_, last = chains["filter_output"]
    assert first == "meta l4proto tcp tcp flags & syn != syn ct label 100 return"
    assert last == "jump MESHGUARD_OUTPUT"
    assert chains["MESHGUARD_OUTPUT"] == (
        "jump MESHGUARD_CHECK",
        "ct direction original ct label set 100",
    )


def test_only_leading_returns_of_a_chain_jumped_to_once_move() -> None:
    base = next(c for c in build(compiled(native=True)).chains if c.base is not None).base
    hook = Chain("hook", base, ("jump A",))
    a = Chain("A", None, ("x return", "y return", "jump B", "z return", "accept"))
    b = Chain("B", None, ("w return",))
    other = Chain("other", base, ("jump B",))
    hoisted = chains_of(_hoist_early_returns((hook, a, b, other)))
    assert hoisted["hook"] == ("x return", "y return", "jump A")
    assert hoisted["A"] == ("jump B", "z return", "accept")
    # B is the target of two rules (A's and other's): moving its return would change A's path
    assert hoisted["B"] == ("w return",)
    assert hoisted["other"] == ("jump B",)


def test_a_chain_also_reached_by_a_verdict_map_keeps_its_rules() -> None:
    base = next(c for c in build(compiled(native=True)).chains if c.base is not None).base
    hook = Chain("hook", base, ("jump S",))
    vmap = Chain("L", None, ("meta skuid vmap { 1000 : goto S }",))
    s = Chain("S", None, ("x return", "accept"))
    assert _hoist_early_returns((hook, vmap, s)) == (hook, vmap, s)


L4_ONLY_POLICY = """
defaultAction: deny
istioPatterns: false
rules:
  - {from: app, to: cache, ports: [6379]}
"""


def test_a_hook_with_nothing_to_do_is_not_registered() -> None:
    """Without an L7 rule nothing is source-NATed: no postrouting hook, which every packet
    of the pod would otherwise call; with one, the hook holds the jump to the SNAT rules."""
    l4_only = build(compiled(native=True, policy=L4_ONLY_POLICY))
    hooks = {chain.base.hook for chain in l4_only.chains if chain.base is not None}
    assert hooks == {"output"}
    assert chains_of(l4_only.chains)["MESHGUARD_SNAT"] == ()
    with_l7 = chains_of(build(compiled(native=True)).chains)
    assert with_l7["nat_postrouting"] == ('oifname "lo" jump MESHGUARD_SNAT',)
    # one per container and family: Istio's patterns (istioPatterns) reach the proxy over L7
    assert len(with_l7["MESHGUARD_SNAT"]) == 6


def test_the_denial_log_rule_becomes_a_rate_limited_log_statement():
    """NFLOG in iptables, ``log group`` in nftables: both non-terminal, both behind the same
    token bucket (rate and burst)."""
    spec = (
        '-m limit --limit 10/sec --limit-burst 20 -j NFLOG --nflog-prefix "meshguard:deny"'
        " --nflog-group 4747"
    )
    assert translate(spec, family=Family.IPV4, table="filter", counted=True) == (
        'limit rate 10/second burst 20 packets counter log prefix "meshguard:deny" group 4747'
    )
