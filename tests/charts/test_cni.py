"""The chart's Istio CNI mode (``cni.enabled``): the node agent DaemonSet, its ServiceAccount
and read-pods-only RBAC, rendered by the real Helm engine and validated against Kubernetes'
schemas; its command line is the real CLI and installs into a node's directories; and a pod
the chart's webhook injects in CNI mode passes Pod Security baseline."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshguard import __version__
from meshguard.attestation import TrustedKeys
from meshguard.cli import build_parser
from meshguard.cli.inject import injection_settings
from meshguard.inject.init_step import WithoutIstioInit
from meshguard.inject.transform import Outcome, inject_pod
from meshguard.manifests import pod_templates
from tests.charts.test_chart import (
    CHART,
    K8S_VERSION,
    NAMESPACE,
    RELEASE,
    container,
    helm,
    kinds,
    notes,
    one,
    render,
)
from tests.support import pss
from tests.support.keys import signing_key_file
from tests.support.samples import NO_INIT_STEP_SHAPES
from tests.support.shared import shared_file

CNI = {"cni": {"enabled": True}}
READ_PODS = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
NO_REPAIR = {"cni": {"enabled": True, "repair": {"enabled": False}}}
SHIM_SOURCE = Path(__file__).resolve().parents[2] / "cni-shim" / "meshguard-cni.c"
INIT_IMAGE = f"ghcr.io/meshguard/meshguard-init:{__version__}"


def daemonset(values: dict[str, Any] | None = None) -> dict[str, Any]:
    return one(render(values or CNI), "DaemonSet", "meshguard-cni-node")


def agent_args(values: dict[str, Any] | None = None) -> Any:
    main = container(daemonset(values))
    assert main["command"] == ["meshguard"]
    return build_parser().parse_args(main["args"])


def cni_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    labels = [o["metadata"]["labels"].get("app.kubernetes.io/component") for o in objects]
    return [o for o, label in zip(objects, labels, strict=True) if label == "cni"]


def test_off_by_default():
    assert cni_objects(render()) == []
    assert "meshguard-cni-node" not in notes()
    assert "rollout status daemonset/meshguard-cni-node" in notes(CNI)


@pytest.mark.parametrize(
    "values",
    [CNI, {"cni": {"enabled": True, "excludeNamespaces": []}}, NO_REPAIR,
     {"cni": {"enabled": True, "agent": {"watchDenials": True}}}],
)  # fmt: skip
def test_every_cni_object_is_valid(values):
    objects = cni_objects(render(values))
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects) == [
        ("ClusterRole", "meshguard-cni"), ("ClusterRoleBinding", "meshguard-cni"),
        ("DaemonSet", "meshguard-cni-node"), ("ServiceAccount", "meshguard-cni"),
    ]  # fmt: skip
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
        cluster_scoped = obj["kind"] in {"ClusterRole", "ClusterRoleBinding"}
        assert (obj["metadata"].get("namespace") == NAMESPACE) != cluster_scoped


def test_rbac_reads_pods_and_deletes_them_only_for_repair():
    role = one(render(CNI), "ClusterRole", "meshguard-cni")
    assert role["rules"] == [  # the default repair mode records events: no write on pods
        READ_PODS, {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]  # fmt: skip
    deleting = {"cni": {"enabled": True, "repair": {"mode": "delete"}}}
    assert one(render(deleting), "ClusterRole", "meshguard-cni")["rules"] == [
        READ_PODS, {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]},
    ]  # fmt: skip
    assert one(render(NO_REPAIR), "ClusterRole", "meshguard-cni")["rules"] == [READ_PODS]


def test_repair_is_on_by_default_and_follows_values():
    args = agent_args()
    assert args.repair_pods and (args.repair_interval, args.repair_per_minute) == (10.0, 10)
    assert args.node_name == ""  # from NODE_NAME, the downward API's node name:
    env = {e["name"]: e for e in container(daemonset())["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    tuned = {"cni": {"enabled": True, "repair": {"intervalSeconds": 30, "maxPerMinute": 3}}}
    args = agent_args(tuned)
    assert (args.repair_interval, args.repair_per_minute) == (30.0, 3)
    args = agent_args(NO_REPAIR)
    assert not args.repair_pods
    assert "NODE_NAME" not in {e["name"] for e in container(daemonset(NO_REPAIR))["env"]}


def test_rbac_for_the_agents_account():
    objects = render(CNI)
    binding = one(objects, "ClusterRoleBinding", "meshguard-cni")
    assert binding["roleRef"]["name"] == "meshguard-cni"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "meshguard-cni", "namespace": NAMESPACE}
    ]
    pod = daemonset()["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "meshguard-cni"
    # the token is what the plugin on the node uses: it must be mounted
    assert one(objects, "ServiceAccount", "meshguard-cni").get("automountServiceAccountToken", True)


def test_the_image_defaults_to_the_slim_init_image():
    assert container(daemonset())["image"] == INIT_IMAGE
    digest = "sha256:" + "b" * 64
    pinned = {**CNI, "init": {"image": {"digest": digest}}}
    assert container(daemonset(pinned))["image"] == f"ghcr.io/meshguard/meshguard-init@{digest}"
    own = {"cni": {"enabled": True, "image": {"repository": "registry.example/agent", "tag": "7"}}}
    assert container(daemonset(own))["image"] == "registry.example/agent:7"


def test_the_command_line_is_the_real_cli_and_follows_values():
    args = agent_args()
    assert args.handler == "meshguard.cli.cni:run_install"
    assert (str(args.cni_conf_dir), str(args.cni_bin_dir)) == ("/host/etc/cni/net.d",
                                                               "/host/opt/cni/bin")  # fmt: skip
    assert args.host_cni_conf_dir == "/etc/cni/net.d"
    assert str(args.plugin_binary) == "/opt/meshguard/cni/meshguard-cni"
    assert args.chain_after == "istio-cni"
    assert args.exclude == [NAMESPACE, "kube-system"]  # its own namespace always
    assert not args.once and not args.keep_on_exit
    assert agent_args({"cni": {"enabled": True, "keepOnExit": True}}).keep_on_exit
    gke = {"cni": {"enabled": True, "binDir": "/home/kubernetes/bin", "confDir": "/etc/cni/x",
                   "excludeNamespaces": ["a", "b"], "timeoutSeconds": 3,
                   "chainAfter": "x"}}  # fmt: skip
    args = agent_args(gke)
    assert (args.host_cni_conf_dir, args.exclude, args.timeout, args.chain_after) == (
        "/etc/cni/x", [NAMESPACE, "a", "b"], 3.0, "x",
    )  # fmt: skip
    volumes = {v["name"]: v for v in daemonset(gke)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cni-bin-dir"]["hostPath"]["path"] == "/home/kubernetes/bin"
    assert volumes["cni-net-dir"]["hostPath"]["path"] == "/etc/cni/x"


def test_the_agents_call_bounds_follow_values():
    args = agent_args()
    assert (args.agent_max_calls, args.agent_call_timeout, args.agent_denials) == (16, 60.0, False)
    tuned = {"cni": {"enabled": True, "agent": {"maxCalls": 4, "callTimeoutSeconds": 20,
                                                "watchDenials": True}}}  # fmt: skip
    args = agent_args(tuned)
    assert (args.agent_max_calls, args.agent_call_timeout, args.agent_denials) == (4, 20.0, True)
    assert args.agent_metrics_port == 9102
    pod = daemonset(tuned)["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9102"
    assert pod["spec"]["containers"][0]["ports"] == [{"name": "metrics", "containerPort": 9102}]
    assert "ports" not in daemonset()["spec"]["template"]["spec"]["containers"][0]


def test_the_pod_mounts_the_cni_directories_and_the_agent_socket_and_holds_istio_cnis_caps():
    spec = daemonset()["spec"]["template"]["spec"]
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {"/etc/cni/net.d", "/opt/cni/bin", "/var/run/meshguard"}
    main = container(daemonset())
    context = main["securityContext"]
    # to run the plugin: setns into a pod's namespace (SYS_ADMIN), iptables there (NET_*)
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN", "NET_ADMIN",
                                                                "NET_RAW"]}  # fmt: skip
    assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    # baseline's objections: exactly the hostPaths and those capabilities (its namespace must
    # be privileged, as istio-cni's)
    annotations = daemonset()["spec"]["template"]["metadata"].get("annotations") or {}
    assert pss.violations(spec, level="baseline", annotations=annotations) == {
        *{("pod", f"hostPath volume {v}") for v in ("cni-bin-dir", "cni-net-dir", "agent-socket")},
        *{("install-cni", f"capability {c}") for c in ("NET_ADMIN", "NET_RAW", "SYS_ADMIN")},
    }
    assert [c["name"] for c in spec["containers"]] == ["install-cni"]
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert mounts == {"/host/opt/cni/bin": "cni-bin-dir", "/host/etc/cni/net.d": "cni-net-dir",
                      "/var/run/meshguard": "agent-socket", "/tmp": "tmp",
                      "/etc/meshguard/trusted-keys": "trusted-keys"}  # fmt: skip
    # the socket where the shim looks for it (compiled in), iptables' lock on the emptyDir
    assert str(agent_args().agent_socket) == "/var/run/meshguard/cni.sock"
    assert '#define DEFAULT_SOCKET "/var/run/meshguard/cni.sock"' in SHIM_SOURCE.read_text()
    assert {"name": "XTABLES_LOCKFILE", "value": "/tmp/xtables.lock"} in main["env"]
    # the readiness probe looks for the agent's ready file
    assert main["readinessProbe"]["exec"]["command"] == ["test", "-e", "/tmp/ready"]
    assert str(agent_args().ready_file) == "/tmp/ready"
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"


def test_the_rendered_command_installs_into_a_nodes_directories(tmp_path: Path):
    """The DaemonSet's args, run as they are with the mounts pointed at a node's dirs (and
    the trusted keys' at the chart's ConfigMap, as the kubelet mounts it: a file per key)."""
    objects = render(CNI)
    keys = one(objects, "ConfigMap", "meshguard-trusted-keys")["data"]
    node = {"/host/etc/cni/net.d": tmp_path / "net.d", "/host/opt/cni/bin": tmp_path / "bin",
            "/etc/meshguard/trusted-keys": tmp_path / "trusted-keys"}  # fmt: skip
    for directory in node.values():
        directory.mkdir()
    for key, text in keys.items():
        (node["/etc/meshguard/trusted-keys"] / key).write_text(text)
    conflist = node["/host/etc/cni/net.d"] / "10-calico.conflist"
    plugins = [{"type": "calico"}, {"type": "istio-cni"}]
    conflist.write_text(json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": plugins}))
    account = tmp_path / "sa"
    account.mkdir()
    (account / "token").write_text("token")
    (account / "ca.crt").write_text("CA")
    shim = tmp_path / "meshguard-cni"
    shim.write_bytes(b"the executable")
    argv = container(one(objects, "DaemonSet", "meshguard-cni-node"))["args"]
    for mount, directory in node.items():
        argv = [a.replace(mount, str(directory)) for a in argv]
    argv = [re.sub(r"^--plugin-binary=.*", f"--plugin-binary={shim}", a) for a in argv]
    argv = [a.replace("/tmp/ready", str(tmp_path / "ready")) for a in argv]
    argv = [a for a in argv if not a.startswith("--agent-socket=")]  # --once serves nothing
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", *argv, "--once", f"--service-account-dir={account}"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "KUBERNETES_SERVICE_HOST": "10.96.0.1",
             "KUBERNETES_SERVICE_PORT": "443"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plugins = json.loads(conflist.read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["calico", "istio-cni", "meshguard-cni"]
    assert plugins[2]["kubernetes"]["kubeconfig"] == "/etc/cni/net.d/ZZZ-meshguard-cni-kubeconfig"
    assert plugins[2]["kubernetes"]["excludeNamespaces"] == [NAMESPACE, "kube-system"]
    # the plugin verifies with the webhook's public keys, written into its entry
    trusted = TrustedKeys.from_pem("".join(keys.values()), origin="ConfigMap")
    assert plugins[2]["trustedKeys"] == trusted.pem()
    assert (node["/host/opt/cni/bin"] / "meshguard-cni").read_bytes() == b"the executable"


@pytest.mark.parametrize(
    ("values", "where"),
    [({"cni": {"confDir": "etc/cni"}}, "/cni/confDir"),
     ({"cni": {"timeoutSeconds": 0}}, "/cni/timeoutSeconds"),
     ({"cni": {"excludeNamespaces": ["Kube_System"]}}, "/cni/excludeNamespaces/0"),
     ({"cni": {"image": {"digest": "latest"}}}, "/cni/image/digest"),
     ({"cni": {"hostNetwork": True}}, "hostNetwork"),
     ({"cni": {"repair": {"maxPerMinute": 0}}}, "/cni/repair/maxPerMinute"),
     ({"cni": {"repair": {"intervalSeconds": 0}}}, "/cni/repair/intervalSeconds"),
     ({"cni": {"repair": {"enabled": "yes"}}}, "/cni/repair/enabled"),
     ({"cni": {"agent": {"maxCalls": 0}}}, "/cni/agent/maxCalls"),
     ({"cni": {"agent": {"callTimeoutSeconds": 0}}}, "/cni/agent/callTimeoutSeconds")],
)  # fmt: skip
def test_bad_cni_values_are_rejected_by_the_schema(values, where):
    with (
        helm.Chart.load(CHART) as chart,
        pytest.raises(helm.HelmValuesError, match=re.escape(where)),
    ):
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_helm_lint_strict_with_cni():
    report = helm.lint(CHART, CNI, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_a_pod_the_charts_webhook_injects_in_cni_mode_passes_baseline(tmp_path):
    """The webhook as the chart runs it (its real args), Istio's real CNI-mode sample: no
    container meshguard adds needs more than restricted; the pod passes baseline."""
    webhook = container(one(render(CNI), "Deployment", "meshguard-webhook"))
    args = build_parser().parse_args(webhook["args"])
    args.signing_key = signing_key_file(tmp_path)  # where the chart mounts its Secret's file
    settings = injection_settings(args, request_template=not args.no_template)
    text = shared_file("istio-injector-samples", "hello.yaml.cni.injected").read_text()
    templates = pod_templates([d for d in yaml.safe_load_all(text) if d])
    assert templates
    for template in templates:
        metadata, spec = copy.deepcopy(template.metadata), copy.deepcopy(template.spec)
        inject_pod(metadata, spec, settings=settings)
        names = [c["name"] for c in spec["initContainers"]]
        assert "meshguard-validation" in names and "meshguard-init" not in names
        annotations = metadata.get("annotations") or {}
        assert pss.violations(spec, level="baseline", annotations=annotations) == set()
        restricted = pss.violations(spec, level="restricted", annotations=annotations)
        assert pss.checks_of(restricted, "meshguard-validation") == set()
        validation = next(c for c in spec["initContainers"] if c["name"] == "meshguard-validation")
        # the pod's check and the node's agent come from the same image by default
        assert validation["image"] == container(daemonset())["image"] == INIT_IMAGE
    assert kinds(render(CNI), "DaemonSet")


@pytest.mark.parametrize(
    ("values", "chosen"),
    [
        ({}, WithoutIstioInit.SKIP),
        (CNI, WithoutIstioInit.NODE),
        ({"webhook": {"withoutIstioInit": "privileged"}}, WithoutIstioInit.PRIVILEGED),
        ({**CNI, "webhook": {"withoutIstioInit": "skip"}}, WithoutIstioInit.SKIP),
    ],
    ids=["default", "cni", "privileged", "cni-skip"],
)
def test_pods_istio_gave_no_init_step_get_what_the_chart_says(tmp_path, values, chosen):
    """The webhook as the chart runs it on Istio's grpc-agent and interceptionMode NONE pods:
    skipped without the node agent, protected from the node with it, and a root
    meshguard-init only when asked; the unprivileged choices keep the pod at baseline."""
    webhook = container(one(render(values), "Deployment", "meshguard-webhook"))
    args = build_parser().parse_args(webhook["args"])
    args.signing_key = signing_key_file(tmp_path)
    settings = injection_settings(args, request_template=not args.no_template)
    assert settings.without_istio_init is chosen
    expected = {
        WithoutIstioInit.SKIP: (Outcome.SKIPPED, []),
        WithoutIstioInit.NODE: (Outcome.INJECTED, ["meshguard-validation"]),
        WithoutIstioInit.PRIVILEGED: (Outcome.INJECTED, ["meshguard-init"]),
    }[chosen]
    said = {
        WithoutIstioInit.SKIP: "are left alone (webhook.withoutIstioInit=skip",
        WithoutIstioInit.NODE: "get their rules from the node (webhook.withoutIstioInit=node)",
        WithoutIstioInit.PRIVILEGED: "get a root meshguard-init with NET_ADMIN",
    }[chosen]
    assert said in notes(values)
    for shape in NO_INIT_STEP_SHAPES.values():
        metadata, spec = shape()
        result = inject_pod(metadata, spec, settings=settings)
        own = [c["name"] for c in spec.get("initContainers") or [] if c["name"].startswith("mesh")]
        assert (result.outcome, own) == expected
        if chosen is not WithoutIstioInit.PRIVILEGED:
            annotations = metadata.get("annotations") or {}
            assert pss.violations(spec, level="baseline", annotations=annotations) == set()


def test_node_without_the_node_agent_is_refused_at_render():
    with pytest.raises(helm.HelmRenderError, match=re.escape("but cni.enabled is false")):
        render({"webhook": {"withoutIstioInit": "node"}})
