"""The CNI protocol as meshguard's plugin speaks it (CNI spec 1.x, chained plugin).

The runtime passes the command and the container in ``CNI_*`` environment variables and the
network configuration (with ``prevResult``, the result of the plugins before us) on stdin;
the plugin answers on stdout: the unchanged ``prevResult`` on ADD, nothing on DEL and CHECK,
the supported versions on VERSION, or an error object (``code``, ``msg``, ``details``) with
a non-zero exit status — the runtime then fails the pod sandbox and ``msg`` shows in the
pod's events.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SPEC_VERSION: Final = "1.1.0"
#: Versions with chaining (prevResult): 0.3.0 on; CHECK exists from 0.4.0.
SUPPORTED_VERSIONS: Final = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PLUGIN_TYPE: Final = "meshguard-cni"


class Code(enum.IntEnum):
    """Well-known CNI error codes; 100 and up are meshguard's own."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    RULESET_UNAVAILABLE = 100  # the pod's admitted ruleset cannot be read
    INSTALL_FAILED = 101  # installing or verifying the rules failed (rolled back)
    RULES_DRIFTED = 102  # CHECK: the rules in the namespace are not the admitted ones
    NOT_ATTESTED = 103  # the pod's annotations are not signed by meshguard's webhook for it


class CniError(Exception):
    """A failure to report to the runtime as the spec's error object."""

    def __init__(self, code: Code, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def document(self, cni_version: str) -> dict[str, Any]:
        return {"cniVersion": cni_version, "code": int(self.code), "msg": self.msg,
                "details": self.details}  # fmt: skip


class Command(enum.StrEnum):
    ADD = "ADD"
    DEL = "DEL"
    CHECK = "CHECK"
    VERSION = "VERSION"


class KubernetesConfig(BaseModel):
    """Where the plugin reads pods: a ``kubeconfig`` (server, token and CA, as the node agent
    writes it), else ``server``/``tokenFile``/``caFile``; absent fields fall back to the
    in-cluster defaults (``$KUBERNETES_SERVICE_HOST``/``_PORT`` and the service-account
    files)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    server: str | None = None
    kubeconfig: str | None = None  # the file meshguard cni install writes on the node
    token_file: str | None = Field(default=None, alias="tokenFile")
    ca_file: str | None = Field(default=None, alias="caFile")
    timeout_seconds: float = Field(default=5.0, alias="timeoutSeconds", gt=0, le=60)
    exclude_namespaces: tuple[str, ...] = Field(default=(), alias="excludeNamespaces")


class NetConf(BaseModel):
    """meshguard's entry of the conflist, as the runtime hands it over (extra keys allowed:
    runtimes add ``runtimeConfig``, ``args``, ...)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    cni_version: str = Field(alias="cniVersion")
    name: str
    type: str
    prev_result: dict[str, Any] | None = Field(default=None, alias="prevResult")
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    lock_timeout_seconds: float = Field(default=30.0, alias="lockTimeoutSeconds", ge=0, le=300)
    #: The public keys (PEM) meshguard's webhook signs with (``meshguard cni install
    #: --trusted-keys``): a pod's ruleset is installed only if its attestation verifies.
    trusted_keys: str | None = Field(default=None, alias="trustedKeys")


@dataclass(frozen=True, kw_only=True)
class Invocation:
    """One call of the plugin: the command, the container and its namespace, the pod."""

    command: Command
    container_id: str
    netns: str
    ifname: str
    args: Mapping[str, str]

    @property
    def pod(self) -> tuple[str, str] | None:
        """(namespace, name) from ``K8S_POD_NAMESPACE``/``K8S_POD_NAME``, if a Kubernetes pod."""
        namespace, name = self.args.get("K8S_POD_NAMESPACE"), self.args.get("K8S_POD_NAME")
        return (namespace, name) if namespace and name else None

    @property
    def pod_uid(self) -> str | None:
        return self.args.get("K8S_POD_UID") or None


def read_command(environ: Mapping[str, str]) -> Command:
    raw = environ.get("CNI_COMMAND", "")
    try:
        return Command(raw)
    except ValueError:
        raise CniError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_COMMAND is {raw!r}, expected ADD, DEL, CHECK or VERSION",
        ) from None


def read_invocation(command: Command, environ: Mapping[str, str]) -> Invocation:
    """The ``CNI_*`` variables of an ADD, DEL or CHECK (CNI_NETNS may be empty on DEL)."""
    required = ["CNI_CONTAINERID", "CNI_IFNAME"]
    if command is not Command.DEL:
        required.append("CNI_NETNS")
    missing = [key for key in required if not environ.get(key)]
    if missing:
        raise CniError(Code.INVALID_ENVIRONMENT, f"{command.value}: {', '.join(missing)} not set")
    return Invocation(
        command=command,
        container_id=environ["CNI_CONTAINERID"],
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ["CNI_IFNAME"],
        args=parse_args(environ.get("CNI_ARGS", "")),
    )


def parse_args(text: str) -> dict[str, str]:
    """``CNI_ARGS``: ``KEY=VALUE`` pairs separated by ``;``."""
    pairs: dict[str, str] = {}
    for item in filter(None, text.split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CniError(
                Code.INVALID_ENVIRONMENT, f"CNI_ARGS: {item!r} is not KEY=VALUE", details=text
            )
        pairs[key] = value
    return pairs


def read_netconf(stdin: str) -> NetConf:
    try:
        document = json.loads(stdin)
    except ValueError as exc:
        raise CniError(Code.DECODE_FAILURE, f"network configuration is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise CniError(Code.DECODE_FAILURE, "network configuration is not a JSON object")
    try:
        conf = NetConf.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise CniError(Code.INVALID_CONFIG, f"meshguard-cni configuration: {problems}") from None
    if conf.cni_version not in SUPPORTED_VERSIONS:
        raise CniError(
            Code.INCOMPATIBLE_VERSION,
            f"cniVersion {conf.cni_version} is not supported",
            details=f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    return conf


def version_document(cni_version: str = SPEC_VERSION) -> dict[str, Any]:
    return {"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}
