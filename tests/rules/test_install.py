"""meshguard-init's planning, verification and rollback (pure), its locks, and the ruleset
document it reads."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard import cli
from meshguard.errors import MalformedInputError, MeshguardFailure
from meshguard.pod import read_pod
from meshguard.rules.compiler import CompilerSettings, compile_pod
from meshguard.rules.install import install, plan_payload, verify
from meshguard.rules.iptables import (
    XTABLES_LOCKFILE_ENV,
    Deadline,
    SavedState,
    abstract_socket_lock,
    jump_target,
    parse_save,
    xtables_lock,
)
from meshguard.rules.ruleset import Family, FamilyRuleset, Hook, Ruleset, Table, check_spec

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
        builtins = dict.fromkeys(["OUTPUT", "POSTROUTING", *(h.chain for h in table.hooks)])
        lines = [f"*{table.name}"]
        lines += [f":{b} ACCEPT [0:0]" for b in builtins]
        lines += [f":{c} - [0:0]" for c in table.chains]
        lines += [f"-A {h.chain} {h.spec}" for h in table.hooks]
        if table.name == "nat":
            lines += [":ISTIO_OUTPUT - [0:0]", "-A OUTPUT -j ISTIO_OUTPUT"]
        lines += [f"-A {chain} {spec}" for chain, spec in table.rules]
        blocks.append("\n".join([*lines, "COMMIT"]))
    return "\n".join(blocks) + "\n"


def first_hook(rs: Ruleset, table: str, chain: str = "OUTPUT") -> Hook:
    return next(h for t in rs.ipv4.tables if t.name == table for h in t.hooks if h.chain == chain)


def with_table(rs: Ruleset, table: Table) -> Ruleset:
    """``rs`` with its IPv4 table of that name replaced."""
    tables = tuple(table if t.name == table.name else t for t in rs.ipv4.tables)
    return replace(rs, ipv4=replace(rs.ipv4, tables=tables))


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
    hook = first_hook(rs, "filter").spec
    state = installed_state(rs).replace(
        f"-A OUTPUT {hook}\n", f"-A OUTPUT -j SOMETHING_ELSE\n-A OUTPUT {hook}\n"
    )
    plan = plan_payload(rs.ipv4, parse_save(state)).splitlines()
    delete = plan.index(f"-D OUTPUT {hook}")
    insert = plan.index(f"-I OUTPUT 1 {hook}")
    assert delete < insert


def test_plan_removes_chains_and_hooks_the_new_ruleset_no_longer_has():
    old = ruleset()
    nat = next(t for t in old.ipv4.tables if t.name == "nat")
    new = replace(old, ipv4=replace(old.ipv4, tables=tuple(t for t in old.ipv4.tables if t != nat)))
    plan = plan_payload(new.ipv4, parse_save(installed_state(old)))
    planned = plan[plan.index("*nat") :]
    for hook in nat.hooks:
        assert f"-D {hook.chain} {hook.spec}" in planned
    for chain in nat.chains:
        assert planned.index(f":{chain} - [0:0]") < planned.index(f"-X {chain}")
    assert "ISTIO" not in planned


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
    redirect = first_hook(rs, "nat").spec
    broken = broken.replace(f"-A OUTPUT {redirect}\n", "")
    problems = verify(rs.ipv4, parse_save(broken))
    assert "filter: chain MESHGUARD_SRC_1002 has 1 rules, expected 2" in problems
    assert "nat: chain MESHGUARD_SNAT missing" in problems
    assert f"nat: OUTPUT does not start with '{redirect}'" in problems
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


#: Before meshguard: Istio's nat jump (installed_state keeps it), an empty filter OUTPUT.
BASE = (
    "*filter\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
)


class FakeTables:
    """iptables-save/restore of both families as text: a restore leaves either ``rs``
    installed or nothing (enough for install and rollback); each tool in ``failing`` fails
    the first time it runs."""

    def __init__(self, rs: Ruleset, *, failing: set[str]) -> None:
        self.rs = rs
        self.failing = failing
        self.state = dict.fromkeys(Family, BASE)
        self.restores: list[str] = []

    def __call__(self, argv, *, stdin=None):
        tool = argv[0]
        family = Family.IPV6 if tool.startswith("ip6") else Family.IPV4
        if tool == "ip":
            return ""
        if tool in self.failing:
            self.failing.discard(tool)
            raise MeshguardFailure(f"{tool}: broken")
        if tool.endswith("-save"):
            return self.state[family]
        self.restores.append(tool)
        installs_ruleset = f":{self.rs.family(family).tables[0].chains[0]} - [0:0]" in stdin
        rolls_back = "-D " in stdin or "-X " in stdin
        if installs_ruleset and not rolls_back:
            self.state[family] = installed_state(self.rs, family)
        else:
            self.state[family] = BASE
        return ""


def test_a_family_that_fails_rolls_back_the_one_installed_next_to_it(
    caplog: pytest.LogCaptureFixture,
):
    rs = ruleset()
    tables = FakeTables(rs, failing={"ip6tables-restore"})
    # Straight from meshguard's logger, whether or not the CLI has stopped its propagation.
    logger = logging.getLogger("meshguard")
    logger.addHandler(caplog.handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        with (
            caplog.at_level(logging.INFO, logger="meshguard"),
            pytest.raises(MeshguardFailure, match=r"^ip6tables-restore: broken$"),
        ):
            install(rs, run=tables, ipv6_available=True)
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate
    events = [(r.fields["event"], r.fields["family"]) for r in caplog.records]
    assert ("installed", "ipv4") not in events
    assert ("rolled-back", "ipv4") in events
    assert tables.state[Family.IPV4] == BASE
    # ipv4 installed and rolled back; ipv6's failed restore may have half-committed: undone
    assert sorted(tables.restores) == ["ip6tables-restore", "iptables-restore", "iptables-restore"]


def test_a_family_that_fails_before_changing_anything_is_not_rolled_back():
    rs = ruleset()
    tables = FakeTables(rs, failing={"ip6tables-save"})
    with pytest.raises(MeshguardFailure, match=r"^ip6tables-save: broken$"):
        install(rs, run=tables, ipv6_available=True)
    assert tables.restores == ["iptables-restore", "iptables-restore"]


def test_a_rollback_that_does_not_verify_is_named_in_the_one_line():
    rs = ruleset()
    saves: list[str] = []

    def run(argv, *, stdin=None):
        if argv[0] == "iptables-save":
            saves.append(argv[0])  # nothing at first; then the rollback never takes
            return (
                "*filter\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
                if len(saves) == 1
                else installed_state(rs)
            )
        if argv[0] == "iptables-restore" and len(saves) == 1:
            raise MeshguardFailure("iptables-restore: line 9 failed")
        return ""

    with pytest.raises(MeshguardFailure) as failure:
        install(rs, run=run, families=[Family.IPV4])
    message = str(failure.value)
    assert message.startswith("iptables-restore: line 9 failed; rolling back also failed: ipv4")
    assert "\n" not in message


def test_install_skips_ipv6_only_when_the_namespace_has_no_ipv6():
    rs = ruleset()
    seen: list[str] = []

    def run(argv, *, stdin=None):
        seen.append(argv[0])
        raise MeshguardFailure("should not run")

    results = install(rs, run=run, families=[Family.IPV6], ipv6_available=False)
    assert [r.installed for r in results] == [False]
    assert seen == []


def two_hooks_into_output(rs: Ruleset) -> Ruleset:
    """``rs`` with a second filter hook into OUTPUT (to a chain of its own), after the first."""
    filter_table = next(t for t in rs.ipv4.tables if t.name == "filter")
    extra = Hook(chain="OUTPUT", spec="-o lo -j MESHGUARD_EXTRA")
    return with_table(
        rs,
        replace(
            filter_table,
            chains=(*filter_table.chains, "MESHGUARD_EXTRA"),
            hooks=(*filter_table.hooks, extra),
            rules=(*filter_table.rules, ("MESHGUARD_EXTRA", "-j RETURN")),
        ),
    )


def test_several_hooks_into_one_chain_are_its_first_rules_in_order():
    rs = two_hooks_into_output(ruleset())
    first, extra = (h.spec for h in rs.ipv4.tables[0].hooks if h.chain == "OUTPUT")
    plan = plan_payload(rs.ipv4, SavedState()).splitlines()
    assert plan.index(f"-I OUTPUT 1 {first}") < plan.index(f"-I OUTPUT 2 {extra}")
    installed = parse_save(installed_state(rs))
    assert installed.table("filter").rules_of("OUTPUT")[:2] == [first, extra]
    assert verify(rs.ipv4, installed) == []
    assert "-I " not in plan_payload(rs.ipv4, installed)
    swapped = installed_state(rs).replace(
        f"-A OUTPUT {first}\n-A OUTPUT {extra}\n", f"-A OUTPUT {extra}\n-A OUTPUT {first}\n"
    )
    assert verify(rs.ipv4, parse_save(swapped)) == [
        f"filter: OUTPUT does not start with '{first}', '{extra}'"
    ]
    replan = plan_payload(rs.ipv4, parse_save(swapped)).splitlines()
    assert [line for line in replan if line.startswith(("-D ", "-I "))] == [
        f"-D OUTPUT {extra}",
        f"-D OUTPUT {first}",
        f"-I OUTPUT 1 {first}",
        f"-I OUTPUT 2 {extra}",
    ]


def test_a_jump_into_meshguard_that_is_no_hook_is_found_and_removed():
    rs = ruleset()
    state = installed_state(rs).replace(
        "-A OUTPUT -j ISTIO_OUTPUT\n", "-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j MESHGUARD_SNAT\n"
    )
    assert "nat: OUTPUT has an unexpected jump '-j MESHGUARD_SNAT'" in verify(
        rs.ipv4, parse_save(state)
    )
    assert "-D OUTPUT -j MESHGUARD_SNAT" in plan_payload(rs.ipv4, parse_save(state))


# --- the locks ------------------------------------------------------------------------------


def test_the_install_lock_is_exclusive_and_names_its_holder():
    name = f"meshguard-test/{os.getpid()}/{time.monotonic_ns()}"
    with abstract_socket_lock(name, deadline=Deadline.after(1)):
        started = time.monotonic()
        with (
            pytest.raises(MeshguardFailure) as failure,
            abstract_socket_lock(name, deadline=Deadline.after(0.2)),
        ):
            pass
        assert time.monotonic() - started >= 0.2
    assert str(failure.value) == (
        f"another meshguard installer (pid {os.getpid()}) holds the install lock of this"
        f" network namespace (@{name}); gave up after 0.2s"
    )
    with abstract_socket_lock(name, deadline=Deadline.after(0)):
        pass  # free again once the holder let go


def test_a_waiter_gets_the_install_lock_when_the_holder_lets_go():
    name = f"meshguard-test/{os.getpid()}/{time.monotonic_ns()}"
    order: list[str] = []
    holding = threading.Event()

    def holder() -> None:
        with abstract_socket_lock(name, deadline=Deadline.after(1)):
            holding.set()
            time.sleep(0.2)
            order.append("released")

    thread = threading.Thread(target=holder)
    thread.start()
    holding.wait(5)
    with abstract_socket_lock(name, deadline=Deadline.after(5)):
        order.append("acquired")
    thread.join()
    assert order == ["released", "acquired"]


def test_the_xtables_lock_is_exclusive_and_its_holders_tools_lock_elsewhere(tmp_path: Path):
    path = tmp_path / "xtables.lock"
    with xtables_lock(path, deadline=Deadline.after(1)) as held:
        assert held.held
        private = held.env[XTABLES_LOCKFILE_ENV]
        assert Path(private).resolve() != path.resolve()
        with (
            pytest.raises(MeshguardFailure, match=f"holds iptables' lock {path}; gave up after"),
            xtables_lock(path, deadline=Deadline.after(0.1)),
        ):
            pass
    with xtables_lock(path, deadline=Deadline.after(0)) as again:
        assert again.held


def test_an_xtables_lock_file_that_cannot_be_opened_is_skipped(tmp_path: Path):
    with xtables_lock(tmp_path / "missing" / "xtables.lock", deadline=Deadline.after(0)) as held:
        assert not held.held
        assert held.env == {}


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
        (
            lambda d: d["ipv4"]["tables"][0]["rules"][0].__setitem__(1, "x\n-F"),
            "characters outside a rule",
        ),
        (lambda d: d.pop("ipv6"), "unexpected content"),
    ],
)
def test_altered_ruleset_documents_are_refused(mutate, message: str):
    document = json.loads(ruleset().to_json())
    mutate(document)
    with pytest.raises(MalformedInputError, match=message):
        Ruleset.from_json(json.dumps(document))


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ('-j NFLOG --nflog-prefix "istio:deny" --nflog-group 4747', "is not meshguard's"),
        ('-j NFLOG --nflog-prefix "meshguard:deny x" --nflog-group 4747', "is not meshguard's"),
        ('-j NFLOG --nflog-prefix "meshguard:deny" --nflog-group 0', "not a number in 1..65535"),
        ('-j NFLOG --nflog-prefix "meshguard:deny" --nflog-group 70000', "in 1..65535"),
        ("-m limit --limit 10/sec --limit-burst 0 -j RETURN", "not a number in 1..10000"),
        ("-m limit --limit 10/sec --limit-burst 99999 -j RETURN", "in 1..10000"),
        ("-j NFLOG --nflog-prefix meshguard:deny --nflog-group 4747", "not in canonical form"),
    ],
)
def test_denial_log_rules_outside_their_grammar_are_refused(spec: str, problem: str):
    """The NFLOG words enter the rule grammar narrowly: meshguard's own prefixes only, a
    group and a burst in range, the prefix quoted as iptables-save quotes it."""
    with pytest.raises(ValueError, match=problem):
        check_spec(spec)


def test_the_denial_log_rules_are_in_the_grammar():
    check_spec(
        '-m limit --limit 10/sec --limit-burst 20 -j NFLOG --nflog-prefix "meshguard:deny"'
        " --nflog-group 4747"
    )


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '"x"', "{}", "x" * (2 * 1024 * 1024)])
def test_unreadable_ruleset_documents_are_refused(text: str):
    with pytest.raises(MalformedInputError, match="ruleset: "):
        Ruleset.from_json(text)


def test_several_hooks_into_one_builtin_chain_are_printed_in_order():
    table = Table(
        name="filter",
        chains=("MESHGUARD_A", "MESHGUARD_B"),
        hooks=(Hook(chain="OUTPUT", spec="-j MESHGUARD_A"),
               Hook(chain="OUTPUT", spec="-j MESHGUARD_B"),
               Hook(chain="INPUT", spec="-j MESHGUARD_B")),
        rules=(),
    )  # fmt: skip
    payload = FamilyRuleset(family=Family.IPV4, tables=(table,)).payload().splitlines()
    assert [line for line in payload if line.startswith("-I ")] == [
        "-I OUTPUT 1 -j MESHGUARD_A", "-I OUTPUT 2 -j MESHGUARD_B", "-I INPUT 1 -j MESHGUARD_B",
    ]  # fmt: skip


def test_init_refuses_a_lock_timeout_that_is_not_seconds(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["init", "--lock-timeout", "soon"])
    assert exit_.value.code == 2
    assert "expected seconds (e.g. 30), got 'soon'" in capsys.readouterr().err
