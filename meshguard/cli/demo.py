"""``meshguard demo``: build a pod without a cluster and show who can talk to whom.

Progress lines while the sandbox is built (stderr), then a connectivity matrix per family
(source x destination port, expected vs observed), the L7 requests, Istio's own capture and
audit mode; or, with ``--output json``, one JSON object per flow. Exit status 1 when any
observed result differs from the policy.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from meshguard.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from meshguard.errors import MalformedInputError, MeshguardError
from meshguard.inject.transform import InjectSettings, Outcome, inject_pod
from meshguard.manifests import PodTemplate, pod_templates, read_source
from meshguard.rules.ruleset import Family
from meshguard.sandbox.demo import Outcomes, PodDemo, root_problem
from meshguard.sandbox.flows import Flow, audit_flows

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pod.yaml"


def run(args: argparse.Namespace) -> int:
    problem = root_problem()
    if problem:
        return fail(problem, EXIT_FAILED)
    try:
        template = _injected_template(args.filename or str(EXAMPLE))
    except MeshguardError as exc:
        return fail(f"meshguard demo: {exc}", EXIT_USAGE)
    err = Console(stderr=True, highlight=False)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on kill as on Ctrl-C
    try:
        with PodDemo(template, progress=lambda line: err.print(f"[dim]•[/] {line}")) as pod:
            err.print(f"[dim]•[/] trying {len(pod.plan.flows)} flows")
            outcomes = pod.run(pod.plan.flows)
            pod.switch_to_audit()
            audit = pod.run(audit_flows(pod.plan))
            everything = Outcomes(outcomes.results + audit.results)
            _show(everything, json_lines=args.output == "json", label=template.label)
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


def _injected_template(filename: str) -> PodTemplate:
    """The first pod template of the manifest, through ``meshguard inject``'s transform."""
    for template in pod_templates(read_source(filename)):
        settings = InjectSettings(request_template=False)
        result = inject_pod(template.metadata, template.spec, settings=settings)
        if result.outcome is Outcome.INJECTED:
            return template
    raise MalformedInputError(f"{filename}: no Istio-injected pod template meshguard could inject")


def _show(outcomes: Outcomes, *, json_lines: bool, label: str) -> None:
    if json_lines:
        for flow, observed in outcomes.results:
            print(json.dumps(flow.report(observed)))
        return
    # Not a terminal (a pipe, CI): render tables at their natural width, not 80 columns.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
    console.print(f"\n[bold]meshguard demo[/] — {label}")
    for family in Family:
        console.print(_matrix(outcomes, family))
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


def _matrix(outcomes: Outcomes, family: Family) -> Table:
    flows = [(f, o) for f, o in outcomes.results if f.kind == "l4" and f.family is family]
    rows = list(dict.fromkeys(f.source for f, _ in flows))
    order = {name: index for index, name in enumerate([*rows, "proxy"])}
    ordered = sorted(flows, key=lambda item: (order.get(item[0].to, len(order)), item[0].port))
    columns = list(dict.fromkeys(_column(f) for f, _ in ordered))
    l7 = {(f.source, _column(f)) for f, _ in outcomes.results if f.kind == "l7"}
    title = (
        f"Loopback connectivity, {family.value} (✓ allowed, ✗ refused, ! unexpected,"
        " L7: checked per request, below)"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("from \\ to", style="bold", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="center", no_wrap=True)
    cells = {(f.source, _column(f)): _cell(f, o) for f, o in flows}
    for row in rows:
        table.add_row(row, *(cells.get((row, c), "L7" if (row, c) in l7 else "") for c in columns))
    return table


def _column(flow: Flow) -> str:
    protocol = "tcp" if flow.protocol == "http" else flow.protocol
    return f"{flow.to}\n{flow.port}/{protocol}"


def _listing(outcomes: Outcomes, kind: str, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("from", "to", "request", "family", "expected", "observed"):
        table.add_column(name)
    for flow, observed in outcomes.results:
        if flow.kind != kind:
            continue
        if flow.protocol == "http":
            request = f"{flow.method} {flow.path}"
        else:
            request = f"{flow.host}:{flow.port}/{flow.protocol}"
        style = "" if observed == flow.expected else "bold red"
        table.add_row(
            flow.source, f"{flow.to}:{flow.port}", request, flow.family.value,
            flow.expected, observed, style=style,
        )  # fmt: skip
    return table
