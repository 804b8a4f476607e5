"""Posture checks: each breakout vector is refused (deny) or fixed (fix) with its reason."""

from __future__ import annotations

from typing import Any

import pytest

from meshguard.inject.posture import (
    Action,
    Check,
    PostureSettings,
    refusals,
    review_posture,
)
from meshguard.pod import ProxyIdentity

PROXY = ProxyIdentity(uid=1337, gid=1337)
FIX = PostureSettings(default_action=Action.FIX)
DENY = PostureSettings(default_action=Action.DENY)
SAFE_CONTEXT = {
    "runAsUser": 1000,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


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


def checks(findings) -> set[Check]:
    return {f.check for f in findings}


def test_a_safe_pod_has_no_findings_and_istio_own_containers_are_exempt():
    assert review_posture(pod(), proxy=PROXY, settings=DENY) == []


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
    findings = review_posture(pod(**context), proxy=PROXY, settings=DENY)
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
    findings = review_posture(spec, proxy=PROXY, settings=FIX)
    assert findings and refusals(findings) == []
    app_context = spec["containers"][0]["securityContext"]
    for key, value in expected.items():
        assert app_context[key] == value
    assert all(str(f).startswith("meshguard fixed container 'app'") for f in findings)
    assert review_posture(spec, proxy=PROXY, settings=DENY) == []  # fixed for good


def test_sys_ptrace_matters_only_with_a_shared_process_namespace():
    spec = pod(capabilities={"add": ["SYS_PTRACE"], "drop": ["ALL"]})
    assert review_posture(spec, proxy=PROXY, settings=DENY) == []
    spec["shareProcessNamespace"] = True
    (finding,) = review_posture(spec, proxy=PROXY, settings=DENY)
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
    findings = review_posture(spec, proxy=PROXY, settings=FIX)
    refused = refusals(findings)
    assert [f.check for f in refused] == [check]
    assert str(refused[0]).startswith("pod: ")
    assert message in str(refused[0])


def test_harmless_host_paths_pass():
    spec = {**pod(), "volumes": [{"name": "logs", "hostPath": {"path": "/var/log/pods"}}]}
    assert review_posture(spec, proxy=PROXY, settings=DENY) == []


def test_supplemental_group_of_the_proxy_is_removed_in_fix_mode():
    spec = {**pod(), "securityContext": {"supplementalGroups": [5, 1337, 7]}}
    (finding,) = review_posture(spec, proxy=PROXY, settings=FIX)
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
    findings = review_posture(spec, proxy=PROXY, settings=FIX)
    assert sorted(f.check for f in findings) == [Check.MISSING_UID, Check.SHARED_UID]
    uids = [
        c["securityContext"]["runAsUser"] for c in spec["containers"] if c["name"] != "istio-proxy"
    ]
    assert uids == [20001, 20000, 20002]
    assert len(set(uids)) == 3


def test_missing_uid_in_deny_mode_says_how_to_fix():
    spec = pod()
    del spec["containers"][0]["securityContext"]["runAsUser"]
    (finding,) = review_posture(spec, proxy=PROXY, settings=DENY)
    assert "set a distinct runAsUser" in str(finding)


def test_configured_per_check_action_overrides_the_default():
    settings = PostureSettings(default_action=Action.FIX, actions={Check.PRIVILEGED: Action.DENY})
    findings = review_posture(pod(privileged=True), proxy=PROXY, settings=settings)
    assert [f.check for f in refusals(findings)] == [Check.PRIVILEGED]


def test_native_sidecars_and_init_containers_are_checked_too():
    spec = pod()
    spec["initContainers"].append({"name": "migrate", "securityContext": {"privileged": True}})
    findings = review_posture(spec, proxy=PROXY, settings=DENY)
    assert {f.where for f in findings} == {"container 'migrate'"}
