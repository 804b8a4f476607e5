"""The ``meshguard`` command line, run as a user runs it (a subprocess of the console entry)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import meshguard
from meshguard.cli import POSTURE_ACTIONS
from meshguard.inject.posture import Action
from meshguard.rules.ruleset import Ruleset
from tests.support.samples import injected_sample_names
from tests.support.shared import INJECTOR_SAMPLES

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"


def meshguard_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshguard", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_every_command_and_each_has_help():
    done = meshguard_cli("--help")
    assert done.returncode == 0
    for command in ("rules", "init", "inject", "serve-webhook", "istio-template"):
        assert command in done.stdout
        sub = meshguard_cli(command, "--help")
        assert sub.returncode == 0
        assert "usage: meshguard " + command in sub.stdout


def test_no_command_prints_help_and_exits_2():
    done = meshguard_cli()
    assert done.returncode == 2
    assert "usage: meshguard" in done.stderr


def test_rules_prints_both_payloads_of_the_example():
    done = meshguard_cli("rules", "-f", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("# meshguard ruleset for Pod demo/shop (sha256:")
    assert "# ipv4: iptables-restore --noflush\n*filter\n" in out
    assert "# ipv6: ip6tables-restore --noflush\n*filter\n" in out
    assert out.count("COMMIT") == 4


def test_rules_family_prints_one_payload_that_equals_the_compiled_one():
    done = meshguard_cli("rules", "-f", str(EXAMPLE), "--family", "ipv6")
    as_json = meshguard_cli("rules", "-f", str(EXAMPLE), "-o", "json")
    ruleset = Ruleset.from_json(as_json.stdout)
    payload = "".join(line + "\n" for line in done.stdout.splitlines() if not line.startswith("#"))
    assert payload == ruleset.ipv6.payload()
    assert "*filter" in payload
    assert "iptables-restore --noflush\n" not in done.stdout.replace("ip6tables", "")


def test_rules_reads_stdin_and_multi_document_lists():
    pod = yaml.safe_load(EXAMPLE.read_text())
    other = yaml.safe_load(EXAMPLE.read_text())
    other["metadata"]["name"] = "second"
    stream = yaml.safe_dump_all([{"kind": "List", "items": [pod]}, {"kind": "Service"}, other])
    done = meshguard_cli("rules", "-f", "-", "-o", "json", stdin=stream)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2


def test_rules_on_a_workload_uses_its_pod_template():
    pod = yaml.safe_load(EXAMPLE.read_text())
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "shop", "namespace": "demo"},
        "spec": {"template": {"metadata": pod["metadata"], "spec": pod["spec"]}},
    }
    cronjob = {
        "kind": "CronJob",
        "metadata": {"name": "nightly"},
        "spec": {"jobTemplate": {"spec": {"template": deployment["spec"]["template"]}}},
    }
    done = meshguard_cli("rules", "-f", "-", stdin=yaml.safe_dump_all([deployment, cronjob]))
    assert done.returncode == 0, done.stderr
    assert "# meshguard ruleset for Deployment demo/shop" in done.stdout
    assert "# meshguard ruleset for CronJob nightly" in done.stdout


@pytest.mark.parametrize(
    ("stdin", "code", "message"),
    [
        ("kind: [", 2, "not valid YAML"),
        ("- 1\n- 2\n", 2, "expected a Kubernetes object"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n", 1, "no Istio-injected pod"),
        ("kind: Deployment\nmetadata: {name: x}\nspec: {}\n", 2, "has no pod template"),
    ],
)
def test_rules_bad_input_is_a_clear_error_not_a_traceback(stdin: str, code: int, message: str):
    done = meshguard_cli("rules", "-f", "-", stdin=stdin)
    assert done.returncode == code
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_rules_refused_policy_names_the_pod_annotation_and_field():
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"]["annotations"]["meshguard.io/policy"] = (
        "rules: [{from: app, to: db, ports: [1]}]"
    )
    done = meshguard_cli("rules", "-f", "-", stdin=yaml.safe_dump(pod))
    assert done.returncode == 1
    assert done.stderr.startswith(
        "error: Pod demo/shop: meshguard.io/policy: rules[0].to: got 'db'"
    )


def test_rules_on_a_missing_file():
    done = meshguard_cli("rules", "-f", "/nonexistent.yaml")
    assert done.returncode == 2
    assert "cannot read /nonexistent.yaml" in done.stderr


def test_rules_skips_opted_out_pods_with_a_note():
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"]["annotations"]["meshguard.io/inject"] = "false"
    done = meshguard_cli("rules", "-f", "-", stdin=yaml.safe_dump(pod))
    assert 'note: Pod demo/shop: skipped, opted out (meshguard.io/inject: "false")' in done.stderr


@pytest.mark.parametrize("name", injected_sample_names() or ["(../shared absent)"])
def test_rules_on_every_istio_sample_answers_without_crashing(name: str):
    if name.startswith("("):
        pytest.skip("../shared/istio-injector-samples is absent")
    done = meshguard_cli("rules", "-f", str(INJECTOR_SAMPLES / name))
    assert "Traceback" not in done.stderr
    for line in done.stderr.splitlines():
        assert line.startswith(("error: ", "note: ", "warning: ", f"{INJECTOR_SAMPLES / name}: "))
    if done.returncode == 0:
        # Only pods with nothing but the proxy (a gateway) compile as Istio wrote them.
        assert name in {"gateway.yaml.injected", "only-proxy-container.yaml.injected"}
        assert "-A MESHGUARD_LOCAL -j MESHGUARD_DENY" in done.stdout
    else:
        # Istio's samples set no runAsUser: meshguard must say it cannot tell containers
        # apart, or that Istio injected nothing.
        assert done.returncode == 1
        assert "has no runAsUser" in done.stderr or "no Istio-injected pod template" in done.stderr


def test_init_help_names_the_ruleset_sources():
    done = meshguard_cli("init", "--help")
    text = " ".join(done.stdout.split())
    assert "--ruleset-file" in text
    assert "MESHGUARD_RULESET" in text
    assert "/etc/meshguard/ruleset" in text


def test_rules_json_is_the_document_init_reads():
    done = meshguard_cli("rules", "-f", str(EXAMPLE), "-o", "json")
    document = json.loads(done.stdout)
    assert document["version"] == 1
    assert [s["container"] for s in document["sources"]] == ["app", "cache", "log-shipper"]
    assert document["sources"][0]["ipv4"] == "127.0.100.1"


def test_inject_refusal_writes_nothing_and_says_why():
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod["spec"]["hostNetwork"] = True
    done = meshguard_cli("inject", "-f", "-", stdin=yaml.safe_dump(pod))
    assert done.returncode == 1
    assert done.stdout == ""
    assert "error: Pod demo/shop: meshguard refuses pod shop: pod: spec.hostNetwork" in done.stderr
    assert done.stderr.splitlines()[-1] == "meshguard inject: nothing written, fix the errors above"


def test_inject_deny_mode_refuses_what_fix_mode_patches():
    pod = yaml.safe_load(EXAMPLE.read_text())
    del pod["spec"]["containers"][0]["securityContext"]["runAsUser"]
    fixed = meshguard_cli("inject", "-f", "-", stdin=yaml.safe_dump(pod))
    assert fixed.returncode == 0
    assert "warning: Pod demo/shop: meshguard fixed container 'app'" in fixed.stderr
    denied = meshguard_cli(
        "inject", "-f", "-", "--posture-action", "deny", stdin=yaml.safe_dump(pod)
    )
    assert denied.returncode == 1
    assert "[missing-uid]" in denied.stderr


def test_posture_action_choices_are_the_posture_module_s():
    assert set(POSTURE_ACTIONS) == {a.value for a in Action}


def test_meshguard_init_does_not_load_the_servers_or_pydantic():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, meshguard.cli, meshguard.cli.init;"
         " print(sorted(m for m in ('pydantic', 'aiohttp', 'grpc', 'yaml') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"
