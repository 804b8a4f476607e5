"""``meshguard describe``: the policy in words, and whether the recorded ruleset is current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

import meshguard

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"


def meshguard_cli(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshguard", *args], input=stdin, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def injected_example() -> dict:
    done = meshguard_cli("inject", "-f", "-", stdin=EXAMPLE.read_text())
    return yaml.safe_load(done.stdout)


def test_describe_an_injected_pod():
    done = meshguard_cli("describe", "-f", "-", stdin=yaml.safe_dump(injected_example()))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Pod demo/shop:" in out
    assert "proxy: uid 1337, gid 1337 — never restricted" in out
    assert "[1] app -> cache port 6379/tcp" in out
    assert (
        "[3] app -> the proxy port 15020/tcp, only POST /quitquitquit (checked per request"
        " by Envoy in the sidecar)" in out  # the default engine: native
    )
    assert "ext_authz" not in out
    assert "default: deny every other loopback flow" in out
    assert "— matches the policy" in out


def test_describe_names_the_engine_that_checks_a_rules_http_conditions():
    example = yaml.safe_load(EXAMPLE.read_text())
    example["metadata"]["annotations"]["meshguard.io/l7-engine"] = "ext-authz"
    done = meshguard_cli("inject", "-f", "-", stdin=yaml.safe_dump(example))
    assert done.returncode == 0, done.stderr
    described = meshguard_cli("describe", "-f", "-", stdin=done.stdout)
    assert "only POST /quitquitquit (checked per request by the ext_authz server)" in (
        described.stdout
    )
    # before admission no engine is recorded: the text does not guess
    before = meshguard_cli("describe", "-f", "-", stdin=EXAMPLE.read_text())
    assert "only POST /quitquitquit (checked per request by the pod's L7 engine)" in (before.stdout)


def test_describe_says_when_the_recorded_ruleset_is_stale():
    """A pod admitted before the admitted record existed: its live policy is all there is."""
    pod = injected_example()
    annotations = pod["metadata"]["annotations"]
    status = json.loads(annotations["meshguard.io/status"])
    del status["admitted"]
    annotations["meshguard.io/status"] = json.dumps(status)
    annotations["meshguard.io/policy"] = "{rules: [], istioPatterns: false}"
    done = meshguard_cli("describe", "-f", "-", stdin=yaml.safe_dump(pod))
    assert "STALE: the policy changed since" in done.stdout
    assert (
        "may connect over loopback (besides each container to its own ports):\n    nothing"
        in done.stdout
    )


def test_a_tampered_pod_is_described_as_admitted_and_exits_4():
    """The live annotations edited after admission: the header says the ADMITTED mode (what
    is enforced), the rules are the admitted ones, the edit is flagged, the exit status 4."""
    pod = injected_example()
    annotations = pod["metadata"]["annotations"]
    annotations["meshguard.io/mode"] = "audit"
    annotations["meshguard.io/policy"] = "rules: []\ndefaultAction: allow"
    done = meshguard_cli("describe", "-f", "-", stdin=yaml.safe_dump(pod))
    assert done.returncode == 4, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].startswith("  mode: enforce  (as admitted; the live annotations were changed")
    assert "TAMPERED" in lines[1]
    assert "[1] app -> cache port 6379/tcp" in done.stdout  # the admitted rules
    assert "default: deny every other loopback flow" in done.stdout
    assert "— matches the policy" in done.stdout
    assert "admitted: TAMPERED — changed after admission: meshguard.io/policy differs" in (
        done.stdout
    )
    data = json.loads(meshguard_cli("describe", "-f", "-", "-o", "json",
                                    stdin=yaml.safe_dump(pod)).stdout)  # fmt: skip
    assert data["mode"] == "enforce"
    assert data["admitted"]["state"] == "changed"
    assert data["admitted"]["mode"] == "enforce"
    assert data["defaultAction"] == "deny"


def test_a_forged_admitted_record_is_tampered_and_exits_4():
    pod = injected_example()
    annotations = pod["metadata"]["annotations"]
    status = json.loads(annotations["meshguard.io/status"])
    status["admitted"]["mode"] = "audit"
    annotations["meshguard.io/status"] = json.dumps(status)
    annotations["meshguard.io/mode"] = "audit"
    done = meshguard_cli("describe", "-f", "-", stdin=yaml.safe_dump(pod))
    assert done.returncode == 4, done.stderr
    assert "the admitted record does not verify: TAMPERED" in done.stdout.splitlines()[1]
    assert "digest mismatch" in done.stdout


def test_describe_explains_what_cannot_be_enforced_and_bad_policies():
    pod = yaml.safe_load(EXAMPLE.read_text())
    del pod["spec"]["containers"][1]["securityContext"]["runAsUser"]
    done = meshguard_cli("describe", "-f", "-", stdin=yaml.safe_dump(pod))
    assert "cannot be enforced as written: container 'log-shipper' has no runAsUser" in done.stdout
    assert "status: not injected by meshguard yet" in done.stdout
    pod["metadata"]["annotations"]["meshguard.io/policy"] = "rules: [{from: app}]"
    bad = meshguard_cli("describe", "-f", "-", stdin=yaml.safe_dump(pod))
    assert bad.returncode == 1
    assert "error: meshguard.io/policy: rules[0].to: got nothing" in bad.stdout


def test_describe_says_what_passes_through_the_pods_own_service():
    pod = yaml.safe_load(EXAMPLE.read_text())
    done = meshguard_cli("describe", "-f", "-", stdin=yaml.safe_dump(pod))
    assert "(the proxy dialing the pod): refused (no port is open to every container)" in (
        done.stdout
    )
    policy = yaml.safe_load(pod["metadata"]["annotations"]["meshguard.io/policy"])
    policy["rules"].append({"from": "*", "to": "app", "ports": [8080]})
    pod["metadata"]["annotations"]["meshguard.io/policy"] = yaml.safe_dump(policy)
    done = meshguard_cli("describe", "-f", "-", stdin=yaml.safe_dump(pod))
    assert "(the proxy dialing the pod): only ports open to every container: 8080" in done.stdout
    assert "only the proxy sends from them" in done.stdout
