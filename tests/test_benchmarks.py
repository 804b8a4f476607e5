"""The benchmarks' declarations hold together: the harness's round order, two Envoys per L7
configuration the app dials (a trial charged to the one that served it), no authorization
as the native listener minus its decisions, the L7 goal, the kernel configurations'
rulesets, and the size the benchmarks may take. No timing here: the figures are the
benchmarks' job."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
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
from benchmarks.l7.bench import FULL, QUICK, HttpTrial
from benchmarks.l7.envoys import (
    CONCURRENCY,
    CONFIGS,
    ENVOYS,
    GRPC_SERVERS,
    LISTENER_PORT,
    NATIVE_GOAL,
    UPSTREAM_PORT,
    envoy_configs,
    envoy_document,
    write_mesh_certificates,
)
from benchmarks.l7.summary import http_summary
from benchmarks.suite.l7 import _engines
from benchmarks.suite.report import Report
from meshguard.authz.envoy_config import denied_filter
from meshguard.sandbox.envoy import envoy_binary


def test_rounds_alternate_at_both_levels() -> None:
    order = list(schedule(2, (1, 8), ("a", "b", "c")))
    assert order == [
        (0, 1, "a"), (0, 1, "b"), (0, 1, "c"), (0, 8, "c"), (0, 8, "b"), (0, 8, "a"),
        (1, 8, "c"), (1, 8, "b"), (1, 8, "a"), (1, 1, "a"), (1, 1, "b"), (1, 1, "c"),
    ]  # fmt: skip
    assert alternating((1, 2, 3), 1) == (3, 2, 1)


def test_every_l7_configuration_has_its_own_envoys(tmp_path: Path) -> None:
    """Two processes per configuration the app dials ((c) is reached by REDIRECT: one),
    on ports of their own; each bootstrap listens and answers admin where declared."""
    by_key = {c.key: c for c in CONFIGS}
    assert {"a", "r", "b", "n", "n0", "nd", "c", "c0"} <= set(by_key)
    assert {c.key: c.instances for c in CONFIGS if c.instances != 2} == {"c": 1}
    ports = [c.listener_port(i) for c, i in ENVOYS if c.key != "c"]
    ports += [c.admin(i) for c, i in ENVOYS]
    ports += [LISTENER_PORT, UPSTREAM_PORT, 15021, *(s.port for s in GRPC_SERVERS.values())]
    assert len(set(ports)) == len(ports)
    for config in CONFIGS:  # the full profile's rounds: each instance alike, in both orders
        used = Counter((config.instance_of(r), r % 2) for r in range(FULL.rounds))
        assert set(used) == {(i, o) for i in range(config.instances) for o in (0, 1)}
        assert len(set(used.values())) == 1
    assert [CONFIGS[0].instance_of(r) for r in range(QUICK.rounds)] == [0, 1]
    certs = write_mesh_certificates(tmp_path / "certs")
    documents = {
        (c.key, i): envoy_document(c, i, tmp_path, certs) for c, i in ENVOYS
    }  # fmt: skip
    for (key, instance), document in documents.items():
        config = by_key[key]
        listener = document["static_resources"]["listeners"][0]  # (c): and IPv6
        port = listener["address"]["socket_address"]["port_value"]
        assert port == (15007 if key == "c" else config.listener_port(instance))
        assert document["admin"]["address"]["socket_address"]["port_value"] == config.admin(
            instance
        )
        if key in {"n", "n0", "nd"}:  # each native listener's RBAC grants its own port
            rbac = (tmp_path / f"rbac-{config.process(instance)}.json").read_text()
            assert str(port) in rbac and str(config.listener_port(1 - instance)) not in rbac
    assert documents["a", 0] != documents["a", 1]


def test_no_authorization_is_the_native_listener_minus_its_decisions(tmp_path: Path) -> None:
    """(a) differs from (n) only by (n)'s decision filters and access log; (r) is Envoy's
    router without meshguard's routing; (nd) logs what the denied filter selects."""
    by_key = {c.key: c for c in CONFIGS}
    certs = write_mesh_certificates(tmp_path / "certs")
    a, n, n0, nd, r = (envoy_document(by_key[k], 0, tmp_path, certs)
                       for k in ("a", "n", "n0", "nd", "r"))  # fmt: skip
    hcm_a, hcm_n = _hcm(a), _hcm(n)
    assert hcm_a["http_filters"] == hcm_n["http_filters"][-1:] != hcm_n["http_filters"]
    assert hcm_a["access_log"] == [] != hcm_n["access_log"]
    listener_a, listener_n = _listener(a), _listener(n)
    assert listener_a["listener_filters"] == listener_n["listener_filters"] != []
    assert a["static_resources"]["clusters"] == n["static_resources"]["clusters"]
    assert {k: v for k, v in hcm_a.items() if k not in {"http_filters", "access_log"}} == {
        **{k: v for k, v in hcm_n.items() if k not in {"http_filters", "access_log"}},
        "stat_prefix": "no_authz_ipv4",
    }
    assert "listener_filters" not in _listener(r) and len(_hcm(r)["http_filters"]) == 1
    assert r["static_resources"]["clusters"][0]["type"] == "STATIC"
    assert _hcm(n0)["access_log"] == []
    assert "filter" not in hcm_n["access_log"][0]
    assert _hcm(nd)["access_log"][0]["filter"] == denied_filter()
    names = [[f["name"] for f in _hcm(d)["http_filters"]] for d in (n, nd)]
    assert names[0] == names[1] and len(names[0]) == 3


def test_envoy_accepts_every_l7_bootstrap(tmp_path: Path) -> None:
    """The real Envoy validates each process's bootstrap (a field or enum value its version
    refuses would stop that Envoy, and the benchmark, at startup)."""
    configs = envoy_configs(tmp_path, write_mesh_certificates(tmp_path / "certs"))
    assert sorted(configs) == sorted(c.process(i) for c, i in ENVOYS)
    refused = {}
    for name, path in configs.items():
        argv = [str(envoy_binary()), "--mode", "validate", "-c", str(path), "-l", "error"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            refused[name] = (done.stdout + done.stderr)[-600:]
    assert refused == {}


def _listener(document: dict[str, Any]) -> dict[str, Any]:
    (listener,) = document["static_resources"]["listeners"]
    return dict(listener)


def _hcm(document: dict[str, Any]) -> dict[str, Any]:
    return dict(_listener(document)["filter_chains"][0]["filters"][0]["typed_config"])


def test_a_trial_charges_the_envoy_instance_that_served_it() -> None:
    config = next(c for c in CONFIGS if c.key == "n")
    cpu = {"envoy_n@0": 0.5, "envoy_n@1": 0.01, "busy": 1.0}
    assert config.served(cpu, 1) == {"envoy_n": 0.01, "envoy_n@0": 0.5, "busy": 1.0}
    assert config.served(cpu, 0) == {"envoy_n": 0.5, "envoy_n@1": 0.01, "busy": 1.0}


def test_the_l7_goal_is_native_against_no_authorization() -> None:
    speed = {"a": 1000.0, "r": 1100.0, "n": 950.0, "n0": 980.0, "nd": 960.0, "c": 200.0}
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
    assert summary["ratios"]["nd/a"] == {c: pytest.approx(0.96) for c in CONCURRENCY}
    assert summary["ratios"]["b/r"] == {c: pytest.approx(500 / 1100) for c in CONCURRENCY}
    assert summary["ratios"]["a/r"] == {c: pytest.approx(1000 / 1100) for c in CONCURRENCY}
    assert "b/a" not in summary["ratios"] and "goal_c_over_b" not in summary
    document = json.loads(json.dumps({"http": summary, "profile": {"rounds": 1, "name": "t"}}))
    lines = _engines(Report(), document)
    for label in ("(n0) native, no decision log", "(nd) native, denials logged",
                  "(r) Envoy router alone"):  # fmt: skip
        assert any(line.startswith(f"| {label} | 64 |") for line in lines)
    (cost,) = [line for line in lines if "What the decision log line costs" in line]
    assert "(nd)/(a): c=1: 0.96" in cost
    assert any("(a)/(r): c=1: 0.91" in line for line in lines)


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
