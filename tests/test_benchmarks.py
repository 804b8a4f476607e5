"""The benchmarks' declarations hold together: the harness's round order, one Envoy per L7
configuration (the native engine with and without its decision log), the L7 goal, the
kernel configurations' rulesets, and the size the benchmarks may take. No timing here: the
figures are the benchmarks' job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness import alternating, schedule
from benchmarks.kernel.configs import (
    ALL_PAIRS,
    DENIAL_GROUPS,
    ISTIO_MESHGUARD,
    KNOWN_CONFIGS,
    Config,
    parse_configs,
)
from benchmarks.kernel.pod import compile_synthetic
from benchmarks.l7.bench import HttpTrial
from benchmarks.l7.envoys import (
    CONCURRENCY,
    CONFIGS,
    NATIVE_GOAL,
    UPSTREAM_PORT,
    envoy_documents,
    write_mesh_certificates,
)
from benchmarks.l7.summary import http_summary
from benchmarks.suite.l7 import _engines
from benchmarks.suite.report import Report


def test_rounds_alternate_at_both_levels() -> None:
    order = list(schedule(2, (1, 8), ("a", "b", "c")))
    assert order == [
        (0, 1, "a"), (0, 1, "b"), (0, 1, "c"), (0, 8, "c"), (0, 8, "b"), (0, 8, "a"),
        (1, 8, "c"), (1, 8, "b"), (1, 8, "a"), (1, 1, "a"), (1, 1, "b"), (1, 1, "c"),
    ]  # fmt: skip
    assert alternating((1, 2, 3), 1) == (3, 2, 1)


def test_every_l7_configuration_has_its_own_envoy(tmp_path: Path) -> None:
    keys = [c.key for c in CONFIGS]
    assert {"a", "n", "n0", "c", "c0"} <= set(keys)
    for ports in ([c.port for c in CONFIGS], [c.admin_port for c in CONFIGS]):
        assert len(set(ports)) == len(ports)
    documents = envoy_documents(tmp_path, write_mesh_certificates(tmp_path / "certs"))
    assert sorted(documents) == sorted(keys)
    for config in CONFIGS:
        listener = documents[config.key]["static_resources"]["listeners"][0]  # (c): and IPv6
        port = listener["address"]["socket_address"]["port_value"]
        assert port == (config.port if config.port != UPSTREAM_PORT else 15007)
    assert _access_log(documents["n"]) and not _access_log(documents["n0"])
    for key in ("n", "n0"):  # each native listener's RBAC grants its own port
        port = str(next(c.port for c in CONFIGS if c.key == key))
        assert port in (tmp_path / f"rbac-{key}.json").read_text()


def _access_log(document: dict[str, Any]) -> list[Any]:
    (listener,) = document["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    logs: list[Any] = hcm.get("access_log", [])
    return logs


def test_the_l7_goal_is_native_against_no_authorization() -> None:
    speed = {"a": 1000.0, "n": 950.0, "n0": 980.0, "c": 200.0, "c0": 300.0}
    trials = [
        HttpTrial(
            config=config.key, concurrency=c, round=0, requests=1000, errors=0, seconds=1.0,
            per_second=speed.get(config.key, 500.0), p50_us=100.0, p99_us=900.0,
            cpu={"client": 0.01, config.envoy: 0.02, "upstream": 0.01, "busy": 0.05,
                 "sys": 0.0, "softirq": 0.0, "steal": 0.0,
                 **({config.authz: 0.01} if config.authz else {})},
        )
        for config in CONFIGS
        for c in CONCURRENCY
    ]  # fmt: skip
    summary = http_summary(trials)
    assert summary["goal_n_over_a"] == NATIVE_GOAL == 0.90
    assert summary["ratios"]["n/a"] == {c: pytest.approx(0.95) for c in CONCURRENCY}
    assert "goal_c_over_b" not in summary and "goal_c_over_c0" not in summary
    document = json.loads(json.dumps({"http": summary, "profile": {"rounds": 1, "name": "t"}}))
    lines = _engines(Report(), document)
    assert any(line.startswith("| (n0) native, no decision log | 64 |") for line in lines)
    assert any("What the decision log line costs" in line for line in lines)


def test_kernel_configurations_declare_their_rulesets() -> None:
    names = [c.name for c in KNOWN_CONFIGS]
    assert len(set(names)) == len(names)
    assert all(a in KNOWN_CONFIGS and b in KNOWN_CONFIGS for a, b in ALL_PAIRS)
    assert parse_configs(",".join(reversed(names))) == KNOWN_CONFIGS
    variant = Config(name="x", istio=True, meshguard=True, compiler=(("dispatch_fanout", 16),))
    assert variant.ruleset_key != ISTIO_MESHGUARD.ruleset_key
    flat = compile_synthetic(16, flat=True)
    assert compile_synthetic(16, compiler=dict(variant.compiler)).to_json() == flat.to_json()
    assert compile_synthetic(16).to_json() != flat.to_json()


def test_the_denial_path_compares_the_nflog_rule_per_backend() -> None:
    for base, *others in DENIAL_GROUPS:  # no NFLOG rule; the default limit; lifted, twice
        rulesets = [
            compile_synthetic(16, native_nftables=c.nftables, compiler=dict(c.compiler)).to_json()
            for c in (base, *others)
        ]
        assert "4747" not in rulesets[0] and all("4747" in r for r in rulesets[1:])
        assert rulesets[1] != rulesets[2] == rulesets[3]
        assert [c.listener for c in (base, *others)] == [False, True, True, False]
        assert all((base, c) in ALL_PAIRS for c in others)


def test_benchmarks_stay_a_third_of_the_product() -> None:
    """Issue 27: benchmarks/ at most a third of meshguard/'s lines, no benchmark file over
    500 lines (as ``wc -l`` counts them)."""
    root = Path(__file__).resolve().parents[1]

    def lines(path: Path) -> int:
        return path.read_bytes().count(b"\n")

    bench = {str(p.relative_to(root)): lines(p) for p in (root / "benchmarks").rglob("*.py")}
    product = sum(lines(p) for p in (root / "meshguard").rglob("*.py"))
    assert {p: n for p, n in bench.items() if n > 500} == {}
    assert sum(bench.values()) * 3 <= product, (sum(bench.values()), product)
