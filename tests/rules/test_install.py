"""meshguard-init's planning and verification (pure), and the ruleset document it reads."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard.errors import MalformedInputError, MeshguardFailure
from meshguard.pod import read_pod
from meshguard.rules.compiler import CompilerSettings, compile_pod
from meshguard.rules.install import install, plan_payload, verify
from meshguard.rules.iptables import SavedState, jump_target, parse_save
from meshguard.rules.ruleset import Family, Ruleset

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"


def ruleset(policy: str | None = None) -> Ruleset:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    if policy is not None:
        pod["metadata"]["annotations"]["meshguard.io/policy"] = policy
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    return compile_pod(view, settings=CompilerSettings())


def installed_state(rs: Ruleset, family: Family = Family.IPV4) -> str:
    """What iptables-save prints after a fresh install of ``rs`` on top of Istio's OUTPUT jump."""
    blocks = []
    for table in rs.family(family).tables:
        lines = [f"*{table.name}"]
        lines += [f":{b} ACCEPT [0:0]" for b in ("OUTPUT", "POSTROUTING")]
        lines += [f":{c} - [0:0]" for c in table.chains]
        lines += [f"-A {h.chain} {h.spec}" for h in table.hooks]
        if table.name == "nat":
            lines += [":ISTIO_OUTPUT - [0:0]", "-A OUTPUT -j ISTIO_OUTPUT"]
        lines += [f"-A {chain} {spec}" for chain, spec in table.rules]
        blocks.append("\n".join([*lines, "COMMIT"]))
    return "\n".join(blocks) + "\n"


def test_plan_on_an_empty_namespace_is_the_printed_payload():
    rs = ruleset()
    assert plan_payload(rs.ipv4, SavedState()) == rs.ipv4.payload()


def test_plan_on_an_installed_namespace_keeps_hooks_and_refills_chains():
    rs = ruleset()
    plan = plan_payload(rs.ipv4, parse_save(installed_state(rs)))
    assert "-I " not in plan
    assert "-D " not in plan
    assert "-X " not in plan
    assert plan.count(":MESHGUARD_OUTPUT - [0:0]") == 1  # declared: flushed and refilled


def test_plan_moves_a_hook_that_is_no_longer_first():
    rs = ruleset()
    state = installed_state(rs).replace(
        "-A OUTPUT -o lo -j MESHGUARD_OUTPUT",
        "-A OUTPUT -j SOMETHING_ELSE\n-A OUTPUT -o lo -j MESHGUARD_OUTPUT",
    )
    plan = plan_payload(rs.ipv4, parse_save(state)).splitlines()
    delete = plan.index("-D OUTPUT -o lo -j MESHGUARD_OUTPUT")
    insert = plan.index("-I OUTPUT 1 -o lo -j MESHGUARD_OUTPUT")
    assert delete < insert


def test_plan_removes_chains_and_hooks_the_new_ruleset_no_longer_has():
    old = ruleset()  # has the nat table (an http rule)
    new = ruleset("rules: [{from: app, to: cache, ports: [6379]}]")
    plan = plan_payload(new.ipv4, parse_save(installed_state(old)))
    nat = plan[plan.index("*nat") :]
    assert "-D OUTPUT -o lo -j MESHGUARD_REDIRECT" in nat
    assert "-D POSTROUTING -o lo -j MESHGUARD_SNAT" in nat
    assert nat.index(":MESHGUARD_REDIRECT - [0:0]") < nat.index("-X MESHGUARD_REDIRECT")
    assert "-X MESHGUARD_SNAT" in nat


def test_plan_removes_a_source_chain_of_a_container_that_is_gone():
    old = ruleset()
    state = installed_state(old).replace(
        ":MESHGUARD_DENY - [0:0]", ":MESHGUARD_DENY - [0:0]\n:MESHGUARD_SRC_4000 - [0:0]"
    )
    plan = plan_payload(old.ipv4, parse_save(state))
    assert ":MESHGUARD_SRC_4000 - [0:0]" in plan
    assert plan.index("-X MESHGUARD_SRC_4000") > plan.index("-A MESHGUARD_OUTPUT")


def test_verify_accepts_a_faithful_install_and_names_every_discrepancy():
    rs = ruleset()
    assert verify(rs.ipv4, parse_save(installed_state(rs))) == []
    broken = installed_state(rs)
    broken = broken.replace("-A MESHGUARD_SRC_1002 -j MESHGUARD_DENY\n", "")
    broken = broken.replace(":MESHGUARD_SNAT - [0:0]\n", ":MESHGUARD_OLD - [0:0]\n")
    broken = broken.replace("-A OUTPUT -o lo -j MESHGUARD_REDIRECT\n", "")
    problems = verify(rs.ipv4, parse_save(broken))
    assert "filter: chain MESHGUARD_SRC_1002 has 1 rules, expected 2" in problems
    assert "nat: chain MESHGUARD_SNAT missing" in problems
    assert "nat: OUTPUT does not start with '-o lo -j MESHGUARD_REDIRECT'" in problems
    assert "nat: stale meshguard chains MESHGUARD_OLD" in problems


def test_install_fails_closed_when_verification_fails():
    rs = ruleset()
    calls: list[list[str]] = []

    def run(argv, *, stdin=None):
        calls.append(list(argv))
        return "*filter\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"  # as if nothing was installed

    with pytest.raises(MeshguardFailure, match="ipv4 rules not as compiled: filter: chain"):
        install(rs, run=run, families=[Family.IPV4])
    assert calls[1][:2] == ["iptables-restore", "--noflush"]


def test_a_family_installed_next_to_one_that_fails_is_logged_before_the_failure(
    caplog: pytest.LogCaptureFixture,
):
    rs = ruleset()
    restored: list[bool] = []

    def run(argv, *, stdin=None):
        if argv[0].startswith("ip6tables") or argv[0] == "ip":
            raise MeshguardFailure("ip6tables-save: broken")
        if argv[0] == "iptables-restore":
            restored.append(True)
            return ""
        return installed_state(rs) if restored else "*filter\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"

    # Straight from meshguard's logger, whether or not the CLI has stopped its propagation.
    logger = logging.getLogger("meshguard")
    logger.addHandler(caplog.handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        with (
            caplog.at_level(logging.INFO, logger="meshguard"),
            pytest.raises(MeshguardFailure, match="ip6tables-save: broken"),
        ):
            install(rs, run=run, ipv6_available=True)
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate
    installed = [r.fields for r in caplog.records if r.getMessage() == "ruleset installed"]
    assert [(f["family"], f["digest"]) for f in installed] == [("ipv4", rs.digest)]


def test_install_skips_ipv6_only_when_the_namespace_has_no_ipv6():
    rs = ruleset()
    seen: list[str] = []

    def run(argv, *, stdin=None):
        seen.append(argv[0])
        raise MeshguardFailure("should not run")

    results = install(rs, run=run, families=[Family.IPV6], ipv6_available=False)
    assert [r.installed for r in results] == [False]
    assert seen == []


def test_parse_save_reads_real_output_and_rejects_garbage():
    state = parse_save(
        "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [5:300]\n"
        ":MESHGUARD_OUTPUT - [0:0]\n-A OUTPUT -o lo -j MESHGUARD_OUTPUT\nCOMMIT\n"
    )
    table = state.table("filter")
    assert table.builtins == {"INPUT", "OUTPUT"}
    assert table.rules_of("OUTPUT") == ["-o lo -j MESHGUARD_OUTPUT"]
    with pytest.raises(MeshguardFailure, match="not understood"):
        parse_save("*filter\nbogus\nCOMMIT\n")
    assert jump_target("-m owner --uid-owner 1 -g MESHGUARD_SRC_1") == "MESHGUARD_SRC_1"
    assert jump_target('-m comment --comment "a -j b" -j RETURN') == "RETURN"


# --- the ruleset document -----------------------------------------------------------------


def test_ruleset_document_round_trips():
    rs = ruleset()
    again = Ruleset.from_json(rs.to_json())
    assert again.digest == rs.digest
    assert again.ipv4.payload() == rs.ipv4.payload()
    assert again.sources == rs.sources


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["ipv4"]["tables"][0]["rules"].pop(), "digest mismatch"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d["ipv4"]["tables"][0]["chains"].append("ISTIO_OUTPUT"), "not meshguard's"),
        (lambda d: d["ipv4"]["tables"][0]["rules"][0].__setitem__(1, "x\n-F"), "spans lines"),
        (lambda d: d.pop("ipv6"), "unexpected content"),
    ],
)
def test_altered_ruleset_documents_are_refused(mutate, message: str):
    document = json.loads(ruleset().to_json())
    mutate(document)
    with pytest.raises(MalformedInputError, match=message):
        Ruleset.from_json(json.dumps(document))


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"x"', "{}", "x" * (2 * 1024 * 1024)])
def test_unreadable_ruleset_documents_are_refused(text: str):
    with pytest.raises(MalformedInputError, match="ruleset: "):
        Ruleset.from_json(text)
