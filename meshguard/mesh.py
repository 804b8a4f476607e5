"""Facts about Istio's sidecar that every layer of meshguard relies on.

The compiler turns them into kernel rules, the authz decision names the proxy's ports with
them, and the sandbox reproduces them; they live here so that none of those layers imports
another for a constant.
"""

from __future__ import annotations

from typing import Final

#: The ports Istio reserves for its sidecar: no workload container may declare, reach or
#: send from them, except the control ports a rule names.
PROXY_PORT_RANGE: Final = (15000, 15090)
ISTIO_RESERVED_PORTS: Final = frozenset(range(PROXY_PORT_RANGE[0], PROXY_PORT_RANGE[1] + 1))
#: The proxy's ports that a rule may open to a container (``to: proxy``).
CONTROL_PORTS: Final = (15000, 15004, 15020, 15021, 15090)
OUTBOUND_CAPTURE_PORT: Final = 15001
INBOUND_CAPTURE_PORT: Final = 15006
DNS_CAPTURE_PORT: Final = 15053
