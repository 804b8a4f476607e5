"""``meshguard serve-webhook`` and ``serve-authz``: the long-running servers."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable

from meshguard.authz.feed import FedStore, Feed
from meshguard.authz.identity import TlsFiles
from meshguard.authz.kube import HttpPodSource, api_access
from meshguard.authz.server import AuthzSettings, serve_authz
from meshguard.authz.store import KubernetesStore, PolicyStore, StaticStore
from meshguard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from meshguard.cli.inject import injection_settings
from meshguard.errors import MeshguardError
from meshguard.webhook.server import WebhookSettings, run_webhook

PR_SET_PDEATHSIG = 1
#: How long serve-authz waits for the workload certificate files (Istio's agent writes them).
TLS_WAIT_SECONDS = 120.0


def webhook(args: argparse.Namespace) -> int:
    settings = WebhookSettings(
        cert_file=args.cert,
        key_file=args.key,
        host=args.host,
        port=args.port,
        reload_interval=args.reload_interval,
        inject=injection_settings(args, request_template=not args.no_template),
    )
    try:
        asyncio.run(_until_signal(lambda stop: run_webhook(settings, stop=stop)))
    except (OSError, ssl.SSLError) as exc:
        return fail(f"meshguard serve-webhook: {exc}", EXIT_FAILED)
    return EXIT_OK


def authz(args: argparse.Namespace) -> int:
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(given) and not all(given):
        return fail(
            "meshguard serve-authz: give --tls-cert, --tls-key and --tls-ca together", EXIT_USAGE
        )
    if args.list_page_size < 1:
        return fail(
            f"meshguard serve-authz: --list-page-size {args.list_page_size}: expected at least 1",
            EXIT_USAGE,
        )
    if args.kubernetes and not any(given) and not args.insecure_plaintext:
        return fail(
            "meshguard serve-authz: --kubernetes serves the Check channel over mutual TLS:"
            " give --tls-cert, --tls-key and --tls-ca (Istio's workload certificate files),"
            " or --insecure-plaintext to serve without callers' identities",
            EXIT_USAGE,
        )
    tls = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca) if all(given) else None
    settings = AuthzSettings(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port or None,
        tls=tls,
        trust_domain=args.trust_domain,
    )
    pipes = [os.pipe() for _ in range(1, args.workers)] if args.kubernetes else []
    workers = [
        _start_worker(args, index, feed_fd=pipes[index - 1][0] if pipes else None)
        for index in range(1, args.workers)
    ]
    for read_end, _ in pipes:
        os.close(read_end)
    sources = _Sources()
    try:
        if tls is not None:
            tls.wait(timeout=TLS_WAIT_SECONDS)
        store = sources.open(args, feed_fds=[write_end for _, write_end in pipes])
        asyncio.run(_until_signal(lambda stop: serve_authz(settings, store=store, stop=stop)))
    except MeshguardError as exc:
        return fail(f"meshguard serve-authz: {exc}", EXIT_USAGE)
    except OSError as exc:
        return fail(f"meshguard serve-authz: {exc}", EXIT_FAILED)
    finally:
        sources.close()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=10)
    return EXIT_OK


class _Sources:
    """Where serve-authz's policies come from, and what to stop at the end."""

    def __init__(self) -> None:
        self.watcher: KubernetesStore | None = None
        self.feed: Feed | None = None

    def open(self, args: argparse.Namespace, *, feed_fds: list[int]) -> PolicyStore:
        """--kubernetes: the watch (feeding the workers, if any); --policy-feed: a worker's
        store fed by its parent; --pods: the files."""
        if args.kubernetes:
            source = HttpPodSource(api_access(), page_size=args.list_page_size)
            self.watcher = KubernetesStore(source)
            if feed_fds:  # one watch for every worker: the children get its changes
                self.feed = Feed(feed_fds)
                self.watcher.subscribe(self.feed)
            self.watcher.start()
            return self.watcher
        if args.policy_feed is not None:
            fed = FedStore(args.policy_feed)
            fed.start()
            return fed
        return StaticStore.from_files(args.pods)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.feed is not None:
            self.feed.close()


def _start_worker(
    args: argparse.Namespace, index: int, *, feed_fd: int | None
) -> subprocess.Popen[bytes]:
    """Another server process on the same port (gRPC sets SO_REUSEPORT: the kernel spreads
    connections); worker ``index`` serves its metrics on ``--metrics-port + index``. With
    --kubernetes it watches nothing itself: the parent's watch feeds it (``feed_fd``)."""
    if feed_fd is not None:
        source = ["--policy-feed", str(feed_fd)]
    else:
        source = ["--pods", *map(str, args.pods)]
    metrics = args.metrics_port + index if args.metrics_port else 0
    argv = [
        sys.executable, "-m", "meshguard", "--log-level", args.log_level, "serve-authz", *source,
        "--host", args.host, "--port", str(args.port), "--metrics-port", str(metrics),
        "--workers", "1", "--trust-domain", args.trust_domain,
    ]  # fmt: skip
    if args.tls_cert:
        argv += ["--tls-cert", str(args.tls_cert), "--tls-key", str(args.tls_key)]
        argv += ["--tls-ca", str(args.tls_ca)]
    elif args.insecure_plaintext:
        argv.append("--insecure-plaintext")
    fds = (feed_fd,) if feed_fd is not None else ()
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        pass_fds=fds,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - before the threads start
    )


def _die_with_parent() -> None:
    """A worker must not outlive the process that started it, even if that one is killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _until_signal(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a server until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(stop)
