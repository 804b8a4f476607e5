"""The Check channel end to end with the real Envoy and real mutual TLS.

A pod's network namespace as in ``test_envoy_e2e``: Istio's capture rules, meshguard's
rules, the real Envoy as the proxy's uid running the loopback listener, whose ext_authz
cluster is mTLS with the pod's workload certificate (a test mesh CA issuing SPIFFE IDs, as
istiod does) and accepts only the authz server's SPIFFE ID; ``meshguard serve-authz`` with
``--tls-*`` terminating that mTLS. The pod is ``demo/shop`` (ServiceAccount ``default``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshguard.authz.envoy_config import AuthzTls, ListenerSettings, bootstrap
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.sandbox.envoy import authz_command, envoy_command, wait_listening
from meshguard.sandbox.netns import NetworkNamespace, serve_http_command
from tests.authz.spiffe import Workload, issue_workload, spiffe_id
from tests.authz.test_envoy_e2e import APP, CACHE, PROXY, injected_pod
from tests.support.keys import trusted_keys_file
from tests.support.podns import PodSandbox
from tests.support.tls import CertificateAuthority

pytestmark = pytest.mark.root

AUTHZ_ID = spiffe_id("meshguard-system", "meshguard-authz")
POLICY = """
rules:
  - from: app
    to: proxy
    ports: [15020]
    http: {methods: [POST], paths: ["/quitquitquit"]}
  - from: cache
    to: app
    ports: [8080]
    http: {methods: [GET], paths: ["/token/*"], headers: {x-token: s3cret}}
  - from: cache
    to: app
    ports: [8080]
    http: {methods: [GET], paths: ["/bearer/*"], headers: {authorization: Bearer s3cret}}
"""


@dataclass
class MtlsPod:
    box: PodSandbox
    decisions: Path
    start_envoy: Callable[[Workload], None]
    mesh: dict[str, Workload]

    def http(self, uid: int, **target: Any) -> dict[str, Any]:
        (result,) = self.box.probe(uid=uid, gid=uid, targets=[{"protocol": "http", **target}])
        return result

    def decision_lines(self) -> list[dict[str, Any]]:
        text = self.decisions.read_text().splitlines()
        lines = [json.loads(line) for line in text if line.startswith("{")]  # not gRPC's logs
        return [line for line in lines if line.get("event") == "decision"]


@pytest.fixture
def mtls_pod(tmp_path: Path, shared_dir: Path) -> Iterator[MtlsPod]:
    pod = injected_pod("enforce", policy=POLICY)
    pod_file = shared_dir / "pod.yaml"
    pod_file.write_text(yaml.safe_dump(pod))
    ruleset_file = tmp_path / "ruleset"
    ruleset_file.write_text(pod["metadata"]["annotations"]["meshguard.io/ruleset"])
    decisions = tmp_path / "authz.log"
    decisions.write_text("")
    ca, rogue = CertificateAuthority.create(), CertificateAuthority.create()
    certs = shared_dir / "certs"
    certs.mkdir(mode=0o755)
    mesh = {
        "authz": issue_workload(ca, certs, "authz", AUTHZ_ID),
        "shop": issue_workload(ca, certs, "shop", spiffe_id("demo", "default")),
        "attacker": issue_workload(ca, certs, "attacker", spiffe_id("attacker", "default")),
        "rogue": issue_workload(rogue, certs, "rogue", spiffe_id("demo", "default")),
    }
    with NetworkNamespace() as ns:
        box = PodSandbox(
            ns=ns, ruleset=Ruleset.from_json(ruleset_file.read_text()), ruleset_file=ruleset_file
        )
        box.load_istio("ipnets.golden", families=[Family.IPV4])
        box.load_istio("ipv6-outbound-ports.golden", families=[Family.IPV6])
        box.meshguard_init()
        ns.spawn(serve_http_command(name="app", uid=APP, gid=APP, ports=[8080]), ready_line="ready")
        agent = serve_http_command(name="pilot-agent", uid=PROXY, gid=PROXY, ports=[15020])
        ns.spawn(agent, ready_line="ready")
        server = mesh["authz"]
        tls_flags = ["--tls-cert", str(server.cert), "--tls-key", str(server.key)]
        tls_flags += ["--tls-ca", str(server.ca)]
        authz = [
            *authz_command(
                [pod_file],
                uid=PROXY,
                gid=PROXY,
                port=9191,
                trusted_keys=trusted_keys_file(pod_file.parent),
            ),
            *tls_flags,
        ]
        ns.spawn(authz, stderr=decisions.open("a"))
        envoys: list[Any] = []

        def start_envoy(workload: Workload) -> None:
            for process in envoys:
                ns.stop(process)
            envoys.clear()
            tls = AuthzTls(
                cert=str(workload.cert), key=str(workload.key), ca=str(workload.ca),
                server_spiffe_id=AUTHZ_ID,
            )  # fmt: skip
            settings = ListenerSettings(forward_headers=("x-token",))
            config = shared_dir / "loopback-listener.yaml"
            document = bootstrap(
                settings, authz_host="127.0.0.1", authz_port=9191, admin_port=15000,
                authz_tls=tls,
            )  # fmt: skip
            config.write_text(yaml.safe_dump(document))
            envoys.append(
                ns.spawn(
                    envoy_command(config, uid=PROXY, gid=PROXY),
                    env={"POD_NAME": "shop", "POD_NAMESPACE": "demo"},
                )
            )
            wait_listening(ns, port=15007, uid=PROXY, gid=PROXY)

        wait_listening(ns, port=9191, uid=PROXY, gid=PROXY)
        yield MtlsPod(box=box, decisions=decisions, start_envoy=start_envoy, mesh=mesh)


QUIT = {"host": "127.0.0.1", "port": 15020, "method": "POST", "path": "/quitquitquit"}


def test_the_pods_own_identity_over_mtls_is_allowed_and_logged(mtls_pod: MtlsPod):
    mtls_pod.start_envoy(mtls_pod.mesh["shop"])
    got = mtls_pod.http(APP, **QUIT)
    assert (got["result"], got["server"]) == ("allow", "pilot-agent"), got
    (line,) = mtls_pod.decision_lines()
    assert line["caller"] == "spiffe://cluster.local/ns/demo/sa/default"
    assert (line["result"], line["kind"], line["pod"]) == ("allow", "allowed_by_rule", "demo/shop")


def test_a_forged_identity_is_denied(mtls_pod: MtlsPod):
    """The Envoy of another workload (a certificate of the mesh CA for attacker/default)
    naming demo/shop in its Checks: denied, logged with the caller's identity."""
    mtls_pod.start_envoy(mtls_pod.mesh["attacker"])
    got = mtls_pod.http(APP, **QUIT)
    assert got["status"] == 403, got
    assert "a workload may only ask about its own pods" in got["body"]
    (line,) = mtls_pod.decision_lines()
    assert line["caller"] == "spiffe://cluster.local/ns/attacker/sa/default"
    assert (line["result"], line["kind"]) == ("deny", "identity_mismatch")


def test_a_certificate_of_another_ca_gets_no_decision(mtls_pod: MtlsPod):
    mtls_pod.start_envoy(mtls_pod.mesh["rogue"])
    got = mtls_pod.http(APP, **QUIT)
    assert (got["result"], got["status"]) == ("error", 503), got  # TLS refused: no decision
    assert mtls_pod.decision_lines() == []


def test_only_the_listed_headers_reach_the_authz_server(mtls_pod: MtlsPod):
    """x-token is in allowed_headers: its rule can match. Authorization is not: it never
    leaves the pod's Envoy, so a rule on it cannot match (deny), whatever the client sends."""
    mtls_pod.start_envoy(mtls_pod.mesh["shop"])
    target = {"host": "127.0.0.1", "port": 8080, "method": "GET"}
    token = mtls_pod.http(CACHE, **target, path="/token/a", headers={"x-token": "s3cret"})
    assert (token["result"], token["server"]) == ("allow", "app"), token
    bearer = mtls_pod.http(
        CACHE, **target, path="/bearer/a", headers={"authorization": "Bearer s3cret"}
    )
    assert bearer["status"] == 403, bearer
    assert bearer["body"].startswith("meshguard: denied: no rule allows cache -> app:8080")
