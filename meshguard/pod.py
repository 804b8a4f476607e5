"""A typed, read-only view of a pod spec as meshguard needs it.

Reads the containers of a pod (or pod template) after Istio's injection: which one is the
proxy and with which uid/gid it runs, which are the workload's containers, native sidecars
and init containers, with their effective uid/gid and declared ports. Pure: dict in, frozen
dataclasses out; malformed specs raise :class:`~meshguard.errors.MalformedInputError`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, ValidationError

from meshguard.errors import MalformedInputError

PROXY_CONTAINER: Final = "istio-proxy"
ISTIO_INIT: Final = "istio-init"
ISTIO_VALIDATION: Final = "istio-validation"
MESHGUARD_INIT: Final = "meshguard-init"
DEFAULT_PROXY_ID: Final = 1337

#: Init containers that set up the pod's network and finish before anything else runs.
MESH_INIT_CONTAINERS: Final = frozenset({ISTIO_INIT, ISTIO_VALIDATION, MESHGUARD_INIT})


class Role(enum.StrEnum):
    CONTAINER = "container"
    SIDECAR = "sidecar"  # native sidecar: an init container with restartPolicy Always
    INIT = "init"  # a regular init container of the workload
    PROXY = "proxy"
    MESH_INIT = "mesh-init"  # istio-init, istio-validation, meshguard-init


@dataclass(frozen=True)
class ContainerPort:
    port: int
    protocol: str  # "tcp", "udp" or "sctp"


@dataclass(frozen=True)
class Container:
    name: str
    role: Role
    uid: int | None
    gid: int | None
    ports: tuple[ContainerPort, ...]

    @property
    def runs_alongside(self) -> bool:
        """True for containers that run while the pod serves (not one-shot init containers)."""
        return self.role in {Role.CONTAINER, Role.SIDECAR}


@dataclass(frozen=True)
class ProxyIdentity:
    """Who the kernel sees as the proxy: its uid, and its gid when the pod states it.

    In Istio's TPROXY mode the proxy runs as uid 0 with gid 1337: matching the gid too keeps
    every other root process from passing as the proxy.
    """

    uid: int
    gid: int
    gid_stated: bool = True

    @property
    def owner_match(self) -> str:
        """The iptables owner match of the proxy's sockets."""
        match = f"-m owner --uid-owner {self.uid}"
        return f"{match} --gid-owner {self.gid}" if self.gid_stated else match


@dataclass(frozen=True)
class PodView:
    name: str
    namespace: str | None
    annotations: Mapping[str, str]
    containers: tuple[Container, ...]
    host_network: bool

    @property
    def proxy(self) -> Container | None:
        return next((c for c in self.containers if c.role is Role.PROXY), None)

    @property
    def proxy_identity(self) -> ProxyIdentity:
        proxy = self.proxy
        uid = proxy.uid if proxy and proxy.uid is not None else DEFAULT_PROXY_ID
        stated = proxy is not None and proxy.gid is not None
        gid = proxy.gid if proxy and proxy.gid is not None else DEFAULT_PROXY_ID
        return ProxyIdentity(uid=uid, gid=gid, gid_stated=stated)

    @property
    def workload(self) -> tuple[Container, ...]:
        """Every container the policy governs: all but the proxy and the mesh's init steps."""
        return tuple(c for c in self.containers if c.role not in {Role.PROXY, Role.MESH_INIT})

    def container(self, name: str) -> Container | None:
        return next((c for c in self.containers if c.name == name), None)


class _Shape(BaseModel):
    """Types of the pod fields meshguard reads; everything else is left as it is."""

    model_config = ConfigDict(extra="allow", strict=True)


class _Capabilities(_Shape):
    add: list[str] | None = None
    drop: list[str] | None = None


class _SecurityContext(_Shape):
    runAsUser: int | None = None
    runAsGroup: int | None = None
    privileged: bool | None = None
    allowPrivilegeEscalation: bool | None = None
    capabilities: _Capabilities | None = None


class _PodSecurityContext(_Shape):
    runAsUser: int | None = None
    runAsGroup: int | None = None
    fsGroup: int | None = None
    supplementalGroups: list[int] | None = None


class _ContainerShape(_Shape):
    name: str
    securityContext: _SecurityContext | None = None
    ports: list[dict[str, Any]] | None = None
    restartPolicy: str | None = None


class _HostPath(_Shape):
    path: str


class _Volume(_Shape):
    name: str
    hostPath: _HostPath | None = None


class _SpecShape(_Shape):
    containers: list[_ContainerShape] | None = None
    initContainers: list[_ContainerShape] | None = None
    securityContext: _PodSecurityContext | None = None
    volumes: list[_Volume] | None = None
    hostNetwork: bool | None = None
    hostPID: bool | None = None
    shareProcessNamespace: bool | None = None


class _MetadataShape(_Shape):
    name: str | None = None
    namespace: str | None = None
    annotations: dict[str, str] | None = None
    labels: dict[str, str] | None = None


def check_shape(*, metadata: object, spec: object) -> None:
    """Refuse a pod whose fields meshguard reads have the wrong types, naming the field."""
    for where, model, value in (("metadata", _MetadataShape, metadata), ("spec", _SpecShape, spec)):
        try:
            model.model_validate(value)
        except ValidationError as exc:
            err = exc.errors()[0]
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            got = repr(err.get("input"))[:60]
            expected = str(err["msg"]).replace("Input should be", "expected")
            raise MalformedInputError(f"{where}{path}: {expected}, got {got}") from None


def read_pod(*, metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> PodView:
    """Build the view of one pod (or pod template) from its metadata and spec."""
    check_shape(metadata=metadata, spec=spec)
    metadata = _mapping(metadata, "metadata")
    spec = _mapping(spec, "spec")
    pod_context = _mapping(spec.get("securityContext") or {}, "spec.securityContext")
    containers = [
        *_read_list(spec, "initContainers", pod_context, init=True),
        *_read_list(spec, "containers", pod_context, init=False),
    ]
    names = [c.name for c in containers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MalformedInputError(f"spec: container names must be unique, repeated: {duplicates}")
    raw_annotations = _mapping(metadata.get("annotations") or {}, "metadata.annotations")
    return PodView(
        name=str(metadata.get("name") or metadata.get("generateName") or ""),
        namespace=metadata.get("namespace"),
        annotations={str(k): str(v) for k, v in raw_annotations.items()},
        containers=tuple(containers),
        host_network=spec.get("hostNetwork") is True,
    )


def _read_list(
    spec: Mapping[str, Any], field: str, pod_context: Mapping[str, Any], *, init: bool
) -> list[Container]:
    items = spec.get(field) or []
    if not isinstance(items, list):
        raise MalformedInputError(f"spec.{field}: expected a list, got {type(items).__name__}")
    return [
        _read_container(item, f"spec.{field}[{index}]", pod_context, init=init)
        for index, item in enumerate(items)
    ]


def _read_container(
    raw: object, where: str, pod_context: Mapping[str, Any], *, init: bool
) -> Container:
    item = _mapping(raw, where)
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedInputError(f"{where}.name: expected a container name, got {name!r}")
    context = _mapping(item.get("securityContext") or {}, f"{where}.securityContext")
    return Container(
        name=name,
        role=_role(name, item, init=init),
        uid=_id(context, pod_context, "runAsUser", where),
        gid=_id(context, pod_context, "runAsGroup", where),
        ports=_ports(item.get("ports") or [], where),
    )


def _role(name: str, item: Mapping[str, Any], *, init: bool) -> Role:
    if name == PROXY_CONTAINER:
        return Role.PROXY
    if init and name in MESH_INIT_CONTAINERS:
        return Role.MESH_INIT
    if init:
        return Role.SIDECAR if item.get("restartPolicy") == "Always" else Role.INIT
    return Role.CONTAINER


def _id(
    context: Mapping[str, Any], pod_context: Mapping[str, Any], key: str, where: str
) -> int | None:
    value = context.get(key, pod_context.get(key))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32 - 1:
        raise MalformedInputError(
            f"{where}.securityContext.{key}: expected an integer 0-4294967294, got {value!r}"
        )
    return value


def _ports(raw: object, where: str) -> tuple[ContainerPort, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise MalformedInputError(f"{where}.ports: expected a list, got {type(raw).__name__}")
    ports = []
    for index, entry in enumerate(raw):
        item = _mapping(entry, f"{where}.ports[{index}]")
        port = item.get("containerPort")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise MalformedInputError(
                f"{where}.ports[{index}].containerPort: expected 1-65535, got {port!r}"
            )
        protocol = str(item.get("protocol", "TCP")).lower()
        if protocol not in {"tcp", "udp", "sctp"}:
            raise MalformedInputError(
                f"{where}.ports[{index}].protocol: expected TCP, UDP or SCTP, got {protocol!r}"
            )
        ports.append(ContainerPort(port=port, protocol=protocol))
    return tuple(ports)


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedInputError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value
