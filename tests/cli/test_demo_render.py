"""The demo's text within a terminal's width: the matrix splits, never truncates.

Pure rendering (no root): the flows the demo plans for a pod, each observed as expected or
not, rendered at a given width and read back.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

import meshguard
from meshguard.cli.demo import render
from meshguard.pod import read_pod
from meshguard.policy import parse_policy
from meshguard.sandbox.demo import Outcomes
from meshguard.sandbox.flows import Flow, plan

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"


def flows_of(pod: dict[str, Any]) -> tuple[Flow, ...]:
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    return plan(view, parse_policy(pod["metadata"]["annotations"]["meshguard.io/policy"])).flows


def example() -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return pod


def crowded() -> dict[str, Any]:
    """The example with six more containers, each with two ports: a matrix of 22 columns."""
    pod = example()
    for index in range(6):
        pod["spec"]["containers"].append(
            {
                "name": f"worker-number-{index}",
                "image": "example.com/worker:1",
                "ports": [{"containerPort": 7000 + index}, {"containerPort": 17000 + index}],
                "securityContext": {"runAsUser": 2000 + index, "runAsGroup": 2000 + index},
            }
        )
    return pod


def text(outcomes: Outcomes, width: int) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=width, highlight=False, color_system=None)
    render(outcomes, label="Pod demo/shop", console=console)
    return out.getvalue().splitlines()


def as_expected(flows: tuple[Flow, ...]) -> Outcomes:
    return Outcomes(tuple((flow, flow.expected) for flow in flows))


def matrix_cells(lines: list[str]) -> int:
    """Marks in the matrices' rows (a row starts with a container's name)."""
    rows = [line for line in lines if re.match(r"│ [a-z][\w-]* +│", line)]
    return sum(len(re.findall(r"[✓✗]", line.split("│", 2)[2])) for line in rows)


@pytest.mark.parametrize("pod", [example, crowded])
@pytest.mark.parametrize("width", [80, 100, 240])
def test_nothing_is_truncated_and_every_flow_is_shown(pod, width):
    flows = flows_of(pod())
    lines = text(as_expected(flows), width)
    assert max(len(line) for line in lines) <= width
    assert not any("…" in line for line in lines)
    l4 = [f for f in flows if f.kind == "l4"]
    assert matrix_cells(lines) == len(l4)
    for flow in l4:  # every destination port has its column header somewhere
        assert any(re.search(rf"│\s*{flow.port}u?\s*│", line) for line in lines), flow.port


def test_the_example_fits_one_table_per_family_at_80_columns():
    lines = text(as_expected(flows_of(example())), 80)
    titles = [line.rstrip() for line in lines if line.startswith("Loopback connectivity")]
    assert titles == ["Loopback connectivity, ipv4", "Loopback connectivity, ipv6"]
    header = next(i for i, line in enumerate(lines) if line.startswith("┌")) + 1
    assert "log-" in lines[header] and "shipper" in lines[header + 1]  # a narrow column


def test_a_wide_matrix_is_split_into_parts_that_each_fit():
    lines = text(as_expected(flows_of(crowded())), 80)
    titles = [line.rstrip() for line in lines if line.startswith("Loopback connectivity, ipv4")]
    assert len(titles) > 1
    assert titles[0] == f"Loopback connectivity, ipv4, part 1 of {len(titles)}"


def test_a_flow_that_differs_from_the_policy_is_marked_and_says_what_was_expected():
    flows = flows_of(example())
    l4 = next(f for f in flows if f.kind == "l4" and f.expected == "deny")
    mesh = next(f for f in flows if f.kind == "mesh")
    observed = {l4: "allow", mesh: "timeout"}
    outcomes = Outcomes(tuple((f, observed.get(f, f.expected)) for f in flows))
    lines = text(outcomes, 80)
    assert any("✓!" in line for line in lines)
    assert any("timeout (expected allow)" in line for line in lines)
    assert lines[-1] == f"{len(flows)} flows tried: 2 differ from the policy"
