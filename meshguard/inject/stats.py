"""The loopback listener's decision stats into Istio's Prometheus merge. Pure: values in and out.

Istio's sidecar bootstrap keeps only the Envoy stats its inclusion list names
(``stats_matcher`` in ``tools/packaging/common/envoy_bootstrap.json``): by default
``rbac.allowed``, ``rbac.denied``, ``shadow_allowed`` and ``shadow_denied`` as suffixes, so
the stats meshguard's filters emit under their own prefixes
(``http.meshguard_loopback_ipv4.rbac.meshguard_ambiguity_.denied``,
``...rbac.meshguard_pod_policy_unavailable_.denied``, ``...rbac.meshguard_audit_.allowed``,
``...ext_authz.error``) never reach ``:15020/stats/prometheus``.

pilot-agent adds the regexes of the pod's ``sidecar.istio.io/statsInclusionRegexps``
annotation (comma-separated; read at startup from the downward API file
``/etc/istio/pod/annotations``) to that list — *instead of* the proxy config's
``proxyStatsMatcher.inclusionRegexps`` (``pkg/bootstrap/config.go``, ``getStatsOptions``:
"only consider proxy config if annotation is not set instead of merging"). So the annotation
meshguard writes carries what the pod would have had without it: the operator's annotation,
else the regexes of the proxy config pilot-agent builds (the ``proxy.istio.io/config``
annotation over the ``PROXY_CONFIG`` environment Istio's injection wrote, a list of the
overlay replacing the base's), and then :data:`LISTENER_STATS`. When that cannot be known or
written (an unreadable proxy config, a regex with a comma), the pod is left as it is, and
the reason is given (the admission's warning): the listener's stats then stay out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from meshguard import yaml_io

#: Istio's pod annotations (``istio.io/api`` annotation names) and the proxy's environment.
STATS_REGEXPS: Final = "sidecar.istio.io/statsInclusionRegexps"
PROXY_CONFIG_ANNOTATION: Final = "proxy.istio.io/config"
PROXY_CONFIG_ENV: Final = "PROXY_CONFIG"
#: Every stat of the loopback listeners' decision filters (RBAC, under any of meshguard's
#: prefixes, and ext_authz) and of the pod filter's config file (ECDS: ``config_fail``
#: counts a document that does not load; Envoy 1.36 also counts the default config's
#: denials there); Envoy's stats matcher matches a regex against the whole name.
LISTENER_STATS: Final = (
    r"(http\.meshguard_loopback_ipv[46]\.(rbac|ext_authz)"
    r"|extension_config_discovery\.http_filter\.meshguard\.pod_rbac)\..*"
)


class _Unknown(Exception):
    """The proxy config's regexes cannot be read: meshguard must not guess them."""


@dataclass(frozen=True)
class StatsMerge:
    """What the pod's stats annotation becomes."""

    #: The annotation's new value; None: the pod is left as it is.
    value: str | None
    #: Why the listener's stats stay out of Istio's merge, when they do ("" otherwise).
    left_out: str = ""


def merge_stats(*, annotations: Mapping[str, Any], proxy_env: Sequence[object]) -> StatsMerge:
    """The ``sidecar.istio.io/statsInclusionRegexps`` value the pod needs; none when it
    already includes the listener's stats, or when what the pod would lose by the annotation
    cannot be known (then :attr:`StatsMerge.left_out` says why)."""
    current = annotations.get(STATS_REGEXPS)
    if isinstance(current, str) and current:  # pilot-agent ignores an empty one
        patterns = current.split(",")
    elif current is None or current == "":
        try:
            patterns = _proxy_config_regexps(annotations, proxy_env)
        except _Unknown:
            return StatsMerge(None, "the proxy config's proxyStatsMatcher is unreadable")
        if any("," in pattern for pattern in patterns):
            # the annotation is split on commas: such a regex cannot travel
            return StatsMerge(None, "a proxyStatsMatcher regex holds a comma")
    else:
        return StatsMerge(None, "it is not a string")
    if LISTENER_STATS in patterns:
        return StatsMerge(None)
    return StatsMerge(",".join([*patterns, LISTENER_STATS]))


def _proxy_config_regexps(annotations: Mapping[str, Any], proxy_env: Sequence[object]) -> list[str]:
    """``proxyStatsMatcher.inclusionRegexps`` as pilot-agent resolves it: the annotation's
    list if it has one, else the environment's, else none."""
    layers = [annotations.get(PROXY_CONFIG_ANNOTATION), _env_value(proxy_env)]
    for text in layers:
        if text is None:
            continue
        found = _regexps(_parse(text))
        if found is not None:
            return found
    return []


def _env_value(env: Sequence[object]) -> object:
    for entry in env:
        if isinstance(entry, dict) and entry.get("name") == PROXY_CONFIG_ENV:
            if "valueFrom" in entry:
                raise _Unknown
            return entry.get("value", "")
    return None


def _parse(text: object) -> Mapping[str, Any]:
    if not isinstance(text, str):
        raise _Unknown
    if not text.strip():
        return {}
    try:
        document = json.loads(text)
    except ValueError:
        try:
            document = yaml_io.load(text)
        except yaml_io.YAMLError:
            raise _Unknown from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise _Unknown
    return document


def _regexps(config: Mapping[str, Any]) -> list[str] | None:
    matcher = _field(config, "proxyStatsMatcher", "proxy_stats_matcher")
    if matcher is None:
        return None
    if not isinstance(matcher, dict):
        raise _Unknown
    regexps = _field(matcher, "inclusionRegexps", "inclusion_regexps")
    if regexps is None:
        return None
    if not isinstance(regexps, list) or not all(isinstance(r, str) for r in regexps):
        raise _Unknown
    return list(regexps)


def _field(config: Mapping[str, Any], camel: str, snake: str) -> object:
    return config.get(camel, config.get(snake))
