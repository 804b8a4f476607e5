"""The servers compared: the bare aiohttp baseline (a hidden subcommand of ``webhook``) and
meshguard's, as subprocesses."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from benchmarks.admission.pod import BASELINE_LIFETIME_SECONDS
from benchmarks.common import module_argv
from tests.support.processes import HOST, start_logged, stop_process, wait_https_ready

# --- the baseline server (hidden subcommand) ------------------------------------------------


def baseline_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="webhook.py _baseline")
    parser.add_argument("role", choices=["_baseline"])
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answer", type=Path, required=True, help="the fixed JSON answer")
    args = parser.parse_args(argv)
    signal.alarm(BASELINE_LIFETIME_SECONDS)
    asyncio.run(serve_baseline(args.cert, args.key, args.host, args.port, args.answer))
    return 0


async def serve_baseline(cert: Path, key: Path, host: str, port: int, answer: Path) -> None:
    """POST /inject: read the body, return the precomputed answer; GET /readyz."""
    text = answer.read_text()

    async def inject(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=text, content_type="application/json")

    async def readyz(request: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    # The same TLS settings as meshguard's CertificateReloader.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    app = web.Application(client_max_size=3 * 1024 * 1024)
    app.router.add_post("/inject", inject)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# --- the servers as subprocesses ------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"


def tls_version(port: int, ca_file: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        return tls.version() or "?"


@contextlib.contextmanager
def started(
    name: str, argv: list[str], port: int, ca_file: Path, workdir: Path
) -> Iterator[Server]:
    """A server subprocess, ready (``/readyz`` 200); always terminated on exit."""
    log_file = workdir / f"{name}.log"
    process = start_logged(argv, log_file)
    server = Server(name, port, process, log_file)
    try:
        wait_https_ready(process, name=name, port=port, ca_file=ca_file, log_file=log_file)
        yield server
    finally:
        stop_process(process)


def baseline_argv(cert: Path, key: Path, port: int, answer: Path) -> list[str]:
    return module_argv("benchmarks.webhook", "_baseline", "--cert", str(cert), "--key", str(key),
                       "--host", HOST, "--port", str(port), "--answer", str(answer))  # fmt: skip
