"""``kubectl meshguard`` (the ``kubectl-meshguard`` executable) and ``meshguard describe`` /
``unprotected`` against a live API server, reached as kubectl reaches it.

The API server is tests/support/apiserver.py's scripted one over real HTTPS (its own test
CA); the kubeconfig has contexts whose users authenticate with a token, a client certificate
and an exec credential plugin (a script answering an ExecCredential), each with its own
default namespace. The commands run as processes, as an operator runs them; ``kubectl``
itself runs the plugin where it is installed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard.inject.transform import InjectSettings, inject_pod
from tests.support.apiserver import TOKEN, ScriptedApiServer

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
PLUGIN = Path(sys.executable).parent / "kubectl-meshguard"
EXEC_TOKEN = "token-from-the-exec-plugin"
EXEC_PLUGIN = f"""
import json
print(json.dumps({{
    "apiVersion": "client.authentication.k8s.io/v1beta1",
    "kind": "ExecCredential",
    "status": {{"token": "{EXEC_TOKEN}"}},
}}))
"""
# The peak RSS of this process's own memory (VmHWM, kB): not getrusage's ru_maxrss, which
# Linux carries across fork and exec, so a child of a large pytest starts at pytest's size.
WITH_RSS = """
import sys
from meshguard.cli.kubectl import main
code = main(sys.argv[1:])
sys.stdout.flush()
with open("/proc/self/status") as status:
    peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
print(f"maxrss={peak}", file=sys.stderr)
sys.exit(code)
"""


def example_pod(name: str, namespace: str, **labels: str) -> dict[str, Any]:
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"].update(name=name, namespace=namespace, labels=labels)
    return pod


def admitted(pod: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings())
    return pod


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ScriptedApiServer]:
    with ScriptedApiServer(tmp_path) as server:
        server.tokens.add(EXEC_TOKEN)
        server.add_namespace("shop")
        server.add_namespace("legacy", **{"meshguard.io/inject": "disabled"})
        server.add_namespace("other")
        server.put(admitted(example_pod("protected", "shop", app="shop")))
        server.put(example_pod("unprotected", "shop", app="shop"))
        server.put(example_pod("old", "legacy", app="old"))
        server.put(example_pod("elsewhere", "other", app="other"))
        yield server


@pytest.fixture
def kubeconfig(api: ScriptedApiServer, tmp_path: Path) -> Path:
    """Contexts: ``token`` (current, namespace shop), ``certificate`` (legacy), ``exec``
    (other), ``stranger`` (a token the server refuses)."""
    api.issue_client_certificate(tmp_path / "client.crt", tmp_path / "client.key")
    (tmp_path / "exec_plugin.py").write_text(EXEC_PLUGIN)
    exec_user = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "command": sys.executable,
        "args": [str(tmp_path / "exec_plugin.py")],
    }
    users = {
        "token": {"token": TOKEN},
        "certificate": {
            "client-certificate": str(tmp_path / "client.crt"),
            "client-key": str(tmp_path / "client.key"),
        },
        "exec": {"exec": exec_user},
        "stranger": {"token": "not-a-token-the-server-knows"},
    }
    namespaces = {"token": "shop", "certificate": "legacy", "exec": "other", "stranger": "shop"}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "scripted",
                "cluster": {
                    "server": f"https://127.0.0.1:{api.port}",
                    "certificate-authority": str(api.ca_file),
                },
            }
        ],
        "users": [{"name": name, "user": user} for name, user in users.items()],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": "scripted", "user": name, "namespace": namespaces[name]},
            }
            for name in users
        ],
        "current-context": "token",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def plugin(*argv: str, kubeconfig: Path | None = None, env: dict[str, str] | None = None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    environ.pop("KUBECONFIG", None)
    if kubeconfig is not None:
        environ["KUBECONFIG"] = str(kubeconfig)
    environ.update(env or {})
    return subprocess.run(
        [str(PLUGIN), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environ,
    )


def flagged(output: str) -> list[str]:
    return [line.partition(":")[0] for line in output.splitlines() if ": UNPROTECTED" in line]


@pytest.fixture(autouse=True)
def _installed() -> None:
    if not PLUGIN.exists():
        pytest.skip(f"{PLUGIN} is not installed (pip install -e '.[cli]')")


def test_each_context_reaches_the_cluster_with_its_user_and_namespace(
    api: ScriptedApiServer, kubeconfig: Path
):
    """A token (current context), a client certificate, an exec credential plugin: each
    context's default namespace is the one listed."""
    done = plugin("unprotected", kubeconfig=kubeconfig)
    assert done.returncode == 0, done.stderr
    assert flagged(done.stdout) == ["Pod shop/unprotected"]
    done = plugin("unprotected", "--context", "certificate", kubeconfig=kubeconfig)
    assert done.returncode == 0, done.stderr
    assert flagged(done.stdout) == []  # the namespace opted out
    assert "1 opted out" in done.stdout
    done = plugin("unprotected", "--context", "exec", "--kubeconfig", str(kubeconfig))
    assert done.returncode == 0, done.stderr
    assert flagged(done.stdout) == ["Pod other/elsewhere"]
    namespaced = [r.path for r in api.requests if r.path.endswith("/pods")]
    assert namespaced == [f"/api/v1/namespaces/{ns}/pods" for ns in ("shop", "legacy", "other")]


def test_unprotected_across_namespaces_resolves_opt_outs_from_the_live_namespaces(
    api: ScriptedApiServer, kubeconfig: Path
):
    done = plugin("unprotected", "-A", "--fail-on-unprotected", kubeconfig=kubeconfig)
    assert done.returncode == 3, done.stderr
    assert sorted(flagged(done.stdout)) == ["Pod other/elsewhere", "Pod shop/unprotected"]
    assert done.stdout.splitlines()[-1].startswith(
        "UNPROTECTED: 2 of 4 pod(s) with Istio's sidecar have no meshguard, 1 opted out"
    )
    # Pod opt-outs allowed (the default): one LIST, of the namespaces that opted out.
    listed = [r.query["labelSelector"] for r in api.requests if r.path == "/api/v1/namespaces"]
    assert listed == ["meshguard.io/inject=disabled"]


def test_refusing_pod_opt_outs_also_lists_the_exempt_namespaces(
    api: ScriptedApiServer, kubeconfig: Path
):
    done = plugin("unprotected", "-A", "--pod-opt-out", "refuse", kubeconfig=kubeconfig)
    assert done.returncode == 0, done.stderr
    # The exemption (meshguard.io/opt-out=allowed) is read only when pod opt-outs are refused.
    listed = [r.query["labelSelector"] for r in api.requests if r.path == "/api/v1/namespaces"]
    assert listed == ["meshguard.io/inject=disabled", "meshguard.io/opt-out=allowed"]


def test_describe_pod_by_name_selector_and_output(api: ScriptedApiServer, kubeconfig: Path):
    done = plugin("describe", "pod", "protected", "-n", "shop", "-o", "json", kubeconfig=kubeconfig)
    assert done.returncode == 0, done.stderr
    (data,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert data["pod"] == {"kind": "Pod", "namespace": "shop", "name": "protected"}
    assert (data["protection"], data["admitted"]["state"]) == ("protected", "as-admitted")
    as_yaml = plugin("describe", "pods/protected", "-o", "yaml", kubeconfig=kubeconfig)
    assert yaml.safe_load(as_yaml.stdout) == data
    text = plugin("describe", "-l", "app=shop", kubeconfig=kubeconfig)
    assert text.returncode == 0, text.stderr
    assert "Pod shop/protected:" in text.stdout
    assert "Pod shop/unprotected:" in text.stdout
    assert "  mode: enforce" in text.stdout


def test_a_tampered_live_pod_exits_4(api: ScriptedApiServer, kubeconfig: Path):
    pod = admitted(example_pod("edited", "shop"))
    pod["metadata"]["annotations"]["meshguard.io/mode"] = "audit"
    api.put(pod)
    done = plugin("describe", "pod", "edited", kubeconfig=kubeconfig)
    assert done.returncode == 4, done.stderr
    assert done.stdout.splitlines()[1].startswith("  mode: enforce  (as admitted;")


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (
            ["describe", "pod", "missing"],
            1,
            'kubectl meshguard describe: Error from server (NotFound): pods "missing" not found',
        ),
        (
            ["unprotected", "--context", "stranger"],
            1,
            "kubectl meshguard unprotected: error: You must be logged in to the server",
        ),
        (
            ["unprotected", "--context", "nowhere"],
            1,
            'kubectl meshguard unprotected: error: context "nowhere" does not exist',
        ),
        (["describe", "deployment", "shop"], 2, "meshguard describes pods only"),
        (["describe", "pod", "x", "-A"], 2, "cannot be retrieved by name across all namespaces"),
        (["describe", "pod", "x", "-l", "a=b"], 2, "cannot be given with a selector"),
    ],
    ids=["not-found", "unauthorized", "no-context", "not-a-pod", "name-with-A", "name-with-l"],
)
def test_failures_exit_as_kubectl_does(kubeconfig: Path, argv: list[str], code: int, message: str):
    done = plugin(*argv, kubeconfig=kubeconfig)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_the_pods_found_are_described_before_the_one_not_found(kubeconfig: Path):
    done = plugin("describe", "pod", "protected", "missing", "unprotected", kubeconfig=kubeconfig)
    assert done.returncode == 1
    described = [line for line in done.stdout.splitlines() if line.startswith("Pod ")]
    assert described == ["Pod shop/protected:", "Pod shop/unprotected:"]
    assert 'Error from server (NotFound): pods "missing" not found' in done.stderr


def test_a_namespace_that_cannot_be_read_leaves_its_pods_unprotected_with_a_warning(
    api: ScriptedApiServer, kubeconfig: Path
):
    """Without ``get`` on the namespace, its opt-out label is unknown: fail closed."""
    api.put(example_pod("hidden", "ghost"))
    done = plugin("unprotected", "-n", "ghost", "--fail-on-unprotected", kubeconfig=kubeconfig)
    assert done.returncode == 3, done.stderr
    assert flagged(done.stdout) == ["Pod ghost/hidden"]
    assert "cannot read namespace ghost, so its opt-out label is not known" in done.stderr


def test_an_unreachable_server_fails_as_kubectl_does(tmp_path: Path):
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "kubeconfig").write_text(json.dumps(config))
    done = plugin("unprotected", "--kubeconfig", str(tmp_path / "kubeconfig"))
    assert done.returncode == 1
    assert done.stderr.startswith("kubectl meshguard unprotected: Unable to connect to the server")
    assert "Connection refused" in done.stderr
    assert "namespace" not in done.stderr  # no warning first: the failure, once


def test_no_configuration_at_all_is_a_clear_error(tmp_path: Path):
    done = plugin("unprotected", env={"KUBECONFIG": str(tmp_path / "absent")})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "kubectl meshguard unprotected: error:" in done.stderr


def test_in_cluster_configuration_when_there_is_no_kubeconfig(
    api: ScriptedApiServer, tmp_path: Path
):
    """In a pod: the service account's token, CA and namespace (kubectl's fallback)."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN)
    shutil.copy(api.ca_file, account / "ca.crt")
    (account / "namespace").write_text("other")
    code = (
        "import sys; from pathlib import Path; from meshguard import cluster;"
        f" c = cluster.connect(service_account_dir=Path({str(account)!r}));"
        " print(c.namespace);"
        " print([p['metadata']['name'] for p in cluster.list_objects("
        "c, resource='pods', namespace=c.namespace)])"
    )
    environ = {
        **os.environ,
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api.port),
        "KUBECONFIG": str(tmp_path / "none"),
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environ,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["other", "['elsewhere']"]


def compact_pod(index: int) -> dict[str, Any]:
    """An Istio-injected pod as the API server serves it (about 1.6 KB of JSON); one in
    a thousand without meshguard."""
    annotations = {
        "sidecar.istio.io/status": json.dumps({"containers": ["istio-proxy"]}),
        "example.com/pad": "x" * 1200,  # the rest of a real pod's metadata
    }
    if index % 1000:
        annotations["meshguard.io/status"] = "{}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"pod-{index}",
            "namespace": f"ns-{index % 5}",
            "annotations": annotations,
        },
        "spec": {
            "containers": [
                {"name": "app", "image": "shop"},
                {"name": "istio-proxy", "image": "proxyv2"},
            ]
        },
    }


def run_measured(kubeconfig: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], int]:
    environ = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    done = subprocess.run(
        [sys.executable, "-c", WITH_RSS, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=environ,
    )
    last = done.stderr.splitlines()[-1]
    assert last.startswith("maxrss="), done.stderr
    return done, int(last.removeprefix("maxrss="))


def test_10000_pods_are_listed_in_pages_and_judged_in_bounded_memory(
    api: ScriptedApiServer, kubeconfig: Path
):
    argv = ("unprotected", "-A", "--fail-on-unprotected")
    api.put_many(compact_pod(i) for i in range(1_000))
    small, rss_small = run_measured(kubeconfig, *argv)
    assert small.returncode == 3, small.stderr
    api.put_many(compact_pod(i) for i in range(1_000, 10_000))
    api.requests.clear()
    large, rss_large = run_measured(kubeconfig, *argv)
    assert large.returncode == 3, large.stderr
    assert len(flagged(large.stdout)) == 10 + 2  # and the fixture's two
    assert "of 10004 pod(s)" in large.stdout.splitlines()[-1]
    pages = [r.query for r in api.requests if r.path == "/api/v1/pods"]
    assert len(pages) == 10_004 // 500 + 1
    assert all(page["limit"] == "500" for page in pages)
    assert [bool(page.get("continue")) for page in pages] == [False] + [True] * (len(pages) - 1)
    # 14 MB more pods on the wire: the pages keep the peak where it was ...
    assert rss_large - rss_small < 16 * 1024, (rss_small, rss_large)
    # ... where the whole list in one page (as without limit/continue) costs ~55 MB more
    whole, rss_whole = run_measured(kubeconfig, *argv, "--chunk-size", "20000")
    assert whole.stdout == large.stdout
    assert rss_whole - rss_large > 32 * 1024, (rss_large, rss_whole)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_runs_the_plugin_from_path(api: ScriptedApiServer, kubeconfig: Path):
    environ = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PATH": f"{PLUGIN.parent}{os.pathsep}{os.environ['PATH']}",
    }
    listed = subprocess.run(
        ["kubectl", "plugin", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environ,
    )
    assert str(PLUGIN) in listed.stdout, listed.stderr
    done = subprocess.run(
        ["kubectl", "meshguard", "unprotected", "-A"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environ,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(flagged(done.stdout)) == ["Pod other/elsewhere", "Pod shop/unprotected"]
