"""meshguard as istioctl shows it, from the real Envoy's config dump of a sidecar.

The real Envoy receives the EnvoyFilter's listeners and cluster over file-based LDS/CDS (as
a sidecar gets them from istiod: dynamic resources, all that ``istioctl x authz check``
reads) and the pod's RBAC by ECDS from its file (:mod:`tests.support.sidecar_dump`); its
``/config_dump?include_eds`` is read the way istioctl reads it
(:mod:`tests.support.istioctl`, istioctl's printing re-expressed from its source).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from meshguard.authz.envoy_config import UPSTREAM_CLUSTER, ListenerSettings, loopback_listeners
from meshguard.authz.istio_config import envoy_filter_name
from meshguard.l7 import L7Engine
from meshguard.policy import Mode, parse_policy
from meshguard.rbac import POD_FILTER_NAME, compile_rbac
from tests.support import istioctl
from tests.support.sidecar_dump import LOCATION, POLICY, SOURCES, config_dump

PROJECT = Path(__file__).resolve().parents[2]
NATIVE_FILTER = f"{envoy_filter_name(L7Engine.NATIVE)}.{LOCATION.root_namespace}"
EXT_AUTHZ_FILTER = f"{envoy_filter_name(L7Engine.EXT_AUTHZ)}.{LOCATION.root_namespace}"


def rows(table: str) -> list[list[str]]:
    """A table's rows below its header, as columns (istioctl pads them with spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[1:]]


@pytest.fixture(scope="module")
def native_dump(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return config_dump(tmp_path_factory.mktemp("native"), engine=L7Engine.NATIVE)


@pytest.fixture(scope="module")
def ext_authz_dump(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return config_dump(tmp_path_factory.mktemp("ext-authz"), engine=L7Engine.EXT_AUTHZ)


@pytest.mark.root
def test_proxy_config_listener_shows_both_families_routed_to_meshguards_cluster(
    native_dump: dict[str, Any],
) -> None:
    assert istioctl.listener_summary(native_dump, port=15007).splitlines() == [
        "ADDRESSES PORT  MATCH DESTINATION",
        f"127.0.0.1 15007 ALL   Cluster: {UPSTREAM_CLUSTER}",
        f"::1       15007 ALL   Cluster: {UPSTREAM_CLUSTER}",
    ]


@pytest.mark.root
def test_proxy_config_route_names_the_route_its_host_and_the_envoyfilter(
    native_dump: dict[str, Any],
) -> None:
    """The listener's inline route configurations are in the dump's static routes; each
    names the EnvoyFilter that put it there in the VIRTUAL SERVICE column."""
    assert sorted(rows(istioctl.route_summary(native_dump))) == [
        [f"meshguard_loopback_{family}", "meshguard_loopback", "*", "/*", NATIVE_FILTER]
        for family in ("ipv4", "ipv6")
    ]


@pytest.mark.root
def test_proxy_config_cluster_names_the_upstream_and_the_envoyfilter(
    native_dump: dict[str, Any],
) -> None:
    assert rows(istioctl.cluster_summary(native_dump)) == [
        [UPSTREAM_CLUSTER, "-", "-", "-", "ORIGINAL_DST", NATIVE_FILTER]
    ]


@pytest.mark.root
def test_proxy_config_ecds_shows_the_pods_rbac_and_its_rules(native_dump: dict[str, Any]) -> None:
    """The pod's own policy is visible here (``-o yaml``: its policies by rule and source
    container), and only here among istioctl's views."""
    assert rows(istioctl.ecds_summary(native_dump)) == [
        [POD_FILTER_NAME, "envoy.extensions.filters.http.rbac.v3.RBAC"]
    ]
    (loaded,) = istioctl.ecds_configs(native_dump)
    compiled = compile_rbac(policy=parse_policy(POLICY), mode=Mode.ENFORCE, sources=SOURCES)
    expected = compiled["resources"][0]["typed_config"]["rules"]["policies"]
    assert set(loaded["typed_config"]["rules"]["policies"]) == set(expected)
    assert "rules[000]/cache" in expected


@pytest.mark.root
def test_authz_check_lists_the_ambiguity_deny_but_not_the_ecds_policy(
    native_dump: dict[str, Any],
) -> None:
    """On the code before, the ambiguity policies (``ambiguous-path``...) did not parse as
    Istio's names: one nameless ``DENY`` row."""
    assert istioctl.authz_check(native_dump).splitlines() == [
        "ACTION   AuthorizationPolicy      RULES",
        "DENY     ambiguity.meshguard.io   2",
    ]
    # the pod's policy is there, but by ECDS, which authz check does not read
    listeners = json.dumps(istioctl.dynamic_listeners(native_dump))
    assert listeners.count(f'"name": "{POD_FILTER_NAME}", "config_discovery"') == 2


@pytest.mark.root
def test_describe_pod_finds_no_meshguard_rbac_for_a_service_port(
    native_dump: dict[str, Any],
) -> None:
    """describe reads the inbound listener's RBAC per Service port: meshguard's loopback
    listener is no Service port's (only a Service on port 15007 would reach it)."""
    assert istioctl.describe_rbac_policies(native_dump, service_port=8080) == []
    assert sorted(istioctl.describe_rbac_policies(native_dump, service_port=15007)) == [
        "ns[meshguard.io]-policy[ambiguity]-rule[method]",
        "ns[meshguard.io]-policy[ambiguity]-rule[path]",
    ]


@pytest.mark.root
def test_the_ext_authz_engine_shows_in_the_proxy_config_views_not_in_authz_check(
    ext_authz_dump: dict[str, Any],
) -> None:
    """Its policy is in the authz server: the listener has no RBAC filter at all."""
    assert istioctl.authz_check(ext_authz_dump).splitlines() == [
        "ACTION   AuthorizationPolicy   RULES"
    ]
    assert {row[-1] for row in rows(istioctl.route_summary(ext_authz_dump))} == {EXT_AUTHZ_FILTER}
    assert rows(istioctl.cluster_summary(ext_authz_dump)) == [
        [LOCATION.host, str(LOCATION.port), "-", "outbound", "STATIC"],  # istiod's (EDS there)
        [UPSTREAM_CLUSTER, "-", "-", "-", "ORIGINAL_DST", EXT_AUTHZ_FILTER],
    ]


@pytest.mark.root
def test_the_operator_guide_quotes_these_views(native_dump: dict[str, Any]) -> None:
    text = (PROJECT / "docs/operator.md").read_text()
    quoted = re.findall(r"```console\n\$ (istioctl [^\n]*)\n(.*?)```", text, flags=re.S)
    assert [command for command, _ in quoted] == list(istioctl.DOC_COMMANDS)
    for command, output in quoted:
        rendered = istioctl.render_command(native_dump, command)
        assert [line.rstrip() for line in output.splitlines()] == [
            line.rstrip() for line in rendered.splitlines()
        ], f"docs/operator.md is stale for `{command}`: regenerate with sudo scripts/istioctl-views"


# --- without Envoy: why the pod's RBAC filter keeps a name of its own ---------------------------


def dump_of(listeners: list[dict[str, Any]]) -> dict[str, Any]:
    """A config dump holding ``listeners`` as a sidecar's dynamic listeners."""
    entries = [{"name": one["name"], "active_state": {"listener": one}} for one in listeners]
    kind = "type.googleapis.com/envoy.admin.v3.ListenersConfigDump"
    return {"configs": [{"@type": kind, "dynamic_listeners": entries}]}


def test_an_ecds_filter_named_like_istios_rbac_would_show_a_policy_that_does_not_exist() -> None:
    """authz check parses every filter named ``envoy.filters.http.rbac`` and reads only an
    inline config: the ECDS filter under that name would list ``ALLOW
    _anonymous_match_nothing_``. Its own name keeps it out of the table."""
    listeners = loopback_listeners(ListenerSettings(engine=L7Engine.NATIVE))
    assert "_anonymous_match_nothing_" not in istioctl.authz_check(dump_of(listeners))
    renamed = json.loads(
        json.dumps(listeners).replace(f'"{POD_FILTER_NAME}"', '"envoy.filters.http.rbac"')
    )
    assert "ALLOW    _anonymous_match_nothing_" in istioctl.authz_check(dump_of(renamed))


def test_authz_check_lists_an_unparsable_policy_name_nameless() -> None:
    """What the ambiguity filter showed before its policies had Istio's name form."""
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {"rules": {"action": "DENY", "policies": {"ambiguous-path": {}}}},
    }
    manager = {"name": istioctl.HCM_NAMES[0], "typed_config": {"http_filters": [rbac]}}
    listener = {"name": "l", "filter_chains": [{"filters": [manager]}]}
    assert istioctl.authz_check(dump_of([listener])).splitlines()[1].split() == ["DENY", "1"]
