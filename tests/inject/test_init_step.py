"""Which init step a pod gets: never more privilege than Istio's injection gave it.

Pods Istio gave no init step although they have workload containers (its ``grpc-agent``
template, ``sidecar.istio.io/interceptionMode: NONE``) are built from Istio's real injector
outputs (:data:`tests.support.samples.NO_INIT_STEP_SHAPES`)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from meshguard.describe_protection import protection
from meshguard.describe_schema import Protection
from meshguard.errors import RefusedError
from meshguard.init_container import MESHGUARD_INIT, MESHGUARD_VALIDATION
from meshguard.inject.init_step import InstallMode, WithoutIstioInit, install_mode
from meshguard.inject.transform import InjectSettings, OptOut, Outcome, inject_pod
from meshguard.pod import read_pod
from meshguard.webhook.review import MAX_WARNING_CHARS
from tests.support import pss
from tests.support.keys import SIGNER
from tests.support.samples import (
    ISTIO_INIT_STEPS,
    NO_INIT_STEP_SHAPES,
    grpc_agent,
    injected_sample_names,
    sample_pod,
)

SAMPLES = injected_sample_names() or ["(../shared absent)"]
SHAPES = NO_INIT_STEP_SHAPES


def _settings(without: WithoutIstioInit, **knobs: Any) -> InjectSettings:
    return InjectSettings(
        request_template=False, signer=SIGNER, without_istio_init=without, **knobs
    )


def _baseline(metadata: dict[str, Any], spec: dict[str, Any]) -> set[pss.Violation]:
    annotations = metadata.get("annotations") or {}
    return pss.violations(spec, level="baseline", annotations=annotations)


def _own(spec: dict[str, Any]) -> list[str]:
    init = spec.get("initContainers") or []
    return [c["name"] for c in init if c["name"].startswith("meshguard")]


@pytest.mark.parametrize("shape", SHAPES)
def test_a_pod_without_istio_init_is_left_alone_by_default_with_the_reason(shape):
    metadata, spec = SHAPES[shape]()
    assert not [c for c in spec.get("initContainers") or [] if c["name"] in ISTIO_INIT_STEPS]
    assert _baseline(metadata, spec) == set()  # Istio kept it at Pod Security baseline
    before = copy.deepcopy((metadata, spec))
    result = inject_pod(metadata, spec, settings=InjectSettings(request_template=False))
    assert result.outcome is Outcome.SKIPPED
    assert result.reason.startswith("Istio gave it no init step")
    assert ("interceptionMode: NONE" if "NONE" in shape else "template grpc-agent") in (
        result.reason
    )
    assert "meshguard adds no privileged container" in result.reason
    # the webhook's warning carries all of it (a longer one is cut)
    assert len(f"meshguard skipped this pod: {result.reason}") <= MAX_WARNING_CHARS
    assert (metadata, spec) == before and result.operations == ()


@pytest.mark.parametrize("shape", SHAPES)
def test_node_installs_from_the_node_and_the_pod_stays_at_baseline(shape):
    metadata, spec = SHAPES[shape]()
    settings = _settings(WithoutIstioInit.NODE)
    result = inject_pod(metadata, spec, settings=settings)
    assert result.outcome is Outcome.INJECTED, result.reason
    assert _own(spec) == [MESHGUARD_VALIDATION]
    assert spec["initContainers"][0]["name"] == MESHGUARD_VALIDATION  # first: nothing before
    assert _baseline(metadata, spec) == set()
    assert not any(v["name"] == "meshguard-ruleset" for v in spec.get("volumes") or [])
    view = read_pod(metadata=metadata, spec=spec)
    assert install_mode(view, without_istio_init=WithoutIstioInit.NODE) is InstallMode.CNI
    # admitted again (a reinvocation): recognized as meshguard's, nothing changes
    again = inject_pod(metadata, spec, settings=settings)
    assert again.outcome is Outcome.INJECTED and again.operations == ()


@pytest.mark.parametrize("shape", SHAPES)
def test_privileged_adds_a_root_meshguard_init_only_when_asked(shape):
    metadata, spec = SHAPES[shape]()
    result = inject_pod(metadata, spec, settings=_settings(WithoutIstioInit.PRIVILEGED))
    assert result.outcome is Outcome.INJECTED, result.reason
    assert _own(spec) == [MESHGUARD_INIT]
    assert _baseline(metadata, spec) == MESHGUARD_INIT_CAPABILITIES


@pytest.mark.parametrize("shape", SHAPES)
def test_where_pod_opt_out_is_refused_a_pod_without_istio_init_is_refused(shape):
    """An author may choose interceptionMode NONE (or the grpc-agent template) to leave
    meshguard out: under opt-out refuse that is refused, unless the namespace is exempt."""
    metadata, spec = SHAPES[shape]()
    refuse = _settings(WithoutIstioInit.SKIP, opt_out=OptOut.REFUSE)
    with pytest.raises(RefusedError) as refused:
        inject_pod(copy.deepcopy(metadata), copy.deepcopy(spec), settings=refuse)
    message = str(refused.value)
    assert "Istio gave it no init step" in message
    assert "withoutIstioInit to node (with cni.enabled) or privileged" in message
    assert "meshguard.io/opt-out=allowed" in message
    exempt = _settings(WithoutIstioInit.SKIP, opt_out=OptOut.REFUSE, opt_out_exempt=lambda _: True)
    assert inject_pod(metadata, spec, settings=exempt).outcome is Outcome.SKIPPED
    # refused or not, node protects it without privilege
    node = _settings(WithoutIstioInit.NODE, opt_out=OptOut.REFUSE)
    assert inject_pod(metadata, spec, settings=node).outcome is Outcome.INJECTED


@pytest.mark.parametrize("without", [WithoutIstioInit.SKIP, WithoutIstioInit.NODE])
@pytest.mark.parametrize("sample", [*SAMPLES, *SHAPES])
def test_meshguard_never_lowers_a_pods_pod_security_level(sample, without):
    """The class: whatever Istio's injection made of a pod, meshguard's unprivileged
    settings add no Pod Security baseline violation that Istio's own init step does not
    already have (meshguard-init's two capabilities only where istio-init holds them)."""
    if sample in SHAPES:
        metadata, spec = SHAPES[sample]()
    else:
        metadata, spec = sample_pod(sample)
    before = _baseline(metadata, spec)
    try:
        inject_pod(metadata, spec, settings=_settings(without))
    except RefusedError:
        return  # refused: no pod at all
    added = _baseline(metadata, spec) - before
    if _capabilities(before, "istio-init") == ISTIO_INIT_CAPABILITIES:
        assert added in (set(), MESHGUARD_INIT_CAPABILITIES), added
    else:
        assert added == set(), added


ISTIO_INIT_CAPABILITIES = {
    pss.Violation("istio-init", f"capability {c}") for c in ("NET_ADMIN", "NET_RAW")
}
MESHGUARD_INIT_CAPABILITIES = {
    pss.Violation("meshguard-init", f"capability {c}") for c in ("NET_ADMIN", "NET_RAW")
}


def _capabilities(found: set[pss.Violation], owner: str) -> set[pss.Violation]:
    """The capabilities beyond baseline that ``owner`` adds, among ``found``."""
    return {v for v in found if v.owner == owner and v.check.startswith("capability ")}


def test_describe_says_why_a_pod_without_istio_init_is_unprotected():
    metadata, spec = grpc_agent()
    verdict = protection(metadata, spec)
    assert verdict.protection is Protection.UNPROTECTED
    assert "Istio gave it no init step (injection template grpc-agent)" in verdict.line


def _before_istio(**annotations: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Istio's sample before its injection (no istio-proxy yet), with these annotations."""
    metadata, spec = sample_pod("hello.yaml")
    metadata.setdefault("annotations", {}).update(annotations)
    return metadata, spec


@pytest.mark.parametrize(
    ("annotations", "requested"),
    [
        ({}, True),
        ({"inject.istio.io/templates": "sidecar,custom"}, True),
        ({"inject.istio.io/templates": "grpc-agent"}, False),
        ({"inject.istio.io/templates": "gateway"}, False),
        ({"sidecar.istio.io/interceptionMode": "NONE"}, False),
        ({"sidecar.istio.io/interceptionMode": "none"}, False),
        ({"sidecar.istio.io/interceptionMode": "TPROXY"}, True),
    ],
)
def test_the_meshguard_template_is_asked_for_only_where_istio_adds_an_init_step(
    annotations, requested
):
    """Before Istio's injection (requestTemplate): the template adds a root meshguard-init,
    so it is asked for only beside Istio's sidecar template with its capture; elsewhere the
    pod goes on to Istio unchanged, unless the installation chose privileged."""
    metadata, spec = _before_istio(**annotations)
    before = copy.deepcopy(metadata)
    result = inject_pod(metadata, spec, settings=InjectSettings())
    if requested:
        assert result.outcome is Outcome.TEMPLATE_REQUESTED
        assert "meshguard" in metadata["annotations"]["inject.istio.io/templates"].split(",")
        return
    assert result.outcome is Outcome.SKIPPED
    assert "adds no init step: not requested" in result.reason
    assert metadata == before
    privileged = InjectSettings(without_istio_init=WithoutIstioInit.PRIVILEGED)
    assert inject_pod(metadata, spec, settings=privileged).outcome is (Outcome.TEMPLATE_REQUESTED)
