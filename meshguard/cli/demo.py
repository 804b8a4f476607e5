"""``meshguard demo``: build a pod without a cluster and show who can talk to whom.

Progress lines while the sandbox is built (stderr), then a connectivity matrix per family
(source x destination port, expected vs observed), the L7 requests, Istio's own capture and
audit mode; or, with ``--output json``, one JSON object per flow. Exit status 1 when any
observed result differs from the policy. ``--backend`` chooses where the sandbox's Istio
writes its capture (iptables-nft, iptables-legacy, native nftables).

The text fits the terminal (``$COLUMNS``, else the terminal's width; 240 columns into a
pipe): the matrix is split into as many tables as its destination ports need, never
truncated, and the listings fold long cells.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from meshguard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from meshguard.errors import MalformedInputError, MeshguardError
from meshguard.inject.transform import InjectSettings, Outcome, inject_pod
from meshguard.manifests import PodTemplate, pod_templates, read_source
from meshguard.rules.ruleset import Family
from meshguard.sandbox.demo import (
    Netfilter,
    Outcomes,
    PodDemo,
    as_native_nftables,
    ephemeral_signer,
    root_problem,
)
from meshguard.sandbox.flows import Flow, audit_flows

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pod.yaml"


#: Output width when stdout is no terminal and ``$COLUMNS`` is unset (a pipe, CI).
PIPE_WIDTH = 240


def run(args: argparse.Namespace) -> int:
    netfilter = Netfilter(args.backend)
    problem = root_problem(netfilter)
    if problem:
        return fail(problem, EXIT_FAILED)
    try:
        template = _injected_template(args.filename or str(EXAMPLE), netfilter=netfilter)
    except MeshguardError as exc:
        return fail(f"meshguard demo: {exc}", EXIT_USAGE)
    err = Console(stderr=True, highlight=False, soft_wrap=True)  # a line per step, unbroken
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on kill as on Ctrl-C
    progress = lambda line: err.print(f"[dim]•[/] {line}")  # noqa: E731
    try:
        with PodDemo(template, progress=progress, netfilter=netfilter) as pod:
            err.print(f"[dim]•[/] trying {len(pod.plan.flows)} flows")
            outcomes = pod.run(pod.plan.flows)
            pod.switch_to_audit()
            audit = pod.run(audit_flows(pod.plan))
            everything = Outcomes(outcomes.results + audit.results)
            label = f"{template.label}, Istio's capture in {netfilter.value}"
            _show(everything, json_lines=args.output == "json", label=label)
            if args.keep:
                err.print(f"sandbox kept: ip netns exec {pod.ns.name} ... (Ctrl-C removes it)")
                threading.Event().wait()
    except MeshguardError as exc:
        return fail(f"meshguard demo: {exc}", EXIT_FAILED)
    except KeyboardInterrupt:
        err.print("interrupted: sandbox removed")
        return 130
    return EXIT_FAILED if everything.unexpected else EXIT_OK


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _injected_template(filename: str, *, netfilter: Netfilter) -> PodTemplate:
    """The first pod template of the manifest, through ``meshguard inject``'s transform (in
    Istio's native nftables mode first, for that backend: admission reads it from the spec)."""
    for template in pod_templates(read_source(filename)):
        settings = InjectSettings(request_template=False, signer=ephemeral_signer())
        if netfilter is Netfilter.NFTABLES:
            as_native_nftables(template)
        result = inject_pod(template.metadata, template.spec, settings=settings)
        if result.outcome is Outcome.INJECTED:
            return template
    raise MalformedInputError(f"{filename}: no Istio-injected pod template meshguard could inject")


def _show(outcomes: Outcomes, *, json_lines: bool, label: str) -> None:
    if json_lines:
        for flow, observed in outcomes.results:
            print(json.dumps(flow.report(observed)))
        return
    width = shutil.get_terminal_size(fallback=(PIPE_WIDTH, 24)).columns
    render(outcomes, label=label, console=Console(highlight=False, width=width))


def render(outcomes: Outcomes, *, label: str, console: Console) -> None:
    """The demo's text: the matrices, the listings and the verdict, within the console's
    width (nothing truncated)."""
    console.print(f"\n[bold]meshguard demo[/] — {label}")
    console.print(
        "✓ allowed, ✗ refused, ! unexpected, L7: checked per request (below);"
        " columns: destination container, port, u = UDP"
    )
    for family in Family:
        for table in _matrices(outcomes, family, width=console.width):
            console.print(table)
    console.print(_listing(outcomes, "l7", "L7 requests on loopback (ext_authz)"))
    console.print(
        _listing(outcomes, "broadcast", "Broadcast and multicast (looped back through eth0)")
    )
    console.print(_listing(outcomes, "mesh", "Istio's own capture (must keep working)"))
    console.print(_listing(outcomes, "audit", "Audit mode (meshguard.io/mode: audit)"))
    total, wrong = len(outcomes.results), len(outcomes.unexpected)
    if wrong:
        console.print(f"{total} flows tried: [bold red]{wrong} differ from the policy[/]")
    else:
        console.print(f"{total} flows tried: [green]all as the policy says[/]")


def _cell(flow: Flow, observed: str) -> str:
    mark = "✓" if observed == "allow" else "✗" if observed == "deny" else "?"
    if observed != flow.expected:
        return f"[bold red]{mark}![/]"
    return f"[green]{mark}[/]" if observed == "allow" else f"[dim]{mark}[/]"


def _matrices(outcomes: Outcomes, family: Family, *, width: int) -> Iterator[Table]:
    """The family's matrix, split by destination columns into tables that fit ``width``
    (one table for the example pod at 80 columns)."""
    flows = [(f, o) for f, o in outcomes.results if f.kind == "l4" and f.family is family]
    rows = list(dict.fromkeys(f.source for f, _ in flows))
    order = {name: index for index, name in enumerate([*rows, "proxy"])}
    ordered = sorted(flows, key=lambda item: (order.get(item[0].to, len(order)), item[0].port))
    columns = list(dict.fromkeys(_column(f) for f, _ in ordered))
    l7 = {(f.source, _column(f)) for f, _ in outcomes.results if f.kind == "l7"}
    cells = {(f.source, _column(f)): _cell(f, o) for f, o in flows}
    corner = " from \\ to "
    first = max([len(corner) - 1, *(len(row) + 2 for row in rows)])
    chunks = _fit(columns, first=first, width=width)
    for number, chunk in enumerate(chunks, 1):
        part = f", part {number} of {len(chunks)}" if len(chunks) > 1 else ""
        # No cell padding: the row names carry their own, the marks sit centered.
        table = Table(
            title=f"Loopback connectivity, {family.value}{part}",
            title_justify="left",
            box=box.SQUARE,
            padding=(0, 0),
        )
        table.add_column(corner, style="bold", no_wrap=True)
        for column in chunk:
            table.add_column(column, justify="center", vertical="bottom", no_wrap=True)
        for row in rows:
            table.add_row(
                f" {row} ", *(cells.get((row, c), "L7" if (row, c) in l7 else "") for c in chunk)
            )
        yield table


def _fit(columns: Sequence[str], *, first: int, width: int) -> list[list[str]]:
    """Columns grouped so each table fits ``width``: the outer borders and the row names'
    column, then per column its widest header line and a border."""
    chunks: list[list[str]] = [[]]
    used = first + 2
    for column in columns:
        needed = max(map(len, column.split("\n"))) + 1
        if chunks[-1] and used + needed > width:
            chunks.append([])
            used = first + 2
        chunks[-1].append(column)
        used += needed
    return chunks


def _column(flow: Flow) -> str:
    """A destination's header: its container, broken after each hyphen (``log-`` /
    ``shipper``: a narrow column), then the port (``u``: UDP)."""
    port = f"{flow.port}u" if flow.protocol == "udp" else str(flow.port)
    return "\n".join([*re.findall(r"[^-]+-?", flow.to), port])


def _listing(outcomes: Outcomes, kind: str, title: str) -> Table:
    """The flows of one kind, a line each: the result is the observed one, in red with what
    the policy expected when they differ."""
    table = Table(title=title, title_justify="left", box=box.SQUARE, padding=(0, 1))
    for name in ("from", "to", "request", "ip", "result"):
        table.add_column(name, overflow="fold")
    for flow, observed in outcomes.results:
        if flow.kind != kind:
            continue
        if flow.protocol == "http":
            to, request = f"{flow.to}:{flow.port}", f"{flow.method} {flow.path}"
        else:
            to, request = flow.to, f"{flow.host}:{flow.port}/{flow.protocol}"
        if observed == flow.expected:
            table.add_row(flow.source, to, request, flow.family.value[-1], observed)
        else:
            result = f"{observed} (expected {flow.expected})"
            table.add_row(flow.source, to, request, flow.family.value[-1], result, style="bold red")
    return table
