"""The node agent's file work: meshguard-cni's executable, kubeconfig and conflist entry.

``meshguard cni install`` (in the chart's DaemonSet, with the node's CNI directories mounted)
runs :func:`run_agent`: install once, then every ``interval`` seconds check and repair —
the executable and the kubeconfig rewritten when they differ (the service-account token
rotates), meshguard's entry chained again when something removed or moved it — and on
stop remove the entry, then the files. Every write is atomic (a temporary file in the same
directory, fsync, rename): the runtime reads either the old or the new file, never half of
one; the executable and the kubeconfig are in place before the entry that uses them, and
the entry is gone before they are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Final

from meshguard import kube_api
from meshguard.attestation import TrustedKeys
from meshguard.cni import install
from meshguard.cni.protocol import PLUGIN_TYPE
from meshguard.errors import MeshguardError, MeshguardFailure
from meshguard.kube_api import SERVICE_ACCOUNT_DIR

log = logging.getLogger(__name__)

HOST_CONF_DIR: Final = PurePath("/etc/cni/net.d")


@dataclass(frozen=True, kw_only=True)
class NodeLayout:
    """Where the agent writes (the host's directories as mounted in its pod) and how the node
    sees the configuration directory (the paths inside meshguard's entry)."""

    conf_dir: Path
    bin_dir: Path
    host_conf_dir: PurePath = HOST_CONF_DIR

    @property
    def plugin(self) -> Path:
        return self.bin_dir / PLUGIN_TYPE

    @property
    def kubeconfig(self) -> Path:
        return self.conf_dir / install.KUBECONFIG_NAME


@dataclass(frozen=True, kw_only=True)
class InstallSettings:
    plugin_source: Path  # the executable to place in the node's CNI bin dir
    chain_after: str = install.ISTIO_CNI_TYPE
    exclude_namespaces: Sequence[str] = ()
    timeout_seconds: float = 5.0
    #: The webhook's public keys (a PEM file or a mounted ConfigMap's directory), read again
    #: on every pass: a rotated key reaches the plugin's entry on the next repair.
    trusted_keys: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ApiCredentials:
    server: str
    token: str
    ca_pem: str


def api_credentials(
    environ: Mapping[str, str], *, account_dir: Path = SERVICE_ACCOUNT_DIR
) -> ApiCredentials:
    """The agent pod's own API access (in-cluster): what the plugin on the node will use."""
    server = kube_api.in_cluster_server(environ)
    if server is None:
        raise MeshguardFailure(
            "KUBERNETES_SERVICE_HOST/PORT not set: meshguard cni install runs in a pod"
        )
    token = kube_api.read_token(account_dir / "token")
    try:
        ca_pem = (account_dir / "ca.crt").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshguardFailure(f"cannot read the service account in {account_dir}: {exc}") from None
    return ApiCredentials(server=server, token=token, ca_pem=ca_pem)


def install_once(
    layout: NodeLayout, settings: InstallSettings, credentials: ApiCredentials
) -> list[str]:
    """Bring the node to the installed state; what was changed (empty: nothing to do).

    :class:`~meshguard.cni.install.IstioCniMissing` when there is nothing to chain after
    (the executable and kubeconfig are in place by then; the entry is not)."""
    changed: list[str] = []
    try:
        binary = settings.plugin_source.read_bytes()
    except OSError as exc:
        raise MeshguardFailure(f"cannot read the plugin {settings.plugin_source}: {exc}") from None
    if write_atomic(layout.plugin, binary, mode=0o755):
        changed.append(str(layout.plugin))
    config = install.kubeconfig(
        server=credentials.server, token=credentials.token, ca_pem=credentials.ca_pem
    )
    if write_atomic(layout.kubeconfig, install.render(config), mode=0o600):
        changed.append(str(layout.kubeconfig))
    changed += _chain_primary(layout, settings)
    return changed


def uninstall(layout: NodeLayout) -> list[str]:
    """meshguard's entry out of every configuration file, then its files off the node."""
    changed: list[str] = []
    for path in _config_files(layout.conf_dir):
        document = _read_config(path)
        if "plugins" in document and install.is_chained(document):
            write_atomic(path, install.render(install.unchain(document)), mode=_mode(path))
            changed.append(str(path))
    for path in (layout.plugin, layout.kubeconfig):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            changed.append(str(path))
    return changed


def run_agent(
    layout: NodeLayout,
    settings: InstallSettings,
    *,
    credentials: Callable[[], ApiCredentials],
    stop: threading.Event,
    interval: float = 2.0,
    ready_file: Path | None = None,
    uninstall_on_stop: bool = True,
    while_chained: Callable[[], object] | None = None,
) -> None:
    """Install, keep it installed until ``stop`` is set, then uninstall (unless told not to).

    ``ready_file`` exists exactly while meshguard's entry is chained (the DaemonSet's
    readiness probe); failures are logged and retried, never fatal: the agent keeps the
    node repaired as soon as it can be. ``while_chained`` (the pod repair) runs after each
    pass that found or left the entry chained, never while it is missing."""
    last_problem = ""
    while not stop.is_set():
        try:
            changed = install_once(layout, settings, credentials())
        except MeshguardError as exc:
            if str(exc) != last_problem:
                log.warning(
                    "meshguard-cni not chained: %s",
                    exc,
                    extra={"fields": {"event": "cni-not-installed", "reason": str(exc)}},
                )
                last_problem = str(exc)
            _set_ready(ready_file, ready=False)
        else:
            if changed:
                log.info(
                    "meshguard-cni installed",
                    extra={"fields": {"event": "cni-installed", "changed": ",".join(changed)}},
                )
            last_problem = ""
            _set_ready(ready_file, ready=True)
            if while_chained is not None and not stop.is_set():
                while_chained()
        stop.wait(interval)
    _set_ready(ready_file, ready=False)
    if uninstall_on_stop:
        removed = uninstall(layout)
        log.info(
            "meshguard-cni uninstalled",
            extra={"fields": {"event": "cni-uninstalled", "changed": ",".join(removed)}},
        )


def write_atomic(path: Path, data: bytes, *, mode: int) -> bool:
    """Replace ``path`` with ``data`` atomically; False when it already holds exactly that."""
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o7777) == mode:
            return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MeshguardFailure(f"cannot read {path}: {exc}") from None
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise MeshguardFailure(f"cannot write in {path.parent}: {exc}") from None
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise MeshguardFailure(f"cannot write {path}: {exc}") from None
    _sync_directory(path.parent)
    return True


def _chain_primary(layout: NodeLayout, settings: InstallSettings) -> list[str]:
    names = [p.name for p in _config_files(layout.conf_dir)]
    primary = install.primary_config(names)
    if primary is None:
        raise install.IstioCniMissing(
            f"no CNI configuration in {layout.conf_dir} yet: waiting for the network plugin"
            f" and {settings.chain_after}"
        )
    source = layout.conf_dir / primary
    name, conflist = install.as_conflist(_read_config(source), filename=primary)
    entry = install.plugin_entry(
        kubeconfig=str(layout.host_conf_dir / install.KUBECONFIG_NAME),
        exclude_namespaces=settings.exclude_namespaces,
        timeout_seconds=settings.timeout_seconds,
        trusted_keys=(
            TrustedKeys.load(settings.trusted_keys).pem() if settings.trusted_keys else None
        ),
    )
    chained = install.chain(conflist, entry=entry, after=settings.chain_after)
    target = layout.conf_dir / name
    changed = []
    if write_atomic(target, install.render(chained), mode=_mode(source)):
        changed.append(str(target))
    if target != source:
        source.unlink(missing_ok=True)
        changed.append(f"{source} (converted to {target.name})")
    return changed


def _config_files(directory: Path) -> list[Path]:
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise MeshguardFailure(f"cannot list the CNI conf dir {directory}: {exc}") from None
    return [p for p in entries if p.suffix in install.CONF_SUFFIXES and p.is_file()]


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshguardFailure(f"cannot read the CNI configuration {path}: {exc}") from None
    return install.parse_config(text, filename=str(path))


def _mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o644


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_ready(ready_file: Path | None, *, ready: bool) -> None:
    if ready_file is None:
        return
    if ready:
        ready_file.touch()
    else:
        ready_file.unlink(missing_ok=True)
