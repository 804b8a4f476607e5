"""What the Envoy loopback listener's configuration and the Check server agree on.

The listener writes the pod's name into :data:`POD_HEADER` of every CheckRequest and the
server reads it there; both import the names from here, so writing Envoy's configuration
never loads gRPC.
"""

from __future__ import annotations

from typing import Final

POD_HEADER: Final = "x-meshguard-pod"
SERVICE_NAME: Final = "envoy.service.auth.v3.Authorization"
