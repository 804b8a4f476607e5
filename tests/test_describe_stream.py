"""``meshguard describe``/``unprotected`` over manifests as an operator feeds them: the
cluster-wide audit ``kubectl get pods -A -o yaml | meshguard describe -f - ...`` of any size
(streamed, bounded memory: 10,000 pods), ``-f`` repeated and directories (as kubectl takes
them), and ``-o json`` that jq queries."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.manifests import MAX_MANIFEST_BYTES

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
ISTIO_STATUS = json.dumps(
    {
        "initContainers": ["istio-init"],
        "containers": ["istio-proxy"],
        "volumes": ["istio-envoy"],
        "imagePullSecrets": None,
        "revision": "default",
    }
)
#: Runs meshguard's CLI and writes its peak RSS (KiB) on the last line of stderr: VmHWM, the
#: process's own peak (getrusage's ru_maxrss is carried across fork and exec on Linux, so a
#: child of a large pytest would start at pytest's size and every difference would be 0).
WITH_RSS = """
import sys
from meshguard.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
with open("/proc/self/status") as status:
    peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
print(f"maxrss={peak}", file=sys.stderr)
sys.exit(code)
"""


def kubectl_pods(count: int, *, unprotected_every: int = 1000) -> str:
    """``kubectl get pods -A -o yaml`` of ``count`` Istio-injected pods (about 1.1 KB each,
    as kubectl writes them), one in ``unprotected_every`` without meshguard."""
    pad = "x" * 600  # the rest of a real pod's metadata (managedFields, ownerReferences...)
    lines = ["apiVersion: v1", "items:"]
    for index in range(count):
        protected = index % unprotected_every != 0
        lines += [
            "- apiVersion: v1",
            "  kind: Pod",
            "  metadata:",
            "    annotations:",
            f"      sidecar.istio.io/status: '{ISTIO_STATUS}'",
            f"      example.com/pad: {pad}",
            *(["      meshguard.io/status: '{}'"] if protected else []),
            f"    name: pod-{index}",
            f"    namespace: ns-{index % 7}",
            "  spec:",
            "    containers:",
            "    - {name: app, image: 'shop:1', ports: [{containerPort: 8080}]}",
            "    - {name: istio-proxy, image: proxyv2}",
        ]
    lines += ["kind: List", "metadata:", '  resourceVersion: ""', ""]
    return "\n".join(lines)


def run_measured(*argv: str, stdin: str) -> tuple[subprocess.CompletedProcess[str], int]:
    done = subprocess.run(
        [sys.executable, "-c", WITH_RSS, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    last = done.stderr.splitlines()[-1]
    assert last.startswith("maxrss="), done.stderr
    return done, int(last.removeprefix("maxrss="))


def meshguard_cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshguard", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_cluster_wide_audit_of_10000_pods_streams_in_bounded_memory():
    """11 MB of ``kubectl get pods -A -o yaml`` (past the 8 MiB that ended the audit at
    about 700 real pods): every pod judged, and peak memory as for 1,000 pods."""
    large = kubectl_pods(10_000)
    assert len(large) > MAX_MANIFEST_BYTES
    argv = ("unprotected", "-f", "-", "--fail-on-unprotected")
    done, rss_large = run_measured(*argv, stdin=large)
    assert done.returncode == 3, done.stderr
    *flagged, summary = done.stdout.splitlines()
    assert summary.startswith("UNPROTECTED: 10 of 10000 pod(s) with Istio's sidecar")
    assert sorted(line.partition(":")[0] for line in flagged) == sorted(
        f"Pod ns-{i % 7}/pod-{i}" for i in range(0, 10_000, 1000)
    )
    small, rss_small = run_measured(*argv, stdin=kubectl_pods(1_000))
    assert small.returncode == 3, small.stderr
    # 10 MB more input; holding it (the old read) costs several times that in objects
    assert rss_large - rss_small < 16 * 1024, (rss_small, rss_large)


def injected_pod(name: str, namespace: str = "shop") -> dict[str, Any]:
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"].update(name=name, namespace=namespace)
    return pod


def admitted(pod: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings())
    return pod


def test_every_f_is_read_in_order_and_directories_as_kubectl_reads_them(tmp_path: Path):
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(yaml.safe_dump(injected_pod("one")))
    second.write_text(yaml.safe_dump(injected_pod("two")))
    done = meshguard_cli("unprotected", "-f", str(first), "-f", str(second))
    assert done.stdout.splitlines()[:2] == [
        "Pod shop/one: " + done.stdout.splitlines()[0].partition(": ")[2],
        "Pod shop/two: " + done.stdout.splitlines()[1].partition(": ")[2],
    ]
    assert "UNPROTECTED: 2 of 2 pod(s)" in done.stdout
    directory = tmp_path / "manifests"
    (directory / "nested").mkdir(parents=True)
    (directory / "b.json").write_text(json.dumps(injected_pod("b")))
    (directory / "a.yml").write_text(yaml.safe_dump(injected_pod("a")))
    (directory / "notes.txt").write_text("not a manifest: [")
    (directory / "nested" / "c.yaml").write_text(yaml.safe_dump(injected_pod("c")))
    names = [
        line.partition(":")[0]
        for line in meshguard_cli("unprotected", "-f", str(directory)).stdout.splitlines()[:-1]
    ]
    assert names == ["Pod shop/a", "Pod shop/b"]
    recursive = meshguard_cli("unprotected", "-R", "-f", str(directory), "-f", str(first))
    names = [line.partition(":")[0] for line in recursive.stdout.splitlines()[:-1]]
    assert names == ["Pod shop/a", "Pod shop/b", "Pod shop/c", "Pod shop/one"]


def test_stdin_twice_and_an_empty_directory_are_clear_errors(tmp_path: Path):
    done = meshguard_cli("describe", "-f", "-", "-f", "-")
    assert done.returncode == 2
    assert "stdin (-) can be read only once" in done.stderr
    done = meshguard_cli("describe", "-f", str(tmp_path))
    assert done.returncode == 2
    assert f"{tmp_path}: no .json, .yaml, .yml file in this directory" in done.stderr


def test_bad_yaml_after_good_pods_names_the_file_and_document(tmp_path: Path):
    source = tmp_path / "pods.yaml"
    source.write_text(yaml.safe_dump(injected_pod("one")) + "---\nkind: [\n")
    done = meshguard_cli("describe", "-f", str(source))
    assert done.returncode == 2
    assert f"meshguard describe: {source}: not valid YAML" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_namespace_after_its_pods_still_opts_them_out():
    """``kubectl get pods,namespaces -A -o yaml`` puts the Namespaces last."""
    opted = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "legacy", "labels": {"meshguard.io/inject": "disabled"}},
    }
    listing = {
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {},
        "items": [injected_pod("old", "legacy"), injected_pod("new"), opted],
    }
    done = meshguard_cli(
        "unprotected", "-f", "-", "--fail-on-unprotected", stdin=yaml.safe_dump(listing)
    )
    assert done.returncode == 3
    assert done.stdout.splitlines()[-1] == (
        "UNPROTECTED: 1 of 2 pod(s) with Istio's sidecar have no meshguard, 1 opted out:"
        " Pod shop/new"
    )


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_jq_queries_the_json_output():
    pods = [admitted(injected_pod("protected")), injected_pod("unprotected")]
    stream = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": pods})
    described = meshguard_cli("describe", "-f", "-", "-o", "json", stdin=stream)
    assert described.returncode == 0, described.stderr

    def jq(program: str) -> list[Any]:
        done = subprocess.run(
            ["jq", "-c", program],
            input=described.stdout,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return [json.loads(line) for line in done.stdout.splitlines()]

    assert jq('select(.protection == "unprotected") | .pod.name') == ["unprotected"]
    assert jq('select(.protection == "protected") | [.mode, .admitted.state, .status.state]') == [
        ["enforce", "as-admitted", "current"]
    ]
    assert jq('select(.pod.name == "protected") | .containers[] | [.name, .uid]') == [
        ["app", 1000],
        ["log-shipper", 1001],
        ["cache", 1002],
    ]
    # The policy's own rule to the proxy, then Istio's app<->sidecar patterns (istioPatterns).
    to_proxy = 'select(.pod.name == "protected") | .rules[] | select(.to == "proxy")'
    assert jq(f"{to_proxy} | [.sources, .ports, .http]") == [
        [["app"], [15020], {"methods": ["POST"], "paths": ["/quitquitquit"], "headers": {}}],
        [["*"], [15021], {"methods": ["GET"], "paths": ["/healthz/ready"], "headers": {}}],
        [["*"], [15020], {"methods": ["POST"], "paths": ["/quitquitquit"], "headers": {}}],
    ]
    assert jq('select(.pod.name == "protected") | .postureChanges | length') == [0]
    assert jq("[.apiVersion, .kind]") == [["describe.meshguard.io/v1alpha1", "PodDescription"]] * 2


def test_the_yaml_output_is_a_stream_of_the_json_documents():
    pods = [admitted(injected_pod("a")), injected_pod("b")]
    stream = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": pods})
    as_json = meshguard_cli("describe", "-f", "-", "-o", "json", stdin=stream)
    as_yaml = meshguard_cli("describe", "-f", "-", "-o", "yaml", stdin=stream)
    documents = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert list(yaml.safe_load_all(as_yaml.stdout)) == documents
    assert "—" in as_yaml.stdout  # text as written, not escaped


def test_f_cannot_be_combined_with_the_cluster_flags():
    done = meshguard_cli("describe", "-f", str(EXAMPLE), "-n", "shop")
    assert done.returncode == 2
    assert "-f reads manifests, not the cluster: --namespace cannot be combined" in done.stderr


@pytest.mark.parametrize("command", ["rules", "inject"])
def test_the_other_manifest_commands_read_every_f_too(command: str, tmp_path: Path):
    first, directory = tmp_path / "first.yaml", tmp_path / "more"
    directory.mkdir()
    first.write_text(yaml.safe_dump(injected_pod("one")))
    (directory / "two.yaml").write_text(yaml.safe_dump(injected_pod("two")))
    done = meshguard_cli(command, "-f", str(first), "-f", str(directory))
    assert done.returncode == 0, done.stderr
    assert "shop/one" in done.stdout or "name: one" in done.stdout
    assert "shop/two" in done.stdout or "name: two" in done.stdout


def test_kubectl_get_o_json_is_read_as_well():
    """``kubectl get pods -A -o json`` (one JSON object, its items streamed the same way)."""
    listing = {
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": [injected_pod("a"), admitted(injected_pod("b"))],
    }
    done = meshguard_cli("unprotected", "-f", "-", stdin=json.dumps(listing, indent=4))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "UNPROTECTED: 1 of 2 pod(s) with Istio's sidecar have no meshguard: Pod shop/a"
    )
