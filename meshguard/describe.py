"""A person's summary of a pod's loopback policy: who may talk to whom, and what is enforced.

Pure: (pod view, policy, mode, recorded status) in, lines of text out. Used by
``meshguard describe``, which also says when the live ``policy``/``mode`` annotations differ
from what the webhook admitted (the record the authz server enforces). ``protection`` tells,
for an admitted pod, whether Istio injected its sidecar without meshguard (the pods an
operator must find: ``--fail-on-unprotected``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshguard import annotation_keys
from meshguard.admitted import RECORD as ADMITTED_RECORD
from meshguard.admitted import TamperedError, drift, read_admitted
from meshguard.errors import MeshguardError
from meshguard.init_container import MESHGUARD_INIT, MESHGUARD_VALIDATION
from meshguard.l7 import L7Engine
from meshguard.pod import PROXY_CONTAINER, PodView
from meshguard.policy import (
    ANY_CONTAINER,
    PROXY,
    Action,
    Mode,
    Policy,
    Rule,
    parse_opt_out,
)
from meshguard.rbac import rbac_digest
from meshguard.rules.compiler import CompilerSettings, hairpin_ports
from meshguard.rules.ruleset import Ruleset
from meshguard.status import MalformedStatusError, read_status


def describe(
    pod: PodView,
    policy: Policy,
    *,
    mode: Mode,
    compiled: Ruleset | None,
    settings: CompilerSettings,
    native_nftables: bool = False,
) -> list[str]:
    """The pod in words. ``native_nftables``: the pod's istio-init (or istio-validation)
    runs Istio's native nftables mode, read from its spec as admission reads it."""
    proxy = pod.proxy_identity
    lines = [
        f"mode: {mode.value}"
        + ("  (violations are logged, not blocked)" if mode is Mode.AUDIT else ""),
        f"proxy: uid {proxy.uid}, gid {proxy.gid} — never restricted",
        "containers:",
    ]
    for container in pod.workload:
        uid = "no runAsUser!" if container.uid is None else f"uid {container.uid}"
        ports = ", ".join(f"{p.port}/{p.protocol}" for p in container.ports) or "no declared ports"
        lines.append(f"  {container.name:<20} {uid:<12} {container.role.value:<10} {ports}")
    lines.append("may connect over loopback (besides each container to its own ports):")
    lines += [f"  {_rule_text(rule, index)}" for index, rule in enumerate(policy.rules)] or [
        "  nothing"
    ]
    default = (
        "deny every other loopback flow"
        if policy.default_action is Action.DENY
        else "allow every other loopback flow, except to the proxy's ports"
    )
    protected = ", ".join(map(str, settings.protected_proxy_ports))
    lines += [
        f"default: {default}",
        f"proxy control ports ({protected}): only where a rule above names them;"
        " the proxy's other ports (15000-15090) never, and only the proxy sends from them",
        "Istio's outbound (15001) and DNS (15053) capture: unchanged for every container;"
        " flows between the pod's own processes are never captured",
        f"through the pod's own Service (the proxy dialing the pod): {_hairpin_text(policy)}",
        f"rules installed by: {_installer_text(pod)}",
        f"netfilter: {_backend_text(native_nftables=native_nftables)}",
    ]
    lines += _status_lines(pod.annotations, compiled)
    lines += _admitted_lines(pod.annotations)
    lines += _l7_engine_lines(pod.annotations)
    return lines


def _l7_engine_lines(annotations: Mapping[str, str]) -> list[str]:
    """Which engine makes the pod's L7 decisions, and for the native one whether the RBAC
    document the pod carries is the one admitted, and its compiled rules."""
    try:
        status = read_status(annotations.get(annotation_keys.STATUS))
        record = read_admitted(status) if status is not None else None
    except (MalformedStatusError, TamperedError):
        return []  # said by the lines above
    if record is None or record.l7_engine is None:
        return []
    if record.l7_engine != L7Engine.NATIVE.value:
        return [f"L7 engine: {record.l7_engine} (meshguard serve-authz decides each request)"]
    text = annotations.get(annotation_keys.L7_RBAC)
    if text is None or rbac_digest(text) != record.rbac_digest:
        return [
            f"L7 engine: native — {annotation_keys.L7_RBAC} is missing or not the document"
            " admitted: the sidecar denies every L7 request (or runs what was edited in): delete"
            " the pod so that meshguard admits it again"
        ]
    try:
        (resource,) = json.loads(text)["resources"]
        ids = sorted(resource["typed_config"]["rules"]["policies"])
    except (ValueError, KeyError, TypeError):
        ids = []
    return [
        f"L7 engine: native (Envoy RBAC in the sidecar, document {record.rbac_digest[:19]}…,"
        " as admitted)",
        f"  compiled rules: {', '.join(ids) or 'none (every L7 request denied)'}",
    ]


def _installer_text(pod: PodView) -> str:
    """Which install mode the pod is in: meshguard-init, or Istio CNI mode (from the node)."""
    steps = {c.name for c in pod.mesh_init}
    if MESHGUARD_VALIDATION in steps:
        return (
            "the node (Istio CNI mode: meshguard's chained CNI plugin),"
            f" checked in the pod by {MESHGUARD_VALIDATION} (no capabilities)"
        )
    if MESHGUARD_INIT in steps:
        return f"{MESHGUARD_INIT} (init container, after istio-init)"
    return "nothing yet (no meshguard-init or meshguard-validation in the pod)"


def _backend_text(*, native_nftables: bool) -> str:
    if native_nftables:
        return (
            "native nftables (Istio's init runs --native-nftables): table inet meshguard"
            " beside Istio's inet istio-proxy-nat, uid dispatch through one verdict map;"
            " meshguard-init fails closed if Istio's table is not there"
        )
    return (
        "iptables, in the variant Istio's capture is in (iptables-legacy if it holds rules,"
        " else iptables-nft; meshguard-init detects it, and fails closed if it finds Istio's"
        " native nftables table instead)"
    )


def _hairpin_text(policy: Policy) -> str:
    ports = hairpin_ports(policy)
    if not ports:
        return "refused (no port is open to every container)"
    return "only ports open to every container: " + ", ".join(map(str, ports))


def _rule_text(rule: Rule, index: int) -> str:
    sources = "every container" if ANY_CONTAINER in rule.sources else ", ".join(rule.sources)
    target = "the proxy" if rule.to == PROXY else rule.to
    ports = ", ".join(map(str, rule.ports))
    text = f"[{index}] {sources} -> {target} port {ports}/{rule.protocol.value}"
    if rule.http is not None:
        methods = ", ".join(rule.http.methods) or "any method"
        paths = ", ".join(rule.http.paths) or "any path"
        headers = ", ".join(f"{k}={v}" for k, v in rule.http.headers.items())
        text += f", only {methods} {paths}" + (f" with {headers}" if headers else "")
        text += " (checked per request by the ext_authz server)"
    return text


def _admitted_lines(annotations: Mapping[str, str]) -> list[str]:
    """Whether the live policy and mode are the ones admitted (the authz server enforces
    the admitted ones only)."""
    try:
        status = read_status(annotations.get(annotation_keys.STATUS))
    except MalformedStatusError:
        status = None
    if status is None:
        return []  # said by the status lines
    try:
        record = read_admitted(status)
    except TamperedError as exc:
        return [
            f"admitted: TAMPERED — {exc}; the authz server denies every L7 request to this"
            " pod: delete the pod so that meshguard admits it again"
        ]
    if record is None:
        return [
            f"admitted: no admitted policy record ({ADMITTED_RECORD}) — the authz server"
            " denies every L7 request to this pod: delete the pod so that meshguard admits it"
            " again"
        ]
    changes = drift(record, annotations)
    if not changes:
        return [f"admitted: policy and mode as admitted ({record.digest[:19]}…)"]
    return [
        f"admitted: TAMPERED — changed after admission: {'; '.join(changes)}",
        f"  enforced: the admitted policy in {record.mode.value} mode (the edit opens"
        " nothing); to change the policy, delete the pod and create it anew",
    ]


def _status_lines(annotations: Mapping[str, str], compiled: Ruleset | None) -> list[str]:
    try:
        status = read_status(annotations.get(annotation_keys.STATUS))
    except MalformedStatusError as exc:
        return [f"status: {exc}"]
    if status is None:
        return ["status: not injected by meshguard yet (no meshguard.io/status)"]
    recorded, changes = status.ruleset or "?", status.changes
    changed = [
        "changed by meshguard at admission (posture fixes):",
        *(f"  {text}" for text in changes),
    ]
    if compiled is None:
        return [f"status: ruleset {recorded}", *(changed if changes else [])]
    state = (
        "matches the policy" if recorded == compiled.digest else "STALE: the policy changed since"
    )
    return [f"status: ruleset {recorded} — {state}", *(changed if changes else [])]


class Protection(enum.StrEnum):
    """Whether a pod with Istio's sidecar also has meshguard."""

    #: meshguard recorded its status: its rules are in the pod.
    PROTECTED = "protected"
    #: Istio injected its sidecar and meshguard did not: no loopback isolation.
    UNPROTECTED = "unprotected"
    #: Istio's sidecar without meshguard, by the operator's choice (annotation or label).
    OPTED_OUT = "opted-out"
    #: No Istio sidecar (not in the mesh, injection disabled, ambient mode): nothing to do.
    NO_SIDECAR = "no-sidecar"


@dataclass(frozen=True)
class Verdict:
    protection: Protection
    #: One line for a person ("" when there is nothing to say).
    line: str


def protection(
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    *,
    namespace_opt_out: str = "",
) -> Verdict:
    """Does this admitted pod carry Istio's sidecar without meshguard?

    Istio's sidecar: istio-proxy listed in the ``sidecar.istio.io/status`` annotation Istio's
    injector writes, an unreadable status, or a container (or native sidecar) named
    istio-proxy — deliberately broad, so that a pod is never missed. meshguard: its
    ``meshguard.io/status`` annotation. ``namespace_opt_out``: the reason when the pod's
    namespace carries meshguard's opt-out label.
    """
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        annotations = {}
    if not _has_istio_sidecar(annotations, spec):
        return Verdict(Protection.NO_SIDECAR, "")
    if annotation_keys.STATUS in annotations:
        return Verdict(Protection.PROTECTED, "")
    opt_out = annotations.get(annotation_keys.INJECT)
    try:
        opted_out = parse_opt_out(None if opt_out is None else str(opt_out))
    except MeshguardError:
        opted_out = False
    if opted_out:
        return Verdict(
            Protection.OPTED_OUT,
            f'opted out of meshguard ({annotation_keys.INJECT}: "false"): Istio\'s sidecar, no'
            " loopback isolation, by choice",
        )
    if namespace_opt_out:
        return Verdict(
            Protection.OPTED_OUT,
            f"opted out of meshguard ({namespace_opt_out}): Istio's sidecar, no loopback"
            " isolation, by choice",
        )
    return Verdict(
        Protection.UNPROTECTED,
        f"UNPROTECTED: Istio injected its sidecar ({annotation_keys.ISTIO_STATUS}) but meshguard"
        f" did not (no {annotation_keys.STATUS}): no loopback isolation in this pod — the meshguard"
        " webhook did not see it (a selection or revision it does not cover, failurePolicy"
        " Ignore while it was down, or a pod created before meshguard)",
    )


def _has_istio_sidecar(annotations: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    """Istio's status lists istio-proxy (a custom template without a proxy is no sidecar),
    or the status is unreadable, or a container is named istio-proxy."""
    raw = annotations.get(annotation_keys.ISTIO_STATUS)
    if raw is not None:
        try:
            status = json.loads(str(raw))
        except ValueError:
            return True
        if not isinstance(status, dict):
            return True
        for key in ("containers", "initContainers"):
            listed = status.get(key)
            if isinstance(listed, list) and PROXY_CONTAINER in listed:
                return True
    for field in ("containers", "initContainers"):
        items = spec.get(field)
        if isinstance(items, list) and any(
            isinstance(item, Mapping) and item.get("name") == PROXY_CONTAINER for item in items
        ):
            return True
    return False
