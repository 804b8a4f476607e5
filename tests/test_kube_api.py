"""meshguard.kube_api against a scripted API server (real HTTPS): the path prefix, the token
read at each request, error answers named by their Status, bounded answers, refused access."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshguard import kube_api
from meshguard.errors import MeshguardFailure
from meshguard.kube_api import ApiAccess, ApiError
from tests.support.apiserver import ApiServer, scripted_api

POD = {"kind": "Pod", "apiVersion": "v1", "metadata": {"namespace": "demo", "name": "shop"}}
POD_PATH = "/api/v1/namespaces/demo/pods/shop"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    with scripted_api(tmp_path) as server:
        server.script.serve(POD)
        yield server


def test_a_pod_is_read_with_the_token_read_from_its_file_at_each_request(api, tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    access = ApiAccess(server=api.url, token_file=token, ca_pem=api.ca_pem)
    assert json.loads(kube_api.request(access, "GET", POD_PATH, what="pod", limit=4096)) == POD
    token.write_text("rotated")
    kube_api.request(access, "GET", POD_PATH, what="pod", limit=4096)
    assert api.script.requests == [("GET", POD_PATH, "first"), ("GET", POD_PATH, "rotated")]


def test_the_servers_path_prefix_is_kept(api):
    access = ApiAccess(server=api.url + "/proxy/", token="t", ca_file=str(api.ca_file))
    with pytest.raises(ApiError) as caught:
        kube_api.request(access, "GET", POD_PATH, what="pod demo/shop", limit=4096)
    assert api.script.requests == [("GET", "/proxy" + POD_PATH, "t")]
    assert str(caught.value) == "pod demo/shop: HTTP 404 (not found)"  # the Status's message
    assert (caught.value.status, caught.value.cause) == (404, "HTTP 404 (not found)")
    assert isinstance(caught.value, MeshguardFailure)  # the operator investigates


def test_an_answer_over_the_limit_is_refused(api):
    access = ApiAccess(server=api.url, token="t", ca_pem=api.ca_pem)
    with pytest.raises(ApiError, match=r"^pod: the API answer exceeds 64 bytes$"):
        kube_api.request(access, "GET", POD_PATH, what="pod", limit=64)


def test_a_server_not_trusted_by_the_ca_is_unreachable(api, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    with scripted_api(other) as stranger:
        access = ApiAccess(server=api.url, token="t", ca_pem=stranger.ca_pem)
        with pytest.raises(ApiError) as caught:
            kube_api.request(access, "GET", POD_PATH, what="pod", limit=4096)
    assert str(caught.value).startswith(f"pod: cannot reach the API server {api.url}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.cause
    assert caught.value.status is None
    assert api.script.requests == []


@pytest.mark.parametrize(
    "server", ["http://127.0.0.1:6443", "https://:6443", "https://h:port", "127.0.0.1:6443"]
)
def test_only_an_https_server_is_accepted(server):
    with pytest.raises(ApiError, match="expected https://host"):
        kube_api.request(ApiAccess(server=server), "GET", "/api", what="x", limit=1)


def test_a_ca_that_cannot_be_loaded_is_named(tmp_path):
    access = ApiAccess(server="https://127.0.0.1:1", ca_file=str(tmp_path / "missing.crt"))
    with pytest.raises(ApiError, match=r"cannot load the API server's CA .*missing\.crt"):
        access.tls()


def test_an_unreadable_or_empty_token_is_named(tmp_path):
    with pytest.raises(ApiError, match=r"cannot read the API token .*/absent"):
        kube_api.read_token(tmp_path / "absent")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ApiError, match=r"the API token .*/empty is empty"):
        kube_api.read_token(tmp_path / "empty")


@pytest.mark.parametrize(
    ("host", "port", "server"),
    [("10.96.0.1", "443", "https://10.96.0.1:443"), ("fd00::1", "6443", "https://[fd00::1]:6443"),
     ("", "443", None), ("10.96.0.1", None, None)],
)  # fmt: skip
def test_the_in_cluster_server_comes_from_the_service_environment(host, port, server):
    environ = {"KUBERNETES_SERVICE_HOST": host}
    if port is not None:
        environ["KUBERNETES_SERVICE_PORT"] = port
    assert kube_api.in_cluster_server(environ) == server
