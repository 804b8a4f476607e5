"""Concurrent ``meshguard init`` in one network namespace, against the real kernel.

Two installers at once (a restarted init container racing a node-side CNI CHECK) must
serialize: each holds the namespace's install lock over read, plan, apply, verify and
rollback, so an exit 0 means its rules were in place while it held the lock, and the final
state is exactly the ruleset of the installer that held it last.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshguard.rules.install import INSTALL_LOCK_NAME, verify
from meshguard.rules.iptables import parse_save
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.sandbox.netns import NetworkNamespace
from tests.rules.test_init_netns import compiled, output_hook, snapshot
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


def init_command(ns: NetworkNamespace, path: Path, *extra: str) -> list[str]:
    return ns.argv(
        [sys.executable, "-m", "meshguard", "--log-level", "debug", "init",
         "--ruleset-file", str(path), *extra]
    )  # fmt: skip


def fresh_istio_namespace() -> NetworkNamespace:
    ns = NetworkNamespace().__enter__()
    v4, _ = golden_payloads("ipnets.golden")
    for payload in v4:
        ns.run(["iptables-restore", "--noflush"], stdin=payload)
    return ns


def expected_states(rulesets: list[Ruleset], tmp_path: Path) -> dict[str, dict[Family, list[str]]]:
    """meshguard's lines after a lone install of each ruleset (by digest)."""
    states = {}
    for index, rs in enumerate(rulesets):
        path = tmp_path / f"alone-{index}"
        path.write_text(rs.to_json())
        ns = fresh_istio_namespace()
        try:
            done = subprocess.run(
                init_command(ns, path), capture_output=True, text=True, timeout=60, check=False
            )
            assert done.returncode == 0, done.stderr
            states[rs.digest] = snapshot(ns)
        finally:
            ns.close()
    return states


def race_round(ns: NetworkNamespace, rulesets: list[Ruleset], paths: list[Path]) -> list[Outcome]:
    processes = [
        subprocess.Popen(
            init_command(ns, path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for path in paths
    ]
    outcomes = []
    for rs, process in zip(rulesets, processes, strict=True):
        _, stderr = process.communicate(timeout=60)
        outcomes.append(Outcome(ruleset=rs, returncode=process.returncode, stderr=stderr))
    return outcomes


def round_problems(
    ns: NetworkNamespace, outcomes: list[Outcome], states: dict[str, dict[Family, list[str]]]
) -> list[str]:
    problems = []
    final = snapshot(ns)
    matching = [digest for digest, state in states.items() if state == final]
    for family in Family:
        if not any(line.startswith("-A OUTPUT ") for line in final[family]):
            problems.append(f"{family.value} has no meshguard hook in OUTPUT")
    if not matching:
        problems.append("final state is neither ruleset")
    for outcome in outcomes:
        if outcome.returncode != 0:
            problems.append(f"exit {outcome.returncode}: {outcome.stderr.splitlines()[-1:]}")
    succeeded = [o for o in outcomes if o.returncode == 0]
    held = [o.held() for o in succeeded]
    if None in held:
        problems.append("an installer that exited 0 logged no install-lock interval")
        return problems
    intervals = sorted((h, o) for h, o in zip(held, succeeded, strict=True) if h is not None)
    for (first, _), (second, _) in itertools.pairwise(intervals):
        if second[0] < first[1]:
            problems.append("two installers held the install lock at the same time")
    if intervals:
        last = intervals[-1][1].ruleset
        for family in Family:
            state = parse_save(ns.run([family.save]))
            if verify(last.family(family), state):
                problems.append(f"{family.value} is not the ruleset of the last lock holder")
    return problems


@pytest.mark.parametrize("same", [False, True], ids=["different-rulesets", "same-ruleset"])
def test_concurrent_inits_serialize_and_the_last_holder_wins(tmp_path: Path, same: bool):
    first = compiled()
    second = first if same else compiled(NARROW_POLICY)
    rulesets = [first, second]
    paths = []
    for index, rs in enumerate(rulesets):
        paths.append(tmp_path / f"ruleset-{index}")
        paths[-1].write_text(rs.to_json())
    states = expected_states(rulesets, tmp_path)
    failed: dict[int, list[str]] = {}
    for number in range(ROUNDS):
        ns = fresh_istio_namespace()
        try:
            if number % 3 == 2:
                # A third of the rounds race on top of an installed ruleset (a restart).
                done = subprocess.run(
                    init_command(ns, paths[1]),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert done.returncode == 0, done.stderr
            problems = round_problems(ns, race_round(ns, rulesets, paths), states)
        finally:
            ns.close()
        if problems:
            failed[number] = problems
    assert not failed, f"{len(failed)}/{ROUNDS} rounds went wrong: {failed}"


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
        done = subprocess.run(
            init_command(ns, path),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MESHGUARD_LOCK_TIMEOUT": "2"},
            check=False,
        )
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
        done = subprocess.run(
            init_command(other, path),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MESHGUARD_LOCK_TIMEOUT": "0.5"},
            check=False,
        )
        assert done.returncode == 0, done.stderr
