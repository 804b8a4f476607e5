"""meshguard's entry in a node's CNI configuration (pure logic): properties over arbitrary
conflists, and the cases Istio's install-cni creates."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshguard.cni.install import (
    IstioCniMissing,
    as_conflist,
    chain,
    is_chained,
    parse_config,
    plugin_entry,
    primary_config,
    unchain,
)
from meshguard.cni.protocol import PLUGIN_TYPE
from meshguard.errors import MalformedInputError

#: Generation is slow on a shared machine; the properties are cheap.
RELAXED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENTRY = plugin_entry(kubeconfig="/etc/cni/net.d/ZZZ-meshguard-cni-kubeconfig")
OTHER_TYPES = ["calico", "flannel", "bridge", "portmap", "bandwidth", "tuning", "cilium-cni"]

_values = st.one_of(st.integers(), st.text(max_size=8), st.booleans())
_extra = st.dictionaries(st.sampled_from(["ipam", "mtu", "capabilities", "log_level"]), _values)


def _plugin(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    return _extra.map(lambda extra: {**extra, "type": kind})


_any_plugin = st.sampled_from([*OTHER_TYPES, "istio-cni", PLUGIN_TYPE]).flatmap(_plugin)
_plugins = st.lists(_any_plugin, max_size=8)
#: Conflists as a node may hold them: others' plugins, istio-cni anywhere (at least once),
#: meshguard's entries anywhere (stale, moved, duplicated) or none.
_with_istio = st.tuples(_plugins, _plugin("istio-cni"), _plugins).map(
    lambda t: [*t[0], t[1], *t[2]]
)
_conflists = st.fixed_dictionaries(
    {"cniVersion": st.sampled_from(["0.3.1", "0.4.0", "1.0.0"]), "name": st.just("k8s-pod-network"),
     "plugins": _with_istio},
    optional={"disableCheck": st.booleans()},
)  # fmt: skip


def _others(conflist: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in conflist["plugins"] if p["type"] != PLUGIN_TYPE]


@RELAXED
@given(_conflists)
def test_chain_puts_exactly_one_entry_right_after_the_last_istio_cni(conflist):
    chained = chain(conflist, entry=ENTRY, after="istio-cni")
    types = [p["type"] for p in chained["plugins"]]
    assert types.count(PLUGIN_TYPE) == 1
    position = types.index(PLUGIN_TYPE)
    assert types[position - 1] == "istio-cni" and "istio-cni" not in types[position + 1 :]
    assert chained["plugins"][position] == ENTRY


@RELAXED
@given(_conflists)
def test_chain_keeps_everyone_elses_entries_in_order_and_the_top_level(conflist):
    chained = chain(conflist, entry=ENTRY, after="istio-cni")
    assert _others(chained) == _others(conflist)
    assert {k: v for k, v in chained.items() if k != "plugins"} == {
        k: v for k, v in conflist.items() if k != "plugins"
    }


@RELAXED
@given(_conflists)
def test_chain_is_idempotent_and_unchain_undoes_it(conflist):
    chained = chain(conflist, entry=ENTRY, after="istio-cni")
    assert chain(chained, entry=ENTRY, after="istio-cni") == chained
    assert unchain(chained) == unchain(conflist)
    assert not is_chained(unchain(chained)) and is_chained(chained)


@RELAXED
@given(_conflists)
def test_chain_repairs_a_removed_or_moved_entry(conflist):
    chained = chain(conflist, entry=ENTRY, after="istio-cni")
    removed = unchain(chained)
    # Istio's install-cni, restarting, takes its entry out and appends it at the end.
    istio = [p for p in chained["plugins"] if p["type"] == "istio-cni"]
    moved = {**chained, "plugins": [p for p in chained["plugins"] if p["type"] != "istio-cni"]}
    moved["plugins"] += istio
    for broken in (removed, moved):
        repaired = chain(broken, entry=ENTRY, after="istio-cni")
        types = [p["type"] for p in repaired["plugins"]]
        assert types[types.index(PLUGIN_TYPE) - 1] == "istio-cni"


@RELAXED
@given(_conflists, st.data())
def test_chain_replaces_an_outdated_entry(conflist, data):
    old = {**ENTRY, "kubernetes": {"kubeconfig": "/old"}, "stale": data.draw(_values)}
    chained = chain(chain(conflist, entry=old, after="istio-cni"), entry=ENTRY, after="istio-cni")
    assert [p for p in chained["plugins"] if p["type"] == PLUGIN_TYPE] == [ENTRY]


@RELAXED
@given(st.lists(st.sampled_from(OTHER_TYPES).flatmap(_plugin), max_size=6))
def test_without_istio_cni_nothing_is_chained(plugins):
    with pytest.raises(IstioCniMissing, match="waiting for istio-cni"):
        chain({"name": "net", "plugins": plugins}, entry=ENTRY, after="istio-cni")


@RELAXED
@given(_plugin("flannel"))
def test_a_single_plugin_conf_becomes_a_conflist(plugin):
    conf = {**plugin, "cniVersion": "0.3.1", "name": "cbr0"}
    name, conflist = as_conflist(conf, filename="10-flannel.conf")
    assert name == "10-flannel.conflist"
    assert conflist == {"cniVersion": "0.3.1", "name": "cbr0", "plugins": [conf]}
    chained = chain(conflist, entry=ENTRY, after="flannel")
    assert [p["type"] for p in chained["plugins"]] == ["flannel", PLUGIN_TYPE]


@RELAXED
@given(_conflists)
def test_a_conflist_stays_as_it_is(conflist):
    assert as_conflist(conflist, filename="10-calico.conflist") == ("10-calico.conflist", conflist)


@RELAXED
@given(st.lists(st.text(alphabet="abc019-_.", min_size=1, max_size=12), max_size=8))
def test_the_primary_configuration_is_the_first_cni_file_by_name(names):
    cni = sorted(n for n in names if n.endswith((".conf", ".conflist", ".json")))
    assert primary_config(names) == (cni[0] if cni else None)


def test_primary_configuration_ignores_kubeconfigs_and_other_files():
    names = ["ZZZ-istio-cni-kubeconfig", "ZZZ-meshguard-cni-kubeconfig", "README", "20-b.conf",
             "10-a.conflist", ".10-a.conflist.x1.tmp"]  # fmt: skip
    assert primary_config(names) == "10-a.conflist"


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", "is not JSON"), ("[1]", "not a JSON object"),
     ('{"name": "x", "plugins": {}}', "plugins is not a list of objects"),
     ('{"name": "x", "plugins": [1]}', "plugins is not a list of objects"),
     ('{"name": "x"}', "neither a conflist")],
)  # fmt: skip
def test_a_malformed_configuration_is_named_in_the_error(text, message):
    with pytest.raises(MalformedInputError, match=message) as caught:
        as_conflist(parse_config(text, filename="10-x.conflist"), filename="10-x.conflist")
    assert "10-x.conflist" in str(caught.value)
