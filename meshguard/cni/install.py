"""meshguard's entry in the node's CNI configuration: pure logic, no I/O.

The node agent (:mod:`meshguard.cni.node`) places ``meshguard-cni`` in the node's primary CNI
configuration right after ``istio-cni``, as Istio's install-cni places ``istio-cni`` after the
cluster's network plugin:

- the primary configuration is the first ``.conf``/``.conflist``/``.json`` file in name order
  (the one the runtime uses);
- a single-plugin ``.conf`` becomes a ``.conflist`` (``{"cniVersion", "name", "plugins":
  [conf]}``, as libcni reads one), so plugins can be chained after it;
- every other entry is kept as it is, in its order; meshguard's own entries are taken out and
  one is put back right after the last ``istio-cni`` entry — so chaining is idempotent,
  repairs a removed or moved entry (Istio's install-cni re-appends its own entry when it
  restarts) and updates a changed one;
- without an ``istio-cni`` entry nothing is chained (:class:`IstioCniMissing`): meshguard's
  rules go on top of Istio's capture, so the agent waits for istio-cni.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any, Final

from meshguard.cni.protocol import PLUGIN_TYPE
from meshguard.errors import MalformedInputError, MeshguardFailure

CONF_SUFFIXES: Final = (".conf", ".conflist", ".json")
ISTIO_CNI_TYPE: Final = "istio-cni"
#: Not a CNI configuration file name (runtimes read only CONF_SUFFIXES), sorted last like
#: Istio's ``ZZZ-istio-cni-kubeconfig``.
KUBECONFIG_NAME: Final = "ZZZ-meshguard-cni-kubeconfig"


class IstioCniMissing(MeshguardFailure):
    """The node's CNI configuration has no istio-cni entry (yet) to chain after."""


def primary_config(names: Iterable[str]) -> str | None:
    """The configuration file the runtime uses: the first by name with a CNI suffix."""
    candidates = sorted(n for n in names if PurePath(n).suffix in CONF_SUFFIXES)
    return candidates[0] if candidates else None


def parse_config(text: str, *, filename: str) -> dict[str, Any]:
    """A CNI configuration file's JSON object, or a :class:`MalformedInputError` naming it."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise MalformedInputError(f"CNI configuration {filename} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedInputError(f"CNI configuration {filename} is not a JSON object")
    return document


def as_conflist(document: Mapping[str, Any], *, filename: str) -> tuple[str, dict[str, Any]]:
    """(file name, conflist): a ``.conflist`` as is, a single-plugin ``.conf`` converted."""
    if "plugins" in document:
        plugins = document["plugins"]
        if not isinstance(plugins, list) or not all(isinstance(p, dict) for p in plugins):
            raise MalformedInputError(
                f"CNI configuration {filename}: plugins is not a list of objects"
            )
        return filename, copy.deepcopy(dict(document))
    if not isinstance(document.get("type"), str):
        raise MalformedInputError(
            f"CNI configuration {filename}: neither a conflist (plugins) nor a plugin (type)"
        )
    conflist = {
        "cniVersion": document.get("cniVersion", "0.3.1"),
        "name": document.get("name", PurePath(filename).stem),
        "plugins": [copy.deepcopy(dict(document))],
    }
    return str(PurePath(filename).with_suffix(".conflist")), conflist


def chain(conflist: Mapping[str, Any], *, entry: Mapping[str, Any], after: str) -> dict[str, Any]:
    """The conflist with exactly one meshguard ``entry``, right after the last ``after``."""
    plugins = [p for p in _plugins(conflist) if p.get("type") != PLUGIN_TYPE]
    anchors = [i for i, p in enumerate(plugins) if p.get("type") == after]
    if not anchors:
        present = ", ".join(str(p.get("type")) for p in plugins) or "none"
        raise IstioCniMissing(
            f"no {after} entry in the CNI configuration {conflist.get('name')!r} (plugins:"
            f" {present}): waiting for {after} to chain meshguard-cni after it"
        )
    position = anchors[-1] + 1
    chained = [*plugins[:position], copy.deepcopy(dict(entry)), *plugins[position:]]
    return {**copy.deepcopy(dict(conflist)), "plugins": chained}


def unchain(conflist: Mapping[str, Any]) -> dict[str, Any]:
    """The conflist without meshguard's entries (everything else kept, in order)."""
    plugins = [p for p in _plugins(conflist) if p.get("type") != PLUGIN_TYPE]
    return {**copy.deepcopy(dict(conflist)), "plugins": plugins}


def is_chained(conflist: Mapping[str, Any]) -> bool:
    return any(p.get("type") == PLUGIN_TYPE for p in _plugins(conflist))


def plugin_entry(
    *,
    kubeconfig: str,
    exclude_namespaces: Sequence[str] = (),
    timeout_seconds: float = 5.0,
    lock_timeout_seconds: float = 30.0,
    trusted_keys: str | None = None,
) -> dict[str, Any]:
    """meshguard's conflist entry; ``kubeconfig`` is the path the node sees;
    ``trusted_keys``: the webhook's public keys (PEM), inline (they are public)."""
    entry: dict[str, Any] = {
        "type": PLUGIN_TYPE,
        "kubernetes": {
            "kubeconfig": kubeconfig,
            "timeoutSeconds": timeout_seconds,
            "excludeNamespaces": list(exclude_namespaces),
        },
        "lockTimeoutSeconds": lock_timeout_seconds,
    }
    if trusted_keys is not None:
        entry["trustedKeys"] = trusted_keys
    return entry


def kubeconfig(*, server: str, token: str, ca_pem: str) -> dict[str, Any]:
    """A kubeconfig for the plugin: the agent's API server, service-account token and CA."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem.encode()).decode(),
                },
            }
        ],
        "users": [{"name": "meshguard-cni", "user": {"token": token}}],
        "contexts": [
            {"name": "meshguard-cni", "context": {"cluster": "local", "user": "meshguard-cni"}}
        ],
        "current-context": "meshguard-cni",
    }


def render(document: Mapping[str, Any]) -> bytes:
    """The file's bytes (stable: equal documents give equal bytes, so rewrites are skipped)."""
    return (json.dumps(document, indent=2) + "\n").encode()


def _plugins(conflist: Mapping[str, Any]) -> list[dict[str, Any]]:
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list) or not all(isinstance(p, dict) for p in plugins):
        raise MalformedInputError(
            f"CNI configuration {conflist.get('name')!r}: plugins is not a list of objects"
        )
    return plugins
