"""The ``meshguard`` command line, run as a user runs it (a subprocess of the console entry)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import meshguard
from meshguard.admitted import TamperedError
from meshguard.cli import (
    POSTURE_ACTIONS,
    build_parser,
    exit_status,
    handler,
    handler_specs,
    worst_status,
)
from meshguard.errors import MalformedInputError, MeshguardFailure, RefusedError, UsageError
from meshguard.inject.posture import PostureAction
from meshguard.rules.ruleset import Ruleset
from tests.support.samples import injected_sample_names, interception_none
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


def test_rules_of_pods_the_webhook_leaves_alone_say_so():
    """A gateway gets no rules (skipped, as the webhook skips it); a pod Istio gave no init
    step gets those of an install that protects it, and stderr says which."""
    if not INJECTOR_SAMPLES.is_dir():
        pytest.skip("../shared/istio-injector-samples is absent")
    gateway = meshguard_cli("rules", "-f", str(INJECTOR_SAMPLES / "gateway.yaml.injected"))
    assert (gateway.returncode, gateway.stdout) == (1, "")
    assert "skipped, Istio gateway pod (injection template gateway)" in gateway.stderr
    metadata, spec = interception_none()
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    done = meshguard_cli("rules", "-f", "-", stdin=yaml.safe_dump(pod))
    assert done.returncode == 0, done.stderr
    assert "-A MESHGUARD_LOCAL -j MESHGUARD_DENY" in done.stdout
    assert "Istio gave it no init step (sidecar.istio.io/interceptionMode: NONE)" in done.stderr
    assert "the rules an install with withoutIstioInit node or privileged applies" in done.stderr


@pytest.mark.parametrize("name", injected_sample_names() or ["(../shared absent)"])
def test_rules_on_every_istio_sample_answers_without_crashing(name: str):
    if name.startswith("("):
        pytest.skip("../shared/istio-injector-samples is absent")
    done = meshguard_cli("rules", "-f", str(INJECTOR_SAMPLES / name))
    assert "Traceback" not in done.stderr
    for line in done.stderr.splitlines():
        assert line.startswith(("error: ", "note: ", "warning: ", f"{INJECTOR_SAMPLES / name}: "))
    if done.returncode == 0:
        # Istio's samples set no runAsUser: the rules shown are the pod's as meshguard admits
        # it (a uid per container), and stderr says so, per pod.
        assert "-A MESHGUARD_LOCAL -j MESHGUARD_DENY" in done.stdout
        if name != "only-proxy-container.yaml.injected":
            assert "have no runAsUser; these are the rules of the pod as meshguard" in done.stderr
    else:
        # Istio injected nothing, or the pod breaks Pod Security baseline (a real refusal).
        assert done.returncode == 1
        assert (
            "no Istio-injected pod template" in done.stderr
            or "Pod Security Standards baseline" in done.stderr
        )


def test_rules_on_istio_samples_compile_most_pods_as_admitted():
    if not INJECTOR_SAMPLES.is_dir():
        pytest.skip("../shared/istio-injector-samples is absent")
    # (a gateway gets no rules: test_rules_of_pods_the_webhook_leaves_alone_say_so)
    names = [n for n in injected_sample_names() if n != "gateway.yaml.injected"]
    codes = {n: meshguard_cli("rules", "-f", str(INJECTOR_SAMPLES / n)).returncode for n in names}
    # Was 2 of 19 before meshguard rules compiled kube-inject output as admitted.
    assert sum(code == 0 for code in codes.values()) >= len(names) - 3, codes


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
    assert set(POSTURE_ACTIONS) == {a.value for a in PostureAction}


def test_meshguard_init_does_not_load_the_servers_or_pydantic():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, meshguard.cli, meshguard.cli.init;"
         " print(sorted(m for m in ('pydantic', 'aiohttp', 'grpc', 'yaml') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"


def test_rules_json_with_family_holds_only_that_family():
    done = meshguard_cli("rules", "-f", str(EXAMPLE), "-o", "json", "--family", "ipv4")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert "ipv6" not in document
    assert document["family"] == "ipv4"
    assert "ipv4" in document


def test_rules_yaml_is_the_json_document_as_yaml():
    as_json = meshguard_cli("rules", "-f", str(EXAMPLE), "-o", "json")
    as_yaml = meshguard_cli("rules", "-f", str(EXAMPLE), "-o", "yaml")
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert yaml.safe_load(as_yaml.stdout) == json.loads(as_json.stdout)
    only6 = meshguard_cli("rules", "-f", str(EXAMPLE), "-o", "yaml", "--family", "ipv6")
    assert set(yaml.safe_load(only6.stdout)) >= {"ipv6", "family"}
    assert "ipv4" not in yaml.safe_load(only6.stdout)


@pytest.mark.parametrize("command", ["rules", "describe", "inject"])
def test_non_utf8_input_is_a_clear_error(command: str):
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", command, "-f", "-"],
        input=b"\xff\xfe{}",
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert f"meshguard {command}: stdin: not UTF-8 text (byte 0xff at offset 0)" in stderr


def test_non_utf8_file_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"kind: Pod\nmetadata: {name: \xe9}\n")
    done = meshguard_cli("describe", "-f", str(bad))
    assert done.returncode == 2
    assert f"cannot read {bad}: not UTF-8 text (byte 0xe9" in done.stderr


@pytest.mark.parametrize("command", ["rules", "describe", "inject"])
def test_a_closed_pipe_ends_the_command_quietly(command: str):
    pods = {"kind": "List", "items": [yaml.safe_load(EXAMPLE.read_text()) for _ in range(200)]}
    process = subprocess.Popen(
        [sys.executable, "-m", "meshguard", command, "-f", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin and process.stdout and process.stderr
    process.stdin.write(yaml.safe_dump(pods).encode())
    process.stdin.close()
    process.stdout.readline()
    process.stdout.close()  # `| head -1`
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in stderr
    assert "BrokenPipe" not in stderr


def test_describe_output_json_and_yaml():
    as_json = meshguard_cli("describe", "-f", str(EXAMPLE), "-o", "json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["kind"] == "PodDescription"
    assert data["pod"] == {"kind": "Pod", "namespace": "demo", "name": "shop"}
    assert data["protection"] == "unprotected"
    assert [c["name"] for c in data["containers"]] == ["app", "log-shipper", "cache"]
    as_yaml = meshguard_cli("describe", "-f", str(EXAMPLE), "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout) == data


def test_inject_output_json_is_the_yaml_documents():
    stream = istio_injected_example()
    as_yaml = meshguard_cli("inject", "-f", "-", stdin=stream)
    as_json = meshguard_cli("inject", "-f", "-", "-o", "json", stdin=stream)
    assert as_json.returncode == 0, as_json.stderr
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == list(
        yaml.safe_load_all(as_yaml.stdout)
    )


def istio_injected_example() -> str:
    return EXAMPLE.read_text()


def test_policy_keywords_are_case_insensitive():
    pod = yaml.safe_load(EXAMPLE.read_text())
    annotations = pod["metadata"]["annotations"]
    annotations["meshguard.io/policy"] = (
        "defaultAction: Deny\nrules: [{from: app, to: cache, ports: [6379], protocol: TCP}]"
    )
    annotations["meshguard.io/mode"] = "Enforce"
    upper = meshguard_cli("rules", "-f", "-", "-o", "json", stdin=yaml.safe_dump(pod))
    assert upper.returncode == 0, upper.stderr
    annotations["meshguard.io/policy"] = (
        "defaultAction: deny\nrules: [{from: app, to: cache, ports: [6379], protocol: tcp}]"
    )
    annotations["meshguard.io/mode"] = "enforce"
    lower = meshguard_cli("rules", "-f", "-", "-o", "json", stdin=yaml.safe_dump(pod))
    assert upper.stdout == lower.stdout


def test_a_rule_opening_envoy_admin_port_warns():
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"]["annotations"]["meshguard.io/policy"] = (
        "rules: [{from: app, to: proxy, ports: [15000]}]"
    )
    done = meshguard_cli("rules", "-f", "-", stdin=yaml.safe_dump(pod))
    assert done.returncode == 0, done.stderr
    assert (
        "warning: Pod demo/shop: rules[0]: opens the proxy's port 15000 to app — Envoy's admin"
        " API" in done.stderr
    )


def test_help_shows_defaults():
    done = meshguard_cli("serve-webhook", "--help")
    text = " ".join(done.stdout.split())
    assert "(default: 9443)" in text
    assert "(default: 5.0)" in text
    rules = " ".join(meshguard_cli("rules", "--help").stdout.split())
    assert "(default: text)" in rules


def test_every_subcommand_handler_resolves():
    specs = handler_specs(build_parser())
    assert {"rules", "init", "inject", "describe", "demo", "completion"} <= set(specs)
    for name, spec in specs.items():
        assert callable(handler(spec)), name


def test_exit_status_comes_from_the_error_class():
    assert exit_status(MalformedInputError("x")) == 2
    assert exit_status(TamperedError("x")) == 2
    assert exit_status(UsageError("x")) == 2
    assert exit_status(RefusedError("x")) == 1
    assert exit_status(MeshguardFailure("x")) == 1
    assert exit_status(ValueError("x")) == 1
    assert worst_status([RefusedError("a"), MalformedInputError("b")]) == 2
    assert worst_status([]) == 0


def test_a_bad_flag_value_exits_2():
    done = meshguard_cli("describe", "-f", str(EXAMPLE), "--opt-out-label", "nolabel")
    assert done.returncode == 2
    assert "meshguard describe: --opt-out-label: expected KEY=VALUE" in done.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_completes_commands_and_choices(shell: str):
    done = meshguard_cli("completion", shell)
    assert done.returncode == 0, done.stderr
    if shell == "zsh":
        assert done.stdout.startswith("autoload -U +X bashcompinit && bashcompinit\n")
        return
    script = done.stdout

    def complete(*words: str) -> list[str]:
        line = " ".join(["meshguard", *words])
        probe = (
            f"{script}\nCOMP_WORDS=(meshguard {' '.join(words)}); COMP_CWORD={len(words)};"
            f" COMP_LINE={line!r}; _meshguard; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        )
        out = subprocess.run(
            ["bash", "-c", probe], capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout.split()

    assert {"rules", "describe", "inject", "completion"} <= set(complete(""))
    assert complete("ru") == ["rules"]
    assert complete("rules", "-o", "") == ["text", "json", "yaml"]
    assert "--family" in complete("rules", "--fa")
    assert complete("inject", "--posture-action", "") == ["fix", "deny", "report"]


def native_example() -> str:
    """The example pod as Istio injects it in native nftables mode."""
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod["spec"]["initContainers"][0]["args"].append("--native-nftables")
    return yaml.safe_dump(pod)


@pytest.mark.parametrize(
    ("native", "flags", "form"),
    [
        (False, (), "iptables"),
        (True, (), "nftables"),
        (False, ("--backend", "nftables"), "nftables"),
        (True, ("--backend", "iptables"), "iptables"),
    ],
)
def test_rules_prints_the_form_of_the_pods_backend_or_the_one_asked(native, flags, form):
    manifest = native_example() if native else EXAMPLE.read_text()
    done = meshguard_cli("rules", "-f", "-", *flags, stdin=manifest)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    if form == "nftables":
        assert "# nftables: nft -f - (one atomic transaction" in out
        assert "table inet meshguard {" in out and "meta skuid vmap {" in out
        assert "*filter" not in out and "COMMIT" not in out
    else:
        assert "*filter" in out and "COMMIT" in out and "-j MESHGUARD_" in out
        assert "table inet" not in out


def test_rules_refuses_an_unknown_backend():
    done = meshguard_cli("rules", "-f", str(EXAMPLE), "--backend", "ebpf")
    assert done.returncode == 2
    assert "invalid choice: 'ebpf'" in done.stderr


@pytest.mark.parametrize("native", [False, True])
def test_describe_says_which_backend_the_pod_uses(native):
    manifest = native_example() if native else EXAMPLE.read_text()
    done = meshguard_cli("describe", "-f", "-", stdin=manifest)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if "netfilter:" in x)
    if native:
        assert "netfilter: native nftables (Istio's init runs --native-nftables)" in line
    else:
        assert "netfilter: iptables, in the variant Istio's capture is in" in line
