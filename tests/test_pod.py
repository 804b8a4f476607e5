"""The pod view's classification: Istio's and meshguard's containers only where Istio's status
and their place say so, never by name alone."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshguard.errors import MalformedInputError
from meshguard.init_container import InitContainerSettings, init_container
from meshguard.pod import Role, read_pod
from tests.support.samples import (
    injected_sample_names,
    istio_pod,
    load_templates,
)

STATUS = "sidecar.istio.io/status"


def roles(pod: dict[str, Any], **kwargs: Any) -> dict[str, Role]:
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"], **kwargs)
    return {c.name: c.role for c in (*view.containers, *view.ephemeral)}


def test_istio_s_layout_is_recognized_with_its_status():
    assert roles(istio_pod()) == {
        "istio-init": Role.MESH_INIT, "istio-proxy": Role.PROXY, "app": Role.CONTAINER}  # fmt: skip
    assert roles(istio_pod(cni=True))["istio-validation"] is Role.MESH_INIT
    assert roles(istio_pod(native=False))["istio-proxy"] is Role.PROXY


@pytest.mark.parametrize("name", ["istio-init", "istio-validation", "meshguard-init"])
@pytest.mark.parametrize(
    ("field", "restart", "role"),
    [
        ("containers", None, Role.CONTAINER),
        ("initContainers", "Always", Role.SIDECAR),
        ("initContainers", None, Role.INIT),  # not listed by the status
    ],
)
def test_init_step_names_elsewhere_are_workload_containers(name, field, restart, role):
    pod = istio_pod(cni=name == "istio-init")
    container: dict[str, Any] = {"name": name, "image": "x"}
    if restart:
        container["restartPolicy"] = restart
    pod["spec"][field].append(container)
    assert roles(pod)[name] is role
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    assert name in {c.name for c in view.workload}


def test_a_listed_init_step_with_restart_policy_always_is_not_istio_s():
    pod = istio_pod()
    pod["spec"]["initContainers"][0]["restartPolicy"] = "Always"
    assert roles(pod)["istio-init"] is Role.SIDECAR


@pytest.mark.parametrize(
    ("status", "field", "restart", "role"),
    [
        ({"initContainers": ["istio-proxy"]}, "containers", None, Role.CONTAINER),
        ({"initContainers": ["istio-proxy"]}, "initContainers", None, Role.INIT),
        ({"containers": ["istio-proxy"]}, "initContainers", "Always", Role.SIDECAR),
        ({"initContainers": [], "containers": []}, "containers", None, Role.CONTAINER),
        ({"initContainers": ["istio-proxy"]}, "initContainers", "Always", Role.PROXY),
        ({"containers": ["istio-proxy"]}, "containers", None, Role.PROXY),
    ],
)
def test_istio_proxy_is_the_proxy_only_where_the_status_lists_it(status, field, restart, role):
    container: dict[str, Any] = {"name": "istio-proxy"}
    if restart:
        container["restartPolicy"] = restart
    pod = {"metadata": {"annotations": {STATUS: json.dumps(status)}}, "spec": {field: [container]}}
    assert roles(pod)["istio-proxy"] is role


def test_meshguard_init_is_meshguard_s_only_as_generated_right_after_istio_s_step():
    own = init_container(InitContainerSettings())
    pod = istio_pod()
    pod["spec"]["initContainers"].insert(1, copy.deepcopy(own))
    assert roles(pod)["meshguard-init"] is Role.MESH_INIT
    assert roles(pod, init_settings=InitContainerSettings())["meshguard-init"] is Role.MESH_INIT
    other = InitContainerSettings(image="example.com/meshguard:old")
    assert roles(pod, init_settings=other)["meshguard-init"] is Role.INIT
    pod["spec"]["initContainers"][1]["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")
    assert roles(pod)["meshguard-init"] is Role.INIT
    pod = istio_pod()
    pod["spec"]["initContainers"].append(copy.deepcopy(own))  # after the proxy: misplaced
    assert roles(pod)["meshguard-init"] is Role.INIT


def test_ephemeral_containers_are_in_their_own_tuple_and_no_workload():
    pod = istio_pod()
    pod["spec"]["ephemeralContainers"] = [{"name": "debug", "securityContext": {"runAsUser": 9}}]
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    assert [(c.name, c.role, c.uid, c.where) for c in view.ephemeral] == [
        ("debug", Role.EPHEMERAL, 9, "spec.ephemeralContainers[0]")
    ]
    assert "debug" not in {c.name for c in view.workload}
    assert view.container("debug") is None


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("{not json", "expected Istio's JSON status"),
        ("[]", "expected a JSON object"),
        ('{"initContainers": "istio-init"}', ".initContainers: expected a list of container"),
        ('{"containers": [1]}', ".containers: expected a list of container names"),
    ],
)
def test_a_malformed_istio_status_is_refused_naming_the_annotation(status, message):
    pod = istio_pod()
    pod["metadata"]["annotations"][STATUS] = status
    with pytest.raises(MalformedInputError, match=r"metadata\.annotations\[sidecar\.istio\.io"):
        read_pod(metadata=pod["metadata"], spec=pod["spec"])
    with pytest.raises(MalformedInputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_pod(metadata=pod["metadata"], spec=pod["spec"])


@pytest.mark.parametrize("name", injected_sample_names() or ["(../shared absent)"])
def test_every_istio_sample_s_own_containers_are_recognized(name: str):
    if name.startswith("("):
        pytest.skip("../shared/istio-injector-samples is absent")
    for template in load_templates(name):
        view = read_pod(metadata=template.metadata, spec=template.spec)
        named = {
            c["name"]
            for key in ("initContainers", "containers")
            for c in template.spec.get(key) or []
        }
        if "istio-proxy" in named:
            assert view.proxy is not None and view.proxy.name == "istio-proxy"
        for step in ("istio-init", "istio-validation"):
            if step in named:
                assert view.container(step).role is Role.MESH_INIT
        assert not {c.name for c in view.workload} & {"istio-init", "istio-validation",
                                                       "istio-proxy"}  # fmt: skip


# --- properties over random layouts and statuses -------------------------------------------

NAMES = ["istio-init", "istio-validation", "istio-proxy", "meshguard-init", "app", "cache"]
_container = st.builds(
    lambda name, restart: {"name": name, **({"restartPolicy": "Always"} if restart else {})},
    st.sampled_from(NAMES),
    st.booleans(),
)
_status = (
    st.none()
    | st.fixed_dictionaries(
        {},
        optional={
            "initContainers": st.none() | st.lists(st.sampled_from(NAMES), max_size=4),
            "containers": st.none() | st.lists(st.sampled_from(NAMES), max_size=3),
            "revision": st.text(max_size=5),
        },
    ).map(json.dumps)
    | st.text(max_size=20)
)


@settings(max_examples=400, deadline=None)
@given(
    init=st.lists(_container, max_size=5),
    regular=st.lists(_container, max_size=4),
    status=_status,
)
def test_classification_never_trusts_a_name_alone(init, regular, status):
    for container in regular:
        container.pop("restartPolicy", None)
    metadata: dict[str, Any] = {"annotations": {} if status is None else {STATUS: status}}
    spec = {"initContainers": init, "containers": regular}
    try:
        view = read_pod(metadata=metadata, spec=spec)
    except MalformedInputError:
        return  # duplicate names or a malformed status: refused, naming the field
    listed: dict[str, Any] = {}
    if status is not None:
        listed = json.loads(status)
    for container in view.containers:
        item = spec[container.field][container.index]
        restartable = item.get("restartPolicy") == "Always"
        if container.role is Role.PROXY:
            assert container.name == "istio-proxy"
            if status is not None:
                key = "initContainers" if container.field == "initContainers" else "containers"
                assert "istio-proxy" in (listed.get(key) or [])
            assert restartable == (container.field == "initContainers")
        elif container.role is Role.MESH_INIT:
            assert container.field == "initContainers" and not restartable
            if container.name == "meshguard-init":
                pytest.fail("a bare meshguard-init is never meshguard's")
            assert container.name in {"istio-init", "istio-validation"}
            if status is not None:
                assert container.name in (listed.get("initContainers") or [])
            else:
                assert container.index == 0
        else:
            assert container in view.workload
    assert len([c for c in view.containers if c.role is Role.PROXY]) <= 1
