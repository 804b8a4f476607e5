"""Each image starts its entrypoint the way the chart runs it, built by the Dockerfile's steps.

No container engine here: tests/support/dockerfile.py replays the Dockerfile's stages at the
paths they name (an overlay root per stage over this Debian bookworm host, ``chroot`` for
``RUN``, ``COPY --from`` between stage roots), so what a build bakes into a file (pip's
console-script shebangs) meets the paths the image runs it from. Then, in the replayed
images, as the container's uid (else the Dockerfile's USER):

- init image: ``meshguard-init`` exactly as the webhook injects it (its args, uid 0, the
  ruleset volume) in a fresh network namespace with Istio's capture rules, then
  ``meshguard-validation`` (its args, its uid) in the same namespace; the CNI DaemonSet's
  container (the chart's command and args) with ``--help`` appended (it is a node daemon);
- the servers' image: the webhook's and the authz server's containers from the chart, with
  ``--help`` appended.

On the Dockerfile before this test (the init virtualenv built at /opt/meshguard-init and
copied to /opt/meshguard) every one of the init image's runs fails: ``/usr/bin/env:
'meshguard': No such file or directory`` (the shebang's interpreter is missing).
Takes about two minutes (two virtualenvs are built with pip).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshguard.inject.transform import InjectSettings, inject_pod
from meshguard.rules.backend import Backend
from meshguard.sandbox.netns import NetworkNamespace
from tests.charts.test_chart import CHART, one, render
from tests.rules.test_backends import load_iptables, meshguard_in
from tests.support.dockerfile import BuiltStage, Replay
from tests.support.shared import shared_file

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def replay() -> Iterator[Replay]:
    if os.geteuid() != 0:
        pytest.skip("needs root (overlay mounts, chroot, network namespaces)")
    for tool in ("chroot", "dpkg-query", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    with Replay(ROOT / "Dockerfile", ROOT) as built:
        yield built


@pytest.fixture(scope="module")
def init_image(replay: Replay) -> BuiltStage:
    return replay.build(target="init")


@pytest.fixture(scope="module")
def server_image(replay: Replay) -> BuiltStage:
    return replay.build()


def injected_pod() -> dict[str, Any]:
    """Istio's injector sample, admitted by meshguard (init-container mode)."""
    text = shared_file("istio-injector-samples", "hello.yaml.injected").read_text()
    (deployment,) = [d for d in yaml.safe_load_all(text) if d]
    pod: dict[str, Any] = deployment["spec"]["template"]
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False))
    return pod


def init_container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod["spec"]["initContainers"] if c["name"] == name]
    return found


def mount_ruleset(image: BuiltStage, container: dict[str, Any], ruleset: str) -> None:
    """The meshguard-ruleset volume, where the container mounts it."""
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "meshguard-ruleset"]
    directory = image.root / mount["mountPath"].lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ruleset").write_text(ruleset)


def chart_container(values: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    workload = one(render(values), kind, name)
    spec = workload["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"]]
    # the pod's securityContext applies where the container's does not say
    context = {**(spec.get("securityContext") or {}), **(container.get("securityContext") or {})}
    return {**container, "securityContext": context}


def test_the_init_image_runs_meshguard_init_then_validation_as_injected(
    replay: Replay, init_image: BuiltStage
) -> None:
    pod = injected_pod()
    init = init_container(pod, "meshguard-init")
    mount_ruleset(init_image, init, pod["metadata"]["annotations"]["meshguard.io/ruleset"])
    assert init["securityContext"]["runAsUser"] == 0
    with NetworkNamespace() as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        load_iptables(ns, Backend.IPTABLES_LEGACY)
        done = replay.run_container(init_image, init, wrap=ns.argv([]))
        assert done.returncode == 0, done.stderr
        assert meshguard_in(ns)["iptables-legacy"] is True


def test_the_init_image_runs_meshguard_validation_after_the_cni_plugin(
    replay: Replay, init_image: BuiltStage
) -> None:
    """Istio CNI mode: meshguard-validation, as its uid, in a pod whose rules are in."""
    text = shared_file("istio-injector-samples", "hello.yaml.cni.injected").read_text()
    (deployment,) = [d for d in yaml.safe_load_all(text) if d]
    pod: dict[str, Any] = deployment["spec"]["template"]
    inject_pod(pod["metadata"], pod["spec"], settings=InjectSettings(request_template=False))
    validation = init_container(pod, "meshguard-validation")
    assert validation["securityContext"]["runAsUser"] != 0
    ruleset = pod["metadata"]["annotations"]["meshguard.io/ruleset"]
    with NetworkNamespace() as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        # what the node's CNI plugin does: the same ruleset, installed from outside the pod
        (init_image.root / "tmp/ruleset").write_text(ruleset)
        installed = replay.run(
            init_image,
            ["meshguard", "init", "--ruleset-file", "/tmp/ruleset"],
            user="0:0",
            wrap=ns.argv([]),
        )
        assert installed.returncode == 0, installed.stderr
        done = replay.run_container(init_image, validation, wrap=ns.argv([]))
        assert done.returncode == 0, done.stderr


def test_the_init_image_starts_the_cni_node_agent_as_the_chart_runs_it(
    replay: Replay, init_image: BuiltStage
) -> None:
    container = chart_container({"cni": {"enabled": True}}, "DaemonSet", "meshguard-cni-node")
    done = replay.run_container(init_image, container, extra_args=["--help"])
    assert done.returncode == 0, done.stderr
    assert "usage: meshguard" in done.stdout


def test_the_cni_shim_is_where_the_chart_expects_it(init_image: BuiltStage) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    shim = init_image.root / values["cni"]["pluginBinary"].lstrip("/")
    assert shim.is_file() and os.access(shim, os.X_OK)


@pytest.mark.parametrize("name", ["meshguard-webhook", "meshguard-authz"])
def test_the_servers_image_starts_each_server_as_the_chart_runs_it(
    replay: Replay, server_image: BuiltStage, name: str
) -> None:
    container = chart_container({}, "Deployment", name)
    done = replay.run_container(server_image, container, extra_args=["--help"])
    assert done.returncode == 0, done.stderr
    assert "usage: meshguard" in done.stdout
    # the image's own USER when the chart says nothing, never root
    assert replay.run(server_image, ["id", "-u"]).stdout.strip() == "65532"
