"""A pod in a network namespace: Istio's real capture rules, meshguard's rules installed by
the real ``meshguard init``, and one echo server per container under the container's uid."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshguard.pod import read_pod
from meshguard.rules.backend import uses_native_nftables
from meshguard.rules.compiler import CompilerSettings, compile_pod
from meshguard.rules.ruleset import Family, Ruleset
from meshguard.sandbox.netns import NetworkNamespace, PodAddresses, probe_command, serve_command
from tests.support.netfilter import Netfilter
from tests.support.shared import golden_payloads


@dataclass(frozen=True)
class Server:
    name: str
    uid: int
    gid: int
    tcp: tuple[int, ...] = ()
    udp: tuple[int, ...] = ()


@dataclass
class PodSandbox:
    ns: NetworkNamespace
    ruleset: Ruleset
    ruleset_file: Path
    servers: list[Server] = field(default_factory=list)
    netfilter: Netfilter = Netfilter.IPTABLES_NFT

    def load_istio(self, golden: str, *, families: Iterable[Family] = tuple(Family)) -> None:
        """Istio's iptables golden, through the sandbox's iptables variant."""
        v4, v6 = golden_payloads(golden)
        for family, payloads in ((Family.IPV4, v4), (Family.IPV6, v6)):
            if family in families:
                for payload in payloads:
                    tool = (
                        family.restore
                        if self.netfilter is Netfilter.NFTABLES
                        else self.netfilter.restore(family)
                    )
                    self.ns.run([tool, "--noflush"], stdin=payload)

    def load_istio_nft(self, ruleset: str) -> None:
        """Istio's native nftables capture (a golden's ``nft -f`` text)."""
        self.ns.run(["nft", "-f", "-"], stdin=ruleset)

    def meshguard_init(self, *extra: str) -> str:
        return self.ns.run(
            [sys.executable, "-m", "meshguard", "init", "--ruleset-file", str(self.ruleset_file),
             *extra]
        )  # fmt: skip

    def serve(self, server: Server) -> None:
        argv = serve_command(
            name=server.name, uid=server.uid, gid=server.gid, tcp=server.tcp, udp=server.udp
        )
        self.ns.spawn(argv, ready_line="ready")
        self.servers.append(server)

    def probe(
        self,
        *,
        uid: int,
        gid: int,
        targets: Sequence[Mapping[str, Any]],
        groups: Sequence[int] = (),
    ) -> list[dict[str, Any]]:
        out = self.ns.run(
            probe_command(uid=uid, gid=gid, groups=groups), stdin=json.dumps(list(targets))
        )
        results: list[dict[str, Any]] = json.loads(out)
        return results

    def save(self, family: Family) -> str:
        if self.netfilter is Netfilter.NFTABLES:
            return self.ns.run(["nft", "list", "ruleset"])
        return self.ns.run([self.netfilter.save(family)])


@contextlib.contextmanager
def pod_sandbox(
    ruleset: Ruleset,
    directory: Path,
    *,
    istio: Mapping[Family, str],
    netfilter: Netfilter = Netfilter.IPTABLES_NFT,
    istio_nft: str | None = None,
) -> Iterator[PodSandbox]:
    """A namespace with Istio's golden capture rules (per family) and meshguard's ruleset
    installed by the real ``meshguard init`` from the file the downward API would give it.

    ``netfilter`` is the backend Istio's capture goes into: an iptables variant (the
    ``istio`` goldens, through its own restore tool), or native nftables (``istio_nft``,
    a native golden's text); meshguard-init detects it by itself."""
    ruleset_file = directory / "ruleset"
    ruleset_file.write_text(ruleset.to_json())
    with NetworkNamespace() as ns:
        box = PodSandbox(ns=ns, ruleset=ruleset, ruleset_file=ruleset_file, netfilter=netfilter)
        if netfilter is Netfilter.NFTABLES:
            if istio_nft is not None:
                box.load_istio_nft(istio_nft)
        else:
            for family, golden in istio.items():
                box.load_istio(golden, families=[family])
        box.meshguard_init()
        yield box


def compile_for(pod: Mapping[str, Any]) -> Ruleset:
    """The ruleset admission records for the pod (native nftables read from its spec)."""
    view = read_pod(metadata=pod["metadata"], spec=pod["spec"])
    native = uses_native_nftables(view, pod["spec"])
    return compile_pod(view, settings=CompilerSettings(), native_nftables=native)


def own_lines(save_output: str) -> list[str]:
    """iptables-save lines that concern meshguard (its chains and jumps), counters stripped."""
    return [
        line
        for line in save_output.splitlines()
        if "MESHGUARD" in line and not line.startswith("#")
    ]


@contextlib.contextmanager
def client_namespace(box: PodSandbox) -> Iterator[NetworkNamespace]:
    """Another pod on the same link: the far end of the pod's eth0 moved into a namespace
    of its own, with an address of the pod's subnet (its traffic arrives on the pod's eth0,
    where Istio's inbound capture applies)."""
    with NetworkNamespace(addresses=PodAddresses(ipv4="10.1.2.100", ipv6="fd00:10::100")) as ns:
        ns.run(["ip", "link", "del", "eth0"])  # its own veth pair is not needed
        box.ns.run(["ip", "link", "set", "eth0-peer", "netns", ns.name])
        ns.run(["ip", "link", "set", "eth0-peer", "up"])
        ns.run(["ip", "addr", "add", "10.1.2.100/24", "dev", "eth0-peer"])
        yield ns
