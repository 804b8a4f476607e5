"""``meshguard init`` against the real kernel: idempotent, converging, atomic, fail-closed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard.pod import read_pod
from meshguard.rules.compiler import CompilerSettings, compile_pod
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.sandbox.netns import NetworkNamespace
from tests.rules.test_install import two_hooks_into_output
from tests.support.podns import own_lines
from tests.support.shared import golden_payloads

pytestmark = pytest.mark.root

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
NARROW_POLICY = "rules: [{from: app, to: cache, ports: [6379]}]"


def compiled(policy: str | None = None) -> Ruleset:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    if policy is not None:
        pod["metadata"]["annotations"]["meshguard.io/policy"] = policy
    return compile_pod(
        read_pod(metadata=pod["metadata"], spec=pod["spec"]), settings=CompilerSettings()
    )


@pytest.fixture
def ns() -> Iterator[NetworkNamespace]:
    with NetworkNamespace() as namespace:
        v4, _ = golden_payloads("ipnets.golden")
        for payload in v4:
            namespace.run(["iptables-restore", "--noflush"], stdin=payload)
        yield namespace


def init(ns: NetworkNamespace, ruleset_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ns.argv(
            [sys.executable, "-m", "meshguard", "init", "--ruleset-file", str(ruleset_file), *extra]
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def reason(done: subprocess.CompletedProcess[str]) -> str:
    """The one-line reason init ends with; every line before it must be a JSON log line."""
    *logs, last = done.stderr.splitlines()
    for line in logs:
        json.loads(line)
    return last


def output_hook(rs: Ruleset, table: str = "filter") -> str:
    """The save line of the ruleset's first hook into OUTPUT of ``table`` (IPv4)."""
    hook = next(
        h for t in rs.ipv4.tables if t.name == table for h in t.hooks if h.chain == "OUTPUT"
    )
    return f"-A OUTPUT {hook.spec}"


def without_nat(rs: Ruleset) -> Ruleset:
    return replace(
        rs,
        ipv4=replace(rs.ipv4, tables=tuple(t for t in rs.ipv4.tables if t.name != "nat")),
        ipv6=replace(rs.ipv6, tables=tuple(t for t in rs.ipv6.tables if t.name != "nat")),
    )


def snapshot(ns: NetworkNamespace) -> dict[Family, list[str]]:
    return {family: own_lines(ns.run([family.save])) for family in Family}


def istio_lines(ns: NetworkNamespace) -> list[str]:
    return [line for line in ns.run(["iptables-save"]).splitlines() if "ISTIO" in line]


def test_init_installs_verifies_and_logs_json(ns: NetworkNamespace, tmp_path: Path):
    rs = compiled()
    path = tmp_path / "ruleset"
    path.write_text(rs.to_json())
    done = init(ns, path)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["event"], e["family"], e["digest"]) for e in events] == [
        ("installed", "ipv4", rs.digest),
        ("installed", "ipv6", rs.digest),
    ]
    assert "local fd6d:6775::/112 dev lo" in ns.run(["ip", "-6", "route", "show", "table", "local"])


def test_init_twice_equals_init_once_and_leaves_istio_alone(ns: NetworkNamespace, tmp_path: Path):
    path = tmp_path / "ruleset"
    rs = compiled()
    path.write_text(rs.to_json())
    istio_before = istio_lines(ns)
    assert init(ns, path).returncode == 0
    once = snapshot(ns)
    assert init(ns, path).returncode == 0
    assert snapshot(ns) == once
    assert sum(line == output_hook(rs) for line in once[Family.IPV4]) == 1
    assert istio_lines(ns) == istio_before


def test_a_changed_ruleset_converges_and_leaves_nothing_stale(ns: NetworkNamespace, tmp_path: Path):
    old, new = tmp_path / "old", tmp_path / "new"
    old_rs = compiled()
    nat_chains = {c for t in old_rs.ipv4.tables if t.name == "nat" for c in t.chains}
    assert nat_chains
    old.write_text(old_rs.to_json())
    new.write_text(without_nat(compiled(NARROW_POLICY)).to_json())
    assert init(ns, old).returncode == 0
    assert any(c in line for c in nat_chains for line in snapshot(ns)[Family.IPV4])
    assert init(ns, new).returncode == 0
    after = snapshot(ns)
    fresh = tmp_path / "fresh"
    fresh.write_text(new.read_text())
    with NetworkNamespace() as clean:
        assert init(clean, fresh).returncode == 0
        assert snapshot(clean) == after
    assert not any(c in line for c in nat_chains for family in Family for line in after[family])


def test_init_puts_its_hook_back_in_front_when_something_went_ahead(
    ns: NetworkNamespace, tmp_path: Path
):
    path = tmp_path / "ruleset"
    rs = compiled()
    path.write_text(rs.to_json())
    assert init(ns, path).returncode == 0
    ns.run(["iptables", "-I", "OUTPUT", "1", "-j", "ACCEPT"])  # e.g. something re-ran ahead of us
    assert init(ns, path).returncode == 0
    output = [
        line
        for line in ns.run(["iptables-save", "-t", "filter"]).splitlines()
        if line.startswith("-A OUTPUT")
    ]
    assert output == [output_hook(rs), "-A OUTPUT -j ACCEPT"]


def with_rule(rs: Ruleset, table: str, rule: tuple[str, str], *, first: bool = False) -> Ruleset:
    """The ruleset with one more IPv4 rule (its document digest matches the new content)."""
    tables = tuple(
        replace(t, rules=(rule, *t.rules) if first else (*t.rules, rule)) if t.name == table else t
        for t in rs.ipv4.tables
    )
    return replace(rs, ipv4=replace(rs.ipv4, tables=tables))


def test_a_ruleset_that_fails_half_way_leaves_no_rule_behind(ns: NetworkNamespace, tmp_path: Path):
    # The nat table cannot be applied (no such target). The filter table comes first in
    # the payload, yet nothing of it may remain.
    broken = with_rule(compiled(), "nat", ("MESHGUARD_SNAT", "-j NO_SUCH_CHAIN"))
    path = tmp_path / "ruleset"
    path.write_text(broken.to_json())
    done = init(ns, path, "--family", "ipv4")
    assert done.returncode == 1
    assert reason(done).startswith("meshguard init: iptables-nft-restore --noflush --wait failed:")
    assert "rolled-back" in done.stderr
    assert snapshot(ns)[Family.IPV4] == []


def test_a_restart_that_fails_keeps_the_previous_rules_whole(ns: NetworkNamespace, tmp_path: Path):
    good = tmp_path / "good"
    good.write_text(compiled().to_json())
    assert init(ns, good).returncode == 0
    before = snapshot(ns)
    bad = tmp_path / "bad"
    rule = ("MESHGUARD_OUTPUT", "-j NO_SUCH_CHAIN")
    bad.write_text(with_rule(compiled("rules: []"), "filter", rule, first=True).to_json())
    assert init(ns, bad, "--family", "ipv4").returncode == 1
    assert snapshot(ns) == before


@pytest.mark.parametrize(
    ("content", "expected", "code"),
    [
        (None, "cannot read ruleset", 1),
        ("", "is empty: the meshguard.io/ruleset annotation is missing", 1),
        # Unreadable or altered input exits 2 (README: exit status).
        ("{not json", "ruleset: not valid JSON", 2),
        ("TAMPER", "digest mismatch", 2),
    ],
)
def test_init_without_a_good_ruleset_exits_non_zero_with_one_line(
    ns: NetworkNamespace, tmp_path: Path, content: str | None, expected: str, code: int
):
    path = tmp_path / "ruleset"
    if content == "TAMPER":
        document = json.loads(compiled().to_json())
        document["ipv4"]["tables"][0]["rules"].pop(0)  # e.g. drop the ESTABLISHED rule
        content = json.dumps(document)
    if content is not None:
        path.write_text(content)
    done = init(ns, path)
    assert done.returncode == code
    assert done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr
    assert done.stderr.startswith("meshguard init: ")
    assert snapshot(ns) == {Family.IPV4: [], Family.IPV6: []}


def test_init_reads_the_ruleset_from_the_environment(ns: NetworkNamespace):
    rs = compiled()
    done = subprocess.run(
        ns.argv(
            ["env", f"MESHGUARD_RULESET={rs.to_json()}", sys.executable, "-m", "meshguard", "init"]
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert output_hook(rs) in snapshot(ns)[Family.IPV4]


def test_several_hooks_into_one_chain_install_in_order_and_converge(
    ns: NetworkNamespace, tmp_path: Path
):
    plain = compiled()
    two = two_hooks_into_output(plain)
    hooks = [f"-A OUTPUT {h.spec}" for t in two.ipv4.tables if t.name == "filter" for h in t.hooks]
    assert len(hooks) == 2
    path = tmp_path / "ruleset"
    path.write_text(two.to_json())
    assert init(ns, path).returncode == 0
    output = [
        line
        for line in ns.run(["iptables-save", "-t", "filter"]).splitlines()
        if line.startswith("-A OUTPUT")
    ]
    assert output[:2] == hooks
    once = snapshot(ns)
    assert init(ns, path).returncode == 0
    assert snapshot(ns) == once
    path.write_text(plain.to_json())
    assert init(ns, path).returncode == 0
    assert not any("MESHGUARD_EXTRA" in line for line in snapshot(ns)[Family.IPV4])
    with NetworkNamespace() as clean:
        v4, _ = golden_payloads("ipnets.golden")
        for payload in v4:
            clean.run(["iptables-restore", "--noflush"], stdin=payload)
        assert init(clean, path).returncode == 0
        assert snapshot(clean) == snapshot(ns)


def spelled_differently(rs: Ruleset) -> Ruleset:
    """``rs`` with its IPv4 filter hook in a spelling the kernel accepts but iptables-save
    prints otherwise: the install applies, and verification then fails."""
    table = next(t for t in rs.ipv4.tables if t.name == "filter")
    hook = table.hooks[0]
    spec = (
        hook.spec.replace("-o lo", "--out-interface lo")
        if "-o lo" in hook.spec
        else f"--out-interface lo {hook.spec}"
    )
    respelled = replace(table, hooks=(replace(hook, spec=spec), *table.hooks[1:]))
    tables = tuple(respelled if t is table else t for t in rs.ipv4.tables)
    return replace(rs, ipv4=replace(rs.ipv4, tables=tables))


def test_a_failed_verification_rolls_both_families_back_and_says_one_line(
    ns: NetworkNamespace, tmp_path: Path
):
    good = tmp_path / "good"
    good.write_text(compiled().to_json())
    assert init(ns, good).returncode == 0
    before = snapshot(ns)
    bad = tmp_path / "bad"
    bad.write_text(spelled_differently(compiled(NARROW_POLICY)).to_json())
    done = init(ns, bad)
    assert done.returncode == 1
    assert reason(done).startswith(
        "meshguard init: ipv4 rules not as compiled: filter: OUTPUT does not start with"
    ), done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()[:-1]]
    assert sorted(e["family"] for e in events if e["event"] == "rolled-back") == ["ipv4", "ipv6"]
    assert not any(e["event"] == "installed" for e in events)
    assert snapshot(ns) == before
