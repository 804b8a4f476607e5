"""What a backend reads from an HTTP request beyond its method, path and headers: the facts
both L7 engines (the authz server's decision and the Envoy RBAC compiled into the sidecar)
refuse alike, so that a rule's method is the method the backend acts on. No imports."""

from __future__ import annotations

import enum
from typing import Final


class L7Engine(enum.StrEnum):
    """Who makes a pod's L7 decisions (``meshguard.io/l7-engine``)."""

    NATIVE = "native"  # Envoy RBAC compiled from the pod's admitted policy (meshguard.rbac)
    EXT_AUTHZ = "ext-authz"  # meshguard serve-authz, asked per request over gRPC


class DecisionLog(enum.StrEnum):
    """Which of the native engine's decisions get their JSON line on the proxy's stdout: a
    property of the loopback listener, so per install (``envoy-config --decision-log``, the
    chart's ``istio.envoyFilter.decisionLog``)."""

    ALL = "all"  # every request: allowed, denied, and in audit mode would-be decisions
    DENIED = "denied"  # denials and audit mode's would-be denials only (allowed ones counted)


#: Where istio-proxy finds the pod's RBAC document (a downward API volume of the
#: ``meshguard.io/l7-rbac`` annotation).
RBAC_DIR: Final = "/etc/meshguard/l7"
RBAC_FILE: Final = "rbac.json"

#: Headers by which Rails, Laravel/Symfony, Express's method-override, ASP.NET and Google's
#: APIs let a client replace the request's method (any value: present is refused).
METHOD_OVERRIDE_HEADERS: Final = ("x-http-method-override", "x-method-override", "x-http-method")
#: The query (and form) parameter Rack::MethodOverride, Laravel and Symfony honour.
METHOD_PARAMETER: Final = "_method"
#: Media types whose body a framework parses into parameters (where ``_method`` is read).
FORM_MEDIA_TYPES: Final = ("application/x-www-form-urlencoded", "multipart/form-data")
#: The only method a body's ``_method`` turns into another one; without a Content-Type, Rack
#: parses such a body as a form.
OVERRIDABLE_METHOD: Final = "POST"
