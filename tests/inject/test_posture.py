"""Posture checks: each breakout vector is refused (deny) or fixed (fix) with its reason."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from meshguard.inject.posture import (
    Check,
    PostureAction,
    PostureSettings,
    apply_fixes,
    refusals,
    review_posture,
)
from meshguard.pod import read_pod

FIX = PostureSettings(default_action=PostureAction.FIX)
DENY = PostureSettings(default_action=PostureAction.DENY)
SAFE_CONTEXT = {
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
STATUS = json.dumps({"initContainers": ["istio-init"], "containers": ["istio-proxy"]})


def pod(**container_context: Any) -> dict[str, Any]:
    return {
        "initContainers": [
            {"name": "istio-init", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}
        ],
        "containers": [
            {"name": "app", "securityContext": {**SAFE_CONTEXT, **container_context}},
            {"name": "istio-proxy", "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}},
        ],
    }


def review_posture_of(
    spec: dict[str, Any],
    *,
    settings: PostureSettings,
    annotations: dict[str, str] | None = None,
    status: str | None = STATUS,
):
    """review_posture over the pod view of ``spec`` (Istio's status as ``pod()`` lays it out)."""
    metadata: dict[str, Any] = {"name": "shop", "annotations": dict(annotations or {})}
    if status is not None:
        metadata["annotations"]["sidecar.istio.io/status"] = status
    view = read_pod(metadata=metadata, spec=spec)
    findings = review_posture(spec, pod=view, settings=settings)
    apply_fixes(spec, findings)  # the review decides the fixes; the transform makes them
    return findings


def checks(findings) -> set[Check]:
    return {f.check for f in findings}


def test_a_safe_pod_has_no_findings_and_istio_own_containers_are_exempt():
    assert review_posture_of(pod(), settings=DENY) == []


@pytest.mark.parametrize(
    ("context", "check", "message"),
    [
        (
            {"runAsUser": 1337},
            Check.PROXY_UID,
            "is the proxy's uid 1337: the container would pass as Envoy",
        ),
        ({"runAsGroup": 1337}, Check.PROXY_GID, "is the proxy's gid 1337"),
        ({"privileged": True}, Check.PRIVILEGED, "can rewrite every network rule"),
        ({"allowPrivilegeEscalation": True}, Check.PRIVILEGE_ESCALATION, "a setuid binary"),
        (
            {"capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}},
            Check.NET_CAPABILITY,
            "holds NET_ADMIN",
        ),
        ({"capabilities": {}}, Check.NET_CAPABILITY, "holds NET_RAW"),
        ({"capabilities": {"drop": ["NET_RAW"]}}, Check.SETUID_CAPABILITY, "holds SETGID, SETUID"),
        (
            {"capabilities": {"add": ["CAP_SYS_ADMIN"], "drop": ["ALL"]}},
            Check.SYS_ADMIN,
            "holds SYS_ADMIN",
        ),
    ],
)
def test_container_breakouts_are_refused_in_deny_mode_with_field_and_fix(context, check, message):
    findings = review_posture_of(pod(**context), settings=DENY)
    assert check in checks(findings)
    finding = next(f for f in findings if f.check is check)
    assert not finding.fixed
    text = str(finding)
    assert text.startswith("container 'app': securityContext.")
    assert message in text
    assert "; fix: " in text


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        ({"runAsUser": 1337}, {"runAsUser": 20000}),
        ({"runAsGroup": 1337}, {"runAsGroup": 1000}),
        ({"privileged": True}, {"privileged": False}),
        ({"allowPrivilegeEscalation": True}, {"allowPrivilegeEscalation": False}),
        (
            {"capabilities": {"add": ["NET_ADMIN", "CHOWN"], "drop": ["ALL"]}},
            {"capabilities": {"add": ["CHOWN"], "drop": ["ALL"]}},
        ),
        ({"capabilities": {}}, {"capabilities": {"drop": ["NET_RAW", "SETGID", "SETUID"]}}),
    ],
)
def test_fix_mode_patches_the_container_and_says_what_it_did(context, expected):
    spec = pod(**context)
    findings = review_posture_of(spec, settings=FIX)
    assert findings and refusals(findings) == []
    app_context = spec["containers"][0]["securityContext"]
    for key, value in expected.items():
        assert app_context[key] == value
    assert all(str(f).startswith("meshguard fixed container 'app'") for f in findings)
    assert review_posture_of(spec, settings=DENY) == []  # fixed for good


def test_sys_ptrace_is_outside_baseline_and_a_proxy_threat_with_a_shared_process_namespace():
    spec = pod(capabilities={"add": ["SYS_PTRACE"], "drop": ["ALL"]})
    (finding,) = review_posture_of(spec, settings=DENY)
    assert finding.check is Check.ADDED_CAPABILITY
    assert "adds SYS_PTRACE, outside Pod Security Standards baseline" in str(finding)
    spec["shareProcessNamespace"] = True
    baseline_finding, finding = review_posture_of(spec, settings=DENY)
    assert baseline_finding.check is Check.ADDED_CAPABILITY
    assert finding.check is Check.SYS_PTRACE
    assert "can trace the proxy in the shared process namespace" in str(finding)


@pytest.mark.parametrize(
    ("pod_fields", "check", "message"),
    [
        (
            {"hostNetwork": True},
            Check.HOST_NETWORK,
            "spec.hostNetwork: the pod uses the node's network",
        ),
        ({"hostPID": True}, Check.HOST_PID, "spec.hostPID"),
        (
            {"securityContext": {"fsGroup": 1337}},
            Check.FS_GROUP,
            "spec.securityContext.fsGroup: is the proxy's gid",
        ),
        (
            {"volumes": [{"name": "sock", "hostPath": {"path": "/var/run/docker.sock"}}]},
            Check.RUNTIME_SOCKET,
            "spec.volumes[sock].hostPath.path: /var/run/docker.sock exposes the container runtime",
        ),
        (
            {"volumes": [{"name": "run", "hostPath": {"path": "/run/containerd/"}}]},
            Check.RUNTIME_SOCKET,
            "/run/containerd/ exposes",
        ),
    ],
)
def test_unfixable_pod_level_vectors_are_refused_even_in_fix_mode(pod_fields, check, message):
    spec = {**pod(), **pod_fields}
    findings = review_posture_of(spec, settings=FIX)
    refused = refusals(findings)
    assert [f.check for f in refused] == [check]
    assert str(refused[0]).startswith("pod: ")
    assert message in str(refused[0])


def test_every_host_path_is_refused_even_a_harmless_looking_one():
    spec = {**pod(), "volumes": [{"name": "logs", "hostPath": {"path": "/var/log/pods"}}]}
    (finding,) = review_posture_of(spec, settings=FIX)
    assert finding.check is Check.HOST_PATH and not finding.fixed
    assert "spec.volumes[logs].hostPath.path: volume 'logs' mounts the node's /var/log/pods" in (
        str(finding)
    )


def test_supplemental_group_of_the_proxy_is_removed_in_fix_mode():
    spec = {**pod(), "securityContext": {"supplementalGroups": [5, 1337, 7]}}
    (finding,) = review_posture_of(spec, settings=FIX)
    assert finding.fixed and finding.check is Check.SUPPLEMENTAL_GROUPS
    assert spec["securityContext"]["supplementalGroups"] == [5, 7]


def test_missing_and_shared_uids_get_distinct_uids_deterministically():
    spec = pod()
    del spec["containers"][0]["securityContext"]["runAsUser"]
    spec["containers"].append(
        {"name": "cache", "securityContext": {**SAFE_CONTEXT, "runAsUser": 20000}}
    )
    spec["containers"].append(
        {"name": "logs", "securityContext": {**SAFE_CONTEXT, "runAsUser": 20000}}
    )
    findings = review_posture_of(spec, settings=FIX)
    assert sorted(f.check for f in findings) == [Check.MISSING_UID, Check.SHARED_UID]
    uids = [
        c["securityContext"]["runAsUser"] for c in spec["containers"] if c["name"] != "istio-proxy"
    ]
    assert uids == [20001, 20000, 20002]
    assert len(set(uids)) == 3


def test_missing_uid_in_deny_mode_says_how_to_fix():
    spec = pod()
    del spec["containers"][0]["securityContext"]["runAsUser"]
    (finding,) = review_posture_of(spec, settings=DENY)
    assert "set a distinct runAsUser" in str(finding)


def test_configured_per_check_action_overrides_the_default():
    settings = PostureSettings(
        default_action=PostureAction.FIX, actions={Check.PRIVILEGED: PostureAction.DENY}
    )
    findings = review_posture_of(pod(privileged=True), settings=settings)
    assert [f.check for f in refusals(findings)] == [Check.PRIVILEGED]


def test_native_sidecars_and_init_containers_are_checked_too():
    spec = pod()
    spec["initContainers"].append({"name": "migrate", "securityContext": {"privileged": True}})
    findings = review_posture_of(spec, settings=DENY)
    assert {f.where for f in findings} == {"container 'migrate'"}


# --- attacks: containers disguised with Istio's and meshguard's names ---------------------

ATTACKS = {
    "privileged": ({"privileged": True}, Check.PRIVILEGED),
    "root-net-admin": (
        {"runAsUser": 0, "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}},
        Check.NET_CAPABILITY,
    ),
    "uid-1337": ({"runAsUser": 1337}, Check.PROXY_UID),
    "gid-1337": ({"runAsGroup": 1337}, Check.PROXY_GID),
}
DISGUISES = ["istio-init", "istio-validation", "meshguard-init", "istio-proxy"]
PLACES = ["regular", "native-sidecar", "unlisted-init"]


def disguised(name: str, place: str, context: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``pod()`` plus a container named ``name`` at ``place``; the real Istio containers
    keep their names where the disguise does not take them (istio-proxy then moves to a
    native sidecar, which the status lists, so the disguise is the only one of its name)."""
    spec = pod()
    status = {"initContainers": ["istio-init"], "containers": ["istio-proxy"]}
    if name == "istio-init":  # Istio CNI mode: istio-validation is the real step
        spec["initContainers"][0]["name"] = "istio-validation"
        spec["initContainers"][0]["securityContext"] = {"runAsUser": 1337, "runAsGroup": 1337}
        status["initContainers"] = ["istio-validation"]
    if name == "istio-proxy":  # the real proxy is named otherwise: the disguise is unlisted
        status = {"initContainers": ["istio-init"], "containers": ["envoy"]}
        spec["containers"][1]["name"] = "envoy"
    container = {"name": name, "securityContext": {**SAFE_CONTEXT, "runAsUser": 3000,
                 "runAsGroup": 3000, **copy.deepcopy(context)}}  # fmt: skip
    if place == "regular":
        spec["containers"].insert(0, container)
        where = "spec.containers[0]"
    else:
        if place == "native-sidecar":
            container["restartPolicy"] = "Always"
        spec["initContainers"].append(container)
        where = f"spec.initContainers[{len(spec['initContainers']) - 1}]"
    return spec, json.dumps(status), where


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("name", DISGUISES)
def test_a_disguised_name_is_checked_as_a_workload_in_deny_mode(name, place, attack):
    context, check = ATTACKS[attack]
    spec, status, where = disguised(name, place, context)
    findings = review_posture_of(spec, settings=DENY, status=status)
    mine = [f for f in findings if f.where.startswith(f"container {name!r}")]
    assert check in checks(mine), findings
    assert all(not f.fixed for f in mine)
    text = str(next(f for f in mine if f.check is check))
    assert f"container {name!r} ({where}, not Istio's or meshguard's own" in text
    assert "; fix: " in text


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("name", DISGUISES)
def test_a_disguised_name_is_fixed_as_a_workload_in_fix_mode(name, place, attack):
    context, check = ATTACKS[attack]
    spec, status, _ = disguised(name, place, context)
    findings = review_posture_of(spec, settings=FIX, status=status)
    # NET_ADMIN in add: baseline's fix removes it from add, so it is no longer held
    fixed_by = {check, Check.ADDED_CAPABILITY} if attack == "root-net-admin" else {check}
    assert fixed_by & checks(f for f in findings if f.fixed and name in f.where)
    fixed = review_posture_of(copy.deepcopy(spec), settings=DENY, status=status)
    assert [f for f in fixed if name in f.where] == []
    container = next(
        c for key in ("initContainers", "containers") for c in spec[key] if c["name"] == name
    )
    context_after = container["securityContext"]
    assert context_after.get("privileged") is not True
    assert context_after["runAsUser"] not in {0, 1337} or attack == "root-net-admin"
    assert context_after["runAsGroup"] != 1337
    assert "NET_ADMIN" not in (context_after.get("capabilities") or {}).get("add", [])


def test_without_istio_status_nothing_is_istio_s_whatever_the_names_and_places():
    """No status at all: Istio did not inject the pod, so no container is Istio's, not even
    one named and placed as Istio places its own (a CronJob's kube-inject status is carried
    down to its pod template by meshguard.manifests)."""
    spec = pod()
    spec["initContainers"].append({"name": "istio-validation", "securityContext": {
        **SAFE_CONTEXT, "privileged": True}})  # fmt: skip
    findings = review_posture_of(spec, settings=DENY, status=None)
    workloads = {f.where for f in findings if "checked as a workload" in f.where}
    assert any("'istio-init' (spec.initContainers[0]" in where for where in workloads), findings
    assert any("'istio-validation' (spec.initContainers[1]" in where for where in workloads)
    assert Check.PRIVILEGED in checks(findings)


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"privileged": True}, "securityContext.privileged: Istio's init step needs only"),
        (
            {"capabilities": {"add": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]}},
            "adds SYS_ADMIN; Istio gives istio-init only NET_ADMIN, NET_RAW",
        ),
    ],
)
def test_istio_s_init_step_holds_no_more_than_istio_gives_it(context, message):
    """A pod may claim Istio's status for its own "istio-init": it is Istio's step then, but
    bounded to what Istio's template grants."""
    spec = pod()
    spec["initContainers"][0]["securityContext"] = context
    (finding,) = review_posture_of(spec, settings=DENY)
    assert finding.check is Check.MESH_INIT_PRIVILEGES
    assert message in str(finding)
    (fixed,) = review_posture_of(spec, settings=FIX)
    assert fixed.fixed
    assert review_posture_of(spec, settings=DENY) == []


# --- Pod Security Standards baseline ------------------------------------------------------


@pytest.mark.parametrize(
    "capability",
    ["SYS_MODULE", "BPF", "PERFMON", "SYS_TIME", "cap_sys_module", "Sys_Rawio", "CAP_BPF",
     "DAC_READ_SEARCH", "NET_BROADCAST", "IPC_LOCK", "MAC_ADMIN", "SYS_BOOT", "NOT_A_CAP"],
)  # fmt: skip
def test_capabilities_outside_baseline_are_refused_or_removed(capability):
    spec = pod(capabilities={"add": [capability, "CHOWN"], "drop": ["ALL"]})
    (finding,) = review_posture_of(spec, settings=DENY)
    assert finding.check is Check.ADDED_CAPABILITY
    assert f"securityContext.capabilities.add: adds {capability}, outside" in str(finding)
    (fixed,) = review_posture_of(spec, settings=FIX)
    assert fixed.fixed
    assert spec["containers"][0]["securityContext"]["capabilities"]["add"] == ["CHOWN"]


@pytest.mark.parametrize("spelling", ["ALL", "all", "CAP_ALL"])
def test_all_capabilities_in_add_are_refused_or_removed(spelling):
    spec = pod(capabilities={"add": [spelling]})
    findings = review_posture_of(spec, settings=DENY)
    assert {Check.ADDED_CAPABILITY, Check.NET_CAPABILITY, Check.SYS_ADMIN} <= checks(findings)
    assert f"adds {spelling}, outside Pod Security Standards baseline" in str(findings)
    review_posture_of(spec, settings=FIX)
    capabilities = spec["containers"][0]["securityContext"]["capabilities"]
    assert capabilities["add"] == []
    assert review_posture_of(spec, settings=DENY) == []


def test_baseline_capabilities_may_be_added():
    spec = pod(capabilities={"add": ["CHOWN", "NET_BIND_SERVICE", "FOWNER"], "drop": ["ALL"]})
    assert review_posture_of(spec, settings=DENY) == []


@pytest.mark.parametrize("spelling", ["cap_fowner", "fowner", "CAP_FOWNER", " FOWNER"])
def test_baseline_capabilities_only_in_baseline_s_exact_spelling(spelling):
    """Baseline compares the names as written: runtimes differ on other spellings."""
    spec = pod(capabilities={"add": ["CHOWN", spelling], "drop": ["ALL"]})
    (finding,) = review_posture_of(spec, settings=DENY)
    assert finding.check is Check.ADDED_CAPABILITY and not finding.fixed
    assert f"adds {spelling}: baseline allows only its exact names (FOWNER)" in str(finding)
    (fixed,) = review_posture_of(spec, settings=FIX)
    assert fixed.fixed and "wrote" in fixed.remedy
    assert spec["containers"][0]["securityContext"]["capabilities"]["add"] == ["CHOWN", "FOWNER"]
    assert review_posture_of(spec, settings=DENY) == []


@pytest.mark.parametrize(
    ("path", "check"),
    [
        ("/run/k3s/containerd/containerd.sock", Check.RUNTIME_SOCKET),
        ("/proc", Check.HOST_PATH),
        ("/sys/fs/cgroup", Check.HOST_PATH),
        ("/var/lib/kubelet", Check.HOST_PATH),
        ("/dev", Check.HOST_PATH),
        ("/", Check.RUNTIME_SOCKET),
        ("/etc", Check.HOST_PATH),
        ("/tmp/x/../../var/run/docker.sock", Check.HOST_PATH),
    ],
)
def test_every_host_path_volume_is_refused_naming_volume_and_path(path, check):
    spec = {**pod(), "volumes": [{"name": "node", "hostPath": {"path": path}}]}
    (finding,) = review_posture_of(spec, settings=FIX)
    assert finding.check is check and not finding.fixed
    said = "" if check is Check.RUNTIME_SOCKET else "volume 'node' mounts the node's "
    assert f"spec.volumes[node].hostPath.path: {said}{path}" in str(finding)


@pytest.mark.parametrize(
    ("pod_fields", "annotations", "check", "message"),
    [
        ({"hostIPC": True}, {}, Check.HOST_IPC, "pod: spec.hostIPC: the pod shares the node's IPC"),
        ({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}, {}, Check.SECCOMP,
         "pod: spec.securityContext.seccompProfile.type: is 'Unconfined'"),
        ({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}}, {}, Check.APPARMOR,
         "pod: spec.securityContext.appArmorProfile.type: is 'Unconfined'"),
        ({"securityContext": {"seLinuxOptions": {"type": "spc_t"}}}, {}, Check.SELINUX,
         "is 'spc_t', outside Pod Security Standards baseline latest (v1.37)'s types"),
        ({"securityContext": {"seLinuxOptions": {"user": "system_u"}}}, {}, Check.SELINUX,
         "seLinuxOptions.user: is set ('system_u')"),
        ({"securityContext": {"seLinuxOptions": {"role": "sysadm_r"}}}, {}, Check.SELINUX,
         "seLinuxOptions.role: is set ('sysadm_r')"),
        ({"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}}, {},
         Check.SYSCTL, "sysctls[0]: sets 'kernel.msgmax'"),
        ({"securityContext": {"sysctls": [{"name": "net.core.somaxconn", "value": "1"}]}}, {},
         Check.SYSCTL, "sets 'net.core.somaxconn'"),
        ({}, {"container.apparmor.security.beta.kubernetes.io/app": "unconfined"},
         Check.APPARMOR, "is 'unconfined': Pod Security Standards baseline allows only"),
    ],
)  # fmt: skip
def test_other_baseline_violations_are_refused_even_in_fix_mode(
    pod_fields, annotations, check, message
):
    spec = {**pod(), **pod_fields}
    (finding,) = review_posture_of(spec, settings=FIX, annotations=annotations)
    assert finding.check is check and not finding.fixed
    assert message in str(finding)


@pytest.mark.parametrize(
    ("context", "check", "message"),
    [
        ({"procMount": "Unmasked"}, Check.PROC_MOUNT, "securityContext.procMount: is Unmasked"),
        ({"seccompProfile": {"type": "Unconfined"}}, Check.SECCOMP, "seccompProfile.type"),
        ({"appArmorProfile": {"type": "Unconfined"}}, Check.APPARMOR, "appArmorProfile.type"),
        ({"seLinuxOptions": {"type": "unconfined_t"}}, Check.SELINUX, "'unconfined_t'"),
        ({"windowsOptions": {"hostProcess": True}}, Check.HOST_PROCESS, "hostProcess"),
    ],
)
def test_container_baseline_violations_are_refused_even_in_fix_mode(context, check, message):
    (finding,) = review_posture_of(pod(**context), settings=FIX)
    assert finding.check is check and not finding.fixed
    assert str(finding).startswith("container 'app': securityContext.")
    assert message in str(finding)


def test_host_ports_are_refused_on_any_container_the_proxy_s_too():
    spec = pod()
    spec["containers"][0]["ports"] = [{"containerPort": 8080, "hostPort": 8080}]
    spec["containers"][1]["ports"] = [{"containerPort": 15090, "hostPort": 15090}]
    findings = review_posture_of(spec, settings=FIX)
    assert [(f.check, f.where, f.field) for f in findings] == [
        (Check.HOST_PORT, "container 'app'", "ports[0].hostPort"),
        (Check.HOST_PORT, "container 'istio-proxy'", "ports[0].hostPort"),
    ]
    assert not any(f.fixed for f in findings)


def test_safe_sysctls_and_profiles_pass():
    spec = {
        **pod(seccompProfile={"type": "RuntimeDefault"}, seLinuxOptions={"type": "container_t"}),
        "securityContext": {
            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
            "seccompProfile": {"type": "Localhost", "localhostProfile": "x.json"},
        },
    }
    annotations = {"container.apparmor.security.beta.kubernetes.io/app": "localhost/x"}
    assert review_posture_of(spec, settings=DENY, annotations=annotations) == []


# --- groups the image would choose, and the shared process namespace ----------------------


def test_an_unset_run_as_group_is_refused_or_set_to_the_uid():
    spec = pod()
    del spec["containers"][0]["securityContext"]["runAsGroup"]
    (finding,) = review_posture_of(spec, settings=DENY)
    assert finding.check is Check.MISSING_GID and not finding.fixed
    assert "securityContext.runAsGroup: is not set: the image's /etc/passwd picks" in str(finding)
    (fixed,) = review_posture_of(spec, settings=FIX)
    assert fixed.fixed and spec["containers"][0]["securityContext"]["runAsGroup"] == 1000
    spec = pod()
    del spec["containers"][0]["securityContext"]["runAsGroup"]
    spec["securityContext"] = {"runAsGroup": 5000}  # the pod's own is the effective one
    assert review_posture_of(spec, settings=DENY) == []


def test_a_missing_group_is_never_set_to_the_proxy_s_gid():
    spec = pod(runAsUser=4321)
    del spec["containers"][0]["securityContext"]["runAsGroup"]
    spec["containers"][1]["securityContext"] = {"runAsUser": 1234, "runAsGroup": 4321}
    (finding,) = review_posture_of(spec, settings=FIX)
    assert finding.check is Check.MISSING_GID and not finding.fixed


def test_shared_process_namespace_root_is_refused_and_kill_dropped():
    spec = pod(runAsUser=0, runAsGroup=0)
    spec["shareProcessNamespace"] = True
    findings = review_posture_of(spec, settings=FIX)
    (root,) = refusals(findings)
    assert root.check is Check.SHARED_PID_ROOT
    assert "runs as root while sharing the process namespace" in str(root)


@pytest.mark.parametrize("kill", ["KILL", "kill", "CAP_KILL"])
def test_shared_process_namespace_kill_is_dropped_or_refused(kill):
    spec = pod(capabilities={"add": [kill], "drop": ["ALL"]})
    spec["shareProcessNamespace"] = True
    *respelled, finding = review_posture_of(spec, settings=DENY)
    assert [f.check for f in respelled] == ([] if kill == "KILL" else [Check.ADDED_CAPABILITY])
    assert finding.check is Check.KILL_CAPABILITY
    assert "holds KILL (can kill the proxy in the shared process namespace" in str(finding)
    assert all(f.fixed for f in review_posture_of(spec, settings=FIX))
    assert spec["containers"][0]["securityContext"]["capabilities"] == {
        "add": [], "drop": ["ALL"]}  # fmt: skip
    spec = pod(capabilities={"drop": ["NET_RAW", "SETUID", "SETGID"]})  # KILL by default
    spec["shareProcessNamespace"] = True
    (finding,) = review_posture_of(spec, settings=DENY)
    assert finding.check is Check.KILL_CAPABILITY


def test_an_unset_uid_in_a_shared_process_namespace_is_refused_in_deny_mode():
    spec = pod()
    del spec["containers"][0]["securityContext"]["runAsUser"]
    spec["shareProcessNamespace"] = True
    found = checks(review_posture_of(spec, settings=DENY))
    assert {Check.MISSING_UID, Check.SHARED_PID_ROOT} <= found
    assert refusals(review_posture_of(spec, settings=FIX)) == []  # a uid was assigned


# --- ephemeral containers -----------------------------------------------------------------


def with_debug(**context: Any) -> dict[str, Any]:
    spec = pod()
    spec["ephemeralContainers"] = [{"name": "debug", "image": "busybox", **(
        {"securityContext": context} if context else {})}]  # fmt: skip
    return spec


SAFE_DEBUG = {**SAFE_CONTEXT, "runAsUser": 30000, "runAsGroup": 30000}


@pytest.mark.parametrize(
    ("context", "check"),
    [
        ({}, Check.MISSING_UID),
        ({**SAFE_DEBUG, "runAsUser": 1337}, Check.PROXY_UID),
        ({**SAFE_DEBUG, "runAsUser": 1000}, Check.SHARED_UID),
        ({**SAFE_DEBUG, "runAsGroup": 1337}, Check.PROXY_GID),
        ({k: v for k, v in SAFE_DEBUG.items() if k != "runAsGroup"}, Check.MISSING_GID),
        ({**SAFE_DEBUG, "privileged": True}, Check.PRIVILEGED),
        ({**SAFE_DEBUG, "capabilities": {"add": ["NET_ADMIN"]}}, Check.NET_CAPABILITY),
        ({**SAFE_DEBUG, "capabilities": {"add": ["SYS_MODULE"], "drop": ["ALL"]}},
         Check.ADDED_CAPABILITY),
        ({**SAFE_DEBUG, "allowPrivilegeEscalation": True}, Check.PRIVILEGE_ESCALATION),
    ],
)  # fmt: skip
def test_ephemeral_containers_are_checked_and_never_patched(context, check):
    spec = with_debug(**context)
    before = copy.deepcopy(spec)
    findings = review_posture_of(spec, settings=FIX)
    finding = next(f for f in findings if f.check is check)
    assert not finding.fixed
    assert str(finding).startswith("ephemeral container 'debug': ")
    assert spec["ephemeralContainers"] == before["ephemeralContainers"]


def test_a_safe_ephemeral_container_passes():
    assert review_posture_of(with_debug(**SAFE_DEBUG), settings=DENY) == []


def test_an_ephemeral_container_targeting_the_proxy_shares_its_processes():
    spec = with_debug(**{**SAFE_DEBUG, "runAsUser": 0, "capabilities": {"drop": ["NET_RAW"]}})
    spec["ephemeralContainers"][0]["targetContainerName"] = "istio-proxy"
    found = checks(review_posture_of(spec, settings=FIX))
    assert {Check.SHARED_PID_ROOT, Check.KILL_CAPABILITY} <= found
