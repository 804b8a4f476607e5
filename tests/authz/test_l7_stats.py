"""The native engine's decisions are counted where Istio operators look: the real Envoy, on
the real kernel path, with the stats matcher pilot-agent writes into a sidecar's bootstrap
(``tools/packaging/common/envoy_bootstrap.json``, ``pkg/bootstrap/config.go``), serves
meshguard's RBAC counters on ``/stats/prometheus`` only with the pod's
``sidecar.istio.io/statsInclusionRegexps`` as the webhook writes it; a broken pod document is
counted under its own name."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from meshguard.inject.stats import STATS_REGEXPS
from meshguard.l7 import L7Engine
from meshguard.rbac import NO_POLICY_PREFIX
from tests.authz.test_engines_differential import POLICY
from tests.authz.test_envoy_e2e import CACHE, PROXY, L7Pod, injected_pod, l7_sandbox
from tests.support.netfilter import Netfilter

pytestmark = pytest.mark.root

#: Istio's sidecar stats inclusion list without any annotation or proxyStatsMatcher
#: (``requiredEnvoyStatsMatcherInclusionPrefixes``, ``rbacEnvoyStatsMatcherInclusionSuffix``,
#: ``requiredEnvoyStatsMatcherInclusionRegexes`` and the template's fixed prefixes).
ISTIO_PREFIXES = ("reporter=", "cluster_manager", "listener_manager", "server",
                  "cluster.xds-grpc", "wasm", "component", "istio")  # fmt: skip
ISTIO_SUFFIXES = ("rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied")
ISTIO_REGEXPS = (r"vhost\..*\.route\..*",)


def istio_stats_config(annotation: str | None) -> dict[str, Any]:
    """The bootstrap's ``stats_config``: its ``stats_matcher`` from the annotation's regexes
    (which replace the proxy config's, none here) and Istio's required ones; no default tag
    extraction (Istio has its own, which leaves these names whole)."""
    regexps = [*(annotation.split(",") if annotation else []), *ISTIO_REGEXPS]
    patterns = [
        *({"prefix": p} for p in ISTIO_PREFIXES),
        *({"suffix": s} for s in ISTIO_SUFFIXES),
        *({"safe_regex": {"regex": r}} for r in regexps),
    ]
    return {
        "use_all_default_tags": False,
        "stats_matcher": {"inclusion_list": {"patterns": patterns}},
    }


def prometheus(pod: L7Pod) -> dict[str, float]:
    """``/stats/prometheus`` of the pod's Envoy (as the proxy's uid: its own admin port),
    as Istio's agent merges it: metric with labels -> value."""
    script = (
        "import encodings.idna, os, urllib.request  # imported before dropping root\n"
        f"os.setgid({PROXY}); os.setuid({PROXY})\n"
        "url = 'http://127.0.0.1:15000/stats/prometheus'\n"
        "print(urllib.request.urlopen(url, timeout=5).read().decode())\n"
    )
    samples = {}
    for line in pod.box.ns.run([sys.executable, "-c", script]).splitlines():
        match = re.fullmatch(r"(\S+(?:\{[^}]*\})?) (\S+)", line)
        if match and not line.startswith("#"):
            samples[match[1]] = float(match[2])
    return samples


def counter(samples: dict[str, float], name: str) -> float | None:
    """A counter of the IPv4 listener's connection manager, by its Prometheus name: dots
    become ``_`` (``http.meshguard_loopback_ipv4.rbac.meshguard_ambiguity_.denied``, Envoy
    puts a dot after a rules prefix, is ``..._rbac_meshguard_ambiguity__denied``)."""
    return samples.get(f"envoy_http_meshguard_loopback_ipv4_{name}{{}}")


ECDS = "envoy_extension_config_discovery_http_filter_meshguard_pod_rbac_"


def pod_filter(samples: dict[str, float], name: str) -> float | None:
    """A counter of the pod filter (read from the pod's file by ECDS): Envoy 1.40 keeps it
    in the connection manager's scope, 1.36 in the ECDS subscription's."""
    found = counter(samples, name)
    return found if found is not None else samples.get(f"{ECDS}{name}{{}}")


def traffic(pod: L7Pod) -> None:
    allowed = pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/x")
    denied = pod.http(CACHE, host="127.0.0.1", port=8080, method="DELETE", path="/api/x")
    ambiguous = pod.http(CACHE, host="127.0.0.1", port=8080, method="GET",
                         path="/public/%2e%2e;/private")  # fmt: skip
    assert (allowed["status"], denied["status"], ambiguous["status"]) == (200, 403, 403)


@pytest.mark.parametrize("with_annotation", [True, False], ids=["meshguard", "istio-default"])
def test_the_pod_annotation_brings_meshguard_s_rbac_stats_to_prometheus(
    with_annotation: bool, tmp_path: Path, shared_dir: Path
):
    pod = injected_pod("enforce", policy=POLICY, engine=L7Engine.NATIVE)
    annotation = pod["metadata"]["annotations"][STATS_REGEXPS] if with_annotation else None
    with l7_sandbox(
        mode="enforce", netfilter=Netfilter.IPTABLES_NFT, shared=shared_dir, tmp_path=tmp_path,
        engine=L7Engine.NATIVE, policy=POLICY, stats_config=istio_stats_config(annotation),
    ) as sandbox:  # fmt: skip
        traffic(sandbox)
        samples = prometheus(sandbox)
    # Istio's default list already has the pod filter's own counters (suffix rbac.allowed /
    # rbac.denied) and the source-naming shadow rules' (suffix shadow_allowed: the two
    # requests that passed the ambiguity filter)
    assert pod_filter(samples, "rbac_allowed") == 1
    assert pod_filter(samples, "rbac_denied") == 1
    assert pod_filter(samples, "rbac_meshguard_source__shadow_allowed") == 2
    # the ambiguity filter's, under meshguard's prefix, and the pod file's, only with the
    # annotation
    ambiguity = counter(samples, "rbac_meshguard_ambiguity__denied")
    config_fail = samples.get(f"{ECDS}config_fail{{}}")
    if with_annotation:
        assert (ambiguity, config_fail) == (1, 0), samples
    else:
        assert (ambiguity, config_fail) == (None, None), samples


@pytest.mark.parametrize("content", ["", "{not json", '{"resources": []}'])
def test_a_broken_rbac_document_is_counted_under_its_own_name(
    content: str, tmp_path: Path, shared_dir: Path
):
    pod = injected_pod("enforce", policy=POLICY, engine=L7Engine.NATIVE)
    annotation = pod["metadata"]["annotations"][STATS_REGEXPS]
    with l7_sandbox(
        mode="enforce", netfilter=Netfilter.IPTABLES_NFT, shared=shared_dir, tmp_path=tmp_path,
        engine=L7Engine.NATIVE, policy=POLICY, rbac_text=content,
        stats_config=istio_stats_config(annotation),
    ) as sandbox:  # fmt: skip
        for _ in range(2):
            got = sandbox.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/x")
            assert got["status"] == 403, got
        samples = prometheus(sandbox)
    # the file's failure to load, and each denial it causes, under the pod filter's names
    assert samples.get(f"{ECDS}config_fail{{}}") == 1, samples
    assert pod_filter(samples, f"rbac_{NO_POLICY_PREFIX}_denied") == 2, samples
    assert pod_filter(samples, "rbac_allowed") in {None, 0}
