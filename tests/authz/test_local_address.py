"""Issue 23.6: wherever the authz server shares the pod's network namespace, its address is
one only the proxy's uid may serve (the kernel rules reject any other uid sending from
15000-15090), unless the channel is mutual TLS. The real-kernel proof that a squatter on
the address cannot answer is ``test_envoy_e2e.py``'s
``test_a_container_that_binds_the_authz_address_first_cannot_answer_checks``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meshguard.authz.server import AuthzSettings
from meshguard.cli import main
from meshguard.mesh import (
    LOCAL_AUTHZ_PORT,
    PROXY_PORT_RANGE,
    is_loopback,
    is_protected_port,
    unprotected_authz_port,
)
from meshguard.rules.compiler import CompilerSettings

PROJECT = Path(__file__).resolve().parents[2]


def test_the_default_address_is_in_the_range_the_rules_protect():
    assert is_protected_port(LOCAL_AUTHZ_PORT)
    low, high = (int(p) for p in CompilerSettings().proxy_port_spec.split(",")[0].split(":"))
    assert (low, high) == PROXY_PORT_RANGE and low <= LOCAL_AUTHZ_PORT <= high
    assert AuthzSettings().port == LOCAL_AUTHZ_PORT


def test_the_standalone_envoy_calls_the_protected_address():
    bootstrap = yaml.safe_load((PROJECT / "envoy/loopback-listener.yaml").read_text())
    (authz,) = (c for c in bootstrap["static_resources"]["clusters"] if "authz" in c["name"])
    (endpoint,) = authz["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == ("127.0.0.1", LOCAL_AUTHZ_PORT)


@pytest.mark.parametrize(
    ("host", "port", "warned"),
    [("127.0.0.1", 9191, True), ("::1", 15091, True), ("localhost", 8080, True),
     ("127.0.0.1", LOCAL_AUTHZ_PORT, False), ("0.0.0.0", 9191, False)],
)  # fmt: skip
def test_a_plaintext_loopback_port_outside_the_range_is_named_in_the_log(
    host: str, port: int, warned: bool
):
    """serve-authz warns (a test's random port is fine; a pod's is not); envoy-config, which
    writes the pod's configuration, refuses."""
    message = unprotected_authz_port(port)
    assert "outside the proxy's protected range (15000-15090)" in message
    assert (is_loopback(host) and not is_protected_port(port)) is warned


@pytest.mark.parametrize("port", ["9191", "15091"])
def test_envoy_config_refuses_a_loopback_authz_port_outside_the_range(
    port: str, capsys: pytest.CaptureFixture[str]
):
    assert main(["envoy-config", "--format", "bootstrap", "--port", port]) == 2
    assert "outside the proxy's protected range" in capsys.readouterr().err
    # elsewhere than loopback (another pod, a Service) the port is the operator's
    assert main(["envoy-config", "--format", "bootstrap", "--authz-host", "10.0.0.7",
                 "--port", port]) == 0  # fmt: skip
    capsys.readouterr()
