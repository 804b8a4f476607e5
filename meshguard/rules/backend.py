"""Which netfilter backend a pod's rules live in: the one Istio used, never a mix.

A pod's network namespace has one owner of its capture: ``istio-init`` (or the Istio CNI
plugin) wrote it through iptables-legacy, iptables-nft, or — with Istio's
``values.global.nativeNftables`` — natively in ``table inet istio-proxy-nat``. meshguard's
rules must go where Istio's are: netfilter does not order rules across the legacy
(x_tables) and nf_tables backends, and a verification that reads one backend cannot see the
other.

- :class:`Backend` names the three, and the tools of the iptables variants;
- :func:`detect_backend` decides, in this order: a forced backend (``meshguard init
  --backend``, ``$MESHGUARD_BACKEND``); Istio's native table present and the ruleset
  admitted for native nftables -> ``nftables``. Admission reads the mode from the pod spec
  (the ruleset records it), init confirms it in the namespace, and when the two disagree
  init fails closed: the table without the admitted mode (the spec says iptables), or
  the admitted mode without the table (Istio's capture is not there: never install beside
  nothing);
  ``$FORCE_IPTABLES_BINARY`` (Istio's own override, honored the same way); rules present
  in iptables-legacy -> ``iptables-legacy``; else ``iptables-nft`` — as Istio's
  ``istio-iptables`` chooses (``tools/istio-iptables/pkg/dependencies``);
- :func:`uses_native_nftables` reads, at admission, whether the pod's istio-init (or
  istio-validation) runs Istio's native nftables mode.
"""

from __future__ import annotations

import enum
import logging
import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from meshguard.errors import MeshguardFailure
from meshguard.process import CommandRunner
from meshguard.rules.ruleset import Family

if TYPE_CHECKING:  # meshguard init (this module's main user) must not load pydantic
    from meshguard.pod import PodView

#: Istio's override of its iptables variant (a binary name, e.g. ``iptables-legacy``).
FORCE_IPTABLES_ENV: Final = "FORCE_IPTABLES_BINARY"
#: meshguard's own override (same values as ``meshguard init --backend``).
BACKEND_ENV: Final = "MESHGUARD_BACKEND"
#: The table Istio's native nftables mode writes its sidecar capture into.
ISTIO_NFT_TABLE: Final = ("inet", "istio-proxy-nat")
#: The istio-init / istio-validation flag of Istio's native nftables mode.
NATIVE_NFTABLES_FLAG: Final = "--native-nftables"

log = logging.getLogger(__name__)


class Backend(enum.StrEnum):
    """Where the rules go. ``iptables`` is the unsuffixed tools (the system's default
    variant); detection only ever answers one of the other three."""

    IPTABLES = "iptables"
    IPTABLES_LEGACY = "iptables-legacy"
    IPTABLES_NFT = "iptables-nft"
    NFTABLES = "nftables"

    @property
    def is_iptables(self) -> bool:
        return self is not Backend.NFTABLES

    def _tool(self, family: Family, action: str) -> str:
        if not self.is_iptables:
            raise MeshguardFailure(f"the {self.value} backend has no iptables tools")
        base = "iptables" if family is Family.IPV4 else "ip6tables"
        variant = "" if self is Backend.IPTABLES else "-" + self.value.split("-", 1)[1]
        return f"{base}{variant}-{action}"

    def restore(self, family: Family) -> str:
        """``iptables-legacy-restore``, ``ip6tables-nft-restore``, ..."""
        return self._tool(family, "restore")

    def save(self, family: Family) -> str:
        return self._tool(family, "save")


def parse_backend(text: str, *, origin: str) -> Backend:
    """A backend named by an operator (a flag, an environment variable)."""
    try:
        return Backend(text.strip())
    except ValueError:
        choices = ", ".join(b.value for b in Backend)
        raise MeshguardFailure(f"{origin} is {text!r}, expected one of {choices}") from None


def forced_iptables(environ: Mapping[str, str]) -> Backend | None:
    """``$FORCE_IPTABLES_BINARY`` as Istio reads it: the binary of the variant to use."""
    text = environ.get(FORCE_IPTABLES_ENV, "").strip()
    if not text:
        return None
    name = text.rsplit("/", 1)[-1]
    variants = {
        "iptables": Backend.IPTABLES,
        "iptables-legacy": Backend.IPTABLES_LEGACY,
        "iptables-nft": Backend.IPTABLES_NFT,
    }
    if name not in variants:
        raise MeshguardFailure(
            f"${FORCE_IPTABLES_ENV} is {text!r}, expected iptables-legacy, iptables-nft or iptables"
        )
    return variants[name]


def istio_nft_table_present(run: CommandRunner) -> bool:
    """Whether Istio's native nftables capture (``table inet istio-proxy-nat``) is here."""
    if shutil.which("nft") is None:
        return False
    family, name = ISTIO_NFT_TABLE
    listing = run(["nft", "list", "tables", family])
    return any(line.split() == ["table", family, name] for line in listing.splitlines())


def legacy_rules_present(run: CommandRunner) -> bool:
    """Whether iptables-legacy holds any rule (IPv4 or IPv6), as istio-iptables checks."""
    for family in Family:
        tool = Backend.IPTABLES_LEGACY.save(family)
        if shutil.which(tool) is None:
            continue
        try:
            text = run([tool])
        except MeshguardFailure as exc:  # no x_tables in this kernel: nothing there
            log.debug("legacy save failed", extra={"fields": {"tool": tool, "error": str(exc)}})
            continue
        if any(line.startswith("-A ") for line in text.splitlines()):
            return True
    return False


def detect_backend(
    run: CommandRunner,
    *,
    environ: Mapping[str, str],
    forced: Backend | None = None,
    native_nftables: bool = False,
) -> Backend:
    """The backend to install into (see the module docstring for the order).

    ``native_nftables`` is what admission recorded in the ruleset: the pod's istio-init
    runs Istio's native nftables mode.
    """
    if forced is None and environ.get(BACKEND_ENV, "").strip():
        forced = parse_backend(environ[BACKEND_ENV], origin=f"${BACKEND_ENV}")
    if forced is not None:
        return _chosen(forced, "forced")
    if istio_nft_table_present(run):
        if not native_nftables:
            raise MeshguardFailure(
                "this network namespace has Istio's native nftables capture (table inet"
                " istio-proxy-nat), but the pod was admitted for iptables (its istio-init runs"
                " without --native-nftables): the pod spec and the namespace disagree on"
                " where Istio's capture is, refusing to guess (re-admit the pod, or force"
                " one with --backend / $MESHGUARD_BACKEND)"
            )
        return _chosen(Backend.NFTABLES, "table inet istio-proxy-nat present")
    if native_nftables:
        raise MeshguardFailure(
            "the pod's istio-init runs Istio's native nftables mode (--native-nftables), but"
            " this network namespace has no table inet istio-proxy-nat: Istio's capture is"
            " not installed (meshguard-init must run after istio-init), refusing to install"
            " beside nothing"
        )
    override = forced_iptables(environ)
    if override is not None:
        return _chosen(override, f"${FORCE_IPTABLES_ENV}")
    if legacy_rules_present(run):
        return _chosen(Backend.IPTABLES_LEGACY, "iptables-legacy holds rules")
    return _chosen(Backend.IPTABLES_NFT, "no iptables-legacy rules")


def _chosen(backend: Backend, why: str) -> Backend:
    # Debug: the "installed" line names the backend; this says why it was chosen.
    log.debug(
        "netfilter backend chosen",
        extra={"fields": {"event": "backend", "backend": backend.value, "reason": why}},
    )
    return backend


def uses_native_nftables(pod: PodView, spec: Mapping[str, Any]) -> bool:
    """Whether the pod's recognized istio-init / istio-validation runs ``--native-nftables``.

    The container is the one Istio's status places (``PodView.istio_init_step``), never one
    found by name alone.
    """
    step = pod.istio_init_step
    if step is None:
        return False
    containers = spec.get(step.field)
    if not isinstance(containers, Sequence) or step.index >= len(containers):
        return False
    container = containers[step.index]
    if not isinstance(container, Mapping):
        return False
    words = [*_strings(container.get("command")), *_strings(container.get("args"))]
    enabled = {NATIVE_NFTABLES_FLAG, f"{NATIVE_NFTABLES_FLAG}=true"}
    return any(word.lower() in enabled for word in words)


def _strings(value: object) -> list[str]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [str(v) for v in value if isinstance(v, str)]
    return []
