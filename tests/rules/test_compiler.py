"""The compiler, without root: layout, determinism, refusals, and Istio's real pods."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import meshguard
from meshguard.errors import CompileError, PolicyError
from meshguard.pod import read_pod
from meshguard.policy import Mode, parse_policy
from meshguard.rules.compiler import CompilerSettings, compile_pod, compile_ruleset
from meshguard.rules.ruleset import Family
from tests.support.samples import (
    give_distinct_uids,
    injected_sample_names,
    load_templates,
    pod_of_uids,
    workload_names,
)

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
SETTINGS = CompilerSettings()


def example() -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return pod


def compiled(pod: dict[str, Any]):
    return compile_pod(read_pod(metadata=pod["metadata"], spec=pod["spec"]), settings=SETTINGS)


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in pod["spec"]["containers"] if c["name"] == name)
    return found


def lines(pod: dict[str, Any], family: Family = Family.IPV4) -> list[str]:
    return compiled(pod).family(family).payload().splitlines()


def test_layout_of_the_example_pod():
    payload = lines(example())
    output = [line for line in payload if line.startswith("-A MESHGUARD_OUTPUT")]
    assert output == [
        "-A MESHGUARD_OUTPUT -p tcp -m tcp ! --tcp-flags SYN SYN -m connlabel --label 100"
        " -j RETURN",
        "-A MESHGUARD_OUTPUT -j MESHGUARD_CHECK",
        "-A MESHGUARD_OUTPUT -m conntrack --ctdir ORIGINAL -m connlabel --label 100 --set",
    ]
    check = [line for line in payload if line.startswith("-A MESHGUARD_CHECK")]
    assert check == [
        "-A MESHGUARD_CHECK -p tcp -m tcp --dport 15006 -m conntrack --ctstate DNAT"
        " -j MESHGUARD_HAIRPIN",
        "-A MESHGUARD_CHECK -m owner --uid-owner 1337 --gid-owner 1337 -j RETURN",
        "-A MESHGUARD_CHECK -p tcp -m tcp ! --tcp-flags RST RST -m multiport"
        " --sports 15000:15090 -j MESHGUARD_DENY",
        "-A MESHGUARD_CHECK -p udp -m multiport --sports 15000:15090 -j MESHGUARD_DENY",
        "-A MESHGUARD_CHECK -o lo -g MESHGUARD_LOCAL",
        # every protocol a process sends to a locally delivered address, not TCP and UDP
        "-A MESHGUARD_CHECK -m owner --uid-owner 0-4294967294 -m addrtype"
        " --dst-type LOCAL,BROADCAST,MULTICAST -g MESHGUARD_LOCAL",
    ]
    local = [line for line in payload if line.startswith("-A MESHGUARD_LOCAL")]
    assert local == [
        "-A MESHGUARD_LOCAL -m conntrack --ctstate ESTABLISHED --ctdir REPLY"
        " -m connlabel --label 100 -j RETURN",
        "-A MESHGUARD_LOCAL -m conntrack --ctstate RELATED --ctdir REPLY -j RETURN",
        "-A MESHGUARD_LOCAL -p tcp -m multiport --dports 15001,15007,15053"
        " -m conntrack --ctstate DNAT -j RETURN",
        "-A MESHGUARD_LOCAL -p udp -m udp --dport 15053 -m conntrack --ctstate DNAT -j RETURN",
        "-A MESHGUARD_LOCAL -m owner --uid-owner 1000 -g MESHGUARD_SRC_1000",
        "-A MESHGUARD_LOCAL -m owner --uid-owner 1001 -g MESHGUARD_SRC_1001",
        "-A MESHGUARD_LOCAL -m owner --uid-owner 1002 -g MESHGUARD_SRC_1002",
        "-A MESHGUARD_LOCAL -j MESHGUARD_DENY",
    ]
    # IPv6: multicast (ff00::/8) and local addresses, every protocol alike.
    check6 = [
        line
        for line in lines(example(), Family.IPV6)
        if line.startswith("-A MESHGUARD_CHECK") and "-g MESHGUARD_LOCAL" in line
    ]
    assert check6 == [
        "-A MESHGUARD_CHECK -o lo -g MESHGUARD_LOCAL",
        "-A MESHGUARD_CHECK -d ff00::/8 -m owner --uid-owner 0-4294967294 -g MESHGUARD_LOCAL",
        "-A MESHGUARD_CHECK -m owner --uid-owner 0-4294967294 -m addrtype --dst-type LOCAL"
        " -g MESHGUARD_LOCAL",
    ]
    # No rule opens a port to every container: no hairpin through the proxy passes.
    assert [line for line in payload if line.startswith("-A MESHGUARD_HAIRPIN")] == [
        "-A MESHGUARD_HAIRPIN -j MESHGUARD_DENY"
    ]
    assert "-I OUTPUT 1 -j MESHGUARD_OUTPUT" in payload
    assert "-I OUTPUT 1 -j MESHGUARD_REDIRECT" in payload
    assert "-I POSTROUTING 1 -o lo -j MESHGUARD_SNAT" in payload
    redirect = [line for line in payload if line.startswith("-A MESHGUARD_REDIRECT")]
    assert redirect == [
        "-A MESHGUARD_REDIRECT -m owner --uid-owner 1337 --gid-owner 1337 -j RETURN",
        "-A MESHGUARD_REDIRECT ! -o lo -m addrtype ! --dst-type LOCAL -j RETURN",
        # the policy's rule to 15020, and Istio's patterns (15020, 15021) for everyone
        "-A MESHGUARD_REDIRECT -p tcp -m multiport --dports 15020,15021 -m owner --uid-owner"
        " 1000 -j REDIRECT --to-ports 15007",
        "-A MESHGUARD_REDIRECT -p tcp -m multiport --dports 15020,15021 -m owner --uid-owner"
        " 1001 -j REDIRECT --to-ports 15007",
        "-A MESHGUARD_REDIRECT -p tcp -m multiport --dports 15020,15021 -m owner --uid-owner"
        " 1002 -j REDIRECT --to-ports 15007",
        "-A MESHGUARD_REDIRECT -j ACCEPT",
    ]
    assert (
        "-A MESHGUARD_SNAT -p tcp -m tcp --dport 15007 -m owner --uid-owner 1000"
        " -m conntrack --ctstate DNAT -j SNAT --to-source 127.0.100.1"
    ) in payload


def test_ports_opened_to_every_container_pass_the_hairpin_check():
    pod = example()
    pod["metadata"]["annotations"]["meshguard.io/policy"] = yaml.safe_dump(
        {
            "rules": [
                {"from": "*", "to": "app", "ports": [8080, 9090]},
                {"from": "*", "to": "cache", "ports": [6379], "protocol": "udp"},  # not TCP
                {"from": "*", "to": "app", "ports": [8081], "http": {"paths": ["/x"]}},  # L7
                {"from": "log-shipper", "to": "cache", "ports": [6379]},  # not everyone
            ]
        }
    )
    hairpin = [line for line in lines(pod) if line.startswith("-A MESHGUARD_HAIRPIN")]
    assert hairpin == [
        "-A MESHGUARD_HAIRPIN -m conntrack --ctorigdstport 8080 -j RETURN",
        "-A MESHGUARD_HAIRPIN -m conntrack --ctorigdstport 9090 -j RETURN",
        "-A MESHGUARD_HAIRPIN -j MESHGUARD_DENY",
    ]


@pytest.mark.parametrize(
    ("to", "port"),
    [("proxy", 15001), ("proxy", 15006), ("proxy", 15053), ("proxy", 15008), ("proxy", 15009),
     ("proxy", 15007), ("proxy", 15030), ("app", 15000), ("app", 15090), ("cache", 15053)],
)  # fmt: skip
def test_rules_cannot_open_the_proxys_own_ports(to: str, port: int):
    pod = example()
    pod["metadata"]["annotations"]["meshguard.io/policy"] = yaml.safe_dump(
        {"rules": [{"from": "cache", "to": to, "ports": [port]}]}
    )
    with pytest.raises(PolicyError, match=rf"rules\[0\]\.ports: got {port}, expected"):
        compiled(pod)


@pytest.mark.parametrize("port", [15000, 15030, 15090, 15007])
def test_containers_cannot_declare_the_proxys_ports(port: int):
    pod = example()
    container(pod, "cache")["ports"].append({"containerPort": port})
    with pytest.raises(CompileError, match=f"declares port {port}, which belongs to the Istio"):
        compiled(pod)


def test_only_meshguard_chains_are_declared_or_appended():
    for family in Family:
        for line in lines(example(), family):
            if line.startswith(":"):
                assert line.startswith(":MESHGUARD_")
            if line.startswith("-A "):
                assert line.split()[1].startswith("MESHGUARD_")
            if line.startswith("-I "):
                assert line.split()[1] in {"OUTPUT", "POSTROUTING"}
                assert line.split()[2] == "1"
                assert line.split()[-2:][0] == "-j"
                assert line.split()[-1].startswith("MESHGUARD_")


def test_ipv6_uses_icmp6_and_the_routed_ula_source_addresses():
    ruleset = compiled(example())
    v6 = ruleset.ipv6.payload()
    assert "--reject-with icmp6-port-unreachable" in v6
    assert "icmp-port-unreachable" not in v6.replace("icmp6-port-unreachable", "")
    assert "-j SNAT --to-source fd6d:6775::1" in v6
    assert ruleset.ipv6.local_routes == ("fd6d:6775::/112",)
    assert ruleset.ipv4.local_routes == ()


def test_same_input_same_bytes_and_digest_and_order_of_rules_does_not_matter():
    first, second = compiled(example()), compiled(example())
    assert first.to_json() == second.to_json()
    assert first.digest == second.digest
    assert first.digest.startswith("sha256:")
    shuffled = example()
    policy = yaml.safe_load(shuffled["metadata"]["annotations"]["meshguard.io/policy"])
    shuffled["spec"]["containers"].reverse()
    shuffled["metadata"]["annotations"]["meshguard.io/policy"] = yaml.safe_dump(policy)
    assert compiled(shuffled).digest == first.digest


def test_policy_change_changes_the_digest():
    changed = example()
    changed["metadata"]["annotations"]["meshguard.io/mode"] = "audit"
    assert compiled(changed).digest != compiled(example()).digest


def test_audit_mode_logs_instead_of_rejecting():
    pod = example()
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    policy = parse_policy(pod["metadata"]["annotations"]["meshguard.io/policy"])
    deny = compile_ruleset(view, policy, mode=Mode.AUDIT, settings=SETTINGS).ipv4.tables[0]
    assert deny.rules_of("MESHGUARD_DENY") == [
        '-m limit --limit 10/sec --limit-burst 20 -j NFLOG --nflog-prefix "meshguard:audit"'
        " --nflog-group 4747",
        "-j RETURN",
    ]


def test_enforce_mode_reports_each_denial_before_rejecting_it():
    deny = compiled(example()).ipv6.tables[0]
    assert deny.rules_of("MESHGUARD_DENY") == [
        '-m limit --limit 10/sec --limit-burst 20 -j NFLOG --nflog-prefix "meshguard:deny"'
        " --nflog-group 4747",
        "-p tcp -j REJECT --reject-with tcp-reset",
        "-j REJECT --reject-with icmp6-port-unreachable",
    ]


@pytest.mark.parametrize("mode", [Mode.ENFORCE, Mode.AUDIT])
def test_without_a_denial_log_group_the_rules_are_as_before_nflog(mode: Mode):
    pod = example()
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    policy = parse_policy(pod["metadata"]["annotations"]["meshguard.io/policy"])
    settings = CompilerSettings(denial_log_group=None)
    deny = compile_ruleset(view, policy, mode=mode, settings=settings).ipv4.tables[0]
    assert deny.rules_of("MESHGUARD_DENY") == (
        ['-m limit --limit 10/sec -j LOG --log-prefix "meshguard-audit: " --log-uid', "-j RETURN"]
        if mode is Mode.AUDIT
        else [
            "-p tcp -j REJECT --reject-with tcp-reset",
            "-j REJECT --reject-with icmp-port-unreachable",
        ]
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"denial_log_group": 0},
        {"denial_log_group": 65536},
        {"denial_log_burst": 0},
        {"audit_log_rate": "10/sec -j ACCEPT"},
        {"audit_log_rate": "0/sec"},
    ],
)
def test_denial_log_settings_out_of_range_are_refused(settings: dict[str, Any]):
    with pytest.raises(ValueError, match=next(iter(settings))):
        CompilerSettings(**settings)


def test_default_allow_still_protects_the_proxy_ports():
    pod = example()
    pod["metadata"]["annotations"]["meshguard.io/policy"] = "defaultAction: allow"
    chain = [line for line in lines(pod) if line.startswith("-A MESHGUARD_SRC_1002")]
    assert chain == [
        '-A MESHGUARD_SRC_1002 -p tcp -m tcp --dport 6379 -m comment --comment "own ports of'
        ' cache" -j RETURN',
        "-A MESHGUARD_SRC_1002 -p tcp -m multiport --dports 15000:15090 -j MESHGUARD_DENY",
        "-A MESHGUARD_SRC_1002 -p udp -m multiport --dports 15000:15090 -j MESHGUARD_DENY",
        "-A MESHGUARD_SRC_1002 -j RETURN",
    ]


def test_no_l7_rule_means_no_redirect_to_the_listener_but_the_nat_guard_stays():
    pod = example()
    pod["metadata"]["annotations"]["meshguard.io/policy"] = "{rules: [], istioPatterns: false}"
    ruleset = compiled(pod)
    assert [t.name for t in ruleset.ipv4.tables] == ["filter", "nat"]
    assert "REDIRECT --to-ports" not in ruleset.ipv4.payload()
    assert "SNAT" not in ruleset.ipv4.payload().replace("MESHGUARD_SNAT", "")
    assert "-A MESHGUARD_REDIRECT -j ACCEPT" in ruleset.ipv4.payload()
    assert ruleset.ipv6.local_routes == ()


def test_more_than_fifteen_ports_are_split_across_multiport_rules():
    pod = example()
    ports = list(range(20000, 20020))
    pod["metadata"]["annotations"]["meshguard.io/policy"] = yaml.safe_dump(
        {"rules": [{"from": "cache", "to": "app", "ports": ports}]}
    )
    chain = [
        line for line in lines(pod) if line.startswith("-A MESHGUARD_SRC_1002 -p tcp -m multi")
    ]
    assert len(chain) == 2
    assert "--dports " + ",".join(map(str, ports[:15])) in chain[0]
    assert "--dports " + ",".join(map(str, ports[15:])) in chain[1]


def test_wildcard_source_covers_every_container():
    pod = example()
    pod["metadata"]["annotations"]["meshguard.io/policy"] = (
        "rules: [{from: '*', to: app, ports: [8080]}]"
    )
    payload = lines(pod)
    for uid in (1000, 1001, 1002):
        assert any(
            line.startswith(f"-A MESHGUARD_SRC_{uid}") and "8080" in line for line in payload
        )


def test_proxy_uid_comes_from_the_istio_proxy_container():
    pod = example()
    container(pod, "istio-proxy")["securityContext"].update(runAsUser=1234, runAsGroup=4321)
    payload = lines(pod)
    assert "-A MESHGUARD_CHECK -m owner --uid-owner 1234 --gid-owner 4321 -j RETURN" in payload
    assert not any("1337" in line for line in payload)


# --- refusals -----------------------------------------------------------------------------


def test_tproxy_mode_proxy_is_root_with_the_proxy_gid_and_both_are_matched():
    pod = example()
    container(pod, "istio-proxy")["securityContext"].update(runAsUser=0, runAsGroup=1337)
    payload = lines(pod)
    assert "-A MESHGUARD_CHECK -m owner --uid-owner 0 --gid-owner 1337 -j RETURN" in payload
    assert "-A MESHGUARD_CHECK -m owner --uid-owner 0 -j RETURN" not in payload


def test_proxy_without_a_stated_gid_is_matched_by_uid():
    pod = example()
    del container(pod, "istio-proxy")["securityContext"]["runAsGroup"]
    assert "-A MESHGUARD_CHECK -m owner --uid-owner 1337 -j RETURN" in lines(pod)


def test_containers_sharing_a_uid_are_refused_not_merged():
    pod = example()
    container(pod, "cache")["securityContext"]["runAsUser"] = 1000
    with pytest.raises(CompileError, match="containers 'app' and 'cache' share uid 1000"):
        compiled(pod)


def test_container_without_uid_is_refused():
    pod = example()
    del container(pod, "cache")["securityContext"]["runAsUser"]
    with pytest.raises(CompileError, match="container 'cache' has no runAsUser"):
        compiled(pod)


def test_pod_level_run_as_user_is_inherited():
    pod = example()
    for name in ("app", "cache", "log-shipper"):
        del container(pod, name)["securityContext"]["runAsUser"]
    pod["spec"]["securityContext"] = {"runAsUser": 1000}
    with pytest.raises(CompileError, match="share uid 1000"):
        compiled(pod)


def test_container_running_as_the_proxy_uid_is_refused():
    pod = example()
    container(pod, "cache")["securityContext"]["runAsUser"] = 1337
    with pytest.raises(CompileError, match="'cache' runs as uid 1337, the proxy's uid"):
        compiled(pod)


def test_declaring_a_sidecar_port_is_refused():
    pod = example()
    container(pod, "app")["ports"].append({"containerPort": 15000})
    with pytest.raises(CompileError, match="'app' declares port 15000"):
        compiled(pod)


def test_rule_on_the_listener_port_is_refused():
    pod = example()
    pod["metadata"]["annotations"]["meshguard.io/policy"] = (
        "rules: [{from: app, to: proxy, ports: [15007]}]"
    )
    with pytest.raises(PolicyError, match=r"rules\[0\].ports: got 15007"):
        compiled(pod)


def test_unknown_container_in_policy_is_refused():
    pod = example()
    pod["metadata"]["annotations"]["meshguard.io/policy"] = (
        "rules: [{from: app, to: redis, ports: [1]}]"
    )
    with pytest.raises(PolicyError, match=r"rules\[0\].to: got 'redis'"):
        compiled(pod)


def test_bad_mode_annotation_is_refused():
    pod = example()
    pod["metadata"]["annotations"]["meshguard.io/mode"] = "relaxed"
    with pytest.raises(PolicyError, match=r"meshguard\.io/mode"):
        compiled(pod)


def test_init_container_sharing_a_uid_is_merged_with_a_warning():
    pod = example()
    pod["spec"]["initContainers"].append(
        {"name": "migrate", "image": "x", "securityContext": {"runAsUser": 1000}}
    )
    ruleset = compiled(pod)
    assert any("'migrate' shares uid 1000 with 'app'" in w for w in ruleset.warnings)


def test_undeclared_destination_port_is_a_warning():
    pod = example()
    pod["metadata"]["annotations"]["meshguard.io/policy"] = (
        "rules: [{from: cache, to: app, ports: [7000]}]"
    )
    assert any("'app' does not declare port(s) 7000" in w for w in compiled(pod).warnings)


# --- Istio's real injector outputs --------------------------------------------------------


@pytest.mark.parametrize("name", injected_sample_names() or ["(../shared absent)"])
def test_every_istio_injected_sample_compiles_once_uids_are_distinct(name: str):
    if name.startswith("("):
        pytest.skip("../shared/istio-injector-samples is absent")
    templates = [t for t in load_templates(name) if t.spec]
    compiled_any = False
    for template in templates:
        view = read_pod(metadata=template.metadata, spec=template.spec)
        if view.proxy is None:
            continue  # not injected (host network, custom template without proxy)
        give_distinct_uids(template)
        names = workload_names(template)
        template.metadata.setdefault("annotations", {})["meshguard.io/policy"] = yaml.safe_dump(
            {"rules": [{"from": "*", "to": names[0], "ports": [8080]}]} if names else {}
        )
        view = read_pod(metadata=template.metadata, spec=template.spec)
        ruleset = compile_pod(view, settings=SETTINGS)
        compiled_any = True
        proxy = view.proxy_identity
        expected = f"-A MESHGUARD_CHECK -m owner --uid-owner {proxy.uid} --gid-owner {proxy.gid}"
        assert f"{expected} -j RETURN" in ruleset.ipv4.payload()
        assert {s.container for s in ruleset.sources} == {
            c.name for c in view.workload if c.runs_alongside
        }
    # Only these samples have no istio-proxy: host network, and a custom template without it.
    assert compiled_any or name in {
        "hello-host-network.yaml.injected",
        "custom-template.yaml.injected",
    }


def test_istio_proxy_override_runas_sample_uses_1234():
    if "proxy-override-runas.yaml.injected" not in injected_sample_names():
        pytest.skip("../shared/istio-injector-samples is absent")
    (template,) = load_templates("proxy-override-runas.yaml.injected")
    give_distinct_uids(template)
    view = read_pod(metadata=template.metadata, spec=template.spec)
    assert (view.proxy_identity.uid, view.proxy_identity.gid) == (1234, 4321)
    payload = compile_pod(view, settings=SETTINGS).ipv4.payload()
    assert "--uid-owner 1234 --gid-owner 4321 -j RETURN" in payload


def test_istio_samples_without_run_as_user_are_refused_with_the_reason():
    if "hello.yaml.injected" not in injected_sample_names():
        pytest.skip("../shared/istio-injector-samples is absent")
    (template,) = load_templates("hello.yaml.injected")
    view = read_pod(metadata=template.metadata, spec=template.spec)
    with pytest.raises(CompileError, match="container 'hello' has no runAsUser"):
        compile_pod(view, settings=SETTINGS)


# --- the uid dispatch ---------------------------------------------------------------------

MAX_UID = 4294967294


def walk_dispatch(payload: str, uid: int) -> tuple[str, int]:
    """Follow a non-proxy uid's NEW packet through the dispatch rules of an ipv4 payload:
    the chain it ends in (its source chain, or the deny) and the owner matches it tried."""
    rules: dict[str, list[list[str]]] = {}
    for line in payload.splitlines():
        if line.startswith("-A ") and ("--uid-owner" in line or line.endswith("-j MESHGUARD_DENY")):
            words = line.split()
            if "--gid-owner" not in words:  # the proxy's rule
                rules.setdefault(words[1], []).append(words)
    chain, tried = "MESHGUARD_LOCAL", 0
    while chain in rules and not chain.startswith("MESHGUARD_SRC_"):
        for words in rules[chain]:
            if "--uid-owner" not in words:
                return "MESHGUARD_DENY", tried
            tried += 1
            lo, _, hi = words[words.index("--uid-owner") + 1].partition("-")
            if int(lo) <= uid <= int(hi or lo):
                chain = words[words.index("-g") + 1]
                break
        else:
            raise AssertionError(f"chain {chain} does not end in the default deny")
    return chain, tried


def test_a_few_uids_are_dispatched_one_rule_each():
    payload = compiled(pod_of_uids(example(), [1000, 1001, 1002, 1003])).family(Family.IPV4)
    assert "UIDS" not in payload.payload()


def test_64_containers_are_dispatched_through_uid_ranges_in_few_rules():
    uids = [2000 + i for i in range(64)]
    payload = compiled(pod_of_uids(example(), uids)).family(Family.IPV4).payload()
    assert "-A MESHGUARD_LOCAL -m owner --uid-owner 2000-2015 -g MESHGUARD_UIDS1_2000" in payload
    walks = {uid: walk_dispatch(payload, uid) for uid in uids}
    assert {uid: chain for uid, (chain, _) in walks.items()} == {
        uid: f"MESHGUARD_SRC_{uid}" for uid in uids
    }
    assert max(tried for _, tried in walks.values()) == 12  # 3 levels of 4, not 64


@settings(max_examples=60, deadline=None)
@given(
    uids=st.lists(
        st.integers(min_value=0, max_value=MAX_UID).filter(lambda u: u != 1337),
        min_size=1, max_size=80, unique=True,
    ),
    strangers=st.lists(st.integers(min_value=0, max_value=MAX_UID), max_size=20),
)  # fmt: skip
def test_every_uid_reaches_its_own_chain_and_no_other_uid_escapes_the_deny(
    uids: list[int], strangers: list[int]
):
    ruleset = compiled(pod_of_uids(example(), uids)).family(Family.IPV4)
    payload = ruleset.payload()
    for uid in uids:
        assert walk_dispatch(payload, uid)[0] == f"MESHGUARD_SRC_{uid}"
    for uid in {*strangers, 1337, uids[0] - 1, uids[-1] + 1} - set(uids):
        assert walk_dispatch(payload, uid)[0] == "MESHGUARD_DENY", uid
    assert all(len(chain) <= 28 for table in ruleset.tables for chain in table.chains)


def test_a_fanout_as_large_as_the_pod_gives_one_dispatch_rule_per_uid():
    uids = [2000 + i for i in range(64)]
    view = read_pod(**{k: pod_of_uids(example(), uids)[k] for k in ("metadata", "spec")})
    payload = compile_pod(view, settings=CompilerSettings(dispatch_fanout=64))
    text = payload.family(Family.IPV4).payload()
    assert "UIDS" not in text
    assert walk_dispatch(text, 2063) == ("MESHGUARD_SRC_2063", 64)


def test_a_fanout_below_two_is_refused():
    with pytest.raises(ValueError, match="dispatch_fanout must be at least 2, got 1"):
        CompilerSettings(dispatch_fanout=1)


def _uids(pod: dict[str, Any], uids: dict[str, int | None]) -> dict[str, Any]:
    for item in pod["spec"]["containers"]:
        if item["name"] in uids:
            context = item.setdefault("securityContext", {})
            context.pop("runAsUser", None)
            if uids[item["name"]] is not None:
                context["runAsUser"] = uids[item["name"]]
    return pod


@pytest.mark.parametrize(
    ("uids", "problem"),
    [
        ({"cache": None}, "container 'cache' has no runAsUser"),
        ({"cache": 1000}, "containers 'app' and 'cache' share uid 1000"),
        ({"cache": 1337}, "container 'cache' runs as uid 1337, the proxy's uid"),
    ],
)
def test_audit_mode_logs_what_it_cannot_attribute_where_enforce_refuses(uids, problem):
    """Install day in audit mode: a container without a uid of its own does not refuse the
    pod; the rules log its flows (an unknown uid's) and the warning says why."""
    pod = _uids(example(), uids)
    with pytest.raises(CompileError, match=re.escape(problem)):
        compiled(pod)
    pod["metadata"]["annotations"]["meshguard.io/mode"] = "audit"
    ruleset = compiled(pod)
    assert any(w.startswith(f"audit mode: {problem}") for w in ruleset.warnings)
    payload = ruleset.ipv4.payload()
    assert '-j NFLOG --nflog-prefix "meshguard:audit"' in payload and "REJECT" not in payload
