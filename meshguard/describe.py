"""A person's summary of a pod's loopback policy: who may talk to whom, and what is enforced.

Pure: (pod view, policy, mode, recorded status) in, lines of text out. Used by
``meshguard describe``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from meshguard import names
from meshguard.pod import PodView
from meshguard.policy import ANY_CONTAINER, PROXY, Action, Mode, Policy, Rule
from meshguard.rules.compiler import CompilerSettings
from meshguard.rules.ruleset import Ruleset


def describe(
    pod: PodView,
    policy: Policy,
    *,
    mode: Mode,
    compiled: Ruleset | None,
    settings: CompilerSettings,
) -> list[str]:
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
        else "allow every other loopback flow, except to the proxy's control ports"
    )
    protected = ", ".join(map(str, settings.protected_proxy_ports))
    lines += [
        f"default: {default}",
        f"proxy control ports ({protected}): only where a rule above names them",
        "Istio's outbound (15001) and DNS (15053) capture: unchanged for every container",
    ]
    lines += _status_lines(pod.annotations, compiled)
    return lines


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


def _status_lines(annotations: Mapping[str, str], compiled: Ruleset | None) -> list[str]:
    raw = annotations.get(names.STATUS)
    if raw is None:
        return ["status: not injected by meshguard yet (no meshguard.io/status)"]
    try:
        recorded = json.loads(raw).get("ruleset", "?")
    except (ValueError, AttributeError):
        return [f"status: {names.STATUS} is not valid JSON"]
    if compiled is None:
        return [f"status: ruleset {recorded}"]
    state = (
        "matches the policy" if recorded == compiled.digest else "STALE: the policy changed since"
    )
    return [f"status: ruleset {recorded} — {state}"]
