"""A typed, read-only view of a pod spec as meshguard needs it.

Reads the containers of a pod (or pod template) after Istio's injection: which one is the
proxy and with which uid/gid it runs, which are the workload's containers, native sidecars,
init containers and ephemeral (debug) containers, with their effective uid/gid and declared
ports. Pure: dict in, frozen dataclasses out; malformed specs raise
:class:`~meshguard.errors.MalformedInputError`.

Containers are classified here, once, for the compiler, the posture checks and the status:
a name alone never makes a container Istio's or meshguard's. ``istio-init`` and
``istio-validation`` are Istio's only as run-to-completion init containers that Istio's
``sidecar.istio.io/status`` lists in ``initContainers``; ``istio-proxy`` only where the
status lists it (``containers`` for a regular container, ``initContainers`` for a native
sidecar with ``restartPolicy: Always``); ``meshguard-init`` only as a run-to-completion init
container right after Istio's init step whose spec is the one meshguard generates. Every
other container, whatever its name, is the workload's.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, ValidationError

from meshguard import annotation_keys
from meshguard.errors import MalformedInputError
from meshguard.init_container import (
    MESHGUARD_INIT,
    MESHGUARD_VALIDATION,
    InitContainerSettings,
    init_container,
    is_validation_container,
)

PROXY_CONTAINER: Final = "istio-proxy"
ISTIO_INIT: Final = "istio-init"
ISTIO_VALIDATION: Final = "istio-validation"
DEFAULT_PROXY_ID: Final = 1337

#: Names of the init containers that set up the pod's network before anything else runs.
#: A name is not a classification: see :class:`Role` and :func:`read_pod`.
MESH_INIT_CONTAINERS: Final = frozenset(
    {ISTIO_INIT, ISTIO_VALIDATION, MESHGUARD_INIT, MESHGUARD_VALIDATION}
)
#: Istio's init steps, one of which meshguard-init follows.
ISTIO_INIT_STEPS: Final = (ISTIO_INIT, ISTIO_VALIDATION)
#: Fields of meshguard-init that depend on the installation's settings, not on what it does.
_SETTINGS_FIELDS: Final = frozenset({"image", "imagePullPolicy", "resources", "env"})


class Role(enum.StrEnum):
    CONTAINER = "container"
    SIDECAR = "sidecar"  # native sidecar: an init container with restartPolicy Always
    INIT = "init"  # a regular init container of the workload
    PROXY = "proxy"  # istio-proxy, as Istio's status lists it
    MESH_INIT = "mesh-init"  # istio-init, istio-validation, meshguard-init, recognized as such
    EPHEMERAL = "ephemeral"  # spec.ephemeralContainers (kubectl debug): no rules of its own


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
    #: Where the container is in the spec: ``initContainers``, ``containers`` or
    #: ``ephemeralContainers``, and its index there.
    field: str = "containers"
    index: int = 0

    @property
    def runs_alongside(self) -> bool:
        """True for containers that run while the pod serves (not one-shot init containers)."""
        return self.role in {Role.CONTAINER, Role.SIDECAR}

    @property
    def where(self) -> str:
        """The container's place in the pod spec, e.g. ``spec.initContainers[2]``."""
        return f"spec.{self.field}[{self.index}]"


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
    #: spec.ephemeralContainers: reviewed like the workload, but given no rules (their uids
    #: are no container's, so the kernel's default deny applies to them).
    ephemeral: tuple[Container, ...] = ()

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

    @property
    def mesh_init(self) -> tuple[Container, ...]:
        """Istio's and meshguard's recognized init steps."""
        return tuple(c for c in self.containers if c.role is Role.MESH_INIT)

    @property
    def istio_init_step(self) -> Container | None:
        """The recognized istio-init (or istio-validation in Istio CNI mode), if any."""
        return next((c for c in self.mesh_init if c.name in ISTIO_INIT_STEPS), None)

    def container(self, name: str) -> Container | None:
        return next((c for c in self.containers if c.name == name), None)

    def without(self, removed: Container) -> PodView:
        """The view once ``removed`` is taken out of the spec: the containers after it in its
        field move up one place; every classification stays."""

        def moved(c: Container) -> Container:
            if c.field == removed.field and c.index > removed.index:
                return dataclasses.replace(c, index=c.index - 1)
            return c

        return dataclasses.replace(
            self,
            containers=tuple(moved(c) for c in self.containers if c != removed),
            ephemeral=tuple(moved(c) for c in self.ephemeral if c != removed),
        )

    def with_ids(self, ids: Mapping[tuple[str, int], tuple[int | None, int | None]]) -> PodView:
        """The view once the containers at ``(field, index)`` run as the given (uid, gid)."""

        def updated(c: Container) -> Container:
            new = ids.get((c.field, c.index))
            return c if new is None else dataclasses.replace(c, uid=new[0], gid=new[1])

        return dataclasses.replace(
            self,
            containers=tuple(updated(c) for c in self.containers),
            ephemeral=tuple(updated(c) for c in self.ephemeral),
        )


class _Shape(BaseModel):
    """Types of the pod fields meshguard reads; everything else is left as it is."""

    model_config = ConfigDict(extra="allow", strict=True)


class _Capabilities(_Shape):
    add: list[str] | None = None
    drop: list[str] | None = None


class _Profile(_Shape):
    type: str | None = None
    localhostProfile: str | None = None


class _SELinuxOptions(_Shape):
    type: str | None = None
    user: str | None = None
    role: str | None = None
    level: str | None = None


class _SecurityContext(_Shape):
    runAsUser: int | None = None
    runAsGroup: int | None = None
    privileged: bool | None = None
    allowPrivilegeEscalation: bool | None = None
    capabilities: _Capabilities | None = None
    procMount: str | None = None
    seccompProfile: _Profile | None = None
    appArmorProfile: _Profile | None = None
    seLinuxOptions: _SELinuxOptions | None = None


class _Sysctl(_Shape):
    name: str
    value: str | None = None


class _PodSecurityContext(_Shape):
    runAsUser: int | None = None
    runAsGroup: int | None = None
    fsGroup: int | None = None
    supplementalGroups: list[int] | None = None
    seccompProfile: _Profile | None = None
    appArmorProfile: _Profile | None = None
    seLinuxOptions: _SELinuxOptions | None = None
    sysctls: list[_Sysctl] | None = None


class _ContainerShape(_Shape):
    name: str
    securityContext: _SecurityContext | None = None
    ports: list[dict[str, Any]] | None = None
    restartPolicy: str | None = None
    targetContainerName: str | None = None


class _HostPath(_Shape):
    path: str


class _Volume(_Shape):
    name: str
    hostPath: _HostPath | None = None


class _SpecShape(_Shape):
    containers: list[_ContainerShape] | None = None
    initContainers: list[_ContainerShape] | None = None
    ephemeralContainers: list[_ContainerShape] | None = None
    securityContext: _PodSecurityContext | None = None
    volumes: list[_Volume] | None = None
    hostNetwork: bool | None = None
    hostPID: bool | None = None
    hostIPC: bool | None = None
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


def read_pod(
    *,
    metadata: Mapping[str, Any],
    spec: Mapping[str, Any],
    init_settings: InitContainerSettings | None = None,
) -> PodView:
    """Build the view of one pod (or pod template) from its metadata and spec.

    ``init_settings``: the settings meshguard-init is generated with; a ``meshguard-init``
    is meshguard's only if its spec is exactly that container. Without them (readers of an
    admitted pod) only the fields that do not depend on the installation (image, pull
    policy, resources) are compared.
    """
    check_shape(metadata=metadata, spec=spec)
    metadata = _mapping(metadata, "metadata")
    spec = _mapping(spec, "spec")
    raw_annotations = _mapping(metadata.get("annotations") or {}, "metadata.annotations")
    annotations = {str(k): str(v) for k, v in raw_annotations.items()}
    pod_context = _mapping(spec.get("securityContext") or {}, "spec.securityContext")
    raw = {field: _items(spec, field) for field in _FIELDS}
    status = _istio_status(annotations, raw["initContainers"], raw["containers"])
    roles = _classify(raw, status, init_settings)
    containers = [
        _read_container(item, field, index, roles[field][index], pod_context)
        for field in _FIELDS
        for index, item in enumerate(raw[field])
    ]
    names_ = [c.name for c in containers]
    duplicates = sorted({n for n in names_ if names_.count(n) > 1})
    if duplicates:
        raise MalformedInputError(f"spec: container names must be unique, repeated: {duplicates}")
    return PodView(
        name=str(metadata.get("name") or metadata.get("generateName") or ""),
        namespace=metadata.get("namespace"),
        annotations=annotations,
        containers=tuple(c for c in containers if c.role is not Role.EPHEMERAL),
        host_network=spec.get("hostNetwork") is True,
        ephemeral=tuple(c for c in containers if c.role is Role.EPHEMERAL),
    )


_FIELDS: Final = ("initContainers", "containers", "ephemeralContainers")


@dataclass(frozen=True)
class IstioStatus:
    """The containers Istio's injector says it added (``sidecar.istio.io/status``)."""

    init_containers: frozenset[str]
    containers: frozenset[str]


def _istio_status(
    annotations: Mapping[str, str],
    init: Sequence[Mapping[str, Any]],
    regular: Sequence[Mapping[str, Any]],
) -> IstioStatus:
    raw = annotations.get(annotation_keys.ISTIO_STATUS)
    if raw is None:  # Istio did not inject this pod: nothing in it is Istio's
        return IstioStatus(init_containers=frozenset(), containers=frozenset())
    where = f"metadata.annotations[{annotation_keys.ISTIO_STATUS}]"
    try:
        document = json.loads(raw)
    except ValueError:
        raise MalformedInputError(
            f"{where}: expected Istio's JSON status, got {raw[:60]!r}"
        ) from None
    if not isinstance(document, dict):
        raise MalformedInputError(f"{where}: expected a JSON object, got {raw[:60]!r}")
    listed: dict[str, frozenset[str]] = {}
    for key in ("initContainers", "containers"):
        value = document.get(key)
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(n, str) for n in value)
        ):
            raise MalformedInputError(
                f"{where}.{key}: expected a list of container names or null, got {value!r}"
            )
        listed[key] = frozenset(value or ())
    return IstioStatus(init_containers=listed["initContainers"], containers=listed["containers"])


def _classify(
    raw: Mapping[str, Sequence[Mapping[str, Any]]],
    status: IstioStatus,
    init_settings: InitContainerSettings | None,
) -> dict[str, list[Role]]:
    """The role of every container, by field and index (see the module docstring)."""
    init = raw["initContainers"]
    roles: dict[str, list[Role]] = {
        "initContainers": [],
        "containers": [
            Role.PROXY
            if c.get("name") == PROXY_CONTAINER and PROXY_CONTAINER in status.containers
            else Role.CONTAINER
            for c in raw["containers"]
        ],
        "ephemeralContainers": [Role.EPHEMERAL] * len(raw["ephemeralContainers"]),
    }
    anchor = -1
    for index, item in enumerate(init):
        name = item.get("name")
        restartable = _restartable(item)
        listed = name in status.init_containers
        if name in ISTIO_INIT_STEPS and listed and not restartable:
            role = Role.MESH_INIT
            anchor = index if anchor < 0 else anchor
        elif name == PROXY_CONTAINER and listed and restartable:
            role = Role.PROXY
        else:
            role = Role.SIDECAR if restartable else Role.INIT
        roles["initContainers"].append(role)
    own = anchor + 1
    if own < len(init) and (
        _is_meshguard_init(init[own], init_settings)
        or is_validation_container(init[own], init_settings)  # Istio CNI mode
    ):
        roles["initContainers"][own] = Role.MESH_INIT
    return roles


def _restartable(item: Mapping[str, Any]) -> bool:
    return item.get("restartPolicy") == "Always"


def is_meshguard_init(item: Mapping[str, Any], settings: InitContainerSettings | None) -> bool:
    """Whether ``item`` is the meshguard-init meshguard generates (for ``settings``)."""
    return _is_meshguard_init(item, settings)


def _is_meshguard_init(item: Mapping[str, Any], settings: InitContainerSettings | None) -> bool:
    if item.get("name") != MESHGUARD_INIT:
        return False
    if settings is not None:
        return dict(item) == init_container(settings)
    expected = init_container(InitContainerSettings())
    return {k: v for k, v in item.items() if k not in _SETTINGS_FIELDS} == {
        k: v for k, v in expected.items() if k not in _SETTINGS_FIELDS
    }


def _items(spec: Mapping[str, Any], field: str) -> list[Mapping[str, Any]]:
    items = spec.get(field) or []
    if not isinstance(items, list):
        raise MalformedInputError(f"spec.{field}: expected a list, got {type(items).__name__}")
    return [_mapping(item, f"spec.{field}[{index}]") for index, item in enumerate(items)]


def _read_container(
    item: Mapping[str, Any], field: str, index: int, role: Role, pod_context: Mapping[str, Any]
) -> Container:
    where = f"spec.{field}[{index}]"
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedInputError(f"{where}.name: expected a container name, got {name!r}")
    context = _mapping(item.get("securityContext") or {}, f"{where}.securityContext")
    return Container(
        name=name,
        role=role,
        uid=_id(context, pod_context, "runAsUser", where),
        gid=_id(context, pod_context, "runAsGroup", where),
        ports=_ports(item.get("ports") or [], where),
        field=field,
        index=index,
    )


def effective_ids(
    context: Mapping[str, Any], pod_context: Mapping[str, Any], *, where: str
) -> tuple[int | None, int | None]:
    """The (uid, gid) a container with this ``securityContext`` runs as in this pod."""
    return (
        _id(context, pod_context, "runAsUser", where),
        _id(context, pod_context, "runAsGroup", where),
    )


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
