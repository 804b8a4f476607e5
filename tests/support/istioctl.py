"""What istioctl prints for an Envoy config dump, re-expressed in Python from its source.

No istioctl binary runs here (no network), so the views an operator gets are computed by
this reader from the real Envoy's ``/config_dump`` (snake_case JSON, as Envoy writes it),
following istio/istio at the commit of ``../shared`` (86c9f01fd735):

- ``istioctl proxy-config listener|route|cluster|ecds POD``:
  ``istioctl/pkg/writer/envoy/configdump/{listener,route,cluster,ecds}.go`` (summary
  output, ``--verbose`` on as by default);
- ``istioctl x authz check POD``: ``istioctl/pkg/authz/{analyzer,listener}.go``: the RBAC
  filters *inline* (``typed_config``) in the HTTP filters of the *dynamic* listeners;
- ``istioctl x describe pod``'s ``RBAC policies:`` line: ``getIstioRBACPolicies`` in
  ``istioctl/pkg/describe/describe.go``: the first RBAC filter of the inbound HTTP connection
  manager for a Service port.

Go's ``text/tabwriter`` is emulated for the tables (``padding`` as each writer sets it).
``python -m tests.support.istioctl DUMP.json VIEW`` prints one view of a saved dump.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support.sidecar_dump import config_dump

HCM_NAMES = ("envoy.filters.network.http_connection_manager", "envoy.http_connection_manager")
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
TCP_PROXY = "envoy.filters.network.tcp_proxy"
HTTP_RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
BLACK_HOLE = "BlackHoleCluster"
PASSTHROUGH = "PassthroughCluster"
VIRTUAL_INBOUND = "virtualInbound"
#: authz check's policy-name pattern (an unanchored search, as Go's FindStringSubmatch).
POLICY_NAME = re.compile(r"(?:istio-ext-authz-)?ns\[(.+)\]-policy\[(.+)\]-rule\[(.+)\]")
ANONYMOUS = "_anonymous_match_nothing_"


# --- the dump's sections ------------------------------------------------------------------


def section(dump: dict[str, Any], kind: str) -> dict[str, Any]:
    """The last section of that type (istioctl's ``getSection``); empty when absent."""
    found: dict[str, Any] = {}
    for config in dump["configs"]:
        if config["@type"] == f"type.googleapis.com/envoy.admin.v3.{kind}":
            found = config
    return found


def dynamic_listeners(dump: dict[str, Any]) -> list[dict[str, Any]]:
    section_ = section(dump, "ListenersConfigDump")
    return [
        entry["active_state"]["listener"]
        for entry in section_.get("dynamic_listeners", [])
        if entry.get("active_state", {}).get("listener")
    ]


def all_listeners(dump: dict[str, Any]) -> list[dict[str, Any]]:
    """Dynamic (active) listeners, then static ones (``retrieveSortedListenerSlice``)."""
    static = section(dump, "ListenersConfigDump").get("static_listeners", [])
    return [*dynamic_listeners(dump), *(e["listener"] for e in static if e.get("listener"))]


# --- Go's text/tabwriter (minwidth 0, tabwidth 8, padchar ' ', no flags) -------------------


def tabwriter(text: str, *, padding: int) -> str:
    """Cells ended by a tab are padded to their column's widest cell plus ``padding``; a
    column is a run of adjacent lines that have that cell; the last cell is not padded."""
    lines = [line.split("\t") for line in text.split("\n")]
    widths: list[list[int]] = [[0] * (len(cells) - 1) for cells in lines]
    column = 0
    while True:
        start = None
        for index, cells in enumerate([*lines, []]):
            if column < len(cells) - 1:
                start = index if start is None else start
                continue
            if start is not None:
                width = max(len(lines[i][column]) for i in range(start, index)) + padding
                for i in range(start, index):
                    widths[i][column] = width
                start = None
        if not any(column < len(cells) - 1 for cells in lines):
            break
        column += 1
    out = []
    for cells, cell_widths in zip(lines, widths, strict=True):
        padded = [cell.ljust(width) for cell, width in zip(cells, cell_widths, strict=False)]
        out.append("".join([*padded, cells[-1]]))
    return "\n".join(out)


# --- istioctl proxy-config listener ---------------------------------------------------------


def _address(listener: dict[str, Any]) -> str:
    address = listener.get("address", {})
    if "socket_address" in address:
        return str(address["socket_address"].get("address", ""))
    return str(address.get("pipe", {}).get("path", ""))


def _port(listener: dict[str, Any]) -> int:
    return int(listener.get("address", {}).get("socket_address", {}).get("port_value", 0))


def _chains(listener: dict[str, Any]) -> list[dict[str, Any]]:
    chains = list(listener.get("filter_chains", []))
    if "default_filter_chain" in listener:
        chains.append(listener["default_filter_chain"])
    return chains


def _listener_type(listener: dict[str, Any]) -> str:
    http = tcp = 0
    for chain in _chains(listener):
        for network_filter in chain.get("filters", []):
            if network_filter["name"] == HCM_NAMES[0]:
                http += 1
            elif network_filter["name"] == TCP_PROXY and BLACK_HOLE not in json.dumps(
                network_filter.get("typed_config", {})
            ):
                tcp += 1
    if http:
        return "HTTP" if not tcp else "HTTP+TCP"
    return "TCP" if tcp else "UNKNOWN"


def _matches(match: dict[str, Any] | None) -> str:
    match = match or {}
    described = []
    if match.get("server_names"):
        described.append("SNI: " + ",".join(match["server_names"]))
    if match.get("transport_protocol"):
        described.append(f"Trans: {match['transport_protocol']}")
    if match.get("application_protocols"):
        described.append("App: " + ",".join(match["application_protocols"]))
    port = f":{match['destination_port']}" if "destination_port" in match else ""
    if match.get("prefix_ranges"):
        ranges = [f"{r['address_prefix']}/{r.get('prefix_len', 0)}" for r in match["prefix_ranges"]]
        described.append(f"Addr: {','.join(ranges)}{port}")
    elif port:
        described.append(f"Addr: *{port}")
    return "; ".join(described) or "ALL"


def _destination(filters: Sequence[dict[str, Any]]) -> str:
    for network_filter in filters:
        config = network_filter.get("typed_config", {})
        if network_filter["name"] == HCM_NAMES[0]:
            if "route_config" in config:
                return _describe_route_config(config["route_config"])
            if config.get("rds", {}).get("route_config_name"):
                return f"Route: {config['rds']['route_config_name']}"
            return "HTTP"
        if network_filter["name"] == TCP_PROXY and BLACK_HOLE not in json.dumps(config):
            cluster = str(config.get("cluster", ""))
            return cluster if "Cluster" in cluster else f"Cluster: {cluster}"
    return "Non-HTTP/Non-TCP"


def _describe_route_config(route_config: dict[str, Any]) -> str:
    match_all = _match_all_cluster(route_config)
    if match_all:
        return match_all
    hosts = []
    for host in route_config.get("virtual_hosts", []):
        routes = ", ".join(_describe_match(r.get("match", {})) for r in host.get("routes", []))
        domains = host.get("domains", [])
        described = "" if domains == ["*"] else "/".join(domains)
        hosts.append(f"{described} {routes}" if described else routes)
    return "Inline Route: " + "; ".join(hosts)


def _match_all_cluster(route_config: dict[str, Any]) -> str:
    hosts = route_config.get("virtual_hosts", [])
    if len(hosts) != 1 or hosts[0].get("domains") != ["*"] or len(hosts[0].get("routes", [])) != 1:
        return ""
    (route,) = hosts[0]["routes"]
    cluster = route.get("route", {}).get("cluster")
    if route.get("match", {}).get("prefix") != "/" or not cluster:
        return ""
    return str(cluster) if "Cluster" in cluster else f"Cluster: {cluster}"


def _describe_match(match: dict[str, Any]) -> str:
    conditions = []
    if match.get("prefix"):
        conditions.append(f"{match['prefix']}*")
    if match.get("path_separated_prefix"):
        conditions.append(f"PathPrefix:{match['path_separated_prefix']}")
    if match.get("path"):
        conditions.append(match["path"])
    if "safe_regex" in match:
        conditions.append(f"regex {match['safe_regex'].get('regex', '')}")
    return " ".join(conditions)


def listener_summary(dump: dict[str, Any], *, port: int = 0) -> str:
    """``istioctl proxy-config listener POD [--port N]``."""
    listeners = [
        listener for listener in all_listeners(dump) if not port or _port(listener) == port
    ]
    listeners.sort(key=lambda one: (_port(one), _address(one), _listener_type(one)))
    rows = ["ADDRESSES\tPORT\tMATCH\tDESTINATION"]
    for listener in listeners:
        addresses = [
            _address(listener),
            *(
                a["address"]["socket_address"]["address"]
                for a in listener.get("additional_addresses", [])
            ),
        ]
        chains = sorted(
            ((_matches(c.get("filter_chain_match")), _destination(c.get("filters", [])))
             for c in _chains(listener)),
            key=lambda chain: chain[1], reverse=True,
        )  # fmt: skip
        for match, destination in chains:
            rows.append(f"{','.join(addresses)}\t{_port(listener)}\t{match}\t{destination}")
    return tabwriter("\n".join(rows) + "\n", padding=1)


# --- istioctl proxy-config route --------------------------------------------------------------


def route_configs(dump: dict[str, Any]) -> list[dict[str, Any]]:
    """RDS route configurations, then static ones (which include every route configuration
    inline in a listener's connection manager), in the dump's order: istioctl sorts only
    numeric names."""
    routes = section(dump, "RoutesConfigDump")
    return [
        entry["route_config"]
        for key in ("dynamic_route_configs", "static_route_configs")
        for entry in routes.get(key, [])
        if entry.get("route_config")
    ]


def managed_by(metadata: dict[str, Any] | None) -> str:
    """The VIRTUAL SERVICE / DESTINATION RULE column: Istio's config path in
    ``filter_metadata.istio.config`` as ``NAME.NAMESPACE``."""
    if not metadata:
        return ""
    config = metadata.get("filter_metadata", {}).get("istio", {}).get("config")
    if config is None:
        return ""
    if str(config).startswith("/apis/networking.istio.io/"):
        pieces = str(config).split("/")
        return f"{pieces[7]}.{pieces[5]}" if len(pieces) == 8 else ""
    return "<unknown>"


def _route_domains(domains: Sequence[str]) -> str:
    if len(domains) <= 1:
        return domains[0] if domains else ""
    without_port = [d for d in domains if ":" not in d or (d.count(":") > 2 and d.endswith("]"))]
    shown = [
        d
        for d in without_port
        if not any(
            d != d.removesuffix(suffix) and d.removesuffix(suffix) in without_port
            for suffix in (".svc.cluster.local", ".svc")
        )
    ]
    if len(shown) > 2:
        return f"{', '.join(shown[:2])} + {len(shown) - 2} more..."
    return ", ".join(shown)


def route_summary(dump: dict[str, Any], *, name: str = "") -> str:
    """``istioctl proxy-config route POD [--name NAME]``."""
    rows = ["NAME\tVHOST NAME\tDOMAINS\tMATCH\tVIRTUAL SERVICE"]
    for config in route_configs(dump):
        if name and config.get("name", "") != name:
            continue
        for host in config.get("virtual_hosts", []):
            domains = _route_domains(host.get("domains", []))
            for route in host.get("routes", []):
                if route.get("route", {}).get("cluster") == PASSTHROUGH:
                    continue
                rows.append(
                    f"{config.get('name', '')}\t{host['name']}\t{domains}"
                    f"\t{_describe_match(route.get('match', {}))}"
                    f"\t{managed_by(route.get('metadata'))}"
                )
            if not host.get("routes"):
                rows.append(f"{config.get('name', '')}\t{host['name']}\t{domains}\t/*\t404")
    return tabwriter("\n".join(rows) + "\n", padding=5)


# --- istioctl proxy-config cluster -------------------------------------------------------------


def clusters(dump: dict[str, Any]) -> list[dict[str, Any]]:
    section_ = section(dump, "ClustersConfigDump")
    return [
        entry["cluster"]
        for key in ("dynamic_active_clusters", "static_clusters")
        for entry in section_.get(key, [])
        if entry.get("cluster")
    ]


def _subset_key(name: str) -> tuple[str, str, str, int]:
    """(direction, subset, host, port) of ``direction|port|subset|host``, else the name as
    the host (``safelyParseSubsetKey``)."""
    parts = name.split("|")
    if len(parts) > 3:
        return parts[0], parts[2], parts[3], int(parts[1]) if parts[1].isdigit() else 0
    return "", "", name, 0


def cluster_summary(dump: dict[str, Any], *, fqdn: str = "") -> str:
    """``istioctl proxy-config cluster POD [--fqdn SUBSTRING]``."""
    rows = ["SERVICE FQDN\tPORT\tSUBSET\tDIRECTION\tTYPE\tDESTINATION RULE"]
    selected = [c for c in clusters(dump) if fqdn in c["name"]]
    selected.sort(key=lambda c: (k := _subset_key(c["name"]))[2:3] + k[1:2] + (k[3], k[0]))
    for cluster in selected:
        kind = cluster.get("type", "STATIC")  # proto3 JSON leaves the default out
        rule = managed_by(cluster.get("metadata"))
        if len(cluster["name"].split("|")) > 3:
            direction, subset, host, port = _subset_key(cluster["name"])
            rows.append(f"{host}\t{port}\t{subset or '-'}\t{direction}\t{kind}\t{rule}")
        else:
            rows.append(f"{cluster['name']}\t-\t-\t-\t{kind}\t{rule}")
    return tabwriter("\n".join(rows) + "\n", padding=5)


# --- istioctl proxy-config ecds ---------------------------------------------------------------


def ecds_configs(dump: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ECDS section's filters (istioctl merges them), sorted by type, then name."""
    found = [
        entry["ecds_filter"]
        for config in dump["configs"]
        if config["@type"] == "type.googleapis.com/envoy.admin.v3.EcdsConfigDump"
        for entry in config.get("ecds_filters", [])
    ]
    return sorted(found, key=lambda f: (f.get("typed_config", {}).get("@type", ""), f["name"]))


def ecds_summary(dump: dict[str, Any]) -> str:
    """``istioctl proxy-config ecds POD``."""
    rows = ["ECDS NAME\tTYPE"]
    for extension in ecds_configs(dump):
        kind = extension.get("typed_config", {}).get("@type", "")
        rows.append(f"{extension['name']}\t{kind.removeprefix('type.googleapis.com/')}")
    return tabwriter("\n".join(rows) + "\n", padding=5)


# --- istioctl x authz check --------------------------------------------------------------------


def _inline_rbac(dump: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The RBAC configs ``authz check`` parses: per dynamic listener (by name), per filter
    chain (not the default one), the HTTP filters named ``envoy.filters.http.rbac`` and the
    network filters named ``envoy.filters.network.rbac``. A filter whose config is not inline
    (``config_discovery``: ECDS) parses as an empty RBAC, whatever it will load."""
    for listener in sorted(dynamic_listeners(dump), key=lambda one: str(one.get("name", ""))):
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                if network_filter["name"] in HCM_NAMES:
                    manager = network_filter.get("typed_config", {})
                    for http_filter in manager.get("http_filters", []):
                        if http_filter.get("name") == HTTP_RBAC:
                            yield http_filter.get("typed_config", {})
                elif network_filter["name"] == NETWORK_RBAC:
                    yield network_filter.get("typed_config", {})


def _policy_name(name: str) -> tuple[str, str]:
    found = POLICY_NAME.search(name)
    if found is None:
        return "", ""  # istioctl logs "failed to parse policy name" and lists it nameless
    return f"{found[2]}.{found[1]}", found[3]


def authz_check(dump: dict[str, Any]) -> str:
    """``istioctl x authz check POD``."""
    by_action: dict[str, set[str]] = {}
    rules: dict[str, set[str]] = {}

    def add(action: str, name: str, rule: str) -> None:
        by_action.setdefault(action, set()).add(name)
        rules.setdefault(name, set()).add(rule)

    for rbac in _inline_rbac(dump):
        action = rbac.get("rules", {}).get("action", "ALLOW")  # proto3 JSON omits ALLOW
        policies = rbac.get("rules", {}).get("policies", {})
        for name in policies:
            add(action, *_policy_name(name))
        for name in rbac.get("shadow_rules", {}).get("policies", {}):
            if name.startswith("istio-ext-authz-"):
                add("CUSTOM", *_policy_name(name))
        if not policies:
            add(action, ANONYMOUS, "0")
    rows = ["ACTION\tAuthorizationPolicy\tRULES"]
    for action in ("DENY", "ALLOW", "LOG", "CUSTOM"):
        rows.extend(
            f"{action}\t{name}\t{len(rules[name])}" for name in sorted(by_action.get(action, ()))
        )
    return tabwriter("\n".join(rows) + "\n", padding=3)


# --- istioctl x describe pod: the "RBAC policies:" line ------------------------------------------


def describe_rbac_policies(dump: dict[str, Any], *, service_port: int) -> list[str]:
    """The policy names ``describe pod`` prints for a Service port: those of the first
    inline RBAC filter of the first connection manager of listener ``virtualInbound``, or of
    a listener on that port not bound to 0.0.0.0 (dump order, dynamic listeners only)."""
    for listener in dynamic_listeners(dump):
        inbound = listener.get("name") == VIRTUAL_INBOUND
        on_port = _port(listener) == service_port and _address(listener) != "0.0.0.0"
        if not (inbound or on_port):
            continue
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                manager = network_filter.get("typed_config", {})
                if manager.get("@type") == HCM_TYPE:
                    return _first_rbac_policies(manager)
    return []


def _first_rbac_policies(manager: dict[str, Any]) -> list[str]:
    for http_filter in manager.get("http_filters", []):
        config = http_filter.get("typed_config")
        if http_filter.get("name") == HTTP_RBAC and config and config.get("@type") == RBAC_TYPE:
            return list(config.get("rules", {}).get("policies", {}))
    return []


VIEWS = {
    "listener": listener_summary,
    "route": route_summary,
    "cluster": cluster_summary,
    "ecds": ecds_summary,
    "authz-check": authz_check,
}
#: The pod of the operator guide's examples (``istioctl``'s ``NAME.NAMESPACE``).
POD = "shop.demo"
#: The commands docs/operator.md shows, with the output this reader renders for them.
DOC_COMMANDS = (
    f"istioctl proxy-config listener {POD} --port 15007",
    f"istioctl proxy-config route {POD} --name meshguard_loopback_ipv4",
    f"istioctl proxy-config cluster {POD} --fqdn meshguard_loopback",
    f"istioctl proxy-config ecds {POD}",
    f"istioctl x authz check {POD}",
)


def render_command(dump: dict[str, Any], command: str) -> str:
    """What ``command`` (one of the forms in :data:`DOC_COMMANDS`) prints for ``dump``."""
    words = command.split()
    if words[1:4] == ["x", "authz", "check"]:
        return authz_check(dump)
    assert words[1] == "proxy-config", command
    flags = dict(zip(words[4::2], words[5::2], strict=True))
    if words[2] == "listener":
        return listener_summary(dump, port=int(flags.get("--port", "0")))
    if words[2] == "route":
        return route_summary(dump, name=flags.get("--name", ""))
    if words[2] == "cluster":
        return cluster_summary(dump, fqdn=flags.get("--fqdn", ""))
    if words[2] == "ecds":
        return ecds_summary(dump)
    raise ValueError(f"no rendering for {command!r}")


def docs_blocks(dump: dict[str, Any]) -> str:
    """The operator guide's blocks: ``$ COMMAND`` and its output, one fenced block each."""
    return "".join(
        f"```console\n$ {command}\n{render_command(dump, command)}```\n\n"
        for command in DOC_COMMANDS
    )


def main(argv: Sequence[str]) -> int:
    """``DUMP.json VIEW``: one view of a saved dump; ``--docs``: start the real Envoy as a
    sidecar (root), print the operator guide's blocks; ``--dump``: print its config dump."""
    if list(argv) in (["--docs"], ["--dump"]):
        with tempfile.TemporaryDirectory() as workdir:
            dump = config_dump(Path(workdir))
        sys.stdout.write(docs_blocks(dump) if argv[0] == "--docs" else json.dumps(dump, indent=2))
        return 0
    if len(argv) != 2 or argv[1] not in VIEWS:
        sys.stderr.write(
            "usage: python -m tests.support.istioctl --docs | --dump | DUMP.json"
            f" {{{'|'.join(VIEWS)}}}\n"
        )
        return 2
    sys.stdout.write(VIEWS[argv[1]](json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
