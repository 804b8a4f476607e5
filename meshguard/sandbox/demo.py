"""``meshguard demo``: a pod built for real, without a cluster, and every flow tried.

A network namespace stands in for the pod: Istio's capture rules (as istio-init writes them,
through iptables-nft, iptables-legacy or in Istio's native nftables mode: :class:`Netfilter`),
meshguard's rules installed by ``meshguard init`` from the ruleset the injection recorded
(it finds the backend by itself, as in a pod),
one process per container under the container's uid (echo and HTTP servers), the real Envoy
as the proxy's uid with the loopback listener, and ``meshguard serve-authz``. Then a probe
process per identity tries each planned flow. Everything is removed on exit, error or
Ctrl-C (the namespace and every process it started).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from shutil import which
from typing import Any

from meshguard import annotation_keys, yaml_io
from meshguard.attestation import Signer, generate
from meshguard.authz.istio_config import envoy_config_text
from meshguard.errors import MeshguardFailure
from meshguard.inject.transform import InjectSettings, Outcome, inject_pod
from meshguard.manifests import PodTemplate
from meshguard.mesh import LOCAL_AUTHZ_PORT
from meshguard.pod import read_pod
from meshguard.policy import parse_policy
from meshguard.rules.backend import NATIVE_NFTABLES_FLAG, Backend
from meshguard.rules.ruleset import Family
from meshguard.sandbox.envoy import authz_command, envoy_binary, envoy_command, wait_listening
from meshguard.sandbox.flows import (
    CLUSTER_DNS,
    CLUSTER_DNS6,
    ENVOY_ADMIN_PORT,
    DemoPlan,
    Flow,
    Identity,
    plan,
)
from meshguard.sandbox.istio import CaptureConfig, capture_nft, capture_payload
from meshguard.sandbox.netns import (
    NetworkNamespace,
    probe_command,
    serve_command,
    serve_http_command,
)
from meshguard.sandbox.probe import ProbeOutcome, ProbeTarget
from meshguard.status import read_status

#: Inside the proxy's reserved range: only the proxy's uid can answer from it, so no container
#: can squat it before the authz server binds it.
AUTHZ_PORT = LOCAL_AUTHZ_PORT
LISTENER_PORT = 15007
#: The proxy's listeners that Istio's capture and meshguard's redirect deliver to.
PROXY_TCP = (15001, 15006, 15053)
PROXY_UDP = (15053,)

Progress = Callable[[str], None]


class Netfilter(enum.StrEnum):
    """Where the sandbox's Istio writes its capture: an iptables variant, or Istio's native
    nftables mode (``values.global.nativeNftables``: istio-init runs ``--native-nftables``)."""

    IPTABLES_NFT = "iptables-nft"
    IPTABLES_LEGACY = "iptables-legacy"
    NFTABLES = "nftables"

    @property
    def tools(self) -> tuple[str, ...]:
        if self is Netfilter.NFTABLES:
            return ("nft",)
        backend = Backend(self.value)
        return tuple(backend.restore(family) for family in Family)


def as_native_nftables(template: PodTemplate) -> None:
    """Make the pod's istio-init (the one Istio's status names) run Istio's native nftables
    mode, as Istio injects it with ``values.global.nativeNftables``; before admission, which
    reads it from there."""
    view = read_pod(metadata=template.metadata, spec=template.spec)
    step = view.istio_init_step
    if step is None:
        raise MeshguardFailure("the pod has no istio-init: Istio's native nftables mode needs one")
    container = template.spec[step.field][step.index]
    args = list(container.get("args") or [])
    if NATIVE_NFTABLES_FLAG not in args:
        container["args"] = [*args, NATIVE_NFTABLES_FLAG]


@dataclass(frozen=True)
class Outcomes:
    results: tuple[tuple[Flow, str], ...]

    @property
    def unexpected(self) -> list[tuple[Flow, str]]:
        return [(flow, seen) for flow, seen in self.results if seen != flow.expected]


class PodDemo:
    """The sandboxed pod; use as a context manager."""

    def __init__(
        self,
        template: PodTemplate,
        *,
        progress: Progress,
        netfilter: Netfilter = Netfilter.IPTABLES_NFT,
    ) -> None:
        self.template = template
        self.progress = progress
        self.netfilter = netfilter
        self._exit = contextlib.ExitStack()
        self.workdir = Path()
        self.ns = NetworkNamespace()
        self.plan = DemoPlan(identities=(), flows=())
        self._authz: Any = None

    def __enter__(self) -> PodDemo:
        try:
            self._build()
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    @property
    def pod_name(self) -> str:
        return str(self.template.metadata.get("name") or self.template.name or "pod")

    @property
    def pod_namespace(self) -> str:
        return str(self.template.metadata.get("namespace") or self.template.namespace or "default")

    # --- building -----------------------------------------------------------------------

    def _build(self) -> None:
        self.workdir = Path(
            self._exit.enter_context(tempfile.TemporaryDirectory(prefix="meshguard-demo-"))
        )
        self.workdir.chmod(0o755)  # the pod's processes (other uids) read the files here
        view = read_pod(metadata=self.template.metadata, spec=self.template.spec)
        policy = parse_policy(self.template.metadata["annotations"].get(annotation_keys.POLICY))
        self.plan = plan(view, policy)
        self.ns = self._exit.enter_context(NetworkNamespace())
        self.progress(f"network namespace {self.ns.name} with lo and eth0")
        proxy = view.proxy_identity
        capture = CaptureConfig(
            proxy_uids=(proxy.uid,),
            proxy_gids=(proxy.gid,),
            nameserver4=f"{CLUSTER_DNS}/32",
            nameserver6=f"{CLUSTER_DNS6}/128",
        )
        self._load_capture(capture)
        self.install_rules()
        self._start_containers()
        self._start_proxy(proxy_uid=proxy.uid, proxy_gid=proxy.gid)

    def _load_capture(self, capture: CaptureConfig) -> None:
        """Istio's capture, as istio-init writes it in the sandbox's backend."""
        if self.netfilter is Netfilter.NFTABLES:
            self.ns.run(["nft", "-f", "-"], stdin=capture_nft(capture))
            where = "native nftables: table inet istio-proxy-nat, istio-proxy-raw"
        else:
            backend = Backend(self.netfilter.value)
            for family in Family:
                self.ns.run(
                    [backend.restore(family), "--noflush"], stdin=capture_payload(capture, family)
                )
            where = self.netfilter.value
        self.progress(f"Istio's capture rules (istio-init, REDIRECT mode, DNS capture) in {where}")

    def install_rules(self) -> None:
        """meshguard-init, as in the pod: the ruleset the injection recorded, from a file."""
        annotations = self.template.metadata["annotations"]
        (self.workdir / "ruleset").write_text(annotations[annotation_keys.RULESET])
        metadata = {
            **self.template.metadata,
            "name": self.pod_name,
            "namespace": self.pod_namespace,
        }
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": self.template.spec}
        (self.workdir / "pod.yaml").write_text(yaml_io.dump(pod, sort_keys=True))
        self.ns.run(
            [
                sys.executable,
                "-m",
                "meshguard",
                "init",
                "--ruleset-file",
                str(self.workdir / "ruleset"),
            ]
        )
        mode = annotations.get(annotation_keys.MODE, "enforce")
        status = read_status(annotations[annotation_keys.STATUS])
        digest = (status.ruleset if status is not None and status.ruleset else "?")[:19]
        where = ", ".join(self.rules_found()) or "nowhere"
        self.progress(f"meshguard-init installed ruleset {digest}... ({mode} mode) in {where}")

    def rules_found(self) -> list[str]:
        """The backends meshguard's rules are in, as read from the namespace: exactly the
        one Istio's capture is in, when meshguard-init detected it right."""
        found = []
        for backend in (Backend.IPTABLES_NFT, Backend.IPTABLES_LEGACY):
            if any("MESHGUARD" in self.ns.run([backend.save(f)]) for f in Family):
                found.append(backend.value)
        if "table inet meshguard" in self.ns.run(["nft", "list", "tables"]):
            found.append(Netfilter.NFTABLES.value)
        return found

    def _start_containers(self) -> None:
        for identity in self.plan.identities:
            if not identity.container:
                continue
            name = identity.name
            tcp, udp = self.plan.tcp_ports.get(name, ()), self.plan.udp_ports.get(name, ())
            if tcp or udp:
                self.ns.spawn(
                    serve_command(name=name, uid=identity.uid, gid=identity.gid, tcp=tcp, udp=udp),
                    ready_line="ready",
                )
            if self.plan.http_ports.get(name):
                self.ns.spawn(
                    serve_http_command(
                        name=name,
                        uid=identity.uid,
                        gid=identity.gid,
                        ports=self.plan.http_ports[name],
                    ),
                    ready_line="ready",
                )
        self.progress(
            f"{sum(i.container for i in self.plan.identities)} containers, each under its own uid"
        )

    def _start_proxy(self, *, proxy_uid: int, proxy_gid: int) -> None:
        self.ns.spawn(
            serve_command(name="proxy", uid=proxy_uid, gid=proxy_gid, tcp=PROXY_TCP, udp=PROXY_UDP),
            ready_line="ready",
        )
        agent_ports = self.plan.http_ports.get("proxy", ())
        if agent_ports:
            self.ns.spawn(
                serve_http_command(
                    name="pilot-agent", uid=proxy_uid, gid=proxy_gid, ports=agent_ports
                ),
                ready_line="ready",
            )
        self.start_authz(uid=proxy_uid, gid=proxy_gid)
        config = self.workdir / "envoy.yaml"
        config.write_text(
            envoy_config_text(
                "bootstrap",
                authz_host="127.0.0.1",
                authz_port=AUTHZ_PORT,
                admin_port=ENVOY_ADMIN_PORT,
            )
        )
        env = {"POD_NAME": self.pod_name, "POD_NAMESPACE": self.pod_namespace}
        self.ns.spawn(envoy_command(config, uid=proxy_uid, gid=proxy_gid), env=env)
        wait_listening(self.ns, port=LISTENER_PORT, uid=proxy_uid, gid=proxy_gid)
        self.progress(
            f"Envoy (uid {proxy_uid}): admin on :{ENVOY_ADMIN_PORT},"
            f" loopback listener on :{LISTENER_PORT}"
        )

    def start_authz(self, *, uid: int, gid: int) -> None:
        if self._authz is not None:
            self.ns.stop(self._authz)
        log = (self.workdir / "authz.log").open("a")
        self._exit.callback(log.close)
        self._authz = self.ns.spawn(
            authz_command(
                [self.workdir / "pod.yaml"],
                uid=uid,
                gid=gid,
                port=AUTHZ_PORT,
                trusted_keys=self._trusted_keys(),
            ),
            stderr=log,
        )
        try:
            wait_listening(self.ns, port=AUTHZ_PORT, uid=uid, gid=gid)
        except MeshguardFailure as exc:
            tail = (self.workdir / "authz.log").read_text().strip().splitlines()[-3:]
            raise MeshguardFailure(
                f"{exc}; meshguard serve-authz said: {' | '.join(tail)}"
            ) from None
        self.progress(f"meshguard serve-authz on :{AUTHZ_PORT}")

    def _trusted_keys(self) -> Path:
        """The demo's ephemeral public key, as serve-authz reads it (readable by its uid)."""
        path = self.workdir / "trusted-keys.pem"
        path.write_text(ephemeral_signer().public_pem())
        path.chmod(0o644)
        return path

    # --- trying flows -------------------------------------------------------------------

    def run(self, flows: tuple[Flow, ...] | list[Flow]) -> Outcomes:
        by_identity = {i.name: i for i in self.plan.identities}
        results: list[tuple[Flow, str]] = []
        for name in dict.fromkeys(f.source for f in flows):
            mine = [f for f in flows if f.source == name]
            identity = by_identity[name]
            answers = self._probe(identity, [f.target() for f in mine])
            results += [
                (flow, _observed(flow, answer)) for flow, answer in zip(mine, answers, strict=True)
            ]
        return Outcomes(tuple(results))

    def _probe(self, identity: Identity, targets: list[ProbeTarget]) -> list[ProbeOutcome]:
        out = self.ns.run(
            probe_command(uid=identity.uid, gid=identity.gid, groups=identity.groups),
            stdin=json.dumps(targets),
        )
        answers: list[ProbeOutcome] = json.loads(out)
        return answers

    def switch_to_audit(self) -> None:
        """Re-inject in audit mode, re-run meshguard-init (it converges), restart authz."""
        self.template.metadata["annotations"][annotation_keys.MODE] = "audit"
        result = inject_pod(
            self.template.metadata,
            self.template.spec,
            settings=InjectSettings(request_template=False, signer=ephemeral_signer()),
        )
        assert result.outcome is Outcome.INJECTED
        self.install_rules()
        proxy = read_pod(metadata=self.template.metadata, spec=self.template.spec).proxy_identity
        self.start_authz(uid=proxy.uid, gid=proxy.gid)


@functools.cache
def ephemeral_signer() -> Signer:
    """The demo's signing key: made for this process, never written to disk (only its
    public key is, for serve-authz)."""
    return generate()


def _observed(flow: Flow, answer: ProbeOutcome) -> str:
    result = str(answer.get("result"))
    if result == "sent":  # a broadcast left the socket: the kernel did not refuse it
        return "allow"
    if result == "allow" and flow.lands_on is not None and answer.get("port") != flow.lands_on:
        return f"landed on {answer.get('port')}"
    if result in {"allow", "deny"}:
        return result
    return f"{result}: {answer.get('detail') or answer.get('status') or ''}".strip(": ")


def root_problem(netfilter: Netfilter = Netfilter.IPTABLES_NFT) -> str | None:
    """Why the demo cannot run here, in one line; None when it can."""
    if os.geteuid() != 0:
        return (
            "meshguard demo needs root (network namespaces, iptables, processes under other uids)"
        )
    # meshguard-init's detection reads nft and iptables-legacy whatever the backend.
    tools = ("ip", "iptables-restore", "ip6tables-restore", "setpriv", *netfilter.tools)
    missing = list(dict.fromkeys(t for t in tools if which(t) is None))
    if missing:
        needed = ", ".join(missing)
        return (
            f"meshguard demo needs {needed}: apt-get install iptables nftables iproute2 util-linux"
        )
    try:
        envoy_binary()
    except MeshguardFailure as exc:
        return f"meshguard demo needs the Envoy binary: {exc}"
    return None
