"""The pods of ``describe``/``unprotected`` read from the live cluster: kubectl's flags
(``--kubeconfig``, ``--context``, ``-n``, ``-A``, ``-l``, ``--chunk-size``, ``pod NAME``) to
the requests of :mod:`meshguard.cluster`.

The Namespaces that carry meshguard's opt-out label come first (one LIST with that label
selector, or the one namespace's GET), so every pod is judged as it arrives.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence

from meshguard.cli.found import POD_TYPES, Found, NamespaceSeen
from meshguard.cluster import Cluster, ClusterError, connect, get_object, list_objects
from meshguard.errors import UsageError
from meshguard.inject.transform import OPT_OUT_EXEMPTION
from meshguard.manifests import SourceObject

log = logging.getLogger(__name__)


def pods_of_cluster(
    args: argparse.Namespace, opt_out: tuple[str, str], *, exemptions: bool
) -> Iterator[Found]:
    """The pods the flags select, after the namespaces that opted out; with ``exemptions``
    (``--pod-opt-out refuse``) also the namespaces exempt from that refusal."""
    names = pod_names(args.resources)
    if names and args.selector:
        raise UsageError("a pod's name cannot be given with a selector (-l)")
    if names and args.all_namespaces:
        raise UsageError("a pod cannot be retrieved by name across all namespaces (-A)")
    cluster = connect(kubeconfig=args.kubeconfig, context=args.context)
    namespace = None if args.all_namespaces else (args.namespace or cluster.namespace)
    yield from _opted_out(cluster, namespace, opt_out, exemptions=exemptions)
    if names:
        assert namespace is not None  # refused above with -A
        yield from _named(cluster, namespace, names)
        return
    pods = list_objects(
        cluster,
        resource="pods",
        namespace=namespace,
        selector=args.selector or "",
        chunk_size=args.chunk_size,
    )
    for pod in pods:
        yield from SourceObject("a pod of the list", pod).pod_templates()


def _named(cluster: Cluster, namespace: str, names: Sequence[str]) -> Iterator[Found]:
    """Each pod named, as kubectl describes them: the ones found, then the error of each
    one that was not (exit 1)."""
    failures: list[str] = []
    for name in names:
        try:
            pod = get_object(cluster, resource="pods", namespace=namespace, name=name)
        except ClusterError as exc:
            failures.append(str(exc))
            continue
        yield from SourceObject(f"pod {namespace}/{name}", pod).pod_templates()
    if failures:
        raise ClusterError("; ".join(failures))


def pod_names(resources: Sequence[str]) -> list[str]:
    """The names of ``pod NAME...``, ``pods/NAME...`` (kubectl's forms); [] for every pod."""
    if not resources:
        return []
    first, *rest = resources
    if first.lower() in POD_TYPES:
        return _plain(rest)
    names = []
    for resource in resources:
        kind, slash, name = resource.partition("/")
        if not slash:
            raise UsageError(
                f"{resource!r}: expected pod NAME or pod/NAME (meshguard describes pods only)"
            )
        if kind.lower() not in POD_TYPES or not name:
            raise UsageError(f"{resource!r}: meshguard describes pods only (pod/NAME)")
        names.append(name)
    return names


def _plain(names: Sequence[str]) -> list[str]:
    for name in names:
        if "/" in name:
            raise UsageError(f"{name!r}: there is no need to specify a resource type twice")
    return list(names)


def _opted_out(
    cluster: Cluster, namespace: str | None, opt_out: tuple[str, str], *, exemptions: bool
) -> Iterator[NamespaceSeen]:
    """The namespaces that opted out of meshguard (all, or the one listed), and with
    ``exemptions`` those whose pods may opt out alone. The exemption is read only when it
    matters, so an audit that allows pod opt-outs needs no second LIST."""
    key, value = opt_out
    if namespace is None:
        selector = f"{key}={value}"
        for obj in list_objects(cluster, resource="namespaces", namespace=None, selector=selector):
            yield NamespaceSeen(str((obj.get("metadata") or {}).get("name")), opted_out=True)
        if not exemptions:
            return
        exemption = "=".join(OPT_OUT_EXEMPTION)
        for obj in list_objects(cluster, resource="namespaces", namespace=None, selector=exemption):
            name = str((obj.get("metadata") or {}).get("name"))
            yield NamespaceSeen(name, opted_out=False, exempt=True)
        return
    try:
        obj = get_object(cluster, resource="namespaces", namespace="", name=namespace)
    except ClusterError as exc:
        if exc.status not in (403, 404):  # unreachable: the pods cannot be listed either
            raise
        # Forbidden to namespace-scoped users: judge without it (fail closed: unprotected).
        log.warning(
            "cannot read namespace %s, so its opt-out label is not known: %s",
            namespace,
            exc,
            extra={"fields": {"event": "namespace-unreadable", "namespace": namespace}},
        )
        yield NamespaceSeen(namespace, opted_out=False)
        return
    labels = (obj.get("metadata") or {}).get("labels") or {}
    exempt = labels.get(OPT_OUT_EXEMPTION[0]) == OPT_OUT_EXEMPTION[1]
    yield NamespaceSeen(namespace, opted_out=labels.get(key) == value, exempt=exempt)
