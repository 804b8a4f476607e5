"""The real Envoy's /config_dump of a sidecar carrying meshguard's loopback listener.

A sidecar receives the EnvoyFilter's listeners and cluster from istiod over xDS, so in its
config dump they are *dynamic* (``dynamic_listeners``, ``dynamic_active_clusters``), which is
all ``istioctl x authz check`` reads. The same here without istiod: the EnvoyFilter's patch
values are served to the real Envoy by file-based LDS and CDS, the pod's RBAC document by the
listener's own ECDS file, and the authz Service's cluster (ext_authz engine) is the one
Istio would name. Needs root (the listeners bind 127.0.0.1:15007 and [::1]:15007 inside a
network namespace of their own).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshguard.authz.envoy_config import authz_cluster
from meshguard.authz.istio_config import IstioSettings, envoy_filter
from meshguard.l7 import L7Engine
from meshguard.policy import Mode, parse_policy
from meshguard.rbac import compile_rbac, rbac_document_text
from meshguard.sandbox.envoy import envoy_command
from meshguard.sandbox.netns import NetworkNamespace

ADMIN_PORT = 15000
#: The example pod's policy and its containers' SNAT sources, as the webhook admits them.
POLICY = """
rules:
  - from: cache
    to: app
    ports: [8080]
    http: {methods: [GET, HEAD], paths: ["/api/*", "/health"]}
  - from: log-shipper
    to: app
    ports: [9090]
"""
SOURCES = {
    "app": ["127.0.100.1", "fd6d:6775::1"],
    "cache": ["127.0.100.2", "fd6d:6775::2"],
    "log-shipper": ["127.0.100.3", "fd6d:6775::3"],
}
#: The authz Service's location: the chart's defaults, so the rendered views show the
#: EnvoyFilters in istio-system as the chart installs them.
LOCATION = IstioSettings()


def sidecar_files(workdir: Path, *, engine: L7Engine) -> Path:
    """Write the bootstrap, the LDS and CDS files and the pod's RBAC file; the bootstrap's
    path."""
    rbac = workdir / "rbac.json"
    rbac.write_text(
        rbac_document_text(
            compile_rbac(policy=parse_policy(POLICY), mode=Mode.ENFORCE, sources=SOURCES)
        )
    )
    document = envoy_filter(LOCATION, engine=engine)
    values: dict[str, list[dict[str, Any]]] = {"LISTENER": [], "CLUSTER": []}
    for patch in document["spec"]["configPatches"]:
        values[patch["applyTo"]].append(patch["patch"]["value"])
    listeners = [_with_rbac_path(listener, rbac) for listener in values["LISTENER"]]
    clusters = values["CLUSTER"]
    if engine is L7Engine.EXT_AUTHZ:  # istiod's cluster for the authz Service
        istio_cluster = authz_cluster(host="127.0.0.1", port=LOCATION.port)
        istio_cluster["name"] = istio_cluster["load_assignment"]["cluster_name"] = LOCATION.cluster
        clusters = [*clusters, istio_cluster]
    lds, cds = workdir / "lds.json", workdir / "cds.json"
    lds.write_text(json.dumps(_discovery("envoy.config.listener.v3.Listener", listeners)))
    cds.write_text(json.dumps(_discovery("envoy.config.cluster.v3.Cluster", clusters)))
    bootstrap = {
        "node": {
            "id": "sidecar~10.1.0.7~shop-5d9c7b7f4-x2x7q.demo~demo.svc.cluster.local",
            "cluster": "shop.demo",
        },
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}
        },
        # Istio's bootstrap raises the RE2 program size the same way.
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": {"re2.max_program_size.error_level": 32768}}
            ]
        },
        "dynamic_resources": {
            "lds_config": {"path_config_source": {"path": str(lds)}, "resource_api_version": "V3"},
            "cds_config": {"path_config_source": {"path": str(cds)}, "resource_api_version": "V3"},
        },
    }
    path = workdir / "bootstrap.json"
    path.write_text(json.dumps(bootstrap))
    return path


def _with_rbac_path(listener: dict[str, Any], rbac: Path) -> dict[str, Any]:
    """The listener reading the pod's RBAC from ``rbac`` instead of the pod's mount."""
    text = json.dumps(listener).replace('"/etc/meshguard/l7/rbac.json"', json.dumps(str(rbac)))
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _discovery(kind: str, resources: list[dict[str, Any]]) -> dict[str, Any]:
    url = f"type.googleapis.com/{kind}"
    return {
        "version_info": "1",
        "type_url": url,
        "resources": [{"@type": url, **resource} for resource in resources],
    }


def config_dump(workdir: Path, *, engine: L7Engine = L7Engine.NATIVE) -> dict[str, Any]:
    """Start the real Envoy as the sidecar, once its listeners are active take
    ``/config_dump?include_eds`` (as ``istioctl proxy-config`` does), stop it."""
    bootstrap = sidecar_files(workdir, engine=engine)
    log = workdir / "envoy.log"
    with NetworkNamespace() as ns, log.open("w") as stderr:
        envoy = ns.spawn(envoy_command(bootstrap, uid=0, gid=0), stderr=stderr)
        try:
            dump = _active_dump(ns, log)
        finally:
            ns.stop(envoy)
    return dump


def _active_dump(ns: NetworkNamespace, log: Path) -> dict[str, Any]:
    script = (
        "import sys, urllib.request\n"
        f"url = 'http://127.0.0.1:{ADMIN_PORT}/config_dump?include_eds'\n"
        "try:\n"
        "    sys.stdout.write(urllib.request.urlopen(url, timeout=5).read().decode())\n"
        "except OSError:\n"
        "    pass\n"
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = ns.run([sys.executable, "-c", script])
        if text:
            dump: dict[str, Any] = json.loads(text)
            if _listeners_active(dump) == 2 and _ecds_loaded(dump):
                return dump
        time.sleep(0.2)
    raise subprocess.SubprocessError(f"the sidecar's Envoy did not come up: {log.read_text()}")


def _section(dump: dict[str, Any], kind: str) -> dict[str, Any]:
    for config in dump["configs"]:
        if config["@type"] == f"type.googleapis.com/envoy.admin.v3.{kind}":
            section: dict[str, Any] = config
            return section
    return {}


def _listeners_active(dump: dict[str, Any]) -> int:
    listeners = _section(dump, "ListenersConfigDump").get("dynamic_listeners", [])
    return sum(1 for listener in listeners if "active_state" in listener)


def _ecds_loaded(dump: dict[str, Any]) -> bool:
    """The native engine's listeners are active only with their RBAC loaded; the ext_authz
    engine has none to wait for."""
    listeners = json.dumps(_section(dump, "ListenersConfigDump"))
    return "config_discovery" not in listeners or bool(
        _section(dump, "EcdsConfigDump").get("ecds_filters")
    )
