"""The injection transform: one pod (metadata + spec) in, the meshguard pod out.

Before Istio has injected the pod (no ``istio-proxy`` yet) the transform only asks Istio
for the ``meshguard`` template next to its own (``inject.istio.io/templates``); the webhook
is reinvoked after Istio (``reinvocationPolicy: IfNeeded``). Once the proxy is there: parse
the policy, check the posture (refuse, or fix and warn), compile the ruleset, record it and
the status on the pod, and put ``meshguard-init`` right after ``istio-init`` (or
``istio-validation`` in Istio CNI mode), whether the template already added it or not.
Pure (dicts in, edited in place): the webhook diffs a copy into a JSONPatch, the CLI prints
the edited documents. Applying it twice equals applying it once.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Final

from meshguard import __version__, names
from meshguard.errors import RefusedError
from meshguard.inject.container import (
    RULESET_VOLUME,
    InitContainerSettings,
    init_container,
    ruleset_volume,
)
from meshguard.inject.posture import PostureSettings, refusals, review_posture
from meshguard.pod import (
    ISTIO_INIT,
    ISTIO_VALIDATION,
    MESHGUARD_INIT,
    PodView,
    check_shape,
    read_pod,
)
from meshguard.policy import parse_mode, parse_opt_out, parse_policy
from meshguard.rules.compiler import CompilerSettings, compile_cached
from meshguard.rules.ruleset import Ruleset

TEMPLATE_NAME: Final = "meshguard"
ISTIO_DEFAULT_TEMPLATES: Final = "sidecar"
AMBIENT_ANNOTATION: Final = "ambient.istio.io/redirection"
AMBIENT_LABEL: Final = "istio.io/dataplane-mode"


class Outcome(enum.StrEnum):
    INJECTED = "injected"
    TEMPLATE_REQUESTED = "template-requested"
    SKIPPED = "skipped"


@dataclass(frozen=True, kw_only=True)
class InjectSettings:
    posture: PostureSettings = field(default_factory=PostureSettings)
    compiler: CompilerSettings = field(default_factory=CompilerSettings)
    init: InitContainerSettings = field(default_factory=InitContainerSettings)
    #: Before Istio injected: ask for the ``meshguard`` template (istiod must have it).
    request_template: bool = True


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    warnings: tuple[str, ...] = ()
    reason: str = ""
    ruleset: Ruleset | None = None


def inject_pod(
    metadata: dict[str, Any], spec: dict[str, Any], *, settings: InjectSettings
) -> Result:
    """Transform one pod in place; :class:`RefusedError` when it cannot be made safe."""
    check_shape(metadata=metadata, spec=spec)
    annotations: dict[str, Any] = metadata.get("annotations") or {}
    skip = skip_reason(metadata)
    if skip:
        return Result(Outcome.SKIPPED, reason=skip)
    before = read_pod(metadata=metadata, spec=spec)
    if before.proxy is None:
        if not settings.request_template:
            return Result(
                Outcome.SKIPPED, reason="no istio-proxy container (not injected by Istio)"
            )
        _request_template(metadata)
        return Result(Outcome.TEMPLATE_REQUESTED, reason="asked Istio for the meshguard template")
    parse_policy(annotations.get(names.POLICY))  # a bad policy is refused before anything else
    mode = parse_mode(annotations.get(names.MODE))
    findings = review_posture(spec, proxy=before.proxy_identity, settings=settings.posture)
    refused = refusals(findings)
    if refused:
        raise RefusedError(
            f"meshguard refuses pod {before.name or '(unnamed)'}: "
            + "; ".join(str(f) for f in refused)
        )
    pod = read_pod(metadata=metadata, spec=spec)
    ruleset = compile_cached(pod.containers, annotations.get(names.POLICY), mode, settings.compiler)
    annotations = metadata.setdefault("annotations", {})
    annotations[names.RULESET] = ruleset.to_json()
    annotations[names.STATUS] = status_annotation(pod, ruleset, mode=mode.value)
    _place_init_container(spec, init_container(settings.init))
    _set_volume(spec, ruleset_volume())
    warnings = tuple(str(f) for f in findings) + ruleset.warnings
    return Result(Outcome.INJECTED, warnings=warnings, ruleset=ruleset)


def status_annotation(pod: PodView, ruleset: Ruleset, *, mode: str) -> str:
    """``meshguard.io/status``: what was installed, for kubectl and istioctl users."""
    identity = pod.proxy_identity
    status = {
        "version": __version__,
        "ruleset": ruleset.digest,
        "mode": mode,
        "proxy": {"uid": identity.uid, "gid": identity.gid},
        "containers": {c.name: c.uid for c in pod.workload},
        "listener": {
            "port": ruleset.listener_port,
            "sources": {s.container: [s.address4, s.address6] for s in ruleset.sources},
        },
    }
    return json.dumps(status, sort_keys=True, separators=(",", ":"))


def skip_reason(metadata: dict[str, Any]) -> str:
    """Why meshguard leaves this pod alone (opted out, Istio off, ambient), or ""."""
    annotations: dict[str, Any] = metadata.get("annotations") or {}
    labels: dict[str, Any] = metadata.get("labels") or {}
    if parse_opt_out(_text(annotations.get(names.INJECT))):
        return f'opted out ({names.INJECT}: "false")'
    for source in (annotations, labels):
        if str(source.get(names.ISTIO_INJECT, "")).lower() == "false":
            return f'Istio injection is disabled ({names.ISTIO_INJECT}: "false")'
    if annotations.get(AMBIENT_ANNOTATION) == "enabled" or labels.get(AMBIENT_LABEL) == "ambient":
        return "ambient-mode pod (no sidecar): meshguard does not apply"
    return ""


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _request_template(metadata: dict[str, Any]) -> None:
    annotations = metadata.setdefault("annotations", {})
    current = str(annotations.get(names.ISTIO_TEMPLATES) or ISTIO_DEFAULT_TEMPLATES)
    templates = [t.strip() for t in current.split(",") if t.strip()]
    if TEMPLATE_NAME not in templates:
        templates.append(TEMPLATE_NAME)
    annotations[names.ISTIO_TEMPLATES] = ",".join(templates)


def _place_init_container(spec: dict[str, Any], container: dict[str, Any]) -> None:
    """Put meshguard-init right after Istio's init step (first if there is none)."""
    init = [c for c in spec.get("initContainers") or [] if c.get("name") != MESHGUARD_INIT]
    names_ = [c.get("name") for c in init]
    anchor = next((n for n in (ISTIO_INIT, ISTIO_VALIDATION) if n in names_), None)
    position = names_.index(anchor) + 1 if anchor else 0
    init.insert(position, container)
    spec["initContainers"] = init


def _set_volume(spec: dict[str, Any], volume: dict[str, Any]) -> None:
    volumes = [v for v in spec.get("volumes") or [] if v.get("name") != RULESET_VOLUME]
    volumes.append(volume)
    spec["volumes"] = volumes
