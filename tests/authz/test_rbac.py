"""The native engine's compiler (meshguard.rbac) says what the decision says.

The RBAC document and the ambiguity regexes are checked here against
:mod:`meshguard.authz.decision` with Python's ``re`` standing in for RE2 (the regexes use
only their common syntax); the real Envoy runs them in ``test_engines_differential.py``.
Also: the document is deterministic, names rules and containers, never trusts
``remote_ip``, and injection writes it, mounts it and records its digest in the admitted
record.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import meshguard
from meshguard.admitted import TamperedError, read_admitted
from meshguard.authz.decision import method_ambiguity, path_ambiguity
from meshguard.describe import EngineDocument, PodRef, describe_pod, protection, text_lines
from meshguard.errors import PolicyError
from meshguard.inject.l7 import L7_VOLUME
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.l7 import L7Engine
from meshguard.policy import Mode, parse_policy
from meshguard.rbac import (
    compile_rbac,
    method_parameter_regex,
    path_ambiguity_regexes,
    path_regex,
    rbac_document_text,
)
from meshguard.rules.compiler import CompilerSettings
from meshguard.status import read_status
from tests.authz.test_path_ambiguity import ALLOWED, DENIED, TARGET, clean_targets
from tests.support.netfilter import Netfilter, pod_for

# Istio's patterns closed: the document holds exactly these rules (the patterns are tested
# where they are added, tests/webhook/test_rollout.py and the decision's tests).
POLICY = parse_policy(
    """
istioPatterns: false
rules:
  - from: app
    to: proxy
    ports: [15020]
    http: {methods: [POST], paths: ["/quitquitquit"]}
  - from: "*"
    to: app
    ports: [8080, 8081]
    http: {methods: [GET], paths: ["/api/*"], headers: {x-token: abc}}
  - from: cache
    to: app
    ports: [9090]
"""
)
SOURCES = {"app": ("127.0.100.1", "fd6d:6775::1"), "cache": ("127.0.100.2", "fd6d:6775::2")}
BAD, GOOD = (re.compile(r) for r in path_ambiguity_regexes())


def native_ambiguous(target: str) -> bool:
    return bool(BAD.fullmatch(target)) or not GOOD.fullmatch(target)


def test_the_document_is_deterministic_and_names_rule_and_container():
    one = rbac_document_text(compile_rbac(policy=POLICY, mode=Mode.ENFORCE, sources=SOURCES))
    again = rbac_document_text(compile_rbac(policy=POLICY, mode=Mode.ENFORCE, sources=SOURCES))
    assert one == again
    (resource,) = json.loads(one)["resources"]
    config = resource["typed_config"]
    assert config["rules"]["action"] == "ALLOW"
    assert sorted(config["rules"]["policies"]) == [
        "rules[000]/app", "rules[001]/app", "rules[001]/cache", "rules[002]/cache",
    ]  # fmt: skip
    assert sorted(config["shadow_rules"]["policies"]) == ["app", "cache"]
    # the SNAT source, never remote_ip (X-Forwarded-For sets it)
    assert '"remote_ip"' not in one and '"direct_remote_ip"' in one
    assert '"source_ip"' not in one


def test_audit_mode_logs_instead_of_enforcing():
    config = compile_rbac(policy=POLICY, mode=Mode.AUDIT, sources=SOURCES)["resources"][0]
    assert config["typed_config"]["rules"]["action"] == "LOG"


def test_default_allow_is_a_policy_of_known_sources_only():
    allow = parse_policy("{defaultAction: allow, istioPatterns: false}")
    config = compile_rbac(policy=allow, mode=Mode.ENFORCE, sources=SOURCES)["resources"][0]
    (only,) = config["typed_config"]["rules"]["policies"].values()
    addresses = json.dumps(only["principals"])
    assert all(a in addresses for pair in SOURCES.values() for a in pair)


@pytest.mark.parametrize("target", sorted(DENIED) + ALLOWED)
def test_the_ambiguity_regexes_agree_with_the_decision_on_the_curated_paths(target: str):
    assert native_ambiguous(target) is (path_ambiguity(target) is not None)


@settings(max_examples=1500, deadline=None)
@given(target=TARGET | clean_targets())
def test_the_ambiguity_regexes_agree_with_the_decision(target: str):
    assert native_ambiguous(target) is (path_ambiguity(target) is not None), target


QUERY_NAMES = st.sampled_from(
    ["_method", "_METHOD", "%5Fmethod", "%5fm%65thod", "_%6Dethod", "method", "x_method",
     "_methods", "_metho", "a", "%5F", "_method[]", "_me%74hod"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    names=st.lists(QUERY_NAMES, min_size=1, max_size=3),
    separator=st.sampled_from(["&", ";"]),
    value=st.sampled_from(["", "=DELETE", "=", "=a&b"]),
)
def test_the_method_parameter_regex_agrees_with_the_decision(
    names: list[str], separator: str, value: str
):
    target = "/api/x?" + separator.join(f"{name}{value}" for name in names)
    native = re.fullmatch(method_parameter_regex(), target) is not None
    assert native is (method_ambiguity(target, {}) is not None), target


@settings(max_examples=800, deadline=None)
@given(
    pattern=st.sampled_from(["/api/*", "/api", "/a;b", "/api/v1*", "/quit", "/*", "/a?b"]),
    path=st.sampled_from(["/api", "/api/", "/api/x", "/api;v=1/x", "/api/x;y", "/apix",
                          "/api?x", "/api/x?y=/z", "/quit", "/quit;x", "/a;b", "/a", "/"]),
)  # fmt: skip
def test_path_regexes_hold_the_parameter_rule(pattern: str, path: str):
    """The decision matches the path as received and with its parameters stripped."""
    views = {
        path.split("?", maxsplit=1)[0],
        "/".join(s.split(";")[0] for s in path.split("?", maxsplit=1)[0].split("/")),
    }
    prefix = pattern.endswith("*")
    expected = all(v.startswith(pattern[:-1]) if prefix else v == pattern for v in views)
    regex = path_regex(pattern)
    native = regex is not None and re.fullmatch(regex, path) is not None
    assert native is expected, (pattern, path)


# --- injection ---------------------------------------------------------------------------

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"


def injected(annotations: dict[str, str] | None = None, **settings: Any) -> dict[str, Any]:
    pod = pod_for(yaml.safe_load(EXAMPLE.read_text()), Netfilter.IPTABLES_NFT)
    pod["metadata"]["annotations"].update(
        {"meshguard.io/policy": json.dumps(POLICY.model_dump(mode="json", by_alias=True))}
    )
    pod["metadata"]["annotations"].update(annotations or {})
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, **settings)
    )
    return pod


def test_injection_writes_mounts_and_records_the_document():
    pod = injected()
    annotations = pod["metadata"]["annotations"]
    text = annotations["meshguard.io/l7-rbac"]
    assert pod["metadata"]["labels"]["meshguard.io/l7-engine"] == "native"
    record = read_admitted(read_status(annotations["meshguard.io/status"]) or pytest.fail())
    assert record is not None
    assert record.l7_engine == "native"
    assert record.rbac_digest == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    (volume,) = (v for v in pod["spec"]["volumes"] if v["name"] == L7_VOLUME)
    (item,) = volume["downwardAPI"]["items"]
    assert item["fieldRef"]["fieldPath"] == "metadata.annotations['meshguard.io/l7-rbac']"
    proxies = [
        c for key in ("containers", "initContainers") for c in pod["spec"].get(key) or []
        if c["name"] == "istio-proxy"
    ]  # fmt: skip
    (proxy,) = proxies
    mount = next(m for m in proxy["volumeMounts"] if m["name"] == L7_VOLUME)
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/meshguard/l7", True)
    # what the document says is what the admitted record's policy compiles to
    status = read_status(annotations["meshguard.io/status"])
    assert status is not None
    sources = {c: tuple(a) for c, a in status.listener.sources.items()}
    expected = compile_rbac(policy=record.policy, mode=record.mode, sources=sources)
    assert text == rbac_document_text(expected)


def test_injecting_twice_keeps_one_volume_and_mount():
    pod = injected()
    again = copy.deepcopy(pod)
    inject_pod(again["metadata"], again["spec"], settings=InjectSettings(request_template=False))
    assert again == pod


def test_a_pod_or_install_choosing_ext_authz_carries_no_document():
    for pod in (
        injected({"meshguard.io/l7-engine": "ext-authz"}),
        injected(l7_engine=L7Engine.EXT_AUTHZ),
    ):
        assert "meshguard.io/l7-rbac" not in pod["metadata"]["annotations"]
        assert pod["metadata"]["labels"]["meshguard.io/l7-engine"] == "ext-authz"
        assert all(v["name"] != L7_VOLUME for v in pod["spec"].get("volumes") or [])
        status = read_status(pod["metadata"]["annotations"]["meshguard.io/status"])
        assert status is not None
        record = read_admitted(status)
        assert record is not None and record.rbac_digest is None


def test_a_forged_document_is_replaced_and_a_bad_engine_refused():
    pod = injected({"meshguard.io/l7-rbac": '{"resources": []}'})
    assert pod["metadata"]["annotations"]["meshguard.io/l7-rbac"] != '{"resources": []}'
    with pytest.raises(PolicyError, match=r"meshguard\.io/l7-engine"):
        injected({"meshguard.io/l7-engine": "wasm"})


def _described(pod: dict):
    metadata, spec = pod["metadata"], pod["spec"]
    return describe_pod(
        ref=PodRef(kind="Pod", name="p"),
        metadata=metadata,
        spec=spec,
        verdict=protection(metadata, spec),
        settings=CompilerSettings(),
    )


def _engine_lines(pod: dict) -> list[str]:
    return [
        line for line in text_lines(_described(pod)) if "L7 engine" in line or "compiled" in line
    ]


def test_describe_shows_the_engine_and_the_compiled_rules():
    pod = injected()
    engine = _described(pod).engine
    assert engine is not None
    assert (engine.name, engine.document) == ("native", EngineDocument.ADMITTED)
    assert "rules[000]/app" in engine.rules
    lines = _engine_lines(pod)
    assert lines[0].startswith("L7 engine: native (Envoy RBAC in the sidecar, document sha256:")
    assert "rules[000]/app" in lines[1]
    pod["metadata"]["annotations"]["meshguard.io/l7-rbac"] = '{"resources": []}'
    assert _described(pod).engine.document is EngineDocument.CHANGED
    assert "not the document admitted" in _engine_lines(pod)[0]
    ext = injected({"meshguard.io/l7-engine": "ext-authz"})
    assert _engine_lines(ext) == [
        "L7 engine: ext-authz (meshguard serve-authz decides each request)"
    ]


@pytest.mark.parametrize("l7", ["native", ["native"], {"engine": 1}, {"rbac": {"x": 1}}])
def test_a_malformed_l7_entry_in_the_record_is_tampering_not_a_crash(l7: object):
    pod = injected()
    status = json.loads(pod["metadata"]["annotations"]["meshguard.io/status"])
    status["admitted"]["l7"] = l7
    parsed = read_status(json.dumps(status))
    assert parsed is not None
    with pytest.raises(TamperedError, match="l7"):
        read_admitted(parsed)


def test_an_edited_rbac_digest_does_not_verify():
    pod = injected()
    status = json.loads(pod["metadata"]["annotations"]["meshguard.io/status"])
    status["admitted"]["l7"]["rbac"] = "sha256:" + "0" * 64
    parsed = read_status(json.dumps(status))
    assert parsed is not None
    with pytest.raises(TamperedError, match="digest mismatch"):
        read_admitted(parsed)
