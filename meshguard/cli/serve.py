"""``meshguard serve-webhook`` and ``serve-authz``: the long-running servers."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable

from meshguard.attestation import TrustedKeys
from meshguard.authz.feed import FedStore, Feed, FrameEncoder
from meshguard.authz.identity import TlsFiles, injected_from_env
from meshguard.authz.kube import HttpPodSource, api_access
from meshguard.authz.server import AuthzSettings, serve_authz
from meshguard.authz.store import KubernetesStore, PolicyStore, StaticStore
from meshguard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from meshguard.cli.inject import injection_settings
from meshguard.cli.workers import Worker, WorkerPool
from meshguard.errors import MeshguardError
from meshguard.inject.transform import OptOut
from meshguard.webhook.namespaces import NamespaceExemptions
from meshguard.webhook.server import WebhookSettings, run_webhook

PR_SET_PDEATHSIG = 1


def webhook(args: argparse.Namespace) -> int:
    if args.signing_key is None:
        return fail(
            "meshguard serve-webhook: give --signing-key (the Ed25519 key the CNI plugin and"
            " the authz server verify the admitted pods with; `meshguard keys generate`)",
            EXIT_USAGE,
        )
    try:
        inject = injection_settings(args, request_template=not args.no_template)
        if args.opt_out == OptOut.REFUSE:
            exempt = NamespaceExemptions(api_access())
            inject = dataclasses.replace(inject, opt_out=OptOut.REFUSE, opt_out_exempt=exempt)
    except MeshguardError as exc:
        return fail(f"meshguard serve-webhook: {exc}", EXIT_USAGE)
    settings = WebhookSettings(
        cert_file=args.cert,
        key_file=args.key,
        host=args.host,
        port=args.port,
        reload_interval=args.reload_interval,
        inject=inject,
        admission_workers=args.admission_workers,
        max_pending_admissions=max(args.max_pending_admissions, args.admission_workers),
    )
    try:
        asyncio.run(_until_signal(lambda stop: run_webhook(settings, stop=stop)))
    except (OSError, ssl.SSLError) as exc:
        return fail(f"meshguard serve-webhook: {exc}", EXIT_FAILED)
    return EXIT_OK


def authz(args: argparse.Namespace) -> int:
    problem = _authz_usage_problem(args)
    if problem is not None:
        return fail(f"meshguard serve-authz: {problem}", EXIT_USAGE)
    if args.parent_pid is not None and not _die_with_parent(args.parent_pid):
        return fail("meshguard serve-authz: the parent process is gone", EXIT_FAILED)
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    tls = TlsFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca) if all(given) else None
    settings = AuthzSettings(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port or None,
        tls=tls,
        trust_domain=args.trust_domain,
    )
    sources = _Sources()
    pool = WorkerPool(count=args.workers, start=lambda index: sources.worker(args, index))
    try:
        if tls is not None:
            tls.wait(timeout=args.tls_wait, injected=injected_from_env(os.environ))
        store = sources.open(args)
        pool.start()
        asyncio.run(_until_signal(lambda stop: serve_authz(settings, store=store, stop=stop)))
    except MeshguardError as exc:
        return fail(f"meshguard serve-authz: {exc}", EXIT_USAGE)
    except OSError as exc:
        return fail(f"meshguard serve-authz: {exc}", EXIT_FAILED)
    finally:
        pool.stop()
        sources.close()
    return EXIT_OK


def _authz_usage_problem(args: argparse.Namespace) -> str | None:
    """The first flag combination serve-authz cannot run with, in words; None when fine."""
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    problems = (
        (any(given) and not all(given), "give --tls-cert, --tls-key and --tls-ca together"),
        (args.list_page_size < 1, f"--list-page-size {args.list_page_size}: expected at least 1"),
        (args.workers < 1, f"--workers {args.workers}: expected at least 1"),
        (
            not args.tls_wait > 0,  # also NaN
            f"--tls-wait {args.tls_wait}: expected a number of seconds above 0",
        ),
        (
            args.trusted_keys is None and args.policy_feed is None,
            "give --trusted-keys (the webhook's public keys): only the policies meshguard's"
            " webhook signed are served",
        ),
        (
            args.kubernetes and not any(given) and not args.insecure_plaintext,
            "--kubernetes serves the Check channel over mutual TLS: give --tls-cert, --tls-key"
            " and --tls-ca (Istio's workload certificate files), or --insecure-plaintext to"
            " serve without callers' identities",
        ),
    )
    return next((message for failed, message in problems if failed), None)


class _Sources:
    """Where serve-authz's policies come from, and what to stop at the end."""

    def __init__(self) -> None:
        self.watcher: KubernetesStore | None = None
        self.frames = FrameEncoder()  # the workers' feeds encode each change once

    def open(self, args: argparse.Namespace) -> PolicyStore:
        """--kubernetes: the watch (feeding the workers, if any); --policy-feed: a worker's
        store fed by its parent; --pods: the files."""
        if args.kubernetes:
            source = HttpPodSource(api_access(), page_size=args.list_page_size)
            self.watcher = KubernetesStore(source, trusted=TrustedKeys.load(args.trusted_keys))
            self.watcher.start()
            return self.watcher
        if args.policy_feed is not None:
            fed = FedStore(args.policy_feed)
            fed.start()
            return fed
        return StaticStore.from_files(args.pods, trusted=TrustedKeys.load(args.trusted_keys))

    def worker(self, args: argparse.Namespace, index: int) -> Worker:
        """Start worker ``index``; with --kubernetes, fed by this process's watch over a pipe
        of its own (the current view first, then every change), released when it is gone."""
        watcher = self.watcher
        if watcher is None:
            return Worker(_start_worker(args, index, feed_fd=None))
        read_end, write_end = os.pipe()
        try:
            process = _start_worker(args, index, feed_fd=read_end)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        feed = Feed(write_end, name=str(index), encoder=self.frames)
        watcher.subscribe(feed)

        def release() -> None:
            watcher.unsubscribe(feed)
            feed.close()

        return Worker(process, release)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()


def _start_worker(
    args: argparse.Namespace, index: int, *, feed_fd: int | None
) -> subprocess.Popen[bytes]:
    """Another server process on the same port (gRPC sets SO_REUSEPORT: the kernel spreads
    connections); worker ``index`` serves its metrics on ``--metrics-port + index``. With
    --kubernetes it watches nothing itself: the parent's watch feeds it (``feed_fd``)."""
    if feed_fd is not None:
        source = ["--policy-feed", str(feed_fd)]
    else:
        source = ["--pods", *map(str, args.pods), "--trusted-keys", str(args.trusted_keys)]
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
    argv += ["--parent-pid", str(os.getpid())]
    fds = (feed_fd,) if feed_fd is not None else ()
    # No preexec_fn: workers are also started again while the server's threads run, where
    # Python code between fork and exec is unsafe; the worker arranges its own end.
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=fds)


def _die_with_parent(parent_pid: int) -> bool:
    """A worker must not outlive the process that started it, even if that one is killed:
    SIGTERM when the parent's starting thread ends (the parent's main thread, or the thread
    that starts workers again, which runs as long as the parent serves). False if the parent
    is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent_pid


async def _until_signal(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a server until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(stop)
