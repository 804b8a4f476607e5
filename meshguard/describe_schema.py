"""The data model of ``meshguard describe -o json|yaml``: one :class:`PodDescription` per pod.

The documented schema (docs/describe-schema.md): camelCase keys, every field but the pod's
reference optional, new fields added, none renamed. Built by
:func:`meshguard.describe.describe_pod`, put in words by :mod:`meshguard.describe_text`.
"""

from __future__ import annotations

import enum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from meshguard.policy import Action, Mode
from meshguard.recent_denials import RecentDenials

#: ``apiVersion`` of the documents ``describe -o json|yaml`` writes.
API_VERSION: Final = "describe.meshguard.io/v1alpha1"
KIND: Final = "PodDescription"


class Protection(enum.StrEnum):
    """Whether a pod with Istio's sidecar also has meshguard."""

    #: meshguard recorded its status: its rules are in the pod.
    PROTECTED = "protected"
    #: Istio injected its sidecar and meshguard did not: no loopback isolation.
    UNPROTECTED = "unprotected"
    #: Istio's sidecar without meshguard, by the operator's choice (annotation or label).
    OPTED_OUT = "opted-out"
    #: No Istio sidecar (not in the mesh, injection disabled, ambient mode): nothing to do.
    NO_SIDECAR = "no-sidecar"


class _Data(BaseModel):
    """Frozen, camelCase on output, unknown keys refused (a typo in a test is an error)."""

    model_config = ConfigDict(
        frozen=True, alias_generator=to_camel, populate_by_name=True, extra="forbid"
    )


class PodRef(_Data):
    kind: str
    namespace: str | None = None
    name: str


class PortData(_Data):
    port: int
    protocol: str


class ContainerData(_Data):
    name: str
    #: None: the container has no runAsUser (meshguard cannot isolate it).
    uid: int | None = None
    #: container, sidecar (native), init, ephemeral.
    role: str
    ports: tuple[PortData, ...] = ()


class HttpData(_Data):
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    headers: dict[str, str] = {}


class RuleData(_Data):
    index: int
    #: Container names; ``*`` is every container.
    sources: tuple[str, ...]
    #: A container's name, or ``proxy``.
    to: str
    ports: tuple[int, ...]
    protocol: str
    #: Checked per request by the ext_authz server; None: the whole port.
    http: HttpData | None = None


class ProxyData(_Data):
    uid: int
    gid: int


class StatusState(enum.StrEnum):
    #: The ruleset recorded at admission is the one the admitted policy compiles to.
    CURRENT = "current"
    #: It is not (the policy cannot be what was compiled).
    STALE = "stale"
    #: Recorded, not compared (the policy cannot be compiled).
    RECORDED = "recorded"
    #: No ``meshguard.io/status``: meshguard did not inject the pod.
    NOT_INJECTED = "not-injected"
    #: ``meshguard.io/status`` is not what meshguard writes.
    MALFORMED = "malformed"


class StatusData(_Data):
    state: StatusState
    #: The digest of the ruleset installed (``sha256:...``).
    ruleset: str | None = None
    error: str | None = None


class AdmittedState(enum.StrEnum):
    #: The live ``policy`` and ``mode`` are the ones admitted.
    AS_ADMITTED = "as-admitted"
    #: They were changed after admission: the admitted ones are enforced (TAMPERED).
    CHANGED = "changed"
    #: The admitted record does not verify: every L7 request to the pod is denied (TAMPERED).
    UNVERIFIABLE = "unverifiable"
    #: No record (admitted by an older meshguard): every L7 request is denied.
    NO_RECORD = "no-record"
    #: Not admitted by meshguard (no status).
    NOT_ADMITTED = "not-admitted"


class AdmittedData(_Data):
    state: AdmittedState
    digest: str | None = None
    #: The mode admitted (what is enforced).
    mode: Mode | None = None
    #: What changed after admission (state ``changed``).
    drift: tuple[str, ...] = ()
    error: str | None = None


class EngineDocument(enum.StrEnum):
    """Whether the native engine's RBAC document on the pod is the one admitted."""

    ADMITTED = "admitted"
    #: Missing, or not the admitted document: the sidecar denies every L7 request.
    CHANGED = "changed"


class EngineData(_Data):
    """The L7 engine deciding the pod's HTTP rules, from the admitted record."""

    #: ``native`` (Envoy RBAC in the sidecar) or ``ext-authz`` (meshguard serve-authz).
    name: str
    #: The native engine's document: as admitted, or changed/missing.
    document: EngineDocument | None = None
    digest: str | None = None
    #: The compiled RBAC policies' ids (``rules[NNN]/container``).
    rules: tuple[str, ...] = ()


class PodDescription(_Data):
    """What ``describe`` says about one pod (or pod template). Only ``pod`` and
    ``protection`` are always there."""

    api_version: Literal["describe.meshguard.io/v1alpha1"] = API_VERSION
    kind: Literal["PodDescription"] = KIND
    pod: PodRef
    protection: Protection
    #: One sentence on the protection ("" when there is nothing to say).
    verdict: str | None = None
    #: Why the policy cannot be read (nothing below but ``status``/``admitted`` then).
    error: str | None = None
    #: The mode enforced: the admitted one when the pod's record verifies.
    mode: Mode | None = None
    #: Why the policy cannot be enforced as written (its ruleset does not compile).
    compile_error: str | None = None
    proxy: ProxyData | None = None
    containers: tuple[ContainerData, ...] = ()
    rules: tuple[RuleData, ...] = ()
    #: ``deny``: every other loopback flow is dropped; ``allow``: allowed (not the proxy's).
    default_action: Action | None = None
    #: The proxy's control ports, open only where a rule names them.
    protected_proxy_ports: tuple[int, ...] = ()
    #: Ports reachable through the pod's own Service (hairpin); empty: refused.
    hairpin_ports: tuple[int, ...] = ()
    #: ``meshguard-init`` or ``meshguard-validation`` (Istio CNI mode); None: neither yet.
    installer: str | None = None
    #: ``nftables`` (Istio's native nftables mode) or ``iptables``.
    netfilter: str | None = None
    status: StatusData | None = None
    admitted: AdmittedData | None = None
    #: What meshguard changed in the pod at admission (posture fixes).
    posture_changes: tuple[str, ...] = ()
    #: The L7 engine that decides the pod's HTTP rules, where known.
    engine: EngineData | None = None
    #: What the kernel denied the pod lately (``--recent-denials``: meshguard.recent_denials).
    recent_denials: RecentDenials | None = None

    @property
    def tampered(self) -> bool:
        """meshguard's annotations were edited after admission."""
        return (
            self.admitted is not None
            and self.admitted.state in (AdmittedState.CHANGED, AdmittedState.UNVERIFIABLE)
        ) or (self.status is not None and self.status.state is StatusState.MALFORMED)

    def as_data(self) -> dict[str, Any]:
        """The document ``-o json|yaml`` writes (absent fields left out)."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return data
