"""Kubernetes manifests: YAML streams in, the pod templates they carry out.

Handles what ``kubectl apply -f`` and ``istioctl kube-inject -f`` take: one or many YAML
documents, ``kind: List``, and every workload kind that holds a pod template. The templates
are returned by reference (the dicts inside the loaded documents), so a caller that edits
them edits the documents, which keeps every other field and the document order.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from meshguard import annotation_keys, yaml_io
from meshguard.errors import MalformedInputError

#: Where each workload kind keeps its pod template (path of keys below the object).
TEMPLATE_PATHS: Final[Mapping[str, tuple[str, ...]]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "DeploymentConfig": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "PodTemplate": ("template",),
}
#: The cap of :func:`read_documents`, which holds a whole manifest (the commands that write
#: the manifest back, and the pod files of ``serve-authz --pods``). :func:`stream_objects`
#: (``describe``) has none: it holds one object at a time.
MAX_MANIFEST_BYTES: Final = 8 * 1024 * 1024
#: The files ``-f DIRECTORY`` reads, as ``kubectl apply -f`` does.
MANIFEST_SUFFIXES: Final = (".json", ".yaml", ".yml")
STDIN: Final = "-"


@dataclass(frozen=True)
class PodTemplate:
    """A pod (or pod template) found in a manifest; ``metadata``/``spec`` are live dicts."""

    kind: str
    name: str
    namespace: str | None
    metadata: dict[str, Any]
    spec: dict[str, Any]

    @property
    def label(self) -> str:
        namespace = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {namespace}{self.name}"


def read_documents(source: str | Path | TextIO) -> list[Any]:
    """Load every YAML document of a file path, an open stream (``-``) or text."""
    text = _read_text(source)
    if len(text) > MAX_MANIFEST_BYTES:  # characters >= bytes / 4: a cheap first bound
        raise MalformedInputError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        if len(text.encode()) > MAX_MANIFEST_BYTES:
            raise MalformedInputError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    except UnicodeEncodeError as exc:  # text with lone surrogates, e.g. from surrogateescape
        raise MalformedInputError(f"input is not UTF-8 text ({exc.reason})") from None
    try:
        return [doc for doc in yaml_io.load_all(text) if doc is not None]
    except yaml_io.YAMLError as exc:
        raise MalformedInputError(f"not valid YAML: {exc}") from None


def read_source(filename: str) -> list[Any]:
    """The documents of a file named on the command line; ``-`` is standard input.

    Errors name the file (``stdin`` for ``-``)."""
    try:
        return read_documents(sys.stdin if filename == "-" else Path(filename))
    except MalformedInputError as exc:
        if filename != "-" and str(exc).startswith("cannot read"):
            raise  # already names the file
        raise MalformedInputError(f"{'stdin' if filename == '-' else filename}: {exc}") from None


def read_sources(filenames: Sequence[str], *, recursive: bool = False) -> list[Any]:
    """The documents of every file named by ``-f`` flags (:func:`manifest_files`), in order:
    for the commands that write the manifest back, so each file is held whole
    (:data:`MAX_MANIFEST_BYTES` each)."""
    return [
        doc for name in manifest_files(filenames, recursive=recursive) for doc in read_source(name)
    ]


def pod_templates(documents: list[Any]) -> Iterator[PodTemplate]:
    """Every pod template in the documents, in document order (List items expanded)."""
    for index, document in enumerate(documents):
        yield from _templates_of(document, f"document {index + 1}")


@dataclass(frozen=True)
class SourceObject:
    """One Kubernetes object of a manifest, and where it is (for messages)."""

    where: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        kind = self.obj.get("kind")
        return kind if isinstance(kind, str) else ""

    def pod_templates(self) -> Iterator[PodTemplate]:
        return _templates_of(self.obj, self.where)

    def flattened(self) -> Iterator[SourceObject]:
        """This object, or the items of this List (nested Lists too)."""
        items = self.obj.get("items")
        if not (self.kind.endswith("List") and isinstance(items, list)):
            yield self
            return
        for index, item in enumerate(items):
            where = f"{self.where}, items[{index}]"
            yield from SourceObject(where, _object(item, where)).flattened()


def manifest_files(filenames: Sequence[str], *, recursive: bool = False) -> list[str]:
    """The files named by ``-f`` flags, in their order, as ``kubectl apply -f`` takes them: a
    file as named (``-`` is standard input, once), a directory as its ``.json``, ``.yaml``
    and ``.yml`` files in name order (its subdirectories' too with ``recursive``)."""
    files: list[str] = []
    for name in filenames:
        if name == STDIN:
            if STDIN in files:
                raise MalformedInputError("stdin (-) can be read only once")
            files.append(name)
            continue
        path = Path(name)
        if not path.is_dir():
            files.append(name)  # a missing file is said when it is read
            continue
        found = sorted(
            p
            for p in (path.rglob("*") if recursive else path.iterdir())
            if p.suffix in MANIFEST_SUFFIXES and p.is_file()
        )
        if not found:
            raise MalformedInputError(
                f"{name}: no {', '.join(MANIFEST_SUFFIXES)} file in this directory"
                + ("" if recursive else " (-R reads its subdirectories)")
            )
        files.extend(map(str, found))
    return files


def stream_objects(filenames: Sequence[str], *, recursive: bool = False) -> Iterator[SourceObject]:
    """Every Kubernetes object of the files, in order, read as a stream: a ``kind: List``'s
    items one at a time as they are parsed (``kubectl get pods -A -o yaml`` of any size, in
    memory for one pod). Nested Lists are given out whole; ``None`` documents are skipped.

    Errors name the file (``stdin`` for ``-``) and the document."""
    for name in manifest_files(filenames, recursive=recursive):
        yield from _stream_file(name)


def _stream_file(name: str) -> Iterator[SourceObject]:
    label = "stdin" if name == STDIN else name
    try:
        handle = sys.stdin.buffer if name == STDIN else Path(name).open("rb")  # noqa: SIM115
    except OSError as exc:
        raise MalformedInputError(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        for part in yaml_io.stream(handle):
            where = f"{label}: document {part.document + 1}"
            if part.item is not None:
                yield SourceObject(f"{where}, items[{part.item}]", _object(part.value, where))
            elif part.value is not None:
                document = _object(part.value, where)
                if part.streamed_items:
                    _check_list(document, where)
                else:
                    yield SourceObject(where, document)
    except yaml_io.NotUtf8Error as exc:
        prefix = label if name == STDIN else f"cannot read {label}"
        raise MalformedInputError(f"{prefix}: {exc}") from None
    except yaml_io.YAMLError as exc:
        raise MalformedInputError(f"{label}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise MalformedInputError(f"cannot read {label}: {exc.strerror or exc}") from None
    finally:
        if name != STDIN:
            handle.close()


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedInputError(
            f"{where}: expected a Kubernetes object, got {type(value).__name__}"
        )
    return value


def _check_list(document: dict[str, Any], where: str) -> None:
    """A document whose ``items`` were given out one by one must be a List."""
    kind = document.get("kind")
    if not isinstance(kind, str):
        raise MalformedInputError(f"{where}: has no 'kind'")
    if not kind.endswith("List"):
        raise MalformedInputError(f"{where}: a {kind} with 'items': expected a List")


def _templates_of(obj: object, where: str) -> Iterator[PodTemplate]:
    if not isinstance(obj, dict):
        raise MalformedInputError(
            f"{where}: expected a Kubernetes object, got {type(obj).__name__}"
        )
    kind = obj.get("kind")
    if not isinstance(kind, str):
        raise MalformedInputError(f"{where}: has no 'kind'")
    if kind == "List" or (kind.endswith("List") and isinstance(obj.get("items"), list)):
        for index, item in enumerate(obj.get("items") or []):
            yield from _templates_of(item, f"{where}, items[{index}]")
        return
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise MalformedInputError(f"{where}: metadata is not a mapping")
    name = str(metadata.get("name") or metadata.get("generateName") or "")
    namespace = metadata.get("namespace")
    if kind == "Pod":
        yield _template(kind, name, namespace, obj, where)
    elif kind in TEMPLATE_PATHS:
        holder: object = obj
        for key in TEMPLATE_PATHS[kind]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if holder is None:
            raise MalformedInputError(f"{where}: {kind} {name} has no pod template")
        template = _template(kind, name, namespace, holder, where)
        if kind == "CronJob":
            _inherit_istio_status(obj, template)
        yield template


def _inherit_istio_status(cronjob: dict[str, Any], template: PodTemplate) -> None:
    """``istioctl kube-inject`` records a CronJob's injection on ``spec.jobTemplate.metadata``,
    not on its pod template (the only place meshguard reads it): carry it down, as the pods
    Istio's webhook injects carry it."""
    holder: object = cronjob
    for key in ("spec", "jobTemplate", "metadata", "annotations"):
        holder = holder.get(key) if isinstance(holder, dict) else None
    status = holder.get(annotation_keys.ISTIO_STATUS) if isinstance(holder, dict) else None
    if isinstance(status, str):
        annotations = template.metadata.setdefault("annotations", {})
        if isinstance(annotations, dict):
            annotations.setdefault(annotation_keys.ISTIO_STATUS, status)


def _template(kind: str, name: str, namespace: object, holder: object, where: str) -> PodTemplate:
    if not isinstance(holder, dict):
        raise MalformedInputError(f"{where}: {kind} {name}: pod template is not a mapping")
    metadata = holder.setdefault("metadata", {})
    spec = holder.get("spec")
    if not isinstance(metadata, dict) or not isinstance(spec, dict):
        raise MalformedInputError(f"{where}: {kind} {name}: pod template needs metadata and spec")
    return PodTemplate(
        kind=kind,
        name=name,
        namespace=namespace if isinstance(namespace, str) else None,
        metadata=metadata,
        spec=spec,
    )


def _read_text(source: str | Path | TextIO) -> str:
    if isinstance(source, Path):
        try:
            return source.read_bytes().decode("utf-8")
        except OSError as exc:
            raise MalformedInputError(f"cannot read {source}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise MalformedInputError(f"cannot read {source}: {_not_utf8(exc)}") from None
    if isinstance(source, str):
        return source
    raw = getattr(source, "buffer", None)  # decode ourselves: the stream's errors= may hide it
    try:
        if raw is not None:
            return bytes(raw.read()).decode("utf-8")
        return source.read()
    except UnicodeDecodeError as exc:
        raise MalformedInputError(_not_utf8(exc)) from None


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
