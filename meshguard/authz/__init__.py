"""Zero-trust L7 checks on loopback: the decision (pure), the policy stores, the ext_authz
gRPC server."""
