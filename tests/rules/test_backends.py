"""meshguard-init follows the netfilter backend Istio used, and nftables is atomic.

Real kernel, real tools: Istio's capture is loaded from its goldens into iptables-legacy,
iptables-nft or native nftables, then the real ``meshguard init`` must pick that backend by
itself (or the one forced), write nothing anywhere else, and — in nftables — replace its
table in one transaction that either lands whole, verified, or leaves the previous state
byte for byte.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard.errors import MeshguardFailure
from meshguard.process import run_command
from meshguard.rules import nftables
from meshguard.rules.backend import Backend, detect_backend
from meshguard.rules.install import install
from meshguard.rules.ruleset import Family, Ruleset, Table
from meshguard.sandbox.netns import NetworkNamespace, probe_command
from tests.support.netfilter import native_nftables_pod, nft_golden
from tests.support.podns import compile_for
from tests.support.shared import golden_payloads

pytestmark = pytest.mark.root

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"


def compiled(*, native: bool = False, policy: str | None = None) -> Ruleset:
    """The example pod's ruleset as admission records it: with ``native``, its istio-init
    runs ``--native-nftables`` and admission reads that from the spec."""
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    if policy is not None:
        pod["metadata"]["annotations"]["meshguard.io/policy"] = policy
    return compile_for(native_nftables_pod(pod) if native else pod)


@pytest.fixture
def ns() -> Iterator[NetworkNamespace]:
    with NetworkNamespace() as namespace:
        yield namespace


def init(
    ns: NetworkNamespace,
    ruleset: Ruleset,
    directory: Path,
    *extra: str,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    path = directory / "ruleset"
    path.write_text(ruleset.to_json())
    argv = [sys.executable, "-m", "meshguard", "init", "--ruleset-file", str(path), *extra]
    environment = {k: v for k, v in __import__("os").environ.items() if k not in _OVERRIDES}
    return subprocess.run(
        ns.argv(argv),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environment, **(env or {})},
    )


_OVERRIDES = ("FORCE_IPTABLES_BINARY", "MESHGUARD_BACKEND")


def load_iptables(ns: NetworkNamespace, backend: Backend, golden: str = "ipnets.golden") -> None:
    v4, _ = golden_payloads(golden)
    for payload in v4:
        ns.run([backend.restore(Family.IPV4), "--noflush"], stdin=payload)


def meshguard_in(ns: NetworkNamespace) -> dict[str, bool]:
    """Where meshguard's rules are: each iptables variant, and native nftables."""
    found = {}
    for backend in (Backend.IPTABLES_LEGACY, Backend.IPTABLES_NFT):
        text = "".join(ns.run([backend.save(f)]) for f in Family)
        found[backend.value] = "MESHGUARD" in text
    found["nftables"] = "table inet meshguard" in ns.run(["nft", "list", "tables"])
    return found


def installed_backend(done: subprocess.CompletedProcess[str]) -> set[str]:
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    return {e["backend"] for e in events if e.get("event") == "installed"}


def test_legacy_rules_present_means_legacy_and_nothing_in_nf_tables(ns, tmp_path):
    load_iptables(ns, Backend.IPTABLES_LEGACY)
    done = init(ns, compiled(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert installed_backend(done) == {"iptables-legacy"}
    assert meshguard_in(ns) == {"iptables-legacy": True, "iptables-nft": False, "nftables": False}
    assert ns.run(["nft", "-s", "list", "ruleset"]).strip() == ""  # not a single nf_tables table


def test_no_legacy_rules_means_iptables_nft(ns, tmp_path):
    load_iptables(ns, Backend.IPTABLES_NFT)
    done = init(ns, compiled(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert installed_backend(done) == {"iptables-nft"}
    assert meshguard_in(ns) == {"iptables-legacy": False, "iptables-nft": True, "nftables": False}


@pytest.mark.parametrize(
    ("forced", "istio", "expected"),
    [
        ("iptables-legacy", Backend.IPTABLES_NFT, "iptables-legacy"),
        ("/usr/sbin/iptables-nft", Backend.IPTABLES_LEGACY, "iptables-nft"),
    ],
)
def test_force_iptables_binary_is_honored_as_istio_does(ns, tmp_path, forced, istio, expected):
    load_iptables(ns, istio)
    done = init(ns, compiled(), tmp_path, env={"FORCE_IPTABLES_BINARY": forced})
    assert done.returncode == 0, done.stderr
    assert installed_backend(done) == {expected}


def test_a_bad_force_iptables_binary_fails_closed(ns, tmp_path):
    done = init(ns, compiled(), tmp_path, env={"FORCE_IPTABLES_BINARY": "iptables-foo"})
    assert done.returncode == 1
    assert "FORCE_IPTABLES_BINARY is 'iptables-foo', expected" in done.stderr.splitlines()[-1]
    assert not any(meshguard_in(ns).values())


def test_istio_native_table_means_nftables_and_no_iptables_at_all(ns, tmp_path):
    ns.run(["nft", "-f", "-"], stdin=nft_golden("ipv6-ipnets.golden"))
    istio_before = ns.run(["nft", "list", "table", "inet", "istio-proxy-nat"])
    done = init(ns, compiled(native=True), tmp_path)
    assert done.returncode == 0, done.stderr
    assert installed_backend(done) == {"nftables"}
    assert meshguard_in(ns) == {"iptables-legacy": False, "iptables-nft": False, "nftables": True}
    assert ns.run(["nft", "list", "table", "inet", "istio-proxy-nat"]) == istio_before


def test_istios_table_with_a_pod_admitted_for_iptables_fails_closed(ns, tmp_path):
    """The spec (admission: no --native-nftables) and the namespace (Istio's native table)
    disagree: init refuses to guess, and writes nothing anywhere."""
    ns.run(["nft", "-f", "-"], stdin=nft_golden("ipv6-ipnets.golden"))
    before = ns.run(["nft", "-s", "list", "ruleset"])
    done = init(ns, compiled(), tmp_path)
    assert done.returncode == 1
    reason = done.stderr.splitlines()[-1]
    assert "the pod spec and the namespace disagree" in reason
    assert "istio-proxy-nat" in reason and "--native-nftables" in reason
    assert meshguard_in(ns) == {"iptables-legacy": False, "iptables-nft": False, "nftables": False}
    assert ns.run(["nft", "-s", "list", "ruleset"]) == before
    forced = init(ns, compiled(), tmp_path, "--backend", "nftables")  # the operator's call
    assert forced.returncode == 0, forced.stderr


def test_native_nftables_pod_without_istios_table_fails_closed(ns, tmp_path):
    done = init(ns, compiled(native=True), tmp_path)
    assert done.returncode == 1
    assert "no table inet istio-proxy-nat" in done.stderr.splitlines()[-1]
    assert not any(meshguard_in(ns).values())


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_backend_can_be_forced(ns, tmp_path, how):
    load_iptables(ns, Backend.IPTABLES_LEGACY)
    extra = ("--backend", "nftables") if how == "flag" else ()
    env = {"MESHGUARD_BACKEND": "nftables"} if how == "env" else None
    done = init(ns, compiled(), tmp_path, *extra, env=env)
    assert done.returncode == 0, done.stderr
    assert installed_backend(done) == {"nftables"}


def test_nftables_init_is_idempotent_and_converges(ns, tmp_path):
    ns.run(["nft", "-f", "-"], stdin=nft_golden("ipv6-ipnets.golden"))
    assert init(ns, compiled(native=True), tmp_path).returncode == 0
    once = ns.run(["nft", "-s", "list", "ruleset"])
    assert init(ns, compiled(native=True), tmp_path).returncode == 0
    assert ns.run(["nft", "-s", "list", "ruleset"]) == once
    narrow = compiled(native=True, policy="rules: [{from: app, to: cache, ports: [6379]}]")
    assert init(ns, narrow, tmp_path).returncode == 0
    with NetworkNamespace() as clean:
        clean.run(["nft", "-f", "-"], stdin=nft_golden("ipv6-ipnets.golden"))
        assert init(clean, narrow, tmp_path).returncode == 0
        assert clean.run(["nft", "-s", "list", "ruleset"]) == ns.run(
            ["nft", "-s", "list", "ruleset"]
        )


def broken(ruleset: Ruleset) -> Ruleset:
    """The ruleset with one rule the kernel refuses (a jump to a chain that does not exist),
    in the last chain of IPv6's nat table: everything before it is valid."""

    def spoil(table: Table) -> Table:
        if table.name != "nat":
            return table
        return replace(table, rules=(*table.rules, ("MESHGUARD_SNAT", "-j MESHGUARD_NOWHERE")))

    ipv6 = replace(ruleset.ipv6, tables=tuple(spoil(t) for t in ruleset.ipv6.tables))
    return replace(ruleset, ipv6=ipv6)


def test_a_refused_transaction_leaves_the_previous_state_byte_identical(ns, tmp_path):
    ns.run(["nft", "-f", "-"], stdin=nft_golden("dns-uid-gid.golden"))
    assert init(ns, compiled(native=True), tmp_path).returncode == 0
    before = ns.run(["nft", "-s", "list", "ruleset"])
    done = init(ns, broken(compiled(native=True, policy="rules: []")), tmp_path)
    assert done.returncode == 1
    assert "nftables transaction refused, nothing changed" in done.stderr.splitlines()[-1]
    assert ns.run(["nft", "-s", "list", "ruleset"]) == before


def test_a_failed_verification_restores_the_previous_table(ns, tmp_path):
    """Another writer slips a rule into meshguard's table between the apply and the read
    back: verification fails, and the table found before the install comes back."""
    ns.run(["nft", "-f", "-"], stdin=nft_golden("dns-uid-gid.golden"))
    first = compiled(native=True)
    second = compiled(native=True, policy="rules: [{from: app, to: cache, ports: [6379]}]")

    applied: list[str] = []

    def run(argv: list[str], *, stdin: str | None = None) -> str:
        out = run_command(ns.argv(argv), stdin=stdin)
        if argv[:2] == ["nft", "-f"] and not applied:  # right after the install's transaction
            applied.append("once")
            intruder = ["nft", "add", "rule", "inet", "meshguard", "MESHGUARD_DENY", "counter"]
            run_command(ns.argv(intruder))
        return out

    install(first, run=lambda argv, stdin=None: run_command(ns.argv(argv), stdin=stdin),
            backend=Backend.NFTABLES)  # fmt: skip
    before = ns.run(["nft", "-s", "list", "ruleset"])
    with pytest.raises(MeshguardFailure, match="MESHGUARD_DENY has 4 rules, expected 3"):
        install(second, run=run, backend=Backend.NFTABLES)
    assert ns.run(["nft", "-s", "list", "ruleset"]) == before


def test_a_failed_first_install_leaves_no_table(ns, tmp_path):
    ns.run(["nft", "-f", "-"], stdin=nft_golden("empty.golden"))
    before = ns.run(["nft", "-s", "list", "ruleset"])
    done = init(ns, broken(compiled(native=True)), tmp_path)
    assert done.returncode == 1
    assert ns.run(["nft", "-s", "list", "ruleset"]) == before


def test_the_rendered_table_is_what_the_kernel_reads_back(ns, tmp_path):
    """``meshguard init --dry-run`` prints the exact transaction; nft accepts it unchanged."""
    ns.run(["nft", "-f", "-"], stdin=nft_golden("ipv6-ipnets.golden"))
    done = init(ns, compiled(native=True), tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == nftables.render(compiled(native=True)).splitlines()
    assert "table inet meshguard" not in ns.run(["nft", "list", "tables"])


#: Istio's native captures of several configurations: nat only, nat + raw (DNS capture),
#: nat + mangle (TPROXY), owner groups, IPv6 ranges with virtual interfaces.
ISTIO_NATIVE_GOLDENS = (
    "ipv6-ipnets.golden",
    "dns-uid-gid.golden",
    "tproxy.golden",
    "inbound-ports-tproxy.golden",
    "ipv6-dns-uid-gid.golden",
    "kube-virt-interfaces.golden",
)


def istio_tables(ns: NetworkNamespace) -> dict[str, str]:
    """Every Istio table, rules and handles, as the kernel lists it."""
    names = [line.split()[2] for line in ns.run(["nft", "list", "tables"]).splitlines()]
    return {
        name: ns.run(["nft", "-a", "-s", "list", "table", "inet", name])
        for name in names
        if name.startswith("istio-")
    }


@pytest.mark.parametrize("golden", ISTIO_NATIVE_GOLDENS)
def test_istios_native_tables_are_never_modified(ns, tmp_path, golden):
    """Install, converge to another policy, fail a transaction, fail a verification: every
    table of Istio keeps its rules and their handles (nothing deleted and re-added)."""
    ns.run(["nft", "-f", "-"], stdin=nft_golden(golden))
    istio = istio_tables(ns)
    assert "istio-proxy-nat" in istio and len(istio["istio-proxy-nat"].splitlines()) > 5
    assert init(ns, compiled(native=True), tmp_path).returncode == 0
    narrow = compiled(native=True, policy="rules: [{from: app, to: cache, ports: [6379]}]")
    assert init(ns, narrow, tmp_path).returncode == 0
    assert init(ns, broken(compiled(native=True)), tmp_path).returncode == 1
    assert istio_tables(ns) == istio
    assert meshguard_in(ns) == {"iptables-legacy": False, "iptables-nft": False, "nftables": True}


class Recorder:
    """A runner in the namespace that records the tool of every command."""

    def __init__(self, ns: NetworkNamespace) -> None:
        self.ns = ns
        self.tools: set[str] = set()

    def __call__(self, argv: list[str], *, stdin: str | None = None) -> str:
        self.tools.add(argv[0])
        return run_command(self.ns.argv(argv), stdin=stdin)


def iptables_state(ns: NetworkNamespace) -> dict[str, list[str]]:
    """Both iptables variants, both families: the rules, without the save's timestamped
    comments and chain counters (a packet the kernel sends itself, e.g. IPv6 MLD on lo,
    counts in a chain policy)."""
    return {
        backend.save(family): [
            re.sub(r" \[\d+:\d+\]$", "", line)
            for line in ns.run([backend.save(family)]).splitlines()
            if line[:1] != "#"
        ]
        for backend in (Backend.IPTABLES_LEGACY, Backend.IPTABLES_NFT)
        for family in Family
    }


ONLY_TOOLS = {
    Backend.IPTABLES_LEGACY: {
        "iptables-legacy-save", "iptables-legacy-restore",
        "ip6tables-legacy-save", "ip6tables-legacy-restore", "ip",
    },
    Backend.IPTABLES_NFT: {
        "iptables-nft-save", "iptables-nft-restore",
        "ip6tables-nft-save", "ip6tables-nft-restore", "ip",
    },
    Backend.NFTABLES: {"nft", "ip"},
}  # fmt: skip


@pytest.mark.parametrize("backend", list(ONLY_TOOLS), ids=str)
def test_install_verify_and_rollback_use_the_detected_backend_only(ns, backend):
    """A good install, then one that fails half way (IPv6 refused after IPv4 applied, or the
    nft transaction refused) and is rolled back: every command is the backend's own tool,
    the other backends hold nothing of meshguard, and the rollback leaves the first install
    exactly."""
    native = backend is Backend.NFTABLES
    if native:
        ns.run(["nft", "-f", "-"], stdin=nft_golden("dns-uid-gid.golden"))
    else:
        load_iptables(ns, backend)
    detected = detect_backend(Recorder(ns), environ={}, native_nftables=native)
    assert detected is backend
    recorder = Recorder(ns)
    install(compiled(native=native), run=recorder, backend=detected)
    good = iptables_state(ns)
    tables = ns.run(["nft", "-s", "list", "ruleset"])
    with pytest.raises(MeshguardFailure):
        install(broken(compiled(native=native, policy="rules: []")), run=recorder,
                backend=detected)  # fmt: skip
    assert recorder.tools <= ONLY_TOOLS[backend], recorder.tools
    assert {t for t in recorder.tools if t != "ip"}, "nothing was run"
    others = {k: v for k, v in meshguard_in(ns).items() if k != backend.value}
    assert not any(others.values()), others
    assert ns.run(["nft", "-s", "list", "ruleset"]) == tables
    assert iptables_state(ns) == good


def deny_counts(ns: NetworkNamespace) -> list[int]:
    """The packets each rule of meshguard's default counted, in order."""
    listing = ns.run(["nft", "list", "chain", "inet", "meshguard", "MESHGUARD_DENY"])
    return [int(n) for n in re.findall(r"counter packets (\d+)", listing)]


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_the_default_counts_what_it_denies_in_nftables(ns, tmp_path, mode):
    """As iptables counts each rule, the default's chain counts in nftables: an operator
    reads how many flows were (audit: would have been) denied."""
    ns.run(["nft", "-f", "-"], stdin=nft_golden("ipv6-ipnets.golden"))
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"]["annotations"]["meshguard.io/mode"] = mode
    assert init(ns, compile_for(native_nftables_pod(pod)), tmp_path).returncode == 0
    assert deny_counts(ns) and sum(deny_counts(ns)) == 0
    targets = [{"host": "127.0.0.1", "port": 6379, "protocol": "tcp", "timeout": 1.0}]
    ns.run(probe_command(uid=4242, gid=4242), stdin=json.dumps(targets))  # a uid of no container
    assert sum(deny_counts(ns)) >= 1
