"""Concurrent ``meshguard init`` in one network namespace, against the real kernel.

Two installers at once (a restarted init container racing a node-side CNI CHECK) must
serialize: each holds the namespace's install lock over read, plan, apply, verify and
rollback, so an exit 0 means its rules were in place while it held the lock, and the final
state is exactly the ruleset of the installer that held it last.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshguard.rules.install import INSTALL_LOCK_NAME, verify
from meshguard.rules.iptables import Deadline, EnvRunner, parse_save, xtables_lock
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.sandbox.netns import NetworkNamespace
from tests.rules.test_init_netns import compiled, output_hook, snapshot
from tests.support.podns import own_lines
from tests.support.shared import golden_payloads

pytestmark = pytest.mark.root

ROUNDS = 30
NARROW_POLICY = "rules: [{from: app, to: cache, ports: [6379]}]"


@dataclass(frozen=True)
class Outcome:
    ruleset: Ruleset
    returncode: int
    stderr: str

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]

    def held(self) -> tuple[int, int] | None:
        """When this installer held the install lock (monotonic ns), from its debug log."""
        times = {e["event"]: e["monotonic_ns"] for e in self.events() if "monotonic_ns" in e}
        if "lock-acquired" not in times or "lock-released" not in times:
            return None
        return times["lock-acquired"], times["lock-released"]


@dataclass(frozen=True)
class Backend:
    """The iptables variant the installers run: what Istio used decides it in a pod."""

    name: str
    bin_dir: Path | None = None  # put first on PATH: its iptables-* are the variant's

    @property
    def env(self) -> dict[str, str]:
        if self.bin_dir is None:
            return dict(os.environ)
        return {**os.environ, "PATH": f"{self.bin_dir}:{os.environ['PATH']}"}

    def save(self, ns: NetworkNamespace, family: Family) -> str:
        return ns.run([str(self.bin_dir / family.save) if self.bin_dir else family.save])

    def snapshot(self, ns: NetworkNamespace) -> dict[Family, list[str]]:
        return {family: own_lines(self.save(ns, family)) for family in Family}


NFT = Backend("nft")


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Backend:
    """iptables-legacy under the usual names (as in an image whose Istio chose legacy)."""
    if shutil.which("iptables-legacy-restore") is None:
        pytest.skip("iptables-legacy is not installed")
    directory = tmp_path_factory.mktemp("legacy-bin")
    for family in Family:
        for tool in (family.save, family.restore):
            legacy_tool = tool.replace("tables-", "tables-legacy-")
            (directory / tool).symlink_to(shutil.which(legacy_tool) or legacy_tool)
    return Backend("legacy", directory)


def init_command(ns: NetworkNamespace, path: Path, *extra: str) -> list[str]:
    return ns.argv(
        [sys.executable, "-m", "meshguard", "--log-level", "debug", "init",
         "--ruleset-file", str(path), *extra]
    )  # fmt: skip


def run_init(
    ns: NetworkNamespace, path: Path, *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        init_command(ns, path), capture_output=True, text=True, timeout=60, env=env, check=False
    )


def fresh_istio_namespace(backend: Backend) -> NetworkNamespace:
    ns = NetworkNamespace().__enter__()
    v4, _ = golden_payloads("ipnets.golden")
    restore = str(backend.bin_dir / "iptables-restore") if backend.bin_dir else "iptables-restore"
    for payload in v4:
        ns.run([restore, "--noflush"], stdin=payload)
    return ns


def expected_states(
    rulesets: list[Ruleset], paths: list[Path], backend: Backend
) -> dict[str, dict[Family, list[str]]]:
    """meshguard's lines after a lone install of each ruleset (by digest)."""
    states = {}
    for rs, path in zip(rulesets, paths, strict=True):
        ns = fresh_istio_namespace(backend)
        try:
            done = run_init(ns, path, env=backend.env)
            assert done.returncode == 0, done.stderr
            states[rs.digest] = backend.snapshot(ns)
        finally:
            ns.close()
    return states


def race_round(
    ns: NetworkNamespace, rulesets: list[Ruleset], paths: list[Path], backend: Backend
) -> list[Outcome]:
    processes = [
        subprocess.Popen(
            init_command(ns, path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=backend.env,
        )
        for path in paths
    ]
    outcomes = []
    for rs, process in zip(rulesets, processes, strict=True):
        _, stderr = process.communicate(timeout=60)
        outcomes.append(Outcome(ruleset=rs, returncode=process.returncode, stderr=stderr))
    return outcomes


def round_problems(
    ns: NetworkNamespace,
    outcomes: list[Outcome],
    states: dict[str, dict[Family, list[str]]],
    backend: Backend,
) -> list[str]:
    problems = []
    final = backend.snapshot(ns)
    for family in Family:
        if not any(line.startswith("-A OUTPUT ") for line in final[family]):
            problems.append(f"{family.value} has no meshguard hook in OUTPUT")
    if final not in states.values():
        problems.append("final state is neither ruleset")
    for outcome in outcomes:
        if outcome.returncode != 0:
            problems.append(f"exit {outcome.returncode}: {outcome.stderr.splitlines()[-1:]}")
    succeeded = [o for o in outcomes if o.returncode == 0]
    held = [o.held() for o in succeeded]
    if None in held:
        problems.append("an installer that exited 0 logged no install-lock interval")
        return problems
    # Each exit 0 verified its rules under the lock; disjoint intervals mean nobody changed
    # them before it let go, and the last holder's rules are what is left.
    intervals = sorted((h, o) for h, o in zip(held, succeeded, strict=True) if h is not None)
    for (first, _), (second, _) in itertools.pairwise(intervals):
        if second[0] < first[1]:
            problems.append("two installers held the install lock at the same time")
    if intervals:
        last = intervals[-1][1].ruleset
        for family in Family:
            if verify(last.family(family), parse_save(backend.save(ns, family))):
                problems.append(f"{family.value} is not the ruleset of the last lock holder")
    return problems


def race(backend: Backend, tmp_path: Path, *, same: bool) -> None:
    first = compiled()
    second = first if same else compiled(NARROW_POLICY)
    rulesets = [first, second]
    paths = [tmp_path / "ruleset-0", tmp_path / "ruleset-1"]
    for rs, path in zip(rulesets, paths, strict=True):
        path.write_text(rs.to_json())
    states = expected_states(rulesets, paths, backend)
    failed: dict[int, list[str]] = {}
    contended = 0
    for number in range(ROUNDS):
        ns = fresh_istio_namespace(backend)
        try:
            if number % 3 == 2:
                # A third of the rounds race on top of an installed ruleset (a restart).
                done = run_init(ns, paths[1], env=backend.env)
                assert done.returncode == 0, done.stderr
            outcomes = race_round(ns, rulesets, paths, backend)
            problems = round_problems(ns, outcomes, states, backend)
        finally:
            ns.close()
        if problems:
            failed[number] = problems
        contended += any(e["event"] == "lock-wait" for o in outcomes for e in o.events())
    assert not failed, f"{len(failed)}/{ROUNDS} rounds went wrong: {failed}"
    # About half the rounds overlap here; none would mean the test no longer races.
    assert contended, f"no round of {ROUNDS} had an installer wait for the other"


@pytest.mark.parametrize("same", [False, True], ids=["different-rulesets", "same-ruleset"])
def test_concurrent_inits_serialize_and_the_last_holder_wins(tmp_path: Path, same: bool):
    race(NFT, tmp_path, same=same)


def test_concurrent_inits_on_iptables_legacy_serialize_too(tmp_path: Path, legacy: Backend):
    race(legacy, tmp_path, same=False)


def hold_lock(ns: NetworkNamespace) -> subprocess.Popen[str]:
    """A process that holds the namespace's install lock until it is killed (not iptables'
    lock: that one is shared by every namespace of this host, and by other test runs)."""
    code = (
        "import time\n"
        "from meshguard.rules.install import INSTALL_LOCK_NAME\n"
        "from meshguard.rules.iptables import Deadline, abstract_socket_lock\n"
        "with abstract_socket_lock(INSTALL_LOCK_NAME, deadline=Deadline.after(5)):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    return ns.spawn([sys.executable, "-c", code], ready_line="held")


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path: Path):
    path = tmp_path / "ruleset"
    rs = compiled()
    path.write_text(rs.to_json())
    with NetworkNamespace() as ns:
        holder = hold_lock(ns)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        done = run_init(ns, path, env={**os.environ, "MESHGUARD_LOCK_TIMEOUT": "2"})
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 2
        assert output_hook(rs) in snapshot(ns)[Family.IPV4]


def test_a_held_lock_times_out_with_one_line_naming_the_holder(tmp_path: Path):
    path = tmp_path / "ruleset"
    path.write_text(compiled().to_json())
    with NetworkNamespace() as ns:
        holder = hold_lock(ns)
        started = time.monotonic()
        done = subprocess.run(
            ns.argv([sys.executable, "-m", "meshguard", "init", "--ruleset-file", str(path)]),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MESHGUARD_LOCK_TIMEOUT": "0.5"},
            check=False,
        )
        waited = time.monotonic() - started
        assert done.returncode == 1
        last = done.stderr.splitlines()[-1]
        assert last == (
            f"meshguard init: another meshguard installer (pid {holder.pid}) holds the install"
            f" lock of this network namespace (@{INSTALL_LOCK_NAME}); gave up after 0.5s"
        ), done.stderr
        assert 0.5 <= waited < 5
        assert snapshot(ns) == {Family.IPV4: [], Family.IPV6: []}
        ns.stop(holder)


def test_the_lock_is_per_network_namespace(tmp_path: Path):
    path = tmp_path / "ruleset"
    path.write_text(compiled().to_json())
    with NetworkNamespace() as held, NetworkNamespace() as other:
        hold_lock(held)
        done = run_init(other, path, env={**os.environ, "MESHGUARD_LOCK_TIMEOUT": "0.5"})
        assert done.returncode == 0, done.stderr


def test_a_held_xtables_lock_times_out_with_one_line_naming_the_holder(tmp_path: Path):
    path = tmp_path / "ruleset"
    path.write_text(compiled().to_json())
    lock = tmp_path / "xtables.lock"  # via $XTABLES_LOCKFILE, as iptables itself reads it
    with NetworkNamespace() as ns, lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        env = {**os.environ, "XTABLES_LOCKFILE": str(lock), "MESHGUARD_LOCK_TIMEOUT": "0.5"}
        done = run_init(ns, path, env=env)
        assert done.returncode == 1
        assert done.stderr.splitlines()[-1] == (
            f"meshguard init: another process (pid {os.getpid()}) holds iptables' lock {lock};"
            " gave up after 0.5s"
        ), done.stderr
        assert snapshot(ns) == {Family.IPV4: [], Family.IPV6: []}


def test_legacy_writers_wait_for_the_xtables_lock_while_meshguards_tools_do_not(
    tmp_path: Path, legacy: Backend
):
    lock = tmp_path / "xtables.lock"
    restore = [str(legacy.bin_dir / "iptables-restore"), "--noflush", "--wait", "1"]
    payload = "*filter\n:MESHGUARD_PROBE - [0:0]\nCOMMIT\n"
    with NetworkNamespace() as ns, xtables_lock(lock, deadline=Deadline.after(1)) as held:
        istio_like = subprocess.run(
            ns.argv(restore),
            input=payload,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "XTABLES_LOCKFILE": str(lock)},
            check=False,
        )
        assert istio_like.returncode == 4
        assert "Another app is currently holding the xtables lock" in istio_like.stderr
        EnvRunner(env=held.env)(ns.argv(restore), stdin=payload)  # would wait for us without
        assert ":MESHGUARD_PROBE - [0:0]" in legacy.save(ns, Family.IPV4)
