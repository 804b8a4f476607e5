"""Commands that work pod by pod through a manifest (``inject``, ``rules``): one template's
refusal or malformed spec is reported on stderr and collected, and the others go on."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from meshguard.errors import MalformedInputError, MeshguardError, RefusedError
from meshguard.manifests import PodTemplate

T = TypeVar("T")


def each_template(
    templates: Iterable[PodTemplate],
    apply: Callable[[PodTemplate], T],
    *,
    errors: list[MeshguardError],
) -> Iterator[tuple[PodTemplate, T]]:
    """``(template, apply(template))`` for every template ``apply`` accepts; the others are
    reported (``error: <pod>: ...``) and appended to ``errors``."""
    for template in templates:
        try:
            result = apply(template)
        except RefusedError as exc:
            print(f"error: {template.label}: {exc}", file=sys.stderr)
            errors.append(exc)
            continue
        except MalformedInputError as exc:
            print(f"error: {template.label}: malformed pod spec: {exc}", file=sys.stderr)
            errors.append(exc)
            continue
        yield template, result
