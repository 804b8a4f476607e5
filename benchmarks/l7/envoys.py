"""The L7 benchmark's pod: ports, uids, the configurations (one line each), the mesh's
certificates and every Envoy's bootstrap (two processes per configuration the app dials:
two processes of one configuration differ by several percent, so rounds alternate them)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import L7_POLICY
from meshguard import yaml_io
from meshguard.authz.contract import SERVICE_NAME
from meshguard.authz.envoy_config import (
    AuthzTls,
    ListenerSettings,
    authz_cluster,
    bootstrap,
    loopback_listeners,
    upstream_cluster,
)
from meshguard.authz.identity import TlsFiles
from meshguard.l7 import DecisionLog, L7Engine
from meshguard.mesh import LOCAL_AUTHZ_PORT
from meshguard.policy import Mode, parse_policy
from meshguard.rbac import RE2_PROGRAM_SIZE, RE2_RUNTIME_KEY, compile_rbac, rbac_document_text
from tests.authz.spiffe import AUTHZ_DNS, issue_workload, spiffe_id
from tests.support.pods import injected_example, status_of
from tests.support.processes import HOST
from tests.support.tls import CertificateAuthority

APP_UID = 1000
PROXY_UID = 1337
UPSTREAM_PORT = 15020  # pilot-agent's port: covered by the L7 rule, REDIRECTed for the app
LISTENER_PORT = ListenerSettings().port  # 15007
ROUTER_PORT, RBAC_PORT, ECHO_LISTENER_PORT = 15100, 15101, 15102
ECHO_PLAIN_LISTENER_PORT = 15103
NATIVE_LISTENER_PORT, NATIVE_NOLOG_LISTENER_PORT = 15104, 15105
ENVOY_ONLY_PORT, NATIVE_DENIED_LISTENER_PORT = 15106, 15107
#: Instance i of a configuration listens on port + i * INSTANCE_STEP (admin likewise):
#: 15200-15217, clear of Istio's 15000-15090, the authz servers and the instance 0 ports.
INSTANCE_STEP = 100
AUTHZ_PORT, ECHO_PORT, ECHO_PLAIN_PORT = 9191, 9193, 9195
AUTHZ_PLAIN_PORT = LOCAL_AUTHZ_PORT  # plaintext on loopback: in the proxy's protected range
#: The mesh's identities: the pod (demo/shop, ServiceAccount default) and the authz server.
POD_SPIFFE_ID = spiffe_id("demo", "default")
AUTHZ_SPIFFE_ID = spiffe_id("meshguard-system", "meshguard-authz")
CONCURRENCY = (1, 8, 64)
CHECK_METHOD = f"/{SERVICE_NAME}/Check"
NATIVE_GOAL, NATIVE_STRETCH = 0.90, 0.95  # (n) / (a) throughput at every concurrency
AUTHZ_GOAL = 0.7  # meshguard serve-authz / bare grpc.aio echo, checks/s
CALL_TIMEOUT_SECONDS = 2.0
HELPER_LIFETIME_SECONDS = 900  # helpers never outlive a stuck benchmark by much
#: Istio's IPv4 nat capture rules (istio-iptables' ``ipnets`` golden, as the e2e test loads).
ISTIO_NAT = """*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT
COMMIT
"""  # noqa: E501
#: wrk: POST /quitquitquit with an empty body; one JSON line of results at the end.
WRK_SCRIPT = """wrk.method = "POST"
wrk.path = "/quitquitquit"
wrk.body = ""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d,'
    .. ' "status": %d, "timeout": %d, "p50_us": %.1f, "p99_us": %.1f, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass(frozen=True)
class HttpConfig:
    key: str
    label: str
    port: int  # what the client dials (instance 0)
    admin_port: int
    authz: str | None  # process name of the authz server its Envoy asks
    get_status: int  # what the app's GET gets (the policy allows POST /quitquitquit only)
    instances: int = 2  # Envoy processes, alternated by round (instance_of)

    @property
    def envoy(self) -> str:
        """Its Envoy in a trial's CPU figures: the instance that served the trial."""
        return f"envoy_{self.key}"

    def process(self, instance: int) -> str:
        """The process name of its Envoy ``instance``."""
        return f"{self.envoy}@{instance}"

    def listener_port(self, instance: int) -> int:
        return self.port + instance * INSTANCE_STEP

    def admin(self, instance: int) -> int:
        return self.admin_port + instance * INSTANCE_STEP

    def instance_of(self, round_: int) -> int:
        """Rounds 0 1 2 3 use instances 0 1 1 0: alternating, and each instance in both of
        the rounds' orders (even rounds run forward, odd ones reversed)."""
        return (round_ + round_ // 2) % self.instances

    def served(self, cpu: dict[str, float], instance: int) -> dict[str, float]:
        """A trial's CPU deltas, the serving instance's under ``envoy`` (the other's kept)."""
        cpu = dict(cpu)
        cpu[self.envoy] = cpu.pop(self.process(instance))
        return cpu


#: One line per configuration; its Envoys' bootstraps are in ``envoy_document``.
#: (c) is reached by the kernel's REDIRECT to 15007: one process only.
CONFIGS = (
    HttpConfig("a", "(a) native, no authz", ROUTER_PORT, 15110, None, 200),
    HttpConfig("r", "(r) envoy router alone", ENVOY_ONLY_PORT, 15116, None, 200),
    HttpConfig("b", "(b) envoy+rbac", RBAC_PORT, 15111, None, 403),
    HttpConfig("c", "(c) envoy+meshguard", UPSTREAM_PORT, 15000, "authz", 403, instances=1),
    HttpConfig("c0", "(c0) envoy+authz-echo", ECHO_LISTENER_PORT, 15112, "echo", 200),
    HttpConfig("c0p", "(c0p) echo, plaintext", ECHO_PLAIN_LISTENER_PORT, 15113, "echo_plain", 200),
    HttpConfig("n", "(n) envoy+native rbac", NATIVE_LISTENER_PORT, 15114, None, 403),
    HttpConfig("n0", "(n0) native, no log", NATIVE_NOLOG_LISTENER_PORT, 15115, None, 403),
    HttpConfig("nd", "(nd) native, denials log", NATIVE_DENIED_LISTENER_PORT, 15117, None, 403),
)
#: Every Envoy process: (configuration, instance).
ENVOYS = tuple((c, i) for c in CONFIGS for i in range(c.instances))


@dataclass(frozen=True)
class GrpcServer:
    port: int
    process: str  # its key in Bench.processes
    tls: bool  # mTLS, the client presenting the pod's workload certificate


#: The authz servers alone: (c)'s and (c0)'s over mTLS, and plaintext twins of both.
GRPC_SERVERS = {
    "echo": GrpcServer(ECHO_PORT, "echo", tls=True),
    "meshguard": GrpcServer(AUTHZ_PORT, "authz", tls=True),
    "echo-plain": GrpcServer(ECHO_PLAIN_PORT, "echo_plain", tls=False),
    "meshguard-plain": GrpcServer(AUTHZ_PLAIN_PORT, "authz_plain", tls=False),
}


# --- the mesh's certificates ----------------------------------------------------------------


@dataclass(frozen=True)
class ClientTls:
    """PEM bytes a gRPC client presents (the pod's workload certificate) and trusts."""

    cert: bytes
    key: bytes
    ca: bytes


@dataclass(frozen=True)
class MeshCertificates:
    """A test mesh CA's SPIFFE workload certificates, as istiod issues them: the authz
    server's and the pod's (files readable by the proxy's uid)."""

    ca: Path
    authz: TlsFiles
    pod: TlsFiles

    def flags(self, which: TlsFiles) -> list[str]:
        return [
            f"--tls-{k}={v}" for k, v in (("cert", which.cert), ("key", which.key), ("ca", self.ca))
        ]

    def envoy_tls(self) -> AuthzTls:
        """The pod's Envoy: its workload certificate; only the authz server's ID accepted."""
        return AuthzTls(
            cert=str(self.pod.cert), key=str(self.pod.key), ca=str(self.ca),
            server_spiffe_id=AUTHZ_SPIFFE_ID,
        )  # fmt: skip


def write_mesh_certificates(directory: Path) -> MeshCertificates:
    """A test mesh CA and its SPIFFE workload certificates for the authz server (with a DNS
    name for the Python gRPC client, which checks host names) and the pod."""
    ca = CertificateAuthority.create()
    directory.mkdir(mode=0o755)
    authz = issue_workload(ca, directory, "authz", AUTHZ_SPIFFE_ID, dns=AUTHZ_DNS)
    pod = issue_workload(ca, directory, "pod", POD_SPIFFE_ID)
    return MeshCertificates(
        ca=authz.ca,
        authz=TlsFiles(cert=authz.cert, key=authz.key, ca=authz.ca),
        pod=TlsFiles(cert=pod.cert, key=pod.key, ca=pod.ca),
    )


# --- configuration: the pod, the Envoys ----------------------------------------------------


def injected_pod() -> dict[str, Any]:
    """The example pod with the L7 policy, enforce mode, through ``inject_pod``."""
    return injected_example(policy=L7_POLICY, mode="enforce")


def app_source_address(pod: dict[str, Any]) -> str:
    """The IPv4 address meshguard's SNAT gives the app's redirected flows."""
    return next(a for a in status_of(pod).listener.sources["app"] if ":" not in a)


def _http_connection_manager(listener: dict[str, Any]) -> dict[str, Any]:
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    return dict(hcm["typed_config"])


def direct_bootstrap(
    name: str, *, port: int, admin_port: int, filters: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """meshguard's listener minus what meshguard adds: no original_dst, no routing header,
    no decision filters, a static upstream cluster; ``filters`` go before the same router."""
    listener = copy.deepcopy(loopback_listeners(ListenerSettings(port=port))[0])
    listener["name"] = name
    listener.pop("listener_filters", None)
    hcm = _http_connection_manager(listener)
    router = hcm["http_filters"][-1]
    if router["name"] != "envoy.filters.http.router":
        raise RuntimeError(f"meshguard's listener no longer ends with the router: {router}")
    hcm["stat_prefix"] = name
    hcm["http_filters"] = [*filters, router]
    hcm["route_config"]["name"] = name
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    route.pop("request_headers_to_add", None)
    route["route"]["cluster"] = "bench_upstream"
    listener["filter_chains"][0]["filters"][0]["typed_config"] = hcm
    cluster = {
        "name": "bench_upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "bench_upstream",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(UPSTREAM_PORT)}}]}],
        },
    }
    return _bootstrap(name, admin_port, [listener], [cluster])


def rbac_filter(port: int) -> dict[str, Any]:
    """meshguard's rule ``app -> proxy:15020 POST /quitquitquit`` in Envoy's RBAC terms: the
    app is the direct peer 127.0.0.1, the listener's ``port`` stands for 15020."""
    permission = {"and_rules": {"rules": [
        {"destination_port": port},
        {"header": {"name": ":method", "string_match": {"exact": "POST"}}},
        {"url_path": {"path": {"exact": "/quitquitquit"}}},
    ]}}  # fmt: skip
    policy = {
        "permissions": [permission],
        "principals": [{"direct_remote_ip": {"address_prefix": HOST, "prefix_len": 32}}],
    }
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {"app-to-proxy-quitquitquit": policy}},
        },
    }


def echo_authz_bootstrap(
    name: str, *, port: int, echo_port: int, admin_port: int, tls: AuthzTls | None
) -> dict[str, Any]:
    """meshguard's IPv4 listener and clusters, on ``port``, asking the echo server (over
    meshguard's mTLS cluster when ``tls``). Nothing redirects to ``port``, so the
    original-destination header is pinned to the upstream."""
    listener = _pinned_listener(name, ListenerSettings(port=port))
    clusters = [upstream_cluster(), authz_cluster(host=HOST, port=echo_port, tls=tls)]
    return _bootstrap(name, admin_port, [listener], clusters)


def _pinned_listener(
    name: str, settings: ListenerSettings, *, decision_log: bool = True, authorize: bool = True
) -> dict[str, Any]:
    """meshguard's IPv4 listener named ``name``, its original-destination header pinned to
    the upstream (nothing redirects to its port); without the decision line, or without the
    decision filters (the router alone), if asked."""
    listener = copy.deepcopy(loopback_listeners(settings)[0])
    listener["name"] = name
    hcm = _http_connection_manager(listener)
    hcm["stat_prefix"] = name
    if not decision_log:  # (n0): what the line costs, by its absence
        hcm["access_log"] = []
    if not authorize:  # (a): the same listener, routing and cluster, with no authorization
        router = hcm["http_filters"][-1]
        if router["name"] != "envoy.filters.http.router":
            raise RuntimeError(f"meshguard's listener no longer ends with the router: {router}")
        hcm["http_filters"] = [router]
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (header,) = route["request_headers_to_add"]
    header["header"]["value"] = f"{HOST}:{UPSTREAM_PORT}"
    listener["filter_chains"][0]["filters"][0]["typed_config"] = hcm
    return listener


def native_bootstrap(
    name: str, *, port: int, admin_port: int, rbac_path: Path | None, log: DecisionLog | None
) -> dict[str, Any]:
    """meshguard's native IPv4 listener on ``port`` (the ambiguity DENY regexes, the pod's
    RBAC by ECDS from ``rbac_path``, the router, the JSON decision lines ``log`` selects on
    stdout): the original-destination header pinned to the upstream, as nothing redirects
    there. No ``rbac_path``: the decision filters removed; no ``log``: no access log."""
    settings = ListenerSettings(
        port=port, engine=L7Engine.NATIVE, decision_log=log or DecisionLog.ALL,
        rbac_path=str(rbac_path or ListenerSettings().rbac_path),
    )  # fmt: skip
    listener = _pinned_listener(
        name, settings, decision_log=log is not None, authorize=rbac_path is not None
    )
    document = _bootstrap(name, admin_port, [listener], [upstream_cluster()])
    document["layered_runtime"] = {
        "layers": [{"name": "static", "static_layer": {RE2_RUNTIME_KEY: RE2_PROGRAM_SIZE}}]
    }
    return document


def native_rbac_document(port: int) -> str:
    """The example pod's policy as the native engine compiles it, with the app dialing the
    native listener on ``port`` directly: its rule's port is the listener's, its address the
    host's."""
    policy = parse_policy(L7_POLICY.replace(str(UPSTREAM_PORT), str(port)))
    document = compile_rbac(policy=policy, mode=Mode.ENFORCE, sources={"app": (HOST,)})
    return rbac_document_text(document)


def _bootstrap(
    name: str, admin_port: int, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "node": {"id": f"bench-{name}", "cluster": "bench"},
        "admin": {"address": _socket(admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _socket(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": HOST, "port_value": port}}


#: The native listeners: listener name and decision log by key; (a) without authorization.
NATIVE = {
    "a": ("no_authz_ipv4", None), "n": ("native_ipv4", DecisionLog.ALL),
    "n0": ("native_nolog_ipv4", None), "nd": ("native_denied_ipv4", DecisionLog.DENIED),
}  # fmt: skip


def envoy_document(
    config: HttpConfig, instance: int, workdir: Path, certs: MeshCertificates
) -> dict[str, Any]:
    """The bootstrap of one Envoy process (a native one's RBAC file written)."""
    port, admin = config.listener_port(instance), config.admin(instance)
    match config.key:
        case "r":
            return direct_bootstrap("router_only", port=port, admin_port=admin, filters=[])
        case "b":
            return direct_bootstrap(
                "rbac", port=port, admin_port=admin, filters=[rbac_filter(port)]
            )
        case "c":
            return bootstrap(
                ListenerSettings(), authz_host=HOST, authz_port=AUTHZ_PORT, admin_port=admin,
                authz_tls=certs.envoy_tls(),
            )  # fmt: skip
        case "c0" | "c0p":
            plain = config.key == "c0p"
            return echo_authz_bootstrap(
                "echo_plain_ipv4" if plain else "echo_authz_ipv4", port=port,
                echo_port=ECHO_PLAIN_PORT if plain else ECHO_PORT, admin_port=admin,
                tls=None if plain else certs.envoy_tls(),
            )  # fmt: skip
    name, log = NATIVE[config.key]
    rbac_path = None
    if config.key != "a":  # each instance's RBAC grants its own port
        rbac_path = workdir / f"rbac-{config.process(instance)}.json"
        rbac_path.write_text(native_rbac_document(port))
    return native_bootstrap(name, port=port, admin_port=admin, rbac_path=rbac_path, log=log)


def envoy_configs(workdir: Path, certs: MeshCertificates) -> dict[str, Path]:
    """Every Envoy process's bootstrap written to a file, by its process name."""
    paths = {}
    for config, instance in ENVOYS:
        name = config.process(instance)
        path = workdir / f"{name}.yaml"
        path.write_text(yaml_io.dump(envoy_document(config, instance, workdir, certs)))
        paths[name] = path
    return paths
