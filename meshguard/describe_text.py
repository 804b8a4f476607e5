"""A :class:`~meshguard.describe_schema.PodDescription` in words, for a person: the mode, the
containers, who may connect to whom, the defaults, the status and the admitted record, the
L7 engine (``meshguard describe`` without ``-o``). Pure."""

from __future__ import annotations

from meshguard import annotation_keys
from meshguard.admitted import RECORD as ADMITTED_RECORD
from meshguard.describe_schema import (
    AdmittedState,
    EngineData,
    EngineDocument,
    PodDescription,
    RuleData,
    StatusState,
)
from meshguard.init_container import MESHGUARD_INIT, MESHGUARD_VALIDATION
from meshguard.l7 import L7Engine
from meshguard.policy import ANY_CONTAINER, PROXY, Action, Mode
from meshguard.recent_denials import text_lines as recent_denial_lines


def text_lines(d: PodDescription) -> list[str]:
    """The description in words (without the pod's name and verdict, which the caller
    prints)."""
    if d.error is not None:
        return [f"error: {d.error}", *_status_lines(d), *_admitted_lines(d)]
    lines = [f"cannot be enforced as written: {d.compile_error}"] if d.compile_error else []
    lines.append(_mode_line(d))
    if d.proxy is not None:
        lines.append(f"proxy: uid {d.proxy.uid}, gid {d.proxy.gid} — never restricted")
    lines.append("containers:")
    for container in d.containers:
        uid = "no runAsUser!" if container.uid is None else f"uid {container.uid}"
        ports = ", ".join(f"{p.port}/{p.protocol}" for p in container.ports) or "no declared ports"
        lines.append(f"  {container.name:<20} {uid:<12} {container.role:<10} {ports}")
    lines.append("may connect over loopback (besides each container to its own ports):")
    lines += [f"  {_rule_text(rule, engine=d.engine)}" for rule in d.rules] or ["  nothing"]
    default = (
        "deny every other loopback flow"
        if d.default_action is Action.DENY
        else "allow every other loopback flow, except to the proxy's ports"
    )
    protected = ", ".join(map(str, d.protected_proxy_ports))
    hairpin = (
        "only ports open to every container: " + ", ".join(map(str, d.hairpin_ports))
        if d.hairpin_ports
        else "refused (no port is open to every container)"
    )
    lines += [
        f"default: {default}",
        f"proxy control ports ({protected}): only where a rule above names them;"
        " the proxy's other ports (15000-15090) never, and only the proxy sends from them",
        "Istio's outbound (15001) and DNS (15053) capture: unchanged for every container;"
        " flows between the pod's own processes are never captured",
        f"through the pod's own Service (the proxy dialing the pod): {hairpin}",
        f"rules installed by: {_installer_text(d.installer)}",
        f"netfilter: {_backend_text(native_nftables=d.netfilter == 'nftables')}",
    ]
    lines += _status_lines(d)
    lines += _admitted_lines(d)
    lines += _engine_lines(d.engine)
    lines += recent_denial_lines(d.recent_denials)
    return lines


def _engine_lines(engine: EngineData | None) -> list[str]:
    """Which engine makes the pod's L7 decisions and, for the native one, whether the
    sidecar reads the admitted document, and its compiled rules."""
    if engine is None:
        return []
    if engine.name != L7Engine.NATIVE.value:
        return [f"L7 engine: {engine.name} (meshguard serve-authz decides each request)"]
    if engine.document is not EngineDocument.ADMITTED:
        return [
            f"L7 engine: native — {annotation_keys.L7_RBAC} is missing or not the document"
            " admitted: the sidecar denies every L7 request (or runs what was edited in): delete"
            " the pod so that meshguard admits it again"
        ]
    return [
        f"L7 engine: native (Envoy RBAC in the sidecar, document {(engine.digest or '')[:19]}…,"
        " as admitted)",
        f"  compiled rules: {', '.join(engine.rules) or 'none (every L7 request denied)'}",
    ]


def _mode_line(d: PodDescription) -> str:
    mode = d.mode or Mode.ENFORCE
    line = f"mode: {mode.value}"
    if mode is Mode.AUDIT:
        line += "  (violations are logged, not blocked)"
    admitted = d.admitted
    if admitted is not None and admitted.state is AdmittedState.CHANGED:
        line += "  (as admitted; the live annotations were changed after admission: TAMPERED)"
    elif admitted is not None and admitted.state is AdmittedState.UNVERIFIABLE:
        line += (
            "  (the live annotation's; the admitted record does not verify: TAMPERED, every L7"
            " request to this pod is denied)"
        )
    return line


def _installer_text(installer: str | None) -> str:
    """Which install mode the pod is in: meshguard-init, or from the node (Istio CNI mode, or
    a pod Istio gave no init step under withoutIstioInit node)."""
    if installer == MESHGUARD_VALIDATION:
        return (
            "the node (meshguard's chained CNI plugin: Istio CNI mode, or no Istio init step),"
            f" checked in the pod by {MESHGUARD_VALIDATION} (no capabilities)"
        )
    if installer == MESHGUARD_INIT:
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


def _rule_text(rule: RuleData, *, engine: EngineData | None) -> str:
    sources = "every container" if ANY_CONTAINER in rule.sources else ", ".join(rule.sources)
    target = "the proxy" if rule.to == PROXY else rule.to
    ports = ", ".join(map(str, rule.ports))
    text = f"[{rule.index}] {sources} -> {target} port {ports}/{rule.protocol}"
    if rule.http is not None:
        methods = ", ".join(rule.http.methods) or "any method"
        paths = ", ".join(rule.http.paths) or "any path"
        headers = ", ".join(f"{k}={v}" for k, v in rule.http.headers.items())
        text += f", only {methods} {paths}" + (f" with {headers}" if headers else "")
        text += f" (checked per request by {_decider(engine)})"
    return text


def _decider(engine: EngineData | None) -> str:
    """Who checks a rule's HTTP conditions: the pod's engine, where the pod says it."""
    if engine is None:
        return "the pod's L7 engine"
    if engine.name == L7Engine.NATIVE.value:
        return "Envoy in the sidecar"
    return "the ext_authz server"


def _admitted_lines(d: PodDescription) -> list[str]:
    """Whether the live policy and mode are the ones admitted (the authz server enforces
    the admitted ones only)."""
    admitted = d.admitted
    if admitted is None or admitted.state is AdmittedState.NOT_ADMITTED:
        return []  # said by the status lines
    if d.status is not None and d.status.state is StatusState.MALFORMED:
        return [
            "admitted: TAMPERED — the status annotation is not what meshguard writes; the"
            " authz server denies every L7 request to this pod: delete the pod so that"
            " meshguard admits it again"
        ]
    if admitted.state is AdmittedState.UNVERIFIABLE:
        return [
            f"admitted: TAMPERED — {admitted.error}; the authz server denies every L7 request"
            " to this pod: delete the pod so that meshguard admits it again"
        ]
    if admitted.state is AdmittedState.NO_RECORD:
        return [
            f"admitted: no admitted policy record ({ADMITTED_RECORD}) — the authz server"
            " denies every L7 request to this pod: delete the pod so that meshguard admits it"
            " again"
        ]
    digest = (admitted.digest or "")[:19]
    if admitted.state is AdmittedState.AS_ADMITTED:
        return [f"admitted: policy and mode as admitted ({digest}…)"]
    mode = admitted.mode.value if admitted.mode else "?"
    return [
        f"admitted: TAMPERED — changed after admission: {'; '.join(admitted.drift)}",
        f"  enforced: the admitted policy in {mode} mode (the edit opens"
        " nothing); to change the policy, delete the pod and create it anew",
    ]


def _status_lines(d: PodDescription) -> list[str]:
    status = d.status
    if status is None:
        return []
    if status.state is StatusState.MALFORMED:
        return [f"status: {status.error}"]
    if status.state is StatusState.NOT_INJECTED:
        return ["status: not injected by meshguard yet (no meshguard.io/status)"]
    recorded = status.ruleset or "?"
    changed = (
        [
            "changed by meshguard at admission (posture fixes):",
            *(f"  {text}" for text in d.posture_changes),
        ]
        if d.posture_changes
        else []
    )
    if status.state is StatusState.CURRENT:
        return [f"status: ruleset {recorded} — matches the policy", *changed]
    if status.state is StatusState.STALE:
        return [f"status: ruleset {recorded} — STALE: the policy changed since", *changed]
    return [f"status: ruleset {recorded}", *changed]
