"""From Istio's injector output to kernel enforcement, the way a pod gets there.

``meshguard inject`` (fix mode assigns the uids) -> the ``meshguard.io/ruleset`` annotation
as the downward-API file -> ``meshguard init`` in a namespace with Istio's capture rules ->
each container's processes under the uid meshguard assigned.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshguard.rules.ruleset import Family, Ruleset
from meshguard.sandbox.netns import NetworkNamespace
from tests.support.podns import PodSandbox, Server
from tests.support.shared import shared_file

pytestmark = pytest.mark.root


def injected(policy: str | None) -> dict:
    source = shared_file("istio-injector-samples", "two_container.yaml.injected").read_text()
    documents = [d for d in yaml.safe_load_all(source) if d]
    template = documents[0]["spec"]["template"]
    if policy is not None:
        template["metadata"]["annotations"]["meshguard.io/policy"] = policy
    done = subprocess.run(
        [sys.executable, "-m", "meshguard", "inject", "-f", "-"],
        input=yaml.safe_dump_all(documents), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result: dict = next(yaml.safe_load_all(done.stdout))["spec"]["template"]
    return result


@pytest.mark.parametrize(
    ("policy", "hello_to_world", "world_to_hello"),
    [
        (None, "deny", "deny"),
        ("rules: [{from: hello, to: world, ports: [90]}]", "allow", "deny"),
    ],
)
def test_an_istio_injected_deployment_is_isolated_as_its_policy_says(
    tmp_path: Path, policy: str | None, hello_to_world: str, world_to_hello: str
):
    template = injected(policy)
    annotations = template["metadata"]["annotations"]
    status = json.loads(annotations["meshguard.io/status"])
    ruleset_file = tmp_path / "ruleset"  # what the downward-API volume holds
    ruleset_file.write_text(annotations["meshguard.io/ruleset"])
    uids = status["containers"]
    with NetworkNamespace() as ns:
        box = PodSandbox(
            ns=ns, ruleset=Ruleset.from_json(ruleset_file.read_text()), ruleset_file=ruleset_file
        )
        box.load_istio("ipnets.golden", families=[Family.IPV4])
        box.meshguard_init()
        box.serve(Server("hello", uids["hello"], uids["hello"], tcp=(80,)))
        box.serve(Server("world", uids["world"], uids["world"], tcp=(90,)))
        box.serve(Server("proxy", 1337, 1337, tcp=(15000,)))
        targets = [{"host": "127.0.0.1", "port": 90}, {"host": "127.0.0.1", "port": 80},
                   {"host": "127.0.0.1", "port": 15000}]  # fmt: skip
        hello = box.probe(uid=uids["hello"], gid=uids["hello"], targets=targets)
        world = box.probe(uid=uids["world"], gid=uids["world"], targets=targets)
        assert [r["result"] for r in hello] == [hello_to_world, "allow", "deny"]
        assert [r["result"] for r in world] == ["allow", world_to_hello, "deny"]
