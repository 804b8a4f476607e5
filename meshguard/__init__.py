"""meshguard: intra-pod isolation for Istio sidecars.

Per-uid loopback rules installed by an init container right after ``istio-init``, and
zero-trust L7 checks (an Envoy ``ext_authz`` server) for loopback flows that need more
than a port. See README.md for the architecture.
"""

__version__ = "0.1.0"
