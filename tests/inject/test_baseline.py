"""Pod Security Standards baseline, versioned: every check with a forbidden and an allowed
variant as Kubernetes' Pod Security Admission defines them per version, on a pod Istio
injected (../shared's hello sample: istio-init, the proxy as a native sidecar), in deny, fix
and report mode, through the webhook's handle() and ``meshguard inject``."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonpatch
import pytest
import yaml

from meshguard.inject.l7 import L7_VOLUME
from meshguard.inject.posture import (
    LATEST,
    Check,
    PostureAction,
    PostureSettings,
    parse_baseline_version,
    safe_sysctls,
)
from meshguard.inject.posture.baseline_version import BadBaselineVersionError
from meshguard.inject.transform import InjectSettings
from meshguard.webhook.review import handle
from tests.support.pods import admission_review
from tests.support.samples import SAFE_CONTEXT, load_templates
from tests.support.shared import INJECTOR_SAMPLES

pytestmark = pytest.mark.skipif(
    not INJECTOR_SAMPLES.exists(), reason="../shared/istio-injector-samples is absent"
)

Pod = dict[str, Any]
VERSIONS = ["v1.18", "v1.19", "v1.26", "v1.30", "v1.31", "v1.33", "v1.34", "v1.35", "v1.36",
            "v1.37", "latest"]  # fmt: skip


def istio_pod() -> Pod:
    """hello.yaml.injected's pod as Istio injected it, its app container made safe."""
    (template,) = load_templates("hello.yaml.injected")
    spec = copy.deepcopy(template.spec)
    app = spec["containers"][0]
    assert app["name"] == "hello"
    app["securityContext"] = {**SAFE_CONTEXT, "runAsUser": 1000, "runAsGroup": 1000}
    metadata = copy.deepcopy(template.metadata)
    metadata.update(name="hello", namespace="shop")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def app(pod: Pod) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def app_context(pod: Pod) -> dict[str, Any]:
    context: dict[str, Any] = app(pod)["securityContext"]
    return context


def pod_context(pod: Pod) -> dict[str, Any]:
    context: dict[str, Any] = pod["spec"].setdefault("securityContext", {})
    return context


def annotate(key: str, value: str) -> Callable[[Pod], None]:
    return lambda pod: pod["metadata"]["annotations"].update({key: value})


def set_app(**fields: Any) -> Callable[[Pod], None]:
    return lambda pod: app_context(pod).update(copy.deepcopy(fields))


def set_pod(**fields: Any) -> Callable[[Pod], None]:
    return lambda pod: pod_context(pod).update(copy.deepcopy(fields))


def set_spec(**fields: Any) -> Callable[[Pod], None]:
    return lambda pod: pod["spec"].update(copy.deepcopy(fields))


def sysctl(name: str) -> Callable[[Pod], None]:
    return set_pod(sysctls=[{"name": name, "value": "1"}])


def probe(where: str, kind: str, host: str) -> Callable[[Pod], None]:
    handler = {kind: {"port": 8080, "host": host, **({"path": "/"} if kind == "httpGet" else {})}}

    def edit(pod: Pod) -> None:
        if where.startswith("lifecycle."):
            app(pod).setdefault("lifecycle", {})[where.removeprefix("lifecycle.")] = handler
        else:
            app(pod)[where] = {**handler, "periodSeconds": 10}

    return edit


def both(*edits: Callable[[Pod], None]) -> Callable[[Pod], None]:
    def edit(pod: Pod) -> None:
        for one in edits:
            one(pod)

    return edit


@dataclass(frozen=True)
class Case:
    """A pod edit; the check it trips from ``since`` (a minor) until ``until`` (exclusive),
    ``None`` for never; whether fix mode patches it."""

    edit: Callable[[Pod], None]
    check: Check | None
    since: int = 0
    until: int = 1000
    fixable: bool = False

    def forbidden_at(self, version: str) -> bool:
        minor = parse_baseline_version(version).minor
        return self.check is not None and self.since <= minor < self.until


CASES: dict[str, Case] = {
    # host namespaces, hostProcess, privileged, hostPath, hostPorts: every version
    "host-network": Case(set_spec(hostNetwork=True), Check.HOST_NETWORK),
    "host-pid": Case(set_spec(hostPID=True), Check.HOST_PID),
    "host-ipc": Case(set_spec(hostIPC=True), Check.HOST_IPC),
    "host-namespaces-false": Case(set_spec(hostNetwork=False, hostPID=False, hostIPC=False), None),
    "pod-host-process": Case(set_pod(windowsOptions={"hostProcess": True}), Check.HOST_PROCESS),
    "container-host-process": Case(
        set_app(windowsOptions={"hostProcess": True}), Check.HOST_PROCESS
    ),
    "host-process-false": Case(set_app(windowsOptions={"hostProcess": False}), None),
    "privileged": Case(set_app(privileged=True), Check.PRIVILEGED, fixable=True),
    "privileged-false": Case(set_app(privileged=False), None),
    "host-path": Case(
        set_spec(volumes=[{"name": "node", "hostPath": {"path": "/var/log"}}]), Check.HOST_PATH
    ),
    "empty-dir": Case(set_spec(volumes=[{"name": "scratch", "emptyDir": {}}]), None),
    "host-port": Case(
        lambda pod: app(pod).update(ports=[{"containerPort": 8080, "hostPort": 8080}]),
        Check.HOST_PORT,
    ),
    "host-port-0": Case(
        lambda pod: app(pod).update(ports=[{"containerPort": 8080, "hostPort": 0}]), None
    ),
    # capabilities: baseline's exact names only
    "cap-chown": Case(set_app(capabilities={"add": ["CHOWN"], "drop": ["ALL"]}), None),
    "cap-lowercase": Case(
        set_app(capabilities={"add": ["chown"], "drop": ["ALL"]}),
        Check.ADDED_CAPABILITY,
        fixable=True,
    ),
    "cap-prefixed": Case(
        set_app(capabilities={"add": ["CAP_CHOWN"], "drop": ["ALL"]}),
        Check.ADDED_CAPABILITY,
        fixable=True,
    ),
    "cap-sys-time": Case(
        set_app(capabilities={"add": ["SYS_TIME"], "drop": ["ALL"]}),
        Check.ADDED_CAPABILITY,
        fixable=True,
    ),
    # AppArmor: fields and annotations, every version
    "apparmor-unconfined": Case(set_app(appArmorProfile={"type": "Unconfined"}), Check.APPARMOR),
    "apparmor-pod-unconfined": Case(
        set_pod(appArmorProfile={"type": "Unconfined"}), Check.APPARMOR
    ),
    "apparmor-localhost": Case(
        set_app(appArmorProfile={"type": "Localhost", "localhostProfile": "k8s-x"}), None
    ),
    "apparmor-annotation-unconfined": Case(
        annotate("container.apparmor.security.beta.kubernetes.io/hello", "unconfined"),
        Check.APPARMOR,
    ),
    "apparmor-annotation-runtime-default": Case(
        annotate("container.apparmor.security.beta.kubernetes.io/hello", "runtime/default"), None
    ),
    "apparmor-annotation-other-container": Case(
        annotate("container.apparmor.security.beta.kubernetes.io/nobody", "unconfined"),
        Check.APPARMOR,
    ),
    # SELinux: container_engine_t from v1.31; never a user or role
    "selinux-container-t": Case(set_app(seLinuxOptions={"type": "container_t"}), None),
    "selinux-engine-t": Case(
        set_app(seLinuxOptions={"type": "container_engine_t"}), Check.SELINUX, until=31
    ),
    "selinux-spc-t": Case(set_pod(seLinuxOptions={"type": "spc_t"}), Check.SELINUX),
    "selinux-user": Case(set_app(seLinuxOptions={"user": "system_u"}), Check.SELINUX),
    "selinux-role": Case(set_app(seLinuxOptions={"role": "sysadm_r"}), Check.SELINUX),
    # procMount: Unmasked with hostUsers: false from v1.35
    "proc-mount-unmasked": Case(set_app(procMount="Unmasked"), Check.PROC_MOUNT),
    "proc-mount-unmasked-userns": Case(
        both(set_app(procMount="Unmasked"), set_spec(hostUsers=False)), Check.PROC_MOUNT, until=35
    ),
    "proc-mount-default": Case(set_app(procMount="Default"), None),
    # seccomp: the annotations before v1.19, the fields from v1.19
    "seccomp-annotation-unconfined": Case(
        annotate("seccomp.security.alpha.kubernetes.io/pod", "unconfined"), Check.SECCOMP, until=19
    ),
    "seccomp-container-annotation-unconfined": Case(
        annotate("container.seccomp.security.alpha.kubernetes.io/hello", "unconfined"),
        Check.SECCOMP,
        until=19,
    ),
    "seccomp-annotation-docker-default": Case(
        annotate("seccomp.security.alpha.kubernetes.io/pod", "docker/default"), None
    ),
    "seccomp-unconfined": Case(set_app(seccompProfile={"type": "Unconfined"}), Check.SECCOMP, 19),
    "seccomp-pod-unconfined": Case(
        set_pod(seccompProfile={"type": "Unconfined"}), Check.SECCOMP, 19
    ),
    "seccomp-runtime-default": Case(set_pod(seccompProfile={"type": "RuntimeDefault"}), None),
    # sysctls as of the version
    "sysctl-shm-rmid-forced": Case(sysctl("kernel.shm_rmid_forced"), None),
    "sysctl-somaxconn": Case(sysctl("net.core.somaxconn"), Check.SYSCTL),
    "sysctl-reserved-ports": Case(
        sysctl("net.ipv4.ip_local_reserved_ports"), Check.SYSCTL, until=27
    ),
    "sysctl-keepalive-time": Case(sysctl("net.ipv4.tcp_keepalive_time"), Check.SYSCTL, until=29),
    "sysctl-tcp-rmem": Case(sysctl("net.ipv4.tcp_rmem"), Check.SYSCTL, until=32),
    "sysctl-slow-start-after-idle": Case(
        sysctl("net.ipv4.tcp_slow_start_after_idle"), Check.SYSCTL, until=37
    ),
    "sysctl-notsent-lowat": Case(sysctl("net.ipv4.tcp_notsent_lowat"), Check.SYSCTL, until=37),
    # probe and lifecycle hosts from v1.34
    **{
        f"host-{where}-{kind}": Case(probe(where, kind, "10.0.0.1"), Check.PROBE_HOST, since=34)
        for where in (
            "livenessProbe",
            "readinessProbe",
            "startupProbe",
            "lifecycle.postStart",
            "lifecycle.preStop",
        )
        for kind in ("httpGet", "tcpSocket")
    },
    "probe-empty-host": Case(probe("livenessProbe", "httpGet", ""), None),
}


def deny(version: str) -> InjectSettings:
    return InjectSettings(
        request_template=False,
        posture=PostureSettings(
            default_action=PostureAction.DENY, baseline=parse_baseline_version(version)
        ),
    )


def fix(version: str) -> InjectSettings:
    return InjectSettings(
        request_template=False,
        posture=PostureSettings(
            default_action=PostureAction.FIX, baseline=parse_baseline_version(version)
        ),
    )


def case_pod(name: str) -> Pod:
    pod = istio_pod()
    CASES[name].edit(pod)
    pod["metadata"]["name"] = name
    return pod


def review(pod: Pod, settings: InjectSettings) -> dict[str, Any]:
    status, answer, _ = handle(admission_review(pod, "uid-1"), settings=settings)
    assert status == 200
    response: dict[str, Any] = answer["response"]  # type: ignore[typeddict-item]
    return response


def tag(check: Check, version: str) -> str:
    minor = parse_baseline_version(version).minor
    return f"[{check}] (Pod Security baseline v1.{minor})"


def test_the_unedited_istio_pod_passes_deny_mode_at_every_version():
    for version in VERSIONS:
        response = review(istio_pod(), deny(version))
        assert response["allowed"] is True, response


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_webhook_deny_mode_refuses_exactly_what_baseline_forbids_at_the_version(name, version):
    case = CASES[name]
    response = review(case_pod(name), deny(version))
    if case.forbidden_at(version):
        assert case.check is not None
        assert response["allowed"] is False
        assert tag(case.check, version) in response["status"]["message"]
    else:
        assert response["allowed"] is True, response.get("status")
        assert not any("Pod Security baseline" in w for w in response.get("warnings", []))


@pytest.mark.parametrize("version", ["v1.30", "latest"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_webhook_fix_mode_fixes_or_refuses_every_baseline_finding(name, version):
    case = CASES[name]
    pod = case_pod(name)
    response = review(pod, fix(version))
    if not case.forbidden_at(version):
        assert response["allowed"] is True
        return
    assert case.check is not None
    if not case.fixable:
        assert response["allowed"] is False
        assert tag(case.check, version) in response["status"]["message"]
        return
    assert response["allowed"] is True
    fixed = [w for w in response["warnings"] if tag(case.check, version) in w]
    assert fixed and all(w.startswith("meshguard fixed ") for w in fixed)
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    again = review(patched, deny(version))  # what fix mode made passes deny mode
    assert again["allowed"] is True, again.get("status")


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.check is not None))
def test_webhook_report_mode_admits_the_pod_unchanged_and_says_what_it_found(name):
    case = CASES[name]
    pod = case_pod(name)
    settings = InjectSettings(
        request_template=False, posture=PostureSettings(default_action=PostureAction.REPORT)
    )
    response = review(pod, settings)
    if case.check is Check.HOST_NETWORK:  # meshguard-init would write the node's rules
        assert response["allowed"] is False
        return
    if not case.forbidden_at("latest"):
        return
    assert response["allowed"] is True, response.get("status")
    assert any(tag(case.check, "latest") in w for w in response["warnings"])
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    for field in ("containers", "securityContext", "hostPID", "hostIPC"):
        assert patched["spec"].get(field) == pod["spec"].get(field)
    volumes = [
        v for v in patched["spec"]["volumes"] if v["name"] not in ("meshguard-ruleset", L7_VOLUME)
    ]
    assert volumes == pod["spec"]["volumes"]
    status = json.loads(patched["metadata"]["annotations"]["meshguard.io/status"])
    assert any(tag(case.check, "latest") in f for f in status["findings"])


def run_inject(pods: list[Pod], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshguard", "inject", "-f", "-", *flags],
        input=yaml.safe_dump_all(pods),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize("version", ["v1.18", "v1.33", "v1.36", "latest"])
def test_meshguard_inject_refuses_per_pod_what_baseline_forbids_at_the_version(version):
    names = sorted(CASES)
    done = run_inject(
        [case_pod(n) for n in names], "--posture-action", "deny", "--baseline-version", version
    )
    refused = {
        line.split(": ", 2)[1].removeprefix("Pod shop/")
        for line in done.stderr.splitlines()
        if line.startswith("error: Pod shop/")
    }
    expected = {n for n in names if CASES[n].forbidden_at(version)}
    assert refused == expected
    assert done.returncode != 0
    allowed = [case_pod(n) for n in names if n not in expected]
    ok = run_inject(allowed, "--posture-action", "deny", "--baseline-version", version)
    assert ok.returncode == 0, ok.stderr
    assert len(list(yaml.safe_load_all(ok.stdout))) == len(allowed)


def test_a_bad_baseline_version_is_a_usage_error_naming_the_flag():
    done = run_inject([istio_pod()], "--baseline-version", "1.30")
    assert done.returncode == 2
    assert "--baseline-version: baseline version '1.30': expected 'latest' or 'v1.N'" in (
        done.stderr
    )
    with pytest.raises(BadBaselineVersionError):
        parse_baseline_version("v2.1")


def test_latest_is_v1_37_and_a_newer_pin_gets_every_rule_meshguard_knows():
    assert str(LATEST) == "latest (v1.37)"
    assert safe_sysctls(parse_baseline_version("v1.40")) == safe_sysctls(LATEST)
    assert "net.ipv4.tcp_notsent_lowat" in safe_sysctls(LATEST)
    assert "net.ipv4.tcp_notsent_lowat" not in safe_sysctls(parse_baseline_version("v1.36"))
