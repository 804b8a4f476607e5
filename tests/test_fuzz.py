"""Property-based bad input for the components that read what users and peers send:
manifests (``meshguard inject``/``rules``), and gRPC CheckRequests. Mutations start from
Istio's real injector outputs. Whatever the input: an answer or a meshguard error that says
what is wrong — never another exception."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshguard.authz.decision import PodPolicy
from meshguard.authz.server import check, request_of, response_of
from meshguard.authz.store import StaticStore
from meshguard.errors import MeshguardError
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.manifests import pod_templates, read_documents
from meshguard.pod import read_pod
from meshguard.rules.compiler import CompilerSettings, compile_pod
from tests.support.keys import SIGNER
from tests.support.samples import injected_sample_names
from tests.support.shared import INJECTOR_SAMPLES

SAMPLES = [
    [d for d in read_documents(INJECTOR_SAMPLES / name) if d] for name in injected_sample_names()
] or [
    [{"kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [{"name": "istio-proxy"}]}}]
]

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**33), 2**33) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated_documents(draw: st.DrawFn) -> list[Any]:
    documents = copy.deepcopy(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(documents) if p]
        path = draw(st.sampled_from(paths))
        parent = documents
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_json)
    return documents


def _through_meshguard(documents: list[Any]) -> None:
    for template in pod_templates(documents):
        pod = read_pod(metadata=template.metadata, spec=template.spec)
        if pod.proxy is not None:
            compile_pod(pod, settings=CompilerSettings())
        inject_pod(template.metadata, template.spec, settings=InjectSettings(signer=SIGNER))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_documents())
def test_mutated_istio_manifests_give_a_result_or_a_meshguard_error(documents):
    try:
        _through_meshguard(documents)
    except MeshguardError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_as_a_manifest(text):
    try:
        _through_meshguard(read_documents(text))
    except MeshguardError as exc:
        assert str(exc)


STORE = StaticStore(
    [PodPolicy.from_pod(
        key="shop/web",
        annotations={
            "meshguard.io/policy": "rules: [{from: app, to: proxy, ports: [15020],"
            " http: {paths: [/q]}}]",
            "meshguard.io/status": '{"listener": {"sources": {"app": ["127.0.100.1"]}}}',
        },
        ports={},
    )]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    address=st.text(max_size=40) | st.sampled_from(["127.0.100.1", "::1", ""]),
    port=st.integers(0, 2**32 - 1),
    method=st.text(max_size=10),
    path=st.text(max_size=200),
    headers=st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=50), max_size=8).map(
        lambda h: {**h, **({"x-meshguard-pod": "shop/web"} if len(h) % 2 else {})}
    ),
)
def test_any_check_request_is_answered_allow_or_deny(address, port, method, path, headers):
    from envoy.service.auth.v3 import external_auth_pb2  # noqa: PLC0415

    message = external_auth_pb2.CheckRequest()
    message.attributes.source.address.socket_address.address = address
    message.attributes.destination.address.socket_address.port_value = port
    message.attributes.request.http.method = method
    message.attributes.request.http.path = path
    message.attributes.request.http.headers.update(headers)
    request = request_of(message)
    decision = check(request, STORE, header_bytes=sum(len(k) + len(v) for k, v in headers.items()))
    response = response_of(decision)
    assert response.status.code in {0, 7}
    assert decision.reason
    if decision.allowed:
        assert decision.reason.startswith("allowed by rules[0]")
        assert address == "127.0.100.1" and port == 15020 and path.split("?")[0] == "/q"
