"""``meshguard cni ...``: Istio CNI mode; ``install``/``uninstall`` run in the node agent
(the chart's DaemonSet), ``validate`` in the pod."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import threading
from pathlib import PurePath

from meshguard.attestation import TrustedKeys
from meshguard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from meshguard.cni.agent import AgentSettings, serving
from meshguard.cni.node import (
    InstallSettings,
    NodeLayout,
    api_credentials,
    install_once,
    run_agent,
    uninstall,
)
from meshguard.cni.repair import RepairMode
from meshguard.cni.repairer import Repairer, RepairSettings
from meshguard.cni.validate import validate
from meshguard.errors import MeshguardError


def run_validate(args: argparse.Namespace) -> int:
    try:
        problems = validate(mode=args.mode)
    except MeshguardError as exc:
        return fail(f"meshguard-validation: {exc}", EXIT_FAILED)
    if problems:
        return fail(f"meshguard-validation: {'; '.join(problems)}", EXIT_FAILED)
    return EXIT_OK


def run_install(args: argparse.Namespace) -> int:
    """The node agent: install, repair until SIGTERM, uninstall (or ``--once``)."""
    layout = _layout(args)
    if args.trusted_keys is None:
        return fail(
            "meshguard cni install: give --trusted-keys (the webhook's public keys): the plugin"
            " installs only rulesets the webhook signed",
            EXIT_USAGE,
        )
    try:
        TrustedKeys.load(args.trusted_keys)  # unreadable or empty: say so now, not per pod
    except MeshguardError as exc:
        return fail(f"meshguard cni install: {exc}", EXIT_USAGE)
    settings = InstallSettings(
        plugin_source=args.plugin_binary,
        chain_after=args.chain_after,
        exclude_namespaces=tuple(args.exclude),
        timeout_seconds=args.timeout,
        trusted_keys=args.trusted_keys,
    )
    credentials = functools.partial(
        api_credentials, os.environ, account_dir=args.service_account_dir
    )
    if args.once:
        install_once(layout, settings, credentials())
        return EXIT_OK
    repairer = None
    if args.repair_pods:
        repair_settings = RepairSettings(
            node_name=args.node_name or os.environ.get("NODE_NAME", ""),
            interval=args.repair_interval,
            per_minute=args.repair_per_minute,
            mode=RepairMode(args.repair_mode),
        )
        repairer = Repairer(repair_settings, credentials=credentials)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with contextlib.ExitStack() as stack:
        if args.agent_socket is not None:
            stack.enter_context(serving(AgentSettings(
                socket_path=args.agent_socket, conf_dir=layout.conf_dir,
                host_conf_dir=layout.host_conf_dir, call_timeout=args.agent_call_timeout,
                max_calls=args.agent_max_calls, watch_denials=args.agent_denials,
                metrics_port=args.agent_metrics_port)))  # fmt: skip
        run_agent(layout, settings, credentials=credentials, stop=stop, interval=args.interval,
                  ready_file=args.ready_file, uninstall_on_stop=not args.keep_on_exit,
                  while_chained=repairer.run_due if repairer else None)  # fmt: skip
    return EXIT_OK


def run_denials(args: argparse.Namespace) -> int:
    """``cni denials``: the node's pods' denials, without CNI mode (docs/cni.md)."""
    from meshguard.cni.events import EventRecorder  # noqa: PLC0415 - this command's only
    from meshguard.cni.kube import KeptAlive  # noqa: PLC0415
    from meshguard.cni.node_watch import NodePods  # noqa: PLC0415
    from meshguard.cni.watch import DenialWatch, serving_metrics  # noqa: PLC0415
    from meshguard.kube_api import ApiAccess  # noqa: PLC0415

    node = args.node_name or os.environ.get("NODE_NAME", "")
    if not node or args.trusted_keys is None:
        return fail("cni denials needs --node-name (or $NODE_NAME) and --trusted-keys", EXIT_USAGE)
    trusted = TrustedKeys.load(args.trusted_keys)

    def access() -> ApiAccess:
        credentials = api_credentials(os.environ, account_dir=args.service_account_dir)
        return ApiAccess(server=credentials.server, token=credentials.token,
                         ca_pem=credentials.ca_pem, timeout=10.0)  # fmt: skip

    events = EventRecorder(access=access) if args.events else None
    watch = DenialWatch(connections=KeptAlive(), on_denial=events.record if events else None)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with serving_metrics(watch.counters, port=args.metrics_port, watch=watch):
            pods = NodePods(watch=watch, trusted=trusted, proc=args.proc)
            pods.run(node=node, access=access, stop=stop, interval=args.interval)
    finally:
        watch.close()
        if events is not None:
            events.close()
    return EXIT_OK


def run_uninstall(args: argparse.Namespace) -> int:
    uninstall(_layout(args))
    return EXIT_OK


def _layout(args: argparse.Namespace) -> NodeLayout:
    return NodeLayout(
        conf_dir=args.cni_conf_dir,
        bin_dir=args.cni_bin_dir,
        host_conf_dir=PurePath(getattr(args, "host_cni_conf_dir", "/etc/cni/net.d")),
    )
