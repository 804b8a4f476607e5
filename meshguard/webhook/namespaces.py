"""Whether a namespace lets its pods opt out of meshguard (``webhook.optOut: refuse``).

An AdmissionReview of a pod does not carry its namespace's labels, so the webhook reads the
namespace from the API server (GET, bounded; only for pods that opt out) and checks
:data:`~meshguard.inject.transform.OPT_OUT_EXEMPTION`. Who may set that label is whoever
RBAC lets edit namespaces — normally cluster admins only. A namespace that cannot be read
is not exempt (fail closed: the opt-out is refused, with the reason).
"""

from __future__ import annotations

import urllib.parse
from typing import Final

from meshguard import kube_api
from meshguard.errors import MeshguardFailure
from meshguard.inject.transform import OPT_OUT_EXEMPTION
from meshguard.kube_api import ApiAccess

MAX_NAMESPACE_BYTES: Final = 256 * 1024


class NamespaceExemptions:
    """``namespace -> exempt?``, read from the API server at each call."""

    def __init__(self, access: ApiAccess) -> None:
        self._access = access

    def __call__(self, namespace: str) -> bool:
        path = f"/api/v1/namespaces/{urllib.parse.quote(namespace, safe='')}"
        try:
            body = kube_api.request(self._access, "GET", path, what=f"namespace {namespace}",
                                    limit=MAX_NAMESPACE_BYTES)  # fmt: skip
        except kube_api.ApiError as exc:
            raise MeshguardFailure(
                f"cannot read namespace {namespace} to check {OPT_OUT_EXEMPTION[0]}: {exc.cause}"
            ) from None
        document = kube_api.json_object(body) or {}
        metadata = document.get("metadata")
        labels = metadata.get("labels") if isinstance(metadata, dict) else None
        key, value = OPT_OUT_EXEMPTION
        return isinstance(labels, dict) and labels.get(key) == value
