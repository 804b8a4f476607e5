"""The chart's denial agent (``denials.enabled``): the DaemonSet ``meshguard-denials`` that
runs ``meshguard cni denials`` on every node without CNI mode, rendered by the real Helm
engine, validated against Kubernetes' schemas; its privileges are exactly the documented
ones (SYS_ADMIN, SYS_PTRACE, NET_ADMIN, the host's /proc read-only), its RBAC reads pods
(and creates Events only with ``denials.events``); ``describe --recent-denials`` recognizes
its pods, and the CNI agent's, as meshguard's own agents."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

from meshguard.cli import build_parser
from meshguard.recent_denials import AGENT_SELECTOR, MESHGUARD_NAMESPACE, agent_on
from tests.charts.test_chart import K8S_VERSION, NAMESPACE, container, one, render
from tests.support import pss

DENIALS = {"denials": {"enabled": True}}


def objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    return render(values)


def test_off_by_default():
    assert not [o for o in render({}) if o["metadata"]["name"] == "meshguard-denials"]


def test_the_daemonset_runs_the_denial_agent_with_the_documented_privileges_only():
    rendered = objects(DENIALS)
    for obj in rendered:
        if obj["metadata"]["name"] == "meshguard-denials":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    daemonset = one(rendered, "DaemonSet", "meshguard-denials")
    spec = daemonset["spec"]["template"]["spec"]
    main = container(daemonset)
    args = build_parser().parse_args(main["command"][1:] + main["args"])
    assert (args.handler, str(args.proc), args.metrics_port, args.events) == (
        "meshguard.cli.cni:run_denials", "/host/proc", 9103, False,
    )  # fmt: skip
    assert str(args.trusted_keys) == "/etc/meshguard/trusted-keys"
    context = main["securityContext"]
    assert context["capabilities"] == {
        "drop": ["ALL"], "add": ["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"]
    }  # fmt: skip
    assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
    assert not spec.get("hostPID") and not spec.get("hostNetwork")
    mounts = {m["mountPath"]: (m["name"], m.get("readOnly")) for m in main["volumeMounts"]}
    assert mounts == {"/host/proc": ("host-proc", True),
                      "/etc/meshguard/trusted-keys": ("trusted-keys", True)}  # fmt: skip
    # baseline's objections: exactly the host's /proc and those capabilities (its namespace
    # must be privileged, as istio-cni's and meshguard-cni-node's)
    annotations = daemonset["spec"]["template"]["metadata"].get("annotations") or {}
    assert pss.violations(spec, level="baseline", annotations=annotations) == {
        ("pod", "hostPath volume host-proc"),
        *{("denials", f"capability {c}") for c in ("NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE")},
    }
    assert [c["name"] for c in spec["containers"]] == ["denials"]


def test_its_role_reads_pods_and_records_events_only_when_asked():
    role = one(objects(DENIALS), "ClusterRole", "meshguard-denials")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    with_events = {"denials": {"enabled": True, "events": True}}
    assert one(objects(with_events), "ClusterRole", "meshguard-denials")["rules"][1] == {
        "apiGroups": [""], "resources": ["events"], "verbs": ["create"]
    }  # fmt: skip
    args = container(one(objects(with_events), "DaemonSet", "meshguard-denials"))["args"]
    assert "--events" in args


def test_describe_recognizes_the_charts_agents_as_meshguards_own():
    """A pod of each agent DaemonSet, as the DaemonSet controller makes it from the template
    (in the release namespace, its controller reference to the DaemonSet), is the agent
    ``describe --recent-denials`` asks: the names, labels and port it looks for are the
    chart's."""
    assert NAMESPACE == MESHGUARD_NAMESPACE  # the chart's documented install namespace
    rendered = objects({**DENIALS, "cni": {"enabled": True, "agent": {"watchDenials": True}}})
    key, _, value = AGENT_SELECTOR.partition("=")
    for name in ("meshguard-denials", "meshguard-cni-node"):
        daemonset = one(rendered, "DaemonSet", name)
        template = daemonset["spec"]["template"]
        assert template["metadata"]["labels"][key] == value
        pod = {
            "metadata": {**template["metadata"], "namespace": daemonset["metadata"]["namespace"],
                         "name": f"{name}-abcde",
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                              "name": name, "uid": "u", "controller": True}]},
            "spec": {**template["spec"], "nodeName": "n1"},
            "status": {"phase": "Running"},
        }  # fmt: skip
        port = one_port(pod, "metrics")
        assert agent_on([pod], node="n1", namespace=NAMESPACE) == (NAMESPACE, f"{name}-abcde",
                                                                    port)  # fmt: skip


def one_port(pod: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for c in pod["spec"]["containers"]
               for p in c.get("ports") or () if p.get("name") == name]  # fmt: skip
    return int(port)
